#include "model/flops.h"

#include "model/plan.h"

namespace moelab {

double exact_training_flops_per_token(const ModelConfig& m) {
  const ModelPlan plan(m);
  const double C = static_cast<double>(m.d_model), F = static_cast<double>(plan.ffn_hidden);
  const double T = static_cast<double>(m.seq_len), V = static_cast<double>(m.vocab_size);
  const double fc1_width = static_cast<double>(plan.glu) * F;
  // Per token, forward: 2 FLOPs per multiply-add.
  const double per_layer = 2 * C * 3 * C      // qkv projection
                           + 2 * T * C        // scores q k^T (all heads)
                           + 2 * T * C        // probs @ v
                           + 2 * C * C        // output projection
                           + 2 * C * fc1_width + 2 * F * C;  // FFN
  double forward = 2 * C * V;  // output head
  for (int64_t i = 0; i < m.n_layers; ++i) {
    if (!plan.blocks[i].moe) {
      forward += per_layer;
      continue;
    }
    const MoeDims d = plan.moe_dims(i, 1, m.seq_len);
    // Rows each token is dispatched to: k for token choice (an upper bound when capacity drops tokens),
    // E * capacity / batch for expert choice (the batch cancels out).
    const double rows_per_token = m.moe.router == RouterKind::TokenChoice
                                      ? static_cast<double>(d.top_k)
                                      : m.moe.capacity_factor_or_one() * static_cast<double>(d.top_k);
    const double expert_ffn = 2 * C * d.fc1_rows() + 2 * d.expert_hidden * C;
    const double shared_ffn = 2 * C * d.shared_fc1_rows() + 2 * d.shared_hidden * C;
    forward += per_layer - (2 * C * fc1_width + 2 * F * C)  // attention part of the block
               + 2 * C * d.experts                           // router
               + rows_per_token * expert_ffn + shared_ffn;
  }
  return 3 * forward;
}

}  // namespace moelab
