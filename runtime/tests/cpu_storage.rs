//! q, k, v and the output stored in bf16 or f16 on the host
//! (`MixerInputs<bf16>`, `MixerInputs<f16>`): the CPU backend reads them in
//! place and computes exactly what it computes on the same values in f32,
//! so every example at ragged lengths and rings gives the f32 run's output
//! rounded once to the storage type, bit for bit; and the f64 reference
//! reads them too. (Their peak memory: `cpu_memory.rs`.)

mod cpu_support;

use cpu_support::*;
use mixc_dsl::ir::MixerSpec;
use mixc_dsl::DType;
use mixc_runtime::cpu::{self, CpuConfig, Precision};
use mixc_runtime::inputs::{into_storage, random_inputs_kv, random_inputs_kv_as};
use mixc_runtime::{bf16, f16, reference, HostElem, MixerInputs, OutElem, Tensor};

use cpu_support::square_cfg as cfg;

/// The run of `x` (stored as `E`) is the f32 run of the same values with
/// its output rounded to `E`, bit for bit; and it is within the storage
/// type's tolerance of the f64 reference, which reads `x` as stored.
fn same_as_f32<E: HostElem + OutElem>(
    spec: &MixerSpec,
    x: &MixerInputs<E>,
    c: &CpuConfig,
    what: &str,
) {
    let got: Tensor<E> = cpu::run(spec, x, c)
        .unwrap_or_else(|e| panic!("{what}: {e}"))
        .output
        .into_elem();
    let wide = x.to_f32();
    let f32_out: Tensor<f32> = cpu::run(spec, &*wide, c).unwrap().output.into_f32();
    assert_eq!(got.shape, f32_out.shape, "{what}");
    let want: Tensor<E> = f32_out.convert();
    if let Some(at) = (0..got.numel())
        .find(|&i| got.data[i].to_f32().to_bits() != want.data[i].to_f32().to_bits())
    {
        panic!(
            "{what}: element {at} is {:?}, the f32 run rounded gives {:?}",
            got.data[at], want.data[at]
        );
    }
    let reference = reference::evaluate(spec, x).unwrap();
    assert_eq!(
        reference::evaluate(spec, &*wide).unwrap().data,
        reference.data,
        "{what}: the reference reads the stored values"
    );
    let got64 = Tensor::new(
        got.shape.clone(),
        got.data.iter().map(|v| v.to_f64()).collect(),
    );
    let err = rel_err(&got64, &reference);
    let tol = reference::check_tolerance(E::DTYPE);
    assert!(err <= tol, "{what}: rel err {err:e} > {tol:e}");
}

#[test]
fn every_example_stored_in_16_bits_is_the_f32_run_rounded() {
    for (x, spec) in examples().iter().enumerate() {
        for (y, &(seq, ranks, block)) in [(1, 1, 16), (37, 3, 16), (150, 2, 64), (301, 5, 32)]
            .iter()
            .enumerate()
        {
            let seed = (x * 10 + y) as u64;
            let what = format!("{} L={seq} R={ranks}", spec.name);
            let b: MixerInputs<bf16> = random_inputs_kv_as(spec, 2, seq, seq, seed);
            same_as_f32(
                spec,
                &b,
                &cfg(ranks, block, Precision::Bf16),
                &format!("{what} bf16"),
            );
            let h: MixerInputs<f16> = random_inputs_kv_as(spec, 2, seq, seq, seed);
            same_as_f32(
                spec,
                &h,
                &cfg(ranks, block, Precision::F32),
                &format!("{what} f16"),
            );
        }
    }
}

/// Fewer queries than keys (decode), more queries than keys, and a state
/// form (chunkwise) read 16-bit inputs too.
#[test]
fn two_lengths_stored_in_bf16() {
    for spec in examples() {
        for (seq, kv_seq) in [(1, 200), (5, 131), (150, 40)] {
            // Convolutions take one length; inputs indexed by position
            // need the queries among the keys.
            let dot = matches!(spec.score, mixc_dsl::ir::Score::Dot { .. });
            if !dot || (seq > kv_seq && spec.positional_input().is_some()) {
                continue;
            }
            let x: MixerInputs<bf16> = random_inputs_kv_as(&spec, 2, seq, kv_seq, 3);
            let what = format!("{} {seq}x{kv_seq}", spec.name);
            same_as_f32(&spec, &x, &cfg(1, 16, Precision::Bf16), &what);
        }
    }
}

/// Random inputs made in a 16-bit type are the f32 ones rounded, and
/// converting given f32 inputs refuses values the type cannot hold.
#[test]
fn inputs_made_in_16_bits_are_the_f32_ones_rounded() {
    let spec = examples().into_iter().next().unwrap();
    let f: MixerInputs = random_inputs_kv(&spec, 2, 70, 70, 9);
    let b: MixerInputs<bf16> = random_inputs_kv_as(&spec, 2, 70, 70, 9);
    assert_eq!(into_storage::<bf16>(f.clone(), DType::Bf16).unwrap(), b);
    let mut big = f.clone();
    big.q.data[5] = 70000.0;
    let err = into_storage::<f16>(big, DType::F16)
        .unwrap_err()
        .to_string();
    assert!(err.contains("q") && err.contains("65504"), "{err}");
}
