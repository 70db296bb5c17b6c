//! mixc codegen: lowers a validated `MixerSpec` to CUDA C++ via tera templates.
//!
//! # How it is organised
//!
//! The Rust side decides *what* (which kernel, which tiles are visited, which
//! masks apply, constants, and C expressions lowered from `ir::Expr` /
//! `ir::Mask`); the templates in `templates/` say *how* (the CUDA for a tile).
//! No CUDA statements are assembled in Rust except lowered expressions.
//! The runtime's own helper kernels (log-sum-exp merge, accumulator reset)
//! are a template too: [`helper_kernels`] renders `templates/helpers.cu`.
//!
//! - [`config`]: [`Target`] (arch + storage dtype) and [`KernelConfig`]
//!   (tile sizes; defaults per family, `key=value` overrides, validation).
//! - [`expr`]: `ir::Expr` -> C expression ([`expr::lower_expr`]), with
//!   hoisting of per-head subexpressions out of inner loops.
//! - [`mask`]: `ir::Mask` -> element predicate, block classification and key
//!   range, as C expressions over primitives defined in `templates/tile.cuh`.
//! - [`plan`]: the block plan shared with the CPU backend.
//! - `lower_softmax`: the softmax family (tensor-core and f32 SIMT kernels);
//!   `lower_chunkwise`, `lower_conv`: the linear/retention/gated and
//!   convolution families.
//! - [`candidate_configs`]: the default config plus the
//!   [`KernelConfig::alternatives`] that fit (autotuning candidates; the
//!   NVRTC tests compile the first three of every spec and target).
//!
//! # Adding a family (what helper C2 does)
//!
//! 1. Write the template(s) under `templates/` and register each in
//!    [`TEMPLATES`] (one `include_str!` line each, so the binary is self-contained).
//! 2. Write `lower_<family>.rs` with
//!    `pub(crate) fn lower(spec, target, cfg) -> Result<GeneratedKernel, CodegenError>`:
//!    validate `cfg` (start from [`KernelConfig::validate_common`]), start a
//!    context with [`base_context`] (kernel name, element type, header
//!    comment, spec constants), add family keys, build the parameter list
//!    (`Vec<KernelParam>`; templates print the signature from it with the
//!    `kernel_entry` macro of `templates/macros.cu`), call [`render`], and
//!    describe the launch in a [`KernelInfo`].
//! 3. Add the match arm in [`generate`], the family to [`supported_families`],
//!    its defaults to [`KernelConfig::default_for`] and its alternatives to
//!    [`KernelConfig::alternatives`]; `runtime/tests/nvrtc_compile.rs` then
//!    compiles it for every target automatically.
//!
//! Templates may `{% include "tile.cuh" %}` (tera inlines it) so the source
//! handed to NVRTC is one self-contained string that only needs the CUDA
//! headers (`cuda_fp16.h`, `cuda_bf16.h`) on the include path. Code that
//! several templates print goes in a tera macro (`templates/macros.cu`) or an
//! included partial (`linear_prelude.cu`, `conv_prelude.cu`), not a copy.

pub mod config;
pub mod expr;
pub mod lower_chunkwise;
pub mod lower_conv;
mod lower_softmax;
pub mod mask;

pub use config::{Arch, KernelConfig, Target};
pub use lower_softmax::smem_bytes_backward;

use mixc_dsl::ir::{DType, Family, MixerSpec};
use serde::{Deserialize, Serialize};
use std::sync::OnceLock;
use thiserror::Error;

pub mod plan;

