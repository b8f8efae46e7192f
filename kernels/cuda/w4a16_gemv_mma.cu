// Tensor-core decode GEMV (w4a16_gemv_mma.cuh). Design, and why:
//
// - Block = 8 warps on one tile of 128 outputs. Warp (wn, wk) owns outputs 64 wn .. 64 wn + 63 (eight
//   n8 tiles, 32 fp32 accumulators a lane) and part wk of every stage's inputs. One A fragment (the m16
//   x tile) feeds eight mmas, and the staged x is shared by the 128 outputs, so at m = 16 x adds half a
//   byte from L2 per weight byte (64 outputs per block would add a whole one).
// - Stage = 8 units of 32 inputs (256 inputs): 128 rows x 128 contiguous bytes of nibbles (16 KB, one
//   full cache line per row), the x tile's m real rows x 256 inputs (rows m..15 are zeroed once and
//   never copied), and the stage's scales and zeros. Warp wk takes units 2 wk, 2 wk + 1 of each stage.
// - 4 stages of cp.async (3 in flight while one is computed): 48 KB of weights in flight per block,
//   one block per SM (121 KB of shared memory), enough to cover device-memory latency at full
//   bandwidth (~4 TB/s x ~1 us / 132 SMs ≈ 30 KB per SM).
// - Scales and zeros cannot be copied with cp.async (2-byte alignment, rows k / group apart), so each
//   thread loads its share of a stage's (scale, zero) pairs into registers one iteration before it
//   stores them to shared memory, and the lines were prefetched into L2 two iterations before that:
//   the loads neither stall on device memory nor sit on the critical path of the copies.
// - K is split across the 4 warps of a column half and across the blocks of a thread-block cluster
//   (Hopper): with few output tiles (n_out = 1024: 8 tiles) a cluster of up to 8 blocks shares each
//   tile's inputs, so the grid still has about one block per SM. The partial sums are reduced in a
//   fixed order (warps 0..3 in shared memory, then cluster ranks 0..C-1 through distributed shared
//   memory), so results are bit-reproducible without atomics, a workspace or a second pass. The split
//   depends only on n_out, k and the SM count, never on m.
// - Weights are dequantized in registers by w4a16's fragment builders (int4_unit_b_fragments_packed,
//   int4_tile_word_b_fragments and the Q4_K ones);
//   out-of-range rows, units and groups are zero-filled (cp.async src-size 0, scale and zero 0), so
//   ragged edges compute exact zeros and are simply not stored.
#include <cooperative_groups.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <atomic>

#include "kernels/cuda/dependent_launch.cuh"
#include "kernels/cuda/launch_status.cuh"
#include "kernels/cuda/mma.cuh"
#include "kernels/cuda/w4a16_gemv_mma.cuh"
#include "kernels/cuda/w4a16_weights.cuh"
#include "kernels/int4_tiles.hpp"
#include "kernels/quant_types.hpp"

namespace nibble::kernels::cuda {
namespace {

namespace cg = cooperative_groups;
using detail::cp_async_16;
using detail::cp_async_commit;
using detail::cp_async_wait;
using detail::ldmatrix_x4;
using detail::mma_16816;
using detail::prefetch_l2;

constexpr int kMaxSplits = 8;  // the portable cluster size

// One variant of the kernel: m16 tiles of activation rows a block computes (1: the decode GEMV, up
// to 16 rows; 2: up to 32; 4: 64-row slabs of any m), warps side by side along the 128 outputs,
// warps splitting each stage's inputs (4: 256 threads, the design above; 8: 512 threads, one unit
// each), pipeline stages, and blocks per SM it is built for (2 with 3 stages: two independent blocks
// of ~91 KB). Which is fastest is measured, not assumed: on an H200 the first one reached only ~28%
// of copy bandwidth at 1-16 rows, flat in m, which points at latency (8 warps an SM) rather than
// bytes or math (docs/perf/gpu.md); the model's load-time timing picks. More m16 tiles reuse each
// dequantized B fragment for more mmas (8 per fragment at 64 rows), which is what makes 17-64 rows
// cheap here where dequant + cuBLAS moves the weights three times in 16 bits.
// Probe: a benchmark's cut-down kernel (w4a16_gemv_int4_groups_mma_probe): 1 streams the weights
// through the pipeline without computing, 2 computes on the first stages' data without loading more.
constexpr int kProbeNone = 0, kProbeLoadsOnly = 1, kProbeComputeOnly = 2;
// Format: the weights' layout. Group-wise INT4 (kernels/int4_groups.hpp), or GGUF Q4_K super-blocks
// as stored: a stage of 256 inputs is one super-block a row, whose 128 qs bytes are staged as they
// are (16 bytes into the 144-byte block) and whose header gives the stage's 8 (scale, min) pairs.
// Or group-wise INT4 in the kernel's own chunks (kernels/int4_tiles.hpp): a block's stage is one
// contiguous chunk, its (scale, zero) pairs packed at the end, all of it copied with cp.async.
// And GGUF Q4_K in the same chunks (q4_k_tiles_from_blocks): Q4_K's arithmetic, the tiles' loads.
constexpr int kFormatInt4Groups = 0, kFormatQ4K = 1, kFormatInt4Tiles = 2, kFormatQ4KTiles = 3;
template <int MTiles, int WarpsN, int WarpsK, int Stages, int BlocksPerSm, int Probe = kProbeNone,
          int Format = kFormatInt4Groups>
struct GemvMmaConfig {
  static constexpr int kProbe = Probe;
  static constexpr int kFormat = Format;
  static constexpr int kMTiles = MTiles;                        // m16 tiles a block computes
  static constexpr int kRows = 16 * kMTiles;                    // activation rows a block computes
  static constexpr int kWarpsN = WarpsN;                        // warps side by side along the outputs
  static constexpr int kWarpsK = WarpsK;                        // warps splitting each stage's inputs
  static constexpr int kThreads = 32 * kWarpsN * kWarpsK;       // 256 or 512
  static constexpr int kTileN = 128;                            // outputs a block
  static constexpr int kTilesPerWarp = kTileN / (8 * kWarpsN);  // n8 tiles a warp
  static constexpr int kStageUnits = 8;                         // 32-input units per stage
  static constexpr int kUnitsPerWarp = kStageUnits / kWarpsK;   // per warp per stage
  static constexpr int kStageInputs = kStageUnits * kQK4_0;     // 256
  static constexpr int kStages = Stages;
  static constexpr int kBlocksPerSm = BlocksPerSm;
  static constexpr int kMaxGroupsPerStage = kStageUnits;  // group 32

