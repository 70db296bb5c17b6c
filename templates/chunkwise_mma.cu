{% import "macros.cu" as m %}
{{ header -}}
// family parameters: q_map={{ q_map }} k_map={{ k_map }} decay={{ decay }} norm={{ norm }}
//   head_dim padded to {{ dk_pad }}; {{ dv_blocks }} value-dim block(s) of {{ block_dv }}
//
// Chunkwise causal linear attention with decay (linear / retention / gated):
// for each chunk of CHUNK tokens, with cum[r] = sum of log2 gamma over the
// chunk up to row r,
//   O     = 2^cum[r] * phi(Q) S  +  (phi(Q) psi(K)^T . D) V,   D[r][c] = 2^(cum[r]-cum[c]) for c <= r
//   S     = 2^cum[last] * S + psi(K)^T (2^(cum[last]-cum[c]) V[c])
// S is the d_k x d_v state excluding `scale` (applied to outputs only), kept
// in f32 registers spread over the warps, mirrored in shared memory as T for
// the inter-chunk product. One CTA per (value-dim block, head, batch).
// Launch: grid ({{ dv_blocks }}, heads, batch), block {{ num_threads }} threads,
// {{ smem_bytes }} bytes of dynamic shared memory.
{% include "linear_prelude.cu" -%}
constexpr int DK = {{ head_dim }};
constexpr int DKP = {{ dk_pad }};
constexpr int DV = {{ value_dim }};
constexpr int CHUNK = {{ config.chunk }};
constexpr int BDV = {{ block_dv }};
constexpr int NUM_WARPS = {{ config.warps }};
constexpr int NT = NUM_WARPS * 32;
constexpr int STAGES = {{ config.stages }};
constexpr bool HAS_DECAY = {{ has_decay }};
constexpr bool NORM_SUM = {{ norm_sum }};
constexpr float SCALE = {{ scale }};
constexpr float EPS = {{ eps }};

// Rows padded by 8 elements (16 bytes) so ldmatrix rows fall in distinct banks.
constexpr int QS = DKP + 8;
constexpr int VS = BDV + 8;
constexpr int MT_Q = CHUNK / 16;  // query m-tiles per chunk
constexpr int MT_S = DKP / 16;    // state m-tiles (rows of S)
constexpr int NT_V = BDV / 8;     // n-tiles of the output / state
constexpr int NT_C = CHUNK / 8;   // n-tiles of the score tile
constexpr int Q_ITERS = (MT_Q + NUM_WARPS - 1) / NUM_WARPS;
constexpr int S_ITERS = (MT_S + NUM_WARPS - 1) / NUM_WARPS;

constexpr int SMEM_T = STAGES * CHUNK * QS * 2 + STAGES * CHUNK * VS + (HAS_DECAY ? CHUNK * VS : 0) + DKP * VS;
constexpr int SMEM_F = CHUNK + (NORM_SUM ? CHUNK + DKP : 0);
constexpr int SMEM_BYTES = SMEM_T * (int)sizeof(T) + SMEM_F * (int)sizeof(float);
static_assert(SMEM_BYTES == {{ smem_bytes }}, "shared-memory layout disagrees with the Rust planner");
static_assert(CHUNK % 32 == 0 && DKP % 16 == 0 && BDV % 16 == 0, "tile shape");
static_assert(DK % 8 == 0 && DV % 8 == 0, "rows are copied in 16-byte vectors");

{% if decay == "per_head" -%}
// log2(gamma_h) per head, evaluated from the spec's decay expression at compile time.
__constant__ float LOG2_GAMMA[HEADS] = { {{ log2_gammas }} };
{%- endif %}
{%- if q_map != "identity" %}

{{ m::feature_map(name="phi_q", map=q_map) }}
{%- endif %}
{%- if k_map != "identity" %}

{{ m::feature_map(name="psi_k", map=k_map) }}
{%- endif %}

// Issues the cp.async copies of one chunk's Q, K rows and V columns
// [n0, n0 + BDV). Rows past the sequence and columns past DK / DV are
// zero-filled, so padded lanes contribute nothing to any product.
__device__ __forceinline__ void load_chunk(T* qs, T* ks, T* vs, const T* __restrict__ q,
                                           const T* __restrict__ k, const T* __restrict__ v,
                                           int b, int h, int kvh, int n0, int t0, int L, int tid) {
    const size_t row0 = (size_t)b * L + t0;
    mixc::load_tile_async<T, CHUNK, DK, DKP, QS, NT>(qs, q + (row0 * HEADS + h) * DK, (size_t)HEADS * DK, L - t0, q);
    mixc::load_tile_async<T, CHUNK, DK, DKP, QS, NT>(ks, k + (row0 * KV_HEADS + kvh) * DK, (size_t)KV_HEADS * DK,
                                                     L - t0, k);
    mixc::load_tile_async<T, CHUNK, BDV, BDV, VS, NT>(vs, v + (row0 * KV_HEADS + kvh) * DV + n0,
                                                      (size_t)KV_HEADS * DV, L - t0, v, DV - n0);
}