/// Why a kernel could not be generated.
#[derive(Debug, Error)]
pub enum CodegenError {
    /// A `KernelConfig` value is malformed or out of range.
    #[error("invalid kernel config: {0}")]
    InvalidConfig(String),
    /// A configuration that is well-formed but does not fit this spec/target
    /// (tile shape the template cannot use, too much shared memory, ...).
    #[error("kernel config does not fit `{spec}` on {arch}: {reason}")]
    ConfigDoesNotFit {
        spec: String,
        arch: String,
        reason: String,
    },
    #[error("invalid target: {0}")]
    InvalidTarget(String),
    /// The spec uses something no template implements yet.
    #[error("cannot generate a kernel for `{spec}`: {what}")]
    Unsupported { spec: String, what: String },
    /// An expression cannot be lowered to C (e.g. an integer literal that does not fit `int`).
    #[error("cannot lower expression `{expr}`: {reason}")]
    Expr { expr: String, reason: String },
    /// A template failed to render: a bug in a template or its context.
    #[error("template `{template}` failed to render: {message}")]
    Template { template: String, message: String },
}

/// One grid dimension, as a function of run-time shapes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum GridDim {
    /// `ceil(rows / block)`: query blocks over the query rows the launch
    /// computes (`q_end - q_begin` for the softmax kernels).
    QueryBlocks { block: u32 },
    /// One per query head.
    Heads,
    /// One per sequence of the batch.
    Batch,
    /// A fixed count (e.g. a split of d_v).
    Fixed(u32),
    /// `ceil(kv_rows / block)`: key blocks over the key rows the launch
    /// visits (the backward kernel, which is parallel over keys).
    KeyBlocks { block: u32 },
    /// One per kv head.
    KvHeads,
}

/// The run-time sizes a grid is evaluated at (one launch's own rows, never
/// the whole sequence).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LaunchDims {
    pub batch: u32,
    pub q_rows: u32,
    pub kv_rows: u32,
    pub heads: u32,
    pub kv_heads: u32,
}

impl GridDim {
    /// Evaluates for a launch of the given sizes.
    pub fn eval(&self, d: &LaunchDims) -> u32 {
        match *self {
            GridDim::QueryBlocks { block } => d.q_rows.div_ceil(block),
            GridDim::KeyBlocks { block } => d.kv_rows.div_ceil(block),
            GridDim::Heads => d.heads,
            GridDim::KvHeads => d.kv_heads,
            GridDim::Batch => d.batch,
            GridDim::Fixed(n) => n,
        }
    }
}

/// What a kernel parameter carries, so a launcher can bind arguments by role.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ParamRole {
    /// `q`, `k`, `v` (storage dtype).
    Q,
    K,
    V,
    /// Output `o` (storage dtype).
    Output,
    /// Row log-sum-exp, f32 `[batch, heads, q_rows]` (softmax partials).
    Lse,
    /// Recurrent state in / out (chunkwise families), f32.
    StateIn,
    StateOut,
    /// Normaliser partial (sum-normalised families), f32.
    Denominator,
    /// Unnormalised output partial, f32 (partials over key ranges add).
    PartialOutput,
    /// An extra input of the spec, by name.
    Input(String),
    /// A scalar `int` / `float` run-time argument (documented in the template).
    Scalar,
    /// Backward pass: the upstream gradient `do` (storage dtype, `o`'s layout).
    UpstreamGrad,
    /// Backward pass: `rowsum(do * o)`, f32 `[batch, heads, q_rows]`.
    Delta,
    /// Backward pass: an f32 gradient accumulator the kernel adds to, for
    /// `q`, `k`, `v` or a float extra input (by name).
    GradAccumulator(String),
}

/// One kernel parameter, in signature order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KernelParam {
    pub name: String,
    /// C type as written in the signature, e.g. `const __nv_bfloat16* __restrict__`.
    pub c_type: String,
    pub role: ParamRole,
    /// One line for the signature comment.
    pub doc: String,
}

impl KernelParam {
    pub fn new(name: &str, c_type: &str, role: ParamRole, doc: &str) -> Self {
        KernelParam {
            name: name.into(),
            c_type: c_type.into(),
            role,
            doc: doc.into(),
        }
    }
}

