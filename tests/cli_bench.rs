//! `mixc bench` end to end: the grid, the JSON rows, the useful-pair count,
//! `--check`, `--out`, `--inputs`, `--keep-going`, `--max-time`, and clear
//! errors for bad input (never a panic).

use std::path::PathBuf;
use std::process::Output;

mod common;
use common::{mixc, text};

fn scratch(name: &str) -> PathBuf {
    common::scratch("cli_bench", name)
}

fn json(o: &Output) -> serde_json::Value {
    serde_json::from_slice(&o.stdout).unwrap_or_else(|e| panic!("bad JSON ({e}): {}", text(o)))
}

const SMALL: [&str; 4] = ["--set", "heads=2", "--set", "kv_heads=1"];

#[test]
fn grid_rows_count_unmasked_pairs_and_pass_the_check() {
    let out = scratch("grid.json");
    let mut args = vec![
        "bench",
        "examples/causal_gqa_llama3.mix",
        "--backend",
        "cpu",
        "--seq",
        "64,100",
        "--dtype",
        "f32,bf16",
        "--reps",
        "2",
        "--check",
        "--json",
        "--out",
        out.to_str().unwrap(),
    ];
    args.extend(SMALL);
    let o = mixc(&args);
    assert!(o.status.success(), "{}", text(&o));
    let doc = json(&o);
    let rows = doc["rows"].as_array().unwrap();
    // Specs x lengths x dtypes, in that order.
    let got: Vec<(u64, &str)> = rows
        .iter()
        .map(|r| (r["seq"].as_u64().unwrap(), r["dtype"].as_str().unwrap()))
        .collect();
    assert_eq!(
        got,
        [(64, "f32"), (64, "bf16"), (100, "f32"), (100, "bf16")]
    );
    for r in rows {
        let l = r["seq"].as_u64().unwrap();
        // Causal: L (L + 1) / 2 pairs per head, 2 heads; whole tiles computed >= that.
        assert_eq!(r["useful_pairs"], 2 * l * (l + 1) / 2, "{r}");
        assert!(r["computed_pairs"].as_u64().unwrap() >= r["useful_pairs"].as_u64().unwrap());
        assert_eq!(r["reps"], 2);
        assert_eq!(r["times_s"].as_array().unwrap().len(), 2);
        let med = r["median_s"].as_f64().unwrap();
        assert!(med > 0.0 && med >= r["min_s"].as_f64().unwrap());
        // useful TFLOP/s = pairs x (2 d_k + 2 d_v) / time.
        let want = r["useful_pairs"].as_f64().unwrap() * 512.0 / med / 1e12;
        assert!(
            (r["useful_tflops"].as_f64().unwrap() / want - 1.0).abs() < 1e-9,
            "{r}"
        );
        assert!(r["max_rel_error"].as_f64().unwrap() < r["tolerance"].as_f64().unwrap());
        assert!(r["peak_rss_bytes"].as_u64().unwrap() > 0);
        assert!(r["error"].is_null());
    }
    // --out holds the same rows.
    let file: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&out).unwrap()).unwrap();
    assert_eq!(file["rows"].as_array().unwrap().len(), 4);
    assert_eq!(file["rows"][3]["useful_pairs"], rows[3]["useful_pairs"]);
}

#[test]
fn table_output_is_markdown_with_one_line_per_point() {
    let mut args = vec![
        "bench",
        "examples/causal_gqa_llama3.mix",
        "examples/sliding_window_mistral.mix",
        "--backend",
        "cpu",
        "--seq",
        "96",
        "--reps",
        "1",
    ];
    args.extend(SMALL);
    let o = mixc(&args);
    assert!(o.status.success(), "{}", text(&o));
    let stdout = String::from_utf8_lossy(&o.stdout);
    let lines: Vec<&str> = stdout.lines().filter(|l| l.starts_with('|')).collect();
    assert_eq!(lines.len(), 4, "{stdout}");
    assert!(lines[0].contains("useful TFLOP/s") && lines[0].contains("peak RSS"));
    assert!(lines[2].starts_with("| causal_gqa_llama3 | 96 | bf16 | cpu | 1 |"));
    assert!(lines[3].starts_with("| sliding_window_mistral | 96 |"));
}

#[test]
fn inputs_file_sets_the_shape_and_a_failing_point_is_recorded_with_keep_going() {
    let file = scratch("doc.safetensors");
    let base = [
        "examples/document_mask.mix",
        "--set",
        "heads=2",
        "--set",
        "kv_heads=1",
    ];
    let mut args = vec![
        "run",
        base[0],
        "--backend",
        "cpu",
        "--seq",
        "3",
        "--batch",
        "2",
    ];
    args.extend(&base[1..]);
    args.extend(["--save", file.to_str().unwrap()]);
    let o = mixc(&args);
    assert!(o.status.success(), "{}", text(&o));

    let mut args = vec![
        "bench",
        base[0],
        "--backend",
        "cpu",
        "--reps",
        "1",
        "--json",
    ];
    args.extend(&base[1..]);
    args.extend(["--inputs", file.to_str().unwrap()]);
    let o = mixc(&args);
    assert!(o.status.success(), "{}", text(&o));
    let r = &json(&o)["rows"][0];
    assert_eq!((r["batch"].as_u64(), r["seq"].as_u64()), (Some(2), Some(3)));

    // 4 ranks for 3 positions: that point fails, is recorded, and the exit is non-zero.
    args.extend(["--ranks", "4", "--keep-going"]);
    let o = mixc(&args);
    assert!(!o.status.success());
    let r = &json(&o)["rows"][0];
    assert!(
        r["error"]
            .as_str()
            .unwrap()
            .contains("more than the sequence length"),
        "{r}"
    );
    assert!(r["median_s"].is_null());
}

