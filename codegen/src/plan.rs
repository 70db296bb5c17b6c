//! The block plan: which (query block, key block) tiles of a mixer exist, and
//! how each must be computed. Shared by the CUDA templates (which mirror these
//! closed forms) and the CPU backend (which calls them directly).
//!
//! A tile is the rectangle `q x k` of query positions `q = q0..q1` and key
//! positions `k = k0..k1` (global, 0-based). Its class is
//! - `Skip`: no pair in it is allowed; it is never visited.
//! - `Full`: every pair in it is allowed; it is computed without mask arithmetic.
//! - `Partial`: anything else (or unsure); computed with a per-element mask test.
//!
//! The classifier is exact for every closed-form primitive on its own, and
//! sound (never a wrong `Skip`/`Full`, sometimes a cautious `Partial`) for
//! `&&` / `||` combinations and for `segment`, which is judged from a per-block
//! min/max summary of the segment ids computed from the data at run time.
//! Expression masks are judged by bounding the expression over the tile
//! (`mixc_dsl::bounds`), per head and batch row where the caller says which.

use mixc_dsl::bounds::{self, Known, TableRead, Tile, Truth};
use mixc_dsl::ir::Mask;
use serde::{Deserialize, Serialize};
use std::ops::Range;

/// Tile sizes of the quadratic (softmax / blocked) paths.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Tiling {
    pub block_m: usize,
    pub block_n: usize,
}

/// How one tile is computed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BlockClass {
    Skip,
    Full,
    Partial,
}

impl BlockClass {
    /// Class of the intersection of two masks over the same tile.
    pub fn and(self, other: BlockClass) -> BlockClass {
        use BlockClass::*;
        match (self, other) {
            (Skip, _) | (_, Skip) => Skip,
            (Full, Full) => Full,
            _ => Partial,
        }
    }
    /// Class of the union of two masks over the same tile.
    pub fn or(self, other: BlockClass) -> BlockClass {
        use BlockClass::*;
        match (self, other) {
            (Full, _) | (_, Full) => Full,
            (Skip, Skip) => Skip,
            _ => Partial,
        }
    }
}

/// The smallest and largest segment id over a range of positions.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct SegRange {
    pub min: i64,
    pub max: i64,
}

/// What the classifier may know about segment ids. `None` means "unknown",
/// which makes every `segment` test `Partial` (always sound).
pub trait SegmentInfo {
    /// Min/max of input `input`'s ids over `range` (non-empty).
    fn range(&self, input: &str, range: Range<usize>) -> Option<SegRange>;
    /// What is known of `b`, `h` and the lengths for the tiles classified
    /// (expression masks read them); nothing by default, which is sound.
    fn known(&self) -> Known {
        Known::default()
    }
    /// The input tables' data, which bounds table reads in expression masks.
    fn tables(&self) -> Option<&dyn TableRead> {
        None
    }
}

/// Segment information plus the batch row, head and lengths of the tiles
/// being classified, so expression masks over `h` or `b` classify per head.
pub struct At<'a> {
    pub segs: &'a dyn SegmentInfo,
    pub known: Known,
    pub tables: Option<&'a dyn TableRead>,
}

impl SegmentInfo for At<'_> {
    fn range(&self, input: &str, range: Range<usize>) -> Option<SegRange> {
        self.segs.range(input, range)
    }
    fn known(&self) -> Known {
        self.known
    }
    fn tables(&self) -> Option<&dyn TableRead> {
        self.tables
    }
}

/// No segment information: `segment` masks classify as `Partial`.
pub struct NoSegments;

impl SegmentInfo for NoSegments {
    fn range(&self, _: &str, _: Range<usize>) -> Option<SegRange> {
        None
    }
}

/// Per-block min/max of one sequence's segment ids (one batch row of one
/// input). Range queries combine whole blocks and scan the ragged ends, so a
/// query costs `O(len / block + block)` and the summary `O(seq / block)` memory.
/// Sorted ids (packed documents) make most cross-document tiles `Skip`;
/// unsorted ids are still handled correctly, only less is skipped.
#[derive(Debug, Clone, PartialEq)]
pub struct SegmentSummary {
    block: usize,
    ids: Vec<i64>,
    blocks: Vec<SegRange>,
}

