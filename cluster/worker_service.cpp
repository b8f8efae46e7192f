#include "cluster/worker_service.hpp"

#include <stdexcept>
#include <string>

namespace nibble::cluster {

namespace {
constexpr int kHiddenTag = 7;  // stage-to-stage hidden states on the pipeline communicator
}

WorkerService::WorkerService(worker::LlamaModel& model, kernels::ThreadPool& pool,
                             parallel::Communicator* pipeline, zmq::socket_t& steps, zmq::socket_t* results,
                             int64_t num_blocks, int64_t block_size)
    : model_(model),
      pool_(pool),
      pipeline_(pipeline),
      steps_(steps),
      results_(results),
      cache_(model.shard_config(), num_blocks, block_size) {
  if (!model.is_first_stage() || !model.is_last_stage()) {
    if (pipeline_ == nullptr) throw std::invalid_argument("a pipeline stage needs its pipeline communicator");
  }
}

void WorkerService::run() {
  for (;;) {
    zmq::message_t frame;
    if (!steps_.recv(frame, zmq::recv_flags::none)) continue;  // EINTR: try again
    const protocol::WorkerStep step = protocol::decode_worker_step(
        std::span<const uint8_t>(static_cast<const uint8_t*>(frame.data()), frame.size()));
    if (step.shutdown) return;
    protocol::StepResult result = execute(step);
    if (results_ != nullptr) {
      const std::vector<uint8_t> bytes = protocol::encode(result);
      results_->send(zmq::buffer(bytes), zmq::send_flags::none);
    }
  }
}

protocol::StepResult WorkerService::execute(const protocol::WorkerStep& step) {
  const bool samples = results_ != nullptr;
  for (const protocol::SequenceSampling& s : step.new_sequences) {
    if (!samples) continue;
    worker::SamplingParams params;
    params.temperature = s.temperature;
    params.top_k = s.top_k;
    params.top_p = s.top_p;
    params.min_p = s.min_p;
    params.repetition_penalty = s.repetition_penalty;
    params.repeat_last_n = s.repeat_last_n;
    params.seed = s.seed;
    sequences_[s.seq_id] = std::make_unique<SequenceState>(SequenceState{worker::Sampler(params), {}});
  }
  for (uint64_t id : step.released) sequences_.erase(id);

  worker::ForwardBatch batch;
  batch.block_tables = step.block_tables;
  batch.max_blocks_per_seq = step.max_blocks_per_seq;
  std::vector<const protocol::PlanEntry*> sampled;
  for (const protocol::PlanEntry& entry : step.entries) {
    if (const auto it = sequences_.find(entry.seq_id); it != sequences_.end()) {
      // The history is every token fed at positions 0..last: prompt and generated tokens alike (a
      // recomputation after preemption rewrites the same values).
      std::vector<int32_t>& history = it->second->history;
      history.resize(static_cast<size_t>(entry.start_pos) + entry.tokens.size());
      std::copy(entry.tokens.begin(), entry.tokens.end(), history.begin() + entry.start_pos);
    }
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

  const int64_t n = static_cast<int64_t>(batch.tokens.size());
  const size_t hidden_bytes = static_cast<size_t>(n * model_.config().n_embd) * sizeof(float);
  const float* hidden_in = nullptr;
  if (!model_.is_first_stage() && n > 0) {
    hidden_in_.resize(static_cast<size_t>(n * model_.config().n_embd));
    pipeline_->recv(hidden_in_.data(), hidden_bytes, pipeline_->rank() - 1, kHiddenTag);
    hidden_in = hidden_in_.data();
  }
  model_.forward_stage(batch, cache_, pool_, hidden_in, out_);
  if (!model_.is_last_stage()) {
    if (n > 0) pipeline_->send(out_.data(), hidden_bytes, pipeline_->rank() + 1, kHiddenTag);
    return {step.step_id, {}};
  }

  protocol::StepResult result{step.step_id, {}};
  if (!samples) return result;
  const int64_t n_vocab = model_.config().n_vocab;
  for (size_t i = 0; i < sampled.size(); ++i) {
    const protocol::PlanEntry& entry = *sampled[i];
    const auto it = sequences_.find(entry.seq_id);
    if (it == sequences_.end()) {
      throw std::runtime_error("step " + std::to_string(step.step_id) + " samples sequence " +
                               std::to_string(entry.seq_id) + " whose sampling settings never arrived");
    }
    SequenceState& state = *it->second;
    const int32_t token = state.sampler.sample(out_.data() + i * n_vocab, n_vocab, state.history);
    result.sampled.push_back({entry.seq_id, token});
  }
  return result;
}

}  // namespace nibble::cluster
