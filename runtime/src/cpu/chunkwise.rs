//! The chunkwise state path for causal linear / retention / gated mixers
//! without bias or transform. Inside a shard range: chunks of `chunk`
//! positions, a quadratic product with the decay mask inside each chunk and a
//! `d_k x d_v` state (plus a `d_k` normaliser for `sum`) carried from chunk to
//! chunk. Across ranks only that state travels, in sequence order: a range
//! computes everything it can alone, waits for the state of all earlier
//! positions, applies it (decayed by its own gates), and passes on
//! `D_range * P + S_range`.

use std::ops::Range;

use mixc_codegen::plan::chunks;
use mixc_dsl::ir::{Decay, FeatureMap, Norm, Score};
use rayon::prelude::*;

use super::blocked::written;
use super::microkernel::{gemm, row_sum, Mat, MatMut};
use super::real::{axpy, dot, feature_row, scale, transpose, Real};
use super::{Ctx, RankOutput, RankStats};
use crate::error::{Result, RuntimeError};
use crate::ring::{wire, Endpoint, RingSchedule, Wire};

/// The state of every position before `start`, decayed to `start - 1`, for
/// every (batch, head): `s` is `[bh][d_k][d_v]`, `z` is `[bh][d_k]`.
#[derive(Clone)]
pub(super) struct PrefixState<T> {
    pub(super) start: usize,
    /// `[batch * heads][dk][dv]`.
    pub(super) s: Vec<T>,
    /// `[batch * heads][dk]`.
    pub(super) z: Vec<T>,
}

impl<T: Real> PrefixState<T> {
    /// Adds another rank's part (the ring all-reduce of the global state).
    fn add(&mut self, other: &Self) {
        self.s.iter_mut().zip(&other.s).for_each(|(a, b)| *a += *b);
        self.z.iter_mut().zip(&other.z).for_each(|(a, b)| *a += *b);
    }
}

impl<T: Real> Wire for PrefixState<T> {
    fn encode(&self, out: &mut Vec<u8>) {
        wire::put_usize(out, self.start);
        wire::put_slice(out, &self.s);
        wire::put_slice(out, &self.z);
    }
    fn decode(b: &mut &[u8]) -> Result<Self> {
        Ok(PrefixState {
            start: wire::get_usize(b)?,
            s: wire::get_vec(b)?,
            z: wire::get_vec(b)?,
        })
    }
}

/// One (batch, head)'s work on one range.
struct Local<T> {
    q: Vec<T>,
    o: Vec<T>,
    l: Vec<T>,
    s: Vec<T>,
    z: Vec<T>,
    /// `cl[t]` = sum of log gamma over the first `t` positions of the range.
    cl: Vec<f64>,
    pairs: u64,
}

