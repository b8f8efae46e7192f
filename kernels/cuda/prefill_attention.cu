// Grid (tile, KV head), 4 warps of 8 query rows each; row r is token r / G and query head
// kvh * G + r % G of the tile (G = n_head / n_head_kv). The block stages the rows' q (fp16) once,
// then per key tile of 32 positions: the first warp looks up the 32 cache slots, all threads stage
// the K and V rows (rows padded to head_dim + 2 halves: an odd word stride, so lane j reading row j
// hits its own bank), and each warp updates its rows as paged_attention_f16's warp updates its one
// query: lane j scores key j, the online softmax with shuffles, lane l accumulates dims l, l + 32.
// Rows whose causal window ends before the tile skip it, as paged_attention_f16 never reaches it.
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <atomic>
#include <cmath>

#include "kernels/cuda/common.cuh"
#include "kernels/cuda/launch_status.cuh"
#include "kernels/cuda/mma.cuh"
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

// Whether tile [first, first + count) is a run: 1..tile_tokens batch tokens of one sequence at
// consecutive positions inside its table. Raises the flag where not.
__device__ bool tile_is_run(const Params& p, int64_t first, int64_t count, int64_t tile_tokens) {
  bool ok = first >= 0 && count >= 1 && count <= tile_tokens && first + count <= p.tokens;
  if (ok) {
    const int64_t seq = p.token_seq[first], pos = p.token_pos[first];
    ok = seq >= 0 && pos >= 0 && (pos + count - 1) / p.block_size < p.max_blocks_per_seq;
    for (int64_t t = 1; ok && t < count; ++t)
      ok = p.token_seq[first + t] == seq && p.token_pos[first + t] == pos + t;
  }
  if (!ok) detail::raise_flag(p.error_flag);
  return ok;
}

