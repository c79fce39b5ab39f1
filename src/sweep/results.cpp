#include "sweep/results.h"

#include <fcntl.h>
#include <sqlite3.h>
#include <sys/file.h>
#include <unistd.h>

#include <algorithm>

#include <cmath>
#include <cstdio>
#include <deque>
#include <filesystem>
#include <fstream>
#include <limits>
#include <map>
#include <set>
#include <sstream>

#include "core/error.h"
#include "core/io.h"

namespace moelab {
namespace {

namespace fs = std::filesystem;
constexpr double kNaN = std::numeric_limits<double>::quiet_NaN();

nlohmann::ordered_json number_or_null(double v) {
  return std::isfinite(v) ? nlohmann::ordered_json(v) : nlohmann::ordered_json(nullptr);
}
double number_of(const nlohmann::json& j, const char* key) {
  if (!j.contains(key) || !j[key].is_number()) return kNaN;
  return j[key].get<double>();
}

class Db {
 public:
  explicit Db(const std::string& path) {
    if (sqlite3_open(path.c_str(), &db_) != SQLITE_OK) {
      const std::string msg = db_ ? sqlite3_errmsg(db_) : "out of memory";
      sqlite3_close(db_);
      throw Error("cannot open results database '" + path + "': " + msg);
    }
    sqlite3_busy_timeout(db_, 10000);
  }
  ~Db() { sqlite3_close(db_); }
  void exec(const std::string& sql) {
    char* err = nullptr;
    if (sqlite3_exec(db_, sql.c_str(), nullptr, nullptr, &err) != SQLITE_OK) {
      const std::string msg = err ? err : "unknown error";
      sqlite3_free(err);
      throw Error("results database: " + msg + " (in: " + sql.substr(0, 60) + ")");
    }
  }
  sqlite3* get() { return db_; }

