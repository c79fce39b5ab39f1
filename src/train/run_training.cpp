// run_training: a whole training job as its parts, each small: the run directory and the data (RunSetup), the
// evaluation sets (Evaluator), metrics.jsonl and the progress lines (MetricsLogger), checkpoints (Checkpointer), and
// the loop that steps the Trainer and hands each step to them.
#include <algorithm>
#include <cmath>
#include <csignal>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <memory>
#include <nlohmann/json.hpp>
#include <string>
#include <utility>
#include <vector>

#include "backend/peak.h"
#include "core/io.h"
#include "core/timer.h"
#include "model/count.h"
#include "model/flops.h"
#include "model/plan.h"
#include "train/checkpoint.h"
#include "train/trainer.h"

namespace moelab {
namespace {

// Router statistics of every MoE layer, for metrics.jsonl.
// Each expert's share of the router's choices.
std::vector<double> load_fraction(const std::vector<double>& assigned) {
  double sum = 0;
  for (double a : assigned) sum += a;
  std::vector<double> out(assigned.size(), 0.0);
  if (sum > 0)
    for (size_t e = 0; e < assigned.size(); ++e) out[e] = assigned[e] / sum;
  return out;
}

nlohmann::json router_stats_json(const Transformer& model) {
  nlohmann::json layers = nlohmann::json::array();
  const auto biases = model.router_biases();
  const auto stats = model.moe_statistics();
  for (size_t i = 0; i < stats.size(); ++i) {
    const auto& s = stats[i];
    if (s.tokens_per_expert.empty()) continue;
    const auto [lo, hi] = std::minmax_element(s.tokens_per_expert.begin(), s.tokens_per_expert.end());
    layers.push_back({{"layer", i},
                      {"tokens_per_expert", s.tokens_per_expert},
                      {"tokens_min", *lo},
                      {"tokens_max", *hi},
                      {"tokens_cv", s.tokens_cv()},
                      {"dropped_fraction", s.dropped_fraction},
                      {"idle_experts", s.idle_experts},
                      {"router_entropy", s.router_entropy},
                      {"aux_loss", s.aux_loss},
                      {"seq_aux_loss", s.seq_aux_loss},
                      {"z_loss", s.z_loss},
                      {"overload", s.overload()},
                      {"load_fraction", load_fraction(s.assigned)}});
    if (biases.count(static_cast<int64_t>(i))) {
      const auto& b = biases.at(static_cast<int64_t>(i));
      const auto [bmin, bmax] = std::minmax_element(b.begin(), b.end());
      layers.back()["bias_min"] = *bmin;
      layers.back()["bias_max"] = *bmax;
    }
  }
  return layers;
}

std::string format_duration(double seconds) {
  char buf[32];
  const int64_t s = static_cast<int64_t>(seconds);
  if (s >= 3600) std::snprintf(buf, sizeof buf, "%ldh%02ldm", s / 3600, (s % 3600) / 60);
  else if (s >= 60) std::snprintf(buf, sizeof buf, "%ldm%02lds", s / 60, s % 60);
  else std::snprintf(buf, sizeof buf, "%lds", s);
  return buf;
}

void check_vocab(const TokenFile& file, const ModelConfig& m) {
  if (file.vocab_size() > 0 && file.vocab_size() != m.vocab_size)
    throw Error("vocabulary mismatch: token shard '" + file.path() + "' was written with vocabulary " +
                std::to_string(file.vocab_size()) + " but model.vocab_size = " + std::to_string(m.vocab_size) +
                "; set model.vocab_size to match, or re-encode the data");
  if (file.max_token() >= m.vocab_size)
    throw Error("token file '" + file.path() + "' contains id " + std::to_string(file.max_token()) +
                " but model.vocab_size = " + std::to_string(m.vocab_size) + "; raise model.vocab_size");
}


// Keeps the metrics lines of steps <= last_step (the checkpoint a run resumes from), so a resumed run's
// metrics.jsonl reads as one uninterrupted run.
void truncate_metrics(const std::filesystem::path& path, int64_t last_step) {
  if (!std::filesystem::exists(path)) return;
  std::ifstream in(path);
  std::string line, kept;
  while (std::getline(in, line)) {
    try {
      if (nlohmann::json::parse(line).value("step", int64_t{0}) <= last_step) kept += line + "\n";
    } catch (const nlohmann::json::exception&) {
      break;  // a line cut short by the crash
    }
  }
  write_file_atomic(path.string(), kept);
}


// A test hook for the failure tests (tests/dist_failure.sh): MOELAB_TEST_FAULT="RANK:STEP:KIND" makes rank RANK
// fail as it starts step STEP, KIND being `error` (an Error, as a bad input would throw), `segv` (SIGSEGV) or
// `kill` (SIGKILL, as the out-of-memory killer would).
struct TestFault {
  int64_t step = -1;  // -1: none
  std::string kind;
  void strike(int rank) const {
    if (kind == "segv") std::raise(SIGSEGV);
    if (kind == "kill") std::raise(SIGKILL);
    throw Error("MOELAB_TEST_FAULT: failure injected on rank " + std::to_string(rank) + " at step " +
                std::to_string(step) + " (a test hook: unset MOELAB_TEST_FAULT)");
  }
};

TestFault test_fault_from_environment(int rank) {
  const char* spec = std::getenv("MOELAB_TEST_FAULT");
  if (!spec || !*spec) return {};
  int fault_rank = -1;
  long long step = -1;
  char kind[16] = {0};
  if (std::sscanf(spec, "%d:%lld:%15s", &fault_rank, &step, kind) != 3 || step < 1 ||
      (std::string(kind) != "error" && std::string(kind) != "segv" && std::string(kind) != "kill"))
    throw Error(std::string("MOELAB_TEST_FAULT='") + spec + "' is not RANK:STEP:KIND with KIND error, segv or kill");
  if (fault_rank != rank) return {};
  return {step, kind};
}

// The loss on each evaluation set: validation first, then each out-of-domain set, named by file stem.
class Evaluator {
 public:
  Evaluator(const DataConfig& data, const ModelConfig& model, int64_t batches) : batches_(batches) {
    if (!data.val_path.empty()) sets_.emplace_back("val", std::make_unique<TokenFile>(data.val_path, data.dtype));
    for (const std::string& path : data.ood_paths) {
      std::string name = std::filesystem::path(path).stem().string();
      if (name.rfind("ood_", 0) == 0) name = name.substr(4);
      sets_.emplace_back("ood_" + name, std::make_unique<TokenFile>(path, data.dtype));
    }
    for (auto& [name, file] : sets_) check_vocab(*file, model);
  }
  bool empty() const { return sets_.empty(); }
  // (set name, loss) of every set, in order.
  std::vector<std::pair<std::string, double>> evaluate(Trainer& trainer) const {
    std::vector<std::pair<std::string, double>> out;
    for (const auto& [name, file] : sets_) out.emplace_back(name, trainer.evaluate(*file, batches_));
    return out;
  }

