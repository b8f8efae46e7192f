// One thread per Q4_0 block, grid-stride. The scale bits come from the host
// (kernels::random_q4_0_scale), so that they are fp32_to_fp16's exactly; the nibbles come from the
// shared per-block function. Stores are 2-byte (a block is 18 bytes, 2-byte aligned); generation is
// a few multiplies per element, far below the cost of writing the bytes.
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "kernels/cuda/launch_status.cuh"
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

// Element i of a benchmark operand: the stream's word i, its top 24 bits as a uniform in [0, 1).
__device__ float uniform_of(uint64_t key, int64_t i) {
  return static_cast<float>(rw::word(key, static_cast<uint64_t>(i)) >> 40) * (1.0f / 16777216.0f);
}

__global__ void __launch_bounds__(kThreads)
    fill_random_halves_kernel(__half* p, int64_t n, float scale, uint64_t key) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * kThreads;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x; i < n; i += stride)
    p[i] = __float2half((2.0f * uniform_of(key, i) - 1.0f) * scale);
}

__global__ void __launch_bounds__(kThreads)
    fill_random_bytes_kernel(uint8_t* p, int64_t n, uint8_t mask, uint64_t key) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * kThreads;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x; i < n; i += stride)
    p[i] = static_cast<uint8_t>(rw::word(key, static_cast<uint64_t>(i)) & mask);
}

unsigned grid_for(int64_t n) {
  const int64_t grid = (n + kThreads - 1) / kThreads;
  return static_cast<unsigned>(grid > kMaxBlocks ? kMaxBlocks : grid);
}

}  // namespace

Status fill_random_halves(__half* p, int64_t n, float scale, uint64_t seed, cudaStream_t stream) {
  if (n < 0 || (n > 0 && p == nullptr)) return Status::invalid_argument;
  if (n == 0) return Status::ok;
  fill_random_halves_kernel<<<grid_for(n), kThreads, 0, stream>>>(p, n, scale, rw::key_of(seed));
  return launch_status();
}

Status fill_random_bytes(uint8_t* p, int64_t n, uint8_t mask, uint64_t seed, cudaStream_t stream) {
  if (n < 0 || (n > 0 && p == nullptr)) return Status::invalid_argument;
  if (n == 0) return Status::ok;
  fill_random_bytes_kernel<<<grid_for(n), kThreads, 0, stream>>>(p, n, mask, rw::key_of(seed));
  return launch_status();
}

Status fill_random_q4_0(uint8_t* blocks, int64_t n_out, int64_t k, uint64_t seed, cudaStream_t stream) {
  if (n_out < 0 || k <= 0 || k % kQK4_0 != 0) return Status::invalid_argument;
  const int64_t n_blocks = n_out * (k / kQK4_0);
  if (n_blocks == 0) return Status::ok;
  if (blocks == nullptr || reinterpret_cast<uintptr_t>(blocks) % 2 != 0) return Status::invalid_argument;
  int64_t grid = (n_blocks + kThreads - 1) / kThreads;
  if (grid > kMaxBlocks) grid = kMaxBlocks;
  fill_random_q4_0_kernel<<<static_cast<unsigned>(grid), kThreads, 0, stream>>>(
      blocks, n_blocks, rw::key_of(seed), random_q4_0_scale(k));
  return launch_status();
}

}  // namespace nibble::kernels::cuda
