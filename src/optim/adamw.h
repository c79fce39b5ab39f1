#pragma once
// AdamW with decoupled weight decay (torch.optim.AdamW semantics). Moments live in two blocks with the
// model's parameter layout; per-parameter decay follows is_decayed().
#include "backend/backend.h"
#include "config/config.h"
#include "model/param_layout.h"

namespace moelab {

class AdamW {
 public:
  AdamW(const ParamLayout& layout, const TrainConfig& train, Backend& backend);
  ~AdamW();
  AdamW(const AdamW&) = delete;
  AdamW& operator=(const AdamW&) = delete;

  // What step() leaves in the gradient block: it as it was, all zeros (read and cleared in the same pass), or
  // zeros but for the weight matrices' gradients (ParamKind::Matrix; Transformer::grads_were_zeroed).
  enum class Grads { Keep, Zero, ZeroExceptMatrices };
  // One update with learning rate lr; grads are multiplied by grad_scale first (gradient clipping).
  void step(float* params, float* grads, double lr, float grad_scale, Grads after = Grads::Keep);
  int64_t steps_taken() const { return step_; }
  float* first_moment() { return m_; }
  float* second_moment() { return v_; }
  void set_steps_taken(int64_t s) { step_ = s; }

 private:
  const ParamLayout& layout_;
  TrainConfig train_;
  Backend& backend_;
  float* m_ = nullptr;
  float* v_ = nullptr;
  int64_t step_ = 0;
};

// The clip factor min(1, max_norm / (norm + 1e-6)) of a global gradient norm (Transformer::grad_sum_squares), as
// in torch.nn.utils.clip_grad_norm_ (max_norm <= 0 disables clipping).
float clip_factor(double norm, double max_norm);

}  // namespace moelab
