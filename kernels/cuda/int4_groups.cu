// One thread per Q4_0 block, grid-stride: nine 2-byte loads (the block's only alignment), one
// 16-byte store of its nibbles; the first block of each group writes the group's scale and zero, the
// others compare their scale with it.
#include <cuda_runtime.h>

#include "kernels/cuda/int4_groups.cuh"
#include "kernels/cuda/launch_status.cuh"
#include "kernels/quant_types.hpp"

namespace nibble::kernels::cuda {
namespace {

constexpr int kThreads = 256;
constexpr int64_t kMaxGrid = 65536;

__global__ void __launch_bounds__(kThreads)
    int4_groups_from_q4_0_kernel(const uint16_t* __restrict__ blocks, int64_t n_blocks, int64_t per_group,
                                 uint4* __restrict__ quants, uint16_t* __restrict__ scales,
                                 uint8_t* __restrict__ zeros, int32_t* mismatch) {
  constexpr int64_t kWords = sizeof(BlockQ4_0) / 2;  // 9: d, then 8 words of nibbles
  const int64_t stride = static_cast<int64_t>(gridDim.x) * kThreads;
  for (int64_t b = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x; b < n_blocks; b += stride) {
    const uint16_t* blk = blocks + b * kWords;
    const int64_t g = b / per_group;  // rows are whole groups: group g is blocks [g * per, (g + 1) * per)
    const uint16_t d = blk[0];
    if (b % per_group == 0) {
      scales[g] = d;
      zeros[g] = 8;
    } else if (d != blocks[g * per_group * kWords]) {
      *mismatch = 1;
    }
    uint32_t w[4];
#pragma unroll
    for (int i = 0; i < 4; ++i)
      w[i] = static_cast<uint32_t>(blk[1 + 2 * i]) | (static_cast<uint32_t>(blk[2 + 2 * i]) << 16);
    quants[b] = make_uint4(w[0], w[1], w[2], w[3]);
  }
}

}  // namespace

Status int4_groups_from_q4_0(const uint8_t* blocks, int64_t n_out, int64_t k, int64_t group, uint8_t* quants,
                             uint16_t* scales, uint8_t* zeros, int32_t* mismatch, cudaStream_t stream) {
  if (blocks == nullptr || quants == nullptr || scales == nullptr || zeros == nullptr || mismatch == nullptr)
    return Status::invalid_argument;
  if (n_out < 0 || k < 0 || (group != 32 && group != 64 && group != 128) || k % group != 0)
    return Status::invalid_argument;
  if (reinterpret_cast<uintptr_t>(blocks) % 2 != 0 || reinterpret_cast<uintptr_t>(quants) % 16 != 0)
    return Status::invalid_argument;
  const int64_t n_blocks = n_out * (k / kQK4_0);
  if (n_blocks == 0) return Status::ok;
  int64_t grid = (n_blocks + kThreads - 1) / kThreads;
  if (grid > kMaxGrid) grid = kMaxGrid;
  int4_groups_from_q4_0_kernel<<<static_cast<unsigned>(grid), kThreads, 0, stream>>>(
      reinterpret_cast<const uint16_t*>(blocks), n_blocks, group / kQK4_0, reinterpret_cast<uint4*>(quants),
      scales, zeros, mismatch);
  return launch_status();
}

}  // namespace nibble::kernels::cuda
