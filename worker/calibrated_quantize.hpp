#pragma once
// `nibble quantize --method gptq|awq`: a float GGUF Llama model quantized layer by layer with
// calibration activations captured from the CPU forward pass (model/gptq, model/awq).
//
// GPTQ runs sequentially, as the reference does: layer l is calibrated on the outputs of layers
// 0..l-1 already quantized, and inside a layer the matrices are done in forward order (q/k/v, then
// attn_output, then gate/up, then down; "true sequential"), each group's inputs captured with the
// earlier groups already quantized. AWQ, like llm-awq, searches every layer's scales on the float
// model's activations and folds 1/s into attn_norm (q/k/v), ffn_norm (gate/up) and the rows of
// ffn_up (down); attn_output is scaled (1/s folded into attn_v's rows) only when n_head == n_head_kv
// and otherwise stays RTN (see model/awq.hpp). token_embd and output follow `nibble quantize`'s RTN
// rules (Q8_0 unless pure).
#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "kernels/quant_types.hpp"
#include "model/awq.hpp"
#include "model/gguf.hpp"
#include "model/gptq.hpp"
#include "model/quant_grid.hpp"
#include "model/requantize.hpp"
#include "model/tokenizer.hpp"

namespace nibble::worker {

enum class QuantMethod { rtn, gptq, awq };
// "rtn", "gptq", "awq"; throws std::invalid_argument naming the choices otherwise.
QuantMethod parse_quant_method(const std::string& name);
const char* quant_method_name(QuantMethod method);

struct CalibratedQuantizeOptions {
  QuantMethod method = QuantMethod::gptq;      // gptq or awq (rtn is model::requantize_gguf)
  kernels::DType type = kernels::DType::Q4_0;  // Q4_0, Q4_K or Q5_K
  bool pure = false;                           // token_embd and output 4-bit (RTN) too
  std::string calibration_name;                // recorded in the output's metadata
  // A token file's ids (whitespace-separated in the file): when set, windows are cut from them
  // instead of from the tokenized text.
  std::vector<int32_t> calibration_tokens;
  int64_t samples = 128;  // calibration windows
  int64_t length = 512;   // tokens per window
  uint64_t seed = 0;
  model::GptqOptions gptq;
  model::AwqOptions awq = {20, 4096};  // AWQ's error is measured on at most 4096 rows per input
  int threads = 1;
  std::function<void(const std::string&)> progress;  // one line per layer (optional)
  // Other output formats (worker/gptq_export): with a sink, GPTQ hands every layer matrix to it (by
  // its GGUF name, as soon as it is quantized) and no GGUF is written; `grid` then replaces the
  // type's grid (e.g. the INT4 grid of a GPTQ checkpoint). Not for AWQ.
  std::optional<model::QuantGrid> grid;
  std::function<void(const std::string& tensor, model::QuantizedMatrix&& matrix)> matrix_sink;
  // Mixed precision (worker/mixed_precision) and llama.cpp's mixes: tensors stored in another type than
  // `type`. GPTQ calibrates a layer matrix on its type's grid where it has one (Q4_0, Q2_K ... Q6_K)
  // and rounds it to nearest otherwise (Q6_K, Q8_0), then calibrates the later matrices on those
  // values. And metadata to add.
  std::map<std::string, kernels::DType> tensor_types;
  std::vector<std::pair<std::string, model::GgufValue>> metadata;
};

// GPTQ into llama-quantize's mixes: sets options.type to the mix's default type and options.tensor_types
// to the mix's type for every other matrix and for the embedding and head, so that GPTQ calibrates every
// layer matrix of a type with a grid (Q2_K ... Q6_K) and rounds the rest to nearest (the embedding and the
// head, as llama.cpp stores them; the IQ4 mixes have no grid and are refused); general.file_type becomes the
// mix's.
// Throws std::invalid_argument for AWQ (its folded scales take no per-tensor types).
void use_llama_cpp_mix(const model::GgufFile& in, model::LlamaCppMix mix, CalibratedQuantizeOptions& options);

// A text progress bar for the per-layer lines of long runs: "[######..............]".
std::string progress_bar(int64_t done, int64_t total, int width = 20);

// The calibration windows of a run: from options.calibration_tokens when set, else from `text`.
std::vector<std::vector<int32_t>> calibration_windows(const model::Tokenizer& tokenizer,
                                                      std::string_view text,
                                                      const CalibratedQuantizeOptions& options);

// Sets a calibrated run's metadata on `out`: general.file_type for options.type,
// general.quantization_version, nibble.quantization.method / .calibration_file / .calibration_samples /
// .calibration_length / .calibration_seed (and .act_order for GPTQ), then options.metadata.
void set_calibration_metadata(model::GgufWriter& out, const CalibratedQuantizeOptions& options);

// Writes `out_path`: `in`'s metadata (general.file_type for the type; nibble.quantization.method,
// .calibration_file, .calibration_samples, .calibration_length, .calibration_seed added) and its
// tensors in order, every layer matrix calibrated-quantized to options.type, AWQ-folded norms as
// F32, the rest as requantize_gguf stores them. Throws std::invalid_argument for a bad option, a
// matrix whose row length does not fit the type, or a calibration text too short; GgufError for
// file problems.
void calibrated_quantize_gguf(std::shared_ptr<const model::GgufFile> in, std::string_view calibration_text,
                              const std::string& out_path, const CalibratedQuantizeOptions& options);

}  // namespace nibble::worker
