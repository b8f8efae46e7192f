// The JSON output constraint (worker/json_constraint): the byte-level recognizer of JSON-object prefixes
// against nlohmann::json's parser (which accepts exactly the complete texts), rejections at the byte at
// fault with the state kept, and the vocabulary mask.
#include <gtest/gtest.h>

#include <cmath>
#include <nlohmann/json.hpp>
#include <random>
#include <string>
#include <vector>

#include "worker/json_constraint.hpp"

namespace nibble::worker {
namespace {

// How many leading bytes of `text` the recognizer takes, and whether the object is then complete.
std::pair<size_t, bool> run(std::string_view text) {
  JsonPrefix p;
  size_t n = 0;
  while (n < text.size() && p.feed(static_cast<unsigned char>(text[n]))) ++n;
  return {n, p.complete()};
}

const std::vector<std::string> kValid = {
    "{}",
    " {\"a\":1}",
    "{\"a\": [1, -2.5e+3, 0, 0.25, 1E-2, true, false, null, {\"b\": \"x\\\"\\\\\\u00e9\\n\"}], \"c\": {}}",
    "{\n  \"nested\": {\"deep\": [[[], {}], [\"\xc3\xa9\xe2\x82\xac\xf0\x9f\x98\x80\"]]},\n  \"n\": -0\n}\n",
    "{\"\": \"\", \"k\": [ ], \"z\" : 123456789012345678901234567890}",
};

TEST(JsonPrefix, ValidObjectsAreAcceptedWholeAndEveryPrefixIsIncomplete) {
  for (const std::string& text : kValid) {
    SCOPED_TRACE(text);
    ASSERT_TRUE(nlohmann::json::accept(text));
    const auto [taken, complete] = run(text);
    EXPECT_EQ(taken, text.size());
    EXPECT_TRUE(complete);
    // Strictly before the closing brace, never complete.
    const size_t close = text.find_last_of('}');
    for (size_t n = 0; n < close; ++n) EXPECT_FALSE(run(text.substr(0, n)).second) << n;
  }
}

TEST(JsonPrefix, RefusesTheByteAtFaultAndKeepsItsState) {
  struct Case {
    std::string text;
    size_t fault;  // the first byte refused
  };
  const std::vector<Case> cases = {
      {"[]", 0},  // the top level is an object
      {"\"a\"", 0},
      {"{\"a\" 1}", 5},
      {"{,}", 1},
      {"{\"a\":01}", 6},  // no leading zeros
      {"{\"a\":1.}", 7},
      {"{\"a\":-}", 6},
      {"{\"a\":1e}", 7},
      {"{\"a\":tru}", 8},
      {"{\"a\":nul1}", 8},
      {"{\"a\":\"\x01\"}", 6},  // control characters must be escaped
      {"{\"a\":\"\\q\"}", 7},
      {"{\"a\":\"\\u12G4\"}", 10},
      {"{\"a\":1}}", 7},
      {"{\"a\":[1,]}", 8},
      {"{\"a\":1,}", 7},
      {"{\"a\":[}", 6},
      {"{\"a\":{]}", 6},
      {"{\"\xc0\x80\":1}", 2},          // overlong
      {"{\"\xed\xa0\x80\":1}", 3},      // a surrogate
      {"{\"\xf4\x90\x80\x80\":1}", 3},  // beyond U+10FFFF
      {"{\"\x80\":1}", 2},              // a continuation byte first
      {"{} x", 3},                      // only whitespace after the object
      {"{'a':1}", 1},
  };
  for (const Case& c : cases) {
    SCOPED_TRACE(c.text);
    EXPECT_FALSE(nlohmann::json::accept(c.text) && c.text[0] == '{');
    EXPECT_EQ(run(c.text).first, c.fault);
    // The refused byte left the state as it was: a byte that fits still does.
    JsonPrefix p;
    ASSERT_TRUE(p.feed(std::string_view(c.text).substr(0, c.fault)));
    const JsonPrefix before = p;
    EXPECT_FALSE(p.feed(static_cast<unsigned char>(c.text[c.fault])));
    EXPECT_EQ(std::memcmp(&before, &p, sizeof p), 0);
  }
}

TEST(JsonPrefix, LimitsNestingAndWhitespace) {
  std::string deep = "{\"a\":";
  for (int i = 1; i < JsonPrefix::kMaxDepth; ++i) deep += "[";
  EXPECT_EQ(run(deep).first, deep.size());
  EXPECT_EQ(run(deep + "[").first, deep.size());  // one container more than kMaxDepth
  // Whitespace as llama.cpp's JSON grammar has it: one space, or a newline and up to 20 indents.
  const std::string indent(JsonPrefix::kMaxIndent, '\t');
  EXPECT_TRUE(run("{\n" + indent + "\"a\" : 1 ,\n\"b\":\n  2 }").second);
  EXPECT_EQ(run("{\n" + indent + " }").first, 2 + indent.size());
  EXPECT_EQ(run("{  }").first, 2u);
  EXPECT_EQ(run("{\t}").first, 1u);
  EXPECT_EQ(run("{\r\n}").first, 1u);
  EXPECT_EQ(run("{ \n}").first, 2u);
  EXPECT_EQ(run(" {}").first, 3u);
  EXPECT_EQ(run("  {}").first, 1u);  // one space before the object at most
  EXPECT_EQ(run("\n{}").first, 0u);
  EXPECT_TRUE(run("{}\n").second);
  // Whitespace inside strings is text.
  EXPECT_TRUE(run("{\"      \":1}").second);
}

// Whether every run of whitespace outside strings is one space, or a newline and up to 20 spaces or tabs
// (the first, before the object, one space at most).
bool whitespace_as_llama_cpp(const std::string& text) {
  bool in_string = false, escaped = false, first = true;
  for (size_t i = 0; i < text.size();) {
    const char c = text[i];
    if (in_string) {
      in_string = escaped || c != '"';
      escaped = !escaped && c == '\\';
      ++i;
      continue;
    }
    const size_t end = text.find_first_not_of(" \t\n\r", i);
    const std::string run = text.substr(i, (end == std::string::npos ? text.size() : end) - i);
    if (!run.empty()) {
      const bool ok = run == " " || (!first && run[0] == '\n' && run.size() <= 21 &&
                                     run.find_first_not_of(" \t", 1) == std::string::npos);
      if (!ok) return false;
      i += run.size();
    } else {
      in_string = c == '"';
      ++i;
    }
    first = false;
  }
  return true;
}

// Mutations of valid objects (a byte deleted, inserted or replaced from JSON's alphabet): the recognizer
// takes the whole text and calls it complete exactly when nlohmann::json accepts it (an object, within
// the depth limit, which these texts never reach, and with whitespace as llama.cpp's JSON grammar has it). No
// 'e' or 'E' is inserted, and texts with a number beyond a double are left out: nlohmann refuses those,
// JSON's grammar allows them.
TEST(JsonPrefix, CompleteExactlyWhenNlohmannAcceptsAnObject) {
  const std::string alphabet = "{}[]\":,0123456789.-+trufalsn \\\nx\xc3\xa9";
  std::mt19937 rng(7);
  int accepted = 0, refused = 0;
  for (int i = 0; i < 20000; ++i) {
    std::string text = kValid[rng() % kValid.size()];
    for (int m = 0, edits = 1 + static_cast<int>(rng() % 3); m < edits && !text.empty(); ++m) {
      const size_t at = rng() % text.size();
      const char c = alphabet[rng() % alphabet.size()];
      switch (rng() % 3) {
        case 0:
          text.erase(at, 1);
          break;
        case 1:
          text.insert(at, 1, c);
          break;
        default:
          text[at] = c;
      }
    }
    const auto [taken, complete] = run(text);
    bool reference = false;
    try {
      // ... with whitespace as the recognizer allows it.
      reference = nlohmann::json::parse(text).is_object() && whitespace_as_llama_cpp(text);
    } catch (const nlohmann::json::parse_error&) {
    } catch (const nlohmann::json::out_of_range&) {
      continue;  // a number beyond a double (a digit added to an exponent): valid JSON, refused there
    }
    const bool ours = taken == text.size() && complete;
    EXPECT_EQ(ours, reference) << text;
    (reference ? accepted : refused)++;
  }
  EXPECT_GT(accepted, 1000);
  EXPECT_GT(refused, 1000);
}

TEST(JsonConstraint, MasksWhatCannotContinueAndEndsOnlyAComplete) {
  //                               0     1    2       3    4    5    6    7   8      9     10
  const std::vector<std::string> vocab = {"", "{", "}", "\"a\"", ":", "1", " ", "x", "}\n", "}}", "\xc3\xa9"};
  // Token 0 ends a generation (no bytes), as does 9, although it has bytes: only after the object.
  const JsonConstraint constraint(vocab, {0, 9});
  const auto kept = [&](const JsonPrefix& state) {
    std::vector<float> logits(vocab.size(), 1.0f);
    constraint.mask(state, logits.data(), static_cast<int64_t>(logits.size()));
    std::vector<int32_t> ids;
    for (size_t t = 0; t < logits.size(); ++t) {
      EXPECT_EQ(std::isinf(logits[t]), !constraint.allows(state, static_cast<int32_t>(t)));
      if (!std::isinf(logits[t])) ids.push_back(static_cast<int32_t>(t));
    }
    return ids;
  };
  JsonPrefix state;
  EXPECT_EQ(kept(state), (std::vector<int32_t>{1, 6}));
  ASSERT_TRUE(state.feed("{"));
  EXPECT_EQ(kept(state), (std::vector<int32_t>{2, 3, 6, 8}));
  ASSERT_TRUE(state.feed("\"a\""));
  EXPECT_EQ(kept(state), (std::vector<int32_t>{4, 6}));
  JsonPrefix in_key;
  ASSERT_TRUE(in_key.feed("{\"x"));  // inside a key: text (not a newline), not a quote then more
  EXPECT_EQ(kept(in_key), (std::vector<int32_t>{1, 2, 4, 5, 6, 7, 10}));
  ASSERT_TRUE(state.feed(":1"));
  EXPECT_EQ(kept(state), (std::vector<int32_t>{2, 5, 6, 8}));
  ASSERT_TRUE(state.feed("}"));
  EXPECT_EQ(kept(state), (std::vector<int32_t>{0, 9}));  // complete: only the ends
  // A longer logits row than the vocabulary (padded heads): the rest is masked.
  std::vector<float> padded(vocab.size() + 3, 1.0f);
  constraint.mask(JsonPrefix{}, padded.data(), static_cast<int64_t>(padded.size()));
  EXPECT_TRUE(std::isinf(padded.back()));
}

}  // namespace
}  // namespace nibble::worker
