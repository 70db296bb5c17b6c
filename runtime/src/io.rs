//! Inputs and outputs as safetensors files, the format PyTorch and JAX users
//! already have: tensors are found by name (`q`, `k`, `v`, each declared
//! extra input, and `o` for the output).
//!
//! Loading is lenient about storage (f32, f16, bf16 and f64 floats are
//! widened or narrowed to f32; i32 and i64 ids become i32) and strict about
//! shape: every tensor must match the spec, and errors name the tensor and
//! the expected shape with its symbolic axes filled in.

use std::borrow::Cow;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use mixc_dsl::{DType, ElemType, MixerSpec, Score};
use safetensors::tensor::TensorView;
use safetensors::{Dtype, SafeTensors};

use crate::error::{Result, RuntimeError};
use crate::inputs::{describe_shape_symbolic, empty_tensor, validate_inputs};
use crate::tensor::{ExtraTensor, HostElem, MixerInputs, Tensor};

fn bad_file(path: &Path, problem: impl Into<String>) -> RuntimeError {
    RuntimeError::BadFile {
        path: path.display().to_string(),
        problem: problem.into(),
    }
}

fn bad_input(path: &Path, name: &str, problem: impl Into<String>) -> RuntimeError {
    RuntimeError::BadInput {
        name: name.to_string(),
        problem: format!("{} (in {})", problem.into(), path.display()),
    }
}

/// Little-endian elements of `width` bytes (safetensors data need not be aligned).
fn le_chunks<const N: usize>(bytes: &[u8]) -> impl Iterator<Item = [u8; N]> + '_ {
    bytes
        .chunks_exact(N)
        .map(|c| c.try_into().expect("chunks_exact yields N bytes"))
}

/// A float tensor of any supported storage type, as f32.
pub(crate) fn read_f32(path: &Path, name: &str, view: &TensorView<'_>) -> Result<Tensor<f32>> {
    let bytes = view.data();
    let data: Vec<f32> = match view.dtype() {
        Dtype::F32 => le_chunks::<4>(bytes).map(f32::from_le_bytes).collect(),
        Dtype::F16 => le_chunks::<2>(bytes)
            .map(|b| half::f16::from_le_bytes(b).to_f32())
            .collect(),
        Dtype::BF16 => le_chunks::<2>(bytes)
            .map(|b| half::bf16::from_le_bytes(b).to_f32())
            .collect(),
        Dtype::F64 => le_chunks::<8>(bytes)
            .map(|b| f64::from_le_bytes(b) as f32)
            .collect(),
        other => {
            return Err(bad_input(
                path,
                name,
                format!("has dtype {other:?}; expected a float tensor (F32, F16, BF16 or F64)"),
            ))
        }
    };
    Ok(Tensor::new(view.shape().to_vec(), data))
}

/// An integer tensor (I32 or I64) as i32.
fn read_i32(path: &Path, name: &str, view: &TensorView<'_>) -> Result<Tensor<i32>> {
    let bytes = view.data();
    let data: Vec<i32> = match view.dtype() {
        Dtype::I32 => le_chunks::<4>(bytes).map(i32::from_le_bytes).collect(),
        Dtype::I64 => le_chunks::<8>(bytes)
            .map(|b| {
                let x = i64::from_le_bytes(b);
                i32::try_from(x)
                    .map_err(|_| bad_input(path, name, format!("value {x} does not fit in i32")))
            })
            .collect::<Result<_>>()?,
        other => {
            return Err(bad_input(
                path,
                name,
                format!("has dtype {other:?}; expected an integer tensor (I32 or I64)"),
            ))
        }
    };
    Ok(Tensor::new(view.shape().to_vec(), data))
}