impl SegmentSummary {
    /// Summarises `ids` in blocks of `block` positions (`block >= 1`).
    pub fn new(ids: impl IntoIterator<Item = i64>, block: usize) -> Self {
        let block = block.max(1);
        let ids: Vec<i64> = ids.into_iter().collect();
        let blocks = ids
            .chunks(block)
            .map(|c| SegRange {
                min: *c.iter().min().expect("chunks are non-empty"),
                max: *c.iter().max().expect("chunks are non-empty"),
            })
            .collect();
        SegmentSummary { block, ids, blocks }
    }

    /// The per-block summaries (what a kernel receives as a run-time array).
    pub fn blocks(&self) -> &[SegRange] {
        &self.blocks
    }

    /// Min/max over `range`; `None` when the range is empty or out of bounds.
    pub fn range(&self, range: Range<usize>) -> Option<SegRange> {
        if range.is_empty() || range.end > self.ids.len() {
            return None;
        }
        let b = self.block;
        let mut acc = SegRange {
            min: i64::MAX,
            max: i64::MIN,
        };
        let mut add = |r: SegRange| {
            acc.min = acc.min.min(r.min);
            acc.max = acc.max.max(r.max);
        };
        let first_full = range.start.div_ceil(b);
        let last_full = range.end / b; // exclusive
        if first_full >= last_full {
            for &x in &self.ids[range] {
                add(SegRange { min: x, max: x });
            }
        } else {
            for &x in &self.ids[range.start..first_full * b] {
                add(SegRange { min: x, max: x });
            }
            for &r in &self.blocks[first_full..last_full] {
                add(r);
            }
            for &x in &self.ids[last_full * b..range.end] {
                add(SegRange { min: x, max: x });
            }
        }
        Some(acc)
    }
}

/// Segment summaries by input name (one batch row).
#[derive(Debug, Clone, Default)]
pub struct SegmentSummaries {
    pub entries: Vec<(String, SegmentSummary)>,
}

impl SegmentInfo for SegmentSummaries {
    fn range(&self, input: &str, range: Range<usize>) -> Option<SegRange> {
        self.entries
            .iter()
            .find(|(n, _)| n == input)
            .and_then(|(_, s)| s.range(range))
    }
}

