#include <cuda_runtime.h>

#include "kernels/cuda/int4_tiles.cuh"
#include "kernels/cuda/launch_status.cuh"
#include "kernels/cuda/w4a16_weights.cuh"
#include "kernels/int4_tiles.hpp"

namespace nibble::kernels::cuda {
namespace {

constexpr int kThreads = 256;

// One thread per 32-input run: its 16 nibble bytes into the run's place in its chunk, in the chunk's
// fragment order.
__global__ void __launch_bounds__(kThreads)
    tile_runs_kernel(const uint8_t* __restrict__ quants, int64_t k, int64_t runs, int64_t stages,
                     int64_t chunk_bytes, uint8_t* __restrict__ tiles) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  if (i >= runs) return;
  const int64_t runs_per_row = k / 32;
  const int64_t row = i / runs_per_row, run = i % runs_per_row;
  const int64_t t = row / kInt4TileRows, r = row % kInt4TileRows, s = run / 8, u = run % 8;
  const uint4 v = __ldg(reinterpret_cast<const uint4*>(quants + row * (k / 2) + run * 16));
  const uint32_t in[4] = {v.x, v.y, v.z, v.w};
  uint32_t out[4];
  int4_tile_words_from_run(in, out);
  *reinterpret_cast<uint4*>(tiles + (t * stages + s) * chunk_bytes + r * 128 + u * 16) =
      make_uint4(out[0], out[1], out[2], out[3]);
}

// One thread per group: its (scale, zero) packed into the chunk's pairs.
__global__ void __launch_bounds__(kThreads)
    tile_pairs_kernel(const uint16_t* __restrict__ scales, const uint8_t* __restrict__ zeros, int64_t group,
                      int64_t k, int64_t groups, int64_t stages, int64_t chunk_bytes,
                      uint8_t* __restrict__ tiles) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  if (i >= groups) return;
  const int64_t groups_per_row = k / group, groups_per_stage = kInt4TileInputs / group;
  const int64_t row = i / groups_per_row, gi = i % groups_per_row;
  const int64_t t = row / kInt4TileRows, r = row % kInt4TileRows;
  const int64_t s = gi / groups_per_stage, j = gi % groups_per_stage;
  *reinterpret_cast<uint32_t*>(tiles + (t * stages + s) * chunk_bytes + kInt4TileNibbleBytes +
                               (r * groups_per_stage + j) * 4) =
      static_cast<uint32_t>(scales[i]) | (static_cast<uint32_t>(0x6400 + zeros[i]) << 16);  // int4_tile_pair
}

// One thread per (row, super-block): its 8 sub-blocks' levels in the fragment order and their packed
// (scale, min).
__global__ void __launch_bounds__(kThreads)
    tile_q4_k_kernel(const uint8_t* __restrict__ blocks, int64_t super_blocks, int64_t stages,
                     int64_t chunk_bytes, uint8_t* __restrict__ tiles) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  if (i >= super_blocks) return;
  const int64_t row = i / stages, s = i % stages;
  const int64_t t = row / kInt4TileRows, r = row % kInt4TileRows;
  const auto* src = reinterpret_cast<const uint4*>(blocks + i * static_cast<int64_t>(sizeof(BlockQ4_K)));
  uint8_t* chunk = tiles + (t * stages + s) * chunk_bytes;
  auto* runs = reinterpret_cast<uint4*>(chunk + r * 128);
#pragma unroll
  for (int c = 0; c < 4; ++c) {  // qs bytes 32 c .. 32 c + 31: sub-blocks 2 c (low nibbles), 2 c + 1
    const uint4 a = __ldg(src + 1 + 2 * c), b = __ldg(src + 2 + 2 * c);
    const uint32_t qs32[8] = {a.x, a.y, a.z, a.w, b.x, b.y, b.z, b.w};
    uint32_t words[4];
#pragma unroll
    for (int high = 0; high < 2; ++high) {
      q4_k_tile_words_from_sub_block(qs32, high, words);
      runs[2 * c + high] = make_uint4(words[0], words[1], words[2], words[3]);
    }
  }
  const uint4 head = __ldg(src);
  uint32_t pairs[8];
