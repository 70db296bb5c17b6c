{% import "macros.cu" as m %}
{{ header -}}
// FlashAttention-2 style backward pass on tensor cores, three kernels:
// - `{{ pre_name }}`: delta = rowsum(dO * O) per (batch, head, query row);
// - `{{ kernel_name }}`: one CTA per (key block, kv head, batch) owns the key
//   block's K and V tiles (shared memory) and its dK / dV accumulators
//   (registers) for every query head of the GQA group, and walks the query
//   tiles the mask leaves visible. Per tile it recomputes S^T = K Q^T and the
//   probabilities P^T from the saved row log-sum-exp, dP^T = V dO^T and
//   dS^T = P^T * (dP^T - delta); then dV += P^T dO, dK += dS^T Q and
//   dQ += dS K, the last with f32 atomics into a global accumulator (the key
//   blocks of a query row live in different CTAs). Skipped query tiles cost
//   nothing; Full tiles do no mask arithmetic;
// - `{{ finish_name }}`: an f32 accumulator to the storage type (times the
//   score scale for dQ and dK).
// Partial results, as in the forward: the launch computes query rows
// [q_begin, q_end) of the Q buffer against keys [kv_begin, kv_end) of the
// K/V buffer (row r at global position q_pos0 + r / k_pos0 + r), and ADDS to
// the f32 accumulators dq_acc, dk_acc, dv_acc{% if table_grads %} and the table gradients{% endif %}, so
// one ring step, or one chunk of a zigzag shard, is one launch and the steps
// sum. lse is the forward's final (merged) natural-log row log-sum-exp.
{% include "tile.cuh" %}

namespace {

typedef {{ elem_type }} T;

constexpr int HEADS = {{ heads }};
constexpr int KV_HEADS = {{ kv_heads }};
constexpr int GROUP = {{ group }};  // query heads per kv head (GQA)
constexpr int D = {{ head_dim }};
constexpr int DV = {{ value_dim }};
constexpr int DP = {{ dp }};    // D padded to the mma k-step (16)
constexpr int DVP = {{ dvp }};  // DV padded to 16
constexpr int BLOCK_M = {{ config.block_m }};  // query rows per step
constexpr int BLOCK_N = {{ config.block_n }};  // keys per CTA
constexpr int WARPS = {{ config.warps }};
constexpr int NTHREADS = WARPS * 32;
// Warp (wn, wc): key fragment wn (16 keys) and column part wc of WC. It
// computes S^T / dP^T for its keys x NQ queries and owns dK / dV for its
// keys x DKW / DVW columns.
constexpr int WN = BLOCK_N / 16;
constexpr int WC = WARPS / WN;
constexpr int NQ = BLOCK_M / WC;
constexpr int DKW = DP / WC;
constexpr int DVW = DVP / WC;
// dQ: units of 16 query rows x DQW columns, spread over the warps.
constexpr int MQ = BLOCK_M / 16;
constexpr int CQ = WARPS >= MQ ? WARPS / MQ : 1;
constexpr int DQW = DP / CQ;
// Shared rows padded by 16 bytes (ldmatrix bank groups).
constexpr int SK = DP + 8;
constexpr int SV = DVP + 8;
constexpr int SQ = DP + 8;
constexpr int SO = DVP + 8;
constexpr int SP = BLOCK_M + 8;
constexpr float SCALE = {{ scale }};
constexpr float SCALE_LOG2 = SCALE * mixc::LOG2E;

static_assert(WN * WC == WARPS, "warps = key fragments x column parts");
static_assert(NQ % 16 == 0 && DKW % 16 == 0 && DVW % 16 == 0 && DQW % 16 == 0, "mma tiles are 16 wide");
static_assert(WARPS % MQ == 0 || MQ % WARPS == 0, "dQ units spread evenly");

__device__ __forceinline__ void store_elem(__half* p, float x) { *p = __float2half_rn(x); }
__device__ __forceinline__ void store_elem(__nv_bfloat16* p, float x) { *p = __float2bfloat16_rn(x); }

}  // namespace

