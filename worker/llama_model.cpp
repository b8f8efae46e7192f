#include "worker/llama_model.hpp"

#include <cmath>
#include <stdexcept>

#include "kernels/activation.hpp"
#include "kernels/attention.hpp"
#include "kernels/matmul.hpp"
#include "kernels/packed_weights.hpp"
#include "kernels/quantize.hpp"
#include "kernels/rms_norm.hpp"
#include "kernels/rope.hpp"

namespace nibble::worker {

namespace {

void check(kernels::Status status, const char* what) {
  if (status != kernels::Status::ok) {
    throw std::runtime_error(std::string(what) + " failed: " + kernels::status_name(status));
  }
}

}  // namespace

ForwardBatch ForwardBatch::single(const std::vector<int32_t>& tokens, int32_t start_pos,
                                  const std::vector<int32_t>& block_table, bool all_logits) {
  ForwardBatch b;
  b.tokens = tokens;
  const auto n = static_cast<int32_t>(tokens.size());
  for (int32_t i = 0; i < n; ++i) {
    b.positions.push_back(start_pos + i);
    b.seq_index.push_back(0);
  }
  b.block_tables = block_table;
  b.max_blocks_per_seq = static_cast<int64_t>(block_table.size());
  if (all_logits) {
    for (int32_t i = 0; i < n; ++i) b.logit_rows.push_back(i);
  } else if (n > 0) {
    b.logit_rows.push_back(n - 1);
  }
  return b;
}

std::unique_ptr<LlamaModel> LlamaModel::load(const std::string& path) {
  return std::make_unique<LlamaModel>(model::GgufFile::open(path));
}

LlamaModel::LlamaModel(std::shared_ptr<const model::GgufFile> file)
    : file_(std::move(file)),
      config_(model::LlamaConfig::from_gguf(*file_)),
      weights_(model::LlamaWeights::bind(*file_, config_)) {
  weights_.pack_for_cpu(/*release_source=*/true);
}

void LlamaModel::matmul(const model::WeightMatrix& w, const float* x, int64_t m, float* y,
                        kernels::ThreadPool& pool) {
  if (w.packed != nullptr) {
    check(kernels::matmul_packed(*w.packed, x, m, y, pool), "matmul");
  } else {
    check(kernels::matmul(w.type, w.data, w.n_out, w.k, x, m, y, pool), "matmul");
  }
}

void LlamaModel::forward(const ForwardBatch& batch, KvCache& cache, kernels::ThreadPool& pool,
                         std::vector<float>& logits) {
  const auto& c = config_;
  const int64_t n = static_cast<int64_t>(batch.tokens.size());
  if (batch.positions.size() != batch.tokens.size() || batch.seq_index.size() != batch.tokens.size()) {
    throw std::invalid_argument("forward batch: tokens, positions and seq_index differ in length");
  }
  const int64_t n_seqs = batch.max_blocks_per_seq > 0
                             ? static_cast<int64_t>(batch.block_tables.size()) / batch.max_blocks_per_seq
                             : 0;
  for (int64_t t = 0; t < n; ++t) {
    if (batch.tokens[t] < 0 || batch.tokens[t] >= c.n_vocab) {
      throw std::invalid_argument("token id " + std::to_string(batch.tokens[t]) +
                                  " is outside the vocabulary");
    }
    if (batch.seq_index[t] < 0 || batch.seq_index[t] >= n_seqs || batch.positions[t] < 0 ||
        batch.positions[t] >= batch.max_blocks_per_seq * cache.block_size()) {
      throw std::invalid_argument("position " + std::to_string(batch.positions[t]) +
                                  " is outside the sequence's KV blocks");
    }
  }
  for (int32_t row : batch.logit_rows) {
    if (row < 0 || row >= n) throw std::invalid_argument("logit row outside the batch");
  }
  if (n == 0) {
    logits.clear();
    return;
  }

  x_.resize(n * c.n_embd);
  h_.resize(n * c.n_embd);
  q_.resize(n * c.q_dim());
  k_.resize(n * c.kv_dim());
  v_.resize(n * c.kv_dim());
  attn_.resize(n * c.q_dim());
  gate_.resize(n * c.n_ff);
  up_.resize(n * c.n_ff);

  // Embedding: dequantize only the rows the batch uses.
  for (int64_t t = 0; t < n; ++t) {
    const uint8_t* row = weights_.token_embd.data + batch.tokens[t] * weights_.token_embd.row_bytes();
    check(kernels::dequantize_row(weights_.token_embd.type, row, x_.data() + t * c.n_embd, c.n_embd),
          "embedding lookup");
  }

  kernels::PagedAttentionShape shape;
  shape.tokens = n;
  shape.n_head = c.n_head;
  shape.n_head_kv = c.n_head_kv;
  shape.head_dim = c.head_dim;
  shape.block_size = cache.block_size();
  shape.max_blocks_per_seq = batch.max_blocks_per_seq;
  const float scale = 1.0f / std::sqrt(static_cast<float>(c.head_dim));
  const int64_t kv_dim = c.kv_dim();

  for (int64_t l = 0; l < c.n_layer; ++l) {
    const model::LlamaLayerWeights& w = weights_.layers[l];
    check(kernels::rms_norm(x_.data(), w.attn_norm.data(), h_.data(), n, c.n_embd, c.rms_eps), "rms_norm");
    matmul(w.wq, h_.data(), n, q_.data(), pool);
    matmul(w.wk, h_.data(), n, k_.data(), pool);
    matmul(w.wv, h_.data(), n, v_.data(), pool);
    check(kernels::rope_normal(q_.data(), batch.positions.data(), n, c.n_head, c.head_dim, c.rope_dims,
                               c.rope_base),
          "rope");
    check(kernels::rope_normal(k_.data(), batch.positions.data(), n, c.n_head_kv, c.head_dim, c.rope_dims,
                               c.rope_base),
          "rope");

    // Write this batch's K/V into the cache before any token attends.
    uint16_t* k_cache = cache.k(l);
    uint16_t* v_cache = cache.v(l);
    for (int64_t t = 0; t < n; ++t) {
      const int32_t* table = batch.block_tables.data() + batch.seq_index[t] * batch.max_blocks_per_seq;
      const int64_t pos = batch.positions[t];
      const int64_t slot = static_cast<int64_t>(table[pos / cache.block_size()]) * cache.block_size() +
                           pos % cache.block_size();
      for (int64_t i = 0; i < kv_dim; ++i) {
        k_cache[slot * kv_dim + i] = kernels::fp32_to_fp16(k_[t * kv_dim + i]);
        v_cache[slot * kv_dim + i] = kernels::fp32_to_fp16(v_[t * kv_dim + i]);
      }
    }
    check(kernels::paged_attention(shape, q_.data(), k_cache, v_cache, batch.block_tables.data(),
                                   batch.seq_index.data(), batch.positions.data(), scale, attn_.data(), pool),
          "attention");
    matmul(w.wo, attn_.data(), n, h_.data(), pool);
    check(kernels::add_inplace(x_.data(), h_.data(), n * c.n_embd), "residual add");

    check(kernels::rms_norm(x_.data(), w.ffn_norm.data(), h_.data(), n, c.n_embd, c.rms_eps), "rms_norm");
    matmul(w.w_gate, h_.data(), n, gate_.data(), pool);
    matmul(w.w_up, h_.data(), n, up_.data(), pool);
    check(kernels::swiglu(gate_.data(), up_.data(), gate_.data(), n * c.n_ff), "swiglu");
    matmul(w.w_down, gate_.data(), n, h_.data(), pool);
    check(kernels::add_inplace(x_.data(), h_.data(), n * c.n_embd), "residual add");
  }

  // Output norm and head only for the rows whose logits are wanted.
  const int64_t n_out = static_cast<int64_t>(batch.logit_rows.size());
  picked_.resize(n_out * c.n_embd);
  for (int64_t i = 0; i < n_out; ++i) {
    std::copy_n(x_.data() + batch.logit_rows[i] * c.n_embd, c.n_embd, picked_.data() + i * c.n_embd);
  }
  check(kernels::rms_norm(picked_.data(), weights_.output_norm.data(), picked_.data(), n_out, c.n_embd,
                          c.rms_eps),
        "rms_norm");
  logits.resize(n_out * c.n_vocab);
  matmul(weights_.output, picked_.data(), n_out, logits.data(), pool);
}

}  // namespace nibble::worker
