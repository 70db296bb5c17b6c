//! The CPU backend: the same algorithm as the GPU path, executed by threads.
//!
//! The sequence is sharded over `R` ranks ([`crate::ring`]); each rank is a
//! thread that owns its query shard. Two paths:
//! - **blocked** (softmax, convolution, and linear-family masks other than
//!   plain causal): at each of `R` ring steps a rank computes the partial of its
//!   queries against the key/value shard it holds, tile by tile as the
//!   [`BlockPlan`](mixc_codegen::plan::BlockPlan) says (Skip tiles and wholly
//!   skipped steps cost nothing, Full tiles skip mask tests), then merges the
//!   partial into its accumulator (online-softmax merge, or addition).
//!   On one rank it has two special forms: decode (few queries against many
//!   keys, `decode`) and, for plain causal convolutions of at least 256
//!   positions, an FFT (`fft`: O(L log L) instead of O(L²)).
//! - **chunkwise** (linear / retention / gated, causal mask, no bias or
//!   transform): the chunkwise state form; only the `d_k x d_v` state travels
//!   between ranks, in sequence order.
//! - **global state** (the same families with `mask = all` and no decay): one
//!   summed `d_k x d_v` state, all-reduced around the ring.
//!
//! Inside a rank, (batch, head, query block) work items run on a rayon pool of
//! `threads` workers, so a single rank still uses every core. Memory is
//! O(seq * d) overall: per-rank buffers are bounded by shard sizes, tiles by
//! `block_m x block_n`; no `seq x seq` buffer exists anywhere.

mod backward;
mod backward_chunkwise;
pub mod bf16;
mod blocked;
mod chunkwise;
mod decode;
pub mod expr;
mod fft;
mod microkernel;
pub mod peak;
pub mod real;

use std::time::{Duration, Instant};

use mixc_codegen::plan::{At, ClassCounts, SegmentSummaries, SegmentSummary, Tiling};
use mixc_dsl::ir::{Decay, EvalEnv, Family, FeatureMap, Mask, MixerSpec, Norm, Score};
use serde::{Deserialize, Serialize};

use crate::error::{Result, RuntimeError};
use crate::grad::Gradients;
use crate::inputs::validate_inputs;
pub use crate::ring::Sharding;
use crate::ring::{endpoints, RingSchedule, Transport};
use crate::tensor::{Elems, HostElem, InputsMeta, MixerInputs, Tensor};
use expr::FastExpr;
use real::Real;
use std::sync::Arc;

/// Arithmetic of a CPU run: f32 like the kernels, f64 to compare with the
/// reference at tight tolerances.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    F32,
    F64,
    /// f32 arithmetic with the tile products in bf16 (f32 accumulation),
    /// for runs whose storage type is bf16: AVX-512 BF16 where the CPU has
    /// it ([`bf16::enabled`]), else exactly [`Precision::F32`].
    Bf16,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CpuConfig {
    /// Simulated devices (ring ranks), each a thread.
    pub ranks: usize,
    pub sharding: Sharding,
    pub block_m: usize,
    pub block_n: usize,
    /// Chunk length of the chunkwise state form.
    pub chunk: usize,
    /// Worker threads shared by all ranks.
    pub threads: usize,
    pub precision: Precision,
}

impl CpuConfig {
    /// One rank, 64 x 64 tiles, chunks of 64, every core, f32; zigzag
    /// sharding for causal masks (balanced when ranks are added), else contiguous.
    pub fn default_for(spec: &MixerSpec, _seq: usize) -> Self {
        CpuConfig {
            ranks: 1,
            sharding: if spec.mask.implies_causal() {
                Sharding::Zigzag
            } else {
                Sharding::Contiguous
            },
            block_m: 64,
            block_n: 64,
            chunk: 64,
            threads: std::thread::available_parallelism().map_or(1, |n| n.get()),
            precision: Precision::F32,
        }
    }

    fn validate(&self) -> Result<()> {
        for (name, v) in [
            ("block_m", self.block_m),
            ("block_n", self.block_n),
            ("chunk", self.chunk),
            ("threads", self.threads),
        ] {
            if v == 0 {
                return Err(RuntimeError::Invalid(format!(
                    "CPU backend: {name} must be at least 1 (got 0)"
                )));
            }
        }
        Ok(())
    }
}

/// Which algorithm a spec runs with on the CPU.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CpuPath {
    Blocked,
    Chunkwise,
    /// Non-causal linear (`mask = all`, no decay): one summed state.
    GlobalState,
}

/// The state forms apply to feature-map mixers whose weight factorises as
/// `phi(q_i) . psi(k_j) * D(i, j)`: chunkwise under a causal mask, one global
/// state under `all` (no decay then, as decay needs a causal mask).
pub fn path_for(spec: &MixerSpec) -> CpuPath {
    let linear = matches!(
        spec.family,
        Family::Linear | Family::Retention | Family::Gated
    );
    let factorises = linear
        && matches!(spec.score, Score::Dot { .. })
        && !matches!(spec.norm, Norm::Softmax)
        && spec.bias.is_none()
        && spec.transform.is_none();
    match &spec.mask {
        Mask::Causal if factorises => CpuPath::Chunkwise,
        Mask::All if factorises && matches!(spec.decay, Decay::None) => CpuPath::GlobalState,
        _ => CpuPath::Blocked,
    }
}

/// The output of a CPU run, `[batch, seq, heads, value_dim]`.
///
/// f32 and f64 runs on f32 inputs give f32 and f64; f32 runs on bf16 or f16
/// inputs give the inputs' type (rounded once, from the f32 result).
#[derive(Debug, Clone, PartialEq)]
pub enum CpuOutput {
    F32(Tensor<f32>),
    F64(Tensor<f64>),
    Bf16(Tensor<half::bf16>),
    F16(Tensor<half::f16>),
}

