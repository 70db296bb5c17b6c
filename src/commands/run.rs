use crate::report;
use anyhow::{bail, Context, Result};
use mixc_dsl::{DType, MixerSpec};
use mixc_runtime::cpu::{self, CpuConfig, Precision};
use mixc_runtime::ring::Sharding;
use mixc_runtime::{inputs, io, reference, tune, MixerInputs, Tensor};
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

/// The backend a run actually uses, once `auto` is resolved.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Resolved {
    Reference,
    Cpu,
    Cuda,
}

impl Resolved {
    pub fn name(self) -> &'static str {
        match self {
            Resolved::Reference => "reference",
            Resolved::Cpu => "cpu",
            Resolved::Cuda => "cuda",
        }
    }
}

/// Resolves `auto` (and checks `cuda` can run), with a one-line note on stderr
/// saying what `auto` picked unless `quiet`.
pub fn resolve_backend(backend: Backend, quiet: bool) -> Result<Resolved> {
    Ok(match backend {
        Backend::Reference => Resolved::Reference,
        Backend::Cpu => Resolved::Cpu,
        // auto: CUDA when a GPU is usable, else the CPU backend, saying which and why.
        Backend::Auto => match mixc_runtime::cuda::probe() {
            Ok(info) => {
                if !quiet {
                    eprintln!("backend auto: using CUDA on {}", info.describe());
                }
                Resolved::Cuda
            }
            Err(e) => {
                if !quiet {
                    // The probe's reason without its advice, which is what auto does.
                    let e = e.to_string();
                    let why = e.split("; use --backend").next().unwrap_or(&e);
                    eprintln!("backend auto: using the CPU backend ({why})");
                }
                Resolved::Cpu
            }
        },
        Backend::Cuda => {
            mixc_runtime::cuda::probe()?;
            Resolved::Cuda
        }
    })
}

/// How to execute one run, whatever the backend.
#[derive(Clone, Debug)]
pub struct ExecOptions {
    pub backend: Resolved,
    /// Ring ranks (CPU worker threads or CUDA virtual ranks / devices).
    pub ranks: usize,
    /// `None`: zigzag for causal masks, else contiguous.
    pub sharding: Option<Sharding>,
    /// Storage type of q/k/v on the device (the CPU backend computes in f32).
    pub dtype: DType,
}

/// The result of [`execute`]: the output, how long the computation took
/// (excluding input generation and checking) and the work done.
pub struct Execution {
    pub output: Tensor<f32>,
    /// Compute time: CPU wall clock, or GPU time of the launches (CUDA events).
    pub seconds: f64,
    /// Wall time of the whole call (CUDA: compile or cache lookup, uploads, download).
    pub wall_seconds: f64,
    /// Unmasked (query, key) pairs computed by each rank, where the backend counts them.
    pub pairs_per_rank: Option<Vec<u64>>,
    /// The tile configuration used and where it came from (tuning cache or default).
    pub config: String,
    pub config_source: String,
    /// `(rank, world)` of a multi-process CUDA run (`WORLD_SIZE > 1`); only
    /// rank 0 holds the whole output.
    pub dist_rank: Option<(usize, usize)>,
}

/// Runs `spec` on `inputs` with the chosen backend; shared by `run`, `tune` and `bench`.
/// The tile configuration comes from the tuning cache (`mixc tune`) when it
/// holds an entry for this spec, shape bucket, dtype and device, else from
/// the documented heuristic default; an unusable entry gives a warning.
pub fn execute(spec: &MixerSpec, inputs: &MixerInputs, opts: &ExecOptions) -> Result<Execution> {
    if opts.ranks == 0 {
        bail!("--ranks must be at least 1");
    }
    let start = Instant::now();
    let mut seconds = None;
    let mut dist_rank = None;
    let (output, pairs_per_rank, config, source) = match opts.backend {
        Resolved::Reference => {
            let out64 = reference::evaluate(spec, inputs)?;
            let out = Tensor::new(
                out64.shape.clone(),
                out64.data.iter().map(|&x| x as f32).collect(),
            );
            (
                out,
                None,
                "f64 reference".to_string(),
                tune::Source::Default { note: None },
            )
        }
        Resolved::Cpu => {
            let (cfg, source) = cpu_config(spec, inputs, opts);
            let run = cpu::run(spec, inputs, &cfg)?;
            let desc = format!(
                "block {}x{}, chunk {}, {} threads",
                cfg.block_m, cfg.block_n, cfg.chunk, cfg.threads
            );
            (
                run.output.into_f32(),
                Some(run.stats.pairs_per_rank),
                desc,
                source,
            )
        }
        Resolved::Cuda => {
            let mut cfg = mixc_runtime::cuda::CudaOptions::default_for(spec);
            cfg.ranks = opts.ranks;
            cfg.dtype = opts.dtype;
            if let Some(s) = opts.sharding {
                cfg.sharding = s;
            }
            let source = match cuda_tuned_config(spec, inputs, opts.dtype) {
                Some((kc, source)) => {
                    cfg.config = Some(kc);
                    source
                }
                None => tune::Source::Default { note: None },
            };
            let run = mixc_runtime::cuda::run(spec, inputs, &cfg)?;
            seconds = Some(run.kernel_seconds);
            dist_rank = run.dist_rank;
            (
                run.output,
                run.pairs_per_rank,
                run.config.describe(),
                source,
            )
        }
    };
    let wall_seconds = start.elapsed().as_secs_f64();
    let config_source = match source {
        tune::Source::Cached { path } => format!("tuned ({})", path.display()),
        tune::Source::Default { note } => {
            if let Some(note) = note {
                eprintln!("warning: {note}");
            }
            "default".to_string()
        }
    };
    Ok(Execution {
        output,
        seconds: seconds.unwrap_or(wall_seconds),
        wall_seconds,
        pairs_per_rank,
        config,
        config_source,
        dist_rank,
    })
}

