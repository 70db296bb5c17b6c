//! Generated chunkwise (linear / retention / gated) and convolution sources:
//! what Rust decided shows up in the source, errors are clear, snapshots.
//! NVRTC compilation of the same sources is in `runtime/tests/nvrtc_chunkwise.rs`.

use mixc_codegen::lower_chunkwise::{self, ChunkwiseShape};
use mixc_codegen::lower_conv;
use mixc_codegen::{generate, Arch, CodegenError, GridDim, KernelConfig, ParamRole, Target};
use mixc_dsl::ir::*;

/// An example spec, parsed from `examples/` like users' specs are.
fn example(name: &str) -> MixerSpec {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../examples")
        .join(format!("{name}.mix"));
    mixc_dsl::parse_file(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn linear_elu() -> MixerSpec {
    example("linear_elu")
}

fn retention() -> MixerSpec {
    example("retention_retnet")
}

fn gated() -> MixerSpec {
    example("gated_mamba2")
}

fn conv() -> MixerSpec {
    example("long_conv_hyena")
}

fn sm90(dtype: DType) -> Target {
    Target::new(Arch::Sm90, dtype)
}

fn gen_default(s: &MixerSpec, t: &Target) -> Result<mixc_codegen::GeneratedKernel, CodegenError> {
    generate(s, t, &KernelConfig::default_for(s, t))
}

#[test]
fn every_family_and_dtype_renders_with_the_right_template() {
    for s in [linear_elu(), retention(), gated(), conv()] {
        for dtype in [DType::F16, DType::Bf16, DType::F32] {
            for arch in Arch::ALL {
                let t = Target::new(arch, dtype);
                let g = gen_default(&s, &t).unwrap_or_else(|e| panic!("{} {dtype}: {e}", s.name));
                let conv = s.family == Family::Convolution;
                let want = match (conv, dtype == DType::F32) {
                    (false, false) => "chunkwise_mma.cu",
                    (false, true) => "chunkwise_simt.cu",
                    (true, false) => "conv_mma.cu",
                    (true, true) => "conv_simt.cu",
                };
                assert_eq!(g.template, want);
                // The tensor-core instructions appear exactly when tensor cores are used.
                assert_eq!(
                    g.source.contains("mma_16816<T>("),
                    dtype != DType::F32,
                    "{} {dtype}",
                    s.name
                );
                let k = &g.kernels[0];
                assert!(g.source.contains(&format!(
                    "__global__ void __launch_bounds__(NT) {}(",
                    k.name
                )));
                assert!(
                    g.source.contains(&format!("template: {want}")),
                    "header names the template"
                );
                assert_eq!(k.needs_smem_opt_in, k.dynamic_smem_bytes > 48 * 1024);
                assert!(k.dynamic_smem_bytes <= arch.max_dynamic_smem_bytes());
                // Every parameter is in the signature, in order.
                let mut at = 0;
                for p in &k.params {
                    let needle = format!("{} {}", p.c_type, p.name);
                    let pos = g.source[at..]
                        .find(&needle)
                        .unwrap_or_else(|| panic!("{needle} missing"));
                    at += pos + needle.len();
                }
            }
        }
    }
}

/// The per-head decay table in the source is the spec's expression,
/// evaluated per head, in log2: gamma_h = 1 - 2^(-5-h).
#[test]
fn retention_decay_table_is_the_spec_expression() {
    let g = gen_default(&retention(), &sm90(DType::Bf16)).unwrap();
    let line = g
        .source
        .lines()
        .find(|l| l.contains("LOG2_GAMMA[HEADS] ="))
        .expect("decay table");
    let body = &line[line.find('{').unwrap() + 1..line.rfind('}').unwrap()];
    let vals: Vec<f64> = body
        .split(',')
        .map(|v| {
            v.trim()
                .trim_start_matches('(')
                .trim_end_matches(')')
                .trim_end_matches('f')
                .parse()
                .unwrap()
        })
        .collect();
    assert_eq!(vals.len(), 8);
    for (h, v) in vals.iter().enumerate() {
        let want = (1.0 - 2f64.powf(-5.0 - h as f64)).log2();
        assert!(
            (v - want).abs() <= 1e-6 * want.abs(),
            "head {h}: {v} vs {want}"
        );
    }
}

#[test]
fn params_follow_the_spec() {
    let t = sm90(DType::Bf16);
    let names = |s: &MixerSpec| -> Vec<String> {
        gen_default(s, &t).unwrap().kernels[0]
            .params
            .iter()
            .map(|p| p.name.clone())
            .collect()
    };
    // Sum normalisation carries z and emits the denominator; `none` does not.
    let lin = names(&linear_elu());
    for n in ["z_in", "z_out", "o_den", "state_in", "state_out", "o_num"] {
        assert!(lin.contains(&n.to_string()), "{n} in {lin:?}");
    }
    let ret = names(&retention());
    assert!(
        !ret.iter().any(|n| n.starts_with("z_") || n == "o_den"),
        "{ret:?}"
    );
    // The gate is bound by role, under a name that cannot clash with locals.
    let g = gen_default(&gated(), &t).unwrap();
    let gate = g.kernels[0]
        .params
        .iter()
        .find(|p| p.role == ParamRole::Input("g".into()))
        .unwrap();
    assert_eq!(gate.name, "in_g");
    assert!(g.source.contains("log2f(in_g["));
    // Convolution reads only v and its filter.
    let c = names(&conv());
    assert!(
        !c.contains(&"q".to_string()) && c.contains(&"in_f".to_string()),
        "{c:?}"
    );
    assert!(c.contains(&"accumulate".to_string()) && c.contains(&"kv_begin".to_string()));
}

#[test]
fn feature_maps_are_applied_only_when_the_spec_has_them() {
    let t = sm90(DType::Bf16);
    let lin = gen_default(&linear_elu(), &t).unwrap().source;
    assert!(lin.contains("phi_q(") && lin.contains("psi_k(") && lin.contains("exp2f(x * 1.44269"));
    let ret = gen_default(&retention(), &t).unwrap().source;
    assert!(!ret.contains("phi_q(") && !ret.contains("psi_k("));
    // Linear has no decay: no decay arithmetic at all.
    assert!(!lin.contains("exp2f(cum"));
    assert!(ret.contains("exp2f(cum"));
}

/// The grid splits d_v as the shape says, and the default keeps the f32 state
/// slice each thread holds at or below 32 registers for every head dim.
#[test]
fn value_split_and_default_register_budget() {
    let t = sm90(DType::Bf16);
    let g = gen_default(&retention(), &t).unwrap();
    assert_eq!(
        g.kernels[0].grid,
        [GridDim::Fixed(2), GridDim::Heads, GridDim::Batch]
    );
    for d in [64u32, 80, 96, 128, 192, 256] {
        let mut s = retention();
        s.head_dim = d;
        s.value_dim = d;
        for arch in Arch::ALL {
            let t = Target::new(arch, DType::Bf16);
            let cfg = KernelConfig::default_for(&s, &t);
            let sh: ChunkwiseShape = lower_chunkwise::shape(&s, &t, &cfg).unwrap();
            let s_iters = sh.dk_pad.div_ceil(16 * cfg.warps);
            assert!(s_iters * sh.block_dv / 2 <= 32, "head_dim {d}: {cfg}");
            assert!(sh.dv_blocks * sh.block_dv >= d);
            assert!(sh.smem_bytes <= arch.max_dynamic_smem_bytes());
        }
    }
    // Convolution: heads x value blocks on grid y.
    let mut c = conv();
    c.value_dim = 256;
    let g = gen_default(&c, &t).unwrap();
    assert_eq!(
        g.kernels[0].grid,
        [
            GridDim::QueryBlocks { block: 64 },
            GridDim::Fixed(8 * 4),
            GridDim::Batch
        ]
    );
}

fn expect_unsupported(s: &MixerSpec, needle: &str) {
    let t = sm90(DType::Bf16);
    let e = generate(s, &t, &KernelConfig::default_for(s, &t)).unwrap_err();
    assert!(matches!(e, CodegenError::Unsupported { .. }), "{e}");
    assert!(e.to_string().contains(needle), "`{needle}` not in: {e}");
}

#[test]
fn unsupported_specs_are_clear_errors() {
    let mut s = linear_elu();
    s.mask = Mask::Window { size: 128 };
    expect_unsupported(&s, "mask = causal");
    let mut s = linear_elu();
    s.mask = Mask::All;
    expect_unsupported(&s, "mask = causal");
    let mut s = retention();
    s.bias = Some(Expr::Float(1.0));
    expect_unsupported(&s, "bias");
    let mut s = retention();
    s.decay = Decay::PerHead(Expr::Float(-0.5));
    expect_unsupported(&s, "gamma > 0");
    let mut s = retention();
    s.decay = Decay::PerHead(Expr::Index {
        input: "t".into(),
        indices: vec![Expr::Var(Var::H)],
    });
    expect_unsupported(&s, "reads inputs");
    let mut s = conv();
    s.norm = Norm::Sum { eps: 1e-6 };
    expect_unsupported(&s, "norm = none");
    // Expression masks (even one equal to causal) are the softmax kernels'.
    let j_le_i = Expr::Binary(
        BinOp::Le,
        Box::new(Expr::Var(Var::J)),
        Box::new(Expr::Var(Var::I)),
    );
    let mut s = linear_elu();
    s.mask = Mask::Expr(j_le_i.clone());
    expect_unsupported(&s, "mask = causal");
    let mut s = gated();
    s.mask = Mask::And(Box::new(Mask::Causal), Box::new(Mask::Expr(j_le_i.clone())));
    expect_unsupported(&s, "mask = causal");
    let mut s = conv();
    s.mask = Mask::Expr(j_le_i);
    expect_unsupported(&s, "mask = causal");
}

#[test]
fn bad_configs_are_clear_errors() {
    let t = sm90(DType::Bf16);
    let s = retention();
    let base = KernelConfig::default_for(&s, &t);
    let err = |kv: &str| {
        generate(&s, &t, &base.with_overrides(&[kv]).unwrap())
            .unwrap_err()
            .to_string()
    };
    assert!(err("chunk=16").contains("chunk=16"));
    assert!(err("chunk=256").contains("chunk 32, 64 or 128"));
    assert!(err("stages=3").contains("stages 1 or 2"));
    let mut wide = retention();
    wide.head_dim = 256;
    wide.value_dim = 256;
    let cfg = base
        .with_overrides(&["chunk=128,block_dv=256,stages=2"])
        .unwrap();
    let e = generate(&wide, &Target::new(Arch::Sm80, DType::Bf16), &cfg).unwrap_err();
    assert!(
        matches!(e, CodegenError::ConfigDoesNotFit { .. })
            && e.to_string().contains("shared memory"),
        "{e}"
    );
    let f32t = sm90(DType::F32);
    let cfg = KernelConfig::default_for(&s, &f32t)
        .with_overrides(&["stages=2"])
        .unwrap();
    assert!(generate(&s, &f32t, &cfg)
        .unwrap_err()
        .to_string()
        .contains("single-stage"));
    let c = conv();
    let cfg = KernelConfig::default_for(&c, &t)
        .with_overrides(&["block_m=16,warps=8"])
        .unwrap();
    assert!(generate(&c, &t, &cfg)
        .unwrap_err()
        .to_string()
        .contains("whole 16 x 16 tiles"));
}

/// Shared-memory formulas the planner uses agree with the launch info.
#[test]
fn launch_info_uses_the_planner_formulas() {
    let t = sm90(DType::Bf16);
    let s = retention();
    let cfg = KernelConfig::default_for(&s, &t);
    let g = generate(&s, &t, &cfg).unwrap();
    let want = lower_chunkwise::smem_bytes_mma(64, 64, &cfg, true, false, 2);
    assert_eq!(g.kernels[0].dynamic_smem_bytes, want);
    assert!(g.source.contains(&format!("SMEM_BYTES == {want}")));
    let c = conv();
    let cfg = KernelConfig::default_for(&c, &t);
    let g = generate(&c, &t, &cfg).unwrap();
    assert_eq!(
        g.kernels[0].dynamic_smem_bytes,
        lower_conv::smem_bytes_mma(64, &cfg, 2)
    );
}

#[test]
fn snapshot_retention_bf16_sm90() {
    let g = gen_default(&retention(), &sm90(DType::Bf16)).unwrap();
    insta::assert_snapshot!("retention_retnet_bf16_sm90", g.source);
}

#[test]
fn snapshot_convolution_bf16_sm90() {
    let g = gen_default(&conv(), &sm90(DType::Bf16)).unwrap();
    insta::assert_snapshot!("long_conv_hyena_bf16_sm90", g.source);
}
