//! The blocked quadratic path (softmax, and every linear-family mask the
//! chunkwise form does not cover, and the convolution family as a blocked
//! Toeplitz product): ring steps over key/value shards, tiles from the
//! `BlockPlan`, online softmax per tile, exact merges of per-step partials.

use std::ops::Range;
use std::sync::Arc;

use mixc_codegen::plan::{BlockClass, BlockPlan, ClassCounts, RowPlan};
use mixc_dsl::ir::{Decay, FeatureMap, Norm, Score};
use rayon::prelude::*;

use super::bf16;
use super::expr::ExprScratch;
use super::microkernel::{col_sums_add, gemm_tn, softmax_cols, Mat, MatMut};
use super::real::{feature_row, put_columns, scale, Real};
use super::{Ctx, RankOutput, RankStats};
use crate::error::Result;
use crate::ring::{wire, Endpoint, RingSchedule, Wire};

/// A key/value shard as it travels the ring: k (feature map applied) and v,
/// laid out `[batch][kv_head][position][dim]` so a key tile is contiguous.
pub(super) struct KvShard<T> {
    pub(super) ranges: Vec<Range<usize>>,
    /// Local index of each range's first position.
    pub(super) offsets: Vec<usize>,
    pub(super) n: usize,
    pub(super) k: Vec<T>,
    pub(super) v: Vec<T>,
    /// The same keys and values as bf16 pairs when the run's products are
    /// bf16 (`Ctx::bf16`; `k` and `v` are then empty).
    pub(super) pairs: Option<PairShard>,
}

/// A shard's keys and values as bf16 pairs ([`bf16`]), `[batch][kv_head]`
/// blocks of `n` positions, each range starting at an even position
/// (`offsets`) and padded to an even length with zeros, so a tile's key
/// pairs never straddle two ranges:
/// - `k`: `n x dk2` per block, key `c`'s dims `2p, 2p + 1` in pair `p`
///   (the broadcast operand of `Sᵀ = K Qᵀ`);
/// - `v`: `n / 2 x dv` per block, the values of keys `2p, 2p + 1` in pair
///   row `p` (the row operand of `O += P V`).
pub(super) struct PairShard {
    pub(super) offsets: Vec<usize>,
    pub(super) n: usize,
    pub(super) dk2: usize,
    pub(super) k: Vec<u32>,
    pub(super) v: Vec<u32>,
}

impl PairShard {
    fn build<T: Real>(ctx: &Ctx<'_, T>, ranges: &[Range<usize>]) -> Self {
        let mut offs = Vec::with_capacity(ranges.len());
        let mut n = 0;
        for r in ranges {
            offs.push(n);
            n += r.len().next_multiple_of(2);
        }
        let (b_, kvh_, dk, dv) = (ctx.batch, ctx.kv_heads, ctx.dk, ctx.dv);
        let dk2 = dk.div_ceil(2);
        let mut k = vec![0u32; b_ * kvh_ * n * dk2];
        let mut v = vec![0u32; b_ * kvh_ * n / 2 * dv];
        // Tasks of up to 64 positions (an even count, so value pairs stay in
        // one task) read the inputs in memory order, every kv head of a
        // position at once: a (batch, kv head) block's rows are a page
        // apart in the input, which per-block reading pays in TLB misses.
        let tasks = tile_tasks(ranges, 64);
        let (kp, vp) = (Shared(k.as_mut_ptr()), Shared(v.as_mut_ptr()));
        let fill = |&(ri, t0, t1): &(usize, usize, usize)| {
            let (r, off) = (&ranges[ri], offs[ri]);
            let mut mapped = vec![0.0f32; dk];
            let (mut wk, mut wv, mut wnext) = (Vec::new(), Vec::new(), Vec::new());
            for b in 0..b_ {
                for t in t0..t1 {
                    let pos = r.start + t;
                    let keys = ctx.k.row(ctx.k_at(b, pos, 0), kvh_ * dk, &mut wk);
                    let vals = ctx.v.row(ctx.v_at(b, pos, 0), kvh_ * dv, &mut wv);
                    let next = (pos + 1 < r.end && t % 2 == 0)
                        .then(|| ctx.v.row(ctx.v_at(b, pos + 1, 0), kvh_ * dv, &mut wnext));
                    for kvh in 0..kvh_ {
                        let blk = b * kvh_ + kvh;
                        let row = map_row(ctx.k_map, &keys[kvh * dk..][..dk], &mut mapped);
                        // SAFETY: rows `off + t0..off + t1` of every block
                        // (pair rows `(off + t0) / 2..`) belong to this task
                        // alone, and lie inside `k` / `v` (sized above).
                        let krow = unsafe {
                            std::slice::from_raw_parts_mut(kp.at((blk * n + off + t) * dk2), dk2)
                        };
                        bf16::pack_row(row, krow);
                        if t % 2 == 0 {
                            let vrow = unsafe {
                                std::slice::from_raw_parts_mut(
                                    vp.at((blk * n / 2 + (off + t) / 2) * dv),
                                    dv,
                                )
                            };
                            let hi = next.map(|x| &x[kvh * dv..][..dv]);
                            bf16::pack_pairs(&vals[kvh * dv..][..dv], hi, vrow);
                        }
                    }
                }
            }
        };
        if inline(ctx, tasks.len()) {
            tasks.iter().for_each(fill);
        } else {
            ctx.pool.install(|| tasks.par_iter().for_each(fill));
        }
        PairShard {
            offsets: offs,
            n,
            dk2,
            k,
            v,
        }
    }
}

