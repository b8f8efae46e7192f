#pragma once
// Llama hyperparameters read from GGUF metadata (`<arch>.*` keys) or a Hugging Face config.json.
#include <cstdint>
#include <string>

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
  int64_t head_dim = 0;   // n_embd / n_head
  int64_t rope_dims = 0;  // leading dims of each head that rotate
  float rope_base = 10000.0f;
  float rms_eps = 1e-5f;
  bool tied_output = false;  // the head reuses the token embedding (HF tie_word_embeddings)

  int64_t q_dim() const { return n_head * head_dim; }
  int64_t kv_dim() const { return n_head_kv * head_dim; }

  // Throws GgufError naming the missing or inconsistent key.
  static LlamaConfig from_gguf(const GgufFile& file);
  // From config.json of an HF LlamaForCausalLM checkpoint. Throws HfCheckpointError naming the key
  // that is missing, ill-typed or out of range, or the feature that is not supported (rope_scaling,
  // biases, activations other than silu).
  static LlamaConfig from_hf(const HfCheckpoint& checkpoint);
};

}  // namespace nibble::model