  // One stage slot of shared memory: weight rows, then the x tile, then (scale, zero) pairs.
  static constexpr int kWRowBytes = kStageUnits * 16 + 16;  // +16: an LDS's 8 rows on 8 bank quads
  static constexpr int kWSlotBytes = kTileN * kWRowBytes;
  static constexpr int kXRowHalves = kStageInputs + 8;  // +16 bytes: ldmatrix's 8 rows on distinct banks
  static constexpr int kXSlotBytes = kRows * kXRowHalves * 2;
  // Pairs staged from registers: [128 rows][kPairLd]. Group-wise INT4: 9 words a row, so that the 8
  // rows a warp's lanes read (g = 0..7, same group) fall on 8 distinct banks (8 words a row: two on
  // each of 4 banks). Q4_K keeps 8: its lanes read two sub-blocks' pairs in one 8-byte load, which
  // stride 9 would split in two. A tiled chunk's pairs are copied in as they are: [128 rows][groups
  // a stage].
  static constexpr int kPairLd = kMaxGroupsPerStage + (Format == kFormatInt4Groups ? 1 : 0);
  static constexpr int kPairSlotBytes = kTileN * kPairLd * 4;
  static constexpr int kSlotBytes = kWSlotBytes + kXSlotBytes + kPairSlotBytes;
  static constexpr int kSmemBytes = kStages * kSlotBytes;
  // After the pipeline the same memory holds the warps' partial sums: [kWarpsK][kRows][kRedLd].
  static constexpr int kRedLd = kTileN + 8;  // +8 floats: the float2 stores of 8 rows spread over banks

  // Per thread and stage: weight chunks (16 bytes), x chunks, (scale, zero) pairs (at most).
  static constexpr int kWChunks = kTileN * kStageUnits / kThreads;
  static constexpr int kWRowStep = kThreads / kStageUnits;
  static constexpr int kXParts = kStageInputs / 8;  // 16-byte parts of an x row's stage
  static constexpr int kXChunks = kRows * kXParts / kThreads;
  static constexpr int kXRowStep = kThreads / kXParts;
  static constexpr int kPairsPerThread = (kTileN * kMaxGroupsPerStage + kThreads - 1) / kThreads;