impl Wire for PairShard {
    fn encode(&self, out: &mut Vec<u8>) {
        wire::put_slice(
            out,
            &self.offsets.iter().map(|&x| x as u64).collect::<Vec<_>>(),
        );
        wire::put_usize(out, self.n);
        wire::put_usize(out, self.dk2);
        wire::put_slice(out, &self.k);
        wire::put_slice(out, &self.v);
    }
    fn decode(b: &mut &[u8]) -> Result<Self> {
        let offsets: Vec<u64> = wire::get_vec(b)?;
        Ok(PairShard {
            offsets: offsets.into_iter().map(|x| x as usize).collect(),
            n: wire::get_usize(b)?,
            dk2: wire::get_usize(b)?,
            k: wire::get_vec(b)?,
            v: wire::get_vec(b)?,
        })
    }
}

impl<T: Real> Wire for KvShard<T> {
    fn encode(&self, out: &mut Vec<u8>) {
        wire::put_ranges(out, &self.ranges);
        wire::put_slice(out, &self.k);
        wire::put_slice(out, &self.v);
        wire::put_usize(out, usize::from(self.pairs.is_some()));
        if let Some(p) = &self.pairs {
            p.encode(out);
        }
    }
    fn decode(b: &mut &[u8]) -> Result<Self> {
        let ranges = wire::get_ranges(b)?;
        let (offsets, n) = offsets(&ranges);
        let (k, v) = (wire::get_vec(b)?, wire::get_vec(b)?);
        let pairs = match wire::get_usize(b)? {
            0 => None,
            _ => Some(PairShard::decode(b)?),
        };
        Ok(KvShard {
            ranges,
            offsets,
            n,
            k,
            v,
            pairs,
        })
    }
}

pub(super) fn offsets(ranges: &[Range<usize>]) -> (Vec<usize>, usize) {
    let mut acc = 0;
    let offs = ranges
        .iter()
        .map(|r| {
            let o = acc;
            acc += r.len();
            o
        })
        .collect();
    (offs, acc)
}

impl<T: Real> KvShard<T> {
    /// Gathers the shard's keys and values. Keys are stored tile by tile,
    /// each `block_n`-key tile transposed (`d_k x kn`, in the same slots the
    /// tile's rows would occupy), so the score product reads a contiguous
    /// `Kᵀ` tile; packed once here, reused by every query block and every
    /// query head of the kv group, on every rank the shard visits.
    pub(super) fn build(ctx: &Ctx<'_, T>, ranges: &[Range<usize>]) -> Self {
        let (offs, n) = offsets(ranges);
        if ctx.bf16 {
            return KvShard {
                ranges: ranges.to_vec(),
                offsets: offs,
                n,
                k: Vec::new(),
                v: Vec::new(),
                pairs: Some(PairShard::build(ctx, ranges)),
            };
        }
        let (b_, kvh_, dk, dv) = (ctx.batch, ctx.kv_heads, ctx.dk, ctx.dv);
        let bn = ctx.tiling.block_n;
        let with_k = matches!(ctx.spec.score, Score::Dot { .. });
        let mut k = vec![T::ZERO; if with_k { b_ * kvh_ * n * dk } else { 0 }];
        let mut v = vec![T::ZERO; b_ * kvh_ * n * dv];
        // One key tile of every (batch, kv head) per task, read in memory
        // order (see `PairShard::build`).
        let tasks = tile_tasks(ranges, bn);
        let (kp, vp) = (Shared(k.as_mut_ptr()), Shared(v.as_mut_ptr()));
        let fill = |&(ri, t0, t1): &(usize, usize, usize)| {
            let (r, off, kn) = (&ranges[ri], offs[ri], t1 - t0);
            let (mut wk, mut wv) = (Vec::new(), Vec::new());
            // `ROWS` keys of every kv head, mapped, on their way into the
            // transposed tiles.
            let mut mapped = vec![T::ZERO; if with_k { kvh_ * ROWS * dk } else { 0 }];
            for b in 0..b_ {
                for c0 in (0..kn).step_by(ROWS) {
                    let cn = ROWS.min(kn - c0);
                    for c in c0..c0 + cn {
                        let pos = r.start + t0 + c;
                        let vals = ctx.v.row(ctx.v_at(b, pos, 0), kvh_ * dv, &mut wv);
                        for kvh in 0..kvh_ {
                            let blk = b * kvh_ + kvh;
                            // SAFETY: rows `off + t0..off + t1` of every block
                            // belong to this task alone, inside `v`.
                            let vrow = unsafe {
                                std::slice::from_raw_parts_mut(
                                    vp.at((blk * n + off + t0 + c) * dv),
                                    dv,
                                )
                            };
                            for (x, &y) in vrow.iter_mut().zip(&vals[kvh * dv..][..dv]) {
                                *x = T::from_f64(y as f64);
                            }
                        }
                        if with_k {
                            let keys = ctx.k.row(ctx.k_at(b, pos, 0), kvh_ * dk, &mut wk);
                            for kvh in 0..kvh_ {
                                let dst = &mut mapped[(kvh * ROWS + c - c0) * dk..][..dk];
                                feature_row(ctx.k_map, &keys[kvh * dk..][..dk], T::ONE, dst);
                            }
                        }
                    }
                    if !with_k {
                        continue;
                    }
                    for kvh in 0..kvh_ {
                        let blk = b * kvh_ + kvh;
                        // The tile transposed: `d_k x kn`, key `c` in column `c`.
                        // SAFETY: as for `vrow`, inside `k`.
                        let tile = unsafe {
                            std::slice::from_raw_parts_mut(
                                kp.at((blk * n + off + t0) * dk),
                                kn * dk,
                            )
                        };
                        put_columns(&mapped[kvh * ROWS * dk..][..cn * dk], dk, tile, kn, c0);
                    }
                }
            }
        };
        if n > 0 && inline(ctx, tasks.len()) {
            tasks.iter().for_each(fill);
        } else if n > 0 {
            ctx.pool.install(|| tasks.par_iter().for_each(fill));
        }
        KvShard {
            ranges: ranges.to_vec(),
            offsets: offs,
            n,
            k,
            v,
            pairs: None,
        }
    }
}

