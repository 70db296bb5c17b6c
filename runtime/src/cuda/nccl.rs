//! The GPU side of a multi-process ring: one process per rank (device
//! `LOCAL_RANK`), NCCL send/recv between neighbours on the GPU's copy
//! stream, the schedule of [`super::rank`], the output gathered on rank 0.
//!
//! libnccl is loaded at run time by cudarc, which panics when it is missing
//! and only looks for `libnccl.so` (and versioned names NCCL does not use),
//! not the `libnccl.so.2` that NCCL packages install: [`nccl_available`]
//! looks first and says what to do.

use std::time::Instant;

use cudarc::nccl::{Comm, Id};

use super::device::{decode, encode};
use super::dist::{rendezvous_timeout, Control, DistEnv, RunHeader};
use super::exec::Backend;
use super::gpu_rank::{GpuRank, Link};
use super::rank::{assemble, pairs_per_rank, run_rank, RankJob};
use super::{probe, CudaOptions, CudaRun};
use crate::error::{Result, RuntimeError};
use crate::ring::RingSchedule;
use crate::tensor::{MixerInputs, Tensor};
use mixc_dsl::ir::{DType, MixerSpec};

/// `Ok` when libnccl can be loaded under a name cudarc looks for.
pub fn nccl_available() -> Result<()> {
    nccl_available_among(&cudarc::get_lib_name_candidates("nccl"), "libnccl.so.2")
}

/// [`nccl_available`] over given library names (testable); `soname` is the
/// name NCCL installs, tried only to make the error precise.
pub fn nccl_available_among(names: &[String], soname: &str) -> Result<()> {
    // SAFETY: loading NCCL runs its (trivial) initialisers only; the handle
    // is dropped at once, cudarc opens its own.
    let loads = |n: &str| unsafe { libloading::Library::new(n) }.is_ok();
    if names.iter().any(|n| loads(n)) {
        return Ok(());
    }
    let what = if loads(soname) {
        format!(
            "{soname} is installed, but the CUDA bindings (cudarc) load `libnccl.so`: add a \
             symlink `libnccl.so -> {soname}` in a directory on LD_LIBRARY_PATH"
        )
    } else {
        format!(
            "libnccl was not found on the library path (looked for {}); install NCCL \
             (e.g. `pip install nvidia-nccl-cu12`, then link its lib/libnccl.so.2 as libnccl.so \
             on LD_LIBRARY_PATH)",
            names.first().map(String::as_str).unwrap_or("libnccl.so")
        )
    };
    Err(RuntimeError::Unsupported {
        backend: "cuda",
        what: format!(
            "a multi-process run (WORLD_SIZE > 1) needs NCCL: {what}; or run one process with a \
             ring of R ranks, which spreads over this machine's GPUs"
        ),
    })
}

pub(super) fn nccl_err(what: &str, e: cudarc::nccl::result::NcclError) -> RuntimeError {
    RuntimeError::Invalid(format!("NCCL: {what} failed: {:?}", e.0))
}

