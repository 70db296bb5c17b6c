//! Devices, modules, buffers and launches on top of cudarc's driver API.
//!
//! Synchronisation is explicit: cudarc's per-buffer event tracking is turned
//! off on every context (it keeps only the last reader of a buffer, which is
//! wrong for a shard read by a compute stream and a copy stream at once), so
//! the ring code orders streams with its own events, and every stream is
//! synchronised before any buffer is freed ([`Gpu::sync_all`], called by the
//! run's drop guard).

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, OnceLock};

use cudarc::driver::{
    result, sys, CudaContext, CudaEvent, CudaFunction, CudaSlice, CudaStream, DevicePtr,
    DriverError, LaunchConfig, PushKernelArg,
};
use cudarc::nvrtc::Ptx;
use mixc_codegen::{Arch, KernelInfo};
use mixc_dsl::ir::DType;

use super::args::ArgValue;
use super::{arch_for, driver_version_string, no_gpu, DeviceInfo, MIN_DRIVER_VERSION};
use crate::error::{Result, RuntimeError};

/// A driver error as a runtime error, saying what was being done.
pub(crate) fn drv(what: &str, e: DriverError) -> RuntimeError {
    RuntimeError::Driver {
        op: what.to_string(),
        message: e.to_string(),
    }
}

fn driver_version() -> Result<i32> {
    let mut v = 0i32;
    // Allowed before cuInit; reports the installed driver's CUDA API version.
    unsafe { sys::cuDriverGetVersion(&mut v) }
        .result()
        .map_err(|e| no_gpu(format!("cannot query the CUDA driver version ({e})")))?;
    Ok(v)
}

/// The context of GPU `ordinal`, opened once per process and kept: a
/// primary context is torn down when its last user releases it, and
/// re-creating it costs far more than a small run (the autotuner and the
/// tests make hundreds). Event tracking is off (see the module comment).
pub(crate) fn context(ordinal: usize) -> std::result::Result<Arc<CudaContext>, DriverError> {
    static CONTEXTS: OnceLock<Mutex<BTreeMap<usize, Arc<CudaContext>>>> = OnceLock::new();
    let mut map = CONTEXTS
        .get_or_init(|| Mutex::new(BTreeMap::new()))
        .lock()
        .unwrap_or_else(|p| p.into_inner());
    if let Some(c) = map.get(&ordinal) {
        return Ok(c.clone());
    }
    let ctx = CudaContext::new(ordinal)?;
    unsafe { ctx.disable_event_tracking() };
    map.insert(ordinal, ctx.clone());
    Ok(ctx)
}

/// The body of [`super::probe`] (run under `catch_unwind`).
pub(crate) fn probe_devices() -> Result<DeviceInfo> {
    // cudarc panics on first use when libcuda is missing: look first.
    if !unsafe { sys::is_culib_present() } {
        return Err(no_gpu(
            "no NVIDIA driver (libcuda.so not found on the library path), so no GPU is usable",
        ));
    }
    let version = driver_version()?;
    if version < MIN_DRIVER_VERSION {
        return Err(no_gpu(format!(
            "the NVIDIA driver supports CUDA {} but the backend needs {} or newer; update the GPU driver",
            driver_version_string(version),
            driver_version_string(MIN_DRIVER_VERSION)
        )));
    }
    result::init().map_err(|e| {
        no_gpu(format!(
            "the CUDA driver {} found no usable GPU ({e})",
            driver_version_string(version)
        ))
    })?;
    let count = CudaContext::device_count()
        .map_err(|e| no_gpu(format!("cannot count CUDA devices ({e})")))?;
    if count <= 0 {
        return Err(no_gpu(format!(
            "the CUDA driver {} sees no GPU",
            driver_version_string(version)
        )));
    }
    let ctx = context(0).map_err(|e| no_gpu(format!("cannot open GPU 0 ({e})")))?;
    let cc = ctx
        .compute_capability()
        .map_err(|e| no_gpu(format!("cannot read GPU 0's compute capability ({e})")))?;
    let name = ctx.name().unwrap_or_else(|_| "unknown GPU".into());
    let (free, total) = ctx.mem_get_info().unwrap_or((0, 0));
    // Capabilities the kernels cannot run on are "not usable" too.
    arch_for(cc)?;
    Ok(DeviceInfo {
        name,
        compute_capability: cc,
        total_memory: total,
        free_memory: free,
        driver_version: version,
        count: count as usize,
    })
}

