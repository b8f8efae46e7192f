#pragma once
// The policy side of speculative decoding: how many tokens the draft proposes for each sequence,
// and whether speculation is on at all at a given batch size. It decides k per sequence from that
// sequence's running acceptance rate and the batch size, switches speculation off where it cannot
// pay, and keeps the acceptance statistics. The draft itself runs behind a DraftProposer: in this
// process (LocalDraft) or in a rank of its own (cluster/remote_draft.hpp).
#include <cstdint>
#include <memory>
#include <span>
#include <unordered_map>
#include <vector>

#include "kernels/thread_pool.hpp"
#include "speculative/draft_proposer.hpp"
#include "worker/forward_model.hpp"
#include "worker/kv_cache.hpp"
#include "worker/llama_model.hpp"
#include "worker/sampler.hpp"

namespace nibble::speculative {

// Measured forward-pass times of the target and the draft for n tokens in one batch, which is what
// decides whether speculation pays: verifying k drafts for each of B sequences costs a target pass
// over B(k + 1) tokens plus k draft passes over B tokens, against B tokens from one plain pass.
// On a memory-bound GPU t(B(k + 1)) is barely more than t(B); on a CPU it grows quickly with the
// token count, so the same draft pays at batch 1 and not at batch 32.
struct CostModel {
  std::vector<std::pair<int64_t, double>> target, draft;  // (tokens, seconds), tokens increasing

  double target_seconds(int64_t tokens) const { return interpolate(target, tokens); }
  double draft_seconds(int64_t tokens) const { return interpolate(draft, tokens); }
  bool empty() const { return target.empty() || draft.empty(); }

  // Times forward passes of 1, 2, 4, ... max_tokens tokens (one sequence, after a 64-token
  // context; the two models alternately, the fastest of several runs each, made non-decreasing in
  // the token count) on scratch KV caches. Takes well under a second for models that fit a CPU test.
  // The models may run on the CPU or a GPU (a GPU pass is timed to its completion: its logits come
  // back to the host).
  static CostModel measure(worker::ForwardModel& target, worker::ForwardModel& draft, int64_t max_tokens);
  static CostModel measure(worker::LlamaModel& target, worker::LlamaModel& draft, kernels::ThreadPool& pool,
                           int64_t max_tokens);
  // The same for one model (for a target and a draft that run in different processes).
  static std::vector<std::pair<int64_t, double>> measure_model(worker::ForwardModel& model,
                                                               int64_t max_tokens);
  static std::vector<std::pair<int64_t, double>> measure_model(worker::LlamaModel& model,
                                                               kernels::ThreadPool& pool, int64_t max_tokens);

 private:
  static double interpolate(const std::vector<std::pair<int64_t, double>>& points, int64_t tokens);
};

struct SpeculatorSettings {
  int max_draft_tokens = 4;  // k never exceeds this
  int64_t num_blocks = 0;    // the draft cache's own budget
  int64_t block_size = 16;
  // Decode batches larger than this do not speculate: the target's verification of k + 1 tokens per
  // sequence then costs about as much as k + 1 plain steps (see docs/perf/speculative.md).
  int max_batch = 16;
  bool adaptive = true;  // false: always propose max_draft_tokens (tests, measurements)
  // Measured costs (see CostModel); when empty, a draft token is assumed to cost draft_cost and
  // each extra verified token verify_cost of one target decode step.
  CostModel costs;
  double draft_cost = 0.2;
  double verify_cost = 0.15;
};

struct SpeculatorStats {
  uint64_t steps = 0;     // verifications
  uint64_t proposed = 0;  // draft tokens proposed
  uint64_t accepted = 0;  // draft tokens accepted
};

class Speculator {
 public:
  // draft: the draft model run in this process (a LocalDraft over it, with settings.num_blocks
  // blocks of its own; not owned). Its vocabulary must already have been checked against the
  // target's (vocab_match.hpp).
  Speculator(worker::LlamaModel& draft, kernels::ThreadPool& pool, SpeculatorSettings settings);
  // The same for a draft on the CPU or a GPU (worker/forward_model.hpp; not owned).
  Speculator(worker::ForwardModel& draft, SpeculatorSettings settings);
  // drafts: where proposals come from, e.g. a draft on a rank of its own (not owned).
  Speculator(DraftProposer& drafts, SpeculatorSettings settings);

