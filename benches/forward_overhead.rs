//! Per-call host overhead of `Mixer::forward` on the CPU backend at a tiny
//! shape (L = 16, one head, d = 64): the arithmetic is about 65 kFLOP (well
//! under a microsecond), so the time per call is the library's overhead
//! (input validation, ring schedule, output allocation, thread dispatch).
//! `cargo bench --bench forward_overhead`; BENCHMARKS.md has the numbers.

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use mixc::{Device, Mixer, Options, Tiles};
use std::hint::black_box;
use std::time::Duration;

fn forward_overhead(c: &mut Criterion) {
    let mut group = c.benchmark_group("forward_overhead");
    group.warm_up_time(Duration::from_millis(500));
    group.measurement_time(Duration::from_secs(2));
    for mask in ["causal", "all"] {
        let spec = mixc::parse(&format!(
            "mixer tiny {{ heads = 1; head_dim = 64; dtype = f32; mask = {mask}; }}"
        ))
        .unwrap();
        let inputs = mixc::random_inputs(&spec, 1, 16, 0);
        let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
        for t in [1, threads] {
            let opts = Options::on(Device::Cpu)
                .with_tiles(Tiles::Default)
                .with_threads(t);
            let m = Mixer::new(&spec, opts).unwrap();
            let id = BenchmarkId::new(format!("{mask}/L16/threads{t}"), "forward");
            group.bench_function(id, |b| b.iter(|| black_box(m.forward(&inputs).unwrap())));
        }
        // Tiles::Auto adds one bucket lookup (a hash map hit) per call.
        let m = Mixer::new(&spec, Options::on(Device::Cpu)).unwrap();
        let id = BenchmarkId::new(format!("{mask}/L16/auto_tiles"), "forward");
        group.bench_function(id, |b| b.iter(|| black_box(m.forward(&inputs).unwrap())));
    }
    group.finish();
}

criterion_group!(benches, forward_overhead);
criterion_main!(benches);
