use crate::report;
use anyhow::{bail, Context, Result};
use mixc::dsl::{DType, MixerSpec};
use mixc::runtime::check::{CheckReport, GradCheckReport};
use mixc::runtime::ring::Sharding;
use mixc::runtime::{inputs, io, reference, MixerInputs, Tensor};
use mixc::{ConfigSource, Device, Gradients, HostElem, Mixer, Options, OutElem, Output};
use serde_json::json;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

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

impl Backend {
    /// The library's device for this choice.
    pub fn device(self) -> Device {
        match self {
            Backend::Auto => Device::Auto,
            Backend::Reference => Device::Reference,
            Backend::Cpu => Device::Cpu,
            Backend::Cuda => Device::Cuda(0),
        }
    }
}

/// The backend a run actually uses, once `auto` is resolved.
pub use mixc::BackendKind as Resolved;

fn device_of(kind: Resolved) -> Device {
    match kind {
        Resolved::Reference => Device::Reference,
        Resolved::Cpu => Device::Cpu,
        Resolved::Cuda => Device::Cuda(0),
    }
}

/// Resolves `auto` (and checks `cuda` can run), with a one-line note on stderr
/// saying what `auto` picked unless `quiet`.
pub fn resolve_backend(backend: Backend, quiet: bool) -> Result<Resolved> {
    let (kind, note) = mixc::runtime::mixer::resolve(backend.device())?;
    if let Some(note) = note.filter(|_| !quiet) {
        eprintln!("backend auto: {note}");
    }
    Ok(kind)
}

/// How to execute one run, whatever the backend.
#[derive(Clone, Debug)]
pub struct ExecOptions {
    pub backend: Resolved,
    /// Ring ranks (CPU ranks or CUDA virtual ranks / devices).
    pub ranks: usize,
    /// `None`: zigzag for causal masks, else contiguous.
    pub sharding: Option<Sharding>,
    /// Storage type of q/k/v on the device (the CPU backend computes in f32).
    pub dtype: DType,
}

/// The mixer for `spec` with these options: compiled once, called by every
/// repetition. A torchrun-style environment (`WORLD_SIZE` > 1) makes it one
/// process of a multi-process ring, which only the CUDA backend runs (the
/// library refuses it elsewhere instead of computing the whole problem in
/// every process).
pub fn build_mixer(spec: &MixerSpec, opts: &ExecOptions) -> Result<Mixer> {
    if opts.ranks == 0 {
        bail!("--ranks must be at least 1");
    }
    let world = mixc::runtime::cuda::dist::DistEnv::from_env()?;
    let options = Options {
        device: device_of(opts.backend),
        dtype: Some(opts.dtype),
        ranks: opts.ranks,
        sharding: opts.sharding,
        world,
        ..Options::default()
    };
    Ok(Mixer::new(spec, options)?)
}

/// One call of `mixer`; a tuning-cache note (an unusable entry) becomes a
/// warning on stderr.
pub fn execute<E: HostElem + OutElem>(mixer: &Mixer, inputs: &MixerInputs<E>) -> Result<Output<E>> {
    let out = mixer.forward(inputs)?;
    if let ConfigSource::Default { note: Some(note) } = &out.config_source {
        eprintln!("warning: {note}");
    }
    Ok(out)
}

/// Where the tiles came from, in words: `tuned (PATH)`, `default`, `explicit`.
pub fn source_text(source: &ConfigSource) -> String {
    match source {
        ConfigSource::Tuned { path } => format!("tuned ({path})"),
        ConfigSource::Explicit => "explicit".to_string(),
        ConfigSource::Default { .. } => "default".to_string(),
    }
}

/// `--sharding` (validated by clap) as the library's value.
pub fn parse_sharding(s: Option<&str>) -> Option<Sharding> {
    s.map(|s| {
        if s == "zigzag" {
            Sharding::Zigzag
        } else {
            Sharding::Contiguous
        }
    })
}

/// Runs `f`; on a terminal (and unless `quiet`), a spinner saying `what`
/// appears once it has taken more than a second.
pub fn with_spinner<T>(what: &str, quiet: bool, f: impl FnOnce() -> T) -> T {
    use std::io::IsTerminal;
    if quiet || !std::io::stderr().is_terminal() {
        return f();
    }
    let (done_tx, done_rx) = std::sync::mpsc::channel::<()>();
    std::thread::scope(|s| {
        s.spawn(move || {
            if done_rx.recv_timeout(Duration::from_secs(1)).is_ok() {
                return;
            }
            let bar = indicatif::ProgressBar::new_spinner();
            bar.set_message(what.to_string());
            bar.enable_steady_tick(Duration::from_millis(120));
            // Until `f` finishes (the sender is dropped or sends).
            let _ = done_rx.recv();
            bar.finish_and_clear();
        });
        let out = f();
        let _ = done_tx.send(());
        out
    })
}

