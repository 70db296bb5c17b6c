//! End-to-end tests of the `mixc` binary: exit codes, diagnostics, files.

use std::path::PathBuf;
use std::process::Command;

mod common;
use common::{examples, mixc, text};

fn scratch(name: &str) -> PathBuf {
    common::scratch("cli", name)
}

#[test]
fn check_accepts_every_example() {
    let files = examples();
    assert!(
        files.len() >= 12,
        "expected at least 12 examples, found {}",
        files.len()
    );
    let mut args = vec!["check"];
    let names: Vec<String> = files.iter().map(|p| p.display().to_string()).collect();
    args.extend(names.iter().map(String::as_str));
    let out = mixc(&args);
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).lines().count(),
        files.len()
    );
}

#[test]
fn check_rejects_an_invalid_spec_with_a_located_diagnostic() {
    let bad = scratch("bad.mix");
    std::fs::write(
        &bad,
        "mixer bad {\n    heads = 8;\n    head_dim = 64;\n    mask = causl;\n}\n",
    )
    .unwrap();
    let out = mixc(&["check", bad.to_str().unwrap()]);
    assert!(!out.status.success());
    let t = text(&out);
    assert!(
        t.contains("bad.mix:4:12"),
        "diagnostic lacks file:line:col: {t}"
    );
    assert!(t.contains('^'), "diagnostic lacks a caret: {t}");
}

#[test]
fn check_warns_about_a_batch_table_read_without_b_and_still_succeeds() {
    let w = scratch("warn.mix");
    std::fs::write(
        &w,
        "mixer w {\n    heads = 4;\n    head_dim = 8;\n    input t: f32[batch, heads];\n    bias = t[0][h];\n}\n",
    )
    .unwrap();
    let out = mixc(&["check", w.to_str().unwrap()]);
    assert!(out.status.success(), "{}", text(&out));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("warn.mix:5:14: warning:") && err.contains("`b`"),
        "{err}"
    );
    let out = mixc(&["check", "--json", w.to_str().unwrap()]);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(v["warnings"].as_str().unwrap().contains("warning:"), "{v}");
}

#[test]
fn check_reports_a_missing_file() {
    let out = mixc(&["check", "examples/does_not_exist.mix"]);
    assert!(!out.status.success());
    assert!(text(&out).contains("does_not_exist.mix"));
}

#[test]
fn run_saves_an_output_with_the_documented_layout() {
    let out_file = scratch("retention.safetensors");
    let _ = std::fs::remove_file(&out_file);
    let out = mixc(&[
        "run",
        "examples/retention_retnet.mix",
        "--backend",
        "reference",
        "--seq",
        "40",
        "--batch",
        "2",
        "--save",
        out_file.to_str().unwrap(),
        "--json",
    ]);
    assert!(out.status.success(), "{}", text(&out));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    // retention_retnet: heads 8, value_dim 128.
    assert_eq!(v["output_shape"], serde_json::json!([2, 40, 8, 128]));
    let bytes = std::fs::read(&out_file).unwrap();
    let header_len = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header: serde_json::Value = serde_json::from_slice(&bytes[8..8 + header_len]).unwrap();
    assert_eq!(header["o"]["shape"], serde_json::json!([2, 40, 8, 128]));
    // q, k, v and o are saved in the run's storage type.
    let stored = v["dtype"].as_str().unwrap().to_uppercase();
    assert_eq!(header["o"]["dtype"], stored);
    assert_eq!(header["q"]["dtype"], stored);
    assert_eq!(header["q"]["shape"], serde_json::json!([2, 40, 8, 64]));

    // The saved file feeds back in, and the CPU backend agrees with the reference on it.
    let again = mixc(&[
        "run",
        "examples/retention_retnet.mix",
        "--backend",
        "cpu",
        "--inputs",
        out_file.to_str().unwrap(),
        "--ranks",
        "3",
        "--check",
    ]);
    assert!(again.status.success(), "{}", text(&again));
    assert!(text(&again).contains("max relative error"));
}

#[test]
fn run_rejects_a_wrong_shaped_inputs_file_naming_the_tensor() {
    let f = scratch("gqa.safetensors");
    let out = mixc(&[
        "run",
        "examples/full_attention.mix",
        "--backend",
        "reference",
        "--seq",
        "8",
        "--save",
        f.to_str().unwrap(),
    ]);
    assert!(out.status.success(), "{}", text(&out));
    // full_attention has 16 heads; causal_gqa_llama3 wants k with 8 kv heads of width 128.
    let bad = mixc(&[
        "run",
        "examples/causal_gqa_llama3.mix",
        "--inputs",
        f.to_str().unwrap(),
    ]);
    assert!(!bad.status.success());
    let t = text(&bad);
    assert!(
        t.contains("`q`") || t.contains("`k`"),
        "error does not name the tensor: {t}"
    );
    assert!(
        t.contains("head_dim") || t.contains("128"),
        "error lacks the expected shape: {t}"
    );
}

#[test]
fn run_rejects_more_ranks_than_positions() {
    let out = mixc(&[
        "run",
        "examples/causal_gqa_llama3.mix",
        "--backend",
        "cpu",
        "--seq",
        "3",
        "--ranks",
        "5",
    ]);
    assert!(!out.status.success());
    assert!(text(&out).contains("ranks"));
}

fn run_json(args: &[&str]) -> serde_json::Value {
    let out = mixc(args);
    assert!(out.status.success(), "{}", text(&out));
    serde_json::from_slice(&out.stdout).unwrap()
}