 private:
  sqlite3* db_ = nullptr;
};

const char* kSchema =
    "CREATE TABLE IF NOT EXISTS results ("
    "name TEXT PRIMARY KEY, status TEXT NOT NULL, run_group TEXT, params INTEGER, active_params INTEGER, "
    "nonembedding_params INTEGER, tokens INTEGER, steps INTEGER, steps_done INTEGER, flops REAL, "
    "flops_per_token REAL, budget REAL, sparsity REAL, granularity INTEGER, experts INTEGER, top_k INTEGER, "
    "d_model INTEGER, n_layers INTEGER, loss REAL, smoothed_loss REAL, val_loss REAL, ood_losses TEXT, "
    "wall_seconds REAL, train_seconds REAL, exit_code INTEGER, error TEXT, result_json TEXT, seed INTEGER, "
    "data_seed INTEGER)";

// Downstream accuracy per (run, task, shots, mode); docs/tasks.md documents every column.
const char* kDownstreamSchema =
    "CREATE TABLE IF NOT EXISTS downstream ("
    "run TEXT NOT NULL, task TEXT NOT NULL, shots INTEGER NOT NULL, mode TEXT NOT NULL, n INTEGER, "
    "acc REAL, acc_stderr REAL, acc_norm REAL, acc_norm_stderr REAL, chance REAL, mean_shots REAL, val_loss REAL, "
    "params INTEGER, active_params INTEGER, split TEXT, seed INTEGER, item_limit INTEGER, checkpoint TEXT, "
    "task_file TEXT, seconds REAL, record_json TEXT, PRIMARY KEY (run, task, shots, mode))";

}  // namespace

nlohmann::ordered_json downstream_to_json(const DownstreamRecord& r) {
  nlohmann::ordered_json j;
  j["run"] = r.run;
  j["task"] = r.task;
  j["shots"] = r.shots;
  j["mode"] = r.mode;
  j["n"] = r.n;
  j["acc"] = number_or_null(r.acc);
  j["acc_stderr"] = number_or_null(r.acc_stderr);
  j["acc_norm"] = number_or_null(r.acc_norm);
  j["acc_norm_stderr"] = number_or_null(r.acc_norm_stderr);
  j["chance"] = number_or_null(r.chance);
  j["mean_shots"] = number_or_null(r.mean_shots);
  j["val_loss"] = number_or_null(r.val_loss);
  j["params"] = r.params;
  j["active_params"] = r.active_params;
  j["split"] = r.split;
  j["seed"] = r.seed;
  j["limit"] = r.limit;
  j["checkpoint"] = r.checkpoint;
  j["task_file"] = r.task_file;
  j["seconds"] = number_or_null(r.seconds);
  if (!r.finetune.is_null()) j["finetune"] = r.finetune;
  if (!r.correct.empty()) j["correct"] = r.correct;
  return j;
}

DownstreamRecord downstream_from_json(const nlohmann::json& j) {
  DownstreamRecord r;
  r.run = j.value("run", "");
  r.task = j.value("task", "");
  r.shots = j.value("shots", int64_t{0});
  r.mode = j.value("mode", "zero");
  r.n = j.value("n", int64_t{0});
  r.acc = number_of(j, "acc");
  r.acc_stderr = number_of(j, "acc_stderr");
  r.acc_norm = number_of(j, "acc_norm");
  r.acc_norm_stderr = number_of(j, "acc_norm_stderr");
  r.chance = number_of(j, "chance");
  r.mean_shots = number_of(j, "mean_shots");
  r.val_loss = number_of(j, "val_loss");
  r.params = j.value("params", int64_t{0});
  r.active_params = j.value("active_params", int64_t{0});
  r.split = j.value("split", "test");
  r.seed = j.value("seed", uint64_t{1});
  r.limit = j.value("limit", int64_t{0});
  r.checkpoint = j.value("checkpoint", "");
  r.task_file = j.value("task_file", "");
  r.seconds = number_of(j, "seconds");
  if (j.contains("finetune")) r.finetune = j["finetune"];
  r.correct = j.value("correct", "");
  return r;
}

namespace {
bool same_key(const DownstreamRecord& a, const DownstreamRecord& b) {
  return a.run == b.run && a.task == b.task && a.shots == b.shots && a.mode == b.mode;
}
}  // namespace

std::vector<DownstreamRecord> read_run_downstream(const std::string& run_dir) {
  const fs::path path = fs::path(run_dir) / "downstream.json";
  if (!fs::exists(path)) return {};
  nlohmann::json j;
  try {
    j = nlohmann::json::parse(read_file(path.string(), "downstream results"));
  } catch (const nlohmann::json::exception& e) {
    throw Error("'" + path.string() + "' is not valid JSON (" + e.what() + "); delete it and evaluate again");
  }
  std::vector<DownstreamRecord> out;
  for (const auto& rec : j.value("results", nlohmann::json::array())) out.push_back(downstream_from_json(rec));
  return out;
}

void write_run_downstream(const std::string& run_dir, const std::vector<DownstreamRecord>& records) {
  // Read-merge-write under an exclusive lock: evaluations of one run may finish at the same time.
  fs::create_directories(run_dir);
  const std::string lock_path = (fs::path(run_dir) / ".downstream.lock").string();
  const int lock_fd = ::open(lock_path.c_str(), O_CREAT | O_RDWR, 0644);
  if (lock_fd < 0) throw Error("cannot create lock file '" + lock_path + "'");
  struct Unlock {
    int fd;
    ~Unlock() { ::close(fd); }  // closing releases the flock
  } unlock{lock_fd};
  ::flock(lock_fd, LOCK_EX);
  std::vector<DownstreamRecord> merged = read_run_downstream(run_dir);
  for (const auto& r : records) {
    auto it = std::find_if(merged.begin(), merged.end(), [&](const DownstreamRecord& m) { return same_key(m, r); });
    if (it != merged.end()) *it = r;
    else merged.push_back(r);
  }
  nlohmann::ordered_json j;
  j["results"] = nlohmann::ordered_json::array();
  for (const auto& r : merged) j["results"].push_back(downstream_to_json(r));
  write_file_atomic((fs::path(run_dir) / "downstream.json").string(), j.dump(2) + "\n");
}

void upsert_downstream(const std::string& db_path, const std::vector<DownstreamRecord>& records) {
  if (fs::path(db_path).has_parent_path()) fs::create_directories(fs::path(db_path).parent_path());
  Db db(db_path);
  db.exec(kDownstreamSchema);
  db.exec("BEGIN IMMEDIATE");
  sqlite3_stmt* stmt = nullptr;
  const char* sql =
      "INSERT OR REPLACE INTO downstream (run, task, shots, mode, n, acc, acc_stderr, acc_norm, acc_norm_stderr, "
      "chance, mean_shots, val_loss, params, active_params, split, seed, item_limit, checkpoint, task_file, seconds, "
      "record_json) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16, ?17, ?18, ?19, "
      "?20, ?21)";
  if (sqlite3_prepare_v2(db.get(), sql, -1, &stmt, nullptr) != SQLITE_OK) {
    const std::string msg = sqlite3_errmsg(db.get());
    db.exec("ROLLBACK");
    throw Error("results database '" + db_path + "': " + msg);
  }
  auto real = [&](int i, double v) {
    if (std::isfinite(v)) sqlite3_bind_double(stmt, i, v);
    else sqlite3_bind_null(stmt, i);
  };
  auto text = [&](int i, const std::string& v) { sqlite3_bind_text(stmt, i, v.c_str(), -1, SQLITE_TRANSIENT); };
  for (const DownstreamRecord& r : records) {
    sqlite3_reset(stmt);
    text(1, r.run);
    text(2, r.task);
    sqlite3_bind_int64(stmt, 3, r.shots);
    text(4, r.mode);
    sqlite3_bind_int64(stmt, 5, r.n);
    real(6, r.acc);
    real(7, r.acc_stderr);
    real(8, r.acc_norm);
    real(9, r.acc_norm_stderr);
    real(10, r.chance);
    real(11, r.mean_shots);
    real(12, r.val_loss);
    sqlite3_bind_int64(stmt, 13, r.params);
    sqlite3_bind_int64(stmt, 14, r.active_params);
    text(15, r.split);
    sqlite3_bind_int64(stmt, 16, static_cast<int64_t>(r.seed));
    sqlite3_bind_int64(stmt, 17, r.limit);
    text(18, r.checkpoint);
    text(19, r.task_file);
    real(20, r.seconds);
    text(21, downstream_to_json(r).dump());
    if (sqlite3_step(stmt) != SQLITE_DONE) {
      const std::string msg = sqlite3_errmsg(db.get());
      sqlite3_finalize(stmt);
      db.exec("ROLLBACK");
      throw Error("results database '" + db_path + "': cannot write downstream result of run '" + r.run + "': " + msg);
    }
  }
  sqlite3_finalize(stmt);
  db.exec("COMMIT");
}

std::vector<DownstreamRecord> read_downstream(const std::string& db_path) {
  if (!fs::exists(db_path)) throw Error("results database '" + db_path + "' does not exist");
  Db db(db_path);
  sqlite3_stmt* stmt = nullptr;
  const char* sql =
      "SELECT record_json FROM downstream ORDER BY run, task, mode, shots";
  if (sqlite3_prepare_v2(db.get(), sql, -1, &stmt, nullptr) != SQLITE_OK) return {};  // no downstream table
  std::vector<DownstreamRecord> out;
  while (sqlite3_step(stmt) == SQLITE_ROW) {
    const auto* json = reinterpret_cast<const char*>(sqlite3_column_text(stmt, 0));
    if (json) out.push_back(downstream_from_json(nlohmann::json::parse(json)));
  }
  sqlite3_finalize(stmt);
  return out;
}

std::string tail_lines(const std::string& path, int lines) {
  std::ifstream in(path);
  if (!in) return "";
  std::deque<std::string> last;
  std::string line;
  while (std::getline(in, line)) {
    last.push_back(line);
    if (static_cast<int>(last.size()) > lines) last.pop_front();
  }
  std::string out;
  for (const auto& l : last) out += l + "\n";
  return out;
}

RunResult result_from_run(const PlannedRun& run, const std::string& run_dir, int exit_code, double wall_seconds,
                          const std::string& log_tail) {
  RunResult r;
  r.name = run.name;
  r.group = run.group;
  r.exit_code = exit_code;
  r.wall_seconds = wall_seconds;
  r.params = run.counts.total;
  r.active_params = run.counts.active;
  r.nonembedding_params = run.counts.nonembedding_total;
  r.steps = run.steps;
  r.tokens = run.tokens;
  r.flops = run.flops;
  r.flops_per_token = run.flops_per_token;
  r.budget = run.budget;
  r.sparsity = run.counts.sparsity;
  r.granularity = run.counts.granularity;
  r.experts = run.counts.routed_experts;
  r.top_k = run.counts.active_experts;
  r.d_model = run.config.model.d_model;
  r.n_layers = run.config.model.n_layers;
  r.seed = run.config.train.seed;
  r.data_seed = effective_data_seed(run.config.train);
  r.loss = r.smoothed_loss = r.val_loss = kNaN;

  // metrics.jsonl: one line per step with "loss"; evaluation lines carry "<set>_loss" and no "loss". A resumed
  // run's file holds each step once (the trainer truncates lines after the checkpoint it resumes from).
  std::map<int64_t, double> step_loss;
  nlohmann::json last_eval;
  std::ifstream in(fs::path(run_dir) / "metrics.jsonl");
  std::string line;
  while (std::getline(in, line)) {
    nlohmann::json j;
    try {
      j = nlohmann::json::parse(line);
    } catch (const nlohmann::json::exception&) {
      continue;  // a line cut short by a kill
    }
    if (!j.is_object() || !j.contains("step")) continue;
    if (j.contains("loss") && j["loss"].is_number()) {
      step_loss[j["step"].get<int64_t>()] = j["loss"].get<double>();
      r.train_seconds += j.value("step_seconds", 0.0);
    } else {
      for (auto it = j.begin(); it != j.end(); ++it)
        if (it.key() == "val_loss" || it.key().rfind("ood_", 0) == 0) last_eval = j;
    }
  }
  r.steps_done = step_loss.empty() ? 0 : step_loss.rbegin()->first;
  if (!step_loss.empty()) {
    r.loss = step_loss.rbegin()->second;
    const int64_t window = std::max<int64_t>(1, static_cast<int64_t>(std::ceil(0.1 * static_cast<double>(step_loss.size()))));
    double sum = 0;
    int64_t n = 0;
    for (auto it = step_loss.rbegin(); it != step_loss.rend() && n < window; ++it, ++n) sum += it->second;
    r.smoothed_loss = sum / static_cast<double>(n);
  }
  if (last_eval.is_object() && last_eval.value("step", int64_t{-1}) == r.steps_done) {
    r.val_loss = number_of(last_eval, "val_loss");
    for (auto it = last_eval.begin(); it != last_eval.end(); ++it)
      if (it.key().rfind("ood_", 0) == 0 && it.value().is_number()) r.ood_losses[it.key()] = it.value().get<double>();
  }

  if (exit_code != 0) {
    r.status = "failed";
    r.error = "training exited with " +
              (exit_code > 128 ? "signal " + std::to_string(exit_code - 128) : "code " + std::to_string(exit_code)) +
              "; last lines of train.log:\n" + log_tail;
  } else if (r.steps_done != run.steps) {
    r.status = "failed";
    r.error = "training exited cleanly but metrics.jsonl has " + std::to_string(r.steps_done) + " of " +
              std::to_string(run.steps) + " steps; last lines of train.log:\n" + log_tail;
  } else if (!std::isfinite(r.loss)) {
    r.status = "failed";
    r.error = "final training loss is not finite";
  } else {
    r.status = "ok";
  }
  return r;
}

nlohmann::ordered_json result_to_json(const RunResult& r) {
  nlohmann::ordered_json j;
  j["name"] = r.name;
  j["status"] = r.status;
  j["error"] = r.error;
  j["group"] = r.group;
  j["exit_code"] = r.exit_code;
  j["loss"] = number_or_null(r.loss);
  j["smoothed_loss"] = number_or_null(r.smoothed_loss);
  j["smoothing"] = "mean training loss over the last 10% of steps (at least 1)";
  j["val_loss"] = number_or_null(r.val_loss);
  nlohmann::ordered_json ood = nlohmann::ordered_json::object();
  for (const auto& [k, v] : r.ood_losses) ood[k] = number_or_null(v);
  j["ood_losses"] = ood;
  j["params"] = r.params;
  j["active_params"] = r.active_params;
  j["nonembedding_params"] = r.nonembedding_params;
  j["steps"] = r.steps;
  j["steps_done"] = r.steps_done;
  j["tokens"] = r.tokens;
  j["flops"] = r.flops;
  j["flops_per_token"] = r.flops_per_token;
  j["budget"] = r.budget;
  j["sparsity"] = r.sparsity;
  j["granularity"] = r.granularity;
  j["experts"] = r.experts;
  j["seed"] = r.seed;
  j["data_seed"] = r.data_seed;
  j["top_k"] = r.top_k;
  j["d_model"] = r.d_model;
  j["n_layers"] = r.n_layers;
  j["wall_seconds"] = r.wall_seconds;
  j["train_seconds"] = r.train_seconds;
  return j;
}

RunResult result_from_json(const nlohmann::json& j) {
  RunResult r;
  r.name = j.at("name").get<std::string>();
  r.status = j.value("status", "failed");
  r.error = j.value("error", "");
  r.group = j.value("group", "");
  r.exit_code = j.value("exit_code", 0);
  r.loss = number_of(j, "loss");
  r.smoothed_loss = number_of(j, "smoothed_loss");
  r.val_loss = number_of(j, "val_loss");
  if (j.contains("ood_losses") && j["ood_losses"].is_object())
    for (auto it = j["ood_losses"].begin(); it != j["ood_losses"].end(); ++it)
      r.ood_losses[it.key()] = it.value().is_number() ? it.value().get<double>() : kNaN;
  r.params = j.value("params", int64_t{0});
  r.active_params = j.value("active_params", int64_t{0});
  r.nonembedding_params = j.value("nonembedding_params", int64_t{0});
  r.steps = j.value("steps", int64_t{0});
  r.steps_done = j.value("steps_done", int64_t{0});
  r.tokens = j.value("tokens", int64_t{0});
  r.flops = j.value("flops", 0.0);
  r.flops_per_token = j.value("flops_per_token", 0.0);
  r.budget = j.value("budget", 0.0);
  r.sparsity = j.value("sparsity", 0.0);
  r.granularity = j.value("granularity", int64_t{1});
  r.experts = j.value("experts", int64_t{0});
  r.seed = j.value("seed", int64_t{0});
  r.data_seed = j.value("data_seed", r.seed);  // results written before data_seed existed: it was train.seed
  r.top_k = j.value("top_k", int64_t{0});
  r.d_model = j.value("d_model", int64_t{0});
  r.n_layers = j.value("n_layers", int64_t{0});
  r.wall_seconds = j.value("wall_seconds", 0.0);
  r.train_seconds = j.value("train_seconds", 0.0);
  return r;
}

void write_result(const std::string& run_dir, const RunResult& r) {
  write_file_atomic((fs::path(run_dir) / "result.json").string(), result_to_json(r).dump(2) + "\n");
}

std::optional<RunResult> read_result(const std::string& run_dir) {
  const fs::path path = fs::path(run_dir) / "result.json";
  if (!fs::exists(path)) return std::nullopt;
  try {
    return result_from_json(nlohmann::json::parse(read_file(path.string(), "run result")));
  } catch (const std::exception&) {
    return std::nullopt;
  }
}

// A store written before replicates (or data seeds) existed lacks the column: it gains it (NULL for old rows).
static void add_seed_columns(Db& db) {
  std::set<std::string> columns;
  sqlite3_stmt* stmt = nullptr;
  if (sqlite3_prepare_v2(db.get(), "PRAGMA table_info(results)", -1, &stmt, nullptr) == SQLITE_OK) {
    while (sqlite3_step(stmt) == SQLITE_ROW) columns.insert(reinterpret_cast<const char*>(sqlite3_column_text(stmt, 1)));
    sqlite3_finalize(stmt);
  }
  for (const char* column : {"seed", "data_seed"})
    if (!columns.count(column)) db.exec(std::string("ALTER TABLE results ADD COLUMN ") + column + " INTEGER");
}

void upsert_results(const std::string& db_path, const std::vector<RunResult>& results) {
  Db db(db_path);
  db.exec(kSchema);
  add_seed_columns(db);
  db.exec("BEGIN IMMEDIATE");
  sqlite3_stmt* stmt = nullptr;
  const char* sql =
      "INSERT OR REPLACE INTO results (name, status, run_group, params, active_params, nonembedding_params, tokens, "
      "steps, steps_done, flops, flops_per_token, budget, sparsity, granularity, experts, top_k, d_model, n_layers, "
      "loss, smoothed_loss, val_loss, ood_losses, wall_seconds, train_seconds, exit_code, error, result_json, seed, "
      "data_seed) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16, ?17, ?18, ?19, ?20, "
      "?21, ?22, ?23, ?24, ?25, ?26, ?27, ?28, ?29)";
  if (sqlite3_prepare_v2(db.get(), sql, -1, &stmt, nullptr) != SQLITE_OK) {
    const std::string msg = sqlite3_errmsg(db.get());
    db.exec("ROLLBACK");
    throw Error("results database: " + msg);
  }
  auto real = [&](int i, double v) {
    if (std::isfinite(v)) sqlite3_bind_double(stmt, i, v);
    else sqlite3_bind_null(stmt, i);
  };
  for (const RunResult& r : results) {
    const std::string json = result_to_json(r).dump();
    const std::string ood = result_to_json(r)["ood_losses"].dump();
    sqlite3_reset(stmt);
    sqlite3_bind_text(stmt, 1, r.name.c_str(), -1, SQLITE_TRANSIENT);
    sqlite3_bind_text(stmt, 2, r.status.c_str(), -1, SQLITE_TRANSIENT);
    sqlite3_bind_text(stmt, 3, r.group.c_str(), -1, SQLITE_TRANSIENT);
    sqlite3_bind_int64(stmt, 4, r.params);
    sqlite3_bind_int64(stmt, 5, r.active_params);
    sqlite3_bind_int64(stmt, 6, r.nonembedding_params);
    sqlite3_bind_int64(stmt, 7, r.tokens);
    sqlite3_bind_int64(stmt, 8, r.steps);
    sqlite3_bind_int64(stmt, 9, r.steps_done);
    real(10, r.flops);
    real(11, r.flops_per_token);
    real(12, r.budget);
    real(13, r.sparsity);
    sqlite3_bind_int64(stmt, 14, r.granularity);
    sqlite3_bind_int64(stmt, 15, r.experts);
    sqlite3_bind_int64(stmt, 16, r.top_k);
    sqlite3_bind_int64(stmt, 17, r.d_model);
    sqlite3_bind_int64(stmt, 18, r.n_layers);
    real(19, r.loss);
    real(20, r.smoothed_loss);
    real(21, r.val_loss);
    sqlite3_bind_text(stmt, 22, ood.c_str(), -1, SQLITE_TRANSIENT);
    real(23, r.wall_seconds);
    real(24, r.train_seconds);
    sqlite3_bind_int(stmt, 25, r.exit_code);
    sqlite3_bind_text(stmt, 26, r.error.c_str(), -1, SQLITE_TRANSIENT);
    sqlite3_bind_text(stmt, 27, json.c_str(), -1, SQLITE_TRANSIENT);
    sqlite3_bind_int64(stmt, 28, r.seed);
    sqlite3_bind_int64(stmt, 29, r.data_seed);
    if (sqlite3_step(stmt) != SQLITE_DONE) {
      const std::string msg = sqlite3_errmsg(db.get());
      sqlite3_finalize(stmt);
      db.exec("ROLLBACK");
      throw Error("results database: cannot write run '" + r.name + "': " + msg);
    }
  }
  sqlite3_finalize(stmt);
  db.exec("COMMIT");
}

std::vector<RunResult> read_results(const std::string& sweep_dir) {
  const SweepPlan plan = read_plan(sweep_dir);
  const fs::path root = fs::absolute(sweep_dir);
  std::vector<RunResult> out;
  for (const PlannedRun* run : plan.feasible_runs())
    if (auto r = read_result((root / "runs" / run->name).string())) out.push_back(*r);
  return out;
}

int64_t collect_results(const std::string& sweep_dir) {
  const std::vector<RunResult> results = read_results(sweep_dir);
  const fs::path root = fs::absolute(sweep_dir);
  const fs::path tmp = root / ("results.db.tmp." + std::to_string(::getpid()));
  fs::remove(tmp);
  try {
    upsert_results(tmp.string(), results);
    std::vector<DownstreamRecord> downstream;
    for (const RunResult& r : results)
      for (auto& d : read_run_downstream((root / "runs" / r.name).string())) downstream.push_back(std::move(d));
    if (!downstream.empty()) upsert_downstream(tmp.string(), downstream);
    fs::rename(tmp, root / "results.db");
  } catch (...) {
    fs::remove(tmp);
    throw;
  }
  return static_cast<int64_t>(results.size());
}

std::string results_csv(const std::vector<RunResult>& results, const std::string& loss_source, bool include_failed) {
  if (loss_source != "smoothed" && loss_source != "final" && loss_source != "val")
    throw Error("--loss = '" + loss_source + "' must be smoothed, final or val");
  std::set<std::string> ood_sets;
  for (const auto& r : results)
    for (const auto& [k, v] : r.ood_losses) ood_sets.insert(k);
  std::ostringstream out;
  out << "name,status,params,active_params,nonembedding_params,tokens,flops,loss,final_loss,smoothed_loss,val_loss,"
         "sparsity,granularity,experts,top_k,d_model,n_layers,steps,budget,wall_seconds,seed,data_seed";
  for (const auto& s : ood_sets) out << "," << s;  // keys are already ood_<set>_loss
  out << "\n";
  auto num = [](double v) {
    if (!std::isfinite(v)) return std::string();
    char buf[40];
    std::snprintf(buf, sizeof buf, "%.10g", v);
    return std::string(buf);
  };
  for (const auto& r : results) {
    if (r.status != "ok" && !include_failed) continue;
    const double loss = loss_source == "final" ? r.loss : loss_source == "val" ? r.val_loss : r.smoothed_loss;
    out << r.name << "," << r.status << "," << r.params << "," << r.active_params << "," << r.nonembedding_params
        << "," << r.tokens << "," << num(r.flops) << "," << num(loss) << "," << num(r.loss) << ","
        << num(r.smoothed_loss) << "," << num(r.val_loss) << "," << num(r.sparsity) << "," << r.granularity << ","
        << r.experts << "," << r.top_k << "," << r.d_model << "," << r.n_layers << "," << r.steps << ","
        << num(r.budget) << "," << num(r.wall_seconds) << "," << r.seed << "," << r.data_seed;
    for (const auto& s : ood_sets) {
      auto it = r.ood_losses.find(s);
      out << "," << (it == r.ood_losses.end() ? "" : num(it->second));
    }
    out << "\n";
  }
  return out.str();
}

double result_loss(const RunResult& r, const std::string& loss) {
  if (loss == "val") return r.val_loss;
  if (loss == "final") return r.loss;
  if (loss == "smoothed") return r.smoothed_loss;
  throw Error("unknown loss '" + loss + "': use val, smoothed or final");
}

std::string replicate_base_name(const RunResult& r) {
  const std::string suffix = "-s" + std::to_string(r.seed);
  if (r.name.size() > suffix.size() && r.name.compare(r.name.size() - suffix.size(), suffix.size(), suffix) == 0)
    return r.name.substr(0, r.name.size() - suffix.size());
  return r.name;
}

std::vector<BestRun> best_runs_per_budget(const std::vector<RunResult>& results, const std::string& loss) {
  struct Config {
    const RunResult* first = nullptr;  // the lowest seed
    double sum = 0;
    int n = 0;
  };
  std::map<std::pair<double, bool>, std::map<std::string, Config>> configs;
  std::vector<double> keys;
  for (const auto& r : results) {
    if (r.status != "ok" || !std::isfinite(result_loss(r, loss))) continue;
    double key = r.budget > 0 ? r.budget : -static_cast<double>(r.tokens);
    for (double k : keys)
      if (std::fabs(k - key) <= 1e-6 * std::fabs(key)) key = k;
    if (std::find(keys.begin(), keys.end(), key) == keys.end()) keys.push_back(key);
    Config& c = configs[{key, r.experts > 0}][replicate_base_name(r)];
    if (!c.first || r.seed < c.first->seed) c.first = &r;
    c.sum += result_loss(r, loss), c.n += 1;
  }
  std::vector<BestRun> out;
  for (const auto& [key, by_name] : configs) {
    const Config* best = nullptr;
    for (const auto& [name, c] : by_name)
      if (!best || c.sum / c.n < best->sum / best->n) best = &c;
    out.push_back({key.first, key.second, best->first});
  }
  return out;
}

std::vector<BestRun> with_replicates(const std::vector<BestRun>& best, const std::vector<RunResult>& results) {
  std::vector<BestRun> out;
  for (const BestRun& b : best) {
    std::vector<const RunResult*> group;
    for (const auto& r : results)
      if (r.status == "ok" && replicate_base_name(r) == replicate_base_name(*b.run)) group.push_back(&r);
    std::sort(group.begin(), group.end(), [](const RunResult* x, const RunResult* y) { return x->seed < y->seed; });
    for (const RunResult* r : group) out.push_back({b.budget_key, b.moe, r});
  }
  return out;
}

}  // namespace moelab
