#include "model/tool_calls.hpp"

#include <ctime>
#include <nlohmann/json.hpp>
#include <set>
#include <stdexcept>

namespace nibble::model {
namespace {

using ordered_json = nlohmann::ordered_json;

constexpr std::string_view kPythonTag = "<|python_tag|>";
constexpr std::string_view kToolCallOpen = "<tool_call>";
constexpr std::string_view kToolCallClose = "</tool_call>";
constexpr std::string_view kQwenSystem =
    "You are Qwen, created by Alibaba Cloud. You are a helpful assistant.";

bool is_space(char c) { return c == ' ' || c == '\t' || c == '\n' || c == '\r' || c == '\v' || c == '\f'; }

// Leading and trailing ASCII whitespace removed (Jinja's trim).
std::string trim(std::string_view s) {
  size_t begin = 0, end = s.size();
  while (begin < end && is_space(s[begin])) ++begin;
  while (end > begin && is_space(s[end - 1])) --end;
  return std::string(s.substr(begin, end - begin));
}

void write_python_json(const ordered_json& value, int indent, int level, std::string& out) {
  const bool object = value.is_object();
  if (!object && !value.is_array()) {
    out += value.dump(-1, ' ', /*ensure_ascii=*/false, ordered_json::error_handler_t::replace);
    return;
  }
  if (value.empty()) {
    out += object ? "{}" : "[]";
    return;
  }
  out += object ? '{' : '[';
  const auto newline = [&](int depth) {
    out += '\n';
    out.append(static_cast<size_t>(indent * depth), ' ');
  };
  bool first = true;
  for (auto it = value.begin(); it != value.end(); ++it) {
    if (!first) out += indent >= 0 ? "," : ", ";
    first = false;
    if (indent >= 0) newline(level + 1);
    if (object)
      out += ordered_json(it.key()).dump(-1, ' ', false, ordered_json::error_handler_t::replace) + ": ";
    write_python_json(it.value(), indent, level + 1, out);
  }
  if (indent >= 0) newline(level);
  out += object ? '}' : ']';
}

std::string python_dumps(const ordered_json& value, int indent = -1) {
  std::string out;
  write_python_json(value, indent, 0, out);
  return out;
}

// The end (one past the closing brace) of the JSON object that starts at text[begin] == '{', by
// counting brackets outside strings; npos when it does not close.
size_t object_end(std::string_view text, size_t begin) {
  int depth = 0;
  bool in_string = false, escaped = false;
  for (size_t i = begin; i < text.size(); ++i) {
    const char c = text[i];
    if (in_string) {
      if (escaped) {
        escaped = false;
      } else if (c == '\\') {
        escaped = true;
      } else if (c == '"') {
        in_string = false;
      }
    } else if (c == '"') {
      in_string = true;
    } else if (c == '{' || c == '[') {
      ++depth;
    } else if (c == '}' || c == ']') {
      if (--depth == 0) return i + 1;
    }
  }
  return std::string_view::npos;
}

// One call object's name and arguments ("parameters" or "arguments", an object); nullopt otherwise.
std::optional<ToolCall> call_from(std::string_view object_text) {
  const ordered_json call = ordered_json::parse(object_text, nullptr, /*allow_exceptions=*/false);
  if (!call.is_object()) return std::nullopt;
  const auto name = call.find("name");
  if (name == call.end() || !name->is_string()) return std::nullopt;
  auto arguments = call.find("arguments");
  if (arguments == call.end()) arguments = call.find("parameters");
  if (arguments == call.end() || !arguments->is_object()) return std::nullopt;
  return ToolCall{"", name->get<std::string>(), python_dumps(*arguments)};
}

// Bare call objects, one after another (separated by whitespace or ';'), after an optional python tag:
// vLLM's llama3_json reading.
std::optional<std::vector<ToolCall>> bare_calls(std::string_view text) {
  size_t at = 0;
  while (at < text.size() && is_space(text[at])) ++at;
  if (text.substr(at).starts_with(kPythonTag)) at += kPythonTag.size();
  std::vector<ToolCall> calls;
  for (;;) {
    while (at < text.size() && (is_space(text[at]) || text[at] == ';')) ++at;
    if (at == text.size()) break;
    if (text[at] != '{') return std::nullopt;
    const size_t end = object_end(text, at);
    if (end == std::string_view::npos) return std::nullopt;
    std::optional<ToolCall> call = call_from(text.substr(at, end - at));
    if (!call) return std::nullopt;
    calls.push_back(std::move(*call));
    at = end;
  }
  if (calls.empty()) return std::nullopt;
  return calls;
}

// Calls inside <tool_call></tool_call> (the last may be unclosed), vLLM's hermes reading.
std::optional<std::vector<ToolCall>> tagged_calls(std::string_view text) {
  std::vector<ToolCall> calls;
  size_t at = text.find(kToolCallOpen);
  while (at != std::string_view::npos) {
    const size_t inner = at + kToolCallOpen.size();
    const size_t close = text.find(kToolCallClose, inner);
    const std::string body =
        trim(text.substr(inner, close == std::string_view::npos ? text.npos : close - inner));
    std::optional<ToolCall> call = call_from(body);
    if (!call) return std::nullopt;
    calls.push_back(std::move(*call));
    if (close == std::string_view::npos) break;
    at = text.find(kToolCallOpen, close + kToolCallClose.size());
  }
  if (calls.empty()) return std::nullopt;
  return calls;
}

std::string arguments_json(const ToolCall& call, size_t message) {
  const ordered_json arguments = ordered_json::parse(call.arguments, nullptr, /*allow_exceptions=*/false);
  if (!arguments.is_object())
    throw std::invalid_argument("messages[" + std::to_string(message) + "].tool_calls: the arguments of '" +
                                call.name + "' are not a JSON object");
  return python_dumps(arguments);
}

std::string format_llama3_json(const ToolPrompt& prompt, std::span<const ChatMessage> messages,
                               std::span<const ToolDefinition> tools, bool add_assistant) {
  // Llama 3.1's template, tools_in_user_message (its default) and no builtin tools.
  size_t next = 0;
  std::string system_message;
  if (!messages.empty() && messages[0].role == "system") {
    system_message = trim(messages[0].content);
    next = 1;
  }
  std::string out = "<|start_header_id|>system<|end_header_id|>\n\n";
  if (!tools.empty()) out += "Environment: ipython\n";
  out += "Cutting Knowledge Date: December 2023\nToday Date: " + prompt.date + "\n\n";
  out += system_message + "<|eot_id|>";
  if (!tools.empty()) {
    if (next == messages.size())
      throw std::invalid_argument(
          "messages: the llama3 tool form puts the tools in the first user message, and there is none");
    out += "<|start_header_id|>user<|end_header_id|>\n\n";
    out +=
        "Given the following functions, please respond with a JSON for a function call with its proper "
        "arguments that best answers the given prompt.\n\n";
    out +=
        "Respond in the format {\"name\": function name, \"parameters\": dictionary of argument name and its "
        "value}.Do not use variables.\n\n";
    for (const ToolDefinition& tool : tools) out += python_json_dumps(tool.definition, 4) + "\n\n";
    out += trim(messages[next].content) + "<|eot_id|>";
    ++next;
  }
  for (size_t i = next; i < messages.size(); ++i) {
    const ChatMessage& m = messages[i];
    if (!m.tool_calls.empty()) {
      if (m.tool_calls.size() != 1)
        throw std::invalid_argument("messages[" + std::to_string(i) +
                                    "].tool_calls: the llama3 tool form holds one call per assistant turn");
      out += "<|start_header_id|>assistant<|end_header_id|>\n\n{\"name\": \"" + m.tool_calls[0].name +
             "\", \"parameters\": " + arguments_json(m.tool_calls[0], i) + "}<|eot_id|>";
    } else if (m.role == "tool" || m.role == "ipython") {
      // The template writes a tool's result with tojson (a string is iterable there): quoted.
      out += "<|start_header_id|>ipython<|end_header_id|>\n\n" + python_dumps(ordered_json(m.content)) +
             "<|eot_id|>";
    } else {
      out += "<|start_header_id|>" + m.role + "<|end_header_id|>\n\n" + trim(m.content) + "<|eot_id|>";
    }
  }
  if (add_assistant) out += "<|start_header_id|>assistant<|end_header_id|>\n\n";
  return out;
}

std::string format_hermes(const ToolPrompt& prompt, std::span<const ChatMessage> messages,
                          std::span<const ToolDefinition> tools, bool add_assistant) {
  // Qwen2.5's template.
  const bool system_first = !messages.empty() && messages[0].role == "system";
  const std::string system = system_first ? messages[0].content : prompt.default_system;
  std::string out = "<|im_start|>system\n" + system;
  if (!tools.empty()) {
    out +=
        "\n\n# Tools\n\nYou may call one or more functions to assist with the user query.\n\nYou are "
        "provided "
        "with function signatures within <tools></tools> XML tags:\n<tools>";
    for (const ToolDefinition& tool : tools) {
      out += '\n';
      out += python_json_dumps(tool.definition);
    }
    out +=
        "\n</tools>\n\nFor each function call, return a json object with function name and arguments within "
        "<tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, \"arguments\": "
        "<args-json-object>}\n</tool_call>";
  }
  out += "<|im_end|>\n";
  for (size_t i = 0; i < messages.size(); ++i) {
    const ChatMessage& m = messages[i];
    if (m.role == "user" || (m.role == "system" && i != 0) ||
        (m.role == "assistant" && m.tool_calls.empty())) {
      out += "<|im_start|>" + m.role + "\n" + m.content + "<|im_end|>\n";
    } else if (m.role == "assistant") {
      out += "<|im_start|>assistant";
      if (!m.content.empty()) out += "\n" + m.content;
      for (const ToolCall& call : m.tool_calls)
        out += "\n<tool_call>\n{\"name\": \"" + call.name + "\", \"arguments\": " + arguments_json(call, i) +
               "}\n</tool_call>";
      out += "<|im_end|>\n";
    } else if (m.role == "tool") {
      // Consecutive results share one user turn.
      if (i == 0 || messages[i - 1].role != "tool") out += "<|im_start|>user";
      out += "\n<tool_response>\n" + m.content + "\n</tool_response>";
      if (i + 1 == messages.size() || messages[i + 1].role != "tool") out += "<|im_end|>\n";
    }
  }
  if (add_assistant) out += "<|im_start|>assistant\n";
  return out;
}

}  // namespace

std::optional<ToolPrompt> tool_prompt_for(ChatFormat format, std::string_view chat_template) {
  if (format == ChatFormat::llama3) {
    ToolPrompt prompt{ToolForm::llama3_json, ""};
    prompt.dated_by_clock = chat_template.find("strftime_now") != std::string_view::npos;
    return prompt;
  }
  if (format == ChatFormat::chatml)
    return ToolPrompt{ToolForm::hermes, chat_template.find(kQwenSystem) != std::string_view::npos
                                            ? std::string(kQwenSystem)
                                            : ""};
  return std::nullopt;
}

std::string today_date() {
  const std::time_t now = std::time(nullptr);
  std::tm local{};
  localtime_r(&now, &local);
  char buffer[32];
  std::strftime(buffer, sizeof buffer, "%d %b %Y", &local);
  return buffer;
}

const char* tool_form_name(ToolForm form) { return form == ToolForm::llama3_json ? "llama3_json" : "hermes"; }

std::vector<ToolDefinition> parse_tools(std::string_view tools_json) {
  const ordered_json tools = ordered_json::parse(tools_json, nullptr, /*allow_exceptions=*/false);
  if (!tools.is_array()) throw std::invalid_argument("tools: expected a JSON array of tool objects");
  std::vector<ToolDefinition> out;
  std::set<std::string> names;
  for (size_t i = 0; i < tools.size(); ++i) {
    const ordered_json& tool = tools[i];
    const std::string where = "tools[" + std::to_string(i) + "]";
    if (!tool.is_object()) throw std::invalid_argument(where + ": expected an object");
    for (const auto& [key, value] : tool.items())
      if (key != "type" && key != "function")
        throw std::invalid_argument(where + ": unknown key '" + key + "' (type and function are read)");
    if (!tool.contains("type") || tool["type"] != "function")
      throw std::invalid_argument(where + ".type: expected \"function\"");
    if (!tool.contains("function") || !tool["function"].is_object())
      throw std::invalid_argument(where + ".function: expected an object");
    const ordered_json& function = tool["function"];
    for (const auto& [key, value] : function.items())
      if (key != "name" && key != "description" && key != "parameters" && key != "strict")
        throw std::invalid_argument(where + ".function: unknown key '" + key +
                                    "' (name, description, parameters and strict are read)");
    if (!function.contains("name") || !function["name"].is_string())
      throw std::invalid_argument(where + ".function.name: expected a string");
    const std::string name = function["name"].get<std::string>();
    // OpenAI's rule for names, which also keeps them plain inside the prompt's JSON.
    const bool plain =
        !name.empty() && name.size() <= 64 &&
        name.find_first_not_of("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_-") ==
            std::string::npos;
    if (!plain)
      throw std::invalid_argument(where + ".function.name: '" + name +
                                  "' is not 1 to 64 letters, digits, underscores or dashes");
    if (!names.insert(name).second)
      throw std::invalid_argument(where + ".function.name: '" + name + "' is offered twice");
    if (function.contains("description") && !function["description"].is_string())
      throw std::invalid_argument(where + ".function.description: expected a string");
    if (function.contains("strict") && !function["strict"].is_boolean())
      throw std::invalid_argument(where + ".function.strict: expected a boolean");
    std::string parameters = R"({"type":"object"})";
    if (function.contains("parameters")) {
      if (!function["parameters"].is_object())
        throw std::invalid_argument(where + ".function.parameters: expected a JSON schema object");
      parameters = function["parameters"].dump();
    }
    out.push_back({name, parameters, tool.dump()});
  }
  return out;
}

std::string format_chat_with_tools(const ToolPrompt& prompt, std::span<const ChatMessage> messages,
                                   std::span<const ToolDefinition> tools, bool add_assistant) {
  return prompt.form == ToolForm::llama3_json ? format_llama3_json(prompt, messages, tools, add_assistant)
                                              : format_hermes(prompt, messages, tools, add_assistant);
}

std::string required_call_schema(const ToolPrompt& prompt, std::span<const ToolDefinition> tools,
                                 const std::optional<std::string>& function) {
  const char* arguments_key = prompt.form == ToolForm::llama3_json ? "parameters" : "arguments";
  const auto call_of = [&](const ToolDefinition& tool) {
    return ordered_json{
        {"type", "object"},
        {"properties",
         {{"name", {{"const", tool.name}}}, {arguments_key, ordered_json::parse(tool.parameters_schema)}}},
        {"required", {"name", arguments_key}},
        {"additionalProperties", false}};
  };
  if (function) {
    for (const ToolDefinition& t : tools)
      if (t.name == *function) return call_of(t).dump();
    throw std::invalid_argument("toolChoice: no tool is named '" + *function + "'");
  }
  if (tools.empty()) throw std::invalid_argument("toolChoice: a call is required and no tools are offered");
  if (tools.size() == 1) return call_of(tools[0]).dump();
  // A call to any of them, each name with its own parameters (a union the schema's grammar follows).
  ordered_json any = ordered_json::array();
  for (const ToolDefinition& t : tools) any.push_back(call_of(t));
  return ordered_json{{"anyOf", any}}.dump();
}

ParsedAnswer parse_tool_calls(const ToolPrompt& prompt, std::string_view text, bool required) {
  if (required || prompt.form == ToolForm::llama3_json) {
    if (std::optional<std::vector<ToolCall>> calls = bare_calls(text)) return {"", std::move(*calls)};
    return {std::string(text), {}};
  }
  const size_t open = text.find(kToolCallOpen);
  if (open != std::string_view::npos)
    if (std::optional<std::vector<ToolCall>> calls = tagged_calls(text.substr(open)))
      return {std::string(text.substr(0, open)), std::move(*calls)};
  return {std::string(text), {}};
}

size_t streamable_content(const ToolPrompt& prompt, std::string_view text, bool required) {
  if (required) return 0;
  if (prompt.form == ToolForm::llama3_json) {
    size_t first = 0;
    while (first < text.size() && is_space(text[first])) ++first;
    if (first == text.size()) return 0;  // only whitespace yet: what follows decides
    const std::string_view rest = text.substr(first);
    if (rest[0] == '{' || rest.starts_with(kPythonTag) || kPythonTag.starts_with(rest)) return 0;
    return text.size();
  }
  const size_t open = text.find(kToolCallOpen);
  if (open != std::string_view::npos) return open;
  // Hold back an end that may be the start of "<tool_call>".
  for (size_t keep = std::min(text.size(), kToolCallOpen.size() - 1); keep > 0; --keep)
    if (kToolCallOpen.starts_with(text.substr(text.size() - keep))) return text.size() - keep;
  return text.size();
}

std::string python_json_dumps(std::string_view json, int indent) {
  const ordered_json value = ordered_json::parse(json, nullptr, /*allow_exceptions=*/false);
  if (value.is_discarded()) throw std::invalid_argument("not JSON: " + std::string(json.substr(0, 80)));
  return python_dumps(value, indent);
}

}  // namespace nibble::model