/// A checked run's error is within the tolerance it reports, which is the
/// one of the arithmetic it reports (bf16 products for bf16 specs on CPUs
/// with AVX-512 BF16, else f32).
fn within_tolerance(v: &serde_json::Value) -> bool {
    let compute = mixc::DType::parse(v["compute_dtype"].as_str().unwrap()).expect("a dtype");
    let tol = v["tolerance"].as_f64().unwrap();
    assert_eq!(
        tol,
        mixc::runtime::reference::check_tolerance(compute),
        "{v}"
    );
    v["max_rel_error"].as_f64().unwrap() < tol
}

#[test]
fn run_set_overrides_shapes_and_keeps_the_check_passing() {
    let v = run_json(&[
        "run",
        "examples/sliding_window_mistral.mix",
        "--backend",
        "cpu",
        "--seq",
        "100",
        "--set",
        "heads=4",
        "--set",
        "kv_heads=2",
        "--set",
        "head_dim=32",
        "--check",
        "--json",
    ]);
    // d_v follows d_k when the spec does not set it.
    assert_eq!(v["output_shape"], serde_json::json!([1, 100, 4, 32]));
    assert_eq!(v["kv_heads"], 2);
    assert!(within_tolerance(&v), "{v}");
}

#[test]
fn run_varlen_packs_sequences_and_checks_each_alone() {
    for example in ["document_mask", "gated_mamba2", "long_conv_hyena"] {
        let v = run_json(&[
            "run",
            &format!("examples/{example}.mix"),
            "--backend",
            "cpu",
            "--varlen",
            "100,1,0,257",
            "--set",
            "heads=4",
            "--check",
            "--json",
        ]);
        assert_eq!(v["tokens"], 358, "{v}");
        assert_eq!(v["output_shape"][1], 358, "{v}");
        assert!(within_tolerance(&v), "{v}");
    }
    let out = mixc(&[
        "run",
        "examples/causal_gqa_llama3.mix",
        "--varlen",
        "5,6",
        "--grad",
    ]);
    assert!(!out.status.success());
    assert!(text(&out).contains("--grad"), "{}", text(&out));
    let out = mixc(&[
        "run",
        "examples/causal_gqa_llama3.mix",
        "--backend",
        "cpu",
        "--varlen",
        "0,0",
    ]);
    assert_eq!(out.status.code(), Some(1));
    assert!(text(&out).contains("no token"), "{}", text(&out));
}

#[test]
fn run_paged_reads_a_shuffled_page_table_and_checks() {
    for page in ["16", "64"] {
        let v = run_json(&[
            "run",
            "examples/sliding_window_mistral.mix",
            "--backend",
            "cpu",
            "--seq",
            "4",
            "--kv-seq",
            "300",
            "--batch",
            "3",
            "--set",
            "heads=4",
            "--set",
            "kv_heads=2",
            "--paged",
            page,
            "--check",
            "--json",
        ]);
        assert_eq!(v["output_shape"], serde_json::json!([3, 4, 4, 128]), "{v}");
        assert!(within_tolerance(&v), "{v}");
    }
    for (args, says) in [
        (
            vec!["examples/document_mask.mix", "--paged", "16"],
            "indexed by position",
        ),
        (
            vec!["examples/causal_gqa_llama3.mix", "--paged", "0"],
            "--paged",
        ),
    ] {
        let mut a = vec!["run", "--backend", "cpu", "--seq", "4", "--kv-seq", "40"];
        a.extend(args);
        let out = mixc(&a);
        assert_eq!(out.status.code(), Some(1), "{}", text(&out));
        assert!(text(&out).contains(says), "{}", text(&out));
    }
}

/// A decode step (`--seq 4 --kv-seq 700`: the queries are the newest four
/// positions), a chunk at an explicit offset, and cross-attention with
/// more queries than keys, each checked against the reference.
#[test]
fn run_decode_and_cross_attention_shapes_check_against_the_reference() {
    for (spec, lengths, offset) in [
        ("examples/sliding_window_mistral.mix", ["4", "700"], 696),
        ("examples/alibi_bloom.mix", ["16", "300"], 100),
        ("examples/full_attention.mix", ["90", "40"], 0),
    ] {
        let mut args = vec![
            "run",
            spec,
            "--backend",
            "cpu",
            "--seq",
            lengths[0],
            "--kv-seq",
            lengths[1],
            "--set",
            "heads=4",
            "--set",
            "kv_heads=2",
            "--set",
            "head_dim=32",
            "--check",
            "full",
            "--json",
        ];
        let off = offset.to_string();
        if spec.contains("alibi") {
            args.extend(["--q-offset", off.as_str()]);
        }
        let v = run_json(&args);
        let seq: usize = lengths[0].parse().unwrap();
        assert_eq!(
            v["output_shape"],
            serde_json::json!([1, seq, 4, 32]),
            "{spec}"
        );
        assert_eq!(v["kv_seq"], lengths[1].parse::<usize>().unwrap());
        assert_eq!(v["q_offset"], offset);
        assert!(within_tolerance(&v), "{spec}: {v}");
    }
    // Queries past the keys of a positional input are refused, naming it.
    let out = mixc(&[
        "run",
        "examples/document_mask.mix",
        "--backend",
        "cpu",
        "--seq",
        "8",
        "--kv-seq",
        "20",
        "--q-offset",
        "15",
    ]);
    assert!(!out.status.success());
    assert!(
        text(&out).contains("`doc`") && text(&out).contains("15..23"),
        "{}",
        text(&out)
    );
}

