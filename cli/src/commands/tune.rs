//! `mixc tune`: time the configurations of a spec's search space on one
//! backend, print the best ones and store the winner in the tuning cache,
//! which `mixc run` and library lookups read (see docs/tuning.md).

use anyhow::{anyhow, bail, Result};
use indicatif::{ProgressBar, ProgressStyle};
use mixc::runtime::tune::cache::TuneEntry;
use mixc::runtime::tune::{self, Outcome, Progress, TuneEvent, TuneRequest, TuneResult};
use mixc::{BackendKind, DType, MixerSpec};
use serde_json::json;
use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Backend {
    /// The blocked/ring CPU backend (wall clock).
    Cpu,
    /// CUDA kernels (NVRTC pruning, then CUDA-event timing; needs a GPU).
    Cuda,
}

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum TunePass {
    Fwd,
    Bwd,
}

#[derive(clap::Args)]
pub struct Args {
    /// Spec file (`.mix`).
    file: PathBuf,
    /// Sequence length to tune for (the entry serves its power-of-two bucket).
    #[arg(long)]
    seq: usize,
    /// Batch size to tune for.
    #[arg(long, default_value_t = 1)]
    batch: usize,
    /// Storage dtype of q, k, v (default: the spec's).
    #[arg(long, value_parser = ["f16", "bf16", "f32"])]
    dtype: Option<String>,
    #[arg(long, value_enum, default_value = "cpu")]
    backend: Backend,
    /// Start no new candidate after this many seconds (the default
    /// configuration is always timed, whatever the budget).
    #[arg(long, default_value_t = 120.0)]
    budget: f64,
    /// Timed repetitions per candidate (the median counts).
    #[arg(long, default_value_t = 5)]
    reps: usize,
    /// Rows of the table.
    #[arg(long, default_value_t = 5)]
    top: usize,
    /// Seed of the random inputs.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Tune again even when the cache holds an entry.
    #[arg(long)]
    force: bool,
    /// The pass to tune: the forward, or the backward (`run --grad`, `bench
    /// --pass bwd`; CPU only), whose tiles are timed and cached separately.
    #[arg(long, value_enum, default_value = "fwd")]
    pass: TunePass,
    /// Print one JSON object instead of text (and no progress bar).
    #[arg(long)]
    json: bool,
}