impl CpuOutput {
    pub fn shape(&self) -> &[usize] {
        match self {
            CpuOutput::F32(t) => &t.shape,
            CpuOutput::F64(t) => &t.shape,
            CpuOutput::Bf16(t) => &t.shape,
            CpuOutput::F16(t) => &t.shape,
        }
    }
    pub fn to_f64(&self) -> Tensor<f64> {
        let widen = |shape: &[usize], x: &mut dyn Iterator<Item = f64>| {
            Tensor::new(shape.to_vec(), x.collect())
        };
        match self {
            CpuOutput::F32(t) => widen(&t.shape, &mut t.data.iter().map(|&x| x as f64)),
            CpuOutput::F64(t) => t.clone(),
            CpuOutput::Bf16(t) => widen(&t.shape, &mut t.data.iter().map(|x| x.to_f64())),
            CpuOutput::F16(t) => widen(&t.shape, &mut t.data.iter().map(|x| x.to_f64())),
        }
    }
    /// The output as f32 without copying an f32 output (a 1M-token output is
    /// gigabytes; a clone would count against the run's peak memory).
    pub fn into_f32(self) -> Tensor<f32> {
        self.into_elem()
    }
    pub fn to_f32(&self) -> Tensor<f32> {
        match self {
            CpuOutput::F32(t) => t.clone(),
            CpuOutput::Bf16(t) => t.convert(),
            CpuOutput::F16(t) => t.convert(),
            CpuOutput::F64(t) => {
                Tensor::new(t.shape.clone(), t.data.iter().map(|&x| x as f32).collect())
            }
        }
    }
    /// The output in the storage type `E`: moved when it already is `E`,
    /// else converted (rounded to the nearest).
    pub fn into_elem<E: HostElem>(self) -> Tensor<E> {
        match self {
            CpuOutput::F32(t) => t.into_elem(),
            CpuOutput::Bf16(t) => t.into_elem(),
            CpuOutput::F16(t) => t.into_elem(),
            CpuOutput::F64(t) => Tensor::new(
                t.shape.clone(),
                t.data.iter().map(|&x| E::from_f32(x as f32)).collect(),
            ),
        }
    }
}

/// The element a run's output rows are assembled in (see [`CpuOutput`]):
/// f32, f64, bf16 and f16.
pub trait OutElem: Copy + Default + Send + Sync + 'static {
    fn from_real<T: Real>(x: T) -> Self;
    fn wrap(t: Tensor<Self>) -> CpuOutput;
}

macro_rules! out_elem {
    ($t:ty, $variant:ident, |$x:ident| $conv:expr) => {
        impl OutElem for $t {
            #[inline(always)]
            fn from_real<T: Real>($x: T) -> Self {
                $conv
            }
            fn wrap(t: Tensor<Self>) -> CpuOutput {
                CpuOutput::$variant(t)
            }
        }
    };
}
out_elem!(f32, F32, |x| x.to_f64() as f32);
out_elem!(f64, F64, |x| x.to_f64());
out_elem!(
    half::bf16,
    Bf16,
    |x| half::bf16::from_f32(x.to_f64() as f32)
);
out_elem!(half::f16, F16, |x| half::f16::from_f32(x.to_f64() as f32));

/// What a run did, for load-balance and skipping reports.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunStats {
    pub path: CpuPath,
    pub ranks: usize,
    pub sharding: Sharding,
    /// (i, j) pairs each rank computed, over all batches and heads: every pair
    /// of every non-skipped tile on the blocked path; the intra-chunk
    /// (causal) pairs on the chunkwise path, whose inter-chunk work is O(d^2).
    pub pairs_per_rank: Vec<u64>,
    /// Ring steps (blocked) or shard ranges (chunkwise) computed.
    pub steps_computed: u64,
    /// Ring steps whose tiles were all Skip, so nothing was computed.
    pub steps_skipped: u64,
    /// Tiles by class over all steps (blocked path): `skip` counts skipped
    /// tiles inside the key-block runs, not those outside them.
    pub tiles: ClassCounts,
    /// The blocked path ran in its decode form (few queries against many
    /// keys: the keys split over the workers, a kv group's query heads in
    /// one tile, no packed shard).
    pub decode: bool,
    /// The blocked path's tile products ran in bf16 ([`bf16`]; a bf16 run
    /// on a CPU with AVX-512 BF16).
    #[serde(default)]
    pub bf16_products: bool,
    /// A convolution ran as an FFT (long filters on one rank; see
    /// `cpu::fft`), not as blocked Toeplitz tiles.
    #[serde(default)]
    pub fft: bool,
    pub elapsed: Duration,
}

