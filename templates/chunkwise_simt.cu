{% import "macros.cu" as m %}
{{ header -}}
// family parameters: q_map={{ q_map }} k_map={{ k_map }} decay={{ decay }} norm={{ norm }}
//   {{ dv_blocks }} value-dim block(s) of {{ block_dv }}
//
// Chunkwise causal linear attention with decay, f32 SIMT path (no tensor
// cores): the same algorithm, argument list and outputs as chunkwise_mma.cu.
// Per chunk, with cum[r] = sum of log2 gamma over the chunk up to row r:
//   P[r][c] = (c <= r) <phi q_r, psi k_c> 2^(cum[r]-cum[c])
//   O[r]    = 2^cum[r] phi(q_r) S + sum_c P[r][c] v_c
//   S       = 2^cum[last] S + sum_c 2^(cum[last]-cum[c]) psi(k_c) v_c^T
// S (d_k x block_dv, f32, excluding `scale`) lives in shared memory.
// Launch: grid ({{ dv_blocks }}, heads, batch), block {{ num_threads }} threads,
// {{ smem_bytes }} bytes of dynamic shared memory.
{% include "linear_prelude.cu" -%}
constexpr int DK = {{ head_dim }};
constexpr int DV = {{ value_dim }};
constexpr int CHUNK = {{ config.chunk }};
constexpr int BDV = {{ block_dv }};
constexpr int NT = {{ config.warps }} * 32;
constexpr float SCALE = {{ scale }};
{%- if norm_sum %}
constexpr float EPS = {{ eps }};
{%- endif %}

// Odd row strides keep the column-wise reads of Q/K and P free of bank conflicts.
constexpr int QS = DK + 1;
constexpr int PS = CHUNK + 1;
constexpr int SMEM_F = 2 * CHUNK * QS + CHUNK * BDV + DK * BDV + CHUNK * PS + 3 * CHUNK + {% if norm_sum %}CHUNK + DK{% else %}0{% endif %};
constexpr int SMEM_BYTES = SMEM_F * (int)sizeof(float);
static_assert(SMEM_BYTES == {{ smem_bytes }}, "shared-memory layout disagrees with the Rust planner");

{% if decay == "per_head" -%}
// log2(gamma_h) per head, evaluated from the spec's decay expression at compile time.
__constant__ float LOG2_GAMMA[HEADS] = { {{ log2_gammas }} };
{%- endif %}
{% if q_map != "identity" -%}
{{ m::feature_map(name="phi_q", map=q_map) }}
{%- endif %}
{%- if k_map != "identity" %}

{{ m::feature_map(name="psi_k", map=k_map) }}
{%- endif %}

} // namespace

