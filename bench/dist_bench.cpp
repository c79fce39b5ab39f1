// Training throughput of one config over the processes of an MPI job (or one process): step time, the share of it
// spent exchanging data between ranks, and tokens/s of the global batch. Run it under mpirun for several processes;
// bench/dist_compare runs the 1 x 2 / 2 x 1 table of docs/distributed.md.
//   [mpirun -np N] dist_bench [--config FILE] [--set key=value ...] [--steps N] [--warmup N] [--json]
#include <CLI/CLI.hpp>
#include <cstdio>
#include <vector>

#include "config/config.h"
#include "core/rng.h"
#include "dist/comm.h"
#include "bench_util.h"
#include "train/trainer.h"

int main(int argc, char** argv) {
  CLI::App app{"Training throughput of one config over the processes of an MPI job (random tokens)."};
  std::string config_path;
  std::vector<std::string> overrides;
  int steps = 6, warmup = 2;
  bool json = false;
  app.add_option("-c,--config", config_path, "TOML config (default: the built-in defaults)");
  app.add_option("--set", overrides, "override a config key, e.g. --set train.threads=1");
  app.add_option("--steps", steps, "timed optimizer steps")->check(CLI::PositiveNumber);
  app.add_option("--warmup", warmup, "untimed steps first")->check(CLI::NonNegativeNumber);
  app.add_flag("--json", json, "also print one machine-readable RESULT line (rank 0)");
  CLI11_PARSE(app, argc, argv);
  try {
    moelab::Communicator& comm = moelab::world_communicator();
    const moelab::Config cfg = moelab::load_config(config_path, overrides);
    auto be = moelab::make_backend(cfg.train.backend, static_cast<int>(cfg.train.threads));
    moelab::Trainer trainer(cfg, *be, &comm);
    moelab::Rng rng(1 + static_cast<uint64_t>(comm.rank()));  // each rank its own tokens
    const int64_t tokens_per_micro = cfg.train.batch_size * cfg.model.seq_len;
    const moelab::Trainer::BatchSource random_batch = moelab::bench::random_batches(cfg, rng);
    for (int i = 0; i < warmup; ++i) trainer.step(random_batch);
    double seconds = 0, comm_seconds = 0;
    for (int i = 0; i < steps; ++i) {
      const moelab::StepStats s = trainer.step(random_batch);
      seconds += s.seconds;
      comm_seconds += s.comm_seconds;
    }
    // the slowest rank sets the pace
    double worst[2] = {seconds, comm_seconds};
    std::vector<double> all(2 * comm.size());
    comm.allgather(worst, 2, all.data());
    for (int q = 0; q < comm.size(); ++q) worst[0] = std::max(worst[0], all[2 * q]), worst[1] = std::max(worst[1], all[2 * q + 1]);
    const double step_s = worst[0] / steps, comm_s = worst[1] / steps;
    const double tokens = static_cast<double>(tokens_per_micro * cfg.train.grad_accum * comm.size());
    if (comm.rank() == 0) {
      std::printf("moelab dist_bench: %d process%s x %d threads, expert_parallel %ld, %.2fM parameters per process, "
                  "global batch %.0f tokens\n", comm.size(), comm.size() == 1 ? "" : "es", be->threads(),
                  static_cast<long>(cfg.dist.expert_parallel), trainer.model().num_params() / 1e6, tokens);
      std::printf("step time            %.1f ms (mean of %d steps, slowest rank)\n", 1e3 * step_s, steps);
      std::printf("communication        %.1f ms (%.1f%% of the step)\n", 1e3 * comm_s, 100.0 * comm_s / step_s);
      std::printf("tokens/s             %.0f\n", tokens / step_s);
      if (json)
        std::printf("RESULT {\"processes\": %d, \"threads\": %d, \"expert_parallel\": %ld, \"step_ms\": %.3f, "
                    "\"comm_ms\": %.3f, \"tokens_per_s\": %.3f}\n", comm.size(), be->threads(),
                    static_cast<long>(cfg.dist.expert_parallel), 1e3 * step_s, 1e3 * comm_s, tokens / step_s);
    }
  } catch (const std::exception& e) {
    std::fprintf(stderr, "dist_bench: error: %s\n", e.what());
    return 1;
  }
  return 0;
}