impl RunStats {
    /// Busiest rank's pairs over the mean (1.0 = perfectly balanced).
    pub fn imbalance(&self) -> f64 {
        let n = self.pairs_per_rank.len().max(1) as f64;
        let mean = self.pairs_per_rank.iter().sum::<u64>() as f64 / n;
        let max = self.pairs_per_rank.iter().copied().max().unwrap_or(0) as f64;
        if mean == 0.0 {
            1.0
        } else {
            max / mean
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct CpuRun {
    pub output: CpuOutput,
    /// `[batch, heads, seq]` (empty from [`CpuMixer::run`]; filled by
    /// [`CpuMixer::run_train`]), what the backward pass needs of each row: the
    /// natural-log log-sum-exp of the weights for softmax (`-inf` for a row
    /// that sees no key), the weight sum `l` (before `eps`) for sum, 0 for none.
    pub stat: Tensor<f64>,
    pub stats: RunStats,
    /// The recurrent state after the last position ([`CpuMixer::run_state`]
    /// only).
    pub state: Option<RecurrentState>,
}

/// The recurrent state of a causal linear, retention or gated mixer after
/// a run (the chunkwise forms): per (batch row, head) `S = sum_j
/// decay(j) psi(k_j) v_j^T` and `z = sum_j decay(j) psi(k_j)`, decayed to
/// the last position. A later run that starts from it continues the
/// sequence in O(d_k d_v) per token, whatever came before.
#[derive(Debug, Clone, PartialEq)]
pub struct RecurrentState {
    /// `[batch, heads, head_dim, value_dim]`.
    pub s: Tensor<f32>,
    /// `[batch, heads, head_dim]`.
    pub z: Tensor<f32>,
}

impl RecurrentState {
    /// The state of an empty prefix.
    pub fn zeros(batch: usize, heads: usize, dk: usize, dv: usize) -> RecurrentState {
        RecurrentState {
            s: Tensor::zeros(&[batch, heads, dk, dv]),
            z: Tensor::zeros(&[batch, heads, dk]),
        }
    }

    fn to_prefix<T: Real>(&self) -> chunkwise::PrefixState<T> {
        let cast = |x: &[f32]| x.iter().map(|&v| T::from_f64(v as f64)).collect();
        chunkwise::PrefixState {
            start: 0,
            s: cast(&self.s.data),
            z: cast(&self.z.data),
        }
    }

    fn from_prefix<T: Real>(p: &chunkwise::PrefixState<T>, shape: [usize; 4]) -> Self {
        let [b, h, dk, dv] = shape;
        let cast = |x: &[T]| x.iter().map(|v| v.to_f64() as f32).collect();
        RecurrentState {
            s: Tensor::new(vec![b, h, dk, dv], cast(&p.s)),
            z: Tensor::new(vec![b, h, dk], cast(&p.z)),
        }
    }
}

/// A spec prepared for the CPU backend: validated once, its algorithm
/// chosen, its worker pool started (shared by every handle with the same
/// thread count). [`CpuMixer::run`] then takes any batch and sequence length.
#[derive(Clone)]
pub struct CpuMixer {
    spec: MixerSpec,
    cfg: CpuConfig,
    path: CpuPath,
    pool: std::sync::Arc<rayon::ThreadPool>,
}

impl std::fmt::Debug for CpuMixer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CpuMixer")
            .field("spec", &self.spec.name)
            .field("cfg", &self.cfg)
            .field("path", &self.path)
            .finish()
    }
}

/// The process's worker pools, one per thread count: handles share them, so
/// building many mixers starts no new threads.
fn shared_pool(threads: usize) -> Result<std::sync::Arc<rayon::ThreadPool>> {
    use std::collections::HashMap;
    use std::sync::{Arc, Mutex, OnceLock};
    static POOLS: OnceLock<Mutex<HashMap<usize, Arc<rayon::ThreadPool>>>> = OnceLock::new();
    let mut pools = POOLS
        .get_or_init(Default::default)
        .lock()
        .unwrap_or_else(|p| p.into_inner());
    if let Some(p) = pools.get(&threads) {
        return Ok(p.clone());
    }
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .thread_name(|i| format!("mixc-cpu-{i}"))
        .build()
        .map_err(|e| {
            RuntimeError::Invalid(format!("CPU backend: cannot start {threads} threads: {e}"))
        })?;
    let pool = Arc::new(pool);
    pools.insert(threads, pool.clone());
    Ok(pool)
}

impl CpuMixer {
    /// Validates `spec` and `cfg` and prepares the run; no input is read.
    pub fn new(spec: &MixerSpec, cfg: &CpuConfig) -> Result<CpuMixer> {
        cfg.validate()?;
        check_spec(spec)?;
        let pool = shared_pool(cfg.threads)?;
        crate::counters::bump(crate::counters::Work::CpuPlan);
        Ok(CpuMixer {
            spec: spec.clone(),
            cfg: cfg.clone(),
            path: path_for(spec),
            pool,
        })
    }

    pub fn spec(&self) -> &MixerSpec {
        &self.spec
    }

    pub fn config(&self) -> &CpuConfig {
        &self.cfg
    }

    /// The algorithm this spec runs with.
    pub fn path(&self) -> CpuPath {
        self.path
    }

    /// Runs one input set (any batch and sequence length of at least the
    /// ring's rank count). [`CpuRun::stat`] is left empty (see
    /// [`CpuMixer::run_train`]).
    pub fn run<E: HostElem + OutElem>(&self, inputs: &MixerInputs<E>) -> Result<CpuRun> {
        self.run_keeping(inputs, false)
    }

    /// [`CpuMixer::run`] that also returns each row's statistic
    /// ([`CpuRun::stat`]), which [`CpuMixer::backward`] needs; inference
    /// skips it (at a million tokens it is hundreds of MiB).
    pub fn run_train<E: HostElem + OutElem>(&self, inputs: &MixerInputs<E>) -> Result<CpuRun> {
        self.run_keeping(inputs, true)
    }

    /// This process's rank of a ring over processes (`transport`: the
    /// ring's rank count and this rank; the configuration's rank count is
    /// not used). `inputs` have the whole sequence's shapes, but only this
    /// rank's positions of q, k and v ([`RingSchedule::shard`] under the
    /// configuration's sharding) are read: the rest may be zeros that were
    /// never written (a zeroed allocation costs no memory for pages never
    /// touched). Only this rank's rows of the output (and statistic, with
    /// `keep_stat`) are written; the others are zeros. Extra inputs are
    /// whole. Queries and keys must be one sequence.
    pub fn run_rank<E: HostElem + OutElem>(
        &self,
        inputs: &MixerInputs<E>,
        keep_stat: bool,
        transport: &Arc<dyn Transport>,
    ) -> Result<CpuRun> {
        self.run_on(inputs, keep_stat, Ranks::Remote(transport), None)
    }

    fn run_keeping<E: HostElem + OutElem>(
        &self,
        inputs: &MixerInputs<E>,
        keep_stat: bool,
    ) -> Result<CpuRun> {
        self.run_on(inputs, keep_stat, Ranks::Threads(self.cfg.ranks), None)
    }

