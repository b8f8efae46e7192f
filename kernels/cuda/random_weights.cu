// One thread per Q4_0 block, grid-stride. The scale bits come from the host
// (kernels::random_q4_0_scale), so that they are fp32_to_fp16's exactly; the nibbles come from the
// shared per-block function. Stores are 2-byte (a block is 18 bytes, 2-byte aligned); generation is
// a few multiplies per element, far below the cost of writing the bytes.
#include <cuda_runtime.h>

#include "kernels/cuda/random_weights.cuh"
#include "kernels/quant_types.hpp"
#include "kernels/random_weights.hpp"
#include "kernels/random_weights_hash.hpp"

namespace nibble::kernels::cuda {
namespace {

namespace rw = random_weights;

constexpr int kThreads = 256;
constexpr int64_t kMaxBlocks = 65536;

__global__ void __launch_bounds__(kThreads)
    fill_random_q4_0_kernel(uint8_t* blocks, int64_t n_blocks, uint64_t key, uint16_t d_bits) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * kThreads;
  for (int64_t b = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x; b < n_blocks; b += stride) {
    uint8_t bytes[rw::kBlockBytes];
    rw::q4_0_block(key, static_cast<uint64_t>(b), d_bits, bytes);
    auto* out = reinterpret_cast<uint16_t*>(blocks + b * rw::kBlockBytes);
#pragma unroll
    for (int i = 0; i < rw::kBlockBytes / 2; ++i)
      out[i] =
          static_cast<uint16_t>(bytes[2 * i] | (bytes[2 * i + 1] << 8));  // little-endian, as on the host
  }
}

}  // namespace

Status fill_random_q4_0(uint8_t* blocks, int64_t n_out, int64_t k, uint64_t seed, cudaStream_t stream) {
  if (n_out < 0 || k <= 0 || k % kQK4_0 != 0) return Status::invalid_argument;
  const int64_t n_blocks = n_out * (k / kQK4_0);
  if (n_blocks == 0) return Status::ok;
  if (blocks == nullptr || reinterpret_cast<uintptr_t>(blocks) % 2 != 0) return Status::invalid_argument;
  int64_t grid = (n_blocks + kThreads - 1) / kThreads;
  if (grid > kMaxBlocks) grid = kMaxBlocks;
  fill_random_q4_0_kernel<<<static_cast<unsigned>(grid), kThreads, 0, stream>>>(
      blocks, n_blocks, rw::key_of(seed), random_q4_0_scale(k));
  return cudaGetLastError() == cudaSuccess ? Status::ok : Status::device_error;
}

}  // namespace nibble::kernels::cuda
