//! The tile operations the CPU paths spend their time in: a register-blocked
//! matrix product (`Sᵀ = K Qᵀ`, `O += P V`, state updates) and the
//! online-softmax update of a score tile. Each is compiled three times: for
//! AVX-512, for AVX2 + FMA, and for baseline x86-64 / other targets (f32
//! products by hand with intrinsics, the rest generic). The variant is chosen
//! at run time because the binary is built for a baseline CPU and carried to
//! other machines (`-C target-cpu=native` would make it crash where the build
//! machine's extensions are missing).

use std::sync::OnceLock;

use super::real::Real;

/// The vector extensions a variant is compiled for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Isa {
    Avx512,
    Avx2,
    Portable,
}

/// The best variant the running CPU supports (detected once).
pub fn detected_isa() -> Isa {
    static ISA: OnceLock<Isa> = OnceLock::new();
    *ISA.get_or_init(|| {
        #[cfg(target_arch = "x86_64")]
        {
            let fma = is_x86_feature_detected!("fma");
            if fma && is_x86_feature_detected!("avx512f") {
                return Isa::Avx512;
            }
            if fma && is_x86_feature_detected!("avx2") {
                return Isa::Avx2;
            }
        }
        Isa::Portable
    })
}

/// Every variant this CPU can run (for tests that compare them).
#[cfg(test)]
pub fn supported_isas() -> Vec<Isa> {
    match detected_isa() {
        Isa::Avx512 => vec![Isa::Avx512, Isa::Avx2, Isa::Portable],
        Isa::Avx2 => vec![Isa::Avx2, Isa::Portable],
        Isa::Portable => vec![Isa::Portable],
    }
}

/// A row-major matrix view: element `(r, c)` at `data[r * ld + c]`.
#[derive(Debug, Clone, Copy)]
pub struct Mat<'a, T> {
    pub data: &'a [T],
    pub rows: usize,
    pub cols: usize,
    pub ld: usize,
}

/// A mutable row-major matrix view.
#[derive(Debug)]
pub struct MatMut<'a, T> {
    pub data: &'a mut [T],
    pub rows: usize,
    pub cols: usize,
    pub ld: usize,
}

impl<'a, T> Mat<'a, T> {
    /// A dense `rows x cols` matrix (`ld = cols`).
    pub fn dense(data: &'a [T], rows: usize, cols: usize) -> Self {
        Mat {
            data,
            rows,
            cols,
            ld: cols,
        }
    }
}

impl<'a, T> MatMut<'a, T> {
    pub fn dense(data: &'a mut [T], rows: usize, cols: usize) -> Self {
        MatMut {
            data,
            rows,
            cols,
            ld: cols,
        }
    }
}

/// Panics unless `c (rows x cols, stride ld, in a slice of c_len) = a b`
/// (`a` transposed with `ta`) is a well-formed product whose views all lie
/// inside their slices: checked once per product, so the kernels' inner
/// loops need no bounds checks. Shared by the f32 and the bf16 products.
pub(super) fn check_product<A, B>(
    what: &str,
    ta: bool,
    a: &Mat<'_, A>,
    b: &Mat<'_, B>,
    c_len: usize,
    (rows, cols, ld): (usize, usize, usize),
) {
    let (m, k) = if ta {
        (a.cols, a.rows)
    } else {
        (a.rows, a.cols)
    };
    assert!(
        k == b.rows && rows == m && cols == b.cols,
        "{what} shapes: a {}x{}{}, b {}x{}, c {rows}x{cols}",
        a.rows,
        a.cols,
        if ta { " (transposed)" } else { "" },
        b.rows,
        b.cols,
    );
    assert!(
        fits(a.data.len(), a.rows, a.cols, a.ld),
        "{what}: a out of range"
    );
    assert!(
        fits(b.data.len(), b.rows, b.cols, b.ld),
        "{what}: b out of range"
    );
    assert!(fits(c_len, rows, cols, ld), "{what}: c out of range");
}

/// True when every element of a `rows x cols` view with stride `ld` lies in
/// a slice of length `len`.
pub(super) fn fits(len: usize, rows: usize, cols: usize, ld: usize) -> bool {
    rows == 0 || cols == 0 || (cols <= ld && (rows - 1) * ld + cols <= len)
}

/// `c = a b`, or `c += a b` with `accumulate`.
///
/// # Panics
/// When the shapes disagree or a view does not fit its slice (a bug in the
/// caller; checked once here so the inner loops need no bounds checks).
pub fn gemm<T: Real>(a: Mat<'_, T>, b: Mat<'_, T>, c: MatMut<'_, T>, accumulate: bool) {
    gemm_on(detected_isa(), false, a, b, c, accumulate)
}

/// `c = atᵀ b` (or `+=`), `at` holding `a` transposed (`k x m`). The fast
/// form: the kernel broadcasts `R` consecutive elements of one row of `at`.
pub fn gemm_tn<T: Real>(at: Mat<'_, T>, b: Mat<'_, T>, c: MatMut<'_, T>, accumulate: bool) {
    gemm_on(detected_isa(), true, at, b, c, accumulate)
}

/// [`gemm`] (`ta = false`) or [`gemm_tn`] (`ta = true`) on the variant given
/// (one of [`supported_isas`]).
pub fn gemm_on<T: Real>(
    isa: Isa,
    ta: bool,
    a: Mat<'_, T>,
    b: Mat<'_, T>,
    c: MatMut<'_, T>,
    accumulate: bool,
) {
    check_product("gemm", ta, &a, &b, c.data.len(), (c.rows, c.cols, c.ld));
    let (m, k) = (c.rows, b.rows);
    let g = Gemm {
        a: a.data.as_ptr(),
        lda: a.ld,
        b: b.data.as_ptr(),
        ldb: b.ld,
        c: c.data.as_mut_ptr(),
        ldc: c.ld,
        m,
        n: b.cols,
        k,
        accumulate,
    };
    // SAFETY: the views were checked above to lie inside their slices, `c`
    // is borrowed mutably (so it aliases neither input), and each variant
    // runs only on a CPU that reported its features.
    unsafe {
        #[cfg(target_arch = "x86_64")]
        if let Some(g32) = g.as_f32() {
            match (isa, ta) {
                (Isa::Avx512, false) => return x86::gemm_f32_avx512::<false>(&g32),
                (Isa::Avx512, true) => return x86::gemm_f32_avx512::<true>(&g32),
                (Isa::Avx2, false) => return x86::gemm_f32_avx2::<false>(&g32),
                (Isa::Avx2, true) => return x86::gemm_f32_avx2::<true>(&g32),
                (Isa::Portable, _) => {}
            }
        }
        match (isa, ta) {
            #[cfg(target_arch = "x86_64")]
            (Isa::Avx512 | Isa::Avx2, false) => gemm_fma::<T, false>(&g),
            #[cfg(target_arch = "x86_64")]
            (Isa::Avx512 | Isa::Avx2, true) => gemm_fma::<T, true>(&g),
            (_, false) => gemm_blocks::<T, 4, 4, false, false>(&g),
            (_, true) => gemm_blocks::<T, 4, 4, false, true>(&g),
        }
    }
}

