//! `mixc bench`: times specs over a grid of sequence lengths and dtypes.
//!
//! Each point (spec, L, dtype) gets fresh seeded inputs, `--warmup` untimed
//! runs, then `--reps` timed runs of [`run::execute`]; the table reports the
//! median. On CUDA the time is the GPU time of the launches (CUDA events),
//! on the other backends the wall time of the computation. Useful TFLOP/s counts only unmasked (query, key) pairs, counted
//! exactly from the mask (so masked variants and partially masked tiles are
//! not flattered), times [`report::flops_per_pair`].

use super::run::{self, Backend, ExecOptions, Resolved};
use crate::report;
use anyhow::{bail, Context, Result};
use mixc::dsl::{BlockSpec, DType, MixerSpec, SpecFile};
use mixc::runtime::inputs;
use mixc::{HostElem, Mixer, MixerInputs, OutElem};
use serde::Serialize;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

#[derive(clap::Args)]
pub struct Args {
    /// Spec files (`.mix`): mixers, or transformer blocks (timed blockwise
    /// on the CPU backend: forward, backward or a training step).
    #[arg(required_unless_present = "peak")]
    files: Vec<PathBuf>,
    /// Sequence lengths, comma-separated; `k` means 1024 (e.g. `1k,4k,16k`).
    #[arg(long, required_unless_present_any = ["inputs", "peak"], value_delimiter = ',', value_parser = parse_seq)]
    seq: Vec<usize>,
    /// Measure this machine's limit instead: the CPU backend's own tile
    /// products (f32, and bf16 where the CPU has AVX-512 BF16) on in-cache
    /// tiles on every core, in GFLOP/s.
    #[arg(long, conflicts_with_all = ["files", "seq", "inputs"])]
    peak: bool,
    /// Time on the q, k, v and declared inputs of this safetensors file (as
    /// `mixc run --inputs`) instead of random ones; batch and L come from it.
    /// Lets a peer (PyTorch) and mixc run on the same data.
    #[arg(long, conflicts_with_all = ["seq", "batch", "seed"])]
    inputs: Option<PathBuf>,
    /// Storage types of q, k, v, comma-separated (default: each spec's `dtype`).
    #[arg(long, value_delimiter = ',', value_parser = ["f16", "bf16", "f32"])]
    dtype: Vec<String>,
    #[arg(long, value_enum, default_value = "auto")]
    backend: Backend,
    /// Batch size.
    #[arg(long, default_value_t = 1)]
    batch: usize,
    /// Override a shape of every spec: heads, kv_heads, head_dim, value_dim
    /// (repeatable), e.g. `--set heads=8 --set head_dim=128`.
    #[arg(long = "set", value_name = "KEY=VALUE")]
    set: Vec<String>,
    /// Ranks of the ring (CPU worker threads or CUDA virtual ranks).
    #[arg(long, default_value_t = 1)]
    ranks: usize,
    /// How the sequence is sharded over ranks (default: zigzag for causal masks).
    #[arg(long, value_parser = ["contiguous", "zigzag"])]
    sharding: Option<String>,
    /// Timed repetitions per point (the table shows their median).
    #[arg(long, default_value_t = 5)]
    reps: usize,
    /// Untimed runs before the timed ones (thread pools, kernel loading, caches).
    #[arg(long, default_value_t = 1)]
    warmup: usize,
    /// Stop repeating a point once its timed runs add up to this many seconds
    /// (at least one timed run is always made).
    #[arg(long, value_name = "SECONDS")]
    max_time: Option<f64>,
    /// Seed of the random inputs.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Compare the first run of every point with the f64 reference (sampled
    /// rows for long sequences) and fail beyond the `mixc run --check` tolerance.
    #[arg(long)]
    check: bool,
    /// Record a failing point (e.g. out of memory) in its row and go on with
    /// the others; the exit status is still a failure.
    #[arg(long)]
    keep_going: bool,
    /// What is timed: the forward pass (`fwd`), the backward pass alone
    /// (`bwd`: each repetition runs an untimed forward first), or both
    /// (`fwdbwd`). Useful TFLOP/s count the backward as 2.5 forwards (its
    /// five matrix products to the forward's two), as FlashAttention does.
    #[arg(long, value_enum, default_value = "fwd")]
    pass: Pass,
    /// Decode steps: each --seq length is a KV cache that N new queries
    /// (default 1) attend to, the queries being its last N positions. Rows
    /// then report `kv_bytes_per_s`: bytes of K and V read per second, the
    /// figure of merit of a step bound by memory bandwidth.
    #[arg(long, value_name = "N", num_args = 0..=1, default_missing_value = "1")]
    decode: Option<usize>,
    /// Print one JSON document instead of the table.
    #[arg(long)]
    json: bool,
    /// Also write the JSON document to this file.
    #[arg(long)]
    out: Option<PathBuf>,
}

