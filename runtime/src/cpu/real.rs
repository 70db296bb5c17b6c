//! The scalar type the CPU backend computes in (f32 like the kernels, or f64
//! for tight comparisons with the reference), and the two inner loops every
//! path spends its time in.

use std::fmt::Debug;
use std::iter::Sum;
use std::ops::{AddAssign, MulAssign};

use mixc_dsl::ir::ExprFloat;

/// The std semantics (`from_f64`, `exp`, `max`, ... and those of every
/// expression function) come from [`ExprFloat`], the trait the spec IR's
/// evaluator is written over, so the CPU backend cannot drift from it.
pub trait Real:
    ExprFloat + Debug + Default + Send + Sync + AddAssign + MulAssign + Sum + bytemuck::Pod + 'static
{
    const ZERO: Self;
    const ONE: Self;
    const NEG_INF: Self;
    /// `e^x` for the softmax inner loop, branch-free so it vectorises: a
    /// polynomial for f32 (relative error ~2e-7, far inside the 2e-4 check),
    /// the exact `exp` for f64 (compared with the reference at 1e-10).
    /// Returns 0 for `x = -inf` (masked scores). `FMA`: fuse the polynomial's
    /// multiply-adds (only where the CPU has FMA).
    fn exp_fast<const FMA: bool>(self) -> Self;
    /// `e^x` for bias / transform programs: over the whole range (`inf`
    /// above ~88.7, 0 where the result would be subnormal) from the same
    /// polynomial for f32; the exact `exp` for f64.
    fn exp_expr(self) -> Self;
    /// `tanh` for bias / transform programs: branch-free, relative error
    /// below 1e-6 for f32 (softcaps call it once per score); exact for f64.
    fn tanh_expr(self) -> Self;
    /// `self * a + b`, fused (one rounding); only used where the CPU has FMA,
    /// since without it `mul_add` is a slow library call.
    fn mul_add(self, a: Self, b: Self) -> Self;
}

impl Real for f32 {
    const ZERO: Self = 0.0;
    const ONE: Self = 1.0;
    const NEG_INF: Self = f32::NEG_INFINITY;
    #[inline(always)]
    fn exp_fast<const FMA: bool>(self) -> Self {
        exp_f32::<FMA>(self)
    }
    #[inline(always)]
    fn exp_expr(self) -> Self {
        // ln(f32::MAX) = 88.72: beyond it e^x overflows, as libm's does.
        if self > 88.72 {
            f32::INFINITY
        } else {
            exp_f32::<false>(self)
        }
    }
    #[inline(always)]
    fn tanh_expr(self) -> Self {
        tanh_f32(self)
    }
    #[inline(always)]
    fn mul_add(self, a: Self, b: Self) -> Self {
        f32::mul_add(self, a, b)
    }
}

impl Real for f64 {
    const ZERO: Self = 0.0;
    const ONE: Self = 1.0;
    const NEG_INF: Self = f64::NEG_INFINITY;
    #[inline(always)]
    fn exp_fast<const FMA: bool>(self) -> Self {
        f64::exp(self)
    }
    #[inline(always)]
    fn exp_expr(self) -> Self {
        f64::exp(self)
    }
    #[inline(always)]
    fn tanh_expr(self) -> Self {
        f64::tanh(self)
    }
    #[inline(always)]
    fn mul_add(self, a: Self, b: Self) -> Self {
        f64::mul_add(self, a, b)
    }
}

