#include "cluster/openai_api.hpp"

#include <algorithm>
#include <cctype>
#include <charconv>
#include <cmath>
#include <limits>
#include <set>
#include <span>
#include <utility>

#include "model/tool_calls.hpp"
#include "worker/gbnf_grammar.hpp"
#include "worker/json_schema.hpp"
#include "worker/json_schema_grammar.hpp"

namespace nibble::cluster::openai {
namespace {

using nlohmann::json;

// The keys each endpoint reads (OpenAI's, vLLM's sampling extras and guided decoding, llama.cpp's grammar
// and json_schema); any other key is refused by name rather than silently ignored.
std::set<std::string> keys_of(std::initializer_list<const char*> own) {
  std::set<std::string> keys = {
      "model", "max_tokens", "temperature", "top_p", "n", "stream", "stream_options", "stop",
      "presence_penalty", "frequency_penalty", "logit_bias", "logprobs", "seed", "user",
      // vLLM's sampling extras
      "top_k", "min_p", "repetition_penalty", "ignore_eos", "min_tokens", "stop_token_ids",
      // constrained output: OpenAI's, vLLM's guided decoding, llama.cpp's
      "response_format", "guided_json", "guided_grammar", "guided_choice", "guided_regex", "grammar",
      "json_schema"};
  keys.insert(own.begin(), own.end());
  return keys;
}
const std::set<std::string> kCompletionKeys = keys_of({"prompt", "echo", "best_of", "suffix"});
const std::set<std::string> kChatKeys = keys_of(
    {"messages", "max_completion_tokens", "top_logprobs", "tools", "tool_choice", "parallel_tool_calls"});

// A field's value, or nullptr when it is absent or null (OpenAI's clients send null for "not given").
const json* field(const json& body, const std::string& key) {
  const auto it = body.find(key);
  return it == body.end() || it->is_null() ? nullptr : &*it;
}

[[noreturn]] void wrong_type(const std::string& key, const char* expected, const json& value) {
  throw invalid_request(key, key + ": expected " + expected + ", got " + value.type_name());
}

double number(const json& body, const std::string& key, double fallback) {
  const json* v = field(body, key);
  if (v == nullptr) return fallback;
  if (!v->is_number()) wrong_type(key, "a number", *v);
  return v->get<double>();
}

int64_t integer(const json& body, const std::string& key, int64_t fallback) {
  const json* v = field(body, key);
  if (v == nullptr) return fallback;
  if (!v->is_number_integer()) wrong_type(key, "an integer", *v);
  return v->is_number_unsigned() ? static_cast<int64_t>(std::min<uint64_t>(v->get<uint64_t>(), INT64_MAX))
                                 : v->get<int64_t>();
}

bool boolean(const json& body, const std::string& key, bool fallback) {
  const json* v = field(body, key);
  if (v == nullptr) return fallback;
  if (!v->is_boolean()) wrong_type(key, "true or false", *v);
  return v->get<bool>();
}

void read_sampling(const json& body, protocol::GenerateRequest& r) {
  const double temperature = number(body, "temperature", 1.0);
  if (temperature < 0) throw invalid_request("temperature", "temperature: must be at least 0");
  const double top_p = number(body, "top_p", 1.0);
  if (!(top_p > 0 && top_p <= 1)) throw invalid_request("top_p", "top_p: must be in (0, 1]");
  const int64_t top_k = integer(body, "top_k", 0);  // vLLM's -1 and 0 both mean off
  if (top_k < -1 || top_k > std::numeric_limits<int32_t>::max())
    throw invalid_request("top_k", "top_k: must be -1 or 0 (off) or a positive count");
  const double min_p = number(body, "min_p", 0.0);
  if (!(min_p >= 0 && min_p < 1)) throw invalid_request("min_p", "min_p: must be in [0, 1)");
  const double repetition_penalty = number(body, "repetition_penalty", 1.0);
  if (!(repetition_penalty > 0))
    throw invalid_request("repetition_penalty", "repetition_penalty: must be above 0");
  r.sampling.temperature = static_cast<float>(temperature);
  r.sampling.top_p = static_cast<float>(top_p);
  r.sampling.top_k = static_cast<int32_t>(std::max<int64_t>(top_k, 0));
  r.sampling.min_p = static_cast<float>(min_p);
  r.sampling.repetition_penalty = static_cast<float>(repetition_penalty);
  if (field(body, "seed") != nullptr) r.sampling.seed = static_cast<uint64_t>(integer(body, "seed", 0));

  // llama.cpp's penalties over the recent window (its server takes OpenAI's names for them).
  for (const char* key : {"presence_penalty", "frequency_penalty"}) {
    const double penalty = number(body, key, 0.0);
    if (!(std::fabs(penalty) <= protocol::kMaxPresencePenalty))
      throw invalid_request(key, std::string(key) + ": must be in [-2, 2]");
    (std::string(key) == "presence_penalty" ? r.sampling.presence_penalty : r.sampling.frequency_penalty) =
        static_cast<float>(penalty);
  }
  if (const json* bias = field(body, "logit_bias")) {
    if (!bias->is_object()) wrong_type("logit_bias", "an object of token id to bias", *bias);
    if (bias->size() > protocol::kMaxLogitBias)
      throw invalid_request("logit_bias",
                            "logit_bias: more than " + std::to_string(protocol::kMaxLogitBias) + " tokens");
    for (const auto& [key, value] : bias->items()) {
      const bool id = !key.empty() && key.size() <= 9 &&
                      std::all_of(key.begin(), key.end(), [](char c) { return c >= '0' && c <= '9'; });
      if (!id) throw invalid_request("logit_bias", "logit_bias: '" + key + "' is not a token id");
      if (!value.is_number() || !(std::fabs(value.get<double>()) <= protocol::kMaxLogitBiasValue))
        throw invalid_request("logit_bias",
                              "logit_bias: the bias of token " + key + " must be a number in [-100, 100]");
      r.sampling.logit_bias.push_back({std::stoi(key), value.get<float>()});
    }
  }
  r.ignore_eos = boolean(body, "ignore_eos", false);
  const int64_t min_tokens = integer(body, "min_tokens", 0);
  if (min_tokens < 0 || min_tokens > std::numeric_limits<uint32_t>::max())
    throw invalid_request("min_tokens", "min_tokens: must be at least 0");
  r.min_tokens = static_cast<uint32_t>(min_tokens);
  if (const json* ids = field(body, "stop_token_ids")) {
    if (!ids->is_array()) wrong_type("stop_token_ids", "an array of token ids", *ids);
    for (const json& id : *ids) {
      if (!id.is_number_integer() || id.get<int64_t>() < 0 || id.get<int64_t>() > INT32_MAX)
        throw invalid_request("stop_token_ids", "stop_token_ids: token ids must be integers from 0");
      r.stop_token_ids.push_back(static_cast<int32_t>(id.get<int64_t>()));
    }
  }
  if (const json* user = field(body, "user"); user != nullptr && !user->is_string())
    wrong_type("user", "a string", *user);
}

void read_stop(const json& body, protocol::GenerateRequest& r) {
  const json* stop = field(body, "stop");
  if (stop == nullptr) return;
  if (stop->is_string()) {
    r.stop.push_back(stop->get<std::string>());
    return;
  }
  if (!stop->is_array()) wrong_type("stop", "a string or an array of strings", *stop);
  for (const json& s : *stop) {
    if (!s.is_string()) wrong_type("stop", "a string or an array of strings", s);
    r.stop.push_back(s.get<std::string>());
  }
}

// least: 0 where the request may generate nothing (echo: the prompt's log-probabilities alone).
uint32_t max_tokens(const json& body, const std::string& key, uint32_t fallback, int64_t least = 1) {
  const int64_t n = integer(body, key, fallback);
  if (n < least || n > std::numeric_limits<uint32_t>::max())
    throw invalid_request(
        key, key + (least == 0 ? ": must be at least 0" : ": must be at least 1 (0 only with echo)"));
  return static_cast<uint32_t>(n);
}

void read_stream(const json& body, ApiRequest& api) {
  api.request.stream = boolean(body, "stream", false);
  if (const json* options = field(body, "stream_options")) {
    if (!options->is_object()) wrong_type("stream_options", "an object", *options);
    if (!api.request.stream)
      throw invalid_request("stream_options", "stream_options: only with \"stream\": true");
    for (const auto& [key, value] : options->items()) {
      if (key != "include_usage")
        throw invalid_request("stream_options", "stream_options: unknown key '" + key + "'");
    }
    api.include_usage = boolean(*options, "include_usage", false);
  }
}

uint32_t logprob_count(const json& body, const std::string& key) {
  const int64_t n = integer(body, key, 0);
  if (n < 0 || n > protocol::kMaxLogprobs)
    throw invalid_request(key, key + ": must be 0 to " + std::to_string(protocol::kMaxLogprobs));
  return static_cast<uint32_t>(n);
}

// A prompt, or a batch of them: a string, an array of token ids, or an array of either.
std::vector<decltype(protocol::GenerateRequest::prompt)> read_prompts(const json& body) {
  const json* prompt = field(body, "prompt");
  if (prompt == nullptr) throw invalid_request("prompt", "prompt: required");
  const auto ids = [](const json& array) {
    std::vector<int32_t> out;
    for (const json& id : array) {
      if (!id.is_number_integer() || id.get<int64_t>() < 0 || id.get<int64_t>() > INT32_MAX)
        throw invalid_request("prompt", "prompt: token ids must be integers from 0");
      out.push_back(static_cast<int32_t>(id.get<int64_t>()));
    }
    return out;
  };
  std::vector<decltype(protocol::GenerateRequest::prompt)> prompts;
  if (prompt->is_string()) {
    prompts.emplace_back(prompt->get<std::string>());
  } else if (prompt->is_array() && !prompt->empty() && (*prompt)[0].is_number()) {
    prompts.emplace_back(ids(*prompt));
  } else if (prompt->is_array() && !prompt->empty()) {
    for (const json& one : *prompt) {
      if (one.is_string()) {
        prompts.emplace_back(one.get<std::string>());
      } else if (one.is_array()) {
        prompts.emplace_back(ids(one));
      } else {
        wrong_type("prompt", "a batch of strings or of token id arrays", one);
      }
    }
  } else {
    wrong_type("prompt", "a string, an array of token ids, or a non-empty array of either", *prompt);
  }
  return prompts;
}

// An assistant message's tool_calls: [{"id", "type": "function", "function": {"name", "arguments": a JSON
// object's text}}].
std::vector<protocol::ToolCall> read_tool_calls(const json& message, const std::string& where) {
  std::vector<protocol::ToolCall> calls;
  const json* list = field(message, "tool_calls");
  if (list == nullptr) return calls;
  if (!list->is_array()) wrong_type(where + ".tool_calls", "an array", *list);
  if (list->size() > protocol::kMaxToolCalls)
    throw invalid_request("messages",
                          where + ".tool_calls: more than " + std::to_string(protocol::kMaxToolCalls));
  for (size_t k = 0; k < list->size(); ++k) {
    const json& call = (*list)[k];
    const std::string at = where + ".tool_calls[" + std::to_string(k) + "]";
    const json* function = call.is_object() ? field(call, "function") : nullptr;
    const json* name = function != nullptr && function->is_object() ? field(*function, "name") : nullptr;
    const json* arguments =
        function != nullptr && function->is_object() ? field(*function, "arguments") : nullptr;
    if (name == nullptr || !name->is_string() || arguments == nullptr || !arguments->is_string())
      throw invalid_request("messages", at + ": expected {\"id\", \"type\": \"function\", \"function\": "
                                             "{\"name\": string, \"arguments\": string}}");
    const json parsed = json::parse(arguments->get<std::string>(), nullptr, /*allow_exceptions=*/false);
    if (!parsed.is_object())
      throw invalid_request("messages", at + ".function.arguments: not a JSON object's text");
    const json* call_id = field(call, "id");
    calls.push_back({call_id != nullptr && call_id->is_string() ? call_id->get<std::string>() : "",
                     name->get<std::string>(), arguments->get<std::string>()});
  }
  return calls;
}

void read_messages(const json& body, protocol::GenerateRequest& r) {
  const json* messages = field(body, "messages");
  if (messages == nullptr) throw invalid_request("messages", "messages: required");
  if (!messages->is_array() || messages->empty())
    throw invalid_request("messages", "messages: expected a non-empty array");
  std::vector<protocol::ChatMessage> chat;
  for (size_t i = 0; i < messages->size(); ++i) {
    const json& m = (*messages)[i];
    const std::string where = "messages[" + std::to_string(i) + "]";
    if (!m.is_object()) wrong_type(where, "an object", m);
    for (const auto& [key, value] : m.items()) {
      if (key != "role" && key != "content" && key != "name" && key != "tool_calls" && key != "tool_call_id")
        throw invalid_request("messages",
                              where + ": unknown key '" + key +
                                  "' (role, content, name, tool_calls and tool_call_id are read)");
    }
    const json* role = field(m, "role");
    if (role == nullptr || !role->is_string() || role->get<std::string>().empty())
      throw invalid_request("messages", where + ".role: expected a non-empty string");
    if (const json* call_id = field(m, "tool_call_id"); call_id != nullptr && !call_id->is_string())
      wrong_type(where + ".tool_call_id", "a string", *call_id);
    std::vector<protocol::ToolCall> calls = read_tool_calls(m, where);
    const json* content = field(m, "content");
    // An assistant's turn of calls alone has no content (OpenAI's null).
    if (content == nullptr && calls.empty()) throw invalid_request("messages", where + ".content: required");
    std::string text;
    if (content == nullptr) {
    } else if (content->is_string()) {
      text = content->get<std::string>();
    } else if (content->is_array()) {
      // Text parts joined by newlines, as vLLM joins them.
      for (size_t j = 0; j < content->size(); ++j) {
        const json& part = (*content)[j];
        const std::string part_where = where + ".content[" + std::to_string(j) + "]";
        if (!part.is_object() || part.value("type", json()) != "text" || !part.contains("text") ||
            !part["text"].is_string())
          throw invalid_request("messages",
                                part_where + ": only {\"type\": \"text\", \"text\": ...} parts are read");
        if (j > 0) text += '\n';
        text += part["text"].get<std::string>();
      }
    } else {
      wrong_type(where + ".content", "a string or an array of text parts", *content);
    }
    // OpenAI's "developer" role is the system role of newer models; chat templates know "system".
    std::string role_name = role->get<std::string>() == "developer" ? "system" : role->get<std::string>();
    chat.push_back({std::move(role_name), std::move(text), std::move(calls)});
  }
  r.prompt = std::move(chat);
}

// response_format: {"type": "text"}, {"type": "json_object"}, or {"type": "json_schema", "json_schema":
// {"name", "schema", "strict", "description"}} (the schema checked here as the coordinator checks it:
// worker/json_schema's subset, or a grammar of it, worker/json_schema_grammar).
void read_response_format(const json& body, protocol::GenerateRequest& r) {
  const json* format = field(body, "response_format");
  if (format == nullptr) return;
  if (!format->is_object()) wrong_type("response_format", "an object", *format);
  const json type = format->value("type", json());
  if (type == "text") return;
  if (type == "json_object") {
    r.response_format = protocol::ResponseFormat::json_object;
    return;
  }
  if (type != "json_schema")
    throw invalid_request("response_format",
                          "response_format: type \"text\", \"json_object\" or \"json_schema\"");
  const json* spec = field(*format, "json_schema");
  if (spec == nullptr || !spec->is_object())
    throw invalid_request("response_format",
                          "response_format.json_schema: expected an object with \"schema\"");
  for (const auto& [key, value] : spec->items()) {
    if (key != "name" && key != "schema" && key != "strict" && key != "description")
      throw invalid_request("response_format", "response_format.json_schema: unknown key '" + key + "'");
  }
  const json* schema = field(*spec, "schema");
  if (schema == nullptr)
    throw invalid_request("response_format", "response_format.json_schema.schema: required");
  r.json_schema = schema->dump();
  try {
    worker::constrain_to_schema(r.json_schema);
  } catch (const std::invalid_argument& e) {
    throw invalid_request("response_format", std::string("response_format.") + e.what());
  }
  r.response_format = protocol::ResponseFormat::json_schema;
}

// Grammar-constrained output: llama.cpp's "grammar" and vLLM's "guided_grammar" (GBNF text), vLLM's
// "guided_choice" (the output one of these strings) and "guided_regex" (matched whole); one of them, and
// not with a response_format. vLLM's "guided_json" and llama.cpp's "json_schema" (a schema, or its text)
// are response_format json_schema.
void read_grammar(const json& body, protocol::GenerateRequest& r) {
  for (const char* key : {"guided_json", "json_schema"}) {
    const json* schema = field(body, key);
    if (schema == nullptr) continue;
    if (r.response_format != protocol::ResponseFormat::text)
      throw invalid_request(key, std::string(key) + ": not with a response_format or another schema");
    r.json_schema = schema->is_string() ? schema->get<std::string>() : schema->dump();
    try {
      worker::constrain_to_schema(r.json_schema);
    } catch (const std::invalid_argument& e) {
      throw invalid_request(key, std::string(key) + ": " + e.what());
    }
    r.response_format = protocol::ResponseFormat::json_schema;
  }
  const char* given = nullptr;
  for (const char* key : {"grammar", "guided_grammar", "guided_choice", "guided_regex"}) {
    if (field(body, key) == nullptr) continue;
    if (given != nullptr)
      throw invalid_request(
          key, std::string(key) + ": only one of grammar, guided_grammar, guided_choice and guided_regex");
    given = key;
  }
  if (given == nullptr) return;
  const json& value = *field(body, given);
  if (std::string(given) == "guided_choice") {
    if (!value.is_array() || value.empty())
      throw invalid_request(given, "guided_choice: expected a non-empty array of strings");
    std::vector<std::string> strings;
    for (const json& s : value) {
      if (!s.is_string() || s.get<std::string>().empty())
        throw invalid_request(given, "guided_choice: expected non-empty strings");
      strings.push_back(s.get<std::string>());
    }
    r.grammar = worker::Grammar::choice_text(strings);
  } else if (std::string(given) == "guided_regex") {
    if (!value.is_string()) wrong_type(given, "a regular expression", value);
    try {
      r.grammar = worker::Grammar::regex_text(value.get<std::string>());
    } catch (const std::invalid_argument& e) {
      throw invalid_request(given, std::string(given) + ": " + e.what());
    }
  } else {
    if (!value.is_string()) wrong_type(given, "a GBNF grammar's text", value);
    r.grammar = value.get<std::string>();
  }
  if (r.grammar.size() > protocol::kMaxJsonSchemaBytes)
    throw invalid_request(given, std::string(given) + ": longer than " +
                                     std::to_string(protocol::kMaxJsonSchemaBytes) + " bytes");
  try {
    worker::Grammar::compile(r.grammar);
  } catch (const std::invalid_argument& e) {
    throw invalid_request(given, std::string(given) + ": " + e.what());
  }
  if (r.response_format != protocol::ResponseFormat::text)
    throw invalid_request(given,
                          std::string(given) + ": not with a response_format (the grammar is the format)");
  r.response_format = protocol::ResponseFormat::grammar;
}

// tools (checked here as the coordinator checks them: model/tool_calls) and tool_choice: "none", "auto",
// "required" or {"type": "function", "function": {"name": ...}}. `text`: the body as sent, for the
// tools' keys in the client's order (the prompt shows them so).
void read_tools(const json& body, const std::string& text, protocol::GenerateRequest& r) {
  std::vector<model::ToolDefinition> tools;
  if (const json* given = field(body, "tools")) {
    if (!given->is_array()) wrong_type("tools", "an array", *given);
    if (!given->empty()) {
      r.tools = nlohmann::ordered_json::parse(text)["tools"].dump();
      try {
        tools = model::parse_tools(r.tools);
      } catch (const std::invalid_argument& e) {
        throw invalid_request("tools", e.what());
      }
    }
  }
  if (const json* choice = field(body, "tool_choice")) {
    if (*choice == "none") {
      r.tool_choice = protocol::ToolChoice::none;
    } else if (*choice == "auto") {
      r.tool_choice = protocol::ToolChoice::auto_;
    } else if (*choice == "required") {
      r.tool_choice = protocol::ToolChoice::required;
    } else if (choice->is_object() && choice->value("type", json()) == "function" &&
               choice->contains("function") && (*choice)["function"].is_object() &&
               (*choice)["function"].value("name", json()).is_string()) {
      r.tool_choice = protocol::ToolChoice::function;
      r.tool_choice_function = (*choice)["function"]["name"].get<std::string>();
      if (std::none_of(tools.begin(), tools.end(),
                       [&](const model::ToolDefinition& t) { return t.name == r.tool_choice_function; }))
        throw invalid_request("tool_choice",
                              "tool_choice: no tool is named '" + r.tool_choice_function + "'");
    } else {
      throw invalid_request(
          "tool_choice",
          "tool_choice: expected \"none\", \"auto\", \"required\" or {\"type\": \"function\", "
          "\"function\": {\"name\": ...}}");
    }
    if (tools.empty() && r.tool_choice != protocol::ToolChoice::none &&
        r.tool_choice != protocol::ToolChoice::auto_)
      throw invalid_request("tool_choice", "tool_choice: a call is required and no tools are offered");
  }
  boolean(body, "parallel_tool_calls", true);
}

// A message's tool_calls as OpenAI writes them (a stream's with each call's index).
json tool_calls_of(const std::vector<protocol::ToolCall>& calls, bool with_index) {
  json out = json::array();
  for (size_t k = 0; k < calls.size(); ++k) {
    json call = {{"id", calls[k].id},
                 {"type", "function"},
                 {"function", {{"name", calls[k].name}, {"arguments", calls[k].arguments}}}};
    if (with_index) call["index"] = k;
    out.push_back(std::move(call));
  }
  return out;
}

// Each prompt's tokens counted once (its first choice's), every choice's completion.
json usage(const ApiRequest& api, const std::vector<protocol::Final>& finals) {
  uint64_t prompt = 0, completion = 0, cached = 0;
  for (size_t i = 0; i < finals.size(); ++i) {
    if (i % api.n == 0) {
      prompt += finals[i].prompt_tokens;
      cached += finals[i].cached_prompt_tokens;
    }
    completion += finals[i].completion_tokens;
  }
  return {{"prompt_tokens", prompt},
          {"completion_tokens", completion},
          {"total_tokens", prompt + completion},
          {"prompt_tokens_details", {{"cached_tokens", cached}}}};
}

std::span<const protocol::TopLogprob> top_of(const ApiRequest& api, const protocol::TokenLogprob& lp) {
  return std::span(lp.top).first(std::min<size_t>(api.top_logprobs, lp.top.size()));
}

// Completions' logprobs object ({"tokens", "token_logprobs", "top_logprobs"}) with `tokens` appended.
void append_completion_logprobs(const ApiRequest& api, std::span<const int32_t> tokens,
                                std::span<const protocol::TokenLogprob> logprobs, json& out) {
  const size_t n = std::min(tokens.size(), logprobs.size());
  for (size_t i = 0; i < n; ++i) {
    out["tokens"].push_back(token_name(api, tokens[i]));
    out["token_logprobs"].push_back(logprobs[i].logprob);
    json top = json::object();
    for (const protocol::TopLogprob& t : top_of(api, logprobs[i])) top[token_name(api, t.token)] = t.logprob;
    out["top_logprobs"].push_back(std::move(top));
  }
}

// An echoed prompt's logprobs (completions' form): its first token has none (null), each later one the
// value given those before it; null when none were asked for.
json prompt_logprobs_of(const ApiRequest& api, const std::vector<int32_t>& prompt,
                        const std::vector<protocol::TokenLogprob>& logprobs) {
  if (!api.report_logprobs) return nullptr;
  json out = {{"tokens", json::array()}, {"token_logprobs", json::array()}, {"top_logprobs", json::array()}};
  if (prompt.empty()) return out;
  out["tokens"].push_back(token_name(api, prompt[0]));
  out["token_logprobs"].push_back(nullptr);
  out["top_logprobs"].push_back(nullptr);
  append_completion_logprobs(api, std::span(prompt).subspan(1), logprobs, out);
  return out;
}

// The logprobs of `tokens` in the endpoint's form; null when none were asked for.
json logprobs_of(const ApiRequest& api, const std::vector<int32_t>& tokens,
                 const std::vector<protocol::TokenLogprob>& logprobs) {
  if (!api.report_logprobs) return nullptr;
  const size_t n = std::min(tokens.size(), logprobs.size());
  // Chat's "bytes": the token's UTF-8 bytes as numbers (a token may hold part of a character), with a
  // tokenizer; null without one.
  const auto bytes_of = [&](int32_t token) -> json {
    if (!api.token_text) return nullptr;
    json out = json::array();
    for (const char c : api.token_text(token)) out.push_back(static_cast<unsigned char>(c));
    return out;
  };
  if (api.endpoint == Endpoint::chat_completions) {
    json content = json::array();
    for (size_t i = 0; i < n; ++i) {
      json top = json::array();
      for (const protocol::TopLogprob& t : top_of(api, logprobs[i]))
        top.push_back(
            {{"token", token_name(api, t.token)}, {"logprob", t.logprob}, {"bytes", bytes_of(t.token)}});
      content.push_back({{"token", token_name(api, tokens[i])},
                         {"logprob", logprobs[i].logprob},
                         {"bytes", bytes_of(tokens[i])},
                         {"top_logprobs", std::move(top)}});
    }
    return {{"content", std::move(content)}, {"refusal", nullptr}};
  }
  json out = {{"tokens", json::array()}, {"token_logprobs", json::array()}, {"top_logprobs", json::array()}};
  append_completion_logprobs(api, tokens, logprobs, out);
  return out;
}

json envelope(const ApiRequest& api, bool chunk, const std::string& id, int64_t created,
              const std::string& model) {
  const char* object = api.endpoint == Endpoint::completions ? "text_completion"
                       : chunk                               ? "chat.completion.chunk"
                                                             : "chat.completion";
  return {{"id", id}, {"object", object}, {"created", created}, {"model", model}};
}

// One choice of a streamed chunk: its text (completions) or delta (chat), logprobs, finish reason.
json chunk_choice(const ApiRequest& api, size_t index, json delta_or_text, json logprobs, json finish) {
  json choice = {{"index", index}};
  choice[api.endpoint == Endpoint::completions ? "text" : "delta"] = std::move(delta_or_text);
  choice["logprobs"] = std::move(logprobs);
  choice["finish_reason"] = std::move(finish);
  return choice;
}

}  // namespace

ApiError::ApiError(int http_status, std::string error_type, std::string error_param, std::string error_code,
                   const std::string& message)
    : std::runtime_error(message),
      status(http_status),
      type(std::move(error_type)),
      param(std::move(error_param)),
      code(std::move(error_code)) {}

ApiError invalid_request(const std::string& param, const std::string& message) {
  return ApiError(400, "invalid_request_error", param, "", message);
}

ApiError from_protocol(std::optional<protocol::ErrorCode> code, const std::string& message) {
  using protocol::ErrorCode;
  if (!code) return ApiError(503, "server_error", "", "coordinator_unavailable", "coordinator: " + message);
  // The protocol's name in OpenAI's snake_case: promptTooLong -> prompt_too_long.
  std::string name;
  for (const char c : protocol::to_string(*code)) {
    if (std::isupper(static_cast<unsigned char>(c))) {
      name += '_';
      name += static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
    } else {
      name += c;
    }
  }
  switch (*code) {
    case ErrorCode::bad_request:
    case ErrorCode::malformed_message:
    case ErrorCode::unknown_request_type:
    case ErrorCode::prompt_too_long:
      return ApiError(400, "invalid_request_error", "", name, message);
    case ErrorCode::message_too_large:
      return ApiError(413, "invalid_request_error", "", name, message);
    case ErrorCode::not_found:
      return ApiError(404, "invalid_request_error", "", name, message);
    case ErrorCode::overloaded:
      return ApiError(429, "server_error", "", name, message);
    case ErrorCode::shutting_down:
      return ApiError(503, "server_error", "", name, message);
    case ErrorCode::cancelled:
    case ErrorCode::worker_failed:
    case ErrorCode::internal:
      break;
  }
  return ApiError(500, "server_error", "", name, message);
}

json error_body(const ApiError& error) {
  return {{"error",
           {{"message", error.what()},
            {"type", error.type},
            {"param", error.param.empty() ? json(nullptr) : json(error.param)},
            {"code", error.code.empty() ? json(nullptr) : json(error.code)}}}};
}

namespace {

// The body as a JSON object holding only `keys`, naming the model this server serves if any.
json read_body(const std::string& text, const std::set<std::string>& keys, const ApiSettings& settings) {
  json body;
  try {
    body = json::parse(text);
  } catch (const json::exception& e) {  // a syntax error, or a number beyond a double's range
    throw invalid_request("", std::string("the body is not JSON: ") + e.what());
  }
  if (!body.is_object())
    throw invalid_request("", std::string("the body must be a JSON object, got ") + body.type_name());
  for (const auto& [key, value] : body.items()) {
    if (!keys.contains(key)) throw invalid_request(key, "unknown key '" + key + "'");
  }
  if (const json* model = field(body, "model")) {
    if (!model->is_string()) wrong_type("model", "a string", *model);
    const std::string name = model->get<std::string>();
    const std::vector<std::string> adapters =
        name == settings.model_name || !settings.adapters ? std::vector<std::string>{} : settings.adapters();
    if (name != settings.model_name && std::find(adapters.begin(), adapters.end(), name) == adapters.end()) {
      std::string served = "'" + settings.model_name + "'";
      for (const std::string& adapter : adapters) served += ", '" + adapter + "'";
      throw ApiError(404, "invalid_request_error", "model", "model_not_found",
                     "the model '" + name + "' does not exist (this server serves " + served + ")");
    }
  }
  return body;
}

}  // namespace

json tokenize(const std::string& text, const ApiSettings& settings) {
  const json body = read_body(text, {"model", "prompt", "add_special_tokens"}, settings);
  const json* prompt = field(body, "prompt");
  if (prompt == nullptr) throw invalid_request("prompt", "prompt: required");
  if (!prompt->is_string()) wrong_type("prompt", "a string", *prompt);
  const bool add_bos = boolean(body, "add_special_tokens", true) && settings.tokenizer->add_bos_default();
  const std::vector<int32_t> tokens =
      settings.tokenizer->encode(prompt->get<std::string>(), add_bos, /*parse_special=*/true);
  return {{"tokens", tokens}, {"count", tokens.size()}};
}

json tokenizer_info(const ApiSettings& settings) {
  const model::Tokenizer& t = *settings.tokenizer;
  const auto text_of = [&](int32_t id) -> json {
    return id >= 0 && id < t.n_vocab() ? json(t.token_text(id)) : json(nullptr);
  };
  return {{"tokenizer_class", t.kind() == model::TokenizerKind::sentencepiece ? "sentencepiece" : "byte_bpe"},
          {"bos_token", text_of(t.bos_id())},
          {"eos_token", text_of(t.eos_id())},
          {"pad_token", nullptr},
          {"add_bos_token", t.add_bos_default()},
          {"vocab_size", t.n_vocab()}};
}

namespace {

std::string required_string(const json& body, const std::string& key) {
  const json* value = field(body, key);
  if (value == nullptr) throw invalid_request(key, key + ": required");
  if (!value->is_string()) wrong_type(key, "a string", *value);
  if (value->get<std::string>().empty()) throw invalid_request(key, key + ": must not be empty");
  return value->get<std::string>();
}

}  // namespace

protocol::LoadAdapterRequest parse_load_adapter(const std::string& text) {
  const json body = read_body(text, {"lora_name", "lora_path", "scale"}, ApiSettings{});
  protocol::LoadAdapterRequest request;
  request.name = required_string(body, "lora_name");
  request.path = required_string(body, "lora_path");
  const double scale = number(body, "scale", 1.0);
  if (!std::isfinite(static_cast<float>(scale)))
    throw invalid_request("scale", "scale: must be a finite number");
  request.scale = static_cast<float>(scale);
  return request;
}

protocol::UnloadAdapterRequest parse_unload_adapter(const std::string& text) {
  const json body = read_body(text, {"lora_name"}, ApiSettings{});
  return {"", required_string(body, "lora_name")};
}

json detokenize(const std::string& text, const ApiSettings& settings) {
  const json body = read_body(text, {"model", "tokens"}, settings);
  const json* tokens = field(body, "tokens");
  if (tokens == nullptr) throw invalid_request("tokens", "tokens: required");
  if (!tokens->is_array()) wrong_type("tokens", "an array of token ids", *tokens);
  std::vector<int32_t> ids;
  for (const json& id : *tokens) {
    if (!id.is_number_integer() || id.get<int64_t>() < 0 ||
        id.get<int64_t>() >= settings.tokenizer->n_vocab())
      throw invalid_request("tokens", "tokens: " + id.dump() + " is not a token id of the vocabulary of " +
                                          std::to_string(settings.tokenizer->n_vocab()));
    ids.push_back(static_cast<int32_t>(id.get<int64_t>()));
  }
  return {{"prompt", settings.tokenizer->decode(ids)}};
}

ApiRequest parse_request(Endpoint endpoint, const std::string& text, const ApiSettings& settings) {
  const json body =
      read_body(text, endpoint == Endpoint::completions ? kCompletionKeys : kChatKeys, settings);

  ApiRequest api;
  api.endpoint = endpoint;
  api.token_text = settings.token_text;
  protocol::GenerateRequest& r = api.request;
  // A request naming a LoRA adapter as its model runs on that adapter (read_body checked the name).
  if (const json* model = field(body, "model");
      model != nullptr && model->get<std::string>() != settings.model_name)
    r.adapter = model->get<std::string>();
  const int64_t n = integer(body, "n", 1);
  if (n < 1 || n > settings.max_choices)
    throw invalid_request("n", "n: must be 1 to " + std::to_string(settings.max_choices));
  api.n = static_cast<uint32_t>(n);
  read_sampling(body, r);
  read_stop(body, r);
  read_stream(body, api);
  if (endpoint == Endpoint::completions) {
    api.prompts = read_prompts(body);
    api.echo = boolean(body, "echo", false);
    r.max_tokens = max_tokens(body, "max_tokens", 16, api.echo ? 0 : 1);
    if (field(body, "logprobs") != nullptr) {
      api.report_logprobs = true;
      api.top_logprobs = logprob_count(body, "logprobs");
    }
    if (api.echo) {
      // The prompt as given, or a prompt of ids as the tokenizer writes it.
      for (const auto& prompt : api.prompts) {
        if (const auto* given = std::get_if<std::string>(&prompt)) {
          api.echo_texts.push_back(*given);
        } else if (settings.tokenizer != nullptr) {
          api.echo_texts.push_back(settings.tokenizer->decode(std::get<std::vector<int32_t>>(prompt)));
        } else {
          throw invalid_request(
              "echo",
              "echo: a prompt of token ids is echoed as text by the gateway's tokenizer, and "
              "it has none (nibble openai --tokenizer MODEL)");
        }
      }
      // The prompt's own log-probabilities come with its echo when logprobs are asked for; scoring alone
      // (max_tokens 0) is a request for them.
      if (api.report_logprobs || r.max_tokens == 0)
        r.prompt_logprobs = api.report_logprobs ? static_cast<int32_t>(api.top_logprobs) : 0;
    }
    if (field(body, "best_of") != nullptr && integer(body, "best_of", 1) != api.n)
      throw invalid_request("best_of", "best_of: only equal to n (no ranking of extra choices)");
    if (const json* suffix = field(body, "suffix");
        suffix != nullptr && (!suffix->is_string() || !suffix->get<std::string>().empty()))
      throw invalid_request("suffix", "suffix: not supported");
  } else {
    read_messages(body, r);
    api.prompts.push_back(r.prompt);
    const char* limit =
        field(body, "max_completion_tokens") != nullptr ? "max_completion_tokens" : "max_tokens";
    r.max_tokens = max_tokens(body, limit, settings.default_chat_max_tokens);
    api.report_logprobs = boolean(body, "logprobs", false);
    api.top_logprobs = logprob_count(body, "top_logprobs");
    if (api.top_logprobs > 0 && !api.report_logprobs)
      throw invalid_request("top_logprobs", "top_logprobs: only with \"logprobs\": true");
    read_tools(body, text, r);
  }
  read_response_format(body, r);
  read_grammar(body, r);
  if ((r.tool_choice == protocol::ToolChoice::required || r.tool_choice == protocol::ToolChoice::function) &&
      r.response_format != protocol::ResponseFormat::text)
    throw invalid_request(
        "response_format",
        "response_format: a required tool call is the answer's format itself: not with tool_choice " +
            std::string(r.tool_choice == protocol::ToolChoice::required ? "required" : "a function"));
  if (r.min_tokens > r.max_tokens)
    throw invalid_request("min_tokens", "min_tokens: " + std::to_string(r.min_tokens) + " is more than the " +
                                            std::to_string(r.max_tokens) + " tokens at most");
  // The protocol's logprobs count is of top tokens, at least 1 whenever any logprob is asked for.
  if (api.report_logprobs) r.logprobs = std::max<uint32_t>(api.top_logprobs, 1);
  if (api.prompts.size() * api.n > settings.max_choices)
    throw invalid_request(endpoint == Endpoint::completions ? "prompt" : "n",
                          std::to_string(api.prompts.size()) + " prompts times n = " + std::to_string(api.n) +
                              " choices: at most " + std::to_string(settings.max_choices) + " per request");
  r.prompt = api.prompts.front();
  return api;
}

std::vector<protocol::GenerateRequest> choice_requests(const ApiRequest& api) {
  std::vector<protocol::GenerateRequest> out;
  for (const auto& prompt : api.prompts) {
    for (uint32_t j = 0; j < api.n; ++j) {
      protocol::GenerateRequest r = api.request;
      r.prompt = prompt;
      if (r.sampling.seed) r.sampling.seed = *r.sampling.seed + j;
      out.push_back(std::move(r));
    }
  }
  return out;
}

const char* finish_reason(protocol::FinishReason reason) {
  switch (reason) {
    case protocol::FinishReason::length:
      return "length";
    case protocol::FinishReason::eos:
    case protocol::FinishReason::stop:
      return "stop";
    case protocol::FinishReason::tool_calls:
      return "tool_calls";
    case protocol::FinishReason::cancelled:
      break;
  }
  return "abort";
}

json response(const ApiRequest& api, const std::vector<protocol::Final>& finals, const std::string& id,
              int64_t created, const std::string& model) {
  json out = envelope(api, false, id, created, model);
  json choices = json::array();
  for (size_t i = 0; i < finals.size(); ++i) {
    const protocol::Final& f = finals[i];
    json choice = {{"index", i}};
    if (api.endpoint == Endpoint::completions) {
      choice["text"] = api.echo ? api.echo_texts[i / api.n] + f.text : f.text;
    } else {
      choice["message"] = {{"role", "assistant"}, {"content", f.text}};
      if (!f.tool_calls.empty()) {
        if (f.text.empty()) choice["message"]["content"] = nullptr;  // OpenAI's: calls alone
        choice["message"]["tool_calls"] = tool_calls_of(f.tool_calls, /*with_index=*/false);
      }
    }
    if (api.echo && api.report_logprobs) {  // the prompt's, then the generated tokens'
      json logprobs = prompt_logprobs_of(api, f.prompt_token_ids, f.prompt_logprobs);
      append_completion_logprobs(api, f.tokens, f.logprobs, logprobs);
      choice["logprobs"] = std::move(logprobs);
    } else {
      choice["logprobs"] = logprobs_of(api, f.tokens, f.logprobs);
    }
    choice["finish_reason"] = finish_reason(f.finish_reason);
    choices.push_back(std::move(choice));
  }
  out["choices"] = std::move(choices);
  out["usage"] = usage(api, finals);
  return out;
}

json role_chunk(const ApiRequest& api, size_t index, const std::string& id, int64_t created,
                const std::string& model) {
  json out = envelope(api, true, id, created, model);
  out["choices"] =
      json::array({chunk_choice(api, index, {{"role", "assistant"}, {"content", ""}}, nullptr, nullptr)});
  return out;
}

json echo_chunk(const ApiRequest& api, size_t index, const std::vector<int32_t>& prompt_token_ids,
                const std::vector<protocol::TokenLogprob>& prompt_logprobs, const std::string& id,
                int64_t created, const std::string& model) {
  json out = envelope(api, true, id, created, model);
  out["choices"] =
      json::array({chunk_choice(api, index, api.echo_texts[index / api.n],
                                prompt_logprobs_of(api, prompt_token_ids, prompt_logprobs), nullptr)});
  return out;
}

json delta_chunk(const ApiRequest& api, size_t index, const protocol::Delta& d, const std::string& id,
                 int64_t created, const std::string& model) {
  json out = envelope(api, true, id, created, model);
  json text = api.endpoint == Endpoint::completions ? json(d.text) : json{{"content", d.text}};
  out["choices"] = json::array(
      {chunk_choice(api, index, std::move(text), logprobs_of(api, d.tokens, d.logprobs), nullptr)});
  return out;
}

json tool_calls_chunk(const ApiRequest& api, size_t index, const protocol::Final& f, const std::string& id,
                      int64_t created, const std::string& model) {
  json out = envelope(api, true, id, created, model);
  out["choices"] = json::array({chunk_choice(
      api, index, {{"tool_calls", tool_calls_of(f.tool_calls, /*with_index=*/true)}}, nullptr, nullptr)});
  return out;
}

json finish_chunk(const ApiRequest& api, size_t index, const protocol::Final& f, const std::string& id,
                  int64_t created, const std::string& model) {
  json out = envelope(api, true, id, created, model);
  json empty = api.endpoint == Endpoint::completions ? json("") : json::object();
  out["choices"] =
      json::array({chunk_choice(api, index, std::move(empty), nullptr, finish_reason(f.finish_reason))});
  return out;
}

json usage_chunk(const ApiRequest& api, const std::vector<protocol::Final>& finals, const std::string& id,
                 int64_t created, const std::string& model) {
  json out = envelope(api, true, id, created, model);
  out["choices"] = json::array();
  out["usage"] = usage(api, finals);
  return out;
}

void LatencyHistogram::observe(double seconds) {
  const auto bucket = std::lower_bound(bounds.begin(), bounds.end(), seconds) - bounds.begin();
  ++counts[static_cast<size_t>(bucket)];
  sum += seconds;
  ++count;
}

void RequestLatencies::observe(const protocol::Final& f) {
  ttft.observe((f.timings.queue_ms + f.timings.prefill_ms) / 1e3);
  e2e.observe((f.timings.queue_ms + f.timings.prefill_ms + f.timings.decode_ms) / 1e3);
  if (f.completion_tokens > 1)
    tpot.observe(f.timings.decode_ms / 1e3 / static_cast<double>(f.completion_tokens - 1));
}

std::string prometheus_metrics(
    const protocol::Stats& s,
    const std::vector<std::pair<std::pair<std::string, int>, uint64_t>>& http_answers,
    const RequestLatencies& latencies) {
  struct Metric {
    const char* name;
    const char* type;
    const char* help;
    uint64_t value;
  };
  const Metric metrics[] = {
      {"nibble_requests_waiting", "gauge", "Requests queued for their first step.", s.queued},
      {"nibble_requests_running", "gauge", "Requests being generated.", s.running},
      {"nibble_requests_completed_total", "counter", "Requests that ended with a result.", s.completed},
      {"nibble_requests_failed_total", "counter", "Requests that ended with an error (cancels included).",
       s.failed},
      {"nibble_kv_blocks_free", "gauge", "KV cache blocks no request holds (cached ones included).",
       s.free_kv_blocks},
      {"nibble_kv_blocks_total", "gauge", "KV cache blocks in all.", s.total_kv_blocks},
      {"nibble_kv_blocks_cached", "gauge", "Free KV blocks that hold a cached prefix.", s.cached_kv_blocks},
      {"nibble_generation_tokens_total", "counter", "Tokens generated.", s.tokens_generated},
      {"nibble_prompt_tokens_total", "counter", "Prompt tokens at their requests' first step.",
       s.prompt_tokens},
      {"nibble_prompt_tokens_cached_total", "counter", "Prompt tokens whose K/V the prefix cache held.",
       s.cached_prompt_tokens},
      {"nibble_draft_tokens_proposed_total", "counter", "Speculative draft tokens verified.",
       s.draft_proposed},
      {"nibble_draft_tokens_accepted_total", "counter", "Speculative draft tokens accepted.",
       s.draft_accepted},
  };
  std::string out;
  for (const Metric& m : metrics) {
    out += std::string("# HELP ") + m.name + " " + m.help + "\n# TYPE " + m.name + " " + m.type + "\n" +
           m.name + " " + std::to_string(m.value) + "\n";
  }
  out +=
      "# HELP nibble_http_requests_total HTTP requests the gateway answered, by path and status.\n"
      "# TYPE nibble_http_requests_total counter\n";
  for (const auto& [key, count] : http_answers) {
    out += "nibble_http_requests_total{path=\"" + key.first + "\",status=\"" + std::to_string(key.second) +
           "\"} " + std::to_string(count) + "\n";
  }
  const auto histogram = [&](const char* name, const char* help, const LatencyHistogram& h) {
    out += std::string("# HELP ") + name + " " + help + "\n# TYPE " + name + " histogram\n";
    uint64_t cumulative = 0;
    for (size_t i = 0; i <= h.bounds.size(); ++i) {
      cumulative += h.counts[i];
      std::string le = "+Inf";
      if (i < h.bounds.size()) {
        char bound[32];
        le.assign(bound, std::to_chars(bound, bound + sizeof(bound), h.bounds[i]).ptr);
      }
      out += std::string(name) + "_bucket{le=\"" + le + "\"} " + std::to_string(cumulative) + "\n";
    }
    char sum[32];
    out += std::string(name) + "_sum " + std::string(sum, std::to_chars(sum, sum + sizeof(sum), h.sum).ptr) +
           "\n" + name + "_count " + std::to_string(h.count) + "\n";
  };
  histogram("nibble_time_to_first_token_seconds", "Queue and prefill time of the gateway's answered choices.",
            latencies.ttft);
  histogram("nibble_time_per_output_token_seconds", "Decode time per token after the first.", latencies.tpot);
  histogram("nibble_e2e_request_latency_seconds", "Queue, prefill and decode time of the answered choices.",
            latencies.e2e);
  return out;
}

std::string dump(const json& body) { return body.dump(-1, ' ', false, json::error_handler_t::replace); }

std::string token_name(const ApiRequest& api, int32_t token) {
  return api.token_text ? api.token_text(token) : "token_id:" + std::to_string(token);
}

}  // namespace nibble::cluster::openai
