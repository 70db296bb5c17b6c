//! FlexAttention parity: every `score_mod` and `mask_mod` of PyTorch's own
//! FlexAttention tests (`test/inductor/test_flex_attention.py`: identity,
//! times_two, squared, causal, inverse causal, rel_bias, rel_causal, alibi,
//! head_offset, trig, trig2, generated windows, prefix-LM with per-example
//! lengths, document masks, sliding window, softcap, batch- and
//! batch-head-indexed biases), plus the patterns the language now says
//! inline (per-head windows, expression dilation, T5 log buckets, global
//! tokens from a flag input, `-inf` additive masks, chunked attention), each
//! written as a mixc spec and checked against a FlexAttention-style oracle
//! written here in f64: `score_mod(q . k * scale, b, h, q_idx, kv_idx)`, then
//! `mask_mod(b, h, q_idx, kv_idx)` (`-inf` where false), softmax over keys, a
//! row with no key giving 0. The oracle shares nothing with mixc's reference
//! evaluator; the reference and the CPU backend (f64 and f32, R in {1, 3},
//! contiguous and zigzag) must both match it, and the CPU backward must match
//! the reference gradients.

use mixc_dsl::ir::MixerSpec;
use mixc_runtime::cpu::{CpuConfig, CpuMixer, Precision, Sharding};
use mixc_runtime::inputs::{random_inputs, random_upstream};
use mixc_runtime::tensor::ExtraTensor;
use mixc_runtime::{reference, MixerInputs, Tensor};

mod flex_support;

use flex_support::{DIM, HEADS};

const BATCH: usize = 2;

/// What a score_mod / mask_mod reads.
struct At<'a> {
    b: usize,
    h: usize,
    q: usize,
    kv: usize,
    seq: usize,
    inp: &'a MixerInputs,
}

impl At<'_> {
    /// `name[idx]` of an f32 input.
    fn f(&self, name: &str, idx: &[usize]) -> f64 {
        match &self.inp.extra[name] {
            ExtraTensor::F32(t) => {
                let idx: Vec<usize> = idx.to_vec();
                t.data[t.offset(&idx)] as f64
            }
            ExtraTensor::I32(t) => t.data[t.offset(idx)] as f64,
        }
    }
    fn d(&self) -> f64 {
        self.q as f64 - self.kv as f64
    }
}

type ScoreMod = fn(f64, &At) -> f64;
type MaskMod = fn(&At) -> bool;

struct Case {
    name: &'static str,
    score_mod: ScoreMod,
    mask_mod: MaskMod,
}

fn keep(s: f64, _: &At) -> f64 {
    s
}
fn everything(_: &At) -> bool {
    true
}

/// T5's bucket of a distance: exact below 8, logarithmic up to 16 buckets.
fn t5_bucket(n: f64) -> usize {
    if n < 8.0 {
        n as usize
    } else {
        (8 + ((n / 8.0).ln() / 16f64.ln() * 8.0) as i64).min(15) as usize
    }
}

