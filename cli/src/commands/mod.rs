pub mod bench;
pub mod check;
pub mod compile;
pub mod gen;
pub mod run;
pub mod run_block;
pub mod tune;

use anyhow::{bail, Context, Result};
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

/// Shape keys a run may override (`--set heads=8`): the spec's arithmetic does
/// not depend on them, only the tensor sizes do, so one spec file serves a
/// small test and a model-sized run.
pub const SHAPE_KEYS: &[&str] = &["heads", "kv_heads", "head_dim", "value_dim"];

/// Applies `key=value` shape overrides and re-checks the constraints the
/// validator enforces on them (kv_heads divides heads, all at least 1).
pub fn apply_shape_overrides(spec: &mut MixerSpec, items: &[String]) -> Result<()> {
    // A spec without `value_dim` has d_v = d_k, one without `kv_heads` has one
    // kv head per query head; keep those ties unless both sides are set.
    let dims_tied = spec.value_dim == spec.head_dim;
    let heads_tied = spec.kv_heads == spec.heads;
    let (mut value_dim_set, mut kv_heads_set) = (false, false);
    for item in items {
        let (key, value) = item
            .split_once('=')
            .with_context(|| format!("--set `{item}`: expected KEY=VALUE, e.g. heads=8"))?;
        let value: u64 =
            value.trim().parse().ok().with_context(|| {
                format!("--set `{item}`: the value must be a non-negative integer")
            })?;
        let max = match key.trim() {
            "heads" | "kv_heads" => mixc::dsl::MAX_HEADS,
            _ => mixc::dsl::MAX_HEAD_DIM,
        };
        if value == 0 || value > max {
            bail!("--set `{item}`: the value must be between 1 and {max}");
        }
        let value = value as u32;
        match key.trim() {
            "heads" => spec.heads = value,
            "kv_heads" => {
                spec.kv_heads = value;
                kv_heads_set = true;
            }
            "head_dim" => spec.head_dim = value,
            "value_dim" => {
                spec.value_dim = value;
                value_dim_set = true;
            }
            other => bail!(
                "--set `{item}`: unknown key `{other}`; the keys are {}",
                SHAPE_KEYS.join(", ")
            ),
        }
    }
    if dims_tied && !value_dim_set {
        spec.value_dim = spec.head_dim;
    }
    if heads_tied && !kv_heads_set {
        spec.kv_heads = spec.heads;
    }
    let (max_heads, max_dim) = (mixc::dsl::MAX_HEADS, mixc::dsl::MAX_HEAD_DIM);
    if u64::from(spec.heads.max(spec.kv_heads)) > max_heads {
        bail!("after --set: heads and kv_heads must be at most {max_heads}");
    }
    if u64::from(spec.head_dim.max(spec.value_dim)) > max_dim {
        bail!("after --set: head_dim and value_dim must be at most {max_dim}");
    }
    if !spec.heads.is_multiple_of(spec.kv_heads) {
        bail!(
            "after --set: kv_heads = {} must divide heads = {}",
            spec.kv_heads,
            spec.heads
        );
    }
    Ok(())
}
