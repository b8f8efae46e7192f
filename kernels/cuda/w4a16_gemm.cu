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

#include "kernels/cuda/dependent_launch.cuh"
#include "kernels/cuda/launch_status.cuh"
#include "kernels/cuda/mma.cuh"
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
  detail::wait_for_prior_grids();  // a no-op unless launched programmatically
  // Blocks of the next kernel, launched programmatically, may be placed now: they wait for us.
  detail::allow_dependent_launch();

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

// ---- mma.sync variant for group-wise INT4 ----
// Block tile 64 rows (m) x 128 outputs (n), 4 warps, warp w owning outputs 32w .. 32w + 31 of the
// tile for all 64 rows: 4 m16 x 4 n8 accumulator tiles (64 floats a lane). Per 32-input unit: the
// x tile (64 x 32 fp16) and the weight tile (128 rows x 16 nibble bytes) are copied into shared
// memory with cp.async, double-buffered (unit kb + 1 loads while kb computes); A fragments are read
// from the x tile as PTX's m16n8k16 layout places them, B fragments are dequantized from four
// nibble bytes per lane and row (int4_unit_b_fragments), scale and zero read through the read-only
// cache. Out-of-range rows and outputs are zero-filled by the copies (src-size 0).
constexpr int kMmaBM = 64;
constexpr int kMmaBN = 128;
static_assert(kThreads == kMmaBN, "each thread copies one weight row of the tile per unit");
constexpr int kMmaLdX = kQK4_0 + 8;  // halves per staged x row: 80 bytes, conflict-free A reads

using detail::cp_async_16;
using detail::cp_async_commit;
using detail::cp_async_wait;
using detail::mma_16816;

__global__ void __launch_bounds__(kThreads)
    gemm_int4_groups_mma_kernel(const uint8_t* __restrict__ quants, const __half* __restrict__ scales,
                                const uint8_t* __restrict__ zeros, int group_shift, int64_t n_out, int64_t k,
                                const __half* __restrict__ x, int64_t m, float* __restrict__ y) {
  __shared__ __align__(16) __half x_s[2][kMmaBM][kMmaLdX];
  __shared__ __align__(16) uint8_t w_s[2][kMmaBN][16];
  detail::wait_for_prior_grids();  // a no-op unless launched programmatically
  // Blocks of the next kernel, launched programmatically, may be placed now: they wait for us.
  detail::allow_dependent_launch();

  const int tid = threadIdx.x;
  const int lane = tid % 32, warp = tid / 32;
  const int g = lane / 4, t = lane % 4;
  const int64_t m0 = static_cast<int64_t>(blockIdx.y) * kMmaBM;
  const int64_t n0 = static_cast<int64_t>(blockIdx.x) * kMmaBN;
  const int64_t nb = k / kQK4_0;
  const int64_t groups_per_row = nb >> group_shift;

  // Unit kb's tiles into buffer `buf`: x rows are 4 chunks of 16 bytes (2 per thread), weight rows
  // one chunk (1 per thread).
  const auto load_unit = [&](int64_t kb, int buf) {
    for (int c = tid; c < kMmaBM * 4; c += kThreads) {
      const int r = c / 4, part = c % 4;
      const bool valid = m0 + r < m;
      cp_async_16(&x_s[buf][r][part * 8], valid ? x + (m0 + r) * k + kb * kQK4_0 + part * 8 : x, valid);
    }
    const bool valid = n0 + tid < n_out;
    cp_async_16(w_s[buf][tid], valid ? quants + ((n0 + tid) * nb + kb) * 16 : quants, valid);
    cp_async_commit();
  };

  float acc[4][4][4];
#pragma unroll
  for (int i = 0; i < 4; ++i)
#pragma unroll
    for (int j = 0; j < 4; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e) acc[i][j][e] = 0.0f;

  load_unit(0, 0);
  for (int64_t kb = 0; kb < nb; ++kb) {
    const int buf = static_cast<int>(kb % 2);
    if (kb + 1 < nb) {
      load_unit(kb + 1, buf ^ 1);
      cp_async_wait<1>();  // unit kb has landed; kb + 1 may still be in flight
    } else {
      cp_async_wait<0>();
    }
    __syncthreads();

    // B fragments of the warp's 4 n8 tiles for both 16-deep steps of the unit.
    uint32_t b[4][2][2];
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const int row = warp * 32 + j * 8 + g;
      const int64_t n = n0 + row;
      float scale = 0.0f;
      int zero = 0;
      if (n < n_out) {
        const int64_t gi = n * groups_per_row + (kb >> group_shift);
        scale = __half2float(__ldg(scales + gi));
        zero = __ldg(zeros + gi);
      }
      const auto* w16 = reinterpret_cast<const uint16_t*>(w_s[buf][row]);
      w4a16::int4_unit_b_fragments(w16[t], w16[t + 4], scale, zero, b[j]);
    }
#pragma unroll
    for (int st = 0; st < 2; ++st) {
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        // A fragment of m16 tile i, inputs 16 st .. 16 st + 15: rows g and g + 8, inputs 2t, 2t + 1
        // and 2t + 8, 2t + 9 (PTX's a0..a7 order).
        const __half* r0 = &x_s[buf][i * 16 + g][st * 16 + 2 * t];
        const __half* r1 = &x_s[buf][i * 16 + g + 8][st * 16 + 2 * t];
        const uint32_t a[4] = {*reinterpret_cast<const uint32_t*>(r0), *reinterpret_cast<const uint32_t*>(r1),
                               *reinterpret_cast<const uint32_t*>(r0 + 8),
                               *reinterpret_cast<const uint32_t*>(r1 + 8)};
#pragma unroll
        for (int j = 0; j < 4; ++j) mma_16816(acc[i][j], a, b[j][st]);
      }
    }
    __syncthreads();  // buffer `buf` is consumed before unit kb + 2 is copied into it
  }

  // D fragment: rows g and g + 8 of the m16 tile, outputs 2t and 2t + 1 of the n8 tile.
