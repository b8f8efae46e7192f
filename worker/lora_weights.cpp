#include "worker/lora_weights.hpp"

#include <stdexcept>
#include <string>
#include <vector>

#include "kernels/lora.hpp"
#include "model/llama_checkpoint.hpp"

namespace nibble::worker {

namespace {

void check(kernels::Status status, const char* what) {
  if (status != kernels::Status::ok)
    throw std::runtime_error(std::string(what) + " failed: " + kernels::status_name(status));
}

// The product for rows [row_begin, row_begin + rows) of B and columns [col_begin, col_begin + cols)
// of A, transposed.
LoraProduct cut(const model::LoraMatrix& m, float scale, size_t row_begin, size_t rows, size_t col_begin,
                size_t cols) {
  LoraProduct p;
  p.rank = m.rank;
  p.k = static_cast<int64_t>(cols);
  p.n_out = static_cast<int64_t>(rows);
  p.scale = scale;
  const auto rank = static_cast<size_t>(m.rank), k = static_cast<size_t>(m.k);
  p.a_t.resize(cols * rank);
  for (size_t c = 0; c < cols; ++c)
    for (size_t j = 0; j < rank; ++j) p.a_t[c * rank + j] = kernels::fp32_to_fp16(m.a[j * k + col_begin + c]);
  p.b_t.resize(rank * rows);
  for (size_t j = 0; j < rank; ++j)
    for (size_t o = 0; o < rows; ++o)
      p.b_t[j * rows + o] = kernels::fp32_to_fp16(m.b[(row_begin + o) * rank + j]);
  return p;
}

LoraProduct whole(const model::LoraMatrix& m, float scale) {
  return cut(m, scale, 0, static_cast<size_t>(m.n_out), 0, static_cast<size_t>(m.k));
}
LoraProduct rows_of_b(const model::LoraMatrix& m, float scale, size_t begin, size_t count) {
  return cut(m, scale, begin, count, 0, static_cast<size_t>(m.k));
}
LoraProduct columns_of_a(const model::LoraMatrix& m, float scale, size_t begin, size_t count) {
  return cut(m, scale, 0, static_cast<size_t>(m.n_out), begin, count);
}

}  // namespace

void check_lora_fits(const model::LoraAdapter& adapter, const model::LlamaConfig& whole) {
  if (static_cast<int64_t>(adapter.layers.size()) != whole.n_layer) {
    throw std::invalid_argument("LoRA adapter " + adapter.path + " has " +
                                std::to_string(adapter.layers.size()) + " layers, the model " +
                                std::to_string(whole.n_layer));
  }
  for (const auto& layer : adapter.layers) {
    for (model::LayerMatrix which : model::kLayerMatrices) {
      const auto& lm = layer[static_cast<size_t>(which)];
      const auto [n_out, k] = model::layer_matrix_shape(whole, which);
      if (lm && (lm->n_out != n_out || lm->k != k || static_cast<int64_t>(lm->a.size()) != lm->rank * lm->k ||
                 static_cast<int64_t>(lm->b.size()) != lm->n_out * lm->rank)) {
        throw std::invalid_argument("LoRA adapter " + adapter.path +
                                    ": a matrix of the wrong shape for this model");
      }
    }
  }
  if (adapter.output && (adapter.output->n_out != whole.n_vocab || adapter.output->k != whole.n_embd)) {
    throw std::invalid_argument("LoRA adapter " + adapter.path + ": an output head of the wrong shape");
  }
}

ShardLora shard_lora(const model::LoraAdapter& adapter, float user_scale, const ModelShard* shard,
                     int64_t head_dim, int64_t layer_begin, int64_t layer_end, bool last_stage) {
  using model::LayerMatrix;
  const auto hd = static_cast<size_t>(head_dim);
  ShardLora out;
  for (int64_t l = layer_begin; l < layer_end; ++l) {
    auto& local = out.layers.emplace_back();
    for (int which = 0; which < 7; ++which) {
      const std::optional<model::LoraMatrix>& m =
          adapter.layers[static_cast<size_t>(l)][static_cast<size_t>(which)];
      if (!m) continue;
      const float scale = adapter.scale(*m, user_scale);
      std::optional<LoraProduct>& p = local[static_cast<size_t>(which)];
      if (shard == nullptr) {
        p = whole(*m, scale);
        continue;
      }
      const ShardRange q{shard->heads.q_heads.begin * hd, shard->heads.q_heads.count * hd};
      const ShardRange kv{shard->heads.kv_heads.begin * hd, shard->heads.kv_heads.count * hd};
      switch (static_cast<LayerMatrix>(which)) {
        case LayerMatrix::attn_q:
          p = rows_of_b(*m, scale, q.begin, q.count);
          break;
        case LayerMatrix::attn_k:
        case LayerMatrix::attn_v:
          p = rows_of_b(*m, scale, kv.begin, kv.count);
          break;
        case LayerMatrix::attn_output:
          p = columns_of_a(*m, scale, q.begin, q.count);
          break;
        case LayerMatrix::ffn_gate:
        case LayerMatrix::ffn_up:
          p = rows_of_b(*m, scale, shard->ff.begin, shard->ff.count);
          break;
        case LayerMatrix::ffn_down:
          p = columns_of_a(*m, scale, shard->ff.begin, shard->ff.count);
          break;
      }
    }
  }
  if (last_stage && adapter.output) {
    const float scale = adapter.scale(*adapter.output, user_scale);
    out.output = shard == nullptr ? whole(*adapter.output, scale)
                                  : rows_of_b(*adapter.output, scale, shard->vocab.begin, shard->vocab.count);
  }
  return out;
}

void add_lora_product(const LoraProduct& p, const float* x, const std::vector<int64_t>& rows, float* y,
                      kernels::ThreadPool& pool) {
  if (rows.empty()) return;
  const auto n = static_cast<int64_t>(rows.size());
  std::vector<float> ax(static_cast<size_t>(n * p.rank));  // [n, rank]: scale * A x of each listed row
  check(kernels::lora_shrink(p.a_t.data(), p.k, p.rank, p.scale, x, rows.data(), n, ax.data(), pool),
        "lora_shrink");
  // ax's rows are the listed rows in order: expand writes row rows[i] from ax row i.
  check(kernels::lora_expand(p.b_t.data(), p.rank, p.n_out, ax.data(), rows.data(), n, y, pool),
        "lora_expand");
}

}  // namespace nibble::worker
