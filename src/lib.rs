//! mixc: token-mixer specs compiled to tiled kernels.
pub use mixc_dsl as dsl;
