#pragma once
// Prompt-lookup drafts (vLLM's "ngram" speculative method, llama.cpp's lookup decoding): no draft model;
// the proposals are the tokens that followed the most recent earlier occurrence of the sequence's last n
// tokens (n from max_n down to min_n, the longest that occurs), in its prompt or its own output. Pays
// where the output repeats its context: quoting, editing, summarizing, code, a small model's loops.
//
// Exact like any draft: a proposal is a point mass (q = 1 on the proposed token), so the acceptance
// test (rejection_sampler.hpp) accepts token x with probability p(x) and otherwise samples the target's
// distribution without x; greedy requests accept while the proposals equal the target's argmax.
#include <cstdint>
#include <span>
#include <vector>

#include "speculative/draft_proposer.hpp"

namespace nibble::speculative {

// Up to k tokens that followed the latest earlier occurrence of `tokens`' last n tokens, for the
// largest n in [min_n, max_n] that has one; empty when none does.
// tokens: [length] the sequence so far.
std::vector<int32_t> ngram_continuation(std::span<const int32_t> tokens, int min_n, int max_n, int k);

class NgramDraft final : public DraftProposer {
 public:
  // n_vocab: the target's (a sampled request's proposal rows are that wide); 1 <= min_n <= max_n.
  NgramDraft(int64_t n_vocab, int min_n, int max_n);

  std::vector<Proposal> propose(const std::vector<ProposalRequest>& requests) override;
  void release(uint64_t) override {}  // nothing is kept per sequence

 private:
  int64_t n_vocab_;
  int min_n_, max_n_;
};

}  // namespace nibble::speculative
