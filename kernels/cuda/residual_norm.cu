// One block per row, as rms_norm.cu: a strided pass adds delta (written back) and accumulates the
// sum of squares in fp32, a block reduction gives the scale, a second strided pass writes y. Element
// i is read and written by the same thread in both passes.
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "kernels/cuda/common.cuh"
#include "kernels/cuda/dependent_launch.cuh"
#include "kernels/cuda/residual_norm.cuh"

namespace nibble::kernels::cuda {
namespace {

constexpr int kThreads = 256;

__global__ void __launch_bounds__(kThreads)
    add_rms_norm_kernel(float* residual, const float* delta, const float* __restrict__ weight, __half* y,
                        int64_t n, float eps) {
  __shared__ float scratch[detail::kWarpSize];
  detail::allow_dependent_launch();  // the matrix product that reads y may start (it waits for us)
  const int64_t row_off = static_cast<int64_t>(blockIdx.x) * n;
  float* rr = residual + row_off;
  const float* dr = delta != nullptr ? delta + row_off : nullptr;
  __half* yr = y + row_off;

  float sum_sq = 0.0f;
  for (int64_t i = threadIdx.x; i < n; i += kThreads) {
    float h = rr[i];
    if (dr != nullptr) {
      h = __fadd_rn(h, dr[i]);
      rr[i] = h;
    }
    sum_sq = fmaf(h, h, sum_sq);
  }
  sum_sq = detail::block_sum(sum_sq, scratch);
  // Same formula as kernels::rms_norm: 1 / sqrt(mean + eps), IEEE division and square root.
  const float scale = 1.0f / sqrtf(sum_sq / static_cast<float>(n) + eps);
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
