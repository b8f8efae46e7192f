#include "cluster/worker_service.hpp"

#include <algorithm>
#include <chrono>
#include <limits>
#include <stdexcept>
#include <string>

#include "cluster/sampling_settings.hpp"
#include "model/lora_adapter.hpp"
#include "speculative/rejection_sampler.hpp"
#include "worker/logprobs.hpp"

namespace nibble::cluster {

namespace {
constexpr int kHiddenTag = 7;  // stage-to-stage hidden states on the pipeline communicator
}

WorkerService::WorkerService(WorkerStage& stage, parallel::Communicator* pipeline, zmq::socket_t& steps,
                             zmq::socket_t* results, speculative::Speculator* speculator,
                             std::shared_ptr<const worker::JsonConstraint> json,
                             std::shared_ptr<const worker::GrammarConstraint> grammar)
    : model_(stage),
      pipeline_(pipeline),
      steps_(steps),
      results_(results),
      speculator_(speculator),
      json_(std::move(json)),
      grammar_(std::move(grammar)) {
  if (!stage.is_first_stage() || !stage.is_last_stage()) {
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
    if (!step.adapter_changes.empty()) {
      protocol::StepResult answers;  // step id 0: adapter reports only
      answers.adapter_reports = change_adapters(step.adapter_changes);
      for (const protocol::AdapterReport& r : answers.adapter_reports) {
        if (reports_ == nullptr && !r.error.empty()) throw std::runtime_error(r.error);
      }
      if (reports_ != nullptr && !answers.adapter_reports.empty()) {
        const std::vector<uint8_t> bytes = protocol::encode(answers);
        reports_->send(zmq::buffer(bytes), zmq::send_flags::none);
      }
      if (step.step_id == 0 && step.entries.empty()) continue;  // a step of adapter changes only
    }
    protocol::StepResult result = execute(step);
    if (results_ != nullptr) {
      const std::vector<uint8_t> bytes = protocol::encode(result);
      results_->send(zmq::buffer(bytes), zmq::send_flags::none);
    }
  }
}

std::vector<protocol::AdapterReport> WorkerService::change_adapters(
    const std::vector<protocol::AdapterChange>& changes) {
  std::vector<protocol::AdapterReport> reports;
  for (const protocol::AdapterChange& c : changes) {
    if (c.path.empty()) {
      model_.remove_lora(c.slot);
      continue;
    }
    protocol::AdapterReport report{c.slot, world_rank_, {}};
    try {
      model_.set_lora(c.slot, model::LoraAdapter::read(c.path, model_.config()), c.scale);
    } catch (const std::exception& e) {
      // The adapter is not loaded here; the coordinator empties the slot on every worker.
      report.error = e.what();
    }
    reports.push_back(std::move(report));
  }
  return reports;
}

protocol::StepResult WorkerService::execute(const protocol::WorkerStep& step) {
  const auto started = std::chrono::steady_clock::now();
  const bool samples = results_ != nullptr;
  for (const protocol::SequenceSampling& s : step.new_sequences) {
    if (!samples) continue;
    auto state = std::make_unique<SequenceState>(worker::Sampler(to_sampling_params(s)));
    state->logprobs = static_cast<int>(s.logprobs);
    state->prompt_logprobs = s.prompt_logprobs;
    state->min_tokens = s.min_tokens;
    state->stop_token_ids = s.stop_token_ids;
    if (s.min_tokens > 0 && json_ == nullptr)
      throw std::runtime_error("sequence " + std::to_string(s.seq_id) +
                               " has min_tokens and this rank has no vocabulary to find its ends in");
    if (s.response_format == protocol::ResponseFormat::grammar) {
      if (grammar_ == nullptr)
        throw std::runtime_error("sequence " + std::to_string(s.seq_id) +
                                 " wants a grammar and this rank has no vocabulary to constrain it with");
      state->grammar = worker::Grammar::compile(s.grammar);  // compiled by the coordinator already
      state->grammar_state.emplace(state->grammar.get());
    } else if (s.response_format != protocol::ResponseFormat::text) {
      if (json_ == nullptr)
        throw std::runtime_error("sequence " + std::to_string(s.seq_id) +
                                 " wants JSON and this rank has no vocabulary to constrain it with");
      // The coordinator compiled the schema already: it cannot fail here.
      if (s.response_format == protocol::ResponseFormat::json_schema)
        state->schema = worker::JsonSchema::compile(s.json_schema);
      state->json.emplace(state->schema.get());
    }
    sequences_[s.seq_id] = std::move(state);
  }
  for (uint64_t id : step.released) {
    sequences_.erase(id);
    if (speculator_ != nullptr) speculator_->release(id);
  }