#[test]
fn run_set_rejects_bad_overrides() {
    for (set, needle) in [
        ("heads=6", "must divide"),
        ("heads=0", "between 1 and 65536"),
        ("heads=99999999999", "between 1 and 65536"),
        ("heads=-2", "a non-negative integer"),
        ("depth=3", "unknown key `depth`"),
        ("heads", "KEY=VALUE"),
        ("head_dim=4096", "between 1 and 512"),
    ] {
        let out = mixc(&[
            "run",
            "examples/causal_gqa_llama3.mix",
            "--backend",
            "cpu",
            "--seq",
            "8",
            "--set",
            set,
        ]);
        assert!(!out.status.success(), "--set {set} was accepted");
        assert!(text(&out).contains(needle), "--set {set}: {}", text(&out));
    }
}

#[test]
fn run_dtype_rounds_the_inputs_that_every_backend_sees() {
    // `env`: MIXC_CPU_BF16's value, when set.
    let run_env = |dtype: &str, env: Option<&str>| {
        let args = [
            "run",
            "examples/full_attention.mix",
            "--backend",
            "cpu",
            "--seq",
            "33",
            "--set",
            "heads=2",
            "--dtype",
            dtype,
            "--check",
            "--json",
        ];
        let envs: Vec<(&str, &std::path::Path)> = env
            .map(|v| ("MIXC_CPU_BF16", std::path::Path::new(v)))
            .into_iter()
            .collect();
        common::mixc_env(&args, &envs)
    };
    let run = |dtype: &str| {
        let out = run_env(dtype, None);
        assert!(out.status.success(), "{}", text(&out));
        serde_json::from_slice::<serde_json::Value>(&out.stdout).unwrap()
    };
    let (bf16, f32) = (run("bf16"), run("f32"));
    assert_eq!(bf16["dtype"], "bf16");
    assert_eq!(f32["dtype"], "f32");
    assert_eq!(f32["compute_dtype"], "f32");
    // bf16 products where the CPU has them, judged at the bf16 tolerance.
    let products = mixc::runtime::cpu::bf16::enabled();
    assert_eq!(bf16["compute_dtype"], if products { "bf16" } else { "f32" });
    assert!(
        within_tolerance(&bf16) && within_tolerance(&f32),
        "{bf16} {f32}"
    );
    // MIXC_CPU_BF16=0 forces the f32 products: the reference sees the
    // rounded inputs too, so the only error left is the output's rounding to
    // bf16 (half a bf16 ulp: at most 2^-8 relative), judged at the bf16
    // tolerance.
    let out = run_env("bf16", Some("0"));
    assert!(out.status.success(), "{}", text(&out));
    let forced: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(forced["compute_dtype"], "f32", "{forced}");
    assert_eq!(forced["tolerance"].as_f64().unwrap(), 1e-2);
    assert!(
        forced["max_rel_error"].as_f64().unwrap() <= 2f64.powi(-8),
        "{forced}"
    );
    // The bf16 run holds q, k, v and o in half the bytes.
    assert_eq!(
        2 * bf16["output_bytes"].as_u64().unwrap(),
        f32["output_bytes"].as_u64().unwrap()
    );
    assert!(bf16["input_bytes"].as_u64().unwrap() < f32["input_bytes"].as_u64().unwrap());
}

/// `check --json` lists, per spec, which backends and CUDA architectures run
/// it; a spec only the CPU and the reference run says why CUDA does not, in
/// spec terms, and stays a valid spec (exit 0).
#[test]
fn check_lists_backend_support() {
    let partial = scratch("lin_bias.mix");
    std::fs::write(
        &partial,
        "mixer lin_bias { heads = 2; head_dim = 16; score = dot(elu1(q), elu1(k)); \
         bias = -0.1 * (i - j); mask = causal && window(8); norm = sum(eps = 1e-6); }\n",
    )
    .unwrap();
    let mut args = vec!["check".to_string(), "--json".to_string()];
    args.extend(examples().iter().map(|p| p.display().to_string()));
    args.push(partial.display().to_string());
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = mixc(&args);
    assert!(out.status.success(), "{}", text(&out));
    let rows: Vec<serde_json::Value> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(rows.len(), examples().len() + 1);
    for row in &rows {
        let backends = row["backends"].as_array().unwrap();
        let targets: Vec<&str> = backends
            .iter()
            .map(|b| b["target"].as_str().unwrap())
            .collect();
        assert_eq!(targets, ["reference", "cpu", "cuda sm_80", "cuda sm_90"]);
        let name = row["name"].as_str().unwrap();
        for b in backends {
            // Gradients: wherever the forward runs (lin_bias has no CUDA kernel).
            let on_cuda = b["target"].as_str().unwrap().starts_with("cuda");
            let want = !on_cuda || name != "lin_bias";
            assert_eq!(b["backward"].as_bool().unwrap(), want, "{name}: {b}");
            let supported = b["supported"].as_bool().unwrap();
            if name == "lin_bias" && b["target"].as_str().unwrap().starts_with("cuda") {
                assert!(!supported);
                let why = b["reason"].as_str().unwrap();
                assert!(why.contains("bias") && !why.contains('{'), "{why}");
            } else {
                assert!(supported, "{name}: {b}");
            }
        }
    }
    // The text form says the same in a line per refusal.
    let out = mixc(&["check", partial.to_str().unwrap()]);
    let t = text(&out);
    assert!(out.status.success(), "{t}");
    assert!(
        t.contains("runs on reference, cpu; gradients on reference, cpu\n"),
        "{t}"
    );
    assert!(t.contains("not on cuda sm_90: "), "{t}");
}