#[derive(Clone, Copy, PartialEq, Eq, Debug, clap::ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Pass {
    Fwd,
    Bwd,
    Fwdbwd,
}

impl Pass {
    fn name(self) -> &'static str {
        match self {
            Pass::Fwd => "fwd",
            Pass::Bwd => "bwd",
            Pass::Fwdbwd => "fwdbwd",
        }
    }
    /// Useful FLOPs of the pass in units of one forward.
    fn forwards(self) -> f64 {
        match self {
            Pass::Fwd => 1.0,
            Pass::Bwd => 2.5,
            Pass::Fwdbwd => 3.5,
        }
    }
}

/// `4096`, `4k` (= 4096) or `1m` (= 1048576).
fn parse_seq(s: &str) -> std::result::Result<usize, String> {
    let t = s.trim().to_ascii_lowercase();
    let (digits, mult) = match t.strip_suffix('k') {
        Some(d) => (d, 1024),
        None => match t.strip_suffix('m') {
            Some(d) => (d, 1024 * 1024),
            None => (t.as_str(), 1),
        },
    };
    digits
        .parse::<usize>()
        .ok()
        .and_then(|n| n.checked_mul(mult))
        .filter(|&n| n >= 1)
        .ok_or_else(|| format!("`{s}` is not a sequence length (e.g. 4096 or 4k)"))
}

/// One measured point of the grid.
#[derive(Debug, Clone, Serialize)]
pub struct Row {
    pub spec: String,
    pub file: String,
    pub family: String,
    pub backend: String,
    pub dtype: String,
    pub batch: usize,
    /// Queries per batch row.
    pub seq: usize,
    /// Keys per batch row (`seq` unless `--decode`).
    pub kv_seq: usize,
    pub heads: u32,
    pub kv_heads: u32,
    pub head_dim: u32,
    pub value_dim: u32,
    pub ranks: usize,
    /// What was timed: `fwd`, `bwd` or `fwdbwd`.
    pub pass: Pass,
    /// Timed runs actually made (fewer than `--reps` under `--max-time`).
    pub reps: usize,
    /// What `median_s` measures: `cuda-events` (GPU time of the launches) or
    /// `wall` (the computation, host clock).
    pub clock: String,
    /// Tile configuration used, and whether it came from the tuning cache.
    pub config: Option<String>,
    pub config_source: Option<String>,
    pub median_s: Option<f64>,
    pub min_s: Option<f64>,
    pub max_s: Option<f64>,
    pub times_s: Vec<f64>,
    /// Median host wall time of the whole execution (on CUDA: with module
    /// loading, uploads and download).
    pub wall_median_s: Option<f64>,
    pub tokens_per_s: Option<f64>,
    /// Unmasked (query, key) pairs over batch and heads.
    pub useful_pairs: u64,
    pub useful_tflops: Option<f64>,
    /// Pairs the backend computed (whole non-skipped tiles), where it counts them.
    pub computed_pairs: Option<u64>,
    pub input_bytes: usize,
    pub output_bytes: usize,
    /// Bytes of K and V (in the storage type) read per second of the median.
    pub kv_bytes_per_s: Option<f64>,
    /// Peak resident memory of this point (the high-water mark is reset before
    /// each point where Linux allows it, see `peak_rss_is_per_point`).
    pub peak_rss_bytes: Option<u64>,
    pub peak_rss_is_per_point: bool,
    pub max_rel_error: Option<f64>,
    pub tolerance: Option<f64>,
    pub error: Option<String>,
}

