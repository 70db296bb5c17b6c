//! The backward pass of the chunkwise families (linear, retention, gated)
//! and of the convolution family, as forward runs of derived mixers: the
//! backward of a linear mixer is linear mixers.
//!
//! With `qs = scale phi(q)`, `K = psi(k)`, `D(i, j)` the decay, `u` the
//! upstream gradient (over `l + eps` under sum normalisation, `l` the row's
//! weight sum) and `c_i = -u_i . o_i` (sum; 0 otherwise), every pair's
//! weight gradient is `da_ij = u_i . v_j + c_i = [u_i, c_i] . [v_j, 1]`, so
//!
//! ```text
//! dqs_i = sum_{j <= i} D(i,j) ([u_i, c_i] . [v_j, 1]) K_j     a causal linear mixer
//! dK_j  = sum_{i >= j} D(i,j) ([v_j, 1] . [u_i, c_i]) qs_i    the same, on the reversed sequence
//! dv_j  = sum_{i >= j} D(i,j) (K_j . qs_i) u_i                 the same, on the reversed sequence
//! ```
//!
//! Each is one run of the generated chunkwise forward kernel (identity
//! maps, scale 1, no normalisation, the spec's decay; reversed in sequence
//! for the key side, where the gates shift by one: `g'_p = g_{L - p}`), so
//! the recurrent state runs forward for `dq` and backward for `dk` / `dv`,
//! each O(L d^2). The host does the O(L d) rest: feature maps and their
//! derivatives, `l` by its own O(L d_k) recurrence, GQA sums, and the gate
//! gradient `d ln g_t = sum_{p >= t} (qs_p . dqs_p - K_p . dK_p)`.
//!
//! Convolution: `dv` is the forward convolution of the reversed upstream
//! gradient with the same filter; the filter's gradient, a correlation over
//! every lag, is summed on the host (O(L^2 d_v) per head).
//!
//! The runner (`run`) executes a derived spec's forward: the GPU's
//! `CudaMixer` in the product, the kernels as PTX in the simulator in the
//! tests.

use mixc_dsl::ir::{Decay, FeatureMap, InputDecl, Mask, MixerSpec, Norm, Score};

use crate::error::{Result, RuntimeError};
use crate::grad::Gradients;
use crate::tensor::{clamped_offset, ExtraTensor, MixerInputs, Tensor};

/// Runs a derived spec's forward pass and returns its output.
pub(crate) type Forward<'a> = dyn FnMut(&MixerSpec, &MixerInputs) -> Result<Tensor<f32>> + 'a;

/// `Ok` when [`backward`] computes `spec`'s gradients, else why not.
pub(crate) fn supports(spec: &MixerSpec) -> std::result::Result<(), String> {
    match spec.family {
        mixc_dsl::Family::Convolution => {
            if !matches!(spec.mask, Mask::Causal) || spec.bias.is_some() || spec.transform.is_some()
            {
                return Err(
                    "a convolution with a mask other than causal, a bias or a transform".into(),
                );
            }
            if !matches!(spec.norm, Norm::None) || !matches!(spec.decay, Decay::None) {
                return Err("a convolution with a normalisation or a decay".into());
            }
            Ok(())
        }
        mixc_dsl::Family::Softmax => Err("the softmax family (it has kernels of its own)".into()),
        _ => {
            if let Decay::PerHead(e) = &spec.decay {
                let mut read = Vec::new();
                e.inputs_read(&mut read);
                if !read.is_empty() {
                    return Err("a per-head decay that reads inputs".into());
                }
            }
            if matches!(spec.norm, Norm::Softmax) {
                return Err("softmax normalisation in the chunkwise form".into());
            }
            Ok(())
        }
    }
}

