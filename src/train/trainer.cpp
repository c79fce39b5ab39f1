#include "train/trainer.h"

#include <algorithm>
#include <cmath>
#include <utility>
#include <nlohmann/json.hpp>

#include "core/io.h"
#include "train/checkpoint.h"
#include "core/timer.h"
#include "train/window_loss.h"
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

}  // namespace moelab
