//! The softmax backward pass in ring order, written once against
//! [`RankIo`] (the GPU with NCCL, or the host twin in the tests), with the
//! kernels of [`mixc_codegen::generate_backward`].
//!
//! Rank `r` keeps its queries, the forward's output `o` and its row
//! log-sum-exp, the upstream gradient `do`, `delta = rowsum(do * o)` and
//! the f32 `dq` accumulator. Its key/value shard travels around the ring
//! together with the shard's f32 `dk` / `dv` accumulators (the
//! ring-flash-attention scheme): at step `s` the rank adds the gradients of
//! its queries against the shard it holds (that of rank `(r - s) mod R`),
//! then passes shard and accumulators to `r + 1`; after `R` steps the
//! accumulators are home, complete. Table gradients (bias tables) are
//! per-rank partial sums that [`assemble_gradients`] adds.
//!
//! Every launch is planned by the same `plan::pair_launches` as the forward
//! (the steps and chunks that are empty under the mask are never launched).

use std::collections::BTreeMap;

use mixc_codegen::{GeneratedKernel, KernelInfo, ParamRole};
use mixc_dsl::ir::{DType, MixerSpec};

use super::args::{
    build_args, grid_for, helper_blocks, range_ints, ArgValue, Bindings, HostLaunch, KernelId,
};
use super::device::{decode, elem_bytes, encode};
use super::plan::{
    check_int_sizes, gather_rows, held_slot, pair_launches, ring_fill_slot, scatter_rows,
    segment_summaries, tiling_of,
};
use super::rank::{upload_extras, RankIo};
use super::validate_inputs;
use crate::error::{Result, RuntimeError};
use crate::grad::Gradients;
use crate::ring::RingSchedule;
use crate::tensor::{MixerInputs, Tensor};

/// What a rank's backward needs: the backward module, the forward's
/// inputs, its output `o` (`[batch, seq, heads, value_dim]`) and row
/// log-sum-exp (`[batch, heads, seq]`, natural log, `-inf` for rows that see
/// no key), and the upstream gradient `d_o` (`o`'s shape).
pub(crate) struct BackwardJob<'a> {
    pub spec: &'a MixerSpec,
    pub kernels: &'a GeneratedKernel,
    pub dtype: DType,
    pub inputs: &'a MixerInputs,
    pub o: &'a Tensor<f32>,
    pub lse: &'a Tensor<f32>,
    pub d_o: &'a Tensor<f32>,
    pub sched: &'a RingSchedule,
    pub rank: usize,
}

/// One rank's gradients: `dq`, `dk`, `dv` of its own rows (`[batch,
/// shard_len, width]`, its ranges end to end, in the storage type's
/// rounding) and its partial sums of the table gradients (full shape).
pub(crate) struct RankGradients {
    pub dq: Vec<f32>,
    pub dk: Vec<f32>,
    pub dv: Vec<f32>,
    pub tables: BTreeMap<String, Vec<f32>>,
}

/// A key/value shard and its gradient accumulators, travelling together.
#[derive(Clone, Copy)]
struct Shard<B> {
    k: B,
    v: B,
    dk: B,
    dv: B,
}

impl<B: Copy> Shard<B> {
    fn kv(&self, n: (usize, usize)) -> [(B, usize); 2] {
        [(self.k, n.0), (self.v, n.1)]
    }
    fn grads(&self, n: (usize, usize)) -> [(B, usize); 2] {
        [(self.dk, n.0), (self.dv, n.1)]
    }
}

fn kernel(g: &GeneratedKernel, i: usize) -> Result<&KernelInfo> {
    g.kernels.get(i).ok_or_else(|| {
        RuntimeError::Internal(format!(
            "the backward module of `{}` has no kernel {i}",
            g.spec_name
        ))
    })
}

