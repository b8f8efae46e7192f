#pragma once
// World rank 0 of `nibble serve`: the only process that talks to clients. It reads requests from a
// ZeroMQ ROUTER socket, owns the scheduler (continuous batching, chunked prefill, the KV block
// tables) and every request's completion state, sends each step's plan to every worker, and turns
// the sampled tokens that come back from the last pipeline stage into streamed deltas and final
// responses. Up to `micro_batches` steps are in flight at once (each over different sequences),
// so pipeline stages work on different micro-batches at the same time.
//
// Every accepted request ends with exactly one Final or Error. When a worker is lost (the job is
// being torn down, or a step outlives server.step_timeout_ms) every request still open gets a
// worker_failed error and run() returns non-zero.
#include <chrono>
#include <cstdint>
#include <map>
#include <memory>
#include <random>
#include <string>
#include <unordered_map>
#include <vector>
#include <zmq.hpp>

#include "cluster/config/cluster_config.hpp"
#include "cluster/protocol/client_protocol.hpp"
#include "cluster/protocol/worker_protocol.hpp"
#include "cluster/scheduler.hpp"
#include "model/chat_template.hpp"
#include "model/llama_config.hpp"
#include "model/tokenizer.hpp"
#include "model/tool_calls.hpp"
#include "worker/completion.hpp"

namespace nibble::cluster {

struct CoordinatorSockets {
  zmq::socket_t* clients = nullptr;     // bound ROUTER
  std::vector<zmq::socket_t*> workers;  // connected PUSH, one per worker
  zmq::socket_t* results = nullptr;     // bound PULL the sampling worker pushes to
};

// How requests' conversations become prompts.
struct CoordinatorChat {
  // The model's chat format (nullopt: none Nibble writes; such requests are refused with `missing` as
  // the reason).
  std::optional<model::ChatFormat> format;
  std::string missing;
  // Its function-calling form (nullopt: requests with tools, calls or tool results are refused).
  std::optional<model::ToolPrompt> tools;
};

class Coordinator {
 public:
  Coordinator(const ClusterConfig& config, const model::Tokenizer& tokenizer, const model::LlamaConfig& model,
              const SchedulerConfig& scheduler, CoordinatorSockets sockets, std::string layout_description,
              CoordinatorChat chat = {});

  // Serves until a shutdown request (returns 0 once every rank has been told to stop) or a failure
  // (returns 1 after failing the open requests; the workers are not told: the caller ends the job).
  int run();

  // Set from a signal handler: the job is being torn down (e.g. mpirun saw a worker die).
  static void request_abort();

 private:
  using Clock = std::chrono::steady_clock;
  struct Request {
    std::string identity;  // ZeroMQ routing id of the client
    std::string request_id;
    bool stream = false;
    std::vector<int32_t> prompt;
    int32_t adapter = 0;  // its LoRA adapter (PlanEntry::adapter)
    protocol::SequenceSampling sampling;
    bool announced = false;  // sampling settings sent to the workers
    std::unique_ptr<worker::Completion> completion;
    size_t tokens_sent = 0;  // completion tokens already streamed
    Clock::time_point arrived, scheduled, first_token;
    bool was_scheduled = false, has_first_token = false;
    uint32_t cached_prompt_tokens = 0;             // prompt tokens its first step found in the prefix cache
    std::vector<protocol::TokenLogprob> logprobs;  // with logprobs asked for: one per completion token
    uint64_t draft_proposed = 0, draft_accepted = 0;  // speculative decoding
    // With prompt logprobs asked for: one per prompt token after the first, filled as steps bring them
    // (prompt_filled: how many from the start), and whether a stream's Delta has carried them.
    std::vector<protocol::TokenLogprob> prompt_logprobs;
    size_t prompt_filled = 0;
    bool prompt_logprobs_sent = false;
    bool score_only = false;  // max_tokens 0: the prompt's log-probabilities, nothing generated
    // With tools (and tool choice not none): the answer is read for calls at its end (call_required: it
    // was held to one), and a stream's text is held back from where a call may start (text_streamed:
    // the bytes of the completion's text streamed so far).
    const model::ToolPrompt* tools = nullptr;
    bool call_required = false;
    size_t text_streamed = 0;
  };

  // A LoRA adapter slot (PlanEntry::adapter = index + 1): the config's adapters first, then those loaded
  // while the job runs. A slot is free, loading (every worker was told to load it; its answers are
  // due), ready (requests may name it), or draining (unloaded while requests still use it: emptied on
  // the workers when the last ends).
  struct AdapterSlot {
    enum class State { free, loading, ready, draining };
    State state = State::free;
    std::string name;
    int32_t cache_root = 0;  // Scheduler::submit's adapter: a fresh one per load, so no prefix
                             // cached under an earlier adapter of the slot is ever matched
    int64_t users = 0;       // open requests that name it
    // loading: the client waiting for the answer, the workers' answers still due, the first failure.
    std::string identity, request_id;
    size_t reports_due = 0;
    std::string error;
  };

  int serve_loop();
  void handle_client_message();
  void handle_load_adapter(const std::string& identity, const protocol::LoadAdapterRequest& request);
  void handle_unload_adapter(const std::string& identity, const protocol::UnloadAdapterRequest& request);
  void handle_adapter_reports(const std::vector<protocol::AdapterReport>& reports);
  // A request naming `slot` ended: a draining slot that no request uses any more is emptied.
  void release_adapter(int32_t slot);
  // Tells every worker to empty `slot`, and frees it.
  void empty_adapter_slot(int32_t slot);
  std::vector<std::string> served_adapters() const;
  void handle_generate(const std::string& identity, const protocol::GenerateRequest& request);
  void handle_result(const protocol::StepResult& result);
  bool dispatch_step();
  void send_to_workers(const protocol::WorkerStep& step);
  void reply(const std::string& identity, const protocol::ServerResponseMsg& message);
  void reply_error(const std::string& identity, const std::string& request_id, protocol::ErrorCode code,
                   const std::string& message);
  void end_request(uint64_t seq, protocol::ErrorCode code, const std::string& message);
  void fail_all(protocol::ErrorCode code, const std::string& message);
  protocol::Stats stats() const;

  const ClusterConfig& config_;
  const model::Tokenizer& tokenizer_;
  CoordinatorChat chat_;
  std::mt19937_64 call_ids_{std::random_device{}()};  // names the answers' calls
  model::LlamaConfig model_;
  Scheduler scheduler_;
  CoordinatorSockets sockets_;
  std::string layout_description_;

  uint64_t next_seq_ = 1;
  uint64_t next_step_ = 1;
  std::unordered_map<uint64_t, Request> requests_;                 // by sequence id
  std::map<std::pair<std::string, std::string>, uint64_t> by_id_;  // (identity, request id) → sequence
  std::map<uint64_t, Clock::time_point> in_flight_;                // step id → sent at
  std::vector<uint64_t> released_;  // ended sequences the workers have not been told about
  bool shutting_down_ = false;
  std::string shutdown_identity_;
  uint64_t completed_ = 0, failed_ = 0, tokens_generated_ = 0;
  uint64_t draft_proposed_ = 0, draft_accepted_ = 0;
  uint64_t prompt_tokens_ = 0, cached_prompt_tokens_ = 0;  // requests' prompts at their first step
  std::vector<AdapterSlot> adapters_;                      // by PlanEntry::adapter - 1
  int32_t next_cache_root_ = 1;
};

}  // namespace nibble::cluster
