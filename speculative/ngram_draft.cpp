#include "speculative/ngram_draft.hpp"

#include <algorithm>
#include <stdexcept>
#include <string>

namespace nibble::speculative {

std::vector<int32_t> ngram_continuation(std::span<const int32_t> tokens, int min_n, int max_n, int k) {
  const auto length = static_cast<int64_t>(tokens.size());
  for (int64_t n = std::min<int64_t>(max_n, length - 1); n >= min_n && k > 0; --n) {
    const std::span<const int32_t> suffix = tokens.subspan(static_cast<size_t>(length - n));
    // The latest start before the suffix itself whose n tokens equal it.
    for (int64_t start = length - n - 1; start >= 0; --start) {
      if (!std::equal(suffix.begin(), suffix.end(), tokens.begin() + start)) continue;
      const int64_t from = start + n;
      const int64_t to = std::min(length, from + k);
      return {tokens.begin() + from, tokens.begin() + to};
    }
  }
  return {};
}

NgramDraft::NgramDraft(int64_t n_vocab, int min_n, int max_n)
    : n_vocab_(n_vocab), min_n_(min_n), max_n_(max_n) {
  if (n_vocab < 1 || min_n < 1 || max_n < min_n)
    throw std::invalid_argument("NgramDraft: needs a vocabulary and 1 <= min_n <= max_n, got " +
                                std::to_string(min_n) + ".." + std::to_string(max_n));
}

std::vector<Proposal> NgramDraft::propose(const std::vector<ProposalRequest>& requests) {
  std::vector<Proposal> out;
  for (const ProposalRequest& r : requests) {
    if (r.k <= 0 || r.tokens.empty()) continue;
    Proposal p;
    p.seq_id = r.seq_id;
    p.tokens = ngram_continuation(r.tokens, min_n_, max_n_, r.k);
    // A sampled request's rows: the point mass each proposal is.
    if (r.sampling != nullptr && r.sampling->temperature > 0.0f) {
      p.probs.assign(p.tokens.size() * static_cast<size_t>(n_vocab_), 0.0f);
      for (size_t i = 0; i < p.tokens.size(); ++i) {
        if (p.tokens[i] < 0 || p.tokens[i] >= n_vocab_)
          throw std::invalid_argument("NgramDraft: token " + std::to_string(p.tokens[i]) +
                                      " is outside the vocabulary of " + std::to_string(n_vocab_));
        p.probs[i * static_cast<size_t>(n_vocab_) + static_cast<size_t>(p.tokens[i])] = 1.0f;
      }
    }
    out.push_back(std::move(p));
  }
  return out;
}

}  // namespace nibble::speculative
