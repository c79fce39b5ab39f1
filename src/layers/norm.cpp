#include "layers/layers.h"

namespace moelab {

void norm_forward(Backend& be, NormKind kind, Tensor out, Tensor mean, Tensor rstd, Tensor in, Tensor weight,
                  Tensor bias, float eps) {
  const int64_t rows = in.rows(), cols = in.cols();
  expect_shape(weight, {cols}, "norm weight");
  MOELAB_CHECK(out.numel() == in.numel() && rstd.numel() == rows, "norm buffers");
  if (kind == NormKind::LayerNorm) {
    be.layernorm_forward(out.data, mean.data, rstd.data, in.data, weight.data, bias.empty() ? nullptr : bias.data,
                         rows, cols, eps);
  } else {
    MOELAB_CHECK(bias.empty(), "RMSNorm has no bias");
    be.rmsnorm_forward(out.data, rstd.data, in.data, weight.data, rows, cols, eps);
  }
}

void norm_backward(Backend& be, NormKind kind, Tensor din, Tensor dweight, Tensor dbias, Tensor dout, Tensor in,
                   Tensor weight, Tensor mean, Tensor rstd) {
  const int64_t rows = in.rows(), cols = in.cols();
  if (kind == NormKind::LayerNorm)
    be.layernorm_backward(din.data, dweight.data, dbias.empty() ? nullptr : dbias.data, dout.data, in.data,
                          weight.data, mean.data, rstd.data, rows, cols);
  else
    be.rmsnorm_backward(din.data, dweight.data, dout.data, in.data, weight.data, rstd.data, rows, cols);
}

}  // namespace moelab
