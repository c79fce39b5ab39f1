// The MoE layer (moe/moe_layer.h): route -> gather -> dispatch -> experts -> combine, and the exact reverse for the
// backward.
#include "moe/moe_layer.h"

#include <algorithm>
#include <cmath>

#include "core/error.h"
#include "layers/layers.h"

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

MoeLayer::MoeLayer(Backend& be, const MoeDims& dims, Communicator* expert_group)
    : router_(be, dims), dispatcher_(make_token_dispatcher(expert_group, dims.experts)) {}

void MoeLayer::forward(Backend& be, const MoeDims& d, Tensor out, Tensor in, const MoeWeights& w,
                       const MoeActivations& a, bool training) {
  const int64_t n = d.tokens(), C = d.d_model;
  last_dims_ = d;
  last_ = a;
  router_.forward(be, d, in, w.router, a);
  if (training) router_.count_load(be, d);
  const Routing& r = router_.routing();
  // gather -> dispatch -> experts -> combine -> each token's weighted sum
  be.gather_rows(a.x_sorted.data, in.data, r.row_token.data(), nullptr, r.rows, C);
  experts_forward(be, d, w, a, dispatcher_->dispatch(be, d, r, a));
  dispatcher_->combine(be, d, a);
  be.combine_rows(out.data, a.y_sorted.data, r.token_offsets.data(), r.token_rows.data(), r.row_weight.data(), n, C);
  if (d.shared_hidden > 0)
    mlp_forward(be, d.ffn, out, a.shared_pre, a.shared_act, in, w.shared_fc1_w, w.shared_fc1_b, w.shared_fc2_w,
                w.shared_fc2_b);
}

void MoeLayer::backward(Backend& be, const MoeDims& d, Tensor din, const MoeWeights& g, Tensor dout, Tensor in,
                        const MoeWeights& w, const MoeActivations& a, const MoeScratch& s, float loss_scale,
                        bool accumulate_dweights, double* expert_dweight_sq) {
  const int64_t n = d.tokens(), C = d.d_model;
  const Routing& r = router_.routing();
  if (d.shared_hidden > 0)
    mlp_backward(be, d.ffn, din, g.shared_fc1_w, g.shared_fc1_b, g.shared_fc2_w, g.shared_fc2_b, s.d_shared_pre,
                 s.d_shared_act, dout, in, a.shared_pre, a.shared_act, w.shared_fc1_w, w.shared_fc2_w,
                 accumulate_dweights);
  // the weighted sum's backward: each row's weighted output gradient, and the gate weight's gradient
  be.combine_rows_backward(s.d_y_sorted.data, s.d_weight.data, dout.data, r.row_token.data(), r.row_weight.data(),
                           a.y_sorted.data, r.rows, C);
  Tensor dy, dx;
  const ExpertRows rows = dispatcher_->dispatch_gradients(be, d, r, a, s, &dy, &dx);
  experts_backward(be, d, g, w, a, s, rows, dy, dx, accumulate_dweights, expert_dweight_sq);
  dispatcher_->combine_gradients(be, d, s);
  // the gather's backward: each token sums the input gradients of its rows
  be.combine_rows(din.data, s.d_x_sorted.data, r.token_offsets.data(), r.token_rows.data(), nullptr, n, C);
  router_.backward(be, d, din, g.router, in, w.router, a, s, loss_scale, accumulate_dweights);
}

MoeStats MoeLayer::statistics(Backend& be) const {
  MOELAB_CHECK(last_dims_.batch > 0, "MoE statistics before any forward");
  return router_.statistics(be, last_dims_, last_);
}

// The experts' activations feed their products in the forward and their weight gradients' in the backward; the fc1
// input gradient feeds the experts' backward products, and the biases' gradients when the experts have biases
// (summed by a product with a row of ones, so still only products). Nothing else reads them: the activation's
// backward reads pre. The rows the experts multiply are the dispatcher's to declare.
void MoeLayer::declare_uses(Backend& be, const MoeActivations& a, const MoeScratch& s) const {
  for (const Tensor& t : {a.act, s.d_pre}) be.declare_use(t.data, t.numel(), Backend::BufferUse::MatmulOperandOnly);
  dispatcher_->declare_uses(be, a, s);
}

}  // namespace moelab
