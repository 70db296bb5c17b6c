//! The library API (`mixc::Mixer`) as a user's program calls it: compile
//! once, call many times, against the f64 reference; what it refuses and how.

use std::path::{Path, PathBuf};

use mixc::runtime::counters;
use mixc::{BackendKind, Device, Error, Mixer, MixerInputs, Options, Tiles};

fn examples() -> Vec<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples");
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "mix"))
        .collect();
    v.sort();
    assert!(v.len() >= 14, "{v:?}");
    v
}

/// Model-sized example shapes, shrunk so the reference stays quick.
fn small(spec: &mut mixc::MixerSpec) {
    spec.heads = spec.heads.min(4);
    spec.kv_heads = spec.kv_heads.min(spec.heads);
    while !spec.heads.is_multiple_of(spec.kv_heads) {
        spec.kv_heads -= 1;
    }
    spec.head_dim = spec.head_dim.min(32);
    spec.value_dim = spec.value_dim.min(32);
}

/// The accepted error of `m`'s arithmetic (bf16 products for bf16 specs
/// on CPUs with AVX-512 BF16, else f32).
fn tol(m: &Mixer) -> f64 {
    mixc::runtime::reference::check_tolerance(m.compute_dtype())
}

fn max_rel_error(m: &Mixer, x: &MixerInputs, o: &mixc::Tensor<f32>) -> f64 {
    let plan = m.check_plan(x.seq, true);
    let r = m.check(x, o, &plan, &|_, _| {}).unwrap();
    assert!(r.full);
    r.max_rel_error
}

/// Every example, one `Mixer` per rank count, called at two ragged lengths
/// and two batch sizes: each output matches the reference.
#[test]
fn one_mixer_runs_every_length_of_every_example() {
    for path in examples() {
        let mut spec = mixc::parse_file(&path).unwrap();
        small(&mut spec);
        for ranks in [1, 3] {
            let m = Mixer::new(&spec, Options::on(Device::Cpu).with_ranks(ranks)).unwrap();
            assert_eq!(m.backend(), BackendKind::Cpu);
            for (batch, seq) in [(1, 77), (2, 130)] {
                let x = mixc::random_inputs(&spec, batch, seq, 5);
                let out = m.forward(&x).unwrap();
                assert_eq!(
                    out.o.shape,
                    [batch, seq, spec.heads as usize, spec.value_dim as usize]
                );
                let e = max_rel_error(&m, &x, &out.o);
                assert!(
                    e < tol(&m),
                    "{}: ranks {ranks}, {batch}x{seq}: error {e:.2e}",
                    spec.name
                );
            }
        }
    }
}

/// 100 calls of one mixer: `new` prepares once, `forward` generates,
/// compiles, reads, loads and plans nothing (CPU backend; the CUDA path is
/// counted through the host twin in mixc-runtime's unit tests).
#[test]
fn a_hundred_calls_prepare_once() {
    let spec = mixc::mixer! {
        mixer counted { heads = 2; head_dim = 16; mask = causal && window(24); }
    };
    let before = counters::snapshot();
    let m = Mixer::new(&spec, Options::on(Device::Cpu).with_tiles(Tiles::Default)).unwrap();
    let built = counters::snapshot() - before;
    assert_eq!(built.cpu_plans, 1, "{built:?}");
    let inputs: Vec<MixerInputs> = (0..4)
        .map(|i| mixc::random_inputs(&spec, 1 + i % 2, 16 + 9 * i, i as u64))
        .collect();
    let start = counters::snapshot();
    for i in 0..100 {
        m.forward(&inputs[i % inputs.len()]).unwrap();
    }
    let calls = counters::snapshot() - start;
    assert_eq!(calls, counters::Counters::default(), "{calls:?}");

    // With tuned-or-default tiles, a bucket without a cache entry reuses the
    // base preparation: no plan per call either.
    let m = Mixer::new(&spec, Options::on(Device::Cpu)).unwrap();
    let start = counters::snapshot();
    for i in 0..100 {
        m.forward(&inputs[0])
            .unwrap_or_else(|e| panic!("call {i}: {e}"));
    }
    let calls = counters::snapshot() - start;
    assert!(calls.cpu_plans <= 1, "{calls:?}");
    assert_eq!(calls.generations + calls.compilations, 0, "{calls:?}");
}

