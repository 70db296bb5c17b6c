//! The search space of every backend and family, in one place.
//!
//! CPU backend ([`cpu_candidates`]): the fields of [`CpuConfig`] that change
//! speed and not results: query/key tile (`block_m x block_n`, blocked path),
//! chunk length (state-passing paths) and worker threads.
//!
//! CUDA ([`cuda_candidates`]): [`KernelConfig`] per family: the default, the
//! curated [`KernelConfig::alternatives`] of codegen, then a grid over the
//! fields the family's kernels read:
//! - softmax: `block_m`, `block_n`, `warps`, `stages` (warps so that each
//!   warp owns 16 or 32 query rows, the shapes the mma fragments use);
//! - linear / retention / gated (chunkwise): `chunk`, `warps`;
//! - convolution: the `block_m x block_n` tile.
//!
//! Points codegen cannot generate (template limits, shared memory beyond the
//! arch) come back as rejected with codegen's reason; they are never timed.

use super::{Candidate, CpuTiles, TunedConfig};
use crate::cpu::{path_for, CpuConfig, CpuPath};
use mixc_codegen::{generate, KernelConfig, Target};
use mixc_dsl::ir::{Family, MixerSpec};
use sha2::{Digest, Sha256};

/// CPU tile edges tried on the blocked path.
pub const CPU_BLOCKS: [usize; 3] = [32, 64, 128];
/// CPU chunk lengths tried on the state-passing paths.
pub const CPU_CHUNKS: [usize; 5] = [16, 32, 64, 128, 256];

/// Worker-thread counts worth trying on `cores` cores: all of them, and half
/// (which can win when the working set of a tile thrashes a shared cache).
pub fn thread_options(cores: usize) -> Vec<usize> {
    let cores = cores.max(1);
    let mut v = vec![cores];
    if cores >= 4 {
        v.push(cores / 2);
    }
    v
}

/// CPU candidates for `spec` at sequence length `seq`: `base` (the heuristic
/// default, `CpuConfig::default_for`) first, then the grid of its path.
/// Tiles longer than the sequence (rounded up to a power of two) are left
/// out: they compute the same as the sequence-long tile.
pub fn cpu_candidates(spec: &MixerSpec, seq: usize, base: &CpuConfig) -> Vec<Candidate> {
    let path = path_for(spec);
    let cap = seq.next_power_of_two().max(CPU_BLOCKS[0]);
    let default = CpuTiles::of(base);
    let mut tiles = vec![default];
    for threads in thread_options(base.threads) {
        match path {
            CpuPath::Blocked => {
                for &block_m in CPU_BLOCKS.iter().filter(|&&b| b <= cap) {
                    for &block_n in CPU_BLOCKS.iter().filter(|&&b| b <= cap) {
                        tiles.push(CpuTiles {
                            block_m,
                            block_n,
                            threads,
                            ..default
                        });
                    }
                }
            }
            CpuPath::Chunkwise | CpuPath::GlobalState => {
                for &chunk in CPU_CHUNKS.iter().filter(|&&c| c <= cap) {
                    tiles.push(CpuTiles {
                        chunk,
                        threads,
                        ..default
                    });
                }
            }
        }
    }
    dedup(&mut tiles);
    tiles
        .into_iter()
        .enumerate()
        .map(|(index, t)| Candidate {
            index,
            config: TunedConfig::Cpu(t),
            is_default: index == 0,
            label: cpu_label(path, &t),
            tile_area: match path {
                CpuPath::Blocked => (t.block_m * t.block_n) as u64,
                _ => (t.chunk * t.chunk) as u64,
            },
        })
        .collect()
}

/// The fields that matter on `path`.
pub fn cpu_label(path: CpuPath, t: &CpuTiles) -> String {
    match path {
        CpuPath::Blocked => format!("block {}x{}, {} threads", t.block_m, t.block_n, t.threads),
        _ => format!("chunk {}, {} threads", t.chunk, t.threads),
    }
}

