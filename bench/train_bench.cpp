// Training throughput of one config: tokens/s, achieved model FLOP/s and MFU against the fp32 GEMM peak of
// this machine, measured in the same run with the same thread count.
//   train_bench [--config FILE] [--set key=value ...] [--steps N] [--warmup N] [--json]
// train.precision (fp32 | bf16) selects the GEMM precision of the timed training; the peak is always fp32.
// --json adds one line `RESULT {...}` for bench/compare.
#include <CLI/CLI.hpp>
#include <algorithm>
#include <cstdio>

#include "backend/backend.h"
#include "backend/peak.h"
#include "bench_util.h"
#include "core/rng.h"
#include "core/timer.h"
#include "config/config.h"
#include "model/flops.h"
#include "train/trainer.h"


int main(int argc, char** argv) {
  CLI::App app{"Training throughput and MFU of one moelab config (random tokens, full forward/backward/AdamW)."};
  std::string config_path;
  std::vector<std::string> overrides;
  int steps = 10, warmup = 2;
  app.add_option("-c,--config", config_path, "TOML config (default: the built-in defaults)");
  app.add_option("--set", overrides, "override a config key, e.g. --set train.threads=2");
  app.add_option("--steps", steps, "timed optimizer steps")->check(CLI::PositiveNumber);
  app.add_option("--warmup", warmup, "untimed steps first")->check(CLI::NonNegativeNumber);
  bool json = false;
  double peak_seconds = 1.0;
  app.add_option("--peak-seconds", peak_seconds, "seconds per size of the fp32 GEMM peak measurement (0: skip it, "
                 "e.g. when profiling)")->check(CLI::NonNegativeNumber);
  app.add_flag("--json", json, "also print one machine-readable RESULT line");
  std::string peak_precision = "fp32";
  app.add_option("--peak-precision", peak_precision, "precision of the GEMM peak MFU is measured against: fp32 (the "
                 "CPU figures' convention) or bf16 (a GPU's bf16 training)")->check(CLI::IsMember({"fp32", "bf16"}));
  CLI11_PARSE(app, argc, argv);

  try {
    const moelab::Config cfg = moelab::load_config(config_path, overrides);
    auto be = moelab::make_backend(cfg.train.backend, static_cast<int>(cfg.train.threads));
    const auto& m = cfg.model;
    std::printf("moelab train_bench: d_model %ld, layers %ld, heads %ld, d_ff %ld, seq %ld, vocab %ld, ffn %s, "
                "batch %ld x %ld, threads %d, %s\n",
                static_cast<long>(m.d_model), static_cast<long>(m.n_layers), static_cast<long>(m.n_heads),
                static_cast<long>(m.ffn_hidden()), static_cast<long>(m.seq_len), static_cast<long>(m.vocab_size),
                moelab::to_string(m.ffn).c_str(), static_cast<long>(cfg.train.batch_size),
                static_cast<long>(cfg.train.grad_accum), be->threads(),
                moelab::to_string(cfg.train.precision).c_str());

    const moelab::Precision peak_prec = peak_precision == "bf16" ? moelab::Precision::BF16 : moelab::Precision::FP32;
    std::printf("measuring the %s GEMM peak (%s, %d threads):\n", peak_precision.c_str(), be->name().c_str(),
                be->threads());
    const double peak = peak_seconds > 0 ? moelab::measure_gemm_peak(*be, peak_seconds, stdout, peak_prec) : 0.0;

    const auto timing = moelab::bench::time_training(cfg, *be, steps, warmup);
    const double tok_s = timing.tokens_per_second;
    const double flops_per_token = moelab::exact_training_flops_per_token(m);  // what the engine computes
    const double achieved = tok_s * flops_per_token;
    std::printf("parameters           %.2fM\n", timing.params / 1e6);
    std::printf("model FLOPs/token    %.1f MFLOP (exact matmul count, fwd+bwd)\n", flops_per_token / 1e6);
    std::printf("step time            %.1f ms (mean of %d steps; %.1f ms of CPU time per step on %d threads)\n",
                1e3 * timing.seconds_per_step, steps, 1e3 * timing.cpu_seconds_per_step, be->threads());
    std::printf("tokens/s             %.0f\n", tok_s);
    std::printf("achieved             %.1f GFLOP/s\n", achieved / 1e9);
    std::printf("GEMM peak (%s)     %.1f GFLOP/s\n", peak_precision.c_str(), peak / 1e9);
    if (peak > 0) std::printf("MFU                  %.1f%%\n", 100.0 * achieved / peak);
    const double memory_mib = static_cast<double>(be->peak_allocated_bytes()) / (1 << 20);
    std::printf("backend memory       %.0f MiB at most (parameters, gradients, AdamW state, activations)\n",
                memory_mib);
    if (json)
      std::printf("RESULT {\"tokens_per_s\": %.3f, \"step_ms\": %.3f, \"flops_per_token\": %.1f, "
                  "\"peak_flops\": %.1f, \"peak_precision\": \"%s\", \"precision\": \"%s\", \"threads\": %d, "
                  "\"backend\": \"%s\", \"memory_mib\": %.1f}\n",
                  tok_s, 1e3 * timing.seconds_per_step, flops_per_token, peak, peak_precision.c_str(),
                  moelab::to_string(cfg.train.precision).c_str(), be->threads(), be->name().c_str(), memory_mib);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "train_bench: error: %s\n", e.what());
    return 1;
  }
  return 0;
}
