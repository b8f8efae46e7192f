#pragma once
// The loop of a draft rank (`draft.placement: own_rank`): answer each DraftRequest from the
// sampling worker with the proposals of the draft model running here, until a shutdown request.
// The sequences' tokens are rebuilt from the increments RemoteDraft sends.
#include <cstdint>
#include <unordered_map>
#include <vector>
#include <zmq.hpp>

#include "cluster/protocol/worker_protocol.hpp"
#include "speculative/draft_proposer.hpp"

namespace nibble::cluster {

class DraftService {
 public:
  // drafts: the draft that runs here (not owned). socket: a bound REP socket (not owned).
  DraftService(speculative::DraftProposer& drafts, zmq::socket_t& socket);

  // Serves until a shutdown request. A failure (a malformed request, a draft error) is answered
  // with an error reply, then thrown: the caller ends the job.
  void run();

  // One request (exposed for tests).
  protocol::DraftReply answer(const protocol::DraftRequest& request);

 private:
  speculative::DraftProposer& drafts_;
  zmq::socket_t& socket_;
  std::unordered_map<uint64_t, std::vector<int32_t>> tokens_;  // each sequence so far
};

}  // namespace nibble::cluster
