#pragma once
// The draft model run in this process: a small model at tensor-parallel size 1 with its own KV
// cache (its own block budget). For a batch of sequences it catches up on the tokens the target
// accepted since its last proposal and proposes up to k more tokens each, batching every draft
// forward pass across the sequences.
//
// Proposals x_i ~ q_i are drawn with the draft's own per-sequence stream (seeded from the request's
// seed), after the same penalty/temperature/top-k/top-p/min-p transformation as the target, and q_i
// is handed back for the acceptance test (rejection_sampler.hpp): as host rows, or, when every
// request of a call asks for it and the draft can (ForwardModel::keeps_draft_distributions: a whole
// model on a GPU), kept on the draft's device, so that only ids cross to the host (the proposals
// are the same either way: the device draws as the host does).
#include <cstdint>
#include <memory>
#include <unordered_map>
#include <vector>

#include "kernels/thread_pool.hpp"
#include "speculative/draft_proposer.hpp"
#include "worker/forward_model.hpp"
#include "worker/kv_cache.hpp"
#include "worker/llama_model.hpp"
#include "worker/sampler.hpp"

namespace nibble::speculative {

class LocalDraft final : public DraftProposer {
 public:
  // draft: the whole draft model (not owned), on the CPU or a GPU; its vocabulary must already have
  // been checked against the target's (vocab_match.hpp). num_blocks / block_size: the draft cache's
  // own budget.
  LocalDraft(worker::ForwardModel& draft, int64_t num_blocks, int64_t block_size);
  // The same for a CPU model on `pool` (both not owned).
  LocalDraft(worker::LlamaModel& draft, kernels::ThreadPool& pool, int64_t num_blocks, int64_t block_size);

  std::vector<Proposal> propose(const std::vector<ProposalRequest>& requests) override;
  void release(uint64_t seq_id) override;

  const worker::ForwardModel& model() const { return draft_; }

 private:
  struct SequenceState {
    std::unique_ptr<worker::Sampler> sampler;  // the draft's own stream
    std::vector<int32_t> fed;                  // tokens whose K/V the draft cache holds, by position
    std::vector<int32_t> blocks;
  };
  SequenceState& state(uint64_t seq_id, const worker::SamplingParams& sampling);

  std::unique_ptr<worker::ForwardModel> owned_;  // the CPU constructor's wrapper
  worker::ForwardModel& draft_;
  int64_t block_size_;
  std::unique_ptr<worker::ForwardCache> cache_;
  worker::BlockAllocator allocator_;
  std::unordered_map<uint64_t, SequenceState> sequences_;
  std::vector<float> logits_;
  std::vector<int32_t> argmax_;  // per active row, when every row is greedy or keeps its distribution
};

}  // namespace nibble::speculative
