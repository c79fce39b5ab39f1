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

// q and k of token n are the 2H head vectors at n * 3C; the saved copies are q's (N, C) block, then k's.
void qk_norm_forward(Backend& be, Tensor qkv, Tensor saved, Tensor rstd, Tensor q_weight, Tensor k_weight,
                     int64_t n_heads, float eps) {
  const int64_t C3 = qkv.cols(), C = C3 / 3, N = qkv.numel() / C3, H = n_heads, hd = C / H;
  MOELAB_CHECK(saved.numel() == 2 * N * C && rstd.numel() == 2 * N * H, "qk-norm buffers " + saved.shape.str());
  expect_shape(q_weight, {hd}, "q_norm weight");
  expect_shape(k_weight, {hd}, "k_norm weight");
  be.head_rmsnorm_forward(qkv.data, saved.data, rstd.data, q_weight.data, N, C3, H, hd, eps);
  be.head_rmsnorm_forward(qkv.data + C, saved.data + N * C, rstd.data + N * H, k_weight.data, N, C3, H, hd, eps);
}

void qk_norm_backward(Backend& be, Tensor dqkv, Tensor dq_weight, Tensor dk_weight, Tensor saved, Tensor rstd,
                      Tensor q_weight, Tensor k_weight, int64_t n_heads) {
  const int64_t C3 = dqkv.cols(), C = C3 / 3, N = dqkv.numel() / C3, H = n_heads, hd = C / H;
  MOELAB_CHECK(saved.numel() == 2 * N * C && rstd.numel() == 2 * N * H, "qk-norm buffers " + saved.shape.str());
  be.head_rmsnorm_backward(dqkv.data, dq_weight.data, saved.data, q_weight.data, rstd.data, N, C3, H, hd);
  be.head_rmsnorm_backward(dqkv.data + C, dk_weight.data, saved.data + N * C, k_weight.data, rstd.data + N * H, N, C3,
                           H, hd);
}

// The probabilities feed two products here and one in the backward, and the softmax's backward reads them; the
// scores' gradient (dprobs after the softmax's backward) feeds the dq and dk products only.
void attention_declare_uses(Backend& be, Tensor probs, Tensor dprobs) {
  be.declare_use(probs.data, probs.numel(), Backend::BufferUse::MatmulOperand);
  be.declare_use(dprobs.data, dprobs.numel(), Backend::BufferUse::MatmulOperandOnly);
}

}  // namespace moelab