#pragma unroll
  for (int j = 0; j < 8; ++j) pairs[j] = w4a16::q4_k_packed_scale_min(head, j);
  auto* out = reinterpret_cast<uint4*>(chunk + kInt4TileNibbleBytes + r * 32);
  out[0] = make_uint4(pairs[0], pairs[1], pairs[2], pairs[3]);
  out[1] = make_uint4(pairs[4], pairs[5], pairs[6], pairs[7]);
}

bool launch_ok(int64_t threads, int64_t& blocks) {
  blocks = (threads + kThreads - 1) / kThreads;
  return blocks <= INT32_MAX;
}

}  // namespace

Status int4_tiles_from_groups(const uint8_t* quants, const uint16_t* scales, const uint8_t* zeros,
                              int64_t n_out, int64_t k, int64_t group, uint8_t* tiles, cudaStream_t stream) {
  if (quants == nullptr || scales == nullptr || zeros == nullptr || tiles == nullptr || n_out < 0 || k < 0 ||
      (group != 32 && group != 64 && group != 128) || k % group != 0 ||
      reinterpret_cast<uintptr_t>(quants) % 16 != 0 || reinterpret_cast<uintptr_t>(tiles) % 16 != 0 ||
      reinterpret_cast<uintptr_t>(scales) % 2 != 0)
    return Status::invalid_argument;
  const int64_t bytes = int4_tiles_bytes(n_out, k, group);
  const int64_t runs = n_out * (k / 32), groups = n_out * (k / group);
  int64_t run_blocks = 0, pair_blocks = 0;
  if (!launch_ok(runs, run_blocks) || !launch_ok(groups, pair_blocks)) return Status::invalid_argument;
  if (bytes == 0) return Status::ok;
  if (const cudaError_t err = cudaMemsetAsync(tiles, 0, static_cast<size_t>(bytes), stream);
      err != cudaSuccess)
    return launch_status(err);
  const int64_t stages = (k + kInt4TileInputs - 1) / kInt4TileInputs;
  const int64_t chunk_bytes = int4_tiles_chunk_bytes(group);
  if (run_blocks > 0) {
    tile_runs_kernel<<<static_cast<unsigned>(run_blocks), kThreads, 0, stream>>>(quants, k, runs, stages,
                                                                                 chunk_bytes, tiles);
    tile_pairs_kernel<<<static_cast<unsigned>(pair_blocks), kThreads, 0, stream>>>(
        scales, zeros, group, k, groups, stages, chunk_bytes, tiles);
  }
  return launch_status();
}

Status q4_k_tiles_from_blocks(const uint8_t* blocks, int64_t n_out, int64_t k, uint8_t* tiles,
                              cudaStream_t stream) {
  if (blocks == nullptr || tiles == nullptr || n_out < 0 || k < 0 || k % kQK_K != 0 ||
      reinterpret_cast<uintptr_t>(blocks) % 16 != 0 || reinterpret_cast<uintptr_t>(tiles) % 16 != 0)
    return Status::invalid_argument;
  const int64_t stages = k / kQK_K, super_blocks = n_out * stages;
  int64_t grid = 0;
  if (!launch_ok(super_blocks, grid)) return Status::invalid_argument;
  const int64_t bytes = q4_k_tiles_bytes(n_out, k);
  if (bytes == 0) return Status::ok;
  if (const cudaError_t err = cudaMemsetAsync(tiles, 0, static_cast<size_t>(bytes), stream);
      err != cudaSuccess)
    return launch_status(err);
  tile_q4_k_kernel<<<static_cast<unsigned>(grid), kThreads, 0, stream>>>(blocks, super_blocks, stages,
                                                                         int4_tiles_chunk_bytes(32), tiles);
  return launch_status();
}

}  // namespace nibble::kernels::cuda
