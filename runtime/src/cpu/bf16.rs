//! bf16 products with f32 accumulation: the blocked path's two tile products
//! (`Sᵀ = K Qᵀ` and `O += P V`) for runs whose storage type is bf16, on CPUs
//! with AVX-512 BF16 (`vdpbf16ps`: two bf16 products per f32 lane, twice the
//! f32 FMA rate). Everything else (masks, bias, softmax, merges) stays in f32,
//! as in the GPU kernels, which also round `P` to the storage type before
//! `P V`.
//!
//! Operands are *pairs*: a `u32` holds two bf16 values along the reduction
//! axis, the even one in the low half, the layout `vdpbf16ps` multiplies.
//! `a` is read one pair at a time (broadcast), `b` a row of pairs at a time.
//!
//! Without AVX-512 BF16, or with `MIXC_CPU_BF16=0` in the environment, the
//! CPU backend computes bf16 runs with f32 products of the same (bf16)
//! inputs instead ([`enabled`]); [`gemm`] itself also runs anywhere, with a
//! portable loop, so its results can be compared on any machine.

use std::sync::OnceLock;

use super::microkernel::{check_product, Mat};

/// Whether bf16 runs use the bf16 products: the CPU has AVX-512 BF16 and
/// `MIXC_CPU_BF16` is not `0`/`off`/`false` (which forces the f32 fallback,
/// e.g. to compare the two on one machine). Decided once per process.
pub fn enabled() -> bool {
    static ON: OnceLock<bool> = OnceLock::new();
    *ON.get_or_init(|| {
        let off = std::env::var("MIXC_CPU_BF16").is_ok_and(|v| {
            matches!(
                v.trim().to_ascii_lowercase().as_str(),
                "0" | "off" | "false"
            )
        });
        !off && has_avx512_bf16()
    })
}

fn has_avx512_bf16() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        is_x86_feature_detected!("avx512bf16")
            && is_x86_feature_detected!("avx512f")
            && is_x86_feature_detected!("avx512bw")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// `x` rounded to bf16 (nearest even), as its bits.
#[inline]
pub fn bits(x: f32) -> u16 {
    half::bf16::from_f32(x).to_bits()
}

/// Two values as one pair: `lo` in the low half.
#[inline]
pub fn pair(lo: f32, hi: f32) -> u32 {
    bits(lo) as u32 | (bits(hi) as u32) << 16
}

fn unpair(p: u32) -> (f32, f32) {
    (
        half::bf16::from_bits(p as u16).to_f32(),
        half::bf16::from_bits((p >> 16) as u16).to_f32(),
    )
}

/// `out[k2 * cols + c] = pair(x[2 k2][c], x[2 k2 + 1][c])` for a `rows x
/// cols` row-major `x`: consecutive rows become pairs (a last odd row pairs
/// with 0). Used for the probabilities `P` of a tile before `O += P V`.
///
/// # Panics
/// When `x` or `out` is too short.
pub fn pack_row_pairs(x: &[f32], rows: usize, cols: usize, out: &mut [u32]) {
    assert!(
        x.len() >= rows * cols && out.len() >= rows.div_ceil(2) * cols,
        "pack_row_pairs: {rows} x {cols} from {} values into {}",
        x.len(),
        out.len()
    );
    for (k2, o) in out
        .chunks_exact_mut(cols.max(1))
        .take(rows.div_ceil(2))
        .enumerate()
    {
        let lo = &x[2 * k2 * cols..][..cols];
        let hi = (2 * k2 + 1 < rows).then(|| &x[(2 * k2 + 1) * cols..][..cols]);
        pack_pairs(lo, hi, o);
    }
}

/// `out[c] = pair(lo[c], hi[c])` (`hi` absent: 0), for `c < out.len()`:
/// two rows of values as one row of pairs.
///
/// # Panics
/// When `lo` or `hi` is shorter than `out`.
pub fn pack_pairs(lo: &[f32], hi: Option<&[f32]>, out: &mut [u32]) {
    let n = out.len();
    assert!(
        lo.len() >= n && hi.is_none_or(|h| h.len() >= n),
        "pack_pairs: short rows"
    );
    #[cfg(target_arch = "x86_64")]
    if has_avx512_bf16_cached() {
        // SAFETY: the CPU reported the features; lengths were checked above.
        unsafe { x86::pack_pairs(lo.as_ptr(), hi.map(|h| h.as_ptr()), out) };
        return;
    }
    for (c, o) in out.iter_mut().enumerate() {
        *o = pair(lo[c], hi.map_or(0.0, |h| h[c]));
    }
}

