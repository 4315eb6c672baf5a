// The convergence policy as a pure function: no sockets, no clocks.
#include "migration/engine/policy.h"

#include <gtest/gtest.h>

namespace ferry::migration {
namespace {

RoundMeasurement M(uint32_t round, uint64_t remaining, double bpp = 4096, double bw = 100e6) {
  RoundMeasurement m;
  m.round = round;
  m.remaining_pages = remaining;
  m.wire_bytes_per_page = bpp;
  m.bandwidth_bytes_per_s = bw;
  m.state_bytes = 0;
  m.rtt_ms = 0;
  m.fixed_ms = 0;
  m.dirty_pages_per_s = 1000;
  return m;
}

TEST(Policy, PredictionUsesMeasuredBytesPerPageStateAndRtt) {
  RoundMeasurement m = M(0, 1000, 1000, 1e6);  // 1 MB at 1 MB/s = 1000 ms
  EXPECT_DOUBLE_EQ(PredictDowntimeMs(m), 1000.0);
  m.wire_bytes_per_page = 100;  // compressed/delta pages: 10x cheaper
  EXPECT_DOUBLE_EQ(PredictDowntimeMs(m), 100.0);
  m.state_bytes = 50'000;  // + 50 ms
  m.rtt_ms = 20;           // + 2 round trips
  m.fixed_ms = 3;
  EXPECT_DOUBLE_EQ(PredictDowntimeMs(m), 100.0 + 50.0 + 40.0 + 3.0);
}

TEST(Policy, StopsWhenThePredictionFitsTheTarget) {
  PolicyConfig cfg;
  cfg.downtime_target_ms = 300;
  PolicyState st;
  // 10,000 pages x 4 KiB at 100 MB/s = 410 ms: iterate.
  Decision d = Decide(cfg, M(0, 10'000), &st);
  EXPECT_EQ(d.kind, DecisionKind::kIterate);
  EXPECT_NEAR(d.predicted_downtime_ms, 409.6, 0.1);
  // The same pages at 1 KiB each after the codecs: 102 ms, stop.
  d = Decide(cfg, M(1, 10'000, 1024), &st);
  EXPECT_EQ(d.kind, DecisionKind::kStop);
  EXPECT_TRUE(d.converged);
  // A long RTT alone can keep it from stopping.
  RoundMeasurement far = M(2, 10, 4096, 100e6);
  far.rtt_ms = 200;
  EXPECT_EQ(Decide(cfg, far, &st).kind, DecisionKind::kIterate);
}

TEST(Policy, NonConvergenceFollowsTheConfiguredPolicy) {
  for (ConvergePolicy p : {ConvergePolicy::kForce, ConvergePolicy::kFail, ConvergePolicy::kContinue}) {
    PolicyConfig cfg;
    cfg.on_stall = p;
    cfg.stall_rounds = 3;
    cfg.max_iterations = 10;
    PolicyState st;
    Decision d;
    uint32_t round = 0;
    // The remaining set never shrinks by 10%.
    for (; round < 10; ++round) {
      d = Decide(cfg, M(round, 100'000), &st);
      if (d.kind != DecisionKind::kIterate) break;
    }
    switch (p) {
      case ConvergePolicy::kForce:
        EXPECT_EQ(d.kind, DecisionKind::kStop);
        EXPECT_FALSE(d.converged);
        EXPECT_EQ(round, 3u) << "first round sets the best, then three stalled rounds";
        break;
      case ConvergePolicy::kFail:
        EXPECT_EQ(d.kind, DecisionKind::kFail);
        EXPECT_EQ(round, 3u);
        break;
      case ConvergePolicy::kContinue:
        EXPECT_EQ(d.kind, DecisionKind::kFail) << "continue stops at max_iterations";
        EXPECT_EQ(round, 9u);
        EXPECT_NE(d.reason.find("after 10 iterations"), std::string::npos) << d.reason;
        break;
    }
  }
}

TEST(Policy, ShrinkingRoundsResetTheStallCount) {
  PolicyConfig cfg;
  cfg.stall_rounds = 2;
  PolicyState st;
  uint64_t remaining = 1'000'000;
  for (uint32_t r = 0; r < 20; ++r) {
    EXPECT_EQ(Decide(cfg, M(r, remaining), &st).kind, DecisionKind::kIterate) << r;
    remaining = remaining * 85 / 100;  // 15% smaller every round
    if (remaining < 8000) break;
  }
}

TEST(Policy, ThrottleOnlyWhenAllowedAndOnlyAsMuchAsNeeded) {
  PolicyConfig cfg;
  cfg.stall_rounds = 1;
  cfg.on_stall = ConvergePolicy::kFail;
  PolicyState st;
  RoundMeasurement m = M(0, 100'000, 4096, 40e6);  // ~9,766 pages/s on the link
  m.dirty_pages_per_s = 15'000;
  EXPECT_EQ(Decide(cfg, m, &st).kind, DecisionKind::kIterate);
  m.round = 1;
  EXPECT_EQ(Decide(cfg, m, &st).kind, DecisionKind::kFail) << "throttling not allowed";

  cfg.allow_throttle = true;
  PolicyState st2;
  m.round = 0;
  EXPECT_EQ(Decide(cfg, m, &st2).kind, DecisionKind::kIterate);
  m.round = 1;
  Decision d = Decide(cfg, m, &st2);
  ASSERT_EQ(d.kind, DecisionKind::kThrottle);
  // Dirtying at most half of what the link carries: 9,766 * 0.5 / 15,000 = 0.33.
  EXPECT_NEAR(d.cpu_share, 0.3255, 0.01);
  EXPECT_GE(d.cpu_share, cfg.min_cpu_share);
  // Never below the floor.
  m.dirty_pages_per_s = 1e9;
  m.round = 2;
  d = Decide(cfg, m, &st2);
  ASSERT_EQ(d.kind, DecisionKind::kThrottle);
  EXPECT_DOUBLE_EQ(d.cpu_share, cfg.min_cpu_share);
}

TEST(Policy, PostcopyOnlyWhenAllowed) {
  PolicyConfig cfg;
  PolicyState st;
  RoundMeasurement m = M(0, 100'000, 4096, 10e6);
  m.dirty_pages_per_s = 50'000;  // far above the ~2,441 pages/s the link carries
  EXPECT_EQ(Decide(cfg, m, &st).kind, DecisionKind::kIterate);
  cfg.allow_postcopy = true;
  PolicyState st2;
  EXPECT_EQ(Decide(cfg, m, &st2).kind, DecisionKind::kPostcopy);
}

}  // namespace
}  // namespace ferry::migration
