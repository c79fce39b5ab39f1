#include "layers/layers.h"

namespace moelab {

void linear_forward(Backend& be, Tensor out, Tensor in, Tensor weight, Tensor bias, bool accumulate_out) {
  const int64_t n = in.rows(), i = in.cols(), o = weight.dim(0);
  expect_shape(weight, {o, i}, "linear weight");
  MOELAB_CHECK(out.rows() == n && out.cols() == o, "linear out " + out.shape.str());
  be.gemm(Trans::N, Trans::T, n, o, i, 1.f, in.data, i, weight.data, i, accumulate_out ? 1.f : 0.f, out.data, o);
  if (!bias.empty()) {
    expect_shape(bias, {o}, "linear bias");
    be.add_bias(out.data, bias.data, n, o);
  }
}

void linear_backward(Backend& be, Tensor din, Tensor dweight, Tensor dbias, Tensor dout, Tensor in, Tensor weight,
                     bool accumulate_din, bool accumulate_dweight) {
  const int64_t n = in.rows(), i = in.cols(), o = weight.dim(0);
  MOELAB_CHECK(dout.rows() == n && dout.cols() == o, "linear dout " + dout.shape.str());
  // dW (O, I) += dout^T (O, N) @ in (N, I)
  be.gemm(Trans::T, Trans::N, o, i, n, 1.f, dout.data, o, in.data, i, accumulate_dweight ? 1.f : 0.f, dweight.data, i);
  if (!dbias.empty()) be.bias_backward(dbias.data, dout.data, n, o);
  // din (N, I) = dout (N, O) @ W (O, I)
  if (!din.empty()) be.gemm(Trans::N, Trans::N, n, i, o, 1.f, dout.data, o, weight.data, i,
                            accumulate_din ? 1.f : 0.f, din.data, i);
}

}  // namespace moelab
