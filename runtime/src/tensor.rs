//! Host tensors and the input bundle of one mixer run. Storage is f32 (what
//! safetensors files and the GPU upload path carry); the reference widens to
//! f64 on read, the CPU backend computes in f32 or f64.

use mixc_dsl::ir::EvalEnv;
use std::collections::BTreeMap;

/// A dense row-major tensor.
#[derive(Debug, Clone, PartialEq)]
pub struct Tensor<T> {
    pub shape: Vec<usize>,
    pub data: Vec<T>,
}

impl<T: Copy + Default> Tensor<T> {
    pub fn zeros(shape: &[usize]) -> Self {
        Tensor {
            shape: shape.to_vec(),
            data: vec![T::default(); shape.iter().product()],
        }
    }
}

impl<T> Tensor<T> {
    pub fn new(shape: Vec<usize>, data: Vec<T>) -> Self {
        assert_eq!(
            shape.iter().product::<usize>(),
            data.len(),
            "shape does not match data"
        );
        Tensor { shape, data }
    }
    pub fn numel(&self) -> usize {
        self.data.len()
    }
    /// Row-major flat offset of a full index.
    #[inline]
    pub fn offset(&self, idx: &[usize]) -> usize {
        debug_assert_eq!(idx.len(), self.shape.len());
        let mut off = 0;
        for (i, (&x, &n)) in idx.iter().zip(&self.shape).enumerate() {
            debug_assert!(x < n, "index {x} out of range {n} on axis {i}");
            off = off * n + x;
        }
        off
    }
}

/// An extra input (gates, segment ids, tables, filters).
#[derive(Debug, Clone, PartialEq)]
pub enum ExtraTensor {
    F32(Tensor<f32>),
    I32(Tensor<i32>),
}

impl ExtraTensor {
    pub fn shape(&self) -> &[usize] {
        match self {
            ExtraTensor::F32(t) => &t.shape,
            ExtraTensor::I32(t) => &t.shape,
        }
    }
    /// See [`clamped_offset`].
    pub fn clamped_offset(&self, idx: &[i64]) -> usize {
        clamped_offset(self.shape(), idx)
    }
    /// Element at `idx`, each index clamped into its axis (the language's
    /// rule for table reads), widened to f64.
    pub fn get_clamped(&self, idx: &[i64]) -> f64 {
        let off = self.clamped_offset(idx);
        match self {
            ExtraTensor::F32(t) => t.data[off] as f64,
            ExtraTensor::I32(t) => t.data[off] as f64,
        }
    }
}

/// Row-major offset of `idx` with each index clamped into its axis: the
/// element [`ExtraTensor::get_clamped`] reads (and a table gradient's
/// scatter-add writes).
pub fn clamped_offset(shape: &[usize], idx: &[i64]) -> usize {
    let mut off = 0usize;
    for (&x, &n) in idx.iter().zip(shape) {
        let x = x.clamp(0, n as i64 - 1) as usize;
        off = off * n + x;
    }
    off
}

/// Everything one run reads. q: `[batch, seq, heads, head_dim]`,
/// k: `[batch, kv_seq, kv_heads, head_dim]`, v: `[batch, kv_seq, kv_heads,
/// value_dim]` (q and k are empty tensors with no data for the convolution
/// family, which reads only v).
///
/// **Positions.** Key `j` sits at position `j` (0-based); query `i` sits at
/// position `i + q_offset`. Masks, biases, decay and every extra input's
/// `seq` axis see these positions. Self-attention over one sequence has
/// `kv_seq == seq` and `q_offset == 0`; a decode step or a chunk of a
/// chunked prefill has the new queries as the last `seq` of `kv_seq`
/// positions (`q_offset = kv_seq - seq`, the default [`MixerInputs::new`]
/// picks: "bottom-right" alignment, as FlashAttention and FlexDecoding do);
/// cross-attention has unrelated lengths.
#[derive(Debug, Clone, PartialEq)]
pub struct MixerInputs {
    pub batch: usize,
    /// Queries (and output rows) per batch row.
    pub seq: usize,
    /// Keys and values per batch row.
    pub kv_seq: usize,
    /// Position of query 0 among the key positions.
    pub q_offset: usize,
    pub q: Tensor<f32>,
    pub k: Tensor<f32>,
    pub v: Tensor<f32>,
    pub extra: BTreeMap<String, ExtraTensor>,
}

impl mixc_dsl::bounds::TableRead for MixerInputs {
    /// Element of an extra input at clamped indices (0 for an absent name:
    /// inputs are validated before plans read them).
    fn read(&self, input: &str, indices: &[i64]) -> f64 {
        self.extra
            .get(input)
            .map_or(0.0, |t| t.get_clamped(indices))
    }
}

