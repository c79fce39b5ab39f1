// The report: analyses checked on a synthetic study whose answer is known by construction (dense loss an exact
// power law of compute, the best MoE at budget C exactly as good as dense at 2C, so the compute multiplier is 2),
// the page and figures it writes, and the page rendered in headless Chromium (scripts/check-report.sh), which
// must also reject a page with a broken image.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <sstream>

#include "core/error.h"
#include "core/io.h"
#include "core/rng.h"
#include "data/shard.h"
#include "report/report.h"
#include "report/study.h"
#include "sweep/plan.h"
#include "sweep/results.h"
#include "test_util.h"

namespace moelab {
namespace {

namespace fs = std::filesystem;
using testing::temp_dir;

constexpr double kExponent = -0.05;
double dense_law(double C) { return 10.0 * std::pow(C, kExponent); }

// A planned IsoFLOP sweep (3 budgets x 2 shapes x {dense, S = 0.5, S = 0.75}) with metrics.jsonl and result.json
// written for every run as if it had trained: losses are chosen, not learned.
fs::path make_study(const fs::path& root) {
  const fs::path data = root / "data";
  fs::create_directories(data);
  for (const char* name : {"train.bin", "val.bin"}) {
    ShardWriter w((data / name).string(), 64);
    std::vector<int32_t> ids(200000);
    for (size_t i = 0; i < ids.size(); ++i) ids[i] = static_cast<int32_t>(i % 64);
    w.append(ids);
    w.finish();
  }
  const std::string spec =
      "[sweep]\nname = \"synthetic\"\nkind = \"isoflop\"\ndense_baseline = true\n"
      "[base.model]\nvocab_size = 64\nseq_len = 16\n"
      "[base.train]\nbatch_size = 4\neval_batches = 2\n"
      "[base.data]\ndir = \"" + data.string() + "\"\n"
      "[[shape]]\nd_model = 32\nn_layers = 2\nn_heads = 2\n"
      "[[shape]]\nd_model = 48\nn_layers = 2\nn_heads = 2\n"
      "[isoflop]\nbudgets = [1e9, 2e9, 4e9]\nsparsity = [0.5, 0.75]\ntop_k = 1\n";
  SweepPlan plan = plan_sweep_from_string(spec, "synthetic");
  const fs::path sweep = root / "study" / "sparsity";
  write_plan(plan, sweep.string(), spec);
  for (const auto& run : plan.runs) {
    const bool wide = run.config.model.d_model == 48;
    const bool moe = run.config.model.moe.experts > 0;
    // Dense: the narrow shape is on the power law, the wide one 1% worse. MoE: S = 0.75 on the narrow shape is
    // exactly as good as dense with twice the compute; everything else is worse.
    double L = moe ? dense_law(2 * run.budget) : dense_law(run.budget);
    if (wide) L *= 1.01;
    if (moe && run.target_sparsity < 0.7) L *= 1.005;
    const fs::path dir = sweep / "runs" / run.name;
    std::string metrics;
    for (int64_t step = 1; step <= run.steps; ++step) {
      nlohmann::json line{{"step", step}, {"tokens", step * 64}, {"loss", L + 1.0 / double(step)}, {"step_seconds", 0.01}};
      if (moe) {
        nlohmann::json layers = nlohmann::json::array();
        for (int layer = 0; layer < 2; ++layer) {
          std::vector<int> load(run.config.model.moe.experts, 8);
          load[0] += 4 * layer;
          layers.push_back({{"layer", layer}, {"tokens_per_expert", load}});
        }
        line["router"] = layers;
      }
      metrics += line.dump() + "\n";
    }
    metrics += nlohmann::json{{"step", run.steps}, {"val_loss", L}}.dump() + "\n";
    write_file_atomic((dir / "metrics.jsonl").string(), metrics);
    write_result(dir.string(), result_from_run(run, dir.string(), 0, 1.0, ""));
  }
  collect_results(sweep.string());
  return root / "study";
}

TEST(Report, AnalysisRecoversTheConstructedAnswer) {
  const fs::path root = temp_dir("report_analysis");
  const Study study = load_study(make_study(root).string());
  ASSERT_EQ(study.sweeps.size(), 1u);
  EXPECT_EQ(study.sweeps[0].results.size(), 18u);
  AnalysisOptions options;
  options.bootstrap = 20;
  const auto s = analyse_study(study, options);

  ASSERT_EQ(s["budgets"].size(), 3u);
  const auto& per_budget = s["per_budget"];
  ASSERT_EQ(per_budget.size(), 3u);
  for (const auto& b : per_budget) {
    const double C = b["C"].get<double>();
    EXPECT_EQ(b["best"]["name"], "c" + compact_number(C) + "-d32l2-e4k1");
    EXPECT_EQ(b["best_dense"]["name"], "c" + compact_number(C) + "-d32l2-dense");
    EXPECT_NEAR(b["best_dense"]["loss"].get<double>(), dense_law(C), 1e-12);
  }
  // The dense frontier is the power law itself, and the multiplier is 2 at every budget.
  const auto& m = s["compute_multiplier"];
  EXPECT_NEAR(m["dense_frontier"]["b"].get<double>(), kExponent, 1e-9);
  EXPECT_NEAR(m["dense_frontier"]["a"].get<double>(), std::log(10.0), 1e-8);
  ASSERT_EQ(m["per_budget"].size(), 3u);
  for (const auto& row : m["per_budget"]) EXPECT_NEAR(row["multiplier"].get<double>(), 2.0, 1e-6);
  EXPECT_FALSE(m["per_budget"][0]["extrapolated"].get<bool>());
  EXPECT_TRUE(m["per_budget"][2]["extrapolated"].get<bool>());  // 8e9 is beyond the largest dense budget

  EXPECT_TRUE(s["isoflop_fit"].contains("budgets")) << s["isoflop_fit"].dump();
  EXPECT_TRUE(s["sparsity_fit"].contains("parameters")) << s["sparsity_fit"].dump();
  // The law comparison ranks what the columns allow by the error of predicting the largest budget.
  ASSERT_TRUE(s["law_comparison"].contains("ranking")) << s["law_comparison"].dump();
  EXPECT_GE(s["law_comparison"]["ranking"].size(), 2u);
  EXPECT_NE(s["law_comparison"]["holdout"].get<std::string>().find("largest budget"), std::string::npos);
  EXPECT_EQ(s["recommendation"]["best_measured"]["name"], "c4e9-d32l2-e4k1");
  const std::string headline = s["headline"];
  EXPECT_NE(headline.find("At C = 4e+09 FLOPs the best measured configuration is c4e9-d32l2-e4k1"), std::string::npos)
      << headline;
  EXPECT_NE(headline.find("MoE needs 2.00x less compute than dense"), std::string::npos) << headline;
  fs::remove_all(root);
}

TEST(Report, MissingOrEmptyStudyIsAClearError) {
  const fs::path root = temp_dir("report_empty");
  try {
    load_study((root / "nope").string());
    FAIL() << "no error";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("is not a directory"), std::string::npos) << e.what();
  }
  try {
    load_study(root.string());
    FAIL() << "no error";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("holds no sweep"), std::string::npos) << e.what();
  }
  fs::remove_all(root);
}