// Zeros what a refused tile's block would have written (its tokens inside the batch, this KV head's
// query heads), with the block's threads.
__device__ void zero_tile_out(const Params& p, int64_t first, int64_t count, int64_t tile_tokens,
                              int64_t group, int64_t kvh, int64_t head_dim) {
  const int64_t n = count < tile_tokens ? count : tile_tokens;
  const int64_t lo = first < 0 ? 0 : first;
  const int64_t hi = first + n < p.tokens ? first + n : p.tokens;
  for (int64_t t = lo; t < hi; ++t)
    for (int64_t e = threadIdx.x; e < group * head_dim; e += blockDim.x)
      p.out[(t * p.n_head + kvh * group) * head_dim + e] = __float2half_rn(0.0f);
}

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

  if (threadIdx.x == 0) tile_ok = tile_is_run(p, first, count, tile_tokens);
  __syncthreads();
  if (!tile_ok) {
    zero_tile_out(p, first, count, tile_tokens, group, kvh, HD);
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

// The tensor-core kernel (prefill_attention_mma_f16). Grid (tile, KV head), 4 warps; warp w owns query
// rows 16 w .. 16 w + 15 of the tile's 64 (row r: token r / G, query head kvh G + r % G), and lane
// 4 g + t holds rows 16 w + g and 16 w + g + 8 of every accumulator tile (mma_16816's layout).
constexpr int kMmaWarps = 4;
constexpr int kMmaThreads = kMmaWarps * kWarpSize;
constexpr int kMmaRows = static_cast<int>(kPrefillAttentionMmaRows);
constexpr int kMmaKeys = 64;  // key positions a staged chunk

template <int HD>
struct MmaLayout {
  static constexpr int kLd = HD + 8;  // halves a staged row: +16 bytes, ldmatrix's 8 rows on distinct banks
  static constexpr int kTile = kMmaRows * kLd;  // halves of one staged 64-row tile (kMmaKeys == kMmaRows)
  // q, then two buffers of (K, V), then three chunks' key slots (chunk c's in slots c % 3: found two
  // chunks ahead, so that finding them needs no barrier of its own).
  static constexpr size_t kSmemBytes = 5 * kTile * sizeof(__half) + 3 * kMmaKeys * sizeof(long long);
};
static_assert(kMmaKeys == kMmaRows, "one staged tile shape for q, K and V");

__device__ __forceinline__ uint32_t half2_bits_rn(float lo, float hi) {
  const __half2 h = __floats2half2_rn(lo, hi);
  return *reinterpret_cast<const uint32_t*>(&h);
}

template <int HD>
__global__ void __launch_bounds__(kMmaThreads) prefill_attention_mma_kernel(Params p) {
  using L = MmaLayout<HD>;
  constexpr int kLd = L::kLd, kParts = HD / 8;  // kParts: 16-byte pieces of a row
  extern __shared__ __align__(16) uint8_t smem[];
  __half* q_s = reinterpret_cast<__half*>(smem);
  __half* kv_s = q_s + L::kTile;  // buffer b: K at kv_s + 2 b kTile, V one tile after
  auto* slot_s = reinterpret_cast<long long*>(kv_s + 4 * L::kTile);  // [3][kMmaKeys]
  __shared__ int tile_ok;
  __shared__ int all_valid_s[3][2];  // per slot buffer, per finding warp: all of its 32 keys have a slot

  const int lane = threadIdx.x % kWarpSize, warp = threadIdx.x / kWarpSize;
  const int g = lane / 4, t = lane % 4;
  const int64_t group = p.n_head / p.n_head_kv;
  const int64_t tile_tokens = kMmaRows / group;
  const int64_t kvh = blockIdx.y;
  const int64_t first = p.tiles[2 * static_cast<int64_t>(blockIdx.x)];
  const int64_t count = p.tiles[2 * static_cast<int64_t>(blockIdx.x) + 1];
  if (threadIdx.x == 0) tile_ok = tile_is_run(p, first, count, tile_tokens);
  __syncthreads();
  if (!tile_ok) {
    zero_tile_out(p, first, count, tile_tokens, group, kvh, HD);
    return;
  }
  const int rows = static_cast<int>(count * group);
  const int64_t seq = p.token_seq[first];
  const int64_t pos_first = p.token_pos[first];
  const int64_t n_keys = pos_first + count;  // the last token's window: positions 0 .. n_keys - 1
  const int32_t* table = p.block_tables + seq * p.max_blocks_per_seq;
  const int64_t kv_row = p.n_head_kv * HD;  // halves per cached position

  // q: row r < rows from its token and head, rows past them zero.
  for (int e = threadIdx.x; e < kMmaRows * kParts; e += kMmaThreads) {
    const int r = e / kParts, c = e % kParts;
    const bool ok = r < rows;
    const __half* src =
        ok ? p.q + ((first + r / group) * p.n_head + kvh * group + r % group) * HD + c * 8 : p.q;
    detail::cp_async_16(q_s + r * kLd + c * 8, src, ok);
  }
  // The cache slots of chunk c's keys (threads 0..63, one key each: one table lookup and division a
  // key, not one a copy) into slot buffer c % 3: -1 for a key past the window or in a bad block (flag
  // raised), which masks it; and whether each warp's 32 keys all have one.
  const auto find_slots = [&](int64_t chunk) {
    if (threadIdx.x < kMmaKeys) {
      const int sb = static_cast<int>(chunk % 3);
      const int64_t slot = detail::paged_slot(table, chunk * kMmaKeys + threadIdx.x, n_keys, p.block_size,
                                              p.num_blocks, p.error_flag);
      slot_s[sb * kMmaKeys + threadIdx.x] = slot;
      const bool all = __all_sync(kFullMask, slot >= 0);
      if (lane == 0) all_valid_s[sb][warp] = all;
    }
  };
  // Chunk c's K and V rows into buffer buf, from its slots (found and made visible before): a key
  // without a slot is zero.
  const auto load_keys = [&](int64_t chunk, int buf) {
    __half* k_dst = kv_s + 2 * buf * L::kTile;
    __half* v_dst = k_dst + L::kTile;
    const long long* slots = slot_s + (chunk % 3) * kMmaKeys;
    for (int e = threadIdx.x; e < kMmaKeys * kParts; e += kMmaThreads) {
      const int j = e / kParts, c = e % kParts;
      const long long slot = slots[j];
      const int64_t off = slot >= 0 ? slot * kv_row + kvh * HD + c * 8 : 0;
      detail::cp_async_16(k_dst + j * kLd + c * 8, p.k_cache + off, slot >= 0);
      detail::cp_async_16(v_dst + j * kLd + c * 8, p.v_cache + off, slot >= 0);
    }
  };

  // This lane's rows, and the keys each sees (positions below keys_lo / keys_hi; 0: a row past the
  // tile's); the warp skips a chunk none of its rows sees.
  const int row0 = warp * 16, r_lo = row0 + g, r_hi = r_lo + 8;
  const int64_t keys_lo = r_lo < rows ? pos_first + r_lo / group + 1 : 0;
  const int64_t keys_hi = r_hi < rows ? pos_first + r_hi / group + 1 : 0;
  const int last_row = row0 + 15 < rows - 1 ? row0 + 15 : rows - 1;
  const int64_t warp_keys = row0 < rows ? pos_first + last_row / group + 1 : 0;
  // Keys every one of the warp's rows sees (its first row's window; 0 when a row is past the tile's):
  // a chunk of valid slots below this needs no mask.
  const int64_t warp_all_keys = row0 + 15 < rows ? pos_first + row0 / group + 1 : 0;
  const float scale_log2 = p.scale * 1.4426950408889634f;  // scores in the log2 domain: exp2f

  uint32_t qa[HD / 16][4];  // A fragments of the warp's 16 rows, 16 dimensions each
  float o[HD / 8][4];       // O: n8 tiles of dimensions
#pragma unroll
  for (int d = 0; d < HD / 8; ++d)
#pragma unroll
    for (int e = 0; e < 4; ++e) o[d][e] = 0.0f;
  float m_lo = -INFINITY, m_hi = -INFINITY;  // running maxima (log2 domain), the quad's alike
  float l_lo = 0.0f, l_hi = 0.0f;            // this lane's share of the running sums

  const int64_t n_chunks = (n_keys + kMmaKeys - 1) / kMmaKeys;
  find_slots(0);
  if (n_chunks > 1) find_slots(1);
  __syncthreads();  // chunks 0 and 1's slots visible
  load_keys(0, 0);
  detail::cp_async_commit();  // group 0: q and chunk 0
  for (int64_t chunk = 0; chunk < n_chunks; ++chunk) {
    const int buf = static_cast<int>(chunk & 1);
    if (chunk + 1 < n_chunks) {
      load_keys(chunk + 1, buf ^ 1);
      detail::cp_async_commit();
      detail::cp_async_wait<1>();
    } else {
      detail::cp_async_wait<0>();
    }
    __syncthreads();  // chunk's K and V (and q) visible to every warp
    if (chunk == 0) {
#pragma unroll
      for (int ks = 0; ks < HD / 16; ++ks)
        detail::ldmatrix_x4(qa[ks], q_s + (row0 + lane % 16) * kLd + ks * 16 + (lane / 16) * 8);
    }
    const int64_t p0 = chunk * kMmaKeys;
    if (p0 < warp_keys) {
      const __half* k_s = kv_s + 2 * buf * L::kTile;
      const __half* v_s = k_s + L::kTile;
      const int sb = static_cast<int>(chunk % 3);
      const long long* slots = slot_s + sb * kMmaKeys;
      const bool unmasked = all_valid_s[sb][0] && all_valid_s[sb][1] && p0 + kMmaKeys <= warp_all_keys;
      // S = Q K^T: 8 n8 tiles of keys; K rows as staged are the B operand's columns.
      float s[kMmaKeys / 8][4];
#pragma unroll
      for (int j = 0; j < kMmaKeys / 8; ++j)
#pragma unroll
        for (int e = 0; e < 4; ++e) s[j][e] = 0.0f;
#pragma unroll
      for (int ks = 0; ks < HD / 16; ++ks) {
#pragma unroll
        for (int np = 0; np < kMmaKeys / 16; ++np) {
          uint32_t kb[4];
          detail::ldmatrix_x4(
              kb, k_s + (np * 16 + lane % 8 + (lane / 16) * 8) * kLd + ks * 16 + ((lane / 8) % 2) * 8);
          const uint32_t b0[2] = {kb[0], kb[1]}, b1[2] = {kb[2], kb[3]};
          detail::mma_16816(s[2 * np], qa[ks], b0);
          detail::mma_16816(s[2 * np + 1], qa[ks], b1);
        }
      }
      // Mask (causal window, bad blocks; none where every key is valid and seen), scale, and the rows'
      // new maxima over the quad.
      float mx_lo = m_lo, mx_hi = m_hi;
#pragma unroll
      for (int j = 0; j < kMmaKeys / 8; ++j) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int key = 8 * j + 2 * t + (e & 1);
          const bool ok = unmasked || (slots[key] >= 0 && p0 + key < (e < 2 ? keys_lo : keys_hi));
          s[j][e] = ok ? s[j][e] * scale_log2 : -INFINITY;
          if (e < 2)
            mx_lo = fmaxf(mx_lo, s[j][e]);
          else
            mx_hi = fmaxf(mx_hi, s[j][e]);
        }
      }
#pragma unroll
      for (int offset = 1; offset < 4; offset *= 2) {
        mx_lo = fmaxf(mx_lo, __shfl_xor_sync(kFullMask, mx_lo, offset));
        mx_hi = fmaxf(mx_hi, __shfl_xor_sync(kFullMask, mx_hi, offset));
      }
      // A row that has seen nothing yet keeps m = -inf: its weights are 0 and alpha 1.
      const float alpha_lo = mx_lo == -INFINITY ? 1.0f : exp2f(m_lo - mx_lo);
      const float alpha_hi = mx_hi == -INFINITY ? 1.0f : exp2f(m_hi - mx_hi);
      m_lo = mx_lo;
      m_hi = mx_hi;
      float sum_lo = 0.0f, sum_hi = 0.0f;
#pragma unroll
      for (int j = 0; j < kMmaKeys / 8; ++j) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const float mx = e < 2 ? mx_lo : mx_hi;
          s[j][e] = mx == -INFINITY ? 0.0f : exp2f(s[j][e] - mx);  // masked: exp2(-inf) = 0
          (e < 2 ? sum_lo : sum_hi) += s[j][e];
        }
      }
      l_lo = l_lo * alpha_lo + sum_lo;
      l_hi = l_hi * alpha_hi + sum_hi;
