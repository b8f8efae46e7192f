#pragma once
// Which group-wise INT4 kernel multiplies one weight shape on this device, per range of activation
// rows, chosen by timing the candidates on the model's own weights when it loads (TensorRT-LLM's
// GEMM plugin profiles its tactics the same way when it builds an engine). These candidates take the
// same operands and layout:
//   CUDA-core GEMV    w4a16_gemv_int4_groups           (up to 32 rows; m FMAs per weight on the CUDA cores)
//   tensor-core GEMV  w4a16_gemv_int4_groups_mma       (up to 16 rows; one m16 tile)
//   WMMA GEMM         w4a16_gemm_int4_groups           (any rows)
//   mma GEMM          w4a16_gemm_int4_groups_mma       (any rows)
//   dequant + cuBLAS  w4a16_int4_groups_dequant_cublas (17 rows or more; needs a cuBLAS handle and scratch)
//   tensor-core GEMV 512 threads / 2 blocks an SM: w4a16_gemv_int4_groups_mma_512 / _2bps (up to 16 rows;
//                     the tensor-core GEMV with twice the warps an SM, w4a16_gemv_mma.cuh)
//   staged GEMV       w4a16_gemv_int4_groups_staged   (1 row; the unit's scale factored out, fp32
//                     activations in shared memory: fewer instructions a weight)
//   TC GEMV 32 rows   w4a16_gemv_int4_groups_mma_32rows (up to 32 rows: two m16 tiles)
//   TC GEMM 64 rows   w4a16_gemm_int4_groups_mma_64rows (any rows, in slabs of four m16 tiles)
//   half2 GEMV        w4a16_gemv_int4_groups_half2     (1 row; fp16 pairs, ~2 instructions a weight, each
//                     unit's 32 products summed in fp16 first: w4a16_gemv_half2.cuh; at group 128 on
//                     the rows, each of its block shapes timed and the fastest kept: half2_variant)
// The last three read their own copy of the weights, in CUTLASS's order (w4a16_gemm_cutlass.cuh), and
// are timed only where the caller made one:
//   CUTLASS GEMM      w4a16_gemm_int4_cutlass, cooperative_128 (17 rows or more; Hopper's wgmma)
//   CUTLASS GEMM 64   the same, pingpong_64 (64 weight rows a tile: more tiles for few activation rows)
//   CUTLASS 64x16     the same, pingpong_64x16 (up to 32 rows; 16 activation rows a tile, for decode)
// And one that is never timed nor chosen by the rule, because its arithmetic differs (8-bit
// activations): the model pins it where asked (CudaModelOptions::int8_activations):
//   W4A8 GEMV         w4a8_gemv_int4_groups (up to 4 rows; dp4a, w4a8_gemv.cuh)
// Group-wise INT4 also comes repacked into the tensor-core kernels' chunks (Int4Layout::tiles,
// kernels/int4_tiles.hpp): the five tensor-core kernels and dequant + cuBLAS read it (the same bits
// as on the row-major layout), the CUDA-core GEMVs and the older GEMMs do not, and the timing then
// chooses among those six. Or only in CUTLASS's order (Int4Layout::cutlass: the copy is the matrix):
// only the three CUTLASS schedules read it.
// Ranges: 1 row (batch-1 decode), 2-16 rows (batched decode; timed at 4 and 16), 17-32 rows (timed at
// 32), 33-64 (large-batch decode; timed at 64), over 64 (prefill; timed at 256). One row has its own range
// because the CUDA-core GEMV wins there and only there: on an H200 (2026-12-04, llama-70b's shapes) it took
// 26-302 us against the tensor-core GEMV's 30-383 us at 1 row, but 318-4313 us against 32-409 us at 16, so
// one range for 1-16 chose the tensor-core GEMV and made batch-1 decode 21% slower. One kernel serves a whole
// range, and each kernel's outputs for a row do not depend on m, so a row's bits do not change with
// how many other rows of its range share the batch.
#include <cuda_fp16.h>
#include <cuda_runtime_api.h>

#include <cstdint>
#include <string>
#include <vector>

#include "kernels/cuda/w4a16_dequant_cublas.cuh"
#include "kernels/cuda/w4a16_gemm_cutlass.cuh"
#include "kernels/cuda/w4a16_gemv_half2.cuh"
#include "kernels/status.hpp"

