#pragma once
// The client protocol in plain C++: one struct per message of nibble.capnp, a std::variant per
// direction, and encode/decode functions. Decoding is hardened for untrusted input (ZeroMQ frames
// from any client): size and shape are checked before capnp reads anything, capnp's traversal and
// nesting limits bound the work, and every failure is a ProtocolError, never a crash.
#include <cstddef>
#include <cstdint>
#include <optional>
#include <span>
#include <stdexcept>
#include <string>
#include <string_view>
#include <variant>
#include <vector>

namespace nibble::protocol {

// Mirrors nibble.capnp's ErrorCode; the values are the wire values.
enum class ErrorCode : uint16_t {
  bad_request,
  malformed_message,
  message_too_large,
  unknown_request_type,
  prompt_too_long,
  overloaded,
  cancelled,
  worker_failed,
  shutting_down,
  internal,
  not_found,
};

// Mirrors nibble.capnp's FinishReason.
// tool_calls: the answer is function calls (Final::tool_calls).
enum class FinishReason : uint16_t { length, eos, stop, cancelled, tool_calls };
// What the output must be: free text, a JSON object, an instance of a JSON schema
// (worker/json_constraint), or a sentence of a GBNF grammar (worker/gbnf_grammar).
enum class ResponseFormat : uint16_t { text, json_object, json_schema, grammar };
inline constexpr size_t kMaxJsonSchemaBytes = 64 * 1024;
inline constexpr size_t kMaxStopTokenIds = 64;

std::string_view to_string(ErrorCode code);
std::string_view to_string(FinishReason reason);

struct ProtocolError : std::runtime_error {
  ProtocolError(ErrorCode error_code, const std::string& message)
      : std::runtime_error(message), code(error_code) {}
  ErrorCode code;
};

// Limits for semantic validation of requests.
inline constexpr size_t kMaxRequestIdBytes = 128;
inline constexpr size_t kMaxStopStrings = 64;
inline constexpr size_t kMaxStopStringBytes = 256;
inline constexpr size_t kMaxAdapterNameBytes = 256;
inline constexpr size_t kMaxAdapterPathBytes = 4096;

struct DecodeLimits {
  size_t max_message_bytes = size_t{1} << 20;  // frames above this are rejected unread
};

// ---------------------------------------------------------------- client -> coordinator

// A token's logit bias (OpenAI's logit_bias).
struct TokenBias {
  int32_t token = 0;
  float bias = 0.0f;  // [-kMaxLogitBiasValue, kMaxLogitBiasValue]
  bool operator==(const TokenBias&) const = default;
};
inline constexpr size_t kMaxLogitBias = 1024;        // biased tokens in one request
inline constexpr float kMaxLogitBiasValue = 100.0f;  // OpenAI's range
inline constexpr float kMaxPresencePenalty = 2.0f;   // presence and frequency: OpenAI's [-2, 2]

struct SamplingParams {
  float temperature = 1.0f;  // 0 = greedy
  int32_t top_k = 0;         // 0 = off
  float top_p = 1.0f;
  float min_p = 0.0f;
  float repetition_penalty = 1.0f;
  std::optional<uint64_t> seed;  // nullopt: the server picks one
  // llama.cpp's penalties over the recent window (prompt and generated): presence subtracted once
  // from a token found there, frequency once per time it is found. 0 = off.
  float presence_penalty = 0.0f;
  float frequency_penalty = 0.0f;
  std::vector<TokenBias> logit_bias{};  // distinct tokens, in the model's vocabulary

