//! The CUDA backend.
//!
//! Without a GPU: `probe` and `run` fail with a clear message (never a
//! panic), and the backend's own helper kernels compile with NVRTC (needs
//! `scripts/install-cuda.sh`, like the other NVRTC tests).
//!
//! With a GPU (`probe()` succeeds): every example spec at sequence lengths
//! 1, 7, 33, 100, 257 and 1024, batch 2, 1 and 4 virtual ranks, contiguous
//! and zigzag sharding, against the f64 reference within the dtype's
//! tolerance; plus f32 (SIMT kernels) and f16 runs, timing, several GPUs
//! when present. Without one, each GPU test prints `SKIPPED: no GPU: ...`
//! and passes. `scripts/gpu-check.sh` runs this binary on a GPU machine.
//! With two GPUs and libnccl, `multi_process_ring_matches_reference` spawns
//! this binary twice as the ranks of a torchrun-style run.
//!
//! Examples are found at `MIXC_EXAMPLES_DIR`, else `<crate>/../examples`,
//! else `./examples` (the test binary may run from a copy of the repository).

use std::path::{Path, PathBuf};

use mixc_dsl::ir::{DType, MixerSpec};
use mixc_runtime::cuda::{self, CudaOptions, DeviceInfo};
use mixc_runtime::inputs::random_inputs;
use mixc_runtime::ring::Sharding;
use mixc_runtime::{nvrtc, reference, MixerInputs, Tensor};

/// Every example file; a test below exists for each (checked).
const EXAMPLES: [&str; 15] = [
    "alibi_bloom",
    "block_sparse_bigbird",
    "causal_gqa_llama3",
    "chunked_llama4",
    "dilated_longnet",
    "document_mask",
    "full_attention",
    "gated_mamba2",
    "linear_elu",
    "long_conv_hyena",
    "prefix_lm",
    "relative_bias_t5",
    "retention_retnet",
    "sliding_window_mistral",
    "softcap_window_gemma2",
];

const SEQS: [usize; 6] = [1, 7, 33, 100, 257, 1024];
const BATCH: usize = 2;

