// JSON schemas as grammars (worker/json_schema_grammar): what the recognizer cannot follow (tagged unions of
// objects, recursion, item and length bounds, enums of any value, extra keys with a schema) made GBNF; the
// texts the grammar takes are instances (random walks through it, parsed by nlohmann and checked by an
// independent validator), instances written in the schema's order are taken whole, and what neither
// enforces is refused by name.
#include <gtest/gtest.h>

#include <algorithm>
#include <nlohmann/json.hpp>
#include <random>
#include <string>
#include <vector>

#include "worker/gbnf_grammar.hpp"
#include "worker/json_schema_grammar.hpp"

namespace nibble::worker {
namespace {

using nlohmann::json;

const char* kSchema = R"({
  "$defs": {
    "Node": {"type": "object", "properties": {"v": {"type": "integer", "minimum": 0},
             "kids": {"type": "array", "items": {"$ref": "#/$defs/Node"}, "maxItems": 2}},
             "required": ["v"], "additionalProperties": false}
  },
  "type": "object",
  "properties": {
    "shape": {"anyOf": [
      {"type": "object", "properties": {"kind": {"const": "circle"}, "r": {"type": "number"}}, "required": ["kind", "r"]},
      {"type": "object", "properties": {"kind": {"const": "square"}, "side": {"type": "integer"}}, "required": ["kind", "side"]}]},
    "tags": {"type": "array", "items": {"type": "string", "minLength": 1, "maxLength": 3}, "minItems": 1, "maxItems": 3},
    "level": {"enum": [1, "high", null, true]},
    "tree": {"$ref": "#/$defs/Node"},
    "extra": {"type": "object", "additionalProperties": {"type": "boolean"}}
  },
  "required": ["shape", "tags"],
  "additionalProperties": false
})";

// An independent reading of the keywords above: whether `v` is an instance of `s` (refs against `root`).
bool valid(const json& root, const json& s, const json& v) {
  if (s.contains("$ref"))
    return valid(root, root.at(json::json_pointer(s["$ref"].get<std::string>().substr(1))), v);
  if (s.contains("anyOf")) {
    for (const json& a : s["anyOf"])
      if (valid(root, a, v)) return true;
    return false;
  }
  if (s.contains("const")) return v == s["const"];
  if (s.contains("enum")) return std::find(s["enum"].begin(), s["enum"].end(), v) != s["enum"].end();
  const std::string type = s.value("type", "any");
  if (type == "integer") return v.is_number_integer() && (!s.contains("minimum") || v.get<int64_t>() >= 0);
  if (type == "number") return v.is_number();
  if (type == "boolean") return v.is_boolean();
  if (type == "string") {
    if (!v.is_string()) return false;
    const size_t n = v.get<std::string>().size();  // the test's strings are ASCII
    return n >= s.value("minLength", size_t{0}) && n <= s.value("maxLength", size_t{1000000});
  }
  if (type == "array") {
    if (!v.is_array() || v.size() < s.value("minItems", size_t{0}) ||
        v.size() > s.value("maxItems", size_t{1000000}))
      return false;
    for (const json& item : v)
      if (s.contains("items") && !valid(root, s["items"], item)) return false;
    return true;
  }
  if (type == "object") {
    if (!v.is_object()) return false;
    const json properties = s.value("properties", json::object());
    for (const auto& [key, value] : v.items()) {
      if (properties.contains(key)) {
        if (!valid(root, properties[key], value)) return false;
      } else if (!s.contains("additionalProperties") || s["additionalProperties"] == false) {
        if (!properties.empty() || s.contains("additionalProperties")) return false;
      } else if (s["additionalProperties"].is_object() && !valid(root, s["additionalProperties"], value)) {
        return false;
      }
    }
    for (const json& key : s.value("required", json::array()))
      if (!v.contains(key.get<std::string>())) return false;
    return true;
  }
  return true;
}

bool takes(const Grammar& grammar, const std::string& text) {
  GrammarPrefix p(&grammar);
  return p.feed(text) && p.complete();
}

