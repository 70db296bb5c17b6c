//! `mixc._mixc`: the native half of the `mixc` Python package, over the
//! library API (nothing here computes: it moves tensors in and out of a
//! [`mixc::Mixer`]). The Python package (`python/mixc/__init__.py`) is the
//! public face: it validates torch tensors (device, dtype, shape,
//! contiguity), allocates the outputs with torch, and passes this module
//! their addresses; this module reads the inputs in place (mixc tensors
//! borrowing the caller's memory for the length of the call: no copy), runs
//! the mixer with the GIL released, and writes the results into the
//! caller's buffers. (`Block` copies its inputs: its saved residuals
//! outlive the call.)
//!
//! The address-taking methods are private to the package: their contract
//! (documented on each) is that every address points to a live, contiguous
//! buffer of the stated element type and of the size the spec implies for
//! `batch x seq`, which the Python side checks before calling.

use std::collections::BTreeMap;

use mixc::runtime::ring::RankRows;
use mixc::{Device, ExtraTensor, MixerInputs, MixerSpec, Options, Residuals, Tensor};
use pyo3::create_exception;
use pyo3::exceptions::{PyNotImplementedError, PyRuntimeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyDict, PyList};
use std::sync::Arc;

create_exception!(
    _mixc,
    SpecError,
    PyValueError,
    "A spec that does not parse or validate; the message is the `file:line:col` diagnostic."
);

fn runtime_err(e: mixc::Error) -> PyErr {
    use mixc::Error as E;
    match e {
        E::BadInput { .. } | E::Invalid(_) | E::SizeOverflow { .. } => {
            PyValueError::new_err(e.to_string())
        }
        E::Unsupported { .. } | E::NoGpu { .. } => PyNotImplementedError::new_err(e.to_string()),
        E::Spec(m) => SpecError::new_err(m),
        E::SpecInvariant(i) => SpecError::new_err(i.to_string()),
        e => PyRuntimeError::new_err(e.to_string()),
    }
}

/// One extra input as the Python side passes it: name, address, and
/// whether it holds int32 (else f32).
type ExtraArg = (String, usize, bool);

/// The library's device for a Python device name.
fn device_of(name: &str) -> PyResult<Device> {
    match name {
        "cpu" => Ok(Device::Cpu),
        "reference" => Ok(Device::Reference),
        other => Err(PyNotImplementedError::new_err(format!(
            "device `{other}`: the Python package runs on the CPU so far (`cpu` or `reference`)"
        ))),
    }
}

/// A compiled mixer (one spec, one backend).
#[pyclass(frozen, module = "mixc._mixc")]
struct Mixer {
    /// f32 products: f32 and f16 tensors, and every backward.
    inner: mixc::Mixer,
    /// bf16 products for bf16 tensors (whose values bf16 holds exactly),
    /// prepared on the first such call.
    inner_bf16: std::sync::OnceLock<mixc::Mixer>,
    opts: Options,
    spec: MixerSpec,
}

impl Mixer {
    /// The mixer a forward on tensors of this kind runs.
    fn for_call(&self, bf16: bool) -> PyResult<&mixc::Mixer> {
        if !bf16 {
            return Ok(&self.inner);
        }
        if let Some(m) = self.inner_bf16.get() {
            return Ok(m);
        }
        let opts = self.opts.clone().with_dtype(mixc::DType::Bf16);
        let m = mixc::Mixer::new(&self.spec, opts).map_err(runtime_err)?;
        Ok(self.inner_bf16.get_or_init(|| m))
    }
}

/// Copies `n` elements from `addr`.
///
/// # Safety
/// `addr` points to `n` live, aligned elements of `T`.
unsafe fn read<T: Copy>(addr: usize, n: usize) -> Vec<T> {
    if n == 0 {
        return Vec::new();
    }
    // SAFETY: the caller's contract.
    unsafe { std::slice::from_raw_parts(addr as *const T, n) }.to_vec()
}

/// The `n` elements at `addr`, borrowed (for the length of the call).
///
/// # Safety
/// `addr` points to `n` live, aligned elements of `T`, not written while
/// the slice lives.
unsafe fn view<'a, T>(addr: usize, n: usize) -> &'a [T] {
    if n == 0 {
        return &[];
    }
    // SAFETY: the caller's contract.
    unsafe { std::slice::from_raw_parts(addr as *const T, n) }
}

/// Writes `data` to `addr`.
///
/// # Safety
/// `addr` points to `data.len()` writable, aligned elements of `T`.
unsafe fn write<T: Copy>(addr: usize, data: &[T]) {
    if data.is_empty() {
        return;
    }
    // SAFETY: the caller's contract.
    unsafe { std::slice::from_raw_parts_mut(addr as *mut T, data.len()) }.copy_from_slice(data);
}

/// Writes q, k, v and extra-input gradients to the caller's buffers (q and
/// k skipped for the convolution family, which has none).
///
/// # Safety
/// Each address holds its gradient's element count of f32.
unsafe fn write_grads(
    g: &mixc::Gradients<f32>,
    (dq, dk, dv): (usize, usize, usize),
    dextras: &[(String, usize)],
) {
    // SAFETY: the caller's contract, for each write.
    unsafe {
        if !g.dq.data.is_empty() {
            write(dq, &g.dq.data);
            write(dk, &g.dk.data);
        }
        write(dv, &g.dv.data);
        for (name, addr) in dextras {
            if let Some(t) = g.extra.get(name) {
                write(*addr, &t.data);
            }
        }
    }
}

/// A mixer's facts for the Python side: `name`, `family`, `heads`,
/// `kv_heads`, `head_dim`, `value_dim`, `reads_qk`, `inputs` (name,
/// `f32`/`i32`, dims as ints or `batch`/`seq`) and `differentiable`.
fn mixer_info<'py>(py: Python<'py>, s: &MixerSpec) -> PyResult<Bound<'py, PyDict>> {
    let d = PyDict::new(py);
    d.set_item("name", &s.name)?;
    d.set_item("family", s.family.name())?;
    d.set_item("heads", s.heads)?;
    d.set_item("kv_heads", s.kv_heads)?;
    d.set_item("head_dim", s.head_dim)?;
    d.set_item("value_dim", s.value_dim)?;
    d.set_item("reads_qk", matches!(s.score, mixc::dsl::Score::Dot { .. }))?;
    let inputs = PyList::empty(py);
    for i in &s.inputs {
        let e = PyDict::new(py);
        e.set_item("name", &i.name)?;
        let elem = if i.elem == mixc::dsl::ElemType::I32 {
            "i32"
        } else {
            "f32"
        };
        e.set_item("dtype", elem)?;
        let dims = PyList::empty(py);
        for dim in &i.dims {
            match dim {
                mixc::dsl::Dim::Fixed(n) => dims.append(*n)?,
                mixc::dsl::Dim::Batch => dims.append("batch")?,
                mixc::dsl::Dim::Seq => dims.append("seq")?,
                mixc::dsl::Dim::Heads => dims.append(s.heads)?,
                mixc::dsl::Dim::KvHeads => dims.append(s.kv_heads)?,
            }
        }
        e.set_item("dims", dims)?;
        inputs.append(e)?;
    }
    d.set_item("inputs", inputs)?;
    d.set_item(
        "differentiable",
        mixc::runtime::grad::differentiable_inputs(s),
    )?;
    Ok(d)
}

