//! The CPU backend equals the f64 reference for every example spec, every
//! ring size and sharding, ragged lengths, batch 2, GQA; and changing the
//! ring does not change the result beyond rounding.

mod cpu_support;

use cpu_support::*;
use mixc_dsl::ir::MixerSpec;
use mixc_runtime::cpu::{self, path_for, CpuConfig, CpuPath, Precision, Sharding};
use mixc_runtime::inputs::random_inputs;
use mixc_runtime::reference;

const SEQS: [usize; 3] = [37, 100, 130];
const RANKS: [usize; 5] = [1, 2, 3, 4, 8];

fn cfg(ranks: usize, sharding: Sharding, precision: Precision) -> CpuConfig {
    CpuConfig {
        ranks,
        sharding,
        block_m: 16,
        block_n: 16,
        chunk: 16,
        threads: 2,
        precision,
    }
}

/// Runs the whole (ranks x sharding x precision) matrix for one spec and seq.
fn check_spec(spec: &MixerSpec, seq: usize, base: &CpuConfig) {
    let inputs = random_inputs(spec, 2, seq, 7 + seq as u64);
    let want = reference::evaluate(spec, &inputs).expect("reference");
    let mut f64_first: Option<mixc_runtime::Tensor<f64>> = None;
    for ranks in RANKS {
        for sharding in [Sharding::Contiguous, Sharding::Zigzag] {
            for precision in [Precision::F32, Precision::F64] {
                let c = CpuConfig {
                    ranks,
                    sharding,
                    precision,
                    ..base.clone()
                };
                let run =
                    cpu::run(spec, &inputs, &c).unwrap_or_else(|e| panic!("{}: {e}", spec.name));
                let got = run.output.to_f64();
                let err = rel_err(&got, &want);
                let tol = match precision {
                    Precision::F32 => F32_TOL,
                    Precision::F64 => F64_TOL,
                    Precision::Bf16 => unreachable!("bf16 runs: tests/cpu_bf16.rs"),
                };
                assert!(
                    err <= tol,
                    "{} seq {seq} R={ranks} {sharding:?} {precision:?} blocks {}x{} chunk {}: rel err {err:e} > {tol:e}",
                    spec.name,
                    c.block_m,
                    c.block_n,
                    c.chunk
                );
                assert_eq!(run.stats.pairs_per_rank.len(), ranks);
                if precision == Precision::F64 {
                    // Another ring or sharding only reorders the sums.
                    match &f64_first {
                        None => f64_first = Some(got),
                        Some(first) => {
                            let d = rel_err(&got, first);
                            assert!(
                                d <= 1e-12,
                                "{}: R={ranks} {sharding:?} differs by {d:e}",
                                spec.name
                            );
                        }
                    }
                }
            }
        }
    }
}

#[test]
fn every_example_matches_the_reference() {
    let base = cfg(1, Sharding::Zigzag, Precision::F32);
    let specs = examples();
    assert!(
        specs.len() >= 14,
        "expected every examples/*.mix, got {}",
        specs.len()
    );
    for spec in &specs {
        for seq in SEQS {
            check_spec(spec, seq, &base);
        }
    }
}

#[test]
fn linear_families_take_the_chunkwise_path_and_match() {
    let specs = examples();
    let chunkwise: Vec<_> = specs
        .iter()
        .filter(|s| path_for(s) == CpuPath::Chunkwise)
        .collect();
    let names: Vec<_> = chunkwise.iter().map(|s| s.name.as_str()).collect();
    assert_eq!(names, ["gated_mamba2", "linear_elu", "retention_retnet"]);
    // Chunks that divide nothing: ragged at both shard and sequence ends.
    for chunk in [1, 5, 64] {
        let base = CpuConfig {
            chunk,
            ..cfg(1, Sharding::Zigzag, Precision::F32)
        };
        for spec in &chunkwise {
            check_spec(spec, 37, &base);
        }
    }
}

