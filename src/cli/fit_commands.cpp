#include "core/format.h"
#include "cli/fit_commands.h"

#include <omp.h>

#include <CLI/CLI.hpp>
#include <cstdio>
#include <functional>
#include <iostream>
#include <memory>
#include <sstream>

#include "cli/report_errors.h"
#include "core/error.h"
#include "core/io.h"
#include "config/config.h"
#include "scaling/dataset.h"
#include "scaling/fit.h"
#include "scaling/laws.h"
#include "scaling/optimize.h"

namespace moelab {
namespace {

std::string interval_text(const nlohmann::ordered_json& i) {
  return "[" + fmt("%.4g", i["p2.5"].get<double>()) + ", " + fmt("%.4g", i["p97.5"].get<double>()) + "] (95%), [" +
         fmt("%.4g", i["p10"].get<double>()) + ", " + fmt("%.4g", i["p90"].get<double>()) + "] (80%)";
}

// "replicate noise (pooled sd of log L over seeds): 0.0041 from 6 groups (18 runs), beside the residual rmse".
std::string replicate_text(const nlohmann::ordered_json& noise, double rmse) {
  if (noise["pooled_sd_log_loss"].is_null())
    return "  replicate noise: no replicates (runs differing only in train.seed; sweep specs: seeds = [...])\n";
  const double sd = noise["pooled_sd_log_loss"].get<double>();
  return "  replicate noise (pooled sd of log L over seeds): " + fmt("%.4g", sd) + " from " +
         std::to_string(noise["groups"].get<size_t>()) + " groups of replicates (" +
         std::to_string(noise["rows"].get<size_t>()) + " runs); residual rmse / noise = " + fmt("%.2f", rmse / sd) +
         (rmse > 1.5 * sd ? ": the law, not the noise, limits the fit\n" : ": the fit is at the noise level\n");
}

std::string compare_text(const nlohmann::ordered_json& j) {
  std::ostringstream out;
  out << "moelab fit --law compare on " << j["data"].get<std::string>() << ", held out: "
      << j["holdout"].get<std::string>() << "\n";
  out << "  rank  law           held-out rmse(log L)  [95% bootstrap]          in-sample rmse  parameters\n";
  int rank = 1;
  for (const auto& r : j["ranking"]) {
    std::string iv = "-";
    if (!r["heldout_rmse_interval"].is_null())
      iv = "[" + fmt("%.4g", r["heldout_rmse_interval"]["p2.5"].get<double>()) + ", " +
           fmt("%.4g", r["heldout_rmse_interval"]["p97.5"].get<double>()) + "]";
    const std::string law = r["law"].get<std::string>();
    out << "  " << fmt("%4.0f", static_cast<double>(rank++)) << "  " << law << std::string(law.size() < 12 ? 12 - law.size() : 0, ' ')
        << "  " << fmt("%20.4g", r["heldout_rmse"].get<double>()) << "  " << iv
        << std::string(iv.size() < 24 ? 24 - iv.size() : 0, ' ') << " " << fmt("%14.4g", r["rmse"].get<double>())
        << "  " << fmt("%10.0f", r["parameters"].get<double>()) << "\n";
  }
  for (const auto& s : j["skipped"])
    out << "  not fitted: " << s["law"].get<std::string>() << " (" << s["reason"].get<std::string>() << ")\n";
  if (j.contains("replicate_noise") && !j["replicate_noise"].is_null())
    out << replicate_text(j["replicate_noise"], j["ranking"][0]["rmse"].get<double>());
  return out.str();
}

std::string fit_text(const nlohmann::ordered_json& j) {
  std::ostringstream out;
  out << "moelab fit: " << j["law"].get<std::string>() << " law on " << j["n_points"].get<size_t>() << " points of "
      << j["data"].get<std::string>();
  if (j["n_heldout"].get<size_t>() > 0)
    out << " (" << j["n_heldout"].get<size_t>() << " held out by '" << j["holdout"].get<std::string>() << "')";
  out << "\n";
  const bool has_boot = j["bootstrap"]["samples"].get<int>() > 0;
  if (j.contains("coefficients")) {
    out << "  Huber delta " << fmt("%g", j["huber_delta"].get<double>()) << " on log-loss residuals, L-BFGS from "
        << j["starts"].get<size_t>() << " starts\n";
    for (const auto& [name, value] : j["coefficients"].items()) {
      out << "  " << name << std::string(name.size() < 8 ? 8 - name.size() : 0, ' ') << fmt("%12.6g", value.get<double>());
      if (has_boot) out << "   " << interval_text(j["bootstrap"]["intervals"]["coefficients"][name]);
      out << "\n";
    }
    out << "  objective " << fmt("%.6g", j["objective"].get<double>());
  } else {
    out << "  degree-" << j["degree"].get<int>() << " surfaces in log N and -log(1-S), per budget:\n";
    for (const auto& b : j["budgets"]) {
      out << "  C = " << fmt("%.4g", b["C"].get<double>()) << ": " << b["n_points"].get<size_t>()
          << " points, N* = " << fmt("%.4g", b["N_star"].get<double>()) << ", S* = " << fmt("%.4f", b["S_star"].get<double>())
          << ", L* = " << fmt("%.4f", b["L_star"].get<double>()) << ", rmse " << fmt("%.3g", b["rmse"].get<double>())
          << "\n";
      if (b.contains("intervals"))
        out << "      N* " << interval_text(b["intervals"]["N_star"]) << "\n      S* "
            << interval_text(b["intervals"]["S_star"]) << "\n";
    }
    if (j.contains("frontier"))
      out << "  N* ~ C^" << fmt("%.4f", j["frontier"]["N_star_exponent"].get<double>()) << " across budgets\n";
  }
  out << "  rmse(log L) " << fmt("%.4g", j["rmse"].get<double>());
  if (!j["heldout_rmse"].is_null()) out << ", held-out rmse " << fmt("%.4g", j["heldout_rmse"].get<double>());
  out << "\n";
  if (j.contains("replicate_noise") && !j["replicate_noise"].is_null())
    out << replicate_text(j["replicate_noise"], j["rmse"].get<double>());
  if (has_boot)
    out << "  bootstrap: " << j["bootstrap"]["samples"].get<int>() << " resamples, seed "
        << j["bootstrap"]["seed"].get<uint64_t>() << "\n";
  out << "  fitted in " << fmt("%.2f", j["fit_seconds"].get<double>()) << " s (" << omp_get_max_threads()
      << " threads)\n";
  return out.str();
}

struct FitOptions {
  std::string law, data, out, columns, holdout, param_count = "nonembedding_total";
  int bootstrap = 0, degree = 2;
  uint64_t seed = 0;
  double delta = 0, expansion = 0;
  bool json = false;
};

struct OptimizeOpts {
  std::string fit;
  double budget = 0, expansion = 0, max_sparsity = 0, max_experts = 0;
  bool json = false;
};

struct PredictOpts {
  std::string fit, config;
  std::vector<std::string> overrides;
  double tokens = 0;
  bool json = false;
};

}  // namespace

void add_fit_commands(CLI::App& app) {
  // ---- fit
  auto fo = std::make_shared<FitOptions>();
  auto* fit = app.add_subcommand("fit", "fit a scaling law to run results (CSV or the SQLite results store)");
  fit->add_option("--law", fo->law,
                  "chinchilla | granularity | sparsity | isoflop | joint | clark, or compare: every law the columns "
                  "allow, ranked by the error of predicting the held-out rows (--holdout, default the largest "
                  "budget) with bootstrap intervals")
      ->required();
  fit->add_option("--data", fo->data, "results: a CSV file (header row) or a SQLite db with table `results`")->required();
  fit->add_option("--out", fo->out, "write fit.json here (atomically)");
  fit->add_option("--columns", fo->columns,
                  "map logical columns to file columns, e.g. N=params,D=tokens (defaults: N=params D=tokens "
                  "G=granularity S=sparsity L=loss C=flops A=active_params E=experts)");
  fit->add_option("--holdout", fo->holdout, "hold rows out of the fit and report their RMSE, e.g. 'S>=0.95', 'C==1e20'");
  fit->add_option("--bootstrap", fo->bootstrap, "bootstrap resamples for percentile intervals (0: none)")
      ->check(CLI::Range(0, 100000));
  fit->add_option("--seed", fo->seed, "bootstrap seed (same seed, same intervals)");
  auto* delta = fit->add_option("--delta", fo->delta, "Huber delta on log-loss residuals (default per law)");
  fit->add_option("--degree", fo->degree, "isoflop: polynomial degree of the surface (default 2)");
  fit->add_option("--param-count", fo->param_count,
                  "what the N column counts, for predict/optimize: nonembedding_total (default), total, active, "
                  "nonembedding_active");
  auto* expansion = fit->add_option("--expansion", fo->expansion, "granularity: expansion rate E of the runs (recorded for optimize)");
  fit->add_flag("--json", fo->json, "print fit.json instead of the summary");
  fit->footer("Example:\n  moelab fit --law chinchilla --data runs.csv --bootstrap 100 --seed 1 --out fit.json\n"
              "See docs/fitting.md for the laws, start grids and the fit.json format.");
  on_run(fit, [fo, delta, expansion]() {
    FitRequest req;
    const bool compare = fo->law == "compare";
    if (!compare) req.law = law_from_string(fo->law);
    req.data_path = fo->data;
    req.columns = parse_column_map(fo->columns);
    req.holdout = fo->holdout;
    req.bootstrap = fo->bootstrap;
    req.seed = fo->seed;
    if (delta->count()) req.delta = fo->delta;
    if (expansion->count()) req.expansion = fo->expansion;
    req.degree = fo->degree;
    parameter_count(ModelConfig{}, fo->param_count);  // validates the name
    req.param_count = fo->param_count;
    req.command_line = "moelab fit --law " + fo->law + " --data " + fo->data +
                       (fo->columns.empty() ? "" : " --columns " + fo->columns) +
                       (fo->holdout.empty() ? "" : " --holdout '" + fo->holdout + "'") +
                       " --bootstrap " + std::to_string(fo->bootstrap) + " --seed " + std::to_string(fo->seed) +
                       (delta->count() ? " --delta " + fmt("%g", fo->delta) : "") +
                       (fo->out.empty() ? "" : " --out " + fo->out);
    const auto j = compare ? compare_laws(req) : run_fit(req);
    if (!fo->out.empty()) write_file_atomic(fo->out, j.dump(2) + "\n");
    if (fo->json) std::cout << j.dump(2) << "\n";
    else std::cout << (compare ? compare_text(j) : fit_text(j)) << (fo->out.empty() ? "" : "  wrote " + fo->out + "\n");
    std::cout.flush();
  });

  // ---- optimize
  auto oo = std::make_shared<OptimizeOpts>();
  auto* opt = app.add_subcommand("optimize", "compute-optimal N, D and G or S for a FLOP budget from a fit.json");
  opt->add_option("--fit", oo->fit, "fit.json written by `moelab fit --out`")->required();
  opt->add_option("--budget", oo->budget, "training FLOPs C, e.g. 1e20")->required();
  auto* oexp = opt->add_option("--expansion", oo->expansion, "granularity law: expansion rate E (default: the fit's, else 64)");
  auto* osmax = opt->add_option("--max-sparsity", oo->max_sparsity,
                                "sparsity law: largest S searched (default: the largest in the fitted data)");
  auto* oemax = opt->add_option("--max-experts", oo->max_experts,
                                "joint law: largest expert count searched (default: the largest in the fitted data)");
  opt->add_flag("--json", oo->json, "print JSON");
  opt->footer("Example:\n  moelab optimize --fit fit.json --budget 1e20");
  on_run(opt, [oo, oexp, osmax, oemax]() {
    OptimizeOptions o;
    o.budget = oo->budget;
    if (oexp->count()) o.expansion = oo->expansion;
    if (osmax->count()) o.max_sparsity = oo->max_sparsity;
    if (oemax->count()) o.max_experts = oo->max_experts;
    const auto r = optimize_report(load_fit(oo->fit), o);
    std::cout << (oo->json ? r.dump(2) + "\n" : optimize_text(r));
    std::cout.flush();
  });

  // ---- predict
  auto po = std::make_shared<PredictOpts>();
  auto* pred = app.add_subcommand("predict", "predicted loss of one planned run from a fit.json");
  pred->add_option("--fit", po->fit, "fit.json written by `moelab fit --out`")->required();
  pred->add_option("-c,--config", po->config, "TOML config of the planned model")->required();
  pred->add_option("--set", po->overrides, "override a config key (repeatable)");
  pred->add_option("--tokens", po->tokens, "training tokens D")->required();
  pred->add_flag("--json", po->json, "print JSON");
  pred->footer("Example:\n  moelab predict --fit fit.json --config configs/quickstart.toml --tokens 2e9\n"
               "N is counted from the config as the fit's param_count; G and S come from its [moe] section.");
  on_run(pred, [po]() {
    const Config cfg = load_config(po->config, po->overrides);
    const auto r = predict_report(load_fit(po->fit), cfg.model, po->tokens, po->config);
    if (po->json) {
      std::cout << r.dump(2) << "\n";
    } else {
      std::cout << "moelab predict: " << r["law"].get<std::string>() << " law, " << po->config << "\n"
                << "  N = " << fmt("%.4g", r["N"].get<double>()) << " (" << r["param_count"].get<std::string>()
                << "), D = " << fmt("%.4g", r["D"].get<double>());
      if (r.contains("G")) std::cout << ", G = " << fmt("%g", r["G"].get<double>());
      if (r.contains("S")) std::cout << ", S = " << fmt("%.4f", r["S"].get<double>());
      if (r.contains("E")) std::cout << ", E = " << fmt("%g", r["E"].get<double>()) << ", N_active = "
                                    << fmt("%.4g", r["N_active"].get<double>());
      std::cout << "\n  predicted loss " << fmt("%.4f", r["loss"].get<double>());
      if (r.contains("interval")) std::cout << "   " << interval_text(r["interval"]);
      std::cout << "\n";
      if (r.contains("warnings"))
        for (const auto& w : r["warnings"]) std::cout << "  warning: " << w.get<std::string>() << "\n";
    }
    std::cout.flush();
  });
}

}  // namespace moelab
