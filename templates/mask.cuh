// ---- mask primitives: block classes and key ranges ---------------------------
// The device mirror of codegen/src/plan.rs (`classify`, `key_hull`), one
// closed form per mask primitive. Codegen composes them from the spec's mask
// tree (`&&` -> class_and / range_intersect, `||` -> class_or / range_hull).
// Plain C++ (no CUDA types) so a host test can check it against plan.rs.
// Ranges are inclusive global positions: queries [i0, i1], keys [j0, j1].
#ifndef MIXC_HD
#ifdef __CUDACC__
#define MIXC_HD __host__ __device__ __forceinline__
#else
#define MIXC_HD inline
#endif
#endif

namespace mixc {

// Ordered so that `a && b` is the smaller class and `a || b` the larger.
constexpr int SKIP = 0;
constexpr int PARTIAL = 1;
constexpr int FULL = 2;

MIXC_HD int imin(int a, int b) { return a < b ? a : b; }
MIXC_HD int imax(int a, int b) { return a > b ? a : b; }
MIXC_HD long long lmin(long long a, long long b) { return a < b ? a : b; }
MIXC_HD long long lmax(long long a, long long b) { return a > b ? a : b; }
// Euclidean remainder / quotient (the IR's `rem_euclid` / `div_euclid`).
MIXC_HD long long mod_floor(long long a, long long m) { long long r = a % m; return r < 0 ? r + m : r; }
MIXC_HD long long div_floor(long long a, long long m) { return (a - mod_floor(a, m)) / m; }

MIXC_HD int class_and(int a, int b) { return imin(a, b); }
MIXC_HD int class_or(int a, int b) { return imax(a, b); }

// d = i - j covers every integer of [i0 - j1, i1 - j0] over the tile.
MIXC_HD int class_causal(int i0, int i1, int j0, int j1) {
    const long long dmin = (long long)i0 - j1, dmax = (long long)i1 - j0;
    return dmin >= 0 ? FULL : (dmax < 0 ? SKIP : PARTIAL);
}

MIXC_HD int class_window(int i0, int i1, int j0, int j1, long long w) {
    const long long dmin = (long long)i0 - j1, dmax = (long long)i1 - j0;
    if (w == 0) return SKIP;
    if (dmin > -w && dmax < w) return FULL;
    if (dmin >= w || dmax <= -w) return SKIP;
    return PARTIAL;
}

MIXC_HD int class_prefix_lm(int i0, int i1, int j0, int j1, long long p) {
    const long long dmin = (long long)i0 - j1, dmax = (long long)i1 - j0;
    if (j1 < p || dmin >= 0) return FULL;
    if (j0 >= p && dmax < 0) return SKIP;
    return PARTIAL;
}

MIXC_HD int class_block_sparse(int i0, int i1, int j0, int j1, long long b, long long local,
                               long long global) {
    const long long a0 = i0 / b, a1 = i1 / b, c0 = j0 / b, c1 = j1 / b;
    // Pairs can fail only where both block indices are >= global.
    const long long fa0 = lmax(a0, global), fc0 = lmax(c0, global);
    if (fa0 > a1 || fc0 > c1 || lmax(a1 - fc0, c1 - fa0) < local) return FULL;
    if (a0 < global || c0 < global) return PARTIAL;
    const long long mindist = a1 < c0 ? c0 - a1 : (c1 < a0 ? a0 - c1 : 0);
    return mindist >= local ? SKIP : PARTIAL;
}

MIXC_HD int class_dilated(int i0, int i1, int j0, int j1, long long r) {
    const long long dmin = (long long)i0 - j1, dmax = (long long)i1 - j0;
    if (r == 1) return FULL;
    if (r < 1) return PARTIAL;
    if (dmin == dmax && mod_floor(dmin, r) == 0) return FULL;
    // No multiple of r in [dmin, dmax].
    if (div_floor(dmin, r) == div_floor(dmax, r) && mod_floor(dmin, r) != 0) return SKIP;
    return PARTIAL;
}

MIXC_HD bool block_sparse_allows(int i, int j, long long b, long long local, long long global) {
    const long long bi = i / b, bj = j / b;
    const long long d = bi > bj ? bi - bj : bj - bi;
    return d < local || bj < global || bi < global;
}

// Keys [lo, hi) that any query of [i0, i1] may see; empty when lo >= hi.
// Bounds are long long so unbounded sides cannot overflow.
struct KeyRange {
    long long lo, hi;
};
constexpr long long RANGE_INF = 1LL << 62;

MIXC_HD KeyRange range_all() { return KeyRange{-RANGE_INF, RANGE_INF}; }
MIXC_HD KeyRange range_causal(int i0, int i1) { return KeyRange{-RANGE_INF, (long long)i1 + 1}; }
MIXC_HD KeyRange range_window(int i0, int i1, long long w) {
    if (w == 0) return KeyRange{0, 0};
    return KeyRange{(long long)i0 - w + 1, (long long)i1 + w};
}
MIXC_HD KeyRange range_prefix_lm(int i0, int i1, long long p) {
    return KeyRange{-RANGE_INF, lmax((long long)i1 + 1, p)};
}
MIXC_HD KeyRange range_block_sparse(int i0, int i1, long long b, long long local, long long global) {
    const long long a0 = i0 / b, a1 = i1 / b;
    if (a0 < global) return range_all();
    if (local == 0) return global > 0 ? KeyRange{-RANGE_INF, global * b} : KeyRange{0, 0};
    const long long lo = global > 0 ? -RANGE_INF : (a0 - local + 1) * b;
    return KeyRange{lo, lmax(a1 + local, global) * b};
}
MIXC_HD KeyRange range_intersect(KeyRange x, KeyRange y) {
    return KeyRange{lmax(x.lo, y.lo), lmin(x.hi, y.hi)};
}
MIXC_HD KeyRange range_hull(KeyRange x, KeyRange y) {
    const bool ex = x.lo >= x.hi, ey = y.lo >= y.hi;
    if (ex && ey) return KeyRange{0, 0};
    if (ey) return x;
    if (ex) return y;
    return KeyRange{lmin(x.lo, y.lo), lmax(x.hi, y.hi)};
}

}  // namespace mixc
