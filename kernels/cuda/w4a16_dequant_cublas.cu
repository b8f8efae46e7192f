#include <cuda_runtime.h>

#include <algorithm>

#include "kernels/cuda/launch_status.cuh"
#include "kernels/cuda/w4a16_dequant_cublas.cuh"
#include "kernels/cuda/w4a16_weights.cuh"
#include "kernels/int4_tiles.hpp"

namespace nibble::kernels::cuda {
namespace {

constexpr int kRun = 32;  // inputs per 16-byte run of nibbles
constexpr int kThreads = 256;

bool valid_shape(const uint8_t* quants, const __half* scales, const uint8_t* zeros, int64_t group,
                 int64_t n_out, int64_t k) {
  return quants != nullptr && scales != nullptr && zeros != nullptr && n_out >= 0 && k > 0 &&
         (group == 32 || group == 64 || group == 128) && k % group == 0 &&
         reinterpret_cast<uintptr_t>(quants) % 16 == 0;
}

// One thread per 32-input run: its 16 nibble bytes in one load, 32 halves out in four 16-byte stores.
// Tiles: quants are the chunks (kernels/int4_tiles.hpp), scales and zeros unused.
template <bool Tiles>
__global__ void __launch_bounds__(kThreads)
    dequantize_int4_f16_kernel(const uint8_t* __restrict__ quants, const __half* __restrict__ scales,
                               const uint8_t* __restrict__ zeros, int64_t group, int64_t k, int64_t row_begin,
                               int64_t runs, __half* __restrict__ out) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  if (i >= runs) return;
  const int64_t runs_per_row = k / kRun;
  const int64_t row = row_begin + i / runs_per_row, run = i % runs_per_row;
  float scale;
  int zero;
  const uint8_t* nibbles;
  if constexpr (Tiles) {
    const int64_t groups_per_stage = kInt4TileInputs / group;
    const int64_t stages = (k + kInt4TileInputs - 1) / kInt4TileInputs;
    const int64_t r = row % kInt4TileRows, s = run / 8, u = run % 8;
    const uint8_t* chunk = quants + ((row / kInt4TileRows) * stages + s) *
                                        (kInt4TileNibbleBytes + kInt4TileRows * groups_per_stage * 4);
    nibbles = chunk + r * 128 + u * 16;
    const uint32_t pair = *reinterpret_cast<const uint32_t*>(chunk + kInt4TileNibbleBytes +
                                                             (r * groups_per_stage + u * kRun / group) * 4);
    scale = __half2float(__ushort_as_half(static_cast<unsigned short>(pair & 0xFFFF)));
    zero = static_cast<int>(pair >> 16) - 0x6400;
  } else {
    const int64_t g = row * (k / group) + run * kRun / group;
    scale = __half2float(scales[g]);
    zero = zeros[g];
    nibbles = quants + row * (k / 2) + run * (kRun / 2);
  }
  const uint4 q = __ldg(reinterpret_cast<const uint4*>(nibbles));
  const uint32_t words[4] = {q.x, q.y, q.z, q.w};
  // Rows: input j in the low nibble of byte j, input j + 16 in its high nibble (int4_groups.hpp);
  // tiles: int4_tiles.hpp's fragment order. The product of a level in -15..15 and an fp16 scale is
  // exact in fp32, so this rounds once, to fp16.
  __align__(16) __half v[kRun];
#pragma unroll
  for (int j = 0; j < kRun; ++j) {
    const int level = Tiles ? int4_tile_level(words, j)
                            : static_cast<int>((words[(j % 16) / 4] >> (8 * (j % 4) + 4 * (j / 16))) & 0xF);
    v[j] = __float2half_rn(static_cast<float>(level - zero) * scale);
  }
  uint4* dst = reinterpret_cast<uint4*>(out + i * kRun);
  const uint4* src = reinterpret_cast<const uint4*>(v);
#pragma unroll
  for (int p = 0; p < 4; ++p) dst[p] = src[p];
}

// GGUF blocks through a reader of w4a16_weights.cuh: one thread per 32-weight unit, its weights
// (exact in fp32, as the CPU dequantizes them) rounded once to fp16, four 16-byte stores.
template <typename Blocks>
__global__ void __launch_bounds__(kThreads)
    dequantize_blocks_f16_kernel(Blocks blocks, int64_t k, int64_t row_begin, int64_t units,
                                 __half* __restrict__ out) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  if (i >= units) return;
  const int64_t nb = k / kRun;
  float wv[kRun];
  blocks.load(row_begin + i / nb, nb, i % nb, wv);
  __align__(16) __half v[kRun];
#pragma unroll
  for (int j = 0; j < kRun; ++j) v[j] = __float2half_rn(wv[j]);
  uint4* dst = reinterpret_cast<uint4*>(out + i * kRun);
  const uint4* src = reinterpret_cast<const uint4*>(v);
#pragma unroll
  for (int p = 0; p < 4; ++p) dst[p] = src[p];
}

