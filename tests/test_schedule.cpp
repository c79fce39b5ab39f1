// Learning-rate schedules against values worked out by hand, and the gradient-clip factor.
#include <gtest/gtest.h>

#include <cmath>

#include "optim/adamw.h"
#include "optim/schedule.h"

namespace moelab {
namespace {

TrainConfig base() {
  TrainConfig t;
  t.lr = 1.0;
  t.min_lr = 0.1;
  t.warmup_steps = 4;
  t.steps = 14;
  return t;
}

TEST(Schedule, WarmupIsLinear) {
  TrainConfig t = base();
  EXPECT_DOUBLE_EQ(learning_rate(t, 0), 0.25);
  EXPECT_DOUBLE_EQ(learning_rate(t, 1), 0.5);
  EXPECT_DOUBLE_EQ(learning_rate(t, 3), 1.0);
}

TEST(Schedule, CosineDecaysToFloor) {
  TrainConfig t = base();
  // p = (step - 4) / 10; lr = 0.1 + 0.45 (1 + cos(pi p))
  EXPECT_DOUBLE_EQ(learning_rate(t, 4), 1.0);
  EXPECT_NEAR(learning_rate(t, 9), 0.55, 1e-12);                                  // p = 0.5
  EXPECT_NEAR(learning_rate(t, 13), 0.1 + 0.45 * (1 + std::cos(M_PI * 0.9)), 1e-12);  // last step
  EXPECT_NEAR(learning_rate(t, 100), 0.1, 1e-12);  // beyond the end: stays at the floor
}

TEST(Schedule, WsdIsStableThenLinearDecay) {
  TrainConfig t = base();
  t.schedule = ScheduleKind::WSD;
  t.wsd_decay_fraction = 0.2;  // last round(2.8) = 3 steps decay: steps 11, 12, 13
  for (int s = 4; s <= 10; ++s) EXPECT_DOUBLE_EQ(learning_rate(t, s), 1.0) << s;
  EXPECT_NEAR(learning_rate(t, 11), 1.0 - 0.9 / 3, 1e-12);
  EXPECT_NEAR(learning_rate(t, 12), 1.0 - 0.9 * 2 / 3, 1e-12);
  EXPECT_NEAR(learning_rate(t, 13), 0.1, 1e-12);
}

TEST(Schedule, Constant) {
  TrainConfig t = base();
  t.schedule = ScheduleKind::Constant;
  EXPECT_DOUBLE_EQ(learning_rate(t, 10), 1.0);
}

TEST(Clip, FactorMatchesTorchClipGradNorm) {
  EXPECT_FLOAT_EQ(clip_factor(0.5, 1.0), 1.f);
  EXPECT_FLOAT_EQ(clip_factor(4.0, 1.0), static_cast<float>(1.0 / (4.0 + 1e-6)));
  EXPECT_FLOAT_EQ(clip_factor(4.0, 0.0), 1.f);  // disabled
}

}  // namespace
}  // namespace moelab