fn int32(name: &str, v: usize) -> Result<ArgValue> {
    i32::try_from(v).map(ArgValue::Int).map_err(|_| {
        RuntimeError::DoesNotFit(format!(
            "CUDA launcher: backward argument `{name}` = {v} does not fit a 32-bit int"
        ))
    })
}

/// `delta` of every row of the rank's buffers.
fn delta_launch(
    g: &GeneratedKernel,
    o: u64,
    d_o: u64,
    delta: u64,
    batch: usize,
    rows: usize,
    heads: usize,
) -> Result<HostLaunch> {
    let info = kernel(g, 1)?;
    Ok(HostLaunch {
        kernel: KernelId::Backward(1),
        grid: (helper_blocks(batch * heads * rows), 1, 1),
        threads: info.threads_per_block,
        smem: 0,
        args: vec![
            ArgValue::Ptr(o),
            ArgValue::Ptr(d_o),
            ArgValue::Ptr(delta),
            int32("batch", batch)?,
            int32("q_rows", rows)?,
        ],
    })
}

/// An f32 accumulator of `n` elements to the storage type (`scaled`: times the score scale).
fn finish_launch(
    g: &GeneratedKernel,
    acc: u64,
    out: u64,
    n: usize,
    scaled: bool,
) -> Result<HostLaunch> {
    let info = kernel(g, 2)?;
    Ok(HostLaunch {
        kernel: KernelId::Backward(2),
        grid: (helper_blocks(n), 1, 1),
        threads: info.threads_per_block,
        smem: 0,
        args: vec![
            ArgValue::Ptr(acc),
            ArgValue::Ptr(out),
            int32("n", n)?,
            ArgValue::Int(scaled as i32),
        ],
    })
}

