//! The chunkwise backward of the linear families (the forward's chunkwise
//! path: causal mask, `phi(q) . psi(k)` scores, no bias or transform, sum or
//! no normalisation, no / per-head / gated decay): O(L (C + d) d) work for
//! chunks of `C` positions instead of the blocked form's O(L^2 d).
//!
//! With `qs = scale phi(q)`, `K = psi(k)`, `D(i, j) = exp(C_i - C_j)` (the
//! cumulative log-decay `C`), `u` the upstream gradient (over `l + eps`
//! under sum) and `c_i = -u_i . o_i` (sum; 0 otherwise), every pair's
//! weight gradient is `da_ij = u_i . v_j + c_i`, so
//!
//! ```text
//! dqs_i = sum_{j <= i} D(i,j) da_ij K_j  = S_i u_i + c_i z_i      S_i = sum_{j <= i} D K_j v_jᵀ
//! dK_j  = sum_{i >= j} D(i,j) da_ij qs_i = G_j v_j + h_j          G_j = sum_{i >= j} D qs_i u_iᵀ
//! dv_j  = sum_{i >= j} a_ij u_i          = G_jᵀ K_j               h_j = sum_{i >= j} D c_i qs_i
//! ```
//!
//! `S` (and `z`) run forward in sequence order, as in the forward pass; `G`
//! (and `h`) run backward. Each is a `d_k x d_v` state per (batch, head)
//! carried from chunk to chunk, pairs inside a chunk are summed directly.
//! Across ranks the forward states travel in sequence order and the
//! backward states in reverse order, from the owner of one range to the
//! owner of the next (the state gradient in reverse sequence order). Gates
//! get `dC_p = qs_p . dqs_p - K_p . dK_p` (per query head), turned into gate
//! gradients by the blocked path's assembly.

use std::ops::Range;

use mixc_dsl::ir::{Decay, Score};
use rayon::prelude::*;

use super::backward::{BwdShard, QSide, RankGrads};
use super::blocked::{written, KvShard};
use super::microkernel::{gemm, gemm_tn, Mat, MatMut};
use super::real::{axpy, dot, feature, transpose, Real};
use super::Ctx;
use crate::error::{Result, RuntimeError};
use crate::ring::{wire, Endpoint, RingSchedule, Wire};

/// A state for one range boundary, for every (batch, head): forward (`s`,
/// `z`: positions before `pos`, decayed to `pos - 1`) or backward (`G`,
/// `h`: positions from `pos` on, decayed to `pos - 1`).
#[derive(Clone)]
pub(super) struct StateMsg<T> {
    pos: usize,
    forward: bool,
    s: Vec<T>,
    z: Vec<T>,
}

impl<T: Real> Wire for StateMsg<T> {
    fn encode(&self, out: &mut Vec<u8>) {
        wire::put_usize(out, self.pos);
        wire::put_usize(out, usize::from(self.forward));
        wire::put_slice(out, &self.s);
        wire::put_slice(out, &self.z);
    }
    fn decode(b: &mut &[u8]) -> Result<Self> {
        Ok(StateMsg {
            pos: wire::get_usize(b)?,
            forward: wire::get_usize(b)? != 0,
            s: wire::get_vec(b)?,
            z: wire::get_vec(b)?,
        })
    }
}

impl<T: Real> StateMsg<T> {
    /// A message to fill with the states of `bh` (batch, head) pairs.
    fn empty(pos: usize, forward: bool, bh: usize, dk: usize, dv: usize) -> Self {
        StateMsg {
            pos,
            forward,
            s: Vec::with_capacity(bh * dk * dv),
            z: Vec::with_capacity(bh * dk),
        }
    }
    /// The state of (batch, head) `x` in `msg`, or zeros without one.
    fn part(msg: Option<&Self>, x: usize, dk: usize, dv: usize) -> (Vec<T>, Vec<T>) {
        match msg {
            Some(p) => (
                p.s[x * dk * dv..(x + 1) * dk * dv].to_vec(),
                p.z[x * dk..(x + 1) * dk].to_vec(),
            ),
            None => (vec![T::ZERO; dk * dv], vec![T::ZERO; dk]),
        }
    }
}