    /// A run of a causal linear, retention or gated mixer (the chunkwise
    /// form) that continues from `state` (the state of everything before
    /// the inputs' position 0; `None`: nothing came before) and returns the
    /// state after its last position ([`CpuRun::state`]): a prefill, then
    /// decode steps of a token or a few, each O(d_k d_v) per token. One
    /// rank; queries and keys one sequence.
    pub fn run_state<E: HostElem + OutElem>(
        &self,
        inputs: &MixerInputs<E>,
        state: Option<&RecurrentState>,
    ) -> Result<CpuRun> {
        let spec = &self.spec;
        if self.path != CpuPath::Chunkwise {
            return Err(RuntimeError::Unsupported {
                backend: "CPU",
                what: format!(
                    "a recurrent state for `{}`: only causal linear, retention and gated mixers \
                     without bias or transform carry one",
                    spec.name
                ),
            });
        }
        if !inputs.is_self_aligned() {
            return Err(RuntimeError::BadInput {
                name: "q".into(),
                problem: format!(
                    "a run that carries a state takes the new tokens' queries, keys and \
                     values alike ({} queries against {} keys)",
                    inputs.seq, inputs.kv_seq
                ),
            });
        }
        let (h, dk, dv) = (
            spec.heads as usize,
            spec.head_dim as usize,
            spec.value_dim as usize,
        );
        if let Some(st) = state {
            let (ws, wz) = ([inputs.batch, h, dk, dv], [inputs.batch, h, dk]);
            if st.s.shape != ws || st.z.shape != wz {
                return Err(RuntimeError::BadInput {
                    name: "state".into(),
                    problem: format!(
                        "must be s {ws:?} and z {wz:?} (batch, heads, head_dim, value_dim), \
                         got {:?} and {:?}",
                        st.s.shape, st.z.shape
                    ),
                });
            }
        }
        self.run_on(inputs, false, Ranks::Threads(1), Some(state))
    }

    fn run_on<E: HostElem + OutElem>(
        &self,
        inputs: &MixerInputs<E>,
        keep_stat: bool,
        ranks: Ranks<'_>,
        state: Option<Option<&RecurrentState>>,
    ) -> Result<CpuRun> {
        let (spec, cfg) = (&self.spec, &self.cfg);
        validate_inputs(spec, inputs)?;
        ranks.check(inputs)?;
        // The state forms walk one sequence of positions; queries elsewhere
        // than their keys (decode, chunked prefill, cross-attention) run
        // blocked, which any family can (`forward_with_state` is the O(1)
        // decode step of the state forms).
        let path = if inputs.is_self_aligned() {
            self.path
        } else {
            CpuPath::Blocked
        };
        let sched = RingSchedule::for_inputs(inputs, ranks.count(), cfg.sharding)?;
        let start = Instant::now();
        let pool = &*self.pool;
        let run = RunOn {
            sched: &sched,
            ranks,
            path,
            keep_stat,
            state,
        };
        let (output, stat, mut stats, state) = match cfg.precision {
            Precision::F32 | Precision::Bf16 => {
                let r = run_typed::<f32, E, E>(spec, inputs, cfg, pool, &run)?;
                (E::wrap(r.out), r.stat, r.stats, r.state)
            }
            Precision::F64 => {
                let r = run_typed::<f64, E, f64>(spec, inputs, cfg, pool, &run)?;
                (CpuOutput::F64(r.out), r.stat, r.stats, r.state)
            }
        };
        stats.elapsed = start.elapsed();
        Ok(CpuRun {
            output,
            stat,
            stats,
            state,
        })
    }
}

/// Gradients from a CPU backward run, in the run's precision.
#[derive(Debug, Clone, PartialEq)]
pub enum CpuGradients {
    F32(Gradients<f32>),
    F64(Gradients<f64>),
}

impl CpuGradients {
    /// As f32 (what the host API returns).
    pub fn into_f32(self) -> Gradients<f32> {
        match self {
            CpuGradients::F32(g) => g,
            CpuGradients::F64(g) => g.to_f32(),
        }
    }
}

impl CpuMixer {
    /// The gradients of `sum(o * d_o)` for one input set, given the forward's
    /// output `o` and row statistics `stat` ([`CpuRun::stat`]), on the
    /// forward's algorithm and ring schedule: the chunkwise backward where
    /// the forward is chunkwise (states forward and backward in sequence
    /// order), the global-state backward where it is global (`mask = all`
    /// linear: states all-reduced around the ring), else the blocked
    /// backward on the same block plan.
    pub fn backward(
        &self,
        inputs: &MixerInputs,
        o: &Tensor<f32>,
        stat: &Tensor<f64>,
        d_o: &Tensor<f32>,
    ) -> Result<CpuGradients> {
        self.backward_on(inputs, o, stat, d_o, Ranks::Threads(self.cfg.ranks))
    }

    /// This process's rank of the backward of a ring over processes (see
    /// [`CpuMixer::run_rank`]): only this rank's positions of q, k, v, `o`,
    /// `stat` and `d_o` are read, and only this rank's positions of the
    /// q, k and v gradients are written. The gradients of extra inputs are
    /// this rank's part: their sum over the ranks is the gradient.
    pub fn backward_rank(
        &self,
        inputs: &MixerInputs,
        o: &Tensor<f32>,
        stat: &Tensor<f64>,
        d_o: &Tensor<f32>,
        transport: &Arc<dyn Transport>,
    ) -> Result<CpuGradients> {
        self.backward_on(inputs, o, stat, d_o, Ranks::Remote(transport))
    }

