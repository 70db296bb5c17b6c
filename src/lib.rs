//! mixc: token mixers (attention and its relatives) from a short spec to
//! tiled kernels, as a library.
//!
//! A spec is parsed once ([`parse`], [`parse_file`] or the [`mixer!`] macro,
//! checked at compile time), compiled once for a backend ([`Mixer::new`]:
//! CUDA through NVRTC, the blocked CPU backend, or the f64 reference) and
//! then called many times ([`Mixer::forward`]) with any batch and sequence
//! length, without generating, compiling or loading anything again.
//!
//! ```
//! use mixc::{Device, Mixer, Options};
//!
//! let spec = mixc::mixer! {
//!     mixer causal_gqa {
//!         heads = 4;
//!         kv_heads = 2;
//!         head_dim = 32;
//!         mask = causal;
//!     }
//! };
//! // CUDA when a GPU is usable, the CPU backend otherwise.
//! let mixer = Mixer::new(&spec, Options::on(Device::Auto))?;
//! for seq in [100, 257] {
//!     let inputs = mixc::random_inputs(&spec, 2, seq, 7);
//!     let out = mixer.forward(&inputs)?;
//!     assert_eq!(out.o.shape, [2, seq, 4, 32]);
//! }
//! # Ok::<(), mixc::Error>(())
//! ```
//!
//! Training: [`Mixer::forward_train`] also returns the [`Residuals`] the
//! backward pass needs (each row's log-sum-exp), and [`Mixer::backward`]
//! returns the [`Gradients`] of `sum(o * do)` for q, k, v and every float
//! extra input, in the inputs' layouts:
//!
//! ```
//! use mixc::{Device, Mixer, Options};
//!
//! let spec = mixc::parse("mixer m { heads = 2; head_dim = 16; mask = causal; }").unwrap();
//! let mixer = Mixer::new(&spec, Options::on(Device::Cpu))?;
//! let inputs = mixc::random_inputs(&spec, 1, 50, 0);
//! let (out, saved) = mixer.forward_train(&inputs)?;
//! let d_o = mixc::random_upstream(&spec, 1, 50, 1);
//! let grads = mixer.backward(&inputs, &out.o, &saved, &d_o)?.grads;
//! assert_eq!(grads.dq.shape, inputs.q.shape);
//! # Ok::<(), mixc::Error>(())
//! ```
//!
//! Inputs use mixc's layout (the flash-attn layout): `q [batch, seq, heads,
//! head_dim]`, `k [batch, seq, kv_heads, head_dim]`, `v [batch, seq,
//! kv_heads, value_dim]`, extra inputs by their spec names
//! ([`MixerInputs::new`], [`MixerInputs::with_extra`]); the output is `o
//! [batch, seq, heads, value_dim]`. `docs/api.md` walks through the
//! options, the backends and the errors.
//!
//! q, k, v and `o` are f32 unless the inputs say otherwise: a
//! `MixerInputs<mixc::bf16>` (or `mixc::f16`) holds half the bytes, is read in
//! place by the CPU backend and the reference, and comes back as an
//! `Output<mixc::bf16>` ([`HostElem`]; [`Mixer::host_dtype`] says which
//! type a mixer's callers should keep):
//!
//! ```
//! use mixc::{bf16, Device, Mixer, MixerInputs, Options};
//!
//! let spec = mixc::parse("mixer m { heads = 2; head_dim = 16; mask = causal; dtype = bf16; }").unwrap();
//! let mixer = Mixer::new(&spec, Options::on(Device::Cpu))?;
//! let inputs: MixerInputs<bf16> = mixc::runtime::inputs::random_inputs_kv_as(&spec, 1, 50, 50, 0);
//! let out = mixer.forward(&inputs)?;
//! assert_eq!(out.o.data.len(), 50 * 2 * 16);
//! let first: bf16 = out.o.data[0];
//! assert!(first.to_f32().is_finite());
//! # Ok::<(), mixc::Error>(())
//! ```
//!
//! The crates behind the facade are re-exported for what it does not cover:
//! [`dsl`] (the language and its IR), [`codegen`] (block plan and CUDA
//! lowering) and [`runtime`] (backends, tuning, safetensors I/O).

pub use mixc_codegen as codegen;
pub use mixc_dsl as dsl;
pub use mixc_runtime as runtime;

pub use mixc_dsl::{DType, Diagnostics, Family, MixerSpec, SpecError};
pub use mixc_runtime::cpu::RecurrentState;
pub use mixc_runtime::mixer::capabilities;
pub use mixc_runtime::paged::{PagedKv, Pages};
pub use mixc_runtime::ring::{RingSchedule, Sharding, Transport};
pub use mixc_runtime::tune::CpuTiles;
pub use mixc_runtime::varlen::Varlen;
pub use mixc_runtime::{bf16, f16};
pub use mixc_runtime::{
    BackendKind, BackwardOutput, ConfigSource, Device, ExtraTensor, Gradients, HostElem, Mixer,
    MixerInputs, Options, OutElem, Output, Residuals, Tensor, Tiles,
};

/// `Result<T, mixc::Error>`.
pub use mixc_runtime::Result;
/// The library's error type: variants a caller can match (no GPU, out of
/// memory, unsupported spec on a backend, bad input tensor, ...).
pub use mixc_runtime::RuntimeError as Error;

/// Parses and validates spec text; the error renders as `line:col`
/// diagnostics with a caret and a hint.
pub fn parse(text: &str) -> std::result::Result<MixerSpec, Diagnostics> {
    mixc_dsl::parse_str(text)
}

/// Parses and validates a `.mix` file; the error renders as `file:line:col`
/// diagnostics (or says why the file could not be read).
pub fn parse_file(path: impl AsRef<std::path::Path>) -> std::result::Result<MixerSpec, SpecError> {
    mixc_dsl::parse_file(path.as_ref())
}

/// Deterministic random inputs for `spec` at `batch x seq` (q, k, v
/// standard normal, extra inputs of the documented kinds); the same
/// arguments give the same bits on every platform.
pub fn random_inputs(spec: &MixerSpec, batch: usize, seq: usize, seed: u64) -> MixerInputs {
    mixc_runtime::inputs::random_inputs(spec, batch, seq, seed)
}

/// A seeded upstream gradient `do` (standard normal, the output's shape
/// `[batch, seq, heads, value_dim]`) for [`Mixer::backward`].
pub fn random_upstream(spec: &MixerSpec, batch: usize, seq: usize, seed: u64) -> Tensor<f32> {
    mixc_runtime::inputs::random_upstream(spec, batch, seq, seed)
}

/// A spec written in Rust, validated at compile time by the same parser
/// that reads `.mix` files (errors point at the offending tokens); expands
/// to a [`MixerSpec`] value.
///
/// ```
/// let spec = mixc::mixer! {
///     mixer retnet {
///         heads = 8;
///         head_dim = 64;
///         decay = 1.0 - pow(2.0, -5.0 - h);
///         mask = causal;
///         norm = none;
///     }
/// };
/// assert_eq!(spec.family, mixc::Family::Retention);
/// ```
#[macro_export]
macro_rules! mixer {
    ($($spec:tt)*) => {
        $crate::__private::mixer_in! { ($crate::dsl) $($spec)* }
    };
}

#[doc(hidden)]
pub mod __private {
    pub use mixc_macro::mixer_in;
}

/// The README's Rust examples run as doctests.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
pub struct ReadmeDoctests;

/// `docs/api.md`'s examples run as doctests.
#[cfg(doctest)]
#[doc = include_str!("../docs/api.md")]
pub struct ApiDocDoctests;
