//! Transformer blocks around a mixer, computed blockwise (the Blockwise
//! Parallel Transformer): a [`Block`] is a [`BlockSpec`] prepared once and
//! called many times, forward and backward, like a [`Mixer`].
//!
//! **The schedule** (CPU; [`cpu`]). Rows (batch x positions) are processed
//! in blocks of `block_rows`:
//!
//! 1. per row block: `h = norm1(x)`, `q, k, v = h W*ᵀ`, rotary embedding on
//!    q and k, written into the whole-sequence q, k, v (O(L·d));
//! 2. the mixer over the whole sequence: the blocked CPU mixer, on its ring
//!    of `ranks` (query shards stay, key/value shards travel), which never
//!    holds more than a tile of scores;
//! 3. per row block: `y = x + o Woᵀ`, `z = norm2(y)`, the FFN on that block
//!    alone (a `[block_rows, d_ff]` scratch), `out = y + ffn(z)`.
//!
//! Training keeps x, q, k, v, o and the mixer's per-row statistic (all
//! O(L·d)); the backward recomputes each row block's `y`, norm and FFN
//! hidden instead of storing them, then runs the mixer's backward (in up
//! to 4 groups of heads where heads are independent, so the mixer's
//! scratch is a group's) and takes each group's dq, dk, dv straight back
//! through its rows of the projections, block by block. Nothing of size `L x d_ff` or
//! `L x L` is ever held: peak memory is the inputs, outputs, weights and
//! their gradients, the O(L·d) residuals and one row block's scratch
//! ([`Block::train_host_bytes`]).
//!
//! **The oracle** is [`reference`]: the same block unfused, in f64, over the
//! whole sequence at once, with gradients written from the chain rule and
//! checked against finite differences.

pub(crate) mod cpu;
pub(crate) mod ops;
pub mod reference;

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Instant;

use mixc_dsl::{BlockSpec, MixerSpec};

use crate::error::{Result, RuntimeError};
use crate::inputs::{first_non_finite, normal_tensor, stream};
use crate::mixer::{BackendKind, Mixer, Options, Residuals};
use crate::ring::{RankRows, Transport};
use crate::tensor::{ExtraTensor, MixerInputs, Tensor};
use cpu::Place;
use std::sync::Arc;

/// What a block reads besides its weights.
#[derive(Debug, Clone, PartialEq)]
pub struct BlockInputs {
    pub batch: usize,
    pub seq: usize,
    /// The residual stream `[batch, seq, width]`.
    pub x: Tensor<f32>,
    /// The mixer's extra inputs (tables, gates, segment ids), by name, in
    /// the shapes the mixer declares.
    pub extra: BTreeMap<String, ExtraTensor>,
}

impl BlockInputs {
    /// Inputs from `x [batch, seq, width]` alone (a mixer with no extra
    /// inputs).
    pub fn new(x: Tensor<f32>) -> BlockInputs {
        let dim = |a: usize| x.shape.get(a).copied().unwrap_or(0);
        BlockInputs {
            batch: dim(0),
            seq: dim(1),
            x,
            extra: BTreeMap::new(),
        }
    }

    /// Adds the mixer's extra input `name`.
    pub fn with_extra(mut self, name: &str, t: ExtraTensor) -> BlockInputs {
        self.extra.insert(name.to_string(), t);
        self
    }
}

/// A block's weights by name ([`BlockSpec::weight_shapes`]: Hugging Face
/// Llama names and `[out, in]` layouts).
#[derive(Debug, Clone, PartialEq)]
pub struct BlockWeights {
    pub tensors: BTreeMap<String, Tensor<f32>>,
}

impl BlockWeights {
    /// Seeded weights: projections normal with standard deviation
    /// `1/sqrt(in_features)` (unit-variance activations), norm gains
    /// `1 + 0.1 N(0,1)` and biases `0.1 N(0,1)` (not exactly 1 and 0, so
    /// tests see their gradients act). One stream per weight name.
    pub fn random(spec: &BlockSpec, seed: u64) -> BlockWeights {
        let tensors = spec
            .weight_shapes()
            .into_iter()
            .map(|(name, shape)| {
                let mut rng = stream(seed, &format!("block.{name}"));
                let t = if shape.len() == 2 {
                    normal_tensor(&mut rng, shape.clone(), 1.0 / (shape[1] as f64).sqrt())
                } else {
                    let mut t = normal_tensor(&mut rng, shape, 0.1);
                    if !name.ends_with(".bias") {
                        t.data.iter_mut().for_each(|g| *g += 1.0);
                    }
                    t
                };
                (name, t)
            })
            .collect();
        BlockWeights { tensors }
    }

