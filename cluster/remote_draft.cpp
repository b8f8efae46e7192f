#include "cluster/remote_draft.hpp"

#include <algorithm>
#include <span>
#include <stdexcept>
#include <string>

#include "cluster/protocol/worker_protocol.hpp"
#include "cluster/sampling_settings.hpp"

namespace nibble::cluster {

namespace {

protocol::DraftReply round_trip(zmq::socket_t& socket, const protocol::DraftRequest& request) {
  const std::vector<uint8_t> bytes = protocol::encode(request);
  socket.send(zmq::buffer(bytes), zmq::send_flags::none);
  zmq::message_t frame;
  while (!socket.recv(frame, zmq::recv_flags::none)) {
  }  // EINTR: try again
  protocol::DraftReply reply;
  try {
    reply = protocol::decode_draft_reply(
        std::span<const uint8_t>(static_cast<const uint8_t*>(frame.data()), frame.size()));
  } catch (const std::exception& e) {
    throw std::runtime_error(std::string("draft rank: bad reply: ") + e.what());
  }
  if (!reply.error.empty()) throw std::runtime_error("draft rank: " + reply.error);
  return reply;
}

}  // namespace

RemoteDraft::RemoteDraft(zmq::socket_t& socket) : socket_(socket) {}

std::vector<speculative::Proposal> RemoteDraft::propose(
    const std::vector<speculative::ProposalRequest>& requests) {
  protocol::DraftRequest request;
  request.released.swap(released_);
  for (const speculative::ProposalRequest& r : requests) {
    if (r.k <= 0 || r.tokens.empty()) continue;
    std::vector<int32_t>& sent = sent_[r.seq_id];
    size_t keep = 0;
    while (keep < sent.size() && keep < r.tokens.size() && sent[keep] == r.tokens[keep]) ++keep;
    protocol::DraftSequence sequence;
    sequence.sampling = to_sequence_sampling(r.seq_id, *r.sampling);
    sequence.keep = static_cast<uint32_t>(keep);
    sequence.tokens.assign(r.tokens.begin() + static_cast<std::ptrdiff_t>(keep), r.tokens.end());
    sequence.k = r.k;
    request.sequences.push_back(std::move(sequence));
    sent.assign(r.tokens.begin(), r.tokens.end());
  }
  if (request.sequences.empty() && request.released.empty()) return {};
  protocol::DraftReply reply = round_trip(socket_, request);
  if (reply.proposals.size() != request.sequences.size()) {
    throw std::runtime_error("draft rank: " + std::to_string(reply.proposals.size()) + " proposals for " +
                             std::to_string(request.sequences.size()) + " sequences");
  }
  std::vector<speculative::Proposal> out;
  out.reserve(reply.proposals.size());
  for (size_t i = 0; i < reply.proposals.size(); ++i) {
    protocol::DraftProposal& p = reply.proposals[i];
    if (p.seq_id != request.sequences[i].sampling.seq_id ||
        p.tokens.size() > static_cast<size_t>(request.sequences[i].k)) {
      throw std::runtime_error("draft rank: proposal " + std::to_string(i) + " does not answer its request");
    }
    out.push_back({p.seq_id, std::move(p.tokens), std::move(p.probs), nullptr});
  }
  return out;
}

void RemoteDraft::release(uint64_t seq_id) {
  if (sent_.erase(seq_id) > 0) released_.push_back(seq_id);
}

void RemoteDraft::shutdown() {
  protocol::DraftRequest request;
  request.shutdown = true;
  round_trip(socket_, request);
}

}  // namespace nibble::cluster
