#pragma once
// One MoE layer: its router (with the balancing state) and its token dispatcher, owned here; the experts'
// products (moe/experts.h); an optional shared expert (a dense FFN every token passes through). The model
// (model/transformer.h) owns the weights and the activation buffers and hands views of them to each call.
#include <cstdint>
#include <memory>

#include "backend/backend.h"
#include "core/tensor.h"
#include "dist/comm.h"
#include "moe/dispatcher.h"
#include "moe/moe.h"
#include "moe/router.h"

namespace moelab {

class MoeLayer {
 public:
  // dims: the layer at its largest (the model's max batch); expert_group: expert parallelism (the all-to-all
  // dispatcher over that group, which holds d.expert_shards ranks), or null (every expert here).
  MoeLayer(Backend& be, const MoeDims& dims, Communicator* expert_group = nullptr);

  // out (N, C) += MoE(in (N, C)): route, gather the rows in expert order, dispatch, experts, combine, and each
  // token's weighted sum of its rows. A training forward counts the router's choices for bias balancing.
  void forward(Backend& be, const MoeDims& d, Tensor out, Tensor in, const MoeWeights& w, const MoeActivations& a,
               bool training = false);
  // din += d/d in of the last forward; parameter gradients accumulate, or with !accumulate_dweights the weight
  // matrices' gradients (router, experts, shared expert) are overwritten, those of experts that received no row
  // with zeros. loss_scale multiplies the auxiliary losses' own gradients (MoeStats::weighted_aux), matching the
  // scale applied to the main loss. expert_dweight_sq (2 per local expert, backend memory, may be null) receives
  // the sum of squares of each expert's fc1 and fc2 weight gradient ([2e], [2e + 1]) as this backward leaves them.
  void backward(Backend& be, const MoeDims& d, Tensor din, const MoeWeights& grads, Tensor dout, Tensor in,
                const MoeWeights& w, const MoeActivations& a, const MoeScratch& s, float loss_scale,
                bool accumulate_dweights = true, double* expert_dweight_sq = nullptr);

  // The router statistics of the last forward, computed now; the weighted auxiliary loss is
  // statistics(be).weighted_aux(last_dims()).
  MoeStats statistics(Backend& be) const;
  const MoeDims& last_dims() const { return last_dims_; }

  // What reads the full-size activation and scratch buffers (Backend::declare_use), said once by their owner; the
  // shared expert's are an FFN's (mlp_declare_uses).
  void declare_uses(Backend& be, const MoeActivations& a, const MoeScratch& s) const;

  Router& router() { return router_; }
  const Router& router() const { return router_; }
  const Routing& routing() const { return router_.routing(); }
  TokenDispatcher& dispatcher() { return *dispatcher_; }
  const TokenDispatcher& dispatcher() const { return *dispatcher_; }

 private:
  Router router_;
  std::unique_ptr<TokenDispatcher> dispatcher_;
  MoeDims last_dims_;       // of the last forward
  MoeActivations last_;     // its activations (the router statistics read its logits and scores)
};

}  // namespace moelab
