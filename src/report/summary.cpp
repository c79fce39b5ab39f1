#include "report/summary.h"

#include <cmath>

namespace moelab {
namespace {

using ojson = nlohmann::ordered_json;

ojson number_or_null(double v) { return std::isfinite(v) ? ojson(v) : ojson(nullptr); }

std::optional<Range> percentile_range(const ojson& iv) {
  if (!iv.is_object() || !iv.contains("p2.5") || !iv.contains("p97.5")) return std::nullopt;
  return Range{iv["p2.5"].get<double>(), iv["p97.5"].get<double>()};
}

const ojson& member(const ojson& o, const char* key) {
  static const ojson null_value;
  return o.is_object() && o.contains(key) ? o[key] : null_value;
}

// A section that could not be computed is written as {"skipped": reason}.
bool skipped_document(const ojson& document, std::string& skipped) {
  if (document.is_object() && document.contains("skipped") && document["skipped"].is_string() && document.size() == 1) {
    skipped = document["skipped"].get<std::string>();
    return true;
  }
  return false;
}

ojson to_json(const RunBrief& r) {
  return ojson{{"name", r.name},
               {"loss", r.loss},
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

ojson to_json(const std::optional<RunBrief>& r) { return r ? to_json(*r) : ojson(nullptr); }

ojson to_json(const SweepCount& s) {
  return {{"label", s.label},           {"name", s.name},       {"kind", s.kind},
          {"dir", s.dir},               {"runs_planned", s.runs_planned}, {"runs_ok", s.runs_ok},
          {"runs_failed", s.runs_failed}, {"downstream_rows", s.downstream_rows}};
}

ojson to_json(const BudgetBest& b) {
  return {{"C", b.C}, {"best", to_json(b.best)}, {"best_dense", to_json(b.best_dense)}, {"best_moe", to_json(b.best_moe)}};
}

ojson to_json(const ComputeMultiplier& m) {
  ojson out;
  if (m.dense_frontier)
    out["dense_frontier"] = {{"form", "log L = a + b log C, least squares over the best dense run per budget"},
                             {"a", (*m.dense_frontier)[0]},
                             {"b", (*m.dense_frontier)[1]}};
  if (!m.skipped.empty()) out["skipped"] = m.skipped;
  if (m.per_budget) {
    ojson rows = ojson::array();
    for (const auto& r : *m.per_budget)
      rows.push_back({{"C", r.C},
                      {"best_moe", r.best_moe},
                      {"moe_loss", r.moe_loss},
                      {"dense_loss", r.dense_loss ? ojson(*r.dense_loss) : ojson(nullptr)},
                      {"dense_compute_for_moe_loss", r.dense_compute_for_moe_loss},
                      {"multiplier", r.multiplier},
                      {"extrapolated", r.extrapolated}});
    out["per_budget"] = rows;
  }
  return out;
}

ojson to_json(const GranularityOptimum& g) {
  ojson row{{g.by_budget ? "C" : "tokens", g.key},
            {"G_star", g.G_star},
            {"best", to_json(g.best)},
            {"largest_G_measured", g.largest_G_measured},
            {"on_edge", g.on_edge}};
  row["dense"] = to_json(g.dense);
  ojson curve = ojson::array();
  for (const auto& p : g.curve_at_best_shape) curve.push_back({{"G", p.G}, {"loss", p.loss}, {"name", p.name}});
  row["curve_at_best_shape"] = curve;
  if (g.has_law) {
    if (!g.law_skipped.empty()) {
      row["law"] = {{"skipped", g.law_skipped}};
    } else {
      ojson by_g = ojson::array();
      for (const auto& p : g.law_by_G) by_g.push_back({{"G", p.G}, {"N", p.N}, {"D", p.D}, {"loss", p.loss}});
      row["law"] = {{"G_star", g.law_G_star}, {"loss", g.law_loss}, {"by_G", by_g}};
    }
  }
  return row;
}

ojson to_json(const FixedParamsCurve& f) {
  ojson pts = ojson::array();
  for (const auto& p : f.points) {
    ojson b = to_json(p.run);
    b["seeds"] = p.seeds;
    pts.push_back(b);
  }
  return {{"sweep", f.sweep},      {"params", f.params}, {f.by_budget ? "C" : "tokens", f.key},
          {"points", pts},         {"S_star", f.S_star}, {"L_star", f.L_star},
          {"on_edge", f.on_edge}};
}

ojson to_json(const DownstreamRow& d) {
  return {{"sweep", d.sweep},
          {"run", d.run},
          {"task", d.task},
          {"mode", d.mode},
          {"shots", d.shots},
          {"acc", d.acc},
          {"acc_stderr", d.acc_stderr},
          {"acc_norm", d.acc_norm},
          {"acc_norm_stderr", d.acc_norm_stderr},
          {"n", d.n},
          {"loss", number_or_null(d.loss)},
          {"moe", d.moe}};
}

ojson to_json(const PairSide& p) {
  ojson o{{"name", p.name}, {"val_loss", number_or_null(p.val_loss)}};
  ojson ood = ojson::object();
  for (const auto& [k, v] : p.ood_losses) ood[k] = number_or_null(v);
  o["ood_losses"] = ood;
  o["params"] = p.params;
  o["active_params"] = p.active_params;
  if (p.downstream) {
    ojson tasks = ojson::array();
    for (const auto& t : *p.downstream) {
      ojson j{{"task", t.task}, {"mode", t.mode}, {"shots", t.shots}, {"n", t.n}, {"acc", t.acc},
              {"acc_stderr", t.acc_stderr}};
      if (t.before) j["before"] = *t.before;
      tasks.push_back(j);
    }
    o["downstream"] = tasks;
  }
  return o;
}

ojson to_json(const DenseMoePair& p) {
  if (!p.skipped.empty()) return {{"skipped", p.skipped}};
  return {{"C", p.C}, {"dense", to_json(p.dense)}, {"moe", to_json(p.moe)}};
}

ojson to_json(const Recommendation& r) {
  if (!r.present) return nullptr;
  ojson out{{"budget", r.budget}, {"best_measured", to_json(r.best_measured)}};
  if (r.isoflop) {
    out["isoflop"] = {{"N_star", r.isoflop->N_star}, {"S_star", r.isoflop->S_star}, {"L_star", r.isoflop->L_star}};
    if (!r.isoflop->intervals.is_null()) out["isoflop"]["intervals"] = r.isoflop->intervals;
  }
  if (r.sparsity_law) out["sparsity_law"] = r.sparsity_law->document;
  return out;
}

ojson to_json(const Claim& c) {
  ojson f{{"id", c.id},         {"claim", c.claim},     {"source", c.source},   {"measured", c.measured},
          {"spread", c.spread}, {"verdict", c.verdict}, {"why", c.why}};
  f["estimate"] = number_or_null(c.estimate);
  f["interval"] = ojson::array({number_or_null(c.lo), number_or_null(c.hi)});
  f["detectable_effect"] = number_or_null(c.detectable_effect);
  f["unit"] = c.unit;
  f["n_per_arm"] = c.n_per_arm;
  if (!c.details.empty()) f["details"] = c.details;
  return f;
}

}  // namespace

ojson findings_to_json(const Findings& f) {
  ojson claims = ojson::array(), pairing = ojson::array();
  for (const auto& c : f.claims) claims.push_back(to_json(c));
  for (const auto& p : f.pairing)
    pairing.push_back({{"C", p.C},
                       {"comparison", p.comparison},
                       {"replicates", p.replicates},
                       {"se_paired", p.se_paired},
                       {"se_unpaired", number_or_null(p.se_unpaired)},
                       {"variance_ratio", number_or_null(p.variance_ratio)},
                       {"correlation", number_or_null(p.correlation)}});
  return {{"claims", claims},
          {"edge_warnings", f.edge_warnings},
          {"seed_sd", number_or_null(f.seed_sd)},
          {"pairing", pairing}};
}

namespace {

template <class T>
ojson array_of(const std::vector<T>& v) {
  ojson out = ojson::array();
  for (const auto& x : v) out.push_back(to_json(x));
  return out;
}

ojson fit_document(const std::string& skipped, const ojson& document) {
  return skipped.empty() ? document : ojson{{"skipped", skipped}};
}

}  // namespace

double Surface::at(double log_n, double y) const {
  const double u = (log_n - x_center) / x_scale, v = (y - y_center) / y_scale;
  double value = 0;
  for (size_t i = 0; i < monomials.size() && i < coefficients.size(); ++i)
    value += coefficients[i] * std::pow(u, monomials[i][0]) * std::pow(v, monomials[i][1]);
  return value;
}

IsoflopFit read_isoflop_fit(ojson document) {
  IsoflopFit fit;
  if (skipped_document(document, fit.skipped)) return fit;
  for (const auto& b : member(document, "budgets")) {
    IsoflopBudget f;
    f.C = b["C"].get<double>(), f.N_star = b["N_star"].get<double>(), f.S_star = b["S_star"].get<double>();
    f.L_star = b["L_star"].get<double>();
    const ojson& box = member(member(b, "box"), "N");
    if (box.is_array() && box.size() == 2) f.box_N = {box[0].get<double>(), box[1].get<double>()};
    f.intervals = member(b, "intervals");
    f.N_star_interval = percentile_range(member(f.intervals, "N_star"));
    f.S_star_interval = percentile_range(member(f.intervals, "S_star"));
    const ojson& s = member(b, "surface");
    if (s.is_object()) {
      f.surface.x_center = s["x_center"].get<double>(), f.surface.x_scale = s["x_scale"].get<double>();
      f.surface.y_center = s["y_center"].get<double>(), f.surface.y_scale = s["y_scale"].get<double>();
      for (const auto& m : s["monomials"]) f.surface.monomials.push_back({m[0].get<int>(), m[1].get<int>()});
      for (const auto& c : s["coefficients"]) f.surface.coefficients.push_back(c.get<double>());
    }
    fit.budgets.push_back(std::move(f));
  }
  const ojson& frontier = member(document, "frontier");
  if (frontier.contains("N_star_exponent"))
    fit.N_star_frontier = std::array<double, 2>{frontier["N_star_exponent"].get<double>(),
                                                frontier["N_star_log_intercept"].get<double>()};
  fit.document = std::move(document);
  return fit;
}

LawFit read_law_fit(ojson document) {
  LawFit fit;
  if (skipped_document(document, fit.skipped)) return fit;
  for (const auto& p : member(document, "parameters"))
    fit.theta.push_back(p.is_object() ? p["value"].get<double>() : p.get<double>());
  for (const auto& [k, v] : member(document, "coefficients").items())
    if (v.is_number()) fit.coefficients.push_back({k, v.get<double>()});
  if (member(document, "n_points").is_number()) fit.n_points = document["n_points"].get<size_t>();
  if (member(document, "rmse").is_number()) fit.rmse = document["rmse"].get<double>();
  if (member(document, "degenerate").is_string()) fit.degenerate = document["degenerate"].get<std::string>();
  fit.document = std::move(document);
  return fit;
}

LawComparison read_law_comparison(ojson document) {
  LawComparison c;
  if (!member(document, "ranking").is_array()) {
    c.skipped = member(document, "skipped").is_string() ? document["skipped"].get<std::string>() : "no comparison";
    return c;
  }
  c.holdout = member(document, "holdout").is_string() ? document["holdout"].get<std::string>() : "";
  for (const auto& r : document["ranking"])
    c.ranking.push_back({r["law"].get<std::string>(), r["heldout_rmse"].get<double>(), r["rmse"].get<double>(),
                         percentile_range(member(r, "heldout_rmse_interval")), r["parameters"].get<int64_t>()});
  for (const auto& s : member(document, "skipped"))
    c.not_fitted.push_back({s["law"].get<std::string>(), s["reason"].get<std::string>()});
  c.document = std::move(document);
  return c;
}

LawOptimum read_law_optimum(ojson document) {
  LawOptimum o;
  if (skipped_document(document, o.skipped)) {
    o.document = std::move(document);
    return o;
  }
  const ojson& opt = member(document, "optimum");
  if (opt.is_object()) {
    o.has_optimum = true;
    o.N = opt["N"].get<double>(), o.D = opt["D"].get<double>(), o.S = opt["S"].get<double>();
    o.loss = opt["loss"].get<double>();
    const ojson& iv = member(document, "intervals");
    o.N_interval = percentile_range(member(iv, "N")), o.D_interval = percentile_range(member(iv, "D"));
    o.S_interval = percentile_range(member(iv, "S")), o.loss_interval = percentile_range(member(iv, "loss"));
  }
  if (member(document, "constraint").is_string()) o.constraint = document["constraint"].get<std::string>();
  o.document = std::move(document);
  return o;
}

ojson summary_to_json(const StudySummary& s) {
  ojson out;
  out["study"] = s.study;
  out["loss_column"] = s.loss_column;
  out["sweeps"] = array_of(s.sweeps);
  out["budgets"] = s.budgets;
  out["isoflop_fit"] = fit_document(s.isoflop_fit.skipped, s.isoflop_fit.document);
  out["sparsity_fit"] = fit_document(s.sparsity_fit.skipped, s.sparsity_fit.document);
  out["law_comparison"] = fit_document(s.law_comparison.skipped, s.law_comparison.document);
  out["per_budget"] = array_of(s.per_budget);
  out["compute_multiplier"] = to_json(s.compute_multiplier);
  ojson granularity = ojson::array();
  for (const auto& g : s.granularity) {
    ojson b = to_json(g.run);
    b["sweep"] = g.sweep;
    granularity.push_back(b);
  }
  out["granularity"] = granularity;
  out["granularity_fit"] = fit_document(s.granularity_fit.skipped, s.granularity_fit.document);
  out["granularity_optimum"] = array_of(s.granularity_optimum);
  out["fixed_params"] = array_of(s.fixed_params);
  out["downstream"] = array_of(s.downstream);
  out["dense_vs_moe_pair"] = to_json(s.dense_vs_moe_pair);
  out["recommendation"] = to_json(s.recommendation);
  out["headline"] = s.headline;
  out["findings"] = findings_to_json(s.findings);
  ojson figures = ojson::array();
  for (const auto& f : s.figures)
    figures.push_back({{"id", f.id}, {"title", f.title}, {"caption", f.caption}, {"svg", f.svg}});
  out["figures"] = figures;
  out["figures_skipped"] = s.figures_skipped;
  return out;
}

}  // namespace moelab
