//! Queries and keys of different lengths (decode against a KV cache,
//! chunked prefill, cross-attention): the reference's semantics, the CPU
//! backend forward and backward against it (rings included), and the
//! refusals.

mod cpu_support;

use cpu_support::{example_specs, rel_err, F32_TOL, F64_TOL};
use mixc_dsl::ir::{MixerSpec, Score};
use mixc_runtime::cpu::{CpuConfig, CpuMixer, Precision, Sharding};
use mixc_runtime::inputs::{random_inputs, random_inputs_kv};
use mixc_runtime::{reference, MixerInputs, RuntimeError, Tensor};

/// Rows `from..` of `[batch, seq, ...]`.
fn last_rows(t: &Tensor<f64>, from: usize) -> Tensor<f64> {
    let (batch, seq) = (t.shape[0], t.shape[1]);
    let row: usize = t.shape[2..].iter().product();
    let data = (0..batch)
        .flat_map(|b| {
            t.data[(b * seq + from) * row..(b + 1) * seq * row]
                .iter()
                .copied()
        })
        .collect();
    let mut shape = t.shape.clone();
    shape[1] = seq - from;
    Tensor::new(shape, data)
}

/// The last `n` query rows of `full` as a two-length input: the same keys,
/// values and positional inputs, queries at the last positions.
fn tail_queries(full: &MixerInputs, n: usize) -> MixerInputs {
    let (batch, seq) = (full.batch, full.seq);
    let width: usize = full.q.shape[2..].iter().product();
    let q = Tensor::new(
        vec![batch, n, full.q.shape[2], full.q.shape[3]],
        (0..batch)
            .flat_map(|b| {
                full.q.data[(b * seq + seq - n) * width..(b + 1) * seq * width]
                    .iter()
                    .copied()
            })
            .collect(),
    );
    MixerInputs {
        seq: n,
        q_offset: seq - n,
        q,
        ..full.clone()
    }
}

fn dot_examples() -> Vec<MixerSpec> {
    example_specs()
        .into_iter()
        .filter(|s| matches!(s.score, Score::Dot { .. }))
        .collect()
}

/// A decode step or a prefill chunk is the last rows of one long forward:
/// the reference gives bit-identical rows for every example (gates, segment
/// ids and tables read at the same positions).
#[test]
fn reference_decode_rows_are_the_last_rows_of_the_full_sequence() {
    for spec in dot_examples() {
        let full = random_inputs(&spec, 2, 70, 5);
        let want = reference::evaluate(&spec, &full).expect("full");
        for n in [1, 4, 16, 70] {
            let x = tail_queries(&full, n);
            assert_eq!((x.seq, x.kv_seq, x.q_offset), (n, 70, 70 - n));
            let got = reference::evaluate(&spec, &x).expect("decode");
            assert_eq!(got, last_rows(&want, 70 - n), "{} n={n}", spec.name);
        }
    }
}

fn cfg(ranks: usize, sharding: Sharding, precision: Precision) -> CpuConfig {
    CpuConfig {
        ranks,
        sharding,
        block_m: 16,
        block_n: 16,
        chunk: 16,
        threads: 2,
        precision,
    }
}

/// `(seq, kv_seq, q_offset)` shapes every example runs at: decode (1, 4, 16
/// queries) against ragged key counts, a chunk of a chunked prefill, and
/// queries that sit before the end of the keys.
const SHAPES: [(usize, usize, Option<usize>); 8] = [
    (1, 1, None),
    (1, 133, None),
    (4, 37, None),
    (16, 150, None),
    (24, 97, Some(40)),
    (33, 200, None),
    // Several key tiles, split over the workers.
    (1, 1400, None),
    (3, 900, Some(500)),
];

/// Runs `x` on rings of `ranks`, both shardings and precisions; returns
/// whether the one-rank runs took the decode form.
fn check_forward(spec: &MixerSpec, x: &MixerInputs, ranks: &[usize], what: &str) -> bool {
    let want = reference::evaluate(spec, x).expect("reference");
    let mut decode = false;
    for &r in ranks.iter().filter(|&&r| r <= x.kv_seq) {
        for sharding in [Sharding::Contiguous, Sharding::Zigzag] {
            for (precision, tol) in [(Precision::F64, F64_TOL), (Precision::F32, F32_TOL)] {
                let m = CpuMixer::new(spec, &cfg(r, sharding, precision)).expect("mixer");
                let run = m
                    .run(x)
                    .unwrap_or_else(|e| panic!("{} {what}: {e}", spec.name));
                assert!(!run.stats.decode || r == 1, "only one rank decodes");
                decode |= run.stats.decode;
                let got = run.output.to_f64();
                let err = rel_err(&got, &want);
                assert!(
                    err <= tol,
                    "{} {what} R={r} {sharding:?} {precision:?}: rel err {err:e}",
                    spec.name
                );
            }
        }
    }
    decode
}