/// A progress bar that appears on a terminal only once the work has taken
/// more than a second (and never when `quiet`).
struct LazyBar {
    template: &'static str,
    quiet: bool,
    started: Instant,
    bar: std::sync::Mutex<Option<indicatif::ProgressBar>>,
}

impl LazyBar {
    fn new(template: &'static str, quiet: bool) -> LazyBar {
        LazyBar {
            template,
            quiet,
            started: Instant::now(),
            bar: std::sync::Mutex::new(None),
        }
    }
    fn update(&self, done: u64, total: u64) {
        if self.quiet || self.started.elapsed().as_secs_f64() < 1.0 {
            return;
        }
        let mut bar = self.bar.lock().unwrap_or_else(|e| e.into_inner());
        let b = bar.get_or_insert_with(|| {
            let b = indicatif::ProgressBar::new(total);
            b.set_style(
                indicatif::ProgressStyle::with_template(self.template)
                    .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
            );
            b
        });
        b.set_position(done);
    }
    fn finish(self) {
        if let Some(b) = self.bar.into_inner().unwrap_or_else(|e| e.into_inner()) {
            b.finish_and_clear();
        }
    }
}

/// Compares `output` with the f64 reference (the documented sample, or
/// everything with `full`), with a progress bar on a terminal when the
/// reference takes more than a second.
/// `mixc run --varlen`: a packed batch of random sequences, forward, and
/// with --check each sequence against the reference run on it alone.
fn run_varlen(
    args: &Args,
    spec: &mixc::MixerSpec,
    mixer: &Mixer,
    opts: &ExecOptions,
    lengths: &[usize],
) -> Result<ExitCode> {
    if lengths.is_empty() {
        bail!("--varlen needs at least one sequence length");
    }
    if args.batch != 1 {
        bail!("--varlen packs its sequences into batch 1; --batch does not apply");
    }
    let varlen = mixc::Varlen::from_lengths(lengths)?;
    let total = varlen.total_q();
    if total == 0 {
        bail!("--varlen: the sequences hold no token");
    }
    mixer.admit(1, total)?;
    let dtype = mixer.dtype();
    let mut inputs = mixc::runtime::inputs::random_varlen_inputs(spec, &varlen, args.seed);
    inputs::round_to_dtype(&mut inputs, dtype)?;
    let what = format!(
        "running {} on {}: {} packed sequences, {total} tokens",
        spec.name,
        opts.backend.name(),
        lengths.len()
    );
    let run = with_spinner(&what, args.json, || -> Result<_> {
        Ok(mixer.forward_varlen(&inputs, &varlen)?)
    })?;
    let mut worst: Option<CheckReport> = None;
    if let Some(mode) = args.check.as_deref() {
        for s in 0..varlen.sequences() {
            let rows = varlen.q_rows(s);
            if rows.is_empty() {
                continue;
            }
            let part = varlen.part(spec, &inputs, s);
            let o = mixc::runtime::varlen::rows(&run.o, &rows);
            let c = check_output(mixer, &part, &o, mode == "full", true)?;
            let worse = worst.as_ref().is_none_or(|w| {
                // A NaN error is the worst.
                c.max_rel_error.is_nan()
                    || c.max_rel_error > w.max_rel_error
                    || c.non_finite > w.non_finite
            });
            if worse {
                worst = Some(c);
            }
        }
    }
    let tokens = total as f64;
    let tolerance = reference::check_tolerance(mixer.compute_dtype());
    if args.json {
        println!(
            "{}",
            json!({
                "spec": spec.name,
                "family": spec.family.name(),
                "backend": opts.backend.name(),
                "dtype": dtype.name(),
                "compute_dtype": mixer.compute_dtype().name(),
                "varlen": lengths,
                "tokens": total,
                "seconds": run.seconds,
                "wall_seconds": run.wall_seconds,
                "tokens_per_s": tokens / run.seconds,
                "config": run.config,
                "max_rel_error": worst.as_ref().map(|c| c.max_rel_error),
                "tolerance": worst.is_some().then_some(tolerance),
                "output_shape": run.o.shape,
            })
        );
    } else {
        println!(
            "{} ({}) on {}: {} packed sequences ({} tokens) in {:.3} s ({:.0} tokens/s)",
            spec.name,
            spec.family.name(),
            opts.backend.name(),
            lengths.len(),
            total,
            run.seconds,
            tokens / run.seconds
        );
        if let Some(c) = &worst {
            println!(
                "check: max relative error {:.3e} vs f64 reference, each sequence alone \
                 (tolerance {tolerance:.0e})",
                c.max_rel_error
            );
        }
    }
    match &worst {
        Some(c) if !c.passed() => {
            eprintln!(
                "error: check failed: max relative error {:.3e} exceeds {tolerance:.0e}",
                c.max_rel_error
            );
            Ok(ExitCode::FAILURE)
        }
        _ => Ok(ExitCode::SUCCESS),
    }
}