    /// Reads every weight of `spec` from a safetensors file (f32, f16, bf16
    /// or f64 storage). Names are the block's own
    /// ([`BlockSpec::weight_shapes`]), optionally under a prefix such as
    /// `model.layers.3.` (a whole Llama checkpoint's layer 3).
    pub fn load(path: &Path, spec: &BlockSpec, prefix: &str) -> Result<BlockWeights> {
        let bytes = crate::io::read_bounded(path)?;
        let st =
            safetensors::SafeTensors::deserialize(&bytes).map_err(|e| RuntimeError::BadFile {
                path: path.display().to_string(),
                problem: format!("not a valid safetensors file: {e}"),
            })?;
        let mut tensors = BTreeMap::new();
        for name in spec.weight_shapes().into_keys() {
            let full = format!("{prefix}{name}");
            let view = st.tensor(&full).map_err(|_| RuntimeError::BadInput {
                name: full.clone(),
                problem: format!(
                    "missing from {} (block `{}` reads {})",
                    path.display(),
                    spec.name,
                    weight_list(spec)
                ),
            })?;
            tensors.insert(name, crate::io::read_f32(path, &full, &view)?);
        }
        Ok(BlockWeights { tensors })
    }

    /// Writes the weights as a safetensors file (f32).
    pub fn save(&self, path: &Path) -> Result<()> {
        crate::io::save_named(path, self.tensors.iter().map(|(n, t)| (n.as_str(), t)))
    }

    fn get(&self, name: &str) -> &[f32] {
        // Validation checked every name the spec reads is present.
        &self.tensors[name].data
    }

    fn get_opt(&self, name: &str) -> Option<&[f32]> {
        self.tensors.get(name).map(|t| t.data.as_slice())
    }
}

