//! q, k, v and the output stored in bf16 or f16 on the host
//! (`MixerInputs<bf16>`, `MixerInputs<f16>`): the CPU backend reads them in
//! place and computes exactly what it computes on the same values in f32,
//! so every example at ragged lengths and rings gives the f32 run's output
//! rounded once to the storage type, bit for bit; and the f64 reference
//! reads them too. Their peak memory is measured against an f32 run's.

mod cpu_support;

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};

use cpu_support::*;
use mixc_dsl::ir::{Mask, MixerSpec};
use mixc_dsl::DType;
use mixc_runtime::cpu::{self, CpuConfig, Precision, Sharding};
use mixc_runtime::inputs::{into_storage, random_inputs_kv, random_inputs_kv_as};
use mixc_runtime::{bf16, f16, reference, HostElem, MixerInputs, OutElem, Tensor};

struct Counting;
static NOW: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

// SAFETY: forwards to the system allocator; only counts.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        let p = System.alloc(l);
        if !p.is_null() {
            let now = NOW.fetch_add(l.size(), Ordering::Relaxed) + l.size();
            PEAK.fetch_max(now, Ordering::Relaxed);
        }
        p
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        System.dealloc(p, l);
        NOW.fetch_sub(l.size(), Ordering::Relaxed);
    }
}

#[global_allocator]
static A: Counting = Counting;

fn cfg(ranks: usize, block: usize, precision: Precision) -> CpuConfig {
    CpuConfig {
        ranks,
        sharding: Sharding::Zigzag,
        block_m: block,
        block_n: block,
        chunk: 16,
        threads: 2,
        precision,
    }
}

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

/// A bf16 run holds q, k, v and its output in half the bytes: its peak heap
/// use, inputs included, is measured against the f32 run's at a length
/// where the per-position buffers dominate.
#[test]
fn a_bf16_run_takes_much_less_memory_than_f32() {
    const SEQ: usize = 8192;
    let mut spec = example_specs()
        .into_iter()
        .find(|s| s.name == "sliding_window_mistral")
        .unwrap();
    (spec.heads, spec.kv_heads, spec.head_dim, spec.value_dim) = (8, 8, 128, 128);
    spec.mask = Mask::And(Box::new(Mask::Causal), Box::new(Mask::Window { size: 64 }));
    fn peak<E: HostElem + OutElem>(spec: &MixerSpec, precision: Precision) -> usize {
        let base = NOW.load(Ordering::Relaxed);
        PEAK.store(base, Ordering::Relaxed);
        let x: MixerInputs<E> = random_inputs_kv_as(spec, 1, SEQ, SEQ, 1);
        let out: Tensor<E> = cpu::run(spec, &x, &cfg(1, 64, precision))
            .unwrap()
            .output
            .into_elem();
        assert_eq!(out.numel(), x.q.numel());
        drop((x, out));
        PEAK.load(Ordering::Relaxed) - base
    }
    let f = peak::<f32>(&spec, Precision::F32);
    let b = peak::<bf16>(&spec, Precision::Bf16);
    let h = peak::<f16>(&spec, Precision::F32);
    let mib = |x: usize| x as f64 / (1 << 20) as f64;
    println!(
        "peak heap at L={SEQ}, 8 heads, d 128: f32 {:.1} MiB, bf16 {:.1} MiB ({:.2}x), f16 {:.1} MiB ({:.2}x)",
        mib(f),
        mib(b),
        b as f64 / f as f64,
        mib(h),
        h as f64 / f as f64
    );
    // One rank writes its rows straight into the output, in its type, so
    // a bf16 run holds half the bytes (its K/V shards are bf16 pairs); f16
    // keeps f32 shards for its f32 products.
    assert!(b as f64 <= 0.56 * f as f64, "bf16 {b} vs f32 {f}");
    assert!(h as f64 <= 0.75 * f as f64, "f16 {h} vs f32 {f}");
}
