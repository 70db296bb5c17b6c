use anyhow::Result;
use serde_json::json;
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(clap::Args)]
pub struct Args {
    /// Spec files (`.mix`).
    #[arg(required = true)]
    files: Vec<PathBuf>,
    /// Print one JSON object per file instead of text.
    #[arg(long)]
    json: bool,
}

pub fn main(args: Args) -> Result<ExitCode> {
    let mut failed = 0usize;
    for path in &args.files {
        let shown = path.display();
        // Likely mistakes in a valid spec (rendered; empty when none).
        let warned = mixc::dsl::warnings_file(path)
            .ok()
            .flatten()
            .unwrap_or_default();
        if !args.json {
            super::print_warnings(path);
        }
        match mixc::dsl::parse_any_file(path) {
            Ok(mixc::dsl::SpecFile::Block(block)) => {
                // Blocks run blockwise on the CPU backend (and as the f64
                // unfused block on the reference backend).
                if args.json {
                    println!(
                        "{}",
                        json!({"file": shown.to_string(), "ok": true, "name": block.name,
                               "kind": "block", "summary": block.summary(),
                               "parameters": block.parameter_count(),
                               "weights": block.weight_shapes(), "backends": ["cpu", "reference"],
                               "warnings": warned, "spec": block})
                    );
                } else {
                    println!(
                        "{shown}: ok (block `{}`: {}; {} parameters); runs on cpu, reference \
                         (forward and gradients); not on cuda yet",
                        block.name,
                        block.summary(),
                        block.parameter_count()
                    );
                }
            }
            Ok(mixc::dsl::SpecFile::Mixer(spec)) => {
                // Which backends and architectures can run it, and why not.
                let support = mixc::capabilities::matrix(&spec);
                if args.json {
                    let backends: Vec<_> = support
                        .iter()
                        .map(|s| {
                            json!({"target": s.target, "supported": s.unsupported.is_none(),
                                   "reason": s.unsupported,
                                   "backward": s.backward_unsupported.is_none(),
                                   "backward_reason": s.backward_unsupported})
                        })
                        .collect();
                    println!(
                        "{}",
                        json!({"file": shown.to_string(), "ok": true, "name": spec.name,
                               "family": spec.family.name(), "backends": backends,
                               "warnings": warned, "spec": spec})
                    );
                } else {
                    let runs: Vec<&str> = support
                        .iter()
                        .filter(|s| s.unsupported.is_none())
                        .map(|s| s.target.as_str())
                        .collect();
                    let grads: Vec<&str> = support
                        .iter()
                        .filter(|s| s.backward_unsupported.is_none())
                        .map(|s| s.target.as_str())
                        .collect();
                    println!(
                        "{shown}: ok ({} `{}`); runs on {}; gradients on {}",
                        spec.family.name(),
                        spec.name,
                        runs.join(", "),
                        grads.join(", ")
                    );
                    for s in &support {
                        if let Some(why) = &s.unsupported {
                            println!("  not on {}: {why}", s.target);
                        }
                    }
                }
            }
            Err(e) => {
                failed += 1;
                if args.json {
                    println!(
                        "{}",
                        json!({"file": shown.to_string(), "ok": false, "error": e.to_string()})
                    );
                } else {
                    eprintln!("{e}");
                }
            }
        }
    }
    if failed > 0 {
        if !args.json {
            eprintln!("{failed} of {} spec file(s) invalid", args.files.len());
        }
        return Ok(ExitCode::FAILURE);
    }
    Ok(ExitCode::SUCCESS)
}
