//! The CPU backward equals the f64 reference gradients for every example
//! spec and every score piece, at ragged lengths, batch 2, GQA, R in
//! {1, 3, 4} with both shardings, in f64 (rounding only) and f32; and the
//! ring does not change the result beyond rounding.

mod cpu_support;

use cpu_support::{example_specs, shrink};
use mixc_dsl::ir::MixerSpec;
use mixc_runtime::cpu::{path_for, CpuConfig, CpuMixer, CpuPath, Precision, Sharding};
use mixc_runtime::grad::Gradients;
use mixc_runtime::inputs::random_inputs;
use mixc_runtime::{reference, Tensor};

/// Specs whose pieces the examples do not reach: tables read by bias and
/// transform, gates with sum norm and bias, relu maps with per-head decay,
/// segment ids with a dilated mask, non-causal linear attention (the
/// global-state path).
const PIECES: [&str; 6] = [
    "mixer b { heads = 4; kv_heads = 2; head_dim = 8; input t: f32[heads, 8]; \
     input c: f32[heads]; score = dot(q, k); bias = t[h][min(abs(i - j), 7)]; \
     transform = (3.0 + c[h]) * tanh(s / (3.0 + c[h])); mask = prefix_lm(5); norm = softmax; }",
    "mixer c { heads = 2; head_dim = 8; value_dim = 6; score = dot(relu(q), relu(k)); \
     decay = 0.8 + 0.1 * tanh(h + 0.5); mask = causal && window(20); norm = none; }",
    "mixer d { heads = 2; head_dim = 8; input g: f32[batch, seq, heads]; \
     score = dot(elu1(q), elu1(k)); bias = 0.25 * (i - j); decay = gate(g); \
     mask = causal; norm = sum(eps = 0.5); }",
    "mixer e { heads = 2; head_dim = 8; input doc: i32[batch, seq]; score = dot(q, k); \
     transform = s - 0.1 * s * s; mask = causal && (segment(doc) || dilated(3)); norm = softmax; }",
    // Non-causal linear attention (the global-state path), GQA, sum norm.
    "mixer g { heads = 4; kv_heads = 2; head_dim = 8; score = dot(elu1(q), elu1(k)); \
     mask = all; norm = sum(eps = 1e-3); }",
    // The same with no normalisation and value width 6.
    "mixer n { heads = 2; head_dim = 8; value_dim = 6; score = dot(q, k); scale = 0.3; \
     mask = all; norm = none; }",
];

/// Per gradient: (name, max |got - want|, max |want|).
fn compare(got: &Gradients<f32>, want: &Gradients<f64>) -> Vec<(String, f64, f64)> {
    let got = got.named();
    want.named()
        .into_iter()
        .map(|(name, w)| {
            let (_, g) = got
                .iter()
                .find(|(n, _)| *n == name)
                .expect("same gradients");
            assert_eq!(g.shape, w.shape, "{name}");
            let err = g.data.iter().zip(&w.data).fold(0f64, |m, (&a, &b)| {
                let d = (a as f64 - b).abs();
                if d.is_nan() || d > m {
                    d
                } else {
                    m
                }
            });
            (name, err, w.data.iter().fold(0f64, |m, x| m.max(x.abs())))
        })
        .collect()
}

fn upstream(spec: &MixerSpec, batch: usize, seq: usize, seed: u64) -> Tensor<f32> {
    let shape = [batch, seq, spec.heads as usize, spec.value_dim as usize];
    let noise = random_inputs(spec, batch, seq, seed).v;
    let n: usize = shape.iter().product();
    Tensor::new(
        shape.to_vec(),
        (0..n).map(|x| noise.data[x % noise.data.len()]).collect(),
    )
}

