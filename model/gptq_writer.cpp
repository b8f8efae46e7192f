#include "model/gptq_writer.hpp"

#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <stdexcept>

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

// A GGUF tensor of any type as F16 bytes, with its HF shape (GGUF dims reversed).
SafetensorsTensorData f16_tensor(const GgufFile& file, const std::string& gguf_name,
                                 const std::string& hf_name) {
  const GgufTensorInfo* t = file.find_tensor(gguf_name);
  if (t == nullptr) throw GgufError(file.path() + ": tensor '" + gguf_name + "' is missing");
  const int64_t n = t->row_elements();
  std::vector<float> row(static_cast<size_t>(n));
  SafetensorsTensorData out{hf_name, SafetensorsDType::F16, {}, {}};
  for (auto d = t->dims.rbegin(); d != t->dims.rend(); ++d) out.shape.push_back(*d);
  out.bytes.resize(static_cast<size_t>(n * t->rows() * 2));
  auto* half = reinterpret_cast<kernels::f16_bits*>(out.bytes.data());
  const int64_t bytes = kernels::row_bytes(t->type, n);
  for (int64_t r = 0; r < t->rows(); ++r) {
    if (kernels::dequantize_row(t->type, file.tensor_data(*t) + r * bytes, row.data(), n) !=
        kernels::Status::ok)
      throw GgufError(file.path() + ": tensor '" + gguf_name + "' cannot be read as floats");
    for (int64_t j = 0; j < n; ++j) half[r * n + j] = kernels::fp32_to_fp16(row[static_cast<size_t>(j)]);
  }
  return out;
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

GptqCheckpointWriter::GptqCheckpointWriter(const GgufFile& source, GptqWriterOptions options)
    : source_(source), config_(LlamaConfig::from_gguf(source)), options_(options) {
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
}

void GptqCheckpointWriter::add(const std::string& gguf_name, const QuantizedMatrix& matrix) {
  const LlamaConfig& c = config_;
  for (int64_t l = 0; l < c.n_layer; ++l) {
    for (int m = 0; m < 7; ++m) {
      if (layer_tensor_name(l, kLayerMatrices[m]) != gguf_name) continue;
      const int64_t n_out[] = {c.q_dim(), c.kv_dim(), c.kv_dim(), c.n_embd, c.n_ff, c.n_ff, c.n_embd};
      const int64_t k[] = {c.n_embd, c.n_embd, c.n_embd, c.q_dim(), c.n_embd, c.n_embd, c.n_ff};
      if (matrix.n_out != n_out[m] || matrix.k != k[m]) {
        throw std::invalid_argument(gguf_name + ": quantized matrix [" + std::to_string(matrix.n_out) + ", " +
                                    std::to_string(matrix.k) + "], the model's is [" +
                                    std::to_string(n_out[m]) + ", " + std::to_string(k[m]) + "]");
      }
      if (matrix.grid.k_quant())
        throw std::invalid_argument(gguf_name + ": the " + matrix.grid.name() +
                                    " grid has no GPTQ form (q4_0 or int4_asym only)");
      if (have_grid_ && (matrix.grid.type != grid_.type || matrix.grid.group_size != grid_.group_size)) {
        throw std::invalid_argument(gguf_name + ": grid " + matrix.grid.name() + " differs from the " +
                                    grid_.name() +
                                    " of the matrices before it (a GPTQ checkpoint has one group size)");
      }
      grid_ = matrix.grid;
      have_grid_ = true;
      Int4Linear linear = unpack(matrix);
      if (m < 2) linear = rope_halves(linear, c.head_dim);
      lift_zero_zeros(linear);
      Layer layer;
      layer.prefix = "model.layers." + std::to_string(l) + "." + kHfLinear[m];
      layer.tensors = pack_gptq(linear, layer.prefix, /*zeros_minus_one=*/false);
      layer.tensors.erase(layer.tensors.begin() + 1);  // qzeros: packed by write() once the format is known
      linear.levels.clear();
      linear.levels.shrink_to_fit();
      layer.zeros_only = std::move(linear);
      layers_[gguf_name] = std::move(layer);
      return;
    }
  }
  throw std::invalid_argument("'" + gguf_name + "' is not a layer matrix of this " +
                              std::to_string(c.n_layer) + "-layer model");
}

void GptqCheckpointWriter::write(const std::string& dir) {
  const LlamaConfig& c = config_;
  for (int64_t l = 0; l < c.n_layer; ++l) {
    for (LayerMatrix m : kLayerMatrices) {
      if (!layers_.contains(layer_tensor_name(l, m)))
        throw std::invalid_argument("GPTQ checkpoint: layer matrix '" + layer_tensor_name(l, m) +
                                    "' was never added");
    }
  }
  bool zero_zero = false;
  for (const auto& [name, layer] : layers_)
    for (uint8_t z : layer.zeros_only.zeros) zero_zero = zero_zero || z == 0;
  format_ = zero_zero ? "gptq_v2" : "gptq";

  std::vector<SafetensorsTensorData> tensors;
  tensors.push_back(f16_tensor(source_, "token_embd.weight", "model.embed_tokens.weight"));
  for (int64_t l = 0; l < c.n_layer; ++l) {
    const std::string blk = "blk." + std::to_string(l) + ".", hf = "model.layers." + std::to_string(l) + ".";
    tensors.push_back(f16_tensor(source_, blk + "attn_norm.weight", hf + "input_layernorm.weight"));
    tensors.push_back(f16_tensor(source_, blk + "ffn_norm.weight", hf + "post_attention_layernorm.weight"));
    for (LayerMatrix m : kLayerMatrices) {
      Layer& layer = layers_.at(layer_tensor_name(l, m));
      // Only qzeros depends on the format: pack it from a levels-free copy (pack_gptq packs levels too).
      Int4Linear z = layer.zeros_only;
      z.levels.assign(static_cast<size_t>(z.n_out * z.k), 0);
      SafetensorsTensorData qzeros = std::move(pack_gptq(z, layer.prefix, format_ == "gptq")[1]);
      tensors.push_back(std::move(layer.tensors[0]));  // qweight
      tensors.push_back(std::move(qzeros));
      tensors.push_back(std::move(layer.tensors[1]));  // scales
      tensors.push_back(std::move(layer.tensors[2]));  // g_idx
    }
  }
  tensors.push_back(f16_tensor(source_, "output_norm.weight", "model.norm.weight"));
  if (!c.tied_output) tensors.push_back(f16_tensor(source_, "output.weight", "lm_head.weight"));
  layers_.clear();

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

  fs::create_directories(dir);
  const fs::path root(dir);
  auto write_json = [&](const char* file, const json& value) {
    std::ofstream out(root / file, std::ios::trunc);
    out << value.dump(2) << "\n";
    if (!out) throw HfCheckpointError((root / file).string() + ": cannot write");
  };
  write_json("config.json", config);
  write_json("quantize_config.json", quant);
  write_safetensors((root / "model.safetensors").string(), tensors, {{"format", "pt"}});
}

}  // namespace nibble::model