/// The CPU backend (blocked path for every family, its decode form on one
/// rank, rings of 2 and 3 ranks) equals the reference for decode and chunk
/// shapes of every example.
#[test]
fn cpu_decode_and_chunks_match_the_reference_for_every_example() {
    for spec in dot_examples() {
        for (i, &(seq, kv_seq, offset)) in SHAPES.iter().enumerate() {
            let mut x = random_inputs_kv(&spec, 2, seq, kv_seq, 30 + i as u64);
            if let Some(o) = offset {
                x.q_offset = o;
            }
            let ranks: &[usize] = if i % 2 == 0 { &[1, 3] } else { &[1, 2] };
            let decode = check_forward(&spec, &x, ranks, &format!("seq {seq} kv {kv_seq}"));
            // Few queries per group against at least 8 keys each decode.
            let rows = seq * spec.group_size() as usize;
            assert_eq!(
                decode,
                rows <= 64 && kv_seq >= 8 * seq,
                "{} {seq}x{kv_seq}",
                spec.name
            );
        }
    }
}

/// Cross-attention: no mask, more queries than keys and fewer, GQA, a
/// different value width; the queries' offset only moves a position bias.
#[test]
fn cpu_cross_attention_matches_the_reference() {
    let srcs = [
        "mixer x { heads = 4; kv_heads = 2; head_dim = 16; value_dim = 8; score = dot(q, k); \
         mask = all; norm = softmax; }",
        "mixer b { heads = 2; head_dim = 16; score = dot(q, k); bias = -0.05 * abs(i - j); \
         mask = all; norm = softmax; }",
        "mixer l { heads = 2; head_dim = 16; score = dot(elu1(q), elu1(k)); mask = all; \
         norm = sum(eps = 1e-3); }",
    ];
    for src in srcs {
        let spec = mixc_dsl::parse_str(src).expect("spec");
        for (seq, kv_seq, offset) in [(77, 30, 0), (30, 77, 0), (30, 77, 47), (5, 300, 3)] {
            let x = random_inputs_kv(&spec, 2, seq, kv_seq, 8).with_q_offset(offset);
            check_forward(&spec, &x, &[1, 2], &format!("{seq} x {kv_seq} @ {offset}"));
        }
    }
}

/// Gradients with two lengths: the CPU backward (rings of 1 and 2) equals
/// the f64 reference gradients (themselves checked against finite
/// differences in grad_reference.rs) for every dot-score example, decaying
/// ones (retention, gated: the gates' gradients too) included.
#[test]
fn cpu_backward_with_two_lengths_matches_the_reference() {
    for spec in dot_examples() {
        for (seq, kv_seq) in [(5, 90), (40, 61)] {
            let x = random_inputs_kv(&spec, 2, seq, kv_seq, 3);
            let d_o = random_inputs_kv(&spec, 2, kv_seq, seq, 4).q;
            let d_o = Tensor::new(
                vec![2, seq, spec.heads as usize, spec.value_dim as usize],
                d_o.data
                    .iter()
                    .cycle()
                    .take(2 * seq * (spec.heads * spec.value_dim) as usize)
                    .copied()
                    .collect(),
            );
            let want = reference::gradients(&spec, &x, &d_o).expect("reference");
            for r in [1, 2] {
                let m = CpuMixer::new(&spec, &cfg(r, Sharding::Zigzag, Precision::F64)).unwrap();
                let fwd = m.run_train(&x).expect("forward");
                let got = m
                    .backward(&x, &fwd.output.to_f32(), &fwd.stat, &d_o)
                    .unwrap_or_else(|e| panic!("{}: {e}", spec.name))
                    .into_f32();
                for ((name, g), (_, w)) in got.named().into_iter().zip(want.named()) {
                    let g =
                        Tensor::new(g.shape.clone(), g.data.iter().map(|&v| v as f64).collect());
                    let err = rel_err(&g, w);
                    assert!(
                        err <= 1e-5,
                        "{} {seq} x {kv_seq} R={r}: d{name} rel err {err:e}",
                        spec.name
                    );
                }
            }
        }
    }
}

/// What cannot run is refused with an error in the user's terms.
#[test]
fn two_lengths_refusals_name_the_problem() {
    let by_name = |n: &str| {
        example_specs()
            .into_iter()
            .find(|s| s.name == n)
            .unwrap_or_else(|| panic!("example {n}"))
    };
    let cpu = |s: &MixerSpec| CpuMixer::new(s, &CpuConfig::default_for(s, 64)).unwrap();
    // A convolution reads one sequence: no separate key length.
    let conv = by_name("long_conv_hyena");
    let mut x = random_inputs(&conv, 1, 32, 1);
    x.q_offset = 3;
    let err = cpu(&conv).run(&x).unwrap_err();
    assert!(
        matches!(err, RuntimeError::Invalid(_)) && err.to_string().contains("convolution"),
        "{err}"
    );
    // Segment ids are indexed by position: queries past the keys have none.
    let docs = by_name("document_mask");
    let x = random_inputs_kv(&docs, 1, 8, 40, 1).with_q_offset(35);
    let err = cpu(&docs).run(&x).unwrap_err();
    let msg = err.to_string();
    assert!(
        matches!(err, RuntimeError::BadInput { .. }) && msg.contains("35..43"),
        "{msg}"
    );
    // k and v must share the key length, and shape errors say which length.
    let llama = by_name("causal_gqa_llama3");
    let mut x = random_inputs_kv(&llama, 1, 4, 40, 1);
    x.v = random_inputs_kv(&llama, 1, 4, 39, 1).v;
    let msg = cpu(&llama).run(&x).unwrap_err().to_string();
    assert!(
        msg.contains("input `v`") && msg.contains("kv_seq=40"),
        "{msg}"
    );
}