/// Classifies the tile `q x k` (both non-empty) against `mask`.
pub fn classify(
    mask: &Mask,
    q: Range<usize>,
    k: Range<usize>,
    segs: &dyn SegmentInfo,
) -> BlockClass {
    use BlockClass::*;
    debug_assert!(!q.is_empty() && !k.is_empty());
    let (q0, q1) = (q.start as i64, q.end as i64 - 1); // inclusive bounds
    let (k0, k1) = (k.start as i64, k.end as i64 - 1);
    // d = i - j takes every integer value in [dmin, dmax] over a rectangle.
    let (dmin, dmax) = (q0 - k1, q1 - k0);
    match mask {
        Mask::All => Full,
        Mask::Expr(e) => {
            let tile = Tile {
                i: (q0, q1),
                j: (k0, k1),
                known: segs.known(),
                tables: segs.tables(),
            };
            match bounds::truth(e, &tile) {
                Truth::Always => Full,
                Truth::Never => Skip,
                Truth::Sometimes => Partial,
            }
        }
        Mask::Causal => {
            if dmin >= 0 {
                Full
            } else if dmax < 0 {
                Skip
            } else {
                Partial
            }
        }
        Mask::Window { size } => {
            let w = *size as i64;
            if w == 0 {
                Skip
            } else if dmin > -w && dmax < w {
                Full
            } else if dmin >= w || dmax <= -w {
                Skip
            } else {
                Partial
            }
        }
        Mask::PrefixLm { prefix } => {
            let p = *prefix as i64;
            // Allowed: j < p, or d >= 0. Keys at or past the prefix need j <= i
            // for the smallest i, which is exactly dmin >= 0.
            if k1 < p || dmin >= 0 {
                Full
            } else if k0 >= p && dmax < 0 {
                Skip
            } else {
                Partial
            }
        }
        Mask::BlockSparse {
            block,
            local,
            global,
        } => {
            let b = (*block).max(1) as i64;
            let (local, global) = (*local as i64, *global as i64);
            // Every (bi, bj) in the block-index rectangle is realised by some pair.
            let (a0, a1, c0, c1) = (q0 / b, q1 / b, k0 / b, k1 / b);
            // Pairs can fail only where both block indices are >= global.
            let (fa0, fc0) = (a0.max(global), c0.max(global));
            let full = fa0 > a1 || fc0 > c1 || (a1 - fc0).max(c1 - fa0) < local;
            if full {
                return Full;
            }
            if a0 < global || c0 < global {
                return Partial;
            }
            let mindist = if a1 < c0 {
                c0 - a1
            } else if c1 < a0 {
                a0 - c1
            } else {
                0
            };
            if mindist >= local {
                Skip
            } else {
                Partial
            }
        }
        Mask::Dilated { rate } => {
            let r = *rate as i64;
            if r == 1 {
                Full
            } else if r < 1 {
                Partial
            } else if dmin == dmax && dmin.rem_euclid(r) == 0 {
                Full
            } else if dmin.div_euclid(r) == dmax.div_euclid(r) && dmin.rem_euclid(r) != 0 {
                // No multiple of r in [dmin, dmax].
                Skip
            } else {
                Partial
            }
        }
        Mask::Segment { input } => {
            match (segs.range(input, q.clone()), segs.range(input, k.clone())) {
                (Some(a), Some(b)) => {
                    if a.max < b.min || b.max < a.min {
                        Skip
                    } else if a.min == a.max && b.min == b.max && a.min == b.min {
                        Full
                    } else {
                        Partial
                    }
                }
                _ => Partial,
            }
        }
        Mask::And(a, b) => {
            let ca = classify(a, q.clone(), k.clone(), segs);
            if ca == Skip {
                return Skip;
            }
            ca.and(classify(b, q, k, segs))
        }
        Mask::Or(a, b) => {
            let ca = classify(a, q.clone(), k.clone(), segs);
            if ca == Full {
                return Full;
            }
            ca.or(classify(b, q, k, segs))
        }
    }
}

/// A superset of the keys in `keys` that any query in `q` may see, as one
/// contiguous range (possibly empty). Used to bound the key-block loop before
/// classifying blocks, so causal loops stop at the diagonal and windows start
/// late without classifying every key block of a long sequence.
pub fn key_hull(mask: &Mask, q: Range<usize>, keys: Range<usize>) -> Range<usize> {
    let hull = key_hull_unclipped(mask, q.start as i64, q.end as i64);
    let lo = hull.0.max(keys.start as i64);
    let hi = hull.1.min(keys.end as i64);
    if lo >= hi {
        keys.start..keys.start
    } else {
        lo as usize..hi as usize
    }
}

/// `[lo, hi)` in i64, possibly empty or unbounded (i64::MIN / MAX).
fn key_hull_unclipped(mask: &Mask, q0: i64, q1: i64) -> (i64, i64) {
    const ALL: (i64, i64) = (i64::MIN, i64::MAX);
    if q0 >= q1 {
        return (0, 0);
    }
    match mask {
        Mask::All | Mask::Segment { .. } | Mask::Dilated { .. } | Mask::Expr(_) => ALL,
        Mask::Causal => (i64::MIN, q1),
        Mask::Window { size } => {
            let w = *size as i64;
            if w == 0 {
                (0, 0)
            } else {
                (q0 - w + 1, q1 - 1 + w)
            }
        }
        Mask::PrefixLm { prefix } => (i64::MIN, q1.max(*prefix as i64)),
        Mask::BlockSparse {
            block,
            local,
            global,
        } => {
            let b = (*block).max(1) as i64;
            let (local, global) = (*local as i64, *global as i64);
            let (a0, a1) = (q0 / b, (q1 - 1) / b);
            if a0 < global {
                return ALL;
            }
            // Local band of block indices, plus the global key blocks at the start.
            let (lo_b, hi_b) = (a0 - local + 1, a1 + local); // [lo_b, hi_b) in blocks
            if local == 0 {
                return if global > 0 {
                    (i64::MIN, global * b)
                } else {
                    (0, 0)
                };
            }
            let lo = if global > 0 { i64::MIN } else { lo_b * b };
            (lo, hi_b.max(global) * b)
        }
        Mask::And(a, b) => {
            let (x, y) = (key_hull_unclipped(a, q0, q1), key_hull_unclipped(b, q0, q1));
            (x.0.max(y.0), x.1.min(y.1))
        }
        Mask::Or(a, b) => {
            let (x, y) = (key_hull_unclipped(a, q0, q1), key_hull_unclipped(b, q0, q1));
            match (x.0 < x.1, y.0 < y.1) {
                (false, false) => (0, 0),
                (true, false) => x,
                (false, true) => y,
                (true, true) => (x.0.min(y.0), x.1.max(y.1)),
            }
        }
    }
}

