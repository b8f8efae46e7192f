#include "worker/evaluation.hpp"

#include <algorithm>
#include <cmath>
#include <limits>
#include <stdexcept>
#include <string>

namespace nibble::worker {

std::vector<std::vector<int32_t>> evaluation_windows(const std::vector<int32_t>& tokens, int64_t ctx,
                                                     std::optional<int32_t> bos) {
  if (ctx < 2) throw std::invalid_argument("the evaluation context must be at least 2 tokens");
  const int64_t n = static_cast<int64_t>(tokens.size());
  if (n < ctx) {
    throw std::invalid_argument("the text has " + std::to_string(n) + " tokens, fewer than one window of " +
                                std::to_string(ctx) + " (use a longer text or a smaller --ctx)");
  }
  std::vector<std::vector<int32_t>> windows;
  for (int64_t start = 0; start + ctx <= n; start += ctx) {
    windows.emplace_back(tokens.begin() + start, tokens.begin() + start + ctx);
    if (bos) windows.back()[0] = *bos;
  }
  return windows;
}

double PerplexityResult::perplexity() const {
  return scored > 0 ? std::exp(nll_sum / static_cast<double>(scored))
                    : std::numeric_limits<double>::quiet_NaN();
}

namespace {

// Logits for every position of one window, from an empty cache.
void window_logits(LlamaModel& model, kernels::ThreadPool& pool, const std::vector<int32_t>& window,
                   std::vector<float>& logits) {
  const int64_t block = 16;
  const int64_t blocks = (static_cast<int64_t>(window.size()) + block - 1) / block;
  KvCache cache(model.shard_config(), blocks, block, model.kv_cache_types());
  std::vector<int32_t> table(static_cast<size_t>(blocks));
  for (int64_t b = 0; b < blocks; ++b) table[static_cast<size_t>(b)] = static_cast<int32_t>(b);
  model.forward(ForwardBatch::single(window, 0, table, /*all_logits=*/true), cache, pool, logits);
}

// ln softmax(row) into out, in double.
void log_softmax(const float* row, int64_t n, std::vector<double>& out) {
  out.resize(static_cast<size_t>(n));
  const double max = *std::max_element(row, row + n);
  double sum = 0.0;
  for (int64_t i = 0; i < n; ++i) sum += std::exp(static_cast<double>(row[i]) - max);
  const double log_sum = max + std::log(sum);
  for (int64_t i = 0; i < n; ++i) out[static_cast<size_t>(i)] = static_cast<double>(row[i]) - log_sum;
}

int64_t argmax(const float* row, int64_t n) { return std::max_element(row, row + n) - row; }

// The positions scored in a window of ctx tokens: ctx/2 .. ctx-2.
int64_t first_scored(int64_t ctx) { return ctx / 2; }

void check_model(const LlamaModel& model, const std::vector<std::vector<int32_t>>& windows) {
  for (const auto& w : windows) {
    if (static_cast<int64_t>(w.size()) > model.config().n_ctx_train && model.config().n_ctx_train > 0) {
      throw std::invalid_argument("a window of " + std::to_string(w.size()) +
                                  " tokens is longer than the model's context of " +
                                  std::to_string(model.config().n_ctx_train));
    }
    for (int32_t id : w) {
      if (id < 0 || id >= model.config().n_vocab) {
        throw std::invalid_argument("token id " + std::to_string(id) + " is outside the vocabulary (" +
                                    std::to_string(model.config().n_vocab) + ")");
      }
    }
  }
}

}  // namespace

PerplexityResult perplexity(LlamaModel& model, kernels::ThreadPool& pool,
                            const std::vector<std::vector<int32_t>>& windows,
                            const EvaluationProgress& progress) {
  check_model(model, windows);
  const int64_t n_vocab = model.config().n_vocab;
  PerplexityResult result;
  std::vector<float> logits;
  std::vector<double> logp;
  for (const auto& window : windows) {
    window_logits(model, pool, window, logits);
    const int64_t ctx = static_cast<int64_t>(window.size());
    for (int64_t pos = first_scored(ctx); pos + 1 < ctx; ++pos) {
      log_softmax(logits.data() + pos * n_vocab, n_vocab, logp);
      result.nll_sum -= logp[static_cast<size_t>(window[static_cast<size_t>(pos + 1)])];
      ++result.scored;
    }
    ++result.windows;
    if (progress) progress(result.windows, static_cast<int64_t>(windows.size()));
  }
  return result;
}

ComparisonResult compare_models(LlamaModel& base, LlamaModel& model, kernels::ThreadPool& pool,
                                const std::vector<std::vector<int32_t>>& windows,
                                const EvaluationProgress& progress) {
  const int64_t n_vocab = base.config().n_vocab;
  if (model.config().n_vocab != n_vocab) {
    throw std::invalid_argument("the models' vocabularies differ in size (" + std::to_string(n_vocab) +
                                " vs " + std::to_string(model.config().n_vocab) + ")");
  }
  check_model(base, windows);
  check_model(model, windows);
  ComparisonResult result;
  std::vector<float> base_logits, model_logits;
  std::vector<double> base_logp, model_logp;
  for (const auto& window : windows) {
    window_logits(base, pool, window, base_logits);
    window_logits(model, pool, window, model_logits);
    const int64_t ctx = static_cast<int64_t>(window.size());
    for (int64_t pos = first_scored(ctx); pos + 1 < ctx; ++pos) {
      const float* b_row = base_logits.data() + pos * n_vocab;
      const float* m_row = model_logits.data() + pos * n_vocab;
      log_softmax(b_row, n_vocab, base_logp);
      log_softmax(m_row, n_vocab, model_logp);
      const auto next = static_cast<size_t>(window[static_cast<size_t>(pos + 1)]);
      result.base.nll_sum -= base_logp[next];
      result.model.nll_sum -= model_logp[next];
      double kl = 0.0;
      for (size_t i = 0; i < static_cast<size_t>(n_vocab); ++i)
        kl += std::exp(base_logp[i]) * (base_logp[i] - model_logp[i]);
      kl = std::max(kl, 0.0);  // rounding can make a zero divergence slightly negative
      result.kl_sum += kl;
      result.kl_max = std::max(result.kl_max, kl);
      result.same_top1 += argmax(b_row, n_vocab) == argmax(m_row, n_vocab) ? 1 : 0;
      ++result.scored;
    }
    ++result.base.windows;
    ++result.model.windows;
    if (progress) progress(result.base.windows, static_cast<int64_t>(windows.size()));
  }
  result.base.scored = result.model.scored = result.scored;
  return result;
}

}  // namespace nibble::worker
