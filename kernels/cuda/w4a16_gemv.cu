// One warp per output row. Lane l handles the row's 32-weight units l, l + 32, ...: it dequantizes the
// unit's 32 weights into registers once and uses them for every activation row, so each weight
// byte is read from memory exactly once per call. Partial sums are reduced with warp shuffles.
// Every weight layout shares the kernel through a loader that dequantizes one 32-weight unit: Q4_0
// GGUF blocks as stored, the split layout whose 16-byte nibble loads coalesce across the warp
// (kernels/q4_0_split.hpp), group-wise INT4 (kernels/int4_groups.hpp) and GGUF Q4_K super-blocks.
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "kernels/cuda/dependent_launch.cuh"
#include "kernels/cuda/launch_status.cuh"
#include "kernels/cuda/mma.cuh"
#include "kernels/cuda/w4a16_gemv.cuh"
#include "kernels/cuda/w4a16_weights.cuh"

namespace nibble::kernels::cuda {
namespace {

using w4a16::GgufQ4_0Blocks;
using w4a16::Int4GroupBlocks;
using w4a16::Q4KBlocks;
using w4a16::Q6KPlanes;
using w4a16::Q8_0Blocks;
using w4a16::SplitQ4_0Blocks;

constexpr int kWarpSize = 32;
constexpr int kWarpsPerBlock = 4;

// MaxM: compile-time upper bound on m, so the accumulators stay in registers; m <= MaxM at run time.
// The arithmetic after the weights are loaded is the same for every layout, so layouts that load the
// same weights give bit-identical results.
template <int MaxM, typename Blocks>
__global__ void __launch_bounds__(kWarpSize* kWarpsPerBlock)
    gemv_w4a16_kernel(Blocks blocks, int64_t n_out, int64_t k, const __half* __restrict__ x, int m,
                      float* __restrict__ y) {
  const int lane = threadIdx.x % kWarpSize;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + threadIdx.x / kWarpSize;
  if (row >= n_out) return;  // whole warps exit together: the shuffles below stay full-warp

  const int64_t nb = k / kQK4_0;
  float acc[MaxM];
#pragma unroll
  for (int r = 0; r < MaxM; ++r) acc[r] = 0.0f;

  // A programmatic launch waits here for the kernel that wrote x (loading the first weights before
  // the wait would keep 32 more registers live across it: half the warps per SM at m = 1).
  detail::wait_for_prior_grids();
  // Blocks of the next kernel, launched programmatically, may be placed now: they wait for us.
  detail::allow_dependent_launch();
  for (int64_t b = lane; b < nb; b += kWarpSize) {
    float wv[kQK4_0];
    blocks.load(row, nb, b, wv);
#pragma unroll
    for (int r = 0; r < MaxM; ++r) {
      if (r < m) {
        // 32 halves = 64 bytes = four 16-byte loads (x is 16-byte aligned and k % 32 == 0).
        const auto* xv = reinterpret_cast<const uint4*>(x + r * k + b * kQK4_0);
        float s = 0.0f;
#pragma unroll
        for (int c = 0; c < 4; ++c) {
          const uint4 chunk = __ldg(xv + c);
          const __half2* h = reinterpret_cast<const __half2*>(&chunk);
#pragma unroll
          for (int p = 0; p < 4; ++p) {
            const float2 f = __half22float2(h[p]);
            s = fmaf(f.x, wv[c * 8 + 2 * p], s);
            s = fmaf(f.y, wv[c * 8 + 2 * p + 1], s);
          }
        }
        acc[r] += s;
      }
    }
  }

#pragma unroll
  for (int r = 0; r < MaxM; ++r) {
    if (r < m) {
      float v = acc[r];
#pragma unroll
      for (int off = kWarpSize / 2; off > 0; off /= 2) v += __shfl_xor_sync(0xffffffffu, v, off);
      if (lane == (r % kWarpSize)) y[r * n_out + row] = v;
    }
  }
}

// The staged GEMV (w4a16_gemv_int4_groups_staged): one activation row, one output row a warp, 16
// warps a block. Per chunk of 4096 inputs the block widens the activations to fp32 in shared memory
// once (each unit's 32 floats padded to 36, so that the 8 lanes of a quarter-warp's 16-byte reads and
// writes fall on distinct banks), then every lane takes 4 units of its row: their weight loads are
// issued together, then each unit is int4_unit_level_dot (a byte permute, an add and an FMA a
// weight) times the group's scale. Two chunk buffers, so one barrier a chunk: a warp can only stage
// chunk c + 2 into a buffer after the barrier of chunk c + 1, which every warp reaches after its
// work on chunk c.
constexpr int kStagedWarps = 16;
constexpr int kStagedThreads = kWarpSize * kStagedWarps;
constexpr int kStagedUnitsPerLane = 4;
constexpr int kStagedChunkUnits = kWarpSize * kStagedUnitsPerLane;  // 128 units = 4096 inputs
constexpr int kStagedUnitFloats = kQK4_0 + 4;

__global__ void __launch_bounds__(kStagedThreads)
    gemv_int4_groups_staged_kernel(Int4GroupBlocks w, int64_t n_out, int64_t k, const __half* __restrict__ x,
                                   float* __restrict__ y) {
  __shared__ __align__(16) float xs[2][kStagedChunkUnits * kStagedUnitFloats];  // 2 x 18 KB
  const int lane = threadIdx.x % kWarpSize;
  const int64_t warp_row = static_cast<int64_t>(blockIdx.x) * kStagedWarps + threadIdx.x / kWarpSize;
  // A warp past the last row still stages activations and meets the barriers; it reads the last row
  // again and stores nothing.
  const int64_t row = warp_row < n_out ? warp_row : n_out - 1;
  const int64_t nb = k / kQK4_0;
  const auto* quants = reinterpret_cast<const uint4*>(w.quants) + row * nb;
  float acc = 0.0f;

  // The row's first chunk of weights on its way to L2 while the first activations are staged (and,
  // launched programmatically, while the previous kernel finishes): 16 units, one 128-byte line, a lane.
  const int64_t first_lines = ((nb < kStagedChunkUnits ? nb : kStagedChunkUnits) * 16 + 127) / 128;
  if (lane < first_lines) detail::prefetch_l2(quants + lane * 8);
  detail::wait_for_prior_grids();  // x comes from the previous kernel
  // Blocks of the next kernel, launched programmatically, may be placed now: they wait for us.
  detail::allow_dependent_launch();
  for (int64_t c0 = 0, chunk = 0; c0 < nb; c0 += kStagedChunkUnits, ++chunk) {
    const int units = static_cast<int>(nb - c0 < kStagedChunkUnits ? nb - c0 : kStagedChunkUnits);
    // This lane's units of the chunk: their loads first, all in flight together.
    uint4 q[kStagedUnitsPerLane];
    float scale[kStagedUnitsPerLane], neg_biased_zero[kStagedUnitsPerLane];
#pragma unroll
    for (int i = 0; i < kStagedUnitsPerLane; ++i) {
      const int u = lane + kWarpSize * i;
      if (u < units) {
        const int64_t g = (row * nb + c0 + u) >> w.group_shift;
        q[i] = __ldg(quants + c0 + u);
        scale[i] = __half2float(__ldg(w.scales + g));
        neg_biased_zero[i] = -w4a16::two23_plus(__ldg(w.zeros + g));
      }
    }
    // The chunk's activations, 8 a thread per step, into this chunk's buffer.
    float* buf = xs[chunk & 1];
    for (int p = threadIdx.x; p < units * 4; p += kStagedThreads) {
      const uint4 v = __ldg(reinterpret_cast<const uint4*>(x + c0 * kQK4_0) + p);
      const __half2* h = reinterpret_cast<const __half2*>(&v);
      const float2 a = __half22float2(h[0]), b = __half22float2(h[1]);
      const float2 c = __half22float2(h[2]), d = __half22float2(h[3]);
      auto* dst = reinterpret_cast<float4*>(buf + (p / 4) * kStagedUnitFloats + (p % 4) * 8);
      dst[0] = make_float4(a.x, a.y, b.x, b.y);
      dst[1] = make_float4(c.x, c.y, d.x, d.y);
    }
    __syncthreads();
#pragma unroll
    for (int i = 0; i < kStagedUnitsPerLane; ++i) {
      const int u = lane + kWarpSize * i;
      if (u < units)
        acc = fmaf(scale[i],
                   w4a16::int4_unit_level_dot(q[i], neg_biased_zero[i], buf + u * kStagedUnitFloats), acc);
    }
  }
#pragma unroll
  for (int off = kWarpSize / 2; off > 0; off /= 2) acc += __shfl_xor_sync(0xffffffffu, acc, off);
  if (lane == 0 && warp_row < n_out) y[warp_row] = acc;
}

template <int MaxM, typename Blocks>
cudaError_t launch(Blocks blocks, int64_t n_out, int64_t k, const __half* x, int m, float* y,
                   cudaStream_t stream, bool programmatic) {
  const auto grid = static_cast<unsigned>((n_out + kWarpsPerBlock - 1) / kWarpsPerBlock);
  return detail::launch_kernel(gemv_w4a16_kernel<MaxM, Blocks>, dim3(grid), dim3(kWarpSize * kWarpsPerBlock),
                               0, stream, programmatic, blocks, n_out, k, x, m, y);
}

// Shared argument checks (the weight pointers are checked by the callers) and the MaxM dispatch.
// Compact: three row bounds (1, 8, 32) instead of five, for the rarer types (fewer kernels to compile).
template <typename Blocks, bool Compact = false>
Status run(Blocks blocks, int64_t n_out, int64_t k, const __half* x, int64_t m, float* y, cudaStream_t stream,
           bool programmatic) {
  if (x == nullptr || y == nullptr) return Status::invalid_argument;
  if (n_out < 0 || k < 0 || k % kQK4_0 != 0) return Status::invalid_argument;
  if (m < 1 || m > kW4A16GemvMaxM) return Status::invalid_argument;
  if (reinterpret_cast<uintptr_t>(x) % 16 != 0) return Status::invalid_argument;
  // The grid's x dimension is at most 2^31 - 1 blocks.
  if ((n_out + kWarpsPerBlock - 1) / kWarpsPerBlock > INT32_MAX) return Status::invalid_argument;
  if (n_out == 0) return Status::ok;

  const int mi = static_cast<int>(m);
  if constexpr (Compact) {
    const cudaError_t launched = mi <= 1   ? launch<1>(blocks, n_out, k, x, mi, y, stream, programmatic)
                                 : mi <= 8 ? launch<8>(blocks, n_out, k, x, mi, y, stream, programmatic)
                                           : launch<32>(blocks, n_out, k, x, mi, y, stream, programmatic);
    return launch_status(launched);
  } else {
    const cudaError_t launched = mi <= 1    ? launch<1>(blocks, n_out, k, x, mi, y, stream, programmatic)
                                 : mi <= 4  ? launch<4>(blocks, n_out, k, x, mi, y, stream, programmatic)
                                 : mi <= 8  ? launch<8>(blocks, n_out, k, x, mi, y, stream, programmatic)
                                 : mi <= 16 ? launch<16>(blocks, n_out, k, x, mi, y, stream, programmatic)
                                            : launch<32>(blocks, n_out, k, x, mi, y, stream, programmatic);
    return launch_status(launched);
  }
}

}  // namespace

Status w4a16_gemv_q4_0(const uint8_t* w, int64_t n_out, int64_t k, const __half* x, int64_t m, float* y,
                       cudaStream_t stream, bool programmatic) {
  if (w == nullptr || reinterpret_cast<uintptr_t>(w) % 2 != 0) return Status::invalid_argument;
  return run(GgufQ4_0Blocks{w}, n_out, k, x, m, y, stream, programmatic);
}

Status w4a16_gemv_q4_0_split(const uint8_t* quants, const __half* scales, int64_t n_out, int64_t k,
                             const __half* x, int64_t m, float* y, cudaStream_t stream, bool programmatic) {
  if (quants == nullptr || scales == nullptr || reinterpret_cast<uintptr_t>(quants) % 16 != 0 ||
      reinterpret_cast<uintptr_t>(scales) % 2 != 0) {
    return Status::invalid_argument;
  }
  return run(SplitQ4_0Blocks{quants, scales}, n_out, k, x, m, y, stream, programmatic);
}

Status w4a16_gemv_int4_groups(const uint8_t* quants, const __half* scales, const uint8_t* zeros,
                              int64_t group, int64_t n_out, int64_t k, const __half* x, int64_t m, float* y,
                              cudaStream_t stream, bool programmatic) {
  Int4GroupBlocks blocks{};
  if (!w4a16::make_int4_group_blocks(quants, scales, zeros, group, k, blocks))
    return Status::invalid_argument;
  return run(blocks, n_out, k, x, m, y, stream, programmatic);
}

Status w4a16_gemv_int4_groups_staged(const uint8_t* quants, const __half* scales, const uint8_t* zeros,
                                     int64_t group, int64_t n_out, int64_t k, const __half* x, int64_t m,
                                     float* y, cudaStream_t stream, bool programmatic) {
  Int4GroupBlocks blocks{};
  if (!w4a16::make_int4_group_blocks(quants, scales, zeros, group, k, blocks))
    return Status::invalid_argument;
  if (x == nullptr || y == nullptr || m != 1 || n_out < 0 || k < 0 || k % kQK4_0 != 0 ||
      reinterpret_cast<uintptr_t>(x) % 16 != 0) {
    return Status::invalid_argument;
  }
  if ((n_out + kStagedWarps - 1) / kStagedWarps > INT32_MAX) return Status::invalid_argument;
  if (n_out == 0) return Status::ok;
  const auto grid = static_cast<unsigned>((n_out + kStagedWarps - 1) / kStagedWarps);
  const cudaError_t launched =
      detail::launch_kernel(gemv_int4_groups_staged_kernel, dim3(grid), dim3(kStagedThreads), 0, stream,
                            programmatic, blocks, n_out, k, x, y);
  return launch_status(launched);
}

Status w4a16_gemv_q4_k(const uint8_t* w, int64_t n_out, int64_t k, const __half* x, int64_t m, float* y,
                       cudaStream_t stream, bool programmatic) {
  if (w == nullptr || reinterpret_cast<uintptr_t>(w) % 16 != 0 || k % kQK_K != 0)
    return Status::invalid_argument;
  return run(Q4KBlocks{w}, n_out, k, x, m, y, stream, programmatic);
}

Status w4a16_gemv_q8_0(const uint8_t* w, int64_t n_out, int64_t k, const __half* x, int64_t m, float* y,
                       cudaStream_t stream, bool programmatic) {
  if (w == nullptr || reinterpret_cast<uintptr_t>(w) % 2 != 0) return Status::invalid_argument;
  return run(Q8_0Blocks{w}, n_out, k, x, m, y, stream, programmatic);
}

Status w4a16_gemv_q6_k(const uint8_t* w, int64_t n_out, int64_t k, const __half* x, int64_t m, float* y,
                       cudaStream_t stream, bool programmatic) {
  Q6KPlanes planes{};
  if (!w4a16::make_q6_k_planes(w, n_out, k, planes)) return Status::invalid_argument;
  return run(planes, n_out, k, x, m, y, stream, programmatic);
}

Status w4a16_gemv_gguf_blocks(DType type, const uint8_t* w, int64_t n_out, int64_t k, const __half* x,
                              int64_t m, float* y, cudaStream_t stream, bool programmatic) {
  return w4a16::with_gguf_blocks(type, w, k, [&](auto blocks) {
    return run<decltype(blocks), /*Compact=*/true>(blocks, n_out, k, x, m, y, stream, programmatic);
  });
}

}  // namespace nibble::kernels::cuda