/// Receives the message for (`pos`, `forward`), keeping others for later.
fn recv_for<T: Real>(
    ep: &Endpoint<StateMsg<T>>,
    pending: &mut Vec<StateMsg<T>>,
    pos: usize,
    forward: bool,
) -> Result<StateMsg<T>> {
    if let Some(i) = pending
        .iter()
        .position(|m| m.pos == pos && m.forward == forward)
    {
        return Ok(pending.swap_remove(i));
    }
    loop {
        let m = ep.recv()?;
        if m.pos == pos && m.forward == forward {
            return Ok(m);
        }
        pending.push(m);
    }
}

/// Cumulative log-decay `C_p` of head `h` (`C_-1 = 0`), in f64.
fn cum<T>(ctx: &Ctx<'_, T>, b: usize, h: usize, p: isize) -> f64 {
    if p < 0 {
        return 0.0;
    }
    match &ctx.spec.decay {
        Decay::None => 0.0,
        Decay::PerHead(_) => ctx.log_gamma[h] * (p + 1) as f64,
        Decay::Gate { .. } => ctx.gate_cum[(b * ctx.heads + h) * ctx.positions + p as usize],
    }
}

/// `psi(k)` and `v` rows of kv head `kvh` at `pos`.
fn kv_rows<T: Real>(ctx: &Ctx<'_, T>, b: usize, kvh: usize, pos: usize, k: &mut [T], v: &mut [T]) {
    let k = &mut k[..ctx.dk];
    ctx.k
        .map_into(ctx.k_at(b, pos, kvh), k, |y| feature::<T>(ctx.k_map, y));
    let v = &mut v[..ctx.dv];
    ctx.v
        .map_into(ctx.v_at(b, pos, kvh), v, |y| T::from_f64(y as f64));
}

/// What one (batch, head) needs of a range: its queries' `qs`, `u`, `c`
/// (local rows from the rank's [`QSide`]) and its keys' `K`, `v`.
struct RangeData<T> {
    qs: Vec<T>,
    u: Vec<T>,
    c: Vec<T>,
    k: Vec<T>,
    v: Vec<T>,
}

fn range_data<T: Real>(
    ctx: &Ctx<'_, T>,
    qside: &QSide<T>,
    x: usize,
    range: &Range<usize>,
    off: usize,
) -> RangeData<T> {
    let (b, h) = (x / ctx.heads, x % ctx.heads);
    let kvh = ctx.spec.kv_head_of(h as u32) as usize;
    let (dk, dv, n, nq) = (ctx.dk, ctx.dv, range.len(), qside.nq);
    let row0 = x * nq + off;
    let mut k = vec![T::ZERO; n * dk];
    let mut v = vec![T::ZERO; n * dv];
    for (t, pos) in range.clone().enumerate() {
        kv_rows(
            ctx,
            b,
            kvh,
            pos,
            &mut k[t * dk..(t + 1) * dk],
            &mut v[t * dv..(t + 1) * dv],
        );
    }
    RangeData {
        qs: qside.qs[row0 * dk..(row0 + n) * dk].to_vec(),
        u: qside.u[row0 * dv..(row0 + n) * dv].to_vec(),
        c: qside.big_d[row0..row0 + n].iter().map(|&d| -d).collect(),
        k,
        v,
    }
}

fn chunks(range: &Range<usize>, size: usize) -> Vec<Range<usize>> {
    (range.start..range.end)
        .step_by(size.max(1))
        .map(|s| s..(s + size.max(1)).min(range.end))
        .collect()
}

/// `w[t][u] = exp(C_(c0+t) - C_(c0+u))` for `u <= t` inside a chunk, 0 above.
fn chunk_decays<T: Real>(ctx: &Ctx<'_, T>, b: usize, h: usize, ch: &Range<usize>, w: &mut Vec<T>) {
    let n = ch.len();
    w.clear();
    w.resize(n * n, T::ZERO);
    let cs: Vec<f64> = ch.clone().map(|p| cum(ctx, b, h, p as isize)).collect();
    for t in 0..n {
        for u in 0..=t {
            w[t * n + u] = T::from_f64((cs[t] - cs[u]).exp());
        }
    }
}

/// `v`'s `n x d` rows transposed into `vt` (`d x n`).
fn transposed<T: Real>(v: &[T], n: usize, d: usize, vt: &mut Vec<T>) {
    vt.clear();
    vt.resize(d * n, T::ZERO);
    transpose(v, n, d, vt);
}