#pragma unroll
      for (int d = 0; d < HD / 8; ++d) {
        o[d][0] *= alpha_lo;
        o[d][1] *= alpha_lo;
        o[d][2] *= alpha_hi;
        o[d][3] *= alpha_hi;
      }
      // O += P V: P's accumulator tiles are the A fragments of 16 keys at a time (rounded to fp16);
      // V as staged ([key][dimension]) read transposed into the B fragments.
#pragma unroll
      for (int kk = 0; kk < kMmaKeys / 16; ++kk) {
        const uint32_t pa[4] = {half2_bits_rn(s[2 * kk][0], s[2 * kk][1]),
                                half2_bits_rn(s[2 * kk][2], s[2 * kk][3]),
                                half2_bits_rn(s[2 * kk + 1][0], s[2 * kk + 1][1]),
                                half2_bits_rn(s[2 * kk + 1][2], s[2 * kk + 1][3])};
#pragma unroll
        for (int dp = 0; dp < HD / 16; ++dp) {
          uint32_t vb[4];
          detail::ldmatrix_x4_trans(
              vb, v_s + (kk * 16 + lane % 8 + ((lane / 8) % 2) * 8) * kLd + dp * 16 + (lane / 16) * 8);
          const uint32_t b0[2] = {vb[0], vb[1]}, b1[2] = {vb[2], vb[3]};
          detail::mma_16816(o[2 * dp], pa, b0);
          detail::mma_16816(o[2 * dp + 1], pa, b1);
        }
      }
    }
    // Chunk + 2's slots, into the buffer chunk - 1 used (its copies were issued two iterations ago, its
    // masks read before the last barrier); visible after the next one.
    if (chunk + 2 < n_chunks) find_slots(chunk + 2);
    __syncthreads();  // every warp done with buffer buf before the next iteration refills it
  }

