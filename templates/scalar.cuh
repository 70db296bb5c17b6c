// ---- scalar helpers of lowered expressions (bias, transform, decay) ----------
// Host + device, so a host test can check them against `ir::Expr::eval`.
#ifndef MIXC_HD
#ifdef __CUDACC__
#define MIXC_HD __host__ __device__ __forceinline__
#else
#define MIXC_HD inline
#endif
#endif

namespace mixc {

// Index clamped into [0, n): the language's rule for table reads.
MIXC_HD int clampi(int x, int n) { return x < 0 ? 0 : (x >= n ? n - 1 : x); }

// The IR defines x % 0 as 0 (C leaves it undefined, and INT_MIN % -1 too,
// which the IR's wrapping remainder makes 0); otherwise C's remainder (sign
// of the dividend), as the IR's.
MIXC_HD int rem_or_zero(int a, int b) { return b == 0 || b == -1 ? 0 : a % b; }

// Integer floor division (Python's `a // b`), 0 when b == 0: the IR's
// `div(a, b)` (`ir::floor_div`). INT_MIN / -1 wraps instead of trapping.
MIXC_HD int floordiv(int a, int b) {
    if (b == 0) return 0;
    if (b == -1) return (int)(0u - (unsigned)a);
    const int q = a / b;
    return (a % b != 0 && ((a < 0) != (b < 0))) ? q - 1 : q;
}

// Float to int truncating toward zero, saturating, NaN -> 0: the IR's
// `int(x)` (Rust's `as`), where a plain C cast of an out-of-range value is
// undefined.
MIXC_HD int f2i(float x) {
    if (x != x) return 0;
    if (x >= 2147483648.0f) return 2147483647;
    if (x <= -2147483648.0f) return (int)(-2147483647 - 1);
    return (int)x;
}

// sin / cos of the IR in f32. On the device: reduced by 2 pi in two FMA
// steps (Cody-Waite, exact enough for |x| up to ~1e5), then the hardware
// approximation on [-pi, pi] (abs error < 1e-6) -- `sinf` would compile its
// Payne-Hanek path for huge arguments, a local-memory stack frame in every
// kernel that calls it. On the host: the C library's.
MIXC_HD float sin_f(float x) {
#ifdef __CUDA_ARCH__
    const float k = rintf(x * 0.159154943f);
    return __sinf(fmaf(-k, -1.74845553e-07f, fmaf(-k, 6.28318548f, x)));
#else
    return sinf(x);
#endif
}
MIXC_HD float cos_f(float x) {
#ifdef __CUDA_ARCH__
    const float k = rintf(x * 0.159154943f);
    return __cosf(fmaf(-k, -1.74845553e-07f, fmaf(-k, 6.28318548f, x)));
#else
    return cosf(x);
#endif
}

// ALiBi slope of head h of `heads` (Press et al.), with the interpolation for
// head counts that are not powers of two; mirrors `ir::alibi_slope`. Kernels
// evaluate it once per CTA (it is hoisted), so the loop costs nothing.
MIXC_HD float alibi_slope(int h, int heads) {
    int closest = 1;
    while (closest * 2 <= heads) closest *= 2;
    if (h < closest) return exp2f(-8.0f * (float)(h + 1) / (float)closest);
    const int extra = h - closest;
    return exp2f(-8.0f * (float)(2 * extra + 1) / (float)(2 * closest));
}

}  // namespace mixc
