//! [`Mixer`]: a spec compiled once for one backend, called many times.
//!
//! `Mixer::new` does everything that depends only on the spec and the
//! options: it resolves the backend (`Device::Auto` probes for a GPU), checks
//! that the backend can run the spec ([`capabilities`]), and prepares it (CPU:
//! the plan and the worker pool; CUDA: code generation, NVRTC compilation
//! through the disk cache, module load on every GPU of the ring).
//! [`Mixer::forward`] then takes any batch and sequence length (and any
//! document ids, tables or gates the spec declares) with no code generation,
//! compilation, hashing, file I/O or module load. The one exception is the
//! tuned tile choice: with [`Tiles::Auto`] the first call in each shape
//! bucket (powers of two of batch and length, as `mixc tune` stores them)
//! looks the bucket up in the tuning cache once, and compiles its
//! configuration if it differs from the default.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use mixc_codegen::{KernelConfig, Target};
use mixc_dsl::ir::{DType, MixerSpec};
use serde::Serialize;

use crate::check::{CheckPlan, CheckReport, GradCheckPlan, GradCheckReport};
use crate::cpu::OutElem;
use crate::cpu::{CpuConfig, CpuMixer, Precision};
use crate::cuda::{dist::DistEnv, CudaMixer, CudaOptions};
use crate::error::{Result, RuntimeError};
use crate::grad::Gradients;
use crate::reference;
use crate::ring::{RingSchedule, Sharding, Transport};
use crate::tensor::{HostElem, MixerInputs, Tensor};
use crate::tune::{self, CpuTiles, Pass};
use crate::varlen::Varlen;

/// Where a [`Mixer`] runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize)]
pub enum Device {
    /// CUDA on GPU 0 when a GPU is usable, else the CPU backend.
    #[default]
    Auto,
    /// The blocked/ring CPU backend (f32 compute).
    Cpu,
    /// The CUDA backend, the ring's first rank on this GPU ordinal.
    Cuda(usize),
    /// The f64 reference evaluator (quadratic; for checking).
    Reference,
}

/// A backend, once [`Device::Auto`] is resolved.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum BackendKind {
    Reference,
    Cpu,
    Cuda,
}

impl BackendKind {
    pub const ALL: [BackendKind; 3] = [BackendKind::Reference, BackendKind::Cpu, BackendKind::Cuda];

    pub fn name(self) -> &'static str {
        match self {
            BackendKind::Reference => "reference",
            BackendKind::Cpu => "cpu",
            BackendKind::Cuda => "cuda",
        }
    }
}

/// Tile sizes.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub enum Tiles {
    /// The tuning cache's entry for the call's shape bucket (`mixc tune`),
    /// else the documented heuristic default.
    #[default]
    Auto,
    /// The heuristic default, ignoring the tuning cache.
    Default,
    /// Explicit CPU tiles (the CPU backend only).
    Cpu(CpuTiles),
    /// An explicit kernel configuration (the CUDA backend only).
    Cuda(KernelConfig),
}

/// How a [`Mixer`] is built. `Options::default()` is: device auto, the
/// spec's dtype, tuned-or-default tiles, one rank, zigzag sharding for
/// causal masks (else contiguous), every core, one process.
#[derive(Debug, Clone, Default)]
pub struct Options {
    pub device: Device,
    /// Storage type of q, k, v and the output on the GPU (`None`: the
    /// spec's). The CPU backend computes in f32 whatever this is; it only
    /// selects the tuning cache entry there.
    pub dtype: Option<DType>,
    pub tiles: Tiles,
    /// Ring ranks, each owning a shard of the sequence (CPU: ranks of one
    /// process; CUDA: virtual ranks dealt round-robin onto the visible GPUs).
    /// 0 is taken as 1.
    pub ranks: usize,
    /// `None`: zigzag for causal masks, else contiguous.
    pub sharding: Option<Sharding>,
    /// CPU worker threads (`None`: the tuned or default count, every core).
    pub threads: Option<usize>,
    /// This process's place in a multi-process ring (CUDA over NCCL). A
    /// world of more than one process on another backend is an error.
    pub world: Option<DistEnv>,
}

impl Options {
    /// Default options on `device`.
    pub fn on(device: Device) -> Options {
        Options {
            device,
            ..Options::default()
        }
    }

    pub fn with_ranks(mut self, ranks: usize) -> Options {
        self.ranks = ranks;
        self
    }

    pub fn with_dtype(mut self, dtype: DType) -> Options {
        self.dtype = Some(dtype);
        self
    }

    pub fn with_tiles(mut self, tiles: Tiles) -> Options {
        self.tiles = tiles;
        self
    }

    pub fn with_sharding(mut self, sharding: Sharding) -> Options {
        self.sharding = Some(sharding);
        self
    }

    pub fn with_threads(mut self, threads: usize) -> Options {
        self.threads = Some(threads);
        self
    }
}

/// Where the tiles of a call came from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum ConfigSource {
    /// A tuning cache entry (its file).
    Tuned { path: String },
    /// The heuristic default; `note` says why a cache entry was not used.
    Default { note: Option<String> },
    /// Given in [`Options::tiles`].
    Explicit,
}

/// What [`Mixer::forward`] returns.
#[derive(Debug, Clone)]
pub struct Output<E: HostElem = f32> {
    /// `[batch, seq, heads, value_dim]`, in the inputs' storage type. In a
    /// multi-process run only rank 0 holds the whole output
    /// ([`Output::dist_rank`]).
    pub o: Tensor<E>,
    /// Compute time in seconds: CPU wall clock of the run, or the GPU time of
    /// the launches (CUDA events).
    pub seconds: f64,
    /// Wall time of the whole call (CUDA: uploads and download included).
    pub wall_seconds: f64,
    /// Unmasked (batch row, head, query, key) pairs each rank computed,
    /// where the backend counts them.
    pub pairs_per_rank: Option<Vec<u64>>,
    /// The tiles used, in words, and where they came from.
    pub config: String,
    pub config_source: ConfigSource,
    /// `(rank, world size)` of a multi-process run.
    pub dist_rank: Option<(usize, usize)>,
}

impl Output {
    /// This output with `o` in the storage type `E` (moved when it is `E`).
    pub fn into_elem<E: HostElem>(self) -> Output<E> {
        Output {
            o: self.o.into_elem(),
            seconds: self.seconds,
            wall_seconds: self.wall_seconds,
            pairs_per_rank: self.pairs_per_rank,
            config: self.config,
            config_source: self.config_source,
            dist_rank: self.dist_rank,
        }
    }
}

/// What [`Mixer::forward_train`] keeps for [`Mixer::backward`] besides the
/// inputs and the output: each row's log-sum-exp (softmax) or weight sum
/// (sum normalisation), `[batch, heads, seq]` (empty for the reference,
/// which recomputes everything).
#[derive(Debug, Clone)]
pub struct Residuals {
    pub stat: Tensor<f64>,
    batch: usize,
    seq: usize,
}

