//! Comparing a backend's output with the f64 reference.
//!
//! The reference is quadratic and in f64, so on a model-sized run it costs
//! far more than the mixer it checks. [`CheckPlan::sample`] picks what a
//! check compares by default:
//! - **rows**: all positions up to [`SAMPLE_ROWS`]; beyond that
//!   [`SAMPLE_ROWS`] positions: the first and the last, the first and last
//!   position of every range a ring rank owns (where shards meet and ring
//!   merges matter), and the rest evenly spread;
//! - **heads**: all heads up to [`SAMPLE_HEADS`]; beyond that
//!   [`SAMPLE_HEADS`] evenly spread heads, the first and the last included;
//! - **batch rows**: all of them.
//!
//! [`CheckPlan::full`] compares everything.

use mixc_dsl::{DType, MixerSpec};
use serde::Serialize;

use crate::error::{Result, RuntimeError};
use crate::reference;
use crate::ring::RingSchedule;
use crate::tensor::{MixerInputs, Tensor};

/// Positions a sampled check compares (when the sequence is longer).
pub const SAMPLE_ROWS: usize = 256;
/// Query heads a sampled check compares (when the mixer has more).
pub const SAMPLE_HEADS: usize = 4;

/// Which part of an output a check compares.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct CheckPlan {
    /// Query positions, ascending.
    pub rows: Vec<usize>,
    /// Query heads, ascending.
    pub heads: Vec<usize>,
    /// Positions and heads of the output, for [`CheckPlan::describe`].
    pub seq: usize,
    pub total_heads: usize,
}

impl CheckPlan {
    /// Every position and head.
    pub fn full(spec: &MixerSpec, seq: usize) -> CheckPlan {
        CheckPlan {
            rows: (0..seq).collect(),
            heads: (0..spec.heads as usize).collect(),
            seq,
            total_heads: spec.heads as usize,
        }
    }

    /// The documented sample (module docs); `ring` adds the positions where
    /// ranks' shards begin and end.
    pub fn sample(spec: &MixerSpec, seq: usize, ring: Option<&RingSchedule>) -> CheckPlan {
        let heads_total = spec.heads as usize;
        let rows = if seq <= SAMPLE_ROWS {
            (0..seq).collect()
        } else {
            let mut rows = vec![0, seq - 1];
            if let Some(ring) = ring {
                for (range, _) in ring.ranges_in_order() {
                    if !range.is_empty() {
                        rows.extend([range.start, range.end - 1]);
                    }
                }
            }
            rows.sort_unstable();
            rows.dedup();
            // Fill up to SAMPLE_ROWS with evenly spread positions (a second
            // pass fills what collisions with the fixed rows left over).
            let spare = SAMPLE_ROWS.saturating_sub(rows.len());
            rows.extend((1..=spare).map(|k| k * (seq - 1) / (spare + 1)));
            rows.sort_unstable();
            rows.dedup();
            let taken: std::collections::BTreeSet<usize> = rows.iter().copied().collect();
            let missing = SAMPLE_ROWS.saturating_sub(rows.len());
            let stride = (seq / SAMPLE_ROWS).max(1);
            rows.extend(
                (stride / 2..seq)
                    .step_by(stride)
                    .chain(0..seq)
                    .filter(|x| !taken.contains(x))
                    .scan(std::collections::BTreeSet::new(), |seen, x| {
                        Some(seen.insert(x).then_some(x))
                    })
                    .flatten()
                    .take(missing),
            );
            rows.sort_unstable();
            rows
        };
        CheckPlan {
            rows,
            heads: spread(heads_total, SAMPLE_HEADS),
            seq,
            total_heads: heads_total,
        }
    }

    /// Whether the plan compares every position and head.
    pub fn is_full(&self) -> bool {
        self.rows.len() == self.seq && self.heads.len() == self.total_heads
    }

    /// One line: what is compared, e.g. `256 of 4096 positions (first, last,
    /// rank boundaries, evenly spread) x 4 of 32 heads (0, 10, 21, 31)`.
    pub fn describe(&self) -> String {
        if self.is_full() {
            return format!(
                "all {} positions x all {} heads",
                self.seq, self.total_heads
            );
        }
        let rows = if self.rows.len() == self.seq {
            format!("all {} positions", self.seq)
        } else {
            format!(
                "{} of {} positions (first, last, rank boundaries, evenly spread)",
                self.rows.len(),
                self.seq
            )
        };
        let heads = if self.heads.len() == self.total_heads {
            format!("all {} heads", self.total_heads)
        } else {
            let list: Vec<String> = self.heads.iter().map(usize::to_string).collect();
            format!(
                "{} of {} heads ({})",
                self.heads.len(),
                self.total_heads,
                list.join(", ")
            )
        };
        format!("{rows} x {heads}")
    }
}

