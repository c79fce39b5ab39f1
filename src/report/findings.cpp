#include "report/findings.h"

#include <algorithm>
#include <cmath>
#include <functional>
#include <limits>
#include <map>
#include <set>
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

ojson number_or_null(double x) { return std::isfinite(x) ? ojson(x) : ojson(nullptr); }

// What a claim's verdict rests on: an estimate (positive: the claim's direction), its 95% interval, the smallest
// effect the design detects (80% power, 5% two-sided), and how many runs and replicates each arm had.
struct Evidence {
  double estimate = kNaN, lo = kNaN, hi = kNaN, mde = kNaN;
  std::string unit = "nats";
  ojson n_per_arm = ojson::object();
  ojson details = ojson::array();  // per budget (or per set): the same numbers, one object each
};

Claim finding(const std::string& id, const std::string& claim, const std::string& source, const std::string& measured,
              const std::string& spread, const Verdict& verdict, const Evidence& e) {
  Claim c;
  c.id = id, c.claim = claim, c.source = source, c.measured = measured, c.spread = spread;
  c.verdict = verdict.verdict, c.why = verdict.why;
  c.estimate = e.estimate, c.lo = e.lo, c.hi = e.hi, c.detectable_effect = e.mde;
  c.unit = e.unit;
  c.n_per_arm = e.n_per_arm;
  c.details = e.details;
  return c;
}

std::string interval_text(const PairedMean& p, const char* format = "%+.4f") {
  if (!std::isfinite(p.estimate)) return "- (no replicate covers every run it needs)";
  if (!std::isfinite(p.lo)) return fmt(format, p.estimate) + " (no interval: fewer than 2 replicates)";
  return fmt(format, p.estimate) + " [" + fmt(format, p.lo) + ", " + fmt(format, p.hi) + "]";
}

ojson evidence_json(const PairedMean& p) {
  return {{"estimate", number_or_null(p.estimate)},
          {"interval", ojson::array({number_or_null(p.lo), number_or_null(p.hi)})},
          {"detectable_effect", number_or_null(p.mde)},
          {"replicates", p.n}};
}

// The budget of `seen` within a relative 1e-6 of b, or b itself, added to `seen`: runs of one planned budget differ
// by less than a step's FLOPs, and their planned budgets compare equal only up to rounding.
double snap_budget(std::vector<double>& seen, double b) {
  for (double x : seen)
    if (std::fabs(x - b) <= 1e-6 * b) return x;
  seen.push_back(b);
  return b;
}

// log2 of the expansion 1 / (1 - S): 0 for dense, log2 E for top-1 of E experts; the axis along which the
// studies vary sparsity.
double sparsity_axis(double S) { return -std::log2(std::max(1e-12, 1 - S)); }

// An arm of the IsoFLOP sweeps at one budget: the runs of one sparsity, granularity and top-k over the budget's
// shape ladder, every replicate.
struct ArmKey {
  double sparsity;
  int64_t experts, top_k, granularity;
  bool operator<(const ArmKey& o) const {
    return std::tie(sparsity, experts, top_k, granularity) < std::tie(o.sparsity, o.experts, o.top_k, o.granularity);
  }
  std::string label() const {
    return experts == 0 ? std::string("dense")
                        : "S " + fmt("%.4g", sparsity) + " (" + std::to_string(experts) + " experts, top-" +
                              std::to_string(top_k) + (granularity > 1 ? ", G " + std::to_string(granularity) : "") +
                              ")";
  }
};
using Arms = std::map<double, std::map<ArmKey, std::vector<const RunResult*>>>;  // budget -> arm -> runs

Arms isoflop_arms(const Study& study, const std::string& column) {
  Arms arms;
  std::vector<double> seen;
  for (const auto& s : study.sweeps) {
    if (s.plan.kind != "isoflop") continue;
    for (const auto& r : s.results)
      if (ok(r, column) && r.budget > 0)
        arms[snap_budget(seen, r.budget)][{r.sparsity, r.experts, r.top_k, r.granularity}].push_back(&r);
  }
  return arms;
}

// The runs as the comparison code sees them: a config per set of replicates (runs with one base name: one shape,
// differing only in their seeds), the data seed as the replicate index (runs with one data seed saw the same
// windows in the same order: they pair), x = log N. A second run of one config and data seed (a rerun under
// another name pattern) is left out rather than counted twice.
using LossOf = std::function<double(const RunResult&)>;
std::vector<ArmRun> arm_runs(const std::vector<const RunResult*>& runs, const LossOf& loss_of) {
  std::map<std::string, int> config;
  std::set<std::pair<int, int>> seen;
  std::vector<ArmRun> out;
  for (const auto* r : runs) {
    const double L = loss_of(*r);
    if (!std::isfinite(L)) continue;
    const int c = config.emplace(replicate_base_name(*r), static_cast<int>(config.size())).first->second;
    if (!seen.insert({c, static_cast<int>(r->data_seed)}).second) continue;
    out.push_back({c, static_cast<int>(r->data_seed), std::log(static_cast<double>(r->nonembedding_params)), L});
  }
  return out;
}

ojson arm_count(const std::vector<ArmRun>& runs) {
  std::set<int> configs, replicates;
  for (const auto& r : runs) configs.insert(r.config), replicates.insert(r.replicate);
  return {{"runs", runs.size()}, {"shapes", configs.size()}, {"replicates", replicates.size()}};
}