/// The plan of one query block: a contiguous run of key blocks, each classified.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RowPlan {
    /// Query positions of this block.
    pub q: Range<usize>,
    /// Key-block indices (into the plan's key grid) from the first to the
    /// last non-skipped block; empty when the whole row is skipped.
    pub k_blocks: Range<usize>,
    /// Class of each key block in `k_blocks` (Skip may occur inside the run,
    /// e.g. between a local band and global blocks).
    pub classes: Vec<BlockClass>,
    /// Pairs a kernel computes for this row: every pair of every non-skipped tile.
    pub pairs_computed: u64,
}

impl RowPlan {
    /// `(key positions, class)` of each non-skipped tile in loop order.
    pub fn tiles<'a>(
        &'a self,
        plan: &'a BlockPlan,
    ) -> impl Iterator<Item = (Range<usize>, BlockClass)> + 'a {
        self.k_blocks
            .clone()
            .zip(self.classes.iter().copied())
            .filter(|(_, c)| *c != BlockClass::Skip)
            .map(move |(kb, c)| (plan.key_block(kb), c))
    }
    pub fn counts(&self) -> ClassCounts {
        let mut c = ClassCounts::default();
        for cl in &self.classes {
            match cl {
                BlockClass::Skip => c.skip += 1,
                BlockClass::Full => c.full += 1,
                BlockClass::Partial => c.partial += 1,
            }
        }
        c
    }
}

/// Tiles by class.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClassCounts {
    pub skip: u64,
    pub full: u64,
    pub partial: u64,
}

/// The plan of a (query range) x (key range) product under one mask: query
/// blocks of `block_m` and key blocks of `block_n`, both starting at their
/// range's start (so a ring step's shard has its own grid); the last block of
/// each is ragged. Rows are computed on demand ([`BlockPlan::row`]) because a
/// full plan of a long unmasked sequence would be quadratic in size.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BlockPlan {
    pub mask: Mask,
    pub tiling: Tiling,
    pub queries: Range<usize>,
    pub keys: Range<usize>,
}

impl BlockPlan {
    pub fn new(mask: &Mask, tiling: Tiling, queries: Range<usize>, keys: Range<usize>) -> Self {
        assert!(
            tiling.block_m > 0 && tiling.block_n > 0,
            "block sizes must be positive"
        );
        BlockPlan {
            mask: mask.clone(),
            tiling,
            queries,
            keys,
        }
    }
    pub fn num_query_blocks(&self) -> usize {
        self.queries.len().div_ceil(self.tiling.block_m)
    }
    pub fn num_key_blocks(&self) -> usize {
        self.keys.len().div_ceil(self.tiling.block_n)
    }
    pub fn query_block(&self, qb: usize) -> Range<usize> {
        let s = self.queries.start + qb * self.tiling.block_m;
        s..(s + self.tiling.block_m).min(self.queries.end)
    }
    pub fn key_block(&self, kb: usize) -> Range<usize> {
        let s = self.keys.start + kb * self.tiling.block_n;
        s..(s + self.tiling.block_n).min(self.keys.end)
    }