/// Runs rank `job.rank`'s part of the backward ring.
pub(crate) fn backward_rank<I: RankIo>(io: &mut I, job: &BackwardJob) -> Result<RankGradients> {
    let (spec, x, sched, r) = (job.spec, job.inputs, job.sched, job.rank);
    validate_inputs(spec, x)?;
    crate::grad::validate_upstream(spec, x, job.d_o)?;
    check_int_sizes(x.batch, x.seq)?;
    let (b, seq) = (x.batch, x.seq);
    let (h, kvh) = (spec.heads as usize, spec.kv_heads as usize);
    let (dk, dv) = (spec.head_dim as usize, spec.value_dim as usize);
    if job.o.shape != [b, seq, h, dv] || job.lse.shape != [b, h, seq] {
        return Err(RuntimeError::Invalid(format!(
            "backward residuals of shapes {:?} (o) and {:?} (lse); expected {:?} and {:?}",
            job.o.shape,
            job.lse.shape,
            [b, seq, h, dv],
            [b, h, seq]
        )));
    }
    let info = kernel(job.kernels, 0)?;
    let e = elem_bytes(job.dtype);
    let ranks = sched.ranks;
    let tiling = tiling_of(&job.kernels.config);
    let segs = segment_summaries(spec, x, tiling);
    let q_ranges = sched.shard(r).to_vec();
    let nq = sched.shard_len(r);
    let max_rows = (0..ranks).map(|i| sched.shard_len(i)).max().unwrap_or(0);
    let (kb, vb) = (kvh * dk, kvh * dv); // elements per row
    let tables: Vec<String> = info
        .params
        .iter()
        .filter_map(|p| match &p.role {
            ParamRole::GradAccumulator(n) if p.name.starts_with("grad_") => Some(n.clone()),
            _ => None,
        })
        .collect();
    let table_len = |n: &str| -> Result<usize> { Ok(x.extra_input(n)?.shape().iter().product()) };
    let mut table_bytes = 0;
    for t in &tables {
        table_bytes += table_len(t)? * 4;
    }
    let shard_bytes = |rows: usize| b * rows * (kb + vb) * (e + 4);
    io.check_fits(
        b * nq * (h * dk + 2 * h * dv) * e
            + b * nq * h * (dk * 4 + 8)
            + shard_bytes(nq)
            + if ranks > 1 {
                2 * shard_bytes(max_rows)
            } else {
                0
            }
            + table_bytes,
    )?;

    let extras = upload_extras(io, info, x)?;
    let up = |io: &mut I, t: &Tensor<f32>, width: usize| -> Result<I::Buf> {
        io.upload(&encode(
            job.dtype,
            &gather_rows(&t.data, b, seq, width, &q_ranges),
        ))
    };
    let q = up(io, &x.q, h * dk)?;
    let o = up(io, job.o, h * dv)?;
    let d_o = up(io, job.d_o, h * dv)?;
    let lse = io.upload(&encode(
        DType::F32,
        &gather_rows(&job.lse.data, b * h, seq, 1, &q_ranges),
    ))?;
    let delta = io.zeros(b * h * nq * 4)?;
    let dq_acc = io.zeros(b * nq * h * dk * 4)?;
    let mut grads = BTreeMap::new();
    for t in &tables {
        let buf = io.zeros(table_len(t)? * 4)?;
        grads.insert(t.clone(), buf);
    }
    let home = Shard {
        k: up(io, &x.k, kb)?,
        v: up(io, &x.v, vb)?,
        dk: io.zeros(b * nq * kb * 4)?,
        dv: io.zeros(b * nq * vb * 4)?,
    };
    let mut ring = Vec::new();
    if ranks > 1 {
        for _ in 0..2 {
            ring.push(Shard {
                k: io.zeros(b * max_rows * kb * e)?,
                v: io.zeros(b * max_rows * vb * e)?,
                dk: io.zeros(b * max_rows * kb * 4)?,
                dv: io.zeros(b * max_rows * vb * 4)?,
            });
        }
    }
    io.launch(&delta_launch(
        job.kernels,
        io.addr(o),
        io.addr(d_o),
        io.addr(delta),
        b,
        nq,
        h,
    )?)?;

    let (next, prev) = ((r + 1) % ranks, (r + ranks - 1) % ranks);
    for step in 0..ranks {
        let owner = sched.held_at(r, step);
        let held = match held_slot(step) {
            None => home,
            Some(s) => ring[s],
        };
        let held_rows = sched.shard_len(owner);
        let (launches, _) = pair_launches(&spec.mask, tiling, &segs, &q_ranges, sched.shard(owner));
        for l in &launches {
            let mut bind = Bindings {
                inputs: extras.clone(),
                ..Bindings::default()
            };
            bind.buffer("q", io.addr(q))
                .buffer("k", io.addr(held.k))
                .buffer("v", io.addr(held.v))
                .buffer("d_o", io.addr(d_o))
                .buffer("lse", io.addr(lse))
                .buffer("delta", io.addr(delta))
                .buffer("dq_acc", io.addr(dq_acc))
                .buffer("dk_acc", io.addr(held.dk))
                .buffer("dv_acc", io.addr(held.dv));
            for (t, buf) in &grads {
                bind.buffer(
                    &format!("grad_{}", mixc_codegen::input_param(t)),
                    io.addr(*buf),
                );
            }
            range_ints(&mut bind, l, nq, held_rows, seq);
            io.launch(&HostLaunch {
                kernel: KernelId::Backward(0),
                grid: grid_for(info, b, (0, l.kv_end - l.kv_begin), (h, kvh))?,
                threads: info.threads_per_block,
                smem: info.dynamic_smem_bytes,
                args: build_args(&info.name, &info.params, &bind)?,
            })?;
        }
        if ranks == 1 {
            break;
        }
        // Shard and accumulators go on to r + 1 once this step's launches
        // are done; after the last step only the accumulators move, home.
        let (k_n, v_n) = (b * held_rows * kb, b * held_rows * vb);
        if step + 1 < ranks {
            let incoming = sched.shard_len(sched.held_at(r, step + 1));
            let fill = ring[ring_fill_slot(step)];
            let (ik, iv) = (b * incoming * kb, b * incoming * vb);
            let mut send = held.kv((k_n * e, v_n * e)).to_vec();
            send.extend(held.grads((k_n * 4, v_n * 4)));
            let mut recv = fill.kv((ik * e, iv * e)).to_vec();
            recv.extend(fill.grads((ik * 4, iv * 4)));
            io.sendrecv(Some((next, &send)), Some((prev, &recv)))?;
        } else {
            let (mk, mv) = (b * nq * kb * 4, b * nq * vb * 4);
            io.sendrecv(
                Some((next, &held.grads((k_n * 4, v_n * 4)))),
                Some((prev, &home.grads((mk, mv)))),
            )?;
        }
        io.await_transfers()?;
    }

    // The accumulators in the storage type (dq and dk times the score scale).
    let finish = |io: &mut I, acc: I::Buf, n: usize, scaled: bool| -> Result<Vec<f32>> {
        let out = io.zeros(n * e)?;
        io.launch(&finish_launch(
            job.kernels,
            io.addr(acc),
            io.addr(out),
            n,
            scaled,
        )?)?;
        Ok(decode(job.dtype, &io.download(out, n * e)?))
    };
    let dq = finish(io, dq_acc, b * nq * h * dk, true)?;
    let dk_rows = finish(io, home.dk, b * nq * kb, true)?;
    let dv_rows = finish(io, home.dv, b * nq * vb, false)?;
    let mut tables_out = BTreeMap::new();
    for (t, buf) in grads {
        let n = table_len(&t)?;
        tables_out.insert(t, decode(DType::F32, &io.download(buf, n * 4)?));
    }
    Ok(RankGradients {
        dq,
        dk: dk_rows,
        dv: dv_rows,
        tables: tables_out,
    })
}

