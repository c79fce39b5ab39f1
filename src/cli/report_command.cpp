#include "cli/report_command.h"

#include <CLI/CLI.hpp>
#include <iostream>
#include <memory>

#include "cli/report_errors.h"
#include "report/report.h"

namespace moelab {

void add_report_command(CLI::App& app) {
  struct Args {
    std::string dir, out, loss = "val_loss";
    int bootstrap = 100;
    uint64_t seed = 0;
  };
  auto args = std::make_shared<Args>();
  auto* cmd = app.add_subcommand("report", "write the HTML report of a study: figures, fits and the headline answer");
  cmd->add_option("dir", args->dir,
                  "a sweep directory (plan.json), a run directory (metrics.jsonl), or a study directory holding "
                  "several of them (e.g. runs/study)")
      ->required();
  cmd->add_option("--out", args->out, "where to write index.html, summary.json and figures/ (default DIR/report)");
  cmd->add_option("--loss", args->loss, "results column used as the loss L of each run")
      ->check(CLI::IsMember({"val_loss", "smoothed_loss", "loss"}))
      ->capture_default_str();
  cmd->add_option("--bootstrap", args->bootstrap, "bootstrap resamples for the fits' intervals (0: none)")
      ->check(CLI::Range(0, 100000))
      ->capture_default_str();
  cmd->add_option("--seed", args->seed, "bootstrap seed")->capture_default_str();
  cmd->footer(
      "Fits the IsoFLOP surfaces and the sparsity law to the study's runs, draws every figure with gnuplot, and\n"
      "writes a self-contained page (figures embedded, opens from disk) plus summary.json, the numbers behind it.\n"
      "Prints the headline answer. Example:\n"
      "  moelab report runs/study --out runs/study/report\n"
      "  chromium runs/study/report/index.html");
  on_run(cmd, [args] {
    ReportOptions options;
    options.out_dir = args->out;
    options.analysis.loss = args->loss;
    options.analysis.bootstrap = args->bootstrap;
    options.analysis.seed = args->seed;
    const ReportResult r = write_report(args->dir, options, std::cout);
    for (const auto& s : r.skipped) std::cout << "  not drawn: " << s << "\n";
    std::cout << "\n" << r.summary.headline << "\n\n";
    std::cout << "wrote " << r.html_path << " (" << r.figures.size() << " figures) and " << r.summary_path << "\n";
  });
}

}  // namespace moelab
