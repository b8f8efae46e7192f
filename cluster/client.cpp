#include "cluster/client.hpp"

#include <unistd.h>

#include <atomic>
#include <cstdio>
#include <random>
#include <type_traits>
#include <utility>
#include <variant>

namespace nibble::cluster {
namespace {

std::string describe(std::optional<protocol::ErrorCode> code, const std::string& message) {
  return code ? std::string(protocol::to_string(*code)) + ": " + message : message;
}

// A request id unique across processes and threads without coordination: pid, a process-wide
// counter and 32 random bits (pids are reused across machines; the random part covers that).
std::string fresh_request_id() {
  static std::atomic<uint64_t> counter{0};
  thread_local std::mt19937_64 rng{std::random_device{}()};
  char buffer[64];
  std::snprintf(buffer, sizeof(buffer), "req-%d-%llu-%08x", static_cast<int>(getpid()),
                static_cast<unsigned long long>(counter.fetch_add(1) + 1), static_cast<unsigned>(rng()));
  return buffer;
}

// The request id a response carries; empty for Health/Stats (and for an Error about an unread
// request).
const std::string& response_id(const protocol::ServerResponseMsg& message) {
  static const std::string kNone;
  return std::visit(
      [](const auto& m) -> const std::string& {
        using T = std::decay_t<decltype(m)>;
        if constexpr (std::is_same_v<T, protocol::Health> || std::is_same_v<T, protocol::Stats>) {
          return kNone;
        } else {
          return m.request_id;
        }
      },
      message);
}

[[noreturn]] void throw_server_error(const protocol::Error& error) {
  throw ClientError(error.code, error.request_id, error.message);
}

}  // namespace

ClientError::ClientError(std::optional<protocol::ErrorCode> error_code, std::string id,
                         const std::string& message)
    : std::runtime_error(describe(error_code, message)), code(error_code), request_id(std::move(id)) {}

Client::Client(const std::string& endpoint, ClientOptions options)
    : endpoint_(endpoint), options_(options), context_(1), socket_(context_, zmq::socket_type::dealer) {
  // linger 0: a client that gives up (timeout, exit) must not hang in close on unsent requests.
  socket_.set(zmq::sockopt::linger, 0);
  // A send blocks only when the queue to an absent server is full; bound that too.
  socket_.set(zmq::sockopt::sndtimeo, options_.timeout_ms);
  socket_.set(zmq::sockopt::rcvtimeo, options_.timeout_ms);
  try {
    socket_.connect(endpoint_);
  } catch (const zmq::error_t& e) {
    throw ClientError(std::nullopt, "", "cannot connect to '" + endpoint_ + "': " + e.what());
  }
}

void Client::send_frame(std::span<const uint8_t> frame, const std::string& request_id) {
  zmq::send_result_t sent;
  try {
    sent = socket_.send(zmq::const_buffer(frame.data(), frame.size()), zmq::send_flags::none);
  } catch (const zmq::error_t& e) {  // e.g. a signal interrupted the wait
    throw ClientError(std::nullopt, request_id, "sending to " + endpoint_ + " failed: " + e.what());
  }
  if (!sent) {
    throw ClientError(
        std::nullopt, request_id,
        "could not send to " + endpoint_ + " within " + std::to_string(options_.timeout_ms) + " ms");
  }
}

protocol::ServerResponseMsg Client::receive_for(const std::string& request_id) {
  zmq::message_t frame;
  zmq::recv_result_t received;
  try {
    received = socket_.recv(frame, zmq::recv_flags::none);
  } catch (const zmq::error_t& e) {
    throw ClientError(std::nullopt, request_id, "receiving from " + endpoint_ + " failed: " + e.what());
  }
  if (!received) {
    throw ClientError(
        std::nullopt, request_id,
        "no reply from " + endpoint_ + " within " + std::to_string(options_.timeout_ms) + " ms");
  }
  try {
    return protocol::decode_server_response({frame.data<uint8_t>(), frame.size()},
                                            protocol::DecodeLimits{options_.max_message_bytes});
  } catch (const protocol::ProtocolError& e) {
    throw ClientError(std::nullopt, request_id,
                      "undecodable reply from " + endpoint_ + ": " + std::string(e.what()));
  }
}

template <class Request>
void Client::send_request(const Request& request) {
  // The server validates too; checking here gives the same bad_request message without a round trip.
  try {
    protocol::validate(request);
  } catch (const protocol::ProtocolError& e) {
    throw ClientError(e.code, request.request_id, e.what());
  }
  send_frame(protocol::encode(protocol::ClientRequestMsg{request}), request.request_id);
}

protocol::ServerResponseMsg Client::reply_to(const std::string& id) {
  for (;;) {
    protocol::ServerResponseMsg reply = receive_for(id);
    if (auto* error = std::get_if<protocol::Error>(&reply)) {
      // An empty id means the server could not read the request; ours is the only one in flight.
      if (error->request_id == id || error->request_id.empty()) throw_server_error(*error);
      continue;
    }
    if (response_id(reply) == id) return reply;  // else stale: a reply to an earlier, abandoned request
  }
}

protocol::Final Client::generate(const protocol::GenerateRequest& request,
                                 const std::function<void(const protocol::Delta&)>& on_delta) {
  protocol::GenerateRequest to_send = request;
  if (to_send.request_id.empty()) to_send.request_id = fresh_request_id();
  send_request(to_send);
  for (;;) {
    protocol::ServerResponseMsg reply = reply_to(to_send.request_id);
    if (auto* delta = std::get_if<protocol::Delta>(&reply)) {
      if (on_delta) on_delta(*delta);
      continue;
    }
    if (auto* final_msg = std::get_if<protocol::Final>(&reply)) return std::move(*final_msg);
  }
}

template <class T>
T Client::control_reply() {
  for (;;) {
    protocol::ServerResponseMsg reply = receive_for("");
    if (auto* wanted = std::get_if<T>(&reply)) return std::move(*wanted);
    auto* error = std::get_if<protocol::Error>(&reply);
    // Errors with an id, Deltas and Finals belong to abandoned generate requests; a reply of the
    // other control kind to an abandoned control request. All are skipped.
    if (error != nullptr && error->request_id.empty()) throw_server_error(*error);
  }
}

protocol::Health Client::health() {
  send_frame(protocol::encode(protocol::ClientRequestMsg{protocol::HealthRequest{}}), "");
  return control_reply<protocol::Health>();
}

protocol::Stats Client::stats() {
  send_frame(protocol::encode(protocol::ClientRequestMsg{protocol::StatsRequest{}}), "");
  return control_reply<protocol::Stats>();
}

protocol::Health Client::shutdown() {
  send_frame(protocol::encode(protocol::ClientRequestMsg{protocol::ShutdownRequest{}}), "");
  return control_reply<protocol::Health>();
}

template <class Request>
std::vector<std::string> Client::change_adapters(Request request) {
  request.request_id = fresh_request_id();
  send_request(request);
  for (;;) {
    protocol::ServerResponseMsg reply = reply_to(request.request_id);
    if (auto* adapters = std::get_if<protocol::Adapters>(&reply)) return std::move(adapters->names);
  }
}

std::vector<std::string> Client::load_adapter(const std::string& name, const std::string& path, float scale) {
  return change_adapters(protocol::LoadAdapterRequest{"", name, path, scale});
}

std::vector<std::string> Client::unload_adapter(const std::string& name) {
  return change_adapters(protocol::UnloadAdapterRequest{"", name});
}

void Client::cancel(const std::string& request_id) { send_request(protocol::CancelRequest{request_id}); }

void Client::send_raw(std::span<const uint8_t> frame) { send_frame(frame, ""); }

protocol::ServerResponseMsg Client::receive() { return receive_for(""); }

}  // namespace nibble::cluster
