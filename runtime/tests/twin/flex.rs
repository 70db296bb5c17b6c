//! FlexAttention-style specs (expression masks of `i`, `j`, `h`, `b` and
//! tables; score modifications with `select`, `sin` / `cos`, `div`, `int`,
//! `kv_seq`) through the generated forward kernels as PTX in the simulator,
//! against the f64 reference, at a small ragged shape (L = 67: partial last
//! tiles, 2 heads, head_dim 16, 2 sequences so `b` matters).

use mixc_dsl::ir::DType;

use super::{max_rel_err, parse, run_sim};
use crate::ring::Sharding;
use crate::tensor::{ExtraTensor, Tensor};

const L: usize = 67;

fn spec(name: &str, body: &str) -> mixc_dsl::ir::MixerSpec {
    parse(&format!(
        "mixer {name} {{ heads = 2; head_dim = 16; {body} score = dot(q, k); norm = softmax; }}"
    ))
}

/// The specs the brief of the feature names, each with what it checks.
fn flex_specs() -> Vec<mixc_dsl::ir::MixerSpec> {
    vec![
        // Row 0 sees no key: o = 0, lse = -inf.
        spec("inverse_causal", "mask = j < i;"),
        spec("head_window", "mask = j <= i && i - j < 8 * (h + 1);"),
        spec("dilated_expr", "mask = (i - j) % 4 == 0;"),
        spec(
            "prefix_lm_batch",
            "input prefix: f32[batch]; mask = j <= i || j < int(prefix[b]);",
        ),
        spec(
            "trig_mod",
            "mask = causal; transform = s + sin(i * 1.0) * cos(j * 1.0);",
        ),
        spec("double", "mask = all; transform = s * 2.0;"),
        spec("square", "mask = causal; transform = s * s;"),
        spec(
            "select_bias",
            "mask = all; bias = select(i > j, -0.5 * (i - j), 0.0);",
        ),
        spec("log_len", "mask = causal; bias = -log(1.0 * kv_seq);"),
        spec(
            "rel_div",
            "input rel: f32[heads, 64]; mask = all; bias = rel[h][div(i - j, 4) + 32];",
        ),
    ]
}

/// Each spec's forward kernel (bf16 tensor cores; the f32 SIMT kernel for
/// two of them) matches the reference; a row that sees no key is zero.
#[test]
fn sim_flex_attention_specs_match_the_reference() {
    let specs = flex_specs();
    for (n, spec) in specs.iter().enumerate() {
        let mut x = crate::inputs::random_inputs(spec, 2, L, 300 + n as u64);
        if x.extra.contains_key("prefix") {
            // Per-sequence prefixes inside the sequence, one fractional
            // (`int` truncates), so the two rows of the batch differ.
            x.extra.insert(
                "prefix".into(),
                ExtraTensor::F32(Tensor::new(vec![2], vec![20.7, 45.0])),
            );
        }
        let dts: &[DType] = if n % 5 == 0 {
            &[DType::Bf16, DType::F32]
        } else {
            &[DType::Bf16]
        };
        for &dt in dts {
            let mut x = x.clone();
            crate::inputs::round_to_dtype(&mut x, dt).unwrap();
            let want = crate::reference::evaluate(spec, &x).unwrap();
            let t0 = std::time::Instant::now();
            let (got, st) = run_sim(spec, &x, dt, None, 1, Sharding::Contiguous);
            let err = max_rel_err(&got, &want);
            eprintln!(
                "{} {dt:?} L {L} batch 2: {} CTAs, {} instructions, err {err:.2e} ({:.1?})",
                spec.name,
                st.ctas,
                st.instructions,
                t0.elapsed()
            );
            assert!(st.ctas > 0, "nothing ran");
            let tol = if dt == DType::F32 { 2e-4 } else { 1e-2 };
            assert!(
                err <= tol,
                "{} {dt:?}: error {err:.2e} > {tol:.0e}",
                spec.name
            );
            if spec.name == "inverse_causal" {
                // [batch, seq, heads, dv]: position 0 of both sequences.
                let row = 2 * 16;
                for b in 0..2 {
                    let o0 = &got.data[b * L * row..b * L * row + row];
                    assert!(
                        o0.iter().all(|&v| v == 0.0),
                        "row 0 of sequence {b}: {o0:?}"
                    );
                }
            }
        }
    }
}

/// The prefix really is per sequence: with the prefixes swapped, the
/// output changes (a kernel reading `b` as 0 would not notice).
#[test]
fn sim_flex_masks_read_the_batch_index() {
    let spec = &flex_specs()[3];
    assert_eq!(spec.name, "prefix_lm_batch");
    let mut x = crate::inputs::random_inputs(spec, 2, L, 77);
    crate::inputs::round_to_dtype(&mut x, DType::Bf16).unwrap();
    let run = |x: &crate::tensor::MixerInputs| {
        run_sim(spec, x, DType::Bf16, None, 1, Sharding::Contiguous).0
    };
    let mut outs = Vec::new();
    for prefix in [vec![3.0, 60.0], vec![60.0, 3.0]] {
        let mut x = x.clone();
        x.extra.insert(
            "prefix".into(),
            ExtraTensor::F32(Tensor::new(vec![2], prefix)),
        );
        let want = crate::reference::evaluate(spec, &x).unwrap();
        let got = run(&x);
        let err = max_rel_err(&got, &want);
        assert!(err <= 1e-2, "error {err:.2e}");
        outs.push(got);
    }
    let half = outs[0].data.len() / 2;
    assert_ne!(
        outs[0].data[..half],
        outs[1].data[..half],
        "sequence 0 ignores its prefix"
    );
    assert_ne!(
        outs[0].data[half..],
        outs[1].data[half..],
        "sequence 1 ignores its prefix"
    );
}

