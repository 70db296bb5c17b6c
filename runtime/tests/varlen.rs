//! Packed variable-length batches (`Mixer::forward_varlen`,
//! `forward_train_varlen`, `backward_varlen`): every example, packs of 1..8
//! sequences with ragged lengths (empty ones included), self-attention and
//! queries shorter or longer than their keys, against the f64 reference run
//! on each sequence alone; the inputs are built per sequence and packed
//! here (by role: rows, per-sequence entries, a shared filter or table).

mod cpu_support;

use cpu_support::{example_specs, rel_err, F32_TOL};
use mixc_dsl::ir::{Decay, Dim, InputRole, MixerSpec};
use mixc_runtime::inputs::random_inputs_kv;
use mixc_runtime::{
    reference, Device, ExtraTensor, Mixer, MixerInputs, Options, RuntimeError, Tensor, Varlen,
};

/// Concatenates `[1, n_i, ...]` tensors along axis 1 (`[0]` stays empty).
fn cat_rows<T: Copy>(parts: &[&Tensor<T>]) -> Tensor<T> {
    if parts[0].data.is_empty() && parts[0].shape.len() < 2 {
        return Tensor::new(parts[0].shape.clone(), Vec::new());
    }
    let mut shape = parts[0].shape.clone();
    shape[1] = parts.iter().map(|t| t.shape[1]).sum();
    Tensor::new(shape, parts.iter().flat_map(|t| t.data.to_vec()).collect())
}

/// Concatenates tensors along axis 0 (per-sequence entries).
fn stack<T: Copy>(parts: &[&Tensor<T>]) -> Tensor<T> {
    let mut shape = parts[0].shape.clone();
    shape[0] = parts.iter().map(|t| t.shape[0]).sum();
    Tensor::new(shape, parts.iter().flat_map(|t| t.data.to_vec()).collect())
}

/// `[heads, n]` filter's first `len` taps.
fn taps(f: &Tensor<f32>, len: usize) -> Tensor<f32> {
    let (h, n) = (f.shape[0], f.shape[1]);
    Tensor::new(
        vec![h, len],
        (0..h)
            .flat_map(|x| f.data[x * n..x * n + len].to_vec())
            .collect(),
    )
}

/// Per-sequence inputs (each as if alone) and their packed form.
fn build(spec: &MixerSpec, lens: &[(usize, usize)], seed: u64) -> (Vec<MixerInputs>, MixerInputs) {
    let total_kv: usize = lens.iter().map(|l| l.1).sum();
    // Shared inputs (filters, tables without batch or seq) come from one draw.
    let master = random_inputs_kv(spec, 1, total_kv.max(1), total_kv.max(1), seed + 99);
    let mut parts: Vec<MixerInputs> = lens
        .iter()
        .enumerate()
        .map(|(s, &(lq, lk))| {
            let mut x = random_inputs_kv(spec, 1, lq, lk, seed + s as u64);
            for d in &spec.inputs {
                let shared = !d.dims.contains(&Dim::Batch) && !d.dims.contains(&Dim::Seq);
                match (&master.extra[&d.name], d.role) {
                    (ExtraTensor::F32(f), InputRole::Filter) => {
                        x.extra
                            .insert(d.name.clone(), ExtraTensor::F32(taps(f, lk)));
                    }
                    (t, _) if shared => {
                        x.extra.insert(d.name.clone(), t.clone());
                    }
                    _ => {}
                }
            }
            x
        })
        .collect();
    let refs = |f: &dyn Fn(&MixerInputs) -> &Tensor<f32>| -> Vec<Tensor<f32>> {
        parts.iter().map(|p| f(p).clone()).collect()
    };
    let (qs, ks, vs) = (refs(&|p| &p.q), refs(&|p| &p.k), refs(&|p| &p.v));
    let mut packed = MixerInputs::new(
        cat_rows(&qs.iter().collect::<Vec<_>>()),
        cat_rows(&ks.iter().collect::<Vec<_>>()),
        cat_rows(&vs.iter().collect::<Vec<_>>()),
    );
    packed.batch = 1;
    packed.seq = lens.iter().map(|l| l.0).sum();
    packed.kv_seq = total_kv;
    packed.q_offset = 0;
    for d in &spec.inputs {
        let has_seq = d.dims.contains(&Dim::Seq);
        let has_batch = d.dims.contains(&Dim::Batch);
        let t = if d.role == InputRole::Filter || !(has_seq || has_batch) {
            master.extra[&d.name].clone()
        } else {
            let join = |f: fn(&[&Tensor<f32>]) -> Tensor<f32>,
                        g: fn(&[&Tensor<i32>]) -> Tensor<i32>| {
                match &parts[0].extra[&d.name] {
                    ExtraTensor::F32(_) => ExtraTensor::F32(f(&parts
                        .iter()
                        .map(|p| match &p.extra[&d.name] {
                            ExtraTensor::F32(t) => t,
                            _ => unreachable!(),
                        })
                        .collect::<Vec<_>>())),
                    ExtraTensor::I32(_) => ExtraTensor::I32(g(&parts
                        .iter()
                        .map(|p| match &p.extra[&d.name] {
                            ExtraTensor::I32(t) => t,
                            _ => unreachable!(),
                        })
                        .collect::<Vec<_>>())),
                }
            };
            if has_seq {
                join(cat_rows::<f32>, cat_rows::<i32>)
            } else {
                join(stack::<f32>, stack::<i32>)
            }
        };
        packed.extra.insert(d.name.clone(), t);
    }
    // Sequences with no key are not run alone (the packed call gives them 0).
    parts
        .iter_mut()
        .for_each(|p| p.q_offset = p.kv_seq.saturating_sub(p.seq));
    (parts, packed)
}

