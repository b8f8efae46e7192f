#include "worker/weight_shard.hpp"

#include <algorithm>
#include <cstring>
#include <memory>
#include <stdexcept>
#include <string>

#include "kernels/quant_types.hpp"
#include "kernels/quantize.hpp"

namespace nibble::worker {

namespace {
int64_t i64(size_t v) { return static_cast<int64_t>(v); }
}  // namespace

size_t ffn_down_granularity(const std::vector<model::LlamaLayerWeights>& layers) {
  size_t block = 1;
  for (const model::LlamaLayerWeights& l : layers)
    block = std::max(block, static_cast<size_t>(kernels::type_info(l.w_down.type).block_elems));
  return block;
}

ModelShard plan_shard(const model::LlamaConfig& stage, TensorShard shard, size_t ffn_granularity) {
  const auto size = static_cast<size_t>(shard.size);
  const auto rank = static_cast<size_t>(shard.rank);
  ModelShard s;
  s.heads = split_heads(static_cast<size_t>(stage.n_head), static_cast<size_t>(stage.n_head_kv), size, rank);
  s.ff = split_rows(static_cast<size_t>(stage.n_ff), size, rank, ffn_granularity);
  s.vocab = split_vocab(static_cast<size_t>(stage.n_vocab), size, rank);
  for (size_t r = 0; r < size; ++r)
    s.vocab_counts.push_back(i64(split_vocab(static_cast<size_t>(stage.n_vocab), size, r).count));
  s.config = stage;
  s.config.n_head = i64(s.heads.q_heads.count);
  s.config.n_head_kv = i64(s.heads.kv_heads.count);
  s.config.n_ff = i64(s.ff.count);
  return s;
}

model::WeightMatrix row_slice(const model::WeightMatrix& w, int64_t begin, int64_t count) {
  model::WeightMatrix s = w;
  s.data = w.data + begin * w.row_bytes();
  s.n_out = count;
  s.packed = nullptr;
  if (w.owned != nullptr) {
    auto owned = std::make_shared<std::vector<uint8_t>>(s.data, s.data + count * w.row_bytes());
    s.data = owned->data();
    s.owned = std::move(owned);
  }
  return s;
}

model::WeightMatrix column_slice(const model::WeightMatrix& w, int64_t begin, int64_t count) {
  if (w.input_order != nullptr) {
    // Act-order columns are stored by group, not in input order: the slice is taken from the
    // decoded rows in input order, as F32 (which holds (q - z) * s exactly).
    const std::vector<int32_t>& order = *w.input_order;
    auto owned = std::make_shared<std::vector<uint8_t>>(static_cast<size_t>(w.n_out * count) * sizeof(float));
    auto* out = reinterpret_cast<float*>(owned->data());
    std::vector<float> row(static_cast<size_t>(w.k));
    for (int64_t r = 0; r < w.n_out; ++r) {
      if (kernels::dequantize_row(w.type, w.data + r * w.row_bytes(), row.data(), w.k) != kernels::Status::ok)
        throw std::invalid_argument("tensor parallel: cannot decode an act-order matrix");
      for (int64_t c = 0; c < w.k; ++c) {
        const int64_t input = order[static_cast<size_t>(c)];
        if (input >= begin && input < begin + count)
          out[r * count + input - begin] = row[static_cast<size_t>(c)];
      }
    }
    model::WeightMatrix s;
    s.type = kernels::DType::F32;
    s.data = owned->data();
    s.n_out = w.n_out;
    s.k = count;
    s.owned = std::move(owned);
    return s;
  }
  const int64_t block = kernels::type_info(w.type).block_elems;
  if (begin % block != 0 || count % block != 0) {
    throw std::invalid_argument("tensor parallel: columns [" + std::to_string(begin) + ", " +
                                std::to_string(begin + count) + ") do not fall on " +
                                kernels::type_name(w.type) + " block boundaries (" + std::to_string(block) +
                                ")");
  }
  const int64_t offset = kernels::row_bytes(w.type, begin);
  const int64_t bytes = kernels::row_bytes(w.type, count);
  auto owned = std::make_shared<std::vector<uint8_t>>(static_cast<size_t>(w.n_out * bytes));
  for (int64_t r = 0; r < w.n_out; ++r)
    std::memcpy(owned->data() + r * bytes, w.data + r * w.row_bytes() + offset, static_cast<size_t>(bytes));
  model::WeightMatrix s;
  s.type = w.type;
  s.data = owned->data();
  s.n_out = w.n_out;
  s.k = count;
  s.owned = std::move(owned);
  return s;
}

void slice_weights(model::LlamaWeights& weights, const ModelShard& s, int64_t hd, bool first_stage,
                   bool last_stage) {
  const HeadShard& heads = s.heads;
  for (model::LlamaLayerWeights& l : weights.layers) {
    l.wq = row_slice(l.wq, i64(heads.q_heads.begin) * hd, i64(heads.q_heads.count) * hd);
    l.wk = row_slice(l.wk, i64(heads.kv_heads.begin) * hd, i64(heads.kv_heads.count) * hd);
    l.wv = row_slice(l.wv, i64(heads.kv_heads.begin) * hd, i64(heads.kv_heads.count) * hd);
    l.wo = column_slice(l.wo, i64(heads.q_heads.begin) * hd, i64(heads.q_heads.count) * hd);
    l.w_gate = row_slice(l.w_gate, i64(s.ff.begin), i64(s.ff.count));
    l.w_up = row_slice(l.w_up, i64(s.ff.begin), i64(s.ff.count));
    l.w_down = column_slice(l.w_down, i64(s.ff.begin), i64(s.ff.count));
  }
  if (last_stage) weights.output = row_slice(weights.output, i64(s.vocab.begin), i64(s.vocab.count));
  if (first_stage) weights.token_embd = row_slice(weights.token_embd, i64(s.vocab.begin), i64(s.vocab.count));
}

}  // namespace nibble::worker
