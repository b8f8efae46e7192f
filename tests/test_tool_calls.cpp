// Function calling (model/tool_calls): each form's prompt byte for byte as Jinja renders the real
// templates (Llama 3.1 / 3.3, Qwen2.5: tests/data/tool-templates, made by tools/tool_template_reference.py),
// and the answers read back as vLLM's llama3_json and hermes parsers read them.
#include <gtest/gtest.h>

#include <fstream>
#include <nlohmann/json.hpp>
#include <regex>
#include <string>
#include <vector>

#include "model/tool_calls.hpp"
#include "tests/support/test_support.hpp"
#include "worker/gbnf_grammar.hpp"
#include "worker/json_constraint.hpp"
#include "worker/json_schema.hpp"
#include "worker/json_schema_grammar.hpp"

namespace nibble::model {
namespace {

constexpr const char* kQwenSystem = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant.";

std::vector<ChatMessage> messages_of(const nlohmann::ordered_json& j) {
  std::vector<ChatMessage> out;
  for (const auto& m : j) {
    ChatMessage message{m["role"].get<std::string>(), m["content"].get<std::string>()};
    if (m.contains("tool_calls"))
      for (const auto& c : m["tool_calls"])
        message.tool_calls.push_back({c["id"].get<std::string>(), c["function"]["name"].get<std::string>(),
                                      c["function"]["arguments"].get<std::string>()});
    out.push_back(std::move(message));
  }
  return out;
}

TEST(ToolCalls, PromptsAreWhatTheRealTemplatesRender) {
  std::ifstream in(test::test_data_dir() / "tool-templates" / "reference.json");
  ASSERT_TRUE(in) << "tests/data/tool-templates/reference.json";
  // Ordered: the prompt shows the tools' keys in the client's order.
  const nlohmann::ordered_json ref = nlohmann::ordered_json::parse(in);
  int compared = 0, refused = 0;
  for (const auto& c : ref["cases"]) {
    const bool add = c["add_generation_prompt"].get<bool>();
    SCOPED_TRACE(c["template"].get<std::string>() + " case " + std::to_string(c["case"].get<int>()) +
                 (add ? " +assistant" : ""));
    const std::optional<ChatFormat> format = chat_format_by_name(c["chat_format"].get<std::string>());
    ASSERT_TRUE(format.has_value());
    // The template's text as far as tool_prompt_for reads it: Qwen's default system line, Llama 3.2's
    // strftime_now (the day of the request: the reference's fixed day stands for it).
    const bool dated = !c["date"].is_null();
    std::optional<ToolPrompt> prompt =
        tool_prompt_for(*format, c["template_has_qwen_system"].get<bool>() ? kQwenSystem
                                 : dated                                   ? "strftime_now(...)"
                                                                           : "");
    ASSERT_TRUE(prompt.has_value());
    EXPECT_EQ(prompt->dated_by_clock, dated);
    if (dated) prompt->date = c["date"].get<std::string>();
    const std::vector<ToolDefinition> tools = parse_tools(c["tools"].dump());
    const std::vector<ChatMessage> messages = messages_of(c["messages"]);
    if (c.contains("error")) {
      // The template refuses the conversation (Llama's: one call per turn): so does Nibble, by name.
      try {
        format_chat_with_tools(*prompt, messages, tools, add);
        ADD_FAILURE() << "accepted what the template refuses: " << c["error"];
      } catch (const std::invalid_argument& e) {
        EXPECT_NE(std::string(e.what()).find("tool_calls"), std::string::npos) << e.what();
      }
      ++refused;
      continue;
    }
    EXPECT_EQ(format_chat_with_tools(*prompt, messages, tools, add), c["expected"].get<std::string>());
    ++compared;
  }
  EXPECT_EQ(compared, 34);
  EXPECT_EQ(refused, 6);
  // Today as strftime("%d %b %Y") writes it: "06 Dec 2026".
  EXPECT_TRUE(std::regex_match(today_date(), std::regex("[0-3][0-9] [A-Z][a-z]{2} [0-9]{4}")))
      << today_date();
}

TEST(ToolCalls, PythonJsonDumpsWritesAsPython) {
  EXPECT_EQ(python_json_dumps(R"({"b":1,"a":[1,2.5,"x\"\n",{}],"c":{"d":null,"e":[]}})"),
            R"({"b": 1, "a": [1, 2.5, "x\"\n", {}], "c": {"d": null, "e": []}})");
  EXPECT_EQ(python_json_dumps(R"({"a":[1],"b":{}})", 2), "{\n  \"a\": [\n    1\n  ],\n  \"b\": {}\n}");
  EXPECT_EQ(python_json_dumps(R"("Zürich \u0001")"), "\"Zürich \\u0001\"");
  EXPECT_THROW(python_json_dumps("{"), std::invalid_argument);
}