/// Resets this process's peak-RSS high-water mark (`VmHWM`), so each point
/// reports its own peak rather than the largest so far. Linux >= 4.0.
fn reset_peak_rss() -> bool {
    std::fs::write("/proc/self/clear_refs", "5").is_ok()
}

fn median(sorted: &[f64]) -> f64 {
    let n = sorted.len();
    if n % 2 == 1 {
        sorted[n / 2]
    } else {
        0.5 * (sorted[n / 2 - 1] + sorted[n / 2])
    }
}

/// Fixed settings of a bench run, shared by every point.
struct Plan {
    backend: Resolved,
    opts_base: ExecOptions,
    reps: usize,
    warmup: usize,
    max_time: Option<f64>,
    batch: usize,
    check: bool,
    pass: Pass,
}

/// Where a point's inputs come from.
enum Source<'a> {
    /// `queries` new queries (all of `seq` when None) against `seq` keys.
    Random {
        seq: usize,
        queries: Option<usize>,
        seed: u64,
    },
    File(&'a std::path::Path),
}

/// Measures one (spec, L, dtype) point; `Err` for failures of the run itself
/// (the caller decides whether to go on).
fn measure(
    plan: &Plan,
    file: &str,
    spec: &MixerSpec,
    source: &Source,
    dtype: DType,
) -> Result<Row> {
    let per_point = reset_peak_rss();
    let opts = ExecOptions {
        dtype,
        ..plan.opts_base.clone()
    };
    // Compiled once per point (every repetition calls the same mixer), and
    // its memory estimated before the inputs are made.
    let mixer = run::build_mixer(spec, &opts)?;
    // A forward on the CPU keeps q, k, v and o in a 16-bit dtype as such,
    // as `mixc run` does.
    match (mixer.host_dtype(), plan.pass) {
        (DType::Bf16, Pass::Fwd) => {
            measure_stored::<mixc::bf16>(plan, file, spec, source, &mixer, per_point)
        }
        (DType::F16, Pass::Fwd) => {
            measure_stored::<mixc::f16>(plan, file, spec, source, &mixer, per_point)
        }
        _ => measure_stored::<f32>(plan, file, spec, source, &mixer, per_point),
    }
}

