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

// `edits` random edits of `text`: a byte deleted, inserted or replaced (the new ones from `alphabet`).
void mutate(std::string& text, const std::string& alphabet, int edits, std::mt19937& rng) {
  for (int m = 0; m < edits && !text.empty(); ++m) {
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
}

const std::vector<std::string> kValid = {
    "{}",
    " {\"a\":1}",
    "{\"a\": [1, -2.5e+3, 0, 0.25, 1E-2, true, false, null, {\"b\": \"x\\\"\\\\\\u00e9\\n\"}], \"c\": {}}",
    "{\n  \"nested\": {\"deep\": [[[], {}], [\"\xc3\xa9\xe2\x82\xac\xf0\x9f\x98\x80\"]]},\n  \"n\": -0\n}\n",
    "{\"\": \"\", \"k\": [ ], \"z\" : 123456789012345678901234567890}",
    "{\"s\": \"\\ud83d\\ude00 \\uD7FF \\uE000 \\u0000\"}",
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
      {"{\"a\":\"\\udc00\"}", 9},          // a low surrogate alone (libFuzzer found it)
      {"{\"a\":\"\\ud800x\"}", 12},        // a high one without its low one
      {"{\"a\":\"\\ud800\\u0041\"}", 14},  // ... or with something else
      {"{\"a\":\"\\ud800\\udbff\"}", 15},
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
    mutate(text, alphabet, 1 + static_cast<int>(rng() % 3), rng);
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
  // A vocabulary with nothing that continues the output: its end is kept (with logit 0), not no token.
  const JsonConstraint barren({"", "x"}, {0});
  std::vector<float> row = {-5.0f, 1.0f};
  barren.mask(JsonPrefix{}, row.data(), 2);
  EXPECT_EQ(row[0], 0.0f);
  EXPECT_TRUE(std::isinf(row[1]));
  // A longer logits row than the vocabulary (padded heads): the rest is masked.
  std::vector<float> padded(vocab.size() + 3, 1.0f);
  constraint.mask(JsonPrefix{}, padded.data(), static_cast<int64_t>(padded.size()));
  EXPECT_TRUE(std::isinf(padded.back()));
}

}  // namespace
}  // namespace nibble::worker

