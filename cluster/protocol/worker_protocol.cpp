#include "cluster/protocol/worker_protocol.hpp"

#include <algorithm>

#include "cluster/protocol/capnp_frame.hpp"
#include "cluster/protocol/logprobs_wire.hpp"
#include "cluster/protocol/worker.capnp.h"

namespace nibble::protocol {

namespace {

void write_sampling(const SequenceSampling& s, wire::SequenceSampling::Builder o) {
  o.setSeqId(s.seq_id);
  o.setTemperature(s.temperature);
  o.setTopK(s.top_k);
  o.setTopP(s.top_p);
  o.setMinP(s.min_p);
  o.setRepetitionPenalty(s.repetition_penalty);
  o.setRepeatLastN(s.repeat_last_n);
  o.setSeed(s.seed);
  o.setLogprobs(static_cast<uint8_t>(s.logprobs));
  o.setPresencePenalty(s.presence_penalty);
  o.setFrequencyPenalty(s.frequency_penalty);
  auto bias = o.initLogitBias(static_cast<unsigned>(s.logit_bias.size()));
  for (unsigned i = 0; i < s.logit_bias.size(); ++i) {
    bias[i].setToken(s.logit_bias[i].token);
    bias[i].setBias(s.logit_bias[i].bias);
  }
  // Out-of-range counts stay out of range (refused by the reader), not wrapped into range.
  o.setPromptLogprobs(static_cast<int8_t>(std::clamp<int32_t>(s.prompt_logprobs, -128, 127)));
  o.setResponseFormat(static_cast<wire::ResponseFormat>(s.response_format));
  o.setJsonSchema(kj::StringPtr(s.json_schema.c_str(), s.json_schema.size()));
  o.setMinTokens(s.min_tokens);
  auto stop_ids = o.initStopTokenIds(static_cast<unsigned>(s.stop_token_ids.size()));
  for (unsigned i = 0; i < s.stop_token_ids.size(); ++i) stop_ids.set(i, s.stop_token_ids[i]);
  o.setGrammar(kj::StringPtr(s.grammar.c_str(), s.grammar.size()));
}

SequenceSampling read_sampling(wire::SequenceSampling::Reader s) {
  if (s.getLogprobs() > kMaxLogprobs)
    throw ProtocolError(ErrorCode::malformed_message,
                        "sequence sampling: more than " + std::to_string(kMaxLogprobs) + " logprobs");
  if (s.getPromptLogprobs() < -1 || s.getPromptLogprobs() > static_cast<int32_t>(kMaxLogprobs))
    throw ProtocolError(ErrorCode::malformed_message, "sequence sampling: prompt logprobs " +
                                                          std::to_string(s.getPromptLogprobs()) +
                                                          " outside -1.." + std::to_string(kMaxLogprobs));
  if (static_cast<uint16_t>(s.getResponseFormat()) > static_cast<uint16_t>(ResponseFormat::grammar))
    throw ProtocolError(ErrorCode::malformed_message, "sequence sampling: unknown response format");
  if (s.getLogitBias().size() > kMaxLogitBias)
    throw ProtocolError(ErrorCode::malformed_message,
                        "sequence sampling: more than " + std::to_string(kMaxLogitBias) + " biased tokens");
  SequenceSampling out{.seq_id = s.getSeqId(),
                       .temperature = s.getTemperature(),
                       .top_k = s.getTopK(),
                       .top_p = s.getTopP(),
                       .min_p = s.getMinP(),
                       .repetition_penalty = s.getRepetitionPenalty(),
                       .repeat_last_n = s.getRepeatLastN(),
                       .seed = s.getSeed(),
                       .logprobs = s.getLogprobs(),
                       .presence_penalty = s.getPresencePenalty(),
                       .frequency_penalty = s.getFrequencyPenalty(),
                       .logit_bias = {},
                       .prompt_logprobs = s.getPromptLogprobs(),
                       .response_format = static_cast<ResponseFormat>(s.getResponseFormat()),
                       .json_schema = std::string(s.getJsonSchema().cStr(), s.getJsonSchema().size()),
                       .min_tokens = s.getMinTokens(),
                       .stop_token_ids = {},
                       .grammar = std::string(s.getGrammar().cStr(), s.getGrammar().size())};
  if (s.getStopTokenIds().size() > kMaxStopTokenIds)
    throw ProtocolError(ErrorCode::malformed_message, "sequence sampling: too many stop tokens");
  for (int32_t t : s.getStopTokenIds()) out.stop_token_ids.push_back(t);
  for (auto b : s.getLogitBias()) out.logit_bias.push_back({b.getToken(), b.getBias()});
  return out;
}

template <class T, class List>
void write_list(const std::vector<T>& values, List list) {
  for (unsigned i = 0; i < values.size(); ++i) list.set(i, values[i]);
}

}  // namespace

std::vector<uint8_t> encode(const WorkerStep& step) {
  capnp::MallocMessageBuilder message;
  auto out = message.initRoot<wire::WorkerStep>();
  out.setStepId(step.step_id);
  out.setShutdown(step.shutdown);
  auto sequences = out.initNewSequences(static_cast<unsigned>(step.new_sequences.size()));
  for (unsigned i = 0; i < step.new_sequences.size(); ++i)
    write_sampling(step.new_sequences[i], sequences[i]);
  auto released = out.initReleased(static_cast<unsigned>(step.released.size()));
  for (unsigned i = 0; i < step.released.size(); ++i) released.set(i, step.released[i]);
  auto entries = out.initEntries(static_cast<unsigned>(step.entries.size()));
  for (unsigned i = 0; i < step.entries.size(); ++i) {
    const PlanEntry& e = step.entries[i];
    auto o = entries[i];
    o.setSeqId(e.seq_id);
    o.setTableRow(e.table_row);
    o.setStartPos(e.start_pos);
    auto tokens = o.initTokens(static_cast<unsigned>(e.tokens.size()));
    for (unsigned t = 0; t < e.tokens.size(); ++t) tokens.set(t, e.tokens[t]);
    o.setSample(e.sample);
    o.setNDraft(e.n_draft);
    auto prefix = o.initCachedPrefix(static_cast<unsigned>(e.cached_prefix.size()));
    for (unsigned t = 0; t < e.cached_prefix.size(); ++t) prefix.set(t, e.cached_prefix[t]);
    write_list(e.prompt_targets, o.initPromptTargets(static_cast<unsigned>(e.prompt_targets.size())));
    o.setAdapter(e.adapter);
  }
  auto tables = out.initBlockTables(static_cast<unsigned>(step.block_tables.size()));
  for (unsigned i = 0; i < step.block_tables.size(); ++i) tables.set(i, step.block_tables[i]);
  out.setMaxBlocksPerSeq(step.max_blocks_per_seq);
  auto changes = out.initAdapterChanges(static_cast<unsigned>(step.adapter_changes.size()));
  for (unsigned i = 0; i < step.adapter_changes.size(); ++i) {
    const AdapterChange& c = step.adapter_changes[i];
    changes[i].setSlot(c.slot);
    changes[i].setPath(c.path);
    changes[i].setScale(c.scale);
  }
  return detail::to_bytes(message);
}

std::vector<uint8_t> encode(const StepResult& result) {
  capnp::MallocMessageBuilder message;
  auto out = message.initRoot<wire::StepResult>();
  out.setStepId(result.step_id);
  auto sampled = out.initSampled(static_cast<unsigned>(result.sampled.size()));
  for (unsigned i = 0; i < result.sampled.size(); ++i) {
    const SampledToken& in = result.sampled[i];
    sampled[i].setSeqId(in.seq_id);
    sampled[i].setToken(in.token);
    auto accepted = sampled[i].initAcceptedDrafts(static_cast<unsigned>(in.accepted_drafts.size()));
    for (unsigned t = 0; t < in.accepted_drafts.size(); ++t) accepted.set(t, in.accepted_drafts[t]);
    sampled[i].setProposed(in.proposed);
    auto draft = sampled[i].initDraft(static_cast<unsigned>(in.draft.size()));
    for (unsigned t = 0; t < in.draft.size(); ++t) draft.set(t, in.draft[t]);
    detail::write_logprobs(in.logprobs, sampled[i].initLogprobs(static_cast<unsigned>(in.logprobs.size())));
  }
  auto prompts = out.initPrompts(static_cast<unsigned>(result.prompts.size()));
  for (unsigned i = 0; i < result.prompts.size(); ++i) {
    const PromptLogprobs& in = result.prompts[i];
    prompts[i].setSeqId(in.seq_id);
    prompts[i].setStartPos(in.start_pos);
    detail::write_logprobs(in.logprobs, prompts[i].initLogprobs(static_cast<unsigned>(in.logprobs.size())));
  }
  auto reports = out.initAdapterReports(static_cast<unsigned>(result.adapter_reports.size()));
  for (unsigned i = 0; i < result.adapter_reports.size(); ++i) {
    const AdapterReport& r = result.adapter_reports[i];
    reports[i].setSlot(r.slot);
    reports[i].setRank(r.rank);
    reports[i].setError(r.error);
  }
  return detail::to_bytes(message);
}

WorkerStep decode_worker_step(std::span<const uint8_t> frame, size_t max_bytes) {
  return detail::read_frame(frame, max_bytes, [](capnp::MessageReader& reader) {
    auto in = reader.getRoot<wire::WorkerStep>();
    WorkerStep step;
    step.step_id = in.getStepId();
    step.shutdown = in.getShutdown();
    for (auto s : in.getNewSequences()) step.new_sequences.push_back(read_sampling(s));
    for (uint64_t id : in.getReleased()) step.released.push_back(id);
    for (auto e : in.getEntries()) {
      PlanEntry entry;
      entry.seq_id = e.getSeqId();
      entry.table_row = e.getTableRow();
      entry.start_pos = e.getStartPos();
      for (int32_t t : e.getTokens()) entry.tokens.push_back(t);
      entry.sample = e.getSample();
      entry.n_draft = e.getNDraft();
      // Drafts follow at least one known token.
      if (entry.n_draft != 0 &&
          (entry.n_draft < 0 || static_cast<size_t>(entry.n_draft) >= entry.tokens.size())) {
        throw ProtocolError(ErrorCode::malformed_message, "worker step: bad draft count");
      }
      for (int32_t t : e.getCachedPrefix()) entry.cached_prefix.push_back(t);
      // A cached prefix is the whole sequence before the entry.
      if (!entry.cached_prefix.empty() &&
          entry.cached_prefix.size() != static_cast<size_t>(entry.start_pos)) {
        throw ProtocolError(ErrorCode::malformed_message,
                            "worker step: a cached prefix that does not end at the entry");
      }
      for (int32_t t : e.getPromptTargets()) entry.prompt_targets.push_back(t);
      // Targets name rows of prompt tokens: none of drafts, nor the row that samples.
      if (!entry.prompt_targets.empty() &&
          (entry.n_draft != 0 ||
           entry.prompt_targets.size() + (entry.sample ? 1 : 0) > entry.tokens.size())) {
        throw ProtocolError(ErrorCode::malformed_message,
                            "worker step: more prompt targets than the entry's prompt rows");
      }
      entry.adapter = e.getAdapter();
      if (entry.adapter < 0)
        throw ProtocolError(ErrorCode::malformed_message, "worker step: a negative adapter");
      step.entries.push_back(std::move(entry));
    }
    for (int32_t b : in.getBlockTables()) step.block_tables.push_back(b);
    step.max_blocks_per_seq = in.getMaxBlocksPerSeq();
    if (step.block_tables.size() != step.entries.size() * step.max_blocks_per_seq) {
      throw ProtocolError(ErrorCode::malformed_message, "worker step: block tables do not match the entries");
    }
    for (auto c : in.getAdapterChanges()) {
      step.adapter_changes.push_back({c.getSlot(), c.getPath(), c.getScale()});
      if (step.adapter_changes.back().slot < 1)
        throw ProtocolError(ErrorCode::malformed_message, "worker step: an adapter change to a slot below 1");
    }
    return step;
  });
}

StepResult decode_step_result(std::span<const uint8_t> frame, size_t max_bytes) {
  return detail::read_frame(frame, max_bytes, [](capnp::MessageReader& reader) {
    auto in = reader.getRoot<wire::StepResult>();
    StepResult result;
    result.step_id = in.getStepId();
    for (auto s : in.getSampled()) {
      SampledToken t;
      t.seq_id = s.getSeqId();
      t.token = s.getToken();
      for (int32_t d : s.getAcceptedDrafts()) t.accepted_drafts.push_back(d);
      t.proposed = s.getProposed();
      for (int32_t d : s.getDraft()) t.draft.push_back(d);
      t.logprobs = detail::read_logprobs(s.getLogprobs());
      // With logprobs, one per delivered token: the accepted drafts and the sampled one.
      if (!t.logprobs.empty() && t.logprobs.size() != t.accepted_drafts.size() + 1) {
        throw ProtocolError(ErrorCode::malformed_message, "step result: logprobs do not match the tokens");
      }
      result.sampled.push_back(std::move(t));
    }
    for (auto p : in.getPrompts()) {
      result.prompts.push_back({p.getSeqId(), p.getStartPos(), detail::read_logprobs(p.getLogprobs())});
      if (result.prompts.back().start_pos < 0)
        throw ProtocolError(ErrorCode::malformed_message,
                            "step result: prompt logprobs at a negative position");
    }
    for (auto r : in.getAdapterReports())
      result.adapter_reports.push_back({r.getSlot(), r.getRank(), r.getError()});
    return result;
  });
}

std::vector<uint8_t> encode(const DraftRequest& request) {
  capnp::MallocMessageBuilder message;
  auto out = message.initRoot<wire::DraftRequest>();
  out.setShutdown(request.shutdown);
  write_list(request.released, out.initReleased(static_cast<unsigned>(request.released.size())));
  auto sequences = out.initSequences(static_cast<unsigned>(request.sequences.size()));
  for (unsigned i = 0; i < request.sequences.size(); ++i) {
    const DraftSequence& in = request.sequences[i];
    write_sampling(in.sampling, sequences[i].initSampling());
    sequences[i].setKeep(in.keep);
    write_list(in.tokens, sequences[i].initTokens(static_cast<unsigned>(in.tokens.size())));
    sequences[i].setK(in.k);
  }
  return detail::to_bytes(message);
}

std::vector<uint8_t> encode(const DraftReply& reply) {
  capnp::MallocMessageBuilder message;
  auto out = message.initRoot<wire::DraftReply>();
  auto proposals = out.initProposals(static_cast<unsigned>(reply.proposals.size()));
  for (unsigned i = 0; i < reply.proposals.size(); ++i) {
    const DraftProposal& in = reply.proposals[i];
    proposals[i].setSeqId(in.seq_id);
    write_list(in.tokens, proposals[i].initTokens(static_cast<unsigned>(in.tokens.size())));
    write_list(in.probs, proposals[i].initProbs(static_cast<unsigned>(in.probs.size())));
  }
  out.setError(reply.error);
  return detail::to_bytes(message);
}

DraftRequest decode_draft_request(std::span<const uint8_t> frame, size_t max_bytes) {
  return detail::read_frame(frame, max_bytes, [](capnp::MessageReader& reader) {
    auto in = reader.getRoot<wire::DraftRequest>();
    DraftRequest request;
    request.shutdown = in.getShutdown();
    for (uint64_t id : in.getReleased()) request.released.push_back(id);
    for (auto s : in.getSequences()) {
      DraftSequence sequence;
      sequence.sampling = read_sampling(s.getSampling());
      sequence.keep = s.getKeep();
      for (int32_t t : s.getTokens()) sequence.tokens.push_back(t);
      sequence.k = s.getK();
      if (sequence.k < 0) throw ProtocolError(ErrorCode::malformed_message, "draft request: negative k");
      request.sequences.push_back(std::move(sequence));
    }
    return request;
  });
}

DraftReply decode_draft_reply(std::span<const uint8_t> frame, size_t max_bytes) {
  return detail::read_frame(frame, max_bytes, [](capnp::MessageReader& reader) {
    auto in = reader.getRoot<wire::DraftReply>();
    DraftReply reply;
    for (auto p : in.getProposals()) {
      DraftProposal proposal;
      proposal.seq_id = p.getSeqId();
      for (int32_t t : p.getTokens()) proposal.tokens.push_back(t);
      const auto probs = p.getProbs();
      proposal.probs.reserve(probs.size());
      for (float q : probs) proposal.probs.push_back(q);
      if (!proposal.probs.empty() &&
          (proposal.tokens.empty() || proposal.probs.size() % proposal.tokens.size() != 0)) {
        throw ProtocolError(ErrorCode::malformed_message,
                            "draft reply: probabilities do not match the tokens");
      }
      reply.proposals.push_back(std::move(proposal));
    }
    reply.error = in.getError().cStr();
    return reply;
  });
}

}  // namespace nibble::protocol
