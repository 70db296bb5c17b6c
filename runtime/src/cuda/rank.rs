//! One rank of a multi-process ring (each process is one rank, started like
//! `torchrun`): the schedule, written once against [`RankIo`], which the GPU
//! with NCCL implements (`nccl.rs`) and the host twin implements with
//! channels and emulated kernels (tests, no GPU).
//!
//! Rank `r` of `R` owns the query shard `RingSchedule::shard(r)`:
//! - softmax / convolution: at step `s` it computes against the key/value
//!   shard it holds (that of rank `(r - s) mod R`) while a grouped send/recv
//!   passes that shard to `r + 1` and receives the next one from `r - 1`
//!   into the other ring buffer; partials merge exactly as in the
//!   single-process ring (log-sum-exp merge kernel, or f32 accumulation);
//! - linear / retention / gated: the recurrent state (and normaliser) goes
//!   from the owner of each range to the owner of the next, in sequence
//!   order.
//!
//! Every launch is built by the same `args` builders as the single-process
//! path. The result is the rank's output rows, `[batch, shard_len, heads *
//! value_dim]` f32 with its ranges end to end ([`assemble`] puts the ranks'
//! rows together on rank 0).

use std::collections::BTreeMap;

use mixc_codegen::{KernelConfig, KernelInfo, ParamRole};
use mixc_dsl::ir::{DType, Decay, Family, MixerSpec, Norm};

use super::args::{
    chunk_launch, conv_pair, fill_neg_inf_launch, softmax_pair, ChunkBuffers, HostLaunch,
    PairShape, SoftmaxBuffers,
};
use super::device::{decode, elem_bytes, encode};
use super::exec::{conv_filter_len, extra_bytes, input_is_int};
use super::plan::{
    check_int_sizes, gather_rows, held_slot, pair_launches, ring_fill_slot, scatter_rows,
    segment_summaries, tiling_of,
};
use crate::error::{Result, RuntimeError};
use crate::inputs::validate_inputs;
use crate::ring::RingSchedule;
use crate::tensor::{MixerInputs, Tensor};

/// One side of a grouped transfer: the peer rank and `(buffer, bytes)` in order.
pub(crate) type Transfer<'a, B> = Option<(usize, &'a [(B, usize)])>;

/// What one rank's schedule needs from its device and its link to the
/// other ranks. Buffers are handles owned by the implementation (freed only
/// when it is dropped, after its device work finished).
pub(crate) trait RankIo {
    type Buf: Copy;
    fn upload(&mut self, bytes: &[u8]) -> Result<Self::Buf>;
    fn zeros(&mut self, bytes: usize) -> Result<Self::Buf>;
    /// The device address of a buffer (what kernel arguments carry).
    fn addr(&self, b: Self::Buf) -> u64;
    /// Enqueues a launch (in order with the launches before it).
    fn launch(&mut self, x: &HostLaunch) -> Result<()>;
    /// The first `bytes` of a buffer, once all enqueued work is done.
    fn download(&mut self, b: Self::Buf, bytes: usize) -> Result<Vec<u8>>;
    /// Errors clearly when `bytes` more do not fit on the device.
    fn check_fits(&self, bytes: usize) -> Result<()>;
    /// One grouped transfer (so a ring of sends and receives cannot
    /// deadlock): the first `n` bytes of each `send` buffer go to rank `to`,
    /// and each `recv` buffer gets its `n` bytes from rank `from`, in list
    /// order. It starts after every launch enqueued so far (its sources are
    /// written and its destinations no longer read); launches enqueued later
    /// do not wait for it until [`RankIo::await_transfers`].
    fn sendrecv(
        &mut self,
        send: Transfer<'_, Self::Buf>,
        recv: Transfer<'_, Self::Buf>,
    ) -> Result<()>;
    /// Launches enqueued from now on wait for every transfer started so far.
    fn await_transfers(&mut self) -> Result<()>;
}

/// What a rank runs: the generated kernel and the run's shapes.
pub(crate) struct RankJob<'a> {
    pub spec: &'a MixerSpec,
    pub info: &'a KernelInfo,
    pub config: KernelConfig,
    pub dtype: DType,
    pub inputs: &'a MixerInputs,
    pub sched: &'a RingSchedule,
    pub rank: usize,
}

