//! Autotuning: pick the fastest *correct* tile configuration for a spec, a
//! shape bucket and a device, and remember it on disk.
//!
//! The pieces, each in its own file:
//! - [`space`]: the search space of every backend and family, in one place.
//! - [`prune`]: CUDA candidates compiled by NVRTC and dropped before any
//!   timing when they cannot launch (shared memory), spill, or have an
//!   occupancy estimate far behind the best.
//! - [`timing`]: the [`Timer`] trait and the CPU wall-clock timer. The CUDA
//!   backend plugs a CUDA-events timer into the same trait.
//! - [`cache`]: one JSON file per key under `<cache dir>/tune/`, atomic writes.
//! - [`lookup`]: what `mixc run` and library callers use: the cached choice,
//!   or the documented heuristic default.
//!
//! [`run_tuning`] drives a [`Timer`] over candidates: the default first (it
//! is always timed, so the choice is never slower than it), each candidate
//! checked against the f64 reference before it is timed, the budget checked
//! between candidates. [`choose`] picks the winner deterministically.

pub mod cache;
pub mod lookup;
pub mod prune;
pub mod session;
pub mod space;
pub mod timing;

pub use cache::{DeviceInfo, Pass, TuneCache, TuneEntry, TuneKey};
pub use lookup::{
    cpu_config_for, cpu_config_for_pass, cpu_config_in, cuda_config_in, CpuChoice, Source,
};
pub use session::{tune, TuneEvent, TuneRequest, TuneResult, TuneSession};
pub use timing::{CpuTimer, CpuTimerOptions, CudaTimer, Timer};

use crate::cpu::CpuConfig;
use mixc_codegen::KernelConfig;
use serde::{Deserialize, Serialize};
use std::time::{Duration, Instant};

/// The CPU backend's tuned fields; the rest of a [`CpuConfig`] (ranks,
/// sharding, precision) is the caller's choice and not tuned.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct CpuTiles {
    pub block_m: usize,
    pub block_n: usize,
    pub chunk: usize,
    pub threads: usize,
}

impl CpuTiles {
    pub fn of(cfg: &CpuConfig) -> Self {
        CpuTiles {
            block_m: cfg.block_m,
            block_n: cfg.block_n,
            chunk: cfg.chunk,
            threads: cfg.threads,
        }
    }

    /// `base` with these tiles and thread count.
    pub fn apply(&self, base: &CpuConfig) -> CpuConfig {
        CpuConfig {
            block_m: self.block_m,
            block_n: self.block_n,
            chunk: self.chunk,
            threads: self.threads,
            ..base.clone()
        }
    }
}

/// A configuration of one backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TunedConfig {
    Cpu(CpuTiles),
    Cuda(KernelConfig),
}

/// One configuration the tuner may try.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Candidate {
    /// Position in the search space (the last tie-break).
    pub index: usize,
    pub config: TunedConfig,
    /// The heuristic default (`CpuConfig::default_for` / `KernelConfig::default_for`).
    pub is_default: bool,
    /// The fields that matter for this spec, e.g. `block 64x64, 2 threads`.
    pub label: String,
    /// Work tile area (rows x keys, or chunk^2 for state forms): the second tie-break.
    pub tile_area: u64,
}

/// One candidate's timing: wall clock (CPU) or CUDA events, in nanoseconds so
/// comparisons are exact and therefore deterministic.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Sample {
    pub median_ns: u64,
    pub min_ns: u64,
    pub max_ns: u64,
    pub reps: u32,
}

impl Sample {
    /// Median of `times` (the lower middle for an even count, so the value is
    /// a measured one, not an average). `None` for no times.
    pub fn from_times(times: &[Duration]) -> Option<Sample> {
        let mut ns: Vec<u64> = times.iter().map(|d| d.as_nanos() as u64).collect();
        ns.sort_unstable();
        Some(Sample {
            median_ns: *ns.get((ns.len().max(1) - 1) / 2)?,
            min_ns: *ns.first()?,
            max_ns: *ns.last()?,
            reps: ns.len() as u32,
        })
    }
    pub fn median_s(&self) -> f64 {
        self.median_ns as f64 * 1e-9
    }
}

