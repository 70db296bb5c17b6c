{% import "macros.cu" as m %}
{{ header -}}
// FlashAttention-2 style forward pass on tensor cores: one CTA per
// (query block, head, batch); each warp owns MF x 16 query rows. K/V tiles stream
// through a {{ config.stages }}-stage cp.async pipeline; S = Q K^T and O += P V
// run on mma.sync m16n8k16; the softmax is online, in registers, in base 2.
// Key tiles the mask rules out are never loaded; Full tiles skip all mask
// arithmetic; only Partial tiles (and the ragged last tile) test each pair.
//
// Partial results: the kernel computes query rows [q_begin, q_end) of the Q
// buffer against keys [kv_begin, kv_end) of the K/V buffer; row r of a buffer
// is at global position q_pos0 + r (queries) or k_pos0 + r (keys), so a ring
// step, or one chunk of a zigzag shard, is one launch. It writes O normalised
// over the visited keys and the row log-sum-exp, so partials over disjoint
// key ranges merge exactly:
// lse = logaddexp(lse1, lse2), o = o1 exp(lse1 - lse) + o2 exp(lse2 - lse).
// A row that sees no key gets o = 0 and lse = -inf.
{% include "tile.cuh" %}

namespace {

typedef {{ elem_type }} T;

constexpr int HEADS = {{ heads }};
constexpr int KV_HEADS = {{ kv_heads }};
constexpr int GROUP = {{ group }};  // query heads per kv head (GQA)
constexpr int D = {{ head_dim }};
constexpr int DV = {{ value_dim }};
constexpr int DP = {{ dp }};   // D padded to the mma k-step (16)
constexpr int DVP = {{ dvp }};  // DV padded to 16
constexpr int BLOCK_M = {{ config.block_m }};
constexpr int BLOCK_N = {{ config.block_n }};
constexpr int WARPS = {{ config.warps }};
constexpr int STAGES = {{ config.stages }};
constexpr int NTHREADS = WARPS * 32;
// 16-row mma fragments per warp: K/V fragments loaded once serve all of them.
constexpr int MF = BLOCK_M / (16 * WARPS);
// Shared rows are padded by 16 bytes so the 8 row addresses of one ldmatrix
// fall in 8 different bank groups.
constexpr int SQ = DP + 8;
constexpr int SK = DP + 8;
constexpr int SV = DVP + 8;
constexpr float SCALE = {{ scale }};
constexpr float SCALE_LOG2 = SCALE * mixc::LOG2E;

static_assert(BLOCK_M == 16 * WARPS * MF && MF >= 1, "each warp owns MF x 16 query rows");
static_assert(BLOCK_N % 16 == 0 && DP % 16 == 0 && DVP % 16 == 0, "mma tiles are 16 wide");

}  // namespace

{{ m::kernel_entry(name=kernel_name, params=params, bounds="NTHREADS, 1") }}
    T* sQ = reinterpret_cast<T*>(smem_raw);
    T* sK = sQ + BLOCK_M * SQ;
    T* sV = sK + STAGES * BLOCK_N * SK;
    // Which tile each pipeline stage holds (-1: none) and its class.
    __shared__ int stage_tile[STAGES];
    __shared__ int stage_class[STAGES];

    const int head = blockIdx.y;
    const int batch_idx = blockIdx.z;
    const int kv_head = head / GROUP;
    const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
    const int g = lane / 4, tq = lane % 4;  // mma fragment row group / column pair
{{- m::softmax_query_block(t="T", hoisted=hoisted, segment=segment, notes=true) }}
{%- if segment %}
    // Ids of the rows this thread holds: fragment f, rows g and g + 8.
    int row_seg[MF][2];
#pragma unroll
    for (int f = 0; f < MF; ++f) {
#pragma unroll
        for (int r = 0; r < 2; ++r) {
            const int row = warp * 16 * MF + f * 16 + g + r * 8;
            row_seg[f][r] = row < m_valid ? __ldg(seg_b + i0 + row) : mixc::INT_LO;
        }
    }
{%- endif %}

