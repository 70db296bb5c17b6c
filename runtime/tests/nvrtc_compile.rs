//! Every example spec, every family `generate` supports, compiled by real
//! NVRTC to CUBINs for sm_80 and sm_90 in f16, bf16 and f32 with at least
//! three tile configurations each: zero compile errors; the default config on
//! sm_90 has no spills and no stack frame; shared memory fits the arch.
//!
//! Needs NVRTC (no GPU): run `scripts/install-cuda.sh` first. Without it these
//! tests fail and say so; they never skip.

#[path = "../../codegen/tests/support/mod.rs"]
mod support;

use mixc_codegen::{generate, Arch, CodegenError, GeneratedKernel, KernelConfig, Target};
use mixc_dsl::ir::{DType, MixerSpec};
use mixc_runtime::compile_cache::CompileCache;
use mixc_runtime::nvrtc::{self, CompiledModule, NvrtcError};
use rayon::prelude::*;
use std::time::Instant;

fn require_nvrtc() {
    if let Err(e) = nvrtc::nvrtc_info() {
        panic!("these tests compile kernels with NVRTC, which is not available: {e}");
    }
}

/// Configurations compiled per spec and target: the default plus up to two
/// alternatives (`candidate_configs` keeps only those that generate).
const CONFIGS_PER_TARGET: usize = 3;

struct Job {
    spec: MixerSpec,
    target: Target,
    cfg: KernelConfig,
    is_default: bool,
}

fn jobs() -> Vec<Job> {
    let mut out = Vec::new();
    for spec in support::example_specs() {
        for arch in Arch::ALL {
            for dtype in [DType::F16, DType::Bf16, DType::F32] {
                let target = Target::new(arch, dtype);
                let configs = mixc_codegen::candidate_configs(&spec, &target);
                for (n, cfg) in configs.into_iter().take(CONFIGS_PER_TARGET).enumerate() {
                    out.push(Job {
                        spec: spec.clone(),
                        target,
                        cfg,
                        is_default: n == 0,
                    });
                }
            }
        }
    }
    out
}

fn check(job: &Job, g: &GeneratedKernel, m: &CompiledModule) -> Result<String, String> {
    let arch = job.target.arch;
    let mut line = String::new();
    for k in &g.kernels {
        let r = m
            .resources_of(&k.name)
            .ok_or_else(|| format!("no ptxas report for {} in:\n{}", k.name, m.log))?;
        let smem = r.smem_bytes + k.dynamic_smem_bytes;
        if smem > arch.max_dynamic_smem_bytes() {
            return Err(format!(
                "{}: {smem} bytes of shared memory > {} on {arch}",
                k.name,
                arch.max_dynamic_smem_bytes()
            ));
        }
        if job.is_default
            && arch == Arch::Sm90
            && (r.spill_stores, r.spill_loads, r.stack_frame) != (0, 0, 0)
        {
            return Err(format!(
                "{} (default config on sm_90): {} bytes stack frame, {} spill stores, {} spill loads",
                k.name, r.stack_frame, r.spill_stores, r.spill_loads
            ));
        }
        if !line.is_empty() {
            line.push('\n');
        }
        line.push_str(&format!(
            "{:<48} {:>5} {:<4} {:<44} regs {:>3} smem {:>6} ({}) stack {} spill {}/{} {:>6.0} ms",
            k.name,
            arch.name(),
            job.target.dtype.name(),
            job.cfg.describe(),
            r.registers,
            smem,
            if k.needs_smem_opt_in {
                "dynamic, opt-in"
            } else {
                "within 48 KB"
            },
            r.stack_frame,
            r.spill_stores,
            r.spill_loads,
            m.compile_ms
        ));
    }
    Ok(line)
}

