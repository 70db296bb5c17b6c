//! The backward pass on the CPU, FlashAttention-2 style, on the forward's
//! block plan and ring schedule.
//!
//! Every rank keeps its queries with what the forward left for them: the
//! upstream gradient `do`, the output `o` and each row's statistic (the
//! log-sum-exp for softmax, the weight sum for sum), from which it forms
//! `u` (`do`, divided by `l + eps` under sum) and `D = u . o`. Key/value
//! shards travel the ring as in the forward, now with their gradient
//! accumulators `dk`, `dv` (and, for gated decay, the key side of the
//! cumulative log-gate gradient) riding along: after `R` steps each shard is
//! back home with every query's contribution (the ring-flash-attention
//! scheme). At each step a rank recomputes the weights of its query blocks
//! against the held shard tile by tile, as the [`BlockPlan`] says (Skip
//! tiles cost nothing, Full tiles test no mask), and
//!
//! ```text
//! p  = exp(a - lse)  (softmax)  |  a  (sum, none)
//! dv += pᵀ u,  dp = u vᵀ,  da = p (dp - D)  |  dp - D  |  dp
//! dt = da D(i,j),  ds = dt T'(s),  dq += ds k,  dk += dsᵀ q
//! ```
//!
//! with the chain rule through bias and transform tables (scatter-adds),
//! filter taps, and gates (`d log D(i,j) = da a` splits into a query-side
//! row sum and a key-side column sum of the cumulative log-gates, turned into
//! gate gradients once all ranks are done). Memory is O(seq * d): per-rank
//! buffers of shard size, tiles of `block_m x block_n`.
//!
//! Work inside a rank is split over (batch, kv head, key chunk) items, each
//! owning its keys' `dk` / `dv` outright (no atomics); every query head of
//! the kv group is handled by the same item, so GQA sums need no reduction.
//! Items split the keys into chunks only when there are fewer (batch, kv
//! head) pairs than workers; each chunk then keeps a private `dq`.

use std::collections::BTreeMap;
use std::ops::Range;

use mixc_codegen::plan::{BlockClass, BlockPlan, RowPlan};
use mixc_dsl::ir::{Decay, EvalEnv, FeatureMap, Norm, Score};
use mixc_dsl::Leaf;
use rayon::prelude::*;

use super::blocked::{offsets, written, KvShard};
use super::expr::{ExprScratch, FastExpr};
use super::microkernel::{gemm, gemm_tn, softmax_grad_cols, Mat, MatMut};
use super::real::{feature_row, Real};
use super::Ctx;
use crate::error::Result;
use crate::grad::{differentiable_inputs, Gradients};
use crate::ring::{wire, Endpoint, RingSchedule, Wire};
use crate::tensor::Tensor;

/// A key/value shard with its gradient accumulators, as it travels.
pub(super) struct BwdShard<T> {
    pub(super) kv: KvShard<T>,
    /// Gradient of `psi(k)`, `[batch * kv_heads][n][d_k]`.
    pub(super) dk: Vec<T>,
    /// `[batch * kv_heads][n][d_v]`.
    pub(super) dv: Vec<T>,
    /// Key side of the cumulative log-gate gradient, `[batch * kv_heads][n][group]`
    /// (gated decay only).
    pub(super) dcol: Vec<f64>,
}

impl<T: Real> Wire for BwdShard<T> {
    fn encode(&self, out: &mut Vec<u8>) {
        self.kv.encode(out);
        wire::put_slice(out, &self.dk);
        wire::put_slice(out, &self.dv);
        wire::put_slice(out, &self.dcol);
    }
    fn decode(b: &mut &[u8]) -> Result<Self> {
        Ok(BwdShard {
            kv: KvShard::decode(b)?,
            dk: wire::get_vec(b)?,
            dv: wire::get_vec(b)?,
            dcol: wire::get_vec(b)?,
        })
    }
}

/// Gradients of inputs read anywhere in the sequence: bias / transform
/// tables and filters, summed over workers and ranks.
#[derive(Clone)]
pub(super) struct Partials {
    extra: BTreeMap<String, Vec<f64>>,
}

impl Partials {
    fn add(mut self, other: Partials) -> Partials {
        for (n, g) in other.extra {
            let d = self.extra.get_mut(&n).expect("same inputs");
            d.iter_mut().zip(g).for_each(|(a, b)| *a += b);
        }
        self
    }
}

/// What one rank hands back.
pub(super) struct RankGrads<T> {
    pub(super) ranges: Vec<Range<usize>>,
    /// Gradient of `scale * phi(q)`, `[batch * heads][position][d_k]`.
    pub(super) dq: Vec<T>,
    /// Query side of the cumulative log-gate gradient, `[batch * heads][position]`.
    pub(super) drow: Vec<f64>,
    /// The rank's own key/value shard, home with every contribution.
    pub(super) home: BwdShard<T>,
    pub(super) partials: Partials,
}

