// The half2 GEMV (w4a16_gemv_half2.cuh): design and why there.
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cmath>
#include <cstdlib>
#include <cstring>
#include <map>
#include <mutex>
#include <string>
#include <tuple>
#include <utility>

#include "kernels/cuda/common.cuh"
#include "kernels/cuda/dependent_launch.cuh"
#include "kernels/cuda/launch_status.cuh"
#include "kernels/cuda/mma.cuh"
#include "kernels/cuda/w4a16_gemv_half2.cuh"
#include "kernels/cuda/w4a16_weights.cuh"
#include "kernels/rope.hpp"

namespace nibble::kernels::cuda {
namespace {

using w4a16::Int4GroupBlocks;

constexpr int kWarpSize = 32;
constexpr int kWarps = 8;
constexpr int kThreads = kWarpSize * kWarps;
constexpr int kRowsPerWarp = 2;      // the staged activations a lane reads serve both rows
constexpr int kBatch = 4;            // units a lane loads at once, per row: 128 bytes in flight a lane
constexpr float kStagedMax = 64.0f;  // |x| bound for the fp16 sums (int4_unit_half2_dot)

// Stages the activation row for int4_unit_half2_dot / q4_k_piece_half2_dot: `entries` 16-byte words,
// word e from the inputs input_of(e) .. + 3 (the low nibbles') and input_of(e) + HiOffset .. + 3 (the
// high nibbles'), then scales them all by 2^-shift so that |x| <= kStagedMax (exact, unless a value
// goes subnormal) and returns shift, the same in every thread (the caller undoes it in fp32). Every
// thread of the block calls it; the caller's barrier after it publishes the scaled words. It is the
// kernel's first read of x, which comes from the previous kernel: it waits for that kernel first (a
// programmatic launch), and lets the next kernel's blocks be placed (they wait for this one). The caller
// issues its first weight loads before it (they never come from an earlier kernel).
template <int HiOffset, typename InputOf>
__device__ int stage_activations(const __half* __restrict__ x, unsigned entries, InputOf input_of, uint4* xs,
                                 unsigned& max_abs_bits) {
  detail::wait_for_prior_grids();
  detail::allow_dependent_launch();
  if (threadIdx.x == 0) max_abs_bits = 0;
  __syncthreads();  // max_abs_bits is 0 before any thread raises it
  unsigned local_max = 0;
  for (unsigned e = threadIdx.x; e < entries; e += blockDim.x) {
    const unsigned lo = input_of(e);
    const uint4 v = w4a16::int4_half2_staged_word(__ldg(reinterpret_cast<const uint2*>(x + lo)),
                                                  __ldg(reinterpret_cast<const uint2*>(x + lo + HiOffset)));
    xs[e] = v;
    const unsigned m2 = __vmaxu2(__vmaxu2(v.x & 0x7FFF7FFFu, v.y & 0x7FFF7FFFu),
                                 __vmaxu2(v.z & 0x7FFF7FFFu, v.w & 0x7FFF7FFFu));
    local_max = max(local_max, max(m2 & 0xFFFFu, m2 >> 16));
  }
  local_max = __reduce_max_sync(0xffffffffu, local_max);
  if (threadIdx.x % kWarpSize == 0) atomicMax(&max_abs_bits, local_max);
  __syncthreads();
  const float max_abs = __half2float(__ushort_as_half(static_cast<unsigned short>(max_abs_bits)));
  int shift = 0;
  if (max_abs > kStagedMax && max_abs <= 65504.0f) frexpf(max_abs / kStagedMax, &shift);
  if (shift > 0) {  // the same for every thread: max_abs_bits is shared
    const __half2 down = __float2half2_rn(ldexpf(1.0f, -shift));
    for (unsigned e = threadIdx.x; e < entries; e += blockDim.x) {  // the words this thread staged
      uint4 v = xs[e];
      v.x = w4a16::half2_bits(__hmul2(w4a16::bits_half2(v.x), down));
      v.y = w4a16::half2_bits(__hmul2(w4a16::bits_half2(v.y), down));
      v.z = w4a16::half2_bits(__hmul2(w4a16::bits_half2(v.z), down));
      v.w = w4a16::half2_bits(__hmul2(w4a16::bits_half2(v.w), down));
      xs[e] = v;
    }
  }
  return shift;
}

// Where a warp's two weight rows come from and where their sums go: warp w of the grid (blockIdx.x *
// kWarps + the warp) reads rows rows_of(w), clamped into the matrix (rows past the end are read again
// and not stored, so that every warp meets the block's barriers), and its lane 0 hands their sums to
// store(w, ...). Each row's sum is the same whichever row shares its warp, so every epilogue writes
// the plain GEMV's values, or what the kernel it replaces makes of them, bit for bit.
static_assert(kRowsPerWarp == 2, "the epilogues pair two rows a warp");

// The plain product: rows 2w and 2w + 1 into y: [n_out] fp32.
struct SumsOut {
  static constexpr bool kAfterBlock = false;  // after_block(): work for the whole block at the end
  int64_t n_out;
  float* __restrict__ y;
  __host__ __device__ int64_t warps() const { return (n_out + 1) / 2; }
  __device__ void rows_of(int64_t w, int64_t (&rows)[kRowsPerWarp]) const {
    rows[0] = min(2 * w, n_out - 1);
    rows[1] = min(2 * w + 1, n_out - 1);
  }
  __device__ void store(int64_t w, const float (&sums)[kRowsPerWarp]) const {
    if (2 * w < n_out) y[2 * w] = sums[0];
    if (2 * w + 1 < n_out) y[2 * w + 1] = sums[1];
  }
};

// The stacked gate / up projection ([2 n_ff, k]: gate rows, then up rows) into SwiGLU: rows w (gate)
// and n_ff + w (up), act[w] = silu(gate) up rounded to fp16 (swiglu_f32_to_f16's value). act: [n_ff].
struct SwiGluOut {
  static constexpr bool kAfterBlock = false;
  int64_t n_ff;
  __half* __restrict__ act;
  __host__ __device__ int64_t warps() const { return n_ff; }
  __device__ void rows_of(int64_t w, int64_t (&rows)[kRowsPerWarp]) const {
    rows[0] = min(w, n_ff - 1);
    rows[1] = n_ff + rows[0];
  }
  __device__ void store(int64_t w, const float (&sums)[kRowsPerWarp]) const {
    if (w < n_ff) act[w] = __float2half_rn(detail::silu_times(sums[0], sums[1]));
  }
};

// One token's stacked q / k / v projection ([q_dim + 2 kv_dim, k]) into rope_kv_write's outputs: rows
// 2w and 2w + 1 are one rotation pair of a head (head_dim is even), rotated and rounded to fp16 into
// q_out: [q_dim] or the K cache, or rounded into the V cache, at the token's slot (no slot: the flag
// is raised and nothing is written, as rope_kv_write does).
struct RopeKvOut {
  static constexpr bool kAfterBlock = false;
  int64_t q_dim, kv_dim, head_dim, rot_dims;
  detail::RopeAngles rope;
  const int32_t* token_pos;     // [1]
  const int32_t* token_seq;     // [1]
  const int32_t* block_tables;  // [n_seqs, max_blocks_per_seq]
  int64_t block_size, num_blocks, max_blocks_per_seq;
  __half* q_out;
  __half* k_cache;  // [num_blocks, block_size, kv_dim]
  __half* v_cache;
  int32_t* error_flag;
  __host__ __device__ int64_t rows() const { return q_dim + 2 * kv_dim; }
  __host__ __device__ int64_t warps() const { return rows() / 2; }
  __device__ void rows_of(int64_t w, int64_t (&r)[kRowsPerWarp]) const {
    r[0] = min(2 * w, rows() - 2);
    r[1] = r[0] + 1;
  }
  // The pair at dims d, d + 1 of its head into out[0], out[1].
  __device__ void rotate_into(float x0, float x1, int64_t d, int32_t pos, __half* out) const {
    float r0 = x0, r1 = x1;
    if (d < rot_dims) {
      float c, s;
      rope.cos_sin(pos, static_cast<int>(d / 2), c, s);
      detail::rope_rotate(x0, x1, c, s, r0, r1);
    }
    out[0] = __float2half_rn(r0);
    out[1] = __float2half_rn(r1);
  }
  __device__ void store(int64_t w, const float (&sums)[kRowsPerWarp]) const {
    const int64_t row = 2 * w;
    if (row >= rows()) return;
    const int32_t pos = token_pos[0];
    if (row < q_dim) {
      rotate_into(sums[0], sums[1], row % head_dim, pos, q_out + row);
      return;
    }
    const int64_t slot =
        detail::kv_write_slot(pos, token_seq[0], block_tables, block_size, num_blocks, max_blocks_per_seq);
    if (slot < 0) {
      detail::raise_flag(error_flag);
      return;
    }
    const int64_t j = row - q_dim;  // into [k | v]
    if (j < kv_dim) {
      rotate_into(sums[0], sums[1], j % head_dim, pos, k_cache + slot * kv_dim + j);
    } else {
      v_cache[slot * kv_dim + j - kv_dim] = __float2half_rn(sums[0]);
      v_cache[slot * kv_dim + j - kv_dim + 1] = __float2half_rn(sums[1]);
    }
  }
};

// The plain product into y, then the residual add and RMSNorm on it (add_rms_norm_f32's work, its
// bits): every block counts itself in after its rows are stored and fenced, and the last one adds y
// into the residual and norms it (the CUDA samples' threadFenceReduction pattern). One row, so the
// norm's row is the whole of y. counter: one uint32, zero at rest (the last block zeroes it).
struct SumsNormOut : SumsOut {
  static constexpr bool kAfterBlock = true;
  float* residual;      // [n_out] fp32, += y
  const float* weight;  // [n_out] the norm's weights
  __half* h;            // [n_out] fp16, the normed row
  float eps;
  unsigned* counter;
  __device__ void after_block() const {
    __shared__ bool last;
    __shared__ float scratch[detail::kAddRmsNormScratch];
    __threadfence();  // this block's rows of y are visible device-wide before it is counted
    __syncthreads();
    if (threadIdx.x == 0) {
      last = atomicAdd(counter, 1u) == gridDim.x - 1;
      if (last) atomicExch(counter, 0u);  // zero at rest: every block of this call has counted
    }
    __syncthreads();
    if (!last) return;  // uniform over the block
    __threadfence();
    detail::add_rms_norm_row_in_block(residual, y, weight, h, n_out, eps, scratch);
  }
};

// This warp's index in the grid (blocks of `warps` warps), the first argument of the epilogues'
// rows_of and store.
__device__ int64_t grid_warp(int warps = kWarps) {
  return static_cast<int64_t>(blockIdx.x) * warps + threadIdx.x / kWarpSize;
}

// A lane's walk over its row's items lane, lane + 32, ... (units, chunks or pieces; `count` in the row),
// Batch at a time: multiply(j0, guarded) on the batch loaded (guarded: the last batch, which may run past
// the row's end), then next(j0) moves on and loads the batch from item lane + 32 j0, until the lane's
// items are done.
template <int Batch, typename Multiply, typename Next>
__device__ void for_each_batch(unsigned count, Multiply&& multiply, Next&& next) {
  const unsigned per_lane = (count + kWarpSize - 1) / kWarpSize;
  for (unsigned j0 = 0;;) {
    if (kWarpSize * (j0 + Batch) <= count) {
      multiply(j0, false);
    } else {
      multiply(j0, true);
    }
    j0 += Batch;
    if (j0 >= per_lane) break;
    next(j0);
  }
}

// The warp's row sums (acc: each lane's part), times 2^shift (the staging's scale undone), to out.
template <typename Out>
__device__ void store_rows(const float (&acc)[kRowsPerWarp], int64_t warp, int shift, const Out& out) {
  const float unscale = ldexpf(1.0f, shift);
  float sums[kRowsPerWarp];
#pragma unroll
  for (int r = 0; r < kRowsPerWarp; ++r) sums[r] = detail::warp_sum(acc[r]) * unscale;
  if (threadIdx.x % kWarpSize == 0) out.store(warp, sums);
}

// The end of a block of one-block epilogues (the K-quant kernels): its rows stored, then the
// epilogue's work for the whole block, if any (every thread of the block gets here).
template <typename Out>
__device__ void store_rows_and_finish_block(const float (&acc)[kRowsPerWarp], int64_t warp, int shift,
                                            const Out& out) {
  store_rows(acc, warp, shift, out);
  if constexpr (Out::kAfterBlock) {
    static_assert(kThreads == detail::kAddRmsNormThreads, "one block of 256");
    out.after_block();
  }
}

// GroupShift: log2(group / 32), a template argument so that every offset from the pointers is an
// immediate. Out: the epilogue (SumsOut, SwiGluOut or RopeKvOut). Warps a block, Batch units a lane
// loads at once per row, and Persistent (each block takes row pairs gridDim.x * Warps apart until the
// matrix ends, so that it stages the activations once for all of them) are kWarps, kBatch and false
// but on the other block shapes of kHalf2GemvVariants (timed at load, in the kernel table too): every
// choice sums each row's units in the same order, so all give the same bits.
template <int GroupShift, typename Out, int Warps = kWarps, int Batch = kBatch, bool Persistent = false,
          int MinBlocks = 1>
__global__ void __launch_bounds__(Warps* kWarpSize, MinBlocks)
    gemv_int4_groups_half2_kernel(Int4GroupBlocks w, Out out, int64_t k, const __half* __restrict__ x) {
  // The activation row as int4_unit_half2_dot takes it, word-major so that a warp's 32 lanes (32
  // consecutive units) read 512 consecutive bytes: word i of unit u at xs[i * nb + u].
  extern __shared__ uint4 xs[];
  __shared__ unsigned max_abs_bits;  // the largest |x|'s fp16 bits
  const unsigned lane = threadIdx.x % kWarpSize;
  int64_t warp = grid_warp(Warps);
  const unsigned nb = static_cast<unsigned>(k / kQK4_0);       // k <= kW4A16GemvHalf2MaxK
  constexpr int kGroupsPerUnitStep = kWarpSize >> GroupShift;  // groups between a lane's units
  // Pointers to this lane's next units of each row, and to their scales and zeros, advanced a batch
  // at a time, so that each load is a base and an immediate offset (rows are whole groups, and a
  // batch's 32 Batch units whole groups too).
  const uint4* units[kRowsPerWarp];
  const __half* scales[kRowsPerWarp];
  const uint8_t* zeros[kRowsPerWarp];
  const auto start_rows = [&](int64_t warp_index) {  // the pointers to this warp's rows' first units
    int64_t rows[kRowsPerWarp];
    out.rows_of(warp_index, rows);
#pragma unroll
    for (int r = 0; r < kRowsPerWarp; ++r) {
      const int64_t first_unit = rows[r] * nb;
      units[r] = reinterpret_cast<const uint4*>(w.quants) + first_unit + lane;
      scales[r] = w.scales + (first_unit >> GroupShift) + (lane >> GroupShift);
      zeros[r] = w.zeros + (first_unit >> GroupShift) + (lane >> GroupShift);
    }
  };

  uint4 q[kRowsPerWarp][Batch];
  float scale[kRowsPerWarp][Batch];
  uint32_t zero[kRowsPerWarp][Batch];
  // This lane's units lane + 32 (j0 + b), b < Batch, of both rows; then the pointers move on.
  const auto load = [&](unsigned j0) {
#pragma unroll
    for (int b = 0; b < Batch; ++b) {
      const bool in_row = lane + kWarpSize * (j0 + b) < nb;
#pragma unroll
      for (int r = 0; r < kRowsPerWarp; ++r) {
        if (in_row) {
          q[r][b] = __ldg(units[r] + kWarpSize * b);
          scale[r][b] = __half2float(__ldg(scales[r] + kGroupsPerUnitStep * b));
          zero[r][b] = w4a16::int4_half2_biased_zero(__ldg(zeros[r] + kGroupsPerUnitStep * b));
        }
      }
    }
#pragma unroll
    for (int r = 0; r < kRowsPerWarp; ++r) {
      units[r] += kWarpSize * Batch;
      scales[r] += kGroupsPerUnitStep * Batch;
      zeros[r] += kGroupsPerUnitStep * Batch;
    }
    // The next batch's 512 Batch bytes of each row on its way to L2 while this one is multiplied (its
    // loads then wait on L2, not device memory, without holding registers): lanes 0 .. 4 Batch - 1
    // name a 128-byte line each.
    if (lane < 4 * Batch && kWarpSize * (j0 + Batch) + 8 * lane < nb) {
#pragma unroll
      for (int r = 0; r < kRowsPerWarp; ++r) detail::prefetch_l2(units[r] + 7 * lane);  // unit 8 lane
    }
  };
  // The weights never come from an earlier kernel: the first ones are on their way before the staging
  // waits for the kernel that wrote x.
  start_rows(warp);
  load(0);
  // Word e = i * nb + u: word i of unit u, inputs 4i .. 4i + 3 and 4i + 16 .. 4i + 19
  // (w4a16::int4_half2_staged_input).
  const int shift = stage_activations<16>(
      x, 4 * nb,
      [nb](unsigned e) {
        const unsigned i = e / nb;
        return kQK4_0 * (e - i * nb) + 4 * i;
      },
      xs, max_abs_bits);
  __syncthreads();

  for (;;) {  // once, or (Persistent) for each of the block's row pairs
    float acc[kRowsPerWarp] = {};
    const uint4* xw[4] = {xs + lane, xs + nb + lane, xs + 2 * nb + lane, xs + 3 * nb + lane};  // the 4 words
    // One batch's products; only the last batch can hold units past the row's end (guarded).
    const auto multiply = [&](unsigned j0, bool guarded) {
#pragma unroll
      for (int b = 0; b < Batch; ++b) {
        if (!guarded || lane + kWarpSize * (j0 + b) < nb) {
          const uint4 xv[4] = {xw[0][kWarpSize * b], xw[1][kWarpSize * b], xw[2][kWarpSize * b],
                               xw[3][kWarpSize * b]};
#pragma unroll
          for (int r = 0; r < kRowsPerWarp; ++r)
            acc[r] = fmaf(scale[r][b], w4a16::int4_unit_half2_dot(q[r][b], zero[r][b], xv), acc[r]);
        }
      }
    };
    for_each_batch<Batch>(nb, multiply, [&](unsigned j0) {
#pragma unroll
      for (int i = 0; i < 4; ++i) xw[i] += kWarpSize * Batch;
      load(j0);
    });
    store_rows(acc, warp, shift, out);
    if (!Persistent) break;
    warp += static_cast<int64_t>(gridDim.x) * Warps;  // no barrier below: a warp may stop on its own
    if (warp >= out.warps()) break;
    start_rows(warp);
    load(0);
  }
  if constexpr (Out::kAfterBlock) {
    static_assert(!Persistent && Warps * kWarpSize == detail::kAddRmsNormThreads, "one block of 256");
    out.after_block();  // every thread of the block gets here
  }
}

// GGUF Q4_K as stored (BlockQ4_K, 144 bytes per 256 inputs). A lane takes 64-input chunks: chunk C of
// a row is qs bytes 32c .. 32c + 31 of super-block C / 4 (c = C % 4 = lane % 4, since a lane's chunks
// are 32 apart), holding sub-blocks 2c (low nibbles) and 2c + 1 (high), two 16-byte pieces, plus the
// super-block's 16-byte header for their scales and mins (four lanes load each header: one line).
// Per sub-block: (d scale) x its fp16 sum of x (level - z), z its level nearest weight 0, plus (d scale z
// - dmin min) x its activations' sum, both in fp32 (w4a16::q4_k_chunk_half2_dot); the activations' sums
// are made once a block with the staging.
constexpr int kQ4KBatch = 2;                  // chunks a lane loads at once, per row: 96 bytes
constexpr int kQ4KSuperBlockBytes = 144;      // sizeof(BlockQ4_K)
constexpr int kQ4KChunkPlanes = 8;            // staged words a chunk: 2 pieces x 4 words
constexpr int kQ4KChunksPerStep = kWarpSize;  // a lane's chunks are 32 apart: 8 super-blocks
constexpr int kQ4KStepBytes = kQ4KChunksPerStep / 4 * kQ4KSuperBlockBytes;
static_assert(kQ4KChunksPerStep == kWarpSize, "for_each_batch steps a warp's lanes");

template <typename Out>
__global__ void __launch_bounds__(kThreads)
    gemv_q4_k_half2_kernel(const uint8_t* __restrict__ w, Out out, int64_t k, const __half* __restrict__ x) {
  // Word-major as for INT4: word p (= 4 piece + word) of chunk C at xs[p * chunks + C]; then the
  // sub-blocks' activation sums (fp32, scaled as the words are) at sums[s], s = C * 2 + 0 / 1.
  extern __shared__ uint4 xs[];
  __shared__ unsigned max_abs_bits;
  const unsigned lane = threadIdx.x % kWarpSize;
  const int64_t warp = grid_warp();
  int64_t rows[kRowsPerWarp];
  out.rows_of(warp, rows);
  const unsigned chunks = static_cast<unsigned>(k / 64);  // k <= kW4A16GemvHalf2MaxK
  const unsigned row_bytes = static_cast<unsigned>(k / kQK_K * kQ4KSuperBlockBytes);
  const unsigned c = lane % 4;        // every chunk of this lane's is chunk c of its block
  const uint8_t* next[kRowsPerWarp];  // this lane's next super-block, each row
#pragma unroll
  for (int r = 0; r < kRowsPerWarp; ++r)
    next[r] = w + rows[r] * (k / kQK_K) * kQ4KSuperBlockBytes + (lane / 4) * kQ4KSuperBlockBytes;

  uint4 head[kRowsPerWarp][kQ4KBatch], piece[kRowsPerWarp][kQ4KBatch][2];
  const auto load = [&](unsigned j0) {  // chunks lane + 32 (j0 + b) of both rows; the pointers move on
#pragma unroll
    for (int b = 0; b < kQ4KBatch; ++b) {
      const bool in_row = lane + kQ4KChunksPerStep * (j0 + b) < chunks;
#pragma unroll
      for (int r = 0; r < kRowsPerWarp; ++r) {
        if (in_row) {
          const uint8_t* block = next[r] + kQ4KStepBytes * b;
          head[r][b] = __ldg(reinterpret_cast<const uint4*>(block));
          piece[r][b][0] = __ldg(reinterpret_cast<const uint4*>(block + 16 + 32 * c));
          piece[r][b][1] = __ldg(reinterpret_cast<const uint4*>(block + 32 + 32 * c));
        }
      }
    }
#pragma unroll
    for (int r = 0; r < kRowsPerWarp; ++r) next[r] += kQ4KStepBytes * kQ4KBatch;
    // The next batch's 2304 bytes of each row on their way to L2 while this one is multiplied (as the
    // INT4 kernel does): lanes 0..17 name a 128-byte line each.
    const unsigned ahead = kQ4KStepBytes * (j0 + kQ4KBatch) + 128 * lane;  // bytes into the row
    if (lane < kQ4KStepBytes * kQ4KBatch / 128 && ahead < row_bytes) {
#pragma unroll
      for (int r = 0; r < kRowsPerWarp; ++r)
        detail::prefetch_l2(next[r] - (lane / 4) * kQ4KSuperBlockBytes + 128 * lane);
    }
  };
  load(0);  // before the staging's wait for the kernel that wrote x
  // Word e = p * chunks + C: piece h = p / 4, word i = p % 4 of chunk C: inputs 64C + 16h + 4i .. + 3
  // (low nibbles, sub-block 2C) and those + 32 (high nibbles, sub-block 2C + 1).
  const int shift = stage_activations<32>(
      x, kQ4KChunkPlanes * chunks,
      [chunks](unsigned e) {
        const unsigned p = e / chunks;
        return 64 * (e - p * chunks) + 16 * (p / 4) + 4 * (p % 4);
      },
      xs, max_abs_bits);
  auto* sums = reinterpret_cast<float*>(xs + kQ4KChunkPlanes * chunks);
  const float down = ldexpf(1.0f, -shift);
  for (unsigned sb = threadIdx.x; sb < 2 * chunks; sb += kThreads) {  // sub-block sb: inputs 32 sb ..
    const auto* in = reinterpret_cast<const uint4*>(x + kQK4_0 * sb);
    float total = 0.0f;
#pragma unroll
    for (int part = 0; part < 4; ++part) {
      const uint4 v = __ldg(in + part);
      for (const unsigned word : {v.x, v.y, v.z, v.w}) {
        const float2 f = __half22float2(w4a16::bits_half2(word));
        total += f.x + f.y;
      }
    }
    sums[sb] = total * down;
  }
  __syncthreads();

  float acc[kRowsPerWarp] = {};
  const uint4* xw = xs + lane;
  const float2* sw = reinterpret_cast<const float2*>(sums) + lane;  // (sub-block 2C, 2C + 1)
  const auto multiply = [&](unsigned j0, bool guarded) {
#pragma unroll
    for (int b = 0; b < kQ4KBatch; ++b) {
      if (!guarded || lane + kQ4KChunksPerStep * (j0 + b) < chunks) {
        uint4 xv[2][4];
#pragma unroll
        for (int p = 0; p < kQ4KChunkPlanes; ++p) xv[p / 4][p % 4] = xw[p * chunks + kQ4KChunksPerStep * b];
        const float2 x_sum = sw[kQ4KChunksPerStep * b];
#pragma unroll
        for (int r = 0; r < kRowsPerWarp; ++r)
          acc[r] = w4a16::q4_k_chunk_half2_dot(head[r][b], c, piece[r][b], xv, x_sum, acc[r]);
      }
    }
  };
  for_each_batch<kQ4KBatch>(chunks, multiply, [&](unsigned j0) {
    xw += kQ4KChunksPerStep * kQ4KBatch;
    sw += kQ4KChunksPerStep * kQ4KBatch;
    load(j0);
  });
  store_rows_and_finish_block(acc, warp, shift, out);
}

// GGUF Q6_K in planes (kernels/q6_k_planes.hpp). A lane takes 64-weight pieces lane, lane + 32, ... of
// its rows: three 16-byte loads (the low nibbles of quarters 0 / 2, of quarters 1 / 3, the high bit
// pairs), its four sub-block scales (one word) and its super-block's d (four lanes load each); each
// quarter's 16 levels are summed against their activations in fp16 (w4a16::q6_k_piece_half2_dot), then
// times d * scale in fp32.
constexpr int kQ6KBatch = 2;        // pieces a lane loads at once, per row: 104 bytes
constexpr int kQ6KPiecePlanes = 8;  // staged words a piece: 2 nibble planes x 4 words

template <typename Out>
__global__ void __launch_bounds__(kThreads)
    gemv_q6_k_half2_kernel(w4a16::Q6KPlanes w, Out out, int64_t k, const __half* __restrict__ x) {
  // Word-major as for INT4: word p of piece P at xs[p * pieces + P].
  extern __shared__ uint4 xs[];
  __shared__ unsigned max_abs_bits;
  const unsigned lane = threadIdx.x % kWarpSize;
  const int64_t warp = grid_warp();
  int64_t rows[kRowsPerWarp];
  out.rows_of(warp, rows);
  const unsigned pieces = static_cast<unsigned>(k / 64);  // k <= kW4A16GemvHalf2MaxK
  int64_t next[kRowsPerWarp];                             // this lane's next piece, each row
#pragma unroll
  for (int r = 0; r < kRowsPerWarp; ++r) next[r] = rows[r] * pieces + lane;

  uint4 ql_lo[kRowsPerWarp][kQ6KBatch], ql_hi[kRowsPerWarp][kQ6KBatch], qh[kRowsPerWarp][kQ6KBatch];
  uint32_t scales[kRowsPerWarp][kQ6KBatch];
  float d[kRowsPerWarp][kQ6KBatch];
  const auto load = [&](unsigned j0) {  // pieces lane + 32 (j0 + b) of both rows; the indices move on
#pragma unroll
    for (int b = 0; b < kQ6KBatch; ++b) {
      const bool in_row = lane + kWarpSize * (j0 + b) < pieces;
#pragma unroll
      for (int r = 0; r < kRowsPerWarp; ++r) {
        if (in_row) {
          const int64_t p = next[r] + kWarpSize * b;
          ql_lo[r][b] = __ldg(w.ql_lo + p);
          ql_hi[r][b] = __ldg(w.ql_hi + p);
          qh[r][b] = __ldg(w.qh + p);
          scales[r][b] = __ldg(w.scales + p);
          d[r][b] = __half2float(__ushort_as_half(__ldg(w.d + p / 4)));  // pieces 4B .. 4B + 3: block B
        }
      }
    }
#pragma unroll
    for (int r = 0; r < kRowsPerWarp; ++r) next[r] += kWarpSize * kQ6KBatch;
  };
  load(0);  // before the staging's wait for the kernel that wrote x
  // Word e = p * pieces + P: plane p / 4 (ql_lo: quarters 0 and 2, ql_hi: 1 and 3), word i = p % 4 of
  // piece P = 4B + 2h + s: inputs 256B + 128h + 16s + 32 (p / 4) + 4i .. + 3 and those + 64.
  const int shift = stage_activations<64>(
      x, kQ6KPiecePlanes * pieces,
      [pieces](unsigned e) {
        const unsigned p = e / pieces, piece = e - p * pieces;
        return 256 * (piece / 4) + 128 * (piece / 2 % 2) + 16 * (piece % 2) + 32 * (p / 4) + 4 * (p % 4);
      },
      xs, max_abs_bits);
  __syncthreads();

  float acc[kRowsPerWarp] = {};
  const uint4* xw = xs + lane;
  const auto multiply = [&](unsigned j0, bool guarded) {
#pragma unroll
    for (int b = 0; b < kQ6KBatch; ++b) {
      if (!guarded || lane + kWarpSize * (j0 + b) < pieces) {
        uint4 xv[kQ6KPiecePlanes];
#pragma unroll
        for (int p = 0; p < kQ6KPiecePlanes; ++p) xv[p] = xw[p * pieces + kWarpSize * b];
#pragma unroll
        for (int r = 0; r < kRowsPerWarp; ++r) {
          __half2 sums[4] = {w4a16::bits_half2(0u), w4a16::bits_half2(0u), w4a16::bits_half2(0u),
                             w4a16::bits_half2(0u)};
          w4a16::q6_k_piece_half2_dot(ql_lo[r][b], ql_hi[r][b], qh[r][b], xv, sums);
          float a = acc[r];
#pragma unroll
          for (int q = 0; q < 4; ++q) {
            const auto scale = static_cast<int8_t>((scales[r][b] >> (8 * q)) & 0xFF);
            a = fmaf(d[r][b] * static_cast<float>(scale), __low2float(sums[q]) + __high2float(sums[q]), a);
          }
          acc[r] = a;
        }
      }
    }
  };
  for_each_batch<kQ6KBatch>(pieces, multiply, [&](unsigned j0) {
    xw += kWarpSize * kQ6KBatch;
    load(j0);
  });
  store_rows_and_finish_block(acc, warp, shift, out);
}

// A kernel's shared memory on one device, remembered per kernel and device: querying it on every launch
// costs host time where launches are not captured in a graph (prompts, tensor-parallel shards).
struct Half2KernelShared {
  size_t static_bytes = 0;   // the kernel's static shared memory (max_abs_bits; an epilogue's)
  size_t dynamic_limit = 0;  // what the kernel may take now (by default 48 KB less static_bytes)
  size_t device_limit = 0;   // all a block may have on the device (opt-in)
};
std::mutex half2_shared_mutex;
std::map<std::pair<const void*, int>, Half2KernelShared> half2_shared_known;

// Launches `kernel` for `warps` row pairs, `block_warps` warps a block (persistent: no more blocks than
// the device's SMs hold at once), with `shared` bytes of dynamic shared memory: invalid_argument where
// the device's blocks cannot have that much with the kernel's static shared memory (sm_120's 99 KB, for
// a long row), else the launch. The kernel's dynamic shared memory attribute is raised, when a launch
// needs more, to all the device allows, never lowered, so that launches of different lengths (and
// threads) cannot undo each other's. A failure leaves no error behind for the next launcher to find
// (launch_status takes it, for the caller's message).
template <typename... Params, typename... Args>
Status launch_half2_blocks(void (*kernel)(Params...), int64_t warps, int block_warps, bool persistent,
                           size_t shared, cudaStream_t stream, bool programmatic, Args&&... args) {
  int device = 0;
  const cudaError_t got_device = cudaGetDevice(&device);
  if (got_device != cudaSuccess) return launch_status(got_device);
  const auto key = std::make_pair(reinterpret_cast<const void*>(kernel), device);
  {
    const std::lock_guard<std::mutex> lock(half2_shared_mutex);
    auto it = half2_shared_known.find(key);
    if (it == half2_shared_known.end()) {
      int device_limit = 0;
      cudaFuncAttributes attributes{};
      cudaError_t err =
          cudaDeviceGetAttribute(&device_limit, cudaDevAttrMaxSharedMemoryPerBlockOptin, device);
      if (err == cudaSuccess) err = cudaFuncGetAttributes(&attributes, kernel);
      if (err != cudaSuccess) return launch_status(err);
      it = half2_shared_known
               .emplace(key, Half2KernelShared{attributes.sharedSizeBytes,
                                               static_cast<size_t>(attributes.maxDynamicSharedSizeBytes),
                                               static_cast<size_t>(device_limit)})
               .first;
    }
    Half2KernelShared& s = it->second;
    if (shared + s.static_bytes > s.device_limit) return Status::invalid_argument;
    // Past what the kernel may take now, raised to all the device allows, never lowered: every raise
    // sets the same value.
    if (shared > s.dynamic_limit) {
      const cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                                   static_cast<int>(s.device_limit - s.static_bytes));
      if (err != cudaSuccess) return launch_status(err);
      s.dynamic_limit = s.device_limit - s.static_bytes;
    }
  }
  int64_t blocks = (warps + block_warps - 1) / block_warps;
  if (persistent) {  // as many blocks as the device's SMs hold at once
    // Remembered per kernel, device, block and shared memory: the model may launch a persistent shape
    // (chosen at load) hundreds of times a step, and the occupancy query is the dearest host call here.
    static std::mutex mutex;
    static std::map<std::tuple<const void*, int, int, size_t>, int64_t> resident;
    const std::lock_guard<std::mutex> lock(mutex);
    const auto key = std::make_tuple(reinterpret_cast<const void*>(kernel), device, block_warps, shared);
    auto it = resident.find(key);
    if (it == resident.end()) {
      int per_sm = 0, sms = 0;
      cudaError_t err =
          cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, block_warps * kWarpSize, shared);
      if (err == cudaSuccess) err = cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device);
      if (err != cudaSuccess) return launch_status(err);
      it = resident.emplace(key, std::max(1, per_sm) * static_cast<int64_t>(sms)).first;
    }
    blocks = std::min<int64_t>(blocks, it->second);
  }
  const cudaError_t launched =
      detail::launch_kernel(kernel, dim3(static_cast<unsigned>(blocks)), dim3(block_warps * kWarpSize),
                            shared, stream, programmatic, std::forward<Args>(args)...);
  if (launch_status(launched) == Status::ok) return Status::ok;
  {  // asked again next time (the facts may no longer hold)
    const std::lock_guard<std::mutex> lock(half2_shared_mutex);
    half2_shared_known.erase(key);
  }
  return Status::device_error;
}

