#pragma once
// The JSON schemas structured output follows (OpenAI's response_format json_schema, vLLM's guided_json,
// llama.cpp's json_schema), compiled for the output constraint (worker/json_constraint): a table of nodes
// the recognizer walks as it reads. The subset: "type" object (with "properties", "required",
// "additionalProperties": false; without "properties", any keys), array ("items"), string (with "enum" or
// "const" of strings), integer, number, boolean, null; {} or no "type": any value; "$ref" to a schema in
// the document ("#/$defs/Name", as pydantic writes nested models; not recursive ones) and "allOf" of one
// schema stand for it. Annotations ("title", "description", "$schema", "default", "examples") are
// ignored; any other keyword is refused by name
// rather than silently not enforced. The root is an object. Unions ("type": [...] and "anyOf") whose
// alternatives begin differently (an object, an array, a string, a number, a boolean, null: told apart
// by the value's first byte; integer and number together are a number), as OpenAI's nullable fields
// ("type": ["string", "null"]) are.
#include <cstdint>
#include <memory>
#include <nlohmann/json_fwd.hpp>
#include <string>
#include <string_view>
#include <vector>

namespace nibble::worker {

struct JsonSchemaNode {
  enum class Kind : uint8_t {
    any,
    object,
    array,
    string,
    string_enum,
    integer,
    number,
    boolean,
    null,
    any_of
  };
  Kind kind = Kind::any;
  // object: its properties (names as written between the quotes), in the schema's order; bit i of
  // `required` is properties[i]'s. free_keys: no "properties", so any key with any value.
  std::vector<std::pair<std::string, uint16_t>> properties;
  uint64_t required = 0;
  bool free_keys = false;
  uint16_t items = 0;                  // array: its items' node
  std::vector<std::string> literals;   // string_enum: each value as written between the quotes
  std::vector<uint16_t> alternatives;  // any_of: nodes that each begin with other bytes
};

// How a value of a node of `kind` begins, and how a value whose first byte is `c` does: '{', '[', '"',
// '0' (a number), 't' (a boolean), 'n' (null); 0 for any / any_of and for a byte no value begins with.
// Unions' alternatives are told apart by it.
char begins_with(JsonSchemaNode::Kind kind);
char begins_with(unsigned char c);

// A "$ref" inside `document` ("#/$defs/Name", any JSON pointer into it), for both schema readers (this
// one and worker/json_schema_grammar): the reference's text, the schema it names, and the place errors
// inside that schema are named by ("json_schema.$defs.Name"). Throws std::invalid_argument naming
// `where` for a reference outside the document or to nothing.
struct SchemaReference {
  std::string target;
  const nlohmann::ordered_json* schema = nullptr;
  std::string place;
};
SchemaReference resolve_schema_reference(const nlohmann::ordered_json& document,
                                         const nlohmann::ordered_json& ref, const std::string& where);

class JsonSchema {
 public:
  static constexpr size_t kMaxProperties = 64;  // per object (a bit each)
  static constexpr size_t kMaxLiterals = 64;    // per enum
  static constexpr size_t kMaxNodes = 4096;
  static constexpr size_t kMaxNameBytes = 255;  // a property name or enum value, written
  static constexpr int kMaxDepth = 32;          // objects and arrays nested (the recognizer's stack)

  // The schema in `text` (a JSON object). Throws std::invalid_argument naming the place and the problem,
  // e.g. "json_schema.properties.age: 'minimum' is not supported".
  static std::shared_ptr<const JsonSchema> compile(std::string_view text);

  const JsonSchemaNode& node(uint16_t i) const { return nodes_[i]; }
  uint16_t root() const { return root_; }
  uint16_t any() const { return any_; }  // a node that takes any value

 private:
  std::vector<JsonSchemaNode> nodes_;
  uint16_t root_ = 0, any_ = 0;
  friend struct JsonSchemaCompiler;
};

}  // namespace nibble::worker
