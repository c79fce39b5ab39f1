// Sweeps: planner arithmetic (D from a budget within one optimizer step, sparsity realised exactly, infeasible
// runs with their reasons), the runner (kill -9 of a running sweep then resume: every run once in results.db,
// finished runs not retrained; a failing run isolated), collect, the Slurm script and the CSV export.
#include <gtest/gtest.h>
#include <signal.h>
#include <sqlite3.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cmath>
#include <filesystem>
#include <fstream>
#include <map>
#include <set>
#include <sstream>
#include <thread>
#include <tuple>

#include <nlohmann/json.hpp>

#include "core/error.h"
#include "core/io.h"
#include "core/rng.h"
#include "data/shard.h"
#include "model/count.h"
#include "sweep/plan.h"
#include "sweep/results.h"
#include "dist/comm.h"
#include "sweep/runner.h"
#include "test_util.h"

namespace moelab {
namespace {

namespace fs = std::filesystem;
using testing::temp_dir;

// A tiny prepared-data directory: train.bin (train_tokens), val.bin and ood_web.bin, vocabulary 64.
fs::path make_data(const fs::path& dir, int64_t train_tokens = 40000) {
  fs::create_directories(dir);
  Rng rng(5);
  auto write = [&](const std::string& name, int64_t n) {
    ShardWriter w((dir / name).string(), 64);
    std::vector<int32_t> ids(n);
    for (int64_t i = 0; i < n; ++i) ids[i] = static_cast<int32_t>((i * 7 + rng.below(5)) % 64);
    w.append(ids);
    w.finish();
  };
  write("train.bin", train_tokens);
  write("val.bin", 2000);
  write("ood_web.bin", 2000);
  return dir;
}

std::string base_spec(const fs::path& data, const std::string& kind, int64_t checkpoint_every = 20) {
  return "[sweep]\nname = \"test\"\nkind = \"" + kind + "\"\ncheckpoint_every = " + std::to_string(checkpoint_every) +
         "\n[base.model]\nvocab_size = 64\nd_model = 32\nn_layers = 2\nn_heads = 2\nseq_len = 16\n"
         "[base.train]\nbatch_size = 4\neval_batches = 2\nlog_every = 1000\npeak_flops = 1e9\nthreads = 1\n"
         "backend = \"" + testing::test_backend_name() + "\"\n"
         "[base.data]\ndir = \"" + data.string() + "\"\n";
}

using testing::error_of;

// Trains every pending run of a sweep through the moelab binary, 2 at a time; progress lines go to `log`.
SweepRunSummary train_sweep(const fs::path& sweep, std::ostringstream& log) {
  SweepRunOptions options;
  options.binary = MOELAB_BINARY;
  options.jobs = 2;
  options.log = &log;
  return run_sweep(sweep.string(), options);
}

const PlannedRun& find_run(const SweepPlan& plan, const std::string& name) {
  for (const auto& r : plan.runs)
    if (r.name == name) return r;
  throw std::runtime_error("no run " + name);
}

TEST(SweepPlan, CompactNumbers) {
  EXPECT_EQ(compact_number(1e12), "1e12");
  EXPECT_EQ(compact_number(1.5e6), "1.5e6");
  EXPECT_EQ(compact_number(2e-5), "2e-5");
  EXPECT_EQ(compact_number(0.75), "0.75");
  EXPECT_EQ(compact_number(100), "100");
}

TEST(SweepPlan, IsoflopTokensFromBudgetWithinOneStepAndSparsityExact) {
  const fs::path dir = temp_dir("sweep_isoflop");
  const fs::path data = make_data(dir / "data");
  const std::string spec = base_spec(data, "isoflop") +
                           "[rules]\nlr = 4e-3\nlr_d_ref = 64\nlr_power = 1.0\nwarmup_fraction = 0.1\n"
                           "[[shape]]\nd_model = 32\nn_layers = 2\nn_heads = 2\n"
                           "[[shape]]\nd_model = 48\nn_layers = 3\nn_heads = 3\n"
                           "[isoflop]\nbudgets = [2e9, 5e9]\nsparsity = [0.0, 0.5, 0.75, 0.875, 0.9]\ntop_k = 2\n";
  const SweepPlan plan = plan_sweep_from_string(spec, "test");
  EXPECT_EQ(plan.runs.size(), 2u * 2u * 5u);
  EXPECT_EQ(plan.corpus_tokens, 40000);
  for (const auto& r : plan.runs) {
    ASSERT_TRUE(r.feasible) << r.name << ": " << r.reason;
    const auto& c = r.config;
    const int64_t tokens_per_step = c.train.batch_size * c.train.grad_accum * c.model.seq_len;
    const double d = r.budget / training_flops_per_token(c.model, FlopConvention::Exact);
    // D rounded up to whole steps: never below the budget's D, and less than one step above it.
    EXPECT_GE(static_cast<double>(r.tokens), d - 1e-6) << r.name;
    EXPECT_LT(static_cast<double>(r.tokens) - d, static_cast<double>(tokens_per_step)) << r.name;
    EXPECT_EQ(r.tokens, c.train.steps * tokens_per_step);
    EXPECT_EQ(r.steps, static_cast<int64_t>(std::ceil(d / tokens_per_step)));
    EXPECT_DOUBLE_EQ(r.flops, r.flops_per_token * static_cast<double>(r.tokens));
    // Sparsity realised exactly: (E - K) / E == S, with K = 2.
    EXPECT_EQ(c.model.moe.top_k, 2);
    EXPECT_EQ(count_parameters(c.model).sparsity, r.target_sparsity) << r.name;
    EXPECT_EQ(c.model.moe.experts, std::llround(2 / (1 - r.target_sparsity)));
    // Rules: lr = 4e-3 * (64 / d)^1, min_lr = lr / 10, warm-up = 10% of the steps; checkpoints every 20 steps.
    EXPECT_NEAR(c.train.lr, 4e-3 * 64.0 / c.model.d_model, 1e-8);
    EXPECT_NEAR(c.train.min_lr, c.train.lr * 0.1, 1e-9);
    EXPECT_EQ(c.train.warmup_steps, std::llround(0.1 * r.steps));
    EXPECT_EQ(c.train.checkpoint_every, 20);
    EXPECT_EQ(c.data.train_path, (data / "train.bin").string());
  }
  // The same budget gives more tokens to the smaller shape.
  EXPECT_GT(find_run(plan, "c2e9-d32l2-e8k2").tokens, find_run(plan, "c2e9-d48l3-e8k2").tokens);
  fs::remove_all(dir);
}

TEST(SweepPlan, InfeasibleRunsAreReportedWithTheirReason) {
  const fs::path dir = temp_dir("sweep_infeasible");
  const fs::path data = make_data(dir / "data", 20000);
  // 1e6 FLOPs is below one step; 1e12 needs far more than 20,000 tokens; S = 0.3 with K = 2 needs E = 2.857.
  const SweepPlan plan = plan_sweep_from_string(
      base_spec(data, "isoflop") + "[isoflop]\nbudgets = [1e6, 2e9, 1e12]\nsparsity = [0.3, 0.75]\ntop_k = 2\n", "t");
  auto reason = [&](const std::string& name) {
    const PlannedRun& r = find_run(plan, name);
    EXPECT_FALSE(r.feasible) << name;
    return r.reason;
  };
  EXPECT_NE(reason("c1e6-d32l2-e8k2").find("below one optimizer step"), std::string::npos);
  EXPECT_NE(reason("c1e12-d32l2-e8k2").find("training shard holds 20000"), std::string::npos);
  EXPECT_NE(reason("c2e9-d32l2-s0.3").find("not an integer"), std::string::npos);
  EXPECT_TRUE(find_run(plan, "c2e9-d32l2-e8k2").feasible);
  EXPECT_EQ(plan.feasible_runs().size(), 1u);
  EXPECT_NE(plan_table(plan).find("INFEASIBLE"), std::string::npos);

  // Granularity not dividing d_ff (128), and K not an integer with E fixed.
  const SweepPlan g = plan_sweep_from_string(
      base_spec(data, "granularity") + "[granularity]\ngranularity = [1, 3, 4]\nexpansion = 4\ntokens = [2000]\n", "t");
  EXPECT_TRUE(find_run(g, "t2e3-d32l2-x4g4").feasible);
  EXPECT_EQ(find_run(g, "t2e3-d32l2-x4g4").config.model.moe.routed_experts(), 16);
  // Constant active FLOPs across G: the active parameters differ only by the router (E_total * d_model per layer).
  EXPECT_EQ(find_run(g, "t2e3-d32l2-x4g4").counts.active - find_run(g, "t2e3-d32l2-x4g1").counts.active,
            (16 - 4) * 32 * 2);
  EXPECT_NE(find_run(g, "t2e3-d32l2-x4g3").reason.find("does not divide d_ff = 128"), std::string::npos);
  const SweepPlan e = plan_sweep_from_string(
      base_spec(data, "isoflop") + "[isoflop]\nbudgets = [2e9]\nsparsity = [0.5, 0.6]\nexperts = 8\n", "t");
  EXPECT_TRUE(find_run(e, "c2e9-d32l2-e8k4").feasible);
  EXPECT_NE(find_run(e, "c2e9-d32l2-s0.6").reason.find("needs top_k = 3.2"), std::string::npos);

  // Fixed total parameters: no ladder shape within the tolerance.
  const SweepPlan p = plan_sweep_from_string(
      base_spec(data, "fixed_params") +
          "[[shape]]\nd_model = 32\nn_layers = 2\nn_heads = 2\n[fixed_params]\nparams = [1e9]\nsparsity = [0.5]\n"
          "tokens = [2000]\n",
      "t");
  ASSERT_EQ(p.runs.size(), 1u);
  EXPECT_NE(p.runs[0].reason.find("add a shape to the ladder"), std::string::npos);

  // Malformed specs are errors, not infeasible runs.
  EXPECT_NE(error_of([&] { plan_sweep_from_string(base_spec(data, "isoflop") + "[isoflop]\nbudget = [1]\n", "t"); })
                .find("unknown key 'budget'"),
            std::string::npos);
  EXPECT_NE(error_of([&] { plan_sweep_from_string(base_spec(data, "nope"), "t"); }).find("must be one of"),
            std::string::npos);
  // The spec's tables go through the config's schema code: the same did-you-mean, the same wording of a wrong type
  // or an out-of-range value.
  const std::string misspelt =
      error_of([&] { plan_sweep_from_string(base_spec(data, "isoflop") + "[isoflop]\nbudget = [1]\n", "t"); });
  EXPECT_NE(misspelt.find("sweep spec: unknown key 'budget' in [isoflop] (did you mean 'budgets'?); known: budgets, "
                          "experts, granularity, sparsity, top_k"),
            std::string::npos)
      << misspelt;
  const std::string typed = error_of([&] {
    plan_sweep_from_string(base_spec(data, "isoflop") + "[isoflop]\nbudgets = [1e9]\nsparsity = [0.5]\ntop_k = \"two\"\n",
                           "t");
  });
  EXPECT_NE(typed.find("sweep spec: [isoflop] top_k expects int, got a string"), std::string::npos) << typed;
  const std::string listed = error_of([&] {
    plan_sweep_from_string(base_spec(data, "isoflop") + "[isoflop]\nbudgets = [1e9, \"big\"]\nsparsity = [0.5]\n", "t");
  });
  EXPECT_NE(listed.find("sweep spec: [isoflop] budgets expects [number], got an array holding a string"),
            std::string::npos)
      << listed;
  const std::string ranged = error_of([&] {
    plan_sweep_from_string(base_spec(data, "isoflop") + "[isoflop]\nbudgets = [1e9]\nsparsity = [0.5]\ntop_k = 0\n",
                           "t");
  });
  EXPECT_NE(ranged.find("sweep spec: [isoflop] top_k = 0.0 is out of range [1, 1048576]"), std::string::npos) << ranged;
  EXPECT_NE(error_of([] { config_from_string("[model]\nd_model = \"big\"\n", {}, "run.toml"); })
                .find("config key 'model.d_model' in run.toml expects int, got a string"),
            std::string::npos);
  fs::remove_all(dir);
}

TEST(SweepPlan, WritesResolvedConfigsAndRefusesADifferentPlan) {
  const fs::path dir = temp_dir("sweep_write");
  const fs::path data = make_data(dir / "data");
  const std::string spec = base_spec(data, "list") +
                           "[[run]]\nname = \"a\"\nsteps = 7\n"
                           "[[run]]\nname = \"b\"\nset = [\"moe.experts=4\", \"train.lr=0.02\"]\ntokens = 300\n";
  SweepPlan plan = plan_sweep_from_string(spec, "t");
  write_plan(plan, (dir / "sweep").string(), spec);
  const Config b = load_config((dir / "sweep" / "runs" / "b" / "config.toml").string(), {});
  EXPECT_EQ(b.train.out_dir, (dir / "sweep" / "runs" / "b").string());
  EXPECT_EQ(b.model.moe.experts, 4);
  EXPECT_DOUBLE_EQ(b.train.lr, 0.02);  // the run's own setting wins over the lr rule
  EXPECT_EQ(b.train.steps, 5);         // ceil(300 / 64)
  EXPECT_EQ(load_config((dir / "sweep" / "runs" / "a" / "config.toml").string(), {}).train.steps, 7);
  const auto j = nlohmann::json::parse(read_file((dir / "sweep" / "plan.json").string(), "t"));
  EXPECT_EQ(j["runs"][1]["index"], 1);
  EXPECT_EQ(read_plan((dir / "sweep").string()).runs.size(), 2u);
  SweepPlan again = plan_sweep_from_string(spec, "t");
  EXPECT_NO_THROW(write_plan(again, (dir / "sweep").string(), spec));
  SweepPlan other = plan_sweep_from_string(spec + "[[run]]\nname = \"c\"\nsteps = 3\n", "t");
  EXPECT_NE(error_of([&] { write_plan(other, (dir / "sweep").string(), spec); }).find("different sweep plan"),
            std::string::npos);
  fs::remove_all(dir);
}

// Rows of results.db: name -> status.
std::map<std::string, std::string> db_rows(const fs::path& db_path, int64_t* row_count = nullptr) {
  std::map<std::string, std::string> rows;
  sqlite3* db = nullptr;
  EXPECT_EQ(sqlite3_open_v2(db_path.c_str(), &db, SQLITE_OPEN_READONLY, nullptr), SQLITE_OK);
  sqlite3_stmt* stmt = nullptr;
  EXPECT_EQ(sqlite3_prepare_v2(db, "SELECT name, status, loss, params, tokens, sparsity FROM results", -1, &stmt, nullptr),
            SQLITE_OK);
  int64_t n = 0;
  while (stmt && sqlite3_step(stmt) == SQLITE_ROW) {
    rows[reinterpret_cast<const char*>(sqlite3_column_text(stmt, 0))] =
        reinterpret_cast<const char*>(sqlite3_column_text(stmt, 1));
    ++n;
  }
  sqlite3_finalize(stmt);
  sqlite3_close(db);
  if (row_count) *row_count = n;
  return rows;
}

int count_of(const std::string& text, const std::string& needle) {
  int n = 0;
  for (size_t p = text.find(needle); p != std::string::npos; p = text.find(needle, p + 1)) ++n;
  return n;
}

TEST(SweepRun, KillNineThenRerunResumesAndTrainsEachRunOnce) {
  const fs::path dir = temp_dir("sweep_kill");
  const fs::path data = make_data(dir / "data", 300000);
  std::string spec = base_spec(data, "list", 10);
  for (const char* name : {"r0", "r1", "r2"})
    spec += std::string("[[run]]\nname = \"") + name +
            "\"\nsteps = 300\nset = [\"model.d_model=64\", \"model.seq_len=32\", \"train.batch_size=8\", "
            "\"moe.experts=4\", \"moe.top_k=2\"]\n";
  SweepPlan plan = plan_sweep_from_string(spec, "t");
  ASSERT_EQ(plan.feasible_runs().size(), 3u) << plan_table(plan);
  const fs::path sweep = dir / "sweep";
  write_plan(plan, sweep.string(), spec);

  SweepRunOptions options;
  options.binary = MOELAB_BINARY;
  options.jobs = 1;
  const pid_t pid = ::fork();
  ASSERT_GE(pid, 0);
  if (pid == 0) {  // the sweep runner, in its own process group so it and its children die together
    ::setpgid(0, 0);
    std::ofstream log((dir / "first.log").string());
    options.log = &log;
    try {
      run_sweep(sweep.string(), options);
    } catch (...) {
      ::_exit(1);
    }
    ::_exit(0);
  }
  ::setpgid(pid, pid);
  // Kill once r0 is finished and r1 is mid-way (has a checkpoint, no result).
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(60);
  bool mid_way = false;
  while (std::chrono::steady_clock::now() < deadline) {
    auto r0 = read_result((sweep / "runs" / "r0").string());
    if (r0 && fs::exists(sweep / "runs" / "r1" / "checkpoint") && !fs::exists(sweep / "runs" / "r1" / "result.json")) {
      mid_way = true;
      break;
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(2));
  }
  ::kill(-pid, SIGKILL);
  int status = 0;
  ::waitpid(pid, &status, 0);
  ASSERT_TRUE(mid_way) << "never saw r1 mid-way; log:\n" << read_file((dir / "first.log").string(), "log");
  ASSERT_TRUE(WIFSIGNALED(status));
  // Give the killed trainer (SIGKILLed with its group) a moment to be reaped by init.
  std::this_thread::sleep_for(std::chrono::milliseconds(100));
  const std::string r0_result = read_file((sweep / "runs" / "r0" / "result.json").string(), "r0");
  EXPECT_EQ(read_result((sweep / "runs" / "r0").string())->status, "ok");

  std::ostringstream status_text;
  status_text << sweep_status(sweep.string());
  EXPECT_NE(status_text.str().find("1/3 done"), std::string::npos) << status_text.str();
  EXPECT_NE(status_text.str().find("interrupted at step"), std::string::npos) << status_text.str();

  std::ostringstream second_log;
  options.log = &second_log;
  options.jobs = 2;
  const SweepRunSummary s = run_sweep(sweep.string(), options);
  EXPECT_EQ(s.skipped, 1);
  EXPECT_EQ(s.ok, 2);
  EXPECT_EQ(s.failed, 0);

  int64_t rows = 0;
  const auto db = db_rows(sweep / "results.db", &rows);
  EXPECT_EQ(rows, 3);
  for (const char* name : {"r0", "r1", "r2"}) EXPECT_EQ(db.count(name) ? db.at(name) : "", "ok") << name;
  // r0 was not retrained: one attempt in its log, its result untouched.
  EXPECT_EQ(count_of(read_file((sweep / "runs" / "r0" / "train.log").string(), "log"), "training attempt started"), 1);
  EXPECT_EQ(read_file((sweep / "runs" / "r0" / "result.json").string(), "r0"), r0_result);
  // r1 resumed from its checkpoint and logged every step exactly once.
  const std::string r1_log = read_file((sweep / "runs" / "r1" / "train.log").string(), "log");
  EXPECT_EQ(count_of(r1_log, "training attempt started"), 2);
  EXPECT_NE(r1_log.find("resuming from"), std::string::npos);
  const RunResult r1 = *read_result((sweep / "runs" / "r1").string());
  EXPECT_EQ(r1.steps_done, 300);
  EXPECT_TRUE(std::isfinite(r1.val_loss));
  EXPECT_EQ(r1.ood_losses.count("ood_web_loss"), 1u);
  EXPECT_EQ(r1.experts, 4);
  EXPECT_DOUBLE_EQ(r1.sparsity, 0.5);
  // A third invocation has nothing left to do.
  std::ostringstream third_log;
  options.log = &third_log;
  EXPECT_EQ(run_sweep(sweep.string(), options).skipped, 3);
  fs::remove_all(dir);
}

TEST(SweepRun, AFailingRunIsRecordedAndTheOthersFinish) {
  const fs::path dir = temp_dir("sweep_fail");
  const fs::path data = make_data(dir / "data");
  const std::string spec = base_spec(data, "list") +
                           "[[run]]\nname = \"good\"\nsteps = 20\nset = [\"moe.experts=4\"]\n"
                           "[[run]]\nname = \"bad\"\nsteps = 20\n"
                           "[[run]]\nname = \"good2\"\nsteps = 20\n";
  SweepPlan plan = plan_sweep_from_string(spec, "t");
  const fs::path sweep = dir / "sweep";
  write_plan(plan, sweep.string(), spec);
  // Break one run's config after planning, as a hand edit would.
  write_file_atomic((sweep / "runs" / "bad" / "config.toml").string(), "[model]\nnot_a_key = 3\n");

  std::ostringstream log;
  SweepRunOptions options;
  options.binary = MOELAB_BINARY;
  options.jobs = 2;
  options.log = &log;
  const SweepRunSummary s = run_sweep(sweep.string(), options);
  EXPECT_EQ(s.ok, 2);
  EXPECT_EQ(s.failed, 1);
  const RunResult bad = *read_result((sweep / "runs" / "bad").string());
  EXPECT_EQ(bad.status, "failed");
  EXPECT_EQ(bad.exit_code, 1);
  EXPECT_NE(bad.error.find("not_a_key"), std::string::npos) << bad.error;
  const auto db = db_rows(sweep / "results.db");
  EXPECT_EQ(db.at("bad"), "failed");
  EXPECT_EQ(db.at("good"), "ok");
  EXPECT_EQ(db.at("good2"), "ok");
  EXPECT_NE(sweep_status(sweep.string()).find("failed: training exited with code 1"), std::string::npos);

  // Export: the fitting tool's columns, ok runs only unless --all.
  const std::string csv = results_csv(read_results(sweep.string()), "smoothed", false);
  std::istringstream lines(csv);
  std::string header, row;
  std::getline(lines, header);
  for (const char* col : {"params", "tokens", "loss", "sparsity", "granularity", "flops", "val_loss", "ood_web_loss"})
    EXPECT_NE(("," + header + ",").find(std::string(",") + col + ","), std::string::npos) << col << " in " << header;
  int n = 0;
  while (std::getline(lines, row)) ++n;
  EXPECT_EQ(n, 2);
  EXPECT_EQ(count_of(results_csv(read_results(sweep.string()), "final", true), "\n"), 4);
  EXPECT_NE(csv.find("good,ok,"), std::string::npos);

  // Collect rebuilds the database from the result files alone.
  fs::remove(sweep / "results.db");
  EXPECT_EQ(collect_results(sweep.string()), 3);
  int64_t rows = 0;
  EXPECT_EQ(db_rows(sweep / "results.db", &rows).at("good2"), "ok");
  EXPECT_EQ(rows, 3);
  fs::remove_all(dir);
}

TEST(SweepSlurm, ScriptIsAnArrayOfIndexedRunsAndIndexModeWritesNoDatabase) {
  const fs::path dir = temp_dir("sweep_slurm");
  const fs::path data = make_data(dir / "data");
  const std::string spec = base_spec(data, "isoflop") +
                           "[isoflop]\nbudgets = [1e6, 1e9]\nsparsity = [0.5, 0.75]\n";  // 1e6: infeasible
  SweepPlan plan = plan_sweep_from_string(spec, "t");
  const fs::path sweep = dir / "sweep";
  write_plan(plan, sweep.string(), spec);
  SlurmOptions o;
  o.partition = "debug";
  o.time = "01:00:00";
  o.cpus = 4;
  o.binary = "/opt/moelab/bin/moelab";
  const std::string script = slurm_script(sweep.string(), o);
  EXPECT_EQ(script.rfind("#!/bin/bash\n", 0), 0u);
  EXPECT_NE(script.find("#SBATCH --array=0-1\n"), std::string::npos) << script;  // two feasible runs
  EXPECT_NE(script.find("#SBATCH --partition=debug\n"), std::string::npos);
  EXPECT_NE(script.find("#SBATCH --time=01:00:00\n"), std::string::npos);
  EXPECT_NE(script.find("#SBATCH --cpus-per-task=4\n"), std::string::npos);
  EXPECT_NE(script.find("/opt/moelab/bin/moelab sweep run " + sweep.string() + " --index \"$SLURM_ARRAY_TASK_ID\""),
            std::string::npos)
      << script;
  EXPECT_NE(script.find("moelab sweep collect"), std::string::npos);
  o.max_parallel = 1;
  EXPECT_NE(slurm_script(sweep.string(), o).find("#SBATCH --array=0-1%1\n"), std::string::npos);

  // What an array task does: train one run by index, write its result.json, never touch results.db.
  std::ostringstream log;
  SweepRunOptions options;
  options.binary = MOELAB_BINARY;
  options.index = 1;
  options.log = &log;
  const SweepRunSummary s = run_sweep(sweep.string(), options);
  EXPECT_EQ(s.ok, 1);
  const auto runs = read_plan(sweep.string()).feasible_runs();
  EXPECT_EQ(read_result((sweep / "runs" / runs[1]->name).string())->status, "ok");
  EXPECT_FALSE(read_result((sweep / "runs" / runs[0]->name).string()).has_value());
  EXPECT_FALSE(fs::exists(sweep / "results.db"));
  options.index = 2;
  EXPECT_NE(error_of([&] { run_sweep(sweep.string(), options); }).find("out of range"), std::string::npos);
  EXPECT_EQ(collect_results(sweep.string()), 1);
  fs::remove_all(dir);
}


// A sweep mixing one-process and two-process runs: the plan counts the global batch (processes x one process's),
// `sweep run` starts the two-process run under mpirun (here: expert parallel), and the Slurm script gets room for it.
TEST(SweepRun, MixesOneProcessAndMultiProcessRuns) {
  if (!mpi_available()) GTEST_SKIP() << "built without MPI";
  if (testing::test_backend_name() != "cpu") GTEST_SKIP() << "the MPI run is tested on cpu";
  ::setenv("OMPI_MCA_btl_vader_single_copy_mechanism", "none", 1);
  const fs::path dir = temp_dir("sweep_mpi");
  const fs::path data = make_data(dir / "data");
  const std::string spec = base_spec(data, "list") +
                           "[[run]]\nname = \"one\"\nsteps = 6\nset = [\"moe.experts=4\", \"moe.top_k=2\"]\n"
                           "[[run]]\nname = \"two\"\nsteps = 6\nprocesses = 2\n"
                           "set = [\"moe.experts=4\", \"moe.top_k=2\", \"dist.expert_parallel=2\"]\n"
                           "[[run]]\nname = \"odd\"\nsteps = 6\nprocesses = 3\n"
                           "set = [\"moe.experts=4\", \"moe.top_k=2\", \"dist.expert_parallel=2\"]\n";
  SweepPlan plan = plan_sweep_from_string(spec, "t");
  EXPECT_EQ(find_run(plan, "one").tokens, 6 * 4 * 16);
  EXPECT_EQ(find_run(plan, "two").tokens, 6 * 4 * 16 * 2) << "two processes train twice the tokens per step";
  EXPECT_FALSE(find_run(plan, "odd").feasible);
  EXPECT_NE(find_run(plan, "odd").reason.find("does not divide the run's 3 processes"), std::string::npos);
  const fs::path sweep = dir / "sweep";
  write_plan(plan, sweep.string(), spec);
  EXPECT_EQ(read_plan(sweep.string()).feasible_runs()[1]->processes, 2);

  SlurmOptions o;
  EXPECT_NE(error_of([&] { slurm_script(sweep.string(), o); }).find("runs of 2 processes"), std::string::npos);
  o.tasks_per_node = 2;
  const std::string script = slurm_script(sweep.string(), o);
  EXPECT_NE(script.find("#SBATCH --nodes=1\n#SBATCH --ntasks-per-node=2\n"), std::string::npos) << script;

  std::ostringstream log;
  SweepRunOptions options;
  options.binary = MOELAB_BINARY;
  options.jobs = 2;
  options.log = &log;
  const SweepRunSummary s = run_sweep(sweep.string(), options);
  EXPECT_EQ(s.ok, 2) << log.str() << read_file((sweep / "runs" / "two" / "train.log").string(), "log");
  EXPECT_NE(log.str().find("2 processes"), std::string::npos) << log.str();
  const std::string train_log = read_file((sweep / "runs" / "two" / "train.log").string(), "log");
  EXPECT_NE(train_log.find("2 processes x 1 threads"), std::string::npos) << train_log;
  EXPECT_NE(train_log.find("expert parallelism"), std::string::npos) << train_log;
  fs::remove_all(dir);
}

}  // namespace
}  // namespace moelab

