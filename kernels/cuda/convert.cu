// Grid-stride element-wise widening; one block per gathered row. Scalar 2-byte accesses (sizes may
// be odd, pointers only 2-byte aligned).
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "kernels/cuda/common.cuh"
#include "kernels/cuda/convert.cuh"
#include "kernels/cuda/dependent_launch.cuh"
#include "kernels/cuda/launch_status.cuh"

namespace nibble::kernels::cuda {
namespace {

constexpr int kThreads = 256;
constexpr int64_t kMaxBlocks = 65536;

__global__ void __launch_bounds__(kThreads) f16_to_f32_kernel(const __half* x, float* y, int64_t n) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * kThreads;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x; i < n; i += stride)
    y[i] = __half2float(x[i]);
}

__global__ void __launch_bounds__(kThreads)
    gather_rows_kernel(const __half* src, int64_t src_rows, int64_t n_cols, const int32_t* rows, __half* dst,
                       int32_t* error_flag) {
  detail::allow_dependent_launch();  // the head's product may start (it waits for us)
  const int64_t r = blockIdx.x;
  const int64_t from = rows[r];
  __half* out = dst + r * n_cols;
  if (from < 0 || from >= src_rows) {
    if (threadIdx.x == 0) detail::raise_flag(error_flag);
    for (int64_t i = threadIdx.x; i < n_cols; i += kThreads) out[i] = __float2half_rn(0.0f);
    return;
  }
  const __half* in = src + from * n_cols;
  for (int64_t i = threadIdx.x; i < n_cols; i += kThreads) out[i] = in[i];
}

}  // namespace

Status f16_to_f32(const __half* x, float* y, int64_t n, cudaStream_t stream) {
  if (x == nullptr || y == nullptr || n < 0) return Status::invalid_argument;
  if (n == 0) return Status::ok;
  int64_t blocks = (n + kThreads - 1) / kThreads;
  if (blocks > kMaxBlocks) blocks = kMaxBlocks;
  f16_to_f32_kernel<<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(x, y, n);
  return launch_status();
}

Status gather_rows_f16(const __half* src, int64_t src_rows, int64_t n_cols, const int32_t* rows,
                       int64_t n_rows, __half* dst, int32_t* error_flag, cudaStream_t stream) {
  if (src == nullptr || rows == nullptr || dst == nullptr) return Status::invalid_argument;
  if (src_rows < 0 || n_cols < 1 || n_rows < 0 || n_rows > INT32_MAX) return Status::invalid_argument;
  if (n_rows == 0) return Status::ok;
  gather_rows_kernel<<<static_cast<unsigned>(n_rows), kThreads, 0, stream>>>(src, src_rows, n_cols, rows, dst,
                                                                             error_flag);
  return launch_status();
}

}  // namespace nibble::kernels::cuda
