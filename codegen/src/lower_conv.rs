//! Convolution family: blockwise Toeplitz kernels for `y_i = sum_{j <= i}
//! f[h, i - j] v_j`. Tensor-core template `conv_mma.cu` for f16/bf16, SIMT
//! template `conv_simt.cu` for f32; both take the same arguments.
//!
//! The kernel visits, per query block, the key range [`key_range`] computes
//! (the causal hull of the block, also cut where lags pass the filter's
//! end); partials over disjoint key ranges add, which is the ring interface.

use crate::config::round_up;
use crate::{
    base_context, c_elem_type, does_not_fit, kernel_name, render, require_16_byte_rows, Arch,
    CodegenError, GeneratedKernel, GridDim, KernelConfig, KernelInfo, KernelParam, ParamRole,
    Target,
};
use mixc_dsl::ir::{Decay, Mask, MixerSpec, Norm, Score};
use std::ops::Range;

/// Tile shape derived from the config.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConvShape {
    pub block_dv: u32,
    pub dv_blocks: u32,
    pub threads: u32,
    pub smem_bytes: u32,
}

/// Shared memory of `conv_mma.cu`: `stages` V tiles (rows padded by 8
/// elements) and filter slices (f32). Must match the template's `SMEM_BYTES`.
pub fn smem_bytes_mma(block_dv: u32, cfg: &KernelConfig, elem_bytes: u32) -> u32 {
    cfg.stages * (cfg.block_n * (block_dv + 8) * elem_bytes + (cfg.block_m + cfg.block_n) * 4)
}

/// Shared memory of `conv_simt.cu`: one f32 V tile and one filter slice.
pub fn smem_bytes_simt(block_dv: u32, cfg: &KernelConfig) -> u32 {
    4 * (cfg.block_n * block_dv + cfg.block_m + cfg.block_n)
}

/// The key rows (local to the V buffer) a query block visits: the rows of
/// `[kv_begin, kv_end)` whose lag to some query of `q_rows` (local rows, global
/// position `q_pos0 + row`) lies in `[0, filter_len)`. The templates compute
/// the same closed form; for `filter_len` covering every lag it is
/// `plan::key_hull(causal)` (a unit test checks that).
pub fn key_range(
    q_rows: Range<i64>,
    kv: Range<i64>,
    q_pos0: i64,
    k_pos0: i64,
    filter_len: i64,
) -> Range<i64> {
    if q_rows.is_empty() {
        return kv.start..kv.start;
    }
    let (q_first, q_last) = (q_pos0 + q_rows.start, q_pos0 + q_rows.end - 1);
    let lo = kv.start.max(q_first - k_pos0 - filter_len + 1);
    let hi = kv.end.min(q_last - k_pos0 + 1);
    if hi > lo {
        lo..hi
    } else {
        kv.start..kv.start
    }
}

/// How the tensor-core kernel lays its warps over the `block_m x block_dv`
/// output tile: `(rows, columns)`, rows first (16 query rows per warp at least).
pub fn warp_grid(cfg: &KernelConfig) -> (u32, u32) {
    let wm = cfg.warps.min((cfg.block_m / 16).max(1));
    (wm, cfg.warps / wm)
}

/// Default tile configuration: 64 x 64 Toeplitz tiles, 64 value columns per CTA.
pub fn default_config(spec: &MixerSpec, target: &Target) -> KernelConfig {
    let dvp = round_up(spec.value_dim, 16);
    if target.uses_tensor_cores() {
        KernelConfig {
            block_m: 64,
            block_n: 64,
            warps: 4,
            stages: 2,
            chunk: 64,
            block_dv: 64.min(dvp),
        }
    } else {
        KernelConfig {
            block_m: 64,
            block_n: 32,
            warps: 4,
            stages: 1,
            chunk: 64,
            block_dv: 64.min(dvp),
        }
    }
}

