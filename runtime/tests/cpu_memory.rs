//! Memory is O(seq * d): a counting allocator records the peak heap use of a
//! CPU run at a length where any seq x seq buffer would dwarf everything else.

mod cpu_support;

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};

use cpu_support::*;
use mixc_dsl::ir::Mask;
use mixc_runtime::cpu::{self, CpuConfig, Precision, Sharding};
use mixc_runtime::inputs::random_inputs;

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

#[test]
fn peak_memory_grows_with_seq_not_seq_squared() {
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
