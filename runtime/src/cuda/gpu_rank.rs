//! One rank of a ring on one GPU, as [`RankIo`]: buffers on the GPU,
//! launches on its compute stream, transfers to the other ranks by NCCL (one
//! process per rank, `nccl.rs`) or, for the ranks of one process (threads),
//! through host memory. The multi-process ring and the backward pass
//! (`exec.rs`) run their schedules through it.

use cudarc::driver::{CudaEvent, CudaSlice};
use cudarc::nccl::{group_end, group_start, Comm};

use super::args::HostLaunch;
use super::device::{ptr, Gpu};
use super::exec::Backend;
use super::nccl::nccl_err;
use super::rank::{RankIo, Transfer};
use crate::error::{Result, RuntimeError};

use std::sync::mpsc::{Receiver, Sender};

/// How a rank reaches the others.
pub(super) enum Link {
    /// A one-rank run: no neighbours.
    None,
    /// NCCL send/recv on the GPU's copy stream (one process per rank).
    Nccl(Comm),
    /// Ranks of one process, as threads: a send downloads its buffers once
    /// the launches before it are done, a receive uploads what arrived at
    /// the next [`RankIo::await_transfers`]. Correct, not fast (two PCIe
    /// crossings per shard).
    Host(HostLink),
}

/// One rank's channels to the others of its process.
pub(super) struct HostLink {
    /// `tx[to]` / `rx[from]`: one channel per ordered pair of ranks.
    tx: Vec<Sender<Vec<u8>>>,
    rx: Vec<Option<Receiver<Vec<u8>>>>,
    /// Receives not landed yet: (from, buffer, bytes).
    pending: Vec<(usize, usize, usize)>,
}

/// The links of `ranks` threads of one process, by rank.
pub(super) fn host_links(ranks: usize) -> Vec<HostLink> {
    let mut links: Vec<HostLink> = (0..ranks)
        .map(|_| HostLink {
            tx: Vec::with_capacity(ranks),
            rx: (0..ranks).map(|_| None).collect(),
            pending: Vec::new(),
        })
        .collect();
    for from in 0..ranks {
        for to in 0..ranks {
            let (t, r) = std::sync::mpsc::channel();
            links[from].tx.push(t);
            if from != to {
                links[to].rx[from] = Some(r);
            }
        }
    }
    links
}

/// One rank on its GPU: buffers are handles into `bufs`, freed only after
/// both streams finished (drop).
pub(super) struct GpuRank<'a> {
    backend: &'a Backend,
    /// Index of this rank's GPU in the backend's.
    dev: usize,
    link: Link,
    bufs: Vec<CudaSlice<u8>>,
    /// Events around each launch (compute stream): the kernels' own time.
    timed: Vec<(CudaEvent, CudaEvent)>,
}

impl<'a> GpuRank<'a> {
    pub(super) fn new(backend: &'a Backend, dev: usize, link: Link) -> Self {
        GpuRank {
            backend,
            dev,
            link,
            bufs: Vec::new(),
            timed: Vec::new(),
        }
    }

    /// Makes this rank's GPU current on the calling thread.
    pub(super) fn bind(&self) -> Result<()> {
        self.gpu()
            .ctx
            .bind_to_thread()
            .map_err(|e| super::device::drv("making the GPU current", e))
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
        &self.backend.gpus[self.dev]
    }

    fn keep(&mut self, b: CudaSlice<u8>) -> usize {
        self.bufs.push(b);
        self.bufs.len() - 1
    }

    fn nccl_sendrecv(
        &mut self,
        send: Transfer<'_, usize>,
        recv: Transfer<'_, usize>,
    ) -> Result<()> {
        let Link::Nccl(comm) = &self.link else {
            return Err(RuntimeError::Internal("not an NCCL link".into()));
        };
        let g = &self.backend.gpus[self.dev];
        g.ctx
            .bind_to_thread()
            .map_err(|e| super::device::drv("making the GPU current", e))?;
        // The communicator's stream is the copy stream: start after the
        // launches so far (sources written, destinations read).
        Gpu::wait(&g.copy, &Gpu::mark(&g.compute)?)?;
        group_start().map_err(|e| nccl_err("ncclGroupStart", e))?;
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

    fn host_sendrecv(
        &mut self,
        send: Transfer<'_, usize>,
        recv: Transfer<'_, usize>,
    ) -> Result<()> {
        if let Some((to, list)) = send {
            // Sources are written once the launches so far are done.
            for &(b, n) in list {
                let bytes = self.gpu().download(&self.bufs[b], n)?;
                let Link::Host(link) = &self.link else {
                    return Err(RuntimeError::Internal("not a host link".into()));
                };
                link.tx[to].send(bytes).map_err(|_| {
                    RuntimeError::Internal(format!("rank {to} of this process stopped"))
                })?;
            }
        }
        if let Some((from, list)) = recv {
            let Link::Host(link) = &mut self.link else {
                return Err(RuntimeError::Internal("not a host link".into()));
            };
            link.pending.extend(list.iter().map(|&(b, n)| (from, b, n)));
        }
        Ok(())
    }

    fn host_land(&mut self) -> Result<()> {
        let Link::Host(link) = &mut self.link else {
            return Ok(());
        };
        for (from, b, n) in std::mem::take(&mut link.pending) {
            let rx = link.rx[from]
                .as_ref()
                .ok_or_else(|| RuntimeError::Internal("a rank receives from itself".into()))?;
            let bytes = rx.recv().map_err(|_| {
                RuntimeError::Internal(format!("rank {from} of this process stopped"))
            })?;
            if bytes.len() > n {
                return Err(RuntimeError::Internal(format!(
                    "received {} bytes into {n}",
                    bytes.len()
                )));
            }
            if bytes.is_empty() {
                continue;
            }
            let g = &self.backend.gpus[self.dev];
            let mut view = self.bufs[b].slice_mut(0..bytes.len());
            // On the compute stream: ordered after the launches that read the
            // buffer before, and before those that read it next.
            g.compute
                .memcpy_htod(&bytes, &mut view)
                .map_err(|e| super::device::drv("copying a received shard to the GPU", e))?;
            // `bytes` must outlive the asynchronous copy.
            g.compute
                .synchronize()
                .map_err(|e| super::device::drv("waiting for a received shard", e))?;
        }
        Ok(())
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
        self.host_land()?;
        // Transfers run on the copy stream: wait for both.
        self.gpu().sync_all()?;
        self.gpu().download(&self.bufs[b], bytes)
    }

    fn check_fits(&self, bytes: usize) -> Result<()> {
        self.gpu().check_fits(bytes)
    }

    fn sendrecv(&mut self, send: Transfer<'_, usize>, recv: Transfer<'_, usize>) -> Result<()> {
        match self.link {
            Link::None => Err(RuntimeError::Internal(
                "a one-rank run has no neighbour to exchange buffers with".into(),
            )),
            Link::Nccl(_) => self.nccl_sendrecv(send, recv),
            Link::Host(_) => self.host_sendrecv(send, recv),
        }
    }

    fn await_transfers(&mut self) -> Result<()> {
        if let Link::Host(_) = self.link {
            return self.host_land();
        }
        let g = self.gpu();
        Gpu::wait(&g.compute, &Gpu::mark(&g.copy)?)
    }
}
