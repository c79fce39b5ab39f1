#include "cli/sweep_commands.h"

#include <CLI/CLI.hpp>
#include <cstdio>
#include <filesystem>
#include <functional>
#include <iostream>
#include <memory>
#include <set>
#include <chrono>
#include <cmath>
#include <sstream>
#include <map>

#include "cli/report_errors.h"
#include "cli/suggest_command.h"
#include "config/config.h"
#include "core/error.h"
#include "core/io.h"
#include "eval/finetune.h"
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

void add_sweep_plan_command(CLI::App* sweep, const std::shared_ptr<SweepOptions>& o) {
  auto* plan = sweep->add_subcommand("plan", "expand a sweep spec into runs: DIR/plan.json, DIR/runs/<name>/config.toml");
  plan->add_option("spec", o->spec, "sweep spec (TOML; examples in configs/sweeps/)")->required()->check(CLI::ExistingFile);
  plan->add_option("--out", o->out, "sweep directory to create; omitted: only print the table");
  plan->footer("Example:\n  moelab sweep plan configs/sweeps/isoflop-sparsity.toml --out runs/sweeps/isoflop\n"
               "Prints name, d_model, layers, experts, top-k, G, S, total and active parameters, tokens D, FLOPs;\n"
               "runs that cannot be realised are listed with the reason and not planned.");
  on_run(plan, [o]() {
    SweepPlan p = plan_sweep(o->spec);
    if (!o->out.empty()) write_plan(p, o->out, read_file(o->spec, "sweep spec"));
    std::cout << plan_table(p);
    if (!o->out.empty())
      std::cout << "planned " << p.feasible_runs().size() << " runs in " << o->out << "; train them with `moelab sweep run "
                << o->out << " --jobs N`\n";
  });
}

void add_sweep_run_command(CLI::App* sweep, const std::shared_ptr<SweepOptions>& o) {
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
  on_run(run, [o]() {
    const SweepRunSummary s = run_sweep(o->dir, o->run);
    if (o->run.index < 0 && s.failed > 0) throw CLI::RuntimeError(3);
    if (o->run.index >= 0 && s.failed > 0) throw CLI::RuntimeError(3);
  });
}

void add_sweep_replicate_command(CLI::App* sweep) {
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
  on_run(rep, [ra]() {
    const SweepPlan plan = read_plan(ra->dir);
    const std::vector<RunResult> results = read_results(ra->dir);
    std::map<std::string, const PlannedRun*> planned;
    for (const auto& r : plan.runs) planned[r.name] = &r;
    const std::vector<BestRun> best = best_runs_per_budget(results, ra->loss);
    if (best.empty()) throw Error("sweep replicate: '" + ra->dir + "' has no finished runs (run the sweep first)");
    std::vector<PlannedRun> runs;
    for (const BestRun& b : best) {
      // A replicate that came out best stands for its original run (so a second call appends nothing).
      std::string base = b.run->name;
      const std::string suffix = "-s" + std::to_string(b.run->seed);
      if (base.size() > suffix.size() && base.compare(base.size() - suffix.size(), suffix.size(), suffix) == 0 &&
          planned.count(base.substr(0, base.size() - suffix.size())))
        base.resize(base.size() - suffix.size());
      const PlannedRun& p = *planned.at(base);
      const Config config = load_config((std::filesystem::path(ra->dir) / "runs" / base / "config.toml").string(), {});
      for (int64_t seed : ra->seeds) {
        if (seed == config.train.seed) continue;
        PlannedRun x = p;
        x.name = base + "-s" + std::to_string(seed);
        if (planned.count(x.name)) continue;  // replicated already
        x.config = config;
        x.config.train.seed = seed;
        runs.push_back(x);
      }
    }
    append_runs(ra->dir, runs);
    std::set<double> budgets;
    for (const BestRun& b : best) budgets.insert(b.budget_key);
    std::cout << "appended " << runs.size() << " replicate runs (seeds";
    for (int64_t s : ra->seeds) std::cout << " " << s;
    std::cout << ") of the best dense and MoE run of " << budgets.size() << " budget(s); train them with "
              << "`moelab sweep run " << ra->dir << "`\n";
  });
}

