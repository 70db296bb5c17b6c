//! Softmax family: what the FlashAttention-style kernels compute. Tensor-core
//! template `softmax.cu` for f16/bf16, SIMT template `softmax_simt.cu` for f32.

use crate::config::round_up;
use crate::expr::{lower_expr, Hoisted, LowerEnv};
use crate::mask::{lower_mask, MaskNames};
use crate::{
    base_context, c_elem_type, does_not_fit, kernel_name, render, require_16_byte_rows, Arch,
    CodegenError, GeneratedKernel, GridDim, KernelConfig, KernelInfo, KernelParam, ParamRole,
    Target,
};
use mixc_dsl::ir::{ElemType, FeatureMap, InputRole, MixerSpec, Norm, Score};

/// Shared-memory bytes per CTA of the tensor-core kernel (`softmax.cu`):
/// Q tile + `stages` K and V tiles, rows padded by 16 bytes.
pub fn smem_bytes_mma(head_dim: u32, value_dim: u32, cfg: &KernelConfig, elem_bytes: u32) -> u32 {
    let (dp, dvp) = (round_up(head_dim, 16), round_up(value_dim, 16));
    let rows = cfg.block_m * (dp + 8) + cfg.stages * cfg.block_n * ((dp + 8) + (dvp + 8));
    rows * elem_bytes
}

/// Shared-memory bytes per CTA of the SIMT kernel (`softmax_simt.cu`):
/// Q, K, V tiles and the probability tile, f32, odd row strides.
pub fn smem_bytes_simt(head_dim: u32, value_dim: u32, cfg: &KernelConfig) -> u32 {
    let (sq, sv) = (head_dim + 1, value_dim + 1);
    4 * (cfg.block_m * sq + cfg.block_n * sq + cfg.block_n * sv + cfg.block_m * (cfg.block_n + 1))
}

pub(crate) fn lower(
    spec: &MixerSpec,
    target: &Target,
    cfg: &KernelConfig,
) -> Result<GeneratedKernel, CodegenError> {
    let scale = match &spec.score {
        Score::Dot {
            q_map: FeatureMap::Identity,
            k_map: FeatureMap::Identity,
            scale,
        } => *scale,
        Score::Dot { .. } => {
            return Err(CodegenError::Unsupported {
                spec: spec.name.clone(),
                what: "feature maps with softmax normalisation".into(),
            })
        }
        Score::Filter { .. } => {
            return Err(CodegenError::Unsupported {
                spec: spec.name.clone(),
                what: "a filter score with softmax normalisation".into(),
            })
        }
    };
    if spec.norm != Norm::Softmax || !matches!(spec.decay, mixc_dsl::ir::Decay::None) {
        return Err(CodegenError::Unsupported {
            spec: spec.name.clone(),
            what: "the softmax kernel needs softmax normalisation and no decay".into(),
        });
    }

    let mma = target.uses_tensor_cores();
    let template = if mma { "softmax.cu" } else { "softmax_simt.cu" };
    let arch = target.arch;

    // Tile shape checks the template's static_asserts would otherwise report as C++ errors.
    let threads = cfg.warps * 32;
    let smem = if mma {
        let rows_per_pass = 16 * cfg.warps;
        if !cfg.block_m.is_multiple_of(rows_per_pass) || cfg.block_m / rows_per_pass > 4 {
            return Err(does_not_fit(
                spec,
                arch,
                format!(
                    "block_m={} with warps={}: the tensor-core kernel gives each warp 1 to 4 \
                     fragments of 16 query rows, so block_m must be 16 * warps = {rows_per_pass} \
                     times 1, 2 or 4",
                    cfg.block_m, cfg.warps
                ),
            ));
        }
        require_16_byte_rows(
            spec,
            target,
            &[("head_dim", spec.head_dim), ("value_dim", spec.value_dim)],
        )?;
        smem_bytes_mma(
            spec.head_dim,
            spec.value_dim,
            cfg,
            target.dtype.size_bytes() as u32,
        )
    } else {
        if cfg.stages != 1 {
            return Err(CodegenError::InvalidConfig(format!(
                "stages={}: the f32 SIMT softmax kernel is single-stage (use stages=1)",
                cfg.stages
            )));
        }
        if !threads.is_multiple_of(cfg.block_m) || threads / cfg.block_m > 32 {
            return Err(does_not_fit(
                spec,
                arch,
                format!(
                    "block_m={} with warps={}: the SIMT kernel splits each query row over \
                     1..=32 threads, so 32 * warps must be a multiple of block_m, at most 32 * block_m",
                    cfg.block_m, cfg.warps
                ),
            ));
        }
        if !cfg.block_n.is_multiple_of(threads / cfg.block_m) {
            return Err(does_not_fit(
                spec,
                arch,
                format!(
                    "block_n={} must be a multiple of the {} lanes that share a query row",
                    cfg.block_n,
                    threads / cfg.block_m
                ),
            ));
        }
        smem_bytes_simt(spec.head_dim, spec.value_dim, cfg)
    };
    if smem > arch.max_dynamic_smem_bytes() {
        return Err(does_not_fit(
            spec,
            arch,
            format!(
                "needs {smem} bytes of shared memory per block, {} allows {}; \
                 lower block_n, block_m or stages",
                arch.name(),
                arch.max_dynamic_smem_bytes()
            ),
        ));
    }

    // Expressions: bias and transform read i, j, h, s by these names in the template.
    let env = LowerEnv {
        i: "pos_i",
        j: "pos_j",
        h: "head",
        s: "s",
        heads: spec.heads,
        kv_heads: spec.kv_heads,
        inputs: &spec.inputs,
        seq_dim: "seq_len",
        batch_dim: "gridDim.z",
    };
    let mut hoisted: Vec<Hoisted> = Vec::new();
    let bias = spec
        .bias
        .as_ref()
        .map(|e| lower_expr(e, &env, &mut hoisted))
        .transpose()?
        .map(|c| c.code);
    let transform = spec
        .transform
        .as_ref()
        .map(|e| lower_expr(e, &env, &mut hoisted))
        .transpose()?
        .map(|c| c.code);
    let mask = lower_mask(&spec.mask, &MaskNames::default(), &spec.name)?;

    let params = params(spec, target);
    let name = kernel_name(spec, target);
    let mut ctx = base_context(spec, target, cfg, template);
    ctx.insert("dp", &round_up(spec.head_dim, 16));
    ctx.insert("dvp", &round_up(spec.value_dim, 16));
    ctx.insert("scale", &crate::expr::float_literal(scale));
    ctx.insert("score_expr", &(bias.is_some() || transform.is_some()));
    ctx.insert("bias", &bias);
    ctx.insert("transform", &transform);
    ctx.insert("hoisted", &hoisted);
    ctx.insert("mask", &mask);
    ctx.insert("segment", &mask.segment_input);
    ctx.insert("params", &params);
    if !mma {
        ctx.insert("threads_per_row", &(threads / cfg.block_m));
    }
    let source = render(template, &ctx)?;

    Ok(GeneratedKernel {
        spec_name: spec.name.clone(),
        family: spec.family,
        template: template.into(),
        target: *target,
        config: *cfg,
        source,
        kernels: vec![KernelInfo {
            name,
            grid: [
                GridDim::QueryBlocks { block: cfg.block_m },
                GridDim::Heads,
                GridDim::Batch,
            ],
            threads_per_block: threads,
            dynamic_smem_bytes: smem,
            needs_smem_opt_in: smem > Arch::DEFAULT_SMEM_LIMIT,
            params,
        }],
    })
}

