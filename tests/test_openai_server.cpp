// The OpenAI-compatible HTTP API.
//   - OpenAiApi: its translation (cluster/openai_api) on its own: every field a request can carry, every
//     refusal naming its field, the response and chunk shapes.
//   - OpenAiServer: a real `nibble openai` process in front of a real `mpirun ... nibble serve` job,
//     over real HTTP on loopback: its answers are the ZeroMQ client's for the same requests (text,
//     tokens, usage, logprobs), streamed or not, one at a time or eight at once; bad requests are refused
//     by name and the service keeps serving; a client that leaves a stream cancels its request (its KV
//     blocks come back); without a coordinator it answers 503; SIGTERM stops it.
#include <gtest/gtest.h>
#include <httplib.h>

#include <atomic>
#include <fstream>
#include <map>
#include <nlohmann/json.hpp>
#include <regex>
#include <string>
#include <thread>
#include <tuple>
#include <vector>

#include "cluster/openai_api.hpp"
#include "model/gguf.hpp"
#include "model/lora_adapter.hpp"
#include "model/random_model.hpp"
#include "model/tokenizer.hpp"
#include "tests/support/serve_job.hpp"
#include "tests/support/test_support.hpp"
#include "worker/json_constraint.hpp"

namespace nibble::cluster {
namespace {

using nlohmann::json;
using openai::ApiError;
using openai::Endpoint;
using test_jobs::ServeJob;
namespace fs = std::filesystem;
using namespace std::chrono_literals;

// ------------------------------------------------------------------ the translation on its own

openai::ApiRequest parse(Endpoint endpoint, const json& body, const openai::ApiSettings& settings = {}) {
  return openai::parse_request(endpoint, body.dump(), settings);
}

// The ApiError a body gets (status and param), or a failure if it is accepted.
ApiError refusal(Endpoint endpoint, const std::string& body) {
  try {
    openai::parse_request(endpoint, body, {});
  } catch (const ApiError& e) {
    return e;
  }
  ADD_FAILURE() << "accepted: " << body;
  return ApiError(0, "", "", "", "");
}

TEST(OpenAiApi, CompletionFieldsBecomeTheGenerateRequest) {
  const auto api = parse(Endpoint::completions, {{"model", "nibble"},
                                                 {"prompt", "Hello"},
                                                 {"max_tokens", 7},
                                                 {"temperature", 0.5},
                                                 {"top_p", 0.9},
                                                 {"top_k", 40},
                                                 {"min_p", 0.05},
                                                 {"repetition_penalty", 1.1},
                                                 {"seed", 42},
                                                 {"stop", {"\n", "END"}},
                                                 {"stream", true},
                                                 {"stream_options", {{"include_usage", true}}},
                                                 {"logprobs", 3},
                                                 {"n", 1},
                                                 {"presence_penalty", 0.5},
                                                 {"frequency_penalty", -0.25},
                                                 {"logit_bias", {{"17", -100}, {"3", 2.5}}},
                                                 {"ignore_eos", true},
                                                 {"user", "someone"}});
  const protocol::GenerateRequest& r = api.request;
  EXPECT_EQ(std::get<std::string>(r.prompt), "Hello");
  EXPECT_EQ(r.max_tokens, 7u);
  EXPECT_FLOAT_EQ(r.sampling.temperature, 0.5f);
  EXPECT_FLOAT_EQ(r.sampling.top_p, 0.9f);
  EXPECT_EQ(r.sampling.top_k, 40);
  EXPECT_FLOAT_EQ(r.sampling.min_p, 0.05f);
  EXPECT_FLOAT_EQ(r.sampling.repetition_penalty, 1.1f);
  EXPECT_EQ(r.sampling.seed, std::optional<uint64_t>(42));
  EXPECT_TRUE(r.ignore_eos);
  EXPECT_FLOAT_EQ(r.sampling.presence_penalty, 0.5f);
  EXPECT_FLOAT_EQ(r.sampling.frequency_penalty, -0.25f);
  EXPECT_EQ(r.sampling.logit_bias, (std::vector<protocol::TokenBias>{{17, -100.0f}, {3, 2.5f}}));
  EXPECT_EQ(r.stop, (std::vector<std::string>{"\n", "END"}));
  EXPECT_TRUE(r.stream);
  EXPECT_TRUE(api.include_usage);
  EXPECT_TRUE(api.report_logprobs);
  EXPECT_EQ(api.top_logprobs, 3u);
  EXPECT_EQ(r.logprobs, 3u);

  // OpenAI's defaults: 16 tokens, temperature 1, no stop, no logprobs; vLLM's top_k -1 is off.
  const auto plain = parse(Endpoint::completions, {{"prompt", {1, 2, 3}}, {"top_k", -1}, {"stop", "x"}});
  EXPECT_EQ(std::get<std::vector<int32_t>>(plain.request.prompt), (std::vector<int32_t>{1, 2, 3}));
  EXPECT_EQ(plain.request.max_tokens, 16u);
  EXPECT_FLOAT_EQ(plain.request.sampling.temperature, 1.0f);
  EXPECT_EQ(plain.request.sampling.top_k, 0);
  EXPECT_FALSE(plain.request.sampling.seed.has_value());
  EXPECT_EQ(plain.request.stop, std::vector<std::string>{"x"});
  EXPECT_FALSE(plain.report_logprobs);
  EXPECT_EQ(plain.request.logprobs, 0u);
  // A batch of one prompt, as text or ids; logprobs 0 still reports each token's own.
  EXPECT_EQ(std::get<std::string>(parse(Endpoint::completions, {{"prompt", {"one"}}}).request.prompt), "one");
  EXPECT_EQ(
      std::get<std::vector<int32_t>>(parse(Endpoint::completions, {{"prompt", {{5, 6}}}}).request.prompt),
      (std::vector<int32_t>{5, 6}));
  const auto zero = parse(Endpoint::completions, {{"prompt", "x"}, {"logprobs", 0}, {"seed", nullptr}});
  EXPECT_TRUE(zero.report_logprobs);
  EXPECT_EQ(zero.top_logprobs, 0u);
  EXPECT_EQ(zero.request.logprobs, 1u);
  EXPECT_FALSE(zero.request.sampling.seed.has_value());  // null is "not given"
}

TEST(OpenAiApi, ChatFieldsBecomeAConversation) {
  openai::ApiSettings settings;
  settings.default_chat_max_tokens = 99;
  const auto api =
      parse(Endpoint::chat_completions,
            {{"messages",
              {{{"role", "developer"}, {"content", "Be brief."}},
               {{"role", "user"},
                {"content", {{{"type", "text"}, {"text", "a"}}, {{"type", "text"}, {"text", "b"}}}},
                {"name", "x"}},
               {{"role", "assistant"}, {"content", "c"}}}},
             {"logprobs", true},
             {"top_logprobs", 2},
             {"response_format", {{"type", "text"}}},
             {"tools", json::array()},
             {"tool_choice", "none"}},
            settings);
  const auto& messages = std::get<std::vector<protocol::ChatMessage>>(api.request.prompt);
  ASSERT_EQ(messages.size(), 3u);
  EXPECT_EQ(messages[0], (protocol::ChatMessage{"system", "Be brief."}));  // developer is the system role
  EXPECT_EQ(messages[1], (protocol::ChatMessage{"user", "a\nb"}));         // text parts joined
  EXPECT_EQ(messages[2], (protocol::ChatMessage{"assistant", "c"}));
  EXPECT_EQ(api.request.max_tokens, 99u);
  EXPECT_TRUE(api.report_logprobs);
  EXPECT_EQ(api.top_logprobs, 2u);
  EXPECT_EQ(api.request.logprobs, 2u);
  // max_completion_tokens (OpenAI's newer name) wins over max_tokens.
  const json hi = {{{"role", "user"}, {"content", "hi"}}};
  EXPECT_EQ(
      parse(Endpoint::chat_completions, {{"messages", hi}, {"max_tokens", 5}, {"max_completion_tokens", 6}})
          .request.max_tokens,
      6u);
  const auto one = parse(Endpoint::chat_completions, {{"messages", hi}, {"logprobs", true}});
  EXPECT_EQ(one.top_logprobs, 0u);
  EXPECT_EQ(one.request.logprobs, 1u);
  EXPECT_EQ(one.request.response_format, protocol::ResponseFormat::text);
  // vLLM's min_tokens and stop_token_ids.
  const auto extra =
      parse(Endpoint::chat_completions, {{"messages", hi}, {"min_tokens", 3}, {"stop_token_ids", {2, 9}}});
  EXPECT_EQ(extra.request.min_tokens, 3u);
  EXPECT_EQ(extra.request.stop_token_ids, (std::vector<int32_t>{2, 9}));
  // JSON mode, on either endpoint.
  EXPECT_EQ(
      parse(Endpoint::chat_completions, {{"messages", hi}, {"response_format", {{"type", "json_object"}}}})
          .request.response_format,
      protocol::ResponseFormat::json_object);
  EXPECT_EQ(parse(Endpoint::completions, {{"prompt", "x"}, {"response_format", {{"type", "json_object"}}}})
                .request.response_format,
            protocol::ResponseFormat::json_object);
  // Structured output: the schema travels as text.
  const json schema = {
      {"type", "object"}, {"properties", {{"a", {{"type", "integer"}}}}}, {"required", {"a"}}};
  const auto structured = parse(
      Endpoint::chat_completions,
      {{"messages", hi},
       {"response_format",
        {{"type", "json_schema"}, {"json_schema", {{"name", "n"}, {"strict", true}, {"schema", schema}}}}}});
  EXPECT_EQ(structured.request.response_format, protocol::ResponseFormat::json_schema);
  EXPECT_EQ(json::parse(structured.request.json_schema), schema);
}

// A batch of prompts times n choices: one GenerateRequest per choice in OpenAI's order, seeds apart so
// the n choices differ; usage counts each prompt once and every choice's tokens.
TEST(OpenAiApi, BatchesAndChoicesFanOutInOpenAisOrder) {
  const auto api = parse(Endpoint::completions,
                         {{"prompt", {"a", "b"}}, {"n", 2}, {"best_of", 2}, {"seed", 10}, {"max_tokens", 3}});
  const std::vector<protocol::GenerateRequest> choices = openai::choice_requests(api);
  ASSERT_EQ(choices.size(), 4u);
  const std::vector<std::string> prompts = {"a", "a", "b", "b"};
  const std::vector<uint64_t> seeds = {10, 11, 10, 11};
  for (size_t i = 0; i < 4; ++i) {
    EXPECT_EQ(std::get<std::string>(choices[i].prompt), prompts[i]);
    EXPECT_EQ(choices[i].sampling.seed, std::optional<uint64_t>(seeds[i]));
    EXPECT_EQ(choices[i].max_tokens, 3u);
  }
  const auto ids = parse(Endpoint::completions, {{"prompt", {{1, 2}, {3}}}});
  ASSERT_EQ(openai::choice_requests(ids).size(), 2u);
  EXPECT_EQ(std::get<std::vector<int32_t>>(openai::choice_requests(ids)[1].prompt), std::vector<int32_t>{3});
  EXPECT_FALSE(openai::choice_requests(ids)[1].sampling.seed.has_value());  // the server picks each

  std::vector<protocol::Final> finals(4);
  for (size_t i = 0; i < 4; ++i) {
    finals[i].prompt_tokens = i < 2 ? 5 : 7;
    finals[i].cached_prompt_tokens = i == 1 || i == 3 ? 5 : 0;  // a later choice found its prompt cached
    finals[i].completion_tokens = static_cast<uint32_t>(i + 1);
    finals[i].text = prompts[i] + std::to_string(i);
  }
  const json r = openai::response(api, finals, "cmpl-1", 1, "m");
  ASSERT_EQ(r["choices"].size(), 4u);
  for (size_t i = 0; i < 4; ++i) {
    EXPECT_EQ(r["choices"][i]["index"], i);
    EXPECT_EQ(r["choices"][i]["text"], finals[i].text);
  }
  EXPECT_EQ(r["usage"]["prompt_tokens"], 12);
  EXPECT_EQ(r["usage"]["completion_tokens"], 10);
  EXPECT_EQ(r["usage"]["total_tokens"], 22);
  EXPECT_EQ(r["usage"]["prompt_tokens_details"]["cached_tokens"], 0);
  const auto chat =
      parse(Endpoint::chat_completions, {{"messages", {{{"role", "user"}, {"content", "hi"}}}}, {"n", 3}});
  EXPECT_EQ(openai::choice_requests(chat).size(), 3u);
}

TEST(OpenAiApi, RefusalsNameTheField) {
  struct Case {
    Endpoint endpoint;
    std::string body;
    int status;
    const char* param;
    const char* says;
  };
  const auto C = Endpoint::completions;
  const auto H = Endpoint::chat_completions;
  const std::string m = R"("messages": [{"role": "user", "content": "hi"}])";
  const std::vector<Case> cases = {
      {C, "{bad", 400, "", "not JSON"},
      {C, "[1, 2]", 400, "", "JSON object"},
      {C, R"({"prompt": "x", "seed": 1e999})", 400, "", "not JSON"},  // beyond a double (fuzzing found it)
      {C, R"({"prompt": "x", "foo": 1})", 400, "foo", "unknown key 'foo'"},
      {C, R"({"max_tokens": 3})", 400, "prompt", "prompt: required"},
      {C, R"({"prompt": 5})", 400, "prompt", "prompt: expected"},
      {C, R"({"prompt": []})", 400, "prompt", "non-empty array"},
      {C, R"({"prompt": ["a", 5]})", 400, "prompt", "a batch of strings or of token id arrays"},
      {C, R"({"prompt": [["a"]]})", 400, "prompt", "token ids"},
      {C, R"({"prompt": [1, -2]})", 400, "prompt", "token ids"},
      {C, R"({"prompt": "x", "temperature": "hot"})", 400, "temperature", "expected a number, got string"},
      {C, R"({"prompt": "x", "temperature": -1})", 400, "temperature", "at least 0"},
      {C, R"({"prompt": "x", "top_p": 0})", 400, "top_p", "(0, 1]"},
      {C, R"({"prompt": "x", "min_p": 1})", 400, "min_p", "[0, 1)"},
      {C, R"({"prompt": "x", "top_k": -5})", 400, "top_k", "top_k"},
      {C, R"({"prompt": "x", "repetition_penalty": 0})", 400, "repetition_penalty", "above 0"},
      {C, R"({"prompt": "x", "max_tokens": 0})", 400, "max_tokens", "at least 1 (0 only with echo)"},
      {C, R"({"prompt": "x", "max_tokens": -1, "echo": true})", 400, "max_tokens", "at least 0"},
      {C, R"({"prompt": "x", "max_tokens": 2.5})", 400, "max_tokens", "an integer"},
      {C, R"({"prompt": "x", "n": 0})", 400, "n", "n: must be 1 to 64"},
      {C, R"({"prompt": "x", "n": 65})", 400, "n", "n: must be 1 to 64"},
      {C, R"({"prompt": ["a", "b", "c"], "n": 22})", 400, "prompt",
       "3 prompts times n = 22 choices: at most 64"},
      {C, R"({"prompt": "x", "n": 2, "best_of": 3})", 400, "best_of", "only equal to n"},
      {C, R"({"prompt": "x", "presence_penalty": 2.5})", 400, "presence_penalty", "[-2, 2]"},
      {C, R"({"prompt": "x", "frequency_penalty": -3})", 400, "frequency_penalty", "[-2, 2]"},
      {C, R"({"prompt": "x", "frequency_penalty": "a lot"})", 400, "frequency_penalty", "expected a number"},
      {C, R"({"prompt": "x", "logit_bias": [5]})", 400, "logit_bias", "an object of token id to bias"},
      {C, R"({"prompt": "x", "logit_bias": {"five": 10}})", 400, "logit_bias", "'five' is not a token id"},
      {C, R"({"prompt": "x", "logit_bias": {"5": 101}})", 400, "logit_bias", "in [-100, 100]"},
      {C, R"({"prompt": "x", "logit_bias": {"5": "up"}})", 400, "logit_bias", "in [-100, 100]"},
      {C, R"({"prompt": [1, 2], "echo": true})", 400, "echo", "the gateway's tokenizer"},
      {H, "{" + m + R"(, "echo": true})", 400, "echo", "unknown key 'echo'"},
      {C, R"({"prompt": "x", "suffix": "s"})", 400, "suffix", "not supported"},
      {C, R"({"prompt": "x", "logprobs": 21})", 400, "logprobs", "0 to 20"},
      {C, R"({"prompt": "x", "stop": [1]})", 400, "stop", "array of strings"},
      {C, R"({"prompt": "x", "stream": "yes"})", 400, "stream", "true or false"},
      {C, R"({"prompt": "x", "ignore_eos": 1})", 400, "ignore_eos", "true or false"},
      {C, R"({"prompt": "x", "stream_options": {"include_usage": true}})", 400, "stream_options",
       "only with"},
      {C, R"({"prompt": "x", "stream": true, "stream_options": {"x": 1}})", 400, "stream_options",
       "unknown key 'x'"},
      {C, R"({"prompt": "x", "model": "gpt-4"})", 404, "model", "'gpt-4' does not exist"},
      {C, R"({"prompt": "x", "messages": []})", 400, "messages", "unknown key 'messages'"},
      {H, R"({"prompt": "x"})", 400, "prompt", "unknown key 'prompt'"},
      {H, "{}", 400, "messages", "messages: required"},
      {H, R"({"messages": []})", 400, "messages", "non-empty array"},
      {H, R"({"messages": [{"role": "user"}]})", 400, "messages", "messages[0].content: required"},
      {H, R"({"messages": [{"role": "", "content": "x"}]})", 400, "messages", "messages[0].role"},
      {H, R"({"messages": [{"role": "user", "content": "x", "tools": []}]})", 400, "messages",
       "messages[0]: unknown key 'tools'"},
      {H, R"({"messages": [{"role": "assistant", "tool_calls": [{"function": {"name": "f"}}]}]})", 400,
       "messages", "messages[0].tool_calls[0]: expected"},
      {H,
       R"({"messages": [{"role": "assistant", "tool_calls": [{"function": {"name": "f", "arguments": "[1]"}}]}]})",
       400, "messages", "messages[0].tool_calls[0].function.arguments: not a JSON object's text"},
      {H, R"({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]})", 400,
       "messages", "messages[0].content[0]: only"},
      {H, "{" + m + R"(, "top_logprobs": 2})", 400, "top_logprobs", "only with \"logprobs\": true"},
      {H, "{" + m + R"(, "tools": [{"type": "function"}]})", 400, "tools",
       "tools[0].function: expected an object"},
      {H, "{" + m + R"(, "tools": {}})", 400, "tools", "tools: expected an array"},
      {H, "{" + m + R"(, "tool_choice": "required"})", 400, "tool_choice", "no tools are offered"},
      {H, "{" + m + R"(, "tool_choice": "always"})", 400, "tool_choice", "expected \"none\", \"auto\""},
      {H, "{" + m + R"(, "tools": [{"type": "function", "function": {"name": "f"}}], "tool_choice":
          {"type": "function", "function": {"name": "g"}}})",
       400, "tool_choice", "no tool is named 'g'"},
      {H,
       "{" + m + R"(, "tools": [{"type": "function", "function": {"name": "f"}}], "tool_choice": "required",
          "response_format": {"type": "json_object"}})",
       400, "response_format", "not with tool_choice required"},
      {H, "{" + m + R"(, "response_format": {"type": "json_schema", "json_schema": {}}})", 400,
       "response_format", "json_schema.schema: required"},
      {H,
       "{" + m + R"(, "response_format": {"type": "json_schema", "json_schema": {"schema": {"type": "object",
          "properties": {"a": {"type": "string", "pattern": "x+"}}}}}})",
       400, "response_format", "json_schema.properties.a.pattern: only a whole-string match"},
      {H, "{" + m + R"(, "response_format": {"type": "json_schema", "json_schema": {"schema": {}, "x": 1}}})",
       400, "response_format", "unknown key 'x'"},
      {H, "{" + m + R"(, "response_format": {"type": "yaml"}})", 400, "response_format", "\"json_schema\""},
      {C, R"({"prompt": "x", "response_format": "json"})", 400, "response_format", "expected an object"},
      {C, R"({"prompt": "x", "max_tokens": 4, "min_tokens": 5})", 400, "min_tokens",
       "more than the 4 tokens"},
      {C, R"({"prompt": "x", "min_tokens": -1})", 400, "min_tokens", "at least 0"},
      {C, R"({"prompt": "x", "stop_token_ids": [1, "2"]})", 400, "stop_token_ids", "integers from 0"},
      {H, "{" + m + R"(, "max_completion_tokens": -1})", 400, "max_completion_tokens", "at least 1"},
  };
  for (const Case& c : cases) {
    SCOPED_TRACE(c.body);
    const ApiError e = refusal(c.endpoint, c.body);
    EXPECT_EQ(e.status, c.status);
    EXPECT_EQ(e.param, c.param);
    EXPECT_NE(std::string(e.what()).find(c.says), std::string::npos) << e.what();
    const json body = openai::error_body(e);
    EXPECT_EQ(body["error"]["message"], e.what());
    EXPECT_EQ(body["error"]["param"], c.param[0] == '\0' ? json(nullptr) : json(c.param));
  }
}

