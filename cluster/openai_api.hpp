#pragma once
// The OpenAI-compatible HTTP API's bodies (/v1/completions, /v1/chat/completions and their streamed
// chunks, as vLLM's and llama.cpp's servers take and give them), translated to and from the client
// protocol. The HTTP gateway (cluster/openai_server) is a client of the coordinator like any other;
// this file is its translation, with no sockets, so every rule here is tested on its own.
#include <cstdint>
#include <functional>
#include <memory>
#include <nlohmann/json.hpp>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

#include "cluster/protocol/client_protocol.hpp"
#include "model/tokenizer.hpp"

namespace nibble::cluster::openai {

// A request the API refuses, or a failure on its way: the HTTP status and the fields of OpenAI's
// error object ({"error": {"message", "type", "param", "code"}}).
struct ApiError : std::runtime_error {
  ApiError(int http_status, std::string error_type, std::string error_param, std::string error_code,
           const std::string& message);
  int status;
  std::string type;   // "invalid_request_error", "server_error", ...
  std::string param;  // the request field at fault; empty: none
  std::string code;   // protocol::to_string(ErrorCode) where the coordinator refused it; may be empty
};

// A 400 naming the field (param) and what is wrong with it.
ApiError invalid_request(const std::string& param, const std::string& message);
// The coordinator's refusal (or the transport's failure when code is nullopt) as the API reports it:
// bad requests and over-long prompts 400, not found 404, overload 429, shutting down 503, transport
// 503, others 500.
ApiError from_protocol(std::optional<protocol::ErrorCode> code, const std::string& message);
nlohmann::json error_body(const ApiError& error);

enum class Endpoint { completions, chat_completions };

struct ApiSettings {
  std::string model_name = "nibble";  // what /v1/models lists; a request naming another model is a 404
  // The LoRA adapters served on it now (the coordinator's: its config's and those loaded since): a
  // request's "model" may name one (vLLM's multi-LoRA), and /v1/models lists them too. Asked only for
  // a model name other than model_name; may throw ApiError; empty: none.
  std::function<std::vector<std::string>()> adapters;
  uint32_t default_chat_max_tokens = 256;  // chat requests without max_tokens (completions: 16, OpenAI's)
  uint32_t max_choices = 64;               // prompts times n in one request, at most
  // A token's text for logprobs (its bytes; may be part of a UTF-8 character); empty: logprobs name
  // tokens "token_id:N" (the gateway was given no tokenizer).
  std::function<std::string(int32_t)> token_text;
  // The served model's tokenizer, for /tokenize and /detokenize; null: those answer 501.
  std::shared_ptr<const model::Tokenizer> tokenizer;
};

struct ApiRequest {
  Endpoint endpoint = Endpoint::completions;
  // The first choice's request (request_id empty: the gateway sets it); the others differ in prompt and
  // seed only (choice_requests).
  protocol::GenerateRequest request;
  // Completions: every prompt of the request (a batch), request.prompt the first; chat: the conversation.
  std::vector<decltype(protocol::GenerateRequest::prompt)> prompts;
  uint32_t n = 1;              // choices per prompt
  bool include_usage = false;  // stream_options.include_usage: a last chunk with the usage
  // Logprobs asked for: report each token's (completions "logprobs": N, chat "logprobs": true) and
  // this many most likely tokens' (request.logprobs is at least 1 whenever any is asked for).
  bool report_logprobs = false;
  uint32_t top_logprobs = 0;
  // Completions' echo: each choice's text (and logprobs) begins with its prompt's: echo_texts[prompt
  // index], the prompt as given (a prompt of ids as the tokenizer writes it).
  bool echo = false;
  std::vector<std::string> echo_texts;
  std::function<std::string(int32_t)> token_text;  // ApiSettings::token_text
};

// The request in `body` (a JSON object). Throws ApiError: 400 naming the field for malformed JSON,
// unknown keys, wrong types or values, more than settings.max_choices choices, and features Nibble does
// not have (best_of other than n, suffix; echo of a prompt of token ids
// without settings.tokenizer); 404 for another model's name. Completions with echo may have max_tokens
// 0 (the prompt's log-probabilities alone, as lm-evaluation-harness's loglikelihood asks).
// A logit_bias token beyond the model's vocabulary is the coordinator's to refuse.
ApiRequest parse_request(Endpoint endpoint, const std::string& body, const ApiSettings& settings);

// One GenerateRequest per choice, in OpenAI's order (choice index = prompt index * n + j): choice j of a
// prompt has seed + j when a seed is given (so that n choices differ), the server's pick otherwise.
std::vector<protocol::GenerateRequest> choice_requests(const ApiRequest& api);

// OpenAI's finish_reason: "stop" (end of sequence or a stop string), "length", "tool_calls".
const char* finish_reason(protocol::FinishReason reason);

// The whole answer to a request that was not streamed: a text_completion or chat.completion object with
// one choice per Final (in choice order).
nlohmann::json response(const ApiRequest& api, const std::vector<protocol::Final>& finals,
                        const std::string& id, int64_t created, const std::string& model);

// Streamed answers: each is one server-sent event's JSON ("data: <json>\n\n"), then "data: [DONE]".
// A chat stream's first chunk of a choice: the assistant's role, no text.
nlohmann::json role_chunk(const ApiRequest& api, size_t index, const std::string& id, int64_t created,
                          const std::string& model);
// With echo, a completions stream's first chunk of choice `index`: its prompt's text, and with logprobs
// the prompt's (from the first Delta when logprobs were asked for, or the Final).
nlohmann::json echo_chunk(const ApiRequest& api, size_t index, const std::vector<int32_t>& prompt_token_ids,
                          const std::vector<protocol::TokenLogprob>& prompt_logprobs, const std::string& id,
                          int64_t created, const std::string& model);
// The text (and logprobs) of one Delta of choice `index`.
nlohmann::json delta_chunk(const ApiRequest& api, size_t index, const protocol::Delta& delta,
                           const std::string& id, int64_t created, const std::string& model);
// With tools, a chat choice's calls (Final::tool_calls), each whole in one chunk, before its last.
nlohmann::json tool_calls_chunk(const ApiRequest& api, size_t index, const protocol::Final& final,
                                const std::string& id, int64_t created, const std::string& model);
// A choice's last chunk: no text, the finish reason.
nlohmann::json finish_chunk(const ApiRequest& api, size_t index, const protocol::Final& final,
                            const std::string& id, int64_t created, const std::string& model);
// With stream_options.include_usage: no choices, the usage of them all.
nlohmann::json usage_chunk(const ApiRequest& api, const std::vector<protocol::Final>& finals,
                           const std::string& id, int64_t created, const std::string& model);

// POST /tokenize {"prompt": TEXT, "add_special_tokens": true} -> {"tokens": [...], "count": N} and
// POST /detokenize {"tokens": [...]} -> {"prompt": TEXT}, vLLM's, with settings.tokenizer (checked
// by the caller). Control tokens' texts in TEXT ("</s>", "<|eot_id|>") are those tokens, as vLLM's
// and llama.cpp's servers tokenize. Throw ApiError 400 naming the field (unknown keys, wrong types, ids
// outside the vocabulary), 404 for another model's name.
nlohmann::json tokenize(const std::string& body, const ApiSettings& settings);
nlohmann::json detokenize(const std::string& body, const ApiSettings& settings);
// POST /v1/load_lora_adapter {"lora_name": NAME, "lora_path": PATH, "scale": S} and
// POST /v1/unload_lora_adapter {"lora_name": NAME}, vLLM's (scale is llama.cpp's --lora-scaled, 1 when
// left out): the coordinator's requests. Throw ApiError 400 naming the field.
protocol::LoadAdapterRequest parse_load_adapter(const std::string& body);
protocol::UnloadAdapterRequest parse_unload_adapter(const std::string& body);
// GET /tokenizer_info, vLLM's (what lm-evaluation-harness's remote tokenizer reads): the BOS and EOS
// tokens' texts, whether BOS is added, the tokenizer's kind; with settings.tokenizer.
nlohmann::json tokenizer_info(const ApiSettings& settings);

// A latency histogram in seconds with Prometheus's cumulative buckets (le = each bound, then +Inf).
struct LatencyHistogram {
  std::vector<double> bounds;                                               // ascending
  std::vector<uint64_t> counts = std::vector<uint64_t>(bounds.size() + 1);  // per bucket, the last +Inf
  double sum = 0;
  uint64_t count = 0;
  void observe(double seconds);
};

// The gateway's request latencies, from each answered choice's Final (the coordinator's timings, as
// vLLM's histograms are the server's): time to first token (queue + prefill), time per output token
// after the first, and end to end (queue + prefill + decode).
struct RequestLatencies {
  LatencyHistogram ttft{{0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60}};
  LatencyHistogram tpot{{0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 1, 2.5}};
  LatencyHistogram e2e{{0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 30, 60, 120, 300}};
  void observe(const protocol::Final& final);
};

// GET /metrics: the coordinator's counters (protocol::Stats), the gateway's HTTP answers by path and
// status, and its request latencies, in Prometheus's text exposition format (version 0.0.4), as vLLM's
// /metrics serves its own. http_answers: ((path, status), count), each path an endpoint of the gateway's.
std::string prometheus_metrics(
    const protocol::Stats& stats,
    const std::vector<std::pair<std::pair<std::string, int>, uint64_t>>& http_answers,
    const RequestLatencies& latencies);

// `body` as JSON text; invalid UTF-8 (a token may end inside a character) becomes U+FFFD, not an error.
std::string dump(const nlohmann::json& body);

// How a logprob names its token: its text with a tokenizer; "token_id:N" without (vLLM's
// return_tokens_as_token_ids form).
std::string token_name(const ApiRequest& api, int32_t token);

}  // namespace nibble::cluster::openai
