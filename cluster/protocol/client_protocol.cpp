#include "cluster/protocol/client_protocol.hpp"

#include <capnp/message.h>
#include <capnp/serialize.h>
#include <kj/array.h>
#include <kj/exception.h>

#include <algorithm>
#include <cmath>
#include <cstring>

#include "cluster/protocol/capnp_frame.hpp"
#include "cluster/protocol/logprobs_wire.hpp"
#include "cluster/protocol/nibble.capnp.h"
#include "worker/sampler.hpp"

namespace nibble::protocol {
namespace {

// The C++ enums are cast to and from the wire enums; these keep the two in step.
static_assert(static_cast<uint16_t>(wire::ErrorCode::INTERNAL) == static_cast<uint16_t>(ErrorCode::internal));
static_assert(static_cast<uint16_t>(wire::ErrorCode::NOT_FOUND) ==
              static_cast<uint16_t>(ErrorCode::not_found));
static_assert(static_cast<uint16_t>(wire::ResponseFormat::JSON_OBJECT) ==
              static_cast<uint16_t>(ResponseFormat::json_object));
static_assert(static_cast<uint16_t>(wire::ErrorCode::BAD_REQUEST) ==
              static_cast<uint16_t>(ErrorCode::bad_request));
static_assert(static_cast<uint16_t>(wire::ErrorCode::SHUTTING_DOWN) ==
              static_cast<uint16_t>(ErrorCode::shutting_down));
static_assert(static_cast<uint16_t>(wire::FinishReason::CANCELLED) ==
              static_cast<uint16_t>(FinishReason::cancelled));
static_assert(static_cast<uint16_t>(wire::FinishReason::TOOL_CALLS) ==
              static_cast<uint16_t>(FinishReason::tool_calls));
static_assert(static_cast<uint16_t>(wire::FinishReason::LENGTH) ==
              static_cast<uint16_t>(FinishReason::length));

template <class... Fs>
struct Overloaded : Fs... {
  using Fs::operator()...;
};
// clang before 17 does not deduce an aggregate's template arguments by itself.
template <typename... Fs>
Overloaded(Fs...) -> Overloaded<Fs...>;

// std::string::c_str() is NUL-terminated, as kj::StringPtr requires.
kj::StringPtr as_text(const std::string& s) { return kj::StringPtr(s.c_str(), s.size()); }

std::string to_std(capnp::Text::Reader text) { return std::string(text.cStr(), text.size()); }

std::vector<int32_t> to_std(capnp::List<int32_t>::Reader list) {
  std::vector<int32_t> out;
  out.reserve(list.size());  // safe: capnp has bounds-checked the list against the frame
  for (int32_t value : list) out.push_back(value);
  return out;
}

std::vector<std::string> read_texts(capnp::List<capnp::Text>::Reader list) {
  std::vector<std::string> out;
  out.reserve(list.size());
  for (auto text : list) out.push_back(to_std(text));
  return out;
}

void write_texts(const std::vector<std::string>& texts, capnp::List<capnp::Text>::Builder list) {
  for (unsigned i = 0; i < texts.size(); ++i) list.set(i, as_text(texts[i]));
}

template <class ListBuilder>
void fill_tokens(ListBuilder list, const std::vector<int32_t>& tokens) {
  for (unsigned i = 0; i < tokens.size(); ++i) list.set(i, tokens[i]);
}

// ---------------------------------------------------------------- encode

void write_tool_calls(const std::vector<ToolCall>& calls, capnp::List<wire::ToolCall>::Builder out) {
  for (unsigned i = 0; i < calls.size(); ++i) {
    out[i].setId(as_text(calls[i].id));
    out[i].setName(as_text(calls[i].name));
    out[i].setArguments(as_text(calls[i].arguments));
  }
}

// Checked before copying, as the stop strings are.
std::vector<ToolCall> read_tool_calls(capnp::List<wire::ToolCall>::Reader in, const std::string& where) {
  if (in.size() > kMaxToolCalls)
    throw ProtocolError(ErrorCode::bad_request, where + ": more than " + std::to_string(kMaxToolCalls) +
                                                    " calls (" + std::to_string(in.size()) + ")");
  std::vector<ToolCall> calls;
  calls.reserve(in.size());
  for (auto c : in) calls.push_back({to_std(c.getId()), to_std(c.getName()), to_std(c.getArguments())});
  return calls;
}

void encode_generate(const GenerateRequest& request, wire::GenerateRequest::Builder out) {
  out.setRequestId(as_text(request.request_id));
  if (const auto* text = std::get_if<std::string>(&request.prompt)) {
    out.getPrompt().setText(as_text(*text));
  } else if (const auto* messages = std::get_if<std::vector<ChatMessage>>(&request.prompt)) {
    auto list = out.getPrompt().initMessages(static_cast<unsigned>(messages->size()));
    for (unsigned i = 0; i < messages->size(); ++i) {
      list[i].setRole(as_text((*messages)[i].role));
      list[i].setContent(as_text((*messages)[i].content));
      write_tool_calls((*messages)[i].tool_calls,
                       list[i].initToolCalls(static_cast<unsigned>((*messages)[i].tool_calls.size())));
    }
  } else {
    const auto& tokens = std::get<std::vector<int32_t>>(request.prompt);
    fill_tokens(out.getPrompt().initTokens(static_cast<unsigned>(tokens.size())), tokens);
  }
  auto sampling = out.initSampling();
  sampling.setTemperature(request.sampling.temperature);
  sampling.setTopK(request.sampling.top_k);
  sampling.setTopP(request.sampling.top_p);
  sampling.setMinP(request.sampling.min_p);
  sampling.setRepetitionPenalty(request.sampling.repetition_penalty);
  sampling.setHasSeed(request.sampling.seed.has_value());
  sampling.setSeed(request.sampling.seed.value_or(0));
  sampling.setPresencePenalty(request.sampling.presence_penalty);
  sampling.setFrequencyPenalty(request.sampling.frequency_penalty);
  auto bias = sampling.initLogitBias(static_cast<unsigned>(request.sampling.logit_bias.size()));
  for (unsigned i = 0; i < request.sampling.logit_bias.size(); ++i) {
    bias[i].setToken(request.sampling.logit_bias[i].token);
    bias[i].setBias(request.sampling.logit_bias[i].bias);
  }
  out.setMaxTokens(request.max_tokens);
  auto stop = out.initStop(static_cast<unsigned>(request.stop.size()));
  for (unsigned i = 0; i < request.stop.size(); ++i) stop.set(i, as_text(request.stop[i]));
  out.setStream(request.stream);
  // More than fit the field is still more than allowed: the server refuses it by name.
  out.setLogprobs(static_cast<uint8_t>(std::min<uint32_t>(request.logprobs, 255)));
  out.setParseSpecial(request.parse_special);
  out.setIgnoreEos(request.ignore_eos);
  out.setPromptLogprobs(static_cast<int8_t>(std::clamp<int32_t>(request.prompt_logprobs, -128, 127)));
  out.setResponseFormat(static_cast<wire::ResponseFormat>(request.response_format));
  out.setJsonSchema(as_text(request.json_schema));
  out.setMinTokens(request.min_tokens);
  fill_tokens(out.initStopTokenIds(static_cast<unsigned>(request.stop_token_ids.size())),
              request.stop_token_ids);
  out.setTools(as_text(request.tools));
  out.setGrammar(as_text(request.grammar));
  out.setAdapter(as_text(request.adapter));
  auto choice = out.getToolChoice();
  switch (request.tool_choice) {
    case ToolChoice::auto_:
      choice.setAuto();
      break;
    case ToolChoice::none:
      choice.setNone();
      break;
    case ToolChoice::required:
      choice.setRequired();
      break;
    case ToolChoice::function:
      choice.setFunction(as_text(request.tool_choice_function));
      break;
  }
}

void encode_final(const Final& final_msg, wire::Final::Builder out) {
  out.setRequestId(as_text(final_msg.request_id));
  out.setFinishReason(static_cast<wire::FinishReason>(final_msg.finish_reason));
  out.setPromptTokens(final_msg.prompt_tokens);
  out.setCompletionTokens(final_msg.completion_tokens);
  out.setText(as_text(final_msg.text));
  fill_tokens(out.initTokens(static_cast<unsigned>(final_msg.tokens.size())), final_msg.tokens);
  auto timings = out.initTimings();
  timings.setQueueMs(final_msg.timings.queue_ms);
  timings.setPrefillMs(final_msg.timings.prefill_ms);
  timings.setDecodeMs(final_msg.timings.decode_ms);
  fill_tokens(out.initPromptTokenIds(static_cast<unsigned>(final_msg.prompt_token_ids.size())),
              final_msg.prompt_token_ids);
  out.setDraftProposed(final_msg.draft_proposed);
  out.setDraftAccepted(final_msg.draft_accepted);
  out.setCachedPromptTokens(final_msg.cached_prompt_tokens);
  detail::write_logprobs(final_msg.logprobs,
                         out.initLogprobs(static_cast<unsigned>(final_msg.logprobs.size())));
  detail::write_logprobs(final_msg.prompt_logprobs,
                         out.initPromptLogprobs(static_cast<unsigned>(final_msg.prompt_logprobs.size())));
  write_tool_calls(final_msg.tool_calls,
                   out.initToolCalls(static_cast<unsigned>(final_msg.tool_calls.size())));
}

// ---------------------------------------------------------------- decode

template <class Read>
auto read_frame(std::span<const uint8_t> frame, const DecodeLimits& limits, Read&& read) {
  return detail::read_frame(frame, limits.max_message_bytes, std::forward<Read>(read));
}

[[noreturn]] void unknown_member(const char* what, unsigned discriminant) {
  throw ProtocolError(ErrorCode::unknown_request_type,
                      std::string("unknown ") + what + " " + std::to_string(discriminant) + " (newer peer?)");
}

GenerateRequest read_generate(wire::GenerateRequest::Reader in) {
  GenerateRequest request;
  request.request_id = to_std(in.getRequestId());
  auto prompt = in.getPrompt();
  switch (prompt.which()) {
    case wire::GenerateRequest::Prompt::TEXT:
      request.prompt = to_std(prompt.getText());
      break;
    case wire::GenerateRequest::Prompt::TOKENS:
      request.prompt = to_std(prompt.getTokens());
      break;
    case wire::GenerateRequest::Prompt::MESSAGES: {
      auto list = prompt.getMessages();
      // Checked before copying, as the stop strings are.
      if (list.size() > kMaxChatMessages) {
        throw ProtocolError(ErrorCode::bad_request, "prompt.messages: more than " +
                                                        std::to_string(kMaxChatMessages) + " messages (" +
                                                        std::to_string(list.size()) + ")");
      }
      std::vector<ChatMessage> messages;
      messages.reserve(list.size());
      for (auto m : list)
        messages.push_back(
            {to_std(m.getRole()), to_std(m.getContent()),
             read_tool_calls(m.getToolCalls(),
                             "prompt.messages[" + std::to_string(messages.size()) + "].toolCalls")});
      request.prompt = std::move(messages);
      break;
    }
    default:
      unknown_member("prompt kind", static_cast<unsigned>(prompt.which()));
  }
  // An absent `sampling` reads as the schema defaults, which match SamplingParams'.
  auto sampling = in.getSampling();
  request.sampling.temperature = sampling.getTemperature();
  request.sampling.top_k = sampling.getTopK();
  request.sampling.top_p = sampling.getTopP();
  request.sampling.min_p = sampling.getMinP();
  request.sampling.repetition_penalty = sampling.getRepetitionPenalty();
  if (sampling.getHasSeed()) request.sampling.seed = sampling.getSeed();
  request.sampling.presence_penalty = sampling.getPresencePenalty();
  request.sampling.frequency_penalty = sampling.getFrequencyPenalty();
  auto bias = sampling.getLogitBias();
  // Checked before copying, as the stop strings below.
  if (bias.size() > kMaxLogitBias) {
    throw ProtocolError(ErrorCode::bad_request, "sampling.logitBias: more than " +
                                                    std::to_string(kMaxLogitBias) + " tokens (" +
                                                    std::to_string(bias.size()) + ")");
  }
  request.sampling.logit_bias.reserve(bias.size());
  for (auto b : bias) request.sampling.logit_bias.push_back({b.getToken(), b.getBias()});
  request.max_tokens = in.getMaxTokens();
  request.logprobs = in.getLogprobs();
  request.parse_special = in.getParseSpecial();
  request.ignore_eos = in.getIgnoreEos();
  request.prompt_logprobs = in.getPromptLogprobs();
  // A newer client's format this build does not know is refused by name, not served as text.
  const auto format = static_cast<uint16_t>(in.getResponseFormat());
  if (format > static_cast<uint16_t>(ResponseFormat::grammar))
    throw ProtocolError(ErrorCode::bad_request, "responseFormat: unknown format " + std::to_string(format));
  request.response_format = static_cast<ResponseFormat>(format);
  // Checked before copying, as the stop strings.
  if (in.getJsonSchema().size() > kMaxJsonSchemaBytes)
    throw ProtocolError(ErrorCode::bad_request,
                        "jsonSchema: longer than " + std::to_string(kMaxJsonSchemaBytes) + " bytes");
  request.json_schema = to_std(in.getJsonSchema());
  request.min_tokens = in.getMinTokens();
  if (in.getStopTokenIds().size() > kMaxStopTokenIds)
    throw ProtocolError(ErrorCode::bad_request,
                        "stopTokenIds: more than " + std::to_string(kMaxStopTokenIds) + " tokens");
  request.stop_token_ids = to_std(in.getStopTokenIds());
  if (in.getTools().size() > kMaxToolsBytes)
    throw ProtocolError(ErrorCode::bad_request,
                        "tools: longer than " + std::to_string(kMaxToolsBytes) + " bytes");
  request.tools = to_std(in.getTools());
  if (in.getGrammar().size() > kMaxJsonSchemaBytes)
    throw ProtocolError(ErrorCode::bad_request,
                        "grammar: longer than " + std::to_string(kMaxJsonSchemaBytes) + " bytes");
  request.grammar = to_std(in.getGrammar());
  if (in.getAdapter().size() > 256)
    throw ProtocolError(ErrorCode::bad_request, "adapter: longer than 256 bytes");
  request.adapter = to_std(in.getAdapter());
  auto choice = in.getToolChoice();
  switch (choice.which()) {
    case wire::GenerateRequest::ToolChoice::AUTO:
      request.tool_choice = ToolChoice::auto_;
      break;
    case wire::GenerateRequest::ToolChoice::NONE:
      request.tool_choice = ToolChoice::none;
      break;
    case wire::GenerateRequest::ToolChoice::REQUIRED:
      request.tool_choice = ToolChoice::required;
      break;
    case wire::GenerateRequest::ToolChoice::FUNCTION:
      request.tool_choice = ToolChoice::function;
      request.tool_choice_function = to_std(choice.getFunction());
      break;
    default:
      unknown_member("tool choice", static_cast<unsigned>(choice.which()));
  }
  auto stop = in.getStop();
  // Checked before copying so a request with a million stop strings costs nothing.
  if (stop.size() > kMaxStopStrings) {
    throw ProtocolError(ErrorCode::bad_request, "stop: more than " + std::to_string(kMaxStopStrings) +
                                                    " stop strings (" + std::to_string(stop.size()) + ")");
  }
  request.stop.reserve(stop.size());
  for (auto text : stop) request.stop.push_back(to_std(text));
  request.stream = in.getStream();
  return request;
}

ClientRequestMsg read_client_request(capnp::MessageReader& reader) {
  auto root = reader.getRoot<wire::ClientRequest>();
  switch (root.which()) {
    case wire::ClientRequest::GENERATE:
      return read_generate(root.getGenerate());
    case wire::ClientRequest::CANCEL:
      return CancelRequest{to_std(root.getCancel().getRequestId())};
    case wire::ClientRequest::HEALTH:
      return HealthRequest{};
    case wire::ClientRequest::STATS:
      return StatsRequest{};
    case wire::ClientRequest::SHUTDOWN:
      return ShutdownRequest{};
    case wire::ClientRequest::LOAD_ADAPTER: {
      auto in = root.getLoadAdapter();
      return LoadAdapterRequest{to_std(in.getRequestId()), to_std(in.getName()), to_std(in.getPath()),
                                in.getScale()};
    }
    case wire::ClientRequest::UNLOAD_ADAPTER: {
      auto in = root.getUnloadAdapter();
      return UnloadAdapterRequest{to_std(in.getRequestId()), to_std(in.getName())};
    }
  }
  unknown_member("request type", static_cast<unsigned>(root.which()));
}

ErrorCode read_error_code(wire::ErrorCode code) {
  // A newer server may send codes this build does not know: keep the message, call it internal.
  auto value = static_cast<uint16_t>(code);
  return value <= static_cast<uint16_t>(ErrorCode::not_found) ? static_cast<ErrorCode>(value)
                                                              : ErrorCode::internal;
}

FinishReason read_finish_reason(wire::FinishReason reason) {
  auto value = static_cast<uint16_t>(reason);
  if (value > static_cast<uint16_t>(FinishReason::tool_calls)) unknown_member("finish reason", value);
  return static_cast<FinishReason>(value);
}

ServerResponseMsg read_server_response(capnp::MessageReader& reader) {
  auto root = reader.getRoot<wire::ServerResponse>();
  switch (root.which()) {
    case wire::ServerResponse::DELTA: {
      auto in = root.getDelta();
      return Delta{to_std(in.getRequestId()),      to_std(in.getTokens()),
                   to_std(in.getText()),           detail::read_logprobs(in.getLogprobs()),
                   to_std(in.getPromptTokenIds()), detail::read_logprobs(in.getPromptLogprobs())};
    }
    case wire::ServerResponse::FINAL: {
      auto in = root.getFinal();
      auto timings = in.getTimings();
      return Final{to_std(in.getRequestId()),
                   read_finish_reason(in.getFinishReason()),
                   in.getPromptTokens(),
                   in.getCompletionTokens(),
                   to_std(in.getText()),
                   to_std(in.getTokens()),
                   Timings{timings.getQueueMs(), timings.getPrefillMs(), timings.getDecodeMs()},
                   to_std(in.getPromptTokenIds()),
                   in.getDraftProposed(),
                   in.getDraftAccepted(),
                   in.getCachedPromptTokens(),
                   detail::read_logprobs(in.getLogprobs()),
                   detail::read_logprobs(in.getPromptLogprobs()),
                   read_tool_calls(in.getToolCalls(), "toolCalls")};
    }
    case wire::ServerResponse::ERROR: {
      auto in = root.getError();
      return Error{to_std(in.getRequestId()), read_error_code(in.getCode()), to_std(in.getMessage())};
    }
    case wire::ServerResponse::HEALTH: {
      auto in = root.getHealth();
      return Health{in.getOk(), in.getWorkers(), to_std(in.getDetail())};
    }
    case wire::ServerResponse::STATS: {
      auto in = root.getStats();
      return Stats{in.getQueued(),
                   in.getRunning(),
                   in.getCompleted(),
                   in.getFailed(),
                   in.getFreeKvBlocks(),
                   in.getTotalKvBlocks(),
                   in.getTokensGenerated(),
                   in.getDraftProposed(),
                   in.getDraftAccepted(),
                   in.getPromptTokens(),
                   in.getCachedPromptTokens(),
                   in.getCachedKvBlocks(),
                   read_texts(in.getAdapters())};
    }
    case wire::ServerResponse::ADAPTERS: {
      auto in = root.getAdapters();
      return Adapters{to_std(in.getRequestId()), read_texts(in.getNames())};
    }
  }
  unknown_member("response type", static_cast<unsigned>(root.which()));
}

[[noreturn]] void bad_request(const std::string& message) {
  throw ProtocolError(ErrorCode::bad_request, message);
}

void validate_request_id(const std::string& request_id) {
  if (request_id.empty()) bad_request("requestId: must not be empty");
  if (request_id.size() > kMaxRequestIdBytes) {
    bad_request("requestId: longer than " + std::to_string(kMaxRequestIdBytes) + " bytes");
  }
}

}  // namespace

std::string_view to_string(ErrorCode code) {
  switch (code) {
    case ErrorCode::bad_request:
      return "badRequest";
    case ErrorCode::malformed_message:
      return "malformedMessage";
    case ErrorCode::message_too_large:
      return "messageTooLarge";
    case ErrorCode::unknown_request_type:
      return "unknownRequestType";
    case ErrorCode::prompt_too_long:
      return "promptTooLong";
    case ErrorCode::overloaded:
      return "overloaded";
    case ErrorCode::cancelled:
      return "cancelled";
    case ErrorCode::worker_failed:
      return "workerFailed";
    case ErrorCode::shutting_down:
      return "shuttingDown";
    case ErrorCode::internal:
      return "internal";
    case ErrorCode::not_found:
      return "notFound";
  }
  return "unknown";
}

std::string_view to_string(FinishReason reason) {
  switch (reason) {
    case FinishReason::length:
      return "length";
    case FinishReason::eos:
      return "eos";
    case FinishReason::stop:
      return "stop";
    case FinishReason::cancelled:
      return "cancelled";
    case FinishReason::tool_calls:
      return "tool_calls";
  }
  return "unknown";
}

void validate(const GenerateRequest& request) {
  validate_request_id(request.request_id);
  if (const auto* text = std::get_if<std::string>(&request.prompt)) {
    if (text->empty()) bad_request("prompt: must not be empty");
  } else if (const auto* messages = std::get_if<std::vector<ChatMessage>>(&request.prompt)) {
    if (messages->empty()) bad_request("prompt.messages: must not be empty");
    for (size_t i = 0; i < messages->size(); ++i) {
      const std::string& role = (*messages)[i].role;
      if (role.empty() || role.size() > kMaxChatRoleBytes)
        bad_request("prompt.messages[" + std::to_string(i) + "].role: must be 1 to " +
                    std::to_string(kMaxChatRoleBytes) + " bytes");
    }
  } else {
    const auto& tokens = std::get<std::vector<int32_t>>(request.prompt);
    if (tokens.empty()) bad_request("prompt: must not be empty");
    for (size_t i = 0; i < tokens.size(); ++i) {
      if (tokens[i] < 0) bad_request("prompt.tokens[" + std::to_string(i) + "]: negative token id");
    }
  }
  const SamplingParams& s = request.sampling;
  // Written as !(good) so NaN fails every check.
  if (!(std::isfinite(s.temperature) && s.temperature >= 0)) {
    bad_request("sampling.temperature: must be finite and >= 0");
  }
  if (s.top_k < 0) bad_request("sampling.topK: must be >= 0");
  if (!(s.top_p > 0 && s.top_p <= 1)) bad_request("sampling.topP: must be in (0, 1]");
  if (!(s.min_p >= 0 && s.min_p < 1)) bad_request("sampling.minP: must be in [0, 1)");
  if (!(std::isfinite(s.repetition_penalty) && s.repetition_penalty > 0)) {
    bad_request("sampling.repetitionPenalty: must be finite and > 0");
  }
  if (!(std::fabs(s.presence_penalty) <= kMaxPresencePenalty))
    bad_request("sampling.presencePenalty: must be in [-2, 2]");
  if (!(std::fabs(s.frequency_penalty) <= kMaxPresencePenalty))
    bad_request("sampling.frequencyPenalty: must be in [-2, 2]");
  if (s.logit_bias.size() > kMaxLogitBias)
    bad_request("sampling.logitBias: more than " + std::to_string(kMaxLogitBias) + " tokens");
  const std::vector<bool> repeated = worker::repeated_tokens(s.logit_bias);
  for (size_t i = 0; i < s.logit_bias.size(); ++i) {
    const std::string where = "sampling.logitBias[" + std::to_string(i) + "]";
    if (s.logit_bias[i].token < 0) bad_request(where + ": negative token id");
    if (!(std::fabs(s.logit_bias[i].bias) <= kMaxLogitBiasValue))
      bad_request(where + ": bias must be in [-100, 100]");
    if (repeated[i])
      bad_request(where + ": token " + std::to_string(s.logit_bias[i].token) + " is biased twice");
  }
  if (request.stop_token_ids.size() > kMaxStopTokenIds)
    bad_request("stopTokenIds: more than " + std::to_string(kMaxStopTokenIds) + " tokens");
  for (size_t i = 0; i < request.stop_token_ids.size(); ++i) {
    if (request.stop_token_ids[i] < 0) bad_request("stopTokenIds[" + std::to_string(i) + "]: negative");
    for (size_t j = 0; j < i; ++j) {
      if (request.stop_token_ids[j] == request.stop_token_ids[i])
        bad_request("stopTokenIds[" + std::to_string(i) + "]: " + std::to_string(request.stop_token_ids[i]) +
                    " twice");
    }
  }
  const bool conversation = std::holds_alternative<std::vector<ChatMessage>>(request.prompt);
  if (!request.tools.empty() && !conversation) bad_request("tools: only with a prompt of messages");
  if (request.tools.size() > kMaxToolsBytes)
    bad_request("tools: longer than " + std::to_string(kMaxToolsBytes) + " bytes");
  if (request.tools.empty() && request.tool_choice != ToolChoice::auto_ &&
      request.tool_choice != ToolChoice::none)
    bad_request("toolChoice: a call is required and no tools are offered");
  if ((request.tool_choice == ToolChoice::function) == request.tool_choice_function.empty())
    bad_request("toolChoice: a function's name with toolChoice function, and only then");
  if (request.tool_choice == ToolChoice::required || request.tool_choice == ToolChoice::function) {
    if (request.response_format != ResponseFormat::text)
      bad_request("toolChoice: a required call is itself the answer's format: no responseFormat with it");
  }
  if (conversation) {
    const auto& messages = std::get<std::vector<ChatMessage>>(request.prompt);
    for (size_t i = 0; i < messages.size(); ++i)
      if (messages[i].tool_calls.size() > kMaxToolCalls)
        bad_request("prompt.messages[" + std::to_string(i) + "].toolCalls: more than " +
                    std::to_string(kMaxToolCalls) + " calls");
  }
  if ((request.response_format == ResponseFormat::grammar) == request.grammar.empty())
    bad_request("grammar: a grammar with responseFormat grammar, and only then");
  if (request.grammar.size() > kMaxJsonSchemaBytes)
    bad_request("grammar: longer than " + std::to_string(kMaxJsonSchemaBytes) + " bytes");
  if ((request.response_format == ResponseFormat::json_schema) == request.json_schema.empty())
    bad_request("jsonSchema: a schema with responseFormat jsonSchema, and only then");
  if (request.json_schema.size() > kMaxJsonSchemaBytes)
    bad_request("jsonSchema: longer than " + std::to_string(kMaxJsonSchemaBytes) + " bytes");
  if (request.prompt_logprobs < -1 || request.prompt_logprobs > static_cast<int32_t>(kMaxLogprobs))
    bad_request("promptLogprobs: -1 (none) or 0 to " + std::to_string(kMaxLogprobs) + " top tokens, got " +
                std::to_string(request.prompt_logprobs));
  // A request for the prompt's log-probabilities alone (scoring) generates nothing.
  if (request.max_tokens < 1 && request.prompt_logprobs < 0)
    bad_request("maxTokens: must be >= 1 (0 only with promptLogprobs)");
  if (request.min_tokens > request.max_tokens)
    bad_request("minTokens: " + std::to_string(request.min_tokens) + " is more than maxTokens " +
                std::to_string(request.max_tokens));
  if (request.logprobs > kMaxLogprobs)
    bad_request("logprobs: at most " + std::to_string(kMaxLogprobs) + " top tokens, got " +
                std::to_string(request.logprobs));
  if (request.stop.size() > kMaxStopStrings) {
    bad_request("stop: more than " + std::to_string(kMaxStopStrings) + " stop strings");
  }
  for (size_t i = 0; i < request.stop.size(); ++i) {
    if (request.stop[i].size() > kMaxStopStringBytes) {
      bad_request("stop[" + std::to_string(i) + "]: longer than " + std::to_string(kMaxStopStringBytes) +
                  " bytes");
    }
  }
}

void validate(const CancelRequest& request) { validate_request_id(request.request_id); }

namespace {

void validate_adapter_name(const std::string& name) {
  if (name.empty()) bad_request("name: must not be empty");
  if (name.size() > kMaxAdapterNameBytes)
    bad_request("name: longer than " + std::to_string(kMaxAdapterNameBytes) + " bytes");
}

}  // namespace

void validate(const LoadAdapterRequest& request) {
  validate_request_id(request.request_id);
  validate_adapter_name(request.name);
  if (request.path.empty()) bad_request("path: must not be empty");
  if (request.path.size() > kMaxAdapterPathBytes)
    bad_request("path: longer than " + std::to_string(kMaxAdapterPathBytes) + " bytes");
  if (!std::isfinite(request.scale)) bad_request("scale: must be a finite number");
}

void validate(const UnloadAdapterRequest& request) {
  validate_request_id(request.request_id);
  validate_adapter_name(request.name);
}

std::vector<uint8_t> encode(const ClientRequestMsg& message) {
  capnp::MallocMessageBuilder builder;
  auto root = builder.initRoot<wire::ClientRequest>();
  std::visit(Overloaded{
                 [&](const GenerateRequest& m) { encode_generate(m, root.initGenerate()); },
                 [&](const CancelRequest& m) { root.initCancel().setRequestId(as_text(m.request_id)); },
                 [&](const HealthRequest&) { root.setHealth(); },
                 [&](const StatsRequest&) { root.setStats(); },
                 [&](const ShutdownRequest&) { root.setShutdown(); },
                 [&](const LoadAdapterRequest& m) {
                   auto out = root.initLoadAdapter();
                   out.setRequestId(as_text(m.request_id));
                   out.setName(as_text(m.name));
                   out.setPath(as_text(m.path));
                   out.setScale(m.scale);
                 },
                 [&](const UnloadAdapterRequest& m) {
                   auto out = root.initUnloadAdapter();
                   out.setRequestId(as_text(m.request_id));
                   out.setName(as_text(m.name));
                 },
             },
             message);
  return detail::to_bytes(builder);
}

std::vector<uint8_t> encode(const ServerResponseMsg& message) {
  capnp::MallocMessageBuilder builder;
  auto root = builder.initRoot<wire::ServerResponse>();
  std::visit(
      Overloaded{
          [&](const Delta& m) {
            auto out = root.initDelta();
            out.setRequestId(as_text(m.request_id));
            fill_tokens(out.initTokens(static_cast<unsigned>(m.tokens.size())), m.tokens);
            out.setText(as_text(m.text));
            detail::write_logprobs(m.logprobs, out.initLogprobs(static_cast<unsigned>(m.logprobs.size())));
            fill_tokens(out.initPromptTokenIds(static_cast<unsigned>(m.prompt_token_ids.size())),
                        m.prompt_token_ids);
            detail::write_logprobs(m.prompt_logprobs,
                                   out.initPromptLogprobs(static_cast<unsigned>(m.prompt_logprobs.size())));
          },
          [&](const Final& m) { encode_final(m, root.initFinal()); },
          [&](const Error& m) {
            auto out = root.initError();
            out.setRequestId(as_text(m.request_id));
            out.setCode(static_cast<wire::ErrorCode>(m.code));
            out.setMessage(as_text(m.message));
          },
          [&](const Health& m) {
            auto out = root.initHealth();
            out.setOk(m.ok);
            out.setWorkers(m.workers);
            out.setDetail(as_text(m.detail));
          },
          [&](const Stats& m) {
            auto out = root.initStats();
            out.setQueued(m.queued);
            out.setRunning(m.running);
            out.setCompleted(m.completed);
            out.setFailed(m.failed);
            out.setFreeKvBlocks(m.free_kv_blocks);
            out.setTotalKvBlocks(m.total_kv_blocks);
            out.setTokensGenerated(m.tokens_generated);
            out.setDraftProposed(m.draft_proposed);
            out.setDraftAccepted(m.draft_accepted);
            out.setPromptTokens(m.prompt_tokens);
            out.setCachedPromptTokens(m.cached_prompt_tokens);
            out.setCachedKvBlocks(m.cached_kv_blocks);
            write_texts(m.adapters, out.initAdapters(static_cast<unsigned>(m.adapters.size())));
          },
          [&](const Adapters& m) {
            auto out = root.initAdapters();
            out.setRequestId(as_text(m.request_id));
            write_texts(m.names, out.initNames(static_cast<unsigned>(m.names.size())));
          },
      },
      message);
  return detail::to_bytes(builder);
}

ClientRequestMsg decode_client_request(std::span<const uint8_t> frame, const DecodeLimits& limits) {
  ClientRequestMsg message =
      read_frame(frame, limits, [](capnp::MessageReader& reader) { return read_client_request(reader); });
  if (const auto* generate = std::get_if<GenerateRequest>(&message)) validate(*generate);
  if (const auto* cancel = std::get_if<CancelRequest>(&message)) validate(*cancel);
  if (const auto* load = std::get_if<LoadAdapterRequest>(&message)) validate(*load);
  if (const auto* unload = std::get_if<UnloadAdapterRequest>(&message)) validate(*unload);
  return message;
}

ServerResponseMsg decode_server_response(std::span<const uint8_t> frame, const DecodeLimits& limits) {
  return read_frame(frame, limits, [](capnp::MessageReader& reader) { return read_server_response(reader); });
}

}  // namespace nibble::protocol
