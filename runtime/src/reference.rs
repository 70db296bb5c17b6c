//! The f64 reference evaluator: the oracle every other executor (the CPU
//! backend, the generated CUDA kernels, the ring runtime) is checked against.
//!
//! It is the template of `shared/TEMPLATE.md` written as the obvious loops,
//! one query row at a time: for batch `b`, query head `h` (kv head
//! `spec.kv_head_of(h)`), query `i` and key `j` (global, 0-based):
//!
//! ```text
//! s = scale * sum_d phi(q[b,i,h,d]) * psi(k[b,j,kvh,d]) + bias(i, j, h)
//! t = transform(s, i, j, h)                      (or s)
//! a = t * D(i, j),  D(i, j) = prod_{l=j+1..i} gamma_l   (or 1 without decay)
//! a = f[h, i - j]                                 (convolution family)
//! ```
//!
//! over the keys the mask allows, then normalised (softmax / sum / none).
//!
//! **A query that sees no key outputs exactly 0**, for every norm (softmax
//! would otherwise be 0/0 and sum would be 0/eps); its log-sum-exp is
//! `-inf`. Kernels must do the same.
//!
//! Memory is O(seq) per row besides the output: no seq x seq matrix.

pub mod grad;
pub use grad::{gradients, gradients_for};

use mixc_dsl::{Decay, Expr, MixerSpec, Norm, Score};

use crate::error::{Result, RuntimeError};
use crate::inputs::validate_inputs;
use crate::tensor::{HostElem, MixerInputs, Tensor};

/// The mixer output `[batch, seq, heads, value_dim]` in f64.
pub fn evaluate<E: HostElem>(spec: &MixerSpec, inputs: &MixerInputs<E>) -> Result<Tensor<f64>> {
    let rows: Vec<usize> = (0..inputs.seq).collect();
    Ok(run(spec, inputs, &rows, &all_heads(spec), &|_| {})?.0)
}

fn all_heads(spec: &MixerSpec) -> Vec<usize> {
    (0..spec.heads as usize).collect()
}

/// The output for the listed query positions and query heads only:
/// `[batch, rows.len(), heads.len(), value_dim]`. `progress` is called with
/// the number of (batch row, position) rows finished so far (from worker
/// threads, in no particular order of calls), out of `batch * rows.len()`.
pub fn evaluate_sample<E: HostElem>(
    spec: &MixerSpec,
    inputs: &MixerInputs<E>,
    rows: &[usize],
    heads: &[usize],
    progress: &(dyn Fn(u64) + Sync),
) -> Result<Tensor<f64>> {
    Ok(run(spec, inputs, rows, heads, progress)?.0)
}

/// The output for the listed query positions only:
/// `[batch, rows.len(), heads, value_dim]`, row `r` being position `rows[r]`.
/// Lets tests check long sequences on a sample of rows at O(rows * seq) cost.
pub fn evaluate_rows<E: HostElem>(
    spec: &MixerSpec,
    inputs: &MixerInputs<E>,
    rows: &[usize],
) -> Result<Tensor<f64>> {
    Ok(run(spec, inputs, rows, &all_heads(spec), &|_| {})?.0)
}

/// The output and, for softmax mixers, the natural-log log-sum-exp of each
/// row's weights, `lse[b, i, h] = m + ln(sum_j exp(a_ij - m))`, shape
/// `[batch, seq, heads]` (`-inf` for a row with no visible key). This is the
/// statistic kernels emit so partial results can be merged later.
pub fn evaluate_with_lse<E: HostElem>(
    spec: &MixerSpec,
    inputs: &MixerInputs<E>,
) -> Result<(Tensor<f64>, Tensor<f64>)> {
    if !matches!(spec.norm, Norm::Softmax) {
        return Err(RuntimeError::Invalid(format!(
            "mixer `{}` does not use softmax normalisation, so it has no log-sum-exp",
            spec.name
        )));
    }
    let rows: Vec<usize> = (0..inputs.seq).collect();
    run(spec, inputs, &rows, &all_heads(spec), &|_| {})
}

/// Checks the reference's own preconditions, which validation guarantees for
/// parsed specs but hand-built `MixerSpec` values may break; failing here
/// beats indexing out of range later.
fn check_spec(spec: &MixerSpec) -> Result<()> {
    Ok(spec.check_invariants()?)
}