pub(super) fn rank_main<T: Real>(
    ctx: &Ctx<'_, T>,
    sched: &RingSchedule,
    ep: Endpoint<PrefixState<T>>,
) -> Result<RankOutput<T>> {
    let order = sched.ranges_in_order();
    let mut stats = RankStats::default();
    let ranges = sched.shard(ep.rank).to_vec();
    let bh = ctx.batch * ctx.heads;
    let (dk, dv) = (ctx.dk, ctx.dv);
    // Laid out as the blocked path does: `[bh][position in shard order][dv]`.
    let n: usize = ranges.iter().map(|r| r.len()).sum();
    // One rank: rows go to the output as each (batch, head) finishes them
    // (`Ctx::direct`), so no buffer of every row is kept.
    let direct = ctx.direct.is_some() && sched.ranks == 1;
    let mut y_all = written(if direct { 0 } else { bh * n * dv }, T::ZERO);
    let mut stat = vec![0.0f64; if ctx.keep_stat { bh * n } else { 0 }];
    let mut off = 0;
    // A state this rank sent to itself (zigzag: the two middle chunks are adjacent).
    let mut kept: Option<PrefixState<T>> = None;
    let mut early: Vec<PrefixState<T>> = Vec::new();
    for range in &ranges {
        // The state before this range when this rank has it already (a
        // caller's state from before this call, `CpuMixer::run_state`, or
        // its own previous range's): the local pass starts from it.
        // Otherwise it comes from another rank after the local pass.
        let seed = if range.start == 0 {
            ctx.state_in.clone()
        } else if kept.as_ref().is_some_and(|p| p.start == range.start) {
            kept.take()
        } else {
            None
        };
        let later = seed.is_none() && range.start != 0;
        // Nothing to add afterwards: each (batch, head) finishes its rows
        // at once and keeps neither its queries nor its outputs.
        let stream = direct && !later;
        let mut locals: Vec<Local<T>> = ctx.pool.install(|| {
            (0..bh)
                .into_par_iter()
                .map(|x| {
                    let before = match &seed {
                        Some(p) => Before::Seed(
                            &p.s[x * dk * dv..(x + 1) * dk * dv],
                            &p.z[x * dk..(x + 1) * dk],
                        ),
                        None if later => Before::Later,
                        None => Before::Nothing,
                    };
                    let (b, h) = (x / ctx.heads, x % ctx.heads);
                    let mut loc = local_pass(ctx, b, h, range.clone(), before);
                    if stream {
                        finish_local(ctx, x, range.start, &mut loc, None);
                        loc.o = Vec::new();
                    }
                    loc
                })
                .collect()
        });
        stats.pairs += locals.iter().map(|l| l.pairs).sum::<u64>();
        stats.steps_computed += 1;
        let prefix = if later {
            Some(recv_for(&ep, range.start, &mut early)?)
        } else {
            None
        };
        if let Some(p) = &prefix {
            ctx.pool.install(|| {
                locals.par_iter_mut().enumerate().for_each(|(x, loc)| {
                    apply_prefix(
                        ctx,
                        loc,
                        &p.s[x * dk * dv..(x + 1) * dk * dv],
                        &p.z[x * dk..(x + 1) * dk],
                    )
                })
            });
        }
        let keep_final = range.end == sched.seq && ctx.state_out.is_some();
        if range.end < sched.seq || keep_final {
            let mut next = PrefixState {
                start: range.end,
                s: vec![T::ZERO; bh * dk * dv],
                z: vec![T::ZERO; bh * dk],
            };
            for (x, loc) in locals.iter().enumerate() {
                let s = &mut next.s[x * dk * dv..(x + 1) * dk * dv];
                let z = &mut next.z[x * dk..(x + 1) * dk];
                let total = T::from_f64(loc.cl[range.len()].exp());
                // Decay the incoming state across this range, then add the
                // range's own (a seeded pass's state holds both already).
                if let Some(p) = &prefix {
                    for (a, b) in s.iter_mut().zip(&p.s[x * dk * dv..(x + 1) * dk * dv]) {
                        *a = total * *b;
                    }
                    for (a, b) in z.iter_mut().zip(&p.z[x * dk..(x + 1) * dk]) {
                        *a = total * *b;
                    }
                }
                s.iter_mut().zip(&loc.s).for_each(|(a, b)| *a += *b);
                z.iter_mut().zip(&loc.z).for_each(|(a, b)| *a += *b);
            }
            if keep_final {
                if let Some(out) = &ctx.state_out {
                    *out.lock().unwrap_or_else(|e| e.into_inner()) = Some(next);
                }
            } else {
                let owner = order
                    .iter()
                    .find(|(r, _)| r.start == range.end)
                    .map(|(_, o)| *o)
                    .ok_or_else(|| {
                        RuntimeError::Invalid(format!("no rank owns position {}", range.end))
                    })?;
                if owner == ep.rank {
                    kept = Some(next);
                } else {
                    ep.send_to(owner, next)?;
                }
            }
        }
        if !stream {
            for (x, loc) in locals.iter_mut().enumerate() {
                let dst = (!direct)
                    .then(|| &mut y_all[(x * n + off) * dv..(x * n + off + range.len()) * dv]);
                finish_local(ctx, x, range.start, loc, dst);
            }
        }
        if ctx.keep_stat && matches!(ctx.spec.norm, Norm::Sum { .. }) {
            for (x, loc) in locals.iter().enumerate() {
                for (d, &l) in stat[x * n + off..].iter_mut().zip(&loc.l[..range.len()]) {
                    *d = l.to_f64();
                }
            }
        }
        off += range.len();
    }
    stats.direct = direct;
    Ok(RankOutput {
        ranges,
        y: y_all,
        stat,
        stats,
    })
}