{{- m::softmax_key_tiles(mask=mask, segment=segment, notes=true) }}

    // Q stays in shared memory for the whole CTA (fragments are re-read per
    // tile with ldmatrix, which keeps registers for the O accumulator).
    mixc::load_tile_async<T, BLOCK_M, D, DP, SQ, NTHREADS>(sQ, q_tile, (size_t)HEADS * D, m_valid, q);

    int load_class = mixc::SKIP;
    int load_t = next_tile(t_begin, load_class);
    int load_stage = 0;
    // Issues the next non-skipped K/V tile into `load_stage`; always commits a
    // group (possibly empty) so the wait count below stays uniform.
    auto issue = [&]() {
        if (load_t < t_end) {
            const int r0 = kv_begin + load_t * BLOCK_N;
            const int n_valid = min(BLOCK_N, kv_end - r0);
            mixc::load_tile_async<T, BLOCK_N, D, DP, SK, NTHREADS>(
                sK + load_stage * BLOCK_N * SK, k_head + (size_t)r0 * (KV_HEADS * D),
                (size_t)KV_HEADS * D, n_valid, k);
            mixc::load_tile_async<T, BLOCK_N, DV, DVP, SV, NTHREADS>(
                sV + load_stage * BLOCK_N * SV, v_head + (size_t)r0 * (KV_HEADS * DV),
                (size_t)KV_HEADS * DV, n_valid, v);
            if (tid == 0) {
                stage_tile[load_stage] = load_t;
                stage_class[load_stage] = load_class;
            }
            load_t = next_tile(load_t + 1, load_class);
        } else if (tid == 0) {
            stage_tile[load_stage] = -1;
        }
        mixc::cp_async_commit();
        load_stage = load_stage + 1 == STAGES ? 0 : load_stage + 1;
    };

    // Running row max (base-2 units), row sum and output accumulator for
    // rows g and g + 8 of each of this warp's MF fragments.
    float row_m[MF][2], row_l[MF][2];
    float acc_o[MF][DVP / 8][4];