#[test]
fn every_example_compiles_for_every_target_and_config() {
    require_nvrtc();
    let t0 = Instant::now();
    let jobs = jobs();
    let supported = mixc_codegen::supported_families();
    // At least three configurations per spec and target for every supported family.
    let mut thin = Vec::new();
    for spec in support::example_specs()
        .iter()
        .filter(|s| supported.contains(&s.family))
    {
        for arch in Arch::ALL {
            for dtype in [DType::F16, DType::Bf16, DType::F32] {
                let n = jobs
                    .iter()
                    .filter(|j| j.spec.name == spec.name && j.target == Target::new(arch, dtype))
                    .count();
                if n < 3 {
                    thin.push(format!("{} {arch} {dtype}: {n} configs", spec.name));
                }
            }
        }
    }
    assert!(
        thin.is_empty(),
        "fewer than 3 tile configs generate for:\n{}",
        thin.join("\n")
    );
    let results: Vec<Result<Option<String>, String>> = jobs
        .par_iter()
        .map(|job| {
            let g = match generate(&job.spec, &job.target, &job.cfg) {
                Ok(g) => g,
                Err(CodegenError::Unsupported { .. }) if !supported.contains(&job.spec.family) => {
                    return Ok(None)
                }
                Err(e) => {
                    return Err(format!(
                        "{} {} {}: {e}",
                        job.spec.name, job.target.arch, job.cfg
                    ))
                }
            };
            // No cache: this test is about what NVRTC says now.
            let m = nvrtc::compile_with_cache(&g.kernels[0].name, &g.source, job.target.arch, None)
                .map_err(|e| format!("{} {} {}: {e}", job.spec.name, job.target.arch, job.cfg))?;
            check(job, &g, &m).map(Some)
        })
        .collect();
    let mut failures = Vec::new();
    let mut compiled = 0;
    for r in results {
        match r {
            Ok(Some(line)) => {
                compiled += 1;
                println!("{line}");
            }
            Ok(None) => {}
            Err(e) => failures.push(e),
        }
    }
    println!(
        "{compiled} kernels compiled in {:.1} s",
        t0.elapsed().as_secs_f64()
    );
    assert!(
        failures.is_empty(),
        "{} failures:\n{}",
        failures.len(),
        failures.join("\n\n")
    );
    // Every supported family is represented by at least one example.
    for f in supported {
        assert!(
            jobs.iter().any(|j| j.spec.family == *f),
            "no example spec exercises the {} family",
            f.name()
        );
    }
    assert!(
        compiled >= 3 * 2 * 3,
        "too few kernels compiled: {compiled}"
    );
}

#[test]
fn cache_hits_return_the_same_cubin() {
    require_nvrtc();
    let spec = support::example("causal_gqa_llama3");
    let target = Target::new(Arch::Sm90, DType::F16);
    let g = mixc_codegen::generate_default(&spec, &target).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let cache = CompileCache::new(dir.path());
    let name = &g.kernels[0].name;
    let first = nvrtc::compile_with_cache(name, &g.source, Arch::Sm90, Some(&cache)).unwrap();
    assert!(!first.cache_hit && first.cache_note.is_none());
    assert_eq!(&first.cubin[..4], b"\x7fELF", "a CUBIN is an ELF image");
    let second = nvrtc::compile_with_cache(name, &g.source, Arch::Sm90, Some(&cache)).unwrap();
    assert!(second.cache_hit);
    assert_eq!(first.cubin, second.cubin);
    assert_eq!(first.resources, second.resources);
    // Another arch is another key.
    let other = nvrtc::compile_with_cache(name, &g.source, Arch::Sm80, Some(&cache)).unwrap();
    assert!(!other.cache_hit);
    assert_ne!(other.cubin, first.cubin);
}

#[test]
fn compile_errors_carry_the_log_and_the_failing_line() {
    require_nvrtc();
    let src = "extern \"C\" __global__ void k(float* x) {\n    x[0] = undefined_name;\n}\n";
    let e = nvrtc::compile_with_cache("broken", src, Arch::Sm90, None).unwrap_err();
    let NvrtcError::Compile { log, excerpt, .. } = &e else {
        panic!("expected a compile error, got {e}")
    };
    assert!(log.contains("undefined_name"), "{log}");
    assert!(
        excerpt.contains(">    2 |     x[0] = undefined_name;"),
        "{excerpt}"
    );
    assert!(e.to_string().contains("sm_90"));
}