/// Pieces of a shard's ranges for the tasks that gather it: `(range, start,
/// end)` with starts at multiples of `span` from each range's start.
fn tile_tasks(ranges: &[Range<usize>], span: usize) -> Vec<(usize, usize, usize)> {
    ranges
        .iter()
        .enumerate()
        .flat_map(|(ri, r)| {
            (0..r.len())
                .step_by(span.max(1))
                .map(move |t0| (ri, t0, (t0 + span).min(r.len())))
        })
        .collect()
}

/// A buffer many tasks write disjoint parts of (the gathers of
/// `KvShard::build` and `PairShard::build`).
struct Shared<T>(*mut T);
impl<T> Clone for Shared<T> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<T> Copy for Shared<T> {}
// SAFETY: only used for writes to disjoint ranges, by tasks that end
// before the buffer is read or dropped.
unsafe impl<T> Send for Shared<T> {}
unsafe impl<T> Sync for Shared<T> {}

impl<T> Shared<T> {
    fn at(self, i: usize) -> *mut T {
        // SAFETY (callers): `i` is inside the allocation.
        unsafe { self.0.add(i) }
    }
}

/// Asks for `x`'s cache lines ahead of use (a hint; nothing on other targets).
#[inline]
fn prefetch<T>(x: &[T]) {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T0};
        let bytes = std::mem::size_of_val(x);
        let p = x.as_ptr() as *const i8;
        for off in (0..bytes).step_by(64) {
            // SAFETY: prefetching is a hint and never faults; the address is
            // inside `x`.
            unsafe { _mm_prefetch::<_MM_HINT_T0>(p.add(off)) };
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = x;
}

/// Rows per step of the transposes into tiles ([`put_columns`]).
const ROWS: usize = 8;

/// `row` with the feature map applied (into `buf`), or `row` itself for
/// the identity map.
fn map_row<'r>(map: FeatureMap, row: &'r [f32], buf: &'r mut [f32]) -> &'r [f32] {
    if map == FeatureMap::Identity {
        return row;
    }
    let buf = &mut buf[..row.len()];
    feature_row(map, row, 1.0, buf);
    buf
}

/// A rank's running result for its queries, `[batch][head][position]`:
/// unnormalised output `o`, row max `m` (softmax only) and row sum `l`.
pub(super) struct Acc<T> {
    pub o: Vec<T>,
    pub m: Vec<T>,
    pub l: Vec<T>,
}

/// One unit of parallel work: a query block of one (batch, head).
struct Item<'s, T> {
    b: usize,
    h: usize,
    qr: usize,
    qb: usize,
    o: &'s mut [T],
    m: &'s mut [T],
    l: &'s mut [T],
}

