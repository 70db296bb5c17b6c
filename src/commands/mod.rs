pub mod check;
pub mod compile;
pub mod gen;
pub mod run;

use anyhow::Result;
use mixc_dsl::MixerSpec;
use std::path::Path;

/// Loads and validates a spec file; the error carries the rendered diagnostics.
pub fn load_spec(path: &Path) -> Result<MixerSpec> {
    mixc_dsl::parse_file(path).map_err(|e| anyhow::anyhow!("{e}"))
}
