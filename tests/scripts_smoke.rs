//! The benchmark scripts' smoke modes, so they never rot: `scripts/gpu-check.sh
//! --smoke` (every stage of the GPU check on tiny shapes with the CPU backend,
//! the python scripts compiled and dry-run) and `scripts/bench-cpu-vs-torch.sh
//! --smoke --no-torch` (mixc's side of the CPU comparison; PyTorch is not
//! downloaded in CI). Both use this build's `mixc` through `MIXC_BIN` and must
//! say what they did not exercise.

use std::path::{Path, PathBuf};
use std::process::Command;

/// The repository root (these tests belong to the `cli/` crate).
fn root() -> &'static Path {
    Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/.."))
}

/// A fresh, empty folder for one test's results.
fn out_dir(name: &str) -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join(name);
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("create results folder");
    dir
}

fn run(script: &str, args: &[&str], envs: &[(&str, &Path)]) -> (String, String) {
    let mut cmd = Command::new("bash");
    cmd.arg(root().join(script))
        .args(args)
        .current_dir(root())
        .env("MIXC_BIN", env!("CARGO_BIN_EXE_mixc"))
        // The device tool's variable; a developer's shell may have it set.
        .env_remove("OUT");
    for (k, v) in envs {
        cmd.env(k, v);
    }
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot start {script}: {e}"));
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    );
    assert!(
        out.status.success(),
        "{script} {args:?} failed ({}):\n--- stdout\n{stdout}\n--- stderr\n{stderr}",
        out.status
    );
    (stdout, stderr)
}

fn read_json(path: &Path) -> serde_json::Value {
    let text = std::fs::read_to_string(path)
        .unwrap_or_else(|e| panic!("{} was not written: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: bad JSON: {e}", path.display()))
}

#[test]
fn gpu_check_smoke_runs_every_stage_on_the_cpu() {
    let out = out_dir("gpu-check-smoke");
    let (stdout, stderr) = run("scripts/gpu-check.sh", &["--smoke"], &[("OUT", &out)]);
    let all = format!("{stdout}{stderr}");
    assert!(all.contains("gpu-check: OK"), "{all}");
    // Step 1 ran --check on every example at R = 1 and 4.
    let examples = std::fs::read_dir(root().join("examples"))
        .unwrap()
        .filter(|e| {
            e.as_ref()
                .unwrap()
                .path()
                .extension()
                .is_some_and(|x| x == "mix")
        })
        .count();
    assert!(
        all.contains(&format!("--check passed for {} runs", 2 * examples)),
        "{all}"
    );
    // What smoke mode cannot do is said, not silently skipped.
    assert!(all.contains("NOT EXERCISED: nvidia-smi"), "{all}");
    assert!(all.contains("NOT EXERCISED: sdpa: PyTorch peer"), "{all}");

    let doc = read_json(&out.join("peers.json"));
    let rows = doc["rows"].as_array().expect("rows");
    assert!(doc["errors"].as_array().unwrap().is_empty(), "{doc}");
    for section in ["sdpa", "flex", "linear", "ring", "longest", "tune"] {
        let of: Vec<_> = rows.iter().filter(|r| r["section"] == section).collect();
        assert!(!of.is_empty(), "no {section} rows: {doc}");
        // Every mixc timing point produced a real time.
        if !matches!(section, "longest" | "tune") {
            for r in &of {
                assert!(r["mixc_s"].as_f64().is_some_and(|s| s > 0.0), "{r}");
            }
        }
    }
    // The ring rows compare against R = 1, ranks 1, 2, 4, 8.
    let ring: Vec<_> = rows.iter().filter(|r| r["section"] == "ring").collect();
    assert_eq!(ring.len(), 4);
    assert!(
        ring.iter().all(|r| r["ratio"].as_f64().is_some()),
        "{ring:?}"
    );
    // The doubling search went up to its smoke cap.
    let longest = rows.iter().find(|r| r["section"] == "longest").unwrap();
    assert_eq!(longest["longest_seq"], 512, "{longest}");

    let md = std::fs::read_to_string(out.join("gpu-check.md")).expect("gpu-check.md");
    assert!(md.contains("| section | case | peer |"), "{md}");
    assert!(md.contains("not exercised"), "{md}");
}

