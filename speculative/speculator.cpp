#include "speculative/speculator.hpp"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <limits>

#include "speculative/rejection_sampler.hpp"

namespace nibble::speculative {

double CostModel::interpolate(const std::vector<std::pair<int64_t, double>>& points, int64_t tokens) {
  if (points.empty()) return 0.0;
  if (points.size() == 1 || tokens <= points.front().first) {
    return points.front().second * std::max<double>(1.0, static_cast<double>(tokens) / points.front().first);
  }
  size_t i = 1;
  while (i + 1 < points.size() && points[i].first < tokens) ++i;
  const auto [n0, t0] = points[i - 1];
  const auto [n1, t1] = points[i];
  // Linear between the two measured sizes, and beyond the last one.
  return t0 + (t1 - t0) * static_cast<double>(tokens - n0) / static_cast<double>(n1 - n0);
}

namespace {

// Seconds of a forward pass over `tokens` tokens of one sequence: the fastest of several runs,
// since other work on the machine only ever adds time.
double time_forward(worker::LlamaModel& model, kernels::ThreadPool& pool, int64_t tokens) {
  const int64_t block = 16;
  const int64_t blocks = (tokens + block - 1) / block;
  worker::KvCache cache(model.shard_config(), blocks, block);
  std::vector<int32_t> table(static_cast<size_t>(blocks));
  for (int64_t b = 0; b < blocks; ++b) table[static_cast<size_t>(b)] = static_cast<int32_t>(b);
  std::vector<int32_t> ids(static_cast<size_t>(tokens));
  for (int64_t t = 0; t < tokens; ++t) ids[static_cast<size_t>(t)] = static_cast<int32_t>(3 + t % 200);
  worker::ForwardBatch batch = worker::ForwardBatch::single(ids, 0, table, /*all_logits=*/true);
  std::vector<float> logits;
  std::vector<double> runs;
  for (int rep = 0; rep < 5; ++rep) {
    const auto start = std::chrono::steady_clock::now();
    model.forward(batch, cache, pool, logits);
    runs.push_back(std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count());
  }
  return *std::min_element(runs.begin(), runs.end());
}

}  // namespace

CostModel CostModel::measure(worker::LlamaModel& target, worker::LlamaModel& draft, kernels::ThreadPool& pool,
                             int64_t max_tokens) {
  CostModel costs;
  for (int64_t n = 1; n <= std::max<int64_t>(1, max_tokens); n *= 2) {
    costs.target.emplace_back(n, time_forward(target, pool, n));
    costs.draft.emplace_back(n, time_forward(draft, pool, n));
  }
  // More tokens never cost less: a size that timed faster than a smaller one was measured while
  // the smaller one was disturbed, so the smaller one gets the lower time.
  for (auto* points : {&costs.target, &costs.draft})
    for (size_t i = points->size() - 1; i-- > 0;)
      (*points)[i].second = std::min((*points)[i].second, (*points)[i + 1].second);
  return costs;
}

Speculator::Speculator(worker::LlamaModel& draft, kernels::ThreadPool& pool, SpeculatorSettings settings)
    : draft_(draft),
      pool_(pool),
      settings_(settings),
      cache_(draft.shard_config(), settings.num_blocks, settings.block_size),
      allocator_(settings.num_blocks) {}

Speculator::SequenceState& Speculator::state(uint64_t seq_id, const worker::SamplingParams& sampling) {
  SequenceState& s = sequences_[seq_id];
  if (s.sampler == nullptr) {
    worker::SamplingParams draft_params = sampling;
    draft_params.seed = sampling.seed ^ 0x9E3779B97F4A7C15ull;  // its own stream, fixed by the seed
    s.sampler = std::make_unique<worker::Sampler>(draft_params);
  }
  return s;
}

void Speculator::release(uint64_t seq_id) {
  const auto it = sequences_.find(seq_id);
  if (it == sequences_.end()) return;
  allocator_.release(it->second.blocks);
  sequences_.erase(it);
}

double Speculator::gain(double acceptance, int64_t decode_batch, int k) const {
  const double a = std::clamp(acceptance, 0.0, 0.999);
  const double expected = (1.0 - std::pow(a, k + 1)) / (1.0 - a);
  const CostModel& c = settings_.costs;
  if (c.empty()) return expected / (1.0 + k * (settings_.draft_cost + settings_.verify_cost));
  const int64_t b = std::max<int64_t>(1, decode_batch);
  return expected * c.target_seconds(b) / (c.target_seconds(b * (k + 1)) + k * c.draft_seconds(b));
}

bool Speculator::promising(int64_t decode_batch) const {
  if (!settings_.adaptive || settings_.costs.empty()) return true;
  for (int k = 1; k <= settings_.max_draft_tokens; ++k)
    if (gain(kPromisingAcceptance, decode_batch, k) > kMinGain) return true;
  return false;
}

int Speculator::choose_k(uint64_t seq_id, const worker::SamplingParams& sampling, int64_t decode_batch) {
  const int max_k = settings_.max_draft_tokens;
  if (max_k <= 0) return 0;
  if (sampling.temperature > 0.0f) {
    decode_batch = 1;  // tokens depend on k: decide from the sequence's own history only
  } else if (!enabled_for(decode_batch)) {
    return 0;
  }
  if (!settings_.adaptive) return max_k;
  const auto it = sequences_.find(seq_id);
  const double a = it == sequences_.end() ? 0.5 : it->second.acceptance;
  const int64_t b = std::max<int64_t>(1, decode_batch);
  int best_k = 0;
  double best = kMinGain;
  for (int k = 1; k <= max_k; ++k) {
    const double g = gain(a, b, k);
    if (g > best) {
      best = g;
      best_k = k;
    }
  }
  if (best_k == 0) {
    SequenceState* s = it == sequences_.end() ? nullptr : &it->second;
    // Probe: a first try, then now and then. Rarely: a probe makes the draft catch up on every token
    // it missed, which costs about as much as a prefill of them.
    if (s == nullptr || ++s->steps_off % 64 == 0) return 1;
  }
  return best_k;
}

Speculator::Measured& Speculator::bucket(int64_t decode_batch) {
  size_t b = 0;
  while ((int64_t{1} << (b + 1)) <= std::max<int64_t>(1, decode_batch)) ++b;
  if (buckets_.size() <= b) buckets_.resize(b + 1);
  return buckets_[b];
}

bool Speculator::enabled_for(int64_t decode_batch) {
  if (settings_.max_draft_tokens <= 0 || decode_batch > settings_.max_batch) return false;
  if (!settings_.adaptive) return true;
  Measured& m = bucket(decode_batch);
  if (m.steps_seen == 0 && m.samples[1] == 0 && !promising(decode_batch)) {
    // The cost model says verification cannot pay here even for a draft that is nearly always
    // right: start with plain decoding and count speculation as measured slower, so that it is
    // only re-tried, rarely (in case the model misjudged: each re-try makes the draft catch up on
    // every token it missed), instead of warmed up first.
    m.enabled = false;
    m.samples[1] = kWarmSteps;
    m.seconds_per_token[1] = std::numeric_limits<double>::infinity();
    m.retry_interval = kUnpromisingRetryInterval;
  }
  ++m.steps_seen;
  return m.enabled;
}

void Speculator::observe_step(int64_t decode_batch, bool speculative, double seconds, int64_t tokens) {
  if (tokens <= 0 || seconds <= 0) return;
  Measured& m = bucket(decode_batch);
  const int mode = speculative ? 1 : 0;
  const double per_token = seconds / static_cast<double>(tokens);
  const bool first = m.samples[mode] == 0 || std::isinf(m.seconds_per_token[mode]);
  m.seconds_per_token[mode] = first ? per_token : 0.8 * m.seconds_per_token[mode] + 0.2 * per_token;
  ++m.samples[mode];
  // The mode of the next step at this batch size: a few steps of each first, then the faster one,
  // with the other re-tried now and then.
  const bool faster = m.seconds_per_token[1] < m.seconds_per_token[0];
  if (m.samples[1] < kWarmSteps) {
    m.enabled = true;
  } else if (m.samples[0] < kWarmSteps) {
    m.enabled = false;
  } else {
    // Re-trying the slower mode is not free (switching speculation back on makes the draft catch up
    // on every token it missed), so the interval doubles each time the re-try confirms the choice.
    const bool retry = ++m.steps % m.retry_interval == 0;
    if (m.retrying) {
      if (faster == m.retry_mode)
        m.retry_interval = 64;  // the other mode won: back to short intervals
      else
        m.retry_interval = std::min<uint64_t>(m.retry_interval * 2, 4096);
      m.retrying = false;
    }
    m.enabled = retry ? !faster : faster;
    if (retry) {
      m.retrying = true;
      m.retry_mode = !faster;
      m.steps = 0;
    }
  }
}

void Speculator::record(uint64_t seq_id, int proposed, int accepted) {
  if (proposed <= 0) return;
  ++stats_.steps;
  stats_.proposed += static_cast<uint64_t>(proposed);
  stats_.accepted += static_cast<uint64_t>(accepted);
  const auto it = sequences_.find(seq_id);
  if (it == sequences_.end()) return;
  // Per-token acceptance of this step: every proposal up to the first rejection counts as a trial.
  const int trials = std::min(proposed, accepted + 1);
  const double rate = static_cast<double>(accepted) / trials;
  it->second.acceptance = 0.8 * it->second.acceptance + 0.2 * rate;
}

std::vector<Proposal> Speculator::propose(const std::vector<ProposalRequest>& requests) {
  const int64_t n_vocab = draft_.config().n_vocab;
  const int64_t bs = settings_.block_size;
  struct Work {
    const ProposalRequest* request;
    SequenceState* state;
    int k;
    Proposal proposal;
    std::vector<int32_t> history;  // tokens then the proposals so far
  };
  std::vector<Work> work;
  for (const ProposalRequest& r : requests) {
    if (r.k <= 0 || r.tokens.empty()) continue;
    SequenceState& s = state(r.seq_id, *r.sampling);
    // The draft cache stays valid for the longest common prefix of what it was fed and what the
    // target accepted (drafts that were rejected, or a sequence recomputed after preemption, differ).
    size_t valid = 0;
    while (valid < s.fed.size() && valid < r.tokens.size() && s.fed[valid] == r.tokens[valid]) ++valid;
    valid = std::min(valid, r.tokens.size() - 1);  // the newest token is always fed now
    s.fed.resize(valid);
    allocator_.truncate(s.blocks, static_cast<int64_t>(valid), bs);
    // Positions up to the last proposal but one (the last is never fed).
    const int64_t needed = static_cast<int64_t>(r.tokens.size()) + r.k - 1;
    int k = r.k;
    if (needed > draft_.config().n_ctx_train && draft_.config().n_ctx_train > 0) k = 0;
    if (k > 0 && !allocator_.reserve(s.blocks, needed, bs)) k = 0;  // draft cache full: no proposal
    Proposal p;
    p.seq_id = r.seq_id;
    if (k == 0) {
      work.push_back({&r, &s, 0, std::move(p), {}});
      continue;
    }
    work.push_back({&r, &s, k, std::move(p), std::vector<int32_t>(r.tokens.begin(), r.tokens.end())});
  }

  // Round 0 feeds every sequence's catch-up tokens; round i > 0 feeds proposal i.
  int max_k = 0;
  for (const Work& w : work) max_k = std::max(max_k, w.k);
  for (int round = 0; round < max_k; ++round) {
    worker::ForwardBatch batch;
    std::vector<Work*> active;
    int64_t max_blocks = 0;
    for (Work& w : work) {
      if (w.k > round)
        max_blocks = std::max<int64_t>(max_blocks, static_cast<int64_t>(w.state->blocks.size()));
    }
    batch.max_blocks_per_seq = max_blocks;
    for (Work& w : work) {
      if (w.k <= round) continue;
      const int32_t row = static_cast<int32_t>(active.size());
      active.push_back(&w);
      const size_t from = round == 0 ? w.state->fed.size() : w.history.size() - 1;
      for (size_t pos = from; pos < w.history.size(); ++pos) {
        batch.tokens.push_back(w.history[pos]);
        batch.positions.push_back(static_cast<int32_t>(pos));
        batch.seq_index.push_back(row);
      }
      batch.logit_rows.push_back(static_cast<int32_t>(batch.tokens.size() - 1));
      std::vector<int32_t> table = w.state->blocks;
      table.resize(static_cast<size_t>(max_blocks), -1);
      batch.block_tables.insert(batch.block_tables.end(), table.begin(), table.end());
    }
    draft_.forward(batch, cache_, pool_, logits_);
    for (size_t i = 0; i < active.size(); ++i) {
      Work& w = *active[i];
      w.state->fed.assign(w.history.begin(), w.history.end());
      const float* row = logits_.data() + i * n_vocab;
      int32_t token = 0;
      if (w.state->sampler->params().temperature <= 0.0f) {
        token = greedy_token(*w.state->sampler, row, n_vocab, w.history);  // no q needed at temperature 0
      } else {
        std::vector<float> q = dense_distribution(*w.state->sampler, row, n_vocab, w.history);
        token = sample_dense(q.data(), n_vocab, w.state->sampler->uniform());
        w.proposal.probs.insert(w.proposal.probs.end(), q.begin(), q.end());
      }
      w.proposal.tokens.push_back(token);
      w.history.push_back(token);
    }
  }

  std::vector<Proposal> out;
  for (Work& w : work) out.push_back(std::move(w.proposal));
  return out;
}

}  // namespace nibble::speculative