    fn backward_on(
        &self,
        inputs: &MixerInputs,
        o: &Tensor<f32>,
        stat: &Tensor<f64>,
        d_o: &Tensor<f32>,
        ranks: Ranks<'_>,
    ) -> Result<CpuGradients> {
        let (spec, cfg) = (&self.spec, &self.cfg);
        validate_inputs(spec, inputs)?;
        ranks.check(inputs)?;
        crate::grad::validate_upstream(spec, inputs, d_o)?;
        let o_shape = [
            inputs.batch,
            inputs.seq,
            spec.heads as usize,
            spec.value_dim as usize,
        ];
        let s_shape = [inputs.batch, spec.heads as usize, inputs.seq];
        for (name, got, want) in [
            ("o", &o.shape, &o_shape[..]),
            ("stat", &stat.shape, &s_shape[..]),
        ] {
            if got != want {
                return Err(RuntimeError::BadInput {
                    name: name.into(),
                    problem: format!(
                        "the forward's `{name}` must have shape {want:?}, got {got:?}"
                    ),
                });
            }
        }
        // As the forward: queries elsewhere than their keys run blocked.
        let path = if inputs.is_self_aligned() {
            path_for(spec)
        } else {
            CpuPath::Blocked
        };
        let sched = RingSchedule::for_inputs(inputs, ranks.count(), cfg.sharding)?;
        let up = backward::Upstream { o, stat, d_o };
        let pool = &*self.pool;
        let run = RunOn {
            sched: &sched,
            ranks,
            path,
            keep_stat: true,
            state: None,
        };
        Ok(match cfg.precision {
            Precision::F32 | Precision::Bf16 => {
                CpuGradients::F32(backward_typed::<f32>(spec, inputs, cfg, pool, &run, &up)?)
            }
            Precision::F64 => {
                CpuGradients::F64(backward_typed::<f64>(spec, inputs, cfg, pool, &run, &up)?)
            }
        })
    }
}

fn backward_typed<T: Real>(
    spec: &MixerSpec,
    inputs: &MixerInputs,
    cfg: &CpuConfig,
    pool: &rayon::ThreadPool,
    run: &RunOn<'_>,
    up: &backward::Upstream<'_>,
) -> Result<Gradients<T>> {
    // (Built for the blocked path: its cumulative log-gates serve both.)
    // The backward's products are f32 (bf16 runs included).
    let mut ctx = build_ctx::<T, _>(spec, inputs, cfg, pool, CpuPath::Blocked);
    ctx.bf16 = false;
    let sched = run.sched;
    let ranks = match run.path {
        CpuPath::Chunkwise => run.ranks.run(|ep| {
            let qside = backward::q_side(&ctx, up, sched.shard(ep.rank));
            backward_chunkwise::rank_main(&ctx, sched, &qside, ep)
        }),
        CpuPath::GlobalState => run.ranks.run(|ep| {
            let qside = backward::q_side(&ctx, up, sched.shard(ep.rank));
            backward_chunkwise::rank_main_global(&ctx, &qside, ep)
        }),
        _ => run.ranks.run(|ep| backward::rank_main(&ctx, sched, up, ep)),
    }
    .into_iter()
    .collect::<Result<Vec<_>>>()?;
    Ok(backward::assemble(&ctx, sched, ranks))
}

/// Runs `spec` on `inputs` with the ring/blocked CPU algorithm (a one-off
/// [`CpuMixer`]; build one to run many input sets).
pub fn run<E: HostElem + OutElem>(
    spec: &MixerSpec,
    inputs: &MixerInputs<E>,
    cfg: &CpuConfig,
) -> Result<CpuRun> {
    CpuMixer::new(spec, cfg)?.run(inputs)
}

/// `Ok` when the CPU backend can run `spec` (every validated spec), else
/// why not, in the spec's terms.
pub fn supports(spec: &MixerSpec) -> std::result::Result<(), String> {
    check_spec(spec).map_err(|e| e.to_string())
}

/// What validation guarantees for parsed specs but hand-built ones may break;
/// checked so a bad spec is an error, not an out-of-range panic.
fn check_spec(spec: &MixerSpec) -> Result<()> {
    Ok(spec.check_invariants()?)
}

/// Read-only state shared by every rank of one run.
pub(crate) struct Ctx<'a, T> {
    spec: &'a MixerSpec,
    /// The lengths and extra inputs.
    inputs: InputsMeta<'a>,
    /// q `[batch, seq, heads, dk]`, k `[batch, positions, kv_heads, dk]`,
    /// v `[batch, positions, kv_heads, dv]`, in their storage type (read
    /// through [`Ctx::q_at`] and friends).
    q: Elems<'a>,
    k: Elems<'a>,
    v: Elems<'a>,
    /// The shapes of q, k and v (q and k are `[0]` for the convolution
    /// family).
    shapes: [&'a [usize]; 3],
    pool: &'a rayon::ThreadPool,
    batch: usize,
    /// Queries per batch row.
    seq: usize,
    /// Key positions per batch row (`seq` for self-attention); the length of
    /// every per-position table (`gate_cum`, segment summaries).
    positions: usize,
    /// Position of query 0: query `i`'s row of q is `i - q_offset`.
    q_offset: usize,
    heads: usize,
    kv_heads: usize,
    dk: usize,
    dv: usize,
    tiling: Tiling,
    chunk: usize,
    k_map: FeatureMap,
    /// Bias / transform specialised per head (`[head]`), or per batch row
    /// and head (`[batch][head]`) when the expression reads `b`: see
    /// [`Ctx::bias_at`].
    bias: Vec<Option<FastExpr<'a>>>,
    transform: Vec<Option<FastExpr<'a>>>,
    /// The mask compiled whole as one condition for Partial tiles, `[head]`
    /// or `[batch][head]` like `bias`; empty for `all`, and `None` entries
    /// for masks over segment ids (tested pair by pair).
    mask_lanes: Vec<Option<FastExpr<'a>>>,
    /// Convolution filter `[heads][filter_len]` in compute precision.
    filter: Option<Vec<T>>,
    filter_len: usize,
    has_decay: bool,
    /// ln gamma per head (per-head decay).
    log_gamma: Vec<f64>,
    /// Inclusive prefix sums of ln gate, `[batch][head][positions]`, blocked path
    /// only. Per-token scalars every rank may hold (on GPUs: an exclusive scan
    /// of per-shard totals); f64 so differences stay exact over long sequences.
    gate_cum: Vec<f64>,
    /// Segment-id summaries per batch row, for classifying tiles.
    segs: Vec<SegmentSummaries>,
    /// Whether the ranks report each row's statistic (training).
    keep_stat: bool,
    /// A one-rank blocked or chunkwise run writes each finished query row
    /// here (batch row, query row, head, the normalised row) instead of
    /// keeping its rows in an f32 buffer the size of the output (see
    /// [`RowSink`]).
    direct: Option<&'a RowSink<'a, T>>,
    /// Whether the blocked path's tile products run in bf16 ([`bf16`]):
    /// a bf16 run on a CPU that has the instructions, dot scores, an even
    /// `block_n` (key pairs never straddle two tiles).
    bf16: bool,
    /// The chunkwise forms' recurrent state: the state before position 0
    /// (a previous call's), and where the state after the last position
    /// goes when the caller keeps it ([`CpuMixer::run_state`]).
    state_in: Option<chunkwise::PrefixState<T>>,
    state_out: Option<std::sync::Mutex<Option<chunkwise::PrefixState<T>>>>,
}

impl<'a, T> Ctx<'a, T> {
    /// The bias specialised to batch row `b` and head `h`.
    fn bias_at(&self, b: usize, h: usize) -> Option<&FastExpr<'a>> {
        self.bias[self.expr_slot(self.bias.len(), b, h)].as_ref()
    }
    /// The transform specialised to batch row `b` and head `h`.
    fn transform_at(&self, b: usize, h: usize) -> Option<&FastExpr<'a>> {
        self.transform[self.expr_slot(self.transform.len(), b, h)].as_ref()
    }
    /// The compiled mask of batch row `b` and head `h`, if there is one.
    fn mask_at(&self, b: usize, h: usize) -> Option<&FastExpr<'a>> {
        if self.mask_lanes.is_empty() {
            return None;
        }
        self.mask_lanes[self.expr_slot(self.mask_lanes.len(), b, h)].as_ref()
    }
    /// Where query row `row` (query position `row + q_offset`) of head `h`
    /// of batch row `b` starts in `q`.
    #[inline]
    fn q_at(&self, b: usize, row: usize, h: usize) -> usize {
        ((b * self.seq + row) * self.heads + h) * self.dk
    }
    /// Where key position `pos` of kv head `kvh` of batch row `b` starts in
    /// `k` (`kvh = 0`: the position's first kv head; they follow each other).
    #[inline]
    fn k_at(&self, b: usize, pos: usize, kvh: usize) -> usize {
        ((b * self.positions + pos) * self.kv_heads + kvh) * self.dk
    }
    /// As [`Ctx::k_at`], in `v`.
    #[inline]
    fn v_at(&self, b: usize, pos: usize, kvh: usize) -> usize {
        ((b * self.positions + pos) * self.kv_heads + kvh) * self.dv
    }
    fn expr_slot(&self, len: usize, b: usize, h: usize) -> usize {
        if len > self.heads {
            b * self.heads + h
        } else {
            h
        }
    }
    /// What the block plan may know when classifying the tiles of batch
    /// row `b` (and head `h`, when given): segment ids, and the variables
    /// an expression mask reads.
    fn tiles_of(&self, b: usize, h: Option<usize>) -> At<'_> {
        At {
            segs: &self.segs[b],
            tables: Some(&self.inputs),
            known: self.inputs.known(self.spec.heads, b, h),
        }
    }
}

