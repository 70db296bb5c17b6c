//! Executes a run on the GPUs: compile and load ([`Backend::new`]), upload
//! one input set ([`Backend::prepare`]), enqueue every launch of the ring
//! ([`Backend::enqueue`], repeatable: the autotuner times it), download.
//!
//! Pairwise families (softmax, convolution): at ring step `s` rank `r`
//! computes its queries against the shard it holds while the copy streams
//! already carry that shard to rank `r + 1` (into the one of its two ring
//! buffers nobody reads at step `s`); events order the two streams:
//! - a send at step `s` waits until its source is filled (`ready`) and its
//!   destination's previous readers are done (compute and send of step `s-1`);
//! - a rank's compute at step `s` waits until its shard arrived.
//!
//! Softmax partials merge into an f32 accumulator with a small log-sum-exp
//! merge kernel after each launch; convolution partials accumulate in f32 in
//! the kernel itself. Chunkwise families pass the recurrent state (and the
//! normaliser) from range to range in sequence order, copying it to the next
//! owner's GPU when that differs.

use std::collections::BTreeMap;
use std::ops::Range;
use std::time::Instant;

use cudarc::driver::{CudaEvent, CudaFunction, CudaSlice};
use mixc_codegen::{Arch, GeneratedKernel, KernelConfig, KernelInfo, ParamRole, Target};
use mixc_dsl::ir::{DType, Decay, Family, MixerSpec, Norm};

use super::args::{
    chunk_launch, conv_pair, fill_neg_inf_launch, softmax_pair, ChunkBuffers, HostLaunch, KernelId,
    PairShape, SoftmaxBuffers,
};
use super::device::{decode, elem_bytes, enable_peer_access, encode, encode_i32, ptr, Gpu};
use super::plan::{
    check_int_sizes, device_of, gather_rows, held_slot, pair_launches, ring_fill_slot,
    scatter_rows, segment_summaries, tiling_of, PairLaunch,
};
use super::validate_inputs;
use super::{probe, CudaOptions, CudaRun};
use crate::error::{Result, RuntimeError};
use crate::ring::{RingSchedule, Sharding};
use crate::tensor::{ExtraTensor, MixerInputs, Tensor};

/// Compiled and loaded kernels on the GPUs of a run.
pub(crate) struct Backend {
    pub gpus: Vec<Gpu>,
    pub generated: GeneratedKernel,
    pub spec: MixerSpec,
    pub dtype: DType,
    pub arch: Arch,
    /// The backward kernels, loaded on every GPU at the first backward call.
    backward: std::sync::OnceLock<BackwardModule>,
}

/// The generated backward module and its functions per GPU (in `gpus` order).
struct BackwardModule {
    generated: GeneratedKernel,
    functions: Vec<Vec<CudaFunction>>,
}

/// Waits for every stream before the buffers of a run are freed (also on
/// error paths): declared after the buffers, so dropped before them.
struct SyncGuard<'a>(&'a [Gpu]);

impl Drop for SyncGuard<'_> {
    fn drop(&mut self) {
        for g in self.0 {
            let _ = g.sync_all();
        }
    }
}

impl Backend {
    /// Opens `devices` GPUs from ordinal `first` on (all visible when `None`,
    /// never more than `ranks`), generates the kernels for their arch and
    /// loads them on each.
    pub fn new(
        spec: &MixerSpec,
        dtype: DType,
        config: Option<KernelConfig>,
        (first, devices): (usize, Option<usize>),
        ranks: usize,
    ) -> Result<Backend> {
        let info = probe()?;
        let want = devices.unwrap_or(info.count.saturating_sub(first));
        if want == 0 || first + want > info.count {
            return Err(RuntimeError::Invalid(format!(
                "CUDA backend: asked for {want} GPU(s) from GPU {first} on, {} visible",
                info.count
            )));
        }
        let n = want.min(ranks.max(1));
        let mut gpus = (first..first + n)
            .map(Gpu::open)
            .collect::<Result<Vec<_>>>()?;
        let arch = gpus[0].arch;
        if let Some(g) = gpus.iter().find(|g| g.arch != arch) {
            return Err(RuntimeError::Invalid(format!(
                "CUDA backend: GPU {} ({}) is {} but GPU 0 is {arch}; one ring needs one \
                 architecture (limit the visible GPUs with CUDA_VISIBLE_DEVICES)",
                g.ordinal, g.name, g.arch
            )));
        }
        let kernels = super::kernels::CudaKernels::get(spec, &Target::new(arch, dtype), config)?;
        let generated = kernels.generated.clone();
        let names: Vec<&str> = generated.kernels.iter().map(|k| k.name.as_str()).collect();
        let [merge_name, fill_name] = super::helper_kernel_names(dtype);
        for g in &mut gpus {
            g.kernels = g.load_shared(&kernels.key, &kernels.module.cubin, &names)?;
            for (f, info) in g.kernels.iter().zip(&generated.kernels) {
                g.opt_in_smem(f, info)?;
            }
            if let Some(aux) = &kernels.helpers {
                let key = format!("helpers|{}", dtype.name());
                let mut fs = g.load_shared(&key, &aux.cubin, &[&merge_name, &fill_name])?;
                g.fill = fs.pop();
                g.merge = fs.pop();
            }
        }
        if gpus.len() > 1 {
            enable_peer_access(&gpus);
        }
        Ok(Backend {
            gpus,
            generated,
            spec: spec.clone(),
            dtype,
            arch,
            backward: std::sync::OnceLock::new(),
        })
    }

    /// The backward module (generated, compiled through the caches and
    /// loaded on every GPU at the first call; `config` `None`: the backward
    /// default).
    fn backward_module(&self, config: Option<KernelConfig>) -> Result<&BackwardModule> {
        if let Some(m) = self.backward.get() {
            return Ok(m);
        }
        let target = Target::new(self.arch, self.dtype);
        let kernels = super::kernels::CudaKernels::backward(&self.spec, &target, config)?;
        let generated = kernels.generated.clone();
        let names: Vec<&str> = generated.kernels.iter().map(|k| k.name.as_str()).collect();
        let mut functions = Vec::with_capacity(self.gpus.len());
        for g in &self.gpus {
            let fs = g.load_shared(&kernels.key, &kernels.module.cubin, &names)?;
            for (f, info) in fs.iter().zip(&generated.kernels) {
                g.opt_in_smem(f, info)?;
            }
            functions.push(fs);
        }
        Ok(self.backward.get_or_init(|| BackwardModule {
            generated,
            functions,
        }))
    }

    pub(super) fn info(&self) -> &KernelInfo {
        &self.generated.kernels[0]
    }

    fn has_role(&self, role: &ParamRole) -> bool {
        self.info().params.iter().any(|p| &p.role == role)
    }

    /// Uploads `inputs` for a ring of `sched` and plans its launches.
    /// Bytes of the extra inputs the kernels read (f32 or i32, uploaded
    /// whole to every GPU).
    fn extra_bytes(&self, inputs: &MixerInputs) -> usize {
        self.info()
            .params
            .iter()
            .filter_map(|p| match &p.role {
                ParamRole::Input(n) => inputs
                    .extra
                    .get(n)
                    .map(|t| t.shape().iter().product::<usize>() * 4),
                _ => None,
            })
            .sum()
    }

