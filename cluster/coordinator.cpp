#include "cluster/coordinator.hpp"

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <random>
#include <stdexcept>
#include <thread>

#include "cluster/sampling_settings.hpp"
#include "worker/gbnf_grammar.hpp"
#include "worker/json_schema.hpp"
#include "worker/json_schema_grammar.hpp"
#include "worker/sampler.hpp"

namespace nibble::cluster {

namespace {

std::atomic<bool> g_abort{false};

// The job is losing (or has lost) a worker: fail every open request and stop.
struct WorkerLost : std::runtime_error {
  using std::runtime_error::runtime_error;
};

double ms_between(std::chrono::steady_clock::time_point a, std::chrono::steady_clock::time_point b) {
  return std::chrono::duration<double, std::milli>(b - a).count();
}

protocol::FinishReason to_protocol(worker::FinishReason reason) {
  switch (reason) {
    case worker::FinishReason::eos:
      return protocol::FinishReason::eos;
    case worker::FinishReason::stop:
      return protocol::FinishReason::stop;
    case worker::FinishReason::length:
      break;
  }
  return protocol::FinishReason::length;
}

std::span<const uint8_t> bytes_of(const zmq::message_t& m) {
  return {static_cast<const uint8_t*>(m.data()), m.size()};
}

}  // namespace

void Coordinator::request_abort() { g_abort.store(true); }

Coordinator::Coordinator(const ClusterConfig& config, const model::Tokenizer& tokenizer,
                         const model::LlamaConfig& model, const SchedulerConfig& scheduler,
                         CoordinatorSockets sockets, std::string layout_description, CoordinatorChat chat)
    : config_(config),
      tokenizer_(tokenizer),
      chat_(std::move(chat)),
      model_(model),
      scheduler_(scheduler),
      sockets_(std::move(sockets)),
      layout_description_(std::move(layout_description)) {
  for (const LoraAdapterConfig& adapter : config_.lora_adapters) {
    AdapterSlot slot;
    slot.state = AdapterSlot::State::ready;
    slot.name = adapter.name;
    slot.cache_root = next_cache_root_++;
    adapters_.push_back(std::move(slot));
  }
}

std::vector<std::string> Coordinator::served_adapters() const {
  std::vector<std::string> names;
  for (const AdapterSlot& slot : adapters_)
    if (slot.state == AdapterSlot::State::ready) names.push_back(slot.name);
  return names;
}

void Coordinator::handle_load_adapter(const std::string& identity,
                                      const protocol::LoadAdapterRequest& request) {
  using protocol::ErrorCode;
  if (!config_.server.lora_updates) {
    reply_error(identity, request.request_id, ErrorCode::bad_request,
                "loadAdapter: this service does not load LoRA adapters while it runs (server.lora_updates "
                "is off in its config)");
    return;
  }
  if (shutting_down_) {
    reply_error(identity, request.request_id, ErrorCode::shutting_down, "the service is shutting down");
    return;
  }
  for (const AdapterSlot& slot : adapters_) {
    if ((slot.state == AdapterSlot::State::ready || slot.state == AdapterSlot::State::loading) &&
        slot.name == request.name) {
      reply_error(identity, request.request_id, ErrorCode::bad_request,
                  "name: the LoRA adapter '" + request.name + "' " +
                      (slot.state == AdapterSlot::State::ready ? "is already loaded" : "is being loaded"));
      return;
    }
  }
  auto free = std::find_if(adapters_.begin(), adapters_.end(),
                           [](const AdapterSlot& s) { return s.state == AdapterSlot::State::free; });
  if (free == adapters_.end()) free = adapters_.insert(adapters_.end(), AdapterSlot{});
  AdapterSlot& slot = *free;
  slot = AdapterSlot{};
  slot.state = AdapterSlot::State::loading;
  slot.name = request.name;
  slot.identity = identity;
  slot.request_id = request.request_id;
  slot.reports_due = sockets_.workers.size();
  const auto index = static_cast<int32_t>(free - adapters_.begin()) + 1;
  // A step of its own, with no entries: ahead, on every worker's queue, of any step that names it.
  protocol::WorkerStep load;
  load.adapter_changes.push_back({index, request.path, request.scale});
  send_to_workers(load);
}

void Coordinator::handle_adapter_reports(const std::vector<protocol::AdapterReport>& reports) {
  for (const protocol::AdapterReport& report : reports) {
    if (report.slot < 1 || static_cast<size_t>(report.slot) > adapters_.size()) continue;
    AdapterSlot& slot = adapters_[static_cast<size_t>(report.slot - 1)];
    if (slot.state != AdapterSlot::State::loading || slot.reports_due == 0) continue;
    if (!report.error.empty() && slot.error.empty())
      slot.error = report.error + " (worker rank " + std::to_string(report.rank) + ")";
    if (--slot.reports_due > 0) continue;
    if (!slot.error.empty()) {
      const std::string identity = slot.identity, request_id = slot.request_id, error = slot.error;
      empty_adapter_slot(report.slot);  // the workers that did load it drop it
      reply_error(identity, request_id, protocol::ErrorCode::bad_request, "path: " + error);
      continue;
    }
    slot.state = AdapterSlot::State::ready;
    slot.cache_root = next_cache_root_++;
    reply(slot.identity, protocol::Adapters{slot.request_id, served_adapters()});
    slot.identity.clear();
    slot.request_id.clear();
  }
}

void Coordinator::handle_unload_adapter(const std::string& identity,
                                        const protocol::UnloadAdapterRequest& request) {
  if (!config_.server.lora_updates) {
    reply_error(
        identity, request.request_id, protocol::ErrorCode::bad_request,
        "unloadAdapter: this service does not unload LoRA adapters while it runs (server.lora_updates "
        "is off in its config)");
    return;
  }
  const auto it = std::find_if(adapters_.begin(), adapters_.end(), [&](const AdapterSlot& s) {
    return s.state == AdapterSlot::State::ready && s.name == request.name;
  });
  if (it == adapters_.end()) {
    reply_error(identity, request.request_id, protocol::ErrorCode::not_found,
                "name: the LoRA adapter '" + request.name + "' is not loaded");
    return;
  }
  it->state = AdapterSlot::State::draining;
  if (it->users == 0) empty_adapter_slot(static_cast<int32_t>(it - adapters_.begin()) + 1);
  reply(identity, protocol::Adapters{request.request_id, served_adapters()});
}

void Coordinator::release_adapter(int32_t slot) {
  if (slot == 0) return;
  AdapterSlot& s = adapters_[static_cast<size_t>(slot - 1)];
  if (--s.users == 0 && s.state == AdapterSlot::State::draining) empty_adapter_slot(slot);
}

void Coordinator::empty_adapter_slot(int32_t slot) {
  protocol::WorkerStep unload;
  unload.adapter_changes.push_back({slot, "", 1.0f});
  send_to_workers(unload);
  adapters_[static_cast<size_t>(slot - 1)] = AdapterSlot{};
}

void Coordinator::reply(const std::string& identity, const protocol::ServerResponseMsg& message) {
  const std::vector<uint8_t> bytes = protocol::encode(message);
  // A client that went away is not an error: ROUTER drops messages for unknown identities.
  sockets_.clients->send(zmq::buffer(identity), zmq::send_flags::sndmore);
  sockets_.clients->send(zmq::buffer(bytes), zmq::send_flags::none);
}

void Coordinator::reply_error(const std::string& identity, const std::string& request_id,
                              protocol::ErrorCode code, const std::string& message) {
  reply(identity, protocol::Error{request_id, code, message});
}

void Coordinator::end_request(uint64_t seq, protocol::ErrorCode code, const std::string& message) {
  const auto it = requests_.find(seq);
  if (it == requests_.end()) return;
  reply_error(it->second.identity, it->second.request_id, code, message);
  if (scheduler_.cancel(seq)) released_.push_back(seq);
  by_id_.erase({it->second.identity, it->second.request_id});
  const int32_t adapter = it->second.adapter;
  requests_.erase(it);
  ++failed_;
  release_adapter(adapter);
}

void Coordinator::fail_all(protocol::ErrorCode code, const std::string& message) {
  std::vector<uint64_t> open;
  for (const auto& [seq, request] : requests_) open.push_back(seq);
  for (uint64_t seq : open) end_request(seq, code, message);
  // Adapter loads still waiting for the workers get the same answer.
  for (AdapterSlot& slot : adapters_) {
    if (slot.state != AdapterSlot::State::loading || slot.identity.empty()) continue;
    reply_error(slot.identity, slot.request_id, code, message);
    slot.identity.clear();
  }
}

protocol::Stats Coordinator::stats() const {
  protocol::Stats s;
  s.queued = static_cast<uint64_t>(scheduler_.waiting());
  s.running = static_cast<uint64_t>(scheduler_.running());
  s.completed = completed_;
  s.failed = failed_;
  s.free_kv_blocks = static_cast<uint64_t>(scheduler_.free_blocks());
  s.total_kv_blocks = static_cast<uint64_t>(scheduler_.total_blocks());
  s.tokens_generated = tokens_generated_;
  s.draft_proposed = draft_proposed_;
  s.draft_accepted = draft_accepted_;
  s.prompt_tokens = prompt_tokens_;
  s.cached_prompt_tokens = cached_prompt_tokens_;
  s.cached_kv_blocks = static_cast<uint64_t>(scheduler_.idle_cached_blocks());
  s.adapters = served_adapters();
  return s;
}

void Coordinator::handle_client_message() {
  std::vector<zmq::message_t> parts;
  for (;;) {
    zmq::message_t part;
    if (!sockets_.clients->recv(part, zmq::recv_flags::dontwait)) break;
    const bool more = part.more();
    parts.push_back(std::move(part));
    if (!more) break;
  }
  if (parts.empty()) return;
  const std::string identity = parts[0].to_string();
  if (parts.size() != 2) {
    reply_error(identity, "", protocol::ErrorCode::malformed_message,
                "expected one frame per request, got " + std::to_string(parts.size() - 1));
    return;
  }
  protocol::ClientRequestMsg message;
  try {
    protocol::DecodeLimits limits;
    limits.max_message_bytes = static_cast<size_t>(config_.server.max_message_bytes);
    message = protocol::decode_client_request(bytes_of(parts[1]), limits);
  } catch (const protocol::ProtocolError& e) {
    reply_error(identity, "", e.code, e.what());
    return;
  }
  if (const auto* generate = std::get_if<protocol::GenerateRequest>(&message)) {
    handle_generate(identity, *generate);
  } else if (const auto* cancel = std::get_if<protocol::CancelRequest>(&message)) {
    const auto it = by_id_.find({identity, cancel->request_id});
    if (it != by_id_.end())
      end_request(it->second, protocol::ErrorCode::cancelled, "cancelled by the client");
  } else if (std::holds_alternative<protocol::HealthRequest>(message)) {
    reply(identity, protocol::Health{!shutting_down_, static_cast<uint32_t>(sockets_.workers.size()),
                                     shutting_down_ ? "shutting down" : layout_description_});
  } else if (std::holds_alternative<protocol::StatsRequest>(message)) {
    reply(identity, stats());
  } else if (const auto* load = std::get_if<protocol::LoadAdapterRequest>(&message)) {
    handle_load_adapter(identity, *load);
  } else if (const auto* unload = std::get_if<protocol::UnloadAdapterRequest>(&message)) {
    handle_unload_adapter(identity, *unload);
  } else if (std::holds_alternative<protocol::ShutdownRequest>(message)) {
    shutting_down_ = true;
    reply(identity, protocol::Health{true, static_cast<uint32_t>(sockets_.workers.size()), "shutting down"});
  }
}

void Coordinator::handle_generate(const std::string& identity, const protocol::GenerateRequest& g) {
  using protocol::ErrorCode;
  if (shutting_down_) {
    reply_error(identity, g.request_id, ErrorCode::shutting_down, "the service is shutting down");
    return;
  }
  if (by_id_.count({identity, g.request_id}) != 0) {
    reply_error(identity, g.request_id, ErrorCode::bad_request,
                "request_id: '" + g.request_id + "' is already in use by this client");
    return;
  }
  std::vector<int32_t> prompt;
  // A required call is an instance of the call schema its tools give.
  protocol::ResponseFormat response_format = g.response_format;
  std::string json_schema = g.json_schema;
  std::string grammar = g.grammar;
  bool call_required = false;
  const model::ToolPrompt* answer_tools = nullptr;
  if (const auto* text = std::get_if<std::string>(&g.prompt)) {
    prompt = tokenizer_.encode(*text, tokenizer_.add_bos_default(), g.parse_special);
  } else if (const auto* messages = std::get_if<std::vector<protocol::ChatMessage>>(&g.prompt)) {
    if (!chat_.format) {
      reply_error(identity, g.request_id, ErrorCode::bad_request, "prompt.messages: " + chat_.missing);
      return;
    }
    std::vector<model::ChatMessage> chat;
    bool tool_turns = false;
    for (const protocol::ChatMessage& m : *messages) {
      model::ChatMessage message{m.role, m.content};
      for (const protocol::ToolCall& c : m.tool_calls)
        message.tool_calls.push_back({c.id, c.name, c.arguments});
      tool_turns = tool_turns || !m.tool_calls.empty() || m.role == "tool";
      chat.push_back(std::move(message));
    }
    std::string formatted;
    if (g.tools.empty() && !tool_turns) {
      formatted = model::format_chat(*chat_.format, chat, /*add_assistant=*/true);
    } else if (!chat_.tools) {
      reply_error(identity, g.request_id, ErrorCode::bad_request,
                  std::string(g.tools.empty() ? "prompt.messages: tool calls and results" : "tools") +
                      ": the chat format " + model::chat_format_name(*chat_.format) +
                      " has no function-calling form in Nibble (llama3 and chatml have)");
      return;
    } else {
      try {
        const std::vector<model::ToolDefinition> tools =
            g.tools.empty() ? std::vector<model::ToolDefinition>{} : model::parse_tools(g.tools);
        model::ToolPrompt prompt_form = *chat_.tools;
        if (prompt_form.dated_by_clock) prompt_form.date = model::today_date();
        formatted = model::format_chat_with_tools(prompt_form, chat, tools, /*add_assistant=*/true);
        if (!tools.empty() && g.tool_choice != protocol::ToolChoice::none) answer_tools = &*chat_.tools;
        if (g.tool_choice == protocol::ToolChoice::required ||
            g.tool_choice == protocol::ToolChoice::function) {
          json_schema = model::required_call_schema(*chat_.tools, tools,
                                                    g.tool_choice == protocol::ToolChoice::function
                                                        ? std::optional(g.tool_choice_function)
                                                        : std::nullopt);
          response_format = protocol::ResponseFormat::json_schema;
          call_required = true;  // the call schema is compiled below, with the request's own
        }
      } catch (const std::invalid_argument& e) {
        reply_error(identity, g.request_id, ErrorCode::bad_request, e.what());
        return;
      }
    }
    // The formatted text holds the template's special tokens' texts: parsed as tokens (as llama.cpp's
    // server does), BOS as the vocabulary says.
    prompt = tokenizer_.encode(formatted, tokenizer_.add_bos_default(), /*parse_special=*/true);
  } else {
    prompt = std::get<std::vector<int32_t>>(g.prompt);
    for (int32_t id : prompt) {
      if (id < 0 || id >= model_.n_vocab) {
        reply_error(identity, g.request_id, ErrorCode::bad_request,
                    "prompt: token id " + std::to_string(id) + " is outside the vocabulary of " +
                        std::to_string(model_.n_vocab));
        return;
      }
    }
  }
  if (prompt.empty()) {
    reply_error(identity, g.request_id, ErrorCode::bad_request, "prompt: empty");
    return;
  }
  worker::SamplingParams params;
  params.temperature = g.sampling.temperature;
  params.top_k = g.sampling.top_k;
  params.top_p = g.sampling.top_p;
  params.min_p = g.sampling.min_p;
  params.repetition_penalty = g.sampling.repetition_penalty;
  params.presence_penalty = g.sampling.presence_penalty;
  params.frequency_penalty = g.sampling.frequency_penalty;
  for (const protocol::TokenBias& b : g.sampling.logit_bias) {
    if (b.token >= tokenizer_.n_vocab()) {
      reply_error(identity, g.request_id, ErrorCode::bad_request,
                  "sampling.logitBias: token " + std::to_string(b.token) + " is outside the vocabulary of " +
                      std::to_string(tokenizer_.n_vocab()) + " tokens");
      return;
    }
    params.logit_bias.push_back({b.token, b.bias});
  }
  for (const int32_t t : g.stop_token_ids) {
    if (t >= model_.n_vocab) {
      reply_error(identity, g.request_id, ErrorCode::bad_request,
                  "stopTokenIds: token " + std::to_string(t) + " is outside the vocabulary of " +
                      std::to_string(model_.n_vocab));
      return;
    }
  }
  if (g.response_format == protocol::ResponseFormat::grammar) {
    try {
      worker::Grammar::compile(g.grammar);  // what the sampling worker will follow
    } catch (const std::invalid_argument& e) {
      reply_error(identity, g.request_id, ErrorCode::bad_request, e.what());
      return;
    }
  }
  if (response_format == protocol::ResponseFormat::json_schema) {
    try {
      // What the sampling worker will follow: the recognizer's table, or the schema's grammar.
      const worker::SchemaConstraint constraint = worker::constrain_to_schema(json_schema);
      if (constraint.schema == nullptr) {
        response_format = protocol::ResponseFormat::grammar;
        grammar = constraint.grammar;
        json_schema.clear();
      }
    } catch (const std::invalid_argument& e) {
      // A called function's parameters the structured output cannot follow: named as the tools'.
      const std::string what = e.what();
      reply_error(identity, g.request_id, ErrorCode::bad_request,
                  call_required ? "tools: the called function's parameters: " + what : what);
      return;
    }
  }
  params.seed = g.sampling.seed.has_value() ? *g.sampling.seed : std::random_device{}();
  try {
    worker::validate(params);
  } catch (const std::invalid_argument& e) {
    reply_error(identity, g.request_id, ErrorCode::bad_request, e.what());
    return;
  }

  // The LoRA adapter, by name: its slot (and the prefix cache's key for it).
  int32_t adapter = 0, cache_root = 0;
  if (!g.adapter.empty()) {
    const auto it = std::find_if(adapters_.begin(), adapters_.end(), [&](const AdapterSlot& a) {
      return a.state == AdapterSlot::State::ready && a.name == g.adapter;
    });
    if (it == adapters_.end()) {
      std::string names;
      for (const std::string& name : served_adapters()) names += (names.empty() ? "" : ", ") + name;
      reply_error(
          identity, g.request_id, ErrorCode::not_found,
          "adapter: '" + g.adapter + "' is not served" +
              (names.empty() ? std::string(" (this service has no LoRA adapters)") : "; served: " + names));
      return;
    }
    adapter = static_cast<int32_t>(it - adapters_.begin()) + 1;
    cache_root = it->cache_root;
  }

  const uint64_t seq = next_seq_++;
  // Scoring alone (max_tokens 0) still runs the step that would sample: its token is dropped. Prompt
  // logprobs need every prompt row computed, so such a request starts after no cached prefix.
  const bool scores_prompt = g.prompt_logprobs >= 0;
  const Admission admission = scheduler_.submit(
      seq, prompt, static_cast<int32_t>(scores_prompt ? std::max<uint32_t>(g.max_tokens, 1) : g.max_tokens),
      /*reuse_prefix=*/!scores_prompt, cache_root);
  switch (admission) {
    case Admission::accepted:
      break;
    case Admission::overloaded:
      reply_error(
          identity, g.request_id, ErrorCode::overloaded,
          "the queue is full (" + std::to_string(config_.server.max_queue) + " requests); retry later");
      return;
    case Admission::too_long:
      reply_error(identity, g.request_id, ErrorCode::prompt_too_long,
                  "prompt of " + std::to_string(prompt.size()) + " tokens plus max_tokens " +
                      std::to_string(g.max_tokens) + " exceeds the context of " +
                      std::to_string(std::min<int64_t>(
                          config_.context, scheduler_.total_blocks() * config_.kv_cache.block_size)) +
                      " tokens");
      return;
    case Admission::invalid:
      reply_error(identity, g.request_id, ErrorCode::bad_request, "max_tokens: must be at least 1");
      return;
  }
  Request r;
  r.identity = identity;
  r.request_id = g.request_id;
  r.stream = g.stream;
  r.prompt = prompt;
  r.adapter = adapter;
  r.sampling = to_sequence_sampling(seq, params);
  r.sampling.logprobs = g.logprobs;
  r.sampling.prompt_logprobs = g.prompt_logprobs;
  r.sampling.response_format = response_format;
  r.sampling.json_schema = json_schema;
  r.sampling.grammar = grammar;
  r.tools = answer_tools;
  r.call_required = answer_tools != nullptr && call_required;
  r.sampling.min_tokens = g.min_tokens;
  r.sampling.stop_token_ids = g.stop_token_ids;
  if (scores_prompt) r.prompt_logprobs.resize(prompt.size() - 1);
  r.score_only = g.max_tokens == 0;
  worker::CompletionLimits limits;
  limits.max_tokens = static_cast<int32_t>(g.max_tokens);
  limits.stop = g.stop;
  limits.ignore_eos = g.ignore_eos;
  limits.stop_token_ids = g.stop_token_ids;
  r.completion = std::make_unique<worker::Completion>(tokenizer_, limits);
  r.arrived = Clock::now();
  by_id_[{identity, g.request_id}] = seq;
  requests_.emplace(seq, std::move(r));
  if (adapter != 0) ++adapters_[static_cast<size_t>(adapter - 1)].users;
}

bool Coordinator::dispatch_step() {
  std::optional<StepPlan> plan = scheduler_.next_step();
  if (!plan) return false;
  protocol::WorkerStep step;
  step.step_id = next_step_++;
  step.released.swap(released_);
  step.block_tables = plan->block_tables;
  step.max_blocks_per_seq = static_cast<uint32_t>(plan->max_blocks_per_seq);
  const Clock::time_point now = Clock::now();
  for (StepEntry& e : plan->entries) {
    Request& r = requests_.at(e.seq_id);
    if (!r.announced) {
      step.new_sequences.push_back(r.sampling);
      r.announced = true;
    }
    std::vector<int32_t> cached_prefix;
    if (!r.was_scheduled) {
      r.scheduled = now;
      r.was_scheduled = true;
      // Its first step starts after the cached prefix: the workers' history gets those tokens here.
      r.cached_prompt_tokens = static_cast<uint32_t>(e.start_pos);
      cached_prefix.assign(r.prompt.begin(), r.prompt.begin() + e.start_pos);
      prompt_tokens_ += r.prompt.size();
      cached_prompt_tokens_ += r.cached_prompt_tokens;
    }
    // Prompt logprobs not yet all back: the entry's rows inside the prompt predict its next tokens.
    std::vector<int32_t> prompt_targets;
    if (r.prompt_filled < r.prompt_logprobs.size()) {
      const size_t from = static_cast<size_t>(e.start_pos) + 1;
      const size_t to = std::min(static_cast<size_t>(e.start_pos) + e.tokens.size(), r.prompt.size() - 1) + 1;
      if (from < to) prompt_targets.assign(r.prompt.begin() + from, r.prompt.begin() + to);
    }
    step.entries.push_back({e.seq_id, e.table_row, e.start_pos, std::move(e.tokens), e.sample, e.n_draft,
                            std::move(cached_prefix), std::move(prompt_targets), r.adapter});
  }
  send_to_workers(step);
  in_flight_[step.step_id] = now;
  return true;
}

void Coordinator::send_to_workers(const protocol::WorkerStep& step) {
  const std::vector<uint8_t> bytes = protocol::encode(step);
  // A PUSH to a worker that died blocks forever (no peer to queue for), so send without blocking
  // and give up when the job is being torn down or the step deadline passes.
  const auto deadline = Clock::now() + std::chrono::milliseconds(config_.server.step_timeout_ms);
  for (zmq::socket_t* worker : sockets_.workers) {
    while (!worker->send(zmq::buffer(bytes), zmq::send_flags::dontwait)) {
      if (g_abort.load()) throw WorkerLost("the service is stopping: a worker failed or the job ended");
      if (Clock::now() > deadline) throw WorkerLost("a worker stopped taking steps");
      std::this_thread::sleep_for(std::chrono::milliseconds(1));
    }
  }
}

void Coordinator::handle_result(const protocol::StepResult& result) {
  if (result.step_id == 0) {  // a worker's answers to adapter loads, not a step's result
    handle_adapter_reports(result.adapter_reports);
    return;
  }
  if (in_flight_.erase(result.step_id) == 0) {
    throw std::runtime_error("result for step " + std::to_string(result.step_id) + " that is not in flight");
  }
  const Clock::time_point now = Clock::now();
  for (const protocol::PromptLogprobs& p : result.prompts) {
    const auto it = requests_.find(p.seq_id);
    if (it == requests_.end()) continue;
    Request& r = it->second;
    const auto start = static_cast<size_t>(p.start_pos);
    if (start > r.prompt_logprobs.size() || p.logprobs.size() > r.prompt_logprobs.size() - start)
      throw std::runtime_error("step " + std::to_string(result.step_id) +
                               " brought prompt logprobs past the " + "prompt of sequence " +
                               std::to_string(p.seq_id));
    std::copy(p.logprobs.begin(), p.logprobs.end(),
              r.prompt_logprobs.begin() + static_cast<std::ptrdiff_t>(start));
    r.prompt_filled = std::max(r.prompt_filled, start + p.logprobs.size());
  }
  for (const protocol::SampledToken& sampled : result.sampled) {
    const auto it = requests_.find(sampled.seq_id);
    if (it == requests_.end()) continue;  // cancelled while the step ran
    Request& r = it->second;
    if (!r.has_first_token) {
      r.first_token = now;
      r.has_first_token = true;
    }
    // Speculative steps bring the verified drafts before the sampled token.
    std::string text;
    int32_t delivered = 0;
    for (size_t t = 0; t <= sampled.accepted_drafts.size() && !r.completion->finished() && !r.score_only;
         ++t) {
      const size_t before = r.completion->tokens().size();
      text +=
          r.completion->add(t < sampled.accepted_drafts.size() ? sampled.accepted_drafts[t] : sampled.token);
      ++delivered;
      // Each token the completion keeps (not an EOS) with its log-probabilities, when asked for.
      if (r.completion->tokens().size() > before && t < sampled.logprobs.size())
        r.logprobs.push_back(sampled.logprobs[t]);
    }
    tokens_generated_ += static_cast<uint64_t>(delivered);
    r.draft_proposed += static_cast<uint64_t>(sampled.proposed);
    r.draft_accepted += sampled.accepted_drafts.size();
    draft_proposed_ += static_cast<uint64_t>(sampled.proposed);
    draft_accepted_ += sampled.accepted_drafts.size();
    const std::vector<int32_t>& tokens = r.completion->tokens();
    // A stream's first Delta carries the prompt and its log-probabilities, when asked for.
    const bool prompt_news = r.sampling.prompt_logprobs >= 0 && !r.prompt_logprobs_sent;
    // With tools, the text from where a call may start waits for the end.
    if (r.tools != nullptr) {
      const std::string& whole = r.completion->text();
      const size_t streamable = model::streamable_content(*r.tools, whole, r.call_required);
      text = streamable > r.text_streamed ? whole.substr(r.text_streamed, streamable - r.text_streamed) : "";
      r.text_streamed = std::max(r.text_streamed, streamable);
    }
    if (r.stream && (!text.empty() || tokens.size() > r.tokens_sent || prompt_news)) {
      protocol::Delta delta;
      delta.request_id = r.request_id;
      if (prompt_news) {
        delta.prompt_token_ids = r.prompt;
        delta.prompt_logprobs = r.prompt_logprobs;
        r.prompt_logprobs_sent = true;
      }
      delta.tokens.assign(tokens.begin() + static_cast<std::ptrdiff_t>(r.tokens_sent), tokens.end());
      delta.text = text;
      if (r.logprobs.size() > r.tokens_sent)
        delta.logprobs.assign(r.logprobs.begin() + static_cast<std::ptrdiff_t>(r.tokens_sent),
                              r.logprobs.end());
      reply(r.identity, delta);
    }
    r.tokens_sent = tokens.size();
    if (!r.completion->finished() && !r.score_only) {
      scheduler_.accept_tokens(sampled.seq_id, static_cast<int32_t>(sampled.accepted_drafts.size()),
                               sampled.token);
      if (!sampled.draft.empty()) scheduler_.set_draft(sampled.seq_id, sampled.draft);
      continue;
    }
    protocol::Final final_msg;
    final_msg.request_id = r.request_id;
    final_msg.finish_reason = to_protocol(r.completion->finish_reason());
    final_msg.prompt_tokens = static_cast<uint32_t>(r.prompt.size());
    final_msg.completion_tokens = static_cast<uint32_t>(tokens.size());
    final_msg.text = r.completion->text();
    final_msg.tokens = tokens;
    final_msg.prompt_token_ids = r.prompt;
    final_msg.timings.queue_ms = ms_between(r.arrived, r.scheduled);
    final_msg.timings.prefill_ms = ms_between(r.scheduled, r.first_token);
    final_msg.timings.decode_ms = ms_between(r.first_token, now);
    final_msg.draft_proposed = r.draft_proposed;
    final_msg.draft_accepted = r.draft_accepted;
    final_msg.cached_prompt_tokens = r.cached_prompt_tokens;
    final_msg.logprobs = std::move(r.logprobs);
    final_msg.prompt_logprobs = std::move(r.prompt_logprobs);
    if (r.tools != nullptr) {
      model::ParsedAnswer answer = model::parse_tool_calls(*r.tools, final_msg.text, r.call_required);
      for (model::ToolCall& call : answer.calls) {
        char id[32];
        std::snprintf(id, sizeof id, "call_%016llx", static_cast<unsigned long long>(call_ids_()));
        final_msg.tool_calls.push_back({id, std::move(call.name), std::move(call.arguments)});
      }
      if (!final_msg.tool_calls.empty()) {
        final_msg.text = std::move(answer.content);
        final_msg.finish_reason = protocol::FinishReason::tool_calls;
      }
      // A stream gets the text it was held back (the answer was not a call after all, or its text before
      // one).
      if (r.stream && final_msg.text.size() > r.text_streamed) {
        protocol::Delta rest;
        rest.request_id = r.request_id;
        rest.text = final_msg.text.substr(r.text_streamed);
        reply(r.identity, rest);
      }
    }
    reply(r.identity, final_msg);
    scheduler_.finish(sampled.seq_id);
    released_.push_back(sampled.seq_id);
    by_id_.erase({r.identity, r.request_id});
    const int32_t adapter = r.adapter;
    requests_.erase(it);
    ++completed_;
    release_adapter(adapter);
  }
}

int Coordinator::run() {
  // Whatever ends the loop, every request still open gets an error: none is ever left unanswered.
  try {
    return serve_loop();
  } catch (const WorkerLost& e) {
    fail_all(protocol::ErrorCode::worker_failed, e.what());
  } catch (const std::exception& e) {
    fail_all(protocol::ErrorCode::internal, std::string("coordinator failure: ") + e.what());
    throw;
  }
  return 1;
}

int Coordinator::serve_loop() {
  const auto step_timeout = std::chrono::milliseconds(config_.server.step_timeout_ms);
  const auto micro_batches = static_cast<size_t>(std::max(1, config_.parallel.micro_batches));
  for (;;) {
    if (g_abort.load()) throw WorkerLost("the service is stopping: a worker failed or the job ended");
    if (!in_flight_.empty() && Clock::now() - in_flight_.begin()->second > step_timeout) {
      throw WorkerLost("a worker did not finish step " + std::to_string(in_flight_.begin()->first) +
                       " within " + std::to_string(config_.server.step_timeout_ms) + " ms");
    }
    if (shutting_down_ && in_flight_.empty()) {
      fail_all(protocol::ErrorCode::shutting_down, "the service is shutting down");
      protocol::WorkerStep stop;
      stop.step_id = next_step_++;
      stop.shutdown = true;
      send_to_workers(stop);
      return 0;
    }
    while (!shutting_down_ && in_flight_.size() < micro_batches && dispatch_step()) {
    }

    zmq::pollitem_t items[] = {{sockets_.clients->handle(), 0, ZMQ_POLLIN, 0},
                               {sockets_.results->handle(), 0, ZMQ_POLLIN, 0}};
    try {
      zmq::poll(items, 2, std::chrono::milliseconds(50));
    } catch (const zmq::error_t& e) {
      if (e.num() == EINTR) continue;  // a signal: the loop head looks at it
      throw;
    }
    if (items[1].revents & ZMQ_POLLIN) {
      zmq::message_t frame;
      while (sockets_.results->recv(frame, zmq::recv_flags::dontwait)) {
        handle_result(protocol::decode_step_result(bytes_of(frame)));
      }
    }
    if (items[0].revents & ZMQ_POLLIN) {
      for (int i = 0; i < 64; ++i) {  // bounded, so steps keep flowing under a flood of requests
        if (!(sockets_.clients->get(zmq::sockopt::events) & ZMQ_POLLIN)) break;
        handle_client_message();
      }
    }
  }
}

}  // namespace nibble::cluster