/// Validates `cfg` for this spec/target and derives the tile shape.
pub fn shape(
    spec: &MixerSpec,
    target: &Target,
    cfg: &KernelConfig,
) -> Result<ConvShape, CodegenError> {
    let arch = target.arch;
    let dvp = round_up(spec.value_dim, 16);
    let block_dv = if cfg.block_dv == 0 {
        dvp
    } else {
        cfg.block_dv.min(dvp)
    };
    let threads = cfg.warps * 32;
    let smem = if target.uses_tensor_cores() {
        if cfg.stages > 2 {
            return Err(CodegenError::InvalidConfig(format!(
                "stages={}: the convolution kernel prefetches at most one key block ahead (stages 1 or 2)",
                cfg.stages
            )));
        }
        let (wm, wn) = warp_grid(cfg);
        if !cfg.block_m.is_multiple_of(16 * wm) || !block_dv.is_multiple_of(16 * wn) {
            return Err(does_not_fit(
                spec,
                arch,
                format!(
                    "block_m={} block_dv={block_dv} warps={}: the warps split the output tile \
                     {wm} (rows) x {wn} (columns) and each warp needs whole 16 x 16 tiles",
                    cfg.block_m, cfg.warps
                ),
            ));
        }
        require_16_byte_rows(spec, target, &[("value_dim", spec.value_dim)])?;
        smem_bytes_mma(block_dv, cfg, target.dtype.size_bytes() as u32)
    } else {
        if cfg.stages != 1 {
            return Err(CodegenError::InvalidConfig(format!(
                "stages={}: the f32 SIMT convolution kernel is single-stage (use stages=1)",
                cfg.stages
            )));
        }
        if !threads.is_multiple_of(block_dv) || !cfg.block_m.is_multiple_of(threads / block_dv) {
            return Err(does_not_fit(
                spec,
                arch,
                format!(
                    "block_dv={block_dv} with warps={}: the SIMT kernel gives each thread one value \
                     column, so 32 * warps must be a multiple of block_dv and block_m={} a multiple \
                     of 32 * warps / block_dv",
                    cfg.warps, cfg.block_m
                ),
            ));
        }
        smem_bytes_simt(block_dv, cfg)
    };
    if smem > arch.max_dynamic_smem_bytes() {
        return Err(does_not_fit(
            spec,
            arch,
            format!(
                "needs {smem} bytes of shared memory per block, {} allows {}; lower block_n or block_dv",
                arch.name(),
                arch.max_dynamic_smem_bytes()
            ),
        ));
    }
    Ok(ConvShape {
        block_dv,
        dv_blocks: spec.value_dim.div_ceil(block_dv),
        threads,
        smem_bytes: smem,
    })
}

pub(crate) fn lower(
    spec: &MixerSpec,
    target: &Target,
    cfg: &KernelConfig,
) -> Result<GeneratedKernel, CodegenError> {
    let unsupported = |what: String| CodegenError::Unsupported {
        spec: spec.name.clone(),
        what,
    };
    let filter = match &spec.score {
        Score::Filter { input } => input.clone(),
        Score::Dot { .. } => {
            return Err(unsupported("a dot score in the convolution kernel".into()))
        }
    };
    if spec.bias.is_some() || spec.transform.is_some() || !matches!(spec.decay, Decay::None) {
        return Err(unsupported(
            "`bias`, `transform` or `decay` with a filter score: the Toeplitz kernel applies the filter only".into(),
        ));
    }
    if !matches!(spec.norm, Norm::None) {
        return Err(unsupported(format!(
            "normalisation `{}` with a filter score: the convolution kernel implements `norm = none`",
            spec.norm
        )));
    }
    if !matches!(spec.mask, Mask::Causal) {
        return Err(unsupported(format!(
            "mask `{}` with a filter score: the convolution kernel implements `mask = causal`",
            spec.mask
        )));
    }
    let sh = shape(spec, target, cfg)?;
    let template = if target.uses_tensor_cores() {
        "conv_mma.cu"
    } else {
        "conv_simt.cu"
    };
    let params = params(spec, target, &filter);

    let mut ctx = base_context(spec, target, cfg, template);
    ctx.insert("block_dv", &sh.block_dv);
    ctx.insert("dv_blocks", &sh.dv_blocks);
    ctx.insert("num_threads", &sh.threads);
    ctx.insert("smem_bytes", &sh.smem_bytes);
    ctx.insert("warps_m", &warp_grid(cfg).0);
    ctx.insert("warps_n", &warp_grid(cfg).1);
    ctx.insert("filter_param", &filter_param(&filter));
    ctx.insert("params", &params);
    let source = render(template, &ctx)?;

    Ok(GeneratedKernel {
        spec_name: spec.name.clone(),
        family: spec.family,
        template: template.into(),
        target: *target,
        config: *cfg,
        source,
        kernels: vec![KernelInfo {
            name: kernel_name(spec, target),
            grid: [
                GridDim::QueryBlocks { block: cfg.block_m },
                GridDim::Fixed(spec.heads * sh.dv_blocks),
                GridDim::Batch,
            ],
            threads_per_block: sh.threads,
            dynamic_smem_bytes: sh.smem_bytes,
            needs_smem_opt_in: sh.smem_bytes > Arch::DEFAULT_SMEM_LIMIT,
            params,
        }],
    })
}