pub fn check_output<E: HostElem>(
    mixer: &Mixer,
    inputs: &MixerInputs<E>,
    output: &Tensor<E>,
    full: bool,
    quiet: bool,
) -> Result<CheckReport> {
    let plan = mixer.check_plan(inputs.seq, full);
    let bar = LazyBar::new(
        "check: f64 reference {bar:30} {pos}/{len} rows ({eta} left)",
        quiet,
    );
    let report = mixer.check(inputs, output, &plan, &|d, t| bar.update(d, t))?;
    bar.finish();
    Ok(report)
}

/// Compares the gradients with the f64 reference gradients (sampled kv
/// heads, or all with `full`), with a progress bar as [`check_output`].
fn check_grads(
    mixer: &Mixer,
    inputs: &MixerInputs,
    d_o: &Tensor<f32>,
    grads: &Gradients<f32>,
    full: bool,
    quiet: bool,
) -> Result<GradCheckReport> {
    let plan = mixer.grad_check_plan(full);
    let bar = LazyBar::new(
        "check: f64 reference gradients {bar:30} {pos}/{len} heads ({eta} left)",
        quiet,
    );
    let report = mixer.check_gradients(inputs, d_o, grads, &plan, &|d, t| bar.update(d, t))?;
    bar.finish();
    Ok(report)
}

