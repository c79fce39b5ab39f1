// The report: analyses checked on a synthetic study whose answer is known by construction (dense loss an exact
// power law of compute, the best MoE at budget C exactly as good as dense at 2C, so the compute multiplier is 2),
// the page and figures it writes, and the page rendered in headless Chromium (scripts/check-report.sh), which
// must also reject a page with a broken image.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <functional>
#include <map>
#include <set>
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
  const auto s = summary_to_json(analyse_study(study, options));

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
  EXPECT_NE(html.find(r.summary.headline.substr(0, 40)), std::string::npos);
  EXPECT_NE(html.find("Which law extrapolates best"), std::string::npos);
  EXPECT_NE(html.find("Findings: the three studies' claims"), std::string::npos);
  EXPECT_EQ(r.summary.findings.claims.size(), 6u);
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

using ojson = nlohmann::ordered_json;

// The findings section as summary.json writes it, from a study alone (no other section).
ojson findings_json(const Study& study, const std::string& column) {
  return findings_to_json(study_findings(study, StudySummary{}, column));
}

// A synthetic study of runs as the sweeps write them: at each budget, each arm (E experts, top-1; E = 0 is dense)
// over a ladder of 3 shapes, R replicates (train.seed = data seed = 1..R). Loss = base(C) + 0.2 (log N - log N*)^2
// - gain(E) + shared[r] + own, where shared[r] is replicate r's noise common to every run of it (the data order
// the pairing cancels) and own each run's own noise (sd `own`, seeded).
struct Synthetic {
  std::vector<double> budgets = {1e12, 4e12};
  std::vector<int64_t> experts = {0, 8};
  int replicates = 3;
  double shared = 0.03, own = 0.002;
  std::function<double(int64_t experts, double C)> gain = [](int64_t E, double) { return E > 0 ? 0.05 : 0.0; };
};

std::vector<RunResult> synthetic_runs(const Synthetic& spec, uint64_t seed = 7) {
  Rng rng(seed);
  std::vector<double> shared(spec.replicates);
  for (auto& x : shared) x = spec.shared * rng.normal();
  std::vector<RunResult> out;
  for (double C : spec.budgets) {
    const double n_star = 1e5 * std::sqrt(C / 1e12);
    for (int64_t E : spec.experts)
      for (double f : {0.5, 1.0, 2.0})
        for (int r = 1; r <= spec.replicates; ++r) {
          RunResult x;
          const auto N = static_cast<int64_t>(n_star * f);
          x.name = "c" + compact_number(C) + "-n" + std::to_string(N) + (E ? "-e" + std::to_string(E) : "-dense") +
                   (r > 1 ? "-s" + std::to_string(r) : "");
          x.status = "ok";
          x.budget = C;
          x.experts = E, x.top_k = E ? 1 : 0, x.sparsity = E ? 1 - 1.0 / static_cast<double>(E) : 0.0;
          x.nonembedding_params = N, x.params = N + 1000, x.d_model = N / 1000, x.n_layers = 4;
          x.tokens = static_cast<int64_t>(C / (6.0 * static_cast<double>(N)));
          x.seed = x.data_seed = r;
          const double lf = std::log(f);
          x.smoothed_loss = x.val_loss = 4.0 - 0.1 * std::log10(C / 1e12) + 0.2 * lf * lf - spec.gain(E, C) +
                                         shared[r - 1] + spec.own * rng.normal();
          out.push_back(x);
        }
  }
  return out;
}

ojson synthetic_findings(const std::vector<RunResult>& runs) {
  Study study;
  StudySweep s;
  s.label = "sparsity";
  s.plan.kind = "isoflop";
  s.results = runs;
  study.sweeps.push_back(s);
  return findings_json(study, "val_loss");
}

std::string verdict_of(const nlohmann::ordered_json& f, const std::string& id) {
  for (const auto& c : f["claims"])
    if (c["id"] == id) return c["verdict"];
  return "(missing)";
}

const ojson& claim_of(const ojson& f, const std::string& id) {
  for (const auto& c : f["claims"])
    if (c["id"] == id) return c;
  static const ojson none = ojson::object();
  return none;
}

// Every estimate is the difference of the minima fitted to all runs; the replicates give only its spread. On a
// noisy out-of-domain set a replicate's own minimum (a parabola through 3 noisy points) can sit far from the
// pooled fit, so the mean of per-replicate differences would contradict the gains the claim prints.
TEST(Findings, EstimatesAreThePooledFitsWithTheReplicatesSpread) {
  Synthetic spec;
  std::vector<RunResult> runs = synthetic_runs(spec);
  Rng rng(11);
  for (auto& r : runs) r.ood_losses["ood_noisy"] = r.val_loss + 1.5 + 0.08 * rng.normal();
  const ojson f = synthetic_findings(runs);
  const ojson& gap = claim_of(f, "gap_by_domain");
  ASSERT_EQ(gap["details"].size(), 1u) << gap.dump(1);
  const ojson& d = gap["details"][0];
  EXPECT_NEAR(d["estimate"].get<double>(), d["gain_in_domain"].get<double>() - d["gain_out_of_domain"].get<double>(),
              1e-12) << d.dump(1);
  EXPECT_LT(d["interval"][0].get<double>(), d["estimate"].get<double>());
  EXPECT_GT(d["interval"][1].get<double>(), d["estimate"].get<double>());
  const ojson& moe = claim_of(f, "moe_beats_dense");
  const double mean_of_budgets = (moe["details"][0]["estimate"].get<double>() + moe["details"][1]["estimate"].get<double>()) / 2;
  EXPECT_NEAR(moe["estimate"].get<double>(), mean_of_budgets, 1e-12) << moe.dump(1);
}