/// A torchrun-style environment with several processes is refused on the
/// CPU backend (never each process computing the whole problem).
#[test]
fn several_processes_on_the_cpu_backend_are_refused() {
    let out = Command::new(env!("CARGO_BIN_EXE_mixc"))
        .args([
            "run",
            "examples/full_attention.mix",
            "--seq",
            "16",
            "--backend",
            "cpu",
        ])
        .current_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/.."))
        .env("WORLD_SIZE", "2")
        .env("RANK", "0")
        .env("MASTER_ADDR", "127.0.0.1")
        .env("MASTER_PORT", "29512")
        .output()
        .unwrap();
    let t = text(&out);
    assert!(!out.status.success(), "{t}");
    assert!(t.contains("2 processes") && t.contains("cpu"), "{t}");
}

/// `--check` compares a documented sample on long runs and says so;
/// `--check full` compares everything.
#[test]
fn check_samples_long_runs_unless_asked_for_all() {
    let run = |mode: &[&str]| {
        let mut args = vec![
            "run",
            "examples/causal_gqa_llama3.mix",
            "--seq",
            "600",
            "--backend",
            "cpu",
            "--set",
            "heads=8",
            "--set",
            "kv_heads=2",
            "--set",
            "head_dim=16",
            "--ranks",
            "3",
            "--json",
        ];
        args.extend_from_slice(mode);
        let out = mixc(&args);
        assert!(out.status.success(), "{}", text(&out));
        let v: serde_json::Value =
            serde_json::from_str(String::from_utf8_lossy(&out.stdout).trim()).unwrap();
        v
    };
    let sample = run(&["--check"]);
    assert_eq!(sample["check_full"], false);
    let what = sample["checked"].as_str().unwrap();
    assert!(
        what.contains("256 of 600 positions") && what.contains("4 of 8 heads"),
        "{what}"
    );
    let full = run(&["--check", "full"]);
    assert_eq!(full["check_full"], true);
    assert_eq!(full["checked"], "all 600 positions x all 8 heads");
    assert!(within_tolerance(&full), "{full}");
}

/// Shapes whose sizes overflow a machine word, and runs that cannot fit in
/// memory, are refused up front with a clear message (exit 1, no panic, no
/// allocation attempted), on every command that makes inputs.
#[test]
fn oversized_runs_are_refused_before_allocating() {
    let max = u64::MAX.to_string();
    let started = std::time::Instant::now();
    for (args, want) in [
        (
            vec![
                "run",
                "examples/causal_gqa_llama3.mix",
                "--backend",
                "cpu",
                "--seq",
                &max,
            ],
            "overflows",
        ),
        (
            vec![
                "run",
                "examples/causal_gqa_llama3.mix",
                "--backend",
                "reference",
                "--seq",
                "16",
                "--batch",
                &max,
            ],
            "overflows",
        ),
        // 2^62 x batch 4 wraps to 0 in unchecked arithmetic.
        (
            vec![
                "run",
                "examples/causal_gqa_llama3.mix",
                "--backend",
                "cpu",
                "--seq",
                "4611686018427387904",
                "--batch",
                "4",
            ],
            "overflows",
        ),
        // 64 GiB of q alone.
        (
            vec![
                "run",
                "examples/causal_gqa_llama3.mix",
                "--backend",
                "cpu",
                "--seq",
                "4194304",
            ],
            "out of host memory",
        ),
        (
            vec![
                "bench",
                "examples/causal_gqa_llama3.mix",
                "--backend",
                "cpu",
                "--seq",
                "4194304",
            ],
            "out of host memory",
        ),
        (
            vec![
                "tune",
                "examples/causal_gqa_llama3.mix",
                "--seq",
                "1099511627776",
            ],
            "out of host memory",
        ),
    ] {
        let out = mixc(&args);
        let t = text(&out);
        assert_eq!(out.status.code(), Some(1), "{args:?}: {t}");
        assert!(t.contains(want), "{args:?}: {t}");
        assert!(!t.contains("panicked"), "{args:?}: {t}");
        if want == "out of host memory" {
            assert!(t.contains("needs") && t.contains("free"), "{t}");
        } else {
            assert!(t.contains("x seq ") && t.contains(" x heads "), "{t}");
        }
    }
    assert!(
        started.elapsed().as_secs() < 20,
        "refusals took {:?}",
        started.elapsed()
    );
}

/// A compile-cache entry whose CUBIN was overwritten or truncated is never
/// reported as a hit: it is rebuilt with a warning, and the rebuilt entry
/// is a hit again.
#[test]
fn corrupt_compile_cache_entries_are_rebuilt() {
    let dir = scratch("corrupt-cache");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let compile = || {
        let out = common::mixc_env(
            &[
                "compile",
                "examples/long_conv_hyena.mix",
                "--arch",
                "sm_90",
                "--json",
            ],
            &[("MIXC_CACHE_DIR", dir.as_path())],
        );
        let t = text(&out);
        assert!(out.status.success(), "{t}");
        let v: serde_json::Value =
            serde_json::from_str(String::from_utf8_lossy(&out.stdout).trim()).unwrap();
        (v, t)
    };
    let (first, _) = compile();
    assert_eq!(first["cache_hit"], false);
    let (second, _) = compile();
    assert_eq!(second["cache_hit"], true);
    let cubins: Vec<PathBuf> = std::fs::read_dir(dir.join("nvrtc"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "cubin"))
        .collect();
    assert_eq!(cubins.len(), 1, "{cubins:?}");
    let good = std::fs::read(&cubins[0]).unwrap();
    for bad in [vec![0x5a; good.len()], good[..good.len() / 2].to_vec()] {
        std::fs::write(&cubins[0], bad).unwrap();
        let (v, t) = compile();
        assert_eq!(v["cache_hit"], false, "{t}");
        assert!(t.contains("warning: corrupt compile cache entry"), "{t}");
        let (v, _) = compile();
        assert_eq!(v["cache_hit"], true);
        assert_eq!(std::fs::read(&cubins[0]).unwrap(), good);
    }
}

