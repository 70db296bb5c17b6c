//! Runtime errors: variants a caller can match, messages in the user's terms
//! (tensors, specs, devices). The library never names command-line flags;
//! the CLI adds its advice (e.g. "use --backend cpu") from the variant.

use thiserror::Error;

#[derive(Debug, Error)]
pub enum RuntimeError {
    /// An input tensor is missing or has the wrong shape or type.
    #[error("input `{name}`: {problem}")]
    BadInput { name: String, problem: String },
    /// The requested run cannot be done with these parameters.
    #[error("{0}")]
    Invalid(String),
    /// The spec (or a run option) uses something this backend does not
    /// implement; `what` says what, in the spec's terms.
    #[error("the {backend} backend cannot run this: {what}")]
    Unsupported { backend: &'static str, what: String },
    /// Spec text that does not parse or validate: the rendered
    /// `file:line:col` diagnostics.
    #[error("{0}")]
    Spec(String),
    /// A hand-built spec breaks what validation guarantees.
    #[error(transparent)]
    SpecInvariant(#[from] mixc_dsl::InvariantError),
    /// No GPU the CUDA backend can use, and why.
    #[error("CUDA backend unavailable: {reason}")]
    NoGpu { reason: String },
    /// A run needs more memory than `device` has free.
    #[error(
        "out of {device} memory: this run needs {needed} bytes ({:.2} GiB), {available} bytes \
         ({:.2} GiB) of {:.2} GiB are free",
        gib(*needed), gib(*available), gib(*total)
    )]
    OutOfMemory {
        /// e.g. `GPU 0 (NVIDIA H100 80GB HBM3)` or `host`.
        device: String,
        needed: usize,
        available: usize,
        total: usize,
    },
    /// A size computed from the shapes does not fit a machine word.
    #[error("{what} is too large: {dims} overflows")]
    SizeOverflow { what: String, dims: String },
    /// A kernel launch beyond what the compiled kernel or the GPU allows
    /// (threads, shared memory, grid size, 32-bit positions).
    #[error("{0}")]
    DoesNotFit(String),
    /// A bug in mixc (e.g. the generated signature and the launcher
    /// disagree); please report it.
    #[error("internal error: {0}")]
    Internal(String),
    /// A CUDA driver call failed.
    /// A ring over processes: the caller's transport failed (a peer left,
    /// a collective raised).
    #[error("the ring's transport failed: {0}")]
    Transport(String),
    #[error("CUDA: {op} failed: {message}")]
    Driver { op: String, message: String },
    #[error("{path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
    /// A tensor file that cannot be read as safetensors, or whose contents
    /// do not fit the spec.
    #[error("{path}: {problem}")]
    BadFile { path: String, problem: String },
    /// NVRTC is missing or a generated kernel failed to compile.
    #[error(transparent)]
    Nvrtc(#[from] crate::nvrtc::NvrtcError),
}

fn gib(bytes: usize) -> f64 {
    bytes as f64 / (1u64 << 30) as f64
}

impl RuntimeError {
    /// Whether running on another backend (the CPU) is the way around this
    /// error: no GPU, a GPU failure or limit, or a spec the CUDA code
    /// generator refuses.
    pub fn is_gpu_specific(&self) -> bool {
        match self {
            RuntimeError::NoGpu { .. }
            | RuntimeError::Driver { .. }
            | RuntimeError::DoesNotFit(_) => true,
            RuntimeError::Unsupported { backend, .. } => *backend == "cuda",
            RuntimeError::OutOfMemory { device, .. } => device.starts_with("GPU"),
            _ => false,
        }
    }

    /// The reason of a [`RuntimeError::NoGpu`], else the whole message.
    pub fn reason(&self) -> String {
        match self {
            RuntimeError::NoGpu { reason } => reason.clone(),
            e => e.to_string(),
        }
    }
}

pub type Result<T, E = RuntimeError> = std::result::Result<T, E>;