/// `k` evenly spread indices of `0..n`, both ends included (all when n <= k).
fn spread(n: usize, k: usize) -> Vec<usize> {
    if n <= k.max(2) {
        return (0..n).collect();
    }
    let mut v: Vec<usize> = (0..k).map(|x| x * (n - 1) / (k - 1)).collect();
    v.dedup();
    v
}

/// What [`compare`] found.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct CheckReport {
    /// `max |out - ref| / max |ref|` over the compared part (NaN if the
    /// output holds a NaN there).
    pub max_rel_error: f64,
    /// The accepted error for the compute type ([`reference::check_tolerance`]).
    pub tolerance: f64,
    /// What was compared ([`CheckPlan::describe`]).
    pub compared: String,
    pub full: bool,
}

impl CheckReport {
    /// Within tolerance (a NaN error fails).
    pub fn passed(&self) -> bool {
        self.max_rel_error <= self.tolerance
    }
}

/// Compares `output` (`[batch, seq, heads, value_dim]`) with the reference
/// on the rows and heads of `plan`; `compute` is the type the backend
/// computed in (its tolerance applies). `progress(done, total)` is called as
/// reference rows finish.
pub fn compare(
    spec: &MixerSpec,
    inputs: &MixerInputs,
    output: &Tensor<f32>,
    plan: &CheckPlan,
    compute: DType,
    progress: &(dyn Fn(u64, u64) + Sync),
) -> Result<CheckReport> {
    let (b, seq) = (inputs.batch, inputs.seq);
    let (h, dv) = (spec.heads as usize, spec.value_dim as usize);
    let want_shape = [b, seq, h, dv];
    if output.shape != want_shape {
        return Err(RuntimeError::BadInput {
            name: "o".into(),
            problem: format!(
                "output shape {:?} but the inputs give [batch, seq, heads, value_dim] = {:?}",
                output.shape, want_shape
            ),
        });
    }
    let total = (b * plan.rows.len()) as u64;
    let want = reference::evaluate_sample(spec, inputs, &plan.rows, &plan.heads, &|done| {
        progress(done, total)
    })?;
    let nh = plan.heads.len();
    let mut max_err = 0f64;
    let mut max_ref = 0f64;
    for bi in 0..b {
        for (ri, &row) in plan.rows.iter().enumerate() {
            for (hi, &head) in plan.heads.iter().enumerate() {
                for c in 0..dv {
                    let got = output.data[((bi * seq + row) * h + head) * dv + c] as f64;
                    let w = want.data[((bi * plan.rows.len() + ri) * nh + hi) * dv + c];
                    // NaN in the output must surface, so no f64::max here.
                    let err = (got - w).abs();
                    if err.is_nan() || err > max_err {
                        max_err = err;
                    }
                    max_ref = max_ref.max(w.abs());
                }
            }
        }
    }
    Ok(CheckReport {
        max_rel_error: if max_ref > 0.0 {
            max_err / max_ref
        } else {
            max_err
        },
        tolerance: reference::check_tolerance(compute),
        compared: plan.describe(),
        full: plan.is_full(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ring::Sharding;

    fn spec(heads: u32) -> MixerSpec {
        mixc_dsl::parse_str(&format!(
            "mixer m {{ heads = {heads}; head_dim = 8; mask = causal; }}"
        ))
        .unwrap()
    }

    #[test]
    fn sample_keeps_ends_and_rank_boundaries() {
        let s = spec(32);
        let ring = RingSchedule::new(4096, 4, Sharding::Zigzag).unwrap();
        let p = CheckPlan::sample(&s, 4096, Some(&ring));
        assert_eq!(p.rows.len(), SAMPLE_ROWS);
        assert!(p.rows.contains(&0) && p.rows.contains(&4095));
        for (r, _) in ring.ranges_in_order() {
            assert!(
                p.rows.contains(&r.start) && p.rows.contains(&(r.end - 1)),
                "{r:?}"
            );
        }
        assert!(p.rows.windows(2).all(|w| w[0] < w[1]));
        assert_eq!(p.heads, vec![0, 10, 20, 31]);
        assert!(!p.is_full());
        assert!(p.describe().contains("4 of 32 heads"), "{}", p.describe());
    }

    #[test]
    fn small_runs_are_checked_whole() {
        let s = spec(2);
        let p = CheckPlan::sample(&s, 100, None);
        assert!(p.is_full());
        assert_eq!(p, CheckPlan::full(&s, 100));
        assert_eq!(spread(3, 4), vec![0, 1, 2]);
        assert_eq!(spread(1, 4), vec![0]);
    }
}