/// How to launch one `__global__` function of the generated source.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct KernelInfo {
    /// The `extern "C"` symbol.
    pub name: String,
    pub grid: [GridDim; 3],
    pub threads_per_block: u32,
    /// Dynamic shared memory per block in bytes.
    pub dynamic_smem_bytes: u32,
    /// True when `dynamic_smem_bytes` exceeds 48 KB, so the launcher must set
    /// `CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES` first.
    pub needs_smem_opt_in: bool,
    pub params: Vec<KernelParam>,
}

/// Generated CUDA source and how to launch what is in it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GeneratedKernel {
    pub spec_name: String,
    pub family: Family,
    /// Main template the source was rendered from.
    pub template: String,
    pub target: Target,
    pub config: KernelConfig,
    pub source: String,
    pub kernels: Vec<KernelInfo>,
}

impl GridDim {
    fn describe(&self) -> String {
        match self {
            GridDim::QueryBlocks { block } => format!("ceil(rows/{block})"),
            GridDim::Heads => "heads".into(),
            GridDim::Batch => "batch".into(),
            GridDim::Fixed(n) => n.to_string(),
            GridDim::KeyBlocks { block } => format!("ceil(kv_rows/{block})"),
            GridDim::KvHeads => "kv_heads".into(),
        }
    }
}

impl KernelInfo {
    /// One line: symbol, grid, block, shared memory (and whether the launcher must opt in).
    pub fn describe(&self) -> String {
        format!(
            "{}: grid ({}, {}, {}), {} threads, {} bytes dynamic shared memory{}",
            self.name,
            self.grid[0].describe(),
            self.grid[1].describe(),
            self.grid[2].describe(),
            self.threads_per_block,
            self.dynamic_smem_bytes,
            if self.needs_smem_opt_in {
                " (above 48 KB: set CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES)"
            } else {
                ""
            }
        )
    }
}

/// Every template, embedded at build time. Families register theirs here.
pub const TEMPLATES: &[(&str, &str)] = &[
    ("mask.cuh", include_str!("../../templates/mask.cuh")),
    ("scalar.cuh", include_str!("../../templates/scalar.cuh")),
    ("tile.cuh", include_str!("../../templates/tile.cuh")),
    // Tera macros (`{% import "macros.cu" as m %}`) and the partials that open
    // the chunkwise / convolution templates: shared so each piece of CUDA is
    // written once.
    ("macros.cu", include_str!("../../templates/macros.cu")),
    (
        "linear_prelude.cu",
        include_str!("../../templates/linear_prelude.cu"),
    ),
    (
        "conv_prelude.cu",
        include_str!("../../templates/conv_prelude.cu"),
    ),
    ("softmax.cu", include_str!("../../templates/softmax.cu")),
    (
        "softmax_bwd.cu",
        include_str!("../../templates/softmax_bwd.cu"),
    ),
    (
        "softmax_simt.cu",
        include_str!("../../templates/softmax_simt.cu"),
    ),
    (
        "chunkwise_common.cu",
        include_str!("../../templates/chunkwise_common.cu"),
    ),
    (
        "chunkwise_mma.cu",
        include_str!("../../templates/chunkwise_mma.cu"),
    ),
    (
        "chunkwise_simt.cu",
        include_str!("../../templates/chunkwise_simt.cu"),
    ),
    ("conv_mma.cu", include_str!("../../templates/conv_mma.cu")),
    ("conv_simt.cu", include_str!("../../templates/conv_simt.cu")),
    ("helpers.cu", include_str!("../../templates/helpers.cu")),
];

fn tera() -> Result<&'static tera::Tera, CodegenError> {
    static TERA: OnceLock<Result<tera::Tera, String>> = OnceLock::new();
    TERA.get_or_init(|| {
        let mut t = tera::Tera::default();
        // Generated C++ must never be HTML-escaped.
        t.autoescape_on(vec![]);
        t.add_raw_templates(TEMPLATES.iter().copied())
            .map_err(|e| error_chain(&e))?;
        Ok(t)
    })
    .as_ref()
    .map_err(|message| CodegenError::Template {
        template: "(registry)".into(),
        message: message.clone(),
    })
}