/// Receives the state for `start`, keeping any that arrive for later ranges.
fn recv_for<T: Real>(
    ep: &Endpoint<PrefixState<T>>,
    start: usize,
    early: &mut Vec<PrefixState<T>>,
) -> Result<PrefixState<T>> {
    if let Some(k) = early.iter().position(|p| p.start == start) {
        return Ok(early.swap_remove(k));
    }
    loop {
        let p = ep.recv()?;
        if p.start == start {
            return Ok(p);
        }
        early.push(p);
    }
}

/// Log of gamma at global position `pos` for head `h` (0 without decay).
fn log_gamma<T: Real>(ctx: &Ctx<'_, T>, b: usize, h: usize, pos: usize) -> f64 {
    match &ctx.spec.decay {
        Decay::None => 0.0,
        Decay::PerHead(_) => ctx.log_gamma[h],
        Decay::Gate { input } => {
            let g = &ctx.inputs.extra[input.as_str()];
            g.get_clamped(&[b as i64, pos as i64, h as i64]).ln()
        }
    }
}

/// What a range's local pass knows of the positions before it.
enum Before<'p, T> {
    /// Nothing comes before (position 0, no earlier state).
    Nothing,
    /// Their state (`s`, `z`, decayed to the range's first position - 1):
    /// the pass starts from it.
    Seed(&'p [T], &'p [T]),
    /// Their state arrives after the pass ([`apply_prefix`]), which then
    /// needs the range's queries: the pass keeps them.
    Later,
}