// The same with kWarps a block, a block for every kWarps row pairs.
template <typename... Params, typename... Args>
Status launch_half2(void (*kernel)(Params...), int64_t warps, size_t shared, cudaStream_t stream,
                    bool programmatic, Args&&... args) {
  return launch_half2_blocks(kernel, warps, kWarps, false, shared, stream, programmatic,
                             std::forward<Args>(args)...);
}

// The INT4 kernel with epilogue `out`, after the checks every epilogue shares (the weights, x, k and
// the grid); nothing to launch for no rows. The other block shapes (anything but kWarps, kBatch, not
// persistent) are built for group 128 only (dummy and GPTQ / AWQ weights; fewer kernels to build):
// invalid_argument for others.
template <typename Out, int Warps = kWarps, int Batch = kBatch, bool Persistent = false, int MinBlocks = 1>
Status launch_int4(const uint8_t* quants, const __half* scales, const uint8_t* zeros, int64_t group,
                   int64_t k, const __half* x, const Out& out, cudaStream_t stream, bool programmatic) {
  Int4GroupBlocks blocks{};
  if (!w4a16::make_int4_group_blocks(quants, scales, zeros, group, k, blocks))
    return Status::invalid_argument;
  if (x == nullptr || k < kQK4_0 || k % kQK4_0 != 0 || k > kW4A16GemvHalf2MaxK ||
      reinterpret_cast<uintptr_t>(x) % 16 != 0 || out.warps() / Warps >= INT32_MAX) {
    return Status::invalid_argument;
  }
  if (out.warps() == 0) return Status::ok;
  const size_t shared = static_cast<size_t>(k) * sizeof(__half);
  if constexpr (Warps == kWarps && Batch == kBatch && !Persistent && MinBlocks == 1) {
    if (blocks.group_shift < 0 || blocks.group_shift > 2) return Status::invalid_argument;  // not built
    const auto kernel = blocks.group_shift == 0   ? gemv_int4_groups_half2_kernel<0, Out>
                        : blocks.group_shift == 1 ? gemv_int4_groups_half2_kernel<1, Out>
                                                  : gemv_int4_groups_half2_kernel<2, Out>;
    return launch_half2(kernel, out.warps(), shared, stream, programmatic, blocks, out, k, x);
  } else {
    if (blocks.group_shift != 2) return Status::invalid_argument;
    return launch_half2_blocks(gemv_int4_groups_half2_kernel<2, Out, Warps, Batch, Persistent, MinBlocks>,
                               out.warps(), Warps, Persistent, shared, stream, programmatic, blocks, out, k,
                               x);
  }
}

