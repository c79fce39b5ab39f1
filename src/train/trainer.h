#pragma once
// The training loop: sample micro-batches, forward/backward with gradient accumulation, clip, AdamW step on a
// schedule, log progress to stdout and metrics.jsonl in the run directory.
#include <functional>
#include <memory>
#include <ostream>
#include <string>
#include <vector>

#include "backend/backend.h"
#include "core/rng.h"
#include "core/timer.h"
#include "data/token_file.h"
#include "config/config.h"
#include "dist/comm.h"
#include "model/transformer.h"
#include "optim/adamw.h"
#include "train/checkpoint.h"
#include "train/init_from.h"

namespace moelab {

struct StepStats {
  int64_t step = 0;      // 1-based index of the optimizer step just taken
  double loss = 0;       // mean training cross-entropy over the step's micro-batches
  // Mean weighted MoE auxiliary loss (balancing + z), added to the objective: computed on logging steps only
  // (Trainer::logs_step; the router statistics are not part of a step), 0 on the others.
  double aux_loss = 0;
  double lr = 0;
  double grad_norm = 0;  // before clipping
  double seconds = 0;    // wall time of the step
  double comm_seconds = 0;  // of which exchanging data with the other ranks (0 for one process)
};

class Trainer {
 public:
  // Builds the model and optimizer from config and initialises the weights from train.seed. With a communicator of
  // several ranks (world_communicator() under mpirun), each rank is a data-parallel replica: every rank calls every
  // method below in the same order.
  Trainer(const Config& config, Backend& backend, Communicator* comm = nullptr);

  // Fills one micro-batch: tokens and targets, each (batch_size, seq_len).
  using BatchSource = std::function<void(std::vector<int32_t>& tokens, std::vector<int32_t>& targets)>;
  // One optimizer step over train.grad_accum micro-batches from `next_batch` on each rank. Every loss is scaled by
  // 1 / (grad_accum x ranks) and the gradients are summed over the ranks in rank order (Communicator::allreduce_sum),
  // so the step is the mean over the global batch and bitwise reproducible for a given world size. Throws
  // moelab::Error on a non-finite loss.
  StepStats step(const BatchSource& next_batch);
  // Whether step number `step` (1-based) is a logging step: every train.log_every-th and the last. Its StepStats
  // carry the auxiliary loss.
  bool logs_step(int64_t step) const;
  // What step() does before the optimizer update: every micro-batch's forward and backward, gradients summed over
  // the ranks (StepStats without grad_norm, lr or seconds).
  StepStats compute_gradients(const BatchSource& next_batch);
  // The source step(data) uses: this rank's micro-batches of each global batch of random windows (below).
  BatchSource batches(const TokenFile& data);
  // The gradient block as the whole model's (full_layout), expert shards gathered over the group (every rank of the
  // group calls it).
  std::vector<float> full_gradients() const;
  // One optimizer step on random windows of `data`. The global batch's windows are drawn in one sequence from the
  // sampler (seeded by train.seed, advancing every step): rank r takes micro-batches r * grad_accum ...
  // (r + 1) * grad_accum - 1 of it, so N ranks see exactly the windows of one process with N x grad_accum.
  StepStats step(const TokenFile& data);
  // Mean loss over up to max_batches batches of windows spread over the file (all when max_batches <= 0); the
  // batches are shared out over the ranks and the sums added, so every rank returns the same value.
  double evaluate(const TokenFile& data, int64_t max_batches);
  Communicator& comm() { return *comm_; }

  // Writes a checkpoint of weights, optimizer moments, step and sampler position to `dir`; load() restores
  // all of it, so training continues bit-identically.
  void save(const std::string& dir) const;
  void load(const std::string& dir);
  // Loads only the weights of a checkpoint; optimizer moments, step count and sampler stay fresh (fine-tuning).
  void load_weights(const std::string& dir);
  // Starts from another run's weights, upcycling a dense FFN into experts where the model is MoE
  // (train/init_from.h); optimizer, step count and sampler stay fresh.
  InitFromReport init_from(const std::string& source);

  Transformer& model() { return *model_; }
  const Transformer& model() const { return *model_; }
  AdamW& optimizer() { return *optimizer_; }
  int64_t steps_done() const { return steps_done_; }
  Rng& data_rng() { return data_rng_; }

 private:
  Config config_;
  Backend& backend_;
  std::unique_ptr<Communicator> own_comm_;  // a single process when none was given
  Communicator* comm_;
  // Expert parallelism (dist.expert_parallel > 1): the group sharing out the experts, and the ranks holding the same
  // shard as this one; runs of (offset, count) of the replicated and the expert-shard entries.
  std::unique_ptr<Communicator> ep_group_, replica_group_;
  std::vector<std::pair<int64_t, int64_t>> dense_runs_, expert_runs_;
  std::unique_ptr<Transformer> model_;
  std::unique_ptr<AdamW> optimizer_;
  Rng data_rng_;
  int64_t steps_done_ = 0;
  std::vector<int32_t> tokens_, targets_;
  Timer step_timer_;
  // The gradient sum over the ranks in buckets of at most dist.bucket_mb, each one collective of one group on
  // backend buffers (Communicator::allreduce_sum), in reverse layout order: the last layers' gradients, which the
  // backward finishes first, come first, so that a communicator able to overlap may start them during the backward.
  struct GradientBucket {
    Communicator* group;
    std::vector<Communicator::Segment> segments;
  };
  std::vector<GradientBucket> buckets_;
  void plan_gradient_buckets();
  void allreduce_gradients();
  double grad_sum_squares();
  std::vector<float> gather_full(const float* block) const;
  CheckpointState load_into(const std::string& dir, bool optimizer_state);
};

struct TrainSummary {
  int64_t steps = 0;
  double final_loss = 0;
  double val_loss = -1;  // -1 when no validation data
  double tokens_per_second = 0;
  double seconds = 0;
  std::vector<double> losses;  // per step
};

// Runs a whole training job as configured: writes <out_dir>/config.toml and <out_dir>/metrics.jsonl, prints
// a progress line every train.log_every steps to `log`, checkpoints to <out_dir>/checkpoint every
// train.checkpoint_every steps and at the end. With `resume`, continues from that checkpoint (metrics after
// it are discarded, so the resumed curve is the uninterrupted one); without it, an existing checkpoint is an
// error rather than something silently overwritten.
TrainSummary run_training(const Config& config, std::ostream& log, bool resume = false);

}  // namespace moelab