TEST(Findings, MoeBeatsDenseIsJudgedOnEveryReplicateWithAnInterval) {
  // A 0.05 gain under replicate noise (sd 0.03) shared by the arms, own noise 0.002: the paired interval finds it.
  Synthetic spec;
  ojson f = synthetic_findings(synthetic_runs(spec));
  ASSERT_EQ(f["claims"].size(), 6u);
  const ojson& c = claim_of(f, "moe_beats_dense");
  EXPECT_EQ(c["verdict"], "reproduced") << c.dump(1);
  EXPECT_NEAR(c["estimate"].get<double>(), 0.05, 0.01);
  EXPECT_LT(c["interval"][0].get<double>(), 0.05);
  EXPECT_GT(c["interval"][1].get<double>(), 0.05);
  EXPECT_GT(c["detectable_effect"].get<double>(), 0);
  EXPECT_EQ(c["n_per_arm"]["dense"]["runs"], 18);  // 2 budgets x 3 shapes x 3 replicates
  EXPECT_EQ(c["n_per_arm"]["moe"]["runs"], 18);
  EXPECT_EQ(c["n_per_arm"]["moe"]["replicates"], 3);
  ASSERT_EQ(c["details"].size(), 3u);  // two budgets and the compute multiplier
  EXPECT_EQ(c["details"][0]["n_per_arm"]["dense"]["replicates"], 3);
  EXPECT_GT(c["details"][2]["compute_multiplier"].get<double>(), 1.0);
  // Pairing: the shared noise cancels, so the paired se is far below the unpaired one.
  ASSERT_EQ(f["pairing"].size(), 2u);
  for (const auto& p : f["pairing"]) {
    EXPECT_LT(p["se_paired"].get<double>(), 0.5 * p["se_unpaired"].get<double>()) << p.dump();
    EXPECT_GT(p["correlation"].get<double>(), 0.9) << p.dump();
  }
  // Sparser (8 experts against dense) is better here too.
  EXPECT_EQ(verdict_of(f, "sparser_better"), "reproduced") << claim_of(f, "sparser_better").dump(1);

  // MoE worse: not reproduced. No difference with own noise 0.01: inconclusive, saying what it could detect.
  spec.gain = [](int64_t E, double) { return E > 0 ? -0.05 : 0.0; };
  EXPECT_EQ(verdict_of(synthetic_findings(synthetic_runs(spec)), "moe_beats_dense"), "not reproduced");
  EXPECT_EQ(verdict_of(synthetic_findings(synthetic_runs(spec)), "sparser_better"), "not reproduced");
  spec.gain = [](int64_t, double) { return 0.0; };
  spec.own = 0.01;
  f = synthetic_findings(synthetic_runs(spec));
  EXPECT_EQ(verdict_of(f, "moe_beats_dense"), "inconclusive") << claim_of(f, "moe_beats_dense").dump(1);
  EXPECT_NE(claim_of(f, "moe_beats_dense")["why"].get<std::string>().find("this design detects an effect of"),
            std::string::npos);
  // One replicate: no interval, so never decided.
  spec.replicates = 1;
  spec.gain = [](int64_t E, double) { return E > 0 ? 0.05 : 0.0; };
  f = synthetic_findings(synthetic_runs(spec));
  EXPECT_EQ(verdict_of(f, "moe_beats_dense"), "inconclusive");
  EXPECT_TRUE(f["seed_sd"].is_null());
}

TEST(Findings, APlantedLuckySeedDecidesNothing) {
  // No real difference; one MoE run (replicate 3, the middle shape of each budget) is 0.08 lower than its seeds
  // say, 8 own-noise sd. The best single run of each budget is then that lucky MoE run, by 0.08, which the old
  // best-of-seeds rule (a win beyond 2 sqrt(2) seed sd) called reproduced; every run and the pairing see through it.
  Synthetic spec;
  spec.gain = [](int64_t, double) { return 0.0; };
  spec.own = 0.01;
  auto runs = synthetic_runs(spec);
  double best_dense = INFINITY, best_moe = INFINITY;
  for (auto& r : runs) {
    if (r.experts > 0 && r.seed == 3 && r.name.find("-n" + std::to_string(static_cast<int64_t>(1e5 * std::sqrt(r.budget / 1e12)))) != std::string::npos)
      r.val_loss = r.smoothed_loss = r.val_loss - 0.08;
    if (r.budget == 1e12) (r.experts ? best_moe : best_dense) = std::min(r.experts ? best_moe : best_dense, r.val_loss);
  }
  const ojson f = synthetic_findings(runs);
  const double sd = f["seed_sd"].get<double>();
  EXPECT_GT(best_dense - best_moe, 2 * std::sqrt(2.0) * sd) << "the planted seed must fool the old rule";
  const ojson& c = claim_of(f, "moe_beats_dense");
  EXPECT_EQ(c["verdict"], "inconclusive") << c.dump(1);
  EXPECT_LT(c["estimate"].get<double>(), 0.5 * (best_dense - best_moe));
}

}  // namespace
}  // namespace moelab