    /// Plans query block `qb`: bounds the key loop by [`key_hull`], classifies
    /// each key block inside it, and trims skipped blocks at both ends.
    pub fn row(&self, qb: usize, segs: &dyn SegmentInfo) -> RowPlan {
        let q = self.query_block(qb);
        let hull = key_hull(&self.mask, q.clone(), self.keys.clone());
        let bn = self.tiling.block_n;
        let mut first = (hull.start - self.keys.start) / bn;
        let end = if hull.is_empty() {
            first
        } else {
            (hull.end - self.keys.start).div_ceil(bn)
        };
        let mut classes: Vec<BlockClass> = (first..end)
            .map(|kb| classify(&self.mask, q.clone(), self.key_block(kb), segs))
            .collect();
        while classes.last() == Some(&BlockClass::Skip) {
            classes.pop();
        }
        let lead = classes
            .iter()
            .take_while(|c| **c == BlockClass::Skip)
            .count();
        classes.drain(..lead);
        first += lead;
        let k_blocks = first..first + classes.len();
        let pairs_computed = k_blocks
            .clone()
            .zip(&classes)
            .filter(|(_, c)| **c != BlockClass::Skip)
            .map(|(kb, _)| (q.len() * self.key_block(kb).len()) as u64)
            .sum();
        RowPlan {
            q,
            k_blocks,
            classes,
            pairs_computed,
        }
    }

    /// True when no tile of the plan needs computing (a ring step to skip).
    pub fn is_empty(&self, segs: &dyn SegmentInfo) -> bool {
        if self.queries.is_empty() || self.keys.is_empty() {
            return true;
        }
        // Cheap exact test on the whole rectangle first, then per row.
        if classify(&self.mask, self.queries.clone(), self.keys.clone(), segs) == BlockClass::Skip {
            return true;
        }
        (0..self.num_query_blocks()).all(|qb| self.row(qb, segs).k_blocks.is_empty())
    }

    /// Pairs computed over the whole plan (sum over rows), for load-balance reports.
    pub fn pairs_computed(&self, segs: &dyn SegmentInfo) -> u64 {
        (0..self.num_query_blocks())
            .map(|qb| self.row(qb, segs).pairs_computed)
            .sum()
    }
}

/// Chunk boundaries of the chunkwise state form over `range`: chunks of
/// `chunk` positions starting at `range.start`, the last one ragged.
pub fn chunks(range: Range<usize>, chunk: usize) -> impl Iterator<Item = Range<usize>> {
    let chunk = chunk.max(1);
    let end = range.end;
    range.step_by(chunk).map(move |s| s..(s + chunk).min(end))
}