    /// The direct call's `o` (storage type) and softmax `lse` (f32) bytes.
    fn output_bytes(&self, batch: usize, seq: usize) -> (usize, usize) {
        let (h, dv) = (self.spec.heads as usize, self.spec.value_dim as usize);
        let lse = if self.spec.family == Family::Softmax {
            batch * h * seq * 4
        } else {
            0
        };
        (batch * seq * h * dv * elem_bytes(self.dtype), lse)
    }

    /// Device bytes of a direct (one-rank) run: q, k and v in the storage
    /// type, `o`, `lse` and the extra inputs.
    fn direct_need(
        &self,
        q_elems: usize,
        kv_elems: usize,
        batch: usize,
        seq: usize,
        extra: usize,
    ) -> usize {
        let (o, lse) = self.output_bytes(batch, seq);
        (q_elems + kv_elems) * elem_bytes(self.dtype) + o + lse + extra
    }

    /// Device bytes per GPU of a pairwise (softmax, convolution) ring: the
    /// extra inputs on every GPU; per rank its shard, the two ring buffers
    /// a step reads and fills, and its outputs and partials.
    fn pairwise_need(&self, b: usize, sched: &RingSchedule, extra: usize) -> Vec<usize> {
        let spec = &self.spec;
        let (h, kvh) = (spec.heads as usize, spec.kv_heads as usize);
        let (dk, dv) = (spec.head_dim as usize, spec.value_dim as usize);
        let e = elem_bytes(self.dtype);
        let softmax = spec.family == Family::Softmax;
        let with_k = self.has_role(&ParamRole::K);
        let ranks = sched.ranks;
        let max_rows = (0..ranks).map(|r| sched.shard_len(r)).max().unwrap_or(0);
        let kv_row_bytes = kvh * (if with_k { dk } else { 0 } + dv) * e;
        let mut need = vec![0usize; self.gpus.len()];
        for (d, n) in need.iter_mut().enumerate() {
            *n = extra;
            for r in (0..ranks).filter(|&r| device_of(r, self.gpus.len()) == d) {
                let nq = sched.shard_len(r);
                let ring = if ranks > 1 {
                    2 * b * max_rows * kv_row_bytes
                } else {
                    0
                };
                *n += b * nq * kv_row_bytes + ring;
                *n += if softmax {
                    b * nq * h * (dk * e + dv * 4 + dv * e) + 2 * b * h * nq * 4
                } else {
                    b * nq * h * dv * 4
                };
            }
        }
        need
    }

    /// Device bytes per GPU of a chunkwise (linear, retention, gated) run:
    /// each range's q, k, v, o and gates, the carried state (and its copy
    /// where the state moves to another GPU).
    fn chunkwise_need(&self, b: usize, sched: &RingSchedule) -> Vec<usize> {
        let spec = &self.spec;
        let (h, kvh) = (spec.heads as usize, spec.kv_heads as usize);
        let (dk, dv) = (spec.head_dim as usize, spec.value_dim as usize);
        let e = elem_bytes(self.dtype);
        let gate = matches!(spec.decay, Decay::Gate { .. });
        let ndev = self.gpus.len();
        let state_bytes = b * h * dk * dv * 4;
        let z_bytes = b * h * dk * 4;
        let mut need = vec![0usize; ndev];
        let mut prev_dev = None;
        for (range, owner) in &sched.ranges_in_order() {
            let d = device_of(*owner, ndev);
            let n = range.len();
            need[d] += b * n * (h * dk + kvh * dk + kvh * dv + h * dv) * e + state_bytes + z_bytes;
            need[d] += if gate { b * n * h * 4 } else { 0 };
            if prev_dev.is_some_and(|p| p != d) {
                need[d] += state_bytes + z_bytes;
            }
            prev_dev = Some(d);
        }
        need
    }

    fn prepare(&self, inputs: &MixerInputs, sched: &RingSchedule) -> Result<Job> {
        validate_inputs(&self.spec, inputs)?;
        check_int_sizes(inputs.batch, inputs.seq)?;
        match self.spec.family {
            Family::Softmax | Family::Convolution => {
                self.prepare_pairwise(inputs, sched).map(Job::Pairwise)
            }
            Family::Linear | Family::Retention | Family::Gated => {
                self.prepare_chunkwise(inputs, sched).map(Job::Chunkwise)
            }
        }
    }

    /// Full extra inputs (tables, segment ids, filters), indexed by global
    /// position, on device `g`.
    fn upload_full_inputs(
        &self,
        g: &Gpu,
        inputs: &MixerInputs,
    ) -> Result<BTreeMap<String, CudaSlice<u8>>> {
        let mut out = BTreeMap::new();
        for p in &self.info().params {
            let ParamRole::Input(name) = &p.role else {
                continue;
            };
            let t = inputs.extra_input(name)?;
            let as_int = input_is_int(&p.name, &p.c_type)?;
            out.insert(name.clone(), g.upload(&extra_bytes(t, as_int, None))?);
        }
        Ok(out)
    }

