#include "worker/json_schema_grammar.hpp"

#include <functional>
#include <map>
#include <nlohmann/json.hpp>
#include <set>
#include <stdexcept>
#include <vector>

#include "worker/gbnf_grammar.hpp"

namespace nibble::worker {
namespace {

using json = nlohmann::ordered_json;  // properties in the schema's order

// The JSON values every schema grammar may use (compact whitespace: one space at most).
constexpr const char* kPrimitives = R"(ws ::= " "?
value ::= object | array | string | number | boolean | null
object ::= "{" ws ( string ws ":" ws value ( "," ws string ws ":" ws value )* )? ws "}"
array ::= "[" ws ( value ( "," ws value )* )? ws "]"
string ::= "\"" char* "\""
char ::= [^"\\\x00-\x1F\x7F] | "\\" ( ["\\/bfnrt] | "u" [0-9a-fA-F]{4} )
number ::= integer ( "." [0-9]{1,16} )? ( [eE] [-+]? [0-9]{1,2} )?
integer ::= "-"? natural
natural ::= "0" | [1-9] [0-9]{0,17}
boolean ::= "true" | "false"
null ::= "null"
)";

// A JSON text as a GBNF literal.
std::string literal(const std::string& text) {
  std::string out = "\"";
  for (const char c : text) {
    if (c == '"' || c == '\\') out += '\\';
    out += c;
  }
  return out + "\"";
}

struct Converter {
  const json& document;
  std::string rules{};
  std::map<std::string, std::string> refs{};  // "$ref" -> its rule's name
  int counter = 0;

  [[noreturn]] static void refuse(const std::string& where, const std::string& what) {
    throw std::invalid_argument(where + ": " + what);
  }

  std::string next_name() {
    std::string name(1, 's');
    name += std::to_string(counter++);
    return name;
  }

  std::string add_rule(const std::string& body) {
    const std::string name = next_name();
    rules += name + " ::= " + body + "\n";
    return name;
  }

  std::string count(const std::string& where, const json& schema, const char* key, size_t fallback) const {
    if (!schema.contains(key)) return std::to_string(fallback);
    const json& v = schema[key];
    if (!v.is_number_unsigned() || v.get<uint64_t>() > Grammar::kMaxRepetition)
      refuse(where + "." + key, "expected an integer 0 to " + std::to_string(Grammar::kMaxRepetition));
    return std::to_string(v.get<uint64_t>());
  }

  std::string alternatives(const json& list, const std::string& where, const char* key) {
    if (!list.is_array() || list.empty()) refuse(where + "." + key, "expected a non-empty array of schemas");
    std::string out = "(";
    for (size_t i = 0; i < list.size(); ++i)
      out += (i ? " | " : "") + visit(list[i], where + "." + key + "[" + std::to_string(i) + "]");
    return out + ")";
  }

  std::string object(const json& schema, const std::string& where) {
    std::vector<std::pair<std::string, std::string>> properties;  // (key literal, value expression)
    std::vector<bool> required;
    if (schema.contains("properties")) {
      if (!schema["properties"].is_object()) refuse(where + ".properties", "expected an object");
      for (const auto& [name, sub] : schema["properties"].items()) {
        properties.emplace_back(literal(json(name).dump()), visit(sub, where + ".properties." + name));
        required.push_back(false);
      }
    }
    if (schema.contains("required")) {
      if (!schema["required"].is_array()) refuse(where + ".required", "expected an array of property names");
      for (const json& name : schema["required"]) {
        size_t i = 0;
        const std::string key = name.is_string() ? literal(name.dump()) : "";
        while (i < properties.size() && properties[i].first != key) ++i;
        if (i == properties.size()) refuse(where + ".required", "'" + name.dump() + "' is not a property");
        required[i] = true;
      }
    }
    // Extra keys: absent or false none where there are properties (OpenAI's strict form), any without.
    std::string extra;
    if (schema.contains("additionalProperties")) {
      const json& a = schema["additionalProperties"];
      if (a.is_boolean()) {
        if (a.get<bool>()) extra = "value";
      } else {
        extra = visit(a, where + ".additionalProperties");
      }
    } else if (properties.empty()) {
      extra = "value";
    }
    const std::string extra_pair = extra.empty() ? "" : add_rule("string ws \":\" ws " + extra);
    // rest(i, first): the properties from i on, `first` when none has been written yet (no comma before).
    std::map<std::pair<size_t, bool>, std::string> memo;
    std::function<std::string(size_t, bool)> rest = [&](size_t i, bool first) -> std::string {
      const auto key = std::make_pair(i, first);
      if (const auto it = memo.find(key); it != memo.end()) return it->second;
      std::string body;
      const std::string comma = first ? "" : "\",\" ws ";
      if (i == properties.size()) {
        if (extra_pair.empty()) {
          body = "\"\"";
        } else {
          body = first ? "( " + extra_pair + " ( \",\" ws " + extra_pair + " )* )?"
                       : "( \",\" ws " + extra_pair + " )*";
        }
      } else {
        const std::string pair = comma + properties[i].first + " ws \":\" ws " + properties[i].second;
        body = pair + " " + rest(i + 1, false);
        if (!required[i]) body = "( " + body + " | " + rest(i + 1, first) + " )";
      }
      return memo[key] = add_rule(body);
    };
    return add_rule("\"{\" ws " + rest(0, true) + " ws \"}\"");
  }

