//! Memory is O(seq * d): a counting allocator records the peak heap use of a
//! CPU run at a length where any seq x seq buffer would dwarf everything else.

mod cpu_support;

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};

use cpu_support::*;
use mixc_dsl::ir::Mask;
use mixc_dsl::ir::MixerSpec;
use mixc_runtime::cpu::{self, CpuConfig, Precision, Sharding};
use mixc_runtime::inputs::{random_inputs, random_inputs_kv_as};
use mixc_runtime::{bf16, f16, HostElem, MixerInputs, OutElem, Tensor};

struct Counting;
static NOW: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

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

/// The counts are process-wide: the tests of this file measure one at a time.
static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn measuring() -> std::sync::MutexGuard<'static, ()> {
    ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner())
}

#[test]
fn peak_memory_grows_with_seq_not_seq_squared() {
    let _one = measuring();
    const SEQ: usize = 16384;
    let mut window = example_specs()
        .into_iter()
        .find(|s| s.name == "sliding_window_mistral")
        .unwrap();
    window.heads = 2;
    window.kv_heads = 1;
    window.mask = Mask::And(Box::new(Mask::Causal), Box::new(Mask::Window { size: 64 }));
    let gated = example_specs()
        .into_iter()
        .find(|s| s.name == "gated_mamba2")
        .unwrap();
    for spec in [window, gated] {
        let inputs = random_inputs(&spec, 1, SEQ, 1);
        let input_bytes = 4 * (inputs.q.numel() + inputs.k.numel() + inputs.v.numel());
        for ranks in [1, 4] {
            let cfg = CpuConfig {
                ranks,
                sharding: Sharding::Zigzag,
                block_m: 64,
                block_n: 64,
                chunk: 64,
                threads: 2,
                precision: Precision::F32,
            };
            let base = NOW.load(Ordering::Relaxed);
            PEAK.store(base, Ordering::Relaxed);
            let run = cpu::run(&spec, &inputs, &cfg).unwrap();
            let extra = PEAK.load(Ordering::Relaxed) - base;
            let out_bytes = 4 * run.output.to_f32().numel();
            // A single f32 seq x seq matrix for one head would be 1 GiB here.
            let square = 4 * SEQ * SEQ;
            println!(
                "{} R={ranks}: peak {:.1} MiB above inputs ({:.1} MiB in, {:.1} MiB out; seq^2 f32 = {} MiB)",
                spec.name,
                extra as f64 / (1 << 20) as f64,
                input_bytes as f64 / (1 << 20) as f64,
                out_bytes as f64 / (1 << 20) as f64,
                square >> 20
            );
            assert!(
                extra < 4 * (input_bytes + out_bytes) + (8 << 20),
                "{}: peak {extra} bytes is not O(seq * d)",
                spec.name
            );
        }
    }
}

/// The peak heap use of one one-rank run of `spec` at `seq` positions in
/// storage type `E`, its inputs and output included.
fn peak<E: HostElem + OutElem>(spec: &MixerSpec, seq: usize, precision: Precision) -> usize {
    let base = NOW.load(Ordering::Relaxed);
    PEAK.store(base, Ordering::Relaxed);
    let x: MixerInputs<E> = random_inputs_kv_as(spec, 1, seq, seq, 1);
    let mut cfg = square_cfg(1, 64, precision);
    cfg.chunk = 64;
    let out: Tensor<E> = cpu::run(spec, &x, &cfg).unwrap().output.into_elem();
    assert_eq!(out.shape[..3], x.q.shape[..3]);
    drop((x, out));
    PEAK.load(Ordering::Relaxed) - base
}

/// The state forms (linear, retention, gated) too: one rank streams each
/// (batch, head)'s rows to the output, gathering queries, keys and values
/// a chunk at a time, so a bf16 run holds about half the bytes of an f32
/// one (before, every head's queries and outputs stayed in f32 until the
/// end: 0.7x).
#[test]
fn a_bf16_state_form_run_takes_about_half_the_memory() {
    let _one = measuring();
    const SEQ: usize = 8192;
    for name in ["linear_elu", "retention_retnet", "gated_mamba2"] {
        let mut spec = example_specs()
            .into_iter()
            .find(|s| s.name == name)
            .unwrap();
        (spec.heads, spec.kv_heads) = (8, 8);
        let f = peak::<f32>(&spec, SEQ, Precision::F32);
        let b = peak::<bf16>(&spec, SEQ, Precision::Bf16);
        let mib = |x: usize| x as f64 / (1 << 20) as f64;
        println!(
            "{name}: peak heap at L={SEQ}, 8 heads: f32 {:.1} MiB, bf16 {:.1} MiB ({:.2}x)",
            mib(f),
            mib(b),
            b as f64 / f as f64
        );
        assert!(b as f64 <= 0.6 * f as f64, "{name}: bf16 {b} vs f32 {f}");
    }
}

/// A bf16 run holds q, k, v and its output in half the bytes: its peak heap
/// use, inputs included, is measured against the f32 run's at a length
/// where the per-position buffers dominate.
#[test]
fn a_bf16_run_takes_much_less_memory_than_f32() {
    let _one = measuring();
    const SEQ: usize = 8192;
    let mut spec = example_specs()
        .into_iter()
        .find(|s| s.name == "sliding_window_mistral")
        .unwrap();
    (spec.heads, spec.kv_heads, spec.head_dim, spec.value_dim) = (8, 8, 128, 128);
    spec.mask = Mask::And(Box::new(Mask::Causal), Box::new(Mask::Window { size: 64 }));
    let f = peak::<f32>(&spec, SEQ, Precision::F32);
    let b = peak::<bf16>(&spec, SEQ, Precision::Bf16);
    let h = peak::<f16>(&spec, SEQ, Precision::F32);
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
