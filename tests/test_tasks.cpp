// Downstream tasks: the task-file parser's errors, few-shot sampling, the continuation scorer against a hand
// computation from the model's own logits, the masked (answer-only) loss and its gradient, fine-tuning on a
// learnable task, and the results store's downstream table.
#include <gtest/gtest.h>

#include <algorithm>

#include <cmath>
#include <sstream>

#include "eval/finetune.h"
#include "eval/tasks.h"
#include "model/transformer.h"
#include "sweep/results.h"
#include "test_util.h"
#include "train/trainer.h"

namespace moelab {
namespace {

std::string error_of(const std::function<void()>& f) {
  try {
    f();
  } catch (const Error& e) {
    return e.what();
  }
  return "(no error)";
}

// ---- task files ------------------------------------------------------------------------------------------------

TEST(TaskFile, ParsesItemsAndSplits) {
  const Task t = parse_task(
      "{\"context\": \"a\", \"choices\": [\" b\", \" c\"], \"gold\": 1, \"split\": \"train\", \"id\": \"x\"}\n"
      "\n"
      "{\"context\": \"d\", \"choices\": [\" e\", \" f\", \" g\"], \"gold\": 0}\n",
      "mem.jsonl", "mem");
  ASSERT_EQ(t.items.size(), 2u);
  EXPECT_EQ(t.items[0].id, "x");
  EXPECT_EQ(t.items[1].id, "line 3");
  EXPECT_EQ(t.items[1].line, 3);
  EXPECT_EQ(t.split("train").size(), 1u);
  EXPECT_EQ(t.split("test").size(), 1u);  // no split: test
  EXPECT_EQ(t.items[0].choices[t.items[0].gold], " c");
}

TEST(TaskFile, MalformedLinesNameTheLineAndTheProblem) {
  const std::string ok = "{\"context\": \"a\", \"choices\": [\" b\", \" c\"], \"gold\": 0}\n";
  struct Case {
    std::string line, expect;
  };
  const std::vector<Case> cases = {
      {"{\"context\": \"a\", \"choices\": [\" b\" \" c\"], \"gold\": 0}", "not valid JSON"},
      {"{\"choices\": [\" b\", \" c\"], \"gold\": 0}", "missing field \"context\""},
      {"{\"context\": \"a\", \"gold\": 0}", "missing field \"choices\""},
      {"{\"context\": \"a\", \"choices\": [\" b\", \" c\"]}", "missing field \"gold\""},
      {"{\"context\": \"a\", \"choices\": [\" b\", \" c\"], \"gold\": 2}", "out of range"},
      {"{\"context\": \"a\", \"choices\": [\" b\", \" c\"], \"gold\": -1}", "out of range"},
      {"{\"context\": \"a\", \"choices\": [], \"gold\": 0}", "at least 2"},
      {"{\"context\": \"a\", \"choices\": [\"\", \" c\"], \"gold\": 0}", "choice 0 is empty"},
      {"{\"context\": 5, \"choices\": [\" b\", \" c\"], \"gold\": 0}", "\"context\" must be a string"},
      {"{\"context\": \"a\", \"choices\": [\" b\", \" c\"], \"gold\": \"0\"}", "\"gold\" must be an integer"},
      {"[1, 2]", "expected a JSON object"},
  };
  for (const auto& c : cases) {
    const std::string msg = error_of([&] { parse_task(ok + ok + c.line + "\n", "bad.jsonl", "bad"); });
    EXPECT_NE(msg.find("task file 'bad.jsonl' line 3"), std::string::npos) << c.line << " -> " << msg;
    EXPECT_NE(msg.find(c.expect), std::string::npos) << c.line << " -> " << msg;
  }
  EXPECT_NE(error_of([] { parse_task("\n\n", "empty.jsonl", "empty"); }).find("holds no items"), std::string::npos);
  const std::string dup = "{\"id\": \"q\", \"context\": \"a\", \"choices\": [\" b\", \" c\"], \"gold\": 0}\n";
  EXPECT_NE(error_of([&] { parse_task(dup + dup, "dup.jsonl", "dup"); }).find("line 2: duplicate id 'q'"),
            std::string::npos);
}

TEST(TaskFile, UnknownNameListsAvailableTasksAndHowToBuild) {
  const auto dir = testing::temp_dir("tasks_names");
  const std::string none = error_of([&] { load_task("wordnet-cloze", dir.string()); });
  EXPECT_NE(none.find("scripts/fetch-corpus.sh"), std::string::npos) << none;
  write_file_atomic((dir / "alpha.jsonl").string(), "{\"context\": \"a\", \"choices\": [\" b\", \" c\"], \"gold\": 0}\n");
  write_file_atomic((dir / "beta.jsonl").string(), "{\"context\": \"a\", \"choices\": [\" b\", \" c\"], \"gold\": 1}\n");
  const std::string some = error_of([&] { load_task("gamma", dir.string()); });
  EXPECT_NE(some.find("available: alpha beta"), std::string::npos) << some;
  EXPECT_EQ(load_task("beta", dir.string()).items[0].gold, 1);
  EXPECT_EQ(load_task((dir / "alpha.jsonl").string(), "nowhere").name, "alpha");
}

// ---- few-shot sampling -------------------------------------------------------------------------------------------

Task numbered_task(int n) {
  std::string text;
  for (int i = 0; i < n; ++i)
    text += "{\"id\": \"i" + std::to_string(i) + "\", \"context\": \"c" + std::to_string(i) +
            "\", \"choices\": [\" x\", \" y\"], \"gold\": 0, \"split\": \"" + (i % 2 ? "train" : "test") + "\"}\n";
  return parse_task(text, "mem", "mem");
}

TEST(FewShot, SeededDeterministicAndNeverTheItemItself) {
  const Task task = numbered_task(40);
  std::vector<const TaskItem*> all;
  for (const auto& it : task.items) all.push_back(&it);
  for (const auto& item : task.items) {
    const auto a = sample_shots(all, item, 5, 7), b = sample_shots(all, item, 5, 7);
    ASSERT_EQ(a.size(), 5u);
    EXPECT_EQ(a, b);  // same seed, same shots
    std::set<const TaskItem*> distinct(a.begin(), a.end());
    EXPECT_EQ(distinct.size(), 5u);
    for (const TaskItem* s : a) EXPECT_NE(s->id, item.id);
  }
  // Another seed changes the draw (for at least one of the items), and asking for more than exist gives all others.
  int changed = 0;
  for (const auto& item : task.items) changed += sample_shots(all, item, 5, 7) != sample_shots(all, item, 5, 8);
  EXPECT_GT(changed, 0);
  EXPECT_EQ(sample_shots(all, task.items[0], 100, 1).size(), 39u);
  const std::string primed = primed_context(sample_shots(all, task.items[0], 2, 3), task.items[0]);
  EXPECT_EQ(primed.substr(primed.size() - 2), "c0");
  EXPECT_EQ(std::count(primed.begin(), primed.end(), '\n'), 4);
}

// ---- scoring -------------------------------------------------------------------------------------------------------

double hand_loglik(Transformer& model, const std::vector<int32_t>& context, const std::vector<int32_t>& cont) {
  // Full-length forward on the model's own seq_len, then log-softmax summed by hand.
  const int64_t T = model.config().seq_len, V = model.config().vocab_size;
  std::vector<int32_t> full = context;
  full.insert(full.end(), cont.begin(), cont.end());
  if (static_cast<int64_t>(full.size()) > T + 1) full.erase(full.begin(), full.end() - (T + 1));
  std::vector<int32_t> tokens(T, 0);
  std::copy(full.begin(), full.end() - 1, tokens.begin());
  model.forward(tokens.data(), nullptr, 1);
  const std::vector<float> logits = model.download_logits();
  double ll = 0;
  for (size_t t = full.size() - cont.size(); t < full.size(); ++t) {
    const float* z = logits.data() + (t - 1) * V;
    double sum = 0;
    for (int64_t v = 0; v < V; ++v) sum += std::exp(static_cast<double>(z[v]));
    ll += z[full[t]] - std::log(sum);
  }
  return ll;
}

class Scorer : public ::testing::TestWithParam<std::vector<std::string>> {};

TEST_P(Scorer, MatchesHandComputedLogLikelihood) {
  std::vector<std::string> o = {"model.vocab_size=37", "model.d_model=16", "model.n_layers=2", "model.n_heads=2",
                                "model.seq_len=40", "model.init_std=0.3"};
  o.insert(o.end(), GetParam().begin(), GetParam().end());
  const Config c = config_from_string("", o);
  auto be = testing::make_test_backend(1);
  Transformer model(c.model, *be, 1);
  model.init_weights(5);
  Rng rng(3);
  auto random_ids = [&](int n) {
    std::vector<int32_t> ids(n);
    for (auto& t : ids) t = static_cast<int32_t>(rng.below(37));
    return ids;
  };
  // Short (a 16-token bucket), medium (32), full (40) and over-long (cut from the left) sequences in one call.
  std::vector<ScoringRequest> requests = {{random_ids(3), random_ids(2)}, {random_ids(1), random_ids(1)},
                                          {random_ids(20), random_ids(5)}, {random_ids(30), random_ids(9)},
                                          {random_ids(50), random_ids(4)}, {random_ids(9), random_ids(7)}};
  ContinuationScorer scorer(c.model, *be, model.params(), 4);
  const std::vector<double> got = scorer.score(requests);
  ASSERT_EQ(got.size(), requests.size());
  for (size_t i = 0; i < requests.size(); ++i) {
    const double want = hand_loglik(model, requests[i].context, requests[i].continuation);
    EXPECT_NEAR(got[i], want, 2e-4 * std::max(1.0, std::fabs(want))) << "request " << i;
    EXPECT_LT(got[i], 0.0);
  }
}

INSTANTIATE_TEST_SUITE_P(Models, Scorer,
                         ::testing::Values(std::vector<std::string>{},
                                           std::vector<std::string>{"model.pos=learned", "model.norm=layernorm"},
                                           std::vector<std::string>{"moe.experts=4", "moe.top_k=2"}));

TEST(Scorer, EvaluateTaskPicksTheLikeliestChoice) {
  // A byte-level model; the gold choice of each item is the one the model itself scores highest, so acc = 1,
  // and with the gold moved to the lowest-scoring choice acc = 0.
  const Config c = config_from_string("", {"model.vocab_size=256", "model.d_model=16", "model.n_layers=1",
                                           "model.n_heads=2", "model.seq_len=32", "model.init_std=0.3"});
  auto be = testing::make_test_backend(1);
  Transformer model(c.model, *be, 1);
  model.init_weights(9);
  const TextCodec codec(c);
  std::string text;
  for (int i = 0; i < 6; ++i)
    text += "{\"context\": \"item " + std::to_string(i) + "\", \"choices\": [\" ab\", \" xyz\", \" q\"], \"gold\": 0}\n";
  Task task = parse_task(text, "mem", "mem");
  ContinuationScorer scorer(c.model, *be, model.params());
  for (auto& item : task.items) {
    std::vector<int32_t> ctx = codec.encode(item.context);
    double best = -1e30, worst = 1e30;
    for (size_t k = 0; k < item.choices.size(); ++k) {
      const double ll = scorer.score({{ctx, codec.encode(item.choices[k])}})[0];
      if (ll > best) best = ll, item.gold = static_cast<int64_t>(k);
      worst = std::min(worst, ll);
    }
  }
  const DownstreamRecord r = evaluate_task(c.model, *be, model.params(), codec, task, {});
  EXPECT_EQ(r.n, 6);
  EXPECT_DOUBLE_EQ(r.acc, 1.0);
  EXPECT_DOUBLE_EQ(r.acc_stderr, 0.0);
  EXPECT_NEAR(r.chance, 1.0 / 3.0, 1e-12);
  EXPECT_EQ(r.correct, "111111");  // per item, in order: paired comparisons over items use it
  TaskEvalOptions limited;
  limited.limit = 4;
  EXPECT_EQ(evaluate_task(c.model, *be, model.params(), codec, task, limited).n, 4);
}

// ---- the answer-only loss ------------------------------------------------------------------------------------------

TEST(AnswerOnlyLoss, MeanOverCountedTokensWithExactGradients) {
  const Config c = config_from_string("", {"model.vocab_size=256", "model.d_model=16", "model.n_layers=1",
                                           "model.n_heads=2", "model.seq_len=16", "model.init_std=0.3"});
  auto be = testing::make_test_backend(1);
  Transformer model(c.model, *be, 2);
  model.init_weights(4);
  const TextCodec codec(c);
  const Task task = parse_task(
      "{\"context\": \"ab\", \"choices\": [\" cd\", \" e\"], \"gold\": 0}\n"
      "{\"context\": \"fgh\", \"choices\": [\" i\", \" jk\"], \"gold\": 1}\n",
      "mem", "mem");
  std::vector<int32_t> tokens, targets;
  answer_only_batch({&task.items[0], &task.items[1]}, codec, 16, tokens, targets);
  int64_t counted = 0;
  for (int32_t t : targets) counted += t >= 0;
  EXPECT_EQ(counted, 3 + 3);  // " cd" and " jk": three bytes each
  EXPECT_EQ(targets[1], ' ');  // row 0: "ab" then position 1 predicts ' '
  // The loss is the mean over answer tokens: minus the summed log-likelihood of both answers / 6.
  ContinuationScorer scorer(c.model, *be, model.params());
  const auto ll = scorer.score({{codec.encode("ab"), codec.encode(" cd")}, {codec.encode("fgh"), codec.encode(" jk")}});
  const double loss = model.forward(tokens.data(), targets.data(), 2);
  EXPECT_NEAR(loss, -(ll[0] + ll[1]) / 6.0, 1e-4);
  // Gradients of that mean against central differences on a few weights.
  model.zero_grad();
  model.forward(tokens.data(), targets.data(), 2, 1.f);
  model.backward();
  std::vector<int64_t> idx;
  for (int64_t i = 0; i < model.num_params() && idx.size() < 12; i += 97) idx.push_back(i);
  int checked = 0;
  const std::vector<float> grads = be->download_vector(std::as_const(model).grads(), model.num_params());
  for (int64_t i : idx) {
    const float g = grads[i];
    const float saved = testing::read_value(*be, model.params() + i);
    const float eps = 1e-2f;
    testing::write_value(*be, model.params() + i, saved + eps);
    const double up = model.forward(tokens.data(), targets.data(), 2);
    testing::write_value(*be, model.params() + i, saved - eps);
    const double down = model.forward(tokens.data(), targets.data(), 2);
    testing::write_value(*be, model.params() + i, saved);
    const double fd = (up - down) / (2 * eps);
    EXPECT_NEAR(g, fd, 2e-3 + 3e-2 * std::fabs(fd)) << "parameter " << i;
    checked += std::fabs(fd) > 1e-5;
  }
  EXPECT_GT(checked, 3);
}

// ---- fine-tuning ---------------------------------------------------------------------------------------------------

// Train items whose gold choice alone is longer than the model's context are left out and said so (a 512-piece
// vocabulary makes some WordNet glosses longer than 64 tokens); when every one is, the error says what to do.
TEST(Finetune, LeavesOutTrainItemsLongerThanTheContext) {
  const std::string long_answer = " " + std::string(100, 'z');
  std::string text;
  for (int i = 0; i < 12; ++i) {
    const bool too_long = i < 2;
    text += "{\"id\": " + std::to_string(i) + ", \"context\": \"key " + std::to_string(i % 2) +
            " is\", \"choices\": [\"" + (too_long ? long_answer : std::string(" one")) + "\", \" two\"], \"gold\": 0" +
            ", \"split\": \"" + (i < 8 ? "train" : "test") + "\"}\n";
  }
  const auto dir = testing::temp_dir("finetune_long");
  write_file_atomic((dir / "t.jsonl").string(), text);
  const Config c = config_from_string("", {"model.vocab_size=256", "model.d_model=16", "model.n_layers=1",
                                           "model.n_heads=2", "model.seq_len=64", "train.threads=1",
                                           "train.backend=" + testing::test_backend_name()});
  auto be = testing::make_test_backend(1);
  {
    Trainer pre(c, *be);
    pre.save((dir / "run" / "checkpoint").string());
  }
  FinetuneOptions o;
  o.steps = 3, o.lr = 1e-3, o.batch = 2, o.threads = 1;
  o.out = (dir / "ft").string();
  std::ostringstream log;
  const FinetuneResult r = finetune_on_task((dir / "run").string(), load_task_file((dir / "t.jsonl").string()), o, log);
  EXPECT_EQ(r.losses.size(), 3u);
  EXPECT_NE(log.str().find("left out 2 of 8 train items whose gold choice is longer than the model's context (64 tokens)"),
            std::string::npos)
      << log.str();
  // Every train item too long: a clear error.
  std::string all_long;
  for (int i = 0; i < 4; ++i)
    all_long += "{\"id\": " + std::to_string(i) + ", \"context\": \"k\", \"choices\": [\"" + long_answer +
                "\", \" b\"], \"gold\": 0, \"split\": \"" + (i < 2 ? "train" : "test") + "\"}\n";
  write_file_atomic((dir / "long.jsonl").string(), all_long);
  o.out = (dir / "ft2").string();
  try {
    finetune_on_task((dir / "run").string(), load_task_file((dir / "long.jsonl").string()), o, log);
    ADD_FAILURE() << "expected an error";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("every train item's gold choice is longer than the model's context of 64"),
              std::string::npos)
        << e.what();
  }
  std::filesystem::remove_all(dir);
}

TEST(Finetune, LearnsATrivialTaskFarAboveChance) {
  // key -> answer, with a random three-letter prefix per item: learnable only by reading the key.
  const char* keys[4] = {"red", "blue", "green", "black"};
  const char* answers[4] = {" one", " two", " three", " four"};
  Rng rng(21);
  std::string text;
  for (int i = 0; i < 160; ++i) {
    const int k = static_cast<int>(rng.below(4));
    std::string prefix;
    for (int j = 0; j < 3; ++j) prefix.push_back(static_cast<char>('a' + rng.below(26)));
    text += "{\"id\": " + std::to_string(i) + ", \"context\": \"" + prefix + " " + keys[k] +
            " is\", \"choices\": [\" one\", \" two\", \" three\", \" four\"], \"gold\": " + std::to_string(k) +
            ", \"split\": \"" + (i < 120 ? "train" : "test") + "\"}\n";
    (void)answers;
  }
  const auto dir = testing::temp_dir("finetune");
  write_file_atomic((dir / "keys.jsonl").string(), text);
  const Task task = load_task_file((dir / "keys.jsonl").string());

  // A small byte-level "pre-trained" checkpoint: freshly initialised weights are enough to start from.
  const Config c = config_from_string("", {"model.vocab_size=256", "model.d_model=32", "model.n_layers=2",
                                           "model.n_heads=2", "model.seq_len=64", "train.batch_size=8",
                                           "train.threads=1", "moe.experts=4", "moe.top_k=2",
                                           "train.backend=" + testing::test_backend_name()});
  auto be = testing::make_test_backend(1);
  {
    Trainer pre(c, *be);
    pre.save((dir / "run" / "checkpoint").string());
  }
  FinetuneOptions o;
  o.steps = 80;
  o.lr = 1e-2;
  o.batch = 8;
  o.threads = 1;
  o.out = (dir / "ft").string();
  std::ostringstream log;
  const FinetuneResult r = finetune_on_task((dir / "run").string(), task, o, log);
  EXPECT_EQ(r.record.mode, "finetune");
  EXPECT_EQ(r.record.run, "run");
  EXPECT_EQ(r.record.n, 40);
  EXPECT_NEAR(r.record.chance, 0.25, 1e-12);
  EXPECT_GE(r.record.acc, 0.8) << log.str();
  // Per-item results before and after, on the same 40 items, agreeing with the accuracies.
  const std::string before = r.record.finetune["before"]["correct"], after = r.record.correct;
  ASSERT_EQ(before.size(), 40u);
  ASSERT_EQ(after.size(), 40u);
  EXPECT_DOUBLE_EQ(std::count(after.begin(), after.end(), '1') / 40.0, r.record.acc);
  EXPECT_DOUBLE_EQ(std::count(before.begin(), before.end(), '1') / 40.0,
                   r.record.finetune["before"]["acc"].get<double>());
  EXPECT_EQ(downstream_from_json(downstream_to_json(r.record)).correct, after);  // stored and read back
  EXPECT_LT(r.losses.back(), r.losses.front());
  EXPECT_TRUE(std::filesystem::exists(dir / "ft" / "checkpoint" / "model.safetensors"));
  EXPECT_TRUE(std::filesystem::exists(dir / "ft" / "finetune.json"));
  // The saved checkpoint reproduces the reported accuracy.
  const auto again = evaluate_checkpoint_on_tasks((dir / "ft").string(), {(dir / "keys.jsonl").string()}, {0}, {}, 1,
                                                  dir.string());
  ASSERT_EQ(again.size(), 1u);
  EXPECT_DOUBLE_EQ(again[0].acc, r.record.acc);
  std::filesystem::remove_all(dir);
}

// ---- results store -------------------------------------------------------------------------------------------------

TEST(DownstreamStore, RunFileMergesAndDatabaseRoundTrips) {
  const auto dir = testing::temp_dir("downstream_store");
  DownstreamRecord a;
  a.run = "r1";
  a.task = "t";
  a.shots = 0;
  a.mode = "zero";
  a.n = 100;
  a.acc = 0.4;
  a.acc_stderr = std::sqrt(0.4 * 0.6 / 100);
  a.acc_norm = 0.5;
  a.val_loss = std::nan("");
  DownstreamRecord b = a;
  b.shots = 5;
  b.mode = "few";
  b.acc = 0.45;
  b.finetune = {{"steps", 3}};
  write_run_downstream(dir.string(), {a, b});
  a.acc = 0.41;  // re-evaluated: replaces the old record
  write_run_downstream(dir.string(), {a});
  const auto in_run = read_run_downstream(dir.string());
  ASSERT_EQ(in_run.size(), 2u);
  EXPECT_DOUBLE_EQ(in_run[0].acc, 0.41);
  const std::string db = (dir / "results.db").string();
  upsert_downstream(db, in_run);
  upsert_downstream(db, {a});
  const auto rows = read_downstream(db);
  ASSERT_EQ(rows.size(), 2u);
  EXPECT_EQ(rows[0].mode, "few");  // ordered by run, task, mode, shots
  EXPECT_DOUBLE_EQ(rows[0].acc, 0.45);
  EXPECT_EQ(rows[0].finetune["steps"], 3);
  EXPECT_TRUE(std::isnan(rows[1].val_loss));
  EXPECT_DOUBLE_EQ(rows[1].acc_stderr, std::sqrt(0.4 * 0.6 / 100));
  std::filesystem::remove_all(dir);
}

}  // namespace
}  // namespace moelab