namespace moelab {
namespace {

// [vary]: the routing options as sweep dimensions. Every MoE run is repeated per combination (named and grouped by
// it), the dense baseline once; then the sweep trains every run.
TEST(SweepVary, BalanceAndScoreVariantsPlanAndRun) {
  const fs::path dir = temp_dir("sweep_vary");
  const fs::path data = make_data(dir / "data");
  const std::string spec = base_spec(data, "list") +
                           "[[run]]\nname = \"moe\"\nsteps = 6\nset = [\"moe.experts=4\", \"moe.top_k=2\"]\n"
                           "[[run]]\nname = \"dense\"\nsteps = 6\n"
                           "[vary]\n\"moe.balance\" = [\"aux_loss\", \"bias\"]\n\"moe.score\" = [\"softmax\", \"sigmoid\"]\n";
  SweepPlan plan = plan_sweep_from_string(spec, "t");
  ASSERT_EQ(plan.runs.size(), 5u);
  const PlannedRun& r = find_run(plan, "moe-balance_bias-score_sigmoid");
  EXPECT_TRUE(r.feasible) << r.reason;
  EXPECT_EQ(r.config.model.moe.balance, BalanceKind::Bias);
  EXPECT_EQ(r.config.model.moe.score, ScoreKind::Sigmoid);
  EXPECT_EQ(r.group, "list-balance_bias-score_sigmoid");
  EXPECT_EQ(find_run(plan, "moe-balance_aux_loss-score_softmax").config.model.moe.balance, BalanceKind::AuxLoss);
  EXPECT_FALSE(find_run(plan, "dense").config.model.moe.enabled());
  EXPECT_NE(error_of([&] { plan_sweep_from_string(spec + "\"moe.nope\" = [1]\n", "t"); }).find("moe.nope"),
            std::string::npos);

  const fs::path sweep = dir / "sweep";
  write_plan(plan, sweep.string(), spec);
  std::ostringstream log;
  const SweepRunSummary s = train_sweep(sweep, log);
  EXPECT_EQ(s.ok, 5) << log.str();
  // The bias variant's metrics carry the bias range and the overload factor.
  const std::string metrics = read_file((sweep / "runs" / "moe-balance_bias-score_sigmoid" / "metrics.jsonl").string(),
                                        "metrics");
  EXPECT_NE(metrics.find("\"bias_max\""), std::string::npos);
  EXPECT_NE(metrics.find("\"overload\""), std::string::npos);
  fs::remove_all(dir);
}

}  // namespace
}  // namespace moelab

