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

#if !defined(__CUDACC_RTC__)
#include <cmath>
using std::exp;
using std::floor;
using std::log;
using std::sqrt;
using std::tanh;
using std::trunc;
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

// ---- bounds of a condition over a tile (expression masks) -------------------
// The device mirror of mixc_dsl::bounds: interval arithmetic in double
// (exact for positions), booleans as sub-intervals of [0, 1]. Sound: the
// value at every pair of the tile lies inside; `class_of_iv` then says Skip
// (never true), Full (always true) or Partial.
struct Iv {
    double lo, hi;
};
constexpr double IV_INF = 1.0e308;  // "unbounded" (sums may reach inf; NaN widens to any)
MIXC_HD Iv iv_any() { return Iv{-IV_INF, IV_INF}; }
MIXC_HD Iv iv(double lo, double hi) { return (lo == lo && hi == hi && lo <= hi) ? Iv{lo, hi} : iv_any(); }
MIXC_HD Iv iv_pt(double x) { return iv(x, x); }
MIXC_HD double dmin2(double a, double b) { return a < b ? a : b; }
MIXC_HD double dmax2(double a, double b) { return a > b ? a : b; }
MIXC_HD Iv iv_of4(double a, double b, double c, double d) {
    if (a != a || b != b || c != c || d != d) return iv_any();
    return iv(dmin2(dmin2(a, b), dmin2(c, d)), dmax2(dmax2(a, b), dmax2(c, d)));
}
// Truth: 0 never, 2 always, 1 sometimes (as a class).
MIXC_HD int iv_truth(Iv a) { return (a.lo > 0.0 || a.hi < 0.0) ? FULL : ((a.lo == 0.0 && a.hi == 0.0) ? SKIP : PARTIAL); }
MIXC_HD Iv iv_bool(int t) { return t == FULL ? iv_pt(1.0) : (t == SKIP ? iv_pt(0.0) : iv(0.0, 1.0)); }
MIXC_HD int class_of_iv(Iv a) { return iv_truth(a); }
MIXC_HD Iv iv_cmp(bool always, bool never) { return iv_bool(always ? FULL : (never ? SKIP : PARTIAL)); }
MIXC_HD bool iv_single(Iv a) { return a.lo == a.hi; }

