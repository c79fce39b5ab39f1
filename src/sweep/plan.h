#pragma once
// Sweep planning (docs/sweeps.md): a sweep spec (TOML) expands into many fully resolved training runs.
//
// Every kind reduces to the same arithmetic, done in one place (finish_run in plan.cpp):
//   model config (base + shape + MoE choice) -> FLOPs per token under the spec's convention ->
//   D = budget / FLOPs-per-token (or D given) -> steps = ceil(D / tokens-per-step) -> trained tokens = steps *
//   tokens-per-step (D rounded up by less than one step) -> lr / warm-up from the rules.
// A run that cannot be realised as asked (D below one step, more tokens than the corpus holds, a sparsity
// that no integer number of experts gives, G not dividing d_ff, ...) is kept in the plan, marked infeasible with
// the reason, and never silently changed into something else.
#include <cstdint>
#include <nlohmann/json.hpp>
#include <optional>
#include <string>
#include <vector>

#include "config/config.h"
#include "model/count.h"

namespace moelab {

struct PlannedRun {
  std::string name;
  std::string group;       // "isoflop", "fixed_params", "granularity", "list", "dense"
  bool feasible = true;
  std::string reason;      // why not, when infeasible
  Config config;           // fully resolved (meaningful for feasible runs)
  double budget = 0;       // requested training FLOPs (0 when the run asked for tokens or steps)
  double target_tokens = 0;  // requested D
  double target_params = 0;  // fixed_params: requested total parameters (0 otherwise)
  double target_sparsity = 0;
  int64_t steps = 0;
  int64_t tokens = 0;      // trained tokens = steps * batch * grad_accum * seq_len * processes
  int64_t processes = 1;   // processes that train it (MPI ranks: data parallel, dist.expert_parallel of them
                           // sharing out the experts)
  double flops_per_token = 0;  // under the plan's convention
  double flops = 0;            // flops_per_token * tokens
  ParameterCounts counts;
};

struct SweepPlan {
  std::string name;
  std::string kind;
  std::string spec_path;
  std::string flops_convention = "exact";
  std::string train_path;      // the training shard whose size bounds D
  int64_t corpus_tokens = 0;   // tokens in it
  double max_epochs = 1.0;
  std::vector<PlannedRun> runs;

  // Feasible runs in plan order: the run with array index i is feasible_runs()[i].
  std::vector<const PlannedRun*> feasible_runs() const;
};

// Parses a spec and expands it. `spec_dir` resolves nothing: relative paths in the spec (base.config,
// data.dir) are relative to the current directory, like every other moelab command. Throws Error for a
// malformed spec (unknown key, wrong type, missing list); per-run problems become infeasible runs instead.
SweepPlan plan_sweep_from_string(const std::string& spec_text, const std::string& source_name);
SweepPlan plan_sweep(const std::string& spec_path);

// Writes DIR/plan.json, DIR/spec.toml and DIR/runs/<name>/config.toml for each feasible run, with out_dir set
// to the absolute DIR/runs/<name>. A directory that already holds a different plan is an error (a sweep's
// results must match its plan); the same plan again is a no-op.
void write_plan(SweepPlan& plan, const std::string& dir, const std::string& spec_text);
// Reads DIR/plan.json back: names, targets, steps, tokens, FLOPs and parameter counts (config holds only the
// shape fields; each run's full config is DIR/runs/<name>/config.toml).
SweepPlan read_plan(const std::string& dir);

nlohmann::ordered_json plan_to_json(const SweepPlan& plan);
// Adds `runs` (feasible, with full configs) to the end of DIR/plan.json, array indices continuing the plan's, and
// writes each run's config.toml (train.out_dir set to DIR/runs/<name>). A name the plan has is an error.
void append_runs(const std::string& dir, std::vector<PlannedRun> runs);
// The table `sweep plan` prints: name, d_model, layers, experts, top-k, G, S, total and active params, D, FLOPs.
std::string plan_table(const SweepPlan& plan);

// 1e12 -> "1e12", 3.5e9 -> "3.5e9": compact numbers for run names.
std::string compact_number(double value);

}  // namespace moelab