/// [`measure`] with q, k, v and the output stored as `E`.
fn measure_stored<E: HostElem + OutElem>(
    plan: &Plan,
    file: &str,
    spec: &MixerSpec,
    source: &Source,
    mixer: &Mixer,
    per_point: bool,
) -> Result<Row> {
    let dtype = mixer.dtype();
    let inputs: MixerInputs<E> = match *source {
        Source::Random { seq, queries, seed } => {
            let nq = queries.unwrap_or(seq);
            if plan.pass == Pass::Fwd {
                mixer.admit_kv(plan.batch, nq, seq)?;
            } else {
                mixer.admit_train(plan.batch, seq)?;
            }
            let x: MixerInputs<E> = inputs::random_inputs_kv_as(spec, plan.batch, nq, seq, seed);
            if E::DTYPE == dtype {
                x
            } else {
                inputs::into_storage(x.convert(), dtype)?
            }
        }
        Source::File(path) => {
            inputs::into_storage(mixc::runtime::io::load_inputs(path, spec)?, dtype)?
        }
    };
    let (batch, seq) = (inputs.batch, inputs.seq);
    if plan.opts_base.ranks > inputs.kv_seq {
        bail!(
            "--ranks {} is more than the sequence length {}",
            plan.opts_base.ranks,
            inputs.kv_seq
        );
    }
    let mut max_rel_error = None;
    let mut computed_pairs = None;
    let mut output_bytes = 0;
    let mut first = true;
    let mut config = None;
    if plan.pass != Pass::Fwd {
        mixer.backward_support()?;
    }
    let d_o = match plan.pass {
        Pass::Fwd => None,
        _ => Some(inputs::random_upstream(spec, batch, seq, 1)),
    };
    // One repetition: the forward's report and the (timed, wall) seconds of
    // the pass; the first also records the point's facts and checks.
    let mut once = || -> Result<(f64, f64)> {
        let (exec, back) = match &d_o {
            None => (run::execute(mixer, &inputs)?, None),
            Some(d_o) => {
                let x = inputs.to_f32();
                let (exec, saved) = mixer.forward_train(&x)?;
                let back = mixer.backward(&x, &exec.o, &saved, d_o)?;
                (exec.into_elem(), Some((d_o, back)))
            }
        };
        if first {
            first = false;
            output_bytes = exec.o.numel() * std::mem::size_of::<E>();
            config = Some((exec.config.clone(), run::source_text(&exec.config_source)));
            computed_pairs = exec.pairs_per_rank.as_ref().map(|p| p.iter().sum());
            if plan.check {
                max_rel_error = Some(match &back {
                    None => run::check_output(mixer, &inputs, &exec.o, false, true)?.max_rel_error,
                    Some((d_o, back)) => mixer
                        .check_gradients(
                            &inputs.to_f32(),
                            d_o,
                            &back.grads,
                            &mixer.grad_check_plan(false),
                            &|_, _| {},
                        )?
                        .max_rel_error(),
                });
            }
        }
        Ok(match (&back, plan.pass) {
            (None, _) => (exec.seconds, exec.wall_seconds),
            (Some((_, b)), Pass::Bwd) => (b.seconds, b.seconds),
            (Some((_, b)), _) => (exec.seconds + b.seconds, exec.wall_seconds + b.seconds),
        })
    };
    let Timing {
        times,
        sorted,
        med,
        wall,
    } = time_reps(plan, &mut once)?;
    let useful_pairs =
        mixc::runtime::pairs::useful_pairs_per_head(spec, &inputs) * u64::from(spec.heads);
    // The storage type on CUDA; f32 or better on the reference and the CPU
    // backend, but bf16 products there for bf16 storage where the CPU has them.
    let compute = mixer.compute_dtype();
    Ok(Row {
        reps: times.len(),
        clock: clock(plan.backend).to_string(),
        config: config.as_ref().map(|c| c.0.clone()),
        config_source: config.map(|c| c.1),
        median_s: Some(med),
        wall_median_s: Some(median(&wall)),
        min_s: sorted.first().copied(),
        max_s: sorted.last().copied(),
        times_s: times,
        tokens_per_s: Some((batch * seq) as f64 / med),
        useful_pairs,
        useful_tflops: Some(
            useful_pairs as f64 * report::flops_per_pair(spec) * plan.pass.forwards() / med / 1e12,
        ),
        computed_pairs,
        input_bytes: run::input_bytes(&inputs),
        output_bytes,
        kv_bytes_per_s: Some(
            (inputs.k.numel() + inputs.v.numel()) as f64 * dtype.size_bytes() as f64 / med,
        ),
        kv_seq: inputs.kv_seq,
        peak_rss_bytes: report::peak_rss_bytes(),
        peak_rss_is_per_point: per_point,
        max_rel_error,
        tolerance: plan.check.then(|| match plan.pass {
            // A 16-bit output is rounded once more (see `check::compare`).
            Pass::Fwd => run::check_tolerance(compute).max(run::check_tolerance(E::DTYPE)),
            _ => mixc::runtime::check::grad_tolerance(compute),
        }),
        error: None,
        batch,
        ..empty_row(plan, file, spec, seq, dtype)
    })
}

/// The repetitions of one point: `times` in run order, `sorted`, their
/// median, and the sorted wall times.
struct Timing {
    times: Vec<f64>,
    sorted: Vec<f64>,
    med: f64,
    wall: Vec<f64>,
}

