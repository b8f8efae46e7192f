#pragma once
// Log-probabilities of generated tokens, as OpenAI's and vLLM's `logprobs` return them: the model's
// own distribution at a position (log-softmax of its logits, before temperature, penalties and
// filtering), the chosen token's value and the most likely tokens'.
#include <cstdint>
#include <utility>
#include <vector>

namespace nibble::worker {

// The most likely tokens a request may ask for (OpenAI's limit).
constexpr int kMaxTopLogprobs = 20;

struct TokenLogprobs {
  float logprob = 0.0f;                        // of the chosen token
  std::vector<std::pair<int32_t, float>> top;  // (token, logprob), most likely first, ties by lower id
  bool operator==(const TokenLogprobs&) const = default;
};

// logits: [n_vocab]; token in [0, n_vocab); top_n in [0, kMaxTopLogprobs] (fewer when the vocabulary
// is smaller). The normaliser is summed in double, so each value is log p to float precision.
TokenLogprobs token_logprobs(const float* logits, int64_t n_vocab, int32_t token, int top_n);

}  // namespace nibble::worker
