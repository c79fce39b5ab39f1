#include "config/schema.h"

#include <algorithm>
#include <cmath>
#include <sstream>

#include "core/error.h"

namespace moelab {

namespace {

size_t edit_distance(const std::string& a, const std::string& b) {
  std::vector<size_t> prev(b.size() + 1), cur(b.size() + 1);
  for (size_t j = 0; j <= b.size(); ++j) prev[j] = j;
  for (size_t i = 1; i <= a.size(); ++i) {
    cur[0] = i;
    for (size_t j = 1; j <= b.size(); ++j)
      cur[j] = std::min({prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (a[i - 1] == b[j - 1] ? 0 : 1)});
    std::swap(prev, cur);
  }
  return prev[b.size()];
}

std::string number_text(double v, bool integer) {
  if (std::isinf(v)) return v < 0 ? "-inf" : "inf";
  if (integer) return std::to_string(static_cast<int64_t>(v));
  std::ostringstream os;
  os.precision(17);
  os << v;
  std::string s = os.str();
  if (s.find_first_of(".eEn") == std::string::npos) s += ".0";
  return s;
}

bool is_number(const toml::node& v) { return v.is_integer() || v.is_floating_point(); }

}  // namespace

std::string type_name(KeyType type, const std::vector<std::string>& choices) {
  switch (type) {
    case KeyType::Int: return "int";
    case KeyType::Float: return "float";
    case KeyType::Bool: return "bool";
    case KeyType::String: return "string";
    case KeyType::StringList: return "[string]";
    case KeyType::NumberList: return "[number]";
    case KeyType::Table: return "table";
    case KeyType::TableArray: return "[[table]]";
    case KeyType::Choice: {
      std::string s;
      for (const auto& c : choices) s += (s.empty() ? "" : "|") + c;
      return s;
    }
  }
  return "?";
}

std::string range_text(const KeyRule& rule) {
  const bool integer = rule.type == KeyType::Int;
  return "[" + number_text(rule.min, integer) + ", " + number_text(rule.max, integer) + "]";
}

std::string value_kind(const toml::node& value) {
  const std::string name(toml::impl::node_type_friendly_names[static_cast<int>(value.type())]);
  return (name.empty() || std::string("aeiou").find(name[0]) == std::string::npos ? "a " : "an ") + name;
}

std::string closest_key(const std::string& name, const std::vector<std::string>& known) {
  std::string best;
  size_t best_distance = 4;
  for (const auto& k : known) {
    const size_t d = edit_distance(name, k);
    if (d < best_distance) best_distance = d, best = k;
  }
  return best;
}

void throw_type_error(const std::string& subject, const KeyRule& rule, const std::string& got) {
  throw Error(subject + " expects " + type_name(rule.type, rule.choices) + ", got " + got);
}

void check_range(const std::string& subject, const KeyRule& rule, double value) {
  if (!(value >= rule.min && value <= rule.max) || std::isnan(value))
    throw Error(subject + " = " + number_text(value, false) + " is out of range " + range_text(rule));
}

void check_value(const std::string& subject, const KeyRule& rule, const toml::node& value) {
  switch (rule.type) {
    case KeyType::Int: {
      const auto v = value.value<double>();
      if (!is_number(value) || !v || std::floor(*v) != *v) throw_type_error(subject, rule, value_kind(value));
      return check_range(subject, rule, *v);
    }
    case KeyType::Float:
      if (!is_number(value)) throw_type_error(subject, rule, value_kind(value));
      return check_range(subject, rule, *value.value<double>());
    case KeyType::Bool:
      if (!value.is_boolean()) throw_type_error(subject, rule, value_kind(value));
      return;
    case KeyType::String:
      if (!value.is_string()) throw_type_error(subject, rule, value_kind(value));
      return;
    case KeyType::Choice:
      if (!value.is_string()) throw_type_error(subject, rule, value_kind(value));
      if (std::find(rule.choices.begin(), rule.choices.end(), *value.value<std::string>()) == rule.choices.end())
        throw Error(subject + " = '" + *value.value<std::string>() + "' is not one of " +
                    type_name(rule.type, rule.choices));
      return;
    case KeyType::StringList:
    case KeyType::NumberList: {
      const toml::array* array = value.as_array();
      if (!array) throw_type_error(subject, rule, value_kind(value));
      for (const toml::node& item : *array) {
        if (rule.type == KeyType::StringList && !item.is_string())
          throw_type_error(subject, rule, "an array holding " + value_kind(item));
        if (rule.type == KeyType::NumberList) {
          if (!is_number(item)) throw_type_error(subject, rule, "an array holding " + value_kind(item));
          check_range(subject, rule, *item.value<double>());
        }
      }
      return;
    }
    case KeyType::Table:
      if (!value.is_table()) throw_type_error(subject, rule, value_kind(value));
      return;
    case KeyType::TableArray:
      if (!value.is_array_of_tables()) throw_type_error(subject, rule, value_kind(value));
      return;
  }
}

void check_table(const toml::table& table, const std::vector<KeyRule>& rules, const std::string& section,
                 const std::string& prefix) {
  std::vector<std::string> known;
  for (const KeyRule& r : rules) known.push_back(r.name);
  for (const auto& [key, value] : table) {
    const std::string name(key.str());
    const auto rule = std::find_if(rules.begin(), rules.end(), [&](const KeyRule& r) { return r.name == name; });
    if (rule == rules.end()) {
      std::vector<std::string> sorted = known;
      std::sort(sorted.begin(), sorted.end());
      std::string list;
      for (const auto& k : sorted) list += (list.empty() ? "" : ", ") + k;
      const std::string best = closest_key(name, known);
      throw Error(prefix + "unknown key '" + name + "' in " + section +
                  (best.empty() ? "" : " (did you mean '" + best + "'?)") + "; known: " + list);
    }
    check_value(prefix + section + " " + name, *rule, value);
  }
}

}  // namespace moelab