// delta[b, h, r] = sum_c dO[b, r, h, c] * O[b, r, h, c], for every row of the buffers.
extern "C" __global__ void __launch_bounds__(256) {{ pre_name }}(
    const T* __restrict__ o,    // [batch, q_rows, heads, value_dim], the forward's output
    const T* __restrict__ d_o,  // [batch, q_rows, heads, value_dim], the upstream gradient
    float* __restrict__ delta,  // [batch, heads, q_rows]
    int batch, int q_rows) {
    const long long n = (long long)batch * HEADS * q_rows;
    for (long long idx = (long long)blockIdx.x * blockDim.x + threadIdx.x; idx < n;
         idx += (long long)gridDim.x * blockDim.x) {
        const int r = (int)(idx % q_rows);
        const long long bh = idx / q_rows;
        const int h = (int)(bh % HEADS), b = (int)(bh / HEADS);
        const size_t oi = (((size_t)b * q_rows + r) * HEADS + h) * DV;
        float acc = 0.0f;
        for (int c = 0; c < DV; ++c) acc += mixc::to_float(o[oi + c]) * mixc::to_float(d_o[oi + c]);
        delta[idx] = acc;
    }
}

// out[i] = acc[i] (times SCALE when `scaled`), in the storage type.
extern "C" __global__ void __launch_bounds__(256) {{ finish_name }}(
    const float* __restrict__ acc, T* __restrict__ out, int n, int scaled) {
    const float f = scaled ? SCALE : 1.0f;
    for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += gridDim.x * blockDim.x)
        store_elem(out + i, acc[i] * f);
}

{{ m::kernel_entry(name=kernel_name, params=params, bounds="NTHREADS, 1") }}
    T* sK = reinterpret_cast<T*>(smem_raw);
    T* sV = sK + BLOCK_N * SK;
    T* sQ = sV + BLOCK_N * SV;
    T* sdO = sQ + BLOCK_M * SQ;
    T* sP = sdO + BLOCK_M * SO;   // P^T, [key][query]
    T* sdS = sP + BLOCK_N * SP;   // dS^T, [key][query]
    // Base-2 row log-sum-exp (+inf for rows that see nothing) and delta of the tile's rows.
    float* sLse = reinterpret_cast<float*>(sdS + BLOCK_N * SP);
    float* sDelta = sLse + BLOCK_M;

    const int kv_head = blockIdx.y;
    const int batch_idx = blockIdx.z;
    const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
    const int g = lane / 4, tq = lane % 4;  // mma fragment row group / column pair
    const int n0 = kv_begin + blockIdx.x * BLOCK_N;  // first key row of this CTA in the buffer
    const int n_valid = min(BLOCK_N, kv_end - n0);
    if (n_valid <= 0) return;
    // Global positions of this CTA's keys, inclusive.
    const int j0 = k_pos0 + n0, j1 = j0 + n_valid - 1;
    const int wn = warp % WN, wc = warp / WN;
    const int key_row = wn * 16;  // this warp's key fragment in the CTA

    const T* k_blk = k + ((size_t)batch_idx * kv_rows + n0) * (KV_HEADS * D) + (size_t)kv_head * D;
    const T* v_blk = v + ((size_t)batch_idx * kv_rows + n0) * (KV_HEADS * DV) + (size_t)kv_head * DV;
    mixc::load_tile_async<T, BLOCK_N, D, DP, SK, NTHREADS>(sK, k_blk, (size_t)KV_HEADS * D, n_valid, k);
    mixc::load_tile_async<T, BLOCK_N, DV, DVP, SV, NTHREADS>(sV, v_blk, (size_t)KV_HEADS * DV, n_valid, v);
    mixc::cp_async_commit();
{%- if segment %}

    // Segment ids: the key block's id range decides whole query tiles.
    const int* seg_b = {{ segment }} + (size_t)batch_idx * seq_len;
    __shared__ int k_seg_lo_s, k_seg_hi_s;
    if (tid == 0) {
        k_seg_lo_s = mixc::INT_HI;
        k_seg_hi_s = mixc::INT_LO;
    }
    __syncthreads();
    for (int r = tid; r < n_valid; r += NTHREADS) {
        const int s_id = __ldg(seg_b + j0 + r);
        atomicMin(&k_seg_lo_s, s_id);
        atomicMax(&k_seg_hi_s, s_id);
    }
    __syncthreads();
    const int k_seg_lo = k_seg_lo_s, k_seg_hi = k_seg_hi_s;
{%- endif %}

    float acc_dk[DKW / 8][4], acc_dv[DVW / 8][4];
#pragma unroll
    for (int n = 0; n < DKW / 8; ++n) acc_dk[n][0] = acc_dk[n][1] = acc_dk[n][2] = acc_dk[n][3] = 0.0f;