namespace nibble::worker {
namespace {

const char* kSchema = R"({
  "type": "object", "title": "a record",
  "properties": {
    "name": {"type": "string", "description": "who"},
    "age": {"type": "integer"},
    "score": {"type": "number"},
    "ok": {"type": "boolean"},
    "none": {"type": "null"},
    "color": {"enum": ["red", "green", "gr\u00fcn"]},
    "tags": {"type": "array", "items": {"type": "string"}},
    "pos": {"type": "object", "properties": {"x": {"type": "number"}, "y": {"type": "number"}},
            "required": ["x", "y"], "additionalProperties": false},
    "extra": {},
    "map": {"type": "object"},
    "note": {"type": ["string", "null"]},
    "count": {"type": ["integer", "number", "null"]},
    "where": {"anyOf": [{"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
                        {"type": "null"}, {"enum": ["home", "away"]}]}
  },
  "required": ["name", "age"]
})";

// An independent reading of the schema above (nlohmann values): whether `value` is an instance of it.
bool valid(const nlohmann::json& schema, const nlohmann::json& value) {
  if (schema.contains("anyOf")) {
    for (const auto& alternative : schema["anyOf"])
      if (valid(alternative, value)) return true;
    return false;
  }
  if (schema.contains("type") && schema["type"].is_array()) {
    for (const auto& t : schema["type"]) {
      nlohmann::json one = schema;
      one["type"] = t;
      if (valid(one, value)) return true;
    }
    return false;
  }
  const std::string type = schema.value("type", schema.contains("enum")         ? "enum"
                                                : schema.contains("properties") ? "object"
                                                                                : "any");
  if (type == "any") return true;
  if (type == "enum") {
    for (const auto& v : schema["enum"])
      if (v == value) return true;
    return false;
  }
  if (type == "string") return value.is_string();
  if (type == "integer") return value.is_number_integer();
  if (type == "number") return value.is_number();
  if (type == "boolean") return value.is_boolean();
  if (type == "null") return value.is_null();
  if (type == "array") {
    if (!value.is_array()) return false;
    for (const auto& item : value)
      if (!valid(schema.value("items", nlohmann::json::object()), item)) return false;
    return true;
  }
  if (!value.is_object()) return false;
  if (!schema.contains("properties")) return true;
  for (const auto& [key, v] : value.items())
    if (!schema["properties"].contains(key) || !valid(schema["properties"][key], v)) return false;
  for (const auto& key : schema.value("required", nlohmann::json::array()))
    if (!value.contains(key.get<std::string>())) return false;
  return true;
}

std::pair<size_t, bool> run_schema(const JsonSchema& schema, std::string_view text) {
  JsonPrefix p(&schema);
  size_t n = 0;
  while (n < text.size() && p.feed(static_cast<unsigned char>(text[n]))) ++n;
  return {n, p.complete()};
}

TEST(JsonSchema, CompilesTheSubsetAndRefusesTheRestByName) {
  const auto schema = JsonSchema::compile(kSchema);
  const JsonSchemaNode& root = schema->node(schema->root());
  ASSERT_EQ(root.kind, JsonSchemaNode::Kind::object);
  ASSERT_EQ(root.properties.size(), 13u);
  const JsonSchemaNode& count = schema->node(root.properties[11].second);
  ASSERT_EQ(count.kind, JsonSchemaNode::Kind::any_of);  // integer and number merged: a number, or null
  ASSERT_EQ(count.alternatives.size(), 2u);
  EXPECT_EQ(schema->node(count.alternatives[0]).kind, JsonSchemaNode::Kind::number);
  EXPECT_EQ(schema->node(count.alternatives[1]).kind, JsonSchemaNode::Kind::null);
  EXPECT_EQ(root.required, 0b11u);
  EXPECT_EQ(schema->node(root.properties[5].second).literals,
            (std::vector<std::string>{"red", "green", "gr\xc3\xbcn"}));
  EXPECT_TRUE(schema->node(root.properties[9].second).free_keys);
  const std::vector<std::pair<std::string, std::string>> refused = {
      {R"({"type": "string"})", "json_schema: the root must be an object"},
      {R"({"type": "object", "properties": {"a": {"type": "integer", "minimum": 0}}})",
       "json_schema.properties.a: 'minimum' is not supported"},
      {R"({"type": "object", "properties": {"a": {}}, "additionalProperties": true})",
       "json_schema.additionalProperties: only false"},
      {R"({"type": "object", "properties": {"a": {}}, "required": ["b"]})",
       "json_schema.required: 'b' is not"},
      {R"({"type": "object", "properties": {"a": {"anyOf": [{"type": "string"}, {"enum": ["x"]}]}}})",
       "json_schema.properties.a.anyOf: two alternatives that begin alike"},
      {R"({"type": "object", "properties": {"a": {"type": ["object", "array"], "anyOf": []}}})",
       "json_schema.properties.a: 'type' beside anyOf"},
      {R"({"type": "object", "properties": {"a": {"anyOf": [{}, {"type": "null"}]}}})",
       "an alternative that takes any value"},
      {R"({"type": "object", "properties": {"a": {"enum": [1, 2]}}})", "json_schema.properties.a.enum"},
      {R"({"type": "object", "properties": {"a": {"type": "strin"}}})", "'strin' is not a JSON Schema type"},
      {R"({"type": "object", "properties": {"a": {"$ref": "#/x"}}})",
       "json_schema.properties.a.$ref: '#/x' names nothing"},
      {R"({"type": "object", "properties": {"a": {"$ref": "other.json#/x"}}})",
       "only references inside the schema"},
      {R"({"type": "object", "properties": {"a": {"$ref": "#/$defs/A", "type": "object"}}, "$defs": {"A": {}}})",
       "json_schema.properties.a: 'type' beside $ref"},
      {R"({"type": "object", "properties": {"a": {"allOf": [{}, {}]}}})",
       "json_schema.properties.a.allOf: only one"},
      {R"({"type": "object", "properties": {"n": {"$ref": "#/$defs/Node"}},
           "$defs": {"Node": {"type": "object", "properties": {"next": {"$ref": "#/$defs/Node"}}}}})",
       "json_schema.$defs.Node.properties.next.$ref: '#/$defs/Node' refers to itself"},
      {R"({"type": "object", "properties": {"a": {"$ref": "#/$defs/B"}}, "$defs": {"B": {"type": "integer", "minimum": 1}}})",
       "json_schema.$defs.B: 'minimum' is not supported"},
      {R"({"type": "object", "properties": {"a": {"type": "integer", "items": {}}}})",
       "'items' does not apply to type integer"},
      {"{\"type\": ", "json_schema: not JSON"},
      {[] {  // a required chain of 33 objects: its innermost could never be written
         std::string s = R"({"type": "object", "properties": {"a": )";
         for (int i = 0; i < 31; ++i) s += R"({"type": "object", "properties": {"a": )";
         s += R"({"type": "object"})";
         for (int i = 0; i < 32; ++i) s += "}}";
         return s;
       }(),
       "nested deeper than 32"},
  };
  for (const auto& [text, message] : refused) {
    try {
      JsonSchema::compile(text);
      ADD_FAILURE() << "compiled " << text;
    } catch (const std::invalid_argument& e) {
      EXPECT_NE(std::string(e.what()).find(message), std::string::npos) << e.what();
    }
  }
}