template <typename Blocks>
Status launch_dequantize_blocks(Blocks blocks, int64_t k, int64_t row_begin, int64_t rows, __half* out,
                                cudaStream_t stream) {
  if (rows == 0) return Status::ok;
  const int64_t units = rows * (k / kRun);
  const int64_t grid = (units + kThreads - 1) / kThreads;
  if (grid > INT32_MAX) return Status::invalid_argument;
  dequantize_blocks_f16_kernel<Blocks>
      <<<static_cast<unsigned>(grid), kThreads, 0, stream>>>(blocks, k, row_begin, units, out);
  return launch_status();
}

template <bool Tiles>
Status launch_dequantize(const uint8_t* quants, const __half* scales, const uint8_t* zeros, int64_t group,
                         int64_t k, int64_t row_begin, int64_t rows, __half* out, cudaStream_t stream) {
  if (rows == 0) return Status::ok;
  const int64_t runs = rows * (k / kRun);
  const int64_t blocks = (runs + kThreads - 1) / kThreads;
  if (blocks > INT32_MAX) return Status::invalid_argument;
  dequantize_int4_f16_kernel<Tiles><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(
      quants, scales, zeros, group, k, row_begin, runs, out);
  return launch_status();
}

bool valid_tiles(const uint8_t* tiles, int64_t group, int64_t n_out, int64_t k) {
  return tiles != nullptr && n_out >= 0 && k > 0 && (group == 32 || group == 64 || group == 128) &&
         k % group == 0 && reinterpret_cast<uintptr_t>(tiles) % 16 == 0;
}

// Per chunk of the scratch's rows: dequantize(r0, rows) into the scratch, then cublasGemmEx.
template <typename Dequantize>
Status dequant_cublas(const Int4CublasContext& context, int64_t n_out, int64_t k, const __half* x, int64_t m,
                      float* y, cudaStream_t stream, Dequantize&& dequantize) {
  if (x == nullptr || y == nullptr || m < 1 || reinterpret_cast<uintptr_t>(x) % 16 != 0 ||
      context.cublas == nullptr || context.scratch == nullptr ||
      reinterpret_cast<uintptr_t>(context.scratch) % 16 != 0)
    return Status::invalid_argument;
  const int64_t chunk = int4_cublas_chunk_rows(context, n_out, k);
  if (chunk < 1 || n_out > INT32_MAX || k > INT32_MAX || m > INT32_MAX) return Status::invalid_argument;
  if (n_out == 0) return Status::ok;
  // Only when it differs: cublasSetStream also resets the handle's workspace to cuBLAS's own pool,
  // which would allocate inside a graph capture.
  cudaStream_t current = nullptr;
  cublasStatus_t status = cublasGetStream(context.cublas, &current);
  if (status != CUBLAS_STATUS_SUCCESS)
    return library_failure("cuBLAS cublasGetStream", cublasGetStatusString(status));
  if (current != stream && (status = cublasSetStream(context.cublas, stream)) != CUBLAS_STATUS_SUCCESS)
    return library_failure("cuBLAS cublasSetStream", cublasGetStatusString(status));
  const float one = 1.0f, zero = 0.0f;
  for (int64_t r0 = 0; r0 < n_out; r0 += chunk) {
    const int64_t rows = std::min(chunk, n_out - r0);
    const Status st = dequantize(r0, rows);
    if (st != Status::ok) return st;
    // Column-major view: the chunk [rows, k] row-major is its transpose with ld k; x [m, k] row-major
    // is column-major [k, m]; y's columns r0 .. r0 + rows - 1 are rows of a column-major [n_out, m]
    // with ld n_out.
    status = cublasGemmEx(context.cublas, CUBLAS_OP_T, CUBLAS_OP_N, static_cast<int>(rows),
                          static_cast<int>(m), static_cast<int>(k), &one, context.scratch, CUDA_R_16F,
                          static_cast<int>(k), x, CUDA_R_16F, static_cast<int>(k), &zero, y + r0, CUDA_R_32F,
                          static_cast<int>(n_out), CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT);
    if (status != CUBLAS_STATUS_SUCCESS)
      return library_failure("cuBLAS cublasGemmEx", cublasGetStatusString(status));
  }
  return Status::ok;
}

}  // namespace

Status dequantize_int4_groups_f16(const uint8_t* quants, const __half* scales, const uint8_t* zeros,
                                  int64_t group, int64_t n_out, int64_t k, int64_t row_begin, int64_t rows,
                                  __half* out, cudaStream_t stream) {
  if (!valid_shape(quants, scales, zeros, group, n_out, k) || out == nullptr ||
      reinterpret_cast<uintptr_t>(out) % 16 != 0 || row_begin < 0 || rows < 0 || row_begin + rows > n_out)
    return Status::invalid_argument;
  return launch_dequantize<false>(quants, scales, zeros, group, k, row_begin, rows, out, stream);
}