/// A rank's queries, fixed for the whole ring.
pub(super) struct QSide<T> {
    pub(super) ranges: Vec<Range<usize>>,
    pub(super) nq: usize,
    /// `scale * phi(q)`, `[bh][nq][d_k]`.
    pub(super) qs: Vec<T>,
    /// `do` (over `l + eps` under sum), `[bh][nq][d_v]`.
    pub(super) u: Vec<T>,
    /// `u . o`, `[bh][nq]` (0 under norm none).
    pub(super) big_d: Vec<T>,
    /// The log-sum-exp, `+inf` for a row that sees no key (so `e^(a - lse) = 0`).
    lse: Vec<T>,
}

/// The inputs of a backward run besides the forward's: `o` (`[batch, seq,
/// heads, value_dim]`), the row statistics (`[batch, heads, seq]`) and `do`.
pub(super) struct Upstream<'a> {
    pub o: &'a Tensor<f32>,
    pub stat: &'a Tensor<f64>,
    pub d_o: &'a Tensor<f32>,
}

pub(super) fn q_side<T: Real>(
    ctx: &Ctx<'_, T>,
    up: &Upstream<'_>,
    ranges: &[Range<usize>],
) -> QSide<T> {
    let (_, nq) = offsets(ranges);
    let (bh, dk, dv) = (ctx.batch * ctx.heads, ctx.dk, ctx.dv);
    let (q_map, scale) = match &ctx.spec.score {
        Score::Dot { q_map, scale, .. } => (*q_map, *scale),
        Score::Filter { .. } => (FeatureMap::Identity, 0.0),
    };
    let dot_score = matches!(ctx.spec.score, Score::Dot { .. });
    let mut qs = written(if dot_score { bh * nq * dk } else { 0 }, T::ZERO);
    let mut u = written(bh * nq * dv, T::ZERO);
    let mut big_d = written(bh * nq, T::ZERO);
    let mut lse = written(bh * nq, T::ZERO);
    let positions = || ranges.iter().flat_map(|r| r.clone()).enumerate();
    // One (batch, head) per task, on every worker.
    let row = |x: usize, qs: &mut [T], u: &mut [T], big_d: &mut [T], lse: &mut [T]| {
        let (b, h) = (x / ctx.heads, x % ctx.heads);
        let mut widened = Vec::new();
        for (t, p) in positions() {
            let i = p - ctx.q_offset;
            if dot_score {
                let q = ctx.q.row(ctx.q_at(b, i, h), dk, &mut widened);
                feature_row(q_map, q, T::from_f64(scale), &mut qs[t * dk..(t + 1) * dk]);
            }
            let stat = up.stat.data[x * ctx.seq + i];
            let div = match ctx.spec.norm {
                Norm::Sum { eps } => stat + eps,
                _ => 1.0,
            };
            let oo = up.o.offset(&[b, i, h, 0]);
            let mut dd = 0.0;
            let (d_o, o) = (&up.d_o.data[oo..oo + dv], &up.o.data[oo..oo + dv]);
            for ((ud, &g), &y) in u[t * dv..(t + 1) * dv].iter_mut().zip(d_o).zip(o) {
                let g = g as f64 / div;
                *ud = T::from_f64(g);
                dd += g * y as f64;
            }
            if !matches!(ctx.spec.norm, Norm::None) {
                big_d[t] = T::from_f64(dd);
            }
            lse[t] = T::from_f64(if stat == f64::NEG_INFINITY {
                f64::INFINITY
            } else {
                stat
            });
        }
    };
    let mut qs_rows: Vec<&mut [T]> = qs.chunks_mut((nq * dk).max(1)).collect();
    qs_rows.resize_with(bh, Default::default);
    let tasks: Vec<_> = qs_rows
        .into_iter()
        .zip(u.chunks_mut((nq * dv).max(1)))
        .zip(big_d.chunks_mut(nq.max(1)).zip(lse.chunks_mut(nq.max(1))))
        .enumerate()
        .collect();
    ctx.pool.install(|| {
        tasks
            .into_par_iter()
            .for_each(|(x, ((qs, u), (big_d, lse)))| row(x, qs, u, big_d, lse))
    });
    QSide {
        ranges: ranges.to_vec(),
        nq,
        qs,
        u,
        big_d,
        lse,
    }
}

pub(super) fn empty_partials<T>(ctx: &Ctx<'_, T>) -> Partials {
    let mut extra = BTreeMap::new();
    for name in differentiable_inputs(ctx.spec) {
        // Gates get their gradient from the cumulative sums, not per pair.
        if matches!(&ctx.spec.decay, Decay::Gate { input } if *input == name) {
            continue;
        }
        let len = ctx.inputs.extra[&name].shape().iter().product();
        extra.insert(name, vec![0.0; len]);
    }
    Partials { extra }
}

