//! The decode form of the blocked path: few queries against many keys (a
//! decode step against a KV cache, a short prefill chunk).
//!
//! A step's arithmetic per byte of K/V is tiny (one query: `2 * group`
//! flops per element), so it is bound by memory bandwidth, and three things
//! decide its speed:
//! - **the query heads of a kv group share one tile** (rows = group x
//!   queries), so every key and value row is read from memory once for the
//!   whole group (FlashInfer and FlashAttention pack GQA the same way);
//! - **keys are read where they lie**: no shard is packed up front (for a
//!   128k-token cache that would be a full extra copy of K and V); each
//!   worker gathers one cache-sized tile at a time;
//! - **the keys are split over the workers** (flash-decoding's split-KV):
//!   each (batch row, kv head, key split) is one work item with its own
//!   partial `(o, m, l)`, and the partials merge exactly as ring steps do.
//!
//! Tiles are the block plan's (Skip / Full / Partial by the same classifier)
//! and the per-pair work is the blocked path's own pass, so masks, biases,
//! transforms and decay mean the same here.

use std::ops::Range;

use mixc_codegen::plan::{BlockClass, BlockPlan, ClassCounts, Tiling};
use mixc_dsl::ir::{FeatureMap, Norm, Score};
use rayon::prelude::*;

use super::blocked::{finalize, merge, pair_pass, reset, Acc};
use super::expr::ExprScratch;
use super::microkernel::{dot_rows, gemm, row_sum, softmax_rows, Mat, MatMut};
use super::real::{feature, Real};
use super::{Ctx, RankOutput, RankStats};
use crate::ring::RingSchedule;

/// Most rows (query heads of a group x queries) a decode tile holds.
const MAX_ROWS: usize = 64;
/// Elements of K and V one tile gathers (every kv head): 256 KiB of f32,
/// so a tile stays in L2 while the group's queries use it.
const TILE_ELEMS: usize = 1 << 16;

/// Whether a one-rank run takes the decode form: dot scores, at most
/// [`MAX_ROWS`] rows per kv group, and at least 8 keys per query (below
/// that the blocked path's packed shard pays for itself).
pub(super) fn applies<T>(ctx: &Ctx<'_, T>, sched: &RingSchedule) -> bool {
    let group = ctx.heads / ctx.kv_heads;
    sched.ranks == 1
        && sched.shard(0).len() == 1
        && sched.kv_shard(0).len() == 1
        && matches!(ctx.spec.score, Score::Dot { .. })
        && ctx.filter.is_none()
        && ctx.seq * group <= MAX_ROWS
        && ctx.positions >= 8 * ctx.seq
}

/// One work item: the keys of `tiles` for batch row `b`, every kv head
/// (keys are read in position order, all heads of a position at once: the
/// cache's layout `[b, j, kv_head, d]` makes that one sequential stream).
struct Item {
    b: usize,
    tiles: Vec<(Range<usize>, BlockClass)>,
}

/// An item's partial over its keys: rows `h * nq + t` (query head `h`,
/// query `t`), every head.
struct Partial<T> {
    b: usize,
    o: Vec<T>,
    m: Vec<T>,
    l: Vec<T>,
    pairs: u64,
    tiles: ClassCounts,
}

/// Per-worker buffers, reused across tiles and items.
struct Scratch<T> {
    /// The group's queries, feature map and scale applied: `rows x d_k`.
    qr: Vec<T>,
    /// One tile's keys (feature map applied) `kn x d_k` and values `kn x d_v`.
    kc: Vec<T>,
    vc: Vec<T>,
    /// Scores, then probabilities: `rows x kn`.
    sr: Vec<T>,
    /// The same transposed (`kn x rows`), for the per-pair pass.
    st: Vec<T>,
    lanes: ExprScratch<T>,
}

impl<T> Default for Scratch<T> {
    fn default() -> Self {
        Scratch {
            qr: Vec::new(),
            sr: Vec::new(),
            kc: Vec::new(),
            vc: Vec::new(),
            st: Vec::new(),
            lanes: ExprScratch::default(),
        }
    }
}

