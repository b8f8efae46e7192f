#include "model/llama_weights.hpp"

#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <exception>
#include <mutex>
#include <optional>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#include "kernels/matmul.hpp"
#include "kernels/quantize.hpp"
#include "model/hf_quantized.hpp"

namespace nibble::model {

namespace {

std::string shape_string(const std::vector<int64_t>& dims) {
  std::string s = "[";
  for (size_t i = 0; i < dims.size(); ++i) {
    if (i > 0) s += ", ";
    s += std::to_string(dims[i]);
  }
  return s + "]";
}

const GgufTensorInfo& require(const GgufFile& file, const std::string& name, std::vector<int64_t> dims) {
  const GgufTensorInfo* t = file.find_tensor(name);
  if (t == nullptr) throw GgufError(file.path() + ": tensor '" + name + "' is missing");
  if (t->dims != dims) {
    throw GgufError(file.path() + ": tensor '" + name + "' has shape " + shape_string(t->dims) +
                    ", expected " + shape_string(dims));
  }
  return *t;
}

WeightMatrix matrix(const GgufFile& file, const std::string& name, int64_t k, int64_t n_out) {
  const GgufTensorInfo& t = require(file, name, {k, n_out});
  if (!kernels::matmul_supports(t.type)) {
    throw GgufError(file.path() + ": tensor '" + name + "' has type " + kernels::type_name(t.type) +
                    ", which holds activations, not weights");
  }
  return WeightMatrix{t.type, file.tensor_data(t), n_out, k, nullptr, nullptr, nullptr};
}

std::vector<float> vector_f32(const GgufFile& file, const std::string& name, int64_t n) {
  const GgufTensorInfo& t = require(file, name, {n});
  std::vector<float> out(n);
  if (kernels::dequantize_row(t.type, file.tensor_data(t), out.data(), n) != kernels::Status::ok) {
    throw GgufError(file.path() + ": tensor '" + name + "' has a type that cannot be read as a vector");
  }
  return out;
}

void pack_matrix(WeightMatrix& w, bool release_source) {
  if (w.packed != nullptr || !kernels::can_pack_for_matmul(w.type)) return;
  kernels::PackedMatrix packed = kernels::pack_for_matmul(w.type, w.data, w.n_out, w.k);
  if (packed.empty()) throw std::runtime_error("cannot repack a weight matrix (out of memory?)");
  w.packed = std::make_shared<const kernels::PackedMatrix>(std::move(packed));
  if (!release_source) return;
  if (w.owned != nullptr) {  // heap memory: madvise would zero it; free it instead
    w.owned.reset();
    w.data = nullptr;
    return;
  }
  // Only whole pages inside the matrix, so that neighbouring tensors keep theirs. Dropping pages of
  // a private read-only file mapping is safe: they are re-read from the file if touched again.
  const auto page = static_cast<uintptr_t>(::sysconf(_SC_PAGESIZE));
  const auto begin = reinterpret_cast<uintptr_t>(w.data);
  const uintptr_t end = begin + static_cast<uintptr_t>(w.n_out * w.row_bytes());
  const uintptr_t first = (begin + page - 1) / page * page;
  const uintptr_t last = end / page * page;
  if (last > first) ::madvise(reinterpret_cast<void*>(first), last - first, MADV_DONTNEED);  // advisory
}

namespace hf {

const HfCheckpoint::Tensor& require(const HfCheckpoint& ckpt, const std::string& name,
                                    const std::vector<int64_t>& shape) {
  const HfCheckpoint::Tensor* t = ckpt.find_tensor(name);
  if (t == nullptr) throw HfCheckpointError(ckpt.dir() + ": tensor '" + name + "' is missing");
  if (t->info->shape != shape) {
    throw HfCheckpointError(t->file->path() + ": tensor '" + name + "' has shape " +
                            shape_string(t->info->shape) + ", expected " + shape_string(shape));
  }
  return *t;
}

kernels::DType float_type(const HfCheckpoint::Tensor& t) {
  const auto type = safetensors_float_type(t.info->dtype);
  if (!type) {
    throw HfCheckpointError(t.file->path() + ": tensor '" + t.info->name + "' has dtype " +
                            safetensors_dtype_name(t.info->dtype) +
                            "; only F32, F16 and BF16 weights can be served (GPTQ/AWQ layers are read from "
                            "<layer>.qweight/.qzeros/.scales with config.json's quantization_config)");
  }
  return *type;
}

// x · Wᵀ with W: [n_out, k], the layout of a torch Linear weight.
WeightMatrix matrix(const HfCheckpoint& ckpt, const std::string& name, int64_t n_out, int64_t k) {
  const HfCheckpoint::Tensor& t = require(ckpt, name, {n_out, k});
  WeightMatrix w{float_type(t), t.data(), n_out, k, nullptr, nullptr, nullptr};
  // The format does not align tensors; the kernels read whole elements, so copy a misaligned one.
  if (reinterpret_cast<uintptr_t>(w.data) % static_cast<uintptr_t>(safetensors_dtype_bytes(t.info->dtype)) !=
      0) {
    auto owned = std::make_shared<std::vector<uint8_t>>(w.data, w.data + t.info->size_bytes);
    w.data = owned->data();
    w.owned = std::move(owned);
  }
  return w;
}

// A linear layer `base` (e.g. model.layers.0.mlp.up_proj): base.weight in a float dtype, or a GPTQ /
// AWQ layer (base.qweight, ...) converted to a matmul type in owned memory (model/hf_quantized.hpp).
WeightMatrix linear(const HfCheckpoint& ckpt, const std::optional<HfQuantization>& quant,
                    const std::string& base, int64_t n_out, int64_t k) {
  if (ckpt.find_tensor(base + ".weight") != nullptr || ckpt.find_tensor(base + ".qweight") == nullptr) {
    if (quant && ckpt.find_tensor(base + ".weight") == nullptr) {
      throw HfCheckpointError(ckpt.dir() + ": layer '" + base + "' is missing (neither '" + base +
                              ".qweight' nor '" + base + ".weight' is there)");
    }
    return matrix(ckpt, base + ".weight", n_out, k);
  }
  if (!quant) {
    throw HfCheckpointError(
        ckpt.dir() + ": tensor '" + base +
        ".qweight' holds packed 4-bit weights but config.json has no quantization_config");
  }
  MatmulMatrix converted = to_matmul_type(read_quantized_linear(ckpt, *quant, base, n_out, k));
  auto owned = std::make_shared<std::vector<uint8_t>>(std::move(converted.data));
  WeightMatrix w{converted.type, owned->data(), n_out, k, nullptr, std::move(owned), nullptr};
  if (!converted.input_order.empty())
    w.input_order = std::make_shared<const std::vector<int32_t>>(std::move(converted.input_order));
  return w;
}

// HF applies RoPE to the two halves of each head (x[i] with x[i + d/2], "NeoX style"); GGUF and
// kernels/rope rotate adjacent pairs (x[2i] with x[2i+1]). Like llama.cpp's convert_hf_to_gguf.py,
// the rows of each head of q_proj and k_proj are reordered so that row h·d/2 + i (half h) becomes row
// 2i + h: q and k then come out of the matmul in the interleaved order, one RoPE kernel serves both
// formats, and q·k is unchanged because both sides are permuted alike (v and o are untouched).
// The alternative, a rope-style flag, would need a second kernel on every backend.
WeightMatrix rope_interleaved(const HfCheckpoint& ckpt, const std::optional<HfQuantization>& quant,
                              const std::string& base, int64_t n_heads, int64_t head_dim, int64_t k) {
  const WeightMatrix source = linear(ckpt, quant, base, n_heads * head_dim, k);
  const int64_t row_bytes = source.row_bytes();
  auto owned = std::make_shared<std::vector<uint8_t>>(static_cast<size_t>(source.n_out * row_bytes));
  permute_rope_rows(source.data, owned->data(), n_heads, head_dim, row_bytes);
  WeightMatrix w = source;
  w.data = owned->data();
  w.owned = std::move(owned);
  return w;
}

std::vector<float> vector_f32(const HfCheckpoint& ckpt, const std::string& name, int64_t n) {
  const HfCheckpoint::Tensor& t = require(ckpt, name, {n});
  const kernels::DType type = float_type(t);
  // Copied first: dequantize_row reads whole elements, which the mapping may not align.
  std::vector<uint8_t> bytes(t.data(), t.data() + t.info->size_bytes);
  std::vector<float> out(static_cast<size_t>(n));
  if (kernels::dequantize_row(type, bytes.data(), out.data(), n) != kernels::Status::ok)
    throw HfCheckpointError(t.file->path() + ": tensor '" + name + "' cannot be read as a vector");
  return out;
}

}  // namespace hf

}  // namespace

void permute_rope_rows(const uint8_t* from, uint8_t* to, int64_t n_heads, int64_t head_dim,
                       int64_t row_bytes) {
  const int64_t half = head_dim / 2;
  for (int64_t h = 0; h < n_heads; ++h)
    for (int64_t i = 0; i < half; ++i)
      for (int64_t side = 0; side < 2; ++side)
        std::memcpy(to + (h * head_dim + 2 * i + side) * row_bytes,
                    from + (h * head_dim + side * half + i) * row_bytes, static_cast<size_t>(row_bytes));
}

std::string layer_tensor_name(int64_t layer, LayerMatrix which) {
  const char* names[] = {"attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down"};
  return "blk." + std::to_string(layer) + "." + names[static_cast<int>(which)] + ".weight";
}

WeightMatrix& LlamaLayerWeights::matrix(LayerMatrix which) {
  WeightMatrix* matrices[] = {&wq, &wk, &wv, &wo, &w_gate, &w_up, &w_down};
  return *matrices[static_cast<int>(which)];
}

const WeightMatrix& LlamaLayerWeights::matrix(LayerMatrix which) const {
  return const_cast<LlamaLayerWeights*>(this)->matrix(which);
}

void LlamaWeights::pack_for_cpu(bool release_source, int threads) {
  std::vector<WeightMatrix*> matrices;
  for (LlamaLayerWeights& l : layers) {
    for (WeightMatrix* w : {&l.wq, &l.wk, &l.wv, &l.wo, &l.w_gate, &l.w_up, &l.w_down}) matrices.push_back(w);
  }
  // A tied head shares token_embd's rows, which embedding lookups keep reading (a few rows per
  // token, re-read on demand after the release).
  matrices.push_back(&output);
  // Packing reads every weight once from the file mapping and writes it once: on 2 cores two matrices
  // at a time took `nibble generate -n 1` on llama-1b Q4_K_M from 0.50 to 0.33 s (docs/perf/cpu.md).
  if (threads <= 0)
    threads = static_cast<int>(std::min(8u, std::max(1u, std::thread::hardware_concurrency())));
  threads = static_cast<int>(std::min<size_t>(static_cast<size_t>(threads), matrices.size()));
  std::atomic<size_t> next{0};
  std::mutex failure_mutex;
  std::exception_ptr failure;
  auto work = [&] {
    for (size_t i = next.fetch_add(1); i < matrices.size(); i = next.fetch_add(1)) {
      try {
        pack_matrix(*matrices[i], release_source);
      } catch (...) {
        const std::lock_guard<std::mutex> lock(failure_mutex);
        if (!failure) failure = std::current_exception();
        next.store(matrices.size());  // the others stop after their current matrix
      }
    }
  };
  std::vector<std::thread> helpers;
  for (int t = 1; t < threads; ++t) helpers.emplace_back(work);
  work();
  for (std::thread& helper : helpers) helper.join();
  if (failure) std::rethrow_exception(failure);
}

LlamaWeights LlamaWeights::bind(const GgufFile& file, const LlamaConfig& c) {
  LlamaWeights w;
  w.token_embd = matrix(file, "token_embd.weight", c.n_embd, c.n_vocab);
  w.output_norm = vector_f32(file, "output_norm.weight", c.n_embd);
  if (file.find_tensor("output.weight") != nullptr) {
    w.output = matrix(file, "output.weight", c.n_embd, c.n_vocab);
  } else {
    w.output = w.token_embd;
    w.tied_output = true;
  }
  w.layers.resize(c.n_layer);
  for (int64_t i = 0; i < c.n_layer; ++i) {
    const std::string p = "blk." + std::to_string(i) + ".";
    LlamaLayerWeights& l = w.layers[i];
    l.attn_norm = vector_f32(file, p + "attn_norm.weight", c.n_embd);
    l.wq = matrix(file, p + "attn_q.weight", c.n_embd, c.q_dim());
    l.wk = matrix(file, p + "attn_k.weight", c.n_embd, c.kv_dim());
    l.wv = matrix(file, p + "attn_v.weight", c.n_embd, c.kv_dim());
    l.wo = matrix(file, p + "attn_output.weight", c.q_dim(), c.n_embd);
    l.ffn_norm = vector_f32(file, p + "ffn_norm.weight", c.n_embd);
    l.w_gate = matrix(file, p + "ffn_gate.weight", c.n_embd, c.n_ff);
    l.w_up = matrix(file, p + "ffn_up.weight", c.n_embd, c.n_ff);
    l.w_down = matrix(file, p + "ffn_down.weight", c.n_ff, c.n_embd);
  }
  return w;
}

LlamaWeights LlamaWeights::bind(const HfCheckpoint& ckpt, const LlamaConfig& c, int64_t layer_begin,
                                int64_t layer_end) {
  if (layer_end < 0) layer_end = c.n_layer;
  if (layer_begin < 0 || layer_begin > layer_end || layer_end > c.n_layer)
    throw std::invalid_argument("layers [" + std::to_string(layer_begin) + ", " + std::to_string(layer_end) +
                                ") are not inside the model's " + std::to_string(c.n_layer));
  const std::optional<HfQuantization> quant = read_hf_quantization(ckpt);
  LlamaWeights w;
  w.token_embd = hf::matrix(ckpt, "model.embed_tokens.weight", c.n_vocab, c.n_embd);
  w.output_norm = hf::vector_f32(ckpt, "model.norm.weight", c.n_embd);
  // With tie_word_embeddings transformers ties lm_head to the embedding even if the file holds one.
  w.tied_output = c.tied_output;
  if (w.tied_output) {
    w.output = w.token_embd;
  } else {
    if (ckpt.find_tensor("lm_head.weight") == nullptr && ckpt.find_tensor("lm_head.qweight") == nullptr) {
      throw HfCheckpointError(ckpt.dir() +
                              ": tensor 'lm_head.weight' is missing and config.json does not set "
                              "tie_word_embeddings");
    }
    w.output = hf::linear(ckpt, quant, "lm_head", c.n_vocab, c.n_embd);
  }
  w.layers.resize(static_cast<size_t>(c.n_layer));
  for (int64_t i = layer_begin; i < layer_end; ++i) {
    const std::string p = "model.layers." + std::to_string(i) + ".";
    LlamaLayerWeights& l = w.layers[static_cast<size_t>(i)];
    l.attn_norm = hf::vector_f32(ckpt, p + "input_layernorm.weight", c.n_embd);
    l.wq = hf::rope_interleaved(ckpt, quant, p + "self_attn.q_proj", c.n_head, c.head_dim, c.n_embd);
    l.wk = hf::rope_interleaved(ckpt, quant, p + "self_attn.k_proj", c.n_head_kv, c.head_dim, c.n_embd);
    l.wv = hf::linear(ckpt, quant, p + "self_attn.v_proj", c.kv_dim(), c.n_embd);
    l.wo = hf::linear(ckpt, quant, p + "self_attn.o_proj", c.n_embd, c.q_dim());
    l.ffn_norm = hf::vector_f32(ckpt, p + "post_attention_layernorm.weight", c.n_embd);
    l.w_gate = hf::linear(ckpt, quant, p + "mlp.gate_proj", c.n_ff, c.n_embd);
    l.w_up = hf::linear(ckpt, quant, p + "mlp.up_proj", c.n_ff, c.n_embd);
    l.w_down = hf::linear(ckpt, quant, p + "mlp.down_proj", c.n_embd, c.n_ff);
  }
  return w;
}

}  // namespace nibble::model