/// The gradients of `sum(o * d_o)` for a chunkwise or convolution spec,
/// given its inputs, its output `o` and the upstream gradient.
pub(crate) fn backward(
    spec: &MixerSpec,
    inputs: &MixerInputs,
    o: &Tensor<f32>,
    d_o: &Tensor<f32>,
    run: &mut Forward<'_>,
) -> Result<Gradients<f32>> {
    supports(spec).map_err(|what| RuntimeError::Unsupported {
        backend: "cuda",
        what: format!("the backward pass of mixer `{}`: {what}", spec.name),
    })?;
    super::validate_inputs(spec, inputs)?;
    crate::grad::validate_upstream(spec, inputs, d_o)?;
    let s = Shape::of(spec, inputs);
    if spec.family == mixc_dsl::Family::Convolution {
        return conv_backward(spec, inputs, d_o, &s, run);
    }
    linear_backward(spec, inputs, o, d_o, &s, run)
}

#[derive(Clone, Copy)]
struct Shape {
    b: usize,
    l: usize,
    h: usize,
    kvh: usize,
    dk: usize,
    dv: usize,
}

impl Shape {
    fn of(spec: &MixerSpec, x: &MixerInputs) -> Shape {
        Shape {
            b: x.batch,
            l: x.seq,
            h: spec.heads as usize,
            kvh: spec.kv_heads as usize,
            dk: spec.head_dim as usize,
            dv: spec.value_dim as usize,
        }
    }
    fn group(&self) -> usize {
        self.h / self.kvh
    }
}

/// `[b, l, heads, w]` from a function of (batch, position, head, column).
fn build(
    s: &Shape,
    heads: usize,
    w: usize,
    f: impl Fn(usize, usize, usize, usize) -> f32,
) -> Tensor<f32> {
    let mut t = Tensor::<f32>::zeros(&[s.b, s.l, heads, w]);
    let mut i = 0;
    for b in 0..s.b {
        for p in 0..s.l {
            for h in 0..heads {
                for c in 0..w {
                    t.data[i] = f(b, p, h, c);
                    i += 1;
                }
            }
        }
    }
    t
}

/// Element `(b, p, h, c)` of a `[b, l, heads, w]` tensor.
fn at(t: &Tensor<f32>, b: usize, p: usize, h: usize, c: usize) -> f32 {
    let (l, heads, w) = (t.shape[1], t.shape[2], t.shape[3]);
    t.data[((b * l + p) * heads + h) * w + c]
}

/// The tensor with its sequence axis reversed (`[b, l, heads, w]`).
fn reversed(t: &Tensor<f32>) -> Tensor<f32> {
    let (b, l, row) = (t.shape[0], t.shape[1], t.shape[2] * t.shape[3]);
    let mut out = t.clone();
    for bi in 0..b {
        for p in 0..l {
            let (src, dst) = ((bi * l + p) * row, (bi * l + (l - 1 - p)) * row);
            out.data[dst..dst + row].copy_from_slice(&t.data[src..src + row]);
        }
    }
    out
}

/// The derived specs whose forward runs compute `spec`'s backward, in the
/// order [`backward`] runs them: `dq`, `dk`, `dv` (chunkwise families) or
/// `dv` (convolution).
pub(crate) fn derived_specs(spec: &MixerSpec) -> Vec<MixerSpec> {
    let (h, kvh) = (spec.heads as usize, spec.kv_heads as usize);
    let (dk, dv) = (spec.head_dim as usize, spec.value_dim as usize);
    if spec.family == mixc_dsl::Family::Convolution {
        return vec![derived(spec, "bwd_dv", h, h, dk, dv)];
    }
    // [u | c | 0 ...] against [v | 1 | 0 ...] under sum normalisation,
    // padded to a multiple of 8 (16-byte rows).
    let w = if matches!(spec.norm, Norm::Sum { .. }) {
        dv + 8
    } else {
        dv
    };
    vec![
        derived(spec, "bwd_dq", h, kvh, w, dk),
        derived(spec, "bwd_dk", h, h, w, dk),
        derived(spec, "bwd_dv", h, h, dk, dv),
    ]
}

