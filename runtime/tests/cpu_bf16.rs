//! bf16 runs on the CPU backend (`Precision::Bf16`): tile products in bf16
//! with f32 accumulation where the CPU has AVX-512 BF16, else the f32 path.
//! Every example at ragged lengths, several rings, odd widths and two
//! lengths matches the f64 reference within the documented bf16 tolerance;
//! where the bf16 products run, they differ from the f32 run by rounding
//! only, and where they cannot run (no AVX-512 BF16, `MIXC_CPU_BF16=0`, an
//! odd `block_n`, f64), the run is the f32 run bit for bit.

mod cpu_support;

use cpu_support::*;
use mixc_dsl::ir::{MixerSpec, Score};
use mixc_dsl::DType;
use mixc_runtime::cpu::{self, bf16, path_for, CpuConfig, CpuPath, Precision};
use mixc_runtime::inputs::{random_inputs_kv, round_to_dtype};
use mixc_runtime::reference;
use mixc_runtime::MixerInputs;

use cpu_support::square_cfg as cfg;

fn bf16_inputs(spec: &MixerSpec, seq: usize, kv_seq: usize, seed: u64) -> MixerInputs {
    let mut inputs = random_inputs_kv(spec, 2, seq, kv_seq, seed);
    round_to_dtype(&mut inputs, DType::Bf16).unwrap();
    inputs
}

/// Runs `spec` in bf16 and f32 on the same (bf16) inputs and checks both
/// against the reference; returns whether the bf16 products ran and whether
/// their result differed from the f32 run's.
fn check(spec: &MixerSpec, inputs: &MixerInputs, c: &CpuConfig, what: &str) -> (bool, bool) {
    let want = reference::evaluate(spec, inputs).expect("reference");
    let tol = reference::check_tolerance(DType::Bf16);
    let run = cpu::run(spec, inputs, c).unwrap_or_else(|e| panic!("{what}: {e}"));
    let got = run.output.to_f64();
    let err = rel_err(&got, &want);
    assert!(err <= tol, "{what}: rel err {err:e} > {tol:e}");
    let f32_run = cpu::run(
        spec,
        inputs,
        &CpuConfig {
            precision: Precision::F32,
            ..c.clone()
        },
    )
    .unwrap();
    let f32_out = f32_run.output.to_f64();
    let blocked = path_for(spec) == CpuPath::Blocked || !inputs.is_self_aligned();
    let can = bf16::enabled()
        && blocked
        && !run.stats.decode
        && matches!(spec.score, Score::Dot { .. })
        && c.block_n.is_multiple_of(2);
    assert_eq!(run.stats.bf16_products, can, "{what}: bf16 products ran?");
    if can {
        // Rounding of P and of the mapped q / k: small (and exactly 0 where
        // every rounded value is exact, e.g. one key).
        let d = rel_err(&got, &f32_out);
        assert!(d <= tol, "{what}: bf16 vs f32 differ by {d:e}");
        (true, d > 0.0)
    } else {
        assert_eq!(
            got.data, f32_out.data,
            "{what}: the fallback is the f32 run"
        );
        (false, false)
    }
}

#[test]
fn every_example_matches_the_reference_in_bf16() {
    let (mut ran, mut differed) = (0, 0);
    for (x, spec) in examples().iter().enumerate() {
        for (y, &(seq, ranks, block)) in [
            (1, 1, 16),
            (37, 3, 16),
            (150, 2, 64),
            (131, 8, 16),
            (301, 5, 32),
        ]
        .iter()
        .enumerate()
        {
            let inputs = bf16_inputs(spec, seq, seq, (x * 10 + y) as u64);
            let what = format!("{} L={seq} R={ranks} block {block}", spec.name);
            let (r, d) = check(spec, &inputs, &cfg(ranks, block, Precision::Bf16), &what);
            (ran, differed) = (ran + r as usize, differed + d as usize);
        }
    }
    if bf16::enabled() {
        assert!(ran > 0, "no run used the bf16 products");
        assert!(differed > 0, "the bf16 products never changed a result");
    } else {
        eprintln!("NOT EXERCISED: bf16 products (this CPU has no AVX-512 BF16, or MIXC_CPU_BF16=0): the f32 fallback was checked");
    }
}

/// Odd widths (a key dim that leaves half a pair, value columns that leave a
/// ragged vector), windowed linear variants on the blocked path, decode and
/// cross-attention shapes, an odd `block_n` (no pairs: the f32 products).
#[test]
fn odd_widths_linear_masks_and_two_lengths_in_bf16() {
    let mut specs: Vec<MixerSpec> = examples()
        .into_iter()
        .filter(|s| matches!(s.score, Score::Dot { .. }))
        .take(3)
        .map(|mut s| {
            s.head_dim = 33;
            s.value_dim = 40;
            s
        })
        .collect();
    specs.extend(blocked_linear_variants());
    for (x, spec) in specs.iter().enumerate() {
        for (seq, kv_seq, block) in [(77, 77, 16), (5, 140, 16), (60, 23, 32), (50, 50, 15)] {
            if seq > kv_seq && !spec.inputs.is_empty() {
                continue; // per-position inputs must cover the queries
            }
            let inputs = bf16_inputs(spec, seq, kv_seq, 100 + x as u64);
            let what = format!("{} L={seq} kv={kv_seq} block {block}", spec.name);
            check(spec, &inputs, &cfg(2, block, Precision::Bf16), &what);
        }
    }
}
