#pragma once
// Small device helpers shared by the CUDA kernels (internal: included by .cu files only).
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "kernels/rope.hpp"

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

// The paged KV cache slot of key position `pos` of a sequence whose block-table row is `table`: -1
// for a position at or past `limit` (outside the window being read), and -1 with the flag raised for
// a block id outside [0, num_blocks) (never read through).
__device__ __forceinline__ int64_t paged_slot(const int32_t* table, int64_t pos, int64_t limit,
                                              int64_t block_size, int64_t num_blocks, int32_t* flag) {
  if (pos >= limit) return -1;
  const int64_t blk = table[pos / block_size];
  if (blk >= 0 && blk < num_blocks) return blk * block_size + pos % block_size;
  raise_flag(flag);
  return -1;
}

// SwiGLU's value: kernels::swiglu's expression in its order. expf, not __expf: for gate << 0,
// expf(-gate) = inf and gate / inf = -0, as on the CPU. The SwiGLU kernels and the half2 GEMV's fused
// epilogue share it, so their bits agree.
__device__ __forceinline__ float silu_times(float gate, float up) { return gate / (1.0f + expf(-gate)) * up; }

// RoPE's angles (kernels::rope_angle on the device): pair i at position pos turns by the CPU's
// recurrence step for step (theta_scale = base^(-2 / rot_dims), rounded as the host rounds it), divided
// by the pair's frequency factor and times the linear scale, with YaRN's ramp between the two, each
// rounded as the CPU rounds it (kernels/rope.cpp's scaled_angle); cos_sin scales both by mscale.
struct RopeAngles {
  float theta_scale;
  kernels::RopeScaling scaling;  // freq_factors: device [rot_dims / 2] or nullptr (all 1)
  __device__ __forceinline__ float angle(int32_t pos, int i) const {
    float theta = static_cast<float>(pos);
    for (int s = 0; s < i; ++s) theta *= theta_scale;
    if (scaling.freq_factors != nullptr) theta = __fdiv_rn(theta, scaling.freq_factors[i]);
    const float interpolated = __fmul_rn(scaling.freq_scale, theta);
    if (!scaling.yarn) return interpolated;
    const float y = __fdiv_rn(__fsub_rn(static_cast<float>(i), scaling.yarn_low),
                              fmaxf(0.001f, __fsub_rn(scaling.yarn_high, scaling.yarn_low)));
    const float ramp = __fsub_rn(1.0f, fminf(1.0f, fmaxf(0.0f, y)));
    return __fmaf_rn(interpolated, __fsub_rn(1.0f, ramp), __fmul_rn(theta, ramp));
  }
  __device__ __forceinline__ void cos_sin(int32_t pos, int i, float& c, float& s) const {
    const float theta = angle(pos, i);
    c = __fmul_rn(cosf(theta), scaling.mscale);
    s = __fmul_rn(sinf(theta), scaling.mscale);
  }
};

// One rotated pair (x0, x1) by the angle whose cosine and sine are c and s: the CPU's expressions,
// explicitly rounded so that no kernel contracts them into an FMA differently.
__device__ __forceinline__ void rope_rotate(float x0, float x1, float c, float s, float& r0, float& r1) {
  r0 = __fsub_rn(__fmul_rn(x0, c), __fmul_rn(x1, s));
  r1 = __fadd_rn(__fmul_rn(x0, s), __fmul_rn(x1, c));
}

// The KV cache slot (block * block_size + offset) that the token at position pos of block-table row
// seq is written to; -1 for a negative position or sequence, a position past the table, or a block id
// outside [0, num_blocks).
__device__ __forceinline__ int64_t kv_write_slot(int32_t pos, int64_t seq, const int32_t* block_tables,
                                                 int64_t block_size, int64_t num_blocks,
                                                 int64_t max_blocks_per_seq) {
  if (pos < 0 || seq < 0 || pos / block_size >= max_blocks_per_seq) return -1;
  const int64_t blk = block_tables[seq * max_blocks_per_seq + pos / block_size];
  return blk >= 0 && blk < num_blocks ? blk * block_size + pos % block_size : -1;
}

// add_rms_norm_f32's split of an n-value row (residual_norm.cu): `parts` slices of `slice` values, a
// power of two doubled while a part would hold more than 4 values a thread of 256, at most
// kAddRmsNormMaxParts (the portable cluster size). Shared so that the one-block row below sums in the
// same pieces.
constexpr int kAddRmsNormThreads = 256;
constexpr int kAddRmsNormMaxParts = 8;
__host__ __device__ inline int add_rms_norm_parts(int64_t n) {
  int parts = 1;
  while (parts < kAddRmsNormMaxParts && parts * int64_t{kAddRmsNormThreads * 4} < n) parts *= 2;
  return parts;
}
// The shared floats add_rms_norm_row_in_block needs.
constexpr int kAddRmsNormScratch = kAddRmsNormMaxParts * kWarpSize + 1;

