#include "optim/schedule.h"

#include <algorithm>
#include <cmath>

namespace moelab {

double learning_rate(const TrainConfig& t, int64_t step) {
  if (step < t.warmup_steps) return t.lr * static_cast<double>(step + 1) / static_cast<double>(t.warmup_steps);
  switch (t.schedule) {
    case ScheduleKind::Constant: return t.lr;
    case ScheduleKind::Cosine: {
      const double p = static_cast<double>(step - t.warmup_steps) / std::max<int64_t>(1, t.steps - t.warmup_steps);
      return t.min_lr + 0.5 * (t.lr - t.min_lr) * (1.0 + std::cos(M_PI * std::min(1.0, p)));
    }
    case ScheduleKind::WSD: {
      const int64_t decay_steps = static_cast<int64_t>(std::llround(t.wsd_decay_fraction * t.steps));
      const int64_t decay_start = std::max(t.warmup_steps, t.steps - decay_steps);
      if (step < decay_start || decay_steps == 0) return t.lr;
      // Reaches min_lr on the last step (step = steps - 1).
      const double p = static_cast<double>(step - decay_start + 1) / std::max<int64_t>(1, t.steps - decay_start);
      return t.lr + (t.min_lr - t.lr) * std::min(1.0, p);
    }
  }
  return t.lr;
}

}  // namespace moelab
