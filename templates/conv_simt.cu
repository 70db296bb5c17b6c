{% import "macros.cu" as m %}
{{ header -}}
// Long convolution y_i = sum_{j <= i} f[h, i - j] v_j, blockwise Toeplitz,
// f32 SIMT path (no tensor cores): the same tiling, key range, arguments and
// partial semantics as conv_mma.cu. Each thread owns one value column and
// ROWS_PER_THREAD query rows of the BLOCK_M x BDV output tile; the filter
// slice f[lag0 .. lag0 + BLOCK_M + BLOCK_N - 1) is zero outside [0, filter_len),
// which is the whole causal mask.
// Launch: grid (ceil(q_rows / {{ config.block_m }}), heads * {{ dv_blocks }}, batch), block {{ num_threads }}
// threads, {{ smem_bytes }} bytes of dynamic shared memory.
{% include "conv_prelude.cu" -%}
constexpr int NT = {{ config.warps }} * 32;
constexpr int ROW_GROUPS = NT / BDV;                  // threads sharing a column
constexpr int ROWS_PER_THREAD = BLOCK_M / ROW_GROUPS;
constexpr int FS = BLOCK_M + BLOCK_N;
constexpr int SMEM_BYTES = (BLOCK_N * BDV + FS) * (int)sizeof(float);
static_assert(SMEM_BYTES == {{ smem_bytes }}, "shared-memory layout disagrees with the Rust planner");
static_assert(NT % BDV == 0 && BLOCK_M % ROW_GROUPS == 0, "thread layout");

}  // namespace

{{ m::kernel_entry(name=kernel_name, params=params, bounds="NT") }}
    float* vs = reinterpret_cast<float*>(smem_raw);  // [BLOCK_N][BDV]
    float* fs = vs + BLOCK_N * BDV;                  // [FS]

    const int tid = threadIdx.x;
{{- m::conv_block(filter=filter_param) }}
    const int tc = tid % BDV, tr = tid / BDV;  // column, first row of this thread

    // The causal key range of this query block (as in conv_mma.cu / plan::key_hull).
    const int q_first = q_pos0 + i0, q_last = q_pos0 + i_end - 1;
    const int j_begin = max(kv_begin, q_first - k_pos0 - filter_len + 1);
    const int j_end = min(kv_end, q_last - k_pos0 + 1);

    float acc[ROWS_PER_THREAD];
#pragma unroll
    for (int k = 0; k < ROWS_PER_THREAD; ++k) acc[k] = 0.f;

    for (int j0 = j_begin; j0 < j_end; j0 += BLOCK_N) {
        for (int i = tid; i < BLOCK_N * BDV; i += NT) {
            const int r = i / BDV, col = n0 + i % BDV, j = j0 + r;
            vs[i] = (j < j_end && col < DV) ? to_float(v[(((size_t)b * kv_rows + j) * KV_HEADS + kvh) * DV + col]) : 0.f;
        }
        const int lag0 = q_first - (k_pos0 + j0) - (BLOCK_N - 1);
        for (int x = tid; x < FS; x += NT) {
            const int lag = lag0 + x;
            fs[x] = (lag >= 0 && lag < filter_len) ? filt[(size_t)h * filter_len + lag] : 0.f;
        }
        __syncthreads();
        for (int c = 0; c < BLOCK_N; ++c) {
            const float vv = vs[c * BDV + tc];
#pragma unroll
            for (int k = 0; k < ROWS_PER_THREAD; ++k) acc[k] += fs[tr + k * ROW_GROUPS - c + BLOCK_N - 1] * vv;
        }
        __syncthreads();
    }

    const int col = n0 + tc;
    if (col >= DV) return;
#pragma unroll
    for (int k = 0; k < ROWS_PER_THREAD; ++k) {
        const int i = i0 + tr + k * ROW_GROUPS;
        if (i >= q_rows) continue;
        const size_t off = (((size_t)b * q_rows + i) * HEADS + h) * DV + col;
        float y = acc[k];
        if (o_acc != nullptr) {
            if (accumulate) y += o_acc[off];
            o_acc[off] = y;
        }
        if (o != nullptr) o[off] = from_float<T>(y);
    }
}
