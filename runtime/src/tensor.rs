//! Host tensors and the input bundle of one mixer run. q, k, v and the
//! output are stored in f32, bf16 or f16 ([`HostElem`]: a bf16 run keeps
//! half the bytes on the host); extra inputs are f32 or i32. The reference
//! widens to f64 on read, the CPU backend computes in f32 (or f64).

use mixc_dsl::ir::{DType, EvalEnv};
use std::collections::BTreeMap;

/// The element type of q, k, v and the output on the host: `f32`,
/// [`half::bf16`] or [`half::f16`]. Computation widens each element to f32
/// (f64 in the reference), so a 16-bit run holds half the bytes and computes
/// on exactly the values a GPU run of that dtype stores.
pub trait HostElem:
    Copy + Default + PartialEq + std::fmt::Debug + Send + Sync + bytemuck::Pod + 'static
{
    /// The dtype this element stores.
    const DTYPE: DType;
    fn to_f32(self) -> f32;
    /// The nearest value (ties to even); beyond the type's range: infinite.
    fn from_f32(x: f32) -> Self;
    #[inline]
    fn to_f64(self) -> f64 {
        self.to_f32() as f64
    }
    /// Whether this is a NaN or an infinity, from the bits alone
    /// (branch-free, so a scan over a tensor vectorises).
    fn non_finite(self) -> bool;
    /// Rows of this type read as f32: `src` itself for f32, else widened
    /// into `scratch`.
    fn as_f32<'s>(src: &'s [Self], scratch: &'s mut Vec<f32>) -> &'s [f32];
    /// The elements as a type-erased view ([`Elems`]).
    fn elems(src: &[Self]) -> Elems<'_>;
}

impl HostElem for f32 {
    const DTYPE: DType = DType::F32;
    #[inline]
    fn to_f32(self) -> f32 {
        self
    }
    #[inline]
    fn from_f32(x: f32) -> Self {
        x
    }
    #[inline]
    fn non_finite(self) -> bool {
        self.to_bits() & 0x7f80_0000 == 0x7f80_0000
    }
    #[inline]
    fn as_f32<'s>(src: &'s [Self], _: &'s mut Vec<f32>) -> &'s [f32] {
        src
    }
    fn elems(src: &[Self]) -> Elems<'_> {
        Elems::F32(src)
    }
}

macro_rules! half_elem {
    ($t:ty, $dtype:expr, $variant:ident, $exponent:expr) => {
        impl HostElem for $t {
            const DTYPE: DType = $dtype;
            #[inline]
            fn to_f32(self) -> f32 {
                <$t>::to_f32(self)
            }
            #[inline]
            fn from_f32(x: f32) -> Self {
                <$t>::from_f32(x)
            }
            #[inline]
            fn non_finite(self) -> bool {
                self.to_bits() & $exponent == $exponent
            }
            fn as_f32<'s>(src: &'s [Self], scratch: &'s mut Vec<f32>) -> &'s [f32] {
                scratch.clear();
                scratch.extend(src.iter().map(|x| x.to_f32()));
                scratch
            }
            fn elems(src: &[Self]) -> Elems<'_> {
                Elems::$variant(src)
            }
        }
    };
}
half_elem!(half::bf16, DType::Bf16, Bf16, 0x7f80);
half_elem!(half::f16, DType::F16, F16, 0x7c00);

