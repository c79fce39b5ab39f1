#include "layers/layers.h"

namespace moelab {

double cross_entropy_forward_backward(Backend& be, Tensor logits, Tensor losses, const int32_t* targets,
                                      float grad_scale, SavedOperands* saved) {
  const int64_t n = logits.rows(), v = logits.cols();
  MOELAB_CHECK(losses.numel() == n, "losses buffer");
  // the logits gradient feeds only the output head's two backward products
  if (saved && grad_scale != 0.f) saved->hold_next(logits.data, logits.numel(), /*operands_only=*/true);
  be.softmax_cross_entropy(logits.data, losses.data, targets, n, v, grad_scale);
  return be.sum(losses.data, n);
}

}  // namespace moelab
