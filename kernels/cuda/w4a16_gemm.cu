// One block of 4 warps per 64×64 output tile; warp (wm, wn) owns a 32×32 quarter as 2×2 WMMA
// accumulators. Per 32-wide k step (one Q4_0 block per weight row): the x tile (64×32 fp16, 16-byte
// loads, zeros past m) and the dequantized weight tile (64 rows × 32, two threads per Q4_0 block
// read as 2-byte words, zeros past n_out) are staged in shared memory, then two 16-deep MMAs per
// fragment. The result goes through shared memory so the bounds-checked store handles ragged edges.
// Row strides are padded to 40 halves / 68 floats (WMMA needs ldm % 8 / % 4 == 0 and 32-byte
// aligned fragment pointers: every fragment starts at a multiple of 16 rows and of 16 columns).
// Performance ideas: cp.async double-buffering, larger k steps, mma.sync with integer weights and
// the per-block scale applied to the accumulator fragments (exact weights), split-k for small grids.
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <mma.h>

#include "kernels/cuda/w4a16_gemm.cuh"
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
static_assert(kBK == kQK4_0, "one Q4_0 block per weight row per k step");

__global__ void __launch_bounds__(kThreads)
    gemm_q4_0_kernel(const uint8_t* __restrict__ w, int64_t n_out, int64_t k, const __half* __restrict__ x,
                     int64_t m, float* __restrict__ y) {
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
  const int64_t w_row_bytes = nb * static_cast<int64_t>(sizeof(BlockQ4_0));

  wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[2][2];
#pragma unroll
  for (int i = 0; i < 2; ++i) {
#pragma unroll
    for (int j = 0; j < 2; ++j) wmma::fill_fragment(acc[i][j], 0.0f);
  }

  // The weight row this thread dequantizes (half of one block: h = 0 takes qs[0..7], h = 1 qs[8..15]).
  const int b_row = tid / 2;
  const int h = tid % 2;
  const int64_t n = n0 + b_row;

  for (int64_t kb = 0; kb < nb; ++kb) {
    for (int c = tid; c < kBM * (kBK / 8); c += kThreads) {
      const int r = c / (kBK / 8);
      const int part = c % (kBK / 8);
      uint4 v = make_uint4(0, 0, 0, 0);
      if (m0 + r < m) v = __ldg(reinterpret_cast<const uint4*>(x + (m0 + r) * k + kb * kBK + part * 8));
      *reinterpret_cast<uint4*>(a_s + r * kLdA + part * 8) = v;
    }
    {
      __half* dst = b_s + b_row * kLdB;
      if (n < n_out) {
        const auto* blk = reinterpret_cast<const uint16_t*>(w + n * w_row_bytes +
                                                            kb * static_cast<int64_t>(sizeof(BlockQ4_0)));
        const float d = __half2float(__ushort_as_half(__ldg(blk)));
#pragma unroll
        for (int j = 0; j < 4; ++j) {
          const unsigned q2 = __ldg(blk + 1 + 4 * h + j);  // qs[e] low byte, qs[e + 1] high byte
          const int e = 8 * h + 2 * j;
          dst[e] = __float2half_rn(static_cast<float>(static_cast<int>(q2 & 0xF) - 8) * d);
          dst[e + 1] = __float2half_rn(static_cast<float>(static_cast<int>((q2 >> 8) & 0xF) - 8) * d);
          dst[e + 16] = __float2half_rn(static_cast<float>(static_cast<int>((q2 >> 4) & 0xF) - 8) * d);
          dst[e + 17] = __float2half_rn(static_cast<float>(static_cast<int>((q2 >> 12) & 0xF) - 8) * d);
        }
      } else {
#pragma unroll
        for (int j = 0; j < 4; ++j) {
          const int e = 8 * h + 2 * j;
          dst[e] = dst[e + 1] = dst[e + 16] = dst[e + 17] = __float2half_rn(0.0f);
        }
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

}  // namespace

Status w4a16_gemm_q4_0(const uint8_t* w, int64_t n_out, int64_t k, const __half* x, int64_t m, float* y,
                       cudaStream_t stream) {
  if (w == nullptr || x == nullptr || y == nullptr) return Status::invalid_argument;
  if (n_out < 0 || k < 0 || k % kQK4_0 != 0 || m < 1) return Status::invalid_argument;
  if (reinterpret_cast<uintptr_t>(w) % 2 != 0 || reinterpret_cast<uintptr_t>(x) % 16 != 0) {
    return Status::invalid_argument;
  }
  const int64_t grid_x = (n_out + kBN - 1) / kBN;
  const int64_t grid_y = (m + kBM - 1) / kBM;
  if (grid_x > INT32_MAX || grid_y > 65535) return Status::invalid_argument;
  if (n_out == 0) return Status::ok;
  const dim3 grid(static_cast<unsigned>(grid_x), static_cast<unsigned>(grid_y));
  gemm_q4_0_kernel<<<grid, kThreads, 0, stream>>>(w, n_out, k, x, m, y);
  return cudaGetLastError() == cudaSuccess ? Status::ok : Status::device_error;
}

}  // namespace nibble::kernels::cuda