  static_assert(kUnitsPerWarp * kWarpsK == kStageUnits && kUnitsPerWarp >= 1);
  static_assert(kTilesPerWarp * 8 * kWarpsN == kTileN && kTilesPerWarp >= 1);
  static_assert(kWSlotBytes % 16 == 0 && kXSlotBytes % 16 == 0 && kSlotBytes % 16 == 0, "16-byte copies");
  static_assert(kWChunks * kThreads == kTileN * kStageUnits && kXChunks * kThreads == kRows * kXParts);
  static_assert(kThreads >= 2 * kTileN, "the L2 prefetch gives one thread per row to scales, one to zeros");
  static_assert(kWarpsK * kRows * kRedLd * 4 <= kSmemBytes, "the reduction buffer aliases the pipeline");
  static_assert(kStages >= 2);
  static_assert(kSmemBytes * kBlocksPerSm <= 227 * 1024, "an H100 / H200 SM's shared memory");
};
using GemvMma256 = GemvMmaConfig<1, 2, 4, 4, 1>;                         // w4a16_gemv_int4_groups_mma
using GemvMma512 = GemvMmaConfig<1, 2, 8, 4, 1>;                         // w4a16_gemv_int4_groups_mma_512
using GemvMma2Sm = GemvMmaConfig<1, 2, 4, 3, 2>;                         // w4a16_gemv_int4_groups_mma_2bps
using GemvMmaLoadsOnly = GemvMmaConfig<1, 2, 4, 4, 1, kProbeLoadsOnly>;  // probes of GemvMma256
using GemvMmaComputeOnly = GemvMmaConfig<1, 2, 4, 4, 1, kProbeComputeOnly>;
using GemvMma32Rows = GemvMmaConfig<2, 2, 4, 4, 1>;  // w4a16_gemv_int4_groups_mma_32rows (154 KB)
// w4a16_gemm_int4_groups_mma_64rows: four warps along the outputs (32 each) so that the 4 x 4 n8
// accumulator tiles stay at 64 floats a lane; 3 stages (165 KB: the x tile is 33 KB a stage).
using GemmMma64Rows = GemvMmaConfig<4, 4, 2, 3, 1>;
// The same three shapes on Q4_K (w4a16_gemv_q4_k_mma, _32rows, w4a16_gemm_q4_k_mma_64rows).
using GemvMmaQ4K = GemvMmaConfig<1, 2, 4, 4, 1, kProbeNone, kFormatQ4K>;
using GemvMma32RowsQ4K = GemvMmaConfig<2, 2, 4, 4, 1, kProbeNone, kFormatQ4K>;
using GemmMma64RowsQ4K = GemvMmaConfig<4, 4, 2, 3, 1, kProbeNone, kFormatQ4K>;
// And on tiled INT4 (w4a16_gemv_int4_tiles_mma, _512, _2bps, _32rows, w4a16_gemm_int4_tiles_mma_64rows),
// with the tiled loads-only probe.
using GemvMma256Tiles = GemvMmaConfig<1, 2, 4, 4, 1, kProbeNone, kFormatInt4Tiles>;
using GemvMma512Tiles = GemvMmaConfig<1, 2, 8, 4, 1, kProbeNone, kFormatInt4Tiles>;
using GemvMma2SmTiles = GemvMmaConfig<1, 2, 4, 3, 2, kProbeNone, kFormatInt4Tiles>;
using GemvMma32RowsTiles = GemvMmaConfig<2, 2, 4, 4, 1, kProbeNone, kFormatInt4Tiles>;
using GemmMma64RowsTiles = GemvMmaConfig<4, 4, 2, 3, 1, kProbeNone, kFormatInt4Tiles>;
using GemvMmaLoadsOnlyTiles = GemvMmaConfig<1, 2, 4, 4, 1, kProbeLoadsOnly, kFormatInt4Tiles>;
using GemvMmaQ4KTiles = GemvMmaConfig<1, 2, 4, 4, 1, kProbeNone, kFormatQ4KTiles>;
using GemvMma32RowsQ4KTiles = GemvMmaConfig<2, 2, 4, 4, 1, kProbeNone, kFormatQ4KTiles>;
using GemmMma64RowsQ4KTiles = GemvMmaConfig<4, 4, 2, 3, 1, kProbeNone, kFormatQ4KTiles>;

// Grid (row slabs, output tiles, splits), clusters of (1, 1, splits): block (slab, tile, split)
// computes outputs 128 tile .. 128 tile + 127 of activation rows kRows slab .. kRows slab + kRows - 1
// (those < m_total) over stages [split · stages_per_split, + stages_per_split) of the inputs.
// GroupShift: log2(group / 32), a template argument so that the pairs' offsets and strides are
// immediates (the main loop a stage: 581 -> 503 instructions on rows, 435 -> 411 on tiles, group 128).
template <class C, int GroupShift>
__global__ void __launch_bounds__(C::kThreads, C::kBlocksPerSm)
    gemv_int4_groups_mma_kernel(const uint8_t* __restrict__ quants, const __half* __restrict__ scales,
                                const uint8_t* __restrict__ zeros, int64_t n_out, int64_t k,
                                const __half* __restrict__ x_all, int m_total, float* __restrict__ y_all,
                                int stages_per_split) {
  constexpr int group_shift = GroupShift;
  constexpr int kThreads = C::kThreads, kTileN = C::kTileN, kWarpsK = C::kWarpsK, kStages = C::kStages;
  constexpr int kMTiles = C::kMTiles, kRows = C::kRows;
  constexpr bool kQ4K = C::kFormat == kFormatQ4K || C::kFormat == kFormatQ4KTiles;          // Q4_K arithmetic
  constexpr bool kTiles = C::kFormat == kFormatInt4Tiles || C::kFormat == kFormatQ4KTiles;  // chunked loads
  // Bytes between a row's consecutive stages in the source: 128 of nibbles, or a 144-byte Q4_K block.
  constexpr int kSrcStageBytes = kQ4K ? static_cast<int>(sizeof(BlockQ4_K)) : C::kStageUnits * 16;
  static_assert(!kQ4K || (C::kStageUnits * kQK4_0 == kQK_K && C::kStageUnits * 16 + 16 == sizeof(BlockQ4_K)),
                "a Q4_K stage is one super-block: 16 header bytes, then 128 of nibbles");
  constexpr int kTilesPerWarp = C::kTilesPerWarp, kUnitsPerWarp = C::kUnitsPerWarp;
  constexpr int kStageUnits = C::kStageUnits, kStageInputs = C::kStageInputs;
  constexpr int kPairLd = C::kPairLd, kWRowBytes = C::kWRowBytes;
  constexpr int kWSlotBytes = C::kWSlotBytes, kXRowHalves = C::kXRowHalves, kXSlotBytes = C::kXSlotBytes;
  constexpr int kSlotBytes = C::kSlotBytes, kRedLd = C::kRedLd, kWChunks = C::kWChunks;
  constexpr int kWRowStep = C::kWRowStep, kXParts = C::kXParts, kXChunks = C::kXChunks;
  constexpr int kXRowStep = C::kXRowStep, kPairsPerThread = C::kPairsPerThread;
  extern __shared__ __align__(16) uint8_t smem[];
  const int tid = threadIdx.x;
  const int lane = tid % 32, warp = tid / 32;
  const int g = lane / 4, t = lane % 4;
  const int wn = warp / kWarpsK, wk = warp % kWarpsK;
  const int64_t n0 = static_cast<int64_t>(blockIdx.y) * kTileN;
  const int split = static_cast<int>(blockIdx.z), splits = static_cast<int>(gridDim.z);
  const int64_t row0 = static_cast<int64_t>(blockIdx.x) * kRows;  // this block's slab of rows
  const int m = min(kRows, m_total - static_cast<int>(row0));     // its rows, 1..kRows
  const int m_tiles = (m + 15) / 16;  // m16 tiles holding a real row (warp-uniform)
  const __half* __restrict__ x = x_all + row0 * k;
  float* __restrict__ y = y_all + row0 * n_out;
  const int64_t units = k / kQK4_0;  // per weight row
  const int64_t stages_total = (units + kStageUnits - 1) / kStageUnits;
  const int64_t stage_begin = min(static_cast<int64_t>(split) * stages_per_split, stages_total);
  const int n_stages = static_cast<int>(min(stage_begin + stages_per_split, stages_total) - stage_begin);
  const int groups_per_stage = kStageUnits >> group_shift;
  const int64_t groups_per_row = units >> group_shift;
  // Tiles: the chunk of this block's tile and its split's first stage (kernels/int4_tiles.hpp), and
  // the bytes between a row's stages in the source either way.
  const int chunk_bytes = kInt4TileNibbleBytes + kTileN * groups_per_stage * 4;
  const uint8_t* chunk0 =
      quants + (static_cast<int64_t>(blockIdx.y) * stages_total + stage_begin) * chunk_bytes;
  const int w_stage_bytes = kTiles ? chunk_bytes : kSrcStageBytes;
  static_assert(!kTiles || (C::kTileN == kInt4TileRows && kStageInputs == kInt4TileInputs),
                "a tiled chunk is one block's stage");

  // Each thread's share of a stage, as offsets from stage 0 of the split (the loops below only add
  // the stage's offset). Copies: unit tid % 8 of weight rows tid / 8 + 32 i (8 threads read a row's 128
  // contiguous bytes) and 16-byte part tid % 32 of x rows tid / 32 + 8 i that are < m.
  const int w_unit = tid % kStageUnits, w_row0 = tid / kStageUnits;
  const uint8_t* w_src[kWChunks];
  bool w_row_ok[kWChunks];
#pragma unroll
  for (int i = 0; i < kWChunks; ++i) {
    const int64_t row = n0 + w_row0 + i * kWRowStep;
    w_row_ok[i] = kTiles || row < n_out;  // tiles: padded with zero weights
    if constexpr (kTiles) {               // row w_row0 + i kWRowStep's unit w_unit: 16 tid + 16 kThreads i
      w_src[i] = chunk0 + (tid + i * kThreads) * 16;
    } else if constexpr (kQ4K) {  // units * 18 = the row's Q4_K bytes (144 per 8 units)
      w_src[i] =
          w_row_ok[i] ? quants + row * units * 18 + stage_begin * kSrcStageBytes + 16 + w_unit * 16 : quants;
    } else {
      w_src[i] = w_row_ok[i] ? quants + (row * units + stage_begin * kStageUnits + w_unit) * 16 : quants;
    }
  }
  const int64_t w_units_left = units - stage_begin * kStageUnits - w_unit;
  const int w_dst = (w_row0 * kWRowBytes) + w_unit * 16;
  const int x_part = tid % kXParts, x_row0 = tid / kXParts;
  const __half* x_src = x + x_row0 * k + stage_begin * kStageInputs + x_part * 8;  // + i * kXRowStep rows
  const int64_t x_inputs_left = k - stage_begin * kStageInputs - x_part * 8;
  const int x_dst = kWSlotBytes + (x_row0 * kXRowHalves + x_part * 8) * 2;
  // A stage's copies (stage: relative to stage_begin): its weights, then its x rows.
  const auto load_stage_weights = [&](int stage, int slot) {
    uint8_t* slot_base = smem + slot * kSlotBytes;
    const bool unit_ok = kTiles || static_cast<int64_t>(stage) * kStageUnits < w_units_left;
#pragma unroll
    for (int i = 0; i < kWChunks; ++i) {
      const bool valid = w_row_ok[i] && unit_ok;
      cp_async_16(slot_base + w_dst + i * kWRowStep * kWRowBytes,
                  valid ? w_src[i] + static_cast<int64_t>(stage) * w_stage_bytes : quants, valid);
    }
    if constexpr (kTiles) {  // the chunk's pairs, [128 rows][groups_per_stage], straight through
      if (tid < kTileN * groups_per_stage / 4) {
        cp_async_16(slot_base + kWSlotBytes + kXSlotBytes + tid * 16,
                    chunk0 + static_cast<int64_t>(stage) * chunk_bytes + kInt4TileNibbleBytes + tid * 16,
                    true);
      }
    }
  };
  const auto load_stage_x = [&](int stage, int slot) {
    uint8_t* slot_base = smem + slot * kSlotBytes;
    const bool input_ok = static_cast<int64_t>(stage) * kStageInputs < x_inputs_left;
#pragma unroll
    for (int i = 0; i < kXChunks; ++i) {
      if (x_row0 + i * kXRowStep < m) {
        cp_async_16(slot_base + x_dst + i * kXRowStep * kXRowHalves * 2,
                    input_ok ? x_src + i * kXRowStep * k + stage * kStageInputs : x, input_ok);
      }
    }
  };
  const auto load_stage = [&](int stage, int slot) {
    load_stage_weights(stage, slot);
    load_stage_x(stage, slot);
  };

  // (scale, zero) pairs p = tid + kThreads i of a stage (i < pairs_used): row p / groups_per_stage,
  // group tid % groups_per_stage of the stage, packed by w4a16::int4_packed_scale_zero (0 outside the
  // matrix: a weight of exactly 0). Stored at [row][group] of the slot's [128][kPairLd] pairs. With 512
  // threads and group 128 (2 groups a stage) only the threads of rows 0..127 have one.
  const int pair_row_shift = 3 - group_shift;  // log2(groups_per_stage)
  const int pairs_used = (groups_per_stage * kTileN + kThreads - 1) / kThreads;
  const int pair_group = tid & (groups_per_stage - 1), pair_row0 = tid >> pair_row_shift;
  const int pair_row_step = kThreads >> pair_row_shift;
  // Pairs i < pair_count lie inside the matrix's rows (and inside the slot's 128 rows).
  const int64_t pair_rows_left = n_out - n0 - pair_row0;
  const int pair_count = pair_row0 >= kTileN
                             ? 0
                             : static_cast<int>(min(static_cast<int64_t>(pairs_used),
                                                    (pair_rows_left + pair_row_step - 1) / pair_row_step));
  const int64_t pair_groups_left = groups_per_row - stage_begin * groups_per_stage - pair_group;
  const int64_t pair_at = (n0 + pair_row0) * groups_per_row + stage_begin * groups_per_stage + pair_group;
  const __half* pair_scales = kQ4K || kTiles ? nullptr : scales + pair_at;
  const uint8_t* pair_zeros = kQ4K || kTiles ? nullptr : zeros + pair_at;
  const int64_t pair_step = static_cast<int64_t>(pair_row_step) * groups_per_row;  // between i and i + 1
  // Q4_K: the header of row pair_row0's super-block of the split's first stage (pair_step rows apart).
  const uint8_t* pair_blocks =
      kQ4K ? quants + (n0 + pair_row0) * units * 18 + stage_begin * kSrcStageBytes : nullptr;
  const int64_t pair_block_step = static_cast<int64_t>(pair_row_step) * units * 18;
  const int pair_dst = kWSlotBytes + kXSlotBytes + (pair_row0 * kPairLd + pair_group) * 4;
  const auto load_pairs = [&](int stage, uint32_t(&pairs)[kPairsPerThread]) {
    const int offset = stage * groups_per_stage;
    const bool group_ok = offset < pair_groups_left;
#pragma unroll
    for (int i = 0; i < kPairsPerThread; ++i) {
      pairs[i] = 0;
      if (group_ok && i < pair_count) {
        if constexpr (kQ4K) {
          const auto* head =
              reinterpret_cast<const uint4*>(pair_blocks + stage * kSrcStageBytes + i * pair_block_step);
          pairs[i] = w4a16::q4_k_packed_scale_min(__ldg(head), pair_group);
        } else {
          const int64_t at = offset + i * pair_step;
          pairs[i] = w4a16::int4_packed_scale_zero(__half_as_ushort(__ldg(pair_scales + at)),
                                                   __ldg(pair_zeros + at));
        }
      }
    }
  };
  const auto store_pairs = [&](int slot, const uint32_t(&pairs)[kPairsPerThread]) {
    uint8_t* slot_base = smem + slot * kSlotBytes;
#pragma unroll
    for (int i = 0; i < kPairsPerThread; ++i) {
      if (i < pairs_used && pair_row0 + i * pair_row_step < kTileN) {
        *reinterpret_cast<uint32_t*>(slot_base + pair_dst + i * pair_row_step * kPairLd * 4) = pairs[i];
      }
    }
  };
  // L2 prefetch of a stage's pairs: threads 0..127 the scales of row tid, threads 128..255 its zeros
  // (the first byte: a range that straddles a line has its rest prefetched with the next stage).
  // Q4_K: threads 0..127 the header of row tid's super-block.
  const int64_t prefetch_row = n0 + tid % kTileN;
  const bool prefetch_ok = tid < (kQ4K ? 1 : 2) * kTileN && prefetch_row < n_out;
  const int64_t prefetch_at = prefetch_row * groups_per_row + stage_begin * groups_per_stage;
  const char* prefetch_base =
      kTiles ? nullptr
      : kQ4K
          ? reinterpret_cast<const char*>(quants + prefetch_row * units * 18 + stage_begin * kSrcStageBytes)
      : tid < kTileN ? reinterpret_cast<const char*>(scales + prefetch_at)
                     : reinterpret_cast<const char*>(zeros + prefetch_at);
  const int prefetch_stride = kQ4K           ? kSrcStageBytes
                              : tid < kTileN ? groups_per_stage * 2
                                             : groups_per_stage;  // bytes per stage
  const int64_t groups_left = groups_per_row - stage_begin * groups_per_stage;
  const auto prefetch_pairs = [&](int stage) {
    if (!kTiles && prefetch_ok && static_cast<int64_t>(stage) * groups_per_stage < groups_left)
      prefetch_l2(prefetch_base + stage * prefetch_stride);
  };

  float acc[kMTiles][kTilesPerWarp][4];
#pragma unroll
  for (int i = 0; i < kMTiles; ++i)
#pragma unroll
    for (int j = 0; j < kTilesPerWarp; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e) acc[i][j][e] = 0.0f;

  // Warp (wn, wk) on a staged stage, unit by unit: the unit's A fragments of every m16 tile with a
  // real row (ldmatrix: lane l gives row l % 16, inputs 8 (l / 16) ..), then per n8 tile the B
  // fragments, dequantized once, and two 16-deep mmas per m16 tile. Each accumulator sees its units
  // in the same order whatever kMTiles is, so a row's sums do not depend on the tiles around it.
  const int a_row = lane % 16, a_col = (lane / 16) * 8;
  const auto compute = [&](int slot) {
    const uint8_t* base = smem + slot * kSlotBytes;
    const auto* xs = reinterpret_cast<const __half*>(base + kWSlotBytes);
    const auto* pairs = reinterpret_cast<const uint32_t*>(base + kWSlotBytes + kXSlotBytes);
    // A row's pairs: [row][8] as staged from registers, or [row][groups_per_stage] as a chunk holds them.
    const int pair_row_stride = kTiles ? groups_per_stage : kPairLd;
#pragma unroll
    for (int u = 0; u < kUnitsPerWarp; ++u) {
      const int unit = wk * kUnitsPerWarp + u;
      uint32_t a[kMTiles][2][4];
#pragma unroll
      for (int i = 0; i < kMTiles; ++i) {
        if (i < m_tiles) {
#pragma unroll
          for (int st = 0; st < 2; ++st)
            ldmatrix_x4(a[i][st], xs + (i * 16 + a_row) * kXRowHalves + unit * kQK4_0 + st * 16 + a_col);
        }
      }
#pragma unroll
      for (int j = 0; j < kTilesPerWarp; ++j) {
        const int row = wn * (8 * kTilesPerWarp) + j * 8 + g;
        uint32_t b[2][2];
        if constexpr (kQ4K && kTiles) {  // word t of sub-block `unit`'s run: lane t's eight levels
          const uint32_t word = reinterpret_cast<const uint32_t*>(base + row * kWRowBytes + unit * 16)[t];
          // A Q4_K chunk's pairs: [row][8] (group 32).
          w4a16::q4_k_tile_word_b_fragments(word, pairs[row * C::kMaxGroupsPerStage + unit], b);
        } else if constexpr (kQ4K) {  // sub-block `unit`: the low or high nibbles of 32-byte chunk unit / 2
          const auto* w16 = reinterpret_cast<const uint16_t*>(base + row * kWRowBytes + (unit / 2) * 32);
          w4a16::q4_k_unit_b_fragments(w16[t], w16[t + 4], w16[t + 8], w16[t + 12], unit & 1,
                                       pairs[row * kPairLd + unit], b);
        } else if constexpr (kTiles) {  // word t of the unit: lane t's eight levels (int4_tiles.hpp)
          const uint32_t word = reinterpret_cast<const uint32_t*>(base + row * kWRowBytes + unit * 16)[t];
          w4a16::int4_tile_word_b_fragments(word, pairs[row * pair_row_stride + (unit >> group_shift)], b);
        } else {
          const auto* w16 = reinterpret_cast<const uint16_t*>(base + row * kWRowBytes + unit * 16);
          w4a16::int4_unit_b_fragments_packed(w16[t], w16[t + 4],
                                              pairs[row * pair_row_stride + (unit >> group_shift)], b);
        }
#pragma unroll
        for (int i = 0; i < kMTiles; ++i) {
          if (i < m_tiles) {
            mma_16816(acc[i][j], a[i][0], b[0]);
            mma_16816(acc[i][j], a[i][1], b[1]);
          }
        }
      }
    }
  };

  // Prologue: x rows m..kRows-1 of every slot are zero for good (never copied); stages 0..2 in flight;
  // their pairs stored; stage 3's pairs in registers; stages 4 and 5's pairs on their way to L2.
  // Everything but x is weights, which no kernel writes: it all goes before the wait for the previous
  // kernel (a no-op unless launched programmatically), so that the first 48 KB of weights are on
  // their way while that kernel finishes. Stages 0..2's weights then share cp.async group 0 with
  // stage 0's x (group i still holds all of stage i).
  for (int e = tid; e < kStages * (kRows - m) * (kXRowHalves / 8); e += kThreads) {
    const int per_slot = (kRows - m) * (kXRowHalves / 8);
    const int slot = e / per_slot, r = m + (e % per_slot) / (kXRowHalves / 8), c = e % (kXRowHalves / 8);
    *reinterpret_cast<uint4*>(smem + slot * kSlotBytes + kWSlotBytes + (r * kXRowHalves + c * 8) * 2) =
        make_uint4(0, 0, 0, 0);
  }
#pragma unroll
  for (int s = 0; s < kStages - 1; ++s)
    if (s < n_stages) load_stage_weights(s, s);
  uint32_t pairs_next[kPairsPerThread];
  if constexpr (!kTiles) {  // tiles: the pairs came with the weights
#pragma unroll
    for (int s = 0; s < kStages - 1; ++s) {
      if (s < n_stages) {
        load_pairs(s, pairs_next);
        store_pairs(s, pairs_next);
      }
    }
    if (kStages - 1 < n_stages) load_pairs(kStages - 1, pairs_next);
    for (int s = kStages; s < kStages + 2 && s < n_stages; ++s) prefetch_pairs(s);
  }
  detail::wait_for_prior_grids();
  // Blocks of the next kernel, launched programmatically, may be placed now: they wait for us.
  detail::allow_dependent_launch();
#pragma unroll
  for (int s = 0; s < kStages - 1; ++s) {
    if (s < n_stages) load_stage_x(s, s);
    cp_async_commit();  // empty groups too: group i always holds stage i
  }

  for (int i = 0; i < n_stages; ++i) {
    cp_async_wait<kStages - 2>();  // stage i has landed (this thread's copies)
    __syncthreads();  // ... everyone's; and every warp is done with stage i - 1, whose slot is refilled
    const int fill = i + kStages - 1;
    constexpr bool kLoads = C::kProbe != kProbeComputeOnly;
    if (kLoads && fill < n_stages) {
      if constexpr (!kTiles) store_pairs(fill % kStages, pairs_next);
      load_stage(fill, fill % kStages);
    }
    cp_async_commit();
    if constexpr (!kTiles) {
      if (kLoads && fill + 1 < n_stages) load_pairs(fill + 1, pairs_next);  // stored next iteration
      if (kLoads && fill + 3 < n_stages) prefetch_pairs(fill + 3);          // loaded two iterations from now
    }
    if constexpr (C::kProbe != kProbeLoadsOnly) compute(i % kStages);
  }
  cp_async_wait<0>();
  __syncthreads();  // the pipeline's memory becomes the reduction buffer

  // Partial sums of warp (wn, wk) -> red[wk][row][column]; D fragment of m16 tile i: rows 16 i + g
  // and 16 i + g + 8, columns 2t, 2t + 1.
  auto* red = reinterpret_cast<float*>(smem);
#pragma unroll
  for (int i = 0; i < kMTiles; ++i) {
    if (i >= m_tiles) continue;
#pragma unroll
    for (int j = 0; j < kTilesPerWarp; ++j) {
      const int c = wn * (8 * kTilesPerWarp) + j * 8 + 2 * t;
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        *reinterpret_cast<float2*>(red + (wk * kRows + i * 16 + g + 8 * h) * kRedLd + c) =
            make_float2(acc[i][j][2 * h], acc[i][j][2 * h + 1]);
      }
    }
  }
  __syncthreads();
  // The block's sum over its warps, in warp order, into red[0]; without a cluster straight into y.
  for (int e = tid; e < m * kTileN; e += kThreads) {
    const int r = e / kTileN, c = e % kTileN;
    float v = red[r * kRedLd + c];
#pragma unroll
    for (int w = 1; w < kWarpsK; ++w) v += red[(w * kRows + r) * kRedLd + c];
    if (splits == 1) {
      if (n0 + c < n_out) y[r * n_out + n0 + c] = v;
    } else {
      red[r * kRedLd + c] = v;
    }
  }
  if (splits > 1) {
    // Cluster rank q == blockIdx.z == split q (cluster dims (1, 1, splits)). Rank `split` sums its share
    // of the tile's m x 128 outputs over ranks 0..splits-1 in order and stores it.
    cg::cluster_group cluster = cg::this_cluster();
    cluster.sync();  // every rank's red[0] is complete and visible cluster-wide
    const int total = m * kTileN;
    const int share = (total + splits - 1) / splits;
    const int end = min(total, (split + 1) * share);
    for (int e = split * share + tid; e < end; e += kThreads) {
      const int r = e / kTileN, c = e % kTileN;
      float* local = red + r * kRedLd + c;
      float v = *cluster.map_shared_rank(local, 0);
      for (int q = 1; q < splits; ++q) v += *cluster.map_shared_rank(local, q);
      if (n0 + c < n_out) y[r * n_out + n0 + c] = v;
    }
    cluster.sync();  // no block leaves (freeing its shared memory) while another still reads it
  }
}

// The split of the inputs over a cluster: about one block per SM (no more: a second partial wave
// would cost more than the split saves), at most 8 and the largest cluster the device fits, never
// more splits than stages. Depends on n_out, k and the device only, so every m gets the same sums.
template <class C>
void choose_split(int64_t n_out, int64_t k, int sm_count, int max_cluster, int& splits,
                  int& stages_per_split) {
  const int64_t tiles = (n_out + C::kTileN - 1) / C::kTileN;
  const int64_t stages_total = (k / kQK4_0 + C::kStageUnits - 1) / C::kStageUnits;
  const int64_t want =
      std::clamp<int64_t>(sm_count * C::kBlocksPerSm / tiles, 1,
                          std::min<int64_t>(std::min(kMaxSplits, max_cluster), stages_total));
  stages_per_split = static_cast<int>((stages_total + want - 1) / want);
  splits = static_cast<int>((stages_total + stages_per_split - 1) / stages_per_split);
}

// cudaFuncSetAttribute for the dynamic shared memory (above the 48 KB default), once per device.
template <class C, int GroupShift>
cudaError_t allow_shared_memory(int device) {
  static std::atomic<uint64_t> done{0};
  const uint64_t bit = device < 64 ? uint64_t{1} << device : 0;
  if (bit != 0 && (done.load(std::memory_order_acquire) & bit) != 0) return cudaSuccess;
  const cudaError_t err = cudaFuncSetAttribute(gemv_int4_groups_mma_kernel<C, GroupShift>,
                                               cudaFuncAttributeMaxDynamicSharedMemorySize, C::kSmemBytes);
  if (err == cudaSuccess) done.fetch_or(bit, std::memory_order_acq_rel);
  return err;
}

// The largest cluster (8, 4, 2 or 1 blocks) of which the device can hold at least one at a time with
// this kernel's shared memory (cudaOccupancyMaxActiveClusters), once per device: a partitioned GPU
// (MIG) or a GPC with few SMs may not fit 8 blocks of ~121 KB. 0 when the query fails.
template <class C, int GroupShift>
int max_cluster_size(int device) {
  static std::atomic<uint64_t> known[64] = {};  // per device: 0 unknown, else size + 1
  if (device >= 0 && device < 64) {
    const uint64_t v = known[device].load(std::memory_order_acquire);
    if (v != 0) return static_cast<int>(v - 1);
  }
  int best = 1;
  for (int size = kMaxSplits; size > 1; size /= 2) {
    cudaLaunchConfig_t config{};
    config.gridDim = dim3(1, 1, static_cast<unsigned>(size));
    config.blockDim = dim3(C::kThreads, 1, 1);
    config.dynamicSmemBytes = C::kSmemBytes;
    cudaLaunchAttribute cluster{};
    cluster.id = cudaLaunchAttributeClusterDimension;
    cluster.val.clusterDim.x = 1;
    cluster.val.clusterDim.y = 1;
    cluster.val.clusterDim.z = static_cast<unsigned>(size);
    config.attrs = &cluster;
    config.numAttrs = 1;
    int clusters = 0;
    if (cudaOccupancyMaxActiveClusters(&clusters, gemv_int4_groups_mma_kernel<C, GroupShift>, &config) !=
        cudaSuccess)
      return 0;  // its error left for the caller's launch_status
    if (clusters >= 1) {
      best = size;
      break;
    }
  }
  if (device >= 0 && device < 64)
    known[device].store(static_cast<uint64_t>(best) + 1, std::memory_order_release);
  return best;
}

// max_m: the most rows one call takes (C::kRows for the GEMVs; more for the 64-row GEMM, whose
// slabs of C::kRows rows are the grid's third dimension). Q4_K: quants are the blocks, scales and
// zeros unused, group 32 (a sub-block).
template <class C, int GroupShift>
Status launch_gemv_mma_checked(const uint8_t* quants, const __half* scales, const uint8_t* zeros,
                               int64_t n_out, int64_t k, const __half* x, int64_t m, float* y,
                               cudaStream_t stream, bool programmatic);

template <class C>
Status launch_gemv_mma(const uint8_t* quants, const __half* scales, const uint8_t* zeros, int64_t group,
                       int64_t n_out, int64_t k, const __half* x, int64_t m, float* y, cudaStream_t stream,
                       bool programmatic, int64_t max_m = C::kRows) {
  w4a16::Int4GroupBlocks blocks{};
  if constexpr (C::kFormat == kFormatQ4K || C::kFormat == kFormatQ4KTiles) {
    if (quants == nullptr || reinterpret_cast<uintptr_t>(quants) % 16 != 0 || k % kQK_K != 0 ||
        x == nullptr || y == nullptr || reinterpret_cast<uintptr_t>(x) % 16 != 0)
      return Status::invalid_argument;
    blocks.group_shift = 0;
  } else if constexpr (C::kFormat == kFormatInt4Tiles) {
    if (quants == nullptr || reinterpret_cast<uintptr_t>(quants) % 16 != 0 ||
        (group != 32 && group != 64 && group != 128) || k % group != 0 || x == nullptr || y == nullptr ||
        reinterpret_cast<uintptr_t>(x) % 16 != 0)
      return Status::invalid_argument;
    blocks.group_shift = group == 32 ? 0 : group == 64 ? 1 : 2;
  } else if (!w4a16::make_int4_group_operands(quants, scales, zeros, group, k, x, y, blocks)) {
    return Status::invalid_argument;
  }
  if (n_out < 0 || k < 0 || m < 1 || m > max_m) return Status::invalid_argument;
  if constexpr (C::kFormat == kFormatQ4K || C::kFormat == kFormatQ4KTiles) {
    return launch_gemv_mma_checked<C, 0>(quants, scales, zeros, n_out, k, x, m, y, stream, programmatic);
  } else {
    switch (blocks.group_shift) {
      case 0:
        return launch_gemv_mma_checked<C, 0>(quants, scales, zeros, n_out, k, x, m, y, stream, programmatic);
      case 1:
        return launch_gemv_mma_checked<C, 1>(quants, scales, zeros, n_out, k, x, m, y, stream, programmatic);
      case 2:
        return launch_gemv_mma_checked<C, 2>(quants, scales, zeros, n_out, k, x, m, y, stream, programmatic);
      default:  // a group the kernels are not built for
        return Status::invalid_argument;
    }
  }
}

// launch_gemv_mma's launch, its arguments checked (group 32 << GroupShift).
template <class C, int GroupShift>
Status launch_gemv_mma_checked(const uint8_t* quants, const __half* scales, const uint8_t* zeros,
                               int64_t n_out, int64_t k, const __half* x, int64_t m, float* y,
                               cudaStream_t stream, bool programmatic) {
  const int64_t tiles = (n_out + C::kTileN - 1) / C::kTileN;
  const int64_t slabs = (m + C::kRows - 1) / C::kRows;
  if (tiles > 65535 || slabs > INT32_MAX) return Status::invalid_argument;
  if (n_out == 0) return Status::ok;
  if (k == 0)
    return launch_status(cudaMemsetAsync(y, 0, static_cast<size_t>(m * n_out) * sizeof(float), stream));
  int device = 0, sm_count = 0;
  cudaError_t err = cudaGetDevice(&device);
  if (err == cudaSuccess) err = cudaDeviceGetAttribute(&sm_count, cudaDevAttrMultiProcessorCount, device);
  if (err == cudaSuccess) err = allow_shared_memory<C, GroupShift>(device);
  if (err != cudaSuccess) return launch_status(err);
  const int max_cluster = max_cluster_size<C, GroupShift>(device);
  if (max_cluster < 1) {  // the cluster query failed: its error is pending
    const cudaError_t pending = cudaGetLastError();
    return launch_status(pending != cudaSuccess ? pending : cudaErrorUnknown);
  }
  int splits = 1, stages_per_split = 1;
  choose_split<C>(n_out, k, sm_count, max_cluster, splits, stages_per_split);

  cudaLaunchConfig_t config{};
  // Slabs vary fastest: the blocks (and clusters) of one output tile's slabs are launched one after
  // another and run together, so the tile's weights come from device memory once and from L2 for
  // the other slabs.
  config.gridDim =
      dim3(static_cast<unsigned>(slabs), static_cast<unsigned>(tiles), static_cast<unsigned>(splits));
  config.blockDim = dim3(C::kThreads, 1, 1);
  config.dynamicSmemBytes = C::kSmemBytes;
  config.stream = stream;
  cudaLaunchAttribute attrs[2] = {};
  attrs[0].id = cudaLaunchAttributeClusterDimension;
  attrs[0].val.clusterDim.x = 1;
  attrs[0].val.clusterDim.y = 1;
  attrs[0].val.clusterDim.z = static_cast<unsigned>(splits);
  attrs[1] = detail::programmatic_launch_attribute();
  config.attrs = attrs;
  config.numAttrs = programmatic ? 2 : 1;
  const cudaError_t launched =
      cudaLaunchKernelEx(&config, gemv_int4_groups_mma_kernel<C, GroupShift>, quants, scales, zeros, n_out, k,
                         x, static_cast<int>(m), y, stages_per_split);
  return launch_status(launched);
}

}  // namespace

