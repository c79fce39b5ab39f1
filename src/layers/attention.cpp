#include <cmath>

#include "layers/layers.h"

namespace moelab {

// The heads of all sequences form a two-level strided batch: head h of sequence b starts b*T*3C + h*hd elements
// into qkv (rows 3C apart); its (T, T) score matrix is (b*H + h)*T*T elements into probs.
void attention_forward(Backend& be, const AttentionShape& s, Tensor out, Tensor probs, Tensor qkv) {
  const int64_t B = s.batch, T = s.seq, C = s.d_model, H = s.n_heads, hd = s.head_dim();
  expect_shape(qkv, {B, T, 3 * C}, "attention qkv");
  expect_shape(probs, {B, H, T, T}, "attention probs");
  expect_shape(out, {B, T, C}, "attention out");
  if (s.rope) be.rope(qkv.data, B, T, 3 * C, 2 * H, hd, s.rope_theta, /*inverse=*/false, 0);  // q and k heads
  const float scale = 1.f / std::sqrt(static_cast<float>(hd));
  const int64_t seq_qkv = T * 3 * C, seq_probs = H * T * T, seq_out = T * C;
  const float* q = qkv.data;
  const float* k = q + C;
  const float* v = q + 2 * C;
  // scores (T, T) = q (T, hd) @ k (T, hd)^T, per head
  be.gemm_strided_batched2(Trans::N, Trans::T, T, T, hd, 1.f, q, 3 * C, hd, seq_qkv, k, 3 * C, hd, seq_qkv, 0.f,
                           probs.data, T, T * T, seq_probs, H, B);
  be.causal_softmax_forward(probs.data, scale, B * H, T);
  // out (T, hd) = probs (T, T) @ v (T, hd), written into the head's columns of (T, C)
  be.gemm_strided_batched2(Trans::N, Trans::N, T, hd, T, 1.f, probs.data, T, T * T, seq_probs, v, 3 * C, hd, seq_qkv,
                           0.f, out.data, C, hd, seq_out, H, B);
}

void attention_backward(Backend& be, const AttentionShape& s, Tensor dqkv, Tensor dprobs, Tensor dout, Tensor probs,
                        Tensor qkv) {
  const int64_t B = s.batch, T = s.seq, C = s.d_model, H = s.n_heads, hd = s.head_dim();
  expect_shape(dqkv, {B, T, 3 * C}, "attention dqkv");
  expect_shape(dprobs, {B, H, T, T}, "attention dprobs");
  expect_shape(dout, {B, T, C}, "attention dout");
  const float scale = 1.f / std::sqrt(static_cast<float>(hd));
  const int64_t seq_qkv = T * 3 * C, seq_probs = H * T * T, seq_out = T * C;
  const float* q = qkv.data;
  const float* k = q + C;
  const float* v = q + 2 * C;
  float* dq = dqkv.data;
  float* dk = dq + C;
  float* dv = dq + 2 * C;
  {
    // dprobs (T, T) = dout (T, hd) @ v (T, hd)^T
    be.gemm_strided_batched2(Trans::N, Trans::T, T, T, hd, 1.f, dout.data, C, hd, seq_out, v, 3 * C, hd, seq_qkv, 0.f,
                             dprobs.data, T, T * T, seq_probs, H, B);
    // dv (T, hd) = probs^T (T, T) @ dout (T, hd)
    be.gemm_strided_batched2(Trans::T, Trans::N, T, hd, T, 1.f, probs.data, T, T * T, seq_probs, dout.data, C, hd,
                             seq_out, 0.f, dv, 3 * C, hd, seq_qkv, H, B);
  }
  {
    be.causal_softmax_backward(dprobs.data, probs.data, scale, B * H, T);  // dprobs now holds dscores
    // dq (T, hd) = dscores (T, T) @ k (T, hd); dk (T, hd) = dscores^T (T, T) @ q (T, hd)
    be.gemm_strided_batched2(Trans::N, Trans::N, T, hd, T, 1.f, dprobs.data, T, T * T, seq_probs, k, 3 * C, hd, seq_qkv,
                             0.f, dq, 3 * C, hd, seq_qkv, H, B);
    be.gemm_strided_batched2(Trans::T, Trans::N, T, hd, T, 1.f, dprobs.data, T, T * T, seq_probs, q, 3 * C, hd, seq_qkv,
                             0.f, dk, 3 * C, hd, seq_qkv, H, B);
  }
  // RoPE is a rotation, so its backward is the inverse rotation of the gradient.
  if (s.rope) be.rope(dqkv.data, B, T, 3 * C, 2 * H, hd, s.rope_theta, /*inverse=*/true, 0);
}

// The probabilities feed two products here and one in the backward, and the softmax's backward reads them; the
// scores' gradient (dprobs after the softmax's backward) feeds the dq and dk products only.
void attention_declare_uses(Backend& be, Tensor probs, Tensor dprobs) {
  be.declare_use(probs.data, probs.numel(), Backend::BufferUse::MatmulOperand);
  be.declare_use(dprobs.data, dprobs.numel(), Backend::BufferUse::MatmulOperandOnly);
}

}  // namespace moelab
