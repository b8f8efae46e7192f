#pragma once
// The C++ client of a `nibble serve` coordinator: one ZeroMQ DEALER socket, one request in flight
// at a time, replies matched by request id. A Client is used from one thread; for concurrency make
// one Client per thread (each has its own ZeroMQ context and socket, so nothing is shared).
//
// Transport: the coordinator binds a ROUTER socket; every request is ONE frame holding one encoded
// ClientRequest (no empty delimiter frame), every reply is one frame holding one ServerResponse.
#include <cstddef>
#include <cstdint>
#include <functional>
#include <optional>
#include <span>
#include <stdexcept>
#include <string>
#include <zmq.hpp>

#include "cluster/protocol/client_protocol.hpp"

namespace nibble::cluster {

struct ClientOptions {
  // Longest wait for any single reply message (the first Delta, each next one, the Final, a Health
  // ...). It bounds silence, not the whole request: a long streamed generation never times out as
  // long as tokens keep coming. Also bounds a send blocked by a full queue.
  int timeout_ms = 60000;
  // Replies above this size are refused (a ClientError) instead of decoded. Checked after receipt:
  // it guards against a confused peer's garbage, not against a hostile server's memory attack.
  size_t max_message_bytes = size_t{64} << 20;
};

// A request that did not succeed. `code` is the server's Error code, or nullopt for a transport
// failure on this side (no reply in time, a send that could not be queued, an undecodable reply).
class ClientError : public std::runtime_error {
 public:
  // what() is "<code name>: <message>" for server errors (e.g. "cancelled: request cancelled"),
  // just `message` for transport failures.
  ClientError(std::optional<protocol::ErrorCode> error_code, std::string id, const std::string& message);

  std::optional<protocol::ErrorCode> code;
  std::string request_id;  // the request it concerns; empty for control requests and unread frames
};

class Client {
 public:
  // Connects (asynchronously: a server that is not up yet is fine until the first reply is due).
  // `endpoint` is a ZeroMQ address, e.g. "tcp://127.0.0.1:5555".
  explicit Client(const std::string& endpoint, ClientOptions options = {});

  Client(const Client&) = delete;
  Client& operator=(const Client&) = delete;

  // Sends `request` and waits for its Final. Every Delta for this request is passed to `on_delta`
  // in arrival order (when set; streamed requests only get Deltas). Messages for other request ids
  // (late replies of an earlier request that timed out) are skipped. An empty request_id is replaced
  // by a fresh unique one; the Final carries the id used.
  // Throws ClientError: the server's Error for this request (code set; also a bad_request found by
  // local validation before sending), or a transport failure (code nullopt).
  protocol::Final generate(const protocol::GenerateRequest& request,
                           const std::function<void(const protocol::Delta&)>& on_delta = {});

  // Control requests; each waits for its one reply. An Error reply throws ClientError.
  protocol::Health health();
  protocol::Stats stats();
  // Asks the server to stop after answering: the reply is a Health (ok=true, "shutting down").
  protocol::Health shutdown();
  // Serves a LoRA adapter under `name` from now on, or stops serving one (where the job allows it:
  // server.lora_updates); returns the adapters served after the change. A load waits until every
  // worker has read the file. Throws ClientError as generate() does.
  std::vector<std::string> load_adapter(const std::string& name, const std::string& path, float scale = 1.0f);
  std::vector<std::string> unload_adapter(const std::string& name);

  // Fire and forget: the cancelled request ends with an Error(cancelled) sent to whichever client
  // made it; the cancel itself gets no reply.
  void cancel(const std::string& request_id);

  // From any thread: the call in progress on this client, and every later one, fails at once with a
  // ClientError (transport) instead of waiting for a reply. For a process that stops (the HTTP gateway
  // of a `nibble serve` that shuts down); the client is unusable after it.
  void interrupt() { context_.shutdown(); }

  // Raw access, for tests that send malformed frames: `frame` goes out as one ZeroMQ frame as is;
  // receive() returns the next reply of any kind (throws ClientError on timeout or an undecodable
  // frame).
  void send_raw(std::span<const uint8_t> frame);
  protocol::ServerResponseMsg receive();

  const std::string& endpoint() const { return endpoint_; }
  const ClientOptions& options() const { return options_; }

 private:
  // Sends one encoded request; throws ClientError when it cannot be queued within the timeout.
  void send_frame(std::span<const uint8_t> frame, const std::string& request_id);
  // The next reply, waiting at most timeout_ms; throws ClientError (nullopt) on timeout.
  protocol::ServerResponseMsg receive_for(const std::string& request_id);
  // Waits for a reply of type T to a control request, skipping stale request-scoped messages.
  template <class T>
  T control_reply();
  // Validates a request (a bad_request without a round trip) and sends it under its id.
  template <class Request>
  void send_request(const Request& request);
  // The next reply to request `id`: its Error thrown (also an Error about an unread request, ours being
  // the only one in flight); replies to earlier, abandoned requests skipped.
  protocol::ServerResponseMsg reply_to(const std::string& id);
  // Sends an adapter request (its id filled in) and waits for the Adapters answering it.
  template <class Request>
  std::vector<std::string> change_adapters(Request request);

  std::string endpoint_;
  ClientOptions options_;
  zmq::context_t context_;
  zmq::socket_t socket_;
};

}  // namespace nibble::cluster