/// A derived spec: `heads` x `kv_heads`, widths `dk` / `dv`, identity maps,
/// scale 1, no normalisation, causal, the given decay and inputs.
fn derived(
    spec: &MixerSpec,
    what: &str,
    heads: usize,
    kv_heads: usize,
    dk: usize,
    dv: usize,
) -> MixerSpec {
    let mut d = spec.clone();
    d.name = format!("{}_{what}", spec.name);
    d.heads = heads as u32;
    d.kv_heads = kv_heads as u32;
    d.head_dim = dk as u32;
    d.value_dim = dv as u32;
    d.bias = None;
    d.transform = None;
    d.mask = Mask::Causal;
    d.norm = Norm::None;
    if let Score::Dot { .. } = d.score {
        d.score = Score::Dot {
            q_map: FeatureMap::Identity,
            k_map: FeatureMap::Identity,
            scale: 1.0,
        };
    }
    // Only the decay's gate (or the convolution's filter) is read.
    let keep: Vec<String> = match (&spec.decay, &spec.score) {
        (Decay::Gate { input }, _) => vec![input.clone()],
        (_, Score::Filter { input }) => vec![input.clone()],
        _ => Vec::new(),
    };
    d.inputs.retain(|i: &InputDecl| keep.contains(&i.name));
    d
}

fn with_extra(
    q: Tensor<f32>,
    k: Tensor<f32>,
    v: Tensor<f32>,
    extra: Option<(&str, ExtraTensor)>,
) -> MixerInputs {
    let mut x = MixerInputs::new(q, k, v);
    if let Some((name, t)) = extra {
        x.extra.insert(name.to_string(), t);
    }
    x
}

