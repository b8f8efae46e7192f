#pragma once
// Tensor-core decode GEMV for group-wise INT4 weights (kernels/int4_groups.hpp) and fp16 activations:
//   y[m, n_out] = x[m, k] · W[n_out, k]ᵀ,  1 <= m <= 16,
// the bandwidth-oriented small-m sibling of w4a16_gemm_int4_groups_mma: the activation rows are one
// zero-padded m16 tile, weights stream through shared memory (cp.async, 4 stages) and are dequantized
// in registers into mma.sync B fragments. The SIMT w4a16_gemv_int4_groups does m FMAs per weight on
// the CUDA cores, which makes it compute-bound from a few rows on; here the tensor cores do them.
//
// Numerics: as the mma GEMM's, each weight (q - zero) · scale rounded once to fp16, products summed in
// fp32 (error below 2^-11 · Σ|x · w| plus the fp32 sums). Results are bit-reproducible run to run (no
// atomics, every sum in a fixed order), and a row's outputs do not depend on m (the split of the work
// depends only on n_out, k and the device's SM count), so batching decode rows changes no bits.
#include <cuda_fp16.h>
#include <cuda_runtime_api.h>

#include <cstdint>

#include "kernels/status.hpp"

namespace nibble::kernels::cuda {

// Largest number of activation rows one call handles (one m16 tensor-core tile).
constexpr int64_t kW4A16GemvMmaMaxM = 16;

// All pointers are device pointers.
// quants: [n_out, k / 2] bytes, 16-byte aligned: per 32-input unit, input j in the low nibble of
//         byte j and input j + 16 in its high nibble (the split order of kernels/int4_groups.hpp)
// scales: [n_out, k / group] __half, 2-byte aligned
// zeros:  [n_out, k / group] uint8 (0..31: exact through 1024 + zero in fp16); weight = (q - zero) · scale
// x:      [m, k] __half, row-major (rows k apart), 16-byte aligned
// y:      [m, n_out] float, row-major (rows n_out apart); every element written
// group: 32, 64 or 128, dividing k; 1 <= m <= 16; 0 <= n_out <= 65535 · 128 (0: nothing launched); k == 0
// gives zeros. Enqueues work on `stream` (asynchronous); programmatic: as a programmatic dependent launch
// (kernels/cuda/dependent_launch.cuh), which starts the copies of the first three stages' weights
// before waiting for the previous kernel. Returns invalid_argument (nothing launched) for a bad
// argument, device_error if a CUDA call fails. Same arguments and layout as w4a16_gemv_int4_groups
// (kernels/cuda/w4a16_gemv.cuh).
Status w4a16_gemv_int4_groups_mma(const uint8_t* quants, const __half* scales, const uint8_t* zeros,
                                  int64_t group, int64_t n_out, int64_t k, const __half* x, int64_t m,
                                  float* y, cudaStream_t stream, bool programmatic = false);

// The same product, arguments and results (bit for bit: the same sums in the same order? no: the
// inputs are split differently among warps, so the fp32 sums differ in order) from two other
// shapes of the same kernel, for the load-time timing to choose among (w4a16_tuning.cuh):
//   _512:  512 threads (16 warps, one 32-input unit each per stage) and 4 stages, one block an SM;
//   _2bps: 256 threads and 3 stages (~91 KB of shared memory), two blocks an SM.
// Both give 16 warps an SM where the first gives 8. Each is deterministic and independent of m.
Status w4a16_gemv_int4_groups_mma_512(const uint8_t* quants, const __half* scales, const uint8_t* zeros,
                                      int64_t group, int64_t n_out, int64_t k, const __half* x, int64_t m,
                                      float* y, cudaStream_t stream, bool programmatic = false);
Status w4a16_gemv_int4_groups_mma_2bps(const uint8_t* quants, const __half* scales, const uint8_t* zeros,
                                       int64_t group, int64_t n_out, int64_t k, const __half* x, int64_t m,
                                       float* y, cudaStream_t stream, bool programmatic = false);

// The same kernel on more activation rows, for batched decode past 16 rows and for prefill, where
// dequant + cuBLAS writes and reads 16-bit copies of the weights and the SIMT kernels run out of
// FMAs: each dequantized B fragment feeds an mma per m16 tile of rows. Arguments, layout and
// numerics as above; deterministic, and a row's outputs do not depend on m (nor on its slab).
//   _32rows: two m16 tiles, 1 <= m <= kW4A16GemvMma32RowsMaxM (256 threads, 4 stages).
//   _64rows: four m16 tiles, 1 <= m <= INT32_MAX: the rows go in slabs of 64, the slabs of an
//            output tile run side by side, so its weights come from device memory once and from L2
//            for the other slabs.
constexpr int64_t kW4A16GemvMma32RowsMaxM = 32;
Status w4a16_gemv_int4_groups_mma_32rows(const uint8_t* quants, const __half* scales, const uint8_t* zeros,
                                         int64_t group, int64_t n_out, int64_t k, const __half* x, int64_t m,
                                         float* y, cudaStream_t stream, bool programmatic = false);
Status w4a16_gemm_int4_groups_mma_64rows(const uint8_t* quants, const __half* scales, const uint8_t* zeros,
                                         int64_t group, int64_t n_out, int64_t k, const __half* x, int64_t m,
                                         float* y, cudaStream_t stream, bool programmatic = false);

// The same kernels on GGUF Q4_K super-blocks as stored (no conversion at load: a stage of 256 inputs
// is one super-block a row; its header gives the 8 sub-blocks' scales and mins, each rounded to fp16,
// and a weight is scale * q - min rounded once to fp16: w4a16::q4_k_unit_b_fragments).
// w: [n_out, k / 256] BlockQ4_K, 16-byte aligned; k % 256 == 0; the rest as above:
// w4a16_gemv_q4_k_mma 1 <= m <= 16, _32rows m <= 32, w4a16_gemm_q4_k_mma_64rows any m >= 1.
Status w4a16_gemv_q4_k_mma(const uint8_t* w, int64_t n_out, int64_t k, const __half* x, int64_t m, float* y,
                           cudaStream_t stream, bool programmatic = false);
Status w4a16_gemv_q4_k_mma_32rows(const uint8_t* w, int64_t n_out, int64_t k, const __half* x, int64_t m,
                                  float* y, cudaStream_t stream, bool programmatic = false);
Status w4a16_gemm_q4_k_mma_64rows(const uint8_t* w, int64_t n_out, int64_t k, const __half* x, int64_t m,
                                  float* y, cudaStream_t stream, bool programmatic = false);

// The same five kernels (w4a16_gemv_int4_groups_mma, _512, _2bps, _32rows and
// w4a16_gemm_int4_groups_mma_64rows) on group-wise INT4 repacked into their own chunks
// (kernels/int4_tiles.hpp, made on the device by kernels/cuda/int4_tiles.cuh): a block's stage is one
// contiguous chunk of 16 KB of nibbles and its packed (scale, zero) pairs, copied straight through,
// where the row-major layout has it read 128 lines k / 2 bytes apart plus scales and zeros in 2- and
// 1-byte pieces. The same arithmetic in the same order: each gives bit for bit what its row-major
// twin gives on the weights the chunks were made from.
// tiles: [int4_tiles_bytes(n_out, k, group)] bytes, 16-byte aligned; group 32, 64 or 128 dividing k;
// the rest (x, m, y, stream, programmatic, the row limits) as the row-major kernels.
Status w4a16_gemv_int4_tiles_mma(const uint8_t* tiles, int64_t group, int64_t n_out, int64_t k,
                                 const __half* x, int64_t m, float* y, cudaStream_t stream,
                                 bool programmatic = false);
Status w4a16_gemv_int4_tiles_mma_512(const uint8_t* tiles, int64_t group, int64_t n_out, int64_t k,
                                     const __half* x, int64_t m, float* y, cudaStream_t stream,
                                     bool programmatic = false);
Status w4a16_gemv_int4_tiles_mma_2bps(const uint8_t* tiles, int64_t group, int64_t n_out, int64_t k,
                                      const __half* x, int64_t m, float* y, cudaStream_t stream,
                                      bool programmatic = false);
Status w4a16_gemv_int4_tiles_mma_32rows(const uint8_t* tiles, int64_t group, int64_t n_out, int64_t k,
                                        const __half* x, int64_t m, float* y, cudaStream_t stream,
                                        bool programmatic = false);
Status w4a16_gemm_int4_tiles_mma_64rows(const uint8_t* tiles, int64_t group, int64_t n_out, int64_t k,
                                        const __half* x, int64_t m, float* y, cudaStream_t stream,
                                        bool programmatic = false);

// The three Q4_K kernels (w4a16_gemv_q4_k_mma, _32rows, w4a16_gemm_q4_k_mma_64rows) on Q4_K repacked
// into chunks (kernels/int4_tiles.hpp's Q4_K chunks, made on the device by q4_k_tiles_from_blocks):
// the same bits as on the blocks as stored. tiles: [q4_k_tiles_bytes(n_out, k)] bytes, 16-byte
// aligned; k % 256 == 0; the rest as above.
Status w4a16_gemv_q4_k_tiles_mma(const uint8_t* tiles, int64_t n_out, int64_t k, const __half* x, int64_t m,
                                 float* y, cudaStream_t stream, bool programmatic = false);
Status w4a16_gemv_q4_k_tiles_mma_32rows(const uint8_t* tiles, int64_t n_out, int64_t k, const __half* x,
                                        int64_t m, float* y, cudaStream_t stream, bool programmatic = false);
Status w4a16_gemm_q4_k_tiles_mma_64rows(const uint8_t* tiles, int64_t n_out, int64_t k, const __half* x,
                                        int64_t m, float* y, cudaStream_t stream, bool programmatic = false);

// The Q4_K tensor-core kernel for m rows (m >= 1): the GEMV up to 16, its two-tile shape up to 32,
// the 64-row GEMM above; on the blocks as stored, or on Q4_K chunks when `tiles`.
Status w4a16_q4_k_tensor_cores(const uint8_t* w, bool tiles, int64_t n_out, int64_t k, const __half* x,
                               int64_t m, float* y, cudaStream_t stream, bool programmatic = false);

// For the benchmark only: what limits the tensor-core GEMV (the 256-thread shape). `whole` is
// w4a16_gemv_int4_groups_mma itself; `loads_only` streams every stage's weights, activations and
// scales through the same pipeline and barriers but computes nothing (y gets zeros); `compute_only`
// loads the first stages only and computes every stage on whatever the slots hold (y is
// meaningless). Their times against the whole kernel's say whether memory or the dequantize-and-mma
// work sets its pace. `tiles_loads_only` is loads_only on tiled weights (quants: the tiles, scales and
// zeros unused): against loads_only it says what the layout alone is worth. Arguments as
// w4a16_gemv_int4_groups_mma's.
enum class GemvMmaProbe { whole, loads_only, compute_only, tiles_loads_only };
Status w4a16_gemv_int4_groups_mma_probe(GemvMmaProbe probe, const uint8_t* quants, const __half* scales,
                                        const uint8_t* zeros, int64_t group, int64_t n_out, int64_t k,
                                        const __half* x, int64_t m, float* y, cudaStream_t stream);

}  // namespace nibble::kernels::cuda
