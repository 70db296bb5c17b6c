{#-
  The CUDA backend's own helper kernels (rendered once by
  `mixc_codegen::helper_kernels()`, compiled by NVRTC once per arch):
  - `merge` kernels, one per storage type (`dtypes`: `kernel`, the symbol, and
    `c_type`): the log-sum-exp merge of a softmax partial into the f32
    accumulator. `rows` is the accumulator's row count; rows
    `[row_begin, row_end)` merge.
  - `fill_kernel`: the accumulator reset (every element to -inf).
  Rust names the kernels; this file says how they work.
-#}
#include <cuda_fp16.h>
#include <cuda_bf16.h>
namespace {
__device__ __forceinline__ float mixc_ld(const float* p) { return *p; }
__device__ __forceinline__ float mixc_ld(const __half* p) { return __half2float(*p); }
__device__ __forceinline__ float mixc_ld(const __nv_bfloat16* p) { return __bfloat162float(*p); }

// acc (o over the keys seen so far, normalised, and its row lse) absorbs a
// partial over disjoint keys: lse = logaddexp(la, lb), o = (oa wa + ob wb) / (wa + wb).
// A partial row with lse = -inf saw no key and changes nothing.
template <typename T>
__device__ void merge_lse(float* __restrict__ acc_o, float* __restrict__ acc_lse,
                          const T* __restrict__ part_o, const float* __restrict__ part_lse,
                          int batch, int rows, int heads, int dv, int row_begin, int row_end) {
    const int span = row_end - row_begin;
    if (span <= 0) return;
    const long long n = (long long)batch * heads * span;
    const float neg_inf = -__int_as_float(0x7f800000);
    for (long long idx = (long long)blockIdx.x * blockDim.x + threadIdx.x; idx < n;
         idx += (long long)gridDim.x * blockDim.x) {
        const int r = row_begin + (int)(idx % span);
        const long long bh = idx / span;
        const int h = (int)(bh % heads), b = (int)(bh / heads);
        const size_t li = ((size_t)b * heads + h) * rows + r;
        const float lb = part_lse[li];
        if (lb == neg_inf) continue;
        const float la = acc_lse[li];
        const float m = fmaxf(la, lb);
        const float wa = expf(la - m), wb = expf(lb - m);
        const float inv = 1.0f / (wa + wb);
        const size_t oi = (((size_t)b * rows + r) * heads + h) * dv;
        for (int c = 0; c < dv; ++c)
            acc_o[oi + c] = (acc_o[oi + c] * wa + mixc_ld(part_o + oi + c) * wb) * inv;
        acc_lse[li] = m + logf(wa + wb);
    }
}
}  // namespace

#define MIXC_MERGE(NAME, T)                                                                  \
    extern "C" __global__ void NAME(float* __restrict__ acc_o, float* __restrict__ acc_lse, \
                                    const T* __restrict__ part_o,                           \
                                    const float* __restrict__ part_lse, int batch, int rows, \
                                    int heads, int dv, int row_begin, int row_end) {         \
        merge_lse<T>(acc_o, acc_lse, part_o, part_lse, batch, rows, heads, dv, row_begin,    \
                     row_end);                                                              \
    }
{% for d in dtypes -%}
MIXC_MERGE({{ d.kernel }}, {{ d.c_type }})
{% endfor %}
extern "C" __global__ void {{ fill_kernel }}(float* __restrict__ p, int n) {
    const float neg_inf = -__int_as_float(0x7f800000);
    for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += gridDim.x * blockDim.x)
        p[i] = neg_inf;
}