/// The rank's whole run in the decode form (see the module docs).
pub(super) fn rank_main<T: Real>(ctx: &Ctx<'_, T>, sched: &RingSchedule) -> RankOutput<T> {
    let q = sched.shard(0)[0].clone();
    let keys = sched.kv_shard(0)[0].clone();
    let nq = q.len();
    let (heads, kvh_n, dv) = (ctx.heads, ctx.kv_heads, ctx.dv);
    let group = heads / kvh_n;
    // Tiles of 16..256 keys whose K and V (all heads) fit TILE_ELEMS.
    let per_key = kvh_n * (ctx.dk + dv);
    let tile = (TILE_ELEMS / per_key.max(1)).clamp(16, 256) / 16 * 16;
    let tiling = Tiling {
        block_m: nq.max(1),
        block_n: tile,
    };
    let plan = BlockPlan::new(&ctx.spec.mask, tiling, q.clone(), keys);
    // Split each batch row over the keys until every worker has about four
    // items (whole tiles each; a decode row's tiles cost the same).
    let workers = ctx.pool.current_num_threads();
    let mut items = Vec::new();
    for b in 0..ctx.batch {
        let tiles: Vec<(Range<usize>, BlockClass)> = if nq == 0 {
            Vec::new()
        } else {
            let row = plan.row(0, &ctx.tiles_of(b, None));
            row.tiles(&plan).collect()
        };
        let splits = (4 * workers)
            .div_ceil(ctx.batch)
            .clamp(1, tiles.len().max(1));
        for s in 0..splits {
            let part = tiles[s * tiles.len() / splits..(s + 1) * tiles.len() / splits].to_vec();
            if !part.is_empty() {
                items.push(Item { b, tiles: part });
            }
        }
    }
    let partials: Vec<Partial<T>> = if items.len() <= 1 || workers <= 1 {
        let mut scratch = Scratch::default();
        items
            .iter()
            .map(|it| compute(ctx, &q, group, it, &mut scratch))
            .collect()
    } else {
        ctx.pool.install(|| {
            items
                .par_iter()
                .map_init(Scratch::default, |s, it| compute(ctx, &q, group, it, s))
                .collect()
        })
    };
    let softmax = matches!(ctx.spec.norm, Norm::Softmax);
    let bh = ctx.batch * heads;
    let mut acc = Acc {
        o: vec![T::ZERO; bh * nq * dv],
        m: vec![T::NEG_INF; bh * nq],
        l: vec![T::ZERO; bh * nq],
    };
    let mut stats = RankStats {
        decode: true,
        steps_computed: 1,
        ..RankStats::default()
    };
    for p in partials {
        stats.pairs += p.pairs;
        stats.tiles.full += p.tiles.full;
        stats.tiles.partial += p.tiles.partial;
        stats.tiles.skip += p.tiles.skip;
        let x = p.b * heads * nq;
        merge(
            softmax,
            &p.o,
            &p.m,
            &p.l,
            &mut acc.o[x * dv..(x + heads * nq) * dv],
            &mut acc.m[x..x + heads * nq],
            &mut acc.l[x..x + heads * nq],
            dv,
        );
    }
    let (y, stat) = finalize(ctx, acc, nq);
    RankOutput {
        ranges: vec![q],
        y,
        stat,
        stats,
    }
}