/// What happened to a candidate.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "status")]
pub enum Outcome {
    /// Checked against the reference and timed: eligible to win.
    Timed { sample: Sample, check_error: f64 },
    /// Its output differs from the reference beyond the tolerance: never timed.
    WrongResult { check_error: f64 },
    /// Running it failed (the message says why): never timed.
    Failed { error: String },
    /// Dropped before timing (CUDA: cannot launch, spills, low occupancy).
    Pruned { reason: String },
    /// Not tried: the time budget ran out first.
    SkippedBudget,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CandidateResult {
    pub candidate: Candidate,
    pub outcome: Outcome,
}

impl CandidateResult {
    pub fn sample(&self) -> Option<&Sample> {
        match &self.outcome {
            Outcome::Timed { sample, .. } => Some(sample),
            _ => None,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TuneOptions {
    /// Stop timing new candidates once this much time has passed (the
    /// default is timed regardless). `None`: no limit.
    pub budget: Option<Duration>,
    /// Largest accepted `max |out - ref| / max |ref|` on the check rows.
    pub tolerance: f64,
}

impl Default for TuneOptions {
    fn default() -> Self {
        TuneOptions {
            budget: None,
            // What `mixc run --check` accepts for f32 compute.
            tolerance: 2e-4,
        }
    }
}

/// Progress of a tuning run, for a progress bar.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Progress {
    pub total: usize,
    /// Candidates finished (timed, rejected, failed or skipped).
    pub tried: usize,
    pub pruned: usize,
    /// Label and median of the best candidate so far.
    pub best: Option<(String, Sample)>,
    /// The candidate being measured now.
    pub current: Option<String>,
}

/// The whole run: every candidate's outcome, in candidate order.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TuneReport {
    pub results: Vec<CandidateResult>,
    /// Index into `results` of the winner (see [`choose`]).
    pub chosen: Option<usize>,
    /// Candidates the timer measured.
    pub timed: usize,
    pub elapsed_s: f64,
}

impl TuneReport {
    pub fn default_result(&self) -> Option<&CandidateResult> {
        self.results.iter().find(|r| r.candidate.is_default)
    }
    pub fn chosen_result(&self) -> Option<&CandidateResult> {
        self.chosen.map(|i| &self.results[i])
    }
    pub fn count(&self, pred: impl Fn(&Outcome) -> bool) -> usize {
        self.results.iter().filter(|r| pred(&r.outcome)).count()
    }
    /// Default median over chosen median (> 1: the choice is faster).
    pub fn speedup(&self) -> Option<f64> {
        let d = self.default_result()?.sample()?;
        let c = self.chosen_result()?.sample()?;
        Some(d.median_ns as f64 / c.median_ns.max(1) as f64)
    }
    /// Timed, correct candidates, best first (the [`choose`] order).
    pub fn ranked(&self) -> Vec<&CandidateResult> {
        let mut v: Vec<&CandidateResult> = self.results.iter().filter(|r| eligible(r)).collect();
        v.sort_by_key(|r| rank_key(r));
        v
    }
}

fn eligible(r: &CandidateResult) -> bool {
    matches!(r.outcome, Outcome::Timed { .. })
}

fn rank_key(r: &CandidateResult) -> (u64, u64, usize) {
    let median = r.sample().map_or(u64::MAX, |s| s.median_ns);
    (median, r.candidate.tile_area, r.candidate.index)
}

/// The winner among timed, correct candidates. Tie-break rule (documented in
/// docs/tuning.md): lower median time (whole nanoseconds), then smaller tile
/// area, then earlier position in the search space. The same timings
/// therefore always give the same choice.
pub fn choose(results: &[CandidateResult]) -> Option<usize> {
    results
        .iter()
        .enumerate()
        .filter(|(_, r)| eligible(r))
        .min_by_key(|(_, r)| rank_key(r))
        .map(|(i, _)| i)
}

/// Measures `candidates` with `timer`; `pruned` (already dropped, with a
/// reason) are recorded but never handed to the timer. The default candidate
/// goes first and is always measured; the others in order until the budget
/// is spent. A candidate is timed only after its check passed.
pub fn run_tuning(
    candidates: Vec<Candidate>,
    pruned: Vec<(Candidate, String)>,
    timer: &mut dyn Timer,
    opts: &TuneOptions,
    progress: &mut dyn FnMut(&Progress),
) -> TuneReport {
    let start = Instant::now();
    let mut p = Progress {
        total: candidates.len() + pruned.len(),
        pruned: pruned.len(),
        ..Progress::default()
    };
    progress(&p);
    let mut order: Vec<usize> = (0..candidates.len()).collect();
    // Stable: the default first, the rest in search-space order.
    order.sort_by_key(|&i| !candidates[i].is_default);
    let mut outcomes: Vec<Option<Outcome>> = vec![None; candidates.len()];
    let mut timed = 0;
    for i in order {
        let cand = &candidates[i];
        let over = opts.budget.is_some_and(|b| start.elapsed() >= b);
        let outcome = if over && !cand.is_default {
            Outcome::SkippedBudget
        } else {
            p.current = Some(cand.label.clone());
            progress(&p);
            match timer.check(cand) {
                Err(e) => Outcome::Failed {
                    error: e.to_string(),
                },
                // NaN fails too, hence not just `err > tol`.
                Ok(err) if err.is_nan() || err > opts.tolerance => {
                    Outcome::WrongResult { check_error: err }
                }
                Ok(err) => {
                    timed += 1;
                    match timer.time(cand) {
                        Ok(sample) => Outcome::Timed {
                            sample,
                            check_error: err,
                        },
                        Err(e) => Outcome::Failed {
                            error: e.to_string(),
                        },
                    }
                }
            }
        };
        if let Outcome::Timed { sample, .. } = &outcome {
            if p.best
                .as_ref()
                .is_none_or(|(_, b)| sample.median_ns < b.median_ns)
            {
                p.best = Some((cand.label.clone(), *sample));
            }
        }
        outcomes[i] = Some(outcome);
        p.tried += 1;
        p.current = None;
        progress(&p);
    }
    let mut results: Vec<CandidateResult> = candidates
        .into_iter()
        .zip(outcomes)
        .map(|(candidate, o)| CandidateResult {
            candidate,
            outcome: o.unwrap_or(Outcome::SkippedBudget),
        })
        .collect();
    results.extend(
        pruned
            .into_iter()
            .map(|(candidate, reason)| CandidateResult {
                candidate,
                outcome: Outcome::Pruned { reason },
            }),
    );
    results.sort_by_key(|r| r.candidate.index);
    TuneReport {
        chosen: choose(&results),
        results,
        timed,
        elapsed_s: start.elapsed().as_secs_f64(),
    }
}

/// Seconds, for reports.
pub(crate) fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}
