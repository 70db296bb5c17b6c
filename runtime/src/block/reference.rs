//! The f64 reference of a transformer block: every stage over the whole
//! sequence at once (the unfused block, `L x d_ff` hidden and all), the
//! mixer by the f64 reference evaluator, matrix products as plain loops.
//! Its gradients are the chain rule through those stages, written out, with
//! the mixer's from [`crate::reference::gradients`]; tests check them
//! against finite differences of [`forward`].
//!
//! The mixer's inputs (q, k, v after the projections and rotary embedding)
//! and its upstream gradient pass through f32 on the way in and out of the
//! mixer reference, which reads f32 tensors: a relative rounding of ~6e-8,
//! far below every tolerance the block is checked at.

use std::collections::BTreeMap;

use mixc_dsl::{FfnKind, NormKind};
use rayon::prelude::*;

use super::ops::{activate, activate_backward, rope_angles, rope_row, NormParams};
use super::{validate, validate_upstream, BlockGradients, BlockInputs, BlockWeights};
use crate::error::Result;
use crate::tensor::{MixerInputs, Tensor};
use mixc_dsl::block::weight;
use mixc_dsl::BlockSpec;

/// `y [n, m] = x [n, k] · wᵀ` with `w [m, k]` (a projection).
fn proj(x: &[f64], k: usize, w: &[f64], m: usize) -> Vec<f64> {
    let mut y = vec![0.0; x.len() / k.max(1) * m];
    y.par_chunks_mut(m.max(1))
        .zip(x.par_chunks(k.max(1)))
        .for_each(|(yr, xr)| {
            for (o, wr) in yr.iter_mut().zip(w.chunks(k.max(1))) {
                *o = xr.iter().zip(wr).map(|(a, b)| a * b).sum();
            }
        });
    y
}

/// `y [n, k] = g [n, m] · w` with `w [m, k]` (a projection's input gradient).
fn proj_back(g: &[f64], m: usize, w: &[f64], k: usize) -> Vec<f64> {
    let mut y = vec![0.0; g.len() / m.max(1) * k];
    y.par_chunks_mut(k.max(1))
        .zip(g.par_chunks(m.max(1)))
        .for_each(|(yr, gr)| {
            for (&gv, wr) in gr.iter().zip(w.chunks(k.max(1))) {
                for (o, &wv) in yr.iter_mut().zip(wr) {
                    *o += gv * wv;
                }
            }
        });
    y
}

/// `dw [m, k] = g [n, m]ᵀ · x [n, k]` (a projection's weight gradient).
fn proj_weight(g: &[f64], m: usize, x: &[f64], k: usize) -> Vec<f64> {
    let mut dw = vec![0.0; m * k];
    dw.par_chunks_mut(k.max(1))
        .enumerate()
        .for_each(|(o, row)| {
            for (gr, xr) in g.chunks(m.max(1)).zip(x.chunks(k.max(1))) {
                let gv = gr[o];
                for (d, &xv) in row.iter_mut().zip(xr) {
                    *d += gv * xv;
                }
            }
        });
    dw
}

fn widen(t: &[f32]) -> Vec<f64> {
    t.iter().map(|&x| x as f64).collect()
}

/// The weights in f64, by name.
struct Weights(BTreeMap<String, Vec<f64>>);

impl Weights {
    fn new(w: &BlockWeights) -> Weights {
        Weights(
            w.tensors
                .iter()
                .map(|(n, t)| (n.clone(), widen(&t.data)))
                .collect(),
        )
    }
    fn get(&self, name: &str) -> &[f64] {
        &self.0[name]
    }
    fn opt(&self, name: &str) -> Option<&[f64]> {
        self.0.get(name).map(|v| v.as_slice())
    }
}

/// Every intermediate of the forward, `[batch * seq, ...]` row-major.
struct Forward {
    h1: Vec<f64>,
    mixer_inputs: MixerInputs,
    o: Vec<f64>,
    y: Vec<f64>,
    z: Vec<f64>,
    u: Vec<f64>,
    up: Vec<f64>,
    a: Vec<f64>,
    out: Vec<f64>,
}

fn norm_rows(p: &NormParams<'_, f64>, x: &[f64], w: usize) -> Vec<f64> {
    let mut out = vec![0.0; x.len()];
    for (o, r) in out.chunks_mut(w).zip(x.chunks(w)) {
        p.forward(r, o);
    }
    out
}

