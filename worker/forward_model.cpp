#include "worker/forward_model.hpp"

#include <algorithm>
#include <stdexcept>
#include <string>

namespace nibble::worker {

namespace {
struct CpuCache final : ForwardCache {
  CpuCache(const model::LlamaConfig& config, int64_t num_blocks, int64_t block_size,
           const KvCacheTypes& types)
      : cache(config, num_blocks, block_size, types) {}
  KvCache cache;
};
}  // namespace

void ForwardModel::forward_stage_argmax(const ForwardBatch& batch, ForwardCache& cache,
                                        const float* hidden_in, std::vector<int32_t>& ids) {
  if (!is_last_stage()) throw std::logic_error("forward_stage_argmax: only the last stage has logits");
  forward_stage(batch, cache, hidden_in, argmax_logits_);
  const int64_t n_vocab = config().n_vocab;
  ids.resize(batch.logit_rows.size());
  for (size_t r = 0; r < ids.size(); ++r) {
    const float* row = argmax_logits_.data() + static_cast<int64_t>(r) * n_vocab;
    ids[r] = static_cast<int32_t>(std::max_element(row, row + n_vocab) - row);  // the first maximum
  }
}

void check_sample_rows(const ForwardBatch& batch, const std::vector<SamplingParams>& params,
                       const std::vector<double>& uniforms, const TokenHistories& histories) {
  const size_t rows = batch.logit_rows.size();
  if (params.size() != rows || uniforms.size() != rows) {
    throw std::invalid_argument("forward_sample: " + std::to_string(params.size()) +
                                " sampling settings and " + std::to_string(uniforms.size()) +
                                " uniforms for " + std::to_string(rows) + " logit rows");
  }
  if (!histories.empty() && histories.size() != rows) {
    throw std::invalid_argument("forward_sample: " + std::to_string(histories.size()) + " histories for " +
                                std::to_string(rows) + " logit rows");
  }
  for (size_t r = 0; r < rows; ++r) {
    validate(params[r]);
    if (adjusts_logits(params[r]) && histories.empty()) {
      throw std::invalid_argument("forward_sample: row " + std::to_string(r) +
                                  " has a logit bias or penalty, which needs the rows' histories");
    }
    if (!(uniforms[r] >= 0.0 && uniforms[r] < 1.0))
      throw std::invalid_argument("forward_sample: uniform " + std::to_string(uniforms[r]) +
                                  " is outside [0, 1)");
  }
}

void ForwardModel::forward_stage_sample(const ForwardBatch& batch, ForwardCache& cache,
                                        const float* hidden_in, const std::vector<SamplingParams>& params,
                                        const std::vector<double>& uniforms, const TokenHistories& histories,
                                        std::vector<int32_t>& ids) {
  if (!is_last_stage()) throw std::logic_error("forward_stage_sample: only the last stage has logits");
  check_sample_rows(batch, params, uniforms, histories);
  forward_stage(batch, cache, hidden_in, argmax_logits_);
  const int64_t n_vocab = config().n_vocab;
  ids.resize(batch.logit_rows.size());
  for (size_t r = 0; r < ids.size(); ++r) {
    ids[r] = Sampler(params[r]).sample_with_uniform(
        argmax_logits_.data() + static_cast<int64_t>(r) * n_vocab, n_vocab,
        histories.empty() ? std::span<const int32_t>{} : histories[r], uniforms[r]);
  }
}

void ForwardModel::forward_stage_verify(const ForwardBatch&, ForwardCache&, const float*,
                                        const std::vector<VerifySequence>&, std::vector<int32_t>&,
                                        std::vector<std::vector<int32_t>>&) {
  throw std::logic_error("forward_verify: this backend does not verify drafts itself (verifies_drafts())");
}

std::shared_ptr<KeptRows> ForwardModel::make_kept_rows(int64_t) {
  throw std::logic_error("make_kept_rows: this backend does not keep draft distributions");
}

void ForwardModel::forward_draft_sample(const ForwardBatch&, ForwardCache&,
                                        const std::vector<SamplingParams>&, const std::vector<double>&,
                                        const std::vector<KeptRowRef>&, std::vector<int32_t>&) {
  throw std::logic_error("forward_draft_sample: this backend does not keep draft distributions");
}

void ForwardModel::set_lora(int32_t, const model::LoraAdapter&, float) {
  throw std::runtime_error("this worker's model takes no LoRA adapters");
}

void ForwardModel::remove_lora(int32_t) {}

std::unique_ptr<ForwardCache> CpuForwardModel::make_cache(int64_t num_blocks, int64_t block_size) const {
  return std::make_unique<CpuCache>(model_.shard_config(), num_blocks, block_size, model_.kv_cache_types());
}

void CpuForwardModel::forward_stage(const ForwardBatch& batch, ForwardCache& cache, const float* hidden_in,
                                    std::vector<float>& out) {
  auto* own = dynamic_cast<CpuCache*>(&cache);
  if (own == nullptr) throw std::logic_error("CpuForwardModel: a cache made by another kind of model");
  model_.forward_stage(batch, own->cache, pool_, hidden_in, out);
}

}  // namespace nibble::worker