fn cases() -> Vec<Case> {
    vec![
        Case {
            name: "identity",
            score_mod: keep,
            mask_mod: everything,
        },
        Case {
            name: "times_two",
            score_mod: |s, _| s * 2.0,
            mask_mod: everything,
        },
        Case {
            name: "squared",
            score_mod: |s, _| s * s,
            mask_mod: everything,
        },
        Case {
            name: "causal",
            score_mod: keep,
            mask_mod: |a| a.q >= a.kv,
        },
        Case {
            name: "inverse_causal",
            score_mod: keep,
            mask_mod: |a| a.q <= a.kv,
        },
        Case {
            // Row 0 sees no key at all: output 0.
            name: "strictly_past",
            score_mod: keep,
            mask_mod: |a| a.kv < a.q,
        },
        Case {
            name: "rel_bias",
            score_mod: |s, a| s + a.d(),
            mask_mod: everything,
        },
        Case {
            name: "rel_causal",
            score_mod: |s, a| s + a.d(),
            mask_mod: |a| a.q >= a.kv,
        },
        Case {
            // FlexAttention's `_generate_alibi_bias(num_heads)`.
            name: "alibi",
            score_mod: |s, a| s - a.d() * (-((a.h + 1) as f64) * 8.0 / HEADS as f64).exp2(),
            mask_mod: everything,
        },
        Case {
            name: "alibi_slope",
            score_mod: |s, a| s - a.d() * (-((a.h + 1) as f64) * 8.0 / HEADS as f64).exp2(),
            mask_mod: everything,
        },
        Case {
            name: "head_offset",
            score_mod: |s, a| s * a.f("off", &[a.h]),
            mask_mod: everything,
        },
        Case {
            // torch.sin(torch.cos(score)) + torch.tan(b)
            name: "trig",
            score_mod: |s, a| s.cos().sin() + (a.b as f64).tan(),
            mask_mod: everything,
        },
        Case {
            name: "trig2",
            score_mod: |s, a| s.cos() * s.sin() + (a.b as f64).tan(),
            mask_mod: everything,
        },
        Case {
            // `_generate_windowed(offset = 3)`: q + offset >= kv.
            name: "windowed",
            score_mod: keep,
            mask_mod: |a| a.q + 3 >= a.kv,
        },
        Case {
            // prefix_lengths[b] >= kv, or causal.
            name: "prefix_lm_per_example",
            score_mod: keep,
            mask_mod: |a| a.kv as f64 <= a.f("prefix", &[a.b]) || a.kv <= a.q,
        },
        Case {
            name: "prefix_lm_i32_lengths",
            score_mod: keep,
            mask_mod: |a| (a.kv as f64) < a.f("plen", &[a.b]) || a.kv <= a.q,
        },
        Case {
            name: "document_i32_expression",
            score_mod: |s, a| s + 0.25 * a.f("ids", &[a.b, a.kv]),
            mask_mod: |a| a.kv <= a.q && a.f("ids", &[a.b, a.q]) == a.f("ids", &[a.b, a.kv]),
        },
        Case {
            name: "document",
            score_mod: keep,
            mask_mod: |a| a.f("doc", &[a.b, a.q]) == a.f("doc", &[a.b, a.kv]),
        },
        Case {
            name: "causal_document_expression",
            score_mod: keep,
            mask_mod: |a| a.kv <= a.q && a.f("doc", &[a.b, a.q]) == a.f("doc", &[a.b, a.kv]),
        },
        Case {
            name: "sliding_window",
            score_mod: keep,
            mask_mod: |a| a.kv <= a.q && a.q - a.kv <= 8,
        },
        Case {
            name: "softcap",
            score_mod: |s, _| 0.5 * (s / 0.5).tanh(),
            mask_mod: everything,
        },
        Case {
            name: "batch_bias",
            score_mod: |s, a| s + a.f("bb", &[a.b]),
            mask_mod: everything,
        },
        Case {
            name: "batch_head_bias",
            score_mod: |s, a| s + a.f("bh", &[a.b, a.h]),
            mask_mod: |a| a.kv <= a.q,
        },
        Case {
            name: "per_head_window",
            score_mod: keep,
            mask_mod: |a| a.kv <= a.q && a.q - a.kv < 8 * (a.h + 1),
        },
        Case {
            name: "expression_dilation",
            score_mod: keep,
            mask_mod: |a| (a.q as i64 - a.kv as i64) % 4 == 0,
        },
        Case {
            name: "t5_log_buckets",
            score_mod: |s, a| s + a.f("rel", &[a.h, t5_bucket(a.d().abs())]),
            mask_mod: everything,
        },
        Case {
            name: "sigmoid_length_bias",
            score_mod: |s, a| s - (a.seq as f64).ln(),
            mask_mod: |a| a.kv <= a.q || a.kv + 4 >= a.seq,
        },
        Case {
            name: "global_tokens_flag",
            score_mod: keep,
            mask_mod: |a| a.kv <= a.q && (a.f("flag", &[a.b, a.kv]) > 0.5 || a.q - a.kv < 4),
        },
        Case {
            // Hugging Face's additive mask: 0 or -inf per key.
            name: "additive_neg_inf",
            score_mod: |s, a| s + a.f("am", &[a.b, a.kv]),
            mask_mod: everything,
        },
        Case {
            name: "select_bias",
            score_mod: |s, a| s + if a.q > a.kv { -0.5 * a.d() } else { 0.0 },
            mask_mod: |a| a.kv <= a.q + 2,
        },
        Case {
            // Chunked attention (Llama 4 style), written with floor division.
            name: "chunked",
            score_mod: keep,
            mask_mod: |a| a.kv <= a.q && a.q / 16 == a.kv / 16,
        },
    ]
}

fn spec_of(c: &Case) -> MixerSpec {
    flex_support::spec(c.name, "f32")
}

/// Random q, k, v; the tables given values that make each case bite.
fn inputs_of(spec: &MixerSpec, seq: usize, seed: u64) -> MixerInputs {
    let mut inp = random_inputs(spec, BATCH, seq, seed);
    for (name, t) in inp.extra.iter_mut() {
        match t {
            ExtraTensor::F32(t) => flex_support::fill_table(name, &t.shape, &mut t.data),
            ExtraTensor::I32(t) => flex_support::fill_table_i32(name, &t.shape, &mut t.data),
        }
    }
    inp
}

