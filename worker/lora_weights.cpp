#include "worker/lora_weights.hpp"

#include <algorithm>
#include <vector>

namespace nibble::worker {

namespace {

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
    for (size_t j = 0; j < rank; ++j) p.a_t[c * rank + j] = m.a[j * k + col_begin + c];
  p.b_t.resize(rank * rows);
  for (size_t j = 0; j < rank; ++j)
    for (size_t o = 0; o < rows; ++o) p.b_t[j * rows + o] = m.b[(row_begin + o) * rank + j];
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

void add_lora_product(const LoraProduct& p, const float* x, int64_t rows, const int32_t* row_adapter,
                      int32_t adapter, float* y, kernels::ThreadPool& pool) {
  std::vector<int64_t> picked;
  for (int64_t r = 0; r < rows; ++r)
    if (row_adapter[r] == adapter) picked.push_back(r);
  if (picked.empty()) return;
  const auto rank = static_cast<size_t>(p.rank);
  const auto n = picked.size();
  // Both products are tiled so that each factor is read once a step, not once a row: Aᵀ in runs of
  // kInputs inputs (a run of rank-wide rows stays in L1 while every row takes it), Bᵀ in runs of
  // kOutputs outputs with the rows' partial updates (n x kOutputs floats) beside them.
  constexpr int64_t kInputs = 64, kOutputs = 256;
  std::vector<float> ax(n * rank, 0.0f);  // [n, rank]: scale * A x of each picked row
  pool.parallel_for(static_cast<int64_t>(n), 1, [&](int64_t begin, int64_t end) {
    for (int64_t c0 = 0; c0 < p.k; c0 += kInputs) {
      const int64_t c1 = std::min(p.k, c0 + kInputs);
      for (auto i = static_cast<size_t>(begin); i < static_cast<size_t>(end); ++i) {
        const float* xr = x + picked[i] * p.k;
        float* axr = ax.data() + i * rank;
        for (int64_t c = c0; c < c1; ++c) {
          const float xc = xr[c];
          const float* a = p.a_t.data() + static_cast<size_t>(c) * rank;
          for (size_t j = 0; j < rank; ++j) axr[j] += a[j] * xc;
        }
      }
    }
    for (auto i = static_cast<size_t>(begin); i < static_cast<size_t>(end); ++i)
      for (size_t j = 0; j < rank; ++j) ax[i * rank + j] *= p.scale;
  });
  // B (A x) is summed apart and added to y once, as llama.cpp adds it (y is far larger: adding each
  // rank's term to it would round rank times). Split over the outputs, so one decoding row still uses
  // every thread.
  pool.parallel_for((p.n_out + kOutputs - 1) / kOutputs, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> update(n * static_cast<size_t>(kOutputs));
    for (int64_t chunk = begin; chunk < end; ++chunk) {
      const int64_t o0 = chunk * kOutputs;
      const auto width = static_cast<size_t>(std::min(kOutputs, p.n_out - o0));
      std::fill(update.begin(), update.end(), 0.0f);
      for (size_t j = 0; j < rank; ++j) {
        const float* b = p.b_t.data() + j * static_cast<size_t>(p.n_out) + o0;
        for (size_t i = 0; i < n; ++i) {
          const float s = ax[i * rank + j];
          float* u = update.data() + i * static_cast<size_t>(kOutputs);
          for (size_t o = 0; o < width; ++o) u[o] += b[o] * s;
        }
      }
      for (size_t i = 0; i < n; ++i) {
        float* yr = y + picked[i] * p.n_out + o0;
        const float* u = update.data() + i * static_cast<size_t>(kOutputs);
        for (size_t o = 0; o < width; ++o) yr[o] += u[o];
      }
    }
  });
}

}  // namespace nibble::worker
