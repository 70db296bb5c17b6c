//! Bounds of an expression over a whole tile of (query, key) pairs: interval
//! arithmetic over the IR's semantics. This is what lets a mask written as
//! an expression (`mask = j <= i && i - j < 8 * (h + 1)`) skip tiles: a
//! condition whose bounds say "never" over a tile skips it, "always" makes it
//! Full, anything else is Partial (computed and masked per element), which
//! is always correct.
//!
//! Every rule is sound (the true value of every pair in the tile lies inside
//! the bounds), not always tight: `(i - j) % 4 == 0` proves nothing over a
//! tile wider than one. Over a rectangle of positions `i - j` is exact,
//! which is what the common masks use. A table read is bounded by the
//! table's own values over the index ranges, when the caller lends the data
//! ([`TableRead`]) and the ranges are small: a block-mask input indexed by
//! `div(i, B)`, `div(j, B)` classifies each tile of a B-aligned grid exactly.

use crate::ir::{alibi_slope, floor_div, BinOp, Expr, Func, UnOp, Var};

/// What is known of the variables over the tiles being classified. `None`
/// means any value (any head, any batch row, any length).
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct Known {
    pub batch: Option<i64>,
    pub head: Option<i64>,
    /// Number of query heads (bounds `h` when the head is not fixed).
    pub heads: Option<i64>,
    pub seq: Option<i64>,
    pub kv_seq: Option<i64>,
}

/// Closed interval `[lo, hi]`; booleans are sub-intervals of `[0, 1]`
/// (`[1, 1]` always true, `[0, 0]` never, `[0, 1]` unknown).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Bounds {
    pub lo: f64,
    pub hi: f64,
}

/// Three-valued truth of a condition over a tile.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Truth {
    Never,
    Sometimes,
    Always,
}

const ANY: Bounds = Bounds {
    lo: f64::NEG_INFINITY,
    hi: f64::INFINITY,
};
const MAYBE: Bounds = Bounds { lo: 0.0, hi: 1.0 };

impl Bounds {
    pub fn point(x: f64) -> Bounds {
        Bounds::new(x, x)
    }
    /// `[lo, hi]`, widened to everything when a bound is NaN.
    pub fn new(lo: f64, hi: f64) -> Bounds {
        if lo.is_nan() || hi.is_nan() || lo > hi {
            ANY
        } else {
            Bounds { lo, hi }
        }
    }
    fn of_points(xs: [f64; 4]) -> Bounds {
        if xs.iter().any(|x| x.is_nan()) {
            return ANY;
        }
        let lo = xs.iter().copied().fold(f64::INFINITY, f64::min);
        let hi = xs.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        Bounds::new(lo, hi)
    }
    fn hull(self, o: Bounds) -> Bounds {
        Bounds::new(self.lo.min(o.lo), self.hi.max(o.hi))
    }
    fn single(self) -> Option<f64> {
        (self.lo == self.hi).then_some(self.lo)
    }
    fn truth(t: Truth) -> Bounds {
        match t {
            Truth::Never => Bounds::point(0.0),
            Truth::Always => Bounds::point(1.0),
            Truth::Sometimes => MAYBE,
        }
    }
    /// The truth of a boolean's bounds.
    pub fn as_truth(self) -> Truth {
        if self.lo > 0.0 || self.hi < 0.0 {
            Truth::Always
        } else if self.lo == 0.0 && self.hi == 0.0 {
            Truth::Never
        } else {
            Truth::Sometimes
        }
    }
    /// Applies a non-decreasing function to both ends.
    fn monotone(self, f: impl Fn(f64) -> f64) -> Bounds {
        Bounds::new(f(self.lo), f(self.hi))
    }
}

/// Reads an input table element at (clamped) indices, as an expression does.
pub trait TableRead {
    fn read(&self, input: &str, indices: &[i64]) -> f64;
}

/// At most this many table elements are read to bound one table read.
pub const MAX_TABLE_READS: u64 = 256;

/// The tile: inclusive position ranges and what else is known.
#[derive(Clone, Copy)]
pub struct Tile<'a> {
    pub i: (i64, i64),
    pub j: (i64, i64),
    pub known: Known,
    /// The tables' data, when the caller has it (else reads are unbounded).
    pub tables: Option<&'a dyn TableRead>,
}

