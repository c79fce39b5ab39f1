#include "report/findings.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <map>
#include <tuple>

#include "core/format.h"
#include "scaling/arms.h"
#include "scaling/fit.h"

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
  return {"inconclusive", "not measured at some budget"};  // a mix of reproduced and not measured
}

// The budget of `seen` within a relative 1e-6 of b, or b itself, added to `seen`: runs of one planned budget differ
// by less than a step's FLOPs, and their planned budgets compare equal only up to rounding.
double snap_budget(std::vector<double>& seen, double b) {
  for (double x : seen)
    if (std::fabs(x - b) <= 1e-6 * b) return x;
  seen.push_back(b);
  return b;
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
  std::vector<std::vector<double>> groups_of_runs;
  for (auto& [key, v] : by) groups_of_runs.push_back(std::move(v));
  const ReplicateNoise noise = pooled_spread(groups_of_runs);
  if (groups) *groups = noise.groups;
  return noise.pooled_sd;
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
      measured += (measured.empty() ? "" : "; ") + std::string("C ") + fmt("%.3g", b["C"].get<double>()) + ": " +
                  b["best_dense"]["name"].get<std::string>() + " " + fmt("%.4f", b["best_dense"]["loss"].get<double>()) +
                  " - " + b["best_moe"]["name"].get<std::string>() + " " +
                  fmt("%.4f", b["best_moe"]["loss"].get<double>()) + " = " + fmt("%+.4f", d) +
                  (std::isfinite(sd) ? " ± " + fmt("%.4f", threshold(sd)) : "");
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
          if (s.plan.kind != "isoflop") continue;  // the pair comes from the IsoFLOP runs; names repeat across sweeps
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

  // 3. MoE gains less from fine-tuning (fairseq): the accuracy gain of fine-tuning (after - before, on the same
  // test items) of the dense and the MoE run of the largest budget that has both.
  {
    struct Tuned {
      const RunResult* run;
      const DownstreamRecord* rec;
    };
    std::map<double, std::pair<std::vector<Tuned>, std::vector<Tuned>>> by_budget;  // C -> (dense, MoE)
    for (const auto& s : study.sweeps) {
      std::map<std::string, const RunResult*> by_name;
      for (const auto& r : s.results) by_name[r.name] = &r;
      for (const auto& d : s.downstream) {
        if (d.mode != "finetune" || !d.finetune.contains("before")) continue;
        const auto it = by_name.find(d.run);
        if (it == by_name.end() || !ok(*it->second, column)) continue;
        // Runs without a FLOP budget are ordered by their FLOPs, so the last group is the largest either way.
        const double key = it->second->budget > 0 ? it->second->budget : it->second->flops;
        auto& slot = by_budget[key];
        (it->second->experts > 0 ? slot.second : slot.first).push_back({it->second, &d});
      }
    }
    std::pair<std::string, std::string> verdict{"not measured", "no dense and MoE run of one budget were fine-tuned "
                                                                "(moelab sweep finetune)"};
    std::string measured = "the study fine-tunes no runs", interval = spread;
    for (auto it = by_budget.rbegin(); it != by_budget.rend(); ++it) {
      auto& [dense, moe] = it->second;
      if (dense.empty() || moe.empty()) continue;
      auto best = [&](std::vector<Tuned>& v) {
        return *std::min_element(v.begin(), v.end(), [&](const Tuned& a, const Tuned& b) {
          return loss(*a.run, column) < loss(*b.run, column);
        });
      };
      const Tuned d = best(dense), m = best(moe);
      const auto& db = d.rec->finetune["before"];
      const auto& mb = m.rec->finetune["before"];
      const double gd = d.rec->acc - db["acc"].get<double>(), gm = m.rec->acc - mb["acc"].get<double>();
      measured = d.rec->task + " (" + std::to_string(d.rec->n) + " test items), " + d.run->name + " vs " +
                 m.run->name + ": dense " + fmt("%.3f", db["acc"].get<double>()) + " -> " + fmt("%.3f", d.rec->acc) +
                 " (" + fmt("%+.3f", gd) + "), MoE " + fmt("%.3f", mb["acc"].get<double>()) + " -> " +
                 fmt("%.3f", m.rec->acc) + " (" + fmt("%+.3f", gm) + "); dense gain - MoE gain = " + fmt("%+.3f", gd - gm);
      // Judged per item: item i's dense gain (after - before, each 0 or 1) minus its MoE gain, paired over the
      // same test items, never four accuracies taken as independent.
      const std::string before_d = db.value("correct", ""), before_m = mb.value("correct", "");
      const std::string& after_d = d.rec->correct;
      const std::string& after_m = m.rec->correct;
      const size_t n = after_d.size();
      if (n == 0 || before_d.size() != n || before_m.size() != n || after_m.size() != n) {
        interval = "no per-item results";
        verdict = {"inconclusive", "these fine-tuning records predate per-item results (moelab sweep finetune "
                                   "records them now); four accuracies are not judged as if independent"};
        break;
      }
      std::vector<double> diffs(n);
      int64_t up_d = 0, down_d = 0, up_m = 0, down_m = 0;  // discordant items (McNemar's b and c) per arm
      for (size_t i = 0; i < n; ++i) {
        const int dd = (after_d[i] == '1') - (before_d[i] == '1'), dm = (after_m[i] == '1') - (before_m[i] == '1');
        up_d += dd > 0, down_d += dd < 0, up_m += dm > 0, down_m += dm < 0;
        diffs[i] = dd - dm;
      }
      const PairedMean p = paired_mean(diffs);
      measured += "; items turned right / wrong by fine-tuning: dense " + std::to_string(up_d) + " / " +
                  std::to_string(down_d) + ", MoE " + std::to_string(up_m) + " / " + std::to_string(down_m);
      interval = "paired over " + std::to_string(n) + " items: 95% interval [" + fmt("%+.3f", p.lo) + ", " +
                 fmt("%+.3f", p.hi) + "], detectable effect " + fmt("%.3f", p.mde);
      const Verdict v = judge_positive(p.estimate, p.lo, p.hi, p.mde);
      verdict = {v.verdict, v.why};
      break;
    }
    out.push_back(finding("finetune", "MoE gains less than dense from fine-tuning", "fairseq MoE vs dense", measured,
                          interval, verdict));
  }

  // 4. Optimal G > 1 and growing with budget (Krajewski): the measured best G per budget, judged against G = 1 and
  // against the smaller budget's G* at the largest budget.
  ojson warnings = ojson::array();
  {
    const auto& rows = summary.value("granularity_optimum", ojson::array());
    std::string measured;
    std::vector<std::pair<std::string, std::string>> above;
    auto loss_at = [](const ojson& row, double G) {
      for (const auto& p : row["curve_at_best_shape"])
        if (p["G"].get<double>() == G) return p["loss"].get<double>();
      return kNaN;
    };
    for (const auto& row : rows) {
      const bool by_c = row.contains("C");
      const double k = by_c ? row["C"].get<double>() : row["tokens"].get<double>();
      const double G = row["G_star"].get<double>();
      measured += (measured.empty() ? "" : "; ") + std::string(by_c ? "C " : "D ") + fmt("%.3g", k) + ": G* = " +
                  fmt("%g", G) + " (L " + fmt("%.4f", row["best"]["loss"].get<double>()) + ", G = 1 " +
                  fmt("%+.4f", loss_at(row, 1) - row["best"]["loss"].get<double>()) + ")";
      if (row.contains("law") && row["law"].contains("G_star"))
        measured += ", law G* = " + fmt("%g", row["law"]["G_star"].get<double>());
      above.push_back(G > 1 ? judge(loss_at(row, 1) - row["best"]["loss"].get<double>(), sd)
                            : std::pair<std::string, std::string>{"not reproduced", "G* = 1"});
      if (row["on_edge"].get<bool>())
        warnings.push_back("the best granularity at " + std::string(by_c ? "C " : "D ") + fmt("%.3g", k) +
                           " is the largest measured (G = " + fmt("%g", G) +
                           "): the optimum may lie beyond it; add a larger G");
    }
    std::pair<std::string, std::string> verdict;
    if (rows.empty()) {
      verdict = {"not measured", "no granularity sweep"};
    } else {
      const auto first = all_of(above);
      if (first.first != "reproduced") {
        verdict = {first.first, "G* > 1: " + first.second};
      } else if (rows.size() < 2) {
        verdict = {"inconclusive", "G* > 1, but growth needs two or more budgets"};
      } else {
        const double g0 = rows.front()["G_star"].get<double>(), g1 = rows.back()["G_star"].get<double>();
        const double d = loss_at(rows.back(), g0) - rows.back()["best"]["loss"].get<double>();
        const auto j = judge(d, sd);
        if (g1 == g0) verdict = {"inconclusive", "G* > 1 at every budget but the same G* (" + fmt("%g", g0) + ") at both ends"};
        else if (j.first != "reproduced")
          verdict = {"inconclusive", "G* > 1 at every budget; G* moves from " + fmt("%g", g0) + " to " + fmt("%g", g1) +
                                         " but " + j.second};
        else if (g1 > g0) verdict = {"reproduced", "G* > 1 at every budget and grows from " + fmt("%g", g0) + " to " +
                                                      fmt("%g", g1) + " (" + j.second + ")"};
        else verdict = {"not reproduced", "G* falls from " + fmt("%g", g0) + " to " + fmt("%g", g1) + " (" + j.second + ")"};
      }
    }
    out.push_back(finding("granularity", "The optimal granularity is above 1 and grows with the budget",
                          "Krajewski et al. 2024", measured.empty() ? "-" : measured, spread, verdict));
  }

  // 5. Loss vs S at fixed total parameters is U-shaped (Abnar): the lowest loss at an inner S, with both ends above it.
  {
    const auto& groups = summary.value("fixed_params", ojson::array());
    std::string measured;
    std::vector<std::pair<std::string, std::string>> verdicts;
    for (const auto& g : groups) {
      const auto& pts = g["points"];
      if (pts.size() < 3) continue;
      const double L0 = pts.front()["loss"].get<double>(), L1 = pts.back()["loss"].get<double>();
      const double Ls = g["L_star"].get<double>(), S = g["S_star"].get<double>();
      std::string curve;
      for (const auto& p : pts)
        curve += (curve.empty() ? "" : ", ") + fmt("%.3g", p["sparsity"].get<double>()) + ": " +
                 fmt("%.4f", p["loss"].get<double>());
      const std::string where = "N " + fmt("%.3g", g["params"].get<double>()) +
                                (g.contains("C") ? " at C " + fmt("%.3g", g["C"].get<double>())
                                                 : " at D " + fmt("%.3g", g["tokens"].get<double>()));
      measured += (measured.empty() ? "" : "; ") + where + ": L(S) = " + curve + "; lowest at S " + fmt("%.3g", S) +
                  ", ends " + fmt("%+.4f", L0 - Ls) + " / " + fmt("%+.4f", L1 - Ls);
      if (g["on_edge"].get<bool>()) {
        warnings.push_back("at fixed total parameters (" + where + ") the lowest loss is at the " +
                           (S == pts.front()["sparsity"].get<double>() ? "densest" : "sparsest") +
                           " measured S: the bottom of the U may lie beyond the sparsity range");
        const double other = S == pts.front()["sparsity"].get<double>() ? L1 - Ls : L0 - Ls;
        const auto j = judge(other, sd);
        verdicts.push_back(j.first == "reproduced"
                               ? std::pair<std::string, std::string>{"not reproduced", "monotone in S: the lowest loss is at an end, the other end " + j.second}
                               : std::pair<std::string, std::string>{"inconclusive", "lowest at an end of the S range, and " + j.second});
      } else {
        const auto j = judge(std::min(L0, L1) - Ls, sd);
        verdicts.push_back({j.first, "lowest at an inner S, both ends above it: " + j.second});
      }
    }
    out.push_back(finding("fixed_n_u_shape", "At fixed total parameters, loss against sparsity is U-shaped",
                          "Abnar et al. 2025", measured.empty() ? "the study has no fixed-parameter sweep" : measured,
                          spread, verdicts.empty() ? std::pair<std::string, std::string>{"not measured", "no fixed_params sweep with 3 or more sparsity levels"}
                                                   : all_of(verdicts)));
  }

  // 6. Sparser is better at fixed FLOPs (Abnar): the best loss at the sparsest level against dense, per budget.
  {
    std::map<double, std::map<double, double>> best;  // C -> S -> best loss
    std::vector<double> seen;
    for (const auto& s : study.sweeps) {
      if (s.plan.kind != "isoflop") continue;
      for (const auto& r : s.results) {
        if (!ok(r, column) || !(r.budget > 0)) continue;
        auto& slot = best[snap_budget(seen, r.budget)];
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
  // (a) The measured IsoFLOP curves: at each budget and sparsity, the best shape must not be the smallest or the
  // largest of that budget's ladder (losses averaged over seeds).
  {
    std::map<std::pair<double, double>, std::map<int64_t, std::vector<double>>> curves;  // (C, S) -> N -> losses
    std::vector<double> seen;
    for (const auto& s : study.sweeps) {
      if (s.plan.kind != "isoflop") continue;
      for (const auto& r : s.results) {
        if (!ok(r, column) || !(r.budget > 0)) continue;
        curves[{snap_budget(seen, r.budget), r.sparsity}][r.nonembedding_params].push_back(loss(r, column));
      }
    }
    for (const auto& [cs, by_n] : curves) {
      if (by_n.size() < 3) continue;
      int64_t best_n = 0;
      double best_l = INFINITY;
      for (const auto& [n, v] : by_n) {
        double m = 0;
        for (double x : v) m += x;
        m /= static_cast<double>(v.size());
        if (m < best_l) best_l = m, best_n = n;
      }
      if (best_n == by_n.begin()->first || best_n == by_n.rbegin()->first)
        warnings.push_back("the IsoFLOP curve at C " + fmt("%.3g", cs.first) + ", S " + fmt("%.3g", cs.second) +
                           " is lowest at the " + (best_n == by_n.begin()->first ? "smallest" : "largest") +
                           " shape of its ladder (N " + fmt("%.3g", static_cast<double>(best_n)) +
                           "): the optimum is not bracketed; widen the ladder");
    }
  }
  // (b) The fitted IsoFLOP surface's N*.
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
