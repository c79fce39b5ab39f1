// moelab command-line front: thin wrappers over the library, one subcommand each.
#include <CLI/CLI.hpp>
#include <cstdio>
#include <iostream>

#include "cli/count_command.h"
#include "cli/data_command.h"
#include "cli/export_command.h"
#include "cli/fit_commands.h"
#include "cli/model_commands.h"
#include "cli/report_errors.h"
#include "cli/report_command.h"
#include "cli/sweep_commands.h"
#include "core/error.h"
#include "dist/comm.h"
#include "data/bytes.h"
#include "config/config.h"
#include "train/trainer.h"

namespace {

constexpr const char* kOverrideHelp =
    "override a config key, e.g. --set model.d_model=512 --set train.lr=1e-3 (repeatable; applied after --config)";

int cmd_config_list() {
  std::printf("%-26s %-30s %-14s %s\n", "KEY", "TYPE", "DEFAULT", "MEANING");
  for (const auto& k : moelab::config_keys())
    std::printf("%-26s %-30s %-14s %s\n", k.name.c_str(), k.type.c_str(), k.default_value.c_str(), k.help.c_str());
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  moelab::install_fatal_signal_handlers();  // multi-process jobs: a crash on one rank ends them all
  CLI::App app{
      "moelab: train dense and Mixture-of-Experts language models on CPU and measure how they scale.\n"
      "Run `moelab SUBCOMMAND --help` for details; `moelab config --list` shows every config key."};
  app.require_subcommand(1);

  // train
  std::string config_path;
  std::vector<std::string> overrides;
  auto* train = app.add_subcommand("train", "train a model from a TOML config (see configs/); under `mpirun -np N` "
                                   "(or `srun --mpi=pmix`) N processes train it together: data parallel, and with "
                                   "dist.expert_parallel = P the MoE experts sharded over P of them "
                                   "(docs/distributed.md)");
  train->add_option("-c,--config", config_path, "TOML config file; omitted keys take their defaults");
  train->add_option("--set", overrides, kOverrideHelp);
  bool resume = false;
  train->add_flag("--resume", resume,
                  "continue from <train.out_dir>/checkpoint (bit-identical to an uninterrupted run); without it an "
                  "existing checkpoint is an error");
  std::string init_from;
  train->add_option("--init-from", init_from,
                    "start from the weights of this run or checkpoint directory (train.init_from); a dense source "
                    "initialises every expert of an MoE config from its FFN (sparse upcycling)");
  train->footer(
      "Example:\n  moelab train --config configs/dense-tiny.toml --set train.steps=200 --set train.threads=2\n"
      "Writes <train.out_dir>/config.toml (the resolved config) and metrics.jsonl (one JSON line per step).");

  // config
  bool list_keys = false, print_config = false;
  auto* config = app.add_subcommand("config", "list config keys, or print a resolved config");
  config->add_flag("--list", list_keys, "list every key with its type, default and meaning");
  config->add_flag("--print", print_config, "print the resolved config of --config and --set as TOML");
  config->add_option("-c,--config", config_path, "TOML config file");
  config->add_option("--set", overrides, kOverrideHelp);

  // data bytes
  auto* data = app.add_subcommand("data", "prepare token files");
  data->require_subcommand(1);
  std::vector<std::string> inputs;
  std::string train_out, val_out;
  double val_fraction = 0.05;
  auto* bytes = data->add_subcommand("bytes", "encode text files as byte tokens (vocab 256) into a token shard");
  bytes->add_option("inputs", inputs, "text files or directories (every file below, sorted) to encode")
      ->required()
      ->check(CLI::ExistingPath);
  bytes->add_option("--out", train_out, "training token file to write")->required();
  bytes->add_option("--val-out", val_out, "validation token file (the tail of each input) to write");
  bytes->add_option("--val-fraction", val_fraction, "share of each input held out for validation")
      ->check(CLI::Range(0.0, 0.5));

  moelab::add_data_commands(*data);
  moelab::add_model_commands(app);
  moelab::add_count_command(app);
  moelab::add_export_command(app);
  moelab::add_fit_commands(app);
  moelab::add_sweep_commands(app);
  moelab::add_report_command(app);

  CLI11_PARSE(app, argc, argv);
  try {
    if (train->parsed()) {
      if (!init_from.empty()) overrides.push_back("train.init_from=" + init_from);
      const moelab::Config cfg = moelab::load_config(config_path, overrides);
      moelab::run_training(cfg, std::cout, resume);
      return 0;
    }
    if (config->parsed()) {
      if (list_keys) return cmd_config_list();
      std::cout << moelab::to_toml(moelab::load_config(config_path, overrides));
      return 0;
    }
    if (bytes->parsed()) {
      const auto r = moelab::encode_bytes(inputs, train_out, val_out, val_out.empty() ? 0.0 : val_fraction);
      std::printf("wrote %ld training tokens to %s", static_cast<long>(r.train_tokens), train_out.c_str());
      if (!val_out.empty()) std::printf(" and %ld validation tokens to %s", static_cast<long>(r.val_tokens),
                                        val_out.c_str());
      std::printf("\n");
      return 0;
    }
  } catch (const moelab::Error& e) {
    moelab::report_fatal("error", e.what(), 1);
    return 1;
  } catch (const std::exception& e) {
    moelab::report_fatal("unexpected error", e.what(), 2);
    return 2;
  }
  return 0;
}