/// The weight gradients of a chunk's own pairs, `m = (U Vᵀ + c 1ᵀ) ⊙ W`
/// (`n x n`, zero above the diagonal where `w` is), from `vt = Vᵀ`.
fn pair_grads<T: Real>(uc: &[T], vt: &[T], c: &[T], w: &[T], n: usize, dv: usize, m: &mut Vec<T>) {
    m.clear();
    m.resize(n * n, T::ZERO);
    gemm(
        Mat::dense(uc, n, dv),
        Mat::dense(vt, dv, n),
        MatMut::dense(m, n, n),
        false,
    );
    for ((mr, wr), &ci) in m.chunks_exact_mut(n).zip(w.chunks_exact(n)).zip(c) {
        for (x, &wv) in mr.iter_mut().zip(wr) {
            *x = (*x + ci) * wv;
        }
    }
}

/// The forward sweep over one range of (batch `b`, head `h`) from the
/// prefix state (`st = Sᵀ`, `d_v x d_k`, and `z`): `dqs` rows and `qs .
/// dqs` of the range, and the state after it. Per chunk: `dQ = diag(w)
/// (U Sᵀ + c zᵀ)` through the state, `dQ += (M ⊙ W) K` inside the chunk
/// (`M = U Vᵀ + c 1ᵀ`), then `Sᵀ = decay Sᵀ + Vᵀ (w ⊙ K)`.
#[allow(clippy::type_complexity)]
fn forward_sweep<T: Real>(
    ctx: &Ctx<'_, T>,
    b: usize,
    h: usize,
    range: &Range<usize>,
    d: &RangeData<T>,
    mut st: Vec<T>,
    mut z: Vec<T>,
) -> (Vec<T>, Vec<f64>, Vec<T>, Vec<T>) {
    let (dk, dv) = (ctx.dk, ctx.dv);
    let mut dq = vec![T::ZERO; range.len() * dk];
    let mut row = vec![0.0f64; range.len()];
    let (mut w, mut vt, mut m, mut wk) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for ch in chunks(range, ctx.chunk) {
        let (n, t0) = (ch.len(), ch.start - range.start);
        let c_prev = cum(ctx, b, h, ch.start as isize - 1);
        let uc = &d.u[t0 * dv..(t0 + n) * dv];
        let (kc, vc) = (&d.k[t0 * dk..(t0 + n) * dk], &d.v[t0 * dv..(t0 + n) * dv]);
        let dqc = &mut dq[t0 * dk..(t0 + n) * dk];
        // Through the state: U Sᵀ + c zᵀ, each row decayed from the chunk start.
        gemm(
            Mat::dense(uc, n, dv),
            Mat::dense(&st, dv, dk),
            MatMut::dense(dqc, n, dk),
            false,
        );
        for (t, r) in dqc.chunks_exact_mut(dk).enumerate() {
            axpy(r, d.c[t0 + t], &z);
            let wi = T::from_f64((cum(ctx, b, h, (ch.start + t) as isize) - c_prev).exp());
            r.iter_mut().for_each(|x| *x *= wi);
        }
        // Inside the chunk: M = U Vᵀ + c, masked and decayed, times K.
        transposed(vc, n, dv, &mut vt);
        chunk_decays(ctx, b, h, &ch, &mut w);
        pair_grads(uc, &vt, &d.c[t0..t0 + n], &w, n, dv, &mut m);
        gemm(
            Mat::dense(&m, n, n),
            Mat::dense(kc, n, dk),
            MatMut::dense(dqc, n, dk),
            true,
        );
        for (t, r) in dqc.chunks_exact(dk).enumerate() {
            row[t0 + t] = dot(&d.qs[(t0 + t) * dk..(t0 + t + 1) * dk], r).to_f64();
        }
        // The state moves past the chunk.
        let c_last = cum(ctx, b, h, ch.end as isize - 1);
        let all = T::from_f64((c_last - c_prev).exp());
        st.iter_mut().for_each(|x| *x *= all);
        z.iter_mut().for_each(|x| *x *= all);
        wk.clear();
        wk.extend_from_slice(kc);
        for (u, r) in wk.chunks_exact_mut(dk).enumerate() {
            let wj = T::from_f64((c_last - cum(ctx, b, h, (ch.start + u) as isize)).exp());
            r.iter_mut().for_each(|x| *x *= wj);
            axpy(&mut z, T::ONE, r);
        }
        gemm_tn(
            Mat::dense(vc, n, dv),
            Mat::dense(&wk, n, dk),
            MatMut::dense(&mut st, dv, dk),
            true,
        );
    }
    (dq, row, st, z)
}

