//! f64 reference gradients: the oracle of every backward pass.
//!
//! `L = sum(o * do)`. For one query row (batch `b`, head `h`, position `i`)
//! the forward's weights `a_j` and output `y` are recomputed, then:
//!
//! ```text
//! softmax  p_j = exp(a_j - lse),  D = do . y,   da_j = p_j (do . v_j - D),  dv_j += p_j do
//! sum      u = do / (l + eps),    D = u . y,    da_j = u . v_j - D,         dv_j += a_j u
//! none                                          da_j = do . v_j,            dv_j += a_j do
//! ```
//!
//! and the chain rule runs back through the weight: `a = t * D(i, j)` (or the
//! filter tap `f[h, i - j]`), `t = transform(s)`, `s = scale * phi(q) .
//! psi(k) + bias`, with table elements read by `bias` / `transform` / a
//! per-head decay receiving scatter-adds ([`mixc_dsl::Leaf`]). The decay's
//! gradient uses the product rule directly, with no division and no
//! logarithm (unlike the CPU backend, which works with cumulative log-gates,
//! so the two are independent): with `A_l = D(i, l)` and
//! `B_1 = dD_0`, `B_(l+1) = gamma_l B_l + dD_l`,
//! `d gamma_l += A_l B_l` for `l = 1..=i`.
//!
//! Rows are independent, so (batch, head) pairs run in parallel, each
//! worker summing into its own accumulators. O(seq) scratch per row; no
//! seq x seq matrix.

use std::collections::BTreeMap;

use mixc_dsl::{Decay, EvalEnv, Expr, Leaf, MixerSpec, Norm, Score};

use super::{check_spec, fill_decay, normalise, row_weights, Row};
use crate::error::Result;
use crate::grad::{differentiable_inputs, reads_qk, validate_upstream, Gradients};
use crate::inputs::validate_inputs;
use crate::tensor::{MixerInputs, Tensor};

/// The gradients of `sum(o * d_o)` with respect to every input, in f64.
pub fn gradients(
    spec: &MixerSpec,
    inputs: &MixerInputs,
    d_o: &Tensor<f32>,
) -> Result<Gradients<f64>> {
    let all: Vec<usize> = (0..spec.kv_heads as usize).collect();
    gradients_for(spec, inputs, d_o, &all, &|_| {})
}

/// The contributions of the query heads of the listed kv heads only (every
/// query head of each group, so `dk` / `dv` of those kv heads are complete;
/// the rest stays 0). `progress` is called with the number of (batch row,
/// query head) pairs done so far, out of `batch * kv_heads.len() * group`.
pub fn gradients_for(
    spec: &MixerSpec,
    inputs: &MixerInputs,
    d_o: &Tensor<f32>,
    kv_heads: &[usize],
    progress: &(dyn Fn(u64) + Sync),
) -> Result<Gradients<f64>> {
    use rayon::prelude::*;
    use std::sync::atomic::{AtomicU64, Ordering};
    check_spec(spec)?;
    validate_inputs(spec, inputs)?;
    validate_upstream(spec, inputs, d_o)?;
    let heads = spec.heads as usize;
    let tasks: Vec<(usize, usize)> = (0..inputs.batch)
        .flat_map(|b| {
            (0..heads)
                .filter(|&h| kv_heads.contains(&(spec.kv_head_of(h as u32) as usize)))
                .map(move |h| (b, h))
        })
        .collect();
    let zeros = || Acc::zeros(spec, inputs);
    let done = AtomicU64::new(0);
    let acc = tasks
        .into_par_iter()
        .fold(zeros, |mut acc, (b, h)| {
            head_gradients(spec, inputs, d_o, b, h, &mut acc);
            progress(done.fetch_add(1, Ordering::Relaxed) + 1);
            acc
        })
        .reduce(zeros, Acc::add);
    let shape = |t: &Tensor<f32>| t.shape.clone();
    let extra = acc
        .extra
        .into_iter()
        .map(|(name, data)| {
            let shape = inputs.extra[&name].shape().to_vec();
            (name, Tensor::new(shape, data))
        })
        .collect();
    Ok(Gradients {
        dq: Tensor::new(shape(&inputs.q), acc.dq),
        dk: Tensor::new(shape(&inputs.k), acc.dk),
        dv: Tensor::new(shape(&inputs.v), acc.dv),
        extra,
    })
}

/// Gradient sums in the layouts of the inputs.
struct Acc {
    dq: Vec<f64>,
    dk: Vec<f64>,
    dv: Vec<f64>,
    extra: BTreeMap<String, Vec<f64>>,
}

