#pragma once
#include <CLI/CLI.hpp>

namespace moelab {

// `moelab sweep suggest DIR`: the next runs to buy for a law's optimum at a target budget (scaling/suggest.h).
void add_sweep_suggest_command(CLI::App& sweep);

}  // namespace moelab