// add_rms_norm_f32 of one row (residual += delta; y = fp16(residual * 1 / sqrt(mean(residual^2) + eps)
// * weight)) by one block of kAddRmsNormThreads threads, with the clustered kernel's bits: each part's
// sum of squares from the same per-thread sums and the same reduction tree as block_sum (the parts'
// reductions side by side, one barrier for all), the parts' sums added in the same order, every value
// computed by the same expressions, each element by one thread in both passes. delta is read through
// L2 (__ldcg): the caller's other blocks wrote it during the same kernel. scratch: __shared__
// float[kAddRmsNormScratch]. Every thread calls it.
__device__ inline void add_rms_norm_row_in_block(float* __restrict__ residual,
                                                 const float* __restrict__ delta,
                                                 const float* __restrict__ weight, __half* __restrict__ y,
                                                 int64_t n, float eps, float* scratch) {
  const int parts = add_rms_norm_parts(n);
  const int64_t slice = (n + parts - 1) / parts;
  float sums[kAddRmsNormMaxParts];
#pragma unroll
  for (int part = 0; part < kAddRmsNormMaxParts; ++part) {
    sums[part] = 0.0f;
    if (part < parts) {
      const int64_t begin = part * slice, end = min(n, begin + slice);
#pragma unroll 4
      for (int64_t i = begin + threadIdx.x; i < end; i += kAddRmsNormThreads) {
        const float h = __fadd_rn(residual[i], __ldcg(delta + i));
        residual[i] = h;
        sums[part] = fmaf(h, h, sums[part]);
      }
    }
  }
  // block_sum of every part at once: each warp's sums, then warp 0 sums the warps' (the same tree).
  const int lane = threadIdx.x % kWarpSize, warp = threadIdx.x / kWarpSize;
  constexpr int kWarps = kAddRmsNormThreads / kWarpSize;
#pragma unroll
  for (int part = 0; part < kAddRmsNormMaxParts; ++part) {
    const float w = warp_sum(sums[part]);
    if (lane == 0) scratch[part * kWarpSize + warp] = w;
  }
  __syncthreads();
  if (warp == 0) {
    float total = 0.0f;  // the clustered kernel adds its blocks' sums in rank order from 0
    for (int part = 0; part < parts; ++part)
      total += warp_sum(lane < kWarps ? scratch[part * kWarpSize + lane] : 0.0f);
    if (lane == 0) scratch[kAddRmsNormMaxParts * kWarpSize] = total;
  }
  __syncthreads();
  const float scale = 1.0f / sqrtf(scratch[kAddRmsNormMaxParts * kWarpSize] / static_cast<float>(n) + eps);
#pragma unroll
  for (int part = 0; part < kAddRmsNormMaxParts; ++part) {  // each thread reads back the values it wrote
    if (part < parts) {
      const int64_t begin = part * slice, end = min(n, begin + slice);
#pragma unroll 4
      for (int64_t i = begin + threadIdx.x; i < end; i += kAddRmsNormThreads)
        y[i] = __float2half_rn(__fmul_rn(__fmul_rn(residual[i], scale), weight[i]));
    }
  }
}

// A warp's online-softmax step over a tile of keys (lane j holds key j's score, -inf when masked),
// the one the attention kernels share: false, state unchanged, while nothing is visible yet (uniform
// over the warp); otherwise the running max m and normalizer l are updated, w is this lane's weight
// exp(score - m) and alpha the factor every accumulator must be scaled by (0 the first time).
__device__ __forceinline__ bool online_softmax_step(float score, float& m, float& l, float& w, float& alpha) {
  const float m_new = fmaxf(m, warp_max(score));
  if (m_new == -INFINITY) return false;
  // Explicitly rounded operations, so that ptxas cannot contract them differently in different
  // kernels (prefill_attention must equal paged_attention bit for bit).
  alpha = expf(__fsub_rn(m, m_new));  // m = -inf: 0
  w = expf(__fsub_rn(score, m_new));  // masked: 0
  l = fmaf(l, alpha, warp_sum(w));
  m = m_new;
  return true;
}

}  // namespace nibble::kernels::cuda::detail