/// The extra inputs, read in place from the caller's buffers at the shapes
/// the spec gives them (names it does not declare are skipped).
///
/// # Safety
/// Each address holds its input's element count of i32 (`is_int`) or f32,
/// alive and unwritten while the returned tensors live.
unsafe fn borrow_extras(
    shapes: &BTreeMap<String, Vec<usize>>,
    extras: &[ExtraArg],
) -> BTreeMap<String, ExtraTensor> {
    let mut out = BTreeMap::new();
    for (name, addr, is_int) in extras {
        let Some(s) = shapes.get(name) else { continue };
        // SAFETY: forwarded from this function's contract.
        let t = unsafe {
            if *is_int {
                ExtraTensor::I32(Tensor::borrowed(s.clone(), *addr as *const i32))
            } else {
                ExtraTensor::F32(Tensor::borrowed(s.clone(), *addr as *const f32))
            }
        };
        out.insert(name.clone(), t);
    }
    out
}

/// The extra inputs, copied from the caller's buffers at the shapes the
/// spec gives them (names it does not declare are skipped).
///
/// # Safety
/// Each address holds its input's element count of i32 (`is_int`) or f32.
unsafe fn read_extras(
    shapes: &BTreeMap<String, Vec<usize>>,
    extras: &[ExtraArg],
) -> BTreeMap<String, ExtraTensor> {
    let mut out = BTreeMap::new();
    for (name, addr, is_int) in extras {
        let Some(s) = shapes.get(name) else { continue };
        let n = s.iter().product();
        let t = if *is_int {
            // SAFETY: forwarded from this function's contract.
            ExtraTensor::I32(Tensor::new(s.clone(), unsafe { read::<i32>(*addr, n) }))
        } else {
            // SAFETY: as above.
            ExtraTensor::F32(Tensor::new(s.clone(), unsafe { read::<f32>(*addr, n) }))
        };
        out.insert(name.clone(), t);
    }
    out
}

/// The lengths of one call: batch, queries, keys, and the position of
/// query 0 among the keys.
type Lengths = (usize, usize, usize, usize);

impl Mixer {
    fn shapes(&self, (batch, seq, kv_seq, _): Lengths) -> BTreeMap<String, Vec<usize>> {
        self.spec.tensor_shapes_kv(batch, seq, kv_seq)
    }

    /// The inputs, read in place from the caller's buffers (no copy).
    ///
    /// # Safety
    /// Every tensor at the shape the spec gives it, live, aligned and
    /// unwritten while the returned inputs live.
    unsafe fn inputs(
        &self,
        lengths: Lengths,
        qkv: (usize, usize, usize),
        extras: &[ExtraArg],
    ) -> MixerInputs {
        // SAFETY: forwarded from this function's contract.
        unsafe { self.inputs_as::<f32>(lengths, qkv, extras) }
    }

    /// [`Mixer::inputs`] with q, k and v stored as `E` (bf16 or f16 torch
    /// tensors, read in place).
    ///
    /// # Safety
    /// As [`Mixer::inputs`], with `E` elements at q, k and v.
    unsafe fn inputs_as<E: mixc::HostElem>(
        &self,
        lengths: Lengths,
        qkv: (usize, usize, usize),
        extras: &[ExtraArg],
    ) -> MixerInputs<E> {
        let shapes = self.shapes(lengths);
        let tensor = |name: &str, addr: usize| -> Tensor<E> {
            match shapes.get(name) {
                // SAFETY: forwarded from this function's contract.
                Some(s) => unsafe { Tensor::borrowed(s.clone(), addr as *const E) },
                None => Tensor::new(vec![0], Vec::new()),
            }
        };
        let (q, k, v) = (tensor("q", qkv.0), tensor("k", qkv.1), tensor("v", qkv.2));
        let mut x = MixerInputs::new(q, k, v);
        (x.batch, x.seq, x.kv_seq, x.q_offset) = lengths;
        // SAFETY: as above.
        x.extra = unsafe { borrow_extras(&shapes, extras) };
        x
    }
}

/// Runs `$call` with `$e` the element type named by `$elem` (`"f32"`,
/// `"bf16"` or `"f16"`, as the Python side passes it); any other name is a
/// `ValueError`.
macro_rules! with_elem {
    ($elem:expr, $e:ident => $call:expr) => {
        match $elem {
            "f32" => {
                type $e = f32;
                $call
            }
            "bf16" => {
                type $e = mixc::bf16;
                $call
            }
            "f16" => {
                type $e = mixc::f16;
                $call
            }
            other => Err(PyValueError::new_err(format!(
                "elem `{other}`: expected f32, bf16 or f16"
            ))),
        }
    };
}

/// One forward call's addresses: `(q, k, v)`, `o`, `stat` (when the
/// residuals are kept) and whether bf16 products may run.
type ForwardCall = ((usize, usize, usize), usize, Option<usize>, bool);

/// Where one rank's call sits in its ring: its rows, the batch, and the
/// transport to the other ranks.
struct RankCall<'a> {
    rows: &'a RankRows,
    batch: usize,
    transport: &'a Arc<dyn mixc::Transport>,
}

impl Mixer {
    /// [`Mixer::forward_rank`] on q, k, v and `o` of element type `E`.
    fn forward_rank_as<E: mixc::HostElem + mixc::OutElem>(
        &self,
        py: Python<'_>,
        at: RankCall<'_>,
        (qkv, o, stat, bf16): ForwardCall,
        extras: &[ExtraArg],
    ) -> PyResult<()> {
        let rows = at.rows;
        // SAFETY: the documented contract, checked by the Python side.
        let x = unsafe { self.rank_inputs_as::<E>(rows, at.batch, qkv, extras) };
        let m = self.for_call(bf16)?;
        let (out, saved) = py
            .detach(|| m.forward_rank(&x, stat.is_some(), at.transport))
            .map_err(runtime_err)?;
        drop(x);
        // SAFETY: `o` holds batch * n * heads * value_dim `E` (checked).
        unsafe { write(o, &rows.gather(&out.o)) };
        if let Some(addr) = stat {
            if !saved.stat.data.is_empty() {
                // SAFETY: `stat` holds batch * heads * n f64 (checked).
                unsafe { write(addr, &rows.gather_stat(&saved.stat.data)) };
            }
        }
        Ok(())
    }

    /// [`Mixer::forward`] on q, k, v and `o` of element type `E`.
    fn forward_as<E: mixc::HostElem + mixc::OutElem>(
        &self,
        py: Python<'_>,
        lengths: Lengths,
        (qkv, o, stat, bf16): ForwardCall,
        extras: &[ExtraArg],
    ) -> PyResult<()> {
        // SAFETY: the documented contract, checked by the Python side.
        let x = unsafe { self.inputs_as::<E>(lengths, qkv, extras) };
        let (batch, seq) = (lengths.0, lengths.1);
        let m = self.for_call(bf16)?;
        let (out, saved) = py
            .detach(|| match stat {
                Some(_) => m.forward_train(&x).map(|(o, r)| (o, Some(r))),
                None => m.forward(&x).map(|o| (o, None)),
            })
            .map_err(runtime_err)?;
        // SAFETY: `o` holds batch * seq * heads * value_dim `E` (checked).
        unsafe { write(o, &out.o.data) };
        if let (Some(addr), Some(r)) = (stat, saved) {
            let want = batch * self.spec.heads as usize * seq;
            if r.stat.data.len() == want {
                // SAFETY: `stat` holds batch * heads * seq f64 (checked).
                unsafe { write(addr, &r.stat.data) };
            }
        }
        Ok(())
    }
}