TEST(ToolCalls, ToolsAreCheckedByName) {
  const auto refusal = [](const std::string& tools) -> std::string {
    try {
      parse_tools(tools);
    } catch (const std::invalid_argument& e) {
      return e.what();
    }
    return "accepted";
  };
  EXPECT_EQ(refusal("{}"), "tools: expected a JSON array of tool objects");
  EXPECT_EQ(refusal(R"([{"type":"code"}])"), "tools[0].type: expected \"function\"");
  EXPECT_EQ(refusal(R"([{"type":"function","function":{"name":"a b"}}])"),
            "tools[0].function.name: 'a b' is not 1 to 64 letters, digits, underscores or dashes");
  EXPECT_EQ(
      refusal(R"([{"type":"function","function":{"name":"f"}},{"type":"function","function":{"name":"f"}}])"),
      "tools[1].function.name: 'f' is offered twice");
  EXPECT_EQ(refusal(R"([{"type":"function","function":{"name":"f","parameters":[]}}])"),
            "tools[0].function.parameters: expected a JSON schema object");
  EXPECT_EQ(refusal(R"([{"type":"function","function":{"name":"f","returns":{}}}])"),
            "tools[0].function: unknown key 'returns' (name, description, parameters and strict are read)");
  const std::vector<ToolDefinition> tools =
      parse_tools(R"([{"type":"function","function":{"name":"f","description":"d"}}])");
  ASSERT_EQ(tools.size(), 1u);
  EXPECT_EQ(tools[0].name, "f");
  EXPECT_EQ(tools[0].parameters_schema, R"({"type":"object"})");
}

TEST(ToolCalls, Llama3AnswersReadAsVllmsLlama3JsonParser) {
  const ToolPrompt llama{ToolForm::llama3_json, ""};
  ParsedAnswer a =
      parse_tool_calls(llama, R"( {"name": "get_weather", "parameters": {"city":"Oslo","days":2}})", false);
  ASSERT_EQ(a.calls.size(), 1u);
  EXPECT_EQ(a.content, "");
  EXPECT_EQ(a.calls[0].name, "get_weather");
  EXPECT_EQ(a.calls[0].arguments, R"({"city": "Oslo", "days": 2})");
  // The python tag, "arguments" for "parameters", several calls separated by ';', braces inside strings.
  a = parse_tool_calls(
      llama, R"(<|python_tag|>{"name": "a", "arguments": {"s": "}{"}}; {"name": "b", "parameters": {}})",
      false);
  ASSERT_EQ(a.calls.size(), 2u);
  EXPECT_EQ(a.calls[0].arguments, R"({"s": "}{"})");
  EXPECT_EQ(a.calls[1].name, "b");
  // Not a call: the whole text is the content.
  for (const char* text : {"It is sunny.", R"({"name": "a"})", R"({"name": "a", "parameters": [1]})",
                           R"({"name": "a", "parameters": {})", R"({"name": 3, "parameters": {}})",
                           R"({"name": "a", "parameters": {}} and more)"}) {
    a = parse_tool_calls(llama, text, false);
    EXPECT_TRUE(a.calls.empty()) << text;
    EXPECT_EQ(a.content, text);
  }
}

TEST(ToolCalls, HermesAnswersReadAsVllmsHermesParser) {
  const ToolPrompt hermes{ToolForm::hermes, ""};
  ParsedAnswer a = parse_tool_calls(
      hermes,
      "Let me look.\n<tool_call>\n{\"name\": \"a\", \"arguments\": {\"x\": 1}}\n</tool_call>\n<tool_call>\n"
      "{\"name\": \"b\", \"arguments\": {}}\n",
      false);
  EXPECT_EQ(a.content, "Let me look.\n");
  ASSERT_EQ(a.calls.size(), 2u);
  EXPECT_EQ(a.calls[0].name, "a");
  EXPECT_EQ(a.calls[0].arguments, R"({"x": 1})");
  EXPECT_EQ(a.calls[1].name, "b");
  a = parse_tool_calls(hermes, "plain {\"name\": \"a\", \"arguments\": {}}", false);
  EXPECT_TRUE(a.calls.empty());
  a = parse_tool_calls(hermes, "x<tool_call>not json</tool_call>", false);
  EXPECT_TRUE(a.calls.empty());
  EXPECT_EQ(a.content, "x<tool_call>not json</tool_call>");
  // Held to the required-call schema, the answer is the bare object.
  a = parse_tool_calls(hermes, R"({"name": "a", "arguments": {"x": [true]}})", true);
  ASSERT_EQ(a.calls.size(), 1u);
  EXPECT_EQ(a.calls[0].arguments, R"({"x": [true]})");
}