MIXC_HD Iv iv_neg(Iv a) { return iv(-a.hi, -a.lo); }
MIXC_HD Iv iv_not(Iv a) { return iv_bool(FULL - iv_truth(a)); }
MIXC_HD Iv iv_add(Iv a, Iv b) { return iv(a.lo + b.lo, a.hi + b.hi); }
MIXC_HD Iv iv_sub(Iv a, Iv b) { return iv(a.lo - b.hi, a.hi - b.lo); }
MIXC_HD Iv iv_mul(Iv a, Iv b) { return iv_of4(a.lo * b.lo, a.lo * b.hi, a.hi * b.lo, a.hi * b.hi); }
MIXC_HD Iv iv_div(Iv a, Iv b) {
    if (b.lo <= 0.0 && b.hi >= 0.0) return iv_any();
    return iv_of4(a.lo / b.lo, a.lo / b.hi, a.hi / b.lo, a.hi / b.hi);
}
MIXC_HD Iv iv_lt(Iv a, Iv b) { return iv_cmp(a.hi < b.lo, a.lo >= b.hi); }
MIXC_HD Iv iv_le(Iv a, Iv b) { return iv_cmp(a.hi <= b.lo, a.lo > b.hi); }
MIXC_HD Iv iv_gt(Iv a, Iv b) { return iv_cmp(a.lo > b.hi, a.hi <= b.lo); }
MIXC_HD Iv iv_ge(Iv a, Iv b) { return iv_cmp(a.lo >= b.hi, a.hi < b.lo); }
MIXC_HD Iv iv_eq(Iv a, Iv b) {
    return iv_cmp(iv_single(a) && iv_single(b) && a.lo == b.lo, a.hi < b.lo || b.hi < a.lo);
}
MIXC_HD Iv iv_ne(Iv a, Iv b) {
    return iv_cmp(a.hi < b.lo || b.hi < a.lo, iv_single(a) && iv_single(b) && a.lo == b.lo);
}
MIXC_HD Iv iv_and(Iv a, Iv b) { return iv_bool(imin(iv_truth(a), iv_truth(b))); }
MIXC_HD Iv iv_or(Iv a, Iv b) { return iv_bool(imax(iv_truth(a), iv_truth(b))); }
// C remainder (sign of the dividend; x % 0 = 0), as the IR's `%`.
MIXC_HD Iv iv_rem(Iv a, Iv b) {
    if (iv_single(a) && iv_single(b) && a.lo > -9e15 && a.lo < 9e15 && b.lo > -9e15 && b.lo < 9e15) {
        const long long x = (long long)a.lo, y = (long long)b.lo;
        return iv_pt(y == 0 ? 0.0 : (double)(x % y));
    }
    if (!iv_single(b)) {
        const double m = dmax2(a.lo < 0.0 ? -a.lo : a.lo, a.hi < 0.0 ? -a.hi : a.hi);
        return iv(a.lo < 0.0 ? -m : 0.0, a.hi > 0.0 ? m : 0.0);
    }
    const double c = b.lo < 0.0 ? -b.lo : b.lo;
    if (c == 0.0) return iv_pt(0.0);
    if (a.lo >= 0.0 && floor(a.lo / c) == floor(a.hi / c)) {
        const double q = floor(a.lo / c) * c;
        return iv(a.lo - q, a.hi - q);
    }
    const double m = c - 1.0;
    return iv(a.lo < 0.0 ? dmax2(-m, a.lo) : 0.0, a.hi > 0.0 ? dmin2(m, a.hi) : 0.0);
}
MIXC_HD Iv iv_abs(Iv a) {
    if (a.lo >= 0.0) return a;
    if (a.hi <= 0.0) return iv(-a.hi, -a.lo);
    return iv(0.0, dmax2(-a.lo, a.hi));
}
MIXC_HD Iv iv_min(Iv a, Iv b) { return iv(dmin2(a.lo, b.lo), dmin2(a.hi, b.hi)); }
MIXC_HD Iv iv_max(Iv a, Iv b) { return iv(dmax2(a.lo, b.lo), dmax2(a.hi, b.hi)); }
MIXC_HD Iv iv_clamp(Iv x, Iv lo, Iv hi) { return iv_min(iv_max(x, lo), hi); }
MIXC_HD Iv iv_select(Iv c, Iv a, Iv b) {
    const int t = iv_truth(c);
    return t == FULL ? a : (t == SKIP ? b : iv(dmin2(a.lo, b.lo), dmax2(a.hi, b.hi)));
}
MIXC_HD Iv iv_floor(Iv a) { return iv(floor(a.lo), floor(a.hi)); }
MIXC_HD Iv iv_trunc(Iv a) { return iv(trunc(a.lo), trunc(a.hi)); }
MIXC_HD Iv iv_exp(Iv a) { return iv(exp(a.lo), exp(a.hi)); }
MIXC_HD Iv iv_log(Iv a) { return iv(log(a.lo), log(a.hi)); }
MIXC_HD Iv iv_sqrt(Iv a) { return iv(sqrt(a.lo), sqrt(a.hi)); }
MIXC_HD Iv iv_tanh(Iv a) { return iv(tanh(a.lo), tanh(a.hi)); }
MIXC_HD Iv iv_sigmoid(Iv a) { return iv(1.0 / (1.0 + exp(-a.lo)), 1.0 / (1.0 + exp(-a.hi))); }
MIXC_HD Iv iv_unit() { return iv(-1.0, 1.0); }
// Floor division `div(a, b)` (b = 0 gives 0).
MIXC_HD Iv iv_floordiv(Iv a, Iv b) {
    if (iv_single(b) && b.lo != 0.0) {
        const double x = floor(a.lo / b.lo), y = floor(a.hi / b.lo);
        return iv(dmin2(x, y), dmax2(x, y));
    }
    if (b.lo <= 0.0 && b.hi >= 0.0) return iv_any();
    const Iv q = iv_of4(a.lo / b.lo, a.lo / b.hi, a.hi / b.lo, a.hi / b.hi);
    return iv(floor(q.lo), floor(q.hi));
}

}  // namespace mixc
