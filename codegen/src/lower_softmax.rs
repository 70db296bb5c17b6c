//! Softmax family: what the FlashAttention-style kernels compute. Tensor-core
//! template `softmax.cu` for f16/bf16, SIMT template `softmax_simt.cu` for f32.

use crate::config::round_up;
use crate::expr::{lower_expr, Hoisted, LowerEnv};
use crate::mask::{lower_mask_with, MaskExprs, MaskNames};
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
    let scale = softmax_scale(spec)?;

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

    let env = lower_env(spec);
    let mut hoisted: Vec<Hoisted> = Vec::new();
    let (bias, transform) = score_code(spec, &env, &mut hoisted)?;
    let mask = lower_softmax_mask(spec, &env, &mut hoisted)?;

    let params = params(spec, target);
    let name = kernel_name(spec, target);
    let mut ctx = base_context(spec, target, cfg, template);
    insert_score_context(&mut ctx, spec, scale, (&bias, &transform), &hoisted, &mask);
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
    let mut p = qkv_params(&cin);
    p.extend([
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
    ]);
    p.extend(extra_params(spec));
    p.extend(range_params());
    p
}

/// The score scale of a spec the softmax kernels compute (softmax
/// normalisation, identity feature maps, no decay), or why not.
fn softmax_scale(spec: &MixerSpec) -> Result<f64, CodegenError> {
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
    Ok(scale)
}

/// Expressions: bias, transform and mask read i, j, h, s, b, seq, kv_seq by
/// these names in the templates (forward, SIMT and backward alike; `head`,
/// `batch_idx` and the kernel parameter `seq_len` are CTA constants defined
/// before the hoisted values). The CUDA backend runs queries and keys of one
/// sequence, so `seq` and `kv_seq` are both the global length `seq_len`.
pub(crate) fn lower_env(spec: &MixerSpec) -> LowerEnv<'_> {
    LowerEnv {
        i: "pos_i",
        j: "pos_j",
        h: "head",
        s: "s",
        b: "batch_idx",
        seq: "seq_len",
        kv_seq: "seq_len",
        heads: spec.heads,
        kv_heads: spec.kv_heads,
        inputs: &spec.inputs,
        seq_dim: "seq_len",
        batch_dim: "gridDim.z",
    }
}

/// The spec's mask for the softmax templates: built-in masks over
/// `pos_i` / `pos_j` and the tile ranges, expression masks with `env`'s
/// names (their per-CTA parts hoisted with the bias's).
fn lower_softmax_mask(
    spec: &MixerSpec,
    env: &LowerEnv<'_>,
    hoisted: &mut Vec<Hoisted>,
) -> Result<crate::mask::LoweredMask, CodegenError> {
    let names = MaskNames::default();
    debug_assert_eq!((names.i, names.j), (env.i, env.j));
    lower_mask_with(
        &spec.mask,
        &names,
        Some(MaskExprs { env, hoisted }),
        &spec.name,
    )
}

/// The spec's extra inputs, by name (the runtime binds them by role).
fn extra_params(spec: &MixerSpec) -> Vec<KernelParam> {
    let mut p = Vec::new();
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
            &crate::input_param(&d.name),
            c_type,
            ParamRole::Input(d.name.clone()),
            doc,
        ));
    }
    p
}