  std::string array(const json& schema, const std::string& where) {
    const std::string item = schema.contains("items") ? visit(schema["items"], where + ".items") : "value";
    const std::string low = count(where, schema, "minItems", 0);
    const bool bounded = schema.contains("maxItems");
    const std::string high = count(where, schema, "maxItems", 0);
    if (bounded && std::stoul(high) < std::stoul(low)) refuse(where + ".maxItems", "below minItems");
    if (bounded && high == "0") return add_rule("\"[\" ws \"]\"");
    // One item, then the others after commas: (min - 1) to (max - 1) of them.
    const auto less_one = [](const std::string& n) {
      return std::to_string(std::stoul(n) == 0 ? 0 : std::stoul(n) - 1);
    };
    const std::string more =
        "( \",\" ws " + item + " ){" + less_one(low) + "," + (bounded ? less_one(high) : "") + "}";
    const std::string items = item + " " + more;
    return add_rule("\"[\" ws " + (low == "0" ? "( " + items + " )?" : items) + " ws \"]\"");
  }

  // A string matching a pattern (anchored: ^...$, a whole-string match, as llama.cpp requires) or of a
  // format (date, time, date-time, uuid: the regular expressions llama.cpp writes for them).
  std::string patterned(const json& schema, const std::string& where) {
    if (schema.contains("minLength") || schema.contains("maxLength"))
      refuse(where, "'pattern' or 'format' with length bounds is not supported");
    static const std::map<std::string, std::string> kFormats = {
        {"date", "[0-9]{4}-(0[1-9]|1[0-2])-(0[1-9]|[12][0-9]|3[01])"},
        {"time",
         "([01][0-9]|2[0-3]):[0-5][0-9]:[0-5][0-9](\\.[0-9]{1,6})?(Z|[+-]([01][0-9]|2[0-3]):[0-5][0-9])"},
        {"date-time",
         "[0-9]{4}-(0[1-9]|1[0-2])-(0[1-9]|[12][0-9]|3[01])T([01][0-9]|2[0-3]):[0-5][0-9]:[0-5][0-9](\\.[0-9]"
         "{1,6})?"
         "(Z|[+-]([01][0-9]|2[0-3]):[0-5][0-9])"},
        {"uuid", "[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}"}};
    std::string regex;
    std::string place = where + ".pattern";
    if (schema.contains("pattern")) {
      if (schema.contains("format")) refuse(where, "both 'pattern' and 'format'");
      if (!schema["pattern"].is_string()) refuse(place, "expected a regular expression");
      regex = schema["pattern"].get<std::string>();
      if (!regex.starts_with('^') || !regex.ends_with('$') || regex.ends_with("\\$"))
        refuse(place, "only a whole-string match, ^...$, is supported");
    } else {
      place = where + ".format";
      const auto it =
          schema["format"].is_string() ? kFormats.find(schema["format"].get<std::string>()) : kFormats.end();
      if (it == kFormats.end())
        refuse(place, schema["format"].dump() + " is not supported (date, time, date-time, uuid are)");
      regex = it->second;
    }
    try {
      return add_rule("\"\\\"\" ( " + Grammar::regex_expression(regex, /*json_string=*/true) + " ) \"\\\"\"");
    } catch (const std::invalid_argument& e) {
      refuse(place, e.what());
    }
  }