impl Acc {
    fn zeros(spec: &MixerSpec, inputs: &MixerInputs) -> Acc {
        Acc {
            dq: vec![0.0; inputs.q.numel()],
            dk: vec![0.0; inputs.k.numel()],
            dv: vec![0.0; inputs.v.numel()],
            extra: differentiable_inputs(spec)
                .into_iter()
                .map(|n| {
                    let len = inputs.extra[&n].shape().iter().product();
                    (n, vec![0.0; len])
                })
                .collect(),
        }
    }
    fn add(mut self, other: Acc) -> Acc {
        let add = |a: &mut Vec<f64>, b: &[f64]| a.iter_mut().zip(b).for_each(|(x, y)| *x += y);
        add(&mut self.dq, &other.dq);
        add(&mut self.dk, &other.dk);
        add(&mut self.dv, &other.dv);
        for (name, g) in other.extra {
            add(self.extra.get_mut(&name).expect("same inputs"), &g);
        }
        self
    }
    /// The scatter-add of a table element's gradient (integer tables have none).
    fn table(&mut self, inputs: &MixerInputs, leaf: Leaf<'_>, g: f64) {
        if let Leaf::Table { input, indices } = leaf {
            if let Some(t) = self.extra.get_mut(input) {
                t[inputs.extra[input].clamped_offset(&indices)] += g;
            }
        }
    }
}

fn env<'a>(
    spec: &MixerSpec,
    inputs: &MixerInputs,
    lookup: &'a dyn Fn(&str, &[i64]) -> f64,
    (b, i, j, h): (usize, usize, usize, usize),
    s: f64,
) -> EvalEnv<'a> {
    let mut env = inputs.eval_env(spec.heads, lookup);
    (env.b, env.i, env.j, env.h, env.s) = (b as i64, i as i64, j as i64, h as i64, s);
    env
}

/// Adds the gradients of every row of (batch `b`, query head `h`) to `acc`.
fn head_gradients(
    spec: &MixerSpec,
    inputs: &MixerInputs,
    d_o: &Tensor<f32>,
    b: usize,
    h: usize,
    acc: &mut Acc,
) {
    let kv_seq = inputs.kv_seq;
    let (dk, dv) = (spec.head_dim as usize, spec.value_dim as usize);
    let kvh = spec.kv_head_of(h as u32) as usize;
    let lookup = |name: &str, idx: &[i64]| inputs.extra[name].get_clamped(idx);
    let (mut weights, mut decay) = (vec![None; kv_seq], vec![1.0f64; kv_seq]);
    // dD(i, j) of the current row, 0 where masked.
    let mut d_decay = vec![0.0f64; kv_seq];
    let (mut y, mut u) = (vec![0.0f64; dv], vec![0.0f64; dv]);
    // d gamma of a per-head decay, summed over the rows.
    let mut d_gamma_head = 0.0;
    let gamma_head = match &spec.decay {
        Decay::PerHead(e) => e.eval_f64(&EvalEnv::for_head(h as i64, spec.heads, &lookup)),
        _ => 1.0,
    };
    let v_row = |j: usize| {
        let o = inputs.v.offset(&[b, j, kvh, 0]);
        &inputs.v.data[o..o + dv]
    };
    for r in 0..inputs.seq {
        let row = Row::new(inputs, b, r);
        let i = row.i;
        fill_decay(spec, inputs, row, h, &mut decay);
        row_weights(spec, inputs, row, h, &decay, &mut weights);
        let lse = normalise(spec.norm, inputs, b, kvh, &weights, &mut y);
        let visible = weights.iter().any(Option::is_some);
        if !visible || (matches!(spec.norm, Norm::Softmax) && lse == f64::NEG_INFINITY) {
            continue; // the row is exactly 0 and has no gradient
        }
        let oo = d_o.offset(&[b, r, h, 0]);
        u.iter_mut()
            .zip(&d_o.data[oo..oo + dv])
            .for_each(|(x, &g)| *x = g as f64);
        if let Norm::Sum { eps } = spec.norm {
            let l: f64 = weights.iter().flatten().sum();
            u.iter_mut().for_each(|x| *x /= l + eps);
        }
        let big_d: f64 = u.iter().zip(&y).map(|(a, b)| a * b).sum();
        d_decay.iter_mut().for_each(|x| *x = 0.0);
        for (j, a) in weights.iter().enumerate() {
            let Some(a) = *a else { continue };
            let vj = v_row(j);
            let dp: f64 = u.iter().zip(vj).map(|(x, &v)| x * v as f64).sum();
            let (p, da) = match spec.norm {
                Norm::Softmax => {
                    let p = (a - lse).exp();
                    (p, p * (dp - big_d))
                }
                Norm::Sum { .. } => (a, dp - big_d),
                Norm::None => (a, dp),
            };
            let vo = inputs.v.offset(&[b, j, kvh, 0]);
            for (g, x) in acc.dv[vo..vo + dv].iter_mut().zip(&u) {
                *g += p * x;
            }
            chain(
                spec,
                inputs,
                &lookup,
                (row, j, h, kvh, dk),
                da,
                &decay,
                &mut d_decay,
                acc,
            );
        }
        // The decay's product rule, division-free (see the module docs).
        let gamma_at = |l: usize| match &spec.decay {
            Decay::Gate { input } => {
                inputs.extra[input].get_clamped(&[b as i64, l as i64, h as i64])
            }
            _ => gamma_head,
        };
        if !matches!(spec.decay, Decay::None) && kv_seq > 0 {
            let mut carry = 0.0; // B_l
            let n = kv_seq;
            for l in 1..=i.min(n - 1) {
                carry = if l == 1 {
                    d_decay[0]
                } else {
                    gamma_at(l - 1) * carry + d_decay[l - 1]
                };
                let d_gamma = decay[l] * carry;
                match &spec.decay {
                    Decay::Gate { input } => {
                        if let Some(t) = acc.extra.get_mut(input.as_str()) {
                            t[inputs.extra[input]
                                .clamped_offset(&[b as i64, l as i64, h as i64])] += d_gamma;
                        }
                    }
                    _ => d_gamma_head += d_gamma,
                }
            }
            if i >= n {
                // Queries past the last key (a per-head decay: gates cover
                // every query position). No key lies at l >= n, so from
                // B_n on each B_l is gamma B_(l-1), and every l in n..=i
                // adds D(i, l) B_l = gamma^(i-n) B_n: in closed form, since
                // i may lie far past the keys.
                let carry_n = if n == 1 {
                    d_decay[0]
                } else {
                    gamma_at(n - 1) * carry + d_decay[n - 1]
                };
                d_gamma_head += (i - n + 1) as f64 * gamma_head.powf((i - n) as f64) * carry_n;
            }
        }
    }
    if let Decay::PerHead(e) = &spec.decay {
        e.backprop(
            &EvalEnv::for_head(h as i64, spec.heads, &lookup),
            d_gamma_head,
            &mut |leaf, g| acc.table(inputs, leaf, g),
        );
    }
}

