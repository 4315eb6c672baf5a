// The page scheduler without sockets: passes, runs, layering and its adaptive threshold, samples
// inside a pass.
#include "migration/engine/scheduler.h"

#include <gtest/gtest.h>

#include <algorithm>

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

// A whole pass: its batches concatenated.
struct Drained {
  std::vector<PageRun> runs;
  std::vector<uint64_t> order;
  std::vector<Batch> batches;
  PassStats stats;
};
Drained Drain(PageScheduler& s, bool final, uint64_t budget, BatchLimits limits = {}) {
  Drained d;
  s.BeginPass(final, budget);
  Batch b;
  while (s.NextBatch(limits, &b)) {
    for (const auto& r : b.runs) {
      d.runs.push_back(r);
      for (uint64_t p = r.gfn; p < r.gfn + r.count; ++p) d.order.push_back(p);
    }
    d.batches.push_back(b);
  }
  d.stats = s.pass();
  return d;
}

TEST(Scheduler, FirstPassSendsEverythingWithRunsForKnownZeroAndFree) {
  PageScheduler s(16, {});
  s.Start(Range(16, 4, 4), Bits(16, {10, 11}));
  Drained p = Drain(s, false, 0);
  EXPECT_EQ(p.stats.pages, 16u);
  EXPECT_EQ(p.stats.zero_pages, 4u);
  EXPECT_EQ(p.stats.free_pages, 2u);
  EXPECT_EQ(p.stats.scan_pages, 10u);
  EXPECT_EQ(p.stats.resent_pages, 0u);
  for (const auto& r : p.runs) EXPECT_FALSE(r.resend);
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
  EXPECT_EQ(Drain(s, false, 0).stats.pages, 0u);
}

TEST(Scheduler, BatchesRespectTheLimitsAndMarkResends) {
  PageScheduler s(300, {false, 4, 2});
  s.Start(Range(300, 200, 100), {});
  BatchLimits lim;
  lim.max_scan_pages = 64;
  lim.max_runs = 3;
  Drained p = Drain(s, false, 0, lim);
  for (const auto& b : p.batches) {
    uint64_t scan = 0;
    for (const auto& r : b.runs) scan += r.kind == RunKind::kScan ? r.count : 0;
    EXPECT_LE(scan, 64u);
    EXPECT_LE(b.runs.size(), 3u);
  }
  EXPECT_EQ(p.stats.pages, 300u);
  // The 100 zero pages are one run: reading 200 pages takes 4 batches, the run rides along.
  EXPECT_EQ(p.batches.size(), 4u);
  // Pages 0..9 again (re-sends) and 250 (a hole that was sent as zero: now ordinary memory).
  s.AddHarvest(Range(300, 0, 10), {});
  s.AddHarvest(Bits(300, {250}), {});
  lim.max_pages = 4;  // protocol v1: every page is an entry
  p = Drain(s, false, 0, lim);
  EXPECT_EQ(p.stats.resent_pages, 11u);
  for (const auto& r : p.runs) EXPECT_TRUE(r.resend);
  EXPECT_EQ(p.batches.size(), 3u);  // 11 pages, 4 per batch
  EXPECT_EQ(p.runs.back().kind, RunKind::kScan);
}

TEST(Scheduler, WrittenPagesComeBackAndAFreedPageIsFreeUntilWritten) {
  PageScheduler s(8, {});
  s.Start({}, {});
  Drain(s, false, 0);
  s.AddHarvest(Bits(8, {1, 2, 5}), Bits(8, {5}));
  EXPECT_EQ(s.pending(), 3u);
  Drained p = Drain(s, false, 0);
  ASSERT_EQ(p.order, (std::vector<uint64_t>{1, 2, 5}));
  EXPECT_EQ(p.stats.free_pages, 1u);
  // Page 5 is written again after the free report: an ordinary page now.
  s.AddHarvest(Bits(8, {5}), Bits(8, {}));
  p = Drain(s, false, 0);
  EXPECT_EQ(p.stats.free_pages, 0u);
  EXPECT_EQ(p.stats.scan_pages, 1u);
}

