// The distributed service end to end: real `mpirun -np 1+T*P nibble serve` jobs on this machine,
// real ZeroMQ sockets (ipc:// in a temporary folder, so parallel tests never collide on a port),
// real Cap'n Proto messages through the C++ client library, real GGUF files.
//   - temperature-0 output through T=2, P=2 and T=2 x P=2 equals single-process `nibble generate`
//     (a project-made model always; the fixture models when they are present)
//   - 16 concurrent clients, 64 mixed requests under KV pressure: one correct answer each
//   - cancelling frees the request's KV blocks
//   - bad input of every kind gets an error reply and the service keeps serving
//   - a killed worker ends every open request with an error and the job exits non-zero
//   - a shutdown request stops every rank with exit code 0
//   - device: cuda serves T=2 and P=2 like CPU generate on a GPU (skips without one), and fails at
//     start-up with the reason on every worker rank without one
#include <fcntl.h>
#include <gtest/gtest.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <future>
#include <mutex>
#include <nlohmann/json.hpp>
#include <random>
#include <regex>
#include <sstream>
#include <thread>

#include "cluster/client.hpp"
#include "kernels/thread_pool.hpp"
#include "model/chat_template.hpp"
#include "model/gguf.hpp"
#include "model/hf_tokenizer.hpp"
#include "model/lora_adapter.hpp"
#include "model/random_model.hpp"
#include "model/tokenizer.hpp"
#include "model/tool_calls.hpp"
#include "tests/support/serve_job.hpp"
#include "tests/support/test_support.hpp"
#include "worker/cuda_llama_model.hpp"
#include "worker/gbnf_grammar.hpp"
#include "worker/json_constraint.hpp"
#include "worker/json_schema.hpp"
#include "worker/llama_model.hpp"

namespace nibble::cluster {
namespace {

namespace fs = std::filesystem;
using namespace std::chrono_literals;
using test_jobs::mpiexec;
using test_jobs::ServeJob;
using test_jobs::ServePlacement;

// prefix + i (written with append: GCC 12 warns falsely about "literal" + std::to_string).
std::string numbered(const char* prefix, size_t i) { return std::string(prefix).append(std::to_string(i)); }

struct Expected {
  std::vector<int32_t> tokens;
  std::string text;
};

// Single-process greedy output of the real CLI.
// extra: more options for `nibble generate` (e.g. --device cuda).
Expected nibble_generate(const std::string& model, const std::string& prompt, int max_tokens,
                         const std::string& extra = "") {
  const test::CommandResult r = test::run_command(
      test::nibble_bin() + " generate --model '" + model + "' --prompt '" + prompt + "' --max-tokens " +
      std::to_string(max_tokens) + " --temperature 0 --threads 1 --json " + extra);
  EXPECT_EQ(r.exit_code, 0) << r.output;
  const auto json = nlohmann::json::parse(r.output.substr(r.output.find('{')));
  return {json["tokens"].get<std::vector<int32_t>>(), json["text"].get<std::string>()};
}

protocol::GenerateRequest greedy(const std::string& id, decltype(protocol::GenerateRequest::prompt) prompt,
                                 uint32_t max_tokens, bool stream = false) {
  protocol::GenerateRequest request;
  request.request_id = id;
  request.prompt = std::move(prompt);
  request.sampling.temperature = 0.0f;
  request.max_tokens = max_tokens;
  request.stream = stream;
  return request;
}

std::string make_tiny_model(const fs::path& dir, kernels::DType type = kernels::DType::Q4_0) {
  const std::string path = (dir / "tiny.gguf").string();
  model::write_random_llama(path, model::llama_shape_by_name("tiny"), type, 5);
  return path;
}

// The coordinator's refusal of `r` (its message), or "served".
std::string refusal_of(Client& client, const protocol::GenerateRequest& r) {
  try {
    client.generate(r);
  } catch (const ClientError& e) {
    return e.what();
  }
  return "served";
}

const std::vector<std::string> kPrompts = {"The quick brown fox jumps over the lazy dog. Once upon a time",
                                           "Hello", "a b c d e f g h i j k l m n o p q r s t u v w x y z"};

// The CUDA serving tests compare with single-process `nibble generate --device cuda` on the same
// INT4 kernels (int4_kernels: cuda_cores in the job, --int4-kernels cuda-cores there): the GPU's
// logits differ from the CPU's (which feeds every matrix 8-bit activations) by ~1e-2 relative RMS, so
// a random model's near-ties may go either way over 24 greedy tokens; the CPU-GPU agreement is
// test_cuda_llama_model's, which compares tokens only where the CPU's top-2 gap is clear.
const std::string kCudaGenerate = "--device cuda --int4-kernels cuda-cores";
const std::string kCudaJob =
    "device: cuda\nint4_kernels: cuda_cores\ncontext: 1024\nkv_cache: { num_blocks: 64 }\n";

// Why a `device: cuda` job cannot run here ("" when it can): no usable GPU, or no mpirun.
std::string cuda_job_skip_reason() {
  if (const std::string why = worker::cuda_unavailable_reason(); !why.empty())
    return "no CUDA device: " + why;
  if (!fs::exists(mpiexec())) return "mpirun (" + mpiexec() + ") is absent";
  return "";
}

// A random model of the tiny shape but another seed than make_tiny_model's: a draft whose proposals
// are mostly rejected.
std::string make_unrelated_draft(const fs::path& dir) {
  const std::string path = (dir / "other.gguf").string();
  model::write_random_llama(path, model::llama_shape_by_name("tiny"), kernels::DType::Q4_0, 9);
  return path;
}

void expect_same_as_generate(const std::string& model, int tensor, int pipeline) {
  std::vector<Expected> expected;
  for (const std::string& p : kPrompts) expected.push_back(nibble_generate(model, p, 24));
  test::TempDir dir;
  ServeJob job(dir.path(), model, tensor, pipeline, "scheduler: { prefill_chunk: 16 }\n");
  ASSERT_TRUE(job.wait_ready()) << job.log();
  Client client(job.endpoint());
  for (size_t i = 0; i < kPrompts.size(); ++i) {
    SCOPED_TRACE("prompt " + std::to_string(i));
    const protocol::Final f = client.generate(greedy(numbered("p", i), kPrompts[i], 24));
    EXPECT_EQ(f.tokens, expected[i].tokens);
    EXPECT_EQ(f.text, expected[i].text);
  }
}

struct Shape {
  int tensor, pipeline;
};
std::string shape_name(const ::testing::TestParamInfo<Shape>& info) {
  return numbered("T", static_cast<size_t>(info.param.tensor))
      .append(numbered("_P", static_cast<size_t>(info.param.pipeline)));
}

class ServeShapes : public ::testing::TestWithParam<Shape> {};

TEST_P(ServeShapes, GreedyOutputEqualsSingleProcessGenerate) {
  test::TempDir models;
  expect_same_as_generate(make_tiny_model(models.path()), GetParam().tensor, GetParam().pipeline);
}

// Sampled requests with a repetition penalty (temperature 0.8, top-k 40, top-p 0.95, min-p 0.05,
// penalty 1.3, fixed seeds) give single-process `nibble generate`'s tokens: the sampling worker draws
// them from the same streams with the same histories (on a GPU the penalty is applied on the device).
TEST_P(ServeShapes, SampledWithARepetitionPenaltyEqualsSingleProcessGenerate) {
  test::TempDir models;
  const std::string model = make_tiny_model(models.path());
  test::TempDir dir;
  ServeJob job(dir.path(), model, GetParam().tensor, GetParam().pipeline,
               "scheduler: { prefill_chunk: 16 }\n");
  ASSERT_TRUE(job.wait_ready()) << job.log();
  Client client(job.endpoint());
  for (size_t i = 0; i < kPrompts.size(); ++i) {
    SCOPED_TRACE("prompt " + std::to_string(i));
    const uint64_t seed = 5 + i;
    const test::CommandResult r =
        test::run_command(test::nibble_bin() + " generate --model '" + model + "' --prompt '" + kPrompts[i] +
                          "' --max-tokens 24 --temperature 0.8 --top-k 40 --top-p 0.95 --min-p 0.05 "
                          "--repeat-penalty 1.3 --seed " +
                          std::to_string(seed) + " --threads 1 --json");
    ASSERT_EQ(r.exit_code, 0) << r.output;
    const auto want = nlohmann::json::parse(r.output.substr(r.output.find('{')));
    protocol::GenerateRequest request = greedy(numbered("r", i), kPrompts[i], 24);
    request.sampling.temperature = 0.8f;
    request.sampling.top_k = 40;
    request.sampling.top_p = 0.95f;
    request.sampling.min_p = 0.05f;
    request.sampling.repetition_penalty = 1.3f;
    request.sampling.seed = seed;
    const protocol::Final f = client.generate(request);
    EXPECT_EQ(f.tokens, want["tokens"].get<std::vector<int32_t>>());
  }
}

// llama.cpp's presence and frequency penalties and a logit bias, greedy and sampled: the tokens of
// single-process `nibble generate` with the same flags, through every layout (the sampling rank applies
// them with each sequence's history). A bias of +100 makes every token the biased one; a bias on a
// token outside the vocabulary is refused by name and the service keeps serving.
TEST_P(ServeShapes, PenaltiesAndLogitBiasEqualSingleProcessGenerate) {
  test::TempDir models;
  const std::string model = make_tiny_model(models.path());
  test::TempDir dir;
  ServeJob job(dir.path(), model, GetParam().tensor, GetParam().pipeline,
               "scheduler: { prefill_chunk: 16 }\n");
  ASSERT_TRUE(job.wait_ready()) << job.log();
  Client client(job.endpoint());
  bool changed = false;
  for (size_t i = 0; i < kPrompts.size(); ++i) {
    for (const bool sampled : {false, true}) {
      SCOPED_TRACE("prompt " + std::to_string(i) + (sampled ? " sampled" : " greedy"));
      const uint64_t seed = 11 + i;
      const int32_t biased = static_cast<int32_t>(40 + 7 * i);
      const test::CommandResult r =
          test::run_command(test::nibble_bin() + " generate --model '" + model + "' --prompt '" +
                            kPrompts[i] + "' --max-tokens 20 --temperature " + (sampled ? "0.8" : "0") +
                            " --top-k 40 --top-p 0.95 --min-p 0.05 --presence-penalty 1.5 "
                            "--frequency-penalty 0.5 --logit-bias " +
                            std::to_string(biased) + "+2.5 --logit-bias 3-1 --seed " + std::to_string(seed) +
                            " --threads 1 --json");
      ASSERT_EQ(r.exit_code, 0) << r.output;
      const auto want = nlohmann::json::parse(r.output.substr(r.output.find('{')));
      protocol::GenerateRequest request = greedy(numbered("p", i), kPrompts[i], 20);
      request.sampling.temperature = sampled ? 0.8f : 0.0f;
      request.sampling.top_k = 40;
      request.sampling.top_p = 0.95f;
      request.sampling.min_p = 0.05f;
      request.sampling.presence_penalty = 1.5f;
      request.sampling.frequency_penalty = 0.5f;
      request.sampling.logit_bias = {{biased, 2.5f}, {3, -1.0f}};
      request.sampling.seed = seed;
      const protocol::Final f = client.generate(request);
      EXPECT_EQ(f.tokens, want["tokens"].get<std::vector<int32_t>>());
      if (!sampled && f.tokens != client.generate(greedy(numbered("q", i), kPrompts[i], 20)).tokens)
        changed = true;
    }
  }
  EXPECT_TRUE(changed) << "the penalties and biases changed no greedy answer";
  protocol::GenerateRequest forced = greedy("forced", kPrompts[0], 12);
  forced.sampling.logit_bias = {{77, 100.0f}};
  EXPECT_EQ(client.generate(forced).tokens, std::vector<int32_t>(12, 77));
  protocol::GenerateRequest outside = greedy("outside", kPrompts[0], 4);
  outside.sampling.logit_bias = {{1 << 20, 1.0f}};
  try {
    client.generate(outside);
    ADD_FAILURE() << "a bias outside the vocabulary was accepted";
  } catch (const ClientError& e) {
    EXPECT_EQ(e.code, protocol::ErrorCode::bad_request);
    EXPECT_NE(std::string(e.what()).find("outside the vocabulary"), std::string::npos) << e.what();
  }
  EXPECT_EQ(client.generate(greedy("after", kPrompts[1], 4)).completion_tokens, 4u);

  // ignore_eos: with end-of-sequence made the only choice, a request ends at once; with ignore_eos it
  // goes on to max_tokens, every token that end-of-sequence and its text empty.
  const int32_t eos = model::Tokenizer::from_gguf(*model::GgufFile::open(model))->eos_id();
  protocol::GenerateRequest to_eos = greedy("eos", kPrompts[0], 6);
  to_eos.sampling.logit_bias = {{eos, 100.0f}};
  const protocol::Final ended = client.generate(to_eos);
  EXPECT_EQ(ended.finish_reason, protocol::FinishReason::eos);
  EXPECT_EQ(ended.completion_tokens, 0u);
  to_eos.request_id = "eos-ignored";
  to_eos.ignore_eos = true;
  const protocol::Final ignored = client.generate(to_eos);
  EXPECT_EQ(ignored.finish_reason, protocol::FinishReason::length);
  EXPECT_EQ(ignored.tokens, std::vector<int32_t>(6, eos));
  EXPECT_EQ(ignored.text, "");
}

// Prefix caching (on by default): a prompt whose first whole KV blocks an earlier request computed
// starts after them (Final::cached_prompt_tokens, the stats' sums) and gives the tokens of computing it
// in full, single-process `nibble generate`'s: greedy, and sampled with a repetition penalty, whose
// history holds the cached prefix too (the coordinator sends it with the sequence's first entry).
const std::string kLongPrompt = kPrompts[2] + " " + kPrompts[2] + " " + kPrompts[2];

TEST_P(ServeShapes, PrefixCachedPromptsGiveTheTokensOfComputingThemInFull) {
  test::TempDir models;
  const std::string model = make_tiny_model(models.path());
  const Expected want = nibble_generate(model, kLongPrompt, 24);
  const test::CommandResult r =
      test::run_command(test::nibble_bin() + " generate --model '" + model + "' --prompt '" + kLongPrompt +
                        "' --max-tokens 24 --temperature 0.8 --top-k 40 --top-p 0.95 --min-p 0.05 "
                        "--repeat-penalty 1.3 --seed 3 "
                        "--threads 1 --json");
  ASSERT_EQ(r.exit_code, 0) << r.output;
  const auto sampled_want =
      nlohmann::json::parse(r.output.substr(r.output.find('{')))["tokens"].get<std::vector<int32_t>>();
  test::TempDir dir;
  ServeJob job(dir.path(), model, GetParam().tensor, GetParam().pipeline,
               "scheduler: { prefill_chunk: 16 }\nkv_cache: { block_size: 16 }\n");
  ASSERT_TRUE(job.wait_ready()) << job.log();
  Client client(job.endpoint());
  const protocol::Final first = client.generate(greedy("first", kLongPrompt, 24));
  EXPECT_EQ(first.tokens, want.tokens);
  EXPECT_EQ(first.cached_prompt_tokens, 0u);
  const uint32_t prompt_tokens = first.prompt_tokens;
  ASSERT_GT(prompt_tokens, 48u);
  const protocol::Final again = client.generate(greedy("again", kLongPrompt, 24));
  EXPECT_EQ(again.tokens, want.tokens);
  EXPECT_EQ(again.cached_prompt_tokens,
            (prompt_tokens - 1) / 16 * 16);  // all whole blocks but the last token's
  protocol::GenerateRequest request = greedy("sampled", kLongPrompt, 24);
  request.sampling.temperature = 0.8f;
  request.sampling.top_k = 40;
  request.sampling.top_p = 0.95f;
  request.sampling.min_p = 0.05f;
  request.sampling.repetition_penalty = 1.3f;
  request.sampling.seed = 3;
  const protocol::Final sampled = client.generate(request);
  EXPECT_EQ(sampled.tokens, sampled_want);
  EXPECT_EQ(sampled.cached_prompt_tokens, again.cached_prompt_tokens);
  const protocol::Stats stats = client.stats();
  EXPECT_EQ(stats.prompt_tokens, 3u * prompt_tokens);
  EXPECT_EQ(stats.cached_prompt_tokens, 2u * again.cached_prompt_tokens);
  EXPECT_GT(stats.cached_kv_blocks, 0u);
}

// Log-probabilities (GenerateRequest::logprobs): each generated token's is the log-softmax of
// single-process `nibble logits` at its position, the top tokens are the most likely there (the greedy
// token first), streamed deltas carry the same values as the Final, and a draft (the target as its own,
// every proposal accepted) changes nothing: its accepted tokens' values come from the verifying pass.
// extra: more options for `nibble logits` (--device cuda ...); tolerance: on each logprob.
// `nibble logits` of `ids` (one process, the plain CPU reference): rows [ids.size(), n_vocab].
std::vector<float> nibble_logits(const std::string& model, const std::vector<int32_t>& all,
                                 const std::string& extra = "") {
  std::string ids;
  for (int32_t t : all) ids += std::to_string(t) + " ";
  test::TempDir dir;
  const std::string out = (dir.path() / "logits.f32").string();
  const test::CommandResult r =
      test::run_command(test::nibble_bin() + " logits --model '" + model + "' --threads 1 --tokens '" + ids +
                        "' --out " + out + " " + extra);
  EXPECT_EQ(r.exit_code, 0) << r.output;
  if (r.exit_code != 0) return {};
  std::vector<float> rows(fs::file_size(out) / sizeof(float));
  std::ifstream(out, std::ios::binary)
      .read(reinterpret_cast<char*>(rows.data()), static_cast<std::streamsize>(rows.size() * sizeof(float)));
  return rows;
}

// `value` is the log-softmax of `row` [n_vocab] at its token, and its top tokens are the most likely,
// in order, with their values.
void expect_log_softmax(const protocol::TokenLogprob& value, const float* row, size_t n_vocab, int32_t token,
                        size_t top_n, double tolerance) {
  double sum = 0;
  const float max = *std::max_element(row, row + n_vocab);
  for (size_t v = 0; v < n_vocab; ++v) sum += std::exp(static_cast<double>(row[v]) - max);
  const auto logprob = [&](int32_t t) { return static_cast<double>(row[t]) - max - std::log(sum); };
  EXPECT_NEAR(value.logprob, logprob(token), tolerance);
  ASSERT_EQ(value.top.size(), top_n);
  if (top_n > 0) {
    EXPECT_EQ(value.top[0].token, static_cast<int32_t>(std::max_element(row, row + n_vocab) - row));
  }
  for (size_t j = 0; j < value.top.size(); ++j) {
    EXPECT_NEAR(value.top[j].logprob, logprob(value.top[j].token), tolerance);
    if (j > 0) {
      EXPECT_LE(value.top[j].logprob, value.top[j - 1].logprob);
    }
  }
}

void expect_logprobs_match_nibble_logits(const std::string& model, const protocol::Final& f, int top_n,
                                         const std::string& extra = "", double tolerance = 2e-3) {
  ASSERT_EQ(f.logprobs.size(), f.tokens.size());
  std::vector<int32_t> all = f.prompt_token_ids;
  all.insert(all.end(), f.tokens.begin(), f.tokens.end());
  const std::vector<float> rows = nibble_logits(model, all, extra);  // [tokens, n_vocab]
  const size_t n_vocab = rows.size() / all.size();
  ASSERT_EQ(n_vocab * all.size(), rows.size());
  for (size_t i = 0; i < f.tokens.size(); ++i) {
    SCOPED_TRACE("token " + std::to_string(i));
    const float* row = rows.data() + (f.prompt_token_ids.size() - 1 + i) * n_vocab;
    // Greedy: the token is the most likely one.
    ASSERT_NO_FATAL_FAILURE(
        expect_log_softmax(f.logprobs[i], row, n_vocab, f.tokens[i], static_cast<size_t>(top_n), tolerance));
    EXPECT_EQ(f.logprobs[i].top[0].token, f.tokens[i]);
  }
}

// The largest difference between f's generated tokens' log-probabilities and the log-softmax of
// `nibble logits` (with `extra` options) at the same rows: how far apart two ways of computing them are.
double logprobs_apart_from_nibble_logits(const std::string& model, const protocol::Final& f,
                                         const std::string& extra = "") {
  std::vector<int32_t> all = f.prompt_token_ids;
  all.insert(all.end(), f.tokens.begin(), f.tokens.end());
  const std::vector<float> rows = nibble_logits(model, all, extra);
  const size_t n_vocab = rows.size() / all.size();
  double apart = 0;
  for (size_t i = 0; i < f.tokens.size(); ++i) {
    const float* row = rows.data() + (f.prompt_token_ids.size() - 1 + i) * n_vocab;
    double sum = 0;
    const float max = *std::max_element(row, row + n_vocab);
    for (size_t v = 0; v < n_vocab; ++v) sum += std::exp(static_cast<double>(row[v]) - max);
    apart = std::max(apart, std::fabs(f.logprobs[i].logprob - (row[f.tokens[i]] - max - std::log(sum))));
  }
  return apart;
}

// The prompt's own log-probabilities: one per prompt token after the first, the log-softmax of the
// row before it.
void expect_prompt_logprobs_match_nibble_logits(const std::string& model, const protocol::Final& f,
                                                size_t top_n, const std::string& extra = "",
                                                double tolerance = 2e-3) {
  ASSERT_EQ(f.prompt_logprobs.size(), f.prompt_token_ids.size() - 1);
  const std::vector<float> rows = nibble_logits(model, f.prompt_token_ids, extra);
  const size_t n_vocab = rows.size() / f.prompt_token_ids.size();
  ASSERT_EQ(n_vocab * f.prompt_token_ids.size(), rows.size());
  for (size_t i = 0; i < f.prompt_logprobs.size(); ++i) {
    SCOPED_TRACE("prompt token " + std::to_string(i + 1));
    ASSERT_NO_FATAL_FAILURE(expect_log_softmax(f.prompt_logprobs[i], rows.data() + i * n_vocab, n_vocab,
                                               f.prompt_token_ids[i + 1], top_n, tolerance));
  }
}

TEST_P(ServeShapes, LogprobsAreTheModelsLogSoftmaxAtEachToken) {
  test::TempDir models;
  const std::string model = make_tiny_model(models.path());
  test::TempDir dir;
  ServeJob job(dir.path(), model, GetParam().tensor, GetParam().pipeline,
               "scheduler: { prefill_chunk: 16 }\n");
  ASSERT_TRUE(job.wait_ready()) << job.log();
  Client client(job.endpoint());
  protocol::GenerateRequest request = greedy("lp", kPrompts[0], 12, /*stream=*/true);
  request.logprobs = 3;
  std::vector<protocol::TokenLogprob> streamed;
  const protocol::Final f = client.generate(request, [&](const protocol::Delta& d) {
    EXPECT_EQ(d.logprobs.size(), d.tokens.size());
    streamed.insert(streamed.end(), d.logprobs.begin(), d.logprobs.end());
  });
  EXPECT_EQ(f.tokens, nibble_generate(model, kPrompts[0], 12).tokens);
  EXPECT_EQ(streamed, f.logprobs);
  ASSERT_NO_FATAL_FAILURE(expect_logprobs_match_nibble_logits(model, f, 3));
  // Without asking, none.
  EXPECT_TRUE(client.generate(greedy("none", kPrompts[0], 4)).logprobs.empty());
}

// Prompt logprobs (vLLM's prompt_logprobs; OpenAI's echo with logprobs): each prompt token's value
// given the tokens before it, across prefill chunks of 5 (a chunk's last row predicts the next chunk's
// first token), streamed in the first Delta; a prompt the prefix cache holds is computed in full anyway;
// max_tokens 0 scores the prompt alone; the cache still serves requests that do not ask.
TEST_P(ServeShapes, PromptLogprobsAreTheModelsLogSoftmaxOverThePrompt) {
  test::TempDir models;
  const std::string model = make_tiny_model(models.path());
  test::TempDir dir;
  ServeJob job(dir.path(), model, GetParam().tensor, GetParam().pipeline,
               "scheduler: { prefill_chunk: 5 }\nkv_cache: { block_size: 4 }\n");
  ASSERT_TRUE(job.wait_ready()) << job.log();
  Client client(job.endpoint());
  const std::string prompt = kPrompts[0] + kPrompts[1];
  // Warm the prefix cache with the prompt.
  EXPECT_TRUE(client.generate(greedy("warm", prompt, 2)).prompt_logprobs.empty());

  protocol::GenerateRequest request = greedy("plp", prompt, 4, /*stream=*/true);
  request.prompt_logprobs = 2;
  int deltas_with_prompt = 0;
  std::vector<int32_t> streamed_ids;
  std::vector<protocol::TokenLogprob> streamed;
  const protocol::Final f = client.generate(request, [&](const protocol::Delta& d) {
    if (d.prompt_token_ids.empty()) return;
    ++deltas_with_prompt;
    streamed_ids = d.prompt_token_ids;
    streamed = d.prompt_logprobs;
  });
  ASSERT_GT(f.prompt_token_ids.size(), 12u) << "the prompt should span several chunks";
  EXPECT_EQ(f.cached_prompt_tokens, 0u);
  EXPECT_EQ(f.tokens, nibble_generate(model, prompt, 4).tokens);
  EXPECT_EQ(deltas_with_prompt, 1);
  EXPECT_EQ(streamed_ids, f.prompt_token_ids);
  EXPECT_EQ(streamed, f.prompt_logprobs);
  ASSERT_NO_FATAL_FAILURE(expect_prompt_logprobs_match_nibble_logits(model, f, 2));

  // Scoring alone: nothing generated, the same values (top tokens: none asked).
  protocol::GenerateRequest score = greedy("score", prompt, 0);
  score.prompt_logprobs = 0;
  const protocol::Final scored = client.generate(score);
  EXPECT_TRUE(scored.tokens.empty());
  EXPECT_EQ(scored.completion_tokens, 0u);
  EXPECT_EQ(scored.finish_reason, protocol::FinishReason::length);
  ASSERT_NO_FATAL_FAILURE(expect_prompt_logprobs_match_nibble_logits(model, scored, 0));

  // The cache still serves the others: the prompt's whole blocks but the last.
  const protocol::Final cached = client.generate(greedy("cached", prompt, 2));
  EXPECT_GT(cached.cached_prompt_tokens, 0u);
  EXPECT_TRUE(cached.prompt_logprobs.empty());
}

// JSON mode (response_format json_object): sampled output is always a prefix of a JSON object, and one
// that ends (EOS) is a whole object; a '}' biased to win closes the first object it may, and the
// request ends there. The same requests unconstrained are not JSON (what the constraint changes).
TEST_P(ServeShapes, JsonObjectOutputIsAJsonObject) {
  test::TempDir models;
  const std::string model = make_tiny_model(models.path());
  test::TempDir dir;
  ServeJob job(dir.path(), model, GetParam().tensor, GetParam().pipeline);
  ASSERT_TRUE(job.wait_ready()) << job.log();
  Client client(job.endpoint());
  const auto sampled = [&](int i, bool json) {
    protocol::GenerateRequest r = greedy("json" + std::to_string(i) + (json ? "j" : "t"), kPrompts[i % 3], 40,
                                         /*stream=*/true);
    r.sampling.temperature = 1.0f;
    r.sampling.seed = static_cast<uint64_t>(100 + i);
    if (json) r.response_format = protocol::ResponseFormat::json_object;
    return r;
  };
  int not_json = 0;
  for (int i = 0; i < 6; ++i) {
    std::string streamed;
    const protocol::Final f =
        client.generate(sampled(i, true), [&](const protocol::Delta& d) { streamed += d.text; });
    SCOPED_TRACE(f.text);
    EXPECT_EQ(streamed, f.text);
    EXPECT_GT(f.tokens.size(), 0u);
    worker::JsonPrefix prefix;
    EXPECT_TRUE(prefix.feed(f.text));
    if (f.finish_reason == protocol::FinishReason::eos) {
      EXPECT_TRUE(prefix.complete());
      EXPECT_TRUE(nlohmann::json::parse(f.text).is_object());
    }
    const protocol::Final free_text = client.generate(sampled(i, false));
    not_json += worker::JsonPrefix().feed(free_text.text) ? 0 : 1;
  }
  EXPECT_GT(not_json, 0) << "unconstrained output that is always JSON shows nothing";

  // '}' biased to win wherever it may: the object closes as soon as it can, then only EOS is left.
  const auto tokenizer = model::Tokenizer::from_gguf(*model::GgufFile::open(model));
  int32_t close = -1;
  for (int32_t t = 0; t < tokenizer->n_vocab() && close < 0; ++t)
    if (tokenizer->token_bytes(t) == "}") close = t;
  ASSERT_GE(close, 0);
  protocol::GenerateRequest forced = greedy("forced", kPrompts[0], 40);
  forced.response_format = protocol::ResponseFormat::json_object;
  forced.sampling.logit_bias = {{close, 100.0f}};
  const protocol::Final f = client.generate(forced);
  EXPECT_EQ(f.finish_reason, protocol::FinishReason::eos) << f.text;
  EXPECT_EQ(nlohmann::json::parse(f.text), nlohmann::json::object()) << f.text;
  ASSERT_FALSE(f.tokens.empty());
  EXPECT_EQ(f.tokens.back(), close);
}

// The schema of the structured-output tests, and whether a value is an instance of it.
const std::string kRecordSchema = R"({"type": "object", "properties": {"name": {"type": "string"},
    "age": {"type": "integer"}, "mood": {"enum": ["happy", "sad"]}, "tags": {"type": "array",
    "items": {"type": "boolean"}}}, "required": ["name", "age"], "additionalProperties": false})";