/// tera's top-level message says little; the cause chain says what failed.
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut msg = e.to_string();
    let mut src = e.source();
    while let Some(s) = src {
        msg.push_str(": ");
        msg.push_str(&s.to_string());
        src = s.source();
    }
    msg
}

/// Renders a registered template.
pub fn render(template: &str, ctx: &tera::Context) -> Result<String, CodegenError> {
    tera()?
        .render(template, ctx)
        .map_err(|e| CodegenError::Template {
            template: template.into(),
            message: error_chain(&e),
        })
}

/// The error for a configuration that cannot run on `arch`, with the reason.
pub(crate) fn does_not_fit(spec: &MixerSpec, arch: Arch, reason: String) -> CodegenError {
    CodegenError::ConfigDoesNotFit {
        spec: spec.name.clone(),
        arch: arch.name().into(),
        reason,
    }
}

/// The tensor-core kernels move rows in 16-byte vectors (`cp.async`,
/// `ldmatrix`), so every listed width must be a multiple of 8 half-precision
/// elements; the f32 SIMT kernels take any width.
pub(crate) fn require_16_byte_rows(
    spec: &MixerSpec,
    target: &Target,
    widths: &[(&str, u32)],
) -> Result<(), CodegenError> {
    if widths.iter().all(|(_, w)| w.is_multiple_of(8)) {
        return Ok(());
    }
    let names: Vec<String> = widths.iter().map(|(n, w)| format!("{n}={w}")).collect();
    Err(does_not_fit(
        spec,
        target.arch,
        format!(
            "{}: the {} kernel copies 16-byte rows, so {} must be multiples of 8 \
             (use dtype f32 for the SIMT kernel)",
            names.join(" / "),
            target.dtype,
            if widths.len() == 1 { "it" } else { "all" }
        ),
    ))
}

/// C type of a storage dtype.
pub fn c_elem_type(dtype: DType) -> &'static str {
    match dtype {
        DType::F16 => "__half",
        DType::Bf16 => "__nv_bfloat16",
        DType::F32 => "float",
    }
}

/// The CUDA backend's own helper kernels, rendered from
/// `templates/helpers.cu`: the log-sum-exp merge of softmax partials into the
/// f32 accumulator (one kernel per storage type) and the accumulator reset.
/// The source does not depend on a spec or dtype, so the runtime compiles it
/// once per arch. Get it with [`helper_kernels`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HelperKernels {
    /// Self-contained CUDA source (needs only `cuda_fp16.h` / `cuda_bf16.h`)
    /// defining [`merge_kernel_name`](Self::merge_kernel_name) for every
    /// dtype of [`DTYPES`](Self::DTYPES) and
    /// [`fill_kernel_name`](Self::fill_kernel_name).
    pub source: &'static str,
}

impl HelperKernels {
    /// The storage types the source has a merge kernel for, in source order.
    pub const DTYPES: [DType; 3] = [DType::F32, DType::F16, DType::Bf16];

    /// `mixc_merge_lse_<dtype>(acc_o, acc_lse, part_o, part_lse, batch, rows,
    /// heads, dv, row_begin, row_end)`: merges a softmax partial (`part_o` in
    /// storage type `dtype`, normalised, with its f32 row log-sum-exp) into the
    /// f32 accumulator over rows `[row_begin, row_end)`.
    pub fn merge_kernel_name(&self, dtype: DType) -> String {
        format!("mixc_merge_lse_{}", dtype.name())
    }

    /// `mixc_fill_neg_inf(p, n)`: sets `n` floats to -inf (the accumulator's
    /// row log-sum-exp before the first merge).
    pub fn fill_kernel_name(&self) -> &'static str {
        "mixc_fill_neg_inf"
    }

    /// The kernels a softmax run in storage type `dtype` loads, in the order
    /// merge, fill.
    pub fn kernel_names(&self, dtype: DType) -> [String; 2] {
        [
            self.merge_kernel_name(dtype),
            self.fill_kernel_name().to_string(),
        ]
    }
}

