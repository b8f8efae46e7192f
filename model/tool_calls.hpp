#pragma once
// Function calling (OpenAI's tools): the function definitions written into a chat prompt as the model's
// own chat template writes them, and the calls read back out of what it generates, as vLLM's tool
// parsers read them. Two forms, the Llama-family ones:
// - llama3_json: Llama 3.1 / 3.2 / 3.3's template (tools in the first user message, tojson(indent=4); a call
//   is the whole answer, {"name": ..., "parameters": {...}}), vLLM's llama3_json parser;
// - hermes: Qwen2.5's and Hermes's chatml template (tools in the system message inside <tools></tools>;
//   calls inside <tool_call></tool_call> after any text), vLLM's hermes parser.
// Nibble runs no Jinja: each form is written here and checked byte for byte against Jinja running the
// real templates (tests/test_tool_calls.cpp).
#include <cstddef>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "model/chat_template.hpp"

namespace nibble::model {

enum class ToolForm { llama3_json, hermes };

struct ToolPrompt {
  ToolForm form = ToolForm::llama3_json;
  // hermes: the system text written when the conversation has none (Qwen2.5's template has one).
  std::string default_system{};
  // llama3_json: the "Today Date" the system header shows. Llama 3.1 / 3.3's templates fix it; 3.2's
  // write the day of the request (strftime_now): then dated_by_clock, and the caller sets `date` to
  // today_date() for each prompt.
  std::string date = "26 Jul 2024";
  bool dated_by_clock = false;
};

// Today as Llama 3.2's template writes it (strftime "%d %b %Y", e.g. "06 Dec 2026"), in local time.
std::string today_date();

// The tool form of a chat format, from the template's text where there is one (nullopt: the format has
// none Nibble writes: tools are refused for it).
std::optional<ToolPrompt> tool_prompt_for(ChatFormat format, std::string_view chat_template);
const char* tool_form_name(ToolForm form);

// One function a request offers (the OpenAI tool object {"type": "function", "function": {...}}):
// `definition` is the object's JSON text as the client wrote it (key order kept: the prompt shows it).
struct ToolDefinition {
  std::string name;
  std::string parameters_schema;  // "parameters", or {"type": "object"} when absent
  std::string definition;
};

// The tools of a request: a JSON array of OpenAI tool objects. Throws std::invalid_argument naming the
// place ("tools[1].function.name: ...") for anything else, duplicate names included.
std::vector<ToolDefinition> parse_tools(std::string_view tools_json);

// The prompt for a conversation with tools (empty: none offered, but the conversation holds calls or
// tool results), ending with the assistant's turn when add_assistant. BOS is not written (the
// tokenizer adds it). Throws std::invalid_argument for what the template refuses (llama3_json: an
// assistant turn with more than one call; tools and no user message after the system's).
std::string format_chat_with_tools(const ToolPrompt& prompt, std::span<const ChatMessage> messages,
                                   std::span<const ToolDefinition> tools, bool add_assistant);

// The JSON schema an answer must follow when a call is required: {"name": the function, "parameters"
// (llama3_json) / "arguments" (hermes): its parameters}. `function`: the one named by tool_choice;
// nullopt: any of `tools`, an anyOf of one such object per tool (each name with its own parameters,
// which worker/json_schema_grammar's grammar follows).
std::string required_call_schema(const ToolPrompt& prompt, std::span<const ToolDefinition> tools,
                                 const std::optional<std::string>& function);

// An answer read as vLLM's parser of the form reads it: the calls, and the text that is not one. A
// call that does not parse (not JSON, no name, arguments not an object) leaves the whole text content
// and no calls. `required`: the answer was held to required_call_schema (a bare call object).
// The calls' ids are left empty (the caller names them); arguments are written as Python's json.dumps.
struct ParsedAnswer {
  std::string content;
  std::vector<ToolCall> calls;
};
ParsedAnswer parse_tool_calls(const ToolPrompt& prompt, std::string_view text, bool required);

// How much of an answer so far can be streamed as content: the bytes before where a call starts or may
// be starting (llama3_json: an answer that begins with '{' or <|python_tag|> is a call, so nothing until
// it begins otherwise; hermes: up to "<tool_call>" or a partial one at the end). `required`: none.
size_t streamable_content(const ToolPrompt& prompt, std::string_view text, bool required);

// JSON text as Python's json.dumps(value, ensure_ascii=False) writes it (", " and ": " between items,
// or indent spaces a level as json.dumps(indent=N)), what the templates' tojson filter writes.
// Throws std::invalid_argument when `json` is not JSON.
std::string python_json_dumps(std::string_view json, int indent = -1);

}  // namespace nibble::model
