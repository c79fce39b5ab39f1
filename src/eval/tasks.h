#pragma once
// Downstream multiple-choice tasks (docs/tasks.md): a JSONL task format, zero-/few-shot priming scored by the
// log-likelihood of each choice given its context, accuracy with standard errors, and where results are kept.
//
// Scoring: for an item with context c and choices x_1..x_m, score_i = sum_t log p(x_i[t] | eos, c, x_i[<t]) over
// the choice's tokens (the end-of-document token stands in for a beginning-of-text token, as documents follow
// one in the training shards). acc picks argmax score_i; acc_norm picks argmax score_i / chars(x_i), with
// chars counted in Unicode code points (as lm-evaluation-harness's acc_norm does). Standard errors are
// binomial: sqrt(p (1 - p) / n).
#include <cstdint>
#include <ostream>
#include <string>
#include <vector>

#include "backend/backend.h"
#include "eval/inference.h"
#include "config/config.h"
#include "sweep/results.h"

namespace moelab {

struct TaskItem {
  std::string id;       // "id" field, or "line N" when absent; unique within a task
  std::string context;  // text before the answer
  std::vector<std::string> choices;
  int64_t gold = 0;     // index into choices
  std::string split;    // "train", "test", ... ("" when absent: treated as test)
  int64_t line = 0;     // 1-based line in the file
};

struct Task {
  std::string name;  // file stem
  std::string path;
  std::vector<TaskItem> items;
  // Items whose split is `split` ("test" also takes items without a split), in file order.
  std::vector<const TaskItem*> split(const std::string& split) const;
};

// Parses JSONL task text; `source` names it in errors ("task file 'F' line N: ..."). Throws moelab::Error on bad
// JSON, a missing or mistyped field, empty choices, a gold index out of range, a duplicate id or no items.
Task parse_task(const std::string& text, const std::string& source, const std::string& name);
Task load_task_file(const std::string& path);

// Where built-in tasks live: $MOELAB_TASKS_DIR, else data/tasks (relative to the working directory).
std::string default_tasks_dir();
// Names of the tasks (<name>.jsonl) in a directory, sorted; empty when it does not exist.
std::vector<std::string> task_names(const std::string& tasks_dir);
// A task given as a file path, or as a name resolved to <tasks_dir>/<name>.jsonl. An unknown name is an error
// that lists the available names and says how to build them.
Task load_task(const std::string& name_or_file, const std::string& tasks_dir);

// The k few-shot examples for `item`: drawn without replacement from the task's train split (or, if it has
// none, from `fallback_pool`), never the item itself (nor any item with its context), seeded by
// (seed, item id) so the same seed gives the same examples whatever else is evaluated.
std::vector<const TaskItem*> sample_shots(const std::vector<const TaskItem*>& pool, const TaskItem& item, int64_t k,
                                          uint64_t seed);
// The primed context: each shot as context + gold choice, then the item's context, joined by blank lines.
std::string primed_context(const std::vector<const TaskItem*>& shots, const TaskItem& item);

// Sum of log p(continuation | context) under a model, for many (context, continuation) token pairs. Sequences
// are scored in batches on models sized to the longest sequence of a length bucket (RoPE and sinusoidal
// positions do not depend on the context length, so a short sequence need not pay for seq_len positions).
struct ScoringRequest {
  std::vector<int32_t> context;       // at least one token
  std::vector<int32_t> continuation;  // at least one token
};
class ContinuationScorer {
 public:
  // `params` laid out by ParamLayout(config) (not copied until score() runs).
  ContinuationScorer(const ModelConfig& config, Backend& backend, const float* params, int64_t batch = 8);
  ~ContinuationScorer();
  // Log-likelihoods in request order. A context longer than the model's seq_len is cut from the left.
  std::vector<double> score(const std::vector<ScoringRequest>& requests);
  int64_t max_tokens() const { return config_.seq_len + 1; }  // context + continuation that fit

 private:
  struct Bucket;
  Bucket& bucket(int64_t seq_len);
  ModelConfig config_;
  Backend& backend_;
  const float* params_;
  int64_t batch_;
  std::vector<std::unique_ptr<Bucket>> buckets_;
};

struct TaskEvalOptions {
  int64_t shots = 0;
  int64_t limit = 0;           // score at most this many items of the split (the first ones); 0: all
  uint64_t seed = 1;           // few-shot sampling
  std::string split = "test";  // the split scored
  int64_t batch = 8;           // sequences per forward
};

// Accuracy of a model (params laid out for `config`) on one task. Fills task, shots, mode, n, acc, acc_norm,
// their standard errors, mean_shots, chance, split, seed, limit, seconds; the caller fills the run's fields.
DownstreamRecord evaluate_task(const ModelConfig& config, Backend& backend, const float* params,
                               const TextCodec& codec, const Task& task, const TaskEvalOptions& options);

// Where a checkpoint's run lives, and which results store its downstream results go to.
struct RunLocation {
  std::string checkpoint_dir;  // the checkpoint directory itself
  std::string run_dir;         // the run directory (the checkpoint's parent, or the checkpoint dir itself)
  std::string run_id;          // the run directory's name
  std::string sweep_dir;       // the sweep directory when run_dir is <sweep>/runs/<name> of a planned sweep
  double val_loss = 0;         // last val_loss in <run_dir>/metrics.jsonl (NaN when none)
};
RunLocation locate_run(const std::string& checkpoint);

// The library entry point for `moelab eval --tasks` and report generators: evaluates a checkpoint on each task
// at each shot count, with the run's id, val_loss and parameter counts filled in. Nothing is written.
std::vector<DownstreamRecord> evaluate_checkpoint_on_tasks(const std::string& checkpoint,
                                                           const std::vector<std::string>& tasks,
                                                           const std::vector<int64_t>& shots,
                                                           const TaskEvalOptions& options, int threads,
                                                           const std::string& tasks_dir);

// Records results: merges them into <run_dir>/downstream.json (atomically), and upserts them into the results
// store: `results_db` when given, else <sweep_dir>/results.db when the run belongs to a sweep. Returns the
// database written ("" when none).
std::string record_downstream(const RunLocation& run, const std::vector<DownstreamRecord>& records,
                              const std::string& results_db);

// `moelab sweep eval`: evaluates every finished ("ok") run of a sweep on the tasks and records each run's results
// in its downstream.json and <sweep_dir>/results.db as it finishes. Runs that already hold a record for every
// (task, shots) asked for are skipped unless `force`, so an interrupted sweep evaluation resumes. Returns the
// number of runs evaluated.
int64_t evaluate_sweep_on_tasks(const std::string& sweep_dir, const std::vector<std::string>& tasks,
                                const std::vector<int64_t>& shots, const TaskEvalOptions& options, int threads,
                                const std::string& tasks_dir, bool force, std::ostream& log);

}  // namespace moelab
