//! Linear, retention and gated families: chunkwise (state-passing) kernels.
//! Tensor-core template `chunkwise_mma.cu` for f16/bf16, SIMT template
//! `chunkwise_simt.cu` for f32; both take the same arguments.
//!
//! Rust decides what the kernel computes: the feature maps, the decay kind
//! (for retention the per-head `log2 gamma_h` table is evaluated here from
//! the spec's expression, so no expression code runs on the GPU), the
//! normalisation, the value-dimension split and the shared-memory layout.
//!
//! The recurrent state `S = sum_j D(t, j) psi(k_j) v_j^T` (`d_k x d_v`, f32)
//! excludes `scale`; `z = sum_j D(t, j) psi(k_j)` is carried for sum
//! normalisation. Kernels take an initial state and emit the final one, so
//! ring ranks pass state in ring order.

use crate::config::round_up;
use crate::expr::float_literal;
use crate::{
    base_context, c_elem_type, does_not_fit, kernel_name, render, require_16_byte_rows, Arch,
    CodegenError, GeneratedKernel, GridDim, KernelConfig, KernelInfo, KernelParam, ParamRole,
    Target,
};
use mixc_dsl::ir::{Decay, EvalEnv, FeatureMap, Mask, MixerSpec, Norm, Score};

/// Largest chunk the tensor-core kernel supports: a warp holds a 16 x CHUNK
/// score tile in registers.
pub const MAX_CHUNK: u32 = 128;

/// What the kernel needs to know beyond the spec: the derived tile shape.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChunkwiseShape {
    /// head_dim rounded up to the mma k-step (16).
    pub dk_pad: u32,
    /// Value columns per CTA.
    pub block_dv: u32,
    /// CTAs along d_v (grid x).
    pub dv_blocks: u32,
    pub threads: u32,
    pub smem_bytes: u32,
}

/// Shared memory of `chunkwise_mma.cu`: `stages` Q/K/V chunk buffers, the
/// decayed V (with decay), the state mirror as T; then f32 `cum` (and `qz`,
/// `z` for sum normalisation). Rows padded by 8 elements. Must match the
/// template's `SMEM_BYTES` (a `static_assert` there checks it).
pub fn smem_bytes_mma(
    dk_pad: u32,
    block_dv: u32,
    cfg: &KernelConfig,
    has_decay: bool,
    norm_sum: bool,
    elem_bytes: u32,
) -> u32 {
    let (qs, vs, c) = (dk_pad + 8, block_dv + 8, cfg.chunk);
    let t = cfg.stages * c * qs * 2
        + cfg.stages * c * vs
        + if has_decay { c * vs } else { 0 }
        + dk_pad * vs;
    let f = c + if norm_sum { c + dk_pad } else { 0 };
    t * elem_bytes + f * 4
}

/// Shared memory of `chunkwise_simt.cu` (all f32, odd strides for Q/K and P).
pub fn smem_bytes_simt(head_dim: u32, block_dv: u32, cfg: &KernelConfig, norm_sum: bool) -> u32 {
    let (c, dk) = (cfg.chunk, head_dim);
    let f = 2 * c * (dk + 1)
        + c * block_dv
        + dk * block_dv
        + c * (c + 1)
        + 3 * c
        + if norm_sum { c + dk } else { 0 };
    4 * f
}