// The INT4 kernel with epilogue `out` on block shape I of kHalf2GemvVariants. A shape the norm's
// one-block tail cannot run on is never asked for with it (half2_gemv_effective_shape), nor built.
template <typename Out, int I>
Status launch_int4_on_shape(const uint8_t* quants, const __half* scales, const uint8_t* zeros, int64_t group,
                            int64_t k, const __half* x, const Out& out, cudaStream_t stream,
                            bool programmatic) {
  constexpr Half2GemvVariant v = kHalf2GemvVariants[I];
  if constexpr (Out::kAfterBlock && (v.persistent || v.warps * kWarpSize != detail::kAddRmsNormThreads)) {
    return Status::invalid_argument;
  } else {
    return launch_int4<Out, v.warps, v.batch, v.persistent, v.min_blocks>(quants, scales, zeros, group, k, x,
                                                                          out, stream, programmatic);
  }
}

// The INT4 kernel with epilogue `out` on the block shape half2_gemv_effective_shape gives for `shape`
// (an index into kHalf2GemvVariants; every shape gives the default's bits).
template <typename Out, int... I>
Status launch_int4_shape(int shape, std::integer_sequence<int, I...>, const uint8_t* quants,
                         const __half* scales, const uint8_t* zeros, int64_t group, int64_t k,
                         const __half* x, const Out& out, cudaStream_t stream, bool programmatic) {
  const int runs = half2_gemv_effective_shape(shape, group, Out::kAfterBlock);
  Status st = Status::invalid_argument;  // out of range
  ((runs == I &&
    (st = launch_int4_on_shape<Out, I>(quants, scales, zeros, group, k, x, out, stream, programmatic),
     true)) ||
   ...);
  return st;
}
template <typename Out>
Status launch_int4_shape(int shape, const uint8_t* quants, const __half* scales, const uint8_t* zeros,
                         int64_t group, int64_t k, const __half* x, const Out& out, cudaStream_t stream,
                         bool programmatic) {
  return launch_int4_shape(shape, std::make_integer_sequence<int, kHalf2GemvVariantCount>{}, quants, scales,
                           zeros, group, k, x, out, stream, programmatic);
}

