#pragma once
// `nibble openai`: an OpenAI-compatible HTTP server in front of a `nibble serve` coordinator, so the
// tools written for vLLM's and llama.cpp's servers (the openai Python package, curl, benchmark
// harnesses) work with Nibble. It is a client of the coordinator like any other: every HTTP request
// becomes one GenerateRequest over ZeroMQ (cluster/client), its answer one JSON body or a stream of
// server-sent events (cluster/openai_api translates both ways).
//
//   GET  /health               200 when the coordinator answers ok, else 503
//   GET  /v1/models            the model, by its configured name, and the LoRA adapters served on it
//   POST /v1/load_lora_adapter, /v1/unload_lora_adapter  vLLM's (the coordinator's server.lora_updates)
//   GET  /metrics              the coordinator's counters and the gateway's answers, for Prometheus
//   POST /tokenize, /detokenize  the model's tokenizer (with one: --tokenizer, or in `nibble serve`)
//   POST /v1/completions       prompt text or token ids
//   POST /v1/chat/completions  messages, formatted by the coordinator with the model's chat template
#include <cstdint>
#include <memory>
#include <string>

#include "cluster/openai_api.hpp"

namespace nibble::cluster {

struct OpenAiServerOptions {
  std::string coordinator = "tcp://127.0.0.1:5555";  // the coordinator's ZeroMQ address
  std::string host = "127.0.0.1";
  int port = 8000;          // 0: any free port (bind() returns it)
  int threads = 16;         // HTTP requests served at once (each holds one coordinator connection)
  int timeout_ms = 600000;  // longest silence from the coordinator within one request
  size_t max_body_bytes = size_t{16} << 20;
  // Non-empty: /v1/* and /tokenize, /detokenize answer 401 unless the request carries
  // "Authorization: Bearer <api_key>" (vLLM's --api-key); /health and /metrics stay open.
  std::string api_key;
  openai::ApiSettings api;
};

class OpenAiServer {
 public:
  explicit OpenAiServer(OpenAiServerOptions options);
  ~OpenAiServer();
  OpenAiServer(const OpenAiServer&) = delete;
  OpenAiServer& operator=(const OpenAiServer&) = delete;

  // Binds the listening socket; returns the port. Throws std::runtime_error naming the address when
  // it cannot.
  int bind();
  // Serves until stop() (from another thread or a signal-handling thread); bind() first.
  void run();
  // Stops accepting, and ends the requests still waiting on the coordinator with a transport error (so
  // run() returns at once even when the coordinator is gone).
  void stop();

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace nibble::cluster