/// The default tile configuration for these families on `target`: chosen so
/// the f32 state slice a thread holds stays at or below 32 registers and the
/// kernel fits without spills (the NVRTC tests check that on every example).
pub fn default_config(spec: &MixerSpec, target: &Target) -> KernelConfig {
    let dvp = round_up(spec.value_dim, 16);
    if target.uses_tensor_cores() {
        let dkp = round_up(spec.head_dim, 16);
        let warps = if dkp > 128 { 8 } else { 4 };
        // Per thread, the state slice is ceil(dkp / (16 warps)) * block_dv / 2
        // floats; block_dv is a multiple of 16 (head dims 257..512 take 16).
        let s_iters = dkp.div_ceil(16 * warps);
        let block_dv = (64 / s_iters / 16 * 16).clamp(16, 64).min(dvp);
        let mut cfg = KernelConfig {
            block_m: 64,
            block_n: 64,
            warps,
            stages: 2,
            chunk: 64,
            block_dv,
        };
        let has_decay = !matches!(spec.decay, Decay::None);
        let norm_sum = matches!(spec.norm, Norm::Sum { .. });
        let bytes = target.dtype.size_bytes() as u32;
        if smem_bytes_mma(dkp, block_dv, &cfg, has_decay, norm_sum, bytes)
            > target.arch.max_dynamic_smem_bytes()
        {
            cfg.stages = 1;
        }
        cfg
    } else {
        KernelConfig {
            block_m: 32,
            block_n: 32,
            warps: 4,
            stages: 1,
            chunk: 32,
            // 32 columns keep even chunk=128 (a 128 x 128 f32 score tile) within
            // sm_80's shared memory at head_dim 64.
            block_dv: 32.min(dvp),
        }
    }
}

fn unsupported(spec: &MixerSpec, what: impl Into<String>) -> CodegenError {
    CodegenError::Unsupported {
        spec: spec.name.clone(),
        what: what.into(),
    }
}

fn map_name(m: FeatureMap) -> &'static str {
    match m {
        FeatureMap::Identity => "identity",
        FeatureMap::Elu1 => "elu1",
        FeatureMap::Relu => "relu",
    }
}

/// `log2 gamma_h` for every head of a fixed per-head decay, evaluated from the
/// spec's expression (which may read only `h`).
pub fn log2_gammas(spec: &MixerSpec, gamma: &mixc_dsl::ir::Expr) -> Result<Vec<f64>, CodegenError> {
    let mut read = Vec::new();
    gamma.inputs_read(&mut read);
    if !read.is_empty() {
        return Err(unsupported(
            spec,
            format!(
                "a per-head decay that reads inputs ({}); use `gate(...)` for data-dependent decay",
                read.join(", ")
            ),
        ));
    }
    let lookup = |_: &str, _: &[i64]| 0.0;
    (0..spec.heads)
        .map(|h| {
            let env = EvalEnv {
                i: 0,
                j: 0,
                h: h as i64,
                s: 0.0,
                b: 0,
                seq: 0,
                kv_seq: 0,
                heads: spec.heads,
                lookup: &lookup,
            };
            let g = gamma.eval_f64(&env);
            if g.is_finite() && g > 0.0 {
                Ok(g.log2())
            } else {
                Err(unsupported(
                    spec,
                    format!("decay gamma of head {h} evaluates to {g}; the chunkwise kernel needs a finite gamma > 0"),
                ))
            }
        })
        .collect()
}

