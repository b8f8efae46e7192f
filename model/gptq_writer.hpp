#pragma once
// Writes a GGUF Llama model whose layer matrices were quantized (model/gptq, model/quant_grid) as a
// GPTQ checkpoint directory that AutoGPTQ / GPTQModel / transformers / vLLM-style loaders read:
//
//   config.json          LlamaForCausalLM fields from the model (hidden_size, ..., rope_theta,
//                        tie_word_embeddings, bos/eos ids when the GGUF has them) and
//                        quantization_config {quant_method "gptq", bits 4, group_size, desc_act,
//                        static_groups, sym, true_sequential, damp_percent, checkpoint_format}
//   quantize_config.json the same quantization settings (AutoGPTQ reads this file)
//   model.safetensors    per layer matrix the GPTQ tensors qweight / qzeros / scales / g_idx
//                        (model/hf_quantized.hpp has the layout), F16 embedding, norms and lm_head
//                        (none when the GGUF ties the head to the embedding)
//
// Grids: q4_0 is symmetric GPTQ with groups of 32 and zero 8 (levels and fp16 d as they are, so the
// directory loads back as the same Q4_0 blocks); int4_asym/gG is asymmetric GPTQ with group G.
// Groups are always consecutive inputs (g_idx = j / G): Nibble's act-order uses static groups, so
// desc_act = static_groups = act_order says only how the columns were visited.
// GGUF stores q and k rows with each head's two RoPE halves interleaved; they are written back in
// HF's order (the inverse of the permutation llama_weights.cpp applies at load).
// Zeros are stored as zero − 1 (checkpoint_format "gptq", what every GPTQ loader reads). A group
// whose zero is 0 is rewritten as zero 1 with every level + 1 (the same values) when its levels
// allow; if any does not, the whole checkpoint is written as "gptq_v2" (zeros as they are).
#include <cstdint>
#include <map>
#include <optional>
#include <string>
#include <vector>

#include "model/gguf.hpp"
#include "model/hf_quantized.hpp"
#include "model/llama_config.hpp"
#include "model/partial_file.hpp"
#include "model/quant_grid.hpp"

namespace nibble::model {

struct GptqWriterOptions {
  bool act_order = false;  // recorded as desc_act / static_groups
  double percdamp = 0.01;  // recorded as damp_percent
};

// Writes as it is given each matrix, so that a 70B model's checkpoint is never held in memory: only the
// packed zeros (4 bits a group) wait for finish(), as their form depends on every matrix's.
class GptqCheckpointWriter {
 public:
  // source: the model being quantized (its config, token ids and float tensors); grid: q4_0 or
  // int4_asym, every matrix's. Creates `dir` if needed and begins model.safetensors (at a temporary name
  // until finish()) with the F16 embedding, norms and head. Throws GgufError for a config a Hugging Face
  // LlamaForCausalLM cannot express (partial RoPE), std::invalid_argument for a K-quant grid,
  // SafetensorsError for I/O problems.
  GptqCheckpointWriter(const GgufFile& source, const QuantGrid& grid, GptqWriterOptions options,
                       const std::string& dir);

  // One layer matrix by its GGUF name ("blk.3.attn_q.weight"), [n_out, k] in GGUF row order, on the
  // writer's grid, written at once. Throws std::invalid_argument for an unknown name, a matrix added
  // twice, a shape that disagrees with the config, another grid, or dimensions that are not multiples of
  // 8.
  void add(const std::string& gguf_name, const QuantizedMatrix& matrix);

  // Writes the zeros, config.json and quantize_config.json and puts model.safetensors in place. Throws
  // std::invalid_argument naming a layer matrix never added (and leaves no model.safetensors),
  // HfCheckpointError / SafetensorsError for I/O problems.
  void finish();

  // The checkpoint_format finish() chose ("gptq" or "gptq_v2"; see above); valid after finish().
  const std::string& checkpoint_format() const { return format_; }

 private:
  const GgufFile& source_;
  LlamaConfig config_;
  QuantGrid grid_;
  GptqWriterOptions options_;
  std::string dir_;
  std::optional<PartialFile> file_;                      // model.safetensors
  std::map<std::string, SafetensorsTensorData> qzeros_;  // by GGUF name: zeros as they are (v2)
  bool zero_zero_ = false;                               // a zero of 0 left: the checkpoint is gptq_v2
  std::string format_ = "gptq";
};

}  // namespace nibble::model