namespace nibble::kernels::cuda {

// One weight matrix in w4a16_gemv_int4_groups's layout (device pointers, same alignment rules).
struct Int4GroupsMatrix {
  const uint8_t* quants = nullptr;  // [n_out, k / 2] bytes
  const __half* scales = nullptr;   // [n_out, k / group]
  const uint8_t* zeros = nullptr;   // [n_out, k / group]
};

enum class Int4Kernel : int {
  gemv_cuda_cores = 0,
  gemv_tensor_cores,
  gemm_wmma,
  gemm_mma,
  dequant_cublas,
  gemv_tensor_cores_512,
  gemv_tensor_cores_2bps,
  gemv_cuda_cores_staged,
  gemv_tensor_cores_32rows,
  gemm_tensor_cores_64rows,
  cutlass_gemm,
  cutlass_gemm_pingpong,
  cutlass_gemm_16rows,
  w4a8_gemv,
  gemv_half2
};
constexpr int kInt4Kernels = 15;
// The kernels that compute W4A16 (fp16 activations): every one but w4a8_gemv. Only they are timed
// and chosen at load.
inline bool is_w4a16(Int4Kernel kernel) { return kernel != Int4Kernel::w4a8_gemv; }
// How a group-wise INT4 matrix lies in device memory: rows (kernels/int4_groups.hpp: nibbles, scales
// and zeros in three arrays), tiles (kernels/int4_tiles.hpp: one array of chunks) or cutlass (only its
// Int4CutlassWeights, w4a16_gemm_cutlass.cuh: one copy of the weights, every row count on wgmma).
enum class Int4Layout { rows, tiles, cutlass };
const char* int4_kernel_name(Int4Kernel kernel);  // "CUDA-core GEMV", ...
// The CUTLASS GEMMs (they read a CUTLASS copy, not the layout's operands).
bool is_cutlass(Int4Kernel kernel);
// The most rows `kernel` takes in one call (INT64_MAX: any).
int64_t int4_kernel_max_rows(Int4Kernel kernel);
// The fewest rows it is a candidate for: 17 for dequant + cuBLAS (dequantizing costs more than the
// decode GEMVs' whole product) and the two CUTLASS GEMMs with 128-row activation tiles, 1 for the
// others.
int64_t int4_kernel_min_rows(Int4Kernel kernel);
// The launcher of one of our own kernels (they share one signature: w4a16_gemv_int4_groups's);
// nullptr for dequant + cuBLAS and the CUTLASS GEMMs, which need more (launch_int4_kernel).
using Int4GroupsLauncher = Status (*)(const uint8_t* quants, const __half* scales, const uint8_t* zeros,
                                      int64_t group, int64_t n_out, int64_t k, const __half* x, int64_t m,
                                      float* y, cudaStream_t stream, bool programmatic);
Int4GroupsLauncher int4_kernel_launcher(Int4Kernel kernel);
// Runs `kernel` on one product (arguments as w4a16_gemv_int4_groups; on tiles, quants are the tiles and
// scales and zeros are ignored). cublas: the context dequant + cuBLAS needs (invalid_argument without
// one); the others ignore it. cutlass: the matrix's CUTLASS copy, which the CUTLASS GEMMs read instead
// of quants, scales and zeros (invalid_argument without one). programmatic applies to our own kernels
// only. half2_variant: the half2 GEMV's shape (an index into kHalf2GemvVariants; the others ignore
// it). invalid_argument for a kernel that does not read the layout, or a shape out of range.
Status launch_int4_kernel(Int4Kernel kernel, const Int4CublasContext* cublas, const uint8_t* quants,
                          const __half* scales, const uint8_t* zeros, int64_t group, int64_t n_out, int64_t k,
                          const __half* x, int64_t m, float* y, cudaStream_t stream, bool programmatic,
                          Int4Layout layout = Int4Layout::rows, const Int4CutlassWeights* cutlass = nullptr,
                          int half2_variant = 0);

// The row ranges, and the row counts each is timed at (a second count of 0: one only).
constexpr int kInt4RowRanges = 5;
constexpr int64_t kInt4RangeMaxRows[kInt4RowRanges] = {1, 16, 32, 64, INT64_MAX};
constexpr int64_t kInt4RangeTimedRows[kInt4RowRanges][2] = {{1, 0}, {4, 16}, {32, 0}, {64, 0}, {256, 0}};
// The range m rows fall in (m >= 1).
inline int int4_row_range(int64_t m) {
  int r = 0;
  while (m > kInt4RangeMaxRows[r]) ++r;
  return r;
}

const char* int4_layout_name(Int4Layout layout);  // "rows", "tiles", "cutlass"
// Whether `kernel` reads matrices in `layout` (every kernel reads rows; the CUTLASS GEMMs read their
// own copy whatever the layout, and they alone read cutlass).
bool int4_kernel_reads(Int4Kernel kernel, Int4Layout layout);
// The launcher of `kernel` on tiles (quants: the tiles; scales and zeros ignored); nullptr for a
// kernel that does not read tiles and for dequant + cuBLAS (launch_int4_kernel).
Int4GroupsLauncher int4_tiles_kernel_launcher(Int4Kernel kernel);

// Per range, the kernel used without timing (and kept unless another is kInt4MinGain faster): what
// the model ran before the tensor-core kernels existed.
constexpr Int4Kernel kInt4DefaultKernels[kInt4RowRanges] = {
    Int4Kernel::gemv_cuda_cores, Int4Kernel::gemv_cuda_cores, Int4Kernel::gemv_cuda_cores,
    Int4Kernel::gemm_wmma, Int4Kernel::gemm_wmma};
// On tiles: the tensor-core kernels (the kernels int4_kernels: tensor_cores pins on either layout).
constexpr Int4Kernel kInt4TilesDefaultKernels[kInt4RowRanges] = {
    Int4Kernel::gemv_tensor_cores, Int4Kernel::gemv_tensor_cores, Int4Kernel::gemv_tensor_cores_32rows,
    Int4Kernel::gemm_tensor_cores_64rows, Int4Kernel::gemm_tensor_cores_64rows};
// On CUTLASS's order: 16-row activation tiles up to 32 rows (decode), 64-row weight tiles up to 64
// (twice the tiles of the 128-row ones for few activation rows), 128 x 128 tiles above (prefill).
constexpr Int4Kernel kInt4CutlassDefaultKernels[kInt4RowRanges] = {
    Int4Kernel::cutlass_gemm_16rows, Int4Kernel::cutlass_gemm_16rows, Int4Kernel::cutlass_gemm_16rows,
    Int4Kernel::cutlass_gemm_pingpong, Int4Kernel::cutlass_gemm};
inline const Int4Kernel* int4_default_kernels(Int4Layout layout) {
  return layout == Int4Layout::tiles     ? kInt4TilesDefaultKernels
         : layout == Int4Layout::cutlass ? kInt4CutlassDefaultKernels
                                         : kInt4DefaultKernels;
}

struct Int4GroupsTuning {
  // Device microseconds per product (median of repeated loops) by range, kernel and timed row count;
  // 0 where the kernel does not take that many rows or failed to launch (`skipped` says which).
  double us[kInt4RowRanges][kInt4Kernels][2] = {};
  Int4Kernel chosen[kInt4RowRanges] = {kInt4DefaultKernels[0], kInt4DefaultKernels[1], kInt4DefaultKernels[2],
                                       kInt4DefaultKernels[3], kInt4DefaultKernels[4]};
  std::string skipped;  // candidates that failed, e.g. "tensor-core GEMV (1 rows): device_error"
  // The half2 GEMV's shape for one row, an index into kHalf2GemvVariants: on the rows at group 128
  // (where every shape is built; unless half2_gemv_shapes_enabled() is false) the fastest of them, timed by
  // tune_int4_groups (they give the same bits, so no margin), else 0, the default; us[0][gemv_half2] is the
  // chosen shape's time, timed again apart from the comparison (the least of nine times is biased low).
  // half2_variant_us: each shape's (0: not timed).
  int half2_variant = 0;
  double half2_variant_us[kHalf2GemvVariantCount] = {};
};

// The rule, from the times (of kernels that read `layout`): per range, the kernel with the smallest geometric
// mean of its times at the range's timed row counts, among those timed at all of them (ties to the lower
// Int4Kernel); but the range's default above (what the model used before any timing) stays unless that kernel
// is at least kInt4MinGain faster (int4_default_kernels(layout)), so that timing noise between near-equal
// kernels does not change a model's kernels, and so its output bits, from one load to the next. A range with
// no timed kernel keeps its default.
constexpr double kInt4MinGain = 0.05;
void choose_int4_groups_kernels(Int4GroupsTuning& t, Int4Layout layout = Int4Layout::rows);

// Times every kernel that reads `layout` and takes a range's rows (dequant + cuBLAS only when `cublas`
// is given, the CUTLASS GEMMs only when `cutlass` holds each matrix's copy, in the same order) on
// `matrices` (one shape, e.g. that matrix in every layer: the products rotate among them, so that with
// enough of them the weights stream from device memory as in a forward pass rather than from L2; on
// Int4Layout::cutlass only their count matters, and `cutlass` is required) and chooses
// (choose_int4_groups_kernels). A
// candidate that fails to launch is left out and named in `skipped` (the launch error is cleared;
// the kernel tests report such failures). Allocates its activations ([256, k] fp16, [256, n_out]
// fp32) and frees them; synchronizes `stream`. `ranges`: only the first `ranges` row ranges are timed
// (the others keep their defaults, untimed: e.g. 2 for a decode-only comparison). Returns
// invalid_argument for an empty list, a group other than 32, 64 or 128 dividing k, n_out < 1 or
// ranges outside 1..kInt4RowRanges; device_error (with `error` set) when allocation or timing fails.
Status tune_int4_groups(const std::vector<Int4GroupsMatrix>& matrices, int64_t group, int64_t n_out,
                        int64_t k, const Int4CublasContext* cublas, cudaStream_t stream,
                        Int4GroupsTuning& out, std::string& error, Int4Layout layout = Int4Layout::rows,
                        const std::vector<Int4CutlassWeights>* cutlass = nullptr,
                        int ranges = kInt4RowRanges);

// The block shape kept after a sweep of the half2 GEMV's shapes (kHalf2GemvVariants; tune_int4_groups,
// and the fused kernels' timing at load): `fastest`, the one timed fastest, where timed once more
// (again_us; 0: it refused) it is still faster than the default shape (default_us; 0: the default
// refused), else 0, the default. The least of several noisy times is biased low: a shape is kept only
// on a second look.
int half2_shape_after_retime(int fastest, double again_us, double default_us);

}  // namespace nibble::kernels::cuda