/// Runs rank `job.rank`'s part of the ring; returns its output rows
/// (`[batch, shard_len, heads * value_dim]` f32, its ranges end to end).
pub(crate) fn run_rank<I: RankIo>(io: &mut I, job: &RankJob) -> Result<Vec<f32>> {
    validate_inputs(job.spec, job.inputs)?;
    check_int_sizes(job.inputs.batch, job.inputs.seq)?;
    if job.rank >= job.sched.ranks {
        return Err(RuntimeError::Invalid(format!(
            "rank {} of a {}-rank ring",
            job.rank, job.sched.ranks
        )));
    }
    match job.spec.family {
        Family::Softmax | Family::Convolution => pairwise(io, job),
        Family::Linear | Family::Retention | Family::Gated => chunkwise(io, job),
    }
}

/// (query, key) pairs each rank computes over the ring (pairwise families;
/// `None` for chunkwise ones or when too costly to count): the same plan the
/// ranks launch by.
pub(crate) fn pairs_per_rank(
    spec: &MixerSpec,
    config: &KernelConfig,
    inputs: &MixerInputs,
    sched: &RingSchedule,
) -> Option<Vec<u64>> {
    if !matches!(spec.family, Family::Softmax | Family::Convolution) {
        return None;
    }
    let tiling = tiling_of(config);
    let segs = segment_summaries(spec, inputs, tiling);
    let per_plan = pair_scale(spec, inputs.batch, segs.len());
    (0..sched.ranks)
        .map(|r| {
            (0..sched.ranks)
                .map(|s| {
                    let kv = sched.shard(sched.held_at(r, s));
                    pair_launches(&spec.mask, tiling, &segs, sched.shard(r), kv).1
                })
                .sum::<Option<u64>>()
                .map(|p| p * per_plan)
        })
        .collect()
}

/// What one plan's pair count stands for, so counts mean (batch row, head,
/// query, key) as the CPU backend's do: every head, and every batch row when
/// one plan serves them all (no segment ids: one summary for the batch).
pub(crate) fn pair_scale(spec: &MixerSpec, batch: usize, summaries: usize) -> u64 {
    let rows = if summaries == 1 { batch } else { 1 };
    (spec.heads as usize * rows) as u64
}

/// Puts the ranks' rows (by rank, as [`run_rank`] returns them) into the
/// `[batch, seq, heads, value_dim]` output.
pub(crate) fn assemble(
    spec: &MixerSpec,
    sched: &RingSchedule,
    batch: usize,
    parts: &[Vec<f32>],
) -> Result<Tensor<f32>> {
    let (h, dv) = (spec.heads as usize, spec.value_dim as usize);
    let w = h * dv;
    let mut out = Tensor::<f32>::zeros(&[batch, sched.seq, h, dv]);
    if parts.len() != sched.ranks {
        return Err(RuntimeError::Invalid(format!(
            "gathered {} ranks' outputs for a {}-rank ring",
            parts.len(),
            sched.ranks
        )));
    }
    for (r, p) in parts.iter().enumerate() {
        let rows = sched.shard_len(r);
        if p.len() != batch * rows * w {
            return Err(RuntimeError::Invalid(format!(
                "rank {r} sent {} output values, expected {} (batch {batch} x {rows} rows x {w})",
                p.len(),
                batch * rows * w
            )));
        }
        scatter_rows(&mut out.data, p, batch, sched.seq, w, rows, sched.shard(r));
    }
    Ok(out)
}

/// The full extra inputs (tables, segment ids, filters) a kernel reads, by input name.
pub(super) fn upload_extras<I: RankIo>(
    io: &mut I,
    info: &KernelInfo,
    inputs: &MixerInputs,
) -> Result<BTreeMap<String, u64>> {
    let mut out = BTreeMap::new();
    for p in &info.params {
        let ParamRole::Input(name) = &p.role else {
            continue;
        };
        let t = inputs.extra_input(name)?;
        let buf = io.upload(&extra_bytes(t, input_is_int(&p.name, &p.c_type)?, None))?;
        out.insert(name.clone(), io.addr(buf));
    }
    Ok(out)
}

/// A key/value shard: k (absent for convolution) and v.
#[derive(Clone, Copy)]
struct Kv<B> {
    k: Option<B>,
    v: B,
}

