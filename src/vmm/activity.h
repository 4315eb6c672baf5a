// Activity time series of one VM, for live migration's stop condition (stop in a lull): fixed
// 10 ms windows of pages newly dirtied (DirtyLog::NewlyDirtied), instructions retired, network
// packets and block requests (Device::Activity), kept for the last kCapacity windows.
//
// The machine thread reports cumulative totals with Record() after every vCPU slice and every
// wait; the growth since the previous report is spread over the windows that interval overlaps,
// in proportion to the overlap (a slice's work is continuous; a wait does almost none). A window
// is complete once a report at or after its end arrived, or - while the machine thread waits
// (idle: paused, or the guest waits for an interrupt) - once its end has passed: nothing
// happens in the guest during a wait, so those windows are complete with zero activity.
//
// Threads: Record() and SetIdle() from the machine thread only; Recent() from any thread.
// Invariants: the ring holds consecutive windows, oldest first; a window's counts never change
// once it is in the ring; totals never go backwards (a smaller total counts as no growth).
#pragma once

#include <cstdint>
#include <deque>

#include "common/thread_annotations.h"
#include "migration/engine/vm_interface.h"

namespace ferry {

class ActivityRecorder {
 public:
  static constexpr uint64_t kWindowNs = 10'000'000;
  static constexpr size_t kCapacity = 512;  // 5.12 s

  struct Totals {
    uint64_t dirty_pages = 0, instructions = 0, net_packets = 0, blk_requests = 0;
  };

  // Machine thread: the cumulative totals at `now_ns`. idle_after: the thread now waits
  // without running the guest until its next Record().
  void Record(uint64_t now_ns, const Totals& totals, bool idle_after) EXCLUDES(mu_);
  // The last `max_windows` complete windows as of `now_ns`.
  migration::ActivitySeries Recent(size_t max_windows, uint64_t now_ns) const EXCLUDES(mu_);

 private:
  void CloseWindowsBefore(uint64_t t_ns) REQUIRES(mu_);

  mutable Mutex mu_;
  bool started_ GUARDED_BY(mu_) = false;
  uint64_t last_ns_ GUARDED_BY(mu_) = 0;  // time of the last Record
  Totals last_ GUARDED_BY(mu_);
  bool idle_ GUARDED_BY(mu_) = false;
  migration::ActivityWindow cur_ GUARDED_BY(mu_);               // the open window (start_ns set)
  std::deque<migration::ActivityWindow> ring_ GUARDED_BY(mu_);  // complete windows
};

}  // namespace ferry
