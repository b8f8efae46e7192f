#include "model/llama_config.hpp"

#include <cmath>
#include <cstring>
#include <limits>
#include <nlohmann/json.hpp>
#include <numbers>
#include <stdexcept>

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
  // Mixtral's files are of this architecture too, their FFNs experts: refused by name, not by the first
  // missing FFN tensor.
  if (const auto experts = file.find_uint(a + "expert_count"); experts && *experts > 0) {
    throw GgufError(file.path() + ": " + a + "expert_count = " + std::to_string(*experts) +
                    ": mixture-of-experts models (Mixtral's) are not supported");
  }
  // Checked as read: a double past float's range does not convert to a float at all.
  const double rope_base = file.find_float(a + "rope.freq_base").value_or(10000.0);
  const double rms_eps = file.find_float(a + "attention.layer_norm_rms_epsilon").value_or(1e-5);
  if (!(rope_base > 0.0 && rope_base <= std::numeric_limits<float>::max()) ||
      !(rms_eps > 0.0 && rms_eps <= std::numeric_limits<float>::max())) {
    throw GgufError(file.path() + ": rope base and rms epsilon must be positive and finite");
  }
  c.rope_base = static_cast<float>(rope_base);
  c.rms_eps = static_cast<float>(rms_eps);

  if (c.n_head % c.n_head_kv != 0)
    throw GgufError(file.path() + ": head_count is not a multiple of head_count_kv");
  // The head size: attention.key_length where the file gives it (Mistral Nemo / Small's llama-architecture
  // files: heads of 128 over an embedding of 5120 and 32 heads), else embedding_length / head_count, as
  // llama.cpp reads it. K and V heads of different sizes are not Llama's.
  if (file.has(a + "attention.key_length")) {
    c.head_dim = positive(a + "attention.key_length");
    if (file.has(a + "attention.value_length") && positive(a + "attention.value_length") != c.head_dim) {
      throw GgufError(file.path() + ": " + a + "attention.value_length differs from " + a +
                      "attention.key_length (K and V heads of different sizes are not supported)");
    }
  } else {
    if (c.n_embd % c.n_head != 0)
      throw GgufError(file.path() + ": embedding_length is not a multiple of head_count");
    c.head_dim = c.n_embd / c.n_head;
  }
  c.rope_dims = file.has(a + "rope.dimension_count") ? positive(a + "rope.dimension_count") : c.head_dim;
  if (c.rope_dims > c.head_dim || c.rope_dims % 2 != 0) {
    throw GgufError(file.path() + ": rope.dimension_count must be even and at most the head size");
  }
  // RoPE scaling as llama.cpp reads it (llama_model::load_hparams): the type defaults to linear and
  // the factor (or the older rope.scale_linear) to none; a type "none" ignores the factor. YaRN takes
  // llama.cpp's defaults for Llama (beta_fast 32, beta_slow 1: it reads no rope.scaling.yarn_* key for
  // this architecture) and the original context. LongRoPE (Phi-3's) is refused by name rather than run
  // as plain RoPE.
  const std::string scaling_type = file.find_string(a + "rope.scaling.type").value_or("linear");
  if (scaling_type != "none" && scaling_type != "linear" && scaling_type != "yarn") {
    throw GgufError(
        file.path() + ": " + a + "rope.scaling.type = '" + scaling_type +
        "' is not supported (only 'none', 'linear' and 'yarn', and Llama 3.1's rope_freqs.weight)");
  }
  if (scaling_type == "yarn") {
    const std::string key = a + "rope.scaling.original_context_length";
    c.rope_yarn_original_context = file.has(key) ? positive(key) : c.n_ctx_train;
  }
  if (const auto attn_factor = file.find_float(a + "rope.scaling.attn_factor")) {
    if (!(*attn_factor > 0.0 && *attn_factor <= std::numeric_limits<float>::max()))
      throw GgufError(file.path() + ": " + a + "rope.scaling.attn_factor must be positive and finite");
    c.rope_attn_factor = static_cast<float>(*attn_factor);
  }
  std::string factor_key = a + "rope.scaling.factor";
  if (!file.has(factor_key)) factor_key = a + "rope.scale_linear";
  const double factor = file.find_float(factor_key).value_or(0.0);
  if (factor != 0.0 && scaling_type != "none") {
    if (!(factor > 0.0 && factor <= std::numeric_limits<float>::max() && static_cast<float>(factor) > 0.0f))
      throw GgufError(file.path() + ": " + factor_key + " must be positive and finite");
    c.rope_linear_factor = static_cast<float>(factor);
  }
  if (const GgufTensorInfo* freqs = file.find_tensor("rope_freqs.weight")) {
    const int64_t pairs = c.rope_dims / 2;
    if (freqs->type != kernels::DType::F32 || freqs->dims.size() != 1 || freqs->dims[0] != pairs) {
      throw GgufError(file.path() + ": tensor 'rope_freqs.weight' must be F32 [" + std::to_string(pairs) +
                      "] (one factor a rotated pair of a head)");
    }
    c.rope_freq_factors.resize(static_cast<size_t>(pairs));
    std::memcpy(c.rope_freq_factors.data(), file.tensor_data(*freqs),
                c.rope_freq_factors.size() * sizeof(float));
    for (size_t i = 0; i < c.rope_freq_factors.size(); ++i) {
      const float v = c.rope_freq_factors[i];
      if (!(v > 0.0f) || !std::isfinite(v)) {
        throw GgufError(file.path() + ": rope_freqs.weight[" + std::to_string(i) +
                        "] = " + std::to_string(v) + ": RoPE frequency factors must be positive and finite");
      }
    }
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

  // RoPE: rope_theta (transformers 4), or rope_parameters.rope_theta (transformers 5). Plain RoPE, and
  // the two scalings llama.cpp's converter keeps for Llama (linear, Llama 3.1's llama3); the others
  // (dynamic, yarn, longrope) would change the logits and are refused by name.
  double theta = 10000.0;
  if (present("rope_theta")) theta = number(j["rope_theta"], "rope_theta");
  std::string scaling_key;  // the object that names a scaling, if any
  std::string scaling_type = "default";
  for (const char* key : {"rope_scaling", "rope_parameters"}) {
    if (!present(key)) continue;
    const json& r = j[key];
    if (!r.is_object()) throw fail(key, "must be an object, not " + r.dump());
    for (const char* type_key : {"rope_type", "type"}) {
      if (!r.contains(type_key) || r[type_key] == "default") continue;
      if (r[type_key] != "linear" && r[type_key] != "llama3" && r[type_key] != "yarn")
        throw fail(key,
                   "= " + r.dump() +
                       " is not supported (only rope_type \"default\", \"linear\", \"llama3\" and \"yarn\")");
      scaling_key = key;
      scaling_type = r[type_key].get<std::string>();
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
  if (!scaling_key.empty()) {
    const json& r = j[scaling_key];
    const auto field = [&](const char* name, double fallback) {
      return r.contains(name) && !r[name].is_null() ? number(r[name], scaling_key + "." + name) : fallback;
    };
    // Without a factor, transformers' YaRN takes max_position_embeddings / original_max_position_embeddings.
    double default_factor = scaling_type == "llama3" ? 8.0 : 0.0;
    if (scaling_type == "yarn" && r.contains("original_max_position_embeddings") &&
        r["original_max_position_embeddings"].is_number() &&
        r["original_max_position_embeddings"].get<double>() > 0)
      default_factor =
          static_cast<double>(c.n_ctx_train) / r["original_max_position_embeddings"].get<double>();
    const double factor = field("factor", default_factor);
    if (!(factor >= 1.0 && factor <= std::numeric_limits<float>::max()))
      throw fail(scaling_key + ".factor", "must be a number of at least 1 (" + r.dump() + ")");
    if (scaling_type == "linear") {
      c.rope_linear_factor = static_cast<float>(factor);
    } else if (scaling_type == "yarn") {
      // As llama.cpp runs a Llama model's YaRN (convert_hf_to_gguf.py keeps the factor and the original
      // context; llama.cpp reads nothing else for this architecture): transformers' defaults only.
      if (!r.contains("original_max_position_embeddings") || r["original_max_position_embeddings"].is_null())
        throw fail(scaling_key + ".original_max_position_embeddings", "is missing (YaRN needs it)");
      const double original =
          number(r["original_max_position_embeddings"], scaling_key + ".original_max_position_embeddings");
      if (!(original >= 1.0 && original <= double{1 << 30} && original == std::floor(original)))
        throw fail(scaling_key + ".original_max_position_embeddings",
                   "must be a positive integer (" + r.dump() + ")");
      const std::pair<const char*, double> defaults[] = {{"beta_fast", 32.0}, {"beta_slow", 1.0}};
      for (const auto& [name, value] : defaults) {
        if (field(name, value) != value)
          throw fail(scaling_key + "." + name,
                     "other than " + std::to_string(static_cast<int>(value)) +
                         " is not supported (llama.cpp's YaRN for Llama takes 32 and 1)");
      }
      for (const char* name : {"attention_factor", "mscale", "mscale_all_dim"}) {
        if (r.contains(name) && !r[name].is_null())
          throw fail(scaling_key + "." + name, "is not supported (YaRN's default attention factor only)");
      }
      if (r.contains("truncate") && r["truncate"] != true)
        throw fail(scaling_key + ".truncate", "other than true is not supported");
      c.rope_linear_factor = static_cast<float>(factor);
      c.rope_yarn_original_context = static_cast<int64_t>(original);
    } else {
      Llama3RopeScaling l3;
      l3.factor = factor;
      l3.low_freq_factor = field("low_freq_factor", 1.0);
      l3.high_freq_factor = field("high_freq_factor", 4.0);
      l3.original_context = field("original_max_position_embeddings", 8192.0);
      if (!(l3.low_freq_factor > 0.0 && l3.low_freq_factor < l3.high_freq_factor &&
            l3.high_freq_factor <= std::numeric_limits<float>::max())) {
        throw fail(scaling_key, "needs 0 < low_freq_factor < high_freq_factor (" + r.dump() + ")");
      }
      if (!(l3.original_context >= 1.0 && l3.original_context <= std::numeric_limits<float>::max()))
        throw fail(scaling_key + ".original_max_position_embeddings", "must be positive (" + r.dump() + ")");
      c.rope_freq_factors = llama3_rope_freq_factors(l3, c.rope_base, c.rope_dims);
    }
  }
  c.tied_output = flag("tie_word_embeddings", false);  // LlamaConfig's default
  return c;
}

void set_gguf_rope_scaling(GgufWriter& out, float linear_factor, int64_t yarn_original_context) {
  if (linear_factor == 0.0f) return;
  out.set_string("llama.rope.scaling.type", yarn_original_context > 0 ? "yarn" : "linear");
  out.set_float32("llama.rope.scaling.factor", linear_factor);
  if (yarn_original_context > 0)
    out.set_uint32("llama.rope.scaling.original_context_length",
                   static_cast<uint32_t>(yarn_original_context));
}

kernels::RopeScaling LlamaConfig::rope_scaling() const {
  const float* factors = rope_freq_factors.empty() ? nullptr : rope_freq_factors.data();
  if (rope_yarn_original_context > 0) {
    return kernels::rope_yarn_scaling(rope_freq_scale(), factors, rope_dims, rope_yarn_original_context,
                                      rope_base, rope_attn_factor);
  }
  kernels::RopeScaling scaling;
  scaling.freq_scale = rope_freq_scale();
  scaling.freq_factors = factors;
  scaling.mscale = rope_attn_factor;
  return scaling;
}

std::vector<float> llama3_rope_freq_factors(const Llama3RopeScaling& scaling, float rope_base,
                                            int64_t rope_dims) {
  if (rope_dims <= 0 || rope_dims % 2 != 0 || !(rope_base > 0.0f) || !(scaling.factor >= 1.0) ||
      !(scaling.low_freq_factor > 0.0 && scaling.low_freq_factor < scaling.high_freq_factor) ||
      !(scaling.original_context > 0.0)) {
    throw std::invalid_argument("llama3 RoPE scaling: bad parameters");
  }
  // convert_hf_to_gguf.py: freqs = 1 / base^(arange(0, dim, 2) / dim) and the wavelengths 2 pi / freq,
  // all in float32 tensors (torch divides a scalar by a tensor as the reciprocal times the scalar).
  const auto f = [](double v) { return static_cast<float>(v); };
  const float factor = f(scaling.factor);
  const float low = f(scaling.low_freq_factor);
  const float high = f(scaling.high_freq_factor);
  // Python floats, compared with float32 tensors as float32.
  const float low_freq_wavelen = f(scaling.original_context / scaling.low_freq_factor);
  const float high_freq_wavelen = f(scaling.original_context / scaling.high_freq_factor);
  std::vector<float> factors(static_cast<size_t>(rope_dims / 2));
  for (int64_t i = 0; i < rope_dims / 2; ++i) {
    const float exponent = static_cast<float>(2 * i) / static_cast<float>(rope_dims);
    const float freq = 1.0f / std::pow(rope_base, exponent);
    const float wavelen = (1.0f / freq) * f(2.0 * std::numbers::pi);
    float& out = factors[static_cast<size_t>(i)];
    if (wavelen < high_freq_wavelen) {
      out = 1.0f;
    } else if (wavelen > low_freq_wavelen) {
      out = factor;
    } else {
      const float smooth = ((1.0f / wavelen) * f(scaling.original_context) - low) / (high - low);
      out = 1.0f / ((1.0f - smooth) / factor + smooth);
    }
  }
  return factors;
}

}  // namespace nibble::model