/// Applies the rotary embedding (or its inverse) to `[n, heads * d]` rows,
/// row `r` at position `r % seq`.
fn rope_rows(spec: &BlockSpec, t: &mut [f64], row_len: usize, seq: usize, inverse: bool) {
    let Some(rope) = spec.rope else { return };
    let d = spec.mixer.head_dim as usize;
    let mut cs = Vec::new();
    for (r, row) in t.chunks_mut(row_len).enumerate() {
        rope_angles(rope.base, d, r % seq, &mut cs);
        rope_row(row, d, &cs, inverse);
    }
}

fn narrow(shape: Vec<usize>, x: &[f64]) -> Tensor<f32> {
    Tensor::new(shape, x.iter().map(|&v| v as f32).collect())
}

fn run_forward(spec: &BlockSpec, inputs: &BlockInputs, w: &Weights) -> Result<Forward> {
    let m = &spec.mixer;
    let (b, l, width) = (inputs.batch, inputs.seq, spec.width as usize);
    let (h, kvh) = (m.heads as usize, m.kv_heads as usize);
    let (dk, dv, f) = (
        m.head_dim as usize,
        m.value_dim as usize,
        spec.ffn.hidden as usize,
    );
    let x = widen(&inputs.x.data);
    let n1 = NormParams::new(&spec.norm, w.get(weight::NORM1), w.opt(weight::NORM1_BIAS));
    let h1 = norm_rows(&n1, &x, width);
    let mut q = proj(&h1, width, w.get(weight::WQ), h * dk);
    let mut k = proj(&h1, width, w.get(weight::WK), kvh * dk);
    let v = proj(&h1, width, w.get(weight::WV), kvh * dv);
    rope_rows(spec, &mut q, h * dk, l, false);
    rope_rows(spec, &mut k, kvh * dk, l, false);
    let mixer_inputs = MixerInputs::self_attention(
        b,
        l,
        narrow(vec![b, l, h, dk], &q),
        narrow(vec![b, l, kvh, dk], &k),
        narrow(vec![b, l, kvh, dv], &v),
        inputs.extra.clone(),
    );
    let o = crate::reference::evaluate(m, &mixer_inputs)?
        .data
        .into_vec();
    let attn = proj(&o, h * dv, w.get(weight::WO), width);
    let y: Vec<f64> = x.iter().zip(&attn).map(|(a, b)| a + b).collect();
    let n2 = NormParams::new(&spec.norm, w.get(weight::NORM2), w.opt(weight::NORM2_BIAS));
    let z = norm_rows(&n2, &y, width);
    let (u, up) = match spec.ffn.kind {
        FfnKind::SwiGlu => (
            proj(&z, width, w.get(weight::GATE), f),
            proj(&z, width, w.get(weight::UP), f),
        ),
        FfnKind::Gelu => (proj(&z, width, w.get(weight::UP), f), Vec::new()),
    };
    let mut a = vec![0.0; u.len()];
    activate(spec.ffn.kind, &u, &up, &mut a);
    let ffn = proj(&a, f, w.get(weight::DOWN), width);
    let out = y.iter().zip(&ffn).map(|(a, b)| a + b).collect();
    Ok(Forward {
        h1,
        mixer_inputs,
        o,
        y,
        z,
        u,
        up,
        a,
        out,
    })
}

/// The block's output `[batch, seq, width]` in f64.
pub fn forward(
    spec: &BlockSpec,
    inputs: &BlockInputs,
    weights: &BlockWeights,
) -> Result<Tensor<f64>> {
    validate(spec, inputs, weights)?;
    let fwd = run_forward(spec, inputs, &Weights::new(weights))?;
    Ok(Tensor::new(inputs.x.shape.clone(), fwd.out))
}

