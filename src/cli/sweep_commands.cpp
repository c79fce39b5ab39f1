#include "cli/sweep_commands.h"

#include <CLI/CLI.hpp>
#include <cstdio>
#include <filesystem>
#include <functional>
#include <iostream>
#include <memory>
#include <set>
#include <cmath>
#include <map>

#include "cli/report_errors.h"
#include "cli/suggest_command.h"
#include "config/config.h"
#include "core/error.h"
#include "core/io.h"
#include "eval/tasks.h"
#include "sweep/plan.h"
#include "sweep/results.h"
#include "sweep/runner.h"

namespace moelab {
namespace {

struct SweepOptions {
  std::string spec, dir, out, loss = "smoothed", moelab;
  bool csv = false, all = false;
  SweepRunOptions run;
  SlurmOptions slurm;
};

}  // namespace

void add_sweep_commands(CLI::App& app) {
  auto o = std::make_shared<SweepOptions>();
  auto* sweep = app.add_subcommand("sweep", "plan, run and collect sweeps of training runs (docs/sweeps.md)");
  sweep->require_subcommand(1);

  auto* plan = sweep->add_subcommand("plan", "expand a sweep spec into runs: DIR/plan.json, DIR/runs/<name>/config.toml");
  plan->add_option("spec", o->spec, "sweep spec (TOML; examples in configs/sweeps/)")->required()->check(CLI::ExistingFile);
  plan->add_option("--out", o->out, "sweep directory to create; omitted: only print the table");
  plan->footer("Example:\n  moelab sweep plan configs/sweeps/isoflop-sparsity.toml --out runs/sweeps/isoflop\n"
               "Prints name, d_model, layers, experts, top-k, G, S, total and active parameters, tokens D, FLOPs;\n"
               "runs that cannot be realised are listed with the reason and not planned.");
  plan->callback(reporting_errors([o]() {
    SweepPlan p = plan_sweep(o->spec);
    if (!o->out.empty()) write_plan(p, o->out, read_file(o->spec, "sweep spec"));
    std::cout << plan_table(p);
    if (!o->out.empty())
      std::cout << "planned " << p.feasible_runs().size() << " runs in " << o->out << "; train them with `moelab sweep run "
                << o->out << " --jobs N`\n";
  }));

  auto* run = sweep->add_subcommand("run", "train the pending runs of a sweep, N at a time (resumes after a kill)");
  run->add_option("dir", o->dir, "sweep directory (from `sweep plan --out`)")->required();
  run->add_option("-j,--jobs", o->run.jobs, "runs trained at once")->check(CLI::PositiveNumber);
  run->add_option("-t,--threads-per-job", o->run.threads_per_job, "train.threads of each run")->check(CLI::PositiveNumber);
  run->add_option("--index", o->run.index,
                  "train only the run with this plan index and write only its result.json (Slurm array tasks)");
  run->add_option("--moelab", o->run.binary, "moelab executable to run training with (default: this one)");
  run->footer("Example:\n  moelab sweep run runs/sweeps/isoflop --jobs 2 --threads-per-job 1\n"
              "Each run trains as its own process; finished runs are skipped, interrupted ones resume from their\n"
              "checkpoint, a failing run is recorded as failed and the others go on. Results: DIR/results.db.");
  run->callback(reporting_errors([o]() {
    const SweepRunSummary s = run_sweep(o->dir, o->run);
    if (o->run.index < 0 && s.failed > 0) throw CLI::RuntimeError(3);
    if (o->run.index >= 0 && s.failed > 0) throw CLI::RuntimeError(3);
  }));

  add_sweep_suggest_command(*sweep);

  // replicate
  struct ReplicateArgs {
    std::string dir, loss = "val";
    std::vector<int64_t> seeds{2, 3};
  };
  auto ra = std::make_shared<ReplicateArgs>();
  auto* rep = sweep->add_subcommand(
      "replicate", "repeat the best dense and the best MoE run of each budget with more seeds (appended to the "
                   "plan; `sweep run DIR` trains them), so fits and the report can tell effects from seed noise");
  rep->add_option("dir", ra->dir, "sweep directory with finished runs")->required();
  rep->add_option("--seeds", ra->seeds, "train.seed values of the replicates (default: 2 3)");
  rep->add_option("--loss", ra->loss, "what picks the best run: val (default), smoothed or final")
      ->check(CLI::IsMember({"val", "smoothed", "final"}));
  rep->footer("Example:\n  moelab sweep replicate runs/sweeps/small --seeds 2 3 && moelab sweep run runs/sweeps/small");
  rep->callback(reporting_errors([ra]() {
    const SweepPlan plan = read_plan(ra->dir);
    const std::vector<RunResult> results = read_results(ra->dir);
    std::map<std::string, const PlannedRun*> planned;
    for (const auto& r : plan.runs) planned[r.name] = &r;
    auto loss = [&](const RunResult& r) {
      return ra->loss == "val" ? r.val_loss : ra->loss == "final" ? r.loss : r.smoothed_loss;
    };
    // Best dense and best MoE per budget (runs with a planned FLOP budget; the others by token count).
    std::map<std::pair<double, bool>, const RunResult*> best;
    for (const auto& r : results) {
      if (r.status != "ok" || !std::isfinite(loss(r))) continue;
      double key = r.budget > 0 ? r.budget : -static_cast<double>(r.tokens);
      for (const auto& [k, v] : best)
        if (std::fabs(k.first - key) <= 1e-6 * std::fabs(key)) key = k.first;
      auto& slot = best[{key, r.experts > 0}];
      if (!slot || loss(r) < loss(*slot)) slot = &r;
    }
    if (best.empty()) throw Error("sweep replicate: '" + ra->dir + "' has no finished runs (run the sweep first)");
    std::vector<PlannedRun> runs;
    for (const auto& [key, r] : best) {
      const PlannedRun& p = *planned.at(r->name);
      const Config config = load_config((std::filesystem::path(ra->dir) / "runs" / r->name / "config.toml").string(), {});
      for (int64_t seed : ra->seeds) {
        if (seed == config.train.seed) continue;
        PlannedRun x = p;
        x.name = r->name + "-s" + std::to_string(seed);
        if (planned.count(x.name)) continue;  // replicated already
        x.config = config;
        x.config.train.seed = seed;
        runs.push_back(x);
      }
    }
    append_runs(ra->dir, runs);
    std::set<double> budgets;
    for (const auto& [key, r] : best) budgets.insert(key.first);
    std::cout << "appended " << runs.size() << " replicate runs (seeds";
    for (int64_t s : ra->seeds) std::cout << " " << s;
    std::cout << ") of the best dense and MoE run of " << budgets.size() << " budget(s); train them with "
              << "`moelab sweep run " << ra->dir << "`\n";
  }));

  auto* status = sweep->add_subcommand("status", "progress of a sweep: done/failed/running/pending per run");
  status->add_option("dir", o->dir, "sweep directory")->required();
  status->callback(reporting_errors([o]() { std::cout << sweep_status(o->dir); }));

  auto* exp = sweep->add_subcommand("export", "write the sweep's results as a table (CSV) for law fitting");
  exp->add_option("dir", o->dir, "sweep directory")->required();
  exp->add_flag("--csv", o->csv, "CSV output (the only format, and the default)");
  exp->add_option("--out", o->out, "file to write (default: stdout)");
  exp->add_option("--loss", o->loss, "what the `loss` column holds: smoothed (default), final or val");
  exp->add_flag("--all", o->all, "include failed runs (status column says which)");
  exp->callback(reporting_errors([o]() {
    const std::string csv = results_csv(read_results(o->dir), o->loss, o->all);
    if (o->out.empty()) std::cout << csv;
    else write_file_atomic(o->out, csv);
  }));

  auto* slurm = sweep->add_subcommand("slurm", "write DIR/sweep.sbatch: a Slurm job array, one task per run");
  slurm->add_option("dir", o->dir, "sweep directory")->required();
  slurm->add_option("--partition", o->slurm.partition, "Slurm partition (default: the cluster's)");
  slurm->add_option("--time", o->slurm.time, "time limit per task (default 04:00:00)");
  slurm->add_option("--cpus", o->slurm.cpus, "cpus per task = training threads (default 2)")->check(CLI::PositiveNumber);
  slurm->add_option("--max-parallel", o->slurm.max_parallel, "at most this many tasks at once (array %N)");
  slurm->add_option("--nodes", o->slurm.nodes, "nodes per task, for runs of several processes (spec key processes; "
                    "they start with srun inside the task; default 1)")->check(CLI::PositiveNumber);
  slurm->add_option("--tasks-per-node", o->slurm.tasks_per_node, "MPI processes per node of a task (default 1); "
                    "nodes x tasks-per-node must cover the sweep's largest run")->check(CLI::PositiveNumber);
  slurm->add_option("--moelab", o->slurm.binary, "moelab executable path on the cluster (default: this one)");
  slurm->callback(reporting_errors([o]() {
    const std::string script = slurm_script(o->dir, o->slurm);
    const auto root = std::filesystem::absolute(o->dir);
    std::filesystem::create_directories(root / "slurm");
    write_file_atomic((root / "sweep.sbatch").string(), script);
    std::filesystem::permissions(root / "sweep.sbatch", std::filesystem::perms::owner_exec,
                                 std::filesystem::perm_options::add);
    std::cout << "wrote " << (root / "sweep.sbatch").string() << "; submit with `sbatch " << (root / "sweep.sbatch").string()
              << "`, then `moelab sweep collect " << o->dir << "`\n";
  }));

  struct SweepEvalOptions {
    std::vector<std::string> tasks;
    std::vector<int64_t> shots{0};
    TaskEvalOptions task;
    std::string tasks_dir = default_tasks_dir();
    int threads = 0;
    bool force = false;
  };
  auto e = std::make_shared<SweepEvalOptions>();
  auto* sweval = sweep->add_subcommand("eval", "downstream accuracy of every finished run into DIR/results.db (docs/tasks.md)");
  sweval->add_option("dir", o->dir, "sweep directory")->required();
  sweval->add_option("--tasks", e->tasks, "task names in --tasks-dir or JSONL task files")->required();
  sweval->add_option("--shots", e->shots, "few-shot examples; several values evaluate each (e.g. --shots 0 5)")
      ->check(CLI::NonNegativeNumber);
  sweval->add_option("--limit", e->task.limit, "score at most the first N test items per task (0: all)")
      ->check(CLI::NonNegativeNumber);
  sweval->add_option("--seed", e->task.seed, "seed of the few-shot sampling");
  sweval->add_option("--threads", e->threads, "CPU threads (0: all cores)");
  sweval->add_option("--tasks-dir", e->tasks_dir, "where task names resolve (default data/tasks)");
  sweval->add_flag("--force", e->force, "re-evaluate runs that already hold these results");
  sweval->footer("Example:\n  moelab sweep eval runs/sweeps/small --tasks wordnet-cloze bible-paraphrase --shots 0 5 --limit 200\n"
                 "Each run's results go to DIR/runs/<name>/downstream.json and the `downstream` table of DIR/results.db\n"
                 "(keyed by run, task, shots, mode), next to its losses in `results`.");
  sweval->callback(reporting_errors([o, e]() {
    const int64_t n = evaluate_sweep_on_tasks(o->dir, e->tasks, e->shots, e->task, e->threads, e->tasks_dir, e->force,
                                              std::cout);
    std::cout << "evaluated " << n << " runs; results in " << (std::filesystem::absolute(o->dir) / "results.db").string()
              << " (table downstream)\n";
  }));

  auto* collect = sweep->add_subcommand("collect", "rebuild DIR/results.db from the runs' result.json files");
  collect->add_option("dir", o->dir, "sweep directory")->required();
  collect->callback(reporting_errors([o]() {
    const int64_t n = collect_results(o->dir);
    std::cout << "collected " << n << " run results into " << (std::filesystem::absolute(o->dir) / "results.db").string()
              << "\n";
  }));
}

}  // namespace moelab