// The MoE arm of a budget whose minimum, fitted to all its runs, is lowest (the study's best sparsity there).
const std::pair<const ArmKey, std::vector<const RunResult*>>* best_moe_arm(
    const std::map<ArmKey, std::vector<const RunResult*>>& arms, const LossOf& loss_of) {
  const std::pair<const ArmKey, std::vector<const RunResult*>>* best = nullptr;
  double best_loss = INFINITY;
  for (const auto& arm : arms) {
    if (arm.first.experts == 0) continue;
    const auto runs = arm_runs(arm.second, loss_of);
    if (runs.empty()) continue;
    const double L = fit_arm_minimum(runs).loss;
    if (L < best_loss) best_loss = L, best = &arm;
  }
  return best;
}

// The mean over `per_key` maps (e.g. budgets) of each replicate's value, for the replicates every map has.
std::vector<double> mean_over_keys(const std::vector<std::map<int, double>>& per_key) {
  std::vector<double> out;
  if (per_key.empty()) return out;
  for (const auto& [replicate, v] : per_key.front()) {
    double sum = 0;
    bool all = true;
    for (const auto& m : per_key) {
      const auto it = m.find(replicate);
      if (it == m.end()) { all = false; break; }
      sum += it->second;
    }
    if (all) out.push_back(sum / static_cast<double>(per_key.size()));
  }
  return out;
}

std::map<int, double> by_replicate(const ArmComparison& c) {
  std::map<int, double> m;
  for (size_t i = 0; i < c.replicate_ids.size(); ++i) m[c.replicate_ids[i]] = c.per_replicate[i];
  return m;
}

Verdict not_measured(const std::string& why) { return {"not measured", why}; }

// A PairedMean moved to another centre: the estimate of pooled fits, with the spread of the per-replicate values
// (se, interval half-widths, detectable effect) kept. The per-replicate values' own mean can sit away from the
// pooled fits where a replicate's curve is too noisy for its own minimum (a parabola through 3 noisy points).
PairedMean recentred(PairedMean p, double centre) {
  if (!std::isfinite(centre) || !std::isfinite(p.estimate)) return p;
  p.lo += centre - p.estimate, p.hi += centre - p.estimate;
  p.estimate = centre;
  return p;
}

// A claim judged on the mean over budgets, replicate by replicate (each map: replicate -> the budget's estimate):
// its t interval (centred on `centre`, the mean of the budgets' pooled estimates, when given), the verdict, and
// "inconclusive" when it is positive on average but the opposite at some budget. Fills the evidence and appends
// the pooled estimate to `measured`.
Verdict judge_mean_over_budgets(const std::vector<std::map<int, double>>& per_budget,
                                const std::vector<std::pair<std::string, Verdict>>& parts, Evidence& e,
                                std::string& measured, double centre = kNaN) {
  const PairedMean pooled = recentred(paired_mean(mean_over_keys(per_budget)), centre);
  e.estimate = pooled.estimate, e.lo = pooled.lo, e.hi = pooled.hi, e.mde = pooled.mde;
  measured += "; mean over " + std::to_string(parts.size()) + " budgets " + interval_text(pooled);
  Verdict verdict = judge_positive(pooled.estimate, pooled.lo, pooled.hi, pooled.mde);
  if (verdict.verdict == "reproduced")
    for (const auto& [where, v] : parts)
      if (v.verdict == "not reproduced") verdict = {"inconclusive", "positive on average but the opposite at " + where};
  verdict.why = pooled.n == 0 ? "no replicate seed covers every shape of every arm at every budget (plan the "
                                "sweep with [sweep] seeds = [1, 2, 3])"
                              : "mean over budgets, paired by replicate: " + verdict.why;
  return verdict;
}

// Combines the verdicts of parts (budgets, sets): reproduced if all are, not reproduced if any is, else
// inconclusive (the first inconclusive part's reason).
Verdict all_of(const std::vector<std::pair<std::string, Verdict>>& parts) {
  if (parts.empty()) return not_measured("nothing to judge");
  bool all = true;
  for (const auto& [where, v] : parts) all &= v.verdict == "reproduced";
  if (all)
    return {"reproduced", "in all " + std::to_string(parts.size()) + " (" + parts.front().first + ": " +
                              parts.front().second.why + (parts.size() > 1 ? "; ..." : "") + ")"};
  for (const auto& [where, v] : parts)
    if (v.verdict == "not reproduced") return {"not reproduced", where + ": " + v.why};
  for (const auto& [where, v] : parts)
    if (v.verdict == "inconclusive") return {"inconclusive", where + ": " + v.why};
  return {"inconclusive", "not measured everywhere"};
}

}  // namespace

double seed_spread(const Study& study, const std::string& column, size_t* groups) {
  // A configuration: the runs of one sweep with one base name (they differ only in their seeds).
  std::map<std::pair<std::string, std::string>, std::vector<double>> by;
  for (const auto& s : study.sweeps)
    for (const auto& r : s.results)
      if (ok(r, column)) by[{s.label, replicate_base_name(r)}].push_back(loss(r, column));
  std::vector<std::vector<double>> groups_of_runs;
  for (auto& [key, v] : by) groups_of_runs.push_back(std::move(v));
  const ReplicateNoise noise = pooled_spread(groups_of_runs);
  if (groups) *groups = noise.groups;
  return noise.pooled_sd;
}

