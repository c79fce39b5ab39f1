#pragma once
// `moelab fit`, `moelab optimize`, `moelab predict`: scaling-law fitting and compute-optimal advice
// (docs/fitting.md). Each subcommand reports its own errors ("moelab: error: ...", exit code 1).
namespace CLI {
class App;
}

namespace moelab {

// Registers `fit`, `optimize` and `predict` on `app`, each with its own callback: main() only calls this.
void add_fit_commands(CLI::App& app);

}  // namespace moelab
