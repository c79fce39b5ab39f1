#pragma once
// Fitting scaling laws the way the papers do (docs/fitting.md): Huber loss on log-loss residuals, L-BFGS with
// analytic gradients from a grid of starts, the best kept; percentile bootstrap over runs; and the IsoFLOP
// polynomial surfaces of Abnar et al. (Chinchilla approach 2) per budget.
#include <array>
#include <cmath>
#include <cstdint>
#include <map>
#include <nlohmann/json.hpp>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "scaling/dataset.h"
#include "scaling/laws.h"

namespace moelab {

// Huber_delta(r) = r^2/2 for |r| <= delta, delta (|r| - delta/2) beyond; `derivative` (if non-null) gets dH/dr.
double huber(double r, double delta, double* derivative = nullptr);

// sum_i Huber_delta(log L_law(x_i; theta) - log L_i) and, with `grad` non-null, its gradient in theta.
double huber_objective(LawKind law, const std::vector<Observation>& points, const std::vector<double>& theta,
                       double delta, std::vector<double>* grad = nullptr);

// sqrt(mean (log L_law - log L)^2) over `points`; NaN for no points.
double rmse_log(LawKind law, const std::vector<double>& theta, const std::vector<Observation>& points);

struct LocalOptimum {
  std::vector<double> theta;
  double objective = 0;
};

// One L-BFGS run (nlopt::LD_LBFGS) from `start`; returns the best point it evaluated.
LocalOptimum minimize_lbfgs(LawKind law, const std::vector<Observation>& points, double delta,
                            const std::vector<double>& start, int max_evaluations = 2000);

struct ParametricFit {
  std::vector<double> theta;           // the best optimum
  double objective = 0;
  std::vector<LocalOptimum> optima;    // distinct local optima, best first (at most 8); optima[0] is the best
  size_t starts = 0;
};

// Grid search: a short L-BFGS run from every start (OpenMP over starts), then the best few polished to full
// convergence. Deterministic: ties go to the earlier start. Throws Error when there are fewer points than
// parameters. `starts` empty means default_start_grid(law).
ParametricFit fit_parametric(LawKind law, const std::vector<Observation>& points, double delta,
                             std::vector<std::vector<double>> starts = {});

// `samples` bootstrap refits: points resampled with replacement (stream b seeded from (seed, b), so the result
// does not depend on the thread count), each refitted from the full-data optima of `full`. Returns theta per
// sample, in sample order.
std::vector<std::vector<double>> bootstrap_parametric(LawKind law, const std::vector<Observation>& points,
                                                      double delta, const ParametricFit& full, int samples,
                                                      uint64_t seed);

// The p-th percentile (0..100) of `values`, linear interpolation between order statistics (numpy's default).
double percentile(std::vector<double> values, double p);
// {"p2.5", "p10", "p50", "p90", "p97.5"} of `values`.
nlohmann::ordered_json percentile_json(const std::vector<double>& values);

// ---- IsoFLOP surfaces ----------------------------------------------------------------------------------------

// A polynomial of total degree <= `degree` in x = log N and y = -log(1 - S), fitted by least squares to L.
// Internally x and y are centred and scaled to [-1, 1] over the data for conditioning.
struct IsoflopSurface {
  int degree = 2;
  double x_center = 0, x_scale = 1, y_center = 0, y_scale = 1;
  std::vector<std::pair<int, int>> monomials;  // (power of x, power of y), in the order of coefficients
  std::vector<double> coefficients;            // in the scaled variables
  double eval(double x, double y) const;       // x = log N, y = -log(1 - S)
};

struct IsoflopBudgetFit {
  double C = 0;
  size_t n_points = 0;
  IsoflopSurface surface;
  double rmse = 0;                            // of log L
  double x_lo = 0, x_hi = 0, y_lo = 0, y_hi = 0;  // the box spanned by the budget's data
  double N_star = 0, S_star = 0, L_star = 0;  // the surface's minimum over the box
  // N*(C, S) for each sparsity in the data: (S, N*, L*).
  std::vector<std::array<double, 3>> per_sparsity;
};

// Groups `points` by C (relative tolerance 1e-6) and fits one surface per budget; throws Error when a budget has
// fewer points than monomials.
std::vector<IsoflopBudgetFit> fit_isoflop(const std::vector<Observation>& points, int degree);
IsoflopBudgetFit fit_isoflop_budget(const std::vector<Observation>& points, int degree);
// Per budget, per sample: (N*, S*, L*) of refits on resampled points of that budget.
std::vector<std::vector<std::array<double, 3>>> bootstrap_isoflop(const std::vector<Observation>& points,
                                                                  const std::vector<IsoflopBudgetFit>& fits,
                                                                  int degree, int samples, uint64_t seed);

// ---- the whole `moelab fit` ------------------------------------------------------------------------------------

struct FitRequest {
  LawKind law = LawKind::Chinchilla;
  std::string data_path;
  ColumnMap columns = default_columns();
  std::string holdout;               // "" or "COLUMN OP NUMBER"
  int bootstrap = 0;
  uint64_t seed = 0;
  std::optional<double> delta;       // Huber delta; default per law
  int degree = 2;                    // isoflop polynomial degree
  std::string param_count = "nonembedding_total";  // what the N column counts (used by predict)
  std::optional<double> expansion;   // granularity law: the expansion rate E of the runs (for optimize)
  std::string command_line;          // recorded in fit.json's provenance
};

// Reads the data, fits, bootstraps, and returns the fit.json document (docs/fitting.md lists its keys).
nlohmann::ordered_json run_fit(const FitRequest& request);
// `moelab fit --law compare`: every parametric law the data's columns allow, fitted on all rows but the held-out
// ones (request.holdout, else the largest budget C), ranked by the RMSE of log L on the held-out rows, with
// bootstrap intervals on that error (request.bootstrap refits on resampled training rows); in-sample RMSE and the
// parameter count beside it. Laws the columns do not allow are listed with the reason. request.law is ignored.
nlohmann::ordered_json compare_laws(const FitRequest& request);
// The same on a table already in memory (no provenance: there is no input file).
nlohmann::ordered_json compare_laws_on(const FitRequest& request, const ResultTable& table);
// The pooled standard deviation of log L over groups of rows that differ only in their seed (rows whose law
// columns other than L are all equal): sqrt(sum_g (n_g - 1) s_g^2 / sum_g (n_g - 1)). NaN when no group has two rows.
struct ReplicateNoise {
  double pooled_sd = std::nan("");
  size_t groups = 0, rows = 0;  // groups with two or more replicates, and their rows
};
ReplicateNoise replicate_noise(const std::vector<Observation>& points);
// The pooled standard deviation of values in groups (groups of one contribute nothing): the arithmetic of
// replicate_noise, for callers that group replicates themselves.
ReplicateNoise pooled_spread(const std::vector<std::vector<double>>& groups);
// The same on points already in memory: `train` is fitted, `heldout` only scored (RMSE of log L).
nlohmann::ordered_json fit_observations(const FitRequest& request, const std::vector<Observation>& train,
                                        const std::vector<Observation>& heldout);

}  // namespace moelab
