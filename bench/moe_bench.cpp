// MoE step time over the step time of the dense model with the same active parameters: same d_model and
// layers, and a dense FFN as wide as the active experts together (top_k experts of hidden d_ff / G).
//   moe_bench [--config FILE] [--set key=value ...] [--steps N] [--warmup N]
// The base config (default configs/dense-256.toml's shape) gives the dense shape; the MoE variants are top-1,
// top-2 (8 experts) and fine-grained G = 4 (expansion 8, 32 experts of d_ff/4, top-4).
#include <CLI/CLI.hpp>
#include <cstdio>

#include "bench_util.h"
#include "model/flops.h"
#include "model/param_layout.h"

int main(int argc, char** argv) {
  CLI::App app{"MoE vs dense step time at equal active parameters."};
  std::string config_path;
  std::vector<std::string> overrides;
  int steps = 5, warmup = 1;
  app.add_option("-c,--config", config_path, "base TOML config (its MoE keys are ignored)");
  app.add_option("--set", overrides, "override a base config key");
  app.add_option("--steps", steps, "timed steps per model")->check(CLI::PositiveNumber);
  app.add_option("--warmup", warmup, "untimed steps first")->check(CLI::NonNegativeNumber);
  CLI11_PARSE(app, argc, argv);
  try {
    const moelab::Config base = moelab::load_config(config_path, overrides);
    auto be = moelab::make_backend(base.train.backend, static_cast<int>(base.train.threads));
    const int64_t F = base.model.ffn_hidden();
    struct Variant {
      const char* name;
      std::vector<std::string> moe;
      int64_t dense_ff;  // d_ff of the dense model with equal active parameters
    };
    const std::vector<Variant> variants = {
        {"8 experts top-1", {"moe.experts=8", "moe.top_k=1"}, F},
        {"8 experts top-2", {"moe.experts=8", "moe.top_k=2"}, 2 * F},
        {"G=4: 32 experts of d_ff/4, top-4", {"moe.expansion=8", "moe.granularity=4", "moe.top_k=1"}, F},
    };
    std::printf("moe_bench: d_model %ld, layers %ld, d_ff %ld, seq %ld, batch %ld, threads %d, %d steps\n",
                static_cast<long>(base.model.d_model), static_cast<long>(base.model.n_layers),
                static_cast<long>(F), static_cast<long>(base.model.seq_len), static_cast<long>(base.train.batch_size),
                be->threads(), steps);
    std::printf("%-34s %10s %10s %12s %12s %8s\n", "variant", "moe ms", "dense ms", "moe tok/s", "dense tok/s",
                "ratio");
    for (const auto& v : variants) {
      std::vector<std::string> moe_o = overrides, dense_o = overrides;
      moe_o.insert(moe_o.end(), v.moe.begin(), v.moe.end());
      moe_o.push_back("moe.aux_loss_weight=0.01");
      dense_o.push_back("model.d_ff=" + std::to_string(v.dense_ff));
      const moelab::Config moe_cfg = moelab::load_config(config_path, moe_o);
      const moelab::Config dense_cfg = moelab::load_config(config_path, dense_o);
      const auto moe_t = moelab::bench::time_training(moe_cfg, *be, steps, warmup);
      const auto dense_t = moelab::bench::time_training(dense_cfg, *be, steps, warmup);
      std::printf("%-34s %10.1f %10.1f %12.0f %12.0f %7.2fx\n", v.name, 1e3 * moe_t.seconds_per_step,
                  1e3 * dense_t.seconds_per_step, moe_t.tokens_per_second, dense_t.tokens_per_second,
                  moe_t.seconds_per_step / dense_t.seconds_per_step);
    }
  } catch (const std::exception& e) {
    std::fprintf(stderr, "moe_bench: error: %s\n", e.what());
    return 1;
  }
  return 0;
}