/// CUDA candidates that generate, and the grid points that do not (with
/// codegen's reason).
#[derive(Debug, Clone, Default)]
pub struct CudaSpace {
    pub candidates: Vec<Candidate>,
    pub rejected: Vec<(Candidate, String)>,
}

/// The grid of `family`'s fields, as overrides of the default.
fn cuda_grid(spec: &MixerSpec, default: &KernelConfig) -> Vec<KernelConfig> {
    let mut out = Vec::new();
    match spec.family {
        Family::Softmax => {
            for block_m in [32, 64, 128] {
                for warps in [block_m / 32, block_m / 16] {
                    for block_n in [32, 64, 128] {
                        for stages in [1, 2, 3] {
                            out.push(KernelConfig {
                                block_m,
                                block_n,
                                warps,
                                stages,
                                ..*default
                            });
                        }
                    }
                }
            }
        }
        Family::Linear | Family::Retention | Family::Gated => {
            for chunk in [16, 32, 64, 128] {
                for warps in [2, 4, 8] {
                    out.push(KernelConfig {
                        chunk,
                        warps,
                        ..*default
                    });
                }
            }
        }
        Family::Convolution => {
            for block_m in [32, 64, 128] {
                for block_n in [32, 64, 128] {
                    out.push(KernelConfig {
                        block_m,
                        block_n,
                        ..*default
                    });
                }
            }
        }
    }
    out
}

/// The fields the family's kernels read.
pub fn cuda_label(family: Family, c: &KernelConfig) -> String {
    match family {
        Family::Softmax => format!(
            "block_m={} block_n={} warps={} stages={}",
            c.block_m, c.block_n, c.warps, c.stages
        ),
        Family::Linear | Family::Retention | Family::Gated => {
            format!(
                "chunk={} warps={} block_dv={}",
                c.chunk, c.warps, c.block_dv
            )
        }
        Family::Convolution => format!(
            "block_m={} block_n={} warps={} block_dv={}",
            c.block_m, c.block_n, c.warps, c.block_dv
        ),
    }
}

fn cuda_tile_area(family: Family, c: &KernelConfig) -> u64 {
    match family {
        Family::Linear | Family::Retention | Family::Gated => c.chunk as u64 * c.chunk as u64,
        _ => c.block_m as u64 * c.block_n as u64,
    }
}

/// Wraps a kernel configuration as a candidate.
pub fn cuda_candidate(
    spec: &MixerSpec,
    index: usize,
    cfg: KernelConfig,
    is_default: bool,
) -> Candidate {
    Candidate {
        index,
        config: TunedConfig::Cuda(cfg),
        is_default,
        label: cuda_label(spec.family, &cfg),
        tile_area: cuda_tile_area(spec.family, &cfg),
    }
}

/// The CUDA search space of `spec` on `target`: the default first, then
/// codegen's alternatives, then the family grid (distinct, in that order).
pub fn cuda_candidates(spec: &MixerSpec, target: &Target) -> CudaSpace {
    let default = KernelConfig::default_for(spec, target);
    let mut configs = vec![default];
    for alt in KernelConfig::alternatives(spec, target) {
        if let Ok(c) = default.with_overrides(&[alt]) {
            configs.push(c);
        }
    }
    configs.extend(cuda_grid(spec, &default));
    dedup(&mut configs);
    let mut space = CudaSpace::default();
    let mut seen: Vec<Vec<u8>> = Vec::new();
    for (index, cfg) in configs.into_iter().enumerate() {
        let cand = cuda_candidate(spec, index, cfg, index == 0);
        match generate(spec, target, &cfg) {
            Ok(g) => {
                // Configs differing only in fields this family ignores give
                // the same kernel: keep the first, time it once.
                let fp = fingerprint(&g);
                if !seen.contains(&fp) {
                    seen.push(fp);
                    space.candidates.push(cand);
                }
            }
            Err(e) => space
                .rejected
                .push((cand, format!("does not generate: {e}"))),
        }
    }
    // Distinct kernels whose family fields coincide: name every field.
    let labels: Vec<String> = space.candidates.iter().map(|c| c.label.clone()).collect();
    for c in &mut space.candidates {
        if labels.iter().filter(|l| **l == c.label).count() > 1 {
            if let TunedConfig::Cuda(cfg) = c.config {
                c.label = cfg.describe();
            }
        }
    }
    space
}