impl Residuals {
    /// Residuals from a statistic a caller kept between the forward and the
    /// backward call (the Python binding keeps it as a tensor): `stat` as
    /// [`Mixer::forward_train`] returned it, for inputs of `batch x seq`.
    pub fn from_stat(stat: Tensor<f64>, batch: usize, seq: usize) -> Residuals {
        Residuals { stat, batch, seq }
    }

    /// What a forward of `inputs` kept (nothing: an empty statistic).
    fn kept<E: HostElem>(stat: Option<Tensor<f64>>, inputs: &MixerInputs<E>) -> Residuals {
        let stat = stat.unwrap_or_else(|| Tensor::new(vec![0], Vec::new()));
        Residuals::from_stat(stat, inputs.batch, inputs.seq)
    }

    /// No statistic (a backward that recomputes it, as the reference does).
    pub(crate) fn empty(batch: usize, seq: usize) -> Residuals {
        Residuals::from_stat(Tensor::new(vec![0], Vec::new()), batch, seq)
    }
}

/// What [`Mixer::backward`] returns.
#[derive(Debug, Clone)]
pub struct BackwardOutput {
    pub grads: Gradients<f32>,
    /// Time of the backward call: wall time on the host backends, the
    /// kernels' GPU time (CUDA events) on CUDA, as [`Output::seconds`].
    pub seconds: f64,
    /// The tiles the backward ran with, and where they came from (with
    /// [`Tiles::Auto`]: a backward entry of the tuning cache, `mixc tune
    /// --pass bwd`, else the default).
    pub config: String,
    pub config_source: ConfigSource,
}

/// A prepared backend for one tile choice.
enum Prepared {
    Reference,
    Cpu(Box<CpuMixer>),
    Cuda(Box<CudaMixer>),
    /// The base preparation, reported with another source (a cache note).
    Shared(Arc<Ready>),
}

impl Prepared {
    /// The preparation that runs: a shared one's base.
    fn runs(&self) -> &Prepared {
        match self {
            Prepared::Shared(base) => &base.prepared,
            p => p,
        }
    }
}

/// A preparation with the description and source of its tiles.
struct Ready {
    prepared: Prepared,
    config: String,
    source: ConfigSource,
}

/// A tile choice before preparation.
#[derive(Debug, Clone)]
enum Choice {
    Reference,
    Cpu(CpuConfig, ConfigSource),
    Cuda(CudaOptions, ConfigSource),
}

impl Choice {
    /// Whether both choices prepare the same thing.
    fn same_tiles(&self, other: &Choice) -> bool {
        match (self, other) {
            (Choice::Reference, Choice::Reference) => true,
            (Choice::Cpu(a, _), Choice::Cpu(b, _)) => a == b,
            (Choice::Cuda(a, _), Choice::Cuda(b, _)) => a == b,
            _ => false,
        }
    }

    /// Where the tiles come from (`None` for the reference).
    fn source(&self) -> Option<ConfigSource> {
        match self {
            Choice::Reference => None,
            Choice::Cpu(_, s) | Choice::Cuda(_, s) => Some(s.clone()),
        }
    }
}

/// A mixer spec compiled for one backend; see the module docs.
pub struct Mixer {
    spec: MixerSpec,
    opts: Options,
    backend: BackendKind,
    dtype: DType,
    auto_note: Option<String>,
    /// The preparation every call starts from (explicit or default tiles).
    base_choice: Choice,
    base: Arc<Ready>,
    /// With [`Tiles::Auto`]: the preparation per (batch bucket, seq bucket,
    /// pass).
    tuned: Mutex<HashMap<(usize, usize, Pass), Arc<Ready>>>,
}

impl std::fmt::Debug for Mixer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Mixer")
            .field("spec", &self.spec.name)
            .field("backend", &self.backend)
            .field("dtype", &self.dtype)
            .field("opts", &self.opts)
            .finish()
    }
}

impl Mixer {
    /// Resolves the backend, checks it can run `spec`, and prepares it
    /// (see the module docs). Errors: no usable GPU for `Device::Cuda`, a
    /// spec the backend cannot run ([`RuntimeError::Unsupported`], in spec
    /// terms), NVRTC failures, bad options.
    pub fn new(spec: &MixerSpec, opts: Options) -> Result<Mixer> {
        let mut opts = opts;
        opts.ranks = opts.ranks.max(1);
        let dtype = opts.dtype.unwrap_or(spec.dtype);
        let (backend, auto_note) = resolve(opts.device)?;
        if let Some(w) = opts.world.as_ref().filter(|w| w.world_size > 1) {
            if backend != BackendKind::Cuda {
                return Err(RuntimeError::Unsupported {
                    backend: backend.name(),
                    what: format!(
                        "a run across {} processes (only the CUDA backend runs a ring over \
                         processes)",
                        w.world_size
                    ),
                });
            }
        }
        // (CUDA's code generator says the same when the kernels are built.)
        if backend != BackendKind::Cuda {
            if let Err(why) = capabilities::supports(spec, backend) {
                return Err(RuntimeError::Unsupported {
                    backend: backend.name(),
                    what: why,
                });
            }
        }
        match (backend, &opts.tiles) {
            (BackendKind::Cuda, Tiles::Cpu(_)) | (BackendKind::Cpu, Tiles::Cuda(_)) => {
                return Err(RuntimeError::Invalid(format!(
                    "the tile configuration given is for another backend than {}",
                    backend.name()
                )))
            }
            _ => {}
        }
        let mut m = Mixer {
            spec: spec.clone(),
            opts,
            backend,
            dtype,
            auto_note,
            base_choice: Choice::Reference,
            base: Arc::new(Ready {
                prepared: Prepared::Reference,
                config: String::new(),
                source: ConfigSource::Explicit,
            }),
            tuned: Mutex::new(HashMap::new()),
        };
        m.base_choice = m.choose(None, Pass::Fwd);
        m.base = m.prepare(m.base_choice.clone())?;
        Ok(m)
    }

    /// Parses spec text (or a `.mix` file's contents) and builds a mixer.
    pub fn from_str(text: &str, opts: Options) -> Result<Mixer> {
        let spec = mixc_dsl::parse_str(text).map_err(|d| RuntimeError::Spec(d.to_string()))?;
        Mixer::new(&spec, opts)
    }

    pub fn spec(&self) -> &MixerSpec {
        &self.spec
    }

    pub fn options(&self) -> &Options {
        &self.opts
    }

    /// The backend this mixer runs on.
    pub fn backend(&self) -> BackendKind {
        self.backend
    }

    /// Storage type of the inputs on the device.
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// The type to keep q, k, v and the output in on the host, for calls of
    /// [`Mixer::forward`]: the dtype on the CPU and reference backends (they
    /// read 16-bit inputs in place: half the bytes of f32), f32 on CUDA
    /// (the upload converts from f32).
    pub fn host_dtype(&self) -> DType {
        match self.backend {
            BackendKind::Cuda => DType::F32,
            BackendKind::Cpu | BackendKind::Reference => self.dtype,
        }
    }