/// C name of the filter's parameter (prefixed so it never collides with kernel locals).
fn filter_param(input: &str) -> String {
    crate::input_param(input)
}

fn params(spec: &MixerSpec, target: &Target, filter: &str) -> Vec<KernelParam> {
    let t = c_elem_type(target.dtype);
    let _ = spec;
    let mut p = vec![
        KernelParam::new(
            "v",
            &format!("const {t}* __restrict__"),
            ParamRole::V,
            "[batch, kv_rows, kv_heads, value_dim]",
        ),
        KernelParam::new(
            &filter_param(filter),
            "const float* __restrict__",
            ParamRole::Input(filter.into()),
            "[heads, seq_len] filter, indexed by lag i - j",
        ),
        KernelParam::new(
            "o",
            &format!("{t}* __restrict__"),
            ParamRole::Output,
            "[batch, q_rows, heads, value_dim] output (with accumulate: o_acc's new value), or null",
        ),
        KernelParam::new(
            "o_acc",
            "float* __restrict__",
            ParamRole::PartialOutput,
            "[batch, q_rows, heads, value_dim] f32 partial sum, or null",
        ),
    ];
    let ints: [(&str, &str); 8] = [
        ("q_rows", "query rows per sequence in o / o_acc"),
        ("kv_rows", "key rows per sequence in v"),
        ("kv_begin", "first key row to visit"),
        ("kv_end", "one past the last key row to visit"),
        ("q_pos0", "global position of query row 0"),
        ("k_pos0", "global position of key row 0"),
        ("seq_len", "filter length (global sequence length)"),
        (
            "accumulate",
            "1: add this partial to o_acc; 0: overwrite it",
        ),
    ];
    for (n, doc) in ints {
        p.push(KernelParam::new(n, "int", ParamRole::Scalar, doc));
    }
    p
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plan::key_hull;

    /// The kernel's key range is the plan's causal hull whenever the filter
    /// covers every lag, for shards at any offsets (ring steps).
    #[test]
    fn key_range_matches_the_causal_plan() {
        for (q_pos0, k_pos0) in [(0i64, 0i64), (128, 0), (0, 128), (96, 32), (256, 256)] {
            for qb in [0..64i64, 64..100, 5..6, 0..1] {
                for kv in [0..128i64, 10..50, 0..0, 100..128] {
                    let got = key_range(qb.clone(), kv.clone(), q_pos0, k_pos0, 1 << 20);
                    let q = (q_pos0 + qb.start) as usize..(q_pos0 + qb.end) as usize;
                    let keys = (k_pos0 + kv.start) as usize..(k_pos0 + kv.end) as usize;
                    let want = key_hull(&Mask::Causal, q, keys);
                    let got_g = (k_pos0 + got.start) as usize..(k_pos0 + got.end) as usize;
                    if want.is_empty() {
                        assert!(
                            got.is_empty(),
                            "{qb:?} {kv:?} {q_pos0} {k_pos0}: {got:?} vs {want:?}"
                        );
                    } else {
                        assert_eq!(got_g, want, "{qb:?} {kv:?} {q_pos0} {k_pos0}");
                    }
                }
            }
        }
    }

    /// Keys whose every lag is past the filter's end are not visited; every
    /// key with a lag inside it is.
    #[test]
    fn key_range_stops_at_the_filter_end() {
        let (q_pos0, k_pos0, f) = (1000i64, 0i64, 300i64);
        let r = key_range(0..64, 0..2000, q_pos0, k_pos0, f);
        for j in 0..2000i64 {
            let lags = (0..64).map(|i| q_pos0 + i - (k_pos0 + j));
            let needed = lags.clone().any(|l| (0..f).contains(&l));
            assert_eq!(r.contains(&j), needed, "key {j}");
        }
    }
}
