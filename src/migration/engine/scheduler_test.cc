// The page scheduler without sockets: passes, runs, layering and its adaptive threshold.
#include "migration/engine/scheduler.h"

#include <gtest/gtest.h>

#include <set>

namespace ferry::migration {
namespace {

PageBitmap Bits(uint64_t pages, std::initializer_list<uint64_t> set) {
  PageBitmap b((pages + 63) / 64, 0);
  for (uint64_t p : set) SetPage(b, p);
  return b;
}
PageBitmap Range(uint64_t pages, uint64_t first, uint64_t count) {
  PageBitmap b((pages + 63) / 64, 0);
  for (uint64_t p = first; p < first + count; ++p) SetPage(b, p);
  return b;
}
std::vector<uint64_t> Order(const Pass& pass) {
  std::vector<uint64_t> v;
  for (const auto& r : pass.runs)
    for (uint64_t p = r.gfn; p < r.gfn + r.count; ++p) v.push_back(p);
  return v;
}

TEST(Scheduler, FirstPassSendsEverythingWithRunsForKnownZeroAndFree) {
  PageScheduler s(16, {});
  s.Start(Range(16, 4, 4), Bits(16, {10, 11}));
  Pass p = s.NextPass(false, 0);
  EXPECT_EQ(p.pages, 16u);
  EXPECT_EQ(p.zero_pages, 4u);
  EXPECT_EQ(p.free_pages, 2u);
  EXPECT_EQ(p.scan_pages, 10u);
  ASSERT_EQ(p.runs.size(), 5u);
  EXPECT_EQ(p.runs[0].kind, RunKind::kScan);
  EXPECT_EQ(p.runs[0].count, 4u);
  EXPECT_EQ(p.runs[1].kind, RunKind::kZero);
  EXPECT_EQ(p.runs[2].kind, RunKind::kScan);
  EXPECT_EQ(p.runs[3].kind, RunKind::kFree);
  EXPECT_EQ(p.runs[3].gfn, 10u);
  EXPECT_EQ(s.pending(), 0u);
  // Nothing written: the next pass is empty.
  s.AddHarvest(Bits(16, {}), Bits(16, {}));
  EXPECT_EQ(s.NextPass(false, 0).pages, 0u);
}

TEST(Scheduler, WrittenPagesComeBackAndAFreedPageIsFreeUntilWritten) {
  PageScheduler s(8, {});
  s.Start({}, {});
  s.NextPass(false, 0);
  s.AddHarvest(Bits(8, {1, 2, 5}), Bits(8, {5}));
  EXPECT_EQ(s.pending(), 3u);
  Pass p = s.NextPass(false, 0);
  ASSERT_EQ(Order(p), (std::vector<uint64_t>{1, 2, 5}));
  EXPECT_EQ(p.free_pages, 1u);
  // Page 5 is written again after the free report: an ordinary page now.
  s.AddHarvest(Bits(8, {5}), Bits(8, {}));
  p = s.NextPass(false, 0);
  EXPECT_EQ(p.free_pages, 0u);
  EXPECT_EQ(p.scan_pages, 1u);
  // A hole is only known-zero until it is sent once.
  PageScheduler z(4, {});
  z.Start(Range(4, 0, 4), {});
  z.NextPass(false, 0);
  z.AddHarvest(Bits(4, {2}), Bits(4, {}));
  EXPECT_EQ(z.NextPass(false, 0).scan_pages, 1u);
}

TEST(Scheduler, HotPagesAreHeldBackUntilTheFinalPass) {
  PageScheduler s(100, {true, 4, 2});
  s.Start({}, {});
  s.NextPass(false, 1000);
  // Pages 0..9 are written every round, page 50 once.
  for (int round = 0; round < 3; ++round) {
    auto dirty = Range(100, 0, 10);
    if (round == 2) SetPage(dirty, 50);
    s.AddHarvest(dirty, Bits(100, {}));
    Pass p = s.NextPass(false, 1000);
    if (round == 0) {
      EXPECT_EQ(p.held_back, 0u) << "one write is not jitter";
      EXPECT_EQ(p.pages, 10u);
    } else {
      EXPECT_EQ(p.held_back, 10u) << "written in 2 of the last 4 rounds";
      EXPECT_EQ(p.hot_k, 2u);
      EXPECT_EQ(p.pages, round == 2 ? 1u : 0u);
    }
  }
  EXPECT_EQ(s.pending(), 10u) << "held-back pages stay pending";
  // The final pass sends everything.
  s.AddHarvest(Range(100, 0, 10), Bits(100, {}));
  Pass f = s.NextPass(true, 0);
  EXPECT_EQ(f.pages, 10u);
  EXPECT_EQ(f.held_back, 0u);
  EXPECT_EQ(s.pending(), 0u);
}

TEST(Scheduler, ThresholdRisesUntilTheHeldBackSetFitsTheBudget) {
  PageScheduler s(100, {true, 4, 2});
  s.Start({}, {});
  s.NextPass(false, 0);
  // Pages 0..9 written in all of 4 rounds, 10..39 in 2 of them.
  for (int round = 0; round < 4; ++round) {
    auto dirty = Range(100, 0, 10);
    if (round >= 2)
      for (uint64_t p = 10; p < 40; ++p) SetPage(dirty, p);
    s.AddHarvest(dirty, Bits(100, {}));
    if (round < 3) s.NextPass(false, 1000);
  }
  // Budget 40: all 40 hot pages held back (k = 2).
  // Budget 15: only the 10 written in 3+ rounds fit (k = 3).
  // Budget 5: nothing fits: k > r, nothing held back.
  auto pass_with = [&](uint64_t budget) {
    PageScheduler copy(s);
    return copy.NextPass(false, budget);
  };
  Pass a = pass_with(40);
  EXPECT_EQ(a.hot_k, 2u);
  EXPECT_EQ(a.held_back, 40u);
  Pass b = pass_with(15);
  EXPECT_EQ(b.hot_k, 3u);
  EXPECT_EQ(b.held_back, 10u);
  EXPECT_EQ(b.pages, 30u);
  Pass c = pass_with(5);
  EXPECT_EQ(c.hot_k, 5u);
  EXPECT_EQ(c.held_back, 0u);
  EXPECT_EQ(c.hot_candidates, 40u);
}

TEST(Scheduler, ColdPagesGoFirst) {
  PageScheduler s(32, {true, 4, 2});
  s.Start({}, {});
  s.NextPass(false, 0);
  s.AddHarvest(Range(32, 0, 8), Bits(32, {}));   // 0..7 written in round 1
  s.NextPass(false, 0);
  // Round 2: 0..7 again plus 20..23; with nothing held back (budget 0) the new ones go first.
  auto dirty = Range(32, 0, 8);
  for (uint64_t p = 20; p < 24; ++p) SetPage(dirty, p);
  s.AddHarvest(dirty, Bits(32, {}));
  Pass p = s.NextPass(false, 0);
  EXPECT_EQ(Order(p), (std::vector<uint64_t>{20, 21, 22, 23, 0, 1, 2, 3, 4, 5, 6, 7}));
}

TEST(Scheduler, LayeringOffHoldsNothingBack) {
  PageScheduler s(10, {false, 4, 2});
  s.Start({}, {});
  s.NextPass(false, 100);
  for (int r = 0; r < 4; ++r) {
    s.AddHarvest(Range(10, 0, 10), Bits(10, {}));
    Pass p = s.NextPass(false, 100);
    EXPECT_EQ(p.held_back, 0u);
    EXPECT_EQ(p.pages, 10u);
  }
}

}  // namespace
}  // namespace ferry::migration