pub(super) fn rank_main<T: Real>(
    ctx: &Ctx<'_, T>,
    sched: &RingSchedule,
    up: &Upstream<'_>,
    ep: Endpoint<BwdShard<T>>,
) -> Result<RankGrads<T>> {
    let r = ep.rank;
    let qside = q_side(ctx, up, sched.shard(r));
    let t_ds = transform_derivatives(ctx);
    let (bh, nq) = (ctx.batch * ctx.heads, qside.nq);
    let mut dq = written(bh * nq * ctx.dk, T::ZERO);
    let gated = matches!(ctx.spec.decay, Decay::Gate { .. });
    let mut drow = vec![0.0f64; if gated { bh * nq } else { 0 }];
    let mut partials = empty_partials(ctx);
    let kv = KvShard::build(ctx, sched.kv_shard(r));
    let bkv = ctx.batch * ctx.kv_heads;
    let group = ctx.heads / ctx.kv_heads;
    let mut held = BwdShard {
        dk: written(
            if kv.k.is_empty() {
                0
            } else {
                bkv * kv.n * ctx.dk
            },
            T::ZERO,
        ),
        dv: written(bkv * kv.n * ctx.dv, T::ZERO),
        dcol: vec![0.0; if gated { bkv * kv.n * group } else { 0 }],
        kv,
    };
    for _ in 0..sched.ranks {
        let p = step_backward(ctx, &t_ds, &qside, &mut held, &mut dq, &mut drow);
        partials = partials.add(p);
        // Pass the shard and its accumulators on; after R hops it is home.
        if sched.ranks > 1 {
            ep.send_next(held)?;
            held = ep.recv()?;
        }
    }
    // Home: the keys and values themselves are done with; only their
    // gradients go on (freed before the gradients are laid out).
    held.kv.k = Vec::new();
    held.kv.v = Vec::new();
    Ok(RankGrads {
        ranges: qside.ranges,
        dq,
        drow,
        home: held,
        partials,
    })
}

/// One unit of parallel work: the keys `k0..k1` (local) of one (batch, kv
/// head) of the held shard, against every query of the rank.
struct Item<'s, T> {
    b: usize,
    kvh: usize,
    keys: Range<usize>,
    dk: &'s mut [T],
    dv: &'s mut [T],
    dcol: &'s mut [f64],
}

/// A worker's private sums: `dq` and `drow` for the item's query heads.
struct ItemOut<T> {
    b: usize,
    kvh: usize,
    /// `[group][nq][d_k]`, each query block stored transposed (`d_k x rows`).
    dq: Vec<T>,
    drow: Vec<f64>,
}