/// The ranks' gradients (by rank) as whole tensors: rows scattered to
/// their positions, table gradients summed.
pub(crate) fn assemble_gradients(
    spec: &MixerSpec,
    inputs: &MixerInputs,
    sched: &RingSchedule,
    parts: &[RankGradients],
) -> Result<Gradients<f32>> {
    let (b, seq) = (inputs.batch, inputs.seq);
    let (h, kvh) = (spec.heads as usize, spec.kv_heads as usize);
    let (dk, dv) = (spec.head_dim as usize, spec.value_dim as usize);
    if parts.len() != sched.ranks {
        return Err(RuntimeError::Invalid(format!(
            "gathered {} ranks' gradients for a {}-rank ring",
            parts.len(),
            sched.ranks
        )));
    }
    let mut dq_t = Tensor::<f32>::zeros(&[b, seq, h, dk]);
    let mut dk_t = Tensor::<f32>::zeros(&[b, seq, kvh, dk]);
    let mut dv_t = Tensor::<f32>::zeros(&[b, seq, kvh, dv]);
    let mut extra: BTreeMap<String, Tensor<f32>> = BTreeMap::new();
    for (r, p) in parts.iter().enumerate() {
        let rows = sched.shard_len(r);
        for (out, data, w) in [
            (&mut dq_t, &p.dq, h * dk),
            (&mut dk_t, &p.dk, kvh * dk),
            (&mut dv_t, &p.dv, kvh * dv),
        ] {
            if data.len() != b * rows * w {
                return Err(RuntimeError::Invalid(format!(
                    "rank {r} sent {} gradient values, expected {}",
                    data.len(),
                    b * rows * w
                )));
            }
            scatter_rows(&mut out.data, data, b, seq, w, rows, sched.shard(r));
        }
        for (name, g) in &p.tables {
            let shape = inputs.extra_input(name)?.shape().to_vec();
            let acc = extra
                .entry(name.clone())
                .or_insert_with(|| Tensor::zeros(&shape));
            for (a, x) in acc.data.iter_mut().zip(g) {
                *a += x;
            }
        }
    }
    Ok(Gradients {
        dq: dq_t,
        dk: dk_t,
        dv: dv_t,
        extra,
    })
}
