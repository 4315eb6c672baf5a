// GuestMemory and DirtyLog: mark values 0/1/2 and their transitions, Harvest with the
// freed bitmap, MarkFreed's listener call and code-watch rule, Discard releasing host
// memory (memfd blocks) and reading back zero, and bounds; the dirty-rate sampling clear and the
// migration's claim on the log.
#include <sys/stat.h>

#include <algorithm>
#include <atomic>
#include <cstring>
#include <thread>
#include <vector>

#include <gtest/gtest.h>

#include "memory/guest_memory.h"

namespace ferry {
namespace {

constexpr uint64_t kBase = 0x80000000, kSize = 16 << 20, kPages = kSize >> kPageShift;

bool Bit(const std::vector<uint64_t>& bm, uint64_t page) { return (bm[page / 64] >> (page % 64)) & 1; }

class CountingListener : public HarvestListener {
 public:
  void OnDirtyLogHarvest() override { calls++; }
  int calls = 0;
};

uint8_t Mark(DirtyLog& log, uint64_t page) { return log.raw_marks()[page]; }

TEST(DirtyLog, MarksWrittenFreedAndTheirTransitions) {
  DirtyLog log(64);
  EXPECT_EQ(Mark(log, 3), DirtyLog::kMarkClean);
  log.MarkPage(3);
  EXPECT_EQ(Mark(log, 3), DirtyLog::kMarkWritten);
  log.MarkFreed(3, 1);  // free after write -> 2
  EXPECT_EQ(Mark(log, 3), DirtyLog::kMarkFreed);
  EXPECT_TRUE(log.IsDirty(3));
  EXPECT_TRUE(log.IsFreed(3));
  log.MarkRange(3 * kPageSize + 100, 8);  // write after free -> 1
  EXPECT_EQ(Mark(log, 3), DirtyLog::kMarkWritten);
  EXPECT_TRUE(log.IsDirty(3));
  EXPECT_FALSE(log.IsFreed(3));
  // The CPU's store path writes the raw byte 1: same effect.
  log.MarkFreed(4, 1);
  __atomic_store_n(&log.raw_marks()[4], 1, __ATOMIC_RELEASE);
  EXPECT_FALSE(log.IsFreed(4));
  // MarkAll makes every page written except freed ones, which stay freed (a migrated-in VM keeps
  // its free pages known).
  log.MarkFreed(5, 2);
  log.MarkAll();
  EXPECT_EQ(log.CountFreed(), 2u);
  EXPECT_TRUE(log.IsFreed(5) && log.IsFreed(6));
  EXPECT_EQ(log.CountDirty(), 64u);
}

TEST(DirtyLog, HarvestReportsDirtyAndFreedAndClearsBoth) {
  DirtyLog log(200);
  CountingListener l;
  log.AddListener(&l);
  log.MarkPage(1);                // written
  log.MarkFreed(70, 3);           // freed 70..72
  log.MarkPage(71);               // 71 reused: written
  log.MarkPage(150);
  log.MarkFreed(150, 1);          // written, then reported free: freed
  log.MarkFreed(199, 5);          // clipped to the last page
  EXPECT_EQ(log.CountDirty(), 6u);
  EXPECT_EQ(log.CountFreed(), 4u);
  l.calls = 0;
  std::vector<uint64_t> dirty{1, 2, 3}, freed{7};  // stale contents are replaced
  log.Harvest(&dirty, &freed);
  EXPECT_EQ(l.calls, 1);
  ASSERT_EQ(dirty.size(), 4u);
  ASSERT_EQ(freed.size(), 4u);
  for (uint64_t p = 0; p < 200; ++p) {
    const bool want_dirty = p == 1 || (p >= 70 && p <= 72) || p == 150 || p == 199;
    const bool want_freed = p == 70 || p == 72 || p == 150 || p == 199;
    EXPECT_EQ(Bit(dirty, p), want_dirty) << p;
    EXPECT_EQ(Bit(freed, p), want_freed) << p;
    EXPECT_TRUE(!Bit(freed, p) || Bit(dirty, p)) << "freed is a subset of dirty: " << p;
  }
  EXPECT_EQ(dirty[3] >> (200 - 192), 0u) << "no bits beyond num_pages";
  EXPECT_EQ(log.CountDirty(), 0u);
  EXPECT_EQ(log.CountFreed(), 0u);
  // The dirty-only form still reports freed pages as dirty, and a null freed is allowed.
  log.MarkFreed(10, 1);
  log.MarkPage(11);
  auto bm = log.Harvest();
  EXPECT_TRUE(Bit(bm, 10));
  EXPECT_TRUE(Bit(bm, 11));
  log.MarkFreed(12, 1);
  log.Harvest(&dirty, nullptr);
  EXPECT_TRUE(Bit(dirty, 12));
  log.Harvest(&dirty, &freed);
  EXPECT_EQ(std::count_if(dirty.begin(), dirty.end(), [](uint64_t w) { return w != 0; }), 0);
  EXPECT_EQ(std::count_if(freed.begin(), freed.end(), [](uint64_t w) { return w != 0; }), 0);
  log.RemoveListener(&l);
}

TEST(DirtyLog, MarkFreedCallsListenersAndAppliesTheCodeWatchRule) {
  DirtyLog log(32);
  CountingListener a, b;
  log.AddListener(&a);
  log.AddListener(&b);
  log.MarkFreed(2, 1);
  EXPECT_EQ(a.calls, 1);
  EXPECT_EQ(b.calls, 1);
  // Out of range or empty: nothing marked (listeners may or may not be called).
  log.MarkFreed(32, 4);
  log.MarkFreed(5, 0);
  EXPECT_EQ(log.CountFreed(), 1u);

  // Decoded code on page 7 (watch byte 1): a free report flags it (2) and bumps the
  // generation, exactly like a device write; unwatched pages do not bump it.
  uint8_t* watch = log.raw_code_watch();
  watch[7] = 1;
  const uint64_t gen = log.code_write_generation();
  log.MarkFreed(8, 2);
  EXPECT_EQ(log.code_write_generation(), gen);
  log.MarkFreed(6, 3);
  EXPECT_EQ(watch[7], 2);
  EXPECT_EQ(log.code_write_generation(), gen + 1);
  log.RemoveListener(&a);
  log.RemoveListener(&b);
  log.MarkFreed(1, 1);
  EXPECT_EQ(a.calls, 3);
}

// Dirty-rate sampling: the clear turns written marks clean (freed pages stay freed), counts a
// page again once it is rewritten, and clears nothing while a migration claims the log.
TEST(DirtyLog, SamplingClearKeepsFreedCountsRewritesAndWaitsForTheEngine) {
  DirtyLog log(100);
  CountingListener l;
  log.AddListener(&l);
  for (uint64_t p = 0; p < 10; ++p) log.MarkPage(p);
  log.MarkFreed(50, 2);
  EXPECT_EQ(log.NewlyDirtied(), 10u);
  for (uint64_t p = 0; p < 10; ++p) log.MarkPage(p);
  EXPECT_EQ(log.NewlyDirtied(), 10u) << "rewrites of marked pages do not count";
  l.calls = 0;
  ASSERT_TRUE(log.ClearWrittenUnlessClaimed());
  EXPECT_EQ(l.calls, 1) << "cached write permissions dropped, as after a harvest";
  EXPECT_EQ(log.CountDirty(), 2u);
  EXPECT_TRUE(log.IsFreed(50) && log.IsFreed(51));
  for (uint64_t p = 0; p < 10; ++p) log.MarkPage(p);
  EXPECT_EQ(log.NewlyDirtied(), 20u) << "a page rewritten after the clear counts again";

  // Claimed (a migration tracks): nothing is cleared, nested claims count.
  log.BeginTracking();
  log.BeginTracking();
  EXPECT_FALSE(log.ClearWrittenUnlessClaimed());
  EXPECT_EQ(log.CountDirty(), 12u);
  log.EndTracking();
  EXPECT_FALSE(log.ClearWrittenUnlessClaimed());
  EXPECT_EQ(log.CountDirty(), 12u);
  log.EndTracking();
  EXPECT_TRUE(log.ClearWrittenUnlessClaimed());
  EXPECT_EQ(log.CountDirty(), 2u);
  log.EndTracking();  // an extra end is harmless
  log.RemoveListener(&l);
}

// The safety property with a writer running: a page written after the engine's first harvest is
// in one of its later harvests, however the sampler's clears interleave with BeginTracking.
TEST(DirtyLog, NoWriteAfterTheFirstHarvestIsLostToASamplingClear) {
  for (int trial = 0; trial < 200; ++trial) {
    DirtyLog log(256);
    std::atomic<bool> stop{false};
    std::thread sampler([&] {
      while (!stop.load()) (void)log.ClearWrittenUnlessClaimed();
    });
    log.BeginTracking();
    std::vector<uint64_t> first;
    log.Harvest(&first, nullptr);
    // Written after the first harvest: must be in the next one.
    for (uint64_t p = 0; p < 256; p += 3) log.MarkPage(p);
    std::vector<uint64_t> second;
    log.Harvest(&second, nullptr);
    stop.store(true);
    sampler.join();
    log.EndTracking();
    for (uint64_t p = 0; p < 256; p += 3) ASSERT_TRUE(Bit(second, p)) << "trial " << trial << " page " << p;
  }
}

uint64_t MemfdBlocks(const GuestMemory& m) {
  struct stat st {};
  EXPECT_EQ(fstat(m.memfd(), &st), 0);
  return static_cast<uint64_t>(st.st_blocks);  // 512-byte units
}

TEST(GuestMemory, DiscardReleasesHostMemoryReadsZeroAndMarksFreed) {
  auto m = std::move(*GuestMemory::Create(kBase, kSize));
  CountingListener l;
  m->dirty_log().AddListener(&l);
  // Populate 1 MiB at 2 MiB with non-zero data.
  std::vector<uint8_t> data(1 << 20, 0xa5);
  ASSERT_TRUE(m->Write(kBase + (2 << 20), data.data(), data.size()));
  const uint64_t before = MemfdBlocks(*m);
  ASSERT_GE(before * 512, data.size());
  (void)m->dirty_log().Harvest();
  l.calls = 0;

  ASSERT_TRUE(m->Discard(kBase + (2 << 20), 1 << 20));
  const uint64_t after = MemfdBlocks(*m);
  EXPECT_LE(after * 512 + (1 << 20), before * 512) << "1 MiB of host memory released: " << before << " -> " << after;
  EXPECT_GE(l.calls, 1) << "write permissions revoked";
  for (uint64_t p = 512; p < 768; ++p) EXPECT_TRUE(m->dirty_log().IsFreed(p)) << p;
  EXPECT_FALSE(m->dirty_log().IsDirty(511));
  EXPECT_FALSE(m->dirty_log().IsDirty(768));
  // Contents read as zero (after the block check: reading a hole of the mapping allocates).
  std::vector<uint8_t> back(data.size(), 1);
  ASSERT_TRUE(m->Read(kBase + (2 << 20), back.data(), back.size()));
  EXPECT_TRUE(std::all_of(back.begin(), back.end(), [](uint8_t b) { return b == 0; }));
  // A write after the report: written again (1), data visible.
  uint64_t v = 0x1122334455667788;
  ASSERT_TRUE(m->Write(kBase + (2 << 20) + 8, &v, 8));
  EXPECT_FALSE(m->dirty_log().IsFreed(512));
  EXPECT_TRUE(m->dirty_log().IsDirty(512));
  uint64_t r = 0;
  ASSERT_TRUE(m->Read(kBase + (2 << 20) + 8, &r, 8));
  EXPECT_EQ(r, v);
  m->dirty_log().RemoveListener(&l);
}

TEST(GuestMemory, DiscardTouchesWholePagesOnlyAndChecksBounds) {
  auto m = std::move(*GuestMemory::Create(kBase, kSize));
  std::vector<uint8_t> data(4 * kPageSize, 0x5a);
  ASSERT_TRUE(m->Write(kBase + 0x10000, data.data(), data.size()));  // pages 16..19
  (void)m->dirty_log().Harvest();
  // [page 16 + 100, page 19 + 50): whole pages 17 and 18 only.
  ASSERT_TRUE(m->Discard(kBase + 0x10000 + 100, 3 * kPageSize - 50));
  auto& log = m->dirty_log();
  EXPECT_FALSE(log.IsDirty(16));
  EXPECT_TRUE(log.IsFreed(17));
  EXPECT_TRUE(log.IsFreed(18));
  EXPECT_FALSE(log.IsDirty(19));
  EXPECT_EQ(m->host()[0x10000 + kPageSize - 1], 0x5a) << "partial page kept";
  EXPECT_EQ(m->host()[0x10000 + kPageSize], 0) << "whole page discarded";
  EXPECT_EQ(m->host()[0x13000], 0x5a) << "partial page kept";
  // Less than a page, or empty: nothing happens, not an error.
  ASSERT_TRUE(m->Discard(kBase + 0x13001, kPageSize - 2));
  ASSERT_TRUE(m->Discard(kBase + 0x13000, 0));
  EXPECT_FALSE(log.IsDirty(19));
  EXPECT_EQ(m->host()[0x13001], 0x5a);
  // Outside RAM (below, above, straddling the end, wrapping): refused, nothing changed.
  EXPECT_FALSE(m->Discard(kBase - kPageSize, kPageSize));
  EXPECT_FALSE(m->Discard(kBase + kSize, kPageSize));
  auto e = m->Discard(kBase + kSize - kPageSize, 2 * kPageSize);
  ASSERT_FALSE(e);
  EXPECT_EQ(e.error().code(), ErrorCode::kInvalidArgument);
  EXPECT_NE(e.error().message().find("outside RAM"), std::string::npos) << e.error().ToString();
  EXPECT_FALSE(m->Discard(~0ull - kPageSize, 2 * kPageSize));
  EXPECT_FALSE(log.IsDirty(kPages - 1));
  // The whole of RAM, exactly.
  ASSERT_TRUE(m->Discard(kBase, kSize));
  EXPECT_EQ(log.CountFreed(), kPages);
  EXPECT_EQ(log.CountDirty(), kPages);
}

}  // namespace
}  // namespace ferry
