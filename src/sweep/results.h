#pragma once
// Results of sweep runs (docs/sweeps.md):
//  - DIR/runs/<name>/result.json, written atomically by whoever ran the run: the source of truth;
//  - DIR/results.db (SQLite, table `results`, one row per run, upserted by name inside a transaction): an index
//    of them, written only by `sweep run` (without --index) and rebuilt from the files by `sweep collect`.
#include <cstdint>
#include <map>
#include <nlohmann/json.hpp>
#include <optional>
#include <string>
#include <vector>

#include "sweep/plan.h"

namespace moelab {

struct RunResult {
  std::string name;
  std::string status;  // "ok" or "failed"
  std::string error;   // failed: the reason and the last lines of the run's train.log
  std::string group;
  int exit_code = 0;
  // Losses (nats per token); NaN when not measured (e.g. no validation shard, or the run failed).
  double loss = 0;           // training loss of the last step
  double smoothed_loss = 0;  // mean training loss over the last 10% of steps (at least one step)
  double val_loss = 0;       // validation loss at the end of training
  std::map<std::string, double> ood_losses;  // out-of-domain set name -> loss at the end of training
  int64_t params = 0, active_params = 0, nonembedding_params = 0;
  int64_t steps = 0, steps_done = 0;
  int64_t tokens = 0;  // trained tokens
  double flops = 0;    // training FLOPs under the plan's convention
  double flops_per_token = 0;
  double budget = 0;
  double sparsity = 0;
  int64_t granularity = 1, experts = 0, top_k = 0, d_model = 0, n_layers = 0;
  int64_t seed = 0;          // train.seed of the run (replicates of one configuration differ only here)
  int64_t data_seed = 0;     // the seed of its training windows' order (train.data_seed, or train.seed)
  double wall_seconds = 0;   // wall time of the attempt that finished the run (child process start to exit)
  double train_seconds = 0;  // sum of the logged step times over all attempts (resumes included)
};

// Fills the plan's numbers and reads <run_dir>/metrics.jsonl for losses. status "ok" only when every planned
// step was logged and the final loss is finite; otherwise "failed" with the reason in `error`.
RunResult result_from_run(const PlannedRun& run, const std::string& run_dir, int exit_code, double wall_seconds,
                          const std::string& log_tail);

nlohmann::ordered_json result_to_json(const RunResult& r);
RunResult result_from_json(const nlohmann::json& j);
void write_result(const std::string& run_dir, const RunResult& r);
// nullopt when there is no result.json (or it cannot be parsed: a half-written one cannot exist).
std::optional<RunResult> read_result(const std::string& run_dir);

// Upserts rows into DIR/results.db (creating the table), all in one transaction.
void upsert_results(const std::string& db_path, const std::vector<RunResult>& results);
// Rebuilds DIR/results.db from every result.json of the plan (a fresh file renamed into place), with the
// `downstream` table from every run's downstream.json. Returns the number of rows of `results`.
int64_t collect_results(const std::string& sweep_dir);
// Every result.json of the plan, in plan order.
std::vector<RunResult> read_results(const std::string& sweep_dir);

// The replicates of a run: the run's name without its "-s<seed>" suffix (of its own train.seed: how `[sweep] seeds`
// and `sweep replicate` name replicates), else the name itself. Runs of one sweep with one base name are replicates.
std::string replicate_base_name(const RunResult& r);

// The best dense and the best MoE configuration of each budget among the finished runs, by the mean loss over
// its replicates (never the luckiest seed), represented by its first replicate (lowest seed), ; by `loss` ("val",
// "smoothed" or "final"). Runs with a FLOP budget are grouped by it; the others by token count (key: -tokens). Ordered by key,
// dense before MoE.
struct BestRun {
  double budget_key = 0;  // the budget, or -tokens for runs without one
  bool moe = false;
  const RunResult* run = nullptr;
};
std::vector<BestRun> best_runs_per_budget(const std::vector<RunResult>& results, const std::string& loss);
double result_loss(const RunResult& r, const std::string& loss);  // "val", "smoothed" or "final"
// Each best run followed by the other finished replicates of its configuration (same replicate_base_name), by seed.
std::vector<BestRun> with_replicates(const std::vector<BestRun>& best, const std::vector<RunResult>& results);

// CSV with a header row. Columns: name, status, params, active_params, nonembedding_params, tokens, flops, loss,
// final_loss, smoothed_loss, val_loss, sparsity, granularity, experts, top_k, d_model, n_layers, steps, budget,
// wall_seconds, then one ood_<set>_loss column per out-of-domain set. `loss` is the column the fitting tool
// reads: `loss_source` picks it ("smoothed" (default), "final" or "val"). Failed runs only with include_failed.
std::string results_csv(const std::vector<RunResult>& results, const std::string& loss_source, bool include_failed);

// Downstream accuracy of one run on one task (docs/tasks.md). Kept per run in <run_dir>/downstream.json (the
// source of truth, merged by key) and in the results store's `downstream` table, keyed by
// (run, task, shots, mode), so accuracy can be plotted against the run's validation loss.
struct DownstreamRecord {
  std::string run;             // run id: the run directory's name (= results.name for a sweep run)
  std::string task;            // task name (file stem)
  int64_t shots = 0;           // examples primed per item (requested; see mean_shots)
  std::string mode = "zero";   // "zero" (shots = 0), "few" (shots > 0) or "finetune" (fine-tuned, then zero-shot)
  int64_t n = 0;               // items scored
  double acc = 0, acc_stderr = 0;            // accuracy by total log-likelihood; binomial sqrt(p(1-p)/n)
  double acc_norm = 0, acc_norm_stderr = 0;  // accuracy by log-likelihood per character of the choice
  double chance = 0;           // mean of 1/choices: the accuracy of guessing
  double mean_shots = 0;       // examples that fitted in the context, averaged over items
  double val_loss = 0;         // the evaluated run's last validation loss (NaN when unknown)
  int64_t params = 0, active_params = 0;
  std::string split = "test";
  uint64_t seed = 1;
  int64_t limit = 0;           // the --limit in force (0: none)
  std::string checkpoint;      // the checkpoint scored (for finetune: the fine-tuned one)
  std::string task_file;
  double seconds = 0;          // wall time of the evaluation (fine-tuning included for mode finetune)
  nlohmann::json finetune;     // mode finetune: steps, lr, batch, train items, first/last training loss, and
                               // "before": the same items scored before fine-tuning (acc, ..., correct)
  // Per scored item, in the split's order: '1' when the gold choice had the highest total log-likelihood (acc),
  // else '0'. Paired comparisons over items (e.g. the gain of fine-tuning) need it; "" in records made before it.
  std::string correct;
};

nlohmann::ordered_json downstream_to_json(const DownstreamRecord& r);
DownstreamRecord downstream_from_json(const nlohmann::json& j);
// Merges records into <run_dir>/downstream.json (replacing those with the same task, shots and mode), atomically.
void write_run_downstream(const std::string& run_dir, const std::vector<DownstreamRecord>& records);
// The records of <run_dir>/downstream.json (empty when there is none).
std::vector<DownstreamRecord> read_run_downstream(const std::string& run_dir);
// Upserts into the `downstream` table of a results store (creating the file and table), in one transaction.
void upsert_downstream(const std::string& db_path, const std::vector<DownstreamRecord>& records);
// Every row of the `downstream` table, ordered by run, task, mode, shots (empty when the table does not exist).
std::vector<DownstreamRecord> read_downstream(const std::string& db_path);

// The last `lines` lines of a text file ("" when it does not exist).
std::string tail_lines(const std::string& path, int lines);

}  // namespace moelab