// Latency histograms from Finals' timings, in Prometheus's cumulative buckets.
TEST(OpenAiApi, MetricsCarryTheCountersAndLatencyHistograms) {
  openai::RequestLatencies latencies;
  protocol::Final f;
  f.completion_tokens = 5;
  f.timings = {20.0, 30.0, 400.0};  // queue, prefill, decode ms: TTFT 0.05 s, TPOT 0.1 s, e2e 0.45 s
  latencies.observe(f);
  f.completion_tokens = 1;
  f.timings = {0.0, 3.0, 0.0};  // one token: TTFT 0.003 s, no TPOT
  latencies.observe(f);
  protocol::Stats stats;
  stats.completed = 7;
  stats.cached_prompt_tokens = 40;
  const std::string text = openai::prometheus_metrics(stats, {{{"/v1/completions", 200}, 2}}, latencies);
  for (const char* line :
       {"# TYPE nibble_requests_completed_total counter\nnibble_requests_completed_total 7\n",
        "nibble_prompt_tokens_cached_total 40\n",
        "nibble_http_requests_total{path=\"/v1/completions\",status=\"200\"} 2\n",
        "nibble_time_to_first_token_seconds_bucket{le=\"0.01\"} 1\n",
        "nibble_time_to_first_token_seconds_bucket{le=\"0.05\"} 2\n",
        "nibble_time_to_first_token_seconds_count 2\n",
        "nibble_time_per_output_token_seconds_bucket{le=\"0.075\"} 0\n",
        "nibble_time_per_output_token_seconds_bucket{le=\"0.1\"} 1\n",
        "nibble_time_per_output_token_seconds_count 1\n",
        "nibble_e2e_request_latency_seconds_bucket{le=\"0.5\"} 2\n",
        "nibble_e2e_request_latency_seconds_bucket{le=\"+Inf\"} 2\n",
        "nibble_e2e_request_latency_seconds_sum 0.453\n"}) {
    EXPECT_NE(text.find(line), std::string::npos) << line << "\n" << text;
  }
}

TEST(OpenAiApi, CoordinatorErrorsMapToHttpStatuses) {
  using protocol::ErrorCode;
  EXPECT_EQ(openai::from_protocol(ErrorCode::bad_request, "x").status, 400);
  EXPECT_EQ(openai::from_protocol(ErrorCode::prompt_too_long, "x").status, 400);
  EXPECT_EQ(openai::from_protocol(ErrorCode::prompt_too_long, "x").code, "prompt_too_long");
  EXPECT_EQ(openai::from_protocol(ErrorCode::message_too_large, "x").status, 413);
  EXPECT_EQ(openai::from_protocol(ErrorCode::overloaded, "x").status, 429);
  EXPECT_EQ(openai::from_protocol(ErrorCode::shutting_down, "x").status, 503);
  EXPECT_EQ(openai::from_protocol(ErrorCode::worker_failed, "x").status, 500);
  EXPECT_EQ(openai::from_protocol(ErrorCode::internal, "x").type, "server_error");
  EXPECT_EQ(openai::from_protocol(std::nullopt, "no reply").status, 503);
}