/// The gradients of `sum(out * d_out)` in f64.
pub fn gradients(
    spec: &BlockSpec,
    inputs: &BlockInputs,
    weights: &BlockWeights,
    d_out: &Tensor<f32>,
) -> Result<BlockGradients<f64>> {
    validate(spec, inputs, weights)?;
    validate_upstream(spec, inputs, d_out)?;
    let m = &spec.mixer;
    let (b, l, width) = (inputs.batch, inputs.seq, spec.width as usize);
    let (h, kvh) = (m.heads as usize, m.kv_heads as usize);
    let (dk, dv, f) = (
        m.head_dim as usize,
        m.value_dim as usize,
        spec.ffn.hidden as usize,
    );
    let w = Weights::new(weights);
    let fwd = run_forward(spec, inputs, &w)?;
    let g = widen(&d_out.data);
    let mut grads: BTreeMap<String, Vec<f64>> = BTreeMap::new();

    // out = y + a Wdᵀ
    grads.insert(weight::DOWN.into(), proj_weight(&g, width, &fwd.a, f));
    let da = proj_back(&g, width, w.get(weight::DOWN), f);
    let (mut du, mut dup) = (vec![0.0; da.len()], vec![0.0; da.len()]);
    activate_backward(spec.ffn.kind, &fwd.u, &fwd.up, &da, &mut du, &mut dup);
    let dz = match spec.ffn.kind {
        FfnKind::SwiGlu => {
            grads.insert(weight::GATE.into(), proj_weight(&du, f, &fwd.z, width));
            grads.insert(weight::UP.into(), proj_weight(&dup, f, &fwd.z, width));
            let mut dz = proj_back(&du, f, w.get(weight::GATE), width);
            let dz_up = proj_back(&dup, f, w.get(weight::UP), width);
            dz.iter_mut().zip(&dz_up).for_each(|(a, b)| *a += b);
            dz
        }
        FfnKind::Gelu => {
            grads.insert(weight::UP.into(), proj_weight(&du, f, &fwd.z, width));
            proj_back(&du, f, w.get(weight::UP), width)
        }
    };
    // z = norm2(y); the residual adds g.
    let mut dy = g.clone();
    norm_backward(
        spec,
        &w,
        (weight::NORM2, weight::NORM2_BIAS),
        &fwd.y,
        &dz,
        &mut dy,
        &mut grads,
    );
    // y = x + o Woᵀ
    grads.insert(weight::WO.into(), proj_weight(&dy, width, &fwd.o, h * dv));
    let d_o = proj_back(&dy, width, w.get(weight::WO), h * dv);
    let mg = crate::reference::gradients(m, &fwd.mixer_inputs, &narrow(vec![b, l, h, dv], &d_o))?;
    let mut dq = mg.dq.data;
    let mut dk_ = mg.dk.data;
    let dv_ = mg.dv.data;
    rope_rows(spec, &mut dq, h * dk, l, true);
    rope_rows(spec, &mut dk_, kvh * dk, l, true);
    grads.insert(weight::WQ.into(), proj_weight(&dq, h * dk, &fwd.h1, width));
    grads.insert(
        weight::WK.into(),
        proj_weight(&dk_, kvh * dk, &fwd.h1, width),
    );
    grads.insert(
        weight::WV.into(),
        proj_weight(&dv_, kvh * dv, &fwd.h1, width),
    );
    let mut dh = proj_back(&dq, h * dk, w.get(weight::WQ), width);
    for (gr, wn, rows) in [(&dk_, weight::WK, kvh * dk), (&dv_, weight::WV, kvh * dv)] {
        let part = proj_back(gr, rows, w.get(wn), width);
        dh.iter_mut().zip(&part).for_each(|(a, b)| *a += b);
    }
    // h1 = norm1(x); the residual adds dy.
    let mut dx = dy;
    let x = widen(&inputs.x.data);
    norm_backward(
        spec,
        &w,
        (weight::NORM1, weight::NORM1_BIAS),
        &x,
        &dh,
        &mut dx,
        &mut grads,
    );
    let shapes = spec.weight_shapes();
    Ok(BlockGradients {
        dx: Tensor::new(inputs.x.shape.clone(), dx),
        weights: grads
            .into_iter()
            .map(|(n, d)| (n.clone(), Tensor::new(shapes[&n].clone(), d)))
            .collect(),
        extra: mg.extra,
    })
}

/// Back through a norm over `[n, width]` rows: `dx += ...`, and the gain
/// (and bias) gradients recorded under their names.
fn norm_backward(
    spec: &BlockSpec,
    w: &Weights,
    (gain, bias): (&str, &str),
    x: &[f64],
    dout: &[f64],
    dx: &mut [f64],
    grads: &mut BTreeMap<String, Vec<f64>>,
) {
    let width = spec.width as usize;
    let p = NormParams::new(&spec.norm, w.get(gain), w.opt(bias));
    let mut dg = vec![0.0; width];
    let mut db = (spec.norm.kind == NormKind::LayerNorm).then(|| vec![0.0; width]);
    for ((xr, gr), dxr) in x
        .chunks(width)
        .zip(dout.chunks(width))
        .zip(dx.chunks_mut(width))
    {
        p.backward(xr, gr, dxr, &mut dg, db.as_deref_mut());
    }
    grads.insert(gain.into(), dg);
    if let Some(db) = db {
        grads.insert(bias.into(), db);
    }
}