pub(super) fn rank_main<T: Real>(
    ctx: &Ctx<'_, T>,
    sched: &RingSchedule,
    ep: Endpoint<Arc<KvShard<T>>>,
) -> Result<RankOutput<T>> {
    if super::decode::applies(ctx, sched) {
        return Ok(super::decode::rank_main(ctx, sched));
    }
    if super::fft::applies(ctx, sched) {
        return Ok(super::fft::rank_main(ctx));
    }
    let r = ep.rank;
    let q_ranges = sched.shard(r).to_vec();
    let (_, nq) = offsets(&q_ranges);
    let (bh, dv) = (ctx.batch * ctx.heads, ctx.dv);
    // One step (one rank): each query block's rows are final when its item
    // ends, and go to the output directly (`Ctx::direct`), so no buffer of
    // every row is kept.
    let direct = ctx.direct.is_some() && sched.ranks == 1;
    let mut acc = Acc {
        o: written(if direct { 0 } else { bh * nq * dv }, T::ZERO),
        m: vec![T::NEG_INF; bh * nq],
        l: written(bh * nq, T::ZERO),
    };
    let mut stats = RankStats::default();
    let mut held = Arc::new(KvShard::build(ctx, sched.kv_shard(r)));
    for step in 0..sched.ranks {
        // Pass the shard on before computing with it, so the transfer overlaps
        // the computation (double buffering: `held` and the one in flight).
        if step + 1 < sched.ranks {
            ep.send_next(Arc::clone(&held))?;
        }
        let plans: Vec<Vec<BlockPlan>> = q_ranges
            .iter()
            .map(|q| {
                held.ranges
                    .iter()
                    .map(|k| BlockPlan::new(&ctx.spec.mask, ctx.tiling, q.clone(), k.clone()))
                    .collect()
            })
            .collect();
        // Without segment ids or `b` in the mask the plan is the same for every batch row.
        let rows_to_check = if ctx.segs.first().is_some_and(|s| s.entries.is_empty())
            && !ctx.spec.mask.uses_var(mixc_dsl::ir::Var::B)
        {
            ctx.batch.min(1)
        } else {
            ctx.batch
        };
        let empty = (0..rows_to_check).all(|b| {
            plans
                .iter()
                .flatten()
                .all(|p| p.is_empty(&ctx.tiles_of(b, None)))
        });
        if empty {
            stats.steps_skipped += 1;
        } else {
            stats.steps_computed += 1;
            let s = step_compute(ctx, &plans, &held, &mut acc, nq);
            stats.pairs += s.pairs;
            stats.tiles.full += s.tiles.full;
            stats.tiles.partial += s.tiles.partial;
            stats.tiles.skip += s.tiles.skip;
        }
        if step + 1 < sched.ranks {
            held = ep.recv()?;
        }
    }
    stats.direct = direct;
    let (y, stat) = finalize(ctx, acc, nq);
    Ok(RankOutput {
        ranges: q_ranges,
        y,
        stat,
        stats,
    })
}

/// A vector of `len` copies of `x`, written now. `vec![0.0; n]` maps
/// zero pages lazily, and the workers' first read-then-write of each page
/// then costs a copy-on-write fault with a TLB shootdown across threads.
pub(super) fn written<T: Copy>(len: usize, x: T) -> Vec<T> {
    let mut v = Vec::with_capacity(len);
    v.resize(len, x);
    v
}

/// Normalised outputs `[batch][head][position][dv]` of a rank and each
/// row's statistic (log-sum-exp for softmax, weight sum for sum).
/// Consumes the accumulator so the output reuses its buffer.
pub(super) fn finalize<T: Real>(ctx: &Ctx<'_, T>, acc: Acc<T>, nq: usize) -> (Vec<T>, Vec<f64>) {
    let dv = ctx.dv;
    let stat = match ctx.spec.norm {
        _ if !ctx.keep_stat => Vec::new(),
        Norm::Softmax => acc
            .m
            .iter()
            .zip(&acc.l)
            .map(|(&m, &l)| {
                if m == T::NEG_INF || l == T::ZERO {
                    f64::NEG_INFINITY
                } else {
                    m.to_f64() + l.to_f64().ln()
                }
            })
            .collect(),
        Norm::Sum { .. } => acc.l.iter().map(|l| l.to_f64()).collect(),
        Norm::None => vec![0.0; acc.l.len()],
    };
    let mut y = acc.o;
    for (row, yr) in y.chunks_mut(dv).enumerate() {
        normalise_row(ctx.spec.norm, yr, acc.m[row], acc.l[row]);
    }
    debug_assert!(y.is_empty() || y.len() == ctx.batch * ctx.heads * nq * dv);
    (y, stat)
}

