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
use crate::tensor::{HostElem, MixerInputs, Tensor};

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
    /// Compared output values that are NaN or infinite (a check with any
    /// fails, whatever the reference says).
    pub non_finite: u64,
}

impl CheckReport {
    /// Within tolerance, and every compared value finite (a NaN error fails).
    pub fn passed(&self) -> bool {
        self.non_finite == 0 && self.max_rel_error <= self.tolerance
    }
}

/// Compares `output` (`[batch, seq, heads, value_dim]`) with the reference
/// on the rows and heads of `plan`; `compute` is the type the backend
/// computed in (its tolerance applies). `progress(done, total)` is called as
/// reference rows finish.
pub fn compare<E: HostElem>(
    spec: &MixerSpec,
    inputs: &MixerInputs<E>,
    output: &Tensor<E>,
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
    let mut non_finite = 0u64;
    for bi in 0..b {
        for (ri, &row) in plan.rows.iter().enumerate() {
            for (hi, &head) in plan.heads.iter().enumerate() {
                for c in 0..dv {
                    let got = output.data[((bi * seq + row) * h + head) * dv + c].to_f64();
                    non_finite += u64::from(!got.is_finite());
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
        // A 16-bit output is rounded once more than the computation.
        tolerance: reference::check_tolerance(compute).max(reference::check_tolerance(E::DTYPE)),
        compared: plan.describe(),
        full: plan.is_full(),
        non_finite,
    })
}

/// Accepted `max |grad - ref| / max |ref|`, per gradient, of a backward
/// pass computing with `compute` inputs against the f64 reference gradients
/// on the same inputs. Looser than the forward's
/// ([`reference::check_tolerance`]): the backward recomputes the weights,
/// forms `D = do . o` from the rounded output and sums over every query a
/// key meets.
pub fn grad_tolerance(compute: DType) -> f64 {
    match compute {
        DType::F32 => 5e-4,
        DType::F16 => 1e-2,
        DType::Bf16 => 5e-2,
    }
}

/// Which kv heads a gradient check compares: all of them up to
/// [`SAMPLE_HEADS`] query heads, else evenly spread kv heads (first and
/// last included) whose query heads number about [`SAMPLE_HEADS`]. A kv
/// head is compared whole: its `dk` / `dv` sum over every query head of its
/// group, so every such query head's reference gradient is computed (over
/// all positions: a key's gradient sums over every query that sees it).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct GradCheckPlan {
    pub kv_heads: Vec<usize>,
    pub total_kv_heads: usize,
    pub total_heads: usize,
}

impl GradCheckPlan {
    pub fn full(spec: &MixerSpec) -> GradCheckPlan {
        GradCheckPlan {
            kv_heads: (0..spec.kv_heads as usize).collect(),
            total_kv_heads: spec.kv_heads as usize,
            total_heads: spec.heads as usize,
        }
    }
    pub fn sample(spec: &MixerSpec) -> GradCheckPlan {
        let group = spec.group_size().max(1) as usize;
        let kv = spec.kv_heads as usize;
        GradCheckPlan {
            kv_heads: spread(kv, SAMPLE_HEADS.div_ceil(group).max(2)),
            ..GradCheckPlan::full(spec)
        }
    }
    pub fn is_full(&self) -> bool {
        self.kv_heads.len() == self.total_kv_heads
    }
    /// One line: what is compared.
    pub fn describe(&self) -> String {
        if self.is_full() {
            return format!("all positions x all {} heads", self.total_heads);
        }
        let list: Vec<String> = self.kv_heads.iter().map(usize::to_string).collect();
        let group = self.total_heads / self.total_kv_heads.max(1);
        format!(
            "all positions x {} of {} kv heads ({}) with their {} query heads",
            self.kv_heads.len(),
            self.total_kv_heads,
            list.join(", "),
            self.kv_heads.len() * group
        )
    }
}

/// What [`compare_gradients`] found.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct GradCheckReport {
    /// Per gradient (`dq`, `dk`, `dv`, `d<input>`): `max |got - ref| / max |ref|`
    /// over the compared heads (the denominator floored at 1e-3 of the
    /// largest reference gradient, see [`compare_gradients`]).
    pub errors: Vec<(String, f64)>,
    /// Gradients a sampled check leaves out (inputs with no head axis, which
    /// every head contributes to).
    pub skipped: Vec<String>,
    pub tolerance: f64,
    pub compared: String,
    pub full: bool,
}

impl GradCheckReport {
    /// Every compared gradient within tolerance (a NaN fails).
    pub fn passed(&self) -> bool {
        self.errors.iter().all(|(_, e)| *e <= self.tolerance)
    }
    /// The largest error (NaN if any is NaN).
    pub fn max_rel_error(&self) -> f64 {
        self.errors.iter().fold(0f64, |m, (_, e)| {
            if e.is_nan() || m.is_nan() {
                f64::NAN
            } else {
                m.max(*e)
            }
        })
    }
}

