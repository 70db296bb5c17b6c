{% import "macros.cu" as m %}
{{ header -}}
// Long convolution y_i = sum_{j <= i} f[h, i - j] v_j as a blockwise Toeplitz
// product on tensor cores. One CTA per (query block, head x value-dim block,
// batch); warps split the BLOCK_M x BDV output tile {{ warps_m }} (rows) x {{ warps_n }} (columns). For each key block the CTA
// loads V (cp.async, {{ config.stages }} stage(s)) and the filter slice the
// block needs, f[lag0 .. lag0 + BLOCK_M + BLOCK_N - 1) with
// lag0 = (first query) - (last key); the Toeplitz tile T[r][c] = fs[r - c + BLOCK_N - 1]
// is built in registers straight from that slice, so negative lags (the
// causal mask) and lags past the filter are zeros of the slice: no mask
// arithmetic. Key blocks entirely above the diagonal are never visited, and
// 16 x 16 sub-tiles entirely above it are skipped.
//
// Partial results: the kernel visits key rows [kv_begin, kv_end) of the V
// buffer (global position of key row 0 is k_pos0, of query row 0 is q_pos0);
// partials over disjoint key ranges add, so ring steps accumulate into o_acc
// (accumulate = 1) and the last step may also write o.
// Launch: grid (ceil(q_rows / {{ config.block_m }}), heads * {{ dv_blocks }}, batch), block {{ num_threads }}
// threads, {{ smem_bytes }} bytes of dynamic shared memory.
{% include "conv_prelude.cu" -%}
constexpr int NUM_WARPS = {{ config.warps }};
constexpr int NT = NUM_WARPS * 32;
constexpr int STAGES = {{ config.stages }};
constexpr int WARPS_M = {{ warps_m }};
constexpr int WARPS_N = NUM_WARPS / WARPS_M;
constexpr int WM = BLOCK_M / WARPS_M;    // query rows per warp
constexpr int WN = BDV / WARPS_N;        // value columns per warp
constexpr int MT = WM / 16;               // m-tiles per warp
constexpr int NT_V = WN / 8;
constexpr int VS = BDV + 8;               // 16-byte row padding against bank conflicts
constexpr int FS = BLOCK_M + BLOCK_N;     // filter slice (BLOCK_M + BLOCK_N - 1 used)
constexpr int SMEM_BYTES = STAGES * BLOCK_N * VS * (int)sizeof(T) + STAGES * FS * (int)sizeof(float);
static_assert(SMEM_BYTES == {{ smem_bytes }}, "shared-memory layout disagrees with the Rust planner");
static_assert(WARPS_M * WARPS_N == NUM_WARPS && WM % 16 == 0 && WN % 16 == 0 && BLOCK_N % 16 == 0,
              "mma tiles are 16 wide");
static_assert(DV % 8 == 0, "rows are copied in 16-byte vectors");

// V rows [j0, j0 + BLOCK_N) (columns [n0, n0 + BDV)) and the filter slice for
// that key block. Rows at or past j_end and lags outside [0, filter_len) are zeros.
__device__ __forceinline__ void load_block(T* vs, float* fs, const T* __restrict__ v,
                                           const float* __restrict__ filt, int b, int kvh, int h,
                                           int n0, int j0, int j_end, int kv_rows, int lag0,
                                           int filter_len, int tid) {
    mixc::load_tile_async<T, BLOCK_N, BDV, BDV, VS, NT>(
        vs, v + (((size_t)b * kv_rows + j0) * KV_HEADS + kvh) * DV + n0, (size_t)KV_HEADS * DV, j_end - j0, v,
        DV - n0);
    for (int x = tid; x < FS; x += NT) {
        const int lag = lag0 + x;
        const bool ok = lag >= 0 && lag < filter_len && x < FS - 1;
        cp_async_4(fs + x, ok ? filt + (size_t)h * filter_len + lag : filt, ok);
    }
}

}  // namespace

{{ m::kernel_entry(name=kernel_name, params=params, bounds="NT") }}
    T* v_s = reinterpret_cast<T*>(smem_raw);                       // [STAGES][BLOCK_N][VS]
    float* f_s = reinterpret_cast<float*>(v_s + STAGES * BLOCK_N * VS);  // [STAGES][FS]

    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const int g = lane >> 2, t4 = lane & 3;
    const int warp_m = warp % WARPS_M, wc = (warp / WARPS_M) * WN;  // first row tile / column of this warp
{{- m::conv_block(filter=filter_param) }}

    // Keys with 0 <= (q_pos0 + i) - (k_pos0 + j) < filter_len for some query
    // row i of this block (the causal key range, as in plan::key_hull).
    const int q_first = q_pos0 + i0, q_last = q_pos0 + i_end - 1;
    const int j_begin = max(kv_begin, q_first - k_pos0 - filter_len + 1);
    const int j_end = min(kv_end, q_last - k_pos0 + 1);
    const int num_blocks = j_end > j_begin ? (j_end - j_begin + BLOCK_N - 1) / BLOCK_N : 0;

    float acc[MT][NT_V][4];
