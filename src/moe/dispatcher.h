#pragma once
// The token dispatcher of one MoE layer: after routing, the layer's rows (token, expert) sit in expert order in
// a.x_sorted; the dispatcher brings them to the experts that compute them and brings the outputs back into
// a.y_sorted, and does the same for the gradients in the backward. Two implementations, chosen once when the layer
// is built (make_token_dispatcher):
//   local      every expert is on this rank: the experts compute on a.x_sorted in place, nothing moves;
//   all-to-all expert parallelism (moe/expert_parallel.h): the rows go to the ranks of the expert-parallel group
//              holding their experts, and the outputs come back in the order they left.
#include <cstdint>
#include <memory>

#include "backend/backend.h"
#include "core/tensor.h"
#include "dist/comm.h"
#include "moe/experts.h"
#include "moe/moe.h"

namespace moelab {

class TokenDispatcher {
 public:
  virtual ~TokenDispatcher() = default;
  // Forward, after routing (r): the routed rows (a.x_sorted) to the experts that compute them. Returns the rows
  // this rank's experts compute on: where they read their inputs and write their outputs.
  virtual ExpertRows dispatch(Backend& be, const MoeDims& d, const Routing& r, const MoeActivations& a) = 0;
  // The experts' outputs back into a.y_sorted, each row where it was in the routing order.
  virtual void combine(Backend& be, const MoeDims& d, const MoeActivations& a) = 0;
  // Backward: the rows' output gradients (s.d_y_sorted) to the experts. Returns the rows of the forward (which
  // the weight gradients read) and sets *dy, *dx to where the experts read the output gradients and write the
  // input gradients.
  virtual ExpertRows dispatch_gradients(Backend& be, const MoeDims& d, const Routing& r, const MoeActivations& a,
                                        const MoeScratch& s, Tensor* dy, Tensor* dx) = 0;
  // The rows' input gradients back into s.d_x_sorted, in the routing order.
  virtual void combine_gradients(Backend& be, const MoeDims& d, const MoeScratch& s) = 0;
  // What reads the rows the experts multiply (Backend::declare_use), said once for the full-size buffers.
  virtual void declare_uses(Backend& be, const MoeActivations& a, const MoeScratch& s) const = 0;
  // Seconds spent exchanging rows with other ranks since the last call (0: nothing is exchanged).
  virtual double take_seconds() = 0;
  // This rank's share of the experts: the first of its experts' global index (0 without expert parallelism).
  virtual int64_t first_expert() const = 0;
};

// expert_group null: the local dispatcher; else the all-to-all one over that group (its size divides experts).
std::unique_ptr<TokenDispatcher> make_token_dispatcher(Communicator* expert_group, int64_t experts);

}  // namespace moelab