/// `tanh` in f32 without a library call, branch-free (both halves are
/// computed and one selected) so loops over it vectorise. Below |x| = 0.35
/// the odd Taylor series to x^13 (truncation < 1e-9 relative; the exp form
/// would cancel there); above, `1 - 2 / (e^2|x| + 1)` with [`exp_f32`]
/// (relative error < 5e-7), the argument capped at 10 where tanh rounds to 1.
/// NaN stays NaN; +-inf give +-1.
#[inline(always)]
pub fn tanh_f32(x: f32) -> f32 {
    let a = x.abs();
    let a2 = a * a;
    // tanh x = x - x^3/3 + 2x^5/15 - 17x^7/315 + 62x^9/2835 - ...
    let mut p = 21_844.0 / 6_081_075.0;
    for c in [
        -1_382.0 / 155_925.0,
        62.0 / 2_835.0,
        -17.0 / 315.0,
        2.0 / 15.0,
        -1.0 / 3.0,
        1.0,
    ] {
        p = p * a2 + c;
    }
    let small = p * a;
    let e = exp_f32::<false>(2.0 * a.min(10.0));
    let large = 1.0 - 2.0 / (e + 1.0);
    let t = if a < 0.35 { small } else { large };
    // `a.min(10.0)` turns NaN into 10; keep NaN in.
    let t = if a.is_nan() { a } else { t };
    t.copysign(x)
}

/// `e^x` in f32 without a library call: `x = n ln2 + r` with `|r| <= ln2 / 2`
/// (ln2 split in two so `r` is exact), `e^r` by its Taylor series to degree 7
/// (truncation < 5e-9), and `2^n` built in the exponent bits. Below -87.3
/// (where `e^x` is subnormal) the result is 0, which also covers `-inf`;
/// above 88 it saturates at `e^88` (softmax only asks for `x <= 0`).
#[inline(always)]
pub fn exp_f32<const FMA: bool>(x: f32) -> f32 {
    let madd = |a: f32, b: f32, c: f32| if FMA { a.mul_add(b, c) } else { a * b + c };
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    // ln2 = LN2_HI + LN2_LO with LN2_HI exact in few bits, so n * LN2_HI is exact.
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    const LO: f32 = -87.3;
    const HI: f32 = 88.0;
    // Adding 1.5 * 2^23 rounds to an integer in the low mantissa bits.
    const ROUND: f32 = 12_582_912.0;
    let xc = x.clamp(LO, HI);
    // `k`'s low mantissa bits hold `n`; shifting them into the exponent field
    // builds 2^n without a float-to-int conversion (which would not vectorise).
    let k = madd(xc, LOG2E, ROUND);
    let n = k - ROUND;
    let r = madd(-n, LN2_LO, madd(-n, LN2_HI, xc));
    let mut p = 1.0 / 5040.0;
    for c in [
        1.0 / 720.0,
        1.0 / 120.0,
        1.0 / 24.0,
        1.0 / 6.0,
        0.5,
        1.0,
        1.0,
    ] {
        p = madd(p, r, c);
    }
    // ROUND's own bits vanish in the shift (its low 9 bits are 0).
    let two_n = f32::from_bits(k.to_bits().wrapping_add(127) << 23);
    if x < LO {
        0.0
    } else {
        p * two_n
    }
}

/// Dot product with 8 independent accumulators: a plain `zip().sum()` is a
/// serial dependency chain the compiler may not reorder (floats are not
/// associative), which leaves SIMD lanes idle.
#[inline]
pub fn dot<T: Real>(a: &[T], b: &[T]) -> T {
    debug_assert_eq!(a.len(), b.len());
    let mut acc = [T::ZERO; 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for l in 0..8 {
            acc[l] += x[l] * y[l];
        }
    }
    let mut tail = T::ZERO;
    for (x, y) in ra.iter().zip(rb) {
        tail += *x * *y;
    }
    ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7])) + tail
}

/// `y += a * x`.
#[inline]
pub fn axpy<T: Real>(y: &mut [T], a: T, x: &[T]) {
    debug_assert_eq!(x.len(), y.len());
    for (yy, xx) in y.iter_mut().zip(x) {
        *yy += a * *xx;
    }
}

/// `y *= a`.
#[inline]
pub fn scale<T: Real>(y: &mut [T], a: T) {
    for yy in y {
        *yy *= a;
    }
}