    fn prepare_pairwise(&self, inputs: &MixerInputs, sched: &RingSchedule) -> Result<PairJob> {
        let spec = &self.spec;
        let (b, seq) = (inputs.batch, inputs.seq);
        let (h, kvh) = (spec.heads as usize, spec.kv_heads as usize);
        let (dk, dv) = (spec.head_dim as usize, spec.value_dim as usize);
        let e = elem_bytes(self.dtype);
        let softmax = spec.family == Family::Softmax;
        let with_k = self.has_role(&ParamRole::K);
        let ranks = sched.ranks;
        let cfg = self.generated.config;
        let tiling = tiling_of(&cfg);
        let segs = segment_summaries(spec, inputs, tiling);
        let max_rows = (0..ranks).map(|r| sched.shard_len(r)).max().unwrap_or(0);

        // Memory per device, checked before anything is allocated.
        let extra_bytes_total = self.extra_bytes(inputs);
        let need = self.pairwise_need(b, sched, extra_bytes_total);
        for (g, n) in self.gpus.iter().zip(&need) {
            g.check_fits(*n)?;
        }

        let dev_inputs = self
            .gpus
            .iter()
            .map(|g| self.upload_full_inputs(g, inputs))
            .collect::<Result<Vec<_>>>()?;
        let mut rank_bufs = Vec::with_capacity(ranks);
        let mut launches = Vec::with_capacity(ranks);
        let mut pairs = Some(vec![0u64; ranks]);
        for r in 0..ranks {
            let dev = device_of(r, self.gpus.len());
            let g = &self.gpus[dev];
            let q_ranges = sched.shard(r).to_vec();
            let nq = sched.shard_len(r);
            let shard = |rows: usize| -> Result<Shard> {
                Ok(Shard {
                    k: if with_k {
                        Some(g.zeros(b * rows * kvh * dk * e)?)
                    } else {
                        None
                    },
                    v: g.zeros(b * rows * kvh * dv * e)?,
                })
            };
            let home = Shard {
                k: if with_k {
                    Some(g.upload(&encode(
                        self.dtype,
                        &gather_rows(&inputs.k.data, b, seq, kvh * dk, &q_ranges),
                    ))?)
                } else {
                    None
                },
                v: g.upload(&encode(
                    self.dtype,
                    &gather_rows(&inputs.v.data, b, seq, kvh * dv, &q_ranges),
                ))?,
            };
            let ring = if ranks > 1 {
                vec![shard(max_rows)?, shard(max_rows)?]
            } else {
                Vec::new()
            };
            let acc = if softmax {
                Acc::Softmax {
                    q: g.upload(&encode(
                        self.dtype,
                        &gather_rows(&inputs.q.data, b, seq, h * dk, &q_ranges),
                    ))?,
                    o: g.zeros(b * nq * h * dv * 4)?,
                    lse: g.zeros(b * h * nq * 4)?,
                    part_o: g.zeros(b * nq * h * dv * e)?,
                    part_lse: g.zeros(b * h * nq * 4)?,
                }
            } else {
                Acc::Conv {
                    o: q_ranges
                        .iter()
                        .map(|q| g.zeros(b * q.len() * h * dv * 4))
                        .collect::<Result<_>>()?,
                }
            };
            let mut per_step = Vec::with_capacity(ranks);
            for step in 0..ranks {
                let kv = sched.shard(sched.held_at(r, step));
                let (ls, p) = pair_launches(&spec.mask, tiling, &segs, &q_ranges, kv);
                pairs = match (pairs, p) {
                    (Some(mut v), Some(p)) => {
                        v[r] += p * super::rank::pair_scale(spec, b, segs.len());
                        Some(v)
                    }
                    _ => None,
                };
                per_step.push(ls);
            }
            launches.push(per_step);
            rank_bufs.push(RankBufs {
                dev,
                q_ranges,
                nq,
                home,
                ring,
                acc,
            });
        }
        Ok(PairJob {
            batch: b,
            seq,
            ranks: rank_bufs,
            launches,
            dev_inputs,
            sched: sched.clone(),
            kv_row_bytes_k: kvh * dk * e,
            kv_row_bytes_v: kvh * dv * e,
            pairs,
            filter_len: conv_filter_len(spec, inputs),
        })
    }

    fn prepare_chunkwise(&self, inputs: &MixerInputs, sched: &RingSchedule) -> Result<ChunkJob> {
        let spec = &self.spec;
        let (b, seq) = (inputs.batch, inputs.seq);
        let (h, kvh) = (spec.heads as usize, spec.kv_heads as usize);
        let (dk, dv) = (spec.head_dim as usize, spec.value_dim as usize);
        let e = elem_bytes(self.dtype);
        let norm_sum = matches!(spec.norm, Norm::Sum { .. });
        let gate = match &spec.decay {
            Decay::Gate { input } => Some(input.clone()),
            _ => None,
        };
        let ndev = self.gpus.len();
        let order = sched.ranges_in_order();
        let state_bytes = b * h * dk * dv * 4;
        let z_bytes = b * h * dk * 4;
        let need = self.chunkwise_need(b, sched);
        for (g, n) in self.gpus.iter().zip(&need) {
            g.check_fits(*n)?;
        }
        let mut pieces = Vec::with_capacity(order.len());
        let mut prev_dev = None;
        for (range, owner) in order {
            let dev = device_of(owner, ndev);
            let g = &self.gpus[dev];
            let rs = std::slice::from_ref(&range);
            let up = |t: &Tensor<f32>, width: usize| {
                g.upload(&encode(
                    self.dtype,
                    &gather_rows(&t.data, b, seq, width, rs),
                ))
            };
            let gate_buf = match &gate {
                Some(name) => {
                    let t = inputs.extra_input(name)?;
                    Some(g.upload(&extra_bytes(t, false, Some((b, seq, range.clone()))))?)
                }
                None => None,
            };
            let copy_in = prev_dev.is_some_and(|p| p != dev);
            pieces.push(Piece {
                dev,
                q: up(&inputs.q, h * dk)?,
                k: up(&inputs.k, kvh * dk)?,
                v: up(&inputs.v, kvh * dv)?,
                gate: gate_buf,
                o: g.zeros(b * range.len() * h * dv * e)?,
                state: g.zeros(state_bytes)?,
                z: if norm_sum {
                    Some(g.zeros(z_bytes)?)
                } else {
                    None
                },
                state_in: if copy_in {
                    Some(g.zeros(state_bytes)?)
                } else {
                    None
                },
                z_in: if copy_in && norm_sum {
                    Some(g.zeros(z_bytes)?)
                } else {
                    None
                },
                range,
            });
            prev_dev = Some(dev);
        }
        Ok(ChunkJob {
            batch: b,
            seq,
            pieces,
            gate,
        })
    }

    /// Enqueues every launch of one run of `job`; repeatable.
    fn enqueue(&self, job: &mut Job) -> Result<()> {
        // Start from a point every stream of every GPU agrees on: uploads and
        // clears (compute streams) precede the first ring copies, and a
        // repeated run (the autotuner) overwrites no buffer the previous run
        // still reads, including shards a neighbour GPU's copy stream reads.
        let marks = self
            .gpus
            .iter()
            .map(|g| Ok([Gpu::mark(&g.compute)?, Gpu::mark(&g.copy)?]))
            .collect::<Result<Vec<_>>>()?;
        for g in &self.gpus {
            for e in marks.iter().flatten() {
                Gpu::wait(&g.compute, e)?;
                Gpu::wait(&g.copy, e)?;
            }
        }
        match job {
            Job::Pairwise(j) => self.enqueue_pairwise(j)?,
            Job::Chunkwise(j) => self.enqueue_chunkwise(j)?,
        }
        // Device 0's compute stream ends after all work (timing events go there).
        let marks = self
            .gpus
            .iter()
            .map(|g| Ok((Gpu::mark(&g.compute)?, Gpu::mark(&g.copy)?)))
            .collect::<Result<Vec<_>>>()?;
        for (a, c) in &marks {
            Gpu::wait(&self.gpus[0].compute, a)?;
            Gpu::wait(&self.gpus[0].compute, c)?;
        }
        Ok(())
    }