/// The backward sweep over one range of (batch `b`, head `h`) from the
/// suffix state (`g`, `d_k x d_v`, and `hv`): this head's `dK`, `dv` and
/// `K . dK` of the range's keys, and the state before it. Per chunk,
/// last to first: `dKᵀ = G Vᵀ` and `dV = K G` through the state (decayed
/// to each key), `dK += (M ⊙ W)ᵀ Qs` and `dV += (Qs Kᵀ ⊙ W)ᵀ U` inside the
/// chunk, then `G = decay G + Qsᵀ (w ⊙ U)`.
#[allow(clippy::type_complexity)]
fn backward_sweep<T: Real>(
    ctx: &Ctx<'_, T>,
    b: usize,
    h: usize,
    range: &Range<usize>,
    d: &RangeData<T>,
    mut g: Vec<T>,
    mut hv: Vec<T>,
) -> (Vec<T>, Vec<T>, Vec<f64>, Vec<T>, Vec<T>) {
    let (dk, dv) = (ctx.dk, ctx.dv);
    let n_all = range.len();
    let mut d_k = vec![T::ZERO; n_all * dk];
    let mut d_v = vec![T::ZERO; n_all * dv];
    let mut col = vec![0.0f64; n_all];
    let (mut w, mut vt, mut kt, mut m, mut a, mut dkt, mut wu) = (
        Vec::new(),
        Vec::new(),
        Vec::new(),
        Vec::new(),
        Vec::new(),
        Vec::new(),
        Vec::new(),
    );
    for ch in chunks(range, ctx.chunk).into_iter().rev() {
        let (n, t0) = (ch.len(), ch.start - range.start);
        let c_prev = cum(ctx, b, h, ch.start as isize - 1);
        let c_last = cum(ctx, b, h, ch.end as isize - 1);
        let (qc, uc) = (&d.qs[t0 * dk..(t0 + n) * dk], &d.u[t0 * dv..(t0 + n) * dv]);
        let (kc, vc) = (&d.k[t0 * dk..(t0 + n) * dk], &d.v[t0 * dv..(t0 + n) * dv]);
        let dkc = &mut d_k[t0 * dk..(t0 + n) * dk];
        let dvc = &mut d_v[t0 * dv..(t0 + n) * dv];
        // Through the state, each key decayed to the chunk's end.
        transposed(vc, n, dv, &mut vt);
        dkt.clear();
        dkt.resize(dk * n, T::ZERO);
        gemm(
            Mat::dense(&g, dk, dv),
            Mat::dense(&vt, dv, n),
            MatMut::dense(&mut dkt, dk, n),
            false,
        );
        transpose(&dkt, dk, n, dkc);
        gemm(
            Mat::dense(kc, n, dk),
            Mat::dense(&g, dk, dv),
            MatMut::dense(dvc, n, dv),
            false,
        );
        for (u, (kr, vr)) in dkc
            .chunks_exact_mut(dk)
            .zip(dvc.chunks_exact_mut(dv))
            .enumerate()
        {
            axpy(kr, T::ONE, &hv);
            let wj = T::from_f64((c_last - cum(ctx, b, h, (ch.start + u) as isize)).exp());
            kr.iter_mut().for_each(|x| *x *= wj);
            vr.iter_mut().for_each(|x| *x *= wj);
        }
        // Inside the chunk.
        chunk_decays(ctx, b, h, &ch, &mut w);
        pair_grads(uc, &vt, &d.c[t0..t0 + n], &w, n, dv, &mut m);
        transposed(kc, n, dk, &mut kt);
        a.clear();
        a.resize(n * n, T::ZERO);
        gemm(
            Mat::dense(qc, n, dk),
            Mat::dense(&kt, dk, n),
            MatMut::dense(&mut a, n, n),
            false,
        );
        a.iter_mut().zip(&w).for_each(|(x, &wv)| *x *= wv);
        gemm_tn(
            Mat::dense(&m, n, n),
            Mat::dense(qc, n, dk),
            MatMut::dense(dkc, n, dk),
            true,
        );
        gemm_tn(
            Mat::dense(&a, n, n),
            Mat::dense(uc, n, dv),
            MatMut::dense(dvc, n, dv),
            true,
        );
        for (u, r) in dkc.chunks_exact(dk).enumerate() {
            col[t0 + u] = dot(&kc[u * dk..(u + 1) * dk], r).to_f64();
        }
        // The state moves before the chunk.
        let all = T::from_f64((c_last - c_prev).exp());
        g.iter_mut().for_each(|x| *x *= all);
        hv.iter_mut().for_each(|x| *x *= all);
        wu.clear();
        wu.extend_from_slice(uc);
        for (t, r) in wu.chunks_exact_mut(dv).enumerate() {
            let wi = T::from_f64((cum(ctx, b, h, (ch.start + t) as isize) - c_prev).exp());
            r.iter_mut().for_each(|x| *x *= wi);
            axpy(&mut hv, wi * d.c[t0 + t], &qc[t * dk..(t + 1) * dk]);
        }
        gemm_tn(
            Mat::dense(qc, n, dk),
            Mat::dense(&wu, n, dv),
            MatMut::dense(&mut g, dk, dv),
            true,
        );
    }
    (d_k, d_v, col, g, hv)
}