/// Where a one-rank blocked run puts its finished rows: straight into
/// the output tensor, in its storage type (a bf16 run never holds an f32
/// copy of its output). Each call writes one disjoint row.
pub(crate) type RowSink<'a, T> = dyn Fn(usize, usize, usize, &[T]) + Sync + 'a;

/// A rank's share of the output and what it did.
pub(crate) struct RankOutput<T> {
    ranges: Vec<std::ops::Range<usize>>,
    /// `[batch * heads][shard position][dv]`, normalised.
    y: Vec<T>,
    /// `[batch * heads][shard position]`: each row's statistic (see
    /// [`CpuRun::stat`]).
    stat: Vec<f64>,
    stats: RankStats,
}

#[derive(Debug, Clone, Default)]
pub(crate) struct RankStats {
    /// The rank wrote its rows into the output itself (`Ctx::direct`):
    /// its `y` is empty.
    direct: bool,
    decode: bool,
    fft: bool,
    pairs: u64,
    steps_computed: u64,
    steps_skipped: u64,
    tiles: ClassCounts,
}

fn build_ctx<'a, T: Real, E: HostElem>(
    spec: &'a MixerSpec,
    inputs: &'a MixerInputs<E>,
    cfg: &CpuConfig,
    pool: &'a rayon::ThreadPool,
    path: CpuPath,
) -> Ctx<'a, T> {
    let (batch, seq, heads) = (inputs.batch, inputs.seq, spec.heads as usize);
    let positions = inputs.kv_seq;
    // Specialised per head, and per batch row too where the expression reads `b`.
    let per_head = |e: &Option<mixc_dsl::ir::Expr>| -> Vec<Option<FastExpr<'a>>> {
        let rows = match e {
            Some(e) if e.uses_var(mixc_dsl::ir::Var::B) => batch,
            _ => 1,
        };
        (0..rows * heads)
            .map(|x| {
                e.as_ref()
                    .map(|e| FastExpr::new(e, x / heads, x % heads, spec.heads, inputs.meta()))
            })
            .collect()
    };
    let (filter, filter_len) = match &spec.score {
        Score::Filter { input } => {
            let t = &inputs.extra[input.as_str()];
            let len = t.shape().last().copied().unwrap_or(1).max(1);
            let f = (0..heads)
                .flat_map(|h| (0..len).map(move |x| (h, x)))
                .map(|(h, x)| T::from_f64(t.get_clamped(&[h as i64, x as i64])))
                .collect();
            (Some(f), len)
        }
        Score::Dot { .. } => (None, 0),
    };
    let log_gamma = match &spec.decay {
        Decay::PerHead(e) => (0..heads)
            .map(|h| {
                let lookup = |name: &str, idx: &[i64]| inputs.extra[name].get_clamped(idx);
                e.eval_f64(&EvalEnv::for_head(h as i64, spec.heads, &lookup))
                    .ln()
            })
            .collect(),
        _ => Vec::new(),
    };
    let gate_cum = match (&spec.decay, path) {
        (Decay::Gate { input }, CpuPath::Blocked) => {
            let g = &inputs.extra[input.as_str()];
            let mut c = vec![0.0f64; batch * heads * positions];
            for b in 0..batch {
                for h in 0..heads {
                    let row = &mut c[(b * heads + h) * positions..][..positions];
                    let mut acc = 0.0;
                    for (p, x) in row.iter_mut().enumerate() {
                        acc += g.get_clamped(&[b as i64, p as i64, h as i64]).ln();
                        *x = acc;
                    }
                }
            }
            c
        }
        _ => Vec::new(),
    };
    let mut seg_names = Vec::new();
    spec.mask.segment_inputs(&mut seg_names);
    let block = cfg.block_m.min(cfg.block_n);
    let segs = (0..batch)
        .map(|b| SegmentSummaries {
            entries: seg_names
                .iter()
                .map(|name| {
                    let t = &inputs.extra[name.as_str()];
                    let ids = (0..positions).map(|p| t.get_clamped(&[b as i64, p as i64]) as i64);
                    (name.clone(), SegmentSummary::new(ids, block))
                })
                .collect(),
        })
        .collect();
    Ctx {
        spec,
        inputs: inputs.meta(),
        q: E::elems(&inputs.q.data),
        k: E::elems(&inputs.k.data),
        v: E::elems(&inputs.v.data),
        shapes: [&inputs.q.shape, &inputs.k.shape, &inputs.v.shape],
        pool,
        batch,
        seq,
        positions,
        q_offset: inputs.q_offset,
        heads,
        kv_heads: spec.kv_heads as usize,
        dk: spec.head_dim as usize,
        dv: spec.value_dim as usize,
        tiling: Tiling {
            block_m: cfg.block_m,
            block_n: cfg.block_n,
        },
        chunk: cfg.chunk,
        k_map: match &spec.score {
            Score::Dot { k_map, .. } => *k_map,
            Score::Filter { .. } => FeatureMap::Identity,
        },
        bias: per_head(&spec.bias),
        transform: per_head(&spec.transform),
        // Partial tiles test their pairs a row at a time through the
        // compiled mask (about 10% faster than `Mask::allows` per pair for
        // a windowed causal mask at L = 8192, several times for conditions).
        mask_lanes: match spec.mask {
            Mask::All => Vec::new(),
            _ => per_head(&spec.mask.to_expr()),
        },
        filter,
        filter_len,
        has_decay: !matches!(spec.decay, Decay::None),
        log_gamma,
        gate_cum,
        segs,
        keep_stat: false,
        direct: None,
        bf16: cfg.precision == Precision::Bf16
            && std::any::TypeId::of::<T>() == std::any::TypeId::of::<f32>()
            && matches!(spec.score, Score::Dot { .. })
            && cfg.block_n.is_multiple_of(2)
            && bf16::enabled(),
        state_in: None,
        state_out: None,
    }
}

