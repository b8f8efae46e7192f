// One block per (token, head): the token's cos/sin table is built in shared memory exactly as in
// rope.cu (the CPU's recurrence, step for step), then the block's threads rotate the head's pairs (a
// q head, or a k head and copy the v head of the same index), rounding each value to fp16 once.
// One block per token (its 64 + 8 heads in a loop of 128 threads, 64-bit index arithmetic) took ~31
// us a layer for a single decode token on an H200: one SM doing the work of 72. Scalar 2-byte stores:
// head_dim may be odd in principle and the rows are only 2-byte aligned in general.
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cmath>

#include "kernels/cuda/common.cuh"
#include "kernels/cuda/dependent_launch.cuh"
#include "kernels/cuda/launch_status.cuh"
#include "kernels/cuda/rope_kv_write.cuh"
#include "kernels/rope.hpp"

namespace nibble::kernels::cuda {
namespace {

constexpr int kThreads = 128;
constexpr int64_t kMaxRotDims = 1024;

struct Params {
  const float* q;
  const float* k;
  const float* v;
  const int32_t* token_pos;
  const int32_t* token_seq;
  const int32_t* block_tables;
  __half* q_out;
  __half* k_cache;
  __half* v_cache;
  int32_t* error_flag;
  int64_t n_head, n_head_kv, head_dim, q_stride, kv_stride, block_size, num_blocks, max_blocks_per_seq;
  int half_rot;
  detail::RopeAngles rope;
};

// Rotates one head (head_dim floats at `in`) into `out` (fp16); the dims past rot_dims are copied.
__device__ __forceinline__ void rotate_head(const float* __restrict__ in, __half* __restrict__ out,
                                            int head_dim, int half_rot, const float* cos_t,
                                            const float* sin_t) {
  for (int d = threadIdx.x; d < head_dim; d += kThreads) {
    if (d < 2 * half_rot) {
      if (d % 2 != 0) continue;  // the pair's even element does both
      const int i = d / 2;
      float r0, r1;
      detail::rope_rotate(in[d], in[d + 1], cos_t[i], sin_t[i], r0, r1);
      out[d] = __float2half_rn(r0);
      out[d + 1] = __float2half_rn(r1);
    } else {
      out[d] = __float2half_rn(in[d]);
    }
  }
}

// Block (t, h): token t's head h, a q head for h < n_head, else k head h - n_head with the v head of
// the same index.
__global__ void __launch_bounds__(kThreads) rope_kv_write_kernel(Params p) {
  __shared__ float cos_t[kMaxRotDims / 2];
  __shared__ float sin_t[kMaxRotDims / 2];
  __shared__ int64_t slot_s;
  detail::wait_for_prior_grids();    // q, k and v come from the projection before us
  detail::allow_dependent_launch();  // attention may start (it waits for us)
  const int64_t t = blockIdx.x;
  const int64_t head = blockIdx.y;
  const int32_t pos = p.token_pos[t];
  for (int i = threadIdx.x; i < p.half_rot; i += kThreads) {
    p.rope.cos_sin(pos, i, cos_t[i], sin_t[i]);
  }
  const bool is_q = head < p.n_head;
  if (threadIdx.x == 0 && !is_q) {
    const int64_t slot = detail::kv_write_slot(pos, p.token_seq[t], p.block_tables, p.block_size,
                                               p.num_blocks, p.max_blocks_per_seq);
    if (slot < 0) detail::raise_flag(p.error_flag);
    slot_s = slot;
  }
  __syncthreads();

  const int head_dim = static_cast<int>(p.head_dim);
  if (is_q) {
    rotate_head(p.q + t * p.q_stride + head * head_dim, p.q_out + (t * p.n_head + head) * head_dim, head_dim,
                p.half_rot, cos_t, sin_t);
    return;
  }
  const int64_t slot = slot_s;
  if (slot < 0) return;  // uniform over the block
  const int64_t kv_head = head - p.n_head;
  const int64_t kv_dim = p.n_head_kv * p.head_dim;
  rotate_head(p.k + t * p.kv_stride + kv_head * head_dim, p.k_cache + slot * kv_dim + kv_head * head_dim,
              head_dim, p.half_rot, cos_t, sin_t);
  const float* vr = p.v + t * p.kv_stride + kv_head * head_dim;
  __half* vc = p.v_cache + slot * kv_dim + kv_head * head_dim;
  for (int d = threadIdx.x; d < head_dim; d += kThreads) vc[d] = __float2half_rn(vr[d]);
}

detail::RopeAngles rope_angles(const RopeKvWriteShape& s) {
  return {kernels::rope_theta_scale(s.rope_base, s.rot_dims), s.rope_scaling};
}

}  // namespace

bool rope_kv_heads_and_cache_valid(const RopeKvWriteShape& s) {
  if (s.n_head < 1 || s.n_head_kv < 1 || s.head_dim < 1) return false;
  // The grid's y dimension holds every head (at most 65535); head offsets are int.
  if (s.n_head + s.n_head_kv > 65535 || s.head_dim > (int64_t{1} << 20)) return false;
  if (s.rot_dims < 2 || s.rot_dims > s.head_dim || s.rot_dims % 2 != 0 || s.rot_dims > kMaxRotDims)
    return false;
  const kernels::RopeScaling& r = s.rope_scaling;
  if (!(s.rope_base > 0.0f) || !(r.freq_scale > 0.0f) || !std::isfinite(r.freq_scale) || !(r.mscale > 0.0f) ||
      !std::isfinite(r.mscale) || (r.yarn && !(std::isfinite(r.yarn_low) && std::isfinite(r.yarn_high)))) {
    return false;
  }
  return s.block_size >= 1 && s.num_blocks >= 1 && s.max_blocks_per_seq >= 1;
}

Status rope_kv_write(const RopeKvWriteShape& s, const float* q, const float* k, const float* v,
                     const int32_t* token_pos, const int32_t* token_seq, const int32_t* block_tables,
                     __half* q_out, __half* k_cache, __half* v_cache, int32_t* error_flag,
                     cudaStream_t stream, bool programmatic) {
  if (q == nullptr || k == nullptr || v == nullptr || token_pos == nullptr || token_seq == nullptr ||
      block_tables == nullptr || q_out == nullptr || k_cache == nullptr || v_cache == nullptr) {
    return Status::invalid_argument;
  }
  if (!rope_kv_heads_and_cache_valid(s) || s.tokens < 0 || s.tokens > INT32_MAX)
    return Status::invalid_argument;
  if (s.q_stride < s.n_head * s.head_dim || s.kv_stride < s.n_head_kv * s.head_dim)
    return Status::invalid_argument;
  if (s.tokens == 0) return Status::ok;
  Params p{};
  p.q = q;
  p.k = k;
  p.v = v;
  p.token_pos = token_pos;
  p.token_seq = token_seq;
  p.block_tables = block_tables;
  p.q_out = q_out;
  p.k_cache = k_cache;
  p.v_cache = v_cache;
  p.error_flag = error_flag;
  p.n_head = s.n_head;
  p.n_head_kv = s.n_head_kv;
  p.head_dim = s.head_dim;
  p.q_stride = s.q_stride;
  p.kv_stride = s.kv_stride;
  p.block_size = s.block_size;
  p.num_blocks = s.num_blocks;
  p.max_blocks_per_seq = s.max_blocks_per_seq;
  p.half_rot = static_cast<int>(s.rot_dims / 2);
  p.rope = rope_angles(s);
  const dim3 grid(static_cast<unsigned>(s.tokens), static_cast<unsigned>(s.n_head + s.n_head_kv));
  const cudaError_t launched =
      detail::launch_kernel(rope_kv_write_kernel, grid, dim3(kThreads), 0, stream, programmatic, p);
  return launch_status(launched);
}

}  // namespace nibble::kernels::cuda