/// Sends `msg` to the owner of the range it is for, or keeps it when that
/// is this rank.
fn send_or_keep<T: Real>(
    ep: &Endpoint<StateMsg<T>>,
    owner: usize,
    msg: StateMsg<T>,
    pending: &mut Vec<StateMsg<T>>,
) -> Result<()> {
    if owner == ep.rank {
        pending.push(msg);
        Ok(())
    } else {
        ep.send_to(owner, msg)
    }
}

pub(super) fn rank_main<T: Real>(
    ctx: &Ctx<'_, T>,
    sched: &RingSchedule,
    qside: &QSide<T>,
    ep: Endpoint<StateMsg<T>>,
) -> Result<RankGrads<T>> {
    if !matches!(ctx.spec.score, Score::Dot { .. }) {
        return Err(RuntimeError::Internal(
            "the chunkwise backward needs dot scores".into(),
        ));
    }
    let order = sched.ranges_in_order();
    let owner_of = |start: usize| {
        order
            .iter()
            .find(|(r, _)| r.start == start)
            .map(|(_, o)| *o)
            .ok_or_else(|| RuntimeError::Internal(format!("no rank owns position {start}")))
    };
    let owner_ending = |end: usize| {
        order
            .iter()
            .find(|(r, _)| r.end == end)
            .map(|(_, o)| *o)
            .ok_or_else(|| RuntimeError::Internal(format!("no rank's range ends at {end}")))
    };
    let ranges = qside.ranges.clone();
    let (bh, dk, dv, nq) = (ctx.batch * ctx.heads, ctx.dk, ctx.dv, qside.nq);
    let group = ctx.heads / ctx.kv_heads;
    let offs: Vec<usize> = ranges
        .iter()
        .scan(0, |acc, r| {
            let o = *acc;
            *acc += r.len();
            Some(o)
        })
        .collect();
    let gated = matches!(ctx.spec.decay, Decay::Gate { .. });
    let mut dq = written(bh * nq * dk, T::ZERO);
    let mut drow = vec![0.0f64; if gated { bh * nq } else { 0 }];
    let mut pending = Vec::new();
    let data: Vec<Vec<RangeData<T>>> = ranges
        .iter()
        .zip(&offs)
        .map(|(r, &off)| {
            ctx.pool.install(|| {
                (0..bh)
                    .into_par_iter()
                    .map(|x| range_data(ctx, qside, x, r, off))
                    .collect()
            })
        })
        .collect();

    // Forward states, in sequence order.
    for (ri, range) in ranges.iter().enumerate() {
        let prefix = if range.start == 0 {
            None
        } else {
            Some(recv_for(&ep, &mut pending, range.start, true)?)
        };
        let outs: Vec<_> = ctx.pool.install(|| {
            (0..bh)
                .into_par_iter()
                .map(|x| {
                    let (s, z) = StateMsg::part(prefix.as_ref(), x, dk, dv);
                    forward_sweep(ctx, x / ctx.heads, x % ctx.heads, range, &data[ri][x], s, z)
                })
                .collect()
        });
        let mut next = StateMsg::empty(range.end, true, bh, dk, dv);
        for (x, (dqx, row, s, z)) in outs.into_iter().enumerate() {
            let row0 = x * nq + offs[ri];
            dq[row0 * dk..(row0 + range.len()) * dk].copy_from_slice(&dqx);
            if gated {
                drow[row0..row0 + range.len()].copy_from_slice(&row);
            }
            next.s.extend(s);
            next.z.extend(z);
        }
        if range.end < ctx.seq {
            send_or_keep(&ep, owner_of(range.end)?, next, &mut pending)?;
        }
    }

    // Backward states, in reverse sequence order.
    let n = nq;
    let bkv = ctx.batch * ctx.kv_heads;
    let mut home = BwdShard {
        kv: KvShard {
            ranges: ranges.clone(),
            offsets: offs.clone(),
            n,
            k: Vec::new(),
            v: Vec::new(),
            pairs: None,
        },
        dk: written(bkv * n * dk, T::ZERO),
        dv: written(bkv * n * dv, T::ZERO),
        dcol: vec![0.0; if gated { bkv * n * group } else { 0 }],
    };
    for (ri, range) in ranges.iter().enumerate().rev() {
        let suffix = if range.end == ctx.seq {
            None
        } else {
            Some(recv_for(&ep, &mut pending, range.end, false)?)
        };
        let outs: Vec<_> = ctx.pool.install(|| {
            (0..bh)
                .into_par_iter()
                .map(|x| {
                    let (g, hv) = StateMsg::part(suffix.as_ref(), x, dk, dv);
                    backward_sweep(
                        ctx,
                        x / ctx.heads,
                        x % ctx.heads,
                        range,
                        &data[ri][x],
                        g,
                        hv,
                    )
                })
                .collect()
        });
        let mut prev = StateMsg::empty(range.start, false, bh, dk, dv);
        for (x, (d_k, d_v, col, g, hv)) in outs.into_iter().enumerate() {
            let (b, h) = (x / ctx.heads, x % ctx.heads);
            let (kvh, gi) = (h / group, h % group);
            let y = b * ctx.kv_heads + kvh;
            let base = y * n + offs[ri];
            for (a, &v) in home.dk[base * dk..(base + range.len()) * dk]
                .iter_mut()
                .zip(&d_k)
            {
                *a += v;
            }
            for (a, &v) in home.dv[base * dv..(base + range.len()) * dv]
                .iter_mut()
                .zip(&d_v)
            {
                *a += v;
            }
            if gated {
                for (t, &c) in col.iter().enumerate() {
                    home.dcol[(base + t) * group + gi] = -c;
                }
            }
            prev.s.extend(g);
            prev.z.extend(hv);
        }
        if range.start > 0 {
            send_or_keep(&ep, owner_ending(range.start)?, prev, &mut pending)?;
        }
    }
    Ok(RankGrads {
        ranges,
        dq,
        drow,
        home,
        partials: super::backward::empty_partials(ctx),
    })
}