namespace {

struct Context {
  const Study& study;
  const StudySummary& summary;
  std::string column;
  std::string spread;
  std::vector<std::string> warnings;
  std::vector<PairingRow> pairing;
  LossOf in_domain() const {
    return [c = column](const RunResult& r) { return loss(r, c); };
  }
};

// 1. MoE beats dense at equal FLOPs (fairseq; Abnar): per budget, dense's IsoFLOP minimum minus the best MoE arm's,
// each fitted to all its runs, paired by replicate; judged on the mean over budgets, replicate by replicate. With
// the compute multiplier: the dense compute that reaches the MoE minimum of the largest budget, per replicate.
Claim claim_moe_beats_dense(Context& ctx) {
  const Arms arms = isoflop_arms(ctx.study, ctx.column);
  Evidence e;
  std::string measured;
  std::vector<std::map<int, double>> per_budget;
  std::vector<std::pair<std::string, Verdict>> parts;
  ojson n = ojson::object();
  std::map<int, std::vector<std::pair<double, double>>> dense_minima;  // replicate -> (log C, dense minimum)
  std::map<int, double> moe_at_top;
  std::vector<double> pooled_estimates;  // per paired budget: the difference of the minima fitted to all runs
  double top_C = kNaN;
  for (const auto& [C, by_arm] : arms) {
    const auto dense_it = std::find_if(by_arm.begin(), by_arm.end(), [](const auto& a) { return a.first.experts == 0; });
    const auto* moe = best_moe_arm(by_arm, ctx.in_domain());
    if (dense_it == by_arm.end() || !moe) continue;
    const auto dense_runs = arm_runs(dense_it->second, ctx.in_domain());
    const auto moe_runs = arm_runs(moe->second, ctx.in_domain());
    const ArmComparison c = compare_arm_minima(dense_runs, moe_runs);
    const std::string where = "C " + fmt("%.3g", C);
    const Verdict v = judge_positive(c.estimate, c.lo, c.hi, c.mde);
    parts.push_back({where, v});
    measured += (measured.empty() ? "" : "; ") + where + ": dense " + fmt("%.4f", c.a.loss) + " - MoE " +
                moe->first.label() + " " + fmt("%.4f", c.b.loss) + " = " + fmt("%+.4f", c.estimate) +
                (std::isfinite(c.lo) ? " [" + fmt("%+.4f", c.lo) + ", " + fmt("%+.4f", c.hi) + "]" : "");
    e.details.push_back({{"C", C},
                         {"moe_arm", moe->first.label()},
                         {"dense_minimum", c.a.loss},
                         {"moe_minimum", c.b.loss},
                         {"estimate", c.estimate},
                         {"interval", ojson::array({number_or_null(c.lo), number_or_null(c.hi)})},
                         {"detectable_effect", number_or_null(c.mde)},
                         {"paired", c.paired},
                         {"n_per_arm", {{"dense", arm_count(dense_runs)}, {"moe", arm_count(moe_runs)}}},
                         {"minima_interior", {{"dense", c.a.interior}, {"moe", c.b.interior}}}});
    for (const auto& [arm, runs] : {std::pair{"dense", &dense_runs}, std::pair{"moe", &moe_runs}}) {
      ojson& slot = n[arm];
      if (slot.is_null()) slot = ojson::object();
      const ojson count = arm_count(*runs);
      slot["runs"] = slot.value("runs", int64_t{0}) + count["runs"].get<int64_t>();
      slot["budgets"] = slot.value("budgets", int64_t{0}) + 1;
      slot["replicates"] = count["replicates"];
    }
    if (c.paired) {
      per_budget.push_back(by_replicate(c));
      pooled_estimates.push_back(c.estimate);
      ctx.pairing.push_back({C, "dense - MoE " + moe->first.label(), c.per_replicate.size(), c.se, c.se_unpaired,
                             c.se * c.se / (c.se_unpaired * c.se_unpaired), c.correlation});
    }
    for (const auto& [r, m] : replicate_minima(dense_runs)) dense_minima[r].push_back({std::log(C), m.loss});
    moe_at_top.clear();
    for (const auto& [r, m] : replicate_minima(moe_runs)) moe_at_top[r] = m.loss;
    top_C = C;
  }
  e.n_per_arm = n;
  if (parts.empty()) {
    return finding("moe_beats_dense", "MoE beats dense at equal training FLOPs (and needs less compute for a loss)",
                   "fairseq MoE vs dense; Abnar et al.", "no budget with a dense and an MoE arm", ctx.spread,
                   not_measured("no IsoFLOP budget has both a dense and an MoE arm"), e);
  }
  double centre = 0;
  for (double x : pooled_estimates) centre += x / static_cast<double>(pooled_estimates.size());
  Verdict verdict = judge_mean_over_budgets(per_budget, parts, e, measured, pooled_estimates.empty() ? kNaN : centre);

  // The compute multiplier: per replicate, dense's minima against log C (a line over the budgets) and the C at
  // which that line reaches the MoE minimum of the largest budget, over that budget; the mean of its log over
  // replicates with a t interval.
  std::vector<double> log_mult;
  for (const auto& [r, pts] : dense_minima) {
    if (pts.size() < 2 || !moe_at_top.count(r)) continue;
    std::vector<double> x, y;
    for (const auto& [lc, l] : pts) x.push_back(lc), y.push_back(l);
    const Line line = fit_line(x, y);
    if (!(line.b < 0)) continue;
    log_mult.push_back((moe_at_top[r] - line.a) / line.b - std::log(top_C));
  }
  if (log_mult.size() >= 2 && log_mult.size() == dense_minima.size()) {
    const PairedMean m = paired_mean(log_mult);
    measured += "; compute multiplier at C " + fmt("%.3g", top_C) + ": " + fmt("%.2f", std::exp(m.estimate)) + "x [" +
                fmt("%.2f", std::exp(m.lo)) + ", " + fmt("%.2f", std::exp(m.hi)) + "] (dense's line through its " +
                "minima over budgets, per replicate)";
    e.details.push_back({{"compute_multiplier", std::exp(m.estimate)},
                         {"interval", ojson::array({number_or_null(std::exp(m.lo)), number_or_null(std::exp(m.hi))})},
                         {"C", top_C},
                         {"replicates", m.n}});
  }
  return finding("moe_beats_dense", "MoE beats dense at equal training FLOPs (and needs less compute for a loss)",
                 "fairseq MoE vs dense; Abnar et al.", measured, ctx.spread, verdict, e);
}

// 2. MoE's gain is smaller out of domain (fairseq): at the largest budget, dense - MoE minimum on validation minus
// the same on each out-of-domain set, per replicate (the same runs, so paired), judged per set.
Claim claim_gap_by_domain(Context& ctx) {
  const Arms arms = isoflop_arms(ctx.study, ctx.column);
  Evidence e;
  const std::string id = "gap_by_domain", claim = "MoE's advantage is smaller out of domain than in domain",
                    source = "fairseq MoE vs dense";
  for (auto it = arms.rbegin(); it != arms.rend(); ++it) {
    const auto& [C, by_arm] = *it;
    const auto dense_it = std::find_if(by_arm.begin(), by_arm.end(), [](const auto& a) { return a.first.experts == 0; });
    const auto* moe = best_moe_arm(by_arm, ctx.in_domain());
    if (dense_it == by_arm.end() || !moe) continue;
    std::set<std::string> sets;
    for (const auto* r : moe->second)
      for (const auto& [name, l] : r->ood_losses) sets.insert(name);
    if (sets.empty()) break;
    const auto in = compare_arm_minima(arm_runs(dense_it->second, ctx.in_domain()), arm_runs(moe->second, ctx.in_domain()));
    const auto in_by_r = by_replicate(in);
    std::string measured = "dense - MoE " + moe->first.label() + " minimum at C " + fmt("%.3g", C) +
                           ": in domain " + fmt("%+.4f", in.estimate);
    std::vector<std::pair<std::string, Verdict>> parts;
    for (const auto& set : sets) {
      const LossOf ood = [set](const RunResult& r) {
        const auto f = r.ood_losses.find(set);
        return f == r.ood_losses.end() ? kNaN : f->second;
      };
      const auto out = compare_arm_minima(arm_runs(dense_it->second, ood), arm_runs(moe->second, ood));
      std::vector<double> d;
      for (const auto& [r, g_out] : by_replicate(out))
        if (in_by_r.count(r)) d.push_back(in_by_r.at(r) - g_out);
      // Centred on the minima fitted to all runs (in.estimate - out.estimate), with the replicates' spread.
      const PairedMean p = recentred(paired_mean(d), in.estimate - out.estimate);
      measured += ", " + set + " " + fmt("%+.4f", out.estimate) + " (in - out " + interval_text(p) + ")";
      const Verdict v = judge_positive(p.estimate, p.lo, p.hi, p.mde);
      parts.push_back({set, v});
      ojson dj = evidence_json(p);
      dj["set"] = set;
      dj["gain_in_domain"] = in.estimate;
      dj["gain_out_of_domain"] = out.estimate;
      e.details.push_back(dj);
      if (!std::isfinite(e.estimate) || p.estimate < e.estimate) e.estimate = p.estimate, e.lo = p.lo, e.hi = p.hi, e.mde = p.mde;
    }
    e.n_per_arm = {{"dense", arm_count(arm_runs(dense_it->second, ctx.in_domain()))},
                   {"moe", arm_count(arm_runs(moe->second, ctx.in_domain()))}};
    return finding(id, claim, source, measured, ctx.spread, all_of(parts), e);
  }
  return finding(id, claim, source, "-", ctx.spread,
                 not_measured("no budget with a dense and an MoE arm measured out of domain"), e);
}
// 3. MoE gains less from fine-tuning (fairseq): the accuracy gain of fine-tuning (after - before, on the same
// test items) of the best dense and the best MoE configuration of the largest budget that has both, per item: item
// i's dense gain minus its MoE gain, averaged over the replicates both arms fine-tuned (paired by data seed), and a
// t interval over items; never four accuracies taken as independent.
struct Tuned {
  const RunResult* run;
  const DownstreamRecord* rec;
};

// The fine-tuned runs of the largest budget that has both arms: per arm, the replicates of its configuration with
// the lowest mean loss. Empty when no budget has both.
std::pair<std::vector<Tuned>, std::vector<Tuned>> finetuned_pair(const Study& study, const std::string& column) {
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
  auto best_config = [&](const std::vector<Tuned>& v) {
    std::map<std::string, std::vector<Tuned>> groups;
    for (const auto& t : v) groups[replicate_base_name(*t.run)].push_back(t);
    const std::vector<Tuned>* best = nullptr;
    double best_loss = INFINITY;
    for (const auto& [name, g] : groups) {
      double m = 0;
      for (const auto& t : g) m += loss(*t.run, column) / static_cast<double>(g.size());
      if (m < best_loss) best_loss = m, best = &g;
    }
    std::vector<Tuned> out = *best;
    std::sort(out.begin(), out.end(), [](const Tuned& a, const Tuned& b) { return a.run->data_seed < b.run->data_seed; });
    return out;
  };
  for (auto it = by_budget.rbegin(); it != by_budget.rend(); ++it)
    if (!it->second.first.empty() && !it->second.second.empty())
      return {best_config(it->second.first), best_config(it->second.second)};
  return {};
}

Claim claim_finetune(Context& ctx) {
  Evidence e;
  e.unit = "accuracy";
  const std::string id = "finetune", claim = "MoE gains less than dense from fine-tuning", source = "fairseq MoE vs dense";
  const auto [dense, moe] = finetuned_pair(ctx.study, ctx.column);
  if (dense.empty())
    return finding(id, claim, source, "the study fine-tunes no runs", ctx.spread,
                   {"not measured", "no dense and MoE run of one budget were fine-tuned (moelab sweep finetune)"}, e);
  // The replicates both arms fine-tuned (by data seed), each with per-item results on the same items.
  std::vector<std::pair<Tuned, Tuned>> pairs;
  for (const auto& d : dense)
    for (const auto& m : moe)
      if (d.run->data_seed == m.run->data_seed) pairs.push_back({d, m});
  if (pairs.empty()) pairs.push_back({dense.front(), moe.front()});  // no common replicate: the first of each
  const double R = static_cast<double>(pairs.size());
  double before_d = 0, after_d = 0, before_m = 0, after_m = 0;
  for (const auto& [d, m] : pairs) {
    before_d += d.rec->finetune["before"]["acc"].get<double>() / R, after_d += d.rec->acc / R;
    before_m += m.rec->finetune["before"]["acc"].get<double>() / R, after_m += m.rec->acc / R;
  }
  const Tuned &d0 = pairs.front().first, &m0 = pairs.front().second;
  std::string measured = d0.rec->task + " (" + std::to_string(d0.rec->n) + " test items), " + d0.run->name + " vs " +
                         m0.run->name + (pairs.size() > 1 ? " and their other " + std::to_string(pairs.size() - 1) +
                                                                " replicates (means over " + std::to_string(pairs.size()) + ")"
                                                          : "") +
                         ": dense " + fmt("%.3f", before_d) + " -> " + fmt("%.3f", after_d) + " (" +
                         fmt("%+.3f", after_d - before_d) + "), MoE " + fmt("%.3f", before_m) + " -> " +
                         fmt("%.3f", after_m) + " (" + fmt("%+.3f", after_m - before_m) +
                         "); dense gain - MoE gain = " + fmt("%+.3f", (after_d - before_d) - (after_m - before_m));
  // Per item: the dense gain (after - before, each 0 or 1) minus the MoE gain, averaged over the replicate pairs.
  const size_t n = d0.rec->correct.size();
  bool per_item = n > 0;
  for (const auto& [d, m] : pairs)
    for (const Tuned* t : {&d, &m})
      per_item &= t->rec->correct.size() == n && t->rec->finetune["before"].value("correct", "").size() == n;
  if (!per_item)
    return finding(id, claim, source, measured, "no per-item results",
                   {"inconclusive", "these fine-tuning records predate per-item results (moelab sweep finetune "
                                    "records them now); four accuracies are not judged as if independent"},
                   e);
  std::vector<double> diffs(n, 0.0);
  int64_t up_d = 0, down_d = 0, up_m = 0, down_m = 0;  // discordant items (McNemar's b and c) per arm, all replicates
  for (const auto& [d, m] : pairs) {
    const std::string bd = d.rec->finetune["before"].value("correct", ""), bm = m.rec->finetune["before"].value("correct", "");
    for (size_t i = 0; i < n; ++i) {
      const int dd = (d.rec->correct[i] == '1') - (bd[i] == '1'), dm = (m.rec->correct[i] == '1') - (bm[i] == '1');
      up_d += dd > 0, down_d += dd < 0, up_m += dm > 0, down_m += dm < 0;
      diffs[i] += (dd - dm) / R;
    }
  }
  const PairedMean p = paired_mean(diffs);
  measured += "; items turned right / wrong by fine-tuning: dense " + std::to_string(up_d) + " / " +
              std::to_string(down_d) + ", MoE " + std::to_string(up_m) + " / " + std::to_string(down_m);
  const std::string interval = "paired over " + std::to_string(n) + " items" +
                               (pairs.size() > 1 ? " x " + std::to_string(pairs.size()) + " replicates" : "") +
                               ": 95% interval [" + fmt("%+.3f", p.lo) + ", " + fmt("%+.3f", p.hi) +
                               "], detectable effect " + fmt("%.3f", p.mde);
  e.estimate = p.estimate, e.lo = p.lo, e.hi = p.hi, e.mde = p.mde;
  const int64_t runs = static_cast<int64_t>(pairs.size());
  e.n_per_arm = {{"dense", {{"runs", runs}, {"items", n}}}, {"moe", {{"runs", runs}, {"items", n}}}};
  return finding(id, claim, source, measured, interval, judge_positive(p.estimate, p.lo, p.hi, p.mde), e);
}

// Per replicate (data seed): the points (x, loss) of `runs`, for replicates with at least 3 distinct x.
std::map<int, std::pair<std::vector<double>, std::vector<double>>> points_by_replicate(
    const std::vector<const RunResult*>& runs, const std::function<double(const RunResult&)>& x_of,
    const LossOf& loss_of) {
  std::map<int, std::pair<std::vector<double>, std::vector<double>>> out;
  for (const auto* r : runs) {
    auto& [x, y] = out[static_cast<int>(r->data_seed)];
    x.push_back(x_of(*r)), y.push_back(loss_of(*r));
  }
  for (auto it = out.begin(); it != out.end();)
    it = std::set<double>(it->second.first.begin(), it->second.first.end()).size() < 3 ? out.erase(it) : std::next(it);
  return out;
}

// 4. The optimal granularity is above 1 and grows with the budget (Krajewski): per budget and replicate, a parabola
// of loss in log2 G over the MoE runs; "above 1" is its slope at G = 1 (negative: loss falls from G = 1), G* its
// minimum within the measured G, "grows" the change of log2 G* from the smallest to the largest budget, each with a
// t interval over replicates.
Claim claim_granularity(Context& ctx) {
  std::map<double, std::vector<const RunResult*>> by_budget;
  std::vector<double> seen;
  for (const auto& s : ctx.study.sweeps) {
    if (s.plan.kind != "granularity") continue;
    for (const auto& r : s.results)
      if (ok(r, ctx.column) && r.experts > 0)
        by_budget[snap_budget(seen, r.budget > 0 ? r.budget : -static_cast<double>(r.tokens))].push_back(&r);
  }
  Evidence e;
  e.unit = "nats per doubling of G";
  std::string measured;
  std::vector<std::pair<std::string, Verdict>> above;
  std::vector<std::map<int, double>> log_g_star;  // per budget: replicate -> log2 G*
  int64_t runs = 0;
  for (const auto& [k, rs] : by_budget) {
    const auto pts = points_by_replicate(
        rs, [](const RunResult& r) { return std::log2(static_cast<double>(r.granularity)); }, ctx.in_domain());
    if (pts.empty()) continue;
    runs += static_cast<int64_t>(rs.size());
    std::vector<double> falls;
    std::map<int, double> stars;
    double g_lo = INFINITY, g_hi = -INFINITY;  // the measured log2 G range: G* and its interval stay inside it
    for (const auto& [rep, xy] : pts) {
      const Parabola p = fit_parabola(xy.first, xy.second);
      const double lo = *std::min_element(xy.first.begin(), xy.first.end());
      const double hi = *std::max_element(xy.first.begin(), xy.first.end());
      g_lo = std::min(g_lo, lo), g_hi = std::max(g_hi, hi);
      falls.push_back(-p.slope(0));
      const double v = p.vertex();
      stars[rep] = std::isfinite(v) ? std::clamp(v, lo, hi) : (p.at(lo) <= p.at(hi) ? lo : hi);
    }
    std::vector<double> star_values;
    for (const auto& [rep, v] : stars) star_values.push_back(v);
    const PairedMean fall = paired_mean(falls);
    PairedMean star = paired_mean(star_values);
    if (std::isfinite(star.lo)) star.lo = std::clamp(star.lo, g_lo, g_hi), star.hi = std::clamp(star.hi, g_lo, g_hi);
    const std::string where = (k > 0 ? "C " : "D ") + fmt("%.3g", std::fabs(k));
    measured += (measured.empty() ? "" : "; ") + where + ": G* = " + fmt("%.2g", std::exp2(star.estimate)) +
                (std::isfinite(star.lo) ? " [" + fmt("%.2g", std::exp2(star.lo)) + ", " + fmt("%.2g", std::exp2(star.hi)) + "]" : "") +
                ", loss falls from G = 1 by " + interval_text(fall) + " per doubling";
    above.push_back({where, judge_positive(fall.estimate, fall.lo, fall.hi, fall.mde)});
    log_g_star.push_back(stars);
    ojson d = evidence_json(fall);
    d[k > 0 ? "C" : "tokens"] = std::fabs(k);
    d["G_star"] = std::exp2(star.estimate);
    d["G_star_interval"] = ojson::array({number_or_null(std::exp2(star.lo)), number_or_null(std::exp2(star.hi))});
    e.details.push_back(d);
  }
  e.n_per_arm = {{"moe", runs}};
  const std::string id = "granularity", claim = "The optimal granularity is above 1 and grows with the budget",
                    source = "Krajewski et al. 2024";
  if (above.empty())
    return finding(id, claim, source, "-", ctx.spread, not_measured("no granularity sweep with 3 or more G"), e);
  const Verdict first = all_of(above);
  // Growth: log2 G* at the largest budget minus at the smallest, paired by replicate.
  PairedMean growth;
  if (log_g_star.size() >= 2) {
    std::vector<double> d;
    for (const auto& [rep, v] : log_g_star.back())
      if (log_g_star.front().count(rep)) d.push_back(v - log_g_star.front().at(rep));
    growth = paired_mean(d);
    measured += "; log2 G* grows by " + interval_text(growth, "%+.2f") + " from the smallest to the largest budget";
  }
  e.estimate = growth.estimate, e.lo = growth.lo, e.hi = growth.hi, e.mde = growth.mde;
  e.unit = "log2 G* (largest budget - smallest)";
  Verdict verdict;
  if (first.verdict == "not reproduced") {
    verdict = {"not reproduced", "G = 1 is best (" + first.why + ")"};
  } else if (log_g_star.size() < 2) {
    verdict = {"inconclusive", "growth needs two or more budgets"};
  } else {
    const Verdict g = judge_positive(growth.estimate, growth.lo, growth.hi, growth.mde);
    if (g.verdict == "not reproduced") verdict = {"not reproduced", "G* falls with the budget: " + g.why};
    else if (first.verdict != "reproduced") verdict = {"inconclusive", "G* > 1: " + first.why};
    else if (g.verdict == "reproduced") verdict = {"reproduced", "G* > 1 at every budget and grows: " + g.why};
    else verdict = {"inconclusive", "G* > 1 at every budget (loss falls from G = 1); its growth: " + g.why};
  }
  return finding(id, claim, source, measured, ctx.spread, verdict, e);
}

// 5. At fixed total parameters, loss against sparsity is U-shaped (Abnar): per replicate, a parabola of loss in
// log2 (1 / (1 - S)); U-shaped when its curvature is positive and its minimum lies inside the measured range, each
// with a t interval over replicates.
Claim claim_fixed_n_u_shape(Context& ctx) {
  Evidence e;
  e.unit = "curvature, nats per (log2 expansion)^2";
  std::string measured;
  std::vector<std::pair<std::string, Verdict>> parts;
  int64_t runs = 0;
  for (const auto& s : ctx.study.sweeps) {
    if (s.plan.kind != "fixed_params") continue;
    std::map<std::string, const PlannedRun*> planned;
    for (const auto& p : s.plan.runs) planned[p.name] = &p;
    std::map<std::pair<double, double>, std::vector<const RunResult*>> groups;  // (N target, budget or D)
    for (const auto& r : s.results)
      if (ok(r, ctx.column) && planned.count(r.name))
        groups[{planned[r.name]->target_params,
                planned[r.name]->budget > 0 ? planned[r.name]->budget : planned[r.name]->target_tokens}]
            .push_back(&r);
    for (const auto& [key, rs] : groups) {
      const auto pts = points_by_replicate(rs, [](const RunResult& r) { return sparsity_axis(r.sparsity); }, ctx.in_domain());
      if (pts.empty()) continue;
      runs += static_cast<int64_t>(rs.size());
      double lo = INFINITY, hi = -INFINITY;
      std::vector<double> curvature, vertex;
      for (const auto& [rep, xy] : pts) {
        for (double x : xy.first) lo = std::min(lo, x), hi = std::max(hi, x);
        const Parabola p = fit_parabola(xy.first, xy.second);
        curvature.push_back(p.c);
        vertex.push_back(p.c > 0 ? -p.b / (2 * p.c) : kNaN);
      }
      const PairedMean c = paired_mean(curvature);
      const bool all_convex = std::all_of(vertex.begin(), vertex.end(), [](double v) { return std::isfinite(v); });
      const PairedMean v = all_convex ? paired_mean(vertex) : PairedMean{};
      const std::string where = "N " + fmt("%.3g", key.first) + " at " + (rs.front()->budget > 0 ? "C " : "D ") +
                                fmt("%.3g", key.second);
      measured += (measured.empty() ? "" : "; ") + where + ": curvature " + interval_text(c) + ", lowest at S " +
                  (all_convex ? fmt("%.3g", 1 - std::exp2(-v.estimate)) +
                                    (std::isfinite(v.lo) ? " [" + fmt("%.3g", 1 - std::exp2(-v.lo)) + ", " +
                                                               fmt("%.3g", 1 - std::exp2(-v.hi)) + "]" : "")
                              : std::string("- (not convex in every replicate)")) +
                  " (measured S " + fmt("%.3g", 1 - std::exp2(-lo)) + " to " + fmt("%.3g", 1 - std::exp2(-hi)) + ")";
      Verdict verdict = judge_positive(c.estimate, c.lo, c.hi, c.mde);
      if (verdict.verdict == "reproduced") {
        if (all_convex && v.hi <= lo) verdict = {"not reproduced", "convex, but its minimum lies below the densest S measured: loss rises with S"};
        else if (all_convex && v.lo >= hi) verdict = {"not reproduced", "convex, but its minimum lies beyond the sparsest S measured: loss falls with S"};
        else if (!all_convex || !(v.lo > lo && v.hi < hi))
          verdict = {"inconclusive", "convex (" + verdict.why + "), but the interval of its minimum is not inside the measured S"};
        else verdict.why = "convex, " + verdict.why + ", with its minimum inside the measured S";
      } else {
        verdict.why = "curvature: " + verdict.why;
      }
      parts.push_back({where, verdict});
      ojson d = evidence_json(c);
      d["params"] = key.first;
      d["S_star"] = all_convex ? number_or_null(1 - std::exp2(-v.estimate)) : ojson(nullptr);
      d["S_star_interval"] = all_convex ? ojson::array({number_or_null(1 - std::exp2(-v.lo)), number_or_null(1 - std::exp2(-v.hi))})
                                        : ojson(nullptr);
      e.details.push_back(d);
      if (parts.size() == 1) e.estimate = c.estimate, e.lo = c.lo, e.hi = c.hi, e.mde = c.mde;
    }
  }
  e.n_per_arm = {{"runs", runs}};
  const std::string id = "fixed_n_u_shape", claim = "At fixed total parameters, loss against sparsity is U-shaped",
                    source = "Abnar et al. 2025";
  if (parts.empty())
    return finding(id, claim, source, "the study has no fixed-parameter sweep", ctx.spread,
                   not_measured("no fixed_params sweep with 3 or more sparsity levels"), e);
  return finding(id, claim, source, measured, ctx.spread, all_of(parts), e);
}

// 6. At fixed training FLOPs, sparser is better (Abnar): per budget and replicate, each sparsity arm's IsoFLOP
// minimum and the slope of a line through them against log2 (1 / (1 - S)); the claim's estimate is minus the slope
// (nats gained per doubling of the expansion), averaged over budgets replicate by replicate.
Claim claim_sparser_better(Context& ctx) {
  const Arms arms = isoflop_arms(ctx.study, ctx.column);
  Evidence e;
  e.unit = "nats per doubling of 1 / (1 - S)";
  std::string measured;
  std::vector<std::map<int, double>> per_budget;
  std::vector<std::pair<std::string, Verdict>> parts;
  int64_t runs = 0;
  for (const auto& [C, by_arm] : arms) {
    if (by_arm.size() < 2) continue;
    std::map<int, std::pair<std::vector<double>, std::vector<double>>> pts;  // replicate -> (x, minimum)
    std::string curve;
    for (const auto& [key, rs] : by_arm) {
      const auto ar = arm_runs(rs, ctx.in_domain());
      runs += static_cast<int64_t>(ar.size());
      curve += (curve.empty() ? "" : ", ") + fmt("%.3g", key.sparsity) + ": " + fmt("%.4f", fit_arm_minimum(ar).loss);
      for (const auto& [rep, m] : replicate_minima(ar)) {
        pts[rep].first.push_back(sparsity_axis(key.sparsity));
        pts[rep].second.push_back(m.loss);
      }
    }
    std::map<int, double> gain;
    for (const auto& [rep, xy] : pts)
      if (xy.first.size() == by_arm.size()) gain[rep] = -fit_line(xy.first, xy.second).b;
    std::vector<double> g;
    for (const auto& [rep, v] : gain) g.push_back(v);
    const PairedMean p = paired_mean(g);
    const std::string where = "C " + fmt("%.3g", C);
    measured += (measured.empty() ? "" : "; ") + where + ": minima by S " + curve + "; gain per doubling " +
                interval_text(p);
    parts.push_back({where, judge_positive(p.estimate, p.lo, p.hi, p.mde)});
    per_budget.push_back(gain);
    ojson d = evidence_json(p);
    d["C"] = C;
    e.details.push_back(d);
  }
  e.n_per_arm = {{"runs", runs}, {"arms_per_budget", arms.empty() ? 0 : arms.begin()->second.size()}};
  const std::string id = "sparser_better", claim = "At fixed training FLOPs, sparser models reach lower loss",
                    source = "Abnar et al. 2025";
  if (parts.empty())
    return finding(id, claim, source, "-", ctx.spread, not_measured("no IsoFLOP budget with two or more sparsities"), e);
  const Verdict verdict = judge_mean_over_budgets(per_budget, parts, e, measured);
  return finding(id, claim, source, measured, ctx.spread, verdict, e);
}

}  // namespace