/// Evaluates the listed rows and heads; returns (output, lse). The lse is
/// only meaningful for softmax and is left 0 otherwise. Rows are independent,
/// so they are spread over worker threads; each row is the plain loops.
fn run<E: HostElem>(
    spec: &MixerSpec,
    inputs: &MixerInputs<E>,
    rows: &[usize],
    heads: &[usize],
    progress: &(dyn Fn(u64) + Sync),
) -> Result<(Tensor<f64>, Tensor<f64>)> {
    use rayon::prelude::*;
    use std::sync::atomic::{AtomicU64, Ordering};
    check_spec(spec)?;
    validate_inputs(spec, inputs)?;
    if let Some(&r) = rows.iter().find(|&&r| r >= inputs.seq) {
        return Err(RuntimeError::Invalid(format!(
            "row {r} requested but the sequence has {} positions",
            inputs.seq
        )));
    }
    if let Some(&h) = heads.iter().find(|&&h| h >= spec.heads as usize) {
        return Err(RuntimeError::Invalid(format!(
            "head {h} requested but mixer `{}` has {} heads",
            spec.name, spec.heads
        )));
    }
    let (batch, kv_seq) = (inputs.batch, inputs.kv_seq);
    let (nh, dv) = (heads.len(), spec.value_dim as usize);
    let mut out = Tensor::<f64>::zeros(&[batch, rows.len(), nh, dv]);
    let mut lse = Tensor::<f64>::zeros(&[batch, rows.len(), nh]);
    if out.data.is_empty() {
        return Ok((out, lse));
    }
    let done = AtomicU64::new(0);
    out.data
        .par_chunks_mut(nh * dv)
        .zip(lse.data.par_chunks_mut(nh))
        .enumerate()
        .for_each_init(
            // Per-thread scratch, O(kv_seq): the weight of each key (None =
            // masked out) and the decay D(i, j).
            || (vec![None; kv_seq], vec![1.0f64; kv_seq]),
            |(weights, decay), (x, (out_row, lse_row))| {
                let (b, r) = (x / rows.len(), rows[x % rows.len()]);
                let row = Row::new(inputs, b, r);
                for (hi, &h) in heads.iter().enumerate() {
                    let kvh = spec.kv_head_of(h as u32) as usize;
                    fill_decay(spec, inputs, row, h, decay);
                    row_weights(spec, inputs, row, h, decay, weights);
                    let y = &mut out_row[hi * dv..(hi + 1) * dv];
                    lse_row[hi] = normalise(spec.norm, inputs, b, kvh, weights, y);
                }
                progress(done.fetch_add(1, Ordering::Relaxed) + 1);
            },
        );
    Ok((out, lse))
}

/// One query row: batch row `b`, query index `r` (its row of q and of the
/// output) at position `i = r + q_offset`.
#[derive(Clone, Copy)]
struct Row {
    b: usize,
    r: usize,
    i: usize,
}

impl Row {
    fn new<E: HostElem>(inputs: &MixerInputs<E>, b: usize, r: usize) -> Row {
        Row {
            b,
            r,
            i: r + inputs.q_offset,
        }
    }
}

/// `decay[j] = D(i, j) = prod_{l=j+1..i} gamma_l` for the keys `j <= i`,
/// built from the last such key downwards so each entry costs one multiply.
/// Entries `j > i` are unused (decay requires a causal mask).
fn fill_decay<E: HostElem>(
    spec: &MixerSpec,
    inputs: &MixerInputs<E>,
    row: Row,
    h: usize,
    decay: &mut [f64],
) {
    let (b, i) = (row.b, row.i);
    let head_gamma = match &spec.decay {
        Decay::PerHead(e) => Some(eval_expr(spec, inputs, e, (0, 0, 0, h), 0.0)),
        _ => None,
    };
    let gamma_at: Box<dyn Fn(usize) -> f64 + '_> = match (&spec.decay, head_gamma) {
        (Decay::None, _) => return,
        (Decay::PerHead(_), g) => {
            let g = g.unwrap_or(1.0);
            Box::new(move |_| g)
        }
        (Decay::Gate { input }, _) => {
            let gates = &inputs.extra[input];
            Box::new(move |l| gates.get_clamped(&[b as i64, l as i64, h as i64]))
        }
    };
    let Some(last) = decay.len().checked_sub(1).map(|n| n.min(i)) else {
        return;
    };
    // D(i, last): gates are validated to cover every query position; a
    // per-head decay reads no position, so `i` may lie far past the keys
    // (a power, not a product over the positions between).
    decay[last] = match head_gamma {
        Some(g) => g.powf((i - last) as f64),
        None => (last + 1..=i).map(&gamma_at).product(),
    };
    for j in (0..last).rev() {
        decay[j] = decay[j + 1] * gamma_at(j + 1);
    }
}

/// Evaluates a scalar expression at (i, j, h) with score `s`; tables are
/// read with the language's clamped indexing.
fn eval_expr<E: HostElem>(
    spec: &MixerSpec,
    inputs: &MixerInputs<E>,
    e: &Expr,
    (b, i, j, h): (usize, usize, usize, usize),
    s: f64,
) -> f64 {
    // check_spec guarantees every name read is a declared (hence present) input.
    let lookup = |name: &str, idx: &[i64]| inputs.extra[name].get_clamped(idx);
    let mut env = inputs.eval_env(spec.heads, &lookup);
    (env.b, env.i, env.j, env.h, env.s) = (b as i64, i as i64, j as i64, h as i64, s);
    e.eval_f64(&env)
}