    fn enqueue_pairwise(&self, j: &mut PairJob) -> Result<()> {
        let spec = &self.spec;
        let info = self.info().clone();
        let ranks = j.ranks.len();
        let (b, h) = (j.batch, spec.heads as usize);
        // Reset the accumulators.
        for rb in &mut j.ranks {
            let g = &self.gpus[rb.dev];
            match &mut rb.acc {
                Acc::Softmax { o, lse, .. } => {
                    g.compute
                        .memset_zeros(o)
                        .map_err(|e| super::device::drv("clearing the accumulator", e))?;
                    self.run_launch(g, &fill_neg_inf_launch(ptr(lse), b * h * rb.nq)?)?;
                }
                Acc::Conv { o } => {
                    for x in o {
                        g.compute
                            .memset_zeros(x)
                            .map_err(|e| super::device::drv("clearing the accumulator", e))?;
                    }
                }
            }
        }
        let mut ready: Vec<Option<CudaEvent>> = (0..ranks).map(|_| None).collect();
        let mut computed: Vec<Option<CudaEvent>> = (0..ranks).map(|_| None).collect();
        let mut sent: Vec<Option<CudaEvent>> = (0..ranks).map(|_| None).collect();
        for step in 0..ranks {
            // Phase 1: start passing the shard each rank holds to the next rank.
            let mut next_ready: Vec<Option<CudaEvent>> = (0..ranks).map(|_| None).collect();
            if step + 1 < ranks {
                let prev_sent = std::mem::replace(&mut sent, (0..ranks).map(|_| None).collect());
                for r in 0..ranks {
                    let dst = (r + 1) % ranks;
                    let rows = j.sched.shard_len(j.sched.held_at(r, step));
                    let dst_gpu = &self.gpus[j.ranks[dst].dev];
                    let copy = &dst_gpu.copy;
                    for e in [&ready[r], &computed[dst], &prev_sent[dst]]
                        .into_iter()
                        .flatten()
                    {
                        Gpu::wait(copy, e)?;
                    }
                    let slot = ring_fill_slot(step);
                    let kb = j.batch * rows * j.kv_row_bytes_k;
                    let vb = j.batch * rows * j.kv_row_bytes_v;
                    let (src, dst_shard) = two_shards(&mut j.ranks, r, step, dst, slot)?;
                    if let (Some(sk), Some(dk)) = (&src.k, &mut dst_shard.k) {
                        copy_bytes(copy, sk, dk, kb)?;
                    }
                    copy_bytes(copy, &src.v, &mut dst_shard.v, vb)?;
                    next_ready[dst] = Some(Gpu::mark(copy)?);
                    sent[r] = Some(Gpu::mark(copy)?);
                }
            }
            // Phase 2: compute against the held shard.
            for r in 0..ranks {
                let rb = &j.ranks[r];
                let g = &self.gpus[rb.dev];
                if let Some(e) = &ready[r] {
                    Gpu::wait(&g.compute, e)?;
                }
                let held = match held_slot(step) {
                    None => &rb.home,
                    Some(s) => &rb.ring[s],
                };
                let kv_rows = j.sched.shard_len(j.sched.held_at(r, step));
                for l in &j.launches[r][step] {
                    self.launch_pair(g, &info, j, rb, held, kv_rows, l)?;
                }
                computed[r] = Some(Gpu::mark(&g.compute)?);
            }
            ready = next_ready;
        }
        Ok(())
    }

    #[allow(clippy::too_many_arguments)]
    fn launch_pair(
        &self,
        g: &Gpu,
        info: &KernelInfo,
        j: &PairJob,
        rb: &RankBufs,
        held: &Shard,
        kv_rows: usize,
        l: &PairLaunch,
    ) -> Result<()> {
        let spec = &self.spec;
        let (b, h, dv) = (j.batch, spec.heads as usize, spec.value_dim as usize);
        let inputs: BTreeMap<String, u64> = j.dev_inputs[rb.dev]
            .iter()
            .map(|(n, buf)| (n.clone(), ptr(buf)))
            .collect();
        let k = held.k.as_ref().map_or(0, ptr);
        let shape = PairShape {
            batch: b,
            heads: h,
            value_dim: dv,
            q_rows: rb.nq,
            kv_rows,
            seq_len: j.seq,
        };
        match &rb.acc {
            Acc::Softmax {
                q,
                o,
                lse,
                part_o,
                part_lse,
            } => {
                let bufs = SoftmaxBuffers {
                    q: ptr(q),
                    k,
                    v: ptr(&held.v),
                    part_o: ptr(part_o),
                    part_lse: ptr(part_lse),
                    acc_o: ptr(o),
                    acc_lse: ptr(lse),
                };
                for x in softmax_pair(info, &inputs, &bufs, l, &shape)? {
                    self.run_launch(g, &x)?;
                }
                Ok(())
            }
            Acc::Conv { o } => {
                let shape = PairShape {
                    q_rows: l.q.len(),
                    seq_len: j.filter_len,
                    ..shape
                };
                let x = conv_pair(info, &inputs, ptr(&held.v), ptr(&o[l.q_index]), l, &shape)?;
                self.run_launch(g, &x)
            }
        }
    }

    /// Uploads one input set to GPU 0 for the direct one-rank plan and
    /// plans its launches (see [`super::args::direct_launches`]).
    fn upload_direct(&self, inputs: &MixerInputs) -> Result<DirectJob> {
        validate_inputs(&self.spec, inputs)?;
        check_int_sizes(inputs.batch, inputs.seq)?;
        let (batch, seq) = (inputs.batch, inputs.seq);
        let g = &self.gpus[0];
        let (o_bytes, lse_bytes) = self.output_bytes(batch, seq);
        g.check_fits(self.direct_need(
            inputs.q.numel(),
            inputs.k.numel() + inputs.v.numel(),
            batch,
            seq,
            self.extra_bytes(inputs),
        ))?;
        let q = g.upload(&encode(self.dtype, &inputs.q.data))?;
        let k = g.upload(&encode(self.dtype, &inputs.k.data))?;
        let v = g.upload(&encode(self.dtype, &inputs.v.data))?;
        let extra = self.upload_full_inputs(g, inputs)?;
        let o = g.zeros(o_bytes)?;
        let lse = g.zeros(lse_bytes)?;
        let call = super::args::DeviceCall {
            batch,
            seq,
            q: ptr(&q),
            k: ptr(&k),
            v: ptr(&v),
            o: ptr(&o),
            lse: ptr(&lse),
            extra: extra.iter().map(|(n, s)| (n.clone(), ptr(s))).collect(),
        };
        let launches = super::args::direct_launches(self.info(), &self.spec, &call)?;
        let mut buffers = vec![q, k, v];
        buffers.extend(extra.into_values());
        Ok(DirectJob {
            _buffers: buffers,
            o,
            o_bytes,
            lse,
            lse_bytes,
            launches,
        })
    }

    /// Enqueues a direct job's launches on GPU 0 (repeatable: the autotuner
    /// times it).
    fn enqueue_direct(&self, job: &DirectJob) -> Result<()> {
        for x in &job.launches {
            self.run_launch(&self.gpus[0], x)?;
        }
        Ok(())
    }

    /// Hands a host-planned launch to the driver on `g`'s compute stream.
    pub(super) fn run_launch(&self, g: &Gpu, x: &HostLaunch) -> Result<()> {
        let f = match x.kernel {
            KernelId::Main => g.kernels.first().ok_or_else(|| internal("kernel"))?,
            KernelId::Merge => aux(&g.merge)?,
            KernelId::FillNegInf => aux(&g.fill)?,
            KernelId::Backward(i) => {
                let m = self
                    .backward
                    .get()
                    .ok_or_else(|| internal("backward module"))?;
                let d = self
                    .gpus
                    .iter()
                    .position(|x| std::ptr::eq(x, g))
                    .ok_or_else(|| internal("GPU of a backward launch"))?;
                m.functions[d]
                    .get(i)
                    .ok_or_else(|| internal("backward kernel"))?
            }
        };
        g.launch(f, x.grid, x.threads, x.smem, &x.args)
    }