Findings study_findings(const Study& study, const StudySummary& summary, const std::string& column) {
  size_t groups = 0;
  const double sd = seed_spread(study, column, &groups);
  Context ctx{study, summary, column,
              std::isfinite(sd) ? "seed sd " + fmt("%.3g", sd) + " (" + std::to_string(groups) + " replicated configurations)"
                                : "no replicate seeds",
              {}, {}};
  Findings out;
  out.claims = {claim_moe_beats_dense(ctx), claim_gap_by_domain(ctx),    claim_finetune(ctx),
                claim_granularity(ctx),     claim_fixed_n_u_shape(ctx), claim_sparser_better(ctx)};
  auto& warnings = ctx.warnings;
  // The optimum of a curve at the edge of its measured range: the granularity optimum and the fixed-parameter
  // U's bottom (replicate means, from the summary).
  for (const auto& row : summary.granularity_optimum)
    if (row.on_edge)
      warnings.push_back("the best granularity at " + std::string(row.by_budget ? "C " : "D ") + fmt("%.3g", row.key) +
                         " is the largest measured (G = " + fmt("%g", static_cast<double>(row.G_star)) +
                         "): the optimum may lie beyond it; add a larger G");
  for (const auto& g : summary.fixed_params)
    if (g.on_edge)
      warnings.push_back("at fixed total parameters (N " + fmt("%.3g", g.params) +
                         ") the lowest mean loss is at an end of the measured S: the bottom of the U may lie beyond it");
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
  for (const auto& b : summary.isoflop_fit.budgets) {
    const double n = b.N_star, lo = b.box_N.lo, hi = b.box_N.hi;
    if (n <= lo * 1.02 || n >= hi / 1.02)
      warnings.push_back("the IsoFLOP optimum at C " + fmt("%.3g", b.C) + " lies on the " +
                         (n <= lo * 1.02 ? "smallest" : "largest") +
                         " measured shape: N* is an extrapolation; widen the shape ladder");
  }
  out.edge_warnings = std::move(warnings);
  out.seed_sd = sd;
  out.pairing = std::move(ctx.pairing);
  return out;
}

}  // namespace moelab