Status w4a16_gemv_int4_groups_mma(const uint8_t* quants, const __half* scales, const uint8_t* zeros,
                                  int64_t group, int64_t n_out, int64_t k, const __half* x, int64_t m,
                                  float* y, cudaStream_t stream, bool programmatic) {
  return launch_gemv_mma<GemvMma256>(quants, scales, zeros, group, n_out, k, x, m, y, stream, programmatic);
}

Status w4a16_gemv_int4_groups_mma_512(const uint8_t* quants, const __half* scales, const uint8_t* zeros,
                                      int64_t group, int64_t n_out, int64_t k, const __half* x, int64_t m,
                                      float* y, cudaStream_t stream, bool programmatic) {
  return launch_gemv_mma<GemvMma512>(quants, scales, zeros, group, n_out, k, x, m, y, stream, programmatic);
}

Status w4a16_gemv_int4_groups_mma_2bps(const uint8_t* quants, const __half* scales, const uint8_t* zeros,
                                       int64_t group, int64_t n_out, int64_t k, const __half* x, int64_t m,
                                       float* y, cudaStream_t stream, bool programmatic) {
  return launch_gemv_mma<GemvMma2Sm>(quants, scales, zeros, group, n_out, k, x, m, y, stream, programmatic);
}

Status w4a16_gemv_q4_k_mma(const uint8_t* w, int64_t n_out, int64_t k, const __half* x, int64_t m, float* y,
                           cudaStream_t stream, bool programmatic) {
  return launch_gemv_mma<GemvMmaQ4K>(w, nullptr, nullptr, kQK4_0, n_out, k, x, m, y, stream, programmatic);
}