namespace moelab {
namespace {

// Replicates: [sweep] seeds repeat every run, a [[run]]'s own seeds win; the store keeps each run's seed, and the
// CSV export carries it, so fits see every replicate and can measure the noise between them.
TEST(SweepSeeds, RunsRepeatOverSeedsAndTheStoreKeepsTheSeed) {
  const fs::path dir = temp_dir("sweep_seeds");
  const fs::path data = make_data(dir / "data");
  std::string spec = base_spec(data, "list") +
                     "[[run]]\nname = \"a\"\nsteps = 4\n"
                     "[[run]]\nname = \"b\"\nsteps = 4\nseeds = [7]\n";
  spec.insert(spec.find("[base.model]"), "seeds = [1, 2]\n");
  SweepPlan plan = plan_sweep_from_string(spec, "t");
  ASSERT_EQ(plan.runs.size(), 3u);
  EXPECT_EQ(find_run(plan, "a").config.train.seed, 1);
  EXPECT_EQ(find_run(plan, "a-s2").config.train.seed, 2);
  EXPECT_EQ(find_run(plan, "b").config.train.seed, 7);
  EXPECT_EQ(find_run(plan, "a-s2").group, find_run(plan, "a").group);
  EXPECT_NE(error_of([&] {
              std::string bad = spec;
              bad.replace(bad.find("seeds = [1, 2]"), 14, "seeds = [1.5]");
              plan_sweep_from_string(bad, "t");
            }).find("seeds"),
            std::string::npos);
  const fs::path sweep = dir / "sweep";
  write_plan(plan, sweep.string(), spec);
  std::ostringstream log;
  EXPECT_EQ(train_sweep(sweep, log).ok, 3) << log.str();
  sqlite3* db = nullptr;
  ASSERT_EQ(sqlite3_open((sweep / "results.db").string().c_str(), &db), SQLITE_OK);
  sqlite3_stmt* stmt = nullptr;
  ASSERT_EQ(sqlite3_prepare_v2(db, "SELECT name, seed, data_seed FROM results ORDER BY name", -1, &stmt, nullptr),
            SQLITE_OK);
  std::map<std::string, int64_t> seeds;
  while (sqlite3_step(stmt) == SQLITE_ROW) {
    seeds[reinterpret_cast<const char*>(sqlite3_column_text(stmt, 0))] = sqlite3_column_int64(stmt, 1);
    // train.data_seed unset: the windows' order follows train.seed, and the store says so.
    EXPECT_EQ(sqlite3_column_int64(stmt, 2), sqlite3_column_int64(stmt, 1));
  }
  sqlite3_finalize(stmt);
  sqlite3_close(db);
  EXPECT_EQ(seeds, (std::map<std::string, int64_t>{{"a", 1}, {"a-s2", 2}, {"b", 7}}));
  const std::string csv = results_csv(read_results(sweep.string()), "smoothed", false);
  EXPECT_NE(csv.substr(0, csv.find('\n')).find(",seed,data_seed"), std::string::npos);
  // The two replicates of "a" trained differently.
  EXPECT_NE(read_result((sweep / "runs" / "a").string())->loss, read_result((sweep / "runs" / "a-s2").string())->loss);
  fs::remove_all(dir);
}

}  // namespace
}  // namespace moelab

