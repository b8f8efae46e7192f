#pragma once
// The loop of one worker process of `nibble serve`: receive the coordinator's WorkerSteps on a
// ZeroMQ PULL socket, run this rank's share of the forward pass (its tensor shard of its pipeline
// stage's layers), hand hidden states to the next stage over the pipeline communicator, and, on
// the sampling rank (tensor rank 0 of the last stage), sample every requested row with that
// sequence's own seeded sampler and push a StepResult back to the coordinator.
//
// Steps are processed strictly in arrival order on every rank, which is what keeps the tensor
// group's collectives and the stage-to-stage sends matched without any extra handshakes.
#include <cstdint>
#include <memory>
#include <optional>
#include <unordered_map>
#include <utility>
#include <vector>
#include <zmq.hpp>

#include "cluster/protocol/worker_protocol.hpp"
#include "cluster/worker_stage.hpp"
#include "parallel/communicator.hpp"
#include "speculative/speculator.hpp"
#include "worker/gbnf_grammar.hpp"
#include "worker/json_constraint.hpp"
#include "worker/sampler.hpp"

namespace nibble::cluster {

class WorkerService {
 public:
  // stage: this rank's shard and stage with its KV cache, on the CPU or a GPU (not owned; its cache
  // has the coordinator's KV block geometry: every worker holds the same block ids for its layers).
  // pipeline: the group of this tensor rank across stages (rank = stage), null when there is one
  // stage; a host communicator (the hidden states travel in host memory). steps: connected PULL
  // socket. results: connected PUSH socket on the sampling rank, null elsewhere.
  // speculator: the draft side of speculative decoding, on the sampling rank only (null elsewhere
  // and when no draft is configured): entries with n_draft > 0 are verified with the exact rule,
  // and every sampled sequence gets its next proposals in the result.
  // json: the vocabulary's JSON-object constraint (on the sampling rank; null elsewhere): sequences with
  // response_format json_object are sampled from their logits with what cannot continue their object
  // masked out (and never speculate). A step with such a sequence and no constraint fails. Its
  // end-of-generation tokens are also what min_tokens masks (with the sequence's stop tokens).
  // grammar: the same vocabulary's grammar constraint, for response_format grammar.
  WorkerService(WorkerStage& stage, parallel::Communicator* pipeline, zmq::socket_t& steps,
                zmq::socket_t* results, speculative::Speculator* speculator = nullptr,
                std::shared_ptr<const worker::JsonConstraint> json = nullptr,
                std::shared_ptr<const worker::GrammarConstraint> grammar = nullptr);

  // Where this worker answers a step's adapter loads (WorkerStep::adapter_changes) from: its world
  // rank, on a PUSH connected to the coordinator's results socket (the sampling rank's `results` may be
  // it). Without one a load is still done, and a failed load throws.
  void report_adapters_to(zmq::socket_t& socket, int world_rank) {
    reports_ = &socket;
    world_rank_ = world_rank;
  }

  // Runs steps until a shutdown step. Throws on any failure (the caller ends the whole job: a rank
  // that stops mid-step would leave its peers waiting in a collective).
  void run();

  // One step (exposed for tests): returns the result the sampling rank sends (empty elsewhere).
  protocol::StepResult execute(const protocol::WorkerStep& step);
  // A step's adapter changes, in order: the answers to its loads (an unload is not answered).
  std::vector<protocol::AdapterReport> change_adapters(const std::vector<protocol::AdapterChange>& changes);

 private:
  struct SequenceState {
    explicit SequenceState(worker::Sampler s) : sampler(std::move(s)) {}
    worker::Sampler sampler;
    std::vector<int32_t> history;    // every token fed so far, by position (for the repetition penalty)
    std::vector<float> draft_probs;  // [proposals, n_vocab] q of the last proposals sent
    // Or the same rows kept on the draft's GPU (draft_probs then empty until a host verification
    // needs them).
    std::shared_ptr<const worker::KeptRows> draft_kept;
    int logprobs = 0;          // top tokens to report with each sampled token's log-probability; 0: none
    int prompt_logprobs = -1;  // top tokens to report with each prompt token's; -1: none
    // response_format json_object or json_schema: the output so far (and the schema it follows).
    std::optional<worker::JsonPrefix> json;
    std::shared_ptr<const worker::JsonSchema> schema;
    // response_format grammar: the output so far (and the grammar it follows).
    std::optional<worker::GrammarPrefix> grammar_state;
    std::shared_ptr<const worker::Grammar> grammar;
    bool masked() const { return json || grammar_state; }
    // vLLM's min_tokens: end-of-generation and stop tokens masked until `generated` reaches it.
    uint32_t min_tokens = 0;
    std::vector<int32_t> stop_token_ids;
    int64_t generated = 0;
    bool holds_back_ends() const { return generated < static_cast<int64_t>(min_tokens); }
  };

  WorkerStage& model_;
  parallel::Communicator* pipeline_;
  zmq::socket_t& steps_;
  zmq::socket_t* results_;
  zmq::socket_t* reports_ = nullptr;  // report_adapters_to's
  int world_rank_ = 0;
  speculative::Speculator* speculator_;
  std::shared_ptr<const worker::JsonConstraint> json_;
  std::shared_ptr<const worker::GrammarConstraint> grammar_;
  std::vector<float> masked_;  // a constrained row's logits, masked
  std::unordered_map<uint64_t, std::unique_ptr<SequenceState>> sequences_;
  std::vector<float> hidden_in_, out_;
  std::vector<int32_t> argmax_;  // per logit row, when every row is greedy or plain sampled (ids only)
  std::vector<worker::SamplingParams> sample_params_;  // per logit row of a sampled ids-only step
  std::vector<double> sample_uniforms_;
  worker::TokenHistories sample_histories_;  // the rows' tokens so far, for the repetition penalty
  // A step verified on the model (WorkerStage::forward_stage_verify): per sampled entry its k + 1 uniforms,
  // then the accepted count and tokens.
  std::vector<std::vector<double>> verify_uniforms_;
  std::vector<int32_t> verify_accepted_;
  std::vector<std::vector<int32_t>> verify_tokens_;
};

}  // namespace nibble::cluster
