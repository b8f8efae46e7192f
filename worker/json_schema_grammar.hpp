#pragma once
// JSON schemas as GBNF grammars (worker/gbnf_grammar), for what the deterministic recognizer
// (worker/json_schema) does not take: unions of alternatives that begin alike (anyOf of objects: tagged
// unions, pydantic's discriminated models, a call to one of several tools), recursive "$ref"s, minItems /
// maxItems, minLength / maxLength, enum and const of any JSON value, additionalProperties true or a
// schema, integers with "minimum": 0, strings with an anchored "pattern" (^...$, a whole-string match) or
// a "format" (date, time, date-time, uuid), their characters written raw (none JSON escapes). As
// llama.cpp's json-schema-to-grammar writes them: an object's properties in the schema's order (required
// ones always, optional ones or not), compact whitespace (one space at most between tokens). Annotations
// are ignored; any other keyword (other formats, other bounds) is refused by name rather than not enforced.
#include <memory>
#include <string>
#include <string_view>

#include "worker/json_schema.hpp"

namespace nibble::worker {

// The GBNF text of the schema in `text`. Throws std::invalid_argument naming the place, e.g.
// "json_schema.properties.a: 'pattern' is not supported".
std::string json_schema_grammar(std::string_view text);

// How a schema is enforced: by the recognizer's node table where it takes the schema (cheaper), else by
// the schema's grammar. Throws std::invalid_argument when neither can (the grammar converter's reason).
struct SchemaConstraint {
  std::shared_ptr<const JsonSchema> schema;  // set: the recognizer follows it
  std::string grammar;                       // else: the grammar's text
};
SchemaConstraint constrain_to_schema(std::string_view text);

}  // namespace nibble::worker
