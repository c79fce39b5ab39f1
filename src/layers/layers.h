#pragma once
// Transformer layers as forward/backward pairs of plain functions (llm.c style). Each takes Tensor views,
// checks their shapes, and composes Backend primitives; none owns memory. Shapes use N = B*T tokens,
// C = d_model, H heads of size hd = C/H, F = FFN hidden size, V = vocab.
//
// Backward functions ACCUMULATE parameter gradients (so micro-batches and tied weights add up) and either
// accumulate or overwrite the input gradient as documented per function.
#include <cstdint>

#include "backend/backend.h"
#include "core/tensor.h"
#include "layers/kinds.h"

namespace moelab {

// ---- linear: out (N, O) = in (N, I) @ weight (O, I)^T + bias (O) -------------------------------------------
// accumulate_out: out += ... (used to add a branch straight into the residual stream).
void linear_forward(Backend& be, Tensor out, Tensor in, Tensor weight, Tensor bias, bool accumulate_out = false);
// din (N, I) = dout @ weight (overwritten, or added when accumulate_din); dweight += dout^T @ in (overwritten
// instead when !accumulate_dweight: the first backward after the optimizer step need not read zeros); dbias += sum dout
void linear_backward(Backend& be, Tensor din, Tensor dweight, Tensor dbias, Tensor dout, Tensor in, Tensor weight,
                     bool accumulate_din = false, bool accumulate_dweight = true);

// ---- embeddings ---------------------------------------------------------------------------------------------
// out (B, T, C) = table[tokens] + pos[t] (pos (T_max, C) may be empty; learned or a fixed sinusoidal table)
void embedding_forward(Backend& be, Tensor out, const int32_t* tokens, Tensor table, Tensor pos);
// dtable += scatter(dout); dpos += sum over batch (dpos empty: no gradient, e.g. sinusoidal)
void embedding_backward(Backend& be, Tensor dtable, Tensor dpos, const int32_t* tokens, Tensor dout);
// Fills table (T, C) with fairseq's sinusoidal encoding: half = C/2, freq_i = exp(-i ln(10000)/(half-1)),
// table[t, i] = sin(t freq_i), table[t, half + i] = cos(t freq_i).
void sinusoidal_table(float* table, int64_t seq, int64_t dim);

// ---- normalisation over the last dim (N, C); mean is unused for RMSNorm; bias may be empty ------------------
void norm_forward(Backend& be, NormKind kind, Tensor out, Tensor mean, Tensor rstd, Tensor in, Tensor weight,
                  Tensor bias, float eps);
// din += ...; dweight += ...; dbias += ... (when present)
void norm_backward(Backend& be, NormKind kind, Tensor din, Tensor dweight, Tensor dbias, Tensor dout, Tensor in,
                   Tensor weight, Tensor mean, Tensor rstd);

// ---- causal multi-head self-attention core ---------------------------------------------------------------
// qkv (B, T, 3C) holds [q | k | v]; with RoPE, q and k are rotated in place (the backward needs them rotated).
// probs (B, H, T, T) saves the attention weights; out (B, T, C) is the concatenation of heads, before the
// output projection.
struct AttentionShape {
  int64_t batch, seq, d_model, n_heads;
  bool rope;
  float rope_theta;
  int64_t head_dim() const { return d_model / n_heads; }
};
void attention_forward(Backend& be, const AttentionShape& s, Tensor out, Tensor probs, Tensor qkv);
// dqkv (B, T, 3C) is overwritten; dprobs (B, H, T, T) is scratch.
void attention_backward(Backend& be, const AttentionShape& s, Tensor dqkv, Tensor dprobs, Tensor dout, Tensor probs,
                        Tensor qkv);
// QK-norm (OLMoE): RMSNorm over each head's query and key in qkv (B, T, 3C), in place, before RoPE; q_weight and
// k_weight (hd) are shared by the heads. saved (B, T, 2C) keeps q and k before the norm, rstd (B, T, 2H) their 1/rms.
void qk_norm_forward(Backend& be, Tensor qkv, Tensor saved, Tensor rstd, Tensor q_weight, Tensor k_weight,
                     int64_t n_heads, float eps);
// dqkv's q and k parts turn from the normed values' gradients into the inputs'; dq_weight, dk_weight += ...
void qk_norm_backward(Backend& be, Tensor dqkv, Tensor dq_weight, Tensor dk_weight, Tensor saved, Tensor rstd,
                      Tensor q_weight, Tensor k_weight, int64_t n_heads);
// What reads the full-size probs and dprobs buffers (Backend::declare_use), said once by their owner.
void attention_declare_uses(Backend& be, Tensor probs, Tensor dprobs);

// ---- feed-forward: out += act(in @ W1^T + b1) @ W2^T + b2 --------------------------------------------------
// pre (N, F) for GELU or (N, 2F) = [gate | up] for SwiGLU; act (N, F). out is the residual stream (added to).
void mlp_forward(Backend& be, FfnKind kind, Tensor out, Tensor pre, Tensor act, Tensor in, Tensor w1, Tensor b1,
                 Tensor w2, Tensor b2);
// din += ...; parameter grads accumulate (the weight matrices' are overwritten when !accumulate_dweights); dpre
// and dact are scratch shaped like pre and act.
void mlp_backward(Backend& be, FfnKind kind, Tensor din, Tensor dw1, Tensor db1, Tensor dw2, Tensor db2, Tensor dpre,
                  Tensor dact, Tensor dout, Tensor in, Tensor pre, Tensor act, Tensor w1, Tensor w2,
                  bool accumulate_dweights = true);
// What reads the full-size act and dpre buffers (Backend::declare_use); fc1_bias: fc1 has a bias (its gradient
// sums dpre).
void mlp_declare_uses(Backend& be, Tensor act, Tensor dpre, bool fc1_bias);

// ---- fused softmax + cross-entropy over logits (N, V) -----------------------------------------------------
// losses (N) get per-position losses (0 where target < 0). When grad_scale != 0 the logits are replaced in place
// by grad_scale * dloss/dlogits. Returns the sum of losses over valid positions.
double cross_entropy_forward_backward(Backend& be, Tensor logits, Tensor losses, const int32_t* targets,
                                      float grad_scale);
// What reads the gradient written over the full-size logits buffer (Backend::declare_use).
void cross_entropy_declare_uses(Backend& be, Tensor logits);

}  // namespace moelab
