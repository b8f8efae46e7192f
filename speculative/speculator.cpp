#include "speculative/speculator.hpp"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <limits>

#include "speculative/local_draft.hpp"

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

// One model's timing run: a scratch cache holding a context of kContext tokens, after which
// passes of n tokens (every row's logits, as a verification wants) are timed. Decoding happens
// after a prompt, so the passes see attention over a realistic context rather than none.
class PassTimer {
 public:
  static constexpr int64_t kContext = 64;
  PassTimer(worker::ForwardModel& model, int64_t max_tokens) : model_(model) {
    const int64_t block = 16;
    const int64_t blocks = (kContext + max_tokens + block - 1) / block;
    cache_ = model.make_cache(blocks, block);
    for (int64_t b = 0; b < blocks; ++b) table_.push_back(static_cast<int32_t>(b));
    model_.forward(worker::ForwardBatch::single(ids(kContext), 0, table_, false), *cache_, logits_);
  }
  // Seconds of one pass of n tokens at positions kContext...
  double time(int64_t n) {
    const worker::ForwardBatch batch = worker::ForwardBatch::single(ids(n), kContext, table_, true);
    const auto start = std::chrono::steady_clock::now();
    model_.forward(batch, *cache_, logits_);
    return std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  }

 private:
  static std::vector<int32_t> ids(int64_t n) {
    std::vector<int32_t> out(static_cast<size_t>(n));
    for (int64_t t = 0; t < n; ++t) out[static_cast<size_t>(t)] = static_cast<int32_t>(3 + t % 200);
    return out;
  }
  worker::ForwardModel& model_;
  std::unique_ptr<worker::ForwardCache> cache_;
  std::vector<int32_t> table_;
  std::vector<float> logits_;
};

// Passes of 1, 2, 4, ... max_tokens tokens of each model, timed alternately (so that both see the
// same machine: on a shared host a disturbance can last longer than one model's whole timing) after
// one warm-up pass each; per size the fastest of the runs, since other work only ever adds time;
// then made non-decreasing in the token count (a size that timed faster than a smaller one was
// measured while the smaller one was disturbed, so the smaller one gets the lower time).
std::vector<std::vector<std::pair<int64_t, double>>> time_models(
    const std::vector<worker::ForwardModel*>& models, int64_t max_tokens) {
  max_tokens = std::max<int64_t>(1, max_tokens);
  std::vector<std::unique_ptr<PassTimer>> timers;
  for (worker::ForwardModel* m : models) timers.push_back(std::make_unique<PassTimer>(*m, max_tokens));
  std::vector<std::vector<std::pair<int64_t, double>>> points(models.size());
  for (int64_t n = 1; n <= max_tokens; n *= 2) {
    std::vector<double> best(models.size(), std::numeric_limits<double>::infinity());
    for (auto& t : timers) t->time(n);  // warm-up
    const int runs = n <= 16 ? 9 : 5;
    for (int run = 0; run < runs; ++run)
      for (size_t i = 0; i < timers.size(); ++i) best[i] = std::min(best[i], timers[i]->time(n));
    for (size_t i = 0; i < models.size(); ++i) points[i].emplace_back(n, best[i]);
  }
  for (auto& p : points)
    for (size_t i = p.size() - 1; i-- > 0;) p[i].second = std::min(p[i].second, p[i + 1].second);
  return points;
}

}  // namespace

std::vector<std::pair<int64_t, double>> CostModel::measure_model(worker::ForwardModel& model,
                                                                 int64_t max_tokens) {
  return time_models({&model}, max_tokens).front();
}

std::vector<std::pair<int64_t, double>> CostModel::measure_model(worker::LlamaModel& model,
                                                                 kernels::ThreadPool& pool,
                                                                 int64_t max_tokens) {
  worker::CpuForwardModel cpu(model, pool);
  return measure_model(cpu, max_tokens);
}

CostModel CostModel::measure(worker::ForwardModel& target, worker::ForwardModel& draft, int64_t max_tokens) {
  auto points = time_models({&target, &draft}, max_tokens);
  return {std::move(points[0]), std::move(points[1])};
}

CostModel CostModel::measure(worker::LlamaModel& target, worker::LlamaModel& draft, kernels::ThreadPool& pool,
                             int64_t max_tokens) {
  worker::CpuForwardModel cpu_target(target, pool), cpu_draft(draft, pool);
  return measure(cpu_target, cpu_draft, max_tokens);
}

Speculator::Speculator(worker::LlamaModel& draft, kernels::ThreadPool& pool, SpeculatorSettings settings)
    : owned_drafts_(std::make_unique<LocalDraft>(draft, pool, settings.num_blocks, settings.block_size)),
      drafts_(*owned_drafts_),
      settings_(settings) {}

Speculator::Speculator(worker::ForwardModel& draft, SpeculatorSettings settings)
    : owned_drafts_(std::make_unique<LocalDraft>(draft, settings.num_blocks, settings.block_size)),
      drafts_(*owned_drafts_),
      settings_(settings) {}

Speculator::Speculator(DraftProposer& drafts, SpeculatorSettings settings)
    : drafts_(drafts), settings_(settings) {}

void Speculator::release(uint64_t seq_id) {
  drafts_.release(seq_id);
  sequences_.erase(seq_id);
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
  for (const ProposalRequest& r : requests)
    if (r.k > 0) sequences_.try_emplace(r.seq_id);  // from now on its acceptance rate is tracked
  return drafts_.propose(requests);
}

}  // namespace nibble::speculative
