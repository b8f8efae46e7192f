// Grid (tile, KV head), 4 warps of 8 query rows each; row r is token r / G and query head
// kvh * G + r % G of the tile (G = n_head / n_head_kv). The block stages the rows' q (fp16) once,
// then per key tile of 32 positions: the first warp looks up the 32 cache slots, all threads stage
// the K and V rows (rows padded to head_dim + 2 halves: an odd word stride, so lane j reading row j
// hits its own bank), and each warp updates its rows as paged_attention_f16's warp updates its one
// query: lane j scores key j, the online softmax with shuffles, lane l accumulates dims l, l + 32.
// Rows whose causal window ends before the tile skip it, as paged_attention_f16 never reaches it.
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cmath>

#include "kernels/cuda/common.cuh"
#include "kernels/cuda/launch_status.cuh"
#include "kernels/cuda/prefill_attention.cuh"

namespace nibble::kernels::cuda {
namespace {

using detail::kFullMask;
using detail::kWarpSize;

constexpr int kWarps = 4;
constexpr int kThreads = kWarps * kWarpSize;
constexpr int kRows = static_cast<int>(kPrefillAttentionRows);
constexpr int kRowsPerWarp = kRows / kWarps;
constexpr int kKeys = kWarpSize;  // key positions per staged tile

struct Params {
  const __half* q;
  const __half* k_cache;
  const __half* v_cache;
  const int32_t* block_tables;
  const int32_t* token_seq;
  const int32_t* token_pos;
  const int32_t* tiles;
  __half* out;
  int32_t* error_flag;
  int64_t tokens, n_head, n_head_kv, block_size, num_blocks, max_blocks_per_seq;
  float scale;
};

template <int HD>
__global__ void __launch_bounds__(kThreads) prefill_attention_kernel(Params p) {
  constexpr int kPerLane = HD / kWarpSize;
  constexpr int kLd = HD + 2;
  __shared__ __align__(16) __half q_s[kRows][HD];
  __shared__ __align__(16) __half k_s[kKeys][kLd];
  __shared__ __align__(16) __half v_s[kKeys][kLd];
  __shared__ long long slot_s[kKeys];
  __shared__ int tile_ok;

  const int lane = threadIdx.x % kWarpSize;
  const int warp = threadIdx.x / kWarpSize;
  const int64_t group = p.n_head / p.n_head_kv;
  const int64_t tile_tokens = kRows / group;
  const int64_t kvh = blockIdx.y;
  const int64_t first = p.tiles[2 * static_cast<int64_t>(blockIdx.x)];
  const int64_t count = p.tiles[2 * static_cast<int64_t>(blockIdx.x) + 1];
  const int64_t kv_row = p.n_head_kv * HD;  // halves per cached position

  if (threadIdx.x == 0) {
    bool ok = first >= 0 && count >= 1 && count <= tile_tokens && first + count <= p.tokens;
    if (ok) {
      const int64_t seq = p.token_seq[first], pos = p.token_pos[first];
      ok = seq >= 0 && pos >= 0 && (pos + count - 1) / p.block_size < p.max_blocks_per_seq;
      for (int64_t t = 1; ok && t < count; ++t)
        ok = p.token_seq[first + t] == seq && p.token_pos[first + t] == pos + t;
    }
    if (!ok) detail::raise_flag(p.error_flag);
    tile_ok = ok;
  }
  __syncthreads();
  if (!tile_ok) {  // zero what this block would have written, within the batch
    const int64_t lo = first < 0 ? 0 : first;
    const int64_t hi = first + (count < tile_tokens ? count : tile_tokens) < p.tokens
                           ? first + (count < tile_tokens ? count : tile_tokens)
                           : p.tokens;
    for (int64_t t = lo; t < hi; ++t)
      for (int64_t e = threadIdx.x; e < group * HD; e += kThreads)
        p.out[(t * p.n_head + kvh * group) * HD + e] = __float2half_rn(0.0f);
    return;
  }
  const int rows = static_cast<int>(count * group);
  const int64_t seq = p.token_seq[first];
  const int64_t pos_first = p.token_pos[first];
  const int64_t n_keys = pos_first + count;  // the last token's window: positions 0 .. pos_first + count - 1
  const int32_t* table = p.block_tables + seq * p.max_blocks_per_seq;

  for (int e = threadIdx.x; e < rows * (HD / 2); e += kThreads) {
    const int r = e / (HD / 2), c = e % (HD / 2);
    const int64_t t = first + r / group, h = kvh * group + r % group;
    reinterpret_cast<__half2*>(q_s[r])[c] =
        reinterpret_cast<const __half2*>(p.q + (t * p.n_head + h) * HD)[c];
  }

  float m[kRowsPerWarp], l[kRowsPerWarp], acc[kRowsPerWarp][kPerLane];
#pragma unroll
  for (int rr = 0; rr < kRowsPerWarp; ++rr) {
    m[rr] = -INFINITY;
    l[rr] = 0.0f;
#pragma unroll
    for (int i = 0; i < kPerLane; ++i) acc[rr][i] = 0.0f;
  }

  for (int64_t p0 = 0; p0 < n_keys; p0 += kKeys) {
    __syncthreads();  // q staged (first tile); the previous tile consumed (later ones)
    if (warp == 0) {
      slot_s[lane] = detail::paged_slot(table, p0 + lane, n_keys, p.block_size, p.num_blocks, p.error_flag);
    }
    __syncthreads();
    for (int e = threadIdx.x; e < kKeys * (HD / 2); e += kThreads) {
      const int j = e / (HD / 2), c = e % (HD / 2);
      const long long slot = slot_s[j];
      __half2 kk = __float2half2_rn(0.0f), vv = kk;
      if (slot >= 0) {
        kk = reinterpret_cast<const __half2*>(p.k_cache + slot * kv_row + kvh * HD)[c];
        vv = reinterpret_cast<const __half2*>(p.v_cache + slot * kv_row + kvh * HD)[c];
      }
      reinterpret_cast<__half2*>(k_s[j])[c] = kk;
      reinterpret_cast<__half2*>(v_s[j])[c] = vv;
    }
    __syncthreads();

    const long long my_slot = slot_s[lane];
#pragma unroll
    for (int rr = 0; rr < kRowsPerWarp; ++rr) {
      const int r = warp * kRowsPerWarp + rr;
      const int64_t n_pos = pos_first + r / group + 1;  // this row's window: positions 0 .. n_pos - 1
      if (r >= rows || p0 >= n_pos) continue;           // uniform over the warp
      float score = -INFINITY;
      if (my_slot >= 0 && p0 + lane < n_pos) {
        const auto* k2 = reinterpret_cast<const __half2*>(k_s[lane]);
        float dot = 0.0f;
#pragma unroll 8
        for (int d = 0; d < HD / 2; ++d) {
          const float2 kk = __half22float2(k2[d]);
          dot = fmaf(__half2float(q_s[r][2 * d]), kk.x, dot);
          dot = fmaf(__half2float(q_s[r][2 * d + 1]), kk.y, dot);
        }
        score = __fmul_rn(dot, p.scale);  // never fused: the kernels must round alike
      }
      float w, alpha;
      if (!detail::online_softmax_step(score, m[rr], l[rr], w, alpha)) continue;  // nothing visible yet
#pragma unroll
      for (int i = 0; i < kPerLane; ++i) acc[rr][i] *= alpha;
      const int in_tile = n_pos - p0 < kKeys ? static_cast<int>(n_pos - p0) : kKeys;
      for (int j = 0; j < in_tile; ++j) {
        const float wj = __shfl_sync(kFullMask, w, j);
        if (slot_s[j] < 0) continue;  // uniform
#pragma unroll
        for (int i = 0; i < kPerLane; ++i)
          acc[rr][i] = fmaf(wj, __half2float(v_s[j][lane + i * kWarpSize]), acc[rr][i]);
      }
    }
  }

#pragma unroll
  for (int rr = 0; rr < kRowsPerWarp; ++rr) {
    const int r = warp * kRowsPerWarp + rr;
    if (r >= rows) continue;
    const float inv = l[rr] > 0.0f ? 1.0f / l[rr] : 0.0f;
    __half* o = p.out + ((first + r / group) * p.n_head + kvh * group + r % group) * HD;
#pragma unroll
    for (int i = 0; i < kPerLane; ++i) o[lane + i * kWarpSize] = __float2half_rn(acc[rr][i] * inv);
  }
}

}  // namespace

int64_t prefill_attention_tile_tokens(int64_t n_head, int64_t n_head_kv) {
  if (n_head < 1 || n_head_kv < 1 || n_head % n_head_kv != 0) return 0;
  const int64_t group = n_head / n_head_kv;
  return group <= kPrefillAttentionRows ? kPrefillAttentionRows / group : 0;
}

Status prefill_attention_f16(const PagedAttentionShape& s, const __half* q, const __half* k_cache,
                             const __half* v_cache, const int32_t* block_tables, const int32_t* token_seq,
                             const int32_t* token_pos, const int32_t* tiles, int64_t n_tiles, float scale,
                             __half* out, int32_t* error_flag, cudaStream_t stream) {
  if (q == nullptr || k_cache == nullptr || v_cache == nullptr || block_tables == nullptr ||
      token_seq == nullptr || token_pos == nullptr || tiles == nullptr || out == nullptr) {
    return Status::invalid_argument;
  }
  if (s.tokens < 0 || s.tokens > INT32_MAX || prefill_attention_tile_tokens(s.n_head, s.n_head_kv) == 0)
    return Status::invalid_argument;
  if (s.head_dim != 64 && s.head_dim != 128) return Status::invalid_argument;
  if (s.block_size < 1 || s.num_blocks < 1 || s.max_blocks_per_seq < 1) return Status::invalid_argument;
  if (n_tiles < 0 || n_tiles > INT32_MAX || s.n_head_kv > 65535) return Status::invalid_argument;
  const auto misaligned = [](const void* ptr) { return reinterpret_cast<uintptr_t>(ptr) % 4 != 0; };
  if (misaligned(q) || misaligned(k_cache) || misaligned(v_cache)) return Status::invalid_argument;
  if (n_tiles == 0) return Status::ok;
  Params p{};
  p.q = q;
  p.k_cache = k_cache;
  p.v_cache = v_cache;
  p.block_tables = block_tables;
  p.token_seq = token_seq;
  p.token_pos = token_pos;
  p.tiles = tiles;
  p.out = out;
  p.error_flag = error_flag;
  p.tokens = s.tokens;
  p.n_head = s.n_head;
  p.n_head_kv = s.n_head_kv;
  p.block_size = s.block_size;
  p.num_blocks = s.num_blocks;
  p.max_blocks_per_seq = s.max_blocks_per_seq;
  p.scale = scale;
  const dim3 grid(static_cast<unsigned>(n_tiles), static_cast<unsigned>(s.n_head_kv));
  if (s.head_dim == 64)
    prefill_attention_kernel<64><<<grid, kThreads, 0, stream>>>(p);
  else
    prefill_attention_kernel<128><<<grid, kThreads, 0, stream>>>(p);
  return launch_status();
}

}  // namespace nibble::kernels::cuda