TEST(OpenAiApi, ResponsesAndChunksHaveOpenAisShape) {
  protocol::Final f;
  f.finish_reason = protocol::FinishReason::eos;
  f.prompt_tokens = 4;
  f.completion_tokens = 2;
  f.cached_prompt_tokens = 3;
  f.text = "hi";
  f.tokens = {7, 9};
  f.logprobs = {{-0.5f, {{7, -0.5f}, {8, -1.5f}}}, {-0.25f, {{9, -0.25f}, {3, -2.0f}}}};
  openai::ApiRequest completion;
  completion.report_logprobs = true;
  completion.top_logprobs = 1;
  const json c = openai::response(completion, {f}, "cmpl-1", 123, "m");
  EXPECT_EQ(c["object"], "text_completion");
  EXPECT_EQ(c["id"], "cmpl-1");
  EXPECT_EQ(c["created"], 123);
  EXPECT_EQ(c["model"], "m");
  EXPECT_EQ(c["choices"][0]["text"], "hi");
  EXPECT_EQ(c["choices"][0]["finish_reason"], "stop");
  EXPECT_EQ(c["choices"][0]["logprobs"]["tokens"], json({"token_id:7", "token_id:9"}));
  EXPECT_EQ(c["choices"][0]["logprobs"]["token_logprobs"], json({-0.5, -0.25}));
  EXPECT_EQ(c["choices"][0]["logprobs"]["top_logprobs"],
            json::parse(R"([{"token_id:7": -0.5}, {"token_id:9": -0.25}])"));
  EXPECT_EQ(c["usage"], json::parse(R"({"prompt_tokens": 4, "completion_tokens": 2, "total_tokens": 6,
                                       "prompt_tokens_details": {"cached_tokens": 3}})"));

  openai::ApiRequest chat;
  chat.endpoint = Endpoint::chat_completions;
  const json h = openai::response(chat, {f}, "chatcmpl-1", 123, "m");
  EXPECT_EQ(h["object"], "chat.completion");
  EXPECT_EQ(h["choices"][0]["message"], json::parse(R"({"role": "assistant", "content": "hi"})"));
  EXPECT_TRUE(h["choices"][0]["logprobs"].is_null());
  chat.report_logprobs = true;
  chat.top_logprobs = 2;
  const json lp = openai::response(chat, {f}, "chatcmpl-1", 123, "m")["choices"][0]["logprobs"]["content"];
  ASSERT_EQ(lp.size(), 2u);
  EXPECT_EQ(lp[1]["token"], "token_id:9");
  EXPECT_EQ(lp[1]["logprob"], -0.25);
  EXPECT_EQ(lp[1]["top_logprobs"][1]["token"], "token_id:3");
  EXPECT_EQ(lp[1]["top_logprobs"][1]["logprob"], -2.0);

  f.finish_reason = protocol::FinishReason::length;
  EXPECT_EQ(openai::role_chunk(chat, 0, "i", 1, "m")["choices"][0]["delta"],
            json::parse(R"({"role": "assistant", "content": ""})"));
  const json d = openai::delta_chunk(chat, 2, protocol::Delta{"r", {7}, "h", {f.logprobs[0]}}, "i", 1, "m");
  EXPECT_EQ(d["object"], "chat.completion.chunk");
  EXPECT_EQ(d["choices"][0]["delta"]["content"], "h");
  EXPECT_EQ(d["choices"][0]["index"], 2);
  EXPECT_EQ(d["choices"][0]["logprobs"]["content"][0]["token"], "token_id:7");
  EXPECT_TRUE(d["choices"][0]["finish_reason"].is_null());
  EXPECT_EQ(openai::finish_chunk(chat, 0, f, "i", 1, "m")["choices"][0]["finish_reason"], "length");
  EXPECT_EQ(openai::finish_chunk(completion, 0, f, "i", 1, "m")["choices"][0]["text"], "");
  const json u = openai::usage_chunk(completion, {f}, "i", 1, "m");
  EXPECT_TRUE(u["choices"].empty());
  EXPECT_EQ(u["usage"]["total_tokens"], 6);
  // With a tokenizer, tokens are named by their text and chat gives their bytes.
  chat.token_text = [](int32_t id) {
    return id == 9 ? std::string("\xe2\x82") : std::string("t").append(std::to_string(id));
  };
  const json named = openai::response(chat, {f}, "i", 1, "m")["choices"][0]["logprobs"]["content"];
  EXPECT_EQ(named[0]["token"], "t7");
  EXPECT_EQ(named[0]["bytes"], json({'t', '7'}));
  EXPECT_EQ(named[1]["bytes"],
            json({0xe2, 0x82}));  // part of a character: its bytes, whatever the text shows
  EXPECT_EQ(named[1]["top_logprobs"][1]["token"], "t3");
  EXPECT_EQ(openai::token_name(completion, 5), "token_id:5");
  // A token may end inside a UTF-8 character: the JSON text replaces it rather than failing.
  EXPECT_EQ(openai::dump(json("a\xe2\x82")), "\"a\xef\xbf\xbd\"");
}

// Completions' echo (OpenAI's; what lm-evaluation-harness's loglikelihood asks with logprobs): the prompt
// before the text; with logprobs the prompt's tokens first, the first with null, then the generated ones;
// max_tokens 0 scores the prompt alone; a prompt of ids is echoed by the tokenizer's decoding.
TEST(OpenAiApi, EchoPutsThePromptAndItsLogprobsFirst) {
  auto api =
      parse(Endpoint::completions, {{"prompt", "Hello"}, {"echo", true}, {"logprobs", 2}, {"max_tokens", 0}});
  EXPECT_TRUE(api.echo);
  EXPECT_EQ(api.echo_texts, std::vector<std::string>{"Hello"});
  EXPECT_EQ(api.request.max_tokens, 0u);
  EXPECT_EQ(api.request.prompt_logprobs, 2);
  EXPECT_EQ(api.request.logprobs, 2u);
  // Without logprobs the prompt's values are not computed, unless it is scored alone.
  EXPECT_EQ(parse(Endpoint::completions, {{"prompt", "Hello"}, {"echo", true}}).request.prompt_logprobs, -1);
  EXPECT_EQ(parse(Endpoint::completions, {{"prompt", "Hello"}, {"echo", true}, {"max_tokens", 0}})
                .request.prompt_logprobs,
            0);
  EXPECT_EQ(parse(Endpoint::completions, {{"prompt", "Hello"}, {"logprobs", 2}}).request.prompt_logprobs, -1);
  test::TempDir dir;
  const std::string path = (dir.path() / "tiny.gguf").string();
  model::write_random_llama(path, model::llama_shape_by_name("tiny"), kernels::DType::Q4_0, 5);
  openai::ApiSettings settings;
  settings.tokenizer = model::Tokenizer::from_gguf(*model::GgufFile::open(path));
  const std::vector<int32_t> ids = settings.tokenizer->encode("Hello there", true);
  api = parse(Endpoint::completions, {{"prompt", {ids, "plain"}}, {"echo", true}, {"n", 2}}, settings);
  EXPECT_EQ(api.echo_texts, (std::vector<std::string>{"Hello there", "plain"}));

  protocol::Final f;
  f.text = "hi";
  f.tokens = {7};
  f.logprobs = {{-0.5f, {{7, -0.5f}, {8, -1.5f}}}};
  f.prompt_token_ids = {1, 5, 6};
  f.prompt_logprobs = {{-2.0f, {{4, -1.0f}, {5, -2.0f}}}, {-0.25f, {{6, -0.25f}, {2, -3.0f}}}};
  api = parse(Endpoint::completions, {{"prompt", "Hello"}, {"echo", true}, {"logprobs", 1}});
  const json c = openai::response(api, {f}, "cmpl-1", 1, "m");
  EXPECT_EQ(c["choices"][0]["text"], "Hellohi");
  const json& lp = c["choices"][0]["logprobs"];
  EXPECT_EQ(lp["tokens"], json({"token_id:1", "token_id:5", "token_id:6", "token_id:7"}));
  EXPECT_EQ(lp["token_logprobs"], json::parse("[null, -2.0, -0.25, -0.5]"));
  EXPECT_EQ(lp["top_logprobs"],
            json::parse(R"([null, {"token_id:4": -1.0}, {"token_id:6": -0.25}, {"token_id:7": -0.5}])"));
  // Streamed: the echo is its own first chunk.
  const json e = openai::echo_chunk(api, 0, f.prompt_token_ids, f.prompt_logprobs, "i", 1, "m");
  EXPECT_EQ(e["choices"][0]["text"], "Hello");
  EXPECT_EQ(e["choices"][0]["logprobs"]["token_logprobs"], json::parse("[null, -2.0, -0.25]"));
  EXPECT_TRUE(e["choices"][0]["finish_reason"].is_null());
  // Without logprobs, only the text.
  api = parse(Endpoint::completions, {{"prompt", "Hello"}, {"echo", true}});
  EXPECT_EQ(openai::response(api, {f}, "cmpl-1", 1, "m")["choices"][0]["text"], "Hellohi");
  EXPECT_TRUE(openai::response(api, {f}, "cmpl-1", 1, "m")["choices"][0]["logprobs"].is_null());
}

// /tokenize and /detokenize: the tokenizer's ids for a text (BOS as the model adds it, unless
// add_special_tokens is false) and its text for ids; refusals by field.
// OpenAI's function calling: tools (their keys in the client's order), tool_choice, an assistant's
// tool_calls (content null) and tool results in; a message's tool_calls and finish_reason "tool_calls" out,
// streamed as one chunk per choice with each call's index.
TEST(OpenAiApi, ToolsAndToolCallsAsOpenAiWritesThem) {
  const openai::ApiRequest api = openai::parse_request(Endpoint::chat_completions, R"({"messages": [
      {"role": "user", "content": "Weather?"},
      {"role": "assistant", "content": null, "tool_calls": [{"id": "call_9", "type": "function",
        "function": {"name": "get_weather", "arguments": "{\"city\": \"Oslo\"}"}}]},
      {"role": "tool", "tool_call_id": "call_9", "content": "snow"}],
    "tools": [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object",
      "properties": {"city": {"type": "string"}}}, "description": "d"}}],
    "tool_choice": {"type": "function", "function": {"name": "get_weather"}}, "parallel_tool_calls": false})",
                                                       openai::ApiSettings{});
  const auto& messages = std::get<std::vector<protocol::ChatMessage>>(api.request.prompt);
  ASSERT_EQ(messages.size(), 3u);
  EXPECT_EQ(messages[1].content, "");
  ASSERT_EQ(messages[1].tool_calls.size(), 1u);
  EXPECT_EQ(messages[1].tool_calls[0], (protocol::ToolCall{"call_9", "get_weather", R"({"city": "Oslo"})"}));
  EXPECT_EQ(messages[2].role, "tool");
  // The client's key order ("parameters" before "description"), not nlohmann's sorted one.
  EXPECT_EQ(api.request.tools,
            R"([{"type":"function","function":{"name":"get_weather","parameters":{"type":"object",)"
            R"("properties":{"city":{"type":"string"}}},"description":"d"}}])");
  EXPECT_EQ(api.request.tool_choice, protocol::ToolChoice::function);
  EXPECT_EQ(api.request.tool_choice_function, "get_weather");
  EXPECT_EQ(
      openai::parse_request(Endpoint::chat_completions,
                            R"({"messages": [{"role": "user", "content": "x"}], "tools": [{"type": "function",
                              "function": {"name": "f"}}], "tool_choice": "required"})",
                            openai::ApiSettings{})
          .request.tool_choice,
      protocol::ToolChoice::required);

  protocol::Final f;
  f.finish_reason = protocol::FinishReason::tool_calls;
  f.tool_calls = {{"call_1", "get_weather", R"({"city": "Oslo"})"}, {"call_2", "now", "{}"}};
  const json body = openai::response(api, {f}, "chatcmpl-1", 7, "nibble");
  const json& choice = body["choices"][0];
  EXPECT_EQ(choice["finish_reason"], "tool_calls");
  EXPECT_TRUE(choice["message"]["content"].is_null());
  EXPECT_EQ(choice["message"]["tool_calls"],
            json::parse(R"([{"id": "call_1", "type": "function", "function": {"name": "get_weather",
                "arguments": "{\"city\": \"Oslo\"}"}}, {"id": "call_2", "type": "function", "function":
                {"name": "now", "arguments": "{}"}}])"));
  f.text = "Looking.";
  EXPECT_EQ(openai::response(api, {f}, "chatcmpl-1", 7, "nibble")["choices"][0]["message"]["content"],
            "Looking.");
  const json chunk = openai::tool_calls_chunk(api, 0, f, "chatcmpl-1", 7, "nibble");
  EXPECT_EQ(chunk["object"], "chat.completion.chunk");
  const json& calls = chunk["choices"][0]["delta"]["tool_calls"];
  ASSERT_EQ(calls.size(), 2u);
  EXPECT_EQ(calls[1]["index"], 1);
  EXPECT_EQ(calls[1]["function"]["name"], "now");
  EXPECT_EQ(openai::finish_chunk(api, 0, f, "chatcmpl-1", 7, "nibble")["choices"][0]["finish_reason"],
            "tool_calls");
}

TEST(OpenAiApi, TokenizeAndDetokenizeWithTheModelsTokenizer) {
  test::TempDir dir;
  const std::string path = (dir.path() / "tiny.gguf").string();
  model::write_random_llama(path, model::llama_shape_by_name("tiny"), kernels::DType::Q4_0, 5);
  openai::ApiSettings settings;
  settings.tokenizer = model::Tokenizer::from_gguf(*model::GgufFile::open(path));
  const model::Tokenizer& tokenizer = *settings.tokenizer;
  const std::string text = "Hello there, general Kenobi";
  const json t = openai::tokenize(json{{"prompt", text}, {"model", "nibble"}}.dump(), settings);
  const std::vector<int32_t> ids = tokenizer.encode(text, tokenizer.add_bos_default());
  EXPECT_EQ(t["tokens"].get<std::vector<int32_t>>(), ids);
  EXPECT_EQ(t["count"], ids.size());
  EXPECT_EQ(openai::tokenize(json{{"prompt", text}, {"add_special_tokens", false}}.dump(), settings)["tokens"]
                .get<std::vector<int32_t>>(),
            tokenizer.encode(text, false));
  EXPECT_EQ(openai::detokenize(json{{"tokens", ids}}.dump(), settings)["prompt"], tokenizer.decode(ids));
  // Control tokens' texts are those tokens (vLLM's and llama.cpp's /tokenize).
  const json info = openai::tokenizer_info(settings);
  const std::string eos = tokenizer.token_text(tokenizer.eos_id());
  EXPECT_EQ(info["eos_token"], eos);
  EXPECT_EQ(info["bos_token"], tokenizer.token_text(tokenizer.bos_id()));
  EXPECT_EQ(info["add_bos_token"], tokenizer.add_bos_default());
  EXPECT_EQ(openai::tokenize(json{{"prompt", eos}, {"add_special_tokens", false}}.dump(), settings)["tokens"],
            json({tokenizer.eos_id()}));
  for (const auto& [call, body, param] :
       std::vector<std::tuple<decltype(&openai::tokenize), std::string, std::string>>{
           {&openai::tokenize, "{}", "prompt"},
           {&openai::tokenize, R"({"prompt": 5})", "prompt"},
           {&openai::tokenize, R"({"prompt": "x", "messages": []})", "messages"},
           {&openai::detokenize, R"({"tokens": "1 2"})", "tokens"},
           {&openai::detokenize, R"({"tokens": [1, 99999999]})", "tokens"},
           {&openai::detokenize, R"({"tokens": [-1]})", "tokens"}}) {
    try {
      call(body, settings);
      ADD_FAILURE() << "accepted: " << body;
    } catch (const ApiError& e) {
      EXPECT_EQ(e.status, 400) << body;
      EXPECT_EQ(e.param, param) << body << ": " << e.what();
    }
  }
  EXPECT_THROW(openai::tokenize(R"({"prompt": "x", "model": "other"})", settings), ApiError);
}