#[test]
fn linear_families_on_the_blocked_path_match() {
    for spec in blocked_linear_variants() {
        assert_eq!(path_for(&spec), CpuPath::Blocked);
        check_spec(&spec, 100, &cfg(1, Sharding::Zigzag, Precision::F32));
    }
}

#[test]
fn odd_tile_shapes_match() {
    for (bm, bn) in [(1, 1), (7, 5), (32, 8), (200, 200)] {
        let base = CpuConfig {
            block_m: bm,
            block_n: bn,
            ..cfg(1, Sharding::Zigzag, Precision::F32)
        };
        for spec in examples()
            .iter()
            .filter(|s| path_for(s) == CpuPath::Blocked)
        {
            let inputs = random_inputs(spec, 2, 37, 3);
            let want = reference::evaluate(spec, &inputs).unwrap();
            for ranks in [1, 3] {
                let c = CpuConfig {
                    ranks,
                    ..base.clone()
                };
                let got = cpu::run(spec, &inputs, &c).unwrap().output.to_f64();
                let err = rel_err(&got, &want);
                assert!(err <= F32_TOL, "{} {bm}x{bn} R={ranks}: {err:e}", spec.name);
            }
        }
    }
}

#[test]
fn non_causal_linear_uses_one_global_state_and_matches() {
    let mut spec = examples()
        .into_iter()
        .find(|s| s.name == "linear_elu")
        .unwrap();
    spec.mask = mixc_dsl::ir::Mask::All;
    assert_eq!(path_for(&spec), CpuPath::GlobalState);
    check_spec(&spec, 37, &cfg(1, Sharding::Contiguous, Precision::F32));
    spec.norm = mixc_dsl::ir::Norm::None;
    check_spec(&spec, 100, &cfg(1, Sharding::Contiguous, Precision::F32));
}

/// Every example file is in the matrix above, under its own name.
#[test]
fn every_example_file_is_covered() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples");
    let mut files: Vec<String> = std::fs::read_dir(&dir)
        .expect("examples/ directory")
        .filter_map(|e| {
            let p = e.ok()?.path();
            let stem = p.file_stem()?.to_string_lossy().into_owned();
            (p.extension()? == "mix").then_some(stem)
        })
        .collect();
    files.sort();
    let mut names: Vec<String> = example_specs().into_iter().map(|s| s.name).collect();
    names.sort();
    assert_eq!(files, names);
}

/// Long convolutions on one rank run as an FFT (`RunStats::fft`), and equal
/// the reference like the blocked Toeplitz tiles a ring runs: f64 to 1e-10,
/// f32 to the f32 tolerance, batch 2 and a kv group of 2, lengths at and past
/// the threshold (256), a power of two and not.
#[test]
fn long_convolutions_run_as_an_fft_and_match_the_reference() {
    let mut spec = examples()
        .into_iter()
        .find(|s| matches!(s.score, mixc_dsl::ir::Score::Filter { .. }))
        .expect("a convolution example");
    spec.heads = 4;
    spec.kv_heads = 2;
    for seq in [256, 300, 1000] {
        let inputs = random_inputs(&spec, 2, seq, 3 + seq as u64);
        let want = reference::evaluate(&spec, &inputs).expect("reference");
        for (precision, tol) in [(Precision::F64, F64_TOL), (Precision::F32, F32_TOL)] {
            for ranks in [1, 2] {
                let c = CpuConfig {
                    precision,
                    ..cfg(ranks, Sharding::Zigzag, precision)
                };
                let run = cpu::run(&spec, &inputs, &c).unwrap();
                assert_eq!(run.stats.fft, ranks == 1, "L={seq} R={ranks}");
                let err = rel_err(&run.output.to_f64(), &want);
                assert!(err <= tol, "L={seq} R={ranks} {precision:?}: {err:e}");
            }
        }
    }
    // Below the threshold the tiles run.
    let inputs = random_inputs(&spec, 1, 255, 1);
    let run = cpu::run(&spec, &inputs, &cfg(1, Sharding::Zigzag, Precision::F32)).unwrap();
    assert!(!run.stats.fft);
}