#[derive(clap::Args)]
pub struct Args {
    /// Spec file (`.mix`).
    pub(crate) file: PathBuf,
    #[arg(long, value_enum, default_value = "auto")]
    pub(crate) backend: Backend,
    /// Sequence length of the random inputs (taken from the file with --inputs).
    #[arg(long, required_unless_present_any = ["inputs", "varlen"])]
    pub(crate) seq: Option<usize>,
    /// A packed variable-length batch of random sequences of these lengths
    /// (e.g. `100,37,2048`): concatenated along the sequence axis (batch 1),
    /// each attending only within itself, its positions restarting at 0.
    /// With --check each sequence is compared with the f64 reference run on
    /// it alone. Forward only.
    #[arg(long, value_delimiter = ',', value_name = "LENGTHS",
          conflicts_with_all = ["seq", "kv_seq", "q_offset", "inputs", "grad", "save"])]
    pub(crate) varlen: Option<Vec<usize>>,
    /// Run against a paged KV cache: the keys and values cut into pages of
    /// PAGE_SIZE positions, placed in a shuffled order and read through a
    /// block table (as vLLM and FlashInfer store them). Each batch row's
    /// queries are its newest positions; --check compares with the
    /// reference on the contiguous cache. Forward only.
    #[arg(long, value_name = "PAGE_SIZE", conflicts_with_all = ["varlen", "q_offset", "grad"])]
    pub(crate) paged: Option<usize>,
    /// Key/value length of the random inputs (default: --seq). With fewer
    /// queries than keys the queries are the last positions (a decode step
    /// or a prefill chunk against a KV cache); see --q-offset.
    #[arg(long, requires = "seq")]
    pub(crate) kv_seq: Option<usize>,
    /// Position of the first query among the keys (default: kv_seq - seq,
    /// the queries being the newest tokens; 0 when there are more queries
    /// than keys). Masks, biases and decay see these positions.
    #[arg(long)]
    pub(crate) q_offset: Option<usize>,
    /// Batch size of the random inputs.
    #[arg(long, default_value_t = 1)]
    pub(crate) batch: usize,
    /// Seed of the random inputs.
    #[arg(long, default_value_t = 0)]
    pub(crate) seed: u64,
    /// Override a shape of the spec for this run: heads, kv_heads, head_dim,
    /// value_dim (repeatable), e.g. `--set heads=8 --set kv_heads=2`.
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub(crate) set: Vec<String>,
    /// Storage type of q, k, v (default: the spec's `dtype`). Random and
    /// `--inputs` values are rounded to it, so every backend and the reference
    /// see the same values; a value it cannot hold (an f16 70000) is refused.
    #[arg(long, value_parser = ["f16", "bf16", "f32"])]
    pub(crate) dtype: Option<String>,
    /// Read q, k, v and the declared inputs from a safetensors file.
    #[arg(long, conflicts_with_all = ["seq", "batch", "seed"])]
    pub(crate) inputs: Option<PathBuf>,
    /// Write the output `o` ([batch, seq, heads, value_dim]) and the
    /// inputs to a safetensors file (q, k, v and o in the run's storage
    /// type: bf16 or f16 for a CPU forward of that --dtype, else f32; with
    /// --grad also `do` and the gradients
    /// `dq`, `dk`, `dv`, `d<input>`, each in its input's layout). Block
    /// files: `x`, `out` ([batch, seq, width]), every weight under its name,
    /// and with --grad `dout` and `grad.<name>` for x and each weight.
    #[arg(long)]
    pub(crate) save: Option<PathBuf>,
    /// Also run the backward pass: the gradients of sum(o * do) for q, k, v
    /// and every float input, with `do` read from --inputs when the file
    /// holds a tensor `do`, else seeded random (standard normal). With
    /// --check the gradients are compared with the f64 reference too
    /// (tolerance relative to each gradient's max |ref|: f32 5e-4, f16 1e-2,
    /// bf16 5e-2); a sampled check covers all positions of 2-4 kv heads
    /// and their query heads.
    #[arg(long)]
    pub(crate) grad: bool,
    /// Ranks of the ring, each owning a shard of the sequence (CPU: worker
    /// threads; CUDA: virtual ranks dealt round-robin onto the visible GPUs).
    #[arg(long, default_value_t = 1)]
    pub(crate) ranks: usize,
    /// How the sequence is sharded over ranks (default: zigzag for causal masks).
    #[arg(long, value_parser = ["contiguous", "zigzag"])]
    pub(crate) sharding: Option<String>,
    /// Compare against the f64 reference and fail beyond the tolerance of the
    /// compute type (relative to max |ref|: f32 2e-4, f16 2e-3, bf16 1e-2).
    /// `--check` compares a sample (all rows and heads of small runs; else
    /// 256 rows including the first, the last and every rank boundary, and 4
    /// heads); `--check full` compares everything.
    #[arg(long, num_args = 0..=1, default_missing_value = "sample", value_parser = ["sample", "full"])]
    pub(crate) check: Option<String>,
    /// Block files: read the block's weights from a safetensors file
    /// (Hugging Face Llama names; default: seeded random weights).
    #[arg(long)]
    pub(crate) weights: Option<PathBuf>,
    /// Block files: the prefix of the weights' names in --weights, e.g.
    /// `model.layers.3.` for layer 3 of a whole checkpoint.
    #[arg(long, default_value = "", requires = "weights")]
    pub(crate) weights_prefix: String,
    /// Block files: rows (batch x positions) per block of the blockwise
    /// schedule (default 512).
    #[arg(long)]
    pub(crate) block_rows: Option<usize>,
    /// Print one JSON object instead of text.
    #[arg(long)]
    pub(crate) json: bool,
}

pub use mixc::runtime::reference::check_tolerance;

/// `seq 300`, or `seq 4 x kv_seq 4096` (with `@ offset` when the queries
/// are not the last positions).
fn lengths<E: HostElem>(x: &MixerInputs<E>) -> String {
    if x.is_self_aligned() {
        format!("seq {}", x.seq)
    } else if x.q_offset == x.kv_seq.saturating_sub(x.seq) {
        format!("seq {} x kv_seq {}", x.seq, x.kv_seq)
    } else {
        format!(
            "seq {} x kv_seq {} @ offset {}",
            x.seq, x.kv_seq, x.q_offset
        )
    }
}