Status w4a16_gemv_q4_k_mma_32rows(const uint8_t* w, int64_t n_out, int64_t k, const __half* x, int64_t m,
                                  float* y, cudaStream_t stream, bool programmatic) {
  return launch_gemv_mma<GemvMma32RowsQ4K>(w, nullptr, nullptr, kQK4_0, n_out, k, x, m, y, stream,
                                           programmatic);
}

Status w4a16_gemm_q4_k_mma_64rows(const uint8_t* w, int64_t n_out, int64_t k, const __half* x, int64_t m,
                                  float* y, cudaStream_t stream, bool programmatic) {
  return launch_gemv_mma<GemmMma64RowsQ4K>(w, nullptr, nullptr, kQK4_0, n_out, k, x, m, y, stream,
                                           programmatic, INT32_MAX);
}

Status w4a16_gemv_int4_tiles_mma(const uint8_t* tiles, int64_t group, int64_t n_out, int64_t k,
                                 const __half* x, int64_t m, float* y, cudaStream_t stream,
                                 bool programmatic) {
  return launch_gemv_mma<GemvMma256Tiles>(tiles, nullptr, nullptr, group, n_out, k, x, m, y, stream,
                                          programmatic);
}

Status w4a16_gemv_int4_tiles_mma_512(const uint8_t* tiles, int64_t group, int64_t n_out, int64_t k,
                                     const __half* x, int64_t m, float* y, cudaStream_t stream,
                                     bool programmatic) {
  return launch_gemv_mma<GemvMma512Tiles>(tiles, nullptr, nullptr, group, n_out, k, x, m, y, stream,
                                          programmatic);
}

