#include "model/llama_config.hpp"

#include <limits>
#include <nlohmann/json.hpp>

#include "model/hf_checkpoint.hpp"

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
  // Checked as read: a double past float's range does not convert to a float at all.
  const double rope_base = file.find_float(a + "rope.freq_base").value_or(10000.0);
  const double rms_eps = file.find_float(a + "attention.layer_norm_rms_epsilon").value_or(1e-5);
  if (!(rope_base > 0.0 && rope_base <= std::numeric_limits<float>::max()) ||
      !(rms_eps > 0.0 && rms_eps <= std::numeric_limits<float>::max())) {
    throw GgufError(file.path() + ": rope base and rms epsilon must be positive and finite");
  }
  c.rope_base = static_cast<float>(rope_base);
  c.rms_eps = static_cast<float>(rms_eps);

  if (c.n_embd % c.n_head != 0)
    throw GgufError(file.path() + ": embedding_length is not a multiple of head_count");
  if (c.n_head % c.n_head_kv != 0)
    throw GgufError(file.path() + ": head_count is not a multiple of head_count_kv");
  c.head_dim = c.n_embd / c.n_head;
  c.rope_dims = file.has(a + "rope.dimension_count") ? positive(a + "rope.dimension_count") : c.head_dim;
  if (c.rope_dims > c.head_dim || c.rope_dims % 2 != 0) {
    throw GgufError(file.path() + ": rope.dimension_count must be even and at most the head size");
  }
  // A block count the file cannot back is refused before anything is sized by it: every layer has
  // its norm tensor, and nine tensors in all (so the search ends within the file's tensor count).
  const auto layers_in_reach = static_cast<int64_t>(file.tensors().size() / 9);
  for (int64_t i = 0; i < c.n_layer; ++i) {
    const std::string norm = "blk." + std::to_string(i) + ".attn_norm.weight";
    if (i >= layers_in_reach || file.find_tensor(norm) == nullptr) {
      throw GgufError(file.path() + ": " + a + "block_count = " + std::to_string(c.n_layer) +
                      ", but tensor '" + norm + "' is missing");
    }
  }

  const GgufTensorInfo* embd = file.find_tensor("token_embd.weight");
  if (embd == nullptr) throw GgufError(file.path() + ": tensor 'token_embd.weight' is missing");
  if (embd->dims.size() != 2) throw GgufError(file.path() + ": token_embd.weight must be 2-D");
  c.n_vocab = embd->dims[1];
  c.tied_output = file.find_tensor("output.weight") == nullptr;
  return c;
}