/// A finished row of weighted values `y`, with its running max `m` and
/// weight sum `l`, normalised as `norm` says.
fn normalise_row<T: Real>(norm: Norm, y: &mut [T], m: T, l: T) {
    match norm {
        Norm::Softmax => {
            // No visible key: m stays -inf and the row is exactly 0.
            if m == T::NEG_INF || l == T::ZERO {
                y.iter_mut().for_each(|x| *x = T::ZERO);
            } else {
                scale(y, T::ONE / l);
            }
        }
        Norm::Sum { eps } => scale(y, T::ONE / (l + T::from_f64(eps))),
        Norm::None => {}
    }
}

#[derive(Default)]
struct StepStats {
    pairs: u64,
    tiles: ClassCounts,
}

fn step_compute<T: Real>(
    ctx: &Ctx<'_, T>,
    plans: &[Vec<BlockPlan>],
    shard: &KvShard<T>,
    acc: &mut Acc<T>,
    nq: usize,
) -> StepStats {
    let dv = ctx.dv;
    let mut items = Vec::new();
    // No accumulator when the rows go to the output directly: every item
    // then takes an empty one.
    let o_len = if acc.o.is_empty() { 0 } else { nq * dv };
    let mut o_rest: &mut [T] = &mut acc.o;
    let per_bh = acc.m.chunks_mut(nq).zip(acc.l.chunks_mut(nq));
    for (bh, (mut m, mut l)) in per_bh.enumerate() {
        let (mut o, rest) = std::mem::take(&mut o_rest).split_at_mut(o_len);
        o_rest = rest;
        for (qr, row_plans) in plans.iter().enumerate() {
            let plan = &row_plans[0];
            for qb in 0..plan.num_query_blocks() {
                let len = plan.query_block(qb).len();
                let o_len = if o.is_empty() { 0 } else { len * dv };
                let (o1, o2) = std::mem::take(&mut o).split_at_mut(o_len);
                let (m1, m2) = std::mem::take(&mut m).split_at_mut(len);
                let (l1, l2) = std::mem::take(&mut l).split_at_mut(len);
                (o, m, l) = (o2, m2, l2);
                items.push(Item {
                    b: bh / ctx.heads,
                    h: bh % ctx.heads,
                    qr,
                    qb,
                    o: o1,
                    m: m1,
                    l: l1,
                });
            }
        }
    }
    let add = |a: StepStats, b: StepStats| StepStats {
        pairs: a.pairs + b.pairs,
        tiles: ClassCounts {
            skip: a.tiles.skip + b.tiles.skip,
            full: a.tiles.full + b.tiles.full,
            partial: a.tiles.partial + b.tiles.partial,
        },
    };
    if inline(ctx, items.len()) {
        let mut scratch = Scratch::default();
        return items
            .into_iter()
            .map(|it| compute_item(ctx, plans, shard, it, &mut scratch))
            .fold(StepStats::default(), add);
    }
    ctx.pool.install(|| {
        items
            .into_par_iter()
            .map_init(Scratch::default, |scratch, it| {
                compute_item(ctx, plans, shard, it, scratch)
            })
            .reduce(StepStats::default, add)
    })
}

/// Whether `work_items` pieces of work run on the calling thread: one piece,
/// or a one-thread pool, gains nothing from a hand-off to the pool's worker
/// (tens of microseconds of wake-up, which dominates a tiny call).
fn inline<T>(ctx: &Ctx<'_, T>, work_items: usize) -> bool {
    work_items <= 1 || ctx.pool.current_num_threads() <= 1
}

/// Per-worker buffers of [`compute_item`], reused across items so the hot
/// loop never allocates.
struct Scratch<T> {
    /// The query tile, feature map and scale applied, transposed: `d_k x block_m`.
    q: Vec<T>,
    /// The partial over the held shard: output, row max, row sum.
    po: Vec<T>,
    pm: Vec<T>,
    pl: Vec<T>,
    /// Scores, then probabilities, of one tile, transposed: `block_n x block_m`.
    s: Vec<T>,
    /// Registers of the bias / transform lane programs.
    lanes: ExprScratch<T>,
    /// bf16 products only: the query tile and the tile's probabilities as
    /// pairs, and one query row (mapped, then paired) on its way in.
    q16: Vec<u32>,
    p16: Vec<u32>,
    q_row: Vec<f32>,
    q_pairs: Vec<u32>,
    /// f32/f64 products: up to [`ROWS`] query rows, mapped and scaled, on
    /// their way into `q`.
    q_mapped: Vec<T>,
}

impl<T> Default for Scratch<T> {
    fn default() -> Self {
        Scratch {
            q: Vec::new(),
            po: Vec::new(),
            pm: Vec::new(),
            pl: Vec::new(),
            s: Vec::new(),
            lanes: ExprScratch::default(),
            q16: Vec::new(),
            p16: Vec::new(),
            q_row: Vec::new(),
            q_pairs: Vec::new(),
            q_mapped: Vec::new(),
        }
    }
}