    /// The arithmetic type of the backend (what [`reference::check_tolerance`]
    /// is judged on): the storage type on CUDA; on the CPU bf16 for bf16
    /// storage where the CPU multiplies in bf16 ([`crate::cpu::bf16::enabled`]),
    /// else f32; f64 for the reference.
    pub fn compute_dtype(&self) -> DType {
        match self.backend {
            BackendKind::Cuda => self.dtype,
            BackendKind::Cpu if self.dtype == DType::Bf16 && crate::cpu::bf16::enabled() => {
                DType::Bf16
            }
            BackendKind::Cpu | BackendKind::Reference => DType::F32,
        }
    }

    /// With [`Device::Auto`]: what was picked and why (e.g. "using the CPU
    /// backend (no CUDA driver library found)").
    pub fn auto_note(&self) -> Option<&str> {
        self.auto_note.as_deref()
    }

    /// The tile choice for a call (`shape`: the bucket's (batch, seq) for a
    /// tuning-cache lookup; `None`: the base choice), not yet prepared.
    fn choose(&self, shape: Option<(usize, usize)>, pass: Pass) -> Choice {
        let (spec, opts) = (&self.spec, &self.opts);
        match self.backend {
            BackendKind::Reference => Choice::Reference,
            BackendKind::Cpu => {
                let (mut cfg, source) = match (&opts.tiles, shape) {
                    (Tiles::Cpu(t), _) => (
                        t.apply(&CpuConfig::default_for(spec, 0)),
                        ConfigSource::Explicit,
                    ),
                    (Tiles::Auto, Some((batch, seq))) => {
                        let cache = tune::TuneCache::from_env();
                        let c = tune::cpu_config_for_pass(
                            cache.as_ref(),
                            spec,
                            batch,
                            seq,
                            self.dtype,
                            pass,
                        );
                        (c.config, source_of(c.source))
                    }
                    _ => (
                        CpuConfig::default_for(spec, 0),
                        ConfigSource::Default { note: None },
                    ),
                };
                cfg.ranks = opts.ranks;
                if let Some(s) = opts.sharding {
                    cfg.sharding = s;
                }
                if let Some(t) = opts.threads {
                    cfg.threads = t;
                }
                // bf16 storage: bf16 tile products where the CPU has them.
                cfg.precision = if self.dtype == DType::Bf16 {
                    Precision::Bf16
                } else {
                    Precision::F32
                };
                Choice::Cpu(cfg, source)
            }
            BackendKind::Cuda => {
                let mut cfg = CudaOptions::default_for(spec);
                cfg.ranks = opts.ranks;
                cfg.dtype = self.dtype;
                cfg.world = opts.world.clone();
                if let Some(s) = opts.sharding {
                    cfg.sharding = s;
                }
                let source = match (&opts.tiles, shape) {
                    (Tiles::Cuda(k), _) => {
                        cfg.config = Some(*k);
                        ConfigSource::Explicit
                    }
                    (Tiles::Auto, Some((batch, seq))) => {
                        match cuda_tuned(spec, self.dtype, batch, seq) {
                            Some((k, source)) => {
                                cfg.config = Some(k);
                                source_of(source)
                            }
                            None => ConfigSource::Default { note: None },
                        }
                    }
                    _ => ConfigSource::Default { note: None },
                };
                Choice::Cuda(cfg, source)
            }
        }
    }

    /// Prepares the backend for a tile choice (CPU: plan and pool; CUDA:
    /// generation, compilation, load).
    fn prepare(&self, choice: Choice) -> Result<Arc<Ready>> {
        let (prepared, config, source) = match choice {
            Choice::Reference => (
                Prepared::Reference,
                "f64 reference".to_string(),
                ConfigSource::Default { note: None },
            ),
            Choice::Cpu(cfg, source) => {
                let products = if cfg.precision == Precision::Bf16 && crate::cpu::bf16::enabled() {
                    ", bf16 products"
                } else {
                    ""
                };
                let desc = format!(
                    "block {}x{}, chunk {}, {} threads{products}",
                    cfg.block_m, cfg.block_n, cfg.chunk, cfg.threads
                );
                (
                    Prepared::Cpu(Box::new(CpuMixer::new(&self.spec, &cfg)?)),
                    desc,
                    source,
                )
            }
            Choice::Cuda(cfg, source) => {
                if let Device::Cuda(first) = self.opts.device {
                    if first != 0 {
                        return Err(RuntimeError::Unsupported {
                            backend: "cuda",
                            what: format!(
                                "starting a ring on GPU {first} (choose the GPUs with \
                                 CUDA_VISIBLE_DEVICES)"
                            ),
                        });
                    }
                }
                let m = CudaMixer::new(&self.spec, &cfg)?;
                let desc = m
                    .config()
                    .map_or_else(|| "chosen per process".to_string(), |c| c.describe());
                (Prepared::Cuda(Box::new(m)), desc, source)
            }
        };
        Ok(Arc::new(Ready {
            prepared,
            config,
            source,
        }))
    }

