#pragma once
// The coordinator's scheduler: continuous batching over a paged KV cache. Every step it builds one
// plan that mixes decode tokens of running sequences with chunks of prompts (chunked prefill) under
// a token budget; requests join and leave between steps. When KV blocks run out the newest running
// sequences are preempted (their blocks freed, recomputed later), never dropped. With prefix caching
// (cluster/kv_block_pool.hpp) a sequence admitted to the batch starts after the longest prefix of its
// tokens whose KV blocks are cached, shared with the sequences that computed them.
#include <cstdint>
#include <deque>
#include <optional>
#include <unordered_map>
#include <unordered_set>
#include <vector>

#include "cluster/kv_block_pool.hpp"

namespace nibble::cluster {

struct SchedulerConfig {
  int64_t max_batch_tokens = 512;  // tokens per step, decode and prefill together
  int64_t max_running = 64;        // sequences in the running batch
  int64_t prefill_chunk = 256;     // prompt tokens of one sequence per step
  int64_t max_queue = 256;         // waiting requests before "overloaded"
  int64_t block_size = 16;
  int64_t num_blocks = 0;      // KV blocks in every worker's cache
  int64_t context = 4096;      // prompt + generated tokens of one sequence
  bool prefix_caching = true;  // share the KV blocks of computed prompt prefixes (KvBlockPool)
};

// One sequence's part of a step: tokens at positions start_pos.. of the sequence whose block table
// is row `table_row` of the plan's block_tables.
struct StepEntry {
  uint64_t seq_id = 0;
  int32_t table_row = 0;
  int32_t start_pos = 0;
  std::vector<int32_t> tokens;
  bool sample = false;  // this chunk reaches the sequence's last known token: sample the next one
  // Speculative decoding: the last n_draft tokens are a draft's proposals after the sequence's last
  // known token; logits are wanted for the last n_draft + 1 positions (verify, then accept_tokens).
  int32_t n_draft = 0;
};

struct StepPlan {
  std::vector<StepEntry> entries;
  std::vector<int32_t> block_tables;  // [entries.size(), max_blocks_per_seq], -1 padded
  int64_t max_blocks_per_seq = 0;
  std::vector<uint64_t> preempted;  // sequences pushed back to the queue while planning
  int64_t n_tokens() const;
};

enum class Admission { accepted, overloaded, too_long, invalid };

class Scheduler {
 public:
  explicit Scheduler(const SchedulerConfig& config);

  // Queues a request. too_long: prompt + max_new_tokens exceeds the context or could never fit in
  // the KV cache; invalid: empty prompt or duplicate id. reuse_prefix false: the sequence computes its
  // whole prompt, never starting after a cached prefix (its prompt tokens' logits are wanted); the
  // blocks it computes are still shared with later ones.
  // adapter: the sequence's LoRA adapter (0: none), whose cached blocks alone it may share.
  Admission submit(uint64_t seq_id, std::vector<int32_t> prompt, int32_t max_new_tokens,
                   bool reuse_prefix = true, int32_t adapter = 0);
  // Removes a sequence wherever it is and frees its blocks. False when unknown.
  bool cancel(uint64_t seq_id);
  // Same as cancel, for sequences that ended normally (EOS, stop, length).
  bool finish(uint64_t seq_id) { return cancel(seq_id); }
  // The next step, or nullopt when nothing can run.
  std::optional<StepPlan> next_step();
  // Appends the token sampled for an entry with `sample` set.
  void append_token(uint64_t seq_id, int32_t token);
  // Speculative decoding: tokens a draft proposed after the sequence's last token. Its next decode
  // entry carries as many of them as the token budget, its length limit and the free blocks allow.
  // Replaces any earlier proposal; dropped when the sequence is preempted.
  void set_draft(uint64_t seq_id, std::vector<int32_t> draft);
  // Ends the step of an entry with n_draft > 0: its first `accepted` draft tokens were confirmed and
  // `next` was sampled after them. The cache positions of rejected drafts are given up (whole
  // blocks return to the pool) and are overwritten by later steps.
  void accept_tokens(uint64_t seq_id, int32_t accepted, int32_t next);
  // True while a planned step will sample this sequence's next token and append_token (or finish)
  // has not yet been called. Such a sequence is left out of further plans and never preempted, so
  // a pipeline can have several steps in flight (each over different sequences) without a step
  // depending on a token not yet sampled.
  bool awaiting_token(uint64_t seq_id) const { return awaiting_.count(seq_id) != 0; }

  int64_t waiting() const { return static_cast<int64_t>(waiting_.size()); }
  int64_t running() const { return static_cast<int64_t>(running_.size()); }
  // Blocks a sequence can take now (free, or cached and held by no sequence: evicted on demand).
  int64_t free_blocks() const { return blocks_.available(); }
  // Cached prefix blocks no sequence holds (part of free_blocks).
  int64_t idle_cached_blocks() const { return blocks_.idle_cached(); }
  int64_t total_blocks() const { return config_.num_blocks; }
  // Tokens (prompt + generated) the sequence holds; -1 when unknown.
  int64_t sequence_length(uint64_t seq_id) const;

 private:
  struct Sequence {
    std::vector<int32_t> tokens;  // prompt, then generated tokens
    int64_t computed = 0;         // leading tokens whose K/V is in the cache
    int32_t max_new_tokens = 0;
    std::vector<int32_t> blocks;
    uint64_t arrival = 0;          // admission order: lower is older
    int64_t limit = 0;             // prompt + max_new_tokens: the longest the sequence may grow
    std::vector<int32_t> draft;    // proposals not yet planned
    std::vector<int32_t> planned;  // proposals in the step in flight
    bool reuse_prefix = true;      // may start after a cached prefix
    int32_t adapter = 0;           // its LoRA adapter: prefixes are shared within one adapter
  };
  void preempt(uint64_t seq_id);

  SchedulerConfig config_;
  KvBlockPool blocks_;
  std::unordered_map<uint64_t, Sequence> sequences_;
  std::deque<uint64_t> waiting_;   // front runs first
  std::vector<uint64_t> running_;  // oldest first
  std::unordered_set<uint64_t> awaiting_;
  uint64_t next_arrival_ = 0;
};

}  // namespace nibble::cluster
