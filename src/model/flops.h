#pragma once
#include "config/config.h"

namespace moelab {

// Training FLOPs per token that the engine actually performs in its matrix products (forward + backward =
// 3x forward; attention scores and values over the full T x T, as the CPU kernels compute them).
// Element-wise work (norms, activations, softmax, optimizer) is not counted.
double exact_training_flops_per_token(const ModelConfig& config);

}  // namespace moelab
