#include "core/format.h"
#include "report/study.h"

#include "report/findings.h"

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

ojson number_or_null(double v) { return std::isfinite(v) ? ojson(v) : ojson(nullptr); }

bool usable(const RunResult& r, const std::string& column) {
  return r.status == "ok" && std::isfinite(loss_of(r, column)) && loss_of(r, column) > 0;
}

bool is_moe(const RunResult& r) { return r.experts > 0; }

ojson run_brief(const RunResult& r, const std::string& column) {
  return ojson{{"name", r.name},
               {"loss", loss_of(r, column)},
               {"d_model", r.d_model},
               {"n_layers", r.n_layers},
               {"experts", r.experts},
               {"top_k", r.top_k},
               {"granularity", r.granularity},
               {"sparsity", r.sparsity},
               {"nonembedding_params", r.nonembedding_params},
               {"active_params", r.active_params},
               {"tokens", r.tokens},
               {"flops", r.flops},
               {"budget", r.budget}};
}

std::string describe_run(const ojson& b) {
  std::string text = b["name"].get<std::string>() + " (d_model " + std::to_string(b["d_model"].get<int64_t>()) +
                     ", " + std::to_string(b["n_layers"].get<int64_t>()) +
                     (b["n_layers"].get<int64_t>() == 1 ? " layer, " : " layers, ");
  if (b["experts"].get<int64_t>() > 0)
    text += std::to_string(b["experts"].get<int64_t>()) + " experts top-" + std::to_string(b["top_k"].get<int64_t>()) +
            ", S = " + fmt("%.4g", b["sparsity"].get<double>());
  else
    text += "dense";
  text += ", " + fmt("%.3g", static_cast<double>(b["nonembedding_params"].get<int64_t>())) + " non-embedding params, " +
          fmt("%.3g", static_cast<double>(b["tokens"].get<int64_t>())) + " tokens)";
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

// ---- analyse_study in sections: each reads what it needs and returns its part of summary.json ------------------

namespace {

ojson sweeps_section(const Study& all_runs) {
  ojson sweeps = ojson::array();
  for (const auto& s : all_runs.sweeps) {
    int64_t ok = 0, failed = 0;
    for (const auto& r : s.results) (r.status == "ok" ? ok : failed)++;
    sweeps.push_back({{"label", s.label},
                      {"name", s.plan.name},
                      {"kind", s.plan.kind},
                      {"dir", s.dir},
                      {"runs_planned", static_cast<int64_t>(s.plan.feasible_runs().size())},
                      {"runs_ok", ok},
                      {"runs_failed", failed},
                      {"downstream_rows", static_cast<int64_t>(s.downstream.size())}});
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
  auto& iso = d.iso;
  auto& iso_source = d.iso_source;
  auto& points = d.points;
  auto& budgets = d.budgets;
  for (const auto& s : study.sweeps) {
    if (s.plan.kind != "isoflop") continue;
    for (const auto& r : s.results)
      if (r.budget > 0 && usable(r, col)) iso.push_back(&r);
    iso_source += (iso_source.empty() ? "" : ", ") + (fs::path(s.dir) / "results.db").string();
  }
  for (const auto* r : iso) {
    Observation o;
    o.N = static_cast<double>(r->nonembedding_params);
    o.D = static_cast<double>(r->tokens);
    o.S = r->sparsity;
    o.G = static_cast<double>(r->granularity);
    o.C = r->budget;  // the planned budget: runs of one budget differ by less than a step's FLOPs
    o.L = loss_of(*r, col);
    points.push_back(o);
  }
  for (const auto* r : iso)
    if (std::none_of(budgets.begin(), budgets.end(), [&](double b) { return same_budget(b, r->budget); }))
      budgets.push_back(r->budget);
  std::sort(budgets.begin(), budgets.end());
  return d;
}

FitRequest study_fit_request(const IsoflopRuns& d, const AnalysisOptions& options) {
  const std::string& col = options.loss;
  const std::string& iso_source = d.iso_source;
  FitRequest request;
  request.data_path = iso_source;
  request.columns = default_columns();
  request.columns["N"] = "nonembedding_params";
  request.columns["C"] = "budget";
  request.columns["L"] = col;
  request.bootstrap = options.bootstrap;
  request.seed = options.seed;

  return request;
}

// IsoFLOP surfaces (degree 2 needs 6 points per budget).
ojson isoflop_fit_section(FitRequest request, const std::vector<Observation>& points) {
  ojson isoflop;
  if (points.size() < 6) {
    isoflop = {{"skipped", "fewer than 6 IsoFLOP runs"}};
  } else {
    try {
      request.law = LawKind::Isoflop;
      isoflop = fit_observations(request, points, {});
    } catch (const Error& e) {
      isoflop = {{"skipped", e.what()}};
    }
  }
  return isoflop;
}

// The sparsity law of Abnar et al. (Eq. 6, 10 parameters).
ojson sparsity_fit_section(FitRequest request, const std::vector<Observation>& points, const std::vector<double>& budgets) {
  ojson sparsity_fit;
  std::set<double> sparsities;
  for (const auto& p : points) sparsities.insert(p.S);
  if (points.size() < 12 || sparsities.size() < 3 || budgets.size() < 2) {
    sparsity_fit = {{"skipped", "the sparsity law needs at least 12 runs over 3 sparsity levels and 2 budgets"}};
  } else {
    try {
      request.law = LawKind::Sparsity;
      sparsity_fit = fit_observations(request, points, {});
    } catch (const Error& e) {
      sparsity_fit = {{"skipped", e.what()}};
    }
  }
  return sparsity_fit;
}

// Which law extrapolates best: every law the IsoFLOP runs' columns allow, fitted without the largest budget and
// ranked by the error of predicting it (fit --law compare).
ojson law_comparison_section(const FitRequest& request, const IsoflopRuns& d, const AnalysisOptions& options) {
  const std::string& col = options.loss;
  const auto& iso = d.iso;
  const auto& budgets = d.budgets;
  const std::string& iso_source = d.iso_source;
  ojson comparison;
  if (budgets.size() < 2) {
    comparison = {{"skipped", "the law comparison needs runs at two or more budgets"}};
  } else {
    std::ostringstream csv;
    csv.precision(17);
    csv << "params,tokens,sparsity,granularity,flops,loss,active_params,experts\n";
    for (const auto* r : iso)
      csv << r->nonembedding_params << "," << r->tokens << "," << r->sparsity << "," << r->granularity << ","
          << r->budget << "," << loss_of(*r, col) << "," << r->active_params << "," << r->experts << "\n";
    try {
      FitRequest compare = request;
      compare.columns = default_columns();
      compare.data_path = iso_source;
      compare.bootstrap = std::min(options.bootstrap, 20);
      comparison = compare_laws_on(compare, parse_csv(csv.str(), "the IsoFLOP runs"));
      comparison.erase("laws");  // the per-law documents stay out of summary.json; ranking and reasons stay
    } catch (const Error& e) {
      comparison = {{"skipped", e.what()}};
    }
  }
  return comparison;
}

// Best measured configuration per budget (of replicate means); dense vs MoE frontiers.
struct BudgetBests {
  ojson per_budget = ojson::array();
  std::vector<std::array<double, 3>> dense_frontier;  // (C, best dense L, -)
  const RunResult *pair_dense = nullptr, *pair_moe = nullptr;  // the largest budget's best dense and MoE run
};

BudgetBests budget_bests(const IsoflopRuns& d, const std::string& col) {
  BudgetBests out;
  const auto& iso = d.iso;
  auto& per_budget = out.per_budget;
  auto& dense_frontier = out.dense_frontier;
  auto& pair_dense = out.pair_dense;
  auto& pair_moe = out.pair_moe;
  for (double C : d.budgets) {
    const RunResult *best = nullptr, *best_dense = nullptr, *best_moe = nullptr;
    for (const auto* r : iso) {
      if (!same_budget(r->budget, C)) continue;
      const double L = loss_of(*r, col);
      if (!best || L < loss_of(*best, col)) best = r;
      const RunResult*& slot = is_moe(*r) ? best_moe : best_dense;
      if (!slot || L < loss_of(*slot, col)) slot = r;
    }
    ojson row{{"C", C}, {"best", run_brief(*best, col)}};
    row["best_dense"] = best_dense ? run_brief(*best_dense, col) : ojson(nullptr);
    row["best_moe"] = best_moe ? run_brief(*best_moe, col) : ojson(nullptr);
    per_budget.push_back(row);
    if (best_dense) dense_frontier.push_back({C, loss_of(*best_dense, col), 0});
    pair_dense = best_dense, pair_moe = best_moe;
  }
  return out;
}

// Compute multiplier (the fairseq study's "compute efficiency"): the compute a dense model needs to reach
// the best MoE loss of budget C, over C. The dense frontier is a power law fitted through the best dense loss
// of each budget: log L = a + b log C (least squares).
ojson compute_multiplier_section(const BudgetBests& bests) {
  const auto& dense_frontier = bests.dense_frontier;
  const auto& per_budget = bests.per_budget;
  ojson multiplier;
  if (dense_frontier.size() < 2) {
    multiplier = {{"skipped", "needs dense baselines at 2 or more budgets"}};
  } else {
    double sx = 0, sy = 0, sxx = 0, sxy = 0;
    const double n = static_cast<double>(dense_frontier.size());
    for (const auto& p : dense_frontier) {
      const double x = std::log(p[0]), y = std::log(p[1]);
      sx += x, sy += y, sxx += x * x, sxy += x * y;
    }
    const double b = (n * sxy - sx * sy) / (n * sxx - sx * sx);
    const double a = (sy - b * sx) / n;
    multiplier["dense_frontier"] = {{"form", "log L = a + b log C, least squares over the best dense run per budget"},
                                    {"a", a},
                                    {"b", b}};
    if (!(b < 0)) {
      multiplier["skipped"] = "the best dense loss does not fall with compute across the budgets (slope " +
                              fmt("%.3g", b) + "), so no dense-equivalent compute can be read off";
    } else {
      ojson rows = ojson::array();
      const double c_lo = dense_frontier.front()[0], c_hi = dense_frontier.back()[0];
      for (const auto& row : per_budget) {
        if (row["best_moe"].is_null()) continue;
        const double C = row["C"].get<double>();
        const double L_moe = row["best_moe"]["loss"].get<double>();
        const double C_dense = std::exp((std::log(L_moe) - a) / b);
        rows.push_back({{"C", C},
                        {"best_moe", row["best_moe"]["name"]},
                        {"moe_loss", L_moe},
                        {"dense_loss", row["best_dense"].is_null() ? ojson(nullptr) : row["best_dense"]["loss"]},
                        {"dense_compute_for_moe_loss", C_dense},
                        {"multiplier", C_dense / C},
                        {"extrapolated", C_dense < c_lo * (1 - 1e-9) || C_dense > c_hi * (1 + 1e-9)}});
      }
      multiplier["per_budget"] = rows;
    }
  }
  return multiplier;
}

// Granularity comparison: loss against G at equal tokens and shape.
ojson granularity_section(const Study& study, const std::string& col) {
  ojson granularity = ojson::array();
  for (const auto& s : study.sweeps) {
    if (s.plan.kind != "granularity") continue;
    for (const auto& r : s.results) {
      if (!usable(r, col)) continue;
      ojson b = run_brief(r, col);
      b["sweep"] = s.label;
      granularity.push_back(b);
    }
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

// The granularity law (Krajewski et al.) on the granularity runs.
ojson granularity_fit_section(const Study& study, const std::string& col, const FitRequest& request,
                              GranularityRuns& g_runs) {
  auto& gpts = g_runs.gpts;
  auto& gvalues = g_runs.gvalues;
  auto& gshapes = g_runs.gshapes;
  auto& expansion = g_runs.expansion;
  auto& gruns = g_runs.gruns;
  auto& gsource = g_runs.gsource;
  for (const auto& s : study.sweeps) {
    if (s.plan.kind != "granularity") continue;
    gsource += (gsource.empty() ? "" : ", ") + (fs::path(s.dir) / "results.db").string();
    for (const auto& r : s.results) {
      if (!usable(r, col)) continue;
      gruns.push_back(&r);
      if (!is_moe(r)) continue;
      Observation o;
      o.N = static_cast<double>(r.nonembedding_params);
      o.D = static_cast<double>(r.tokens);
      o.G = static_cast<double>(r.granularity);
      o.C = r.flops;
      o.L = loss_of(r, col);
      gpts.push_back(o);
      gvalues.insert(o.G);
      gshapes.insert({r.d_model, r.n_layers});
      if (r.granularity > 0) expansion = static_cast<double>(r.experts) / static_cast<double>(r.granularity);
    }
  }
  ojson gfit;
  std::set<double> gN, gD;
  for (const auto& p : gpts) gN.insert(p.N), gD.insert(p.D);
  if (gpts.size() < 8 || gvalues.size() < 2 || gN.size() < 2 || gD.size() < 2) {
    gfit = {{"skipped", "the granularity law needs at least 8 MoE runs over 2 or more granularities, model sizes "
                        "and token counts"}};
  } else {
    try {
      FitRequest g = request;
      g.law = LawKind::Granularity;
      g.data_path = gsource;
      g.columns["C"] = "flops";
      g.expansion = expansion;
      gfit = fit_observations(g, gpts, {});
      // A fit with a non-positive exponent has no physical reading (loss rising with N or D): with a handful of
      // shapes the law is not identified. Say so, and read no optimum off it.
      const auto& co = gfit["coefficients"];
      std::string bad;
      for (const char* k : {"alpha", "beta", "gamma"})
        if (co.contains(k) && !(co[k].get<double>() > 0)) bad += (bad.empty() ? "" : ", ") + std::string(k) + " " + fmt("%.3g", co[k].get<double>());
      if (!bad.empty())
        gfit["degenerate"] = "the fitted exponents are not all positive (" + bad + "): " + std::to_string(gpts.size()) +
                             " runs over " + std::to_string(gshapes.size()) + " shapes do not identify the law, so no "
                             "optimum is read off it";
    } catch (const Error& e) {
      gfit = {{"skipped", e.what()}};
    }
  }
  return gfit;
}

// Per budget (or token count): the measured best G over every shape, and the law's best G at the measured
// shape of the best run, its N and D carried to G = 16 and 32 along the measured runs' linear trend in G (the
// router's parameters and FLOPs grow with G).
ojson granularity_optimum_section(const GranularityRuns& g_runs, const ojson& gfit, const std::string& col) {
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
  ojson optimum = ojson::array();
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
    const bool by_budget = best->budget > 0;
    ojson row{{by_budget ? "C" : "tokens", k},
              {"G_star", best->granularity},
              {"best", run_brief(*best, col)},
              {"largest_G_measured", g_max},
              {"on_edge", static_cast<double>(best->granularity) >= g_max}};
    row["dense"] = dense ? run_brief(*dense, col) : ojson(nullptr);
    ojson curve = ojson::array();
    std::vector<std::array<double, 3>> line;  // G, N, tokens at the best run's shape
    for (const auto* r : gruns)
      if (key_of(*r) == k && is_moe(*r) && r->d_model == best->d_model && r->n_layers == best->n_layers) {
        curve.push_back({{"G", r->granularity}, {"loss", loss_of(*r, col)}, {"name", r->name}});
        line.push_back({static_cast<double>(r->granularity), static_cast<double>(r->nonembedding_params),
                        static_cast<double>(r->tokens)});
      }
    row["curve_at_best_shape"] = curve;
    std::set<double> line_g;
    for (const auto& p : line) line_g.insert(p[0]);
    if (gfit.contains("parameters") && !gfit.contains("degenerate") && line_g.size() < 2 && by_budget) {
      row["law"] = {{"skipped", "the best shape was trained at one G only, so N and D cannot be carried to other G"}};
    } else if (gfit.contains("parameters") && !gfit.contains("degenerate") && by_budget) {
      // Least-squares lines N(G) and D(G) through the measured runs of this shape and budget.
      auto linear = [&](int col_index, double G) {
        double sx = 0, sy = 0, sxx = 0, sxy = 0;
        const double n = static_cast<double>(line.size());
        for (const auto& p : line) sx += p[0], sy += p[col_index], sxx += p[0] * p[0], sxy += p[0] * p[col_index];
        const double b = (n * sxy - sx * sy) / (n * sxx - sx * sx);
        return (sy - b * sx) / n + b * G;
      };
      try {
        const LoadedFit fit = load_fit_json(gfit, "granularity fit");
        double law_best = 0, law_loss_best = kNaN;
        ojson law = ojson::array();
        for (double G : {1.0, 2.0, 4.0, 8.0, 16.0, 32.0}) {
          Observation o;
          o.N = linear(1, G), o.D = linear(2, G), o.G = G;
          if (!(o.N > 0 && o.D > 0)) continue;
          const double L = law_loss(LawKind::Granularity, fit.theta, o);
          law.push_back({{"G", G}, {"N", o.N}, {"D", o.D}, {"loss", L}});
          if (!(L >= law_loss_best)) law_best = G, law_loss_best = L;
        }
        row["law"] = {{"G_star", law_best}, {"loss", law_loss_best}, {"by_G", law}};
      } catch (const Error& e) {
        row["law"] = {{"skipped", e.what()}};
      }
    }
    optimum.push_back(row);
  }
  return optimum;
}

// Fixed total parameters: loss against S (Abnar et al.'s U-shape).
ojson fixed_params_section(const Study& study, const std::string& col) {
  ojson fixed = ojson::array();
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
      ojson pts = ojson::array();
      // The mean over seeds at each S.
      std::map<double, std::vector<const RunResult*>> by_s;
      for (const auto* r : runs) by_s[r->sparsity].push_back(r);
      double best_s = kNaN, best_l = INFINITY;
      for (const auto& [S, rs] : by_s) {
        double m = 0;
        for (const auto* r : rs) m += loss_of(*r, col);
        m /= static_cast<double>(rs.size());
        ojson b = run_brief(*rs.front(), col);
        b["loss"] = m;
        b["seeds"] = rs.size();
        pts.push_back(b);
        if (m < best_l) best_l = m, best_s = S;
      }
      fixed.push_back({{"sweep", s.label},
                       {"params", key.first},
                       {runs.front()->budget > 0 ? "C" : "tokens", key.second},
                       {"points", pts},
                       {"S_star", best_s},
                       {"L_star", best_l},
                       {"on_edge", !by_s.empty() && (best_s == by_s.begin()->first || best_s == by_s.rbegin()->first)}});
    }
  }
  return fixed;
}

ojson downstream_section(const Study& all_runs, const std::string& col) {
  ojson downstream = ojson::array();
  for (const auto& s : all_runs.sweeps) {
    std::map<std::string, const RunResult*> by_name;
    for (const auto& r : s.results) by_name[r.name] = &r;
    for (const auto& d : s.downstream) {
      auto it = by_name.find(d.run);
      const double L = it == by_name.end() ? kNaN : loss_of(*it->second, col);
      downstream.push_back({{"sweep", s.label},
                            {"run", d.run},
                            {"task", d.task},
                            {"mode", d.mode},
                            {"shots", d.shots},
                            {"acc", d.acc},
                            {"acc_stderr", d.acc_stderr},
                            {"acc_norm", d.acc_norm},
                            {"acc_norm_stderr", d.acc_norm_stderr},
                            {"n", d.n},
                            {"loss", number_or_null(L)},
                            {"moe", it != by_name.end() && is_moe(*it->second)}});
    }
  }
  return downstream;
}

// The dense-vs-MoE pair of the largest budget (the fairseq study's comparison): in domain, out of domain, zero- and
// few-shot, fine-tuned. The runs themselves, not their names: names are unique only within a sweep (a granularity
// sweep's dense baseline may share its name with an IsoFLOP run).
ojson dense_vs_moe_pair_section(const Study& study, const BudgetBests& bests) {
  const RunResult* pair_dense = bests.pair_dense;
  const RunResult* pair_moe = bests.pair_moe;
  const auto& per_budget = bests.per_budget;
  ojson pair;
  if (pair_dense && pair_moe) {
    pair["C"] = per_budget.back()["C"];
    for (const auto& [side, r] : {std::pair<const char*, const RunResult*>{"dense", pair_dense}, {"moe", pair_moe}}) {
      ojson o{{"name", r->name}, {"val_loss", number_or_null(r->val_loss)}};
      ojson ood = ojson::object();
      for (const auto& [k, v] : r->ood_losses) ood[k] = number_or_null(v);
      o["ood_losses"] = ood;
      o["params"] = r->params;
      o["active_params"] = r->active_params;
      for (const auto& s : study.sweeps) {
        if (s.results.empty() || r < s.results.data() || r >= s.results.data() + s.results.size()) continue;
        ojson tasks = ojson::array();
        for (const auto& d : s.downstream) {
          if (d.run != r->name) continue;
          ojson t{{"task", d.task}, {"mode", d.mode}, {"shots", d.shots}, {"n", d.n}, {"acc", d.acc},
                  {"acc_stderr", d.acc_stderr}};
          if (d.finetune.contains("before")) t["before"] = d.finetune["before"];
          tasks.push_back(t);
        }
        if (!tasks.empty()) o["downstream"] = tasks;
      }
      pair[side] = o;
    }
  } else {
    pair = {{"skipped", "no budget with both a dense and an MoE run"}};
  }
  return pair;
}

// The recommendation at the largest budget.
ojson recommendation_section(const std::vector<double>& budgets, const BudgetBests& bests, const ojson& isoflop,
                             const ojson& sparsity_fit) {
  const auto& per_budget = bests.per_budget;
  ojson recommendation;
  if (!budgets.empty()) {
    const double C = budgets.back();
    recommendation["budget"] = C;
    recommendation["best_measured"] = per_budget.back()["best"];
    if (isoflop.contains("budgets")) {
      for (const auto& b : isoflop["budgets"])
        if (same_budget(b["C"].get<double>(), C)) {
          recommendation["isoflop"] = {{"N_star", b["N_star"]}, {"S_star", b["S_star"]}, {"L_star", b["L_star"]}};
          if (b.contains("intervals")) recommendation["isoflop"]["intervals"] = b["intervals"];
        }
    }
    if (sparsity_fit.contains("parameters")) {
      try {
        OptimizeOptions o;
        o.budget = C;
        recommendation["sparsity_law"] = optimize_report(load_fit_json(sparsity_fit, "sparsity fit"), o);
      } catch (const Error& e) {
        recommendation["sparsity_law"] = {{"skipped", e.what()}};
      }
    }
  }
  return recommendation;
}

// The headline, in words, from the numbers above.
std::string headline_text(const std::vector<double>& budgets, const ojson& recommendation, const ojson& multiplier,
                          const std::string& col) {
  std::string headline;
  if (budgets.empty()) {
    headline = "No IsoFLOP runs with a finite " + col + " were found, so there is no compute-optimal answer yet.";
  } else {
    const double C = budgets.back();
    headline = "At C = " + fmt("%.3g", C) + " FLOPs the best measured configuration is " +
               describe_run(recommendation["best_measured"]) + ", " + col + " " +
               fmt("%.4f", recommendation["best_measured"]["loss"].get<double>()) + ".";
    if (recommendation.contains("isoflop")) {
      const auto& r = recommendation["isoflop"];
      headline += " The IsoFLOP surface puts the optimum at N* = " + fmt("%.3g", r["N_star"].get<double>()) +
                  " non-embedding parameters and S* = " + fmt("%.3g", r["S_star"].get<double>());
      if (r.contains("intervals"))
        headline += " (95% bootstrap intervals: N* " + fmt("%.3g", r["intervals"]["N_star"]["p2.5"].get<double>()) +
                    " to " + fmt("%.3g", r["intervals"]["N_star"]["p97.5"].get<double>()) + ", S* " +
                    fmt("%.3g", r["intervals"]["S_star"]["p2.5"].get<double>()) + " to " +
                    fmt("%.3g", r["intervals"]["S_star"]["p97.5"].get<double>()) + ")";
      headline += ".";
    }
    if (multiplier.contains("per_budget") && !multiplier["per_budget"].empty()) {
      const auto& m = multiplier["per_budget"].back();
      const double x = m["multiplier"].get<double>();
      const std::string where = m["extrapolated"].get<bool>() ? " (read off the dense power law outside the measured "
                                                               "budgets, so treat it as an extrapolation)"
                                                             : "";
      if (x >= 1)
        headline += " MoE needs " + fmt("%.2f", x) + "x less compute than dense for the same loss: dense reaches the "
                    "best MoE loss " + fmt("%.4f", m["moe_loss"].get<double>()) + " only at about " +
                    fmt("%.3g", m["dense_compute_for_moe_loss"].get<double>()) + " FLOPs" + where + ".";
      else
        headline += " At this budget MoE does not pay off: the best MoE loss " +
                    fmt("%.4f", m["moe_loss"].get<double>()) + " is what the dense power law reaches with " + fmt("%.2f", x) +
                    "x this compute" + where + ".";
    } else if (multiplier.contains("skipped")) {
      headline += " No compute multiplier: " + multiplier["skipped"].get<std::string>() + ".";
    }
  }
  return headline;
}

}  // namespace

nlohmann::ordered_json analyse_study(const Study& all_runs, const AnalysisOptions& options) {
  const std::string& col = options.loss;
  ojson out;
  out["study"] = all_runs.dir;
  out["loss_column"] = col;
  // Every analysis below that picks a best configuration or fits a curve reads replicate means; the findings
  // read every run (their intervals come from the replicates).
  const Study study = replicate_means(all_runs);
  out["sweeps"] = sweeps_section(all_runs);
  const IsoflopRuns iso = isoflop_runs(study, col);
  out["budgets"] = iso.budgets;
  const FitRequest request = study_fit_request(iso, options);
  out["isoflop_fit"] = isoflop_fit_section(request, iso.points);
  out["sparsity_fit"] = sparsity_fit_section(request, iso.points, iso.budgets);
  out["law_comparison"] = law_comparison_section(request, iso, options);
  const BudgetBests bests = budget_bests(iso, col);
  out["per_budget"] = bests.per_budget;
  out["compute_multiplier"] = compute_multiplier_section(bests);
  out["granularity"] = granularity_section(study, col);
  GranularityRuns granularity_runs;
  out["granularity_fit"] = granularity_fit_section(study, col, request, granularity_runs);
  out["granularity_optimum"] = granularity_optimum_section(granularity_runs, out["granularity_fit"], col);
  out["fixed_params"] = fixed_params_section(study, col);
  out["downstream"] = downstream_section(all_runs, col);
  out["dense_vs_moe_pair"] = dense_vs_moe_pair_section(study, bests);
  out["recommendation"] = recommendation_section(iso.budgets, bests, out["isoflop_fit"], out["sparsity_fit"]);
  out["headline"] = headline_text(iso.budgets, out["recommendation"], out["compute_multiplier"], col);
  out["findings"] = study_findings(all_runs, out, col);
  return out;
}

}  // namespace moelab