/// `--warmup` untimed runs of `once`, then up to `--reps` timed ones (fewer
/// once `--max-time` is spent; at least one).
fn time_reps(plan: &Plan, once: &mut dyn FnMut() -> Result<(f64, f64)>) -> Result<Timing> {
    for _ in 0..plan.warmup {
        once()?;
    }
    let mut times = Vec::with_capacity(plan.reps);
    let mut wall = Vec::with_capacity(plan.reps);
    let started = Instant::now();
    for _ in 0..plan.reps.max(1) {
        // Compute time (CUDA: GPU time of the launches, which a peer such as
        // PyTorch also reports without uploads or module loading).
        let (t, w) = once()?;
        times.push(t);
        wall.push(w);
        if plan
            .max_time
            .is_some_and(|t| started.elapsed().as_secs_f64() >= t)
        {
            break;
        }
    }
    let mut sorted = times.clone();
    sorted.sort_by(f64::total_cmp);
    let med = median(&sorted);
    wall.sort_by(f64::total_cmp);
    Ok(Timing {
        times,
        sorted,
        med,
        wall,
    })
}

/// Measures one transformer block at length `seq`: the blockwise CPU
/// block's forward, backward or both (`--pass`), with `--check` comparing
/// the first run with the f64 unfused block. Useful FLOPs: the
/// projections and the FFN (a backward counts 2 forwards of them, the
/// recomputation not counted) plus the mixer's unmasked pairs.
fn measure_block(plan: &Plan, file: &str, spec: &BlockSpec, seq: usize, seed: u64) -> Result<Row> {
    use mixc::runtime::block::{random_block_inputs, random_block_upstream, Block, BlockWeights};
    let per_point = reset_peak_rss();
    let device = match plan.backend {
        Resolved::Reference => mixc::Device::Reference,
        _ => mixc::Device::Cpu,
    };
    let options = mixc::Options {
        device,
        ranks: plan.opts_base.ranks,
        sharding: plan.opts_base.sharding,
        ..mixc::Options::default()
    };
    let block = Block::new(spec, options)?;
    mixc::runtime::memory::admit_host(block.train_host_bytes(plan.batch, seq)?)?;
    let weights = BlockWeights::random(spec, seed);
    let x = random_block_inputs(spec, plan.batch, seq, seed);
    let d_out = (plan.pass != Pass::Fwd).then(|| random_block_upstream(spec, plan.batch, seq, 1));
    let mut max_rel_error = None;
    let mut first = true;
    let mut once = || -> Result<(f64, f64)> {
        let (out, back) = match &d_out {
            None => (block.forward(&x, &weights)?, None),
            Some(g) => {
                let (out, saved) = block.forward_train(&x, &weights)?;
                (out, Some(block.backward(&x, &weights, &saved, g)?))
            }
        };
        if first && plan.check {
            max_rel_error = Some(
                match (&back, &d_out) {
                    (Some(b), Some(g)) => block.check_gradients(&x, &weights, g, &b.grads)?,
                    _ => block.check(&x, &weights, &out.out)?,
                }
                .max_rel_error(),
            );
        }
        first = false;
        let t = match (&back, plan.pass) {
            (None, _) => out.seconds,
            (Some(b), Pass::Bwd) => b.seconds,
            (Some(b), _) => out.seconds + b.seconds,
        };
        Ok((t, t))
    };
    let Timing {
        times,
        sorted,
        med,
        wall,
    } = time_reps(plan, &mut once)?;
    let m = &spec.mixer;
    let mixer_inputs = mixc::MixerInputs::self_attention(
        plan.batch,
        seq,
        inputs::empty_tensor(),
        inputs::empty_tensor(),
        inputs::empty_tensor(),
        Default::default(),
    );
    let useful_pairs =
        mixc::runtime::pairs::useful_pairs_per_head(m, &mixer_inputs) * u64::from(m.heads);
    let tokens = (plan.batch * seq) as f64;
    let dense = tokens * report::block_flops_per_token(spec);
    let mixer = useful_pairs as f64 * report::flops_per_pair(m);
    let flops = match plan.pass {
        Pass::Fwd => dense + mixer,
        Pass::Bwd => 2.0 * dense + 2.5 * mixer,
        Pass::Fwdbwd => 3.0 * dense + 3.5 * mixer,
    };
    let row = empty_row(plan, file, m, seq, DType::F32);
    Ok(Row {
        spec: spec.name.clone(),
        family: "block".into(),
        backend: block.backend().name().to_string(),
        reps: times.len(),
        clock: "wall".into(),
        config: Some(format!("block_rows {}", block.block_rows())),
        config_source: Some("default".into()),
        median_s: Some(med),
        wall_median_s: Some(median(&wall)),
        min_s: sorted.first().copied(),
        max_s: sorted.last().copied(),
        times_s: times,
        tokens_per_s: Some(tokens / med),
        useful_pairs,
        useful_tflops: Some(flops / med / 1e12),
        input_bytes: x.x.numel() * 4,
        output_bytes: x.x.numel() * 4,
        peak_rss_bytes: report::peak_rss_bytes(),
        peak_rss_is_per_point: per_point,
        max_rel_error,
        tolerance: plan.check.then(|| match plan.pass {
            Pass::Fwd => run::check_tolerance(DType::F32),
            _ => mixc::runtime::check::grad_tolerance(DType::F32),
        }),
        ..row
    })
}

