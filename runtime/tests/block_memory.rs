//! The blockwise block's memory, measured (issue 20): a training step's
//! peak heap grows linearly in the sequence with a slope far below one FFN
//! hidden row per position (the unfused block holds several `L x d_ff`
//! tensors), and [`Block::train_host_bytes`] bounds the measured peak, so
//! admission control does not under-count.
//!
//! Its own test binary: the counting allocator sees every thread of the
//! process, so nothing else may run beside it.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};

use mixc_dsl::{BlockNorm, BlockSpec, Ffn, FfnKind, NormKind, Rope};
use mixc_runtime::block::{random_block_inputs, random_block_upstream, Block, BlockWeights};
use mixc_runtime::{Device, Options};

struct Counting;

static LIVE: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

// SAFETY: forwards to the system allocator, only counting sizes.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        let p = System.alloc(l);
        if !p.is_null() {
            let now = LIVE.fetch_add(l.size(), Ordering::Relaxed) + l.size();
            PEAK.fetch_max(now, Ordering::Relaxed);
        }
        p
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        System.dealloc(p, l);
        LIVE.fetch_sub(l.size(), Ordering::Relaxed);
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

/// Heap bytes at the peak of one training step (forward_train + backward)
/// above what was live before it (the inputs, weights and upstream
/// gradient, allocated beforehand).
fn step_peak(blk: &Block, spec: &BlockSpec, seq: usize) -> (usize, u64) {
    let x = random_block_inputs(spec, 1, seq, 1);
    let w = BlockWeights::random(spec, 2);
    let g = random_block_upstream(spec, 1, seq, 3);
    let before = LIVE.load(Ordering::Relaxed);
    PEAK.store(before, Ordering::Relaxed);
    let (out, res) = blk.forward_train(&x, &w).unwrap();
    let grads = blk.backward(&x, &w, &res, &g).unwrap();
    drop((out, res, grads));
    (
        PEAK.load(Ordering::Relaxed) - before,
        blk.train_host_bytes(1, seq).unwrap(),
    )
}

#[test]
fn a_training_step_holds_no_seq_by_hidden_tensor() {
    let hidden = 2048;
    let spec = BlockSpec {
        name: "wide_ffn".into(),
        width: 32,
        mixer: mixc_dsl::parse_str(
            "mixer m { heads = 2; kv_heads = 1; head_dim = 16; mask = causal; }",
        )
        .unwrap(),
        norm: BlockNorm {
            kind: NormKind::RmsNorm,
            eps: 1e-5,
        },
        ffn: Ffn {
            kind: FfnKind::SwiGlu,
            hidden,
        },
        rope: Some(Rope { base: 10000.0 }),
    };
    let blk = Block::new(&spec, Options::on(Device::Cpu))
        .unwrap()
        .with_block_rows(64);
    let (short, long) = (512, 2048);
    // Warm up: thread pools and the GEMM's per-thread packing buffers are
    // allocated once per process and kept.
    step_peak(&blk, &spec, long);
    let (p1, est1) = step_peak(&blk, &spec, short);
    let (p2, est2) = step_peak(&blk, &spec, long);
    let slope = (p2 as f64 - p1 as f64) / (long - short) as f64;
    // The unfused block holds u, up and a: 3 * hidden floats per position.
    let unfused = 3.0 * hidden as f64 * 4.0;
    eprintln!(
        "peak {p1} B at L={short}, {p2} B at L={long}: {slope:.0} B per position \
         (unfused FFN alone: {unfused:.0}); estimates {est1}, {est2}"
    );
    assert!(
        slope < unfused / 8.0,
        "{slope:.0} bytes per position: the step holds something of size L x d_ff"
    );
    assert!(
        p1 as u64 <= est1 && p2 as u64 <= est2,
        "train_host_bytes under-counts: measured {p1}, {p2}; estimated {est1}, {est2}"
    );
}
