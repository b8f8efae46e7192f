#pragma once
// Converting a GGUF model's weight matrices to another type (like llama.cpp's llama-quantize).
#include <string>
#include <vector>

#include "kernels/quant_types.hpp"
#include "model/gguf.hpp"

namespace nibble::model {

// Writes `out_path`: all of `in`'s metadata (general.file_type updated to match matrix_type) and
// all of its tensors, in the same order and shapes, where
// - every 2-D tensor (a weight matrix) is dequantized and requantized row by row to matrix_type
//   (Q4_0, Q4_K, Q8_0, F16 or F32); a matrix already of that type is copied unchanged;
// - 1-D tensors (norms) are stored as F32; tensors of 3 or more dims are copied unchanged;
// - unless `pure`, when matrix_type is Q4_0 or Q4_K, token_embd.weight and output.weight (the output head;
//   when absent, token_embd.weight doubles as the tied head) are stored as Q8_0 instead, because
//   4-bit error in the output head costs far more quality than anywhere else.
// Throws GgufError naming the tensor when a row length is not a multiple of the target block
// size, std::invalid_argument for an unsupported matrix_type.
void requantize_gguf(const GgufFile& in, const std::string& out_path, kernels::DType matrix_type, bool pure);

// One tensor of `in` converted to `target` as requantize_gguf does it (rows dequantized and
// requantized; copied when already of that type): row_bytes(target, row length) * rows bytes.
// Throws GgufError naming the tensor as requantize_gguf does.
std::vector<uint8_t> convert_tensor(const GgufFile& in, const GgufTensorInfo& tensor, kernels::DType target);

// The type requantize_gguf stores a tensor as (exposed for tests and the CLI's reporting).
kernels::DType requantized_type(const GgufTensorInfo& tensor, kernels::DType matrix_type, bool pure);

}  // namespace nibble::model
