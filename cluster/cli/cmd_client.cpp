// `nibble client`: one request to a running `nibble serve` (generate, or health/stats/shutdown).
// `nibble bench-serve`: a closed-loop load generator against one: C threads, one Client each,
// sharing N streamed greedy requests; reports throughput and TTFT/TPOT/latency percentiles.
#include <httplib.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <fstream>
#include <iostream>
#include <map>
#include <memory>
#include <mutex>
#include <nlohmann/json.hpp>
#include <optional>
#include <random>
#include <regex>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#include "cluster/cli/commands.hpp"
#include "cluster/client.hpp"
#include "worker/gbnf_grammar.hpp"

namespace nibble::cli {

namespace {

constexpr const char* kDefaultEndpoint = "tcp://127.0.0.1:5555";

// Invalid UTF-8 (a model may emit stray bytes) is replaced rather than aborting the dump.
void print_json(const nlohmann::json& out) {
  std::cout << out.dump(-1, ' ', false, nlohmann::json::error_handler_t::replace) << "\n";
}

nlohmann::json health_json(const protocol::Health& h) {
  return {{"ok", h.ok}, {"workers", h.workers}, {"detail", h.detail}};
}

nlohmann::json stats_json(const protocol::Stats& s) {
  return {{"queued", s.queued},
          {"running", s.running},
          {"completed", s.completed},
          {"failed", s.failed},
          {"free_kv_blocks", s.free_kv_blocks},
          {"total_kv_blocks", s.total_kv_blocks},
          {"tokens_generated", s.tokens_generated},
          {"draft_proposed", s.draft_proposed},
          {"draft_accepted", s.draft_accepted},
          {"prompt_tokens", s.prompt_tokens},
          {"cached_prompt_tokens", s.cached_prompt_tokens},
          {"cached_kv_blocks", s.cached_kv_blocks},
          {"adapters", s.adapters}};
}

// ---------------------------------------------------------------- bench-serve helpers

struct Range {
  int64_t lo = 0, hi = 0;
};

// "MIN:MAX" or "N" (= N:N), both >= 1.
Range parse_range(const std::string& option, const std::string& text) {
  auto number = [&](const std::string& part) -> int64_t {
    size_t used = 0;
    long long value = 0;
    try {
      value = std::stoll(part, &used);
    } catch (const std::exception&) {
      used = 0;
    }
    if (part.empty() || used != part.size() || value < 1 || value > INT32_MAX) {
      throw std::runtime_error(option + ": expected MIN:MAX with 1 <= MIN <= MAX, got '" + text + "'");
    }
    return value;
  };
  const size_t colon = text.find(':');
  Range r;
  r.lo = number(text.substr(0, colon));
  r.hi = colon == std::string::npos ? r.lo : number(text.substr(colon + 1));
  if (r.lo > r.hi) {
    throw std::runtime_error(option + ": expected MIN:MAX with 1 <= MIN <= MAX, got '" + text + "'");
  }
  return r;
}

// Uniform in [lo, hi] from mt19937_64 directly (its output is fixed by the standard, unlike the
// distributions'), so a seed gives the same workload with any standard library. The modulo bias is
// negligible for these ranges.
int64_t draw(std::mt19937_64& rng, int64_t lo, int64_t hi) {
  return lo + static_cast<int64_t>(rng() % static_cast<uint64_t>(hi - lo + 1));
}

// Linear interpolation between closest ranks (numpy's default); nullopt for no samples.
std::optional<double> percentile(std::vector<double> values, double p) {
  if (values.empty()) return std::nullopt;
  std::sort(values.begin(), values.end());
  const double rank = p / 100.0 * static_cast<double>(values.size() - 1);
  const size_t below = static_cast<size_t>(rank);
  const size_t above = std::min(below + 1, values.size() - 1);
  return values[below] + (rank - static_cast<double>(below)) * (values[above] - values[below]);
}

nlohmann::json json_or_null(std::optional<double> value) {
  return value ? nlohmann::json(*value) : nlohmann::json(nullptr);
}

std::string text_or_na(std::optional<double> value) {
  if (!value) return "n/a";
  char buffer[32];
  std::snprintf(buffer, sizeof(buffer), "%.2f", *value);
  return buffer;
}

// What one request measured.
struct Sample {
  bool ok = false;
  std::string failure;  // error code name, or "transport"
  double ttft_ms = 0, latency_ms = 0;
  std::optional<double> tpot_ms;  // needs two or more output tokens
  uint64_t prompt_tokens = 0, completion_tokens = 0;
  uint64_t draft_proposed = 0, draft_accepted = 0;  // speculative decoding
  uint64_t cached_prompt_tokens = 0;                // prompt tokens the prefix cache held
};

// A request's TTFT, latency and TPOT (its completion_tokens set) from when it was sent, its first and
// last token-carrying reply, and its end; without such a reply (a server that does not stream) the
// tokens arrived at the end.
void set_times(Sample& sample, std::chrono::steady_clock::time_point sent,
               std::optional<std::chrono::steady_clock::time_point> first_token,
               std::optional<std::chrono::steady_clock::time_point> last_token,
               std::chrono::steady_clock::time_point done) {
  if (!first_token) first_token = last_token = done;
  auto ms = [](std::chrono::steady_clock::duration d) {
    return std::chrono::duration<double, std::milli>(d).count();
  };
  sample.ok = true;
  sample.ttft_ms = ms(*first_token - sent);
  sample.latency_ms = ms(done - sent);
  if (sample.completion_tokens > 1)
    sample.tpot_ms = ms(*last_token - *first_token) / static_cast<double>(sample.completion_tokens - 1);
}

Sample run_one(cluster::Client& client, const protocol::GenerateRequest& request) {
  using clock = std::chrono::steady_clock;
  Sample sample;
  const auto sent = clock::now();
  std::optional<clock::time_point> first_token, last_token;
  try {
    const protocol::Final final_msg = client.generate(request, [&](const protocol::Delta& delta) {
      if (delta.tokens.empty()) return;  // a text-only delta carries no new token
      const auto now = clock::now();
      if (!first_token) first_token = now;
      last_token = now;
    });
    sample.prompt_tokens = final_msg.prompt_tokens;
    sample.completion_tokens = final_msg.completion_tokens;
    set_times(sample, sent, first_token, last_token, clock::now());
    sample.draft_proposed = final_msg.draft_proposed;
    sample.draft_accepted = final_msg.draft_accepted;
    sample.cached_prompt_tokens = final_msg.cached_prompt_tokens;
  } catch (const cluster::ClientError& e) {
    sample.failure = e.code ? std::string(protocol::to_string(*e.code)) : std::string("transport");
  } catch (const std::exception&) {
    sample.failure = "transport";  // a ZeroMQ failure below the Client; counted, not fatal
  }
  return sample;
}

// The same request through `nibble openai`'s /v1/completions, streamed, the usage in its last chunk:
// TTFT is the first chunk with text, TPOT spreads the rest over the usage's completion tokens.
Sample run_one_http(httplib::Client& http, const protocol::GenerateRequest& request) {
  using clock = std::chrono::steady_clock;
  Sample sample;
  nlohmann::json body = {{"max_tokens", request.max_tokens},
                         {"temperature", request.sampling.temperature},
                         {"stream", true},
                         {"stream_options", {{"include_usage", true}}},
                         {"ignore_eos", request.ignore_eos}};
  if (const auto* ids = std::get_if<std::vector<int32_t>>(&request.prompt)) {
    body["prompt"] = *ids;
  } else {
    body["prompt"] = std::get<std::string>(request.prompt);
  }
  httplib::Request req;
  req.method = "POST";
  req.path = "/v1/completions";
  if (!request.adapter.empty()) body["model"] = request.adapter;  // vLLM: a LoRA adapter by name
  req.body = body.dump();
  req.set_header("Content-Type", "application/json");
  const auto sent = clock::now();
  std::optional<clock::time_point> first_token, last_token;
  std::string pending;
  nlohmann::json usage;
  req.content_receiver = [&](const char* data, size_t n, uint64_t, uint64_t) {
    pending.append(data, n);
    for (size_t end = pending.find("\n\n"); end != std::string::npos; end = pending.find("\n\n")) {
      const std::string event = pending.substr(0, end);
      pending.erase(0, end + 2);
      if (event.rfind("data: ", 0) != 0 || event == "data: [DONE]") continue;
      const nlohmann::json chunk = nlohmann::json::parse(event.substr(6), nullptr, false);
      if (chunk.contains("error")) {
        sample.failure = chunk["error"].value("code", "error");
      } else if (chunk.contains("usage")) {
        usage = chunk["usage"];
      } else if (chunk.contains("choices") && !chunk["choices"].empty() &&
                 !chunk["choices"][0].value("text", "").empty()) {
        last_token = clock::now();
        if (!first_token) first_token = last_token;
      }
    }
    return true;
  };
  httplib::Response res;
  httplib::Error error = httplib::Error::Success;
  if (!http.send(req, res, error) || res.status != 200) {
    sample.failure = res.status > 0 ? "http " + std::to_string(res.status) : "transport";
    return sample;
  }
  const auto done = clock::now();
  if (!sample.failure.empty() || !usage.is_object()) {
    if (sample.failure.empty()) sample.failure = "no usage";
    return sample;
  }
  sample.prompt_tokens = usage.value("prompt_tokens", 0u);
  sample.completion_tokens = usage.value("completion_tokens", 0u);
  sample.cached_prompt_tokens = usage["prompt_tokens_details"].value("cached_tokens", 0u);
  set_times(sample, sent, first_token, last_token, done);
  return sample;
}

}  // namespace

std::vector<std::pair<int32_t, float>> parse_logit_bias(const std::vector<std::string>& items) {
  static const std::regex form(R"(^\s*([0-9]+)\s*([+-]\s*[0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*$)");
  std::vector<std::pair<int32_t, float>> out;
  for (const std::string& item : items) {
    std::smatch m;
    if (!std::regex_match(item, m, form))
      throw std::invalid_argument("--logit-bias: '" + item + "' is not TOKEN_ID+BIAS or TOKEN_ID-BIAS");
    std::string amount = m[2].str();
    amount.erase(std::remove(amount.begin(), amount.end(), ' '), amount.end());
    try {
      const int32_t token = static_cast<int32_t>(std::stol(m[1].str()));
      const float bias = std::stof(amount);
      for (const auto& [t, b] : out) {
        if (t == token)
          throw std::invalid_argument("--logit-bias: token " + std::to_string(token) + " given twice");
      }
      out.emplace_back(token, bias);
    } catch (const std::out_of_range&) {
      throw std::invalid_argument("--logit-bias: '" + item + "' is out of range");
    }
  }
  return out;
}

// "1 2 3" or "1,2,3" -> ids; anything else is a usage error.
std::vector<int32_t> parse_token_list(const std::string& text) {
  std::vector<int32_t> ids;
  std::string current;
  auto flush = [&] {
    if (current.empty()) return;
    size_t used = 0;
    long long value = 0;
    try {
      value = std::stoll(current, &used);
    } catch (const std::exception&) {
      used = 0;
    }
    if (used != current.size() || value < 0 || value > INT32_MAX) {
      throw std::runtime_error("--tokens: '" + current + "' is not a token id");
    }
    ids.push_back(static_cast<int32_t>(value));
    current.clear();
  };
  for (char c : text) {
    if (c == ' ' || c == ',' || c == '\t' || c == '\n') {
      flush();
    } else {
      current += c;
    }
  }
  flush();
  if (ids.empty()) throw std::runtime_error("--tokens: no token ids in '" + text + "'");
  return ids;
}

Runner add_client(CLI::App& app) {
  struct Args {
    std::string endpoint = kDefaultEndpoint;
    std::string prompt;
    std::string tokens;
    int64_t max_tokens = 128;
    // Sampling defaults are `nibble generate`'s, so the same flags mean the same thing.
    float temperature = 0.8f;
    int top_k = 40;
    float top_p = 0.95f;
    float min_p = 0.05f;
    float repetition_penalty = 1.0f;
    float presence_penalty = 0.0f;
    float frequency_penalty = 0.0f;
    std::vector<std::string> logit_bias;
    int64_t seed = -1;
    std::vector<std::string> stop;
    bool stream = false;
    bool json = false;
    int timeout_ms = 60000;
    std::string request_id;
    bool health = false, stats = false, shutdown = false;
    int logprobs = 0;
    int prompt_logprobs = -1;
    std::string response_format = "text";
    std::string json_schema_file;
    bool special = false;
    bool ignore_eos = false;
    uint32_t min_tokens = 0;
    std::vector<int32_t> stop_token_ids;
    std::string chat, system;
    std::string tools_file, tool_choice = "auto";
    std::string grammar_file, regex;
    std::string lora;
    std::string load_lora, unload_lora;  // NAME=PATH, NAME
    float load_lora_scale = 1.0f;
  };
  auto a = std::make_shared<Args>();
  app.add_option("--endpoint,-e", a->endpoint, "Coordinator address")->capture_default_str();
  auto* prompt = app.add_option("--prompt,-p", a->prompt, "Prompt text (the server tokenizes it)");
  auto* tokens = app.add_option("--tokens", a->tokens, "Prompt as token ids, e.g. \"1 15043 3186\"");
  auto* chat = app.add_option("--chat", a->chat,
                              "A user message: the server formats the conversation with the model's chat "
                              "template");
  app.add_option("--system", a->system, "With --chat: a system message before it")->needs(chat);
  auto* tools_option =
      app.add_option("--tools", a->tools_file,
                     "With --chat: a JSON file of the functions the model may call (OpenAI's "
                     "tools array); the answer's calls are printed as JSON")
          ->check(CLI::ExistingFile)
          ->needs(chat);
  app.add_option(
         "--tool-choice", a->tool_choice,
         "With --tools: auto, none, required (a call to any of them), or a function's name (a call to it)")
      ->needs(tools_option)
      ->capture_default_str();
  prompt->excludes(tokens);
  chat->excludes(prompt);
  chat->excludes(tokens);
  app.add_option("--max-tokens,-n", a->max_tokens,
                 "Tokens to generate at most (0: score the prompt alone, with --prompt-logprobs)")
      ->check(CLI::Range(int64_t{0}, int64_t{UINT32_MAX}))
      ->capture_default_str();
  app.add_option("--temperature", a->temperature, "0 means greedy")
      ->check(CLI::NonNegativeNumber)
      ->capture_default_str();
  app.add_option("--top-k", a->top_k, "Keep the k most likely tokens (0: off)")
      ->check(CLI::NonNegativeNumber)
      ->capture_default_str();
  app.add_option("--top-p", a->top_p, "Nucleus sampling mass (1: off)")
      ->check(CLI::Range(0.0, 1.0))
      ->capture_default_str();
  app.add_option("--min-p", a->min_p, "Drop tokens below min-p times the top probability (0: off)")
      ->check(CLI::Range(0.0, 1.0))
      ->capture_default_str();
  app.add_option("--repetition-penalty,--repeat-penalty", a->repetition_penalty,
                 "Repetition penalty (1: off)")
      ->check(CLI::PositiveNumber)
      ->capture_default_str();
  app.add_option("--presence-penalty", a->presence_penalty,
                 "Subtracted from tokens of the last 64 (0: off; llama.cpp's)")
      ->check(CLI::Range(-2.0, 2.0))
      ->capture_default_str();
  app.add_option("--frequency-penalty", a->frequency_penalty,
                 "Subtracted once per occurrence in the last 64 tokens (0: off; llama.cpp's)")
      ->check(CLI::Range(-2.0, 2.0))
      ->capture_default_str();
  app.add_option("--logit-bias", a->logit_bias,
                 "TOKEN_ID+BIAS or TOKEN_ID-BIAS, e.g. 15043+1.5 (repeatable)");
  app.add_option("--seed", a->seed, "Sampling seed (default: the server picks one)");
  app.add_option("--stop", a->stop, "Stop string (repeatable)");
  app.add_flag("--stream", a->stream, "Print the text as it is generated");
  app.add_flag("--json", a->json, "Print one JSON object");
  app.add_flag("--ignore-eos", a->ignore_eos, "Generate past end-of-sequence tokens, up to --max-tokens");
  app.add_option("--min-tokens", a->min_tokens,
                 "No end-of-sequence or stop token before this many tokens (vLLM's min_tokens)")
      ->capture_default_str();
  app.add_option("--stop-token-id", a->stop_token_ids,
                 "A token id that ends the generation when sampled, kept in the output (repeatable; vLLM's "
                 "stop_token_ids)");
  app.add_flag("--special", a->special,
               "Control tokens' texts in the prompt (</s>, <|eot_id|>, ...) become those tokens");
  app.add_option("--logprobs", a->logprobs,
                 "With --json: each token's log-probability and this many most likely tokens' (0: none)")
      ->check(CLI::Range(0, static_cast<int>(protocol::kMaxLogprobs)))
      ->capture_default_str();
  app.add_option("--response-format", a->response_format,
                 "text, or json_object: the output is a JSON object (tokens that cannot continue one are "
                 "masked out)")
      ->check(CLI::IsMember({"text", "json_object"}))
      ->capture_default_str();
  app.add_option("--json-schema", a->json_schema_file,
                 "A JSON schema file: the output is an instance of it (OpenAI's response_format json_schema; "
                 "the subset in worker/json_schema.hpp)")
      ->check(CLI::ExistingFile);
  app.add_option(
         "--grammar-file", a->grammar_file,
         "A GBNF grammar file (llama.cpp's): the output is a sentence of it (worker/gbnf_grammar.hpp)")
      ->check(CLI::ExistingFile);
  app.add_option("--lora", a->lora,
                 "The LoRA adapter to answer with, by its name in the config's lora_adapters");
  app.add_option("--regex", a->regex,
                 "The output matches this regular expression whole (vLLM's guided_regex; made a grammar)");
  app.add_option("--prompt-logprobs", a->prompt_logprobs,
                 "With --json: each prompt token's log-probability after the first and this many most "
                 "likely tokens' (-1: none)")
      ->check(CLI::Range(-1, static_cast<int>(protocol::kMaxLogprobs)))
      ->capture_default_str();
  app.add_option("--timeout-ms", a->timeout_ms, "Longest wait for any one reply message")
      ->check(CLI::PositiveNumber)
      ->capture_default_str();
  app.add_option("--request-id", a->request_id, "Request id (default: a fresh unique one)");
  auto* health = app.add_flag("--health", a->health, "Ask whether the service is up (exit 1 if not ok)");
  auto* stats = app.add_flag("--stats", a->stats, "Print the service's counters");
  auto* shutdown = app.add_flag("--shutdown", a->shutdown, "Ask the service to stop");
  auto* load_lora = app.add_option("--load-lora", a->load_lora,
                                   "Serve the LoRA adapter at PATH as NAME from now on (NAME=PATH; the job's "
                                   "server.lora_updates must be on)");
  app.add_option("--load-lora-scale", a->load_lora_scale, "With --load-lora: the adapter's scale")
      ->needs(load_lora)
      ->capture_default_str();
  auto* unload_lora = app.add_option("--unload-lora", a->unload_lora, "Stop serving the LoRA adapter NAME");
  const std::vector<CLI::Option*> controls = {health, stats, shutdown, load_lora, unload_lora};
  for (CLI::Option* control : controls) {
    for (CLI::Option* other : {health, stats, shutdown, load_lora, unload_lora, prompt, tokens, chat}) {
      if (other != control) control->excludes(other);
    }
  }

  return [a]() {
    cluster::ClientOptions options;
    options.timeout_ms = a->timeout_ms;
    cluster::Client client(a->endpoint, options);

    if (a->health || a->shutdown) {
      const protocol::Health h = a->health ? client.health() : client.shutdown();
      if (a->json) {
        print_json(health_json(h));
      } else {
        std::printf("ok: %s\nworkers: %u\ndetail: %s\n", h.ok ? "true" : "false", h.workers,
                    h.detail.c_str());
      }
      return h.ok ? 0 : 1;
    }
    if (!a->load_lora.empty() || !a->unload_lora.empty()) {
      std::vector<std::string> served;
      if (!a->load_lora.empty()) {
        const size_t eq = a->load_lora.find('=');
        if (eq == std::string::npos || eq == 0 || eq + 1 == a->load_lora.size()) {
          std::fprintf(stderr, "nibble: error: --load-lora: expected NAME=PATH, got '%s'\n",
                       a->load_lora.c_str());
          return 2;
        }
        served =
            client.load_adapter(a->load_lora.substr(0, eq), a->load_lora.substr(eq + 1), a->load_lora_scale);
      } else {
        served = client.unload_adapter(a->unload_lora);
      }
      if (a->json) {
        print_json({{"adapters", served}});
      } else {
        std::string names;
        for (const std::string& name : served) names += (names.empty() ? "" : " ") + name;
        std::printf("adapters: %s\n", names.c_str());
      }
      return 0;
    }
    if (a->stats) {
      const protocol::Stats s = client.stats();
      if (a->json) {
        print_json(stats_json(s));
      } else {
        std::printf(
            "queued: %llu\nrunning: %llu\ncompleted: %llu\nfailed: %llu\nfree_kv_blocks: %llu\n"
            "total_kv_blocks: %llu\ntokens_generated: %llu\ndraft_proposed: %llu\ndraft_accepted: %llu\n"
            "prompt_tokens: %llu\ncached_prompt_tokens: %llu\ncached_kv_blocks: %llu\nadapters:",
            static_cast<unsigned long long>(s.queued), static_cast<unsigned long long>(s.running),
            static_cast<unsigned long long>(s.completed), static_cast<unsigned long long>(s.failed),
            static_cast<unsigned long long>(s.free_kv_blocks),
            static_cast<unsigned long long>(s.total_kv_blocks),
            static_cast<unsigned long long>(s.tokens_generated),
            static_cast<unsigned long long>(s.draft_proposed),
            static_cast<unsigned long long>(s.draft_accepted),
            static_cast<unsigned long long>(s.prompt_tokens),
            static_cast<unsigned long long>(s.cached_prompt_tokens),
            static_cast<unsigned long long>(s.cached_kv_blocks));
        for (const std::string& name : s.adapters) std::printf(" %s", name.c_str());
        std::printf("\n");
      }
      return 0;
    }
    if (a->prompt.empty() && a->tokens.empty() && a->chat.empty()) {
      std::fprintf(
          stderr,
          "nibble: error: client: one of --prompt, --tokens, --chat, --health, --stats, --shutdown is "
          "required\n");
      return 2;
    }

    protocol::GenerateRequest request;
    request.request_id = a->request_id;  // empty: the Client makes a unique one
    if (!a->tokens.empty()) {
      request.prompt = parse_token_list(a->tokens);
    } else if (!a->chat.empty()) {
      std::vector<protocol::ChatMessage> messages;
      if (!a->system.empty()) messages.push_back({"system", a->system});
      messages.push_back({"user", a->chat});
      request.prompt = std::move(messages);
    } else {
      request.prompt = a->prompt;
    }
    request.sampling.temperature = a->temperature;
    request.sampling.top_k = a->top_k;
    request.sampling.top_p = a->top_p;
    request.sampling.min_p = a->min_p;
    request.sampling.repetition_penalty = a->repetition_penalty;
    request.sampling.presence_penalty = a->presence_penalty;
    request.sampling.frequency_penalty = a->frequency_penalty;
    for (const auto& [token, bias] : parse_logit_bias(a->logit_bias))
      request.sampling.logit_bias.push_back({token, bias});
    if (a->seed >= 0) request.sampling.seed = static_cast<uint64_t>(a->seed);
    request.max_tokens = static_cast<uint32_t>(a->max_tokens);
    request.stop = a->stop;
    request.stream = a->stream;
    request.logprobs = static_cast<uint32_t>(a->logprobs);
    request.prompt_logprobs = a->prompt_logprobs;
    request.response_format = a->response_format == "json_object" ? protocol::ResponseFormat::json_object
                                                                  : protocol::ResponseFormat::text;
    if (!a->json_schema_file.empty()) {
      std::ifstream in(a->json_schema_file);
      request.json_schema.assign(std::istreambuf_iterator<char>(in), {});
      request.response_format = protocol::ResponseFormat::json_schema;
    }
    request.adapter = a->lora;
    if (!a->grammar_file.empty()) {
      std::ifstream in(a->grammar_file);
      request.grammar.assign(std::istreambuf_iterator<char>(in), {});
      request.response_format = protocol::ResponseFormat::grammar;
    }
    if (!a->regex.empty()) {
      request.grammar = worker::Grammar::regex_text(a->regex);
      request.response_format = protocol::ResponseFormat::grammar;
    }
    request.parse_special = a->special;
    request.ignore_eos = a->ignore_eos;
    request.min_tokens = a->min_tokens;
    request.stop_token_ids = a->stop_token_ids;
    if (!a->tools_file.empty()) {
      std::ifstream in(a->tools_file);
      request.tools.assign(std::istreambuf_iterator<char>(in), {});
      if (a->tool_choice == "auto") {
        request.tool_choice = protocol::ToolChoice::auto_;
      } else if (a->tool_choice == "none") {
        request.tool_choice = protocol::ToolChoice::none;
      } else if (a->tool_choice == "required") {
        request.tool_choice = protocol::ToolChoice::required;
      } else {
        request.tool_choice = protocol::ToolChoice::function;
        request.tool_choice_function = a->tool_choice;
      }
    }

    const bool print_deltas = a->stream && !a->json;
    bool printed = false;
    protocol::Final result;
    try {
      result = client.generate(request, [&](const protocol::Delta& delta) {
        if (!print_deltas) return;
        std::fwrite(delta.text.data(), 1, delta.text.size(), stdout);
        std::fflush(stdout);
        printed = true;
      });
    } catch (const cluster::ClientError&) {
      if (printed) std::fputc('\n', stdout);  // end the partial line before main() reports the error
      std::fflush(stdout);
      throw;
    }
    // Calls as OpenAI writes a message's tool_calls.
    nlohmann::json calls = nlohmann::json::array();
    for (const protocol::ToolCall& c : result.tool_calls)
      calls.push_back(
          {{"id", c.id}, {"type", "function"}, {"function", {{"name", c.name}, {"arguments", c.arguments}}}});
    if (!a->json) {
      if (!print_deltas) std::fwrite(result.text.data(), 1, result.text.size(), stdout);
      if (!calls.empty()) std::printf("%s%s", result.text.empty() ? "" : "\n", calls.dump().c_str());
      std::fputc('\n', stdout);
      return 0;
    }
    nlohmann::json out;
    out["request_id"] = result.request_id;
    out["prompt_tokens"] = result.prompt_token_ids;
    out["cached_prompt_tokens"] = result.cached_prompt_tokens;
    out["tokens"] = result.tokens;
    out["text"] = result.text;
    out["finish_reason"] = protocol::to_string(result.finish_reason);
    if (!calls.empty()) out["tool_calls"] = calls;
    // One per token: its log-probability and the most likely tokens'.
    const auto logprobs_json = [](const std::vector<protocol::TokenLogprob>& values,
                                  std::span<const int32_t> ids) {
      nlohmann::json logprobs = nlohmann::json::array();
      for (size_t i = 0; i < values.size(); ++i) {
        nlohmann::json top = nlohmann::json::array();
        for (const protocol::TopLogprob& t : values[i].top)
          top.push_back({{"token", t.token}, {"logprob", t.logprob}});
        logprobs.push_back(
            {{"token", i < ids.size() ? ids[i] : -1}, {"logprob", values[i].logprob}, {"top", top}});
      }
      return logprobs;
    };
    if (request.logprobs > 0) out["logprobs"] = logprobs_json(result.logprobs, result.tokens);
    if (request.prompt_logprobs >= 0) {  // the prompt's tokens after the first
      out["prompt_logprobs"] = logprobs_json(
          result.prompt_logprobs, std::span<const int32_t>(result.prompt_token_ids)
                                      .subspan(std::min<size_t>(1, result.prompt_token_ids.size())));
    }
    out["speculative"] = {{"draft_proposed", result.draft_proposed},
                          {"draft_accepted", result.draft_accepted}};
    out["timings"] = {
        {"queue_ms", result.timings.queue_ms},
        {"prefill_ms", result.timings.prefill_ms},
        {"decode_ms", result.timings.decode_ms},
    };
    print_json(out);
    return 0;
  };
}

Runner add_bench_serve(CLI::App& app) {
  struct Args {
    std::string endpoint = kDefaultEndpoint;
    int concurrency = 1;
    int requests = 16;
    std::string prompt_tokens = "16:128";
    std::string max_tokens = "16:64";
    std::string prompt;
    int shared_prefix = 0;
    uint64_t seed = 0;
    int vocab = 256;
    bool json = false;
    int timeout_ms = 60000;
    std::string http;
    bool ignore_eos = false;
    std::vector<std::string> loras;
  };
  auto a = std::make_shared<Args>();
  app.add_option("--endpoint,-e", a->endpoint, "Coordinator address")->capture_default_str();
  app.add_option("--lora", a->loras,
                 "LoRA adapters by name, comma-separated: request i asks for adapter i mod their count "
                 "(\"-\": the base model), so steps batch several (vLLM's multi-LoRA benchmark)")
      ->delimiter(',');
  app.add_flag("--ignore-eos", a->ignore_eos,
               "Every request generates its whole drawn length (end-of-sequence tokens do not end it), as "
               "vLLM's benchmark does");
  app.add_option(
      "--http", a->http,
      "Load `nibble openai` at this URL (http://HOST:PORT, /v1/completions streamed) instead of the "
      "coordinator");
  app.add_option("--concurrency,-c", a->concurrency, "Client threads, one request in flight each")
      ->check(CLI::PositiveNumber)
      ->capture_default_str();
  app.add_option("--requests,-r", a->requests, "Requests in all")
      ->check(CLI::PositiveNumber)
      ->capture_default_str();
  app.add_option("--prompt-tokens", a->prompt_tokens, "Random prompt length range MIN:MAX")
      ->capture_default_str();
  app.add_option("--max-tokens", a->max_tokens, "Generation length range MIN:MAX")->capture_default_str();
  app.add_option("--prompt", a->prompt, "Send this text as every prompt instead of random token ids");
  app.add_option("--shared-prefix", a->shared_prefix,
                 "Random prompts begin with the same this many token ids (a system prompt), then their "
                 "--prompt-tokens")
      ->check(CLI::NonNegativeNumber)
      ->capture_default_str();
  app.add_option("--seed", a->seed, "Seed of the prompts and lengths")->capture_default_str();
  app.add_option("--vocab", a->vocab, "Random prompt ids are drawn from [3, vocab)")
      ->check(CLI::Range(4, INT32_MAX))
      ->capture_default_str();
  app.add_flag("--json", a->json, "Print one JSON object");
  app.add_option("--timeout-ms", a->timeout_ms, "Longest wait for any one reply message")
      ->check(CLI::PositiveNumber)
      ->capture_default_str();

  return [a]() {
    const Range prompt_range = parse_range("--prompt-tokens", a->prompt_tokens);
    const Range max_range = parse_range("--max-tokens", a->max_tokens);

    // The whole workload is drawn up front from the seed, so it does not depend on thread timing.
    std::mt19937_64 rng(a->seed);
    if (a->shared_prefix > 0 && !a->prompt.empty())
      throw std::invalid_argument("bench-serve: --shared-prefix applies to random prompts, not --prompt");
    std::vector<int32_t> prefix(static_cast<size_t>(a->shared_prefix));
    for (auto& id : prefix) id = static_cast<int32_t>(draw(rng, 3, a->vocab - 1));
    std::vector<protocol::GenerateRequest> requests(static_cast<size_t>(a->requests));
    for (auto& request : requests) {
      if (!a->prompt.empty()) {
        request.prompt = a->prompt;
      } else {
        std::vector<int32_t> ids = prefix;
        const int64_t own = draw(rng, prompt_range.lo, prompt_range.hi);
        for (int64_t t = 0; t < own; ++t) ids.push_back(static_cast<int32_t>(draw(rng, 3, a->vocab - 1)));
        request.prompt = std::move(ids);
      }
      request.max_tokens = static_cast<uint32_t>(draw(rng, max_range.lo, max_range.hi));
      request.sampling.temperature = 0.0f;  // greedy: the same run does the same work
      request.stream = true;
      request.ignore_eos = a->ignore_eos;
      if (!a->loras.empty()) {
        const std::string& name = a->loras[static_cast<size_t>(&request - requests.data()) % a->loras.size()];
        request.adapter = name == "-" ? "" : name;
      }
      // request_id stays empty: each Client makes unique ones, so parallel benches do not collide.
    }

    const int threads = std::min(a->concurrency, a->requests);
    cluster::ClientOptions options;
    options.timeout_ms = a->timeout_ms;
    // Made here so a bad endpoint fails before any thread starts; each is then used by one thread.
    std::vector<std::unique_ptr<cluster::Client>> clients;
    std::vector<std::unique_ptr<httplib::Client>> http_clients;
    for (int t = 0; t < threads; ++t) {
      if (a->http.empty()) {
        clients.push_back(std::make_unique<cluster::Client>(a->endpoint, options));
        continue;
      }
      auto http = std::make_unique<httplib::Client>(a->http);
      if (!http->is_valid())
        throw std::invalid_argument("bench-serve: --http: not an http://HOST:PORT URL: " + a->http);
      http->set_read_timeout(std::chrono::milliseconds(a->timeout_ms));
      http_clients.push_back(std::move(http));
    }
    const std::string target = a->http.empty() ? a->endpoint : a->http;

    std::vector<Sample> samples(requests.size());
    std::atomic<size_t> next{0};
    const auto start = std::chrono::steady_clock::now();
    std::vector<std::thread> workers;
    for (int t = 0; t < threads; ++t) {
      workers.emplace_back([&, t] {
        for (size_t i = next.fetch_add(1); i < requests.size(); i = next.fetch_add(1)) {
          const auto at = static_cast<size_t>(t);
          samples[i] = a->http.empty() ? run_one(*clients[at], requests[i])
                                       : run_one_http(*http_clients[at], requests[i]);
        }
      });
    }
    for (auto& worker : workers) worker.join();
    const double wall_s = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();

    std::vector<double> ttft, tpot, latency;
    std::map<std::string, int> failures;
    uint64_t ok = 0, output_tokens = 0, input_tokens = 0, draft_proposed = 0, draft_accepted = 0,
             cached_tokens = 0;
    for (const Sample& s : samples) {
      if (!s.ok) {
        ++failures[s.failure];
        continue;
      }
      ++ok;
      output_tokens += s.completion_tokens;
      input_tokens += s.prompt_tokens;
      draft_proposed += s.draft_proposed;
      draft_accepted += s.draft_accepted;
      cached_tokens += s.cached_prompt_tokens;
      ttft.push_back(s.ttft_ms);
      latency.push_back(s.latency_ms);
      if (s.tpot_ms) tpot.push_back(*s.tpot_ms);
    }
    const uint64_t failed = samples.size() - ok;
    const double tokens_per_s = wall_s > 0 ? static_cast<double>(output_tokens) / wall_s : 0.0;
    const double requests_per_s = wall_s > 0 ? static_cast<double>(ok) / wall_s : 0.0;

    if (a->json) {
      nlohmann::json failure_codes = nlohmann::json::object();
      for (const auto& [code, count] : failures) failure_codes[code] = count;
      print_json({
          {"endpoint", target},
          {"concurrency", threads},
          {"requests", a->requests},
          {"ok", ok},
          {"failed", failed},
          {"failures", failure_codes},
          {"input_tokens", input_tokens},
          {"cached_prompt_tokens", cached_tokens},
          {"output_tokens", output_tokens},
          {"draft_proposed", draft_proposed},
          {"draft_accepted", draft_accepted},
          {"wall_s", wall_s},
          {"output_tokens_per_second", tokens_per_s},
          {"requests_per_second", requests_per_s},
          {"ttft_ms",
           {{"p50", json_or_null(percentile(ttft, 50))},
            {"p90", json_or_null(percentile(ttft, 90))},
            {"p99", json_or_null(percentile(ttft, 99))}}},
          {"tpot_ms",
           {{"p50", json_or_null(percentile(tpot, 50))},
            {"p90", json_or_null(percentile(tpot, 90))},
            {"p99", json_or_null(percentile(tpot, 99))}}},
          {"latency_ms",
           {{"p50", json_or_null(percentile(latency, 50))}, {"p99", json_or_null(percentile(latency, 99))}}},
      });
    } else {
      std::printf("endpoint %s, concurrency %d, %d requests in %.2f s\n", target.c_str(), threads,
                  a->requests, wall_s);
      std::printf("requests ok %llu, failed %llu\n", static_cast<unsigned long long>(ok),
                  static_cast<unsigned long long>(failed));
      if (!failures.empty()) {
        std::string list;
        for (const auto& [code, count] : failures) {
          list += (list.empty() ? "" : ", ") + code + " x" + std::to_string(count);
        }
        std::printf("failures: %s\n", list.c_str());
      }
      std::printf("output tokens %llu (input %llu, of which %llu from the prefix cache)\n",
                  static_cast<unsigned long long>(output_tokens),
                  static_cast<unsigned long long>(input_tokens),
                  static_cast<unsigned long long>(cached_tokens));
      std::printf("throughput %.2f output tokens/s, %.2f requests/s\n", tokens_per_s, requests_per_s);
      if (draft_proposed > 0) {
        std::printf("speculative: %llu drafts proposed, %llu accepted (%.1f%%)\n",
                    static_cast<unsigned long long>(draft_proposed),
                    static_cast<unsigned long long>(draft_accepted),
                    100.0 * static_cast<double>(draft_accepted) / static_cast<double>(draft_proposed));
      }
      std::printf("TTFT ms     p50 %s  p90 %s  p99 %s\n", text_or_na(percentile(ttft, 50)).c_str(),
                  text_or_na(percentile(ttft, 90)).c_str(), text_or_na(percentile(ttft, 99)).c_str());
      std::printf("TPOT ms     p50 %s  p90 %s  p99 %s\n", text_or_na(percentile(tpot, 50)).c_str(),
                  text_or_na(percentile(tpot, 90)).c_str(), text_or_na(percentile(tpot, 99)).c_str());
      std::printf("latency ms  p50 %s  p99 %s\n", text_or_na(percentile(latency, 50)).c_str(),
                  text_or_na(percentile(latency, 99)).c_str());
    }
    return failed == 0 ? 0 : 1;
  };
}

}  // namespace nibble::cli
