#include "train/trainer.h"

#include <algorithm>
#include <csignal>
#include <cstdlib>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <utility>
#include <nlohmann/json.hpp>

#include "core/io.h"
#include "train/checkpoint.h"
#include "core/timer.h"
#include "train/window_loss.h"
#include "backend/peak.h"
#include "model/flops.h"
#include "model/count.h"
#include "model/plan.h"
#include "optim/schedule.h"

namespace moelab {

Trainer::Trainer(const Config& config, Backend& backend, Communicator* comm)
    : config_(config),
      backend_(backend),
      own_comm_(comm ? nullptr : make_single_communicator()),
      comm_(comm ? comm : own_comm_.get()),
      data_rng_(static_cast<uint64_t>(effective_data_seed(config.train)) ^ 0x5eed0da7aULL) {
  backend_.set_matmul_precision(config.train.precision);
  const int64_t P = config.dist.expert_parallel, ranks = comm_->size();
  if (P > 1) {
    if (!config.model.moe.enabled())
      throw Error("dist.expert_parallel = " + std::to_string(P) + " needs MoE layers (moe.experts or moe.expansion); "
                  "set dist.expert_parallel = 1 for a dense model");
    if (ranks % P != 0)
      throw Error("dist.expert_parallel = " + std::to_string(P) + " does not divide the " + std::to_string(ranks) +
                  " processes of this job; run a multiple of " + std::to_string(P) + " processes (mpirun -np)");
    // Groups of P consecutive ranks share out the experts; ranks holding the same shard sum its gradients.
    ep_group_ = comm_->split(comm_->rank() / static_cast<int>(P), comm_->rank());
    replica_group_ = comm_->split(comm_->rank() % static_cast<int>(P), comm_->rank());
  }
  model_ = std::make_unique<Transformer>(config.model, backend, config.train.batch_size, ep_group_.get());
  model_->init_weights(static_cast<uint64_t>(config.train.seed));
  optimizer_ = std::make_unique<AdamW>(model_->layout(), config.train, backend);
  // The parameter block as runs of expert-shard and replicated entries (layout order), for the gradient sums.
  for (const auto& e : model_->layout().entries()) {
    const bool shard = e.shape.numel() != model_->full_layout().find(e.name).shape.numel();
    auto& runs = shard ? expert_runs_ : dense_runs_;
    if (!runs.empty() && runs.back().first + runs.back().second == e.offset) runs.back().second += e.shape.numel();
    else runs.emplace_back(e.offset, e.shape.numel());
  }
  if (comm_->size() > 1) plan_gradient_buckets();
}

Trainer::BatchSource Trainer::batches(const TokenFile& data) {
  const int64_t B = config_.train.batch_size, T = config_.model.seq_len, A = config_.train.grad_accum;
  const int64_t rank = comm_->rank(), ranks = comm_->size();
  auto micro = std::make_shared<int64_t>(0);
  return [this, &data, B, T, A, rank, ranks, micro](std::vector<int32_t>& tokens, std::vector<int32_t>& targets) {
    if (*micro % A == 0) skip_windows(data, data_rng_, rank * A * B, T);  // the ranks before this one
    sample_batch(data, data_rng_, B, T, tokens, targets);
    if (++*micro % A == 0) skip_windows(data, data_rng_, (ranks - 1 - rank) * A * B, T);  // and after
  };
}

StepStats Trainer::step(const TokenFile& data) { return step(batches(data)); }

std::vector<float> Trainer::full_gradients() const { return gather_full(std::as_const(*model_).grads()); }

bool Trainer::logs_step(int64_t step) const {
  const auto& t = config_.train;
  return (t.log_every > 0 && step % t.log_every == 0) || step == t.steps;
}

StepStats Trainer::step(const BatchSource& next_batch) {
  StepStats s = compute_gradients(next_batch);
  const auto& t = config_.train;
  s.grad_norm = std::sqrt(grad_sum_squares());
  s.lr = learning_rate(t, steps_done_);
  optimizer_->step(model_->params(), model_->grads(), s.lr, clip_factor(s.grad_norm, t.grad_clip),
                   AdamW::Grads::ZeroExceptMatrices);
  model_->grads_were_zeroed(/*except_matrices=*/true);
  model_->update_router_biases(comm_);
  ++steps_done_;
  backend_.synchronize();  // a GPU's queued kernels belong to this step's time
  s.seconds = step_timer_.seconds();
  return s;
}

StepStats Trainer::compute_gradients(const BatchSource& next_batch) {
  step_timer_ = Timer();
  const auto& t = config_.train;
  const int64_t B = t.batch_size, T = config_.model.seq_len;
  model_->zero_grad();
  const int64_t micro_batches = t.grad_accum * comm_->size();  // in the global batch
  double sums[2] = {0.0, 0.0};                                  // loss, auxiliary loss
  const bool statistics = model_->config().moe.enabled() && logs_step(steps_done_ + 1);
  for (int64_t micro = 0; micro < t.grad_accum; ++micro) {
    next_batch(tokens_, targets_);
    MOELAB_CHECK(static_cast<int64_t>(tokens_.size()) == B * T && tokens_.size() == targets_.size(),
                 "micro-batch must be (batch_size, seq_len)");
    // Router jitter's noise: a function of the seed, the step and the micro-batch's place in the global batch.
    model_->set_noise_seed(static_cast<uint64_t>(t.seed) * 0x100000001b3ULL ^
                           static_cast<uint64_t>(steps_done_ * micro_batches + comm_->rank() * t.grad_accum + micro));
    sums[0] += model_->forward(tokens_.data(), targets_.data(), B, 1.f / static_cast<float>(micro_batches));
    if (statistics) sums[1] += model_->last_aux_loss();
    model_->backward();
  }
  StepStats s;
  s.comm_seconds = model_->take_exchange_seconds();
  if (comm_->size() > 1) {
    Timer comm_timer;
    allreduce_gradients();
    comm_->allreduce_sum(sums, 2);
    s.comm_seconds += comm_timer.seconds();
  }
  s.step = steps_done_ + 1;
  s.loss = sums[0] / static_cast<double>(micro_batches);
  s.aux_loss = sums[1] / static_cast<double>(micro_batches);
  if (!std::isfinite(s.loss))
    throw Error("training loss became " + std::string(std::isnan(s.loss) ? "NaN" : "infinite") + " at step " +
                std::to_string(s.step) + "; lower train.lr, raise train.warmup_steps or set train.grad_clip");
  return s;
}

// A whole-model host vector (full layout) of a block laid out as this rank's parameters: the sharded expert
// tensors gathered over the expert-parallel group, in rank order (= expert order).
std::vector<float> Trainer::gather_full(const float* block) const {
  const Transformer& m = *model_;
  const std::vector<float> local = backend_.download_vector(block, m.num_params());
  if (!ep_group_) return local;
  std::vector<float> full(m.full_layout().total());
  for (const auto& e : m.layout().entries()) {
    const ParamEntry& f = m.full_layout().find(e.name);
    const int64_t n = e.shape.numel();
    if (n == f.shape.numel()) std::copy(local.begin() + e.offset, local.begin() + e.offset + n, full.begin() + f.offset);
    else ep_group_->allgather(local.data() + e.offset, n, full.data() + f.offset);
  }
  return full;
}

void Trainer::save(const std::string& dir) const {
  CheckpointState st;
  st.step = steps_done_;
  st.adam_step = optimizer_->steps_taken();
  st.data_rng = data_rng_.state();
  st.router_bias = model_->router_biases();
  if (!ep_group_) {
    // Data-parallel replicas hold the same weights and moments: rank 0 writes them, the others wait until it has.
    if (comm_->rank() == 0)
      save_checkpoint(dir, config_, model_->layout(), backend_, std::as_const(*model_).params(),
                      optimizer_->first_moment(), optimizer_->second_moment(), st);
  } else {
    // Expert shards gathered into the whole model, so a checkpoint is the same whatever the world size and loads
    // into one process (eval, export) or another layout of processes.
    const std::vector<float> p = gather_full(std::as_const(*model_).params()), m = gather_full(optimizer_->first_moment()),
                             v = gather_full(optimizer_->second_moment());
    if (comm_->rank() == 0) {
      const int64_t n = static_cast<int64_t>(p.size());
      BackendArray<float> bp(backend_, n), bm(backend_, n), bv(backend_, n);
      backend_.upload(bp.data(), p.data(), n);
      backend_.upload(bm.data(), m.data(), n);
      backend_.upload(bv.data(), v.data(), n);
      save_checkpoint(dir, config_, model_->full_layout(), backend_, bp.data(), bm.data(), bv.data(), st);
    }
  }
  comm_->barrier();
}

// Loads a whole-model checkpoint, keeping this rank's share under expert parallelism.
CheckpointState Trainer::load_into(const std::string& dir, bool optimizer_state) {
  if (!ep_group_)
    return load_checkpoint(dir, model_->layout(), backend_, model_->params(),
                           optimizer_state ? optimizer_->first_moment() : nullptr,
                           optimizer_state ? optimizer_->second_moment() : nullptr);
  const int64_t n = model_->full_layout().total();
  BackendArray<float> bp(backend_, n), bm(backend_, n), bv(backend_, n);
  const CheckpointState st = load_checkpoint(dir, model_->full_layout(), backend_, bp.data(),
                                             optimizer_state ? bm.data() : nullptr, optimizer_state ? bv.data() : nullptr);
  const auto put = [&](const BackendArray<float>& full, float* local) {
    const std::vector<float> mine = model_->local_from_full(backend_.download_vector(full.data(), n));
    backend_.upload(local, mine.data(), static_cast<int64_t>(mine.size()));
  };
  put(bp, model_->params());
  if (optimizer_state) {
    put(bm, optimizer_->first_moment());
    put(bv, optimizer_->second_moment());
  }
  return st;
}

void Trainer::load(const std::string& dir) {
  const CheckpointState st = load_into(dir, /*optimizer_state=*/true);
  model_->set_router_biases(st.router_bias);
  steps_done_ = st.step;
  optimizer_->set_steps_taken(st.adam_step);
  data_rng_.set_state(st.data_rng);
}

InitFromReport Trainer::init_from(const std::string& source) {
  std::vector<float> full = gather_full(std::as_const(*model_).params());
  const InitFromReport report = init_from_checkpoint(source, config_.model, model_->full_layout(), full);
  const std::vector<float> local = ep_group_ ? model_->local_from_full(full) : std::move(full);
  backend_.upload(model_->params(), local.data(), static_cast<int64_t>(local.size()));
  return report;
}

// The router's selection biases come too: they are part of how the trained model routes.
void Trainer::load_weights(const std::string& dir) {
  model_->set_router_biases(load_into(dir, /*optimizer_state=*/false).router_bias);
}

double Trainer::evaluate(const TokenFile& data, int64_t max_batches) {
  return mean_window_loss(*model_, data, config_.train.batch_size, max_batches, comm_).loss;
}

// The gradient block summed over the ranks, through host memory (download, sum in rank order, upload).
// Under expert parallelism the replicated parameters' gradients are summed over every rank, an expert shard's over
// the ranks holding that shard (the rows of every rank of its group already reached it).
void Trainer::plan_gradient_buckets() {
  const int64_t cap = std::max<int64_t>(1, static_cast<int64_t>(config_.dist.bucket_mb * (1 << 20) / sizeof(float)));
  Communicator* expert_group = ep_group_ ? replica_group_.get() : comm_;
  for (auto [runs, group] : {std::pair{&dense_runs_, comm_}, std::pair{&expert_runs_, expert_group}}) {
    if (group->size() == 1) continue;
    int64_t filled = cap;  // of the open bucket (none yet)
    for (auto run = runs->rbegin(); run != runs->rend(); ++run) {
      int64_t end = run->first + run->second;  // cut from the run's end towards its start
      while (end > run->first) {
        if (filled == cap) {
          buckets_.push_back({group, {}});
          filled = 0;
        }
        const int64_t n = std::min(end - run->first, cap - filled);
        buckets_.back().segments.push_back({end - n, n});
        filled += n;
        end -= n;
      }
    }
  }
}

void Trainer::allreduce_gradients() {
  float* grads = model_->grads();
  for (const GradientBucket& b : buckets_) b.group->allreduce_sum(backend_, grads, b.segments);
}

// The global gradient norm's square: replicated parameters once, every expert shard of the group once.
double Trainer::grad_sum_squares() {
  if (!ep_group_) return model_->grad_sum_squares();
  const float* g = std::as_const(*model_).grads();
  double sums[2] = {0.0, 0.0};
  for (auto [offset, n] : dense_runs_) sums[0] += backend_.sum_squares(g + offset, n);
  for (auto [offset, n] : expert_runs_) sums[1] += backend_.sum_squares(g + offset, n);
  ep_group_->allreduce_sum(&sums[1], 1);
  return sums[0] + sums[1];
}

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

}  // namespace