impl Mixer {
    /// The packed inputs of a variable-length batch, read in place; each
    /// extra input at the packed shape its role gives (see `mixc::varlen`).
    ///
    /// # Safety
    /// As [`Mixer::inputs`], at the packed shapes.
    unsafe fn packed_inputs(
        &self,
        varlen: &mixc::Varlen,
        qkv: (usize, usize, usize),
        extras: &[ExtraArg],
    ) -> PyResult<MixerInputs> {
        let (tq, tk) = (varlen.total_q(), varlen.total_kv());
        // SAFETY: forwarded from this function's contract.
        let mut x = unsafe { self.inputs((1, tq, tk, 0), qkv, &[]) };
        let shapes = varlen.packed_shapes(&self.spec);
        // SAFETY: as above.
        x.extra = unsafe { borrow_extras(&shapes, extras) };
        Ok(x)
    }
}

/// A ring's transport made of a Python object (the package's
/// `torch.distributed` link): `send(to, bytes)` must not wait for the
/// receiver, `recv()` returns the next message's bytes from any rank.
struct PyTransport {
    obj: Py<PyAny>,
    rank: usize,
    ranks: usize,
}

impl PyTransport {
    fn failed(e: PyErr) -> mixc::Error {
        mixc::Error::Transport(e.to_string())
    }
}

impl mixc::Transport for PyTransport {
    fn rank(&self) -> usize {
        self.rank
    }
    fn ranks(&self) -> usize {
        self.ranks
    }
    fn send(&self, to: usize, msg: Vec<u8>) -> mixc::Result<()> {
        Python::attach(|py| {
            self.obj
                .call_method1(py, "send", (to, PyBytes::new(py, &msg)))
                .map(drop)
                .map_err(Self::failed)
        })
    }
    fn recv(&self) -> mixc::Result<Vec<u8>> {
        Python::attach(|py| {
            let got = self.obj.call_method0(py, "recv").map_err(Self::failed)?;
            let bytes = got
                .cast_bound::<PyBytes>(py)
                .map_err(|e| Self::failed(e.into()))?;
            Ok(bytes.as_bytes().to_vec())
        })
    }
}

/// The ring sharding `name` (`"zigzag"` or `"contiguous"`), or by default
/// zigzag under a causal mask (balanced) and contiguous otherwise. Always
/// explicit, so rings over processes and `ring_shards` agree with the
/// mixer whatever tiles it picks.
fn sharding_for(spec: &mixc::MixerSpec, name: Option<&str>) -> PyResult<mixc::Sharding> {
    match name {
        Some(name) => mixc::Sharding::parse(name).ok_or_else(|| {
            PyValueError::new_err(format!(
                "sharding must be \"zigzag\" or \"contiguous\", not {name:?}"
            ))
        }),
        None if spec.mask.implies_causal() => Ok(mixc::Sharding::Zigzag),
        None => Ok(mixc::Sharding::Contiguous),
    }
}

/// A process group's transport (a `_GroupTransport`) as the library's.
fn group_transport(obj: Py<PyAny>, rank: usize, ranks: usize) -> Arc<dyn mixc::Transport> {
    Arc::new(PyTransport { obj, rank, ranks })
}

impl Mixer {
    /// The whole-sequence inputs of one rank: q, k, v from the rank's rows
    /// (`[batch, n, ...]` at the addresses), extras whole.
    ///
    /// # Safety
    /// As [`Mixer::inputs`], q, k and v holding `n` rows.
    unsafe fn rank_inputs(
        &self,
        rows: &RankRows,
        batch: usize,
        qkv: (usize, usize, usize),
        extras: &[ExtraArg],
    ) -> MixerInputs {
        // SAFETY: forwarded from this function's contract.
        unsafe { self.rank_inputs_as::<f32>(rows, batch, qkv, extras) }
    }

    /// [`Mixer::rank_inputs`] with q, k and v stored as `E`.
    ///
    /// # Safety
    /// As [`Mixer::rank_inputs`], with `E` elements at q, k and v.
    unsafe fn rank_inputs_as<E: mixc::HostElem>(
        &self,
        rows: &RankRows,
        batch: usize,
        qkv: (usize, usize, usize),
        extras: &[ExtraArg],
    ) -> MixerInputs<E> {
        let (seq, n) = (rows.seq, rows.positions.len());
        let shapes = self.shapes((batch, seq, seq, 0));
        let tensor = |name: &str, addr: usize| -> Tensor<E> {
            match shapes.get(name) {
                Some(s) => {
                    let count = batch * n * s[2..].iter().product::<usize>();
                    // SAFETY: forwarded from this function's contract.
                    rows.scatter(unsafe { view::<E>(addr, count) }, s)
                }
                None => Tensor::new(vec![0], Vec::new()),
            }
        };
        let (q, k, v) = (tensor("q", qkv.0), tensor("k", qkv.1), tensor("v", qkv.2));
        let mut x = MixerInputs::new(q, k, v);
        (x.batch, x.seq, x.kv_seq, x.q_offset) = (batch, seq, seq, 0);
        // SAFETY: as above.
        x.extra = unsafe { borrow_extras(&shapes, extras) };
        x
    }
}

#[pymethods]
impl Mixer {
    /// Parses `text` (diagnostics name `origin`) and prepares the mixer on
    /// `device` (`"cpu"` or `"reference"`) with `threads` CPU workers
    /// (`None`: every core) and `ranks` ring ranks.
    #[new]
    #[pyo3(signature = (text, origin, device = "cpu", threads = None, ranks = 1, sharding = None, config = None))]
    #[allow(clippy::too_many_arguments)]
    fn new(
        py: Python<'_>,
        text: &str,
        origin: &str,
        device: &str,
        threads: Option<usize>,
        ranks: usize,
        sharding: Option<&str>,
        config: Option<BTreeMap<String, usize>>,
    ) -> PyResult<Self> {
        let spec = mixc::parse(text).map_err(|d| SpecError::new_err(d.render(origin, text)))?;
        // Likely mistakes in a valid spec, as Python warnings (UserWarning).
        let warnings = mixc::dsl::warnings_str(text);
        if !warnings.is_empty() {
            let category = py.get_type::<pyo3::exceptions::PyUserWarning>();
            let message = std::ffi::CString::new(warnings.render(origin, text))
                .unwrap_or_else(|_| c"spec warnings (not printable)".to_owned());
            PyErr::warn(py, &category, &message, 1)?;
        }
        let device = device_of(device)?;
        // The tensors arrive as f32 whatever their dtype, so the products are
        // f32 too (a bf16 spec would otherwise round f32 tensors to bf16).
        // Always explicit, so rings over processes and `ring_shards` agree
        // with the mixer whatever tiles it picks.
        let sharding = sharding_for(&spec, sharding)?;
        let mut opts = Options {
            threads,
            ..Options::on(device)
                .with_ranks(ranks)
                .with_sharding(sharding)
                .with_dtype(mixc::DType::F32)
        };
        // Explicit CPU tiles instead of a tuned or default choice.
        if let Some(config) = config {
            let mut base = mixc::runtime::cpu::CpuConfig::default_for(&spec, 0);
            if let Some(t) = threads {
                base.threads = t;
            }
            let mut tiles = mixc::CpuTiles::of(&base);
            for (key, value) in config {
                match key.as_str() {
                    "block_m" => tiles.block_m = value,
                    "block_n" => tiles.block_n = value,
                    "chunk" => tiles.chunk = value,
                    other => {
                        return Err(PyValueError::new_err(format!(
                            "config key `{other}`: the CPU tiles are block_m, block_n and chunk"
                        )))
                    }
                }
            }
            opts = opts.with_tiles(mixc::Tiles::Cpu(tiles));
        }
        let inner = mixc::Mixer::new(&spec, opts.clone()).map_err(runtime_err)?;
        Ok(Mixer {
            inner,
            inner_bf16: std::sync::OnceLock::new(),
            opts,
            spec,
        })
    }