#pragma unroll
    for (int n = 0; n < DVW / 8; ++n) acc_dv[n][0] = acc_dv[n][1] = acc_dv[n][2] = acc_dv[n][3] = 0.0f;

    // Each lane's ldmatrix row addresses (32-bit shared), computed once.
    constexpr int ES = (int)sizeof(T);
    const int mi = lane >> 3;
    // A operands, rows = this warp's keys: K and V (S^T, dP^T), P^T and dS^T (dV, dK).
    const unsigned k_a = mixc::smem_addr(sK + (key_row + (lane & 15)) * SK + (lane >> 4) * 8);
    const unsigned v_a = mixc::smem_addr(sV + (key_row + (lane & 15)) * SV + (lane >> 4) * 8);
    const unsigned p_a = mixc::smem_addr(sP + (key_row + (lane & 15)) * SP + (lane >> 4) * 8);
    const unsigned ds_a = mixc::smem_addr(sdS + (key_row + (lane & 15)) * SP + (lane >> 4) * 8);
    // B operands, n = this warp's queries, k = dims: Q (S^T) and dO (dP^T).
    const unsigned q_b = mixc::smem_addr(sQ + (wc * NQ + (lane & 7) + (mi >> 1) * 8) * SQ + (mi & 1) * 8);
    const unsigned o_b = mixc::smem_addr(sdO + (wc * NQ + (lane & 7) + (mi >> 1) * 8) * SO + (mi & 1) * 8);
    // B operands, k = queries, n = columns (transposed): dO (dV), Q (dK).
    const unsigned o_bt = mixc::smem_addr(sdO + ((lane & 7) + (mi & 1) * 8) * SO + wc * DVW + (mi >> 1) * 8);
    const unsigned q_bt = mixc::smem_addr(sQ + ((lane & 7) + (mi & 1) * 8) * SQ + wc * DKW + (mi >> 1) * 8);
    // dQ: A = dS (rows = queries, k = keys) read transposed from dS^T; B = K, k = keys (transposed).
    const unsigned ds_at = mixc::smem_addr(sdS + ((lane & 7) + (mi >> 1) * 8) * SP + (mi & 1) * 8);
    const unsigned k_bt = mixc::smem_addr(sK + ((lane & 7) + (mi & 1) * 8) * SK + (mi >> 1) * 8);

    const int q_tiles = (q_end - q_begin + BLOCK_M - 1) / BLOCK_M;
    for (int gi = 0; gi < GROUP; ++gi) {
        const int head = kv_head * GROUP + gi;
{%- for hv in hoisted %}
        const {{ hv.c_type }} {{ hv.name }} = {{ hv.code }};  // per-head constant
{%- endfor %}
        for (int qt = 0; qt < q_tiles; ++qt) {
            const int m0 = q_begin + qt * BLOCK_M;  // first query row of the tile in the buffer
            const int m_valid = min(BLOCK_M, q_end - m0);
            const int i0 = q_pos0 + m0, i1 = i0 + m_valid - 1;
{%- if segment %}
            int any = 0, all = 1;
            for (int c = tid; c < m_valid; c += NTHREADS) {
                const int s_id = __ldg(seg_b + i0 + c);
                any |= (s_id >= k_seg_lo && s_id <= k_seg_hi);
                all &= (s_id == k_seg_lo && k_seg_lo == k_seg_hi);
            }
            any = __syncthreads_or(any);
            all = __syncthreads_and(all);
            const int seg_class = !any ? mixc::SKIP : (all ? mixc::FULL : mixc::PARTIAL);
{%- endif %}
            int cls = {{ mask.class }};
            // Keys past kv_end in a ragged key block must be masked out.
            if (cls == mixc::FULL && n_valid < BLOCK_N) cls = mixc::PARTIAL;
            if (cls == mixc::SKIP) continue;  // uniform over the CTA
            const bool masked = cls != mixc::FULL;

            const T* q_tile = q + ((size_t)batch_idx * q_rows + m0) * (HEADS * D) + (size_t)head * D;
            const T* o_tile = d_o + ((size_t)batch_idx * q_rows + m0) * (HEADS * DV) + (size_t)head * DV;
            mixc::load_tile_async<T, BLOCK_M, D, DP, SQ, NTHREADS>(sQ, q_tile, (size_t)HEADS * D, m_valid, q);
            mixc::load_tile_async<T, BLOCK_M, DV, DVP, SO, NTHREADS>(sdO, o_tile, (size_t)HEADS * DV, m_valid, d_o);
            mixc::cp_async_commit();
            for (int r = tid; r < BLOCK_M; r += NTHREADS) {
                const bool ok = r < m_valid;
                const size_t li = ((size_t)batch_idx * HEADS + head) * q_rows + m0 + r;
                const float l = ok ? lse[li] : -mixc::inf();
                sLse[r] = l == -mixc::inf() ? mixc::inf() : l * mixc::LOG2E;
                sDelta[r] = ok ? delta[li] : 0.0f;
            }
            mixc::cp_async_wait<0>();
            __syncthreads();

            // S^T = K Q^T and dP^T = V dO^T for this warp's 16 keys x NQ queries.
            float acc_s[NQ / 8][4], acc_dp[NQ / 8][4];
#pragma unroll
            for (int n = 0; n < NQ / 8; ++n) {
                acc_s[n][0] = acc_s[n][1] = acc_s[n][2] = acc_s[n][3] = 0.0f;
                acc_dp[n][0] = acc_dp[n][1] = acc_dp[n][2] = acc_dp[n][3] = 0.0f;
            }
#pragma unroll
            for (int kk = 0; kk < DP / 16; ++kk) {
                unsigned a[4];
                mixc::ldmatrix_x4(a, k_a + kk * 16 * ES);
#pragma unroll
                for (int nb = 0; nb < NQ / 16; ++nb) {
                    unsigned b[4];
                    mixc::ldmatrix_x4(b, q_b + (nb * 16 * SQ + kk * 16) * ES);
                    mixc::mma_16816<T>(acc_s[2 * nb], a, b[0], b[1]);
                    mixc::mma_16816<T>(acc_s[2 * nb + 1], a, b[2], b[3]);
                }
            }
#pragma unroll
            for (int kk = 0; kk < DVP / 16; ++kk) {
                unsigned a[4];
                mixc::ldmatrix_x4(a, v_a + kk * 16 * ES);
#pragma unroll
                for (int nb = 0; nb < NQ / 16; ++nb) {
                    unsigned b[4];
                    mixc::ldmatrix_x4(b, o_b + (nb * 16 * SO + kk * 16) * ES);
                    mixc::mma_16816<T>(acc_dp[2 * nb], a, b[0], b[1]);
                    mixc::mma_16816<T>(acc_dp[2 * nb + 1], a, b[2], b[3]);
                }
            }

            // P^T from the scores (scale{% if bias %}, bias{% endif %}{% if transform %}, transform{% endif %} fused as in the forward, masked in
            // Partial tiles), dS^T = P^T (dP^T - delta){% if transform %} times the transform's derivative{% endif %}.
#pragma unroll
            for (int n = 0; n < NQ / 8; ++n) {
#pragma unroll
                for (int e = 0; e < 4; ++e) {
                    const int row = key_row + g + (e >> 1) * 8;    // key, in the CTA
                    const int col = wc * NQ + n * 8 + tq * 2 + (e & 1);  // query, in the tile
                    const int pos_i = i0 + col;
                    const int pos_j = j0 + row;
{{- m::softmax_score(dot="acc_s[n][e]", x="x", in_bounds="row < n_valid", score_expr=score_expr, bias=bias,
                     transform=transform, mask=mask, segment=segment,
                     seg_i="const int seg_i = col < m_valid ? __ldg(seg_b + pos_i) : mixc::INT_LO;",
                     s_pre=s_pre) | indent(prefix="            ") }}
                    const float p = exp2f(x - sLse[col]);
                    float ds = p * (acc_dp[n][e] - sDelta[col]);
{%- if transform %}
                    ds *= {{ d_transform }};
{%- endif %}
{%- for t in table_grads %}
                    if (ds != 0.0f) atomicAdd({{ t.target }} + {{ t.offset }}, ds * ({{ t.partial }}));
{%- endfor %}
                    acc_s[n][e] = p;
                    acc_dp[n][e] = ds;
                }
            }
#pragma unroll
            for (int n = 0; n < NQ / 8; ++n) {
#pragma unroll
                for (int r = 0; r < 2; ++r) {
                    const int off = (key_row + g + r * 8) * SP + wc * NQ + n * 8 + tq * 2;
                    *reinterpret_cast<unsigned*>(sP + off) = mixc::pack2<T>(acc_s[n][2 * r], acc_s[n][2 * r + 1]);
                    *reinterpret_cast<unsigned*>(sdS + off) = mixc::pack2<T>(acc_dp[n][2 * r], acc_dp[n][2 * r + 1]);
                }
            }
            __syncthreads();

            // dV += P^T dO and dK += dS^T Q (this warp's keys x its columns).
#pragma unroll
            for (int kb = 0; kb < BLOCK_M / 16; ++kb) {
                unsigned a[4], b[4];
                mixc::ldmatrix_x4(a, p_a + kb * 16 * ES);
#pragma unroll
                for (int nb = 0; nb < DVW / 16; ++nb) {
                    mixc::ldmatrix_x4_trans(b, o_bt + (kb * 16 * SO + nb * 16) * ES);
                    mixc::mma_16816<T>(acc_dv[2 * nb], a, b[0], b[1]);
                    mixc::mma_16816<T>(acc_dv[2 * nb + 1], a, b[2], b[3]);
                }
                mixc::ldmatrix_x4(a, ds_a + kb * 16 * ES);
#pragma unroll
                for (int nb = 0; nb < DKW / 16; ++nb) {
                    mixc::ldmatrix_x4_trans(b, q_bt + (kb * 16 * SQ + nb * 16) * ES);
                    mixc::mma_16816<T>(acc_dk[2 * nb], a, b[0], b[1]);
                    mixc::mma_16816<T>(acc_dk[2 * nb + 1], a, b[2], b[3]);
                }
            }

            // dQ += dS K, added to the global f32 accumulator.
            for (int u = warp; u < MQ * CQ; u += WARPS) {
                const int mf = u % MQ, cp = u / MQ;
                float acc_q[DQW / 8][4];
#pragma unroll
                for (int n = 0; n < DQW / 8; ++n) acc_q[n][0] = acc_q[n][1] = acc_q[n][2] = acc_q[n][3] = 0.0f;
#pragma unroll
                for (int kb = 0; kb < BLOCK_N / 16; ++kb) {
                    unsigned a[4];
                    mixc::ldmatrix_x4_trans(a, ds_at + (kb * 16 * SP + mf * 16) * ES);
#pragma unroll
                    for (int nb = 0; nb < DQW / 16; ++nb) {
                        unsigned b[4];
                        mixc::ldmatrix_x4_trans(b, k_bt + (kb * 16 * SK + cp * DQW + nb * 16) * ES);
                        mixc::mma_16816<T>(acc_q[2 * nb], a, b[0], b[1]);
                        mixc::mma_16816<T>(acc_q[2 * nb + 1], a, b[2], b[3]);
                    }
                }
#pragma unroll
                for (int r = 0; r < 2; ++r) {
                    const int row = mf * 16 + g + r * 8;
                    if (row >= m_valid) continue;
                    float* dst = dq_acc + (((size_t)batch_idx * q_rows + m0 + row) * HEADS + head) * D;
#pragma unroll
                    for (int n = 0; n < DQW / 8; ++n) {
                        const int col = cp * DQW + n * 8 + tq * 2;
                        if (col < D) {
                            atomicAdd(dst + col, acc_q[n][2 * r]);
                            atomicAdd(dst + col + 1, acc_q[n][2 * r + 1]);
                        }
                    }
                }
            }
            // The next tile overwrites Q, dO, P^T and dS^T.
            __syncthreads();
        }
    }

    // Epilogue: this CTA alone owns its key rows of dK / dV in this launch.
#pragma unroll
    for (int r = 0; r < 2; ++r) {
        const int row = key_row + g + r * 8;
        if (row >= n_valid) continue;
        const size_t base = ((size_t)batch_idx * kv_rows + n0 + row) * KV_HEADS + kv_head;
        float* dk_row = dk_acc + base * D;
        float* dv_row = dv_acc + base * DV;
#pragma unroll
        for (int n = 0; n < DKW / 8; ++n) {
            const int col = wc * DKW + n * 8 + tq * 2;
            if (col < D) {
                dk_row[col] += acc_dk[n][2 * r];
                dk_row[col + 1] += acc_dk[n][2 * r + 1];
            }
        }
#pragma unroll
        for (int n = 0; n < DVW / 8; ++n) {
            const int col = wc * DVW + n * 8 + tq * 2;
            if (col < DV) {
                dv_row[col] += acc_dv[n][2 * r];
                dv_row[col + 1] += acc_dv[n][2 * r + 1];
            }
        }
    }
}