/// Is the condition `e` true for every, some or no pair of the tile?
pub fn truth(e: &Expr, tile: &Tile) -> Truth {
    bounds(e, tile).as_truth()
}

fn var(v: Var, t: &Tile) -> Bounds {
    let k = &t.known;
    let nonneg =
        |x: Option<i64>| x.map_or(Bounds::new(0.0, f64::INFINITY), |x| Bounds::point(x as f64));
    match v {
        Var::I => Bounds::new(t.i.0 as f64, t.i.1 as f64),
        Var::J => Bounds::new(t.j.0 as f64, t.j.1 as f64),
        Var::H => match (k.head, k.heads) {
            (Some(h), _) => Bounds::point(h as f64),
            (None, Some(n)) => Bounds::new(0.0, (n - 1).max(0) as f64),
            (None, None) => Bounds::new(0.0, f64::INFINITY),
        },
        Var::B => nonneg(k.batch),
        Var::Seq => nonneg(k.seq),
        Var::KvSeq => nonneg(k.kv_seq),
        Var::S => ANY,
    }
}

/// Sound bounds of `e` over the tile.
pub fn bounds(e: &Expr, t: &Tile) -> Bounds {
    // `i - j` over a rectangle is exact (as is every sum of the two).
    match e {
        Expr::Int(v) => Bounds::point(*v as f64),
        Expr::Float(v) => Bounds::point(*v),
        Expr::Var(v) => var(*v, t),
        Expr::Index { input, indices } => match t.tables {
            Some(tables) => table_bounds(tables, input, indices, t),
            None => ANY,
        },
        Expr::Unary(UnOp::Neg, a) => {
            let a = bounds(a, t);
            Bounds::new(-a.hi, -a.lo)
        }
        Expr::Unary(UnOp::Not, a) => Bounds::truth(match bounds(a, t).as_truth() {
            Truth::Never => Truth::Always,
            Truth::Always => Truth::Never,
            Truth::Sometimes => Truth::Sometimes,
        }),
        Expr::Binary(op, a, b) => binary(*op, bounds(a, t), bounds(b, t)),
        Expr::Call(f, args) => {
            let bs: Vec<Bounds> = args.iter().map(|a| bounds(a, t)).collect();
            call(*f, &bs, t.known.heads)
        }
    }
}

/// The smallest and largest element over every index combination the
/// index bounds allow, when there are at most [`MAX_TABLE_READS`].
fn table_bounds(tables: &dyn TableRead, input: &str, indices: &[Expr], t: &Tile) -> Bounds {
    let mut ranges = Vec::with_capacity(indices.len());
    let mut count: u64 = 1;
    for e in indices {
        let b = bounds(e, t);
        if !(b.lo.is_finite() && b.hi.is_finite()) || b.hi - b.lo >= MAX_TABLE_READS as f64 {
            return ANY;
        }
        // Indices are integers; a float index reads as truncated.
        let (lo, hi) = (b.lo.trunc() as i64, b.hi.trunc() as i64);
        count = count.saturating_mul((hi - lo + 1) as u64);
        if count > MAX_TABLE_READS {
            return ANY;
        }
        ranges.push((lo, hi));
    }
    let mut idx: Vec<i64> = ranges.iter().map(|r| r.0).collect();
    let (mut lo, mut hi) = (f64::INFINITY, f64::NEG_INFINITY);
    loop {
        let v = tables.read(input, &idx);
        if v.is_nan() {
            return ANY;
        }
        lo = lo.min(v);
        hi = hi.max(v);
        // Next index combination (odometer, last index fastest).
        let mut d = idx.len();
        loop {
            if d == 0 {
                return Bounds::new(lo, hi);
            }
            d -= 1;
            if idx[d] < ranges[d].1 {
                idx[d] += 1;
                break;
            }
            idx[d] = ranges[d].0;
        }
    }
}

