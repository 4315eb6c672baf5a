// What the migration engine needs from a VMM, and nothing more: a RAM view with a dirty
// tracker, the guest-visible configuration, pause/resume, a throttle, activity signals (for
// the stop condition), and opaque named state records. The engine never sees CPU or device details (a KVM backend or another VMM
// implements the same interfaces). Implemented for ferry-vmm in src/vmm/migration*.
#pragma once

#include <cstdint>
#include <functional>
#include <vector>

#include <nlohmann/json.hpp>

#include "common/error.h"
#include "migration/protocol/wire.h"

namespace ferry::migration {

// A page bitmap: bit i of word i / 64 is page i.
using PageBitmap = std::vector<uint64_t>;
inline bool TestPage(const PageBitmap& b, uint64_t p) { return p / 64 < b.size() && ((b[p / 64] >> (p % 64)) & 1); }
inline void SetPage(PageBitmap& b, uint64_t p) { b[p / 64] |= 1ull << (p % 64); }
inline uint64_t CountPages(const PageBitmap& b) {
  uint64_t n = 0;
  for (const uint64_t w : b) n += static_cast<uint64_t>(__builtin_popcountll(w));
  return n;
}

// The source VM's write tracking. Contract (what a harvest guarantees):
//  - every guest write (CPU or device DMA) that completed before Harvest() started sets its page
//    in `dirty` of this harvest or of a later one, and a copy of the page taken after Harvest()
//    returned sees that write;
//  - a page set in `freed` (always also in `dirty`) was reported free by the guest and
//    discarded (it reads as zero) after its last write: sending it as "free" is correct.
// Threading: called from the migration thread while the vCPUs run.
class DirtyTracker {
 public:
  virtual ~DirtyTracker() = default;
  virtual void Harvest(PageBitmap* dirty, PageBitmap* freed) = 0;
  // Pages currently marked (not harvested yet); cheap enough to call once per round.
  virtual uint64_t CountDirty() const = 0;
  // A peek, not a harvest: true if page `page` was written (or reported free) since the last
  // Harvest(), so the next one will return it. A write still completing may read as false.
  // Cheap (one load): called per page as pages are handed out.
  virtual bool WrittenSinceHarvest(uint64_t page) const = 0;
  // The engine owns the marks from BeginTracking() (called before its first Harvest) to
  // EndTracking() (after its last): nothing else may clear them in between (a VMM that samples
  // the dirty rate outside migrations pauses that). Default: nothing else clears them.
  virtual void BeginTracking() {}
  virtual void EndTracking() {}
};

struct RamView {
  uint8_t* host = nullptr;  // guest RAM, `size` bytes, page i at host + i * 4096
  uint64_t size = 0;
  DirtyTracker* dirty = nullptr;  // source only
  int memfd = -1;                 // optional: lets the source skip never-touched holes
  // Destination, optional: releases the host memory of pages [first, first + count) so they read
  // as zero and the VMM knows them as free (guest free page reporting carried across). Without
  // it the engine zeroes the pages itself.
  std::function<Status(uint64_t first_page, uint64_t count)> discard;
};

// The guest's recent activity as a time series of fixed windows (the stop condition waits for
// a lull: policy.h). Plain counters, nothing VMM-specific.
struct ActivityWindow {
  uint64_t start_ns = 0;      // window start, common/clock.h NowNs() (CLOCK_MONOTONIC)
  uint64_t dirty_pages = 0;   // pages first written in the window since the last harvest (so
                              // comparable across windows only while the dirty log is harvested
                              // regularly, as during a migration)
  uint64_t instructions = 0;  // guest instructions retired
  uint64_t net_packets = 0;   // network frames received + transmitted
  uint64_t blk_requests = 0;  // block requests completed
};
struct ActivitySeries {
  uint64_t window_ns = 10'000'000;
  // Complete windows, oldest first, consecutive (window i starts at windows[0].start_ns +
  // i * window_ns). Windows in which the VM did not run (paused, or asleep waiting for an
  // interrupt) are present with zero activity. Empty if the VMM records nothing.
  std::vector<ActivityWindow> windows;
};

// Threading: every method may be called from the migration thread; implementations
// marshal to their own threads (ferry-vmm posts to the machine thread).
class SourceVm {
 public:
  virtual ~SourceVm() = default;
  virtual RamView Ram() = 0;
  virtual Result<nlohmann::json> Config() = 0;
  // Stops the vCPUs and device backends (no further guest memory writes).
  virtual Status Pause() = 0;
  // Undoes Pause() after a failed or cancelled migration.
  virtual Status Resume() = 0;
  // Called paused: CPU and device state as named records.
  virtual Result<std::vector<StateRecord>> SaveState() = 0;
  // Bytes SaveState() would produce now (the VM keeps running); for the downtime prediction.
  virtual uint64_t EstimateStateBytes() = 0;
  // The last `max_windows` complete activity windows (at most what the VMM keeps, a few
  // seconds). Cheap (no round trip to the vCPU thread needed): called every 10 ms while the
  // engine watches for a lull.
  virtual ActivitySeries RecentActivity(size_t max_windows) = 0;
  // Throttle hook: the fraction (0 < f <= 1) of time the vCPUs may run; 1 = full speed. The
  // engine restores 1 before it returns, whatever the outcome.
  virtual Status SetCpuShare(double fraction) = 0;
  // The guest now runs on the destination: this copy must never run again.
  virtual void OnMigrated(const std::string& destination) = 0;
};

class DestinationVm {
 public:
  virtual ~DestinationVm() = default;
  // Builds the (not running) machine for the configuration; rejects a mismatch with a
  // clear error before any page moves. Returns its RAM.
  virtual Result<RamView> Prepare(const nlohmann::json& config) = 0;
  // RAM is complete: restores CPU and device state (all-or-nothing).
  virtual Status Restore(const std::vector<StateRecord>& state) = 0;
  // Runs the guest and announces it on the network.
  virtual Status Start() = 0;
};

}  // namespace ferry::migration
