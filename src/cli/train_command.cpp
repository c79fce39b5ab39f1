#include "cli/train_command.h"

#include <cstdio>
#include <iostream>
#include <memory>
#include <string>
#include <vector>

#include "cli/report_errors.h"
#include "config/config.h"
#include "train/trainer.h"

namespace moelab {
namespace {

constexpr const char* kOverrideHelp =
    "override a config key, e.g. --set model.d_model=512 --set train.lr=1e-3 (repeatable; applied after --config)";

struct ConfigArgs {
  std::string config_path;
  std::vector<std::string> overrides;
};

void add_config_options(CLI::App* command, ConfigArgs& args, const char* config_help) {
  command->add_option("-c,--config", args.config_path, config_help);
  command->add_option("--set", args.overrides, kOverrideHelp);
}

}  // namespace

void add_train_command(CLI::App& app) {
  struct TrainArgs : ConfigArgs {
    bool resume = false;
    std::string init_from;
  };
  auto args = std::make_shared<TrainArgs>();
  auto* train = app.add_subcommand("train", "train a model from a TOML config (see configs/); under `mpirun -np N` "
                                   "(or `srun --mpi=pmix`) N processes train it together: data parallel, and with "
                                   "dist.expert_parallel = P the MoE experts sharded over P of them "
                                   "(docs/distributed.md)");
  add_config_options(train, *args, "TOML config file; omitted keys take their defaults");
  train->add_flag("--resume", args->resume,
                  "continue from <train.out_dir>/checkpoint (bit-identical to an uninterrupted run); without it an "
                  "existing checkpoint is an error");
  train->add_option("--init-from", args->init_from,
                    "start from the weights of this run or checkpoint directory (train.init_from); a dense source "
                    "initialises every expert of an MoE config from its FFN (sparse upcycling)");
  train->footer(
      "Example:\n  moelab train --config configs/dense-tiny.toml --set train.steps=200 --set train.threads=2\n"
      "Writes <train.out_dir>/config.toml (the resolved config) and metrics.jsonl (one JSON line per step).");
  on_run(train, [args] {
    std::vector<std::string> overrides = args->overrides;
    if (!args->init_from.empty()) overrides.push_back("train.init_from=" + args->init_from);
    run_training(load_config(args->config_path, overrides), std::cout, args->resume);
  });
}

void add_config_command(CLI::App& app) {
  struct PrintArgs : ConfigArgs {
    bool list = false, print = false;
  };
  auto args = std::make_shared<PrintArgs>();
  auto* config = app.add_subcommand("config", "list config keys, or print a resolved config");
  config->add_flag("--list", args->list, "list every key with its type, default and meaning");
  config->add_flag("--print", args->print, "print the resolved config of --config and --set as TOML");
  add_config_options(config, *args, "TOML config file");
  on_run(config, [args] {
    if (args->list) {
      std::printf("%-26s %-30s %-14s %s\n", "KEY", "TYPE", "DEFAULT", "MEANING");
      for (const auto& k : config_keys())
        std::printf("%-26s %-30s %-14s %s\n", k.name.c_str(), k.type.c_str(), k.default_value.c_str(), k.help.c_str());
      return;
    }
    std::cout << to_toml(load_config(args->config_path, args->overrides));
  });
}

}  // namespace moelab