/// Spec paths are read only up to the documented limit: `/dev/zero` and an
/// oversized file are refused at once instead of filling memory.
#[test]
fn spec_reads_are_bounded() {
    let big = scratch("big.mix");
    std::fs::write(&big, vec![b' '; (1 << 20) + 1]).unwrap();
    for path in ["/dev/zero", big.to_str().unwrap()] {
        let out = mixc(&["check", path]);
        let t = text(&out);
        assert_eq!(out.status.code(), Some(1), "{t}");
        assert!(t.contains("larger than the 1024 KiB"), "{t}");
    }
}

/// Tensor files are read only as far as they can be held: `/dev/zero` as
/// `--inputs` is refused at once (its safetensors header says nothing), and
/// a saved file streamed through a pipe still loads.
#[test]
fn input_reads_are_bounded() {
    let started = std::time::Instant::now();
    let out = mixc(&[
        "run",
        "examples/linear_elu.mix",
        "--backend",
        "cpu",
        "--inputs",
        "/dev/zero",
    ]);
    let t = text(&out);
    assert_eq!(out.status.code(), Some(1), "{t}");
    assert!(t.contains("not a valid safetensors stream"), "{t}");
    assert!(
        started.elapsed().as_secs() < 10,
        "took {:?}",
        started.elapsed()
    );

    let saved = scratch("piped.safetensors");
    let out = mixc(&[
        "run",
        "examples/linear_elu.mix",
        "--backend",
        "cpu",
        "--seq",
        "9",
        "--save",
        saved.to_str().unwrap(),
    ]);
    assert!(out.status.success(), "{}", text(&out));
    // Through a real pipe (not a redirected file), so the stream path runs.
    let mut child = Command::new(env!("CARGO_BIN_EXE_mixc"))
        .args([
            "run",
            "examples/linear_elu.mix",
            "--backend",
            "cpu",
            "--inputs",
            "/dev/stdin",
            "--check",
        ])
        .current_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/.."))
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let bytes = std::fs::read(&saved).unwrap();
    let mut stdin = child.stdin.take().unwrap();
    let writer = std::thread::spawn(move || {
        use std::io::Write;
        let _ = stdin.write_all(&bytes);
    });
    let piped = child.wait_with_output().unwrap();
    writer.join().unwrap();
    assert!(piped.status.success(), "{}", text(&piped));
    assert!(
        text(&piped).contains("max relative error"),
        "{}",
        text(&piped)
    );
}

/// `--save` replaces only regular files (issue 19, defect 4): a FIFO at the
/// path is refused and stays a FIFO; a symlink is followed (the link stays,
/// its target gets the tensors); a replaced file keeps its mode.
#[cfg(unix)]
#[test]
fn save_replaces_only_regular_files() {
    use std::os::unix::fs::{FileTypeExt, PermissionsExt};
    let dir = common::scratch("cli_save_targets", "x")
        .parent()
        .unwrap()
        .to_path_buf();
    let run = |out: &std::path::Path| {
        mixc(&[
            "run",
            "examples/full_attention.mix",
            "--backend",
            "cpu",
            "--seq",
            "8",
            "--set",
            "heads=1",
            "--save",
            out.to_str().unwrap(),
        ])
    };
    // A FIFO (made in a temp folder, never under /dev).
    let fifo = dir.join("pipe");
    let _ = std::fs::remove_file(&fifo);
    assert!(Command::new("mkfifo")
        .arg(&fifo)
        .status()
        .unwrap()
        .success());
    let out = run(&fifo);
    assert!(!out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("not a regular file"), "{}", text(&out));
    assert!(std::fs::symlink_metadata(&fifo)
        .unwrap()
        .file_type()
        .is_fifo());
    // A device node (a character device like /dev/null, made with mknod in
    // the temp folder; that needs root, which CI has, so elsewhere it says so).
    let node = dir.join("null-device");
    let _ = std::fs::remove_file(&node);
    let made = Command::new("mknod")
        .arg(&node)
        .args(["c", "1", "3"])
        .output()
        .is_ok_and(|o| o.status.success());
    if made {
        let out = run(&node);
        assert!(!out.status.success(), "{}", text(&out));
        assert!(text(&out).contains("not a regular file"), "{}", text(&out));
        assert!(std::fs::symlink_metadata(&node)
            .unwrap()
            .file_type()
            .is_char_device());
        let _ = std::fs::remove_file(&node);
    } else {
        eprintln!("SKIPPED (device node part): mknod needs root here");
    }
    // A symlink to a file: the target is written, the link stays a link.
    let target = dir.join("target.safetensors");
    let link = dir.join("link.safetensors");
    let _ = std::fs::remove_file(&link);
    std::fs::write(&target, b"old").unwrap();
    std::fs::set_permissions(&target, std::fs::Permissions::from_mode(0o644)).unwrap();
    std::os::unix::fs::symlink(&target, &link).unwrap();
    let out = run(&link);
    assert!(out.status.success(), "{}", text(&out));
    assert!(std::fs::symlink_metadata(&link)
        .unwrap()
        .file_type()
        .is_symlink());
    let meta = std::fs::metadata(&target).unwrap();
    assert!(meta.len() > 100, "the target holds the tensors");
    assert_eq!(meta.permissions().mode() & 0o777, 0o644, "the mode is kept");
}