namespace moelab {
namespace {

// `sweep suggest --append` on a finished sweep: it proposes runs of the plan's models at new token counts within
// the FLOP limit, appends them to the plan, and `sweep run` then trains exactly those.
TEST(SweepSuggest, ProposesAppendsAndTheSweepTrainsThem) {
  const fs::path dir = temp_dir("sweep_suggest");
  const fs::path data = make_data(dir / "data", 80000);
  std::string spec = base_spec(data, "list");
  for (int d : {16, 32, 48})
    for (int steps : {6, 12, 24})
      spec += "[[run]]\nname = \"d" + std::to_string(d) + "-s" + std::to_string(steps) + "\"\nsteps = " +
              std::to_string(steps) + "\nset = [\"model.d_model=" + std::to_string(d) + "\"]\n";
  SweepPlan plan = plan_sweep_from_string(spec, "t");
  const fs::path sweep = dir / "sweep";
  write_plan(plan, sweep.string(), spec);
  std::ostringstream log;
  ASSERT_EQ(train_sweep(sweep, log).ok, 9) << log.str();
  const std::string cmd = std::string(MOELAB_BINARY) + " sweep suggest " + sweep.string() +
                          " --target-budget 1e13 --count 2 --max-flops 3e11 --bootstrap 32 --append --json";
  FILE* pipe = popen(cmd.c_str(), "r");
  ASSERT_NE(pipe, nullptr);
  std::string out;
  char buf[4096];
  while (size_t n = fread(buf, 1, sizeof buf, pipe)) out.append(buf, n);
  ASSERT_EQ(pclose(pipe), 0) << out;
  const auto j = nlohmann::json::parse(out);
  ASSERT_EQ(j["suggestions"].size(), 2u) << out;
  for (const auto& s : j["suggestions"]) {
    EXPECT_LE(s["flops"].get<double>(), 3e11);
    EXPECT_LE(s["sd_log_n_star_after"].get<double>(), s["sd_log_n_star_before"].get<double>() + 1e-12);
  }
  EXPECT_EQ(j["appended"], 2);
  const SweepPlan grown = read_plan(sweep.string());
  ASSERT_EQ(grown.runs.size(), 11u) << out << read_file((sweep / "plan.json").string(), "plan").substr(0, 3000);
  EXPECT_EQ(grown.runs.back().group, "suggested");
  const SweepRunSummary second = train_sweep(sweep, log);
  EXPECT_EQ(second.ok, 2) << log.str();
  EXPECT_EQ(second.skipped, 9);
  fs::remove_all(dir);
}

}  // namespace
}  // namespace moelab

