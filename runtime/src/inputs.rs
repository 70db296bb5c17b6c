//! Seeded random inputs for a spec, and the checks every input bundle must
//! pass before anything computes on it (files, generated data, user code).
//!
//! Randomness: one ChaCha8 stream per tensor, selected by a hash of the
//! tensor's name, so inputs are identical on every platform and adding an
//! input to a spec does not change the values of the others for a seed.

use std::collections::BTreeMap;

use mixc_dsl::{DType, Dim, ElemType, FeatureMap, InputDecl, InputRole, MixerSpec, Norm, Score};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rand_distr::StandardNormal;

use crate::error::{Result, RuntimeError};
use crate::tensor::{ExtraTensor, HostElem, MixerInputs, Tensor};

/// The largest query position (`q_offset + seq`) a run may use: masks and
/// the block plan compute with positions as `i64` differences, and the
/// language caps its own extents at the same bound.
pub const MAX_POSITION: usize = mixc_dsl::MAX_EXTENT as usize;

/// The rng for one tensor: the seed picks the key, the name picks the stream.
pub(crate) fn stream(seed: u64, name: &str) -> ChaCha8Rng {
    // FNV-1a: a fixed, documented hash (std's hasher is not stable across releases).
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in name.bytes() {
        h ^= b as u64;
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    rng.set_stream(h);
    rng
}

/// Standard normal samples rounded to f32 (so the f32 data and the f64
/// reference read exactly the same numbers).
pub(crate) fn normal_tensor(rng: &mut ChaCha8Rng, shape: Vec<usize>, scale: f64) -> Tensor<f32> {
    normal_tensor_as(rng, shape, scale, false)
}

/// [`normal_tensor`] stored as `E` (each sample rounded to f32, then to
/// `E`: the values [`round_to_dtype`] gives the f32 tensor), `|x|` with
/// `non_negative`.
fn normal_tensor_as<E: HostElem>(
    rng: &mut ChaCha8Rng,
    shape: Vec<usize>,
    scale: f64,
    non_negative: bool,
) -> Tensor<E> {
    let n = shape.iter().product();
    let data = (0..n)
        .map(|_| {
            let x = (rng.sample::<f64, _>(StandardNormal) * scale) as f32;
            E::from_f32(if non_negative { x.abs() } else { x })
        })
        .collect();
    Tensor::new(shape, data)
}

/// An empty tensor: what q and k are for the convolution family.
pub fn empty_tensor() -> Tensor<f32> {
    Tensor::new(vec![0], Vec::new())
}

/// Sorted document ids for one sequence: a few documents of random, ragged
/// lengths (ids 0, 0, 0, 1, 1, 2, ...).
fn document_ids(rng: &mut ChaCha8Rng, seq: usize) -> Vec<i32> {
    if seq == 0 {
        return Vec::new();
    }
    // 1..=4 documents; cut points are distinct positions in 1..seq.
    let docs = rng.gen_range(1..=4usize).min(seq);
    let mut cuts: Vec<usize> = (0..docs - 1).map(|_| rng.gen_range(1..seq)).collect();
    cuts.sort_unstable();
    cuts.dedup();
    (0..seq)
        .map(|p| cuts.iter().filter(|&&c| c <= p).count() as i32)
        .collect()
}

fn random_extra(
    spec: &MixerSpec,
    decl: &InputDecl,
    batch: usize,
    seq: usize,
    seed: u64,
) -> ExtraTensor {
    let shape = spec.input_shape(decl, batch, seq);
    let n: usize = shape.iter().product();
    let mut rng = stream(seed, &decl.name);
    match (decl.role, decl.elem) {
        (InputRole::SegmentIds, ElemType::I32) => {
            // `[batch, seq]`: documents drawn independently per sequence.
            let rows = n / seq.max(1);
            let data = (0..rows)
                .flat_map(|_| document_ids(&mut rng, seq))
                .collect();
            ExtraTensor::I32(Tensor::new(shape, data))
        }
        (InputRole::Gate, ElemType::F32) => {
            // Close to 1 so decay spans many tokens yet stays visible in tests.
            let data = (0..n).map(|_| rng.gen_range(0.9f32..1.0)).collect();
            ExtraTensor::F32(Tensor::new(shape, data))
        }
        (InputRole::Filter, ElemType::F32) => {
            // f[h, t]: normal, with an envelope decaying over a quarter of the
            // sequence and a 1/sqrt(seq) scale, so sum_t |f| v stays O(1).
            let len = *shape.last().unwrap_or(&1);
            let width = (seq as f64 / 4.0).max(1.0);
            let amp = 1.0 / (seq.max(1) as f64).sqrt();
            let data = (0..n)
                .map(|e| {
                    let t = (e % len.max(1)) as f64;
                    let x: f64 = rng.sample(StandardNormal);
                    (x * amp * (-t / width).exp()) as f32
                })
                .collect();
            ExtraTensor::F32(Tensor::new(shape, data))
        }
        (_, ElemType::F32) => ExtraTensor::F32(normal_tensor(&mut rng, shape, 0.5)),
        // Integer tables: small non-negative values (they are usually indices).
        (_, ElemType::I32) => {
            let data = (0..n).map(|_| rng.gen_range(0..8)).collect();
            ExtraTensor::I32(Tensor::new(shape, data))
        }
    }
}

/// A seeded upstream gradient `do` for a backward pass: standard normal, the
/// shape of the output `[batch, seq, heads, value_dim]` (its own stream, so
/// it does not disturb the inputs of the same seed).
pub fn random_upstream(spec: &MixerSpec, batch: usize, seq: usize, seed: u64) -> Tensor<f32> {
    let shape = vec![batch, seq, spec.heads as usize, spec.value_dim as usize];
    normal_tensor(&mut stream(seed, "do"), shape, 1.0)
}

/// Deterministic inputs for `spec`: q, k, v standard normal (q, k empty for
/// the convolution family; under `norm = sum` a side with the identity
/// feature map is drawn as |normal| so the normaliser stays positive), gates in [0.9, 1), sorted ragged document ids,
/// tables normal * 0.5, filters with a decaying envelope. The same
/// `(spec, batch, seq, seed)` gives the same bits on every platform.
pub fn random_inputs(spec: &MixerSpec, batch: usize, seq: usize, seed: u64) -> MixerInputs {
    random_inputs_kv(spec, batch, seq, seq, seed)
}

/// [`random_inputs`] with `seq` queries against `kv_seq` keys, the queries
/// at the last positions (`q_offset = kv_seq - seq`, or 0 when there are
/// more queries than keys; [`MixerInputs::with_q_offset`] moves them).
/// Extra inputs with a `seq` axis span the `kv_seq` key positions. For
/// `kv_seq == seq` it is exactly [`random_inputs`].
pub fn random_inputs_kv(
    spec: &MixerSpec,
    batch: usize,
    seq: usize,
    kv_seq: usize,
    seed: u64,
) -> MixerInputs {
    random_inputs_kv_as(spec, batch, seq, kv_seq, seed)
}

/// [`random_inputs_kv`] with q, k and v stored as `E`: the same values
/// rounded to `E` (as [`round_to_dtype`] rounds them), made without an f32
/// copy (a 1M-token bf16 run never holds its inputs in f32).
pub fn random_inputs_kv_as<E: HostElem>(
    spec: &MixerSpec,
    batch: usize,
    seq: usize,
    kv_seq: usize,
    seed: u64,
) -> MixerInputs<E> {
    let shapes = spec.tensor_shapes_kv(batch, seq, kv_seq);
    // Under `norm = sum` a signed score makes the denominator cross zero, and
    // the output near such a row is ill-conditioned whatever computes it: a
    // side without a positive feature map is drawn non-negative (|x|).
    let non_negative = |name: &str| match (&spec.norm, &spec.score) {
        (Norm::Sum { .. }, Score::Dot { q_map, k_map, .. }) => match name {
            "q" => *q_map == FeatureMap::Identity,
            "k" => *k_map == FeatureMap::Identity,
            _ => false,
        },
        _ => false,
    };
    let qkv = |name: &str| match shapes.get(name) {
        Some(shape) => normal_tensor_as(
            &mut stream(seed, name),
            shape.clone(),
            1.0,
            non_negative(name),
        ),
        None => Tensor::new(vec![0], Vec::new()),
    };
    let (q, k, v) = (qkv("q"), qkv("k"), qkv("v"));
    let extra: BTreeMap<String, ExtraTensor> = spec
        .inputs
        .iter()
        .map(|d| (d.name.clone(), random_extra(spec, d, batch, kv_seq, seed)))
        .collect();
    MixerInputs {
        kv_seq,
        q_offset: kv_seq.saturating_sub(seq),
        ..MixerInputs::self_attention(batch, seq, q, k, v, extra)
    }
}

/// Random inputs of a packed variable-length batch (see [`crate::varlen`]):
/// q `[1, total_q, ...]`, k and v `[1, total_kv, ...]`, extra inputs
/// packed by role (one entry per sequence for those with a `batch` axis
/// and no `seq` axis).
pub fn random_varlen_inputs(
    spec: &MixerSpec,
    varlen: &crate::varlen::Varlen,
    seed: u64,
) -> MixerInputs {
    let (tq, tk) = (varlen.total_q(), varlen.total_kv());
    let mut x = random_inputs_kv(spec, 1, tq, tk, seed);
    for d in &spec.inputs {
        if d.dims.contains(&Dim::Batch) && !d.dims.contains(&Dim::Seq) {
            let per_sequence = random_extra(spec, d, varlen.sequences(), tk, seed);
            x.extra.insert(d.name.clone(), per_sequence);
        }
    }
    // Each sequence places its own queries (`Varlen::part`).
    x.q_offset = 0;
    x
}

/// The expected shape of a tensor with its axes named, for error messages:
/// `[batch=2, seq=33, kv_heads=2, head_dim=16]`.
pub fn describe_shape(spec: &MixerSpec, name: &str, batch: usize, seq: usize) -> String {
    describe_shape_kv(spec, name, batch, seq, seq)
}

/// [`describe_shape`] for `seq` queries against `kv_seq` keys: k, v and the
/// `seq` axes of extra inputs read `kv_seq=..` when the lengths differ.
pub fn describe_shape_kv(
    spec: &MixerSpec,
    name: &str,
    batch: usize,
    seq: usize,
    kv_seq: usize,
) -> String {
    let kv = if kv_seq == seq {
        format!("seq={seq}")
    } else {
        format!("kv_seq={kv_seq}")
    };
    describe_axes(
        spec,
        name,
        &format!("batch={batch}"),
        &format!("seq={seq}"),
        &kv,
    )
}

/// The expected shape before batch and seq are known:
/// `[batch, seq, kv_heads=2, head_dim=16]`.
pub fn describe_shape_symbolic(spec: &MixerSpec, name: &str) -> String {
    describe_axes(spec, name, "batch", "seq", "seq")
}

/// `seq` names the query axis of q and o, `kv` the key axis of k and v and
/// the position axis of extra inputs.
fn describe_axes(spec: &MixerSpec, name: &str, batch: &str, seq: &str, kv: &str) -> String {
    let (h, kvh) = (spec.heads, spec.kv_heads);
    let (dk, dv) = (spec.head_dim, spec.value_dim);
    let (batch, seq, kv) = (batch.to_string(), seq.to_string(), kv.to_string());
    let axes: Vec<String> = match name {
        "q" => vec![batch, seq, format!("heads={h}"), format!("head_dim={dk}")],
        "k" => vec![
            batch,
            kv,
            format!("kv_heads={kvh}"),
            format!("head_dim={dk}"),
        ],
        "v" => vec![
            batch,
            kv,
            format!("kv_heads={kvh}"),
            format!("value_dim={dv}"),
        ],
        "o" => vec![batch, seq, format!("heads={h}"), format!("value_dim={dv}")],
        _ => match spec.input(name) {
            Some(decl) => decl
                .dims
                .iter()
                .map(|d| match d {
                    Dim::Batch => batch.clone(),
                    Dim::Seq => kv.clone(),
                    Dim::Heads => format!("heads={h}"),
                    Dim::KvHeads => format!("kv_heads={kvh}"),
                    Dim::Fixed(n) => n.to_string(),
                })
                .collect(),
            None => return "(not declared by the spec)".into(),
        },
    };
    format!("[{}]", axes.join(", "))
}

fn bad(name: &str, problem: impl Into<String>) -> RuntimeError {
    RuntimeError::BadInput {
        name: name.to_string(),
        problem: problem.into(),
    }
}

fn check_shape<T, E: HostElem>(
    spec: &MixerSpec,
    name: &str,
    t: &Tensor<T>,
    expected: &[usize],
    inputs: &MixerInputs<E>,
) -> Result<()> {
    if t.shape != expected {
        return Err(bad(
            name,
            format!(
                "expected shape {}, found {:?}",
                describe_shape_kv(spec, name, inputs.batch, inputs.seq, inputs.kv_seq),
                t.shape
            ),
        ));
    }
    if t.data.len() != t.shape.iter().product::<usize>() {
        return Err(bad(
            name,
            format!(
                "holds {} elements but its shape {:?} needs {}",
                t.data.len(),
                t.shape,
                t.shape.iter().product::<usize>()
            ),
        ));
    }
    Ok(())
}

/// The index of the first NaN or infinity in `data`. A pass over every
/// input of every call (a decode step's KV cache included), so it is a
/// branch-free vectorised scan over chunks, spread over threads for large
/// tensors; only a chunk that holds a bad value is searched element by
/// element.
pub(crate) fn first_non_finite<E: HostElem>(data: &[E]) -> Option<usize> {
    use rayon::prelude::*;
    const CHUNK: usize = 1 << 14;
    // Exponent all ones: NaN or infinity (no early exit, so it vectorises).
    let bad = |c: &[E]| c.iter().fold(false, |a, x| a | x.non_finite());
    let chunk = if data.len() >= 1 << 22 {
        data.par_chunks(CHUNK).position_first(bad)
    } else {
        data.chunks(CHUNK).position(bad)
    }?;
    let start = chunk * CHUNK;
    data[start..]
        .iter()
        .position(|x| x.non_finite())
        .map(|i| start + i)
}

fn check_finite<E: HostElem>(name: &str, t: &Tensor<E>) -> Result<()> {
    match first_non_finite(&t.data) {
        Some(at) => Err(bad(
            name,
            format!(
                "element {at} is {} (inputs must be finite)",
                t.data[at].to_f32()
            ),
        )),
        None => Ok(()),
    }
}

/// May table `name` hold `-inf`? Where only the `bias` of a softmax mixer
/// without a `transform` reads it: an additive mask (Hugging Face's
/// convention), where `-inf` gives the pair weight 0, exactly as the mask
/// does. Anywhere else (through a transform, which could map it to a
/// finite score, in a mask, a decay, other norms) `-inf` has no such
/// meaning and is refused.
fn masks_with_neg_inf(spec: &MixerSpec, name: &str) -> bool {
    let reads = |e: Option<&mixc_dsl::Expr>| {
        let mut r = Vec::new();
        if let Some(e) = e {
            e.inputs_read(&mut r);
        }
        r.iter().any(|n| n == name)
    };
    let mut in_mask = Vec::new();
    spec.mask.inputs_read(&mut in_mask);
    matches!(spec.norm, mixc_dsl::Norm::Softmax)
        && spec.transform.is_none()
        && reads(spec.bias.as_ref())
        && !in_mask.iter().any(|n| n == name)
}

fn check_no_nan_or_pos_inf(name: &str, t: &Tensor<f32>) -> Result<()> {
    match t.data.iter().position(|x| x.is_nan() || *x == f32::INFINITY) {
        Some(at) => Err(bad(
            name,
            format!(
                "element {at} is {} (a bias table may hold -inf to mask a pair, but not NaN or +inf)",
                t.data[at]
            ),
        )),
        None => Ok(()),
    }
}

/// Checks that `inputs` fits `spec`: every tensor present with exactly the
/// shape `spec.tensor_shapes(batch, seq)` gives and the declared element
/// type, no undeclared extras, finite values, gates in (0, 1].
///
/// Segment ids may be any i32 values in any order: the mask only compares
/// them for equality. Sorted ids (packed documents) are what lets kernels skip
/// whole blocks, so unsorted ids are correct but slow.
pub fn validate_inputs<E: HostElem>(spec: &MixerSpec, inputs: &MixerInputs<E>) -> Result<()> {
    let shapes = spec.tensor_shapes_kv(inputs.batch, inputs.seq, inputs.kv_seq);
    if !matches!(spec.score, Score::Dot { .. }) && !inputs.is_self_aligned() {
        return Err(RuntimeError::Invalid(format!(
            "mixer `{}` is a convolution over one sequence: its queries are its values' \
             positions, so it takes no separate key length or query offset (got {} \
             queries at offset {} against {} values)",
            spec.name, inputs.seq, inputs.q_offset, inputs.kv_seq
        )));
    }
    let q_end = inputs.q_offset.checked_add(inputs.seq);
    if let Some(decl) = spec.positional_input() {
        if q_end.is_none_or(|e| e > inputs.kv_seq) {
            return Err(bad(
                &decl.name,
                format!(
                    "is indexed by position, so the queries (positions {}..{}) must lie \
                     among the {} key positions it covers",
                    inputs.q_offset,
                    inputs.q_offset as u128 + inputs.seq as u128,
                    inputs.kv_seq
                ),
            ));
        }
    }
    if q_end.is_none_or(|e| e > MAX_POSITION) {
        return Err(RuntimeError::Invalid(format!(
            "query positions {}..{} exceed the largest supported position {}",
            inputs.q_offset,
            inputs.q_offset as u128 + inputs.seq as u128,
            MAX_POSITION
        )));
    }
    for (name, t) in [("q", &inputs.q), ("k", &inputs.k), ("v", &inputs.v)] {
        match shapes.get(name) {
            Some(expected) => {
                check_shape(spec, name, t, expected, inputs)?;
                check_finite(name, t)?;
            }
            None if t.data.is_empty() => {}
            None => {
                return Err(bad(
                    name,
                    "the convolution family reads only v; pass an empty tensor",
                ))
            }
        }
    }
    for decl in &spec.inputs {
        let name = decl.name.as_str();
        let t = inputs.extra.get(name).ok_or_else(|| {
            bad(
                name,
                format!(
                    "missing (the spec declares `input {name}` with shape {})",
                    describe_shape_kv(spec, name, inputs.batch, inputs.seq, inputs.kv_seq)
                ),
            )
        })?;
        let expected = &shapes[name];
        match (decl.elem, t) {
            (ElemType::F32, ExtraTensor::F32(t)) => {
                check_shape(spec, name, t, expected, inputs)?;
                if masks_with_neg_inf(spec, name) {
                    check_no_nan_or_pos_inf(name, t)?;
                } else {
                    check_finite(name, t)?;
                }
                if decl.role == InputRole::Gate {
                    if let Some(at) = t.data.iter().position(|&g| !(g > 0.0 && g <= 1.0)) {
                        // [batch, seq, heads]: say which (row, position, head).
                        return Err(bad(
                            name,
                            format!(
                                "gate {:?} (batch row, position, head) is {}; \
                                 decay gates must lie in (0, 1]",
                                t.index_of(at),
                                t.data[at]
                            ),
                        ));
                    }
                }
            }
            (ElemType::I32, ExtraTensor::I32(t)) => check_shape(spec, name, t, expected, inputs)?,
            (ElemType::F32, ExtraTensor::I32(_)) => {
                return Err(bad(name, "declared f32 but holds i32 values"))
            }
            (ElemType::I32, ExtraTensor::F32(_)) => {
                return Err(bad(name, "declared i32 but holds f32 values"))
            }
        }
    }
    if let Some(name) = inputs.extra.keys().find(|n| spec.input(n).is_none()) {
        return Err(bad(
            name,
            format!("not declared by mixer `{}` (a typo?)", spec.name),
        ));
    }
    // The convolution filter must cover every lag `i - j` in 0..seq.
    if let Score::Filter { input } = &spec.score {
        if let Some(len) = inputs
            .extra
            .get(input)
            .and_then(|t| t.shape().last().copied())
        {
            if len < inputs.seq + inputs.q_offset {
                return Err(bad(
                    input,
                    format!(
                        "filter has {len} taps but the sequence has {} positions",
                        inputs.seq + inputs.q_offset
                    ),
                ));
            }
        }
    }
    Ok(())
}

/// Rounds q, k and v to the storage type `dtype` (kept in f32), so every
/// backend and the f64 reference see exactly the values a GPU run stores.
/// A finite value the type cannot hold (an f16 q of 70000 would become
/// infinite on the GPU) is refused as [`RuntimeError::BadInput`] naming the
/// tensor, the element and the type's largest value; nothing is changed then.
pub fn round_to_dtype(inputs: &mut MixerInputs, dtype: DType) -> Result<()> {
    let (round, max): (fn(f32) -> f32, f32) = match dtype {
        DType::F32 => return Ok(()),
        DType::F16 => (|x| half::f16::from_f32(x).to_f32(), half::f16::MAX.to_f32()),
        DType::Bf16 => (
            |x| half::bf16::from_f32(x).to_f32(),
            half::bf16::MAX.to_f32(),
        ),
    };
    for (name, t) in [("q", &inputs.q), ("k", &inputs.k), ("v", &inputs.v)] {
        if let Some(at) = t
            .data
            .iter()
            .position(|&x| x.is_finite() && round(x).is_infinite())
        {
            return Err(RuntimeError::BadInput {
                name: name.into(),
                problem: format!(
                    "element {:?} is {}, beyond the largest {dtype} value ({max}); scale the \
                     inputs or run in a wider dtype",
                    t.index_of(at),
                    t.data[at]
                ),
            });
        }
    }
    for t in [&mut inputs.q, &mut inputs.k, &mut inputs.v] {
        t.data.iter_mut().for_each(|x| *x = round(*x));
    }
    Ok(())
}

/// Inputs read (from a file, or made in f32) for a run that stores q, k and
/// v as `E`: rounded to `dtype` as [`round_to_dtype`] rounds them (values
/// `dtype` cannot hold are refused), then converted, a tensor at a time.
pub fn into_storage<E: HostElem>(mut inputs: MixerInputs, dtype: DType) -> Result<MixerInputs<E>> {
    round_to_dtype(&mut inputs, dtype)?;
    Ok(inputs.convert())
}

#[cfg(test)]
mod tests {
    use super::first_non_finite;

    /// A bad gate is named by its (batch row, position, head).
    #[test]
    fn a_bad_gate_is_named_by_its_index() {
        let spec = mixc_dsl::parse_str(
            "mixer g { heads = 3; head_dim = 4; input g: f32[batch, seq, heads]; \
             score = dot(q, k); decay = gate(g); mask = causal; norm = none; }",
        )
        .unwrap();
        let mut x = super::random_inputs(&spec, 2, 5, 1);
        if let Some(crate::ExtraTensor::F32(t)) = x.extra.get_mut("g") {
            let at = t.offset(&[1, 3, 2]);
            t.data[at] = 1.5;
        }
        let e = super::validate_inputs(&spec, &x).unwrap_err().to_string();
        assert!(e.contains("gate [1, 3, 2]") && e.contains("1.5"), "{e}");
    }

    /// The chunked scan finds the first bad value wherever it lies (chunk
    /// edges, the parallel path for large tensors, several bad values).
    #[test]
    fn the_first_non_finite_value_is_found() {
        for len in [0usize, 1, 100, 1 << 14, (1 << 22) + 5] {
            let mut data = vec![0.5f32; len];
            assert_eq!(first_non_finite(&data), None, "{len}");
            for at in [0, (1 << 14) - 1, 1 << 14, len.saturating_sub(1)] {
                if at >= len {
                    continue;
                }
                for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
                    data[at] = bad;
                    if at + 3 < len {
                        data[at + 3] = f32::NAN; // a later one does not win
                    }
                    assert_eq!(first_non_finite(&data), Some(at), "{len} {at} {bad}");
                    data[at] = 0.5;
                    if at + 3 < len {
                        data[at + 3] = 0.5;
                    }
                }
            }
        }
        // Large finite values and subnormals are finite.
        assert_eq!(first_non_finite(&[f32::MAX, -f32::MAX, 1e-45]), None);
    }
}
