// ---- mixc tile primitives -----------------------------------------------------
// Loads (cp.async, 16 bytes a thread), ldmatrix, mma.sync m16n8k16 with f32
// accumulation, quad reductions, conversions. Fragment layouts are the PTX
// ISA's for mma.m16n8k16: lane = 4 * g + t holds rows g and g + 8 of a
// 16-row tile and columns 2t, 2t + 1 of each 8-column slice.
#include <cuda_fp16.h>
#include <cuda_bf16.h>

{% include "mask.cuh" %}
{% include "scalar.cuh" %}

namespace mixc {

// Enumerators, not variables: kernels that never use them draw no warning.
enum : int { INT_HI = 0x7fffffff, INT_LO = -0x7fffffff - 1 };
constexpr float LOG2E = 1.4426950408889634f;
constexpr float LN2 = 0.6931471805599453f;

__device__ __forceinline__ float inf() { return __int_as_float(0x7f800000); }

// ---- conversions ----
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }
__device__ __forceinline__ float to_float(float x) { return x; }

template <typename T> __device__ __forceinline__ unsigned pack2(float lo, float hi);
template <> __device__ __forceinline__ unsigned pack2<__half>(float lo, float hi) {
    __half2 h = __floats2half2_rn(lo, hi);
    return *reinterpret_cast<unsigned*>(&h);
}
template <> __device__ __forceinline__ unsigned pack2<__nv_bfloat16>(float lo, float hi) {
    __nv_bfloat162 h = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<unsigned*>(&h);
}

// ---- quad reductions (the 4 lanes that share a row of an mma fragment) ----
__device__ __forceinline__ float quad_max(float x) {
    x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 1));
    return fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 2));
}
__device__ __forceinline__ float quad_sum(float x) {
    x += __shfl_xor_sync(0xffffffffu, x, 1);
    return x + __shfl_xor_sync(0xffffffffu, x, 2);
}

// ---- asynchronous copies (sm_80+) ----
__device__ __forceinline__ unsigned smem_addr(const void* p) {
    return static_cast<unsigned>(__cvta_generic_to_shared(p));
}
// 16 bytes global -> shared; when !valid, writes zeros and reads nothing
// (src-size 0), which is how ragged tails and padded columns become zeros.
__device__ __forceinline__ void cp_async_16(unsigned saddr, const void* gmem, bool valid) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(saddr), "l"(gmem),
                 "r"(valid ? 16 : 0));
}
__device__ __forceinline__ void cp_async_16(void* smem, const void* gmem, bool valid) {
    cp_async_16(smem_addr(smem), gmem, valid);
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N> __device__ __forceinline__ void cp_async_wait() {
    asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}

// Rows [0, ROWS) x columns [0, COLS_PAD) of a row-major global matrix (row
// stride `gstride` elements) into shared memory (row stride SSTRIDE). Rows
// >= `rows` and columns >= COLS are zero-filled. `safe` is any valid address,
// passed for zero-filled chunks so no out-of-range pointer is formed.
// Thread c copies chunks c, c + NTHREADS, ...: when NTHREADS is a multiple
// of the chunks per row, its column is fixed and its row steps by a
// compile-time amount, so each copy is a base plus constant offsets (the
// per-chunk div/mod and address conversions of a generic loop were ~40% of
// a softmax kernel's instructions).
// `cols` lowers the column bound at run time (a CTA's slice of d_v).
template <typename T, int ROWS, int COLS, int COLS_PAD, int SSTRIDE, int NTHREADS>
__device__ __forceinline__ void load_tile_async(T* smem, const T* gmem, size_t gstride, int rows,
                                                const T* safe, int cols = COLS) {
    constexpr int EPC = 16 / sizeof(T);  // elements per 16-byte chunk
    constexpr int CHUNKS = COLS_PAD / EPC;
    if constexpr (NTHREADS % CHUNKS == 0) {
        constexpr int RSTEP = NTHREADS / CHUNKS;
        constexpr int ITERS = (ROWS + RSTEP - 1) / RSTEP;
        const int r0 = threadIdx.x / CHUNKS, col = (threadIdx.x % CHUNKS) * EPC;
        const unsigned s0 = smem_addr(smem + r0 * SSTRIDE + col);
        const T* g = gmem + (size_t)r0 * gstride + col;
        const size_t gstep = (size_t)RSTEP * gstride;
        const bool col_ok = col < COLS && col < cols;
#pragma unroll
        for (int i = 0; i < ITERS; ++i) {
            const int r = r0 + i * RSTEP;
            if (ROWS % RSTEP == 0 || r < ROWS) {
                const bool valid = col_ok && r < rows;
                cp_async_16(s0 + i * RSTEP * SSTRIDE * (int)sizeof(T), valid ? g : safe, valid);
            }
            g += gstep;
        }
    } else {
        for (int c = threadIdx.x; c < ROWS * CHUNKS; c += NTHREADS) {
            const int r = c / CHUNKS, col = (c % CHUNKS) * EPC;
            const bool valid = r < rows && col < COLS && col < cols;
            cp_async_16(smem_addr(smem + r * SSTRIDE + col), valid ? gmem + (size_t)r * gstride + col : safe,
                        valid);
        }
    }
}

// ---- tensor-core fragments ----
// By 32-bit shared address (hot loops add constant offsets to a lane base)...
__device__ __forceinline__ void ldmatrix_x4(unsigned (&r)[4], unsigned saddr) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 { %0, %1, %2, %3 }, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(saddr));
}
__device__ __forceinline__ void ldmatrix_x4_trans(unsigned (&r)[4], unsigned saddr) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 { %0, %1, %2, %3 }, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(saddr));
}
// ...or by pointer.
__device__ __forceinline__ void ldmatrix_x4(unsigned (&r)[4], const void* smem) { ldmatrix_x4(r, smem_addr(smem)); }
__device__ __forceinline__ void ldmatrix_x4_trans(unsigned (&r)[4], const void* smem) {
    ldmatrix_x4_trans(r, smem_addr(smem));
}

// c += a * b for a 16x16 (row) by 16x8 (col) tile, f32 accumulators.
template <typename T>
__device__ __forceinline__ void mma_16816(float (&c)[4], const unsigned (&a)[4], unsigned b0, unsigned b1);
template <>
__device__ __forceinline__ void mma_16816<__half>(float (&c)[4], const unsigned (&a)[4], unsigned b0,
                                                  unsigned b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 { %0, %1, %2, %3 }, { %4, %5, %6, %7 }, "
        "{ %8, %9 }, { %0, %1, %2, %3 };\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}
template <>
__device__ __forceinline__ void mma_16816<__nv_bfloat16>(float (&c)[4], const unsigned (&a)[4],
                                                         unsigned b0, unsigned b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 { %0, %1, %2, %3 }, { %4, %5, %6, %7 }, "
        "{ %8, %9 }, { %0, %1, %2, %3 };\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

}  // namespace mixc