/// Validates `cfg` for this spec/target and derives the tile shape.
pub fn shape(
    spec: &MixerSpec,
    target: &Target,
    cfg: &KernelConfig,
) -> Result<ChunkwiseShape, CodegenError> {
    let arch = target.arch;
    let mma = target.uses_tensor_cores();
    let has_decay = !matches!(spec.decay, Decay::None);
    let norm_sum = matches!(spec.norm, Norm::Sum { .. });
    let dk_pad = round_up(spec.head_dim, 16);
    let dvp = round_up(spec.value_dim, 16);
    let block_dv = if cfg.block_dv == 0 {
        dvp
    } else {
        cfg.block_dv.min(dvp)
    };
    if !(32..=MAX_CHUNK).contains(&cfg.chunk) {
        return Err(does_not_fit(
            spec,
            arch,
            format!(
                "chunk={}: the chunkwise kernels take chunk 32, 64 or 128 (a warp scans the \
                 chunk's gates 32 at a time and holds a 16 x chunk score tile)",
                cfg.chunk
            ),
        ));
    }
    let smem = if mma {
        if cfg.stages > 2 {
            return Err(CodegenError::InvalidConfig(format!(
                "stages={}: the chunkwise kernel prefetches at most one chunk ahead (stages 1 or 2)",
                cfg.stages
            )));
        }
        require_16_byte_rows(
            spec,
            target,
            &[("head_dim", spec.head_dim), ("value_dim", spec.value_dim)],
        )?;
        smem_bytes_mma(
            dk_pad,
            block_dv,
            cfg,
            has_decay,
            norm_sum,
            target.dtype.size_bytes() as u32,
        )
    } else {
        if cfg.stages != 1 {
            return Err(CodegenError::InvalidConfig(format!(
                "stages={}: the f32 SIMT chunkwise kernel is single-stage (use stages=1)",
                cfg.stages
            )));
        }
        smem_bytes_simt(spec.head_dim, block_dv, cfg, norm_sum)
    };
    if smem > arch.max_dynamic_smem_bytes() {
        return Err(does_not_fit(
            spec,
            arch,
            format!(
                "needs {smem} bytes of shared memory per block, {} allows {}; \
                 lower chunk, block_dv or stages",
                arch.name(),
                arch.max_dynamic_smem_bytes()
            ),
        ));
    }
    Ok(ChunkwiseShape {
        dk_pad,
        block_dv,
        dv_blocks: spec.value_dim.div_ceil(block_dv),
        threads: cfg.warps * 32,
        smem_bytes: smem,
    })
}

/// Checks that the spec has the chunkwise form: a dot score with feature
/// maps, no bias or transform, a causal mask, sum or no normalisation.
fn check_form(spec: &MixerSpec) -> Result<(FeatureMap, FeatureMap, f64), CodegenError> {
    let (q_map, k_map, scale) = match &spec.score {
        Score::Dot {
            q_map,
            k_map,
            scale,
        } => (*q_map, *k_map, *scale),
        Score::Filter { .. } => {
            return Err(unsupported(spec, "a filter score in the chunkwise kernel"))
        }
    };
    if spec.bias.is_some() || spec.transform.is_some() {
        return Err(unsupported(
            spec,
            format!(
                "`bias` / `transform` with the {} family: the chunkwise state form needs the weight \
                 to factor as <phi(q), psi(k)> times the decay",
                spec.family.name()
            ),
        ));
    }
    if !matches!(spec.mask, Mask::Causal) {
        return Err(unsupported(
            spec,
            format!(
                "mask `{}` with the {} family: the chunkwise kernel carries a state over every \
                 earlier key, so it implements `mask = causal` only",
                spec.mask,
                spec.family.name()
            ),
        ));
    }
    if matches!(spec.norm, Norm::Softmax) {
        return Err(unsupported(
            spec,
            "softmax normalisation in the chunkwise kernel",
        ));
    }
    Ok((q_map, k_map, scale))
}

pub(crate) fn lower(
    spec: &MixerSpec,
    target: &Target,
    cfg: &KernelConfig,
) -> Result<GeneratedKernel, CodegenError> {
    let (q_map, k_map, scale) = check_form(spec)?;
    let sh = shape(spec, target, cfg)?;
    let mma = target.uses_tensor_cores();
    let template = if mma {
        "chunkwise_mma.cu"
    } else {
        "chunkwise_simt.cu"
    };

    let (decay, gate_name, log2_gammas) = match &spec.decay {
        Decay::None => ("none", None, Vec::new()),
        Decay::PerHead(e) => ("per_head", None, log2_gammas(spec, e)?),
        Decay::Gate { input } => ("gate", Some(input.clone()), Vec::new()),
    };
    let (norm, eps) = match spec.norm {
        Norm::Sum { eps } => ("sum", eps),
        _ => ("none", 0.0),
    };
    let params = params(spec, target, gate_name.as_deref());

    let mut ctx = base_context(spec, target, cfg, template);
    ctx.insert("dk_pad", &sh.dk_pad);
    ctx.insert("block_dv", &sh.block_dv);
    ctx.insert("dv_blocks", &sh.dv_blocks);
    ctx.insert("num_threads", &sh.threads);
    ctx.insert("smem_bytes", &sh.smem_bytes);
    ctx.insert("q_map", map_name(q_map));
    ctx.insert("k_map", map_name(k_map));
    ctx.insert("decay", decay);
    ctx.insert("has_decay", &(decay != "none"));
    ctx.insert("gate_name", &gate_name.as_deref().map(gate_param));
    let gammas: Vec<String> = log2_gammas.iter().map(|g| float_literal(*g)).collect();
    ctx.insert("log2_gammas", &gammas.join(", "));
    ctx.insert("norm", norm);
    ctx.insert("norm_sum", &(norm == "sum"));
    ctx.insert("eps", &float_literal(eps));
    ctx.insert("scale", &float_literal(scale));
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
            grid: [GridDim::Fixed(sh.dv_blocks), GridDim::Heads, GridDim::Batch],
            threads_per_block: sh.threads,
            dynamic_smem_bytes: sh.smem_bytes,
            needs_smem_opt_in: sh.smem_bytes > Arch::DEFAULT_SMEM_LIMIT,
            params,
        }],
    })
}