/// Parsed text, the macro and a file give one spec; explicit tiles are used.
#[test]
fn specs_from_text_macro_and_file_agree() {
    let text = "mixer causal_gqa { heads = 4; kv_heads = 2; head_dim = 32; mask = causal; }";
    let from_text = mixc::parse(text).unwrap();
    let from_macro = mixc::mixer! {
        mixer causal_gqa { heads = 4; kv_heads = 2; head_dim = 32; mask = causal; }
    };
    assert_eq!(from_text, from_macro);
    let tiles = mixc::CpuTiles {
        block_m: 16,
        block_n: 32,
        chunk: 16,
        threads: 2,
    };
    let m = Mixer::new(
        &from_macro,
        Options::on(Device::Cpu).with_tiles(Tiles::Cpu(tiles)),
    )
    .unwrap();
    let x = mixc::random_inputs(&from_macro, 1, 50, 1);
    let out = m.forward(&x).unwrap();
    assert_eq!(out.config_source, mixc::ConfigSource::Explicit);
    assert!(out.config.contains("block 16x32"), "{}", out.config);
    assert!(max_rel_error(&m, &x, &out.o) < tol(&m));

    // Straight from text; bad text is a `Spec` error with the diagnostic.
    let m = Mixer::from_str(text, Options::on(Device::Cpu)).unwrap();
    assert_eq!(m.spec(), &from_macro);
    match Mixer::from_str(
        "mixer bad { heads = 2; head_dim = 8; mask = causl; }",
        Options::default(),
    ) {
        Err(Error::Spec(d)) => assert!(d.contains("causal") && d.contains("1:"), "{d}"),
        other => panic!("{other:?}"),
    }
}

/// User-built tensors through `MixerInputs::new`.
#[test]
fn inputs_from_user_tensors() {
    let spec = mixc::parse("mixer m { heads = 2; head_dim = 8; mask = all; }").unwrap();
    let r = mixc::random_inputs(&spec, 1, 20, 3);
    let x = MixerInputs::new(r.q.clone(), r.k.clone(), r.v.clone());
    assert_eq!((x.batch, x.seq), (1, 20));
    let m = Mixer::new(&spec, Options::on(Device::Reference)).unwrap();
    let a = m.forward(&x).unwrap();
    let b = m.forward(&r).unwrap();
    assert_eq!(a.o, b.o);
    // A wrong shape is a typed error naming the tensor.
    let bad = MixerInputs::new(
        r.q.clone(),
        r.k.clone(),
        mixc::Tensor::zeros(&[1, 20, 2, 7]),
    );
    match m.forward(&bad) {
        Err(Error::BadInput { name, .. }) => assert_eq!(name, "v"),
        other => panic!("{other:?}"),
    }
}

/// What a mixer refuses, as variants a caller can match, in the user's terms.
#[test]
fn refusals_are_typed() {
    let spec = mixc::parse("mixer m { heads = 2; head_dim = 8; mask = causal; }").unwrap();
    // Several processes on the CPU backend: an error, never ignored.
    let world = mixc::runtime::cuda::dist::DistEnv {
        rank: 0,
        world_size: 2,
        local_rank: 0,
        master_addr: "127.0.0.1".into(),
        master_port: 29500,
    };
    let opts = Options {
        world: Some(world),
        ..Options::on(Device::Cpu)
    };
    match Mixer::new(&spec, opts) {
        Err(e @ Error::Unsupported { .. }) => {
            let msg = e.to_string();
            assert!(msg.contains("2 processes"), "{msg}");
            assert!(!msg.contains("--"), "no CLI flags in library errors: {msg}");
        }
        other => panic!("{other:?}"),
    }
    // CUDA tiles for the CPU backend.
    let k = mixc::codegen::KernelConfig::default_for(
        &spec,
        &mixc::codegen::Target::new(mixc::codegen::Arch::Sm90, spec.dtype),
    );
    assert!(Mixer::new(&spec, Options::on(Device::Cpu).with_tiles(Tiles::Cuda(k))).is_err());
    // No GPU here: `Device::Cuda` says so; `Auto` falls back and says why.
    if mixc::runtime::cuda::probe().is_err() {
        match Mixer::new(&spec, Options::on(Device::Cuda(0))) {
            Err(e @ Error::NoGpu { .. }) => assert!(e.is_gpu_specific()),
            other => panic!("{other:?}"),
        }
        let m = Mixer::new(&spec, Options::default()).unwrap();
        assert_eq!(m.backend(), BackendKind::Cpu);
        assert!(
            m.auto_note()
                .unwrap()
                .starts_with("using the CPU backend ("),
            "{:?}",
            m.auto_note()
        );
    }
    // Fewer positions than ranks.
    let m = Mixer::new(&spec, Options::on(Device::Cpu).with_ranks(4)).unwrap();
    let e = m
        .forward(&mixc::random_inputs(&spec, 1, 3, 0))
        .unwrap_err()
        .to_string();
    assert!(e.contains("4 ranks") && !e.contains("--"), "{e}");
}