TEST(Scheduler, FirstSendsLeftOutWhenReadCountAsNeverSent) {
  PageScheduler s(8, {true, 4, 2});
  s.Start({}, {});
  Drained first = Drain(s, false, 0);
  ASSERT_EQ(first.stats.pages, 8u);
  // The workers left pages 2 and 3 out when reading them (written since the harvest), and 6 was
  // handed out again after a harvest before its first hand-out came back as left out: it may have
  // been sent by then, so it stays sent.
  s.AddHarvest(Bits(8, {6}), {});
  Drained again = Drain(s, false, 0);
  ASSERT_EQ(again.order, (std::vector<uint64_t>{6}));
  s.Unsend({2, 3, 6, 99});  // 99: out of range, ignored
  s.AddHarvest(Bits(8, {2, 3, 6}), {});
  Drained p = Drain(s, false, 0);
  ASSERT_EQ(p.order, (std::vector<uint64_t>{2, 3, 6}));
  EXPECT_EQ(p.stats.resent_pages, 1u) << "2 and 3 are first sends now; 6 is a re-send";
  for (const auto& r : p.runs) EXPECT_EQ(r.resend, r.gfn == 6) << r.gfn;
  // 2 went out as a first send and was not given back: a re-send from now on. 7's only hand-out,
  // in the first pass, comes back as left out: its next send is its first.
  s.Unsend({7});
  s.AddHarvest(Bits(8, {2, 7}), {});
  p = Drain(s, false, 0);
  for (const auto& r : p.runs) EXPECT_EQ(r.resend, r.gfn == 2) << r.gfn;
}

TEST(Scheduler, AHarvestDuringThePassIsHonoured) {
  PageScheduler s(8, {false, 4, 2});
  s.Start(Range(8, 4, 4), Bits(8, {}));  // 4..7 known zero
  s.BeginPass(false, 0);
  BatchLimits one;
  one.max_pages = 2;
  Batch b;
  ASSERT_TRUE(s.NextBatch(one, &b));  // pages 0, 1 handed out
  // Written now: 0 (already handed out: next pass), 3 (not yet: sent later in this pass, read, not
  // re-queued) and 6 (a hole not handed out yet: must now be read, not sent as zero).
  s.AddHarvest(Bits(8, {0, 3, 6}), Bits(8, {}));
  std::vector<PageRun> rest;
  while (s.NextBatch(one, &b)) rest.insert(rest.end(), b.runs.begin(), b.runs.end());
  bool six_read = false, three_sent = false;
  for (const auto& r : rest) {
    if (r.gfn <= 6 && 6 < r.gfn + r.count) six_read = r.kind == RunKind::kScan;
    if (r.gfn <= 3 && 3 < r.gfn + r.count) three_sent = true;
  }
  EXPECT_TRUE(six_read);
  EXPECT_TRUE(three_sent);
  EXPECT_EQ(s.pending(), 1u) << "only page 0, written after it was handed out";
  Drained next = Drain(s, false, 0);
  EXPECT_EQ(next.order, (std::vector<uint64_t>{0}));
}

TEST(Scheduler, HotPagesAreHeldBackUntilTheFinalPass) {
  PageScheduler s(100, {true, 4, 2});
  s.Start({}, {});
  Drain(s, false, 1000);
  // Pages 0..9 are written every round, page 50 once.
  for (int round = 0; round < 3; ++round) {
    auto dirty = Range(100, 0, 10);
    if (round == 2) SetPage(dirty, 50);
    s.AddHarvest(dirty, Bits(100, {}));
    Drained p = Drain(s, false, 1000);
    if (round == 0) {
      EXPECT_EQ(p.stats.held_back, 0u) << "one write is not jitter";
      EXPECT_EQ(p.stats.pages, 10u);
    } else {
      EXPECT_EQ(p.stats.held_back, 10u) << "written in 2 of the last 4 samples";
      EXPECT_EQ(p.stats.hot_k, 2u);
      EXPECT_EQ(p.stats.pages, round == 2 ? 1u : 0u);
    }
  }
  EXPECT_EQ(s.pending(), 10u) << "held-back pages stay pending";
  // The final pass sends everything.
  s.AddHarvest(Range(100, 0, 10), Bits(100, {}));
  Drained f = Drain(s, true, 0);
  EXPECT_EQ(f.stats.pages, 10u);
  EXPECT_EQ(f.stats.held_back, 0u);
  EXPECT_EQ(s.pending(), 0u);
}

TEST(Scheduler, SamplesInsideAPassHoldBackPagesThatTurnHotDuringIt) {
  // Round 0 of 1000 pages, handed out 100 at a time; pages 900..949 are written at every sample.
  PageScheduler s(1000, {true, 4, 2});
  s.Start({}, {});
  s.BeginPass(false, 100);
  BatchLimits lim;
  lim.max_scan_pages = 100;
  Batch b;
  uint64_t sent_hot = 0;
  while (s.NextBatch(lim, &b)) {
    for (const auto& r : b.runs)
      for (uint64_t p = r.gfn; p < r.gfn + r.count; ++p) sent_hot += p >= 900 && p < 950;
    s.AddHarvest(Range(1000, 900, 50), Bits(1000, {}));
  }
  EXPECT_EQ(sent_hot, 0u) << "recognised as hot before the pass reached them";
  EXPECT_EQ(s.pass().held_back, 50u);
  EXPECT_EQ(s.pending(), 50u);
}