    /// The preparation for a call of `batch x seq` of `pass`.
    fn ready_for(&self, batch: usize, seq: usize, pass: Pass) -> Result<Arc<Ready>> {
        if self.opts.tiles != Tiles::Auto || self.backend == BackendKind::Reference {
            return Ok(self.base.clone());
        }
        let key = (
            tune::cache::batch_bucket(batch),
            tune::cache::seq_bucket(seq),
            pass,
        );
        if let Some(p) = self
            .tuned
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&key)
        {
            return Ok(p.clone());
        }
        let choice = self.choose(Some((batch, seq)), pass);
        // Tiles equal to the base choice run on the base preparation
        // (reported with this bucket's source: a tuned entry, or a note).
        let ready = if choice.same_tiles(&self.base_choice) {
            match choice.source() {
                Some(source) if source != self.base.source => Arc::new(Ready {
                    prepared: Prepared::Shared(self.base.clone()),
                    config: self.base.config.clone(),
                    source,
                }),
                _ => self.base.clone(),
            }
        } else {
            self.prepare(choice)?
        };
        self.tuned
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(key, ready.clone());
        Ok(ready)
    }

    /// Runs the mixer on one input set (host tensors in mixc's layout:
    /// `q [batch, seq, heads, head_dim]`, `k`/`v [batch, kv_seq, kv_heads,
    /// dim]`, the spec's extra inputs by name). Any batch and lengths (keys at
    /// least the ring's rank count) run without recompiling. Queries may be
    /// fewer or more than keys and sit at any position
    /// ([`MixerInputs::q_offset`]: a decode step, a prefill chunk,
    /// cross-attention) on the CPU and reference backends.
    ///
    /// q, k and v may be stored in f32, bf16 or f16 ([`HostElem`]); the
    /// output comes back in the same type. 16-bit inputs hold half the
    /// bytes; the CPU backend reads them in place and computes in f32 (bf16
    /// tile products where the mixer's dtype is bf16 and the CPU has them).
    pub fn forward<E: HostElem + OutElem>(&self, inputs: &MixerInputs<E>) -> Result<Output<E>> {
        Ok(self.forward_impl(inputs, false, None)?.0)
    }

    /// [`Mixer::forward`] for training: also returns what
    /// [`Mixer::backward`] needs besides the inputs and `o` (each row's
    /// log-sum-exp or weight sum; O(batch * heads * seq)).
    /// Inputs may be stored in any [`HostElem`] type, as for
    /// [`Mixer::forward`]; [`Mixer::backward`] reads f32 inputs.
    pub fn forward_train<E: HostElem + OutElem>(
        &self,
        inputs: &MixerInputs<E>,
    ) -> Result<(Output<E>, Residuals)> {
        self.backward_support()?;
        let (out, stat) = self.forward_impl(inputs, true, None)?;
        Ok((out, Residuals::kept(stat, inputs)))
    }

    /// This process's rank of a ring over processes: `transport` carries
    /// the ring's messages (key/value shards, states) to the other ranks,
    /// each a process making the same call on the same mixer, and says
    /// this rank and the rank count; the mixer's sharding
    /// ([`Options::sharding`]) deals the positions.
    ///
    /// `inputs` have the whole sequence's shapes, but only this rank's
    /// positions ([`RingSchedule::shard`]) of q, k and v are read: the rest
    /// may be zeros never written (a zeroed allocation costs no memory for
    /// pages nobody touches). Extra inputs are whole on every rank. Only
    /// this rank's rows of `o` (and of the residuals, with `train`) are
    /// written. Queries and keys must be one sequence. CPU backend only.
    pub fn forward_rank<E: HostElem + OutElem>(
        &self,
        inputs: &MixerInputs<E>,
        train: bool,
        transport: &Arc<dyn Transport>,
    ) -> Result<(Output<E>, Residuals)> {
        if train {
            self.backward_support()?;
        }
        let (out, stat) = self.forward_impl(inputs, train, Some(transport))?;
        Ok((out, Residuals::kept(stat, inputs)))
    }

    /// The backward of [`Mixer::forward_rank`]: reads this rank's positions
    /// of the inputs, `o`, the residuals and `d_o`; writes this rank's
    /// positions of the q, k and v gradients. The extra inputs' gradients
    /// are this rank's part: summed over the ranks they are the gradient.
    pub fn backward_rank(
        &self,
        inputs: &MixerInputs,
        o: &Tensor<f32>,
        residuals: &Residuals,
        d_o: &Tensor<f32>,
        transport: &Arc<dyn Transport>,
    ) -> Result<BackwardOutput> {
        self.backward_impl(inputs, o, residuals, d_o, Some(transport))
    }

    /// [`Mixer::forward`] of a packed variable-length batch: batch 1, the
    /// sequences concatenated, `varlen` their boundaries (see
    /// [`crate::varlen`] for the layout of every input). Each sequence runs
    /// alone on this mixer (its rows of q, k, v read in place); `o` is
    /// packed like q.
    pub fn forward_varlen(&self, inputs: &MixerInputs, varlen: &Varlen) -> Result<Output> {
        Ok(self.varlen_forward(inputs, varlen, false)?.0)
    }

    /// [`Mixer::forward_train`] of a packed variable-length batch; the
    /// residuals are packed like `o`.
    pub fn forward_train_varlen(
        &self,
        inputs: &MixerInputs,
        varlen: &Varlen,
    ) -> Result<(Output, Residuals)> {
        self.backward_support()?;
        let (out, stat) = self.varlen_forward(inputs, varlen, true)?;
        let residuals = Residuals::from_stat(stat, 1, inputs.seq);
        Ok((out, residuals))
    }

    fn varlen_forward(
        &self,
        inputs: &MixerInputs,
        varlen: &Varlen,
        train: bool,
    ) -> Result<(Output, Tensor<f64>)> {
        varlen.check(&self.spec, inputs)?;
        let (h, dv) = (self.spec.heads as usize, self.spec.value_dim as usize);
        let total = inputs.seq;
        let start = Instant::now();
        let mut o = Tensor::<f32>::zeros(&[1, total, h, dv]);
        let empty_stat = if self.spec.norm == mixc_dsl::ir::Norm::Softmax {
            f64::NEG_INFINITY
        } else {
            0.0
        };
        let mut stat = Tensor::new(
            vec![1, h, if train { total } else { 0 }],
            vec![empty_stat; if train { h * total } else { 0 }],
        );
        let mut seconds = 0.0;
        let mut pairs: Option<Vec<u64>> = None;
        let mut first: Option<Output> = None;
        for s in 0..varlen.sequences() {
            let (qr, kr) = (varlen.q_rows(s), varlen.kv_rows(s));
            if qr.is_empty() || kr.is_empty() {
                // No query, or queries with no key: rows of 0 (stat as above).
                continue;
            }
            let part = varlen.part(&self.spec, inputs, s);
            let (out, res) = if train {
                let (o, r) = self.forward_train(&part)?;
                (o, Some(r))
            } else {
                (self.forward(&part)?, None)
            };
            o.data[qr.start * h * dv..qr.end * h * dv].copy_from_slice(&out.o.data);
            if let Some(r) = res.filter(|r| !r.stat.data.is_empty()) {
                for x in 0..h {
                    stat.data[x * total + qr.start..x * total + qr.end]
                        .copy_from_slice(&r.stat.data[x * qr.len()..(x + 1) * qr.len()]);
                }
            }
            seconds += out.seconds;
            match (&mut pairs, &out.pairs_per_rank) {
                (Some(acc), Some(p)) => acc.iter_mut().zip(p).for_each(|(a, b)| *a += b),
                (None, Some(p)) => pairs = Some(p.clone()),
                _ => {}
            }
            first.get_or_insert(out);
        }
        let (config, config_source) = match first {
            Some(f) => (f.config, f.config_source),
            None => (self.base.config.clone(), self.base.source.clone()),
        };
        let wall_seconds = start.elapsed().as_secs_f64();
        Ok((
            Output {
                o,
                seconds,
                wall_seconds,
                pairs_per_rank: pairs,
                config,
                config_source,
                dist_rank: None,
            },
            stat,
        ))
    }

    /// [`Mixer::backward`] of a packed variable-length batch: `o`, the
    /// residuals and `d_o` packed as [`Mixer::forward_train_varlen`] gave
    /// them; the gradients packed like their inputs (see [`crate::varlen`]).
    pub fn backward_varlen(
        &self,
        inputs: &MixerInputs,
        o: &Tensor<f32>,
        residuals: &Residuals,
        d_o: &Tensor<f32>,
        varlen: &Varlen,
    ) -> Result<BackwardOutput> {
        self.backward_support()?;
        varlen.check(&self.spec, inputs)?;
        let (h, dv) = (self.spec.heads as usize, self.spec.value_dim as usize);
        let total = inputs.seq;
        let want = [1, total, h, dv];
        for (name, t) in [("o", o), ("d_o", d_o)] {
            if t.shape != want {
                return Err(RuntimeError::BadInput {
                    name: name.into(),
                    problem: format!("must have shape {want:?}, got {:?}", t.shape),
                });
            }
        }
        let stat = &residuals.stat;
        let stat_kept = !stat.data.is_empty();
        if stat_kept && stat.shape != [1, h, total] {
            return Err(RuntimeError::BadInput {
                name: "residuals".into(),
                problem: format!(
                    "saved by a forward of another batch: shape {:?}, expected {:?}",
                    stat.shape,
                    [1, h, total]
                ),
            });
        }
        let start = Instant::now();
        let zeros = |t: &Tensor<f32>| Tensor::<f32>::zeros(&t.shape);
        let mut grads = Gradients {
            dq: zeros(&inputs.q),
            dk: zeros(&inputs.k),
            dv: zeros(&inputs.v),
            extra: Default::default(),
        };
        for decl in &self.spec.inputs {
            if let Some(crate::tensor::ExtraTensor::F32(t)) = inputs.extra.get(&decl.name) {
                if crate::grad::differentiable_inputs(&self.spec).contains(&decl.name) {
                    grads.extra.insert(decl.name.clone(), zeros(t));
                }
            }
        }
        let mut last: Option<BackwardOutput> = None;
        for s in 0..varlen.sequences() {
            let (qr, kr) = (varlen.q_rows(s), varlen.kv_rows(s));
            if qr.is_empty() || kr.is_empty() {
                continue;
            }
            let part = varlen.part(&self.spec, inputs, s);
            let part_stat = if stat_kept {
                let n = qr.len();
                let data = (0..h)
                    .flat_map(|x| stat.data[x * total + qr.start..x * total + qr.end].to_vec())
                    .collect();
                Tensor::new(vec![1, h, n], data)
            } else {
                Tensor::new(vec![0], Vec::new())
            };
            let res = Residuals::from_stat(part_stat, 1, qr.len());
            let back = self.backward(
                &part,
                &crate::varlen::rows(o, &qr),
                &res,
                &crate::varlen::rows(d_o, &qr),
            )?;
            let g = &back.grads;
            for (whole, part, r) in [
                (&mut grads.dq, &g.dq, &qr),
                (&mut grads.dk, &g.dk, &kr),
                (&mut grads.dv, &g.dv, &kr),
            ] {
                if !part.data.is_empty() {
                    let w: usize = whole.shape[2..].iter().product();
                    whole.data[r.start * w..r.end * w].copy_from_slice(&part.data);
                }
            }
            for decl in &self.spec.inputs {
                if let (Some(whole), Some(p)) =
                    (grads.extra.get_mut(&decl.name), g.extra.get(&decl.name))
                {
                    varlen.scatter_add_extra(decl, s, p, whole);
                }
            }
            last = Some(back);
        }
        let (config, config_source) = match last {
            Some(b) => (b.config, b.config_source),
            None => (self.base.config.clone(), self.base.source.clone()),
        };
        Ok(BackwardOutput {
            grads,
            seconds: start.elapsed().as_secs_f64(),
            config,
            config_source,
        })
    }

    /// One call against a paged KV cache (see [`crate::paged`]): q
    /// `[batch, seq, heads, head_dim]`, row `b`'s queries the last `seq` of
    /// its `seq_lens[b]` positions; returns `o [batch, seq, heads,
    /// value_dim]`. Extra inputs without a `seq` axis (tables, one entry per
    /// row for those with a `batch` axis).
    pub fn forward_paged(
        &self,
        q: &Tensor<f32>,
        cache: &crate::paged::PagedKv<'_>,
        extra: &std::collections::BTreeMap<String, crate::tensor::ExtraTensor>,
    ) -> Result<Output> {
        let (x, varlen) = cache.packed(&self.spec, q, extra)?;
        let mut out = self.forward_varlen(&x, &varlen)?;
        out.o.shape = vec![
            q.shape[0],
            q.shape[1],
            self.spec.heads as usize,
            self.spec.value_dim as usize,
        ];
        Ok(out)
    }

    /// A forward of a causal linear, retention or gated mixer that
    /// continues from `state` (everything before the inputs' position 0;
    /// `None`: nothing) and returns the state after its last position, so
    /// a prefill and then decode steps of one token (or a few) each cost
    /// O(d_k d_v) per token instead of a pass over the whole cache, and
    /// equal one long forward. CPU backend; queries, keys and values are
    /// the new tokens alike (see [`crate::cpu::RecurrentState`]).
    pub fn forward_state(
        &self,
        inputs: &MixerInputs,
        state: Option<&crate::cpu::RecurrentState>,
    ) -> Result<(Output, crate::cpu::RecurrentState)> {
        let ready = self.ready_for(inputs.batch, inputs.seq, Pass::Fwd)?;
        let prepared = ready.prepared.runs();
        let Prepared::Cpu(m) = prepared else {
            return Err(RuntimeError::Unsupported {
                backend: self.backend.name(),
                what: "a recurrent state in and out (the CPU backend carries one)".into(),
            });
        };
        let start = Instant::now();
        let run = m.run_state(inputs, state)?;
        let state = run
            .state
            .ok_or_else(|| RuntimeError::Internal("a state run returned no state".into()))?;
        let out = Output {
            o: run.output.into_f32(),
            seconds: run.stats.elapsed.as_secs_f64(),
            wall_seconds: start.elapsed().as_secs_f64(),
            pairs_per_rank: Some(run.stats.pairs_per_rank),
            config: ready.config.clone(),
            config_source: ready.source.clone(),
            dist_rank: None,
        };
        Ok((out, state))
    }

    fn remote_unsupported(&self) -> RuntimeError {
        RuntimeError::Unsupported {
            backend: self.backend.name(),
            what: "a ring over processes through a caller's transport (the CPU backend runs it)"
                .into(),
        }
    }

    /// The gradients of `sum(o * d_o)` with respect to q, k, v and every
    /// float extra input ([`Gradients`], in the inputs' layouts), given
    /// the inputs, the output `o` and the residuals of
    /// [`Mixer::forward_train`], and the upstream gradient `d_o` (shape of
    /// `o`). CPU: the blocked backward on the forward's block plan and ring;
    /// reference: f64 gradients rounded to f32; CUDA: not yet
    /// ([`RuntimeError::Unsupported`]).
    pub fn backward(
        &self,
        inputs: &MixerInputs,
        o: &Tensor<f32>,
        residuals: &Residuals,
        d_o: &Tensor<f32>,
    ) -> Result<BackwardOutput> {
        self.backward_impl(inputs, o, residuals, d_o, None)
    }

    fn backward_impl(
        &self,
        inputs: &MixerInputs,
        o: &Tensor<f32>,
        residuals: &Residuals,
        d_o: &Tensor<f32>,
        remote: Option<&Arc<dyn Transport>>,
    ) -> Result<BackwardOutput> {
        self.backward_support()?;
        let start = Instant::now();
        if (residuals.batch, residuals.seq) != (inputs.batch, inputs.seq) {
            return Err(RuntimeError::BadInput {
                name: "residuals".into(),
                problem: format!(
                    "saved by a forward of batch {} x seq {}, but the inputs are batch {} x seq {}",
                    residuals.batch, residuals.seq, inputs.batch, inputs.seq
                ),
            });
        }
        // Gradients the size of the inputs, and scratch of about twice
        // the inputs and `o` (see `train_host_bytes`).
        let qkv = (inputs.q.numel() + inputs.k.numel() + inputs.v.numel()) as u64 * 4;
        let need = qkv
            .saturating_add(inputs.extra_bytes() as u64)
            .saturating_mul(3)
            .saturating_add((d_o.numel() as u64 * 4).saturating_mul(2));
        if need > ADMIT_ABOVE_BYTES {
            crate::memory::admit_host(need)?;
        }
        let ready = self.ready_for(inputs.batch, inputs.seq, Pass::Bwd)?;
        let prepared = ready.prepared.runs();
        let grads = match prepared {
            Prepared::Cpu(m) => match remote {
                Some(t) => m.backward_rank(inputs, o, &residuals.stat, d_o, t)?,
                None => m.backward(inputs, o, &residuals.stat, d_o)?,
            }
            .into_f32(),
            _ if remote.is_some() => return Err(self.remote_unsupported()),
            Prepared::Reference => reference::gradients(&self.spec, inputs, d_o)?.to_f32(),
            Prepared::Cuda(m) => {
                let lse = Tensor::new(
                    residuals.stat.shape.clone(),
                    residuals.stat.data.iter().map(|&x| x as f32).collect(),
                );
                // Timed by CUDA events around the launches, as the forward's
                // `Output::seconds` is.
                let (grads, seconds) = m.backward(inputs, o, &lse, d_o, None)?;
                let target = mixc_codegen::Target::new(
                    m.arch().unwrap_or(mixc_codegen::Arch::Sm90),
                    self.dtype,
                );
                return Ok(BackwardOutput {
                    grads,
                    seconds,
                    config: KernelConfig::backward_default_for(&self.spec, &target).describe(),
                    config_source: ConfigSource::Default {
                        note: Some("the CUDA backward's tiles are not tuned yet".into()),
                    },
                });
            }
            Prepared::Shared(_) => {
                return Err(RuntimeError::Internal(
                    "a shared preparation is never nested".into(),
                ))
            }
        };
        Ok(BackwardOutput {
            grads,
            seconds: start.elapsed().as_secs_f64(),
            config: ready.config.clone(),
            config_source: ready.source.clone(),
        })
    }

    /// `Ok` when this mixer's backend runs the backward pass.
    pub fn backward_support(&self) -> Result<()> {
        capabilities::backward_supports(&self.spec, self.backend).map_err(|what| {
            RuntimeError::Unsupported {
                backend: self.backend.name(),
                what,
            }
        })
    }

    /// What a gradient check compares: every head (`full`), or the
    /// documented sample ([`GradCheckPlan::sample`]).
    pub fn grad_check_plan(&self, full: bool) -> GradCheckPlan {
        if full {
            GradCheckPlan::full(&self.spec)
        } else {
            GradCheckPlan::sample(&self.spec)
        }
    }

    /// Compares `grads` (this mixer's gradients for `inputs` and `d_o`)
    /// with the f64 reference gradients over `plan`, judged on
    /// [`crate::check::grad_tolerance`] of [`Mixer::compute_dtype`].
    pub fn check_gradients(
        &self,
        inputs: &MixerInputs,
        d_o: &Tensor<f32>,
        grads: &Gradients<f32>,
        plan: &GradCheckPlan,
        progress: &(dyn Fn(u64, u64) + Sync),
    ) -> Result<GradCheckReport> {
        crate::check::compare_gradients(
            &self.spec,
            inputs,
            d_o,
            grads,
            plan,
            self.compute_dtype(),
            progress,
        )
    }

    fn forward_impl<E: HostElem + OutElem>(
        &self,
        inputs: &MixerInputs<E>,
        keep_stat: bool,
        remote: Option<&Arc<dyn Transport>>,
    ) -> Result<(Output<E>, Option<Tensor<f64>>)> {
        let start = Instant::now();
        // What the call allocates beyond its inputs must fit; small calls
        // skip the look at /proc (no file I/O on the hot path). The inputs
        // exist, so their sizes are known and these products cannot overflow
        // beyond what the output's checked product catches.
        let o_elems = crate::memory::checked_elems(
            "the output `o`",
            &[
                ("batch", inputs.batch),
                ("seq", inputs.seq),
                ("heads", self.spec.heads as usize),
                ("value_dim", self.spec.value_dim as usize),
            ],
        )? as u64;
        let (f64_out, copies) = self.host_scratch();
        let elem = std::mem::size_of::<E>() as u64;
        let kv = (inputs.k.numel() + inputs.v.numel()) as u64 * elem;
        // The output, and each rank's f32 rows of it on their way there.
        let rank_rows = self.rank_row_bytes() as u64;
        let rest = o_elems
            .saturating_mul(elem + rank_rows + if f64_out { 8 } else { 0 })
            .saturating_add(kv.saturating_mul(copies));
        if rest > ADMIT_ABOVE_BYTES {
            crate::memory::admit_host(rest)?;
        }
        let ready = self.ready_for(inputs.batch, inputs.seq, Pass::Fwd)?;
        let prepared = ready.prepared.runs();
        let mut stat = None;
        if remote.is_some() && !matches!(prepared, Prepared::Cpu(_)) {
            return Err(self.remote_unsupported());
        }
        let (o, seconds, pairs_per_rank, dist_rank) = match prepared {
            Prepared::Reference => {
                let out64 = reference::evaluate(&self.spec, inputs)?;
                let o = Tensor::new(
                    out64.shape.clone(),
                    out64.data.iter().map(|&x| E::from_f32(x as f32)).collect(),
                );
                (o, None, None, None)
            }
            Prepared::Cpu(m) => {
                let run = match remote {
                    Some(t) => m.run_rank(inputs, keep_stat, t)?,
                    None if keep_stat => m.run_train(inputs)?,
                    None => m.run(inputs)?,
                };
                if keep_stat {
                    stat = Some(run.stat);
                }
                (
                    run.output.into_elem(),
                    Some(run.stats.elapsed.as_secs_f64()),
                    Some(run.stats.pairs_per_rank),
                    remote.map(|t| (t.rank(), t.ranks())),
                )
            }
            Prepared::Cuda(m) => {
                let inputs = inputs.to_f32();
                let run = if keep_stat {
                    m.run_train(&inputs)?
                } else {
                    m.run(&inputs)?
                };
                if keep_stat {
                    stat = run.lse.as_ref().map(|l| {
                        Tensor::new(l.shape.clone(), l.data.iter().map(|&x| x as f64).collect())
                    });
                }
                (
                    run.output.into_elem(),
                    Some(run.kernel_seconds),
                    run.pairs_per_rank,
                    run.dist_rank,
                )
            }
            Prepared::Shared(_) => unreachable!("a shared preparation is never nested"),
        };
        let wall_seconds = start.elapsed().as_secs_f64();
        let out = Output {
            o,
            seconds: seconds.unwrap_or(wall_seconds),
            wall_seconds,
            pairs_per_rank,
            config: ready.config.clone(),
            config_source: ready.source.clone(),
            dist_rank,
        };
        Ok((out, stat))
    }
}

