#pragma once
// Mixed precision for `nibble quantize --size-budget|--bits-per-weight`: which weight matrices to
// keep above 4 bits (Q6_K, Q8_0) so that the file fits a size budget and the model stays as close
// as possible to the float model.
//
// Sensitivity is measured, not guessed: on calibration windows, the float model with one tensor
// quantized (the rest float) is compared with the float model, and the mean KL divergence of its
// next-token distributions is that tensor's cost at that type.
//   - Every layer matrix is measured at the base 4-bit type, quantized the way the chosen method
//     will do it (GPTQ with the float model's Hessian, or RTN; AWQ is not offered).
//   - Its cost at Q6_K / Q8_0 is not run again but scaled from that measurement: to second order
//     KL grows with the output error a weight perturbation causes, tr(ΔW H ΔWᵀ) with H the
//     matrix's input Hessian, so cost(t) = cost(4-bit) · tr(ΔW_t H ΔW_tᵀ) / tr(ΔW_4 H ΔW_4ᵀ).
//     That saves two forward passes per matrix.
//   - token_embd and output (one tensor when the head is tied) are measured at every type, since
//     the head is where 4-bit error costs most and the scaling above has no Hessian for it.
// The choice is then a multiple-choice knapsack, solved by dynamic programming over the bytes
// above all-4-bit: the types with the least summed cost whose sizes fit the budget. Costs are
// assumed additive across tensors (true to first order for small perturbations; on the fortune
// model the measured KL of the result is within a few % of the sum, docs/perf/quality.md).
#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "kernels/quant_types.hpp"
#include "model/gguf.hpp"
#include "worker/calibrated_quantize.hpp"

namespace nibble::worker {

struct SizeBudget {
  int64_t file_bytes = 0;        // > 0: the whole output file at most this many bytes
  double bits_per_weight = 0.0;  // > 0: tensor data at most this many bits per weight (llama.cpp's BPW)
};

// "10.2MB", "9800000", "9.5MiB", "512KB", "1.1GB" (B, KB/MB/GB powers of 1000, KiB/MiB/GiB of 1024).
// Throws std::invalid_argument naming the text otherwise.
int64_t parse_size(const std::string& text);

struct MixedPrecisionOptions {
  SizeBudget budget;
  // Types a tensor may be raised to (those whose block size its rows fit), besides the base type.
  std::vector<kernels::DType> high_types = {kernels::DType::Q6_K, kernels::DType::Q8_0};
  int64_t sensitivity_samples = 8;  // calibration windows the KL is measured on (the first ones)
};

// One tensor at one type.
struct TensorOption {
  kernels::DType type = kernels::DType::Q4_0;
  int64_t bytes = 0;
  double cost = 0.0;      // mean KL (nats) of the float model with only this tensor at this type
  bool measured = false;  // false: scaled from the 4-bit measurement (see above)
};

struct TensorSensitivity {
  std::string name;
  std::vector<TensorOption> options;  // options[0] is the base 4-bit type; then increasing bytes
  size_t chosen = 0;                  // index into options
};

struct MixedPrecisionPlan {
  std::vector<TensorSensitivity> tensors;       // every candidate tensor, in file order
  std::map<std::string, kernels::DType> types;  // the tensors raised above the base type
  int64_t budget_bytes = 0;                     // the whole file's limit the plan was made for
  int64_t planned_bytes = 0;                    // the file's size as planned (an upper bound)
  int64_t pure_bytes = 0;                       // the same with every candidate at the base type
  double planned_cost = 0.0;                    // sum of the chosen options' costs
  double pure_cost = 0.0;                       // sum of the base options' costs
};

// Measures every candidate tensor's sensitivity on `calibration_text` and chooses the types.
// options.method must be rtn or gptq; options.type Q4_0 or Q4_K; options.pure is ignored (the
// embedding and head are candidates like any matrix). Writes scratch copies of the model next to
// `scratch_prefix` (removed again). Throws std::invalid_argument when the budget is below the file
// with every candidate at the base type, or for options the quantizers refuse.
MixedPrecisionPlan plan_mixed_precision(const std::shared_ptr<const model::GgufFile>& in,
                                        std::string_view calibration_text, const std::string& scratch_prefix,
                                        const CalibratedQuantizeOptions& options,
                                        const MixedPrecisionOptions& mixed);

// One line per raised tensor and a summary, for printing.
std::vector<std::string> describe_plan(const MixedPrecisionPlan& plan);

// Plans, then writes `out_path` with the plan's types: the method's quantization for every other
// matrix, and metadata nibble.quantization.high_precision_tensors (names), .high_precision_types
// (their types), .size_budget (bytes) and .bits_per_weight_budget (when given). Progress and the
// plan go to options.progress.
void quantize_mixed_precision(const std::shared_ptr<const model::GgufFile>& in,
                              std::string_view calibration_text, const std::string& out_path,
                              const CalibratedQuantizeOptions& options, const MixedPrecisionOptions& mixed);

}  // namespace nibble::worker
