// One block of 4 warps per 64×64 output tile; warp (wm, wn) owns a 32×32 quarter as 2×2 WMMA
// accumulators. Per 32-wide k step (one 32-weight unit per weight row): the dequantized weight tile
// (64 rows × 32, threads 0..63 one row each through the layout's reader of w4a16_weights.cuh, zeros
// past n_out) and the x tile (64×32 fp16, threads 64..127, 16-byte loads, zeros past m) are staged
// in shared memory, then two 16-deep MMAs per fragment. The result goes through shared memory so the
// bounds-checked store handles ragged edges. Row strides are padded to 40 halves / 68 floats (WMMA needs ldm
// % 8 / % 4 == 0 and 32-byte aligned fragment pointers: every fragment starts at a multiple of 16 rows and of
// 16 columns). Performance ideas: cp.async double-buffering, larger k steps, mma.sync with integer weights
// and the per-block scale applied to the accumulator fragments (exact weights), split-k for small grids.
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <mma.h>

#include "kernels/cuda/w4a16_gemm.cuh"
#include "kernels/cuda/w4a16_weights.cuh"
#include "kernels/quant_types.hpp"

namespace nibble::kernels::cuda {
namespace {

constexpr int kThreads = 128;
constexpr int kBM = 64;
constexpr int kBN = 64;
constexpr int kBK = 32;  // = kQK4_0
constexpr int kLdA = kBK + 8;
constexpr int kLdB = kBK + 8;
constexpr int kLdC = kBN + 4;
static_assert(kBK == kQK4_0, "one 32-weight unit per weight row per k step");
static_assert(kThreads == 2 * kBN, "half the threads dequantize the weight tile, one row each");

template <typename Blocks>
__global__ void __launch_bounds__(kThreads)
    gemm_w4a16_kernel(Blocks blocks, int64_t n_out, int64_t k, const __half* __restrict__ x, int64_t m,
                      float* __restrict__ y) {
  using namespace nvcuda;
  __shared__ __align__(32) __half a_s[kBM * kLdA];
  __shared__ __align__(32) __half b_s[kBN * kLdB];
  __shared__ __align__(32) float c_s[kBM * kLdC];

  const int tid = threadIdx.x;
  const int warp = tid / 32;
  const int wm = warp / 2;
  const int wn = warp % 2;
  const int64_t m0 = static_cast<int64_t>(blockIdx.y) * kBM;
  const int64_t n0 = static_cast<int64_t>(blockIdx.x) * kBN;
  const int64_t nb = k / kQK4_0;

  wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[2][2];
#pragma unroll
  for (int i = 0; i < 2; ++i) {
#pragma unroll
    for (int j = 0; j < 2; ++j) wmma::fill_fragment(acc[i][j], 0.0f);
  }

  for (int64_t kb = 0; kb < nb; ++kb) {
    if (tid < kBN) {
      // Threads 0..63: weight row n0 + tid's unit kb, dequantized (zeros past n_out).
      __half* dst = b_s + tid * kLdB;
      const int64_t n = n0 + tid;
      if (n < n_out) {
        float wv[kQK4_0];
        blocks.load(n, nb, kb, wv);
#pragma unroll
        for (int e = 0; e < kQK4_0; e += 2) {
          *reinterpret_cast<__half2*>(dst + e) = __floats2half2_rn(wv[e], wv[e + 1]);
        }
      } else {
#pragma unroll
        for (int e = 0; e < kQK4_0; e += 2)
          *reinterpret_cast<__half2*>(dst + e) = __floats2half2_rn(0.0f, 0.0f);
      }
    } else {
      // Threads 64..127: the x tile, 16-byte loads (zeros past m).
      for (int c = tid - kBN; c < kBM * (kBK / 8); c += kThreads - kBN) {
        const int r = c / (kBK / 8);
        const int part = c % (kBK / 8);
        uint4 v = make_uint4(0, 0, 0, 0);
        if (m0 + r < m) v = __ldg(reinterpret_cast<const uint4*>(x + (m0 + r) * k + kb * kBK + part * 8));
        *reinterpret_cast<uint4*>(a_s + r * kLdA + part * 8) = v;
      }
    }
    __syncthreads();
#pragma unroll
    for (int kk = 0; kk < kBK; kk += 16) {
      wmma::fragment<wmma::matrix_a, 16, 16, 16, __half, wmma::row_major> af[2];
      wmma::fragment<wmma::matrix_b, 16, 16, 16, __half, wmma::col_major> bf[2];
#pragma unroll
      for (int i = 0; i < 2; ++i) wmma::load_matrix_sync(af[i], a_s + (wm * 32 + i * 16) * kLdA + kk, kLdA);
#pragma unroll
      for (int j = 0; j < 2; ++j) wmma::load_matrix_sync(bf[j], b_s + (wn * 32 + j * 16) * kLdB + kk, kLdB);
#pragma unroll
      for (int i = 0; i < 2; ++i) {
#pragma unroll
        for (int j = 0; j < 2; ++j) wmma::mma_sync(acc[i][j], af[i], bf[j], acc[i][j]);
      }
    }
    __syncthreads();  // the tiles are consumed before the next step overwrites them
  }

#pragma unroll
  for (int i = 0; i < 2; ++i) {
#pragma unroll
    for (int j = 0; j < 2; ++j) {
      wmma::store_matrix_sync(c_s + (wm * 32 + i * 16) * kLdC + wn * 32 + j * 16, acc[i][j], kLdC,
                              wmma::mem_row_major);
    }
  }
  __syncthreads();
  for (int e = tid; e < kBM * kBN; e += kThreads) {
    const int r = e / kBN;
    const int c = e % kBN;
    if (m0 + r < m && n0 + c < n_out) y[(m0 + r) * n_out + n0 + c] = c_s[r * kLdC + c];
  }
}

// Shared argument checks (the weight pointers are checked by the callers) and the launch.
template <typename Blocks>
Status run(Blocks blocks, int64_t n_out, int64_t k, const __half* x, int64_t m, float* y,
           cudaStream_t stream) {
  if (x == nullptr || y == nullptr) return Status::invalid_argument;
  if (n_out < 0 || k < 0 || k % kQK4_0 != 0 || m < 1) return Status::invalid_argument;
  if (reinterpret_cast<uintptr_t>(x) % 16 != 0) return Status::invalid_argument;
  const int64_t grid_x = (n_out + kBN - 1) / kBN;
  const int64_t grid_y = (m + kBM - 1) / kBM;
  if (grid_x > INT32_MAX || grid_y > 65535) return Status::invalid_argument;
  if (n_out == 0) return Status::ok;
  const dim3 grid(static_cast<unsigned>(grid_x), static_cast<unsigned>(grid_y));
  gemm_w4a16_kernel<<<grid, kThreads, 0, stream>>>(blocks, n_out, k, x, m, y);
  return cudaGetLastError() == cudaSuccess ? Status::ok : Status::device_error;
}

}  // namespace

Status w4a16_gemm_q4_0(const uint8_t* w, int64_t n_out, int64_t k, const __half* x, int64_t m, float* y,
                       cudaStream_t stream) {
  if (w == nullptr || reinterpret_cast<uintptr_t>(w) % 2 != 0) return Status::invalid_argument;
  return run(w4a16::GgufQ4_0Blocks{w}, n_out, k, x, m, y, stream);
}

Status w4a16_gemm_int4_groups(const uint8_t* quants, const __half* scales, const uint8_t* zeros,
                              int64_t group, int64_t n_out, int64_t k, const __half* x, int64_t m, float* y,
                              cudaStream_t stream) {
  if (quants == nullptr || scales == nullptr || zeros == nullptr ||
      reinterpret_cast<uintptr_t>(quants) % 16 != 0 || reinterpret_cast<uintptr_t>(scales) % 2 != 0) {
    return Status::invalid_argument;
  }
  if ((group != 32 && group != 64 && group != 128) || k % group != 0) return Status::invalid_argument;
  const int shift = group == 32 ? 0 : group == 64 ? 1 : 2;
  return run(w4a16::Int4GroupBlocks{quants, scales, zeros, shift}, n_out, k, x, m, y, stream);
}

Status w4a16_gemm_q4_k(const uint8_t* w, int64_t n_out, int64_t k, const __half* x, int64_t m, float* y,
                       cudaStream_t stream) {
  if (w == nullptr || reinterpret_cast<uintptr_t>(w) % 16 != 0 || k % kQK_K != 0)
    return Status::invalid_argument;
  return run(w4a16::Q4KBlocks{w}, n_out, k, x, m, y, stream);
}

}  // namespace nibble::kernels::cuda