/// One GPU of a run: its context, a compute stream and a copy stream (ring
/// transfers overlap the computation), and the loaded kernels.
pub(crate) struct Gpu {
    pub ordinal: usize,
    pub ctx: Arc<CudaContext>,
    pub compute: Arc<CudaStream>,
    pub copy: Arc<CudaStream>,
    pub arch: Arch,
    pub name: String,
    /// The generated kernels, in `GeneratedKernel::kernels` order.
    pub kernels: Vec<CudaFunction>,
    /// `mixc_merge_lse_<dtype>` and `mixc_fill_f32` (softmax only).
    pub merge: Option<CudaFunction>,
    pub fill: Option<CudaFunction>,
}

impl Gpu {
    pub fn open(ordinal: usize) -> Result<Gpu> {
        // The process-wide context (event tracking already off): a context
        // made per run would be torn down and rebuilt, with its modules and
        // peer mappings, on every run of the autotuner.
        let ctx = context(ordinal).map_err(|e| drv(&format!("opening GPU {ordinal}"), e))?;
        let cc = ctx
            .compute_capability()
            .map_err(|e| drv("reading the compute capability", e))?;
        let arch = arch_for(cc)?;
        let compute = ctx.new_stream().map_err(|e| drv("creating a stream", e))?;
        let copy = ctx.new_stream().map_err(|e| drv("creating a stream", e))?;
        Ok(Gpu {
            ordinal,
            name: ctx.name().unwrap_or_else(|_| format!("GPU {ordinal}")),
            ctx,
            compute,
            copy,
            arch,
            kernels: Vec::new(),
            merge: None,
            fill: None,
        })
    }

    /// The named functions of the module `key` (a [`super::kernels::CudaKernels`]
    /// key) on this GPU, loaded from `cubin` the first time in this process:
    /// handles of the same specialisation share one loaded module.
    pub fn load_shared(
        &self,
        key: &str,
        cubin: &[u8],
        names: &[&str],
    ) -> Result<Vec<CudaFunction>> {
        type Loaded = BTreeMap<(usize, String), Vec<CudaFunction>>;
        static LOADED: OnceLock<Mutex<Loaded>> = OnceLock::new();
        let map = LOADED.get_or_init(Default::default);
        let id = (self.ordinal, format!("{key}|{}", names.join(",")));
        if let Some(fs) = map.lock().unwrap_or_else(|p| p.into_inner()).get(&id) {
            return Ok(fs.clone());
        }
        let fs = self.load(cubin, names)?;
        map.lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(id, fs.clone());
        Ok(fs)
    }

    /// Loads a cubin and returns the named functions.
    pub fn load(&self, cubin: &[u8], names: &[&str]) -> Result<Vec<CudaFunction>> {
        crate::counters::bump(crate::counters::Work::ModuleLoad);
        let module = self
            .ctx
            .load_module(Ptx::from_binary(cubin.to_vec()))
            .map_err(|e| {
                let nvrtc = crate::nvrtc::version_string().unwrap_or_else(|_| "?".into());
                let drv_v = driver_version()
                    .map(driver_version_string)
                    .unwrap_or_default();
                RuntimeError::Driver {
                    op: format!(
                        "loading the compiled kernels on GPU {} ({})",
                        self.ordinal, self.name
                    ),
                    message: format!(
                        "{e}; the cubin was built by NVRTC {nvrtc} for {}, the driver is CUDA \
                         {drv_v} (a driver older than NVRTC cannot load its cubins)",
                        self.arch
                    ),
                }
            })?;
        names
            .iter()
            .map(|n| {
                module
                    .load_function(n)
                    .map_err(|e| drv(&format!("finding kernel `{n}` in the module"), e))
            })
            .collect()
    }

