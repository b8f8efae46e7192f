#pragma once
// Llama hyperparameters read from GGUF metadata (`<arch>.*` keys) or a Hugging Face config.json.
#include <cstdint>
#include <string>
#include <vector>

#include "kernels/rope.hpp"
#include "model/gguf.hpp"

namespace nibble::model {

class HfCheckpoint;

struct LlamaConfig {
  std::string architecture = "llama";
  int64_t n_embd = 0;
  int64_t n_layer = 0;
  int64_t n_head = 0;
  int64_t n_head_kv = 0;
  int64_t n_ff = 0;
  int64_t n_vocab = 0;
  int64_t n_ctx_train = 0;
  int64_t head_dim = 0;   // GGUF attention.key_length or HF head_dim; else n_embd / n_head
  int64_t rope_dims = 0;  // leading dims of each head that rotate
  float rope_base = 10000.0f;
  // RoPE scaling as llama.cpp applies it (kernels::RopeScaling): pair i turns by
  // rope_freq_scale() * pos * rope_base^(-2i/rope_dims) / rope_freq_factors[i].
  // With YaRN (GGUF rope.scaling.type yarn, HF rope_type yarn) the factor is rope_linear_factor's,
  // ramped between unscaled and scaled angles over pairs chosen by the original context.
  float rope_linear_factor = 0.0f;            // linear scaling (GGUF llama.rope.scaling.factor); 0: none
  std::vector<float> rope_freq_factors = {};  // [rope_dims / 2]: Llama 3.1's rope_freqs.weight; empty: all 1
  int64_t rope_yarn_original_context = 0;     // YaRN's (rope.scaling.original_context_length); 0: no YaRN
  float rope_attn_factor = 1.0f;              // rope.scaling.attn_factor: cos and sin times this (llama.cpp)
  float rms_eps = 1e-5f;
  bool tied_output = false;  // the head reuses the token embedding (HF tie_word_embeddings)

  int64_t q_dim() const { return n_head * head_dim; }
  // llama.cpp's float arithmetic (1.0f / factor).
  float rope_freq_scale() const { return rope_linear_factor == 0.0f ? 1.0f : 1.0f / rope_linear_factor; }
  // The whole scaling as the RoPE kernels take it; freq_factors points into rope_freq_factors (this
  // config's host copy: a GPU model puts its device copy in its place).
  kernels::RopeScaling rope_scaling() const;
  int64_t kv_dim() const { return n_head_kv * head_dim; }

  // Throws GgufError naming the missing or inconsistent key.
  static LlamaConfig from_gguf(const GgufFile& file);
  // From config.json of an HF LlamaForCausalLM checkpoint. Throws HfCheckpointError naming the key
  // that is missing, ill-typed or out of range, or the feature that is not supported (rope_scaling
  // other than linear, llama3 and yarn, biases, activations other than silu).
  static LlamaConfig from_hf(const HfCheckpoint& checkpoint);
};

// The llama.rope.scaling.* keys for a linear factor, or YaRN's factor from an original context (> 0),
// as convert_hf_to_gguf.py writes them; none for a factor of 0.
void set_gguf_rope_scaling(GgufWriter& out, float linear_factor, int64_t yarn_original_context);

// Llama 3.1's RoPE frequency factors (HF rope_scaling {"rope_type": "llama3", ...}), one per rotated
// pair, as llama.cpp's convert_hf_to_gguf.py computes its rope_freqs.weight: 1 for wavelengths under
// original_context / high_freq_factor, `factor` over original_context / low_freq_factor, smoothly
// between, in float32 as that script's torch arithmetic. Throws std::invalid_argument unless rope_dims is
// even and positive, rope_base > 0, factor >= 1, 0 < low_freq_factor < high_freq_factor and
// original_context > 0 (the callers check their inputs first and name the key).
struct Llama3RopeScaling {
  double factor = 8.0;
  double low_freq_factor = 1.0;
  double high_freq_factor = 4.0;
  double original_context = 8192.0;
};
std::vector<float> llama3_rope_freq_factors(const Llama3RopeScaling& scaling, float rope_base,
                                            int64_t rope_dims);

}  // namespace nibble::model