    fn enqueue_chunkwise(&self, j: &mut ChunkJob) -> Result<()> {
        let info = self.info().clone();
        let h = self.spec.heads as usize;
        for i in 0..j.pieces.len() {
            let (before, rest) = j.pieces.split_at_mut(i);
            let p = &mut rest[0];
            let g = &self.gpus[p.dev];
            let prev = before.last();
            // State before this range: none for the first, else the previous
            // range's, copied over when it lives on another GPU.
            let (state_in, z_in) = match prev {
                None => (None, None),
                Some(prev) if prev.dev == p.dev => {
                    (Some(ptr(&prev.state)), prev.z.as_ref().map(ptr))
                }
                Some(prev) => {
                    let s = p
                        .state_in
                        .as_mut()
                        .ok_or_else(|| internal("state buffer"))?;
                    // The previous range's launch is on its GPU's compute
                    // stream: order the copy after it explicitly (cudarc's
                    // peer copy happens to wait too, but that is its detail).
                    Gpu::wait(&g.compute, &Gpu::mark(&self.gpus[prev.dev].compute)?)?;
                    let bytes = prev.state.len();
                    copy_bytes(&g.compute, &prev.state, s, bytes)?;
                    if let (Some(pz), Some(z)) = (&prev.z, p.z_in.as_mut()) {
                        copy_bytes(&g.compute, pz, z, pz.len())?;
                    }
                    (Some(ptr(s)), p.z_in.as_ref().map(ptr))
                }
            };
            let bufs = ChunkBuffers {
                q: ptr(&p.q),
                k: ptr(&p.k),
                v: ptr(&p.v),
                gate: j.gate.clone().zip(p.gate.as_ref().map(ptr)),
                state_in,
                z_in,
                o: ptr(&p.o),
                state_out: ptr(&p.state),
                z_out: p.z.as_ref().map(ptr),
            };
            self.run_launch(g, &chunk_launch(&info, &bufs, p.range.len(), j.batch, h)?)?;
        }
        Ok(())
    }

    /// Downloads the output of the last run of `job`.
    /// The softmax row log-sum-exp of a ring run, `[batch, heads, seq]`
    /// (`None` for the other families).
    fn collect_lse(&self, job: &Job) -> Result<Option<Tensor<f32>>> {
        let Job::Pairwise(j) = job else {
            return Ok(None);
        };
        let h = self.spec.heads as usize;
        let (b, seq) = (j.batch, j.seq);
        let mut out = Tensor::<f32>::zeros(&[b, h, seq]);
        for rb in &j.ranks {
            let Acc::Softmax { lse, .. } = &rb.acc else {
                return Ok(None);
            };
            let g = &self.gpus[rb.dev];
            let bytes = g.download(lse, b * h * rb.nq * 4)?;
            // `[b * h, nq]` rows of the rank's ranges, end to end.
            scatter_rows(
                &mut out.data,
                &decode(DType::F32, &bytes),
                b * h,
                seq,
                1,
                rb.nq,
                &rb.q_ranges,
            );
        }
        Ok(Some(out))
    }

    fn collect(&self, job: &Job) -> Result<Tensor<f32>> {
        for g in &self.gpus {
            g.sync_all()?;
        }
        let spec = &self.spec;
        let (h, dv) = (spec.heads as usize, spec.value_dim as usize);
        let w = h * dv;
        let (b, seq) = match job {
            Job::Pairwise(j) => (j.batch, j.seq),
            Job::Chunkwise(j) => (j.batch, j.seq),
        };
        let mut out = Tensor::<f32>::zeros(&[b, seq, h, dv]);
        // Scatters `[b, rows, w]` buffer rows (ranges placed at offsets) into `out`.
        let mut scatter = |data: &[f32], rows: usize, ranges: &[Range<usize>]| {
            scatter_rows(&mut out.data, data, b, seq, w, rows, ranges)
        };
        match job {
            Job::Pairwise(j) => {
                for rb in &j.ranks {
                    let g = &self.gpus[rb.dev];
                    match &rb.acc {
                        Acc::Softmax { o, .. } => {
                            let bytes = g.download(o, b * rb.nq * w * 4)?;
                            scatter(&decode(DType::F32, &bytes), rb.nq, &rb.q_ranges);
                        }
                        Acc::Conv { o } => {
                            for (x, q) in o.iter().zip(&rb.q_ranges) {
                                let bytes = g.download(x, b * q.len() * w * 4)?;
                                scatter(
                                    &decode(DType::F32, &bytes),
                                    q.len(),
                                    std::slice::from_ref(q),
                                );
                            }
                        }
                    }
                }
            }
            Job::Chunkwise(j) => {
                for p in &j.pieces {
                    let g = &self.gpus[p.dev];
                    let bytes = g.download(&p.o, b * p.range.len() * w * elem_bytes(self.dtype))?;
                    scatter(
                        &decode(self.dtype, &bytes),
                        p.range.len(),
                        std::slice::from_ref(&p.range),
                    );
                }
            }
        }
        Ok(out)
    }
}

fn internal(what: &str) -> RuntimeError {
    RuntimeError::Internal(format!("CUDA backend internal error: {what} missing"))
}

fn aux(f: &Option<CudaFunction>) -> Result<&CudaFunction> {
    f.as_ref().ok_or_else(|| internal("merge kernel"))
}

/// Filter length of a convolution spec: the filter input's last axis (the
/// kernels' `seq_len` for this family).
pub(super) fn conv_filter_len(spec: &MixerSpec, inputs: &MixerInputs) -> usize {
    match &spec.score {
        mixc_dsl::ir::Score::Filter { input } => inputs
            .extra
            .get(input)
            .and_then(|t| t.shape().last().copied())
            .unwrap_or(inputs.seq),
        _ => inputs.seq,
    }
}

/// Copies the first `bytes` of `src` into `dst` on `stream` (a peer copy
/// when they live on different GPUs).
fn copy_bytes(
    stream: &std::sync::Arc<cudarc::driver::CudaStream>,
    src: &CudaSlice<u8>,
    dst: &mut CudaSlice<u8>,
    bytes: usize,
) -> Result<()> {
    if bytes == 0 {
        return Ok(());
    }
    let s = src.slice(0..bytes);
    let mut d = dst.slice_mut(0..bytes);
    stream
        .memcpy_dtod(&s, &mut d)
        .map_err(|e| super::device::drv("copying a shard between ranks", e))
}