/// The weight `a(i, j)` of every key for one query row, `None` where the mask
/// hides the key.
fn row_weights<E: HostElem>(
    spec: &MixerSpec,
    inputs: &MixerInputs<E>,
    row: Row,
    h: usize,
    decay: &[f64],
    weights: &mut [Option<f64>],
) {
    let (b, i) = (row.b, row.i);
    let seg = |name: &str, pos: i64| inputs.extra[name].get_clamped(&[b as i64, pos]) as i64;
    let lookup = |name: &str, idx: &[i64]| inputs.extra[name].get_clamped(idx);
    let mut at = inputs.eval_env(spec.heads, &lookup);
    (at.b, at.i, at.h) = (b as i64, i as i64, h as i64);
    let kvh = spec.kv_head_of(h as u32) as usize;
    let dk = spec.head_dim as usize;
    for (j, w) in weights.iter_mut().enumerate() {
        *w = None;
        at.j = j as i64;
        if !spec.mask.allows(&at, &seg) {
            continue;
        }
        let a = match &spec.score {
            Score::Filter { input } => {
                inputs.extra[input].get_clamped(&[h as i64, i as i64 - j as i64])
            }
            Score::Dot {
                q_map,
                k_map,
                scale,
            } => {
                let qo = inputs.q.offset(&[b, row.r, h, 0]);
                let ko = inputs.k.offset(&[b, j, kvh, 0]);
                let dot: f64 = (0..dk)
                    .map(|d| {
                        q_map.apply(inputs.q.data[qo + d].to_f64())
                            * k_map.apply(inputs.k.data[ko + d].to_f64())
                    })
                    .sum();
                let mut s = scale * dot;
                if let Some(bias) = &spec.bias {
                    s += eval_expr(spec, inputs, bias, (b, i, j, h), 0.0);
                }
                let t = match &spec.transform {
                    Some(tr) => eval_expr(spec, inputs, tr, (b, i, j, h), s),
                    None => s,
                };
                match spec.decay {
                    Decay::None => t,
                    _ => t * decay[j],
                }
            }
        };
        *w = Some(a);
    }
}

/// Normalises one row into `y` (length value_dim); returns the row's
/// log-sum-exp for softmax (0 for the other norms).
fn normalise<E: HostElem>(
    norm: Norm,
    inputs: &MixerInputs<E>,
    b: usize,
    kvh: usize,
    weights: &[Option<f64>],
    y: &mut [f64],
) -> f64 {
    y.iter_mut().for_each(|x| *x = 0.0);
    let dv = y.len();
    let v_row = |j: usize| {
        let o = inputs.v.offset(&[b, j, kvh, 0]);
        &inputs.v.data[o..o + dv]
    };
    let allowed = || {
        weights
            .iter()
            .enumerate()
            .filter_map(|(j, w)| w.map(|a| (j, a)))
    };
    // Weighted sum of values with per-key weights `f(a)`; returns sum of f(a).
    let mut accumulate = |f: &dyn Fn(f64) -> f64| {
        let mut total = 0.0;
        for (j, a) in allowed() {
            let w = f(a);
            total += w;
            for (yd, &vd) in y.iter_mut().zip(v_row(j)) {
                *yd += w * vd.to_f64();
            }
        }
        total
    };
    match norm {
        Norm::Softmax => {
            let m = allowed().map(|(_, a)| a).fold(f64::NEG_INFINITY, f64::max);
            // No visible key (or every weight -inf): output 0, lse -inf.
            if m == f64::NEG_INFINITY {
                return f64::NEG_INFINITY;
            }
            let l = accumulate(&|a| (a - m).exp());
            y.iter_mut().for_each(|x| *x /= l);
            m + l.ln()
        }
        Norm::Sum { eps } => {
            if allowed().next().is_none() {
                return 0.0;
            }
            let l = accumulate(&|a| a);
            y.iter_mut().for_each(|x| *x /= l + eps);
            0.0
        }
        Norm::None => {
            accumulate(&|a| a);
            0.0
        }
    }
}

/// Accepted `max |out - ref| / max |ref|` of a backend computing with
/// `compute` inputs, against this reference on the same (rounded) inputs:
/// f32 accumulation throughout, but f16/bf16 kernels round the softmax
/// probabilities (and partial outputs) before the P·V tensor-core product.
/// Used by `mixc run --check`, the autotuner's candidate check and the GPU tests.
pub fn check_tolerance(compute: mixc_dsl::DType) -> f64 {
    match compute {
        mixc_dsl::DType::F32 => 2e-4,
        mixc_dsl::DType::F16 => 2e-3,
        mixc_dsl::DType::Bf16 => 1e-2,
    }
}
