#include "model/flops.h"

namespace moelab {

double exact_training_flops_per_token(const ModelConfig& m) {
  const double C = static_cast<double>(m.d_model), F = static_cast<double>(m.ffn_hidden());
  const double T = static_cast<double>(m.seq_len), V = static_cast<double>(m.vocab_size);
  const double fc1_width = m.ffn == FfnKind::SwiGLU ? 2 * F : F;
  // Per token, forward: 2 FLOPs per multiply-add.
  const double per_layer = 2 * C * 3 * C      // qkv projection
                           + 2 * T * C        // scores q k^T (all heads)
                           + 2 * T * C        // probs @ v
                           + 2 * C * C        // output projection
                           + 2 * C * fc1_width + 2 * F * C;  // FFN
  const double forward = m.n_layers * per_layer + 2 * C * V;  // + output head
  return 3 * forward;
}

}  // namespace moelab
