//! Pruning of CUDA candidates before any timing, from what NVRTC reports
//! (no GPU needed). A candidate is dropped, with its reason, when
//! - it does not generate or compile;
//! - a kernel needs more shared memory (static + dynamic) than one block of
//!   the arch may opt into: it could not even launch;
//! - a kernel spills registers to local memory;
//! - its occupancy estimate is below [`OCCUPANCY_FRACTION`] of the best
//!   candidate's (the default is exempt from this rule only: it is the
//!   baseline every speedup is measured against).

use super::space::CudaSpace;
use super::Candidate;
use crate::compile_cache::CompileCache;
use crate::nvrtc::{self, ResourceUsage};
use mixc_codegen::{generate, Arch, Target};
use mixc_dsl::ir::MixerSpec;
use rayon::prelude::*;
use serde::{Deserialize, Serialize};
use std::fmt;

/// Candidates whose occupancy estimate is below this fraction of the best are pruned.
pub const OCCUPANCY_FRACTION: f64 = 0.5;

/// Per-SM limits the occupancy estimate uses (CUDA occupancy calculator
/// values for compute capability 8.0 and 9.0).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SmLimits {
    pub regs_per_sm: u32,
    pub max_threads_per_sm: u32,
    pub max_blocks_per_sm: u32,
    pub smem_per_sm: u32,
    /// Shared memory the driver reserves for each resident block.
    pub reserved_smem_per_block: u32,
    /// Registers are allocated per warp in units of this many.
    pub reg_alloc_unit: u32,
}

impl SmLimits {
    pub fn of(arch: Arch) -> SmLimits {
        SmLimits {
            regs_per_sm: 65536,
            max_threads_per_sm: 2048,
            max_blocks_per_sm: 32,
            smem_per_sm: match arch {
                Arch::Sm80 => 164 * 1024,
                Arch::Sm90 => 228 * 1024,
            },
            reserved_smem_per_block: 1024,
            reg_alloc_unit: 256,
        }
    }
}

/// One compiled kernel's launch shape and ptxas resources.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct KernelResources {
    pub name: String,
    pub threads_per_block: u32,
    pub dynamic_smem_bytes: u32,
    pub usage: ResourceUsage,
}

impl KernelResources {
    pub fn smem_per_block(&self) -> u32 {
        self.usage.smem_bytes + self.dynamic_smem_bytes
    }
}

/// A candidate with what NVRTC said about each of its kernels.
#[derive(Debug, Clone, PartialEq)]
pub struct CompiledCandidate {
    pub candidate: Candidate,
    pub kernels: Vec<KernelResources>,
}

/// Fraction of the SM's warp slots a kernel can keep resident (0 when not
/// even one block fits).
pub fn occupancy(limits: &SmLimits, k: &KernelResources) -> f64 {
    let warps = k.threads_per_block.div_ceil(32).max(1);
    let max_warps = limits.max_threads_per_sm / 32;
    let regs_per_warp =
        (k.usage.registers * 32).div_ceil(limits.reg_alloc_unit) * limits.reg_alloc_unit;
    let by_regs = limits
        .regs_per_sm
        .checked_div(regs_per_warp * warps)
        .unwrap_or(u32::MAX);
    let by_smem = limits.smem_per_sm / (k.smem_per_block() + limits.reserved_smem_per_block);
    let by_threads = limits.max_threads_per_sm / (warps * 32);
    let blocks = by_regs
        .min(by_smem)
        .min(by_threads)
        .min(limits.max_blocks_per_sm);
    (blocks * warps) as f64 / max_warps as f64
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PruneKind {
    DoesNotGenerate,
    CompileError,
    SharedMemory,
    Spills,
    Occupancy,
}

impl fmt::Display for PruneKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            PruneKind::DoesNotGenerate => "does not generate",
            PruneKind::CompileError => "compile error",
            PruneKind::SharedMemory => "shared memory",
            PruneKind::Spills => "spills",
            PruneKind::Occupancy => "low occupancy",
        })
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Pruned {
    pub candidate: Candidate,
    pub kind: PruneKind,
    pub detail: String,
}

impl Pruned {
    pub fn reason(&self) -> String {
        format!("{}: {}", self.kind, self.detail)
    }
}

/// Survivors (with their occupancy estimate) and the pruned, both in candidate order.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct PruneReport {
    pub kept: Vec<(Candidate, f64)>,
    pub pruned: Vec<Pruned>,
}