fn empty_row(plan: &Plan, file: &str, spec: &MixerSpec, seq: usize, dtype: DType) -> Row {
    Row {
        spec: spec.name.clone(),
        file: file.to_string(),
        family: spec.family.name().to_string(),
        backend: plan.backend.name().to_string(),
        dtype: dtype.name().to_string(),
        batch: plan.batch,
        seq,
        kv_seq: seq,
        heads: spec.heads,
        kv_heads: spec.kv_heads,
        head_dim: spec.head_dim,
        value_dim: spec.value_dim,
        ranks: plan.opts_base.ranks,
        pass: plan.pass,
        reps: 0,
        clock: clock(plan.backend).to_string(),
        config: None,
        config_source: None,
        median_s: None,
        wall_median_s: None,
        min_s: None,
        max_s: None,
        times_s: Vec::new(),
        tokens_per_s: None,
        useful_pairs: 0,
        useful_tflops: None,
        computed_pairs: None,
        input_bytes: 0,
        output_bytes: 0,
        kv_bytes_per_s: None,
        peak_rss_bytes: None,
        peak_rss_is_per_point: false,
        max_rel_error: None,
        tolerance: None,
        error: None,
    }
}

fn clock(backend: Resolved) -> &'static str {
    if backend == Resolved::Cuda {
        "cuda-events"
    } else {
        "wall"
    }
}

fn fmt_time(s: f64) -> String {
    if s >= 1.0 {
        format!("{s:.3} s")
    } else if s >= 1e-3 {
        format!("{:.3} ms", s * 1e3)
    } else {
        format!("{:.1} us", s * 1e6)
    }
}

const HEADER: &str = "| spec | L | dtype | backend | ranks | pass | median | tokens/s | useful TFLOP/s | peak RSS | check |\n\
                      | --- | ---: | --- | --- | ---: | --- | ---: | ---: | ---: | ---: | --- |";

