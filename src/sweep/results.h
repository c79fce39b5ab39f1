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
// Rebuilds DIR/results.db from every result.json of the plan (a fresh file renamed into place). Returns the
// number of rows.
int64_t collect_results(const std::string& sweep_dir);
// Every result.json of the plan, in plan order.
std::vector<RunResult> read_results(const std::string& sweep_dir);

// CSV with a header row. Columns: name, status, params, active_params, nonembedding_params, tokens, flops, loss,
// final_loss, smoothed_loss, val_loss, sparsity, granularity, experts, top_k, d_model, n_layers, steps, budget,
// wall_seconds, then one ood_<set>_loss column per out-of-domain set. `loss` is the column the fitting tool
// reads: `loss_source` picks it ("smoothed" (default), "final" or "val"). Failed runs only with include_failed.
std::string results_csv(const std::vector<RunResult>& results, const std::string& loss_source, bool include_failed);

// The last `lines` lines of a text file ("" when it does not exist).
std::string tail_lines(const std::string& path, int lines);

}  // namespace moelab
