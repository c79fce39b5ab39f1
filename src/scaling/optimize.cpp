#include "core/format.h"
#include "scaling/optimize.h"

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdio>
#include <limits>
#include <sstream>

#include "core/error.h"
#include "core/io.h"
#include "model/count.h"
#include "scaling/fit.h"

namespace moelab {
namespace {

constexpr double kInf = std::numeric_limits<double>::infinity();
// Search ranges: log N over [1e3, 1e16] parameters, n_blocks over [0.25, 4096].
constexpr double kLogNMin = 6.907755279, kLogNMax = 36.841361488;

std::vector<double> default_granularities() { return {1, 2, 4, 8, 16, 32, 64}; }

// Shape candidates (d_model, n_layers, n_heads): Krajewski's presets, below them d = 64 n_blocks down to one
// block, above them d = 64 n_blocks up to 256 blocks; heads = d / 64.
std::vector<std::array<int64_t, 3>> shape_candidates() {
  std::vector<std::array<int64_t, 3>> s = {{64, 1, 1},   {128, 2, 2}, {192, 3, 3},   {256, 4, 4},  {384, 4, 6},
                                           {512, 4, 8},  {512, 8, 8}, {640, 10, 10}, {768, 12, 12}};
  for (int64_t nb = 13; nb <= 256; ++nb) s.push_back({64 * nb, nb, nb});
  return s;
}

// Experts E_total and top-K realising sparsity S = (E_total - K) / E_total as closely as K in {1, 2, 4, 8} allow.
std::pair<int64_t, int64_t> experts_for_sparsity(double S) {
  int64_t best_e = 1, best_k = 1;
  double best_err = kInf;
  for (int64_t k : {1, 2, 4, 8}) {
    const int64_t e = std::max<int64_t>(k, std::llround(k / std::max(1e-9, 1 - S)));
    const double err = std::fabs(static_cast<double>(e - k) / e - S);
    if (err < best_err - 1e-12) best_err = err, best_e = e, best_k = k;
  }
  return {best_e, best_k};
}

std::vector<double> column(const std::vector<ComputeOptimum>& v, double ComputeOptimum::*f) {
  std::vector<double> out;
  for (const auto& o : v) out.push_back(o.*f);
  return out;
}

}  // namespace

double minimize_1d(const std::function<double(double)>& f, double lo, double hi, double& x_min) {
  constexpr int kScan = 64;
  int best_i = 0;
  double best_f = kInf;
  for (int i = 0; i <= kScan; ++i) {
    const double v = f(lo + (hi - lo) * i / kScan);
    if (v < best_f) best_f = v, best_i = i;
  }
  double a = lo + (hi - lo) * std::max(0, best_i - 1) / kScan, b = lo + (hi - lo) * std::min(kScan, best_i + 1) / kScan;
  const double r = (std::sqrt(5.0) - 1) / 2;
  double c = b - r * (b - a), d = a + r * (b - a), fc = f(c), fd = f(d);
  for (int it = 0; it < 200 && b - a > 1e-12 * std::max(1.0, std::fabs(a)); ++it) {
    if (fc < fd) b = d, d = c, fd = fc, c = b - r * (b - a), fc = f(c);
    else a = c, c = d, fc = fd, d = a + r * (b - a), fd = f(d);
  }
  x_min = (a + b) / 2;
  const double v = f(x_min);
  if (!(v <= best_f)) {
    x_min = lo + (hi - lo) * best_i / kScan;
    return best_f;
  }
  return v;
}

LoadedFit load_fit_json(const nlohmann::json& j, const std::string& source) {
  LoadedFit fit;
  // A comparison (`fit --law compare`) stands for its best-ranked law.
  if (j.is_object() && j.value("law", std::string()) == "compare") {
    if (!j.contains("ranking") || j["ranking"].empty() || !j.contains("laws"))
      throw Error(source + " is a law comparison without a ranking; refit with `moelab fit --law compare`");
    const std::string best = j["ranking"][0]["law"].get<std::string>();
    LoadedFit winner = load_fit_json(j["laws"].at(best), source + " (its best law, " + best + ")");
    winner.chosen_from_comparison = best;
    return winner;
  }
  try {
    fit.law = law_from_string(j.at("law").get<std::string>());
    fit.document = j;
    if (j.contains("param_count")) fit.param_count = j["param_count"].get<std::string>();
    if (j.contains("expansion")) fit.expansion = j["expansion"].get<double>();
    if (fit.law == LawKind::Isoflop) return fit;
    for (const auto& name : law_spec(fit.law).param_names) fit.theta.push_back(j.at("parameters").at(name).get<double>());
    if (j.contains("bootstrap") && j["bootstrap"].contains("thetas"))
      fit.samples = j["bootstrap"]["thetas"].get<std::vector<std::vector<double>>>();
    if (j.contains("data_ranges") && j["data_ranges"].contains("S")) fit.max_sparsity = j["data_ranges"]["S"][1].get<double>();
    if (j.contains("data_ranges") && j["data_ranges"].contains("E")) fit.max_experts = j["data_ranges"]["E"][1].get<double>();
  } catch (const nlohmann::json::exception& e) {
    throw Error(source + " is not a moelab fit.json (" + e.what() + "); write one with `moelab fit --out`");
  }
  return fit;
}

LoadedFit load_fit(const std::string& path) {
  const std::string text = read_file(path, "fit file");
  nlohmann::json j;
  try {
    j = nlohmann::json::parse(text);
  } catch (const nlohmann::json::exception& e) {
    throw Error(path + " is not valid JSON: " + e.what());
  }
  return load_fit_json(j, path);
}

// ---- chinchilla ------------------------------------------------------------------------------------------------

ComputeOptimum chinchilla_optimum(const std::vector<double>& theta, double C) {
  const auto coef = law_coefficients(LawKind::Chinchilla, theta);  // E A B alpha beta a b G
  ComputeOptimum o;
  o.C = C;
  o.N = coef[7].second * std::pow(C / 6, coef[5].second);
  o.D = C / (6 * o.N);
  o.N_active = o.N;
  o.loss = law_loss(LawKind::Chinchilla, theta, {o.N, o.D});
  return o;
}

ComputeOptimum chinchilla_optimum_numeric(const std::vector<double>& theta, double C) {
  auto loss = [&](double log_n) {
    const double N = std::exp(log_n);
    return law_log_loss(LawKind::Chinchilla, theta.data(), {N, C / (6 * N)});
  };
  double log_n = 0;
  minimize_1d(loss, kLogNMin, std::min(kLogNMax, std::log(C / 6)), log_n);
  ComputeOptimum o;
  o.C = C, o.N = std::exp(log_n), o.D = C / (6 * o.N), o.N_active = o.N;
  o.loss = law_loss(LawKind::Chinchilla, theta, {o.N, o.D});
  return o;
}

// ---- granularity -----------------------------------------------------------------------------------------------

double krajewski_total_params(double n_blocks, double expansion, double granularity) {
  const double d = 64 * n_blocks;
  return n_blocks * (4 * d * d + 8 * expansion * d * d + d * expansion * granularity);
}

ComputeOptimum granularity_optimum_at(const std::vector<double>& theta, double C, double expansion, double G) {
  auto at = [&](double log_nb) {
    const double nb = std::exp(log_nb), d = 64 * nb;
    ComputeOptimum o;
    o.C = C, o.G = G, o.n_blocks = nb;
    o.N = krajewski_total_params(nb, expansion, G);
    o.N_active = 12 * d * d * nb;
    o.D = C / krajewski_flops_per_token(d, nb, expansion, G);
    return o;
  };
  auto loss = [&](double log_nb) {
    const ComputeOptimum o = at(log_nb);
    return law_log_loss(LawKind::Granularity, theta.data(), {o.N, o.D, o.G});
  };
  double log_nb = 0;
  minimize_1d(loss, std::log(0.25), std::log(4096.0), log_nb);
  ComputeOptimum o = at(log_nb);
  o.loss = law_loss(LawKind::Granularity, theta, {o.N, o.D, o.G});
  return o;
}

ComputeOptimum granularity_optimum(const std::vector<double>& theta, double C, double expansion,
                                   const std::vector<double>& granularities) {
  ComputeOptimum best;
  best.loss = kInf;
  for (double G : granularities.empty() ? default_granularities() : granularities) {
    const ComputeOptimum o = granularity_optimum_at(theta, C, expansion, G);
    if (o.loss < best.loss) best = o;
  }
  return best;
}

// ---- sparsity --------------------------------------------------------------------------------------------------

ComputeOptimum sparsity_optimum(const std::vector<double>& theta, double C, double max_sparsity) {
  if (!(max_sparsity >= 0 && max_sparsity < 1))
    throw Error("the largest sparsity to search must lie in [0, 1), got " + std::to_string(max_sparsity));
  // For a given S, the best N with D = C / (6 (1 - S) N).
  auto best_n = [&](double S, double& log_n) {
    auto loss = [&](double ln) {
      const double N = std::exp(ln);
      return law_log_loss(LawKind::Sparsity, theta.data(), {N, C / (6 * (1 - S) * N), 1, S});
    };
    return minimize_1d(loss, kLogNMin, std::min(kLogNMax, std::log(C / 6)), log_n);
  };
  double S = 0, log_n = 0;
  if (max_sparsity > 0) {
    minimize_1d([&](double s) { double ln; return best_n(s, ln); }, 0.0, max_sparsity, S);
  }
  best_n(S, log_n);
  ComputeOptimum o;
  o.C = C, o.S = S, o.N = std::exp(log_n), o.N_active = (1 - S) * o.N, o.D = C / (6 * o.N_active);
  o.loss = law_loss(LawKind::Sparsity, theta, {o.N, o.D, 1, o.S});
  return o;
}

ComputeOptimum joint_optimum(const std::vector<double>& t, double C, double max_experts) {
  ComputeOptimum best;
  best.loss = kInf;
  for (double E = 1; E <= std::max(1.0, max_experts) * (1 + 1e-9); E *= 2) {
    const double u = std::log(saturated_experts(E, t[9], t[10]));
    const double A = std::exp(t[0] + t[2] * u), alpha = t[1] + t[3] * u;
    const double B = std::exp(t[4] + t[6] * u), beta = t[5] + t[7] * u;
    if (!(alpha > 0 && beta > 0)) continue;  // no interior optimum at this E
    ComputeOptimum o;
    o.C = C, o.E = E;
    o.N = std::pow(alpha * A / (beta * B), 1 / (alpha + beta)) * std::pow(C / 6, beta / (alpha + beta));
    o.N_active = o.N;
    o.D = C / (6 * o.N);
    Observation x;
    x.A = o.N, x.D = o.D, x.E = E;
    o.loss = law_loss(LawKind::Joint, t, x);
    if (o.loss < best.loss) best = o;
  }
  if (!std::isfinite(best.loss))
    throw Error("the joint fit has no compute optimum: its N and D exponents are not positive at any E");
  return best;
}

std::vector<std::string> extrapolation_warnings(const nlohmann::json& document,
                                                const std::vector<std::pair<std::string, double>>& at) {
  std::vector<std::string> out;
  if (!document.contains("data_ranges")) return out;
  const auto& ranges = document["data_ranges"];
  for (const auto& [name, value] : at) {
    if (!ranges.contains(name) || !ranges[name].is_array() || ranges[name].size() < 2) continue;
    const double lo = ranges[name][0].get<double>(), hi = ranges[name][1].get<double>();
    const bool ratio = name != "S";  // sparsity: an additive range
    if (value > hi * (1 + 1e-9))
      out.push_back("extrapolating: " + name + " = " + fmt("%.4g", value) + " is " +
                    (ratio && hi > 0 ? fmt("%.3g", value / hi) + "x" : fmt("%.3g", value - hi)) +
                    " above the largest fitted " + name + " (" + fmt("%.4g", hi) + ")");
    else if (value < lo * (1 - 1e-9))
      out.push_back("extrapolating: " + name + " = " + fmt("%.4g", value) + " is " +
                    (ratio && value > 0 ? fmt("%.3g", lo / value) + "x" : fmt("%.3g", lo - value)) +
                    " below the smallest fitted " + name + " (" + fmt("%.4g", lo) + ")");
  }
  return out;
}

// ---- shapes ----------------------------------------------------------------------------------------------------

double parameter_count(const ModelConfig& model, const std::string& param_count) {
  const ParameterCounts n = count_parameters(model);
  if (param_count == "nonembedding_total") return static_cast<double>(n.nonembedding_total);
  if (param_count == "total") return static_cast<double>(n.total);
  if (param_count == "active") return static_cast<double>(n.active);
  if (param_count == "nonembedding_active") return static_cast<double>(n.nonembedding_active);
  throw Error("unknown parameter count '" + param_count +
              "'; use nonembedding_total, total, active or nonembedding_active");
}

ModelShape shape_for(LawKind law, const ComputeOptimum& optimum, double expansion, const std::string& param_count) {
  ModelShape best;
  double best_err = kInf;
  for (const auto& [d, layers, heads] : shape_candidates()) {
    Config c;
    ModelConfig& m = c.model;
    m.d_model = d, m.n_layers = layers, m.n_heads = heads;
    if (law == LawKind::Granularity && expansion > 0) {
      m.moe.expansion = static_cast<int64_t>(std::llround(expansion));
      m.moe.granularity = static_cast<int64_t>(std::llround(optimum.G));
      m.moe.top_k = 1;
      m.moe.router = RouterKind::ExpertChoice;
      m.moe.capacity_factor = 1.0;
    } else if (law == LawKind::Sparsity && optimum.S > 0) {
      const auto [experts, k] = experts_for_sparsity(optimum.S);
      if (experts > k) m.moe.experts = experts, m.moe.top_k = k;
    } else if (law == LawKind::Joint && optimum.E > 1) {  // the paper's Switch-style top-1 routing
      m.moe.experts = static_cast<int64_t>(std::llround(optimum.E));
      m.moe.top_k = 1;
    }
    try {
      validate(c);
    } catch (const Error&) {
      continue;
    }
    // The joint law's N is the active parameters (embeddings included).
    const double n = parameter_count(m, law == LawKind::Joint ? "active" : param_count);
    const double err = std::fabs(std::log(n / optimum.N));
    if (err < best_err) best_err = err, best.model = m, best.parameters = n;
  }
  const ModelConfig& m = best.model;
  const TrainConfig defaults;
  const double tokens_per_step = static_cast<double>(defaults.batch_size * defaults.grad_accum * m.seq_len);
  std::ostringstream t;
  t << "[model]\nd_model = " << m.d_model << "\nn_layers = " << m.n_layers << "\nn_heads = " << m.n_heads << "\n";
  if (m.moe.enabled()) {
    t << "\n[moe]\n";
    if (m.moe.expansion > 0)
      t << "expansion = " << m.moe.expansion << "\ngranularity = " << m.moe.granularity << "\ntop_k = " << m.moe.top_k
        << "\nrouter = \"" << to_string(m.moe.router) << "\"\ncapacity_factor = " << fmt("%.1f", m.moe.capacity_factor)
        << "\n";
    else
      t << "experts = " << m.moe.experts << "\ntop_k = " << m.moe.top_k << "\n";
  }
  t << "\n[train]\n# D = " << fmt("%.4g", optimum.D) << " tokens at batch_size " << defaults.batch_size
    << " x seq_len " << m.seq_len << "\nsteps = " << std::max<long long>(1, std::llround(std::ceil(optimum.D / tokens_per_step)))
    << "\n";
  best.toml = t.str();
  return best;
}

// ---- reports ---------------------------------------------------------------------------------------------------

namespace {

ComputeOptimum law_optimum(const LoadedFit& fit, const std::vector<double>& theta, double C, double expansion,
                           double max_sparsity) {
  switch (fit.law) {
    case LawKind::Chinchilla: return chinchilla_optimum(theta, C);
    case LawKind::Granularity: return granularity_optimum(theta, C, expansion);
    case LawKind::Sparsity: return sparsity_optimum(theta, C, max_sparsity);
    case LawKind::Joint: return joint_optimum(theta, C, fit.max_experts);
    case LawKind::Clark:
      throw Error("the clark law has no token term (Clark et al. fix the training tokens), so it defines no compute "
                  "optimum; use --law joint, or `moelab predict` for one model");
    case LawKind::Isoflop: break;
  }
  throw Error("no parametric optimum for an isoflop fit");
}

nlohmann::ordered_json optimum_json(const ComputeOptimum& o, LawKind law) {
  nlohmann::ordered_json j{{"N", o.N}, {"N_active", o.N_active}, {"D", o.D}};
  if (law == LawKind::Granularity) j["G"] = o.G, j["n_blocks"] = o.n_blocks, j["d_model"] = 64 * o.n_blocks;
  if (law == LawKind::Sparsity) j["S"] = o.S;
  if (law == LawKind::Joint) j["E"] = o.E;
  j["loss"] = o.loss;
  j["tokens_per_parameter"] = o.D / o.N;
  j["tokens_per_active_parameter"] = o.D / o.N_active;
  return j;
}

nlohmann::ordered_json isoflop_optimize(const LoadedFit& fit, double C) {
  nlohmann::ordered_json r{{"law", "isoflop"}, {"budget", C}};
  const auto& budgets = fit.document.at("budgets");
  for (const auto& b : budgets)
    if (std::fabs(b["C"].get<double>() - C) <= 1e-6 * C) {
      r["source"] = "the fitted surface at this budget";
      r["optimum"] = {{"N", b["N_star"]}, {"S", b["S_star"]}, {"loss", b["L_star"]}};
      if (b.contains("intervals")) r["intervals"] = b["intervals"];
      return r;
    }
  if (!fit.document.contains("frontier"))
    throw Error("budget " + fmt("%g", C) + " is not one the isoflop fit covers, and one budget is too few to "
                "extrapolate; fitted budgets are listed in fit.json under \"budgets\"");
  const double a = fit.document["frontier"]["N_star_exponent"].get<double>();
  const double k = fit.document["frontier"]["N_star_log_intercept"].get<double>();
  r["source"] = "power law log N* = a log C + k through the fitted budgets (S* and L* are known only at those)";
  r["optimum"] = {{"N", std::exp(k + a * std::log(C))}};
  r["exponents"] = {{"N_opt", a}};
  return r;
}

}  // namespace

nlohmann::ordered_json optimize_report(const LoadedFit& fit, const OptimizeOptions& options) {
  const double C = options.budget;
  if (!(C > 0 && std::isfinite(C))) throw Error("--budget must be a positive number of FLOPs, e.g. --budget 1e20");
  if (fit.law == LawKind::Isoflop) return isoflop_optimize(fit, C);
  const double expansion = options.expansion.value_or(fit.expansion.value_or(64.0));
  if (fit.law == LawKind::Granularity && !(expansion >= 1))
    throw Error("--expansion must be >= 1, got " + fmt("%g", expansion));
  const double max_s = options.max_sparsity.value_or(fit.max_sparsity);
  LoadedFit with_limits = fit;
  if (options.max_experts) with_limits.max_experts = *options.max_experts;
  const ComputeOptimum o = law_optimum(with_limits, fit.theta, C, expansion, max_s);

  nlohmann::ordered_json r;
  r["law"] = to_string(fit.law);
  r["budget"] = C;
  switch (fit.law) {
    case LawKind::Chinchilla: r["constraint"] = "C = 6 N D"; break;
    case LawKind::Granularity:
      r["constraint"] = "C = (12 d^2 * 6 + d E G * 14) D n_blocks, d = 64 n_blocks, N = n_blocks (4 + 8 E) d^2 + n_blocks d E G";
      r["expansion"] = expansion;
      break;
    case LawKind::Sparsity:
      r["constraint"] = "C = 6 N_a D, N_a = (1 - S) N";
      r["max_sparsity"] = max_s;
      break;
    case LawKind::Joint:
      r["constraint"] = "C = 6 N_a D; E over 1, 2, 4, ... up to max_experts";
      r["max_experts"] = with_limits.max_experts;
      break;
    case LawKind::Clark:
    case LawKind::Isoflop: break;
  }
  r["optimum"] = optimum_json(o, fit.law);
  if (fit.law == LawKind::Chinchilla) {
    const ComputeOptimum n = chinchilla_optimum_numeric(fit.theta, C);
    r["numeric_check"] = {{"N", n.N}, {"D", n.D}, {"loss", n.loss}, {"relative_difference_N", n.N / o.N - 1}};
    const auto coef = law_coefficients(LawKind::Chinchilla, fit.theta);
    r["exponents"] = {{"N_opt", coef[5].second}, {"D_opt", coef[6].second}, {"kind", "closed form"}};
  } else {
    // Local exponents d log N_opt / d log C from budgets C / sqrt(10) and C * sqrt(10), G (E) held at the optimum's.
    auto at = [&](double c) {
      return fit.law == LawKind::Granularity ? granularity_optimum_at(fit.theta, c, expansion, o.G)
             : fit.law == LawKind::Joint     ? joint_optimum(fit.theta, c, o.E)
                                             : sparsity_optimum(fit.theta, c, max_s);
    };
    const ComputeOptimum lo = at(C / std::sqrt(10.0)), hi = at(C * std::sqrt(10.0));
    r["exponents"] = {{"N_opt", std::log(hi.N / lo.N) / std::log(10.0)},
                      {"D_opt", std::log(hi.D / lo.D) / std::log(10.0)},
                      {"kind", "local, over C/sqrt(10) .. C*sqrt(10)"}};
  }
  if (!fit.samples.empty()) {
    std::vector<ComputeOptimum> boot;
    for (const auto& t : fit.samples) boot.push_back(law_optimum(with_limits, t, C, expansion, max_s));
    nlohmann::ordered_json iv{{"samples", boot.size()},
                              {"N", percentile_json(column(boot, &ComputeOptimum::N))},
                              {"D", percentile_json(column(boot, &ComputeOptimum::D))},
                              {"loss", percentile_json(column(boot, &ComputeOptimum::loss))}};
    if (fit.law == LawKind::Granularity) iv["G"] = percentile_json(column(boot, &ComputeOptimum::G));
    if (fit.law == LawKind::Sparsity) iv["S"] = percentile_json(column(boot, &ComputeOptimum::S));
    if (fit.law == LawKind::Joint) iv["E"] = percentile_json(column(boot, &ComputeOptimum::E));
    r["intervals"] = iv;
  }
  {
    std::vector<std::pair<std::string, double>> at = {{fit.law == LawKind::Joint ? "A" : "N", o.N}, {"D", o.D}};
    if (fit.law == LawKind::Joint) at.push_back({"E", o.E});
    if (fit.law == LawKind::Sparsity) at.push_back({"S", o.S});
    const auto warnings = extrapolation_warnings(fit.document, at);
    if (!warnings.empty()) r["warnings"] = warnings;
  }
  if (!fit.chosen_from_comparison.empty()) r["chosen_from_comparison"] = fit.chosen_from_comparison;
  const ModelShape shape = shape_for(fit.law, o, expansion, fit.param_count);
  r["model"] = {{"d_model", shape.model.d_model},
                {"n_layers", shape.model.n_layers},
                {"n_heads", shape.model.n_heads},
                {"experts", shape.model.moe.routed_experts()},
                {"top_k", shape.model.moe.enabled() ? shape.model.moe.active_experts() : 0},
                {"granularity", shape.model.moe.granularity},
                {"parameters", shape.parameters},
                {"param_count", fit.param_count},
                {"toml", shape.toml}};
  return r;
}

std::string optimize_text(const nlohmann::ordered_json& r) {
  std::ostringstream out;
  out << "moelab optimize: " << r["law"].get<std::string>() << " law, budget C = " << fmt("%.4g", r["budget"].get<double>())
      << " FLOPs\n";
  if (r.contains("constraint")) out << "  constraint: " << r["constraint"].get<std::string>() << "\n";
  if (r.contains("source")) out << "  from: " << r["source"].get<std::string>() << "\n";
  const auto& o = r["optimum"];
  auto interval = [&](const char* key) -> std::string {
    if (!r.contains("intervals") || !r["intervals"].contains(key)) return "";
    const auto& i = r["intervals"][key];
    return "   [2.5%: " + fmt("%.4g", i["p2.5"].get<double>()) + ", 97.5%: " + fmt("%.4g", i["p97.5"].get<double>()) +
           "; 10%: " + fmt("%.4g", i["p10"].get<double>()) + ", 90%: " + fmt("%.4g", i["p90"].get<double>()) + "]";
  };
  auto line = [&](const char* label, const char* key, const char* f) {
    if (o.contains(key)) out << "  " << label << fmt(f, o[key].get<double>()) << interval(key) << "\n";
  };
  line("N (parameters)       ", "N", "%.4g");
  line("N_active             ", "N_active", "%.4g");
  line("D (tokens)           ", "D", "%.4g");
  line("G (granularity)      ", "G", "%g");
  line("S (sparsity)         ", "S", "%.4f");
  line("E (experts)          ", "E", "%g");
  if (o.contains("loss"))
    out << "  predicted loss       " << fmt("%.4f", o["loss"].get<double>())
        << (r.contains("intervals") && r["intervals"].contains("loss") ? interval("loss")
            : r.contains("intervals") && r["intervals"].contains("L_star") ? interval("L_star") : "")
        << "\n";
  line("tokens per parameter", "tokens_per_parameter", " %.3g");
  if (r.contains("numeric_check"))
    out << "  numeric check: N = " << fmt("%.4g", r["numeric_check"]["N"].get<double>()) << " (relative difference "
        << fmt("%.2e", r["numeric_check"]["relative_difference_N"].get<double>()) << ")\n";
  if (r.contains("exponents")) {
    out << "  exponents: N_opt ~ C^" << fmt("%.4f", r["exponents"]["N_opt"].get<double>());
    if (r["exponents"].contains("D_opt")) out << ", D_opt ~ C^" << fmt("%.4f", r["exponents"]["D_opt"].get<double>());
    if (r["exponents"].contains("kind")) out << " (" << r["exponents"]["kind"].get<std::string>() << ")";
    out << "\n";
  }
  if (r.contains("chosen_from_comparison"))
    out << "  (the best-ranked law of the comparison: " << r["chosen_from_comparison"].get<std::string>() << ")\n";
  if (r.contains("warnings"))
    for (const auto& w : r["warnings"]) out << "  warning: " << w.get<std::string>() << "\n";
  if (r.contains("model")) {
    const auto& m = r["model"];
    out << "\nmodel realising N (" << m["param_count"].get<std::string>() << " = "
        << fmt("%.4g", m["parameters"].get<double>()) << "), for moelab train:\n"
        << m["toml"].get<std::string>();
  }
  return out.str();
}

nlohmann::ordered_json predict_report(const LoadedFit& fit, const ModelConfig& model, double tokens,
                                      const std::string& source) {
  if (!(tokens > 0 && std::isfinite(tokens)))
    throw Error("--tokens must be a positive number of training tokens, e.g. --tokens 2e9");
  if (fit.law == LawKind::Isoflop)
    throw Error("predict needs a parametric law (chinchilla, granularity, sparsity); an isoflop fit only describes "
                "its own budgets (see \"budgets\" in fit.json, or `moelab optimize`)");
  const ParameterCounts counts = count_parameters(model);
  Observation x;
  x.N = parameter_count(model, fit.param_count);
  x.D = tokens;
  x.G = static_cast<double>(counts.granularity);
  x.S = counts.sparsity;
  x.A = static_cast<double>(counts.active);
  x.E = std::max<double>(1, static_cast<double>(counts.routed_experts));
  nlohmann::ordered_json r;
  r["law"] = to_string(fit.law);
  r["config"] = source;
  r["N"] = x.N;
  r["param_count"] = fit.param_count;
  r["D"] = tokens;
  if (fit.law == LawKind::Granularity) r["G"] = x.G;
  if (fit.law == LawKind::Sparsity) r["S"] = x.S;
  if (fit.law == LawKind::Joint || fit.law == LawKind::Clark) r["N_active"] = x.A, r["E"] = x.E;
  r["loss"] = law_loss(fit.law, fit.theta, x);
  {
    std::vector<std::pair<std::string, double>> at = {{"N", x.N}, {"D", x.D}};
    if (fit.law == LawKind::Joint || fit.law == LawKind::Clark) at = {{"A", x.A}, {"E", x.E}, {"D", x.D}};
    if (fit.law == LawKind::Sparsity) at.push_back({"S", x.S});
    if (fit.law == LawKind::Granularity) at.push_back({"G", x.G});
    const auto warnings = extrapolation_warnings(fit.document, at);
    if (!warnings.empty()) r["warnings"] = warnings;
  }
  if (!fit.samples.empty()) {
    std::vector<double> v;
    for (const auto& t : fit.samples) v.push_back(law_loss(fit.law, t, x));
    r["interval"] = percentile_json(v);
  }
  return r;
}

}  // namespace moelab