#[test]
fn cpu_vs_torch_smoke_times_mixc_and_says_torch_was_not_run() {
    let out = out_dir("cpu-vs-torch-smoke");
    let (stdout, stderr) = run(
        "scripts/bench-cpu-vs-torch.sh",
        &["--smoke", "--no-torch"],
        &[("OUT_DIR", &out)],
    );
    assert!(stderr.contains("NOT EXERCISED: PyTorch"), "{stderr}");
    assert!(
        stdout.contains("| L | dtype | mixc time | PyTorch time |"),
        "{stdout}"
    );
    let doc = read_json(&out.join("cpu-vs-torch-smoke.json"));
    // The limit: mixc's own f32 tile product, always measured.
    let limit = doc["limit"]["mixc_kernels"]["f32_gflops"].as_f64();
    assert!(limit.is_some_and(|g| g > 0.0), "{doc}");
    let rows = doc["rows"].as_array().expect("rows");
    // Two lengths x f32 and bf16, in that order.
    let points: Vec<(u64, &str)> = rows
        .iter()
        .map(|r| (r["seq"].as_u64().unwrap(), r["dtype"].as_str().unwrap()))
        .collect();
    assert_eq!(
        points,
        [(128, "f32"), (128, "bf16"), (256, "f32"), (256, "bf16")],
        "{doc}"
    );
    for r in rows {
        let frac = r["limit_fraction"].as_f64().expect("fraction of the limit");
        assert!(frac > 0.0 && frac < 1.5, "{r}");
        assert!(
            r["mixc"]["median_s"].as_f64().is_some_and(|s| s > 0.0),
            "{r}"
        );
        // Peak RSS measured from outside the process, and at least the tensors' size.
        let rss = r["mixc"]["peak_rss_bytes"].as_u64().expect("peak RSS");
        let tensors = r["mixc"]["input_bytes"].as_u64().unwrap()
            + r["mixc"]["output_bytes"].as_u64().unwrap();
        assert!(rss > tensors, "{r}");
        assert!(r.get("torch").is_none(), "{r}");
    }
    assert!(doc["failures"].as_array().unwrap().is_empty(), "{doc}");
}

#[test]
fn cpu_vs_torch_smoke_times_the_backward_pass() {
    let out = out_dir("cpu-vs-torch-bwd-smoke");
    let (stdout, _) = run(
        "scripts/bench-cpu-vs-torch.sh",
        &["--smoke", "--no-torch", "--pass", "bwd"],
        &[("OUT_DIR", &out)],
    );
    assert!(stdout.contains("causal attention (bwd)"), "{stdout}");
    let doc = read_json(&out.join("cpu-vs-torch-bwd-smoke.json"));
    assert_eq!(doc["pass"], "bwd", "{doc}");
    for r in doc["rows"].as_array().expect("rows") {
        assert!(
            r["mixc"]["median_s"].as_f64().is_some_and(|s| s > 0.0),
            "{r}"
        );
    }
    assert!(doc["failures"].as_array().unwrap().is_empty(), "{doc}");
}

#[test]
fn scripts_reject_unknown_arguments_before_doing_anything() {
    for script in [
        "scripts/gpu-check.sh",
        "scripts/bench-cpu-vs-torch.sh",
        "scripts/build-for-device.sh",
    ] {
        let out = Command::new("bash")
            .arg(root().join(script))
            .arg("--no-such-flag")
            .current_dir(root())
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(2), "{script}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains("unknown argument --no-such-flag"),
            "{script}: {err}"
        );
    }
}
