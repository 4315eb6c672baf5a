// Page scheduler of a pre-copy migration: which pages go next, and in which order (layered copy
// with a dirty-jitter debounce, seeds 000 and 002).
//
// Per page it keeps:
//   pending  - must be sent: never sent, or written since it was last handed out;
//   sent     - handed out at least once (a later send is a re-send);
//   free     - reported free by the guest and not written since (sent as a FREE run, unread);
//   zero     - known to read as zero without looking (a never-written hole at the start);
//   history  - bit i set = written in the i-th most recent dirty-log sample (8 kept).
// Samples are the harvests the migration feeds in: one at every round boundary and, inside a long
// round, one every few hundred milliseconds, so a page's history fills up even while round 0 - the
// longest - is still running.
//
// A page is hot when it was written in at least k of the last r samples (r = `window`). Hot
// pending pages are held back - left pending - until the final pass: sending them would only be
// undone by the next write. k starts at `min_hot` and rises until the pages held back fit the
// caller's budget (pages it can afford to add to the pause); k = r + 1 holds nothing back. The
// threshold is chosen when a pass begins and again at every harvest during it.
//
// A pass is handed out incrementally (NextBatch). Its order is fixed when it begins: cold pages
// first - pages written in fewer recent samples before pages written in more (the likeliest to be
// written again go last); among pages no sample wrote, those of cold 2 MiB regions before those
// of warm ones (at least 1/8 of the region written: writes cluster) - address order within a class. What each page is sent as (read, zero,
// free) and whether it is held back are decided when it is handed out, from the state at that
// moment, so a harvest during the pass is always honoured:
//   - a page written before it was handed out is sent later in this pass (its copy is taken after
//     the write): it is deferred to the end of the pass, since a page written during the pass is
//     likelier to be written again than one that was not, and by then it may be hot (held back);
//     its free/zero shortcut is dropped;
//   - a page written after it was handed out is pending again, for the next pass.
// The same debounce at the finest grain happens when a page is read (Batch::debounce): the channel
// worker leaves out a page written since the last harvest, which the next harvest makes pending
// again; first sends left out that way come back through Unsend, so they are not counted as sent.
//
// Not thread-safe: owned by the migration thread. Cost: O(pages) per pass begin and per harvest.
#pragma once

#include <cstdint>
#include <vector>

#include "migration/codec/page_run.h"
#include "migration/engine/vm_interface.h"

namespace ferry::migration {

// One unit of work for a sender.
struct Batch {
  std::vector<PageRun> runs;
  // Debounce when read (layering, not in the final pass): the channel worker leaves out pages the
  // guest wrote since the last harvest (PageEncoder's skip filter, ChannelPool::Harvest).
  bool debounce = false;
  bool paused = false;  // the final pass (EncodeOptions::paused)
};

struct BatchLimits {
  uint64_t max_scan_pages = 128;  // pages to read (and encode) per batch
  uint64_t max_pages = UINT64_MAX;  // pages of any kind per batch (protocol v1: every page is an entry)
  uint64_t max_runs = 1000;
};

struct LayeringConfig {
  bool enabled = true;
  uint32_t window = 4;   // r: samples of history that count (1..8)
  uint32_t min_hot = 2;  // smallest k: one write is not jitter
};

// What a pass handed out so far.
struct PassStats {
  uint64_t pages = 0, scan_pages = 0, zero_pages = 0, free_pages = 0, resent_pages = 0;
  uint64_t held_back = 0;       // hot pages skipped (left pending)
  uint64_t hot_candidates = 0;  // pending pages written in >= min_hot of the last r samples, at the last decision
  uint32_t hot_k = 0;           // threshold in force (> window: nothing held back)
  uint32_t window = 0;
};

class PageScheduler {
 public:
  PageScheduler(uint64_t pages, LayeringConfig cfg);
  // Start of the migration: every page pending. known_zero / freed may be empty.
  void Start(const PageBitmap& known_zero, const PageBitmap& freed);
  // A dirty-log sample: the pages written since the previous one become pending (freed ones as
  // free); the history shifts. Returns how many pages it marked.
  uint64_t AddHarvest(const PageBitmap& dirty, const PageBitmap& freed);
  // Pages handed out as first sends that were left out when read (Batch::debounce): never sent after
  // all. Call before the AddHarvest that returns them (ChannelPool::Harvest gives both in order).
  void Unsend(const std::vector<uint64_t>& pages);
  // Starts a pass over the pages pending now. final: nothing is held back.
  void BeginPass(bool final, uint64_t holdback_budget_pages);
  // A new budget for the rest of the pass (the bandwidth is better known now); used from the next
  // harvest on.
  void SetHoldbackBudget(uint64_t pages) { budget_ = pages; }
  // Hands out the next pages of the pass; false when the pass is over.
  bool NextBatch(const BatchLimits& limits, Batch* out);
  const PassStats& pass() const { return pass_; }
  // Post-copy: hands out every page pending now (held back ones too) and ends the pass. Pages to
  // read go to `scan` (a bitmap), known-zero and free pages to `nodata` as runs of at most
  // max_run pages. Returns how many pages went to `scan`.
  uint64_t TakeAllPending(PageBitmap* scan, std::vector<PageRun>* nodata, uint32_t max_run);
  uint64_t pending() const { return pending_; }
  uint64_t pages() const { return pages_; }
  const LayeringConfig& config() const { return cfg_; }

 private:
  // kFirstOut: handed out once, as a first send, and not since (Unsend may take kSent back).
  static constexpr uint8_t kPending = 1, kFree = 2, kZero = 4, kSent = 8, kFirstOut = 16;
  // Regions of 2 MiB; warm when at least 1/kWarmRegionShare of its pages were written in recent samples.
  static constexpr uint64_t kRegionPages = 512, kWarmRegionShare = 8;
  uint32_t Recent(uint64_t p) const { return static_cast<uint32_t>(__builtin_popcount(history_[p] & mask_)); }
  // The threshold for the pending pages now, within the budget.
  void ChooseThreshold();

  const uint64_t pages_;
  const LayeringConfig cfg_;
  const uint8_t mask_;
  std::vector<uint8_t> state_;
  std::vector<uint8_t> history_;
  uint64_t pending_ = 0;

  // Hands out page p if it may go now; false when the batch is full (p stays for the next one).
  bool Take(uint64_t p, const BatchLimits& limits, Batch* out, uint64_t* scan, uint64_t* total);

  // The current pass: its pages in order (runs of consecutive gfns, each with the class the page
  // had when the pass began) and the hand-out position; then the pages deferred during it.
  std::vector<PageRun> order_;
  std::vector<uint8_t> order_class_;
  size_t cursor_run_ = 0;
  uint64_t cursor_page_ = 0;  // offset inside order_[cursor_run_]
  std::vector<uint64_t> deferred_;
  size_t deferred_cursor_ = SIZE_MAX;  // SIZE_MAX: still in order_
  bool final_ = false;
  uint64_t budget_ = 0;
  PassStats pass_;
};

}  // namespace ferry::migration