#[test]
fn every_supported_head_dim_fits_without_spills() {
    require_nvrtc();
    let base = support::example("causal_gqa_llama3");
    let mut jobs = Vec::new();
    for d in [64, 80, 96, 128, 192, 256] {
        for arch in Arch::ALL {
            for dtype in [DType::F16, DType::Bf16, DType::F32] {
                let mut spec = base.clone();
                spec.name = format!("causal_d{d}");
                spec.head_dim = d;
                spec.value_dim = d;
                jobs.push((spec, Target::new(arch, dtype)));
            }
        }
    }
    let failures: Vec<String> = jobs
        .par_iter()
        .filter_map(|(spec, target)| {
            let job = Job {
                spec: spec.clone(),
                target: *target,
                cfg: KernelConfig::default_for(spec, target),
                is_default: true,
            };
            let r = generate(&job.spec, target, &job.cfg)
                .map_err(|e| e.to_string())
                .and_then(|g| {
                    let m =
                        nvrtc::compile_with_cache(&g.kernels[0].name, &g.source, target.arch, None)
                            .map_err(|e| e.to_string())?;
                    check(&job, &g, &m)
                });
            match r {
                Ok(line) => {
                    println!("{line}");
                    None
                }
                Err(e) => Some(format!(
                    "d={} {} {}: {e}",
                    spec.head_dim, target.arch, target.dtype
                )),
            }
        })
        .collect();
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
}

/// Every expression form the lowering emits is valid CUDA C++ (in the score
/// function of both softmax kernels).
#[test]
fn every_expression_form_compiles() {
    use mixc_dsl::ir::{BinOp, Dim, ElemType, Expr, Func, InputDecl, InputRole, UnOp, Var};
    require_nvrtc();
    let bin = |op, a, b| Expr::Binary(op, Box::new(a), Box::new(b));
    let call = |f, args| Expr::Call(f, args);
    let (i, j, h, s) = (
        Expr::Var(Var::I),
        Expr::Var(Var::J),
        Expr::Var(Var::H),
        Expr::Var(Var::S),
    );
    let dist = bin(BinOp::Sub, i.clone(), j.clone());
    let terms = vec![
        call(
            Func::Exp,
            vec![bin(BinOp::Div, dist.clone(), Expr::Int(1000))],
        ),
        call(
            Func::Log,
            vec![bin(
                BinOp::Add,
                call(Func::Abs, vec![dist.clone()]),
                Expr::Float(1.0),
            )],
        ),
        call(Func::Sqrt, vec![call(Func::Abs, vec![Expr::Float(-2.5)])]),
        call(
            Func::Floor,
            vec![bin(BinOp::Mul, Expr::Float(0.5), h.clone())],
        ),
        call(Func::Min, vec![dist.clone(), Expr::Int(7)]),
        call(
            Func::Max,
            vec![Expr::Float(0.25), call(Func::Tanh, vec![Expr::Float(0.1)])],
        ),
        call(
            Func::Pow,
            vec![
                Expr::Float(2.0),
                Expr::Unary(UnOp::Neg, Box::new(h.clone())),
            ],
        ),
        call(Func::Clamp, vec![dist.clone(), Expr::Int(-3), Expr::Int(3)]),
        call(
            Func::Clamp,
            vec![Expr::Float(0.3), Expr::Float(0.0), Expr::Float(1.0)],
        ),
        bin(BinOp::Rem, dist.clone(), Expr::Int(5)),
        bin(BinOp::Rem, Expr::Float(7.5), Expr::Float(2.0)),
        call(Func::AlibiSlope, vec![h.clone()]),
        Expr::Index {
            input: "tab".into(),
            indices: vec![h.clone(), dist.clone()],
        },
        Expr::Index {
            input: "pos".into(),
            indices: vec![i.clone()],
        },
    ];
    let bias = terms
        .into_iter()
        .reduce(|a, b| bin(BinOp::Add, a, b))
        .unwrap();
    let mut spec = support::example("full_attention");
    spec.name = "kitchen_sink".into();
    spec.heads = 12; // not a power of two: the interpolated ALiBi slopes
    spec.kv_heads = 12;
    spec.inputs = vec![
        InputDecl {
            name: "tab".into(),
            elem: ElemType::F32,
            dims: vec![Dim::Heads, Dim::Fixed(33)],
            role: InputRole::Table,
        },
        InputDecl {
            name: "pos".into(),
            elem: ElemType::I32,
            dims: vec![Dim::Seq],
            role: InputRole::Table,
        },
    ];
    spec.bias = Some(bias);
    spec.transform = Some(bin(
        BinOp::Mul,
        Expr::Float(30.0),
        call(Func::Tanh, vec![bin(BinOp::Div, s, Expr::Float(30.0))]),
    ));
    for dtype in [DType::Bf16, DType::F32] {
        let target = Target::new(Arch::Sm90, dtype);
        let g = mixc_codegen::generate_default(&spec, &target).unwrap();
        assert!(
            g.source.contains("const float hoist"),
            "per-head terms are hoisted"
        );
        let m = nvrtc::compile_with_cache(&g.kernels[0].name, &g.source, Arch::Sm90, None)
            .unwrap_or_else(|e| panic!("{e}"));
        let r = m.resources_of(&g.kernels[0].name).unwrap();
        assert_eq!((r.spill_stores, r.stack_frame), (0, 0), "{dtype}: {r:?}");
    }
}

