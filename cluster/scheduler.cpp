#include "cluster/scheduler.hpp"

#include <algorithm>
#include <optional>
#include <span>
#include <stdexcept>

namespace nibble::cluster {

int64_t StepPlan::n_tokens() const {
  int64_t n = 0;
  for (const StepEntry& e : entries) n += static_cast<int64_t>(e.tokens.size());
  return n;
}

Scheduler::Scheduler(const SchedulerConfig& config)
    : config_(config),
      blocks_(std::max<int64_t>(config.num_blocks, 0), std::max<int64_t>(config.block_size, 1),
              config.prefix_caching) {
  if (config.num_blocks <= 0 || config.block_size <= 0 || config.max_batch_tokens <= 0 ||
      config.max_running <= 0 || config.prefill_chunk <= 0 || config.max_queue < 0 || config.context <= 0) {
    throw std::invalid_argument("scheduler: every limit must be positive");
  }
}

Admission Scheduler::submit(uint64_t seq_id, std::vector<int32_t> prompt, int32_t max_new_tokens,
                            bool reuse_prefix, int32_t adapter) {
  if (prompt.empty() || max_new_tokens < 1 || sequences_.count(seq_id) != 0) return Admission::invalid;
  const int64_t longest = static_cast<int64_t>(prompt.size()) + max_new_tokens;
  if (longest > config_.context || longest > config_.num_blocks * config_.block_size)
    return Admission::too_long;
  if (static_cast<int64_t>(waiting_.size()) >= config_.max_queue) return Admission::overloaded;
  Sequence seq;
  seq.tokens = std::move(prompt);
  seq.max_new_tokens = max_new_tokens;
  seq.limit = static_cast<int64_t>(seq.tokens.size()) + max_new_tokens;
  seq.arrival = next_arrival_++;
  seq.reuse_prefix = reuse_prefix;
  seq.adapter = adapter;
  sequences_.emplace(seq_id, std::move(seq));
  waiting_.push_back(seq_id);
  return Admission::accepted;
}

bool Scheduler::cancel(uint64_t seq_id) {
  const auto it = sequences_.find(seq_id);
  if (it == sequences_.end()) return false;
  blocks_.release(it->second.blocks);
  sequences_.erase(it);
  awaiting_.erase(seq_id);
  std::erase(running_, seq_id);
  std::erase(waiting_, seq_id);
  return true;
}

void Scheduler::preempt(uint64_t seq_id) {
  Sequence& seq = sequences_.at(seq_id);
  blocks_.release(seq.blocks);  // its whole blocks stay cached (idle) until evicted
  seq.computed = 0;  // recompute prompt and generated tokens when it runs again (after its cached prefix)
  seq.draft.clear();
  std::erase(running_, seq_id);
  // Back to the queue in arrival order, ahead of anything that arrived later.
  const auto pos = std::find_if(waiting_.begin(), waiting_.end(),
                                [&](uint64_t other) { return sequences_.at(other).arrival > seq.arrival; });
  waiting_.insert(pos, seq_id);
}

void Scheduler::append_token(uint64_t seq_id, int32_t token) {
  const auto it = sequences_.find(seq_id);
  if (it == sequences_.end()) throw std::invalid_argument("append_token: unknown sequence");
  it->second.tokens.push_back(token);
  awaiting_.erase(seq_id);
}

void Scheduler::set_draft(uint64_t seq_id, std::vector<int32_t> draft) {
  const auto it = sequences_.find(seq_id);
  if (it == sequences_.end()) throw std::invalid_argument("set_draft: unknown sequence");
  it->second.draft = std::move(draft);
}

void Scheduler::accept_tokens(uint64_t seq_id, int32_t accepted, int32_t next) {
  const auto it = sequences_.find(seq_id);
  if (it == sequences_.end()) throw std::invalid_argument("accept_tokens: unknown sequence");
  Sequence& seq = it->second;
  if (accepted < 0 || accepted > static_cast<int32_t>(seq.planned.size())) {
    throw std::invalid_argument("accept_tokens: more tokens accepted than were proposed");
  }
  // computed counted every planned draft; only the accepted ones hold valid K/V.
  seq.computed -= static_cast<int64_t>(seq.planned.size()) - accepted;
  seq.tokens.insert(seq.tokens.end(), seq.planned.begin(), seq.planned.begin() + accepted);
  seq.tokens.push_back(next);
  seq.planned.clear();
  blocks_.truncate(seq.blocks, seq.computed);
  awaiting_.erase(seq_id);
}

int64_t Scheduler::sequence_length(uint64_t seq_id) const {
  const auto it = sequences_.find(seq_id);
  return it == sequences_.end() ? -1 : static_cast<int64_t>(it->second.tokens.size());
}

std::optional<StepPlan> Scheduler::next_step() {
  StepPlan plan;
  int64_t budget = config_.max_batch_tokens;
  std::vector<std::pair<uint64_t, int64_t>> scheduled;  // sequence, tokens taken this step

  // Tokens a sequence would take now: one decode token (plus its draft, if any, within the
  // sequence's length limit: the last token it may hold is never fed), or the next prompt chunk.
  auto wanted = [&](const Sequence& seq) {
    const int64_t pending = static_cast<int64_t>(seq.tokens.size()) - seq.computed;
    if (pending == 1 && !seq.draft.empty()) {
      const int64_t room = seq.limit - 1 - seq.computed;
      return std::max<int64_t>(1, std::min({1 + static_cast<int64_t>(seq.draft.size()), room, budget}));
    }
    return std::min({pending, config_.prefill_chunk, budget});
  };

  // The newest running sequence after `id` that may be preempted (not awaiting a token).
  auto newest_victim = [&](uint64_t id) -> std::optional<uint64_t> {
    for (auto it = running_.rbegin(); it != running_.rend() && *it != id; ++it) {
      if (awaiting_.count(*it) == 0) return *it;
    }
    return std::nullopt;
  };

  // With prefix caching: the whole block of known tokens each sequence in this plan computes first, as
  // (the block before it, or -1; its tokens). A prompt joining the batch whose next block one of them
  // computes waits, then shares it (a burst of requests with one system prompt computes it once, not
  // side by side).
  using BlockKey = std::pair<int32_t, std::span<const int32_t>>;
  std::vector<BlockKey> computing;
  const auto next_block = [&](const Sequence& seq) -> std::optional<BlockKey> {
    const int64_t b = seq.computed / config_.block_size;
    if (!config_.prefix_caching || (b + 1) * config_.block_size > static_cast<int64_t>(seq.tokens.size()))
      return std::nullopt;
    return BlockKey{
        b == 0 ? -1 : seq.blocks[static_cast<size_t>(b - 1)],
        std::span<const int32_t>(seq.tokens)
            .subspan(static_cast<size_t>(b * config_.block_size), static_cast<size_t>(config_.block_size))};
  };
  const auto being_computed = [&](const BlockKey& key) {
    return std::any_of(computing.begin(), computing.end(), [&](const BlockKey& c) {
      return c.first == key.first && std::equal(c.second.begin(), c.second.end(), key.second.begin());
    });
  };

  // 1. Running sequences, oldest first. Lacking blocks, preempt the newest until it fits.
  for (size_t i = 0; i < running_.size() && budget > 0;) {
    const uint64_t id = running_[i];
    Sequence& seq = sequences_.at(id);
    const int64_t take = awaiting_.count(id) != 0 ? 0 : wanted(seq);
    if (take <= 0) {
      ++i;
      continue;
    }
    bool fits = blocks_.reserve(seq.blocks, seq.computed + take);
    for (std::optional<uint64_t> victim; !fits && (victim = newest_victim(id));) {
      plan.preempted.push_back(*victim);
      preempt(*victim);
      fits = blocks_.reserve(seq.blocks, seq.computed + take);
    }
    if (!fits) {  // it is itself the newest: it waits
      plan.preempted.push_back(id);
      preempt(id);
      continue;
    }
    if (const auto key = next_block(seq)) computing.push_back(*key);
    scheduled.emplace_back(id, take);
    budget -= take;
    ++i;
  }

  // 2. Admit waiting sequences in order while there is room. Nothing preempted this step comes back
  // in the same step, which keeps a thrashing pair from swapping every step. A prompt whose next block
  // a sequence of this plan computes waits (keeping its place) and shares it once computed; the ones
  // behind it may go first.
  for (size_t w = 0;
       w < waiting_.size() && budget > 0 && static_cast<int64_t>(running_.size()) < config_.max_running;) {
    const uint64_t id = waiting_[w];
    if (std::find(plan.preempted.begin(), plan.preempted.end(), id) != plan.preempted.end()) break;
    Sequence& seq = sequences_.at(id);
    // New or preempted: start after the longest cached prefix, leaving at least its last token to
    // compute (its logits give the next token).
    if (seq.reuse_prefix)
      seq.blocks = blocks_.match(seq.tokens, static_cast<int64_t>(seq.tokens.size()) - 1, seq.adapter);
    seq.computed = static_cast<int64_t>(seq.blocks.size()) * config_.block_size;
    const std::optional<BlockKey> key = next_block(seq);
    const bool waits = seq.reuse_prefix && key && being_computed(*key);  // skipped, keeping its place
    const int64_t take = wanted(seq);
    if (waits || !blocks_.reserve(seq.blocks, seq.computed + take)) {
      blocks_.release(seq.blocks);  // a waiting sequence holds no blocks
      seq.computed = 0;
      if (!waits) break;
      ++w;
      continue;
    }
    if (key) computing.push_back(*key);
    waiting_.erase(waiting_.begin() + static_cast<std::ptrdiff_t>(w));
    running_.push_back(id);
    scheduled.emplace_back(id, take);
    budget -= take;
  }
  if (scheduled.empty()) return std::nullopt;

  for (const auto& [id, take] : scheduled) {
    plan.max_blocks_per_seq = std::max<int64_t>(plan.max_blocks_per_seq, sequences_.at(id).blocks.size());
  }
  plan.block_tables.assign(scheduled.size() * plan.max_blocks_per_seq, -1);
  for (size_t row = 0; row < scheduled.size(); ++row) {
    const auto& [id, take] = scheduled[row];
    Sequence& seq = sequences_.at(id);
    StepEntry entry;
    entry.seq_id = id;
    entry.table_row = static_cast<int32_t>(row);
    entry.start_pos = static_cast<int32_t>(seq.computed);
    const int64_t known = std::min<int64_t>(take, static_cast<int64_t>(seq.tokens.size()) - seq.computed);
    entry.tokens.assign(seq.tokens.begin() + seq.computed, seq.tokens.begin() + seq.computed + known);
    seq.computed += known;
    entry.sample = seq.computed == static_cast<int64_t>(seq.tokens.size());
    if (take > known) {  // a decode entry with draft tokens after the last known one
      seq.planned.assign(seq.draft.begin(), seq.draft.begin() + (take - known));
      entry.tokens.insert(entry.tokens.end(), seq.planned.begin(), seq.planned.end());
      entry.n_draft = static_cast<int32_t>(seq.planned.size());
      seq.computed += take - known;
    }
    seq.draft.clear();
    if (entry.sample) awaiting_.insert(id);
    // Its whole blocks of confirmed tokens (not the drafts this step verifies) become shareable: the
    // workers run this step before any later one that could read them.
    blocks_.publish(seq.blocks, seq.tokens, seq.computed - static_cast<int64_t>(seq.planned.size()),
                    seq.adapter);
    std::copy(seq.blocks.begin(), seq.blocks.end(),
              plan.block_tables.begin() + row * plan.max_blocks_per_seq);
    plan.entries.push_back(std::move(entry));
  }
  return plan;
}

}  // namespace nibble::cluster