/// Compares `grads` (a backend's gradients of `sum(o * d_o)`) with the f64
/// reference on the kv heads of `plan`. `progress(done, total)` reports
/// reference (batch row, head) pairs.
pub fn compare_gradients(
    spec: &MixerSpec,
    inputs: &MixerInputs,
    d_o: &Tensor<f32>,
    grads: &crate::grad::Gradients<f32>,
    plan: &GradCheckPlan,
    compute: DType,
    progress: &(dyn Fn(u64, u64) + Sync),
) -> Result<GradCheckReport> {
    let group = spec.group_size().max(1) as usize;
    let total = (inputs.batch * plan.kv_heads.len() * group) as u64;
    let want =
        reference::gradients_for(spec, inputs, d_o, &plan.kv_heads, &|d| progress(d, total))?;
    compare_gradients_with(spec, &want, grads, plan, compute)
}

/// [`compare_gradients`] against reference gradients computed already
/// (`reference::gradients_for` on the plan's kv heads), e.g. once for many
/// candidates of a tuning session.
pub fn compare_gradients_with(
    spec: &MixerSpec,
    want: &crate::grad::Gradients<f64>,
    grads: &crate::grad::Gradients<f32>,
    plan: &GradCheckPlan,
    compute: DType,
) -> Result<GradCheckReport> {
    let group = spec.group_size().max(1) as usize;
    let q_heads: Vec<usize> = (0..spec.heads as usize)
        .filter(|&h| plan.kv_heads.contains(&(h / group)))
        .collect();
    let got_named = grads.named();
    // Each error is relative to the gradient's max |ref|, floored at
    // FLOOR x the largest of any gradient: a gradient that nearly cancels
    // (one key under sum normalisation: da = u.v eps / (l + eps)) is then
    // all rounding of `o`, and judging it on its own scale would fail every
    // backend.
    const FLOOR: f64 = 1e-3;
    let overall = want
        .named()
        .iter()
        .flat_map(|(_, t)| t.data.iter())
        .fold(0f64, |m, x| m.max(x.abs()));
    let mut errors = Vec::new();
    let mut skipped = Vec::new();
    for (name, w) in want.named() {
        let Some((_, g)) = got_named.iter().find(|(n, _)| *n == name) else {
            return Err(RuntimeError::Internal(format!(
                "gradient `{name}` is missing"
            )));
        };
        if g.shape != w.shape {
            return Err(RuntimeError::Internal(format!(
                "gradient `{name}` has shape {:?}, the reference {:?}",
                g.shape, w.shape
            )));
        }
        // The head axis of this gradient and the heads compared on it.
        let axis: Option<(usize, &[usize])> = match name.as_str() {
            "dq" => Some((2, &q_heads)),
            "dk" | "dv" => Some((2, &plan.kv_heads)),
            _ => spec.input(&name[1..]).and_then(|decl| {
                decl.dims.iter().enumerate().find_map(|(a, d)| match d {
                    mixc_dsl::Dim::Heads => Some((a, &q_heads[..])),
                    mixc_dsl::Dim::KvHeads => Some((a, &plan.kv_heads[..])),
                    _ => None,
                })
            }),
        };
        if axis.is_none() && !plan.is_full() {
            skipped.push(name);
            continue;
        }
        let keep = |e: usize| match axis {
            None => true,
            Some((a, heads)) => {
                let stride: usize = w.shape[a + 1..].iter().product();
                heads.contains(&((e / stride) % w.shape[a]))
            }
        };
        let (mut err, mut scale) = (0f64, 0f64);
        for (e, (&a, &b)) in g.data.iter().zip(&w.data).enumerate() {
            if !keep(e) {
                continue;
            }
            let d = (a as f64 - b).abs();
            if d.is_nan() || d > err {
                err = d;
            }
            scale = scale.max(b.abs());
        }
        let scale = scale.max(FLOOR * overall);
        errors.push((name, if scale > 0.0 { err / scale } else { err }));
    }
    Ok(GradCheckReport {
        errors,
        skipped,
        tolerance: grad_tolerance(compute),
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

#[cfg(test)]
mod non_finite_tests {
    use super::*;

    /// An output holding NaN or infinity fails the check and says how many,
    /// even where the relative error would not show it.
    #[test]
    fn nan_and_inf_outputs_fail_and_are_counted() {
        let spec =
            mixc_dsl::parse_str("mixer m { heads = 2; head_dim = 8; dtype = f32; mask = causal; }")
                .unwrap();
        let x = crate::inputs::random_inputs(&spec, 1, 20, 1);
        let want = reference::evaluate(&spec, &x).unwrap();
        let good = Tensor::new(
            want.shape.clone(),
            want.data.iter().map(|&v| v as f32).collect(),
        );
        let plan = CheckPlan::full(&spec, 20);
        let r = compare(&spec, &x, &good, &plan, DType::F32, &|_, _| {}).unwrap();
        assert!(r.passed() && r.non_finite == 0, "{r:?}");
        let mut bad = good.clone();
        bad.data[3] = f32::NAN;
        bad.data[7] = f32::INFINITY;
        let r = compare(&spec, &x, &bad, &plan, DType::F32, &|_, _| {}).unwrap();
        assert_eq!(r.non_finite, 2);
        assert!(!r.passed());
    }
}