/// The backend's helper kernels, rendered from `templates/helpers.cu` on the
/// first call (Rust names the kernels and lists the storage types; the
/// template holds the CUDA).
///
/// # Panics
///
/// If the template fails to render: it takes no input, so that is a bug in
/// `templates/helpers.cu` (the codegen tests render it).
pub fn helper_kernels() -> HelperKernels {
    static SOURCE: OnceLock<String> = OnceLock::new();
    let source = SOURCE.get_or_init(|| {
        // The names come from the same functions the runtime loads by.
        let names = HelperKernels { source: "" };
        let dtypes: Vec<serde_json::Value> = HelperKernels::DTYPES
            .iter()
            .map(|&d| {
                serde_json::json!({
                    "kernel": names.merge_kernel_name(d),
                    "c_type": c_elem_type(d),
                })
            })
            .collect();
        let mut ctx = tera::Context::new();
        ctx.insert("dtypes", &dtypes);
        ctx.insert("fill_kernel", names.fill_kernel_name());
        render("helpers.cu", &ctx).unwrap_or_else(|e| panic!("{e}"))
    });
    HelperKernels { source }
}

/// Kernel symbol: `mixc_<spec>_<family>_<dtype>`, readable in profilers.
pub fn kernel_name(spec: &MixerSpec, target: &Target) -> String {
    format!(
        "mixc_{}_{}_{}",
        sanitize_ident(&spec.name),
        spec.family.name(),
        target.dtype.name()
    )
}

/// The C name of extra input `input`'s kernel parameter: `in_` and the
/// name, each character outside `[A-Za-z0-9_]` spelled `_u<hex>_`, so any
/// identifier the language accepts (Unicode included) is a C identifier
/// that no template variable or C keyword can be, and distinct names stay
/// distinct.
pub fn input_param(input: &str) -> String {
    let mut out = String::from("in_");
    for c in input.chars() {
        if c.is_ascii_alphanumeric() || c == '_' {
            out.push(c);
        } else {
            out.push_str(&format!("_u{:x}_", c as u32));
        }
    }
    out
}

fn sanitize_ident(s: &str) -> String {
    s.chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
        .collect()
}

/// Context keys every template can use:
/// `kernel_name`, `spec_name`, `family`, `template_name`, `arch`, `sm` (80/90),
/// `dtype` (f16/bf16/f32), `elem_type` (C type), `use_mma` (tensor cores),
/// `heads`, `kv_heads`, `group` (query heads per kv head), `head_dim`, `value_dim`,
/// `config` (the `KernelConfig` fields), and `header` (a comment block
/// naming template, spec and parameters; print it first).
pub fn base_context(
    spec: &MixerSpec,
    target: &Target,
    cfg: &KernelConfig,
    template_name: &str,
) -> tera::Context {
    let mut ctx = tera::Context::new();
    let name = kernel_name(spec, target);
    ctx.insert("kernel_name", &name);
    ctx.insert("spec_name", &spec.name);
    ctx.insert("family", spec.family.name());
    ctx.insert("template_name", template_name);
    ctx.insert("arch", target.arch.name());
    ctx.insert("sm", &target.arch.compute_capability());
    ctx.insert("dtype", target.dtype.name());
    ctx.insert("elem_type", c_elem_type(target.dtype));
    ctx.insert("use_mma", &target.uses_tensor_cores());
    ctx.insert("heads", &spec.heads);
    ctx.insert("kv_heads", &spec.kv_heads);
    ctx.insert("group", &spec.group_size());
    ctx.insert("head_dim", &spec.head_dim);
    ctx.insert("value_dim", &spec.value_dim);
    ctx.insert("config", cfg);
    let header = format!(
        "// Generated by mixc {} -- do not edit.\n\
         // template: {template_name}\n\
         // spec:     {} (family {}, heads {}, kv_heads {}, head_dim {}, value_dim {})\n\
         // target:   {} {}\n\
         // config:   {}\n",
        env!("CARGO_PKG_VERSION"),
        spec.name,
        spec.family.name(),
        spec.heads,
        spec.kv_heads,
        spec.head_dim,
        spec.value_dim,
        target.arch.name(),
        target.dtype.name(),
        cfg.describe(),
    );
    ctx.insert("header", &header);
    ctx
}