/// The oracles here and the specs of `flex_support` name the same cases.
#[test]
fn every_shared_spec_has_an_oracle() {
    let mut ours: Vec<&str> = cases().iter().map(|c| c.name).collect();
    let mut shared: Vec<&str> = flex_support::SPECS.iter().map(|(n, _)| *n).collect();
    ours.sort_unstable();
    shared.sort_unstable();
    assert_eq!(ours, shared);
}

/// The FlexAttention-style oracle: `[batch, seq, heads, dim]`.
fn oracle(c: &Case, inp: &MixerInputs) -> Vec<f64> {
    let (l, scale) = (inp.seq, 1.0 / (DIM as f64).sqrt());
    let row = |t: &Tensor<f32>, b: usize, p: usize, h: usize| {
        let o = t.offset(&[b, p, h, 0]);
        t.data[o..o + DIM]
            .iter()
            .map(|&x| x as f64)
            .collect::<Vec<f64>>()
    };
    let mut out = vec![0.0; BATCH * l * HEADS * DIM];
    for b in 0..BATCH {
        for h in 0..HEADS {
            for q in 0..l {
                let qr = row(&inp.q, b, q, h);
                let scores: Vec<f64> = (0..l)
                    .map(|kv| {
                        let at = At {
                            b,
                            h,
                            q,
                            kv,
                            seq: l,
                            inp,
                        };
                        if !(c.mask_mod)(&at) {
                            return f64::NEG_INFINITY;
                        }
                        let kr = row(&inp.k, b, kv, h);
                        let dot: f64 = qr.iter().zip(&kr).map(|(x, y)| x * y).sum();
                        (c.score_mod)(dot * scale, &at)
                    })
                    .collect();
                let m = scores.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                if m == f64::NEG_INFINITY {
                    continue; // no key: output 0
                }
                let w: Vec<f64> = scores.iter().map(|s| (s - m).exp()).collect();
                let z: f64 = w.iter().sum();
                let o = ((b * l + q) * HEADS + h) * DIM;
                for (kv, wk) in w.iter().enumerate() {
                    for (d, vd) in row(&inp.v, b, kv, h).iter().enumerate() {
                        out[o + d] += wk / z * vd;
                    }
                }
            }
        }
    }
    out
}

fn max_err(got: &[f64], want: &[f64]) -> (f64, f64) {
    assert_eq!(got.len(), want.len());
    let err = got
        .iter()
        .zip(want)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0, |m, d| if d.is_nan() || d > m { d } else { m });
    (err, want.iter().fold(0f64, |m, x| m.max(x.abs())))
}

fn cpu(spec: &MixerSpec, ranks: usize, sharding: Sharding, precision: Precision) -> CpuMixer {
    let cfg = CpuConfig {
        ranks,
        sharding,
        block_m: 16,
        block_n: 16,
        chunk: 16,
        threads: 2,
        precision,
    };
    CpuMixer::new(spec, &cfg).expect("the CPU backend runs every checked spec")
}

#[test]
fn every_flex_attention_mod_matches_the_oracle_on_the_reference_and_the_cpu() {
    for c in cases() {
        let spec = spec_of(&c);
        for seq in [1, 37, 70] {
            let inp = inputs_of(&spec, seq, 7 + seq as u64);
            let want = oracle(&c, &inp);
            let r = reference::evaluate(&spec, &inp).expect("reference");
            let (err, scale) = max_err(&r.data, &want);
            assert!(
                err <= 1e-10 * scale.max(1.0),
                "{} L={seq}: reference off by {err:e}",
                c.name
            );
            for ranks in [1, 3].into_iter().filter(|&r| r <= seq) {
                for sharding in [Sharding::Contiguous, Sharding::Zigzag] {
                    for (precision, tol) in [(Precision::F64, 1e-10), (Precision::F32, 2e-4)] {
                        let got = cpu(&spec, ranks, sharding, precision)
                            .run(&inp)
                            .expect("cpu run")
                            .output
                            .to_f64();
                        let (err, scale) = max_err(&got.data, &want);
                        assert!(
                            err <= tol * scale.max(1.0),
                            "{} L={seq} R={ranks} {sharding:?} {precision:?}: off by {err:e}",
                            c.name
                        );
                    }
                }
            }
        }
    }
}