/// The CPU backend's configuration for a run: the tuned (or default) tiles
/// with the run's ranks and sharding. All ranks share this one value.
pub fn cpu_config(
    spec: &MixerSpec,
    inputs: &MixerInputs,
    opts: &ExecOptions,
) -> (CpuConfig, tune::Source) {
    let cache = tune::TuneCache::from_env();
    let choice = tune::cpu_config_in(cache.as_ref(), spec, inputs.batch, inputs.seq, opts.dtype);
    let mut cfg = choice.config;
    cfg.ranks = opts.ranks;
    if let Some(s) = opts.sharding {
        cfg.sharding = s;
    }
    cfg.precision = Precision::F32;
    (cfg, choice.source)
}

/// The tuned kernel configuration for GPU 0, if the device can be described;
/// otherwise the launcher's default (`None`).
fn cuda_tuned_config(
    spec: &MixerSpec,
    inputs: &MixerInputs,
    dtype: DType,
) -> Option<(mixc_codegen::KernelConfig, tune::Source)> {
    let device = tune::DeviceInfo::cuda(0).ok()?;
    let cc = device.compute_capability?;
    let arch = mixc_runtime::cuda::arch_for((cc as i32 / 10, cc as i32 % 10)).ok()?;
    let target = mixc_codegen::Target::new(arch, dtype);
    Some(tune::cuda_config_in(
        tune::TuneCache::from_env().as_ref(),
        spec,
        &target,
        inputs.batch,
        inputs.seq,
        device,
    ))
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
    /// Override a shape of the spec for this run: heads, kv_heads, head_dim,
    /// value_dim (repeatable), e.g. `--set heads=8 --set kv_heads=2`.
    #[arg(long = "set", value_name = "KEY=VALUE")]
    set: Vec<String>,
    /// Storage type of q, k, v (default: the spec's `dtype`). Random inputs are
    /// rounded to it, so every backend and the reference see the same values.
    #[arg(long, value_parser = ["f16", "bf16", "f32"])]
    dtype: Option<String>,
    /// Read q, k, v and the declared inputs from a safetensors file.
    #[arg(long, conflicts_with_all = ["seq", "batch", "seed"])]
    inputs: Option<PathBuf>,
    /// Write the output `o` ([batch, seq, heads, value_dim], f32) and the inputs to a safetensors file.
    #[arg(long)]
    save: Option<PathBuf>,
    /// Ranks of the ring, each owning a shard of the sequence (CPU: worker
    /// threads; CUDA: virtual ranks dealt round-robin onto the visible GPUs).
    #[arg(long, default_value_t = 1)]
    ranks: usize,
    /// How the sequence is sharded over ranks (default: zigzag for causal masks).
    #[arg(long, value_parser = ["contiguous", "zigzag"])]
    sharding: Option<String>,
    /// Compare against the f64 reference (on sampled query rows for long
    /// sequences) and fail beyond the tolerance of the compute type
    /// (relative to max |ref|: f32 2e-4, f16 2e-3, bf16 1e-2).
    #[arg(long)]
    check: bool,
    /// Print one JSON object instead of text.
    #[arg(long)]
    json: bool,
}

pub use mixc_runtime::reference::check_tolerance;

/// Above this many query rows, `--check` compares a sample of rows.
const CHECK_FULL_ROWS: usize = 2048;

