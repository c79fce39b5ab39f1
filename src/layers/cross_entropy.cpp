#include "layers/layers.h"

namespace moelab {

double cross_entropy_forward_backward(Backend& be, Tensor logits, Tensor losses, const int32_t* targets,
                                      float grad_scale) {
  const int64_t n = logits.rows(), v = logits.cols();
  MOELAB_CHECK(losses.numel() == n, "losses buffer");
  be.softmax_cross_entropy(logits.data, losses.data, targets, n, v, grad_scale);
  return be.sum(losses.data, n);
}

// The logits themselves come from the head's product and are read by the cross-entropy (or downloaded); what the
// cross-entropy writes over them, the gradient, feeds only the output head's two backward products.
void cross_entropy_declare_uses(Backend& be, Tensor logits) {
  be.declare_use(logits.data, logits.numel(), Backend::BufferUse::MatmulOperandOnly);
}

}  // namespace moelab
