// The VM's activity windows without a VM: what the machine thread reports becomes 10 ms windows.
#include "vmm/activity.h"

#include <gtest/gtest.h>

namespace ferry {
namespace {

constexpr uint64_t kW = ActivityRecorder::kWindowNs;
constexpr uint64_t kT0 = 1000 * kW;  // a window boundary

ActivityRecorder::Totals T(uint64_t dirty, uint64_t instr = 0, uint64_t packets = 0, uint64_t blk = 0) {
  return {dirty, instr, packets, blk};
}

TEST(ActivityRecorder, GrowthIsSpreadOverTheWindowsInProportion) {
  ActivityRecorder r;
  r.Record(kT0, T(0), false);
  EXPECT_TRUE(r.Recent(10, kT0 + kW / 2).windows.empty()) << "no window complete yet";
  // One report covering 2.5 windows: 250 pages, 100 per full window.
  r.Record(kT0 + 5 * kW / 2, T(250, 2500, 5, 1), false);
  auto s = r.Recent(10, kT0 + 5 * kW / 2);
  ASSERT_EQ(s.windows.size(), 2u);
  EXPECT_EQ(s.window_ns, kW);
  EXPECT_EQ(s.windows[0].start_ns, kT0);
  EXPECT_EQ(s.windows[1].start_ns, kT0 + kW);
  EXPECT_EQ(s.windows[0].dirty_pages, 100u);
  EXPECT_EQ(s.windows[1].dirty_pages, 100u);
  EXPECT_EQ(s.windows[0].instructions, 1000u);
  // Closing the third window: its half of the first report plus what came after.
  r.Record(kT0 + 3 * kW, T(260, 2600, 5, 1), false);
  s = r.Recent(10, kT0 + 3 * kW);
  ASSERT_EQ(s.windows.size(), 3u);
  EXPECT_EQ(s.windows[2].dirty_pages, 60u);
  uint64_t dirty = 0, packets = 0, blk = 0;
  for (const auto& w : s.windows) dirty += w.dirty_pages, packets += w.net_packets, blk += w.blk_requests;
  EXPECT_EQ(dirty, 260u) << "nothing lost or invented by the spreading";
  EXPECT_EQ(packets, 5u);
  EXPECT_EQ(blk, 1u);
  EXPECT_EQ(r.Recent(1, kT0 + 3 * kW).windows.at(0).start_ns, kT0 + 2 * kW) << "the newest last";
}

TEST(ActivityRecorder, WindowsOfAWaitAreCompleteAndEmpty) {
  ActivityRecorder r;
  r.Record(kT0, T(0), false);
  r.Record(kT0 + kW / 2, T(50), true);  // then the machine thread waits
  // 3.5 windows later nothing was reported, but the thread is idle: the windows are complete.
  auto s = r.Recent(10, kT0 + 4 * kW);
  ASSERT_EQ(s.windows.size(), 4u);
  EXPECT_EQ(s.windows[0].dirty_pages, 50u);
  for (size_t i = 1; i < 4; ++i) EXPECT_EQ(s.windows[i].dirty_pages, 0u);
  // Running, the thread's windows complete only with its next report.
  r.Record(kT0 + 4 * kW + kW / 2, T(50), false);
  r.Record(kT0 + 5 * kW + kW / 4, T(80), false);
  EXPECT_EQ(r.Recent(10, kT0 + 9 * kW).windows.size(), 5u);
}

TEST(ActivityRecorder, KeepsALimitedHistoryAndSurvivesLongWaitsAndCounterResets) {
  ActivityRecorder r;
  r.Record(kT0, T(0), false);
  for (uint64_t i = 1; i <= 2 * ActivityRecorder::kCapacity; ++i) r.Record(kT0 + i * kW, T(i * 10), false);
  auto s = r.Recent(SIZE_MAX, kT0 + 2 * ActivityRecorder::kCapacity * kW);
  ASSERT_EQ(s.windows.size(), ActivityRecorder::kCapacity);
  for (size_t i = 1; i < s.windows.size(); ++i) ASSERT_EQ(s.windows[i].start_ns, s.windows[i - 1].start_ns + kW);
  EXPECT_EQ(s.windows.back().dirty_pages, 10u);
  // An hour-long wait, then a counter that went backwards (a restored vCPU): no growth counted.
  const uint64_t later = kT0 + 360'000 * kW;
  r.Record(later, T(5), false);
  s = r.Recent(SIZE_MAX, later);
  ASSERT_EQ(s.windows.size(), ActivityRecorder::kCapacity);
  EXPECT_EQ(s.windows.back().start_ns, later - kW);
  for (const auto& w : s.windows) EXPECT_EQ(w.dirty_pages, 0u);
}

}  // namespace
}  // namespace ferry