/// One markdown table row (the table is valid markdown, so it can be pasted).
fn table_line(r: &Row) -> String {
    let check = match (r.max_rel_error, r.tolerance) {
        (Some(e), Some(t)) if e <= t => format!("ok {e:.1e}"),
        (Some(e), _) => format!("FAIL {e:.1e}"),
        _ => "-".into(),
    };
    // A decode point: `queries x keys`, and the K/V read rate with the time.
    let len = if r.kv_seq == r.seq {
        r.seq.to_string()
    } else {
        format!("{} x {}", r.seq, r.kv_seq)
    };
    let time = match (r.median_s, r.kv_bytes_per_s) {
        (Some(t), Some(bw)) if r.kv_seq != r.seq => {
            format!("{} ({:.1} GB/s K/V)", fmt_time(t), bw / 1e9)
        }
        (t, _) => t.map_or("-".into(), fmt_time),
    };
    match &r.error {
        Some(e) => format!(
            "| {} | {len} | {} | {} | {} | {} | error: {e} | | | | |",
            r.spec,
            r.dtype,
            r.backend,
            r.ranks,
            r.pass.name()
        ),
        None => format!(
            "| {} | {len} | {} | {} | {} | {} | {time} | {:.0} | {:.4} | {} | {check} |",
            r.spec,
            r.dtype,
            r.backend,
            r.ranks,
            r.pass.name(),
            r.tokens_per_s.unwrap_or(0.0),
            r.useful_tflops.unwrap_or(0.0),
            r.peak_rss_bytes
                .map_or("-".into(), |b| format!("{:.0} MiB", b as f64 / 1048576.0)),
        ),
    }
}

pub fn main(args: Args) -> Result<ExitCode> {
    if args.peak {
        return peak(&args);
    }
    if args.batch == 0 {
        bail!("--batch must be at least 1");
    }
    if args.reps == 0 {
        bail!("--reps must be at least 1");
    }
    if args.max_time.is_some_and(|t| t.is_nan() || t <= 0.0) {
        bail!("--max-time must be a positive number of seconds");
    }
    if args.ranks == 0 {
        bail!("--ranks must be at least 1");
    }
    if let Some(&min_seq) = args.seq.iter().min() {
        if args.ranks > min_seq {
            bail!(
                "--ranks {} must be between 1 and the shortest --seq {min_seq}",
                args.ranks
            );
        }
    }
    // Load every spec first: a typo in the last file should not cost a long run.
    let mut specs = Vec::new();
    for file in &args.files {
        let loaded = mixc::dsl::parse_any_file(file).map_err(|e| anyhow::anyhow!("{e}"))?;
        let shown = file.display().to_string();
        match loaded {
            SpecFile::Mixer(mut spec) => {
                super::apply_shape_overrides(&mut spec, &args.set)
                    .with_context(|| shown.clone())?;
                specs.push((shown, SpecFile::Mixer(spec)));
            }
            SpecFile::Block(block) => {
                for (set, flag) in [
                    (!args.set.is_empty(), "--set"),
                    (!args.dtype.is_empty(), "--dtype"),
                    (args.decode.is_some(), "--decode"),
                    (args.inputs.is_some(), "--inputs"),
                ] {
                    if set {
                        bail!(
                            "{flag} does not apply to block file {shown} (block `{}`)",
                            block.name
                        );
                    }
                }
                specs.push((shown, SpecFile::Block(block)));
            }
        }
    }
    let dtypes: Vec<Option<DType>> = if args.dtype.is_empty() {
        vec![None]
    } else {
        args.dtype
            .iter()
            .map(|d| DType::parse(d).map(Some).context("unknown --dtype"))
            .collect::<Result<_>>()?
    };
    let backend = run::resolve_backend(args.backend, args.json)?;
    let plan = Plan {
        backend,
        opts_base: ExecOptions {
            backend,
            ranks: args.ranks,
            sharding: run::parse_sharding(args.sharding.as_deref()),
            dtype: DType::F32,
        },
        reps: args.reps,
        warmup: args.warmup,
        max_time: args.max_time,
        batch: args.batch,
        check: args.check,
        pass: args.pass,
    };

    if !args.json {
        println!("{HEADER}");
    }
    let mut rows = Vec::new();
    let mut failed = false;
    // With --inputs the file decides L (0 in rows that fail before reading it).
    let sources: Vec<(usize, Source)> = match &args.inputs {
        Some(path) => vec![(0, Source::File(path))],
        None => args
            .seq
            .iter()
            .map(|&seq| {
                let (seed, queries) = (args.seed, args.decode);
                (seq, Source::Random { seq, queries, seed })
            })
            .collect(),
    };
    for (file, loaded) in &specs {
        for (seq, source) in &sources {
            let seq = *seq;
            let spec = loaded.mixer();
            // A block computes in f32 whatever --dtype says (refused above).
            let block_dtypes = [None];
            let point_dtypes = match loaded {
                SpecFile::Block(_) => &block_dtypes[..],
                SpecFile::Mixer(_) => &dtypes[..],
            };
            for dtype in point_dtypes {
                let dtype = dtype.unwrap_or(spec.dtype);
                let measured = match loaded {
                    SpecFile::Block(block) => measure_block(&plan, file, block, seq, args.seed),
                    SpecFile::Mixer(spec) => measure(&plan, file, spec, source, dtype),
                };
                let row = match measured {
                    Ok(row) => row,
                    Err(e) if args.keep_going => Row {
                        spec: loaded.name().to_string(),
                        error: Some(format!("{e:#}")),
                        ..empty_row(&plan, file, spec, seq, dtype)
                    },
                    Err(e) => {
                        return Err(e).with_context(|| {
                            format!("{} at L = {seq}, {}", spec.name, dtype.name())
                        })
                    }
                };
                let bad_check = row
                    .max_rel_error
                    .zip(row.tolerance)
                    .is_some_and(|(e, t)| e.is_nan() || e > t);
                failed |= row.error.is_some() || bad_check;
                if !args.json {
                    println!("{}", table_line(&row));
                }
                rows.push(row);
            }
        }
    }

    let doc = serde_json::json!({
        "mixc_version": env!("CARGO_PKG_VERSION"),
        "backend": backend.name(),
        "batch": args.batch,
        "ranks": args.ranks,
        "reps": args.reps,
        "warmup": args.warmup,
        "seed": args.seed,
        "pass": args.pass,
        "rows": rows,
    });
    if let Some(path) = &args.out {
        let text = serde_json::to_string_pretty(&doc)?;
        std::fs::write(path, text + "\n").with_context(|| format!("writing {}", path.display()))?;
    }
    if args.json {
        println!("{doc}");
    } else if let Some(path) = &args.out {
        println!("wrote {}", path.display());
    }
    if failed {
        eprintln!("error: some points failed (see the table's error / check columns)");
        return Ok(ExitCode::FAILURE);
    }
    Ok(ExitCode::SUCCESS)
}