pub fn main(args: Args) -> Result<ExitCode> {
    let mut spec = super::load_spec(&args.file)?;
    super::apply_shape_overrides(&mut spec, &args.set)?;
    let dtype = match &args.dtype {
        Some(d) => DType::parse(d).context("unknown --dtype")?,
        None => spec.dtype,
    };
    let inputs: MixerInputs = match &args.inputs {
        Some(path) => io::load_inputs(path, &spec)?,
        None => {
            let seq = args.seq.context("--seq is required without --inputs")?;
            if seq == 0 || args.batch == 0 {
                bail!("--seq and --batch must be at least 1");
            }
            let mut inputs = inputs::random_inputs(&spec, args.batch, seq, args.seed);
            inputs::round_to_dtype(&mut inputs, dtype);
            inputs
        }
    };
    if args.ranks == 0 || args.ranks > inputs.seq {
        bail!(
            "--ranks {} must be between 1 and the sequence length {}",
            args.ranks,
            inputs.seq
        );
    }
    let opts = ExecOptions {
        backend: resolve_backend(args.backend, args.json)?,
        ranks: args.ranks,
        sharding: args.sharding.as_deref().map(|s| {
            if s == "zigzag" {
                Sharding::Zigzag
            } else {
                Sharding::Contiguous
            }
        }),
        dtype,
    };
    let run = execute(&spec, &inputs, &opts)?;
    if run.dist_rank.is_some_and(|(rank, _)| rank != 0) {
        // This rank's rows went to rank 0, which checks, saves and reports;
        // the backend already printed this rank's one-line summary.
        return Ok(ExitCode::SUCCESS);
    }
    let (output, seconds) = (&run.output, run.seconds);
    // The CPU backend and the reference compute in f32 or better whatever the storage type.
    let compute = if opts.backend == Resolved::Cuda {
        dtype
    } else {
        DType::F32
    };
    let tolerance = check_tolerance(compute);
    let max_rel_error = if args.check {
        Some(check_against_reference(&spec, &inputs, output)?)
    } else {
        None
    };

    if let Some(path) = &args.save {
        io::save_tensors(path, Some(&inputs), output)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    let backend = opts.backend.name();
    let tokens = (inputs.batch * inputs.seq) as f64;
    let summary = json!({
        "spec": spec.name,
        "family": spec.family.name(),
        "backend": backend,
        "dtype": dtype.name(),
        "batch": inputs.batch,
        "seq": inputs.seq,
        "heads": spec.heads,
        "kv_heads": spec.kv_heads,
        "head_dim": spec.head_dim,
        "value_dim": spec.value_dim,
        "ranks": opts.ranks,
        "seconds": seconds,
        "wall_seconds": run.wall_seconds,
        "config": run.config,
        "config_source": run.config_source,
        "tokens_per_s": tokens / seconds,
        "tflops": run.pairs_per_rank.as_ref().map(|p| {
            p.iter().sum::<u64>() as f64 * report::flops_per_pair(&spec) / seconds / 1e12
        }),
        "pairs_per_rank": run.pairs_per_rank,
        "input_bytes": input_bytes(&inputs),
        "output_bytes": output.numel() * 4,
        "max_rel_error": max_rel_error,
        "tolerance": args.check.then_some(tolerance),
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
        println!("config: {} ({})", run.config, run.config_source);
        if let Some(e) = max_rel_error {
            println!(
                "check: max relative error {e:.3e} vs f64 reference (tolerance {tolerance:.0e})"
            );
        }
        if let Some(p) = &args.save {
            println!("wrote {}", p.display());
        }
    }
    // NaN must fail too, hence not `e > tol`.
    if max_rel_error.is_some_and(|e| e.is_nan() || e > tolerance) {
        eprintln!("error: --check failed: relative error above {tolerance:.0e}");
        return Ok(ExitCode::FAILURE);
    }
    Ok(ExitCode::SUCCESS)
}

/// Max |out - ref| / max |ref| over all rows, or over 256 evenly spread rows
/// (both ends included, where masks change shape) for long sequences.
pub fn check_against_reference(
    spec: &MixerSpec,
    inputs: &MixerInputs,
    output: &Tensor<f32>,
) -> Result<f64> {
    let rows: Vec<usize> = if inputs.seq <= CHECK_FULL_ROWS {
        (0..inputs.seq).collect()
    } else {
        let n = 256;
        let mut r: Vec<usize> = (0..n).map(|k| k * (inputs.seq - 1) / (n - 1)).collect();
        r.dedup();
        r
    };
    let want = reference::evaluate_rows(spec, inputs, &rows)?;
    let (b, h, dv) = (inputs.batch, spec.heads as usize, spec.value_dim as usize);
    let mut max_err = 0f64;
    let mut max_ref = 0f64;
    for bi in 0..b {
        for (ri, &row) in rows.iter().enumerate() {
            for x in 0..h * dv {
                let got = output.data[((bi * inputs.seq + row) * h) * dv + x] as f64;
                let w = want.data[((bi * rows.len() + ri) * h) * dv + x];
                // NaN in the output must surface, so no f64::max here.
                let err = (got - w).abs();
                if err.is_nan() || err > max_err {
                    max_err = err;
                }
                max_ref = max_ref.max(w.abs());
            }
        }
    }
    Ok(if max_ref > 0.0 {
        max_err / max_ref
    } else {
        max_err
    })
}

pub fn input_bytes(inputs: &MixerInputs) -> usize {
    let extra: usize = inputs
        .extra
        .values()
        .map(|t| t.shape().iter().product::<usize>() * 4)
        .sum();
    (inputs.q.numel() + inputs.k.numel() + inputs.v.numel()) * 4 + extra
}