#pragma unroll
    for (int f = 0; f < MF; ++f) {
        row_m[f][0] = row_m[f][1] = -mixc::inf();
        row_l[f][0] = row_l[f][1] = 0.0f;
#pragma unroll
        for (int n = 0; n < DVP / 8; ++n) acc_o[f][n][0] = acc_o[f][n][1] = acc_o[f][n][2] = acc_o[f][n][3] = 0.0f;
    }

    const int warp_row = warp * 16 * MF;
    // Each lane's ldmatrix row addresses, as 32-bit shared addresses computed
    // once; the loops below add compile-time offsets (fragment, k step, stage).
    // Q: rows +0..15, dims +0/+8. K: keys +0..7/+8..15 x dims +0/+8 (b0, b1 of
    // two n-slices). V (transposed): keys +0..7/+8..15 x value cols +0/+8.
    constexpr int ES = (int)sizeof(T);
    const int mi = lane >> 3;
    const unsigned q_lane = mixc::smem_addr(sQ + (warp_row + (lane & 15)) * SQ + (lane >> 4) * 8);
    const unsigned k_lane = mixc::smem_addr(sK + ((lane & 7) + (mi >> 1) * 8) * SK + (mi & 1) * 8);
    const unsigned v_lane = mixc::smem_addr(sV + ((lane & 7) + (mi & 1) * 8) * SV + (mi >> 1) * 8);
    for (int s = 0; s < STAGES - 1; ++s) issue();
    for (int stage = 0;; stage = stage + 1 == STAGES ? 0 : stage + 1) {
        issue();
        mixc::cp_async_wait<STAGES - 1>();
        __syncthreads();
        const int t = stage_tile[stage];
        if (t < 0) break;
        const bool masked = stage_class[stage] != mixc::FULL;
        const unsigned k_stage = k_lane + stage * (BLOCK_N * SK * ES);
        const unsigned v_stage = v_lane + stage * (BLOCK_N * SV * ES);
        const int r0 = kv_begin + t * BLOCK_N;

        // S = Q K^T for this warp's MF x 16 rows x BLOCK_N keys.
        float acc_s[MF][BLOCK_N / 8][4];
#pragma unroll
        for (int f = 0; f < MF; ++f) {
#pragma unroll
            for (int n = 0; n < BLOCK_N / 8; ++n) acc_s[f][n][0] = acc_s[f][n][1] = acc_s[f][n][2] = acc_s[f][n][3] = 0.0f;
        }
#pragma unroll
        for (int kk = 0; kk < DP / 16; ++kk) {
            unsigned a[MF][4];
#pragma unroll
            for (int f = 0; f < MF; ++f)
                mixc::ldmatrix_x4(a[f], q_lane + (f * 16 * SQ + kk * 16) * ES);
#pragma unroll
            for (int nb = 0; nb < BLOCK_N / 16; ++nb) {
                // Matrices: keys +0..7 / +8..15 x dims +0..7 / +8..15 -> b0, b1 of two n-slices.
                unsigned b[4];
                mixc::ldmatrix_x4(b, k_stage + (nb * 16 * SK + kk * 16) * ES);
#pragma unroll
                for (int f = 0; f < MF; ++f) {
                    mixc::mma_16816<T>(acc_s[f][2 * nb], a[f], b[0], b[1]);
                    mixc::mma_16816<T>(acc_s[f][2 * nb + 1], a[f], b[2], b[3]);
                }
            }
        }

        // Scores in base-2 units (scale{% if bias %}, bias{% endif %}{% if transform %}, transform{% endif %} fused), masked in Partial tiles.
        float tile_max[MF][2];
#pragma unroll
        for (int f = 0; f < MF; ++f) {
            tile_max[f][0] = tile_max[f][1] = -mixc::inf();
#pragma unroll
            for (int n = 0; n < BLOCK_N / 8; ++n) {
#pragma unroll
                for (int e = 0; e < 4; ++e) {
                    const int row = warp_row + f * 16 + g + (e >> 1) * 8;  // in the CTA
                    const int col = n * 8 + tq * 2 + (e & 1);               // in the tile
                    const int pos_i = i0 + row;
                    const int pos_j = k_pos0 + r0 + col;
{{- m::softmax_score(dot="acc_s[f][n][e]", x="x", in_bounds="r0 + col < kv_end", score_expr=score_expr, bias=bias,
                     transform=transform, mask=mask, segment=segment, seg_i="const int seg_i = row_seg[f][e >> 1];",
                     notes=true) | indent(prefix="        ") }}
                    acc_s[f][n][e] = x;
                    tile_max[f][e >> 1] = fmaxf(tile_max[f][e >> 1], x);
                }
            }
        }

        // Online softmax: rescale what was accumulated to the new row max.
#pragma unroll
        for (int f = 0; f < MF; ++f) {
            float row_ref[2];
#pragma unroll
            for (int r = 0; r < 2; ++r) {
                const float m_new = fmaxf(row_m[f][r], mixc::quad_max(tile_max[f][r]));
                // A row with nothing visible yet keeps a finite reference (no inf - inf).
                row_ref[r] = m_new == -mixc::inf() ? 0.0f : m_new;
                const float alpha = exp2f(row_m[f][r] - row_ref[r]);
                row_m[f][r] = m_new;
                row_l[f][r] *= alpha;
#pragma unroll
                for (int n = 0; n < DVP / 8; ++n) {
                    acc_o[f][n][2 * r] *= alpha;
                    acc_o[f][n][2 * r + 1] *= alpha;
                }
            }
#pragma unroll
            for (int n = 0; n < BLOCK_N / 8; ++n) {
#pragma unroll
                for (int e = 0; e < 4; ++e) {
                    const float p = exp2f(acc_s[f][n][e] - row_ref[e >> 1]);
                    acc_s[f][n][e] = p;
                    row_l[f][e >> 1] += p;
                }
            }
        }

        // O += P V: the S accumulators are re-packed as A fragments in place.
#pragma unroll
        for (int kb = 0; kb < BLOCK_N / 16; ++kb) {
            unsigned a[MF][4];
#pragma unroll
            for (int f = 0; f < MF; ++f) {
                a[f][0] = mixc::pack2<T>(acc_s[f][2 * kb][0], acc_s[f][2 * kb][1]);
                a[f][1] = mixc::pack2<T>(acc_s[f][2 * kb][2], acc_s[f][2 * kb][3]);
                a[f][2] = mixc::pack2<T>(acc_s[f][2 * kb + 1][0], acc_s[f][2 * kb + 1][1]);
                a[f][3] = mixc::pack2<T>(acc_s[f][2 * kb + 1][2], acc_s[f][2 * kb + 1][3]);
            }
#pragma unroll
            for (int nb = 0; nb < DVP / 16; ++nb) {
                // Transposed: keys +0..7 / +8..15 x value cols +0..7 / +8..15.
                unsigned b[4];
                mixc::ldmatrix_x4_trans(b, v_stage + (kb * 16 * SV + nb * 16) * ES);
#pragma unroll
                for (int f = 0; f < MF; ++f) {
                    mixc::mma_16816<T>(acc_o[f][2 * nb], a[f], b[0], b[1]);
                    mixc::mma_16816<T>(acc_o[f][2 * nb + 1], a[f], b[2], b[3]);
                }
            }
        }
        // The stage is refilled by the next iteration's issue().
        __syncthreads();
    }
    mixc::cp_async_wait<0>();

    // Epilogue: O / l in the storage type, lse = ln(sum exp(score)) in f32.
#pragma unroll
    for (int f = 0; f < MF; ++f) {
#pragma unroll
        for (int r = 0; r < 2; ++r) {
            const float l = mixc::quad_sum(row_l[f][r]);
            const int row = warp_row + f * 16 + g + r * 8;
            if (row >= m_valid) continue;
            const float inv_l = l > 0.0f ? 1.0f / l : 0.0f;
            T* o_row = o + (((size_t)batch_idx * q_rows + m0 + row) * HEADS + head) * DV;
#pragma unroll
            for (int n = 0; n < DVP / 8; ++n) {
                const int col = n * 8 + tq * 2;
                if (col < DV) {
                    *reinterpret_cast<unsigned*>(o_row + col) =
                        mixc::pack2<T>(acc_o[f][n][2 * r] * inv_l, acc_o[f][n][2 * r + 1] * inv_l);
                }
            }
            if (tq == 0) {
                lse[((size_t)batch_idx * HEADS + head) * q_rows + m0 + row] =
                    l > 0.0f ? (row_m[f][r] + log2f(l)) * mixc::LN2 : -mixc::inf();
            }
        }
    }
}