/// `out[p] = pair(x[2p], x[2p + 1])` (past the end of `x`: 0), for
/// `p < out.len()`: a row of values as pairs of neighbours.
///
/// # Panics
/// When `x` is too short for `out` (fewer than `2 out.len() - 1` values).
pub fn pack_row(x: &[f32], out: &mut [u32]) {
    assert!(
        x.len() >= (2 * out.len()).saturating_sub(1),
        "pack_row: short row"
    );
    #[cfg(target_arch = "x86_64")]
    if has_avx512_bf16_cached() {
        // SAFETY: the CPU reported the features; lengths were checked above.
        unsafe { x86::pack_row(x, out) };
        return;
    }
    for (p, o) in out.iter_mut().enumerate() {
        *o = pair(x[2 * p], x.get(2 * p + 1).copied().unwrap_or(0.0));
    }
}

fn has_avx512_bf16_cached() -> bool {
    static HAS: OnceLock<bool> = OnceLock::new();
    *HAS.get_or_init(has_avx512_bf16)
}

/// A `rows x cols` matrix of pairs, row-major with stride `ld`.
pub type Pairs<'a> = Mat<'a, u32>;

/// `c = alpha a b` (or `c += alpha a b` with `accumulate`) in f32, where
/// `a` (`m x k2`, or `k2 x m` stored transposed with `ta`) and `b`
/// (`k2 x n`) hold pairs along the reduction axis, so the reduction has
/// `2 k2` terms. `c` is `m x n` f32 with stride `ldc`.
///
/// # Panics
/// When the shapes disagree or a view does not fit its slice.
#[allow(clippy::too_many_arguments)]
pub fn gemm(
    ta: bool,
    a: Pairs<'_>,
    b: Pairs<'_>,
    c: &mut [f32],
    ldc: usize,
    m: usize,
    alpha: f32,
    accumulate: bool,
) {
    let (k2, n) = (b.rows, b.cols);
    check_product("bf16 gemm", ta, &a, &b, c.len(), (m, n, ldc));
    let g = G {
        a: a.data.as_ptr(),
        lda: a.ld,
        b: b.data.as_ptr(),
        ldb: b.ld,
        c: c.as_mut_ptr(),
        ldc,
        m,
        n,
        k2,
        alpha,
        accumulate,
    };
    // SAFETY: the views were checked to lie inside their slices and `c` is
    // borrowed mutably; the AVX-512 variant runs only where the CPU has it.
    unsafe {
        #[cfg(target_arch = "x86_64")]
        if has_avx512_bf16_cached() {
            match ta {
                false => x86::gemm::<false>(&g),
                true => x86::gemm::<true>(&g),
            }
            return;
        }
        portable(&g, ta)
    }
}

/// Validated raw operands (see [`gemm`]).
struct G {
    a: *const u32,
    lda: usize,
    b: *const u32,
    ldb: usize,
    c: *mut f32,
    ldc: usize,
    m: usize,
    n: usize,
    k2: usize,
    alpha: f32,
    accumulate: bool,
}

/// Pointer to pair `(i, p)` of `a` (row `i` of the product, reduction step `p`).
#[inline(always)]
unsafe fn a_at<const TA: bool>(g: &G, i: usize, p: usize) -> *const u32 {
    if TA {
        g.a.add(p * g.lda + i)
    } else {
        g.a.add(i * g.lda + p)
    }
}

