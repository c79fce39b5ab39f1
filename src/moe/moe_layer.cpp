// The MoE layer: route -> dispatch -> experts -> combine, and the exact reverse for the backward.
#include <algorithm>
#include <cmath>

#include "layers/layers.h"
#include "moe/moe.h"

namespace moelab {

double MoeStats::tokens_cv() const {
  if (tokens_per_expert.empty()) return 0;
  double mean = 0, var = 0;
  for (auto t : tokens_per_expert) mean += static_cast<double>(t);
  mean /= static_cast<double>(tokens_per_expert.size());
  for (auto t : tokens_per_expert) var += (t - mean) * (t - mean);
  var /= static_cast<double>(tokens_per_expert.size());
  return mean > 0 ? std::sqrt(var) / mean : 0;
}

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

// Experts: (R, C) rows sorted by expert -> (R, C) outputs, one grouped GEMM per matrix.
void experts_forward(Backend& be, const MoeDims& d, const MoeWeights& w, const MoeActivations& a, const Routing& r) {
  const int64_t E = d.experts, C = d.d_model, F = d.expert_hidden, P = d.fc1_rows();
  std::vector<GemmGroup> groups(E);
  for (int64_t e = 0; e < E; ++e) {
    const int64_t off = r.host_expert_offsets[e];
    groups[e] = {r.host_expert_offsets[e + 1] - off, a.x_sorted.data + off * C, w.fc1_w.data + e * P * C,
                 a.pre.data + off * P};
  }
  be.grouped_gemm(Trans::N, Trans::T, P, C, 1.f, groups.data(), E, C, C, 0.f, P);
  if (!w.fc1_b.empty())
    for (int64_t e = 0; e < E; ++e)
      be.add_bias(groups[e].c, w.fc1_b.data + e * P, groups[e].m, P);
  activation_forward(be, d.ffn, a.act.data, a.pre.data, r.rows, F);
  for (int64_t e = 0; e < E; ++e) {
    const int64_t off = r.host_expert_offsets[e];
    groups[e] = {groups[e].m, a.act.data + off * F, w.fc2_w.data + e * C * F, a.y_sorted.data + off * C};
  }
  be.grouped_gemm(Trans::N, Trans::T, C, F, 1.f, groups.data(), E, F, F, 0.f, C);
  if (!w.fc2_b.empty())
    for (int64_t e = 0; e < E; ++e)
      be.add_bias(groups[e].c, w.fc2_b.data + e * C, groups[e].m, C);
}

void experts_backward(Backend& be, const MoeDims& d, const MoeWeights& g, const MoeWeights& w,
                      const MoeActivations& a, const MoeScratch& s, const Routing& r, bool accumulate_dweights,
                      double* dweight_sq) {
  const int64_t E = d.experts, C = d.d_model, F = d.expert_hidden, P = d.fc1_rows();
  // fairseq scales expert parameter gradients (not the activation gradients) by 1/sqrt(E).
  const float alpha = d.expert_grad_scale ? 1.f / std::sqrt(static_cast<float>(E)) : 1.f;
  const float w_beta = accumulate_dweights ? 1.f : 0.f;
  // An expert without rows has no product to overwrite its weight gradients, or to take their sums of squares.
  for (int64_t e = 0; e < E; ++e)
    if (r.host_expert_offsets[e + 1] == r.host_expert_offsets[e]) {
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
    const int64_t off = r.host_expert_offsets[e], m = r.host_expert_offsets[e + 1] - off;
    if (m == 0) continue;
    const float* dy = s.d_y_sorted.data + off * C;
    // y (m, C) = act (m, F) @ W2 (C, F)^T + b2:  d_act = dy @ W2;  dW2 += alpha dy^T @ act
    batch.push_back({Trans::N, Trans::N, m, F, C, 1.f, dy, C, w.fc2_w.data + e * C * F, F, 0.f,
                     s.d_act.data + off * F, F});
    batch.push_back({Trans::T, Trans::N, C, F, m, alpha, dy, C, a.act.data + off * F, F, w_beta,
                     g.fc2_w.data + e * C * F, F, dweight_sq ? dweight_sq + 2 * e + 1 : nullptr});
    if (!g.fc2_b.empty())  // db2 (1, C) += alpha * ones (1, m) @ dy (m, C)
      batch.push_back({Trans::N, Trans::N, 1, C, m, alpha, s.ones.data, m, dy, C, 1.f, g.fc2_b.data + e * C, C});
  }
  be.gemm_batch(batch.data(), static_cast<int64_t>(batch.size()));
  activation_backward(be, d.ffn, s.d_pre.data, a.pre.data, s.d_act.data, r.rows, F);
  batch.clear();
  for (int64_t e = 0; e < E; ++e) {
    const int64_t off = r.host_expert_offsets[e], m = r.host_expert_offsets[e + 1] - off;
    if (m == 0) continue;
    const float* dpre = s.d_pre.data + off * P;
    // pre (m, P) = x (m, C) @ W1 (P, C)^T + b1:  d_x = dpre @ W1;  dW1 += alpha dpre^T @ x
    batch.push_back({Trans::N, Trans::N, m, C, P, 1.f, dpre, P, w.fc1_w.data + e * P * C, C, 0.f,
                     s.d_x_sorted.data + off * C, C});
    batch.push_back({Trans::T, Trans::N, P, C, m, alpha, dpre, P, a.x_sorted.data + off * C, C, w_beta,
                     g.fc1_w.data + e * P * C, C, dweight_sq ? dweight_sq + 2 * e : nullptr});
    if (!g.fc1_b.empty())
      batch.push_back({Trans::N, Trans::N, 1, P, m, alpha, s.ones.data, m, dpre, P, 1.f, g.fc1_b.data + e * P, P});
  }
  be.gemm_batch(batch.data(), static_cast<int64_t>(batch.size()));
}

// The statistics of the last route: row counts from the downloaded offsets, the rest computed by the backend and
// downloaded (a few doubles).
void compute_stats(Backend& be, const MoeDims& d, const float* logits, const float* probs, const Routing& r,
                   MoeStats& st) {
  const int64_t n = d.tokens(), E = d.experts;
  st.tokens_per_expert.assign(E, 0);
  st.idle_experts = 0;
  for (int64_t e = 0; e < E; ++e) {
    st.tokens_per_expert[e] = r.host_expert_offsets[e + 1] - r.host_expert_offsets[e];
    st.idle_experts += st.tokens_per_expert[e] == 0;
  }
  st.dropped_fraction =
      d.router == RouterKind::TokenChoice ? 1.0 - static_cast<double>(r.rows) / static_cast<double>(n * d.top_k) : 0.0;
  be.router_statistics(router_shape(d), logits, probs, r.state(), r.statistics.data());
  double values[kRouterStatistics];
  be.download(values, r.statistics.data(), kRouterStatistics);
  st.router_entropy = values[kRouterEntropy];
  st.z_loss = values[kRouterZLoss];
  st.aux_loss = values[kRouterAuxLoss];
}

}  // namespace