bool is_record(const nlohmann::json& v) {
  bool ok = v.is_object() && v.contains("name") && v["name"].is_string() && v.contains("age") &&
            v["age"].is_number_integer();
  for (const auto& [key, value] : v.items()) {
    if (key == "mood") ok = ok && (value == "happy" || value == "sad");
    if (key == "tags") {
      ok = ok && value.is_array();
      for (const auto& t : value) ok = ok && t.is_boolean();
    }
    ok = ok && (key == "name" || key == "age" || key == "mood" || key == "tags");
  }
  return ok;
}

// A greedy request for a record whose output closes soon: '"' biased most (strings close at once), then
// '}', ']' and ',', so it writes its keys and closes.
protocol::GenerateRequest forced_record(const std::string& model, const std::string& id) {
  const auto tokenizer = model::Tokenizer::from_gguf(*model::GgufFile::open(model));
  protocol::GenerateRequest r = greedy(id, kPrompts[0], 60);
  r.response_format = protocol::ResponseFormat::json_schema;
  r.json_schema = kRecordSchema;
  for (const auto& [bytes, bias] :
       std::vector<std::pair<std::string, float>>{{"\"", 100}, {",", 50}, {"]", 60}, {"}", 80}}) {
    for (int32_t t = 0; t < tokenizer->n_vocab(); ++t) {
      if (tokenizer->token_bytes(t) == bytes) {
        r.sampling.logit_bias.push_back({t, bias});
        break;
      }
    }
  }
  EXPECT_EQ(r.sampling.logit_bias.size(), 4u);
  return r;
}

// Structured output (response_format json_schema): sampled output is always a prefix of an instance of the
// schema, and one that ends (EOS) is a whole instance: the required keys, values of their types, enum
// values from the enum. With '"' biased most (strings close at once), then '}', ']' and ',', the output
// writes its keys and closes soon, and ends there.
TEST_P(ServeShapes, JsonSchemaOutputIsAnInstance) {
  test::TempDir models;
  const std::string model = make_tiny_model(models.path());
  test::TempDir dir;
  ServeJob job(dir.path(), model, GetParam().tensor, GetParam().pipeline);
  ASSERT_TRUE(job.wait_ready()) << job.log();
  Client client(job.endpoint());
  const std::string& schema_text = kRecordSchema;
  const auto schema = worker::JsonSchema::compile(schema_text);
  for (int i = 0; i < 4; ++i) {
    protocol::GenerateRequest r = greedy("schema" + std::to_string(i), kPrompts[i % 3], 40);
    r.sampling.temperature = 1.0f;
    r.sampling.seed = static_cast<uint64_t>(7 + i);
    r.response_format = protocol::ResponseFormat::json_schema;
    r.json_schema = schema_text;
    const protocol::Final f = client.generate(r);
    SCOPED_TRACE(f.text);
    worker::JsonPrefix prefix(schema.get());
    EXPECT_TRUE(prefix.feed(f.text));
    if (f.finish_reason == protocol::FinishReason::eos) {
      EXPECT_TRUE(is_record(nlohmann::json::parse(f.text)));
    }
  }
  protocol::GenerateRequest forced = forced_record(model, "forced");
  const protocol::Final f = client.generate(forced);
  EXPECT_EQ(f.finish_reason, protocol::FinishReason::eos) << f.text;
  EXPECT_TRUE(is_record(nlohmann::json::parse(f.text))) << f.text;
  // A schema outside the subset is refused by name, and the service goes on.
  protocol::GenerateRequest bad = forced;
  bad.request_id = "bad";
  bad.json_schema = R"({"type": "object", "properties": {"a": {"type": "string", "format": "email"}}})";
  const std::string refused = refusal_of(client, bad);
  EXPECT_NE(refused.find("json_schema.properties.a.format: \"email\" is not supported"), std::string::npos)
      << refused;
  EXPECT_EQ(client.generate(greedy("after", kPrompts[1], 2)).tokens.size(), 2u);
}