/// The launch's ranges and positions (softmax forward and backward alike).
fn range_params() -> Vec<KernelParam> {
    let mut p = Vec::new();
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

/// Shared-memory bytes per CTA of the backward kernel (`softmax_bwd.cu`):
/// the key block's K and V, one query tile's Q and dO, P^T and dS^T (rows
/// padded by 16 bytes), and the tile's row log-sum-exp and delta.
pub fn smem_bytes_backward(
    head_dim: u32,
    value_dim: u32,
    cfg: &KernelConfig,
    elem_bytes: u32,
) -> u32 {
    let (dp, dvp) = (round_up(head_dim, 16), round_up(value_dim, 16));
    let rows =
        (cfg.block_n + cfg.block_m) * ((dp + 8) + (dvp + 8)) + 2 * cfg.block_n * (cfg.block_m + 8);
    rows * elem_bytes + 2 * cfg.block_m * 4
}

/// The backward kernels of the tensor-core softmax (see
/// [`crate::generate_backward`]).
pub(crate) fn lower_backward(
    spec: &MixerSpec,
    target: &Target,
    cfg: &KernelConfig,
) -> Result<GeneratedKernel, CodegenError> {
    let scale = softmax_scale(spec)?;
    let arch = target.arch;
    require_16_byte_rows(
        spec,
        target,
        &[("head_dim", spec.head_dim), ("value_dim", spec.value_dim)],
    )?;
    let (dp, dvp) = (round_up(spec.head_dim, 16), round_up(spec.value_dim, 16));
    // The template's static_asserts, said in the config's terms.
    let fit = |ok: bool, why: String| {
        if ok {
            Ok(())
        } else {
            Err(does_not_fit(spec, arch, why))
        }
    };
    fit(
        cfg.block_n.is_multiple_of(16) && cfg.block_n >= 16,
        format!("block_n={}: the backward kernel gives each warp 16 keys, so block_n must be a multiple of 16", cfg.block_n),
    )?;
    let wn = cfg.block_n / 16;
    fit(
        cfg.warps.is_multiple_of(wn),
        format!(
            "warps={} with block_n={}: warps must be a multiple of the {wn} key fragments \
             (the rest split the gradient columns)",
            cfg.warps, cfg.block_n
        ),
    )?;
    let wc = cfg.warps / wn;
    let mq = cfg.block_m / 16;
    let cq = if cfg.warps >= mq { cfg.warps / mq } else { 1 };
    fit(
        cfg.block_m.is_multiple_of(16 * wc)
            && (cfg.block_m / wc).is_multiple_of(16)
            && dp.is_multiple_of(16 * wc)
            && dvp.is_multiple_of(16 * wc)
            && cfg.block_m.is_multiple_of(16)
            && (cfg.warps.is_multiple_of(mq) || mq.is_multiple_of(cfg.warps))
            && dp.is_multiple_of(16 * cq),
        format!(
            "block_m={}, warps={}: the {wc} warps of a key fragment split block_m, head_dim \
             and value_dim (padded to 16) into parts of a multiple of 16",
            cfg.block_m, cfg.warps
        ),
    )?;
    let smem = smem_bytes_backward(
        spec.head_dim,
        spec.value_dim,
        cfg,
        target.dtype.size_bytes() as u32,
    );
    fit(
        smem <= arch.max_dynamic_smem_bytes(),
        format!(
            "needs {smem} bytes of shared memory per block, {} allows {}; lower block_m or block_n",
            arch.name(),
            arch.max_dynamic_smem_bytes()
        ),
    )?;

    let env = lower_env(spec);
    let mut hoisted: Vec<Hoisted> = Vec::new();
    let (bias, transform) = score_code(spec, &env, &mut hoisted)?;
    let unsupported = |what: &str| CodegenError::Unsupported {
        spec: spec.name.clone(),
        what: what.into(),
    };
    // T'(s) at the score before the transform.
    let d_transform = match &spec.transform {
        None => None,
        Some(t) => {
            let mut reads = Vec::new();
            t.inputs_read(&mut reads);
            if reads.iter().any(|r| {
                spec.inputs
                    .iter()
                    .any(|d| &d.name == r && d.elem == ElemType::F32)
            }) {
                return Err(unsupported(
                    "a backward kernel for a transform that reads a float table (its gradient)",
                ));
            }
            let d = t.derivative_s().ok_or_else(|| {
                unsupported("a backward kernel through a transform whose derivative branches (abs, min, max or clamp of s)")
            })?;
            let env_pre = LowerEnv {
                s: "s_pre",
                ..env.clone()
            };
            Some(lower_expr(&d, &env_pre, &mut hoisted)?.code)
        }
    };
    let table_grads = match &spec.bias {
        None => Vec::new(),
        Some(b) => crate::expr::table_grads(b, &env, &mut hoisted)?.ok_or_else(|| {
            unsupported("a backward kernel for a bias whose table gradient branches (a table read under abs, min, max or clamp)")
        })?,
    };
    let mask = lower_softmax_mask(spec, &env, &mut hoisted)?;

    let t = c_elem_type(target.dtype);
    let cin = format!("const {t}* __restrict__");
    let mut params = qkv_params(&cin);
    params.extend([
        KernelParam::new(
            "d_o",
            &cin,
            ParamRole::UpstreamGrad,
            "[batch, q_rows, heads, value_dim], the upstream gradient",
        ),
        KernelParam::new(
            "lse",
            "const float* __restrict__",
            ParamRole::Lse,
            "[batch, heads, q_rows] the forward's natural-log row log-sum-exp",
        ),
        KernelParam::new(
            "delta",
            "const float* __restrict__",
            ParamRole::Delta,
            "[batch, heads, q_rows] rowsum(do * o)",
        ),
    ]);
    for (name, doc) in [
        (
            "q",
            "[batch, q_rows, heads, head_dim] f32, unscaled, added to (atomics)",
        ),
        (
            "k",
            "[batch, kv_rows, kv_heads, head_dim] f32, unscaled, added to",
        ),
        ("v", "[batch, kv_rows, kv_heads, value_dim] f32, added to"),
    ] {
        params.push(KernelParam::new(
            &format!("d{name}_acc"),
            "float* __restrict__",
            ParamRole::GradAccumulator(name.into()),
            doc,
        ));
    }
    params.extend(extra_params(spec));
    // Every float input has a gradient accumulator (what the reference
    // returns), also one that only a mask, a comparison or `int(...)` reads:
    // nothing is added to it, its gradient is zero.
    let mut grads: Vec<&str> = spec
        .inputs
        .iter()
        .filter(|d| d.elem == ElemType::F32)
        .map(|d| d.name.as_str())
        .collect();
    debug_assert!(table_grads
        .iter()
        .all(|g| grads.contains(&g.input.as_str())));
    grads.sort();
    grads.dedup();
    for name in grads {
        params.push(KernelParam::new(
            &format!("grad_{}", crate::input_param(name)),
            "float* __restrict__",
            ParamRole::GradAccumulator(name.into()),
            "f32, the input's shape, added to (atomics)",
        ));
    }
    params.extend(range_params());

    let name = format!("{}_bwd", kernel_name(spec, target));
    let pre_name = format!("{name}_pre");
    let finish_name = format!("{name}_finish");
    let template = "softmax_bwd.cu";
    let mut ctx = base_context(spec, target, cfg, template);
    ctx.insert("kernel_name", &name);
    ctx.insert("pre_name", &pre_name);
    ctx.insert("finish_name", &finish_name);
    insert_score_context(&mut ctx, spec, scale, (&bias, &transform), &hoisted, &mask);
    ctx.insert("s_pre", if transform.is_some() { "s_pre" } else { "" });
    ctx.insert("d_transform", &d_transform);
    ctx.insert("table_grads", &table_grads);
    ctx.insert("params", &params);
    let source = render(template, &ctx)?;

    // The delta and finish kernels are grid-stride loops: the launcher
    // sizes their grid from the element count (`Fixed(0)` says so).
    let helper = |name: &str, params: Vec<KernelParam>| KernelInfo {
        name: name.into(),
        grid: [GridDim::Fixed(0), GridDim::Fixed(1), GridDim::Fixed(1)],
        threads_per_block: 256,
        dynamic_smem_bytes: 0,
        needs_smem_opt_in: false,
        params,
    };
    let pre_params = vec![
        KernelParam::new("o", &cin, ParamRole::Output, "the forward's output"),
        KernelParam::new(
            "d_o",
            &cin,
            ParamRole::UpstreamGrad,
            "the upstream gradient",
        ),
        KernelParam::new(
            "delta",
            "float* __restrict__",
            ParamRole::Delta,
            "[batch, heads, q_rows]",
        ),
        KernelParam::new("batch", "int", ParamRole::Scalar, "sequences"),
        KernelParam::new(
            "q_rows",
            "int",
            ParamRole::Scalar,
            "query rows per sequence",
        ),
    ];
    let finish_params = vec![
        KernelParam::new(
            "acc",
            "const float* __restrict__",
            ParamRole::Scalar,
            "an f32 accumulator",
        ),
        KernelParam::new(
            "out",
            &format!("{t}* __restrict__"),
            ParamRole::Scalar,
            "the gradient in the storage type",
        ),
        KernelParam::new("n", "int", ParamRole::Scalar, "elements"),
        KernelParam::new(
            "scaled",
            "int",
            ParamRole::Scalar,
            "1: times the score scale (dq, dk)",
        ),
    ];
    Ok(GeneratedKernel {
        spec_name: spec.name.clone(),
        family: spec.family,
        template: template.into(),
        target: *target,
        config: *cfg,
        source,
        kernels: vec![
            KernelInfo {
                name,
                grid: [
                    GridDim::KeyBlocks { block: cfg.block_n },
                    GridDim::KvHeads,
                    GridDim::Batch,
                ],
                threads_per_block: cfg.warps * 32,
                dynamic_smem_bytes: smem,
                needs_smem_opt_in: smem > Arch::DEFAULT_SMEM_LIMIT,
                params,
            },
            helper(&pre_name, pre_params),
            helper(&finish_name, finish_params),
        ],
    })
}

/// `q`, `k`, `v` in the storage type `cin` (forward and backward alike).
fn qkv_params(cin: &str) -> Vec<KernelParam> {
    vec![
        KernelParam::new("q", cin, ParamRole::Q, "[batch, q_rows, heads, head_dim]"),
        KernelParam::new(
            "k",
            cin,
            ParamRole::K,
            "[batch, kv_rows, kv_heads, head_dim]",
        ),
        KernelParam::new(
            "v",
            cin,
            ParamRole::V,
            "[batch, kv_rows, kv_heads, value_dim]",
        ),
    ]
}

/// The bias and transform lowered to C (the names of [`lower_env`]).
#[allow(clippy::type_complexity)]
fn score_code(
    spec: &MixerSpec,
    env: &LowerEnv<'_>,
    hoisted: &mut Vec<Hoisted>,
) -> Result<(Option<String>, Option<String>), CodegenError> {
    let mut lower = |e: &Option<mixc_dsl::ir::Expr>| -> Result<Option<String>, CodegenError> {
        e.as_ref()
            .map(|e| lower_expr(e, env, hoisted).map(|c| c.code))
            .transpose()
    };
    let bias = lower(&spec.bias)?;
    let transform = lower(&spec.transform)?;
    Ok((bias, transform))
}

/// The context keys the forward and backward softmax templates share: the
/// padded widths, the scale, the lowered bias / transform and their hoisted
/// constants, the mask and its segment input's parameter.
fn insert_score_context(
    ctx: &mut tera::Context,
    spec: &MixerSpec,
    scale: f64,
    (bias, transform): (&Option<String>, &Option<String>),
    hoisted: &[Hoisted],
    mask: &crate::mask::LoweredMask,
) {
    ctx.insert("dp", &round_up(spec.head_dim, 16));
    ctx.insert("dvp", &round_up(spec.value_dim, 16));
    ctx.insert("scale", &crate::expr::float_literal(scale));
    ctx.insert("score_expr", &(bias.is_some() || transform.is_some()));
    ctx.insert("bias", bias);
    ctx.insert("transform", transform);
    ctx.insert("hoisted", hoisted);
    ctx.insert("mask", mask);
    ctx.insert(
        "segment",
        &mask.segment_input.as_deref().map(crate::input_param),
    );
}
