//! One rank of a ring on one GPU, as [`RankIo`]: buffers on the GPU,
//! launches on its compute stream, transfers by NCCL on its copy stream.
//! The multi-process ring (`nccl.rs`) and the one-rank backward pass
//! (`exec.rs`) run their schedules through it.

use cudarc::driver::{CudaEvent, CudaSlice};
use cudarc::nccl::{group_end, group_start, Comm};

use super::args::HostLaunch;
use super::device::{ptr, Gpu};
use super::exec::Backend;
use super::nccl::nccl_err;
use super::rank::{RankIo, Transfer};
use crate::error::{Result, RuntimeError};

/// One rank on its GPU: buffers are handles into `bufs`, freed only after
/// both streams finished (drop).
pub(super) struct GpuRank<'a> {
    backend: &'a Backend,
    /// The link to the other ranks (`None`: a one-rank run, which has none).
    comm: Option<Comm>,
    bufs: Vec<CudaSlice<u8>>,
    /// Events around each launch (compute stream): the kernels' own time.
    timed: Vec<(CudaEvent, CudaEvent)>,
}

impl<'a> GpuRank<'a> {
    pub(super) fn new(backend: &'a Backend, comm: Option<Comm>) -> Self {
        GpuRank {
            backend,
            comm,
            bufs: Vec::new(),
            timed: Vec::new(),
        }
    }

    /// GPU time of the launches so far, in seconds (waits for them).
    pub(super) fn kernel_seconds(&self) -> Result<f64> {
        self.gpu().sync_all()?;
        let mut ms = 0f64;
        for (a, b) in &self.timed {
            ms += f64::from(
                a.elapsed_ms(b)
                    .map_err(|e| super::device::drv("reading the timing events", e))?,
            );
        }
        Ok(ms / 1e3)
    }
    fn gpu(&self) -> &Gpu {
        &self.backend.gpus[0]
    }
    fn keep(&mut self, b: CudaSlice<u8>) -> usize {
        self.bufs.push(b);
        self.bufs.len() - 1
    }
}

impl Drop for GpuRank<'_> {
    fn drop(&mut self) {
        // Nothing may be freed while a kernel or a transfer still uses it.
        let _ = self.gpu().sync_all();
    }
}

impl RankIo for GpuRank<'_> {
    type Buf = usize;

    fn upload(&mut self, bytes: &[u8]) -> Result<usize> {
        let b = self.gpu().upload(bytes)?;
        Ok(self.keep(b))
    }

    fn zeros(&mut self, bytes: usize) -> Result<usize> {
        let b = self.gpu().zeros(bytes)?;
        Ok(self.keep(b))
    }

    fn addr(&self, b: usize) -> u64 {
        ptr(&self.bufs[b])
    }

    fn launch(&mut self, x: &HostLaunch) -> Result<()> {
        let before = self.gpu().timing_mark()?;
        self.backend.run_launch(self.gpu(), x)?;
        let after = self.gpu().timing_mark()?;
        self.timed.push((before, after));
        Ok(())
    }

    fn download(&mut self, b: usize, bytes: usize) -> Result<Vec<u8>> {
        // Transfers run on the copy stream: wait for both.
        self.gpu().sync_all()?;
        self.gpu().download(&self.bufs[b], bytes)
    }

    fn check_fits(&self, bytes: usize) -> Result<()> {
        self.gpu().check_fits(bytes)
    }

    fn sendrecv(&mut self, send: Transfer<'_, usize>, recv: Transfer<'_, usize>) -> Result<()> {
        let g = &self.backend.gpus[0];
        g.ctx
            .bind_to_thread()
            .map_err(|e| super::device::drv("making the GPU current", e))?;
        // The communicator's stream is the copy stream: start after the
        // launches so far (sources written, destinations read).
        Gpu::wait(&g.copy, &Gpu::mark(&g.compute)?)?;
        group_start().map_err(|e| nccl_err("ncclGroupStart", e))?;
        let Some(comm) = &self.comm else {
            return Err(RuntimeError::Internal(
                "a one-rank run has no neighbour to exchange buffers with".into(),
            ));
        };
        let bufs = &mut self.bufs;
        let mut posted = || -> Result<()> {
            if let Some((to, list)) = send {
                for &(b, n) in list.iter().filter(|(_, n)| *n > 0) {
                    comm.send(&bufs[b].slice(0..n), to as i32)
                        .map_err(|e| nccl_err(&format!("ncclSend of {n} bytes to rank {to}"), e))?;
                }
            }
            if let Some((from, list)) = recv {
                for &(b, n) in list.iter().filter(|(_, n)| *n > 0) {
                    let mut view = bufs[b].slice_mut(0..n);
                    comm.recv(&mut view, from as i32).map_err(|e| {
                        nccl_err(&format!("ncclRecv of {n} bytes from rank {from}"), e)
                    })?;
                }
            }
            Ok(())
        };
        let r = posted();
        // Close the group even when posting failed, or NCCL stays in it.
        let end = group_end().map_err(|e| nccl_err("ncclGroupEnd", e));
        r.and(end.map(|_| ()))
    }

    fn await_transfers(&mut self) -> Result<()> {
        let g = self.gpu();
        Gpu::wait(&g.compute, &Gpu::mark(&g.copy)?)
    }
}