fn rows_of(t: &Tensor<f32>, r: std::ops::Range<usize>) -> Tensor<f64> {
    let w: usize = t.shape[2..].iter().product();
    let mut shape = t.shape.clone();
    shape[1] = r.len();
    Tensor::new(
        shape,
        t.data[r.start * w..r.end * w]
            .iter()
            .map(|&x| x as f64)
            .collect(),
    )
}

/// [`rel_err`] judged against at least `floor` (a gradient that vanishes,
/// as dq of a one-key row of a normalised mixer, is rounding noise; the
/// gradients here are O(1)).
fn rel_floor(a: &Tensor<f64>, b: &Tensor<f64>, floor: f64) -> f64 {
    let scale = b.data.iter().fold(floor, |m, x| m.max(x.abs()));
    let err = a
        .data
        .iter()
        .zip(&b.data)
        .fold(0.0f64, |m, (x, y)| m.max((x - y).abs()));
    err / scale
}

fn f64_of(t: &Tensor<f32>) -> Tensor<f64> {
    Tensor::new(t.shape.clone(), t.data.iter().map(|&x| x as f64).collect())
}

fn check(spec: &MixerSpec, lens: &[(usize, usize)], grads: bool) {
    let what = format!("{} {lens:?}", spec.name);
    let (parts, packed) = build(spec, lens, 5);
    let cu = |f: fn(&(usize, usize)) -> usize| -> Vec<usize> {
        std::iter::once(0)
            .chain(lens.iter().scan(0, |a, l| {
                *a += f(l);
                Some(*a)
            }))
            .collect()
    };
    let varlen = Varlen::new(cu(|l| l.0), cu(|l| l.1)).unwrap();
    let m = Mixer::new(
        spec,
        Options::on(Device::Cpu).with_dtype(mixc_dsl::ir::DType::F32),
    )
    .unwrap();
    let (out, res) = m.forward_train_varlen(&packed, &varlen).unwrap();
    let h = spec.heads as usize;
    let dv = spec.value_dim as usize;
    assert_eq!(out.o.shape, vec![1, packed.seq, h, dv], "{what}");
    let d_o = Tensor::new(
        out.o.shape.clone(),
        (0..out.o.numel())
            .map(|i| ((i * 29 % 61) as f32 - 30.0) / 30.0)
            .collect(),
    );
    let back = grads.then(|| {
        m.backward_varlen(&packed, &out.o, &res, &d_o, &varlen)
            .unwrap()
    });
    let mut extra_sums: std::collections::BTreeMap<String, Tensor<f64>> = Default::default();
    for (s, part) in parts.iter().enumerate() {
        let (qr, kr) = (varlen.q_rows(s), varlen.kv_rows(s));
        if qr.is_empty() {
            continue;
        }
        let got = rows_of(&out.o, qr.clone());
        if kr.is_empty() {
            assert!(
                got.data.iter().all(|&x| x == 0.0),
                "{what}: seq {s} has no key"
            );
            continue;
        }
        let want = reference::evaluate(spec, part).unwrap();
        let e = rel_err(&got, &want);
        assert!(e < F32_TOL, "{what}: sequence {s} o error {e}");
        let Some(back) = &back else { continue };
        let g = reference::gradients(
            spec,
            part,
            &Tensor::new(
                vec![1, qr.len(), h, dv],
                d_o.data[qr.start * h * dv..qr.end * h * dv].to_vec(),
            ),
        )
        .unwrap();
        for (name, got, want, r) in [
            ("dq", &back.grads.dq, &g.dq, qr.clone()),
            ("dk", &back.grads.dk, &g.dk, kr.clone()),
            ("dv", &back.grads.dv, &g.dv, kr.clone()),
        ] {
            if want.data.is_empty() {
                continue;
            }
            let e = rel_floor(&rows_of(got, r), want, 1.0);
            assert!(e < 5e-4, "{what}: sequence {s} {name} error {e}");
        }
        for d in &spec.inputs {
            let Some(want) = g.extra.get(&d.name) else {
                continue;
            };
            let got = &back.grads.extra[&d.name];
            let has_seq = d.dims.contains(&Dim::Seq) && d.role != InputRole::Filter;
            if has_seq {
                let e = rel_floor(&rows_of(got, kr.clone()), want, 1e-2);
                assert!(e < 5e-4, "{what}: sequence {s} d{} error {e}", d.name);
            } else if d.dims.contains(&Dim::Batch) {
                let w: usize = got.shape[1..].iter().product();
                let mine = Tensor::new(
                    want.shape.clone(),
                    got.data[s * w..(s + 1) * w]
                        .iter()
                        .map(|&x| x as f64)
                        .collect(),
                );
                let e = rel_floor(&mine, want, 1e-2);
                assert!(e < 5e-4, "{what}: sequence {s} d{} error {e}", d.name);
            } else {
                // Shared: the packed gradient is the sum over sequences.
                let sum = extra_sums
                    .entry(d.name.clone())
                    .or_insert_with(|| Tensor::zeros(&got.shape));
                if d.role == InputRole::Filter {
                    let (hh, n) = (got.shape[0], got.shape[1]);
                    for x in 0..hh {
                        for t in 0..kr.len() {
                            sum.data[x * n + t] += want.data[x * kr.len() + t];
                        }
                    }
                } else {
                    sum.data
                        .iter_mut()
                        .zip(want.data.iter())
                        .for_each(|(a, b)| *a += b);
                }
            }
        }
    }
    if let Some(back) = &back {
        for (name, sum) in &extra_sums {
            let e = rel_floor(&f64_of(&back.grads.extra[name]), sum, 1e-2);
            assert!(e < 5e-4, "{what}: shared d{name} error {e}");
        }
    }
}

