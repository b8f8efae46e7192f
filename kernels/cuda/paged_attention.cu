// Grid (token, group of 4 query heads), 4 warps: warp w handles query head blockIdx.y * 4 + w of
// token blockIdx.x. The warp stages its q row (fp32) in shared memory, then walks positions 0..pos
// in tiles of 32: lane j scores position tile + j (its whole K row against the broadcast q), the warp
// updates the online softmax with shuffles, and lane l accumulates output dims l, l + 32, ...
// (coalesced V reads). Every branch around a shuffle depends only on warp-uniform values.
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cmath>

#include "kernels/cuda/common.cuh"
#include "kernels/cuda/dependent_launch.cuh"
#include "kernels/cuda/launch_status.cuh"
#include "kernels/cuda/paged_attention.cuh"

namespace nibble::kernels::cuda {
namespace {

using detail::kFullMask;
using detail::kWarpSize;

constexpr int kWarps = 4;
constexpr int kThreads = kWarps * kWarpSize;
constexpr int kMaxPerLane = static_cast<int>(kPagedAttentionMaxHeadDim) / kWarpSize;

struct Params {
  const __half* q;
  const __half* k_cache;
  const __half* v_cache;
  const int32_t* block_tables;
  const int32_t* token_seq;
  const int32_t* token_pos;
  __half* out;
  int32_t* error_flag;
  int64_t n_head, n_head_kv, head_dim, block_size, num_blocks, max_blocks_per_seq;
  float scale;
};

__global__ void __launch_bounds__(kThreads) paged_attention_kernel(Params p) {
  __shared__ float q_s[kWarps][kPagedAttentionMaxHeadDim];
  detail::allow_dependent_launch();  // the output projection may start (it waits for us)
  const int lane = threadIdx.x % kWarpSize;
  const int warp = threadIdx.x / kWarpSize;
  const int64_t t = blockIdx.x;
  const int64_t h = static_cast<int64_t>(blockIdx.y) * kWarps + warp;
  if (h >= p.n_head) return;  // whole warps only; no block-wide barrier below
  const int64_t hd = p.head_dim;
  const int64_t kvh = h / (p.n_head / p.n_head_kv);
  const int64_t kv_row = p.n_head_kv * hd;  // halves per cached position
  __half* o = p.out + (t * p.n_head + h) * hd;

  const int64_t pos = p.token_pos[t];
  const int64_t seq = p.token_seq[t];
  if (pos < 0 || seq < 0 || pos / p.block_size >= p.max_blocks_per_seq) {
    if (lane == 0) detail::raise_flag(p.error_flag);
    for (int64_t d = lane; d < hd; d += kWarpSize) o[d] = __float2half_rn(0.0f);
    return;
  }
  const __half* qr = p.q + (t * p.n_head + h) * hd;
  for (int64_t d = lane; d < hd; d += kWarpSize) q_s[warp][d] = __half2float(qr[d]);
  __syncwarp();

  const int32_t* table = p.block_tables + seq * p.max_blocks_per_seq;
  const int64_t n_pos = pos + 1;
  float m = -INFINITY, l = 0.0f;
  float acc[kMaxPerLane];
#pragma unroll
  for (int i = 0; i < kMaxPerLane; ++i) acc[i] = 0.0f;

  for (int64_t p0 = 0; p0 < n_pos; p0 += kWarpSize) {
    const int64_t my_pos = p0 + lane;
    const long long slot = detail::paged_slot(table, my_pos, n_pos, p.block_size, p.num_blocks, p.error_flag);
    float score = -INFINITY;
    if (slot >= 0) {
      const auto* k2 = reinterpret_cast<const __half2*>(p.k_cache + slot * kv_row + kvh * hd);
      float dot = 0.0f;
      for (int64_t d = 0; d < hd / 2; ++d) {
        const float2 kk = __half22float2(k2[d]);
        dot = fmaf(q_s[warp][2 * d], kk.x, dot);
        dot = fmaf(q_s[warp][2 * d + 1], kk.y, dot);
      }
      score = __fmul_rn(dot, p.scale);  // never fused: the kernels must round alike
    }
    float w, alpha;
    if (!detail::online_softmax_step(score, m, l, w, alpha)) continue;  // nothing visible yet
#pragma unroll
    for (int i = 0; i < kMaxPerLane; ++i) acc[i] *= alpha;
    const int in_tile = n_pos - p0 < kWarpSize ? static_cast<int>(n_pos - p0) : kWarpSize;
    for (int j = 0; j < in_tile; ++j) {
      const float wj = __shfl_sync(kFullMask, w, j);
      const long long sj = __shfl_sync(kFullMask, slot, j);
      if (sj < 0) continue;  // uniform: every lane got lane j's slot
      const __half* vr = p.v_cache + sj * kv_row + kvh * hd;
#pragma unroll
      for (int i = 0; i < kMaxPerLane; ++i) {
        const int64_t d = lane + i * kWarpSize;
        if (d < hd) acc[i] = fmaf(wj, __half2float(vr[d]), acc[i]);
      }
    }
  }
  const float inv = l > 0.0f ? 1.0f / l : 0.0f;
#pragma unroll
  for (int i = 0; i < kMaxPerLane; ++i) {
    const int64_t d = lane + i * kWarpSize;
    if (d < hd) o[d] = __float2half_rn(acc[i] * inv);
  }
}

}  // namespace

Status paged_attention_f16(const PagedAttentionShape& s, const __half* q, const __half* k_cache,
                           const __half* v_cache, const int32_t* block_tables, const int32_t* token_seq,
                           const int32_t* token_pos, float scale, __half* out, int32_t* error_flag,
                           cudaStream_t stream) {
  if (q == nullptr || k_cache == nullptr || v_cache == nullptr || block_tables == nullptr ||
      token_seq == nullptr || token_pos == nullptr || out == nullptr) {
    return Status::invalid_argument;
  }
  if (s.tokens < 0 || s.tokens > INT32_MAX || s.n_head < 1 || s.n_head_kv < 1 || s.n_head % s.n_head_kv != 0)
    return Status::invalid_argument;
  if (s.head_dim < 2 || s.head_dim % 2 != 0 || s.head_dim > kPagedAttentionMaxHeadDim)
    return Status::invalid_argument;
  if (s.block_size < 1 || s.num_blocks < 1 || s.max_blocks_per_seq < 1) return Status::invalid_argument;
  const auto misaligned = [](const void* ptr) { return reinterpret_cast<uintptr_t>(ptr) % 4 != 0; };
  if (misaligned(q) || misaligned(k_cache) || misaligned(v_cache)) return Status::invalid_argument;
  const int64_t head_groups = (s.n_head + kWarps - 1) / kWarps;
  if (head_groups > 65535) return Status::invalid_argument;
  if (s.tokens == 0) return Status::ok;
  Params p{};
  p.q = q;
  p.k_cache = k_cache;
  p.v_cache = v_cache;
  p.block_tables = block_tables;
  p.token_seq = token_seq;
  p.token_pos = token_pos;
  p.out = out;
  p.error_flag = error_flag;
  p.n_head = s.n_head;
  p.n_head_kv = s.n_head_kv;
  p.head_dim = s.head_dim;
  p.block_size = s.block_size;
  p.num_blocks = s.num_blocks;
  p.max_blocks_per_seq = s.max_blocks_per_seq;
  p.scale = scale;
  const dim3 grid(static_cast<unsigned>(s.tokens), static_cast<unsigned>(head_groups));
  paged_attention_kernel<<<grid, kThreads, 0, stream>>>(p);
  return launch_status();
}

}  // namespace nibble::kernels::cuda