    /// Readies `f` for launches described by `info`: sets
    /// `CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES` to the launch's
    /// dynamic size (always, not only above 48 KB: the 48 KB default limit
    /// counts the kernel's static `__shared__` arrays too), and checks the
    /// block size and the static + dynamic total against what the compiled
    /// function and the GPU allow, so a misfit is a clear error, not a
    /// launch failure deep in a ring.
    pub fn opt_in_smem(&self, f: &CudaFunction, info: &KernelInfo) -> Result<()> {
        self.ctx
            .bind_to_thread()
            .map_err(|e| drv("binding the context", e))?;
        let func_attr = |a: sys::CUfunction_attribute| -> Result<i64> {
            let mut v = 0i32;
            unsafe { sys::cuFuncGetAttribute(&mut v, a, f.cu_function()) }
                .result()
                .map_err(|e| drv("reading a kernel attribute", e))?;
            Ok(i64::from(v))
        };
        let max_threads =
            func_attr(sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_THREADS_PER_BLOCK)?;
        if i64::from(info.threads_per_block) > max_threads {
            return Err(RuntimeError::DoesNotFit(format!(
                "CUDA: kernel `{}` is launched with {} threads per block but its compiled \
                 form allows {max_threads} (registers); pick another tile configuration",
                info.name, info.threads_per_block
            )));
        }
        let static_smem =
            func_attr(sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_SHARED_SIZE_BYTES)?;
        let max = self
            .ctx
            .attribute(
                sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN,
            )
            .map_err(|e| drv("reading the shared-memory limit", e))?;
        let total = i64::from(info.dynamic_smem_bytes) + static_smem;
        if total > i64::from(max) {
            return Err(RuntimeError::DoesNotFit(format!(
                "CUDA: kernel `{}` needs {} bytes of dynamic + {static_smem} bytes of static \
                 shared memory per block, GPU {} ({}) allows {max}; pick a smaller tile \
                 configuration",
                info.name, info.dynamic_smem_bytes, self.ordinal, self.name
            )));
        }
        if info.dynamic_smem_bytes == 0 {
            return Ok(());
        }
        f.set_attribute(
            sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
            info.dynamic_smem_bytes as i32,
        )
        .map_err(|e| drv("setting the dynamic shared-memory size", e))
    }

    /// Free and total memory in bytes.
    pub fn mem_info(&self) -> Result<(usize, usize)> {
        self.ctx
            .mem_get_info()
            .map_err(|e| drv("querying free memory", e))
    }

    /// Errors clearly when `needed` bytes do not fit in free memory.
    pub fn check_fits(&self, needed: usize) -> Result<()> {
        let (free, total) = self.mem_info()?;
        if needed > free {
            return Err(out_of_memory(self, needed, free, total));
        }
        Ok(())
    }

    fn alloc_err(&self, bytes: usize, e: DriverError) -> RuntimeError {
        if e.0 == sys::CUresult::CUDA_ERROR_OUT_OF_MEMORY {
            let (free, total) = self.mem_info().unwrap_or((0, 0));
            out_of_memory(self, bytes, free, total)
        } else {
            drv(
                &format!("allocating {bytes} bytes on GPU {}", self.ordinal),
                e,
            )
        }
    }

    /// A zeroed buffer of `bytes` bytes (allocated on the compute stream).
    pub fn zeros(&self, bytes: usize) -> Result<CudaSlice<u8>> {
        self.compute
            .alloc_zeros::<u8>(bytes.max(1))
            .map_err(|e| self.alloc_err(bytes, e))
    }

    /// A buffer holding `data` (uploaded on the compute stream).
    pub fn upload(&self, data: &[u8]) -> Result<CudaSlice<u8>> {
        if data.is_empty() {
            return self.zeros(1);
        }
        self.compute
            .clone_htod(data)
            .map_err(|e| self.alloc_err(data.len(), e))
    }

    /// The first `bytes` bytes of `src`, after the compute stream's work so far.
    pub fn download(&self, src: &CudaSlice<u8>, bytes: usize) -> Result<Vec<u8>> {
        self.compute
            .synchronize()
            .map_err(|e| drv("waiting for the GPU", e))?;
        if bytes == 0 {
            return Ok(Vec::new());
        }
        let v = self
            .compute
            .clone_dtoh(&src.slice(0..bytes))
            .map_err(|e| drv("downloading", e))?;
        Ok(v)
    }

    /// Waits for both streams (before buffers are freed, and at the end).
    pub fn sync_all(&self) -> Result<()> {
        self.compute
            .synchronize()
            .and_then(|_| self.copy.synchronize())
            .map_err(|e| {
                drv(
                    &format!("running on GPU {} ({})", self.ordinal, self.name),
                    e,
                )
            })
    }

    /// An event recorded now on `stream` (no timing).
    pub fn mark(stream: &Arc<CudaStream>) -> Result<CudaEvent> {
        stream
            .record_event(None)
            .map_err(|e| drv("recording an event", e))
    }

