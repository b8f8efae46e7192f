#pragma once
// Reading and writing one capnp message per ZeroMQ frame, shared by the client and worker
// protocols. Internal to cluster/protocol (it includes capnp headers).
#include <capnp/message.h>
#include <capnp/serialize.h>
#include <kj/array.h>
#include <kj/exception.h>

#include <cstdint>
#include <cstring>
#include <span>
#include <string>
#include <vector>

#include "cluster/protocol/client_protocol.hpp"

namespace nibble::protocol::detail {

inline std::vector<uint8_t> to_bytes(capnp::MessageBuilder& message) {
  kj::Array<capnp::word> words = capnp::messageToFlatArray(message);
  kj::ArrayPtr<const kj::byte> bytes = words.asBytes();
  return std::vector<uint8_t>(bytes.begin(), bytes.end());
}

// Runs `read` on the capnp message in `frame` after the cheap structural checks, with capnp's
// limits set from the frame size; turns every capnp failure into ProtocolError.
template <class Read>
auto read_frame(std::span<const uint8_t> frame, size_t max_message_bytes, Read&& read) {
  if (frame.size() > max_message_bytes) {
    throw ProtocolError(ErrorCode::message_too_large, "message of " + std::to_string(frame.size()) +
                                                          " bytes exceeds the limit of " +
                                                          std::to_string(max_message_bytes));
  }
  if (frame.empty() || frame.size() % sizeof(capnp::word) != 0) {
    throw ProtocolError(ErrorCode::malformed_message,
                        "message size " + std::to_string(frame.size()) + " is not a positive multiple of 8");
  }
  const size_t n_words = frame.size() / sizeof(capnp::word);
  // capnp reads words in place; ZeroMQ frames carry no alignment guarantee (small ones live
  // inside the zmq_msg_t), so copy those that are not word-aligned.
  const auto* words = reinterpret_cast<const capnp::word*>(frame.data());
  kj::Array<capnp::word> aligned_copy;
  if (reinterpret_cast<uintptr_t>(frame.data()) % alignof(capnp::word) != 0) {
    aligned_copy = kj::heapArray<capnp::word>(n_words);
    std::memcpy(aligned_copy.begin(), frame.data(), frame.size());
    words = aligned_copy.begin();
  }
  capnp::ReaderOptions options;
  // An honest message is read about once; a budget of twice its size (plus slack for tiny
  // messages) stops pointer loops and amplification (many pointers to one big blob).
  options.traversalLimitInWords = 2 * n_words + 64;
  options.nestingLimit = 16;  // our schemas are a few levels deep
  try {
    capnp::FlatArrayMessageReader reader(kj::arrayPtr(words, n_words), options);
    if (reader.getEnd() != words + n_words) {
      throw ProtocolError(ErrorCode::malformed_message, "trailing bytes after the message");
    }
    return read(reader);
  } catch (const kj::Exception& e) {
    throw ProtocolError(ErrorCode::malformed_message,
                        "malformed message: " + std::string(e.getDescription().cStr()));
  }
}

}  // namespace nibble::protocol::detail