 private:
  int64_t batches_;
  std::vector<std::pair<std::string, std::unique_ptr<TokenFile>>> sets_;
};

// metrics.jsonl (rank 0's; an unopened stream, whose writes go nowhere, on the others) and the progress lines.
class MetricsLogger {
 public:
  MetricsLogger(const Config& config, const std::filesystem::path& out_dir, std::ostream& log, bool lead,
                int64_t ranks)
      : config_(config), log_(log),
        tokens_per_step_(config.train.batch_size * config.train.grad_accum * config.model.seq_len * ranks),
        flops_per_token_(training_flops_per_token(config.model, config.train.flops_convention)) {
    if (!lead) return;
    write_file_atomic((out_dir / "config.toml").string(), to_toml(config));
    metrics_.open(out_dir / "metrics.jsonl", std::ios::app);
    if (!metrics_) throw Error("cannot write metrics to '" + (out_dir / "metrics.jsonl").string() + "'");
  }
  int64_t tokens_per_step() const { return tokens_per_step_; }
  // The GEMM peak MFU is measured against: train.peak_flops, or one process's measured by rank 0 (the others
  // wait), times the processes.
  void measure_peak(Backend& backend, Communicator& comm) {
    const auto& t = config_.train;
    peak_ = t.peak_flops > 0 ? t.peak_flops : comm.rank() == 0 ? measure_gemm_peak(backend, 0.3) : 0.0;
    comm.broadcast(&peak_, 1, 0);
    if (t.peak_flops <= 0) peak_ *= comm.size();
  }
  // The job's header: sizes, processes, FLOPs per token and peak; the MoE layout; a metrics line of the constants.
  void header(const Trainer& trainer, const Backend& backend, int ranks, const std::filesystem::path& out_dir);
  // One metrics line per step; on logging steps the router statistics, the throughput and a progress line.
  void step(const StepStats& st, const Trainer& trainer);
  // The evaluation results as one metrics line and one progress line.
  void eval(int64_t step, const std::vector<std::pair<std::string, double>>& losses);
  void flush() { metrics_.flush(); }
  // The training clock (elapsed_seconds, ETA, the summary's rate) starts with the first step.
  void start_clock() { total_ = Timer(); }
  double elapsed() const { return total_.seconds(); }