  bool operator==(const SamplingParams&) const = default;
};

// The most likely tokens a request may ask to see at each position (OpenAI's limit).
inline constexpr uint32_t kMaxLogprobs = 20;

// One message of a conversation (GenerateRequest's chat form).
// A function call (OpenAI's tool_calls entry): arguments is a JSON object's text.
struct ToolCall {
  std::string id;
  std::string name;
  std::string arguments;
  bool operator==(const ToolCall&) const = default;
};

struct ChatMessage {
  std::string role;  // "system", "user", "assistant", "tool" (1 to 64 bytes)
  std::string content;
  std::vector<ToolCall> tool_calls{};  // an assistant's calls
  bool operator==(const ChatMessage&) const = default;
};
inline constexpr size_t kMaxChatMessages = 1024;
inline constexpr size_t kMaxChatRoleBytes = 64;
inline constexpr size_t kMaxToolsBytes = 256 * 1024;
inline constexpr size_t kMaxToolCalls = 64;  // in one message

// With tools: auto (text or calls), none (text), required (a call to any), function (a call to the one
// named by tool_choice_function).
enum class ToolChoice : uint16_t { auto_, none, required, function };

struct GenerateRequest {
  std::string request_id;
  // Exactly one form of prompt: raw text (the server tokenizes), token ids, or a conversation (the
  // server formats it with the model's chat template, then tokenizes it with special tokens parsed).
  std::variant<std::string, std::vector<int32_t>, std::vector<ChatMessage>> prompt;
  SamplingParams sampling;
  uint32_t max_tokens = 256;
  std::vector<std::string> stop;
  bool stream = false;
  uint32_t logprobs = 0;  // 0: none; 1..kMaxLogprobs: each token's log-probability and that many top tokens'
  // A text prompt's control tokens' texts ("</s>", "<|eot_id|>", ...) become those tokens (a prompt a
  // chat template formatted); otherwise they are ordinary text.
  bool parse_special = false;
  // End-of-sequence tokens do not end the generation (vLLM's ignore_eos, llama.cpp's --ignore-eos): exactly
  // max_tokens tokens unless a stop string ends it first; their text is empty.
  bool ignore_eos = false;
  // -1: none; 0..kMaxLogprobs: each prompt token's log-probability after the first, given the tokens
  // before it, and this many most likely tokens' there (vLLM's prompt_logprobs, what OpenAI's echo with
  // logprobs reports). The whole prompt is computed (no prefix cache); max_tokens may then be 0.
  int32_t prompt_logprobs = -1;
  ResponseFormat response_format = ResponseFormat::text;
  std::string json_schema{};  // with ResponseFormat::json_schema: the schema (worker/json_schema's subset)
  // vLLM's: no end-of-generation or stop token is sampled before min_tokens tokens (<= max_tokens); a
  // sampled stop token (distinct ids, at most kMaxStopTokenIds) ends the request and stays in its output.
  uint32_t min_tokens = 0;
  std::vector<int32_t> stop_token_ids{};
  // With a conversation: the functions the model may call (a JSON array of OpenAI tool objects,
  // model/tool_calls; empty: none) and whether it must call one.
  std::string tools{};
  ToolChoice tool_choice = ToolChoice::auto_;
  std::string tool_choice_function{};
  // With ResponseFormat::grammar: a GBNF grammar (worker/gbnf_grammar) the output is a sentence of, at
  // most kMaxJsonSchemaBytes.
  std::string grammar{};
  // The LoRA adapter to answer with, by its configured name (ClusterConfig::lora_adapters); empty: the
  // base model. At most 256 bytes.
  std::string adapter{};