Status w4a16_gemv_int4_tiles_mma_2bps(const uint8_t* tiles, int64_t group, int64_t n_out, int64_t k,
                                      const __half* x, int64_t m, float* y, cudaStream_t stream,
                                      bool programmatic) {
  return launch_gemv_mma<GemvMma2SmTiles>(tiles, nullptr, nullptr, group, n_out, k, x, m, y, stream,
                                          programmatic);
}

Status w4a16_gemv_int4_tiles_mma_32rows(const uint8_t* tiles, int64_t group, int64_t n_out, int64_t k,
                                        const __half* x, int64_t m, float* y, cudaStream_t stream,
                                        bool programmatic) {
  return launch_gemv_mma<GemvMma32RowsTiles>(tiles, nullptr, nullptr, group, n_out, k, x, m, y, stream,
                                             programmatic);
}

Status w4a16_gemm_int4_tiles_mma_64rows(const uint8_t* tiles, int64_t group, int64_t n_out, int64_t k,
                                        const __half* x, int64_t m, float* y, cudaStream_t stream,
                                        bool programmatic) {
  return launch_gemv_mma<GemmMma64RowsTiles>(tiles, nullptr, nullptr, group, n_out, k, x, m, y, stream,
                                             programmatic, INT32_MAX);
}

Status w4a16_gemv_q4_k_tiles_mma(const uint8_t* tiles, int64_t n_out, int64_t k, const __half* x, int64_t m,
                                 float* y, cudaStream_t stream, bool programmatic) {
  return launch_gemv_mma<GemvMmaQ4KTiles>(tiles, nullptr, nullptr, kQK4_0, n_out, k, x, m, y, stream,
                                          programmatic);
}

