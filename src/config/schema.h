#pragma once
// The typed-key schema that every TOML input of moelab goes through: a run's config (config/config.cpp, whose keys
// also say where in Config they land) and a sweep spec's own tables (sweep/plan.cpp). One set of value types, one
// check of a value against its rule, one wording of each error, one did-you-mean for a misspelt key.
#include <limits>
#include <string>
#include <utility>
#include <toml++/toml.h>
#include <vector>

namespace moelab {

enum class KeyType { Int, Float, Bool, String, Choice, StringList, NumberList, Table, TableArray };

struct KeyRule {
  KeyRule() = default;
  KeyRule(std::string key, KeyType key_type, double lo = -std::numeric_limits<double>::infinity(),
          double hi = std::numeric_limits<double>::infinity(), std::vector<std::string> names = {})
      : name(std::move(key)), type(key_type), min(lo), max(hi), choices(std::move(names)) {}
  std::string name;
  KeyType type = KeyType::Float;
  double min = -std::numeric_limits<double>::infinity();  // Int, Float and each NumberList entry
  double max = std::numeric_limits<double>::infinity();
  std::vector<std::string> choices;  // Choice
};

// "int", "float", "bool", "string", "a|b|c", "[string]", "[number]", "table", "[[table]]".
std::string type_name(KeyType type, const std::vector<std::string>& choices = {});
// "[lo, hi]" with "-inf"/"inf"; integers without a fraction.
std::string range_text(const KeyRule& rule);
// What a TOML value is, for "got ...": "a string", "an array", "an integer", ...
std::string value_kind(const toml::node& value);
// The known key closest to a misspelt one (at most 3 edits away), or "".
std::string closest_key(const std::string& name, const std::vector<std::string>& known);

// subject: how errors name the key, e.g. "config key 'train.lr' in run.toml" or "sweep spec: [sweep] seeds".
[[noreturn]] void throw_type_error(const std::string& subject, const KeyRule& rule, const std::string& got);
void check_range(const std::string& subject, const KeyRule& rule, double value);
// The value's type (integers may be written as integral floats, floats as integers) and range against its rule.
void check_value(const std::string& subject, const KeyRule& rule, const toml::node& value);

// Every key of `table` (the section called `section` in errors, e.g. "[rules]") known to `rules`, else an error
// naming the closest known key and listing them all; every value checked against its rule. `prefix` starts each
// error ("sweep spec: ").
void check_table(const toml::table& table, const std::vector<KeyRule>& rules, const std::string& section,
                 const std::string& prefix);

}  // namespace moelab