// ------------------------------------------------------------------ real processes

// A `nibble openai` process; the constructor waits for its "listening on" line.
class GatewayProcess {
 public:
  GatewayProcess(const fs::path& dir, const std::string& coordinator,
                 const std::vector<std::string>& extra = {})
      : log_(dir / ("openai-" + std::to_string(next_log_++) + ".log")) {  // one each: never read another's
    std::vector<std::string> args = {test::nibble_bin(), "openai", "--endpoint",   coordinator,
                                     "--port",           "0",      "--model-name", "tiny"};
    args.insert(args.end(), extra.begin(), extra.end());
    pid_ = fork();
    if (pid_ == 0) {
      const int fd = ::open(log_.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
      dup2(fd, 1);
      dup2(fd, 2);
      std::vector<char*> argv;
      for (std::string& a : args) argv.push_back(a.data());
      argv.push_back(nullptr);
      execv(argv[0], argv.data());
      _exit(127);
    }
    const std::regex listening("listening on http://127\\.0\\.0\\.1:([0-9]+)");
    for (int i = 0; i < 300 && port_ == 0; ++i) {
      std::smatch match;
      const std::string text = log();
      if (std::regex_search(text, match, listening)) port_ = std::stoi(match[1]);
      std::this_thread::sleep_for(20ms);
    }
  }
  ~GatewayProcess() {
    if (!exit_code_) {
      kill(pid_, SIGKILL);
      waitpid(pid_, nullptr, 0);
    }
  }
  int port() const { return port_; }
  std::string log() const {
    std::ifstream in(log_);
    return std::string(std::istreambuf_iterator<char>(in), {});
  }
  // SIGTERM; its exit code (nullopt if it has not exited within 10 s).
  std::optional<int> terminate() {
    kill(pid_, SIGTERM);
    for (int i = 0; i < 500; ++i) {
      int status = 0;
      if (waitpid(pid_, &status, WNOHANG) == pid_) {
        exit_code_ = WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
        return exit_code_;
      }
      std::this_thread::sleep_for(20ms);
    }
    return std::nullopt;
  }

 private:
  static inline int next_log_ = 0;
  fs::path log_;
  pid_t pid_ = -1;
  int port_ = 0;
  std::optional<int> exit_code_;
};

struct HttpReply {
  int status = 0;
  json body;
};

HttpReply post(int port, const std::string& path, const std::string& body) {
  httplib::Client http("127.0.0.1", port);
  http.set_read_timeout(120, 0);
  const auto res = http.Post(path, body, "application/json");
  if (!res) return {0, json(httplib::to_string(res.error()))};
  return {res->status, json::parse(res->body, nullptr, false)};
}

HttpReply get(int port, const std::string& path) {
  httplib::Client http("127.0.0.1", port);
  const auto res = http.Get(path);
  if (!res) return {0, json(httplib::to_string(res.error()))};
  return {res->status, json::parse(res->body, nullptr, false)};
}

// A streamed request's events (each "data: " payload; "[DONE]" as a string), read until the end or until
// `keep_reading` says to stop (then the connection is dropped).
std::vector<json> post_stream(int port, const std::string& path, const std::string& body,
                              const std::function<bool(const std::vector<json>&)>& keep_reading = {}) {
  httplib::Client http("127.0.0.1", port);
  http.set_read_timeout(120, 0);
  httplib::Request req;
  req.method = "POST";
  req.path = path;
  req.body = body;
  req.set_header("Content-Type", "application/json");
  std::string pending;
  std::vector<json> events;
  req.content_receiver = [&](const char* data, size_t n, uint64_t, uint64_t) {
    pending.append(data, n);
    for (size_t end = pending.find("\n\n"); end != std::string::npos; end = pending.find("\n\n")) {
      const std::string event = pending.substr(0, end);
      pending.erase(0, end + 2);
      EXPECT_EQ(event.rfind("data: ", 0), 0u) << event;
      const std::string payload = event.substr(6);
      events.push_back(payload == "[DONE]" ? json("[DONE]") : json::parse(payload));
    }
    return !keep_reading || keep_reading(events);
  };
  httplib::Response res;
  httplib::Error error = httplib::Error::Success;
  http.send(req, res, error);
  return events;
}

// The text of a finished stream's chunks; checks the stream's frame: one id throughout, a finish
// chunk, then (with usage) the usage chunk, then [DONE].
std::string streamed_text(const std::vector<json>& events, bool chat, json* usage = nullptr) {
  EXPECT_GE(events.size(), 3u);
  if (events.size() < 3) return "";
  EXPECT_EQ(events.back(), "[DONE]");
  std::string text;
  bool finished = false;
  for (size_t i = 0; i + 1 < events.size(); ++i) {
    const json& e = events[i];
    EXPECT_EQ(e["id"], events[0]["id"]);
    EXPECT_EQ(e["object"], chat ? "chat.completion.chunk" : "text_completion");
    if (e["choices"].empty()) {  // the usage chunk, last
      EXPECT_TRUE(finished);
      if (usage != nullptr) *usage = e["usage"];
      continue;
    }
    const json& choice = e["choices"][0];
    if (!choice["finish_reason"].is_null()) finished = true;
    if (chat) {
      if (i == 0) {
        EXPECT_EQ(choice["delta"]["role"], "assistant");
      }
      text += choice["delta"].value("content", "");
    } else {
      text += choice["text"].get<std::string>();
    }
  }
  EXPECT_TRUE(finished);
  return text;
}

// Each choice's text in a finished stream of several choices (by index), and how many finish chunks came.
std::map<size_t, std::string> streamed_texts(const std::vector<json>& events, bool chat, int* finishes) {
  std::map<size_t, std::string> texts;
  *finishes = 0;
  for (const json& e : events) {
    if (!e.is_object() || !e.contains("choices") || e["choices"].empty()) continue;
    const json& choice = e["choices"][0];
    const size_t index = choice["index"].get<size_t>();
    if (!choice["finish_reason"].is_null()) ++*finishes;
    texts[index] += chat ? choice["delta"].value("content", "") : choice["text"].get<std::string>();
  }
  return texts;
}

// A tiny project-made model served by one worker with a chat format, and the gateway in front.
struct Service {
  test::TempDir dir;
  std::unique_ptr<ServeJob> job;
  std::unique_ptr<GatewayProcess> gateway;

  std::string model = (dir.path() / "tiny.gguf").string();