  // One proposal per request with k > 0, in request order.
  std::vector<Proposal> propose(const std::vector<ProposalRequest>& requests);

  // k for this sequence's next step, given how many sequences decode in the batch: 0 when
  // speculation does not pay. Greedy requests (temperature 0) also follow enabled_for(), which is
  // measured and so depends on timing: harmless, their tokens do not depend on k. A sampled request
  // decides from its own acceptance history alone (the cost model at batch 1), because its tokens
  // do depend on k: so the same seed gives the same tokens whatever else is batched with it. Adaptive: picks
  // the k that maximizes expected tokens per second, B E(k) / (t_target(B (k + 1)) + k t_draft(B)) with E(k)
  // = (1 - a^(k+1)) / (1 - a) for the sequence's acceptance rate a (an exponential average, starting at 0.5),
  // against B / t_target(B) without speculation (a 5% margin decides near break-even for plain decoding). A
  // sequence that is off probes with k = 1 every 16th step, so a rate that improves is noticed.
  int choose_k(uint64_t seq_id, const worker::SamplingParams& sampling, int64_t decode_batch);
  // The measured check on the cost model, per decode-batch size (powers of two): false while
  // speculation has measured slower per generated token than plain decoding at this batch size.
  // Both modes are tried first (a few steps each) and re-tried now and then, so a change in the
  // workload is noticed; where the cost model says speculation cannot pay even for a draft right
  // 90% of the time, it starts off and is only re-tried. Call once per step, before proposing; when false,
  // propose nothing.
  bool enabled_for(int64_t decode_batch);
  // Reports a decode step (no prompt chunks) as the engine saw it: wall seconds from planning to
  // the end of the next proposals, and the tokens it produced; `speculative` when it verified drafts.
  void observe_step(int64_t decode_batch, bool speculative, double seconds, int64_t tokens);
  // Records a verification's outcome (updates the sequence's acceptance rate and the totals).
  void record(uint64_t seq_id, int proposed, int accepted);
  // Forgets a sequence (its draft blocks return to the pool).
  void release(uint64_t seq_id);

  const SpeculatorStats& stats() const { return stats_; }
  const SpeculatorSettings& settings() const { return settings_; }

 private:
  struct SequenceState {
    double acceptance = 0.5;  // per-token acceptance rate, exponential average
    uint64_t steps_off = 0;
  };
  // Expected tokens per second relative to plain decoding (1.0) when proposing k tokens to
  // sequences with this acceptance rate in a decode batch of this size.
  double gain(double acceptance, int64_t decode_batch, int k) const;
  // Whether the cost model leaves any k that pays at this batch size for a draft that is right
  // kPromisingAcceptance of the time.
  bool promising(int64_t decode_batch) const;
  static constexpr double kMinGain = 1.05;  // a clear gain only: near break-even, plain decoding wins
  static constexpr double kPromisingAcceptance = 0.9;
  static constexpr int kWarmSteps = 4;  // steps of each mode before the measured switch decides
  static constexpr uint64_t kUnpromisingRetryInterval = 512;  // first re-try where the model says no

  struct Measured {
    double seconds_per_token[2] = {0, 0};  // exponential averages: [plain, speculative]
    int samples[2] = {0, 0};
    uint64_t steps_seen = 0;       // enabled_for calls
    uint64_t steps = 0;            // since the last re-try
    uint64_t retry_interval = 64;  // steps between re-tries of the slower mode
    bool retrying = false, retry_mode = false;
    bool enabled = true;  // the mode of the next step
  };
  Measured& bucket(int64_t decode_batch);
  std::vector<Measured> buckets_;

  std::unique_ptr<DraftProposer> owned_drafts_;  // the LocalDraft of the first constructor
  DraftProposer& drafts_;
  SpeculatorSettings settings_;
  std::unordered_map<uint64_t, SequenceState> sequences_;  // sequences that have had proposals
  SpeculatorStats stats_;
};

}  // namespace nibble::speculative
