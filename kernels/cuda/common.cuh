#pragma once
// Small device helpers shared by the CUDA kernels (internal: included by .cu files only).
#include <cuda_runtime.h>

#include <cstdint>

namespace nibble::kernels::cuda::detail {

constexpr int kWarpSize = 32;
constexpr unsigned kFullMask = 0xffffffffu;

// Sum over the 32 lanes of a warp; every lane gets the result. All 32 lanes must call it.
template <typename T>
__device__ __forceinline__ T warp_sum(T v) {
#pragma unroll
  for (int off = kWarpSize / 2; off > 0; off /= 2) v += __shfl_xor_sync(kFullMask, v, off);
  return v;
}

// Maximum over the 32 lanes of a warp; every lane gets the result. All 32 lanes must call it.
__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
  for (int off = kWarpSize / 2; off > 0; off /= 2) v = fmaxf(v, __shfl_xor_sync(kFullMask, v, off));
  return v;
}

// Sum over the whole block; every thread gets the result. blockDim.x must be a multiple of 32 (at
// most 1024) and every thread must call it. `scratch` is __shared__ T[32]; it may be reused after
// the call returns (the trailing barrier orders the last read before any later write).
template <typename T>
__device__ __forceinline__ T block_sum(T v, T* scratch) {
  const int lane = threadIdx.x % kWarpSize;
  const int warp = threadIdx.x / kWarpSize;
  const int n_warps = blockDim.x / kWarpSize;
  v = warp_sum(v);
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  if (warp == 0) {
    T w = lane < n_warps ? scratch[lane] : T(0);
    w = warp_sum(w);
    if (lane == 0) scratch[0] = w;
  }
  __syncthreads();
  const T total = scratch[0];
  __syncthreads();
  return total;
}

// Marks a device-side input error; many threads may store the same value concurrently (benign).
__device__ __forceinline__ void raise_flag(int32_t* flag) {
  if (flag != nullptr) *reinterpret_cast<volatile int32_t*>(flag) = 1;
}

}  // namespace nibble::kernels::cuda::detail