#pragma unroll
  for (int offset = 1; offset < 4; offset *= 2) {
    l_lo += __shfl_xor_sync(kFullMask, l_lo, offset);
    l_hi += __shfl_xor_sync(kFullMask, l_hi, offset);
  }
  const float inv_lo = l_lo > 0.0f ? 1.0f / l_lo : 0.0f, inv_hi = l_hi > 0.0f ? 1.0f / l_hi : 0.0f;
#pragma unroll
  for (int half = 0; half < 2; ++half) {
    const int r = half == 0 ? r_lo : r_hi;
    if (r >= rows) continue;
    const float inv = half == 0 ? inv_lo : inv_hi;
    __half* out_row = p.out + ((first + r / group) * p.n_head + kvh * group + r % group) * HD;
#pragma unroll
    for (int d = 0; d < HD / 8; ++d) {
      reinterpret_cast<__half2*>(out_row + 8 * d + 2 * t)[0] =
          __floats2half2_rn(o[d][2 * half] * inv, o[d][2 * half + 1] * inv);
    }
  }
}

// cudaFuncSetAttribute for the kernel's dynamic shared memory, once per device.
template <int HD>
cudaError_t allow_mma_shared_memory(int device) {
  static std::atomic<uint64_t> done{0};
  const uint64_t bit = device >= 0 && device < 64 ? uint64_t{1} << device : 0;
  if (bit != 0 && (done.load(std::memory_order_acquire) & bit) != 0) return cudaSuccess;
  const cudaError_t err =
      cudaFuncSetAttribute(prefill_attention_mma_kernel<HD>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                           static_cast<int>(MmaLayout<HD>::kSmemBytes));
  if (err == cudaSuccess) done.fetch_or(bit, std::memory_order_acq_rel);
  return err;
}