/// One item's partial: every query head against the item's tiles.
fn compute<T: Real>(
    ctx: &Ctx<'_, T>,
    q: &Range<usize>,
    group: usize,
    it: &Item,
    scratch: &mut Scratch<T>,
) -> Partial<T> {
    let b = it.b;
    let (nq, dk, dv, heads, kvh_n) = (q.len(), ctx.dk, ctx.dv, ctx.heads, ctx.kv_heads);
    // Rows of one kv group: `g * nq + t`; of the item: `h * nq + t`.
    let rows = group * nq;
    let softmax = matches!(ctx.spec.norm, Norm::Softmax);
    let Score::Dot { q_map, scale, .. } = &ctx.spec.score else {
        unreachable!("the decode form runs dot scores only (see `applies`)");
    };
    // Every head's queries, one row each (`heads * nq x d_k`).
    let qr = reset(&mut scratch.qr, heads * nq * dk, T::ZERO);
    for h in 0..heads {
        for (t, i) in q.clone().enumerate() {
            let dst = &mut qr[(h * nq + t) * dk..(h * nq + t + 1) * dk];
            let src = ctx.q_at(b, i - ctx.q_offset, h);
            ctx.q
                .map_into(src, dst, |x| feature::<T>(*q_map, x) * T::from_f64(*scale));
        }
    }
    let qr = &*qr;
    let mut out = Partial {
        b,
        o: vec![T::ZERO; heads * nq * dv],
        m: vec![T::NEG_INF; heads * nq],
        l: vec![T::ZERO; heads * nq],
        pairs: 0,
        tiles: ClassCounts::default(),
    };
    let plain = ctx.bias.iter().chain(&ctx.transform).all(Option::is_none) && !ctx.has_decay;
    let identity = ctx.k_map == FeatureMap::Identity;
    for (keys, class) in &it.tiles {
        let kn = keys.len();
        out.pairs += (kn * heads * nq) as u64;
        match class {
            BlockClass::Full => out.tiles.full += heads as u64,
            BlockClass::Partial => out.tiles.partial += heads as u64,
            BlockClass::Skip => continue,
        }
        // Gather the tile in position order (one sequential read of the
        // cache's `[b, j, kv_head, d]` rows) into per-head blocks
        // `[kv_head][key][d]`.
        let kc = reset(&mut scratch.kc, kvh_n * kn * dk, T::ZERO);
        let vc = reset(&mut scratch.vc, kvh_n * kn * dv, T::ZERO);
        for (c, j) in keys.clone().enumerate() {
            let (ko, vo) = (ctx.k_at(b, j, 0), ctx.v_at(b, j, 0));
            for kvh in 0..kvh_n {
                let kdst = &mut kc[(kvh * kn + c) * dk..(kvh * kn + c + 1) * dk];
                if identity {
                    ctx.k
                        .map_into(ko + kvh * dk, kdst, |y| T::from_f64(y as f64));
                } else {
                    ctx.k
                        .map_into(ko + kvh * dk, kdst, |y| feature::<T>(ctx.k_map, y));
                }
                let vdst = &mut vc[(kvh * kn + c) * dv..(kvh * kn + c + 1) * dv];
                ctx.v
                    .map_into(vo + kvh * dv, vdst, |y| T::from_f64(y as f64));
            }
        }
        for kvh in 0..kvh_n {
            let h0 = kvh * group;
            let (r0, r1) = (h0 * nq, (h0 + group) * nq);
            // Scores in row form: `rows x kn`, keys contiguous.
            let sr = reset(&mut scratch.sr, rows * kn, T::ZERO);
            dot_rows(
                Mat::dense(&kc[kvh * kn * dk..(kvh + 1) * kn * dk], kn, dk),
                Mat::dense(&qr[r0 * dk..r1 * dk], rows, dk),
                MatMut::dense(sr, rows, kn),
            );
            if !plain || *class == BlockClass::Partial {
                // The blocked path's per-pair pass works on `keys x rows` tiles.
                let st = reset(&mut scratch.st, kn * rows, T::ZERO);
                transpose(sr, st, rows, kn);
                for g in 0..group {
                    pair_pass(
                        ctx,
                        b,
                        h0 + g,
                        q.start,
                        keys,
                        *class,
                        softmax,
                        st,
                        rows,
                        g * nq..(g + 1) * nq,
                        &mut scratch.lanes,
                    );
                }
                transpose(st, sr, kn, rows);
            }
            let o = &mut out.o[r0 * dv..r1 * dv];
            if softmax {
                softmax_rows(sr, kn, &mut out.m[r0..r1], &mut out.l[r0..r1], o);
            } else {
                for (l, srow) in out.l[r0..r1].iter_mut().zip(sr.chunks_exact(kn)) {
                    *l += row_sum(srow);
                }
            }
            gemm(
                Mat::dense(sr, rows, kn),
                Mat::dense(&vc[kvh * kn * dv..(kvh + 1) * kn * dv], kn, dv),
                MatMut::dense(o, rows, dv),
                true,
            );
        }
    }
    out
}

/// `dst = srcᵀ` for a `rows x cols` `src`.
fn transpose<T: Copy>(src: &[T], dst: &mut [T], rows: usize, cols: usize) {
    for (r, row) in src.chunks_exact(cols).enumerate().take(rows) {
        for (c, &x) in row.iter().enumerate() {
            dst[c * rows + r] = x;
        }
    }
}
