#include "eval/tasks.h"

#include <chrono>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <limits>
#include <map>
#include <nlohmann/json.hpp>
#include <set>
#include <sstream>

#include "core/error.h"
#include "core/io.h"
#include "core/rng.h"
#include "core/timer.h"
#include "model/param_layout.h"
#include "model/transformer.h"
#include "train/checkpoint.h"

namespace moelab {
namespace fs = std::filesystem;

// ---------------------------------------------------------------------------------------------------------------
// Task files

std::vector<const TaskItem*> Task::split(const std::string& which) const {
  std::vector<const TaskItem*> out;
  for (const auto& item : items)
    if (item.split == which || (which == "test" && item.split.empty())) out.push_back(&item);
  return out;
}

Task parse_task(const std::string& text, const std::string& source, const std::string& name) {
  Task task;
  task.name = name;
  task.path = source;
  std::istringstream in(text);
  std::string line;
  int64_t line_no = 0;
  std::set<std::string> ids;
  auto fail = [&](const std::string& what) -> Error {
    return Error("task file '" + source + "' line " + std::to_string(line_no) + ": " + what +
                 " (docs/tasks.md describes the format)");
  };
  while (std::getline(in, line)) {
    ++line_no;
    if (line.find_first_not_of(" \t\r") == std::string::npos) continue;
    nlohmann::json j;
    try {
      j = nlohmann::json::parse(line);
    } catch (const nlohmann::json::parse_error& e) {
      throw fail(std::string("not valid JSON: ") + e.what());
    }
    if (!j.is_object()) throw fail("expected a JSON object {\"context\", \"choices\", \"gold\"}");
    TaskItem item;
    item.line = line_no;
    if (!j.contains("context")) throw fail("missing field \"context\"");
    if (!j["context"].is_string()) throw fail("\"context\" must be a string");
    item.context = j["context"].get<std::string>();
    if (!j.contains("choices")) throw fail("missing field \"choices\"");
    if (!j["choices"].is_array()) throw fail("\"choices\" must be an array of strings");
    if (j["choices"].size() < 2)
      throw fail("\"choices\" has " + std::to_string(j["choices"].size()) + " entries; an item needs at least 2");
    for (const auto& c : j["choices"]) {
      if (!c.is_string()) throw fail("\"choices\" must be an array of strings");
      if (c.get<std::string>().empty()) throw fail("choice " + std::to_string(item.choices.size()) + " is empty");
      item.choices.push_back(c.get<std::string>());
    }
    if (!j.contains("gold")) throw fail("missing field \"gold\" (the index of the correct choice)");
    if (!j["gold"].is_number_integer()) throw fail("\"gold\" must be an integer index into \"choices\"");
    item.gold = j["gold"].get<int64_t>();
    if (item.gold < 0 || item.gold >= static_cast<int64_t>(item.choices.size()))
      throw fail("\"gold\" = " + std::to_string(item.gold) + " is out of range for " +
                 std::to_string(item.choices.size()) + " choices (0-based)");
    if (j.contains("split")) {
      if (!j["split"].is_string()) throw fail("\"split\" must be a string such as \"train\" or \"test\"");
      item.split = j["split"].get<std::string>();
    }
    if (j.contains("id")) {
      if (j["id"].is_string()) item.id = j["id"].get<std::string>();
      else if (j["id"].is_number_integer()) item.id = std::to_string(j["id"].get<int64_t>());
      else throw fail("\"id\" must be a string or an integer");
    } else {
      item.id = "line " + std::to_string(line_no);
    }
    if (!ids.insert(item.id).second) throw fail("duplicate id '" + item.id + "'");
    task.items.push_back(std::move(item));
  }
  if (task.items.empty()) throw Error("task file '" + source + "' holds no items (docs/tasks.md describes the format)");
  return task;
}

Task load_task_file(const std::string& path) {
  return parse_task(read_file(path, "task file"), path, fs::path(path).stem().string());
}

std::string default_tasks_dir() {
  const char* env = std::getenv("MOELAB_TASKS_DIR");
  return env && *env ? std::string(env) : std::string("data/tasks");
}

std::vector<std::string> task_names(const std::string& tasks_dir) {
  std::vector<std::string> names;
  if (!fs::is_directory(tasks_dir)) return names;
  for (const auto& e : fs::directory_iterator(tasks_dir))
    if (e.is_regular_file() && e.path().extension() == ".jsonl" && e.path().filename().string()[0] != '.')
      names.push_back(e.path().stem().string());
  std::sort(names.begin(), names.end());
  return names;
}

Task load_task(const std::string& name_or_file, const std::string& tasks_dir) {
  if (fs::is_regular_file(name_or_file)) return load_task_file(name_or_file);
  const fs::path builtin = fs::path(tasks_dir) / (name_or_file + ".jsonl");
  if (fs::is_regular_file(builtin)) return load_task_file(builtin.string());
  const auto names = task_names(tasks_dir);
  std::string msg = "unknown task '" + name_or_file + "': it is neither a file nor a task in '" + tasks_dir + "'; ";
  if (names.empty()) {
    msg += "that directory holds no tasks. Build the built-in tasks with scripts/fetch-corpus.sh (or "
           "python3 scripts/corpus_tools.py tasks --corpus data/corpus --out " + tasks_dir +
           "), point --tasks-dir or MOELAB_TASKS_DIR at them, or give a JSONL task file";
  } else {
    msg += "available:";
    for (const auto& n : names) msg += " " + n;
  }
  throw Error(msg);
}

// ---------------------------------------------------------------------------------------------------------------
// Few-shot priming

namespace {
uint64_t fnv1a(const std::string& s) {
  uint64_t h = 1469598103934665603ULL;
  for (unsigned char c : s) h = (h ^ c) * 1099511628211ULL;
  return h;
}
}  // namespace

std::vector<const TaskItem*> sample_shots(const std::vector<const TaskItem*>& pool, const TaskItem& item, int64_t k,
                                          uint64_t seed) {
  std::vector<const TaskItem*> candidates;
  for (const TaskItem* p : pool)
    if (p->id != item.id && p->context != item.context) candidates.push_back(p);
  Rng rng(seed * 0x9e3779b97f4a7c15ULL ^ fnv1a(item.id));
  const int64_t n = static_cast<int64_t>(candidates.size());
  k = std::min(k, n);
  for (int64_t i = 0; i < k; ++i) {  // partial Fisher-Yates
    const int64_t j = i + static_cast<int64_t>(rng.below(static_cast<uint64_t>(n - i)));
    std::swap(candidates[i], candidates[j]);
  }
  candidates.resize(k);
  return candidates;
}

std::string primed_context(const std::vector<const TaskItem*>& shots, const TaskItem& item) {
  std::string out;
  for (const TaskItem* s : shots) out += s->context + s->choices[s->gold] + "\n\n";
  return out + item.context;
}

// ---------------------------------------------------------------------------------------------------------------
// Scoring

struct ContinuationScorer::Bucket {
  int64_t seq_len = 0;
  std::unique_ptr<Transformer> model;
};

ContinuationScorer::ContinuationScorer(const ModelConfig& config, Backend& backend, const float* params, int64_t batch)
    : config_(config), backend_(backend), params_(params), batch_(std::max<int64_t>(1, batch)) {}

ContinuationScorer::~ContinuationScorer() = default;

ContinuationScorer::Bucket& ContinuationScorer::bucket(int64_t seq_len) {
  for (auto& b : buckets_)
    if (b->seq_len == seq_len) return *b;
  auto b = std::make_unique<Bucket>();
  b->seq_len = seq_len;
  ModelConfig m = config_;
  m.seq_len = seq_len;
  b->model = std::make_unique<Transformer>(m, backend_, batch_);
  MOELAB_CHECK(b->model->num_params() == ParamLayout(config_).total(), "parameter layout depends on seq_len");
  backend_.copy(b->model->params(), params_, b->model->num_params());
  buckets_.push_back(std::move(b));
  return *buckets_.back();
}

std::vector<double> ContinuationScorer::score(const std::vector<ScoringRequest>& requests) {
  const int64_t T_max = config_.seq_len, V = config_.vocab_size;
  // Each request becomes input tokens (context + continuation minus the last token, cut from the left to T_max)
  // and the positions whose next-token prediction is a continuation token.
  struct Prepared {
    std::vector<int32_t> full;  // the kept tokens: input = full[0..n-2], predictions of full[1..n-1]
    int64_t first_target = 0;   // index in full of the first continuation token
  };
  std::vector<Prepared> prepared(requests.size());
  for (size_t i = 0; i < requests.size(); ++i) {
    const auto& r = requests[i];
    MOELAB_CHECK(!r.context.empty() && !r.continuation.empty(), "scoring needs a context and a continuation token");
    if (static_cast<int64_t>(r.continuation.size()) > T_max)
      throw Error("a choice is " + std::to_string(r.continuation.size()) + " tokens, longer than the model's context (" +
                  std::to_string(T_max) + "); shorten the task's choices");
    Prepared& p = prepared[i];
    p.full = r.context;
    p.full.insert(p.full.end(), r.continuation.begin(), r.continuation.end());
    const int64_t keep = std::min<int64_t>(static_cast<int64_t>(p.full.size()), T_max + 1);
    p.full.erase(p.full.begin(), p.full.end() - keep);
    p.first_target = keep - static_cast<int64_t>(r.continuation.size());
  }
  // Length buckets: powers of two from 16, capped at seq_len; learned positions are laid out for seq_len.
  auto bucket_len = [&](int64_t inputs) {
    if (config_.pos == PosKind::Learned) return T_max;
    int64_t T = 16;
    while (T < inputs) T *= 2;
    return std::min(T, T_max);
  };
  std::map<int64_t, std::vector<size_t>> by_bucket;
  for (size_t i = 0; i < prepared.size(); ++i)
    by_bucket[bucket_len(static_cast<int64_t>(prepared[i].full.size()) - 1)].push_back(i);

  std::vector<double> out(requests.size(), 0.0);
  std::vector<int32_t> tokens;
  for (const auto& [T, indices] : by_bucket) {
    Bucket& b = bucket(T);
    for (size_t start = 0; start < indices.size(); start += static_cast<size_t>(batch_)) {
      const size_t count = std::min(indices.size() - start, static_cast<size_t>(batch_));
      tokens.assign(count * static_cast<size_t>(T), 0);
      for (size_t s = 0; s < count; ++s) {
        const auto& full = prepared[indices[start + s]].full;
        std::copy(full.begin(), full.end() - 1, tokens.begin() + static_cast<std::ptrdiff_t>(s * T));
      }
      b.model->forward(tokens.data(), nullptr, static_cast<int64_t>(count));
      const std::vector<float> logits = b.model->download_logits();  // (count, T, V) on the host
      for (size_t s = 0; s < count; ++s) {
        const Prepared& p = prepared[indices[start + s]];
        double ll = 0.0;
        for (int64_t t = p.first_target; t < static_cast<int64_t>(p.full.size()); ++t) {
          const float* z = logits.data() + (static_cast<int64_t>(s) * T + (t - 1)) * V;  // predicts full[t]
          float mx = -std::numeric_limits<float>::infinity();
          for (int64_t v = 0; v < V; ++v) mx = std::max(mx, z[v]);
          double sum = 0.0;
          for (int64_t v = 0; v < V; ++v) sum += std::exp(static_cast<double>(z[v]) - mx);
          ll += static_cast<double>(z[p.full[t]]) - mx - std::log(sum);
        }
        out[indices[start + s]] = ll;
      }
    }
  }
  return out;
}

// ---------------------------------------------------------------------------------------------------------------
// Evaluation

namespace {

int64_t code_points(const std::string& s) {
  int64_t n = 0;
  for (unsigned char c : s) n += (c & 0xC0) != 0x80;
  return n;
}

double binomial_stderr(double p, int64_t n) { return n > 0 ? std::sqrt(p * (1.0 - p) / static_cast<double>(n)) : 0.0; }

}  // namespace

DownstreamRecord evaluate_task(const ModelConfig& config, Backend& backend, const float* params,
                               const TextCodec& codec, const Task& task, const TaskEvalOptions& options) {
  Timer timer;
  std::vector<const TaskItem*> items = task.split(options.split);
  if (items.empty())
    throw Error("task '" + task.name + "' (" + task.path + ") has no items in split '" + options.split + "'");
  if (options.limit > 0 && static_cast<int64_t>(items.size()) > options.limit) items.resize(options.limit);
  // Few-shot examples come from the train split; a task without one primes from the other scored items.
  std::vector<const TaskItem*> pool = task.split("train");
  if (options.split == "train" || pool.empty()) pool = task.split(options.split);

  const int32_t eos = codec.end_of_document();
  ContinuationScorer scorer(config, backend, params, options.batch);
  std::vector<ScoringRequest> requests;
  std::vector<size_t> first_request(items.size());
  double shots_used = 0;
  for (size_t i = 0; i < items.size(); ++i) {
    const TaskItem& item = *items[i];
    std::vector<std::vector<int32_t>> choices;
    int64_t longest = 0;
    for (const auto& c : item.choices) {
      choices.push_back(codec.encode(c));
      if (choices.back().empty())
        throw Error("task '" + task.name + "' line " + std::to_string(item.line) + ": a choice encodes to no tokens");
      longest = std::max<int64_t>(longest, static_cast<int64_t>(choices.back().size()));
    }
    // Prime with as many of the sampled shots as fit beside the longest choice (dropping the earliest first).
    std::vector<const TaskItem*> shots =
        options.shots > 0 ? sample_shots(pool, item, options.shots, options.seed) : std::vector<const TaskItem*>{};
    std::vector<int32_t> context;
    for (size_t dropped = 0; dropped <= shots.size(); ++dropped) {
      const std::vector<const TaskItem*> used(shots.begin() + static_cast<std::ptrdiff_t>(dropped), shots.end());
      context.clear();
      if (eos >= 0) context.push_back(eos);
      const auto ids = codec.encode(primed_context(used, item));
      context.insert(context.end(), ids.begin(), ids.end());
      if (static_cast<int64_t>(context.size()) + longest <= scorer.max_tokens() || used.empty()) {
        shots_used += static_cast<double>(used.size());
        break;
      }
    }
    if (context.empty())
      throw Error("task '" + task.name + "' line " + std::to_string(item.line) + ": the context encodes to no tokens");
    first_request[i] = requests.size();
    for (auto& c : choices) requests.push_back({context, std::move(c)});
  }
  const std::vector<double> ll = scorer.score(requests);

  int64_t correct = 0, correct_norm = 0;
  double chance = 0;
  std::string per_item;  // '1' / '0' per item (DownstreamRecord::correct)
  per_item.reserve(items.size());
  for (size_t i = 0; i < items.size(); ++i) {
    const TaskItem& item = *items[i];
    // The first of equal scores wins, so ties never favour the gold choice.
    size_t best = 0, best_norm = 0;
    double best_score = -std::numeric_limits<double>::infinity(), best_norm_score = best_score;
    for (size_t c = 0; c < item.choices.size(); ++c) {
      const double score = ll[first_request[i] + c];
      const double norm_score = score / static_cast<double>(std::max<int64_t>(1, code_points(item.choices[c])));
      if (score > best_score) best_score = score, best = c;
      if (norm_score > best_norm_score) best_norm_score = norm_score, best_norm = c;
    }
    correct += static_cast<int64_t>(best) == item.gold;
    per_item.push_back(static_cast<int64_t>(best) == item.gold ? '1' : '0');
    correct_norm += static_cast<int64_t>(best_norm) == item.gold;
    chance += 1.0 / static_cast<double>(item.choices.size());
  }
  DownstreamRecord r;
  r.task = task.name;
  r.task_file = task.path;
  r.shots = options.shots;
  r.mode = options.shots > 0 ? "few" : "zero";
  r.n = static_cast<int64_t>(items.size());
  r.correct = std::move(per_item);
  const double n = static_cast<double>(r.n);
  r.acc = correct / n;
  r.acc_norm = correct_norm / n;
  r.acc_stderr = binomial_stderr(r.acc, r.n);
  r.acc_norm_stderr = binomial_stderr(r.acc_norm, r.n);
  r.chance = chance / n;
  r.mean_shots = shots_used / n;
  r.split = options.split;
  r.seed = options.seed;
  r.limit = options.limit;
  r.seconds = timer.seconds();
  return r;
}

// ---------------------------------------------------------------------------------------------------------------
// Runs and results stores

RunLocation locate_run(const std::string& checkpoint) {
  if (!fs::exists(checkpoint))
    throw Error("checkpoint '" + checkpoint + "' does not exist (give a run directory or its checkpoint/ directory)");
  RunLocation loc;
  if (fs::exists(fs::path(checkpoint) / "state.json")) {
    loc.checkpoint_dir = fs::absolute(checkpoint).lexically_normal().string();
    const fs::path parent = fs::path(loc.checkpoint_dir).parent_path();
    // <run>/checkpoint: the run is the parent; a bare checkpoint directory is its own run.
    loc.run_dir = fs::path(loc.checkpoint_dir).filename() == "checkpoint" ? parent.string() : loc.checkpoint_dir;
  } else {
    loc.checkpoint_dir = find_checkpoint(checkpoint);
    if (loc.checkpoint_dir.empty())
      throw Error("'" + checkpoint + "' holds no checkpoint (neither state.json nor checkpoint/)");
    loc.checkpoint_dir = fs::absolute(loc.checkpoint_dir).lexically_normal().string();
    loc.run_dir = fs::absolute(checkpoint).lexically_normal().string();
  }
  while (loc.run_dir.size() > 1 && loc.run_dir.back() == '/') loc.run_dir.pop_back();
  loc.run_id = fs::path(loc.run_dir).filename().string();
  const fs::path runs = fs::path(loc.run_dir).parent_path();
  if (runs.filename() == "runs" && fs::exists(runs.parent_path() / "plan.json")) loc.sweep_dir = runs.parent_path().string();
  loc.val_loss = std::numeric_limits<double>::quiet_NaN();
  std::ifstream metrics(fs::path(loc.run_dir) / "metrics.jsonl");
  std::string line;
  while (std::getline(metrics, line)) {
    try {
      const auto j = nlohmann::json::parse(line);
      if (j.contains("val_loss") && j["val_loss"].is_number()) loc.val_loss = j["val_loss"].get<double>();
    } catch (const nlohmann::json::exception&) {
      break;
    }
  }
  return loc;
}

std::vector<DownstreamRecord> evaluate_checkpoint_on_tasks(const std::string& checkpoint,
                                                           const std::vector<std::string>& tasks,
                                                           const std::vector<int64_t>& shots,
                                                           const TaskEvalOptions& options, int threads,
                                                           const std::string& tasks_dir) {
  const RunLocation run = locate_run(checkpoint);
  std::vector<Task> loaded;
  for (const auto& t : tasks) loaded.push_back(load_task(t, tasks_dir));  // fail before loading the model
  LoadedModel lm = load_model(run.checkpoint_dir, threads, options.batch);
  TextCodec codec(lm.config);
  const int64_t active = active_parameter_count(lm.model->layout(), lm.config.model);
  std::vector<DownstreamRecord> out;
  for (const Task& task : loaded) {
    for (int64_t k : shots.empty() ? std::vector<int64_t>{options.shots} : shots) {
      TaskEvalOptions o = options;
      o.shots = k;
      DownstreamRecord r = evaluate_task(lm.config.model, *lm.backend, lm.model->params(), codec, task, o);
      r.run = run.run_id;
      r.checkpoint = run.checkpoint_dir;
      r.val_loss = run.val_loss;
      r.params = lm.model->num_params();
      r.active_params = active;
      out.push_back(std::move(r));
    }
  }
  return out;
}

std::string record_downstream(const RunLocation& run, const std::vector<DownstreamRecord>& records,
                              const std::string& results_db) {
  write_run_downstream(run.run_dir, records);
  std::string db = results_db;
  if (db.empty() && !run.sweep_dir.empty()) db = (fs::path(run.sweep_dir) / "results.db").string();
  if (!db.empty()) upsert_downstream(db, records);
  return db;
}

int64_t evaluate_sweep_on_tasks(const std::string& sweep_dir, const std::vector<std::string>& tasks,
                                const std::vector<int64_t>& shots, const TaskEvalOptions& options, int threads,
                                const std::string& tasks_dir, bool force, std::ostream& log) {
  std::vector<std::string> names;
  for (const auto& t : tasks) names.push_back(load_task(t, tasks_dir).name);  // fail early on a bad task
  const std::vector<int64_t> shot_list = shots.empty() ? std::vector<int64_t>{options.shots} : shots;
  const std::string db = (fs::absolute(sweep_dir) / "results.db").string();
  int64_t evaluated = 0, ok = 0;
  const std::vector<RunResult> results = read_results(sweep_dir);
  const int64_t total = std::count_if(results.begin(), results.end(), [](const RunResult& r) { return r.status == "ok"; });
  const auto started = std::chrono::steady_clock::now();
  for (const RunResult& result : results) {
    if (result.status != "ok") continue;
    ++ok;
    const std::string run_dir = (fs::absolute(sweep_dir) / "runs" / result.name).string();
    if (!force) {
      const auto have = read_run_downstream(run_dir);
      bool complete = true;
      for (const auto& name : names)
        for (int64_t k : shot_list)
          complete = complete && std::any_of(have.begin(), have.end(), [&](const DownstreamRecord& r) {
                       return r.task == name && r.shots == k && r.mode == (k > 0 ? "few" : "zero") &&
                              r.limit == options.limit && r.seed == options.seed;
                     });
      if (complete) {
        log << "[" << ok << "/" << total << "] " << result.name << ": already evaluated (--force re-evaluates)\n";
        continue;
      }
    }
    const auto records = evaluate_checkpoint_on_tasks(run_dir, tasks, shot_list, options, threads, tasks_dir);
    RunLocation run = locate_run(run_dir);
    run.sweep_dir = fs::absolute(sweep_dir).string();
    record_downstream(run, records, db);
    for (const auto& r : records) {
      char line[200];
      std::snprintf(line, sizeof line, "%s: %s %s shots %ld: acc %.4f +- %.4f, acc_norm %.4f +- %.4f (n %ld)\n",
                    r.run.c_str(), r.task.c_str(), r.mode.c_str(), static_cast<long>(r.shots), r.acc, r.acc_stderr,
                    r.acc_norm, r.acc_norm_stderr, static_cast<long>(r.n));
      log << line << std::flush;
    }
    ++evaluated;
    // Progress: runs done of the finished runs, and the time left at the pace of the runs evaluated so far.
    const double elapsed = std::chrono::duration<double>(std::chrono::steady_clock::now() - started).count();
    char progress[160];
    std::snprintf(progress, sizeof progress, "[%ld/%ld] %s evaluated | %.0fs elapsed, ETA %.0fs\n",
                  static_cast<long>(ok), static_cast<long>(total), result.name.c_str(), elapsed,
                  elapsed / static_cast<double>(evaluated) * static_cast<double>(total - ok));
    log << progress << std::flush;
  }
  if (ok == 0) throw Error("sweep '" + sweep_dir + "' has no finished runs to evaluate (see `moelab sweep status`)");
  return evaluated;
}

}  // namespace moelab
