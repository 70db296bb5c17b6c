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
        match mixc_dsl::parse_file(path) {
            Ok(spec) => {
                if args.json {
                    println!(
                        "{}",
                        json!({"file": shown.to_string(), "ok": true, "name": spec.name,
                               "family": spec.family.name(), "spec": spec})
                    );
                } else {
                    println!("{shown}: ok ({} `{}`)", spec.family.name(), spec.name);
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
