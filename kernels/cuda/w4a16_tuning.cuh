#pragma once
// Which group-wise INT4 kernels multiply one weight shape on this device, chosen by timing them on
// the model's own weights when it loads (TensorRT-LLM's GEMM plugin profiles its tactics the same way
// when it builds an engine). Two choices, each between kernels with the same arguments and layout:
//   decode, 1..16 rows: the CUDA-core w4a16_gemv_int4_groups or the tensor-core w4a16_gemv_int4_groups_mma
//     (17..32 rows always take the CUDA-core GEMV, the only one that goes that far);
//   prefill, over 32 rows: the WMMA w4a16_gemm_int4_groups or the mma.sync w4a16_gemm_int4_groups_mma.
// One kernel serves every row count of a regime, so a row's bits do not change with how many decode
// rows share its batch (each kernel's outputs per row do not depend on m).
#include <cuda_fp16.h>
#include <cuda_runtime_api.h>

#include <cstdint>
#include <string>
#include <vector>

#include "kernels/status.hpp"

namespace nibble::kernels::cuda {

// One weight matrix in w4a16_gemv_int4_groups's layout (device pointers, same alignment rules).
struct Int4GroupsMatrix {
  const uint8_t* quants = nullptr;  // [n_out, k / 2] bytes
  const __half* scales = nullptr;   // [n_out, k / group]
  const uint8_t* zeros = nullptr;   // [n_out, k / group]
};

// The row counts timed: decode at both ends of the tensor-core GEMV's range, prefill at one tile-rich m.
constexpr int64_t kTuneDecodeRows[2] = {1, 16};
constexpr int64_t kTunePrefillRows = 256;

struct Int4GroupsTuning {
  // Device microseconds per product (median of repeated loops); 0 when the kernel failed to launch
  // (`skipped` says which and how).
  double gemv_cuda_cores_us[2] = {};  // at kTuneDecodeRows
  double gemv_tensor_cores_us[2] = {};
  double gemm_wmma_us = 0.0, gemm_mma_us = 0.0;  // at kTunePrefillRows
  bool decode_tensor_cores = false;              // w4a16_gemv_int4_groups_mma for 1..16 rows
  bool prefill_mma = false;                      // w4a16_gemm_int4_groups_mma over 32 rows
  std::string skipped;  // candidates that failed, e.g. "tensor-core GEMV: device_error"
};

// The rule, from the times: the tensor-core GEMV when the geometric mean of its time ratios to the
// CUDA-core GEMV over kTuneDecodeRows is below 1; the mma GEMM when it is faster than the WMMA one. A
// candidate without a time (0) never wins, and ties keep the CUDA-core GEMV and the WMMA GEMM.
void choose_int4_groups_kernels(Int4GroupsTuning& t);

// Times the four kernels on `matrices` (one shape, e.g. that matrix in every layer: the products rotate
// among them, so that with enough of them the weights stream from device memory as in a forward pass
// rather than from L2) and chooses (choose_int4_groups_kernels). A candidate that fails to launch is
// left out and named in `skipped` (the launch error is cleared; kernel tests report such failures).
// Allocates its activations ([kTunePrefillRows, k] fp16, [kTunePrefillRows, n_out] fp32) and frees
// them; synchronizes `stream`. Returns invalid_argument for an empty list, a group other than 32, 64
// or 128 dividing k, or n_out < 1; device_error (with `error` set) when allocation or timing fails.
Status tune_int4_groups(const std::vector<Int4GroupsMatrix>& matrices, int64_t group, int64_t n_out,
                        int64_t k, cudaStream_t stream, Int4GroupsTuning& out, std::string& error);

}  // namespace nibble::kernels::cuda