fn step_backward<T: Real>(
    ctx: &Ctx<'_, T>,
    t_ds: &[Option<FastExpr<'_>>],
    qs: &QSide<T>,
    held: &mut BwdShard<T>,
    dq: &mut [T],
    drow: &mut [f64],
) -> Partials {
    let shard = &held.kv;
    let plans: Vec<Vec<BlockPlan>> = qs
        .ranges
        .iter()
        .map(|q| {
            shard
                .ranges
                .iter()
                .map(|k| BlockPlan::new(&ctx.spec.mask, ctx.tiling, q.clone(), k.clone()))
                .collect()
        })
        .collect();
    let (n, bkv, group) = (shard.n, ctx.batch * ctx.kv_heads, ctx.heads / ctx.kv_heads);
    let (dk, dv) = (ctx.dk, ctx.dv);
    // Key chunks: whole key blocks, enough items to feed every worker.
    let bn = ctx.tiling.block_n;
    let block_starts: Vec<usize> = shard
        .ranges
        .iter()
        .zip(&shard.offsets)
        .flat_map(|(r, &o)| (0..r.len()).step_by(bn).map(move |t| o + t))
        .collect();
    let workers = ctx.pool.current_num_threads();
    let splits = (2 * workers)
        .div_ceil(bkv.max(1))
        .clamp(1, block_starts.len().max(1));
    let chunk_bounds: Vec<usize> = (0..=splits)
        .map(|c| {
            let blk = c * block_starts.len() / splits;
            block_starts.get(blk).copied().unwrap_or(n)
        })
        .collect();
    let mut items = Vec::new();
    let with_k = !held.dk.is_empty();
    let mut dk_rest: &mut [T] = &mut held.dk;
    let mut dv_rest: &mut [T] = &mut held.dv;
    let mut dcol_rest: &mut [f64] = &mut held.dcol;
    for x in 0..bkv {
        for c in 0..splits {
            let keys = chunk_bounds[c]..chunk_bounds[c + 1];
            let len = keys.len();
            // The remainder of this (batch, kv head)'s block after the last chunk.
            let (a, rest) = std::mem::take(&mut dv_rest).split_at_mut(len * dv);
            dv_rest = rest;
            let dk_part = if with_k {
                let (a, rest) = std::mem::take(&mut dk_rest).split_at_mut(len * dk);
                dk_rest = rest;
                a
            } else {
                &mut []
            };
            let dcol_part = if dcol_rest.is_empty() {
                &mut []
            } else {
                let (a, rest) = std::mem::take(&mut dcol_rest).split_at_mut(len * group);
                dcol_rest = rest;
                a
            };
            items.push(Item {
                b: x / ctx.kv_heads,
                kvh: x % ctx.kv_heads,
                keys,
                dk: dk_part,
                dv: a,
                dcol: dcol_part,
            });
        }
        // Chunks tile 0..n exactly, so nothing of this block is left over.
        debug_assert_eq!(chunk_bounds[splits], n);
    }
    let work = |it: Item<'_, T>, sc: &mut Scratch<T>, parts: &mut Partials| {
        item_backward(ctx, t_ds, qs, &plans, shard, it, sc, parts)
    };
    let (outs, partials): (Vec<ItemOut<T>>, Partials) = if items.len() <= 1 || workers <= 1 {
        let mut sc = Scratch::default();
        let mut parts = empty_partials(ctx);
        let outs = items
            .into_iter()
            .map(|it| work(it, &mut sc, &mut parts))
            .collect();
        (outs, parts)
    } else {
        ctx.pool.install(|| {
            let outs_parts: Vec<(ItemOut<T>, Partials)> = items
                .into_par_iter()
                .map_init(Scratch::default, |sc, it| {
                    let mut parts = empty_partials(ctx);
                    let o = work(it, sc, &mut parts);
                    (o, parts)
                })
                .collect();
            let mut total = empty_partials(ctx);
            let mut outs = Vec::with_capacity(outs_parts.len());
            for (o, p) in outs_parts {
                total = total.add(p);
                outs.push(o);
            }
            (outs, total)
        })
    };
    // Add each item's private dq / drow into the rank's.
    let nq = qs.nq;
    for o in outs {
        for g in 0..group {
            let h = o.kvh * group + g;
            let x = o.b * ctx.heads + h;
            // (No q for the convolution family.)
            let q_blocks = if o.dq.is_empty() {
                &plans[..0]
            } else {
                &plans[..]
            };
            for (qr, row_plans) in q_blocks.iter().enumerate() {
                let plan = &row_plans[0];
                let q_off = qs_offset(qs, qr);
                for qb in 0..plan.num_query_blocks() {
                    let q = plan.query_block(qb);
                    let rows = q.len();
                    let local = q_off + (q.start - qs.ranges[qr].start);
                    let src = &o.dq[(g * nq + local) * dk..(g * nq + local + rows) * dk];
                    for r in 0..rows {
                        let dst = &mut dq[(x * nq + local + r) * dk..][..dk];
                        for (d, v) in dst.iter_mut().enumerate() {
                            *v += src[d * rows + r];
                        }
                    }
                }
            }
            if !o.drow.is_empty() {
                for (a, b) in drow[x * nq..(x + 1) * nq].iter_mut().zip(&o.drow[g * nq..]) {
                    *a += b;
                }
            }
        }
    }
    partials
}

/// Local index of the first position of query range `qr`.
fn qs_offset<T>(qs: &QSide<T>, qr: usize) -> usize {
    qs.ranges[..qr].iter().map(|r| r.len()).sum()
}

/// Per-worker buffers, reused across items.
struct Scratch<T> {
    qt: Vec<T>,
    ut: Vec<T>,
    /// Weights `a` of a tile, transposed (`keys x rows`).
    a: Vec<T>,
    /// Scores before the transform (transform specs only).
    s_pre: Vec<T>,
    /// Probabilities (softmax) or weights, then `ds`.
    p: Vec<T>,
    /// `u vᵀ`, then `da`.
    dp: Vec<T>,
    /// Whether the mask allows each pair of a Partial tile.
    vis: Vec<bool>,
    lanes: ExprScratch<T>,
    /// One key's row of `T'(s)`.
    deriv: Vec<T>,
}

impl<T> Default for Scratch<T> {
    fn default() -> Self {
        Scratch {
            qt: Vec::new(),
            ut: Vec::new(),
            a: Vec::new(),
            s_pre: Vec::new(),
            p: Vec::new(),
            dp: Vec::new(),
            vis: Vec::new(),
            lanes: ExprScratch::default(),
            deriv: Vec::new(),
        }
    }
}

fn reset<T: Copy>(v: &mut Vec<T>, len: usize, x: T) -> &mut [T] {
    v.clear();
    v.resize(len, x);
    v
}