#[test]
fn max_time_stops_repeating_after_one_timed_run() {
    let mut args = vec![
        "bench",
        "examples/full_attention.mix",
        "--backend",
        "cpu",
        "--seq",
        "64",
        "--reps",
        "50",
        "--max-time",
        "1e-9",
        "--json",
    ];
    args.extend(["--set", "heads=1"]);
    let o = mixc(&args);
    assert!(o.status.success(), "{}", text(&o));
    assert_eq!(json(&o)["rows"][0]["reps"], 1);
}

#[test]
fn bad_input_gives_clear_errors() {
    let cases: &[(&[&str], &str)] = &[
        (&["--seq", "0"], "is not a sequence length"),
        (&["--seq", "4x"], "is not a sequence length"),
        (&["--seq", "64", "--reps", "0"], "--reps must be at least 1"),
        (
            &["--seq", "64", "--batch", "0"],
            "--batch must be at least 1",
        ),
        (
            &["--seq", "4,64", "--ranks", "8"],
            "--ranks 8 must be between 1",
        ),
        (
            &["--seq", "64", "--max-time=-1"],
            "--max-time must be a positive",
        ),
        (
            &["--seq", "64", "--max-time", "0"],
            "--max-time must be a positive",
        ),
        (&["--seq", "64", "--set", "heads=x"], "--set `heads=x`"),
        (
            &["--seq", "64", "--inputs", "x.safetensors"],
            "cannot be used with",
        ),
        (&["--seq", "64", "--dtype", "f8"], "invalid value 'f8'"),
    ];
    for (extra, want) in cases {
        let mut args = vec!["bench", "examples/full_attention.mix", "--backend", "cpu"];
        args.extend(*extra);
        let o = mixc(&args);
        let t = text(&o);
        assert!(!o.status.success(), "{extra:?} should fail: {t}");
        assert!(t.contains(want), "{extra:?}: expected `{want}` in: {t}");
        assert!(!t.contains("panicked"), "{extra:?}: {t}");
    }
    let o = mixc(&["bench", "examples/nope.mix", "--seq", "64"]);
    assert!(!o.status.success());
    assert!(text(&o).contains("nope.mix"), "{}", text(&o));
}

/// A block file is timed blockwise (forward, backward, or a training step),
/// its first run checked against the f64 unfused block, with useful
/// TFLOP/s counting the projections and FFN as well as the mixer's pairs;
/// mixer-only flags are refused on it.
#[test]
fn blocks_are_timed_and_checked_per_pass() {
    for pass in ["fwd", "fwdbwd"] {
        let o = mixc(&[
            "bench",
            "examples/blocks/llama_block.mix",
            "--seq",
            "32,48",
            "--pass",
            pass,
            "--reps",
            "1",
            "--warmup",
            "0",
            "--check",
            "--json",
        ]);
        assert!(o.status.success(), "{}", text(&o));
        let v = json(&o);
        let rows = v["rows"].as_array().unwrap();
        assert_eq!(rows.len(), 2, "{v}");
        for (row, seq) in rows.iter().zip([32u64, 48]) {
            assert_eq!(row["spec"], "llama_block");
            assert_eq!(row["family"], "block");
            assert_eq!(row["backend"], "cpu");
            assert_eq!(row["seq"], seq);
            // Causal: seq (seq + 1) / 2 pairs per head, 8 heads.
            assert_eq!(row["useful_pairs"], seq * (seq + 1) / 2 * 8);
            assert!(row["useful_tflops"].as_f64().unwrap() > 0.0, "{row}");
            let (e, t) = (
                row["max_rel_error"].as_f64().unwrap(),
                row["tolerance"].as_f64().unwrap(),
            );
            assert!(e <= t, "{row}");
        }
    }
    let o = mixc(&[
        "bench",
        "examples/blocks/llama_block.mix",
        "--seq",
        "8",
        "--set",
        "heads=2",
    ]);
    assert!(!o.status.success());
    assert!(
        text(&o).contains("--set does not apply to block file"),
        "{}",
        text(&o)
    );
}

/// `--peak` measures the CPU backend's own tile products (bf16 only where
/// the CPU has them, and never when `MIXC_CPU_BF16=0`), and takes no files.
#[test]
fn peak_reports_the_tile_product_rates() {
    let o = mixc(&["bench", "--peak", "--json"]);
    assert!(o.status.success(), "{}", text(&o));
    let p = json(&o);
    assert!(p["f32_gflops"].as_f64().is_some_and(|g| g > 0.0), "{p}");
    assert!(p["threads"].as_u64().is_some_and(|t| t >= 1), "{p}");
    assert_eq!(
        p["bf16_gflops"].as_f64().is_some(),
        mixc::runtime::cpu::bf16::enabled(),
        "{p}"
    );
    let off = common::mixc_env(
        &["bench", "--peak", "--json"],
        &[("MIXC_CPU_BF16", std::path::Path::new("off"))],
    );
    assert!(off.status.success(), "{}", text(&off));
    assert!(json(&off)["bf16_gflops"].is_null(), "{}", text(&off));
    let both = mixc(&["bench", "--peak", "examples/full_attention.mix"]);
    assert!(!both.status.success(), "{}", text(&both));
}
