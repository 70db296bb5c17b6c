//! One tuning session, as `mixc tune` and a library caller run it: look the
//! key up in the tuning cache (an entry is reused unless forced), otherwise
//! build the backend's candidates (CUDA: pruned by NVRTC resource use first)
//! and its timer, time them within the budget against the reference, and
//! store the winner. Callers print; [`TuneEvent`]s and [`Progress`] tell
//! them what happens meanwhile.

use std::path::PathBuf;
use std::time::Duration;

use mixc_codegen::Target;
use mixc_dsl::ir::{DType, MixerSpec};

use super::cache::{DeviceInfo, Loaded, Pass, TuneCache, TuneEntry, TuneKey};
use super::{
    prune, run_tuning, space, Candidate, CpuTimer, CpuTimerOptions, CudaTimer, Progress, Timer,
    TuneOptions, TuneReport,
};
use crate::compile_cache::CompileCache;
use crate::cpu::CpuConfig;
use crate::error::{Result, RuntimeError};
use crate::mixer::BackendKind;

/// What to tune.
#[derive(Debug, Clone)]
pub struct TuneRequest {
    /// `Cpu` or `Cuda` (GPU 0).
    pub backend: BackendKind,
    /// The shape timed; the entry serves its power-of-two bucket.
    pub batch: usize,
    pub seq: usize,
    /// Storage dtype of a CUDA target (the CPU computes in f32; there it
    /// only selects the cache key).
    pub dtype: DType,
    /// Timed repetitions per candidate, and the inputs' seed.
    pub reps: usize,
    pub seed: u64,
    /// No new candidate starts after this long (the default is always timed).
    pub budget: Duration,
    /// Tune again even when the cache holds an entry.
    pub force: bool,
    /// Rows the stored entry keeps.
    pub top: usize,
    /// The pass tuned: the forward, or the backward (CPU only; stored
    /// under its own key, used by `Mixer::backward`).
    pub pass: Pass,
}

/// What happens before timing starts, for a caller that reports it.
#[derive(Debug, Clone)]
pub enum TuneEvent<'a> {
    /// Timing is about to start for this key on this device.
    Started {
        key: &'a TuneKey,
        device: &'a DeviceInfo,
    },
    /// CUDA candidates pruned by compiled resources before timing.
    Pruned {
        pruned: usize,
        total: usize,
        summary: String,
    },
}

/// How a session ended.
#[derive(Debug)]
pub enum TuneResult {
    /// The cache already held an entry for the key (nothing timed).
    CacheHit { entry: TuneEntry, path: PathBuf },
    /// Candidates were timed and `entry` chosen; `written` is where it was
    /// stored (`None`: caching off or the write failed, see the warnings).
    Tuned {
        entry: TuneEntry,
        report: TuneReport,
        written: Option<PathBuf>,
    },
    /// No candidate passed the check against the reference.
    NothingPassed { report: TuneReport },
}

/// A finished session and the warnings gathered on the way (cache folder
/// missing, an unusable entry replaced, a failed write).
#[derive(Debug)]
pub struct TuneSession {
    pub key: TuneKey,
    pub result: TuneResult,
    pub warnings: Vec<String>,
}

