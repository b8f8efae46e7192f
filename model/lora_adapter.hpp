#pragma once
// LoRA adapters in llama.cpp's GGUF form (what convert_lora_to_gguf.py writes from a PEFT adapter and
// `llama-cli --lora` reads): general.type "adapter", adapter.type "lora", adapter.lora.alpha, and for
// each adapted matrix W two tensors "<W's name>.lora_a" and "<W's name>.lora_b". The adapted product
// is llama.cpp's build_lora_mm:
//   y = W x + scale * B (A x),  scale = user_scale * alpha / rank (user_scale alone when alpha is 0)
// A low-rank update serves a fine-tune of the INT4 base without a second copy of it, and several
// adapters serve at once on the one base (vLLM's multi-LoRA, S-LoRA).
#include <array>
#include <cmath>
#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "kernels/quant_types.hpp"
#include "model/gguf.hpp"
#include "model/llama_config.hpp"
#include "model/llama_weights.hpp"

namespace nibble::model {

// One adapted matrix W [n_out, k]: the update B A, with A [rank, k] and B [n_out, rank] as floats.
struct LoraMatrix {
  int64_t rank = 0;
  int64_t k = 0;
  int64_t n_out = 0;
  std::vector<float> a;  // [rank, k]
  std::vector<float> b;  // [n_out, rank]
};

struct LoraAdapter {
  std::string path;              // the file it was read from (empty when made in memory)
  float alpha = 0;               // adapter.lora.alpha; 0: the scale is the user's scale alone
  bool rank_stabilized = false;  // PEFT's use_rslora: alpha / sqrt(rank) instead of alpha / rank
  // [n_layer][LayerMatrix]: the layer matrices the adapter changes (unset: left as they are).
  std::vector<std::array<std::optional<LoraMatrix>, 7>> layers;
  std::optional<LoraMatrix> output;  // the output head

  // The factor of B A for a matrix of this rank (llama_adapter_lora_weight::get_scale).
  float scale(const LoraMatrix& m, float user_scale) const {
    const auto rank = static_cast<float>(m.rank);
    return alpha == 0 ? user_scale : user_scale * alpha / (rank_stabilized ? std::sqrt(rank) : rank);
  }
  // Matrices adapted, layers' and head's.
  int64_t n_matrices() const;

  // Reads a llama.cpp LoRA GGUF for a base model of `base`'s shape. Throws GgufError naming the
  // problem: not an adapter, another architecture, a tensor without its pair, a name that is no
  // matrix of the model (token_embd adapters are refused: the embedding's update is not a product),
  // a shape that does not fit the base ("maybe wrong base model"), ranks of A and B that differ, a
  // tensor type other than F32 / F16 / BF16, or no adapted matrix at all.
  static LoraAdapter read_gguf(const std::string& path, const LlamaConfig& base);
  // Reads a PEFT adapter directory, the form vLLM serves (adapter_config.json: peft_type LORA, r,
  // lora_alpha, use_rslora; adapter_model.safetensors: "base_model.model.model.layers.N.self_attn.
  // q_proj.lora_A.weight" [r, in] and ".lora_B.weight" [out, r], mlp's gate/up/down_proj, and
  // "base_model.model.lm_head"), with q_proj's and k_proj's B rows reordered per head as the model's
  // own HF q/k rows are (LlamaWeights: GGUF's RoPE order), as llama.cpp's convert_lora_to_gguf.py does.
  // Throws GgufError naming the problem (a missing file, another peft_type, DoRA, fan_in_fan_out,
  // biases, alpha_pattern, embedding adapters, a tensor that is no matrix of the model or of the wrong
  // shape, pickle-only weights).
  static LoraAdapter read_peft(const std::string& directory, const LlamaConfig& base);
  // A directory is read as PEFT, anything else as GGUF.
  static LoraAdapter read(const std::string& path, const LlamaConfig& base);
  // Writes it as llama.cpp reads it (A and B in `type`: F32, F16 or BF16); architecture: the base's
  // general.architecture. Throws GgufError on I/O failure, std::invalid_argument for another type.
  void write_gguf(const std::string& path, const std::string& architecture, kernels::DType type) const;
};

// llama.cpp's llama-export-lora: writes the GGUF model `base` to out_path with each matrix the
// adapters change replaced by W + sum of scale_i B_i A_i in F32 (user scales as in LoraAdapter::scale);
// every other tensor and all metadata are copied as they are. Throws GgufError naming a tensor the
// base lacks or one of another shape, or on I/O failure.
void merge_lora(const GgufFile& base, const std::vector<std::pair<const LoraAdapter*, float>>& adapters,
                const std::string& out_path);

// A deterministic random adapter for tests and examples: every layer matrix named in `which` (and the
// head when with_output) gets A ~ N(0, 1/k) and B ~ N(0, 1/rank) * b_scale, so that B A x is about
// b_scale times W x's size; every value one fp16 holds exactly.
LoraAdapter make_random_lora(const LlamaConfig& base, int64_t rank, float alpha, float b_scale, uint64_t seed,
                             const std::vector<LayerMatrix>& which, bool with_output = false);

}  // namespace nibble::model