// The Q4_K kernel likewise.
template <typename Out>
Status launch_q4_k(const uint8_t* w, int64_t k, const __half* x, const Out& out, cudaStream_t stream,
                   bool programmatic) {
  if (w == nullptr || x == nullptr || k < kQK_K || k % kQK_K != 0 || k > kW4A16GemvHalf2MaxK ||
      reinterpret_cast<uintptr_t>(w) % 16 != 0 || reinterpret_cast<uintptr_t>(x) % 16 != 0 ||
      out.warps() / kWarps >= INT32_MAX) {
    return Status::invalid_argument;
  }
  if (out.warps() == 0) return Status::ok;
  const size_t shared =
      static_cast<size_t>(k) * sizeof(__half) + static_cast<size_t>(k / kQK4_0) * sizeof(float);
  return launch_half2(gemv_q4_k_half2_kernel<Out>, out.warps(), shared, stream, programmatic, w, out, k, x);
}

// The Q6_K kernel with epilogue `out` on planes at w (kernels/q6_k_planes.hpp, n_out rows), after the
// checks every epilogue shares; nothing to launch for no rows.
template <typename Out>
Status launch_q6_k(const uint8_t* w, int64_t n_out, int64_t k, const __half* x, const Out& out,
                   cudaStream_t stream, bool programmatic) {
  w4a16::Q6KPlanes planes{};
  if (!w4a16::make_q6_k_planes(w, n_out, k, planes) || x == nullptr || k > kW4A16GemvHalf2MaxK ||
      reinterpret_cast<uintptr_t>(x) % 16 != 0 || out.warps() / kWarps >= INT32_MAX) {
    return Status::invalid_argument;
  }
  if (out.warps() == 0) return Status::ok;
  const size_t shared = static_cast<size_t>(k) * sizeof(__half);
  return launch_half2(gemv_q6_k_half2_kernel<Out>, out.warps(), shared, stream, programmatic, planes, out, k,
                      x);
}

