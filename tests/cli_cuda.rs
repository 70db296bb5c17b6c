//! `mixc run` with the CUDA backend: without a GPU `--backend cuda` fails
//! with the probe's message and `auto` says it falls back to the CPU; with a
//! GPU both run and pass `--check`.

use std::process::{Command, Output};

fn mixc(args: &[&str], envs: &[(&str, &str)]) -> Output {
    let mut c = Command::new(env!("CARGO_BIN_EXE_mixc"));
    c.args(args)
        .current_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/.."));
    for (k, v) in envs {
        c.env(k, v);
    }
    c.output().expect("mixc runs")
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn has_gpu() -> bool {
    mixc::runtime::cuda::probe().is_ok()
}

#[test]
fn backend_cuda_without_gpu_fails_clearly() {
    let o = mixc(
        &[
            "run",
            "examples/causal_gqa_llama3.mix",
            "--seq",
            "64",
            "--backend",
            "cuda",
            "--check",
        ],
        &[],
    );
    if has_gpu() {
        assert!(o.status.success(), "{}", stderr(&o));
        let out = String::from_utf8_lossy(&o.stdout);
        assert!(
            out.contains("on cuda") && out.contains("check: max relative error"),
            "{out}"
        );
        return;
    }
    let e = stderr(&o);
    assert_eq!(o.status.code(), Some(1), "{e}");
    assert!(
        e.contains("CUDA backend unavailable") && e.contains("GPU"),
        "{e}"
    );
    assert!(e.contains("--backend cpu"), "{e}");
    assert!(!e.contains("panicked"), "{e}");
}

#[test]
fn auto_says_which_backend_it_picked() {
    let o = mixc(
        &[
            "run",
            "examples/long_conv_hyena.mix",
            "--seq",
            "40",
            "--ranks",
            "2",
            "--check",
        ],
        &[],
    );
    let e = stderr(&o);
    assert!(o.status.success(), "{e}");
    if has_gpu() {
        assert!(e.contains("backend auto: using CUDA on"), "{e}");
    } else {
        assert!(e.contains("backend auto: using the CPU backend ("), "{e}");
        assert!(String::from_utf8_lossy(&o.stdout).contains("on cpu"));
    }
}

/// A torchrun-style launch with several processes is refused with a clear
/// error rather than running WORLD_SIZE independent copies.
#[test]
fn multi_process_launch_is_refused_clearly() {
    if !has_gpu() {
        eprintln!("SKIPPED: no GPU: the multi-process check runs after the GPU probe");
        return;
    }
    let o = mixc(
        &[
            "run",
            "examples/full_attention.mix",
            "--seq",
            "16",
            "--backend",
            "cuda",
        ],
        &[
            ("WORLD_SIZE", "2"),
            ("RANK", "1"),
            ("MASTER_ADDR", "127.0.0.1"),
            ("MASTER_PORT", "29511"),
        ],
    );
    let e = stderr(&o);
    assert!(!o.status.success());
    assert!(e.contains("NCCL") && e.contains("ranks"), "{e}");
}
