//! The CUDA backend: runs the kernels `mixc_codegen` generates, compiled by
//! NVRTC (cubin, disk-cached), on one or more GPUs, in ring order.
//!
//! - [`probe`]: is a GPU usable? Never panics: the driver library is looked
//!   for before cudarc touches it, and a panic inside cudarc is caught.
//! - [`CudaMixer`] / [`run`]: a mixer compiled and loaded once, then run on
//!   any number of input sets. The sequence is sharded over `R` ranks exactly as [`crate::ring`] says; ranks are dealt
//!   round-robin onto the visible GPUs ([`plan::device_of`]), so `R` virtual
//!   ranks on one GPU and one rank per GPU are the same code path. Softmax and
//!   convolution ranks pass key/value shards around the ring (peer copies on
//!   a copy stream, double buffers, events) and merge partials (log-sum-exp
//!   merge kernel, or f32 accumulation); linear/retention/gated ranks pass the
//!   recurrent state in sequence order. See `docs/cuda.md`.
//! - [`time_config`]: CUDA-event timing of one kernel configuration, for the
//!   autotuner.
//! - [`dist`]: torchrun-style environment of a multi-process run; given
//!   as [`CudaOptions::world`] with `WORLD_SIZE > 1`, [`run`] runs this
//!   process's rank of a ring across processes (NCCL send/recv, `rank.rs` / `nccl.rs`) and rank 0 returns
//!   the whole output.
//!
//! Host-side pieces (argument binding, launch planning) live in [`args`] and
//! [`plan`] and are tested without a GPU.

pub mod args;
mod backward;
pub(crate) mod backward_linear;
mod device;
pub mod dist;
mod exec;
mod gpu_rank;
pub mod kernels;
mod nccl;
pub mod plan;
mod rank;
// The host twin (tests only): a child of this module so it reaches the
// backend's private host code; its file lives with the tests.
#[cfg(test)]
#[path = "../../tests/twin/mod.rs"]
mod twin;

use std::panic::{catch_unwind, AssertUnwindSafe};

use mixc_codegen::{Arch, KernelConfig};
use mixc_dsl::ir::{DType, MixerSpec};
use serde::{Deserialize, Serialize};

use crate::error::{Result, RuntimeError};
use crate::ring::Sharding;
use crate::tensor::{MixerInputs, Tensor};

/// Oldest driver API the backend accepts (CUDA 12.0). The kernels are
/// NVRTC cubins for sm_80 / sm_90; a driver older than the NVRTC that built
/// them may refuse to load them, which [`run`] reports with both versions.
pub const MIN_DRIVER_VERSION: i32 = 12000;

/// What [`probe`] found.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceInfo {
    /// Device 0's name, e.g. `NVIDIA H100 80GB HBM3`.
    pub name: String,
    /// Device 0's compute capability (major, minor).
    pub compute_capability: (i32, i32),
    /// Device 0's memory in bytes (total, free now).
    pub total_memory: usize,
    pub free_memory: usize,
    /// Driver API version as the driver reports it (e.g. 13000 for 13.0).
    pub driver_version: i32,
    /// Visible CUDA devices.
    pub count: usize,
}

impl DeviceInfo {
    /// One line for `mixc` output: name, capability, memory, driver, count.
    pub fn describe(&self) -> String {
        format!(
            "{} (sm_{}{}, {:.1} GiB, driver {}), {} device{}",
            self.name,
            self.compute_capability.0,
            self.compute_capability.1,
            self.total_memory as f64 / (1u64 << 30) as f64,
            driver_version_string(self.driver_version),
            self.count,
            if self.count == 1 { "" } else { "s" }
        )
    }
}

/// `13000` -> `13.0`.
pub fn driver_version_string(v: i32) -> String {
    format!("{}.{}", v / 1000, (v % 1000) / 10)
}

/// The error every "no usable GPU" case returns, with what to do instead.
/// [`crate::inputs::validate_inputs`], and the one shape the CUDA kernels
/// do not take yet: queries at other positions than their keys (decode,
/// chunked prefill, cross-attention run on the CPU backend).
pub(crate) fn validate_inputs(spec: &MixerSpec, inputs: &MixerInputs) -> Result<()> {
    crate::inputs::validate_inputs(spec, inputs)?;
    if inputs.is_self_aligned() {
        return Ok(());
    }
    Err(RuntimeError::Unsupported {
        backend: "cuda",
        what: format!(
            "{} queries at offset {} against {} keys (the generated kernels take queries and \
             keys of one sequence)",
            inputs.seq, inputs.q_offset, inputs.kv_seq
        ),
    })
}