pub fn main(args: Args) -> Result<ExitCode> {
    super::print_warnings(&args.file);
    let mut spec =
        match mixc::dsl::parse_any_file(&args.file).map_err(|e| anyhow::anyhow!("{e}"))? {
            mixc::dsl::SpecFile::Mixer(spec) => spec,
            mixc::dsl::SpecFile::Block(block) => return super::run_block::main(&args, block),
        };
    for (set, flag) in [
        (args.weights.is_some(), "--weights"),
        (args.block_rows.is_some(), "--block-rows"),
    ] {
        if set {
            bail!(
                "{flag} applies to block files; {} defines a mixer",
                args.file.display()
            );
        }
    }
    super::apply_shape_overrides(&mut spec, &args.set)?;
    let dtype = match &args.dtype {
        Some(d) => DType::parse(d).context("unknown --dtype")?,
        None => spec.dtype,
    };
    if args.ranks == 0 {
        bail!("--ranks must be at least 1");
    }
    let opts = ExecOptions {
        backend: resolve_backend(args.backend, args.json)?,
        ranks: args.ranks,
        sharding: parse_sharding(args.sharding.as_deref()),
        dtype,
    };
    // Compiled (and its memory estimated) before any input is made.
    let mixer = build_mixer(&spec, &opts)?;
    if args.grad {
        mixer.backward_support()?;
    }
    if let Some(lengths) = &args.varlen {
        return run_varlen(&args, &spec, &mixer, &opts, lengths);
    }
    if args.paged == Some(0) {
        bail!("--paged takes a page size of at least 1 position");
    }
    // A forward on the CPU keeps q, k, v and o in a 16-bit dtype as such
    // (half the host memory); gradients and paged runs take f32 tensors.
    let plain = !args.grad && args.paged.is_none();
    match mixer.host_dtype() {
        DType::Bf16 if plain => run_stored::<mixc::bf16>(&args, &spec, &mixer, &opts),
        DType::F16 if plain => run_stored::<mixc::f16>(&args, &spec, &mixer, &opts),
        _ => run_stored::<f32>(&args, &spec, &mixer, &opts),
    }
}

