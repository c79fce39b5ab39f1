// moelab command-line front: thin wrappers over the library, one subcommand each, every one registered the same
// way (its add_*_command, whose body runs behind the one error handler of cli/report_errors.h).
#include <CLI/CLI.hpp>

#include "cli/count_command.h"
#include "cli/data_command.h"
#include "cli/export_command.h"
#include "cli/fit_commands.h"
#include "cli/model_commands.h"
#include "cli/report_command.h"
#include "cli/sweep_commands.h"
#include "cli/train_command.h"
#include "dist/comm.h"

int main(int argc, char** argv) {
  moelab::install_fatal_signal_handlers();  // multi-process jobs: a crash on one rank ends them all
  CLI::App app{
      "moelab: train dense and Mixture-of-Experts language models on CPU and measure how they scale.\n"
      "Run `moelab SUBCOMMAND --help` for details; `moelab config --list` shows every config key."};
  app.require_subcommand(1);
  moelab::add_train_command(app);
  moelab::add_config_command(app);
  auto* data = app.add_subcommand("data", "prepare token files");
  data->require_subcommand(1);
  moelab::add_data_commands(*data);
  moelab::add_model_commands(app);
  moelab::add_count_command(app);
  moelab::add_export_command(app);
  moelab::add_fit_commands(app);
  moelab::add_sweep_commands(app);
  moelab::add_report_command(app);
  CLI11_PARSE(app, argc, argv);
  return 0;
}