namespace moelab {
namespace {

// `sweep replicate`: the best dense and MoE run of each budget, again with more seeds, appended and trained.
TEST(SweepReplicate, RepeatsTheBestDenseAndMoeOfEachBudget) {
  const fs::path dir = temp_dir("sweep_replicate");
  const fs::path data = make_data(dir / "data");
  std::string spec = base_spec(data, "list");
  for (const char* budget : {"5e8", "1e9"})
    for (const char* moe : {"", "moe.experts=4"})
      for (const char* width : {"model.d_model=16", "model.d_model=32"}) {
        spec += std::string("[[run]]\nname = \"c") + budget + (*moe ? "-moe" : "-dense") + "-" + (width + 14) +
                "\"\nbudget = " + budget + "\nset = [\"" + width + "\"" + (*moe ? std::string(", \"") + moe + "\"" : "") +
                "]\n";
      }
  SweepPlan plan = plan_sweep_from_string(spec, "t");
  ASSERT_EQ(plan.runs.size(), 8u) << spec;
  const fs::path sweep = dir / "sweep";
  write_plan(plan, sweep.string(), spec);
  std::ostringstream log;
  ASSERT_EQ(train_sweep(sweep, log).ok, 8) << log.str();
  const std::string cmd = std::string(MOELAB_BINARY) + " sweep replicate " + sweep.string() + " --seeds 2 > /dev/null";
  ASSERT_EQ(std::system(cmd.c_str()), 0);
  const SweepPlan grown = read_plan(sweep.string());
  ASSERT_EQ(grown.runs.size(), 12u);  // 2 budgets x (dense, MoE) x 1 more seed
  for (size_t i = 8; i < 12; ++i) {
    EXPECT_NE(grown.runs[i].name.find("-s2"), std::string::npos);
    EXPECT_EQ(grown.runs[i].config.train.seed, 2);
  }
  ASSERT_EQ(std::system(cmd.c_str()), 0);  // again: nothing new
  EXPECT_EQ(read_plan(sweep.string()).runs.size(), 12u);
  const SweepRunSummary second = train_sweep(sweep, log);
  EXPECT_EQ(second.ok, 4) << log.str();
  fs::remove_all(dir);
}

}  // namespace
}  // namespace moelab