pub(crate) fn no_gpu(why: impl std::fmt::Display) -> RuntimeError {
    RuntimeError::NoGpu {
        reason: why.to_string(),
    }
}

/// The kernels' architecture for a compute capability: sm_90 for 9.x,
/// sm_80 for 8.x (an sm_80 cubin runs on 8.6 / 8.9). Older GPUs lack the
/// bf16 tensor-core instructions; newer majors cannot load these cubins.
pub fn arch_for(cc: (i32, i32)) -> Result<Arch> {
    match cc.0 {
        9 => Ok(Arch::Sm90),
        8 => Ok(Arch::Sm80),
        m if m < 8 => Err(no_gpu(format!(
            "compute capability {}.{} is below 8.0; the kernels need sm_80 or newer \
             (bf16 tensor-core mma)",
            cc.0, cc.1
        ))),
        _ => Err(no_gpu(format!(
            "compute capability {}.{}: this build compiles cubins for sm_80 and sm_90 only, \
             which do not load on a newer major architecture",
            cc.0, cc.1
        ))),
    }
}

/// Is a GPU usable? `Err` says why not (no driver library, driver too old,
/// no device, an unsupported compute capability); never panics.
pub fn probe() -> Result<DeviceInfo> {
    catch_unwind(AssertUnwindSafe(device::probe_devices))
        .unwrap_or_else(|_| Err(no_gpu("the CUDA driver library failed while loading")))
}

/// How a CUDA run is set up.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CudaOptions {
    /// Ring ranks (virtual ranks, dealt round-robin onto the devices).
    pub ranks: usize,
    pub sharding: Sharding,
    /// Storage type of q, k, v and the output on the device.
    pub dtype: DType,
    /// Tile configuration; `None`: `KernelConfig::default_for`.
    pub config: Option<KernelConfig>,
    /// Devices to use, at most the visible count; `None`: all visible.
    pub devices: Option<usize>,
    /// This process's place in a multi-process ring (torchrun-style, over
    /// NCCL); `None`: one process. Chosen by the caller (the CLI reads it
    /// from the environment), never read from the environment here.
    pub world: Option<dist::DistEnv>,
}

impl CudaOptions {
    /// One rank, the spec's dtype, zigzag sharding for causal masks.
    pub fn default_for(spec: &MixerSpec) -> Self {
        CudaOptions {
            ranks: 1,
            sharding: if spec.mask.implies_causal() {
                Sharding::Zigzag
            } else {
                Sharding::Contiguous
            },
            dtype: spec.dtype,
            config: None,
            devices: None,
            world: None,
        }
    }
}

/// The result of a CUDA run.
#[derive(Debug, Clone, PartialEq)]
pub struct CudaRun {
    /// `[batch, seq, heads, value_dim]`.
    pub output: Tensor<f32>,
    /// Host wall time of the run (uploads, launches, download), in seconds.
    pub seconds: f64,
    /// GPU time of the launches only (CUDA events on device 0), in seconds.
    pub kernel_seconds: f64,
    /// (batch row, head, query, key) pairs of the tiles each rank computed,
    /// when counted (as the CPU backend counts them).
    pub pairs_per_rank: Option<Vec<u64>>,
    /// Devices used and the configuration the kernels ran with.
    pub devices: usize,
    pub config: KernelConfig,
    pub arch: Arch,
    /// `(RANK, WORLD_SIZE)` of a multi-process run (`None`: one process).
    /// Rank 0's `output` is the whole output; another rank's holds only its
    /// own rows (zero elsewhere), so only rank 0 should check or save it.
    pub dist_rank: Option<(usize, usize)>,
    /// The softmax row log-sum-exp, `[batch, heads, seq]` natural log
    /// (`-inf` for a row that sees no key), from [`CudaMixer::run_train`].
    pub lse: Option<Tensor<f32>>,
}

/// A raw `CUstream` handle (what `torch.cuda.current_stream().cuda_stream`
/// holds); null is the legacy default stream.
pub type RawStream = *mut std::ffi::c_void;

/// A spec compiled once and loaded on the GPUs of its ring; [`CudaMixer::run`]
/// then takes any batch and sequence length without generating, compiling or
/// loading anything. Handles of the same (spec, arch, dtype, configuration)
/// share the compiled and loaded kernels ([`kernels::CudaKernels`]).
pub struct CudaMixer {
    spec: MixerSpec,
    opts: CudaOptions,
    /// `None` for a multi-process run, which prepares per call.
    prepared: Option<std::sync::Mutex<exec::Prepared>>,
}