    /// The spec's facts the Python side checks tensors against: `name`,
    /// `family`, `heads`, `kv_heads`, `head_dim`, `value_dim`, `inputs`
    /// (name, `f32`/`i32`, dims as ints or `batch`/`seq`/`heads`/`kv_heads`)
    /// and `differentiable` (the inputs that get a gradient).
    #[getter]
    fn info<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let d = mixer_info(py, &self.spec)?;
        d.set_item("sharding", self.inner.sharding().name())?;
        Ok(d)
    }

    /// The forward pass (with `bf16`: q, k and v hold bf16 values, so the
    /// tile products may run in bf16, see `cpu_bf16_products`): writes `o`
    /// (`[batch, seq, heads, value_dim]`, of `elem`'s type)
    /// and, when `stat` is given, each row's statistic for the backward
    /// (f64 `[batch, heads, seq]`). `lengths` is `(batch, seq, kv_seq,
    /// q_offset)`: queries, keys and the position of query 0 among the keys.
    ///
    /// Addresses: `q` `[batch, seq, heads, head_dim]`, `k`, `v`
    /// `[batch, kv_seq, kv_heads, dim]`, of `elem`'s type (`"f32"`,
    /// `"bf16"` or `"f16"`: 16-bit tensors are read in place and `o` is
    /// written in their type) (q and k ignored for the
    /// convolution family); `extras` by name, int32 or f32 in their declared
    /// shapes (a `seq` axis has kv_seq entries). Every one live, contiguous
    /// and as large as the shapes say (the Python package checks it).
    #[pyo3(signature = (lengths, q, k, v, extras, o, stat = None, bf16 = false, elem = "f32"))]
    #[allow(clippy::too_many_arguments)]
    fn forward(
        &self,
        py: Python<'_>,
        lengths: Lengths,
        q: usize,
        k: usize,
        v: usize,
        extras: Vec<ExtraArg>,
        o: usize,
        stat: Option<usize>,
        bf16: bool,
        elem: &str,
    ) -> PyResult<()> {
        let call = ((q, k, v), o, stat, bf16);
        with_elem!(elem, E => self.forward_as::<E>(py, lengths, call, &extras))
    }

    /// The backward pass: writes the gradients of `sum(o * do)` into `dq`,
    /// `dk`, `dv` (f32, the inputs' shapes; q and k ignored for the
    /// convolution family) and `dextras` (f32, by input name), given the
    /// forward's inputs, `o` (f32) and `stat` (f64, from [`Mixer::forward`])
    /// and `d_o` (f32, `o`'s shape). Addresses as [`Mixer::forward`].
    #[pyo3(signature = (lengths, q, k, v, extras, o, stat, d_o, dq, dk, dv, dextras))]
    #[allow(clippy::too_many_arguments)]
    fn backward(
        &self,
        py: Python<'_>,
        lengths: Lengths,
        q: usize,
        k: usize,
        v: usize,
        extras: Vec<ExtraArg>,
        o: usize,
        stat: usize,
        d_o: usize,
        dq: usize,
        dk: usize,
        dv: usize,
        dextras: Vec<(String, usize)>,
    ) -> PyResult<()> {
        let (batch, seq) = (lengths.0, lengths.1);
        let (h, dvw) = (self.spec.heads as usize, self.spec.value_dim as usize);
        let o_shape = vec![batch, seq, h, dvw];
        // SAFETY: the documented contract, checked by the Python side.
        let (x, o_t, d_o_t, stat_t) = unsafe {
            (
                self.inputs(lengths, (q, k, v), &extras),
                Tensor::borrowed(o_shape.clone(), o as *const f32),
                Tensor::borrowed(o_shape, d_o as *const f32),
                Tensor::borrowed(vec![batch, h, seq], stat as *const f64),
            )
        };
        let residuals = Residuals::from_stat(stat_t, batch, seq);
        let back = py
            .detach(|| self.inner.backward(&x, &o_t, &residuals, &d_o_t))
            .map_err(runtime_err)?;
        // SAFETY: each destination holds its input's element count (checked).
        unsafe { write_grads(&back.grads, (dq, dk, dv), &dextras) };
        Ok(())
    }

    /// A forward that carries the recurrent state of a causal linear,
    /// retention or gated mixer (see `Mixer::forward_state`): q, k, v the
    /// new tokens (`lengths` = (batch, seq)), `state_in` the addresses of
    /// `s` (f32 `[batch, heads, head_dim, value_dim]`) and `z` (f32 `[batch,
    /// heads, head_dim]`) or None; writes `o` and the next state to
    /// `state_out` (same shapes).
    #[pyo3(signature = (lengths, q, k, v, extras, o, state_in, state_out))]
    #[allow(clippy::too_many_arguments)]
    fn forward_state(
        &self,
        py: Python<'_>,
        lengths: (usize, usize),
        q: usize,
        k: usize,
        v: usize,
        extras: Vec<ExtraArg>,
        o: usize,
        state_in: Option<(usize, usize)>,
        state_out: (usize, usize),
    ) -> PyResult<()> {
        let (batch, seq) = lengths;
        let s = &self.spec;
        let (h, dk, dv) = (s.heads as usize, s.head_dim as usize, s.value_dim as usize);
        // SAFETY: the documented contract, checked by the Python side.
        let (x, st) = unsafe {
            (
                self.inputs((batch, seq, seq, 0), (q, k, v), &extras),
                state_in.map(|(sa, za)| mixc::RecurrentState {
                    s: Tensor::borrowed(vec![batch, h, dk, dv], sa as *const f32),
                    z: Tensor::borrowed(vec![batch, h, dk], za as *const f32),
                }),
            )
        };
        let (out, next) = py
            .detach(|| self.inner.forward_state(&x, st.as_ref()))
            .map_err(runtime_err)?;
        // SAFETY: each destination holds its tensor's element count (checked).
        unsafe {
            write(o, &out.o.data);
            write(state_out.0, &next.s.data);
            write(state_out.1, &next.z.data);
        }
        Ok(())
    }

    /// One call against a paged KV cache (inference; see `mixc::paged`):
    /// q `[batch, seq, heads, head_dim]` (f32), `k`/`v` f32 `[num_pages,
    /// page_size, kv_heads, dim]` (`pages`, `page_size`), `block_table`
    /// int32 `[batch, max_pages]`, `seq_lens` one length per row, extras
    /// without a `seq` axis; writes `o` (f32 `[batch, seq, heads,
    /// value_dim]`).
    #[pyo3(signature = (q, q_seq, k, v, pages, page_size, block_table, max_pages, seq_lens, extras, o, bf16 = false))]
    #[allow(clippy::too_many_arguments)]
    fn forward_paged(
        &self,
        py: Python<'_>,
        q: usize,
        q_seq: usize,
        k: usize,
        v: usize,
        pages: usize,
        page_size: usize,
        block_table: usize,
        max_pages: usize,
        seq_lens: Vec<usize>,
        extras: Vec<ExtraArg>,
        o: usize,
        bf16: bool,
    ) -> PyResult<()> {
        let s = &self.spec;
        let (h, kvh, dk, dv) = (
            s.heads as usize,
            s.kv_heads as usize,
            s.head_dim as usize,
            s.value_dim as usize,
        );
        let batch = seq_lens.len();
        // SAFETY: the documented contract, checked by the Python side.
        let (qt, kt, vt, bt, ex) = unsafe {
            (
                Tensor::borrowed(vec![batch, q_seq, h, dk], q as *const f32),
                Tensor::borrowed(vec![pages, page_size, kvh, dk], k as *const f32),
                Tensor::borrowed(vec![pages, page_size, kvh, dv], v as *const f32),
                Tensor::borrowed(vec![batch, max_pages], block_table as *const i32),
                borrow_extras(&s.tensor_shapes(batch, 1), &extras),
            )
        };
        let cache = mixc::PagedKv {
            k: &kt,
            v: &vt,
            block_table: &bt,
            seq_lens: &seq_lens,
        };
        let m = self.for_call(bf16)?;
        let out = py
            .detach(|| m.forward_paged(&qt, &cache, &ex))
            .map_err(runtime_err)?;
        // SAFETY: `o` holds batch * seq * heads * value_dim f32 (checked).
        unsafe { write(o, &out.o.data) };
        Ok(())
    }

    /// The forward pass of a packed variable-length batch (batch 1; see
    /// `mixc::varlen`): `cu_q`, `cu_kv` the sequences' cumulative query and
    /// key lengths; q `[1, total_q, heads, head_dim]`, k, v `[1, total_kv,
    /// kv_heads, dim]`, extras packed by role; writes `o` (f32, packed like
    /// q) and, when given, `stat` (f64 `[1, heads, total_q]`).
    #[pyo3(signature = (cu_q, cu_kv, q, k, v, extras, o, stat = None, bf16 = false))]
    #[allow(clippy::too_many_arguments)]
    fn forward_varlen(
        &self,
        py: Python<'_>,
        cu_q: Vec<usize>,
        cu_kv: Vec<usize>,
        q: usize,
        k: usize,
        v: usize,
        extras: Vec<ExtraArg>,
        o: usize,
        stat: Option<usize>,
        bf16: bool,
    ) -> PyResult<()> {
        let varlen = mixc::Varlen::new(cu_q, cu_kv).map_err(runtime_err)?;
        // SAFETY: the documented contract, checked by the Python side.
        let x = unsafe { self.packed_inputs(&varlen, (q, k, v), &extras)? };
        let m = self.for_call(bf16)?;
        let (out, stat_t) = py
            .detach(|| match stat {
                Some(_) => m
                    .forward_train_varlen(&x, &varlen)
                    .map(|(o, r)| (o, Some(r.stat))),
                None => m.forward_varlen(&x, &varlen).map(|o| (o, None)),
            })
            .map_err(runtime_err)?;
        // SAFETY: `o` holds total_q * heads * value_dim f32 (checked).
        unsafe { write(o, &out.o.data) };
        if let (Some(addr), Some(st)) = (stat, stat_t) {
            if st.numel() == self.spec.heads as usize * varlen.total_q() {
                // SAFETY: `stat` holds heads * total_q f64 (checked).
                unsafe { write(addr, &st.data) };
            }
        }
        Ok(())
    }

    /// The backward of [`Mixer::forward_varlen`]: gradients packed like
    /// their inputs (an extra input per its role).
    #[pyo3(signature = (cu_q, cu_kv, q, k, v, extras, o, stat, d_o, dq, dk, dv, dextras))]
    #[allow(clippy::too_many_arguments)]
    fn backward_varlen(
        &self,
        py: Python<'_>,
        cu_q: Vec<usize>,
        cu_kv: Vec<usize>,
        q: usize,
        k: usize,
        v: usize,
        extras: Vec<ExtraArg>,
        o: usize,
        stat: usize,
        d_o: usize,
        dq: usize,
        dk: usize,
        dv: usize,
        dextras: Vec<(String, usize)>,
    ) -> PyResult<()> {
        let varlen = mixc::Varlen::new(cu_q, cu_kv).map_err(runtime_err)?;
        let (h, dvw) = (self.spec.heads as usize, self.spec.value_dim as usize);
        let total = varlen.total_q();
        // SAFETY: the documented contract, checked by the Python side.
        let (x, o_t, d_o_t, stat_t) = unsafe {
            (
                self.packed_inputs(&varlen, (q, k, v), &extras)?,
                Tensor::borrowed(vec![1, total, h, dvw], o as *const f32),
                Tensor::borrowed(vec![1, total, h, dvw], d_o as *const f32),
                Tensor::borrowed(vec![1, h, total], stat as *const f64),
            )
        };
        let residuals = Residuals::from_stat(stat_t, 1, total);
        let back = py
            .detach(|| {
                self.inner
                    .backward_varlen(&x, &o_t, &residuals, &d_o_t, &varlen)
            })
            .map_err(runtime_err)?;
        // SAFETY: each destination holds its input's element count (checked).
        unsafe { write_grads(&back.grads, (dq, dk, dv), &dextras) };
        Ok(())
    }

    /// This process's rank of a ring over processes (`transport`: an object
    /// with `send(to, bytes)` and `recv() -> bytes`; `rank` of `ranks`),
    /// the mixer's sharding dealing the positions. `lengths` is `(batch,
    /// seq)`, `seq` the whole sequence's length; q, k and v hold this rank's
    /// rows (`[batch, n, heads, dim]`, its positions in order), extras are
    /// whole; `o` (and `stat`, `[batch, heads, n]` f64) get this rank's rows.
    /// q, k, v and `o` are of `elem`'s type (`"f32"`, `"bf16"`, `"f16"`),
    /// as for [`Mixer::forward`].
    #[pyo3(signature = (lengths, rank, ranks, transport, q, k, v, extras, o, stat = None, bf16 = false, elem = "f32"))]
    #[allow(clippy::too_many_arguments)]
    fn forward_rank(
        &self,
        py: Python<'_>,
        lengths: (usize, usize),
        rank: usize,
        ranks: usize,
        transport: Py<PyAny>,
        q: usize,
        k: usize,
        v: usize,
        extras: Vec<ExtraArg>,
        o: usize,
        stat: Option<usize>,
        bf16: bool,
        elem: &str,
    ) -> PyResult<()> {
        let (batch, seq) = lengths;
        let rows = RankRows::new(seq, ranks, rank, self.inner.sharding()).map_err(runtime_err)?;
        let t = group_transport(transport, rank, ranks);
        let call = ((q, k, v), o, stat, bf16);
        let at = RankCall {
            rows: &rows,
            batch,
            transport: &t,
        };
        with_elem!(elem, E => self.forward_rank_as::<E>(py, at, call, &extras))
    }

    /// The backward of [`Mixer::forward_rank`]: this rank's rows of q, k,
    /// v, `o`, `d_o` (and `stat`, `[batch, heads, n]`) in; this rank's
    /// rows of `dq`, `dk`, `dv` out, and this rank's part of each extra
    /// input's gradient (whole; their sum over the ranks is the gradient).
    #[pyo3(signature = (lengths, rank, ranks, transport, q, k, v, extras, o, stat, d_o, dq, dk, dv, dextras))]
    #[allow(clippy::too_many_arguments)]
    fn backward_rank(
        &self,
        py: Python<'_>,
        lengths: (usize, usize),
        rank: usize,
        ranks: usize,
        transport: Py<PyAny>,
        q: usize,
        k: usize,
        v: usize,
        extras: Vec<ExtraArg>,
        o: usize,
        stat: usize,
        d_o: usize,
        dq: usize,
        dk: usize,
        dv: usize,
        dextras: Vec<(String, usize)>,
    ) -> PyResult<()> {
        let (batch, seq) = lengths;
        let rows = RankRows::new(seq, ranks, rank, self.inner.sharding()).map_err(runtime_err)?;
        let n = rows.positions.len();
        let (h, dvw) = (self.spec.heads as usize, self.spec.value_dim as usize);
        let o_shape = [batch, seq, h, dvw];
        let o_n = batch * n * h * dvw;
        // SAFETY: the documented contract, checked by the Python side.
        let (x, o_t, d_o_t, stat_t) = unsafe {
            (
                self.rank_inputs(&rows, batch, (q, k, v), &extras),
                rows.scatter(view::<f32>(o, o_n), &o_shape),
                rows.scatter(view::<f32>(d_o, o_n), &o_shape),
                rows.scatter_stat(view::<f64>(stat, batch * h * n), batch, h),
            )
        };
        let residuals = Residuals::from_stat(stat_t, batch, seq);
        let t = group_transport(transport, rank, ranks);
        let back = py
            .detach(|| self.inner.backward_rank(&x, &o_t, &residuals, &d_o_t, &t))
            .map_err(runtime_err)?;
        let g = back.grads;
        // SAFETY: each destination holds this rank's rows of its input, or
        // the whole extra input (checked).
        unsafe {
            if !g.dq.data.is_empty() {
                write(dq, &rows.gather(&g.dq));
                write(dk, &rows.gather(&g.dk));
            }
            write(dv, &rows.gather(&g.dv));
            for (name, addr) in &dextras {
                if let Some(t) = g.extra.get(name) {
                    write(*addr, &t.data);
                }
            }
        }
        Ok(())
    }

    fn __repr__(&self) -> String {
        format!(
            "<mixc mixer `{}` ({}) on {}>",
            self.spec.name,
            self.spec.family.name(),
            self.inner.backend().name()
        )
    }
}