/// Not run by default: the probe that `missing_nvrtc_is_a_failure_with_the_fix`
/// runs in a child process with NVRTC hidden.
#[test]
#[ignore = "run by missing_nvrtc_is_a_failure_with_the_fix"]
fn probe_nvrtc() {
    require_nvrtc();
}

#[test]
fn missing_nvrtc_is_a_failure_with_the_fix() {
    let out = std::process::Command::new(std::env::current_exe().unwrap())
        .args([
            "--ignored",
            "--exact",
            "probe_nvrtc",
            "--nocapture",
            "--test-threads=1",
        ])
        .env("MIXC_CUDA_DIR", "/nonexistent/mixc-cuda")
        .output()
        .unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "the probe must fail without NVRTC:\n{text}"
    );
    assert!(
        text.contains("NVRTC not found")
            && text.contains("scripts/install-cuda.sh")
            && text.contains("/nonexistent/mixc-cuda"),
        "{text}"
    );
}

/// The generated backward kernels (issue 15) of every example whose family
/// has them, for sm_80 and sm_90 in f16 and bf16 at the default backward
/// configuration: they compile, and none of the three kernels spills or
/// keeps a stack frame on either arch.
#[test]
fn every_backward_kernel_compiles_without_spills() {
    require_nvrtc();
    let t0 = Instant::now();
    let mut jobs = Vec::new();
    for spec in support::example_specs() {
        for arch in Arch::ALL {
            for dtype in [DType::F16, DType::Bf16] {
                let target = Target::new(arch, dtype);
                let cfg = KernelConfig::backward_default_for(&spec, &target);
                jobs.push((spec.clone(), target, cfg));
            }
        }
    }
    let results: Vec<Result<Option<String>, String>> = jobs
        .par_iter()
        .map(|(spec, target, cfg)| {
            let g = match mixc_codegen::generate_backward(spec, target, cfg) {
                Ok(g) => g,
                Err(CodegenError::Unsupported { .. })
                    if spec.family != mixc_dsl::Family::Softmax =>
                {
                    return Ok(None)
                }
                Err(e) => return Err(format!("{} {} {cfg}: {e}", spec.name, target.arch)),
            };
            let m = nvrtc::compile_with_cache(&g.kernels[0].name, &g.source, target.arch, None)
                .map_err(|e| format!("{} {} {cfg}: {e}", spec.name, target.arch))?;
            let job = Job {
                spec: spec.clone(),
                target: *target,
                cfg: *cfg,
                is_default: true,
            };
            // Zero spills on both arches (`check` asks it of sm_90 only).
            for k in &g.kernels {
                let r = m
                    .resources_of(&k.name)
                    .ok_or_else(|| format!("no report for {}", k.name))?;
                if (r.spill_stores, r.spill_loads, r.stack_frame) != (0, 0, 0) {
                    return Err(format!(
                        "{} on {}: {} bytes stack frame, {} spill stores, {} spill loads",
                        k.name, target.arch, r.stack_frame, r.spill_stores, r.spill_loads
                    ));
                }
            }
            check(&job, &g, &m).map(Some)
        })
        .collect();
    let (mut compiled, mut failures) = (0, Vec::new());
    for r in results {
        match r {
            Ok(Some(line)) => {
                compiled += 1;
                println!("{line}");
            }
            Ok(None) => {}
            Err(e) => failures.push(e),
        }
    }
    println!(
        "{compiled} backward modules compiled in {:.1} s",
        t0.elapsed().as_secs_f64()
    );
    assert!(
        failures.is_empty(),
        "{} failures:\n{}",
        failures.len(),
        failures.join("\n\n")
    );
    assert!(
        compiled >= 10 * 4,
        "too few backward modules compiled: {compiled}"
    );
}

