{{ header -}}
// f32 softmax forward on CUDA cores (no tensor cores), so every spec has a
// path. Same contract as softmax.cu: one CTA per (query block, head, batch),
// tiles the mask rules out are never loaded, Full tiles skip mask arithmetic,
// output O normalised over keys [kv_begin, kv_end) plus the row log-sum-exp.
// Each query row is shared by TPR consecutive lanes: they split the key
// columns of a score tile and the value columns of the output.
{% include "tile.cuh" %}

namespace {

constexpr int HEADS = {{ heads }};
constexpr int KV_HEADS = {{ kv_heads }};
constexpr int GROUP = {{ group }};  // query heads per kv head (GQA)
constexpr int D = {{ head_dim }};
constexpr int DV = {{ value_dim }};
constexpr int BLOCK_M = {{ config.block_m }};
constexpr int BLOCK_N = {{ config.block_n }};
constexpr int NTHREADS = {{ config.warps }} * 32;
constexpr int TPR = {{ threads_per_row }};  // lanes per query row
constexpr int COLS_PER_LANE = BLOCK_N / TPR;
constexpr int DV_PER_LANE = (DV + TPR - 1) / TPR;
// Odd row strides: lanes reading different rows of one column hit different banks.
constexpr int SQ = D + 1;
constexpr int SV = DV + 1;
constexpr int SP = BLOCK_N + 1;
constexpr float SCALE = {{ scale }};
constexpr float SCALE_LOG2 = SCALE * mixc::LOG2E;

static_assert(NTHREADS == BLOCK_M * TPR, "TPR lanes per query row");
static_assert(BLOCK_N % TPR == 0 && 32 % TPR == 0, "a row's lanes split the key tile evenly");

}  // namespace

