//! The f64 reference gradients equal central finite differences of the f64
//! reference forward (Richardson-extrapolated, so 1e-6 relative is a real
//! bound) for every example spec and for specs that exercise each score
//! piece: feature maps, bias tables, transforms reading tables, per-head
//! decay reading a table, gates, filters, windows, prefixes, GQA.

mod cpu_support;

use cpu_support::{example_specs, shrink};
use mixc_dsl::ir::MixerSpec;
use mixc_runtime::inputs::random_inputs;
use mixc_runtime::{reference, ExtraTensor, MixerInputs, Tensor};

/// Inputs on a grid of 2^-12 so `x ± 2^-10` and `x ± 2^-11` are exact in f32.
fn on_grid(mut inputs: MixerInputs) -> MixerInputs {
    let snap = |x: &mut f32| *x = (*x * 4096.0).round() / 4096.0;
    inputs.q.data.iter_mut().for_each(snap);
    inputs.k.data.iter_mut().for_each(snap);
    inputs.v.data.iter_mut().for_each(snap);
    for t in inputs.extra.values_mut() {
        if let ExtraTensor::F32(t) = t {
            t.data.iter_mut().for_each(|x| {
                snap(x);
                if *x == 0.0 {
                    *x = 1.0 / 4096.0; // gates stay positive
                }
            });
        }
    }
    inputs
}

fn loss(spec: &MixerSpec, inputs: &MixerInputs, d_o: &Tensor<f32>) -> f64 {
    let o = reference::evaluate(spec, inputs).expect("reference forward");
    o.data
        .iter()
        .zip(&d_o.data)
        .map(|(a, &b)| a * b as f64)
        .sum()
}

/// Which tensor of the inputs an element lives in.
#[derive(Clone, Copy)]
enum Which<'a> {
    Q,
    K,
    V,
    Extra(&'a str),
}

fn tensor_mut<'i>(inputs: &'i mut MixerInputs, w: Which<'_>) -> &'i mut [f32] {
    match w {
        Which::Q => &mut inputs.q.data,
        Which::K => &mut inputs.k.data,
        Which::V => &mut inputs.v.data,
        Which::Extra(n) => match inputs.extra.get_mut(n) {
            Some(ExtraTensor::F32(t)) => &mut t.data,
            _ => panic!("{n} is not a float input"),
        },
    }
}

/// d loss / d element, by central differences at h and h/2 combined by
/// Richardson extrapolation (error O(h^4)).
fn numeric(
    spec: &MixerSpec,
    inputs: &MixerInputs,
    d_o: &Tensor<f32>,
    w: Which<'_>,
    e: usize,
) -> f64 {
    let at = |dx: f32| {
        let mut x = inputs.clone();
        tensor_mut(&mut x, w)[e] += dx;
        loss(spec, &x, d_o)
    };
    let central = |h: f32| (at(h) - at(-h)) / (2.0 * h as f64);
    let (h, h2) = (1.0 / 1024.0, 1.0 / 2048.0);
    (4.0 * central(h2) - central(h)) / 3.0
}

/// Checks every gradient of `spec` at (batch 2, `seq`) on the elements with
/// the largest gradients plus a spread of others.
fn check(spec: &MixerSpec, seq: usize, seed: u64) {
    check_inputs(spec, on_grid(random_inputs(spec, 2, seq, seed)), seed);
}