// Both launchers' argument checks, and their Params: invalid_argument for a null pointer, a shape
// they do not take (tile_tokens: the launcher's tile size for this grouping, 0 where it takes none),
// or q, k_cache, v_cache not `align`-byte aligned, out not `out_align`-byte aligned.
Status make_params(const PagedAttentionShape& s, const __half* q, const __half* k_cache,
                   const __half* v_cache, const int32_t* block_tables, const int32_t* token_seq,
                   const int32_t* token_pos, const int32_t* tiles, int64_t n_tiles, float scale, __half* out,
                   int32_t* error_flag, int64_t tile_tokens, uintptr_t align, uintptr_t out_align,
                   Params& p) {
  if (q == nullptr || k_cache == nullptr || v_cache == nullptr || block_tables == nullptr ||
      token_seq == nullptr || token_pos == nullptr || tiles == nullptr || out == nullptr) {
    return Status::invalid_argument;
  }
  if (s.tokens < 0 || s.tokens > INT32_MAX || tile_tokens == 0) return Status::invalid_argument;
  if (s.head_dim != 64 && s.head_dim != 128) return Status::invalid_argument;
  if (s.block_size < 1 || s.num_blocks < 1 || s.max_blocks_per_seq < 1) return Status::invalid_argument;
  if (n_tiles < 0 || n_tiles > INT32_MAX || s.n_head_kv > 65535) return Status::invalid_argument;
  const auto misaligned = [](const void* ptr, uintptr_t bytes) {
    return reinterpret_cast<uintptr_t>(ptr) % bytes != 0;
  };
  if (misaligned(q, align) || misaligned(k_cache, align) || misaligned(v_cache, align) ||
      misaligned(out, out_align))
    return Status::invalid_argument;
  p = Params{q,         k_cache,     v_cache,      block_tables, token_seq,
             token_pos, tiles,       out,          error_flag,   s.tokens,
             s.n_head,  s.n_head_kv, s.block_size, s.num_blocks, s.max_blocks_per_seq,
             scale};
  return Status::ok;
}