fn run_typed<T: Real, E: HostElem, O: OutElem>(
    spec: &MixerSpec,
    inputs: &MixerInputs<E>,
    cfg: &CpuConfig,
    pool: &rayon::ThreadPool,
    run: &RunOn<'_>,
) -> Result<TypedRun<O>> {
    let (sched, path, keep_stat) = (run.sched, run.path, run.keep_stat);
    let mut ctx = build_ctx::<T, _>(spec, inputs, cfg, pool, path);
    ctx.keep_stat = keep_stat;
    let (heads, dv) = (ctx.heads, ctx.dv);
    let mut out = Tensor::<O>::zeros(&[inputs.batch, inputs.seq, heads, dv]);
    // One rank on threads: its rows go straight into `out` (rows of no
    // visible key stay 0, which is their output).
    let out_ptr = OutRows(out.data.as_mut_ptr());
    let sink = move |b: usize, row: usize, h: usize, y: &[T]| {
        let at = ((b * inputs.seq + row) * heads + h) * dv;
        // SAFETY: `(b, row, h)` lies inside `out` (`[batch, seq, heads,
        // dv]`), each row is written by one item alone, and the ranks end
        // before `out` is read or moved.
        let dst = unsafe { std::slice::from_raw_parts_mut(out_ptr.at(at), dv) };
        for (d, &x) in dst.iter_mut().zip(y) {
            *d = O::from_real(x);
        }
    };
    if sched.ranks == 1
        && matches!(run.ranks, Ranks::Threads(_))
        && matches!(path, CpuPath::Blocked | CpuPath::Chunkwise)
    {
        ctx.direct = Some(&sink);
    }
    if let Some(state) = run.state {
        ctx.state_in = state.map(RecurrentState::to_prefix);
        ctx.state_out = Some(std::sync::Mutex::new(None));
    }
    let ranks = sched.ranks;
    let outs: Vec<Result<RankOutput<T>>> = match path {
        CpuPath::Blocked => run.ranks.run(|ep| blocked::rank_main(&ctx, sched, ep)),
        CpuPath::Chunkwise => run.ranks.run(|ep| chunkwise::rank_main(&ctx, sched, ep)),
        CpuPath::GlobalState => run
            .ranks
            .run(|ep| chunkwise::rank_main_global(&ctx, sched, ep)),
    };
    let mut stat = if keep_stat {
        Tensor::<f64>::zeros(&[inputs.batch, heads, inputs.seq])
    } else {
        Tensor::new(vec![0], Vec::new())
    };
    let mut stats = RunStats {
        path,
        ranks,
        sharding: sched.sharding,
        pairs_per_rank: Vec::with_capacity(ranks),
        steps_computed: 0,
        steps_skipped: 0,
        tiles: ClassCounts::default(),
        decode: false,
        bf16_products: false,
        fft: false,
        elapsed: Duration::ZERO,
    };
    for o in outs {
        let mut o = o?;
        let positions: Vec<usize> = o.ranges.iter().flat_map(|r| r.clone()).collect();
        let n = positions.len();
        // A few thousand positions at a time, every (batch, head): the
        // rank's rows of those positions go into `out` and then their pages
        // go back, so the rank's result and the output never both exist
        // whole (one output-sized buffer less at the peak).
        // Only large results: a released page faults in again on the next
        // call, which a bench loop on a mid-sized run would pay each time.
        const POSITIONS_PER_PASS: usize = 4096;
        const RELEASE_ABOVE_BYTES: usize = 256 << 20;
        let release = std::mem::size_of_val(o.y.as_slice()) >= RELEASE_ABOVE_BYTES;
        for t0 in (0..n).step_by(POSITIONS_PER_PASS) {
            let t1 = (t0 + POSITIONS_PER_PASS).min(n);
            for x in 0..inputs.batch * heads {
                let (b, h) = (x / heads, x % heads);
                for (t, &pos) in positions.iter().enumerate().take(t1).skip(t0) {
                    // Rank ranges hold query positions; rows are query indices.
                    let row = pos - inputs.q_offset;
                    // A rank that wrote its rows into `out` (`Ctx::direct`)
                    // brings only their statistic.
                    if !o.stats.direct {
                        let src = &o.y[(x * n + t) * dv..(x * n + t + 1) * dv];
                        let dst = out.offset(&[b, row, h, 0]);
                        for (d, &s) in out.data[dst..dst + dv].iter_mut().zip(src) {
                            *d = O::from_real(s);
                        }
                    }
                    if keep_stat {
                        stat.data[x * inputs.seq + row] = o.stat[x * n + t];
                    }
                }
                if release {
                    crate::memory::release_pages(&mut o.y[(x * n + t0) * dv..(x * n + t1) * dv]);
                }
            }
        }
        stats.pairs_per_rank.push(o.stats.pairs);
        stats.decode |= o.stats.decode;
        stats.fft |= o.stats.fft;
        stats.steps_computed += o.stats.steps_computed;
        stats.steps_skipped += o.stats.steps_skipped;
        stats.tiles.full += o.stats.tiles.full;
        stats.tiles.partial += o.stats.tiles.partial;
        stats.tiles.skip += o.stats.tiles.skip;
    }
    stats.bf16_products = ctx.bf16 && path == CpuPath::Blocked && !stats.decode;
    let shape = [inputs.batch, heads, ctx.dk, dv];
    let state = ctx.state_out.take().map(|m| {
        match m.into_inner().unwrap_or_else(|e| e.into_inner()) {
            Some(p) => RecurrentState::from_prefix(&p, shape),
            // Zero positions: the state comes through unchanged.
            None => match run.state.flatten() {
                Some(s) => s.clone(),
                None => RecurrentState::zeros(shape[0], shape[1], shape[2], shape[3]),
            },
        }
    });
    Ok(TypedRun {
        out,
        stat,
        stats,
        state,
    })
}

