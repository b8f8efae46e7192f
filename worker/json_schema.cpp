#include "worker/json_schema.hpp"

#include <algorithm>
#include <nlohmann/json.hpp>
#include <set>
#include <stdexcept>

namespace nibble::worker {

using json = nlohmann::ordered_json;  // properties in the schema's order

SchemaReference resolve_schema_reference(const json& document, const json& ref, const std::string& where) {
  if (!ref.is_string() || !ref.get<std::string>().starts_with("#"))
    throw std::invalid_argument(where + ".$ref: only references inside the schema (\"#/$defs/Name\")");
  SchemaReference out{ref.get<std::string>(), nullptr, "json_schema"};
  try {
    out.schema = &document.at(json::json_pointer(out.target.substr(1)));
  } catch (const json::exception&) {
    throw std::invalid_argument(where + ".$ref: '" + out.target + "' names nothing in the schema");
  }
  for (const char c : out.target.substr(1)) out.place += c == '/' ? '.' : c;
  return out;
}

char begins_with(JsonSchemaNode::Kind kind) {
  switch (kind) {
    case JsonSchemaNode::Kind::object:
      return '{';
    case JsonSchemaNode::Kind::array:
      return '[';
    case JsonSchemaNode::Kind::string:
    case JsonSchemaNode::Kind::string_enum:
      return '"';
    case JsonSchemaNode::Kind::integer:
    case JsonSchemaNode::Kind::number:
      return '0';
    case JsonSchemaNode::Kind::boolean:
      return 't';
    case JsonSchemaNode::Kind::null:
      return 'n';
    case JsonSchemaNode::Kind::any:
    case JsonSchemaNode::Kind::any_of:
      break;
  }
  return 0;
}

char begins_with(unsigned char c) {
  if (c == '{' || c == '[' || c == '"' || c == 'n') return static_cast<char>(c);
  if (c == '-' || (c >= '0' && c <= '9')) return '0';
  if (c == 't' || c == 'f') return 't';
  return 0;
}

struct JsonSchemaCompiler {
  JsonSchema& out;
  const json& document;                // the whole schema, where "#/..." references point
  std::vector<std::string> expanding;  // the references being compiled (one inside another: recursion)

  [[noreturn]] static void refuse(const std::string& where, const std::string& what) {
    throw std::invalid_argument(where + ": " + what);
  }

  // A string as the output writes it between its quotes (JSON-escaped, as nlohmann dumps it).
  static std::string written(const std::string& where, const json& value) {
    if (!value.is_string()) refuse(where, "expected a string, got " + std::string(value.type_name()));
    const std::string dumped = value.dump();
    const std::string inner = dumped.substr(1, dumped.size() - 2);
    if (inner.size() > JsonSchema::kMaxNameBytes)
      refuse(where, "longer than " + std::to_string(JsonSchema::kMaxNameBytes) + " bytes");
    return inner;
  }

  char first_byte_class(uint16_t node) const { return begins_with(out.nodes_[node].kind); }

  // A union of alternatives the first byte of a value tells apart (nested unions flattened; integer with
  // number is a number).
  uint16_t union_of(std::vector<uint16_t> nodes, const std::string& where) {
    std::vector<uint16_t> flat;
    for (const uint16_t n : nodes) {
      if (out.nodes_[n].kind == JsonSchemaNode::Kind::any)
        refuse(where, "an alternative that takes any value");
      if (out.nodes_[n].kind == JsonSchemaNode::Kind::any_of) {
        flat.insert(flat.end(), out.nodes_[n].alternatives.begin(), out.nodes_[n].alternatives.end());
      } else {
        flat.push_back(n);
      }
    }
    JsonSchemaNode node;
    node.kind = JsonSchemaNode::Kind::any_of;
    for (const uint16_t n : flat) {
      bool merged = false;
      for (uint16_t& kept : node.alternatives) {
        if (first_byte_class(kept) != first_byte_class(n)) continue;
        if (first_byte_class(n) != '0')
          refuse(where,
                 "two alternatives that begin alike (not supported: they are told apart by the first byte)");
        if (out.nodes_[n].kind == JsonSchemaNode::Kind::number) kept = n;  // integer or number: a number
        merged = true;
      }
      if (!merged) node.alternatives.push_back(n);
    }
    if (node.alternatives.size() == 1) return node.alternatives[0];
    return add(std::move(node));
  }

  // The schema a "$ref" names, compiled where it is used (its depth counts from there); a reference
  // inside its own expansion (a recursive schema) is refused: the output's nesting must stay bounded.
  uint16_t compile_reference(const json& ref, const std::string& where, int depth) {
    const SchemaReference named = resolve_schema_reference(document, ref, where);
    if (std::find(expanding.begin(), expanding.end(), named.target) != expanding.end())
      refuse(where + ".$ref",
             "'" + named.target + "' refers to itself (recursive schemas are not supported)");
    expanding.push_back(named.target);
    const uint16_t node = compile(*named.schema, named.place, depth);
    expanding.pop_back();
    return node;
  }

