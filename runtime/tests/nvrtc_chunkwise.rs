//! The chunkwise (linear / retention / gated) and convolution kernels compile
//! with real NVRTC for sm_80 and sm_90 in f16, bf16 and f32, in several tile
//! configurations each, and the default configuration on sm_90 fits: no
//! spills, no stack frame, dynamic shared memory within the opt-in limit.
//! Needs NVRTC (scripts/install-cuda.sh), not a GPU; without it these tests
//! fail and say so (as `nvrtc_compile.rs` does).

use mixc_codegen::{generate, Arch, KernelConfig, Target};
use mixc_dsl::ir::*;
use mixc_runtime::nvrtc;

fn require_nvrtc() {
    if let Err(e) = nvrtc::nvrtc_info() {
        panic!("these tests compile kernels with NVRTC, which is not available: {e}");
    }
}

/// The chunkwise and convolution examples, parsed from `examples/`.
fn examples() -> Vec<MixerSpec> {
    [
        "linear_elu",
        "retention_retnet",
        "gated_mamba2",
        "long_conv_hyena",
    ]
    .iter()
    .map(|name| {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../examples")
            .join(format!("{name}.mix"));
        mixc_dsl::parse_file(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
    })
    .collect()
}

fn configs(spec: &MixerSpec, target: &Target) -> Vec<KernelConfig> {
    let base = KernelConfig::default_for(spec, target);
    let with = |kv: &str| base.with_overrides(&[kv]).unwrap();
    match (spec.family, target.uses_tensor_cores()) {
        (Family::Convolution, true) => vec![
            base,
            with("block_m=128,warps=8"),
            with("block_n=32,block_dv=32"),
            with("block_m=32,block_n=128,warps=2,stages=1"),
            with("block_m=32,block_n=32"),
        ],
        (Family::Convolution, false) => vec![
            base,
            with("block_m=32,block_n=64"),
            with("block_m=64,block_dv=32,warps=8"),
            with("block_n=16"),
        ],
        (_, true) => vec![
            base,
            with("chunk=32,stages=1"),
            with("chunk=128,warps=8"),
            with("block_dv=32,warps=2"),
        ],
        (_, false) => vec![
            base,
            with("chunk=64"),
            with("block_dv=16,warps=2"),
            with("chunk=128,block_dv=32,warps=8"),
        ],
    }
}

fn compile_checked(spec: &MixerSpec, target: &Target, cfg: &KernelConfig) -> nvrtc::ResourceUsage {
    let g = generate(spec, target, cfg)
        .unwrap_or_else(|e| panic!("{} {target:?} {cfg}: {e}", spec.name));
    let m = nvrtc::compile(&format!("{}.cu", spec.name), &g.source, target.arch)
        .unwrap_or_else(|e| panic!("{} {:?} {cfg}: {e}", spec.name, target));
    // Warnings from our templates fail the test; unused constants of the
    // shared tile header (tile.cuh, not ours) are tolerated.
    let ours = m
        .log
        .lines()
        .filter(|l| l.contains("warning #") && !l.contains("\"mixc::"))
        .collect::<Vec<_>>();
    assert!(
        ours.is_empty(),
        "{} {target:?} {cfg}: NVRTC warnings:\n{}",
        spec.name,
        m.log
    );
    let info = &g.kernels[0];
    assert!(info.dynamic_smem_bytes <= target.arch.max_dynamic_smem_bytes());
    assert_eq!(info.needs_smem_opt_in, info.dynamic_smem_bytes > 48 * 1024);
    m.resources_of(&info.name)
        .unwrap_or_else(|| panic!("no ptxas report for {} in:\n{}", info.name, m.log))
        .clone()
}

fn sweep(families: &[Family]) {
    require_nvrtc();
    let mut report = Vec::new();
    for spec in examples()
        .into_iter()
        .filter(|s| families.contains(&s.family))
    {
        for arch in Arch::ALL {
            for dtype in [DType::F16, DType::Bf16, DType::F32] {
                let target = Target::new(arch, dtype);
                for (i, cfg) in configs(&spec, &target).iter().enumerate() {
                    let r = compile_checked(&spec, &target, cfg);
                    if i == 0 && arch == Arch::Sm90 {
                        assert_eq!(
                            (r.stack_frame, r.spill_stores, r.spill_loads),
                            (0, 0, 0),
                            "default config of {} {dtype} on sm_90 must not spill: {r:?}",
                            spec.name
                        );
                    }
                    report.push(format!(
                        "{:<18} {} {:<4} {:<58} regs {:>3} stack {} spills {}/{}",
                        spec.name,
                        arch,
                        dtype,
                        cfg.describe(),
                        r.registers,
                        r.stack_frame,
                        r.spill_stores,
                        r.spill_loads
                    ));
                }
            }
        }
    }
    eprintln!("{}", report.join("\n"));
}

#[test]
fn chunkwise_examples_compile_for_every_target_and_config() {
    sweep(&[Family::Linear, Family::Retention, Family::Gated]);
}

#[test]
fn chunkwise_head_dims_compile_without_spills_on_sm90() {
    require_nvrtc();
    let base = examples()
        .into_iter()
        .find(|s| s.name == "retention_retnet")
        .unwrap();
    // 257..384: three state slices per thread (block_dv 16). At 512 (four)
    // the default still compiles but spills 16 bytes under 8 warps' limit
    // of 128 registers.
    for d in [64, 80, 96, 128, 192, 256, 272, 320, 384] {
        for dtype in [DType::Bf16, DType::F32] {
            let mut s = base.clone();
            s.head_dim = d;
            s.value_dim = d;
            let target = Target::new(Arch::Sm90, dtype);
            let r = compile_checked(&s, &target, &KernelConfig::default_for(&s, &target));
            assert_eq!(
                (r.stack_frame, r.spill_stores),
                (0, 0),
                "head_dim {d} {dtype}: {r:?}"
            );
            // sm_80 has less shared memory: the default must still fit there.
            let t80 = Target::new(Arch::Sm80, dtype);
            compile_checked(&s, &t80, &KernelConfig::default_for(&s, &t80));
        }
    }
}

#[test]
fn convolution_example_compiles_for_every_target_and_config() {
    sweep(&[Family::Convolution]);
}

#[test]
fn convolution_value_dims_compile_without_spills_on_sm90() {
    require_nvrtc();
    let base = examples()
        .into_iter()
        .find(|s| s.name == "long_conv_hyena")
        .unwrap();
    // 257..384: three state slices per thread (block_dv 16). At 512 (four)
    // the default still compiles but spills 16 bytes under 8 warps' limit
    // of 128 registers.
    for d in [64, 80, 96, 128, 192, 256, 272, 320, 384] {
        for dtype in [DType::Bf16, DType::F32] {
            let mut s = base.clone();
            s.head_dim = d;
            s.value_dim = d;
            let target = Target::new(Arch::Sm90, dtype);
            let r = compile_checked(&s, &target, &KernelConfig::default_for(&s, &target));
            assert_eq!(
                (r.stack_frame, r.spill_stores),
                (0, 0),
                "value_dim {d} {dtype}: {r:?}"
            );
        }
    }
}