impl MixerInputs {
    /// What the block plan may know of the tiles of batch row `b` (and head
    /// `h`, when given) under these inputs: the variables an expression
    /// mask reads, with the lengths as [`MixerInputs::eval_env`] gives them.
    pub fn known(&self, heads: u32, b: usize, h: Option<usize>) -> mixc_dsl::bounds::Known {
        mixc_dsl::bounds::Known {
            batch: Some(b as i64),
            head: h.map(|h| h as i64),
            heads: Some(heads as i64),
            seq: Some((self.q_offset + self.seq) as i64),
            kv_seq: Some(self.kv_seq as i64),
        }
    }

    /// The expression environment of these inputs at pair (0, 0), head 0,
    /// batch row 0 (callers set `i`, `j`, `h`, `b`, `s`): `seq` is the length
    /// of the query sequence including a cached prefix (`q_offset + seq`),
    /// `kv_seq` the number of keys.
    pub fn eval_env<'a>(&self, heads: u32, lookup: &'a dyn Fn(&str, &[i64]) -> f64) -> EvalEnv<'a> {
        let mut env = EvalEnv::for_head(0, heads, lookup);
        env.seq = (self.q_offset + self.seq) as i64;
        env.kv_seq = self.kv_seq as i64;
        env
    }

    /// Inputs from q `[batch, seq, heads, head_dim]`, k `[batch, kv_seq,
    /// kv_heads, head_dim]` and v `[batch, kv_seq, kv_heads, value_dim]`:
    /// batch and the lengths are read from q and v (q and k are empty for
    /// the convolution family, so `seq == kv_seq` there), and the queries
    /// are the last positions (`q_offset = kv_seq - seq`, or 0 when there
    /// are more queries than keys). Shapes are checked against the spec
    /// when the inputs are used.
    pub fn new(q: Tensor<f32>, k: Tensor<f32>, v: Tensor<f32>) -> MixerInputs {
        let dims = |t: &Tensor<f32>| (t.shape.first().copied(), t.shape.get(1).copied());
        let (batch, kv_seq) = match (dims(&v), dims(&q)) {
            ((Some(b), Some(s)), _) | (_, (Some(b), Some(s))) => (b, s),
            _ => (0, 0),
        };
        let seq = match dims(&q) {
            (_, Some(s)) if !q.data.is_empty() => s,
            _ => kv_seq,
        };
        MixerInputs {
            batch,
            seq,
            kv_seq,
            q_offset: kv_seq.saturating_sub(seq),
            q,
            k,
            v,
            extra: BTreeMap::new(),
        }
    }

    /// Inputs of one sequence attending to itself: `seq` queries, keys and
    /// values, at the same positions.
    pub fn self_attention(
        batch: usize,
        seq: usize,
        q: Tensor<f32>,
        k: Tensor<f32>,
        v: Tensor<f32>,
        extra: BTreeMap<String, ExtraTensor>,
    ) -> MixerInputs {
        MixerInputs {
            batch,
            seq,
            kv_seq: seq,
            q_offset: 0,
            q,
            k,
            v,
            extra,
        }
    }

    /// The same inputs with query 0 at key position `q_offset`.
    pub fn with_q_offset(mut self, q_offset: usize) -> MixerInputs {
        self.q_offset = q_offset;
        self
    }

    /// Whether queries and keys are the same positions (`seq == kv_seq`,
    /// `q_offset == 0`): what every path before two lengths assumed.
    pub fn is_self_aligned(&self) -> bool {
        self.seq == self.kv_seq && self.q_offset == 0
    }

    /// Bytes of the extra inputs (4 per element, f32 or i32).
    pub fn extra_bytes(&self) -> usize {
        self.extra
            .values()
            .map(|t| t.shape().iter().product::<usize>() * 4)
            .sum()
    }

    /// Adds the extra input `name` (a table, gate, filter or id tensor the
    /// spec declares).
    pub fn with_extra(mut self, name: &str, t: ExtraTensor) -> MixerInputs {
        self.extra.insert(name.to_string(), t);
        self
    }

    /// The declared extra input `name`, or a `BadInput` error naming it.
    pub fn extra_input(&self, name: &str) -> crate::error::Result<&ExtraTensor> {
        self.extra
            .get(name)
            .ok_or_else(|| crate::error::RuntimeError::BadInput {
                name: name.to_string(),
                problem: "missing".into(),
            })
    }
}

/// The output of a run: `[batch, seq, heads, value_dim]`.
pub type MixerOutput<T> = Tensor<T>;