/// A transformer block (a `block` file) prepared once: the native half of
/// `mixc.Block`. Weights are passed by address, `(name, address)` of a
/// live contiguous f32 buffer of the shape `info["weights"][name]`.
#[pyclass(frozen, module = "mixc._mixc")]
struct Block {
    inner: mixc::runtime::block::Block,
    spec: mixc::dsl::BlockSpec,
}

/// Writes a forward's output to `out` and, given `saved`, its residuals.
///
/// # Safety
/// `out` holds the output's element count of f32, each saved buffer its
/// residual's (see [`SavedArgs`]).
unsafe fn write_forward(
    out: usize,
    o: &mixc::runtime::block::BlockOutput,
    saved: Option<SavedArgs>,
    res: Option<&mixc::runtime::block::BlockResiduals>,
    rows: Option<&RankRows>,
) {
    // SAFETY: forwarded from this function's contract.
    unsafe {
        write(out, &o.out.data);
        if let (Some((q, k, v, o, stat)), Some(res)) = (saved, res) {
            let (parts, ts) = res.parts();
            for (addr, t) in [q, k, v, o].into_iter().zip(parts) {
                write(addr, &t.data);
            }
            // A rank's statistic is kept for its own rows only.
            match rows {
                Some(rows) if !ts.data.is_empty() => write(stat, &rows.gather_stat(&ts.data)),
                _ => write(stat, &ts.data),
            }
        }
    }
}