/// A slice of q, k or v of any [`HostElem`] type, for code that handles
/// all of them without being generic (the CPU backend's context).
#[derive(Debug, Clone, Copy)]
pub enum Elems<'a> {
    F32(&'a [f32]),
    Bf16(&'a [half::bf16]),
    F16(&'a [half::f16]),
}

impl<'a> Elems<'a> {
    /// Elements `at..at + len` as f32: in place for f32 storage, else
    /// widened into `scratch`.
    #[inline]
    pub fn row<'s>(&'s self, at: usize, len: usize, scratch: &'s mut Vec<f32>) -> &'s [f32] {
        match self {
            Elems::F32(x) => &x[at..at + len],
            Elems::Bf16(x) => HostElem::as_f32(&x[at..at + len], scratch),
            Elems::F16(x) => HostElem::as_f32(&x[at..at + len], scratch),
        }
    }
    /// `dst[d] = f(element at + d)` over `dst`, elements widened to f32
    /// (one dispatch per row, a plain loop per type).
    #[inline]
    pub fn map_into<T>(&self, at: usize, dst: &mut [T], f: impl Fn(f32) -> T) {
        let n = dst.len();
        match self {
            Elems::F32(x) => dst
                .iter_mut()
                .zip(&x[at..at + n])
                .for_each(|(d, &s)| *d = f(s)),
            Elems::Bf16(x) => dst
                .iter_mut()
                .zip(&x[at..at + n])
                .for_each(|(d, &s)| *d = f(s.to_f32())),
            Elems::F16(x) => dst
                .iter_mut()
                .zip(&x[at..at + n])
                .for_each(|(d, &s)| *d = f(s.to_f32())),
        }
    }
    /// The bytes of elements `at..at + len` (for prefetching).
    #[inline]
    pub fn bytes(&self, at: usize, len: usize) -> &'a [u8] {
        match *self {
            Elems::F32(x) => bytemuck::cast_slice(&x[at..at + len]),
            Elems::Bf16(x) => bytemuck::cast_slice(&x[at..at + len]),
            Elems::F16(x) => bytemuck::cast_slice(&x[at..at + len]),
        }
    }
}

/// A dense row-major tensor.
#[derive(Debug, Clone, PartialEq)]
pub struct Tensor<T> {
    pub shape: Vec<usize>,
    pub data: Storage<T>,
}

/// A tensor's elements: its own vector, or a caller's memory read in
/// place (see [`Storage::borrowed`]), copied on the first write.
pub struct Storage<T> {
    inner: Inner<T>,
}

enum Inner<T> {
    Owned(Vec<T>),
    Borrowed { ptr: *const T, len: usize },
}

// SAFETY: a borrowed storage is a shared slice (`&[T]`), which is Send and
// Sync when T is Sync; an owned one is a Vec.
unsafe impl<T: Sync + Send> Send for Storage<T> {}
unsafe impl<T: Sync> Sync for Storage<T> {}

impl<T> Storage<T> {
    /// The `len` elements at `ptr`, read in place.
    ///
    /// # Safety
    /// `ptr` points to `len` initialised, aligned elements that stay alive
    /// and unwritten for as long as this storage (and every tensor holding
    /// it) lives. Writes through the storage copy the elements first.
    pub unsafe fn borrowed(ptr: *const T, len: usize) -> Self {
        Storage {
            inner: Inner::Borrowed { ptr, len },
        }
    }
    pub fn as_slice(&self) -> &[T] {
        self
    }
    /// Whether the elements are a caller's memory read in place.
    pub fn is_borrowed(&self) -> bool {
        matches!(self.inner, Inner::Borrowed { .. })
    }
    /// The elements as a vector (a copy when borrowed).
    pub fn into_vec(self) -> Vec<T>
    where
        T: Clone,
    {
        match self.inner {
            Inner::Owned(v) => v,
            Inner::Borrowed { .. } => self.to_vec(),
        }
    }
    /// The owned vector, copied from the caller's memory first if borrowed.
    pub fn vec_mut(&mut self) -> &mut Vec<T>
    where
        T: Clone,
    {
        if let Inner::Borrowed { .. } = self.inner {
            self.inner = Inner::Owned(self.to_vec());
        }
        match &mut self.inner {
            Inner::Owned(v) => v,
            Inner::Borrowed { .. } => unreachable!("made owned above"),
        }
    }
}

impl<T> std::ops::Deref for Storage<T> {
    type Target = [T];
    fn deref(&self) -> &[T] {
        match &self.inner {
            Inner::Owned(v) => v,
            Inner::Borrowed { ptr, len } if *len == 0 => {
                let _ = ptr;
                &[]
            }
            // SAFETY: `Storage::borrowed`'s contract.
            Inner::Borrowed { ptr, len } => unsafe { std::slice::from_raw_parts(*ptr, *len) },
        }
    }
}

impl<T: Clone> std::ops::DerefMut for Storage<T> {
    fn deref_mut(&mut self) -> &mut [T] {
        self.vec_mut()
    }
}

impl<T> From<Vec<T>> for Storage<T> {
    fn from(v: Vec<T>) -> Self {
        Storage {
            inner: Inner::Owned(v),
        }
    }
}

impl<T: Clone> Clone for Storage<T> {
    /// An owned copy (a clone never borrows the caller's memory longer).
    fn clone(&self) -> Self {
        Storage::from(self.to_vec())
    }
}

impl<T: PartialEq> PartialEq for Storage<T> {
    fn eq(&self, other: &Self) -> bool {
        **self == **other
    }
}

impl<T: PartialEq> PartialEq<Vec<T>> for Storage<T> {
    fn eq(&self, other: &Vec<T>) -> bool {
        **self == **other
    }
}

impl<T: PartialEq> PartialEq<Storage<T>> for Vec<T> {
    fn eq(&self, other: &Storage<T>) -> bool {
        **self == **other
    }
}

impl<T: std::fmt::Debug> std::fmt::Debug for Storage<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        (**self).fmt(f)
    }
}

