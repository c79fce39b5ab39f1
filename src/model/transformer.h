#pragma once
// The decoder-only transformer: pre-norm blocks of attention and FFN on a residual stream, a final norm and a
// (tied or untied) output head. Parameters and gradients live in two blocks laid out by ParamLayout;
// activations for a batch of up to `max_batch` sequences in one Arena, all sized once at construction.
#include <map>
#include <memory>
#include <vector>

#include "backend/backend.h"
#include "backend/arena.h"
#include "config/config.h"
#include "model/param_layout.h"
#include "model/params.h"
#include "model/plan.h"
#include "dist/comm.h"
#include "moe/moe.h"
#include "moe/moe_layer.h"

namespace moelab {

// The model's activation buffers as typed views, each of the full (max_batch, seq_len, ...) size: every block's
// saved activations, and the buffers the blocks share. Empty tensors for what this model does not use.
struct BlockBuffers {
  Tensor ln1, ln1_mean, ln1_rstd, qkv, probs, atty, res_att, ln2, ln2_mean, ln2_rstd, fc_pre, fc_act, res_ffn;
  MoeActivations moe;        // MoE blocks (fc_pre, fc_act empty)
  Tensor qk_saved, qk_rstd;  // model.qk_norm: (B, T, 2C) q and k before the norm, (B, T, 2H) their 1/rms
};
struct ModelBuffers {
  Tensor embed, lnf, lnf_mean, lnf_rstd, logits, losses;            // forward
  Tensor d_res, d_ln, d_qkv, d_probs, d_atty, d_fc_pre, d_fc_act;  // backward scratch, shared by blocks
  Tensor sinusoidal;                                                // (T, C) fixed table, or empty
  MoeScratch moe;                                                   // MoE backward scratch, shared by MoE blocks
};

class Transformer {
 public:
  // expert_group: expert parallelism (dist.expert_parallel): this rank holds its share of every MoE layer's routed
  // experts, and forward and backward exchange rows with the group's other ranks, which must run them too.
  Transformer(const ModelConfig& config, Backend& backend, int64_t max_batch, Communicator* expert_group = nullptr);
  ~Transformer();
  Transformer(const Transformer&) = delete;
  Transformer& operator=(const Transformer&) = delete;

  const ModelConfig& config() const { return config_; }
  const ParamLayout& layout() const { return layout_; }
  // The whole model's layout (the checkpoints'): layout() itself unless the experts are sharded, in which case
  // layout() holds this rank's slice of each routed-expert tensor (expert_shard() of expert_shards()).
  const ParamLayout& full_layout() const { return full_layout_; }
  int64_t expert_shards() const { return layout_.total() == full_layout_.total() ? 1 : plan_expert_shards(); }
  int64_t expert_shard() const;
  // A whole-model host vector (full_layout) cut to this rank's parameters (layout).
  std::vector<float> local_from_full(const std::vector<float>& full) const;
  // Seconds the MoE layers spent exchanging rows with the expert-parallel group since the last call.
  double take_exchange_seconds();
  Backend& backend() { return backend_; }
  int64_t num_params() const { return layout_.total(); }
  // The parameter block (backend memory), declared a matrix-product operand (Backend::declare_use).
  float* params() { return params_; }
  const float* params() const { return params_; }
  // Write access: the next zero_grad() clears them again (see grads_were_zeroed).
  float* grads() {
    grad_state_ = GradState::Accumulated;
    expert_sq_valid_ = false;
    return grads_;
  }
  const float* grads() const { return grads_; }
  // Sum of squares of the gradient block (the global gradient norm's square). After a backward, the MoE experts'
  // weight gradients are not read again: the products that wrote them summed them (GemmProblem::c_sum_squares).
  double grad_sum_squares();

  // Normal(0, init_std) weights (scaled on residual projections), zero biases, unit norm weights.
  void init_weights(uint64_t seed);
  // The next backward() starts the gradients afresh: it adds to a zeroed block, or overwrites the weight matrices'
  // gradients where the caller left them (grads_were_zeroed with except_matrices).
  void zero_grad();
  // The caller zeroed the gradient block itself (the optimizer clears it as it reads it): the next zero_grad()
  // has nothing to do, unless a backward() comes first. With except_matrices it cleared every gradient but those
  // of the weight matrices (ParamKind::Matrix), which the next backward overwrites instead of adding to: each is
  // written by one product per micro-batch (an MoE expert's by one per expert), and the first product of a step
  // then neither reads zeros nor has them written before it (8 of the ~42 bytes a step moves per parameter).
  void grads_were_zeroed(bool except_matrices = false) {
    grad_state_ = except_matrices ? GradState::MatricesStale : GradState::Zero;
    expert_sq_valid_ = false;
  }

  // tokens, targets: (batch, seq_len) host arrays, batch <= max_batch; targets may be null (logits only) and
  // a negative target marks a position excluded from the loss. Returns the mean loss over counted positions.
  // With backward_scale != 0 the logits are replaced by backward_scale * dloss/dlogits, ready for backward().
  double forward(const int32_t* tokens, const int32_t* targets, int64_t batch, float backward_scale = 0.f);
  // Accumulates parameter gradients of backward_scale * mean loss of the last forward.
  void backward();

