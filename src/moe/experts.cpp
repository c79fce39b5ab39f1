// The experts (moe/experts.h): grouped GEMMs over the per-expert slices of the dispatched rows.
#include "moe/experts.h"

#include <cmath>

#include "layers/layers.h"

namespace moelab {
namespace {

void activation_forward(Backend& be, FfnKind kind, float* act, const float* pre, int64_t rows, int64_t f) {
  if (kind == FfnKind::Gelu) be.gelu_forward(act, pre, rows * f);
  else be.swiglu_forward(act, pre, rows, f);
}

void activation_backward(Backend& be, FfnKind kind, float* dpre, const float* pre, const float* dact, int64_t rows,
                         int64_t f) {
  if (kind == FfnKind::Gelu) be.gelu_backward(dpre, pre, dact, rows * f);
  else be.swiglu_backward(dpre, pre, dact, rows, f);
}

}  // namespace

void experts_forward(Backend& be, const MoeDims& d, const MoeWeights& w, const MoeActivations& a,
                     const ExpertRows& rows) {
  const int64_t E = rows.experts, C = d.d_model, F = d.expert_hidden, P = d.fc1_rows();
  const int64_t R = rows.offsets[E];
  std::vector<GemmGroup> groups(E);
  for (int64_t e = 0; e < E; ++e) {
    const int64_t off = rows.offsets[e];
    groups[e] = {rows.offsets[e + 1] - off, rows.x.data + off * C, w.fc1_w.data + e * P * C, a.pre.data + off * P};
  }
  be.grouped_gemm(Trans::N, Trans::T, P, C, 1.f, groups.data(), E, C, C, 0.f, P);
  if (!w.fc1_b.empty())
    for (int64_t e = 0; e < E; ++e)
      be.add_bias(groups[e].c, w.fc1_b.data + e * P, groups[e].m, P);
  activation_forward(be, d.ffn, a.act.data, a.pre.data, R, F);
  for (int64_t e = 0; e < E; ++e) {
    const int64_t off = rows.offsets[e];
    groups[e] = {groups[e].m, a.act.data + off * F, w.fc2_w.data + e * C * F, rows.y.data + off * C};
  }
  be.grouped_gemm(Trans::N, Trans::T, C, F, 1.f, groups.data(), E, F, F, 0.f, C);
  if (!w.fc2_b.empty())
    for (int64_t e = 0; e < E; ++e)
      be.add_bias(groups[e].c, w.fc2_b.data + e * C, groups[e].m, C);
}

void experts_backward(Backend& be, const MoeDims& d, const MoeWeights& g, const MoeWeights& w,
                      const MoeActivations& a, const MoeScratch& s, const ExpertRows& rows, Tensor dy_rows,
                      Tensor dx_rows, bool accumulate_dweights, double* dweight_sq) {
  const int64_t E = rows.experts, C = d.d_model, F = d.expert_hidden, P = d.fc1_rows();
  const int64_t R = rows.offsets[E];
  // fairseq scales expert parameter gradients (not the activation gradients) by 1/sqrt(E), E all routed experts.
  const float alpha = d.expert_grad_scale ? 1.f / std::sqrt(static_cast<float>(d.experts)) : 1.f;
  const float w_beta = accumulate_dweights ? 1.f : 0.f;
  // An expert without rows has no product to overwrite its weight gradients, or to take their sums of squares.
  for (int64_t e = 0; e < E; ++e)
    if (rows.offsets[e + 1] == rows.offsets[e]) {
      if (!accumulate_dweights) {
        be.fill(g.fc1_w.data + e * P * C, 0.f, P * C);
        be.fill(g.fc2_w.data + e * C * F, 0.f, C * F);
      }
      if (dweight_sq) {  // backend memory: the two sums go up by upload
        const double sums[2] = {accumulate_dweights ? be.sum_squares(g.fc1_w.data + e * P * C, P * C) : 0.0,
                                accumulate_dweights ? be.sum_squares(g.fc2_w.data + e * C * F, C * F) : 0.0};
        be.upload(dweight_sq + 2 * e, sums, 2);
      }
    }
  // All experts' products of one stage are independent (disjoint outputs): one gemm_batch per stage.
  std::vector<GemmProblem> batch;
  for (int64_t e = 0; e < E; ++e) {
    const int64_t off = rows.offsets[e], m = rows.offsets[e + 1] - off;
    if (m == 0) continue;
    const float* dy = dy_rows.data + off * C;
    // y (m, C) = act (m, F) @ W2 (C, F)^T + b2:  d_act = dy @ W2;  dW2 += alpha dy^T @ act
    batch.push_back({Trans::N, Trans::N, m, F, C, 1.f, dy, C, w.fc2_w.data + e * C * F, F, 0.f,
                     s.d_act.data + off * F, F});
    batch.push_back({Trans::T, Trans::N, C, F, m, alpha, dy, C, a.act.data + off * F, F, w_beta,
                     g.fc2_w.data + e * C * F, F, dweight_sq ? dweight_sq + 2 * e + 1 : nullptr});
    if (!g.fc2_b.empty())  // db2 (1, C) += alpha * ones (1, m) @ dy (m, C)
      batch.push_back({Trans::N, Trans::N, 1, C, m, alpha, s.ones.data, m, dy, C, 1.f, g.fc2_b.data + e * C, C});
  }
  be.gemm_batch(batch.data(), static_cast<int64_t>(batch.size()));
  activation_backward(be, d.ffn, s.d_pre.data, a.pre.data, s.d_act.data, R, F);
  batch.clear();
  for (int64_t e = 0; e < E; ++e) {
    const int64_t off = rows.offsets[e], m = rows.offsets[e + 1] - off;
    if (m == 0) continue;
    const float* dpre = s.d_pre.data + off * P;
    // pre (m, P) = x (m, C) @ W1 (P, C)^T + b1:  d_x = dpre @ W1;  dW1 += alpha dpre^T @ x
    batch.push_back({Trans::N, Trans::N, m, C, P, 1.f, dpre, P, w.fc1_w.data + e * P * C, C, 0.f,
                     dx_rows.data + off * C, C});
    batch.push_back({Trans::T, Trans::N, P, C, m, alpha, dpre, P, rows.x.data + off * C, C, w_beta,
                     g.fc1_w.data + e * P * C, C, dweight_sq ? dweight_sq + 2 * e : nullptr});
    if (!g.fc1_b.empty())
      batch.push_back({Trans::N, Trans::N, 1, P, m, alpha, s.ones.data, m, dpre, P, 1.f, g.fc1_b.data + e * P, P});
  }
  be.gemm_batch(batch.data(), static_cast<int64_t>(batch.size()));
}

}  // namespace moelab