namespace moelab {
namespace {

using ojson = nlohmann::ordered_json;

std::string warnings_text(const ojson& f) {
  std::string all;
  for (const auto& w : f["edge_warnings"]) all += w.get<std::string>() + "\n";
  return all;
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

// A fine-tuning record on 400 test items: `before` of them right before fine-tuning (at random positions, seeded by
// the run's name), then 10 + max(0, g) items turned right and 10 + max(0, -g) turned wrong, g = gain x 400, so
// the accuracy moves by `gain` and some items move both ways, as real fine-tuning moves them.
DownstreamRecord tuned_record(const std::string& run, double before, double gain, const std::string& mode = "finetune",
                              bool with_before = true, bool per_item = true) {
  constexpr int n = 400;
  Rng rng(std::hash<std::string>{}(run));
  std::vector<int> order(n);
  for (int i = 0; i < n; ++i) order[i] = i;
  for (int i = n - 1; i > 0; --i) std::swap(order[i], order[rng.below(i + 1)]);
  std::string was(n, '0');
  const int right = static_cast<int>(std::lround(before * n));
  for (int k = 0; k < right; ++k) was[order[k]] = '1';
  const int g = static_cast<int>(std::lround(gain * n));
  const int up = std::min(n - right, 10 + std::max(0, g)), down = std::min(right, 10 + std::max(0, -g));
  std::string now = was;
  for (int k = 0; k < down; ++k) now[order[k]] = '0';              // right items turned wrong
  for (int k = 0; k < up; ++k) now[order[right + k]] = '1';        // wrong items turned right
  DownstreamRecord d;
  d.run = run;
  d.task = "cloze";
  d.mode = mode;
  d.n = n;
  d.acc = std::count(now.begin(), now.end(), '1') / double(n);
  d.acc_stderr = std::sqrt(d.acc * (1 - d.acc) / n);
  if (per_item) d.correct = now;
  d.finetune = {{"steps", 10}};
  if (with_before) {
    const double b = std::count(was.begin(), was.end(), '1') / double(n);
    d.finetune["before"] = {{"acc", b}, {"acc_stderr", std::sqrt(b * (1 - b) / n)}, {"acc_norm", b},
                            {"acc_norm_stderr", 0.02}, {"n", n}};
    if (per_item) d.finetune["before"]["correct"] = was;
  }
  return d;
}

// Fine-tuned runs at three budgets. Only 4e12 is the one to judge: 1.6e13 has a fine-tuned dense run only, and
// 1e12 (a smaller budget) says the opposite of 4e12. At 4e12 the lower-loss MoE (moe-a) is the one to use; the
// other fine-tuned MoE (moe-b, higher loss) and records that are not fine-tuning results say the opposite too.
ojson finetune_findings(double dense_gain, double moe_gain, bool per_item = true) {
  Study study;
  StudySweep s;
  s.label = "sparsity";
  s.plan.kind = "isoflop";
  s.results = {tuned_run("dense-1e12", 1e12, false, 3.0),  tuned_run("moe-1e12", 1e12, true, 2.9),
               tuned_run("dense-4e12", 4e12, false, 2.8),  tuned_run("moe-a-4e12", 4e12, true, 2.7),
               tuned_run("moe-b-4e12", 4e12, true, 2.75),  tuned_run("dense-1.6e13", 1.6e13, false, 2.6)};
  s.downstream = {
      tuned_record("dense-1e12", 0.3, moe_gain, "finetune", true, per_item),
      tuned_record("moe-1e12", 0.3, dense_gain, "finetune", true, per_item),
      tuned_record("dense-4e12", 0.30, dense_gain, "finetune", true, per_item),
      tuned_record("moe-a-4e12", 0.32, moe_gain, "finetune", true, per_item),
      tuned_record("moe-b-4e12", 0.32, dense_gain + 0.2, "finetune", true, per_item),
      // Zero-shot results: ignored.
      tuned_record("moe-a-4e12", 0.32, dense_gain + 0.5, "zero", true, per_item),
      tuned_record("dense-1.6e13", 0.3, 0.6, "finetune", true, per_item)};
  study.sweeps.push_back(s);
  // A second sweep of the study holding an MoE run at 1.6e13 with a record lacking "before" (written before it
  // existed): still no pair there.
  StudySweep other;
  other.label = "other";
  other.plan.kind = "isoflop";
  other.results = {tuned_run("moe-1.6e13", 1.6e13, true, 2.5)};
  other.downstream = {tuned_record("moe-1.6e13", 0.3, 0.01, "finetune", false)};
  study.sweeps.push_back(other);
  return findings_json(study, "smoothed_loss");
}

TEST(Findings, FinetuneGainIsJudgedPerItemAtTheLargestBudgetWithBoth) {
  // Dense gains 0.20, MoE 0.05, over the same 400 items.
  const ojson f = finetune_findings(0.20, 0.05);
  const ojson& c = claim_of(f, "finetune");
  EXPECT_EQ(c["verdict"], "reproduced") << c.dump(1);
  const std::string measured = c["measured"];
  EXPECT_NE(measured.find("dense-4e12 vs moe-a-4e12"), std::string::npos) << measured;
  EXPECT_NE(measured.find("dense gain - MoE gain = +0.150"), std::string::npos) << measured;
  EXPECT_NE(measured.find("items turned right / wrong by fine-tuning: dense 90 / 10, MoE 30 / 10"), std::string::npos)
      << measured;
  EXPECT_NE(c["spread"].get<std::string>().find("paired over 400 items: 95% interval ["), std::string::npos)
      << c["spread"];
  // A difference of 0.075 that four accuracies taken as independent cannot tell (2 binomial se = 0.092 here) is
  // decided per item, because most items keep their answer.
  const ojson small_findings = finetune_findings(0.10, 0.025), tiny_findings = finetune_findings(0.20, 0.175),
              old_findings = finetune_findings(0.20, 0.05, false);
  const ojson& small = claim_of(small_findings, "finetune");
  EXPECT_EQ(small["verdict"], "reproduced") << small.dump(1);
  // 0.025: inconclusive, with what the design could have detected.
  const ojson& tiny = claim_of(tiny_findings, "finetune");
  EXPECT_EQ(tiny["verdict"], "inconclusive") << tiny.dump(1);
  EXPECT_NE(tiny["why"].get<std::string>().find("detects an effect of"), std::string::npos) << tiny.dump(1);
  // MoE gains more: refuted.
  EXPECT_EQ(claim_of(finetune_findings(0.05, 0.20), "finetune")["verdict"], "not reproduced");
  // Records from before per-item results: inconclusive, saying why, never four accuracies as if independent.
  const ojson& old = claim_of(old_findings, "finetune");
  EXPECT_EQ(old["verdict"], "inconclusive");
  EXPECT_NE(old["why"].get<std::string>().find("predate per-item results"), std::string::npos) << old.dump(1);
}

// Every fine-tuned replicate counts: item by item, the gain difference is averaged over the replicates both arms
// fine-tuned, paired by data seed; a replicate of one arm only is left out.
TEST(Findings, FinetuneAveragesItemGainsOverPairedReplicates) {
  Study study;
  StudySweep s;
  s.label = "sparsity";
  s.plan.kind = "isoflop";
  const std::vector<double> dense_gains = {0.20, 0.10, 0.15};
  for (int r = 1; r <= 3; ++r) {
    const std::string suffix = r == 1 ? "" : "-s" + std::to_string(r);
    RunResult d = tuned_run("dense-4e12" + suffix, 4e12, false, 2.8), m = tuned_run("moe-4e12" + suffix, 4e12, true, 2.7);
    d.seed = d.data_seed = m.seed = m.data_seed = r;
    s.results.push_back(d), s.results.push_back(m);
    s.downstream.push_back(tuned_record(d.name, 0.30, dense_gains[r - 1]));
    s.downstream.push_back(tuned_record(m.name, 0.32, 0.05));
  }
  RunResult extra = tuned_run("moe-4e12-s4", 4e12, true, 2.7);  // no dense replicate 4: not paired
  extra.seed = extra.data_seed = 4;
  s.results.push_back(extra);
  s.downstream.push_back(tuned_record(extra.name, 0.32, 0.5));
  study.sweeps.push_back(s);
  const ojson f = findings_json(study, "smoothed_loss");
  const ojson& c = claim_of(f, "finetune");
  EXPECT_EQ(c["verdict"], "reproduced") << c.dump(1);
  const std::string measured = c["measured"];
  EXPECT_NE(measured.find("dense-4e12 vs moe-4e12 and their other 2 replicates (means over 3)"), std::string::npos)
      << measured;
  EXPECT_NE(measured.find("dense gain - MoE gain = +0.100"), std::string::npos) << measured;
  EXPECT_NE(c["spread"].get<std::string>().find("paired over 400 items x 3 replicates"), std::string::npos) << c["spread"];
  EXPECT_EQ(c["n_per_arm"]["dense"]["runs"], 3);
  EXPECT_EQ(c["n_per_arm"]["moe"]["runs"], 3);
  EXPECT_NEAR(c["estimate"].get<double>(), 0.10, 1e-12);
  // The same arms with one replicate each: a wider interval than with three.
  Study one = study;
  std::erase_if(one.sweeps[0].downstream, [](const DownstreamRecord& d) { return d.run.find("-s") != std::string::npos; });
  const ojson g = findings_json(one, "smoothed_loss");
  const ojson& c1 = claim_of(g, "finetune");
  EXPECT_EQ(c1["n_per_arm"]["dense"]["runs"], 1);
  EXPECT_GT(c1["detectable_effect"].get<double>(), c["detectable_effect"].get<double>()) << c1.dump(1);
}

TEST(Findings, FinetuneWithoutBeforeOrWithoutAPairIsNotMeasured) {
  Study study;
  StudySweep s;
  s.label = "sparsity";
  s.plan.kind = "isoflop";
  s.results = {tuned_run("dense-1e12", 1e12, false, 3.0), tuned_run("moe-1e12", 1e12, true, 2.9),
               tuned_run("dense-4e12", 4e12, false, 2.8)};
  // A pair at 1e12, but the MoE record has no "before"; a dense record at 4e12 with no MoE partner; a few-shot one.
  s.downstream = {tuned_record("dense-1e12", 0.3, 0.2), tuned_record("moe-1e12", 0.3, 0.01, "finetune", false),
                  tuned_record("dense-4e12", 0.3, 0.2), tuned_record("moe-1e12", 0.3, 0.01, "few")};
  study.sweeps.push_back(s);
  EXPECT_EQ(claim_of(findings_json(study, "smoothed_loss"), "finetune")["verdict"], "not measured");
  // With "before" on the MoE record, 1e12 is judged: dense +0.2, MoE +0.01.
  study.sweeps[0].downstream[1] = tuned_record("moe-1e12", 0.3, 0.01);
  EXPECT_EQ(claim_of(findings_json(study, "smoothed_loss"), "finetune")["verdict"], "reproduced");
  // A failed MoE run does not count.
  study.sweeps[0].results[1].status = "failed";
  EXPECT_EQ(claim_of(findings_json(study, "smoothed_loss"), "finetune")["verdict"], "not measured");
}

// ---- loss against sparsity at fixed total parameters (Abnar) ------------------------------------------------------

// A fixed-parameter sweep: at S = 0, 0.5, ..., 0.984 (x = log2 E = 0..6), loss = 3 + curve(x) + shared[r] + own.
ojson fixed_params_findings(const std::function<double(double)>& curve, int replicates = 3, double own = 0.002) {
  Study study;
  StudySweep s;
  s.label = "fixed-params";
  s.plan.kind = "fixed_params";
  Rng rng(11);
  for (int r = 1; r <= replicates; ++r) {
    const double shared = 0.03 * rng.normal();
    for (int x = 0; x <= 6; ++x) {
      PlannedRun p;
      p.name = "n3e5-x" + std::to_string(x) + (r > 1 ? "-s" + std::to_string(r) : "");
      p.target_params = 3e5, p.budget = 1e12;
      s.plan.runs.push_back(p);
      RunResult run;
      run.name = p.name;
      run.status = "ok";
      run.budget = 1e12;
      run.experts = x ? int64_t{1} << x : 0, run.top_k = x ? 1 : 0;
      run.sparsity = 1 - std::exp2(-x);
      run.nonembedding_params = 300000 - 1000 * x, run.d_model = 64 - 4 * x, run.n_layers = 4;
      run.seed = run.data_seed = r;
      run.smoothed_loss = run.val_loss = 3 + curve(x) + shared + own * rng.normal();
      s.results.push_back(run);
    }
  }
  study.sweeps.push_back(s);
  return findings_json(study, "val_loss");
}

TEST(Findings, FixedParamsUShapeIsJudgedByCurvatureAndWhereItsMinimumLies) {
  // A U with its bottom at x = 3 (S 0.875): curvature 0.01 per (log2 E)^2.
  ojson f = fixed_params_findings([](double x) { return 0.01 * (x - 3) * (x - 3); });
  const ojson& c = claim_of(f, "fixed_n_u_shape");
  EXPECT_EQ(c["verdict"], "reproduced") << c.dump(1);
  EXPECT_NEAR(c["estimate"].get<double>(), 0.01, 0.002);
  EXPECT_NEAR(c["details"][0]["S_star"].get<double>(), 0.875, 0.03);
  // Monotone: falling all the way (a convex curve whose bottom lies beyond the sparsest S), or a straight line.
  f = fixed_params_findings([](double x) { return 0.01 * (x - 9) * (x - 9); });
  EXPECT_EQ(verdict_of(f, "fixed_n_u_shape"), "not reproduced") << claim_of(f, "fixed_n_u_shape").dump(1);
  // An upside-down U: not reproduced.
  EXPECT_EQ(verdict_of(fixed_params_findings([](double x) { return -0.01 * (x - 3) * (x - 3); }), "fixed_n_u_shape"),
            "not reproduced");
  // A faint U under large own noise: inconclusive.
  f = fixed_params_findings([](double x) { return 0.001 * (x - 3) * (x - 3); }, 3, 0.02);
  EXPECT_EQ(verdict_of(f, "fixed_n_u_shape"), "inconclusive") << claim_of(f, "fixed_n_u_shape").dump(1);
  // Fewer than 3 sparsity levels: not a curve.
  Study two;
  EXPECT_EQ(verdict_of(findings_json(two, "val_loss"), "fixed_n_u_shape"), "not measured");
}

// ---- the optimal granularity (Krajewski) -------------------------------------------------------------------------

// A granularity sweep at C 1e12 and 4e12: G = 1, 2, 4, 8 (x = log2 G), loss = 3 + 0.02 (x - x*(C))^2 + noise.
ojson granularity_findings(double x_small, double x_large, double own = 0.002) {
  Study study;
  StudySweep s;
  s.label = "granularity";
  s.plan.kind = "granularity";
  Rng rng(5);
  for (int r = 1; r <= 3; ++r) {
    const double shared = 0.03 * rng.normal();
    for (auto [C, xs] : {std::pair{1e12, x_small}, std::pair{4e12, x_large}})
      for (int x = 0; x <= 3; ++x) {
        RunResult run;
        run.name = "c" + compact_number(C) + "-g" + std::to_string(1 << x) + (r > 1 ? "-s" + std::to_string(r) : "");
        run.status = "ok";
        run.budget = C;
        run.granularity = 1 << x, run.experts = 4 << x, run.top_k = 1 << x, run.sparsity = 0.75;
        run.nonembedding_params = 100000, run.d_model = 64, run.n_layers = 4;
        run.seed = run.data_seed = r;
        run.smoothed_loss = run.val_loss = 3 - 0.1 * std::log10(C / 1e12) + 0.02 * (x - xs) * (x - xs) + shared +
                                           own * rng.normal();
        s.results.push_back(run);
      }
  }
  study.sweeps.push_back(s);
  return findings_json(study, "val_loss");
}

TEST(Findings, GranularityAboveOneAndGrowingIsJudgedPerReplicate) {
  // G* = 2 at the smaller budget, 4 at the larger: reproduced, with G* and its interval per budget.
  ojson f = granularity_findings(1, 2);
  const ojson& c = claim_of(f, "granularity");
  EXPECT_EQ(c["verdict"], "reproduced") << c.dump(1);
  EXPECT_NEAR(c["estimate"].get<double>(), 1.0, 0.2);  // log2 G* grows by one doubling
  EXPECT_NEAR(c["details"][0]["G_star"].get<double>(), 2.0, 0.3);
  EXPECT_NEAR(c["details"][1]["G_star"].get<double>(), 4.0, 0.6);
  // The same G* at both budgets: above 1, but no growth to see.
  f = granularity_findings(1.5, 1.5);
  EXPECT_EQ(verdict_of(f, "granularity"), "inconclusive") << claim_of(f, "granularity").dump(1);
  EXPECT_NE(claim_of(f, "granularity")["why"].get<std::string>().find("detects an effect of"), std::string::npos);
  // G* falls with the budget.
  EXPECT_EQ(verdict_of(granularity_findings(2, 1), "granularity"), "not reproduced");
  // Loss rises from G = 1 at both budgets: G = 1 is best.
  f = granularity_findings(-1, -1);
  EXPECT_EQ(verdict_of(f, "granularity"), "not reproduced") << claim_of(f, "granularity").dump(1);
  EXPECT_EQ(verdict_of(findings_json(Study{}, "val_loss"), "granularity"), "not measured");
}

TEST(Findings, OptimaOnTheEdgeOfTheirRangeWarn) {
  StudySummary summary;
  GranularityOptimum g;
  g.key = 4e12, g.G_star = 4, g.on_edge = true;
  summary.granularity_optimum.push_back(g);
  FixedParamsCurve fixed;
  fixed.params = 3e5, fixed.on_edge = true;
  summary.fixed_params.push_back(fixed);
  const ojson f = findings_to_json(study_findings(Study{}, summary, "val_loss"));
  std::string w;
  for (const auto& x : f["edge_warnings"]) w += x.get<std::string>() + "\n";
  EXPECT_NE(w.find("the best granularity at C 4e+12 is the largest measured (G = 4)"), std::string::npos) << w;
  EXPECT_NE(w.find("at fixed total parameters (N 3e+05) the lowest mean loss is at an end"), std::string::npos) << w;
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
  const ojson f = findings_json(study, "smoothed_loss");
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
  const ojson none = findings_json(good, "smoothed_loss");
  EXPECT_TRUE(none["edge_warnings"].empty()) << warnings_text(none);
  EXPECT_EQ(verdict_of(none, "fixed_n_u_shape"), "not measured");
  EXPECT_EQ(verdict_of(none, "finetune"), "not measured");
}

}  // namespace
}  // namespace moelab

// ---- analyse_study: the granularity optimum and law, loss against S at fixed N, the dense-vs-MoE pair ----------

namespace moelab {
namespace {

using ojson = nlohmann::ordered_json;

// A run with every field analyse_study reads. G = 0 is dense; G > 0 an MoE of 4 G experts, top-G (S = 0.75).
RunResult study_run(const std::string& name, double C, int64_t d_model, int64_t n_layers, int64_t G, int64_t N,
                    int64_t D, double loss, int64_t seed = 1) {
  RunResult r;
  r.name = name;
  r.status = "ok";
  r.val_loss = r.smoothed_loss = r.loss = loss;
  r.experts = G > 0 ? 4 * G : 0;
  r.granularity = G > 0 ? G : 1;
  r.top_k = G > 0 ? G : 0;
  r.sparsity = G > 0 ? 0.75 : 0.0;
  r.d_model = d_model, r.n_layers = n_layers;
  r.nonembedding_params = N;
  r.active_params = G > 0 ? N / 4 : N;
  r.params = N + 100000;
  r.tokens = D;
  r.flops = 6.0 * static_cast<double>(r.active_params) * static_cast<double>(D);
  r.budget = C;
  r.seed = seed;
  return r;
}

AnalysisOptions val_loss_options() {
  AnalysisOptions o;
  o.loss = "val_loss";
  o.bootstrap = 0;
  return o;
}

bool any_row_has(const ojson& rows, const std::string& key) {
  for (const auto& r : rows)
    if (r.contains(key)) return true;
  return false;
}

// C 1e12 (d_model 64, 2 layers): G* = 2 among G 1..8. C 4e12 (d_model 96, 3 layers): G* = 8, the largest measured.
// The runs of the larger budget come first, and a failed run with the lowest loss of all is present.
Study granularity_study() {
  StudySweep s;
  s.label = "granularity";
  s.plan.kind = "granularity";
  struct Budget {
    double C;
    int64_t d_model, n_layers, n0;
    double dense_a, dense_b;
    std::vector<double> moe;  // loss at G = 1, 2, 4, 8
  };
  const std::vector<Budget> budgets = {{4e12, 96, 3, 3000000, 3.05, 3.00, {2.95, 2.90, 2.87, 2.85}},
                                       {1e12, 64, 2, 1000000, 3.20, 3.15, {3.10, 3.00, 3.05, 3.09}}};
  for (const auto& b : budgets) {
    const std::string c = "c" + compact_number(b.C);
    auto tokens = [&](int64_t N) { return static_cast<int64_t>(std::llround(b.C / (6.0 * static_cast<double>(N)))); };
    s.results.push_back(study_run(c + "-dense-a", b.C, b.d_model, b.n_layers, 0, b.n0, tokens(b.n0), b.dense_a));
    s.results.push_back(study_run(c + "-dense-b", b.C, b.d_model, b.n_layers, 0, b.n0, tokens(b.n0), b.dense_b));
    int i = 0;
    for (int64_t G : {1, 2, 4, 8}) {
      const int64_t N = b.n0 + b.n0 / 100 * G;
      s.results.push_back(study_run(c + "-g" + std::to_string(G), b.C, b.d_model, b.n_layers, G, N, tokens(N), b.moe[i++]));
    }
  }
  RunResult failed = study_run("c1e12-g16", 1e12, 64, 2, 16, 1160000, 143678, 1.0);
  failed.status = "failed";
  s.results.push_back(failed);
  Study study;
  study.dir = "/nonexistent/granularity-study";
  study.sweeps.push_back(s);
  return study;
}

TEST(ReportAnalysis, GranularityOptimumPerBudget) {
  const Study study = granularity_study();
  const ojson s = summary_to_json(analyse_study(study, val_loss_options()));
  const ojson& rows = s["granularity_optimum"];
  ASSERT_EQ(rows.size(), 2u) << rows.dump(1);
  // Budget order, whatever the order of the results.
  EXPECT_EQ(rows[0]["C"].get<double>(), 1e12);
  EXPECT_EQ(rows[1]["C"].get<double>(), 4e12);
  EXPECT_FALSE(rows[0].contains("tokens"));
  // C 1e12: G* = 2, inside the measured range; the failed G = 16 run (loss 1.0) is not counted.
  EXPECT_EQ(rows[0]["G_star"].get<int64_t>(), 2);
  EXPECT_EQ(rows[0]["best"]["name"], "c1e12-g2");
  EXPECT_EQ(rows[0]["largest_G_measured"].get<double>(), 8.0);
  EXPECT_FALSE(rows[0]["on_edge"].get<bool>());
  EXPECT_EQ(rows[0]["dense"]["name"], "c1e12-dense-b");  // the better of the two dense runs
  // C 4e12: G* = 8, the largest measured.
  EXPECT_EQ(rows[1]["G_star"].get<int64_t>(), 8);
  EXPECT_EQ(rows[1]["best"]["name"], "c4e12-g8");
  EXPECT_TRUE(rows[1]["on_edge"].get<bool>());
  EXPECT_EQ(rows[1]["dense"]["name"], "c4e12-dense-b");
  // The loss against G at the best run's shape: the four MoE runs of that budget, dense runs left out.
  const std::map<int64_t, double> expected[2] = {{{1, 3.10}, {2, 3.00}, {4, 3.05}, {8, 3.09}},
                                                 {{1, 2.95}, {2, 2.90}, {4, 2.87}, {8, 2.85}}};
  for (int k = 0; k < 2; ++k) {
    const ojson& curve = rows[k]["curve_at_best_shape"];
    ASSERT_EQ(curve.size(), 4u) << curve.dump(1);
    std::map<int64_t, double> got;
    for (const auto& p : curve) {
      got[p["G"].get<int64_t>()] = p["loss"].get<double>();
      EXPECT_EQ(p["name"].get<std::string>(),
                "c" + compact_number(rows[k]["C"].get<double>()) + "-g" + std::to_string(p["G"].get<int64_t>()));
    }
    EXPECT_EQ(got, expected[k]);
  }

  // 8 MoE runs over 2 shapes: the law is fitted (possibly degenerate) or skipped; a G* is read off the law only
  // when it was fitted with positive exponents.
  const ojson& fit = s["granularity_fit"];
  ASSERT_TRUE(fit.contains("skipped") || fit.contains("parameters")) << fit.dump(1);
  const bool usable_law = fit.contains("parameters") && !fit.contains("degenerate");
  for (const auto& row : rows) EXPECT_EQ(row.contains("law"), usable_law) << fit.dump(1) << "\n" << row.dump(1);
  // Fitted: "degenerate" exactly when an exponent is not positive (with these 8 runs the fit is deterministic and
  // comes out with alpha < 0, so this is the path taken).
  if (fit.contains("parameters")) {
    bool non_positive = false;
    for (const char* k : {"alpha", "beta", "gamma"}) non_positive |= !(fit["coefficients"][k].get<double>() > 0);
    EXPECT_EQ(fit.contains("degenerate"), non_positive) << fit.dump(1);
    if (fit.contains("degenerate")) {
      EXPECT_NE(fit["degenerate"].get<std::string>().find("not all positive"), std::string::npos);
    }
  }

  // (a) Without the G = 8 runs: 6 MoE runs, too few for the law. G* per budget is still measured, and at 4e12 it
  // is now the largest G left (4), on the edge.
  Study fewer = study;
  auto& rs = fewer.sweeps[0].results;
  rs.erase(std::remove_if(rs.begin(), rs.end(), [](const RunResult& r) { return r.granularity == 8; }), rs.end());
  ASSERT_EQ(rs.size(), 11u);
  const ojson f = summary_to_json(analyse_study(fewer, val_loss_options()));
  ASSERT_TRUE(f["granularity_fit"].contains("skipped")) << f["granularity_fit"].dump(1);
  EXPECT_FALSE(f["granularity_fit"].contains("parameters"));
  EXPECT_NE(f["granularity_fit"]["skipped"].get<std::string>().find("at least 8 MoE runs"), std::string::npos);
  ASSERT_EQ(f["granularity_optimum"].size(), 2u);
  EXPECT_FALSE(any_row_has(f["granularity_optimum"], "law")) << f["granularity_optimum"].dump(1);
  EXPECT_EQ(f["granularity_optimum"][0]["G_star"].get<int64_t>(), 2);
  EXPECT_FALSE(f["granularity_optimum"][0]["on_edge"].get<bool>());
  EXPECT_EQ(f["granularity_optimum"][1]["G_star"].get<int64_t>(), 4);
  EXPECT_EQ(f["granularity_optimum"][1]["largest_G_measured"].get<double>(), 4.0);
  EXPECT_TRUE(f["granularity_optimum"][1]["on_edge"].get<bool>());
  EXPECT_EQ(f["granularity_optimum"][1]["curve_at_best_shape"].size(), 3u);
}

// Krajewski et al.'s published-like coefficients: L = c + (g / G^gamma + a) / N^alpha + b / D^beta.
constexpr double kA = 18.1, kAlpha = 0.115, kB = 30.8, kBeta = 0.147, kG = 2.1, kGamma = 0.58, kC = 0.47;
double granularity_law(double N, double D, double G) {
  return kC + (kG / std::pow(G, kGamma) + kA) / std::pow(N, kAlpha) + kB / std::pow(D, kBeta);
}

TEST(ReportAnalysis, GranularityLawFittedOnExactDataGivesTheLawsOptimum) {
  // Two budgets x three shapes x G 1, 2, 4, 8 (24 MoE runs), losses exactly the law's. At a shape, N grows by 2% of
  // the shape's size per unit of G and D falls by 1.5%, both exactly linear in G, so the law's N and D carried to
  // G = 16 and 32 are known, and the law's optimum (G = 16) lies beyond the measured best (G = 8).
  StudySweep s;
  s.label = "granularity";
  s.plan.kind = "granularity";
  struct Shape {
    int64_t d_model, n_layers;
    double N;
  };
  const std::vector<Shape> shapes = {{64, 2, 2e6}, {96, 3, 6e6}, {128, 4, 1.5e7}};
  const std::vector<double> budgets = {1e15, 4e15};
  auto N_at = [](const Shape& sh, double G) { return sh.N * (1 + 0.02 * G); };
  auto D_at = [](double C, const Shape& sh, double G) { return C / (6 * sh.N) * (1 - 0.015 * G); };
  std::vector<size_t> best_shape(budgets.size(), 0);
  for (size_t b = 0; b < budgets.size(); ++b) {
    double best = INFINITY;
    for (size_t k = 0; k < shapes.size(); ++k)
      for (int64_t G : {1, 2, 4, 8}) {
        const int64_t N = std::llround(N_at(shapes[k], G)), D = std::llround(D_at(budgets[b], shapes[k], G));
        const double L = granularity_law(static_cast<double>(N), static_cast<double>(D), static_cast<double>(G));
        if (L < best) best = L, best_shape[b] = k;
        s.results.push_back(study_run("c" + compact_number(budgets[b]) + "-d" + std::to_string(shapes[k].d_model) + "-g" +
                                          std::to_string(G),
                                      budgets[b], shapes[k].d_model, shapes[k].n_layers, G, N, D, L));
      }
  }
  Study study;
  study.dir = "/nonexistent/granularity-law";
  study.sweeps.push_back(s);
  const ojson out = summary_to_json(analyse_study(study, val_loss_options()));
  const ojson& fit = out["granularity_fit"];
  ASSERT_TRUE(fit.contains("parameters")) << fit.dump(1);
  EXPECT_FALSE(fit.contains("degenerate")) << fit.dump(1);
  EXPECT_EQ(fit["n_points"].get<int64_t>(), 24);
  EXPECT_EQ(fit["expansion"].get<double>(), 4.0);
  // The exponents come back (the data are exact).
  const ojson& co = fit["coefficients"];
  EXPECT_NEAR(co["alpha"].get<double>(), kAlpha, 1e-4) << co.dump();
  EXPECT_NEAR(co["beta"].get<double>(), kBeta, 1e-4) << co.dump();
  EXPECT_NEAR(co["gamma"].get<double>(), kGamma, 1e-4) << co.dump();

  const ojson& rows = out["granularity_optimum"];
  ASSERT_EQ(rows.size(), 2u) << rows.dump(1);
  for (size_t b = 0; b < budgets.size(); ++b) {
    const ojson& row = rows[b];
    EXPECT_EQ(row["C"].get<double>(), budgets[b]);
    EXPECT_EQ(row["G_star"].get<int64_t>(), 8);
    EXPECT_TRUE(row["on_edge"].get<bool>());
    EXPECT_TRUE(row["dense"].is_null());
    EXPECT_EQ(row["best"]["d_model"].get<int64_t>(), shapes[best_shape[b]].d_model);
    // Only the best shape's four runs, not all twelve of the budget.
    EXPECT_EQ(row["curve_at_best_shape"].size(), 4u);
    ASSERT_TRUE(row.contains("law")) << row.dump(1);
    ASSERT_TRUE(row["law"].contains("G_star")) << row["law"].dump(1);
    EXPECT_EQ(row["law"]["G_star"].get<double>(), 16.0) << row["law"].dump(1);
    const ojson& by_G = row["law"]["by_G"];
    ASSERT_EQ(by_G.size(), 6u) << by_G.dump(1);
    const Shape& sh = shapes[best_shape[b]];
    for (const auto& p : by_G) {
      const double G = p["G"].get<double>();
      EXPECT_NEAR(p["N"].get<double>() / N_at(sh, G), 1.0, 1e-6) << p.dump();
      EXPECT_NEAR(p["D"].get<double>() / D_at(budgets[b], sh, G), 1.0, 1e-6) << p.dump();
      EXPECT_NEAR(p["loss"].get<double>(), granularity_law(N_at(sh, G), D_at(budgets[b], sh, G), G), 1e-5) << p.dump();
    }
    EXPECT_NEAR(row["law"]["loss"].get<double>(), granularity_law(N_at(sh, 16), D_at(budgets[b], sh, 16), 16), 1e-5);
  }
}

// ---- loss against S at fixed total parameters ----

// A fixed_params run: planned with its target N and budget (the analysis groups by them), experts 1 / (1 - S).
void add_fixed_run(StudySweep& s, const std::string& name, double target_N, double C, double S, double loss,
                   int64_t seed = 1) {
  PlannedRun p;
  p.name = name;
  p.group = "fixed_params";
  p.target_params = target_N;
  p.budget = C;
  p.target_sparsity = S;
  s.plan.runs.push_back(p);
  const int64_t experts = S > 0 ? std::llround(1 / (1 - S)) : 0;
  const int64_t N = static_cast<int64_t>(target_N) + 1234 * experts;  // the realised count misses the target a little
  RunResult r = study_run(name, C, 64, 2, 0, N, static_cast<int64_t>(C / (6 * (1 - S) * N)), loss, seed);
  r.experts = experts, r.top_k = S > 0 ? 1 : 0, r.sparsity = S, r.granularity = 1;
  r.active_params = static_cast<int64_t>((1 - S) * static_cast<double>(N));
  s.results.push_back(r);
}

TEST(ReportAnalysis, FixedParamsCurveAndEdge) {
  StudySweep s;
  s.label = "fixed";
  s.plan.kind = "fixed_params";
  // N 4e7 first (a minimum at the densest end), then N 1e7 (an inner minimum at S 0.75), results out of S order.
  add_fixed_run(s, "n4e7-s0.5", 4e7, 1e13, 0.5, 2.95);
  add_fixed_run(s, "n4e7-s0", 4e7, 1e13, 0.0, 2.90);
  add_fixed_run(s, "n4e7-s0.875", 4e7, 1e13, 0.875, 3.00);
  const std::vector<std::pair<double, double>> curve = {{0.0, 3.10}, {0.5, 3.02}, {0.75, 3.00}, {0.875, 3.04},
                                                        {0.9375, 3.12}};
  for (size_t i : {3u, 0u, 4u, 2u, 1u})
    add_fixed_run(s, "n1e7-s" + compact_number(curve[i].first), 1e7, 1e13, curve[i].first, curve[i].second);
  // Not counted: a failed run (lowest loss of all), and a result the plan does not know.
  add_fixed_run(s, "n1e7-s0.25", 1e7, 1e13, 0.25, 1.0);
  s.results.back().status = "failed";
  s.results.push_back(study_run("stray", 1e13, 64, 2, 1, 10000000, 1000, 0.5));
  Study study;
  study.dir = "/nonexistent/fixed";
  study.sweeps.push_back(s);

  ojson out = summary_to_json(analyse_study(study, val_loss_options()));
  ASSERT_EQ(out["fixed_params"].size(), 2u) << out["fixed_params"].dump(1);
  const ojson* g = &out["fixed_params"][0];
  EXPECT_EQ((*g)["sweep"], "fixed");
  EXPECT_EQ((*g)["params"].get<double>(), 1e7);
  EXPECT_EQ((*g)["C"].get<double>(), 1e13);
  ASSERT_EQ((*g)["points"].size(), 5u) << g->dump(1);
  for (size_t i = 0; i < curve.size(); ++i) {
    EXPECT_EQ((*g)["points"][i]["sparsity"].get<double>(), curve[i].first) << i;
    EXPECT_EQ((*g)["points"][i]["loss"].get<double>(), curve[i].second) << i;
    EXPECT_EQ((*g)["points"][i]["seeds"].get<int64_t>(), 1) << i;
    EXPECT_EQ((*g)["points"][i]["name"], "n1e7-s" + compact_number(curve[i].first)) << i;
  }
  EXPECT_EQ((*g)["S_star"].get<double>(), 0.75);
  EXPECT_EQ((*g)["L_star"].get<double>(), 3.00);
  EXPECT_FALSE((*g)["on_edge"].get<bool>());
  // The other target N: lowest at S = 0, on the edge.
  g = &out["fixed_params"][1];
  EXPECT_EQ((*g)["params"].get<double>(), 4e7);
  ASSERT_EQ((*g)["points"].size(), 3u) << g->dump(1);
  EXPECT_EQ((*g)["S_star"].get<double>(), 0.0);
  EXPECT_EQ((*g)["L_star"].get<double>(), 2.90);
  EXPECT_TRUE((*g)["on_edge"].get<bool>());

  // A second seed at S 0.5 (loss 3.06): one point, the mean over the seeds.
  add_fixed_run(study.sweeps[0], "n1e7-s0.5-seed2", 1e7, 1e13, 0.5, 3.06, 2);
  out = summary_to_json(analyse_study(study, val_loss_options()));
  ASSERT_EQ(out["fixed_params"].size(), 2u);
  g = &out["fixed_params"][0];
  ASSERT_EQ((*g)["points"].size(), 5u) << g->dump(1);
  const ojson& p = (*g)["points"][1];
  EXPECT_EQ(p["sparsity"].get<double>(), 0.5);
  EXPECT_NEAR(p["loss"].get<double>(), (3.02 + 3.06) / 2, 1e-12);
  EXPECT_EQ(p["seeds"].get<int64_t>(), 2);
  EXPECT_EQ((*g)["points"][2]["seeds"].get<int64_t>(), 1);
  EXPECT_EQ((*g)["S_star"].get<double>(), 0.75);
  EXPECT_FALSE((*g)["on_edge"].get<bool>());
}

// ---- the dense-vs-MoE pair of the largest budget ----

DownstreamRecord pair_record(const std::string& run, const std::string& mode, int64_t shots, double acc) {
  DownstreamRecord d;
  d.run = run;
  d.task = "cloze";
  d.mode = mode;
  d.shots = shots;
  d.n = 200;
  d.acc = acc;
  d.acc_stderr = std::sqrt(acc * (1 - acc) / 200);
  if (mode == "finetune")
    d.finetune = {{"before", {{"acc", acc - 0.1}, {"acc_stderr", 0.03}, {"n", 200}}}, {"steps", 10}};
  return d;
}

TEST(ReportAnalysis, DenseMoePairAtTheLargestBudget) {
  StudySweep s;
  s.label = "sparsity";
  s.plan.kind = "isoflop";
  // Per budget: dense and MoE (S 0.75) at two shapes. The larger budget is listed first; its best dense is the wide
  // shape, its best MoE the narrow one.
  struct Run {
    std::string name;
    double C;
    int64_t d_model, G;
    double loss;
  };
  const std::vector<Run> runs = {{"c4e12-d96-dense", 4e12, 96, 0, 3.00}, {"c4e12-d64-dense", 4e12, 64, 0, 3.04},
                                 {"c4e12-d64-moe", 4e12, 64, 2, 2.90},   {"c4e12-d96-moe", 4e12, 96, 2, 2.93},
                                 {"c1e12-d64-dense", 1e12, 64, 0, 3.20}, {"c1e12-d96-dense", 1e12, 96, 0, 3.25},
                                 {"c1e12-d64-moe", 1e12, 64, 2, 3.10},   {"c1e12-d96-moe", 1e12, 96, 2, 3.12}};
  for (const auto& r : runs) {
    const int64_t N = r.d_model * r.d_model * 24;
    RunResult rr = study_run(r.name, r.C, r.d_model, 2, r.G, N,
                             static_cast<int64_t>(r.C / (6.0 * (r.G > 0 ? N / 4 : N))), r.loss);
    rr.ood_losses = {{"code", r.loss + 0.5}, {"wiki", r.loss + 0.25}};
    s.results.push_back(rr);
  }
  // Downstream: zero-shot, 5-shot and fine-tuned for the pair (and for a run outside it), at both budgets.
  for (const std::string run : {"c4e12-d96-dense", "c4e12-d64-moe", "c4e12-d64-dense", "c1e12-d64-dense", "c1e12-d64-moe"}) {
    const double base = run.find("moe") != std::string::npos ? 0.40 : 0.35;
    s.downstream.push_back(pair_record(run, "zero", 0, base));
    s.downstream.push_back(pair_record(run, "few", 5, base + 0.05));
    s.downstream.push_back(pair_record(run, "finetune", 0, base + 0.2));
  }
  Study study;
  study.dir = "/nonexistent/pair";
  study.sweeps.push_back(s);
  // A later granularity sweep whose dense baseline has the pair's dense name (names are unique only within a
  // sweep): the pair must keep the IsoFLOP run and its own records.
  StudySweep g;
  g.label = "zz-granularity";
  g.plan.kind = "granularity";
  g.results.push_back(study_run("c4e12-d96-dense", 4e12, 96, 2, 0, 96 * 96 * 24, 1000000, 3.7));
  g.downstream.push_back(pair_record("c4e12-d96-dense", "zero", 0, 0.99));
  study.sweeps.push_back(g);
  AnalysisOptions options = val_loss_options();
  options.bootstrap = 5;
  const ojson out = summary_to_json(analyse_study(study, options));
  const ojson& pair = out["dense_vs_moe_pair"];
  ASSERT_FALSE(pair.contains("skipped")) << pair.dump(1);
  EXPECT_EQ(pair["C"].get<double>(), 4e12);
  const std::map<std::string, std::pair<std::string, double>> sides = {{"dense", {"c4e12-d96-dense", 3.00}},
                                                                         {"moe", {"c4e12-d64-moe", 2.90}}};
  for (const auto& [side, expected] : sides) {
    const ojson& o = pair[side];
    EXPECT_EQ(o["name"], expected.first) << side;
    EXPECT_EQ(o["val_loss"].get<double>(), expected.second) << side;
    for (const auto& r : study.sweeps[0].results)
      if (r.name == expected.first) {
        EXPECT_EQ(o["params"].get<int64_t>(), r.params) << side;
        EXPECT_EQ(o["active_params"].get<int64_t>(), r.active_params) << side;
      }
    ASSERT_EQ(o["ood_losses"].size(), 2u) << o.dump(1);
    EXPECT_EQ(o["ood_losses"]["code"].get<double>(), expected.second + 0.5) << side;
    EXPECT_EQ(o["ood_losses"]["wiki"].get<double>(), expected.second + 0.25) << side;
    const ojson& ds = o["downstream"];
    ASSERT_EQ(ds.size(), 3u) << o.dump(1);  // this run's records only
    const double base = side == "moe" ? 0.40 : 0.35;
    std::set<std::string> modes;
    for (const auto& t : ds) {
      modes.insert(t["mode"].get<std::string>());
      EXPECT_EQ(t["task"], "cloze");
      EXPECT_EQ(t["n"].get<int64_t>(), 200);
      if (t["mode"] == "zero") {
        EXPECT_EQ(t["shots"].get<int64_t>(), 0);
        EXPECT_EQ(t["acc"].get<double>(), base);
        EXPECT_FALSE(t.contains("before"));
      } else if (t["mode"] == "few") {
        EXPECT_EQ(t["shots"].get<int64_t>(), 5);
        EXPECT_EQ(t["acc"].get<double>(), base + 0.05);
        EXPECT_FALSE(t.contains("before"));
      } else {
        EXPECT_EQ(t["mode"], "finetune");
        EXPECT_EQ(t["acc"].get<double>(), base + 0.2);
        ASSERT_TRUE(t.contains("before")) << t.dump();
        EXPECT_EQ(t["before"]["acc"].get<double>(), base + 0.2 - 0.1);
        EXPECT_EQ(t["before"]["acc_stderr"].get<double>(), 0.03);
        EXPECT_EQ(t["before"]["n"].get<int64_t>(), 200);
      }
    }
    EXPECT_EQ(modes, (std::set<std::string>{"zero", "few", "finetune"})) << side;
  }
  // The per-budget table agrees on the pair.
  ASSERT_EQ(out["per_budget"].size(), 2u);
  EXPECT_EQ(out["per_budget"][1]["best_dense"]["name"], "c4e12-d96-dense");
  EXPECT_EQ(out["per_budget"][1]["best_moe"]["name"], "c4e12-d64-moe");
}

}  // namespace
}  // namespace moelab