/// The shard rank `r` holds at `step` and rank `dst`'s ring buffer `slot`
/// (distinct buffers: `slot` is never the one `dst` reads at `step`).
fn two_shards(
    ranks: &mut [RankBufs],
    r: usize,
    step: usize,
    dst: usize,
    slot: usize,
) -> Result<(&Shard, &mut Shard)> {
    // Only a ring of one rank would send to itself, and it has no transfers.
    if r == dst {
        return Err(internal("a distinct destination rank"));
    }
    let (a, b) = if r < dst {
        let (lo, hi) = ranks.split_at_mut(dst);
        (&lo[r], &mut hi[0])
    } else {
        let (lo, hi) = ranks.split_at_mut(r);
        (&hi[0], &mut lo[dst])
    };
    let src = match held_slot(step) {
        None => &a.home,
        Some(s) => &a.ring[s],
    };
    Ok((src, &mut b.ring[slot]))
}

/// Whether an extra-input parameter is `const int*` (else `const float*`),
/// from its C type; anything else is an error rather than bytes of the
/// wrong width.
pub(super) fn input_is_int(name: &str, c_type: &str) -> Result<bool> {
    let base: Vec<&str> = c_type
        .split(|c: char| c.is_whitespace() || c == '*')
        .filter(|w| !w.is_empty() && *w != "const" && *w != "__restrict__")
        .collect();
    match base.as_slice() {
        ["int"] | ["int32_t"] => Ok(true),
        ["float"] => Ok(false),
        _ => Err(RuntimeError::Internal(format!(
            "CUDA launcher: extra input `{name}` has C type `{c_type}`; the launcher uploads \
             `const int*` or `const float*` only"
        ))),
    }
}

/// An extra input as device bytes: i32 or f32 as the kernel parameter says,
/// optionally only positions `range` of a `[batch, seq, ...]` tensor.
pub(super) fn extra_bytes(
    t: &ExtraTensor,
    as_int: bool,
    rows: Option<(usize, usize, Range<usize>)>,
) -> Vec<u8> {
    let f32s: Vec<f32>;
    let i32s: Vec<i32>;
    let (fdata, idata): (Option<&[f32]>, Option<&[i32]>) = match t {
        ExtraTensor::F32(x) => (Some(&x.data), None),
        ExtraTensor::I32(x) => (None, Some(&x.data)),
    };
    let slice_rows = |n: usize| -> Option<(usize, usize, usize, Range<usize>)> {
        let (b, seq, r) = rows.clone()?;
        Some((b, seq, n / (b * seq).max(1), r))
    };
    if as_int {
        i32s = match (idata, fdata) {
            (Some(d), _) => d.to_vec(),
            (None, Some(d)) => d.iter().map(|&x| x as i32).collect(),
            _ => Vec::new(),
        };
        let v = match slice_rows(i32s.len()) {
            Some((b, seq, w, r)) => {
                let mut out = Vec::with_capacity(b * r.len() * w);
                for bi in 0..b {
                    out.extend_from_slice(&i32s[(bi * seq + r.start) * w..(bi * seq + r.end) * w]);
                }
                out
            }
            None => i32s,
        };
        encode_i32(&v)
    } else {
        f32s = match (fdata, idata) {
            (Some(d), _) => d.to_vec(),
            (None, Some(d)) => d.iter().map(|&x| x as f32).collect(),
            _ => Vec::new(),
        };
        let v = match slice_rows(f32s.len()) {
            Some((b, seq, w, r)) => gather_rows(&f32s, b, seq, w, &[r]),
            None => f32s,
        };
        encode(DType::F32, &v)
    }
}

/// A key/value shard on a GPU, `[batch, rows, kv_heads, d]` (k absent for
/// the convolution family).
struct Shard {
    k: Option<CudaSlice<u8>>,
    v: CudaSlice<u8>,
}

// One per rank: the size difference between variants does not matter.
#[allow(clippy::large_enum_variant)]
enum Acc {
    /// Queries, f32 accumulator (normalised o and lse) and the partial one launch writes.
    Softmax {
        q: CudaSlice<u8>,
        o: CudaSlice<u8>,
        lse: CudaSlice<u8>,
        part_o: CudaSlice<u8>,
        part_lse: CudaSlice<u8>,
    },
    /// f32 accumulator per query range.
    Conv { o: Vec<CudaSlice<u8>> },
}

struct RankBufs {
    dev: usize,
    q_ranges: Vec<Range<usize>>,
    nq: usize,
    home: Shard,
    /// Two ring buffers (R > 1): the one held and the one being filled.
    ring: Vec<Shard>,
    acc: Acc,
}

struct PairJob {
    batch: usize,
    seq: usize,
    ranks: Vec<RankBufs>,
    /// `[rank][step]`.
    launches: Vec<Vec<Vec<PairLaunch>>>,
    /// Extra inputs per device, by input name.
    dev_inputs: Vec<BTreeMap<String, CudaSlice<u8>>>,
    sched: RingSchedule,
    kv_row_bytes_k: usize,
    kv_row_bytes_v: usize,
    pairs: Option<Vec<u64>>,
    filter_len: usize,
}

struct Piece {
    dev: usize,
    range: Range<usize>,
    q: CudaSlice<u8>,
    k: CudaSlice<u8>,
    v: CudaSlice<u8>,
    gate: Option<CudaSlice<u8>>,
    o: CudaSlice<u8>,
    state: CudaSlice<u8>,
    z: Option<CudaSlice<u8>>,
    /// Where the previous range's state lands when it lives on another GPU.
    state_in: Option<CudaSlice<u8>>,
    z_in: Option<CudaSlice<u8>>,
}

struct ChunkJob {
    batch: usize,
    seq: usize,
    pieces: Vec<Piece>,
    gate: Option<String>,
}

/// The buffers and launches of one direct (one-rank) run.
struct DirectJob {
    /// Kept alive until the job is dropped: q, k, v and the extra inputs.
    _buffers: Vec<CudaSlice<u8>>,
    o: CudaSlice<u8>,
    o_bytes: usize,
    /// The row log-sum-exp, `[batch, heads, seq]` f32 (softmax; empty otherwise).
    lse: CudaSlice<u8>,
    lse_bytes: usize,
    launches: Vec<HostLaunch>,
}

enum Job {
    Pairwise(PairJob),
    Chunkwise(ChunkJob),
}

/// `mixc run --backend cuda`: one run of `spec` on `inputs`.
/// A spec compiled and loaded for the GPUs of a ring (see [`super::CudaMixer`]).
pub(crate) struct Prepared {
    backend: Backend,
    ranks: usize,
    sharding: Sharding,
    /// The linear families' backward: the derived mixers
    /// (`backward_linear::derived_specs`), prepared at the first backward
    /// call and kept, so later calls compile and load nothing.
    derived: std::sync::OnceLock<Vec<super::CudaMixer>>,
}

impl Prepared {
    pub(crate) fn new(spec: &MixerSpec, opts: &CudaOptions) -> Result<Prepared> {
        let backend = Backend::new(spec, opts.dtype, opts.config, (0, opts.devices), opts.ranks)?;
        Ok(Prepared {
            backend,
            ranks: opts.ranks,
            sharding: opts.sharding,
            derived: std::sync::OnceLock::new(),
        })
    }

    pub(crate) fn config(&self) -> KernelConfig {
        self.backend.generated.config
    }