  bool operator==(const GenerateRequest&) const = default;
};

struct CancelRequest {
  std::string request_id;
  bool operator==(const CancelRequest&) const = default;
};

struct HealthRequest {
  bool operator==(const HealthRequest&) const = default;
};
struct StatsRequest {
  bool operator==(const StatsRequest&) const = default;
};
struct ShutdownRequest {
  bool operator==(const ShutdownRequest&) const = default;
};

// Serve a LoRA adapter under `name` from now on (vLLM's /v1/load_lora_adapter), where the job allows
// it (server.lora_updates): answered by Adapters once every worker loaded it, or an Error.
struct LoadAdapterRequest {
  std::string request_id;
  std::string name;  // what GenerateRequest::adapter calls it
  std::string path;  // a GGUF adapter or PEFT directory, as the workers' hosts see it
  float scale = 1.0f;
  bool operator==(const LoadAdapterRequest&) const = default;
};

// Stop serving an adapter: later requests naming it are refused, running ones finish with it.
struct UnloadAdapterRequest {
  std::string request_id;
  std::string name;
  bool operator==(const UnloadAdapterRequest&) const = default;
};

using ClientRequestMsg = std::variant<GenerateRequest, CancelRequest, HealthRequest, StatsRequest,
                                      ShutdownRequest, LoadAdapterRequest, UnloadAdapterRequest>;

// ---------------------------------------------------------------- coordinator -> client

struct TopLogprob {
  int32_t token = 0;
  float logprob = 0.0f;
  bool operator==(const TopLogprob&) const = default;
};
// A generated token's log-probability under the model (log-softmax of its logits, before temperature,
// penalties and filtering) and the most likely tokens' at its position, most likely first.
struct TokenLogprob {
  float logprob = 0.0f;
  std::vector<TopLogprob> top;
  bool operator==(const TokenLogprob&) const = default;
};

struct Delta {
  std::string request_id;
  std::vector<int32_t> tokens;
  std::string text;
  std::vector<TokenLogprob> logprobs{};  // with GenerateRequest::logprobs: one per token
  // With GenerateRequest::prompt_logprobs, in a stream's first Delta only: as Final's.
  std::vector<int32_t> prompt_token_ids{};
  std::vector<TokenLogprob> prompt_logprobs{};
  bool operator==(const Delta&) const = default;
};

struct Timings {
  double queue_ms = 0;
  double prefill_ms = 0;
  double decode_ms = 0;
  bool operator==(const Timings&) const = default;
};

struct Final {
  std::string request_id;
  FinishReason finish_reason = FinishReason::length;
  uint32_t prompt_tokens = 0;
  uint32_t completion_tokens = 0;
  std::string text;
  std::vector<int32_t> tokens;
  Timings timings;
  std::vector<int32_t> prompt_token_ids;  // the prompt as the model saw it (BOS included)
  uint64_t draft_proposed = 0;            // speculative decoding: draft tokens verified
  uint64_t draft_accepted = 0;            // ... and accepted
  uint32_t cached_prompt_tokens = 0;      // prompt tokens whose K/V came from the prefix cache
  std::vector<TokenLogprob> logprobs{};   // with GenerateRequest::logprobs: one per token
  // With GenerateRequest::prompt_logprobs: one per prompt token after the first (prompt_token_ids[1..]).
  std::vector<TokenLogprob> prompt_logprobs{};
  // With tools: the calls the answer made (finish_reason tool_calls); text is what it said besides.
  std::vector<ToolCall> tool_calls{};
  bool operator==(const Final&) const = default;
};

struct Error {
  std::string request_id;  // empty when the request could not be read
  ErrorCode code = ErrorCode::internal;
  std::string message;
  bool operator==(const Error&) const = default;
};

struct Health {
  bool ok = false;
  uint32_t workers = 0;
  std::string detail;
  bool operator==(const Health&) const = default;
};

struct Stats {
  uint64_t queued = 0;
  uint64_t running = 0;
  uint64_t completed = 0;
  uint64_t failed = 0;
  uint64_t free_kv_blocks = 0;
  uint64_t total_kv_blocks = 0;
  uint64_t tokens_generated = 0;
  uint64_t draft_proposed = 0;  // speculative decoding, all requests
  uint64_t draft_accepted = 0;
  uint64_t prompt_tokens = 0;           // prompts' tokens at their first step, all requests
  uint64_t cached_prompt_tokens = 0;    // ... of which the prefix cache held the K/V
  uint64_t cached_kv_blocks = 0;        // cached prefix blocks no request holds (part of free_kv_blocks)
  std::vector<std::string> adapters{};  // the LoRA adapters served now, by name
  bool operator==(const Stats&) const = default;
};

// The answer to a load or unload: the adapters served after it.
struct Adapters {
  std::string request_id;
  std::vector<std::string> names;
  bool operator==(const Adapters&) const = default;
};

using ServerResponseMsg = std::variant<Delta, Final, Error, Health, Stats, Adapters>;

// ---------------------------------------------------------------- wire format

// One capnp message in flat-array form (segment table + segments), ready to be a ZeroMQ frame.
// Encoding does not validate: the server validates what it decodes.
std::vector<uint8_t> encode(const ClientRequestMsg& message);
std::vector<uint8_t> encode(const ServerResponseMsg& message);

// Decode one frame. The frame need not be 8-byte aligned (it is copied when it is not).
// Throws ProtocolError: message_too_large (over limits.max_message_bytes), malformed_message
// (not a well-formed capnp message, or over the traversal/nesting limits), unknown_request_type
// (a union member this build does not know, e.g. from a newer peer), bad_request (a generate or
// cancel request that fails validate(); the message names the field).
ClientRequestMsg decode_client_request(std::span<const uint8_t> frame, const DecodeLimits& limits = {});
ServerResponseMsg decode_server_response(std::span<const uint8_t> frame, const DecodeLimits& limits = {});

// Semantic checks of requests; throw ProtocolError(bad_request, "<field>: <why>").
void validate(const GenerateRequest& request);
void validate(const CancelRequest& request);
void validate(const LoadAdapterRequest& request);
void validate(const UnloadAdapterRequest& request);

}  // namespace nibble::protocol