/// FlexAttention-style specs (expression masks reading `h`, `b`, `seq` and
/// tables; `select`, `sin` / `cos`, `sigmoid`, `div`, `int`, `kv_seq` in
/// bias and transform): the forward kernels (tensor-core bf16 and SIMT f32)
/// and the backward kernels compile for sm_80 and sm_90 at the default
/// configuration with no spills and no stack frame.
#[test]
fn flex_attention_specs_compile_without_spills() {
    require_nvrtc();
    let t0 = Instant::now();
    let specs: Vec<MixerSpec> = [
        "mixer flex_window { heads = 8; head_dim = 64; input prefix: f32[batch]; \
         score = dot(q, k); mask = (j <= i && i - j < 8 * (h + 1)) || j < int(prefix[b]); \
         transform = s + sin(i * 1.0) * cos(j * 1.0); norm = softmax; }",
        "mixer flex_dilated { heads = 8; kv_heads = 2; head_dim = 64; score = dot(q, k); \
         mask = causal && (i - j) % 4 == 0 && !(b > seq); \
         bias = select(i > j, -0.5 * (i - j), 0.0) - log(1.0 * kv_seq); norm = softmax; }",
        "mixer flex_rel { heads = 8; head_dim = 64; input rel: f32[heads, 64]; score = dot(q, k); \
         mask = j < i || (h == 0 && i == j); bias = rel[h][div(i - j, 4) + 32] * sigmoid(1.0 * h); \
         transform = s * 2.0; norm = softmax; }",
        "mixer flex_keep { heads = 8; head_dim = 64; input keep: f32[heads, 128]; score = dot(q, k); \
         mask = keep[h][div(j, 16)] > 0.5 || j == i; transform = select(s > 0.0, s, 0.5 * s); \
         norm = softmax; }",
    ]
    .iter()
    .map(|src| mixc_dsl::parse_str(src).unwrap_or_else(|e| panic!("{src}: {e}")))
    .collect();
    let mut jobs = Vec::new();
    for spec in &specs {
        for arch in Arch::ALL {
            jobs.push((spec, Target::new(arch, DType::Bf16), false));
            // flex_rel's backward (a bias table's gradient atomics plus a
            // transform at head_dim 64) is the one that spilled before its
            // default took eight warps.
            jobs.push((spec, Target::new(arch, DType::Bf16), true));
        }
        jobs.push((spec, Target::new(Arch::Sm90, DType::F32), false));
    }
    let failures: Vec<String> = jobs
        .par_iter()
        .filter_map(|&(spec, target, backward)| {
            let what = format!(
                "{} {} {}{}",
                spec.name,
                target.arch,
                target.dtype,
                if backward { " backward" } else { "" }
            );
            let g = if backward {
                let cfg = KernelConfig::backward_default_for(spec, &target);
                mixc_codegen::generate_backward(spec, &target, &cfg)
            } else {
                mixc_codegen::generate_default(spec, &target)
            };
            let g = match g {
                Ok(g) => g,
                Err(e) => return Some(format!("{what}: {e}")),
            };
            let m =
                match nvrtc::compile_with_cache(&g.kernels[0].name, &g.source, target.arch, None) {
                    Ok(m) => m,
                    Err(e) => return Some(format!("{what}: {e}")),
                };
            for k in &g.kernels {
                let Some(r) = m.resources_of(&k.name) else {
                    return Some(format!("{what}: no ptxas report for {}", k.name));
                };
                if (r.spill_stores, r.spill_loads, r.stack_frame) != (0, 0, 0) {
                    return Some(format!(
                        "{what}: {} has {} bytes stack frame, {} spill stores, {} spill loads",
                        k.name, r.stack_frame, r.spill_stores, r.spill_loads
                    ));
                }
                println!("{what:<40} {:<48} regs {:>3}", k.name, r.registers);
            }
            None
        })
        .collect();
    println!(
        "{} flex modules compiled in {:.1} s",
        jobs.len(),
        t0.elapsed().as_secs_f64()
    );
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
}