/// Everything one (batch, head) can compute on `range` with what it knows
/// of the positions before it (`before`): intra-chunk products, inter-chunk
/// state within the range (from a seed's state, if given), the range state.
/// Per chunk `c` (rows `t`, keys `u`, all matrix products):
/// `O_c = (w Q_c) S + (Q_c K_cᵀ ⊙ D) V_c`, then `S = d_c S + K_cᵀ (w' V_c)`,
/// with `w`, `w'`, `D`, `d_c` the decays from the chunk start, to the chunk
/// end, between pairs, and across the chunk (all 1 without decay).
fn local_pass<T: Real>(
    ctx: &Ctx<'_, T>,
    b: usize,
    h: usize,
    range: Range<usize>,
    before: Before<'_, T>,
) -> Local<T> {
    let (dk, dv, n) = (ctx.dk, ctx.dv, range.len());
    let kvh = ctx.spec.kv_head_of(h as u32) as usize;
    let Score::Dot {
        q_map,
        k_map,
        scale: qk_scale,
    } = &ctx.spec.score
    else {
        unreachable!("the chunkwise path is only chosen for dot scores");
    };
    // Queries, keys and values are gathered chunk by chunk (below), so a
    // range holds no full-length copy of them; the queries stay only for a
    // prefix that arrives later.
    let keep_q = matches!(before, Before::Later);
    let mut q = vec![T::ZERO; if keep_q { n * dk } else { 0 }];
    let mut cl = vec![0.0f64; n + 1];
    for (t, pos) in range.clone().enumerate() {
        cl[t + 1] = cl[t] + log_gamma(ctx, b, h, pos);
    }
    let gather_q = |c: &Range<usize>, qc: &mut [T]| {
        let mut widened = Vec::new();
        for (u, pos) in c.clone().map(|t| range.start + t).enumerate() {
            feature_row(
                *q_map,
                ctx.q.row(ctx.q_at(b, pos, h), dk, &mut widened),
                T::from_f64(*qk_scale),
                &mut qc[u * dk..(u + 1) * dk],
            );
        }
    };
    let gather = |c: &Range<usize>, kc: &mut [T], vc: &mut [T]| {
        let mut widened = Vec::new();
        for (u, pos) in c.clone().map(|t| range.start + t).enumerate() {
            feature_row(
                *k_map,
                ctx.k.row(ctx.k_at(b, pos, kvh), dk, &mut widened),
                T::ONE,
                &mut kc[u * dk..(u + 1) * dk],
            );
            feature_row(
                FeatureMap::Identity,
                ctx.v.row(ctx.v_at(b, pos, kvh), dv, &mut widened),
                T::ONE,
                &mut vc[u * dv..(u + 1) * dv],
            );
        }
    };
    let decays = ctx.has_decay;
    // A fixed per-head gamma makes the pair decay a power of the distance:
    // one table instead of an `exp` per pair.
    let powers: Option<Vec<T>> = match &ctx.spec.decay {
        Decay::PerHead(_) => Some(
            (0..ctx.chunk.min(n.max(1)))
                .map(|x| T::from_f64((ctx.log_gamma[h] * x as f64).exp()))
                .collect(),
        ),
        _ => None,
    };
    let pair_decay = |t: usize, u: usize| match &powers {
        Some(p) => p[t - u],
        None => T::from_f64((cl[t + 1] - cl[u + 1]).exp()),
    };
    // Products accumulate into `o` and `l`: written now, not lazily zeroed
    // (see `written`).
    let mut o = written(n * dv, T::ZERO);
    let mut l = written(n, T::ZERO);
    let (mut s, mut z, seeded) = match before {
        Before::Seed(ps, pz) => (ps.to_vec(), pz.to_vec(), true),
        _ => (vec![T::ZERO; dk * dv], vec![T::ZERO; dk], false),
    };
    let mut pairs = 0u64;
    let cmax = ctx.chunk.min(n);
    let mut qbuf = vec![T::ZERO; if keep_q { 0 } else { cmax * dk }];
    // Chunk scratch: K, V, Kᵀ, the pair matrix, decayed queries and values.
    let (mut kbuf, mut vbuf) = (vec![T::ZERO; cmax * dk], vec![T::ZERO; cmax * dv]);
    let mut kt = vec![T::ZERO; dk * cmax];
    let mut a = vec![T::ZERO; cmax * cmax];
    let mut qw = vec![T::ZERO; cmax * dk];
    let mut vw = vec![T::ZERO; cmax * dv];
    for c in chunks(0..n, ctx.chunk) {
        let (c0, nc) = (c.start, c.len());
        let qc = if keep_q {
            &mut q[c0 * dk..c.end * dk]
        } else {
            &mut qbuf[..nc * dk]
        };
        gather_q(&c, qc);
        let qc = &*qc;
        let (kc, vc) = (&mut kbuf[..nc * dk], &mut vbuf[..nc * dv]);
        gather(&c, kc, vc);
        let (kc, vc) = (&*kc, &*vc);
        let oc = &mut o[c0 * dv..c.end * dv];
        let lc = &mut l[c.clone()];
        // Earlier chunks of this range (and a seed's positions), through
        // the state.
        if c0 > 0 || seeded {
            let qw = &mut qw[..nc * dk];
            qw.copy_from_slice(qc);
            if decays {
                for (t, row) in qw.chunks_exact_mut(dk).enumerate() {
                    scale(row, T::from_f64((cl[c0 + t + 1] - cl[c0]).exp()));
                }
            }
            gemm(
                Mat::dense(qw, nc, dk),
                Mat::dense(&s, dk, dv),
                MatMut::dense(oc, nc, dv),
                true,
            );
            for (lt, row) in lc.iter_mut().zip(qw.chunks_exact(dk)) {
                *lt += dot(row, &z);
            }
        }
        // This chunk, directly: causal, decayed pair weights.
        let kt = &mut kt[..dk * nc];
        transpose(kc, nc, dk, kt);
        let a = &mut a[..nc * nc];
        gemm(
            Mat::dense(qc, nc, dk),
            Mat::dense(kt, dk, nc),
            MatMut::dense(a, nc, nc),
            false,
        );
        for (t, row) in a.chunks_exact_mut(nc).enumerate() {
            row[t + 1..].fill(T::ZERO);
            if decays {
                for (u, x) in row[..=t].iter_mut().enumerate() {
                    *x *= pair_decay(c0 + t, c0 + u);
                }
            }
            lc[t] += row_sum(row);
        }
        gemm(
            Mat::dense(a, nc, nc),
            Mat::dense(vc, nc, dv),
            MatMut::dense(oc, nc, dv),
            true,
        );
        pairs += (nc * (nc + 1) / 2) as u64;
        // Fold the chunk into the state, decayed to the chunk's last position.
        let vw = &mut vw[..nc * dv];
        vw.copy_from_slice(vc);
        if decays {
            let across = T::from_f64((cl[c.end] - cl[c0]).exp());
            scale(&mut s, across);
            scale(&mut z, across);
            for (u, row) in vw.chunks_exact_mut(dv).enumerate() {
                scale(row, T::from_f64((cl[c.end] - cl[c0 + u + 1]).exp()));
            }
        }
        gemm(
            Mat::dense(kt, dk, nc),
            Mat::dense(vw, nc, dv),
            MatMut::dense(&mut s, dk, dv),
            true,
        );
        for (u, krow) in kc.chunks_exact(dk).enumerate() {
            let w = if decays {
                T::from_f64((cl[c.end] - cl[c0 + u + 1]).exp())
            } else {
                T::ONE
            };
            axpy(&mut z, w, krow);
        }
    }
    Local {
        q,
        o,
        l,
        s,
        z,
        cl,
        pairs,
    }
}

