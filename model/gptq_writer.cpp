#include "model/gptq_writer.hpp"

#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <stdexcept>
#include <utility>

#include "kernels/quantize.hpp"
#include "model/llama_weights.hpp"

namespace nibble::model {

namespace {

namespace fs = std::filesystem;
using nlohmann::json;

// HF's name of each layer matrix (LayerMatrix order).
const char* const kHfLinear[] = {"self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                                 "self_attn.o_proj", "mlp.gate_proj",    "mlp.up_proj",
                                 "mlp.down_proj"};

// A float32 GGUF value as the shortest decimal that reads back as the same float (1e-05, not
// 9.999999747378752e-06).
double tidy(float f) {
  char text[32];
  std::snprintf(text, sizeof text, "%.7g", static_cast<double>(f));
  const double d = std::strtod(text, nullptr);
  return static_cast<float>(d) == f ? d : static_cast<double>(f);
}

// A GGUF tensor as it is written in F16: its HF name and shape (GGUF dims reversed).
SafetensorsTensorSpec f16_spec(const GgufFile& file, const std::string& gguf_name,
                               const std::string& hf_name) {
  const GgufTensorInfo* t = file.find_tensor(gguf_name);
  if (t == nullptr) throw GgufError(file.path() + ": tensor '" + gguf_name + "' is missing");
  SafetensorsTensorSpec spec{hf_name, SafetensorsDType::F16, {}};
  for (auto d = t->dims.rbegin(); d != t->dims.rend(); ++d) spec.shape.push_back(*d);
  return spec;
}

// A GGUF tensor of any type as F16 bytes.
std::vector<uint8_t> f16_bytes(const GgufFile& file, const std::string& gguf_name) {
  const GgufTensorInfo& t = *file.find_tensor(gguf_name);
  const int64_t n = t.row_elements();
  std::vector<float> row(static_cast<size_t>(n));
  std::vector<uint8_t> out(static_cast<size_t>(n * t.rows() * 2));
  auto* half = reinterpret_cast<kernels::f16_bits*>(out.data());
  const int64_t bytes = kernels::row_bytes(t.type, n);
  for (int64_t r = 0; r < t.rows(); ++r) {
    if (kernels::dequantize_row(t.type, file.tensor_data(t) + r * bytes, row.data(), n) !=
        kernels::Status::ok)
      throw GgufError(file.path() + ": tensor '" + gguf_name + "' cannot be read as floats");
    for (int64_t j = 0; j < n; ++j) half[r * n + j] = kernels::fp32_to_fp16(row[static_cast<size_t>(j)]);
  }
  return out;
}

// The F16 tensors of a checkpoint: GGUF name → HF name, in the file's order around the layers.
std::vector<std::pair<std::string, std::string>> f16_tensors_before(int64_t layer) {
  const std::string blk = "blk." + std::to_string(layer) + ".",
                    hf = "model.layers." + std::to_string(layer) + ".";
  return {{blk + "attn_norm.weight", hf + "input_layernorm.weight"},
          {blk + "ffn_norm.weight", hf + "post_attention_layernorm.weight"}};
}

// A layer matrix's [n_out, k] (LayerMatrix order m).
std::pair<int64_t, int64_t> matrix_shape(const LlamaConfig& c, int m) {
  const int64_t n_out[] = {c.q_dim(), c.kv_dim(), c.kv_dim(), c.n_embd, c.n_ff, c.n_ff, c.n_embd};
  const int64_t k[] = {c.n_embd, c.n_embd, c.n_embd, c.q_dim(), c.n_embd, c.n_embd, c.n_ff};
  return {n_out[m], k[m]};
}

// HF's prefix of a layer matrix: model.layers.N.self_attn.q_proj.
std::string hf_prefix(int64_t layer, int m) {
  return "model.layers." + std::to_string(layer) + "." + kHfLinear[m];
}

// The matrix's levels, zeros and scales, rows in GGUF order.
Int4Linear unpack(const QuantizedMatrix& q) {
  Int4Linear l;
  l.n_out = q.n_out;
  l.k = q.k;
  l.groups = q.k / q.grid.group_size;
  l.group.resize(static_cast<size_t>(q.k));
  for (int64_t j = 0; j < q.k; ++j)
    l.group[static_cast<size_t>(j)] = static_cast<int32_t>(j / q.grid.group_size);
  if (q.grid.type == GridType::int4_asym) {
    l.levels = q.levels;
    l.zeros = q.zeros;
    l.scales = q.scales;
    return l;
  }
  // q4_0: (q − 8) · d, one group per block.
  l.levels.resize(static_cast<size_t>(q.n_out * q.k));
  l.zeros.assign(static_cast<size_t>(q.n_out * l.groups), 8);
  l.scales.resize(l.zeros.size());
  const int64_t row_bytes = kernels::row_bytes(kernels::DType::Q4_0, q.k);
  for (int64_t r = 0; r < q.n_out; ++r) {
    const auto* blocks = reinterpret_cast<const kernels::BlockQ4_0*>(q.blocks.data() + r * row_bytes);
    for (int64_t b = 0; b < l.groups; ++b) {
      l.scales[static_cast<size_t>(r * l.groups + b)] = kernels::fp16_to_fp32(blocks[b].d);
      uint8_t* levels = l.levels.data() + r * q.k + b * kernels::kQK4_0;
      for (int j = 0; j < kernels::kQK4_0 / 2; ++j) {
        levels[j] = blocks[b].qs[j] & 0xF;
        levels[j + kernels::kQK4_0 / 2] = static_cast<uint8_t>(blocks[b].qs[j] >> 4);
      }
    }
  }
  return l;
}

// GGUF row h·d + 2i + side (interleaved RoPE halves) → HF row h·d + side·d/2 + i, for every per-row
// array of the matrix.
Int4Linear rope_halves(const Int4Linear& l, int64_t head_dim) {
  Int4Linear out = l;
  const int64_t half = head_dim / 2;
  for (int64_t h = 0; h < l.n_out / head_dim; ++h) {
    for (int64_t i = 0; i < half; ++i) {
      for (int64_t side = 0; side < 2; ++side) {
        const int64_t from = h * head_dim + 2 * i + side, to = h * head_dim + side * half + i;
        std::copy_n(l.levels.begin() + from * l.k, l.k, out.levels.begin() + to * l.k);
        std::copy_n(l.zeros.begin() + from * l.groups, l.groups, out.zeros.begin() + to * l.groups);
        std::copy_n(l.scales.begin() + from * l.groups, l.groups, out.scales.begin() + to * l.groups);
      }
    }
  }
  return out;
}

// Zero 0 cannot be stored as zero − 1: where the group's levels are all below 15, the same values are
// (q + 1 − 1) · s.
void lift_zero_zeros(Int4Linear& l) {
  for (int64_t r = 0; r < l.n_out; ++r) {
    for (int64_t g = 0; g < l.groups; ++g) {
      uint8_t& zero = l.zeros[static_cast<size_t>(r * l.groups + g)];
      if (zero != 0) continue;
      bool room = true;
      for (int64_t j = 0; j < l.k; ++j)
        room =
            room && (l.group[static_cast<size_t>(j)] != g || l.levels[static_cast<size_t>(r * l.k + j)] < 15);
      if (!room) continue;
      zero = 1;
      for (int64_t j = 0; j < l.k; ++j)
        if (l.group[static_cast<size_t>(j)] == g) ++l.levels[static_cast<size_t>(r * l.k + j)];
    }
  }
}

}  // namespace

GptqCheckpointWriter::GptqCheckpointWriter(const GgufFile& source, const QuantGrid& grid,
                                           GptqWriterOptions options, const std::string& dir)
    : source_(source), config_(LlamaConfig::from_gguf(source)), grid_(grid), options_(options), dir_(dir) {
  if (config_.rope_dims != config_.head_dim) {
    throw GgufError(source.path() + ": RoPE rotates " + std::to_string(config_.rope_dims) + " of " +
                    std::to_string(config_.head_dim) +
                    " dimensions per head, which a Hugging Face LlamaForCausalLM cannot express");
  }
  if (config_.rope_attn_factor != 1.0f) {
    throw GgufError(source.path() + ": its rope.scaling.attn_factor cannot be written as a Hugging Face " +
                    "config.json's rope_scaling");
  }
  if (config_.rope_yarn_original_context > 0 && config_.rope_linear_factor == 0.0f) {
    throw GgufError(source.path() + ": YaRN without a factor cannot be written as a Hugging Face " +
                    "config.json's rope_scaling");
  }
  // config.json names llama3 scaling by its parameters, which the factors do not give back.
  if (!config_.rope_freq_factors.empty()) {
    throw GgufError(source.path() + ": its RoPE frequency factors (rope_freqs.weight, Llama 3.1's scaling) " +
                    "cannot be written as a Hugging Face config.json's rope_scaling");
  }
  if (grid.k_quant())
    throw std::invalid_argument("the " + grid.name() + " grid has no GPTQ form (q4_0 or int4_asym only)");
  const LlamaConfig& c = config_;
  // The file's tensors in order: the embedding, per layer its norms and its matrices' qweight, qzeros,
  // scales and g_idx, the final norm and the head.
  std::vector<std::pair<std::string, std::string>> f16 = {{"token_embd.weight", "model.embed_tokens.weight"}};
  std::vector<SafetensorsTensorSpec> specs = {f16_spec(source_, f16[0].first, f16[0].second)};
  for (int64_t l = 0; l < c.n_layer; ++l) {
    for (const auto& [gguf, hf] : f16_tensors_before(l)) {
      f16.emplace_back(gguf, hf);
      specs.push_back(f16_spec(source_, gguf, hf));
    }
    for (int m = 0; m < 7; ++m) {
      const std::string prefix = hf_prefix(l, m);
      const auto [n_out, k] = matrix_shape(c, m);
      const int64_t groups = k / grid_.group_size;
      specs.push_back({prefix + ".qweight", SafetensorsDType::I32, {k / 8, n_out}});
      specs.push_back({prefix + ".qzeros", SafetensorsDType::I32, {groups, n_out / 8}});
      specs.push_back({prefix + ".scales", SafetensorsDType::F16, {groups, n_out}});
      specs.push_back({prefix + ".g_idx", SafetensorsDType::I32, {k}});
    }
  }
  f16.emplace_back("output_norm.weight", "model.norm.weight");
  specs.push_back(f16_spec(source_, f16.back().first, f16.back().second));
  if (!c.tied_output) {
    f16.emplace_back("output.weight", "lm_head.weight");
    specs.push_back(f16_spec(source_, f16.back().first, f16.back().second));
  }
  fs::create_directories(dir_);
  file_.emplace(
      start_safetensors((fs::path(dir_) / "model.safetensors").string(), specs, {{"format", "pt"}}));
  for (const auto& [gguf, hf] : f16) {  // one at a time, the source's pages let go once read
    file_->fill(hf, f16_bytes(source_, gguf));
    source_.release_pages(*source_.find_tensor(gguf));
  }
}

void GptqCheckpointWriter::add(const std::string& gguf_name, const QuantizedMatrix& matrix) {
  const LlamaConfig& c = config_;
  for (int64_t l = 0; l < c.n_layer; ++l) {
    for (int m = 0; m < 7; ++m) {
      if (layer_tensor_name(l, kLayerMatrices[m]) != gguf_name) continue;
      const auto [n_out, k] = matrix_shape(c, m);
      if (matrix.n_out != n_out || matrix.k != k) {
        throw std::invalid_argument(gguf_name + ": quantized matrix [" + std::to_string(matrix.n_out) + ", " +
                                    std::to_string(matrix.k) + "], the model's is [" + std::to_string(n_out) +
                                    ", " + std::to_string(k) + "]");
      }
      if (matrix.grid.type != grid_.type || matrix.grid.group_size != grid_.group_size) {
        throw std::invalid_argument(gguf_name + ": grid " + matrix.grid.name() +
                                    " differs from the checkpoint's " + grid_.name() +
                                    " (a GPTQ checkpoint has one group size)");
      }
      if (qzeros_.contains(gguf_name)) throw std::invalid_argument(gguf_name + ": added twice");
      Int4Linear linear = unpack(matrix);
      if (m < 2) linear = rope_halves(linear, c.head_dim);
      lift_zero_zeros(linear);
      for (uint8_t z : linear.zeros) zero_zero_ = zero_zero_ || z == 0;
      // Levels and scales do not depend on the format, only the zeros do (packed by finish()).
      std::vector<SafetensorsTensorData> packed =
          pack_gptq(linear, hf_prefix(l, m), /*zeros_minus_one=*/false);
      for (size_t i = 0; i < packed.size(); ++i) {
        if (i != 1) file_->fill(packed[i].name, packed[i].bytes);
      }
      qzeros_[gguf_name] = std::move(packed[1]);
      return;
    }
  }
  throw std::invalid_argument("'" + gguf_name + "' is not a layer matrix of this " +
                              std::to_string(c.n_layer) + "-layer model");
}

void GptqCheckpointWriter::finish() {
  const LlamaConfig& c = config_;
  for (int64_t l = 0; l < c.n_layer; ++l) {
    for (LayerMatrix m : kLayerMatrices) {
      if (!qzeros_.contains(layer_tensor_name(l, m)))
        throw std::invalid_argument("GPTQ checkpoint: layer matrix '" + layer_tensor_name(l, m) +
                                    "' was never added");
    }
  }
  // Zeros as zero − 1 (v1) unless a zero of 0 is left; every nibble then 1 to 15, so minus one borrows
  // from none.
  format_ = zero_zero_ ? "gptq_v2" : "gptq";
  for (auto& [name, zeros] : qzeros_) {
    if (!zero_zero_) {
      for (size_t i = 0; i < zeros.bytes.size(); i += 4) {
        uint32_t word = 0;
        std::memcpy(&word, zeros.bytes.data() + i, 4);
        word -= 0x11111111u;
        std::memcpy(zeros.bytes.data() + i, &word, 4);
      }
    }
    file_->fill(zeros.name, zeros.bytes);
  }
  qzeros_.clear();

  const bool sym = grid_.type == GridType::q4_0;
  json quant = {{"quant_method", "gptq"},
                {"bits", 4},
                {"group_size", grid_.group_size},
                {"desc_act", options_.act_order},
                {"static_groups", options_.act_order},
                {"sym", sym},
                {"true_sequential", true},
                {"damp_percent", options_.percdamp},
                {"checkpoint_format", format_}};
  json config = {{"architectures", json::array({"LlamaForCausalLM"})},
                 {"model_type", "llama"},
                 {"hidden_size", c.n_embd},
                 {"intermediate_size", c.n_ff},
                 {"num_hidden_layers", c.n_layer},
                 {"num_attention_heads", c.n_head},
                 {"num_key_value_heads", c.n_head_kv},
                 {"head_dim", c.head_dim},
                 {"vocab_size", c.n_vocab},
                 {"max_position_embeddings", c.n_ctx_train},
                 {"rms_norm_eps", tidy(c.rms_eps)},
                 {"rope_theta", tidy(c.rope_base)},
                 {"hidden_act", "silu"},
                 {"attention_bias", false},
                 {"mlp_bias", false},
                 {"tie_word_embeddings", c.tied_output},
                 {"torch_dtype", "float16"},
                 {"use_cache", true},
                 {"quantization_config", quant}};
  if (c.rope_linear_factor != 0.0f && c.rope_yarn_original_context > 0) {
    config["rope_scaling"] = {{"rope_type", "yarn"},
                              {"factor", tidy(c.rope_linear_factor)},
                              {"original_max_position_embeddings", c.rope_yarn_original_context}};
  } else if (c.rope_linear_factor != 0.0f) {
    config["rope_scaling"] = {{"rope_type", "linear"}, {"factor", tidy(c.rope_linear_factor)}};
  }
  for (const char* id : {"bos", "eos"}) {
    if (const auto v = source_.find_uint(std::string("tokenizer.ggml.") + id + "_token_id"))
      config[std::string(id) + "_token_id"] = *v;
  }

  const fs::path root(dir_);
  auto write_json = [&](const char* file, const json& value) {
    std::ofstream out(root / file, std::ios::trunc);
    out << value.dump(2) << "\n";
    if (!out) throw HfCheckpointError((root / file).string() + ": cannot write");
  };
  write_json("config.json", config);
  write_json("quantize_config.json", quant);
  file_->finish();
}

}  // namespace nibble::model
