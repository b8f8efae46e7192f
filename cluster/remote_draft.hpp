#pragma once
// A DraftProposer whose draft runs on a rank of its own (`draft.placement: own_rank`, served by
// DraftService): each propose() is one DraftRequest / DraftReply round trip over a connected
// ZeroMQ REQ socket. Only the tokens a sequence gained since its previous request travel (the draft
// rank keeps the rest), and sequences released in between ride along with the next request.
#include <cstdint>
#include <unordered_map>
#include <vector>
#include <zmq.hpp>

#include "speculative/draft_proposer.hpp"

namespace nibble::cluster {

class RemoteDraft final : public speculative::DraftProposer {
 public:
  // socket: a REQ socket connected to the draft rank's REP (not owned). Throws std::runtime_error
  // from propose() when the draft rank reports a failure or its reply is malformed.
  explicit RemoteDraft(zmq::socket_t& socket);

  std::vector<speculative::Proposal> propose(
      const std::vector<speculative::ProposalRequest>& requests) override;
  void release(uint64_t seq_id) override;
  // Tells the draft rank to stop (and waits for its acknowledgement).
  void shutdown();

 private:
  zmq::socket_t& socket_;
  std::unordered_map<uint64_t, std::vector<int32_t>> sent_;  // tokens the draft rank holds per sequence
  std::vector<uint64_t> released_;                           // not yet told
};

}  // namespace nibble::cluster
