#include "model/llama_weights.hpp"

#include <sys/mman.h>
#include <unistd.h>

#include <cstdint>
#include <stdexcept>
#include <string>

#include "kernels/quantize.hpp"

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
  return WeightMatrix{t.type, file.tensor_data(t), n_out, k, nullptr, nullptr};
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

}  // namespace

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

void LlamaWeights::pack_for_cpu(bool release_source) {
  for (LlamaLayerWeights& l : layers) {
    for (WeightMatrix* w : {&l.wq, &l.wk, &l.wv, &l.wo, &l.w_gate, &l.w_up, &l.w_down})
      pack_matrix(*w, release_source);
  }
  // A tied head shares token_embd's rows, which embedding lookups keep reading (a few rows per
  // token, re-read on demand after the release).
  pack_matrix(output, release_source);
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

}  // namespace nibble::model