impl std::fmt::Debug for CudaMixer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CudaMixer")
            .field("spec", &self.spec.name)
            .field("opts", &self.opts)
            .finish()
    }
}

impl CudaMixer {
    /// Opens the GPUs, generates, compiles (disk cache) and loads the kernels.
    pub fn new(spec: &MixerSpec, opts: &CudaOptions) -> Result<CudaMixer> {
        if opts.ranks == 0 {
            return Err(RuntimeError::Invalid("a ring needs at least 1 rank".into()));
        }
        let multi = opts.world.as_ref().is_some_and(|w| w.world_size > 1);
        let prepared = if multi {
            None
        } else {
            Some(std::sync::Mutex::new(guarded(|| {
                exec::Prepared::new(spec, opts)
            })?))
        };
        Ok(CudaMixer {
            spec: spec.clone(),
            opts: opts.clone(),
            prepared,
        })
    }

    /// The tile configuration the kernels were compiled with (`None` for a
    /// multi-process run before its first call).
    pub fn config(&self) -> Option<KernelConfig> {
        self.prepared
            .as_ref()
            .map(|p| p.lock().unwrap_or_else(|e| e.into_inner()).config())
    }

    pub fn arch(&self) -> Option<Arch> {
        self.prepared
            .as_ref()
            .map(|p| p.lock().unwrap_or_else(|e| e.into_inner()).arch())
    }

    /// One call on buffers the caller owns, launched on the caller's stream
    /// (e.g. PyTorch's current stream), returning once it is enqueued: no
    /// upload, no download, no synchronisation, no allocation. A one-rank
    /// mixer writes `o` (and for softmax the row log-sum-exp) straight into
    /// `call.o` / `call.lse` with one launch of its kernel (no merge kernel,
    /// no f32 accumulator, no state written out); rings of several ranks are
    /// `Unsupported` here for now (use [`CudaMixer::run`]). Layouts:
    /// [`args::DeviceCall`].
    ///
    /// # Safety
    /// `stream` must be a live stream of GPU 0's primary context (null: the
    /// legacy default stream), and every pointer in `call` a device
    /// allocation of at least the documented size for `call.batch` x
    /// `call.seq`, holding the mixer's storage dtype (f32/int32 for extra
    /// inputs, f32 for `lse`), that stays alive until the launch finishes.
    pub unsafe fn forward_device(&self, call: &args::DeviceCall, stream: RawStream) -> Result<()> {
        let Some(p) = &self.prepared else {
            return Err(RuntimeError::Unsupported {
                backend: "cuda",
                what: "a multi-process ring in a direct device-pointer call".into(),
            });
        };
        let p = p.lock().unwrap_or_else(|e| e.into_inner());
        // SAFETY: forwarded from this function's contract.
        guarded(|| unsafe { p.forward_device(call, stream) })
    }

    /// Whether a forward at `batch x seq` fits in each GPU's free memory,
    /// estimated from the spec before any input is made (the estimate the
    /// run checks again before it allocates): [`RuntimeError::OutOfMemory`]
    /// naming the GPU with both figures when it does not. A multi-process
    /// rank is checked by its own run.
    pub fn admit(&self, batch: usize, seq: usize) -> Result<()> {
        match &self.prepared {
            Some(p) => {
                let p = p.lock().unwrap_or_else(|e| e.into_inner());
                guarded(|| p.admit(batch, seq))
            }
            None => Ok(()),
        }
    }

    /// One run on `inputs` (calls on one handle are serialised).
    pub fn run(&self, inputs: &MixerInputs) -> Result<CudaRun> {
        match (&self.prepared, &self.opts.world) {
            (Some(p), _) => {
                let p = p.lock().unwrap_or_else(|e| e.into_inner());
                guarded(|| p.run(inputs))
            }
            (None, Some(env)) => guarded(|| nccl::run_process(&self.spec, inputs, &self.opts, env)),
            (None, None) => Err(RuntimeError::Internal(
                "CUDA mixer: neither prepared nor multi-process".into(),
            )),
        }
    }
}

impl CudaMixer {
    /// [`CudaMixer::run`] for training: the run also returns the row
    /// log-sum-exp ([`CudaRun::lse`]) that [`CudaMixer::backward`] reads.
    pub fn run_train(&self, inputs: &MixerInputs) -> Result<CudaRun> {
        let p = self.single_process("training")?;
        let p = p.lock().unwrap_or_else(|e| e.into_inner());
        guarded(|| p.run_train(inputs))
    }