impl Mixer {
    /// Host bytes of a call at `batch x seq` on this mixer: `(inputs, the
    /// rest)`, the rest being the output and the backend's host scratch (the
    /// reference's f64 output; the CPU ring's key/value shards, counted as
    /// two copies of k and v). Overflowing shapes are a
    /// [`RuntimeError::SizeOverflow`] naming the dims.
    pub fn host_bytes(&self, batch: usize, seq: usize) -> Result<(u64, u64)> {
        self.host_bytes_kv(batch, seq, seq)
    }

    /// [`Mixer::host_bytes`] of `seq` queries against `kv_seq` keys (a
    /// decode step, a prefill chunk, cross-attention).
    pub fn host_bytes_kv(&self, batch: usize, seq: usize, kv_seq: usize) -> Result<(u64, u64)> {
        let (f64_out, copies) = self.host_scratch();
        let elem_bytes = self.host_dtype().size_bytes();
        let layout = crate::memory::HostLayout {
            elem_bytes,
            out_bytes: elem_bytes + self.rank_row_bytes(),
            f64_out,
            kv_copies: copies,
        };
        crate::memory::run_host_bytes_kv(&self.spec, batch, seq, kv_seq, layout)
    }

    /// Bytes per output element a call keeps besides the output itself: a
    /// ring's ranks (and the CUDA download) hold their rows in f32 before
    /// the output takes them; one CPU rank writes them into the output
    /// directly.
    fn rank_row_bytes(&self) -> usize {
        if self.opts.ranks > 1 || self.backend != BackendKind::Cpu {
            4
        } else {
            0
        }
    }

