#pragma once
// The router of one MoE layer: its logits (an fp32 product with the router weight, on the jittered input in a
// training forward), the scores and the routing decision (Backend::route), the balancing state (the selection
// biases of auxiliary-loss-free balancing and the load counted for their update), the gradient of the gate weights
// and balancing losses back to the logits, the router weight and the input, and the statistics of the last forward,
// computed when asked for (a logging step, a report), never as part of the forward.
#include <cstdint>
#include <vector>

#include "backend/backend.h"
#include "core/tensor.h"
#include "dist/comm.h"
#include "moe/moe.h"

namespace moelab {

class Router {
 public:
  // dims: the layer at its largest (the model's max batch), which sizes the routing buffers once.
  Router(Backend& be, const MoeDims& dims);

  // a.logits = in W^T (fp32 whatever the matmul precision: top-k decisions and the balancing losses are sensitive
  // to it), a.probs and the routing decision; the experts' row counts come down to the host.
  void forward(Backend& be, const MoeDims& d, Tensor in, Tensor weight, const MoeActivations& a);
  // From s.d_weight (the gate weights' gradient) and the balancing losses (times loss_scale): s.d_logits, then the
  // router weight's gradient (dweight, added to or overwritten) and the input's (added to din).
  void backward(Backend& be, const MoeDims& d, Tensor din, Tensor dweight, Tensor in, Tensor weight,
                const MoeActivations& a, const MoeScratch& s, float loss_scale, bool accumulate_dweights) const;
  const Routing& routing() const { return routing_; }

  // The statistics of the forward with dims d whose scores are a.logits and a.probs (the last one): a pass over
  // them on the backend and a few doubles downloaded.
  MoeStats statistics(Backend& be, const MoeDims& d, const MoeActivations& a) const;

  // Auxiliary-loss-free balancing (MoeDims::balance_bias): the selection biases (E) added to the scores for the
  // top-k choice only, zero at the start.
  bool balances_by_bias() const { return !bias_.empty(); }
  const std::vector<float>& selection_bias() const { return bias_; }
  void set_selection_bias(Backend& be, const std::vector<float>& bias);
  // After a training forward: its top-k choices per expert join the load since the last update.
  void count_load(Backend& be, const MoeDims& d);
  // After an optimizer step: b_e += rate * sign(mean load - load_e), the loads summed over the ranks of comm (may
  // be null); the count starts afresh.
  void update_selection_bias(Backend& be, double rate, Communicator* comm);

 private:
  // The router's choices per expert of the last forward, before capacity (token choice), or the rows each expert
  // took (expert choice): what balancing acts on.
  std::vector<double> assigned(Backend& be, const MoeDims& d) const;

  Routing routing_;
  std::vector<float> bias_;    // (E) selection biases, or empty
  std::vector<double> load_;   // (E) choices per expert since the last update, or empty
};

}  // namespace moelab