extern "C" __global__ void __launch_bounds__(NTHREADS, 1) {{ kernel_name }}(
{%- for p in params %}
    {{ p.c_type }} {{ p.name }}{% if not loop.last %},{% endif %}  // {{ p.doc }}
{%- endfor %}
) {
    extern __shared__ __align__(16) float smem_f32[];
    float* sQ = smem_f32;
    float* sK = sQ + BLOCK_M * SQ;
    float* sV = sK + BLOCK_N * SQ;
    float* sP = sV + BLOCK_N * SV;

    const int head = blockIdx.y;
    const int batch_idx = blockIdx.z;
    const int kv_head = head / GROUP;
    const int tid = threadIdx.x;
    const int row = tid / TPR, part = tid % TPR;
    const int m0 = q_begin + blockIdx.x * BLOCK_M;  // first query row of this CTA in the buffer
    const int m_valid = min(BLOCK_M, q_end - m0);
    if (m_valid <= 0) return;

    const float* q_tile = q + ((size_t)batch_idx * q_rows + m0) * (HEADS * D) + (size_t)head * D;
    const float* k_head = k + (size_t)batch_idx * kv_rows * (KV_HEADS * D) + (size_t)kv_head * D;
    const float* v_head = v + (size_t)batch_idx * kv_rows * (KV_HEADS * DV) + (size_t)kv_head * DV;

    const int i0 = q_pos0 + m0, i1 = q_pos0 + m0 + m_valid - 1;
{%- for hv in hoisted %}
    const {{ hv.c_type }} {{ hv.name }} = {{ hv.code }};  // per-head constant
{%- endfor %}
{%- if segment %}

    const int* seg_b = {{ segment }} + (size_t)batch_idx * seq_len;
    __shared__ int q_seg_lo_s, q_seg_hi_s;
    if (tid == 0) {
        q_seg_lo_s = mixc::INT_HI;
        q_seg_hi_s = mixc::INT_LO;
    }
    __syncthreads();
    for (int r = tid; r < m_valid; r += NTHREADS) {
        const int s_id = __ldg(seg_b + i0 + r);
        atomicMin(&q_seg_lo_s, s_id);
        atomicMax(&q_seg_hi_s, s_id);
    }
    __syncthreads();
    const int q_seg_lo = q_seg_lo_s, q_seg_hi = q_seg_hi_s;
    const int seg_i = row < m_valid ? __ldg(seg_b + i0 + row) : mixc::INT_LO;
{%- endif %}

    const mixc::KeyRange keys = {{ mask.key_range }};
    const long long lo = mixc::lmax((long long)kv_begin, keys.lo - k_pos0);
    const long long hi = mixc::lmin((long long)kv_end, keys.hi - k_pos0);
    const int t_begin = (int)((lo - kv_begin) / BLOCK_N);
    const int t_end = hi > lo ? (int)((hi - kv_begin + BLOCK_N - 1) / BLOCK_N) : t_begin;

    auto tile_class = [&](int t) -> int {
        const int r0 = kv_begin + t * BLOCK_N;
        const int n_valid = min(BLOCK_N, kv_end - r0);
        const int j0 = k_pos0 + r0, j1 = j0 + n_valid - 1;
{%- if segment %}
        int any = 0, all = 1;
        for (int c = tid; c < n_valid; c += NTHREADS) {
            const int s_id = __ldg(seg_b + j0 + c);
            any |= (s_id >= q_seg_lo && s_id <= q_seg_hi);
            all &= (s_id == q_seg_lo && q_seg_lo == q_seg_hi);
        }
        any = __syncthreads_or(any);
        all = __syncthreads_and(all);
        const int seg_class = !any ? mixc::SKIP : (all ? mixc::FULL : mixc::PARTIAL);
{%- endif %}
        int cls = {{ mask.class }};
        if (cls == mixc::FULL && n_valid < BLOCK_N) cls = mixc::PARTIAL;
        return cls;
    };
    auto next_tile = [&](int t, int& cls) -> int {
        for (; t < t_end; ++t) {
            cls = tile_class(t);
            if (cls != mixc::SKIP) return t;
        }
        return t_end;
    };

    for (int idx = tid; idx < BLOCK_M * D; idx += NTHREADS) {
        const int r = idx / D, c = idx % D;
        sQ[r * SQ + c] = r < m_valid ? __ldg(q_tile + (size_t)r * (HEADS * D) + c) : 0.0f;
    }

    float row_m = -mixc::inf(), row_l = 0.0f;
    float acc_o[DV_PER_LANE];
#pragma unroll
    for (int u = 0; u < DV_PER_LANE; ++u) acc_o[u] = 0.0f;

    int cls = mixc::SKIP;
    for (int t = next_tile(t_begin, cls); t < t_end; t = next_tile(t + 1, cls)) {
        const int r0 = kv_begin + t * BLOCK_N;
        const int n_valid = min(BLOCK_N, kv_end - r0);
        __syncthreads();  // the previous tile is no longer read
        for (int idx = tid; idx < BLOCK_N * D; idx += NTHREADS) {
            const int r = idx / D, c = idx % D;
            sK[r * SQ + c] = r < n_valid ? __ldg(k_head + (size_t)(r0 + r) * (KV_HEADS * D) + c) : 0.0f;
        }
        for (int idx = tid; idx < BLOCK_N * DV; idx += NTHREADS) {
            const int r = idx / DV, c = idx % DV;
            sV[r * SV + c] = r < n_valid ? __ldg(v_head + (size_t)(r0 + r) * (KV_HEADS * DV) + c) : 0.0f;
        }
        __syncthreads();

        const bool masked = cls != mixc::FULL;
        float x[COLS_PER_LANE];
        float tile_max = -mixc::inf();
#pragma unroll
        for (int u = 0; u < COLS_PER_LANE; ++u) {
            const int col = part + u * TPR;
            float dot = 0.0f;
#pragma unroll 8
            for (int d = 0; d < D; ++d) dot = fmaf(sQ[row * SQ + d], sK[col * SQ + d], dot);
            const int pos_i = i0 + row;
            const int pos_j = k_pos0 + r0 + col;
{%- if score_expr %}
            float s = dot * SCALE;
{%- if bias %}
            s += {{ bias }};
{%- endif %}
{%- if transform %}
            s = {{ transform }};
{%- endif %}
            float xv = s * mixc::LOG2E;
{%- else %}
            float xv = dot * SCALE_LOG2;
{%- endif %}
            if (masked) {
{%- if segment %}
                const int seg_j = col < n_valid ? __ldg(seg_b + pos_j) : mixc::INT_LO;
{%- endif %}
                const bool visible = col < n_valid && {{ mask.predicate }};
                if (!visible) xv = -mixc::inf();
            }
            x[u] = xv;
            tile_max = fmaxf(tile_max, xv);
        }
#pragma unroll
        for (int off = TPR / 2; off > 0; off /= 2)
            tile_max = fmaxf(tile_max, __shfl_xor_sync(0xffffffffu, tile_max, off));

        const float m_new = fmaxf(row_m, tile_max);
        const float ref = m_new == -mixc::inf() ? 0.0f : m_new;  // no inf - inf
        const float alpha = exp2f(row_m - ref);
        row_m = m_new;
        row_l *= alpha;
#pragma unroll
        for (int u = 0; u < DV_PER_LANE; ++u) acc_o[u] *= alpha;
#pragma unroll
        for (int u = 0; u < COLS_PER_LANE; ++u) {
            const float p = exp2f(x[u] - ref);
            row_l += p;
            sP[row * SP + part + u * TPR] = p;
        }
        __syncwarp();  // a row's lanes are in one warp

        for (int c = 0; c < BLOCK_N; ++c) {
            const float p = sP[row * SP + c];
#pragma unroll
            for (int u = 0; u < DV_PER_LANE; ++u) {
                const int col = part + u * TPR;
                if (col < DV) acc_o[u] = fmaf(p, sV[c * SV + col], acc_o[u]);
            }
        }
    }

#pragma unroll
    for (int off = TPR / 2; off > 0; off /= 2) row_l += __shfl_xor_sync(0xffffffffu, row_l, off);
    if (row < m_valid) {
        const float inv_l = row_l > 0.0f ? 1.0f / row_l : 0.0f;
        float* o_row = o + (((size_t)batch_idx * q_rows + m0 + row) * HEADS + head) * DV;
#pragma unroll
        for (int u = 0; u < DV_PER_LANE; ++u) {
            const int col = part + u * TPR;
            if (col < DV) o_row[col] = acc_o[u] * inv_l;
        }
        if (part == 0) {
            lse[((size_t)batch_idx * HEADS + head) * q_rows + m0 + row] =
                row_l > 0.0f ? (row_m + log2f(row_l)) * mixc::LN2 : -mixc::inf();
        }
    }
}
