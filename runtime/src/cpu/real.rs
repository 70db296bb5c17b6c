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
    fn max(self, o: Self) -> Self;
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
    #[inline]
    fn max(self, o: Self) -> Self {
        f32::max(self, o)
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
    #[inline]
    fn max(self, o: Self) -> Self {
        f64::max(self, o)
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

/// `s[r][c] = sum_d q[r][d] * kt[d][c]` for a `rows x cols` score tile, with
/// `q` row-major `rows x dk` and `kt` the key tile transposed (`dk x cols`).
/// A 4 x 8 register block: each loaded key vector feeds four query rows, and
/// the accumulators stay in registers over the whole `d` loop (the
/// outer-product form of the kernels' `mma`).
pub fn score_tile<T: Real>(q: &[T], rows: usize, dk: usize, kt: &[T], cols: usize, s: &mut [T]) {
    debug_assert!(q.len() >= rows * dk && kt.len() >= dk * cols && s.len() >= rows * cols);
    const R: usize = 4;
    const C: usize = 8;
    let mut r = 0;
    while r + R <= rows {
        let qs: [&[T]; R] = std::array::from_fn(|x| &q[(r + x) * dk..(r + x + 1) * dk]);
        let mut c = 0;
        while c + C <= cols {
            let mut acc = [[T::ZERO; C]; R];
            for (d, krow) in kt.chunks_exact(cols).take(dk).enumerate() {
                let kv: &[T; C] = krow[c..c + C].try_into().expect("C columns");
                for x in 0..R {
                    let qx = qs[x][d];
                    for l in 0..C {
                        acc[x][l] += qx * kv[l];
                    }
                }
            }
            for (x, a) in acc.iter().enumerate() {
                s[(r + x) * cols + c..(r + x) * cols + c + C].copy_from_slice(a);
            }
            c += C;
        }
        for cc in c..cols {
            for (x, qx) in qs.iter().enumerate() {
                s[(r + x) * cols + cc] = (0..dk).map(|d| qx[d] * kt[d * cols + cc]).sum();
            }
        }
        r += R;
    }
    for rr in r..rows {
        let qr = &q[rr * dk..(rr + 1) * dk];
        for cc in 0..cols {
            s[rr * cols + cc] = (0..dk).map(|d| qr[d] * kt[d * cols + cc]).sum();
        }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn score_tile_matches_plain_dots() {
        for (rows, cols, dk) in [(1, 1, 1), (4, 8, 16), (7, 13, 5), (9, 17, 33)] {
            let q: Vec<f64> = (0..rows * dk)
                .map(|x| ((x * 37) % 11) as f64 - 5.0)
                .collect();
            let k: Vec<f64> = (0..cols * dk)
                .map(|x| ((x * 53) % 7) as f64 - 3.0)
                .collect();
            let mut kt = vec![0.0; cols * dk];
            transpose(&k, cols, dk, &mut kt);
            let mut s = vec![0.0; rows * cols];
            score_tile(&q, rows, dk, &kt, cols, &mut s);
            for r in 0..rows {
                for c in 0..cols {
                    let want = dot(&q[r * dk..(r + 1) * dk], &k[c * dk..(c + 1) * dk]);
                    assert_eq!(s[r * cols + c], want, "{rows}x{cols}x{dk} at ({r},{c})");
                }
            }
        }
    }
}