TEST(JsonSchemaGrammar, InstancesInTheSchemasOrderAreTakenAndOthersNot) {
  const auto grammar = Grammar::compile(json_schema_grammar(kSchema));
  const json root = json::parse(kSchema);
  for (
      const char* text :
      {R"({"shape": {"kind": "circle", "r": 1.5}, "tags": ["a"]})",
       R"({"shape": {"kind":"square","side":-3}, "tags": ["abc", "d", "\u00e9"], "level": "high"})",
       R"({"shape": {"kind": "circle", "r": 2}, "tags": ["x"], "level": null, "tree": {"v": 0, "kids": [{"v": 7}, {"v": 1, "kids": []}]}})",
       R"({"shape": {"kind": "square", "side": 1}, "tags": ["x"], "extra": {"any": true, "b": false}})",
       R"({ "shape": { "kind": "circle", "r": -0.5e+2 }, "tags": [ "y" ] })"}) {
    EXPECT_TRUE(takes(*grammar, text)) << text;
    EXPECT_TRUE(valid(root, root, json::parse(text))) << text;  // the test's own validator agrees
  }
  for (
      const char* text :
      {R"({"shape": {"kind": "triangle", "r": 1}, "tags": ["a"]})",   // no such alternative
       R"({"shape": {"kind": "circle", "side": 1}, "tags": ["a"]})",  // a square's key in a circle
       R"({"shape": {"kind": "circle", "r": 1}, "tags": []})",        // minItems 1
       R"({"shape": {"kind": "circle", "r": 1}, "tags": ["abcd"]})",  // maxLength 3
       R"({"shape": {"kind": "circle", "r": 1}, "tags": ["a"], "level": 2})",
       R"({"shape": {"kind": "circle", "r": 1}, "tags": ["a"], "tree": {"v": -1}})",  // minimum 0
       R"({"shape": {"kind": "circle", "r": 1}, "tags": ["a"], "tree": {"v": 1, "kids": [{"v": 1}, {"v": 2}, {"v": 3}]}})",
       R"({"shape": {"kind": "circle", "r": 1}, "tags": ["a"], "extra": {"a": 1}})", R"({"tags": ["a"]})"}) {
    EXPECT_FALSE(takes(*grammar, text)) << text;
  }
}

// Random walks through the grammar (each step one of the bytes it takes, closing bytes preferred later):
// every walk that completes is JSON (nlohmann) and an instance (the validator above).
TEST(JsonSchemaGrammar, EveryTextTheGrammarCompletesIsAnInstance) {
  const auto grammar = Grammar::compile(json_schema_grammar(kSchema));
  const json root = json::parse(kSchema);
  std::mt19937 rng(8);
  int completed = 0;
  for (int walk = 0; walk < 400; ++walk) {
    GrammarPrefix p(grammar.get());
    std::string text;
    for (int step = 0; step < 400 && !p.complete(); ++step) {
      std::vector<unsigned char> bytes;
      for (int c = 1; c < 128; ++c) {  // ASCII: the walk's strings stay within the validator's lengths
        GrammarPrefix next = p;
        if (next.feed(static_cast<unsigned char>(c))) bytes.push_back(static_cast<unsigned char>(c));
      }
      ASSERT_FALSE(bytes.empty()) << "a dead end after " << text;
      unsigned char c = bytes[rng() % bytes.size()];
      for (const unsigned char closer : {'"', '}', ']'})
        if (step > 30 && rng() % 2 == 0 && std::find(bytes.begin(), bytes.end(), closer) != bytes.end())
          c = closer;
      ASSERT_TRUE(p.feed(c));
      text += static_cast<char>(c);
    }
    if (!p.complete()) continue;
    ++completed;
    const json parsed = json::parse(text, nullptr, false);
    ASSERT_FALSE(parsed.is_discarded()) << text;
    EXPECT_TRUE(valid(root, root, parsed)) << text;
  }
  EXPECT_GT(completed, 100);
}