/// The same products one at a time (bf16 products are exact in f32).
unsafe fn portable(g: &G, ta: bool) {
    for i in 0..g.m {
        for j in 0..g.n {
            let mut acc = 0.0f32;
            for p in 0..g.k2 {
                let a = if ta {
                    *a_at::<true>(g, i, p)
                } else {
                    *a_at::<false>(g, i, p)
                };
                let (a0, a1) = unpair(a);
                let (b0, b1) = unpair(*g.b.add(p * g.ldb + j));
                acc += a0 * b0 + a1 * b1;
            }
            let c = g.c.add(i * g.ldc + j);
            *c = if g.accumulate {
                *c + g.alpha * acc
            } else {
                g.alpha * acc
            };
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::{a_at, G};
    use std::arch::x86_64::*;

    /// `R` rows x `V` vectors of 16 columns per block, like the f32 AVX-512
    /// kernel: 16 accumulators, two rows of `b` and one broadcast.
    #[target_feature(enable = "avx512bf16,avx512f,avx512bw,avx2,fma")]
    pub(super) unsafe fn gemm<const TA: bool>(g: &G) {
        crate::cpu::microkernel::avx512_blocks!(g, tile, TA);
    }

    #[inline(always)]
    unsafe fn tile<const R: usize, const V: usize, const TA: bool>(
        g: &G,
        i: usize,
        j: usize,
        mask: __mmask16,
    ) {
        let mut acc = [[_mm512_setzero_ps(); V]; R];
        let lane_mask = |v: usize| if v + 1 == V { mask } else { 0xffff };
        for p in 0..g.k2 {
            let brow = g.b.add(p * g.ldb + j) as *const i32;
            let mut bv = [_mm512_setzero_si512(); V];
            for (v, b) in bv.iter_mut().enumerate() {
                *b = _mm512_maskz_loadu_epi32(lane_mask(v), brow.add(16 * v));
            }
            for (x, accx) in acc.iter_mut().enumerate() {
                let a = _mm512_set1_epi32(*a_at::<TA>(g, i + x, p) as i32);
                for v in 0..V {
                    accx[v] = _mm512_dpbf16_ps(accx[v], bh(a), bh(bv[v]));
                }
            }
        }
        let alpha = _mm512_set1_ps(g.alpha);
        for (x, accx) in acc.iter().enumerate() {
            let crow = g.c.add((i + x) * g.ldc + j);
            for (v, &a) in accx.iter().enumerate() {
                let (m, ptr) = (lane_mask(v), crow.add(16 * v));
                let out = if g.accumulate {
                    _mm512_fmadd_ps(a, alpha, _mm512_maskz_loadu_ps(m, ptr))
                } else {
                    _mm512_mul_ps(a, alpha)
                };
                _mm512_mask_storeu_ps(ptr, m, out);
            }
        }
    }

    #[inline(always)]
    unsafe fn bh(x: __m512i) -> __m512bh {
        // SAFETY: both are 64 bytes of plain data.
        std::mem::transmute::<__m512i, __m512bh>(x)
    }

    /// [`super::pack_pairs`]: 16 columns at a time, each value rounded to
    /// bf16 (nearest even) by `vcvtneps2bf16`, zero-extended, the `hi`
    /// value shifted into the high half.
    #[target_feature(enable = "avx512bf16,avx512f,avx512bw,avx2,fma")]
    pub(super) unsafe fn pack_pairs(lo: *const f32, hi: Option<*const f32>, out: &mut [u32]) {
        let cols = out.len();
        let dst = out.as_mut_ptr() as *mut i32;
        let mut c = 0;
        while c < cols {
            let w = (cols - c).min(16);
            let m = crate::cpu::microkernel::lane_mask(w);
            let a = _mm512_maskz_loadu_ps(m, lo.add(c));
            let b = match hi {
                Some(h) => _mm512_maskz_loadu_ps(m, h.add(c)),
                None => _mm512_setzero_ps(),
            };
            let a16 = std::mem::transmute::<__m256bh, __m256i>(_mm512_cvtneps_pbh(a));
            let b16 = std::mem::transmute::<__m256bh, __m256i>(_mm512_cvtneps_pbh(b));
            let pairs = _mm512_or_si512(
                _mm512_cvtepu16_epi32(a16),
                _mm512_slli_epi32::<16>(_mm512_cvtepu16_epi32(b16)),
            );
            _mm512_mask_storeu_epi32(dst.add(c), m, pairs);
            c += 16;
        }
    }

    /// [`super::pack_row`]: 16 values (8 pairs) at a time; bf16 values in
    /// order are pairs of neighbours, low half first.
    #[target_feature(enable = "avx512bf16,avx512f,avx512bw,avx512vl,avx2,fma")]
    pub(super) unsafe fn pack_row(x: &[f32], out: &mut [u32]) {
        let n = x.len().min(2 * out.len());
        let dst = out.as_mut_ptr() as *mut u16;
        let mut i = 0;
        while i < 2 * out.len() {
            let w = n.saturating_sub(i).min(16);
            let m = crate::cpu::microkernel::lane_mask(w);
            let v = _mm512_maskz_loadu_ps(m, x.as_ptr().add(i));
            let h = std::mem::transmute::<__m256bh, __m256i>(_mm512_cvtneps_pbh(v));
            // Whole pairs only: an odd tail's partner lane is 0 from the load.
            let lanes = (2 * out.len() - i).min(16);
            let sm: __mmask16 = if lanes == 16 {
                0xffff
            } else {
                (1u16 << lanes) - 1
            };
            _mm256_mask_storeu_epi16(dst.add(i) as *mut i16, sm, h);
            i += 16;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lcg(n: usize, seed: u64) -> Vec<f32> {
        let mut s = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (0..n)
            .map(|_| {
                s = s
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((s >> 33) as f32 / (1u64 << 31) as f32) * 2.0 - 1.0
            })
            .collect()
    }

    /// Pairs of a row-major `rows x cols` matrix along its columns (each
    /// row's consecutive elements paired): `rows x cols/2`.
    fn col_pairs(x: &[f32], rows: usize, cols: usize) -> Vec<u32> {
        let c2 = cols.div_ceil(2);
        let mut out = vec![0u32; rows * c2];
        for r in 0..rows {
            for p in 0..c2 {
                let hi = if 2 * p + 1 < cols {
                    x[r * cols + 2 * p + 1]
                } else {
                    0.0
                };
                out[r * c2 + p] = pair(x[r * cols + 2 * p], hi);
            }
        }
        out
    }

    fn round(x: f32) -> f64 {
        half::bf16::from_f32(x).to_f32() as f64
    }

    /// Both forms, ragged shapes (odd reductions, columns that are not a
    /// multiple of 16, rows that are not a multiple of 8), against f64 sums
    /// of the rounded values; the fast and portable paths agree.
    #[test]
    fn gemm_matches_the_rounded_product_in_both_forms() {
        for &(m, n, k) in &[
            (1, 1, 1),
            (8, 32, 2),
            (13, 37, 7),
            (64, 64, 128),
            (9, 17, 33),
            (3, 130, 64),
            (11, 150, 5),
        ] {
            let a = lcg(m * k, 1 + (m * n * k) as u64);
            let b = lcg(k * n, 7 + k as u64);
            let k2 = k.div_ceil(2);
            // b as pairs of rows: k2 x n.
            let mut bp = vec![0u32; k2 * n];
            pack_row_pairs(&b, k, n, &mut bp);
            let want = |i: usize, j: usize| -> f64 {
                (0..k)
                    .map(|p| round(a[i * k + p]) * round(b[p * n + j]))
                    .sum()
            };
            // a as pairs along its rows (m x k2) and, transposed, as pairs of rows of aᵀ (k2 x m).
            let ap = col_pairs(&a, m, k);
            let at: Vec<f32> = (0..k * m).map(|x| a[(x % m) * k + x / m]).collect();
            let mut atp = vec![0u32; k2 * m];
            pack_row_pairs(&at, k, m, &mut atp);
            for (ta, data, rows, cols) in [(false, &ap, m, k2), (true, &atp, k2, m)] {
                for accumulate in [false, true] {
                    let mut c = vec![0.5f32; m * n];
                    gemm(
                        ta,
                        Pairs::dense(data, rows, cols),
                        Pairs::dense(&bp, k2, n),
                        &mut c,
                        n,
                        m,
                        0.25,
                        accumulate,
                    );
                    for i in 0..m {
                        for j in 0..n {
                            let w = 0.25 * want(i, j) + if accumulate { 0.5 } else { 0.0 };
                            let got = c[i * n + j] as f64;
                            assert!(
                                (got - w).abs() <= 1e-5 * (1.0 + w.abs()) * (k as f64).sqrt(),
                                "{m}x{n}x{k} ta={ta} ({i},{j}): {got} vs {w}"
                            );
                        }
                    }
                    let mut c2 = vec![0.5f32; m * n];
                    let g = G {
                        a: data.as_ptr(),
                        lda: cols,
                        b: bp.as_ptr(),
                        ldb: n,
                        c: c2.as_mut_ptr(),
                        ldc: n,
                        m,
                        n,
                        k2,
                        alpha: 0.25,
                        accumulate,
                    };
                    unsafe { portable(&g, ta) };
                    for (x, y) in c.iter().zip(&c2) {
                        assert!(
                            (x - y).abs() <= 1e-5 * (1.0 + y.abs()) * (k as f32).sqrt(),
                            "fast {x} vs portable {y}"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn pack_row_pairs_neighbours_and_pads_an_odd_tail() {
        for n in [0usize, 1, 2, 15, 16, 17, 31, 33, 128] {
            let x = lcg(n, n as u64);
            let mut out = vec![u32::MAX; n.div_ceil(2)];
            pack_row(&x, &mut out);
            for (p, &o) in out.iter().enumerate() {
                let hi = x.get(2 * p + 1).copied().unwrap_or(0.0);
                assert_eq!(o, pair(x[2 * p], hi), "n {n} pair {p}");
            }
        }
    }

    #[test]
    fn pack_row_pairs_rounds_to_nearest_even_and_pads_odd_rows() {
        let rows = 5;
        let cols = 19;
        let x = lcg(rows * cols, 3);
        let mut out = vec![u32::MAX; 3 * cols];
        pack_row_pairs(&x, rows, cols, &mut out);
        for k2 in 0..3 {
            for c in 0..cols {
                let hi = if 2 * k2 + 1 < rows {
                    x[(2 * k2 + 1) * cols + c]
                } else {
                    0.0
                };
                assert_eq!(
                    out[k2 * cols + c],
                    pair(x[2 * k2 * cols + c], hi),
                    "({k2}, {c})"
                );
            }
        }
        // Ties round to even, as half's conversion does.
        let tie = f32::from_bits(0x3f80_8000);
        let mut o = [0u32; 1];
        pack_row_pairs(&[tie, tie], 2, 1, &mut o);
        assert_eq!(o[0], 0x3f80_3f80);
    }
}