// What pydantic writes for nested models (model_json_schema()): "$defs" at the root, "$ref" to them
// (an enum, an optional nested model, a list of them), "allOf" of one reference, titles everywhere.
TEST(JsonSchema, ReferencesToDefinitionsStandForThem) {
  const char* pydantic = R"({
    "$defs": {
      "Color": {"enum": ["red", "green"], "title": "Color", "type": "string"},
      "Point": {"properties": {"x": {"title": "X", "type": "integer"}, "y": {"title": "Y", "type": "integer"}},
                "required": ["x", "y"], "title": "Point", "type": "object", "additionalProperties": false},
      "Shape": {"properties": {"color": {"$ref": "#/$defs/Color"}, "points": {"items": {"$ref": "#/$defs/Point"},
                "title": "Points", "type": "array"}}, "required": ["color", "points"], "title": "Shape",
                "type": "object", "additionalProperties": false}
    },
    "properties": {
      "main": {"allOf": [{"$ref": "#/$defs/Shape"}], "description": "the main one"},
      "other": {"anyOf": [{"$ref": "#/$defs/Shape"}, {"type": "null"}], "default": null},
      "origin": {"$ref": "#/definitions/Origin"}
    },
    "definitions": {"Origin": {"$ref": "#/$defs/Point"}},
    "required": ["main"], "title": "Drawing", "type": "object", "additionalProperties": false
  })";
  const auto schema = JsonSchema::compile(pydantic);
  for (
      const char* instance :
      {R"({"main": {"color": "red", "points": [{"x": 1, "y": -2}]}})",
       R"({"main": {"color": "green", "points": []}, "other": null, "origin": {"x": 0, "y": 0}})",
       R"({"main": {"color": "red", "points": []}, "other": {"color": "green", "points": [{"x": 3, "y": 4}]}})"}) {
    EXPECT_EQ(run_schema(*schema, instance), std::make_pair(std::string_view(instance).size(), true))
        << instance;
  }
  // The byte that breaks each definition's rule is refused.
  for (const auto& [text, at] : std::vector<std::pair<std::string, size_t>>{
           {R"({"main": {"color": "blue")", 20},                       // not one of Color's values
           {R"({"main": {"color": "red", "points": [{"x": 1.5)", 44},  // Point's x is an integer
           {R"({"origin": {"x": 1}})", 18},                            // Point requires y
           {R"({"other": 5)", 10}}) {                                  // Shape or null
    EXPECT_EQ(run_schema(*schema, text).first, at) << text;
  }
}

