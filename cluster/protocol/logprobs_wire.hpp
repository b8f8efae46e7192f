#pragma once
// TokenLogprob lists on the wire, shared by the client and the worker protocols (both carry them).
// Internal to the protocol sources: it includes the generated capnp header.
#include <string>
#include <vector>

#include "cluster/protocol/client_protocol.hpp"
#include "cluster/protocol/nibble.capnp.h"

namespace nibble::protocol::detail {

inline void write_logprobs(const std::vector<TokenLogprob>& in,
                           capnp::List<wire::TokenLogprob>::Builder out) {
  for (unsigned i = 0; i < in.size(); ++i) {
    out[i].setLogprob(in[i].logprob);
    auto top = out[i].initTop(static_cast<unsigned>(in[i].top.size()));
    for (unsigned j = 0; j < in[i].top.size(); ++j) {
      top[j].setToken(in[i].top[j].token);
      top[j].setLogprob(in[i].top[j].logprob);
    }
  }
}

// Throws ProtocolError (malformed_message) for more than kMaxLogprobs top tokens at a position.
inline std::vector<TokenLogprob> read_logprobs(capnp::List<wire::TokenLogprob>::Reader in) {
  std::vector<TokenLogprob> out;
  out.reserve(in.size());  // capnp has bounds-checked the list against the frame
  for (auto entry : in) {
    auto top = entry.getTop();
    if (top.size() > kMaxLogprobs) {
      throw ProtocolError(ErrorCode::malformed_message,
                          "logprobs: " + std::to_string(top.size()) + " top tokens at one position");
    }
    TokenLogprob t{entry.getLogprob(), {}};
    for (auto alternative : top) t.top.push_back({alternative.getToken(), alternative.getLogprob()});
    out.push_back(std::move(t));
  }
  return out;
}

}  // namespace nibble::protocol::detail
