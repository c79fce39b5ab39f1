#include "report/findings.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <map>
#include <tuple>

#include "core/format.h"

namespace moelab {
using ojson = nlohmann::ordered_json;

namespace {

constexpr double kNaN = std::numeric_limits<double>::quiet_NaN();

double loss(const RunResult& r, const std::string& column) {
  return column == "val_loss" ? r.val_loss : column == "loss" ? r.loss : r.smoothed_loss;
}

bool ok(const RunResult& r, const std::string& column) { return r.status == "ok" && std::isfinite(loss(r, column)); }

// "d ± 2 sqrt(2) sd": a difference of two single runs is significant beyond that.
double threshold(double sd) { return 2 * std::sqrt(2.0) * sd; }

// The verdict on a difference that the claim says is positive.
std::pair<std::string, std::string> judge(double d, double sd) {
  if (!std::isfinite(d)) return {"not measured", ""};
  if (!std::isfinite(sd))
    return {"inconclusive", std::string(d > 0 ? "the direction agrees" : "the direction disagrees") +
                                " on a single seed; no replicate seeds to size the noise"};
  if (d > threshold(sd)) return {"reproduced", "beyond 2 sqrt(2) seed sd (" + fmt("%.3g", threshold(sd)) + ")"};
  if (d < -threshold(sd)) return {"not reproduced", "the opposite, beyond 2 sqrt(2) seed sd"};
  return {"inconclusive", "within 2 sqrt(2) seed sd (" + fmt("%.3g", threshold(sd)) + ") of no difference"};
}

ojson finding(const std::string& id, const std::string& claim, const std::string& source, const std::string& measured,
              const std::string& spread, const std::pair<std::string, std::string>& verdict) {
  return {{"id", id},           {"claim", claim},      {"source", source},          {"measured", measured},
          {"spread", spread},   {"verdict", verdict.first}, {"why", verdict.second}};
}

// Combines per-budget verdicts: reproduced only if every budget is, not reproduced if any is, else inconclusive.
std::pair<std::string, std::string> all_of(const std::vector<std::pair<std::string, std::string>>& v) {
  if (v.empty()) return {"not measured", ""};
  bool all = true, any_not = false;
  for (const auto& x : v) all &= x.first == "reproduced", any_not |= x.first == "not reproduced";
  if (all) return {"reproduced", "at every budget (" + v.front().second + ")"};
  if (any_not) return {"not reproduced", "at some budget: " + v.front().second};
  for (const auto& x : v)
    if (x.first == "inconclusive") return x;
  return v.front();
}

}  // namespace

double seed_spread(const Study& study, const std::string& column, size_t* groups) {
  // A configuration: everything the results store says about a run but its seed and its losses.
  std::map<std::tuple<std::string, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t>, std::vector<double>> by;
  for (const auto& s : study.sweeps)
    for (const auto& r : s.results)
      if (ok(r, column))
        by[{s.label, r.d_model, r.n_layers, r.experts, r.top_k, r.granularity, r.tokens, r.params}].push_back(
            loss(r, column));
  double ss = 0, dof = 0;
  size_t n = 0;
  for (const auto& [key, v] : by) {
    if (v.size() < 2) continue;
    double m = 0;
    for (double x : v) m += x;
    m /= static_cast<double>(v.size());
    for (double x : v) ss += (x - m) * (x - m);
    dof += static_cast<double>(v.size() - 1);
    ++n;
  }
  if (groups) *groups = n;
  return dof > 0 ? std::sqrt(ss / dof) : kNaN;
}

ojson study_findings(const Study& study, const ojson& summary, const std::string& column) {
  size_t groups = 0;
  const double sd = seed_spread(study, column, &groups);
  const std::string spread = std::isfinite(sd) ? "seed sd " + fmt("%.3g", sd) + " (" + std::to_string(groups) +
                                                     " replicated configurations)"
                                               : "no replicate seeds";
  ojson out = ojson::array();

  // 1. MoE beats dense at equal FLOPs, and by how much (fairseq; Abnar).
  {
    std::vector<std::pair<std::string, std::string>> verdicts;
    std::string measured;
    for (const auto& b : summary.value("per_budget", ojson::array())) {
      if (b["best_dense"].is_null() || b["best_moe"].is_null()) continue;
      const double d = b["best_dense"]["loss"].get<double>() - b["best_moe"]["loss"].get<double>();
      verdicts.push_back(judge(d, sd));
      measured += (measured.empty() ? "" : "; ") + std::string("C ") + fmt("%.3g", b["C"].get<double>()) +
                  ": dense - MoE = " + fmt("%+.4f", d);
    }
    const auto& m = summary.value("compute_multiplier", ojson::object());
    if (m.contains("per_budget") && !m["per_budget"].empty())
      measured += "; compute multiplier at the largest budget " +
                  fmt("%.2f", m["per_budget"].back()["multiplier"].get<double>()) + "x";
    out.push_back(finding("moe_beats_dense", "MoE beats dense at equal training FLOPs (and needs less compute for a loss)",
                          "fairseq MoE vs dense; Abnar et al.", measured.empty() ? "no budget with both" : measured,
                          spread, all_of(verdicts)));
  }

  // 2. The gap by domain: MoE gains less out of domain (fairseq).
  {
    const auto& pb = summary.value("per_budget", ojson::array());
    std::pair<std::string, std::string> verdict{"not measured", "no budget with a dense and an MoE run"};
    std::string measured = "-";
    if (!pb.empty() && !pb.back()["best_dense"].is_null() && !pb.back()["best_moe"].is_null()) {
      const std::string dense_name = pb.back()["best_dense"]["name"], moe_name = pb.back()["best_moe"]["name"];
      const RunResult *dense = nullptr, *moe = nullptr;
      for (const auto& s : study.sweeps)
        for (const auto& r : s.results) {
          if (r.name == dense_name) dense = &r;
          if (r.name == moe_name) moe = &r;
        }
      if (dense && moe && std::isfinite(dense->val_loss) && std::isfinite(moe->val_loss) && !moe->ood_losses.empty()) {
        const double in = dense->val_loss - moe->val_loss;
        measured = "in domain (val) " + fmt("%+.4f", in);
        double worst = INFINITY;
        for (const auto& [name, l] : moe->ood_losses) {
          const auto it = dense->ood_losses.find(name);
          if (it == dense->ood_losses.end()) continue;
          const double g = it->second - l;
          measured += ", " + name + " " + fmt("%+.4f", g);
          worst = std::min(worst, in - g);
        }
        // The claim: the in-domain gain exceeds the out-of-domain one on every set.
        verdict = std::isfinite(worst) ? judge(worst, sd) : verdict;
        measured = "dense - MoE loss at C " + fmt("%.3g", pb.back()["C"].get<double>()) + ": " + measured;
      }
    }
    out.push_back(finding("gap_by_domain", "MoE's advantage is smaller out of domain than in domain",
                          "fairseq MoE vs dense", measured, spread, verdict));
  }

  // 3. MoE gains less from fine-tuning (fairseq).
  out.push_back(finding("finetune", "MoE gains less than dense from fine-tuning", "fairseq MoE vs dense",
                        "the study fine-tunes no runs", spread, {"not measured", "no fine-tuning stage yet"}));

  // 4. Optimal G > 1 and growing with budget (Krajewski).
  {
    std::map<double, std::pair<double, double>> best;  // flops -> (loss, G) over MoE runs
    for (const auto& g : summary.value("granularity", ojson::array())) {
      if (g["experts"].get<int64_t>() == 0) continue;
      const double f = g["flops"].get<double>(), L = g["loss"].get<double>();
      double key = f;
      for (const auto& [k, v] : best)
        if (std::fabs(k - f) <= 0.05 * f) key = k;
      if (!best.count(key) || L < best[key].first) best[key] = {L, g["granularity"].get<double>()};
    }
    std::string measured;
    bool above_one = !best.empty(), growing = true;
    double prev = 0;
    for (const auto& [f, v] : best) {
      measured += (measured.empty() ? "" : "; ") + std::string("C ") + fmt("%.3g", f) + ": G* = " + fmt("%g", v.second);
      above_one &= v.second > 1;
      growing &= v.second >= prev;
      prev = v.second;
    }
    std::pair<std::string, std::string> verdict;
    if (best.empty()) verdict = {"not measured", "no granularity sweep"};
    else if (!above_one) verdict = {"not reproduced", "G* = 1 at some budget"};
    else if (best.size() < 2) verdict = {"inconclusive", "G* > 1, but growth needs two or more budgets"};
    else if (!std::isfinite(sd)) verdict = {"inconclusive", std::string(growing ? "the direction agrees" : "G* does not grow") +
                                                                " on a single seed; no replicate seeds to size the noise"};
    else verdict = growing ? std::pair<std::string, std::string>{"reproduced", "G* > 1 and non-decreasing"}
                           : std::pair<std::string, std::string>{"not reproduced", "G* does not grow with budget"};
    out.push_back(finding("granularity", "The optimal granularity is above 1 and grows with the budget",
                          "Krajewski et al. 2024", measured.empty() ? "-" : measured, spread, verdict));
  }

  // 5. Loss vs S at fixed total parameters is U-shaped (Abnar).
  {
    bool has = false;
    for (const auto& s : study.sweeps) has |= s.plan.kind == "fixed_params";
    out.push_back(finding("fixed_n_u_shape", "At fixed total parameters, loss against sparsity is U-shaped",
                          "Abnar et al. 2025", has ? "see the fixed-parameter sweep" : "the study has no fixed-parameter sweep",
                          spread, {"not measured", has ? "not analysed yet" : "no fixed_params sweep"}));
  }

  // 6. Sparser is better at fixed FLOPs (Abnar): the best loss at the sparsest level against dense, per budget.
  {
    std::map<double, std::map<double, double>> best;  // C -> S -> best loss
    for (const auto& s : study.sweeps) {
      if (s.plan.kind != "isoflop") continue;
      for (const auto& r : s.results) {
        if (!ok(r, column) || !(r.budget > 0)) continue;
        double key = r.budget;
        for (const auto& [k, v] : best)
          if (std::fabs(k - r.budget) <= 1e-6 * r.budget) key = k;
        auto& slot = best[key];
        const double L = loss(r, column);
        if (!slot.count(r.sparsity) || L < slot[r.sparsity]) slot[r.sparsity] = L;
      }
    }
    std::vector<std::pair<std::string, std::string>> verdicts;
    std::string measured;
    for (const auto& [C, by_s] : best) {
      if (by_s.size() < 2) continue;
      const double d = by_s.begin()->second - by_s.rbegin()->second;  // least sparse - most sparse
      verdicts.push_back(judge(d, sd));
      measured += (measured.empty() ? "" : "; ") + std::string("C ") + fmt("%.3g", C) + ": S " +
                  fmt("%.3g", by_s.begin()->first) + " -> " + fmt("%.3g", by_s.rbegin()->first) + " changes L by " +
                  fmt("%+.4f", -d);
    }
    out.push_back(finding("sparser_better", "At fixed training FLOPs, sparser models reach lower loss",
                          "Abnar et al. 2025", measured.empty() ? "-" : measured, spread, all_of(verdicts)));
  }

  // Optima on the edge of the measured range: an extrapolation, flagged.
  ojson warnings = ojson::array();
  const auto& iso = summary.value("isoflop_fit", ojson::object());
  for (const auto& b : iso.value("budgets", ojson::array())) {
    const double n = b["N_star"].get<double>(), lo = b["box"]["N"][0].get<double>(), hi = b["box"]["N"][1].get<double>();
    if (n <= lo * 1.02 || n >= hi / 1.02)
      warnings.push_back("the IsoFLOP optimum at C " + fmt("%.3g", b["C"].get<double>()) + " lies on the " +
                         (n <= lo * 1.02 ? "smallest" : "largest") +
                         " measured shape: N* is an extrapolation; widen the shape ladder");
  }
  return {{"claims", out}, {"edge_warnings", warnings}, {"seed_sd", std::isfinite(sd) ? ojson(sd) : ojson(nullptr)}};
}

}  // namespace moelab