// GBNF grammars (llama.cpp's grammar): every answer is a prefix of a sentence of the grammar, a whole one
// when it ended by itself; sampled with and without truncation (min-p: masked first; none: the draw kept
// when allowed) and greedy; a grammar that does not compile is refused by name, and the service goes on.
TEST_P(ServeShapes, GrammarOutputIsASentence) {
  test::TempDir models;
  const std::string model = make_tiny_model(models.path());
  test::TempDir dir;
  ServeJob job(dir.path(), model, GetParam().tensor, GetParam().pipeline);
  ASSERT_TRUE(job.wait_ready()) << job.log();
  Client client(job.endpoint());
  const std::string grammar_text =
      "root ::= mood \": \" [0-9]{1,3} \"%\" (\" \" word){0,2} \".\"\n"
      "mood ::= \"happy\" | \"sad\" | \"lucky\"\nword ::= [a-z]{1,6}\n";
  const auto grammar = worker::Grammar::compile(grammar_text);
  for (int i = 0; i < 6; ++i) {
    protocol::GenerateRequest r = greedy("grammar" + std::to_string(i), kPrompts[i % 3], 40);
    r.sampling.temperature = i < 5 ? 1.0f : 0.0f;
    r.sampling.min_p = i % 2 == 0 ? 0.0f : 0.05f;
    r.sampling.seed = static_cast<uint64_t>(11 + i);
    r.response_format = protocol::ResponseFormat::grammar;
    r.grammar = grammar_text;
    const protocol::Final f = client.generate(r);
    SCOPED_TRACE(f.text);
    worker::GrammarPrefix prefix(grammar.get());
    EXPECT_TRUE(prefix.feed(f.text));
    EXPECT_EQ(f.finish_reason, protocol::FinishReason::eos);  // every sentence is short: it ends by itself
    EXPECT_TRUE(prefix.complete());
  }
  protocol::GenerateRequest bad = greedy("bad", kPrompts[0], 4);
  bad.response_format = protocol::ResponseFormat::grammar;
  bad.grammar = "root ::= \"a\" value\n";
  const std::string refused = refusal_of(client, bad);
  EXPECT_NE(refused.find("grammar: line 1, column 14: undefined rule 'value'"), std::string::npos) << refused;
  EXPECT_EQ(client.generate(greedy("after", kPrompts[1], 2)).tokens.size(), 2u);
}

// Two random LoRA adapters for `model` in `dir`: "sql.gguf" (rank 8 on every matrix and the head, F16)
// and "chat.gguf" (rank 4 on attn_v and ffn_down, F32); their paths.
std::pair<std::string, std::string> write_two_adapters(const fs::path& dir, const std::string& model) {
  const model::LlamaConfig config = model::LlamaConfig::from_gguf(*model::GgufFile::open(model));
  const std::string sql = (dir / "sql.gguf").string(), chat = (dir / "chat.gguf").string();
  model::make_random_lora(config, 8, 16, 0.4f, 1,
                          {std::begin(model::kLayerMatrices), std::end(model::kLayerMatrices)}, true)
      .write_gguf(sql, "llama", kernels::DType::F16);
  model::make_random_lora(config, 4, 0, 0.5f, 2, {model::LayerMatrix::attn_v, model::LayerMatrix::ffn_down})
      .write_gguf(chat, "llama", kernels::DType::F32);
  return {sql, chat};
}

// LoRA adapters (vLLM's multi-LoRA): requests naming an adapter get single-process `nibble generate
// --lora` output, others the base model's, whatever runs beside them; the same prompt under another
// adapter never starts from the first one's cached blocks (its K/V differ); an unknown name is refused.
TEST_P(ServeShapes, LoraAdaptersServeLikeGenerateWithTheAdapter) {
  test::TempDir models;
  const std::string model = make_tiny_model(models.path());
  const auto [sql, chat] = write_two_adapters(models.path(), model);
  const std::string adapters[] = {"", "sql", "chat"};
  std::vector<std::vector<Expected>> expected(3);  // [adapter][prompt]
  for (const std::string& p : kPrompts) {
    expected[0].push_back(nibble_generate(model, p, 16));
    expected[1].push_back(nibble_generate(model, p, 16, "--lora '" + sql + "' --lora-scale 0.5"));
    expected[2].push_back(nibble_generate(model, p, 16, "--lora '" + chat + "'"));
  }
  EXPECT_NE(expected[0][0].tokens, expected[1][0].tokens);
  EXPECT_NE(expected[0][0].tokens, expected[2][0].tokens);
  test::TempDir dir;
  ServeJob job(dir.path(), model, GetParam().tensor, GetParam().pipeline,
               "lora_adapters:\n  - { name: sql, path: '" + sql +
                   "', scale: 0.5 }\n  - { name: chat, path: '" + chat +
                   "' }\nscheduler: { prefill_chunk: 16 }\n");
  ASSERT_TRUE(job.wait_ready()) << job.log();
  // One after another: the same prompt under the base model, then each adapter (prefix caching on).
  {
    Client client(job.endpoint());
    for (size_t p = 0; p < kPrompts.size(); ++p) {
      for (size_t a = 0; a < 3; ++a) {
        SCOPED_TRACE("prompt " + std::to_string(p) + " adapter '" + adapters[a] + "'");
        protocol::GenerateRequest r = greedy(numbered("seq", p * 3 + a), kPrompts[p], 16);
        r.adapter = adapters[a];
        EXPECT_EQ(client.generate(r).tokens, expected[a][p].tokens);
      }
    }
  }
  // All at once, so that steps batch sequences of different adapters.
  std::vector<std::thread> threads;
  std::vector<std::vector<int32_t>> got(9);
  for (size_t i = 0; i < 9; ++i) {
    threads.emplace_back([&, i] {
      Client client(job.endpoint());
      protocol::GenerateRequest r = greedy(numbered("par", i), kPrompts[i / 3], 16);
      r.adapter = adapters[i % 3];
      got[i] = client.generate(r).tokens;
    });
  }
  for (auto& t : threads) t.join();
  for (size_t i = 0; i < 9; ++i) EXPECT_EQ(got[i], expected[i % 3][i / 3].tokens) << "request " << i;

  Client client(job.endpoint());
  protocol::GenerateRequest unknown = greedy("unknown", kPrompts[0], 4);
  unknown.adapter = "sq1";
  const std::string refused = refusal_of(client, unknown);
  EXPECT_NE(refused.find("adapter: 'sq1' is not served; served: sql, chat"), std::string::npos) << refused;
  EXPECT_EQ(client.generate(greedy("after", kPrompts[1], 2)).tokens.size(), 2u);
  // bench-serve spreads its requests over the adapters (and the base model, "-").
  const auto bench = [&](const std::string& loras) {
    const test::CommandResult r =
        test::run_command(test::nibble_bin() + " bench-serve --endpoint " + job.endpoint() +
                          " -c 3 -r 6 --max-tokens 4:8 --json --lora " + loras);
    return nlohmann::json::parse(r.output.substr(r.output.find('{')));
  };
  const nlohmann::json served = bench("sql,chat,-");
  EXPECT_EQ(served["ok"], 6) << served;
  const nlohmann::json half = bench("sql,sq1");
  EXPECT_EQ(half["ok"], 3) << half;
  EXPECT_EQ(half["failures"]["notFound"], 3) << half;
  // This job's config does not let clients load or unload adapters.
  for (const bool load : {true, false}) {
    try {
      if (load) {
        client.load_adapter("chat2", chat);
      } else {
        client.unload_adapter("chat");
      }
      ADD_FAILURE() << "an adapter " << (load ? "loaded" : "unloaded") << " without server.lora_updates";
    } catch (const ClientError& e) {
      EXPECT_EQ(e.code, std::optional(protocol::ErrorCode::bad_request));
      EXPECT_NE(std::string(e.what()).find("server.lora_updates is off"), std::string::npos) << e.what();
    }
  }
  EXPECT_EQ(client.stats().adapters, (std::vector<std::string>{"sql", "chat"}));
}

// The ClientError a call throws (its code and message; "none" when it does not throw).
template <class Call>
std::pair<std::optional<protocol::ErrorCode>, std::string> client_error_of(Call&& call) {
  try {
    call();
  } catch (const ClientError& e) {
    return {e.code, e.what()};
  }
  return {std::nullopt, "none"};
}

// Adapters loaded and unloaded while the job runs (server.lora_updates, vLLM's /v1/load_lora_adapter):
// the answer comes once every worker has the adapter, whose requests then get `nibble generate --lora`
// output; an unloaded name is refused, and a request still running on it finishes with it; a slot
// reused by another adapter never serves the first one's cached prefix; a name loaded twice and files
// that are not adapters of this model are refused by name (the worker's own message), and the service
// goes on.
TEST_P(ServeShapes, LoraAdaptersLoadAndUnloadWhileTheJobRuns) {
  test::TempDir models;
  const std::string model = make_tiny_model(models.path());
  const auto [sql, chat] = write_two_adapters(models.path(), model);
  const std::string& prompt = kPrompts[0];
  const Expected base = nibble_generate(model, prompt, 16);
  const Expected with_sql = nibble_generate(model, prompt, 16, "--lora '" + sql + "' --lora-scale 0.5");
  const Expected with_chat = nibble_generate(model, prompt, 48, "--lora '" + chat + "'");
  ASSERT_NE(with_sql.tokens, base.tokens);
  test::TempDir dir;
  ServeJob job(dir.path(), model, GetParam().tensor, GetParam().pipeline,
               "scheduler: { prefill_chunk: 16 }\n",
               ServeJob::Placement{.server_keys = "lora_updates: true"});
  ASSERT_TRUE(job.wait_ready()) << job.log();
  Client client(job.endpoint());
  const auto generate = [&](const std::string& id, const std::string& adapter, int max_tokens) {
    protocol::GenerateRequest r = greedy(id, prompt, max_tokens);
    r.adapter = adapter;
    return client.generate(r).tokens;
  };
  using Names = std::vector<std::string>;
  EXPECT_EQ(client.stats().adapters, Names{});
  EXPECT_EQ(client.load_adapter("sql", sql, 0.5f), Names{"sql"});
  EXPECT_EQ(client.stats().adapters, Names{"sql"});
  EXPECT_EQ(generate("sql-1", "sql", 16), with_sql.tokens);
  EXPECT_EQ(generate("base-1", "", 16), base.tokens);
  const auto twice = client_error_of([&] { client.load_adapter("sql", chat); });
  EXPECT_EQ(twice.first, std::optional(protocol::ErrorCode::bad_request));
  EXPECT_NE(twice.second.find("the LoRA adapter 'sql' is already loaded"), std::string::npos) << twice.second;

  // Unloaded: refused by name; its slot reused by the other adapter, whose answer to the same prompt
  // (cached under sql a moment ago) is its own.
  EXPECT_EQ(client.unload_adapter("sql"), Names{});
  const auto gone = client_error_of([&] { generate("sql-2", "sql", 4); });
  EXPECT_EQ(gone.first, std::optional(protocol::ErrorCode::not_found));
  EXPECT_NE(gone.second.find("adapter: 'sql' is not served"), std::string::npos) << gone.second;
  const auto unknown = client_error_of([&] { client.unload_adapter("sql"); });
  EXPECT_EQ(unknown.first, std::optional(protocol::ErrorCode::not_found));
  EXPECT_NE(unknown.second.find("'sql' is not loaded"), std::string::npos) << unknown.second;
  EXPECT_EQ(client.load_adapter("chat", chat), Names{"chat"});
  EXPECT_EQ(generate("chat-1", "chat", 48), with_chat.tokens);

  // Files that are not adapters of this model: every worker tries, the answer names the file and the
  // worker; nothing is served under the name, and the service goes on.
  const std::string missing = (models.path() / "missing.gguf").string();
  for (const std::string& path : {missing, model}) {
    const auto bad = client_error_of([&] { client.load_adapter("bad", path); });
    EXPECT_EQ(bad.first, std::optional(protocol::ErrorCode::bad_request));
    EXPECT_NE(bad.second.find("path: "), std::string::npos) << bad.second;
    EXPECT_NE(bad.second.find(path), std::string::npos) << bad.second;
    EXPECT_NE(bad.second.find("(worker rank "), std::string::npos) << bad.second;
  }
  EXPECT_EQ(client.stats().adapters, Names{"chat"});

  // Unloaded while a request runs on it: that request finishes with the adapter, a later one is refused;
  // the slot, emptied when the request ends, takes sql again.
  std::promise<void> started;
  std::vector<int32_t> running;
  std::thread runner([&] {
    Client other(job.endpoint());
    protocol::GenerateRequest r = greedy("chat-running", prompt, 48, true);
    r.adapter = "chat";
    bool first = true;
    running = other
                  .generate(r,
                            [&](const protocol::Delta&) {
                              if (first) started.set_value();
                              first = false;
                            })
                  .tokens;
  });
  started.get_future().wait();
  EXPECT_EQ(client.unload_adapter("chat"), Names{});
  EXPECT_EQ(client_error_of([&] { generate("chat-2", "chat", 4); }).first,
            std::optional(protocol::ErrorCode::not_found));
  runner.join();
  EXPECT_EQ(running, with_chat.tokens);
  EXPECT_EQ(client.load_adapter("sql", sql, 0.5f), Names{"sql"});
  EXPECT_EQ(generate("sql-3", "sql", 16), with_sql.tokens);
  EXPECT_EQ(generate("base-2", "", 16), base.tokens);

  // The same from the command line.
  const test::CommandResult unloaded = test::run_command(test::nibble_bin() + " client --endpoint " +
                                                         job.endpoint() + " --unload-lora sql --json");
  ASSERT_EQ(unloaded.exit_code, 0) << unloaded.output;
  EXPECT_EQ(nlohmann::json::parse(unloaded.output.substr(unloaded.output.find('{')))["adapters"],
            nlohmann::json::array());
  const test::CommandResult loaded = test::run_command(test::nibble_bin() + " client --endpoint " +
                                                       job.endpoint() + " --load-lora 'chat=" + chat + "'");
  EXPECT_EQ(loaded.exit_code, 0) << loaded.output;
  EXPECT_NE(loaded.output.find("adapters: chat"), std::string::npos) << loaded.output;
  const test::CommandResult malformed =
      test::run_command(test::nibble_bin() + " client --endpoint " + job.endpoint() + " --load-lora chat");
  EXPECT_EQ(malformed.exit_code, 2) << malformed.output;
  EXPECT_NE(malformed.output.find("--load-lora: expected NAME=PATH"), std::string::npos) << malformed.output;
  EXPECT_EQ(generate("chat-3", "chat", 48), with_chat.tokens);
}

