// Chat formatting (model/chat_template) against llama.cpp's llama_chat_apply_template: every one of its
// formats by name on five conversations (system messages, whitespace the strip / trim variants remove,
// several turns, tool and other roles, with and without the assistant's header), and the format llama.cpp
// detects in a template string for each of its detection rules (tests/data/chat-templates, made with
// llama-cpp-python); templates llama.cpp detects nothing in are refused.
#include <gtest/gtest.h>

#include <algorithm>
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
  EXPECT_EQ(compared, 54 * 5 * 2);  // all of llama.cpp's named formats
}

TEST(ChatTemplate, DetectsTheFormatLlamaCppDetects) {
  const nlohmann::json ref = reference();
  const nlohmann::json& conversations = ref["conversations"];
  int detected = 0;
  for (const auto& c : ref["detected"]) {
    const std::string tmpl = c["template"].get<std::string>();
    SCOPED_TRACE(tmpl);
    const auto format = detect_chat_format(tmpl);
    ASSERT_TRUE(format.has_value());
    // The format llama.cpp writes this template's texts with (dots1, the one format llama.cpp has no
    // name for, matches none of the named ones).
    const auto& formats = c["formats"];
    if (formats.empty()) {
      EXPECT_STREQ(chat_format_name(*format), "dots1");
    } else {
      EXPECT_NE(std::find(formats.begin(), formats.end(), std::string(chat_format_name(*format))),
                formats.end())
          << chat_format_name(*format) << " is not " << formats.dump();
    }
    size_t i = 0;
    for (const auto& conversation : conversations) {
      for (const bool add_assistant : {true, false}) {
        EXPECT_EQ(format_chat(*format, messages_of(conversation), add_assistant),
                  c["texts"][i].get<std::string>())
            << conversation.dump() << (add_assistant ? " +assistant" : "");
        ++i;
      }
    }
    ++detected;
  }
  EXPECT_EQ(detected, 54);
}

TEST(ChatTemplate, TemplatesLlamaCppDetectsNothingInAreRefused) {
  const nlohmann::json ref = reference();
  for (const auto& t : ref["undetected"]) {
    EXPECT_FALSE(detect_chat_format(t.get<std::string>()).has_value()) << t.get<std::string>();
  }
  EXPECT_FALSE(chat_format_by_name("llama-3").has_value());
  EXPECT_NE(chat_format_names().find("llama2-sys-strip"), std::string::npos);
  EXPECT_NE(chat_format_names().find("granite-4.1"), std::string::npos);
}

}  // namespace
}  // namespace nibble::model
