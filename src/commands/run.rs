use crate::report;
use anyhow::{bail, Context, Result};
use mixc_runtime::cpu::{self, CpuConfig, Precision};
use mixc_runtime::ring::Sharding;
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
    /// Ranks of the ring (CPU worker threads), each owning a shard of the sequence.
    #[arg(long, default_value_t = 1)]
    ranks: usize,
    /// How the sequence is sharded over ranks (default: zigzag for causal masks).
    #[arg(long, value_parser = ["contiguous", "zigzag"])]
    sharding: Option<String>,
    /// Compare against the f64 reference (on sampled query rows for long
    /// sequences) and fail beyond the tolerance (f32: 2e-4 relative to max |ref|).
    #[arg(long)]
    check: bool,
    /// Print one JSON object instead of text.
    #[arg(long)]
    json: bool,
}

/// Relative tolerance of `--check` for f32 compute (max |err| / max |ref|).
const F32_TOLERANCE: f64 = 2e-4;
/// Above this many query rows, `--check` compares a sample of rows.
const CHECK_FULL_ROWS: usize = 2048;

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
        // No CUDA launcher in this build yet: auto means the CPU backend.
        Backend::Auto | Backend::Cpu => "cpu",
        Backend::Cuda => bail!(
            "the CUDA backend cannot launch kernels in this build yet; \
             use --backend cpu (kernels can be generated and compiled with `mixc gen` / NVRTC)"
        ),
    };
    if args.backend == Backend::Auto && !args.json {
        eprintln!("backend auto: no CUDA launcher available, using the CPU backend");
    }

    let start = Instant::now();
    let (output, pairs_per_rank) = if backend == "reference" {
        let out64 = reference::evaluate(&spec, &inputs)?;
        let out = Tensor::new(
            out64.shape.clone(),
            out64.data.iter().map(|&x| x as f32).collect(),
        );
        (out, None)
    } else {
        let mut cfg = CpuConfig::default_for(&spec, inputs.seq);
        cfg.ranks = args.ranks;
        if let Some(s) = &args.sharding {
            cfg.sharding = if s == "zigzag" {
                Sharding::Zigzag
            } else {
                Sharding::Contiguous
            };
        }
        cfg.precision = Precision::F32;
        let run = cpu::run(&spec, &inputs, &cfg)?;
        (run.output.to_f32(), Some(run.stats.pairs_per_rank))
    };
    let seconds = start.elapsed().as_secs_f64();

    let max_rel_error = if args.check {
        let rows: Vec<usize> = if inputs.seq <= CHECK_FULL_ROWS {
            (0..inputs.seq).collect()
        } else {
            // Evenly spread rows plus both ends, where masks change shape.
            let n = 256;
            let mut r: Vec<usize> = (0..n).map(|k| k * (inputs.seq - 1) / (n - 1)).collect();
            r.dedup();
            r
        };
        let want = reference::evaluate_rows(&spec, &inputs, &rows)?;
        let (b, h, dv) = (inputs.batch, spec.heads as usize, spec.value_dim as usize);
        let mut max_err = 0f64;
        let mut max_ref = 0f64;
        for bi in 0..b {
            for (ri, &row) in rows.iter().enumerate() {
                for x in 0..h * dv {
                    let got = output.data[((bi * inputs.seq + row) * h) * dv + x] as f64;
                    let w = want.data[((bi * rows.len() + ri) * h) * dv + x];
                    max_err = max_err.max((got - w).abs());
                    max_ref = max_ref.max(w.abs());
                }
            }
        }
        Some(if max_ref > 0.0 {
            max_err / max_ref
        } else {
            max_err
        })
    } else {
        None
    };

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
        "tflops": pairs_per_rank.as_ref().map(|p| {
            p.iter().sum::<u64>() as f64 * report::flops_per_pair(&spec) / seconds / 1e12
        }),
        "pairs_per_rank": pairs_per_rank,
        "input_bytes": input_bytes(&inputs),
        "output_bytes": output.numel() * 4,
        "max_rel_error": max_rel_error,
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
        if let Some(e) = max_rel_error {
            println!("check: max relative error {e:.3e} vs f64 reference (tolerance {F32_TOLERANCE:.0e})");
        }
        if let Some(p) = &args.save {
            println!("wrote {}", p.display());
        }
    }
    // NaN must fail too, hence not `e > tol`.
    if max_rel_error.is_some_and(|e| e.is_nan() || e > F32_TOLERANCE) {
        eprintln!("error: --check failed: relative error above {F32_TOLERANCE:.0e}");
        return Ok(ExitCode::FAILURE);
    }
    Ok(ExitCode::SUCCESS)
}

fn input_bytes(inputs: &MixerInputs) -> usize {
    let extra: usize = inputs
        .extra
        .values()
        .map(|t| t.shape().iter().product::<usize>() * 4)
        .sum();
    (inputs.q.numel() + inputs.k.numel() + inputs.v.numel()) * 4 + extra
}
