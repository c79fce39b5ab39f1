// The route seam: the MoE dims' derived sizes, the routing buffers, and the call into the backend's routing
// kernels (Backend::route; the CPU's are in backend/cpu/routing.cpp).
#include <algorithm>
#include <cmath>

#include "core/error.h"
#include "moe/moe.h"

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

}  // namespace moelab