/// The output's elements, written row by row by a one-rank run's workers.
#[derive(Clone, Copy)]
struct OutRows<O>(*mut O);
// SAFETY: only used for writes to disjoint rows, by workers that end before
// the output is read or moved.
unsafe impl<O> Send for OutRows<O> {}
unsafe impl<O> Sync for OutRows<O> {}
impl<O> OutRows<O> {
    /// # Safety
    /// `i` is inside the allocation.
    unsafe fn at(self, i: usize) -> *mut O {
        // SAFETY: the caller's contract.
        unsafe { self.0.add(i) }
    }
}

/// What [`run_typed`] returns: the output in the run's precision, the row
/// statistics, the run's figures, and the recurrent state when carried.
struct TypedRun<T> {
    out: Tensor<T>,
    stat: Tensor<f64>,
    stats: RunStats,
    state: Option<RecurrentState>,
}

/// Which ranks of the ring this process runs.
#[derive(Clone, Copy)]
enum Ranks<'a> {
    /// All of them, a thread each.
    Threads(usize),
    /// One, whose peers are other processes reached through the transport.
    Remote(&'a Arc<dyn Transport>),
}

impl Ranks<'_> {
    /// The ring's rank count.
    fn count(self) -> usize {
        match self {
            Ranks::Threads(n) => n,
            Ranks::Remote(t) => t.ranks(),
        }
    }

    fn check<E: HostElem>(self, inputs: &MixerInputs<E>) -> Result<()> {
        match self {
            Ranks::Remote(t) if t.rank() >= t.ranks() => Err(RuntimeError::Invalid(format!(
                "rank {} of a ring of {} ranks",
                t.rank(),
                t.ranks()
            ))),
            Ranks::Remote(_) if !inputs.is_self_aligned() => Err(RuntimeError::Unsupported {
                backend: "CPU",
                what: format!(
                    "a ring over processes with {} queries at offset {} against {} keys \
                     (queries and keys must be one sequence)",
                    inputs.seq, inputs.q_offset, inputs.kv_seq
                ),
            }),
            _ => Ok(()),
        }
    }

    /// Runs `rank_main` for each rank this process runs, with its endpoint;
    /// outputs in rank order.
    fn run<O: Send, M: Send, F>(self, rank_main: F) -> Vec<Result<O>>
    where
        F: Fn(crate::ring::Endpoint<M>) -> Result<O> + Sync,
    {
        match self {
            Ranks::Threads(n) => spawn_ranks(n, rank_main),
            Ranks::Remote(t) => vec![rank_main(crate::ring::Endpoint::remote(Arc::clone(t)))],
        }
    }
}

/// What one forward or backward call runs: its ring, the ranks of it this
/// process runs, and the algorithm.
struct RunOn<'a> {
    sched: &'a RingSchedule,
    ranks: Ranks<'a>,
    path: CpuPath,
    keep_stat: bool,
    /// `Some`: carry the recurrent state (from the given one, or from
    /// nothing) and return it.
    state: Option<Option<&'a RecurrentState>>,
}

/// Runs one scoped worker thread per rank, each with its ring endpoint, and
/// collects their outputs in rank order.
fn spawn_ranks<O: Send, M: Send, F>(ranks: usize, rank_main: F) -> Vec<Result<O>>
where
    F: Fn(crate::ring::Endpoint<M>) -> Result<O> + Sync,
{
    let rank_main = &rank_main;
    if ranks == 1 {
        // One rank needs no thread of its own (a call at a tiny shape
        // should cost little more than its arithmetic).
        return endpoints(1).into_iter().map(rank_main).collect();
    }
    std::thread::scope(|s| {
        let hs: Vec<_> = endpoints(ranks)
            .into_iter()
            .map(|ep| s.spawn(move || rank_main(ep)))
            .collect();
        hs.into_iter().map(join_rank).collect()
    })
}

fn join_rank<O>(h: std::thread::ScopedJoinHandle<'_, Result<O>>) -> Result<O> {
    h.join()
        .unwrap_or_else(|_| Err(RuntimeError::Invalid("a CPU rank thread panicked".into())))
}
