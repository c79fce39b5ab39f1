#pragma once
// `moelab train` and `moelab config`: registered by main.cpp like every other subcommand (on_run, report_errors.h).
#include <CLI/CLI.hpp>

namespace moelab {

// `train`: one model from a TOML config, in this process or in every process of an MPI job.
void add_train_command(CLI::App& app);
// `config`: list every key, or print the resolved config of --config and --set.
void add_config_command(CLI::App& app);

}  // namespace moelab
