//! The mixc spec language.
pub mod ir;
pub use ir::*;