/// [`check`] on given inputs (any lengths and query offset).
fn check_inputs(spec: &MixerSpec, inputs: MixerInputs, seed: u64) {
    let seq = inputs.seq;
    let shape = [
        inputs.batch,
        seq,
        spec.heads as usize,
        spec.value_dim as usize,
    ];
    let d_o = on_grid(random_inputs(spec, 2, seq, seed + 1)).v; // any fixed data
    let n = shape.iter().product::<usize>();
    let d_o = Tensor::new(
        shape.to_vec(),
        (0..n).map(|x| d_o.data[x % d_o.data.len()]).collect(),
    );
    let grads = reference::gradients(spec, &inputs, &d_o).expect("gradients");
    let mut named: Vec<(Which<'_>, &Tensor<f64>)> = Vec::new();
    if !grads.dq.data.is_empty() {
        named.push((Which::Q, &grads.dq));
        named.push((Which::K, &grads.dk));
    }
    named.push((Which::V, &grads.dv));
    for (name, g) in &grads.extra {
        named.push((Which::Extra(name), g));
    }
    for (w, g) in named {
        let scale = g.data.iter().fold(0f64, |m, x| m.max(x.abs()));
        // (With one key per row softmax is flat in q and k: short sequences
        // may have zero gradients.)
        assert!(
            scale > 0.0 || seq < 8,
            "{}: a gradient is all zero",
            spec.name
        );
        let mut order: Vec<usize> = (0..g.data.len()).collect();
        order.sort_by(|&a, &b| g.data[b].abs().total_cmp(&g.data[a].abs()));
        let picks = order
            .iter()
            .take(4)
            .copied()
            .chain((0..g.data.len()).step_by((g.data.len() / 6).max(1)));
        for e in picks {
            let num = numeric(spec, &inputs, &d_o, w, e);
            // Relative to the tensor's largest gradient; below 1e-4 the
            // differences' own rounding (~1e-13) would dominate.
            let err = (num - g.data[e]).abs() / scale.max(1e-4);
            assert!(
                err <= 1e-6,
                "{} seq {seq}: element {e} of a gradient: analytic {} vs numeric {num} (rel {err:e})",
                spec.name,
                g.data[e]
            );
        }
    }
}

#[test]
fn every_example_matches_finite_differences() {
    for spec in example_specs() {
        let mut s = shrink(&spec);
        s.head_dim = 4;
        s.value_dim = if spec.value_dim != spec.head_dim {
            8
        } else {
            4
        };
        for (seq, seed) in [(1, 3), (13, 5)] {
            check(&s, seq, seed);
        }
    }
}

#[test]
fn every_score_piece_matches_finite_differences() {
    let specs = [
        // Feature maps, sum norm, a windowed mask (the blocked linear path).
        "mixer a { heads = 2; head_dim = 4; score = dot(elu1(q), elu1(k)); \
         mask = causal && window(5); norm = sum(eps = 1e-3); }",
        // A transform and a bias both reading tables, GQA, prefix-LM.
        "mixer b { heads = 4; kv_heads = 2; head_dim = 4; input t: f32[heads, 8]; \
         input c: f32[heads]; score = dot(q, k); bias = t[h][min(abs(i - j), 7)]; \
         transform = (3.0 + c[h]) * tanh(s / (3.0 + c[h])); mask = prefix_lm(3); norm = softmax; }",
        // A per-head decay, relu feature maps, no norm.
        "mixer c { heads = 2; head_dim = 4; value_dim = 6; score = dot(relu(q), relu(k)); \
         decay = 0.8 + 0.1 * tanh(h + 0.5); mask = causal; norm = none; }",
        // Gates with a sum norm and bias.
        "mixer d { heads = 2; head_dim = 4; input g: f32[batch, seq, heads]; \
         score = dot(elu1(q), elu1(k)); bias = 0.25 * (i - j); decay = gate(g); \
         mask = causal; norm = sum(eps = 0.5); }",
        // Segment ids (no gradient) with a dilated mask and exp / pow in the transform.
        "mixer e { heads = 2; head_dim = 4; input doc: i32[batch, seq]; score = dot(q, k); \
         transform = s - 0.1 * pow(s, 2.0) + 0.05 * exp(-s * s); \
         mask = causal && (segment(doc) || dilated(3)); norm = softmax; }",
    ];
    for src in specs {
        let spec = mixc_dsl::parse_str(src).unwrap_or_else(|d| panic!("{src}: {d:?}"));
        for (seq, seed) in [(2, 11), (11, 13)] {
            check(&spec, seq, seed);
        }
    }
}

/// Queries and keys of different lengths: decode rows against a longer key
/// set (bottom-right, and at an explicit offset), cross-attention with more
/// queries than keys, with a position bias, a window and a prefix.
#[test]
fn decaying_mixers_with_two_lengths_match_finite_differences() {
    let specs = [
        "mixer r { heads = 2; head_dim = 4; score = dot(q, k); decay = 0.9 - 0.1 * h; \
         mask = causal; norm = none; }",
        "mixer g { heads = 2; head_dim = 4; input g: f32[batch, seq, heads]; score = dot(q, k); \
         decay = gate(g); mask = causal; norm = none; }",
        "mixer s { heads = 2; head_dim = 4; input g: f32[batch, seq, heads]; \
         score = dot(elu1(q), elu1(k)); decay = gate(g); mask = causal && window(5); \
         norm = sum(eps = 1e-3); }",
    ];
    for src in specs {
        let spec = mixc_dsl::parse_str(src).unwrap_or_else(|d| panic!("{src}: {d:?}"));
        for (seq, kv_seq, offset) in [(3, 11, None), (2, 9, Some(4)), (1, 6, None)] {
            let mut x = mixc_runtime::inputs::random_inputs_kv(&spec, 2, seq, kv_seq, 17);
            if let Some(o) = offset {
                x.q_offset = o;
            }
            check_inputs(&spec, on_grid(x), 19);
        }
    }
    // Queries past the last key (positions 8..11 against keys 0..5): the
    // decay multiplies the per-head gamma of positions no key holds.
    let spec = mixc_dsl::parse_str(specs[0]).unwrap();
    let x = mixc_runtime::inputs::random_inputs_kv(&spec, 2, 3, 5, 17).with_q_offset(8);
    check_inputs(&spec, on_grid(x), 19);
}

#[test]
fn two_lengths_match_finite_differences() {
    let specs = [
        "mixer w { heads = 4; kv_heads = 2; head_dim = 4; input t: f32[heads, 8]; \
         score = dot(q, k); bias = t[h][min(abs(i - j), 7)]; mask = causal && window(6); \
         norm = softmax; }",
        "mixer x { heads = 2; head_dim = 4; value_dim = 6; score = dot(q, k); \
         bias = 0.1 * (i - j); mask = all; norm = softmax; }",
        "mixer p { heads = 2; head_dim = 4; score = dot(elu1(q), elu1(k)); \
         mask = prefix_lm(3); norm = sum(eps = 1e-3); }",
    ];
    for src in specs {
        let spec = mixc_dsl::parse_str(src).unwrap_or_else(|d| panic!("{src}: {d:?}"));
        for (seq, kv_seq, offset) in [(3, 11, None), (2, 9, Some(4)), (7, 4, None)] {
            let mut x = mixc_runtime::inputs::random_inputs_kv(&spec, 2, seq, kv_seq, 17);
            if let Some(o) = offset {
                x.q_offset = o;
            }
            check_inputs(&spec, on_grid(x), 19);
        }
    }
}

/// Integer inputs get no gradient; a `do` of the wrong shape, or holding a
/// NaN, is refused with an error naming `do`.
#[test]
fn integer_inputs_have_no_gradient_and_bad_upstreams_are_refused() {
    let spec = example_specs()
        .into_iter()
        .find(|s| s.name == "document_mask")
        .expect("example");
    let spec = shrink(&spec);
    let inputs = random_inputs(&spec, 1, 9, 1);
    let mut d_o = Tensor::<f32>::zeros(&[1, 9, spec.heads as usize, spec.value_dim as usize]);
    let g = reference::gradients(&spec, &inputs, &d_o).expect("gradients");
    assert!(g.extra.is_empty(), "{:?}", g.extra.keys());
    assert!(
        g.dq.data.iter().all(|&x| x == 0.0),
        "zero upstream, zero gradient"
    );
    d_o.data[3] = f32::NAN;
    let err = reference::gradients(&spec, &inputs, &d_o).unwrap_err();
    assert!(err.to_string().contains("do"), "{err}");
    let wrong = Tensor::<f32>::zeros(&[1, 8, spec.heads as usize, spec.value_dim as usize]);
    let err = reference::gradients(&spec, &inputs, &wrong).unwrap_err();
    assert!(
        err.to_string().contains("[batch, seq, heads, value_dim]"),
        "{err}"
    );
}