/// The bytes of a tensor file, read only if they fit: a regular file's size
/// is admitted against the host memory still available before it is read
/// ([`RuntimeError::OutOfMemory`] otherwise); anything else (a pipe, a
/// device such as `/dev/zero`) is read as far as its safetensors header
/// says, after admitting that length, so no path can make the read run
/// until memory is gone.
pub(crate) fn read_bounded(path: &Path) -> Result<Vec<u8>> {
    use std::io::Read;
    let io_err = |source| RuntimeError::Io {
        path: path.display().to_string(),
        source,
    };
    let file = std::fs::File::open(path).map_err(io_err)?;
    let meta = file.metadata().map_err(io_err)?;
    if meta.is_file() {
        crate::memory::admit_host(meta.len())?;
        let mut bytes = Vec::with_capacity(meta.len() as usize);
        file.take(meta.len())
            .read_to_end(&mut bytes)
            .map_err(io_err)?;
        return Ok(bytes);
    }
    // A stream: its length comes from the safetensors header (8 bytes of
    // header length, the JSON header, then the data its offsets describe).
    let mut file = file;
    let mut len8 = [0u8; 8];
    file.read_exact(&mut len8).map_err(io_err)?;
    let header_len = u64::from_le_bytes(len8);
    if header_len == 0 || header_len > MAX_HEADER_BYTES {
        return Err(bad_file(
            path,
            format!("not a valid safetensors stream (header length {header_len})"),
        ));
    }
    let mut header = vec![0u8; header_len as usize];
    file.read_exact(&mut header).map_err(io_err)?;
    let doc: serde_json::Value = serde_json::from_slice(&header)
        .map_err(|e| bad_file(path, format!("not a valid safetensors header: {e}")))?;
    let data_len = doc
        .as_object()
        .map(|m| {
            m.values()
                .filter_map(|t| t.get("data_offsets")?.get(1)?.as_u64())
                .max()
                .unwrap_or(0)
        })
        .unwrap_or(0);
    let total = 8 + header_len + data_len;
    crate::memory::admit_host(total)?;
    let mut bytes = Vec::with_capacity(total as usize);
    bytes.extend_from_slice(&len8);
    bytes.extend_from_slice(&header);
    file.take(data_len)
        .read_to_end(&mut bytes)
        .map_err(io_err)?;
    Ok(bytes)
}

/// The largest safetensors header read from a stream (the format's own limit).
const MAX_HEADER_BYTES: u64 = 100 << 20;

/// Reads the inputs of one run of `spec` from a safetensors file: `q`, `k`,
/// `v` (only `v` for the convolution family) and every declared input, by
/// name. Batch and sequence length come from `q` (or `v`); everything is then
/// checked with [`validate_inputs`]. Other tensors in the file (such as a
/// saved output `o`) are ignored.
pub fn load_inputs(path: &Path, spec: &MixerSpec) -> Result<MixerInputs> {
    Ok(load_inputs_with(path, spec, &[])?.0)
}

/// [`load_inputs`], plus the float tensors named in `optional` that the
/// file holds (e.g. an upstream gradient `do`), read as f32 and returned by
/// name; the file is read once.
pub fn load_inputs_with(
    path: &Path,
    spec: &MixerSpec,
    optional: &[&str],
) -> Result<(MixerInputs, std::collections::BTreeMap<String, Tensor<f32>>)> {
    let bytes = read_bounded(path)?;
    let file = SafeTensors::deserialize(&bytes)
        .map_err(|e| bad_file(path, format!("not a valid safetensors file: {e}")))?;
    let get = |name: &str| {
        file.tensor(name).map_err(|_| {
            let mut names: Vec<String> = file.names().into_iter().cloned().collect();
            names.sort();
            bad_input(
                path,
                name,
                format!(
                    "missing from the file (the file holds: {})",
                    if names.is_empty() {
                        "nothing".to_string()
                    } else {
                        names.join(", ")
                    }
                ),
            )
        })
    };

    let dot = matches!(spec.score, Score::Dot { .. });
    let lead = if dot { "q" } else { "v" };
    let lead_view = get(lead)?;
    let (batch, seq) = match lead_view.shape() {
        [b, s, _, _] => (*b, *s),
        other => {
            return Err(bad_input(
                path,
                lead,
                format!(
                    "expected a rank-4 tensor {}, found shape {other:?}",
                    describe_shape_symbolic(spec, lead)
                ),
            ))
        }
    };

    let (q, k) = if dot {
        (
            read_f32(path, "q", &lead_view)?,
            read_f32(path, "k", &get("k")?)?,
        )
    } else {
        (empty_tensor(), empty_tensor())
    };
    let v = read_f32(path, "v", &get("v")?)?;
    let mut extra = std::collections::BTreeMap::new();
    for decl in &spec.inputs {
        let view = get(&decl.name)?;
        let t = match decl.elem {
            ElemType::F32 => ExtraTensor::F32(read_f32(path, &decl.name, &view)?),
            ElemType::I32 => ExtraTensor::I32(read_i32(path, &decl.name, &view)?),
        };
        extra.insert(decl.name.clone(), t);
    }
    // Keys may have their own length (read from v); queries are the last
    // positions unless the caller moves them.
    let mut inputs = MixerInputs::new(q, k, v);
    (inputs.batch, inputs.seq, inputs.extra) = (batch, seq, extra);
    inputs.q_offset = inputs.kv_seq.saturating_sub(seq);
    validate_inputs(spec, &inputs).map_err(|e| match e {
        RuntimeError::BadInput { name, problem } => bad_input(path, &name, problem),
        other => other,
    })?;
    let mut more = std::collections::BTreeMap::new();
    for &name in optional {
        if let Ok(view) = file.tensor(name) {
            more.insert(name.to_string(), read_f32(path, name, &view)?);
        }
    }
    Ok((inputs, more))
}