    /// What the backend allocates on the host beyond the output: whether
    /// an f64 output (the reference), and how many copies of k and v (the
    /// CPU ring's shards; on CUDA the encoded copies on their way up).
    fn host_scratch(&self) -> (bool, u64) {
        match self.backend {
            BackendKind::Reference => (true, 0),
            BackendKind::Cpu => (false, 2),
            BackendKind::Cuda => (false, 1),
        }
    }

    /// Host bytes of a training step (`forward_train` then `backward`) at
    /// `batch x seq`: `(inputs, the rest)`, the rest being the forward's
    /// plus `do`, the gradients (the size of the inputs; f64 on the
    /// reference), and the backward's scratch (CPU: each rank's queries and
    /// upstream gradients, the key/value shards with their gradient
    /// accumulators: one more copy of q and o, two of k and v).
    pub fn train_host_bytes(&self, batch: usize, seq: usize) -> Result<(u64, u64)> {
        let (inputs, rest) = self.host_bytes(batch, seq)?;
        let o = crate::memory::checked_bytes(
            "the output `o`",
            &[
                ("batch", batch),
                ("seq", seq),
                ("heads", self.spec.heads as usize),
                ("value_dim", self.spec.value_dim as usize),
            ],
            4,
        )?;
        let (grads, scratch) = match self.backend {
            BackendKind::Reference => (inputs.saturating_mul(3), 0),
            // One more copy of q and o, two of k and v: at most 2x the inputs and o.
            _ => (inputs, inputs.saturating_add(o).saturating_mul(2)),
        };
        Ok((
            inputs,
            rest.saturating_add(o)
                .saturating_add(grads)
                .saturating_add(scratch),
        ))
    }

