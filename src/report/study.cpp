#include "core/format.h"
#include "report/study.h"

#include "report/findings.h"
#include "report/summary.h"

#include <sstream>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <limits>
#include <map>
#include <array>
#include <set>

#include "core/error.h"
#include "scaling/fit.h"
#include "scaling/optimize.h"

namespace moelab {
namespace {

namespace fs = std::filesystem;
using ojson = nlohmann::ordered_json;
constexpr double kNaN = std::numeric_limits<double>::quiet_NaN();

bool usable(const RunResult& r, const std::string& column) {
  return r.status == "ok" && std::isfinite(loss_of(r, column)) && loss_of(r, column) > 0;
}

bool is_moe(const RunResult& r) { return r.experts > 0; }

RunBrief run_brief(const RunResult& r, const std::string& column) {
  RunBrief b;
  b.name = r.name, b.loss = loss_of(r, column), b.d_model = r.d_model, b.n_layers = r.n_layers;
  b.experts = r.experts, b.top_k = r.top_k, b.granularity = r.granularity, b.sparsity = r.sparsity;
  b.nonembedding_params = r.nonembedding_params, b.active_params = r.active_params, b.tokens = r.tokens;
  b.flops = r.flops, b.budget = r.budget;
  return b;
}

std::string describe_run(const RunBrief& b) {
  std::string text = b.name + " (d_model " + std::to_string(b.d_model) + ", " + std::to_string(b.n_layers) +
                     (b.n_layers == 1 ? " layer, " : " layers, ");
  if (b.experts > 0)
    text += std::to_string(b.experts) + " experts top-" + std::to_string(b.top_k) + ", S = " + fmt("%.4g", b.sparsity);
  else
    text += "dense";
  text += ", " + fmt("%.3g", static_cast<double>(b.nonembedding_params)) + " non-embedding params, " +
          fmt("%.3g", static_cast<double>(b.tokens)) + " tokens)";
  return text;
}

}  // namespace

double loss_of(const RunResult& r, const std::string& column) {
  if (column == "val_loss") return r.val_loss;
  if (column == "smoothed_loss") return r.smoothed_loss;
  if (column == "loss") return r.loss;
  throw Error("report: unknown loss column '" + column + "' (use val_loss, smoothed_loss or loss)");
}

std::string StudySweep::run_dir(const std::string& run_name) const {
  return (fs::path(dir) / "runs" / run_name).string();
}

RunCurves read_run_curves(const std::string& run_dir) {
  RunCurves curves;
  std::ifstream in(fs::path(run_dir) / "metrics.jsonl");
  std::map<int64_t, double> tokens_at_step;
  std::vector<std::pair<int64_t, double>> val;
  std::string line;
  while (std::getline(in, line)) {
    nlohmann::json j;
    try {
      j = nlohmann::json::parse(line);
    } catch (const nlohmann::json::exception&) {
      continue;
    }
    if (!j.is_object() || !j.contains("step") || !j["step"].is_number()) continue;
    const int64_t step = j["step"].get<int64_t>();
    if (j.contains("loss") && j["loss"].is_number()) {
      const double tokens = j.value("tokens", 0.0);
      tokens_at_step[step] = tokens;
      curves.train.push_back({tokens, j["loss"].get<double>()});
      if (j.contains("router") && j["router"].is_array() && !j["router"].empty()) {
        curves.router_load.clear();
        curves.router_overload.clear();
        for (const auto& layer : j["router"]) {
          curves.router_load.push_back(layer.contains("load_fraction")
                                           ? layer.value("load_fraction", std::vector<double>{})
                                           : layer.value("tokens_per_expert", std::vector<double>{}));
          curves.router_overload.push_back(layer.value("overload", 0.0));
        }
      }
    } else if (j.contains("val_loss") && j["val_loss"].is_number()) {
      val.emplace_back(step, j["val_loss"].get<double>());
    }
  }
  for (const auto& [step, loss] : val) {
    auto it = tokens_at_step.find(step);
    if (it != tokens_at_step.end()) curves.val.push_back({it->second, loss});
  }
  return curves;
}

Study load_study(const std::string& dir) {
  if (!fs::is_directory(dir))
    throw Error("report: '" + dir + "' is not a directory; give a sweep directory (with plan.json), a run "
                "directory (with metrics.jsonl), or a study directory holding them");
  Study study;
  study.dir = fs::absolute(dir).lexically_normal().string();
  auto add = [&](const fs::path& d) {
    if (fs::exists(d / "plan.json")) {
      StudySweep s;
      s.dir = fs::absolute(d).lexically_normal().string();
      s.label = fs::path(s.dir).filename().string();
      s.plan = read_plan(s.dir);
      s.results = read_results(s.dir);
      if (fs::exists(fs::path(s.dir) / "results.db")) s.downstream = read_downstream((fs::path(s.dir) / "results.db").string());
      study.sweeps.push_back(std::move(s));
      return true;
    }
    if (fs::exists(d / "metrics.jsonl")) {
      study.single_runs.push_back(fs::absolute(d).lexically_normal().string());
      return true;
    }
    return false;
  };
  if (!add(dir)) {
    std::vector<fs::path> subdirs;
    for (const auto& e : fs::directory_iterator(dir))
      if (e.is_directory()) subdirs.push_back(e.path());
    std::sort(subdirs.begin(), subdirs.end());
    for (const auto& d : subdirs) add(d);
  }
  if (study.sweeps.empty() && study.single_runs.empty())
    throw Error("report: '" + dir + "' holds no sweep (plan.json) and no run (metrics.jsonl), neither itself nor "
                "in its subdirectories; plan and run a sweep first (docs/sweeps.md)");
  return study;
}

Study replicate_means(const Study& study) {
  Study out = study;
  for (auto& s : out.sweeps) {
    std::map<std::string, std::vector<const RunResult*>> groups;
    std::vector<std::string> order;
    for (const auto& r : s.results) {
      if (r.status != "ok") continue;
      auto& g = groups[replicate_base_name(r)];
      if (g.empty()) order.push_back(replicate_base_name(r));
      g.push_back(&r);
    }
    std::vector<RunResult> merged;
    for (const auto& r : s.results)
      if (r.status != "ok") merged.push_back(r);
    for (const auto& base : order) {
      auto& g = groups[base];
      std::sort(g.begin(), g.end(), [](const RunResult* a, const RunResult* b) { return a->seed < b->seed; });
      RunResult m = *g.front();
      const double n = static_cast<double>(g.size());
      m.loss = m.smoothed_loss = m.val_loss = 0;
      for (auto& [set, l] : m.ood_losses) l = 0;
      for (const auto* r : g) {
        m.loss += r->loss / n, m.smoothed_loss += r->smoothed_loss / n, m.val_loss += r->val_loss / n;
        for (auto& [set, l] : m.ood_losses) {
          const auto it = r->ood_losses.find(set);
          l += it == r->ood_losses.end() ? NAN : it->second / n;
        }
      }
      merged.push_back(std::move(m));
    }
    s.results = std::move(merged);
  }
  return out;
}

// ---- analyse_study in sections: each reads what it needs and returns its typed part of the summary --------------

namespace {

std::vector<SweepCount> sweeps_section(const Study& all_runs) {
  std::vector<SweepCount> sweeps;
  for (const auto& s : all_runs.sweeps) {
    SweepCount c{s.label, s.plan.name, s.plan.kind, s.dir};
    c.runs_planned = static_cast<int64_t>(s.plan.feasible_runs().size());
    for (const auto& r : s.results) (r.status == "ok" ? c.runs_ok : c.runs_failed)++;
    c.downstream_rows = static_cast<int64_t>(s.downstream.size());
    sweeps.push_back(c);
  }
  return sweeps;
}

// The IsoFLOP data: runs with a FLOP budget (MoE at each sparsity and their dense baselines).
struct IsoflopRuns {
  std::vector<const RunResult*> iso;
  std::string iso_source;
  std::vector<Observation> points;
  std::vector<double> budgets;
};

IsoflopRuns isoflop_runs(const Study& study, const std::string& col) {
  IsoflopRuns d;
  for (const auto& s : study.sweeps) {
    if (s.plan.kind != "isoflop") continue;
    for (const auto& r : s.results)
      if (r.budget > 0 && usable(r, col)) d.iso.push_back(&r);
    d.iso_source += (d.iso_source.empty() ? "" : ", ") + (fs::path(s.dir) / "results.db").string();
  }
  for (const auto* r : d.iso) {
    Observation o;
    o.N = static_cast<double>(r->nonembedding_params);
    o.D = static_cast<double>(r->tokens);
    o.S = r->sparsity;
    o.G = static_cast<double>(r->granularity);
    o.C = r->budget;  // the planned budget: runs of one budget differ by less than a step's FLOPs
    o.L = loss_of(*r, col);
    d.points.push_back(o);
  }
  for (const auto* r : d.iso)
    if (std::none_of(d.budgets.begin(), d.budgets.end(), [&](double b) { return same_budget(b, r->budget); }))
      d.budgets.push_back(r->budget);
  std::sort(d.budgets.begin(), d.budgets.end());
  return d;
}

FitRequest study_fit_request(const IsoflopRuns& d, const AnalysisOptions& options) {
  FitRequest request;
  request.data_path = d.iso_source;
  request.columns = default_columns();
  request.columns["N"] = "nonembedding_params";
  request.columns["C"] = "budget";
  request.columns["L"] = options.loss;
  request.bootstrap = options.bootstrap;
  request.seed = options.seed;
  return request;
}

ojson skipped(const std::string& why) { return {{"skipped", why}}; }

// IsoFLOP surfaces (degree 2 needs 6 points per budget).
IsoflopFit isoflop_fit_section(FitRequest request, const std::vector<Observation>& points) {
  if (points.size() < 6) return read_isoflop_fit(skipped("fewer than 6 IsoFLOP runs"));
  try {
    request.law = LawKind::Isoflop;
    return read_isoflop_fit(fit_observations(request, points, {}));
  } catch (const Error& e) {
    return read_isoflop_fit(skipped(e.what()));
  }
}

// The sparsity law of Abnar et al. (Eq. 6, 10 parameters).
LawFit sparsity_fit_section(FitRequest request, const std::vector<Observation>& points, const std::vector<double>& budgets) {
  std::set<double> sparsities;
  for (const auto& p : points) sparsities.insert(p.S);
  if (points.size() < 12 || sparsities.size() < 3 || budgets.size() < 2)
    return read_law_fit(skipped("the sparsity law needs at least 12 runs over 3 sparsity levels and 2 budgets"));
  try {
    request.law = LawKind::Sparsity;
    return read_law_fit(fit_observations(request, points, {}));
  } catch (const Error& e) {
    return read_law_fit(skipped(e.what()));
  }
}

// Which law extrapolates best: every law the IsoFLOP runs' columns allow, fitted without the largest budget and
// ranked by the error of predicting it (fit --law compare).
LawComparison law_comparison_section(const FitRequest& request, const IsoflopRuns& d, const AnalysisOptions& options) {
  if (d.budgets.size() < 2) return read_law_comparison(skipped("the law comparison needs runs at two or more budgets"));
  std::ostringstream csv;
  csv.precision(17);
  csv << "params,tokens,sparsity,granularity,flops,loss,active_params,experts\n";
  for (const auto* r : d.iso)
    csv << r->nonembedding_params << "," << r->tokens << "," << r->sparsity << "," << r->granularity << ","
        << r->budget << "," << loss_of(*r, options.loss) << "," << r->active_params << "," << r->experts << "\n";
  try {
    FitRequest compare = request;
    compare.columns = default_columns();
    compare.data_path = d.iso_source;
    compare.bootstrap = std::min(options.bootstrap, 20);
    ojson comparison = compare_laws_on(compare, parse_csv(csv.str(), "the IsoFLOP runs"));
    comparison.erase("laws");  // the per-law documents stay out of summary.json; ranking and reasons stay
    return read_law_comparison(std::move(comparison));
  } catch (const Error& e) {
    return read_law_comparison(skipped(e.what()));
  }
}

// Best measured configuration per budget (of replicate means); dense vs MoE frontiers.
struct BudgetBests {
  std::vector<BudgetBest> per_budget;
  std::vector<std::array<double, 2>> dense_frontier;  // (C, best dense L)
  const RunResult *pair_dense = nullptr, *pair_moe = nullptr;  // the largest budget's best dense and MoE run
};

BudgetBests budget_bests(const IsoflopRuns& d, const std::string& col) {
  BudgetBests out;
  for (double C : d.budgets) {
    const RunResult *best = nullptr, *best_dense = nullptr, *best_moe = nullptr;
    for (const auto* r : d.iso) {
      if (!same_budget(r->budget, C)) continue;
      const double L = loss_of(*r, col);
      if (!best || L < loss_of(*best, col)) best = r;
      const RunResult*& slot = is_moe(*r) ? best_moe : best_dense;
      if (!slot || L < loss_of(*slot, col)) slot = r;
    }
    BudgetBest row{C, run_brief(*best, col), std::nullopt, std::nullopt};
    if (best_dense) row.best_dense = run_brief(*best_dense, col);
    if (best_moe) row.best_moe = run_brief(*best_moe, col);
    out.per_budget.push_back(row);
    if (best_dense) out.dense_frontier.push_back({C, loss_of(*best_dense, col)});
    out.pair_dense = best_dense, out.pair_moe = best_moe;
  }
  return out;
}

// Compute multiplier (the fairseq study's "compute efficiency"): the compute a dense model needs to reach
// the best MoE loss of budget C, over C. The dense frontier is a power law fitted through the best dense loss
// of each budget: log L = a + b log C (least squares).
ComputeMultiplier compute_multiplier_section(const BudgetBests& bests) {
  const auto& frontier = bests.dense_frontier;
  ComputeMultiplier m;
  if (frontier.size() < 2) {
    m.skipped = "needs dense baselines at 2 or more budgets";
    return m;
  }
  double sx = 0, sy = 0, sxx = 0, sxy = 0;
  const double n = static_cast<double>(frontier.size());
  for (const auto& p : frontier) {
    const double x = std::log(p[0]), y = std::log(p[1]);
    sx += x, sy += y, sxx += x * x, sxy += x * y;
  }
  const double b = (n * sxy - sx * sy) / (n * sxx - sx * sx);
  const double a = (sy - b * sx) / n;
  m.dense_frontier = std::array<double, 2>{a, b};
  if (!(b < 0)) {
    m.skipped = "the best dense loss does not fall with compute across the budgets (slope " + fmt("%.3g", b) +
                "), so no dense-equivalent compute can be read off";
    return m;
  }
  m.per_budget.emplace();
  const double c_lo = frontier.front()[0], c_hi = frontier.back()[0];
  for (const auto& row : bests.per_budget) {
    if (!row.best_moe) continue;
    MultiplierRow r;
    r.C = row.C, r.best_moe = row.best_moe->name, r.moe_loss = row.best_moe->loss;
    if (row.best_dense) r.dense_loss = row.best_dense->loss;
    r.dense_compute_for_moe_loss = std::exp((std::log(r.moe_loss) - a) / b);
    r.multiplier = r.dense_compute_for_moe_loss / r.C;
    r.extrapolated = r.dense_compute_for_moe_loss < c_lo * (1 - 1e-9) || r.dense_compute_for_moe_loss > c_hi * (1 + 1e-9);
    m.per_budget->push_back(r);
  }
  return m;
}

// Granularity comparison: loss against G at equal tokens and shape.
std::vector<GranularityRun> granularity_section(const Study& study, const std::string& col) {
  std::vector<GranularityRun> granularity;
  for (const auto& s : study.sweeps) {
    if (s.plan.kind != "granularity") continue;
    for (const auto& r : s.results)
      if (usable(r, col)) granularity.push_back({run_brief(r, col), s.label});
  }
  return granularity;
}

// The granularity runs: every usable run of the granularity sweeps, and the MoE ones as observations for the law.
struct GranularityRuns {
  std::vector<Observation> gpts;
  std::set<double> gvalues;
  std::set<std::pair<int64_t, int64_t>> gshapes;
  double expansion = 0;
  std::vector<const RunResult*> gruns;
  std::string gsource;
};

GranularityRuns granularity_runs(const Study& study, const std::string& col) {
  GranularityRuns g;
  for (const auto& s : study.sweeps) {
    if (s.plan.kind != "granularity") continue;
    g.gsource += (g.gsource.empty() ? "" : ", ") + (fs::path(s.dir) / "results.db").string();
    for (const auto& r : s.results) {
      if (!usable(r, col)) continue;
      g.gruns.push_back(&r);
      if (!is_moe(r)) continue;
      Observation o;
      o.N = static_cast<double>(r.nonembedding_params);
      o.D = static_cast<double>(r.tokens);
      o.G = static_cast<double>(r.granularity);
      o.C = r.flops;
      o.L = loss_of(r, col);
      g.gpts.push_back(o);
      g.gvalues.insert(o.G);
      g.gshapes.insert({r.d_model, r.n_layers});
      if (r.granularity > 0) g.expansion = static_cast<double>(r.experts) / static_cast<double>(r.granularity);
    }
  }
  return g;
}

// The granularity law (Krajewski et al.) on the granularity runs.
LawFit granularity_fit_section(const GranularityRuns& g_runs, const FitRequest& request) {
  std::set<double> gN, gD;
  for (const auto& p : g_runs.gpts) gN.insert(p.N), gD.insert(p.D);
  if (g_runs.gpts.size() < 8 || g_runs.gvalues.size() < 2 || gN.size() < 2 || gD.size() < 2)
    return read_law_fit(skipped("the granularity law needs at least 8 MoE runs over 2 or more granularities, model "
                                "sizes and token counts"));
  try {
    FitRequest g = request;
    g.law = LawKind::Granularity;
    g.data_path = g_runs.gsource;
    g.columns["C"] = "flops";
    g.expansion = g_runs.expansion;
    ojson gfit = fit_observations(g, g_runs.gpts, {});
    // A fit with a non-positive exponent has no physical reading (loss rising with N or D): with a handful of
    // shapes the law is not identified. Say so, and read no optimum off it.
    const auto& co = gfit["coefficients"];
    std::string bad;
    for (const char* k : {"alpha", "beta", "gamma"})
      if (co.contains(k) && !(co[k].get<double>() > 0)) bad += (bad.empty() ? "" : ", ") + std::string(k) + " " + fmt("%.3g", co[k].get<double>());
    if (!bad.empty())
      gfit["degenerate"] = "the fitted exponents are not all positive (" + bad + "): " +
                           std::to_string(g_runs.gpts.size()) + " runs over " + std::to_string(g_runs.gshapes.size()) +
                           " shapes do not identify the law, so no optimum is read off it";
    return read_law_fit(std::move(gfit));
  } catch (const Error& e) {
    return read_law_fit(skipped(e.what()));
  }
}

// The law's best G at the measured shape of the best run, its N and D carried to G = 16 and 32 along the measured
// runs' least-squares lines N(G), D(G) (the router's parameters and FLOPs grow with G).
void law_optimum_at_shape(GranularityOptimum& row, const std::vector<std::array<double, 3>>& line, const LawFit& gfit) {
  row.has_law = true;
  std::set<double> line_g;
  for (const auto& p : line) line_g.insert(p[0]);
  if (line_g.size() < 2) {
    row.law_skipped = "the best shape was trained at one G only, so N and D cannot be carried to other G";
    return;
  }
  auto linear = [&](int col_index, double G) {
    double sx = 0, sy = 0, sxx = 0, sxy = 0;
    const double n = static_cast<double>(line.size());
    for (const auto& p : line) sx += p[0], sy += p[col_index], sxx += p[0] * p[0], sxy += p[0] * p[col_index];
    const double b = (n * sxy - sx * sy) / (n * sxx - sx * sx);
    return (sy - b * sx) / n + b * G;
  };
  try {
    const LoadedFit fit = load_fit_json(gfit.document, "granularity fit");
    double law_best = 0, law_loss_best = kNaN;
    std::vector<LawAtG> law;
    for (double G : {1.0, 2.0, 4.0, 8.0, 16.0, 32.0}) {
      Observation o;
      o.N = linear(1, G), o.D = linear(2, G), o.G = G;
      if (!(o.N > 0 && o.D > 0)) continue;
      const double L = law_loss(LawKind::Granularity, fit.theta, o);
      law.push_back({G, o.N, o.D, L});
      if (!(L >= law_loss_best)) law_best = G, law_loss_best = L;
    }
    row.law_G_star = law_best, row.law_loss = law_loss_best, row.law_by_G = std::move(law);
  } catch (const Error& e) {
    row.law_skipped = e.what();
  }
}

// Per budget (or token count): the measured best G over every shape, and the law's best G at its shape.
std::vector<GranularityOptimum> granularity_optimum_section(const GranularityRuns& g_runs, const LawFit& gfit,
                                                            const std::string& col) {
  const auto& gruns = g_runs.gruns;
  std::vector<double> gkeys;
  auto key_of = [&](const RunResult& r) {
    const double k = r.budget > 0 ? r.budget : static_cast<double>(r.tokens);
    for (double x : gkeys)
      if (std::fabs(x - k) <= 1e-6 * k) return x;
    gkeys.push_back(k);
    return k;
  };
  for (const auto* r : gruns) key_of(*r);
  std::sort(gkeys.begin(), gkeys.end());
  std::vector<GranularityOptimum> optimum;
  for (double k : gkeys) {
    const RunResult *best = nullptr, *dense = nullptr;
    double g_max = 0;
    for (const auto* r : gruns) {
      if (key_of(*r) != k) continue;
      if (!is_moe(*r)) {
        if (!dense || loss_of(*r, col) < loss_of(*dense, col)) dense = r;
        continue;
      }
      g_max = std::max(g_max, static_cast<double>(r->granularity));
      if (!best || loss_of(*r, col) < loss_of(*best, col)) best = r;
    }
    if (!best) continue;
    GranularityOptimum row;
    row.by_budget = best->budget > 0, row.key = k, row.G_star = best->granularity, row.best = run_brief(*best, col);
    row.largest_G_measured = g_max, row.on_edge = static_cast<double>(best->granularity) >= g_max;
    if (dense) row.dense = run_brief(*dense, col);
    std::vector<std::array<double, 3>> line;  // G, N, tokens at the best run's shape
    for (const auto* r : gruns)
      if (key_of(*r) == k && is_moe(*r) && r->d_model == best->d_model && r->n_layers == best->n_layers) {
        row.curve_at_best_shape.push_back({r->granularity, loss_of(*r, col), r->name});
        line.push_back({static_cast<double>(r->granularity), static_cast<double>(r->nonembedding_params),
                        static_cast<double>(r->tokens)});
      }
    if (gfit.fitted() && gfit.degenerate.empty() && row.by_budget) law_optimum_at_shape(row, line, gfit);
    optimum.push_back(std::move(row));
  }
  return optimum;
}

// Fixed total parameters: loss against S (Abnar et al.'s U-shape), the mean over seeds at each S.
std::vector<FixedParamsCurve> fixed_params_section(const Study& study, const std::string& col) {
  std::vector<FixedParamsCurve> fixed;
  for (const auto& s : study.sweeps) {
    if (s.plan.kind != "fixed_params") continue;
    std::map<std::string, const PlannedRun*> planned;
    for (const auto& p : s.plan.runs) planned[p.name] = &p;
    std::map<std::pair<double, double>, std::vector<const RunResult*>> groups;  // (N target, budget or D)
    for (const auto& r : s.results) {
      if (!usable(r, col) || !planned.count(r.name)) continue;
      const PlannedRun& p = *planned[r.name];
      groups[{p.target_params, p.budget > 0 ? p.budget : p.target_tokens}].push_back(&r);
    }
    for (auto& [key, runs] : groups) {
      std::sort(runs.begin(), runs.end(), [&](const RunResult* a, const RunResult* b) {
        return a->sparsity != b->sparsity ? a->sparsity < b->sparsity : a->seed < b->seed;
      });
      FixedParamsCurve curve{s.label, key.first, runs.front()->budget > 0, key.second, {}};
      std::map<double, std::vector<const RunResult*>> by_s;
      for (const auto* r : runs) by_s[r->sparsity].push_back(r);
      double best_s = kNaN, best_l = INFINITY;
      for (const auto& [S, rs] : by_s) {
        double m = 0;
        for (const auto* r : rs) m += loss_of(*r, col);
        m /= static_cast<double>(rs.size());
        FixedParamsPoint p{run_brief(*rs.front(), col), rs.size()};
        p.run.loss = m;
        curve.points.push_back(p);
        if (m < best_l) best_l = m, best_s = S;
      }
      curve.S_star = best_s, curve.L_star = best_l;
      curve.on_edge = !by_s.empty() && (best_s == by_s.begin()->first || best_s == by_s.rbegin()->first);
      fixed.push_back(std::move(curve));
    }
  }
  return fixed;
}

std::vector<DownstreamRow> downstream_section(const Study& all_runs, const std::string& col) {
  std::vector<DownstreamRow> downstream;
  for (const auto& s : all_runs.sweeps) {
    std::map<std::string, const RunResult*> by_name;
    for (const auto& r : s.results) by_name[r.name] = &r;
    for (const auto& d : s.downstream) {
      auto it = by_name.find(d.run);
      DownstreamRow row{s.label, d.run, d.task, d.mode, d.shots, d.acc, d.acc_stderr, d.acc_norm, d.acc_norm_stderr, d.n};
      row.loss = it == by_name.end() ? kNaN : loss_of(*it->second, col);
      row.moe = it != by_name.end() && is_moe(*it->second);
      downstream.push_back(row);
    }
  }
  return downstream;
}

// One side of the dense-vs-MoE pair: the run, its losses, and its downstream records (from its own sweep: names
// are unique only within a sweep).
PairSide pair_side(const Study& study, const RunResult* r) {
  PairSide side;
  side.name = r->name, side.val_loss = r->val_loss, side.ood_losses = r->ood_losses;
  side.params = r->params, side.active_params = r->active_params;
  for (const auto& s : study.sweeps) {
    if (s.results.empty() || r < s.results.data() || r >= s.results.data() + s.results.size()) continue;
    std::vector<PairTask> tasks;
    for (const auto& d : s.downstream) {
      if (d.run != r->name) continue;
      PairTask t{d.task, d.mode, d.shots, d.n, d.acc, d.acc_stderr, std::nullopt};
      if (d.finetune.contains("before")) t.before = d.finetune["before"];
      tasks.push_back(t);
    }
    if (!tasks.empty()) side.downstream = tasks;
  }
  return side;
}

// The dense-vs-MoE pair of the largest budget (the fairseq study's comparison): in domain, out of domain, zero- and
// few-shot, fine-tuned.
DenseMoePair dense_vs_moe_pair_section(const Study& study, const BudgetBests& bests) {
  DenseMoePair pair;
  if (!bests.pair_dense || !bests.pair_moe) {
    pair.skipped = "no budget with both a dense and an MoE run";
    return pair;
  }
  pair.C = bests.per_budget.back().C;
  pair.dense = pair_side(study, bests.pair_dense);
  pair.moe = pair_side(study, bests.pair_moe);
  return pair;
}

// The recommendation at the largest budget.
Recommendation recommendation_section(const std::vector<double>& budgets, const BudgetBests& bests,
                                      const IsoflopFit& isoflop, const LawFit& sparsity_fit) {
  Recommendation rec;
  if (budgets.empty()) return rec;
  const double C = budgets.back();
  rec.present = true;
  rec.budget = C;
  rec.best_measured = bests.per_budget.back().best;
  for (const auto& b : isoflop.budgets)
    if (same_budget(b.C, C)) rec.isoflop = b;
  if (sparsity_fit.fitted()) {
    try {
      OptimizeOptions o;
      o.budget = C;
      rec.sparsity_law = read_law_optimum(optimize_report(load_fit_json(sparsity_fit.document, "sparsity fit"), o));
    } catch (const Error& e) {
      rec.sparsity_law = read_law_optimum(skipped(e.what()));
    }
  }
  return rec;
}

// The headline, in words, from the numbers above.
std::string headline_text(const std::vector<double>& budgets, const Recommendation& rec,
                          const ComputeMultiplier& multiplier, const std::string& col) {
  if (budgets.empty())
    return "No IsoFLOP runs with a finite " + col + " were found, so there is no compute-optimal answer yet.";
  std::string headline = "At C = " + fmt("%.3g", rec.budget) + " FLOPs the best measured configuration is " +
                         describe_run(rec.best_measured) + ", " + col + " " + fmt("%.4f", rec.best_measured.loss) + ".";
  if (rec.isoflop) {
    const auto& r = *rec.isoflop;
    headline += " The IsoFLOP surface puts the optimum at N* = " + fmt("%.3g", r.N_star) +
                " non-embedding parameters and S* = " + fmt("%.3g", r.S_star);
    if (r.N_star_interval && r.S_star_interval)
      headline += " (95% bootstrap intervals: N* " + fmt("%.3g", r.N_star_interval->lo) + " to " +
                  fmt("%.3g", r.N_star_interval->hi) + ", S* " + fmt("%.3g", r.S_star_interval->lo) + " to " +
                  fmt("%.3g", r.S_star_interval->hi) + ")";
    headline += ".";
  }
  if (multiplier.per_budget && !multiplier.per_budget->empty()) {
    const auto& m = multiplier.per_budget->back();
    const std::string where = m.extrapolated ? " (read off the dense power law outside the measured budgets, so treat "
                                               "it as an extrapolation)"
                                             : "";
    if (m.multiplier >= 1)
      headline += " MoE needs " + fmt("%.2f", m.multiplier) + "x less compute than dense for the same loss: dense "
                  "reaches the best MoE loss " + fmt("%.4f", m.moe_loss) + " only at about " +
                  fmt("%.3g", m.dense_compute_for_moe_loss) + " FLOPs" + where + ".";
    else
      headline += " At this budget MoE does not pay off: the best MoE loss " + fmt("%.4f", m.moe_loss) +
                  " is what the dense power law reaches with " + fmt("%.2f", m.multiplier) + "x this compute" + where + ".";
  } else if (!multiplier.skipped.empty()) {
    headline += " No compute multiplier: " + multiplier.skipped + ".";
  }
  return headline;
}

}  // namespace

StudySummary analyse_study(const Study& all_runs, const AnalysisOptions& options) {
  const std::string& col = options.loss;
  StudySummary out;
  out.study = all_runs.dir;
  out.loss_column = col;
  // Every analysis below that picks a best configuration or fits a curve reads replicate means; the findings
  // read every run (their intervals come from the replicates).
  const Study study = replicate_means(all_runs);
  out.sweeps = sweeps_section(all_runs);
  const IsoflopRuns iso = isoflop_runs(study, col);
  out.budgets = iso.budgets;
  const FitRequest request = study_fit_request(iso, options);
  out.isoflop_fit = isoflop_fit_section(request, iso.points);
  out.sparsity_fit = sparsity_fit_section(request, iso.points, iso.budgets);
  out.law_comparison = law_comparison_section(request, iso, options);
  const BudgetBests bests = budget_bests(iso, col);
  out.per_budget = bests.per_budget;
  out.compute_multiplier = compute_multiplier_section(bests);
  out.granularity = granularity_section(study, col);
  const GranularityRuns g_runs = granularity_runs(study, col);
  out.granularity_fit = granularity_fit_section(g_runs, request);
  out.granularity_optimum = granularity_optimum_section(g_runs, out.granularity_fit, col);
  out.fixed_params = fixed_params_section(study, col);
  out.downstream = downstream_section(all_runs, col);
  out.dense_vs_moe_pair = dense_vs_moe_pair_section(study, bests);
  out.recommendation = recommendation_section(iso.budgets, bests, out.isoflop_fit, out.sparsity_fit);
  out.headline = headline_text(iso.budgets, out.recommendation, out.compute_multiplier, col);
  out.findings = study_findings(all_runs, out, col);
  return out;
}

}  // namespace moelab