void add_sweep_finetune_command(CLI::App* sweep) {
  struct FinetuneArgs {
    std::string dir, task, loss = "val", tasks_dir = default_tasks_dir();
    FinetuneOptions options;
    bool all_budgets = false, force = false, replicates = false;
  };
  auto fa = std::make_shared<FinetuneArgs>();
  fa->options.steps = 150;
  fa->options.lr = 1e-3;
  auto* sft = sweep->add_subcommand(
      "finetune", "fine-tune the best dense and the best MoE run of the largest budget (or of every budget) on a "
                  "task, scoring its test split before and after, into DIR/results.db (the fairseq study's comparison)");
  sft->add_option("dir", fa->dir, "sweep directory with finished runs")->required();
  sft->add_option("--task", fa->task, "task name in --tasks-dir, or a JSONL task file with train and test items")
      ->required();
  sft->add_option("--steps", fa->options.steps, "optimizer steps (default 150)")->check(CLI::PositiveNumber);
  sft->add_option("--lr", fa->options.lr, "peak learning rate (default 1e-3; 10% warm-up, cosine to lr/10)")
      ->check(CLI::PositiveNumber);
  sft->add_option("--batch", fa->options.batch, "sequences (items) per step")->check(CLI::PositiveNumber);
  sft->add_option("--limit", fa->options.limit, "score at most the first N test items (0: all, the default)")
      ->check(CLI::NonNegativeNumber);
  sft->add_option("--threads", fa->options.threads, "CPU threads (0: all cores)");
  sft->add_option("--tasks-dir", fa->tasks_dir, "where task names resolve (default data/tasks)");
  sft->add_option("--loss", fa->loss, "what picks the best run: val (default), smoothed or final")
      ->check(CLI::IsMember({"val", "smoothed", "final"}));
  sft->add_flag("--all-budgets", fa->all_budgets, "the best pair of every budget, not only the largest");
  sft->add_flag("--replicates", fa->replicates,
                "every replicate (seed) of the chosen configurations, not only the first: the findings then average "
                "each test item's gain over replicates, paired by data seed");
  sft->add_flag("--force", fa->force, "fine-tune again runs that already hold a result for this task");
  sft->footer("Example:\n  moelab sweep finetune runs/study/sparsity --task wordnet-cloze --steps 150 --lr 1e-3\n"
              "Each run is fine-tuned into DIR/runs/<name>/finetune-<task>; the record (mode finetune, with the\n"
              "zero-shot accuracy on the same items before fine-tuning) goes to downstream.json and DIR/results.db.\n"
              "The report's findings table compares the gains of dense and MoE (docs/report.md).");
  on_run(sft, [fa]() {
    const std::vector<RunResult> results = read_results(fa->dir);
    std::vector<BestRun> best = best_runs_per_budget(results, fa->loss);
    if (best.empty()) throw Error("sweep finetune: '" + fa->dir + "' has no finished runs (run the sweep first)");
    if (!fa->all_budgets) {
      // The largest budget: the group of the run with the most FLOPs (runs without a budget are keyed by -tokens).
      double largest = best.front().budget_key, most = -1;
      for (const BestRun& b : best)
        if (b.run->flops > most) most = b.run->flops, largest = b.budget_key;
      std::erase_if(best, [&](const BestRun& b) { return b.budget_key != largest; });
    }
    if (fa->replicates) best = with_replicates(best, results);
    const Task task = load_task(fa->task, fa->tasks_dir);
    const std::string db = (std::filesystem::absolute(fa->dir) / "results.db").string();
    const auto started = std::chrono::steady_clock::now();
    size_t done = 0, trained = 0;
    for (const BestRun& b : best) {
      ++done;
      const std::string run_dir = (std::filesystem::absolute(fa->dir) / "runs" / b.run->name).string();
      if (!fa->force) {
        bool have = false;
        for (const auto& r : read_run_downstream(run_dir))
          have |= r.task == task.name && r.mode == "finetune" && r.limit == fa->options.limit &&
                  r.finetune.value("steps", int64_t{0}) == fa->options.steps && r.finetune.contains("before");
        if (have) {
          std::cout << "[" << done << "/" << best.size() << "] " << b.run->name
                    << ": already fine-tuned on " << task.name << " (--force fine-tunes again)\n";
          continue;
        }
      }
      FinetuneOptions options = fa->options;
      options.out = run_dir + "/finetune-" + task.name;
      std::ostringstream log;  // the per-step log stays in finetune.json; one line per run here
      const FinetuneResult r = finetune_on_task(run_dir, task, options, log);
      RunLocation run = locate_run(run_dir);
      run.sweep_dir = std::filesystem::absolute(fa->dir).string();
      record_downstream(run, {r.record}, db);
      ++trained;
      const double elapsed =
          std::chrono::duration<double>(std::chrono::steady_clock::now() - started).count();
      const double before = r.record.finetune["before"]["acc"].get<double>();
      std::printf("[%zu/%zu] %s (%s) fine-tuned on %s: acc %.4f -> %.4f (%+.4f, n %ld) | %.0fs elapsed, ETA %.0fs\n",
                  done, best.size(), b.run->name.c_str(), b.moe ? "MoE" : "dense", task.name.c_str(), before,
                  r.record.acc, r.record.acc - before, static_cast<long>(r.record.n), elapsed,
                  elapsed / static_cast<double>(trained) * static_cast<double>(best.size() - done));
      std::fflush(stdout);
    }
    std::cout << "fine-tuned " << trained << " runs; results in " << db << " (table downstream, mode finetune)\n";
  });
}

