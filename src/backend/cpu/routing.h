#pragma once
// The CPU backend's MoE routing kernels (see Backend::route, router_statistics, router_backward in backend.h).
#include "backend/backend.h"

namespace moelab::cpu {

void route(const RouterShape& shape, const float* logits, float* probs, const RoutingState& state);
void router_statistics(const RouterShape& shape, const float* logits, const float* probs, const RoutingState& state,
                       double* out);
void router_backward(const RouterShape& shape, float* dlogits, const float* logits, const float* probs,
                     const float* dweight, const RoutingState& state, const RouterLossScales& scales);

}  // namespace moelab::cpu