fn examples_dir() -> PathBuf {
    let candidates = [
        std::env::var_os("MIXC_EXAMPLES_DIR").map(PathBuf::from),
        Some(Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples")),
        Some(PathBuf::from("examples")),
    ];
    candidates
        .into_iter()
        .flatten()
        .find(|p| p.join("full_attention.mix").is_file())
        .expect("examples/ not found: set MIXC_EXAMPLES_DIR")
}

fn example(name: &str) -> MixerSpec {
    let p = examples_dir().join(format!("{name}.mix"));
    mixc_dsl::parse_file(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

/// `Some(info)` when a GPU is usable, else prints why the test skips.
fn gpu(test: &str) -> Option<DeviceInfo> {
    match cuda::probe() {
        Ok(info) => {
            eprintln!("{test}: GPU {}", info.describe());
            Some(info)
        }
        Err(e) => {
            eprintln!("SKIPPED: no GPU: {test}: {e}");
            None
        }
    }
}

/// `--check`'s tolerance per storage type, shared with `mixc run`.
fn tolerance(dtype: DType) -> f64 {
    mixc_runtime::reference::check_tolerance(dtype)
}

/// q, k, v rounded to the storage type, as `mixc run` does, so the
/// reference sees the values the GPU sees.
fn inputs_for(spec: &MixerSpec, seq: usize, dtype: DType) -> MixerInputs {
    let mut x = random_inputs(spec, BATCH, seq, 11);
    mixc_runtime::inputs::round_to_dtype(&mut x, dtype).unwrap();
    x
}

/// max |got - want| / max |want| (NaN propagates).
fn rel_error(got: &Tensor<f32>, want: &Tensor<f64>) -> f64 {
    assert_eq!(got.shape, want.shape, "output shape");
    let mut max_err = 0f64;
    let mut max_ref = 0f64;
    for (&g, &w) in got.data.iter().zip(&want.data) {
        let e = (g as f64 - w).abs();
        if e.is_nan() || e > max_err {
            max_err = e;
        }
        max_ref = max_ref.max(w.abs());
    }
    if max_ref > 0.0 {
        max_err / max_ref
    } else {
        max_err
    }
}

fn opts(ranks: usize, sharding: Sharding, dtype: DType) -> CudaOptions {
    CudaOptions {
        ranks,
        sharding,
        dtype,
        config: None,
        devices: None,
        world: None,
    }
}

/// Runs and checks one configuration; returns the error for the report.
fn check_run(spec: &MixerSpec, x: &MixerInputs, want: &Tensor<f64>, o: &CudaOptions) -> f64 {
    let run = cuda::run(spec, x, o).unwrap_or_else(|e| {
        panic!(
            "{} seq {} R {} {:?} {:?}: {e}",
            spec.name, x.seq, o.ranks, o.sharding, o.dtype
        )
    });
    let err = rel_error(&run.output, want);
    eprintln!(
        "{} {} seq {} R {} {:<10} err {err:.2e} ({} GPU(s), {:.3} ms kernels)",
        spec.name,
        o.dtype.name(),
        x.seq,
        o.ranks,
        o.sharding.name(),
        run.devices,
        run.kernel_seconds * 1e3
    );
    assert!(
        !err.is_nan() && err <= tolerance(o.dtype),
        "{} {} seq {} R {} {:?}: relative error {err:.3e} above {:.0e}",
        spec.name,
        o.dtype.name(),
        x.seq,
        o.ranks,
        o.sharding,
        tolerance(o.dtype)
    );
    err
}

/// The main matrix for one example, plus f32 (SIMT) and f16 spot checks.
fn check_example(name: &str) {
    let Some(_) = gpu(name) else { return };
    let spec = example(name);
    for seq in SEQS {
        let x = inputs_for(&spec, seq, spec.dtype);
        let want = reference::evaluate(&spec, &x).expect("reference");
        for ranks in [1usize, 4] {
            if ranks > seq {
                continue;
            }
            for sharding in [Sharding::Contiguous, Sharding::Zigzag] {
                check_run(&spec, &x, &want, &opts(ranks, sharding, spec.dtype));
            }
        }
    }
    for (dtype, seq, ranks, sharding) in [
        (DType::F32, 100, 1, Sharding::Contiguous),
        (DType::F32, 100, 3, Sharding::Zigzag),
        (DType::F16, 257, 2, Sharding::Zigzag),
    ] {
        let x = inputs_for(&spec, seq, dtype);
        let want = reference::evaluate(&spec, &x).expect("reference");
        check_run(&spec, &x, &want, &opts(ranks, sharding, dtype));
    }
}

macro_rules! example_tests {
    ($($name:ident),* $(,)?) => {
        $(
            #[test]
            fn $name() {
                check_example(stringify!($name));
            }
        )*
        /// The list above names every example file.
        #[test]
        fn every_example_has_a_gpu_test() {
            let tested = [$(stringify!($name)),*];
            let mut files: Vec<String> = std::fs::read_dir(examples_dir())
                .unwrap()
                .filter_map(|e| {
                    let p = e.unwrap().path();
                    (p.extension()? == "mix").then(|| p.file_stem().unwrap().to_string_lossy().into_owned())
                })
                .collect();
            files.sort();
            assert_eq!(files, tested.to_vec(), "examples without a GPU test (or tests without an example)");
            assert_eq!(tested.to_vec(), EXAMPLES.to_vec());
        }
    };
}

example_tests!(
    alibi_bloom,
    block_sparse_bigbird,
    causal_gqa_llama3,
    chunked_llama4,
    dilated_longnet,
    document_mask,
    full_attention,
    gated_mamba2,
    linear_elu,
    long_conv_hyena,
    prefix_lm,
    relative_bias_t5,
    retention_retnet,
    sliding_window_mistral,
    softcap_window_gemma2,
);

/// No GPU: a clear error naming the driver or GPU and the way out; with
/// one: a sane description.
#[test]
fn probe_explains_itself() {
    match cuda::probe() {
        Ok(info) => {
            assert!(info.count >= 1);
            assert!(info.compute_capability.0 >= 8, "{info:?}");
            assert!(info.total_memory > 0);
            eprintln!("probe: {}", info.describe());
        }
        Err(e) => {
            let m = e.to_string();
            assert!(m.contains("GPU") || m.contains("driver"), "{m}");
            // A variant a caller can match; the CLI adds its flag advice.
            assert!(
                matches!(e, mixc_runtime::RuntimeError::NoGpu { .. }),
                "{e:?}"
            );
            assert!(!m.contains("--backend"), "{m}");
            eprintln!("probe (expected without a GPU): {m}");
        }
    }
}

/// Without a GPU, a run and a timing request fail with the probe's message.
#[test]
fn run_without_gpu_is_a_clear_error() {
    if cuda::probe().is_ok() {
        eprintln!("SKIPPED: a GPU is present, the no-GPU error cannot be observed");
        return;
    }
    let spec = example("causal_gqa_llama3");
    let x = inputs_for(&spec, 8, spec.dtype);
    let e = cuda::run(&spec, &x, &CudaOptions::default_for(&spec)).unwrap_err();
    assert!(e.is_gpu_specific(), "{e:?}");
    let e = e.to_string();
    assert!(e.contains("CUDA backend unavailable"), "{e}");
    let cfg = mixc_codegen::KernelConfig::default_for(
        &spec,
        &mixc_codegen::Target::new(mixc_codegen::Arch::Sm90, spec.dtype),
    );
    let e = cuda::time_config(&spec, &[x], spec.dtype, &cfg, 1, 2)
        .unwrap_err()
        .to_string();
    assert!(e.contains("CUDA backend unavailable"), "{e}");
}

/// The merge / reset kernels the backend adds compile for both archs.
#[test]
fn helper_kernels_compile_with_nvrtc() {
    if let Err(e) = nvrtc::nvrtc_info() {
        panic!("this test compiles with NVRTC, which is not available: {e}");
    }
    for arch in mixc_codegen::Arch::ALL {
        let m = nvrtc::compile("mixc_merge_lse", cuda::helper_kernels_source(), arch)
            .unwrap_or_else(|e| panic!("{arch}: {e}"));
        assert!(!m.cubin.is_empty());
        // Exactly the names the backend loads, for every storage type.
        for dtype in [DType::F32, DType::F16, DType::Bf16] {
            for f in cuda::helper_kernel_names(dtype) {
                let r = m
                    .resources_of(&f)
                    .unwrap_or_else(|| panic!("{arch}: no `{f}` in the ptxas report:\n{}", m.log));
                assert_eq!(r.spill_stores, 0, "{arch} {f}");
                assert_eq!(r.stack_frame, 0, "{arch} {f}: local-memory stack frame");
            }
        }
    }
}

/// A family/mask combination the kernels do not implement is an error for
/// which the CPU backend is the way out (with a GPU: the codegen's reason).
#[test]
fn unsupported_spec_is_a_clear_error() {
    let spec = mixc_dsl::parse_str(
        "mixer bidir_linear { heads = 2; head_dim = 16; dtype = f32; \
         score = dot(elu1(q), elu1(k)); mask = all; norm = sum(eps = 1e-6); }",
    )
    .unwrap();
    let x = inputs_for(&spec, 16, DType::F32);
    let e = cuda::run(&spec, &x, &CudaOptions::default_for(&spec)).unwrap_err();
    assert!(e.is_gpu_specific(), "{e:?}");
    let e = e.to_string();
    if cuda::probe().is_ok() {
        assert!(e.contains("causal"), "{e}");
    }
}

/// CUDA-event timing returns one positive time per repetition.
#[test]
fn time_config_times_every_rep() {
    let Some(_) = gpu("time_config_times_every_rep") else {
        return;
    };
    let spec = example("causal_gqa_llama3");
    let target = mixc_codegen::Target::new(
        cuda::arch_for(cuda::probe().unwrap().compute_capability).unwrap(),
        spec.dtype,
    );
    let xs: Vec<MixerInputs> = (0..3).map(|s| random_inputs(&spec, 1, 2048, s)).collect();
    for cfg in mixc_codegen::candidate_configs(&spec, &target)
        .iter()
        .take(2)
    {
        let t = cuda::time_config(&spec, &xs, spec.dtype, cfg, 1, 4).unwrap();
        assert_eq!(t.len(), 4);
        assert!(t.iter().all(|&s| s > 0.0 && s < 10.0), "{t:?}");
        eprintln!("{}: {:?}", cfg.describe(), t);
    }
}

/// The ring over several GPUs (one rank per GPU, then more ranks than GPUs)
/// gives the single-GPU result; skipped with fewer than two GPUs.
#[test]
fn multi_gpu_ring_matches_reference() {
    let Some(info) = gpu("multi_gpu_ring_matches_reference") else {
        return;
    };
    if info.count < 2 {
        eprintln!("SKIPPED: one GPU only: multi_gpu_ring_matches_reference");
        return;
    }
    for name in ["causal_gqa_llama3", "long_conv_hyena", "gated_mamba2"] {
        let spec = example(name);
        let x = inputs_for(&spec, 257, spec.dtype);
        let want = reference::evaluate(&spec, &x).unwrap();
        for ranks in [2, info.count, 2 * info.count + 1] {
            let mut o = opts(ranks, Sharding::Zigzag, spec.dtype);
            o.devices = Some(info.count.min(ranks));
            check_run(&spec, &x, &want, &o);
        }
    }
}

/// The number of ranks and the sharding change the result only by rounding.
#[test]
fn ranks_and_sharding_agree() {
    let Some(_) = gpu("ranks_and_sharding_agree") else {
        return;
    };
    let spec = example("document_mask");
    let x = inputs_for(&spec, 300, DType::F32);
    let base = cuda::run(&spec, &x, &opts(1, Sharding::Contiguous, DType::F32))
        .unwrap()
        .output;
    let scale = base
        .data
        .iter()
        .fold(0f32, |m, v| m.max(v.abs()))
        .max(1e-30);
    for (ranks, sharding) in [
        (2, Sharding::Zigzag),
        (5, Sharding::Contiguous),
        (8, Sharding::Zigzag),
    ] {
        let o = cuda::run(&spec, &x, &opts(ranks, sharding, DType::F32))
            .unwrap()
            .output;
        let d = o
            .data
            .iter()
            .zip(&base.data)
            .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
        assert!(d / scale < 1e-5, "R {ranks} {sharding:?}: {d}");
    }
}

/// What `Gpu::opt_in_smem` checks before the first launch, on the cubins the
/// backend compiles for every example (default configuration, the spec's
/// dtype, both archs): static + dynamic shared memory within the arch's
/// opt-in limit (H100: 227 KB, A100: 163 KB) and a legal block size. A
/// kernel that fails this would fail on its first launch on that GPU.
#[test]
fn example_kernels_fit_the_launch_limits() {
    if let Err(e) = nvrtc::nvrtc_info() {
        panic!("this test compiles with NVRTC, which is not available: {e}");
    }
    for name in EXAMPLES {
        let spec = example(name);
        for arch in mixc_codegen::Arch::ALL {
            let target = mixc_codegen::Target::new(arch, spec.dtype);
            let g = mixc_codegen::generate_default(&spec, &target)
                .unwrap_or_else(|e| panic!("{name} {arch}: {e}"));
            let m = nvrtc::compile_generated(&g).unwrap_or_else(|e| panic!("{name} {arch}: {e}"));
            let limit = match arch {
                mixc_codegen::Arch::Sm90 => 227 * 1024,
                _ => 163 * 1024,
            };
            for k in &g.kernels {
                let r = m
                    .resources_of(&k.name)
                    .unwrap_or_else(|| panic!("{name} {arch}: no `{}` in the report", k.name));
                let total = r.smem_bytes + k.dynamic_smem_bytes;
                assert!(
                    total <= limit,
                    "{name} {arch}: {} static + {} dynamic bytes of shared memory > {limit}",
                    r.smem_bytes,
                    k.dynamic_smem_bytes
                );
                assert!(
                    (32..=1024).contains(&k.threads_per_block) && k.threads_per_block % 32 == 0,
                    "{name} {arch}: {} threads per block",
                    k.threads_per_block
                );
                // 64K registers per SM: the block must fit one SM.
                assert!(
                    r.registers * k.threads_per_block <= 65_536,
                    "{name} {arch}: {} registers x {} threads",
                    r.registers,
                    k.threads_per_block
                );
            }
        }
    }
}

/// One rank of `multi_process_ring_matches_reference`: does nothing unless
/// that test spawned this binary with `MIXC_DIST_CHILD=<example>` and the
/// torchrun variables; rank 0 checks the gathered output.
#[test]
fn multi_process_child() {
    let Ok(name) = std::env::var("MIXC_DIST_CHILD") else {
        return;
    };
    let spec = example(&name);
    let x = inputs_for(&spec, 257, spec.dtype);
    // The world is the caller's choice, read from the environment here.
    let world = cuda::dist::DistEnv::from_env().unwrap();
    let run = cuda::run(
        &spec,
        &x,
        &CudaOptions {
            world,
            ..opts(1, Sharding::Zigzag, spec.dtype)
        },
    )
    .unwrap_or_else(|e| panic!("{name}: {e}"));
    let (rank, world) = run
        .dist_rank
        .expect("WORLD_SIZE > 1 makes a multi-process run");
    assert_eq!(world, 2);
    if rank == 0 {
        let want = reference::evaluate(&spec, &x).unwrap();
        let err = rel_error(&run.output, &want);
        eprintln!("{name}: 2 processes, relative error {err:.2e}");
        assert!(err <= tolerance(spec.dtype), "{name}: error {err:.3e}");
    }
}

/// The ring across two processes (one GPU each, NCCL), started like
/// torchrun: this test binary is spawned twice as `multi_process_child`.
/// Skipped with fewer than two GPUs or without libnccl.
#[test]
fn multi_process_ring_matches_reference() {
    let test = "multi_process_ring_matches_reference";
    let Some(info) = gpu(test) else {
        return;
    };
    if info.count < 2 {
        eprintln!("SKIPPED: one GPU only: {test}");
        return;
    }
    if let Err(e) = cuda::nccl_available() {
        eprintln!("SKIPPED: no NCCL: {test}: {e}");
        return;
    }
    let exe = std::env::current_exe().unwrap();
    for name in ["causal_gqa_llama3", "long_conv_hyena", "gated_mamba2"] {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let children: Vec<_> = (0..2)
            .map(|rank| {
                std::process::Command::new(&exe)
                    .args(["--exact", "multi_process_child", "--nocapture"])
                    .env("MIXC_DIST_CHILD", name)
                    .env("RANK", rank.to_string())
                    .env("LOCAL_RANK", rank.to_string())
                    .env("WORLD_SIZE", "2")
                    .env("MASTER_ADDR", "127.0.0.1")
                    .env("MASTER_PORT", port.to_string())
                    .env("MIXC_DIST_TIMEOUT", "120")
                    .stdout(std::process::Stdio::piped())
                    .stderr(std::process::Stdio::piped())
                    .spawn()
                    .unwrap()
            })
            .collect();
        for (rank, c) in children.into_iter().enumerate() {
            let out = c.wait_with_output().unwrap();
            let text = format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
            eprintln!("--- {name} rank {rank}:\n{text}");
            assert!(out.status.success(), "{name} rank {rank} failed");
            // The child test must have run (not been filtered away).
            assert!(text.contains("1 passed"), "{name} rank {rank}: {text}");
        }
    }
}

/// The direct call on caller-owned buffers and a caller stream (as PyTorch
/// would make them): one-rank mixers of every family write `o` (softmax also
/// `lse`) in place,
/// matching the reference.
#[test]
fn direct_device_calls_match_reference() {
    use cudarc::driver::{CudaContext, DevicePtr};
    use mixc_runtime::cuda::args::DeviceCall;
    use mixc_runtime::{Device, Mixer, Options};
    let Some(_) = gpu("direct_device_calls_match_reference") else {
        return;
    };
    let ctx = CudaContext::new(0).unwrap();
    let stream = ctx.new_stream().unwrap();
    for name in [
        "causal_gqa_llama3",
        "document_mask",
        "alibi_bloom",
        "softcap_window_gemma2",
        "long_conv_hyena",
        "gated_mamba2",
        "linear_elu",
    ] {
        let spec = example(name);
        let m = Mixer::new(&spec, Options::on(Device::Cuda(0))).unwrap();
        for seq in [1, 33, 257] {
            let x = inputs_for(&spec, seq, spec.dtype);
            let up = |d: &[f32]| -> cudarc::driver::CudaSlice<u8> {
                let bytes: Vec<u8> = match spec.dtype {
                    DType::F32 => d.iter().flat_map(|v| v.to_le_bytes()).collect(),
                    DType::F16 => d
                        .iter()
                        .flat_map(|v| half::f16::from_f32(*v).to_le_bytes())
                        .collect(),
                    DType::Bf16 => d
                        .iter()
                        .flat_map(|v| half::bf16::from_f32(*v).to_le_bytes())
                        .collect(),
                };
                if bytes.is_empty() {
                    // q and k of a convolution: unused, but not null.
                    return stream.alloc_zeros::<u8>(4).unwrap();
                }
                stream.clone_htod(&bytes).unwrap()
            };
            let (q, k, v) = (up(&x.q.data), up(&x.k.data), up(&x.v.data));
            let eb = if spec.dtype == DType::F32 { 4 } else { 2 };
            let (h, dv) = (spec.heads as usize, spec.value_dim as usize);
            let o = stream.alloc_zeros::<u8>(BATCH * seq * h * dv * eb).unwrap();
            let lse = stream.alloc_zeros::<u8>(BATCH * h * seq * 4).unwrap();
            let mut extra = std::collections::BTreeMap::new();
            let mut keep = Vec::new();
            for (n, t) in &x.extra {
                let bytes: Vec<u8> = match t {
                    mixc_runtime::ExtraTensor::I32(t) => {
                        t.data.iter().flat_map(|v| v.to_le_bytes()).collect()
                    }
                    mixc_runtime::ExtraTensor::F32(t) => {
                        t.data.iter().flat_map(|v| v.to_le_bytes()).collect()
                    }
                };
                let buf = stream.clone_htod(&bytes).unwrap();
                extra.insert(n.clone(), buf.device_ptr(&stream).0);
                keep.push(buf);
            }
            let ptr = |b: &cudarc::driver::CudaSlice<u8>| b.device_ptr(&stream).0;
            let call = DeviceCall {
                batch: BATCH,
                seq,
                q: ptr(&q),
                k: ptr(&k),
                v: ptr(&v),
                o: ptr(&o),
                lse: ptr(&lse),
                extra,
            };
            // SAFETY: every buffer above lives on this context, sized for the call.
            unsafe { m.forward_device(&call, stream.cu_stream() as _) }
                .unwrap_or_else(|e| panic!("{name} seq {seq}: {e}"));
            stream.synchronize().unwrap();
            let bytes = stream.clone_dtoh(&o).unwrap();
            let got: Vec<f32> = match spec.dtype {
                DType::F32 => bytes
                    .chunks(4)
                    .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
                    .collect(),
                DType::F16 => bytes
                    .chunks(2)
                    .map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32())
                    .collect(),
                DType::Bf16 => bytes
                    .chunks(2)
                    .map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32())
                    .collect(),
            };
            let want = reference::evaluate(&spec, &x).unwrap();
            let err = rel_error(&Tensor::new(want.shape.clone(), got), &want);
            assert!(
                err <= tolerance(spec.dtype),
                "{name} seq {seq}: error {err:.3e}"
            );
        }
    }
}