impl<B: Copy> Kv<B> {
    /// The transfer list of the first `rows` rows.
    fn parts(&self, rows: usize, batch: usize, kb: usize, vb: usize) -> Vec<(B, usize)> {
        let mut l = Vec::with_capacity(2);
        if let Some(k) = self.k {
            l.push((k, batch * rows * kb));
        }
        l.push((self.v, batch * rows * vb));
        l
    }
}

fn pairwise<I: RankIo>(io: &mut I, job: &RankJob) -> Result<Vec<f32>> {
    let (spec, x, sched, r) = (job.spec, job.inputs, job.sched, job.rank);
    let (b, seq) = (x.batch, x.seq);
    let (h, kvh) = (spec.heads as usize, spec.kv_heads as usize);
    let (dk, dv) = (spec.head_dim as usize, spec.value_dim as usize);
    let e = elem_bytes(job.dtype);
    let softmax = spec.family == Family::Softmax;
    let with_k = job.info.params.iter().any(|p| p.role == ParamRole::K);
    let ranks = sched.ranks;
    let tiling = tiling_of(&job.config);
    let segs = segment_summaries(spec, x, tiling);
    let q_ranges = sched.shard(r).to_vec();
    let nq = sched.shard_len(r);
    let max_rows = (0..ranks).map(|i| sched.shard_len(i)).max().unwrap_or(0);
    let (kb, vb) = (if with_k { kvh * dk * e } else { 0 }, kvh * dv * e);
    let w = h * dv;

    let extra_total: usize = x
        .extra
        .values()
        .map(|t| t.shape().iter().product::<usize>() * 4)
        .sum();
    let ring_bytes = if ranks > 1 {
        2 * b * max_rows * (kb + vb)
    } else {
        0
    };
    let acc_bytes = if softmax {
        b * nq * h * (dk * e + dv * 4 + dv * e) + 2 * b * h * nq * 4
    } else {
        b * nq * w * 4
    };
    io.check_fits(extra_total + b * nq * (kb + vb) + ring_bytes + acc_bytes)?;

    let inputs = upload_extras(io, job.info, job.inputs)?;
    let up = |io: &mut I, t: &Tensor<f32>, width: usize| -> Result<I::Buf> {
        io.upload(&encode(
            job.dtype,
            &gather_rows(&t.data, b, seq, width, &q_ranges),
        ))
    };
    let home = Kv {
        k: if with_k {
            Some(up(io, &x.k, kvh * dk)?)
        } else {
            None
        },
        v: up(io, &x.v, kvh * dv)?,
    };
    let mut ring = Vec::new();
    if ranks > 1 {
        for _ in 0..2 {
            ring.push(Kv {
                k: if with_k {
                    Some(io.zeros(b * max_rows * kb)?)
                } else {
                    None
                },
                v: io.zeros(b * max_rows * vb)?,
            });
        }
    }
    // Softmax: queries, the f32 accumulator (o, lse) and one launch's partial.
    // Convolution: one f32 accumulator per query range (the kernel adds).
    let (soft, conv) = if softmax {
        let q = up(io, &x.q, h * dk)?;
        let part_o = io.zeros(b * nq * w * e)?;
        let part_lse = io.zeros(b * h * nq * 4)?;
        let acc_o = io.zeros(b * nq * w * 4)?;
        let acc_lse = io.zeros(b * h * nq * 4)?;
        let bufs = SoftmaxBuffers {
            q: io.addr(q),
            k: 0,
            v: 0,
            part_o: io.addr(part_o),
            part_lse: io.addr(part_lse),
            acc_o: io.addr(acc_o),
            acc_lse: io.addr(acc_lse),
        };
        io.launch(&fill_neg_inf_launch(bufs.acc_lse, b * h * nq)?)?;
        (Some((bufs, acc_o)), Vec::new())
    } else {
        let mut accs = Vec::with_capacity(q_ranges.len());
        for q in &q_ranges {
            accs.push(io.zeros(b * q.len() * w * 4)?);
        }
        (None, accs)
    };
    let filter_len = conv_filter_len(spec, x);
    let (next, prev) = ((r + 1) % ranks, (r + ranks - 1) % ranks);
    for step in 0..ranks {
        let owner = sched.held_at(r, step);
        let held = match held_slot(step) {
            None => home,
            Some(s) => ring[s],
        };
        let held_rows = sched.shard_len(owner);
        // Pass the held shard on while computing with it: the buffer being
        // filled is the one read at step - 1 (the transfer starts after
        // that step's launches), never the one held now.
        if step + 1 < ranks {
            let incoming = sched.shard_len(sched.held_at(r, step + 1));
            let fill = ring[ring_fill_slot(step)];
            io.sendrecv(
                Some((next, &held.parts(held_rows, b, kb, vb))),
                Some((prev, &fill.parts(incoming, b, kb, vb))),
            )?;
        }
        let (launches, _) = pair_launches(&spec.mask, tiling, &segs, &q_ranges, sched.shard(owner));
        let shape = PairShape {
            batch: b,
            heads: h,
            value_dim: dv,
            q_rows: nq,
            kv_rows: held_rows,
            seq_len: seq,
        };
        for l in &launches {
            if let Some((bufs, _)) = &soft {
                let bufs = SoftmaxBuffers {
                    k: held.k.map_or(0, |k| io.addr(k)),
                    v: io.addr(held.v),
                    ..*bufs
                };
                for x in softmax_pair(job.info, &inputs, &bufs, l, &shape)? {
                    io.launch(&x)?;
                }
            } else {
                let shape = PairShape {
                    q_rows: l.q.len(),
                    seq_len: filter_len,
                    ..shape
                };
                let acc = io.addr(conv[l.q_index]);
                io.launch(&conv_pair(
                    job.info,
                    &inputs,
                    io.addr(held.v),
                    acc,
                    l,
                    &shape,
                )?)?;
            }
        }
        if step + 1 < ranks {
            io.await_transfers()?;
        }
    }
    if let Some((_, acc_o)) = soft {
        return io
            .download(acc_o, b * nq * w * 4)
            .map(|v| decode(DType::F32, &v));
    }
    let per_range = conv
        .iter()
        .zip(&q_ranges)
        .map(|(buf, q)| {
            io.download(*buf, b * q.len() * w * 4)
                .map(|v| decode(DType::F32, &v))
        })
        .collect::<Result<Vec<_>>>()?;
    Ok(interleave(&per_range, &q_ranges, b, w))
}

