#pragma once
#include <cstdint>

#include "config/config.h"

namespace moelab {

// Learning rate at optimizer step `step` (0-based) of `total` steps:
//   warm-up: lr * (step + 1) / warmup, linear from lr/warmup to lr;
//   cosine:  min_lr + (lr - min_lr) * (1 + cos(pi * p)) / 2, p = (step - warmup) / (total - warmup);
//   wsd:     lr until the last `decay_fraction` of all steps, then linear to min_lr at the final step;
//   constant: lr.
double learning_rate(const TrainConfig& train, int64_t step);

}  // namespace moelab
