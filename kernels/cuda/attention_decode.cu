// Pass 1, split_kernel: grid (split, KV head, sequence), 4 warps. The block stages its query rows
// (n_q queries × the group of query heads sharing this KV head, row r = query (r / group), head
// (r % group)) in shared memory, then walks its split's positions in tiles of 32: the tile's K and
// V rows are gathered through the block table into shared memory, and each warp updates its rows'
// online softmax: lane j scores position j, the warp reduces max and sum with shuffles, and lane l
// accumulates output dims [l * D/32, (l+1) * D/32). Row r belongs to warp r % 4 (its RPW rows are
// compile-time, so the accumulators stay in registers). Every warp-level branch depends only on the
// warp's row, so shuffles always run with all 32 lanes.
//
// Pass 2, combine_kernel: grid (query head, sequence), one warp per query: m = max m_s,
// out = Σ e^(m_s - m) o_s / Σ e^(m_s - m) l_s over the sequence's splits. With counters (one per
// sequence and KV head, zero at rest), pass 2 runs in pass 1 instead: each block that wrote partials
// counts itself in after a fence, and the last of its sequence's splits for that KV head combines its
// rows with the same code and resets the counter (the threadFenceReduction pattern of the CUDA
// samples): one launch a layer fewer, the same bits. With one split (every
// context up to the split size) pass 1 writes out = o / l itself and pass 2 is not launched: the
// same bits, since pass 2 would compute e^0 = 1, l_sum = fma(1, l, 0) = l and acc = fma(1, o, 0) = o.
//
// The next tile's K and V rows are loaded into registers while the block works on the current one
// (then stored to shared memory behind the barrier that ends it): one tile's load latency a split,
// not one a tile. Performance ideas (not needed for correctness): keep q in registers, tensor-core
// mma for q·K and P·V when rows >= 16.
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>
#include <type_traits>

#include "kernels/cuda/attention_decode.cuh"
#include "kernels/cuda/common.cuh"
#include "kernels/cuda/dependent_launch.cuh"
#include "kernels/cuda/kv_cache_blocks.cuh"
#include "kernels/cuda/kv_cache_quant.cuh"
#include "kernels/cuda/launch_status.cuh"