    pub(crate) fn arch(&self) -> Arch {
        self.backend.arch
    }

    /// A direct call on caller-owned buffers and stream (see
    /// [`super::CudaMixer::forward_device`]).
    ///
    /// # Safety
    /// As [`super::CudaMixer::forward_device`].
    pub(crate) unsafe fn forward_device(
        &self,
        call: &super::args::DeviceCall,
        stream: super::RawStream,
    ) -> Result<()> {
        let b = &self.backend;
        let unsupported = |what: &str| RuntimeError::Unsupported {
            backend: "cuda",
            what: format!("{what} in a direct device-pointer call"),
        };
        if self.ranks != 1 || b.gpus.len() != 1 {
            return Err(unsupported("a ring of several ranks"));
        }
        let launches = super::args::direct_launches(b.info(), &b.spec, call)?;
        let g = &b.gpus[0];
        for x in &launches {
            // SAFETY: the caller's buffers and stream, as documented.
            unsafe { g.launch_on(&g.kernels[0], x, stream as cudarc::driver::sys::CUstream) }?;
        }
        Ok(())
    }

    /// Device bytes per GPU of one forward at `batch x seq`, by the plan
    /// [`Prepared::run`] takes, with the inputs' sizes read off the spec.
    pub(crate) fn device_need(&self, batch: usize, seq: usize) -> Result<Vec<usize>> {
        let b = &self.backend;
        let shapes = b.spec.tensor_shapes(batch, seq);
        let elems = |name: &str| shapes.get(name).map_or(0, |s| s.iter().product::<usize>());
        let extra: usize = b
            .spec
            .inputs
            .iter()
            .filter(|d| b.has_role(&ParamRole::Input(d.name.clone())))
            .map(|d| elems(&d.name) * 4)
            .sum();
        if self.ranks == 1 && b.gpus.len() == 1 {
            return Ok(vec![b.direct_need(
                elems("q"),
                elems("k") + elems("v"),
                batch,
                seq,
                extra,
            )]);
        }
        let sched = RingSchedule::new(seq, self.ranks, self.sharding)?;
        Ok(match b.spec.family {
            Family::Softmax | Family::Convolution => b.pairwise_need(batch, &sched, extra),
            Family::Linear | Family::Retention | Family::Gated => b.chunkwise_need(batch, &sched),
        })
    }

    /// [`super::CudaMixer::admit`].
    pub(crate) fn admit(&self, batch: usize, seq: usize) -> Result<()> {
        check_int_sizes(batch, seq)?;
        let need = self.device_need(batch, seq)?;
        for (g, n) in self.backend.gpus.iter().zip(need) {
            g.check_fits(n)?;
        }
        Ok(())
    }

    /// One run: upload, every launch of the ring, download.
    pub(crate) fn run(&self, inputs: &MixerInputs) -> Result<CudaRun> {
        let b = &self.backend;
        if self.ranks == 1 && b.gpus.len() == 1 {
            return self.run_direct(inputs, false);
        }
        self.run_ring(inputs, false)
    }

    /// [`Prepared::run`] for training: also downloads the softmax row
    /// log-sum-exp ([`CudaRun::lse`]) the backward pass reads. One rank on
    /// one GPU (the backward's shape today).
    pub(crate) fn run_train(&self, inputs: &MixerInputs) -> Result<CudaRun> {
        if self.ranks == 1 && self.backend.gpus.len() == 1 {
            return self.run_direct(inputs, true);
        }
        self.run_ring(inputs, true)
    }

    /// The gradients of `sum(o * d_o)` (see [`super::CudaMixer::backward`]).
    pub(crate) fn backward(
        &self,
        inputs: &MixerInputs,
        o: &Tensor<f32>,
        lse: &Tensor<f32>,
        d_o: &Tensor<f32>,
        config: Option<KernelConfig>,
    ) -> Result<(crate::grad::Gradients<f32>, f64)> {
        let b = &self.backend;
        if b.spec.family != Family::Softmax {
            // Forward runs of derived mixers (`backward_linear.rs`) on this
            // ring: states pass in sequence order for dq, in reverse order
            // (the reversed sequence) for dk and dv.
            let mixers = match self.derived.get() {
                Some(m) => m,
                None => {
                    let made = super::backward_linear::derived_specs(&b.spec)
                        .iter()
                        .map(|d| {
                            let opts = super::CudaOptions {
                                dtype: b.dtype,
                                ranks: self.ranks,
                                sharding: self.sharding,
                                devices: Some(b.gpus.len()),
                                ..super::CudaOptions::default_for(d)
                            };
                            super::CudaMixer::new(d, &opts)
                        })
                        .collect::<Result<Vec<_>>>()?;
                    self.derived.get_or_init(|| made)
                }
            };
            let mut seconds = 0.0;
            let mut run = |d: &MixerSpec, x: &MixerInputs| -> Result<Tensor<f32>> {
                let m = mixers
                    .iter()
                    .find(|m| m.spec.name == d.name)
                    .ok_or_else(|| internal("derived backward mixer"))?;
                let r = m.run(x)?;
                seconds += r.kernel_seconds;
                Ok(r.output)
            };
            let grads = super::backward_linear::backward(&b.spec, inputs, o, d_o, &mut run)?;
            return Ok((grads, seconds));
        }
        let module = b.backward_module(config)?;
        let sched = RingSchedule::new(inputs.seq, self.ranks, self.sharding)?;
        let job = |rank: usize| super::backward::BackwardJob {
            spec: &b.spec,
            kernels: &module.generated,
            dtype: b.dtype,
            inputs,
            o,
            lse,
            d_o,
            sched: &sched,
            rank,
        };
        use super::gpu_rank::{host_links, GpuRank, Link};
        let parts: Vec<(super::backward::RankGradients, f64)> = if self.ranks == 1 {
            let mut io = GpuRank::new(b, 0, Link::None);
            let part = super::backward::backward_rank(&mut io, &job(0))?;
            vec![(part, io.kernel_seconds()?)]
        } else {
            // One thread per rank, shards passed through host memory.
            let links = host_links(self.ranks);
            std::thread::scope(|scope| {
                let handles: Vec<_> = links
                    .into_iter()
                    .enumerate()
                    .map(|(r, link)| {
                        let job = job(r);
                        scope.spawn(move || -> Result<_> {
                            let mut io =
                                GpuRank::new(b, device_of(r, b.gpus.len()), Link::Host(link));
                            io.bind()?;
                            let part = super::backward::backward_rank(&mut io, &job)?;
                            Ok((part, io.kernel_seconds()?))
                        })
                    })
                    .collect();
                handles
                    .into_iter()
                    .map(|h| {
                        h.join().unwrap_or_else(|_| {
                            Err(RuntimeError::Internal(
                                "a backward rank thread panicked".into(),
                            ))
                        })
                    })
                    .collect::<Result<Vec<_>>>()
            })?
        };
        // The slowest rank's kernel time.
        let seconds = parts.iter().map(|p| p.1).fold(0.0, f64::max);
        let parts: Vec<_> = parts.into_iter().map(|p| p.0).collect();
        let grads = super::backward::assemble_gradients(&b.spec, inputs, &sched, &parts)?;
        Ok((grads, seconds))
    }