/// The kernel signature, in order. The runtime binds arguments by `role`/`name`.
fn params(spec: &MixerSpec, target: &Target) -> Vec<KernelParam> {
    let t = c_elem_type(target.dtype);
    let cin = format!("const {t}* __restrict__");
    let mut p = vec![
        KernelParam::new("q", &cin, ParamRole::Q, "[batch, q_rows, heads, head_dim]"),
        KernelParam::new(
            "k",
            &cin,
            ParamRole::K,
            "[batch, kv_rows, kv_heads, head_dim]",
        ),
        KernelParam::new(
            "v",
            &cin,
            ParamRole::V,
            "[batch, kv_rows, kv_heads, value_dim]",
        ),
        KernelParam::new(
            "o",
            &format!("{t}* __restrict__"),
            ParamRole::Output,
            "[batch, q_rows, heads, value_dim], normalised over the visited keys",
        ),
        KernelParam::new(
            "lse",
            "float* __restrict__",
            ParamRole::Lse,
            "[batch, heads, q_rows] natural-log sum of exp(score) over the visited keys",
        ),
    ];
    for d in &spec.inputs {
        let (c_type, doc) = match (d.role, d.elem) {
            (InputRole::SegmentIds, _) => (
                "const int* __restrict__",
                "segment ids [batch, seq_len], indexed by global position",
            ),
            (_, ElemType::I32) => ("const int* __restrict__", "extra input"),
            (_, ElemType::F32) => ("const float* __restrict__", "extra input (table)"),
        };
        p.push(KernelParam::new(
            &d.name,
            c_type,
            ParamRole::Input(d.name.clone()),
            doc,
        ));
    }
    let ints: [(&str, &str); 9] = [
        ("q_rows", "query rows per sequence in q / o / lse"),
        ("q_begin", "first query row to compute"),
        ("q_end", "one past the last query row to compute"),
        ("kv_rows", "key rows per sequence in k / v"),
        ("kv_begin", "first key row to visit"),
        ("kv_end", "one past the last key row to visit"),
        ("q_pos0", "global position of query row 0"),
        ("k_pos0", "global position of key row 0"),
        (
            "seq_len",
            "global sequence length (segment ids, seq-sized tables)",
        ),
    ];
    for (n, doc) in ints {
        p.push(KernelParam::new(n, "int", ParamRole::Scalar, doc));
    }
    p
}