#[allow(clippy::too_many_arguments)]
fn item_backward<T: Real>(
    ctx: &Ctx<'_, T>,
    t_ds: &[Option<FastExpr<'_>>],
    qs: &QSide<T>,
    plans: &[Vec<BlockPlan>],
    shard: &KvShard<T>,
    it: Item<'_, T>,
    sc: &mut Scratch<T>,
    parts: &mut Partials,
) -> ItemOut<T> {
    let (b, kvh) = (it.b, it.kvh);
    let (dk, dv, nq) = (ctx.dk, ctx.dv, qs.nq);
    let group = ctx.heads / ctx.kv_heads;
    let gated = !it.dcol.is_empty();
    let mut out = ItemOut {
        b,
        kvh,
        dq: vec![T::ZERO; if qs.qs.is_empty() { 0 } else { group * nq * dk }],
        drow: vec![0.0; if gated { group * nq } else { 0 }],
    };
    if it.keys.is_empty() {
        return out;
    }
    let softmax = matches!(ctx.spec.norm, Norm::Softmax);
    let dot_score = !shard.k.is_empty();
    for g in 0..group {
        let h = kvh * group + g;
        let x = b * ctx.heads + h;
        let segs = ctx.tiles_of(b, Some(h));
        let plain = ctx.filter.is_none()
            && ctx.bias_at(b, h).is_none()
            && ctx.transform_at(b, h).is_none()
            && !ctx.has_decay;
        for (qr, row_plans) in plans.iter().enumerate() {
            let q_off = qs_offset(qs, qr);
            for qb in 0..row_plans[0].num_query_blocks() {
                let rows: Vec<RowPlan> = row_plans.iter().map(|p| p.row(qb, &segs)).collect();
                let q = row_plans[0].query_block(qb);
                let nr = q.len();
                let local = q_off + (q.start - qs.ranges[qr].start);
                // Tiles of this item's keys.
                let tiles: Vec<(usize, Range<usize>, BlockClass)> = rows
                    .iter()
                    .zip(row_plans)
                    .enumerate()
                    .flat_map(|(kr, (row, plan))| {
                        row.tiles(plan).map(move |(keys, class)| (kr, keys, class))
                    })
                    .filter(|(kr, keys, _)| {
                        let l = shard.offsets[*kr] + keys.start - shard.ranges[*kr].start;
                        it.keys.contains(&l)
                    })
                    .collect();
                if tiles.is_empty() {
                    continue;
                }
                let row0 = x * nq + local;
                let qrows = if dot_score {
                    &qs.qs[row0 * dk..(row0 + nr) * dk]
                } else {
                    &[][..]
                };
                let urows = &qs.u[row0 * dv..(row0 + nr) * dv];
                let lse = &qs.lse[row0..row0 + nr];
                let big_d = &qs.big_d[row0..row0 + nr];
                let qt = reset(&mut sc.qt, dk * nr, T::ZERO);
                if dot_score {
                    super::real::transpose(qrows, nr, dk, qt);
                }
                let ut = reset(&mut sc.ut, dv * nr, T::ZERO);
                super::real::transpose(urows, nr, dv, ut);
                let dq_t = if dot_score {
                    &mut out.dq[(g * nq + local) * dk..(g * nq + local + nr) * dk]
                } else {
                    &mut [][..]
                };
                for (kr, keys, class) in tiles {
                    let kn = keys.len();
                    let l0 = shard.offsets[kr] + keys.start - shard.ranges[kr].start;
                    let base = (b * ctx.kv_heads + kvh) * shard.n + l0;
                    let vt = &shard.v[base * dv..(base + kn) * dv];
                    let il = l0 - it.keys.start; // within the item's slices
                    let partial = class == BlockClass::Partial;
                    let a = reset(&mut sc.a, kn * nr, T::ZERO);
                    if dot_score {
                        let kt = &shard.k[base * dk..(base + kn) * dk];
                        gemm_tn(
                            Mat::dense(kt, dk, kn),
                            Mat::dense(&*qt, dk, nr),
                            MatMut::dense(a, kn, nr),
                            false,
                        );
                    }
                    let vis = reset(&mut sc.vis, if partial { kn * nr } else { 0 }, true);
                    let s_pre = reset(
                        &mut sc.s_pre,
                        if ctx.transform_at(b, h).is_some() {
                            kn * nr
                        } else {
                            0
                        },
                        T::ZERO,
                    );
                    if !plain || partial {
                        weights_pass(
                            ctx,
                            b,
                            h,
                            q.start,
                            &keys,
                            partial,
                            a,
                            s_pre,
                            vis,
                            &mut sc.lanes,
                        );
                    }
                    // dp = u vᵀ (transposed: v uᵀ, keys x rows), then da in
                    // place; p: probabilities (softmax) or the weights.
                    let dp = reset(&mut sc.dp, kn * nr, T::ZERO);
                    gemm(
                        Mat::dense(vt, kn, dv),
                        Mat::dense(&*ut, dv, nr),
                        MatMut::dense(dp, kn, nr),
                        false,
                    );
                    let p = reset(&mut sc.p, kn * nr, T::ZERO);
                    if softmax {
                        // Masked pairs have a = -inf, so p = 0 and da = 0.
                        softmax_grad_cols(a, lse, big_d, p, dp);
                    } else {
                        p.copy_from_slice(a);
                        for dc in dp.chunks_exact_mut(nr) {
                            dc.iter_mut().zip(big_d).for_each(|(x, &d)| *x = *x - d);
                        }
                    }
                    // dv += pᵀ u
                    gemm(
                        Mat::dense(&*p, kn, nr),
                        Mat::dense(urows, nr, dv),
                        MatMut::dense(&mut it.dv[il * dv..(il + kn) * dv], kn, dv),
                        true,
                    );
                    if partial && !softmax {
                        for (d, &ok) in dp.iter_mut().zip(vis.iter()) {
                            if !ok {
                                *d = T::ZERO;
                            }
                        }
                    }
                    // da -> ds (into p), through decay, transform, bias, filter.
                    let da = &*dp;
                    let ds = p;
                    if plain {
                        ds.copy_from_slice(da);
                    } else {
                        chain_pass(
                            ctx,
                            b,
                            h,
                            q.start,
                            &keys,
                            da,
                            a,
                            s_pre,
                            ds,
                            parts,
                            gated.then(|| {
                                (
                                    &mut out.drow[g * nq + local..g * nq + local + nr],
                                    &mut it.dcol[il * group..(il + kn) * group],
                                    g,
                                    group,
                                )
                            }),
                            t_ds[h].as_ref().map(|f| (f, &mut sc.lanes, &mut sc.deriv)),
                        );
                    }
                    if dot_score {
                        let kt = &shard.k[base * dk..(base + kn) * dk];
                        // dk += dsᵀ qs ; dqᵀ += kᵀ ds
                        gemm(
                            Mat::dense(&*ds, kn, nr),
                            Mat::dense(qrows, nr, dk),
                            MatMut::dense(&mut it.dk[il * dk..(il + kn) * dk], kn, dk),
                            true,
                        );
                        gemm(
                            Mat::dense(kt, dk, kn),
                            Mat::dense(&*ds, kn, nr),
                            MatMut::dense(dq_t, dk, nr),
                            true,
                        );
                    }
                }
            }
        }
    }
    out
}

/// Fills a tile's weights `a` (`keys x rows`, holding `q . k` for dot
/// scores) as the forward does: bias, transform (keeping the pre-transform
/// scores in `s_pre`), decay and filter taps; on Partial tiles masked pairs
/// get weight 0 and `vis = false`.
#[allow(clippy::too_many_arguments)]
fn weights_pass<T: Real>(
    ctx: &Ctx<'_, T>,
    b: usize,
    h: usize,
    q0: usize,
    keys: &Range<usize>,
    partial: bool,
    a: &mut [T],
    s_pre: &mut [T],
    vis: &mut [bool],
    lanes: &mut ExprScratch<T>,
) {
    let rows = a.len() / keys.len();
    let seg = |name: &str, pos: i64| ctx.inputs.extra[name].get_clamped(&[b as i64, pos]) as i64;
    let lookup = |name: &str, idx: &[i64]| ctx.inputs.extra[name].get_clamped(idx);
    let mut at = ctx.inputs.eval_env(ctx.spec.heads, &lookup);
    (at.b, at.h) = (b as i64, h as i64);
    let softmax = matches!(ctx.spec.norm, Norm::Softmax);
    let masked = if softmax { T::NEG_INF } else { T::ZERO };
    let mask = if partial { ctx.mask_at(b, h) } else { None };
    let mut seen = Vec::new();
    for (c, (arow, j)) in a.chunks_exact_mut(rows).zip(keys.clone()).enumerate() {
        let (i0, jj) = (q0 as i64, j as i64);
        if let Some(e) = mask {
            seen.clear();
            seen.resize(rows, T::ZERO);
            e.add_to(i0, jj, &mut seen, lanes);
        }
        if ctx.filter.is_none() {
            if let Some(e) = ctx.bias_at(b, h) {
                e.add_to(i0, jj, arow, lanes);
            }
            if let Some(e) = ctx.transform_at(b, h) {
                s_pre[c * rows..(c + 1) * rows].copy_from_slice(arow);
                e.apply_to(i0, jj, arow, lanes);
            }
        }
        for (r, x) in arow.iter_mut().enumerate() {
            let i = q0 + r;
            (at.i, at.j) = (i as i64, jj);
            let hidden = match mask {
                Some(_) => seen[r] == T::ZERO,
                None => partial && !ctx.spec.mask.allows(&at, &seg),
            };
            if hidden {
                vis[c * rows + r] = false;
                *x = masked;
                continue;
            }
            if let Some(f) = &ctx.filter {
                *x = f[h * ctx.filter_len + (i - j).min(ctx.filter_len - 1)];
            } else if ctx.has_decay {
                *x *= T::from_f64(ctx.decay(b, h, i, j));
            }
        }
    }
}

/// `ds` from `da` for one tile (`keys x rows` each): `dt = da D(i, j)` and
/// `d log D = da a` (to the gates' row and column sums), `ds = dt T'(s)`,
/// table gradients of transform and bias, filter taps.
#[allow(clippy::too_many_arguments, clippy::type_complexity)]
fn chain_pass<T: Real>(
    ctx: &Ctx<'_, T>,
    b: usize,
    h: usize,
    q0: usize,
    keys: &Range<usize>,
    da: &[T],
    a: &[T],
    s_pre: &[T],
    ds: &mut [T],
    parts: &mut Partials,
    mut gates: Option<(&mut [f64], &mut [f64], usize, usize)>,
    mut fast: Option<(&FastExpr<'_>, &mut ExprScratch<T>, &mut Vec<T>)>,
) {
    let rows = da.len() / keys.len();
    let lookup = |name: &str, idx: &[i64]| ctx.inputs.extra[name].get_clamped(idx);
    let spec = ctx.spec;
    let base = ctx.inputs.eval_env(spec.heads, &lookup);
    let env = |i: usize, j: usize, s: f64| EvalEnv {
        i: i as i64,
        j: j as i64,
        h: h as i64,
        b: b as i64,
        s,
        ..base
    };
    let bias_tables = spec.bias.as_ref().is_some_and(|e| {
        let mut r = Vec::new();
        e.inputs_read(&mut r);
        !r.is_empty()
    });
    for (c, j) in keys.clone().enumerate() {
        for r in 0..rows {
            let e = c * rows + r;
            let g = da[e].to_f64();
            let i = q0 + r;
            if g == 0.0 {
                ds[e] = T::ZERO;
                continue;
            }
            if let Score::Filter { input } = &spec.score {
                let len = ctx.filter_len;
                if let Some(t) = parts.extra.get_mut(input.as_str()) {
                    t[h * len + (i - j).min(len - 1)] += g;
                }
                ds[e] = T::ZERO;
                continue;
            }
            let mut dt = g;
            if ctx.has_decay {
                let d_log = g * a[e].to_f64();
                if let Some((drow, dcol, gi, group)) = gates.as_mut() {
                    drow[r] += d_log;
                    dcol[c * *group + *gi] -= d_log;
                }
                dt = g * ctx.decay(b, h, i, j);
            }
            let mut d_s = dt;
            if let (Some(tr), None) = (&spec.transform, &fast) {
                d_s = 0.0;
                tr.backprop(
                    &env(i, j, s_pre[e].to_f64()),
                    dt,
                    &mut |leaf, x| match leaf {
                        Leaf::Score => d_s += x,
                        table => scatter(ctx, parts, table, x),
                    },
                );
            }
            if bias_tables {
                if let Some(bias) = &spec.bias {
                    bias.backprop(&env(i, j, 0.0), d_s, &mut |leaf, x| {
                        scatter(ctx, parts, leaf, x)
                    });
                }
            }
            ds[e] = T::from_f64(d_s);
        }
        // The transform's derivative as a compiled program over the key's row.
        if let Some((d_expr, lanes, row)) = fast.as_mut() {
            row.clear();
            row.extend_from_slice(&s_pre[c * rows..(c + 1) * rows]);
            d_expr.apply_to(q0 as i64, j as i64, row, lanes);
            for (d, &t) in ds[c * rows..(c + 1) * rows].iter_mut().zip(row.iter()) {
                if *d != T::ZERO {
                    *d *= t;
                }
            }
        }
    }
}

/// Per head, the transform's derivative `T'(s)` compiled like the transform
/// itself, when it can be written (see [`mixc_dsl::Expr::derivative_s`])
/// and no table gradient is needed on the way (neither transform nor bias
/// reads a table); otherwise `None`, and the chain rule walks each pair's
/// expression ([`mixc_dsl::Expr::backprop`]).
fn transform_derivatives<'a, T>(ctx: &Ctx<'a, T>) -> Vec<Option<FastExpr<'a>>> {
    let spec = ctx.spec;
    let reads_tables = |e: &Option<mixc_dsl::Expr>| {
        let mut r = Vec::new();
        if let Some(e) = e {
            e.inputs_read(&mut r);
        }
        !r.is_empty()
    };
    // Per head; a transform reading `b` takes the general path.
    let d = match &spec.transform {
        Some(tr)
            if !reads_tables(&spec.transform)
                && !reads_tables(&spec.bias)
                && !tr.uses_var(mixc_dsl::ir::Var::B) =>
        {
            tr.derivative_s()
        }
        _ => None,
    };
    (0..ctx.heads)
        .map(|h| {
            d.as_ref()
                .map(|d| FastExpr::new(d, 0, h, spec.heads, ctx.inputs))
        })
        .collect()
}