// Same arguments and outputs as the tensor-core variant (chunkwise_mma.cu).
{{ m::kernel_entry(name=kernel_name, params=params, bounds="NT") }}
    float* q_s = reinterpret_cast<float*>(smem_raw);  // [CHUNK][QS] phi(q)
    float* k_s = q_s + CHUNK * QS;                    // [CHUNK][QS] psi(k)
    float* v_s = k_s + CHUNK * QS;                    // [CHUNK][BDV]
    float* st_s = v_s + CHUNK * BDV;                  // [DK][BDV] state
    float* p_s = st_s + DK * BDV;                     // [CHUNK][PS] masked, decayed scores
    float* cum_s = p_s + CHUNK * PS;                  // [CHUNK] log2 decay from chunk start
    float* w_s = cum_s + CHUNK;                       // [CHUNK] 2^(cum[last] - cum[c])
{%- if norm_sum %}
    float* den_s = w_s + CHUNK;                       // [CHUNK] scale * (row sums of P + q.z)
    float* qz_s = den_s + CHUNK;                      // [CHUNK] 2^cum[r] phi(q_r) . z
    float* z_s = qz_s + CHUNK;                        // [DK] running sum of decayed psi(k)
{%- endif %}

    const int tid = threadIdx.x;
    const int n0 = blockIdx.x * BDV, h = blockIdx.y, b = blockIdx.z, kvh = h / KV_GROUP;
    const int L = rows;
    const int num_chunks = (L + CHUNK - 1) / CHUNK;
    const size_t bh = (size_t)b * HEADS + h;

    for (int i = tid; i < DK * BDV; i += NT) {
        const int d = i / BDV, col = n0 + i % BDV;
        st_s[i] = (state_in != nullptr && col < DV) ? state_in[(bh * DK + d) * DV + col] : 0.f;
    }
{%- if norm_sum %}
    for (int d = tid; d < DK; d += NT) z_s[d] = z_in != nullptr ? z_in[bh * DK + d] : 0.f;
{%- endif %}

    for (int c = 0; c < num_chunks; ++c) {
        const int t0 = c * CHUNK;
        // Loads; rows past the sequence and columns past DV are zero.
        for (int i = tid; i < CHUNK * DK; i += NT) {
            const int r = i / DK, d = i % DK, t = t0 + r;
            float qv = 0.f, kv = 0.f;
            if (t < L) {
                const size_t row = (size_t)b * L + t;
{%- if q_map != "identity" %}
                qv = phi_q(to_float(q[(row * HEADS + h) * DK + d]));
{%- else %}
                qv = to_float(q[(row * HEADS + h) * DK + d]);
{%- endif %}
{%- if k_map != "identity" %}
                kv = psi_k(to_float(k[(row * KV_HEADS + kvh) * DK + d]));
{%- else %}
                kv = to_float(k[(row * KV_HEADS + kvh) * DK + d]);
{%- endif %}
            }
            q_s[r * QS + d] = qv;
            k_s[r * QS + d] = kv;
        }
        for (int i = tid; i < CHUNK * BDV; i += NT) {
            const int r = i / BDV, col = n0 + i % BDV, t = t0 + r;
            v_s[i] = (t < L && col < DV) ? to_float(v[(((size_t)b * L + t) * KV_HEADS + kvh) * DV + col]) : 0.f;
        }
{%- if decay == "gate" %}
        // Serial prefix sum by one thread: CHUNK adds, negligible next to the products.
        if (tid == 0) {
            float run = 0.f;
            for (int r = 0; r < CHUNK; ++r) {
                const int t = t0 + r;
                run += t < L ? log2f({{ gate_name }}[((size_t)b * L + t) * HEADS + h]) : 0.f;
                cum_s[r] = run;
            }
        }
{%- elif decay == "per_head" %}
        for (int r = tid; r < CHUNK; r += NT) cum_s[r] = (float)min(r + 1, L - t0) * LOG2_GAMMA[h];
{%- else %}
        for (int r = tid; r < CHUNK; r += NT) cum_s[r] = 0.f;
{%- endif %}
        __syncthreads();

        const float cum_last = cum_s[CHUNK - 1];
        for (int i = tid; i < CHUNK * CHUNK; i += NT) {
            const int r = i / CHUNK, cc = i % CHUNK;
            float acc = 0.f;
            if (cc <= r) {
                for (int d = 0; d < DK; ++d) acc += q_s[r * QS + d] * k_s[cc * QS + d];
                acc *= exp2f(cum_s[r] - cum_s[cc]);
            }
            p_s[r * PS + cc] = acc;
        }
        for (int r = tid; r < CHUNK; r += NT) {
            w_s[r] = exp2f(cum_last - cum_s[r]);
{%- if norm_sum %}
            float acc = 0.f;
            for (int d = 0; d < DK; ++d) acc += q_s[r * QS + d] * z_s[d];
            qz_s[r] = acc * exp2f(cum_s[r]);
{%- endif %}
        }
        __syncthreads();
{%- if norm_sum %}
        for (int r = tid; r < CHUNK; r += NT) {
            float acc = qz_s[r];
            for (int cc = 0; cc <= r; ++cc) acc += p_s[r * PS + cc];
            den_s[r] = SCALE * acc;
            if (o_den != nullptr && blockIdx.x == 0 && t0 + r < L) o_den[((size_t)b * L + t0 + r) * HEADS + h] = den_s[r];
        }
        __syncthreads();
{%- endif %}

        for (int i = tid; i < CHUNK * BDV; i += NT) {
            const int r = i / BDV, n = i % BDV, t = t0 + r, col = n0 + n;
            if (t >= L || col >= DV) continue;
            float inter = 0.f, intra = 0.f;
            for (int d = 0; d < DK; ++d) inter += q_s[r * QS + d] * st_s[d * BDV + n];
            for (int cc = 0; cc <= r; ++cc) intra += p_s[r * PS + cc] * v_s[cc * BDV + n];
            const float num = SCALE * (exp2f(cum_s[r]) * inter + intra);
            const size_t off = (((size_t)b * L + t) * HEADS + h) * DV + col;
            if (o_num != nullptr) o_num[off] = num;
{%- if norm_sum %}
            if (o != nullptr) o[off] = from_float<T>(num / (den_s[r] + EPS));
{%- else %}
            if (o != nullptr) o[off] = from_float<T>(num);
{%- endif %}
        }
        __syncthreads();  // st_s is read above and rewritten below

        const float dl = exp2f(cum_last);
        for (int i = tid; i < DK * BDV; i += NT) {
            const int d = i / BDV, n = i % BDV;
            float acc = st_s[i] * dl;
            for (int r = 0; r < CHUNK; ++r) acc += k_s[r * QS + d] * (w_s[r] * v_s[r * BDV + n]);
            st_s[i] = acc;
        }
{%- if norm_sum %}
        for (int d = tid; d < DK; d += NT) {
            float acc = z_s[d] * dl;
            for (int r = 0; r < CHUNK; ++r) acc += k_s[r * QS + d] * w_s[r];
            z_s[d] = acc;
        }
{%- endif %}
        __syncthreads();
    }

    if (state_out != nullptr)
        for (int i = tid; i < DK * BDV; i += NT) {
            const int d = i / BDV, col = n0 + i % BDV;
            if (col < DV) state_out[(bh * DK + d) * DV + col] = st_s[i];
        }
{%- if norm_sum %}
    if (z_out != nullptr && blockIdx.x == 0)
        for (int d = tid; d < DK; d += NT) z_out[bh * DK + d] = z_s[d];
{%- endif %}
}
