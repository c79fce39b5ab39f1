#pragma once
// The report's analysis as typed sections (docs/report.md, "summary.json"): analyse_study fills one struct per
// section, the findings and the page read these structs, and summary_to_json is the one place where they become
// summary.json. Fit documents come from the scaling module (the fit.json format of docs/fitting.md): each section
// keeps that document as it is, to be written unchanged, and the numbers the report reads from it as typed fields,
// taken out in one place (read_*_fit below).
#include <array>
#include <cmath>
#include <cstdint>
#include <limits>
#include <map>
#include <optional>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

namespace moelab {

struct Range {
  double lo = std::numeric_limits<double>::quiet_NaN(), hi = std::numeric_limits<double>::quiet_NaN();
};

// A run as the report names it: its shape, sizes and loss (for a group of replicates: the mean loss).
struct RunBrief {
  std::string name;
  double loss = 0;
  int64_t d_model = 0, n_layers = 0, experts = 0, top_k = 0, granularity = 1;
  double sparsity = 0;
  int64_t nonembedding_params = 0, active_params = 0, tokens = 0;
  double flops = 0, budget = 0;
};

struct SweepCount {
  std::string label, name, kind, dir;
  int64_t runs_planned = 0, runs_ok = 0, runs_failed = 0, downstream_rows = 0;
};

// ---- fit documents ----------------------------------------------------------------------------------------------

// A degree-2 IsoFLOP surface in (log N, -log(1 - S)), as fit.json writes it.
struct Surface {
  double x_center = 0, x_scale = 1, y_center = 0, y_scale = 1;
  std::vector<std::array<int, 2>> monomials;
  std::vector<double> coefficients;
  double at(double log_n, double y) const;
};

struct IsoflopBudget {
  double C = 0, N_star = 0, S_star = 0, L_star = 0;
  Range box_N;                                     // the measured N range of the budget
  std::optional<Range> N_star_interval, S_star_interval;  // 2.5 and 97.5 percentiles of the bootstrap
  Surface surface;
  nlohmann::ordered_json intervals;  // the document's intervals object (null: none), carried to the recommendation
};

struct IsoflopFit {
  std::string skipped;                // why there is no fit ("" when fitted)
  nlohmann::ordered_json document;    // as summary.json writes it
  std::vector<IsoflopBudget> budgets;
  std::optional<std::array<double, 2>> N_star_frontier;  // N* = exp(log_intercept) C^exponent: {exponent, log_intercept}
};

// A parametric law's fit (the sparsity law, the granularity law).
struct LawFit {
  std::string skipped;
  nlohmann::ordered_json document;
  std::vector<double> theta;  // the fitted parameters in the law's order
  std::vector<std::pair<std::string, double>> coefficients;  // named coefficients, in the document's order
  size_t n_points = 0;
  double rmse = std::numeric_limits<double>::quiet_NaN();
  std::string degenerate;  // the granularity law: why no optimum is read off it ("" when none)
  bool fitted() const { return skipped.empty() && !document.is_null() && document.contains("parameters"); }
};

struct LawRanking {
  std::string law;
  double heldout_rmse = 0, rmse = 0;
  std::optional<Range> heldout_interval;
  int64_t parameters = 0;
};

struct LawComparison {
  std::string skipped;
  nlohmann::ordered_json document;
  std::string holdout;
  std::vector<LawRanking> ranking;
  std::vector<std::pair<std::string, std::string>> not_fitted;  // law, reason
};

// The sparsity law's compute-optimal point at a budget (optimize_report).
struct LawOptimum {
  std::string skipped;
  nlohmann::ordered_json document;
  bool has_optimum = false;
  double N = 0, D = 0, S = 0, loss = 0;
  std::optional<Range> N_interval, D_interval, S_interval, loss_interval;
  std::string constraint;
};

IsoflopFit read_isoflop_fit(nlohmann::ordered_json document);
LawFit read_law_fit(nlohmann::ordered_json document);
LawComparison read_law_comparison(nlohmann::ordered_json document);
LawOptimum read_law_optimum(nlohmann::ordered_json document);

// ---- the analysis sections ----------------------------------------------------------------------------------------

struct BudgetBest {
  double C = 0;
  RunBrief best;
  std::optional<RunBrief> best_dense, best_moe;
};

struct MultiplierRow {
  double C = 0;
  std::string best_moe;
  double moe_loss = 0;
  std::optional<double> dense_loss;
  double dense_compute_for_moe_loss = 0, multiplier = 0;
  bool extrapolated = false;
};

struct ComputeMultiplier {
  std::optional<std::array<double, 2>> dense_frontier;  // log L = a + b log C: {a, b}
  std::string skipped;
  std::optional<std::vector<MultiplierRow>> per_budget;
};

struct GranularityRun {
  RunBrief run;
  std::string sweep;
};

struct GranularityPoint {
  int64_t G = 0;
  double loss = 0;
  std::string name;
};

struct LawAtG {
  double G = 0, N = 0, D = 0, loss = 0;
};

struct GranularityOptimum {
  bool by_budget = true;  // keyed by a FLOP budget (C), else by a token count
  double key = 0;
  int64_t G_star = 0;
  RunBrief best;
  double largest_G_measured = 0;
  bool on_edge = false;
  std::optional<RunBrief> dense;
  std::vector<GranularityPoint> curve_at_best_shape;
  // The law's best G at the best run's shape: absent, skipped (with the reason), or its G*, loss and curve.
  bool has_law = false;
  std::string law_skipped;
  double law_G_star = 0, law_loss = 0;
  std::vector<LawAtG> law_by_G;
};

struct FixedParamsPoint {
  RunBrief run;  // its loss: the mean over seeds
  size_t seeds = 0;
};

struct FixedParamsCurve {
  std::string sweep;
  double params = 0;
  bool by_budget = true;
  double key = 0;  // C or tokens
  std::vector<FixedParamsPoint> points;
  double S_star = 0, L_star = 0;
  bool on_edge = false;
};

struct DownstreamRow {
  std::string sweep, run, task, mode;
  int64_t shots = 0;
  double acc = 0, acc_stderr = 0, acc_norm = 0, acc_norm_stderr = 0;
  int64_t n = 0;
  double loss = 0;  // NaN: unknown
  bool moe = false;
};

struct PairTask {
  std::string task, mode;
  int64_t shots = 0, n = 0;
  double acc = 0, acc_stderr = 0;
  std::optional<nlohmann::json> before;  // fine-tuned: the fine-tuning record's scores before (acc, ..., correct)
  double before_acc() const { return before ? (*before)["acc"].get<double>() : std::nan(""); }
};

struct PairSide {
  std::string name;
  double val_loss = 0;  // NaN: unknown
  std::map<std::string, double> ood_losses;
  int64_t params = 0, active_params = 0;
  std::optional<std::vector<PairTask>> downstream;
};

struct DenseMoePair {
  std::string skipped;
  double C = 0;
  PairSide dense, moe;
};

struct Recommendation {
  bool present = false;  // false: no budget
  double budget = 0;
  RunBrief best_measured;
  std::optional<IsoflopBudget> isoflop;
  std::optional<LawOptimum> sparsity_law;
};

// ---- the findings ---------------------------------------------------------------------------------------------

struct Claim {
  std::string id, claim, source, measured, spread, verdict, why;
  double estimate = 0, lo = 0, hi = 0, detectable_effect = 0;  // NaN: none
  std::string unit;
  // How many runs each arm had and the claim's per-budget (or per-set) evidence: records whose fields differ from
  // claim to claim (docs/report.md lists them), written to summary.json as they are.
  nlohmann::ordered_json n_per_arm = nlohmann::ordered_json::object();
  nlohmann::ordered_json details = nlohmann::ordered_json::array();
};

struct PairingRow {
  double C = 0;
  std::string comparison;
  size_t replicates = 0;
  double se_paired = 0, se_unpaired = 0, variance_ratio = 0, correlation = 0;  // NaN: none
};

struct Findings {
  std::vector<Claim> claims;
  std::vector<std::string> edge_warnings;
  double seed_sd = 0;  // NaN: no replicates
  std::vector<PairingRow> pairing;
};

struct FigureEntry {
  std::string id, title, caption, svg;  // svg: the file's path relative to the report
};

struct StudySummary {
  std::string study, loss_column;
  std::vector<SweepCount> sweeps;
  std::vector<double> budgets;
  IsoflopFit isoflop_fit;
  LawFit sparsity_fit;
  LawComparison law_comparison;
  std::vector<BudgetBest> per_budget;
  ComputeMultiplier compute_multiplier;
  std::vector<GranularityRun> granularity;
  LawFit granularity_fit;
  std::vector<GranularityOptimum> granularity_optimum;
  std::vector<FixedParamsCurve> fixed_params;
  std::vector<DownstreamRow> downstream;
  DenseMoePair dense_vs_moe_pair;
  Recommendation recommendation;
  std::string headline;
  Findings findings;
  std::vector<FigureEntry> figures;
  std::vector<std::string> figures_skipped;
};

// summary.json: every section, in this order, as docs/report.md describes it.
nlohmann::ordered_json summary_to_json(const StudySummary& s);
// Its "findings" section alone.
nlohmann::ordered_json findings_to_json(const Findings& f);

}  // namespace moelab