    /// A timing event recorded now on the compute stream.
    pub fn timing_mark(&self) -> Result<CudaEvent> {
        self.compute
            .record_event(Some(sys::CUevent_flags::CU_EVENT_DEFAULT))
            .map_err(|e| drv("recording a timing event", e))
    }

    /// Makes `stream` wait for `event` (which may belong to another GPU).
    pub fn wait(stream: &Arc<CudaStream>, event: &CudaEvent) -> Result<()> {
        stream
            .wait(event)
            .map_err(|e| drv("waiting for an event", e))
    }

    /// Launches `f` on a stream the caller owns (e.g. PyTorch's current
    /// stream), with `args` in signature order.
    ///
    /// # Safety
    /// `stream` must be a live stream of this GPU's context, and every
    /// pointer in `args` a device allocation large enough for what the
    /// kernel reads and writes at this grid.
    pub unsafe fn launch_on(
        &self,
        f: &CudaFunction,
        x: &super::args::HostLaunch,
        stream: sys::CUstream,
    ) -> Result<()> {
        let (g, threads) = (x.grid, x.threads);
        if g.0 == 0 || g.1 == 0 || g.2 == 0 {
            return Ok(());
        }
        self.ctx
            .bind_to_thread()
            .map_err(|e| drv("binding the context", e))?;
        // One slot per argument; the driver reads each through its pointer.
        let mut values: Vec<u64> = x.args.iter().map(|a| a.slot()).collect();
        let mut params: Vec<*mut std::ffi::c_void> = values
            .iter_mut()
            .map(|v| v as *mut u64 as *mut std::ffi::c_void)
            .collect();
        // SAFETY: `params` point at `values`, which outlive the call; an
        // `int` argument reads the low 4 bytes of its slot (little endian).
        unsafe {
            sys::cuLaunchKernel(
                f.cu_function(),
                g.0,
                g.1,
                g.2,
                threads,
                1,
                1,
                x.smem,
                stream,
                params.as_mut_ptr(),
                std::ptr::null_mut(),
            )
        }
        .result()
        .map_err(|e| drv(&format!("launching a kernel on GPU {}", self.ordinal), e))
    }

    /// Launches `f` on the compute stream with `args` in signature order.
    pub fn launch(
        &self,
        f: &CudaFunction,
        grid: (u32, u32, u32),
        threads: u32,
        smem: u32,
        args: &[ArgValue],
    ) -> Result<()> {
        if grid.0 == 0 || grid.1 == 0 || grid.2 == 0 {
            return Ok(());
        }
        if grid.1 > 65_535 || grid.2 > 65_535 {
            return Err(RuntimeError::DoesNotFit(format!(
                "CUDA: grid {grid:?} exceeds the 65535 limit of its y/z dimensions"
            )));
        }
        let cfg = LaunchConfig {
            grid_dim: grid,
            block_dim: (threads, 1, 1),
            shared_mem_bytes: smem,
        };
        let mut b = self.compute.launch_builder(f);
        for a in args {
            match a {
                ArgValue::Ptr(p) => b.arg(p),
                ArgValue::Int(i) => b.arg(i),
            };
        }
        // SAFETY: the argument list is built from the kernel's own generated
        // signature (args::build_args checks names, roles and pointer-ness),
        // and every buffer is sized from the same shapes the kernel indexes.
        unsafe { b.launch(cfg) }
            .map(|_| ())
            .map_err(|e| drv(&format!("launching a kernel on GPU {}", self.ordinal), e))
    }
}

/// The device pointer of a buffer (no tracking: see the module comment).
pub(crate) fn ptr(s: &CudaSlice<u8>) -> u64 {
    let (p, _sync) = s.device_ptr(s.stream());
    p
}

fn out_of_memory(gpu: &Gpu, needed: usize, free: usize, total: usize) -> RuntimeError {
    oom_error(gpu.ordinal, &gpu.name, needed, free, total)
}

/// "Out of GPU memory" with what was needed and what was free.
pub(crate) fn oom_error(
    ordinal: usize,
    name: &str,
    needed: usize,
    free: usize,
    total: usize,
) -> RuntimeError {
    RuntimeError::OutOfMemory {
        device: format!("GPU {ordinal} ({name})"),
        needed,
        available: free,
        total,
    }
}