  // Incremental decoding of one sequence (generation), through the same blocks as forward(): decode_reset()
  // starts at position 0 (and allocates the KV cache, (n_layers, seq_len, C) keys and values, on first use);
  // decode(token) feeds `token` at the next position, attending to the cached keys and values of the positions
  // before it, and leaves the logits for the position after it in logits() (1, 1, V). A forward() ends decoding.
  // MoE blocks route the one token on its own: token choice never drops it and expert choice gives it to every
  // expert (capacity 1 of a group of 1), so decoding equals a batch-1 forward when that forward drops nothing.
  void decode_reset();
  void decode(int32_t token);
  int64_t decode_position() const { return decode_position_; }

  // Logits (batch, seq, vocab) of the last forward (only valid when it was called without backward_scale), a view
  // of backend memory; download_logits() brings them to the host.
  Tensor logits() const;
  std::vector<float> download_logits();
  // Weighted auxiliary loss of the last forward: sum over MoE layers of MoeStats::weighted_aux, computed now from
  // the router statistics (a pass over each MoE layer's scores on the backend).
  double last_aux_loss() const;

  // Router jitter (moe.router_jitter): the next training forward (backward_scale != 0) draws its noise from this
  // seed (each MoE layer from the seed and its index); every training forward then moves the seed on. The trainer
  // sets it per micro-batch from train.seed and the step, so a resumed run draws the same noise.
  void set_noise_seed(uint64_t seed) { noise_seed_ = seed; }

  // Auxiliary-loss-free balancing (moe.balance = "bias"): each MoE layer's selection biases (E), by layer index.
  // They are training state, not parameters: no gradient, no weight decay; checkpoints keep them.
  std::map<int64_t, std::vector<float>> router_biases() const;
  // Throws moelab::Error naming the layer when one is missing, extra or of the wrong size.
  void set_router_biases(const std::map<int64_t, std::vector<float>>& biases);
  // After an optimizer step: b_e += rate * sign(mean load - load_e), the loads being the router's top-k choices per
  // expert over the training forwards since the last update, summed over the ranks of `comm` (may be null). Starts
  // the next step's counts afresh. Nothing without bias balancing.
  void update_router_biases(Communicator* comm);
  // Router statistics of the last forward, computed now: one entry per layer (empty tokens_per_expert for dense
  // layers).
  std::vector<MoeStats> moe_statistics() const;
  int64_t last_batch() const { return batch_; }
  int64_t counted_positions() const { return counted_; }

 private:
  // Typed views, built once at construction: each block's parameters (or gradients), each block's saved
  // activations and the shared buffers at full (max_batch, seq_len) size. window() cuts the current window.
  // Typed views of the parameters (or gradients), from the parameter table (model/params.h).
  using BlockWeights = BlockParams;
  using ModelWeights = ModelParams;
  using BlockActivations = BlockBuffers;
  using Buffers = ModelBuffers;
  ModelWeights weight_views(float* base) const;
  Tensor window(Tensor full) const;
  MoeDims moe_dims(int64_t block) const;  // of the current window
  MoeActivations moe_activations(int64_t block) const;
  MoeScratch moe_scratch(int64_t block) const;
  Tensor forward_window(int64_t first_position);
  void block_forward(int64_t layer, Tensor residual, int64_t first_position);
  void declare_buffer_uses();
  void cached_attention(int64_t layer, Tensor atty, Tensor qkv, int64_t position);

  ModelConfig config_;
  ModelPlan plan_;
  Backend& backend_;
  ParamLayout layout_;
  ParamLayout full_layout_;
  // Per layer: the MoE layer (router, balancing state, token dispatcher), or null for a dense block.
  std::vector<std::unique_ptr<MoeLayer>> moe_layers_;
  bool expert_parallel_ = false;  // the MoE layers dispatch to an expert-parallel group
  int64_t plan_expert_shards() const {
    for (const auto& b : plan_.blocks)
      if (b.moe) return b.moe_dims.expert_shards;
    return 1;
  }
  int64_t max_batch_;
  float* params_ = nullptr;
  float* grads_ = nullptr;
  Arena acts_;
  ModelWeights weights_, grad_views_;
  std::vector<BlockActivations> blocks_;
  Buffers buffers_;
  BackendArray<int32_t> tokens_, targets_;  // (max_batch, seq_len) of the last forward, uploaded
  int64_t batch_ = 0;
  int64_t seq_ = 0;                 // positions per sequence in the current window: seq_len, or 1 when decoding
  int64_t decode_position_ = -1;    // the next position decode() feeds; -1 outside decoding
  BackendArray<float> k_cache_, v_cache_;  // (n_layers, seq_len, C) keys and values of decoded positions
  int64_t counted_ = 0;
  float backward_scale_ = 0.f;
  uint64_t noise_seed_ = 0x6a09e667f3bcc909ULL;
  uint64_t forward_noise_ = 0;      // the current training forward's noise seed (0: no jitter)
  // Per MoE layer (2E, else empty): the sums of squares of its experts' fc1 and fc2 weight gradients as the last
  // backward left them; valid until the gradient block is written by anything else.
  BackendArray<double> expert_dweight_sq_;   // (MoE layers, 2E) in backend memory
  std::vector<int64_t> expert_sq_offset_;    // per layer: its 2E sums' offset in expert_dweight_sq_, or -1
  bool expert_sq_valid_ = false;
  // Activations a training forward holds for its backward (backend.h); released when the backward is done, or by
  // the next forward when none came.
  // Zero: the gradient block is all zeros. MatricesStale: all zeros but the weight matrices' gradients, which the
  // next backward overwrites. Accumulated: anything else (the next zero_grad() fills it with zeros).
  enum class GradState { Zero, MatricesStale, Accumulated };
  GradState grad_state_ = GradState::Accumulated;
};

}  // namespace moelab