    /// [`Mixer::admit`] for a training step ([`Mixer::train_host_bytes`]).
    pub fn admit_train(&self, batch: usize, seq: usize) -> Result<()> {
        let (inputs, rest) = self.train_host_bytes(batch, seq)?;
        crate::memory::admit_host(inputs.saturating_add(rest))?;
        self.admit_device(batch, seq)
    }

    /// Whether a call at `batch x seq`, its inputs included, fits in the
    /// host memory still available and, for a CUDA mixer, in each GPU's
    /// free memory (call it before making the inputs):
    /// [`RuntimeError::OutOfMemory`] with both figures when it does not.
    pub fn admit(&self, batch: usize, seq: usize) -> Result<()> {
        self.admit_kv(batch, seq, seq)
    }

    /// [`Mixer::admit`] for `seq` queries against `kv_seq` keys.
    pub fn admit_kv(&self, batch: usize, seq: usize, kv_seq: usize) -> Result<()> {
        let (inputs, rest) = self.host_bytes_kv(batch, seq, kv_seq)?;
        crate::memory::admit_host(inputs.saturating_add(rest))?;
        self.admit_device(batch, seq.max(kv_seq))
    }

    /// A CUDA mixer's share of [`Mixer::admit`]: the forward's device
    /// bytes against each GPU's free memory (`CudaMixer::admit`).
    fn admit_device(&self, batch: usize, seq: usize) -> Result<()> {
        let prepared = self.base.prepared.runs();
        match prepared {
            Prepared::Cuda(m) => m.admit(batch, seq),
            _ => Ok(()),
        }
    }

    /// One call on caller-owned CUDA buffers, launched on the caller's
    /// stream (see [`CudaMixer::forward_device`], whose contract this has):
    /// a one-rank mixer writes `o` (and for softmax the row log-sum-exp) in
    /// place with one kernel launch. Other backends and rings are
    /// `Unsupported`. The tiles are the base choice (the options' or the
    /// default), not a per-bucket tuned one.
    ///
    /// # Safety
    /// As [`CudaMixer::forward_device`].
    pub unsafe fn forward_device(
        &self,
        call: &crate::cuda::args::DeviceCall,
        stream: crate::cuda::RawStream,
    ) -> Result<()> {
        match &self.base.prepared {
            // SAFETY: forwarded from this function's contract.
            Prepared::Cuda(m) => unsafe { m.forward_device(call, stream) },
            _ => Err(RuntimeError::Unsupported {
                backend: self.backend.name(),
                what: "device-pointer calls (CUDA only)".into(),
            }),
        }
    }

    /// The ring's sharding (the option, else zigzag for causal masks).
    pub fn sharding(&self) -> Sharding {
        self.opts
            .sharding
            .unwrap_or(if self.spec.mask.implies_causal() {
                Sharding::Zigzag
            } else {
                Sharding::Contiguous
            })
    }

