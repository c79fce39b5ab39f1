#pragma once
// `moelab sweep plan|run|status|export|slurm|collect` (docs/sweeps.md).

namespace CLI {
class App;
}

namespace moelab {

// Registers `sweep` and its subcommands on `app`, each with its own callback: main() only has to call this.
// User errors print "moelab: error: ..." to stderr and end the parse with exit code 1 (CLI::RuntimeError).
void add_sweep_commands(CLI::App& app);

}  // namespace moelab