/// An interrupted `--save` (SIGINT or SIGTERM while the tensors are being
/// written) removes its temporary file and leaves the old target as it was
/// (issue 19, defect 4). The signal is sent as soon as the temporary file
/// appears; a run too quick to catch is retried with more rows.
#[cfg(unix)]
#[test]
fn an_interrupted_save_leaves_no_temporary_file() {
    let dir = common::scratch("cli_save_interrupted", "x")
        .parent()
        .unwrap()
        .to_path_buf();
    // What an earlier, failed run of this test left.
    for e in std::fs::read_dir(&dir).unwrap() {
        let _ = std::fs::remove_file(e.unwrap().path());
    }
    let target = dir.join("out.safetensors");
    let temps = || -> Vec<PathBuf> {
        std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p != &target)
            .collect()
    };
    for signal in ["INT", "TERM"] {
        let mut caught = false;
        for seq in [32768usize, 131072, 524288] {
            std::fs::write(&target, b"old").unwrap();
            assert!(temps().is_empty(), "{:?}", temps());
            // A linear mixer is quick to run; four tensors of seq x 8 x 64 f32.
            let mut child = Command::new(env!("CARGO_BIN_EXE_mixc"))
                .args(["run", "examples/linear_elu.mix", "--backend", "cpu"])
                .args(["--seq", &seq.to_string(), "--set", "heads=8"])
                .args(["--save", target.to_str().unwrap()])
                .current_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/.."))
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .unwrap();
            let started = std::time::Instant::now();
            let mut sent = false;
            while child.try_wait().unwrap().is_none() {
                if !temps().is_empty() {
                    let pid = child.id().to_string();
                    assert!(Command::new("kill")
                        .args([&format!("-{signal}"), &pid])
                        .status()
                        .unwrap()
                        .success());
                    sent = true;
                    break;
                }
                assert!(started.elapsed().as_secs() < 120, "the run never saved");
                std::thread::sleep(std::time::Duration::from_micros(200));
            }
            let out = child.wait_with_output().unwrap();
            if !sent || out.status.success() {
                continue; // finished before the signal landed: more rows
            }
            assert_eq!(out.status.code(), Some(130), "{}", text(&out));
            assert!(temps().is_empty(), "left behind: {:?}", temps());
            assert_eq!(std::fs::read(&target).unwrap(), b"old", "target untouched");
            caught = true;
            break;
        }
        assert!(caught, "no run was interrupted mid-save by SIG{signal}");
    }
}

/// A run whose `--check` fails never replaces the `--save` file (issue 19,
/// defect 5): the tensors go to `<name>.failed.<ext>`, and it says so.
/// Inputs near f32's limit overflow the f32 scores (the f64 reference does
/// not), so the output holds NaN, which the check reports as such.
#[test]
fn a_failed_check_keeps_the_saved_file() {
    let spec_path = common::scratch("cli_failed_check", "m.mix");
    std::fs::write(
        &spec_path,
        "mixer m { heads = 2; head_dim = 8; dtype = f32; mask = causal; }\n",
    )
    .unwrap();
    let spec = mixc::parse_file(&spec_path).unwrap();
    let mut x = mixc::random_inputs(&spec, 1, 16, 1);
    for v in x.q.data[..16].iter_mut().chain(x.k.data[..16].iter_mut()) {
        *v = 1e30;
    }
    let inputs = spec_path.with_file_name("huge_inputs.safetensors");
    mixc::runtime::io::save_tensors(&inputs, Some(&x), &mixc::Tensor::zeros(&[1, 16, 2, 8]))
        .unwrap();
    let out_path = spec_path.with_file_name("out.safetensors");
    std::fs::write(&out_path, b"precious").unwrap();
    let out = mixc(&[
        "run",
        spec_path.to_str().unwrap(),
        "--backend",
        "cpu",
        "--inputs",
        inputs.to_str().unwrap(),
        "--check",
        "--save",
        out_path.to_str().unwrap(),
    ]);
    let t = text(&out);
    assert!(!out.status.success(), "{t}");
    assert!(t.contains("NaN or infinite value(s)"), "{t}");
    assert_eq!(std::fs::read(&out_path).unwrap(), b"precious", "{t}");
    let failed = spec_path.with_file_name("out.failed.safetensors");
    assert!(failed.exists(), "{t}");
    assert!(t.contains("out.failed.safetensors"), "{t}");
}

/// `--inputs` values are rounded to the storage type as random ones are,
/// and a value the type cannot hold is refused, naming the tensor and the
/// element (issue 19, "also found").
#[test]
fn given_inputs_are_rounded_to_the_dtype_and_unrepresentable_ones_refused() {
    let spec_path = scratch("f16_inputs.mix");
    std::fs::write(
        &spec_path,
        "mixer m { heads = 2; head_dim = 8; dtype = f16; mask = causal; }\n",
    )
    .unwrap();
    let spec = mixc::parse_file(&spec_path).unwrap();
    let mut x = mixc::random_inputs(&spec, 1, 16, 1);
    // 1 + 2^-13 is not an f16: it rounds to 1.
    x.q.data[3] = 1.0 + 1.0 / 8192.0;
    let given = spec_path.with_file_name("f16_given.safetensors");
    let o = mixc::Tensor::zeros(&[1, 16, 2, 8]);
    mixc::runtime::io::save_tensors(&given, Some(&x), &o).unwrap();
    let saved = spec_path.with_file_name("f16_saved.safetensors");
    let file = |p: &std::path::Path| p.to_str().unwrap().to_string();
    let run = |inputs: &str| {
        mixc(&[
            "run",
            &file(&spec_path),
            "--backend",
            "cpu",
            "--inputs",
            inputs,
            "--check",
            "--save",
            &file(&saved),
        ])
    };
    let out = run(&file(&given));
    assert!(out.status.success(), "{}", text(&out));
    let back = mixc::runtime::io::load_inputs(&saved, &spec).unwrap();
    assert_eq!(back.q.data[3], 1.0, "q was not rounded to f16");

    x.q.data[2 * 8 + 5] = 70000.0; // position 1, head 0, dim 5
    mixc::runtime::io::save_tensors(&given, Some(&x), &o).unwrap();
    let out = run(&file(&given));
    let t = text(&out);
    assert!(!out.status.success(), "{t}");
    assert!(
        t.contains("`q`") && t.contains("[0, 1, 0, 5]") && t.contains("70000"),
        "{t}"
    );
    assert!(
        t.contains("65504"),
        "the message gives f16's largest value: {t}"
    );
}

