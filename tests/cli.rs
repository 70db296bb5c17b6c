//! End-to-end tests of the `mixc` binary: exit codes, diagnostics, files.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn mixc(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_mixc"))
        .args(args)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .expect("mixc runs")
}

fn examples() -> Vec<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples");
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "mix"))
        .collect();
    v.sort();
    v
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

fn scratch(name: &str) -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("cli");
    std::fs::create_dir_all(&dir).unwrap();
    dir.join(name)
}

#[test]
fn check_accepts_every_example() {
    let files = examples();
    assert!(files.len() >= 12, "expected at least 12 examples, found {}", files.len());
    let mut args = vec!["check"];
    let names: Vec<String> = files.iter().map(|p| p.display().to_string()).collect();
    args.extend(names.iter().map(String::as_str));
    let out = mixc(&args);
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(String::from_utf8_lossy(&out.stdout).lines().count(), files.len());
}

#[test]
fn check_rejects_an_invalid_spec_with_a_located_diagnostic() {
    let bad = scratch("bad.mix");
    std::fs::write(&bad, "mixer bad {\n    heads = 8;\n    head_dim = 64;\n    mask = causl;\n}\n").unwrap();
    let out = mixc(&["check", bad.to_str().unwrap()]);
    assert!(!out.status.success());
    let t = text(&out);
    assert!(t.contains("bad.mix:4:12"), "diagnostic lacks file:line:col: {t}");
    assert!(t.contains('^'), "diagnostic lacks a caret: {t}");
}

#[test]
fn check_reports_a_missing_file() {
    let out = mixc(&["check", "examples/does_not_exist.mix"]);
    assert!(!out.status.success());
    assert!(text(&out).contains("does_not_exist.mix"));
}
