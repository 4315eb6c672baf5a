// Page scheduler of a pre-copy migration: which pages the next pass sends, and in which order
// (layered copy with a dirty-jitter debounce, seeds 000 and 002).
//
// Per page it keeps:
//   pending  - must be sent: never sent, or written since it was last sent;
//   free     - reported free by the guest and not written since (sent as a FREE run, unread);
//   zero     - known to read as zero without looking (a never-written hole at the start);
//   history  - bit i set = written during the round i rounds ago (8 rounds kept).
// A page is hot when it was written in at least k of the last r rounds (r = `window`). Hot pending
// pages are held back - left pending - until the final pass: sending them would only be undone by
// the next write. k starts at `min_hot` and rises, pass by pass, until the held-back set fits the
// caller's budget (pages it can afford to add to the pause); k = r + 1 holds nothing back.
// A pass sends cold pages first: pages written in fewer recent rounds before pages written in
// more (the likeliest to be written again go last), address order within a class, runs merged.
//
// Not thread-safe: owned by the migration thread. Cost: O(pages) per round.
#pragma once

#include <cstdint>
#include <vector>

#include "migration/engine/vm_interface.h"

namespace ferry::migration {

enum class RunKind : uint8_t { kScan, kZero, kFree };
struct PageRun {
  uint64_t gfn = 0;
  uint32_t count = 0;
  RunKind kind = RunKind::kScan;
};

struct LayeringConfig {
  bool enabled = true;
  uint32_t window = 4;   // r: rounds of history that count (1..8)
  uint32_t min_hot = 2;  // smallest k: one write is not jitter
};

struct Pass {
  std::vector<PageRun> runs;
  uint64_t pages = 0, scan_pages = 0, zero_pages = 0, free_pages = 0;
  uint64_t held_back = 0;       // hot pages left pending by this pass
  uint64_t hot_candidates = 0;  // pending pages written in >= min_hot of the last r rounds
  uint32_t hot_k = 0;           // threshold used (> window: nothing held back)
  uint32_t window = 0;
};

class PageScheduler {
 public:
  PageScheduler(uint64_t pages, LayeringConfig cfg);
  // Start of the migration: every page pending. known_zero / freed may be empty.
  void Start(const PageBitmap& known_zero, const PageBitmap& freed);
  // End of a round: the pages written during it become pending (freed ones as free).
  void AddHarvest(const PageBitmap& dirty, const PageBitmap& freed);
  // The next pass; its pages stop being pending. final: nothing is held back.
  Pass NextPass(bool final, uint64_t holdback_budget_pages);
  uint64_t pending() const { return pending_; }
  uint64_t pages() const { return pages_; }
  const LayeringConfig& config() const { return cfg_; }

 private:
  static constexpr uint8_t kPending = 1, kFree = 2, kZero = 4;
  uint32_t Recent(uint64_t p) const { return static_cast<uint32_t>(__builtin_popcount(history_[p] & mask_)); }

  const uint64_t pages_;
  const LayeringConfig cfg_;
  const uint8_t mask_;
  std::vector<uint8_t> state_;
  std::vector<uint8_t> history_;
  uint64_t pending_ = 0;
};

}  // namespace ferry::migration