  uint16_t add(JsonSchemaNode node) {
    if (out.nodes_.size() >= JsonSchema::kMaxNodes)
      throw std::invalid_argument("json_schema: more than " + std::to_string(JsonSchema::kMaxNodes) +
                                  " schemas");
    out.nodes_.push_back(std::move(node));
    return static_cast<uint16_t>(out.nodes_.size() - 1);
  }

  // depth: the objects and arrays around this schema's value.
  uint16_t compile(const json& schema, const std::string& where, int depth = 0) {
    if (schema.is_boolean() && schema.get<bool>()) return out.any_;
    if (!schema.is_object()) refuse(where, "expected a schema object");
    // Definitions are read where a reference names them ($defs, definitions: pydantic's and older tools').
    static const std::set<std::string> kIgnored = {"title",    "description", "$schema", "default",
                                                   "examples", "$comment",    "$defs",   "definitions"};
    static const std::set<std::string> kKnown = {"type",  "properties", "required", "additionalProperties",
                                                 "items", "enum",       "const",    "anyOf",
                                                 "$ref",  "allOf"};
    for (const auto& [key, value] : schema.items()) {
      if (!kKnown.contains(key) && !kIgnored.contains(key)) refuse(where, "'" + key + "' is not supported");
    }
    // A reference ("#/$defs/Name", any JSON pointer into the document) or allOf of one schema stands for
    // that schema; beside them only annotations.
    for (const char* wrapper : {"$ref", "allOf"}) {
      if (!schema.contains(wrapper)) continue;
      for (const auto& [key, value] : schema.items()) {
        if (key != wrapper && kKnown.contains(key)) refuse(where, "'" + key + "' beside " + wrapper);
      }
      if (std::string(wrapper) == "allOf") {
        const json& all = schema["allOf"];
        if (!all.is_array() || all.size() != 1)
          refuse(where + ".allOf", "only one schema (an intersection of several is not supported)");
        return compile(all[0], where + ".allOf[0]", depth);
      }
      return compile_reference(schema["$ref"], where, depth);
    }
    const auto only = [&](std::initializer_list<const char*> allowed, const std::string& type) {
      for (const char* key : {"properties", "required", "additionalProperties", "items", "enum", "const"}) {
        if (!schema.contains(key)) continue;
        bool ok = false;
        for (const char* a : allowed) ok = ok || std::string(a) == key;
        if (!ok) refuse(where, "'" + std::string(key) + "' does not apply to type " + type);
      }
    };
    if (schema.contains("anyOf")) {
      for (const auto& [key, value] : schema.items()) {
        if (key != "anyOf" && kKnown.contains(key)) refuse(where, "'" + key + "' beside anyOf");
      }
      const json& alternatives = schema["anyOf"];
      if (!alternatives.is_array() || alternatives.empty())
        refuse(where + ".anyOf", "expected a non-empty array");
      std::vector<uint16_t> nodes;
      for (size_t i = 0; i < alternatives.size(); ++i)
        nodes.push_back(compile(alternatives[i], where + ".anyOf[" + std::to_string(i) + "]", depth));
      return union_of(std::move(nodes), where + ".anyOf");
    }
    std::string type;
    if (schema.contains("type") && schema["type"].is_array()) {
      // A list of types: one alternative per type, each with the keywords that apply to it.
      const json& types = schema["type"];
      if (types.empty()) refuse(where + ".type", "an empty list of types");
      std::vector<uint16_t> nodes;
      for (const json& t : types) {
        if (!t.is_string()) refuse(where + ".type", "expected type names");
        json one = schema;
        one["type"] = t;
        const std::string name = t.get<std::string>();
        for (const char* key : {"properties", "required", "additionalProperties"})
          if (name != "object") one.erase(key);
        if (name != "array") one.erase("items");
        if (name != "string") {
          one.erase("enum");
          one.erase("const");
        }
        nodes.push_back(compile(one, where, depth));
      }
      return union_of(std::move(nodes), where + ".type");
    }
    if (schema.contains("type")) {
      if (!schema["type"].is_string()) refuse(where + ".type", "a type name or a list of them");
      type = schema["type"].get<std::string>();
    } else if (schema.contains("enum") || schema.contains("const")) {
      type = "string";
    } else if (schema.contains("properties")) {
      type = "object";
    } else if (schema.contains("items")) {
      type = "array";
    } else {
      return out.any_;
    }
    JsonSchemaNode node;
    // A container nested deeper than the recognizer's stack could never be written.
    if ((type == "object" || type == "array") && depth >= JsonSchema::kMaxDepth)
      refuse(where, "nested deeper than " + std::to_string(JsonSchema::kMaxDepth) + " objects and arrays");
    if (type == "object") {
      only({"properties", "required", "additionalProperties"}, type);
      node.kind = JsonSchemaNode::Kind::object;
      if (schema.contains("additionalProperties")) {
        const json& extra = schema["additionalProperties"];
        if (!extra.is_boolean() || (extra.get<bool>() && schema.contains("properties")))
          refuse(where + ".additionalProperties",
                 "only false with properties (extra keys are not generated)");
      }
      if (!schema.contains("properties")) {
        node.free_keys = true;
        if (schema.contains("required")) refuse(where + ".required", "needs properties");
        return add(std::move(node));
      }
      const json& properties = schema["properties"];
      if (!properties.is_object()) refuse(where + ".properties", "expected an object");
      if (properties.size() > JsonSchema::kMaxProperties)
        refuse(where + ".properties", "more than " + std::to_string(JsonSchema::kMaxProperties));
      if (properties.empty()) refuse(where + ".properties", "no properties (then leave it out: any keys)");
      // Reserve this node's slot first so that nested nodes follow it.
      const uint16_t index = add(JsonSchemaNode{});
      for (const auto& [name, sub] : properties.items()) {
        const std::string place = where + ".properties." + name;
        const uint16_t child = compile(sub, place, depth + 1);
        node.properties.emplace_back(written(place, json(name)), child);
      }
      if (schema.contains("required")) {
        const json& required = schema["required"];
        if (!required.is_array()) refuse(where + ".required", "expected an array of property names");
        for (const json& name : required) {
          if (!name.is_string()) refuse(where + ".required", "expected property names");
          size_t i = 0;
          while (i < node.properties.size() && node.properties[i].first != written(where, name)) ++i;
          if (i == node.properties.size())
            refuse(where + ".required", "'" + name.get<std::string>() + "' is not a property");
          node.required |= uint64_t{1} << i;
        }
      }
      out.nodes_[index] = std::move(node);
      return index;
    }
    if (type == "array") {
      only({"items"}, type);
      node.kind = JsonSchemaNode::Kind::array;
      const uint16_t index = add(JsonSchemaNode{});
      node.items =
          schema.contains("items") ? compile(schema["items"], where + ".items", depth + 1) : out.any_;
      out.nodes_[index] = std::move(node);
      return index;
    }
    if (type == "string") {
      only({"enum", "const"}, type);
      if (schema.contains("enum") && schema.contains("const")) refuse(where, "both enum and const");
      if (!schema.contains("enum") && !schema.contains("const")) {
        node.kind = JsonSchemaNode::Kind::string;
        return add(std::move(node));
      }
      node.kind = JsonSchemaNode::Kind::string_enum;
      const json values = schema.contains("enum") ? schema["enum"] : json::array({schema["const"]});
      const std::string place = where + (schema.contains("enum") ? ".enum" : ".const");
      if (!values.is_array() || values.empty()) refuse(place, "expected a non-empty array of strings");
      if (values.size() > JsonSchema::kMaxLiterals)
        refuse(place, "more than " + std::to_string(JsonSchema::kMaxLiterals) + " values");
      for (const json& v : values) node.literals.push_back(written(place + " (only strings)", v));
      return add(std::move(node));
    }
    only({}, type);
    if (type == "integer") {
      node.kind = JsonSchemaNode::Kind::integer;
    } else if (type == "number") {
      node.kind = JsonSchemaNode::Kind::number;
    } else if (type == "boolean") {
      node.kind = JsonSchemaNode::Kind::boolean;
    } else if (type == "null") {
      node.kind = JsonSchemaNode::Kind::null;
    } else {
      refuse(where + ".type", "'" + type + "' is not a JSON Schema type");
    }
    return add(std::move(node));
  }
};

std::shared_ptr<const JsonSchema> JsonSchema::compile(std::string_view text) {
  const json schema = json::parse(text, nullptr, /*allow_exceptions=*/false);
  if (schema.is_discarded()) throw std::invalid_argument("json_schema: not JSON");
  auto out = std::make_shared<JsonSchema>();
  JsonSchemaCompiler compiler{*out, schema, {}};
  out->any_ = compiler.add(JsonSchemaNode{});
  out->root_ = compiler.compile(schema, "json_schema");
  if (out->node(out->root_).kind != JsonSchemaNode::Kind::object)
    throw std::invalid_argument("json_schema: the root must be an object schema (\"type\": \"object\")");
  return out;
}

}  // namespace nibble::worker