void add_sweep_status_command(CLI::App* sweep, const std::shared_ptr<SweepOptions>& o) {
  auto* status = sweep->add_subcommand("status", "progress of a sweep: done/failed/running/pending per run");
  status->add_option("dir", o->dir, "sweep directory")->required();
  on_run(status, [o]() { std::cout << sweep_status(o->dir); });
}

void add_sweep_export_command(CLI::App* sweep, const std::shared_ptr<SweepOptions>& o) {
  auto* exp = sweep->add_subcommand("export", "write the sweep's results as a table (CSV) for law fitting");
  exp->add_option("dir", o->dir, "sweep directory")->required();
  exp->add_flag("--csv", o->csv, "CSV output (the only format, and the default)");
  exp->add_option("--out", o->out, "file to write (default: stdout)");
  exp->add_option("--loss", o->loss, "what the `loss` column holds: smoothed (default), final or val");
  exp->add_flag("--all", o->all, "include failed runs (status column says which)");
  on_run(exp, [o]() {
    const std::string csv = results_csv(read_results(o->dir), o->loss, o->all);
    if (o->out.empty()) std::cout << csv;
    else write_file_atomic(o->out, csv);
  });
}

void add_sweep_slurm_command(CLI::App* sweep, const std::shared_ptr<SweepOptions>& o) {
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
  on_run(slurm, [o]() {
    const std::string script = slurm_script(o->dir, o->slurm);
    const auto root = std::filesystem::absolute(o->dir);
    std::filesystem::create_directories(root / "slurm");
    write_file_atomic((root / "sweep.sbatch").string(), script);
    std::filesystem::permissions(root / "sweep.sbatch", std::filesystem::perms::owner_exec,
                                 std::filesystem::perm_options::add);
    std::cout << "wrote " << (root / "sweep.sbatch").string() << "; submit with `sbatch " << (root / "sweep.sbatch").string()
              << "`, then `moelab sweep collect " << o->dir << "`\n";
  });
}

void add_sweep_eval_command(CLI::App* sweep, const std::shared_ptr<SweepOptions>& o) {
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
  on_run(sweval, [o, e]() {
    const int64_t n = evaluate_sweep_on_tasks(o->dir, e->tasks, e->shots, e->task, e->threads, e->tasks_dir, e->force,
                                              std::cout);
    std::cout << "evaluated " << n << " runs; results in " << (std::filesystem::absolute(o->dir) / "results.db").string()
              << " (table downstream)\n";
  });
}

void add_sweep_collect_command(CLI::App* sweep, const std::shared_ptr<SweepOptions>& o) {
  auto* collect = sweep->add_subcommand("collect", "rebuild DIR/results.db from the runs' result.json files");
  collect->add_option("dir", o->dir, "sweep directory")->required();
  on_run(collect, [o]() {
    const int64_t n = collect_results(o->dir);
    std::cout << "collected " << n << " run results into " << (std::filesystem::absolute(o->dir) / "results.db").string()
              << "\n";
  });
}

}  // namespace

void add_sweep_commands(CLI::App& app) {
  auto o = std::make_shared<SweepOptions>();
  auto* sweep = app.add_subcommand("sweep", "plan, run and collect sweeps of training runs (docs/sweeps.md)");
  sweep->require_subcommand(1);
  add_sweep_plan_command(sweep, o);
  add_sweep_run_command(sweep, o);
  add_sweep_suggest_command(*sweep);
  add_sweep_replicate_command(sweep);
  add_sweep_finetune_command(sweep);
  add_sweep_status_command(sweep, o);
  add_sweep_export_command(sweep, o);
  add_sweep_slurm_command(sweep, o);
  add_sweep_eval_command(sweep, o);
  add_sweep_collect_command(sweep, o);
}

}  // namespace moelab
