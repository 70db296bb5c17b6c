//! What runs use: the cached choice for (spec, shape bucket, dtype, device),
//! or the documented heuristic default when there is none
//! (`CpuConfig::default_for`: 64 x 64 tiles, chunks of 64, every core;
//! `KernelConfig::default_for` on CUDA). A cache entry that cannot be used
//! gives the default plus a note saying why, never an error or a config
//! that was not validated.
//!
//! Multi-rank runs: the CPU backend runs every rank in one process with one
//! `CpuConfig`, so all ranks share the looked-up value. Separate CUDA
//! processes each read the same cache entry (same key, atomically written
//! file), so they agree as well; a launcher that must be sure passes rank 0's
//! choice to the others.

use super::cache::{DeviceInfo, Loaded, Pass, TuneCache, TuneKey};
use super::TunedConfig;
use crate::cpu::CpuConfig;
use mixc_codegen::{generate, KernelConfig, Target};
use mixc_dsl::ir::{DType, MixerSpec};
use std::path::PathBuf;

/// Where a configuration came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    /// A tuning cache entry.
    Cached { path: PathBuf },
    /// The heuristic default; `note` says why a cache entry was not used
    /// (corrupt, stale, unreadable), `None` when there simply was none.
    Default { note: Option<String> },
}

#[derive(Debug, Clone, PartialEq)]
pub struct CpuChoice {
    pub config: CpuConfig,
    pub source: Source,
}

/// The CPU configuration for `spec` at `batch x seq` on this machine, from
/// the cache at the default location (`TuneCache::from_env`). Ranks,
/// sharding and precision are the default's; callers set their own.
pub fn cpu_config_for(spec: &MixerSpec, batch: usize, seq: usize) -> CpuChoice {
    cpu_config_in(TuneCache::from_env().as_ref(), spec, batch, seq, spec.dtype)
}

fn unusable(msg: String) -> Source {
    Source::Default {
        note: Some(format!(
            "{msg}; using the default configuration (`mixc tune` rebuilds the entry)"
        )),
    }
}

/// [`cpu_config_for`] with an explicit cache (`None`: caching off) and dtype.
pub fn cpu_config_in(
    cache: Option<&TuneCache>,
    spec: &MixerSpec,
    batch: usize,
    seq: usize,
    dtype: DType,
) -> CpuChoice {
    cpu_config_for_pass(cache, spec, batch, seq, dtype, Pass::Fwd)
}

/// [`cpu_config_in`] for the tiles tuned for `pass` (`mixc tune --pass bwd`
/// stores the backward's separately).
pub fn cpu_config_for_pass(
    cache: Option<&TuneCache>,
    spec: &MixerSpec,
    batch: usize,
    seq: usize,
    dtype: DType,
    pass: Pass,
) -> CpuChoice {
    let default = CpuConfig::default_for(spec, seq);
    let Some(cache) = cache else {
        return CpuChoice {
            config: default,
            source: Source::Default { note: None },
        };
    };
    let key = TuneKey::new(spec, batch, seq, dtype, DeviceInfo::cpu()).for_pass(pass);
    let (config, source) = match cache.load(&key) {
        Loaded::Hit(e) => match e.choice {
            TunedConfig::Cpu(t) => (
                t.apply(&default),
                Source::Cached {
                    path: cache.path(&key),
                },
            ),
            TunedConfig::Cuda(_) => (
                default,
                unusable("tune cache entry holds a CUDA configuration".into()),
            ),
        },
        Loaded::Miss => (default, Source::Default { note: None }),
        Loaded::Invalid(msg) => (default, unusable(msg)),
    };
    CpuChoice { config, source }
}

/// The kernel configuration for `spec` on `target` at `batch x seq` on
/// `device` (its name, compute capability, driver and NVRTC versions are part
/// of the key). A cached choice is used only if it still generates.
pub fn cuda_config_in(
    cache: Option<&TuneCache>,
    spec: &MixerSpec,
    target: &Target,
    batch: usize,
    seq: usize,
    device: DeviceInfo,
) -> (KernelConfig, Source) {
    let default = KernelConfig::default_for(spec, target);
    let Some(cache) = cache else {
        return (default, Source::Default { note: None });
    };
    let key = TuneKey::new(spec, batch, seq, target.dtype, device);
    match cache.load(&key) {
        Loaded::Hit(e) => match e.choice {
            TunedConfig::Cuda(c) => match generate(spec, target, &c) {
                Ok(_) => (
                    c,
                    Source::Cached {
                        path: cache.path(&key),
                    },
                ),
                Err(err) => (
                    default,
                    unusable(format!("cached kernel config no longer generates ({err})")),
                ),
            },
            TunedConfig::Cpu(_) => (
                default,
                unusable("tune cache entry holds a CPU configuration".into()),
            ),
        },
        Loaded::Miss => (default, Source::Default { note: None }),
        Loaded::Invalid(msg) => (default, unusable(msg)),
    }
}
