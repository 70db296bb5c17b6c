{#-
  Tera macros shared by the kernel templates: `{% import "macros.cu" as m %}`
  at the top of a template. This file renders nothing itself.

  Macros see only their arguments (not the render context), so callers pass
  e.g. `name=kernel_name, params=params`.

  Whitespace convention (the generated source must stay byte-stable):
  - `kernel_entry` and `feature_map` start at column 0: their output has no
    leading or trailing newline; call them as `{{ m::x(...) }}` on a line of
    their own.
  - The others emit lines inside a function body: their output starts with a
    newline and has no trailing one; call them as `{{- m::x(...) }}` at the
    start of a line (the `-` eats the preceding newline, as `{%- if %}` does).
  - `notes=true` adds the explanatory comments only the tensor-core softmax
    template prints.
-#}

{#- Kernel signature from `params` (Vec<KernelParam>) and the dynamic
    shared-memory declaration that opens every kernel body. #}
{% macro kernel_entry(name, params, bounds, smem="unsigned char smem_raw") -%}
extern "C" __global__ void __launch_bounds__({{ bounds }}) {{ name }}(
{%- for p in params %}
    {{ p.c_type }} {{ p.name }}{% if not loop.last %},{% endif %}  // {{ p.doc }}
{%- endfor %}
) {
    extern __shared__ __align__(16) {{ smem }}[];
{%- endmacro kernel_entry %}

{#- Chunkwise feature map phi / psi (`map` is not "identity"). #}
{% macro feature_map(name, map) -%}
__device__ __forceinline__ float {{ name }}(float x) {
{%- if map == "elu1" %}
    // exp2f (one ex2.approx) instead of expf's range-reduced sequence: the
    // map is applied to every loaded q/k element.
    return x > 0.f ? x + 1.f : exp2f(x * 1.4426950408889634f);
{%- elif map == "relu" %}
    return fmaxf(x, 0.f);
{%- else %}
    return x;
{%- endif %}
}
{%- endmacro feature_map %}

{#- Softmax: this CTA's query rows, Q/K/V base pointers (element type `t`),
    hoisted per-head constants and, with `segment`, the query block's segment
    id range [q_seg_lo, q_seg_hi]. #}
{% macro softmax_query_block(t, hoisted, segment, notes=false) %}
    const int m0 = q_begin + blockIdx.x * BLOCK_M;  // first query row of this CTA in the buffer
    const int m_valid = min(BLOCK_M, q_end - m0);
    if (m_valid <= 0) return;

    const {{ t }}* q_tile = q + ((size_t)batch_idx * q_rows + m0) * (HEADS * D) + (size_t)head * D;
    const {{ t }}* k_head = k + (size_t)batch_idx * kv_rows * (KV_HEADS * D) + (size_t)kv_head * D;
    const {{ t }}* v_head = v + (size_t)batch_idx * kv_rows * (KV_HEADS * DV) + (size_t)kv_head * DV;
{% if notes %}
    // Global positions of this CTA's queries, inclusive.
{%- endif %}
    const int i0 = q_pos0 + m0, i1 = q_pos0 + m0 + m_valid - 1;
{%- for hv in hoisted %}
    const {{ hv.c_type }} {{ hv.name }} = {{ hv.code }};  // per-head constant
{%- endfor %}
{%- if segment %}
{% if notes %}
    // Segment ids: the query block's id range decides whole key tiles.
{%- endif %}
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
{%- endif %}
{%- endmacro softmax_query_block %}

{#- Softmax: the key tiles [t_begin, t_end) that can hold a visible key, and
    the lambdas `tile_class(t)` / `next_tile(t, cls)` that classify them. #}
{% macro softmax_key_tiles(mask, segment, notes=false) %}
{% if notes %}
    // Key tiles: tile t covers buffer rows [kv_begin + t * BLOCK_N, ...), clipped to kv_end.
    // Visit only the tiles that can hold a visible key.
{%- endif %}
    const mixc::KeyRange keys = {{ mask.key_range }};
    const long long lo = mixc::lmax((long long)kv_begin, keys.lo - k_pos0);
    const long long hi = mixc::lmin((long long)kv_end, keys.hi - k_pos0);
    const int t_begin = (int)((lo - kv_begin) / BLOCK_N);
    const int t_end = hi > lo ? (int)((hi - kv_begin + BLOCK_N - 1) / BLOCK_N) : t_begin;
{% if notes %}
    // Class of tile t (uniform over the CTA; contains barriers for segment masks).
{%- endif %}
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
{%- if notes %}
        // Keys past kv_end in a ragged last tile must be masked out.
{%- endif %}
        if (cls == mixc::FULL && n_valid < BLOCK_N) cls = mixc::PARTIAL;
        return cls;
    };
{%- if notes %}
    // First tile >= t that is not skipped (t_end when none).
{%- endif %}
    auto next_tile = [&](int t, int& cls) -> int {
        for (; t < t_end; ++t) {
            cls = tile_class(t);
            if (cls != mixc::SKIP) return t;
        }
        return t_end;
    };
{%- endmacro softmax_key_tiles %}

{#- Softmax: one raw score `dot` (q.k) of the pair (pos_i, pos_j) to the
    base-2 logit `x`: scale, bias and transform fused, then the mask test in
    masked tiles. `in_bounds` says the key row exists; `seg_i` (optional) is a
    statement that defines seg_i there; `s_pre` (optional) names the score
    before the transform (what the backward's transform derivative reads). Written at the SIMT kernel's
    indentation; the tensor-core kernel indents it further (`indent` filter).
    The bias, transform and an expression mask's predicate may read `head`,
    `batch_idx`, `seq_len` and the hoisted per-CTA values: every caller has
    them in scope. #}
{% macro softmax_score(dot, x, in_bounds, score_expr, bias, transform, mask, segment, seg_i="", s_pre="", notes=false) %}
{%- if score_expr %}
            float s = {{ dot }} * SCALE;
{%- if bias %}
            s += {{ bias }};
{%- endif %}
{%- if transform %}
{%- if s_pre %}
            const float {{ s_pre }} = s;
{%- endif %}
            s = {{ transform }};
{%- endif %}
            float {{ x }} = s * mixc::LOG2E;
{%- else %}
            float {{ x }} = {{ dot }} * SCALE_LOG2;
{%- endif %}
            if (masked) {
{%- if segment %}
{%- if seg_i %}
                {{ seg_i }}
{%- endif %}
{%- if notes %}
                // Keys past kv_end (ragged tail) may lie past the id array.
{%- endif %}
                const int seg_j = {{ in_bounds }} ? __ldg(seg_b + pos_j) : mixc::INT_LO;
{%- endif %}
                const bool visible = {{ in_bounds }} && {{ mask.predicate }};
                if (!visible) {{ x }} = -mixc::inf();
            }
{%- endmacro softmax_score %}

{#- Convolution: this CTA's query rows [i0, i_end), head h, value columns from
    n0 (the launch grid of lower_conv.rs) and the filter `filt` of length
    filter_len. #}
{% macro conv_block(filter) %}
    const int i0 = blockIdx.x * BLOCK_M;
    const int h = blockIdx.y / DV_BLOCKS, n0 = (blockIdx.y % DV_BLOCKS) * BDV;
    const int b = blockIdx.z, kvh = h / KV_GROUP;
    const int filter_len = seq_len;
    const int i_end = min(q_rows, i0 + BLOCK_M);
    const float* filt = {{ filter }};
{%- endmacro conv_block %}
