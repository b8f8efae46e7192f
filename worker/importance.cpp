#include "worker/importance.hpp"

#include <map>
#include <string>

#include "model/llama_weights.hpp"
#include "worker/kv_cache.hpp"

namespace nibble::worker {

namespace {

// The layer matrices that read each observed input.
std::vector<model::LayerMatrix> readers(MatrixInput input) {
  using model::LayerMatrix;
  switch (input) {
    case MatrixInput::attn_qkv:
      return {LayerMatrix::attn_q, LayerMatrix::attn_k, LayerMatrix::attn_v};
    case MatrixInput::attn_output:
      return {LayerMatrix::attn_output};
    case MatrixInput::ffn_gate_up:
      return {LayerMatrix::ffn_gate, LayerMatrix::ffn_up};
    case MatrixInput::ffn_down:
      return {LayerMatrix::ffn_down};
  }
  return {};
}

struct Accumulator {
  std::vector<double> sums;  // double: a long calibration run sums millions of squares
  int64_t count = 0;
};

}  // namespace

model::ImportanceMatrix collect_importance(LlamaModel& model, kernels::ThreadPool& pool,
                                           const std::vector<std::vector<int32_t>>& windows,
                                           const EvaluationProgress& progress) {
  constexpr int64_t kMinRows = 16;  // llama-imatrix ignores smaller products
  std::map<std::pair<int64_t, MatrixInput>, Accumulator> stats;
  model.set_input_observer([&](int64_t layer, MatrixInput input, const float* x, int64_t rows, int64_t k) {
    Accumulator& a = stats[{layer, input}];
    a.sums.resize(static_cast<size_t>(k), 0.0);
    for (int64_t r = 0; r < rows; ++r) {
      const float* row = x + r * k;
      for (int64_t j = 0; j < k; ++j) a.sums[static_cast<size_t>(j)] += static_cast<double>(row[j]) * row[j];
    }
    a.count += rows;
  });
  model::ImportanceMatrix imatrix;
  std::vector<float> logits;
  int64_t done = 0, used = 0, chunk_size = 0;
  try {
    for (const auto& window : windows) {
      const int64_t n = static_cast<int64_t>(window.size());
      if (n >= kMinRows) {
        const int64_t block = 16;
        const int64_t blocks = (n + block - 1) / block;
        KvCache cache(model.shard_config(), blocks, block, model.kv_cache_types());
        std::vector<int32_t> table(static_cast<size_t>(blocks));
        for (int64_t b = 0; b < blocks; ++b) table[static_cast<size_t>(b)] = static_cast<int32_t>(b);
        model.forward(ForwardBatch::single(window, 0, table, /*all_logits=*/false), cache, pool, logits);
        ++used;
        chunk_size = std::max(chunk_size, n);
      }
      if (progress) progress(++done, static_cast<int64_t>(windows.size()));
    }
  } catch (...) {
    model.set_input_observer({});
    throw;
  }
  model.set_input_observer({});
  for (const auto& [key, a] : stats) {
    for (model::LayerMatrix m : readers(key.second)) {
      model::ImatrixEntry& e = imatrix.entries[model::layer_tensor_name(key.first, m)];
      e.sums.assign(a.sums.begin(), a.sums.end());
      e.count = a.count;
    }
  }
  imatrix.chunk_count = used;
  imatrix.chunk_size = chunk_size;
  return imatrix;
}

}  // namespace nibble::worker
