// ---- extras shared by the chunkwise and convolution templates (on top of tile.cuh)
namespace mixc_cw {

template <typename U> __device__ __forceinline__ U from_float(float x);
template <> __device__ __forceinline__ __half from_float<__half>(float x) { return __float2half_rn(x); }
template <> __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) {
    return __float2bfloat16_rn(x);
}
template <> __device__ __forceinline__ float from_float<float>(float x) { return x; }

// 4 bytes global -> shared; when !valid writes zero and reads nothing.
__device__ __forceinline__ void cp_async_4(void* smem, const void* gmem, bool valid) {
    asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;\n" ::"r"(mixc::smem_addr(smem)),
                 "l"(gmem), "r"(valid ? 4 : 0));
}

// Lane offsets for ldmatrix_x4 over a 16x16 tile of a row-major shared array,
// so the four registers come out as an mma operand:
// - (a_row, a_col): A operand from storage [m][k]; with .trans, the B
//   operands of two n-tiles from storage [k][n] (b0, b1 of n-tile 0, then 1).
// - (bt_row, bt_col): B operands of two n-tiles from storage [n][k]; with
//   .trans, the A operand from storage [k][m].
__device__ __forceinline__ int a_row(int lane) { return lane & 15; }
__device__ __forceinline__ int a_col(int lane) { return (lane >> 4) << 3; }
__device__ __forceinline__ int bt_row(int lane) { return (lane & 7) + ((lane >> 4) << 3); }
__device__ __forceinline__ int bt_col(int lane) { return ((lane >> 3) & 1) << 3; }

}  // namespace mixc_cw