// An 8-bit KV cache (kv_cache.dtype: q8_0): the job's output is single-process `nibble generate
// --kv-cache-dtype q8_0`'s, alone and batched, with prompts served again from the prefix cache, under
// tensor and pipeline parallelism (each shard's heads are whole blocks of 32).
TEST(Serve, Q8_0KvCacheServesLikeGenerateWithIt) {
  test::TempDir models;
  const std::string model = make_tiny_model(models.path());
  std::vector<Expected> expected;
  for (const std::string& p : kPrompts)
    expected.push_back(nibble_generate(model, p, 16, "--kv-cache-dtype q8_0"));
  test::TempDir dir;
  ServeJob job(dir.path(), model, 2, 2, "kv_cache: { dtype: q8_0 }\nscheduler: { prefill_chunk: 16 }\n");
  ASSERT_TRUE(job.wait_ready()) << job.log();
  {
    Client client(job.endpoint());
    for (size_t i = 0; i < kPrompts.size(); ++i)
      EXPECT_EQ(client.generate(greedy(numbered("one", i), kPrompts[i], 16)).tokens, expected[i].tokens) << i;
    // The greedy tokens of this small model do not change with the cache, its log-probabilities do:
    // the job's are the 8-bit cache's, well apart from the fp16 cache's.
    protocol::GenerateRequest scored = greedy("scored", kPrompts[0], 16);
    scored.logprobs = 1;
    const protocol::Final f = client.generate(scored);
    ASSERT_NO_FATAL_FAILURE(expect_logprobs_match_nibble_logits(model, f, 1, "--kv-cache-dtype q8_0", 1e-4));
    const double apart = logprobs_apart_from_nibble_logits(model, f);
    EXPECT_GT(apart, 1e-3)
        << "the fp16 cache gives the same log-probabilities: the test cannot tell them apart";
    std::cout << "[ info ] q8_0 job against the fp16 cache's logprobs: up to " << apart << "\n";
  }
  std::vector<std::thread> threads;
  std::vector<protocol::Final> got(6);
  for (size_t i = 0; i < got.size(); ++i) {
    threads.emplace_back([&, i] {
      Client client(job.endpoint());
      got[i] = client.generate(greedy(numbered("par", i), kPrompts[i % 3], 16));
    });
  }
  for (auto& t : threads) t.join();
  uint32_t cached = 0;
  for (size_t i = 0; i < got.size(); ++i) {
    EXPECT_EQ(got[i].tokens, expected[i % 3].tokens) << "request " << i;
    cached += got[i].cached_prompt_tokens;
  }
  EXPECT_GT(cached, 0u) << "no prompt came from the prefix cache";
}

// llama.cpp's rotation of a quantized cache (heads of 64: tiny-h64) in the service: a Q4_0 cache's job,
// its two pipeline stages each rotating their layers' Q, K and V, gives `nibble generate`'s tokens and
// `nibble logits`' log-probabilities with the same cache; with `rotation: false` in the config, those of
// --no-kv-rotation, well apart from the rotated ones; and with each side its own type (k_dtype, v_dtype:
// llama.cpp's --cache-type-k / -v), those of the same types, apart from one type for both.
TEST(Serve, RotatedQuantizedKvCacheServesLikeGenerateWithIt) {
  test::TempDir models;
  const std::string model = (models.path() / "tiny-h64.gguf").string();
  model::write_random_llama(model, model::llama_shape_by_name("tiny-h64"), kernels::DType::Q4_0, 5);
  struct Case {
    std::string yaml, flags, other_flags, log;
  };
  const Case cases[] = {{"dtype: q4_0, rotation: true", "--kv-cache-dtype q4_0",
                         "--kv-cache-dtype q4_0 --no-kv-rotation", "(q4_0)"},
                        {"dtype: q4_0, rotation: false", "--kv-cache-dtype q4_0 --no-kv-rotation",
                         "--kv-cache-dtype q4_0", "(q4_0, unrotated)"},
                        {"k_dtype: q8_0, v_dtype: q4_0", "--cache-type-k q8_0 --cache-type-v q4_0",
                         "--kv-cache-dtype q4_0", "(k q8_0, v q4_0)"}};
  for (const Case& c : cases) {
    SCOPED_TRACE(c.yaml);
    const Expected expected = nibble_generate(model, kPrompts[0], 16, c.flags);
    test::TempDir dir;
    ServeJob job(dir.path(), model, 1, 2, "kv_cache: { " + c.yaml + " }\n");
    ASSERT_TRUE(job.wait_ready()) << job.log();
    EXPECT_NE(job.log().find(c.log), std::string::npos) << job.log();
    Client client(job.endpoint());
    protocol::GenerateRequest scored = greedy("scored", kPrompts[0], 16);
    scored.logprobs = 1;
    const protocol::Final f = client.generate(scored);
    EXPECT_EQ(f.tokens, expected.tokens);
    ASSERT_NO_FATAL_FAILURE(expect_logprobs_match_nibble_logits(model, f, 1, c.flags, 1e-4));
    EXPECT_GT(logprobs_apart_from_nibble_logits(model, f, c.other_flags), 1e-3)
        << c.other_flags << " gives the same log-probabilities";
  }
}

// vLLM's stop_token_ids and min_tokens: a sampled stop token ends the request and stays in its output;
// before min_tokens tokens no end-of-generation or stop token is sampled (the sampling worker masks them),
// after it they are again.
TEST_P(ServeShapes, StopTokenIdsAndMinTokensAsVllm) {
  test::TempDir models;
  const std::string model = make_tiny_model(models.path());
  const std::vector<int32_t> reference = nibble_generate(model, kPrompts[0], 12).tokens;
  ASSERT_EQ(reference.size(), 12u);
  size_t at = 1;  // a token that does not occur before it
  while (at < reference.size() && std::count(reference.begin(), reference.begin() + at, reference[at]) > 0)
    ++at;
  ASSERT_LT(at, 6u);
  test::TempDir dir;
  ServeJob job(dir.path(), model, GetParam().tensor, GetParam().pipeline);
  ASSERT_TRUE(job.wait_ready()) << job.log();
  Client client(job.endpoint());

  protocol::GenerateRequest stop = greedy("stop", kPrompts[0], 12);
  stop.stop_token_ids = {reference[at]};
  const protocol::Final stopped = client.generate(stop);
  EXPECT_EQ(stopped.tokens, std::vector<int32_t>(reference.begin(), reference.begin() + at + 1));
  EXPECT_EQ(stopped.finish_reason, protocol::FinishReason::stop);

  // The stop token held back until 6 tokens: the same tokens before it, another one in its place.
  protocol::GenerateRequest held = stop;
  held.request_id = "held";
  held.min_tokens = 6;
  const protocol::Final f = client.generate(held);
  ASSERT_GT(f.tokens.size(), at);
  EXPECT_EQ(std::vector<int32_t>(f.tokens.begin(), f.tokens.begin() + at),
            std::vector<int32_t>(reference.begin(), reference.begin() + at));
  EXPECT_NE(f.tokens[at], reference[at]);
  EXPECT_GE(f.tokens.size(), 6u);

  // EOS made certain: it ends the request at once, or after min_tokens tokens.
  const auto tokenizer = model::Tokenizer::from_gguf(*model::GgufFile::open(model));
  protocol::GenerateRequest eos = greedy("eos", kPrompts[0], 12);
  eos.sampling.logit_bias = {{tokenizer->eos_id(), 100.0f}};
  EXPECT_TRUE(client.generate(eos).tokens.empty());
  eos.request_id = "eos-min";
  eos.min_tokens = 5;
  const protocol::Final five = client.generate(eos);
  EXPECT_EQ(five.tokens.size(), 5u);
  EXPECT_EQ(five.finish_reason, protocol::FinishReason::eos);
}

TEST_P(ServeShapes, FixtureModelsGreedyOutputEqualsSingleProcessGenerate) {
  NIBBLE_REQUIRE_FIXTURES(fixtures);
  for (const char* name : {"tiny-llama-f32.gguf", "tiny-llama-q8_0.gguf", "tiny-llama-q4_0.gguf"}) {
    SCOPED_TRACE(name);
    expect_same_as_generate((fixtures / "models" / name).string(), GetParam().tensor, GetParam().pipeline);
  }
}

INSTANTIATE_TEST_SUITE_P(Layouts, ServeShapes, ::testing::Values(Shape{2, 1}, Shape{1, 2}, Shape{2, 2}),
                         shape_name);

// Speculative decoding through the service: at temperature 0 the output with a draft equals
// single-process `nibble generate` without one, for k in {1, 3, 5}, in one process and under
// T=2 x P=2, with the draft next to the sampling worker or on a rank of its own; the target as its
// own draft accepts every proposal.
struct SpecCase {
  int tensor, pipeline, k;
  bool own_rank = false;
};
std::string spec_name(const ::testing::TestParamInfo<SpecCase>& info) {
  return numbered("T", static_cast<size_t>(info.param.tensor))
      .append(numbered("_P", static_cast<size_t>(info.param.pipeline)))
      .append(numbered("_k", static_cast<size_t>(info.param.k)))
      .append(info.param.own_rank ? "_own_rank" : "");
}

// draft "ngram": prompt lookup (no model).
std::string draft_yaml(const std::string& draft, int k, bool own_rank) {
  const std::string what = draft == "ngram" ? "method: ngram" : "path: \"" + draft + "\"";
  return "draft: { " + what + ", max_draft_tokens: " + std::to_string(k) + ", adaptive: false" +
         (own_rank ? ", placement: own_rank" : "") + " }\n";
}
class ServeSpeculative : public ::testing::TestWithParam<SpecCase> {};

void expect_speculative_same_as_generate(const std::string& target, const std::string& draft,
                                         const SpecCase& c, bool expect_all_accepted) {
  std::vector<Expected> expected;
  for (const std::string& p : kPrompts) expected.push_back(nibble_generate(target, p, 24));
  test::TempDir dir;
  ServeJob::Placement placement;
  placement.draft_rank = c.own_rank;
  ServeJob job(dir.path(), target, c.tensor, c.pipeline, draft_yaml(draft, c.k, c.own_rank), placement);
  ASSERT_TRUE(job.wait_ready()) << job.log();
  if (c.own_rank) {
    EXPECT_NE(job.log().find("draft rank " + std::to_string(1 + c.tensor * c.pipeline) + ": " + draft),
              std::string::npos)
        << job.log();
  }
  Client client(job.endpoint());
  uint64_t proposed = 0, accepted = 0;
  for (size_t i = 0; i < kPrompts.size(); ++i) {
    SCOPED_TRACE(kPrompts[i]);
    const protocol::Final f = client.generate(greedy(numbered("s", i), kPrompts[i], 24, i % 2 == 0));
    EXPECT_EQ(f.tokens, expected[i].tokens);
    EXPECT_EQ(f.text, expected[i].text);
    proposed += f.draft_proposed;
    accepted += f.draft_accepted;
  }
  EXPECT_GT(proposed, 0u) << "the draft never proposed anything";
  if (expect_all_accepted) {
    EXPECT_EQ(accepted, proposed);
  }
  const protocol::Stats stats = client.stats();
  EXPECT_EQ(stats.draft_proposed, proposed);
  EXPECT_EQ(stats.draft_accepted, accepted);
}

TEST_P(ServeSpeculative, GreedyOutputWithADraftEqualsGenerate) {
  test::TempDir models;
  const std::string target = make_tiny_model(models.path());
  // The target as its own draft: every proposal is right.
  expect_speculative_same_as_generate(target, target, GetParam(), true);
  // An unrelated draft: most proposals are rejected and rolled back.
  const std::string other = (models.path() / "other.gguf").string();
  model::write_random_llama(other, model::llama_shape_by_name("tiny"), kernels::DType::Q4_0, 99);
  expect_speculative_same_as_generate(target, other, GetParam(), false);
}

// A LoRA adapter under speculative decoding: the base model's drafts (the target without its adapter
// as the draft, then prompt lookup) are verified by the adapted target, so the tokens are `generate
// --lora`'s, T1 and T2 x P2, sampled at temperature 0.8 too (the verify pass samples with the adapter).
TEST(Serve, LoraAdapterWithDraftsEqualsGenerateWithTheAdapter) {
  test::TempDir models;
  const std::string target = make_tiny_model(models.path());
  const std::string adapter = (models.path() / "a.gguf").string();
  model::make_random_lora(model::LlamaConfig::from_gguf(*model::GgufFile::open(target)), 8, 16, 0.3f, 5,
                          {std::begin(model::kLayerMatrices), std::end(model::kLayerMatrices)}, true)
      .write_gguf(adapter, "llama", kernels::DType::F16);
  std::vector<Expected> expected;
  for (const std::string& p : kPrompts)
    expected.push_back(nibble_generate(target, p, 24, "--lora '" + adapter + "'"));
  for (const std::string& draft : {target, std::string("ngram")}) {
    for (const Shape shape : {Shape{1, 1}, Shape{2, 2}}) {
      SCOPED_TRACE(numbered("T", static_cast<size_t>(shape.tensor)).append(" ").append(draft));
      std::string yaml = draft_yaml(draft, 3, false);
      yaml.append("lora_adapters: [{name: tuned, path: '").append(adapter).append("'}]\n");
      test::TempDir dir;
      ServeJob job(dir.path(), target, shape.tensor, shape.pipeline, yaml);
      ASSERT_TRUE(job.wait_ready()) << job.log();
      Client client(job.endpoint());
      uint64_t proposed = 0;
      for (size_t i = 0; i < kPrompts.size(); ++i) {
        protocol::GenerateRequest r = greedy(numbered("s", i), kPrompts[i], 24);
        r.adapter = "tuned";
        const protocol::Final f = client.generate(r);
        EXPECT_EQ(f.tokens, expected[i].tokens) << kPrompts[i];
        proposed += f.draft_proposed;
        r.request_id = numbered("t", i);
        r.sampling.temperature = 0.8f;
        r.sampling.seed = 7;
        r.ignore_eos = true;
        EXPECT_EQ(client.generate(r).tokens.size(), 24u);  // an answer, not an error
      }
      EXPECT_GT(proposed, 0u) << "the draft never proposed anything";
    }
  }
}

// Prompt lookup instead of a draft model: the same tokens as generate, in every layout, with proposals
// made (the prompts and a small model's output repeat tokens).
TEST(Serve, GreedyOutputWithNgramDraftsEqualsGenerate) {
  test::TempDir models;
  const std::string target = make_tiny_model(models.path());
  for (const SpecCase& c : {SpecCase{1, 1, 1}, SpecCase{1, 1, 3}, SpecCase{1, 1, 5}, SpecCase{2, 2, 1},
                            SpecCase{2, 2, 3}, SpecCase{2, 2, 5}}) {
    SCOPED_TRACE(spec_name(::testing::TestParamInfo<SpecCase>(c, 0)));
    expect_speculative_same_as_generate(target, "ngram", c, false);
  }
}

TEST_P(ServeSpeculative, FixtureModelsGreedyOutputWithADraftEqualsGenerate) {
  NIBBLE_REQUIRE_FIXTURES(fixtures);
  const fs::path m = fixtures / "models";
  expect_speculative_same_as_generate((m / "tiny-llama-f32.gguf").string(),
                                      (m / "tiny-llama-q4_0.gguf").string(), GetParam(), false);
  expect_speculative_same_as_generate((m / "fortune-target-f16.gguf").string(),
                                      (m / "fortune-draft-f16.gguf").string(), GetParam(), false);
}

INSTANTIATE_TEST_SUITE_P(Layouts, ServeSpeculative,
                         ::testing::Values(SpecCase{1, 1, 1}, SpecCase{1, 1, 3}, SpecCase{1, 1, 5},
                                           SpecCase{2, 2, 1}, SpecCase{2, 2, 3}, SpecCase{2, 2, 5},
                                           SpecCase{1, 1, 3, true}, SpecCase{2, 2, 3, true}),
                         spec_name);

// A text prompt with parse_special: the coordinator's tokenizer turns control tokens' texts into those
// tokens (a chat-formatted prompt), as `nibble tokenize --special` does; without it they stay text.
TEST(Serve, ParseSpecialTurnsControlTokenTextsIntoTokens) {
  test::TempDir models;
  const std::string model = make_tiny_model(models.path());
  const std::string text = "Hello</s> world";
  const auto ids = [&](const std::string& flags) {
    const test::CommandResult r = test::run_command(test::nibble_bin() + " tokenize --model '" + model +
                                                    "' --text '" + text + "' " + flags);
    EXPECT_EQ(r.exit_code, 0) << r.output;
    std::vector<int32_t> out;
    std::istringstream in(r.output);
    for (int32_t id; in >> id;) out.push_back(id);
    return out;
  };
  const std::vector<int32_t> special = ids("--special"), plain = ids("");
  test::TempDir dir;
  ServeJob job(dir.path(), model, 1, 1);
  ASSERT_TRUE(job.wait_ready()) << job.log();
  Client client(job.endpoint());
  protocol::GenerateRequest request = greedy("special", text, 2);
  request.parse_special = true;
  const protocol::Final parsed = client.generate(request);
  const protocol::Final unparsed = client.generate(greedy("plain", text, 2));
  EXPECT_EQ(parsed.prompt_token_ids, special);
  EXPECT_EQ(unparsed.prompt_token_ids, plain);
  const int32_t eos = 2;  // the tiny model's </s>
  EXPECT_EQ(std::count(special.begin(), special.end(), eos), 1);
  EXPECT_EQ(std::count(plain.begin(), plain.end(), eos), 0);
}