TEST(JsonSchema, TheRecognizerTakesInstancesAndRefusesTheByteThatBreaksOne) {
  const auto schema = JsonSchema::compile(kSchema);
  const nlohmann::json s = nlohmann::json::parse(kSchema);
  for (const std::string& text :
       {std::string(R"({"name":"a","age":3})"),
        std::string(
            R"({"age": -12, "name": "", "tags": ["x", "y"], "pos": {"y": 1.5, "x": -2e3}, "color": "green",)"
            R"( "ok": true, "none": null, "score": 0.5, "extra": [1, {"q": null}], "map": {"k": [true]}})"),
        std::string("{ \"name\": \"b\", \"age\": 0, \"color\": \"gr\xc3\xbcn\" }"),
        std::string(R"({"name":"a","age":1,"note":null,"count":2.5,"where":{"city":"Oslo"}})"),
        std::string(R"({"name":"a","age":1,"note":"n","count":null,"where":"away"})"),
        std::string(R"({"where":null,"count":-3,"name":"a","age":1})")}) {
    SCOPED_TRACE(text);
    ASSERT_TRUE(valid(s, nlohmann::json::parse(text)));
    EXPECT_EQ(run_schema(*schema, text), std::make_pair(text.size(), true));
  }
  const std::vector<std::pair<std::string, size_t>> faults = {
      {R"({"namx)", 5},         // not a property
      {R"({"name":"a"})", 11},  // age is required
      {R"({"age":1.5)", 8},     // an integer
      {R"({"age":1e3)", 8},
      {R"({"age":"3")", 7},
      {R"({"ok":1)", 6},
      {R"({"none":false)", 8},
      {R"({"color":"blue")", 10},  // not one of the values
      {R"({"color":"re")", 12},
      {R"({"name":"a","na)", 14},  // name again: only "none" starts with n now
      {R"({"pos":{"x":1})", 13},   // y is required
      {R"({"tags":[1)", 9},        // items are strings
      {R"({"note":1)", 8},         // a string or null
      {R"({"note":nu1)", 10},
      {R"({"count":"1")", 9},
      {R"({"where":{})", 10},  // the object's city is required
      {R"({"where":"hom")", 13},
      {R"({"where":true)", 9},
      {R"({"name":"a","age":1,"zzz")", 21},
      {R"([)", 0},
  };
  for (const auto& [text, fault] : faults) {
    SCOPED_TRACE(text);
    EXPECT_EQ(run_schema(*schema, text).first, fault);
  }
  // At most 18 digits in a row in a number (the free recognizer takes any).
  const std::string digits(JsonPrefix::kMaxDigits, '9');
  EXPECT_TRUE(run_schema(*schema, R"({"name":"","age":-)" + digits + "}").second);
  EXPECT_EQ(run_schema(*schema, R"({"name":"","age":)" + digits + "9").first, 17 + digits.size());
  EXPECT_TRUE(
      run_schema(*schema, R"({"name":"","age":1,"score":)" + digits + "." + digits + "e-" + digits + "}")
          .second);
  EXPECT_TRUE(run(R"({"a":)" + digits + digits + "}").second);
  // Compact: one space between tokens at most, no newlines.
  EXPECT_EQ(run_schema(*schema, "{ \"name\" : \"a\" ,  ").first, 17u);
  EXPECT_EQ(run_schema(*schema, "{\n").first, 1u);
  // Once every property is written, no ',' (no key could follow).
  const std::string all =
      R"({"name":"a","age":1,"score":1,"ok":true,"none":null,"color":"red","tags":[],"pos":{"x":1,"y":2},)"
      R"("extra":0,"map":{},"note":null,"count":1,"where":null)";
  EXPECT_EQ(run_schema(*schema, all + ",").first, all.size());
  EXPECT_TRUE(run_schema(*schema, all + "}").second);
}

