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

TEST(Policy, WithinTheTargetItIteratesWhileRoundsShrinkThenWatches) {
  PolicyConfig cfg;
  cfg.downtime_target_ms = 300;
  PolicyState st;
  // 10,000 pages x 4 KiB at 100 MB/s = 410 ms: iterate.
  RoundMeasurement m = M(0, 10'000);
  m.round_ms = 500;
  Decision d = Decide(cfg, m, &st);
  EXPECT_EQ(d.kind, DecisionKind::kIterate);
  EXPECT_NEAR(d.predicted_downtime_ms, 409.6, 0.1);
  // The same pages at 1 KiB each after the codecs: 102 ms, within the target, but the set
  // shrank in this round (first look at 1 KiB): keep going.
  m = M(1, 5'000, 1024);
  m.round_ms = 60;
  d = Decide(cfg, m, &st);
  EXPECT_EQ(d.kind, DecisionKind::kIterate) << d.reason;
  EXPECT_NEAR(d.predicted_downtime_ms, 51.2, 0.1);
  // Shrinking by less than 10%: the set is at its floor, watch for a lull.
  m = M(2, 4'700, 1024);
  m.round_ms = 60;
  d = Decide(cfg, m, &st);
  EXPECT_EQ(d.kind, DecisionKind::kWatch) << d.reason;
  EXPECT_TRUE(d.converged);
  // A long RTT alone keeps it iterating.
  PolicyState st2;
  RoundMeasurement far = M(0, 10, 4096, 100e6);
  far.rtt_ms = 200;
  far.round_ms = 5;
  EXPECT_EQ(Decide(cfg, far, &st2).kind, DecisionKind::kIterate);
}

TEST(Policy, ShortRoundsOrTheLastRoundGoToTheWatch) {
  PolicyConfig cfg;
  PolicyState st;
  RoundMeasurement m = M(0, 100'000);
  m.round_ms = 900;
  EXPECT_EQ(Decide(cfg, m, &st).kind, DecisionKind::kIterate);
  m = M(1, 20'000, 1000);  // shrank a lot, but the round took 8 ms: rounds are as short as the watch's looks
  m.round_ms = 8;
  EXPECT_EQ(Decide(cfg, m, &st).kind, DecisionKind::kWatch);
  PolicyState st3;
  m = M(0, 200);  // the first round (a long one), but 200 pages take 8 ms to send: the watch sends them
  m.round_ms = 900;
  Decision d = Decide(cfg, m, &st3);
  EXPECT_EQ(d.kind, DecisionKind::kWatch);
  EXPECT_NE(d.reason.find("take 8.2 ms to send"), std::string::npos) << d.reason;
  m = M(0, 300);  // 12 ms: another round first
  m.round_ms = 900;
  PolicyState st4;
  EXPECT_EQ(Decide(cfg, m, &st4).kind, DecisionKind::kIterate);
  cfg.max_iterations = 3;
  PolicyState st2;
  for (uint32_t r = 0; r < 3; ++r) {
    m = M(r, 1000 >> r);  // halves every round, always within the target
    m.round_ms = 100;
    const Decision d = Decide(cfg, m, &st2);
    EXPECT_EQ(d.kind, r < 2 ? DecisionKind::kIterate : DecisionKind::kWatch) << r << ": " << d.reason;
  }
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

TEST(Policy, ThrottlesAtOnceWhenTheGuestOutrunsTheLink) {
  PolicyConfig cfg;  // default stall_rounds: no waiting for five rounds without progress
  cfg.allow_throttle = true;
  PolicyState st;
  RoundMeasurement m = M(0, 100'000, 4096, 40e6);  // ~9,766 pages/s on the link
  m.dirty_pages_per_s = 20'000;
  EXPECT_EQ(Decide(cfg, m, &st).kind, DecisionKind::kIterate) << "round 0 sends everything: no rate judgement yet";
  m.round = 1;
  Decision d = Decide(cfg, m, &st);
  ASSERT_EQ(d.kind, DecisionKind::kThrottle) << d.reason;
  EXPECT_NEAR(d.cpu_share, 9'766.0 * 0.5 / 20'000, 0.01);
  // Slower dirtying than the link (shrinking rounds): no further throttling.
  m.round = 2;
  m.remaining_pages = 50'000;
  m.dirty_pages_per_s = 4'000;
  d = Decide(cfg, m, &st);
  EXPECT_EQ(d.kind, DecisionKind::kIterate) << d.reason;
  EXPECT_NEAR(st.cpu_share, 9'766.0 * 0.5 / 20'000, 0.01) << "the share stays where it was";
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

// --- the watch: stop in a lull ---

// A history of `n` windows whose dirty pages come from f(i) (oldest first).
template <typename F>
ActivitySeries Series(size_t n, F f) {
  ActivitySeries a;
  for (size_t i = 0; i < n; ++i) {
    ActivityWindow w;
    w.start_ns = i * a.window_ns;
    f(i, &w);
    a.windows.push_back(w);
  }
  return a;
}
// Bursts of 20 windows at about 200 pages each, then 20 quiet windows (shifted by `shift` windows).
ActivitySeries Bursty(size_t n, size_t shift = 0) {
  return Series(n, [&](size_t i, ActivityWindow* w) {
    const bool on = (i + shift) % 40 < 20;
    w->dirty_pages = on ? 190 + i % 20 : i % 2;
    w->instructions = on ? 5'000'000 : 20'000;
  });
}
WatchMeasurement W(ActivitySeries a, double elapsed_ms = 10, uint64_t remaining = 0) {
  WatchMeasurement m;
  m.link = M(0, remaining, 200, 200e6);
  m.link.fixed_ms = 1;
  m.activity = std::move(a);
  m.elapsed_ms = elapsed_ms;
  m.exposure_ms = 2;
  return m;
}

TEST(PolicyWatch, StopsOnlyOnceTheLastWindowsAreQuiet) {
  PolicyConfig cfg;
  LullAnalysis a;
  // Cycles of 20 busy and 20 quiet windows; 170 windows end 10 windows into a burst.
  Decision d = DecideWatch(cfg, W(Bursty(170)), &a);
  EXPECT_EQ(d.kind, DecisionKind::kWatch) << d.reason;
  EXPECT_EQ(a.trailing_quiet, 0u);
  EXPECT_TRUE(a.varying_signals & 1) << "dirty pages vary";
  EXPECT_TRUE(a.varying_signals & 2) << "instructions vary";
  EXPECT_NEAR(a.longest_busy_ms, 200, 0.1);
  // One quiet window: not a lull yet.
  d = DecideWatch(cfg, W(Bursty(181)));
  EXPECT_EQ(d.kind, DecisionKind::kWatch) << d.reason;
  // Two: a lull.
  d = DecideWatch(cfg, W(Bursty(182)), &a);
  EXPECT_EQ(d.kind, DecisionKind::kStop) << d.reason;
  EXPECT_NE(d.reason.find("lull"), std::string::npos) << d.reason;
  EXPECT_EQ(a.trailing_quiet, 2u);
  // Deep into the quiet phase: still a lull.
  EXPECT_EQ(DecideWatch(cfg, W(Bursty(195))).kind, DecisionKind::kStop);
}

TEST(PolicyWatch, AMuchBusierStartDoesNotMakeTheBurstsLookQuiet) {
  PolicyConfig cfg;
  LullAnalysis a;
  // migration_activity_test's first leg: the guest's workload started 2 s ago (25 windows of
  // 5.7M instructions while it filled its memory), then bursts of 40 windows at 53k
  // instructions and rests of 20 at 5k. A quarter of the mean (about 480k) would make the
  // bursts quiet; the level the guest keeps falling from is the bursts'.
  auto series = [](size_t n) {
    return Series(n, [](size_t i, ActivityWindow* w) {
      w->instructions = i < 25 ? 5'700'000 : (i - 25) % 60 < 40 ? 53'000 + i % 3 * 1000 : 5'000 + i % 4 * 500;
    });
  };
  Decision d = DecideWatch(cfg, W(series(25 + 60 * 4 + 10)), &a);  // 10 windows into a burst
  EXPECT_EQ(d.kind, DecisionKind::kWatch) << d.reason;
  EXPECT_EQ(a.varying_signals, 2u);
  EXPECT_EQ(a.trailing_quiet, 0u);
  d = DecideWatch(cfg, W(series(25 + 60 * 4 + 45)), &a);  // 5 windows into a rest
  EXPECT_EQ(d.kind, DecisionKind::kStop) << d.reason;
  EXPECT_EQ(a.trailing_quiet, 5u);
}

TEST(PolicyWatch, ABurstThatBeganSinceTheNewestWindowIsNoLull) {
  PolicyConfig cfg;
  LullAnalysis a;
  // The closed windows end 19 windows into a rest, but this look's harvest found 150 pages
  // dirtied in 10 ms: the next burst began in the window still open.
  WatchMeasurement m = W(Bursty(199));
  m.newest_dirty_pages = 150;
  m.newest_dirty_span_ms = 10;
  Decision d = DecideWatch(cfg, m, &a);
  EXPECT_EQ(d.kind, DecisionKind::kWatch) << d.reason;
  EXPECT_GE(a.trailing_quiet, 2u);
  EXPECT_NE(d.reason.find("busy now"), std::string::npos) << d.reason;
  // As many pages as a quiet window has (0 or 1 here, plus the floor): a lull.
  m.newest_dirty_pages = 2;
  EXPECT_EQ(DecideWatch(cfg, m).kind, DecisionKind::kStop);
  // Over a longer span the same count is a lower rate: 4 pages in 20 ms are 2 per window.
  m.newest_dirty_pages = 4;
  m.newest_dirty_span_ms = 20;
  EXPECT_EQ(DecideWatch(cfg, m).kind, DecisionKind::kStop);
  m.newest_dirty_span_ms = 5;  // 8 per window
  EXPECT_EQ(DecideWatch(cfg, m).kind, DecisionKind::kWatch);
  // Past the budget (1.5x the longest busy run + the lull) the watch stops anyway.
  m.elapsed_ms = 400;
  EXPECT_EQ(DecideWatch(cfg, m).kind, DecisionKind::kStop);
}

TEST(PolicyWatch, PredictionCountsThePagesDirtiedSinceTheLastHarvest) {
  PolicyConfig cfg;
  // Busy window: 200 pages per 10 ms; exposure 2 ms -> 40 pages; 200 B each at 200 MB/s + 1 ms fixed.
  const ActivitySeries busy = Series(50, [](size_t, ActivityWindow* w) { w->dirty_pages = 200; });
  Decision d = DecideWatch(cfg, W(busy, 10, 10));
  EXPECT_NEAR(d.predicted_downtime_ms, (10 + 40) * 200 * 1000.0 / 200e6 + 1, 1e-6);
  const ActivitySeries idle = Series(50, [](size_t, ActivityWindow* w) { w->dirty_pages = 0; });
  d = DecideWatch(cfg, W(idle, 10, 10));
  EXPECT_NEAR(d.predicted_downtime_ms, 10 * 200 * 1000.0 / 200e6 + 1, 1e-6);
}

TEST(PolicyWatch, SteadyOrIdleActivityStopsAtOnce) {
  PolicyConfig cfg;
  LullAnalysis a;
  const ActivitySeries steady = Series(300, [](size_t i, ActivityWindow* w) {
    w->dirty_pages = 180 + (i * 7) % 40;
    w->instructions = 4'000'000 + (i * 13) % 100'000;
  });
  Decision d = DecideWatch(cfg, W(steady), &a);
  EXPECT_EQ(d.kind, DecisionKind::kStop) << d.reason;
  EXPECT_EQ(a.varying_signals, 0u);
  EXPECT_NE(d.reason.find("steady"), std::string::npos) << d.reason;
  const ActivitySeries idle = Series(300, [](size_t, ActivityWindow*) {});
  EXPECT_EQ(DecideWatch(cfg, W(idle)).kind, DecisionKind::kStop);
  // No series at all (a VMM without activity signals): the set is at its floor, stop.
  d = DecideWatch(cfg, W(ActivitySeries{}));
  EXPECT_EQ(d.kind, DecisionKind::kStop);
}

TEST(PolicyWatch, ASteadySignalDoesNotHideALullInAVaryingOne) {
  PolicyConfig cfg;
  // A 1 kHz echo: 20 packets in every window, whatever memory does.
  ActivitySeries a = Bursty(182);
  for (auto& w : a.windows) w.net_packets = 20;
  LullAnalysis la;
  EXPECT_EQ(DecideWatch(cfg, W(a), &la).kind, DecisionKind::kStop);
  EXPECT_FALSE(la.varying_signals & 4) << "packets are steady";
  // Nor does traffic the VMM handles in batches (40 packets every other window).
  a = Bursty(182);
  for (size_t i = 0; i < a.windows.size(); ++i) a.windows[i].net_packets = i % 2 ? 40 : 0;
  EXPECT_EQ(DecideWatch(cfg, W(a), &la).kind, DecisionKind::kStop);
  EXPECT_FALSE(la.varying_signals & 4) << "batched packets are steady";
  // Traffic that stops with the bursts is a varying signal: a window with packets is busy.
  a = Bursty(182);
  for (size_t i = 0; i < a.windows.size(); ++i) a.windows[i].net_packets = a.windows[i].dirty_pages > 100 ? 30 : 0;
  a.windows.back().net_packets = 30;  // a packet burst in the last window
  EXPECT_EQ(DecideWatch(cfg, W(a), &la).kind, DecisionKind::kWatch);
  EXPECT_TRUE(la.varying_signals & 4);
}

TEST(PolicyWatch, DirtyPagesCountOnlySinceHarvestingBeganTheOtherSignalsAlways) {
  PolicyConfig cfg;
  LullAnalysis a;
  // Before harvesting began the dirty count died down (marks piled up): 0 in the first 150
  // windows. Only the 32 windows since count: the bursts show in them and in the instructions.
  ActivitySeries s = Bursty(182);
  for (size_t i = 0; i < 150; ++i) s.windows[i].dirty_pages = 0;
  WatchMeasurement m = W(s);
  m.dirty_valid_from_ns = s.windows[150].start_ns;
  Decision d = DecideWatch(cfg, m, &a);
  EXPECT_EQ(a.dirty_windows, 32u);
  EXPECT_EQ(a.varying_signals, 3u);
  EXPECT_EQ(d.kind, DecisionKind::kStop) << d.reason;
  EXPECT_NEAR(a.quiet_dirty_per_window, 0.5, 0.5) << "the dead windows do not count as quiet dirty windows";
  // Five windows of steady dirtying since harvesting began, nothing else going on: too little to
  // call it steady; with 10 (min_dirty_windows) it is.
  s = Series(300, [](size_t i, ActivityWindow* w) { w->dirty_pages = i >= 295 ? 200 : 0; });
  m = W(s);
  m.dirty_valid_from_ns = s.windows[295].start_ns;
  d = DecideWatch(cfg, m, &a);
  EXPECT_EQ(d.kind, DecisionKind::kWatch) << d.reason;
  EXPECT_EQ(a.varying_signals, 0u);
  m.dirty_valid_from_ns = s.windows[290].start_ns;
  for (size_t i = 290; i < 295; ++i) m.activity.windows[i].dirty_pages = 200;
  EXPECT_EQ(DecideWatch(cfg, m).kind, DecisionKind::kStop);
}

// 300 windows of a steady guest (1.7M instructions, 20 packets, ~280 dirty pages each), except
// the windows i with low(i): `low_instructions` and no packets.
template <typename F>
ActivitySeries SteadyExcept(F low, uint64_t low_instructions) {
  return Series(300, [&](size_t i, ActivityWindow* w) {
    w->instructions = low(i) ? low_instructions : 1'700'000;
    w->net_packets = low(i) ? 0 : 20;
    w->dirty_pages = 280 + i % 7;
  });
}

TEST(PolicyWatch, TheRoundsWindowsDoNotCountTheirStarvedVcpuIsNoLull) {
  PolicyConfig cfg;
  LullAnalysis a;
  // A steady guest: 200 windows on its own, then 80 windows of rounds in which the migration's
  // sending starved the vCPU in runs of 4 windows out of 8, then 20 windows of the watch.
  ActivitySeries s = SteadyExcept([](size_t i) { return i >= 200 && i < 280 && i / 4 % 2 == 0; }, 10'000);
  WatchMeasurement m = W(s, 200);
  m.dirty_valid_from_ns = s.windows[280].start_ns;
  // Counted, the starved windows make the instructions vary: the watch waits for a lull that
  // never comes.
  Decision d = DecideWatch(cfg, m, &a);
  EXPECT_EQ(d.kind, DecisionKind::kWatch) << d.reason;
  EXPECT_TRUE(a.varying_signals & 2);
  // Left out, the guest is steady: stop.
  m.disturbed_from_ns = s.windows[200].start_ns;
  m.disturbed_to_ns = s.windows[280].start_ns;
  d = DecideWatch(cfg, m, &a);
  EXPECT_EQ(d.kind, DecisionKind::kStop) << d.reason;
  EXPECT_EQ(a.varying_signals, 0u);
  EXPECT_EQ(a.windows, 220u);
  EXPECT_EQ(a.dirty_windows, 20u);
  EXPECT_NE(d.reason.find("steady"), std::string::npos) << d.reason;
}

TEST(Policy, APostcopySwitchPausesForTheStateAndTheDropNotThePages) {
  RoundMeasurement m = M(3, 20000, 4096, 125e6);
  m.state_bytes = 2048;
  m.rtt_ms = 0.25;
  m.fixed_ms = 0.5;
  // 2 KiB at 125 MB/s + 2 RTT + fixed + 20k pages x 1 us.
  EXPECT_NEAR(PredictPostcopySwitchMs(m, 20000), 0.016 + 0.5 + 0.5 + 20.0, 0.01);
  EXPECT_LT(PredictPostcopySwitchMs(m, 20000), PredictDowntimeMs(m) / 10);
}

TEST(PolicyWatch, StopsOnlyAfterAShortLook) {
  PolicyConfig cfg;
  // Steady, within the target, but the last look took 120 ms (it sent the held-back hot pages):
  // what the guest dirtied meanwhile is not at its floor; one more look first.
  ActivitySeries s = Series(300, [](size_t i, ActivityWindow* w) {
    w->dirty_pages = 280 + i % 7;
    w->instructions = 1'700'000;
  });
  WatchMeasurement m = W(s, 130);
  m.exposure_ms = 120;
  Decision d = DecideWatch(cfg, m);
  EXPECT_EQ(d.kind, DecisionKind::kWatch) << d.reason;
  EXPECT_NE(d.reason.find("one more look"), std::string::npos) << d.reason;
  m.exposure_ms = 2;
  EXPECT_EQ(DecideWatch(cfg, m).kind, DecisionKind::kStop);
  // The decision after looks that took a, b, then c ms.
  auto after_looks = [&](double a, double b, double c) {
    m.earlier_exposure_ms[0] = a;
    m.earlier_exposure_ms[1] = b;
    m.exposure_ms = c;
    return DecideWatch(cfg, m).kind;
  };
  // 120 -> 47 -> 18 ms: still shrinking, one more (also 12 -> 9 -> 6 ms: under a window, but
  // the link's burst credit is coming back).
  EXPECT_EQ(after_looks(120, 47, 18), DecisionKind::kWatch);
  EXPECT_EQ(after_looks(12, 9, 6), DecisionKind::kWatch);
  // 9 -> 6 -> 5.5: the last step did not shrink, the one before did: one more.
  EXPECT_EQ(after_looks(9, 6, 5.5), DecisionKind::kWatch);
  // 17 -> 16 -> 16.5: neither step shrank: at the floor (a guest that dirties more than the
  // link carries in a window), stop.
  EXPECT_EQ(after_looks(17, 16, 16.5), DecisionKind::kStop);
  m.earlier_exposure_ms[0] = m.earlier_exposure_ms[1] = 0;
  // Never past max_watch_ms.
  m.exposure_ms = 120;
  m.elapsed_ms = cfg.max_watch_ms;
  EXPECT_EQ(DecideWatch(cfg, m).kind, DecisionKind::kStop);
}

TEST(PolicyWatch, AStepUpIsNoBurst) {
  PolicyConfig cfg;
  LullAnalysis a;
  // A client began sending 1 s ago (packets and instructions stepped up) and has not stopped:
  // no lull followed any activity, so none is waited for.
  ActivitySeries s = SteadyExcept([](size_t i) { return i < 200; }, 300'000);
  WatchMeasurement m = W(s, 200);
  m.dirty_valid_from_ns = s.windows[280].start_ns;
  Decision d = DecideWatch(cfg, m, &a);
  EXPECT_EQ(d.kind, DecisionKind::kStop) << d.reason;
  EXPECT_EQ(a.varying_signals, 0u);
  // The same client stopping for 100 ms once, 300 ms ago: it may again, wait.
  for (size_t i = 250; i < 260; ++i) m.activity.windows[i].net_packets = 0, m.activity.windows[i].instructions = 300'000;
  d = DecideWatch(cfg, m, &a);
  EXPECT_EQ(d.kind, DecisionKind::kWatch) << d.reason;
  EXPECT_EQ(a.varying_signals, 6u) << "packets, and instructions: they fell to 18% of their busy level";
  EXPECT_NEAR(a.longest_busy_ms, 500, 0.1) << "the busy run before that lull; the ongoing one has not ended";
}

TEST(PolicyWatch, ABurstyGuestStillShowsItsBurstsBeforeTheRounds) {
  PolicyConfig cfg;
  LullAnalysis a;
  // Bursts before the migration, the rounds left out, the watch 10 windows into a burst: wait.
  ActivitySeries s = Bursty(330);
  WatchMeasurement m = W(s, 100);
  m.disturbed_from_ns = s.windows[200].start_ns;
  m.disturbed_to_ns = s.windows[320].start_ns;
  m.dirty_valid_from_ns = m.disturbed_to_ns;
  Decision d = DecideWatch(cfg, m, &a);
  EXPECT_EQ(d.kind, DecisionKind::kWatch) << d.reason;
  EXPECT_TRUE(a.varying_signals & 2) << "instructions vary";
  EXPECT_NEAR(a.longest_busy_ms, 200, 0.1) << "no busy run across the left-out span";
  // The guest rested just before the rounds began and the watch has no window yet: that rest is
  // no lull now (the first look comes right after the rounds).
  s = Bursty(330);
  m = W(s, 1);
  m.disturbed_from_ns = s.windows[200].start_ns;  // windows 180..199 are quiet
  m.disturbed_to_ns = s.windows[329].start_ns + s.window_ns;
  m.dirty_valid_from_ns = UINT64_MAX;
  d = DecideWatch(cfg, m, &a);
  EXPECT_EQ(d.kind, DecisionKind::kWatch) << d.reason;
  EXPECT_EQ(a.trailing_quiet, 0u);
}

TEST(PolicyWatch, WaitsForALullOnlyAsLongAsTheHistorySuggests) {
  PolicyConfig cfg;
  // Busy runs of 200 ms: wait up to 1.5 x 200 + 20 = 320 ms.
  EXPECT_EQ(DecideWatch(cfg, W(Bursty(170), 300)).kind, DecisionKind::kWatch);
  const Decision d = DecideWatch(cfg, W(Bursty(170), 330));
  EXPECT_EQ(d.kind, DecisionKind::kStop);
  EXPECT_NE(d.reason.find("no lull within 320 ms"), std::string::npos) << d.reason;
  // Never past max_watch_ms, even when the history has long busy runs.
  cfg.max_watch_ms = 100;
  EXPECT_EQ(DecideWatch(cfg, W(Bursty(170), 100)).kind, DecisionKind::kStop);
}

TEST(PolicyWatch, OverTheTargetItKeepsSendingThenGoesBackToRounds) {
  PolicyConfig cfg;
  cfg.downtime_target_ms = 5;
  // 100,000 pages held over: 100 ms predicted, even in a lull.
  EXPECT_EQ(DecideWatch(cfg, W(Bursty(195), 50, 100'000)).kind, DecisionKind::kWatch);
  const Decision d = DecideWatch(cfg, W(Bursty(195), 2000, 100'000));
  EXPECT_EQ(d.kind, DecisionKind::kIterate) << d.reason;
}

}  // namespace
}  // namespace ferry::migration
