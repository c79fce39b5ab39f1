#include "cli/suggest_command.h"

#include <cmath>
#include <cstdio>
#include <filesystem>
#include <iostream>
#include <map>
#include <memory>
#include <nlohmann/json.hpp>

#include "cli/report_errors.h"
#include "config/config.h"
#include "core/format.h"
#include "core/io.h"
#include "scaling/dataset.h"
#include "scaling/fit.h"
#include "scaling/suggest.h"
#include "sweep/plan.h"
#include "sweep/results.h"

namespace moelab {
namespace fs = std::filesystem;

namespace {

struct SuggestArgs {
  std::string dir, law = "chinchilla";
  double target = 0, max_flops = 0, total_flops = 0, expansion = 64;
  int count = 3, bootstrap = 64;
  uint64_t seed = 1;
  bool append = false, json = false;
};

// A shape the sweep already plans (the first feasible run of each distinct model), with the tokens it can train.
struct Template {
  const PlannedRun* run;
  Config config;
  double tokens_per_step = 0;
};

}  // namespace

void add_sweep_suggest_command(CLI::App& sweep) {
  auto a = std::make_shared<SuggestArgs>();
  auto* cmd = sweep.add_subcommand(
      "suggest", "propose the next runs that most narrow the bootstrap interval of a law's optimum at a target "
                 "budget per FLOP spent, from the sweep's finished runs (docs/fitting.md)");
  cmd->add_option("dir", a->dir, "sweep directory with finished runs")->required();
  cmd->add_option("--law", a->law, "chinchilla (default), granularity, sparsity or joint");
  cmd->add_option("--target-budget", a->target, "the budget C whose optimum should be pinned down, e.g. 1e21")
      ->required();
  cmd->add_option("--count", a->count, "how many runs to propose (K)")->check(CLI::Range(1, 100));
  cmd->add_option("--max-flops", a->max_flops, "at most this many training FLOPs per proposed run");
  cmd->add_option("--total-flops", a->total_flops, "at most this many FLOPs for all K together");
  cmd->add_option("--bootstrap", a->bootstrap, "bootstrap resamples of the fit (default 64)")->check(CLI::Range(10, 10000));
  cmd->add_option("--seed", a->seed, "seed of the bootstrap and the scenarios");
  cmd->add_option("--expansion", a->expansion, "granularity law: the runs' expansion rate (default 64)");
  cmd->add_flag("--append", a->append, "add the proposed runs to the plan, so `sweep run DIR` trains them");
  cmd->add_flag("--json", a->json, "print JSON");
  cmd->footer(
      "Candidates: every distinct model the plan holds, trained on token counts from half the smallest to 8x the\n"
      "largest D of the finished runs (12 per model, geometric), within --max-flops. Example:\n"
      "  moelab sweep suggest runs/sweeps/small --target-budget 1e18 --count 3 --max-flops 1e15 --append");
  on_run(cmd, [a] {
    const LawKind law = law_from_string(a->law);
    const SweepPlan plan = read_plan(a->dir);
    const std::vector<RunResult> results = read_results(a->dir);
    const ResultTable table = parse_csv(results_csv(results, "smoothed", false), a->dir + " (finished runs)");
    const LawSpec& spec = law_spec(law);
    const std::vector<Observation> points = extract_observations(table, default_columns(), spec.columns);
    if (points.size() <= spec.param_names.size())
      throw Error("sweep suggest: " + std::to_string(points.size()) + " finished runs are too few to fit the " +
                  spec.name + " law (" + std::to_string(spec.param_names.size()) + " parameters); run the sweep first");
    const double delta = spec.default_huber_delta;
    const ParametricFit fit = fit_parametric(law, points, delta);
    const auto thetas = bootstrap_parametric(law, points, delta, fit, a->bootstrap, a->seed);
    double max_s = 0, max_e = 1, min_d = INFINITY, max_d = 0;
    for (const auto& p : points)
      max_s = std::max(max_s, p.S), max_e = std::max(max_e, p.E), min_d = std::min(min_d, p.D), max_d = std::max(max_d, p.D);
    const std::vector<double> target = log_optimum_per_member(law, thetas, a->target, a->expansion, max_s, max_e);
    const double residual = rmse_log(law, fit.theta, points);
    const ReplicateNoise replicate = replicate_noise(points);
    const double noise = std::max({residual, std::isnan(replicate.pooled_sd) ? 0.0 : replicate.pooled_sd, 1e-3});

    // Candidates: each distinct model of the plan on a geometric range of token counts.
    std::vector<Template> templates;
    std::map<std::string, bool> seen;
    for (const PlannedRun* r : plan.feasible_runs()) {
      const Config c = load_config((fs::path(a->dir) / "runs" / r->name / "config.toml").string(), {});
      Config key = c;
      key.train = TrainConfig{};
      key.data = DataConfig{};
      const std::string k = to_toml(key);
      if (seen[k]) continue;
      seen[k] = true;
      const double per_step =
          static_cast<double>(c.train.batch_size * c.train.grad_accum * c.model.seq_len * r->processes);
      templates.push_back({r, c, per_step});
    }
    std::vector<Candidate> candidates;
    std::vector<std::pair<size_t, int64_t>> made_from;  // (template, steps)
    for (size_t t = 0; t < templates.size(); ++t) {
      const PlannedRun& r = *templates[t].run;
      for (int i = 0; i < 12; ++i) {
        const double want = std::exp(std::log(min_d / 2) + i * (std::log(8 * max_d) - std::log(min_d / 2)) / 11);
        const int64_t steps = std::max<int64_t>(1, std::llround(want / templates[t].tokens_per_step));
        const double D = static_cast<double>(steps) * templates[t].tokens_per_step;
        Candidate c;
        c.x.N = static_cast<double>(r.counts.total);
        c.x.A = static_cast<double>(r.counts.active);
        c.x.D = D;
        c.x.G = static_cast<double>(r.counts.granularity);
        c.x.S = r.counts.sparsity;
        c.x.E = std::max<double>(1, static_cast<double>(r.counts.routed_experts));
        c.flops = r.flops_per_token * D;
        c.x.C = c.flops;
        if (a->max_flops > 0 && c.flops > a->max_flops) continue;
        c.name = r.name + "-t" + compact_number(D);
        if (std::any_of(candidates.begin(), candidates.end(), [&](const Candidate& o) { return o.name == c.name; }))
          continue;
        candidates.push_back(c);
        made_from.push_back({t, steps});
      }
    }
    SuggestOptions o;
    o.target_budget = a->target;
    o.count = a->count;
    o.max_flops = a->max_flops;
    o.total_flops = a->total_flops;
    o.noise = noise;
    o.seed = a->seed;
    const auto picks = suggest_runs(law, thetas, target, candidates, o);

    nlohmann::ordered_json j;
    j["law"] = spec.name;
    j["target_budget"] = a->target;
    j["finished_runs"] = points.size();
    j["noise"] = noise;
    j["candidates"] = candidates.size();
    nlohmann::ordered_json rows = nlohmann::ordered_json::array();
    for (const auto& s : picks) {
      const Candidate& c = candidates[s.candidate];
      rows.push_back({{"name", c.name}, {"model_from", templates[made_from[s.candidate].first].run->name},
                      {"tokens", c.x.D}, {"steps", made_from[s.candidate].second}, {"flops", s.flops},
                      {"predicted_loss", s.predicted_loss}, {"sd_log_n_star_before", s.sd_before},
                      {"sd_log_n_star_after", s.sd_after}});
    }
    j["suggestions"] = rows;
    if (a->append && !picks.empty()) {
      std::vector<PlannedRun> runs;
      for (const auto& s : picks) {
        const Candidate& c = candidates[s.candidate];
        const auto [t, steps] = made_from[s.candidate];
        PlannedRun r = *templates[t].run;
        r.name = c.name;
        r.group = "suggested";
        r.config = templates[t].config;
        r.config.train.steps = steps;
        r.config.train.warmup_steps = std::min(r.config.train.warmup_steps, std::max<int64_t>(0, steps - 1));
        r.steps = steps;
        r.tokens = static_cast<int64_t>(c.x.D);
        r.flops = c.flops;
        r.budget = 0;
        r.target_tokens = c.x.D;
        runs.push_back(r);
      }
      append_runs(a->dir, runs);
      j["appended"] = picks.size();
    }
    if (a->json) {
      std::cout << j.dump(2) << "\n";
      return;
    }
    std::printf("moelab sweep suggest: %s law on %zu finished runs, target C = %.4g, outcome noise %.4g (log L)\n",
                spec.name.c_str(), points.size(), a->target, noise);
    std::printf("  %zu candidates; the interval is the bootstrap sd of log N*(C) (80%% interval ~ x%.2f either side)\n",
                candidates.size(), picks.empty() ? 1.0 : std::exp(1.2816 * picks.front().sd_before));
    std::printf("  %-44s %12s %12s %10s %9s %9s\n", "run", "tokens", "FLOPs", "pred loss", "sd before", "sd after");
    for (const auto& r : rows)
      std::printf("  %-44s %12.4g %12.4g %10.4f %9.4f %9.4f\n", r["name"].get<std::string>().c_str(),
                  r["tokens"].get<double>(), r["flops"].get<double>(), r["predicted_loss"].get<double>(),
                  r["sd_log_n_star_before"].get<double>(), r["sd_log_n_star_after"].get<double>());
    if (j.contains("appended"))
      std::printf("  appended %zu runs to %s/plan.json; train them with `moelab sweep run %s`\n", picks.size(),
                  a->dir.c_str(), a->dir.c_str());
  });
}

}  // namespace moelab
