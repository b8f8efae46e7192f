// Element-wise, grid-stride (swiglu_f32_to_f16: rows along the grid's y). Scalar 2-byte accesses (n may be
// odd and the pointers only 2-byte aligned); a half2 path for aligned even n would be the obvious speed-up.
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>

#include "kernels/cuda/common.cuh"
#include "kernels/cuda/dependent_launch.cuh"
#include "kernels/cuda/launch_status.cuh"
#include "kernels/cuda/swiglu.cuh"

namespace nibble::kernels::cuda {
namespace {

constexpr int kThreads = 256;
constexpr int64_t kMaxBlocks = 65536;

__global__ void __launch_bounds__(kThreads)
    swiglu_kernel(const __half* gate, const __half* up, __half* out, int64_t n) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * kThreads;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x; i < n; i += stride) {
    out[i] = __float2half_rn(detail::silu_times(__half2float(gate[i]), __half2float(up[i])));
  }
}

// Rows along the grid's y, columns along its x (grid-stride both ways): no 64-bit division an element,
// which a flat index over rows x n_ff needed (a long software sequence, per element at prefill).
__global__ void __launch_bounds__(kThreads)
    swiglu_f32_kernel(const float* gate, const float* up, int64_t in_stride, __half* out, int64_t n_ff,
                      int64_t rows) {
  detail::wait_for_prior_grids();    // gate and up come from the projection before us
  detail::allow_dependent_launch();  // the down projection may start (it waits for us)
  const int64_t column_stride = static_cast<int64_t>(gridDim.x) * kThreads;
  for (int64_t r = blockIdx.y; r < rows; r += gridDim.y) {
    const float* gate_row = gate + r * in_stride;
    const float* up_row = up + r * in_stride;
    __half* out_row = out + r * n_ff;
    for (int64_t c = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x; c < n_ff; c += column_stride)
      out_row[c] = __float2half_rn(detail::silu_times(gate_row[c], up_row[c]));
  }
}

}  // namespace

Status swiglu_f32_to_f16(const float* gate, const float* up, int64_t in_stride, __half* out, int64_t rows,
                         int64_t n_ff, cudaStream_t stream, bool programmatic) {
  if (gate == nullptr || up == nullptr || out == nullptr) return Status::invalid_argument;
  if (rows < 0 || n_ff < 1 || in_stride < n_ff) return Status::invalid_argument;
  if (rows == 0) return Status::ok;
  constexpr int64_t kMaxRowBlocks = 65535;  // the grid's y limit: more rows are strided over
  const int64_t column_blocks = std::min<int64_t>((n_ff + kThreads - 1) / kThreads, kMaxBlocks);
  const int64_t row_blocks = std::min(rows, kMaxRowBlocks);
  const cudaError_t launched = detail::launch_kernel(
      swiglu_f32_kernel, dim3(static_cast<unsigned>(column_blocks), static_cast<unsigned>(row_blocks)),
      dim3(kThreads), 0, stream, programmatic, gate, up, in_stride, out, n_ff, rows);
  return launch_status(launched);
}

Status swiglu_f16(const __half* gate, const __half* up, __half* out, int64_t n, cudaStream_t stream) {
  if (gate == nullptr || up == nullptr || out == nullptr || n < 0) return Status::invalid_argument;
  if (n == 0) return Status::ok;
  int64_t blocks = (n + kThreads - 1) / kThreads;
  if (blocks > kMaxBlocks) blocks = kMaxBlocks;
  swiglu_kernel<<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(gate, up, out, n);
  return launch_status();
}

}  // namespace nibble::kernels::cuda