impl<'a, T: Clone> IntoIterator for &'a mut Storage<T> {
    type Item = &'a mut T;
    type IntoIter = std::slice::IterMut<'a, T>;
    fn into_iter(self) -> Self::IntoIter {
        self.iter_mut()
    }
}

impl<'a, T> IntoIterator for &'a Storage<T> {
    type Item = &'a T;
    type IntoIter = std::slice::Iter<'a, T>;
    fn into_iter(self) -> Self::IntoIter {
        self.iter()
    }
}

impl<T: Copy + Default> Tensor<T> {
    pub fn zeros(shape: &[usize]) -> Self {
        Tensor {
            shape: shape.to_vec(),
            data: vec![T::default(); shape.iter().product()].into(),
        }
    }
}

impl<E: HostElem> Tensor<E> {
    /// The elements converted to `F` (rounded to the nearest).
    pub fn convert<F: HostElem>(&self) -> Tensor<F> {
        let data = self.data.iter().map(|&x| F::from_f32(x.to_f32())).collect();
        Tensor::new(self.shape.clone(), data)
    }
    /// This tensor as `F`: moved when it already is `F` (no copy of a
    /// large output), else converted.
    pub fn into_elem<F: HostElem>(self) -> Tensor<F> {
        let mut slot = Some(self);
        match (&mut slot as &mut dyn std::any::Any).downcast_mut::<Option<Tensor<F>>>() {
            Some(same) => same.take().expect("filled above"),
            None => slot.expect("not taken").convert(),
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
        Tensor {
            shape,
            data: data.into(),
        }
    }
    /// A tensor whose elements are the caller's memory, read in place.
    ///
    /// # Safety
    /// As [`Storage::borrowed`], for `shape`'s element count at `ptr`.
    pub unsafe fn borrowed(shape: Vec<usize>, ptr: *const T) -> Self {
        let len = shape.iter().product();
        Tensor {
            shape,
            // SAFETY: forwarded from this function's contract.
            data: unsafe { Storage::borrowed(ptr, len) },
        }
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
    /// The full index of a row-major flat offset (the inverse of
    /// [`Tensor::offset`]), for messages that name an element.
    pub fn index_of(&self, mut flat: usize) -> Vec<usize> {
        let mut idx = vec![0; self.shape.len()];
        for (x, &n) in idx.iter_mut().zip(&self.shape).rev() {
            let n = n.max(1);
            *x = flat % n;
            flat /= n;
        }
        idx
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
///
/// **Storage.** q, k and v are f32 unless `E` says otherwise ([`HostElem`]:
/// bf16 or f16 inputs hold half the bytes; the output of a run comes back in
/// the same type).
#[derive(Debug, Clone, PartialEq)]
pub struct MixerInputs<E: HostElem = f32> {
    pub batch: usize,
    /// Queries (and output rows) per batch row.
    pub seq: usize,
    /// Keys and values per batch row.
    pub kv_seq: usize,
    /// Position of query 0 among the key positions.
    pub q_offset: usize,
    pub q: Tensor<E>,
    pub k: Tensor<E>,
    pub v: Tensor<E>,
    pub extra: BTreeMap<String, ExtraTensor>,
}

impl<E: HostElem> mixc_dsl::bounds::TableRead for MixerInputs<E> {
    /// Element of an extra input at clamped indices (0 for an absent name:
    /// inputs are validated before plans read them).
    fn read(&self, input: &str, indices: &[i64]) -> f64 {
        self.meta().read(input, indices)
    }
}

/// Everything of a [`MixerInputs`] but q, k and v (whatever their element
/// type): the lengths and the extra inputs, which masks, biases, decays and
/// the block plan read.
#[derive(Debug, Clone, Copy)]
pub struct InputsMeta<'a> {
    pub batch: usize,
    pub seq: usize,
    pub kv_seq: usize,
    pub q_offset: usize,
    pub extra: &'a BTreeMap<String, ExtraTensor>,
}

impl mixc_dsl::bounds::TableRead for InputsMeta<'_> {
    fn read(&self, input: &str, indices: &[i64]) -> f64 {
        self.extra
            .get(input)
            .map_or(0.0, |t| t.get_clamped(indices))
    }
}

impl InputsMeta<'_> {
    /// See [`MixerInputs::known`].
    pub fn known(&self, heads: u32, b: usize, h: Option<usize>) -> mixc_dsl::bounds::Known {
        mixc_dsl::bounds::Known {
            batch: Some(b as i64),
            head: h.map(|h| h as i64),
            heads: Some(heads as i64),
            seq: Some((self.q_offset + self.seq) as i64),
            kv_seq: Some(self.kv_seq as i64),
        }
    }

    /// See [`MixerInputs::eval_env`].
    pub fn eval_env<'l>(&self, heads: u32, lookup: &'l dyn Fn(&str, &[i64]) -> f64) -> EvalEnv<'l> {
        let mut env = EvalEnv::for_head(0, heads, lookup);
        env.seq = (self.q_offset + self.seq) as i64;
        env.kv_seq = self.kv_seq as i64;
        env
    }
}

