//! Packed variable-length batches (FlashAttention's `cu_seqlens`): several
//! sequences of different lengths concatenated along one sequence axis,
//! each attending only within itself, with no padding and no recompile
//! when the lengths change.
//!
//! A packed call has batch 1: q is `[1, total_q, heads, head_dim]`, k and
//! v `[1, total_kv, kv_heads, dim]`. Sequence `s` owns query rows
//! `cu_seqlens_q[s]..cu_seqlens_q[s + 1]` and key rows
//! `cu_seqlens_kv[s]..cu_seqlens_kv[s + 1]`; inside it, positions restart
//! at 0 and its queries are its last positions (bottom-right, the default of
//! [`MixerInputs::new`]), so masks, biases and decay see each sequence as
//! if it ran alone. Extra inputs:
//! - with a `seq` axis (segment ids, gates, per-position tables): packed
//!   like k and v (`[1, total_kv, ...]`), sequence `s` reading its rows;
//! - a convolution filter (`[heads, seq]`, indexed by lag): shared, each
//!   sequence reading its first `len` taps (the filter is `total_kv` long);
//! - with a `batch` axis but no `seq` axis (per-example prefixes, per-example
//!   biases): one entry per sequence (`[n_seqs, ...]`);
//! - anything else (tables by head or lag): shared.
//!
//! Each sequence runs as its own call on the same prepared mixer, its q,
//! k, v and `o` read in place from the packed tensors (no copy), so the
//! block plan never sees a tile across two sequences.

use std::ops::Range;

use mixc_dsl::ir::{Dim, InputDecl, InputRole, MixerSpec};

use crate::error::{Result, RuntimeError};
use crate::tensor::{ExtraTensor, MixerInputs, Tensor};

/// The sequence boundaries of a packed batch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Varlen {
    cu_q: Vec<usize>,
    cu_kv: Vec<usize>,
}

impl Varlen {
    /// Cumulative query and key lengths, each starting at 0, non-decreasing,
    /// one entry more than there are sequences (FlashAttention's
    /// `cu_seqlens_q` / `cu_seqlens_k`).
    pub fn new(cu_seqlens_q: Vec<usize>, cu_seqlens_kv: Vec<usize>) -> Result<Varlen> {
        for (name, cu) in [
            ("cu_seqlens_q", &cu_seqlens_q),
            ("cu_seqlens_kv", &cu_seqlens_kv),
        ] {
            if cu.len() < 2 || cu[0] != 0 {
                return Err(RuntimeError::BadInput {
                    name: name.into(),
                    problem: format!(
                        "must start at 0 and hold one entry more than there are sequences \
                         (at least one), got {cu:?}"
                    ),
                });
            }
            if let Some(w) = cu.windows(2).position(|w| w[1] < w[0]) {
                return Err(RuntimeError::BadInput {
                    name: name.into(),
                    problem: format!(
                        "must not decrease, but entry {} is {} after {}",
                        w + 1,
                        cu[w + 1],
                        cu[w]
                    ),
                });
            }
        }
        if cu_seqlens_q.len() != cu_seqlens_kv.len() {
            return Err(RuntimeError::BadInput {
                name: "cu_seqlens_kv".into(),
                problem: format!(
                    "describes {} sequences but cu_seqlens_q {}",
                    cu_seqlens_kv.len() - 1,
                    cu_seqlens_q.len() - 1
                ),
            });
        }
        Ok(Varlen {
            cu_q: cu_seqlens_q,
            cu_kv: cu_seqlens_kv,
        })
    }

    /// Self-attention over sequences of these lengths (queries and keys are
    /// the same positions).
    pub fn from_lengths(lengths: &[usize]) -> Result<Varlen> {
        let mut cu = vec![0];
        for &l in lengths {
            cu.push(cu.last().copied().unwrap_or(0) + l);
        }
        Varlen::new(cu.clone(), cu)
    }

    pub fn sequences(&self) -> usize {
        self.cu_q.len() - 1
    }
    pub fn total_q(&self) -> usize {
        *self.cu_q.last().expect("at least one sequence")
    }
    pub fn total_kv(&self) -> usize {
        *self.cu_kv.last().expect("at least one sequence")
    }
    /// Query rows of sequence `s`.
    pub fn q_rows(&self, s: usize) -> Range<usize> {
        self.cu_q[s]..self.cu_q[s + 1]
    }
    /// Key rows of sequence `s`.
    pub fn kv_rows(&self, s: usize) -> Range<usize> {
        self.cu_kv[s]..self.cu_kv[s + 1]
    }

