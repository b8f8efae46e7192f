// One block per row, as rms_norm.cu: a strided pass adds delta (written back) and accumulates the
// sum of squares in fp32, a block reduction gives the scale, a second strided pass writes y. Element
// i is read and written by the same thread in both passes.
//
// 1024 threads and unrolled passes: at decode a call has one row (llama-70b: 8192 values), so the
// whole norm is one block on one SM, and its time is the number of dependent device-memory round
// trips per thread. With 256 threads and a loop the compiler could not unroll across the
// residual's stores (the pointers might alias), an H200 took ~27 us per call, 4.3 of a 30.9 ms
// llama-70b step (docs/perf/gpu.md); 8 independent loads a thread are one round trip.
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "kernels/cuda/common.cuh"
#include "kernels/cuda/dependent_launch.cuh"
#include "kernels/cuda/residual_norm.cuh"

namespace nibble::kernels::cuda {
namespace {

constexpr int kThreads = 1024;

__global__ void __launch_bounds__(kThreads)
    add_rms_norm_kernel(float* __restrict__ residual, const float* __restrict__ delta,
                        const float* __restrict__ weight, __half* __restrict__ y, int64_t n, float eps) {
  __shared__ float scratch[detail::kWarpSize];
  detail::allow_dependent_launch();  // the matrix product that reads y may start (it waits for us)
  const int64_t row_off = static_cast<int64_t>(blockIdx.x) * n;
  float* rr = residual + row_off;
  const float* dr = delta != nullptr ? delta + row_off : nullptr;
  __half* yr = y + row_off;

  float sum_sq = 0.0f;
  if (dr != nullptr) {
#pragma unroll 8
    for (int64_t i = threadIdx.x; i < n; i += kThreads) {
      const float h = __fadd_rn(rr[i], dr[i]);
      rr[i] = h;
      sum_sq = fmaf(h, h, sum_sq);
    }
  } else {
#pragma unroll 8
    for (int64_t i = threadIdx.x; i < n; i += kThreads) {
      const float h = rr[i];
      sum_sq = fmaf(h, h, sum_sq);
    }
  }
  sum_sq = detail::block_sum(sum_sq, scratch);
  // Same formula as kernels::rms_norm: 1 / sqrt(mean + eps), IEEE division and square root.
  const float scale = 1.0f / sqrtf(sum_sq / static_cast<float>(n) + eps);
#pragma unroll 8
  for (int64_t i = threadIdx.x; i < n; i += kThreads) {
    yr[i] = __float2half_rn(__fmul_rn(__fmul_rn(rr[i], scale), weight[i]));
  }
}

}  // namespace

Status add_rms_norm_f32(float* residual, const float* delta, const float* weight, __half* y, int64_t rows,
                        int64_t n, float eps, cudaStream_t stream) {
  if (residual == nullptr || weight == nullptr || y == nullptr) return Status::invalid_argument;
  if (rows < 0 || n < 1 || !(eps >= 0.0f)) return Status::invalid_argument;
  if (rows > INT32_MAX) return Status::invalid_argument;
  if (rows == 0) return Status::ok;
  add_rms_norm_kernel<<<static_cast<unsigned>(rows), kThreads, 0, stream>>>(residual, delta, weight, y, n,
                                                                            eps);
  return cudaGetLastError() == cudaSuccess ? Status::ok : Status::device_error;
}

}  // namespace nibble::kernels::cuda
