#include "cluster/local_engine.hpp"

namespace nibble::cluster {

LocalEngine::LocalEngine(worker::LlamaModel& model, const model::Tokenizer& tokenizer,
                         kernels::ThreadPool& pool, const SchedulerConfig& config)
    : model_(model),
      tokenizer_(tokenizer),
      pool_(pool),
      scheduler_(config),
      cache_(model.config(), config.num_blocks, config.block_size) {}

Admission LocalEngine::submit(EngineRequest request) {
  worker::validate(request.sampling);
  for (int32_t id : request.prompt) {
    if (id < 0 || id >= model_.config().n_vocab) return Admission::invalid;
  }
  const Admission admission = scheduler_.submit(request.id, request.prompt, request.limits.max_tokens);
  if (admission == Admission::accepted) {
    states_.emplace(request.id, std::make_unique<RequestState>(RequestState{
                                    worker::Sampler(request.sampling),
                                    worker::Completion(tokenizer_, request.limits), request.prompt}));
  }
  return admission;
}

bool LocalEngine::cancel(uint64_t id) {
  states_.erase(id);
  return scheduler_.cancel(id);
}

std::vector<EngineResult> LocalEngine::step() {
  std::vector<EngineResult> finished;
  const std::optional<StepPlan> plan = scheduler_.next_step();
  if (!plan) return finished;

  worker::ForwardBatch batch;
  batch.block_tables = plan->block_tables;
  batch.max_blocks_per_seq = plan->max_blocks_per_seq;
  std::vector<const StepEntry*> sampled;
  for (const StepEntry& entry : plan->entries) {
    for (size_t i = 0; i < entry.tokens.size(); ++i) {
      batch.tokens.push_back(entry.tokens[i]);
      batch.positions.push_back(entry.start_pos + static_cast<int32_t>(i));
      batch.seq_index.push_back(entry.table_row);
    }
    if (entry.sample) {
      batch.logit_rows.push_back(static_cast<int32_t>(batch.tokens.size() - 1));
      sampled.push_back(&entry);
    }
  }
  model_.forward(batch, cache_, pool_, logits_);

  const int64_t n_vocab = model_.config().n_vocab;
  for (size_t i = 0; i < sampled.size(); ++i) {
    const uint64_t id = sampled[i]->seq_id;
    RequestState& state = *states_.at(id);
    const int32_t token = state.sampler.sample(logits_.data() + i * n_vocab, n_vocab, state.history);
    state.history.push_back(token);
    state.completion.add(token);
    if (state.completion.finished()) {
      finished.push_back(
          {id, state.completion.tokens(), state.completion.text(), state.completion.finish_reason()});
      scheduler_.finish(id);
      states_.erase(id);
    } else {
      scheduler_.append_token(id, token);
    }
  }
  return finished;
}

}  // namespace nibble::cluster