 private:
  const Config& config_;
  std::ostream& log_;
  std::ofstream metrics_;
  int64_t tokens_per_step_;
  double flops_per_token_, peak_ = 0;
  Timer total_;
  bool warned_peak_ = false;
  double window_seconds_ = 0;  // since the last progress line
  int64_t window_steps_ = 0;
  void progress_line(const StepStats& st, double tok_s);
};

void MetricsLogger::header(const Trainer& trainer, const Backend& backend, int ranks,
                           const std::filesystem::path& out_dir) {
  const auto& t = config_.train;
  char line[512];
  std::snprintf(line, sizeof line,
                "moelab train: %.2fM parameters, %ld steps x %ld tokens, %d process%s x %d threads, %.1f MFLOP/token "
                "(%s), peak %.1f GFLOP/s (%s), out %s\n",
                trainer.model().full_layout().total() / 1e6, static_cast<long>(t.steps),
                static_cast<long>(tokens_per_step_), ranks, ranks == 1 ? "" : "es", backend.threads(),
                flops_per_token_ / 1e6, to_string(t.flops_convention).c_str(), peak_ / 1e9,
                t.peak_flops > 0 ? "configured" : "measured fp32 GEMM", out_dir.c_str());
  log_ << line << std::flush;
  metrics_ << nlohmann::json{{"step", trainer.steps_done()}, {"flops_per_token", flops_per_token_},
                             {"flops_convention", to_string(t.flops_convention)}, {"peak_flops", peak_}}.dump()
           << "\n";
  const auto& moe = config_.model.moe;
  if (!moe.enabled()) return;
  const int64_t active = active_parameter_count(trainer.model().full_layout(), config_.model);
  int64_t moe_layers = 0;
  for (int64_t i = 0; i < config_.model.n_layers; ++i) moe_layers += moe.is_moe_layer(i);
  std::snprintf(line, sizeof line,
                "MoE: %ld of %ld layers, %s, %ld routed experts of hidden %ld (G = %ld), top-%ld, %ld shared; "
                "sparsity S = %.3f; parameters %.2fM total, %.2fM active\n",
                static_cast<long>(moe_layers), static_cast<long>(config_.model.n_layers),
                to_string(moe.router).c_str(), static_cast<long>(moe.routed_experts()),
                static_cast<long>(ModelPlan(config_.model).expert_hidden), static_cast<long>(moe.granularity),
                static_cast<long>(moe.active_experts()), static_cast<long>(moe.shared_experts), moe.sparsity(),
                trainer.model().full_layout().total() / 1e6, active / 1e6);
  log_ << line << std::flush;
  const int64_t P = config_.dist.expert_parallel;
  if (P > 1) {
    std::snprintf(line, sizeof line, "expert parallelism: each MoE layer's %ld routed experts over %ld processes "
                  "(%ld each), %d group%s\n", static_cast<long>(moe.routed_experts()), static_cast<long>(P),
                  static_cast<long>(moe.routed_experts() / P), static_cast<int>(ranks / P),
                  ranks / P == 1 ? "" : "s");
    log_ << line << std::flush;
  }
}

void MetricsLogger::step(const StepStats& st, const Trainer& trainer) {
  window_seconds_ += st.seconds;
  ++window_steps_;
  const double tok_s = window_steps_ * tokens_per_step_ / std::max(window_seconds_, 1e-9);
  nlohmann::json rec = {{"step", st.step},
                        {"loss", st.loss},
                        {"lr", st.lr},
                        {"grad_norm", st.grad_norm},
                        {"tokens", st.step * tokens_per_step_},
                        {"flops", flops_per_token_ * static_cast<double>(st.step * tokens_per_step_)},
                        {"step_seconds", st.seconds},
                        {"elapsed_seconds", total_.seconds()}};
  const bool log_step = trainer.logs_step(st.step);
  if (config_.model.moe.enabled() && log_step) {  // the router's statistics, computed for logging steps only
    rec["aux_loss"] = st.aux_loss;
    rec["router"] = router_stats_json(trainer.model());
  }
  if (log_step) {  // throughput over the steps since the last progress line
    rec["flops_per_second"] = tok_s * flops_per_token_;
    rec["mfu"] = tok_s * flops_per_token_ / peak_;
  }
  metrics_ << rec.dump() << "\n";
  if (!log_step) return;
  metrics_.flush();
  progress_line(st, tok_s);
  window_seconds_ = 0;
  window_steps_ = 0;
}

void MetricsLogger::progress_line(const StepStats& st, double tok_s) {
  const auto& t = config_.train;
  const double eta = (t.steps - st.step) * (total_.seconds() / st.step);
  char line[512];
  std::snprintf(line, sizeof line, "step %6ld/%ld | loss %.4f | lr %.2e | grad-norm %.3f | %.0f tok/s | "
                "%.2f GFLOP/s | MFU %.1f%% | eta %s\n", static_cast<long>(st.step), static_cast<long>(t.steps),
                st.loss, st.lr, st.grad_norm, tok_s, tok_s * flops_per_token_ / 1e9,
                100.0 * tok_s * flops_per_token_ / peak_, format_duration(eta).c_str());
  log_ << line << std::flush;
  if (tok_s * flops_per_token_ > peak_ && !warned_peak_ && t.peak_flops <= 0) {
    warned_peak_ = true;
    log_ << "note: the achieved rate exceeds the GEMM peak measured at start-up (" << peak_ / 1e9
         << " GFLOP/s): the machine was busy then. Set train.peak_flops for a stable MFU.\n";
  }
}

void MetricsLogger::eval(int64_t step, const std::vector<std::pair<std::string, double>>& losses) {
  nlohmann::json rec = {{"step", step}};
  std::string text = "step " + std::to_string(step) + " | eval";
  for (const auto& [name, loss] : losses) {
    rec[name + "_loss"] = loss;
    char part[96];
    std::snprintf(part, sizeof part, " | %s %.4f (ppl %.2f)", name.c_str(), loss, std::exp(loss));
    text += part;
  }
  metrics_ << rec.dump() << "\n" << std::flush;
  log_ << text << "\n" << std::flush;
}

// <out_dir>/checkpoint every train.checkpoint_every steps and after the last.
class Checkpointer {
 public:
  Checkpointer(const TrainConfig& t, const std::filesystem::path& out_dir)
      : every_(t.checkpoint_every), steps_(t.steps), dir_((out_dir / "checkpoint").string()) {}
  // After step `step`; the metrics are flushed first, so the checkpoint never runs ahead of them.
  void after_step(Trainer& trainer, int64_t step, MetricsLogger& metrics) const {
    if (every_ <= 0 || step % every_ != 0 || step == steps_) return;
    metrics.flush();
    trainer.save(dir_);
  }
  void at_end(Trainer& trainer, MetricsLogger& metrics) const {
    metrics.flush();
    if (trainer.steps_done() > 0) trainer.save(dir_);
  }

