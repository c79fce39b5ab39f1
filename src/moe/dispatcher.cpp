// The two token dispatchers (moe/dispatcher.h).
#include "moe/dispatcher.h"

#include "moe/expert_parallel.h"

namespace moelab {
namespace {

// Every expert is here: the experts compute on the rows in expert order where routing left them.
class LocalDispatcher final : public TokenDispatcher {
 public:
  ExpertRows dispatch(Backend&, const MoeDims& d, const Routing& r, const MoeActivations& a) override {
    return {r.host_expert_offsets, d.experts, a.x_sorted, a.y_sorted};
  }
  void combine(Backend&, const MoeDims&, const MoeActivations&) override {}
  ExpertRows dispatch_gradients(Backend&, const MoeDims& d, const Routing& r, const MoeActivations& a,
                                const MoeScratch& s, Tensor* dy, Tensor* dx) override {
    *dy = s.d_y_sorted;
    *dx = s.d_x_sorted;
    return {r.host_expert_offsets, d.experts, a.x_sorted, a.y_sorted};
  }
  void combine_gradients(Backend&, const MoeDims&, const MoeScratch&) override {}
  // The dispatched rows and their output gradients are read by the experts' products only.
  void declare_uses(Backend& be, const MoeActivations& a, const MoeScratch& s) const override {
    for (const Tensor& t : {a.x_sorted, s.d_y_sorted})
      be.declare_use(t.data, t.numel(), Backend::BufferUse::MatmulOperandOnly);
  }
  double take_seconds() override { return 0; }
  int64_t first_expert() const override { return 0; }
};

// Expert parallelism: the rows cross to the ranks holding their experts by all-to-all (ExpertExchange), planned
// once per forward from the routing's row counts; the backward reuses the forward's plan.
class AllToAllDispatcher final : public TokenDispatcher {
 public:
  AllToAllDispatcher(Communicator& group, int64_t experts) : exchange_(group, experts) {}
  ExpertRows dispatch(Backend& be, const MoeDims& d, const Routing& r, const MoeActivations& a) override {
    exchange_.plan(r.host_expert_offsets);
    exchange_.dispatch(be, a.x_sorted.data, d.d_model, a.x_local.data);
    return {exchange_.local_offsets(), exchange_.local_experts(), a.x_local, a.y_local};
  }
  void combine(Backend& be, const MoeDims& d, const MoeActivations& a) override {
    exchange_.combine(be, a.y_local.data, d.d_model, a.y_sorted.data);
  }
  ExpertRows dispatch_gradients(Backend& be, const MoeDims& d, const Routing&, const MoeActivations& a,
                                const MoeScratch& s, Tensor* dy, Tensor* dx) override {
    exchange_.dispatch(be, s.d_y_sorted.data, d.d_model, s.d_y_local.data);
    *dy = s.d_y_local;
    *dx = s.d_x_local;
    return {exchange_.local_offsets(), exchange_.local_experts(), a.x_local, a.y_local};
  }
  void combine_gradients(Backend& be, const MoeDims& d, const MoeScratch& s) override {
    exchange_.combine(be, s.d_x_local.data, d.d_model, s.d_x_sorted.data);
  }
  // The rows cross through the host, so the dispatched rows and their gradients are downloaded; what the experts
  // multiply comes up by upload.
  void declare_uses(Backend& be, const MoeActivations& a, const MoeScratch& s) const override {
    for (const Tensor& t : {a.x_local, s.d_y_local})
      be.declare_use(t.data, t.numel(), Backend::BufferUse::MatmulOperand);
  }
  double take_seconds() override { return exchange_.take_seconds(); }
  int64_t first_expert() const override { return exchange_.first_expert(); }

 private:
  ExpertExchange exchange_;
};

}  // namespace

std::unique_ptr<TokenDispatcher> make_token_dispatcher(Communicator* expert_group, int64_t experts) {
  if (!expert_group) return std::make_unique<LocalDispatcher>();
  return std::make_unique<AllToAllDispatcher>(*expert_group, experts);
}

}  // namespace moelab
