#include "cluster/draft_service.hpp"

#include <span>
#include <stdexcept>
#include <string>
#include <unordered_set>

#include "cluster/sampling_settings.hpp"

namespace nibble::cluster {

DraftService::DraftService(speculative::DraftProposer& drafts, zmq::socket_t& socket)
    : drafts_(drafts), socket_(socket) {}

void DraftService::run() {
  for (;;) {
    zmq::message_t frame;
    if (!socket_.recv(frame, zmq::recv_flags::none)) continue;  // EINTR: try again
    protocol::DraftReply reply;
    bool stop = false;
    std::string failure;
    try {
      const protocol::DraftRequest request = protocol::decode_draft_request(
          std::span<const uint8_t>(static_cast<const uint8_t*>(frame.data()), frame.size()));
      stop = request.shutdown;
      if (!stop) reply = answer(request);
    } catch (const std::exception& e) {
      failure = e.what();
      reply = {{}, failure};
    }
    const std::vector<uint8_t> bytes = protocol::encode(reply);
    socket_.send(zmq::buffer(bytes), zmq::send_flags::none);
    if (!failure.empty()) throw std::runtime_error(failure);
    if (stop) return;
  }
}

protocol::DraftReply DraftService::answer(const protocol::DraftRequest& request) {
  for (uint64_t id : request.released) {
    tokens_.erase(id);
    drafts_.release(id);
  }
  std::vector<worker::SamplingParams> params;
  params.reserve(request.sequences.size());  // the requests point into it
  std::vector<speculative::ProposalRequest> requests;
  std::unordered_set<uint64_t> seen;  // each request's tokens must stay put until propose() returns
  for (const protocol::DraftSequence& s : request.sequences) {
    if (!seen.insert(s.sampling.seq_id).second) {
      throw std::runtime_error("draft request names sequence " + std::to_string(s.sampling.seq_id) +
                               " twice");
    }
    std::vector<int32_t>& tokens = tokens_[s.sampling.seq_id];
    if (s.keep > tokens.size()) {
      throw std::runtime_error("draft request keeps " + std::to_string(s.keep) + " tokens of sequence " +
                               std::to_string(s.sampling.seq_id) + ", which has " +
                               std::to_string(tokens.size()));
    }
    tokens.resize(s.keep);
    tokens.insert(tokens.end(), s.tokens.begin(), s.tokens.end());
    if (tokens.empty() || s.k <= 0) {
      throw std::runtime_error("draft request for sequence " + std::to_string(s.sampling.seq_id) +
                               " has no tokens or no proposals wanted");
    }
    params.push_back(to_sampling_params(s.sampling));
    worker::validate(params.back());
    requests.push_back({s.sampling.seq_id, tokens, &params.back(), s.k});
  }
  protocol::DraftReply reply;
  for (speculative::Proposal& p : drafts_.propose(requests))
    reply.proposals.push_back({p.seq_id, std::move(p.tokens), std::move(p.probs)});
  return reply;
}

}  // namespace nibble::cluster