// The epilogue of one token's q / k / v rows, or false for what rope_kv_write would refuse (and for
// more than one token or an odd head_dim).
bool make_rope_kv_out(const RopeKvWriteShape& s, const int32_t* token_pos, const int32_t* token_seq,
                      const int32_t* block_tables, __half* q_out, __half* k_cache, __half* v_cache,
                      int32_t* error_flag, RopeKvOut& out) {
  if (!rope_kv_heads_and_cache_valid(s) || s.tokens != 1 || s.head_dim % 2 != 0) return false;
  if (token_pos == nullptr || token_seq == nullptr || block_tables == nullptr || q_out == nullptr ||
      k_cache == nullptr || v_cache == nullptr) {
    return false;
  }
  out = RopeKvOut{s.n_head * s.head_dim,
                  s.n_head_kv * s.head_dim,
                  s.head_dim,
                  s.rot_dims,
                  {kernels::rope_theta_scale(s.rope_base, s.rot_dims), s.rope_scaling},
                  token_pos,
                  token_seq,
                  block_tables,
                  s.block_size,
                  s.num_blocks,
                  s.max_blocks_per_seq,
                  q_out,
                  k_cache,
                  v_cache,
                  error_flag};
  return true;
}

// What the add-norm launchers ask beyond the product's own checks.
bool add_norm_arguments_ok(int64_t n_out, const float* y, const float* residual, const float* norm_weight,
                           float eps, const __half* h, const unsigned* counter) {
  return y != nullptr && residual != nullptr && norm_weight != nullptr && h != nullptr &&
         counter != nullptr && n_out >= 1 && eps >= 0.0f;
}

}  // namespace