    /// What a check of a `seq`-long output compares: everything (`full`),
    /// or the documented sample ([`CheckPlan::sample`]: some heads and rows,
    /// always the first and last rows and every rank boundary).
    pub fn check_plan(&self, seq: usize, full: bool) -> CheckPlan {
        if full {
            return CheckPlan::full(&self.spec, seq);
        }
        let ring = RingSchedule::new(seq, self.opts.ranks, self.sharding()).ok();
        CheckPlan::sample(&self.spec, seq, ring.as_ref())
    }

    /// Compares `o` (this mixer's output for `inputs`) with the f64
    /// reference over `plan`, judged on the tolerance of
    /// [`Mixer::compute_dtype`]. `progress(done, total)` reports reference rows.
    pub fn check<E: HostElem>(
        &self,
        inputs: &MixerInputs<E>,
        o: &Tensor<E>,
        plan: &CheckPlan,
        progress: &(dyn Fn(u64, u64) + Sync),
    ) -> Result<CheckReport> {
        crate::check::compare(&self.spec, inputs, o, plan, self.compute_dtype(), progress)
    }
}

/// Calls allocating more than this check the available host memory first.
const ADMIT_ABOVE_BYTES: u64 = 256 << 20;

fn source_of(s: tune::Source) -> ConfigSource {
    match s {
        tune::Source::Cached { path } => ConfigSource::Tuned {
            path: path.display().to_string(),
        },
        tune::Source::Default { note } => ConfigSource::Default { note },
    }
}

/// The tuned kernel configuration for GPU 0's bucket, if the device can be
/// described; otherwise `None` (the default).
fn cuda_tuned(
    spec: &MixerSpec,
    dtype: DType,
    batch: usize,
    seq: usize,
) -> Option<(KernelConfig, tune::Source)> {
    let device = tune::DeviceInfo::cuda(0).ok()?;
    let cc = device.compute_capability?;
    let arch = crate::cuda::arch_for((cc as i32 / 10, cc as i32 % 10)).ok()?;
    Some(tune::cuda_config_in(
        tune::TuneCache::from_env().as_ref(),
        spec,
        &Target::new(arch, dtype),
        batch,
        seq,
        device,
    ))
}

/// Resolves [`Device::Auto`]: CUDA when a GPU is usable, else the CPU
/// backend, with a note saying which and why. `Device::Cuda` without a
/// usable GPU is an error.
pub fn resolve(device: Device) -> Result<(BackendKind, Option<String>)> {
    Ok(match device {
        Device::Reference => (BackendKind::Reference, None),
        Device::Cpu => (BackendKind::Cpu, None),
        Device::Cuda(_) => {
            crate::cuda::probe()?;
            (BackendKind::Cuda, None)
        }
        Device::Auto => match crate::cuda::probe() {
            Ok(info) => (
                BackendKind::Cuda,
                Some(format!("using CUDA on {}", info.describe())),
            ),
            Err(e) => (
                BackendKind::Cpu,
                Some(format!("using the CPU backend ({})", e.reason())),
            ),
        },
    })
}

pub mod capabilities {
    //! Which backends and architectures can run a spec, and why not, in
    //! spec terms.

    use super::BackendKind;
    use mixc_codegen::{Arch, KernelConfig, Target};
    use mixc_dsl::ir::MixerSpec;
    use serde::Serialize;

    /// One backend's (or one CUDA architecture's) answer.
    #[derive(Debug, Clone, PartialEq, Eq, Serialize)]
    pub struct Support {
        /// `reference`, `cpu`, `cuda sm_80`, `cuda sm_90`.
        pub target: String,
        /// `None`: supported; else why not, in the spec's terms.
        pub unsupported: Option<String>,
        /// `None`: the backward pass runs there too; else why not.
        pub backward_unsupported: Option<String>,
    }

    /// `Ok` when `backend` can run `spec`'s backward pass, else the reason.
    pub fn backward_supports(spec: &MixerSpec, backend: BackendKind) -> Result<(), String> {
        supports(spec, backend)?;
        match backend {
            BackendKind::Reference | BackendKind::Cpu => Ok(()),
            BackendKind::Cuda if spec.family != mixc_dsl::Family::Softmax => {
                crate::cuda::backward_linear::supports(spec).map_err(|what| {
                    format!(
                        "the backward pass of mixer `{}`: {what} (the CPU backend computes its \
                         gradients)",
                        spec.name
                    )
                })
            }
            BackendKind::Cuda => {
                let target = Target::new(Arch::Sm90, spec.dtype);
                mixc_codegen::generate_backward(
                    spec,
                    &target,
                    &KernelConfig::backward_default_for(spec, &target),
                )
                .map(|_| ())
                .map_err(|e| match e {
                    mixc_codegen::CodegenError::Unsupported { what, .. } => format!(
                        "the backward pass of mixer `{}`: {what} (the CPU backend computes its \
                         gradients)",
                        spec.name
                    ),
                    e => e.to_string(),
                })
            }
        }
    }

    /// `Ok` when `backend` can run `spec`, else the reason. For CUDA this
    /// asks the code generator for sm_90 in the spec's dtype with the
    /// default tiles (no NVRTC, no GPU).
    pub fn supports(spec: &MixerSpec, backend: BackendKind) -> Result<(), String> {
        match backend {
            BackendKind::Reference => Ok(()),
            BackendKind::Cpu => crate::cpu::supports(spec),
            BackendKind::Cuda => cuda_supports(spec, Arch::Sm90),
        }
    }

    /// Whether the code generator can lower `spec` for `arch` (the spec's
    /// dtype, default tiles).
    pub fn cuda_supports(spec: &MixerSpec, arch: Arch) -> Result<(), String> {
        let target = Target::new(arch, spec.dtype);
        mixc_codegen::generate(spec, &target, &KernelConfig::default_for(spec, &target))
            .map(|_| ())
            .map_err(|e| e.to_string())
    }

    /// The whole matrix: reference, cpu, cuda on each architecture.
    pub fn matrix(spec: &MixerSpec) -> Vec<Support> {
        let host = |name: &str, kind| Support {
            target: name.into(),
            unsupported: supports(spec, kind).err(),
            backward_unsupported: backward_supports(spec, kind).err(),
        };
        let mut v = vec![
            host("reference", BackendKind::Reference),
            host("cpu", BackendKind::Cpu),
        ];
        let cuda_backward = backward_supports(spec, BackendKind::Cuda).err();
        for arch in [Arch::Sm80, Arch::Sm90] {
            let unsupported = cuda_supports(spec, arch).err();
            v.push(Support {
                target: format!("cuda {arch}"),
                backward_unsupported: unsupported.clone().or(cuda_backward.clone()),
                unsupported,
            });
        }
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn assert_send_sync<T: Send + Sync>() {}

    #[test]
    fn a_mixer_can_be_shared_between_threads() {
        assert_send_sync::<Mixer>();
    }
}