/// A Hugging Face additive mask (`0` / `-inf` per pair) as a bias table:
/// sequence 0 hides every key past 50 and all keys of row 7 (a row that
/// sees nothing: the kernels treat a row maximum of `-inf` as a row with no
/// key, as the reference does), sequence 1 every key but multiples of 3.
#[test]
fn sim_neg_inf_bias_tables_mask_like_the_reference() {
    let spec = spec(
        "additive",
        "input am: f32[batch, seq, seq]; mask = all; bias = am[b][i][j];",
    );
    let mut x = crate::inputs::random_inputs(&spec, 2, L, 91);
    let mut am = vec![0f32; 2 * L * L];
    for i in 0..L {
        for j in 0..L {
            let hide0 = j > 50 || i == 7;
            let hide1 = j % 3 != 0;
            if hide0 {
                am[i * L + j] = f32::NEG_INFINITY;
            }
            if hide1 {
                am[L * L + i * L + j] = f32::NEG_INFINITY;
            }
        }
    }
    x.extra.insert(
        "am".into(),
        ExtraTensor::F32(Tensor::new(vec![2, L, L], am)),
    );
    for dt in [DType::Bf16, DType::F32] {
        let mut x = x.clone();
        crate::inputs::round_to_dtype(&mut x, dt).unwrap();
        crate::inputs::validate_inputs(&spec, &x).expect("-inf is allowed in a bias table");
        let want = crate::reference::evaluate(&spec, &x).unwrap();
        let (got, _) = run_sim(&spec, &x, dt, None, 1, Sharding::Contiguous);
        assert!(
            got.data.iter().all(|v| v.is_finite()),
            "{dt:?}: non-finite output"
        );
        let err = max_rel_err(&got, &want);
        let tol = if dt == DType::F32 { 2e-4 } else { 1e-2 };
        assert!(err <= tol, "{dt:?}: error {err:.2e}");
        // Row 7 of sequence 0 sees nothing: exactly 0.
        let row = 2 * 16;
        assert!(got.data[7 * row..8 * row].iter().all(|&v| v == 0.0));
    }
}

/// The device bounds a condition over each tile (mask.cuh's interval rules),
/// so chunked attention (Llama 4's pattern, chunks of one query tile) skips
/// every tile across chunks that causal alone computes: half the
/// tensor-core work of plain causal for the same inputs, and the
/// reference's answer.
#[test]
fn sim_condition_masks_skip_tiles_on_the_device() {
    const LEN: usize = 384;
    let chunked = spec(
        "chunked_long",
        "mask = j <= i && div(i, 128) == div(j, 128);",
    );
    let causal = spec("causal_long", "mask = causal;");
    let mut x = crate::inputs::random_inputs(&chunked, 1, LEN, 5);
    crate::inputs::round_to_dtype(&mut x, DType::Bf16).unwrap();
    let mut mma = Vec::new();
    for s in [&chunked, &causal] {
        let want = crate::reference::evaluate(s, &x).unwrap();
        let (got, st) = run_sim(s, &x, DType::Bf16, None, 1, Sharding::Contiguous);
        let err = max_rel_err(&got, &want);
        assert!(err <= 1e-2, "{}: error {err:.2e}", s.name);
        mma.push(st.mma);
    }
    eprintln!(
        "tensor-core instructions: chunked {}, causal {}",
        mma[0], mma[1]
    );
    // Query blocks of 128 over key tiles of 64: causal computes 2 + 4 + 6
    // tiles, chunked 2 + 2 + 2.
    assert_eq!(
        2 * mma[0],
        mma[1],
        "chunked {} vs causal {}",
        mma[0],
        mma[1]
    );
}

#[path = "../flex_support/mod.rs"]
mod flex_support;

/// Every FlexAttention mod of the shared list (`flex_support::SPECS`, the
/// cases `flex_parity.rs` checks on the CPU against a FlexAttention-style
/// oracle) through the generated forward kernel (bf16 tensor cores) against
/// the reference, at L = 67, batch 2, tables set as the CPU test sets them.
#[test]
fn sim_every_shared_flex_case_matches_the_reference() {
    for (n, (name, _)) in flex_support::SPECS.iter().enumerate() {
        let spec = flex_support::spec(name, "bf16");
        let mut x = crate::inputs::random_inputs(&spec, 2, L, 500 + n as u64);
        for (input, t) in x.extra.iter_mut() {
            match t {
                ExtraTensor::F32(t) => flex_support::fill_table(input, &t.shape, &mut t.data),
                ExtraTensor::I32(t) => flex_support::fill_table_i32(input, &t.shape, &mut t.data),
            }
        }
        crate::inputs::round_to_dtype(&mut x, DType::Bf16).unwrap();
        let want = crate::reference::evaluate(&spec, &x).unwrap();
        let (got, st) = run_sim(&spec, &x, DType::Bf16, None, 1, Sharding::Contiguous);
        let err = max_rel_err(&got, &want);
        assert!(st.ctas > 0, "{name}: nothing ran");
        assert!(err <= 1e-2, "{name}: error {err:.2e}");
    }
}