namespace nibble::kernels::cuda {
namespace {

using detail::kFullMask;
using detail::kWarpSize;

constexpr int kWarps = 4;
constexpr int kThreads = kWarps * kWarpSize;
constexpr int kTile = 32;               // positions per shared-memory tile (one per lane)
constexpr int64_t kTargetBlocks = 264;  // ~2 blocks per H100 SM when choosing the split size
constexpr int64_t kMinAutoSplit = 256;  // auto splits never go below this many positions

struct Params {
  const __half* q;
  const __half* k_cache;
  const __half* v_cache;
  const int32_t* block_tables;
  const int32_t* seq_lens;
  const int32_t* query_start;
  const int32_t* query_end;  // null: sequence s ends where s + 1 starts
  __half* out;
  // Each split's partials by query slot (sequence s's query qi: s * max_q_len + qi, query_slots =
  // n_seqs * max_q_len of them), not by token: the runs may be a few of a long batch's tokens.
  float* o_part;       // [n_splits, query_slots, n_head, head_dim]
  float2* ml_part;     // [n_splits, query_slots, n_head]: running max m and sum l
  unsigned* counters;  // [n_seqs, n_head_kv] or null (see the top)
  int32_t* error_flag;
  int64_t tokens, max_q_len, n_head, n_head_kv, block_size, num_blocks, max_blocks_per_seq, max_seq_len;
  int64_t split_tokens, query_slots;
  float scale;
  bool single_split;  // one split: pass 1 writes `out` (see the top)
  // attention_decode_quantized: a side whose type is not F16 is read as stored from k_bytes / v_bytes
  // (row_bytes a cached position); an F16 side from k_cache / v_cache as above.
  const uint8_t* k_bytes;
  const uint8_t* v_bytes;
  int64_t k_row_bytes, v_row_bytes;
  DType k_type, v_type;
};

struct SeqInfo {
  bool ok;         // query range usable (else nothing is written for this sequence)
  int64_t q0;      // first query token
  int n_q;         // queries
  int64_t kv_len;  // positions to attend over (clamped to what is safe to read)
};

// Both passes derive the same SeqInfo from the metadata, so they agree on splits and positions.
__device__ SeqInfo load_seq(const Params& p, int64_t s) {
  SeqInfo info{};
  const int64_t q0 = p.query_start[s];
  const int64_t q1 = p.query_end != nullptr ? p.query_end[s] : p.query_start[s + 1];
  const int64_t n_q = q1 - q0;
  if (q0 < 0 || q1 > p.tokens || n_q < 0 || n_q > p.max_q_len) {
    detail::raise_flag(p.error_flag);
    info.ok = false;
    return info;
  }
  int64_t kv_len = p.seq_lens[s];
  const int64_t cap = p.max_blocks_per_seq * p.block_size < p.max_seq_len
                          ? p.max_blocks_per_seq * p.block_size
                          : p.max_seq_len;
  if (kv_len < n_q || kv_len > cap) detail::raise_flag(p.error_flag);
  if (kv_len < 0) kv_len = 0;
  if (kv_len > cap) kv_len = cap;
  info.ok = true;
  info.q0 = q0;
  info.n_q = static_cast<int>(n_q);
  info.kv_len = kv_len;
  return info;
}

// A lane's N outputs of one (token, head) row: acc / l in fp16, zeros when l is 0 (nothing visible).
// Both passes write through this, so one split's rows from pass 1 equal pass 2's bit for bit.
template <int N>
__device__ __forceinline__ void store_output_row(__half* out, const float (&acc)[N], float l) {
  const float inv = l > 0.0f ? 1.0f / l : 0.0f;
#pragma unroll
  for (int i = 0; i < N; i += 2)
    *reinterpret_cast<__half2*>(out + i) = __floats2half2_rn(acc[i] * inv, acc[i + 1] * inv);
}

// The splits pass 1 writes partials for: those holding a position of the sequence.
__device__ int64_t splits_of(const Params& p, const SeqInfo& seq) {
  return (seq.kv_len + p.split_tokens - 1) / p.split_tokens;
}

// Pass 2 for one (token, head) row, by one warp: the row's partials (at query slot `slot`) of splits
// 0 .. n_splits - 1 combined and written (zeros when no split saw a position). Read through L2 (__ldcg): in
// pass 1 (counters) other blocks wrote them during this kernel, and L1 is not coherent.
template <int D>
__device__ void combine_row(const Params& p, int64_t n_splits, int64_t slot, int64_t token, int64_t head,
                            int lane) {
  constexpr int kPerLane = D / kWarpSize;
  float m_max = -INFINITY;
  for (int64_t sp = 0; sp < n_splits; ++sp)
    m_max = fmaxf(m_max, __ldcg(&p.ml_part[(sp * p.query_slots + slot) * p.n_head + head]).x);
  float acc[kPerLane];
#pragma unroll
  for (int i = 0; i < kPerLane; ++i) acc[i] = 0.0f;
  float l_sum = 0.0f;
  if (m_max != -INFINITY) {
    for (int64_t sp = 0; sp < n_splits; ++sp) {
      const int64_t idx = (sp * p.query_slots + slot) * p.n_head + head;
      const float2 ml = __ldcg(&p.ml_part[idx]);
      const float f = expf(ml.x - m_max);  // a split with nothing visible: e^-inf = 0
      l_sum = fmaf(f, ml.y, l_sum);
      const float* o = p.o_part + idx * D + lane * kPerLane;
#pragma unroll
      for (int i = 0; i < kPerLane; ++i) acc[i] = fmaf(f, __ldcg(o + i), acc[i]);
    }
  }
  // l_sum >= 1 whenever m_max is finite (the maximal split contributes e^0 · l >= 1).
  store_output_row(p.out + (token * p.n_head + head) * D + lane * kPerLane, acc, l_sum);
}

// One 32-value block of a quantized side (attention_decode_quantized), fetched into registers as the
// aligned words that cover it (kv_quant::block_words's input) and turned into fp16 behind the tile's
// barrier, so that its loads wait behind a tile's math as the fp16 chunks do.
struct RawBlock {
  uint32_t words[kv_quant::kBlockWords + 1];
  int offset;  // the block's first byte in words[0]: 0 or 2
};

// The block of `type` (block_bytes bytes) at `start` (2-byte aligned; the words up to the next 4-byte
// boundary after it are readable), or zeros for start null (a masked position).
__device__ __forceinline__ void fetch_block(const uint8_t* start, DType type, RawBlock& raw) {
#pragma unroll
  for (int i = 0; i <= kv_quant::kBlockWords; ++i) raw.words[i] = 0;
  raw.offset = 0;
  if (start == nullptr) return;
  raw.offset = static_cast<int>(reinterpret_cast<uintptr_t>(start) & 3);
  const auto* aligned = reinterpret_cast<const uint32_t*>(start - raw.offset);
  const int n = kv_quant::covering_words(kv_quant::block_bytes(type), raw.offset);
#pragma unroll
  for (int i = 0; i < kv_quant::kBlockWords; ++i)
    if (i < n) raw.words[i] = __ldg(aligned + i);
}

// The block's 32 values rounded to fp16, as pairs (what kv_cache_dequantize_blocks writes into the
// working copy: the same bits); zeros for a masked position (never -0: the fp16 path's zeros).
__device__ __forceinline__ void block_to_half2(const RawBlock& raw, DType type, bool masked,
                                               uint32_t (&pairs)[kQK4_0 / 2]) {
  if (masked) {
#pragma unroll
    for (int i = 0; i < kQK4_0 / 2; ++i) pairs[i] = 0;
    return;
  }
  uint32_t words[kv_quant::kBlockWords];
  kv_quant::block_words(raw.words, raw.offset, words);
  float values[kQK4_0];
  kv_quant::dequantize_words(type, words, values);
#pragma unroll
  for (int i = 0; i < kQK4_0 / 2; ++i)
    pairs[i] = w4a16::half2_bits(__floats2half2_rn(values[2 * i], values[2 * i + 1]));
}

// How split_kernel reads the cache's two sides (attention_decode_quantized): both fp16, both quantized
// (the quantized paths alone: ~80 registers at one row a warp), or each as its type says (llama.cpp's
// K-only quantization: one side fp16, the other quantized).
enum class Sides { fp16, quantized, mixed };

// Blocks an SM must hold: none asked (0: the compiler's choice; 1 would change its registers) but for
// mixed sides at up to 4 rows a warp, where it took 168 registers (3 blocks an SM) and fits 128 (4
// blocks) without spilling (ptxas -v, sm_90); more rows a warp spill there.
template <int RPW, Sides kSides>
constexpr int kSplitMinBlocks = (kSides == Sides::mixed && RPW <= 4) ? 4 : 0;

template <int D, int RPW, Sides kSides>
__global__ void __launch_bounds__(kThreads, kSplitMinBlocks<RPW, kSides>) split_kernel(Params p) {
  constexpr int kRows = kWarps * RPW;
  constexpr int kKStride = D + 2;  // halves; odd 32-bit word stride: lane j's K row hits bank (j + w) % 32
  constexpr int kPerLane = D / kWarpSize;
  constexpr int kChunks = D / 8;  // 16-byte chunks per head row
  static_assert(kPerLane == 2 || kPerLane == 4, "head_dim 64 or 128");

  __shared__ __align__(16) __half q_s[kRows * D];
  __shared__ __align__(16) __half k_s[kTile * kKStride];
  __shared__ __align__(16) __half v_s[kTile * D];
  __shared__ int64_t slot_s[kTile];  // physical cache row (block * block_size + offset), -1: masked

  detail::wait_for_prior_grids();  // q and the cache rows come from rope_kv_write before us
  const int64_t split = blockIdx.x;
  const int64_t kvh = blockIdx.y;
  const int64_t s = blockIdx.z;
  const int tid = threadIdx.x;
  const int lane = tid % kWarpSize;
  const int warp = tid / kWarpSize;

  const SeqInfo seq = load_seq(p, s);
  if (!seq.ok) return;  // uniform over the block
  const int64_t kv_begin = split * p.split_tokens;
  // Beyond this sequence: pass 2 does not read this split. (One split still writes its zero rows, and
  // split 0 is counted in when there are counters, so that an empty sequence's rows are combined.)
  if (kv_begin >= seq.kv_len && !p.single_split && (split > 0 || p.counters == nullptr)) return;
  const int64_t kv_end = kv_begin + p.split_tokens < seq.kv_len ? kv_begin + p.split_tokens : seq.kv_len;
  const int group = static_cast<int>(p.n_head / p.n_head_kv);
  const int n_rows = seq.n_q * group;  // <= kRows: the launcher sized RPW from max_q_len * group

  // Stage the query rows (zeros past n_rows).
  for (int c = tid; c < kRows * kChunks; c += kThreads) {
    const int r = c / kChunks;
    const int part = c % kChunks;
    uint4 v = make_uint4(0, 0, 0, 0);
    if (r < n_rows) {
      const int64_t token = seq.q0 + r / group;
      const int64_t head = kvh * group + r % group;
      v = *reinterpret_cast<const uint4*>(p.q + (token * p.n_head + head) * D + part * 8);
    }
    *reinterpret_cast<uint4*>(q_s + r * D + part * 8) = v;
  }

  float m[RPW], l[RPW], acc[RPW][kPerLane];
#pragma unroll
  for (int rr = 0; rr < RPW; ++rr) {
    m[rr] = -INFINITY;
    l[rr] = 0.0f;
#pragma unroll
    for (int i = 0; i < kPerLane; ++i) acc[rr][i] = 0.0f;
  }

  const int32_t* table = p.block_tables + s * p.max_blocks_per_seq;
  const int64_t kv_row = p.n_head_kv * D;  // halves per cached position
  // The next tile's K and V rows of this KV head, gathered through the block table into registers
  // (chunk c = tid + i * kThreads of the tile: position c / kChunks, 16 bytes c % kChunks) while the
  // block works on the current tile, so that a tile's loads wait behind the previous tile's math
  // rather than the block waiting for them. Masked positions get zeros (never garbage: 0 * NaN).
  constexpr int kLoads = kTile * kChunks / kThreads;
  static_assert(kLoads * kThreads == kTile * kChunks, "whole chunks a thread");
  // A position's kChunks chunks go to kChunks consecutive lanes (kThreads and the warp are multiples of
  // kChunks): the first of them looks its cache row up (one block-table read and division a position)
  // and shares it.
  static_assert(kWarpSize % kChunks == 0 && kThreads % kChunks == 0, "a position's chunks in one warp");
  const int part = tid % kChunks;
  uint4 k_next[kLoads], v_next[kLoads];
  int64_t slot_next[kLoads];  // position (tid + i kThreads) / kChunks's cache row, -1: masked
  // A quantized side: thread tid < kTile * kUnits takes block tid % kUnits of this KV head's row at
  // position tid / kUnits of the tile (the first of a position's kUnits lanes looks its row up).
  constexpr int kUnits = D / kQK4_0;
  static_assert(kWarpSize % kUnits == 0 && kTile * kUnits <= kThreads, "a position's blocks in one warp");
  const bool k_quant = kSides == Sides::quantized || (kSides == Sides::mixed && p.k_type != DType::F16);
  const bool v_quant = kSides == Sides::quantized || (kSides == Sides::mixed && p.v_type != DType::F16);
  // Mixed sides are one fp16 and one quantized (the launcher's rule): k_next and k_raw then hold
  // whichever side each is, as two of each live took the kernel to 168-254 registers.
  constexpr bool kOneOfEach = kSides == Sides::mixed;
  const int unit_j = tid / kUnits, unit = tid % kUnits;
  const bool has_unit = tid < kTile * kUnits;
  RawBlock k_raw, v_raw;
  int64_t unit_slot = -1;
  const auto fetch = [&](int64_t t0) {
    if (!k_quant || !v_quant) {
#pragma unroll
      for (int i = 0; i < kLoads; ++i) {
        const int j = (tid + i * kThreads) / kChunks;
        int64_t slot = -1;
        if (part == 0)
          slot = detail::paged_slot(table, t0 + j, kv_end, p.block_size, p.num_blocks, p.error_flag);
        slot = __shfl_sync(kFullMask, slot, 0, kChunks);
        slot_next[i] = slot;
        k_next[i] = v_next[i] = make_uint4(0, 0, 0, 0);
        if (slot >= 0) {
          const int64_t off = slot * kv_row + kvh * D + part * 8;
          if (kOneOfEach) {
            k_next[i] = __ldg(reinterpret_cast<const uint4*>((k_quant ? p.v_cache : p.k_cache) + off));
          } else {
            if (!k_quant) k_next[i] = __ldg(reinterpret_cast<const uint4*>(p.k_cache + off));
            if (!v_quant) v_next[i] = __ldg(reinterpret_cast<const uint4*>(p.v_cache + off));
          }
        }
      }
    }
    if (k_quant || v_quant) {  // uniform over the block
      int64_t slot = -1;
      if (has_unit && unit == 0)
        slot = detail::paged_slot(table, t0 + unit_j, kv_end, p.block_size, p.num_blocks, p.error_flag);
      slot = __shfl_sync(kFullMask, slot, 0, kUnits);
      unit_slot = has_unit ? slot : -1;
      const int64_t block = kvh * kUnits + unit;  // of the position's row
      if (kOneOfEach) {
        const uint8_t* bytes = k_quant ? p.k_bytes : p.v_bytes;
        const int64_t row_bytes = k_quant ? p.k_row_bytes : p.v_row_bytes;
        const DType type = k_quant ? p.k_type : p.v_type;
        fetch_block(
            unit_slot < 0 ? nullptr : bytes + unit_slot * row_bytes + block * kv_quant::block_bytes(type),
            type, k_raw);
      } else if (k_quant) {
        fetch_block(unit_slot < 0
                        ? nullptr
                        : p.k_bytes + unit_slot * p.k_row_bytes + block * kv_quant::block_bytes(p.k_type),
                    p.k_type, k_raw);
      }
      if (v_quant && !kOneOfEach) {
        fetch_block(unit_slot < 0
                        ? nullptr
                        : p.v_bytes + unit_slot * p.v_row_bytes + block * kv_quant::block_bytes(p.v_type),
                    p.v_type, v_raw);
      }
    }
  };
  if (kv_begin < kv_end) fetch(kv_begin);
  for (int64_t t0 = kv_begin; t0 < kv_end; t0 += kTile) {
    __syncthreads();  // the previous tile is consumed (and, first time, q_s is written)
    if (!k_quant || !v_quant) {
#pragma unroll
      for (int i = 0; i < kLoads; ++i) {
        const int j = (tid + i * kThreads) / kChunks;
        if (!k_quant) {
          // K row stride is D + 2 halves (4-byte aligned, not 16): four 4-byte stores.
          auto* kd = reinterpret_cast<unsigned*>(k_s + j * kKStride + part * 8);
          kd[0] = k_next[i].x;
          kd[1] = k_next[i].y;
          kd[2] = k_next[i].z;
          kd[3] = k_next[i].w;
          if (part == 0) slot_s[j] = slot_next[i];
        }
        if (!v_quant) *reinterpret_cast<uint4*>(v_s + j * D + part * 8) = kOneOfEach ? k_next[i] : v_next[i];
      }
    }
    if ((k_quant || v_quant) && has_unit) {
      uint32_t pairs[kQK4_0 / 2];
      if (k_quant) {
        block_to_half2(k_raw, p.k_type, unit_slot < 0, pairs);
        auto* kd = reinterpret_cast<uint32_t*>(k_s + unit_j * kKStride + unit * kQK4_0);
#pragma unroll
        for (int i = 0; i < kQK4_0 / 2; ++i) kd[i] = pairs[i];
        if (unit == 0) slot_s[unit_j] = unit_slot;
      }
      if (v_quant) {
        block_to_half2(kOneOfEach ? k_raw : v_raw, p.v_type, unit_slot < 0, pairs);
        auto* vd = reinterpret_cast<uint4*>(v_s + unit_j * D + unit * kQK4_0);
#pragma unroll
        for (int i = 0; i < kQK4_0 / 8; ++i)
          vd[i] = make_uint4(pairs[4 * i], pairs[4 * i + 1], pairs[4 * i + 2], pairs[4 * i + 3]);
      }
    }
    __syncthreads();
    if (t0 + kTile < kv_end) fetch(t0 + kTile);  // uniform over the block

    const int64_t my_pos = t0 + lane;
    const bool pos_ok = my_pos < kv_end && slot_s[lane] >= 0;
#pragma unroll
    for (int rr = 0; rr < RPW; ++rr) {
      const int r = warp + rr * kWarps;
      if (r >= n_rows) continue;  // uniform over the warp
      const int64_t q_pos = seq.kv_len - seq.n_q + r / group;
      float score = -INFINITY;
      if (pos_ok && my_pos <= q_pos) {
        const auto* q2 = reinterpret_cast<const __half2*>(q_s + r * D);
        const auto* k2 = reinterpret_cast<const __half2*>(k_s + lane * kKStride);
        float dot = 0.0f;
#pragma unroll 8
        for (int d = 0; d < D / 2; ++d) {
          const float2 a = __half22float2(q2[d]);
          const float2 b = __half22float2(k2[d]);
          dot = fmaf(a.x, b.x, dot);
          dot = fmaf(a.y, b.y, dot);
        }
        score = __fmul_rn(dot, p.scale);  // never fused: the kernels must round alike
      }
      float w, alpha;
      if (!detail::online_softmax_step(score, m[rr], l[rr], w, alpha)) continue;  // nothing visible yet
#pragma unroll
      for (int i = 0; i < kPerLane; ++i) acc[rr][i] *= alpha;
      // Only the tile's positions this query may see (uniform over the warp): a later draft
      // position whose fp16 V is inf would otherwise turn 0 * inf into NaN here.
      const int visible = static_cast<int>(min(static_cast<int64_t>(kTile), min(q_pos + 1, kv_end) - t0));
#pragma unroll 4
      for (int j = 0; j < visible; ++j) {
        const float wj = __shfl_sync(kFullMask, w, j);
        const auto* v2 = reinterpret_cast<const __half2*>(v_s + j * D + lane * kPerLane);
#pragma unroll
        for (int i = 0; i < kPerLane / 2; ++i) {
          const float2 v = __half22float2(v2[i]);
          acc[rr][2 * i] = fmaf(wj, v.x, acc[rr][2 * i]);
          acc[rr][2 * i + 1] = fmaf(wj, v.y, acc[rr][2 * i + 1]);
        }
      }
    }
  }

  // One split: the final rows, as combine_kernel would write them from it. Otherwise the partials of
  // every row of this split, including rows that saw no position (m = -inf, l = 0).
  detail::allow_dependent_launch();  // the combine or the output projection may start (it waits for us)
#pragma unroll
  for (int rr = 0; rr < RPW; ++rr) {
    const int r = warp + rr * kWarps;
    if (r >= n_rows) continue;
    const int64_t token = seq.q0 + r / group;
    const int64_t head = kvh * group + r % group;
    if (p.single_split) {
      store_output_row(p.out + (token * p.n_head + head) * D + lane * kPerLane, acc[rr], l[rr]);
      continue;
    }
    const int64_t idx = (split * p.query_slots + s * p.max_q_len + r / group) * p.n_head + head;
    float* o = p.o_part + idx * D + lane * kPerLane;
#pragma unroll
    for (int i = 0; i < kPerLane; ++i) o[i] = acc[rr][i];
    if (lane == 0) p.ml_part[idx] = make_float2(m[rr], l[rr]);
  }
  if (p.single_split || p.counters == nullptr) return;
  // Pass 2 here: the last of the sequence's splits (at least split 0) for this KV head combines.
  __shared__ bool last_s;
  __threadfence();  // this block's partials are visible device-wide before it is counted
  __syncthreads();
  if (tid == 0) {
    const int64_t counted = max(int64_t{1}, splits_of(p, seq));
    unsigned* counter = p.counters + s * p.n_head_kv + kvh;
    last_s = atomicAdd(counter, 1u) == static_cast<unsigned>(counted - 1);
    if (last_s) atomicExch(counter, 0u);  // zero at rest: no other block of this call counts here again
  }
  __syncthreads();
  if (!last_s) return;  // uniform over the block
  __threadfence();
  for (int r = warp; r < n_rows; r += kWarps)
    combine_row<D>(p, splits_of(p, seq), s * p.max_q_len + r / group, seq.q0 + r / group,
                   kvh * group + r % group, lane);
}

template <int D>
__global__ void __launch_bounds__(kThreads) combine_kernel(Params p) {
  detail::wait_for_prior_grids();    // the partials come from split_kernel before us
  detail::allow_dependent_launch();  // the output projection may start (it waits for us)
  const int64_t head = blockIdx.x;
  const int64_t s = blockIdx.y;
  const int lane = threadIdx.x % kWarpSize;
  const int warp = threadIdx.x / kWarpSize;
  const SeqInfo seq = load_seq(p, s);
  if (!seq.ok) return;
  for (int qi = warp; qi < seq.n_q; qi += kWarps)
    combine_row<D>(p, splits_of(p, seq), s * p.max_q_len + qi, seq.q0 + qi, head, lane);
}

struct Plan {
  int64_t split_tokens;
  int64_t n_splits;
};

Plan make_plan(const DecodeAttentionShape& s) {
  Plan plan{};
  plan.split_tokens = s.split_tokens;
  if (plan.split_tokens == 0) {
    const int64_t base = s.n_seqs * s.n_head_kv > 0 ? s.n_seqs * s.n_head_kv : 1;
    const int64_t want_splits = (kTargetBlocks + base - 1) / base;
    int64_t per = (s.max_seq_len + want_splits - 1) / want_splits;
    per = (per + kTile - 1) / kTile * kTile;
    plan.split_tokens = per < kMinAutoSplit ? kMinAutoSplit : per;
  }
  plan.n_splits = s.max_seq_len > 0 ? (s.max_seq_len + plan.split_tokens - 1) / plan.split_tokens : 1;
  return plan;
}

bool shape_ok(const DecodeAttentionShape& s) {
  if (s.n_seqs < 0 || s.tokens < 0 || s.max_q_len < 1 || s.n_head < 1 || s.n_head_kv < 1) return false;
  if (s.n_head % s.n_head_kv != 0) return false;
  if (s.head_dim != 64 && s.head_dim != 128) return false;
  if (s.block_size < 1 || s.num_blocks < 1 || s.max_blocks_per_seq < 1 || s.max_seq_len < 0) return false;
  if (s.split_tokens < 0 || s.split_tokens % kTile != 0) return false;
  if (s.max_q_len * (s.n_head / s.n_head_kv) > kAttentionMaxRowsPerKvHead) return false;
  // Grid limits (y, z at most 65535; x at most 2^31 - 1) and int32 metadata.
  if (s.n_seqs > 65535 || s.n_head_kv > 65535 || s.n_head > 65535 || s.tokens > INT32_MAX) return false;
  if (s.max_seq_len > INT32_MAX) return false;
  return true;
}

template <int D, int RPW, Sides kSides>
cudaError_t launch_split(const Params& prm, const Plan& plan, int64_t n_head_kv, int64_t n_seqs,
                         cudaStream_t stream, bool programmatic) {
  const dim3 grid(static_cast<unsigned>(plan.n_splits), static_cast<unsigned>(n_head_kv),
                  static_cast<unsigned>(n_seqs));
  return detail::launch_kernel(split_kernel<D, RPW, kSides>, grid, dim3(kThreads), 0, stream, programmatic,
                               prm);
}

template <int D, Sides kSides>
cudaError_t launch_split_rows(int rpw, const Params& prm, const Plan& plan, int64_t n_head_kv, int64_t n_seqs,
                              cudaStream_t stream, bool programmatic) {
  if (rpw <= 1) return launch_split<D, 1, kSides>(prm, plan, n_head_kv, n_seqs, stream, programmatic);
  if (rpw <= 2) return launch_split<D, 2, kSides>(prm, plan, n_head_kv, n_seqs, stream, programmatic);
  if (rpw <= 4) return launch_split<D, 4, kSides>(prm, plan, n_head_kv, n_seqs, stream, programmatic);
  if (rpw <= 8) return launch_split<D, 8, kSides>(prm, plan, n_head_kv, n_seqs, stream, programmatic);
  return launch_split<D, 16, kSides>(prm, plan, n_head_kv, n_seqs, stream, programmatic);
}

// Both entry points after their own argument checks: prm holds the caches; the rest is filled here.
Status launch_attention(const DecodeAttentionShape& shape, Params prm, void* workspace,
                        size_t workspace_bytes, cudaStream_t stream, bool programmatic) {
  const auto misaligned = [](const void* ptr) { return reinterpret_cast<uintptr_t>(ptr) % 16 != 0; };
  if (shape.n_seqs == 0 || shape.tokens == 0) return Status::ok;
  const size_t need = attention_decode_workspace_bytes(shape);
  if (workspace == nullptr || misaligned(workspace) || workspace_bytes < need)
    return Status::invalid_argument;
  const Plan plan = make_plan(shape);
  if (plan.n_splits > INT32_MAX) return Status::invalid_argument;

  prm.o_part = static_cast<float*>(workspace);
  prm.query_slots = shape.n_seqs * shape.max_q_len;
  const auto rows = static_cast<size_t>(plan.n_splits) * static_cast<size_t>(prm.query_slots) *
                    static_cast<size_t>(shape.n_head);
  // The O partials are a multiple of 64 floats per row, so the (m, l) pairs after them are 8-byte aligned.
  prm.ml_part = reinterpret_cast<float2*>(prm.o_part + rows * static_cast<size_t>(shape.head_dim));
  prm.tokens = shape.tokens;
  prm.max_q_len = shape.max_q_len;
  prm.n_head = shape.n_head;
  prm.n_head_kv = shape.n_head_kv;
  prm.block_size = shape.block_size;
  prm.num_blocks = shape.num_blocks;
  prm.max_blocks_per_seq = shape.max_blocks_per_seq;
  prm.max_seq_len = shape.max_seq_len;
  prm.split_tokens = plan.split_tokens;
  prm.single_split = plan.n_splits == 1;

  const int64_t rows_per_kv_head = shape.max_q_len * (shape.n_head / shape.n_head_kv);
  const int rpw = static_cast<int>((rows_per_kv_head + kWarps - 1) / kWarps);
  const bool k_fp16 = prm.k_type == DType::F16, v_fp16 = prm.v_type == DType::F16;
  const Sides sides = k_fp16 && v_fp16 ? Sides::fp16 : !k_fp16 && !v_fp16 ? Sides::quantized : Sides::mixed;
  const auto split_rows = [&](auto d) {
    constexpr int kD = decltype(d)::value;
    switch (sides) {
      case Sides::fp16:
        return launch_split_rows<kD, Sides::fp16>(rpw, prm, plan, shape.n_head_kv, shape.n_seqs, stream,
                                                  programmatic);
      case Sides::quantized:
        return launch_split_rows<kD, Sides::quantized>(rpw, prm, plan, shape.n_head_kv, shape.n_seqs, stream,
                                                       programmatic);
      default:
        return launch_split_rows<kD, Sides::mixed>(rpw, prm, plan, shape.n_head_kv, shape.n_seqs, stream,
                                                   programmatic);
    }
  };
  const cudaError_t split = shape.head_dim == 64 ? split_rows(std::integral_constant<int, 64>{})
                                                 : split_rows(std::integral_constant<int, 128>{});
  if (launch_status(split) != Status::ok) return Status::device_error;
  if (prm.single_split || prm.counters != nullptr) return Status::ok;  // pass 2 ran in pass 1
  const dim3 grid2(static_cast<unsigned>(shape.n_head), static_cast<unsigned>(shape.n_seqs));
  const cudaError_t combine =
      shape.head_dim == 64
          ? detail::launch_kernel(combine_kernel<64>, grid2, dim3(kThreads), 0, stream, programmatic, prm)
          : detail::launch_kernel(combine_kernel<128>, grid2, dim3(kThreads), 0, stream, programmatic, prm);
  return launch_status(combine);
}

}  // namespace

size_t attention_decode_workspace_bytes(const DecodeAttentionShape& shape) {
  if (!shape_ok(shape)) return 0;
  const Plan plan = make_plan(shape);
  const auto rows = static_cast<size_t>(plan.n_splits) * static_cast<size_t>(shape.n_seqs * shape.max_q_len) *
                    static_cast<size_t>(shape.n_head);
  return rows * static_cast<size_t>(shape.head_dim) * sizeof(float) + rows * sizeof(float2);
}

Status attention_decode(const DecodeAttentionShape& shape, const __half* q, const __half* k_cache,
                        const __half* v_cache, const int32_t* block_tables, const int32_t* seq_lens,
                        const int32_t* query_start, float scale, __half* out, void* workspace,
                        size_t workspace_bytes, int32_t* error_flag, cudaStream_t stream, bool programmatic,
                        unsigned* combine_counters) {
  return attention_decode_quantized(shape, q, k_cache, DType::F16, v_cache, DType::F16, block_tables,
                                    seq_lens, query_start, scale, out, workspace, workspace_bytes, error_flag,
                                    stream, programmatic, combine_counters);
}

Status attention_decode_quantized(const DecodeAttentionShape& shape, const __half* q, const void* k_cache,
                                  DType k_type, const void* v_cache, DType v_type,
                                  const int32_t* block_tables, const int32_t* seq_lens,
                                  const int32_t* query_start, float scale, __half* out, void* workspace,
                                  size_t workspace_bytes, int32_t* error_flag, cudaStream_t stream,
                                  bool programmatic, unsigned* combine_counters, const int32_t* query_end) {
  if (!shape_ok(shape)) return Status::invalid_argument;
  if (q == nullptr || k_cache == nullptr || v_cache == nullptr || block_tables == nullptr ||
      seq_lens == nullptr || query_start == nullptr || out == nullptr) {
    return Status::invalid_argument;
  }
  const auto side_ok = [](DType type) { return type == DType::F16 || kv_cache_quant_type(type); };
  if (!side_ok(k_type) || !side_ok(v_type)) return Status::invalid_argument;
  // fp16: 16-byte loads; a quantized side: 4-byte words.
  const auto aligned = [](const void* ptr, uintptr_t to) {
    return reinterpret_cast<uintptr_t>(ptr) % to == 0;
  };
  if (!aligned(q, 16) || !aligned(out, 16) || !aligned(k_cache, k_type == DType::F16 ? 16 : 4) ||
      !aligned(v_cache, v_type == DType::F16 ? 16 : 4)) {
    return Status::invalid_argument;
  }
  Params prm{};
  prm.q = q;
  prm.block_tables = block_tables;
  prm.seq_lens = seq_lens;
  prm.query_start = query_start;
  prm.query_end = query_end;
  prm.out = out;
  prm.counters = combine_counters;
  prm.error_flag = error_flag;
  prm.scale = scale;
  prm.k_type = k_type;
  prm.v_type = v_type;
  const int64_t blocks_per_row = shape.n_head_kv * shape.head_dim / kQK4_0;  // head_dim 64 or 128
  if (k_type == DType::F16) {
    prm.k_cache = static_cast<const __half*>(k_cache);
  } else {
    prm.k_bytes = static_cast<const uint8_t*>(k_cache);
    prm.k_row_bytes = blocks_per_row * kv_quant::block_bytes(k_type);
  }
  if (v_type == DType::F16) {
    prm.v_cache = static_cast<const __half*>(v_cache);
  } else {
    prm.v_bytes = static_cast<const uint8_t*>(v_cache);
    prm.v_row_bytes = blocks_per_row * kv_quant::block_bytes(v_type);
  }
  return launch_attention(shape, prm, workspace, workspace_bytes, stream, programmatic);
}

}  // namespace nibble::kernels::cuda