/// `[batch, len_i, w]` per range -> `[batch, sum len_i, w]` (ranges end to end).
fn interleave(
    per_range: &[Vec<f32>],
    ranges: &[std::ops::Range<usize>],
    b: usize,
    w: usize,
) -> Vec<f32> {
    let n: usize = ranges.iter().map(|r| r.len()).sum();
    let mut out = Vec::with_capacity(b * n * w);
    for bi in 0..b {
        for (d, q) in per_range.iter().zip(ranges) {
            let len = q.len() * w;
            out.extend_from_slice(&d[bi * len..(bi + 1) * len]);
        }
    }
    out
}

fn chunkwise<I: RankIo>(io: &mut I, job: &RankJob) -> Result<Vec<f32>> {
    let (spec, x, sched, r) = (job.spec, job.inputs, job.sched, job.rank);
    let (b, seq) = (x.batch, x.seq);
    let (h, kvh) = (spec.heads as usize, spec.kv_heads as usize);
    let (dk, dv) = (spec.head_dim as usize, spec.value_dim as usize);
    let e = elem_bytes(job.dtype);
    let w = h * dv;
    let norm_sum = matches!(spec.norm, Norm::Sum { .. });
    let gate = match &spec.decay {
        Decay::Gate { input } => Some(input.clone()),
        _ => None,
    };
    let (sb, zb) = (b * h * dk * dv * 4, b * h * dk * 4);
    let order = sched.ranges_in_order();
    let mine: Vec<usize> = (0..order.len()).filter(|&i| order[i].1 == r).collect();
    let rows: usize = mine.iter().map(|&i| order[i].0.len()).sum();
    io.check_fits(
        b * rows * (h * dk + kvh * dk + kvh * dv + w) * e
            + mine.len() * 2 * (sb + zb)
            + if gate.is_some() { b * rows * h * 4 } else { 0 },
    )?;
    // (state, z) of this rank's previous range.
    let mut last: Option<(I::Buf, Option<I::Buf>)> = None;
    let mut outs = Vec::with_capacity(mine.len());
    for &i in &mine {
        let range = order[i].0.clone();
        let n = range.len();
        let rs = std::slice::from_ref(&range);
        let mut up = |t: &Tensor<f32>, width: usize| {
            io.upload(&encode(job.dtype, &gather_rows(&t.data, b, seq, width, rs)))
        };
        let (q, k, v) = (up(&x.q, h * dk)?, up(&x.k, kvh * dk)?, up(&x.v, kvh * dv)?);
        let gate_buf = match &gate {
            Some(name) => {
                let t = x.extra_input(name)?;
                let buf = io.upload(&extra_bytes(t, false, Some((b, seq, range.clone()))))?;
                Some((name.clone(), io.addr(buf)))
            }
            None => None,
        };
        let o = io.zeros(b * n * w * e)?;
        let state = io.zeros(sb)?;
        let z = if norm_sum { Some(io.zeros(zb)?) } else { None };
        // The state before this range: none for the first range, this rank's
        // own previous range's when it owns that one too, else received
        // from the previous range's owner.
        let state_in = if i == 0 {
            None
        } else if order[i - 1].1 == r {
            last
        } else {
            let s = io.zeros(sb)?;
            let zi = if norm_sum { Some(io.zeros(zb)?) } else { None };
            let list = state_list(s, zi, sb, zb);
            io.sendrecv(None, Some((order[i - 1].1, &list)))?;
            io.await_transfers()?;
            Some((s, zi))
        };
        let bufs = ChunkBuffers {
            q: io.addr(q),
            k: io.addr(k),
            v: io.addr(v),
            gate: gate_buf,
            state_in: state_in.map(|(s, _)| io.addr(s)),
            z_in: state_in.and_then(|(_, z)| z).map(|z| io.addr(z)),
            o: io.addr(o),
            state_out: io.addr(state),
            z_out: z.map(|z| io.addr(z)),
        };
        io.launch(&chunk_launch(job.info, &bufs, n, b, h)?)?;
        if let Some((_, next_owner)) = order.get(i + 1).filter(|(_, o)| *o != r) {
            io.sendrecv(Some((*next_owner, &state_list(state, z, sb, zb))), None)?;
        }
        last = Some((state, z));
        outs.push(o);
    }
    let ranges: Vec<_> = mine.iter().map(|&i| order[i].0.clone()).collect();
    let per_range = outs
        .iter()
        .zip(&ranges)
        .map(|(o, q)| {
            io.download(*o, b * q.len() * w * e)
                .map(|v| decode(job.dtype, &v))
        })
        .collect::<Result<Vec<_>>>()?;
    Ok(interleave(&per_range, &ranges, b, w))
}