/// Raw operands of one product, validated by [`gemm_on`]: `a(i, p)` is
/// `a[i * lda + p]`, or `a[p * lda + i]` in the transposed form.
struct Gemm<T> {
    a: *const T,
    lda: usize,
    b: *const T,
    ldb: usize,
    c: *mut T,
    ldc: usize,
    m: usize,
    n: usize,
    k: usize,
    accumulate: bool,
}

impl<T: 'static> Gemm<T> {
    /// The same operands typed as f32 when `T` is f32 (the precision the
    /// hand-vectorised kernels are written for).
    #[cfg(target_arch = "x86_64")]
    fn as_f32(&self) -> Option<Gemm<f32>> {
        (std::any::TypeId::of::<T>() == std::any::TypeId::of::<f32>()).then_some(Gemm {
            a: self.a as *const f32,
            lda: self.lda,
            b: self.b as *const f32,
            ldb: self.ldb,
            c: self.c as *mut f32,
            ldc: self.ldc,
            m: self.m,
            n: self.n,
            k: self.k,
            accumulate: self.accumulate,
        })
    }
}

/// The generic loop with FMA enabled (f64 on x86-64).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn gemm_fma<T: Real, const TA: bool>(g: &Gemm<T>) {
    gemm_blocks::<T, 4, 4, true, TA>(g)
}

/// Splits `c` into an `R x C`-blocked main part and the ragged edges, which
/// reuse the same loop with 1-wide blocks.
#[inline(always)]
unsafe fn gemm_blocks<T: Real, const R: usize, const C: usize, const FMA: bool, const TA: bool>(
    g: &Gemm<T>,
) {
    let (m_main, n_main) = (g.m / R * R, g.n / C * C);
    block::<T, R, C, FMA, TA>(g, 0..m_main, 0..n_main);
    block::<T, R, 1, FMA, TA>(g, 0..m_main, n_main..g.n);
    block::<T, 1, C, FMA, TA>(g, m_main..g.m, 0..n_main);
    block::<T, 1, 1, FMA, TA>(g, m_main..g.m, n_main..g.n);
}

/// The address of `a(i, p)`.
#[inline(always)]
unsafe fn a_at<T, const TA: bool>(g: &Gemm<T>, i: usize, p: usize) -> *const T {
    if TA {
        g.a.add(p * g.lda + i)
    } else {
        g.a.add(i * g.lda + p)
    }
}

/// The register-blocked loop over `rows x cols` (multiples of `R`, `C`): an
/// `R x C` accumulator over the whole `k` loop, each row piece of `b` feeding
/// `R` rows of `a` (the outer-product form of `mma`). Portable; the f32
/// kernels below are the fast ones.
#[inline(always)]
unsafe fn block<T: Real, const R: usize, const C: usize, const FMA: bool, const TA: bool>(
    g: &Gemm<T>,
    rows: std::ops::Range<usize>,
    cols: std::ops::Range<usize>,
) {
    for i in rows.step_by(R) {
        for j in cols.clone().step_by(C) {
            let mut acc = [[T::ZERO; C]; R];
            for p in 0..g.k {
                let bv: [T; C] = std::ptr::read_unaligned(g.b.add(p * g.ldb + j) as *const [T; C]);
                for (x, accx) in acc.iter_mut().enumerate() {
                    let av = *a_at::<T, TA>(g, i + x, p);
                    for l in 0..C {
                        accx[l] = if FMA {
                            av.mul_add(bv[l], accx[l])
                        } else {
                            av * bv[l] + accx[l]
                        };
                    }
                }
            }
            for (x, accx) in acc.iter().enumerate() {
                let crow = g.c.add((i + x) * g.ldc + j);
                for (l, &v) in accx.iter().enumerate() {
                    if g.accumulate {
                        *crow.add(l) += v;
                    } else {
                        *crow.add(l) = v;
                    }
                }
            }
        }
    }
}

/// The AVX-512 products' walk over `c` (`g.m x g.n`): blocks of 8 rows x 32
/// columns (`$tile::<8, 2, TA>`), then 16-column steps with a lane mask at
/// the ragged right edge, single rows for the ragged bottom. Shared by the
/// f32 kernel and the bf16 one ([`super::bf16`]), whose tiles differ only
/// in the inner product instruction.
#[cfg(target_arch = "x86_64")]
macro_rules! avx512_blocks {
    ($g:expr, $tile:ident, $ta:ident) => {{
        let g = $g;
        const R: usize = 8;
        let m_main = g.m / R * R;
        let mut j = 0;
        // 6 x 64 blocks where the columns allow: 24 accumulators, four
        // vectors of a row of `b` and one broadcast (29 of the 32
        // registers), a broadcast per four FMAs.
        const R6: usize = 6;
        let m6 = g.m / R6 * R6;
        while j + 64 <= g.n {
            for i in (0..m6).step_by(R6) {
                $tile::<R6, 4, $ta>(g, i, j, 0xffff);
            }
            let mut i = m6;
            if i + 4 <= g.m {
                $tile::<4, 4, $ta>(g, i, j, 0xffff);
                i += 4;
            }
            while i < g.m {
                $tile::<1, 4, $ta>(g, i, j, 0xffff);
                i += 1;
            }
            j += 64;
        }
        while j + 32 <= g.n {
            for i in (0..m_main).step_by(R) {
                $tile::<R, 2, $ta>(g, i, j, 0xffff);
            }
            for i in m_main..g.m {
                $tile::<1, 2, $ta>(g, i, j, 0xffff);
            }
            j += 32;
        }
        while j < g.n {
            let w = (g.n - j).min(16);
            let mask = $crate::cpu::microkernel::lane_mask(w);
            for i in (0..m_main).step_by(R) {
                $tile::<R, 1, $ta>(g, i, j, mask);
            }
            for i in m_main..g.m {
                $tile::<1, 1, $ta>(g, i, j, mask);
            }
            j += 16;
        }
    }};
}
#[cfg(target_arch = "x86_64")]
pub(super) use avx512_blocks;

/// The AVX-512 lane mask of the first `n` of 16 lanes (`n <= 16`).
#[cfg(target_arch = "x86_64")]
#[inline(always)]
pub(super) fn lane_mask(n: usize) -> std::arch::x86_64::__mmask16 {
    debug_assert!(n <= 16);
    ((1u32 << n) - 1) as u16
}

