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
use mixc_dsl::ir::{Decay, Norm, Score};
use rayon::prelude::*;

use super::real::{axpy, dot, scale, Real};
use super::{Ctx, RankOutput, RankStats};
use crate::error::{Result, RuntimeError};
use crate::ring::{Endpoint, RingSchedule};

/// The state of every position before `start`, decayed to `start - 1`, for
/// every (batch, head): `s` is `[bh][d_k][d_v]`, `z` is `[bh][d_k]`.
pub(super) struct PrefixState<T> {
    start: usize,
    s: Vec<T>,
    z: Vec<T>,
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
    let mut y_all = Vec::new();
    let ranges = sched.shard(ep.rank).to_vec();
    let bh = ctx.batch * ctx.heads;
    let (dk, dv) = (ctx.dk, ctx.dv);
    // A state this rank sent to itself (zigzag: the two middle chunks are adjacent).
    let mut kept: Option<PrefixState<T>> = None;
    let mut early: Vec<PrefixState<T>> = Vec::new();
    let mut per_range: Vec<Vec<T>> = Vec::new();
    for range in &ranges {
        let mut locals: Vec<Local<T>> = ctx.pool.install(|| {
            (0..bh)
                .into_par_iter()
                .map(|x| local_pass(ctx, x / ctx.heads, x % ctx.heads, range.clone()))
                .collect()
        });
        stats.pairs += locals.iter().map(|l| l.pairs).sum::<u64>();
        stats.steps_computed += 1;
        let prefix = if range.start == 0 {
            None
        } else if kept.as_ref().is_some_and(|p| p.start == range.start) {
            kept.take()
        } else {
            Some(recv_for(&ep, range.start, &mut early)?)
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
        if range.end < sched.seq {
            let mut next = PrefixState {
                start: range.end,
                s: vec![T::ZERO; bh * dk * dv],
                z: vec![T::ZERO; bh * dk],
            };
            for (x, loc) in locals.iter().enumerate() {
                let s = &mut next.s[x * dk * dv..(x + 1) * dk * dv];
                let z = &mut next.z[x * dk..(x + 1) * dk];
                let total = T::from_f64(loc.cl[range.len()].exp());
                // Decay the incoming state across this range, then add the range's own.
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
        per_range.push(finish(ctx, &locals, range.len()));
    }
    // Lay out as the blocked path does: `[bh][position in shard order][dv]`.
    let n: usize = ranges.iter().map(|r| r.len()).sum();
    y_all.resize(bh * n * dv, T::ZERO);
    let mut off = 0;
    for (range, y) in ranges.iter().zip(&per_range) {
        let len = range.len();
        for x in 0..bh {
            let dst = &mut y_all[(x * n + off) * dv..(x * n + off + len) * dv];
            dst.copy_from_slice(&y[x * len * dv..(x + 1) * len * dv]);
        }
        off += len;
    }
    Ok(RankOutput {
        ranges,
        y: y_all,
        stats,
    })
}

/// Receives the state for `start`, keeping any that arrive for later ranges.
fn recv_for<T>(
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

/// Everything one (batch, head) can compute on `range` without the prefix:
/// intra-chunk products, inter-chunk state within the range, the range state.
fn local_pass<T: Real>(ctx: &Ctx<'_, T>, b: usize, h: usize, range: Range<usize>) -> Local<T> {
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
    let mut q = vec![T::ZERO; n * dk];
    let mut k = vec![T::ZERO; n * dk];
    let mut v = vec![T::ZERO; n * dv];
    let mut cl = vec![0.0f64; n + 1];
    for (t, pos) in range.clone().enumerate() {
        let (qo, ko) = (
            ctx.inputs.q.offset(&[b, pos, h, 0]),
            ctx.inputs.k.offset(&[b, pos, kvh, 0]),
        );
        for d in 0..dk {
            q[t * dk + d] = T::from_f64(q_map.apply(ctx.inputs.q.data[qo + d] as f64) * qk_scale);
            k[t * dk + d] = T::from_f64(k_map.apply(ctx.inputs.k.data[ko + d] as f64));
        }
        let vo = ctx.inputs.v.offset(&[b, pos, kvh, 0]);
        for d in 0..dv {
            v[t * dv + d] = T::from_f64(ctx.inputs.v.data[vo + d] as f64);
        }
        cl[t + 1] = cl[t] + log_gamma(ctx, b, h, pos);
    }
    let decays = ctx.has_decay;
    let mut o = vec![T::ZERO; n * dv];
    let mut l = vec![T::ZERO; n];
    let mut s = vec![T::ZERO; dk * dv];
    let mut z = vec![T::ZERO; dk];
    let mut pairs = 0u64;
    for c in chunks(0..n, ctx.chunk) {
        let c0 = c.start;
        for t in c.clone() {
            let qt = &q[t * dk..(t + 1) * dk];
            let ot = &mut o[t * dv..(t + 1) * dv];
            // Earlier chunks of this range, through the state.
            if c0 > 0 {
                let w = if decays {
                    T::from_f64((cl[t + 1] - cl[c0]).exp())
                } else {
                    T::ONE
                };
                for d in 0..dk {
                    axpy(ot, w * qt[d], &s[d * dv..(d + 1) * dv]);
                }
                l[t] += w * dot(qt, &z);
            }
            // This chunk, directly.
            for u in c0..=t {
                let mut a = dot(qt, &k[u * dk..(u + 1) * dk]);
                if decays {
                    a *= T::from_f64((cl[t + 1] - cl[u + 1]).exp());
                }
                l[t] += a;
                axpy(ot, a, &v[u * dv..(u + 1) * dv]);
            }
            pairs += (t - c0 + 1) as u64;
        }
        // Fold the chunk into the state, decayed to the chunk's last position.
        if decays {
            scale(&mut s, T::from_f64((cl[c.end] - cl[c0]).exp()));
            scale(&mut z, T::from_f64((cl[c.end] - cl[c0]).exp()));
        }
        for u in c.clone() {
            let w = if decays {
                T::from_f64((cl[c.end] - cl[u + 1]).exp())
            } else {
                T::ONE
            };
            let vu = &v[u * dv..(u + 1) * dv];
            for d in 0..dk {
                let kd = w * k[u * dk + d];
                axpy(&mut s[d * dv..(d + 1) * dv], kd, vu);
                z[d] += kd;
            }
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

/// Adds the contribution of every position before the range.
fn apply_prefix<T: Real>(ctx: &Ctx<'_, T>, loc: &mut Local<T>, ps: &[T], pz: &[T]) {
    let (dk, dv) = (ctx.dk, ctx.dv);
    for t in 0..loc.l.len() {
        let w = if ctx.has_decay {
            T::from_f64(loc.cl[t + 1].exp())
        } else {
            T::ONE
        };
        let qt = &loc.q[t * dk..(t + 1) * dk];
        let ot = &mut loc.o[t * dv..(t + 1) * dv];
        for d in 0..dk {
            axpy(ot, w * qt[d], &ps[d * dv..(d + 1) * dv]);
        }
        loc.l[t] += w * dot(qt, pz);
    }
}

/// Normalised outputs of one range, `[bh][position][dv]`.
fn finish<T: Real>(ctx: &Ctx<'_, T>, locals: &[Local<T>], n: usize) -> Vec<T> {
    let dv = ctx.dv;
    let mut y = Vec::with_capacity(locals.len() * n * dv);
    for loc in locals {
        for t in 0..n {
            let row = &loc.o[t * dv..(t + 1) * dv];
            match ctx.spec.norm {
                Norm::Sum { eps } => {
                    let inv = T::ONE / (loc.l[t] + T::from_f64(eps));
                    y.extend(row.iter().map(|&x| x * inv));
                }
                _ => y.extend_from_slice(row),
            }
        }
    }
    y
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
    let states: Vec<(Vec<T>, Vec<T>)> = ctx.pool.install(|| {
        (0..bh)
            .into_par_iter()
            .map(|x| {
                let (b, h) = (x / ctx.heads, x % ctx.heads);
                let kvh = ctx.spec.kv_head_of(h as u32) as usize;
                let mut s = vec![T::ZERO; dk * dv];
                let mut z = vec![T::ZERO; dk];
                let mut v = vec![T::ZERO; dv];
                for pos in positions() {
                    let (ko, vo) = (
                        ctx.inputs.k.offset(&[b, pos, kvh, 0]),
                        ctx.inputs.v.offset(&[b, pos, kvh, 0]),
                    );
                    for (d, x) in v.iter_mut().enumerate() {
                        *x = T::from_f64(ctx.inputs.v.data[vo + d] as f64);
                    }
                    for d in 0..dk {
                        let kd = T::from_f64(k_map.apply(ctx.inputs.k.data[ko + d] as f64));
                        axpy(&mut s[d * dv..(d + 1) * dv], kd, &v);
                        z[d] += kd;
                    }
                }
                (s, z)
            })
            .collect()
    });
    let mut total = PrefixState {
        start: ep.rank,
        s: states.iter().flat_map(|(s, _)| s.iter().copied()).collect(),
        z: states.iter().flat_map(|(_, z)| z.iter().copied()).collect(),
    };
    drop(states);
    let mut held = PrefixState {
        start: total.start,
        s: total.s.clone(),
        z: total.z.clone(),
    };
    for _ in 1..sched.ranks {
        ep.send_next(held)?;
        held = ep.recv()?;
        total.s.iter_mut().zip(&held.s).for_each(|(a, b)| *a += *b);
        total.z.iter_mut().zip(&held.z).for_each(|(a, b)| *a += *b);
    }
    let mut y = vec![T::ZERO; bh * n * dv];
    ctx.pool.install(|| {
        y.par_chunks_mut(n * dv).enumerate().for_each(|(x, yx)| {
            let (b, h) = (x / ctx.heads, x % ctx.heads);
            let (s, z) = (
                &total.s[x * dk * dv..(x + 1) * dk * dv],
                &total.z[x * dk..(x + 1) * dk],
            );
            let mut q = vec![T::ZERO; dk];
            for (t, pos) in positions().enumerate() {
                let qo = ctx.inputs.q.offset(&[b, pos, h, 0]);
                for (d, x) in q.iter_mut().enumerate() {
                    *x = T::from_f64(q_map.apply(ctx.inputs.q.data[qo + d] as f64) * qk_scale);
                }
                let row = &mut yx[t * dv..(t + 1) * dv];
                for d in 0..dk {
                    axpy(row, q[d], &s[d * dv..(d + 1) * dv]);
                }
                if let Norm::Sum { eps } = ctx.spec.norm {
                    let inv = T::ONE / (dot(&q, z) + T::from_f64(eps));
                    row.iter_mut().for_each(|x| *x *= inv);
                }
            }
        })
    });
    Ok(RankOutput {
        ranges,
        y,
        stats: RankStats {
            // One state update and one state read per owned position.
            pairs: (bh * n) as u64,
            steps_computed: sched.ranks as u64,
            ..RankStats::default()
        },
    })
}
