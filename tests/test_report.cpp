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
#include <tuple>

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
  // Granularity, fixed total parameters and downstream have no data here: said so, not drawn empty.
  ASSERT_EQ(r.skipped.size(), 3u);
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

namespace moelab {
namespace {

using ojson = nlohmann::ordered_json;

const ojson& claim_of(const ojson& f, const std::string& id) {
  for (const auto& c : f["claims"])
    if (c["id"] == id) return c;
  static const ojson none = ojson::object();
  return none;
}

std::string warnings_text(const ojson& f) {
  std::string all;
  for (const auto& w : f["edge_warnings"]) all += w.get<std::string>() + "\n";
  return all;
}

// Two seeds of one configuration (no budget, so it joins no IsoFLOP curve) whose losses differ by `noise`: the
// study's seed sd is then noise / sqrt(2), and the verdict threshold 2 sqrt(2) sd is exactly 2 * noise.
void add_replicates(StudySweep& s, double noise) {
  for (int seed : {1, 2}) {
    RunResult r;
    r.name = "replicate-s" + std::to_string(seed);
    r.status = "ok";
    r.d_model = 16, r.n_layers = 1;
    r.tokens = 1000, r.params = 12345;
    r.seed = seed;
    r.smoothed_loss = 4.0 + (seed == 2 ? noise : 0.0);
    s.results.push_back(r);
  }
}

// ---- fine-tuning gains (fairseq) --------------------------------------------------------------------------------

RunResult tuned_run(const std::string& name, double C, bool moe, double loss) {
  RunResult r;
  r.name = name;
  r.status = "ok";
  r.budget = C;
  r.tokens = static_cast<int64_t>(C / 1e6);
  r.d_model = 64, r.n_layers = 2;
  r.experts = moe ? 8 : 0, r.top_k = moe ? 2 : 0, r.sparsity = moe ? 0.75 : 0.0;
  r.seed = 1;
  r.smoothed_loss = loss;
  return r;
}

DownstreamRecord tuned_record(const std::string& run, double before, double after, double stderr_,
                              const std::string& mode = "finetune", bool with_before = true) {
  DownstreamRecord d;
  d.run = run;
  d.task = "cloze";
  d.mode = mode;
  d.n = 200;
  d.acc = after;
  d.acc_stderr = stderr_;
  d.finetune = {{"steps", 10}};
  if (with_before)
    d.finetune["before"] = {{"acc", before}, {"acc_stderr", stderr_}, {"acc_norm", before},
                            {"acc_norm_stderr", stderr_}, {"n", 200}};
  return d;
}

// Fine-tuned runs at three budgets. Only 4e12 is the one to judge: 1.6e13 has a fine-tuned dense run only, and
// 1e12 (a smaller budget) says the opposite of 4e12. At 4e12 the lower-loss MoE (moe-a) is the one to use; the
// other fine-tuned MoE (moe-b, higher loss) and records that are not fine-tuning results say the opposite too.
// Every accuracy has stderr 0.02, so the se of the difference of gains is 0.04 and the threshold 2 se = 0.08.
ojson finetune_findings(double dense_gain, double moe_gain) {
  Study study;
  StudySweep s;
  s.label = "sparsity";
  s.plan.kind = "isoflop";
  s.results = {tuned_run("dense-1e12", 1e12, false, 3.0),  tuned_run("moe-1e12", 1e12, true, 2.9),
               tuned_run("dense-4e12", 4e12, false, 2.8),  tuned_run("moe-a-4e12", 4e12, true, 2.7),
               tuned_run("moe-b-4e12", 4e12, true, 2.75),  tuned_run("dense-1.6e13", 1.6e13, false, 2.6)};
  const double opposite = -(dense_gain - moe_gain);
  s.downstream = {
      tuned_record("dense-1e12", 0.3, 0.3 + 0.1, 0.02), tuned_record("moe-1e12", 0.3, 0.3 + 0.1 - opposite, 0.02),
      tuned_record("dense-4e12", 0.30, 0.30 + dense_gain, 0.02), tuned_record("moe-a-4e12", 0.32, 0.32 + moe_gain, 0.02),
      tuned_record("moe-b-4e12", 0.32, 0.32 + dense_gain - opposite, 0.02),
      // Zero-shot results and a fine-tuning record without "before" (written before it existed): ignored.
      tuned_record("moe-a-4e12", 0.32, 0.32 + dense_gain + 0.5, 0.02, "zero"),
      tuned_record("dense-1.6e13", 0.3, 0.9, 0.02)};
  study.sweeps.push_back(s);
  // A second sweep of the study holding an MoE run at 1.6e13 with a record lacking "before": still no pair there.
  StudySweep other;
  other.label = "other";
  other.plan.kind = "isoflop";
  other.results = {tuned_run("moe-1.6e13", 1.6e13, true, 2.5)};
  other.downstream = {tuned_record("moe-1.6e13", 0.3, 0.31, 0.02, "finetune", false)};
  study.sweeps.push_back(other);
  return study_findings(study, ojson::object(), "smoothed_loss");
}

TEST(Findings, FinetuneGainComparesDenseAndMoeAtTheLargestBudgetWithBoth) {
  // Dense gains 0.20, MoE 0.05: difference 0.15 > 2 se = 0.08.
  const ojson f = finetune_findings(0.20, 0.05);
  const ojson& c = claim_of(f, "finetune");
  EXPECT_EQ(c["verdict"], "reproduced") << c.dump(1);
  const std::string measured = c["measured"];
  EXPECT_NE(measured.find("dense-4e12 vs moe-a-4e12"), std::string::npos) << measured;
  EXPECT_NE(measured.find("dense gain - MoE gain = +0.150"), std::string::npos) << measured;
  EXPECT_NE(c["spread"].get<std::string>().find("0.040"), std::string::npos) << c["spread"];
  // Difference 0.05: within 2 se.
  EXPECT_EQ(claim_of(finetune_findings(0.20, 0.15), "finetune")["verdict"], "inconclusive");
  // Difference 0.07, just inside 0.08; and 0.09 just beyond it.
  EXPECT_EQ(claim_of(finetune_findings(0.17, 0.10), "finetune")["verdict"], "inconclusive");
  EXPECT_EQ(claim_of(finetune_findings(0.19, 0.10), "finetune")["verdict"], "reproduced");
  // MoE gains more, beyond 2 se.
  EXPECT_EQ(claim_of(finetune_findings(0.05, 0.20), "finetune")["verdict"], "not reproduced");
  EXPECT_EQ(claim_of(finetune_findings(0.10, 0.19), "finetune")["verdict"], "not reproduced");
}

TEST(Findings, FinetuneWithoutBeforeOrWithoutAPairIsNotMeasured) {
  Study study;
  StudySweep s;
  s.label = "sparsity";
  s.plan.kind = "isoflop";
  s.results = {tuned_run("dense-1e12", 1e12, false, 3.0), tuned_run("moe-1e12", 1e12, true, 2.9),
               tuned_run("dense-4e12", 4e12, false, 2.8)};
  // A pair at 1e12, but the MoE record has no "before"; a dense record at 4e12 with no MoE partner; a few-shot one.
  s.downstream = {tuned_record("dense-1e12", 0.3, 0.5, 0.02), tuned_record("moe-1e12", 0.3, 0.31, 0.02, "finetune", false),
                  tuned_record("dense-4e12", 0.3, 0.5, 0.02), tuned_record("moe-1e12", 0.3, 0.31, 0.02, "few")};
  study.sweeps.push_back(s);
  EXPECT_EQ(claim_of(study_findings(study, ojson::object(), "smoothed_loss"), "finetune")["verdict"], "not measured");
  // With "before" on the MoE record, 1e12 is judged: dense +0.2, MoE +0.01.
  study.sweeps[0].downstream[1] = tuned_record("moe-1e12", 0.3, 0.31, 0.02);
  EXPECT_EQ(claim_of(study_findings(study, ojson::object(), "smoothed_loss"), "finetune")["verdict"], "reproduced");
  // A failed MoE run does not count.
  study.sweeps[0].results[1].status = "failed";
  EXPECT_EQ(claim_of(study_findings(study, ojson::object(), "smoothed_loss"), "finetune")["verdict"], "not measured");
}

// ---- loss against sparsity at fixed total parameters (Abnar) ------------------------------------------------------

ojson fixed_group(double params, double C, const std::vector<std::pair<double, double>>& curve) {
  ojson points = ojson::array();
  double S = 0, L = INFINITY;
  for (const auto& [sp, loss] : curve) {
    points.push_back({{"sparsity", sp}, {"loss", loss}, {"name", "n-s" + compact_number(sp)}});
    if (loss < L) L = loss, S = sp;
  }
  const bool edge = S == curve.front().first || S == curve.back().first;
  return {{"params", params}, {"C", C}, {"points", points}, {"S_star", S}, {"L_star", L}, {"on_edge", edge}};
}

// The findings of a study whose one sweep (of `kind`) holds only replicates with seed noise 0.01 (threshold 0.02),
// and whose summary[key] is `rows`.
ojson findings_with(const std::string& kind, const std::string& key, const ojson& rows) {
  Study study;
  StudySweep s;
  s.label = kind;
  s.plan.kind = kind;
  add_replicates(s, 0.01);
  study.sweeps.push_back(s);
  ojson summary = ojson::object();
  summary[key] = rows;
  const ojson f = study_findings(study, summary, "smoothed_loss");
  EXPECT_NEAR(f["seed_sd"].get<double>(), 0.01 / std::sqrt(2.0), 1e-12);
  return f;
}

ojson fixed_params_findings(const ojson& groups) { return findings_with("fixed_params", "fixed_params", groups); }

TEST(Findings, FixedParamsUShapeWithAnInnerMinimumIsReproduced) {
  // Lowest at S = 0.5, both ends 0.05 and 0.08 above it (> 0.02).
  const ojson u = ojson::array({fixed_group(1e6, 1e12, {{0.0, 3.05}, {0.5, 3.00}, {0.75, 3.03}, {0.875, 3.08}})});
  ojson f = fixed_params_findings(u);
  EXPECT_EQ(verdict_of(f, "fixed_n_u_shape"), "reproduced") << claim_of(f, "fixed_n_u_shape").dump(1);
  EXPECT_TRUE(f["edge_warnings"].empty()) << warnings_text(f);
  EXPECT_NE(claim_of(f, "fixed_n_u_shape")["measured"].get<std::string>().find("lowest at S 0.5"), std::string::npos);
  // One end only 0.01 above the minimum: inside the noise.
  f = fixed_params_findings(ojson::array({fixed_group(1e6, 1e12, {{0.0, 3.01}, {0.5, 3.00}, {0.875, 3.08}})}));
  EXPECT_EQ(verdict_of(f, "fixed_n_u_shape"), "inconclusive");
  EXPECT_TRUE(f["edge_warnings"].empty());
  // Two groups: reproduced only if every group is.
  ojson two = u;
  two.push_back(fixed_group(4e6, 1e12, {{0.0, 3.01}, {0.5, 3.00}, {0.875, 3.08}}));
  EXPECT_EQ(verdict_of(fixed_params_findings(two), "fixed_n_u_shape"), "inconclusive");
  two[1] = fixed_group(4e6, 1e12, {{0.0, 2.95}, {0.5, 2.90}, {0.875, 2.93}});
  EXPECT_EQ(verdict_of(fixed_params_findings(two), "fixed_n_u_shape"), "reproduced");
  // Fewer than 3 sparsity levels: not a curve.
  EXPECT_EQ(verdict_of(fixed_params_findings(ojson::array({fixed_group(1e6, 1e12, {{0.0, 3.05}, {0.5, 3.00}})})),
                       "fixed_n_u_shape"),
            "not measured");
}

TEST(Findings, FixedParamsMinimumAtAnEndWarnsAndIsNotAUShape) {
  // Monotone: lowest at the sparsest S, the densest end 0.15 above it: not reproduced, with a warning.
  ojson f = fixed_params_findings(ojson::array({fixed_group(1e6, 1e12, {{0.0, 3.10}, {0.5, 3.00}, {0.875, 2.95}})}));
  EXPECT_EQ(verdict_of(f, "fixed_n_u_shape"), "not reproduced") << claim_of(f, "fixed_n_u_shape").dump(1);
  ASSERT_EQ(f["edge_warnings"].size(), 1u) << warnings_text(f);
  EXPECT_NE(warnings_text(f).find("the lowest loss is at the sparsest measured S"), std::string::npos)
      << warnings_text(f);
  // Lowest at the densest end.
  f = fixed_params_findings(ojson::array({fixed_group(1e6, 1e12, {{0.0, 2.90}, {0.5, 3.00}, {0.875, 3.10}})}));
  EXPECT_EQ(verdict_of(f, "fixed_n_u_shape"), "not reproduced");
  EXPECT_NE(warnings_text(f).find("the lowest loss is at the densest measured S"), std::string::npos)
      << warnings_text(f);
  // Lowest at the sparsest end but the other end within the noise (0.01 above; a rise in between): inconclusive.
  f = fixed_params_findings(ojson::array({fixed_group(1e6, 1e12, {{0.0, 2.96}, {0.5, 3.00}, {0.875, 2.95}})}));
  EXPECT_EQ(verdict_of(f, "fixed_n_u_shape"), "inconclusive");
  EXPECT_EQ(f["edge_warnings"].size(), 1u) << warnings_text(f);
}

// ---- the optimal granularity (Krajewski) -------------------------------------------------------------------------

ojson granularity_row(double C, const std::vector<std::pair<double, double>>& curve, bool on_edge = false) {
  ojson points = ojson::array();
  double G = 0, L = INFINITY;
  for (const auto& [g, loss] : curve) {
    points.push_back({{"G", g}, {"loss", loss}, {"name", "c-g" + compact_number(g)}});
    if (loss < L) L = loss, G = g;
  }
  return {{"C", C},
          {"G_star", G},
          {"best", {{"loss", L}, {"name", "c-g" + compact_number(G)}}},
          {"on_edge", on_edge},
          {"curve_at_best_shape", points}};
}

ojson granularity_findings(const ojson& rows) { return findings_with("granularity", "granularity_optimum", rows); }

TEST(Findings, GranularityAboveOneAndGrowingIsReproduced) {
  // C 1e12: G* = 2, 0.10 below G = 1. C 4e12: G* = 4, 0.10 below G = 1, and the small budget's G* (2) 0.05 above.
  const ojson rows = ojson::array({granularity_row(1e12, {{1, 3.10}, {2, 3.00}, {4, 3.05}, {8, 3.09}}),
                                   granularity_row(4e12, {{1, 2.95}, {2, 2.90}, {4, 2.85}, {8, 2.88}})});
  ojson f = granularity_findings(rows);
  EXPECT_EQ(verdict_of(f, "granularity"), "reproduced") << claim_of(f, "granularity").dump(1);
  EXPECT_TRUE(f["edge_warnings"].empty()) << warnings_text(f);
  // The same G* at both budgets: no growth.
  f = granularity_findings(ojson::array({granularity_row(1e12, {{1, 3.10}, {2, 3.00}, {4, 3.05}}),
                                         granularity_row(4e12, {{1, 2.95}, {2, 2.85}, {4, 2.90}})}));
  EXPECT_EQ(verdict_of(f, "granularity"), "inconclusive") << claim_of(f, "granularity").dump(1);
  // G* moves up, but the last budget's loss at the first G* is within the noise (0.01 above).
  f = granularity_findings(ojson::array({granularity_row(1e12, {{1, 3.10}, {2, 3.00}, {4, 3.05}}),
                                         granularity_row(4e12, {{1, 2.95}, {2, 2.86}, {4, 2.85}})}));
  EXPECT_EQ(verdict_of(f, "granularity"), "inconclusive") << claim_of(f, "granularity").dump(1);
  // G* falls, beyond the noise.
  f = granularity_findings(ojson::array({granularity_row(1e12, {{1, 3.10}, {2, 3.05}, {4, 3.00}}),
                                         granularity_row(4e12, {{1, 2.95}, {2, 2.85}, {4, 2.90}})}));
  EXPECT_EQ(verdict_of(f, "granularity"), "not reproduced") << claim_of(f, "granularity").dump(1);
  // G* = 1 at one budget.
  f = granularity_findings(ojson::array({granularity_row(1e12, {{1, 3.00}, {2, 3.05}, {4, 3.10}}),
                                         granularity_row(4e12, {{1, 2.95}, {2, 2.90}, {4, 2.85}})}));
  EXPECT_EQ(verdict_of(f, "granularity"), "not reproduced");
  // G* > 1, but only 0.01 below G = 1: inconclusive.
  f = granularity_findings(ojson::array({granularity_row(1e12, {{1, 3.01}, {2, 3.00}, {4, 3.05}}),
                                         granularity_row(4e12, {{1, 2.95}, {2, 2.90}, {4, 2.85}})}));
  EXPECT_EQ(verdict_of(f, "granularity"), "inconclusive");
  // One budget: G* > 1 but growth cannot be told.
  EXPECT_EQ(verdict_of(granularity_findings(ojson::array({rows[0]})), "granularity"), "inconclusive");
  EXPECT_EQ(verdict_of(granularity_findings(ojson::array()), "granularity"), "not measured");
}

TEST(Findings, GranularityOptimumOnTheEdgeWarns) {
  const ojson rows = ojson::array({granularity_row(1e12, {{1, 3.10}, {2, 3.00}, {4, 3.05}}),
                                   granularity_row(4e12, {{1, 2.95}, {2, 2.90}, {4, 2.85}}, true)});
  const ojson f = granularity_findings(rows);
  EXPECT_EQ(verdict_of(f, "granularity"), "reproduced") << claim_of(f, "granularity").dump(1);
  ASSERT_EQ(f["edge_warnings"].size(), 1u) << warnings_text(f);
  EXPECT_NE(warnings_text(f).find("the best granularity at C 4e+12 is the largest measured (G = 4)"), std::string::npos)
      << warnings_text(f);
}

// ---- IsoFLOP curves whose optimum is not bracketed ---------------------------------------------------------------

RunResult iso_run(double C, double S, int64_t N, int seed, double loss) {
  RunResult r;
  r.name = "c" + compact_number(C) + "-s" + compact_number(S) + "-n" + std::to_string(N) + "-seed" + std::to_string(seed);
  r.status = "ok";
  r.budget = C;
  r.sparsity = S;
  r.experts = S > 0 ? 8 : 0, r.top_k = S > 0 ? 2 : 0;
  r.nonembedding_params = N;
  r.params = N + 1000;
  r.d_model = N / 1000;
  r.n_layers = 2;
  r.tokens = static_cast<int64_t>(C / (6.0 * static_cast<double>(N)));
  r.seed = seed;
  r.smoothed_loss = loss;
  return r;
}

TEST(Findings, IsoflopCurveLowestAtAnEndOfItsLadderWarns) {
  Study study;
  StudySweep s;
  s.label = "sparsity";
  s.plan.kind = "isoflop";
  // C 1e12, S 0.75: seed 1 alone is lowest at the smallest N, but the mean over seeds is lowest in the middle.
  for (auto [N, l1, l2] : {std::tuple<int64_t, double, double>{64000, 2.98, 3.10}, {128000, 3.00, 3.00},
                           {256000, 3.05, 3.05}})
    for (int seed : {1, 2}) s.results.push_back(iso_run(1e12, 0.75, N, seed, seed == 1 ? l1 : l2));
  // C 1e12, dense: lowest at the largest N.
  for (auto [N, l] : {std::pair<int64_t, double>{64000, 3.2}, {128000, 3.1}, {256000, 3.0}})
    s.results.push_back(iso_run(1e12, 0.0, N, 1, l));
  // C 4e12, S 0.75: lowest at the smallest N.
  for (auto [N, l] : {std::pair<int64_t, double>{64000, 2.7}, {128000, 2.8}, {256000, 2.9}})
    s.results.push_back(iso_run(4e12, 0.75, N, 1, l));
  // C 4e12, dense: two sizes only, no curve to judge.
  for (auto [N, l] : {std::pair<int64_t, double>{64000, 2.7}, {128000, 2.8}})
    s.results.push_back(iso_run(4e12, 0.0, N, 1, l));
  study.sweeps.push_back(s);
  const ojson f = study_findings(study, ojson::object(), "smoothed_loss");
  const std::string w = warnings_text(f);
  ASSERT_EQ(f["edge_warnings"].size(), 2u) << w;
  EXPECT_NE(w.find("the IsoFLOP curve at C 1e+12, S 0 is lowest at the largest shape"), std::string::npos) << w;
  EXPECT_NE(w.find("the IsoFLOP curve at C 4e+12, S 0.75 is lowest at the smallest shape"), std::string::npos) << w;
  EXPECT_EQ(w.find("C 1e+12, S 0.75"), std::string::npos) << w;

  // Bracketed everywhere: no warning. A sweep of another kind is not an IsoFLOP ladder.
  Study good;
  StudySweep g;
  g.label = "sparsity";
  g.plan.kind = "isoflop";
  for (auto [N, l] : {std::pair<int64_t, double>{64000, 3.1}, {128000, 3.0}, {256000, 3.05}})
    g.results.push_back(iso_run(1e12, 0.75, N, 1, l));
  good.sweeps.push_back(g);
  StudySweep other = g;
  other.label = "fixed";
  other.plan.kind = "fixed_params";
  for (auto& r : other.results) r.smoothed_loss = 3.0 + static_cast<double>(r.nonembedding_params) * 1e-6;
  good.sweeps.push_back(other);
  const ojson none = study_findings(good, ojson::object(), "smoothed_loss");
  EXPECT_TRUE(none["edge_warnings"].empty()) << warnings_text(none);
  EXPECT_EQ(verdict_of(none, "fixed_n_u_shape"), "not measured");
  EXPECT_EQ(verdict_of(none, "finetune"), "not measured");
}

}  // namespace
}  // namespace moelab