Status w4a16_gemv_int4_groups_half2(const uint8_t* quants, const __half* scales, const uint8_t* zeros,
                                    int64_t group, int64_t n_out, int64_t k, const __half* x, int64_t m,
                                    float* y, cudaStream_t stream, bool programmatic) {
  if (y == nullptr || m != 1 || n_out < 0) return Status::invalid_argument;
  return launch_int4(quants, scales, zeros, group, k, x, SumsOut{n_out, y}, stream, programmatic);
}

Status w4a16_gemv_q4_k_half2(const uint8_t* w, int64_t n_out, int64_t k, const __half* x, int64_t m, float* y,
                             cudaStream_t stream, bool programmatic) {
  if (y == nullptr || m != 1 || n_out < 0) return Status::invalid_argument;
  return launch_q4_k(w, k, x, SumsOut{n_out, y}, stream, programmatic);
}

Status w4a16_gemv_q6_k_half2(const uint8_t* w, int64_t n_out, int64_t k, const __half* x, int64_t m, float* y,
                             cudaStream_t stream, bool programmatic) {
  if (y == nullptr || m != 1 || n_out < 0) return Status::invalid_argument;
  return launch_q6_k(w, n_out, k, x, SumsOut{n_out, y}, stream, programmatic);
}

Status w4a16_gemv_int4_groups_half2_add_norm(const uint8_t* quants, const __half* scales,
                                             const uint8_t* zeros, int64_t group, int64_t n_out, int64_t k,
                                             const __half* x, float* y, float* residual,
                                             const float* norm_weight, float eps, __half* h,
                                             unsigned* counter, cudaStream_t stream, bool programmatic,
                                             int shape) {
  if (!add_norm_arguments_ok(n_out, y, residual, norm_weight, eps, h, counter))
    return Status::invalid_argument;
  return launch_int4_shape(shape, quants, scales, zeros, group, k, x,
                           SumsNormOut{{n_out, y}, residual, norm_weight, h, eps, counter}, stream,
                           programmatic);
}

