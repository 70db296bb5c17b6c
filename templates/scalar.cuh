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

// The IR defines x % 0 as 0 (C leaves it undefined); otherwise C's remainder
// (sign of the dividend), as the IR's.
MIXC_HD int rem_or_zero(int a, int b) { return b == 0 ? 0 : a % b; }

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