/// Runs a tuning session for `spec` (see the module docs).
pub fn tune(
    spec: &MixerSpec,
    req: &TuneRequest,
    on_event: &mut dyn FnMut(TuneEvent),
    progress: &mut dyn FnMut(&Progress),
) -> Result<TuneSession> {
    if req.seq == 0 || req.batch == 0 {
        return Err(RuntimeError::Invalid(
            "the sequence length and batch size to tune for must be at least 1".into(),
        ));
    }
    if req.reps == 0 {
        return Err(RuntimeError::Invalid(
            "at least one timed repetition per candidate is needed".into(),
        ));
    }
    let device = match req.backend {
        BackendKind::Cpu => DeviceInfo::cpu(),
        BackendKind::Cuda => {
            DeviceInfo::cuda(0).map_err(|reason| RuntimeError::NoGpu { reason })?
        }
        BackendKind::Reference => {
            return Err(RuntimeError::Unsupported {
                backend: "reference",
                what: "tuning (the reference has no tiles)".into(),
            })
        }
    };
    if req.pass == Pass::Bwd && req.backend == BackendKind::Cuda {
        return Err(RuntimeError::Unsupported {
            backend: "cuda",
            what: "tuning the backward pass (the CUDA backward runs its default tiles, \
                   `KernelConfig::backward_default_for`, for now)"
                .into(),
        });
    }
    let key = TuneKey::new(spec, req.batch, req.seq, req.dtype, device.clone()).for_pass(req.pass);
    let mut warnings = Vec::new();
    let cache = TuneCache::from_env();
    if cache.is_none() {
        warnings.push(
            "no cache folder (MIXC_CACHE_DIR is empty, or HOME is unset): the result is not stored"
                .into(),
        );
    }
    if let Some(c) = &cache {
        match c.load(&key) {
            Loaded::Hit(entry) if !req.force => {
                let path = c.path(&key);
                return Ok(TuneSession {
                    key,
                    result: TuneResult::CacheHit {
                        entry: *entry,
                        path,
                    },
                    warnings,
                });
            }
            Loaded::Invalid(msg) => warnings.push(format!("{msg}; tuning again")),
            Loaded::Hit(_) | Loaded::Miss => {}
        }
    }
    // The timed inputs (and the check's reference output) must fit.
    let (inputs, rest) = crate::memory::run_host_bytes(spec, req.batch, req.seq, true, 2)?;
    // A backward step holds about three times a forward's (gradients, scratch).
    let steps = if req.pass == Pass::Bwd { 3 } else { 1 };
    crate::memory::admit_host(inputs.saturating_add(rest).saturating_mul(steps))?;
    on_event(TuneEvent::Started {
        key: &key,
        device: &device,
    });
    let timer_opts = CpuTimerOptions {
        reps: req.reps,
        seed: req.seed,
        ..CpuTimerOptions::default()
    };
    let (candidates, pruned, mut timer): Planned = match req.backend {
        BackendKind::Cuda => {
            let cc = device.compute_capability.unwrap_or(0);
            // The launcher's own mapping, so the tuned kernel is the one runs load.
            let arch = crate::cuda::arch_for((cc as i32 / 10, cc as i32 % 10))?;
            let target = Target::new(arch, req.dtype);
            let space = space::cuda_candidates(spec, &target);
            let report =
                prune::compile_and_prune(spec, &target, space, CompileCache::from_env().as_ref());
            on_event(TuneEvent::Pruned {
                pruned: report.pruned.len(),
                total: report.pruned.len() + report.kept.len(),
                summary: report.summary(),
            });
            let timer = CudaTimer::new(spec, req.dtype, req.batch, req.seq, timer_opts)?;
            (
                report.kept_candidates(),
                report.pruned_with_reasons(),
                Box::new(timer),
            )
        }
        _ => {
            let base = CpuConfig::default_for(spec, req.seq);
            let cands = space::cpu_candidates(spec, req.seq, &base);
            let mut timer = CpuTimer::new(spec, base, req.batch, req.seq, timer_opts)?;
            if req.pass == Pass::Bwd {
                timer = timer.for_backward()?;
            }
            (cands, Vec::new(), Box::new(timer))
        }
    };
    let opts = TuneOptions {
        budget: Some(req.budget),
        // The CPU backend computes in f32 whatever the storage type; kernels in `dtype`.
        tolerance: {
            let compute = match req.backend {
                BackendKind::Cuda => req.dtype,
                _ => DType::F32,
            };
            match req.pass {
                Pass::Fwd => crate::reference::check_tolerance(compute),
                Pass::Bwd => crate::check::grad_tolerance(compute),
            }
        },
    };
    let report = run_tuning(candidates, pruned, timer.as_mut(), &opts, progress);
    let Some(entry) = TuneEntry::from_report(key.clone(), req.batch, req.seq, &report, req.top)
    else {
        return Ok(TuneSession {
            key,
            result: TuneResult::NothingPassed { report },
            warnings,
        });
    };
    let mut written = None;
    if let Some(c) = &cache {
        match c.store(&entry) {
            Ok(p) => written = Some(p),
            Err(e) => warnings.push(format!(
                "tune cache not written to {}: {e}; the result is not reused",
                c.dir().display()
            )),
        }
    }
    Ok(TuneSession {
        key,
        result: TuneResult::Tuned {
            entry,
            report,
            written,
        },
        warnings,
    })
}

/// What a backend hands the tuner: candidates to time, candidates pruned
/// (with reasons), and its timer.
type Planned = (Vec<Candidate>, Vec<(Candidate, String)>, Box<dyn Timer>);
