#include "train/trainer.h"

#include <algorithm>
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

Trainer::Trainer(const Config& config, Backend& backend)
    : config_(config), backend_(backend), data_rng_(static_cast<uint64_t>(config.train.seed) ^ 0x5eed0da7aULL) {
  backend_.set_matmul_precision(config.train.precision);
  model_ = std::make_unique<Transformer>(config.model, backend, config.train.batch_size);
  model_->init_weights(static_cast<uint64_t>(config.train.seed));
  optimizer_ = std::make_unique<AdamW>(model_->layout(), config.train, backend);
}

StepStats Trainer::step(const TokenFile& data) {
  const int64_t B = config_.train.batch_size, T = config_.model.seq_len;
  return step([&](std::vector<int32_t>& tokens, std::vector<int32_t>& targets) {
    sample_batch(data, data_rng_, B, T, tokens, targets);
  });
}

StepStats Trainer::step(const BatchSource& next_batch) {
  Timer timer;
  const auto& t = config_.train;
  const int64_t B = t.batch_size, T = config_.model.seq_len;
  model_->zero_grad();
  double loss_sum = 0.0, aux_sum = 0.0;
  for (int64_t micro = 0; micro < t.grad_accum; ++micro) {
    next_batch(tokens_, targets_);
    MOELAB_CHECK(static_cast<int64_t>(tokens_.size()) == B * T && tokens_.size() == targets_.size(),
                 "micro-batch must be (batch_size, seq_len)");
    loss_sum += model_->forward(tokens_.data(), targets_.data(), B, 1.f / static_cast<float>(t.grad_accum));
    aux_sum += model_->last_aux_loss();
    model_->backward();
  }
  StepStats s;
  s.step = steps_done_ + 1;
  s.loss = loss_sum / static_cast<double>(t.grad_accum);
  s.aux_loss = aux_sum / static_cast<double>(t.grad_accum);
  if (!std::isfinite(s.loss))
    throw Error("training loss became " + std::string(std::isnan(s.loss) ? "NaN" : "infinite") + " at step " +
                std::to_string(s.step) + "; lower train.lr, raise train.warmup_steps or set train.grad_clip");
  s.grad_norm = std::sqrt(model_->grad_sum_squares());
  s.lr = learning_rate(t, steps_done_);
  optimizer_->step(model_->params(), model_->grads(), s.lr, clip_factor(s.grad_norm, t.grad_clip),
                   AdamW::Grads::ZeroExceptMatrices);
  model_->grads_were_zeroed(/*except_matrices=*/true);
  ++steps_done_;
  s.seconds = timer.seconds();
  return s;
}

void Trainer::save(const std::string& dir) const {
  CheckpointState st;
  st.step = steps_done_;
  st.adam_step = optimizer_->steps_taken();
  st.data_rng = data_rng_.state();
  save_checkpoint(dir, config_, model_->layout(), backend_, std::as_const(*model_).params(),
                  optimizer_->first_moment(), optimizer_->second_moment(), st);
}

void Trainer::load(const std::string& dir) {
  const CheckpointState st = load_checkpoint(dir, model_->layout(), backend_, model_->params(), optimizer_->first_moment(),
                                             optimizer_->second_moment());
  steps_done_ = st.step;
  optimizer_->set_steps_taken(st.adam_step);
  data_rng_.set_state(st.data_rng);
}

void Trainer::load_weights(const std::string& dir) {
  load_checkpoint(dir, model_->layout(), backend_, model_->params(), nullptr, nullptr);
}

double Trainer::evaluate(const TokenFile& data, int64_t max_batches) {
  return mean_window_loss(*model_, data, config_.train.batch_size, max_batches).loss;
}

namespace {

// Router statistics of every MoE layer, for metrics.jsonl.
nlohmann::json router_stats_json(const Transformer& model) {
  nlohmann::json layers = nlohmann::json::array();
  const auto& stats = model.moe_stats();
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
                      {"z_loss", s.z_loss}});
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

TrainSummary run_training(const Config& config, std::ostream& log, bool resume) {
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
  for (size_t begin = 0; begin < data.ood_paths.size();) {
    size_t end = data.ood_paths.find(',', begin);
    if (end == std::string::npos) end = data.ood_paths.size();
    const std::string path = data.ood_paths.substr(begin, end - begin);
    if (!path.empty()) {
      std::string name = std::filesystem::path(path).stem().string();
      if (name.rfind("ood_", 0) == 0) name = name.substr(4);
      eval_sets.emplace_back("ood_" + name, std::make_unique<TokenFile>(path, data.dtype));
    }
    begin = end + 1;
  }
  for (auto& [name, file] : eval_sets) check_vocab(*file, config.model);

  const std::filesystem::path out_dir(config.train.out_dir);
  std::filesystem::create_directories(out_dir);
  const std::string existing = find_checkpoint(out_dir.string());
  if (!existing.empty() && !resume)
    throw Error("run directory '" + out_dir.string() + "' already holds a checkpoint; pass --resume to continue it, "
                "or choose another train.out_dir");
  Trainer trainer(config, *backend);
  if (resume && !existing.empty()) {
    trainer.load(existing);
    truncate_metrics(out_dir / "metrics.jsonl", trainer.steps_done());
    log << "resuming from " << existing << " at step " << trainer.steps_done() << "\n";
  } else {
    std::filesystem::remove(out_dir / "metrics.jsonl");
  }
  write_file_atomic((out_dir / "config.toml").string(), to_toml(config));
  std::ofstream metrics(out_dir / "metrics.jsonl", std::ios::app);
  if (!metrics) throw Error("cannot write metrics to '" + (out_dir / "metrics.jsonl").string() + "'");
  const std::string checkpoint_dir = (out_dir / "checkpoint").string();
  const auto& t = config.train;
  const int64_t tokens_per_step = t.batch_size * t.grad_accum * config.model.seq_len;
  FlopConvention convention = FlopConvention::Exact;
  for (FlopConvention c : all_flop_conventions())
    if (to_string(c) == t.flops_convention) convention = c;
  const double flops_per_token = training_flops_per_token(config.model, convention);
  const double peak = t.peak_flops > 0 ? t.peak_flops : measure_gemm_peak(*backend, 0.3);
  char line[512];
  std::snprintf(line, sizeof line,
                "moelab train: %.2fM parameters, %ld steps x %ld tokens, %d threads, %.1f MFLOP/token (%s), "
                "peak %.1f GFLOP/s (%s), out %s\n",
                trainer.model().num_params() / 1e6, static_cast<long>(t.steps), static_cast<long>(tokens_per_step),
                backend->threads(), flops_per_token / 1e6, t.flops_convention.c_str(), peak / 1e9,
                t.peak_flops > 0 ? "configured" : "measured fp32 GEMM", out_dir.c_str());
  log << line << std::flush;
  metrics << nlohmann::json{{"step", trainer.steps_done()}, {"flops_per_token", flops_per_token},
                            {"flops_convention", t.flops_convention}, {"peak_flops", peak}}.dump() << "\n";
  const auto& moe = config.model.moe;
  const int64_t active = active_parameter_count(trainer.model().layout(), config.model);
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
                  trainer.model().num_params() / 1e6, active / 1e6);
    log << line << std::flush;
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
    if (moe.enabled()) {
      rec["aux_loss"] = st.aux_loss;
      if (st.step % t.log_every == 0 || st.step == t.steps) rec["router"] = router_stats_json(trainer.model());
    }
    const bool log_step = st.step % t.log_every == 0 || st.step == t.steps;
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