// One test for the page and the browser, so the (slow) report is written once.
TEST(Report, PageHasEveryFigureAndRendersInHeadlessChromium) {
  const fs::path root = temp_dir("report_page");
  const fs::path study = make_study(root);
  ReportOptions options;
  options.analysis.bootstrap = 20;
  options.out_dir = (root / "out").string();
  std::ostringstream log;
  const ReportResult r = write_report(study.string(), options, log);

  std::vector<std::string> ids;
  for (const auto& f : r.figures) ids.push_back(f.id);
  const std::vector<std::string> expected = {"curves", "isoflop", "loss-vs-sparsity", "law-fit", "frontier",
                                             "compute-multiplier", "router-load"};
  EXPECT_EQ(ids, expected);
  for (const auto& id : ids) {
    const std::string svg = read_file((root / "out" / "figures" / (id + ".svg")).string(), "figure");
    EXPECT_EQ(svg.rfind("<?xml", 0), 0u) << id;
    EXPECT_NE(svg.find("</svg>"), std::string::npos) << id;
    EXPECT_TRUE(fs::exists(root / "out" / "figures" / (id + ".gp"))) << id;
  }
  // Granularity and downstream have no data here: said so, not drawn empty.
  ASSERT_EQ(r.skipped.size(), 2u);
  const std::string html = read_file(r.html_path, "report");
  size_t images = 0;
  for (size_t at = html.find("<img "); at != std::string::npos; at = html.find("<img ", at + 1)) ++images;
  EXPECT_EQ(images, ids.size());
  EXPECT_NE(html.find(r.summary["headline"].get<std::string>().substr(0, 40)), std::string::npos);
  EXPECT_NE(html.find("Which law extrapolates best"), std::string::npos);
  EXPECT_NE(html.find("Findings: the three studies' claims"), std::string::npos);
  EXPECT_EQ(r.summary["findings"]["claims"].size(), 6u);
  const auto summary = nlohmann::json::parse(read_file(r.summary_path, "summary"));
  EXPECT_EQ(summary["figures"].size(), ids.size());

  // Headless Chromium: every image decodes, no script error, a screenshot is taken.
  const std::string check = std::string(MOELAB_SOURCE_DIR) + "/scripts/check-report.sh";
  const std::string shot = (root / "shot.png").string();
  EXPECT_EQ(std::system(("bash " + check + " " + r.html_path + " --screenshot " + shot + " > /dev/null").c_str()), 0)
      << "scripts/check-report.sh rejected the report (is chromium installed? scripts/install-deps.sh)";
  EXPECT_GT(fs::file_size(shot), 10000u);
  // ... and the same check fails on a page whose first figure is corrupt.
  std::string broken = html;
  const size_t at = broken.find("base64,");
  ASSERT_NE(at, std::string::npos);
  broken.replace(at + 7, 8, "AAAAAAAA");
  const std::string broken_path = (root / "out" / "broken.html").string();
  write_file_atomic(broken_path, broken);
  EXPECT_NE(std::system(("bash " + check + " " + broken_path + " > /dev/null 2>&1").c_str()), 0);
  fs::remove_all(root);
}

}  // namespace
}  // namespace moelab