/// `WORLD_SIZE > 1`: this process runs rank `RANK` of the ring on GPU
/// `LOCAL_RANK`; rank 0 returns the whole output, the others their own rows
/// (zero elsewhere) and say so on stderr.
pub(crate) fn run_process(
    spec: &MixerSpec,
    inputs: &MixerInputs,
    opts: &CudaOptions,
    env: &DistEnv,
) -> Result<CudaRun> {
    let start = Instant::now();
    if opts.ranks != 1 && opts.ranks != env.world_size {
        return Err(RuntimeError::Invalid(format!(
            "{} ranks with WORLD_SIZE={}: in a multi-process run each process is one rank \
             (ask for 1 rank, or for WORLD_SIZE)",
            opts.ranks, env.world_size
        )));
    }
    let sched = RingSchedule::new(inputs.seq, env.world_size, opts.sharding)?;
    // Fail before the rendezvous where possible: a rank failing after it
    // leaves the others waiting in NCCL.
    crate::inputs::validate_inputs(spec, inputs)?;
    nccl_available()?;
    let info = probe()?;
    if env.local_rank >= info.count {
        return Err(RuntimeError::Invalid(format!(
            "LOCAL_RANK={} but this machine shows {} GPU(s) (CUDA_VISIBLE_DEVICES limits them)",
            env.local_rank, info.count
        )));
    }
    let backend = Backend::new(spec, opts.dtype, opts.config, (env.local_rank, Some(1)), 1)?;
    let header = RunHeader::new(spec, inputs, opts.dtype, opts.sharding, env.world_size);
    let make_id = || -> Result<Vec<u8>> {
        let id = Id::new().map_err(|e| nccl_err("ncclGetUniqueId", e))?;
        Ok(id.internal().iter().map(|&c| c as u8).collect())
    };
    let (mut control, id_bytes) = Control::connect(env, &header, make_id, rendezvous_timeout()?)?;
    let mut raw = [0 as std::ffi::c_char; 128];
    if id_bytes.len() != raw.len() {
        return Err(RuntimeError::Invalid(format!(
            "rank 0 sent a {}-byte NCCL id (128 expected): are all ranks the same mixc?",
            id_bytes.len()
        )));
    }
    for (d, s) in raw.iter_mut().zip(&id_bytes) {
        *d = *s as std::ffi::c_char;
    }
    let gpu = &backend.gpus[0];
    // NCCL takes its device from the thread's current context.
    gpu.ctx
        .bind_to_thread()
        .map_err(|e| super::device::drv("making the GPU current", e))?;
    let comm = Comm::from_rank(gpu.copy.clone(), env.rank, env.world_size, Id::uninit(raw))
        .map_err(|e| nccl_err("ncclCommInitRank", e))?;
    let mut io = GpuRank::new(&backend, 0, Link::Nccl(comm));
    let t0 = gpu.timing_mark()?;
    let job = RankJob {
        spec,
        info: backend.info(),
        config: backend.generated.config,
        dtype: opts.dtype,
        inputs,
        sched: &sched,
        rank: env.rank,
    };
    let rows = run_rank(&mut io, &job)?;
    let t1 = gpu.timing_mark()?;
    drop(io);
    let kernel_ms = t0
        .elapsed_ms(&t1)
        .map_err(|e| super::device::drv("reading the timing events", e))?;
    let gathered = control.gather(encode(DType::F32, &rows))?;
    let mut pairs = None;
    let output = match gathered {
        Some(parts) => {
            let parts: Vec<Vec<f32>> = parts.iter().map(|p| decode(DType::F32, p)).collect();
            pairs = pairs_per_rank(spec, &backend.generated.config, inputs, &sched);
            assemble(spec, &sched, inputs.batch, &parts)?
        }
        None => {
            eprintln!(
                "mixc rank {}/{}: {} of {} positions on GPU {} in {:.3} s; output sent to rank 0",
                env.rank,
                env.world_size,
                sched.shard_len(env.rank),
                sched.seq,
                env.local_rank,
                start.elapsed().as_secs_f64()
            );
            own_rows(spec, &sched, inputs.batch, env.rank, &rows)
        }
    };
    Ok(CudaRun {
        output,
        seconds: start.elapsed().as_secs_f64(),
        kernel_seconds: kernel_ms as f64 / 1e3,
        pairs_per_rank: pairs,
        devices: 1,
        config: backend.generated.config,
        arch: backend.arch,
        dist_rank: Some((env.rank, env.world_size)),
        lse: None,
    })
}

/// A non-root rank's output: its own rows in place, zero elsewhere.
fn own_rows(
    spec: &MixerSpec,
    sched: &RingSchedule,
    batch: usize,
    rank: usize,
    rows: &[f32],
) -> Tensor<f32> {
    let (h, dv) = (spec.heads as usize, spec.value_dim as usize);
    let mut out = Tensor::<f32>::zeros(&[batch, sched.seq, h, dv]);
    super::plan::scatter_rows(
        &mut out.data,
        rows,
        batch,
        sched.seq,
        h * dv,
        sched.shard_len(rank),
        sched.shard(rank),
    );
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// No library under any looked-for name: a clear error, not cudarc's
    /// panic, naming what to install and the single-process alternative.
    #[test]
    fn missing_nccl_is_a_clear_error() {
        let e = nccl_available_among(
            &["libmixc-no-such-nccl.so".to_string()],
            "libmixc-no-such-nccl.so.2",
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("needs NCCL") && e.contains("ring of R ranks"),
            "{e}"
        );
        assert!(e.contains("libmixc-no-such-nccl.so"), "{e}");
        // Found only under NCCL's own soname: the error says to add the link.
        let libc = "libc.so.6";
        let e = nccl_available_among(&["libmixc-no-such-nccl.so".into()], libc)
            .unwrap_err()
            .to_string();
        assert!(e.contains("symlink `libnccl.so -> libc.so.6`"), "{e}");
        // And a loadable name is accepted.
        nccl_available_among(&[libc.to_string()], libc).unwrap();
    }

    /// On this machine: either NCCL loads, or the error is the clear one.
    #[test]
    fn nccl_probe_never_panics() {
        match nccl_available() {
            Ok(()) => eprintln!("libnccl found"),
            Err(e) => assert!(e.to_string().contains("needs NCCL"), "{e}"),
        }
    }
}