 private:
  int64_t every_, steps_;
  std::string dir_;
};

// The run directory, checked before any collective (a rank 0 that cannot write it fails with the reason, and the
// job ends instead of waiting for it), and the training data, checked against the vocabulary.
DataConfig check_run_inputs(const Config& config, bool lead) {
  if (lead)
    ensure_writable_directory(config.train.out_dir, "train.out_dir",
                              "choose a directory you can write, e.g. --set train.out_dir=runs/NAME");
  DataConfig data = resolve_data_paths(config.data);
  if (data.train_path.empty())
    throw Error("no training data: set data.dir to a `moelab data prepare` directory, or data.train_path to a "
                "token file");
  return data;
}

// Resumes from the run directory's checkpoint, or starts afresh (from train.init_from's weights when set).
void start_or_resume(Trainer& trainer, const Config& config, const std::filesystem::path& out_dir,
                     const std::string& existing, bool resume, bool lead, std::ostream& log) {
  if (resume && !existing.empty()) {
    trainer.load(existing);
    if (lead) truncate_metrics(out_dir / "metrics.jsonl", trainer.steps_done());
    log << "resuming from " << existing << " at step " << trainer.steps_done() << "\n";
    return;
  }
  if (lead) std::filesystem::remove(out_dir / "metrics.jsonl");
  if (config.train.init_from.empty()) return;
  const InitFromReport r = trainer.init_from(config.train.init_from);
  log << "initialised from " << r.checkpoint << ": " << r.copied << " tensors copied";
  if (r.upcycled > 0) log << ", " << r.upcycled << " expert tensors upcycled from the dense FFNs";
  if (!r.fresh.empty()) log << ", " << r.fresh.size() << " (routers, shared experts) at the configured init";
  log << "\n";
}

}  // namespace

TrainSummary run_training(const Config& config, std::ostream& lead_log, bool resume) {
  // Under mpirun every process runs this; rank 0 alone writes the run directory and the progress lines.
  Communicator& comm = world_communicator();
  const bool lead = comm.rank() == 0;
  const std::filesystem::path out_dir(config.train.out_dir);
  const DataConfig data = check_run_inputs(config, lead);
  const TestFault fault = test_fault_from_environment(comm.rank());
  std::ostream null_log(nullptr);
  std::ostream& log = lead ? lead_log : null_log;
  auto backend = make_backend(config.train.backend, static_cast<int>(config.train.threads));
  TokenFile train_data(data.train_path, data.dtype);
  check_vocab(train_data, config.model);
  const Evaluator evaluator(data, config.model, config.train.eval_batches);

  comm.barrier();
  const std::string existing = find_checkpoint(out_dir.string());
  if (!existing.empty() && !resume)
    throw Error("run directory '" + out_dir.string() + "' already holds a checkpoint; pass --resume to continue it, "
                "or choose another train.out_dir");
  Trainer trainer(config, *backend, &comm);
  start_or_resume(trainer, config, out_dir, existing, resume, lead, log);
  MetricsLogger metrics(config, out_dir, log, lead, comm.size());
  metrics.measure_peak(*backend, comm);
  metrics.header(trainer, *backend, comm.size(), out_dir);
  const Checkpointer checkpointer(config.train, out_dir);

  const auto& t = config.train;
  TrainSummary summary;
  metrics.start_clock();
  for (int64_t s = trainer.steps_done(); s < t.steps; ++s) {
    if (s + 1 == fault.step) fault.strike(comm.rank());
    const StepStats st = trainer.step(train_data);
    summary.losses.push_back(st.loss);
    metrics.step(st, trainer);
    checkpointer.after_step(trainer, st.step, metrics);
    if (!evaluator.empty() && t.eval_every > 0 && st.step % t.eval_every == 0 && st.step != t.steps)
      metrics.eval(st.step, evaluator.evaluate(trainer));
  }
  summary.steps = t.steps;
  summary.seconds = metrics.elapsed();
  summary.final_loss = summary.losses.empty() ? 0.0 : summary.losses.back();
  summary.tokens_per_second = static_cast<double>(summary.losses.size() * metrics.tokens_per_step()) /
                              std::max(summary.seconds, 1e-9);
  checkpointer.at_end(trainer, metrics);
  if (!evaluator.empty()) {
    const auto losses = evaluator.evaluate(trainer);
    metrics.eval(trainer.steps_done(), losses);
    for (const auto& [name, loss] : losses)
      if (name == "val") summary.val_loss = loss;
  }
  return summary;
}

}  // namespace moelab