fn linear_backward(
    spec: &MixerSpec,
    x: &MixerInputs,
    o: &Tensor<f32>,
    d_o: &Tensor<f32>,
    s: &Shape,
    run: &mut Forward<'_>,
) -> Result<Gradients<f32>> {
    let Score::Dot {
        q_map,
        k_map,
        scale,
    } = spec.score
    else {
        return Err(RuntimeError::Internal(
            "a chunkwise spec without a dot score".into(),
        ));
    };
    let (grp, dk, dv) = (s.group(), s.dk, s.dv);
    let qs = build(s, s.h, dk, |b, p, h, c| {
        (scale * q_map.apply(at(&x.q, b, p, h, c) as f64)) as f32
    });
    let kk = build(s, s.kvh, dk, |b, p, h, c| {
        k_map.apply(at(&x.k, b, p, h, c) as f64) as f32
    });

    // Per-step decay factor exp(C_p - C_{p-1}) of (batch, head, position).
    let gate = match &spec.decay {
        Decay::Gate { input } => match x.extra_input(input)? {
            ExtraTensor::F32(t) => Some((input.clone(), t.clone())),
            ExtraTensor::I32(_) => {
                return Err(RuntimeError::Invalid(format!(
                    "gate `{input}` is not a float input"
                )))
            }
        },
        _ => None,
    };
    let gammas: Vec<f64> = match &spec.decay {
        Decay::PerHead(e) => (0..s.h)
            .map(|h| {
                let lookup = |_: &str, _: &[i64]| 0.0;
                e.eval_f64(&mixc_dsl::ir::EvalEnv::for_head(
                    h as i64, spec.heads, &lookup,
                ))
            })
            .collect(),
        _ => vec![1.0; s.h],
    };
    let step = |b: usize, h: usize, p: usize| -> f64 {
        match &gate {
            Some((_, g)) => {
                g.data[clamped_offset(&g.shape, &[b as i64, p as i64, h as i64])] as f64
            }
            None => gammas[h],
        }
    };

    // u and c (sum normalisation: l by the recurrence z_p = g_p z_{p-1} + K_p).
    let sum_eps = match spec.norm {
        Norm::Sum { eps } => Some(eps),
        _ => None,
    };
    let mut u = d_o.clone();
    let mut cvec = vec![0f32; s.b * s.l * s.h];
    if let Some(eps) = sum_eps {
        for b in 0..s.b {
            for h in 0..s.h {
                let kvh = h / grp;
                let mut z = vec![0f64; dk];
                for p in 0..s.l {
                    let g = step(b, h, p);
                    let mut l = 0f64;
                    for (c, zc) in z.iter_mut().enumerate() {
                        *zc = g * *zc + at(&kk, b, p, kvh, c) as f64;
                        l += at(&qs, b, p, h, c) as f64 * *zc;
                    }
                    let inv = 1.0 / (l + eps);
                    let mut uo = 0f64;
                    for c in 0..dv {
                        let i = ((b * s.l + p) * s.h + h) * dv + c;
                        let ui = d_o.data[i] as f64 * inv;
                        u.data[i] = ui as f32;
                        uo += ui * o.data[i] as f64;
                    }
                    cvec[(b * s.l + p) * s.h + h] = -uo as f32;
                }
            }
        }
    }
    let [spec_q, spec_k, spec_v]: [MixerSpec; 3] = derived_specs(spec)
        .try_into()
        .map_err(|_| RuntimeError::Internal("three derived specs".into()))?;
    // [u | c | 0 ...] and [v | 1 | 0 ...].
    let w = spec_q.head_dim as usize;
    let u_ext = build(s, s.h, w, |b, p, h, c| match c {
        c if c < dv => at(&u, b, p, h, c),
        c if c == dv => cvec[(b * s.l + p) * s.h + h],
        _ => 0.0,
    });
    let v_ext = |heads: usize| {
        build(s, heads, w, |b, p, h, c| {
            let kvh = if heads == s.h { h / grp } else { h };
            match c {
                c if c < dv => at(&x.v, b, p, kvh, c),
                c if c == dv => 1.0,
                _ => 0.0,
            }
        })
    };
    let gate_extra = |rev: bool| {
        gate.as_ref().map(|(name, g)| {
            let t = if rev {
                // g'_p = g_{L - p} (g'_0 is never read: it decays nothing).
                let mut r = g.clone();
                for b in 0..s.b {
                    for p in 0..s.l {
                        for h in 0..s.h {
                            let src = if p == 0 {
                                1.0
                            } else {
                                g.data[(b * s.l + (s.l - p)) * s.h + h]
                            };
                            r.data[(b * s.l + p) * s.h + h] = src;
                        }
                    }
                }
                r
            } else {
                g.clone()
            };
            (name.as_str(), ExtraTensor::F32(t))
        })
    };

    // dqs: forward in sequence order.
    let dqs = run(
        &spec_q,
        &with_extra(u_ext.clone(), v_ext(s.kvh), kk.clone(), gate_extra(false)),
    )?;
    // dK and dv per query head: forward on the reversed sequence.
    let expand =
        |t: &Tensor<f32>, width: usize| build(s, s.h, width, |b, p, h, c| at(t, b, p, h / grp, c));
    let dk_h = reversed(&run(
        &spec_k,
        &with_extra(
            reversed(&v_ext(s.h)),
            reversed(&u_ext),
            reversed(&qs),
            gate_extra(true),
        ),
    )?);
    let dv_h = reversed(&run(
        &spec_v,
        &with_extra(
            reversed(&expand(&kk, dk)),
            reversed(&qs),
            reversed(&u),
            gate_extra(true),
        ),
    )?);

    // Chain rule through the maps and the scale; GQA sums.
    let dq = build(s, s.h, dk, |b, p, h, c| {
        (at(&dqs, b, p, h, c) as f64 * scale * q_map.derivative(at(&x.q, b, p, h, c) as f64)) as f32
    });
    let sum_group = |t: &Tensor<f32>, width: usize| {
        build(s, s.kvh, width, |b, p, kvh, c| {
            (0..grp).map(|g| at(t, b, p, kvh * grp + g, c)).sum()
        })
    };
    let dk_sum = sum_group(&dk_h, dk);
    let dkt = build(s, s.kvh, dk, |b, p, kvh, c| {
        (at(&dk_sum, b, p, kvh, c) as f64 * k_map.derivative(at(&x.k, b, p, kvh, c) as f64)) as f32
    });
    let dvt = sum_group(&dv_h, dv);
    let mut extra = std::collections::BTreeMap::new();
    if let Some((name, g)) = &gate {
        // dC_p = qs_p . dqs_p - K_p . dK_p; d ln g_t = sum_{p >= t} dC_p.
        let mut dg = Tensor::<f32>::zeros(&g.shape);
        for b in 0..s.b {
            for h in 0..s.h {
                let mut acc = 0f64;
                for p in (0..s.l).rev() {
                    let kvh = h / grp;
                    for c in 0..dk {
                        acc += at(&qs, b, p, h, c) as f64 * at(&dqs, b, p, h, c) as f64
                            - at(&kk, b, p, kvh, c) as f64 * at(&dk_h, b, p, h, c) as f64;
                    }
                    let off = clamped_offset(&g.shape, &[b as i64, p as i64, h as i64]);
                    dg.data[off] += (acc / g.data[off] as f64) as f32;
                }
            }
        }
        extra.insert(name.clone(), dg);
    }
    Ok(Gradients {
        dq,
        dk: dkt,
        dv: dvt,
        extra,
    })
}