// Mirrors the f32 state registers into shared memory as T (the B operand of
// the inter-chunk product).
__device__ __forceinline__ void store_state(T* st_s, const float (&acc)[S_ITERS][NT_V][4], int warp, int lane) {
    const int g = lane >> 2, t4 = lane & 3;
#pragma unroll
    for (int si = 0; si < S_ITERS; ++si) {
        const int mt = warp + si * NUM_WARPS;
        if (mt < MT_S) {
#pragma unroll
            for (int n = 0; n < NT_V; ++n) {
                const int row = mt * 16 + g, col = n * 8 + 2 * t4;
                *reinterpret_cast<unsigned*>(st_s + row * VS + col) = pack2<T>(acc[si][n][0], acc[si][n][1]);
                *reinterpret_cast<unsigned*>(st_s + (row + 8) * VS + col) = pack2<T>(acc[si][n][2], acc[si][n][3]);
            }
        }
    }
}

} // namespace

// Ring order: a rank starts from the state (and z) the previous rank emitted
// (null state_in / z_in: zero), which makes its outputs exact. The state
// excludes `scale`. Every output pointer may be null; o = o_num / (o_den + eps)
// for sum normalisation, o = o_num otherwise, and o_num / o_den are the
// additive partials for a runtime that merges per-shard results instead.
{{ m::kernel_entry(name=kernel_name, params=params, bounds="NT") }}
    T* q_s = reinterpret_cast<T*>(smem_raw);   // [STAGES][CHUNK][QS]
    T* k_s = q_s + STAGES * CHUNK * QS;        // [STAGES][CHUNK][QS]
    T* v_s = k_s + STAGES * CHUNK * QS;        // [STAGES][CHUNK][VS]
{%- if has_decay %}
    T* vd_s = v_s + STAGES * CHUNK * VS;       // [CHUNK][VS] V decayed to the chunk end
    T* st_s = vd_s + CHUNK * VS;               // [DKP][VS] state as T
{%- else %}
    T* st_s = v_s + STAGES * CHUNK * VS;       // [DKP][VS] state as T
{%- endif %}
    float* f_s = reinterpret_cast<float*>(st_s + DKP * VS);
{%- if has_decay %}
    float* cum_s = f_s;                        // [CHUNK] log2 decay from chunk start
{%- endif %}
{%- if norm_sum %}
    float* qz_s = f_s + CHUNK;                 // [CHUNK] 2^cum[r] phi(q_r) . z
    float* z_s = qz_s + CHUNK;                 // [DKP] running sum of decayed psi(k)
{%- endif %}
    (void)f_s;

    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const int g = lane >> 2, t4 = lane & 3;
    const int n0 = blockIdx.x * BDV, h = blockIdx.y, b = blockIdx.z, kvh = h / KV_GROUP;
    const int L = rows;
    const int num_chunks = (L + CHUNK - 1) / CHUNK;
    const size_t bh = (size_t)b * HEADS + h;

    // The state tile this warp owns: rows of m-tiles warp, warp + NUM_WARPS, ...
    float acc_s[S_ITERS][NT_V][4];
#pragma unroll
    for (int si = 0; si < S_ITERS; ++si)
