//! Ring scheduling on the CPU backend: zigzag balances causal work, skipped
//! steps and tiles are not computed, document masks skip across documents,
//! and bad configurations are clear errors.

mod cpu_support;

use cpu_support::*;
use mixc_dsl::ir::MixerSpec;
use mixc_runtime::cpu::{self, CpuConfig, Precision, Sharding};
use mixc_runtime::inputs::random_inputs;
use mixc_runtime::{reference, ExtraTensor, RuntimeError};

fn spec(name: &str) -> MixerSpec {
    examples()
        .into_iter()
        .find(|s| s.name == name)
        .expect("example")
}

fn cfg(ranks: usize, sharding: Sharding) -> CpuConfig {
    CpuConfig {
        ranks,
        sharding,
        block_m: 16,
        block_n: 16,
        chunk: 16,
        threads: 2,
        precision: Precision::F32,
    }
}

#[test]
fn zigzag_balances_causal_work_and_contiguous_does_not() {
    let mut s = spec("causal_gqa_llama3");
    s.heads = 2;
    s.kv_heads = 1;
    let inputs = random_inputs(&s, 1, 1024, 1);
    let zig = cpu::run(&s, &inputs, &cfg(4, Sharding::Zigzag)).unwrap();
    let con = cpu::run(&s, &inputs, &cfg(4, Sharding::Contiguous)).unwrap();
    println!("causal, R=4, seq 1024: pairs per rank");
    println!(
        "  zigzag:     {:?} (max/mean {:.3})",
        zig.stats.pairs_per_rank,
        zig.stats.imbalance()
    );
    println!(
        "  contiguous: {:?} (max/mean {:.3})",
        con.stats.pairs_per_rank,
        con.stats.imbalance()
    );
    let spread = |p: &[u64]| {
        let (lo, hi) = (
            *p.iter().min().unwrap() as f64,
            *p.iter().max().unwrap() as f64,
        );
        (hi - lo) / hi
    };
    assert!(
        spread(&zig.stats.pairs_per_rank) <= 0.05,
        "zigzag unbalanced: {:?}",
        zig.stats.pairs_per_rank
    );
    assert!(
        con.stats.imbalance() > 1.5,
        "contiguous should be unbalanced: {:?}",
        con.stats.pairs_per_rank
    );
    // Same total work either way: the plan decides what is computed, not the sharding.
    let total = |p: &[u64]| p.iter().sum::<u64>();
    let (tz, tc) = (
        total(&zig.stats.pairs_per_rank),
        total(&con.stats.pairs_per_rank),
    );
    assert!(
        (tz as f64 - tc as f64).abs() / (tc as f64) < 0.05,
        "{tz} vs {tc}"
    );
    // Causal work is about half the square, not all of it.
    let square = (1024u64 * 1024) * 2;
    assert!(
        tc < square * 6 / 10 && tc > square * 4 / 10,
        "{tc} of {square}"
    );
    // Contiguous causal: rank r meets only shards 0..=r, so 6 of 16 steps are skipped.
    assert_eq!(con.stats.steps_skipped, 6);
    assert_eq!(con.stats.steps_computed, 10);
    assert_eq!(zig.stats.steps_skipped, 0);
    let d = rel_err(&zig.output.to_f64(), &con.output.to_f64());
    assert!(d <= F32_TOL, "shardings disagree by {d:e}");
}