/// `--peak`: the tile products' rates on every core (`--threads` of the
/// CPU backend's default: all of them).
fn peak(args: &Args) -> Result<ExitCode> {
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let p = mixc::runtime::cpu::peak::peak_rates(threads, std::time::Duration::from_millis(300));
    if args.json {
        println!("{}", serde_json::to_string(&p)?);
    } else {
        println!(
            "CPU tile products on {} threads ({}): f32 {:.1} GFLOP/s, bf16 {}",
            p.threads,
            p.isa,
            p.f32_gflops,
            p.bf16_gflops.map_or(
                "not on this CPU (no AVX-512 BF16, or MIXC_CPU_BF16=0)".into(),
                |g| format!("{g:.1} GFLOP/s")
            )
        );
    }
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seq_lengths_parse_with_suffixes_and_reject_junk() {
        assert_eq!(parse_seq("4096"), Ok(4096));
        assert_eq!(parse_seq("4k"), Ok(4096));
        assert_eq!(parse_seq("64K"), Ok(65536));
        assert_eq!(parse_seq("1m"), Ok(1 << 20));
        for bad in ["", "0", "k", "-4", "4x", "1.5k"] {
            assert!(parse_seq(bad).is_err(), "{bad:?} should be rejected");
        }
    }

    #[test]
    fn median_of_odd_and_even_counts() {
        assert_eq!(median(&[1.0, 2.0, 9.0]), 2.0);
        assert_eq!(median(&[1.0, 2.0, 4.0, 9.0]), 3.0);
    }
}