// `model` copied to `out` with tokenizer.chat_template set to `chat_template`.
std::string with_chat_template(const std::string& model, const fs::path& out,
                               const std::string& chat_template) {
  const auto in = model::GgufFile::open(model);
  model::GgufWriter w;
  for (const auto& [key, value] : in->metadata()) w.set(key, value);
  w.set_string("tokenizer.chat_template", chat_template);
  for (const model::GgufTensorInfo& t : in->tensors()) {
    const uint8_t* data = in->tensor_data(t);
    w.add_tensor(t.name, t.dims, t.type,
                 std::vector<uint8_t>(data, data + kernels::row_bytes(t.type, t.row_elements()) * t.rows()));
  }
  w.write(out.string());
  return out.string();
}

// Conversations (GenerateRequest's messages): the coordinator formats them with the model's chat
// template, as llama.cpp detects it in tokenizer.chat_template, or the configured chat_template, and
// tokenizes the text with special tokens parsed: the prompt is `nibble tokenize --special` of
// model::format_chat's text. A model without a template refuses them by name and keeps serving.
TEST(Serve, ChatMessagesAreFormattedWithTheModelsTemplate) {
  test::TempDir models;
  const std::string plain = make_tiny_model(models.path());
  const std::string chatml =
      with_chat_template(plain, models.path() / "chatml.gguf",
                         "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + "
                         "message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}");
  const std::vector<protocol::ChatMessage> messages = {{"system", "Be brief."}, {"user", "Hello</s> there"}};
  // What `nibble tokenize --special` gives for the formatted text (the same tokenizer, in process: a shell
  // would drop the text's trailing newline).
  const auto tokenized = [&](const std::string& model, model::ChatFormat format) {
    const std::vector<model::ChatMessage> chat = {{"system", "Be brief."}, {"user", "Hello</s> there"}};
    const auto tokenizer = model::Tokenizer::from_gguf(*model::GgufFile::open(model));
    return tokenizer->encode(model::format_chat(format, chat, true), tokenizer->add_bos_default(),
                             /*parse_special=*/true);
  };
  struct Case {
    std::string model, yaml;
    std::optional<model::ChatFormat> format;
  };
  for (const Case& c : {Case{chatml, "", model::ChatFormat::chatml},
                        Case{plain, "chat_template: llama2-sys\n", model::ChatFormat::llama2_sys},
                        Case{plain, "", std::nullopt}}) {
    SCOPED_TRACE(c.format ? model::chat_format_name(*c.format) : "no template");
    test::TempDir dir;
    ServeJob job(dir.path(), c.model, 1, 1, c.yaml);
    ASSERT_TRUE(job.wait_ready()) << job.log();
    Client client(job.endpoint());
    if (!c.format) {
      try {
        client.generate(greedy("chat", messages, 2));
        ADD_FAILURE() << "a conversation without a chat template was served";
      } catch (const ClientError& e) {
        ASSERT_TRUE(e.code.has_value());
        EXPECT_EQ(*e.code, protocol::ErrorCode::bad_request);
        EXPECT_NE(std::string(e.what()).find("has no chat template"), std::string::npos) << e.what();
      }
      EXPECT_EQ(client.generate(greedy("after", kPrompts[1], 2)).tokens.size(), 2u);  // still serving
      continue;
    }
    const protocol::Final f = client.generate(greedy("chat", messages, 4));
    EXPECT_EQ(f.prompt_token_ids, tokenized(c.model, *c.format));
    // The same conversation from the command line.
    const test::CommandResult r =
        test::run_command(test::nibble_bin() + " client --endpoint " + job.endpoint() +
                          " --system 'Be brief.' --chat 'Hello</s> there' "
                          "--temperature 0 --max-tokens 4 --json");
    ASSERT_EQ(r.exit_code, 0) << r.output;
    const auto out = nlohmann::json::parse(r.output.substr(r.output.find('{')));
    EXPECT_EQ(out["prompt_tokens"].get<std::vector<int32_t>>(), f.prompt_token_ids);
    EXPECT_EQ(out["tokens"].get<std::vector<int32_t>>(), f.tokens);
    EXPECT_EQ(std::count(f.prompt_token_ids.begin(), f.prompt_token_ids.end(), 2), 1)  // "</s>" parsed
        << "the special token in the user's text";
    EXPECT_NE(job.log().find(std::string("chat format: ") + model::chat_format_name(*c.format)),
              std::string::npos)
        << job.log();
  }
}

// Function calling (OpenAI's tools) in both forms: the tools are written into the prompt as
// model/tool_calls writes them; a call the request requires (a named function) is an instance of the
// call schema, read back as a call (finish reason tool_calls, nothing of it streamed as text); in auto
// mode a llama3 answer that is a bare call object is a call, a hermes one is text (no <tool_call>), and
// text held back while it might have been a call reaches a stream before the Final.
TEST(Serve, ToolCallsAreWrittenIntoThePromptAndReadBackFromTheAnswer) {
  test::TempDir models;
  const std::string plain = make_tiny_model(models.path());
  const std::string qwen_system = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant.";
  const std::string chatml = with_chat_template(
      plain, models.path() / "qwen.gguf",
      "{%- if tools %}{{- '<|im_start|>system\\n' }}{{- '" + qwen_system +
          "' }}{% endif %}{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + "
          "message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}");
  // Every value of set_mode's arguments is bounded (an enum, a boolean), so even a random model's call ends.
  const std::string tools =
      R"([{"type": "function", "function": {"name": "set_mode", "description": "Units and detail",)"
      R"( "parameters": {"type": "object", "properties": {"unit": {"enum": ["celsius", "fahrenheit"]},)"
      R"( "hourly": {"type": "boolean"}}, "required": ["unit", "hourly"], "additionalProperties": false}}},)"
      R"( {"type": "function", "function": {"name": "ping", "parameters": {"type": "object", "properties": {},)"
      R"( "additionalProperties": false}}}])";
  const auto is_set_mode_call = [](const protocol::ToolCall& call) {
    const nlohmann::json arguments = nlohmann::json::parse(call.arguments, nullptr, false);
    return call.name == "set_mode" && call.id.starts_with("call_") && arguments.is_object() &&
           arguments.size() == 2 && (arguments["unit"] == "celsius" || arguments["unit"] == "fahrenheit") &&
           arguments["hourly"].is_boolean();
  };
  struct Case {
    std::string model, yaml;
    model::ToolPrompt form;
  };
  for (const Case& c : {Case{plain, "chat_template: llama3\n", {model::ToolForm::llama3_json, ""}},
                        Case{chatml, "", {model::ToolForm::hermes, qwen_system}}}) {
    SCOPED_TRACE(model::tool_form_name(c.form.form));
    test::TempDir dir;
    ServeJob job(dir.path(), c.model, 1, 1, c.yaml);
    ASSERT_TRUE(job.wait_ready()) << job.log();
    EXPECT_NE(job.log().find(std::string("tool calls: ") + model::tool_form_name(c.form.form)),
              std::string::npos);
    Client client(job.endpoint());
    const std::vector<protocol::ChatMessage> ask = {{"system", "Be exact."},
                                                    {"user", "Set it to Fahrenheit."}};
    const auto tokenizer = model::Tokenizer::from_gguf(*model::GgufFile::open(c.model));
    const auto prompt_of = [&](const std::vector<model::ChatMessage>& chat) {
      return tokenizer->encode(
          model::format_chat_with_tools(c.form, chat, model::parse_tools(tools), /*add_assistant=*/true),
          tokenizer->add_bos_default(), /*parse_special=*/true);
    };

    // A named function: a call to it, whole in the Final, nothing streamed as text.
    for (int seed = 0; seed < 3; ++seed) {
      protocol::GenerateRequest r = greedy("named" + std::to_string(seed), ask, 200, /*stream=*/seed == 0);
      r.sampling.temperature = 1.0f;
      r.sampling.seed = static_cast<uint64_t>(seed);
      r.tools = tools;
      r.tool_choice = protocol::ToolChoice::function;
      r.tool_choice_function = "set_mode";
      std::string streamed;
      const protocol::Final f = client.generate(r, [&](const protocol::Delta& d) { streamed += d.text; });
      SCOPED_TRACE(f.text);
      EXPECT_EQ(f.prompt_token_ids, prompt_of({{"system", "Be exact."}, {"user", "Set it to Fahrenheit."}}));
      EXPECT_EQ(f.finish_reason, protocol::FinishReason::tool_calls);
      ASSERT_EQ(f.tool_calls.size(), 1u);
      EXPECT_TRUE(is_set_mode_call(f.tool_calls[0])) << f.tool_calls[0].arguments;
      EXPECT_EQ(f.text, "");
      EXPECT_EQ(streamed, "");
    }

    // Required, any of the two: a call to one of them with that one's arguments (the union of the two call
    // objects is the schema's grammar).
    for (int seed = 0; seed < 3; ++seed) {
      protocol::GenerateRequest r = greedy("required" + std::to_string(seed), ask, 200);
      r.sampling.temperature = 1.0f;
      r.sampling.seed = static_cast<uint64_t>(seed);
      r.tools = tools;
      r.tool_choice = protocol::ToolChoice::required;
      const protocol::Final f = client.generate(r);
      SCOPED_TRACE(f.text);
      EXPECT_EQ(f.finish_reason, protocol::FinishReason::tool_calls);
      ASSERT_EQ(f.tool_calls.size(), 1u);
      if (f.tool_calls[0].name == "ping") {
        EXPECT_EQ(nlohmann::json::parse(f.tool_calls[0].arguments), nlohmann::json::object());
      } else {
        EXPECT_TRUE(is_set_mode_call(f.tool_calls[0])) << f.tool_calls[0].arguments;
      }
    }

    // Auto, the answer held to the call schema by the client: a call in the llama3 form; in the hermes
    // form a bare object is text, all of it streamed by the end.
    protocol::GenerateRequest own = greedy("own-schema", ask, 200, /*stream=*/true);
    own.tools = tools;
    own.response_format = protocol::ResponseFormat::json_schema;
    own.json_schema = model::required_call_schema(c.form, model::parse_tools(tools), "set_mode");
    std::string streamed;
    protocol::Final f = client.generate(own, [&](const protocol::Delta& d) { streamed += d.text; });
    if (c.form.form == model::ToolForm::llama3_json) {
      EXPECT_EQ(f.finish_reason, protocol::FinishReason::tool_calls) << f.text;
      ASSERT_EQ(f.tool_calls.size(), 1u);
      EXPECT_TRUE(is_set_mode_call(f.tool_calls[0]));
      EXPECT_EQ(streamed, "");
    } else {
      EXPECT_EQ(f.finish_reason, protocol::FinishReason::eos);
      EXPECT_TRUE(f.tool_calls.empty());
      EXPECT_TRUE(nlohmann::json::parse(f.text, nullptr, false).is_object()) << f.text;
      EXPECT_EQ(streamed, f.text);
    }

    // Free text in auto mode streams whole; a conversation with a call and its result is written in the form.
    std::vector<protocol::ChatMessage> turns = ask;
    turns.push_back(
        {"assistant", "", {{"call_1", "set_mode", R"({"unit": "fahrenheit", "hourly": false})"}}});
    turns.push_back({"tool", "done"});
    protocol::GenerateRequest free = greedy("free", turns, 8, /*stream=*/true);
    free.tools = tools;
    streamed.clear();
    f = client.generate(free, [&](const protocol::Delta& d) { streamed += d.text; });
    EXPECT_EQ(
        f.prompt_token_ids,
        prompt_of({{"system", "Be exact."},
                   {"user", "Set it to Fahrenheit."},
                   {"assistant", "", {{"call_1", "set_mode", R"({"unit": "fahrenheit", "hourly": false})"}}},
                   {"tool", "done"}}));
    if (f.tool_calls.empty()) {
      EXPECT_EQ(streamed, f.text);
    }

    // Refusals name the problem, and the service goes on.
    const auto refusal = [&](const protocol::GenerateRequest& r) { return refusal_of(client, r); };
    protocol::GenerateRequest bad = greedy("bad", ask, 4);
    bad.tools = tools;
    bad.tool_choice = protocol::ToolChoice::function;
    bad.tool_choice_function = "missing";
    EXPECT_NE(refusal(bad).find("toolChoice: no tool is named 'missing'"), std::string::npos);
    bad.tool_choice_function = "set_mode";
    bad.tools = R"([{"type": "function", "function": {"name": "set_mode", "parameters": {"type": "object",)"
                R"( "properties": {"n": {"type": "integer", "minimum": 1}}}}}])";
    const std::string arguments_key =
        c.form.form == model::ToolForm::llama3_json ? "parameters" : "arguments";
    EXPECT_NE(
        refusal(bad).find("tools: the called function's parameters: json_schema.properties." + arguments_key +
                          ".properties.n.minimum: only 0 (a natural number) is supported"),
        std::string::npos)
        << refusal(bad);
    bad.tools = R"([{"type": "function", "function": {"name": "a b"}}])";
    bad.tool_choice = protocol::ToolChoice::auto_;
    bad.tool_choice_function.clear();
    EXPECT_NE(refusal(bad).find("tools[0].function.name: 'a b' is not"), std::string::npos) << refusal(bad);
    EXPECT_EQ(client.generate(greedy("after", kPrompts[1], 2)).tokens.size(), 2u);

    // From the command line: the call printed as OpenAI writes it.
    const fs::path tools_file = dir.path() / "tools.json";
    std::ofstream(tools_file) << tools;
    const test::CommandResult cli =
        test::run_command(test::nibble_bin() + " client --endpoint " + job.endpoint() +
                          " --chat 'Set it to Fahrenheit.' --tools " + tools_file.string() +
                          " --tool-choice set_mode --max-tokens 200 --seed 5 --json");
    ASSERT_EQ(cli.exit_code, 0) << cli.output;
    const auto out = nlohmann::json::parse(cli.output.substr(cli.output.find('{')));
    EXPECT_EQ(out["finish_reason"], "tool_calls");
    ASSERT_EQ(out["tool_calls"].size(), 1u) << out.dump();
    EXPECT_EQ(out["tool_calls"][0]["function"]["name"], "set_mode");
  }
}

TEST(Serve, LogprobsWithADraftComeFromTheVerifyingPass) {
  test::TempDir models;
  const std::string model = make_tiny_model(models.path());
  test::TempDir dir;
  ServeJob job(dir.path(), model, 1, 1, draft_yaml(model, 3, false));
  ASSERT_TRUE(job.wait_ready()) << job.log();
  Client client(job.endpoint());
  protocol::GenerateRequest request = greedy("lp", kPrompts[0], 12);
  request.logprobs = 2;
  const protocol::Final f = client.generate(request);
  EXPECT_GT(f.draft_accepted, 0u);
  EXPECT_EQ(f.tokens, nibble_generate(model, kPrompts[0], 12).tokens);
  ASSERT_NO_FATAL_FAILURE(expect_logprobs_match_nibble_logits(model, f, 2));
}

