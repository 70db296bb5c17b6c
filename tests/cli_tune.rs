//! `mixc tune` end to end on the CPU backend: table, cache file, chosen time
//! no worse than the default, a second call is a cache hit that times
//! nothing; bad cache entries and unwritable cache folders give warnings, not
//! failures; `--backend cuda` without a GPU fails clearly.

use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::Output;

mod common;
use common::text;

fn mixc(cache: &Path, args: &[&str]) -> Output {
    common::mixc_env(args, &[("MIXC_CACHE_DIR", cache)])
}

fn json_of(o: &Output) -> Value {
    assert!(o.status.success(), "{}", text(o));
    serde_json::from_slice(&o.stdout).unwrap_or_else(|e| panic!("{e}: {}", text(o)))
}

fn cache_dir(name: &str) -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR"))
        .join("cli_tune")
        .join(name);
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

const LLAMA: &str = "examples/causal_gqa_llama3.mix";
const RETNET: &str = "examples/retention_retnet.mix";

fn tune_json(cache: &Path, spec: &str, extra: &[&str]) -> Value {
    let mut args = vec!["tune", spec, "--seq", "128", "--reps", "3", "--json"];
    args.extend_from_slice(extra);
    json_of(&mixc(cache, &args))
}

#[test]
fn tunes_two_specs_writes_the_cache_and_hits_it_the_second_time() {
    let cache = cache_dir("two_specs");
    for spec in [LLAMA, RETNET] {
        // Text mode: the table and the cache line.
        let out = mixc(
            cache.as_path(),
            &["tune", spec, "--seq", "128", "--reps", "3"],
        );
        let t = text(&out);
        assert!(out.status.success(), "{t}");
        for want in [
            "rank",
            "median ms",
            "vs default",
            "(default)",
            "chosen:",
            "cache: wrote",
        ] {
            assert!(t.contains(want), "`{want}` missing from:\n{t}");
        }
        // The file exists and holds the choice.
        let first = tune_json(&cache, spec, &["--force"]);
        assert_eq!(first["cache_hit"], false);
        let path = PathBuf::from(first["cache_path"].as_str().unwrap());
        assert!(
            path.starts_with(cache.join("tune")) && path.is_file(),
            "{path:?}"
        );
        let stored: Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        assert_eq!(stored["choice"], first["chosen"]["config"]);
        // Every candidate was timed and the choice is no slower than the default.
        let timed = first["timed"].as_u64().unwrap();
        assert!(
            timed >= 4 && timed == first["candidates"].as_u64().unwrap(),
            "{first}"
        );
        let chosen = first["chosen"]["median_s"].as_f64().unwrap();
        let default = first["default_median_s"].as_f64().unwrap();
        assert!(chosen > 0.0 && chosen <= default, "{chosen} vs {default}");
        assert!(first["speedup"].as_f64().unwrap() >= 1.0);
        let top = first["top"].as_array().unwrap();
        assert!(!top.is_empty() && top[0]["median_s"].as_f64().unwrap() == chosen);

        // Second call, another seq in the same bucket: a hit, nothing timed.
        let second = tune_json(&cache, spec, &[]);
        assert_eq!(second["cache_hit"], true, "{second}");
        assert_eq!(second["timed"], 0);
        assert_eq!(second["chosen"], first["chosen"]);
        let out = mixc(cache.as_path(), &["tune", spec, "--seq", "100"]);
        let t = text(&out);
        assert!(
            out.status.success() && t.contains("cache hit") && t.contains("no timing"),
            "{t}"
        );
        assert!(
            t.contains("median ms"),
            "the hit prints the stored table:\n{t}"
        );
    }
    assert_eq!(std::fs::read_dir(cache.join("tune")).unwrap().count(), 2);
}

#[test]
fn corrupt_and_stale_entries_warn_and_are_rebuilt() {
    let cache = cache_dir("bad_entries");
    let first = tune_json(&cache, RETNET, &[]);
    let path = PathBuf::from(first["cache_path"].as_str().unwrap());

    std::fs::write(&path, "{ this is not json").unwrap();
    let out = mixc(&cache, &["tune", RETNET, "--seq", "128", "--reps", "3"]);
    let t = text(&out);
    assert!(out.status.success(), "{t}");
    assert!(
        t.contains("warning:") && t.contains("corrupt") && t.contains("tuning again"),
        "{t}"
    );
    assert!(t.contains("cache: wrote"), "{t}");
    assert_eq!(tune_json(&cache, RETNET, &[])["cache_hit"], true);

    let mut stale: Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    stale["mixc_version"] = "0.0.1".into();
    std::fs::write(&path, stale.to_string()).unwrap();
    let v = tune_json(&cache, RETNET, &[]);
    assert_eq!(v["cache_hit"], false);
    assert!(v["timed"].as_u64().unwrap() > 0);
    let w = v["warnings"].to_string();
    assert!(w.contains("stale") && w.contains("0.0.1"), "{w}");
    assert_eq!(tune_json(&cache, RETNET, &[])["cache_hit"], true);
}

