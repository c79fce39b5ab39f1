#include "model/plan.h"

#include "core/error.h"

namespace moelab {

ModelPlan::ModelPlan(const ModelConfig& m, int64_t expert_shards) {
  vocab = m.vocab_size;
  d_model = m.d_model;
  n_heads = m.n_heads;
  head_dim = m.d_model / m.n_heads;
  seq_len = m.seq_len;
  ffn_hidden = m.d_ff > 0 ? m.d_ff : 4 * m.d_model;
  glu = m.ffn == FfnKind::SwiGLU ? 2 : 1;
  if (m.moe.enabled()) expert_hidden = ffn_hidden / m.moe.granularity;
  blocks.resize(m.n_layers);
  for (int64_t i = 0; i < m.n_layers; ++i) {
    BlockPlan& b = blocks[i];
    b.moe = m.moe.is_moe_layer(i);
    if (!b.moe) {
      b.ffn_hidden = ffn_hidden;
      b.ffn_fc1_rows = glu * ffn_hidden;
      continue;
    }
    MoeDims& d = b.moe_dims;
    d.d_model = m.d_model;
    d.experts = m.moe.routed_experts();
    d.top_k = m.moe.active_experts();
    d.expert_hidden = expert_hidden;
    d.shared_hidden = m.moe.shared_experts * expert_hidden;
    d.ffn = m.ffn;
    d.router = m.moe.router;
    d.capacity_factor = m.moe.capacity_factor;
    d.renormalize = m.moe.renormalize;
    d.score = m.moe.score;
    d.gate_scale = static_cast<float>(m.moe.gate_scale);
    d.bias = m.bias;
    d.balance_bias = m.moe.balance == BalanceKind::Bias;
    d.aux_loss_weight = static_cast<float>(m.moe.applied_aux_loss_weight());
    d.seq_aux_loss_weight = static_cast<float>(m.moe.seq_aux_loss_weight);
    d.z_loss_weight = static_cast<float>(m.moe.z_loss_weight);
    d.router_jitter = static_cast<float>(m.moe.router_jitter);
    d.expert_grad_scale = m.moe.expert_grad_scale;
    d.expert_shards = expert_shards;
    if (expert_shards < 1 || d.experts % expert_shards != 0)
      throw Error("dist.expert_parallel = " + std::to_string(expert_shards) + " does not divide the " +
                  std::to_string(d.experts) + " routed experts; choose a divisor of the expert count");
  }
}

MoeDims ModelPlan::moe_dims(int64_t block, int64_t batch, int64_t seq) const {
  MOELAB_CHECK(blocks.at(block).moe, "block " + std::to_string(block) + " is not an MoE block");
  MoeDims d = blocks[block].moe_dims;
  d.batch = batch;
  d.seq = seq;
  return d;
}

int64_t ModelPlan::moe_blocks() const {
  int64_t n = 0;
  for (const auto& b : blocks) n += b.moe;
  return n;
}

}  // namespace moelab