// Prefix caching with a draft: the target as its own draft accepts every proposal of a prompt it
// found cached, next to the sampling worker and on a rank of its own, which it can only do if the draft
// sees the cached prefix too (the sampling worker's history). With prefix_caching: false nothing is
// cached and the tokens are the same.
TEST(Serve, PrefixCachedPromptsKeepTheDraftsHistory) {
  test::TempDir models;
  const std::string model = make_tiny_model(models.path());
  const Expected want = nibble_generate(model, kLongPrompt, 24);
  for (const bool own_rank : {false, true}) {
    for (const bool caching : {true, false}) {
      SCOPED_TRACE(std::string(own_rank ? "own rank" : "next to the sampler") +
                   (caching ? "" : ", no caching"));
      test::TempDir dir;
      ServeJob::Placement placement;
      placement.draft_rank = own_rank;
      ServeJob job(dir.path(), model, 1, 1,
                   draft_yaml(model, 3, own_rank) +
                       "kv_cache: { block_size: 16, prefix_caching: " + (caching ? "true" : "false") + " }\n",
                   placement);
      ASSERT_TRUE(job.wait_ready()) << job.log();
      Client client(job.endpoint());
      for (const char* id : {"first", "again"}) {
        const protocol::Final f = client.generate(greedy(id, kLongPrompt, 24));
        EXPECT_EQ(f.tokens, want.tokens) << id;
        EXPECT_GT(f.draft_proposed, 0u) << id;
        EXPECT_EQ(f.draft_accepted, f.draft_proposed) << id;
        EXPECT_EQ(f.cached_prompt_tokens > 0, caching && std::string(id) == "again") << id;
      }
    }
  }
}

// Sampled requests (temperature 0.9, fixed seeds) give the same tokens whether the draft runs next
// to the sampling worker or on a rank of its own: the same proposals, drawn from the same streams,
// reach the same acceptance test. The job ends cleanly, draft rank included.
TEST(Serve, DraftOnItsOwnRankSamplesTheSameTokensAsNextToTheSampler) {
  test::TempDir models;
  const std::string target = make_tiny_model(models.path(), kernels::DType::Q8_0);
  const std::string draft = (models.path() / "draft.gguf").string();
  model::write_random_llama(draft, model::llama_shape_by_name("tiny"), kernels::DType::Q4_0, 5);
  std::vector<std::vector<int32_t>> outputs[2];
  uint64_t accepted[2] = {0, 0};
  for (int own = 0; own < 2; ++own) {
    test::TempDir dir;
    ServeJob::Placement placement;
    placement.draft_rank = own == 1;
    ServeJob job(dir.path(), target, 1, 2, draft_yaml(draft, 3, own == 1), placement);
    ASSERT_TRUE(job.wait_ready()) << job.log();
    Client client(job.endpoint());
    for (size_t i = 0; i < kPrompts.size(); ++i) {
      protocol::GenerateRequest request = greedy(numbered("s", i), kPrompts[i], 32);
      request.sampling.temperature = 0.9f;
      request.sampling.top_k = 40;
      request.sampling.seed = 7 + i;
      const protocol::Final f = client.generate(request);
      outputs[own].push_back(f.tokens);
      accepted[own] += f.draft_accepted;
    }
    client.shutdown();
    const std::optional<int> code = job.wait_exit(30s);
    ASSERT_TRUE(code.has_value()) << job.log();
    EXPECT_EQ(*code, 0) << job.log();
  }
  EXPECT_EQ(outputs[1], outputs[0]);
  EXPECT_GT(accepted[1], 0u) << "a Q4_0 copy of the target should have some proposals accepted";
  EXPECT_EQ(accepted[1], accepted[0]);
}

// device: cuda, sampled requests with a draft next to the sampling worker: the worker's stage verifies
// the drafts on the device whatever the layout (CudaLlamaModel::forward_stage_verify: only ids come
// back), as a whole model at P=1, as the last of two pipeline stages at P=2 (its hidden states come
// from the first), and as one of two tensor shards at T=2 (the vocabulary columns gathered on the
// device, the shards reducing through the host). Same pinned kernels and uniforms, so the same
// tokens in every layout (fixed k: the adaptive mode's timing could choose differently). That this
// equals verifying on the host: CudaSpeculativeEngine.SampledSpeculationVerifiedOnTheDeviceEquals-
// VerifyingOnTheHost.
TEST(Serve, CudaSampledSpeculationVerifiedOnTheDeviceInEveryLayout) {
  if (const std::string why = cuda_job_skip_reason(); !why.empty()) GTEST_SKIP() << why;
  test::TempDir models;
  const std::string model = make_tiny_model(models.path());
  const std::string other = make_unrelated_draft(models.path());
  const struct { int tensor, pipeline; } layouts[] = {{1, 1}, {1, 2}, {2, 1}};
  for (const std::string& draft : {model, other}) {
    SCOPED_TRACE("draft " + draft);
    std::vector<std::vector<int32_t>> outputs[3];
    uint64_t accepted[3] = {0, 0, 0};
    for (size_t l = 0; l < 3; ++l) {
      char layout[32];
      std::snprintf(layout, sizeof layout, "T%d P%d", layouts[l].tensor, layouts[l].pipeline);
      SCOPED_TRACE(layout);
      test::TempDir dir;
      ServeJob job(dir.path(), model, layouts[l].tensor, layouts[l].pipeline,
                   kCudaJob + "draft: { path: \"" + draft + "\", max_draft_tokens: 3, adaptive: false }\n");
      ASSERT_TRUE(job.wait_ready()) << job.log();
      EXPECT_NE(job.log().find("verified on the GPU"), std::string::npos) << job.log();
      Client client(job.endpoint());
      for (size_t i = 0; i < kPrompts.size(); ++i) {
        protocol::GenerateRequest request = greedy(numbered("s", i), kPrompts[i], 24);
        request.sampling.temperature = 0.9f;
        request.sampling.top_k = 40;
        request.sampling.seed = 7 + i;
        const protocol::Final f = client.generate(request);
        outputs[l].push_back(f.tokens);
        accepted[l] += f.draft_accepted;
      }
    }
    for (size_t l = 1; l < 3; ++l) {
      EXPECT_EQ(outputs[l], outputs[0]) << "layout " << l;
      EXPECT_EQ(accepted[l], accepted[0]) << "layout " << l;
    }
    if (draft == model) {
      EXPECT_GT(accepted[0], 0u) << "the target as its own draft has proposals accepted";
    }
  }
}

// A copy of a committed Hugging Face test checkpoint with a small Llama-2 style tokenizer.json of
// the model's vocabulary size added.
fs::path hf_checkpoint_with_tokenizer(const fs::path& dir, const std::string& checkpoint) {
  const fs::path copy = dir / fs::path(checkpoint).filename();
  fs::copy(test::test_data_dir() / checkpoint, copy, fs::copy_options::recursive);
  const int n_vocab = nlohmann::json::parse(std::ifstream(copy / "config.json"))["vocab_size"].get<int>();
  std::ofstream(copy / "tokenizer.json") << test::tiny_llama_tokenizer_json(n_vocab);
  std::ofstream(copy / "tokenizer_config.json")
      << R"({"add_bos_token": true, "bos_token": "<s>", "eos_token": "</s>"})";
  return copy;
}

// A Hugging Face directory's chat template (tokenizer_config.json's chat_template, a string or the list
// entry named "default") formats conversations as a GGUF's does.
TEST(Serve, HuggingFaceChatTemplateFormatsConversations) {
  test::TempDir models;
  const fs::path dir = hf_checkpoint_with_tokenizer(models.path(), "hf-tiny-llama/f32");
  std::ofstream(dir / "tokenizer_config.json")
      << R"({"add_bos_token": true, "bos_token": "<s>", "eos_token": "</s>", "chat_template": [)"
      << R"({"name": "tool_use", "template": "[INST]"}, )"
      << R"({"name": "default", "template": "{{ '<|user|>\n' + message['content'] + '<|end|>\n<|assistant|>' }}"}]})";
  EXPECT_EQ(model::hf_chat_template(dir.string()).value_or(""),
            "{{ '<|user|>\n' + message['content'] + '<|end|>\n<|assistant|>' }}");
  test::TempDir run;
  ServeJob job(run.path(), dir.string(), 1, 1);
  ASSERT_TRUE(job.wait_ready()) << job.log();
  EXPECT_NE(job.log().find("chat format: phi3"), std::string::npos) << job.log();
  Client client(job.endpoint());
  const protocol::Final f =
      client.generate(greedy("chat", std::vector<protocol::ChatMessage>{{"user", "hello world"}}, 2));
  const auto tokenizer = model::load_hf_tokenizer(dir.string());
  const std::vector<model::ChatMessage> chat = {{"user", "hello world"}};
  EXPECT_EQ(f.prompt_token_ids, tokenizer->encode(model::format_chat(model::ChatFormat::phi3, chat, true),
                                                  tokenizer->add_bos_default(), true));
}

// Hugging Face checkpoints are served as they are: float32, GPTQ and AWQ ones, act-order included,
// tensor- or pipeline-parallel, with the same greedy output as single-process `nibble generate` on
// the same directory.
TEST(Serve, HuggingFaceGptqAndAwqDirectoriesServeLikeGenerate) {
  test::TempDir models;
  const struct {
    const char* checkpoint;
    int tensor, pipeline;
  } cases[] = {
      {"hf-tiny-llama/f32", 2, 1},
      {"gptq-tiny-llama/gptq-g32-sym", 1, 2},
      {"gptq-tiny-llama/awq-g64", 1, 2},
      // act-order: stored by group; the tensor-parallel column slices go back to input order
      {"gptq-tiny-llama/gptq-g32-asym-actorder", 2, 1},
      {"gptq-tiny-llama/gptq-g128-sym-actorder", 2, 1},
  };
  for (const auto& c : cases) {
    SCOPED_TRACE(c.checkpoint);
    const std::string model = hf_checkpoint_with_tokenizer(models.path(), c.checkpoint).string();
    const Expected expected = nibble_generate(model, "hello world", 16);
    ASSERT_EQ(expected.tokens.size(), 16u);
    test::TempDir dir;
    ServeJob job(dir.path(), model, c.tensor, c.pipeline, "context: 128\n");
    ASSERT_TRUE(job.wait_ready()) << job.log();
    const protocol::Final f = Client(job.endpoint()).generate(greedy("hf", std::string("hello world"), 16));
    EXPECT_EQ(f.tokens, expected.tokens);
    EXPECT_EQ(f.text, expected.text);
  }
  // Without a tokenizer.json the service cannot read prompts: refused at start-up, naming the file.
  test::TempDir dir;
  ServeJob job(dir.path(), (test::test_data_dir() / "hf-tiny-llama/f32").string(), 1, 1, "context: 128\n");
  EXPECT_FALSE(job.wait_ready(30s));
  EXPECT_NE(job.log().find("has no tokenizer.json"), std::string::npos) << job.log();
}

// A dummy model (random weights made at load, no file) serves like `nibble generate` on it, with a
// dummy draft of another seed (same shape, so the same synthetic vocabulary).
TEST(Serve, DummyModelServesLikeGenerate) {
  const Expected expected = nibble_generate("dummy:tiny", "hello world", 12);
  ASSERT_EQ(expected.tokens.size(), 12u);
  test::TempDir dir;
  ServeJob job(dir.path(), "dummy:tiny", 2, 1, "context: 128\ndraft: { path: \"dummy:tiny:seed=1\" }\n");
  ASSERT_TRUE(job.wait_ready()) << job.log();
  const protocol::Final f = Client(job.endpoint()).generate(greedy("dummy", std::string("hello world"), 12));
  EXPECT_EQ(f.tokens, expected.tokens);
  EXPECT_EQ(f.text, expected.text);
}

TEST(Serve, DraftWithAnotherVocabularyIsRefusedAtStartUp) {
  test::TempDir dir;
  const std::string target = make_tiny_model(dir.path());
  model::LlamaShape shape = model::llama_shape_by_name("tiny");
  shape.n_vocab = 4000;
  const std::string draft = (dir.path() / "draft-4000.gguf").string();
  model::write_random_llama(draft, shape, kernels::DType::Q4_0, 3);
  ServeJob job(dir.path(), target, 1, 2, "draft: { path: \"" + draft + "\" }\n");
  EXPECT_FALSE(job.wait_ready(30s));
  const std::optional<int> code = job.wait_exit(30s);
  ASSERT_TRUE(code.has_value());
  EXPECT_NE(*code, 0);
  EXPECT_NE(job.log().find("draft-4000.gguf"), std::string::npos) << job.log();
  EXPECT_NE(job.log().find("4000"), std::string::npos) << job.log();
}

// A LoRA adapter made for another model (the small shape's n_ff 768 against tiny's 256), or one that is
// not there: start-up fails on the workers, naming the file and the problem, and the job exits non-zero.
TEST(Serve, LoraAdapterOfAnotherModelIsRefusedAtStartUp) {
  test::TempDir dir;
  const std::string target = make_tiny_model(dir.path());
  const std::string other = (dir.path() / "small-lora.gguf").string();
  model::LlamaConfig small = model::LlamaConfig::from_gguf(*model::GgufFile::open(target));
  small.n_ff = 768;
  model::make_random_lora(small, 4, 8, 0.2f, 1, {model::LayerMatrix::ffn_up})
      .write_gguf(other, "llama", kernels::DType::F16);
  for (const auto& [path, why] :
       {std::pair{other, std::string("maybe wrong base model")},
        std::pair{(dir.path() / "gone.gguf").string(), std::string("cannot open")}}) {
    std::string yaml = "lora_adapters: [{name: a, path: '";
    yaml.append(path).append("'}]\n");
    ServeJob job(dir.path(), target, 2, 1, yaml);
    EXPECT_FALSE(job.wait_ready(30s));
    const std::optional<int> code = job.wait_exit(30s);
    ASSERT_TRUE(code.has_value());
    EXPECT_NE(*code, 0);
    EXPECT_NE(job.log().find(path), std::string::npos) << job.log();
    EXPECT_NE(job.log().find(why), std::string::npos) << job.log();
  }
}

// device: cuda without a usable GPU (no device, or a build without CUDA): every worker rank says
// why at start-up, and the job exits non-zero instead of serving on the CPU.
TEST(Serve, CudaDeviceWithoutAGpuFailsAtStartUpWithTheReason) {
  const std::string why = worker::cuda_unavailable_reason();
  if (why.empty())
    GTEST_SKIP() << "a CUDA device is usable here (Serve.CudaServesLikeCudaGenerate covers it)";
  test::TempDir dir;
  ServeJob job(dir.path(), make_tiny_model(dir.path()), 2, 1, "device: cuda\n");
  EXPECT_FALSE(job.wait_ready(30s));
  const std::optional<int> code = job.wait_exit(30s);
  ASSERT_TRUE(code.has_value());
  EXPECT_NE(*code, 0);
  const std::string log = job.log();
  for (int rank : {1, 2}) {
    EXPECT_NE(log.find("rank " + std::to_string(rank) + ": error: device: cuda: " + why), std::string::npos)
        << log;
  }
}

// device: cuda on a GPU: T=2 (both workers on the one GPU here: reductions through the host) and
// P=2 give the greedy tokens of single-process `nibble generate --device cuda` for a project-made
// Q4_0 model: on the CUDA-core kernels, and on the tensor-core kernels with the INT4 matrices in
// tiles (int4_layout: tiles; every GPU worker repacks its sliced matrices at load); and at P=2 with
// cuda_graphs: false (every kernel launched directly), each stage saying how it launches, and with the
// decode attention split and prefill attention keys set.
// Prefix caching on GPU workers: the second request of a long prompt starts after its cached blocks
// (the device's paged attention reads them through the block table) and gives single-process
// `nibble generate --device cuda`'s tokens, like the first, in one stage and in two.
TEST(Serve, CudaPrefixCachedPromptsServeLikeCudaGenerate) {
  if (const std::string why = cuda_job_skip_reason(); !why.empty()) GTEST_SKIP() << why;
  test::TempDir models;
  const std::string model = make_tiny_model(models.path());
  const Expected want = nibble_generate(model, kLongPrompt, 24, kCudaGenerate);
  for (const Shape shape : {Shape{1, 1}, Shape{1, 2}}) {
    SCOPED_TRACE(std::string("P") + std::to_string(shape.pipeline));
    test::TempDir dir;
    ServeJob job(dir.path(), model, shape.tensor, shape.pipeline,
                 kCudaJob + "scheduler: { prefill_chunk: 16 }\n");
    ASSERT_TRUE(job.wait_ready()) << job.log();
    Client client(job.endpoint());
    const protocol::Final first = client.generate(greedy("first", kLongPrompt, 24));
    const protocol::Final again = client.generate(greedy("again", kLongPrompt, 24));
    EXPECT_EQ(first.tokens, want.tokens);
    EXPECT_EQ(again.tokens, want.tokens);
    EXPECT_EQ(first.cached_prompt_tokens, 0u);
    EXPECT_EQ(again.cached_prompt_tokens, (first.prompt_tokens - 1) / 16 * 16);
  }
}