Status w4a16_gemv_q4_k_half2_add_norm(const uint8_t* w, int64_t n_out, int64_t k, const __half* x, float* y,
                                      float* residual, const float* norm_weight, float eps, __half* h,
                                      unsigned* counter, cudaStream_t stream, bool programmatic) {
  if (!add_norm_arguments_ok(n_out, y, residual, norm_weight, eps, h, counter))
    return Status::invalid_argument;
  return launch_q4_k(w, k, x, SumsNormOut{{n_out, y}, residual, norm_weight, h, eps, counter}, stream,
                     programmatic);
}

Status w4a16_gemv_q6_k_half2_add_norm(const uint8_t* w, int64_t n_out, int64_t k, const __half* x, float* y,
                                      float* residual, const float* norm_weight, float eps, __half* h,
                                      unsigned* counter, cudaStream_t stream, bool programmatic) {
  if (!add_norm_arguments_ok(n_out, y, residual, norm_weight, eps, h, counter))
    return Status::invalid_argument;
  return launch_q6_k(w, n_out, k, x, SumsNormOut{{n_out, y}, residual, norm_weight, h, eps, counter}, stream,
                     programmatic);
}

bool w4a16_gemv_half2_fits(int64_t k, bool q4_k) {
  if (k < 1 || k > kW4A16GemvHalf2MaxK) return false;
  int device = 0;
  if (cudaGetDevice(&device) != cudaSuccess) {
    cudaGetLastError();
    return false;
  }
  static std::mutex mutex;
  static std::map<std::tuple<int, int64_t, bool>, bool> known;  // (device, k, q4_k)
  const std::lock_guard<std::mutex> lock(mutex);
  const auto key = std::make_tuple(device, k, q4_k);
  if (const auto it = known.find(key); it != known.end()) return it->second;
  // The epilogue with the most static shared memory (the norm's scratch) bounds them all.
  int max_shared = 0;
  cudaFuncAttributes attributes{};
  const cudaError_t err =
      q4_k ? cudaFuncGetAttributes(&attributes, gemv_q4_k_half2_kernel<SumsNormOut>)
           : cudaFuncGetAttributes(&attributes, gemv_int4_groups_half2_kernel<2, SumsNormOut>);
  if (err != cudaSuccess ||
      cudaDeviceGetAttribute(&max_shared, cudaDevAttrMaxSharedMemoryPerBlockOptin, device) != cudaSuccess) {
    cudaGetLastError();
    return false;
  }
  const size_t dynamic = static_cast<size_t>(k) * sizeof(__half) +
                         (q4_k ? static_cast<size_t>(k / kQK4_0) * sizeof(float) : size_t{0});
  const bool fits = dynamic + attributes.sharedSizeBytes <= static_cast<size_t>(max_shared);
  known[key] = fits;
  return fits;
}