/// An f32 tile as f32: the bf16 products run only in f32 runs (`Ctx::bf16`).
fn f32s<T: Real>(x: &mut [T]) -> &mut [f32] {
    assert_eq!(
        std::any::TypeId::of::<T>(),
        std::any::TypeId::of::<f32>(),
        "bf16 products in an f64 run"
    );
    // SAFETY: `T` is `f32` (checked above), so the slice is reinterpreted as itself.
    unsafe { std::slice::from_raw_parts_mut(x.as_mut_ptr() as *mut f32, x.len()) }
}

/// `v` resized to `len` and filled with `x`.
pub(super) fn reset<T: Copy>(v: &mut Vec<T>, len: usize, x: T) -> &mut [T] {
    v.clear();
    v.resize(len, x);
    v
}

/// Computes one query block's partial over the held shard, then merges it
/// into the rank's accumulator exactly as partials from different ranks merge.
fn compute_item<T: Real>(
    ctx: &Ctx<'_, T>,
    plans: &[Vec<BlockPlan>],
    shard: &KvShard<T>,
    it: Item<'_, T>,
    scratch: &mut Scratch<T>,
) -> StepStats {
    let (b, h) = (it.b, it.h);
    let segs = ctx.tiles_of(b, Some(h));
    let row_plans = &plans[it.qr];
    let rows: Vec<RowPlan> = row_plans.iter().map(|p| p.row(it.qb, &segs)).collect();
    let mut stats = StepStats::default();
    for r in &rows {
        let c = r.counts();
        stats.pairs += r.pairs_computed;
        stats.tiles.full += c.full;
        stats.tiles.partial += c.partial;
        stats.tiles.skip += c.skip;
    }
    if rows.iter().all(|r| r.k_blocks.is_empty()) {
        return stats;
    }
    let q = row_plans[0].query_block(it.qb);
    let nrows = q.len();
    let (dk, dv) = (ctx.dk, ctx.dv);
    let kvh = ctx.spec.kv_head_of(h as u32) as usize;
    let softmax = matches!(ctx.spec.norm, Norm::Softmax);

    // The query tile, feature map and scale applied once, transposed
    // (`d_k x rows`) so that each tile's scores come out transposed too:
    // `Sᵀ = K Qᵀ` puts queries on the contiguous axis, where the softmax is
    // plain vector arithmetic and `Pᵀ` is the operand `O += P V` wants.
    // With bf16 products the tile is pairs of dims (`dk2 x rows`), unscaled
    // (the scale multiplies the f32 scores, so bf16 inputs stay exact).
    let pairs = shard.pairs.as_ref();
    let (qlen, q16len) = match pairs {
        Some(ps) => (0, ps.dk2 * nrows),
        None => (dk * nrows, 0),
    };
    let qt = reset(&mut scratch.q, qlen, T::ZERO);
    let q16 = reset(&mut scratch.q16, q16len, 0);
    let mut score_scale = 1.0;
    if let Score::Dot { q_map, scale, .. } = &ctx.spec.score {
        // A head's query rows lie a page or more apart in the input, where
        // the hardware prefetchers stop: fetch a few rows ahead by hand.
        const AHEAD: usize = 8;
        let q_at = |i: usize| ctx.q_at(b, i - ctx.q_offset, h);
        for i in q.clone().take(AHEAD) {
            prefetch(ctx.q.bytes(q_at(i), dk));
        }
        let mut widened = Vec::new();
        let scale_t = T::from_f64(*scale);
        let mapped = reset(
            &mut scratch.q_mapped,
            if pairs.is_some() { 0 } else { ROWS * dk },
            T::ZERO,
        );
        for (r, i) in q.clone().enumerate() {
            if i + AHEAD < q.end {
                prefetch(ctx.q.bytes(q_at(i + AHEAD), dk));
            }
            let row = ctx.q.row(q_at(i), dk, &mut widened);
            if pairs.is_none() {
                // Mapped and scaled a row at a time, transposed `ROWS` rows
                // at a time.
                let at = r % ROWS;
                feature_row(*q_map, row, scale_t, &mut mapped[at * dk..][..dk]);
                if at + 1 == ROWS || r + 1 == nrows {
                    put_columns(&mapped[..(at + 1) * dk], dk, qt, nrows, r - at);
                }
            } else {
                let (mapped, row_pairs) = (&mut scratch.q_row, &mut scratch.q_pairs);
                mapped.resize(dk, 0.0);
                row_pairs.resize(dk.div_ceil(2), 0);
                bf16::pack_row(map_row(*q_map, row, mapped), row_pairs);
                for (p, &x) in row_pairs.iter().enumerate() {
                    q16[p * nrows + r] = x;
                }
            }
        }
        score_scale = *scale as f32;
    }
    let (qt, q16) = (&*qt, &*q16);
    let po = reset(&mut scratch.po, nrows * dv, T::ZERO);
    let pm = reset(&mut scratch.pm, nrows, T::NEG_INF);
    let pl = reset(&mut scratch.pl, nrows, T::ZERO);
    let stile = reset(&mut scratch.s, ctx.tiling.block_n * nrows, T::ZERO);
    // Tiles with nothing but `q . k` scores need no per-pair pass when Full.
    let plain = ctx.filter.is_none()
        && ctx.bias_at(b, h).is_none()
        && ctx.transform_at(b, h).is_none()
        && !ctx.has_decay;

    for (ri, ((row, plan), (&k_off, k_range))) in rows
        .iter()
        .zip(row_plans)
        .zip(shard.offsets.iter().zip(&shard.ranges))
        .enumerate()
    {
        for (keys, class) in row.tiles(plan) {
            let kn = keys.len();
            let base = (b * ctx.kv_heads + kvh) * shard.n + k_off + keys.start - k_range.start;
            // Sᵀ: `kn x rows`.
            let st = &mut stile[..kn * nrows];
            let pair_base = pairs.map(|ps| {
                (b * ctx.kv_heads + kvh) * ps.n + ps.offsets[ri] + keys.start - k_range.start
            });
            if let (Some(ps), Some(pb)) = (pairs, pair_base) {
                debug_assert!(pb.is_multiple_of(2), "key tiles start at even pair rows");
                bf16::gemm(
                    false,
                    bf16::Pairs::dense(&ps.k[pb * ps.dk2..(pb + kn) * ps.dk2], kn, ps.dk2),
                    bf16::Pairs::dense(q16, ps.dk2, nrows),
                    f32s(st),
                    nrows,
                    kn,
                    score_scale,
                    false,
                );
            } else if !shard.k.is_empty() {
                let kt = &shard.k[base * dk..(base + kn) * dk];
                gemm_tn(
                    Mat::dense(kt, dk, kn),
                    Mat::dense(qt, dk, nrows),
                    MatMut::dense(st, kn, nrows),
                    false,
                );
            }
            if !plain || class == BlockClass::Partial {
                pair_pass(
                    ctx,
                    b,
                    h,
                    q.start,
                    &keys,
                    class,
                    softmax,
                    st,
                    nrows,
                    0..nrows,
                    &mut scratch.lanes,
                );
            }
            if softmax {
                softmax_cols(st, kn, pm, pl, po);
            } else {
                col_sums_add(st, pl);
            }
            if let (Some(ps), Some(pb)) = (pairs, pair_base) {
                let kn2 = kn.div_ceil(2);
                let p16 = reset(&mut scratch.p16, kn2 * nrows, 0);
                bf16::pack_row_pairs(f32s(st), kn, nrows, p16);
                bf16::gemm(
                    true,
                    bf16::Pairs::dense(p16, kn2, nrows),
                    bf16::Pairs::dense(&ps.v[pb / 2 * dv..(pb / 2 + kn2) * dv], kn2, dv),
                    f32s(po),
                    dv,
                    nrows,
                    1.0,
                    true,
                );
            } else {
                gemm_tn(
                    Mat::dense(st, kn, nrows),
                    Mat::dense(&shard.v[base * dv..(base + kn) * dv], kn, dv),
                    MatMut::dense(po, nrows, dv),
                    true,
                );
            }
        }
    }
    match ctx.direct {
        Some(sink) if it.o.is_empty() => {
            // The block's rows are final: normalise them into the output.
            it.m.copy_from_slice(pm);
            it.l.copy_from_slice(pl);
            for (r, i) in q.clone().enumerate() {
                let y = &mut po[r * dv..(r + 1) * dv];
                normalise_row(ctx.spec.norm, y, pm[r], pl[r]);
                sink(b, i - ctx.q_offset, h, y);
            }
        }
        _ => merge(softmax, po, pm, pl, it.o, it.m, it.l, dv),
    }
    stats
}

