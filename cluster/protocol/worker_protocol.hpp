#pragma once
// The coordinator ↔ worker control plane in plain C++ (worker.capnp): the step every worker runs,
// the tokens the sampling worker sends back, and the sampling worker's exchange with a draft on a
// rank of its own. Decoding uses the same frame checks and capnp limits
// as the client protocol; failures throw ProtocolError(malformed_message | message_too_large).
#include <cstdint>
#include <span>
#include <string>
#include <vector>

#include "cluster/protocol/client_protocol.hpp"

namespace nibble::protocol {

struct SequenceSampling {
  uint64_t seq_id = 0;
  float temperature = 0.0f;
  int32_t top_k = 0;
  float top_p = 1.0f;
  float min_p = 0.0f;
  float repetition_penalty = 1.0f;
  int32_t repeat_last_n = 64;
  uint64_t seed = 0;
  uint32_t logprobs = 0;  // 0: none; else each sampled token's log-probability and this many top tokens'
  float presence_penalty = 0.0f;
  float frequency_penalty = 0.0f;
  std::vector<TokenBias> logit_bias{};
  // -1: none; 0..kMaxLogprobs: prompt tokens' log-probabilities (PlanEntry::prompt_targets) with this
  // many top tokens' each.
  int32_t prompt_logprobs = -1;
  ResponseFormat response_format = ResponseFormat::text;  // json_object, json_schema: masked to one
  std::string json_schema{};                              // with json_schema: the schema
  // End-of-generation and these tokens are masked before min_tokens generated tokens.
  uint32_t min_tokens = 0;
  std::vector<int32_t> stop_token_ids{};
  std::string grammar{};  // with ResponseFormat::grammar: the GBNF grammar
  bool operator==(const SequenceSampling&) const = default;
};

struct PlanEntry {
  uint64_t seq_id = 0;
  int32_t table_row = 0;
  int32_t start_pos = 0;
  std::vector<int32_t> tokens;
  bool sample = false;
  int32_t n_draft = 0;  // the last n_draft tokens are proposals to verify
  // A sequence's first entry after a cached prefix (the scheduler's prefix caching): the tokens at
  // positions 0 .. start_pos - 1, whose K/V its blocks already hold; the sampling worker's history
  // (repetition penalty, the draft's tokens) starts with them. Empty otherwise.
  std::vector<int32_t> cached_prefix{};
  // Prompt logprobs: the prompt tokens the entry's first rows predict (row i: the token at position
  // start_pos + i + 1), so those rows' logits are computed and each target's log-probability comes back
  // in StepResult::prompts. At most tokens.size() (one fewer when the entry samples); no drafts.
  std::vector<int32_t> prompt_targets{};
  // 0: the base model; i > 0: the service's LoRA adapter i (ClusterConfig::lora_adapters[i - 1]).
  int32_t adapter = 0;
  bool operator==(const PlanEntry&) const = default;
};

// A LoRA adapter loaded into slot `slot` (path non-empty) or that slot emptied (path empty), before a
// step's entries.
struct AdapterChange {
  int32_t slot = 0;  // PlanEntry::adapter's index, >= 1
  std::string path;
  float scale = 1.0f;
  bool operator==(const AdapterChange&) const = default;
};

// A worker's answer to an adapter load (error empty: loaded).
struct AdapterReport {
  int32_t slot = 0;
  int32_t rank = 0;  // the worker's world rank
  std::string error;
  bool operator==(const AdapterReport&) const = default;
};

struct WorkerStep {
  uint64_t step_id = 0;
  bool shutdown = false;
  std::vector<SequenceSampling> new_sequences;
  std::vector<uint64_t> released;
  std::vector<PlanEntry> entries;
  std::vector<int32_t> block_tables;  // [entries.size(), max_blocks_per_seq]
  uint32_t max_blocks_per_seq = 0;
  // Done first, in order. A step of only these has step_id 0: it runs no batch and gets no StepResult.
  std::vector<AdapterChange> adapter_changes{};
  bool operator==(const WorkerStep&) const = default;
};

struct SampledToken {
  uint64_t seq_id = 0;
  int32_t token = 0;                     // sampled after the accepted drafts
  std::vector<int32_t> accepted_drafts;  // verified proposals, before `token`
  int32_t proposed = 0;                  // proposals the step verified
  std::vector<int32_t> draft;            // new proposals for the next step
  // With SequenceSampling::logprobs: one per accepted draft, then the token's.
  std::vector<TokenLogprob> logprobs{};
  bool operator==(const SampledToken&) const = default;
};

// An entry's prompt logprobs: logprobs[i] is the prompt token at start_pos + i + 1's, given those before.
struct PromptLogprobs {
  uint64_t seq_id = 0;
  int32_t start_pos = 0;
  std::vector<TokenLogprob> logprobs;
  bool operator==(const PromptLogprobs&) const = default;
};

struct StepResult {
  uint64_t step_id = 0;
  std::vector<SampledToken> sampled;
  std::vector<PromptLogprobs> prompts{};  // one per entry with prompt_targets, in entry order
  // step_id 0: a worker's answers to a step's adapter loads (every worker sends its own).
  std::vector<AdapterReport> adapter_reports{};
  bool operator==(const StepResult&) const = default;
};

// Sampling worker <-> a draft on a rank of its own (draft.placement: own_rank).
struct DraftSequence {
  SequenceSampling sampling;    // sampling.seq_id names the sequence
  uint32_t keep = 0;            // tokens of this sequence's previous request that still hold
  std::vector<int32_t> tokens;  // its tokens after those
  int32_t k = 0;                // proposals wanted
  bool operator==(const DraftSequence&) const = default;
};

struct DraftRequest {
  bool shutdown = false;
  std::vector<uint64_t> released;
  std::vector<DraftSequence> sequences;
  bool operator==(const DraftRequest&) const = default;
};

struct DraftProposal {
  uint64_t seq_id = 0;
  std::vector<int32_t> tokens;
  std::vector<float> probs;  // [tokens, n_vocab]; empty at temperature 0
  bool operator==(const DraftProposal&) const = default;
};

struct DraftReply {
  std::vector<DraftProposal> proposals;
  std::string error;  // non-empty: the draft rank failed
  bool operator==(const DraftReply&) const = default;
};

std::vector<uint8_t> encode(const WorkerStep& step);
std::vector<uint8_t> encode(const StepResult& result);
std::vector<uint8_t> encode(const DraftRequest& request);
std::vector<uint8_t> encode(const DraftReply& reply);

// A step carries block tables and prompt chunks, so its limit is larger than a client message's.
inline constexpr size_t kMaxWorkerMessageBytes = size_t{256} << 20;

WorkerStep decode_worker_step(std::span<const uint8_t> frame, size_t max_bytes = kMaxWorkerMessageBytes);
StepResult decode_step_result(std::span<const uint8_t> frame, size_t max_bytes = kMaxWorkerMessageBytes);
DraftRequest decode_draft_request(std::span<const uint8_t> frame, size_t max_bytes = kMaxWorkerMessageBytes);
DraftReply decode_draft_reply(std::span<const uint8_t> frame, size_t max_bytes = kMaxWorkerMessageBytes);

}  // namespace nibble::protocol