#pragma unroll
  for (int i = 0; i < 4; ++i) {
#pragma unroll
    for (int j = 0; j < 4; ++j) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int64_t r = m0 + i * 16 + g + (e / 2) * 8;
        const int64_t c = n0 + warp * 32 + j * 8 + 2 * t + e % 2;
        if (r < m && c < n_out) y[r * n_out + c] = acc[i][j][e];
      }
    }
  }
}

// Shared argument checks (the weight pointers are checked by the callers) and the launch.
template <typename Blocks>
Status run(Blocks blocks, int64_t n_out, int64_t k, const __half* x, int64_t m, float* y, cudaStream_t stream,
           bool programmatic) {
  if (x == nullptr || y == nullptr) return Status::invalid_argument;
  if (n_out < 0 || k < 0 || k % kQK4_0 != 0 || m < 1) return Status::invalid_argument;
  if (reinterpret_cast<uintptr_t>(x) % 16 != 0) return Status::invalid_argument;
  const int64_t grid_x = (n_out + kBN - 1) / kBN;
  const int64_t grid_y = (m + kBM - 1) / kBM;
  if (grid_x > INT32_MAX || grid_y > 65535) return Status::invalid_argument;
  if (n_out == 0) return Status::ok;
  const dim3 grid(static_cast<unsigned>(grid_x), static_cast<unsigned>(grid_y));
  const cudaError_t launched = detail::launch_kernel(gemm_w4a16_kernel<Blocks>, grid, dim3(kThreads), 0,
                                                     stream, programmatic, blocks, n_out, k, x, m, y);
  return launch_status(launched);
}

}  // namespace

Status w4a16_gemm_q4_0(const uint8_t* w, int64_t n_out, int64_t k, const __half* x, int64_t m, float* y,
                       cudaStream_t stream, bool programmatic) {
  if (w == nullptr || reinterpret_cast<uintptr_t>(w) % 2 != 0) return Status::invalid_argument;
  return run(w4a16::GgufQ4_0Blocks{w}, n_out, k, x, m, y, stream, programmatic);
}

Status w4a16_gemm_int4_groups(const uint8_t* quants, const __half* scales, const uint8_t* zeros,
                              int64_t group, int64_t n_out, int64_t k, const __half* x, int64_t m, float* y,
                              cudaStream_t stream, bool programmatic) {
  w4a16::Int4GroupBlocks blocks{};
  if (!w4a16::make_int4_group_blocks(quants, scales, zeros, group, k, blocks))
    return Status::invalid_argument;
  return run(blocks, n_out, k, x, m, y, stream, programmatic);
}

Status w4a16_gemm_int4_groups_mma(const uint8_t* quants, const __half* scales, const uint8_t* zeros,
                                  int64_t group, int64_t n_out, int64_t k, const __half* x, int64_t m,
                                  float* y, cudaStream_t stream, bool programmatic) {
  w4a16::Int4GroupBlocks blocks{};
  if (!w4a16::make_int4_group_operands(quants, scales, zeros, group, k, x, y, blocks))
    return Status::invalid_argument;
  if (n_out < 0 || k < 0 || m < 1) return Status::invalid_argument;
  const int64_t grid_x = (n_out + kMmaBN - 1) / kMmaBN;
  const int64_t grid_y = (m + kMmaBM - 1) / kMmaBM;
  if (grid_x > INT32_MAX || grid_y > 65535) return Status::invalid_argument;
  if (n_out == 0 || k == 0) {
    if (n_out > 0)
      return launch_status(cudaMemsetAsync(y, 0, static_cast<size_t>(m * n_out) * sizeof(float), stream));
    return Status::ok;
  }
  const dim3 grid(static_cast<unsigned>(grid_x), static_cast<unsigned>(grid_y));
  const cudaError_t launched =
      detail::launch_kernel(gemm_int4_groups_mma_kernel, grid, dim3(kThreads), 0, stream, programmatic,
                            quants, scales, zeros, blocks.group_shift, n_out, k, x, m, y);
  return launch_status(launched);
}

Status w4a16_gemm_q4_k(const uint8_t* w, int64_t n_out, int64_t k, const __half* x, int64_t m, float* y,
                       cudaStream_t stream, bool programmatic) {
  if (w == nullptr || reinterpret_cast<uintptr_t>(w) % 16 != 0 || k % kQK_K != 0)
    return Status::invalid_argument;
  return run(w4a16::Q4KBlocks{w}, n_out, k, x, m, y, stream, programmatic);
}

Status w4a16_gemm_q8_0(const uint8_t* w, int64_t n_out, int64_t k, const __half* x, int64_t m, float* y,
                       cudaStream_t stream, bool programmatic) {
  if (w == nullptr || reinterpret_cast<uintptr_t>(w) % 2 != 0) return Status::invalid_argument;
  return run(w4a16::Q8_0Blocks{w}, n_out, k, x, m, y, stream, programmatic);
}

Status w4a16_gemm_q6_k(const uint8_t* w, int64_t n_out, int64_t k, const __half* x, int64_t m, float* y,
                       cudaStream_t stream, bool programmatic) {
  w4a16::Q6KPlanes planes{};
  if (!w4a16::make_q6_k_planes(w, n_out, k, planes)) return Status::invalid_argument;
  return run(planes, n_out, k, x, m, y, stream, programmatic);
}

}  // namespace nibble::kernels::cuda
