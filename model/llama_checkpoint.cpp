#include "model/llama_checkpoint.hpp"

#include <stdexcept>

#include "kernels/random_weights.hpp"
#include "model/hf_quantized.hpp"

namespace nibble::model {

namespace {

constexpr const char* kDummyPrefix = "dummy:";

// Q4_0 blocks of a dummy matrix [n_out, k], generated into owned memory.
WeightMatrix dummy_matrix(int64_t n_out, int64_t k, uint64_t seed) {
  WeightMatrix w;
  w.type = kernels::DType::Q4_0;
  w.n_out = n_out;
  w.k = k;
  auto owned = std::make_shared<std::vector<uint8_t>>(static_cast<size_t>(n_out * w.row_bytes()));
  if (kernels::fill_random_q4_0(owned->data(), n_out, k, seed) != kernels::Status::ok)
    throw std::invalid_argument("dummy matrix: row length " + std::to_string(k) + " is not a multiple of 32");
  w.data = owned->data();
  w.owned = std::move(owned);
  return w;
}

}  // namespace

std::pair<int64_t, int64_t> layer_matrix_shape(const LlamaConfig& c, LayerMatrix which) {
  switch (which) {
    case LayerMatrix::attn_q:
      return {c.q_dim(), c.n_embd};
    case LayerMatrix::attn_k:
    case LayerMatrix::attn_v:
      return {c.kv_dim(), c.n_embd};
    case LayerMatrix::attn_output:
      return {c.n_embd, c.q_dim()};
    case LayerMatrix::ffn_gate:
    case LayerMatrix::ffn_up:
      return {c.n_ff, c.n_embd};
    case LayerMatrix::ffn_down:
      break;
  }
  return {c.n_embd, c.n_ff};
}

bool LlamaCheckpoint::is_dummy_spec(const std::string& path) { return path.rfind(kDummyPrefix, 0) == 0; }

std::shared_ptr<const LlamaCheckpoint> LlamaCheckpoint::open(const std::string& path) {
  if (is_dummy_spec(path)) return open_dummy(path);
  if (HfCheckpoint::is_checkpoint_dir(path)) return from_hf(HfCheckpoint::open(path));
  return from_gguf(GgufFile::open(path));
}

std::shared_ptr<const LlamaCheckpoint> LlamaCheckpoint::from_gguf(std::shared_ptr<const GgufFile> file) {
  std::shared_ptr<LlamaCheckpoint> c(new LlamaCheckpoint());
  c->path_ = file->path();
  c->config_ = LlamaConfig::from_gguf(*file);
  c->gguf_ = std::move(file);
  return c;
}

std::shared_ptr<const LlamaCheckpoint> LlamaCheckpoint::from_hf(
    std::shared_ptr<const HfCheckpoint> checkpoint) {
  std::shared_ptr<LlamaCheckpoint> c(new LlamaCheckpoint());
  c->path_ = checkpoint->dir();
  c->config_ = LlamaConfig::from_hf(*checkpoint);
  read_hf_quantization(*checkpoint);  // an unsupported quantization_config fails here, before any binding
  c->hf_ = std::move(checkpoint);
  return c;
}

std::shared_ptr<const LlamaCheckpoint> LlamaCheckpoint::open_dummy(const std::string& spec) {
  if (!is_dummy_spec(spec))
    throw std::invalid_argument("'" + spec + "' is not a dummy model (dummy:<shape>)");
  std::string name = spec.substr(std::string(kDummyPrefix).size());
  uint64_t seed = 0;
  if (const size_t colon = name.find(':'); colon != std::string::npos) {
    const std::string option = name.substr(colon + 1);
    name.resize(colon);
    const std::string digits = option.rfind("seed=", 0) == 0 ? option.substr(5) : "";
    if (digits.empty() || digits.find_first_not_of("0123456789") != std::string::npos || digits.size() > 19)
      throw std::invalid_argument(spec + ": expected dummy:<shape> or dummy:<shape>:seed=<n>");
    seed = std::stoull(digits);
  }
  LlamaShape shape;
  try {
    shape = llama_shape_by_name(name);
  } catch (const std::invalid_argument&) {
    throw std::invalid_argument(spec + ": unknown dummy model shape '" + name + "' (known: " + kShapeNames +
                                ")");
  }
  std::shared_ptr<LlamaCheckpoint> c(new LlamaCheckpoint());
  c->path_ = spec;
  c->dummy_seed_ = seed;
  LlamaConfig& cfg = c->config_;
  cfg.n_embd = shape.n_embd;
  cfg.n_layer = shape.n_layer;
  cfg.n_head = shape.n_head;
  cfg.n_head_kv = shape.n_head_kv;
  cfg.n_ff = shape.n_ff;
  cfg.n_vocab = shape.n_vocab;
  cfg.n_ctx_train = shape.n_ctx;
  cfg.head_dim = shape.head_size();
  cfg.rope_dims = cfg.head_dim;
  cfg.rope_base = shape.rope_base;
  cfg.rope_linear_factor = shape.rope_linear_factor;
  cfg.rope_freq_factors = shape.rope_freq_factors;
  cfg.rope_yarn_original_context = shape.rope_yarn_original_context;
  cfg.rms_eps = shape.rms_eps;
  cfg.tied_output = false;
  return c;
}

uint64_t LlamaCheckpoint::weight_bytes() const {
  if (gguf_) return gguf_->file_size();
  if (hf_) return hf_->weight_bytes();
  const LlamaConfig& c = config_;
  const int64_t norms = (2 * c.n_layer + 1) * c.n_embd;
  const int64_t per_layer =
      c.n_embd * (c.q_dim() + 2 * c.kv_dim()) + c.q_dim() * c.n_embd + 3 * c.n_embd * c.n_ff;
  const int64_t matrices = 2 * c.n_vocab * c.n_embd + c.n_layer * per_layer;
  return static_cast<uint64_t>(matrices / kernels::kQK4_0 * static_cast<int64_t>(sizeof(kernels::BlockQ4_0)) +
                               norms * static_cast<int64_t>(sizeof(float)));
}

uint64_t LlamaCheckpoint::dummy_tensor_seed(DummyTensor tensor, int64_t layer, LayerMatrix matrix) const {
  const int64_t n = config_.n_layer;
  int64_t index = 0;
  switch (tensor) {
    case DummyTensor::embedding:
      index = 0;
      break;
    case DummyTensor::matrix:
      index = 1 + 7 * layer + static_cast<int64_t>(matrix);
      break;
    case DummyTensor::head:
      index = 1 + 7 * n;
      break;
    case DummyTensor::attn_norm:
      index = 2 + 7 * n + 2 * layer;
      break;
    case DummyTensor::ffn_norm:
      index = 3 + 7 * n + 2 * layer;
      break;
    case DummyTensor::output_norm:
      index = 2 + 9 * n;
      break;
  }
  return dummy_seed_ + static_cast<uint64_t>(index) * 0x9e3779b97f4a7c15ull;
}

std::vector<float> LlamaCheckpoint::dummy_norm(DummyTensor tensor, int64_t layer) const {
  std::vector<float> v(static_cast<size_t>(config_.n_embd));
  kernels::fill_random_uniform(v.data(), config_.n_embd, 0.9f, 1.1f, dummy_tensor_seed(tensor, layer));
  return v;
}

LlamaWeights LlamaCheckpoint::bind_weights(int64_t layer_begin, int64_t layer_end) const {
  // GGUF binding only points into the mapping, so binding every layer costs nothing.
  if (gguf_) return LlamaWeights::bind(*gguf_, config_);
  if (hf_) return LlamaWeights::bind(*hf_, config_, layer_begin, layer_end);
  const LlamaConfig& c = config_;
  if (layer_end < 0) layer_end = c.n_layer;
  if (layer_begin < 0 || layer_begin > layer_end || layer_end > c.n_layer)
    throw std::invalid_argument("layers [" + std::to_string(layer_begin) + ", " + std::to_string(layer_end) +
                                ") are outside the model's " + std::to_string(c.n_layer));
  LlamaWeights w;
  w.token_embd = dummy_matrix(c.n_vocab, c.n_embd, dummy_tensor_seed(DummyTensor::embedding));
  w.layers.resize(static_cast<size_t>(c.n_layer));
  for (int64_t i = layer_begin; i < layer_end; ++i) {
    LlamaLayerWeights& l = w.layers[static_cast<size_t>(i)];
    l.attn_norm = dummy_norm(DummyTensor::attn_norm, i);
    l.ffn_norm = dummy_norm(DummyTensor::ffn_norm, i);
    for (const LayerMatrix m : kLayerMatrices) {
      const auto [n_out, k] = layer_matrix_shape(c, m);
      l.matrix(m) = dummy_matrix(n_out, k, dummy_tensor_seed(DummyTensor::matrix, i, m));
    }
  }
  w.output_norm = dummy_norm(DummyTensor::output_norm);
  w.output = dummy_matrix(c.n_vocab, c.n_embd, dummy_tensor_seed(DummyTensor::head));
  return w;
}

}  // namespace nibble::model