/// Lowers `spec` to CUDA source for `target` with tile configuration `cfg`.
pub fn generate(
    spec: &MixerSpec,
    target: &Target,
    cfg: &KernelConfig,
) -> Result<GeneratedKernel, CodegenError> {
    GENERATIONS.with(|n| n.set(n.get() + 1));
    cfg.validate_common()?;
    match spec.family {
        Family::Softmax => lower_softmax::lower(spec, target, cfg),
        Family::Linear | Family::Retention | Family::Gated => {
            lower_chunkwise::lower(spec, target, cfg)
        }
        Family::Convolution => lower_conv::lower(spec, target, cfg),
    }
}

thread_local! {
    static GENERATIONS: std::cell::Cell<u64> = const { std::cell::Cell::new(0) };
}

/// How many times this thread called [`generate`] (the runtime's
/// compile-once tests count with it).
pub fn generations() -> u64 {
    GENERATIONS.with(|n| n.get())
}

/// Lowers the backward pass of `spec` (the kernels of
/// `templates/softmax_bwd.cu`: `kernels[0]` computes the gradients,
/// `kernels[1]` the row statistic `delta`, `kernels[2]` converts an f32
/// accumulator to the storage type) with tile configuration `cfg` (see
/// [`KernelConfig::backward_default_for`]). Only the softmax family on
/// tensor cores has generated backward kernels so far; the rest is
/// [`CodegenError::Unsupported`], with what is missing.
pub fn generate_backward(
    spec: &MixerSpec,
    target: &Target,
    cfg: &KernelConfig,
) -> Result<GeneratedKernel, CodegenError> {
    GENERATIONS.with(|n| n.set(n.get() + 1));
    cfg.validate_common()?;
    match spec.family {
        Family::Softmax if target.uses_tensor_cores() => {
            lower_softmax::lower_backward(spec, target, cfg)
        }
        Family::Softmax => Err(CodegenError::Unsupported {
            spec: spec.name.clone(),
            what: "a backward kernel in f32 (the generated backward runs on tensor cores: \
                   use f16 or bf16)"
                .into(),
        }),
        f => Err(CodegenError::Unsupported {
            spec: spec.name.clone(),
            what: format!("a generated backward kernel for the {} family", f.name()),
        }),
    }
}

/// `generate` with the default configuration for the spec and target.
pub fn generate_default(
    spec: &MixerSpec,
    target: &Target,
) -> Result<GeneratedKernel, CodegenError> {
    generate(spec, target, &KernelConfig::default_for(spec, target))
}

/// The default configuration followed by the [`KernelConfig::alternatives`]
/// that generate for this spec and target (distinct, in order): the
/// candidate set for autotuning and for the compile tests.
pub fn candidate_configs(spec: &MixerSpec, target: &Target) -> Vec<KernelConfig> {
    let default = KernelConfig::default_for(spec, target);
    let mut out = vec![default];
    for alt in KernelConfig::alternatives(spec, target) {
        let Ok(cfg) = default.with_overrides(&[alt]) else {
            continue;
        };
        if !out.contains(&cfg) && generate(spec, target, &cfg).is_ok() {
            out.push(cfg);
        }
    }
    out
}

/// Families `generate` has a template for (tests iterate over these).
pub fn supported_families() -> &'static [Family] {
    &[
        Family::Softmax,
        Family::Linear,
        Family::Retention,
        Family::Gated,
        Family::Convolution,
    ]
}