/// A mixer is shared by threads calling it at once.
#[test]
fn concurrent_calls_share_one_mixer() {
    let spec = mixc::parse("mixer m { heads = 2; head_dim = 16; mask = causal; }").unwrap();
    let m = Mixer::new(&spec, Options::on(Device::Cpu).with_threads(1)).unwrap();
    std::thread::scope(|s| {
        for t in 0..4 {
            let m = &m;
            let spec = &spec;
            s.spawn(move || {
                let x = mixc::random_inputs(spec, 1, 40 + t, t as u64);
                let out = m.forward(&x).unwrap();
                assert!(max_rel_error(m, &x, &out.o) < tol(m));
            });
        }
    });
}

/// Specs `check` accepts that some backend refuses (the CUDA code generator
/// lowers bias, transform and masks other than causal only for softmax).
const PARTLY_SUPPORTED: [&str; 4] = [
    "mixer lin_bias { heads = 2; head_dim = 16; score = dot(elu1(q), elu1(k)); \
     bias = -0.1 * (i - j); mask = causal; norm = sum(eps = 1e-6); }",
    "mixer ret_window { heads = 2; head_dim = 16; decay = 1.0 - pow(2.0, -5.0 - h); \
     mask = causal && window(8); norm = none; }",
    "mixer gated_doc { heads = 2; head_dim = 16; input g: f32[batch, seq, heads]; \
     input doc: i32[batch, seq]; decay = gate(g); mask = causal && segment(doc); norm = none; }",
    "mixer conv_window { heads = 2; head_dim = 16; input f: f32[heads, seq]; \
     score = filter(f); mask = causal && window(5); norm = none; }",
];