// Log-probabilities from GPU workers: a step with a request asking for them brings its logits to the
// host (not only the sampled ids); the values are `nibble logits --device cuda`'s log-softmax within the
// GPU's decode-against-prefill difference; the prompt's own log-probabilities too.
TEST(Serve, CudaLogprobsAreTheModelsLogSoftmax) {
  if (const std::string why = cuda_job_skip_reason(); !why.empty()) GTEST_SKIP() << why;
  test::TempDir models;
  const std::string model = make_tiny_model(models.path());
  test::TempDir dir;
  ServeJob job(dir.path(), model, 1, 1, kCudaJob);
  ASSERT_TRUE(job.wait_ready()) << job.log();
  Client client(job.endpoint());
  protocol::GenerateRequest request = greedy("lp", kPrompts[0], 12);
  request.logprobs = 3;
  request.prompt_logprobs = 2;  // the prompt's rows' logits come back from the device too
  const protocol::Final f = client.generate(request);
  EXPECT_EQ(f.tokens, nibble_generate(model, kPrompts[0], 12, kCudaGenerate).tokens);
  ASSERT_NO_FATAL_FAILURE(expect_logprobs_match_nibble_logits(model, f, 3, "--device cuda", 2e-2));
  ASSERT_NO_FATAL_FAILURE(expect_prompt_logprobs_match_nibble_logits(model, f, 2, "--device cuda", 2e-2));
}

// Structured output and min_tokens from a GPU worker: its logits come to the host for the mask, as on
// the CPU (the same forced record, an instance; EOS made certain, held back for 5 tokens).
TEST(Serve, CudaStructuredOutputAndMinTokensAsOnTheCpu) {
  if (const std::string why = cuda_job_skip_reason(); !why.empty()) GTEST_SKIP() << why;
  test::TempDir models;
  const std::string model = make_tiny_model(models.path());
  test::TempDir dir;
  ServeJob job(dir.path(), model, 1, 1, kCudaJob);
  ASSERT_TRUE(job.wait_ready()) << job.log();
  Client client(job.endpoint());
  const protocol::Final f = client.generate(forced_record(model, "record"));
  EXPECT_EQ(f.finish_reason, protocol::FinishReason::eos) << f.text;
  EXPECT_TRUE(is_record(nlohmann::json::parse(f.text))) << f.text;
  const auto tokenizer = model::Tokenizer::from_gguf(*model::GgufFile::open(model));
  protocol::GenerateRequest eos = greedy("eos", kPrompts[0], 12);
  eos.sampling.logit_bias = {{tokenizer->eos_id(), 100.0f}};
  eos.min_tokens = 5;
  EXPECT_EQ(client.generate(eos).tokens.size(), 5u);
}

TEST(Serve, CudaServesLikeCudaGenerate) {
  if (const std::string why = cuda_job_skip_reason(); !why.empty()) GTEST_SKIP() << why;
  test::TempDir models;
  const std::string model = make_tiny_model(models.path());
  struct Setting {
    const char* name;
    std::string generate_args, job;
    const char* launches;         // what a stage of one tensor rank says of its launches
    bool tensor_parallel = true;  // also T2 P1 (its two ranks on one GPU launch directly anyway)
    const char* attention = "decode attention cut every 256 positions";  // what each stage's model took
  };
  const Setting settings[] = {
      {"CUDA cores", kCudaGenerate, kCudaJob, "decode steps replayed from CUDA graphs"},
      {"tensor cores on tiles", "--device cuda --int4-kernels tensor-cores --int4-layout tiles",
       "device: cuda\nint4_kernels: tensor_cores\nint4_layout: tiles\ncontext: 1024\nkv_cache: { num_blocks: "
       "64 }\n",
       "decode steps replayed from CUDA graphs"},
      {"CUDA cores without graphs", kCudaGenerate, kCudaJob + "cuda_graphs: false\n",
       "every kernel launched directly (cuda_graphs: false)", false},
      // Decode attention cut every 32 positions and prompt chunks' attention on the tensor cores where
      // the heads allow: the job's keys reach its GPU models (each stage's model says what it took; this
      // model's heads of 32 take neither kernel, so the tokens cannot tell).
      {"decode split 32, tensor-core prefill attention",
       kCudaGenerate + " --decode-split-tokens 32 --prefill-attention tensor-cores",
       kCudaJob + "decode_split_tokens: 32\nprefill_attention: tensor_cores\n",
       "decode steps replayed from CUDA graphs", false, "decode attention cut every 32 positions"}};
  for (const Setting& setting : settings) {
    SCOPED_TRACE(setting.name);
    std::vector<Expected> expected;
    for (const std::string& p : kPrompts)
      expected.push_back(nibble_generate(model, p, 24, setting.generate_args));
    for (const Shape shape : {Shape{2, 1}, Shape{1, 2}}) {
      if (shape.tensor > 1 && !setting.tensor_parallel) continue;
      // (std::string first: GCC 12's -Wrestrict misfires on "T" + std::to_string(...) inlined here)
      SCOPED_TRACE(std::string("T") + std::to_string(shape.tensor) + " P" + std::to_string(shape.pipeline));
      test::TempDir dir;
      ServeJob job(dir.path(), model, shape.tensor, shape.pipeline,
                   setting.job + "scheduler: { prefill_chunk: 16 }\n");
      ASSERT_TRUE(job.wait_ready()) << job.log();
      if (shape.tensor == 2) {
        const bool one_gpu = worker::cuda_device_count() == 1;
        EXPECT_NE(job.log().find(one_gpu ? "reductions through host memory" : "reductions over NCCL"),
                  std::string::npos)
            << job.log();
      }
      EXPECT_NE(job.log().find(", GPU "), std::string::npos) << job.log();
      for (int stage = 0; stage < shape.pipeline; ++stage) {
        EXPECT_NE(job.log().find("stage " + std::to_string(stage) + ": " + setting.attention),
                  std::string::npos)
            << job.log();
      }
      if (shape.tensor == 1) {
        EXPECT_NE(job.log().find(setting.launches), std::string::npos) << job.log();
        if (std::string(setting.launches).find("directly") != std::string::npos) {  // no stage replays
          EXPECT_EQ(job.log().find("replayed from CUDA graphs"), std::string::npos) << job.log();
        }
      }
      Client client(job.endpoint());
      for (size_t i = 0; i < kPrompts.size(); ++i) {
        SCOPED_TRACE("prompt " + std::to_string(i));
        const protocol::Final f = client.generate(greedy(numbered("p", i), kPrompts[i], 24));
        EXPECT_EQ(f.tokens, expected[i].tokens);
        EXPECT_EQ(f.text, expected[i].text);
      }
    }
  }
}

// device: cuda with a quantized KV cache: one type (on a model with heads of 64, so rotated as llama.cpp
// does) and a type per side; one stage and two: the greedy tokens of single-process `nibble generate
// --device cuda` with the same cache, and the same again when the prompt is served from the prefix cache
// (its blocks kept quantized on the GPU).
TEST(Serve, CudaQuantizedKvCacheServesLikeCudaGenerate) {
  if (const std::string why = cuda_job_skip_reason(); !why.empty()) GTEST_SKIP() << why;
  test::TempDir models;
  const std::string model = (models.path() / "tiny-h64.gguf").string();
  model::write_random_llama(model, model::llama_shape_by_name("tiny-h64"), kernels::DType::Q4_0, 5);
  struct Case {
    std::string yaml, flags, log;
  };
  const Case cases[] = {
      {"dtype: q4_0", "--kv-cache-dtype q4_0", "(q4_0)"},
      {"k_dtype: q8_0, v_dtype: iq4_nl", "--cache-type-k q8_0 --cache-type-v iq4_nl", "(k q8_0, v iq4_nl)"}};
  for (const Case& c : cases) {
    SCOPED_TRACE(c.yaml);
    const Expected want = nibble_generate(model, kLongPrompt, 24, kCudaGenerate + " " + c.flags);
    for (const Shape shape : {Shape{1, 1}, Shape{1, 2}}) {
      SCOPED_TRACE(std::string("P") + std::to_string(shape.pipeline));
      test::TempDir dir;
      ServeJob job(dir.path(), model, shape.tensor, shape.pipeline,
                   "device: cuda\nint4_kernels: cuda_cores\ncontext: 1024\nkv_cache: { num_blocks: 64, " +
                       c.yaml + " }\nscheduler: { prefill_chunk: 16 }\n");
      ASSERT_TRUE(job.wait_ready()) << job.log();
      EXPECT_NE(job.log().find(c.log), std::string::npos) << job.log();
      Client client(job.endpoint());
      const protocol::Final first = client.generate(greedy("first", kLongPrompt, 24));
      const protocol::Final again = client.generate(greedy("again", kLongPrompt, 24));
      EXPECT_EQ(first.tokens, want.tokens);
      EXPECT_EQ(again.tokens, want.tokens);
      EXPECT_GT(again.cached_prompt_tokens, 0u);
    }
  }
}

// device: cuda with LoRA adapters (GPU workers: kernels/cuda/lora after each product), one stage, two
// stages and two tensor shards (each its cut of the factors, both on the one GPU here, reducing through
// the host): requests naming an adapter get single-process `nibble generate --device cuda --lora`'s
// tokens, the others the base model's.
TEST(Serve, CudaLoraAdaptersServeLikeCudaGenerateWithTheAdapter) {
  if (const std::string why = cuda_job_skip_reason(); !why.empty()) GTEST_SKIP() << why;
  test::TempDir models;
  const std::string model = make_tiny_model(models.path());
  const auto [sql, chat] = write_two_adapters(models.path(), model);
  const std::string adapters[] = {"", "sql", "chat"};
  const Expected expected[] = {
      nibble_generate(model, kPrompts[0], 16, kCudaGenerate),
      nibble_generate(model, kPrompts[0], 16, kCudaGenerate + " --lora '" + sql + "' --lora-scale 0.5"),
      nibble_generate(model, kPrompts[0], 16, kCudaGenerate + " --lora '" + chat + "'")};
  EXPECT_NE(expected[0].tokens, expected[1].tokens);
  for (const Shape shape : {Shape{1, 1}, Shape{1, 2}, Shape{2, 1}}) {
    SCOPED_TRACE(std::string("T") + std::to_string(shape.tensor) + " P" + std::to_string(shape.pipeline));
    test::TempDir dir;
    ServeJob job(dir.path(), model, shape.tensor, shape.pipeline,
                 kCudaJob + "lora_adapters:\n  - { name: sql, path: '" + sql +
                     "', scale: 0.5 }\n  - { name: chat, path: '" + chat + "' }\n");
    ASSERT_TRUE(job.wait_ready()) << job.log();
    Client client(job.endpoint());
    for (size_t a = 0; a < 3; ++a) {
      SCOPED_TRACE("adapter '" + adapters[a] + "'");
      protocol::GenerateRequest r = greedy(numbered("seq", a), kPrompts[0], 16);
      r.adapter = adapters[a];
      EXPECT_EQ(client.generate(r).tokens, expected[a].tokens);
    }
  }
}

// device: cuda with a draft next to the sampling worker: target and draft on the GPU (the engine's
// speculation over worker::CudaForwardModel), T=1 and P=2, greedy tokens equal to `nibble generate
// --device cuda` without a draft (the target as its own draft, and an unrelated one).
TEST(Serve, CudaSpeculativeServesLikeCudaGenerate) {
  if (const std::string why = cuda_job_skip_reason(); !why.empty()) GTEST_SKIP() << why;
  test::TempDir models;
  const std::string model = make_tiny_model(models.path());
  const std::string other = make_unrelated_draft(models.path());
  std::vector<Expected> expected;
  for (const std::string& p : kPrompts) expected.push_back(nibble_generate(model, p, 24, kCudaGenerate));
  for (const std::string& draft : {model, other}) {
    for (const int pipeline : {1, 2}) {
      SCOPED_TRACE("draft " + draft + ", P" + std::to_string(pipeline));
      test::TempDir dir;
      ServeJob job(dir.path(), model, 1, pipeline,
                   kCudaJob + "draft: { path: \"" + draft + "\", max_draft_tokens: 3 }\n");
      ASSERT_TRUE(job.wait_ready()) << job.log();
      EXPECT_NE(job.log().find("on its GPU"), std::string::npos) << job.log();
      Client client(job.endpoint());
      for (size_t i = 0; i < kPrompts.size(); ++i) {
        SCOPED_TRACE("prompt " + std::to_string(i));
        const protocol::Final f = client.generate(greedy(numbered("p", i), kPrompts[i], 24));
        EXPECT_EQ(f.tokens, expected[i].tokens);
      }
    }
  }
}

// small-llama's Q4_K attention output has 256-wide blocks, one per row of 256 inputs: its 4 heads
// cannot be split into tensor-parallel column slices, so it is served pipeline-parallel only, and a
// tensor-parallel start-up must fail with a message saying so.
TEST(Serve, KQuantFixtureServesPipelineParallelAndRefusesImpossibleTensorSplit) {
  NIBBLE_REQUIRE_FIXTURES(fixtures);
  const std::string model = (fixtures / "models" / "small-llama-q4_k_m.gguf").string();
  expect_same_as_generate(model, 1, 2);
  test::TempDir dir;
  ServeJob job(dir.path(), model, 2, 1);
  EXPECT_FALSE(job.wait_ready());
  const std::optional<int> code = job.wait_exit(30s);
  ASSERT_TRUE(code.has_value());
  EXPECT_NE(*code, 0);
  EXPECT_NE(job.log().find("cannot be split over tensor size 2"), std::string::npos) << job.log();
}

// 16 clients in threads send 64 requests of mixed prompt and output lengths, half of them streamed,
// to a T=2 x P=2 job whose KV cache is too small for all of them at once (preemption happens).
// Every request gets exactly one answer, equal to what the same service answers for that request
// alone. (The reference is the service itself, not a single process: with Q4_0 weights the
// tensor-parallel sums round differently, which can flip a near-tie argmax; request 12 here has
// its top two logits 0.008 apart. Whole-model agreement is what the layout tests above check.)
TEST(Serve, SixteenConcurrentClientsGetOneCorrectAnswerEach) {
  test::TempDir dir;
  const std::string model_path = make_tiny_model(dir.path());
  std::mt19937 rng(123);
  struct Job {
    std::vector<int32_t> prompt;
    uint32_t max_tokens;
    Expected expected;
  };
  std::vector<Job> jobs(64);
  // Every third prompt begins with the same 40 ids (a system prompt: the prefix cache shares its blocks
  // among requests in flight together).
  std::vector<int32_t> system(40);
  for (int32_t& id : system) id = std::uniform_int_distribution<int>(3, 4095)(rng);
  for (size_t n = 0; n < jobs.size(); ++n) {
    Job& j = jobs[n];
    const int len = std::uniform_int_distribution<int>(1, 150)(rng);
    j.prompt.push_back(1);
    if (n % 3 == 0) j.prompt.insert(j.prompt.end(), system.begin(), system.end());
    for (int i = 1; i < len; ++i) j.prompt.push_back(std::uniform_int_distribution<int>(3, 4095)(rng));
    j.max_tokens = static_cast<uint32_t>(std::uniform_int_distribution<int>(1, 40)(rng));
  }
  // 48 blocks of 16 = 768 cached tokens for up to 16 x 230: the scheduler must preempt and resume, and
  // evict cached blocks.
  ServeJob job(
      dir.path(), model_path, 2, 2,
      "kv_cache: { num_blocks: 48 }\ncontext: 512\nscheduler: { prefill_chunk: 32, max_batch_tokens: 96 }\n");
  ASSERT_TRUE(job.wait_ready()) << job.log();
  {
    Client solo(job.endpoint());
    for (size_t i = 0; i < jobs.size(); ++i) {
      const protocol::Final f =
          solo.generate(greedy(numbered("solo", i), jobs[i].prompt, jobs[i].max_tokens));
      jobs[i].expected = {f.tokens, f.text};
      ASSERT_TRUE(f.tokens.size() == jobs[i].max_tokens || f.finish_reason == protocol::FinishReason::eos);
    }
  }

  std::atomic<size_t> next{0};
  std::mutex mutex;
  std::vector<int> answers(jobs.size(), 0);
  std::vector<std::string> failures;
  std::vector<std::thread> clients;
  for (int c = 0; c < 16; ++c) {
    clients.emplace_back([&] {
      Client client(job.endpoint());
      for (size_t i; (i = next.fetch_add(1)) < jobs.size();) {
        const bool stream = i % 2 == 0;
        std::string streamed_text;
        std::vector<int32_t> streamed_tokens;
        try {
          const protocol::Final f = client.generate(
              greedy(numbered("r", i), jobs[i].prompt, jobs[i].max_tokens, stream),
              [&](const protocol::Delta& d) {
                streamed_text += d.text;
                streamed_tokens.insert(streamed_tokens.end(), d.tokens.begin(), d.tokens.end());
              });
          std::lock_guard lock(mutex);
          ++answers[i];
          if (f.tokens != jobs[i].expected.tokens)
            failures.push_back("request " + std::to_string(i) + ": tokens differ from its solo answer");
          else if (f.text != jobs[i].expected.text)
            failures.push_back("request " + std::to_string(i) + ": text '" + f.text +
                               "' differs from its solo answer '" + jobs[i].expected.text + "'");
          if (stream && (streamed_text != f.text || streamed_tokens != f.tokens))
            failures.push_back("request " + std::to_string(i) + ": deltas do not add up to the final");
          if (f.prompt_tokens != jobs[i].prompt.size())
            failures.push_back("request " + std::to_string(i) + ": wrong prompt token count");
        } catch (const std::exception& e) {
          std::lock_guard lock(mutex);
          ++answers[i];
          failures.push_back("request " + std::to_string(i) + ": " + e.what());
        }
      }
    });
  }
  for (auto& t : clients) t.join();
  for (const std::string& f : failures) ADD_FAILURE() << f;
  for (size_t i = 0; i < answers.size(); ++i) EXPECT_EQ(answers[i], 1) << "request " << i;

  Client client(job.endpoint());
  const protocol::Stats stats = client.stats();
  EXPECT_EQ(stats.completed, 2 * jobs.size());
  EXPECT_EQ(stats.failed, 0u);
  EXPECT_EQ(stats.free_kv_blocks, stats.total_kv_blocks);
  EXPECT_GT(stats.cached_prompt_tokens, 0u);
}

