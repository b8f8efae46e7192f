// The coordinator ↔ worker messages: round trips through real capnp encoding and rejection of
// frames that are not such messages.
#include <gtest/gtest.h>

#include "cluster/protocol/worker_protocol.hpp"

namespace nibble::protocol {
namespace {

WorkerStep full_step() {
  WorkerStep step;
  step.step_id = 77;
  const std::string schema = R"({"type": "object", "properties": {"a": {"enum": ["x", "y"]}}})";
  step.new_sequences = {{5,
                         0.7f,
                         40,
                         0.9f,
                         0.05f,
                         1.1f,
                         64,
                         0xABCDEFull,
                         3,
                         0.5f,
                         -0.75f,
                         {{12, 3.5f}, {2, -100.0f}},
                         4,
                         ResponseFormat::json_object},
                        {6,
                         0.0f,
                         0,
                         1.0f,
                         0.0f,
                         1.0f,
                         64,
                         1,
                         0,
                         0.0f,
                         0.0f,
                         {},
                         -1,
                         ResponseFormat::json_schema,
                         schema,
                         4,
                         {2, 9}}};
  step.released = {1, 2, 3};
  // The second entry follows a cached prefix of 17 tokens (the scheduler's prefix caching).
  std::vector<int32_t> prefix(17);
  for (size_t i = 0; i < prefix.size(); ++i) prefix[i] = static_cast<int32_t>(100 + i);
  // The first wants its prompt tokens' log-probabilities: rows 0..3 predict 2, 3, 4 and the next chunk's 5.
  step.entries = {{5, 0, 0, {1, 2, 3, 4}, false, 0, {}, {2, 3, 4, 5}},
                  {6, 1, 17, {9, 10, 11}, true, 2, prefix, {}, 2}};  // LoRA adapter 2
  step.block_tables = {0, 1, -1, 7, 3, 4};
  step.max_blocks_per_seq = 3;
  return step;
}

TEST(WorkerProtocol, StepsAndResultsRoundTrip) {
  const WorkerStep step = full_step();
  EXPECT_EQ(decode_worker_step(encode(step)), step);
  WorkerStep stop;
  stop.step_id = 9;
  stop.shutdown = true;
  EXPECT_EQ(decode_worker_step(encode(stop)), stop);
  const StepResult result{77,
                          {{5, 100, {}, 0, {}, {}},
                           {6, 0, {7, 8}, 3, {1, 2, 3}, {{-0.5f, {{7, -0.5f}}}, {-1.0f, {}}, {-0.25f, {}}}},
                           {7, 31999, {}, 2, {}, {}}}};
  EXPECT_EQ(decode_step_result(encode(result)), result);
  StepResult with_prompts = result;
  with_prompts.prompts = {{5, 0, {{-1.5f, {{2, -0.5f}}}, {-0.25f, {}}}}, {9, 31, {{-3.0f, {}}}}};
  EXPECT_EQ(decode_step_result(encode(with_prompts)), with_prompts);
  // Logprobs are one per delivered token (the accepted drafts and the sampled one), or none.
  StepResult short_logprobs = result;
  short_logprobs.sampled[1].logprobs.pop_back();
  EXPECT_THROW(decode_step_result(encode(short_logprobs)), ProtocolError);
  // At most 20 top tokens a position.
  StepResult too_many = result;
  too_many.sampled[1].logprobs[0].top.assign(kMaxLogprobs + 1, {1, -1.0f});
  EXPECT_THROW(decode_step_result(encode(too_many)), ProtocolError);
  WorkerStep many = full_step();
  many.new_sequences[0].logprobs = kMaxLogprobs + 1;
  EXPECT_THROW(decode_worker_step(encode(many)), ProtocolError);
  for (const int32_t bad : {static_cast<int32_t>(kMaxLogprobs) + 1, 1000, -2}) {
    many = full_step();
    many.new_sequences[0].prompt_logprobs = bad;
    EXPECT_THROW(decode_worker_step(encode(many)), ProtocolError) << bad;
  }
  many = full_step();
  many.new_sequences[1].response_format = static_cast<ResponseFormat>(9);
  EXPECT_THROW(decode_worker_step(encode(many)), ProtocolError);
}

// Adapters loaded and unloaded while the job runs: a step of changes only (step id 0), the changes
// ahead of a step's entries, and each worker's answers.
TEST(WorkerProtocol, AdapterChangesAndReportsRoundTrip) {
  WorkerStep changes;
  changes.adapter_changes = {{2, "/models/sql.gguf", 0.5f}, {1, "", 1.0f}};
  EXPECT_EQ(decode_worker_step(encode(changes)), changes);
  WorkerStep with_entries = full_step();
  with_entries.adapter_changes = {{3, "/models/peft-dir", 2.0f}};
  EXPECT_EQ(decode_worker_step(encode(with_entries)), with_entries);
  StepResult reports;
  reports.adapter_reports = {{2, 1, ""}, {2, 3, "LoRA adapter /models/sql.gguf: no such file"}};
  EXPECT_EQ(decode_step_result(encode(reports)), reports);
  changes.adapter_changes = {{0, "/models/sql.gguf", 1.0f}};
  EXPECT_THROW(decode_worker_step(encode(changes)), ProtocolError);
}

TEST(WorkerProtocol, DraftRequestsAndRepliesRoundTrip) {
  DraftRequest request;
  request.released = {4, 9};
  const SequenceSampling sampled{5,  0.7f,        40, 0.9f,  0.05f, 1.1f,
                                 64, 0xABCDEFull, 0,  0.25f, 0.5f,  {{4, 1.0f}}};
  const SequenceSampling greedy{6, 0.0f, 0, 1.0f, 0.0f, 1.0f, 64, 1, 0, 0.0f, 0.0f, {}};
  request.sequences.push_back(DraftSequence{sampled, 12, {7, 8, 9}, 3});
  request.sequences.push_back(DraftSequence{greedy, 0, {1, 2}, 1});
  EXPECT_EQ(decode_draft_request(encode(request)), request);
  DraftRequest stop;
  stop.shutdown = true;
  EXPECT_EQ(decode_draft_request(encode(stop)), stop);
  DraftReply reply;
  reply.proposals = {{5, {3, 4}, {0.25f, 0.75f, 0.5f, 0.5f}}, {6, {11}, {}}, {7, {}, {}}};
  EXPECT_EQ(decode_draft_reply(encode(reply)), reply);
  const DraftReply failed{{}, "draft cache: out of memory"};
  EXPECT_EQ(decode_draft_reply(encode(failed)), failed);
}

TEST(WorkerProtocol, RejectsInconsistentDraftMessages) {
  DraftRequest request;
  const SequenceSampling sampled{5, 0.7f, 40, 0.9f, 0.05f, 1.1f, 64, 1, 0, 0.0f, 0.0f, {}};
  request.sequences.push_back(DraftSequence{sampled, 0, {7}, -1});
  EXPECT_THROW(decode_draft_request(encode(request)), ProtocolError);
  DraftReply reply;
  reply.proposals = {{5, {3, 4}, {0.25f, 0.75f, 0.5f}}};  // 3 probabilities for 2 proposals
  EXPECT_THROW(decode_draft_reply(encode(reply)), ProtocolError);
  reply.proposals = {{5, {}, {0.5f}}};
  EXPECT_THROW(decode_draft_reply(encode(reply)), ProtocolError);
}

TEST(WorkerProtocol, RejectsBadFrames) {
  auto code_of = [](auto&& decode) {
    try {
      decode();
    } catch (const ProtocolError& e) {
      return e.code;
    }
    ADD_FAILURE() << "decoded a bad frame";
    return ErrorCode::internal;
  };
  std::vector<uint8_t> bytes = encode(full_step());
  EXPECT_EQ(code_of([&] { decode_worker_step(std::span(bytes).first(bytes.size() - 8)); }),
            ErrorCode::malformed_message);
  EXPECT_EQ(code_of([&] { decode_worker_step(std::span(bytes).first(13)); }), ErrorCode::malformed_message);
  EXPECT_EQ(code_of([&] { decode_worker_step(bytes, 64); }), ErrorCode::message_too_large);
  // Block tables that do not cover every entry are refused rather than read out of bounds.
  WorkerStep step = full_step();
  step.block_tables.pop_back();
  const std::vector<uint8_t> short_tables = encode(step);
  EXPECT_EQ(code_of([&] { decode_worker_step(short_tables); }), ErrorCode::malformed_message);
  // A cached prefix that does not end where its entry starts.
  step = full_step();
  step.entries[1].cached_prefix.pop_back();
  const std::vector<uint8_t> short_prefix = encode(step);
  EXPECT_EQ(code_of([&] { decode_worker_step(short_prefix); }), ErrorCode::malformed_message);
  // A draft count that leaves no known token before the drafts.
  step = full_step();
  step.entries[1].n_draft = 3;
  const std::vector<uint8_t> all_drafts = encode(step);
  EXPECT_EQ(code_of([&] { decode_worker_step(all_drafts); }), ErrorCode::malformed_message);
  // Prompt targets for more rows than the entry has, for the row that samples, or with drafts.
  step = full_step();
  step.entries[0].prompt_targets.push_back(6);
  const std::vector<uint8_t> too_many_targets = encode(step);
  EXPECT_EQ(code_of([&] { decode_worker_step(too_many_targets); }), ErrorCode::malformed_message);
  step = full_step();
  step.entries[0].sample = true;
  const std::vector<uint8_t> target_on_sampled_row = encode(step);
  EXPECT_EQ(code_of([&] { decode_worker_step(target_on_sampled_row); }), ErrorCode::malformed_message);
  step = full_step();
  step.entries[1].prompt_targets = {10};
  const std::vector<uint8_t> targets_with_drafts = encode(step);
  EXPECT_EQ(code_of([&] { decode_worker_step(targets_with_drafts); }), ErrorCode::malformed_message);
  step = full_step();
  step.entries[1].adapter = -1;
  const std::vector<uint8_t> negative_adapter = encode(step);
  EXPECT_EQ(code_of([&] { decode_worker_step(negative_adapter); }), ErrorCode::malformed_message);
  // Prompt logprobs at a negative position.
  StepResult result;
  result.prompts = {{5, -1, {{-1.0f, {}}}}};
  const std::vector<uint8_t> negative = encode(result);
  EXPECT_EQ(code_of([&] { decode_step_result(negative); }), ErrorCode::malformed_message);
}

}  // namespace
}  // namespace nibble::protocol