/// What makes two generated kernels the same: the source without its
/// header's `config:` comment, and the launch description.
fn fingerprint(g: &mixc_codegen::GeneratedKernel) -> Vec<u8> {
    let mut h = Sha256::new();
    for line in g.source.lines().filter(|l| !l.starts_with("// config:")) {
        h.update(line.as_bytes());
        h.update(b"\n");
    }
    h.update(serde_json::to_vec(&g.kernels).unwrap_or_default());
    h.finalize().to_vec()
}

/// Keeps the first occurrence of each value, in order.
fn dedup<T: PartialEq + Copy>(v: &mut Vec<T>) {
    let mut seen: Vec<T> = Vec::with_capacity(v.len());
    v.retain(|x| {
        if seen.contains(x) {
            false
        } else {
            seen.push(*x);
            true
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(src: &str) -> MixerSpec {
        mixc_dsl::parse_str(src).unwrap()
    }

    const SOFTMAX: &str = "mixer a { heads = 2; head_dim = 64; dtype = bf16; \
        score = dot(q, k); mask = causal; norm = softmax; }";
    const RETENTION: &str = "mixer r { heads = 2; head_dim = 32; dtype = bf16; \
        score = dot(q, k); decay = 0.9; mask = causal; norm = none; }";

    #[test]
    fn cpu_space_starts_with_the_default_and_has_no_duplicates() {
        for src in [SOFTMAX, RETENTION] {
            let s = spec(src);
            let base = CpuConfig::default_for(&s, 512);
            let c = cpu_candidates(&s, 512, &base);
            assert!(c[0].is_default && c.iter().filter(|c| c.is_default).count() == 1);
            assert_eq!(c[0].config, TunedConfig::Cpu(CpuTiles::of(&base)));
            assert!(c.len() >= 4, "{c:?}");
            for (i, a) in c.iter().enumerate() {
                assert_eq!(a.index, i);
                assert!(
                    c[..i].iter().all(|b| b.config != a.config),
                    "duplicate {a:?}"
                );
            }
        }
        // The chunkwise path varies the chunk, the blocked path the tile.
        let r = spec(RETENTION);
        let c = cpu_candidates(&r, 512, &CpuConfig::default_for(&r, 512));
        assert!(c.iter().all(|c| c.label.starts_with("chunk ")), "{c:?}");
    }

    #[test]
    fn cpu_tiles_never_exceed_a_short_sequence() {
        let s = spec(SOFTMAX);
        let base = CpuConfig::default_for(&s, 40);
        for c in cpu_candidates(&s, 40, &base).iter().skip(1) {
            let TunedConfig::Cpu(t) = c.config else {
                panic!()
            };
            assert!(t.block_m <= 64 && t.block_n <= 64, "{c:?}");
        }
    }

    #[test]
    fn cuda_space_generates_and_explains_rejections() {
        for src in [SOFTMAX, RETENTION] {
            let s = spec(src);
            let target = Target::for_spec(&s, mixc_codegen::Arch::Sm90);
            let space = cuda_candidates(&s, &target);
            assert!(space.candidates[0].is_default);
            assert!(space.candidates.len() >= 4, "{:?}", space.rejected);
            // Equivalent configs were merged, so every label names a distinct kernel.
            let labels: Vec<&str> = space.candidates.iter().map(|c| c.label.as_str()).collect();
            for (i, l) in labels.iter().enumerate() {
                assert!(!labels[..i].contains(l), "duplicate label {l}");
            }
            for (c, why) in &space.rejected {
                assert!(
                    !c.is_default && why.starts_with("does not generate"),
                    "{why}"
                );
            }
        }
    }
}
