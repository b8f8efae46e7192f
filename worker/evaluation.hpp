#pragma once
// Measuring a model's quality on text, as llama.cpp's llama-perplexity does: perplexity, and how
// far a (quantized) model's next-token distributions are from a base model's on the same windows
// (KL divergence, top-1 agreement). This is what a user checks before serving a 4-bit model.
#include <cstdint>
#include <functional>
#include <optional>
#include <vector>

#include "kernels/thread_pool.hpp"
#include "worker/llama_model.hpp"

namespace nibble::worker {

// llama.cpp's windows: the text's tokens (BOS first when the vocabulary adds one) cut into
// floor(n / ctx) windows of ctx consecutive tokens, the first token of each replaced by BOS.
// Throws std::invalid_argument when there are fewer than ctx tokens or ctx < 2.
std::vector<std::vector<int32_t>> evaluation_windows(const std::vector<int32_t>& tokens, int64_t ctx,
                                                     std::optional<int32_t> bos);

// Sums over the scored positions: in each window, positions ctx/2 .. ctx-2 predicting the token
// that follows (the second half, so every scored token has at least ctx/2 tokens of context).
struct PerplexityResult {
  double nll_sum = 0.0;  // sum of -ln p(next token)
  int64_t scored = 0;    // positions scored
  int64_t windows = 0;
  double perplexity() const;
};

struct ComparisonResult {
  PerplexityResult base, model;
  double kl_sum = 0.0;  // sum over scored positions of KL(p_base || p_model), in nats
  double kl_max = 0.0;
  int64_t same_top1 = 0;  // positions where both models' most likely token agree
  int64_t scored = 0;
  double mean_kl() const { return scored > 0 ? kl_sum / static_cast<double>(scored) : 0.0; }
  double top1_agreement() const { return scored > 0 ? static_cast<double>(same_top1) / scored : 0.0; }
};

// Called after each window with (windows done, windows in all).
using EvaluationProgress = std::function<void(int64_t, int64_t)>;

// Perplexity of `model` over the windows (each one forward pass from an empty cache).
PerplexityResult perplexity(LlamaModel& model, kernels::ThreadPool& pool,
                            const std::vector<std::vector<int32_t>>& windows,
                            const EvaluationProgress& progress = {});

// Both models over the same windows; they must share the vocabulary size (throws
// std::invalid_argument otherwise). Softmax and sums in double.
ComparisonResult compare_models(LlamaModel& base, LlamaModel& model, kernels::ThreadPool& pool,
                                const std::vector<std::vector<int32_t>>& windows,
                                const EvaluationProgress& progress = {});

}  // namespace nibble::worker
