// One block per row: a strided pass accumulates the sum of squares in fp32 (after the optional
// residual add, which is written back), a block reduction gives the scale, a second strided pass
// writes the output. Element i is touched by the same thread in both passes, which is what makes the
// documented aliasing (y == x, y == residual) safe.
// Performance idea (not needed yet): 16-byte vector loads when n % 8 == 0, and keeping the row in
// registers/shared memory between the passes instead of re-reading it (from L1/L2).
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "kernels/cuda/common.cuh"
#include "kernels/cuda/launch_status.cuh"
#include "kernels/cuda/rms_norm.cuh"

namespace nibble::kernels::cuda {
namespace {

constexpr int kThreads = 256;

__global__ void __launch_bounds__(kThreads)
    rms_norm_kernel(const __half* x, __half* residual, const float* __restrict__ weight, __half* y, int64_t n,
                    float eps) {
  __shared__ float scratch[detail::kWarpSize];
  const int64_t row_off = static_cast<int64_t>(blockIdx.x) * n;
  const __half* xr = x + row_off;
  __half* rr = residual != nullptr ? residual + row_off : nullptr;
  __half* yr = y + row_off;

  float sum_sq = 0.0f;
  for (int64_t i = threadIdx.x; i < n; i += kThreads) {
    float h = __half2float(xr[i]);
    if (rr != nullptr) {
      const __half hs = __float2half_rn(h + __half2float(rr[i]));
      rr[i] = hs;
      h = __half2float(hs);
    }
    sum_sq = fmaf(h, h, sum_sq);
  }
  sum_sq = detail::block_sum(sum_sq, scratch);
  // Same formula as kernels::rms_norm: 1 / sqrt(mean + eps), IEEE division and square root.
  const float scale = 1.0f / sqrtf(sum_sq / static_cast<float>(n) + eps);

  for (int64_t i = threadIdx.x; i < n; i += kThreads) {
    const float h = __half2float(rr != nullptr ? rr[i] : xr[i]);
    yr[i] = __float2half_rn(h * scale * weight[i]);
  }
}

}  // namespace

Status rms_norm_f16(const __half* x, __half* residual, const float* weight, __half* y, int64_t rows,
                    int64_t n, float eps, cudaStream_t stream) {
  if (x == nullptr || weight == nullptr || y == nullptr) return Status::invalid_argument;
  if (rows < 0 || n < 1 || !(eps >= 0.0f)) return Status::invalid_argument;
  if (rows > INT32_MAX) return Status::invalid_argument;  // grid x: at most 2^31 - 1 blocks
  if (rows == 0) return Status::ok;
  rms_norm_kernel<<<static_cast<unsigned>(rows), kThreads, 0, stream>>>(x, residual, weight, y, n, eps);
  return launch_status();
}

}  // namespace nibble::kernels::cuda
