#pragma once
// Run results for law fitting: a CSV file (header row, comma-separated numbers) or a SQLite results store
// (table `results`), mapped from logical columns (N D G S C L) to the file's column names.
#include <cstddef>
#include <map>
#include <string>
#include <vector>

#include "scaling/laws.h"

namespace moelab {

// Every column of a results file. Columns whose values are not all numbers are kept with numeric = false and
// NaN values; using one for a fit is an error naming it.
struct ResultTable {
  std::string source;  // the path, for messages
  std::vector<std::string> names;
  std::vector<std::vector<double>> columns;  // columns[c][row]
  std::vector<bool> numeric;
  size_t rows() const { return columns.empty() ? 0 : columns[0].size(); }
  int find(const std::string& name) const;  // -1 when absent
};

// A .csv file, or a SQLite database (recognised by its header, whatever the extension) whose table `results`
// is read whole. Throws Error for a missing file, a malformed CSV row, or a database without `results`.
ResultTable read_result_table(const std::string& path);
ResultTable parse_csv(const std::string& text, const std::string& source);

// Logical column -> file column. Defaults: N=params, D=tokens, G=granularity, S=sparsity, L=loss, C=flops.
using ColumnMap = std::map<std::string, std::string>;
ColumnMap default_columns();
// Applies "N=total_params,D=tok" over the defaults; an unknown logical name is an error.
ColumnMap parse_column_map(const std::string& spec);

// A row filter "COLUMN OP NUMBER" with OP one of >= > <= < ==, e.g. "S>=0.95" or "C==1e20". COLUMN is a logical
// name (mapped through the ColumnMap) or a file column. == compares with a relative tolerance of 1e-9.
struct RowFilter {
  std::string column, op;
  double value = 0;
  bool matches(double x) const;
  std::string text() const { return column + op + std::to_string(value); }
};
RowFilter parse_row_filter(const std::string& expression);

// The rows as Observations, with the logical columns `needed` taken from the table (others keep their
// defaults: G = 1, S = 0). Validates every value: N, D, C, L and G positive and finite, 0 <= S < 1; errors
// name the column, the row (1-based, as in the file) and the fix.
std::vector<Observation> extract_observations(const ResultTable& table, const ColumnMap& columns,
                                              const std::vector<std::string>& needed);
// The file column a logical name or a file column refers to; throws Error listing the available columns.
int resolve_column(const ResultTable& table, const ColumnMap& columns, const std::string& name);

}  // namespace moelab