/// The backward of a non-causal linear mixer (`mask = all`, no decay: the
/// forward's global-state path). Every pair is visible, so the states are
/// global sums: `S = sum_j K_j v_jᵀ`, `z = sum_j K_j` (keys) and `G = sum_i
/// qs_i u_iᵀ`, `h = sum_i c_i qs_i` (queries). Each rank sums its shard's
/// part and the parts go once around the ring (an all-reduce in `R - 1`
/// steps, as in the forward); then `dqs_i = S u_i + c_i z`, `dK_j = G v_j +
/// h`, `dv_j = Gᵀ K_j` for the rank's own positions.
pub(super) fn rank_main_global<T: Real>(
    ctx: &Ctx<'_, T>,
    qside: &QSide<T>,
    ep: Endpoint<StateMsg<T>>,
) -> Result<RankGrads<T>> {
    let ranges = qside.ranges.clone();
    let (bh, dk, dv, nq) = (ctx.batch * ctx.heads, ctx.dk, ctx.dv, qside.nq);
    let group = ctx.heads / ctx.kv_heads;
    let positions: Vec<usize> = ranges.iter().flat_map(|r| r.clone()).collect();
    // Per (batch, head): [S | G] (2 d_k d_v) and [z | h] (2 d_k) of this shard.
    let parts: Vec<(Vec<T>, Vec<T>)> = ctx.pool.install(|| {
        (0..bh)
            .into_par_iter()
            .map(|x| {
                let (b, h) = (x / ctx.heads, x % ctx.heads);
                let kvh = h / group;
                let mut s = vec![T::ZERO; 2 * dk * dv];
                let mut z = vec![T::ZERO; 2 * dk];
                let (mut k, mut v) = (vec![T::ZERO; dk], vec![T::ZERO; dv]);
                for (t, &pos) in positions.iter().enumerate() {
                    kv_rows(ctx, b, kvh, pos, &mut k, &mut v);
                    let (sk, sg) = s.split_at_mut(dk * dv);
                    for (row, &kd) in sk.chunks_exact_mut(dv).zip(&k) {
                        axpy(row, kd, &v);
                    }
                    axpy(&mut z[..dk], T::ONE, &k);
                    let row0 = x * nq + t;
                    let qi = &qside.qs[row0 * dk..(row0 + 1) * dk];
                    let ui = &qside.u[row0 * dv..(row0 + 1) * dv];
                    for (row, &qd) in sg.chunks_exact_mut(dv).zip(qi) {
                        axpy(row, qd, ui);
                    }
                    axpy(&mut z[dk..], -qside.big_d[row0], qi);
                }
                (s, z)
            })
            .collect()
    });
    let mine = StateMsg {
        pos: 0,
        forward: true,
        s: parts.iter().flat_map(|(s, _)| s.iter().copied()).collect(),
        z: parts.iter().flat_map(|(_, z)| z.iter().copied()).collect(),
    };
    drop(parts);
    let total = ep.all_reduce(mine, |t, part| {
        t.s.iter_mut().zip(&part.s).for_each(|(a, b)| *a += *b);
        t.z.iter_mut().zip(&part.z).for_each(|(a, b)| *a += *b);
    })?;
    let bkv = ctx.batch * ctx.kv_heads;
    let mut dq = written(bh * nq * dk, T::ZERO);
    let mut d_k = written(bkv * nq * dk, T::ZERO);
    let mut d_v = written(bkv * nq * dv, T::ZERO);
    let (mut k, mut v, mut su) = (vec![T::ZERO; dk], vec![T::ZERO; dv], vec![T::ZERO; dk]);
    for x in 0..bh {
        let (b, h) = (x / ctx.heads, x % ctx.heads);
        let y = b * ctx.kv_heads + h / group;
        let st = &total.s[x * 2 * dk * dv..(x + 1) * 2 * dk * dv];
        let zt = &total.z[x * 2 * dk..(x + 1) * 2 * dk];
        let (s, g) = st.split_at(dk * dv);
        let (z, hv) = zt.split_at(dk);
        for (t, &pos) in positions.iter().enumerate() {
            let row0 = x * nq + t;
            let ui = &qside.u[row0 * dv..(row0 + 1) * dv];
            let ci = -qside.big_d[row0];
            for (a, srow) in su.iter_mut().zip(s.chunks_exact(dv)) {
                *a = dot(srow, ui);
            }
            for ((o, &a), &zz) in dq[row0 * dk..(row0 + 1) * dk].iter_mut().zip(&su).zip(z) {
                *o = a + ci * zz;
            }
            kv_rows(ctx, b, h / group, pos, &mut k, &mut v);
            let base = y * nq + t;
            let dkj = &mut d_k[base * dk..(base + 1) * dk];
            for ((o, grow), &hh) in dkj.iter_mut().zip(g.chunks_exact(dv)).zip(hv) {
                *o += dot(grow, &v) + hh;
            }
            let dvj = &mut d_v[base * dv..(base + 1) * dv];
            for (grow, &kd) in g.chunks_exact(dv).zip(&k) {
                axpy(dvj, kd, grow);
            }
        }
    }
    let offsets = ranges
        .iter()
        .scan(0, |acc, r| {
            let o = *acc;
            *acc += r.len();
            Some(o)
        })
        .collect();
    Ok(RankGrads {
        ranges: ranges.clone(),
        dq,
        drow: Vec::new(),
        home: BwdShard {
            kv: KvShard {
                ranges,
                offsets,
                n: nq,
                k: Vec::new(),
                v: Vec::new(),
                pairs: None,
            },
            dk: d_k,
            dv: d_v,
            dcol: Vec::new(),
        },
        partials: super::backward::empty_partials(ctx),
    })
}
