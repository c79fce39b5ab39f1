#include <cmath>

#include "layers/layers.h"

namespace moelab {

// Per sequence b, the heads are a strided batch: head h of q starts hd elements after head h-1, rows are 3C
// apart; its (T, T) score matrix is T*T elements after the previous head's.
void attention_forward(Backend& be, const AttentionShape& s, Tensor out, Tensor probs, Tensor qkv) {
  const int64_t B = s.batch, T = s.seq, C = s.d_model, H = s.n_heads, hd = s.head_dim();
  expect_shape(qkv, {B, T, 3 * C}, "attention qkv");
  expect_shape(probs, {B, H, T, T}, "attention probs");
  expect_shape(out, {B, T, C}, "attention out");
  if (s.rope) be.rope(qkv.data, B, T, 3 * C, 2 * H, hd, s.rope_theta, /*inverse=*/false, 0);  // q and k heads
  const float scale = 1.f / std::sqrt(static_cast<float>(hd));
  for (int64_t b = 0; b < B; ++b) {
    const float* q = qkv.data + b * T * 3 * C;
    const float* k = q + C;
    float* p = probs.data + b * H * T * T;
    // scores (T, T) = q (T, hd) @ k (T, hd)^T, per head
    be.gemm_strided_batched(Trans::N, Trans::T, T, T, hd, 1.f, q, 3 * C, hd, k, 3 * C, hd, 0.f, p, T, T * T, H);
  }
  be.causal_softmax_forward(probs.data, scale, B * H, T);
  for (int64_t b = 0; b < B; ++b) {
    const float* v = qkv.data + b * T * 3 * C + 2 * C;
    const float* p = probs.data + b * H * T * T;
    // out (T, hd) = probs (T, T) @ v (T, hd), written into the head's columns of (T, C)
    be.gemm_strided_batched(Trans::N, Trans::N, T, hd, T, 1.f, p, T, T * T, v, 3 * C, hd, 0.f,
                            out.data + b * T * C, C, hd, H);
  }
}

void attention_backward(Backend& be, const AttentionShape& s, Tensor dqkv, Tensor dprobs, Tensor dout, Tensor probs,
                        Tensor qkv) {
  const int64_t B = s.batch, T = s.seq, C = s.d_model, H = s.n_heads, hd = s.head_dim();
  expect_shape(dqkv, {B, T, 3 * C}, "attention dqkv");
  expect_shape(dprobs, {B, H, T, T}, "attention dprobs");
  expect_shape(dout, {B, T, C}, "attention dout");
  const float scale = 1.f / std::sqrt(static_cast<float>(hd));
  for (int64_t b = 0; b < B; ++b) {
    const float* v = qkv.data + b * T * 3 * C + 2 * C;
    const float* p = probs.data + b * H * T * T;
    const float* dy = dout.data + b * T * C;
    float* dp = dprobs.data + b * H * T * T;
    float* dv = dqkv.data + b * T * 3 * C + 2 * C;
    // dprobs (T, T) = dout (T, hd) @ v (T, hd)^T
    be.gemm_strided_batched(Trans::N, Trans::T, T, T, hd, 1.f, dy, C, hd, v, 3 * C, hd, 0.f, dp, T, T * T, H);
    // dv (T, hd) = probs^T (T, T) @ dout (T, hd)
    be.gemm_strided_batched(Trans::T, Trans::N, T, hd, T, 1.f, p, T, T * T, dy, C, hd, 0.f, dv, 3 * C, hd, H);
  }
  be.causal_softmax_backward(dprobs.data, probs.data, scale, B * H, T);  // dprobs now holds dscores
  for (int64_t b = 0; b < B; ++b) {
    const float* q = qkv.data + b * T * 3 * C;
    const float* k = q + C;
    const float* ds = dprobs.data + b * H * T * T;
    float* dq = dqkv.data + b * T * 3 * C;
    float* dk = dq + C;
    // dq (T, hd) = dscores (T, T) @ k (T, hd); dk (T, hd) = dscores^T (T, T) @ q (T, hd)
    be.gemm_strided_batched(Trans::N, Trans::N, T, hd, T, 1.f, ds, T, T * T, k, 3 * C, hd, 0.f, dq, 3 * C, hd, H);
    be.gemm_strided_batched(Trans::T, Trans::N, T, hd, T, 1.f, ds, T, T * T, q, 3 * C, hd, 0.f, dk, 3 * C, hd, H);
  }
  // RoPE is a rotation, so its backward is the inverse rotation of the gradient.
  if (s.rope) be.rope(dqkv.data, B, T, 3 * C, 2 * H, hd, s.rope_theta, /*inverse=*/true, 0);
}

}  // namespace moelab