Status w4a16_gemv_q4_k_tiles_mma_32rows(const uint8_t* tiles, int64_t n_out, int64_t k, const __half* x,
                                        int64_t m, float* y, cudaStream_t stream, bool programmatic) {
  return launch_gemv_mma<GemvMma32RowsQ4KTiles>(tiles, nullptr, nullptr, kQK4_0, n_out, k, x, m, y, stream,
                                                programmatic);
}

Status w4a16_gemm_q4_k_tiles_mma_64rows(const uint8_t* tiles, int64_t n_out, int64_t k, const __half* x,
                                        int64_t m, float* y, cudaStream_t stream, bool programmatic) {
  return launch_gemv_mma<GemmMma64RowsQ4KTiles>(tiles, nullptr, nullptr, kQK4_0, n_out, k, x, m, y, stream,
                                                programmatic, INT32_MAX);
}

Status w4a16_q4_k_tensor_cores(const uint8_t* w, bool tiles, int64_t n_out, int64_t k, const __half* x,
                               int64_t m, float* y, cudaStream_t stream, bool programmatic) {
  if (m <= kW4A16GemvMmaMaxM) {
    return tiles ? w4a16_gemv_q4_k_tiles_mma(w, n_out, k, x, m, y, stream, programmatic)
                 : w4a16_gemv_q4_k_mma(w, n_out, k, x, m, y, stream, programmatic);
  }
  if (m <= kW4A16GemvMma32RowsMaxM) {
    return tiles ? w4a16_gemv_q4_k_tiles_mma_32rows(w, n_out, k, x, m, y, stream, programmatic)
                 : w4a16_gemv_q4_k_mma_32rows(w, n_out, k, x, m, y, stream, programmatic);
  }
  return tiles ? w4a16_gemm_q4_k_tiles_mma_64rows(w, n_out, k, x, m, y, stream, programmatic)
               : w4a16_gemm_q4_k_mma_64rows(w, n_out, k, x, m, y, stream, programmatic);
}