#pragma unroll
    for (int mi = 0; mi < MT; ++mi)
#pragma unroll
        for (int n = 0; n < NT_V; ++n)
#pragma unroll
            for (int e = 0; e < 4; ++e) acc[mi][n][e] = 0.f;

    // lag of (query row 0 of the block, last key of key block kb) = lag0 of its slice.
    auto lag0_of = [&](int j0) { return q_first - (k_pos0 + j0) - (BLOCK_N - 1); };
    if (STAGES == 2 && num_blocks > 0)
        load_block(v_s, f_s, v, filt, b, kvh, h, n0, j_begin, j_end, kv_rows, lag0_of(j_begin), filter_len, tid);
    cp_async_commit();

    for (int kb = 0; kb < num_blocks; ++kb) {
        const int j0 = j_begin + kb * BLOCK_N;
        const int stage = STAGES == 2 ? (kb & 1) : 0;
        T* vs = v_s + stage * BLOCK_N * VS;
        float* fs = f_s + stage * FS;
        if (STAGES == 1) {
            load_block(vs, fs, v, filt, b, kvh, h, n0, j0, j_end, kv_rows, lag0_of(j0), filter_len, tid);
        } else if (kb + 1 < num_blocks) {
            const int nx = stage ^ 1;
            load_block(v_s + nx * BLOCK_N * VS, f_s + nx * FS, v, filt, b, kvh, h, n0, j0 + BLOCK_N, j_end,
                       kv_rows, lag0_of(j0 + BLOCK_N), filter_len, tid);
        }
        cp_async_commit();
        if (STAGES == 2) cp_async_wait<1>(); else cp_async_wait<0>();
        __syncthreads();

        const int lag_base = lag0_of(j0) + (BLOCK_N - 1);  // lag of (row 0, key j0)
#pragma unroll
        for (int mi = 0; mi < MT; ++mi) {
            const int r0 = warp_m * WM + mi * 16;
#pragma unroll
            for (int kk = 0; kk < BLOCK_N / 16; ++kk) {
                // Lags of this 16 x 16 sub-tile span [lo, hi]; skip it when all
                // are negative (above the diagonal) or past the filter.
                const int hi = lag_base + r0 + 15 - kk * 16, lo = hi - 30;
                if (hi < 0 || lo >= filter_len) continue;
                const int x = r0 + g - (kk * 16 + 2 * t4) + BLOCK_N - 1;
                unsigned a[4];
                a[0] = pack2<T>(fs[x], fs[x - 1]);
                a[1] = pack2<T>(fs[x + 8], fs[x + 7]);
                a[2] = pack2<T>(fs[x - 8], fs[x - 9]);
                a[3] = a[0];  // Toeplitz: rows +8 and columns +8 cancel
#pragma unroll
                for (int nn = 0; nn < WN / 16; ++nn) {
                    unsigned bb[4];
                    ldmatrix_x4_trans(bb, vs + (kk * 16 + a_row(lane)) * VS + wc + nn * 16 + a_col(lane));
                    mma_16816<T>(acc[mi][2 * nn], a, bb[0], bb[1]);
                    mma_16816<T>(acc[mi][2 * nn + 1], a, bb[2], bb[3]);
                }
            }
        }
        __syncthreads();  // this stage is refilled next iteration
    }
    cp_async_wait<0>();

#pragma unroll
    for (int mi = 0; mi < MT; ++mi)
#pragma unroll
        for (int half = 0; half < 2; ++half) {
            const int i = i0 + warp_m * WM + mi * 16 + g + 8 * half;
            if (i >= q_rows) continue;
            const size_t row_off = (((size_t)b * q_rows + i) * HEADS + h) * DV;
#pragma unroll
            for (int n = 0; n < NT_V; ++n) {
                const int col = n0 + wc + n * 8 + 2 * t4;
                if (col >= DV) continue;
                float x0 = acc[mi][n][2 * half], x1 = acc[mi][n][2 * half + 1];
                if (o_acc != nullptr) {
                    float2* p = reinterpret_cast<float2*>(o_acc + row_off + col);
                    if (accumulate) {
                        const float2 prev = *p;
                        x0 += prev.x;
                        x1 += prev.y;
                    }
                    *p = make_float2(x0, x1);
                }
                if (o != nullptr) *reinterpret_cast<unsigned*>(o + row_off + col) = pack2<T>(x0, x1);
            }
        }
}