fn state_list<B: Copy>(s: B, z: Option<B>, sb: usize, zb: usize) -> Vec<(B, usize)> {
    let mut l = vec![(s, sb)];
    if let Some(z) = z {
        l.push((z, zb));
    }
    l
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ring::Sharding;

    fn spec(mask: &str) -> MixerSpec {
        mixc_dsl::parse_str(&format!(
            "mixer m {{ heads = 2; head_dim = 16; dtype = f32; score = dot(q, k); \
             mask = {mask}; norm = softmax; }}"
        ))
        .unwrap()
    }

    /// Rank 0's pair counts: every pair once with no mask; a causal ring
    /// computes at least the visible pairs, and zigzag balances them.
    #[test]
    fn pair_counts_cover_the_visible_pairs() {
        let cfg = KernelConfig {
            block_m: 16,
            block_n: 16,
            ..KernelConfig::default_for(
                &spec("all"),
                &mixc_codegen::Target::new(mixc_codegen::Arch::Sm90, DType::F32),
            )
        };
        let (b, seq) = (2, 256);
        let full = spec("all");
        let x = crate::inputs::random_inputs(&full, b, seq, 1);
        let sched = RingSchedule::new(seq, 4, Sharding::Contiguous).unwrap();
        let p = pairs_per_rank(&full, &cfg, &x, &sched).unwrap();
        assert_eq!(p.iter().sum::<u64>(), (b * 2 * seq * seq) as u64);
        let causal = spec("causal");
        let sched = RingSchedule::new(seq, 4, Sharding::Zigzag).unwrap();
        let p = pairs_per_rank(&causal, &cfg, &x, &sched).unwrap();
        assert!(
            p.iter().sum::<u64>() >= (b * seq * (seq + 1) / 2) as u64,
            "{p:?}"
        );
        let (lo, hi) = (p.iter().min().unwrap(), p.iter().max().unwrap());
        assert!(
            (*hi - *lo) as f64 <= 0.05 * *hi as f64,
            "zigzag unbalanced: {p:?}"
        );
    }
}
