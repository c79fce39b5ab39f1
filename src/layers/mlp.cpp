#include "layers/layers.h"

namespace moelab {

void mlp_forward(Backend& be, FfnKind kind, Tensor out, Tensor pre, Tensor act, Tensor in, Tensor w1, Tensor b1,
                 Tensor w2, Tensor b2) {
  const int64_t n = in.rows(), f = act.cols();
  MOELAB_CHECK(pre.cols() == (kind == FfnKind::Gelu ? f : 2 * f),
               kind == FfnKind::Gelu ? "GELU pre-activation width" : "SwiGLU pre-activation must be [gate | up]");
  linear_forward(be, pre, in, w1, b1);
  if (kind == FfnKind::Gelu)
    be.gelu_forward(act.data, pre.data, n * f);
  else
    be.swiglu_forward(act.data, pre.data, n, f);
  linear_forward(be, out, act, w2, b2, /*accumulate_out=*/true);
}

void mlp_backward(Backend& be, FfnKind kind, Tensor din, Tensor dw1, Tensor db1, Tensor dw2, Tensor db2, Tensor dpre,
                  Tensor dact, Tensor dout, Tensor in, Tensor pre, Tensor act, Tensor w1, Tensor w2,
                  bool accumulate_dweights) {
  const int64_t n = in.rows(), f = act.cols();
  linear_backward(be, dact, dw2, db2, dout, act, w2, /*accumulate_din=*/false, accumulate_dweights);
  if (kind == FfnKind::Gelu)
    be.gelu_backward(dpre.data, pre.data, dact.data, n * f);
  else
    be.swiglu_backward(dpre.data, pre.data, dact.data, n, f);
  linear_backward(be, din, dw1, db1, dpre, in, w1, /*accumulate_din=*/true, accumulate_dweights);
}

// act feeds the fc2 product in the forward and the fc2 weight gradient's in the backward, nothing else (the
// activation's backward reads pre); dpre feeds the two products of the fc1 backward, and fc1's bias gradient when
// there is one.
void mlp_declare_uses(Backend& be, Tensor act, Tensor dpre, bool fc1_bias) {
  be.declare_use(act.data, act.numel(), Backend::BufferUse::MatmulOperandOnly);
  be.declare_use(dpre.data, dpre.numel(),
                 fc1_bias ? Backend::BufferUse::MatmulOperand : Backend::BufferUse::MatmulOperandOnly);
}

}  // namespace moelab