fn binary(op: BinOp, a: Bounds, b: Bounds) -> Bounds {
    use Truth::*;
    let cmp = |always: bool, never: bool| {
        Bounds::truth(if always {
            Always
        } else if never {
            Never
        } else {
            Sometimes
        })
    };
    match op {
        BinOp::Add => Bounds::new(a.lo + b.lo, a.hi + b.hi),
        BinOp::Sub => Bounds::new(a.lo - b.hi, a.hi - b.lo),
        BinOp::Mul => Bounds::of_points([a.lo * b.lo, a.lo * b.hi, a.hi * b.lo, a.hi * b.hi]),
        BinOp::Div => {
            if b.lo <= 0.0 && b.hi >= 0.0 {
                ANY
            } else {
                Bounds::of_points([a.lo / b.lo, a.lo / b.hi, a.hi / b.lo, a.hi / b.hi])
            }
        }
        BinOp::Rem => rem(a, b),
        BinOp::Lt => cmp(a.hi < b.lo, a.lo >= b.hi),
        BinOp::Le => cmp(a.hi <= b.lo, a.lo > b.hi),
        BinOp::Gt => cmp(a.lo > b.hi, a.hi <= b.lo),
        BinOp::Ge => cmp(a.lo >= b.hi, a.hi < b.lo),
        BinOp::Eq => cmp(
            a.single().is_some() && a.single() == b.single(),
            a.hi < b.lo || b.hi < a.lo,
        ),
        BinOp::Ne => cmp(
            a.hi < b.lo || b.hi < a.lo,
            a.single().is_some() && a.single() == b.single(),
        ),
        BinOp::And => Bounds::truth(match (a.as_truth(), b.as_truth()) {
            (Never, _) | (_, Never) => Never,
            (Always, Always) => Always,
            _ => Sometimes,
        }),
        BinOp::Or => Bounds::truth(match (a.as_truth(), b.as_truth()) {
            (Always, _) | (_, Always) => Always,
            (Never, Never) => Never,
            _ => Sometimes,
        }),
    }
}

/// C-style integer remainder (sign of the dividend; `x % 0 = 0`).
fn rem(a: Bounds, b: Bounds) -> Bounds {
    if let (Some(x), Some(y)) = (a.single(), b.single()) {
        if x.abs() < 9e15 && y.abs() < 9e15 {
            let (x, y) = (x as i64, y as i64);
            return Bounds::point(if y == 0 { 0 } else { x.wrapping_rem(y) } as f64);
        }
    }
    let Some(c) = b.single().map(f64::abs) else {
        // Any divisor: |x % y| <= |x|, with the dividend's sign.
        let m = a.lo.abs().max(a.hi.abs());
        return Bounds::new(
            if a.lo < 0.0 { -m } else { 0.0 },
            if a.hi > 0.0 { m } else { 0.0 },
        );
    };
    if c == 0.0 {
        return Bounds::point(0.0);
    }
    if a.lo >= 0.0 && (a.lo / c).floor() == (a.hi / c).floor() {
        // One quotient over the range: the remainder runs with the dividend.
        let q = (a.lo / c).floor() * c;
        return Bounds::new(a.lo - q, a.hi - q);
    }
    let m = c - 1.0;
    Bounds::new(
        if a.lo < 0.0 { (-m).max(a.lo) } else { 0.0 },
        if a.hi > 0.0 { m.min(a.hi) } else { 0.0 },
    )
}