#pragma unroll
        for (int n = 0; n < NT_V; ++n)
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                const int row = (warp + si * NUM_WARPS) * 16 + g + 8 * (e >> 1);
                const int col = n0 + n * 8 + 2 * t4 + (e & 1);
                acc_s[si][n][e] = (state_in != nullptr && row < DK && col < DV)
                                      ? state_in[(bh * DK + row) * DV + col] : 0.f;
            }
    store_state(st_s, acc_s, warp, lane);
{%- if norm_sum %}
    for (int d = tid; d < DKP; d += NT) z_s[d] = (z_in != nullptr && d < DK) ? z_in[bh * DK + d] : 0.f;
{%- endif %}

    if (STAGES == 2 && num_chunks > 0) load_chunk(q_s, k_s, v_s, q, k, v, b, h, kvh, n0, 0, L, tid);
    cp_async_commit();

    for (int c = 0; c < num_chunks; ++c) {
        const int t0 = c * CHUNK;
        const int stage = STAGES == 2 ? (c & 1) : 0;
        T* qs = q_s + stage * CHUNK * QS;
        T* ks = k_s + stage * CHUNK * QS;
        T* vs = v_s + stage * CHUNK * VS;
        if (STAGES == 1) {
            load_chunk(qs, ks, vs, q, k, v, b, h, kvh, n0, t0, L, tid);
        } else if (c + 1 < num_chunks) {
            const int nx = (stage ^ 1) * CHUNK;
            load_chunk(q_s + nx * QS, k_s + nx * QS, v_s + nx * VS, q, k, v, b, h, kvh, n0, t0 + CHUNK, L, tid);
        }
        cp_async_commit();
        if (STAGES == 2) cp_async_wait<1>(); else cp_async_wait<0>();
{%- if q_map != "identity" or k_map != "identity" %}
        __syncthreads();  // the feature maps read other threads' copies
        // Feature maps, applied once per element on load; rows past the end
        // and padded columns stay 0 (phi(0) may be 1).
        for (int i = tid; i < CHUNK * DK; i += NT) {
            const int r = i / DK, d = i % DK;
            if (t0 + r < L) {
{%- if q_map != "identity" %}
                qs[r * QS + d] = from_float<T>(phi_q(to_float(qs[r * QS + d])));
{%- endif %}
{%- if k_map != "identity" %}
                ks[r * QS + d] = from_float<T>(psi_k(to_float(ks[r * QS + d])));
{%- endif %}
            }
        }
{%- endif %}
{%- if decay == "gate" %}
        // cum[r] = sum_{l <= r} log2 g[t0 + l]: an inclusive warp scan, each
        // lane owning CHUNK / 32 consecutive rows. Rows past the end count as
        // gamma = 1 so cum[CHUNK - 1] is the decay over the valid rows.
        if (warp == 0) {
            constexpr int E = CHUNK / 32;
            float part[E];
            float run = 0.f;
#pragma unroll
            for (int e = 0; e < E; ++e) {
                const int t = t0 + lane * E + e;
                run += t < L ? log2f({{ gate_name }}[((size_t)b * L + t) * HEADS + h]) : 0.f;
                part[e] = run;
            }
            float incl = run;
#pragma unroll
            for (int off = 1; off < 32; off <<= 1) {
                const float y = __shfl_up_sync(0xffffffffu, incl, off);
                if (lane >= off) incl += y;
            }
#pragma unroll
            for (int e = 0; e < E; ++e) cum_s[lane * E + e] = part[e] + (incl - run);
        }
{%- elif decay == "per_head" %}
        for (int r = tid; r < CHUNK; r += NT) cum_s[r] = (float)min(r + 1, L - t0) * LOG2_GAMMA[h];
{%- endif %}
        __syncthreads();  // this chunk's copies (and maps, cum) are visible

{%- if has_decay %}
        const float cum_last = cum_s[CHUNK - 1];
        // Element-wise on purpose: a column-pair version (one exp2 per two
        // values) spills the 128-register kernel at d = 128.
        for (int i = tid; i < CHUNK * BDV; i += NT) {
            const int r = i / BDV, n = i % BDV;
            vd_s[r * VS + n] = from_float<T>(to_float(vs[r * VS + n]) * exp2f(cum_last - cum_s[r]));
        }
{%- endif %}
{%- if norm_sum %}
        for (int r = tid; r < CHUNK; r += NT) {
            float acc = 0.f;
            for (int d = 0; d < DK; ++d) acc += to_float(qs[r * QS + d]) * z_s[d];
{%- if has_decay %}
            qz_s[r] = acc * exp2f(cum_s[r]);
{%- else %}
            qz_s[r] = acc;
{%- endif %}
        }
{%- endif %}
        __syncthreads();

        // ---- outputs of this chunk: warp owns query m-tiles warp, warp + NUM_WARPS, ...
#pragma unroll
        for (int qi = 0; qi < Q_ITERS; ++qi) {
            const int mt = warp + qi * NUM_WARPS;
            if (mt >= MT_Q) break;
            const int r0 = mt * 16, ra = r0 + g, rb = ra + 8;
            float acc_o[NT_V][4];
#pragma unroll
            for (int n = 0; n < NT_V; ++n)
#pragma unroll
                for (int e = 0; e < 4; ++e) acc_o[n][e] = 0.f;

            // Inter-chunk: phi(Q) S, then the decay from the chunk start.
#pragma unroll
            for (int kk = 0; kk < DKP / 16; ++kk) {
                unsigned a[4];
                ldmatrix_x4(a, qs + (r0 + a_row(lane)) * QS + kk * 16 + a_col(lane));
#pragma unroll
                for (int nn = 0; nn < BDV / 16; ++nn) {
                    unsigned bb[4];
                    ldmatrix_x4_trans(bb, st_s + (kk * 16 + a_row(lane)) * VS + nn * 16 + a_col(lane));
                    mma_16816<T>(acc_o[2 * nn], a, bb[0], bb[1]);
                    mma_16816<T>(acc_o[2 * nn + 1], a, bb[2], bb[3]);
                }
            }
{%- if has_decay %}
            {
                const float da = exp2f(cum_s[ra]), db = exp2f(cum_s[rb]);
#pragma unroll
                for (int n = 0; n < NT_V; ++n) {
                    acc_o[n][0] *= da; acc_o[n][1] *= da;
                    acc_o[n][2] *= db; acc_o[n][3] *= db;
                }
            }
{%- endif %}

            // Intra-chunk scores phi(Q) psi(K)^T; key tiles right of the
            // diagonal tile are all masked and never computed.
            float sc[NT_C][4];
#pragma unroll
            for (int n = 0; n < NT_C; ++n)
#pragma unroll
                for (int e = 0; e < 4; ++e) sc[n][e] = 0.f;
#pragma unroll
            for (int kk = 0; kk < DKP / 16; ++kk) {
                unsigned a[4];
                ldmatrix_x4(a, qs + (r0 + a_row(lane)) * QS + kk * 16 + a_col(lane));
#pragma unroll
                for (int nn = 0; nn < CHUNK / 16; ++nn) {
                    if (nn <= mt) {
                        unsigned bb[4];
                        ldmatrix_x4(bb, ks + (nn * 16 + bt_row(lane)) * QS + kk * 16 + bt_col(lane));
                        mma_16816<T>(sc[2 * nn], a, bb[0], bb[1]);
                        mma_16816<T>(sc[2 * nn + 1], a, bb[2], bb[3]);
                    }
                }
            }
            // Causal mask and decay D[r][c]; the row sums feed the denominator.
            float rs_a = 0.f, rs_b = 0.f;
#pragma unroll
            for (int n = 0; n < NT_C; ++n)
#pragma unroll
                for (int e = 0; e < 4; ++e) {
                    const int row = e < 2 ? ra : rb, col = n * 8 + 2 * t4 + (e & 1);
{%- if has_decay %}
                    const float w = col <= row ? sc[n][e] * exp2f(cum_s[row] - cum_s[col]) : 0.f;
{%- else %}
                    const float w = col <= row ? sc[n][e] : 0.f;
{%- endif %}
                    sc[n][e] = w;
                    if (e < 2) rs_a += w; else rs_b += w;
                }
            (void)rs_a; (void)rs_b;
            // P V: the score accumulators already have the A-operand layout.
#pragma unroll
            for (int kk = 0; kk < CHUNK / 16; ++kk) {
                if (kk <= mt) {
                    unsigned a[4];
                    a[0] = pack2<T>(sc[2 * kk][0], sc[2 * kk][1]);
                    a[1] = pack2<T>(sc[2 * kk][2], sc[2 * kk][3]);
                    a[2] = pack2<T>(sc[2 * kk + 1][0], sc[2 * kk + 1][1]);
                    a[3] = pack2<T>(sc[2 * kk + 1][2], sc[2 * kk + 1][3]);
#pragma unroll
                    for (int nn = 0; nn < BDV / 16; ++nn) {
                        unsigned bb[4];
                        ldmatrix_x4_trans(bb, vs + (kk * 16 + a_row(lane)) * VS + nn * 16 + a_col(lane));
                        mma_16816<T>(acc_o[2 * nn], a, bb[0], bb[1]);
                        mma_16816<T>(acc_o[2 * nn + 1], a, bb[2], bb[3]);
                    }
                }
            }

            // Epilogue: rows past the sequence and columns past DV are not written.
            float den_a = 1.f, den_b = 1.f;
{%- if norm_sum %}
            rs_a += __shfl_xor_sync(0xffffffffu, rs_a, 1);
            rs_a += __shfl_xor_sync(0xffffffffu, rs_a, 2);
            rs_b += __shfl_xor_sync(0xffffffffu, rs_b, 1);
            rs_b += __shfl_xor_sync(0xffffffffu, rs_b, 2);
            den_a = SCALE * (rs_a + qz_s[ra]);
            den_b = SCALE * (rs_b + qz_s[rb]);
            if (o_den != nullptr && blockIdx.x == 0 && t4 == 0) {
                if (t0 + ra < L) o_den[((size_t)b * L + t0 + ra) * HEADS + h] = den_a;
                if (t0 + rb < L) o_den[((size_t)b * L + t0 + rb) * HEADS + h] = den_b;
            }
{%- endif %}
#pragma unroll
            for (int half = 0; half < 2; ++half) {
                const int t = t0 + (half ? rb : ra);
                if (t >= L) continue;
                const float inv = NORM_SUM ? 1.f / ((half ? den_b : den_a) + EPS) : 1.f;
                const size_t row_off = (((size_t)b * L + t) * HEADS + h) * DV;
#pragma unroll
                for (int n = 0; n < NT_V; ++n) {
                    const int col = n0 + n * 8 + 2 * t4;
                    if (col >= DV) continue;
                    const float x0 = SCALE * acc_o[n][2 * half], x1 = SCALE * acc_o[n][2 * half + 1];
                    if (o_num != nullptr) *reinterpret_cast<float2*>(o_num + row_off + col) = make_float2(x0, x1);
                    if (o != nullptr) *reinterpret_cast<unsigned*>(o + row_off + col) = pack2<T>(x0 * inv, x1 * inv);
                }
            }
            (void)den_a; (void)den_b;
        }

        // ---- state update: S = 2^cum_last S + psi(K)^T Vd
#pragma unroll
        for (int si = 0; si < S_ITERS; ++si) {
            const int mt = warp + si * NUM_WARPS;
            if (mt >= MT_S) break;
{%- if has_decay %}
            const float dl = exp2f(cum_last);
#pragma unroll
            for (int n = 0; n < NT_V; ++n)
#pragma unroll
                for (int e = 0; e < 4; ++e) acc_s[si][n][e] *= dl;
            const T* vsrc = vd_s;
{%- else %}
            const T* vsrc = vs;
{%- endif %}
#pragma unroll
            for (int kk = 0; kk < CHUNK / 16; ++kk) {
                unsigned a[4];
                ldmatrix_x4_trans(a, ks + (kk * 16 + bt_row(lane)) * QS + mt * 16 + bt_col(lane));
#pragma unroll
                for (int nn = 0; nn < BDV / 16; ++nn) {
                    unsigned bb[4];
                    ldmatrix_x4_trans(bb, vsrc + (kk * 16 + a_row(lane)) * VS + nn * 16 + a_col(lane));
                    mma_16816<T>(acc_s[si][2 * nn], a, bb[0], bb[1]);
                    mma_16816<T>(acc_s[si][2 * nn + 1], a, bb[2], bb[3]);
                }
            }
        }
{%- if norm_sum %}
        for (int d = tid; d < DK; d += NT) {
{%- if has_decay %}
            float acc = z_s[d] * exp2f(cum_last);
            for (int r = 0; r < CHUNK; ++r) acc += to_float(ks[r * QS + d]) * exp2f(cum_last - cum_s[r]);
{%- else %}
            float acc = z_s[d];
            for (int r = 0; r < CHUNK; ++r) acc += to_float(ks[r * QS + d]);
{%- endif %}
            z_s[d] = acc;
        }
{%- endif %}
        __syncthreads();  // every warp is done reading st_s and this stage
        store_state(st_s, acc_s, warp, lane);
    }
    cp_async_wait<0>();

    if (state_out != nullptr) {
#pragma unroll
        for (int si = 0; si < S_ITERS; ++si)
#pragma unroll
            for (int n = 0; n < NT_V; ++n)
#pragma unroll
                for (int e = 0; e < 4; ++e) {
                    const int row = (warp + si * NUM_WARPS) * 16 + g + 8 * (e >> 1);
                    const int col = n0 + n * 8 + 2 * t4 + (e & 1);
                    if (row < DK && col < DV) state_out[(bh * DK + row) * DV + col] = acc_s[si][n][e];
                }
    }
{%- if norm_sum %}
    // z_s was last written before the loop's final barrier, each thread its own d.
    if (z_out != nullptr && blockIdx.x == 0) {
        for (int d = tid; d < DK; d += NT) z_out[bh * DK + d] = z_s[d];
    }
{%- endif %}
}