/// Adds a table element's gradient (integer tables have none).
fn scatter<T>(ctx: &Ctx<'_, T>, parts: &mut Partials, leaf: Leaf<'_>, g: f64) {
    if let Leaf::Table { input, indices } = leaf {
        if let Some(t) = parts.extra.get_mut(input) {
            t[ctx.inputs.extra[input].clamped_offset(&indices)] += g;
        }
    }
}

/// Assembles the ranks' results into gradients in the inputs' layouts.
pub(super) fn assemble<T: Real>(
    ctx: &Ctx<'_, T>,
    sched: &RingSchedule,
    ranks: Vec<RankGrads<T>>,
) -> Gradients<T> {
    let inputs = ctx.inputs;
    let (batch, positions, heads) = (ctx.batch, ctx.positions, ctx.heads);
    let (dk, dv, group) = (ctx.dk, ctx.dv, heads / ctx.kv_heads);
    let (q_map, k_map, scale) = match &ctx.spec.score {
        Score::Dot {
            q_map,
            k_map,
            scale,
        } => (*q_map, *k_map, *scale),
        Score::Filter { .. } => (FeatureMap::Identity, FeatureMap::Identity, 0.0),
    };
    let dot_score = matches!(ctx.spec.score, Score::Dot { .. });
    let [q_shape, k_shape, v_shape] = ctx.shapes;
    let mut dq = Tensor::<T>::zeros(q_shape);
    let mut dkt = Tensor::<T>::zeros(k_shape);
    let mut dvt = Tensor::<T>::zeros(v_shape);
    let mut widened = Vec::new();
    let gated = matches!(ctx.spec.decay, Decay::Gate { .. });
    // dC[b][h][p]: gradient of the cumulative log-gate at p.
    let mut d_cum = vec![0.0f64; if gated { batch * heads * positions } else { 0 }];
    let mut partials = empty_partials(ctx);
    for rg in ranks {
        let q_pos: Vec<usize> = rg.ranges.iter().flat_map(|r| r.clone()).collect();
        let nq = q_pos.len();
        for x in 0..batch * heads {
            let (b, h) = (x / heads, x % heads);
            for (t, &i) in q_pos.iter().enumerate() {
                if dot_score {
                    let src = &rg.dq[(x * nq + t) * dk..][..dk];
                    let o = ctx.q_at(b, i - ctx.q_offset, h);
                    let (dst, x) = (&mut dq.data[o..o + dk], ctx.q.row(o, dk, &mut widened));
                    for ((g, &s), &qx) in dst.iter_mut().zip(src).zip(x) {
                        *g = T::from_f64(s.to_f64() * scale * q_map.derivative(qx as f64));
                    }
                }
                if gated {
                    d_cum[x * positions + i] += rg.drow[x * nq + t];
                }
            }
        }
        // The home shard: this rank's keys.
        let home = &rg.home;
        debug_assert!(sched.kv_shards.contains(&home.kv.ranges));
        let n = home.kv.n;
        let k_pos: Vec<usize> = home.kv.ranges.iter().flat_map(|r| r.clone()).collect();
        for y in 0..batch * ctx.kv_heads {
            let (b, kvh) = (y / ctx.kv_heads, y % ctx.kv_heads);
            for (t, &j) in k_pos.iter().enumerate() {
                if dot_score {
                    let src = &home.dk[(y * n + t) * dk..][..dk];
                    let o = ctx.k_at(b, j, kvh);
                    let (dst, x) = (&mut dkt.data[o..o + dk], ctx.k.row(o, dk, &mut widened));
                    for ((g, &s), &kx) in dst.iter_mut().zip(src).zip(x) {
                        *g = T::from_f64(s.to_f64() * k_map.derivative(kx as f64));
                    }
                }
                let o = ctx.v_at(b, j, kvh);
                dvt.data[o..o + dv].copy_from_slice(&home.dv[(y * n + t) * dv..][..dv]);
                if gated {
                    for g in 0..group {
                        let h = kvh * group + g;
                        d_cum[(b * heads + h) * positions + j] +=
                            home.dcol[(y * n + t) * group + g];
                    }
                }
            }
        }
        partials = partials.add(rg.partials);
    }
    let mut extra: BTreeMap<String, Tensor<T>> = partials
        .extra
        .into_iter()
        .map(|(name, g)| {
            let shape = inputs.extra[&name].shape().to_vec();
            (
                name,
                Tensor::new(shape, g.into_iter().map(T::from_f64).collect()),
            )
        })
        .collect();
    if let Decay::Gate { input } = &ctx.spec.decay {
        // C_p = sum_{l <= p} ln gamma_l, so d ln gamma_l = sum_{p >= l} dC_p.
        let gates = &inputs.extra[input.as_str()];
        let mut dg = Tensor::<T>::zeros(gates.shape());
        for b in 0..batch {
            for h in 0..heads {
                let mut acc = 0.0;
                for l in (0..positions).rev() {
                    acc += d_cum[(b * heads + h) * positions + l];
                    let gamma = gates.get_clamped(&[b as i64, l as i64, h as i64]);
                    let off = gates.clamped_offset(&[b as i64, l as i64, h as i64]);
                    dg.data[off] += T::from_f64(acc / gamma);
                }
            }
        }
        extra.insert(input.clone(), dg);
    }
    Gradients {
        dq,
        dk: dkt,
        dv: dvt,
        extra,
    }
}