TEST(ToolCalls, StreamedContentStopsWhereACallMayStart) {
  const ToolPrompt llama{ToolForm::llama3_json, ""}, hermes{ToolForm::hermes, ""};
  EXPECT_EQ(streamable_content(llama, "", false), 0u);
  EXPECT_EQ(streamable_content(llama, "  \n", false), 0u);
  EXPECT_EQ(streamable_content(llama, " {\"na", false), 0u);
  EXPECT_EQ(streamable_content(llama, "<|python", false), 0u);
  EXPECT_EQ(streamable_content(llama, " Hello", false), 6u);
  EXPECT_EQ(streamable_content(llama, "Hello {", false), 7u);
  EXPECT_EQ(streamable_content(llama, "Hello", true), 0u);
  EXPECT_EQ(streamable_content(hermes, "abc", false), 3u);
  EXPECT_EQ(streamable_content(hermes, "abc<tool_c", false), 3u);
  EXPECT_EQ(streamable_content(hermes, "abc<tool_call>{", false), 3u);
  EXPECT_EQ(streamable_content(hermes, "abc<tools>", false), 10u);
  // What may be streamed never shrinks as the answer grows.
  const std::string answer = "Sure <b> <tool <tool_call>\n{\"name\": \"a\"}";
  for (const ToolPrompt& p : {llama, hermes}) {
    size_t before = 0;
    for (size_t n = 0; n <= answer.size(); ++n) {
      const size_t now = streamable_content(p, std::string_view(answer).substr(0, n), false);
      EXPECT_GE(now, before) << n;
      EXPECT_LE(now, n);
      before = now;
    }
  }
}

// The required-call schema compiles in the structured-output subset, and what it admits is a call the
// parser reads: walked byte by byte through the recognizer.
TEST(ToolCalls, RequiredCallSchemaAdmitsCallsTheParserReads) {
  const std::vector<ToolDefinition> tools = parse_tools(
      R"([{"type":"function","function":{"name":"get_weather","parameters":{"type":"object","properties":{"city":{"type":"string"},"days":{"type":"integer"}},"required":["city"],"additionalProperties":false}}},
          {"type":"function","function":{"name":"now"}}])");
  for (const ToolPrompt& p : {ToolPrompt{ToolForm::llama3_json, ""}, ToolPrompt{ToolForm::hermes, ""}}) {
    const std::string key = p.form == ToolForm::llama3_json ? "parameters" : "arguments";
    // One function: the recognizer follows it; any of several: a union of objects, the schema's grammar.
    const worker::SchemaConstraint named =
        worker::constrain_to_schema(required_call_schema(p, tools, "get_weather"));
    const worker::SchemaConstraint any =
        worker::constrain_to_schema(required_call_schema(p, tools, std::nullopt));
    ASSERT_NE(named.schema, nullptr);
    ASSERT_EQ(any.schema, nullptr);
    const auto any_grammar = worker::Grammar::compile(any.grammar);
    const auto admits_named = [&](const std::string& text) {
      worker::JsonPrefix state(named.schema.get());
      return state.feed(text) && state.complete();
    };
    const auto admits_any = [&](const std::string& text) {
      worker::GrammarPrefix state(any_grammar.get());
      return state.feed(text) && state.complete();
    };
    const std::string good = R"({"name": "get_weather", ")" + key + R"(": {"city": "Oslo", "days": 3}})";
    EXPECT_TRUE(admits_named(good));
    EXPECT_TRUE(admits_any(good));
    EXPECT_FALSE(admits_named(R"({"name": "now", ")" + key + R"(": {}})"));
    EXPECT_TRUE(admits_any(R"({"name": "now", ")" + key + R"(": {}})"));
    EXPECT_FALSE(admits_named(R"({"name": "get_weather", ")" + key + R"(": {"days": 3}})"));
    // Each name with its own parameters: get_weather's need a city, whichever call it is.
    EXPECT_FALSE(admits_any(R"({"name": "get_weather", ")" + key + R"(": {"days": 3}})"));
    EXPECT_FALSE(admits_any(R"({"name": "later", ")" + key + R"(": {}})"));
    const ParsedAnswer a = parse_tool_calls(p, good, true);
    ASSERT_EQ(a.calls.size(), 1u);
    EXPECT_EQ(a.calls[0].arguments, R"({"city": "Oslo", "days": 3})");
  }
  EXPECT_THROW(required_call_schema({}, tools, "missing"), std::invalid_argument);
}

}  // namespace
}  // namespace nibble::model