// Random instances of the schema (a random subset of the properties, the required ones always, random
// values), written compactly, are taken whole; their mutations, when taken whole and complete, are
// instances by an independent reading of the schema, and nlohmann parses them.
TEST(JsonSchema, TextsTakenWholeAreInstances) {
  const auto schema = JsonSchema::compile(kSchema);
  const nlohmann::json s = nlohmann::json::parse(kSchema);
  std::mt19937 rng(11);
  const auto pick = [&](int n) { return static_cast<int>(rng() % static_cast<unsigned>(n)); };
  const std::vector<std::string> words = {"", "a", "b c", "d\"e", "\xc3\xa9"};
  const auto instance = [&] {
    nlohmann::json v = {{"name", words[static_cast<size_t>(pick(5))]}, {"age", pick(200) - 100}};
    if (pick(2)) v["score"] = pick(1000) / 8.0;
    if (pick(2)) v["ok"] = pick(2) == 1;
    if (pick(2)) v["none"] = nullptr;
    if (pick(2))
      v["color"] = std::vector<std::string>{"red", "green", "gr\xc3\xbcn"}[static_cast<size_t>(pick(3))];
    if (pick(2))
      v["tags"] = std::vector<std::string>(static_cast<size_t>(pick(3)), words[static_cast<size_t>(pick(5))]);
    if (pick(2)) v["pos"] = {{"x", pick(10)}, {"y", -pick(10) / 4.0}};
    if (pick(2)) v["extra"] = nlohmann::json::parse(R"([1, {"q": [null, "x"]}, false])");
    if (pick(2)) v["map"] = {{"k", pick(3)}};
    if (pick(2)) v["note"] = pick(2) ? nlohmann::json(words[static_cast<size_t>(pick(5))]) : nlohmann::json();
    if (pick(2))
      v["count"] = pick(3) == 0 ? nlohmann::json() : pick(2) ? nlohmann::json(pick(9)) : nlohmann::json(0.5);
    if (pick(2)) {
      v["where"] = pick(3) == 0   ? nlohmann::json()
                   : pick(2) == 0 ? nlohmann::json({{"city", words[static_cast<size_t>(pick(5))]}})
                                  : nlohmann::json("home");
    }
    return v;
  };
  const std::string alphabet = "{}[]\":,0123456789.-trufalsn xyabdemgo";
  int accepted = 0, refused = 0;
  for (int i = 0; i < 5000; ++i) {
    const nlohmann::json v = instance();
    std::string text = v.dump();
    ASSERT_EQ(run_schema(*schema, text), std::make_pair(text.size(), true)) << text;
    mutate(text, alphabet, 1 + pick(2), rng);
    const auto [taken, complete] = run_schema(*schema, text);
    if (taken == text.size() && complete) {
      nlohmann::json parsed;
      try {
        parsed = nlohmann::json::parse(text);
      } catch (const nlohmann::json::out_of_range&) {
        continue;  // a number beyond a double (an 'e' added): valid JSON, refused by nlohmann
      }
      EXPECT_TRUE(valid(s, parsed)) << text;
      ++accepted;
    } else {
      ++refused;
    }
  }
  EXPECT_GT(accepted, 200);
  EXPECT_GT(refused, 1000);
}

}  // namespace
}  // namespace nibble::worker

namespace nibble::worker {
namespace {

// No dead ends: random walks of the recognizer (each step one of the bytes it takes, at random) always
// have a byte to take until the object is complete, free or following the schema, and the walks that
// complete are JSON objects (instances of the schema) by nlohmann's reading. A state with no byte to
// take would leave the mask nothing but the end of generation.
TEST(JsonSchema, EveryPrefixTakenCanBeCompleted) {
  const auto schema = JsonSchema::compile(kSchema);
  const nlohmann::json s = nlohmann::json::parse(kSchema);
  std::mt19937 rng(5);
  int completed = 0;
  for (int walk = 0; walk < 3000; ++walk) {
    const bool schemed = walk % 2 == 1;
    JsonPrefix p(schemed ? schema.get() : nullptr);
    std::string text;
    for (int step = 0; step < 300 && !p.complete(); ++step) {
      std::vector<unsigned char> takes;
      for (int c = 0; c < 256; ++c) {
        JsonPrefix next = p;
        if (next.feed(static_cast<unsigned char>(c))) takes.push_back(static_cast<unsigned char>(c));
      }
      ASSERT_FALSE(takes.empty()) << "a dead end after: " << text;
      // Later in a walk, closing bytes are preferred, so that many walks complete.
      unsigned char c = takes[rng() % takes.size()];
      for (const unsigned char closer : {'"', '}', ']', ','}) {
        if (step > 40 && rng() % 2 == 0 && std::find(takes.begin(), takes.end(), closer) != takes.end())
          c = closer;
      }
      ASSERT_TRUE(p.feed(c));
      text += static_cast<char>(c);
    }
    if (!p.complete()) continue;
    ++completed;
    nlohmann::json parsed;
    try {
      parsed = nlohmann::json::parse(text);
    } catch (const nlohmann::json::out_of_range&) {
      continue;  // a number beyond a double
    }
    EXPECT_TRUE(parsed.is_object()) << text;
    if (schemed) {
      EXPECT_TRUE(valid(s, parsed)) << text;
    }
  }
  EXPECT_GT(completed, 300);
}

}  // namespace
}  // namespace nibble::worker