/// `mixc run` of one input set whose q, k, v and output are stored as `E`.
fn run_stored<E: HostElem + OutElem>(
    args: &Args,
    spec: &mixc::MixerSpec,
    mixer: &Mixer,
    opts: &ExecOptions,
) -> Result<ExitCode> {
    let dtype = opts.dtype;
    let mut d_o_file = None;
    let inputs: MixerInputs<E> = match &args.inputs {
        Some(path) => {
            let (inputs, mut more) = io::load_inputs_with(path, spec, &["do"])?;
            d_o_file = more.remove("do");
            if inputs.batch == 0 || inputs.seq == 0 || inputs.kv_seq == 0 {
                bail!(
                    "{}: the inputs hold batch {} x seq {} x kv_seq {}: nothing to run \
                     (batch and lengths must be at least 1, as with --batch and --seq)",
                    path.display(),
                    inputs.batch,
                    inputs.seq,
                    inputs.kv_seq
                );
            }
            // Given inputs hold what the storage type can: every backend and
            // the reference see the values a GPU run stores.
            inputs::into_storage(inputs, dtype)?
        }
        None => {
            let seq = args.seq.context("--seq is required without --inputs")?;
            let kv_seq = args.kv_seq.unwrap_or(seq);
            if seq == 0 || kv_seq == 0 || args.batch == 0 {
                bail!("--seq, --kv-seq and --batch must be at least 1");
            }
            if args.grad {
                mixer.admit_train(args.batch, seq.max(kv_seq))?;
            } else {
                mixer.admit_kv(args.batch, seq, kv_seq)?;
            }
            // Rounded to the dtype as made (see `into_storage`).
            let x: MixerInputs<E> =
                inputs::random_inputs_kv_as(spec, args.batch, seq, kv_seq, args.seed);
            if E::DTYPE == dtype {
                x
            } else {
                inputs::into_storage(x.convert(), dtype)?
            }
        }
    };
    let inputs = match args.q_offset {
        Some(offset) => inputs.with_q_offset(offset),
        None => inputs,
    };
    if args.ranks > inputs.kv_seq {
        bail!(
            "--ranks {} must be between 1 and the key length {}",
            args.ranks,
            inputs.kv_seq
        );
    }
    let what = format!(
        "running {} on {}: batch {} x {}",
        spec.name,
        opts.backend.name(),
        inputs.batch,
        lengths(&inputs)
    );
    let (run, backward) = if args.grad {
        let d_o = match d_o_file {
            Some(d) => d,
            None => inputs::random_upstream(spec, inputs.batch, inputs.seq, args.seed),
        };
        let (run, back) = with_spinner(&what, args.json, || -> Result<_> {
            let x = inputs.to_f32();
            let (run, saved) = mixer.forward_train(&x)?;
            let back = mixer.backward(&x, &run.o, &saved, &d_o)?;
            Ok((run.into_elem(), back))
        })?;
        (run, Some((d_o, back)))
    } else {
        let run = match args.paged {
            Some(page) => with_spinner(&what, args.json, || -> Result<_> {
                let x = inputs.to_f32();
                let pages = mixc::Pages::from_contiguous(&x.k, &x.v, page, args.seed)?;
                Ok(mixer
                    .forward_paged(&x.q, &pages.as_paged(), &x.extra)?
                    .into_elem())
            })?,
            None => with_spinner(&what, args.json, || execute(mixer, &inputs))?,
        };
        (run, None)
    };
    if run.dist_rank.is_some_and(|(rank, _)| rank != 0) {
        // This rank's rows went to rank 0, which checks, saves and reports;
        // the backend already printed this rank's one-line summary.
        return Ok(ExitCode::SUCCESS);
    }
    let (output, seconds) = (&run.o, run.seconds);
    let check = match args.check.as_deref() {
        Some(mode) => Some(check_output(
            mixer,
            &inputs,
            output,
            mode == "full",
            args.json,
        )?),
        None => None,
    };
    let tolerance = check.as_ref().map_or_else(
        || reference::check_tolerance(mixer.compute_dtype()),
        |c| c.tolerance,
    );
    let grad_check = match (&backward, args.check.as_deref()) {
        (Some((d_o, back)), Some(mode)) => Some(check_grads(
            mixer,
            &inputs.to_f32(),
            d_o,
            &back.grads,
            mode == "full",
            args.json,
        )?),
        _ => None,
    };

    // A run that failed its check never replaces the file it would save
    // to: its results go beside it, under a name that says so.
    let check_failed = check.as_ref().is_some_and(|c| !c.passed())
        || grad_check.as_ref().is_some_and(|c| !c.passed());
    let save_path = args.save.as_ref().map(|p| {
        if check_failed {
            failed_name(p)
        } else {
            p.clone()
        }
    });
    if let Some(path) = &save_path {
        let more: Vec<(String, &Tensor<f32>)> = match &backward {
            Some((d_o, back)) => std::iter::once(("do".to_string(), d_o))
                .chain(back.grads.named())
                .collect(),
            None => Vec::new(),
        };
        io::save_tensors_with(path, Some(&inputs), output, &more)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    let backend = opts.backend.name();
    let tokens = (inputs.batch * inputs.seq) as f64;
    let useful_pairs =
        mixc::runtime::pairs::useful_pairs_per_head(spec, &inputs) * u64::from(spec.heads);
    let max_rel_error = check.as_ref().map(|c| c.max_rel_error);
    let summary = json!({
        "spec": spec.name,
        "family": spec.family.name(),
        "backend": backend,
        "dtype": dtype.name(),
        "batch": inputs.batch,
        "seq": inputs.seq,
        "kv_seq": inputs.kv_seq,
        "q_offset": inputs.q_offset,
        "heads": spec.heads,
        "kv_heads": spec.kv_heads,
        "head_dim": spec.head_dim,
        "value_dim": spec.value_dim,
        "ranks": opts.ranks,
        "seconds": seconds,
        "wall_seconds": run.wall_seconds,
        "config": run.config,
        "config_source": source_text(&run.config_source),
        "tokens_per_s": tokens / seconds,
        // One definition with `bench`: useful (unmasked) pairs, not the
        // pairs of the tiles computed (those are `pairs_per_rank`).
        "useful_pairs": useful_pairs,
        "useful_tflops": useful_pairs as f64 * report::flops_per_pair(spec) / seconds / 1e12,
        "pairs_per_rank": run.pairs_per_rank,
        "input_bytes": input_bytes(&inputs),
        "output_bytes": output.numel() * std::mem::size_of::<E>(),
        "max_rel_error": max_rel_error,
        "tolerance": check.is_some().then_some(tolerance),
        "compute_dtype": mixer.compute_dtype().name(),
        "checked": check.as_ref().map(|c| c.compared.clone()),
        "check_full": check.as_ref().map(|c| c.full),
        "output_shape": output.shape,
        "peak_rss_bytes": report::peak_rss_bytes(),
        "saved": save_path.as_ref().map(|p| p.display().to_string()),
        "backward_seconds": backward.as_ref().map(|(_, b)| b.seconds),
        "backward_config": backward.as_ref().map(|(_, b)| b.config.clone()),
        "backward_config_source": backward.as_ref().map(|(_, b)| source_text(&b.config_source)),
        "gradients": backward.as_ref().map(|(_, b)| {
            b.grads.named().into_iter().map(|(n, _)| n).collect::<Vec<_>>()
        }),
        "grad_errors": grad_check.as_ref().map(|c| {
            c.errors.iter().cloned().collect::<std::collections::BTreeMap<_, _>>()
        }),
        "grad_tolerance": grad_check.as_ref().map(|c| c.tolerance),
        "grad_checked": grad_check.as_ref().map(|c| c.compared.clone()),
        "grad_skipped": grad_check.as_ref().map(|c| c.skipped.clone()),
    });
    if args.json {
        println!("{summary}");
    } else {
        println!(
            "{} ({}) on {backend}: batch {} x {} in {:.3} s ({:.0} tokens/s)",
            spec.name,
            spec.family.name(),
            inputs.batch,
            lengths(&inputs),
            seconds,
            tokens / seconds
        );
        println!(
            "config: {} ({})",
            run.config,
            source_text(&run.config_source)
        );
        if let Some(c) = &check {
            println!(
                "check: max relative error {:.3e} vs f64 reference (tolerance {tolerance:.0e}) \
                 over {}{}",
                c.max_rel_error,
                c.compared,
                if c.full {
                    ""
                } else {
                    "; --check full compares everything"
                }
            );
        }
        if let Some((_, b)) = &backward {
            let names: Vec<String> = b.grads.named().into_iter().map(|(n, _)| n).collect();
            println!(
                "backward: {} in {:.3} s; config: {} ({})",
                names.join(", "),
                b.seconds,
                b.config,
                source_text(&b.config_source)
            );
        }
        if let Some(c) = &grad_check {
            let each: Vec<String> = c
                .errors
                .iter()
                .map(|(n, e)| format!("{n} {e:.1e}"))
                .collect();
            println!(
                "check (gradients): max relative error {:.3e} ({}) vs f64 reference \
                 (tolerance {:.0e}) over {}{}{}",
                c.max_rel_error(),
                each.join(", "),
                c.tolerance,
                c.compared,
                if c.skipped.is_empty() {
                    String::new()
                } else {
                    format!("; {} compared only by --check full", c.skipped.join(", "))
                },
                if c.full || !c.skipped.is_empty() {
                    ""
                } else {
                    "; --check full compares every head"
                }
            );
        }
        if let Some(p) = &save_path {
            println!("wrote {}", p.display());
        }
    }
    if let (true, Some(orig), Some(p)) = (check_failed, &args.save, &save_path) {
        eprintln!(
            "note: --check failed, so {} was left as it was; this run's tensors are in {}",
            orig.display(),
            p.display()
        );
    }
    if grad_check.as_ref().is_some_and(|c| !c.passed()) {
        eprintln!(
            "error: --check failed: a gradient's relative error is above {:.0e}",
            grad_check.as_ref().map_or(0.0, |c| c.tolerance)
        );
        return Ok(ExitCode::FAILURE);
    }
    // NaN must fail too, hence not `e > tol`.
    if let Some(c) = check.as_ref().filter(|c| !c.passed()) {
        if c.non_finite > 0 {
            eprintln!(
                "error: --check failed: the output holds {} NaN or infinite value(s)",
                c.non_finite
            );
        } else {
            eprintln!("error: --check failed: relative error above {tolerance:.0e}");
        }
        return Ok(ExitCode::FAILURE);
    }
    Ok(ExitCode::SUCCESS)
}

pub fn input_bytes<E: HostElem>(inputs: &MixerInputs<E>) -> usize {
    inputs.qkv_bytes() + inputs.extra_bytes()
}

/// `out.safetensors` -> `out.failed.safetensors` (beside it).
pub(crate) fn failed_name(p: &std::path::Path) -> PathBuf {
    let stem = p
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default();
    let name = match p.extension() {
        Some(ext) => format!("{stem}.failed.{}", ext.to_string_lossy()),
        None => format!("{stem}.failed"),
    };
    p.with_file_name(name)
}