fn call(f: Func, a: &[Bounds], heads: Option<i64>) -> Bounds {
    let x = a[0];
    match f {
        Func::Exp => x.monotone(f64::exp),
        Func::Log => x.monotone(f64::ln),
        Func::Sqrt => x.monotone(f64::sqrt),
        Func::Tanh => x.monotone(f64::tanh),
        Func::Floor => x.monotone(f64::floor),
        Func::Sigmoid => x.monotone(|v| 1.0 / (1.0 + (-v).exp())),
        Func::Int => x.monotone(f64::trunc),
        Func::Abs => {
            if x.lo >= 0.0 {
                x
            } else if x.hi <= 0.0 {
                Bounds::new(-x.hi, -x.lo)
            } else {
                Bounds::new(0.0, (-x.lo).max(x.hi))
            }
        }
        Func::Min => Bounds::new(x.lo.min(a[1].lo), x.hi.min(a[1].hi)),
        Func::Max => Bounds::new(x.lo.max(a[1].lo), x.hi.max(a[1].hi)),
        Func::Clamp => {
            let m = Bounds::new(x.lo.max(a[1].lo), x.hi.max(a[1].hi));
            Bounds::new(m.lo.min(a[2].lo), m.hi.min(a[2].hi))
        }
        Func::Sin | Func::Cos => match x.single() {
            Some(v) => Bounds::point(if f == Func::Sin { v.sin() } else { v.cos() }),
            None => Bounds::new(-1.0, 1.0),
        },
        Func::Pow => match (x.single(), a[1].single()) {
            (Some(u), Some(v)) => Bounds::point(u.powf(v)),
            _ => ANY,
        },
        Func::AlibiSlope => match (x.single(), heads) {
            (Some(h), Some(n)) => {
                Bounds::point(alibi_slope(h as i64, n.clamp(1, u32::MAX as i64) as u32))
            }
            // Every slope lies in (0, 1].
            _ => Bounds::new(0.0, 1.0),
        },
        Func::Select => match x.as_truth() {
            Truth::Always => a[1],
            Truth::Never => a[2],
            Truth::Sometimes => a[1].hull(a[2]),
        },
        Func::Div => {
            let y = a[1];
            match y.single() {
                Some(c)
                    if c != 0.0
                        && x.lo.is_finite()
                        && x.hi.is_finite()
                        && x.lo.abs() < 9e15
                        && x.hi.abs() < 9e15 =>
                {
                    let (lo, hi) = (
                        floor_div(x.lo as i64, c as i64) as f64,
                        floor_div(x.hi as i64, c as i64) as f64,
                    );
                    Bounds::new(lo.min(hi), lo.max(hi))
                }
                Some(c) if c != 0.0 => {
                    let (lo, hi) = ((x.lo / c).floor(), (x.hi / c).floor());
                    Bounds::new(lo.min(hi), lo.max(hi))
                }
                // `div(x, 0) = 0`, and a divisor range crossing zero proves nothing.
                _ if y.lo <= 0.0 && y.hi >= 0.0 => ANY,
                _ => {
                    let q = Bounds::of_points([x.lo / y.lo, x.lo / y.hi, x.hi / y.lo, x.hi / y.hi]);
                    Bounds::new(q.lo.floor(), q.hi.floor())
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ir::{EvalEnv, Mask};
    use proptest::prelude::*;

    fn mask_expr(src: &str) -> Expr {
        let spec = crate::parse_str(&format!(
            "mixer m {{ heads = 4; head_dim = 8; input flag: f32[batch, seq]; \
             bias = flag[b][j]; mask = {src}; }}"
        ))
        .unwrap_or_else(|e| panic!("{src}: {e}"));
        // The whole mask as one condition (`j <= i` is lifted to `causal`).
        spec.mask.to_expr().unwrap()
    }

    const MASKS: &[&str] = &[
        "j <= i && i - j < 8 * (h + 1)",
        "(i - j) % 4 == 0",
        "div(i, 16) == div(j, 16) || j < 4",
        "!(j > i) && abs(i - j) <= 20",
        "select(h < 2, j <= i, j >= i)",
        "i - j >= 3 || seq - j < 5",
        "int(sqrt(i + 1.0)) == int(sqrt(j + 1.0))",
        "min(i, j) * 2 > max(i - 5, j) && clamp(i - j, -4, 4) != 0",
        "b == 1 || j % 3 == i % 3",
    ];

    /// The bounds contain every value, so `Always` / `Never` hold at every
    /// pair of the tile, for random tiles, heads and batch rows.
    #[test]
    fn truth_over_a_tile_holds_at_every_pair() {
        let exprs: Vec<Expr> = MASKS.iter().map(|m| mask_expr(m)).collect();
        let mut runner = proptest::test_runner::TestRunner::deterministic();
        let strat = (
            0i64..120,
            1i64..24,
            0i64..120,
            1i64..24,
            0i64..4,
            proptest::bool::ANY,
        );
        runner
            .run(&strat, |(i0, ni, j0, nj, h, fix_head)| {
                for e in &exprs {
                    let tile = Tile {
                        tables: None,
                        i: (i0, i0 + ni - 1),
                        j: (j0, j0 + nj - 1),
                        known: Known {
                            batch: None,
                            head: fix_head.then_some(h),
                            heads: Some(4),
                            seq: Some(160),
                            kv_seq: Some(160),
                        },
                    };
                    let t = truth(e, &tile);
                    let heads: Vec<i64> = if fix_head { vec![h] } else { (0..4).collect() };
                    let lookup = |_: &str, _: &[i64]| 0.0;
                    for hh in heads {
                        for b in 0..2 {
                            for i in tile.i.0..=tile.i.1 {
                                for j in tile.j.0..=tile.j.1 {
                                    let mut env = EvalEnv::for_head(hh, 4, &lookup);
                                    (env.i, env.j, env.b, env.seq, env.kv_seq) =
                                        (i, j, b, 160, 160);
                                    let v = e.eval(&env).as_f64() != 0.0;
                                    match t {
                                        Truth::Always => prop_assert!(v, "{e} at ({i}, {j})"),
                                        Truth::Never => prop_assert!(!v, "{e} at ({i}, {j})"),
                                        Truth::Sometimes => {}
                                    }
                                }
                            }
                        }
                    }
                }
                Ok(())
            })
            .unwrap();
    }

    /// `bm[qb][kb]` of a 4 x 4 block grid (blocks of 8), every other block kept.
    struct Blocks;
    impl TableRead for Blocks {
        fn read(&self, input: &str, idx: &[i64]) -> f64 {
            assert_eq!(input, "bm");
            let (a, b) = (idx[0].clamp(0, 3), idx[1].clamp(0, 3));
            f64::from((a * 5 + b * 3) % 2 == 0)
        }
    }

    /// Tiles on the block grid classify exactly from the table; any other
    /// tile soundly.
    #[test]
    fn block_mask_tables_classify_aligned_tiles_exactly() {
        let spec = crate::parse_str(
            "mixer m { heads = 1; head_dim = 8; input bm: f32[4, 4]; \
             mask = bm[div(i, 8)][div(j, 8)] > 0.5; }",
        )
        .unwrap();
        let Mask::Expr(e) = &spec.mask else { panic!() };
        let lookup = |_: &str, idx: &[i64]| Blocks.read("bm", idx);
        for (i0, ni, j0, nj) in [
            (0, 8, 8, 8),
            (8, 8, 8, 8),
            (3, 8, 16, 8),
            (0, 32, 0, 32),
            (16, 4, 24, 2),
        ] {
            let tile = Tile {
                i: (i0, i0 + ni - 1),
                j: (j0, j0 + nj - 1),
                known: Known::default(),
                tables: Some(&Blocks),
            };
            let t = truth(e, &tile);
            let mut seen = [false; 2];
            for i in tile.i.0..=tile.i.1 {
                for j in tile.j.0..=tile.j.1 {
                    let mut env = EvalEnv::for_head(0, 1, &lookup);
                    (env.i, env.j) = (i, j);
                    seen[usize::from(e.eval(&env).as_f64() != 0.0)] = true;
                }
            }
            let exact = match seen {
                [false, true] => Truth::Always,
                [true, false] => Truth::Never,
                _ => Truth::Sometimes,
            };
            let aligned = i0 % 8 == 0 && j0 % 8 == 0 && ni <= 8 && nj <= 8;
            if aligned {
                assert_eq!(t, exact, "tile ({i0}, {j0})");
            } else {
                assert!(t == exact || t == Truth::Sometimes, "tile ({i0}, {j0})");
            }
        }
    }

    #[test]
    fn per_head_windows_are_classified_exactly() {
        let e = mask_expr("j <= i && i - j < 8 * (h + 1)");
        let known = |h| Known {
            head: Some(h),
            heads: Some(4),
            ..Known::default()
        };
        let tile = |i0: i64, j0: i64, h| Tile {
            tables: None,
            i: (i0, i0 + 7),
            j: (j0, j0 + 7),
            known: known(h),
        };
        // Head 0 sees 8 keys: the tile two blocks back is out of reach.
        assert_eq!(truth(&e, &tile(64, 48, 0)), Truth::Never);
        assert_eq!(truth(&e, &tile(64, 48, 3)), Truth::Always);
        assert_eq!(truth(&e, &tile(64, 64, 3)), Truth::Sometimes);
        assert_eq!(truth(&e, &tile(64, 72, 3)), Truth::Never);
    }
}