/// f32 products written with intrinsics: the autovectorised generic loop
/// keeps its accumulators in memory, these keep them in registers. Shapes:
/// `R` rows x `V` vectors of columns, `R` broadcasts of `a` per loaded row
/// piece of `b`; ragged columns take narrower (AVX2) or masked (AVX-512) steps.
/// With `TA` the `R` broadcasts are consecutive floats of one row of `aᵀ`,
/// addressed from one pointer by constant offsets.
#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::{a_at, Gemm};
    use std::arch::x86_64::*;

    #[target_feature(enable = "avx512f,avx2,fma")]
    pub(super) unsafe fn gemm_f32_avx512<const TA: bool>(g: &Gemm<f32>) {
        super::avx512_blocks!(g, tile512, TA);
    }

    /// `R x 16 V` block at `(i, j)`; `mask` selects the live columns of the
    /// last vector (all of them except at the ragged edge).
    #[inline(always)]
    unsafe fn tile512<const R: usize, const V: usize, const TA: bool>(
        g: &Gemm<f32>,
        i: usize,
        j: usize,
        mask: __mmask16,
    ) {
        let mut acc = [[_mm512_setzero_ps(); V]; R];
        let full: __mmask16 = 0xffff;
        let lane_mask = |v: usize| if v + 1 == V { mask } else { full };
        for p in 0..g.k {
            let brow = g.b.add(p * g.ldb + j);
            let mut bv = [_mm512_setzero_ps(); V];
            for (v, b) in bv.iter_mut().enumerate() {
                *b = _mm512_maskz_loadu_ps(lane_mask(v), brow.add(16 * v));
            }
            for (x, accx) in acc.iter_mut().enumerate() {
                let a = _mm512_set1_ps(*a_at::<f32, TA>(g, i + x, p));
                for v in 0..V {
                    accx[v] = _mm512_fmadd_ps(a, bv[v], accx[v]);
                }
            }
        }
        for (x, accx) in acc.iter().enumerate() {
            let crow = g.c.add((i + x) * g.ldc + j);
            for (v, &a) in accx.iter().enumerate() {
                let (m, ptr) = (lane_mask(v), crow.add(16 * v));
                let out = if g.accumulate {
                    _mm512_add_ps(_mm512_maskz_loadu_ps(m, ptr), a)
                } else {
                    a
                };
                _mm512_mask_storeu_ps(ptr, m, out);
            }
        }
    }

    /// [`super::softmax_cols`] for f32 on AVX-512: a key row's queries in
    /// up to four vectors at a time (four independent max, exp and sum
    /// chains, the tile read in memory order), and `e^x` as
    /// [`exp_f32x16`] computes it.
    #[target_feature(enable = "avx512f,avx2,fma")]
    pub(super) unsafe fn softmax_f32_avx512(
        st: &mut [f32],
        kn: usize,
        m: &mut [f32],
        l: &mut [f32],
        o: &mut [f32],
    ) {
        let rows = m.len();
        let mut r0 = 0;
        while r0 < rows {
            let w = (rows - r0).min(64);
            match w.div_ceil(16) {
                4 => softmax_group::<4>(st, kn, r0, w, m, l, o),
                3 => softmax_group::<3>(st, kn, r0, w, m, l, o),
                2 => softmax_group::<2>(st, kn, r0, w, m, l, o),
                _ => softmax_group::<1>(st, kn, r0, w, m, l, o),
            }
            r0 += w;
        }
    }

    /// Queries `r0 .. r0 + w` (`w <= 16 G`) of [`softmax_f32_avx512`].
    #[inline(always)]
    unsafe fn softmax_group<const G: usize>(
        st: &mut [f32],
        kn: usize,
        r0: usize,
        w: usize,
        m: &mut [f32],
        l: &mut [f32],
        o: &mut [f32],
    ) {
        let rows = m.len();
        debug_assert!(w <= 16 * G && r0 + w <= rows && st.len() >= kn * rows);
        let lanes: [__mmask16; G] =
            std::array::from_fn(|g| super::lane_mask(w.saturating_sub(16 * g).min(16)));
        let neg_inf = _mm512_set1_ps(f32::NEG_INFINITY);
        let sp = st.as_mut_ptr().add(r0);
        let mut mx = [neg_inf; G];
        for c in 0..kn {
            let row = sp.add(c * rows);
            for g in 0..G {
                let x = _mm512_mask_loadu_ps(neg_inf, lanes[g], row.add(16 * g));
                mx[g] = _mm512_max_ps(mx[g], x);
            }
        }
        let mut shift = [neg_inf; G];
        let mut alpha = [neg_inf; G];
        for g in 0..G {
            let old = _mm512_mask_loadu_ps(neg_inf, lanes[g], m.as_ptr().add(r0 + 16 * g));
            let m_new = _mm512_max_ps(old, mx[g]);
            // Nothing seen yet: subtract 0 so masked scores give e^-inf = 0, not NaN.
            let seen = _mm512_cmp_ps_mask::<_CMP_NEQ_UQ>(m_new, neg_inf);
            shift[g] = _mm512_maskz_mov_ps(seen, m_new);
            alpha[g] = exp_f32x16(_mm512_sub_ps(old, shift[g]));
        }
        let mut sum = [_mm512_setzero_ps(); G];
        for c in 0..kn {
            let row = sp.add(c * rows);
            for g in 0..G {
                let x = _mm512_maskz_loadu_ps(lanes[g], row.add(16 * g));
                let p = exp_f32x16(_mm512_sub_ps(x, shift[g]));
                _mm512_mask_storeu_ps(row.add(16 * g), lanes[g], p);
                sum[g] = _mm512_add_ps(sum[g], p);
            }
        }
        let (mut mxs, mut alphas, mut sums) = ([0f32; 64], [0f32; 64], [0f32; 64]);
        for g in 0..G {
            _mm512_storeu_ps(mxs.as_mut_ptr().add(16 * g), mx[g]);
            _mm512_storeu_ps(alphas.as_mut_ptr().add(16 * g), alpha[g]);
            _mm512_storeu_ps(sums.as_mut_ptr().add(16 * g), sum[g]);
        }
        let dv = o.len() / rows;
        for q in 0..w {
            let r = r0 + q;
            if mxs[q] == f32::NEG_INFINITY {
                continue; // no finite score: keep the state (and p is 0)
            }
            if alphas[q] != 1.0 {
                o[r * dv..(r + 1) * dv]
                    .iter_mut()
                    .for_each(|x| *x *= alphas[q]);
                l[r] *= alphas[q];
            }
            l[r] += sums[q];
            m[r] = m[r].max(mxs[q]);
        }
    }

    /// [`super::softmax_grad_cols`] for f32 on AVX-512, with
    /// [`exp_f32x16`]: per key row, 16 queries at a time (the last vector
    /// masked).
    #[target_feature(enable = "avx512f,avx2,fma")]
    pub(super) unsafe fn softmax_grad_f32_avx512(
        a: &[f32],
        lse: &[f32],
        d: &[f32],
        p: &mut [f32],
        dp: &mut [f32],
    ) {
        let rows = lse.len();
        for c in 0..a.len() / rows.max(1) {
            let at = c * rows;
            for r0 in (0..rows).step_by(16) {
                let n = (rows - r0).min(16);
                let m = super::lane_mask(n);
                let x = _mm512_maskz_loadu_ps(m, a.as_ptr().add(at + r0));
                let l = _mm512_maskz_loadu_ps(m, lse.as_ptr().add(r0));
                let e = exp_f32x16(_mm512_sub_ps(x, l));
                _mm512_mask_storeu_ps(p.as_mut_ptr().add(at + r0), m, e);
                let g = _mm512_sub_ps(
                    _mm512_maskz_loadu_ps(m, dp.as_ptr().add(at + r0)),
                    _mm512_maskz_loadu_ps(m, d.as_ptr().add(r0)),
                );
                _mm512_mask_storeu_ps(dp.as_mut_ptr().add(at + r0), m, _mm512_mul_ps(e, g));
            }
        }
    }

    /// `e^x` on 16 lanes, as [`crate::cpu::real::exp_f32`] computes it but
    /// with AVX-512's own steps: `n = round(x log2 e)` by `vrndscaleps`,
    /// `e^r` on `|r| <= ln2 / 2` by a degree-6 polynomial fitted to the
    /// relative error (about 1e-7 evaluated in f32), and `2^n` applied by
    /// `vscalefps`. Lanes below -87.3 (where `e^x` is subnormal), `-inf`
    /// among them, give 0; NaN stays NaN.
    #[inline(always)]
    pub(super) unsafe fn exp_f32x16(x: __m512) -> __m512 {
        const LN2_HI: f32 = 0.693_359_4;
        const LN2_LO: f32 = -2.121_944_4e-4;
        const C: [f32; 7] = [
            1.0,
            1.0,
            0.499_999_9,
            0.166_664_2,
            0.041_668_225,
            0.008_374_816,
            0.001_383_680_4,
        ];
        let n = _mm512_roundscale_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(
            _mm512_mul_ps(x, _mm512_set1_ps(std::f32::consts::LOG2_E)),
        );
        let r = _mm512_fnmadd_ps(n, _mm512_set1_ps(LN2_HI), x);
        let r = _mm512_fnmadd_ps(n, _mm512_set1_ps(LN2_LO), r);
        let mut p = _mm512_set1_ps(C[6]);
        for &c in C[..6].iter().rev() {
            p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(c));
        }
        let live = _mm512_cmp_ps_mask::<_CMP_NLT_UQ>(x, _mm512_set1_ps(-87.3));
        _mm512_maskz_scalef_ps(live, p, n)
    }

    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn gemm_f32_avx2<const TA: bool>(g: &Gemm<f32>) {
        const R: usize = 4;
        // 6 x 16 blocks where the columns allow: 12 accumulators, two row
        // pieces of b and one broadcast fill 15 of the 16 registers, and 12
        // independent FMAs per step cover the FMA latency on both ports.
        const R6: usize = 6;
        let m6 = g.m / R6 * R6;
        let m4 = m6 + (g.m - m6) / R * R;
        let m_main = g.m / R * R;
        let mut j = 0;
        while j + 16 <= g.n {
            for i in (0..m6).step_by(R6) {
                tile256::<R6, 2, TA>(g, i, j);
            }
            for i in (m6..m4).step_by(R) {
                tile256::<R, 2, TA>(g, i, j);
            }
            for i in m4..g.m {
                tile256::<1, 2, TA>(g, i, j);
            }
            j += 16;
        }
        if j + 8 <= g.n {
            for i in (0..m_main).step_by(R) {
                tile256::<R, 1, TA>(g, i, j);
            }
            for i in m_main..g.m {
                tile256::<1, 1, TA>(g, i, j);
            }
            j += 8;
        }
        if j < g.n {
            super::block::<f32, 1, 1, true, TA>(g, 0..g.m, j..g.n);
        }
    }

    #[inline(always)]
    unsafe fn tile256<const R: usize, const V: usize, const TA: bool>(
        g: &Gemm<f32>,
        i: usize,
        j: usize,
    ) {
        let mut acc = [[_mm256_setzero_ps(); V]; R];
        for p in 0..g.k {
            let brow = g.b.add(p * g.ldb + j);
            let mut bv = [_mm256_setzero_ps(); V];
            for (v, b) in bv.iter_mut().enumerate() {
                *b = _mm256_loadu_ps(brow.add(8 * v));
            }
            for (x, accx) in acc.iter_mut().enumerate() {
                let a = _mm256_set1_ps(*a_at::<f32, TA>(g, i + x, p));
                for v in 0..V {
                    accx[v] = _mm256_fmadd_ps(a, bv[v], accx[v]);
                }
            }
        }
        for (x, accx) in acc.iter().enumerate() {
            let crow = g.c.add((i + x) * g.ldc + j);
            for (v, &a) in accx.iter().enumerate() {
                let ptr = crow.add(8 * v);
                let out = if g.accumulate {
                    _mm256_add_ps(_mm256_loadu_ps(ptr), a)
                } else {
                    a
                };
                _mm256_storeu_ps(ptr, out);
            }
        }
    }
}

