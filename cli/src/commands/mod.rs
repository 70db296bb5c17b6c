pub mod bench;
pub mod check;
pub mod compile;
pub mod gen;
pub mod run;
pub mod run_block;
pub mod tune;

use anyhow::{Context, Result};
use mixc::dsl::MixerSpec;
use std::path::Path;

/// Loads and validates a spec file; the error carries the rendered
/// diagnostics. A block file gives the mixer it wraps (what `gen`,
/// `compile` and `tune` act on), with a note on stderr.
/// Prints the spec's warnings (likely mistakes in a valid spec) on stderr.
pub fn print_warnings(path: &Path) {
    if let Ok(Some(w)) = mixc::dsl::warnings_file(path) {
        eprint!("{w}");
    }
}

pub fn load_spec(path: &Path) -> Result<MixerSpec> {
    print_warnings(path);
    match mixc::dsl::parse_any_file(path).map_err(|e| anyhow::anyhow!("{e}"))? {
        mixc::dsl::SpecFile::Mixer(spec) => Ok(spec),
        mixc::dsl::SpecFile::Block(block) => {
            eprintln!(
                "note: {} defines block `{}`; using the mixer it wraps, `{}`",
                path.display(),
                block.name,
                block.mixer.name
            );
            Ok(block.mixer)
        }
    }
}

/// Applies `--set key=value` shape overrides through the library
/// ([`mixc::dsl::MixerSpec::with_shape`], which keeps the spec's ties and
/// re-checks what depends on the shape); only the flag syntax lives here.
pub fn apply_shape_overrides(spec: &mut MixerSpec, items: &[String]) -> Result<()> {
    let mut shape = mixc::dsl::Shape::default();
    for item in items {
        let (key, value) = item
            .split_once('=')
            .with_context(|| format!("--set `{item}`: expected KEY=VALUE, e.g. heads=8"))?;
        let value: u64 =
            value.trim().parse().ok().with_context(|| {
                format!("--set `{item}`: the value must be a non-negative integer")
            })?;
        shape
            .set(key.trim(), value)
            .with_context(|| format!("--set `{item}`"))?;
    }
    *spec = spec.with_shape(shape).context("after --set")?;
    Ok(())
}