    /// Errors unless `x` is a packed batch these boundaries describe.
    pub(crate) fn check(&self, spec: &MixerSpec, x: &MixerInputs) -> Result<()> {
        let bad = |problem: String| RuntimeError::BadInput {
            name: "cu_seqlens".into(),
            problem,
        };
        if x.batch != 1 {
            return Err(bad(format!(
                "a packed batch has batch 1 (the sequences are concatenated along the \
                 sequence axis), got batch {}",
                x.batch
            )));
        }
        for (name, t, len) in [
            ("q", &x.q, x.seq),
            ("k", &x.k, x.kv_seq),
            ("v", &x.v, x.kv_seq),
        ] {
            let empty = t.data.is_empty() && name != "v";
            if !empty && (t.shape.len() != 4 || t.shape[0] != 1 || t.shape[1] != len) {
                return Err(RuntimeError::BadInput {
                    name: name.into(),
                    problem: format!(
                        "a packed batch's `{name}` is [1, {len}, heads, dim], got {:?}",
                        t.shape
                    ),
                });
            }
        }
        if x.seq != self.total_q() || x.kv_seq != self.total_kv() {
            return Err(bad(format!(
                "the boundaries cover {} queries and {} keys, but the tensors hold {} and {}",
                self.total_q(),
                self.total_kv(),
                x.seq,
                x.kv_seq
            )));
        }
        for decl in &spec.inputs {
            let Some(t) = x.extra.get(&decl.name) else {
                continue;
            };
            let want = self.packed_shape(spec, decl);
            if t.shape() != want.as_slice() {
                return Err(RuntimeError::BadInput {
                    name: decl.name.clone(),
                    problem: format!(
                        "in a packed batch of {} sequences it must have shape {want:?}, got {:?}",
                        self.sequences(),
                        t.shape()
                    ),
                });
            }
        }
        Ok(())
    }

    /// Every extra input's shape in the packed call, by name.
    pub fn packed_shapes(
        &self,
        spec: &MixerSpec,
    ) -> std::collections::BTreeMap<String, Vec<usize>> {
        spec.inputs
            .iter()
            .map(|d| (d.name.clone(), self.packed_shape(spec, d)))
            .collect()
    }

    /// The shape an extra input has in the packed call (see the module docs).
    fn packed_shape(&self, spec: &MixerSpec, decl: &InputDecl) -> Vec<usize> {
        let per_sequence = per_sequence(decl);
        decl.dims
            .iter()
            .map(|d| match d {
                Dim::Batch if per_sequence => self.sequences(),
                Dim::Batch => 1,
                Dim::Seq => self.total_kv(),
                Dim::Heads => spec.heads as usize,
                Dim::KvHeads => spec.kv_heads as usize,
                Dim::Fixed(n) => *n as usize,
            })
            .collect()
    }

    /// Sequence `s`'s own inputs, as if it ran alone: q, k and v read in
    /// place from the packed ones (the view lives no longer than `x`); the
    /// extra inputs' parts (copies, small).
    pub fn part(&self, spec: &MixerSpec, x: &MixerInputs, s: usize) -> MixerInputs {
        let (qr, kr) = (self.q_rows(s), self.kv_rows(s));
        let mut p = MixerInputs::new(rows(&x.q, &qr), rows(&x.k, &kr), rows(&x.v, &kr));
        (p.batch, p.seq, p.kv_seq) = (1, qr.len(), kr.len());
        p.q_offset = kr.len().saturating_sub(qr.len());
        for decl in &spec.inputs {
            if let Some(t) = x.extra.get(&decl.name) {
                let map = self.axis_map(decl, s);
                let part = match t {
                    ExtraTensor::F32(t) => ExtraTensor::F32(gather(t, &map)),
                    ExtraTensor::I32(t) => ExtraTensor::I32(gather(t, &map)),
                };
                p.extra.insert(decl.name.clone(), part);
            }
        }
        p
    }

    /// How sequence `s`'s part of an extra input sits in the packed one:
    /// per axis, the part's length and the packed index of its element 0.
    fn axis_map(&self, decl: &InputDecl, s: usize) -> Vec<(usize, usize)> {
        let kr = self.kv_rows(s);
        let per_sequence = per_sequence(decl);
        decl.dims
            .iter()
            .map(|d| match d {
                Dim::Batch if per_sequence => (1, s),
                Dim::Batch => (1, 0),
                // A filter is indexed by lag: taps 0..len of the shared one.
                Dim::Seq if decl.role == InputRole::Filter => (kr.len(), 0),
                Dim::Seq => (kr.len(), kr.start),
                Dim::Heads | Dim::KvHeads | Dim::Fixed(_) => (usize::MAX, 0),
            })
            .collect()
    }