/// A `norm = sum` mixer without a positive feature map passes `--check` on
/// its default random inputs (issue 19, "also found"): the side with the
/// identity map is drawn non-negative, so no denominator crosses zero.
#[test]
fn a_sum_normalised_spec_passes_its_check_on_default_inputs() {
    let spec_path = scratch("sum_identity.mix");
    std::fs::write(
        &spec_path,
        "mixer s { heads = 4; head_dim = 32; dtype = f32; score = dot(q, k); \
         mask = causal; norm = sum(eps = 1e-6); }\n",
    )
    .unwrap();
    for backend in ["cpu", "reference"] {
        for seq in ["64", "300"] {
            let v = run_json(&[
                "run",
                spec_path.to_str().unwrap(),
                "--backend",
                backend,
                "--seq",
                seq,
                "--check",
                "--json",
            ]);
            assert!(within_tolerance(&v), "{backend} at {seq}: {v}");
        }
    }
}

/// `run --json` counts throughput as `bench` does: useful (unmasked) pairs,
/// exactly L (L + 1) / 2 per head and batch row under a causal mask; the
/// computed tiles' pairs stay in `pairs_per_rank`.
#[test]
fn run_reports_useful_tflops_as_bench_does() {
    let v = run_json(&[
        "run",
        "examples/causal_gqa_llama3.mix",
        "--backend",
        "cpu",
        "--seq",
        "100",
        "--batch",
        "2",
        "--set",
        "heads=4",
        "--set",
        "kv_heads=2",
        "--json",
    ]);
    assert_eq!(
        v["useful_pairs"].as_u64(),
        Some(2 * 4 * 100 * 101 / 2),
        "{v}"
    );
    assert!(v["useful_tflops"].as_f64().unwrap() > 0.0, "{v}");
    assert!(v.get("tflops").is_none(), "one definition: {v}");
    let computed: u64 = v["pairs_per_rank"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p.as_u64().unwrap())
        .sum();
    assert!(computed >= 2 * 4 * 100 * 101 / 2, "{v}");
}

/// A 2 MB mixer name is refused by `gen` and `compile` within seconds
/// (issue 19, defect 8: a 1 MB name once took 22 s to compile): a 2 MB
/// file is past the spec-file size limit, and a name just under 1 MB is
/// refused at the name, with the limit, without echoing it whole.
#[test]
fn a_two_megabyte_identifier_is_refused_quickly_by_gen_and_compile() {
    for (chars, says) in [
        (2 << 20, "larger than the 1024 KiB a spec file may have"),
        (1_000_000, "more than the 128 allowed"),
    ] {
        let path = scratch(&format!("long_name_{chars}.mix"));
        std::fs::write(
            &path,
            format!(
                "mixer {} {{ heads = 2; head_dim = 8; }}\n",
                "n".repeat(chars)
            ),
        )
        .unwrap();
        for cmd in ["gen", "compile"] {
            let t0 = std::time::Instant::now();
            let out = mixc(&[cmd, path.to_str().unwrap()]);
            let t = text(&out);
            let head = &t[..t.len().min(400)];
            assert!(!out.status.success(), "{cmd}: {head}");
            assert!(
                t0.elapsed().as_secs_f64() < 10.0,
                "{cmd}: {:?}",
                t0.elapsed()
            );
            assert!(t.contains(says), "{cmd} {chars}: {head}");
            assert!(
                t.len() < 4096,
                "{cmd} {chars}: the message echoes the name: {head}"
            );
        }
    }
}

/// An OS error is said once (issue 19, defect 10): the library's I/O error
/// carries its cause, which the CLI does not print again.
#[test]
fn os_errors_are_said_once() {
    let out = mixc(&[
        "run",
        "examples/full_attention.mix",
        "--backend",
        "cpu",
        "--inputs",
        "/nonexistent/mixc-inputs.safetensors",
    ]);
    let t = text(&out);
    assert!(!out.status.success(), "{t}");
    assert_eq!(t.matches("No such file or directory").count(), 1, "{t}");
}