/// C name of the gate input's parameter.
fn gate_param(input: &str) -> String {
    crate::input_param(input)
}

/// The kernel signature, in order.
fn params(spec: &MixerSpec, target: &Target, gate: Option<&str>) -> Vec<KernelParam> {
    let t = c_elem_type(target.dtype);
    let cin = format!("const {t}* __restrict__");
    let fin = "const float* __restrict__";
    let fout = "float* __restrict__";
    let norm_sum = matches!(spec.norm, Norm::Sum { .. });
    let mut p = vec![
        KernelParam::new("q", &cin, ParamRole::Q, "[batch, rows, heads, head_dim]"),
        KernelParam::new("k", &cin, ParamRole::K, "[batch, rows, kv_heads, head_dim]"),
        KernelParam::new(
            "v",
            &cin,
            ParamRole::V,
            "[batch, rows, kv_heads, value_dim]",
        ),
    ];
    if let Some(g) = gate {
        // Prefixed so a user's input name never collides with kernel locals.
        p.push(KernelParam::new(
            &gate_param(g),
            fin,
            ParamRole::Input(g.into()),
            "[batch, rows, heads] per-token decay gamma in (0, 1]",
        ));
    }
    p.push(KernelParam::new(
        "state_in",
        fin,
        ParamRole::StateIn,
        "[batch, heads, head_dim, value_dim] state before row 0, without scale (null: zero)",
    ));
    if norm_sum {
        p.push(KernelParam::new(
            "z_in",
            fin,
            ParamRole::StateIn,
            "[batch, heads, head_dim] decayed sum of psi(k) before row 0 (null: zero)",
        ));
    }
    p.push(KernelParam::new(
        "o",
        &format!("{t}* __restrict__"),
        ParamRole::Output,
        "[batch, rows, heads, value_dim] normalised output, or null",
    ));
    p.push(KernelParam::new(
        "o_num",
        fout,
        ParamRole::PartialOutput,
        "[batch, rows, heads, value_dim] scale * unnormalised numerator, or null",
    ));
    if norm_sum {
        p.push(KernelParam::new(
            "o_den",
            fout,
            ParamRole::Denominator,
            "[batch, rows, heads] scale * denominator (without eps), or null",
        ));
    }
    p.push(KernelParam::new(
        "state_out",
        fout,
        ParamRole::StateOut,
        "[batch, heads, head_dim, value_dim] state after the last row, or null",
    ));
    if norm_sum {
        p.push(KernelParam::new(
            "z_out",
            fout,
            ParamRole::StateOut,
            "[batch, heads, head_dim] decayed sum of psi(k) after the last row, or null",
        ));
    }
    p.push(KernelParam::new(
        "rows",
        "int",
        ParamRole::Scalar,
        "tokens per sequence in this launch (a ring rank's shard)",
    ));
    p
}