#[test]
fn an_unwritable_cache_folder_warns_and_still_tunes() {
    use std::os::unix::fs::PermissionsExt;
    let root = cache_dir("read_only");
    let ro = root.join("ro");
    std::fs::create_dir_all(&ro).unwrap();
    std::fs::set_permissions(&ro, std::fs::Permissions::from_mode(0o555)).unwrap();
    // Root ignores permission bits: then make the folder's parent a file.
    let cache = if std::fs::create_dir(ro.join("tune")).is_err() {
        ro.clone()
    } else {
        std::fs::remove_dir(ro.join("tune")).unwrap();
        std::fs::write(root.join("file"), b"x").unwrap();
        root.join("file")
    };
    let out = mixc(&cache, &["tune", LLAMA, "--seq", "64", "--reps", "3"]);
    let t = text(&out);
    assert!(out.status.success(), "{t}");
    assert!(
        t.contains("warning: tune cache not written") && t.contains("chosen:"),
        "{t}"
    );
    assert!(!t.contains("cache: wrote"), "{t}");
    let v = json_of(&mixc(
        &cache,
        &["tune", LLAMA, "--seq", "64", "--reps", "3", "--json"],
    ));
    assert_eq!(v["cache_hit"], false);
    assert!(v["cache_path"].is_null());
    std::fs::set_permissions(&ro, std::fs::Permissions::from_mode(0o755)).unwrap();
}

#[test]
fn bad_arguments_and_cuda_without_a_gpu_fail_clearly() {
    let cache = cache_dir("bad_args");
    let out = mixc(&cache, &["tune", RETNET, "--seq", "0"]);
    assert!(
        !out.status.success() && text(&out).contains("--seq and --batch"),
        "{}",
        text(&out)
    );
    let out = mixc(&cache, &["tune", RETNET, "--seq", "64", "--budget=0"]);
    assert!(
        !out.status.success() && text(&out).contains("--budget"),
        "{}",
        text(&out)
    );
    let out = mixc(
        &cache,
        &["tune", RETNET, "--seq", "64", "--backend", "cuda"],
    );
    let t = text(&out);
    assert!(!out.status.success(), "{t}");
    // No GPU here: the driver or the launcher is missing, and the message says so.
    assert!(
        t.contains("cannot tune on CUDA") || t.contains("CUDA backend is not available"),
        "{t}"
    );
    assert!(t.contains("--backend cpu"), "{t}");
    assert!(!t.contains("panicked"), "{t}");
}

#[test]
fn run_uses_the_tuned_choice_and_falls_back_with_a_warning() {
    let cache = cache_dir("run_reuse");
    let run = |cache: &Path| {
        mixc(
            cache,
            &[
                "run",
                RETNET,
                "--backend",
                "cpu",
                "--seq",
                "120",
                "--check",
                "--json",
            ],
        )
    };
    // No entry yet: the default, silently.
    let before = json_of(&run(&cache));
    assert_eq!(before["config_source"], "default", "{before}");

    let tuned = tune_json(&cache, RETNET, &[]);
    let path = PathBuf::from(tuned["cache_path"].as_str().unwrap());
    // seq 120 falls in the bucket tuned at seq 128: the run reuses the entry.
    let after = json_of(&run(&cache));
    let source = after["config_source"].as_str().unwrap();
    assert!(
        source.starts_with("tuned") && source.contains(path.file_name().unwrap().to_str().unwrap()),
        "{after}"
    );
    // Within the run's own tolerance (the spec stores bf16: the output too).
    assert!(
        after["max_rel_error"].as_f64().unwrap() <= after["tolerance"].as_f64().unwrap(),
        "{after}"
    );

    // A corrupt entry: a warning, the default, and still a correct result.
    std::fs::write(&path, "not json").unwrap();
    let out = run(&cache);
    let t = text(&out);
    let v = json_of(&out);
    assert_eq!(v["config_source"], "default");
    assert!(t.contains("warning:") && t.contains("mixc tune"), "{t}");
}