/// Writes a backward's dx and the named weight and extra-input gradients.
///
/// # Safety
/// Each destination holds its tensor's element count of f32.
unsafe fn write_backward(
    back: &mixc::runtime::block::BlockBackward,
    dx: usize,
    dweights: &[(String, usize)],
    dextras: &[(String, usize)],
) {
    // SAFETY: forwarded from this function's contract.
    unsafe {
        write(dx, &back.grads.dx.data);
        for (dests, grads) in [
            (dweights, &back.grads.weights),
            (dextras, &back.grads.extra),
        ] {
            for (name, addr) in dests {
                if let Some(t) = grads.get(name) {
                    write(*addr, &t.data);
                }
            }
        }
    }
}

/// The addresses of what a training forward keeps for its backward,
/// tensors the Python op saves for autograd: q, k, v, o (f32, the mixer's
/// layouts) and the statistic (f64 `[batch, heads, seq]`).
type SavedArgs = (usize, usize, usize, usize, usize);

impl Block {
    /// The weights, copied from the caller's buffers.
    ///
    /// # Safety
    /// Each address holds its weight's element count of f32.
    unsafe fn weights(
        &self,
        named: &[(String, usize)],
    ) -> PyResult<mixc::runtime::block::BlockWeights> {
        let shapes = self.spec.weight_shapes();
        let mut tensors = BTreeMap::new();
        for (name, addr) in named {
            let shape = shapes.get(name).ok_or_else(|| {
                PyValueError::new_err(format!(
                    "`{name}` is not a weight of block `{}`",
                    self.spec.name
                ))
            })?;
            // SAFETY: forwarded from this function's contract.
            let data = unsafe { read::<f32>(*addr, shape.iter().product()) };
            tensors.insert(name.clone(), Tensor::new(shape.clone(), data));
        }
        Ok(mixc::runtime::block::BlockWeights { tensors })
    }

    /// x `[batch, seq, width]` copied from `addr`, and the mixer's extra
    /// inputs from theirs.
    ///
    /// # Safety
    /// `addr` holds batch * seq * width f32; the extras as [`read_extras`].
    unsafe fn x(
        &self,
        (batch, seq): (usize, usize),
        addr: usize,
        extras: &[ExtraArg],
    ) -> mixc::runtime::block::BlockInputs {
        // SAFETY: forwarded.
        unsafe { self.x_rows((batch, seq, seq), addr, extras) }
    }

    /// What a backward call reads: x (`n` of `seq` rows), the weights,
    /// `d_out` (x's shape) and the residuals from the `saved` buffers (q, k,
    /// v, o and the statistic `[batch, heads, n]` of the `n` rows; `rows` places a rank's).
    ///
    /// # Safety
    /// As [`Block::x_rows`] and [`Block::weights`]; `d_out` holds x's
    /// element count of f32, each saved buffer its residual's.
    #[allow(clippy::type_complexity, clippy::too_many_arguments)]
    unsafe fn backward_inputs(
        &self,
        (batch, n, seq): (usize, usize, usize),
        x: usize,
        extras: &[ExtraArg],
        weights: &[(String, usize)],
        saved: SavedArgs,
        d_out: usize,
        rows: Option<&RankRows>,
    ) -> PyResult<(
        mixc::runtime::block::BlockInputs,
        mixc::runtime::block::BlockWeights,
        Tensor<f32>,
        mixc::runtime::block::BlockResiduals,
    )> {
        let m = &self.spec.mixer;
        let (h, kvh) = (m.heads as usize, m.kv_heads as usize);
        let (dk, dv) = (m.head_dim as usize, m.value_dim as usize);
        // SAFETY: forwarded from this function's contract.
        unsafe {
            let xi = self.x_rows((batch, n, seq), x, extras);
            let g = Tensor::new(xi.x.shape.clone(), read::<f32>(d_out, xi.x.numel()));
            let (q, k, v, o, stat) = saved;
            let t = |addr, shape: Vec<usize>| {
                let len = shape.iter().product();
                Tensor::new(shape, read::<f32>(addr, len))
            };
            let parts = [
                t(q, vec![batch, n, h, dk]),
                t(k, vec![batch, n, kvh, dk]),
                t(v, vec![batch, n, kvh, dv]),
                t(o, vec![batch, n, h, dv]),
            ];
            // The statistic of the `n` rows (a rank's, placed back among all).
            let stat_rows = view::<f64>(stat, batch * h * n);
            let stat = match rows {
                Some(rows) => rows.scatter_stat(stat_rows, batch, h),
                None => Tensor::new(vec![batch, h, seq], stat_rows.to_vec()),
            };
            let res = mixc::runtime::block::BlockResiduals::from_parts(&xi, parts, stat);
            Ok((xi, self.weights(weights)?, g, res))
        }
    }