Status w4a16_gemv_int4_groups_mma_probe(GemvMmaProbe probe, const uint8_t* quants, const __half* scales,
                                        const uint8_t* zeros, int64_t group, int64_t n_out, int64_t k,
                                        const __half* x, int64_t m, float* y, cudaStream_t stream) {
  switch (probe) {
    case GemvMmaProbe::whole:
      return launch_gemv_mma<GemvMma256>(quants, scales, zeros, group, n_out, k, x, m, y, stream, false);
    case GemvMmaProbe::loads_only:
      return launch_gemv_mma<GemvMmaLoadsOnly>(quants, scales, zeros, group, n_out, k, x, m, y, stream,
                                               false);
    case GemvMmaProbe::compute_only:
      return launch_gemv_mma<GemvMmaComputeOnly>(quants, scales, zeros, group, n_out, k, x, m, y, stream,
                                                 false);
    case GemvMmaProbe::tiles_loads_only:  // quants: the tiled weights
      return launch_gemv_mma<GemvMmaLoadsOnlyTiles>(quants, nullptr, nullptr, group, n_out, k, x, m, y,
                                                    stream, false);
  }
  return Status::invalid_argument;
}

Status w4a16_gemv_int4_groups_mma_32rows(const uint8_t* quants, const __half* scales, const uint8_t* zeros,
                                         int64_t group, int64_t n_out, int64_t k, const __half* x, int64_t m,
                                         float* y, cudaStream_t stream, bool programmatic) {
  return launch_gemv_mma<GemvMma32Rows>(quants, scales, zeros, group, n_out, k, x, m, y, stream,
                                        programmatic);
}

Status w4a16_gemm_int4_groups_mma_64rows(const uint8_t* quants, const __half* scales, const uint8_t* zeros,
                                         int64_t group, int64_t n_out, int64_t k, const __half* x, int64_t m,
                                         float* y, cudaStream_t stream, bool programmatic) {
  return launch_gemv_mma<GemmMma64Rows>(quants, scales, zeros, group, n_out, k, x, m, y, stream, programmatic,
                                        INT32_MAX);
}

}  // namespace nibble::kernels::cuda