/// Enables peer access between every pair of `gpus` that supports it, so
/// ring copies go GPU to GPU; where it is not supported the driver stages
/// `cuMemcpyPeerAsync` through host memory, which is slower but correct.
/// Returns the pairs that have direct access.
pub(crate) fn enable_peer_access(gpus: &[Gpu]) -> Vec<(usize, usize)> {
    let mut direct = Vec::new();
    for a in gpus {
        for b in gpus {
            if a.ordinal == b.ordinal {
                continue;
            }
            let mut can = 0i32;
            let ok = unsafe {
                sys::cuDeviceCanAccessPeer(&mut can, a.ctx.cu_device(), b.ctx.cu_device())
            }
            .result()
            .is_ok();
            if !ok || can == 0 || a.ctx.bind_to_thread().is_err() {
                continue;
            }
            let r = unsafe { sys::cuCtxEnablePeerAccess(b.ctx.cu_ctx(), 0) };
            if r == sys::CUresult::CUDA_SUCCESS
                || r == sys::CUresult::CUDA_ERROR_PEER_ACCESS_ALREADY_ENABLED
            {
                direct.push((a.ordinal, b.ordinal));
            }
        }
    }
    direct
}

/// Bytes per element of a storage dtype.
pub(crate) fn elem_bytes(dtype: DType) -> usize {
    match dtype {
        DType::F32 => 4,
        DType::F16 | DType::Bf16 => 2,
    }
}

/// Host f32 values in the device storage type, as bytes.
pub(crate) fn encode(dtype: DType, xs: &[f32]) -> Vec<u8> {
    let mut out = Vec::with_capacity(xs.len() * elem_bytes(dtype));
    match dtype {
        DType::F32 => xs
            .iter()
            .for_each(|x| out.extend_from_slice(&x.to_le_bytes())),
        DType::F16 => xs
            .iter()
            .for_each(|x| out.extend_from_slice(&half::f16::from_f32(*x).to_bits().to_le_bytes())),
        DType::Bf16 => xs
            .iter()
            .for_each(|x| out.extend_from_slice(&half::bf16::from_f32(*x).to_bits().to_le_bytes())),
    }
    out
}

/// Device bytes in the storage type back to f32.
pub(crate) fn decode(dtype: DType, bytes: &[u8]) -> Vec<f32> {
    match dtype {
        DType::F32 => bytes
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect(),
        DType::F16 => bytes
            .chunks_exact(2)
            .map(|c| half::f16::from_bits(u16::from_le_bytes([c[0], c[1]])).to_f32())
            .collect(),
        DType::Bf16 => bytes
            .chunks_exact(2)
            .map(|c| half::bf16::from_bits(u16::from_le_bytes([c[0], c[1]])).to_f32())
            .collect(),
    }
}

pub(crate) fn encode_i32(xs: &[i32]) -> Vec<u8> {
    xs.iter().flat_map(|x| x.to_le_bytes()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn storage_round_trips() {
        let xs = [0.0f32, 1.5, -2.25, 3.0e-3, 65504.0];
        for dt in [DType::F32, DType::F16, DType::Bf16] {
            let b = encode(dt, &xs);
            assert_eq!(b.len(), xs.len() * elem_bytes(dt));
            let back = decode(dt, &b);
            for (x, y) in xs.iter().zip(&back) {
                let tol = match dt {
                    DType::F32 => 0.0,
                    DType::F16 => 1e-3,
                    DType::Bf16 => 8e-3,
                };
                assert!((x - y).abs() <= tol * x.abs(), "{dt:?}: {x} -> {y}");
            }
        }
        assert_eq!(encode(DType::Bf16, &[1.0]), 0x3f80u16.to_le_bytes());
        assert_eq!(encode(DType::F16, &[1.0]), 0x3c00u16.to_le_bytes());
        assert_eq!(encode_i32(&[1, -1]), [1, 0, 0, 0, 255, 255, 255, 255]);
    }

    #[test]
    fn out_of_memory_says_needed_and_free() {
        let e = oom_error(0, "H100", 3 << 30, 1 << 30, 80 << 30).to_string();
        assert!(e.contains("out of GPU 0 (H100) memory"), "{e}");
        assert!(
            e.contains(&(3usize << 30).to_string()) && e.contains("3.00 GiB"),
            "{e}"
        );
        assert!(e.contains("1.00 GiB") && e.contains("80.00 GiB"), "{e}");
        assert!(!e.contains("--"), "the library names no CLI flag: {e}");
    }
}