    /// Adds sequence `s`'s gradient of an extra input into the packed one.
    pub(crate) fn scatter_add_extra(
        &self,
        decl: &InputDecl,
        s: usize,
        part: &Tensor<f32>,
        whole: &mut Tensor<f32>,
    ) {
        let map = self.axis_map(decl, s);
        for_each_index(&part.shape, &whole.shape, &map, |pi, wi| {
            whole.data[wi] += part.data[pi];
        });
    }
}

/// Inputs with a batch axis but no sequence axis hold one entry per sequence.
fn per_sequence(decl: &InputDecl) -> bool {
    decl.dims.contains(&Dim::Batch) && !decl.dims.contains(&Dim::Seq)
}

/// Rows `r` of a `[1, n, ...]` tensor, read in place (the view must not
/// outlive `t`).
pub fn rows<T: Copy>(t: &Tensor<T>, r: &Range<usize>) -> Tensor<T> {
    if t.shape.len() < 2 || t.data.is_empty() {
        return Tensor::new(t.shape.clone(), t.data.to_vec());
    }
    let width: usize = t.shape[2..].iter().product();
    let mut shape = t.shape.clone();
    shape[1] = r.len();
    let slice = &t.data[r.start * width..r.end * width];
    // SAFETY: the slice lies inside `t`, which the caller keeps alive and
    // unwritten while the view lives (views live for one call on `t`).
    unsafe { Tensor::borrowed(shape, slice.as_ptr()) }
}

/// Calls `f(part_index, whole_index)` for every element of a part whose
/// axes sit in the whole as `map` says (`usize::MAX` length: the whole axis).
fn for_each_index(
    part_shape: &[usize],
    whole_shape: &[usize],
    map: &[(usize, usize)],
    mut f: impl FnMut(usize, usize),
) {
    let n: usize = part_shape.iter().product();
    let mut idx = vec![0usize; part_shape.len()];
    for pi in 0..n {
        let mut wi = 0;
        for (a, &x) in idx.iter().enumerate() {
            let start = if map[a].0 == usize::MAX { 0 } else { map[a].1 };
            wi = wi * whole_shape[a] + start + x;
        }
        f(pi, wi);
        for a in (0..idx.len()).rev() {
            idx[a] += 1;
            if idx[a] < part_shape[a] {
                break;
            }
            idx[a] = 0;
        }
    }
}

fn gather<T: Copy + Default>(t: &Tensor<T>, map: &[(usize, usize)]) -> Tensor<T> {
    let shape: Vec<usize> = map
        .iter()
        .zip(&t.shape)
        .map(|(&(len, _), &whole)| if len == usize::MAX { whole } else { len })
        .collect();
    let mut out = Tensor::zeros(&shape);
    for_each_index(&shape, &t.shape, map, |pi, wi| out.data[pi] = t.data[wi]);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn boundaries_are_checked() {
        assert!(Varlen::new(vec![0, 3, 5], vec![0, 4, 9]).is_ok());
        for (q, kv, says) in [
            (vec![1, 3], vec![0, 3], "start at 0"),
            (vec![0], vec![0], "one entry more"),
            (vec![0, 5, 3], vec![0, 5, 6], "decrease"),
            (vec![0, 2], vec![0, 2, 3], "describes 2 sequences"),
        ] {
            let e = Varlen::new(q, kv).unwrap_err().to_string();
            assert!(e.contains(says), "{e}");
        }
        let v = Varlen::from_lengths(&[3, 0, 4]).unwrap();
        assert_eq!((v.sequences(), v.total_q(), v.total_kv()), (3, 7, 7));
        assert_eq!(v.q_rows(2), 3..7);
    }

    #[test]
    fn parts_of_an_extra_input_round_trip() {
        // [batch 1, seq 7, heads 2] gates packed like the keys.
        let t = Tensor::new(vec![1, 7, 2], (0..14).map(|x| x as f32).collect());
        let v = Varlen::from_lengths(&[3, 4]).unwrap();
        let map = vec![(1, 0), (4, 3), (usize::MAX, 0)];
        let p = gather(&t, &map);
        assert_eq!(p.shape, vec![1, 4, 2]);
        assert_eq!(
            p.data.to_vec(),
            (6..14).map(|x| x as f32).collect::<Vec<_>>()
        );
        let mut back = Tensor::<f32>::zeros(&[1, 7, 2]);
        let decl = InputDecl {
            name: "g".into(),
            elem: mixc_dsl::ir::ElemType::F32,
            dims: vec![Dim::Batch, Dim::Seq, Dim::Heads],
            role: InputRole::Gate,
        };
        v.scatter_add_extra(&decl, 1, &p, &mut back);
        assert_eq!(&back.data[6..], &t.data[6..]);
        assert!(back.data[..6].iter().all(|&x| x == 0.0));
    }
}