fn weight_list(spec: &BlockSpec) -> String {
    spec.weight_shapes()
        .iter()
        .map(|(n, s)| format!("`{n}` {s:?}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Seeded inputs: x standard normal `[batch, seq, width]`, the mixer's
/// extra inputs as [`crate::inputs::random_inputs`] draws them.
pub fn random_block_inputs(spec: &BlockSpec, batch: usize, seq: usize, seed: u64) -> BlockInputs {
    let shape = vec![batch, seq, spec.width as usize];
    let x = normal_tensor(&mut stream(seed, "block.x"), shape, 1.0);
    let mixer_extra = if spec.mixer.inputs.is_empty() {
        BTreeMap::new()
    } else {
        crate::inputs::random_inputs(&spec.mixer, batch, seq, seed).extra
    };
    BlockInputs {
        batch,
        seq,
        x,
        extra: mixer_extra,
    }
}

/// A seeded upstream gradient for the block's output `[batch, seq, width]`.
pub fn random_block_upstream(spec: &BlockSpec, batch: usize, seq: usize, seed: u64) -> Tensor<f32> {
    let shape = vec![batch, seq, spec.width as usize];
    normal_tensor(&mut stream(seed, "block.dout"), shape, 1.0)
}

/// Gradients of `sum(out * d_out)`: `dx` `[batch, seq, width]`, one per
/// weight (by the weight's name, in its shape), and one per float extra
/// input of the mixer.
#[derive(Debug, Clone, PartialEq)]
pub struct BlockGradients<T> {
    pub dx: Tensor<T>,
    pub weights: BTreeMap<String, Tensor<T>>,
    pub extra: BTreeMap<String, Tensor<T>>,
}

impl<T> BlockGradients<T> {
    /// Every gradient under the name of what it is the gradient of (`x`,
    /// each weight, each extra input).
    pub fn named(&self) -> Vec<(String, &Tensor<T>)> {
        let mut out = vec![("x".to_string(), &self.dx)];
        out.extend(self.weights.iter().map(|(n, t)| (n.clone(), t)));
        out.extend(self.extra.iter().map(|(n, t)| (n.clone(), t)));
        out
    }
}

impl BlockGradients<f64> {
    /// Rounded to f32.
    pub fn to_f32(&self) -> BlockGradients<f32> {
        let conv = |t: &Tensor<f64>| {
            Tensor::new(t.shape.clone(), t.data.iter().map(|&x| x as f32).collect())
        };
        let map = |m: &BTreeMap<String, Tensor<f64>>| {
            m.iter().map(|(n, t)| (n.clone(), conv(t))).collect()
        };
        BlockGradients {
            dx: conv(&self.dx),
            weights: map(&self.weights),
            extra: map(&self.extra),
        }
    }
}

/// A block's output and the time it took.
#[derive(Debug, Clone)]
pub struct BlockOutput {
    /// `[batch, seq, width]`.
    pub out: Tensor<f32>,
    pub seconds: f64,
}

/// A backward call's gradients and time.
#[derive(Debug, Clone)]
pub struct BlockBackward {
    pub grads: BlockGradients<f32>,
    pub seconds: f64,
}

/// What [`Block::backward`] needs from [`Block::forward_train`] besides the
/// inputs and weights: the mixer's inputs (q and k after the rotary
/// embedding, v), its output and its per-row statistic. O(L·d) in all.
#[derive(Debug, Clone)]
pub struct BlockResiduals {
    pub(crate) mixer_inputs: MixerInputs,
    pub(crate) o: Tensor<f32>,
    pub(crate) mixer: Residuals,
}

impl BlockResiduals {
    /// What the backward reads, for a caller that keeps it between the
    /// forward and the backward itself (the Python op saves them as tensors
    /// for autograd): `[q, k, v, o]` (the mixer's inputs and output in its
    /// layouts, `[batch, seq, heads, dim]`) and its statistic `[batch,
    /// heads, seq]` (f64; empty where the mixer keeps none). All empty on
    /// the reference backend, whose backward recomputes.
    pub fn parts(&self) -> ([&Tensor<f32>; 4], &Tensor<f64>) {
        let m = &self.mixer_inputs;
        ([&m.q, &m.k, &m.v, &self.o], &self.mixer.stat)
    }

    /// Residuals from the [`BlockResiduals::parts`] of a forward on
    /// `inputs` (whose extra inputs the mixer read): the backward checks
    /// their shapes against the block.
    pub fn from_parts(
        inputs: &BlockInputs,
        [q, k, v, o]: [Tensor<f32>; 4],
        stat: Tensor<f64>,
    ) -> BlockResiduals {
        let (batch, seq) = (inputs.batch, inputs.seq);
        BlockResiduals {
            mixer_inputs: MixerInputs::self_attention(batch, seq, q, k, v, inputs.extra.clone()),
            o,
            mixer: Residuals::from_stat(stat, batch, seq),
        }
    }
}

/// The default rows per block of the blockwise schedule: large enough that
/// the projections and FFN run as efficient GEMMs, small enough that one
/// block's FFN hidden (`rows x d_ff` floats, a few of them) stays tens of
/// MiB.
pub const DEFAULT_BLOCK_ROWS: usize = 512;

/// Host bytes each worker thread may hold while a block runs (the GEMM's
/// packed panels, the mixer's score tiles), counted by
/// [`Block::train_host_bytes`].
const THREAD_WORKING_SET: u64 = 1 << 20;

/// The most groups of heads the backward splits the mixer into.
const MAX_HEAD_GROUPS: u32 = 4;

/// A block spec prepared for one backend (its mixer compiled once).
#[derive(Debug)]
pub struct Block {
    spec: BlockSpec,
    mixer: Mixer,
    block_rows: usize,
    /// The mixer over `heads / groups` heads and the group count, where
    /// heads are independent: the backward then runs the mixer one group of
    /// heads at a time, so its scratch (copies of q, k, v and gradients in
    /// the ring's layout) is a fraction of the whole.
    head_groups: Option<(Mixer, usize)>,
}

/// How many groups of heads the backward of `m` may run in, each a mixer
/// of `heads / groups` heads: more than one only when heads are
/// independent and interchangeable (no bias, transform, decay or extra
/// input, and a mask that reads neither `h` nor the head count), as many as
/// divide `kv_heads` up to [`MAX_HEAD_GROUPS`].
fn head_groups(m: &MixerSpec) -> u32 {
    let independent = m.bias.is_none()
        && m.transform.is_none()
        && m.decay == mixc_dsl::Decay::None
        && m.inputs.is_empty()
        && !m.mask.uses_var(mixc_dsl::ir::Var::H);
    if !independent {
        return 1;
    }
    (1..=MAX_HEAD_GROUPS.min(m.kv_heads))
        .rev()
        .find(|g| m.kv_heads.is_multiple_of(*g))
        .unwrap_or(1)
}

impl Block {
    /// Prepares `spec`'s mixer with `opts` (backend, ranks, threads, tiles).
    /// The CPU backend runs blocks blockwise; the reference backend runs
    /// the f64 unfused block; the CUDA backend does not run blocks yet
    /// ([`RuntimeError::Unsupported`]). The mixer computes in f32 unless
    /// `opts.dtype` names another storage type.
    pub fn new(spec: &BlockSpec, opts: Options) -> Result<Block> {
        // Activations are f32, so is the mixer's arithmetic unless asked.
        let opts = match opts.dtype {
            Some(_) => opts,
            None => opts.with_dtype(mixc_dsl::DType::F32),
        };
        let mixer = Mixer::new(&spec.mixer, opts)?;
        if mixer.backend() == BackendKind::Cuda {
            return Err(RuntimeError::Unsupported {
                backend: "cuda",
                what: format!(
                    "transformer blocks (block `{}`); the CPU backend runs them",
                    spec.name
                ),
            });
        }
        mixer.backward_support()?;
        let groups = head_groups(&spec.mixer);
        let head_groups = match mixer.backend() {
            BackendKind::Cpu if groups > 1 => {
                let mut part = spec.mixer.clone();
                part.heads /= groups;
                part.kv_heads /= groups;
                Some((Mixer::new(&part, mixer.options().clone())?, groups as usize))
            }
            _ => None,
        };
        Ok(Block {
            spec: spec.clone(),
            mixer,
            block_rows: DEFAULT_BLOCK_ROWS,
            head_groups,
        })
    }

    /// The same block with `rows` rows per block (at least 1).
    pub fn with_block_rows(mut self, rows: usize) -> Block {
        self.block_rows = rows.max(1);
        self
    }

    pub fn spec(&self) -> &BlockSpec {
        &self.spec
    }

    pub fn backend(&self) -> BackendKind {
        self.mixer.backend()
    }

    pub fn block_rows(&self) -> usize {
        self.block_rows
    }

    /// How the mixer's ring deals positions to ranks (also those of a ring
    /// over processes, [`Block::forward_rank`]).
    pub fn sharding(&self) -> crate::ring::Sharding {
        self.mixer.sharding()
    }

    /// The block's output for `inputs`.
    pub fn forward(&self, inputs: &BlockInputs, weights: &BlockWeights) -> Result<BlockOutput> {
        Ok(self.forward_impl(inputs, weights, false, Place::Whole)?.0)
    }

    /// This process's rank of a ring over processes (Ring Attention around
    /// the blockwise block): `inputs.x` holds this rank's rows `[batch, n,
    /// width]`, the positions `rows` gives (`RankRows::new` with the
    /// mixer's sharding), while the mixer's extra inputs are whole on every
    /// rank. The projections, rotary embedding (at the rows' positions),
    /// norms and FFN run on this rank's rows; only the mixer's key/value
    /// shards travel, over `transport`, to the other ranks, each a process
    /// making the same call. Returns this rank's rows of the output and,
    /// with `train`, what [`Block::backward_rank`] needs. CPU backend only.
    pub fn forward_rank(
        &self,
        inputs: &BlockInputs,
        weights: &BlockWeights,
        rows: &RankRows,
        train: bool,
        transport: &Arc<dyn Transport>,
    ) -> Result<(BlockOutput, Option<BlockResiduals>)> {
        self.rank_support(inputs, rows)?;
        self.forward_impl(inputs, weights, train, Place::Rank { rows, transport })
    }

    /// The backward of [`Block::forward_rank`]: this rank's rows of dx, and
    /// this rank's part of every weight's and float extra input's gradient
    /// (summed over the ranks, they are the gradient).
    pub fn backward_rank(
        &self,
        inputs: &BlockInputs,
        weights: &BlockWeights,
        residuals: &BlockResiduals,
        d_out: &Tensor<f32>,
        rows: &RankRows,
        transport: &Arc<dyn Transport>,
    ) -> Result<BlockBackward> {
        self.rank_support(inputs, rows)?;
        self.backward_impl(
            inputs,
            weights,
            residuals,
            d_out,
            Place::Rank { rows, transport },
        )
    }

    /// A rank call runs on the CPU backend, with `x` holding the rank's rows.
    fn rank_support(&self, inputs: &BlockInputs, rows: &RankRows) -> Result<()> {
        if self.mixer.backend() != BackendKind::Cpu {
            return Err(RuntimeError::Unsupported {
                backend: self.mixer.backend().name(),
                what: format!(
                    "block `{}` as a rank of a ring over processes",
                    self.spec.name
                ),
            });
        }
        if inputs.seq != rows.positions.len() {
            return Err(RuntimeError::BadInput {
                name: "x".into(),
                problem: format!(
                    "holds {} positions, but this rank owns {} of the {} in the ring",
                    inputs.seq,
                    rows.positions.len(),
                    rows.seq
                ),
            });
        }
        Ok(())
    }

    /// [`Block::forward`] that also returns what [`Block::backward`] needs.
    pub fn forward_train(
        &self,
        inputs: &BlockInputs,
        weights: &BlockWeights,
    ) -> Result<(BlockOutput, BlockResiduals)> {
        let (out, res) = self.forward_impl(inputs, weights, true, Place::Whole)?;
        let res = res.ok_or_else(|| RuntimeError::Internal("no residuals saved".into()))?;
        Ok((out, res))
    }

    fn forward_impl(
        &self,
        inputs: &BlockInputs,
        weights: &BlockWeights,
        train: bool,
        place: Place<'_>,
    ) -> Result<(BlockOutput, Option<BlockResiduals>)> {
        let start = Instant::now();
        validate_at(&self.spec, inputs, weights, place.seq(inputs.seq))?;
        crate::memory::admit_host(self.train_host_bytes(inputs.batch, inputs.seq)?)?;
        let (out, res) = match self.mixer.backend() {
            BackendKind::Reference => {
                let out = reference::forward(&self.spec, inputs, weights)?;
                let out = Tensor::new(out.shape, out.data.iter().map(|&x| x as f32).collect());
                // The reference backward recomputes everything from the inputs.
                let res = train.then(|| BlockResiduals {
                    mixer_inputs: empty_mixer_inputs(inputs),
                    o: Tensor::new(vec![0], Vec::new()),
                    mixer: Residuals::empty(inputs.batch, inputs.seq),
                });
                (out, res)
            }
            _ => cpu::forward(self, inputs, weights, train, place)?,
        };
        Ok((
            BlockOutput {
                out,
                seconds: start.elapsed().as_secs_f64(),
            },
            res,
        ))
    }

    /// Gradients of `sum(out * d_out)` with respect to x, every weight and
    /// every float extra input, from the residuals of
    /// [`Block::forward_train`] on the same inputs and weights.
    pub fn backward(
        &self,
        inputs: &BlockInputs,
        weights: &BlockWeights,
        residuals: &BlockResiduals,
        d_out: &Tensor<f32>,
    ) -> Result<BlockBackward> {
        self.backward_impl(inputs, weights, residuals, d_out, Place::Whole)
    }

    fn backward_impl(
        &self,
        inputs: &BlockInputs,
        weights: &BlockWeights,
        residuals: &BlockResiduals,
        d_out: &Tensor<f32>,
        place: Place<'_>,
    ) -> Result<BlockBackward> {
        let start = Instant::now();
        validate_at(&self.spec, inputs, weights, place.seq(inputs.seq))?;
        validate_upstream(&self.spec, inputs, d_out)?;
        if (residuals.mixer_inputs.batch, residuals.mixer_inputs.seq) != (inputs.batch, inputs.seq)
        {
            return Err(RuntimeError::BadInput {
                name: "residuals".into(),
                problem: format!(
                    "saved by a forward of batch {} x seq {}, but the inputs are batch {} x seq {}",
                    residuals.mixer_inputs.batch,
                    residuals.mixer_inputs.seq,
                    inputs.batch,
                    inputs.seq
                ),
            });
        }
        if self.mixer.backend() != BackendKind::Reference {
            self.check_residuals(residuals, place.seq(inputs.seq))?;
        }
        let grads = match self.mixer.backend() {
            BackendKind::Reference => {
                reference::gradients(&self.spec, inputs, weights, d_out)?.to_f32()
            }
            _ => cpu::backward(self, inputs, weights, residuals, d_out, place)?,
        };
        Ok(BlockBackward {
            grads,
            seconds: start.elapsed().as_secs_f64(),
        })
    }

    /// Host bytes a training step (forward_train + backward) holds at its
    /// peak besides the caller's inputs and weights: the mixer's training
    /// step on q, k, v ([`Mixer::train_host_bytes`]: its inputs, output,
    /// statistic, gradients and ring scratch), the block's output and dx,
    /// the weights' gradients, one row block's scratch, and a working set
    /// per worker thread (GEMM packing, score tiles). Linear in `seq`; no
    /// `seq x d_ff` term.
    pub fn train_host_bytes(&self, batch: usize, seq: usize) -> Result<u64> {
        let (mixer_inputs, mixer_rest) = match &self.head_groups {
            // The whole mixer's forward (its inputs, output and scratch),
            // the upstream gradient, and one group's training step.
            Some((part, _)) => {
                let (inputs, forward) = self.mixer.host_bytes(batch, seq)?;
                let (part_inputs, part_rest) = part.train_host_bytes(batch, seq)?;
                let d_o = (batch * seq) as u64
                    * u64::from(self.spec.mixer.heads * self.spec.mixer.value_dim)
                    * 4;
                (
                    inputs,
                    forward
                        .max(part_inputs.saturating_add(part_rest))
                        .saturating_add(d_o),
                )
            }
            None => self.mixer.train_host_bytes(batch, seq)?,
        };
        let m = &self.spec.mixer;
        let rows =
            crate::memory::checked_elems("the block's rows", &[("batch", batch), ("seq", seq)])?
                as u64;
        let w = self.spec.width as u64;
        let qkvo = (m.heads as u64 * (m.head_dim + m.value_dim) as u64)
            + m.kv_heads as u64 * (m.head_dim + m.value_dim) as u64;
        let block = self.block_rows.min(batch * seq) as u64;
        let f = self.spec.ffn.hidden as u64;
        // The tail's y, z, u, up, a and the backward's da, du, dup, dz (or
        // the head's h and dh).
        let scratch = block * (6 * f + 3 * w + qkvo);
        let grads = self.spec.parameter_count() as u64;
        let threads = rayon::current_num_threads() as u64;
        Ok(mixer_inputs
            .saturating_add(mixer_rest)
            .saturating_add(4 * rows.saturating_mul(2 * w))
            .saturating_add(4 * (scratch + grads))
            .saturating_add(threads * THREAD_WORKING_SET))
    }

    /// Residuals saved by another block (other heads or dims) would be
    /// sliced wrongly: refuse them, naming what differs.
    fn check_residuals(&self, r: &BlockResiduals, stat_seq: usize) -> Result<()> {
        let m = &r.mixer_inputs;
        let shapes = self.spec.mixer.tensor_shapes(m.batch, m.seq);
        let o_shape = [
            m.batch,
            m.seq,
            self.spec.mixer.heads as usize,
            self.spec.mixer.value_dim as usize,
        ];
        let stat_ok = r.mixer.stat.data.is_empty()
            || r.mixer.stat.shape == [m.batch, self.spec.mixer.heads as usize, stat_seq];
        let bad = [("q", &m.q), ("k", &m.k), ("v", &m.v)]
            .into_iter()
            .find(|(n, t)| t.shape != shapes[*n])
            .map(|(n, t)| {
                format!(
                    "its `{n}` has shape {:?}, this block's {:?}",
                    t.shape, shapes[n]
                )
            })
            .or_else(|| {
                (r.o.shape != o_shape).then(|| {
                    format!(
                        "its `o` has shape {:?}, this block's {o_shape:?}",
                        r.o.shape
                    )
                })
            })
            .or_else(|| (!stat_ok).then(|| "its row statistic has another shape".to_string()));
        match bad {
            Some(problem) => Err(RuntimeError::BadInput {
                name: "residuals".into(),
                problem: format!(
                    "not saved by a forward of block `{}` ({problem})",
                    self.spec.name
                ),
            }),
            None => Ok(()),
        }
    }

    pub(crate) fn mixer(&self) -> &Mixer {
        &self.mixer
    }

    /// The per-group mixer and the number of head groups the backward runs
    /// in (`None`: the whole mixer at once).
    pub(crate) fn head_groups(&self) -> Option<(&Mixer, usize)> {
        self.head_groups.as_ref().map(|(m, g)| (m, *g))
    }
}

/// A comparison of a block's output or gradients with the f64 reference:
/// per tensor, the largest absolute difference over the largest magnitude
/// of the reference tensor.
#[derive(Debug, Clone, PartialEq)]
pub struct BlockCheck {
    /// `(tensor name, relative error)`: `out`, or `x`, each weight, each
    /// float extra input.
    pub errors: Vec<(String, f64)>,
    pub tolerance: f64,
    /// Elements that are NaN or infinite (a check with any fails).
    pub non_finite: usize,
}

impl BlockCheck {
    pub fn max_rel_error(&self) -> f64 {
        self.errors.iter().fold(0.0, |m, (_, e)| m.max(*e))
    }
    pub fn passed(&self) -> bool {
        self.non_finite == 0 && self.max_rel_error() <= self.tolerance
    }

    /// Compares named tensors. A reference tensor that is (nearly) zero in
    /// exact arithmetic, e.g. the key projection's gradient with a single
    /// key, is judged against a thousandth of the largest reference tensor
    /// instead of its own rounding noise.
    fn compare<'a>(
        pairs: impl IntoIterator<Item = (String, &'a Tensor<f32>, &'a Tensor<f64>)>,
        tolerance: f64,
    ) -> BlockCheck {
        let pairs: Vec<_> = pairs.into_iter().collect();
        let max_abs = |t: &Tensor<f64>| t.data.iter().fold(0.0f64, |m, v| m.max(v.abs()));
        let floor = 1e-3 * pairs.iter().fold(0.0f64, |m, (_, _, r)| m.max(max_abs(r)));
        let mut non_finite = 0;
        let errors = pairs
            .iter()
            .map(|(name, got, want)| {
                non_finite += got.data.iter().filter(|v| !v.is_finite()).count();
                let diff = got
                    .data
                    .iter()
                    .zip(&want.data)
                    .fold(0.0f64, |m, (a, b)| m.max((*a as f64 - b).abs()));
                let scale = max_abs(want).max(floor).max(f64::MIN_POSITIVE);
                (name.clone(), diff / scale)
            })
            .collect();
        BlockCheck {
            errors,
            tolerance,
            non_finite,
        }
    }
}

impl Block {
    /// Compares an output of this block with the f64 reference (the whole
    /// output), at the f32 tolerance of mixers
    /// ([`crate::reference::check_tolerance`]).
    pub fn check(
        &self,
        inputs: &BlockInputs,
        weights: &BlockWeights,
        out: &Tensor<f32>,
    ) -> Result<BlockCheck> {
        let want = reference::forward(&self.spec, inputs, weights)?;
        let tol = crate::reference::check_tolerance(mixc_dsl::DType::F32);
        Ok(BlockCheck::compare([("out".to_string(), out, &want)], tol))
    }

    /// Compares gradients of this block (for upstream `d_out`) with the f64
    /// reference gradients, every tensor in full, at the f32 gradient
    /// tolerance of mixers ([`crate::check::grad_tolerance`]).
    pub fn check_gradients(
        &self,
        inputs: &BlockInputs,
        weights: &BlockWeights,
        d_out: &Tensor<f32>,
        grads: &BlockGradients<f32>,
    ) -> Result<BlockCheck> {
        let want = reference::gradients(&self.spec, inputs, weights, d_out)?;
        let tol = crate::check::grad_tolerance(mixc_dsl::DType::F32);
        let pairs = grads
            .named()
            .into_iter()
            .zip(want.named())
            .map(|((n, g), (_, w))| (n, g, w));
        Ok(BlockCheck::compare(pairs, tol))
    }
}

fn empty_mixer_inputs(inputs: &BlockInputs) -> MixerInputs {
    let e = || Tensor::new(vec![0], Vec::new());
    MixerInputs::self_attention(inputs.batch, inputs.seq, e(), e(), e(), BTreeMap::new())
}

/// Checks x's shape, the weights (every one present, no unknown name,
/// shapes, finite values) and the mixer's extra inputs.
pub fn validate(spec: &BlockSpec, inputs: &BlockInputs, weights: &BlockWeights) -> Result<()> {
    validate_at(spec, inputs, weights, inputs.seq)
}

/// [`validate`] for `x` of `inputs.seq` positions and mixer extra inputs
/// of `seq` (more on a rank of a ring: its rows of x, the extras whole).
fn validate_at(
    spec: &BlockSpec,
    inputs: &BlockInputs,
    weights: &BlockWeights,
    seq: usize,
) -> Result<()> {
    let bad = |name: &str, problem: String| {
        Err(RuntimeError::BadInput {
            name: name.into(),
            problem,
        })
    };
    let want = [inputs.batch, inputs.seq, spec.width as usize];
    if inputs.x.shape != want {
        return bad(
            "x",
            format!(
                "expected [batch, seq, width] = {want:?} (width {} of block `{}`), got {:?}",
                spec.width, spec.name, inputs.x.shape
            ),
        );
    }
    if inputs.seq == 0 || inputs.batch == 0 {
        return bad("x", "needs at least one batch row and one position".into());
    }
    if let Some(p) = first_non_finite(&inputs.x.data) {
        return bad(
            "x",
            format!("element {p} is {} (must be finite)", inputs.x.data[p]),
        );
    }
    let shapes = spec.weight_shapes();
    if let Some(name) = weights.tensors.keys().find(|n| !shapes.contains_key(*n)) {
        return bad(
            name,
            format!(
                "is not a weight of block `{}` (its weights are {})",
                spec.name,
                weight_list(spec)
            ),
        );
    }
    for (name, shape) in &shapes {
        let Some(t) = weights.tensors.get(name) else {
            return bad(name, format!("missing (block `{}` reads it)", spec.name));
        };
        if &t.shape != shape {
            return bad(name, format!("expected shape {shape:?}, got {:?}", t.shape));
        }
        if let Some(p) = first_non_finite(&t.data) {
            return bad(
                name,
                format!("element {p} is {} (must be finite)", t.data[p]),
            );
        }
    }
    // The mixer's own extra inputs: checked as the mixer checks them, on
    // stand-in q, k, v of the right shapes (no data is read).
    check_mixer_extras(&spec.mixer, inputs, seq)
}

fn check_mixer_extras(mixer: &MixerSpec, inputs: &BlockInputs, seq: usize) -> Result<()> {
    let shapes = mixer.tensor_shapes(inputs.batch, seq);
    for (name, t) in &inputs.extra {
        if mixer.input(name).is_none() {
            return Err(RuntimeError::BadInput {
                name: name.clone(),
                problem: format!("is not an input of mixer `{}`", mixer.name),
            });
        }
        if t.shape() != shapes[name].as_slice() {
            return Err(RuntimeError::BadInput {
                name: name.clone(),
                problem: format!("expected shape {:?}, got {:?}", shapes[name], t.shape()),
            });
        }
    }
    if let Some(d) = mixer
        .inputs
        .iter()
        .find(|d| !inputs.extra.contains_key(&d.name))
    {
        return Err(RuntimeError::BadInput {
            name: d.name.clone(),
            problem: format!("missing (mixer `{}` reads it)", mixer.name),
        });
    }
    Ok(())
}

/// Checks `d_out` has the output's shape and finite values.
fn validate_upstream(spec: &BlockSpec, inputs: &BlockInputs, d_out: &Tensor<f32>) -> Result<()> {
    let want = [inputs.batch, inputs.seq, spec.width as usize];
    let problem = if d_out.shape != want {
        format!(
            "the upstream gradient must have the output's shape [batch, seq, width] = {want:?}, got {:?}",
            d_out.shape
        )
    } else if let Some(p) = first_non_finite(&d_out.data) {
        format!("element {p} is {} (must be finite)", d_out.data[p])
    } else {
        return Ok(());
    };
    Err(RuntimeError::BadInput {
        name: "dout".into(),
        problem,
    })
}

#[cfg(test)]
mod tests {
    use super::head_groups;

    /// Heads split into as many groups as divide kv_heads, up to 4, and
    /// only when nothing in the spec can tell heads apart.
    #[test]
    fn head_groups_only_where_heads_are_interchangeable() {
        let g = |src: &str| head_groups(&mixc_dsl::parse_str(src).unwrap());
        assert_eq!(
            g("mixer m { heads = 32; kv_heads = 8; head_dim = 8; mask = causal; }"),
            4
        );
        assert_eq!(g("mixer m { heads = 12; kv_heads = 6; head_dim = 8; }"), 3);
        assert_eq!(g("mixer m { heads = 4; kv_heads = 1; head_dim = 8; }"), 1);
        assert_eq!(
            g(
                "mixer m { heads = 8; head_dim = 8; input slopes: f32[heads]; \
               bias = -slopes[h] * (i - j); mask = causal; }"
            ),
            1
        );
        assert_eq!(
            g("mixer m { heads = 8; head_dim = 8; transform = 30 * tanh(s / 30); }"),
            1
        );
        // A mask that reads the head tells heads apart; one of positions does not.
        assert_eq!(
            g("mixer m { heads = 8; head_dim = 8; mask = j <= i && i - j < 8 * (h + 1); }"),
            1
        );
        assert_eq!(
            g("mixer m { heads = 8; head_dim = 8; mask = j <= i && div(i, 8) == div(j, 8); }"),
            4
        );
    }
}
