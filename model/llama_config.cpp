#include "model/llama_config.hpp"

namespace nibble::model {

LlamaConfig LlamaConfig::from_gguf(const GgufFile& file) {
  LlamaConfig c;
  c.architecture = file.get_string("general.architecture");
  if (c.architecture != "llama") {
    throw GgufError(file.path() + ": architecture '" + c.architecture + "' is not supported (only 'llama')");
  }
  const std::string a = c.architecture + ".";
  auto positive = [&](const std::string& key) {
    const uint64_t v = file.get_uint(key);
    if (v == 0 || v > (1ull << 31))
      throw GgufError(file.path() + ": " + key + " = " + std::to_string(v) + " is out of range");
    return static_cast<int64_t>(v);
  };
  c.n_embd = positive(a + "embedding_length");
  c.n_layer = positive(a + "block_count");
  c.n_head = positive(a + "attention.head_count");
  c.n_head_kv = file.has(a + "attention.head_count_kv") ? positive(a + "attention.head_count_kv") : c.n_head;
  c.n_ff = positive(a + "feed_forward_length");
  c.n_ctx_train = file.has(a + "context_length") ? positive(a + "context_length") : 2048;
  c.rope_base = static_cast<float>(file.find_float(a + "rope.freq_base").value_or(10000.0));
  c.rms_eps = static_cast<float>(file.find_float(a + "attention.layer_norm_rms_epsilon").value_or(1e-5));

  if (c.n_embd % c.n_head != 0)
    throw GgufError(file.path() + ": embedding_length is not a multiple of head_count");
  if (c.n_head % c.n_head_kv != 0)
    throw GgufError(file.path() + ": head_count is not a multiple of head_count_kv");
  c.head_dim = c.n_embd / c.n_head;
  c.rope_dims = file.has(a + "rope.dimension_count") ? positive(a + "rope.dimension_count") : c.head_dim;
  if (c.rope_dims > c.head_dim || c.rope_dims % 2 != 0) {
    throw GgufError(file.path() + ": rope.dimension_count must be even and at most the head size");
  }
  if (c.rope_base <= 0.0f || c.rms_eps <= 0.0f)
    throw GgufError(file.path() + ": rope base and rms epsilon must be positive");

  const GgufTensorInfo* embd = file.find_tensor("token_embd.weight");
  if (embd == nullptr) throw GgufError(file.path() + ": tensor 'token_embd.weight' is missing");
  if (embd->dims.size() != 2) throw GgufError(file.path() + ": token_embd.weight must be 2-D");
  c.n_vocab = embd->dims[1];
  return c;
}

}  // namespace nibble::model