fn conv_backward(
    spec: &MixerSpec,
    x: &MixerInputs,
    d_o: &Tensor<f32>,
    s: &Shape,
    run: &mut Forward<'_>,
) -> Result<Gradients<f32>> {
    let Score::Filter { input } = &spec.score else {
        return Err(RuntimeError::Internal(
            "a convolution without a filter".into(),
        ));
    };
    let ExtraTensor::F32(f) = x.extra_input(input)? else {
        return Err(RuntimeError::Invalid(format!(
            "filter `{input}` is not a float input"
        )));
    };
    let (grp, dv) = (s.group(), s.dv);
    let flen = *f.shape.last().unwrap_or(&1);
    // dv: the reversed upstream gradient convolved with the same filter, per query head.
    let spec_v = derived_specs(spec).remove(0);
    let empty = Tensor::<f32>::zeros(&[0]);
    let xv = with_extra(
        empty.clone(),
        empty,
        reversed(d_o),
        Some((input.as_str(), ExtraTensor::F32(f.clone()))),
    );
    let dv_h = reversed(&run(&spec_v, &xv)?);
    let dvt = build(s, s.kvh, dv, |b, p, kvh, c| {
        (0..grp).map(|g| at(&dv_h, b, p, kvh * grp + g, c)).sum()
    });
    // The filter's gradient: every (i, j <= i) pair adds dO_i . v_j to tap min(i - j, len - 1).
    let mut df = Tensor::<f32>::zeros(&f.shape);
    for h in 0..s.h {
        let kvh = h / grp;
        let mut taps = vec![0f64; flen];
        for b in 0..s.b {
            for i in 0..s.l {
                let oi = ((b * s.l + i) * s.h + h) * dv;
                let du = &d_o.data[oi..oi + dv];
                for j in 0..=i {
                    let vj = ((b * s.l + j) * s.kvh + kvh) * dv;
                    let dot: f64 = du
                        .iter()
                        .zip(&x.v.data[vj..vj + dv])
                        .map(|(a, b)| *a as f64 * *b as f64)
                        .sum();
                    taps[(i - j).min(flen - 1)] += dot;
                }
            }
        }
        for (t, d) in taps.iter().enumerate() {
            let off = clamped_offset(&f.shape, &[h as i64, t as i64]);
            df.data[off] += *d as f32;
        }
    }
    let mut extra = std::collections::BTreeMap::new();
    extra.insert(input.clone(), df);
    Ok(Gradients {
        dq: Tensor::new(vec![0], Vec::new()),
        dk: Tensor::new(vec![0], Vec::new()),
        dv: dvt,
        extra,
    })
}