fn check(spec: &MixerSpec, seq: usize, ranks: &[usize]) {
    let inputs = random_inputs(spec, 2, seq, 40 + seq as u64);
    let d_o = upstream(spec, 2, seq, 99);
    let want = reference::gradients(spec, &inputs, &d_o).expect("reference gradients");
    // f64 gradients of one forward's `o` and statistics, by the first ring.
    let mut first: Option<(
        mixc_runtime::Tensor<f32>,
        mixc_runtime::Tensor<f64>,
        Gradients<f32>,
    )> = None;
    for &r in ranks.iter().filter(|&&r| r <= seq) {
        for sharding in [Sharding::Contiguous, Sharding::Zigzag] {
            for precision in [Precision::F64, Precision::F32] {
                let cfg = CpuConfig {
                    ranks: r,
                    sharding,
                    block_m: 16,
                    block_n: 16,
                    chunk: 16,
                    threads: 2,
                    precision,
                };
                let m = CpuMixer::new(spec, &cfg).expect("mixer");
                let fwd = m.run_train(&inputs).expect("forward");
                let o = fwd.output.to_f32();
                let got = m
                    .backward(&inputs, &o, &fwd.stat, &d_o)
                    .unwrap_or_else(|e| panic!("{}: {e}", spec.name))
                    .into_f32();
                // f64 runs still go through the f32 output `o`, so the
                // rounding of o (1e-7 relative) bounds their agreement.
                let tol = match precision {
                    Precision::F64 => 1e-5,
                    Precision::F32 => 2e-3,
                    Precision::Bf16 => unreachable!("not in this test's matrix"),
                };
                if precision == Precision::F64 {
                    // The ring and the sharding only reorder sums: with the
                    // same `o` and statistics every ring gives the same
                    // gradients to rounding.
                    match &first {
                        None => first = Some((o.clone(), fwd.stat.clone(), got.clone())),
                        Some((o1, stat1, g1)) => {
                            let again = m
                                .backward(&inputs, o1, stat1, &d_o)
                                .expect("backward")
                                .into_f32();
                            for ((name, a), (_, b)) in again.named().into_iter().zip(g1.named()) {
                                let scale = b.data.iter().fold(1e-30f32, |m, x| m.max(x.abs()));
                                let diff = a
                                    .data
                                    .iter()
                                    .zip(&b.data)
                                    .fold(0f32, |m, (x, y)| m.max((x - y).abs()));
                                assert!(
                                    diff <= 1e-6 * scale,
                                    "{} seq {seq} R={r} {sharding:?}: {name} moved by {diff:e} of {scale:e}",
                                    spec.name
                                );
                            }
                        }
                    }
                }
                for (name, err, scale) in compare(&got, &want) {
                    // Relative to the largest gradient, floored at 1e-2: a
                    // gradient that nearly cancels (one key under sum
                    // normalisation: eps / (l + eps)) is all rounding of o.
                    assert!(
                        err <= tol * scale.max(1e-2),
                        "{} seq {seq} R={r} {sharding:?} {precision:?}: {} off by {:e} of {:e}",
                        spec.name,
                        name,
                        err,
                        scale
                    );
                }
            }
        }
    }
}

#[test]
fn every_example_matches_the_reference_gradients() {
    for spec in example_specs() {
        let s = shrink(&spec);
        for seq in [1, 37, 130] {
            check(&s, seq, &[1, 3, 4]);
        }
    }
}

#[test]
fn every_score_piece_matches_the_reference_gradients() {
    for src in PIECES {
        let spec = mixc_dsl::parse_str(src).unwrap_or_else(|d| panic!("{src}: {d:?}"));
        if src.contains("mask = all") {
            assert_eq!(path_for(&spec), CpuPath::GlobalState, "{src}");
        }
        for seq in [2, 45] {
            check(&spec, seq, &[1, 2, 4]);
        }
    }
}

/// A wrong `o` or statistic shape is refused with the tensor's name.
#[test]
fn mismatched_forward_tensors_are_refused() {
    let spec = shrink(&example_specs()[0]);
    let inputs = random_inputs(&spec, 1, 20, 1);
    let m = CpuMixer::new(&spec, &CpuConfig::default_for(&spec, 20)).expect("mixer");
    let fwd = m.run_train(&inputs).expect("forward");
    let o = fwd.output.to_f32();
    let d_o = upstream(&spec, 1, 20, 2);
    // Inference keeps no statistics, so its output cannot feed a backward.
    let inference = m.run(&inputs).expect("forward");
    assert!(inference.stat.data.is_empty());
    let err = m
        .backward(&inputs, &o, &inference.stat, &upstream(&spec, 1, 20, 2))
        .unwrap_err();
    assert!(err.to_string().contains("stat"), "{err}");
    let bad_stat = Tensor::<f64>::zeros(&[1, 20, spec.heads as usize]);
    let err = m.backward(&inputs, &o, &bad_stat, &d_o).unwrap_err();
    assert!(err.to_string().contains("stat"), "{err}");
    let bad_do = upstream(&spec, 1, 19, 2);
    let err = m.backward(&inputs, &o, &fwd.stat, &bad_do).unwrap_err();
    assert!(err.to_string().contains("do"), "{err}");
}