pub fn main(args: Args) -> Result<ExitCode> {
    let spec = super::load_spec(&args.file)?;
    if args.seq == 0 || args.batch == 0 {
        bail!("--seq and --batch must be at least 1");
    }
    if args.reps == 0 {
        bail!("--reps must be at least 1");
    }
    if !(args.budget.is_finite() && args.budget > 0.0) {
        bail!("--budget must be a positive number of seconds");
    }
    let dtype = match &args.dtype {
        Some(d) => DType::parse(d).ok_or_else(|| anyhow!("unknown dtype `{d}`"))?,
        None => spec.dtype,
    };
    let req = TuneRequest {
        backend: match args.backend {
            Backend::Cpu => BackendKind::Cpu,
            Backend::Cuda => BackendKind::Cuda,
        },
        batch: args.batch,
        seq: args.seq,
        dtype,
        reps: args.reps,
        seed: args.seed,
        budget: Duration::from_secs_f64(args.budget),
        force: args.force,
        top: args.top,
        pass: match args.pass {
            TunePass::Fwd => tune::Pass::Fwd,
            TunePass::Bwd => tune::Pass::Bwd,
        },
    };
    let bar = if args.json || !std::io::stderr().is_terminal() {
        ProgressBar::hidden()
    } else {
        ProgressBar::new(0)
    };
    bar.set_style(
        ProgressStyle::with_template("{bar:30.cyan/blue} {pos}/{len} {wide_msg}")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    let json = args.json;
    let mut on_event = |e: TuneEvent| {
        if json {
            return;
        }
        match e {
            TuneEvent::Started { key, device } => println!(
                "tuning {} ({}{}) on {}: {}; batch {} x seq {} (bucket {} x {}), {}",
                spec.name,
                spec.family.name(),
                if key.pass == tune::Pass::Bwd {
                    ", backward pass"
                } else {
                    ""
                },
                device.backend,
                device.describe(),
                args.batch,
                args.seq,
                key.batch_bucket,
                key.seq_bucket,
                dtype
            ),
            TuneEvent::Pruned {
                pruned,
                total,
                summary,
            } => println!("pruned {pruned} of {total} candidates before timing: {summary}"),
        }
    };
    let mut progress = |p: &Progress| {
        bar.set_length(p.total as u64);
        bar.set_position((p.tried + p.pruned) as u64);
        let best = p.best.as_ref().map_or("-".into(), |(l, s)| {
            format!("{l} {:.3} ms", s.median_s() * 1e3)
        });
        bar.set_message(format!(
            "tried {} pruned {} | best {best}{}",
            p.tried,
            p.pruned,
            p.current
                .as_ref()
                .map_or(String::new(), |c| format!(" | now {c}"))
        ));
    };
    let session = tune::tune(&spec, &req, &mut on_event, &mut progress).map_err(|e| match e {
        mixc::Error::NoGpu { reason } => anyhow!(
            "cannot tune on CUDA: {reason}; `--backend cpu` tunes the CPU backend without a GPU"
        ),
        e => e.into(),
    })?;
    bar.finish_and_clear();
    let warnings = session.warnings;
    let (entry, report, written) = match session.result {
        TuneResult::CacheHit { entry, path } => {
            return print_hit(&args, &spec, &entry, &path, warnings);
        }
        TuneResult::NothingPassed { report } => {
            let reasons: Vec<String> = report
                .results
                .iter()
                .map(|r| format!("  {}: {}", r.candidate.label, outcome_text(&r.outcome)))
                .collect();
            bail!(
                "no configuration passed the check against the reference:\n{}",
                reasons.join("\n")
            );
        }
        TuneResult::Tuned {
            entry,
            report,
            written,
        } => (entry, report, written),
    };

    let n = |f: fn(&Outcome) -> bool| report.count(f);
    let counts = json!({
        "candidates": report.results.len(),
        "timed": report.timed,
        "pruned": n(|o| matches!(o, Outcome::Pruned { .. })),
        "wrong_result": n(|o| matches!(o, Outcome::WrongResult { .. })),
        "failed": n(|o| matches!(o, Outcome::Failed { .. })),
        "skipped_budget": n(|o| matches!(o, Outcome::SkippedBudget)),
    });
    if args.json {
        let mut v = summary_json(&spec, &entry, false, written.as_ref(), &warnings);
        merge(&mut v, counts);
        v["seq"] = json!(args.seq);
        v["batch"] = json!(args.batch);
        v["elapsed_s"] = json!(report.elapsed_s);
        v["results"] = json!(report.results);
        println!("{v}");
        return Ok(ExitCode::SUCCESS);
    }
    println!(
        "{} candidates in {:.1} s: {} timed, {} pruned, {} wrong result, {} failed, {} skipped (budget {} s)",
        counts["candidates"],
        report.elapsed_s,
        counts["timed"],
        counts["pruned"],
        counts["wrong_result"],
        counts["failed"],
        counts["skipped_budget"],
        args.budget
    );
    for r in &report.results {
        if let Outcome::WrongResult { .. } | Outcome::Failed { .. } = r.outcome {
            println!("  {}: {}", r.candidate.label, outcome_text(&r.outcome));
        }
    }
    print_table(&entry);
    for w in &warnings {
        eprintln!("warning: {w}");
    }
    if let Some(p) = &written {
        println!("cache: wrote {}", p.display());
    }
    Ok(ExitCode::SUCCESS)
}

fn outcome_text(o: &Outcome) -> String {
    match o {
        Outcome::Timed { sample, .. } => format!("{:.3} ms", sample.median_s() * 1e3),
        Outcome::WrongResult { check_error } => {
            format!("wrong result (relative error {check_error:.2e} vs the f64 reference)")
        }
        Outcome::Failed { error } => format!("failed: {error}"),
        Outcome::Pruned { reason } => format!("pruned: {reason}"),
        Outcome::SkippedBudget => "skipped: budget spent".into(),
    }
}

fn print_hit(
    args: &Args,
    spec: &MixerSpec,
    entry: &TuneEntry,
    path: &std::path::Path,
    warnings: Vec<String>,
) -> Result<ExitCode> {
    if args.json {
        let mut v = summary_json(spec, entry, true, Some(&path.to_path_buf()), &warnings);
        v["timed"] = json!(0);
        v["seq"] = json!(args.seq);
        v["batch"] = json!(args.batch);
        println!("{v}");
        return Ok(ExitCode::SUCCESS);
    }
    for w in &warnings {
        eprintln!("warning: {w}");
    }
    println!(
        "cache hit: {} (tuned at batch {} x seq {}); no timing done (--force re-tunes)",
        path.display(),
        entry.tuned_batch,
        entry.tuned_seq
    );
    print_table(entry);
    Ok(ExitCode::SUCCESS)
}

fn print_table(entry: &TuneEntry) {
    let width = entry
        .top
        .iter()
        .map(|r| r.label.len())
        .max()
        .unwrap_or(0)
        .max(13);
    println!(
        "{:>4}  {:<width$}  {:>10}  {:>10}  {:>10}  {:>9}",
        "rank", "configuration", "median ms", "min ms", "vs default", "check err"
    );
    for r in &entry.top {
        let speedup = entry
            .default_median_s
            .map_or("-".into(), |d| format!("{:.2}x", d / r.median_s.max(1e-12)));
        println!(
            "{:>4}  {:<width$}  {:>10.3}  {:>10.3}  {:>10}  {:>9.1e}{}",
            r.rank,
            r.label,
            r.median_s * 1e3,
            r.min_s * 1e3,
            speedup,
            r.check_error,
            if r.is_default { "  (default)" } else { "" }
        );
    }
    match (entry.default_median_s, entry.speedup()) {
        (Some(d), Some(s)) => println!(
            "chosen: {} ({:.3} ms; default {:.3} ms; {s:.2}x over the default)",
            entry.chosen_label,
            entry.chosen_median_s * 1e3,
            d * 1e3
        ),
        _ => println!(
            "chosen: {} ({:.3} ms; the default was not timed)",
            entry.chosen_label,
            entry.chosen_median_s * 1e3
        ),
    }
}

fn summary_json(
    spec: &MixerSpec,
    entry: &TuneEntry,
    cache_hit: bool,
    path: Option<&PathBuf>,
    warnings: &[String],
) -> serde_json::Value {
    json!({
        "spec": spec.name,
        "family": spec.family.name(),
        "backend": entry.key.device.backend,
        "device": entry.key.device,
        "dtype": entry.key.dtype,
        "tuned_seq": entry.tuned_seq,
        "tuned_batch": entry.tuned_batch,
        "seq_bucket": entry.key.seq_bucket,
        "batch_bucket": entry.key.batch_bucket,
        "cache_hit": cache_hit,
        "cache_path": path.map(|p| p.display().to_string()),
        "chosen": {
            "label": entry.chosen_label,
            "config": entry.choice,
            "median_s": entry.chosen_median_s,
        },
        "default_median_s": entry.default_median_s,
        "speedup": entry.speedup(),
        "top": entry.top,
        "mixc_version": entry.mixc_version,
        "warnings": warnings,
    })
}

fn merge(into: &mut serde_json::Value, from: serde_json::Value) {
    if let (Some(a), serde_json::Value::Object(b)) = (into.as_object_mut(), from) {
        a.extend(b);
    }
}
