#pragma once
// A study, as the report reads it: one or more sweeps (directories with plan.json, results in result.json files
// and results.db) and single training runs (directories with metrics.jsonl), found under one directory; and
// the analyses the report draws and the headline it prints, all computed from those files (docs/report.md).
#include <algorithm>
#include <array>
#include <cmath>
#include <optional>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "report/summary.h"
#include "sweep/plan.h"
#include "sweep/results.h"

namespace moelab {

// One run's metrics.jsonl, reduced to what the figures need.
struct RunCurves {
  std::vector<std::array<double, 2>> train;  // (tokens seen, training loss) per logged step
  std::vector<std::array<double, 2>> val;    // (tokens seen, validation loss) per evaluation
  // Router load at the last step that logged it: per MoE layer, the share of the router's choices each expert got
  // (load_fraction; tokens_per_expert in runs logged before it), and the overload factor max / mean (0: not logged).
  std::vector<std::vector<double>> router_load;
  std::vector<double> router_overload;
};
// Reads <run_dir>/metrics.jsonl; a missing file gives empty curves, a line cut short by a kill is skipped.
RunCurves read_run_curves(const std::string& run_dir);

struct StudySweep {
  std::string dir;   // as found (absolute)
  std::string label; // the directory's name
  SweepPlan plan;
  std::vector<RunResult> results;  // every run with a result.json, in plan order
  std::vector<DownstreamRecord> downstream;  // the `downstream` table of its results.db (docs/tasks.md)
  std::string run_dir(const std::string& run_name) const;
};

struct Study {
  std::string dir;
  std::vector<StudySweep> sweeps;
  std::vector<std::string> single_runs;  // directories holding a metrics.jsonl outside any sweep
};

// The run's loss under a results column name: "val_loss", "smoothed_loss" or "loss"; throws Error for another.
double loss_of(const RunResult& r, const std::string& column);
// Planned budgets are exact numbers from the plan; compared with a relative tolerance of 1e-6 anyway.
inline bool same_budget(double a, double b) {
  return std::fabs(a - b) <= 1e-6 * std::max(std::fabs(a), std::fabs(b));
}

// The study with each group of replicates (runs of one sweep with one base name) replaced by one run: the first
// replicate's row (lowest seed) with every loss the mean over the group's finished runs, so that analyses that pick
// a best configuration compare replicate means, never the luckiest seed. Failed runs stay as they are.
Study replicate_means(const Study& study);

// DIR is a sweep, a single run, or a directory whose immediate subdirectories are sweeps or runs. Throws Error
// when DIR does not exist or holds none of these (naming what was looked for).
Study load_study(const std::string& dir);

struct AnalysisOptions {
  std::string loss = "val_loss";  // the results column used as L: val_loss, smoothed_loss or loss
  int bootstrap = 100;            // resamples for fit intervals
  uint64_t seed = 0;
};

// Every number the report shows, with where it came from, one typed section each (report/summary.h): per-sweep run
// counts, the IsoFLOP surfaces (with bootstrap intervals), the sparsity law fit (Abnar et al.), the best measured
// configuration per budget, the dense-equivalent compute multiplier, the granularity comparison, downstream rows,
// the headline (text) and the findings. Parts that the data cannot support carry a "skipped" reason instead of
// numbers. summary_to_json writes it as summary.json.
StudySummary analyse_study(const Study& study, const AnalysisOptions& options);

}  // namespace moelab