#[test]
fn windows_and_documents_skip_work() {
    let mut w = spec("sliding_window_mistral");
    w.mask = mixc_dsl::ir::Mask::And(
        Box::new(mixc_dsl::ir::Mask::Causal),
        Box::new(mixc_dsl::ir::Mask::Window { size: 40 }),
    );
    let inputs = random_inputs(&w, 1, 512, 2);
    let run = cpu::run(&w, &inputs, &cfg(1, Sharding::Zigzag)).unwrap();
    let heads = w.heads as u64;
    // Each 16-query block meets at most 4 key blocks of 16 (40 keys back, ragged).
    assert!(
        run.stats.pairs_per_rank[0] <= 512 * 64 * heads,
        "{:?}",
        run.stats
    );
    // The block one behind the diagonal lies wholly inside the window: Full.
    assert!(
        run.stats.tiles.full > 0 && run.stats.tiles.partial > 0,
        "{:?}",
        run.stats
    );
    let want = reference::evaluate(&w, &inputs).unwrap();
    assert!(rel_err(&run.output.to_f64(), &want) <= F32_TOL);

    // Four equal documents: tiles across documents are skipped.
    let d = spec("document_mask");
    let mut inputs = random_inputs(&d, 1, 512, 3);
    let ids: Vec<i32> = (0..512).map(|p| p / 128).collect();
    inputs.extra.insert(
        "doc".into(),
        ExtraTensor::I32(mixc_runtime::Tensor::new(vec![1, 512], ids)),
    );
    let run = cpu::run(&d, &inputs, &cfg(1, Sharding::Zigzag)).unwrap();
    let causal_pairs = (512u64 * 528 / 2) * d.heads as u64; // whole 16-blocks on and below the diagonal
    assert!(
        run.stats.pairs_per_rank[0] * 3 < causal_pairs,
        "document mask computed {} pairs, causal alone {causal_pairs}",
        run.stats.pairs_per_rank[0]
    );
    let want = reference::evaluate(&d, &inputs).unwrap();
    assert!(rel_err(&run.output.to_f64(), &want) <= F32_TOL);
}

#[test]
fn unsorted_segment_ids_are_still_exact() {
    let d = spec("document_mask");
    let mut inputs = random_inputs(&d, 2, 100, 4);
    let ids: Vec<i32> = (0..200).map(|p: i32| (p * 7919) % 13 % 3).collect();
    inputs.extra.insert(
        "doc".into(),
        ExtraTensor::I32(mixc_runtime::Tensor::new(vec![2, 100], ids)),
    );
    let want = reference::evaluate(&d, &inputs).unwrap();
    for ranks in [1, 3] {
        let run = cpu::run(&d, &inputs, &cfg(ranks, Sharding::Zigzag)).unwrap();
        assert!(rel_err(&run.output.to_f64(), &want) <= F32_TOL);
    }
}

#[test]
fn bad_configurations_are_clear_errors() {
    let s = spec("causal_gqa_llama3");
    let inputs = random_inputs(&s, 1, 10, 5);
    let err = cpu::run(&s, &inputs, &cfg(0, Sharding::Zigzag)).unwrap_err();
    assert!(matches!(err, RuntimeError::Invalid(_)), "{err:?}");
    assert!(err.to_string().contains("at least 1"), "{err}");
    let err = cpu::run(&s, &inputs, &cfg(11, Sharding::Contiguous)).unwrap_err();
    assert!(
        err.to_string().contains("11 ranks") && err.to_string().contains("10 positions"),
        "{err}"
    );
    // ranks == seq is fine: one position per rank.
    assert!(cpu::run(&s, &inputs, &cfg(10, Sharding::Zigzag)).is_ok());
    let bad_block = CpuConfig {
        block_n: 0,
        ..cfg(1, Sharding::Zigzag)
    };
    let err = cpu::run(&s, &inputs, &bad_block).unwrap_err();
    assert!(err.to_string().contains("block_n"), "{err}");
    // Inputs that do not fit the spec are rejected before any work starts.
    let mut wrong = inputs.clone();
    wrong.v.shape[2] += 1;
    wrong.v.data.vec_mut().extend(vec![0.0; 10 * 16]);
    assert!(matches!(
        cpu::run(&s, &wrong, &cfg(1, Sharding::Zigzag)).unwrap_err(),
        RuntimeError::BadInput { .. }
    ));
}

#[test]
fn work_accounting_follows_the_block_plan() {
    use mixc_codegen::plan::{BlockPlan, NoSegments, Tiling};
    for name in [
        "causal_gqa_llama3",
        "prefix_lm",
        "block_sparse_bigbird",
        "dilated_longnet",
    ] {
        let s = spec(name);
        let inputs = random_inputs(&s, 2, 100, 6);
        // One contiguous shard: the plan of the whole sequence (zigzag with
        // one rank would tile its two chunks separately).
        let run = cpu::run(&s, &inputs, &cfg(1, Sharding::Contiguous)).unwrap();
        let t = Tiling {
            block_m: 16,
            block_n: 16,
        };
        let per_head = BlockPlan::new(&s.mask, t, 0..100, 0..100).pairs_computed(&NoSegments);
        assert_eq!(
            run.stats.pairs_per_rank,
            vec![per_head * 2 * s.heads as u64],
            "{name}"
        );
        assert!(
            per_head < 100 * 100 || name == "prefix_lm",
            "{name}: nothing skipped"
        );
    }
}