impl PruneReport {
    /// `(kind, count)` for each kind that pruned something.
    pub fn counts(&self) -> Vec<(PruneKind, usize)> {
        let mut v: Vec<(PruneKind, usize)> = Vec::new();
        for p in &self.pruned {
            match v.iter_mut().find(|(k, _)| *k == p.kind) {
                Some((_, n)) => *n += 1,
                None => v.push((p.kind, 1)),
            }
        }
        v.sort();
        v
    }
    /// `3 shared memory, 1 spills`, or `none`.
    pub fn summary(&self) -> String {
        let c = self.counts();
        if c.is_empty() {
            return "none".into();
        }
        c.iter()
            .map(|(k, n)| format!("{n} {k}"))
            .collect::<Vec<_>>()
            .join(", ")
    }
    /// The pruned as `(candidate, reason)`, what [`super::run_tuning`] records.
    pub fn pruned_with_reasons(&self) -> Vec<(Candidate, String)> {
        self.pruned
            .iter()
            .map(|p| (p.candidate.clone(), p.reason()))
            .collect()
    }
    pub fn kept_candidates(&self) -> Vec<Candidate> {
        self.kept.iter().map(|(c, _)| c.clone()).collect()
    }
}

/// Applies the hard rules (shared memory, spills) and then the occupancy rule.
pub fn prune(arch: Arch, compiled: Vec<CompiledCandidate>) -> PruneReport {
    let limits = SmLimits::of(arch);
    let max_smem = arch.max_dynamic_smem_bytes();
    let mut report = PruneReport::default();
    let mut survivors = Vec::new();
    for c in compiled {
        let too_big = c.kernels.iter().find(|k| k.smem_per_block() > max_smem);
        let spills = c
            .kernels
            .iter()
            .find(|k| k.usage.spill_stores > 0 || k.usage.spill_loads > 0);
        let verdict = if let Some(k) = too_big {
            Some((
                PruneKind::SharedMemory,
                format!(
                    "{} needs {} bytes of shared memory per block, {arch} allows {max_smem}",
                    k.name,
                    k.smem_per_block()
                ),
            ))
        } else {
            spills.map(|k| {
                (
                    PruneKind::Spills,
                    format!(
                        "{} spills ({} bytes stores, {} bytes loads, {} registers)",
                        k.name, k.usage.spill_stores, k.usage.spill_loads, k.usage.registers
                    ),
                )
            })
        };
        match verdict {
            Some((kind, detail)) => report.pruned.push(Pruned {
                candidate: c.candidate,
                kind,
                detail,
            }),
            None => {
                // A candidate is as occupied as its least occupied kernel.
                let occ = c
                    .kernels
                    .iter()
                    .map(|k| occupancy(&limits, k))
                    .fold(f64::INFINITY, f64::min);
                let occ = if occ.is_finite() { occ } else { 0.0 };
                survivors.push((c.candidate, occ));
            }
        }
    }
    let best = survivors.iter().map(|(_, o)| *o).fold(0.0, f64::max);
    for (cand, occ) in survivors {
        if occ == 0.0 || (!cand.is_default && occ < OCCUPANCY_FRACTION * best) {
            report.pruned.push(Pruned {
                candidate: cand,
                kind: PruneKind::Occupancy,
                detail: format!(
                    "estimated occupancy {occ:.3} of the SM's warps, below {OCCUPANCY_FRACTION} x the best {best:.3}"
                ),
            });
        } else {
            report.kept.push((cand, occ));
        }
    }
    report.kept.sort_by_key(|(c, _)| c.index);
    report.pruned.sort_by_key(|p| p.candidate.index);
    report
}

/// Generates and compiles every candidate of `space` with NVRTC (in
/// parallel, through `cache`), then [`prune`]s. Codegen rejections and
/// compile errors are pruned with their message.
pub fn compile_and_prune(
    spec: &MixerSpec,
    target: &Target,
    space: CudaSpace,
    cache: Option<&CompileCache>,
) -> PruneReport {
    let results: Vec<Result<CompiledCandidate, Pruned>> = space
        .candidates
        .into_par_iter()
        .map(|candidate| compile_one(spec, target, candidate, cache))
        .collect();
    let mut compiled = Vec::new();
    let mut failed: Vec<Pruned> = space
        .rejected
        .into_iter()
        .map(|(candidate, why)| Pruned {
            candidate,
            kind: PruneKind::DoesNotGenerate,
            detail: why.trim_start_matches("does not generate: ").to_string(),
        })
        .collect();
    for r in results {
        match r {
            Ok(c) => compiled.push(c),
            Err(p) => failed.push(p),
        }
    }
    let mut report = prune(target.arch, compiled);
    report.pruned.extend(failed);
    report.pruned.sort_by_key(|p| p.candidate.index);
    report
}