/// One tensor to write: its safetensors dtype, shape and little-endian bytes.
struct Owned {
    dtype: Dtype,
    shape: Vec<usize>,
    bytes: Vec<u8>,
}

impl Owned {
    fn f32(t: &Tensor<f32>) -> Self {
        Owned::elem(t)
    }
    /// q, k, v or the output in its storage type (F32, BF16 or F16).
    fn elem<E: HostElem>(t: &Tensor<E>) -> Self {
        let dtype = match E::DTYPE {
            DType::F32 => Dtype::F32,
            DType::Bf16 => Dtype::BF16,
            DType::F16 => Dtype::F16,
        };
        // Little-endian bytes, as safetensors stores them.
        let bytes = if cfg!(target_endian = "little") {
            bytemuck::cast_slice(&t.data).to_vec()
        } else {
            t.data
                .iter()
                .flat_map(|x| {
                    bytemuck::bytes_of(x)
                        .iter()
                        .rev()
                        .copied()
                        .collect::<Vec<_>>()
                })
                .collect()
        };
        Owned {
            dtype,
            shape: t.shape.clone(),
            bytes,
        }
    }
    fn i32(t: &Tensor<i32>) -> Self {
        Owned {
            dtype: Dtype::I32,
            shape: t.shape.clone(),
            bytes: t.data.iter().flat_map(|x| x.to_le_bytes()).collect(),
        }
    }
}

impl safetensors::View for &Owned {
    fn dtype(&self) -> Dtype {
        self.dtype
    }
    fn shape(&self) -> &[usize] {
        &self.shape
    }
    fn data(&self) -> Cow<'_, [u8]> {
        Cow::Borrowed(&self.bytes)
    }
    fn data_len(&self) -> usize {
        self.bytes.len()
    }
}

/// Writes the output as `o` (F32, `[batch, seq, heads, value_dim]`) and, when
/// given, the inputs under their own names, so the file can be fed back with
/// `--inputs`. The file is written to a temporary sibling and renamed into
/// place, so a failure never leaves a truncated file behind.
pub fn save_tensors(path: &Path, inputs: Option<&MixerInputs>, output: &Tensor<f32>) -> Result<()> {
    save_tensors_with(path, inputs, output, &[])
}

/// [`save_tensors`], plus more f32 tensors under their names (gradients
/// `dq`, `dk`, ..., the upstream gradient `do`).
///
/// q, k, v and `o` are written in their storage type (F32, BF16 or F16);
/// `--inputs` reads any of them back.
pub fn save_tensors_with<E: HostElem>(
    path: &Path,
    inputs: Option<&MixerInputs<E>>,
    output: &Tensor<E>,
    more: &[(String, &Tensor<f32>)],
) -> Result<()> {
    let mut tensors: Vec<(String, Owned)> = vec![("o".into(), Owned::elem(output))];
    tensors.extend(more.iter().map(|(n, t)| (n.clone(), Owned::f32(t))));
    if let Some(inp) = inputs {
        for (name, t) in [("q", &inp.q), ("k", &inp.k), ("v", &inp.v)] {
            // q and k are empty for the convolution family: nothing to save.
            if !t.data.is_empty() {
                tensors.push((name.into(), Owned::elem(t)));
            }
        }
        for (name, t) in &inp.extra {
            let owned = match t {
                ExtraTensor::F32(t) => Owned::f32(t),
                ExtraTensor::I32(t) => Owned::i32(t),
            };
            tensors.push((name.clone(), owned));
        }
    }
    write_owned(path, &tensors)
}

/// Writes f32 tensors under their names (a block's weights or gradients),
/// as [`save_tensors`] writes: through a temporary sibling renamed into
/// place.
pub fn save_named<'a>(
    path: &Path,
    tensors: impl IntoIterator<Item = (&'a str, &'a Tensor<f32>)>,
) -> Result<()> {
    let owned: Vec<(String, Owned)> = tensors
        .into_iter()
        .map(|(n, t)| (n.to_string(), Owned::f32(t)))
        .collect();
    write_owned(path, &owned)
}

