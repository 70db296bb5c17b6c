//! Runtime errors. Each variant says what went wrong and, where it helps,
//! what to do about it. (Helpers: add variants here; keep messages actionable.)

use thiserror::Error;

#[derive(Debug, Error)]
pub enum RuntimeError {
    /// An input tensor is missing or has the wrong shape or type.
    #[error("input `{name}`: {problem}")]
    BadInput { name: String, problem: String },
    /// The requested run cannot be done with these parameters.
    #[error("{0}")]
    Invalid(String),
    /// The spec uses something this backend does not implement.
    #[error("unsupported by the {backend} backend: {what}")]
    Unsupported { backend: &'static str, what: String },
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

pub type Result<T, E = RuntimeError> = std::result::Result<T, E>;