namespace moelab {
namespace {

// A [[shape]]'s own budgets: the shape is planned only at those budgets of the sweep; a budget the sweep does not
// have is an error naming the table.
TEST(SweepPlan, ShapeBudgetsLimitAShapeToSomeBudgets) {
  const fs::path dir = temp_dir("sweep_shape_budgets");
  const fs::path data = make_data(dir / "data");
  const std::string shapes = "[[shape]]\nd_model = 32\nn_layers = 2\nn_heads = 2\n"
                             "[[shape]]\nd_model = 48\nn_layers = 3\nn_heads = 3\n"
                             "[[shape]]\nd_model = 64\nn_layers = 2\nn_heads = 2\nbudgets = [5e9]\n";
  const SweepPlan plan = plan_sweep_from_string(
      base_spec(data, "isoflop") + shapes + "[isoflop]\nbudgets = [2e9, 5e9]\nsparsity = [0.5, 0.75]\ntop_k = 2\n",
      "t");
  std::set<std::string> names;
  for (const auto& r : plan.runs) names.insert(r.name);
  EXPECT_EQ(plan.runs.size(), 10u);  // 2 budgets x 2 shapes x 2 sparsities, and the d64 shape at 5e9 only
  const std::set<std::string> expected = {
      "c2e9-d32l2-e4k2", "c2e9-d32l2-e8k2", "c2e9-d48l3-e4k2", "c2e9-d48l3-e8k2", "c5e9-d32l2-e4k2",
      "c5e9-d32l2-e8k2", "c5e9-d48l3-e4k2", "c5e9-d48l3-e8k2", "c5e9-d64l2-e4k2", "c5e9-d64l2-e8k2"};
  EXPECT_EQ(names, expected);
  for (const auto& r : plan.runs) {
    if (r.config.model.d_model == 64) {
      EXPECT_DOUBLE_EQ(r.budget, 5e9) << r.name;
    }
  }

  // The dense baseline follows the shape's budgets too.
  std::string with_dense = base_spec(data, "isoflop") + shapes + "[isoflop]\nbudgets = [2e9, 5e9]\nsparsity = [0.75]\n";
  with_dense.insert(with_dense.find("[base.model]"), "dense_baseline = true\n");
  const SweepPlan dense = plan_sweep_from_string(with_dense, "t");
  EXPECT_EQ(dense.runs.size(), 10u);  // (2 + 2 + 1) shape-budgets x (dense, e8k2)
  EXPECT_NO_THROW(find_run(dense, "c5e9-d64l2-dense"));
  EXPECT_THROW(find_run(dense, "c2e9-d64l2-dense"), std::runtime_error);
  EXPECT_THROW(find_run(dense, "c2e9-d64l2-e8k2"), std::runtime_error);

  // Granularity with a budgets axis.
  const SweepPlan g = plan_sweep_from_string(
      base_spec(data, "granularity") + shapes + "[granularity]\ngranularity = [1, 2]\nexpansion = 4\nbudgets = [2e9, 5e9]\n",
      "t");
  EXPECT_EQ(g.runs.size(), 10u);  // (2 + 2 + 1) shape-budgets x 2 granularities
  EXPECT_NO_THROW(find_run(g, "c5e9-d64l2-x4g2"));
  EXPECT_THROW(find_run(g, "c2e9-d64l2-x4g2"), std::runtime_error);

  // Fixed total parameters: the nearest shape is chosen among those planned at the budget. For the dense baseline,
  // N = 1e5 is nearest the d48l3 shape (limited to 5e9 here); at 2e9 only d32l2 is left.
  const std::string fixed_shapes = "[[shape]]\nd_model = 32\nn_layers = 2\nn_heads = 2\n"
                                   "[[shape]]\nd_model = 48\nn_layers = 3\nn_heads = 3\nbudgets = [5e9]\n";
  std::string fixed_spec = base_spec(data, "fixed_params") + fixed_shapes +
                           "[fixed_params]\nparams = [1e5]\nsparsity = [0.5]\nbudgets = [2e9, 5e9]\ntolerance = 100\n";
  fixed_spec.insert(fixed_spec.find("[base.model]"), "dense_baseline = true\n");
  const SweepPlan p = plan_sweep_from_string(fixed_spec, "t");
  ASSERT_EQ(p.runs.size(), 4u);
  EXPECT_EQ(find_run(p, "n1e5-c5e9-dense-d48l3").config.model.d_model, 48);
  EXPECT_EQ(find_run(p, "n1e5-c2e9-dense-d32l2").config.model.d_model, 32);
  EXPECT_EQ(find_run(p, "n1e5-c2e9-e4k2-d32l2").config.model.d_model, 32);
  for (const auto& r : p.runs) {
    if (r.budget == 2e9) {
      EXPECT_EQ(r.config.model.d_model, 32) << r.name;
    }
  }
  // Without the limit, d48l3 is the dense baseline's nearest shape at both budgets.
  std::string unlimited = fixed_spec;
  unlimited.replace(unlimited.find("budgets = [5e9]\n"), 16, "");
  const SweepPlan u = plan_sweep_from_string(unlimited, "t");
  EXPECT_EQ(find_run(u, "n1e5-c2e9-dense-d48l3").config.model.d_model, 48);
  EXPECT_EQ(find_run(u, "n1e5-c5e9-dense-d48l3").config.model.d_model, 48);

  // A shape budget that is not one of the sweep's: an error naming the table.
  std::string bad = shapes;
  bad.replace(bad.find("budgets = [5e9]"), 15, "budgets = [3e9]");
  EXPECT_NE(error_of([&] {
              plan_sweep_from_string(base_spec(data, "isoflop") + bad + "[isoflop]\nbudgets = [2e9, 5e9]\nsparsity = [0.5]\n",
                                     "t");
            }).find("is not in [isoflop].budgets"),
            std::string::npos);
  EXPECT_NE(error_of([&] {
              plan_sweep_from_string(base_spec(data, "granularity") + bad +
                                         "[granularity]\ngranularity = [1, 2]\nexpansion = 4\nbudgets = [2e9, 5e9]\n",
                                     "t");
            }).find("is not in [granularity].budgets"),
            std::string::npos);
  EXPECT_NE(error_of([&] {
              plan_sweep_from_string(base_spec(data, "fixed_params") + bad +
                                         "[fixed_params]\nparams = [1e5]\nsparsity = [0.5]\nbudgets = [2e9, 5e9]\n",
                                     "t");
            }).find("is not in [fixed_params].budgets"),
            std::string::npos);
  // A token axis has no budgets: a shape with budgets cannot be placed on it.
  EXPECT_NE(error_of([&] {
              plan_sweep_from_string(base_spec(data, "granularity") + shapes +
                                         "[granularity]\ngranularity = [1, 2]\nexpansion = 4\ntokens = [2000]\n",
                                     "t");
            }).find("is not in [granularity].budgets"),
            std::string::npos);
  EXPECT_NE(error_of([&] {
              std::string negative = shapes;
              negative.replace(negative.find("budgets = [5e9]"), 15, "budgets = [-5e9]");
              plan_sweep_from_string(base_spec(data, "isoflop") + negative + "[isoflop]\nbudgets = [5e9]\nsparsity = [0.5]\n",
                                     "t");
            }).find("must be positive"),
            std::string::npos);
  fs::remove_all(dir);
}

// [rules] lr_moe_factor scales the lr rule (and min_lr with it) for MoE runs only.
TEST(SweepPlan, LrMoeFactorScalesTheLrOfMoeRunsOnly) {
  const fs::path dir = temp_dir("sweep_lr_moe");
  const fs::path data = make_data(dir / "data");
  auto spec = [&](const std::string& rules) {
    std::string s = base_spec(data, "isoflop") + "[rules]\nlr = 4e-3\nlr_d_ref = 64\nlr_power = 1.0\nmin_lr_ratio = 0.2\n" +
                    rules +
                    "[[shape]]\nd_model = 32\nn_layers = 2\nn_heads = 2\n"
                    "[[shape]]\nd_model = 48\nn_layers = 3\nn_heads = 3\n"
                    "[isoflop]\nbudgets = [2e9]\nsparsity = [0.75]\ntop_k = 2\n";
    s.insert(s.find("[base.model]"), "dense_baseline = true\n");
    return s;
  };
  const SweepPlan plain = plan_sweep_from_string(spec(""), "t");
  const SweepPlan half = plan_sweep_from_string(spec("lr_moe_factor = 0.5\n"), "t");
  ASSERT_EQ(half.runs.size(), 4u);
  for (const char* shape : {"d32l2", "d48l3"}) {
    const auto& dense = find_run(half, std::string("c2e9-") + shape + "-dense").config.train;
    const auto& moe = find_run(half, std::string("c2e9-") + shape + "-e8k2").config.train;
    const int64_t d = find_run(half, std::string("c2e9-") + shape + "-dense").config.model.d_model;
    const double rule = 4e-3 * 64.0 / static_cast<double>(d);
    // Written with 6 significant digits.
    const double tol = 1e-6 * rule;
    EXPECT_NEAR(dense.lr, rule, tol) << shape;
    EXPECT_NEAR(moe.lr, 0.5 * rule, tol) << shape;
    EXPECT_NEAR(dense.min_lr, 0.2 * rule, tol) << shape;
    EXPECT_NEAR(moe.min_lr, 0.2 * 0.5 * rule, tol) << shape;
    // The default factor is 1: MoE and dense alike.
    EXPECT_NEAR(find_run(plain, std::string("c2e9-") + shape + "-e8k2").config.train.lr, rule, tol) << shape;
    EXPECT_NEAR(find_run(plain, std::string("c2e9-") + shape + "-e8k2").config.train.min_lr, 0.2 * rule, tol);
    EXPECT_NEAR(find_run(plain, std::string("c2e9-") + shape + "-dense").config.train.lr, rule, tol) << shape;
  }
  // Written into the run's config.toml as well.
  SweepPlan written = plan_sweep_from_string(spec("lr_moe_factor = 0.5\n"), "t");
  write_plan(written, (dir / "sweep").string(), spec("lr_moe_factor = 0.5\n"));
  EXPECT_NEAR(load_config((dir / "sweep" / "runs" / "c2e9-d32l2-e8k2" / "config.toml").string(), {}).train.lr,
              0.5 * 4e-3 * 2, 1e-9);
  for (const char* bad : {"lr_moe_factor = 0\n", "lr_moe_factor = -0.5\n"})
    EXPECT_NE(error_of([&] { plan_sweep_from_string(spec(bad), "t"); }).find("lr_moe_factor > 0"), std::string::npos)
        << bad;
  fs::remove_all(dir);
}

// One parser for a FLOPs convention's name: config keys and sweep specs give the same choices and the same error,
// and a sweep's convention reaches every run's config as the enum.
TEST(SweepPlan, FlopsConventionIsOneChoiceParsedOnce) {
  for (FlopConvention c : all_flop_conventions()) EXPECT_EQ(parse_flop_convention(to_string(c)), c);
  EXPECT_NE(error_of([] { parse_flop_convention("kaplan2"); }).find(
                "unknown FLOPs convention 'kaplan2': use one of exact, kaplan, chinchilla, abnar, abnar_router, krajewski"),
            std::string::npos);
  EXPECT_NE(error_of([] { config_from_string("", {"train.flops_convention=kaplan2"}); })
                .find("is not one of exact|kaplan|chinchilla|abnar|abnar_router|krajewski"),
            std::string::npos);
  const fs::path dir = temp_dir("sweep_convention");
  const fs::path data = make_data(dir / "data");
  auto spec = [&](const std::string& convention) {
    std::string s = base_spec(data, "isoflop") + "[[shape]]\nd_model = 32\nn_layers = 2\nn_heads = 2\n"
                    "[isoflop]\nbudgets = [2e9]\nsparsity = [0.75]\ntop_k = 2\n";
    s.insert(s.find("[base.model]"), "flops_convention = \"" + convention + "\"\n");
    return s;
  };
  const SweepPlan plan = plan_sweep_from_string(spec("kaplan"), "t");
  ASSERT_FALSE(plan.runs.empty());
  for (const auto& r : plan.runs) EXPECT_EQ(r.config.train.flops_convention, FlopConvention::Kaplan) << r.name;
  EXPECT_NE(error_of([&] { plan_sweep_from_string(spec("kaplan2"), "t"); }).find("unknown FLOPs convention 'kaplan2'"),
            std::string::npos);
  fs::remove_all(dir);
}

// [rules] init_std scales model.init_std with width: init_std * (lr_d_ref / d_model)^init_power; 0 keeps the base's.
TEST(SweepPlan, InitStdRuleScalesTheInitialisationWithWidth) {
  const fs::path dir = temp_dir("sweep_init_std");
  const fs::path data = make_data(dir / "data");
  auto spec = [&](const std::string& rules) {
    return base_spec(data, "isoflop") + "[rules]\nlr = 4e-3\nlr_d_ref = 64\n" + rules +
           "[[shape]]\nd_model = 32\nn_layers = 2\nn_heads = 2\n"
           "[[shape]]\nd_model = 48\nn_layers = 3\nn_heads = 3\n"
           "[isoflop]\nbudgets = [2e9]\nsparsity = [0.75]\ntop_k = 2\n";
  };
  const SweepPlan scaled = plan_sweep_from_string(spec("init_std = 0.1\n"), "t");
  for (const auto& r : scaled.runs)
    EXPECT_NEAR(r.config.model.init_std, 0.1 * std::sqrt(64.0 / static_cast<double>(r.config.model.d_model)), 1e-6)
        << r.name;
  const SweepPlan linear = plan_sweep_from_string(spec("init_std = 0.1\ninit_power = 1\n"), "t");
  EXPECT_NEAR(find_run(linear, "c2e9-d32l2-e8k2").config.model.init_std, 0.2, 1e-6);
  const SweepPlan off = plan_sweep_from_string(spec(""), "t");
  EXPECT_EQ(find_run(off, "c2e9-d32l2-e8k2").config.model.init_std, Config{}.model.init_std);
  EXPECT_NE(error_of([&] { plan_sweep_from_string(spec("init_std = -1\n"), "t"); }).find("init_std must be >= 0"),
            std::string::npos);
  fs::remove_all(dir);
}

// `sweep finetune`: the best dense and MoE run of the largest budget (every budget with --all-budgets) fine-tuned
// on a task, each recorded with the zero-shot accuracy on the same items before; a second call adds nothing.
TEST(SweepFinetune, TunesTheBestDenseAndMoeOfTheLargestBudget) {
  const fs::path dir = temp_dir("sweep_finetune");
  // Byte-level data (vocabulary 256, no tokenizer), so the task's text encodes as bytes.
  const fs::path data = dir / "data";
  fs::create_directories(data);
  {
    Rng rng(9);
    for (auto [name, n] : {std::pair<const char*, int64_t>{"train.bin", 40000}, {"val.bin", 2000}}) {
      ShardWriter w((data / name).string(), 256);
      std::vector<int32_t> ids(n);
      for (int64_t i = 0; i < n; ++i) ids[i] = static_cast<int32_t>('a' + (i * 7 + rng.below(5)) % 26);
      w.append(ids);
      w.finish();
    }
  }
  std::string spec = base_spec(data, "list");
  spec.replace(spec.find("vocab_size = 64"), 15, "vocab_size = 256");
  for (const char* budget : {"2.5e8", "5e8"})
    for (const char* moe : {"", "moe.experts=4"})
      for (const char* width : {"model.d_model=16", "model.d_model=32"})
        spec += std::string("[[run]]\nname = \"c") + budget + (*moe ? "-moe" : "-dense") + "-" + (width + 14) +
                "\"\nbudget = " + budget + "\nset = [\"" + width + "\"" +
                (*moe ? std::string(", \"") + moe + "\"" : "") + "]\n";
  SweepPlan plan = plan_sweep_from_string(spec, "t");
  ASSERT_EQ(plan.feasible_runs().size(), 8u) << plan_table(plan);
  const fs::path sweep = dir / "sweep";
  write_plan(plan, sweep.string(), spec);
  std::ostringstream log;
  ASSERT_EQ(train_sweep(sweep, log).ok, 8) << log.str();

  // The expected picks, by validation loss: per budget, the best dense and the best MoE.
  std::map<std::pair<double, bool>, RunResult> best;
  for (const RunResult& r : read_results(sweep.string())) {
    ASSERT_EQ(r.status, "ok") << r.name;
    const auto key = std::make_pair(r.budget, r.experts > 0);
    if (!best.count(key) || r.val_loss < best[key].val_loss) best[key] = r;
  }
  ASSERT_EQ(best.size(), 4u);

  // A task of single-byte-context items: 16 train, 12 test, 3 choices each.
  std::string items;
  const char* choices[3] = {" one", " two", " six"};
  for (int i = 0; i < 28; ++i)
    items += "{\"id\": " + std::to_string(i) + ", \"context\": \"" + std::string(1, static_cast<char>('a' + i % 3)) +
             std::to_string(i) + " is\", \"choices\": [\"" + choices[0] + "\", \"" + choices[1] + "\", \"" + choices[2] +
             "\"], \"gold\": " + std::to_string(i % 3) + ", \"split\": \"" + (i < 16 ? "train" : "test") + "\"}\n";
  const fs::path task = dir / "keys.jsonl";
  write_file_atomic(task.string(), items);

  const fs::path out = dir / "out.txt";
  const std::string cmd = std::string(MOELAB_BINARY) + " sweep finetune " + sweep.string() + " --task " +
                          task.string() + " --steps 3 --threads 1";
  auto run = [&](const std::string& extra) {
    const int rc = std::system((cmd + extra + " > " + out.string() + " 2>&1").c_str());
    return std::make_pair(rc, read_file(out.string(), "output"));
  };
  auto rows_of = [&] {
    std::map<std::string, DownstreamRecord> rows;
    for (const auto& d : read_downstream((sweep / "results.db").string())) {
      EXPECT_EQ(d.mode, "finetune") << d.run;
      EXPECT_TRUE(rows.emplace(d.run, d).second) << "two rows for " << d.run;
    }
    return rows;
  };
  auto check_row = [&](const DownstreamRecord& d, int64_t n) {
    EXPECT_EQ(d.task, "keys");
    EXPECT_EQ(d.n, n) << d.run;
    ASSERT_TRUE(d.finetune.contains("before")) << d.finetune.dump();
    EXPECT_EQ(d.finetune["before"]["n"].get<int64_t>(), d.n) << d.run;
    EXPECT_EQ(d.finetune["steps"].get<int64_t>(), 3) << d.run;
    const double acc = d.finetune["before"]["acc"].get<double>();
    EXPECT_GE(acc, 0.0);
    EXPECT_LE(acc, 1.0);
    EXPECT_NEAR(d.finetune["before"]["acc_stderr"].get<double>(), std::sqrt(acc * (1 - acc) / static_cast<double>(n)),
                1e-9);
    EXPECT_TRUE(fs::exists(sweep / "runs" / d.run / ("finetune-keys") / "checkpoint")) << d.run;
    // The run's own downstream.json holds the same record.
    bool in_run = false;
    for (const auto& r : read_run_downstream((sweep / "runs" / d.run).string()))
      in_run |= r.mode == "finetune" && r.task == "keys" && r.acc == d.acc && r.n == d.n;
    EXPECT_TRUE(in_run) << d.run;
  };

  auto [rc, text] = run("");
  ASSERT_EQ(rc, 0) << text;
  auto rows = rows_of();
  ASSERT_EQ(rows.size(), 2u) << text;
  const std::string dense5 = best[{5e8, false}].name, moe5 = best[{5e8, true}].name;
  ASSERT_TRUE(rows.count(dense5)) << dense5 << " not fine-tuned:\n" << text;
  ASSERT_TRUE(rows.count(moe5)) << moe5 << " not fine-tuned:\n" << text;
  for (const auto& [name, d] : rows) check_row(d, 12);
  EXPECT_EQ(text.rfind("[1/2] ", 0), 0u) << text;
  EXPECT_NE(text.find("\n[2/2] "), std::string::npos) << text;
  EXPECT_NE(text.find(dense5 + " (dense) fine-tuned on keys"), std::string::npos) << text;
  EXPECT_NE(text.find(moe5 + " (MoE) fine-tuned on keys"), std::string::npos) << text;

  // Again: nothing new, both runs reported as done.
  std::tie(rc, text) = run("");
  ASSERT_EQ(rc, 0) << text;
  EXPECT_EQ(count_of(text, "already fine-tuned"), 2) << text;
  EXPECT_EQ(rows_of().size(), 2u);
  EXPECT_EQ(rows_of().at(dense5).acc, rows.at(dense5).acc);

  // Every budget: the smaller budget's pair is added, the larger one's skipped.
  std::tie(rc, text) = run(" --all-budgets");
  ASSERT_EQ(rc, 0) << text;
  EXPECT_EQ(count_of(text, "already fine-tuned"), 2) << text;
  EXPECT_EQ(text.rfind("[1/4] ", 0), 0u) << text;
  rows = rows_of();
  ASSERT_EQ(rows.size(), 4u) << text;
  for (const auto& name : {best[{2.5e8, false}].name, best[{2.5e8, true}].name}) {
    ASSERT_TRUE(rows.count(name)) << name << " not fine-tuned:\n" << text;
    check_row(rows.at(name), 12);
  }

  // A different --limit is a different result: fine-tuned again, replacing the record.
  std::tie(rc, text) = run(" --limit 6");
  ASSERT_EQ(rc, 0) << text;
  EXPECT_EQ(count_of(text, "already fine-tuned"), 0) << text;
  rows = rows_of();
  ASSERT_EQ(rows.size(), 4u);
  check_row(rows.at(dense5), 6);
  check_row(rows.at(moe5), 6);
  check_row(rows.at(best[{2.5e8, true}].name), 12);

  // The single-run command prints the accuracy before and after on the same items (and, with --no-record, records
  // nothing).
  const std::string single = std::string(MOELAB_BINARY) + " finetune --checkpoint " + (sweep / "runs" / moe5).string() +
                             " --task " + task.string() + " --steps 3 --threads 1 --limit 4 --no-record --out " +
                             (dir / "single").string() + " > " + out.string() + " 2>&1";
  ASSERT_EQ(std::system(single.c_str()), 0) << read_file(out.string(), "output");
  text = read_file(out.string(), "output");
  EXPECT_NE(text.find("zero-shot on the same 4 items before fine-tuning: acc "), std::string::npos) << text;
  EXPECT_NE(text.find(" after ("), std::string::npos) << text;
  EXPECT_EQ(rows_of().size(), 4u);
  fs::remove_all(dir);
}

}  // namespace
}  // namespace moelab
