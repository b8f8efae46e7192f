#pragma once
// What the speculator asks of a draft model: for a batch of sequences, catch up on the tokens the
// target accepted and propose up to k more tokens each. LocalDraft (local_draft.hpp) runs the draft
// in this process; cluster/remote_draft.hpp asks a draft that runs in a process of its own
// (`draft.placement: own_rank`). Both give the same proposals for the same requests.
#include <cstdint>
#include <memory>
#include <span>
#include <vector>

#include "worker/sampler.hpp"

namespace nibble::speculative {

struct ProposalRequest {
  uint64_t seq_id = 0;
  std::span<const int32_t> tokens;  // the sequence so far: prompt and every accepted token
  const worker::SamplingParams* sampling = nullptr;
  int k = 0;  // tokens wanted (0: none)
  // The verifier takes the draft's distributions where the draft makes them (a target that verifies
  // on the GPU the draft runs on): a draft that can keep them there (ForwardModel::
  // keeps_draft_distributions) then returns them as Proposal::kept instead of probs.
  bool keep_distributions = false;
};

struct Proposal {
  uint64_t seq_id = 0;
  std::vector<int32_t> tokens;  // [k'] proposed ids, k' <= k (fewer when the draft cache is full)
  std::vector<float> probs;     // [k', n_vocab] q_i each proposal was drawn from; empty at temperature 0
  // Or, instead of probs, the same rows kept where the draft made them (rows 0..k'-1; see
  // ProposalRequest::keep_distributions); alive while this handle is.
  std::shared_ptr<const worker::KeptRows> kept;
};

class DraftProposer {
 public:
  virtual ~DraftProposer() = default;
  // One proposal per request with k > 0 and tokens, in request order.
  virtual std::vector<Proposal> propose(const std::vector<ProposalRequest>& requests) = 0;
  // Forgets a sequence (its draft KV blocks return to the pool).
  virtual void release(uint64_t seq_id) = 0;
};

}  // namespace nibble::speculative
