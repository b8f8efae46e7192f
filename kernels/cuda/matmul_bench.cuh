#pragma once
// The GPU kernel benchmark behind `nibble bench-gpu`: the W4A16 kernels (Q4_0 in both layouts,
// group-wise INT4 at group 128 on the SIMT GEMV, the tensor-core GEMV, the GEMMs and dequantized for
// cuBLAS, Q4_K, Q6_K, and the other GGUF types as stored) against fp16
// cuBLAS on the same shapes, both against the device's measured copy bandwidth. Weights rotate among enough
// copies that every call reads them from device memory, not from L2.
#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "kernels/cuda/w4a16_gemv.cuh"
#include "kernels/quant_types.hpp"
#include "kernels/status.hpp"

namespace nibble::kernels::cuda {

struct MatmulShape {
  int64_t k = 0;      // input features (row length of the weights)
  int64_t n_out = 0;  // output features
};

struct MatmulBenchRow {
  MatmulShape shape;
  int64_t m = 0;                     // activation rows
  double ours_us = 0.0;              // Q4_0 x fp16 (W4A16)
  const char* ours_kernel = "gemv";  // w4a16_gemv for m <= 32, the tensor-core w4a16_gemm above
  double split_us = 0.0;             // m <= 32: w4a16_gemv_q4_0_split (16-byte loads), same bytes
  double g128_us = 0.0;      // group-wise INT4, group 128 (w4a16_*_int4_groups; GPTQ / AWQ); 0: k % 128 != 0
  double g128_mma_us = 0.0;  // the same on w4a16_gemm_int4_groups_mma (m > 32 only)
  double g128_tc_us = 0.0;   // the same on the tensor-core GEMV w4a16_gemv_int4_groups_mma (m <= 16 only)
  double g128_staged_us = 0.0;  // the same on the staged GEMV w4a16_gemv_int4_groups_staged (m == 1 only)
  double g128_half2_us = 0.0;   // the same on the half2 GEMV w4a16_gemv_int4_groups_half2 (m == 1 only)
  // m == 1, where the half2 GEMV runs: its variants (kHalf2GemvVariants, in order; the first is
  // g128_half2_us), 0 for one that failed (named in skipped).
  std::vector<double> g128_half2_variant_us;
  // The same weights times 8-bit activations on dp4a (w4a8_gemv_int4_groups, m <= 4; not W4A16: the
  // activations rounded per 32 inputs, as llama.cpp's Q8_1 activations are).
  double g128_w4a8_us = 0.0;
  double g128_tc32_us =
      0.0;  // the same on the two-tile tensor-core GEMV (w4a16_gemv_int4_groups_mma_32rows, m <= 32)
  double g128_tc64_us = 0.0;  // the same on the 64-row tensor-core GEMM (w4a16_gemm_int4_groups_mma_64rows)
  // The tensor-core GEMV cut in two (w4a16_gemv_int4_groups_mma_probe, m <= 16): its weight stream
  // alone and its dequantize-and-mma work alone.
  double g128_tc_loads_us = 0.0, g128_tc_compute_us = 0.0;
  // The tensor-core kernels on the same weights repacked into their chunks (kernels/int4_tiles.hpp):
  // the fastest of the three GEMV shapes (m <= 16; tiles_tc_shape says which), the two-tile GEMV
  // (m <= 32), the 64-row GEMM, dequant + cuBLAS from tiles (m >= 17), and the tiled loads-only probe.
  double g128_tiles_tc_us = 0.0;
  const char* g128_tiles_tc_shape = "";
  double g128_tiles_tc32_us = 0.0, g128_tiles_tc64_us = 0.0, g128_tiles_deq_us = 0.0;
  double g128_tiles_loads_us = 0.0;
  double g128_deq_us =
      0.0;  // the same dequantized to fp16 in chunks for cuBLAS (m >= 17 only; 64 MiB scratch)
  // The same on CUTLASS's Hopper mixed-input GEMM (w4a16_gemm_int4_cutlass on its reordered copy):
  // 128-row cooperative tiles and 64-row ping-pong tiles (every m), 64 x 16 tiles (m <= 32); 0 when not
  // built or not on compute 9.0.
  double g128_cutlass_us = 0.0, g128_cutlass_pp_us = 0.0, g128_cutlass16_us = 0.0;
  double q4k_us = 0.0;           // GGUF Q4_K as stored (w4a16_*_q4_k); 0: k % 256 != 0
  double q4k_tc_us = 0.0;        // the same on the tensor cores (w4a16_gemv_q4_k_mma, _32rows, _64rows by m)
  double q4k_half2_us = 0.0;     // the same on the half2 GEMV (w4a16_gemv_q4_k_half2, m == 1 only)
  double q4k_w4a8_us = 0.0;      // the same times 8-bit activations on dp4a (w4a8_gemv_q4_k, m <= 4)
  double q4k_tiles_tc_us = 0.0;  // the same kernels on the blocks repacked into Q4_K chunks
  double q6k_us = 0.0;           // GGUF Q6_K in planes, the CUDA-core GEMV (m <= 32); 0: k % 256 != 0
  double q6k_half2_us = 0.0;     // the same on the half2 GEMV (w4a16_gemv_q6_k_half2, m == 1 only)
  // The other GGUF types read as stored (w4a16_gemv_gguf_blocks, m <= 32; kW4A16GgufBlockTypes whose
  // block divides k, in that order): time and the bytes one product moves (blocks + x + y).
  struct GgufBlocksTiming {
    DType type = DType::F16;
    double us = 0.0;
    double bytes = 0.0;
  };
  std::vector<GgufBlocksTiming> gguf_blocks;
  double cublas_us = 0.0;     // fp16 x fp16 cublasGemmEx, fp32 accumulation
  double ours_bytes = 0.0;    // bytes one product must move: Q4_0 weights + fp16 x + fp32 y
  double g128_bytes = 0.0;    // nibbles + fp16 scale + zero byte per 128 weights, + x + y
  double q4k_bytes = 0.0;     // 144 bytes per 256 weights, + x + y
  double q6k_bytes = 0.0;     // 210 bytes per 256 weights, + x + y
  double cublas_bytes = 0.0;  // fp16 weights + fp16 x + fp16 y
};

struct MatmulBenchResult {
  std::string device;      // name and memory
  double copy_gbps = 0.0;  // device-to-device copy, bytes read plus bytes written per second
  std::vector<MatmulBenchRow> rows;
  // Columns left at 0 ('-') because their kernel failed at some m while the device stayed usable:
  // each failure's message (the rest of the table still ran).
  std::vector<std::string> skipped;
};

// The current device's copy bandwidth (device to device, bytes read plus bytes written per second,
// in GB/s; median of 5 loops of 10 copies of 1 GiB), as run_matmul_bench measures it: the speed
// limit of anything that streams its weights from device memory. Returns device_error (with `error`
// set) when a CUDA call fails.
Status measure_copy_bandwidth(double& gbps, std::string& error);

// Times every shape at every m (median of `repetitions` timed loops of `iterations` products each,
// after a warm-up). A kernel that fails while the device stays usable leaves its column at 0 and is
// named in result.skipped. Returns device_error (with `error` set, and result.rows holding the shapes
// finished before) when a CUDA or cuBLAS call fails otherwise, invalid_argument for a k not a multiple
// of 32 or an m below 1.
// measured (optional): called with each row as soon as its shape is done, so that a run cut short
// (a device session's time limit) keeps what it measured.
Status run_matmul_bench(const std::vector<MatmulShape>& shapes, const std::vector<int64_t>& ms,
                        int iterations, int repetitions, MatmulBenchResult& result, std::string& error,
                        const std::function<void(const MatmulBenchRow&)>& measured = {});

}  // namespace nibble::kernels::cuda