Status dequantize_int4_tiles_f16(const uint8_t* tiles, int64_t group, int64_t n_out, int64_t k,
                                 int64_t row_begin, int64_t rows, __half* out, cudaStream_t stream) {
  if (!valid_tiles(tiles, group, n_out, k) || out == nullptr || reinterpret_cast<uintptr_t>(out) % 16 != 0 ||
      row_begin < 0 || rows < 0 || row_begin + rows > n_out)
    return Status::invalid_argument;
  return launch_dequantize<true>(tiles, nullptr, nullptr, group, k, row_begin, rows, out, stream);
}

int64_t int4_cublas_chunk_rows(const Int4CublasContext& context, int64_t n_out, int64_t k) {
  if (k <= 0 || context.scratch_halves < k) return 0;
  int64_t rows = context.scratch_halves / k;
  if (rows >= 128) rows = rows / 128 * 128;
  return std::min(rows, std::max<int64_t>(n_out, 1));
}

Status w4a16_int4_groups_dequant_cublas(const Int4CublasContext& context, const uint8_t* quants,
                                        const __half* scales, const uint8_t* zeros, int64_t group,
                                        int64_t n_out, int64_t k, const __half* x, int64_t m, float* y,
                                        cudaStream_t stream) {
  if (!valid_shape(quants, scales, zeros, group, n_out, k)) return Status::invalid_argument;
  return dequant_cublas(context, n_out, k, x, m, y, stream, [&](int64_t r0, int64_t rows) {
    return dequantize_int4_groups_f16(quants, scales, zeros, group, n_out, k, r0, rows, context.scratch,
                                      stream);
  });
}

Status w4a16_int4_tiles_dequant_cublas(const Int4CublasContext& context, const uint8_t* tiles, int64_t group,
                                       int64_t n_out, int64_t k, const __half* x, int64_t m, float* y,
                                       cudaStream_t stream) {
  if (!valid_tiles(tiles, group, n_out, k)) return Status::invalid_argument;
  return dequant_cublas(context, n_out, k, x, m, y, stream, [&](int64_t r0, int64_t rows) {
    return dequantize_int4_tiles_f16(tiles, group, n_out, k, r0, rows, context.scratch, stream);
  });
}

namespace {

// GGUF blocks as stored (2-byte aligned rows of k / block_size blocks) through the chunked cuBLAS path.
template <typename Blocks>
Status blocks_dequant_cublas(const Int4CublasContext& context, const uint8_t* w, int64_t block_size,
                             int64_t n_out, int64_t k, const __half* x, int64_t m, float* y,
                             cudaStream_t stream) {
  if (w == nullptr || reinterpret_cast<uintptr_t>(w) % 2 != 0 || n_out < 0 || k <= 0 || k % block_size != 0)
    return Status::invalid_argument;
  return dequant_cublas(context, n_out, k, x, m, y, stream, [&](int64_t r0, int64_t rows) {
    return launch_dequantize_blocks(Blocks{w}, k, r0, rows, context.scratch, stream);
  });
}

}  // namespace

Status w4a16_q8_0_dequant_cublas(const Int4CublasContext& context, const uint8_t* w, int64_t n_out, int64_t k,
                                 const __half* x, int64_t m, float* y, cudaStream_t stream) {
  return blocks_dequant_cublas<w4a16::Q8_0Blocks>(context, w, kRun, n_out, k, x, m, y, stream);
}

Status w4a16_q6_k_dequant_cublas(const Int4CublasContext& context, const uint8_t* w, int64_t n_out, int64_t k,
                                 const __half* x, int64_t m, float* y, cudaStream_t stream) {
  w4a16::Q6KPlanes planes{};
  if (!w4a16::make_q6_k_planes(w, n_out, k, planes)) return Status::invalid_argument;
  return dequant_cublas(context, n_out, k, x, m, y, stream, [&](int64_t r0, int64_t rows) {
    return launch_dequantize_blocks(planes, k, r0, rows, context.scratch, stream);
  });
}

Status w4a16_gguf_blocks_dequant_cublas(const Int4CublasContext& context, DType type, const uint8_t* w,
                                        int64_t n_out, int64_t k, const __half* x, int64_t m, float* y,
                                        cudaStream_t stream) {
  if (n_out < 0) return Status::invalid_argument;
  return w4a16::with_gguf_blocks(type, w, k, [&](auto blocks) {
    return dequant_cublas(context, n_out, k, x, m, y, stream, [&](int64_t r0, int64_t rows) {
      return launch_dequantize_blocks(blocks, k, r0, rows, context.scratch, stream);
    });
  });
}

}  // namespace nibble::kernels::cuda
