//! The scalar type the CPU backend computes in (f32 like the kernels, or f64
//! for tight comparisons with the reference), and the two inner loops every
//! path spends its time in.

use std::fmt::Debug;
use std::iter::Sum;
use std::ops::{Add, AddAssign, Div, Mul, MulAssign, Sub};

pub trait Real:
    Copy
    + Debug
    + Default
    + PartialOrd
    + Send
    + Sync
    + Add<Output = Self>
    + Sub<Output = Self>
    + Mul<Output = Self>
    + Div<Output = Self>
    + AddAssign
    + MulAssign
    + Sum
    + 'static
{
    const ZERO: Self;
    const ONE: Self;
    const NEG_INF: Self;
    fn from_f64(x: f64) -> Self;
    fn to_f64(self) -> f64;
    fn exp(self) -> Self;
    /// `e^x` for the softmax inner loop, branch-free so it vectorises: a
    /// polynomial for f32 (relative error ~2e-7, far inside the 2e-4 check),
    /// the exact `exp` for f64 (compared with the reference at 1e-10).
    /// Returns 0 for `x = -inf` (masked scores). `FMA`: fuse the polynomial's
    /// multiply-adds (only where the CPU has FMA).
    fn exp_fast<const FMA: bool>(self) -> Self;
    fn max(self, o: Self) -> Self;
    /// `self * a + b`, fused (one rounding); only used where the CPU has FMA,
    /// since without it `mul_add` is a slow library call.
    fn mul_add(self, a: Self, b: Self) -> Self;
}

impl Real for f32 {
    const ZERO: Self = 0.0;
    const ONE: Self = 1.0;
    const NEG_INF: Self = f32::NEG_INFINITY;
    #[inline]
    fn from_f64(x: f64) -> Self {
        x as f32
    }
    #[inline]
    fn to_f64(self) -> f64 {
        self as f64
    }
    #[inline]
    fn exp(self) -> Self {
        f32::exp(self)
    }
    #[inline(always)]
    fn exp_fast<const FMA: bool>(self) -> Self {
        exp_f32::<FMA>(self)
    }
    #[inline]
    fn max(self, o: Self) -> Self {
        f32::max(self, o)
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
    #[inline]
    fn from_f64(x: f64) -> Self {
        x
    }
    #[inline]
    fn to_f64(self) -> f64 {
        self
    }
    #[inline]
    fn exp(self) -> Self {
        f64::exp(self)
    }
    #[inline(always)]
    fn exp_fast<const FMA: bool>(self) -> Self {
        f64::exp(self)
    }
    #[inline]
    fn max(self, o: Self) -> Self {
        f64::max(self, o)
    }
    #[inline(always)]
    fn mul_add(self, a: Self, b: Self) -> Self {
        f64::mul_add(self, a, b)
    }
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
    for r in 0..rows {
        for c in 0..cols {
            out[c * rows + r] = a[r * cols + c];
        }
    }
}
