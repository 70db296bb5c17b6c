{% import "macros.cu" as m %}
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

{{ m::kernel_entry(name=kernel_name, params=params, bounds="NTHREADS, 1", smem="float smem_f32") }}
    float* sQ = smem_f32;
    float* sK = sQ + BLOCK_M * SQ;
    float* sV = sK + BLOCK_N * SQ;
    float* sP = sV + BLOCK_N * SV;

    const int head = blockIdx.y;
    const int batch_idx = blockIdx.z;
    const int kv_head = head / GROUP;
    const int tid = threadIdx.x;
    const int row = tid / TPR, part = tid % TPR;
{{- m::softmax_query_block(t="float", hoisted=hoisted, segment=segment) }}
{%- if segment %}
    const int seg_i = row < m_valid ? __ldg(seg_b + i0 + row) : mixc::INT_LO;
{%- endif %}

{{- m::softmax_key_tiles(mask=mask, segment=segment) }}

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
{{- m::softmax_score(dot="dot", x="xv", in_bounds="col < n_valid", score_expr=score_expr, bias=bias,
                     transform=transform, mask=mask, segment=segment) }}
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