fn compile_one(
    spec: &MixerSpec,
    target: &Target,
    candidate: Candidate,
    cache: Option<&CompileCache>,
) -> Result<CompiledCandidate, Pruned> {
    let fail = |candidate: Candidate, kind, detail: String| Pruned {
        candidate,
        kind,
        detail,
    };
    let super::TunedConfig::Cuda(cfg) = candidate.config else {
        return Err(fail(
            candidate,
            PruneKind::DoesNotGenerate,
            "not a CUDA configuration".into(),
        ));
    };
    let g = match generate(spec, target, &cfg) {
        Ok(g) => g,
        Err(e) => return Err(fail(candidate, PruneKind::DoesNotGenerate, e.to_string())),
    };
    let name = g
        .kernels
        .first()
        .map_or(g.spec_name.as_str(), |k| k.name.as_str());
    let m = match nvrtc::compile_with_cache(name, &g.source, target.arch, cache) {
        Ok(m) => m,
        Err(e) => return Err(fail(candidate, PruneKind::CompileError, e.to_string())),
    };
    let mut kernels = Vec::new();
    for k in &g.kernels {
        let Some(usage) = m.resources_of(&k.name) else {
            return Err(fail(
                candidate,
                PruneKind::CompileError,
                format!("no ptxas resource report for {}", k.name),
            ));
        };
        kernels.push(KernelResources {
            name: k.name.clone(),
            threads_per_block: k.threads_per_block,
            dynamic_smem_bytes: k.dynamic_smem_bytes,
            usage: usage.clone(),
        });
    }
    Ok(CompiledCandidate { candidate, kernels })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tune::{Candidate, TunedConfig};
    use mixc_codegen::KernelConfig;

    fn kernel(regs: u32, threads: u32, smem: u32) -> KernelResources {
        KernelResources {
            name: "k".into(),
            threads_per_block: threads,
            dynamic_smem_bytes: smem,
            usage: ResourceUsage {
                function: "k".into(),
                registers: regs,
                ..Default::default()
            },
        }
    }

    #[test]
    fn occupancy_follows_the_binding_limit() {
        let l = SmLimits::of(Arch::Sm90);
        // 128 threads x 128 regs = 16384 regs/block: 4 blocks = 16 of 64 warps.
        assert_eq!(occupancy(&l, &kernel(128, 128, 0)), 0.25);
        // 100 KB of smem per block: 2 blocks on sm_90 (228 KB), 1 on sm_80 (164 KB).
        assert_eq!(occupancy(&l, &kernel(32, 128, 100 * 1024)), 8.0 / 64.0);
        assert_eq!(
            occupancy(&SmLimits::of(Arch::Sm80), &kernel(32, 128, 100 * 1024)),
            4.0 / 64.0
        );
        // Few registers, small blocks: capped by 32 blocks per SM.
        assert_eq!(occupancy(&l, &kernel(16, 32, 0)), 0.5);
        // Not one block fits.
        assert_eq!(occupancy(&l, &kernel(255, 1024, 0)), 0.0);
    }

    fn cand(index: usize, is_default: bool) -> Candidate {
        Candidate {
            index,
            config: TunedConfig::Cuda(KernelConfig {
                block_m: 64,
                block_n: 64,
                warps: 4,
                stages: 2,
                chunk: 64,
                block_dv: 0,
            }),
            is_default,
            label: format!("c{index}"),
            tile_area: 4096,
        }
    }

    #[test]
    fn hard_rules_and_relative_occupancy() {
        let max = Arch::Sm90.max_dynamic_smem_bytes();
        let mut spill = kernel(255, 128, 0);
        spill.usage.spill_stores = 8;
        let mut static_smem = kernel(64, 128, max - 100);
        static_smem.usage.smem_bytes = 200; // static + dynamic > the limit
        let compiled = vec![
            CompiledCandidate {
                candidate: cand(0, true),
                kernels: vec![kernel(200, 256, 0)],
            },
            CompiledCandidate {
                candidate: cand(1, false),
                kernels: vec![kernel(64, 128, max + 1)],
            },
            CompiledCandidate {
                candidate: cand(2, false),
                kernels: vec![spill],
            },
            CompiledCandidate {
                candidate: cand(3, false),
                kernels: vec![kernel(64, 128, 0)],
            },
            CompiledCandidate {
                candidate: cand(4, false),
                kernels: vec![kernel(64, 128, 0), kernel(255, 256, 0)],
            },
            CompiledCandidate {
                candidate: cand(5, false),
                kernels: vec![static_smem],
            },
        ];
        let r = prune(Arch::Sm90, compiled);
        let kinds: Vec<(usize, PruneKind)> = r
            .pruned
            .iter()
            .map(|p| (p.candidate.index, p.kind))
            .collect();
        assert_eq!(
            kinds,
            vec![
                (1, PruneKind::SharedMemory),
                (2, PruneKind::Spills),
                (4, PruneKind::Occupancy),
                (5, PruneKind::SharedMemory),
            ]
        );
        // The default (occupancy 0.125 < 0.5 x 0.5) stays: it is the baseline.
        let kept: Vec<usize> = r.kept.iter().map(|(c, _)| c.index).collect();
        assert_eq!(kept, vec![0, 3]);
        assert_eq!(r.summary(), "2 shared memory, 1 spills, 1 low occupancy");
        assert!(
            r.pruned[0].reason().contains("allows"),
            "{}",
            r.pruned[0].reason()
        );
    }
}
