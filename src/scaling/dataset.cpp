#include "scaling/dataset.h"

#include <sqlite3.h>

#include <algorithm>
#include <cerrno>
#include <cmath>
#include <cstdlib>
#include <fstream>
#include <memory>
#include <sstream>

#include "core/error.h"
#include "core/io.h"

namespace moelab {
namespace {

std::string trim(const std::string& s) {
  const auto b = s.find_first_not_of(" \t\r\n\"");
  if (b == std::string::npos) return "";
  const auto e = s.find_last_not_of(" \t\r\n\"");
  return s.substr(b, e - b + 1);
}

std::vector<std::string> split(const std::string& line, char sep) {
  std::vector<std::string> out;
  std::string cell;
  std::istringstream in(line);
  while (std::getline(in, cell, sep)) out.push_back(trim(cell));
  if (!line.empty() && line.back() == sep) out.push_back("");
  return out;
}

bool parse_number(const std::string& s, double& v) {
  if (s.empty()) return false;
  char* end = nullptr;
  errno = 0;
  v = std::strtod(s.c_str(), &end);
  return end == s.c_str() + s.size() && errno != ERANGE;
}

std::string column_list(const ResultTable& t) {
  std::string s;
  for (size_t i = 0; i < t.names.size(); ++i) s += (i ? ", " : "") + t.names[i];
  return s.empty() ? "(none)" : s;
}

bool is_sqlite(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  char magic[16] = {};
  in.read(magic, 16);
  return in.gcount() == 16 && std::string(magic, 15) == "SQLite format 3";
}

ResultTable read_sqlite(const std::string& path) {
  sqlite3* raw = nullptr;
  if (sqlite3_open_v2(path.c_str(), &raw, SQLITE_OPEN_READONLY, nullptr) != SQLITE_OK) {
    const std::string msg = raw ? sqlite3_errmsg(raw) : "out of memory";
    sqlite3_close(raw);
    throw Error("cannot open results database " + path + ": " + msg);
  }
  std::unique_ptr<sqlite3, int (*)(sqlite3*)> db(raw, sqlite3_close);
  sqlite3_stmt* raw_stmt = nullptr;
  if (sqlite3_prepare_v2(db.get(), "SELECT * FROM results", -1, &raw_stmt, nullptr) != SQLITE_OK)
    throw Error("results database " + path + " has no readable table `results` (" + sqlite3_errmsg(db.get()) +
                "); fit reads the table the sweep store writes, or pass a CSV file");
  std::unique_ptr<sqlite3_stmt, int (*)(sqlite3_stmt*)> stmt(raw_stmt, sqlite3_finalize);
  ResultTable t;
  t.source = path;
  const int n = sqlite3_column_count(stmt.get());
  for (int c = 0; c < n; ++c) t.names.push_back(sqlite3_column_name(stmt.get(), c));
  t.columns.assign(n, {});
  t.numeric.assign(n, true);
  int rc;
  while ((rc = sqlite3_step(stmt.get())) == SQLITE_ROW) {
    for (int c = 0; c < n; ++c) {
      const int type = sqlite3_column_type(stmt.get(), c);
      double v = std::nan("");
      if (type == SQLITE_INTEGER || type == SQLITE_FLOAT) {
        v = sqlite3_column_double(stmt.get(), c);
      } else if (type == SQLITE_TEXT) {
        const std::string text = reinterpret_cast<const char*>(sqlite3_column_text(stmt.get(), c));
        if (!parse_number(trim(text), v)) t.numeric[c] = false;
      } else {
        t.numeric[c] = false;
      }
      t.columns[c].push_back(v);
    }
  }
  if (rc != SQLITE_DONE) throw Error("error reading table `results` of " + path + ": " + sqlite3_errmsg(db.get()));
  return t;
}

}  // namespace

int ResultTable::find(const std::string& name) const {
  for (size_t i = 0; i < names.size(); ++i)
    if (names[i] == name) return static_cast<int>(i);
  return -1;
}

ResultTable parse_csv(const std::string& text, const std::string& source) {
  ResultTable t;
  t.source = source;
  std::istringstream in(text);
  std::string line;
  size_t line_no = 0;
  bool have_header = false;
  while (std::getline(in, line)) {
    ++line_no;
    if (trim(line).empty() || trim(line)[0] == '#') continue;
    const auto cells = split(line, ',');
    if (!have_header) {
      t.names = cells;
      for (size_t i = 0; i < t.names.size(); ++i)
        if (t.names[i].empty()) throw Error(source + ": header column " + std::to_string(i + 1) + " has no name");
      t.columns.assign(cells.size(), {});
      t.numeric.assign(cells.size(), true);
      have_header = true;
      continue;
    }
    if (cells.size() != t.names.size())
      throw Error(source + ":" + std::to_string(line_no) + ": " + std::to_string(cells.size()) +
                  " fields, but the header has " + std::to_string(t.names.size()));
    for (size_t c = 0; c < cells.size(); ++c) {
      double v = std::nan("");
      if (!parse_number(cells[c], v)) {
        t.numeric[c] = false;
        v = std::nan("");
      }
      t.columns[c].push_back(v);
    }
  }
  if (!have_header) throw Error(source + " is empty: expected a header row and one row per run");
  return t;
}

ResultTable read_result_table(const std::string& path) {
  if (!std::ifstream(path).good()) throw Error("results file " + path + " does not exist or cannot be read");
  if (is_sqlite(path)) return read_sqlite(path);
  return parse_csv(read_file(path, "results CSV"), path);
}

ColumnMap default_columns() {
  return {{"N", "params"}, {"D", "tokens"}, {"G", "granularity"}, {"S", "sparsity"}, {"L", "loss"}, {"C", "flops"},
          {"A", "active_params"}, {"E", "experts"}};
}

ColumnMap parse_column_map(const std::string& spec) {
  ColumnMap map = default_columns();
  if (trim(spec).empty()) return map;
  for (const auto& item : split(spec, ',')) {
    const auto eq = item.find('=');
    if (eq == std::string::npos)
      throw Error("--columns entry '" + item + "' is not LOGICAL=column, e.g. --columns N=params,D=tokens");
    const std::string key = trim(item.substr(0, eq)), value = trim(item.substr(eq + 1));
    if (!map.count(key))
      throw Error("--columns: unknown logical column '" + key + "'; use N, D, G, S, L, C, A or E");
    if (value.empty()) throw Error("--columns: empty column name for " + key);
    map[key] = value;
  }
  return map;
}

bool RowFilter::matches(double x) const {
  if (op == ">=") return x >= value;
  if (op == ">") return x > value;
  if (op == "<=") return x <= value;
  if (op == "<") return x < value;
  return std::fabs(x - value) <= 1e-9 * std::max(std::fabs(x), std::fabs(value));
}

RowFilter parse_row_filter(const std::string& expression) {
  for (const char* op : {">=", "<=", "==", ">", "<"}) {
    const auto at = expression.find(op);
    if (at == std::string::npos) continue;
    RowFilter f;
    f.column = trim(expression.substr(0, at));
    f.op = op;
    const std::string number = trim(expression.substr(at + std::string(op).size()));
    if (f.column.empty() || f.column.find_first_of("=<>!") != std::string::npos || !parse_number(number, f.value))
      break;
    return f;
  }
  throw Error("holdout expression '" + expression +
              "' is not COLUMN OP NUMBER with OP one of >= > <= < ==, e.g. --holdout 'S>=0.95' or 'C==1e20'");
}

int resolve_column(const ResultTable& table, const ColumnMap& columns, const std::string& name) {
  const auto mapped = columns.find(name);
  const std::string file_name = mapped != columns.end() ? mapped->second : name;
  const int c = table.find(file_name);
  if (c < 0) {
    std::string what = mapped != columns.end() ? "column '" + file_name + "' (" + name + ")" : "column '" + name + "'";
    throw Error(what + " not found in " + table.source + "; its columns are: " + column_list(table) +
                (mapped != columns.end() ? "; remap with --columns " + name + "=<column>" : ""));
  }
  if (!table.numeric[c])
    throw Error("column '" + file_name + "' of " + table.source + " holds values that are not numbers");
  return c;
}

std::vector<Observation> extract_observations(const ResultTable& table, const ColumnMap& columns,
                                              const std::vector<std::string>& needed) {
  std::vector<Observation> out(table.rows());
  for (const std::string& key : needed) {
    const int c = resolve_column(table, columns, key);
    const std::string& file_name = table.names[c];
    for (size_t r = 0; r < table.rows(); ++r) {
      const double v = table.columns[c][r];
      const std::string where = table.source + ": row " + std::to_string(r + 1) + ", column '" + file_name + "' (" +
                                key + ") = " + std::to_string(v);
      if (!std::isfinite(v)) throw Error(where + " is not a finite number");
      if (key == "S") {
        if (v < 0 || v >= 1) throw Error(where + ": sparsity must lie in [0, 1)");
        out[r].S = v;
        continue;
      }
      if (key == "E") {  // routed experts; a dense run (0 in the results store) counts as one expert
        if (v < 0) throw Error(where + ": the expert count must be >= 0 (0 or 1: dense)");
        out[r].E = std::max(1.0, v);
        continue;
      }
      if (!(v > 0)) throw Error(where + " is not positive; every N, D, G, C, L and A must be > 0");
      if (key == "N") out[r].N = v;
      else if (key == "D") out[r].D = v;
      else if (key == "G") out[r].G = v;
      else if (key == "C") out[r].C = v;
      else if (key == "L") out[r].L = v;
      else if (key == "A") out[r].A = v;
    }
  }
  return out;
}

}  // namespace moelab