/// Adds the contribution of every position before the range:
/// `o += (w Q) S_prefix`, `l += (w Q) z_prefix`, `w_t` the decay from the
/// range start to `t`. Rows go in chunks so the scratch stays small.
fn apply_prefix<T: Real>(ctx: &Ctx<'_, T>, loc: &mut Local<T>, ps: &[T], pz: &[T]) {
    let (dk, dv, n) = (ctx.dk, ctx.dv, loc.l.len());
    let mut qw = vec![T::ZERO; ctx.chunk.min(n) * dk];
    for c in chunks(0..n, ctx.chunk) {
        let nc = c.len();
        let qw = &mut qw[..nc * dk];
        qw.copy_from_slice(&loc.q[c.start * dk..c.end * dk]);
        if ctx.has_decay {
            for (t, row) in c.clone().zip(qw.chunks_exact_mut(dk)) {
                scale(row, T::from_f64(loc.cl[t + 1].exp()));
            }
        }
        gemm(
            Mat::dense(qw, nc, dk),
            Mat::dense(ps, dk, dv),
            MatMut::dense(&mut loc.o[c.start * dv..c.end * dv], nc, dv),
            true,
        );
        for (lt, row) in loc.l[c].iter_mut().zip(qw.chunks_exact(dk)) {
            *lt += dot(row, pz);
        }
    }
}

/// Normalises one (batch, head)'s rows of a range (`x = b * heads + h`,
/// first position `start`) and writes them into `dst` (`len x dv`), or,
/// without one, to the output directly (`Ctx::direct`).
fn finish_local<T: Real>(
    ctx: &Ctx<'_, T>,
    x: usize,
    start: usize,
    loc: &mut Local<T>,
    mut dst: Option<&mut [T]>,
) {
    let dv = ctx.dv;
    let (b, h) = (x / ctx.heads, x % ctx.heads);
    let rows = loc.o.chunks_exact_mut(dv).zip(&loc.l).enumerate();
    for (t, (row, &l)) in rows {
        if let Norm::Sum { eps } = ctx.spec.norm {
            scale(row, T::ONE / (l + T::from_f64(eps)));
        }
        match (dst.as_deref_mut(), ctx.direct) {
            (Some(dst), _) => dst[t * dv..(t + 1) * dv].copy_from_slice(row),
            (None, Some(sink)) => sink(b, start + t - ctx.q_offset, h, row),
            (None, None) => unreachable!("rows with nowhere to go"),
        }
    }
}