/// `gamma^0 ..= gamma^n`: the intra-chunk decay factors of a fixed per-head
/// decay (RetNet), so `D(i, j) = pow[i - j]` inside a chunk of `n` positions
/// and the state decays by `pow[n]` across it.
pub fn decay_powers(gamma: f64, n: usize) -> Vec<f64> {
    let mut out = Vec::with_capacity(n + 1);
    let mut x = 1.0;
    for _ in 0..=n {
        out.push(x);
        x *= gamma;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn prim_masks() -> Vec<Mask> {
        vec![
            Mask::All,
            Mask::Causal,
            Mask::Window { size: 1 },
            Mask::Window { size: 5 },
            Mask::Window { size: 0 },
            Mask::PrefixLm { prefix: 0 },
            Mask::PrefixLm { prefix: 7 },
            Mask::BlockSparse {
                block: 4,
                local: 2,
                global: 1,
            },
            Mask::BlockSparse {
                block: 3,
                local: 0,
                global: 0,
            },
            Mask::BlockSparse {
                block: 5,
                local: 1,
                global: 0,
            },
            Mask::Dilated { rate: 1 },
            Mask::Dilated { rate: 3 },
            Mask::Dilated { rate: 40 },
            Mask::Segment {
                input: "doc".into(),
            },
            expr_mask("j <= i && i - j < 3 * (h + 1)"),
            expr_mask("(i - j) % 3 == 0 || j < 2"),
            expr_mask("div(i, 4) == div(j, 4)"),
        ]
    }

    /// An expression mask parsed by the front end (`h` is 0 in these tests).
    fn expr_mask(src: &str) -> Mask {
        let spec = mixc_dsl::parse_str(&format!(
            "mixer m {{ heads = 2; head_dim = 8; mask = {src}; }}"
        ))
        .unwrap_or_else(|e| panic!("{src}: {e}"));
        assert!(spec.mask.has_expr(), "{src}");
        spec.mask
    }

    /// `mask.allows` at (i, j) of head 0, batch row 0.
    fn allows(mask: &Mask, i: i64, j: i64, seg: &dyn Fn(&str, i64) -> i64) -> bool {
        let lookup = |_: &str, _: &[i64]| 0.0;
        let mut env = mixc_dsl::ir::EvalEnv::for_head(0, 2, &lookup);
        (env.i, env.j) = (i, j);
        mask.allows(&env, seg)
    }

    fn and(a: Mask, b: Mask) -> Mask {
        Mask::And(Box::new(a), Box::new(b))
    }
    fn or(a: Mask, b: Mask) -> Mask {
        Mask::Or(Box::new(a), Box::new(b))
    }

    /// The masks of examples/*.mix, scaled down so small sequences exercise them.
    fn example_masks() -> Vec<Mask> {
        vec![
            Mask::All,
            Mask::Causal,
            Mask::BlockSparse {
                block: 8,
                local: 2,
                global: 1,
            },
            and(
                Mask::Causal,
                or(Mask::Window { size: 9 }, Mask::Dilated { rate: 4 }),
            ),
            and(
                Mask::Causal,
                Mask::Segment {
                    input: "doc".into(),
                },
            ),
            Mask::PrefixLm { prefix: 13 },
            and(Mask::Causal, Mask::Window { size: 11 }),
        ]
    }

    fn seg_ids(seq: usize, seed: u64, sorted: bool) -> Vec<i64> {
        // Small LCG: deterministic ragged documents without extra dependencies.
        let mut x = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        let mut next = || {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (x >> 33) as i64
        };
        let mut ids = Vec::with_capacity(seq);
        let mut doc = 0;
        for _ in 0..seq {
            if sorted {
                if next() % 11 == 0 {
                    doc += 1;
                }
                ids.push(doc);
            } else {
                ids.push(next() % 3);
            }
        }
        ids
    }

    /// Checks the plan of `queries x keys` against brute force: every allowed
    /// pair lies in exactly one non-skipped tile, Full tiles hold only allowed
    /// pairs, Skip tiles none, and pair accounting matches.
    fn check_plan(
        mask: &Mask,
        tiling: Tiling,
        queries: Range<usize>,
        keys: Range<usize>,
        ids: &[i64],
    ) {
        let summaries = SegmentSummaries {
            entries: vec![("doc".into(), SegmentSummary::new(ids.iter().copied(), 4))],
        };
        let seg = |_: &str, p: i64| ids[p as usize];
        let plan = BlockPlan::new(mask, tiling, queries.clone(), keys.clone());
        let nk = plan.num_key_blocks();
        for qb in 0..plan.num_query_blocks() {
            let row = plan.row(qb, &summaries);
            assert_eq!(row.classes.len(), row.k_blocks.len());
            let (nq, nkeys) = (row.q.len(), keys.len());
            let mut covered = vec![0u32; nq * nkeys];
            let mut pairs = 0u64;
            for kb in 0..nk {
                let kr = plan.key_block(kb);
                let class = if row.k_blocks.contains(&kb) {
                    let c = row.classes[kb - row.k_blocks.start];
                    // Inside the run, the row holds the direct classification.
                    assert_eq!(c, classify(mask, row.q.clone(), kr.clone(), &summaries));
                    c
                } else {
                    BlockClass::Skip
                };
                if class != BlockClass::Skip {
                    pairs += (row.q.len() * kr.len()) as u64;
                }
                for i in row.q.clone() {
                    for j in kr.clone() {
                        let ok = allows(mask, i as i64, j as i64, &seg);
                        match class {
                            BlockClass::Skip => assert!(
                                !ok,
                                "{mask:?} {tiling:?}: allowed pair ({i},{j}) in a skipped tile"
                            ),
                            BlockClass::Full => assert!(
                                ok,
                                "{mask:?} {tiling:?}: masked pair ({i},{j}) in a full tile"
                            ),
                            BlockClass::Partial => {}
                        }
                        if ok && class != BlockClass::Skip {
                            covered[(i - row.q.start) * nkeys + j - keys.start] += 1;
                        }
                    }
                }
            }
            // Every allowed pair of the row is visited exactly once, no other.
            for i in row.q.clone() {
                for j in keys.clone() {
                    let ok = allows(mask, i as i64, j as i64, &seg);
                    let c = covered[(i - row.q.start) * nkeys + j - keys.start];
                    assert_eq!(c, ok as u32, "{mask:?}: pair ({i},{j}) coverage");
                }
            }
            assert_eq!(pairs, row.pairs_computed);
        }
    }

    #[test]
    fn primitives_and_examples_are_exact_and_sound() {
        let shapes = [
            (1, 1, 1),
            (37, 16, 16),
            (100, 8, 16),
            (33, 5, 7),
            (64, 16, 8),
        ];
        let mut masks = prim_masks();
        masks.extend(example_masks());
        for mask in &masks {
            for &(seq, bm, bn) in &shapes {
                for sorted in [true, false] {
                    let ids = seg_ids(seq, seq as u64 + bm as u64, sorted);
                    let t = Tiling {
                        block_m: bm,
                        block_n: bn,
                    };
                    check_plan(mask, t, 0..seq, 0..seq, &ids);
                    // A ring step: a query shard against another key shard.
                    if seq > 10 {
                        check_plan(mask, t, seq / 3..seq, 0..seq / 2, &ids);
                        check_plan(mask, t, 0..seq / 3, seq / 2..seq, &ids);
                    }
                }
            }
        }
    }

    /// Exhaustive over small tiles: each primitive is classified exactly (not
    /// just soundly), since their closed forms are claimed exact.
    #[test]
    fn primitive_classification_is_exact() {
        let none = |_: &str, _: i64| 0;
        // Conditions are classified soundly, exactly only where their bounds
        // are (linear in `i - j`): the exact ones are checked here, all of
        // them for soundness by the tests that combine masks.
        let exact_conditions = [
            expr_mask("j <= i && i - j < 3"),
            expr_mask("j < i || i + 2 < j"),
        ];
        for mask in prim_masks()
            .iter()
            .filter(|m| !matches!(m, Mask::Segment { .. }) && !m.has_expr())
            .chain(&exact_conditions)
        {
            for q0 in 0..14 {
                for q1 in q0 + 1..q0 + 6 {
                    for k0 in 0..14 {
                        for k1 in k0 + 1..k0 + 6 {
                            let mut any = false;
                            let mut all = true;
                            for i in q0..q1 {
                                for j in k0..k1 {
                                    let ok = allows(mask, i, j, &none);
                                    any |= ok;
                                    all &= ok;
                                }
                            }
                            let want = if all {
                                BlockClass::Full
                            } else if !any {
                                BlockClass::Skip
                            } else {
                                BlockClass::Partial
                            };
                            let r = |a: i64, b: i64| a as usize..b as usize;
                            let got = classify(mask, r(q0, q1), r(k0, k1), &NoSegments);
                            assert_eq!(got, want, "{mask:?} q {q0}..{q1} k {k0}..{k1}");
                        }
                    }
                }
            }
        }
    }

    /// The masks of examples/*.mix as the parser reads them, at their real
    /// sizes (windows of 512 and 4096, prefix 512, 64-token sparse blocks).
    #[test]
    fn parsed_example_masks_are_sound() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples");
        let mut n = 0;
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.extension().is_none_or(|x| x != "mix") {
                continue;
            }
            let spec = mixc_dsl::parse_file(&path).unwrap();
            let ids = seg_ids(700, 9, true);
            for (bm, bn) in [(64, 64), (128, 32), (48, 80)] {
                let t = Tiling {
                    block_m: bm,
                    block_n: bn,
                };
                check_plan(&spec.mask, t, 0..700, 0..700, &ids);
                check_plan(&spec.mask, t, 520..700, 0..300, &ids);
            }
            n += 1;
        }
        assert!(n >= 14, "only {n} examples found");
    }

    #[test]
    fn causal_rows_stop_at_the_diagonal_and_windows_start_late() {
        let t = Tiling {
            block_m: 16,
            block_n: 16,
        };
        let plan = BlockPlan::new(&Mask::Causal, t, 0..1000, 0..1000);
        let row = plan.row(10, &NoSegments);
        assert_eq!(row.k_blocks, 0..11);
        assert_eq!(
            row.counts(),
            ClassCounts {
                skip: 0,
                full: 10,
                partial: 1
            }
        );
        let w = and(Mask::Causal, Mask::Window { size: 64 });
        let plan = BlockPlan::new(&w, t, 0..1000, 0..1000);
        let row = plan.row(20, &NoSegments);
        // Queries 320..336 see keys 257..=335: blocks 16..=20.
        assert_eq!(row.k_blocks, 16..21);
        assert_eq!(row.classes.first(), Some(&BlockClass::Partial));
        assert_eq!(row.classes.last(), Some(&BlockClass::Partial));
        // Document masks skip tiles across documents.
        let ids: Vec<i64> = (0..1000).map(|p| p / 100).collect();
        let segs = SegmentSummaries {
            entries: vec![("doc".into(), SegmentSummary::new(ids, 16))],
        };
        let d = and(
            Mask::Causal,
            Mask::Segment {
                input: "doc".into(),
            },
        );
        let plan = BlockPlan::new(&d, t, 0..1000, 0..1000);
        let row = plan.row(20, &segs); // queries 320..336, document 3 = 300..400
        assert_eq!(row.k_blocks, 18..21);
        assert!(plan.pairs_computed(&segs) < plan.pairs_computed(&NoSegments) / 5);
        // An all-skipped ring step.
        let plan = BlockPlan::new(&Mask::Causal, t, 0..100, 200..300);
        assert!(plan.is_empty(&NoSegments));
    }

    #[test]
    fn chunk_helpers() {
        let c: Vec<_> = chunks(5..17, 4).collect();
        assert_eq!(c, vec![5..9, 9..13, 13..17]);
        let c: Vec<_> = chunks(0..10, 4).collect();
        assert_eq!(c, vec![0..4, 4..8, 8..10]);
        let p = decay_powers(0.5, 3);
        assert_eq!(p, vec![1.0, 0.5, 0.25, 0.125]);
    }

    fn arb_mask() -> impl Strategy<Value = Mask> {
        let leaf = prop_oneof![
            Just(Mask::All),
            Just(Mask::Causal),
            (0u64..12).prop_map(|size| Mask::Window { size }),
            (0u64..20).prop_map(|prefix| Mask::PrefixLm { prefix }),
            (1u64..6, 0u64..3, 0u64..3).prop_map(|(block, local, global)| Mask::BlockSparse {
                block,
                local,
                global
            }),
            (1u64..6).prop_map(|rate| Mask::Dilated { rate }),
            Just(Mask::Segment {
                input: "doc".into()
            }),
        ];
        leaf.prop_recursive(3, 8, 2, |inner| {
            prop_oneof![
                (inner.clone(), inner.clone()).prop_map(|(a, b)| and(a, b)),
                (inner.clone(), inner).prop_map(|(a, b)| or(a, b)),
            ]
        })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(200))]
        #[test]
        fn random_masks_are_covered_exactly_once(
            mask in arb_mask(),
            seq in 1usize..60,
            bm in 1usize..12,
            bn in 1usize..12,
            seed in 0u64..1000,
            sorted in any::<bool>(),
            split in 0usize..60,
        ) {
            let ids = seg_ids(seq, seed, sorted);
            let t = Tiling { block_m: bm, block_n: bn };
            check_plan(&mask, t, 0..seq, 0..seq, &ids);
            let s = split.min(seq);
            if s > 0 && s < seq {
                check_plan(&mask, t, s..seq, 0..s, &ids);
                check_plan(&mask, t, 0..s, s..seq, &ids);
            }
        }
    }
}