LlamaConfig LlamaConfig::from_hf(const HfCheckpoint& checkpoint) {
  using nlohmann::json;
  const std::string& path = checkpoint.config_path();
  json j;
  try {
    j = json::parse(checkpoint.config_text());
  } catch (const json::exception& e) {
    throw HfCheckpointError(path + ": not valid JSON: " + e.what());
  }
  if (!j.is_object()) throw HfCheckpointError(path + ": not a JSON object");
  auto fail = [&](const std::string& key, const std::string& problem) -> HfCheckpointError {
    return HfCheckpointError(path + ": key '" + key + "' " + problem);
  };
  // A key that is absent or null counts as missing (transformers writes null for "use the default").
  auto present = [&](const char* key) { return j.contains(key) && !j[key].is_null(); };
  auto positive = [&](const char* key) -> int64_t {
    if (!present(key)) throw fail(key, "is missing");
    const json& v = j[key];
    if (!v.is_number_integer()) throw fail(key, "must be an integer, not " + v.dump());
    const int64_t n = v.get<int64_t>();
    if (n <= 0 || n > (int64_t{1} << 31)) throw fail(key, "= " + v.dump() + " is out of range");
    return n;
  };
  auto number = [&](const json& v, const std::string& key) -> double {
    if (!v.is_number() || v.is_boolean()) throw fail(key, "must be a number, not " + v.dump());
    return v.get<double>();
  };
  auto flag = [&](const char* key, bool fallback) -> bool {
    if (!present(key)) return fallback;
    if (!j[key].is_boolean()) throw fail(key, "must be true or false, not " + j[key].dump());
    return j[key].get<bool>();
  };

  if (!present("architectures")) throw fail("architectures", "is missing");
  const json& arch = j["architectures"];
  if (!arch.is_array() || arch.size() != 1 || !arch[0].is_string() || arch[0] != "LlamaForCausalLM") {
    throw fail("architectures", "= " + arch.dump() + " is not supported (only [\"LlamaForCausalLM\"])");
  }
  if (present("hidden_act") && j["hidden_act"] != "silu")
    throw fail("hidden_act", "= " + j["hidden_act"].dump() + " is not supported (only \"silu\")");
  if (flag("attention_bias", false)) throw fail("attention_bias", "= true is not supported");
  if (flag("mlp_bias", false)) throw fail("mlp_bias", "= true is not supported");

  LlamaConfig c;
  c.n_embd = positive("hidden_size");
  c.n_layer = positive("num_hidden_layers");
  // A layer count the checkpoint cannot back is refused before anything is sized by it: every layer
  // has its norm tensor, and nine tensors at least (so the search ends within the tensor count).
  const auto layers_in_reach = static_cast<int64_t>(checkpoint.tensors().size() / 9);
  for (int64_t i = 0; i < c.n_layer; ++i) {
    const std::string norm = "model.layers." + std::to_string(i) + ".input_layernorm.weight";
    if (i >= layers_in_reach || checkpoint.tensors().count(norm) == 0) {
      throw fail("num_hidden_layers",
                 "= " + std::to_string(c.n_layer) + ", but tensor '" + norm + "' is missing");
    }
  }
  c.n_head = positive("num_attention_heads");
  c.n_head_kv = present("num_key_value_heads") ? positive("num_key_value_heads") : c.n_head;
  c.n_ff = positive("intermediate_size");
  c.n_vocab = positive("vocab_size");
  c.n_ctx_train = positive("max_position_embeddings");
  if (!present("rms_norm_eps")) throw fail("rms_norm_eps", "is missing");
  // Checked as read: a double past float's range does not convert to a float at all.
  const auto positive_float = [&](double v) { return v > 0.0 && v <= std::numeric_limits<float>::max(); };
  const double rms_eps = number(j["rms_norm_eps"], "rms_norm_eps");
  if (!positive_float(rms_eps)) throw fail("rms_norm_eps", "must be positive and finite");
  c.rms_eps = static_cast<float>(rms_eps);

  // RoPE: rope_theta (transformers 4), or rope_parameters.rope_theta (transformers 5). Only plain
  // RoPE is implemented: any scaling (linear, dynamic, llama3, yarn) would change the logits.
  double theta = 10000.0;
  if (present("rope_theta")) theta = number(j["rope_theta"], "rope_theta");
  for (const char* key : {"rope_scaling", "rope_parameters"}) {
    if (!present(key)) continue;
    const json& r = j[key];
    if (!r.is_object()) throw fail(key, "must be an object, not " + r.dump());
    for (const char* type_key : {"rope_type", "type"}) {
      if (r.contains(type_key) && r[type_key] != "default")
        throw fail(key, "= " + r.dump() + " is not supported (only rope_type \"default\")");
    }
    if (r.contains("rope_theta")) theta = number(r["rope_theta"], std::string(key) + ".rope_theta");
  }
  if (!positive_float(theta)) throw fail("rope_theta", "must be positive and finite");
  c.rope_base = static_cast<float>(theta);

  if (c.n_head % c.n_head_kv != 0)
    throw fail("num_attention_heads", "is not a multiple of num_key_value_heads");
  if (present("head_dim")) {
    c.head_dim = positive("head_dim");
  } else {
    if (c.n_embd % c.n_head != 0) throw fail("hidden_size", "is not a multiple of num_attention_heads");
    c.head_dim = c.n_embd / c.n_head;
  }
  if (c.head_dim % 2 != 0) throw fail("head_dim", "must be even (RoPE rotates pairs)");
  c.rope_dims = c.head_dim;
  c.tied_output = flag("tie_word_embeddings", false);  // LlamaConfig's default
  return c;
}

}  // namespace nibble::model