/// The chain rule from `da = dL/da(i, j)` back to q, k, the filter, the
/// tables of bias / transform, and `dD(i, j)` (left in `d_decay[j]`).
#[allow(clippy::too_many_arguments)]
fn chain(
    spec: &MixerSpec,
    inputs: &MixerInputs,
    lookup: &dyn Fn(&str, &[i64]) -> f64,
    (row, j, h, kvh, dk): (Row, usize, usize, usize, usize),
    da: f64,
    decay: &[f64],
    d_decay: &mut [f64],
    acc: &mut Acc,
) {
    let (b, i) = (row.b, row.i);
    let (q_map, k_map, scale) = match &spec.score {
        Score::Filter { input } => {
            if let Some(t) = acc.extra.get_mut(input.as_str()) {
                t[inputs.extra[input].clamped_offset(&[h as i64, i as i64 - j as i64])] += da;
            }
            return;
        }
        Score::Dot {
            q_map,
            k_map,
            scale,
        } => (*q_map, *k_map, *scale),
    };
    debug_assert!(reads_qk(spec));
    let (qo, ko) = (
        inputs.q.offset(&[b, row.r, h, 0]),
        inputs.k.offset(&[b, j, kvh, 0]),
    );
    let (q, k) = (&inputs.q.data[qo..qo + dk], &inputs.k.data[ko..ko + dk]);
    let dot: f64 = q
        .iter()
        .zip(k)
        .map(|(&x, &y)| q_map.apply(x as f64) * k_map.apply(y as f64))
        .sum();
    let eval = |e: &Expr, s: f64| e.eval_f64(&env(spec, inputs, lookup, (b, i, j, h), s));
    let mut s = scale * dot;
    if let Some(bias) = &spec.bias {
        s += eval(bias, 0.0);
    }
    let t = spec.transform.as_ref().map_or(s, |tr| eval(tr, s));
    let dt = if matches!(spec.decay, Decay::None) {
        da
    } else {
        d_decay[j] = da * t;
        da * decay[j]
    };
    let mut ds = 0.0;
    match &spec.transform {
        Some(tr) => tr.backprop(
            &env(spec, inputs, lookup, (b, i, j, h), s),
            dt,
            &mut |leaf, g| match leaf {
                Leaf::Score => ds += g,
                table => acc.table(inputs, table, g),
            },
        ),
        None => ds = dt,
    }
    if let Some(bias) = &spec.bias {
        bias.backprop(
            &env(spec, inputs, lookup, (b, i, j, h), 0.0),
            ds,
            &mut |leaf, g| acc.table(inputs, leaf, g),
        );
    }
    let g = scale * ds;
    for d in 0..dk {
        let (x, y) = (q[d] as f64, k[d] as f64);
        acc.dq[qo + d] += g * k_map.apply(y) * q_map.derivative(x);
        acc.dk[ko + d] += g * q_map.apply(x) * k_map.derivative(y);
    }
}