/// Transposes a `rows x cols` row-major tile into `out` (`cols x rows`).
pub fn transpose<T: Real>(a: &[T], rows: usize, cols: usize, out: &mut [T]) {
    put_columns(&a[..rows * cols], cols, out, rows, 0)
}

/// Columns `c0 ..` of `dst` (`d` rows of stride `ld`) set to the rows of
/// `rows` (each `d` long): a transpose into part of a wider tile, whose
/// inner loop writes consecutive values (callers pass a few rows at a
/// time, all in cache).
pub fn put_columns<T: Copy>(rows: &[T], d: usize, dst: &mut [T], ld: usize, c0: usize) {
    let n = rows.len() / d.max(1);
    for dd in 0..d {
        let out = &mut dst[dd * ld + c0..][..n];
        for (x, row) in out.iter_mut().zip(rows.chunks_exact(d)) {
            *x = row[dd];
        }
    }
}

/// `map(x)` computed in `T`, as every CPU path applies the feature maps:
/// `exp` through [`Real::exp_expr`], so f32 runs never call libm's f64 `exp`
/// per element (that was a third of a linear-attention forward); f64 runs
/// get `FeatureMap::apply` exactly.
#[inline(always)]
pub fn feature<T: Real>(map: mixc_dsl::ir::FeatureMap, x: f32) -> T {
    use mixc_dsl::ir::FeatureMap;
    let x = T::from_f64(x as f64);
    match map {
        FeatureMap::Identity => x,
        FeatureMap::Elu1 => {
            if x > T::ZERO {
                x + T::ONE
            } else {
                x.exp_expr()
            }
        }
        FeatureMap::Relu => x.max(T::ZERO),
    }
}

/// `dst[i] = map(src[i]) * scale` over a row, branch-free so it vectorises
/// (AVX-512 or AVX2 where the CPU has them): the feature maps' `exp` per
/// element, scalar, was most of a linear-attention forward.
pub fn feature_row<T: Real>(map: mixc_dsl::ir::FeatureMap, src: &[f32], scale: T, dst: &mut [T]) {
    use super::microkernel::{detected_isa, Isa};
    assert!(src.len() >= dst.len(), "feature_row: short source row");
    match detected_isa() {
        // SAFETY: each variant runs only on a CPU that reported its features.
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512 => unsafe { feature_row_avx512(map, src, scale, dst) },
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 => unsafe { feature_row_avx2(map, src, scale, dst) },
        _ => feature_row_body(map, src, scale, dst),
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx2,fma")]
unsafe fn feature_row_avx512<T: Real>(
    map: mixc_dsl::ir::FeatureMap,
    src: &[f32],
    scale: T,
    dst: &mut [T],
) {
    feature_row_body(map, src, scale, dst)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn feature_row_avx2<T: Real>(
    map: mixc_dsl::ir::FeatureMap,
    src: &[f32],
    scale: T,
    dst: &mut [T],
) {
    feature_row_body(map, src, scale, dst)
}

#[inline(always)]
fn feature_row_body<T: Real>(map: mixc_dsl::ir::FeatureMap, src: &[f32], scale: T, dst: &mut [T]) {
    use mixc_dsl::ir::FeatureMap;
    let pairs = dst.iter_mut().zip(src);
    match map {
        FeatureMap::Identity => pairs.for_each(|(d, &s)| *d = T::from_f64(s as f64) * scale),
        FeatureMap::Relu => {
            pairs.for_each(|(d, &s)| *d = T::from_f64(s as f64).max(T::ZERO) * scale)
        }
        FeatureMap::Elu1 => pairs.for_each(|(d, &s)| {
            let x = T::from_f64(s as f64);
            // exp of min(x, 0): both sides computed, one kept (a select).
            let e = (if x < T::ZERO { x } else { T::ZERO }).exp_expr();
            *d = (if x > T::ZERO { x + T::ONE } else { e }) * scale;
        }),
    }
}