void moe_forward(Backend& be, const MoeDims& d, Tensor out, Tensor in, const MoeWeights& w, const MoeActivations& a,
                 Routing& r, MoeStats& stats) {
  const int64_t n = d.tokens(), C = d.d_model;
  MOELAB_CHECK(in.rows() == n && in.cols() == C, "MoE input " + in.shape.str());
  // route (fp32 whatever the matmul precision: top-k decisions and the balancing losses are sensitive to it)
  {
    const MatmulPrecisionScope fp32(be, Precision::FP32);
    linear_forward(be, a.logits, in, w.router, Tensor());
  }
  route(be, d, a.logits.data, a.probs.data, r);
  // dispatch -> experts -> combine
  be.gather_rows(a.x_sorted.data, in.data, r.row_token.data(), nullptr, r.rows, C);
  experts_forward(be, d, w, a, r);
  be.combine_rows(out.data, a.y_sorted.data, r.token_offsets.data(), r.token_rows.data(), r.row_weight.data(), n, C);
  if (d.shared_hidden > 0)
    mlp_forward(be, d.ffn, out, a.shared_pre, a.shared_act, in, w.shared_fc1_w, w.shared_fc1_b, w.shared_fc2_w,
                w.shared_fc2_b);
  compute_stats(be, d, a.logits.data, a.probs.data, r, stats);
}

void moe_backward(Backend& be, const MoeDims& d, Tensor din, const MoeWeights& g, Tensor dout, Tensor in,
                  const MoeWeights& w, const MoeActivations& a, const MoeScratch& s, const Routing& r,
                  float loss_scale, bool accumulate_dweights, double* expert_dweight_sq) {
  const int64_t n = d.tokens(), C = d.d_model;
  if (d.shared_hidden > 0)
    mlp_backward(be, d.ffn, din, g.shared_fc1_w, g.shared_fc1_b, g.shared_fc2_w, g.shared_fc2_b, s.d_shared_pre,
                 s.d_shared_act, dout, in, a.shared_pre, a.shared_act, w.shared_fc1_w, w.shared_fc2_w,
                 accumulate_dweights);
  // combine backward: the weighted output gradient of each row, and the gate weight's gradient
  be.combine_rows_backward(s.d_y_sorted.data, s.d_weight.data, dout.data, r.row_token.data(), r.row_weight.data(),
                           a.y_sorted.data, r.rows, C);
  experts_backward(be, d, g, w, a, s, r, accumulate_dweights, expert_dweight_sq);
  // dispatch backward: each token sums the input gradients of its rows
  be.combine_rows(din.data, s.d_x_sorted.data, r.token_offsets.data(), r.token_rows.data(), nullptr, n, C);

  // Router: d loss / d probs (gate weights, auxiliary loss), then through the softmax to the logits.
  const float aux_scale = d.router == RouterKind::TokenChoice && d.aux_loss_weight > 0 ? loss_scale * d.aux_loss_weight
                                                                                       : 0.f;
  const float z_scale = loss_scale * d.z_loss_weight * 2.f / static_cast<float>(n);
  be.router_backward(router_shape(d), s.d_logits.data, a.probs.data, s.d_weight.data, r.state(), aux_scale, z_scale);
  const MatmulPrecisionScope fp32(be, Precision::FP32);
  linear_backward(be, din, g.router, Tensor(), s.d_logits, in, w.router, /*accumulate_din=*/true,
                  accumulate_dweights);
}

// The dispatched rows and the experts' activations feed the experts' products in the forward and their weight
// gradients' in the backward; the rows' output gradient (combine's backward) and the fc1 input gradient feed the
// experts' backward products, and the biases' gradients when the experts have biases (summed by a product with a
// row of ones, so still only products). Nothing else reads them: the activation's backward reads pre.
void moe_declare_uses(Backend& be, const MoeActivations& a, const MoeScratch& s) {
  for (const Tensor& t : {a.x_sorted, a.act, s.d_y_sorted, s.d_pre})
    be.declare_use(t.data, t.numel(), Backend::BufferUse::MatmulOperandOnly);
}

}  // namespace moelab
