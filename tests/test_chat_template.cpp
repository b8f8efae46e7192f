// Chat formatting (model/chat_template) against llama.cpp's llama_chat_apply_template: every format by
// name on four conversations (system messages, whitespace the strip / trim variants remove, several
// turns, with and without the assistant's header), and the formats llama.cpp detects in template
// strings (tests/data/chat-templates, made with llama-cpp-python); templates of formats Nibble does not
// write are refused, not mistaken for another.
#include <gtest/gtest.h>

#include <fstream>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "model/chat_template.hpp"
#include "tests/support/test_support.hpp"

namespace nibble::model {
namespace {

nlohmann::json reference() {
  std::ifstream in(test::test_data_dir() / "chat-templates" / "reference.json");
  EXPECT_TRUE(in) << "tests/data/chat-templates/reference.json";
  return nlohmann::json::parse(in);
}

std::vector<ChatMessage> messages_of(const nlohmann::json& j) {
  std::vector<ChatMessage> out;
  for (const auto& m : j) out.push_back({m[0].get<std::string>(), m[1].get<std::string>()});
  return out;
}

TEST(ChatTemplate, EveryFormatWritesLlamaCppsText) {
  const nlohmann::json ref = reference();
  int compared = 0;
  for (const auto& c : ref["named"]) {
    const std::string name = c["format"].get<std::string>();
    SCOPED_TRACE(name + " " + c["messages"].dump() + (c["add_assistant"].get<bool>() ? " +assistant" : ""));
    const auto format = chat_format_by_name(name);
    ASSERT_TRUE(format.has_value());
    EXPECT_STREQ(chat_format_name(*format), name.c_str());
    EXPECT_EQ(detect_chat_format(name), format);  // a name is taken as a name
    EXPECT_EQ(format_chat(*format, messages_of(c["messages"]), c["add_assistant"].get<bool>()),
              c["text"].get<std::string>());
    ++compared;
  }
  EXPECT_EQ(compared, 14 * 4 * 2);
}

TEST(ChatTemplate, DetectsTheFormatLlamaCppDetects) {
  const nlohmann::json ref = reference();
  for (const auto& c : ref["detected"]) {
    const std::string tmpl = c["template"].get<std::string>();
    SCOPED_TRACE(tmpl);
    const auto format = detect_chat_format(tmpl);
    ASSERT_TRUE(format.has_value());
    EXPECT_EQ(format_chat(*format, messages_of(c["messages"]), true), c["text"].get<std::string>());
  }
}

TEST(ChatTemplate, TemplatesOfOtherFormatsAreNotMistakenForOnes) {
  for (const char* other :
       {"{{'<|im_start|>' + role + '<|im_sep|>'}}",                      // phi4: chatml's marker and more
        "{{'<|user|>' + content + '</s>' + '<|assistant|>'}}",           // falcon3
        "{% for m in messages %}USER: {{ m }} ASSISTANT: {% endfor %}",  // vicuna
        "{{ '<|START_OF_TURN_TOKEN|><|USER_TOKEN|>' }}<|start_header_id|><|end_header_id|>",  // command-r
                                                                                              // first
        "plain {{ content }}", ""}) {
    EXPECT_FALSE(detect_chat_format(other).has_value()) << other;
  }
  EXPECT_FALSE(chat_format_by_name("llama-3").has_value());
  EXPECT_NE(chat_format_names().find("llama2-sys-strip"), std::string::npos);
}

}  // namespace
}  // namespace nibble::model