  std::string visit(const json& schema, const std::string& where) {
    if (schema.is_boolean() && schema.get<bool>()) return "value";
    if (!schema.is_object()) refuse(where, "expected a schema object");
    static const std::set<std::string> kIgnored = {"title",    "description", "$schema", "default",
                                                   "examples", "$comment",    "$defs",   "definitions"};
    static const std::set<std::string> kKnown = {
        "type",     "properties", "required",  "additionalProperties",
        "items",    "enum",       "const",     "anyOf",
        "oneOf",    "allOf",      "$ref",      "minItems",
        "maxItems", "minLength",  "maxLength", "minimum",
        "pattern",  "format"};
    for (const auto& [key, value] : schema.items())
      if (!kKnown.contains(key) && !kIgnored.contains(key)) refuse(where, "'" + key + "' is not supported");
    if (schema.contains("$ref")) {
      const SchemaReference named = resolve_schema_reference(document, schema["$ref"], where);
      if (const auto it = refs.find(named.target); it != refs.end()) return it->second;
      // Named before it is written, so that it may refer to itself (recursion is a grammar's to have).
      const std::string name = next_name();
      refs[named.target] = name;
      rules += name + " ::= " + visit(*named.schema, named.place) + "\n";
      return name;
    }
    if (schema.contains("anyOf")) return alternatives(schema["anyOf"], where, "anyOf");
    if (schema.contains("oneOf")) return alternatives(schema["oneOf"], where, "oneOf");
    if (schema.contains("allOf")) {
      const json& all = schema["allOf"];
      if (!all.is_array() || all.size() != 1)
        refuse(where + ".allOf", "only one schema (an intersection of several is not supported)");
      return visit(all[0], where + ".allOf[0]");
    }
    if (schema.contains("const")) return literal(schema["const"].dump());
    if (schema.contains("enum")) {
      const json& values = schema["enum"];
      if (!values.is_array() || values.empty()) refuse(where + ".enum", "expected a non-empty array");
      std::string out = "(";
      for (size_t i = 0; i < values.size(); ++i) out += (i ? " | " : "") + literal(values[i].dump());
      return out + ")";
    }
    if (schema.contains("type") && schema["type"].is_array()) {
      std::string out = "(";
      for (size_t i = 0; i < schema["type"].size(); ++i) {
        json one = schema;
        one["type"] = schema["type"][i];
        out += (i ? " | " : "") + visit(one, where);
      }
      return out + ")";
    }
    std::string type;
    if (schema.contains("type")) {
      if (!schema["type"].is_string()) refuse(where + ".type", "a type name or a list of them");
      type = schema["type"].get<std::string>();
    } else if (schema.contains("properties") || schema.contains("additionalProperties")) {
      type = "object";
    } else if (schema.contains("items")) {
      type = "array";
    } else {
      return "value";
    }
    const auto only = [&](std::initializer_list<const char*> keys) {
      for (const char* key : {"properties", "required", "additionalProperties", "items", "minItems",
                              "maxItems", "minLength", "maxLength", "minimum", "pattern", "format"}) {
        if (!schema.contains(key)) continue;
        bool ok = false;
        for (const char* k : keys) ok = ok || std::string(k) == key;
        if (!ok) refuse(where, "'" + std::string(key) + "' does not apply to type " + type);
      }
    };
    if (type == "object") {
      only({"properties", "required", "additionalProperties"});
      return object(schema, where);
    }
    if (type == "array") {
      only({"items", "minItems", "maxItems"});
      return array(schema, where);
    }
    if (type == "string") {
      only({"minLength", "maxLength", "pattern", "format"});
      if (schema.contains("pattern") || schema.contains("format")) return patterned(schema, where);
      if (!schema.contains("minLength") && !schema.contains("maxLength")) return "string";
      const std::string low = count(where, schema, "minLength", 0);
      const std::string high = schema.contains("maxLength") ? count(where, schema, "maxLength", 0) : "";
      if (!high.empty() && std::stoul(high) < std::stoul(low))
        refuse(where + ".maxLength", "below minLength");
      return add_rule("\"\\\"\" char{" + low + "," + high + "} \"\\\"\"");
    }
    if (type == "integer") {
      only({"minimum"});
      if (!schema.contains("minimum")) return "integer";
      if (schema["minimum"] != 0) refuse(where + ".minimum", "only 0 (a natural number) is supported");
      return "natural";
    }
    only({});
    if (type == "number") return "number";
    if (type == "boolean") return "boolean";
    if (type == "null") return "null";
    refuse(where + ".type", "'" + type + "' is not a JSON Schema type");
  }
};

}  // namespace

std::string json_schema_grammar(std::string_view text) {
  const json schema = json::parse(text, nullptr, /*allow_exceptions=*/false);
  if (schema.is_discarded()) throw std::invalid_argument("json_schema: not JSON");
  Converter converter{schema};
  const std::string root = converter.visit(schema, "json_schema");
  std::string grammar = "root ::= " + root + "\n" + converter.rules + kPrimitives;
  Grammar::compile(grammar);  // a converter's slip would show here, not in a worker
  return grammar;
}

SchemaConstraint constrain_to_schema(std::string_view text) {
  try {
    return {JsonSchema::compile(text), ""};
  } catch (const std::invalid_argument&) {
    return {nullptr, json_schema_grammar(text)};
  }
}

}  // namespace nibble::worker