// rows / (n_head / n_head_kv), rounded down, for a valid grouping of at most `rows` query heads a KV
// head; else 0.
int64_t tile_tokens_of(int64_t n_head, int64_t n_head_kv, int64_t rows) {
  if (n_head < 1 || n_head_kv < 1 || n_head % n_head_kv != 0) return 0;
  const int64_t group = n_head / n_head_kv;
  return group <= rows ? rows / group : 0;
}

}  // namespace

int64_t prefill_attention_tile_tokens(int64_t n_head, int64_t n_head_kv) {
  return tile_tokens_of(n_head, n_head_kv, kPrefillAttentionRows);
}

Status prefill_attention_f16(const PagedAttentionShape& s, const __half* q, const __half* k_cache,
                             const __half* v_cache, const int32_t* block_tables, const int32_t* token_seq,
                             const int32_t* token_pos, const int32_t* tiles, int64_t n_tiles, float scale,
                             __half* out, int32_t* error_flag, cudaStream_t stream) {
  Params p{};
  const Status checked =
      make_params(s, q, k_cache, v_cache, block_tables, token_seq, token_pos, tiles, n_tiles, scale, out,
                  error_flag, prefill_attention_tile_tokens(s.n_head, s.n_head_kv), 4, 2, p);
  if (checked != Status::ok || n_tiles == 0) return checked;
  const dim3 grid(static_cast<unsigned>(n_tiles), static_cast<unsigned>(s.n_head_kv));
  if (s.head_dim == 64)
    prefill_attention_kernel<64><<<grid, kThreads, 0, stream>>>(p);
  else
    prefill_attention_kernel<128><<<grid, kThreads, 0, stream>>>(p);
  return launch_status();
}

int64_t prefill_attention_mma_tile_tokens(int64_t n_head, int64_t n_head_kv) {
  return tile_tokens_of(n_head, n_head_kv, kPrefillAttentionMmaRows);
}

Status prefill_attention_mma_f16(const PagedAttentionShape& s, const __half* q, const __half* k_cache,
                                 const __half* v_cache, const int32_t* block_tables, const int32_t* token_seq,
                                 const int32_t* token_pos, const int32_t* tiles, int64_t n_tiles, float scale,
                                 __half* out, int32_t* error_flag, cudaStream_t stream) {
  Params p{};
  const Status checked =
      make_params(s, q, k_cache, v_cache, block_tables, token_seq, token_pos, tiles, n_tiles, scale, out,
                  error_flag, prefill_attention_mma_tile_tokens(s.n_head, s.n_head_kv), 16, 4, p);
  if (checked != Status::ok || n_tiles == 0) return checked;
  const size_t smem = s.head_dim == 64 ? MmaLayout<64>::kSmemBytes : MmaLayout<128>::kSmemBytes;
  int device = 0, max_smem = 0;
  cudaError_t err = cudaGetDevice(&device);
  if (err == cudaSuccess)
    err = cudaDeviceGetAttribute(&max_smem, cudaDevAttrMaxSharedMemoryPerBlockOptin, device);
  if (err != cudaSuccess) return launch_status(err);
  // + the kernel's few static bytes (tile_ok, the slot flags)
  if (smem + 64 > static_cast<size_t>(max_smem)) return Status::invalid_argument;
  err = s.head_dim == 64 ? allow_mma_shared_memory<64>(device) : allow_mma_shared_memory<128>(device);
  if (err != cudaSuccess) return launch_status(err);
  const dim3 grid(static_cast<unsigned>(n_tiles), static_cast<unsigned>(s.n_head_kv));
  if (s.head_dim == 64)
    prefill_attention_mma_kernel<64><<<grid, kMmaThreads, smem, stream>>>(p);
  else
    prefill_attention_mma_kernel<128><<<grid, kMmaThreads, smem, stream>>>(p);
  return launch_status();
}

}  // namespace nibble::kernels::cuda