  // with_tokenizer: the gateway gets the model's tokenizer (--tokenizer) and names logprobs' tokens by text.
  // yaml: the job's configuration beyond the model.
  explicit Service(
      bool with_tokenizer = false,
      const std::string& yaml = "chat_template: chatml\ncontext: 256\nkv_cache: { num_blocks: 64 }\n") {
    model::write_random_llama(model, model::llama_shape_by_name("tiny"), kernels::DType::Q4_0, 5);
    job = std::make_unique<ServeJob>(dir.path(), model, 1, 1, yaml);
    EXPECT_TRUE(job->wait_ready()) << job->log();
    gateway = std::make_unique<GatewayProcess>(
        dir.path(), job->endpoint(),
        with_tokenizer ? std::vector<std::string>{"--tokenizer", model} : std::vector<std::string>{});
    EXPECT_GT(gateway->port(), 0) << gateway->log();
  }
  int port() const { return gateway->port(); }
  Client client() const { return Client(job->endpoint()); }
};

const std::string kPrompt = "The quick brown fox jumps over the lazy dog";

// How the gateway names a token with the model's tokenizer: its bytes, or a control token's text.
std::string token_name(const model::Tokenizer& tokenizer, int32_t id) {
  const std::string bytes = tokenizer.token_bytes(id);
  return bytes.empty() ? tokenizer.token_text(id) : bytes;
}

// A logprob's token name without a tokenizer.
std::string id_name(int32_t token) { return "token_id:" + std::to_string(token); }

protocol::GenerateRequest greedy(decltype(protocol::GenerateRequest::prompt) prompt, uint32_t max_tokens,
                                 uint32_t logprobs = 0) {
  protocol::GenerateRequest r;
  r.prompt = std::move(prompt);
  r.sampling.temperature = 0.0f;
  r.max_tokens = max_tokens;
  r.logprobs = logprobs;
  return r;
}

TEST(OpenAiServer, AnswersAsTheZeroMqClientDoes) {
  if (!fs::exists(test_jobs::mpiexec())) GTEST_SKIP() << "mpirun (" << test_jobs::mpiexec() << ") is absent";
  Service service;
  ASSERT_GT(service.port(), 0);
  const int port = service.port();
  Client client = service.client();

  EXPECT_EQ(get(port, "/health").status, 200);
  EXPECT_EQ(get(port, "/health").body["status"], "ok");
  const HttpReply models = get(port, "/v1/models");
  EXPECT_EQ(models.status, 200);
  EXPECT_EQ(models.body["data"][0]["id"], "tiny");

  // Completions: a text prompt and an ids prompt, with logprobs, against the ZeroMQ client's Final.
  // Long enough for whole KV blocks, which the second request finds cached.
  std::string prompt;
  for (int i = 0; i < 6; ++i) prompt += "The quick brown fox jumps over the lazy dog. ";
  const protocol::Final expected = client.generate(greedy(prompt, 12, 3));
  const HttpReply c = post(
      port, "/v1/completions",
      json{{"model", "tiny"}, {"prompt", prompt}, {"max_tokens", 12}, {"temperature", 0}, {"logprobs", 3}}
          .dump());
  ASSERT_EQ(c.status, 200) << c.body;
  EXPECT_EQ(c.body["object"], "text_completion");
  EXPECT_EQ(c.body["model"], "tiny");
  EXPECT_EQ(c.body["choices"][0]["text"], expected.text);
  EXPECT_EQ(c.body["choices"][0]["finish_reason"],
            expected.finish_reason == protocol::FinishReason::length ? "length" : "stop");
  EXPECT_EQ(c.body["usage"]["prompt_tokens"], expected.prompt_tokens);
  EXPECT_EQ(c.body["usage"]["completion_tokens"], expected.completion_tokens);
  EXPECT_EQ(c.body["usage"]["total_tokens"], expected.prompt_tokens + expected.completion_tokens);
  EXPECT_GT(c.body["usage"]["prompt_tokens_details"]["cached_tokens"].get<int>(),
            0);  // the same prompt again
  const json& lp = c.body["choices"][0]["logprobs"];
  ASSERT_EQ(lp["tokens"].size(), expected.tokens.size());
  for (size_t i = 0; i < expected.tokens.size(); ++i) {
    EXPECT_EQ(lp["tokens"][i], id_name(expected.tokens[i]));
    EXPECT_FLOAT_EQ(lp["token_logprobs"][i].get<float>(), expected.logprobs[i].logprob);
    EXPECT_EQ(lp["top_logprobs"][i].size(), 3u);
    EXPECT_FLOAT_EQ(lp["top_logprobs"][i][id_name(expected.logprobs[i].top[0].token)].get<float>(),
                    expected.logprobs[i].top[0].logprob);
  }
  const HttpReply ids =
      post(port, "/v1/completions",
           json{{"prompt", expected.prompt_token_ids}, {"max_tokens", 12}, {"temperature", 0}}.dump());
  ASSERT_EQ(ids.status, 200) << ids.body;
  EXPECT_EQ(ids.body["choices"][0]["text"], expected.text);

  // Streamed: the chunks' text is the whole answer's; usage last when asked for.
  json usage;
  const std::string streamed = streamed_text(post_stream(port, "/v1/completions",
                                                         json{{"prompt", prompt},
                                                              {"max_tokens", 12},
                                                              {"temperature", 0},
                                                              {"stream", true},
                                                              {"stream_options", {{"include_usage", true}}}}
                                                             .dump()),
                                             false, &usage);
  EXPECT_EQ(streamed, expected.text);
  EXPECT_EQ(usage["completion_tokens"], expected.completion_tokens);

  // Chat: the coordinator formats the conversation with the configured template (chatml).
  const std::vector<protocol::ChatMessage> conversation = {{"system", "You are terse."},
                                                           {"user", "Say something"}};
  const protocol::Final chat_expected = client.generate(greedy(conversation, 10, 2));
  const json chat_body = {{"model", "tiny"},
                          {"messages",
                           {{{"role", "system"}, {"content", "You are terse."}},
                            {{"role", "user"}, {"content", "Say something"}}}},
                          {"max_tokens", 10},
                          {"temperature", 0},
                          {"logprobs", true},
                          {"top_logprobs", 2}};
  const HttpReply h = post(port, "/v1/chat/completions", chat_body.dump());
  ASSERT_EQ(h.status, 200) << h.body;
  EXPECT_EQ(h.body["object"], "chat.completion");
  EXPECT_EQ(h.body["choices"][0]["message"]["role"], "assistant");
  EXPECT_EQ(h.body["choices"][0]["message"]["content"], chat_expected.text);
  EXPECT_EQ(h.body["usage"]["prompt_tokens"], chat_expected.prompt_tokens);
  const json& content = h.body["choices"][0]["logprobs"]["content"];
  ASSERT_EQ(content.size(), chat_expected.tokens.size());
  for (size_t i = 0; i < content.size(); ++i) {
    EXPECT_EQ(content[i]["token"], id_name(chat_expected.tokens[i]));
    EXPECT_FLOAT_EQ(content[i]["logprob"].get<float>(), chat_expected.logprobs[i].logprob);
    EXPECT_EQ(content[i]["top_logprobs"].size(), 2u);
  }
  json stream_body = chat_body;
  stream_body["stream"] = true;
  EXPECT_EQ(streamed_text(post_stream(port, "/v1/chat/completions", stream_body.dump()), true),
            chat_expected.text);

  // Eight requests at once, each answered as it is alone.
  std::vector<std::string> prompts, answers(8);
  std::vector<std::string> alone;
  for (int i = 0; i < 8; ++i) {
    prompts.push_back("request " + std::to_string(i) + " asks about the number " + std::to_string(i * 7));
    alone.push_back(client.generate(greedy(prompts.back(), 8 + i)).text);
  }
  std::vector<std::thread> threads;
  for (int i = 0; i < 8; ++i) {
    threads.emplace_back([&, i] {
      const json body = {
          {"prompt", prompts[i]}, {"max_tokens", 8 + i}, {"temperature", 0}, {"stream", i % 2 == 1}};
      answers[i] =
          i % 2 == 1
              ? streamed_text(post_stream(port, "/v1/completions", body.dump()), false)
              : post(port, "/v1/completions", body.dump()).body["choices"][0]["text"].get<std::string>();
    });
  }
  for (std::thread& t : threads) t.join();
  for (int i = 0; i < 8; ++i) EXPECT_EQ(answers[i], alone[i]) << "request " << i;
}

// n choices and a batch of prompts: each choice is the request the ZeroMQ client makes for it (choice j
// with seed + j), answered whole or streamed with each chunk naming its choice.
TEST(OpenAiServer, ChoicesAndBatchesAnswerAsTheirOwnRequests) {
  if (!fs::exists(test_jobs::mpiexec())) GTEST_SKIP() << "mpirun (" << test_jobs::mpiexec() << ") is absent";
  Service service;
  ASSERT_GT(service.port(), 0);
  const int port = service.port();
  Client client = service.client();

  const std::vector<std::string> prompts = {"Tell me a story about a fox", "What is the capital of France"};
  std::vector<std::string> expected;  // choice order: prompt * n + j
  for (const std::string& p : prompts) {
    for (uint64_t j = 0; j < 3; ++j) {
      protocol::GenerateRequest r = greedy(p, 10);
      r.sampling.temperature = 0.9f;
      r.sampling.seed = 7 + j;
      expected.push_back(client.generate(r).text);
    }
  }
  EXPECT_NE(expected[0], expected[1]);  // the seeds differ, so do the samples
  const json body = {{"prompt", prompts}, {"n", 3}, {"max_tokens", 10}, {"temperature", 0.9}, {"seed", 7}};
  const HttpReply whole = post(port, "/v1/completions", body.dump());
  ASSERT_EQ(whole.status, 200) << whole.body;
  ASSERT_EQ(whole.body["choices"].size(), 6u);
  for (size_t i = 0; i < 6; ++i) {
    EXPECT_EQ(whole.body["choices"][i]["index"], i);
    EXPECT_EQ(whole.body["choices"][i]["text"], expected[i]) << "choice " << i;
  }
  EXPECT_GT(whole.body["usage"]["completion_tokens"].get<int>(), 6);

  json streamed_body = body;
  streamed_body["stream"] = true;
  int finishes = 0;
  const std::vector<json> events = post_stream(port, "/v1/completions", streamed_body.dump());
  ASSERT_FALSE(events.empty());
  EXPECT_EQ(events.back(), "[DONE]");
  const std::map<size_t, std::string> texts = streamed_texts(events, false, &finishes);
  EXPECT_EQ(finishes, 6);
  ASSERT_EQ(texts.size(), 6u);
  for (size_t i = 0; i < 6; ++i) EXPECT_EQ(texts.at(i), expected[i]) << "choice " << i;

  // Chat: n conversations' answers, streamed with a role chunk each and the usage of all.
  const json chat = {{"messages", {{{"role", "user"}, {"content", "Hello"}}}},
                     {"n", 2},
                     {"max_tokens", 6},
                     {"temperature", 0},
                     {"stream", true},
                     {"stream_options", {{"include_usage", true}}}};
  const protocol::Final alone =
      client.generate(greedy(std::vector<protocol::ChatMessage>{{"user", "Hello"}}, 6));
  const std::vector<json> chat_events = post_stream(port, "/v1/chat/completions", chat.dump());
  const std::map<size_t, std::string> chat_texts = streamed_texts(chat_events, true, &finishes);
  EXPECT_EQ(finishes, 2);
  ASSERT_EQ(chat_texts.size(), 2u);
  EXPECT_EQ(chat_texts.at(0), alone.text);
  EXPECT_EQ(chat_texts.at(1), alone.text);
  ASSERT_GE(chat_events.size(), 2u);
  const json& usage = chat_events[chat_events.size() - 2]["usage"];
  EXPECT_EQ(usage["prompt_tokens"], alone.prompt_tokens);  // one conversation, counted once
  EXPECT_EQ(usage["completion_tokens"], 2 * alone.completion_tokens);

  // One choice refused (prompt too long for the context) fails the whole request.
  const HttpReply refused = post(
      port, "/v1/completions", json{{"prompt", {"short", std::string(2000, 'x')}}, {"max_tokens", 4}}.dump());
  EXPECT_EQ(refused.status, 400) << refused.body;
  EXPECT_EQ(refused.body["error"]["code"], "prompt_too_long");
  const protocol::Stats stats = client.stats();
  EXPECT_EQ(stats.running, 0u);
}

TEST(OpenAiServer, RefusesBadRequestsByNameAndKeepsServing) {
  if (!fs::exists(test_jobs::mpiexec())) GTEST_SKIP() << "mpirun (" << test_jobs::mpiexec() << ") is absent";
  Service service;
  ASSERT_GT(service.port(), 0);
  const int port = service.port();

  const HttpReply unknown = post(port, "/v1/completions", R"({"prompt": "x", "best_of": 1, "bogus": true})");
  EXPECT_EQ(unknown.status, 400);
  EXPECT_EQ(unknown.body["error"]["param"], "bogus");
  EXPECT_EQ(unknown.body["error"]["type"], "invalid_request_error");
  const HttpReply not_json = post(port, "/v1/chat/completions", "{\"messages\": ");
  EXPECT_EQ(not_json.status, 400);
  EXPECT_NE(not_json.body["error"]["message"].get<std::string>().find("not JSON"), std::string::npos);
  const HttpReply nowhere = post(port, "/v2/completions", "{}");
  EXPECT_EQ(nowhere.status, 404);
  EXPECT_NE(nowhere.body["error"]["message"].get<std::string>().find("/v2/completions"), std::string::npos);
  // A stop string over the protocol's limit: the coordinator's own checks, before any stream starts.
  const HttpReply long_stop =
      post(port, "/v1/completions",
           json{{"prompt", "x"}, {"stop", std::string(300, 's')}, {"stream", true}}.dump());
  EXPECT_EQ(long_stop.status, 400);
  EXPECT_EQ(long_stop.body["error"]["code"], "bad_request");

  // The coordinator's refusal: prompt plus max_tokens over the context of 256.
  const json too_long = {{"prompt", "hello"}, {"max_tokens", 1000}};
  const HttpReply refused = post(port, "/v1/completions", too_long.dump());
  EXPECT_EQ(refused.status, 400);
  EXPECT_EQ(refused.body["error"]["code"], "prompt_too_long");
  EXPECT_NE(refused.body["error"]["message"].get<std::string>().find("exceeds the context of 256"),
            std::string::npos);
  json streamed_too_long = too_long;
  streamed_too_long["stream"] = true;
  const std::vector<json> events = post_stream(port, "/v1/completions", streamed_too_long.dump());
  ASSERT_EQ(events.size(), 2u);
  EXPECT_EQ(events[0]["error"]["code"], "prompt_too_long");
  EXPECT_EQ(events[1], "[DONE]");
  // A conversation for a role chatml writes as given, and a good request: still served.
  const HttpReply chat = post(port, "/v1/chat/completions",
                              R"({"messages": [{"role": "critic", "content": "x"}], "max_tokens": 3})");
  EXPECT_EQ(chat.status, 200) << chat.body;
  const HttpReply ok = post(port, "/v1/completions", R"({"prompt": "still here", "max_tokens": 4})");
  EXPECT_EQ(ok.status, 200) << ok.body;
  EXPECT_EQ(ok.body["usage"]["completion_tokens"].get<int>() > 0, true);
  EXPECT_EQ(get(port, "/health").status, 200);

  // /metrics: the coordinator's counters as its stats give them, and every answer above by path and
  // status (3 refusals and 2 answers on /v1/completions, the streamed refusal among the 200s).
  httplib::Client http("127.0.0.1", port);
  const auto metrics = http.Get("/metrics");
  ASSERT_TRUE(metrics) << httplib::to_string(metrics.error());
  EXPECT_EQ(metrics->status, 200);
  EXPECT_EQ(metrics->get_header_value("Content-Type"), "text/plain; version=0.0.4");
  const std::string& text = metrics->body;
  const protocol::Stats stats = service.client().stats();
  for (const std::string& line :
       {"nibble_requests_completed_total " + std::to_string(stats.completed),
        "nibble_kv_blocks_total " + std::to_string(stats.total_kv_blocks),
        "nibble_generation_tokens_total " + std::to_string(stats.tokens_generated),
        std::string("# TYPE nibble_requests_running gauge"),
        std::string("nibble_http_requests_total{path=\"/v1/completions\",status=\"400\"} 3"),
        std::string("nibble_http_requests_total{path=\"/v1/completions\",status=\"200\"} 2"),
        std::string("nibble_http_requests_total{path=\"/v1/chat/completions\",status=\"400\"} 1"),
        std::string("nibble_http_requests_total{path=\"/v1/chat/completions\",status=\"200\"} 1"),
        // The two answered requests' latencies (the refused ones have none).
        std::string("nibble_e2e_request_latency_seconds_count 2"),
        std::string("nibble_e2e_request_latency_seconds_bucket{le=\"+Inf\"} 2"),
        std::string("nibble_time_to_first_token_seconds_count 2"),
        std::string("# TYPE nibble_time_per_output_token_seconds histogram")}) {
    EXPECT_NE(text.find(line + "\n"), std::string::npos) << line << "\n" << text;
  }
  EXPECT_EQ(text.find("/v2/completions"), std::string::npos) << "unknown paths are not counted";
}

TEST(OpenAiServer, AClientLeavingAStreamCancelsItsRequest) {
  if (!fs::exists(test_jobs::mpiexec())) GTEST_SKIP() << "mpirun (" << test_jobs::mpiexec() << ") is absent";
  Service service;
  ASSERT_GT(service.port(), 0);
  Client client = service.client();
  const protocol::Stats before = client.stats();
  // Stop reading after three chunks of a request for 200 tokens: the gateway's next write fails and it
  // cancels the request, whose KV blocks come back.
  const std::vector<json> events = post_stream(
      service.port(), "/v1/completions",
      json{{"prompt", "a long story"}, {"max_tokens", 200}, {"temperature", 0}, {"stream", true}}.dump(),
      [](const std::vector<json>& so_far) { return so_far.size() < 3; });
  EXPECT_GE(events.size(), 3u);
  protocol::Stats after;
  for (int i = 0; i < 500; ++i) {
    after = client.stats();
    if (after.running == 0 && after.failed > before.failed) break;
    std::this_thread::sleep_for(20ms);
  }
  EXPECT_EQ(after.running, 0u);
  EXPECT_EQ(after.failed, before.failed + 1);  // cancelled, not completed
  EXPECT_EQ(after.completed, before.completed);
  EXPECT_LT(after.tokens_generated, 200u);
  EXPECT_EQ(after.free_kv_blocks, after.total_kv_blocks);
}

TEST(OpenAiServer, WithoutACoordinatorItAnswers503AndSigtermStopsIt) {
  test::TempDir dir;
  GatewayProcess gateway(dir.path(), "ipc://" + (dir.path() / "nobody.sock").string(),
                         {"--timeout-ms", "300"});
  ASSERT_GT(gateway.port(), 0) << gateway.log();
  const HttpReply health = get(gateway.port(), "/health");
  EXPECT_EQ(health.status, 503);
  EXPECT_EQ(health.body["error"]["code"], "coordinator_unavailable");
  const HttpReply c = post(gateway.port(), "/v1/completions", R"({"prompt": "x"})");
  EXPECT_EQ(c.status, 503);
  EXPECT_EQ(c.body["error"]["type"], "server_error");
  // Refusals of its own need no coordinator (another model's name does: it may be a LoRA adapter the
  // coordinator serves); without --tokenizer it cannot tokenize.
  EXPECT_EQ(post(gateway.port(), "/v1/completions", R"({"prompt": "x", "max_tokens": -1})").status, 400);
  EXPECT_EQ(post(gateway.port(), "/v1/completions", R"({"prompt": "x", "model": "other"})").status, 503);
  const HttpReply tokenize = post(gateway.port(), "/tokenize", R"({"prompt": "x"})");
  EXPECT_EQ(tokenize.status, 501);
  EXPECT_NE(tokenize.body["error"]["message"].get<std::string>().find("--tokenizer"), std::string::npos);
  EXPECT_EQ(get(gateway.port(), "/tokenizer_info").status, 501);
  EXPECT_EQ(gateway.terminate(), std::optional<int>(0)) << gateway.log();
  EXPECT_NE(gateway.log().find("nibble openai: stopped"), std::string::npos);

  // --api-key: /v1/* answers 401 without "Authorization: Bearer KEY" (and past it, 503 here as above);
  // /health stays open.
  GatewayProcess keyed(dir.path(), "ipc://" + (dir.path() / "nobody.sock").string(),
                       {"--timeout-ms", "300", "--api-key", "s3cret"});
  ASSERT_GT(keyed.port(), 0) << keyed.log();
  const HttpReply no_key = post(keyed.port(), "/v1/completions", R"({"prompt": "x"})");
  EXPECT_EQ(no_key.status, 401);
  EXPECT_EQ(no_key.body["error"]["code"], "invalid_api_key");
  httplib::Client http("127.0.0.1", keyed.port());
  const auto wrong = http.Post("/v1/completions", {{"Authorization", "Bearer nope"}}, R"({"prompt": "x"})",
                               "application/json");
  ASSERT_TRUE(wrong);
  EXPECT_EQ(wrong->status, 401);
  const auto right = http.Post("/v1/completions", {{"Authorization", "Bearer s3cret"}}, R"({"prompt": "x"})",
                               "application/json");
  ASSERT_TRUE(right);
  EXPECT_EQ(right->status, 503);
  EXPECT_EQ(get(keyed.port(), "/health").status, 503);
}

// `nibble bench-serve --http` sends the same workload through the gateway as it sends to the coordinator:
// every request answered, the same prompt and output tokens (greedy), its timings measured.
TEST(OpenAiServer, BenchServeLoadsItAsItLoadsTheCoordinator) {
  if (!fs::exists(test_jobs::mpiexec())) GTEST_SKIP() << "mpirun (" << test_jobs::mpiexec() << ") is absent";
  Service service;
  ASSERT_GT(service.port(), 0);
  const std::string workload = " --concurrency 3 --requests 6 --prompt-tokens 4:24 --max-tokens 4:12 --json";
  const auto bench = [&](const std::string& target) {
    const test::CommandResult r = test::run_command(test::nibble_bin() + " bench-serve " + target + workload);
    EXPECT_EQ(r.exit_code, 0) << r.output;
    return json::parse(r.output.substr(r.output.find('{')), nullptr, false);
  };
  const json zmq = bench("--endpoint " + service.job->endpoint());
  const json http = bench("--http http://127.0.0.1:" + std::to_string(service.port()));
  EXPECT_EQ(http["ok"], 6);
  EXPECT_EQ(http["endpoint"], "http://127.0.0.1:" + std::to_string(service.port()));
  EXPECT_EQ(http["input_tokens"], zmq["input_tokens"]);
  EXPECT_EQ(http["output_tokens"], zmq["output_tokens"]);
  EXPECT_GT(http["output_tokens"].get<int>(), 0);
  EXPECT_GT(http["ttft_ms"]["p50"].get<double>(), 0.0);
  EXPECT_GT(http["tpot_ms"]["p50"].get<double>(), 0.0);
  // A gateway that is not there: every request fails, and the bench says so with its exit code.
  const test::CommandResult none =
      test::run_command(test::nibble_bin() + " bench-serve --http http://127.0.0.1:1 --requests 2 --json");
  EXPECT_EQ(none.exit_code, 1) << none.output;
  EXPECT_NE(none.output.find("\"transport\":2"), std::string::npos) << none.output;
}

// With --tokenizer the gateway names logprobs' tokens as the model's tokenizer writes them.
TEST(OpenAiServer, WithTheTokenizerLogprobsNameTokensByTheirText) {
  if (!fs::exists(test_jobs::mpiexec())) GTEST_SKIP() << "mpirun (" << test_jobs::mpiexec() << ") is absent";
  Service service(/*with_tokenizer=*/true);
  ASSERT_GT(service.port(), 0);
  Client client = service.client();
  const auto tokenizer = model::Tokenizer::from_gguf(*model::GgufFile::open(service.model));
  const auto name = [&](int32_t id) { return token_name(*tokenizer, id); };
  const std::vector<protocol::ChatMessage> hello = {{"user", "Hello there"}};
  const protocol::Final expected = client.generate(greedy(hello, 8, 2));
  const HttpReply h = post(service.port(), "/v1/chat/completions",
                           json{{"messages", {{{"role", "user"}, {"content", "Hello there"}}}},
                                {"max_tokens", 8},
                                {"temperature", 0},
                                {"logprobs", true},
                                {"top_logprobs", 2}}
                               .dump());
  ASSERT_EQ(h.status, 200) << h.body;
  const json& content = h.body["choices"][0]["logprobs"]["content"];
  ASSERT_EQ(content.size(), expected.tokens.size());
  for (size_t i = 0; i < content.size(); ++i) {
    // As the JSON carries it: a token holding part of a UTF-8 character shows U+FFFD, its bytes are whole.
    const auto as_sent = [](const std::string& text) { return json::parse(openai::dump(json(text))); };
    const std::string text = name(expected.tokens[i]);
    EXPECT_EQ(content[i]["token"], as_sent(text));
    EXPECT_EQ(content[i]["bytes"].size(), text.size());
    EXPECT_EQ(content[i]["top_logprobs"][0]["token"], as_sent(name(expected.logprobs[i].top[0].token)));
  }
  // The completion's text is its tokens' texts in order, less the leading space SentencePiece's decoding
  // removes from the first piece.
  std::string joined;
  for (const json& t : content) {
    for (const json& b : t["bytes"]) joined += static_cast<char>(b.get<int>());
  }
  ASSERT_TRUE(tokenizer->add_space_prefix());
  ASSERT_FALSE(joined.empty());
  EXPECT_EQ(joined[0], ' ');
  EXPECT_EQ(joined.substr(1), expected.text);
}

// Echo with logprobs as lm-evaluation-harness's loglikelihood asks it (a batch of token-id prompts, echo,
// logprobs 1, max_tokens 1): each choice's logprobs are the prompt's tokens (the first null) then the
// generated one, with the values the ZeroMQ client's prompt logprobs give; streamed, the echo is the
// first chunk; max_tokens 0 scores a prompt alone.
TEST(OpenAiServer, EchoWithLogprobsScoresPromptsAsLmEvalHarnessAsks) {
  if (!fs::exists(test_jobs::mpiexec())) GTEST_SKIP() << "mpirun (" << test_jobs::mpiexec() << ") is absent";
  Service service(/*with_tokenizer=*/true);
  ASSERT_GT(service.port(), 0);
  Client client = service.client();
  const auto tokenizer = model::Tokenizer::from_gguf(*model::GgufFile::open(service.model));
  // As the JSON carries it (a token holding part of a UTF-8 character shows U+FFFD).
  const auto name = [&](int32_t id) { return json::parse(openai::dump(json(token_name(*tokenizer, id)))); };
  const std::vector<std::vector<int32_t>> prompts = {
      tokenizer->encode(kPrompt, true),
      tokenizer->encode("Hello there, general Kenobi. You are a bold one.", true)};
  std::vector<protocol::Final> expected;
  for (const auto& ids : prompts) {
    protocol::GenerateRequest r = greedy(ids, 1, 1);
    r.prompt_logprobs = 1;
    expected.push_back(client.generate(r));
    ASSERT_EQ(expected.back().prompt_logprobs.size(), ids.size() - 1);
  }
  const HttpReply h = post(service.port(), "/v1/completions",
                           json{{"prompt", prompts},
                                {"echo", true},
                                {"logprobs", 1},
                                {"max_tokens", 1},
                                {"temperature", 0},
                                {"seed", 1234}}
                               .dump());
  ASSERT_EQ(h.status, 200) << h.body;
  ASSERT_EQ(h.body["choices"].size(), 2u);
  for (size_t i = 0; i < 2; ++i) {
    SCOPED_TRACE("prompt " + std::to_string(i));
    const json& choice = h.body["choices"][i];
    const protocol::Final& e = expected[i];
    EXPECT_EQ(choice["text"], tokenizer->decode(prompts[i]) + e.text);
    const json& lp = choice["logprobs"];
    const size_t n = prompts[i].size();
    ASSERT_EQ(lp["tokens"].size(), n + 1);
    ASSERT_EQ(lp["token_logprobs"].size(), n + 1);
    EXPECT_TRUE(lp["token_logprobs"][0].is_null());
    EXPECT_TRUE(lp["top_logprobs"][0].is_null());
    bool is_greedy = true;  // lm-evaluation-harness's test over the prompt's tokens after the first
    for (size_t j = 1; j < n; ++j) {
      EXPECT_EQ(lp["tokens"][j], name(prompts[i][j]));
      EXPECT_NEAR(lp["token_logprobs"][j].get<double>(), e.prompt_logprobs[j - 1].logprob, 1e-6);
      ASSERT_EQ(lp["top_logprobs"][j].size(), 1u);
      const int32_t top = e.prompt_logprobs[j - 1].top[0].token;
      EXPECT_NEAR(lp["top_logprobs"][j][name(top).get<std::string>()].get<double>(),
                  e.prompt_logprobs[j - 1].top[0].logprob, 1e-6);
      double best = -1e30;
      for (const auto& [key, value] : lp["top_logprobs"][j].items())
        best = std::max(best, value.get<double>());
      is_greedy = is_greedy && lp["token_logprobs"][j].get<double>() == best;
    }
    bool expected_greedy = true;
    for (size_t j = 1; j < n; ++j)
      expected_greedy = expected_greedy && e.prompt_logprobs[j - 1].top[0].token == prompts[i][j];
    EXPECT_EQ(is_greedy, expected_greedy);
    EXPECT_EQ(lp["tokens"][n], name(e.tokens[0]));
    EXPECT_NEAR(lp["token_logprobs"][n].get<double>(), e.logprobs[0].logprob, 1e-6);
  }

  // Streamed: the first chunk is the echo with the prompt's logprobs.
  const std::vector<json> events = post_stream(service.port(), "/v1/completions",
                                               json{{"prompt", kPrompt},
                                                    {"echo", true},
                                                    {"logprobs", 1},
                                                    {"max_tokens", 4},
                                                    {"temperature", 0},
                                                    {"stream", true}}
                                                   .dump());
  const protocol::Final text_expected = client.generate(greedy(kPrompt, 4, 1));
  EXPECT_EQ(streamed_text(events, /*chat=*/false), kPrompt + text_expected.text);
  ASSERT_FALSE(events.empty());
  EXPECT_EQ(events[0]["choices"][0]["text"], kPrompt);
  const json& first = events[0]["choices"][0]["logprobs"];
  EXPECT_EQ(first["tokens"].size(), text_expected.prompt_token_ids.size());
  EXPECT_TRUE(first["token_logprobs"][0].is_null());
  EXPECT_NEAR(first["token_logprobs"][1].get<double>(), expected[0].prompt_logprobs[0].logprob, 1e-6);

  // Scoring alone.
  const HttpReply scored =
      post(service.port(), "/v1/completions",
           json{{"prompt", kPrompt}, {"echo", true}, {"logprobs", 0}, {"max_tokens", 0}}.dump());
  ASSERT_EQ(scored.status, 200) << scored.body;
  EXPECT_EQ(scored.body["choices"][0]["text"], kPrompt);
  EXPECT_EQ(scored.body["choices"][0]["finish_reason"], "length");
  EXPECT_EQ(scored.body["usage"]["completion_tokens"], 0);
  const json& scored_lp = scored.body["choices"][0]["logprobs"];
  ASSERT_EQ(scored_lp["token_logprobs"].size(), prompts[0].size());
  EXPECT_NEAR(scored_lp["token_logprobs"].back().get<double>(), expected[0].prompt_logprobs.back().logprob,
              1e-6);
  EXPECT_EQ(scored_lp["top_logprobs"].back(), json::object());
}

// `openai:` in a job's configuration: the coordinator's process serves the HTTP API too (port 0: the log
// names the one it took), answers as the ZeroMQ client does, names logprobs' tokens with the model's
// tokenizer, and a shutdown request stops it with the job, cleanly.
TEST(OpenAiServer, ServeStartsItWithTheOpenAiSection) {
  if (!fs::exists(test_jobs::mpiexec())) GTEST_SKIP() << "mpirun (" << test_jobs::mpiexec() << ") is absent";
  test::TempDir dir;
  const std::string model = (dir.path() / "tiny.gguf").string();
  model::write_random_llama(model, model::llama_shape_by_name("tiny"), kernels::DType::Q4_0, 5);
  ServeJob job(dir.path(), model, 1, 1, "chat_template: chatml\nopenai: { listen: \"127.0.0.1:0\" }\n");
  ASSERT_TRUE(job.wait_ready()) << job.log();
  std::smatch match;
  const std::string log = job.log();
  ASSERT_TRUE(std::regex_search(
      log, match, std::regex("openai: listening on http://127\\.0\\.0\\.1:([0-9]+) \\(model 'tiny'\\)")))
      << log;
  const int port = std::stoi(match[1]);
  EXPECT_EQ(get(port, "/v1/models").body["data"][0]["id"], "tiny");  // the file's name, less .gguf
  Client client(job.endpoint());
  const protocol::Final expected = client.generate(greedy(kPrompt, 8, 1));
  const HttpReply c =
      post(port, "/v1/completions",
           json{{"prompt", kPrompt}, {"max_tokens", 8}, {"temperature", 0}, {"logprobs", 1}}.dump());
  ASSERT_EQ(c.status, 200) << c.body;
  EXPECT_EQ(c.body["choices"][0]["text"], expected.text);
  for (const json& token : c.body["choices"][0]["logprobs"]["tokens"])
    EXPECT_NE(token.get<std::string>().rfind("token_id:", 0), 0u) << "named by the tokenizer: " << token;
  // The prompt's ids as the coordinator tokenized them, and back.
  const HttpReply ids = post(port, "/tokenize", json{{"prompt", kPrompt}}.dump());
  ASSERT_EQ(ids.status, 200) << ids.body;
  EXPECT_EQ(ids.body["tokens"].get<std::vector<int32_t>>(), expected.prompt_token_ids);
  EXPECT_EQ(post(port, "/detokenize", json{{"tokens", expected.tokens}}.dump()).body["prompt"],
            expected.text);
  EXPECT_TRUE(client.shutdown().ok);
  EXPECT_EQ(job.wait_exit(30s), std::optional<int>(0)) << job.log();
  EXPECT_NE(job.log().find("shut down cleanly"), std::string::npos) << job.log();
  EXPECT_EQ(post(port, "/v1/completions", R"({"prompt": "x"})").status, 0) << "the HTTP server stopped too";
}

// LoRA adapters as vLLM serves them: /v1/models lists each with the base model as its parent, a request
// whose model names one is answered by it (as the ZeroMQ client's `adapter` is) and names it back, and
// a model that is neither is a 404 listing what is served; vLLM's /v1/load_lora_adapter and
// /v1/unload_lora_adapter change what is served while the job runs.
TEST(OpenAiServer, RequestsNamingALoraAdapterAreAnsweredByIt) {
  if (!fs::exists(test_jobs::mpiexec())) GTEST_SKIP() << "mpirun (" << test_jobs::mpiexec() << ") is absent";
  test::TempDir dir;
  const std::string model = (dir.path() / "tiny.gguf").string();
  model::write_random_llama(model, model::llama_shape_by_name("tiny"), kernels::DType::Q4_0, 5);
  const std::string adapter = (dir.path() / "sql.gguf").string();
  model::make_random_lora(model::LlamaConfig::from_gguf(*model::GgufFile::open(model)), 8, 16, 0.5f, 3,
                          {model::LayerMatrix::attn_q, model::LayerMatrix::ffn_up}, true)
      .write_gguf(adapter, "llama", kernels::DType::F16);
  const std::string other = (dir.path() / "chat.gguf").string();
  model::make_random_lora(model::LlamaConfig::from_gguf(*model::GgufFile::open(model)), 4, 0, 0.5f, 4,
                          {model::LayerMatrix::attn_v, model::LayerMatrix::ffn_down})
      .write_gguf(other, "llama", kernels::DType::F32);
  ServeJob job(dir.path(), model, 1, 1,
               "openai: { listen: \"127.0.0.1:0\" }\nlora_adapters: [{name: sql, path: '" + adapter + "'}]\n",
               ServeJob::Placement{.server_keys = "lora_updates: true"});
  ASSERT_TRUE(job.wait_ready()) << job.log();
  std::smatch match;
  const std::string log = job.log();
  ASSERT_TRUE(
      std::regex_search(log, match, std::regex("openai: listening on http://127\\.0\\.0\\.1:([0-9]+)")))
      << log;
  const int port = std::stoi(match[1]);
  const json models = get(port, "/v1/models").body["data"];
  ASSERT_EQ(models.size(), 2u) << models;
  EXPECT_EQ(models[1]["id"], "sql");
  EXPECT_EQ(models[1]["parent"], "tiny");

  Client client(job.endpoint());
  protocol::GenerateRequest with_adapter = greedy(kPrompt, 12);
  with_adapter.adapter = "sql";
  const protocol::Final adapted = client.generate(with_adapter);
  const protocol::Final base = client.generate(greedy(kPrompt, 12));
  EXPECT_NE(adapted.tokens, base.tokens);
  for (const auto& [name, expected] : {std::pair{"sql", adapted}, std::pair{"tiny", base}}) {
    const HttpReply c =
        post(port, "/v1/completions",
             json{{"model", name}, {"prompt", kPrompt}, {"max_tokens", 12}, {"temperature", 0}}.dump());
    ASSERT_EQ(c.status, 200) << c.body;
    EXPECT_EQ(c.body["choices"][0]["text"], expected.text) << name;
    EXPECT_EQ(c.body["model"], name);
  }
  const HttpReply unknown = post(port, "/v1/completions", json{{"model", "sq1"}, {"prompt", kPrompt}}.dump());
  EXPECT_EQ(unknown.status, 404) << unknown.body;
  EXPECT_NE(unknown.body["error"]["message"].get<std::string>().find("serves 'tiny', 'sql'"),
            std::string::npos)
      << unknown.body;

  // vLLM's /v1/load_lora_adapter and /v1/unload_lora_adapter (the job has server.lora_updates): a loaded
  // adapter is listed and answers as over ZeroMQ, an unloaded one is a 404 again.
  const auto post_text = [&](const std::string& path, const json& body) {
    httplib::Client http("127.0.0.1", port);
    http.set_read_timeout(120, 0);
    const auto res = http.Post(path, body.dump(), "application/json");
    return res ? std::pair{res->status, res->body} : std::pair{0, std::string("no answer")};
  };
  const auto loaded = post_text("/v1/load_lora_adapter", {{"lora_name", "chat"}, {"lora_path", other}});
  EXPECT_EQ(loaded, std::pair(200, std::string("Success: LoRA adapter 'chat' added successfully.")));
  const json listed = get(port, "/v1/models").body["data"];
  ASSERT_EQ(listed.size(), 3u) << listed;
  EXPECT_EQ(listed[2]["id"], "chat");
  protocol::GenerateRequest with_chat = greedy(kPrompt, 12);
  with_chat.adapter = "chat";
  const HttpReply chat_reply =
      post(port, "/v1/completions",
           json{{"model", "chat"}, {"prompt", kPrompt}, {"max_tokens", 12}, {"temperature", 0}}.dump());
  ASSERT_EQ(chat_reply.status, 200) << chat_reply.body;
  EXPECT_EQ(chat_reply.body["choices"][0]["text"], client.generate(with_chat).text);
  const auto again = post_text("/v1/load_lora_adapter", {{"lora_name", "chat"}, {"lora_path", other}});
  EXPECT_EQ(again.first, 400) << again.second;
  EXPECT_NE(again.second.find("already loaded"), std::string::npos) << again.second;
  const auto no_path = post_text("/v1/load_lora_adapter", {{"lora_name", "x"}});
  EXPECT_EQ(no_path.first, 400) << no_path.second;
  EXPECT_NE(no_path.second.find("lora_path: required"), std::string::npos) << no_path.second;
  const auto not_an_adapter = post_text("/v1/load_lora_adapter", {{"lora_name", "x"}, {"lora_path", model}});
  EXPECT_EQ(not_an_adapter.first, 400) << not_an_adapter.second;
  EXPECT_EQ(post_text("/v1/unload_lora_adapter", {{"lora_name", "chat"}}),
            std::pair(200, std::string("Success: LoRA adapter 'chat' removed successfully.")));
  EXPECT_EQ(post(port, "/v1/completions", json{{"model", "chat"}, {"prompt", kPrompt}}.dump()).status, 404);
  EXPECT_EQ(post_text("/v1/unload_lora_adapter", {{"lora_name", "chat"}}).first, 404);
  EXPECT_EQ(get(port, "/v1/models").body["data"].size(), 2u);
}

// openai.api_key_env naming a variable that is not set: start-up fails on every rank, naming it.
TEST(OpenAiServer, ServeRefusesAnApiKeyVariableThatIsNotSet) {
  if (!fs::exists(test_jobs::mpiexec())) GTEST_SKIP() << "mpirun (" << test_jobs::mpiexec() << ") is absent";
  test::TempDir dir;
  const std::string model = (dir.path() / "tiny.gguf").string();
  model::write_random_llama(model, model::llama_shape_by_name("tiny"), kernels::DType::Q4_0, 5);
  unsetenv("NIBBLE_TEST_UNSET_KEY");
  ServeJob job(dir.path(), model, 1, 1,
               "openai: { listen: \"127.0.0.1:0\", api_key_env: NIBBLE_TEST_UNSET_KEY }\n");
  EXPECT_EQ(job.wait_exit(60s), std::optional<int>(1)) << job.log();
  EXPECT_NE(job.log().find("openai.api_key_env: the environment variable NIBBLE_TEST_UNSET_KEY is not set"),
            std::string::npos)
      << job.log();
}

// Why a test of the `openai` Python package cannot run here (empty: it can).
std::string openai_package_missing() {
  if (test::run_command(test::python() + " -c 'import openai, pydantic'").exit_code != 0)
    return "the openai Python package is not installed (pip install openai)";
  if (!fs::exists(test_jobs::mpiexec())) return "mpirun (" + test_jobs::mpiexec() + ") is absent";
  return "";
}

// tools/openai_sdk_check.py against the gateway on `port` (mode: "", "--tools" or "--structured"): it
// exits 0 and prints `ok`.
void expect_openai_package_check(int port, const std::string& mode, const std::string& ok) {
  const test::CommandResult r = test::run_command(
      test::python() + " " + (test::source_dir() / "tools" / "openai_sdk_check.py").string() +
      " http://127.0.0.1:" + std::to_string(port) + " tiny " + mode);
  EXPECT_EQ(r.exit_code, 0) << r.output;
  EXPECT_NE(r.output.find(ok), std::string::npos) << r.output;
}

// The official `openai` Python package (PyPI) against the gateway, when this machine has it: its
// response classes parse every answer, its error classes match the refusals (tools/openai_sdk_check.py).
TEST(OpenAiServer, TheOpenAiPythonPackageTalksToIt) {
  if (const std::string why = openai_package_missing(); !why.empty()) GTEST_SKIP() << why;
  Service service;
  ASSERT_GT(service.port(), 0);
  expect_openai_package_check(service.port(), "", " ok");
}

// Function calling through the gateway with the openai package (tools/openai_sdk_check.py's tools part):
// a named tool_choice answers a call the SDK parses (message.tool_calls, finish_reason "tool_calls"),
// whole and streamed, and the conversation goes on with the call and its result.
TEST(OpenAiServer, TheOpenAiPythonPackageCallsTools) {
  if (const std::string why = openai_package_missing(); !why.empty()) GTEST_SKIP() << why;
  for (const std::string format : {"llama3", "chatml"}) {
    SCOPED_TRACE(format);
    Service service(false, "chat_template: " + format + "\ncontext: 2048\nkv_cache: { num_blocks: 160 }\n");
    ASSERT_GT(service.port(), 0);
    expect_openai_package_check(service.port(), "--tools", "tools ok");
  }
}

// Structured output as the openai package asks for it from a pydantic model (chat.completions.parse:
// a strict schema with "$defs" and "$ref" for the nested models, anyOf with null for the optional one):
// each answer parses back into the model (tools/openai_sdk_check.py --structured).
TEST(OpenAiServer, TheOpenAiPythonPackageParsesPydanticModels) {
  if (const std::string why = openai_package_missing(); !why.empty()) GTEST_SKIP() << why;
  Service service;
  ASSERT_GT(service.port(), 0);
  expect_openai_package_check(service.port(), "--structured", "structured ok");
}

// Grammar-constrained answers through the gateway: vLLM's guided_choice (one of the strings), llama.cpp's
// grammar (a sentence of it), vLLM's guided_regex and guided_json; a grammar that does not compile, or a
// regex no grammar can say, is a 400 naming the field.
TEST(OpenAiServer, GrammarAndGuidedChoiceConstrainTheAnswer) {
  if (!fs::exists(test_jobs::mpiexec())) GTEST_SKIP() << "mpirun (" << test_jobs::mpiexec() << ") is absent";
  Service service;
  ASSERT_GT(service.port(), 0);
  for (int seed = 0; seed < 3; ++seed) {
    const HttpReply chosen = post(service.port(), "/v1/chat/completions",
                                  json{{"messages", {{{"role", "user"}, {"content", "Well?"}}}},
                                       {"max_tokens", 16},
                                       {"temperature", 1},
                                       {"seed", seed},
                                       {"guided_choice", {"yes", "no", "not \"sure\""}}}
                                      .dump());
    ASSERT_EQ(chosen.status, 200) << chosen.body;
    const std::string answer = chosen.body["choices"][0]["message"]["content"];
    EXPECT_TRUE(answer == "yes" || answer == "no" || answer == "not \"sure\"") << answer;
    EXPECT_EQ(chosen.body["choices"][0]["finish_reason"], "stop");
  }
  const std::string gbnf = "root ::= [0-9]{2} (\"-\" [0-9]{2}){2}\n";
  const HttpReply dated =
      post(service.port(), "/v1/completions",
           json{{"prompt", kPrompt}, {"max_tokens", 20}, {"temperature", 0.7}, {"grammar", gbnf}}.dump());
  ASSERT_EQ(dated.status, 200) << dated.body;
  EXPECT_TRUE(std::regex_match(dated.body["choices"][0]["text"].get<std::string>(),
                               std::regex("[0-9]{2}(-[0-9]{2}){2}")))
      << dated.body;
  // vLLM's guided_regex (made a grammar) and guided_json (a schema).
  const HttpReply matched = post(service.port(), "/v1/completions",
                                 json{{"prompt", kPrompt},
                                      {"max_tokens", 20},
                                      {"temperature", 1},
                                      {"seed", 5},
                                      {"guided_regex", "[ab]{2}-\\d?!"}}
                                     .dump());
  ASSERT_EQ(matched.status, 200) << matched.body;
  EXPECT_TRUE(
      std::regex_match(matched.body["choices"][0]["text"].get<std::string>(), std::regex("[ab]{2}-\\d?!")))
      << matched.body;
  const HttpReply typed =
      post(service.port(), "/v1/chat/completions",
           json{{"messages", {{{"role", "user"}, {"content", "ok?"}}}},
                {"max_tokens", 24},
                {"temperature", 0},
                {"guided_json",
                 {{"type", "object"}, {"properties", {{"ok", {{"type", "boolean"}}}}}, {"required", {"ok"}}}}}
               .dump());
  ASSERT_EQ(typed.status, 200) << typed.body;
  const json answer = json::parse(typed.body["choices"][0]["message"]["content"].get<std::string>());
  EXPECT_TRUE(answer.is_object() && answer.size() == 1 && answer["ok"].is_boolean()) << answer;
  // A union of objects the recognizer cannot tell apart by their first byte: the schema's grammar.
  const json either = {{"anyOf",
                        {{{"type", "object"},
                          {"properties", {{"a", {{"const", 1}}}}},
                          {"required", {"a"}},
                          {"additionalProperties", false}},
                         {{"type", "object"},
                          {"properties", {{"b", {{"type", "boolean"}}}}},
                          {"required", {"b"}},
                          {"additionalProperties", false}}}}};
  for (int seed = 0; seed < 3; ++seed) {
    const HttpReply one =
        post(service.port(), "/v1/chat/completions",
             json{{"messages", {{{"role", "user"}, {"content", "a or b?"}}}},
                  {"max_tokens", 24},
                  {"temperature", 1},
                  {"seed", seed},
                  {"response_format",
                   {{"type", "json_schema"}, {"json_schema", {{"name", "e"}, {"schema", either}}}}}}
                 .dump());
    ASSERT_EQ(one.status, 200) << one.body;
    const json value = json::parse(one.body["choices"][0]["message"]["content"].get<std::string>());
    const bool is_a = value == json{{"a", 1}};
    const bool is_b = value.size() == 1 && value.contains("b") && value["b"].is_boolean();
    EXPECT_TRUE(is_a || is_b) << value;
  }
  const HttpReply lookaround =
      post(service.port(), "/v1/completions", json{{"prompt", kPrompt}, {"guided_regex", "a(?=b)"}}.dump());
  EXPECT_EQ(lookaround.status, 400) << lookaround.body;
  EXPECT_EQ(lookaround.body["error"]["param"], "guided_regex");
  const HttpReply bad = post(service.port(), "/v1/completions",
                             json{{"prompt", kPrompt}, {"guided_grammar", "root ::= x\n"}}.dump());
  EXPECT_EQ(bad.status, 400) << bad.body;
  EXPECT_EQ(bad.body["error"]["param"], "guided_grammar");
  EXPECT_NE(bad.body["error"]["message"].get<std::string>().find("undefined rule 'x'"), std::string::npos)
      << bad.body;
}

// JSON mode through the gateway: response_format json_object reaches the workers, which mask the output to
// a JSON object ('}' biased to win closes the first one it may; the answer ends there, as "stop").
TEST(OpenAiServer, JsonModeAnswersAJsonObject) {
  if (!fs::exists(test_jobs::mpiexec())) GTEST_SKIP() << "mpirun (" << test_jobs::mpiexec() << ") is absent";
  Service service(/*with_tokenizer=*/true);
  ASSERT_GT(service.port(), 0);
  const auto tokenizer = model::Tokenizer::from_gguf(*model::GgufFile::open(service.model));
  int32_t close = -1;
  for (int32_t t = 0; t < tokenizer->n_vocab() && close < 0; ++t)
    if (tokenizer->token_bytes(t) == "}") close = t;
  ASSERT_GE(close, 0);
  const HttpReply h = post(service.port(), "/v1/chat/completions",
                           json{{"messages", {{{"role", "user"}, {"content", "Answer in JSON."}}}},
                                {"max_tokens", 32},
                                {"temperature", 0},
                                {"response_format", {{"type", "json_object"}}},
                                {"logit_bias", {{std::to_string(close), 100}}}}
                               .dump());
  ASSERT_EQ(h.status, 200) << h.body;
  const std::string content = h.body["choices"][0]["message"]["content"];
  EXPECT_EQ(json::parse(content), json::object()) << content;
  EXPECT_EQ(h.body["choices"][0]["finish_reason"], "stop");
  // Sampled and unbiased, the answer is still a JSON object's beginning, or the whole of one.
  const HttpReply s = post(service.port(), "/v1/completions",
                           json{{"prompt", kPrompt},
                                {"max_tokens", 24},
                                {"temperature", 1},
                                {"seed", 3},
                                {"response_format", {{"type", "json_object"}}}}
                               .dump());
  ASSERT_EQ(s.status, 200) << s.body;
  const std::string text = s.body["choices"][0]["text"];
  worker::JsonPrefix prefix;
  EXPECT_TRUE(prefix.feed(text)) << text;
  // Structured output: an instance of the schema (its one required key, a value of its enum).
  int32_t quote = -1;
  for (int32_t t = 0; t < tokenizer->n_vocab() && quote < 0; ++t)
    if (tokenizer->token_bytes(t) == "\"") quote = t;
  const json schema = {
      {"type", "object"}, {"properties", {{"answer", {{"enum", {"yes", "no"}}}}}}, {"required", {"answer"}}};
  const HttpReply structured =
      post(service.port(), "/v1/chat/completions",
           json{{"messages", {{{"role", "user"}, {"content", "Yes or no?"}}}},
                {"max_tokens", 32},
                {"temperature", 0},
                {"response_format",
                 {{"type", "json_schema"}, {"json_schema", {{"name", "a"}, {"schema", schema}}}}},
                {"logit_bias", {{std::to_string(quote), 100}, {std::to_string(close), 80}}}}
               .dump());
  ASSERT_EQ(structured.status, 200) << structured.body;
  const json answer = json::parse(structured.body["choices"][0]["message"]["content"].get<std::string>());
  ASSERT_TRUE(answer.is_object()) << answer;
  ASSERT_EQ(answer.size(), 1u) << answer;
  EXPECT_TRUE(answer["answer"] == "yes" || answer["answer"] == "no") << answer;
}

// lm-evaluation-harness (its local-completions model, tokenizing with the server's /tokenizer_info and
// /tokenize) runs a multiple-choice task through the gateway; each loglikelihood it reports is the sum of
// the continuation's prompt logprobs the ZeroMQ client gets for the same ids, split as lm-eval splits a
// context from its continuation.
TEST(OpenAiServer, LmEvaluationHarnessScoresThroughIt) {
  if (test::run_command(test::python() + " -c 'import lm_eval, aiohttp, tenacity, requests'").exit_code != 0)
    GTEST_SKIP() << "lm-evaluation-harness with its API models is not installed (pip install 'lm-eval[api]')";
  if (!fs::exists(test_jobs::mpiexec())) GTEST_SKIP() << "mpirun (" << test_jobs::mpiexec() << ") is absent";
  Service service(/*with_tokenizer=*/true);
  ASSERT_GT(service.port(), 0);
  test::TempDir dir;
  const json docs = json::parse(R"([
      {"context": "The quick brown fox", "choices": ["jumps over the lazy dog", "sleeps", "is red"], "gold": 0},
      {"context": "Once upon a time there", "choices": ["was a king", "were three bears"], "gold": 1},
      {"context": "Hello there, general", "choices": ["Kenobi", "Grievous", "Tso"], "gold": 0}])");
  {
    std::ofstream out(dir.path() / "docs.jsonl");
    for (const json& d : docs) out << d.dump() << "\n";
    std::ofstream(dir.path() / "nibble_mc.yaml")
        << "task: nibble_mc\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: "
        << (dir.path() / "docs.jsonl").string()
        << "\ntest_split: test\noutput_type: multiple_choice\ndoc_to_text: \"{{context}}\"\n"
           "doc_to_choice: \"{{choices}}\"\ndoc_to_target: \"{{gold}}\"\nmetric_list:\n  - metric: acc\n";
  }
  const fs::path out = dir.path() / "out";
  const test::CommandResult r = test::run_command(
      "HF_DATASETS_OFFLINE=1 HF_HUB_OFFLINE=1 " + test::python() +
      " -m lm_eval --model local-completions --model_args "
      "model=tiny,base_url=http://127.0.0.1:" +
      std::to_string(service.port()) +
      "/v1/completions,tokenizer_backend=remote,num_concurrent=2,max_retries=1 --tasks nibble_mc "
      "--include_path " +
      dir.path().string() + " --output_path " + out.string() + " --log_samples 2>&1");
  ASSERT_EQ(r.exit_code, 0) << r.output;
  EXPECT_NE(r.output.find("nibble_mc"), std::string::npos) << r.output;
  fs::path samples;
  for (const auto& entry : fs::recursive_directory_iterator(out)) {
    if (entry.path().filename().string().rfind("samples_nibble_mc", 0) == 0) samples = entry.path();
  }
  ASSERT_FALSE(samples.empty()) << "no samples file under " << out;

