#pragma once
// Converting a GGUF model's weight matrices to another type (like llama.cpp's llama-quantize).
#include <optional>
#include <string>
#include <vector>

#include "kernels/quant_types.hpp"
#include "kernels/thread_pool.hpp"
#include "model/gguf.hpp"
#include "model/imatrix.hpp"

namespace nibble::model {

// Writes `out_path`: all of `in`'s metadata (general.file_type updated to match matrix_type) and
// all of its tensors, in the same order and shapes, where
// - every 2-D tensor (a weight matrix) is dequantized and requantized row by row to matrix_type
//   (Q4_0, Q4_1, Q5_0, Q5_1, Q2_K, Q3_K, Q4_K, Q5_K, Q8_0, F16 or F32); a matrix already of that type is
//   copied unchanged;
// - 1-D tensors (norms) are stored as F32; tensors of 3 or more dims are copied unchanged;
// - unless `pure`, when matrix_type is below 8 bits, token_embd.weight and output.weight (the output head;
//   when absent, token_embd.weight doubles as the tied head) are stored as Q8_0 instead, because
//   4-bit error in the output head costs far more quality than anywhere else.
// Throws GgufError naming the tensor when a row length is not a multiple of the target block
// size, std::invalid_argument for an unsupported matrix_type.
// With `imatrix`, every matrix it has an entry for is quantized with that importance row
// (kernels::quantize_row_weighted, llama-quantize --imatrix's bytes) and the file records it as
// llama-quantize does (quantize.imatrix.*); std::invalid_argument names a matrix whose target type has no
// weighted quantizer in Nibble or whose entry does not fit its rows.
void requantize_gguf(const GgufFile& in, const std::string& out_path, kernels::DType matrix_type, bool pure,
                     const ImportanceMatrix* imatrix = nullptr);

// llama-quantize's mixes (its LLAMA_FTYPE_MOSTLY_Q2_K, Q3_K_S ... Q5_K_M, IQ4_NL and IQ4_XS), for dense
// Llama models: the default type (Q2_K, Q3_K, Q4_K, Q5_K, IQ4_NL or IQ4_XS) for every matrix but
// - the output head (token_embd.weight when the head is tied to it): Q6_K;
// - attn_v.weight: Q3_K_M Q5_K in the first 2 layers and Q4_K after them, Q3_K_L Q5_K; Q4_K_M / Q5_K_M
//   Q6_K in llama.cpp's "more bits" layers (the first and last eighth and every third in between),
//   Q4_K_S Q5_K in the first 4; Q5_K in a 70B model (80 layers, grouped KV heads) where the rule left
//   Q3_K or Q4_K;
// - ffn_down.weight: Q3_K_M Q5_K in the first sixteenth and Q4_K after it, Q3_K_L Q5_K; Q4_K_M / Q5_K_M
//   Q6_K in the "more bits" layers, Q4_K_S Q5_K in the first eighth;
// - attn_output.weight: Q3_K_M Q4_K, Q3_K_L Q5_K.
// Nibble's quantizers write llama.cpp's reference bytes for these types, so the tensor data equals
// llama-quantize's (`RequantizeTestData.Q5_K_MEqualsLlamaCppByteForByte`, `...Q3_K_M...`).
// - Q2_K: attn_v Q4_K (Q3_K with fewer than 4 query heads a KV head), attn_output and ffn_down Q3_K;
// - IQ4_NL / IQ4_XS: attn_v Q5_K with 4 or more query heads a KV head, ffn_down Q5_K in the first eighth
//   (not with an importance matrix).
enum class LlamaCppMix { q2_k, q3_k_s, q3_k_m, q3_k_l, q4_k_s, q4_k_m, q5_k_s, q5_k_m, iq4_nl, iq4_xs };

// llama-quantize's names, lower case: "q2_k", "q3_k_s", "q3_k_m", "q3_k_l", "q4_k_s", "q4_k_m", "q5_k_s",
// "q5_k_m", "iq4_nl", "iq4_xs"; nullopt for other names.
std::optional<LlamaCppMix> parse_llama_cpp_mix(const std::string& name);

// The type of every tensor of `in` under `mix`, in the file's order (1-D tensors F32). A matrix whose
// rows are not a multiple of 256 falls back as in llama.cpp: Q2_K and Q3_K to Q4_0, Q4_K to Q5_0, Q5_K to
// Q5_1, Q6_K to Q8_0, IQ4_XS to IQ4_NL (F16 when its rows are not a multiple of 32 either). has_imatrix:
// llama-quantize was given an importance matrix (the IQ4 mixes then keep ffn_down).
std::vector<kernels::DType> llama_cpp_mix_types(const GgufFile& in, LlamaCppMix mix,
                                                bool has_imatrix = false);

// llama.cpp's general.file_type for the mix (LLAMA_FTYPE_MOSTLY_Q3_K_S = 11 ... Q5_K_M = 17).
uint32_t llama_cpp_mix_file_type(LlamaCppMix mix);

// The mix's type for the layer matrices no rule raises: Q2_K, Q3_K, Q4_K, Q5_K, IQ4_NL or IQ4_XS.
kernels::DType llama_cpp_mix_default_type(LlamaCppMix mix);

// requantize_gguf with the types of llama_cpp_mix_types; general.file_type llama.cpp's for the mix.
void requantize_gguf(const GgufFile& in, const std::string& out_path, LlamaCppMix mix,
                     const ImportanceMatrix* imatrix = nullptr);

// One tensor of `in` converted to `target` as requantize_gguf does it (rows dequantized and
// requantized; copied when already of that type): row_bytes(target, row length)
// * rows bytes. importance: [row length] or null. pool: the rows split across it (serial without). Throws
// GgufError naming the tensor as requantize_gguf does (which runs on every core).
std::vector<uint8_t> convert_tensor(const GgufFile& in, const GgufTensorInfo& tensor, kernels::DType target,
                                    const std::vector<float>* importance = nullptr,
                                    kernels::ThreadPool* pool = nullptr);

// The type requantize_gguf stores a tensor as (exposed for tests and the CLI's reporting).
kernels::DType requantized_type(const GgufTensorInfo& tensor, kernels::DType matrix_type, bool pure);

}  // namespace nibble::model