    /// [`Block::x`] for `n` rows of x (a rank's) and extras of `seq`.
    ///
    /// # Safety
    /// As [`Block::x`], `addr` holding batch * n * width f32.
    unsafe fn x_rows(
        &self,
        (batch, n, seq): (usize, usize, usize),
        addr: usize,
        extras: &[ExtraArg],
    ) -> mixc::runtime::block::BlockInputs {
        let shape = vec![batch, n, self.spec.width as usize];
        // SAFETY: forwarded from this function's contract.
        let data = unsafe { read::<f32>(addr, shape.iter().product()) };
        let mut x = mixc::runtime::block::BlockInputs::new(Tensor::new(shape, data));
        let shapes = self.spec.mixer.tensor_shapes(batch, seq);
        // SAFETY: as above, for the mixer's extra inputs.
        x.extra = unsafe { read_extras(&shapes, extras) };
        x
    }
}

#[pymethods]
impl Block {
    /// Parses the block file `text` (diagnostics name `origin`) and
    /// prepares it on `device` (`"cpu"` or `"reference"`).
    #[new]
    #[pyo3(signature = (text, origin, device = "cpu", threads = None, ranks = 1, block_rows = None, sharding = None))]
    fn new(
        text: &str,
        origin: &str,
        device: &str,
        threads: Option<usize>,
        ranks: usize,
        block_rows: Option<usize>,
        sharding: Option<&str>,
    ) -> PyResult<Self> {
        let spec = mixc::dsl::parse_block_str(text)
            .map_err(|d| SpecError::new_err(d.render(origin, text)))?;
        let device = device_of(device)?;
        let opts = Options {
            threads,
            ..Options::on(device)
                .with_ranks(ranks)
                .with_sharding(sharding_for(&spec.mixer, sharding)?)
        };
        let mut inner = mixc::runtime::block::Block::new(&spec, opts).map_err(runtime_err)?;
        if let Some(rows) = block_rows {
            inner = inner.with_block_rows(rows);
        }
        Ok(Block { inner, spec })
    }

    /// `name`, `width`, `summary`, and `weights`: each weight's name (Hugging
    /// Face Llama names) and shape.
    #[getter]
    fn info<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let d = PyDict::new(py);
        d.set_item("name", &self.spec.name)?;
        d.set_item("width", self.spec.width)?;
        d.set_item("summary", self.spec.summary())?;
        let w = PyDict::new(py);
        for (name, shape) in self.spec.weight_shapes() {
            w.set_item(name, shape)?;
        }
        d.set_item("weights", w)?;
        d.set_item("mixer", mixer_info(py, &self.spec.mixer)?)?;
        d.set_item("sharding", self.inner.sharding().name())?;
        Ok(d)
    }

    /// Writes the seeded weights `mixc run` uses into the given buffers.
    fn init_weights(&self, seed: u64, weights: Vec<(String, usize)>) -> PyResult<()> {
        let w = mixc::runtime::block::BlockWeights::random(&self.spec, seed);
        for (name, addr) in weights {
            let t = w.tensors.get(&name).ok_or_else(|| {
                PyValueError::new_err(format!(
                    "`{name}` is not a weight of block `{}`",
                    self.spec.name
                ))
            })?;
            // SAFETY: the caller's buffer holds this weight's element count.
            unsafe { write(addr, &t.data) };
        }
        Ok(())
    }

    /// The forward: writes `out` (f32 `[batch, seq, width]`) and, given
    /// `saved`, what the backward needs into those buffers (full size; left
    /// as they are on the reference backend, whose backward recomputes).
    #[pyo3(signature = (lengths, x, extras, weights, out, saved))]
    #[allow(clippy::too_many_arguments)]
    fn forward(
        &self,
        py: Python<'_>,
        lengths: (usize, usize),
        x: usize,
        extras: Vec<ExtraArg>,
        weights: Vec<(String, usize)>,
        out: usize,
        saved: Option<SavedArgs>,
    ) -> PyResult<()> {
        // SAFETY: the documented contract, checked by the Python side.
        let (xi, w) = unsafe { (self.x(lengths, x, &extras), self.weights(&weights)?) };
        let (o, res) = py
            .detach(|| {
                if saved.is_some() {
                    self.inner.forward_train(&xi, &w).map(|(o, r)| (o, Some(r)))
                } else {
                    self.inner.forward(&xi, &w).map(|o| (o, None))
                }
            })
            .map_err(runtime_err)?;
        // SAFETY: as `write_forward` requires (checked by the Python side).
        unsafe { write_forward(out, &o, saved, res.as_ref(), None) };
        Ok(())
    }

    /// The backward: writes dx, each weight's gradient (`dweights`, by
    /// name) and each float extra input's (`dextras`) for the upstream
    /// gradient `d_out` (x's shape), from what the forward wrote to `saved`.
    #[pyo3(signature = (lengths, x, extras, weights, saved, d_out, dx, dweights, dextras))]
    #[allow(clippy::too_many_arguments)]
    fn backward(
        &self,
        py: Python<'_>,
        lengths: (usize, usize),
        x: usize,
        extras: Vec<ExtraArg>,
        weights: Vec<(String, usize)>,
        saved: SavedArgs,
        d_out: usize,
        dx: usize,
        dweights: Vec<(String, usize)>,
        dextras: Vec<(String, usize)>,
    ) -> PyResult<()> {
        let (batch, seq) = lengths;
        // SAFETY: the documented contract, checked by the Python side.
        let (xi, w, g, res) = unsafe {
            self.backward_inputs((batch, seq, seq), x, &extras, &weights, saved, d_out, None)?
        };
        let back = py
            .detach(|| self.inner.backward(&xi, &w, &res, &g))
            .map_err(runtime_err)?;
        // SAFETY: as `write_backward` requires (checked by the Python side).
        unsafe { write_backward(&back, dx, &dweights, &dextras) };
        Ok(())
    }

    /// This process's rank of a ring over processes (`transport` a
    /// `_GroupTransport`): x holds the rank's rows `[batch, n, width]`
    /// (its positions under the block's sharding of `seq`, `lengths` =
    /// `(batch, seq)`), extras are whole. Writes the rank's rows of `out`
    /// and, given `saved`, what `backward_rank` needs: q, k, v, o of the
    /// rank's rows and the statistic `[batch, heads, n]` of its rows.
    #[pyo3(signature = (lengths, rank, ranks, transport, x, extras, weights, out, saved))]
    #[allow(clippy::too_many_arguments)]
    fn forward_rank(
        &self,
        py: Python<'_>,
        lengths: (usize, usize),
        rank: usize,
        ranks: usize,
        transport: Py<PyAny>,
        x: usize,
        extras: Vec<ExtraArg>,
        weights: Vec<(String, usize)>,
        out: usize,
        saved: Option<SavedArgs>,
    ) -> PyResult<()> {
        let (batch, seq) = lengths;
        let rows = RankRows::new(seq, ranks, rank, self.inner.sharding()).map_err(runtime_err)?;
        let n = rows.positions.len();
        // SAFETY: the documented contract, checked by the Python side.
        let (xi, w) = unsafe {
            (
                self.x_rows((batch, n, seq), x, &extras),
                self.weights(&weights)?,
            )
        };
        let t = group_transport(transport, rank, ranks);
        let (o, res) = py
            .detach(|| self.inner.forward_rank(&xi, &w, &rows, saved.is_some(), &t))
            .map_err(runtime_err)?;
        // SAFETY: as `write_forward` requires (checked by the Python side).
        unsafe { write_forward(out, &o, saved, res.as_ref(), Some(&rows)) };
        Ok(())
    }

    /// The backward of `forward_rank`: this rank's rows of dx, and this
    /// rank's part of each weight's and float extra input's gradient
    /// (summed over the ranks, the gradient).
    #[pyo3(signature = (lengths, rank, ranks, transport, x, extras, weights, saved, d_out, dx, dweights, dextras))]
    #[allow(clippy::too_many_arguments)]
    fn backward_rank(
        &self,
        py: Python<'_>,
        lengths: (usize, usize),
        rank: usize,
        ranks: usize,
        transport: Py<PyAny>,
        x: usize,
        extras: Vec<ExtraArg>,
        weights: Vec<(String, usize)>,
        saved: SavedArgs,
        d_out: usize,
        dx: usize,
        dweights: Vec<(String, usize)>,
        dextras: Vec<(String, usize)>,
    ) -> PyResult<()> {
        let (batch, seq) = lengths;
        let rows = RankRows::new(seq, ranks, rank, self.inner.sharding()).map_err(runtime_err)?;
        let n = rows.positions.len();
        // SAFETY: the documented contract, checked by the Python side.
        let (xi, w, g, res) = unsafe {
            self.backward_inputs(
                (batch, n, seq),
                x,
                &extras,
                &weights,
                saved,
                d_out,
                Some(&rows),
            )?
        };
        let t = group_transport(transport, rank, ranks);
        let back = py
            .detach(|| self.inner.backward_rank(&xi, &w, &res, &g, &rows, &t))
            .map_err(runtime_err)?;
        // SAFETY: as `write_backward` requires (checked by the Python side).
        unsafe { write_backward(&back, dx, &dweights, &dextras) };
        Ok(())
    }

    fn __repr__(&self) -> String {
        format!(
            "<mixc block `{}` ({}) on {}>",
            self.spec.name,
            self.spec.summary(),
            self.inner.backend().name()
        )
    }
}