fn write_owned(path: &Path, tensors: &[(String, Owned)]) -> Result<()> {
    let bytes = safetensors::serialize(tensors.iter().map(|(n, t)| (n.as_str(), t)), &None)
        .map_err(|e| bad_file(path, format!("cannot encode tensors: {e}")))?;

    let io_err = |source| RuntimeError::Io {
        path: path.display().to_string(),
        source,
    };
    // A symlink is followed: its target is what gets replaced.
    let target = save_target(path).map_err(io_err)?;
    // Only a regular file (or nothing) is replaced: a FIFO, a device node or
    // a directory at the path is refused, never turned into a file. A
    // replaced file keeps its mode; a new one gets 0666 less the umask.
    let mode = match std::fs::metadata(&target) {
        Ok(m) if !m.is_file() => {
            return Err(io_err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                "not a regular file (a FIFO, a device or a directory); tensors are saved to \
                 regular files only",
            )))
        }
        Ok(m) => file_mode(&m),
        Err(_) => 0o666,
    };
    let dir = match target.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    // Registered before the file exists, so a signal at any moment finds
    // it: the handler removes what in `dir` starts with this process's
    // prefix.
    let prefix = format!(".mixc-save-{}-", std::process::id());
    let _pending = Unfinished::register(dir, &prefix);
    let mut tmp = temp_with_mode(dir, mode, &prefix).map_err(io_err)?;
    tmp.write_all(&bytes).map_err(io_err)?;
    tmp.as_file().sync_all().map_err(io_err)?;
    tmp.persist(&target).map_err(|e| io_err(e.error))?;
    Ok(())
}

/// The temporary files of saves still being written, as (folder, name
/// prefix). A save that returns removes its own file (by rename or on
/// drop); one cut short by a signal cannot, so a program's signal handler
/// calls [`remove_unfinished_saves`].
static UNFINISHED: Mutex<Vec<(PathBuf, String)>> = Mutex::new(Vec::new());

/// Registers a save's temporary-file prefix in [`UNFINISHED`] for as long
/// as it lives.
struct Unfinished((PathBuf, String));

impl Unfinished {
    fn register(dir: &Path, prefix: &str) -> Unfinished {
        let entry = (dir.to_path_buf(), prefix.to_string());
        let mut list = UNFINISHED.lock().unwrap_or_else(|e| e.into_inner());
        list.push(entry.clone());
        Unfinished(entry)
    }
}

impl Drop for Unfinished {
    fn drop(&mut self) {
        let mut list = UNFINISHED.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(at) = list.iter().position(|p| *p == self.0) {
            list.swap_remove(at);
        }
    }
}

/// Deletes the temporary file of every save still in progress, for a signal
/// handler to call before the process exits (SIGINT or SIGTERM during a
/// save of hundreds of megabytes would otherwise leave its temporary file
/// beside the target). The target itself is untouched: it still holds what
/// it held before the save began. Returns how many files it removed.
pub fn remove_unfinished_saves() -> usize {
    let list = UNFINISHED.lock().unwrap_or_else(|e| e.into_inner());
    let mut removed = 0;
    for (dir, prefix) in list.iter() {
        let Ok(entries) = std::fs::read_dir(dir) else {
            continue;
        };
        for e in entries.flatten() {
            if e.file_name().to_string_lossy().starts_with(prefix.as_str())
                && std::fs::remove_file(e.path()).is_ok()
            {
                removed += 1;
            }
        }
    }
    removed
}

/// Where a save to `path` writes: `path`, or what a symlink there points to
/// (relative links resolved against the link's folder), link after link.
fn save_target(path: &Path) -> std::io::Result<std::path::PathBuf> {
    let mut p = path.to_path_buf();
    for _ in 0..40 {
        match std::fs::symlink_metadata(&p) {
            Ok(m) if m.file_type().is_symlink() => {
                let link = std::fs::read_link(&p)?;
                p = match p.parent() {
                    Some(dir) if link.is_relative() => dir.join(link),
                    _ => link,
                };
            }
            _ => return Ok(p),
        }
    }
    Err(std::io::Error::other("too many levels of symbolic links"))
}

#[cfg(unix)]
fn file_mode(m: &std::fs::Metadata) -> u32 {
    use std::os::unix::fs::PermissionsExt;
    m.permissions().mode() & 0o7777
}

#[cfg(not(unix))]
fn file_mode(_: &std::fs::Metadata) -> u32 {
    0o666
}

/// A temporary file in `dir` created with `mode` (less the umask).
#[cfg(unix)]
fn temp_with_mode(dir: &Path, mode: u32, prefix: &str) -> std::io::Result<tempfile::NamedTempFile> {
    use std::os::unix::fs::PermissionsExt;
    tempfile::Builder::new()
        .prefix(prefix)
        .permissions(std::fs::Permissions::from_mode(mode))
        .tempfile_in(dir)
}

#[cfg(not(unix))]
fn temp_with_mode(
    dir: &Path,
    _mode: u32,
    prefix: &str,
) -> std::io::Result<tempfile::NamedTempFile> {
    tempfile::Builder::new().prefix(prefix).tempfile_in(dir)
}
