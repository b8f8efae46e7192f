#include "model/lora_adapter.hpp"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <map>
#include <nlohmann/json.hpp>
#include <random>
#include <stdexcept>
#include <tuple>

#include "kernels/quantize.hpp"
#include "model/llama_checkpoint.hpp"
#include "model/safetensors.hpp"

namespace nibble::model {

namespace {

// Where a base tensor name ("blk.3.attn_q.weight", "output.weight") points in an adapter.
std::optional<LoraMatrix>* slot_for(LoraAdapter& adapter, const std::string& name) {
  if (name == "output.weight") return &adapter.output;
  if (name.rfind("blk.", 0) != 0) return nullptr;
  const size_t dot = name.find('.', 4);
  if (dot == std::string::npos || dot == 4) return nullptr;
  int64_t layer = 0;
  for (size_t i = 4; i < dot; ++i) {
    if (name[i] < '0' || name[i] > '9' || layer > 1'000'000) return nullptr;
    layer = layer * 10 + (name[i] - '0');
  }
  if (layer >= static_cast<int64_t>(adapter.layers.size())) return nullptr;
  for (int m = 0; m < 7; ++m) {
    if (name == layer_tensor_name(layer, static_cast<LayerMatrix>(m)))
      return &adapter.layers[static_cast<size_t>(layer)][static_cast<size_t>(m)];
  }
  return nullptr;
}

// A [rank, k] and B [n_out, rank] (row-major shapes, as PEFT writes them; GGUF's dims reversed) checked
// against W [n_out, k]; `what` names the pair in the message, a_name / b_name its tensors. The rank.
int64_t check_pair(const std::string& what, const char* a_name, const char* b_name,
                   const std::vector<int64_t>& a, const std::vector<int64_t>& b, int64_t n_out, int64_t k) {
  if (a.size() != 2 || b.size() != 2 || a[1] != k || b[0] != n_out) {
    throw GgufError(what + " has the wrong shape for this model (maybe wrong base model?): W is [" +
                    std::to_string(n_out) + ", " + std::to_string(k) + "]");
  }
  if (a[0] != b[1] || a[0] < 1) {
    throw GgufError(what + ": " + a_name + "'s rank " + std::to_string(a[0]) + " and " + b_name + "'s " +
                    std::to_string(b[1]) + " differ");
  }
  return a[0];
}

std::vector<float> read_floats(const GgufFile& file, const GgufTensorInfo& t) {
  if (t.type != kernels::DType::F32 && t.type != kernels::DType::F16 && t.type != kernels::DType::BF16) {
    throw GgufError(file.path() + ": LoRA tensor '" + t.name + "' is " + kernels::type_name(t.type) +
                    ": only F32, F16 and BF16 adapters are read");
  }
  std::vector<float> values(static_cast<size_t>(t.n_elements));
  const uint8_t* data = file.tensor_data(t);
  for (int64_t r = 0; r < t.rows(); ++r) {
    const kernels::Status s = kernels::dequantize_row(
        t.type, data + r * kernels::row_bytes(t.type, t.dims[0]), values.data() + r * t.dims[0], t.dims[0]);
    if (s != kernels::Status::ok)
      throw GgufError(file.path() + ": LoRA tensor '" + t.name + "' cannot be read");
  }
  return values;
}

std::vector<uint8_t> encode(const std::vector<float>& values, kernels::DType type) {
  std::vector<uint8_t> bytes(
      static_cast<size_t>(kernels::row_bytes(type, static_cast<int64_t>(values.size()))));
  if (kernels::quantize_row(type, values.data(), bytes.data(), static_cast<int64_t>(values.size())) !=
      kernels::Status::ok) {
    throw std::invalid_argument(std::string("LoRA tensors are F32, F16 or BF16, not ") +
                                kernels::type_name(type));
  }
  return bytes;
}

}  // namespace

int64_t LoraAdapter::n_matrices() const {
  int64_t n = output ? 1 : 0;
  for (const auto& layer : layers)
    for (const auto& m : layer) n += m ? 1 : 0;
  return n;
}

LoraAdapter LoraAdapter::read_gguf(const std::string& path, const LlamaConfig& base) {
  const std::shared_ptr<const GgufFile> file = GgufFile::open(path);
  const std::string type = file->find_string("general.type").value_or("");
  if (type != "adapter") {
    throw GgufError(path + ": general.type is '" + type + "', not 'adapter': not a LoRA adapter file");
  }
  const std::string adapter_type = file->find_string("adapter.type").value_or("");
  if (adapter_type != "lora") throw GgufError(path + ": adapter.type is '" + adapter_type + "', not 'lora'");
  const std::string arch = file->find_string("general.architecture").value_or("");
  if (arch != base.architecture) {
    throw GgufError(path + ": an adapter for architecture '" + arch + "', the model is '" +
                    base.architecture + "'");
  }
  LoraAdapter adapter;
  adapter.path = path;
  adapter.alpha = static_cast<float>(file->find_float("adapter.lora.alpha").value_or(0.0));
  adapter.layers.resize(static_cast<size_t>(base.n_layer));

  // Pair every "<name>.lora_a" with its "<name>.lora_b".
  std::map<std::string, std::pair<const GgufTensorInfo*, const GgufTensorInfo*>> pairs;
  for (const GgufTensorInfo& t : file->tensors()) {
    const auto ends = [&](const char* suffix) {
      const size_t n = std::strlen(suffix);
      return t.name.size() > n && t.name.compare(t.name.size() - n, n, suffix) == 0;
    };
    if (ends(".lora_a")) {
      pairs[t.name.substr(0, t.name.size() - 7)].first = &t;
    } else if (ends(".lora_b")) {
      pairs[t.name.substr(0, t.name.size() - 7)].second = &t;
    } else {
      throw GgufError(path + ": tensor '" + t.name + "' is neither a .lora_a nor a .lora_b");
    }
  }
  for (const auto& [name, ab] : pairs) {
    if (ab.first == nullptr || ab.second == nullptr) {
      throw GgufError(path + ": '" + name + "' has " + (ab.first ? "lora_a" : "lora_b") + " without " +
                      (ab.first ? "lora_b" : "lora_a"));
    }
    if (name == "token_embd.weight") {
      throw GgufError(path + ": '" + name + "': adapters of the token embedding are not supported");
    }
    std::optional<LoraMatrix>* slot = slot_for(adapter, name);
    if (slot == nullptr)
      throw GgufError(path + ": '" + name + "' is not a matrix of this " + std::to_string(base.n_layer) +
                      "-layer model");
    int64_t n_out = base.n_vocab, k = base.n_embd;
    if (name != "output.weight") {
      const size_t index = static_cast<size_t>(slot - &adapter.layers[0][0]) % 7;
      std::tie(n_out, k) = layer_matrix_shape(base, static_cast<LayerMatrix>(index));
    }
    const GgufTensorInfo& a = *ab.first;
    const GgufTensorInfo& b = *ab.second;
    // GGML order: A's dims are [k, rank] (rank rows of k), B's [rank, n_out].
    LoraMatrix m;
    m.rank = check_pair(path + ": '" + name + "'", "lora_a", "lora_b", {a.dims.rbegin(), a.dims.rend()},
                        {b.dims.rbegin(), b.dims.rend()}, n_out, k);
    m.k = k;
    m.n_out = n_out;
    m.a = read_floats(*file, a);
    m.b = read_floats(*file, b);
    *slot = std::move(m);
  }
  if (adapter.n_matrices() == 0) throw GgufError(path + ": the adapter holds no LoRA tensors");
  return adapter;
}

LoraAdapter LoraAdapter::read_peft(const std::string& directory, const LlamaConfig& base) {
  namespace fs = std::filesystem;
  const fs::path dir(directory);
  const fs::path config_path = dir / "adapter_config.json";
  std::ifstream config_file(config_path);
  if (!config_file) throw GgufError(directory + ": no adapter_config.json (not a PEFT adapter directory)");
  nlohmann::json config;
  try {
    config = nlohmann::json::parse(config_file);
  } catch (const nlohmann::json::exception& e) {
    throw GgufError(config_path.string() + ": not JSON: " + e.what());
  }
  const auto where = config_path.string() + ": ";
  if (!config.is_object()) throw GgufError(where + "expected a JSON object");
  const auto value = [&](const char* key) -> const nlohmann::json* {
    const auto it = config.find(key);
    return it == config.end() || it->is_null() ? nullptr : &*it;
  };
  if (const auto* t = value("peft_type"); t == nullptr || !t->is_string() || t->get<std::string>() != "LORA")
    throw GgufError(where + "peft_type is not \"LORA\"");
  const auto flag = [&](const char* key) {
    const auto* v = value(key);
    if (v != nullptr && !v->is_boolean()) throw GgufError(where + key + ": expected true or false");
    return v != nullptr && v->get<bool>();
  };
  if (flag("use_dora")) throw GgufError(where + "use_dora: DoRA adapters are not supported");
  if (flag("fan_in_fan_out"))
    throw GgufError(where + "fan_in_fan_out: transposed (Conv1D) weights are not supported");
  if (const auto* b = value("bias"); b != nullptr && (!b->is_string() || b->get<std::string>() != "none"))
    throw GgufError(where + "bias: adapters with biases are not supported (\"none\" only)");
  if (const auto* p = value("alpha_pattern"); p != nullptr && !(p->is_object() && p->empty()))
    throw GgufError(where + "alpha_pattern: per-module alphas are not supported");
  const auto* alpha = value("lora_alpha");
  if (alpha == nullptr || !alpha->is_number() || alpha->get<double>() <= 0)
    throw GgufError(where + "lora_alpha: expected a positive number");

  LoraAdapter adapter;
  adapter.path = directory;
  adapter.alpha = alpha->get<float>();
  adapter.rank_stabilized = flag("use_rslora");
  adapter.layers.resize(static_cast<size_t>(base.n_layer));

  const fs::path weights = dir / "adapter_model.safetensors";
  if (!fs::exists(weights)) {
    throw GgufError(directory + ": no adapter_model.safetensors" +
                    (fs::exists(dir / "adapter_model.bin")
                         ? " (adapter_model.bin is pickle, which is not read: "
                           "save the adapter with safe_serialization=True)"
                         : ""));
  }
  std::shared_ptr<const SafetensorsFile> file;
  try {
    file = SafetensorsFile::open(weights.string());
  } catch (const SafetensorsError& e) {
    throw GgufError(e.what());
  }
  const std::map<std::string, LayerMatrix> modules = {
      {"self_attn.q_proj", LayerMatrix::attn_q}, {"self_attn.k_proj", LayerMatrix::attn_k},
      {"self_attn.v_proj", LayerMatrix::attn_v}, {"self_attn.o_proj", LayerMatrix::attn_output},
      {"mlp.gate_proj", LayerMatrix::ffn_gate},  {"mlp.up_proj", LayerMatrix::ffn_up},
      {"mlp.down_proj", LayerMatrix::ffn_down}};
  // Each module's A and B.
  std::map<std::string, std::pair<const SafetensorsTensorInfo*, const SafetensorsTensorInfo*>> pairs;
  for (const SafetensorsTensorInfo& t : file->tensors()) {
    const auto ends = [&](const std::string& suffix) {
      return t.name.size() > suffix.size() &&
             t.name.compare(t.name.size() - suffix.size(), suffix.size(), suffix) == 0;
    };
    if (t.name.find("lora_embedding") != std::string::npos)
      throw GgufError(weights.string() + ": '" + t.name +
                      "': adapters of the token embedding are not supported");
    if (t.name == "base_model.model.lm_head.base_layer.weight") {
      // peft saves the frozen head beside its adapter ("save_embedding_layers"): the base model's own
      // weights, unless the vocabulary was resized, which a model of this shape cannot serve.
      if (t.shape != std::vector<int64_t>{base.n_vocab, base.n_embd})
        throw GgufError(weights.string() + ": '" + t.name +
                        "' is not this model's head (a resized vocabulary?)");
      continue;
    }
    if (ends(".lora_A.weight")) {
      pairs[t.name.substr(0, t.name.size() - 14)].first = &t;
    } else if (ends(".lora_B.weight")) {
      pairs[t.name.substr(0, t.name.size() - 14)].second = &t;
    } else {
      throw GgufError(weights.string() + ": tensor '" + t.name + "' is neither a lora_A nor a lora_B weight");
    }
  }
  const std::string layers_prefix = "base_model.model.model.layers.";
  for (const auto& [module, ab] : pairs) {
    const std::string name = weights.string() + ": '" + module + "'";
    if (ab.first == nullptr || ab.second == nullptr)
      throw GgufError(name + " has only one of lora_A and lora_B");
    std::optional<LoraMatrix>* slot = nullptr;
    int64_t n_out = base.n_vocab, k = base.n_embd;
    int64_t permute_heads = 0;  // q/k: the heads whose B rows go into GGUF's RoPE order
    if (module == "base_model.model.lm_head") {
      slot = &adapter.output;
    } else if (module.rfind(layers_prefix, 0) == 0) {
      const size_t dot = module.find('.', layers_prefix.size());
      const std::string index = module.substr(layers_prefix.size(), dot - layers_prefix.size());
      const auto it = dot == std::string::npos ? modules.end() : modules.find(module.substr(dot + 1));
      int64_t layer = -1;
      if (!index.empty() && index.size() < 7 && std::all_of(index.begin(), index.end(), ::isdigit))
        layer = std::stoll(index);
      if (it == modules.end() || layer < 0 || layer >= base.n_layer) {
        throw GgufError(name + " is not a matrix of this " + std::to_string(base.n_layer) + "-layer model");
      }
      slot = &adapter.layers[static_cast<size_t>(layer)][static_cast<size_t>(it->second)];
      std::tie(n_out, k) = layer_matrix_shape(base, it->second);
      if (it->second == LayerMatrix::attn_q) permute_heads = base.n_head;
      if (it->second == LayerMatrix::attn_k) permute_heads = base.n_head_kv;
    } else {
      throw GgufError(name + " is not a matrix of this model");
    }
    const SafetensorsTensorInfo& a = *ab.first;
    const SafetensorsTensorInfo& b = *ab.second;
    const int64_t rank = check_pair(name, "lora_A", "lora_B", a.shape, b.shape, n_out, k);
    const auto floats = [&](const SafetensorsTensorInfo& t) {
      const std::optional<kernels::DType> type = safetensors_float_type(t.dtype);
      if (!type)
        throw GgufError(name + ": " + safetensors_dtype_name(t.dtype) + " weights (F32, F16 or BF16 only)");
      std::vector<uint8_t> bytes(file->tensor_data(t), file->tensor_data(t) + t.size_bytes);  // aligned copy
      std::vector<float> out(static_cast<size_t>(t.n_elements));
      if (kernels::dequantize_row(*type, bytes.data(), out.data(), t.n_elements) != kernels::Status::ok)
        throw GgufError(name + " cannot be read");
      return out;
    };
    LoraMatrix m;
    m.rank = rank;
    m.k = k;
    m.n_out = n_out;
    m.a = floats(a);
    m.b = floats(b);
    if (permute_heads > 0) {  // B's rows as the model's own q/k rows
      std::vector<float> permuted(m.b.size());
      permute_rope_rows(reinterpret_cast<const uint8_t*>(m.b.data()),
                        reinterpret_cast<uint8_t*>(permuted.data()), permute_heads, base.head_dim,
                        m.rank * static_cast<int64_t>(sizeof(float)));
      m.b = std::move(permuted);
    }
    *slot = std::move(m);
  }
  if (adapter.n_matrices() == 0) throw GgufError(weights.string() + ": the adapter holds no LoRA tensors");
  return adapter;
}

LoraAdapter LoraAdapter::read(const std::string& path, const LlamaConfig& base) {
  return std::filesystem::is_directory(path) ? read_peft(path, base) : read_gguf(path, base);
}

void LoraAdapter::write_gguf(const std::string& file_path, const std::string& architecture,
                             kernels::DType type) const {
  GgufWriter w;
  w.set_string("general.architecture", architecture);
  w.set_string("general.type", "adapter");
  w.set_string("adapter.type", "lora");
  float stored_alpha = alpha;
  if (rank_stabilized) {  // GGUF has no rsLoRA flag: alpha / sqrt(r) is written as (alpha sqrt(r)) / r
    int64_t rank = 0;
    const auto check = [&](const std::optional<LoraMatrix>& m) {
      if (!m) return;
      if (rank != 0 && m->rank != rank)
        throw std::invalid_argument("an rsLoRA adapter of several ranks cannot be written as GGUF");
      rank = m->rank;
    };
    for (const auto& layer : layers)
      for (const auto& m : layer) check(m);
    check(output);
    stored_alpha = alpha * std::sqrt(static_cast<float>(rank));
  }
  w.set_float32("adapter.lora.alpha", stored_alpha);
  const auto add = [&](const std::string& name, const LoraMatrix& m) {
    w.add_tensor(name + ".lora_a", {m.k, m.rank}, type, encode(m.a, type));
    w.add_tensor(name + ".lora_b", {m.rank, m.n_out}, type, encode(m.b, type));
  };
  for (size_t l = 0; l < layers.size(); ++l) {
    for (int m = 0; m < 7; ++m) {
      if (layers[l][static_cast<size_t>(m)])
        add(layer_tensor_name(static_cast<int64_t>(l), static_cast<LayerMatrix>(m)),
            *layers[l][static_cast<size_t>(m)]);
    }
  }
  if (output) add("output.weight", *output);
  w.write(file_path);
}

void merge_lora(const GgufFile& base, const std::vector<std::pair<const LoraAdapter*, float>>& adapters,
                const std::string& out_path) {
  // Each adapted tensor's name with its updates.
  std::map<std::string, std::vector<std::pair<const LoraMatrix*, float>>> updates;
  for (const auto& [adapter, user_scale] : adapters) {
    for (size_t l = 0; l < adapter->layers.size(); ++l) {
      for (int m = 0; m < 7; ++m) {
        const auto& lm = adapter->layers[l][static_cast<size_t>(m)];
        if (lm)
          updates[layer_tensor_name(static_cast<int64_t>(l), static_cast<LayerMatrix>(m))].emplace_back(
              &*lm, adapter->scale(*lm, user_scale));
      }
    }
    if (adapter->output)
      updates["output.weight"].emplace_back(&*adapter->output, adapter->scale(*adapter->output, user_scale));
  }
  for (const auto& [name, list] : updates) {
    const GgufTensorInfo* t = base.find_tensor(name);
    if (t == nullptr)
      throw GgufError(base.path() + ": the adapters change '" + name + "', which the model lacks");
    for (const auto& [m, scale] : list) {
      if (t->dims.size() != 2 || t->dims[0] != m->k || t->dims[1] != m->n_out)
        throw GgufError(base.path() + ": '" + name +
                        "' is not of the adapter's shape (maybe wrong base model?)");
    }
  }
  // Unchanged tensors are written from the base's mapping, merged ones made as the writer reaches them:
  // one merged F32 matrix in memory at a time (a 70B model's would not all fit).
  GgufWriter w;
  for (const auto& [key, value] : base.metadata()) w.set(key, value);
  for (const GgufTensorInfo& t : base.tensors()) {
    const uint8_t* data = base.tensor_data(t);
    const auto it = updates.find(t.name);
    if (it == updates.end()) {
      w.add_tensor_view(t.name, t.dims, t.type, data, t.size_bytes);
      continue;
    }
    const auto& list = it->second;
    w.add_tensor_made(t.name, t.dims, kernels::DType::F32, [&base, &t, data, &list] {
      const int64_t k = t.dims[0], n_out = t.dims[1];
      std::vector<float> merged(static_cast<size_t>(n_out * k));
      for (int64_t r = 0; r < n_out; ++r) {
        if (kernels::dequantize_row(t.type, data + r * kernels::row_bytes(t.type, k), merged.data() + r * k,
                                    k) != kernels::Status::ok)
          throw GgufError(base.path() + ": '" + t.name + "' cannot be read");
      }
      for (const auto& [m, scale] : list) {
        for (int64_t r = 0; r < n_out; ++r) {
          float* row = merged.data() + r * k;
          for (int64_t j = 0; j < m->rank; ++j) {
            const float bj = scale * m->b[static_cast<size_t>(r * m->rank + j)];
            const float* a = m->a.data() + j * k;
            for (int64_t c = 0; c < k; ++c) row[c] += bj * a[c];
          }
        }
      }
      return encode(merged, kernels::DType::F32);
    });
  }
  w.write(out_path);
}

LoraAdapter make_random_lora(const LlamaConfig& base, int64_t rank, float alpha, float b_scale, uint64_t seed,
                             const std::vector<LayerMatrix>& which, bool with_output) {
  std::mt19937_64 engine(seed);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  const auto make = [&](int64_t n_out, int64_t k) {
    LoraMatrix m;
    m.rank = rank;
    m.k = k;
    m.n_out = n_out;
    m.a.resize(static_cast<size_t>(rank * k));
    m.b.resize(static_cast<size_t>(n_out * rank));
    const float a_std = 1.0f / std::sqrt(static_cast<float>(k));
    const float b_std = b_scale / std::sqrt(static_cast<float>(rank));
    // Values fp16 holds exactly: the forward pass keeps the factors as fp16 (worker/lora_weights), so
    // an F32 file of this adapter and its merge into F32 weights mean the same numbers.
    const auto fp16_exact = [](float v) { return kernels::fp16_to_fp32(kernels::fp32_to_fp16(v)); };
    for (float& v : m.a) v = fp16_exact(normal(engine) * a_std);
    for (float& v : m.b) v = fp16_exact(normal(engine) * b_std);
    return m;
  };
  LoraAdapter adapter;
  adapter.alpha = alpha;
  adapter.layers.resize(static_cast<size_t>(base.n_layer));
  for (auto& layer : adapter.layers) {
    for (LayerMatrix m : which) {
      const auto [n_out, k] = layer_matrix_shape(base, m);
      layer[static_cast<size_t>(m)] = make(n_out, k);
    }
  }
  if (with_output) adapter.output = make(base.n_vocab, base.n_embd);
  return adapter;
}

}  // namespace nibble::model
