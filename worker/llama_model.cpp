#include "worker/llama_model.hpp"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <stdexcept>

#include "kernels/activation.hpp"
#include "kernels/attention.hpp"
#include "kernels/hadamard.hpp"
#include "kernels/matmul.hpp"
#include "kernels/packed_weights.hpp"
#include "kernels/quantize.hpp"
#include "kernels/rms_norm.hpp"
#include "kernels/rope.hpp"
#include "worker/weight_shard.hpp"

namespace nibble::worker {

namespace {

void check(kernels::Status status, const char* what) {
  if (status != kernels::Status::ok) {
    throw std::runtime_error(std::string(what) + " failed: " + kernels::status_name(status));
  }
}

int64_t i64(size_t v) { return static_cast<int64_t>(v); }

}  // namespace

void ForwardBatch::add_sequence(std::span<const int32_t> seq_tokens, int32_t start_pos, int32_t table_row,
                                int32_t logits_for_last, int32_t logits_for_first) {
  const auto begin = static_cast<int32_t>(tokens.size());
  for (size_t i = 0; i < seq_tokens.size(); ++i) {
    tokens.push_back(seq_tokens[i]);
    positions.push_back(start_pos + static_cast<int32_t>(i));
    seq_index.push_back(table_row);
  }
  const auto end = static_cast<int32_t>(tokens.size());
  const int32_t first_end = std::min(end, begin + logits_for_first);
  for (int32_t row = begin; row < first_end; ++row) logit_rows.push_back(row);
  for (int32_t row = std::max(first_end, end - logits_for_last); row < end; ++row) logit_rows.push_back(row);
}

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

std::unique_ptr<LlamaModel> LlamaModel::load(const std::string& path, TensorShard shard,
                                             ShardReducer* reducer, LayerRange layers) {
  return std::make_unique<LlamaModel>(model::LlamaCheckpoint::open(path), shard, reducer, layers);
}

LlamaModel::LlamaModel(std::shared_ptr<const model::GgufFile> file, TensorShard shard, ShardReducer* reducer,
                       LayerRange layers)
    : LlamaModel(model::LlamaCheckpoint::from_gguf(std::move(file)), shard, reducer, layers) {}

LlamaModel::LlamaModel(std::shared_ptr<const model::LlamaCheckpoint> checkpoint, TensorShard shard,
                       ShardReducer* reducer, LayerRange layers)
    : checkpoint_(std::move(checkpoint)),
      config_(checkpoint_->config()),
      shard_config_(config_),
      shard_(shard),
      vocab_counts_{config_.n_vocab} {
  if (shard_.size < 1 || shard_.rank < 0 || shard_.rank >= shard_.size) {
    throw std::invalid_argument("tensor shard " + std::to_string(shard_.rank) + " of " +
                                std::to_string(shard_.size) + " is not a valid shard");
  }
  layer_begin_ = layers.begin;
  layer_end_ = layers.end < 0 ? config_.n_layer : layers.end;
  if (layer_begin_ < 0 || layer_begin_ >= layer_end_ || layer_end_ > config_.n_layer) {
    throw std::invalid_argument("layer range [" + std::to_string(layer_begin_) + ", " +
                                std::to_string(layer_end_) + ") is not inside the model's " +
                                std::to_string(config_.n_layer) + " layers");
  }
  weights_ = checkpoint_->bind_weights(layer_begin_, layer_end_);
  // Keep only this stage's layers (and the head only on the last stage), so a stage packs and holds
  // just its share of the weights.
  weights_.layers.erase(weights_.layers.begin() + layer_end_, weights_.layers.end());
  weights_.layers.erase(weights_.layers.begin(), weights_.layers.begin() + layer_begin_);
  shard_config_.n_layer = layer_end_ - layer_begin_;
  if (!is_last_stage()) weights_.output = model::WeightMatrix{};
  if (shard_.size > 1) {
    if (reducer == nullptr) throw std::invalid_argument("a sharded model needs a ShardReducer");
    reducer_ = reducer;
    bind_shard();
  }
  weights_.pack_for_cpu(/*release_source=*/true);
}

const model::GgufFile& LlamaModel::file() const {
  if (checkpoint_->gguf() == nullptr) {
    throw std::logic_error(checkpoint_->path() + " is a Hugging Face checkpoint, not a GGUF file");
  }
  return *checkpoint_->gguf();
}

void LlamaModel::bind_shard() {
  const ModelShard s = plan_shard(shard_config_, shard_, ffn_down_granularity(weights_.layers));
  plan_ = s;
  shard_config_ = s.config;
  vocab_counts_ = s.vocab_counts;
  slice_weights(weights_, s, config_.head_dim, is_first_stage(), is_last_stage());
  if (is_first_stage()) embd_begin_ = i64(s.vocab.begin);
}

void LlamaModel::set_layer_matrix(int64_t layer, model::LayerMatrix which, const std::vector<float>& values) {
  if (shard_.size != 1) throw std::invalid_argument("set_layer_matrix: only unsharded models");
  if (layer < layer_begin_ || layer >= layer_end_) {
    throw std::invalid_argument("set_layer_matrix: layer " + std::to_string(layer) + " is not in this stage");
  }
  model::WeightMatrix& w = weights_.layers[static_cast<size_t>(layer - layer_begin_)].matrix(which);
  if (static_cast<int64_t>(values.size()) != w.n_out * w.k) {
    throw std::invalid_argument("set_layer_matrix: " + std::to_string(values.size()) + " values for a [" +
                                std::to_string(w.n_out) + ", " + std::to_string(w.k) + "] matrix");
  }
  auto owned = std::make_shared<std::vector<uint8_t>>(values.size() * sizeof(float));
  std::memcpy(owned->data(), values.data(), owned->size());
  w.type = kernels::DType::F32;
  w.data = owned->data();
  w.packed = nullptr;
  w.owned = std::move(owned);
}

int32_t LlamaModel::add_lora(const model::LoraAdapter& adapter, float user_scale) {
  set_lora(n_loras() + 1, adapter, user_scale);
  return n_loras();
}

void LlamaModel::set_lora(int32_t slot, const model::LoraAdapter& adapter, float user_scale) {
  if (slot < 1) throw std::invalid_argument("LoRA adapter index " + std::to_string(slot) + " is below 1");
  check_lora_fits(adapter, config_);  // the whole model's shapes: this shard holds slices
  ShardLora cut = shard_lora(adapter, user_scale, plan_ ? &*plan_ : nullptr, config_.head_dim, layer_begin_,
                             layer_end_, is_last_stage());
  if (slot > n_loras()) loras_.resize(static_cast<size_t>(slot));
  loras_[static_cast<size_t>(slot - 1)] = std::move(cut);
}

void LlamaModel::remove_lora(int32_t slot) {
  if (!has_lora(slot)) return;
  if (default_lora_ == slot) default_lora_ = 0;
  loras_[static_cast<size_t>(slot - 1)].reset();
}

void LlamaModel::set_kv_cache_types(const KvCacheTypes& types) {
  if (const std::string why = KvCache::unsupported(shard_config_, types); !why.empty())
    throw std::invalid_argument("this model cannot have " + why);
  kv_cache_types_ = types;
}

void LlamaModel::set_default_lora(int32_t adapter) {
  if (adapter != 0 && !has_lora(adapter)) {
    throw std::invalid_argument("LoRA adapter " + std::to_string(adapter) + " is not one of the model's " +
                                std::to_string(n_loras()));
  }
  default_lora_ = adapter;
}

void LlamaModel::add_lora_products(int64_t layer, model::LayerMatrix which, const float* x,
                                   const std::vector<std::vector<int64_t>>& rows_by_adapter, float* y,
                                   kernels::ThreadPool& pool) {
  for (size_t a = 0; a < loras_.size(); ++a) {
    if (!loras_[a] || rows_by_adapter[a].empty()) continue;
    const std::optional<LoraProduct>& p =
        layer == kHeadLayer ? loras_[a]->output
                            : loras_[a]->layers[static_cast<size_t>(layer)][static_cast<size_t>(which)];
    if (p) add_lora_product(*p, x, rows_by_adapter[a], y, pool);
  }
}

void LlamaModel::matmul(const model::WeightMatrix& w, const float* x, int64_t m, float* y,
                        kernels::ThreadPool& pool) {
  if (w.input_order != nullptr) {  // act-order GPTQ: the input in the order the columns are stored
    const std::vector<int32_t>& order = *w.input_order;
    gathered_.resize(static_cast<size_t>(m * w.k));
    for (int64_t r = 0; r < m; ++r)
      for (int64_t c = 0; c < w.k; ++c) gathered_[static_cast<size_t>(r * w.k + c)] = x[r * w.k + order[c]];
    x = gathered_.data();
  }
  if (w.packed != nullptr) {
    check(kernels::matmul_packed(*w.packed, x, m, y, pool), "matmul");
  } else {
    check(kernels::matmul(w.type, w.data, w.n_out, w.k, x, m, y, pool), "matmul");
  }
}

void LlamaModel::forward_stage(const ForwardBatch& batch, KvCache& cache, kernels::ThreadPool& pool,
                               const float* hidden_in, std::vector<float>& out) {
  const auto& c = config_;         // whole-model sizes: n_embd, n_vocab, head_dim
  const auto& sc = shard_config_;  // this shard's heads and ffn rows
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
  if (cache.kv_dim() != shard_config_.kv_dim()) {
    throw std::invalid_argument(
        "KV cache rows of " + std::to_string(cache.kv_dim()) + " do not match this shard's KV width " +
        std::to_string(shard_config_.kv_dim()) + " (size the cache from shard_config())");
  }
  for (int32_t row : batch.logit_rows) {
    if (row < 0 || row >= n) throw std::invalid_argument("logit row outside the batch");
  }
  // Each token's adapter (0: none), grouped once into each adapter's rows for every product below.
  std::vector<int32_t> token_adapters;  // empty: no sequence names one
  if (batch.seq_adapters.empty() && default_lora_ != 0) {
    token_adapters.assign(static_cast<size_t>(n), default_lora_);
  } else if (std::any_of(batch.seq_adapters.begin(), batch.seq_adapters.end(),
                         [](int32_t a) { return a != 0; })) {
    if (static_cast<int64_t>(batch.seq_adapters.size()) != n_seqs) {
      throw std::invalid_argument("forward batch: seq_adapters has " +
                                  std::to_string(batch.seq_adapters.size()) + " rows for " +
                                  std::to_string(n_seqs) + " sequences");
    }
    for (int32_t a : batch.seq_adapters) {
      if (a != 0 && !has_lora(a)) {
        throw std::invalid_argument("LoRA adapter " + std::to_string(a) + " is not loaded (the model has " +
                                    std::to_string(n_loras()) + " slots)");
      }
    }
    token_adapters.resize(static_cast<size_t>(n));
    for (int64_t t = 0; t < n; ++t)
      token_adapters[static_cast<size_t>(t)] = batch.seq_adapters[batch.seq_index[t]];
  }
  const bool adapted = !token_adapters.empty();
  lora_rows_.assign(adapted ? loras_.size() : 0, {});
  lora_logit_rows_.assign(adapted ? loras_.size() : 0, {});
  if (adapted) {
    for (int64_t t = 0; t < n; ++t)
      if (const int32_t a = token_adapters[static_cast<size_t>(t)]; a != 0)
        lora_rows_[static_cast<size_t>(a - 1)].push_back(t);
    for (size_t i = 0; i < batch.logit_rows.size(); ++i)
      if (const int32_t a = token_adapters[static_cast<size_t>(batch.logit_rows[i])]; a != 0)
        lora_logit_rows_[static_cast<size_t>(a - 1)].push_back(static_cast<int64_t>(i));
  }
  // The product of a layer matrix with the adapters' updates of the rows that name one.
  const auto product = [&](int64_t l, model::LayerMatrix which, const float* in, float* y) {
    const model::WeightMatrix& w = weights_.layers[static_cast<size_t>(l)].matrix(which);
    matmul(w, in, n, y, pool);
    if (adapted) add_lora_products(l, which, in, lora_rows_, y, pool);
  };
  if ((hidden_in == nullptr) != is_first_stage()) {
    throw std::invalid_argument(is_first_stage() ? "the first pipeline stage embeds tokens: no hidden_in"
                                                 : "a later pipeline stage needs hidden_in");
  }
  if (n == 0) {
    out.clear();
    return;
  }

  x_.resize(n * c.n_embd);
  h_.resize(n * c.n_embd);
  q_.resize(n * sc.q_dim());
  k_.resize(n * sc.kv_dim());
  v_.resize(n * sc.kv_dim());
  attn_.resize(n * sc.q_dim());
  gate_.resize(n * sc.n_ff);
  up_.resize(n * sc.n_ff);

  // Embedding: dequantize only the rows the batch uses. Vocabulary-parallel when sharded: each shard
  // holds a range of rows, fills the tokens it owns and zeros the rest, and one all-reduce sum
  // assembles every row (exactly: each element is one value plus zeros).
  if (hidden_in != nullptr) {
    std::copy_n(hidden_in, n * c.n_embd, x_.data());
  } else {
    const model::WeightMatrix& embd = weights_.token_embd;
    for (int64_t t = 0; t < n; ++t) {
      const int64_t local = batch.tokens[t] - embd_begin_;
      float* row_out = x_.data() + t * c.n_embd;
      if (local < 0 || local >= embd.n_out) {
        std::fill_n(row_out, c.n_embd, 0.0f);
        continue;
      }
      check(kernels::dequantize_row(embd.type, embd.data + local * embd.row_bytes(), row_out, c.n_embd),
            "embedding lookup");
    }
    if (reducer_ != nullptr) reducer_->sum(x_.data(), static_cast<size_t>(n * c.n_embd));
  }

  kernels::PagedAttentionShape shape;
  shape.tokens = n;
  shape.n_head = sc.n_head;
  shape.n_head_kv = sc.n_head_kv;
  shape.head_dim = c.head_dim;
  shape.block_size = cache.block_size();
  shape.max_blocks_per_seq = batch.max_blocks_per_seq;
  const float scale = 1.0f / std::sqrt(static_cast<float>(c.head_dim));
  const int64_t kv_dim = sc.kv_dim();
  const KvCacheTypes& cache_types = cache.types();
  const KvRotation rotation = kv_cache_rotation_ ? KvCache::rotation(sc, cache_types) : KvRotation{};
  const kernels::RopeScaling rope_scaling = c.rope_scaling();

  for (int64_t l = 0; l < sc.n_layer; ++l) {  // local layer index: cache and weights hold the stage's
    const model::LlamaLayerWeights& w = weights_.layers[l];
    const int64_t layer = layer_begin_ + l;
    check(kernels::rms_norm(x_.data(), w.attn_norm.data(), h_.data(), n, c.n_embd, c.rms_eps), "rms_norm");
    if (observer_) observer_(layer, MatrixInput::attn_qkv, h_.data(), n, c.n_embd);
    product(l, model::LayerMatrix::attn_q, h_.data(), q_.data());
    product(l, model::LayerMatrix::attn_k, h_.data(), k_.data());
    product(l, model::LayerMatrix::attn_v, h_.data(), v_.data());
    check(kernels::rope_normal(q_.data(), batch.positions.data(), n, sc.n_head, c.head_dim, c.rope_dims,
                               c.rope_base, rope_scaling),
          "rope");
    check(kernels::rope_normal(k_.data(), batch.positions.data(), n, sc.n_head_kv, c.head_dim, c.rope_dims,
                               c.rope_base, rope_scaling),
          "rope");

    // llama.cpp's rotation of a quantized cache's Q and K, and V (KvCache::rotation).
    if (rotation.k_block > 0) {
      check(kernels::hadamard_rotate(q_.data(), n * sc.q_dim() / rotation.k_block, rotation.k_block),
            "rotation");
      check(kernels::hadamard_rotate(k_.data(), n * kv_dim / rotation.k_block, rotation.k_block), "rotation");
    }
    if (rotation.v_block > 0)
      check(kernels::hadamard_rotate(v_.data(), n * kv_dim / rotation.v_block, rotation.v_block), "rotation");

    // Write this batch's K/V into the cache before any token attends: fp16, or llama.cpp's quantized cache
    // rows (its from_float).
    for (int64_t t = 0; t < n; ++t) {
      const int32_t* table = batch.block_tables.data() + batch.seq_index[t] * batch.max_blocks_per_seq;
      const int64_t pos = batch.positions[t];
      const int64_t slot = static_cast<int64_t>(table[pos / cache.block_size()]) * cache.block_size() +
                           pos % cache.block_size();
      check(kernels::quantize_cache_row(cache_types.k, k_.data() + t * kv_dim,
                                        cache.k_bytes(l) + slot * cache.k_row_bytes(), kv_dim),
            "KV write");
      check(kernels::quantize_cache_row(cache_types.v, v_.data() + t * kv_dim,
                                        cache.v_bytes(l) + slot * cache.v_row_bytes(), kv_dim),
            "KV write");
    }
    if (cache_types.quantized()) {
      check(kernels::paged_attention_quantized(shape, cache_types.k, cache_types.v, q_.data(),
                                               cache.k_bytes(l), cache.v_bytes(l), batch.block_tables.data(),
                                               batch.seq_index.data(), batch.positions.data(), scale,
                                               attn_.data(), pool),
            "attention");
    } else {
      check(
          kernels::paged_attention(shape, q_.data(), cache.k(l), cache.v(l), batch.block_tables.data(),
                                   batch.seq_index.data(), batch.positions.data(), scale, attn_.data(), pool),
          "attention");
    }
    if (rotation.v_block > 0)  // back from V's rotation (H · H = I)
      check(kernels::hadamard_rotate(attn_.data(), n * sc.q_dim() / rotation.v_block, rotation.v_block),
            "rotation");
    if (observer_) observer_(layer, MatrixInput::attn_output, attn_.data(), n, sc.q_dim());
    // [n, n_embd] partial over the shard's heads
    product(l, model::LayerMatrix::attn_output, attn_.data(), h_.data());
    if (reducer_ != nullptr) reducer_->sum(h_.data(), static_cast<size_t>(n * c.n_embd));
    check(kernels::add_inplace(x_.data(), h_.data(), n * c.n_embd), "residual add");

    check(kernels::rms_norm(x_.data(), w.ffn_norm.data(), h_.data(), n, c.n_embd, c.rms_eps), "rms_norm");
    if (observer_) observer_(layer, MatrixInput::ffn_gate_up, h_.data(), n, c.n_embd);
    product(l, model::LayerMatrix::ffn_gate, h_.data(), gate_.data());
    product(l, model::LayerMatrix::ffn_up, h_.data(), up_.data());
    check(kernels::swiglu(gate_.data(), up_.data(), gate_.data(), n * sc.n_ff), "swiglu");
    if (observer_) observer_(layer, MatrixInput::ffn_down, gate_.data(), n, sc.n_ff);
    // [n, n_embd] partial over the shard's ffn rows
    product(l, model::LayerMatrix::ffn_down, gate_.data(), h_.data());
    if (reducer_ != nullptr) reducer_->sum(h_.data(), static_cast<size_t>(n * c.n_embd));
    check(kernels::add_inplace(x_.data(), h_.data(), n * c.n_embd), "residual add");
  }

  if (!is_last_stage()) {
    out.assign(x_.begin(), x_.begin() + n * c.n_embd);
    return;
  }
  // Output norm and head only for the rows whose logits are wanted.
  std::vector<float>& logits = out;
  const int64_t n_out = static_cast<int64_t>(batch.logit_rows.size());
  if (n_out == 0) {  // e.g. a prompt chunk that is not the prompt's last
    logits.clear();
    return;
  }
  picked_.resize(n_out * c.n_embd);
  for (int64_t i = 0; i < n_out; ++i) {
    std::copy_n(x_.data() + batch.logit_rows[i] * c.n_embd, c.n_embd, picked_.data() + i * c.n_embd);
  }
  check(kernels::rms_norm(picked_.data(), weights_.output_norm.data(), picked_.data(), n_out, c.n_embd,
                          c.rms_eps),
        "rms_norm");
  logits.resize(n_out * c.n_vocab);
  const auto head = [&](float* y) {
    matmul(weights_.output, picked_.data(), n_out, y, pool);
    if (adapted) add_lora_products(kHeadLayer, {}, picked_.data(), lora_logit_rows_, y, pool);
  };
  if (shard_.size == 1) {
    head(logits.data());
    return;
  }
  // [n_out, local vocab] on each shard, gathered into [n_out, n_vocab].
  local_logits_.resize(n_out * weights_.output.n_out);
  head(local_logits_.data());
  reducer_->gather_columns(local_logits_.data(), n_out, vocab_counts_, logits.data());
}

}  // namespace nibble::worker