// Patterns (anchored) and formats: the string's characters match the expression whole; characters
// JSON escapes are never written raw (a negated class or '.' leaves them out).
TEST(JsonSchemaGrammar, PatternsAndFormatsHoldTheStringsCharacters) {
  const auto grammar = Grammar::compile(json_schema_grammar(R"({"type": "object", "properties": {
      "code": {"type": "string", "pattern": "^[A-Z]{2}-[0-9]+$"},
      "any": {"type": "string", "pattern": "^x.y[^a]$"},
      "when": {"type": "string", "format": "date-time"},
      "id": {"type": "string", "format": "uuid"}},
    "required": ["code"], "additionalProperties": false})"));
  for (const char* good :
       {R"({"code": "AB-12"})", R"({"code": "ZZ-0", "any": "xéy!", "when": "2026-12-06T15:04:05.25+01:00"})",
        R"({"code": "AB-1", "id": "123e4567-e89b-12d3-a456-426614174000"})",
        R"({"code": "AB-1", "when": "2026-02-28T23:59:59Z"})"}) {
    EXPECT_TRUE(takes(*grammar, good)) << good;
  }
  for (const char* bad :
       {R"({"code": "ab-12"})", R"({"code": "AB-"})", R"({"code": "AB-1", "any": "x\"yb"})",
        R"({"code": "AB-1", "any": "xyya"})", R"({"code": "AB-1", "when": "2026-13-06T15:04:05Z"})",
        R"({"code": "AB-1", "id": "123e4567e89b12d3a456426614174000"})"}) {
    EXPECT_FALSE(takes(*grammar, bad)) << bad;
  }
}

TEST(JsonSchemaGrammar, RefusesWhatItCannotEnforceByName) {
  const std::vector<std::pair<std::string, std::string>> refused = {
      {R"({"type": "object", "properties": {"a": {"type": "string", "pattern": "x+"}}})",
       "json_schema.properties.a.pattern: only a whole-string match, ^...$, is supported"},
      {R"({"type": "string", "pattern": "^a\"b$"})", "a quote, backslash or control character"},
      {R"({"type": "string", "pattern": "^[ -~]+$"})", "a quote, backslash or control character"},
      {R"({"type": "string", "pattern": "^(a)\\1$"})", "json_schema.pattern: regex: at offset"},
      {R"({"type": "string", "format": "email"})", "json_schema.format: \"email\" is not supported"},
      {R"({"type": "string", "pattern": "^a$", "maxLength": 3})", "with length bounds"},
      {R"({"type": "object", "properties": {"a": {"type": "string", "foo": 1}}})",
       "json_schema.properties.a: 'foo' is not supported"},
      {R"({"type": "object", "properties": {"a": {"type": "integer", "minimum": 5}}})",
       "json_schema.properties.a.minimum: only 0"},
      {R"({"allOf": [{"type": "object"}, {"required": ["a"]}]})", "json_schema.allOf: only one schema"},
      {R"({"type": "object", "properties": {"a": {"$ref": "#/$defs/B"}}})", "'#/$defs/B' names nothing"},
      {R"({"type": "array", "minItems": 3, "maxItems": 2})", "json_schema.maxItems: below minItems"},
      {R"({"type": "string", "maxLength": 1000})", "json_schema.maxLength: expected an integer 0 to 256"},
      {R"({"type": "integer", "items": {}})", "'items' does not apply to type integer"},
      {"{", "json_schema: not JSON"}};
  for (const auto& [text, message] : refused) {
    try {
      json_schema_grammar(text);
      ADD_FAILURE() << "converted " << text;
    } catch (const std::invalid_argument& e) {
      EXPECT_NE(std::string(e.what()).find(message), std::string::npos) << text << " -> " << e.what();
    }
  }
}

TEST(JsonSchemaGrammar, TheRecognizerWhereItCanTheGrammarElsewhere) {
  const SchemaConstraint simple = constrain_to_schema(
      R"({"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]})");
  EXPECT_NE(simple.schema, nullptr);
  EXPECT_TRUE(simple.grammar.empty());
  const SchemaConstraint tagged = constrain_to_schema(kSchema);
  EXPECT_EQ(tagged.schema, nullptr);
  EXPECT_FALSE(tagged.grammar.empty());
  EXPECT_THROW(constrain_to_schema(R"({"type": "string", "format": "email"})"), std::invalid_argument);
}

}  // namespace
}  // namespace nibble::worker
