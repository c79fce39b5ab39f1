#pragma once
// Shared by the benchmark programs: timing training steps on random tokens.
#include <ctime>

#include "core/rng.h"
#include "train/trainer.h"

namespace moelab::bench {

struct StepTiming {
  double seconds_per_step = 0;
  double tokens_per_second = 0;
  double cpu_seconds_per_step = 0;  // process CPU time (all threads): on a busy machine it moves less than wall time
  int64_t params = 0;
};

// Micro-batches of uniformly random tokens and targets drawn from `rng` (which must outlive the source).
inline Trainer::BatchSource random_batches(const Config& cfg, Rng& rng) {
  const int64_t tokens_per_micro = cfg.train.batch_size * cfg.model.seq_len, vocab = cfg.model.vocab_size;
  return [&rng, tokens_per_micro, vocab](std::vector<int32_t>& tok, std::vector<int32_t>& tgt) {
    tok.resize(tokens_per_micro);
    tgt.resize(tokens_per_micro);
    for (auto& t : tok) t = static_cast<int32_t>(rng.below(vocab));
    for (auto& t : tgt) t = static_cast<int32_t>(rng.below(vocab));
  };
}

// Mean wall time of `steps` optimizer steps after `warmup` untimed ones, on uniformly random tokens.
inline StepTiming time_training(const Config& cfg, Backend& be, int steps, int warmup) {
  Trainer trainer(cfg, be);
  Rng rng(1);
  const int64_t tokens_per_micro = cfg.train.batch_size * cfg.model.seq_len;
  const Trainer::BatchSource random_batch = random_batches(cfg, rng);
  for (int i = 0; i < warmup; ++i) trainer.step(random_batch);
  auto cpu_now = [] {
    timespec ts{};
    clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &ts);
    return static_cast<double>(ts.tv_sec) + 1e-9 * static_cast<double>(ts.tv_nsec);
  };
  double seconds = 0;
  const double cpu_start = cpu_now();
  for (int i = 0; i < steps; ++i) seconds += trainer.step(random_batch).seconds;
  const double cpu_seconds = cpu_now() - cpu_start;
  StepTiming t;
  t.seconds_per_step = seconds / steps;
  t.cpu_seconds_per_step = cpu_seconds / steps;
  t.tokens_per_second = static_cast<double>(tokens_per_micro * cfg.train.grad_accum) / t.seconds_per_step;
  t.params = trainer.model().num_params();
  return t;
}

}  // namespace moelab::bench