/// Both example blocks run blockwise on a ring of 3 ranks with ragged row
/// blocks, and their output and the gradients of x and every weight
/// match the f64 unfused block; the saved weights feed back in.
#[test]
fn run_block_checks_the_blockwise_block_against_the_unfused_one() {
    for (file, grads) in [
        ("examples/blocks/llama_block.mix", 10),
        ("examples/blocks/gpt_bpt.mix", 11),
    ] {
        let v = run_json(&[
            "run",
            file,
            "--seq",
            "45",
            "--batch",
            "2",
            "--ranks",
            "3",
            "--block-rows",
            "16",
            "--grad",
            "--check",
            "--json",
        ]);
        assert_eq!(v["backend"], "cpu", "{v}");
        assert!(v["max_rel_error"].as_f64().unwrap() < 2e-4, "{file}: {v}");
        let errors = v["grad_errors"].as_object().unwrap();
        assert_eq!(errors.len(), grads, "{file}: {v}");
        for (name, e) in errors {
            assert!(
                e.as_f64().unwrap() < 5e-4,
                "{file}: gradient of {name}: {v}"
            );
        }
    }
    let saved = scratch("block.safetensors");
    let _ = std::fs::remove_file(&saved);
    let file = "examples/blocks/llama_block.mix";
    let base = ["run", file, "--seq", "20", "--seed", "4", "--json"];
    let mut args = base.to_vec();
    args.extend(["--save", saved.to_str().unwrap()]);
    let first = run_json(&args);
    // The saved weights (seed 4's) under inputs of seed 5, checked.
    let mut args = vec![
        "run", file, "--seq", "20", "--seed", "5", "--json", "--check",
    ];
    args.extend(["--weights", saved.to_str().unwrap()]);
    let again = run_json(&args);
    assert!(again["max_rel_error"].as_f64().unwrap() < 2e-4, "{again}");
    let out = mixc(&[
        "run",
        file,
        "--seq",
        "20",
        "--weights",
        saved.to_str().unwrap(),
        "--weights-prefix",
        "model.layers.0.",
    ]);
    assert!(!out.status.success());
    let t = text(&out);
    assert!(
        t.contains("`model.layers.0.input_layernorm.weight`: missing from"),
        "{t}"
    );
    assert!(first["seconds"].as_f64().unwrap() > 0.0);
    // Mixer-only flags are refused on a block, block flags on a mixer.
    let out = mixc(&["run", file, "--seq", "8", "--set", "heads=4"]);
    assert!(!out.status.success());
    assert!(
        text(&out).contains("--set does not apply to a block file"),
        "{}",
        text(&out)
    );
    let out = mixc(&[
        "run",
        "examples/full_attention.mix",
        "--seq",
        "8",
        "--block-rows",
        "4",
    ]);
    assert!(!out.status.success());
    assert!(text(&out).contains("--block-rows applies to block files"));
}

/// Issue 19's defect 10: messages that say what is wrong, in the user's
/// terms, and a bounded amount of them.
#[test]
fn messages_say_the_right_thing() {
    // Inputs files that hold nothing to run are refused like --batch 0.
    let saved = scratch("zero_src.safetensors");
    let out = mixc(&[
        "run",
        "examples/causal_gqa_llama3.mix",
        "--backend",
        "cpu",
        "--seq",
        "5",
        "--set",
        "heads=2",
        "--set",
        "kv_heads=1",
        "--save",
        saved.to_str().unwrap(),
    ]);
    assert!(out.status.success(), "{}", text(&out));
    for (axis, name) in [(0usize, "batch0"), (1, "seq0")] {
        // The same header with one axis of q, k, v and o at 0, no data.
        let bytes = std::fs::read(&saved).unwrap();
        let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
        let header: serde_json::Value = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
        let mut h = serde_json::Map::new();
        for (k, v) in header.as_object().unwrap() {
            if k == "__metadata__" {
                h.insert(k.clone(), v.clone());
                continue;
            }
            let mut shape: Vec<u64> = serde_json::from_value(v["shape"].clone()).unwrap();
            shape[axis] = 0;
            h.insert(
                k.clone(),
                serde_json::json!({"dtype": v["dtype"], "shape": shape, "data_offsets": [0, 0]}),
            );
        }
        let mut hb = serde_json::to_vec(&h).unwrap();
        while !hb.len().is_multiple_of(8) {
            hb.push(b' ');
        }
        let file = scratch(&format!("{name}.safetensors"));
        let mut data = (hb.len() as u64).to_le_bytes().to_vec();
        data.extend(hb);
        std::fs::write(&file, data).unwrap();
        let out = mixc(&[
            "run",
            "examples/causal_gqa_llama3.mix",
            "--backend",
            "cpu",
            "--set",
            "heads=2",
            "--set",
            "kv_heads=1",
            "--inputs",
            file.to_str().unwrap(),
        ]);
        assert_eq!(out.status.code(), Some(1), "{name}: {}", text(&out));
        let t = text(&out);
        assert!(
            t.contains("nothing to run") && !t.contains("--ranks"),
            "{name}: {t}"
        );
    }
    // A tile size beyond u32 says so, not "expected a non-negative integer".
    let out = mixc(&[
        "gen",
        "examples/causal_gqa_llama3.mix",
        "--config",
        "block_m=99999999999",
    ]);
    assert_eq!(out.status.code(), Some(1));
    assert!(text(&out).contains("too large"), "{}", text(&out));
    // 5000 duplicate keys: the first 50 diagnostics and a count, not 30k lines.
    let dup = scratch("dup.mix");
    let mut spec = String::from("mixer dup {\n");
    for _ in 0..5000 {
        spec.push_str("heads = 4;\n");
    }
    spec.push_str("head_dim = 8; }\n");
    std::fs::write(&dup, spec).unwrap();
    let out = mixc(&["check", dup.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    let t = text(&out);
    assert!(
        t.contains("and 4949 more"),
        "{}",
        &t[t.len().saturating_sub(500)..]
    );
    assert!(t.lines().count() < 500, "{} lines", t.lines().count());
}