impl<E: HostElem> MixerInputs<E> {
    /// The lengths and extra inputs ([`InputsMeta`]).
    pub fn meta(&self) -> InputsMeta<'_> {
        InputsMeta {
            batch: self.batch,
            seq: self.seq,
            kv_seq: self.kv_seq,
            q_offset: self.q_offset,
            extra: &self.extra,
        }
    }

    /// What the block plan may know of the tiles of batch row `b` (and head
    /// `h`, when given) under these inputs: the variables an expression
    /// mask reads, with the lengths as [`MixerInputs::eval_env`] gives them.
    pub fn known(&self, heads: u32, b: usize, h: Option<usize>) -> mixc_dsl::bounds::Known {
        self.meta().known(heads, b, h)
    }

    /// The expression environment of these inputs at pair (0, 0), head 0,
    /// batch row 0 (callers set `i`, `j`, `h`, `b`, `s`): `seq` is the length
    /// of the query sequence including a cached prefix (`q_offset + seq`),
    /// `kv_seq` the number of keys.
    pub fn eval_env<'a>(&self, heads: u32, lookup: &'a dyn Fn(&str, &[i64]) -> f64) -> EvalEnv<'a> {
        self.meta().eval_env(heads, lookup)
    }

    /// Inputs from q `[batch, seq, heads, head_dim]`, k `[batch, kv_seq,
    /// kv_heads, head_dim]` and v `[batch, kv_seq, kv_heads, value_dim]`:
    /// batch and the lengths are read from q and v (q and k are empty for
    /// the convolution family, so `seq == kv_seq` there), and the queries
    /// are the last positions (`q_offset = kv_seq - seq`, or 0 when there
    /// are more queries than keys). Shapes are checked against the spec
    /// when the inputs are used.
    pub fn new(q: Tensor<E>, k: Tensor<E>, v: Tensor<E>) -> MixerInputs<E> {
        let dims = |t: &Tensor<E>| (t.shape.first().copied(), t.shape.get(1).copied());
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
        q: Tensor<E>,
        k: Tensor<E>,
        v: Tensor<E>,
        extra: BTreeMap<String, ExtraTensor>,
    ) -> MixerInputs<E> {
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
    pub fn with_q_offset(mut self, q_offset: usize) -> MixerInputs<E> {
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
    pub fn with_extra(mut self, name: &str, t: ExtraTensor) -> MixerInputs<E> {
        self.extra.insert(name.to_string(), t);
        self
    }

    /// Bytes of q, k and v as stored.
    pub fn qkv_bytes(&self) -> usize {
        (self.q.numel() + self.k.numel() + self.v.numel()) * std::mem::size_of::<E>()
    }

    /// The same inputs with q, k and v converted to `F` (rounded to the
    /// nearest; [`crate::inputs::to_elem`] refuses values `F` cannot hold).
    /// Each tensor is dropped once converted.
    pub fn convert<F: HostElem>(self) -> MixerInputs<F> {
        let conv = |t: Tensor<E>| t.convert::<F>();
        let MixerInputs {
            batch,
            seq,
            kv_seq,
            q_offset,
            q,
            k,
            v,
            extra,
        } = self;
        let (q, k, v) = (conv(q), conv(k), conv(v));
        MixerInputs {
            batch,
            seq,
            kv_seq,
            q_offset,
            q,
            k,
            v,
            extra,
        }
    }

    /// These inputs read as f32 (a copy unless they are f32), for code that
    /// reads only f32 (the CUDA upload, the backward passes).
    pub fn to_f32(&self) -> std::borrow::Cow<'_, MixerInputs<f32>> {
        match (self as &dyn std::any::Any).downcast_ref::<MixerInputs<f32>>() {
            Some(x) => std::borrow::Cow::Borrowed(x),
            None => std::borrow::Cow::Owned(MixerInputs {
                batch: self.batch,
                seq: self.seq,
                kv_seq: self.kv_seq,
                q_offset: self.q_offset,
                q: self.q.convert(),
                k: self.k.convert(),
                v: self.v.convert(),
                extra: self.extra.clone(),
            }),
        }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn borrowed_storage_reads_in_place_and_copies_on_write() {
        let caller = [1.0f32, 2.0, 3.0, 4.0, 5.0, 6.0];
        // SAFETY: `caller` outlives `t` and is not written while `t` lives.
        let mut t = unsafe { Tensor::borrowed(vec![2, 3], caller.as_ptr()) };
        assert!(t.data.is_borrowed());
        assert_eq!(t.data.as_ptr(), caller.as_ptr(), "no copy");
        assert_eq!(t.offset(&[1, 2]), 5);
        assert_eq!(t.data[5], 6.0);
        // A clone is an owned copy.
        let c = t.clone();
        assert!(!c.data.is_borrowed());
        assert_eq!(c, t);
        // A write copies first: the caller's memory is never written.
        t.data[0] = 10.0;
        assert!(!t.data.is_borrowed());
        assert_eq!(caller[0], 1.0);
        assert_eq!(t.data.to_vec(), vec![10.0, 2.0, 3.0, 4.0, 5.0, 6.0]);
        // An empty borrowed tensor.
        let e = unsafe { Tensor::<f32>::borrowed(vec![0, 4], std::ptr::null()) };
        assert!(e.data.is_empty());
    }
}
