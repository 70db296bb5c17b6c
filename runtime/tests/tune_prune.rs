//! CUDA candidates are compiled by real NVRTC and pruned before timing: a
//! configuration that needs more shared memory than the arch allows is never
//! handed to the timer, whether codegen rejects it or the compiled kernel's
//! resources exceed the limit.
//!
//! Needs NVRTC (no GPU): run `scripts/install-cuda.sh` first. Without it
//! these tests fail and say so; they never skip.

use mixc_codegen::{Arch, KernelConfig, Target};
use mixc_runtime::error::Result;
use mixc_runtime::nvrtc;
use mixc_runtime::tune::prune::{self, CompiledCandidate, KernelResources, PruneKind};
use mixc_runtime::tune::space::{self, CudaSpace};
use mixc_runtime::tune::{self, Candidate, Outcome, Sample, Timer, TuneOptions, TunedConfig};

fn require_nvrtc() {
    if let Err(e) = nvrtc::nvrtc_info() {
        panic!("these tests compile kernels with NVRTC, which is not available: {e}");
    }
}

fn spec() -> mixc_dsl::ir::MixerSpec {
    mixc_dsl::parse_str(
        "mixer p { heads = 4; kv_heads = 2; head_dim = 128; dtype = bf16; \
         score = dot(q, k); mask = causal; norm = softmax; }",
    )
    .unwrap()
}

/// Counts what it is asked to time; every check passes.
#[derive(Default)]
struct Counting {
    timed: Vec<usize>,
}

impl Timer for Counting {
    fn check(&mut self, _: &Candidate) -> Result<f64> {
        Ok(0.0)
    }
    fn time(&mut self, c: &Candidate) -> Result<Sample> {
        self.timed.push(c.index);
        Ok(Sample {
            median_ns: 1000 + c.index as u64,
            min_ns: 1000,
            max_ns: 2000,
            reps: 1,
        })
    }
}

/// The default, one alternative that fits, and one whose K/V tiles need far
/// more shared memory than sm_90's 227 KB.
fn small_space(spec: &mixc_dsl::ir::MixerSpec, target: &Target) -> (CudaSpace, usize) {
    let full = space::cuda_candidates(spec, target);
    let mut candidates: Vec<Candidate> = full.candidates.into_iter().take(2).collect();
    let huge = KernelConfig {
        block_m: 256,
        block_n: 256,
        warps: 16,
        stages: 4,
        ..KernelConfig::default_for(spec, target)
    };
    let index = 1000;
    candidates.push(space::cuda_candidate(spec, index, huge, false));
    (
        CudaSpace {
            candidates,
            rejected: Vec::new(),
        },
        index,
    )
}

#[test]
fn a_config_beyond_the_arch_shared_memory_is_never_timed() {
    require_nvrtc();
    let s = spec();
    let target = Target::for_spec(&s, Arch::Sm90);
    let (space, huge) = small_space(&s, &target);
    let report = prune::compile_and_prune(&s, &target, space, None);
    let p = report
        .pruned
        .iter()
        .find(|p| p.candidate.index == huge)
        .expect("the oversized config is pruned");
    assert!(p.reason().contains("shared memory"), "{}", p.reason());
    assert!(
        report.kept.iter().any(|(c, _)| c.is_default),
        "{:?}",
        report.pruned
    );

    let mut timer = Counting::default();
    let r = tune::run_tuning(
        report.kept_candidates(),
        report.pruned_with_reasons(),
        &mut timer,
        &TuneOptions::default(),
        &mut |_| {},
    );
    assert!(!timer.timed.contains(&huge), "timed {:?}", timer.timed);
    assert!(!timer.timed.is_empty());
    let huge_result = r
        .results
        .iter()
        .find(|x| x.candidate.index == huge)
        .unwrap();
    assert!(matches!(huge_result.outcome, Outcome::Pruned { .. }));
}

#[test]
fn compiled_resources_beyond_the_limit_are_pruned_too() {
    require_nvrtc();
    let s = spec();
    let arch = Arch::Sm80;
    let target = Target::for_spec(&s, arch);
    let cands: Vec<Candidate> = space::cuda_candidates(&s, &target)
        .candidates
        .into_iter()
        .take(2)
        .collect();
    // Compile for real, then claim more dynamic shared memory for the
    // second candidate than sm_80 allows (as a template change might).
    let mut compiled = Vec::new();
    for c in cands {
        let TunedConfig::Cuda(cfg) = c.config else {
            panic!()
        };
        let g = mixc_codegen::generate(&s, &target, &cfg).unwrap();
        let m = nvrtc::compile_with_cache(&g.kernels[0].name, &g.source, arch, None).unwrap();
        let kernels = g
            .kernels
            .iter()
            .map(|k| KernelResources {
                name: k.name.clone(),
                threads_per_block: k.threads_per_block,
                dynamic_smem_bytes: if c.is_default {
                    k.dynamic_smem_bytes
                } else {
                    arch.max_dynamic_smem_bytes() + 1
                },
                usage: m.resources_of(&k.name).unwrap().clone(),
            })
            .collect();
        compiled.push(CompiledCandidate {
            candidate: c,
            kernels,
        });
    }
    let report = prune::prune(arch, compiled);
    assert_eq!(report.kept.len(), 1);
    assert!(report.kept[0].0.is_default && report.kept[0].1 > 0.0);
    assert_eq!(report.pruned.len(), 1);
    assert_eq!(report.pruned[0].kind, PruneKind::SharedMemory);
    let mut timer = Counting::default();
    tune::run_tuning(
        report.kept_candidates(),
        report.pruned_with_reasons(),
        &mut timer,
        &TuneOptions::default(),
        &mut |_| {},
    );
    assert_eq!(timer.timed, vec![report.kept[0].0.index]);
}
