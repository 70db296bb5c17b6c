//! Block skipping under expression masks is measured, not assumed: the
//! tiles the CPU backend computes (Full + Partial) are compared with the
//! tiles that truly hold an allowed pair, found by brute force, for a
//! per-head window written as an expression and for a block-mask input
//! keeping 10% of the blocks. Both must be within 5% of the truth (the
//! classifier is exact for both here), and the output still equals the
//! reference.

use mixc_dsl::ir::MixerSpec;
use mixc_runtime::cpu::{CpuConfig, CpuMixer, Precision, Sharding};
use mixc_runtime::inputs::random_inputs;
use mixc_runtime::tensor::ExtraTensor;
use mixc_runtime::{reference, MixerInputs};

const L: usize = 512;
const TILE: usize = 32;
const HEADS: usize = 4;

fn spec(items: &str) -> MixerSpec {
    mixc_dsl::parse_str(&format!(
        "mixer m {{ heads = {HEADS}; head_dim = 16; dtype = f32; {items} }}"
    ))
    .unwrap()
}

/// Fraction of the (head, query tile, key tile) tiles with an allowed pair.
fn true_fraction(spec: &MixerSpec, inp: &MixerInputs) -> f64 {
    let lookup = |name: &str, idx: &[i64]| inp.extra[name].get_clamped(idx);
    let nt = L / TILE;
    let mut live = 0;
    for h in 0..HEADS {
        for qt in 0..nt {
            for kt in 0..nt {
                let any = (qt * TILE..(qt + 1) * TILE).any(|i| {
                    (kt * TILE..(kt + 1) * TILE).any(|j| {
                        let mut env = inp.eval_env(spec.heads, &lookup);
                        (env.h, env.i, env.j) = (h as i64, i as i64, j as i64);
                        spec.mask.allows(&env, &|_, _| 0)
                    })
                });
                live += usize::from(any);
            }
        }
    }
    live as f64 / (HEADS * nt * nt) as f64
}

/// Fraction of the tiles the CPU backend computed, and its output.
fn computed_fraction(spec: &MixerSpec, inp: &MixerInputs) -> (f64, Vec<f64>) {
    let cfg = CpuConfig {
        ranks: 1,
        sharding: Sharding::Contiguous,
        block_m: TILE,
        block_n: TILE,
        chunk: TILE,
        threads: 2,
        precision: Precision::F64,
    };
    let run = CpuMixer::new(spec, &cfg).unwrap().run(inp).unwrap();
    let t = &run.stats.tiles;
    let nt = L / TILE;
    (
        (t.full + t.partial) as f64 / (HEADS * nt * nt) as f64,
        run.output.to_f64().data.into_vec(),
    )
}

fn check(name: &str, spec: &MixerSpec, inp: &MixerInputs, expect_true: Option<f64>) {
    let truth = true_fraction(spec, inp);
    if let Some(want) = expect_true {
        assert!((truth - want).abs() < 0.01, "{name}: {truth}");
    }
    let (computed, out) = computed_fraction(spec, inp);
    assert!(
        computed >= truth - 1e-12 && computed - truth <= 0.05,
        "{name}: computed {computed} of the tiles, {truth} hold an allowed pair"
    );
    let want = reference::evaluate(spec, inp).unwrap().data;
    let err = out
        .iter()
        .zip(&want)
        .fold(0f64, |m, (a, b)| m.max((a - b).abs()));
    assert!(err < 1e-9, "{name}: off by {err:e}");
}

#[test]
fn a_per_head_window_expression_skips_what_it_should() {
    let s = spec("mask = j <= i && i - j < 40 * (h + 1);");
    let inp = random_inputs(&s, 1, L, 1);
    check("per-head window", &s, &inp, None);
}

#[test]
fn a_block_mask_input_keeping_a_tenth_skips_nine_tenths() {
    let s = spec(&format!(
        "input bm: f32[batch, heads, {n}, {n}]; mask = bm[b][h][div(i, {TILE})][div(j, {TILE})] > 0.5;",
        n = L / TILE
    ));
    let mut inp = random_inputs(&s, 1, L, 2);
    let n = L / TILE;
    if let Some(ExtraTensor::F32(t)) = inp.extra.get_mut("bm") {
        for h in 0..HEADS {
            for qb in 0..n {
                for kb in 0..n {
                    let keep = (qb * 7 + kb * 3 + h) % 10 == 0;
                    t.data[(h * n + qb) * n + kb] = f32::from(keep);
                }
            }
        }
    }
    check("block mask 10%", &s, &inp, Some(0.1));
}