TEST(Serve, CancellingARequestEndsItAndFreesItsBlocks) {
  test::TempDir dir;
  ServeJob job(dir.path(), make_tiny_model(dir.path()), 1, 2, "context: 1024\n");
  ASSERT_TRUE(job.wait_ready()) << job.log();
  Client client(job.endpoint());
  const uint64_t total = client.stats().total_kv_blocks;
  std::vector<int32_t> prompt(100, 7);
  prompt[0] = 1;
  protocol::GenerateRequest request = greedy("long", prompt, 900, true);
  client.send_raw(protocol::encode(protocol::ClientRequestMsg{request}));
  // Wait for the first delta: the request is running and holds blocks.
  protocol::ServerResponseMsg first = client.receive();
  ASSERT_TRUE(std::holds_alternative<protocol::Delta>(first));
  Client other(job.endpoint());
  EXPECT_LT(other.stats().free_kv_blocks, total);
  client.cancel("long");
  bool cancelled = false;
  for (int i = 0; i < 2000 && !cancelled; ++i) {
    const protocol::ServerResponseMsg m = client.receive();
    ASSERT_FALSE(std::holds_alternative<protocol::Final>(m)) << "finished instead of being cancelled";
    if (const auto* e = std::get_if<protocol::Error>(&m)) {
      EXPECT_EQ(e->code, protocol::ErrorCode::cancelled);
      EXPECT_EQ(e->request_id, "long");
      cancelled = true;
    }
  }
  ASSERT_TRUE(cancelled);
  const protocol::Stats stats = other.stats();
  EXPECT_EQ(stats.free_kv_blocks, total);
  EXPECT_EQ(stats.running, 0u);
}

protocol::Error expect_error_reply(Client& client, const std::vector<uint8_t>& frame) {
  client.send_raw(frame);
  const protocol::ServerResponseMsg reply = client.receive();
  EXPECT_TRUE(std::holds_alternative<protocol::Error>(reply));
  return std::holds_alternative<protocol::Error>(reply) ? std::get<protocol::Error>(reply)
                                                        : protocol::Error{};
}

TEST(Serve, BadInputGetsAnErrorAndTheServiceKeepsServing) {
  test::TempDir dir;
  const std::string model_path = make_tiny_model(dir.path());
  {  // A bad config stops every rank at start-up with a message naming the key.
    ServeJob job(dir.path(), model_path, 1, 1, "contxet: 256\n");
    EXPECT_FALSE(job.wait_ready(30s));
    const std::optional<int> code = job.wait_exit(30s);
    ASSERT_TRUE(code.has_value());
    EXPECT_NE(*code, 0);
    EXPECT_NE(job.log().find("contxet"), std::string::npos) << job.log();
  }

  test::TempDir dir2;
  ServeJob served(dir2.path(), model_path, 1, 1, "context: 256\n");
  ASSERT_TRUE(served.wait_ready()) << served.log();
  Client client(served.endpoint());
  using protocol::ErrorCode;

  // Not a capnp message.
  EXPECT_EQ(expect_error_reply(client, {1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13}).code,
            ErrorCode::malformed_message);
  std::vector<uint8_t> garbage(64);
  for (size_t i = 0; i < garbage.size(); ++i) garbage[i] = static_cast<uint8_t>(i * 37 + 11);
  EXPECT_EQ(expect_error_reply(client, garbage).code, ErrorCode::malformed_message);
  // Over server.max_message_bytes (default 1 MiB).
  EXPECT_EQ(expect_error_reply(client, std::vector<uint8_t>((1 << 20) + 8, 0)).code,
            ErrorCode::message_too_large);
  // A request kind from a newer client: ClientRequest with union discriminant 9.
  std::vector<uint8_t> unknown(24, 0);
  unknown[4] = 2;      // one segment of 2 words
  unknown[8 + 4] = 1;  // root struct pointer: 1 data word, 0 pointers
  unknown[16] = 9;     // the discriminant
  EXPECT_EQ(expect_error_reply(client, unknown).code, ErrorCode::unknown_request_type);
  // A prompt longer than the context.
  std::vector<int32_t> long_prompt(300, 9);
  EXPECT_EQ(
      expect_error_reply(client, protocol::encode(protocol::ClientRequestMsg{greedy("long", long_prompt, 8)}))
          .code,
      ErrorCode::prompt_too_long);
  // Impossible parameters.
  protocol::GenerateRequest bad = greedy("bad", std::string("hi"), 8);
  bad.sampling.temperature = -1.0f;
  EXPECT_EQ(expect_error_reply(client, protocol::encode(protocol::ClientRequestMsg{bad})).code,
            ErrorCode::bad_request);
  bad = greedy("bad", std::string("hi"), 8);
  bad.sampling.top_p = 0.0f;
  EXPECT_EQ(expect_error_reply(client, protocol::encode(protocol::ClientRequestMsg{bad})).code,
            ErrorCode::bad_request);
  bad = greedy("bad", std::vector<int32_t>{1, 99999}, 8);
  const protocol::Error out_of_vocab =
      expect_error_reply(client, protocol::encode(protocol::ClientRequestMsg{bad}));
  EXPECT_EQ(out_of_vocab.code, ErrorCode::bad_request);
  EXPECT_NE(out_of_vocab.message.find("vocabulary"), std::string::npos) << out_of_vocab.message;
  bad = greedy("bad", std::string("hi"), 0);
  EXPECT_EQ(expect_error_reply(client, protocol::encode(protocol::ClientRequestMsg{bad})).code,
            ErrorCode::bad_request);

  // Still serving, with the same answers as before.
  const Expected expected = nibble_generate(model_path, "Hello", 12);
  const protocol::Final f = client.generate(greedy("ok", std::string("Hello"), 12));
  EXPECT_EQ(f.tokens, expected.tokens);
  EXPECT_TRUE(client.health().ok);
  EXPECT_EQ(client.stats().failed, 0u);  // refused requests were never accepted
}

// Kills the process of `world_rank` while three streamed requests run: each must end with a
// worker_failed error within seconds, and the job must exit non-zero.
void expect_killing_rank_fails_open_requests(ServeJob& job, int world_rank) {
  ASSERT_TRUE(job.wait_ready()) << job.log();
  const int victim = job.worker_pid(world_rank);
  ASSERT_GT(victim, 0) << job.log();

  std::vector<std::unique_ptr<Client>> clients;
  for (int i = 0; i < 3; ++i) {
    clients.push_back(std::make_unique<Client>(job.endpoint()));
    clients.back()->send_raw(protocol::encode(
        protocol::ClientRequestMsg{greedy(numbered("k", i), std::vector<int32_t>{1, 5, 6, 7}, 1000, true)}));
    ASSERT_TRUE(std::holds_alternative<protocol::Delta>(clients.back()->receive()));  // running
  }
  const auto killed_at = std::chrono::steady_clock::now();
  ASSERT_EQ(kill(victim, SIGKILL), 0);
  for (auto& client : clients) {
    bool failed = false;
    try {
      for (int i = 0; i < 2000 && !failed; ++i) {
        const protocol::ServerResponseMsg m = client->receive();
        ASSERT_FALSE(std::holds_alternative<protocol::Final>(m));
        if (const auto* e = std::get_if<protocol::Error>(&m)) {
          EXPECT_EQ(e->code, protocol::ErrorCode::worker_failed) << e->message;
          failed = true;
        }
      }
    } catch (const ClientError& e) {
      ADD_FAILURE() << "no error reply after the worker died: " << e.what() << "\n" << job.log();
    }
    EXPECT_TRUE(failed);
  }
  EXPECT_LT(std::chrono::steady_clock::now() - killed_at, 10s);
  const std::optional<int> code = job.wait_exit(20s);
  ASSERT_TRUE(code.has_value()) << "the job did not end after a worker died";
  EXPECT_NE(*code, 0);
}

TEST(Serve, KillingAWorkerFailsOpenRequestsAndEndsTheJob) {
  test::TempDir dir;
  ServeJob job(dir.path(), make_tiny_model(dir.path()), 1, 2, "context: 1024\n");
  expect_killing_rank_fails_open_requests(job, 2);
}

TEST(Serve, KillingTheDraftRankFailsOpenRequestsAndEndsTheJob) {
  test::TempDir dir;
  const std::string model = make_tiny_model(dir.path());
  ServePlacement placement;
  placement.draft_rank = true;
  ServeJob job(dir.path(), model, 1, 1,
               "context: 1024\ndraft: { path: \"" + model + "\", adaptive: false, placement: own_rank }\n",
               placement);
  expect_killing_rank_fails_open_requests(job, 2);
}

TEST(Serve, ShutdownRequestStopsEveryRankWithExitZero) {
  test::TempDir dir;
  ServeJob job(dir.path(), make_tiny_model(dir.path()), 2, 2);
  ASSERT_TRUE(job.wait_ready()) << job.log();
  Client client(job.endpoint());
  EXPECT_EQ(client.generate(greedy("before", std::string("Hello"), 4)).request_id, "before");
  const protocol::Health reply = client.shutdown();
  EXPECT_TRUE(reply.ok);
  EXPECT_EQ(reply.detail, "shutting down");
  const std::optional<int> code = job.wait_exit(30s);
  ASSERT_TRUE(code.has_value()) << job.log();
  EXPECT_EQ(*code, 0) << job.log();
  EXPECT_NE(job.log().find("shut down cleanly"), std::string::npos) << job.log();
}

// Two hosts on this machine: network namespaces with hosts names of their own (UTS namespaces),
// joined through this one by veth pairs, and an rsh agent that "logs in" by entering them. mpirun
// then runs a real multi-host job: the coordinator and a tensor rank on one host, the other tensor
// rank on the other, MPI over TCP between the hosts, and the control plane bound to all interfaces
// and advertised by host name. Needs root and `ip netns`; skips (saying why) where they are missing.
class TwoHosts {
 public:
  explicit TwoHosts(const fs::path& dir) : dir_(dir) {
    const std::string tag = std::to_string(getpid() % 100000);
    hosts_ = {"nbl-a" + tag, "nbl-b" + tag};
    std::string setup = "set -e; sysctl -qw net.ipv4.ip_forward=1; ";
    for (int i = 0; i < 2; ++i) {
      const std::string h = hosts_[i], v = "nv" + std::to_string(i) + tag,
                        net = "10.213." + std::to_string(i + 1);
      setup += "ip netns add " + h + "; ip link add " + v + " type veth peer name " + v + "p; ip link set " +
               v + "p netns " + h + "; ip addr add " + net + ".1/24 dev " + v + "; ip link set " + v +
               " up; ip netns exec " + h + " ip addr add " + net + ".2/24 dev " + v + "p; ip netns exec " +
               h + " ip link set " + v + "p up; ip netns exec " + h + " ip link set lo up; ip netns exec " +
               h + " ip route add default via " + net + ".1; ";
      links_.push_back(v);
    }
    const test::CommandResult r = test::run_command(setup + " 2>&1");
    ok_ = r.exit_code == 0;
    why_ = r.output;
    // The host names are the hosts' addresses, so they resolve without touching /etc/hosts.
    std::ofstream(dir / "agent") << "#!/bin/sh\n"
                                 << "host=$1; shift\n"
                                 << "case $host in 10.213.1.2) ns=" << hosts_[0]
                                 << ";; 10.213.2.2) ns=" << hosts_[1]
                                 << ";; *) echo \"unknown host $host\" >&2; exit 1;; esac\n"
                                 << "exec ip netns exec $ns unshare --uts sh -c \"hostname $host; $*\"\n";
    fs::permissions(dir / "agent", fs::perms::owner_all);
    std::ofstream(dir / "hostfile") << "10.213.1.2 slots=2\n10.213.2.2 slots=2\n";
  }
  ~TwoHosts() {
    std::string teardown;
    for (const std::string& h : hosts_) teardown += "ip netns del " + h + " 2>/dev/null; ";
    for (const std::string& v : links_) teardown += "ip link del " + v + " 2>/dev/null; ";
    test::run_command(teardown);
  }
  bool ok() const { return ok_; }
  const std::string& why() const { return why_; }
  std::vector<std::string> mpirun_args() const {
    return {"--hostfile",
            (dir_ / "hostfile").string(),
            "--map-by",
            "node",
            "--mca",
            "plm_rsh_agent",
            (dir_ / "agent").string(),
            "--mca",
            "oob_tcp_if_include",
            "10.213.0.0/16",
            "--mca",
            "btl",
            "tcp,self",
            "--mca",
            "btl_tcp_if_include",
            "10.213.0.0/16"};
  }

 private:
  fs::path dir_;
  std::vector<std::string> hosts_, links_;
  bool ok_ = false;
  std::string why_;
};

TEST(Serve, TwoHostJobAnswersLikeOneProcess) {
  if (geteuid() != 0) GTEST_SKIP() << "needs root for network namespaces";
  test::TempDir dir;
  TwoHosts hosts(dir.path());
  if (!hosts.ok()) GTEST_SKIP() << "network namespaces unavailable: " << hosts.why();
  const std::string model = make_tiny_model(dir.path());
  const Expected expected = nibble_generate(model, kPrompts[0], 16);
  // Rank 0 (coordinator) and rank 2 on the first host, rank 1 on the second: the tensor group spans
  // both hosts.
  ServeJob job(dir.path(), model, 2, 1, "",
               {"tcp://0.0.0.0:5591", "tcp://10.213.1.2:5591", hosts.mpirun_args()});
  ASSERT_TRUE(job.wait_ready()) << job.log();
  EXPECT_NE(job.log().find("pid"), std::string::npos);
  EXPECT_NE(job.log().find("on 10.213.2.2"), std::string::npos) << "a worker should run on the second host\n"
                                                                << job.log();
  Client client(job.endpoint());
  const protocol::Final f = client.generate(greedy("two-hosts", kPrompts[0], 16));
  EXPECT_EQ(f.tokens, expected.tokens);
  EXPECT_EQ(f.text, expected.text);
  EXPECT_TRUE(client.shutdown().ok);
  const std::optional<int> code = job.wait_exit(30s);
  ASSERT_TRUE(code.has_value()) << job.log();
  EXPECT_EQ(*code, 0) << job.log();
}

}  // namespace
}  // namespace nibble::cluster
