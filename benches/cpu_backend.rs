//! Criterion benches of the CPU backend on example specs at small sequence
//! lengths: one per execution path (blocked softmax with a plain mask, blocked
//! softmax with a bias expression, chunkwise state form) plus the ring at two
//! ranks. Sizes stay small so a full `cargo bench --bench cpu_backend` takes a
//! couple of minutes on 2 cores; `mixc bench` covers long sequences.
//!
//! Heads are cut down from the model sizes of the examples (the arithmetic per
//! head is unchanged) so that the timings reflect the kernels, not memory.

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use mixc_dsl::MixerSpec;
use mixc_runtime::cpu::{self, CpuConfig};
use mixc_runtime::inputs::random_inputs;
use std::hint::black_box;
use std::path::Path;
use std::time::Duration;

fn example(name: &str, heads: u32, kv_heads: u32) -> MixerSpec {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("examples")
        .join(format!("{name}.mix"));
    let mut spec =
        mixc_dsl::parse_file(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    spec.heads = heads;
    spec.kv_heads = kv_heads;
    spec
}

fn bench_spec(c: &mut Criterion, spec: &MixerSpec, seqs: &[usize], ranks: usize) {
    let mut group = c.benchmark_group(format!("cpu/{}/ranks{ranks}", spec.name));
    // Each iteration is milliseconds to a second: few samples suffice.
    group.sample_size(10);
    group.warm_up_time(Duration::from_millis(500));
    group.measurement_time(Duration::from_secs(3));
    for &seq in seqs {
        let inputs = random_inputs(spec, 1, seq, 0);
        let mut cfg = CpuConfig::default_for(spec, seq);
        cfg.ranks = ranks;
        group.throughput(Throughput::Elements(seq as u64));
        group.bench_with_input(BenchmarkId::from_parameter(seq), &inputs, |b, inputs| {
            b.iter(|| {
                let run = cpu::run(spec, black_box(inputs), &cfg).expect("CPU run");
                black_box(run.output)
            })
        });
    }
    group.finish();
}

fn cpu_backend(c: &mut Criterion) {
    // Blocked softmax path, causal GQA (d = 128).
    let causal = example("causal_gqa_llama3", 4, 2);
    bench_spec(c, &causal, &[256, 1024], 1);
    // The same at 2 ranks: the ring's cost on the CPU (zigzag shards).
    bench_spec(c, &causal, &[1024], 2);
    // Bias expression evaluated per pair (ALiBi).
    bench_spec(c, &example("alibi_bloom", 4, 4), &[256, 1024], 1);
    // Chunkwise state form (retention, per-head decay).
    bench_spec(c, &example("retention_retnet", 4, 4), &[1024, 4096], 1);
}

criterion_group!(benches, cpu_backend);
criterion_main!(benches);
