// The router (moe/router.h), and the route seam under it: the MoE dims' derived sizes, the routing buffers, and the
// call into the backend's routing kernels (Backend::route; the CPU's are in backend/cpu/routing.cpp).
#include "moe/router.h"

#include <algorithm>
#include <cmath>
#include <string>

#include "core/error.h"
#include "layers/layers.h"

namespace moelab {

int64_t MoeDims::token_choice_capacity() const {
  if (capacity_factor <= 0) return 0;
  return static_cast<int64_t>(std::ceil(capacity_factor * tokens() * top_k / static_cast<double>(experts)));
}

int64_t MoeDims::expert_choice_capacity() const {
  const double cf = capacity_factor > 0 ? capacity_factor : 1.0;
  const int64_t c = std::llround(cf * batch * top_k / static_cast<double>(experts));
  return std::clamp<int64_t>(c, 1, batch);
}

int64_t MoeDims::max_rows() const {
  if (router == RouterKind::TokenChoice) return tokens() * top_k;
  return experts * expert_choice_capacity() * seq;
}

void Routing::reserve(Backend& be, const MoeDims& d) {
  const int64_t r = d.max_rows(), n = d.tokens(), e = d.experts, k = d.top_k;
  row_token = BackendArray<int32_t>(be, r);
  row_expert = BackendArray<int32_t>(be, r);
  row_weight = BackendArray<float>(be, r);
  expert_offsets = BackendArray<int64_t>(be, e + 1);
  token_offsets = BackendArray<int64_t>(be, n + 1);
  token_rows = BackendArray<int32_t>(be, r);
  topk_expert = BackendArray<int32_t>(be, n * k);
  topk_prob = BackendArray<float>(be, n * k);
  topk_row = BackendArray<int32_t>(be, n * k);
  lse = BackendArray<float>(be, n);
  assigned_fraction = BackendArray<double>(be, e);
  mean_prob = BackendArray<double>(be, e);
  seq_fraction = BackendArray<double>(be, d.batch * e);
  if (d.balance_bias) selection_bias = BackendArray<float>(be, e);
  statistics = BackendArray<double>(be, kRouterStatistics);
  host_expert_offsets.assign(e + 1, 0);
  rows = 0;
}

RoutingState Routing::state() const {
  return {row_token.data(),  row_expert.data(), row_weight.data(),  expert_offsets.data(),
          token_offsets.data(), token_rows.data(), topk_expert.data(), topk_prob.data(),
          topk_row.data(),   lse.data(),        assigned_fraction.data(), mean_prob.data(),
          seq_fraction.data(), selection_bias.data()};
}

RouterShape router_shape(const MoeDims& d) {
  RouterShape s;
  s.batch = d.batch;
  s.seq = d.seq;
  s.experts = d.experts;
  s.top_k = d.top_k;
  s.expert_choice = d.router == RouterKind::ExpertChoice;
  s.capacity = s.expert_choice ? d.expert_choice_capacity() : d.token_choice_capacity();
  s.renormalize = d.renormalize;
  s.sigmoid = d.score == ScoreKind::Sigmoid;
  s.gate_scale = d.gate_scale;
  return s;
}

void route(Backend& be, const MoeDims& d, const float* logits, float* probs, Routing& r) {
  MOELAB_CHECK(static_cast<int64_t>(r.host_expert_offsets.size()) == d.experts + 1 &&
                   r.row_token.size() >= d.max_rows() && r.lse.size() >= d.tokens(),
               "routing buffers were reserved for other dims");
  MOELAB_CHECK(!d.balance_bias || r.selection_bias.size() == d.experts, "no selection bias was reserved");
  be.route(router_shape(d), logits, probs, r.state());
  be.download(r.host_expert_offsets.data(), r.expert_offsets.data(), d.experts + 1);
  r.rows = r.host_expert_offsets[d.experts];
}

Router::Router(Backend& be, const MoeDims& dims) {
  routing_.reserve(be, dims);
  if (dims.balance_bias) {  // starts at zero (as the backend's memory is zeroed)
    bias_.assign(dims.experts, 0.f);
    load_.assign(dims.experts, 0.0);
  }
}

void Router::forward(Backend& be, const MoeDims& d, Tensor in, Tensor weight, const MoeActivations& a) {
  const int64_t n = d.tokens(), C = d.d_model;
  MOELAB_CHECK(in.rows() == n && in.cols() == C, "MoE input " + in.shape.str());
  // on the input times the router jitter's noise in a training forward
  const bool jitter = d.router_jitter > 0 && d.jitter_seed != 0;
  MOELAB_CHECK(!jitter || !a.router_in.empty(), "router jitter without its input buffer");
  if (jitter) be.jitter(a.router_in.data, in.data, n * C, d.jitter_seed, d.router_jitter);
  {
    const MatmulPrecisionScope fp32(be, Precision::FP32);
    linear_forward(be, a.logits, jitter ? a.router_in : in, weight, Tensor());
  }
  route(be, d, a.logits.data, a.probs.data, routing_);
}

void Router::backward(Backend& be, const MoeDims& d, Tensor din, Tensor dweight, Tensor in, Tensor weight,
                      const MoeActivations& a, const MoeScratch& s, float loss_scale, bool accumulate_dweights) const {
  const int64_t n = d.tokens(), C = d.d_model;
  // d loss / d scores (gate weights, balancing losses), then through the scores to the logits.
  const bool token_choice = d.router == RouterKind::TokenChoice;
  RouterLossScales scales;
  scales.aux = token_choice ? loss_scale * d.aux_loss_weight : 0.f;
  scales.seq_aux = token_choice ? loss_scale * d.seq_aux_loss_weight : 0.f;
  scales.z = loss_scale * d.z_loss_weight * 2.f / static_cast<float>(n);
  be.router_backward(router_shape(d), s.d_logits.data, a.logits.data, a.probs.data, s.d_weight.data,
                     routing_.state(), scales);
  const MatmulPrecisionScope fp32(be, Precision::FP32);
  if (d.router_jitter > 0 && d.jitter_seed != 0) {
    // The router saw in * noise: its weight gradient reads that, and the input's gradient is noise * d(in * noise).
    linear_backward(be, s.d_router_in, dweight, Tensor(), s.d_logits, a.router_in, weight,
                    /*accumulate_din=*/false, accumulate_dweights);
    be.jitter(s.d_router_in.data, s.d_router_in.data, n * C, d.jitter_seed, d.router_jitter);
    be.add_inplace(din.data, s.d_router_in.data, n * C);
  } else {
    linear_backward(be, din, dweight, Tensor(), s.d_logits, in, weight, /*accumulate_din=*/true,
                    accumulate_dweights);
  }
}

std::vector<double> Router::assigned(Backend& be, const MoeDims& d) const {
  const Routing& r = routing_;
  if (d.router == RouterKind::TokenChoice) {
    std::vector<double> out = be.download_vector(r.assigned_fraction.data(), d.experts);
    for (double& a : out) a = std::round(a * static_cast<double>(d.tokens() * d.top_k));
    return out;
  }
  std::vector<double> out(d.experts);
  for (int64_t e = 0; e < d.experts; ++e)
    out[e] = static_cast<double>(r.host_expert_offsets[e + 1] - r.host_expert_offsets[e]);
  return out;
}

MoeStats Router::statistics(Backend& be, const MoeDims& d, const MoeActivations& a) const {
  const Routing& r = routing_;
  const int64_t n = d.tokens(), E = d.experts;
  MoeStats st;
  st.tokens_per_expert.assign(E, 0);
  for (int64_t e = 0; e < E; ++e) {
    st.tokens_per_expert[e] = r.host_expert_offsets[e + 1] - r.host_expert_offsets[e];
    st.idle_experts += st.tokens_per_expert[e] == 0;
  }
  st.dropped_fraction =
      d.router == RouterKind::TokenChoice ? 1.0 - static_cast<double>(r.rows) / static_cast<double>(n * d.top_k) : 0.0;
  be.router_statistics(router_shape(d), a.logits.data, a.probs.data, r.state(), r.statistics.data());
  double values[kRouterStatistics];
  be.download(values, r.statistics.data(), kRouterStatistics);
  st.router_entropy = values[kRouterEntropy];
  st.z_loss = values[kRouterZLoss];
  st.aux_loss = values[kRouterAuxLoss];
  st.seq_aux_loss = values[kRouterSeqAuxLoss];
  st.assigned = assigned(be, d);
  return st;
}

void Router::set_selection_bias(Backend& be, const std::vector<float>& bias) {
  MOELAB_CHECK(bias.size() == bias_.size(), "selection biases for " + std::to_string(bias.size()) + " experts, " +
                                                std::to_string(bias_.size()) + " expected");
  bias_ = bias;
  be.upload(routing_.selection_bias.data(), bias_.data(), static_cast<int64_t>(bias_.size()));
}

void Router::count_load(Backend& be, const MoeDims& d) {
  if (load_.empty()) return;
  const std::vector<double> choices = assigned(be, d);
  for (size_t e = 0; e < load_.size(); ++e) load_[e] += choices[e];
}

void Router::update_selection_bias(Backend& be, double rate, Communicator* comm) {
  if (load_.empty()) return;
  if (comm && comm->size() > 1) comm->allreduce_sum(load_.data(), static_cast<int64_t>(load_.size()));
  double mean = 0;
  for (double l : load_) mean += l;
  mean /= static_cast<double>(load_.size());
  for (size_t e = 0; e < bias_.size(); ++e) {
    const double gap = mean - load_[e];
    bias_[e] = static_cast<float>(bias_[e] + rate * (gap > 0 ? 1.0 : gap < 0 ? -1.0 : 0.0));
  }
  be.upload(routing_.selection_bias.data(), bias_.data(), static_cast<int64_t>(bias_.size()));
  std::fill(load_.begin(), load_.end(), 0.0);
}

}  // namespace moelab