bool half2_gemv_shapes_enabled() {
  static const bool enabled = [] {
    const char* off = std::getenv("NIBBLE_HALF2_DEFAULT_SHAPE");
    return off == nullptr || *off == '\0' || std::strcmp(off, "0") == 0;
  }();
  return enabled;
}

int half2_gemv_effective_shape(int shape, int64_t group, bool norm) {
  if (shape < 0 || shape >= kHalf2GemvVariantCount) return -1;
  if (group != 128 || !half2_gemv_shapes_enabled()) return 0;
  const Half2GemvVariant& v = kHalf2GemvVariants[shape];
  if (norm && (v.persistent || v.warps * kWarpSize != detail::kAddRmsNormThreads)) return 0;
  return shape;
}

std::string half2_gemv_variant_name(const Half2GemvVariant& v) {
  return std::to_string(v.warps) + "w b" + std::to_string(v.batch) + (v.persistent ? " pers" : "") +
         (v.min_blocks > 1 ? " " + std::to_string(v.min_blocks) + "/SM" : "");
}

Status w4a16_gemv_int4_groups_half2_shape(int shape, const uint8_t* quants, const __half* scales,
                                          const uint8_t* zeros, int64_t group, int64_t n_out, int64_t k,
                                          const __half* x, int64_t m, float* y, cudaStream_t stream,
                                          bool programmatic) {
  if (y == nullptr || m != 1 || n_out < 0) return Status::invalid_argument;
  // Another shape at a group it is not built for, or switched off (the fused launchers would run the
  // default there): refused, so that the kernel table never times one shape as another.
  if (shape != 0 && (group != 128 || !half2_gemv_shapes_enabled())) return Status::invalid_argument;
  return launch_int4_shape(shape, quants, scales, zeros, group, k, x, SumsOut{n_out, y}, stream,
                           programmatic);
}

Status w4a16_gemv_int4_groups_half2_variant(const Half2GemvVariant& v, const uint8_t* quants,
                                            const __half* scales, const uint8_t* zeros, int64_t group,
                                            int64_t n_out, int64_t k, const __half* x, int64_t m, float* y,
                                            cudaStream_t stream, bool programmatic) {
  int shape = 0;  // v's index in kHalf2GemvVariants (past the end: not a listed shape, refused)
  while (shape < kHalf2GemvVariantCount &&
         !(kHalf2GemvVariants[shape].warps == v.warps && kHalf2GemvVariants[shape].batch == v.batch &&
           kHalf2GemvVariants[shape].persistent == v.persistent &&
           kHalf2GemvVariants[shape].min_blocks == v.min_blocks))
    ++shape;
  return w4a16_gemv_int4_groups_half2_shape(shape, quants, scales, zeros, group, n_out, k, x, m, y, stream,
                                            programmatic);
}

Status w4a16_gemv_int4_groups_half2_swiglu(const uint8_t* quants, const __half* scales, const uint8_t* zeros,
                                           int64_t group, int64_t n_ff, int64_t k, const __half* x,
                                           __half* act, cudaStream_t stream, bool programmatic, int shape) {
  if (act == nullptr || n_ff < 0) return Status::invalid_argument;
  return launch_int4_shape(shape, quants, scales, zeros, group, k, x, SwiGluOut{n_ff, act}, stream,
                           programmatic);
}

Status w4a16_gemv_q4_k_half2_swiglu(const uint8_t* w, int64_t n_ff, int64_t k, const __half* x, __half* act,
                                    cudaStream_t stream, bool programmatic) {
  if (act == nullptr || n_ff < 0) return Status::invalid_argument;
  return launch_q4_k(w, k, x, SwiGluOut{n_ff, act}, stream, programmatic);
}

Status w4a16_gemv_q6_k_half2_swiglu(const uint8_t* w, int64_t n_ff, int64_t k, const __half* x, __half* act,
                                    cudaStream_t stream, bool programmatic) {
  if (act == nullptr || n_ff < 0) return Status::invalid_argument;
  return launch_q6_k(w, 2 * n_ff, k, x, SwiGluOut{n_ff, act}, stream, programmatic);
}

Status w4a16_gemv_int4_groups_half2_rope_kv(const uint8_t* quants, const __half* scales, const uint8_t* zeros,
                                            int64_t group, const RopeKvWriteShape& shape, int64_t k,
                                            const __half* x, const int32_t* token_pos,
                                            const int32_t* token_seq, const int32_t* block_tables,
                                            __half* q_out, __half* k_cache, __half* v_cache,
                                            int32_t* error_flag, cudaStream_t stream, bool programmatic,
                                            int block_shape) {
  RopeKvOut out{};
  if (!make_rope_kv_out(shape, token_pos, token_seq, block_tables, q_out, k_cache, v_cache, error_flag, out))
    return Status::invalid_argument;
  return launch_int4_shape(block_shape, quants, scales, zeros, group, k, x, out, stream, programmatic);
}

Status w4a16_gemv_q4_k_half2_rope_kv(const uint8_t* w, const RopeKvWriteShape& shape, int64_t k,
                                     const __half* x, const int32_t* token_pos, const int32_t* token_seq,
                                     const int32_t* block_tables, __half* q_out, __half* k_cache,
                                     __half* v_cache, int32_t* error_flag, cudaStream_t stream,
                                     bool programmatic) {
  RopeKvOut out{};
  if (!make_rope_kv_out(shape, token_pos, token_seq, block_tables, q_out, k_cache, v_cache, error_flag, out))
    return Status::invalid_argument;
  return launch_q4_k(w, k, x, out, stream, programmatic);
}

Status w4a16_gemv_q6_k_half2_rope_kv(const uint8_t* w, const RopeKvWriteShape& shape, int64_t k,
                                     const __half* x, const int32_t* token_pos, const int32_t* token_seq,
                                     const int32_t* block_tables, __half* q_out, __half* k_cache,
                                     __half* v_cache, int32_t* error_flag, cudaStream_t stream,
                                     bool programmatic) {
  RopeKvOut out{};
  if (!make_rope_kv_out(shape, token_pos, token_seq, block_tables, q_out, k_cache, v_cache, error_flag, out))
    return Status::invalid_argument;
  return launch_q6_k(w, out.rows(), k, x, out, stream, programmatic);
}

}  // namespace nibble::kernels::cuda