    /// One rank: the direct call's single launch writes `o` in the storage
    /// type (and softmax's `lse`: no partials, no merge, no accumulator), on
    /// buffers uploaded here.
    fn run_direct(&self, inputs: &MixerInputs, keep_lse: bool) -> Result<CudaRun> {
        let start = Instant::now();
        let b = &self.backend;
        let g = &b.gpus[0];
        let job = b.upload_direct(inputs)?;
        let _guard = SyncGuard(&b.gpus);
        let t0 = g.timing_mark()?;
        b.enqueue_direct(&job)?;
        let t1 = g.timing_mark()?;
        let (h, dv) = (b.spec.heads as usize, b.spec.value_dim as usize);
        let output = Tensor::new(
            vec![inputs.batch, inputs.seq, h, dv],
            decode(b.dtype, &g.download(&job.o, job.o_bytes)?),
        );
        let lse = if keep_lse && job.lse_bytes > 0 {
            Some(Tensor::new(
                vec![inputs.batch, h, inputs.seq],
                decode(DType::F32, &g.download(&job.lse, job.lse_bytes)?),
            ))
        } else {
            None
        };
        let kernel_ms = t0
            .elapsed_ms(&t1)
            .map_err(|e| super::device::drv("reading the timing events", e))?;
        let sched = RingSchedule::new(inputs.seq, 1, self.sharding)?;
        Ok(CudaRun {
            output,
            seconds: start.elapsed().as_secs_f64(),
            kernel_seconds: kernel_ms as f64 / 1e3,
            pairs_per_rank: super::rank::pairs_per_rank(
                &b.spec,
                &b.generated.config,
                inputs,
                &sched,
            ),
            devices: 1,
            config: b.generated.config,
            arch: b.arch,
            dist_rank: None,
            lse,
        })
    }

    /// A ring run: upload, every launch of the ring, download.
    fn run_ring(&self, inputs: &MixerInputs, keep_lse: bool) -> Result<CudaRun> {
        let start = Instant::now();
        let backend = &self.backend;
        let sched = RingSchedule::new(inputs.seq, self.ranks, self.sharding)?;
        let mut job = backend.prepare(inputs, &sched)?;
        let _guard = SyncGuard(&backend.gpus);
        let t0 = backend.gpus[0].timing_mark()?;
        backend.enqueue(&mut job)?;
        let t1 = backend.gpus[0].timing_mark()?;
        let output = backend.collect(&job)?;
        let lse = if keep_lse {
            backend.collect_lse(&job)?
        } else {
            None
        };
        let kernel_ms = t0
            .elapsed_ms(&t1)
            .map_err(|e| super::device::drv("reading the timing events", e))?;
        let pairs_per_rank = match &job {
            Job::Pairwise(j) => j.pairs.clone(),
            Job::Chunkwise(_) => None,
        };
        Ok(CudaRun {
            output,
            seconds: start.elapsed().as_secs_f64(),
            kernel_seconds: kernel_ms as f64 / 1e3,
            pairs_per_rank,
            devices: backend.gpus.len(),
            config: backend.generated.config,
            arch: backend.arch,
            dist_rank: None,
            lse,
        })
    }
}

/// [`super::time_config`]: one rank on GPU 0, CUDA events around each run.
pub(crate) fn time(
    spec: &MixerSpec,
    inputs: &[MixerInputs],
    dtype: DType,
    cfg: &KernelConfig,
    warmup: usize,
    reps: usize,
) -> Result<Vec<f64>> {
    let first = inputs
        .first()
        .ok_or_else(|| RuntimeError::Invalid("time_config: no input sets given".into()))?;
    // One schedule serves every set, so they must share one shape.
    if let Some(x) = inputs
        .iter()
        .find(|x| (x.batch, x.seq) != (first.batch, first.seq))
    {
        return Err(RuntimeError::Invalid(format!(
            "time_config: input sets differ in shape (batch {} x seq {} vs {} x {})",
            first.batch, first.seq, x.batch, x.seq
        )));
    }
    // One rank on GPU 0: the direct plan, exactly what `forward` runs.
    let backend = Backend::new(spec, dtype, Some(*cfg), (0, Some(1)), 1)?;
    let jobs = inputs
        .iter()
        .map(|x| backend.upload_direct(x))
        .collect::<Result<Vec<_>>>()?;
    let _guard = SyncGuard(&backend.gpus);
    let n = jobs.len();
    for i in 0..warmup {
        backend.enqueue_direct(&jobs[i % n])?;
    }
    let g = &backend.gpus[0];
    let mut times = Vec::with_capacity(reps);
    for i in 0..reps {
        let t0 = g.timing_mark()?;
        backend.enqueue_direct(&jobs[(warmup + i) % n])?;
        let t1 = g.timing_mark()?;
        let ms = t0
            .elapsed_ms(&t1)
            .map_err(|e| super::device::drv("reading the timing events", e))?;
        times.push(ms as f64 / 1e3);
    }
    Ok(times)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn extra_inputs_convert_and_slice() {
        // A gate [batch 2, seq 4, heads 2]: value = 100 b + 10 pos + h.
        let data: Vec<f32> = (0..2)
            .flat_map(|b| {
                (0..4).flat_map(move |s| (0..2).map(move |h| (100 * b + 10 * s + h) as f32))
            })
            .collect();
        let t = ExtraTensor::F32(Tensor::new(vec![2, 4, 2], data));
        let got = decode(DType::F32, &extra_bytes(&t, false, Some((2, 4, 1..3))));
        assert_eq!(got, [10.0, 11.0, 20.0, 21.0, 110.0, 111.0, 120.0, 121.0]);
        // Whole tensors keep every element; int parameters get i32 bytes.
        assert_eq!(extra_bytes(&t, false, None).len(), 16 * 4);
        assert!(input_is_int("doc", "const int* __restrict__").unwrap());
        assert!(!input_is_int("rel", "const float* __restrict__").unwrap());
        assert!(input_is_int("x", "const __half* __restrict__").is_err());
        let ids = ExtraTensor::I32(Tensor::new(vec![1, 3], vec![0, 7, -1]));
        assert_eq!(extra_bytes(&ids, true, None), encode_i32(&[0, 7, -1]));
        assert_eq!(
            extra_bytes(&ids, false, None),
            encode(DType::F32, &[0.0, 7.0, -1.0])
        );
    }

    /// The helper source (`templates/helpers.cu`) defines the kernels the
    /// backend loads.
    #[test]
    fn helper_source_defines_the_loaded_kernels() {
        let src = crate::cuda::helper_kernels_source();
        for d in [DType::F32, DType::F16, DType::Bf16] {
            let [merge, fill] = crate::cuda::helper_kernel_names(d);
            assert!(src.contains(&format!("MIXC_MERGE({merge}, ")), "{merge}");
            assert!(src.contains(&format!("void {fill}(")), "{fill}");
        }
    }
}