/// `c = b aᵀ`, or `c[i][j] = a_j . b_i`: `a` is `n x k` (one row per key),
/// `b` is `m x k` (one row per query), `c` is `m x n`. The decode form's
/// score product: few query rows against many key rows read where they lie,
/// each a dot product along the contiguous feature axis (so the product is
/// vectorised along `k` whatever `m` is; [`gemm`] vectorises along the
/// columns, which a one-query decode has too few of).
///
/// # Panics
/// When the shapes disagree or a view does not fit its slice.
pub fn dot_rows<T: Real>(a: Mat<'_, T>, b: Mat<'_, T>, c: MatMut<'_, T>) {
    assert!(
        a.cols == b.cols && c.rows == b.rows && c.cols == a.rows,
        "dot_rows shapes: a {}x{}, b {}x{}, c {}x{}",
        a.rows,
        a.cols,
        b.rows,
        b.cols,
        c.rows,
        c.cols
    );
    assert!(
        fits(a.data.len(), a.rows, a.cols, a.ld),
        "dot_rows: a out of range"
    );
    assert!(
        fits(b.data.len(), b.rows, b.cols, b.ld),
        "dot_rows: b out of range"
    );
    assert!(
        fits(c.data.len(), c.rows, c.cols, c.ld),
        "dot_rows: c out of range"
    );
    match detected_isa() {
        // SAFETY: the variant runs only on a CPU that reported its features.
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512 | Isa::Avx2 => unsafe { dot_rows_fma(a, b, c) },
        _ => dot_rows_body::<T, false>(a, b, c),
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn dot_rows_fma<T: Real>(a: Mat<'_, T>, b: Mat<'_, T>, c: MatMut<'_, T>) {
    dot_rows_body::<T, true>(a, b, c)
}

/// Lanes of a dot product's independent accumulators (one AVX2 register of
/// f32; the compiler maps the array onto vector registers).
const DOT_LANES: usize = 8;

#[inline(always)]
fn dot_rows_body<T: Real, const FMA: bool>(a: Mat<'_, T>, b: Mat<'_, T>, c: MatMut<'_, T>) {
    let k = a.cols;
    let main = k / DOT_LANES * DOT_LANES;
    for j in 0..a.rows {
        let arow = &a.data[j * a.ld..j * a.ld + k];
        for i in 0..b.rows {
            let brow = &b.data[i * b.ld..i * b.ld + k];
            let mut acc = [T::ZERO; DOT_LANES];
            for (x, y) in arow[..main]
                .chunks_exact(DOT_LANES)
                .zip(brow[..main].chunks_exact(DOT_LANES))
            {
                for l in 0..DOT_LANES {
                    acc[l] = if FMA {
                        x[l].mul_add(y[l], acc[l])
                    } else {
                        x[l] * y[l] + acc[l]
                    };
                }
            }
            let mut sum = arow[main..]
                .iter()
                .zip(&brow[main..])
                .fold(T::ZERO, |s, (&x, &y)| s + x * y);
            for v in acc {
                sum += v;
            }
            c.data[i * c.ld + j] = sum;
        }
    }
}

/// The online-softmax update of one score tile in row form: `s` is `rows x
/// kn` (query `r`, key `c` at `s[r * kn + c]`, masked pairs `-inf`), with
/// `m`, `l`, `o` as in [`softmax_cols`]; `s` becomes `p`, ready for
/// `o += p v` ([`gemm`]). The decode form's layout (keys contiguous).
pub fn softmax_rows<T: Real>(s: &mut [T], kn: usize, m: &mut [T], l: &mut [T], o: &mut [T]) {
    let rows = m.len();
    assert!(
        l.len() == rows && s.len() == rows * kn && o.len().is_multiple_of(rows.max(1)),
        "softmax_rows: {rows} queries, {} sums, {} scores, {} outputs",
        l.len(),
        s.len(),
        o.len()
    );
    let dv = o.len() / rows.max(1);
    for (r, srow) in s.chunks_exact_mut(kn.max(1)).enumerate().take(rows) {
        let mx = srow.iter().fold(T::NEG_INF, |a, &x| a.max(x));
        let m_new = m[r].max(mx);
        if m_new == T::NEG_INF {
            srow.iter_mut().for_each(|x| *x = T::ZERO);
            continue;
        }
        for x in srow.iter_mut() {
            *x = (*x - m_new).exp_fast::<false>();
        }
        let alpha = (m[r] - m_new).exp_fast::<false>();
        l[r] = l[r] * alpha + row_sum(srow);
        if alpha != T::ONE {
            o[r * dv..(r + 1) * dv].iter_mut().for_each(|x| *x *= alpha);
        }
        m[r] = m_new;
    }
}

/// The online-softmax update of one transposed score tile: `st` is
/// `kn x rows` (key `c`, query `r` at `st[c * rows + r]`, masked pairs
/// `-inf`), `m`/`l` the running max and sum per query and `o` the `rows x dv`
/// unnormalised output. Per query: `m' = max(m, max_c s)`, `o *= e^(m - m')`,
/// `l = l e^(m - m') + sum_c e^(s - m')`, and `st` becomes `p = e^(s - m')`,
/// ready for `o += pᵀᵀ v` ([`gemm_tn`]). A query with no finite score keeps its
/// state and gets `p = 0`. Queries run along the contiguous axis, so every
/// step is a plain vector operation (no horizontal reductions).
pub fn softmax_cols<T: Real>(st: &mut [T], kn: usize, m: &mut [T], l: &mut [T], o: &mut [T]) {
    softmax_cols_on(detected_isa(), st, kn, m, l, o)
}

/// [`softmax_cols`] with the variant given.
pub fn softmax_cols_on<T: Real>(
    isa: Isa,
    st: &mut [T],
    kn: usize,
    m: &mut [T],
    l: &mut [T],
    o: &mut [T],
) {
    let rows = m.len();
    assert!(
        l.len() == rows && st.len() >= rows * kn && rows > 0 && o.len().is_multiple_of(rows),
        "softmax_cols: {rows} queries, {} sums, {} scores, {} outputs",
        l.len(),
        st.len(),
        o.len()
    );
    let st = &mut st[..rows * kn];
    // SAFETY: a variant runs only on a CPU that reported its features.
    unsafe {
        #[cfg(target_arch = "x86_64")]
        if let (Isa::Avx512, Some(st32)) = (isa, as_f32s(st)) {
            let (m, l, o) = (
                as_f32s(m).unwrap(),
                as_f32s(l).unwrap(),
                as_f32s(o).unwrap(),
            );
            return x86::softmax_f32_avx512(st32, kn, m, l, o);
        }
        match isa {
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512 => softmax_avx512(st, kn, m, l, o),
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2 => softmax_avx2(st, kn, m, l, o),
            _ => softmax_body::<T, false>(st, kn, m, l, o),
        }
    }
}

/// `x` as f32 when `T` is f32.
fn as_f32s<T: 'static>(x: &mut [T]) -> Option<&mut [f32]> {
    (std::any::TypeId::of::<T>() == std::any::TypeId::of::<f32>()).then(|| {
        // SAFETY: `T` is `f32`, so the slice is reinterpreted as itself.
        unsafe { std::slice::from_raw_parts_mut(x.as_mut_ptr() as *mut f32, x.len()) }
    })
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx2,fma")]
unsafe fn softmax_avx512<T: Real>(st: &mut [T], kn: usize, m: &mut [T], l: &mut [T], o: &mut [T]) {
    softmax_body::<T, true>(st, kn, m, l, o)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn softmax_avx2<T: Real>(st: &mut [T], kn: usize, m: &mut [T], l: &mut [T], o: &mut [T]) {
    softmax_body::<T, true>(st, kn, m, l, o)
}

/// Queries per step: a fixed width the compiler maps onto vector registers.
const LANES: usize = 16;

#[inline(always)]
fn softmax_body<T: Real, const FMA: bool>(
    st: &mut [T],
    kn: usize,
    m: &mut [T],
    l: &mut [T],
    o: &mut [T],
) {
    let rows = m.len();
    let main = rows / LANES * LANES;
    for r0 in (0..main).step_by(LANES) {
        softmax_lanes::<T, FMA, LANES>(st, kn, rows, r0, m, l, o);
    }
    for r0 in main..rows {
        softmax_lanes::<T, FMA, 1>(st, kn, rows, r0, m, l, o);
    }
}

/// [`softmax_cols`] for queries `r0 .. r0 + W`.
#[inline(always)]
fn softmax_lanes<T: Real, const FMA: bool, const W: usize>(
    st: &mut [T],
    kn: usize,
    rows: usize,
    r0: usize,
    m: &mut [T],
    l: &mut [T],
    o: &mut [T],
) {
    let lanes = |c: usize| r0 + c * rows..r0 + c * rows + W;
    let mut mx = [T::NEG_INF; W];
    for c in 0..kn {
        for (a, &x) in mx.iter_mut().zip(&st[lanes(c)]) {
            *a = if x > *a { x } else { *a };
        }
    }
    let (mut m_new, mut shift, mut alpha) = ([T::ZERO; W], [T::ZERO; W], [T::ONE; W]);
    for q in 0..W {
        let (old, x) = (m[r0 + q], mx[q]);
        m_new[q] = if x > old { x } else { old };
        // Nothing seen yet: subtract 0 so masked scores give e^-inf = 0, not NaN.
        shift[q] = if m_new[q] == T::NEG_INF {
            T::ZERO
        } else {
            m_new[q]
        };
        alpha[q] = (old - shift[q]).exp_fast::<FMA>();
    }
    let mut sum = [T::ZERO; W];
    for c in 0..kn {
        for ((x, s), &sh) in st[lanes(c)].iter_mut().zip(&mut sum).zip(&shift) {
            *x = (*x - sh).exp_fast::<FMA>();
            *s += *x;
        }
    }
    let dv = o.len() / rows;
    for q in 0..W {
        let r = r0 + q;
        if mx[q] == T::NEG_INF {
            continue; // no finite score: keep the state (and p is 0)
        }
        if alpha[q] != T::ONE {
            o[r * dv..(r + 1) * dv]
                .iter_mut()
                .for_each(|x| *x *= alpha[q]);
            l[r] *= alpha[q];
        }
        l[r] += sum[q];
        m[r] = m_new[q];
    }
}

/// The softmax backward of one transposed tile (`kn x rows`, query `r` on
/// the contiguous axis): from the weights `a` and each query's log-sum-exp
/// `lse` (`+inf` for a query that sees nothing), `p = e^(a - lse)`, and
/// `dp` (holding `u . v`) becomes `da = p (dp - d)`.
pub fn softmax_grad_cols<T: Real>(a: &[T], lse: &[T], d: &[T], p: &mut [T], dp: &mut [T]) {
    let rows = lse.len();
    assert!(
        d.len() == rows
            && a.len() == p.len()
            && a.len() == dp.len()
            && a.len().is_multiple_of(rows.max(1)),
        "softmax_grad_cols: {rows} queries, {} weights",
        a.len()
    );
    // SAFETY: a variant runs only on a CPU that reported its features.
    unsafe {
        #[cfg(target_arch = "x86_64")]
        if detected_isa() == Isa::Avx512 {
            if let (Some(p32), Some(dp32)) = (as_f32s(p), as_f32s(dp)) {
                let f32s = |x: &[T]| std::slice::from_raw_parts(x.as_ptr() as *const f32, x.len());
                return x86::softmax_grad_f32_avx512(f32s(a), f32s(lse), f32s(d), p32, dp32);
            }
        }
        match detected_isa() {
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512 => softmax_grad_avx512(a, lse, d, p, dp),
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2 => softmax_grad_avx2(a, lse, d, p, dp),
            _ => softmax_grad_body::<T, false>(a, lse, d, p, dp),
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx2,fma")]
unsafe fn softmax_grad_avx512<T: Real>(a: &[T], lse: &[T], d: &[T], p: &mut [T], dp: &mut [T]) {
    softmax_grad_body::<T, true>(a, lse, d, p, dp)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn softmax_grad_avx2<T: Real>(a: &[T], lse: &[T], d: &[T], p: &mut [T], dp: &mut [T]) {
    softmax_grad_body::<T, true>(a, lse, d, p, dp)
}

#[inline(always)]
fn softmax_grad_body<T: Real, const FMA: bool>(
    a: &[T],
    lse: &[T],
    d: &[T],
    p: &mut [T],
    dp: &mut [T],
) {
    let rows = lse.len();
    for ((ac, pc), dc) in a
        .chunks_exact(rows)
        .zip(p.chunks_exact_mut(rows))
        .zip(dp.chunks_exact_mut(rows))
    {
        for r in 0..rows {
            let e = (ac[r] - lse[r]).exp_fast::<FMA>();
            pc[r] = e;
            dc[r] = e * (dc[r] - d[r]);
        }
    }
}

/// `sum[r] += sum_c st[c][r]` over a `kn x rows` transposed tile.
#[inline]
pub fn col_sums_add<T: Real>(st: &[T], sum: &mut [T]) {
    for row in st.chunks_exact(sum.len()) {
        sum.iter_mut().zip(row).for_each(|(s, &x)| *s += x);
    }
}

/// Sum of a row with independent accumulators (a single running sum would
/// be a serial chain the compiler may not reorder).
#[inline]
pub fn row_sum<T: Real>(row: &[T]) -> T {
    let mut acc = [T::ZERO; LANES];
    let chunks = row.chunks_exact(LANES);
    let tail: T = chunks.remainder().iter().copied().sum();
    for ch in chunks {
        for (a, &x) in acc.iter_mut().zip(ch) {
            *a += x;
        }
    }
    acc.iter().fold(tail, |s, &a| s + a)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn naive(a: &[f64], b: &[f64], m: usize, n: usize, k: usize) -> Vec<f64> {
        let mut c = vec![0.0; m * n];
        for i in 0..m {
            for j in 0..n {
                c[i * n + j] = (0..k).map(|p| a[i * k + p] * b[p * n + j]).sum();
            }
        }
        c
    }

    fn fill(n: usize, seed: usize) -> Vec<f64> {
        (0..n)
            .map(|x| ((x * 37 + seed * 11) % 23) as f64 / 7.0 - 1.5)
            .collect()
    }

    /// Every variant, both precisions, plain and transposed `a`, ragged
    /// shapes around the block sizes, strided views and accumulation agree
    /// with a plain triple loop (f64 to 1e-12: only the summation order and
    /// FMA rounding differ).
    #[test]
    fn gemm_matches_naive_on_every_variant() {
        let shapes = [
            (1, 1, 1),
            (4, 16, 8),
            (7, 13, 5),
            (9, 33, 17),
            (64, 64, 128),
            (13, 70, 3),
            // Rows as 6-blocks, a 4-block and single rows (AVX2).
            (10, 17, 6),
            (11, 32, 9),
            // AVX-512: 64-column passes with 6-, 4- and single-row blocks,
            // then a 16-column and a masked pass.
            (11, 150, 5),
            (17, 64, 4),
        ];
        for isa in supported_isas() {
            for &(m, n, k) in &shapes {
                let (a, b) = (fill(m * k, 1), fill(k * n, 2));
                let want = naive(&a, &b, m, n, k);
                // f64, a and c embedded in wider rows (ld > cols), accumulate onto 1.
                let (lda, ldc) = (k + 3, n + 5);
                let mut aw = vec![f64::NAN; m * lda];
                for i in 0..m {
                    aw[i * lda..i * lda + k].copy_from_slice(&a[i * k..(i + 1) * k]);
                }
                let mut c = vec![1.0; m * ldc];
                gemm_on(
                    isa,
                    false,
                    Mat {
                        data: &aw,
                        rows: m,
                        cols: k,
                        ld: lda,
                    },
                    Mat::dense(&b, k, n),
                    MatMut {
                        data: &mut c,
                        rows: m,
                        cols: n,
                        ld: ldc,
                    },
                    true,
                );
                for i in 0..m {
                    for j in 0..n {
                        let got = c[i * ldc + j];
                        assert!(
                            (got - 1.0 - want[i * n + j]).abs() < 1e-12,
                            "{isa:?} f64 {m}x{n}x{k} ({i},{j})"
                        );
                    }
                    // Columns past `cols` are untouched.
                    assert!(c[i * ldc + n..(i + 1) * ldc].iter().all(|&x| x == 1.0));
                }
                // f32, dense, overwrite (c starts as garbage).
                let (a32, b32): (Vec<f32>, Vec<f32>) = (
                    a.iter().map(|&x| x as f32).collect(),
                    b.iter().map(|&x| x as f32).collect(),
                );
                let mut c32 = vec![f32::NAN; m * n];
                gemm_on(
                    isa,
                    false,
                    Mat::dense(&a32, m, k),
                    Mat::dense(&b32, k, n),
                    MatMut::dense(&mut c32, m, n),
                    false,
                );
                for (x, (&got, &w)) in c32.iter().zip(&want).enumerate() {
                    assert!(
                        (got as f64 - w).abs() < 1e-4 * (1.0 + w.abs()),
                        "{isa:?} f32 {m}x{n}x{k} at {x}: {got} vs {w}"
                    );
                }
                // Transposed `a` (k x m, stride m + 2), both precisions, overwrite.
                let ldt = m + 2;
                let mut at = vec![f64::NAN; k * ldt];
                for i in 0..m {
                    for p in 0..k {
                        at[p * ldt + i] = a[i * k + p];
                    }
                }
                let at32: Vec<f32> = at.iter().map(|&x| x as f32).collect();
                let (mut c, mut c32) = (vec![f64::NAN; m * n], vec![f32::NAN; m * n]);
                gemm_on(
                    isa,
                    true,
                    Mat {
                        data: &at,
                        rows: k,
                        cols: m,
                        ld: ldt,
                    },
                    Mat::dense(&b, k, n),
                    MatMut::dense(&mut c, m, n),
                    false,
                );
                gemm_on(
                    isa,
                    true,
                    Mat {
                        data: &at32,
                        rows: k,
                        cols: m,
                        ld: ldt,
                    },
                    Mat::dense(&b32, k, n),
                    MatMut::dense(&mut c32, m, n),
                    false,
                );
                for x in 0..m * n {
                    assert!(
                        (c[x] - want[x]).abs() < 1e-12,
                        "{isa:?} f64 tn {m}x{n}x{k} at {x}"
                    );
                    assert!(
                        (c32[x] as f64 - want[x]).abs() < 1e-4 * (1.0 + want[x].abs()),
                        "{isa:?} f32 tn {m}x{n}x{k} at {x}"
                    );
                }
            }
        }
    }

    #[test]
    #[should_panic(expected = "gemm shapes")]
    fn gemm_rejects_mismatched_shapes() {
        let x = [0.0f32; 6];
        let mut c = [0.0f32; 4];
        gemm(
            Mat::dense(&x, 2, 3),
            Mat::dense(&x, 2, 3),
            MatMut::dense(&mut c, 2, 2),
            false,
        );
    }

    #[test]
    fn exp_fast_is_accurate_and_zero_below_range() {
        let mut worst = 0f64;
        let mut x = -87.0f32;
        while x <= 10.0 {
            let (got, want) = (exp_f32_ref(x), (x as f64).exp());
            worst = worst.max((got as f64 - want).abs() / want);
            x += 0.0137;
        }
        assert!(worst < 5e-7, "worst relative error {worst:e}");
        assert_eq!(f32::NEG_INFINITY.exp_fast::<false>(), 0.0);
        assert_eq!((-200.0f32).exp_fast::<false>(), 0.0);
        assert_eq!(0.0f32.exp_fast::<false>(), 1.0);
    }

    fn exp_f32_ref(x: f32) -> f32 {
        x.exp_fast::<false>()
    }

    /// Feeds each query's scores (`score(c, r)` over `2 kn` keys, `-inf`
    /// masked) in two tiles through the update and the `P V` product, and
    /// compares `(m, l, o)` with one softmax over all of them in f64 (`tol`
    /// relative to the row's weight). A query whose first tile is entirely
    /// masked keeps `m = -inf` and gets `p = 0` there.
    fn check_softmax_cols<T: Real>(
        isa: Isa,
        rows: usize,
        kn: usize,
        score: impl Fn(usize, usize) -> f64,
        tol: f64,
    ) {
        let dv = 5;
        let s = |c: usize, r: usize| T::from_f64(score(c, r));
        let v: Vec<T> = (0..2 * kn * dv)
            .map(|x| T::from_f64(((x * 7) % 13) as f64 - 6.0))
            .collect();
        let (mut m, mut l, mut o) = (
            vec![T::NEG_INF; rows],
            vec![T::ZERO; rows],
            vec![T::ZERO; rows * dv],
        );
        for t in 0..2 {
            let mut st: Vec<T> = (0..kn)
                .flat_map(|c| (0..rows).map(move |r| (t * kn + c, r)))
                .map(|(c, r)| s(c, r))
                .collect();
            softmax_cols_on(isa, &mut st, kn, &mut m, &mut l, &mut o);
            for r in (0..rows).filter(|&r| t == 0 && (0..kn).all(|c| s(c, r) == T::NEG_INF)) {
                assert!(m[r] == T::NEG_INF && (0..kn).all(|c| st[c * rows + r] == T::ZERO));
            }
            gemm_on(
                isa,
                true,
                Mat::dense(&st, kn, rows),
                Mat::dense(&v[t * kn * dv..], kn, dv),
                MatMut::dense(&mut o, rows, dv),
                true,
            );
        }
        for r in 0..rows {
            let sr: Vec<f64> = (0..2 * kn).map(|c| s(c, r).to_f64()).collect();
            let mx = sr.iter().copied().fold(f64::NEG_INFINITY, f64::max);
            let w: Vec<f64> = sr.iter().map(|&x| (x - mx).exp()).collect();
            let sum: f64 = w.iter().sum();
            assert!(
                m[r].to_f64() == mx && (l[r].to_f64() - sum).abs() <= tol * sum,
                "{isa:?} {rows} rows, query {r}: m {:?} vs {mx}, l {:?} vs {sum}",
                m[r],
                l[r]
            );
            for d in 0..dv {
                let want: f64 = (0..2 * kn).map(|c| w[c] * v[c * dv + d].to_f64()).sum();
                assert!(
                    (o[r * dv + d].to_f64() - want).abs() <= tol * 6.0 * sum,
                    "{isa:?} {rows} rows ({r},{d}): {:?} vs {want}",
                    o[r * dv + d]
                );
            }
        }
    }

    /// The tile update equals the definition, in f64 and in f32 (the
    /// AVX-512 one where the CPU has it: whole key rows of up to 64
    /// queries, ragged groups masked), at widths that leave a partial
    /// vector and a partial group, with fully masked first tiles.
    #[test]
    fn softmax_cols_matches_the_definition() {
        for isa in supported_isas() {
            let kn = 37;
            // Query 5 sees nothing in the first tile.
            check_softmax_cols::<f64>(
                isa,
                21,
                kn,
                |c, r| {
                    if (c * 7 + r) % 11 == 3 || (r == 5 && c < kn) {
                        f64::NEG_INFINITY
                    } else {
                        ((c * 17 + r * 5) % 29) as f64 / 5.0 - 3.0
                    }
                },
                1e-9,
            );
            let kn = 29;
            for rows in [1, 16, 21, 64, 70, 131] {
                check_softmax_cols::<f32>(
                    isa,
                    rows,
                    kn,
                    |c, r| {
                        if (c * 7 + r) % 11 == 3 || (r % 9 == 5 && c < kn) {
                            f64::NEG_INFINITY
                        } else {
                            ((c * 17 + r * 5) % 29) as f64 / 3.0 - 4.0 + (r % 3) as f64 * 20.0
                        }
                    },
                    2e-6,
                );
            }
        }
    }

    #[cfg(target_arch = "x86_64")]
    #[test]
    fn the_avx512_exp_is_accurate_and_zero_below_range() {
        use std::arch::x86_64::*;
        if detected_isa() != Isa::Avx512 {
            eprintln!("SKIPPED: no AVX-512 on this CPU");
            return;
        }
        let exp16 = |xs: [f32; 16]| -> [f32; 16] {
            let mut out = [0f32; 16];
            // SAFETY: the CPU has AVX-512 (checked above).
            unsafe {
                #[target_feature(enable = "avx512f")]
                unsafe fn go(xs: &[f32; 16], out: &mut [f32; 16]) {
                    let y = x86::exp_f32x16(_mm512_loadu_ps(xs.as_ptr()));
                    _mm512_storeu_ps(out.as_mut_ptr(), y);
                }
                go(&xs, &mut out);
            }
            out
        };
        let mut worst = 0f64;
        let mut x = -87.0f32;
        while x <= 10.0 {
            let xs: [f32; 16] = std::array::from_fn(|i| x + i as f32 * 0.00071);
            for (&xi, &got) in xs.iter().zip(&exp16(xs)) {
                let want = (xi as f64).exp();
                worst = worst.max((got as f64 - want).abs() / want);
            }
            x += 0.0137;
        }
        assert!(worst < 3e-7, "worst relative error {worst:e}");
        let mut special = [0f32; 16];
        special[..6].copy_from_slice(&[f32::NEG_INFINITY, -200.0, -87.4, 0.0, f32::NAN, -1e-30]);
        let got = exp16(special);
        assert_eq!(&got[..4], &[0.0, 0.0, 0.0, 1.0]);
        assert!(got[4].is_nan() && got[5] == 1.0, "{got:?}");
    }

    #[test]
    fn softmax_grad_cols_matches_the_definition() {
        for rows in [1, 16, 21, 64] {
            let kn = 7;
            let a: Vec<f32> = (0..kn * rows)
                .map(|x| {
                    if x % 5 == 2 {
                        f32::NEG_INFINITY
                    } else {
                        (x % 13) as f32 * 0.3 - 2.0
                    }
                })
                .collect();
            // Query 3 sees nothing (lse = +inf).
            let lse: Vec<f32> = (0..rows)
                .map(|r| {
                    if r == 3 {
                        f32::INFINITY
                    } else {
                        1.5 + r as f32 * 0.01
                    }
                })
                .collect();
            let d: Vec<f32> = (0..rows).map(|r| r as f32 * 0.1 - 0.5).collect();
            let dp0: Vec<f32> = (0..kn * rows).map(|x| (x % 7) as f32 * 0.2 - 0.6).collect();
            let (mut p, mut dp) = (vec![f32::NAN; kn * rows], dp0.clone());
            softmax_grad_cols(&a, &lse, &d, &mut p, &mut dp);
            for x in 0..kn * rows {
                let r = x % rows;
                let e = (a[x] as f64 - lse[r] as f64).exp();
                let want = e * (dp0[x] as f64 - d[r] as f64);
                assert!(
                    (p[x] as f64 - e).abs() <= 3e-7 * e,
                    "{rows} rows, p at {x}: {} vs {e}",
                    p[x]
                );
                assert!(
                    (dp[x] as f64 - want).abs() <= 1e-6 * (1.0 + want.abs()),
                    "{rows} rows, da at {x}: {} vs {want}",
                    dp[x]
                );
            }
        }
    }

    #[test]
    fn an_all_masked_query_keeps_its_state() {
        let mut st = vec![f32::NEG_INFINITY; 8];
        let (mut m, mut l, mut o) = ([1.5f32], [2.0f32], [3.0f32, 4.0]);
        softmax_cols(&mut st, 8, &mut m, &mut l, &mut o);
        assert_eq!((m, l, o), ([1.5], [2.0], [3.0, 4.0]));
        assert!(st.iter().all(|&p| p == 0.0));
    }

    #[test]
    fn col_sums_add_sums_down_columns() {
        let st: Vec<f32> = (0..12).map(|x| x as f32).collect(); // 4 x 3
        let mut sum = [1.0f32; 3];
        col_sums_add(&st, &mut sum);
        assert_eq!(sum, [1.0 + 18.0, 1.0 + 22.0, 1.0 + 26.0]);
    }

    #[test]
    fn row_sum_adds_every_element() {
        let x: Vec<f32> = (0..37).map(|x| x as f32).collect();
        assert_eq!(row_sum(&x), (0..37).sum::<i32>() as f32);
    }
}
