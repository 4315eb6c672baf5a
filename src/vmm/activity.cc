#include "vmm/activity.h"

#include <algorithm>

namespace ferry {

void ActivityRecorder::CloseWindowsBefore(uint64_t t_ns) {
  while (cur_.start_ns + kWindowNs <= t_ns) {
    ring_.push_back(cur_);
    if (ring_.size() > kCapacity) ring_.pop_front();
    const uint64_t next = cur_.start_ns + kWindowNs;
    cur_ = migration::ActivityWindow{};
    cur_.start_ns = next;
    // A long wait: skip to the window holding t_ns, zero windows in between (at most a ring's worth).
    if (t_ns - next >= kCapacity * kWindowNs) {
      ring_.clear();
      cur_.start_ns = next + (t_ns - next) / kWindowNs * kWindowNs - kCapacity * kWindowNs;
    }
  }
}

void ActivityRecorder::Record(uint64_t now_ns, const Totals& t, bool idle_after) {
  MutexLock l(mu_);
  if (!started_) {
    started_ = true;
    cur_.start_ns = now_ns / kWindowNs * kWindowNs;
    last_ns_ = now_ns;
    last_ = t;
    idle_ = idle_after;
    return;
  }
  if (now_ns < last_ns_) now_ns = last_ns_;
  auto grow = [](uint64_t now, uint64_t before) { return now > before ? now - before : 0; };
  const uint64_t d[4] = {grow(t.dirty_pages, last_.dirty_pages), grow(t.instructions, last_.instructions),
                         grow(t.net_packets, last_.net_packets), grow(t.blk_requests, last_.blk_requests)};
  const uint64_t span = now_ns - last_ns_;
  uint64_t given[4] = {0, 0, 0, 0};
  uint64_t from = last_ns_;
  if (span >= kCapacity * kWindowNs) from = now_ns;  // a very long interval: all of it in the last window
  // Spread the growth over the windows [last_ns_, now_ns) overlaps, in proportion.
  for (;;) {
    CloseWindowsBefore(from);
    const uint64_t end = cur_.start_ns + kWindowNs;
    const bool last_piece = now_ns <= end;
    const uint64_t to = last_piece ? now_ns : end;
    uint64_t* fields[4] = {&cur_.dirty_pages, &cur_.instructions, &cur_.net_packets, &cur_.blk_requests};
    for (int i = 0; i < 4; ++i) {
      uint64_t share = last_piece || from == now_ns ? d[i] - given[i]
                                               : static_cast<uint64_t>(static_cast<double>(d[i]) * static_cast<double>(to - last_ns_) /
                                                                       static_cast<double>(span)) - given[i];
      share = std::min(share, d[i] - given[i]);
      *fields[i] += share;
      given[i] += share;
    }
    if (last_piece) break;
    from = to;
  }
  CloseWindowsBefore(now_ns);
  last_ns_ = now_ns;
  last_ = t;
  idle_ = idle_after;
}

migration::ActivitySeries ActivityRecorder::Recent(size_t max_windows, uint64_t now_ns) const {
  migration::ActivitySeries s;
  s.window_ns = kWindowNs;
  MutexLock l(mu_);
  if (!started_) return s;
  // While the machine thread waits, the windows that ended since are complete and empty.
  std::vector<migration::ActivityWindow> idle_tail;
  if (idle_ && now_ns > last_ns_) {
    migration::ActivityWindow w = cur_;
    while (w.start_ns + kWindowNs <= now_ns && idle_tail.size() < kCapacity) {
      idle_tail.push_back(w);
      const uint64_t next = w.start_ns + kWindowNs;
      w = migration::ActivityWindow{};
      w.start_ns = next;
    }
  }
  const size_t total = ring_.size() + idle_tail.size();
  const size_t n = std::min(max_windows, total);
  s.windows.reserve(n);
  for (size_t i = total - n; i < total; ++i) s.windows.push_back(i < ring_.size() ? ring_[i] : idle_tail[i - ring_.size()]);
  return s;
}

}  // namespace ferry
