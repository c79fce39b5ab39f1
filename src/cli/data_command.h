#pragma once
// `moelab data bytes | prepare | encode | train-tokenizer`: registered on the `data` subcommand by main.cpp.
#include <CLI/CLI.hpp>

namespace moelab {

// Adds the byte, tokenizer and shard subcommands to `data_app`. Each runs from its CLI11 callback; a user error prints
// `moelab: error: ...` to stderr and ends the parse with CLI::RuntimeError(1) (exit code 1).
void add_data_commands(CLI::App& data_app);

}  // namespace moelab
