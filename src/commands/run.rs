use crate::report;
use anyhow::{bail, Context, Result};
use mixc_runtime::{inputs, io, reference, MixerInputs, Tensor};
use serde_json::json;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Backend {
    /// CUDA when a GPU is usable, else the CPU backend.
    Auto,
    /// The f64 reference evaluator (quadratic, for checking).
    Reference,
    /// The blocked/ring CPU backend.
    Cpu,
    /// The CUDA backend (needs a GPU and its driver).
    Cuda,
}

#[derive(clap::Args)]
pub struct Args {
    /// Spec file (`.mix`).
    file: PathBuf,
    #[arg(long, value_enum, default_value = "auto")]
    backend: Backend,
    /// Sequence length of the random inputs (taken from the file with --inputs).
    #[arg(long, required_unless_present = "inputs")]
    seq: Option<usize>,
    /// Batch size of the random inputs.
    #[arg(long, default_value_t = 1)]
    batch: usize,
    /// Seed of the random inputs.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Read q, k, v and the declared inputs from a safetensors file.
    #[arg(long, conflicts_with_all = ["seq", "batch", "seed"])]
    inputs: Option<PathBuf>,
    /// Write the output `o` ([batch, seq, heads, value_dim], f32) and the inputs to a safetensors file.
    #[arg(long)]
    save: Option<PathBuf>,
    /// Print one JSON object instead of text.
    #[arg(long)]
    json: bool,
}

pub fn main(args: Args) -> Result<ExitCode> {
    let spec = super::load_spec(&args.file)?;
    let inputs: MixerInputs = match &args.inputs {
        Some(path) => io::load_inputs(path, &spec)?,
        None => {
            let seq = args.seq.context("--seq is required without --inputs")?;
            if seq == 0 || args.batch == 0 {
                bail!("--seq and --batch must be at least 1");
            }
            inputs::random_inputs(&spec, args.batch, seq, args.seed)
        }
    };
    let backend = match args.backend {
        Backend::Reference => "reference",
        other => bail!(
            "backend `{}` is not available in this build yet; use --backend reference",
            match other {
                Backend::Auto => "auto",
                Backend::Cpu => "cpu",
                _ => "cuda",
            }
        ),
    };

    let start = Instant::now();
    let out64 = reference::evaluate(&spec, &inputs)?;
    let seconds = start.elapsed().as_secs_f64();
    let output = Tensor::new(out64.shape.clone(), out64.data.iter().map(|&x| x as f32).collect());

    if let Some(path) = &args.save {
        io::save_tensors(path, Some(&inputs), &output)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    let tokens = (inputs.batch * inputs.seq) as f64;
    let summary = json!({
        "spec": spec.name,
        "family": spec.family.name(),
        "backend": backend,
        "batch": inputs.batch,
        "seq": inputs.seq,
        "seconds": seconds,
        "tokens_per_s": tokens / seconds,
        "output_shape": output.shape,
        "peak_rss_bytes": report::peak_rss_bytes(),
        "saved": args.save.as_ref().map(|p| p.display().to_string()),
    });
    if args.json {
        println!("{summary}");
    } else {
        println!(
            "{} ({}) on {backend}: batch {} x seq {} in {:.3} s ({:.0} tokens/s)",
            spec.name,
            spec.family.name(),
            inputs.batch,
            inputs.seq,
            seconds,
            tokens / seconds
        );
        if let Some(p) = &args.save {
            println!("wrote {}", p.display());
        }
    }
    Ok(ExitCode::SUCCESS)
}