/// The backend matrix of every example and of specs only some backends run:
/// the reference and the CPU run everything `check` accepts (checked against
/// the reference); where CUDA is claimed, NVRTC compiles the kernels (and a
/// `Mixer` runs them when there is a GPU); where it is refused, the reason
/// is in spec terms (no Rust `Debug` text) and `Mixer::new` gives the same.
#[test]
fn every_accepted_spec_runs_where_check_says_or_says_why_not() {
    let mut specs: Vec<mixc::MixerSpec> = examples()
        .iter()
        .map(|p| mixc::parse_file(p).unwrap())
        .collect();
    specs.extend(PARTLY_SUPPORTED.iter().map(|t| mixc::parse(t).unwrap()));
    let gpu = mixc::runtime::cuda::probe().is_ok();
    let (mut compiled, mut refused) = (0, 0);
    for mut spec in specs {
        small(&mut spec);
        let matrix = mixc::capabilities::matrix(&spec);
        let targets: Vec<&str> = matrix.iter().map(|s| s.target.as_str()).collect();
        assert_eq!(
            targets,
            ["reference", "cpu", "cuda sm_80", "cuda sm_90"],
            "{}",
            spec.name
        );
        for s in &matrix {
            match (&s.unsupported, s.target.as_str()) {
                (None, "reference" | "cpu") => {
                    let device = if s.target == "cpu" {
                        Device::Cpu
                    } else {
                        Device::Reference
                    };
                    let m = Mixer::new(&spec, Options::on(device).with_ranks(2)).unwrap();
                    let x = mixc::random_inputs(&spec, 1, 45, 2);
                    let out = m.forward(&x).unwrap();
                    let e = max_rel_error(&m, &x, &out.o);
                    assert!(e < tol(&m), "{} on {}: {e:.2e}", spec.name, s.target);
                }
                (None, cuda) => {
                    let arch = if cuda.ends_with("sm_80") {
                        mixc::codegen::Arch::Sm80
                    } else {
                        mixc::codegen::Arch::Sm90
                    };
                    let target = mixc::codegen::Target::new(arch, spec.dtype);
                    mixc::runtime::cuda::kernels::CudaKernels::get(&spec, &target, None)
                        .unwrap_or_else(|e| panic!("{} on {cuda}: {e}", spec.name));
                    compiled += 1;
                }
                (Some(why), target) => {
                    assert!(target.starts_with("cuda"), "{}: {target}: {why}", spec.name);
                    for debug_text in ["{", "}", "Some(", "Causal", "Window", "input:"] {
                        assert!(
                            !why.contains(debug_text),
                            "{} on {target}: `{debug_text}` in {why}",
                            spec.name
                        );
                    }
                    refused += 1;
                }
            }
        }
        let cuda_ok = matrix[3].unsupported.is_none();
        if gpu {
            let m = Mixer::new(&spec, Options::on(Device::Cuda(0)));
            match (cuda_ok, m) {
                (true, Ok(m)) => {
                    let x = mixc::random_inputs(&spec, 1, 45, 2);
                    let out = m.forward(&x).unwrap();
                    let e = max_rel_error(&m, &x, &out.o);
                    let tol = mixc::runtime::reference::check_tolerance(m.compute_dtype());
                    assert!(e <= tol, "{} on the GPU: {e:.2e}", spec.name);
                }
                (false, Err(Error::Unsupported { backend, what })) => {
                    assert_eq!(backend, "cuda");
                    assert_eq!(Some(what), matrix[3].unsupported.clone());
                }
                (ok, m) => panic!("{}: matrix says {ok}, Mixer::new says {m:?}", spec.name),
            }
        }
    }
    // Both arches of every example, and the four partly supported specs refused on both.
    assert!(compiled >= 28, "{compiled}");
    assert_eq!(refused, 8);
}

/// Training through the facade: one mixer, several lengths, gradients of
/// every example on the CPU backend equal the reference backend's (f64
/// gradients rounded) within the gradient tolerance; the residuals of one
/// shape are refused for another; a training step is admitted on more
/// memory than inference.
#[test]
fn training_steps_match_the_reference_backend() {
    for path in examples() {
        let mut spec = mixc::parse_file(&path).unwrap();
        small(&mut spec);
        let cpu = Mixer::new(&spec, Options::on(Device::Cpu).with_ranks(2)).unwrap();
        let reference = Mixer::new(&spec, Options::on(Device::Reference)).unwrap();
        for seq in [5, 70] {
            let x = mixc::random_inputs(&spec, 2, seq, 3);
            let d_o = mixc::random_upstream(&spec, 2, seq, 4);
            let (out, saved) = cpu.forward_train(&x).unwrap();
            let got = cpu.backward(&x, &out.o, &saved, &d_o).unwrap().grads;
            let (rout, rsaved) = reference.forward_train(&x).unwrap();
            let want = reference
                .backward(&x, &rout.o, &rsaved, &d_o)
                .unwrap()
                .grads;
            let report = cpu
                .check_gradients(&x, &d_o, &got, &cpu.grad_check_plan(true), &|_, _| {})
                .unwrap();
            assert!(report.passed(), "{}: {:?}", spec.name, report.errors);
            let names: Vec<String> = got.named().into_iter().map(|(n, _)| n).collect();
            let want_names: Vec<String> = want.named().into_iter().map(|(n, _)| n).collect();
            assert_eq!(names, want_names, "{}", spec.name);
            if seq == 70 {
                // Residuals of seq 70 do not serve seq 5.
                let short = mixc::random_inputs(&spec, 2, 5, 3);
                let err = cpu
                    .backward(
                        &short,
                        &out.o,
                        &saved,
                        &mixc::random_upstream(&spec, 2, 5, 4),
                    )
                    .unwrap_err();
                assert!(matches!(err, Error::BadInput { .. }), "{err}");
            }
        }
        let (i, fwd) = cpu.host_bytes(2, 4096).unwrap();
        let (i2, train) = cpu.train_host_bytes(2, 4096).unwrap();
        assert_eq!(i, i2);
        assert!(train > fwd + i, "{}: {train} vs {fwd}", spec.name);
    }
}
