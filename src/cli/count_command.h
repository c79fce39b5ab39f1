#pragma once
// `moelab count`: parameter counts and training FLOPs of a config under each paper's convention
// (docs/counting.md). It never builds the model, so it answers instantly for any shape.
#include <nlohmann/json.hpp>
#include <optional>
#include <string>

#include "config/config.h"

namespace CLI {
class App;
}

namespace moelab {

// Registers the `count` subcommand on `app`, with its own callback: main() only has to call this.
// User errors print "moelab: error: ..." to stderr and end the parse with exit code 1 (CLI::RuntimeError).
void add_count_command(CLI::App& app);

// The report `moelab count --json` prints: keys "config", "parameters", "moe", "flops_per_token", and with
// `tokens` also "tokens" and "training_flops" (per-token FLOPs * tokens), each convention under its name.
nlohmann::ordered_json count_report_json(const ModelConfig& model, const std::string& source,
                                         std::optional<double> tokens);
// The same report as an aligned, human-readable table with thousands separators.
std::string count_report_table(const ModelConfig& model, const std::string& source, std::optional<double> tokens);

// 1234567 -> "1,234,567".
std::string with_thousands_separators(int64_t value);

}  // namespace moelab