/// Inputs with a batch axis but no sequence axis: one entry per sequence.
fn per_sequence_specs() -> Vec<MixerSpec> {
    [
        "mixer per_example_prefix { heads = 2; head_dim = 8; input prefix: f32[batch]; \
         mask = j <= i || j < int(prefix[b]); }",
        "mixer per_example_bias { heads = 2; kv_heads = 1; head_dim = 8; \
         input pb: f32[batch, heads]; bias = pb[b][h] * (i - j); mask = causal; }",
    ]
    .iter()
    .map(|t| mixc_dsl::parse_str(t).unwrap())
    .collect()
}

#[test]
fn packed_self_attention_equals_each_sequence_alone() {
    for spec in example_specs().into_iter().chain(per_sequence_specs()) {
        for lens in [
            vec![37],
            vec![5, 0, 70, 1, 33],
            vec![12, 9, 1, 40, 3, 27, 2, 64],
        ] {
            let lens: Vec<(usize, usize)> = lens.iter().map(|&l| (l, l)).collect();
            check(&spec, &lens, true);
        }
    }
}

#[test]
fn packed_decode_and_cross_lengths_equal_each_sequence_alone() {
    for spec in example_specs()
        .into_iter()
        .filter(|s| s.inputs.iter().all(|d| d.role != InputRole::Filter))
    {
        // (A convolution's queries are its values' positions: no cross lengths.)
        // Decode-like (few queries against longer caches), a query block
        // longer than its keys (not where an input is indexed by position:
        // the queries must lie among its positions), and a sequence with
        // queries but no key.
        let mut lens = vec![(1, 40), (4, 9), (16, 130), (2, 0)];
        if !spec.inputs.iter().any(|d| d.dims.contains(&Dim::Seq)) {
            lens.push((7, 3));
        }
        // Decay gradients need queries and keys at the same positions.
        let grads = spec.decay == Decay::None;
        check(&spec, &lens, grads);
    }
}

#[test]
fn packed_batches_are_checked() {
    let spec = example_specs()
        .into_iter()
        .find(|s| s.name.contains("llama3"))
        .unwrap();
    let m = Mixer::new(&spec, Options::on(Device::Cpu)).unwrap();
    let x = random_inputs_kv(&spec, 2, 10, 10, 1);
    let e = m
        .forward_varlen(&x, &Varlen::from_lengths(&[4, 6]).unwrap())
        .unwrap_err();
    assert!(e.to_string().contains("batch 1"), "{e}");
    let x = random_inputs_kv(&spec, 1, 10, 10, 1);
    let e = m
        .forward_varlen(&x, &Varlen::from_lengths(&[4, 5]).unwrap())
        .unwrap_err();
    assert!(matches!(e, RuntimeError::BadInput { .. }), "{e}");
    assert!(e.to_string().contains("9 queries"), "{e}");
}
