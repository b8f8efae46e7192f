#include "cluster/local_engine.hpp"

#include <algorithm>
#include <chrono>

namespace nibble::cluster {

LocalEngine::LocalEngine(worker::ForwardModel& model, const model::Tokenizer& tokenizer,
                         const SchedulerConfig& config, speculative::Speculator* speculator)
    : model_(model),
      tokenizer_(tokenizer),
      scheduler_(config),
      speculator_(speculator),
      cache_(model.make_cache(config.num_blocks, config.block_size)) {}

LocalEngine::LocalEngine(worker::LlamaModel& model, const model::Tokenizer& tokenizer,
                         kernels::ThreadPool& pool, const SchedulerConfig& config,
                         speculative::Speculator* speculator)
    : owned_(std::make_unique<worker::CpuForwardModel>(model, pool)),
      model_(*owned_),
      tokenizer_(tokenizer),
      scheduler_(config),
      speculator_(speculator),
      cache_(model_.make_cache(config.num_blocks, config.block_size)) {}

Admission LocalEngine::submit(EngineRequest request) {
  worker::validate(request.sampling);
  for (int32_t id : request.prompt) {
    if (id < 0 || id >= model_.config().n_vocab) return Admission::invalid;
  }
  const Admission admission = scheduler_.submit(request.id, request.prompt, request.limits.max_tokens);
  if (admission == Admission::accepted) {
    states_.emplace(request.id, std::make_unique<RequestState>(
                                    RequestState{worker::Sampler(request.sampling),
                                                 worker::Completion(tokenizer_, request.limits),
                                                 request.prompt,
                                                 {},
                                                 nullptr}));
  }
  return admission;
}

bool LocalEngine::cancel(uint64_t id) {
  states_.erase(id);
  if (speculator_ != nullptr) speculator_->release(id);
  return scheduler_.cancel(id);
}

bool LocalEngine::deliver(uint64_t id, std::span<const int32_t> tokens, std::vector<EngineResult>& finished) {
  RequestState& state = *states_.at(id);
  for (int32_t token : tokens) {
    state.history.push_back(token);
    state.completion.add(token);
    if (!state.completion.finished()) continue;
    finished.push_back(
        {id, state.completion.tokens(), state.completion.text(), state.completion.finish_reason()});
    scheduler_.finish(id);
    if (speculator_ != nullptr) speculator_->release(id);
    states_.erase(id);
    return true;
  }
  return false;
}

bool LocalEngine::propose_drafts(const std::vector<uint64_t>& continuing) {
  if (speculator_ == nullptr || continuing.empty()) return false;
  bool proposed = false;
  std::vector<speculative::ProposalRequest> requests;
  // The batch the next steps will have: every request in the engine, also those still in their
  // prompts (judging by the few already decoding would speculate in the first steps of a batch
  // that is about to be too large for it to pay).
  const auto batch = static_cast<int64_t>(std::max(continuing.size(), states_.size()));
  for (uint64_t id : continuing) {
    const RequestState& state = *states_.at(id);
    const int k = speculator_->choose_k(id, state.sampler.params(), batch);
    // A model that verifies on its GPU takes the draft's distributions where a GPU draft makes them.
    requests.push_back({id, state.history, &state.sampler.params(), k, model_.verifies_drafts()});
    proposed = proposed || k > 0;
  }
  if (!proposed) return false;
  for (speculative::Proposal& p : speculator_->propose(requests)) {
    RequestState& state = *states_.at(p.seq_id);
    state.draft_probs = std::move(p.probs);
    state.draft_kept = std::move(p.kept);
    scheduler_.set_draft(p.seq_id, std::move(p.tokens));
  }
  return true;
}

std::vector<EngineResult> LocalEngine::step() {
  std::vector<EngineResult> finished;
  const auto started = std::chrono::steady_clock::now();
  const std::optional<StepPlan> plan = scheduler_.next_step();
  if (!plan) return finished;
  bool decode_only = true, verified = false;
  int64_t produced = 0;
  for (const StepEntry& entry : plan->entries) {
    decode_only =
        decode_only && entry.sample && entry.tokens.size() == static_cast<size_t>(entry.n_draft) + 1;
    verified = verified || entry.n_draft > 0;
  }

  worker::ForwardBatch batch;
  batch.block_tables = plan->block_tables;
  batch.max_blocks_per_seq = plan->max_blocks_per_seq;
  std::vector<const StepEntry*> sampled;
  for (const StepEntry& entry : plan->entries) {
    // A sampling entry wants the logits after its last known token and after each draft proposal.
    batch.add_sequence(entry.tokens, entry.start_pos, entry.table_row, entry.sample ? entry.n_draft + 1 : 0);
    if (entry.sample) sampled.push_back(&entry);
  }
  // Greedy rows without a logit bias or penalty need only each row's argmax, and plain sampled rows
  // (a penalty included: the histories go with them) only their sampled id, drawn with the request's
  // next uniform (on a GPU both are found on the device: no logits cross to the host); verifying
  // drafts with a penalty, or at temperature > 0 where the model cannot, needs the logits.
  const auto params_of = [&](const StepEntry* e) -> const worker::SamplingParams& {
    return states_.at(e->seq_id)->sampler.params();
  };
  const bool argmax_only = std::all_of(sampled.begin(), sampled.end(), [&](const StepEntry* e) {
    return params_of(e).temperature <= 0.0f && !worker::adjusts_logits(params_of(e));
  });
  const bool ids_only = argmax_only || std::all_of(sampled.begin(), sampled.end(),
                                                   [&](const StepEntry* e) { return e->n_draft == 0; });
  // Sampled drafts verified where the logits are (on a GPU: only ids come back), when the model can
  // and every sampled entry verifies drafts at temperature > 0 without a penalty; each draws its
  // k + 1 uniforms up front, as the host's verify does.
  const int64_t n_vocab = model_.config().n_vocab;
  const bool verify_on_model =
      !argmax_only && !ids_only && model_.verifies_drafts() &&
      std::all_of(sampled.begin(), sampled.end(), [&](const StepEntry* e) {
        const RequestState& state = *states_.at(e->seq_id);
        return worker::verifiable_on_model(params_of(e), e->n_draft, state.draft_probs.size(), n_vocab,
                                           state.draft_kept != nullptr ? state.draft_kept->rows() : 0);
      });
  if (argmax_only) {
    model_.forward_argmax(batch, *cache_, argmax_);
  } else if (verify_on_model) {
    verify_uniforms_.resize(sampled.size());
    std::vector<worker::ForwardModel::VerifySequence> seqs;
    for (size_t i = 0; i < sampled.size(); ++i) {
      RequestState& state = *states_.at(sampled[i]->seq_id);
      // Host rows when the draft sent them, else the rows it kept on its device.
      const bool host_rows = state.draft_probs.size() >= static_cast<size_t>(sampled[i]->n_draft * n_vocab);
      seqs.push_back(worker::verify_sequence(state.sampler, sampled[i]->tokens, sampled[i]->n_draft,
                                             state.draft_probs, n_vocab, verify_uniforms_[i],
                                             host_rows ? nullptr : state.draft_kept.get()));
    }
    model_.forward_verify(batch, *cache_, seqs, verify_accepted_, verify_tokens_);
  } else if (ids_only) {
    sample_params_.clear();
    sample_uniforms_.clear();
    sample_histories_.clear();
    for (const StepEntry* e : sampled) {
      RequestState& state = *states_.at(e->seq_id);
      sample_params_.push_back(params_of(e));
      sample_uniforms_.push_back(state.sampler.uniform());  // the draw sample() would make
      sample_histories_.push_back(state.history);
    }
    model_.forward_sample(batch, *cache_, sample_params_, sample_uniforms_, argmax_, sample_histories_);
  } else {
    model_.forward(batch, *cache_, logits_);
  }

  std::vector<uint64_t> continuing;
  const float* rows = logits_.data();
  size_t row = 0;  // the entry's first logit row
  for (size_t si = 0; si < sampled.size(); ++si) {
    const StepEntry* entry = sampled[si];
    const uint64_t id = entry->seq_id;
    RequestState& state = *states_.at(id);
    const float* entry_rows = rows;
    const size_t entry_row = row;
    row += static_cast<size_t>(entry->n_draft + 1);
    if (!ids_only && !verify_on_model) rows += (entry->n_draft + 1) * n_vocab;
    if (entry->n_draft == 0) {
      const int32_t token =
          ids_only ? argmax_[entry_row] : state.sampler.sample(entry_rows, n_vocab, state.history);
      ++produced;
      if (!deliver(id, std::span(&token, 1), finished)) {
        scheduler_.append_token(id, token);
        continuing.push_back(id);
      }
      continue;
    }
    const std::span<const int32_t> drafts(entry->tokens.data() + entry->tokens.size() - entry->n_draft,
                                          static_cast<size_t>(entry->n_draft));
    // A host verification of drafts whose distributions the draft kept on its GPU copies them here.
    if (!verify_on_model && !argmax_only && state.draft_probs.empty() && state.draft_kept != nullptr)
      state.draft_kept->copy_to_host(0, entry->n_draft, state.draft_probs);
    const speculative::Verification v =
        verify_on_model ? speculative::Verification{verify_tokens_[si], verify_accepted_[si]}
        : argmax_only
            ? speculative::verify_argmax(std::span<const int32_t>(argmax_.data() + entry_row,
                                                                  static_cast<size_t>(entry->n_draft + 1)),
                                         drafts)
            : speculative::verify_logits(
                  state.sampler, entry_rows, n_vocab, state.history, drafts,
                  std::span<const float>(
                      state.draft_probs.data(),
                      std::min(state.draft_probs.size(), static_cast<size_t>(entry->n_draft * n_vocab))));
    speculator_->record(id, entry->n_draft, v.accepted);
    produced += static_cast<int64_t>(v.tokens.size());
    if (!deliver(id, v.tokens, finished)) {
      scheduler_.accept_tokens(id, v.accepted, v.tokens.back());
      continuing.push_back(id);
    }
  }
  // A plain step that proposes switches speculation on and pays the draft's catch-up on every token
  // it missed: a transition, measured as neither mode (re-tries are rare; see Speculator).
  const bool proposed = propose_drafts(continuing);
  if (speculator_ != nullptr && decode_only && (verified || !proposed)) {
    const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - started).count();
    speculator_->observe_step(static_cast<int64_t>(plan->entries.size()), verified, seconds, produced);
  }
  return finished;
}

}  // namespace nibble::cluster