TEST(Scheduler, ThresholdRisesUntilTheHeldBackSetFitsTheBudget) {
  PageScheduler s(100, {true, 4, 2});
  s.Start({}, {});
  Drain(s, false, 0);
  // Pages 0..9 written in all of 4 samples, 10..39 in the last 2 of them.
  for (int round = 0; round < 4; ++round) {
    auto dirty = Range(100, 0, 10);
    if (round >= 2)
      for (uint64_t p = 10; p < 40; ++p) SetPage(dirty, p);
    s.AddHarvest(dirty, Bits(100, {}));
    if (round < 3) Drain(s, false, 1000);
  }
  auto pass_with = [&](uint64_t budget) {
    PageScheduler copy(s);
    return Drain(copy, false, budget).stats;
  };
  // Budget 40: all 40 hot pages held back (k = 2). Budget 15: only the 10 written in 3+ samples
  // (k = 3). Budget 5: nothing fits: k > r, nothing held back.
  PassStats a = pass_with(40);
  EXPECT_EQ(a.hot_k, 2u);
  EXPECT_EQ(a.held_back, 40u);
  PassStats b = pass_with(15);
  EXPECT_EQ(b.hot_k, 3u);
  EXPECT_EQ(b.held_back, 10u);
  EXPECT_EQ(b.pages, 30u);
  PassStats c = pass_with(5);
  EXPECT_EQ(c.hot_k, 5u);
  EXPECT_EQ(c.held_back, 0u);
  EXPECT_EQ(c.hot_candidates, 40u);
}

TEST(Scheduler, ColdPagesGoFirst) {
  PageScheduler s(32, {true, 4, 2});
  s.Start({}, {});
  Drain(s, false, 0);
  s.AddHarvest(Range(32, 0, 8), Bits(32, {}));  // 0..7 written
  Drain(s, false, 0);
  // Again 0..7, plus 20..23 for the first time; with nothing held back (budget 0) the new ones go first.
  auto dirty = Range(32, 0, 8);
  for (uint64_t p = 20; p < 24; ++p) SetPage(dirty, p);
  s.AddHarvest(dirty, Bits(32, {}));
  Drained p = Drain(s, false, 0);
  EXPECT_EQ(p.order, (std::vector<uint64_t>{20, 21, 22, 23, 0, 1, 2, 3, 4, 5, 6, 7}));
}

TEST(Scheduler, UnwrittenPagesOfWarmRegionsGoAfterThoseOfColdRegions) {
  // Three 2 MiB regions. Before the first pass a sample saw 100 pages of region 1 written (a
  // warm region) and one page of region 2 (cold: under 1/8 of it).
  const uint64_t n = 3 * 512;
  PageScheduler s(n, {true, 4, 2});
  s.Start({}, {});
  auto dirty = Range(n, 512, 100);
  SetPage(dirty, 1100);
  s.AddHarvest(dirty, Bits(n, {}));
  Drained p = Drain(s, false, 0);
  ASSERT_EQ(p.order.size(), n);
  std::vector<uint64_t> want;
  for (uint64_t q = 0; q < 512; ++q) want.push_back(q);                         // region 0: cold
  for (uint64_t q = 1024; q < n; ++q) if (q != 1100) want.push_back(q);         // region 2: cold, unwritten
  for (uint64_t q = 612; q < 1024; ++q) want.push_back(q);                      // region 1: warm, unwritten
  want.push_back(1100);                                                         // written once
  for (uint64_t q = 512; q < 612; ++q) want.push_back(q);
  std::sort(want.end() - 101, want.end());  // the written ones: one class, address order
  EXPECT_EQ(p.order, want);
}

TEST(Scheduler, LayeringOffHoldsNothingBack) {
  PageScheduler s(10, {false, 4, 2});
  s.Start({}, {});
  Drain(s, false, 100);
  for (int r = 0; r < 4; ++r) {
    s.AddHarvest(Range(10, 0, 10), Bits(10, {}));
    Drained p = Drain(s, false, 100);
    EXPECT_EQ(p.stats.held_back, 0u);
    EXPECT_EQ(p.stats.pages, 10u);
  }
}

}  // namespace
}  // namespace ferry::migration