/// The rows that see no key are exactly 0 with a log-sum-exp of -inf, in
/// the reference and the CPU backend.
#[test]
fn rows_without_keys_give_zero_and_neg_inf() {
    let c = cases()
        .into_iter()
        .find(|c| c.name == "strictly_past")
        .unwrap();
    let spec = spec_of(&c);
    let inp = inputs_of(&spec, 20, 3);
    let run = cpu(&spec, 1, Sharding::Contiguous, Precision::F32)
        .run_train(&inp)
        .expect("cpu run");
    let o = run.output.to_f64();
    for b in 0..BATCH {
        for h in 0..HEADS {
            let at = o.offset(&[b, 0, h, 0]);
            assert!(o.data[at..at + DIM].iter().all(|&x| x == 0.0));
            // stat is [batch, heads, seq]: row 0 of every head has no key.
            assert_eq!(run.stat.data[(b * HEADS + h) * 20], f64::NEG_INFINITY);
            assert!(run.stat.data[(b * HEADS + h) * 20 + 1].is_finite());
        }
    }
}

/// The CPU backward equals the reference gradients for every case (tables
/// included), at a ragged length with a ring of 3.
#[test]
fn every_flex_attention_mod_has_cpu_gradients_equal_to_the_reference() {
    for c in cases() {
        let spec = spec_of(&c);
        let seq = 37;
        let inp = inputs_of(&spec, seq, 11);
        let d_o = random_upstream(&spec, BATCH, seq, 5);
        let want = reference::gradients(&spec, &inp, &d_o).expect("reference gradients");
        for ranks in [1, 3] {
            let m = cpu(&spec, ranks, Sharding::Zigzag, Precision::F64);
            let fwd = m.run_train(&inp).expect("forward");
            let got = m
                .backward(&inp, &fwd.output.to_f32(), &fwd.stat, &d_o)
                .unwrap_or_else(|e| panic!("{}: {e}", c.name))
                .into_f32();
            let got = got.named();
            // Judged against the largest gradient: a table gradient that is 0
            // in exact arithmetic (a per-example bias under softmax) is all
            // rounding of the f32 output.
            let largest = want
                .named()
                .iter()
                .flat_map(|(_, w)| w.data.iter())
                .fold(0f64, |m, x| m.max(x.abs()));
            for (name, w) in want.named() {
                let (_, g) = got.iter().find(|(n, _)| *n == name).expect("same names");
                let g: Vec<f64> = g.data.iter().map(|&x| x as f64).collect();
                let (err, scale) = max_err(&g, &w.data);
                assert!(
                    err <= 1e-5 * largest.max(1e-2),
                    "{} R={ranks}: d{name} off by {err:e} of {scale:e}",
                    c.name
                );
            }
        }
    }
}

/// The reference gradients of the new functions (sin, cos, select, int,
/// tanh, tables read through them) agree with finite differences of the
/// oracle, which never differentiates anything.
#[test]
fn new_functions_have_gradients_matching_finite_differences() {
    for name in [
        "trig",
        "trig2",
        "select_bias",
        "t5_log_buckets",
        "head_offset",
        "softcap",
    ] {
        let c = cases().into_iter().find(|c| c.name == name).unwrap();
        let spec = spec_of(&c);
        let seq = 9;
        let inp = inputs_of(&spec, seq, 13);
        let d_o = random_upstream(&spec, BATCH, seq, 17);
        let grads = reference::gradients(&spec, &inp, &d_o).expect("gradients");
        let loss = |inp: &MixerInputs| -> f64 {
            oracle(&c, inp)
                .iter()
                .zip(&d_o.data)
                .map(|(o, g)| o * *g as f64)
                .sum()
        };
        let named = grads.named();
        // A few q elements and, where there is one, every table element.
        let mut probes: Vec<(String, usize)> = (0..6)
            .map(|x| ("q".into(), x * 97 % inp.q.data.len()))
            .collect();
        for (t, tensor) in &inp.extra {
            if let ExtraTensor::F32(tt) = tensor {
                probes.extend((0..tt.data.len().min(12)).map(|x| (t.clone(), x)));
            }
        }
        for (tensor, at) in probes {
            let eps = 1e-3;
            let bump = |delta: f32| {
                let mut p = inp.clone();
                match tensor.as_str() {
                    "q" => p.q.data[at] += delta,
                    t => match p.extra.get_mut(t) {
                        Some(ExtraTensor::F32(x)) => x.data[at] += delta,
                        _ => unreachable!(),
                    },
                }
                loss(&p)
            };
            let fd = (bump(eps) - bump(-eps)) / (2.0 * eps as f64);
            let key = format!("d{tensor}");
            let (_, g) = named
                .iter()
                .find(|(n, _)| *n == key)
                .unwrap_or_else(|| panic!("{name}: no gradient {key}"));
            let got = g.data[at];
            assert!(
                (got - fd).abs() <= 2e-3 * (1.0 + fd.abs()),
                "{name}: d{tensor}[{at}] = {got}, finite differences {fd}"
            );
        }
    }
}