  worker::ForwardBatch batch;
  batch.block_tables = step.block_tables;
  batch.max_blocks_per_seq = step.max_blocks_per_seq;
  // Each table row's LoRA adapter, when some entry names one.
  if (std::any_of(step.entries.begin(), step.entries.end(),
                  [](const protocol::PlanEntry& e) { return e.adapter != 0; })) {
    batch.seq_adapters.assign(step.entries.size(), 0);
    for (const protocol::PlanEntry& e : step.entries) {
      if (e.table_row < 0 || static_cast<size_t>(e.table_row) >= step.entries.size())
        throw std::runtime_error("worker step: an entry's table row is outside the step's tables");
      batch.seq_adapters[static_cast<size_t>(e.table_row)] = e.adapter;
    }
  }
  std::vector<const protocol::PlanEntry*> sampled;
  std::vector<size_t> sample_row;  // per sampled entry: its first logit row
  // Entries that want their prompt tokens' log-probabilities, with their first logit row.
  std::vector<std::pair<const protocol::PlanEntry*, size_t>> prompt_entries;
  for (const protocol::PlanEntry& entry : step.entries) {
    if (const auto it = sequences_.find(entry.seq_id); it != sequences_.end()) {
      // The history is every token fed at positions 0..last: prompt and generated tokens alike (a
      // recomputation after preemption rewrites the same values), a cached prefix included.
      std::vector<int32_t>& history = it->second->history;
      history.resize(static_cast<size_t>(entry.start_pos) + entry.tokens.size());
      std::copy(entry.cached_prefix.begin(), entry.cached_prefix.end(), history.begin());
      std::copy(entry.tokens.begin(), entry.tokens.end(), history.begin() + entry.start_pos);
    }
    // A sampling entry wants the logits after its last known token and after each draft proposal.
    // An entry with prompt targets also wants the logits of its first rows (its prompt tokens').
    const auto targets = static_cast<int32_t>(entry.prompt_targets.size());
    if (targets > 0) prompt_entries.emplace_back(&entry, batch.logit_rows.size());
    batch.add_sequence(entry.tokens, entry.start_pos, entry.table_row, entry.sample ? entry.n_draft + 1 : 0,
                       targets);
    if (entry.sample) {
      sampled.push_back(&entry);
      sample_row.push_back(batch.logit_rows.size() - static_cast<size_t>(entry.n_draft + 1));
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
  // Greedy rows without a logit bias or penalty need only each row's argmax (on a GPU found on the
  // device: no logits cross to the host). A rank that does not sample takes the same path (the
  // collectives inside the pass are the same either way).
  // Plain sampled rows (a logit bias or penalty included: the histories go with them) need only their
  // sampled id, drawn with the sequence's next uniform (on a GPU on the device too).
  const auto all_sampled = [&](auto&& pred) {
    return model_.is_last_stage() &&
           std::all_of(sampled.begin(), sampled.end(), [&](const protocol::PlanEntry* e) {
             const auto it = sequences_.find(e->seq_id);
             return it != sequences_.end() && pred(*e, it->second->sampler.params());
           });
  };
  // Rows whose log-probabilities are asked for, or whose output is masked (JSON, min_tokens), need their
  // logits here: such a step takes the host path.
  const bool host_logits =
      !prompt_entries.empty() ||
      std::any_of(sampled.begin(), sampled.end(), [&](const protocol::PlanEntry* e) {
        const auto it = sequences_.find(e->seq_id);
        return it != sequences_.end() &&
               (it->second->logprobs > 0 || it->second->masked() || it->second->holds_back_ends());
      });
  const bool argmax_only =
      !host_logits && all_sampled([](const protocol::PlanEntry&, const worker::SamplingParams& p) {
        return p.temperature <= 0.0f && !worker::adjusts_logits(p);
      });
  const bool ids_only =
      !host_logits &&
      (argmax_only || all_sampled([](const protocol::PlanEntry& e, const worker::SamplingParams&) {
         return e.n_draft == 0;
       }));
  // Sampled drafts verified where the logits are (a GPU's last stage, whole or a shard: only ids come back),
  // when every sampled entry verifies drafts at temperature > 0 without a penalty; each draws its k + 1
  // uniforms up front, as the host's verify does (LocalEngine takes the same path).
  const int64_t n_vocab = model_.config().n_vocab;
  const bool verify_on_model =
      !host_logits && !argmax_only && !ids_only && model_.verifies_drafts() &&
      all_sampled([&](const protocol::PlanEntry& e, const worker::SamplingParams& p) {
        const SequenceState& state = *sequences_.at(e.seq_id);
        return worker::verifiable_on_model(p, e.n_draft, state.draft_probs.size(), n_vocab,
                                           state.draft_kept != nullptr ? state.draft_kept->rows() : 0);
      });
  if (argmax_only) {
    model_.forward_stage_argmax(batch, hidden_in, argmax_);
  } else if (verify_on_model) {
    verify_uniforms_.resize(sampled.size());
    std::vector<worker::VerifySequence> seqs;
    for (size_t i = 0; i < sampled.size(); ++i) {
      SequenceState& state = *sequences_.at(sampled[i]->seq_id);
      // Host rows when the draft sent them, else the rows it kept on its device.
      const bool host_rows = state.draft_probs.size() >= static_cast<size_t>(sampled[i]->n_draft * n_vocab);
      seqs.push_back(worker::verify_sequence(state.sampler, sampled[i]->tokens, sampled[i]->n_draft,
                                             state.draft_probs, n_vocab, verify_uniforms_[i],
                                             host_rows ? nullptr : state.draft_kept.get()));
    }
    model_.forward_stage_verify(batch, hidden_in, seqs, verify_accepted_, verify_tokens_);
  } else if (ids_only) {
    sample_params_.clear();
    sample_uniforms_.clear();
    sample_histories_.clear();
    for (const protocol::PlanEntry* e : sampled) {
      SequenceState& state = *sequences_.at(e->seq_id);
      sample_params_.push_back(state.sampler.params());
      sample_uniforms_.push_back(state.sampler.uniform());  // the draw sample() would make
      sample_histories_.push_back(state.history);
    }
    model_.forward_stage_sample(batch, hidden_in, sample_params_, sample_uniforms_, sample_histories_,
                                argmax_);
  } else {
    model_.forward_stage(batch, hidden_in, out_);
  }
  if (!model_.is_last_stage()) {
    if (n > 0) pipeline_->send(out_.data(), hidden_bytes, pipeline_->rank() + 1, kHiddenTag);
    return {step.step_id, {}};
  }

  protocol::StepResult result{step.step_id, {}};
  if (!samples) return result;
  const int64_t n_vocab_rows = !ids_only && !verify_on_model ? n_vocab : 0;  // host logits: a row's stride
  // Prompt tokens' log-probabilities: an entry's first rows, each of the token after it.
  for (const auto& [entry, first_row] : prompt_entries) {
    const auto it = sequences_.find(entry->seq_id);
    const int top = it != sequences_.end() ? std::max(it->second->prompt_logprobs, 0) : 0;
    protocol::PromptLogprobs& prompt = result.prompts.emplace_back();
    prompt.seq_id = entry->seq_id;
    prompt.start_pos = entry->start_pos;
    for (size_t i = 0; i < entry->prompt_targets.size(); ++i) {
      const worker::TokenLogprobs lp = worker::token_logprobs(out_.data() + (first_row + i) * n_vocab,
                                                              n_vocab, entry->prompt_targets[i], top);
      protocol::TokenLogprob& t = prompt.logprobs.emplace_back();
      t.logprob = lp.logprob;
      for (const auto& [id, value] : lp.top) t.top.push_back({id, value});
    }
  }
  std::vector<speculative::ProposalRequest> proposals;
  std::vector<std::vector<int32_t>> sequences;  // tokens so far of each proposing sequence
  sequences.reserve(sampled.size());
  for (size_t si = 0; si < sampled.size(); ++si) {
    const protocol::PlanEntry& entry = *sampled[si];
    const size_t entry_row = sample_row[si];
    const float* entry_rows = out_.data() + static_cast<int64_t>(entry_row) * n_vocab_rows;
    const auto it = sequences_.find(entry.seq_id);
    if (it == sequences_.end()) {
      throw std::runtime_error("step " + std::to_string(step.step_id) + " samples sequence " +
                               std::to_string(entry.seq_id) + " whose sampling settings never arrived");
    }
    SequenceState& state = *it->second;
    protocol::SampledToken out{entry.seq_id, 0, {}, entry.n_draft, {}, {}};
    const size_t last_known = static_cast<size_t>(entry.start_pos) + entry.tokens.size() - entry.n_draft;
    if (state.masked() || state.holds_back_ends()) {
      // Masked on a copy: logprobs stay the model's own distribution's.
      if (entry.n_draft != 0)
        throw std::runtime_error("step " + std::to_string(step.step_id) + " verifies drafts of sequence " +
                                 std::to_string(entry.seq_id) + ", whose masked output never speculates");
      const std::vector<int32_t>& ends =
          json_ != nullptr ? json_->end_of_generation() : grammar_->end_of_generation();
      const auto allowed = [&](int32_t t) {
        const bool an_end = std::find(ends.begin(), ends.end(), t) != ends.end() ||
                            std::find(state.stop_token_ids.begin(), state.stop_token_ids.end(), t) !=
                                state.stop_token_ids.end();
        return (!state.json || json_->allows(*state.json, t)) &&
               (!state.grammar_state || grammar_->allows(*state.grammar_state, t)) &&
               !(an_end && state.holds_back_ends());
      };
      const auto mask = [&](float* row) {
        if (state.json) json_->mask(*state.json, row, n_vocab);
        if (state.grammar_state) grammar_->mask(*state.grammar_state, row, n_vocab);
        if (state.holds_back_ends()) {
          for (const int32_t t : ends)
            if (t < n_vocab) row[t] = -std::numeric_limits<float>::infinity();
          for (const int32_t t : state.stop_token_ids)
            if (t < n_vocab) row[t] = -std::numeric_limits<float>::infinity();
        }
      };
      out.token =
          worker::sample_allowed(state.sampler, entry_rows, n_vocab, state.history, allowed, mask, masked_);
      // A vocabulary that cannot write what must come next (a grammar's character no token holds) leaves
      // the mask only the end of generation: the output ends there, short of a whole sentence.
      const bool dead_end =
          !allowed(out.token) && std::find(ends.begin(), ends.end(), out.token) != ends.end();
      if (state.json && !dead_end) {
        if (!json_->allows(*state.json, out.token))
          throw std::logic_error("sampled token " + std::to_string(out.token) + " outside the JSON mask");
        state.json->feed(json_->token_bytes(out.token));
      }
      if (state.grammar_state && !dead_end) {
        if (!grammar_->allows(*state.grammar_state, out.token))
          throw std::logic_error("sampled token " + std::to_string(out.token) +
                                 " outside the grammar's mask");
        state.grammar_state->feed(grammar_->token_bytes(out.token));
      }
    } else if (entry.n_draft == 0) {
      out.token = ids_only ? argmax_[entry_row] : state.sampler.sample(entry_rows, n_vocab, state.history);
    } else {
      const bool greedy = state.sampler.params().temperature <= 0.0f;
      // A host verification of drafts whose distributions the draft kept on its GPU copies them here.
      if (!verify_on_model && !argmax_only && state.draft_probs.empty() && state.draft_kept != nullptr &&
          state.draft_kept->rows() >= entry.n_draft)
        state.draft_kept->copy_to_host(0, entry.n_draft, state.draft_probs);
      if (speculator_ == nullptr ||
          (!greedy && !verify_on_model &&
           state.draft_probs.size() < static_cast<size_t>(entry.n_draft * n_vocab))) {
        throw std::runtime_error("step " + std::to_string(step.step_id) + " verifies drafts of sequence " +
                                 std::to_string(entry.seq_id) + " that this rank did not propose");
      }
      const std::span<const int32_t> drafts(entry.tokens.data() + entry.tokens.size() - entry.n_draft,
                                            static_cast<size_t>(entry.n_draft));
      const speculative::Verification v =
          verify_on_model ? speculative::Verification{verify_tokens_[si], verify_accepted_[si]}
          : argmax_only
              ? speculative::verify_argmax(std::span<const int32_t>(argmax_.data() + entry_row,
                                                                    static_cast<size_t>(entry.n_draft + 1)),
                                           drafts)
              : speculative::verify_logits(
                    state.sampler, entry_rows, n_vocab,
                    std::span<const int32_t>(state.history.data(), last_known), drafts,
                    std::span<const float>(
                        state.draft_probs.data(),
                        std::min(state.draft_probs.size(), static_cast<size_t>(entry.n_draft * n_vocab))));
      speculator_->record(entry.seq_id, entry.n_draft, v.accepted);
      out.accepted_drafts.assign(v.tokens.begin(), v.tokens.end() - 1);
      out.token = v.tokens.back();
    }
    if (state.logprobs > 0) {  // row t gave accepted draft t, row `accepted` the token (host logits)
      const auto add = [&](size_t r, int32_t token) {
        const worker::TokenLogprobs lp =
            worker::token_logprobs(entry_rows + r * n_vocab, n_vocab, token, state.logprobs);
        protocol::TokenLogprob& t = out.logprobs.emplace_back();
        t.logprob = lp.logprob;
        for (const auto& [id, value] : lp.top) t.top.push_back({id, value});
      };
      for (size_t t = 0; t < out.accepted_drafts.size(); ++t) add(t, out.accepted_drafts[t]);
      add(out.accepted_drafts.size(), out.token);
    }
    state.generated += 1 + static_cast<int64_t>(out.accepted_drafts.size());
    // The cache now holds the known tokens and the accepted drafts; rejected positions are dropped.
    state.history.resize(last_known + out.accepted_drafts.size());
    if (speculator_ != nullptr) {
      sequences.push_back(state.history);
      sequences.back().push_back(out.token);
      // The batch is every sequence in the step, also those still in their prompts (see LocalEngine).
      // A masked sequence never speculates (its drafts would not be masked).
      const int k = state.masked() || state.holds_back_ends()
                        ? 0
                        : speculator_->choose_k(entry.seq_id, state.sampler.params(),
                                                static_cast<int64_t>(step.entries.size()));
      // A stage that verifies on its GPU takes the draft's distributions where a GPU draft makes them.
      proposals.push_back(
          {entry.seq_id, sequences.back(), &state.sampler.params(), k, model_.verifies_drafts()});
    }
    result.sampled.push_back(std::move(out));
  }
  if (speculator_ != nullptr) {  // a decode-only step tells the speculator what its mode cost
    bool decode_only = !step.entries.empty(), verified = false;
    int64_t produced = 0;
    for (const protocol::PlanEntry& entry : step.entries) {
      decode_only =
          decode_only && entry.sample && entry.tokens.size() == static_cast<size_t>(entry.n_draft) + 1;
      verified = verified || entry.n_draft > 0;
    }
    bool proposing = false;  // a plain step that proposes is a transition: measured as neither mode
    for (const speculative::ProposalRequest& r : proposals) proposing = proposing || r.k > 0;
    for (const protocol::SampledToken& t : result.sampled)
      produced += 1 + static_cast<int64_t>(t.accepted_drafts.size());
    if (decode_only && (verified || !proposing)) {
      // Measured before proposing: the proposals belong to the next step's cost; the step time here
      // (receipt to sampled tokens) includes waiting for earlier pipeline stages.
      const double seconds =
          std::chrono::duration<double>(std::chrono::steady_clock::now() - started).count();
      speculator_->observe_step(static_cast<int64_t>(step.entries.size()), verified, seconds, produced);
    }
  }
  if (speculator_ != nullptr && !proposals.empty()) {
    std::vector<speculative::Proposal> made = speculator_->propose(proposals);
    size_t next = 0;
    for (protocol::SampledToken& out : result.sampled) {
      if (next < made.size() && made[next].seq_id == out.seq_id) {
        out.draft = std::move(made[next].tokens);
        SequenceState& state = *sequences_.at(out.seq_id);
        state.draft_probs = std::move(made[next].probs);
        state.draft_kept = std::move(made[next].kept);
        ++next;
      }
    }
  }
  return result;
}

}  // namespace nibble::cluster
