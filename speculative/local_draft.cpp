#include "speculative/local_draft.hpp"

#include <algorithm>

#include "speculative/rejection_sampler.hpp"

namespace nibble::speculative {

LocalDraft::LocalDraft(worker::ForwardModel& draft, int64_t num_blocks, int64_t block_size)
    : draft_(draft),
      block_size_(block_size),
      cache_(draft.make_cache(num_blocks, block_size)),
      allocator_(num_blocks) {}

LocalDraft::LocalDraft(worker::LlamaModel& draft, kernels::ThreadPool& pool, int64_t num_blocks,
                       int64_t block_size)
    : owned_(std::make_unique<worker::CpuForwardModel>(draft, pool)),
      draft_(*owned_),
      block_size_(block_size),
      cache_(draft_.make_cache(num_blocks, block_size)),
      allocator_(num_blocks) {}

LocalDraft::SequenceState& LocalDraft::state(uint64_t seq_id, const worker::SamplingParams& sampling) {
  SequenceState& s = sequences_[seq_id];
  if (s.sampler == nullptr) {
    worker::SamplingParams draft_params = sampling;
    draft_params.seed = sampling.seed ^ 0x9E3779B97F4A7C15ull;  // its own stream, fixed by the seed
    s.sampler = std::make_unique<worker::Sampler>(draft_params);
  }
  return s;
}

void LocalDraft::release(uint64_t seq_id) {
  const auto it = sequences_.find(seq_id);
  if (it == sequences_.end()) return;
  allocator_.release(it->second.blocks);
  sequences_.erase(it);
}

std::vector<Proposal> LocalDraft::propose(const std::vector<ProposalRequest>& requests) {
  const int64_t n_vocab = draft_.config().n_vocab;
  const int64_t bs = block_size_;
  struct Work {
    const ProposalRequest* request;
    SequenceState* state;
    int k;
    Proposal proposal;
    std::vector<int32_t> history;            // tokens then the proposals so far
    std::shared_ptr<worker::KeptRows> kept;  // its k distributions, when kept on the draft's device
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
      work.push_back({&r, &s, 0, std::move(p), {}, nullptr});
      continue;
    }
    work.push_back(
        {&r, &s, k, std::move(p), std::vector<int32_t>(r.tokens.begin(), r.tokens.end()), nullptr});
  }

  // The distributions stay on the draft's device when every proposing request asks for that and
  // each is either sampled without a penalty (its rows kept) or greedy without one (no
  // distribution wanted): then every round's rows are found there and only ids come back.
  const auto greedy_plain = [](const worker::SamplingParams& p) {
    return p.temperature <= 0.0f && !worker::adjusts_logits(p);
  };
  const bool keep =
      draft_.keeps_draft_distributions() && std::all_of(work.begin(), work.end(), [&](const Work& w) {
        const worker::SamplingParams& p = w.state->sampler->params();
        return w.k == 0 || (w.request->keep_distributions && !worker::adjusts_logits(p));
      });
  if (keep) {
    for (Work& w : work) {
      if (w.k > 0 && !greedy_plain(w.state->sampler->params())) w.kept = draft_.make_kept_rows(w.k);
    }
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
    // Greedy rows without a logit bias or penalty need only the argmax (a GPU draft keeps its logits).
    const bool argmax_only = std::all_of(active.begin(), active.end(), [&](const Work* w) {
      return greedy_plain(w->state->sampler->params());
    });
    const bool ids_only = argmax_only || keep;
    if (argmax_only) {
      draft_.forward_argmax(batch, *cache_, argmax_);
    } else if (keep) {
      // Each sampled row draws the uniform the host path would, in the same order per sequence.
      std::vector<worker::SamplingParams> params;
      std::vector<double> uniforms;
      std::vector<worker::KeptRowRef> rows;
      for (Work* w : active) {
        params.push_back(w->state->sampler->params());
        const bool sampled = w->kept != nullptr;
        uniforms.push_back(sampled ? w->state->sampler->uniform() : 0.0);
        rows.push_back({w->kept.get(), round});
      }
      draft_.forward_draft_sample(batch, *cache_, params, uniforms, rows, argmax_);
    } else {
      draft_.forward(batch, *cache_, logits_);
    }
    for (size_t i = 0; i < active.size(); ++i) {
      Work& w = *active[i];
      w.state->fed.assign(w.history.begin(), w.history.end());
      const float* row = ids_only ? nullptr : logits_.data() + i * n_vocab;
      int32_t token = 0;
      if (ids_only) {
        token = argmax_[i];
      } else if (w.state->sampler->params().temperature <= 0.0f) {
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
  for (Work& w : work) {
    w.proposal.kept = std::move(w.kept);
    out.push_back(std::move(w.proposal));
  }
  return out;
}

}  // namespace nibble::speculative