  const auto tokenizer = model::Tokenizer::from_gguf(*model::GgufFile::open(service.model));
  const auto encode = [&](const std::string& text) { return tokenizer->encode(text, false, true); };
  Client client = service.client();
  std::ifstream in(samples);
  size_t scored = 0;
  for (std::string line; std::getline(in, line);) {
    const json sample = json::parse(line);
    const json& args = sample["arguments"];
    ASSERT_EQ(args.size(), sample["filtered_resps"].size());
    size_t k = 0;
    for (const auto& [key, pair] : args.items()) {
      SCOPED_TRACE(pair.dump());
      // lm-eval's split: trailing spaces of the context go to the continuation; the continuation's ids
      // are the whole text's after the context's.
      std::string context = pair["arg_0"], continuation = pair["arg_1"];
      const size_t kept = context.find_last_not_of(' ') + 1;
      continuation = context.substr(kept) + continuation;
      context.resize(kept);
      const std::vector<int32_t> whole = encode(context + continuation);
      const size_t context_len = encode(context).size();
      ASSERT_LT(context_len, whole.size());
      protocol::GenerateRequest score = greedy(whole, 0);
      score.prompt_logprobs = 0;
      const protocol::Final f = client.generate(score);
      double expected = 0;
      for (size_t j = context_len; j < whole.size(); ++j) expected += f.prompt_logprobs[j - 1].logprob;
      // [loglikelihood, is_greedy], written as strings.
      const json& reported = sample["filtered_resps"][k++][0];
      const double loglikelihood =
          reported.is_string() ? std::stod(reported.get<std::string>()) : reported.get<double>();
      EXPECT_NEAR(loglikelihood, expected, 1e-4);
      ++scored;
    }
  }
  EXPECT_EQ(scored, 8u);  // 3 + 2 + 3 choices
}

TEST(OpenAiServer, RefusesAnAddressItCannotListenOn) {
  const test::CommandResult r = test::run_command(
      test::nibble_bin() + " openai --host 203.0.113.1 --port 8999 --endpoint tcp://127.0.0.1:1");
  EXPECT_EQ(r.exit_code, 1) << r.output;
  EXPECT_NE(r.output.find("cannot listen on 203.0.113.1:8999"), std::string::npos) << r.output;
}

}  // namespace
}  // namespace nibble::cluster
