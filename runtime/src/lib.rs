//! mixc runtime: executes a validated `MixerSpec`.
//!
//! - `reference`: the f64 oracle, quadratic loops written for clarity.
//! - `inputs` / `io`: seeded random inputs and safetensors files.
//! - [`Mixer`]: a spec compiled once for a backend and called many times.
//! - `cpu`: the blocked/ring CPU backend (the same block plan as the kernels).
//! - `nvrtc`: NVRTC compilation with an on-disk cache (no GPU needed).

pub mod tensor;

pub use cpu::OutElem;
/// The 16-bit host element types ([`HostElem`]).
pub use half::{bf16, f16};
pub use tensor::{ExtraTensor, HostElem, InputsMeta, MixerInputs, MixerOutput, Tensor};
pub mod error;
pub mod grad;
pub use error::{Result, RuntimeError};
pub use grad::Gradients;
pub mod block;
pub use block::{Block, BlockGradients, BlockInputs, BlockOutput, BlockResiduals, BlockWeights};
pub mod check;
pub mod compile_cache;
pub mod counters;
pub mod cpu;
pub mod cuda;
pub mod inputs;
pub mod io;
pub mod memory;
pub mod mixer;
pub mod pairs;
pub use mixer::{
    BackendKind, BackwardOutput, ConfigSource, Device, Mixer, Options, Output, Residuals, Tiles,
};
pub mod nvrtc;
pub mod paged;
pub mod reference;
pub mod ring;
pub mod tune;
pub mod varlen;
pub use paged::PagedKv;
pub use varlen::Varlen;