/// Checks spec text; returns the same one-line summary as `mixc check`.
/// Whether this CPU runs bf16 tensors' tile products in bf16 (AVX-512
/// BF16, and `MIXC_CPU_BF16` not `0`); else they run in f32.
#[pyfunction]
fn cpu_bf16_products() -> bool {
    mixc::runtime::cpu::bf16::enabled()
}

#[pyfunction]
#[pyo3(signature = (text, origin = "<spec>"))]
fn check(text: &str, origin: &str) -> PyResult<String> {
    let spec = mixc::parse(text).map_err(|d| SpecError::new_err(d.render(origin, text)))?;
    Ok(format!("ok ({} `{}`)", spec.family.name(), spec.name))
}

/// The generated CUDA source of a spec for `arch` (`sm_80`, `sm_90`) and
/// `dtype` (`f16`, `bf16`, `f32`; `None`: the spec's), default tiles: what
/// `mixc gen` prints. `backward` gives the backward kernels' source.
#[pyfunction]
#[pyo3(signature = (text, origin = "<spec>", arch = "sm_90", dtype = None, backward = false))]
fn gen(
    text: &str,
    origin: &str,
    arch: &str,
    dtype: Option<&str>,
    backward: bool,
) -> PyResult<String> {
    use mixc::codegen::{Arch, KernelConfig, Target};
    let spec = mixc::parse(text).map_err(|d| SpecError::new_err(d.render(origin, text)))?;
    let arch = Arch::parse(arch).map_err(|e| PyValueError::new_err(e.to_string()))?;
    let dtype = match dtype {
        None => spec.dtype,
        Some(d) => mixc::DType::parse(d).ok_or_else(|| {
            PyValueError::new_err(format!("dtype `{d}`: expected f16, bf16 or f32"))
        })?,
    };
    let target = Target::new(arch, dtype);
    let g = if backward {
        mixc::codegen::generate_backward(
            &spec,
            &target,
            &KernelConfig::backward_default_for(&spec, &target),
        )
    } else {
        mixc::codegen::generate(&spec, &target, &KernelConfig::default_for(&spec, &target))
    };
    g.map(|g| g.source)
        .map_err(|e| PyNotImplementedError::new_err(e.to_string()))
}

/// Tunes the CPU backend's tiles for `spec` at `batch x seq` (the forward,
/// or with `backward` the backward pass), as `mixc tune --backend cpu`
/// does, through the same library session: a cached entry is returned
/// unless `force`; otherwise candidates are timed (`reps` each, within
/// `budget` seconds) against the reference and the winner is stored in the
/// tuning cache, where every later `Mixer` of this spec finds it. Returns
/// JSON: `{"result": "cache_hit" | "tuned", "entry": ..., "path": ...,
/// "warnings": [...]}`.
#[pyfunction]
#[pyo3(signature = (text, origin, seq, batch = 1, backward = false, budget = 10.0, reps = 3, force = false, seed = 0, top = 5))]
#[allow(clippy::too_many_arguments)]
fn tune(
    py: Python<'_>,
    text: &str,
    origin: &str,
    seq: usize,
    batch: usize,
    backward: bool,
    budget: f64,
    reps: usize,
    force: bool,
    seed: u64,
    top: usize,
) -> PyResult<String> {
    use mixc::runtime::tune::{self, Pass, TuneRequest, TuneResult};
    let spec = mixc::parse(text).map_err(|d| SpecError::new_err(d.render(origin, text)))?;
    if !(budget.is_finite() && budget >= 0.0) {
        return Err(PyValueError::new_err(format!(
            "budget must be a non-negative number of seconds, not {budget}"
        )));
    }
    let req = TuneRequest {
        backend: mixc::BackendKind::Cpu,
        batch,
        seq,
        dtype: spec.dtype,
        reps,
        seed,
        budget: std::time::Duration::from_secs_f64(budget),
        force,
        top: top.max(1),
        pass: if backward { Pass::Bwd } else { Pass::Fwd },
    };
    let session = py
        .detach(|| tune::tune(&spec, &req, &mut |_| {}, &mut |_| {}))
        .map_err(runtime_err)?;
    let (result, entry, path) = match session.result {
        TuneResult::CacheHit { entry, path } => ("cache_hit", entry, Some(path)),
        TuneResult::Tuned { entry, written, .. } => ("tuned", entry, written),
        TuneResult::NothingPassed { report } => {
            let why: Vec<String> = report
                .results
                .iter()
                .map(|r| r.candidate.label.clone())
                .collect();
            return Err(PyRuntimeError::new_err(format!(
                "no tile configuration passed the check against the reference (tried {})",
                why.join(", ")
            )));
        }
    };
    let v = serde_json::json!({
        "result": result,
        "entry": entry,
        "path": path.map(|p| p.display().to_string()),
        "warnings": session.warnings,
    });
    Ok(v.to_string())
}

/// The positions each rank of a ring owns: per rank, its `(start, end)`
/// ranges in order, for `seq` positions over `ranks` ranks dealt by
/// `sharding` (`"zigzag"` or `"contiguous"`), as the mixers deal them.
#[pyfunction]
fn ring_shards(seq: usize, ranks: usize, sharding: &str) -> PyResult<Vec<Vec<(usize, usize)>>> {
    let sharding = mixc::Sharding::parse(sharding).ok_or_else(|| {
        PyValueError::new_err(format!(
            "sharding must be \"zigzag\" or \"contiguous\", not {sharding:?}"
        ))
    })?;
    let sched = mixc::RingSchedule::new(seq, ranks, sharding).map_err(runtime_err)?;
    Ok((0..ranks)
        .map(|r| sched.shard(r).iter().map(|x| (x.start, x.end)).collect())
        .collect())
}

#[pymodule]
fn _mixc(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(ring_shards, m)?)?;
    m.add_function(wrap_pyfunction!(tune, m)?)?;
    m.add_class::<Mixer>()?;
    m.add_class::<Block>()?;
    m.add_function(wrap_pyfunction!(check, m)?)?;
    m.add_function(wrap_pyfunction!(cpu_bf16_products, m)?)?;
    m.add_function(wrap_pyfunction!(gen, m)?)?;
    m.add("SpecError", m.py().get_type::<SpecError>())?;
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    Ok(())
}