namespace {

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

}  // namespace

namespace {

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

}  // namespace

TrainSummary run_training(const Config& config, std::ostream& lead_log, bool resume) {
  // Under mpirun every process runs this; rank 0 alone writes the run directory and the progress lines.
  Communicator& comm = world_communicator();
  const bool lead = comm.rank() == 0;
  // The run directory first, before any collective: a rank 0 that cannot write it fails here with the reason, and
  // the job ends (cli/report_errors.h) instead of waiting for it.
  const std::filesystem::path out_dir(config.train.out_dir);
  if (lead)
    ensure_writable_directory(out_dir.string(), "train.out_dir",
                              "choose a directory you can write, e.g. --set train.out_dir=runs/NAME");
  const TestFault fault = test_fault_from_environment(comm.rank());
  std::ostream null_log(nullptr);
  std::ostream& log = lead ? lead_log : null_log;
  const DataConfig data = resolve_data_paths(config.data);
  if (data.train_path.empty())
    throw Error("no training data: set data.dir to a `moelab data prepare` directory, or data.train_path to a "
                "token file");
  auto backend = make_backend(config.train.backend, static_cast<int>(config.train.threads));
  TokenFile train_data(data.train_path, data.dtype);
  check_vocab(train_data, config.model);
  // Evaluation sets: validation first, then each out-of-domain set, named by file stem.
  std::vector<std::pair<std::string, std::unique_ptr<TokenFile>>> eval_sets;
  if (!data.val_path.empty()) eval_sets.emplace_back("val", std::make_unique<TokenFile>(data.val_path, data.dtype));
  for (const std::string& path : data.ood_paths) {
    std::string name = std::filesystem::path(path).stem().string();
    if (name.rfind("ood_", 0) == 0) name = name.substr(4);
    eval_sets.emplace_back("ood_" + name, std::make_unique<TokenFile>(path, data.dtype));
  }
  for (auto& [name, file] : eval_sets) check_vocab(*file, config.model);

  comm.barrier();
  const std::string existing = find_checkpoint(out_dir.string());
  if (!existing.empty() && !resume)
    throw Error("run directory '" + out_dir.string() + "' already holds a checkpoint; pass --resume to continue it, "
                "or choose another train.out_dir");
  Trainer trainer(config, *backend, &comm);
  if (resume && !existing.empty()) {
    trainer.load(existing);
    if (lead) truncate_metrics(out_dir / "metrics.jsonl", trainer.steps_done());
    log << "resuming from " << existing << " at step " << trainer.steps_done() << "\n";
  } else {
    if (lead) std::filesystem::remove(out_dir / "metrics.jsonl");
    if (!config.train.init_from.empty()) {
      const InitFromReport r = trainer.init_from(config.train.init_from);
      log << "initialised from " << r.checkpoint << ": " << r.copied << " tensors copied";
      if (r.upcycled > 0) log << ", " << r.upcycled << " expert tensors upcycled from the dense FFNs";
      if (!r.fresh.empty()) log << ", " << r.fresh.size() << " (routers, shared experts) at the configured init";
      log << "\n";
    }
  }
  std::ofstream metrics;  // rank 0's; an unopened stream (writes go nowhere) on the others
  if (lead) {
    write_file_atomic((out_dir / "config.toml").string(), to_toml(config));
    metrics.open(out_dir / "metrics.jsonl", std::ios::app);
    if (!metrics) throw Error("cannot write metrics to '" + (out_dir / "metrics.jsonl").string() + "'");
  }
  const std::string checkpoint_dir = (out_dir / "checkpoint").string();
  const auto& t = config.train;
  const int64_t tokens_per_step = t.batch_size * t.grad_accum * config.model.seq_len * comm.size();
  const double flops_per_token = training_flops_per_token(config.model, t.flops_convention);
  // The peak of one process's GEMMs (measured by rank 0 while the others wait), times the processes.
  double peak = t.peak_flops > 0 ? t.peak_flops : lead ? measure_gemm_peak(*backend, 0.3) : 0.0;
  comm.broadcast(&peak, 1, 0);
  if (t.peak_flops <= 0) peak *= comm.size();
  char line[512];
  std::snprintf(line, sizeof line,
                "moelab train: %.2fM parameters, %ld steps x %ld tokens, %d process%s x %d threads, %.1f MFLOP/token "
                "(%s), peak %.1f GFLOP/s (%s), out %s\n",
                trainer.model().full_layout().total() / 1e6, static_cast<long>(t.steps), static_cast<long>(tokens_per_step),
                comm.size(), comm.size() == 1 ? "" : "es", backend->threads(), flops_per_token / 1e6,
                to_string(t.flops_convention).c_str(), peak / 1e9,
                t.peak_flops > 0 ? "configured" : "measured fp32 GEMM", out_dir.c_str());
  log << line << std::flush;
  metrics << nlohmann::json{{"step", trainer.steps_done()}, {"flops_per_token", flops_per_token},
                            {"flops_convention", to_string(t.flops_convention)}, {"peak_flops", peak}}.dump() << "\n";
  const auto& moe = config.model.moe;
  const int64_t active = active_parameter_count(trainer.model().full_layout(), config.model);
  if (moe.enabled()) {
    int64_t moe_layers = 0;
    for (int64_t i = 0; i < config.model.n_layers; ++i) moe_layers += moe.is_moe_layer(i);
    std::snprintf(line, sizeof line,
                  "MoE: %ld of %ld layers, %s, %ld routed experts of hidden %ld (G = %ld), top-%ld, %ld shared; "
                  "sparsity S = %.3f; parameters %.2fM total, %.2fM active\n",
                  static_cast<long>(moe_layers), static_cast<long>(config.model.n_layers),
                  to_string(moe.router).c_str(), static_cast<long>(moe.routed_experts()),
                  static_cast<long>(ModelPlan(config.model).expert_hidden), static_cast<long>(moe.granularity),
                  static_cast<long>(moe.active_experts()), static_cast<long>(moe.shared_experts), moe.sparsity(),
                  trainer.model().full_layout().total() / 1e6, active / 1e6);
    log << line << std::flush;
    if (config.dist.expert_parallel > 1) {
      std::snprintf(line, sizeof line, "expert parallelism: each MoE layer's %ld routed experts over %ld processes "
                    "(%ld each), %d group%s\n", static_cast<long>(moe.routed_experts()),
                    static_cast<long>(config.dist.expert_parallel),
                    static_cast<long>(moe.routed_experts() / config.dist.expert_parallel),
                    static_cast<int>(comm.size() / config.dist.expert_parallel),
                    comm.size() / config.dist.expert_parallel == 1 ? "" : "s");
      log << line << std::flush;
    }
  }

  // Loss on every evaluation set, logged as one metrics line {"step", "<set>_loss"...} and one progress line.
  auto evaluate_all = [&](int64_t step) {
    nlohmann::json rec = {{"step", step}};
    std::string text = "step " + std::to_string(step) + " | eval";
    for (auto& [name, file] : eval_sets) {
      const double loss = trainer.evaluate(*file, t.eval_batches);
      rec[name + "_loss"] = loss;
      char part[96];
      std::snprintf(part, sizeof part, " | %s %.4f (ppl %.2f)", name.c_str(), loss, std::exp(loss));
      text += part;
    }
    metrics << rec.dump() << "\n" << std::flush;
    log << text << "\n" << std::flush;
    return rec;
  };

  TrainSummary summary;
  Timer total;
  bool warned_peak = false;
  double window_seconds = 0;
  int64_t window_steps = 0;
  for (int64_t s = trainer.steps_done(); s < t.steps; ++s) {
    if (s + 1 == fault.step) fault.strike(comm.rank());
    const StepStats st = trainer.step(train_data);
    summary.losses.push_back(st.loss);
    window_seconds += st.seconds;
    ++window_steps;
    const double tok_s = window_steps * tokens_per_step / std::max(window_seconds, 1e-9);
    nlohmann::json rec = {{"step", st.step},
                          {"loss", st.loss},
                          {"lr", st.lr},
                          {"grad_norm", st.grad_norm},
                          {"tokens", st.step * tokens_per_step},
                          {"flops", flops_per_token * static_cast<double>(st.step * tokens_per_step)},
                          {"step_seconds", st.seconds},
                          {"elapsed_seconds", total.seconds()}};
    const bool log_step = trainer.logs_step(st.step);
    if (moe.enabled() && log_step) {  // the router's statistics, computed for logging steps only
      rec["aux_loss"] = st.aux_loss;
      rec["router"] = router_stats_json(trainer.model());
    }
    if (log_step) {  // throughput over the steps since the last progress line
      rec["flops_per_second"] = tok_s * flops_per_token;
      rec["mfu"] = tok_s * flops_per_token / peak;
    }
    metrics << rec.dump() << "\n";
    if (log_step) {
      metrics.flush();
      const double eta = (t.steps - st.step) * (total.seconds() / st.step);
      std::snprintf(line, sizeof line, "step %6ld/%ld | loss %.4f | lr %.2e | grad-norm %.3f | %.0f tok/s | "
                    "%.2f GFLOP/s | MFU %.1f%% | eta %s\n", static_cast<long>(st.step), static_cast<long>(t.steps),
                    st.loss, st.lr, st.grad_norm, tok_s, tok_s * flops_per_token / 1e9,
                    100.0 * tok_s * flops_per_token / peak, format_duration(eta).c_str());
      log << line << std::flush;
      if (tok_s * flops_per_token > peak && !warned_peak && t.peak_flops <= 0) {
        warned_peak = true;
        log << "note: the achieved rate exceeds the GEMM peak measured at start-up (" << peak / 1e9
            << " GFLOP/s): the machine was busy then. Set train.peak_flops for a stable MFU.\n";
      }
      window_seconds = 0;
      window_steps = 0;
    }
    if (t.checkpoint_every > 0 && st.step % t.checkpoint_every == 0 && st.step != t.steps) {
      metrics.flush();
      trainer.save(checkpoint_dir);
    }
    if (!eval_sets.empty() && t.eval_every > 0 && st.step % t.eval_every == 0 && st.step != t.steps)
      evaluate_all(st.step);
  }
  summary.steps = t.steps;
  summary.seconds = total.seconds();
  summary.final_loss = summary.losses.empty() ? 0.0 : summary.losses.back();
  summary.tokens_per_second =
      static_cast<double>(summary.losses.size() * tokens_per_step) / std::max(summary.seconds, 1e-9);
  metrics.flush();
  if (trainer.steps_done() > 0) trainer.save(checkpoint_dir);
  if (!eval_sets.empty()) {
    const nlohmann::json rec = evaluate_all(trainer.steps_done());
    if (rec.contains("val_loss")) summary.val_loss = rec["val_loss"].get<double>();
  }
  return summary;
}

}  // namespace moelab
