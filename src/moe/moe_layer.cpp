// The MoE layer: route -> dispatch -> experts -> combine, and the exact reverse for the backward.
#include <algorithm>
#include <cmath>

#include "layers/layers.h"
#include "moe/expert_parallel.h"
#include "moe/moe.h"

namespace moelab {

double MoeStats::overload() const {
  if (assigned.empty()) return 0;
  double sum = 0, most = 0;
  for (double a : assigned) sum += a, most = std::max(most, a);
  return sum > 0 ? most * static_cast<double>(assigned.size()) / sum : 0;
}

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

// The rows the experts of this rank compute on, expert-major: the layer's own dispatched rows, or under expert
// parallelism the rows received from the group (ExpertExchange); offsets (experts + 1) delimit each expert's.
struct ExpertRows {
  const std::vector<int64_t>& offsets;
  int64_t experts;
  Tensor x, y;  // (rows, C) inputs and outputs
};

// Experts: (rows, C) -> (rows, C) outputs, one grouped GEMM per matrix.
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

// dy (rows, C): the rows' output gradients; dx (rows, C) receives their input gradients.
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
  st.seq_aux_loss = values[kRouterSeqAuxLoss];
  // The router's choices per expert (before capacity): what balancing acts on.
  if (d.router == RouterKind::TokenChoice) {
    st.assigned = be.download_vector(r.assigned_fraction.data(), E);
    for (double& a : st.assigned) a = std::round(a * static_cast<double>(n * d.top_k));
  } else {
    st.assigned.assign(st.tokens_per_expert.begin(), st.tokens_per_expert.end());
  }
}

}  // namespace

void moe_forward(Backend& be, const MoeDims& d, Tensor out, Tensor in, const MoeWeights& w, const MoeActivations& a,
                 Routing& r, MoeStats& stats, ExpertExchange* ep) {
  const int64_t n = d.tokens(), C = d.d_model;
  MOELAB_CHECK(in.rows() == n && in.cols() == C, "MoE input " + in.shape.str());
  // route (fp32 whatever the matmul precision: top-k decisions and the balancing losses are sensitive to it), on the
  // input times the router jitter's noise in a training forward
  const bool jitter = d.router_jitter > 0 && d.jitter_seed != 0;
  MOELAB_CHECK(!jitter || !a.router_in.empty(), "router jitter without its input buffer");
  if (jitter) be.jitter(a.router_in.data, in.data, n * C, d.jitter_seed, d.router_jitter);
  {
    const MatmulPrecisionScope fp32(be, Precision::FP32);
    linear_forward(be, a.logits, jitter ? a.router_in : in, w.router, Tensor());
  }
  route(be, d, a.logits.data, a.probs.data, r);
  // dispatch -> experts -> combine
  be.gather_rows(a.x_sorted.data, in.data, r.row_token.data(), nullptr, r.rows, C);
  if (ep) {  // to the ranks holding the experts, computed there, and back
    ep->plan(r.host_expert_offsets);
    ep->dispatch(be, a.x_sorted.data, C, a.x_local.data);
    experts_forward(be, d, w, a, {ep->local_offsets(), ep->local_experts(), a.x_local, a.y_local});
    ep->combine(be, a.y_local.data, C, a.y_sorted.data);
  } else {
    experts_forward(be, d, w, a, {r.host_expert_offsets, d.experts, a.x_sorted, a.y_sorted});
  }
  be.combine_rows(out.data, a.y_sorted.data, r.token_offsets.data(), r.token_rows.data(), r.row_weight.data(), n, C);
  if (d.shared_hidden > 0)
    mlp_forward(be, d.ffn, out, a.shared_pre, a.shared_act, in, w.shared_fc1_w, w.shared_fc1_b, w.shared_fc2_w,
                w.shared_fc2_b);
  compute_stats(be, d, a.logits.data, a.probs.data, r, stats);
}

