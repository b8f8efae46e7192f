// One block per token. The token's cos/sin table (rot_dims / 2 entries) is built in shared memory:
// entry i follows the CPU's recurrence for i steps (at most a few dozen multiplications), which keeps
// the angle bit-identical to kernels::rope_normal. Then the block's threads rotate every (head,
// pair) of q and k. Each pair is read and written by one thread, so the in-place update has no race.
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cmath>

#include "kernels/cuda/launch_status.cuh"
#include "kernels/cuda/rope.cuh"

namespace nibble::kernels::cuda {
namespace {

constexpr int kThreads = 128;
constexpr int64_t kMaxRotDims = 1024;  // shared table size bound (Llama: 64 or 128)

__device__ __forceinline__ void rotate_heads(__half* x, int64_t n_heads, int64_t head_dim, int half_rot,
                                             const float* cos_t, const float* sin_t) {
  const int64_t pairs = n_heads * half_rot;
  for (int64_t j = threadIdx.x; j < pairs; j += kThreads) {
    const int64_t h = j / half_rot;
    const int i = static_cast<int>(j % half_rot);
    __half* p = x + h * head_dim + 2 * i;  // 2-byte aligned only when head_dim is odd: scalar accesses
    const float x0 = __half2float(p[0]);
    const float x1 = __half2float(p[1]);
    p[0] = __float2half_rn(x0 * cos_t[i] - x1 * sin_t[i]);
    p[1] = __float2half_rn(x0 * sin_t[i] + x1 * cos_t[i]);
  }
}

__global__ void __launch_bounds__(kThreads)
    rope_kernel(__half* q, int64_t n_head, __half* k, int64_t n_head_kv,
                const int32_t* __restrict__ positions, int64_t head_dim, int half_rot, float theta_scale) {
  __shared__ float cos_t[kMaxRotDims / 2];
  __shared__ float sin_t[kMaxRotDims / 2];
  const int64_t t = blockIdx.x;
  for (int i = threadIdx.x; i < half_rot; i += kThreads) {
    float theta = static_cast<float>(positions[t]);
    for (int s = 0; s < i; ++s) theta *= theta_scale;  // the CPU's recurrence, step for step
    // Full-precision cosf/sinf (no fast-math): correct range reduction for large angles.
    cos_t[i] = cosf(theta);
    sin_t[i] = sinf(theta);
  }
  __syncthreads();
  rotate_heads(q + t * n_head * head_dim, n_head, head_dim, half_rot, cos_t, sin_t);
  if (k != nullptr) rotate_heads(k + t * n_head_kv * head_dim, n_head_kv, head_dim, half_rot, cos_t, sin_t);
}

}  // namespace

Status rope_normal_f16(__half* q, int64_t n_head, __half* k, int64_t n_head_kv, const int32_t* positions,
                       int64_t tokens, int64_t head_dim, int64_t rot_dims, float base, cudaStream_t stream) {
  if (q == nullptr || positions == nullptr) return Status::invalid_argument;
  if (tokens < 0 || n_head < 1 || head_dim < 1 || !(base > 0.0f)) return Status::invalid_argument;
  if (k != nullptr && n_head_kv < 1) return Status::invalid_argument;
  if (rot_dims < 2 || rot_dims > head_dim || rot_dims % 2 != 0 || rot_dims > kMaxRotDims) {
    return Status::invalid_argument;
  }
  if (tokens > INT32_MAX) return Status::invalid_argument;
  if (tokens == 0) return Status::ok;
  // Exactly the CPU's factor (kernels::rope_normal): std::pow in float.
  const float theta_scale = std::pow(base, -2.0f / static_cast<float>(rot_dims));
  rope_kernel<<<static_cast<unsigned>(tokens), kThreads, 0, stream>>>(
      q, n_head, k, k != nullptr ? n_head_kv : 0, positions, head_dim, static_cast<int>(rot_dims / 2),
      theta_scale);
  return launch_status();
}

}  // namespace nibble::kernels::cuda