#include "report/findings.h"

namespace moelab {
namespace {

// Findings from an in-memory study: two budgets, a dense and an MoE configuration each, two seeds per
// configuration. The MoE is better by `gap`; the seeds differ by `noise`.
nlohmann::ordered_json findings_for(double gap, double noise, bool replicates) {
  Study study;
  StudySweep s;
  s.label = "sparsity";
  s.plan.kind = "isoflop";
  nlohmann::ordered_json per_budget = nlohmann::ordered_json::array();
  for (double C : {1e12, 4e12}) {
    const double base = 5.0 - 0.1 * std::log10(C);
    for (int seed = 1; seed <= (replicates ? 2 : 1); ++seed)
      for (bool moe : {false, true}) {
        RunResult r;
        r.name = std::string(moe ? "moe" : "dense") + "-" + compact_number(C) + (seed > 1 ? "-s2" : "");
        r.status = "ok";
        r.budget = C;
        r.tokens = static_cast<int64_t>(C / 1e6);
        r.d_model = 64, r.n_layers = 2;
        r.experts = moe ? 8 : 0, r.top_k = moe ? 2 : 0, r.sparsity = moe ? 0.75 : 0.0;
        r.seed = seed;
        r.smoothed_loss = base - (moe ? gap : 0.0) + (seed == 2 ? noise : 0.0);
        s.results.push_back(r);
      }
    per_budget.push_back({{"C", C},
                          {"best_dense", {{"name", "dense-" + compact_number(C)}, {"loss", base}}},
                          {"best_moe", {{"name", "moe-" + compact_number(C)}, {"loss", base - gap}}}});
  }
  study.sweeps.push_back(s);
  nlohmann::ordered_json summary;
  summary["per_budget"] = per_budget;
  return study_findings(study, summary, "smoothed_loss");
}

std::string verdict_of(const nlohmann::ordered_json& f, const std::string& id) {
  for (const auto& c : f["claims"])
    if (c["id"] == id) return c["verdict"];
  return "(missing)";
}

TEST(Findings, VerdictsFollowTheSeedSpread) {
  // A clear gap with small seed noise: reproduced (MoE beats dense; sparser is better at fixed FLOPs).
  auto f = findings_for(0.1, 0.005, true);
  ASSERT_EQ(f["claims"].size(), 6u);
  EXPECT_NEAR(f["seed_sd"].get<double>(), 0.005 / std::sqrt(2.0), 1e-9);
  EXPECT_EQ(verdict_of(f, "moe_beats_dense"), "reproduced");
  EXPECT_EQ(verdict_of(f, "sparser_better"), "reproduced");
  EXPECT_EQ(verdict_of(f, "finetune"), "not measured");
  EXPECT_EQ(verdict_of(f, "fixed_n_u_shape"), "not measured");
  // The same gap inside the seed noise: inconclusive.
  EXPECT_EQ(verdict_of(findings_for(0.01, 0.05, true), "moe_beats_dense"), "inconclusive");
  // MoE worse beyond the noise: not reproduced.
  EXPECT_EQ(verdict_of(findings_for(-0.1, 0.005, true), "moe_beats_dense"), "not reproduced");
  // No replicates: the direction is reported, the verdict stays inconclusive.
  const auto single = findings_for(0.1, 0.0, false);
  EXPECT_EQ(verdict_of(single, "moe_beats_dense"), "inconclusive");
  EXPECT_TRUE(single["seed_sd"].is_null());
}

}  // namespace
}  // namespace moelab