void moe_backward(Backend& be, const MoeDims& d, Tensor din, const MoeWeights& g, Tensor dout, Tensor in,
                  const MoeWeights& w, const MoeActivations& a, const MoeScratch& s, const Routing& r,
                  float loss_scale, bool accumulate_dweights, double* expert_dweight_sq, ExpertExchange* ep) {
  const int64_t n = d.tokens(), C = d.d_model;
  if (d.shared_hidden > 0)
    mlp_backward(be, d.ffn, din, g.shared_fc1_w, g.shared_fc1_b, g.shared_fc2_w, g.shared_fc2_b, s.d_shared_pre,
                 s.d_shared_act, dout, in, a.shared_pre, a.shared_act, w.shared_fc1_w, w.shared_fc2_w,
                 accumulate_dweights);
  // combine backward: the weighted output gradient of each row, and the gate weight's gradient
  be.combine_rows_backward(s.d_y_sorted.data, s.d_weight.data, dout.data, r.row_token.data(), r.row_weight.data(),
                           a.y_sorted.data, r.rows, C);
  if (ep) {  // the rows' gradients to the experts' ranks, and their input gradients back
    ep->dispatch(be, s.d_y_sorted.data, C, s.d_y_local.data);
    experts_backward(be, d, g, w, a, s, {ep->local_offsets(), ep->local_experts(), a.x_local, a.y_local},
                     s.d_y_local, s.d_x_local, accumulate_dweights, expert_dweight_sq);
    ep->combine(be, s.d_x_local.data, C, s.d_x_sorted.data);
  } else {
    experts_backward(be, d, g, w, a, s, {r.host_expert_offsets, d.experts, a.x_sorted, a.y_sorted}, s.d_y_sorted,
                     s.d_x_sorted, accumulate_dweights, expert_dweight_sq);
  }
  // dispatch backward: each token sums the input gradients of its rows
  be.combine_rows(din.data, s.d_x_sorted.data, r.token_offsets.data(), r.token_rows.data(), nullptr, n, C);

  // Router: d loss / d scores (gate weights, balancing losses), then through the scores to the logits.
  const bool token_choice = d.router == RouterKind::TokenChoice;
  RouterLossScales scales;
  scales.aux = token_choice ? loss_scale * d.aux_loss_weight : 0.f;
  scales.seq_aux = token_choice ? loss_scale * d.seq_aux_loss_weight : 0.f;
  scales.z = loss_scale * d.z_loss_weight * 2.f / static_cast<float>(n);
  be.router_backward(router_shape(d), s.d_logits.data, a.logits.data, a.probs.data, s.d_weight.data, r.state(),
                     scales);
  const MatmulPrecisionScope fp32(be, Precision::FP32);
  if (d.router_jitter > 0 && d.jitter_seed != 0) {
    // The router saw in * noise: its weight gradient reads that, and the input's gradient is noise * d(in * noise).
    linear_backward(be, s.d_router_in, g.router, Tensor(), s.d_logits, a.router_in, w.router,
                    /*accumulate_din=*/false, accumulate_dweights);
    be.jitter(s.d_router_in.data, s.d_router_in.data, n * C, d.jitter_seed, d.router_jitter);
    be.add_inplace(din.data, s.d_router_in.data, n * C);
  } else {
    linear_backward(be, din, g.router, Tensor(), s.d_logits, in, w.router, /*accumulate_din=*/true,
                    accumulate_dweights);
  }
}

// The dispatched rows and the experts' activations feed the experts' products in the forward and their weight
// gradients' in the backward; the rows' output gradient (combine's backward) and the fc1 input gradient feed the
// experts' backward products, and the biases' gradients when the experts have biases (summed by a product with a
// row of ones, so still only products). Nothing else reads them: the activation's backward reads pre.
// Under expert parallelism the dispatched rows and their gradients are downloaded to cross to other ranks, and what
// the experts multiply comes up by upload: only the activations and the fc1 input gradient are products-only.
void moe_declare_uses(Backend& be, const MoeActivations& a, const MoeScratch& s, bool expert_parallel) {
  using Use = Backend::BufferUse;
  for (const Tensor& t : {a.act, s.d_pre}) be.declare_use(t.data, t.numel(), Use::MatmulOperandOnly);
  if (!expert_parallel)
    for (const Tensor& t : {a.x_sorted, s.d_y_sorted}) be.declare_use(t.data, t.numel(), Use::MatmulOperandOnly);
  else
    for (const Tensor& t : {a.x_local, s.d_y_local}) be.declare_use(t.data, t.numel(), Use::MatmulOperand);
}

}  // namespace moelab