/// The per-pair part of a tile's transposed scores `st` (`keys x width`,
/// holding `q . k` for dot scores), for head `h` whose queries (positions
/// `q0..`) are the lanes `lanes_of_h` of each key's row: masked pairs become
/// `-inf` under softmax (so `e^s = 0`) and 0 otherwise (so they add
/// nothing); filter scores, bias, transform and decay are applied to the
/// rest. Only Partial tiles and specs with a bias, transform, decay or filter
/// come here.
#[allow(clippy::too_many_arguments)]
pub(super) fn pair_pass<T: Real>(
    ctx: &Ctx<'_, T>,
    b: usize,
    h: usize,
    q0: usize,
    keys: &Range<usize>,
    class: BlockClass,
    softmax: bool,
    st: &mut [T],
    width: usize,
    lanes_of_h: Range<usize>,
    lanes: &mut ExprScratch<T>,
) {
    let masked = if softmax { T::NEG_INF } else { T::ZERO };
    let partial = class == BlockClass::Partial;
    let seg = |name: &str, pos: i64| ctx.inputs.extra[name].get_clamped(&[b as i64, pos]) as i64;
    let lookup = |name: &str, idx: &[i64]| ctx.inputs.extra[name].get_clamped(idx);
    let mut at = ctx.inputs.eval_env(ctx.spec.heads, &lookup);
    (at.b, at.h) = (b as i64, h as i64);
    let bias = ctx.bias_at(b, h);
    let transform = ctx.transform_at(b, h);
    // Filter scores replace `q . k` and take no bias / transform.
    let scored = ctx.filter.is_none() && (bias.is_some() || transform.is_some());
    // What is left per pair once bias / transform are applied row-wise.
    let per_pair = partial || ctx.filter.is_some() || ctx.has_decay;
    // A mask with conditions: evaluated over the row at once, like a bias.
    let mask = if partial { ctx.mask_at(b, h) } else { None };
    let mut seen = Vec::new();
    for (full_row, j) in st.chunks_exact_mut(width).zip(keys.clone()) {
        let srow = &mut full_row[lanes_of_h.clone()];
        if let Some(e) = mask {
            seen.clear();
            seen.resize(srow.len(), T::ZERO);
            e.add_to(q0 as i64, j as i64, &mut seen, lanes);
        }
        if scored {
            // One key, a row of queries `i = q0 + lane`: the compiled
            // programs run over the whole row at once. Masked lanes are
            // computed too (cheaper than gathering) and overwritten below.
            let (i0, j) = (q0 as i64, j as i64);
            if let Some(e) = bias {
                e.add_to(i0, j, srow, lanes);
            }
            if let Some(e) = transform {
                e.apply_to(i0, j, srow, lanes);
            }
        }
        if !per_pair {
            continue;
        }
        for (r, x) in srow.iter_mut().enumerate() {
            let i = q0 + r;
            (at.i, at.j) = (i as i64, j as i64);
            let hidden = match mask {
                Some(_) => seen[r] == T::ZERO,
                None => partial && !ctx.spec.mask.allows(&at, &seg),
            };
            if hidden {
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

/// Merges a partial `(po, pm, pl)` into `(o, m, l)`: the online-softmax merge
/// for softmax (`m = max`, both sides rescaled by `e^(m_side - m)`), plain
/// addition for sum / none.
#[allow(clippy::too_many_arguments)]
pub(super) fn merge<T: Real>(
    softmax: bool,
    po: &[T],
    pm: &[T],
    pl: &[T],
    o: &mut [T],
    m: &mut [T],
    l: &mut [T],
    dv: usize,
) {
    for r in 0..pm.len() {
        let (src, dst) = (&po[r * dv..(r + 1) * dv], &mut o[r * dv..(r + 1) * dv]);
        if !softmax {
            dst.iter_mut().zip(src).for_each(|(d, s)| *d += *s);
            l[r] += pl[r];
            continue;
        }
        if pm[r] == T::NEG_INF {
            continue; // the partial saw no key
        }
        let m_new = m[r].max(pm[r]);
        let (a1, a2) = ((m[r] - m_new).exp(), (pm[r] - m_new).exp());
        for (d, s) in dst.iter_mut().zip(src) {
            *d = *d * a1 + *s * a2;
        }
        l[r] = l[r] * a1 + pl[r] * a2;
        m[r] = m_new;
    }
}

impl<T: Real> Ctx<'_, T> {
    /// `D(i, j)` for `j <= i` on the blocked path.
    #[inline]
    pub(super) fn decay(&self, b: usize, h: usize, i: usize, j: usize) -> f64 {
        match &self.spec.decay {
            Decay::None => 1.0,
            Decay::PerHead(_) => (self.log_gamma[h] * (i - j) as f64).exp(),
            Decay::Gate { .. } => {
                let n = self.positions;
                let c = &self.gate_cum[(b * self.heads + h) * n..][..n];
                (c[i] - c[j]).exp()
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::{run, CpuConfig};
    use crate::inputs::random_inputs;

    /// Zero-width heads (possible only in hand-built specs) are a clear
    /// error, not a panic in the tile kernels.
    #[test]
    fn zero_width_heads_are_rejected() {
        let src = "mixer m { heads = 2; head_dim = 8; score = dot(q, k); mask = causal; norm = softmax; }";
        let spec = mixc_dsl::parse_str(src).expect("valid spec");
        let inputs = random_inputs(&spec, 1, 16, 0);
        for (dk, dv) in [(0, 8), (8, 0)] {
            let mut s = spec.clone();
            (s.head_dim, s.value_dim) = (dk, dv);
            let err = run(&s, &inputs, &CpuConfig::default_for(&s, 16)).unwrap_err();
            assert!(err.to_string().contains("= 0 is out of range"), "{err}");
        }
        assert!(run(&spec, &inputs, &CpuConfig::default_for(&spec, 16)).is_ok());
    }
}