/// Non-causal linear mixers (`mask = all`, no decay): every query reads the
/// same state `S = sum_j psi(k_j) v_j^T` (and `z = sum_j psi(k_j)`). Each rank
/// sums its shard; the partial states go once around the ring and every rank
/// adds what passes through (an all-reduce in `R - 1` steps).
pub(super) fn rank_main_global<T: Real>(
    ctx: &Ctx<'_, T>,
    sched: &RingSchedule,
    ep: Endpoint<PrefixState<T>>,
) -> Result<RankOutput<T>> {
    let ranges = sched.shard(ep.rank).to_vec();
    let n: usize = ranges.iter().map(|r| r.len()).sum();
    let (bh, dk, dv) = (ctx.batch * ctx.heads, ctx.dk, ctx.dv);
    let Score::Dot {
        q_map,
        k_map,
        scale: qk_scale,
    } = &ctx.spec.score
    else {
        unreachable!("the state path is only chosen for dot scores");
    };
    let positions = || ranges.iter().flat_map(|r| r.clone());
    // Positions go in chunks: `S += K_cᵀ V_c` as one product per chunk.
    let step = ctx.chunk.min(n.max(1));
    let states: Vec<(Vec<T>, Vec<T>)> = ctx.pool.install(|| {
        (0..bh)
            .into_par_iter()
            .map(|x| {
                let (b, h) = (x / ctx.heads, x % ctx.heads);
                let kvh = ctx.spec.kv_head_of(h as u32) as usize;
                let mut s = vec![T::ZERO; dk * dv];
                let mut z = vec![T::ZERO; dk];
                let mut kt = vec![T::ZERO; dk * step];
                let mut krow = vec![T::ZERO; dk];
                let mut widened = Vec::new();
                let mut v = vec![T::ZERO; step * dv];
                let all: Vec<usize> = positions().collect();
                for ch in all.chunks(step) {
                    let nc = ch.len();
                    for (u, &pos) in ch.iter().enumerate() {
                        let vrow = &mut v[u * dv..(u + 1) * dv];
                        ctx.v
                            .map_into(ctx.v_at(b, pos, kvh), vrow, |y| T::from_f64(y as f64));
                        let k = ctx.k.row(ctx.k_at(b, pos, kvh), dk, &mut widened);
                        feature_row(*k_map, k, T::ONE, &mut krow);
                        for (d, (zd, &kd)) in z.iter_mut().zip(&krow).enumerate() {
                            kt[d * nc + u] = kd;
                            *zd += kd;
                        }
                    }
                    gemm(
                        Mat::dense(&kt[..dk * nc], dk, nc),
                        Mat::dense(&v[..nc * dv], nc, dv),
                        MatMut::dense(&mut s, dk, dv),
                        true,
                    );
                }
                (s, z)
            })
            .collect()
    });
    let mine = PrefixState {
        start: ep.rank,
        s: states.iter().flat_map(|(s, _)| s.iter().copied()).collect(),
        z: states.iter().flat_map(|(_, z)| z.iter().copied()).collect(),
    };
    drop(states);
    let total = ep.all_reduce(mine, PrefixState::add)?;
    let mut y = vec![T::ZERO; bh * n * dv];
    let mut stat = vec![0.0f64; bh * n];
    ctx.pool.install(|| {
        y.par_chunks_mut(n * dv)
            .zip(stat.par_chunks_mut(n))
            .enumerate()
            .for_each(|(x, (yx, sx))| {
                let (b, h) = (x / ctx.heads, x % ctx.heads);
                let (s, z) = (
                    &total.s[x * dk * dv..(x + 1) * dk * dv],
                    &total.z[x * dk..(x + 1) * dk],
                );
                let all: Vec<usize> = positions().collect();
                let mut q = vec![T::ZERO; step * dk];
                let mut widened = Vec::new();
                for ((ch, yc), sc) in all
                    .chunks(step)
                    .zip(yx.chunks_mut(step * dv))
                    .zip(sx.chunks_mut(step))
                {
                    let nc = ch.len();
                    for (t, &pos) in ch.iter().enumerate() {
                        feature_row(
                            *q_map,
                            ctx.q.row(ctx.q_at(b, pos, h), dk, &mut widened),
                            T::from_f64(*qk_scale),
                            &mut q[t * dk..(t + 1) * dk],
                        );
                    }
                    gemm(
                        Mat::dense(&q[..nc * dk], nc, dk),
                        Mat::dense(s, dk, dv),
                        MatMut::dense(yc, nc, dv),
                        false,
                    );
                    if let Norm::Sum { eps } = ctx.spec.norm {
                        for ((row, qt), st) in yc
                            .chunks_exact_mut(dv)
                            .zip(q.chunks_exact(dk))
                            .zip(sc.iter_mut())
                        {
                            let l = dot(qt, z);
                            *st = l.to_f64();
                            let inv = T::ONE / (l + T::from_f64(eps));
                            row.iter_mut().for_each(|x| *x *= inv);
                        }
                    }
                }
            })
    });
    Ok(RankOutput {
        ranges,
        y,
        stat,
        stats: RankStats {
            // One state update and one state read per owned position.
            pairs: (bh * n) as u64,
            steps_computed: sched.ranks as u64,
            ..RankStats::default()
        },
    })
}