    /// The gradients of `sum(o * d_o)` with respect to every input, by the
    /// generated backward kernels (`config` `None`: the backward default
    /// tiles), given the forward's output `o` and row log-sum-exp `lse`
    /// (from [`CudaMixer::run_train`]), on this mixer's ring: its ranks run
    /// as threads of this process (one per rank, on the GPUs round-robin)
    /// and pass shards and gradient accumulators through host memory, so a
    /// ring is correct but not fast yet; one process per rank (NCCL) is
    /// `Unsupported` for now. Returns the gradients and the kernels' GPU time
    /// in seconds (the slowest rank's).
    pub fn backward(
        &self,
        inputs: &MixerInputs,
        o: &Tensor<f32>,
        lse: &Tensor<f32>,
        d_o: &Tensor<f32>,
        config: Option<KernelConfig>,
    ) -> Result<(crate::grad::Gradients<f32>, f64)> {
        let p = self.single_process("the backward pass")?;
        let p = p.lock().unwrap_or_else(|e| e.into_inner());
        guarded(|| p.backward(inputs, o, lse, d_o, config))
    }

    fn single_process(&self, what: &str) -> Result<&std::sync::Mutex<exec::Prepared>> {
        self.prepared
            .as_ref()
            .ok_or_else(|| RuntimeError::Unsupported {
                backend: "cuda",
                what: format!("{what} in a multi-process run (WORLD_SIZE > 1)"),
            })
    }
}

/// Runs `spec` on `inputs` once (a one-off [`CudaMixer`]; build one to run
/// many input sets). `opts.config` picks the tiles (`None`: the default).
pub fn run(spec: &MixerSpec, inputs: &MixerInputs, opts: &CudaOptions) -> Result<CudaRun> {
    CudaMixer::new(spec, opts)?.run(inputs)
}

/// Times one configuration: `warmup` untimed runs, then `reps` runs timed
/// with CUDA events around the launches, cycling through `inputs` (several
/// input sets, uploaded once, so no run finds the previous one's data in
/// L2). One rank on device 0. Returns seconds per repetition.
pub fn time_config(
    spec: &MixerSpec,
    inputs: &[MixerInputs],
    dtype: DType,
    cfg: &KernelConfig,
    warmup: usize,
    reps: usize,
) -> Result<Vec<f64>> {
    guarded(|| exec::time(spec, inputs, dtype, cfg, warmup, reps))
}

/// Whether libnccl (needed by a multi-process run) can be loaded; `Err`
/// says what to install. Never panics.
pub fn nccl_available() -> Result<()> {
    nccl::nccl_available()
}

/// cudarc panics on a missing library or symbol; turn that into an error.
fn guarded<T>(f: impl FnOnce() -> Result<T>) -> Result<T> {
    catch_unwind(AssertUnwindSafe(f)).unwrap_or_else(|p| {
        let msg = p
            .downcast_ref::<String>()
            .map(String::as_str)
            .or_else(|| p.downcast_ref::<&str>().copied())
            .unwrap_or("unknown panic");
        Err(RuntimeError::Driver {
            op: "calling into the driver bindings".into(),
            message: msg.to_string(),
        })
    })
}

/// CUDA source of the backend's own helper kernels (the log-sum-exp merge of
/// softmax partials and an accumulator reset), rendered from
/// `templates/helpers.cu` by [`mixc_codegen::helper_kernels`] and compiled
/// with NVRTC at run time.
pub fn helper_kernels_source() -> &'static str {
    mixc_codegen::helper_kernels().source
}

/// The helper kernels a softmax run loads for storage type `dtype`: the
/// merge of that type's partials and the accumulator reset.
pub fn helper_kernel_names(dtype: DType) -> [String; 2] {
    mixc_codegen::helper_kernels().kernel_names(dtype)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn arch_from_capability() {
        assert_eq!(arch_for((9, 0)).unwrap(), Arch::Sm90);
        assert_eq!(arch_for((8, 9)).unwrap(), Arch::Sm80);
        assert_eq!(arch_for((8, 0)).unwrap(), Arch::Sm80);
        let e = arch_for((7, 5)).unwrap_err().to_string();
        assert!(e.contains("7.5") && !e.contains("--backend"), "{e}");
        let e = arch_for((10, 0)).unwrap_err().to_string();
        assert!(e.contains("10.0"), "{e}");
        assert_eq!(driver_version_string(13000), "13.0");
        assert_eq!(driver_version_string(12080), "12.8");
    }
}
