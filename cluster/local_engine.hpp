#pragma once
// Continuous batching in one process: the scheduler's step plans run on a local model, each request
// with its own sampler and completion state. The distributed service splits exactly this loop: the
// coordinator keeps the scheduler and request states, workers run the forward passes.
#include <cstdint>
#include <memory>
#include <unordered_map>
#include <vector>

#include "cluster/scheduler.hpp"
#include "kernels/thread_pool.hpp"
#include "model/tokenizer.hpp"
#include "speculative/rejection_sampler.hpp"
#include "speculative/speculator.hpp"
#include "worker/completion.hpp"
#include "worker/forward_model.hpp"
#include "worker/kv_cache.hpp"
#include "worker/llama_model.hpp"
#include "worker/sampler.hpp"

namespace nibble::cluster {

struct EngineRequest {
  uint64_t id = 0;
  std::vector<int32_t> prompt;  // token ids, BOS included if wanted
  worker::SamplingParams sampling;
  worker::CompletionLimits limits;
};

struct EngineResult {
  uint64_t id = 0;
  std::vector<int32_t> tokens;
  std::string text;
  worker::FinishReason finish = worker::FinishReason::length;
};

class LocalEngine {
 public:
  // speculator: optional draft side of speculative decoding (not owned); decode steps then verify
  // the draft's proposals with the exact acceptance rule.
  // model: the whole target on the CPU or a GPU (not owned).
  LocalEngine(worker::ForwardModel& model, const model::Tokenizer& tokenizer, const SchedulerConfig& config,
              speculative::Speculator* speculator = nullptr);
  // The same for a CPU model on `pool` (both not owned).
  LocalEngine(worker::LlamaModel& model, const model::Tokenizer& tokenizer, kernels::ThreadPool& pool,
              const SchedulerConfig& config, speculative::Speculator* speculator = nullptr);

  // Throws std::invalid_argument for impossible sampling parameters.
  Admission submit(EngineRequest request);
  bool cancel(uint64_t id);
  // Runs one step; returns the requests that finished in it.
  std::vector<EngineResult> step();
  bool idle() const { return states_.empty(); }
  const Scheduler& scheduler() const { return scheduler_; }

 private:
  struct RequestState {
    worker::Sampler sampler;
    worker::Completion completion;
    std::vector<int32_t> history;    // prompt and generated tokens, for the repetition penalty
    std::vector<float> draft_probs;  // [n_draft, n_vocab] q of the proposals in the scheduler
    // Or the same rows kept on the draft's GPU (draft_probs then empty until a host verification
    // needs them).
    std::shared_ptr<const worker::KeptRows> draft_kept;
  };
  // Adds accepted tokens to the request; true when it finished (then it is gone).
  bool deliver(uint64_t id, std::span<const int32_t> tokens, std::vector<EngineResult>& finished);
  // True when the draft proposed for at least one sequence.
  bool propose_drafts(const std::vector<uint64_t>& continuing);

  std::unique_ptr<worker::ForwardModel> owned_;  // the CPU constructor's wrapper
  worker::ForwardModel& model_;
  const model::Tokenizer& tokenizer_;
  Scheduler scheduler_;
  speculative::Speculator* speculator_;
  std::unique_ptr<worker::ForwardCache> cache_;
  std::unordered_map<uint64_t, std::unique_ptr<RequestState>> states_;
  std::vector<float> logits_;
  std::vector<int32_t> argmax_;  // per logit row, when every row is greedy or plain sampled (ids only)
  std::vector<worker::SamplingParams> sample_params_;  // per logit row of a sampled ids-only step
  // A step whose drafts the model verifies itself (ForwardModel::forward_verify): per sampled entry
  // its uniforms and results.
  std::vector<std::vector<double>> verify_uniforms_;
  std::vector<int32_t> verify_accepted_;
  std::vector<std::vector<int32_t>> verify_tokens_;
  std::vector<double> sample_uniforms_;
  worker::TokenHistories sample_histories_;  // the rows' tokens so far, for the repetition penalty
};

}  // namespace nibble::cluster
