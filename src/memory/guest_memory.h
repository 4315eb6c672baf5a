// Guest RAM and its dirty log.
//
// GuestMemory is one memfd-backed host mapping (a post-copy destination registers it with
// userfaultfd). Every path that writes guest RAM -- CPU stores and device DMA --
// must mark the page in the DirtyLog *after* the data store, so that a concurrent
// harvest either sees the mark or the copy taken after the harvest sees the data.
//
// DirtyLog marks: one byte per page (page index relative to RAM base).
//   0 (kMarkClean)    clean since the last harvest.
//   1 (kMarkWritten)  written. Every write path stores 1 (CPU stores, device DMA,
//                     MarkPage/MarkRange, MarkAll).
//   2 (kMarkFreed)    freed: the guest reported the page free (MarkFreed, from
//                     GuestMemory::Discard), its contents were discarded so it reads as
//                     zero, and nothing has written it since.
//   The last store wins: a write after a free report turns 2 into 1 (no extra work in
//   the CPU's hot path), a free report after a write turns 1 into 2 (correct, because
//   the contents were discarded first).
//
// DirtyLog protocol (TinyEMU-style, safe with a running vCPU thread):
//   Harvest():  1. atomically exchange every page's mark with 0 (collect bitmap)
//               2. call every HarvestListener::OnDirtyLogHarvest(), which must not
//                  return before any cached write permission (e.g. a CPU write-TLB
//                  entry that skips marking) is dropped, so later writes re-mark.
//   The caller copies the harvested pages after Harvest() returns.
//   Harvest(&dirty, &freed) does the same and also reports which marks were 2.
//   MarkFreed(): 1. store 2 into the marks (after the caller discarded the contents)
//                2. the code-watch rule (below), as MarkPage/MarkRange do
//                3. call every listener's OnDirtyLogHarvest(), like step 2 of Harvest.
//
// Free invariant: if a harvest returns page p as freed, then every guest write to p
// that happened before that harvest was followed by a later free report of p, so
// sending p as "free = all zero" is correct. Reason: every write stores 1 after its
// data; MarkFreed stores 2 only after the contents were discarded and, before it
// returns, revokes every cached write permission, so a write TLB entry taken before
// the report cannot later write p without storing 1 again (and a 1 is never reported
// as freed). Precondition (guaranteed by virtio free page reporting, where the pages
// stay isolated in the guest until the device hands the buffer back): nothing writes
// the reported pages between the start of Discard and the return of MarkFreed.
//
// Activity count: every write path that finds a page's mark not already 1 (clean, or
// freed) counts one "newly dirtied" page in a cumulative counter (NewlyDirtied()). Between
// two harvests a page counts at most once per free report, so the count over an interval
// is the number of distinct pages first written in it since the last harvest: a cheap
// activity signal (migration's stop condition), not part of the marking protocol. The
// check is a relaxed load before the unconditional store, so under a concurrent
// harvest a write may count twice or not at all (a signal, not an exact figure).
//
// Dirty-rate sampling outside a migration: NewlyDirtied() saturates once every page a guest
// uses is marked, so a VMM that wants the rate while nothing harvests clears the written marks
// now and then (ClearWrittenUnlessClaimed: 1 -> 0, freed pages stay 2, listeners called as in
// a harvest). A migration engine owns the log from BeginTracking() (before its first harvest)
// to EndTracking() (after its last): between them ClearWrittenUnlessClaimed clears nothing, and
// a clear already under way finishes before BeginTracking returns, so no page written after the
// engine's first harvest loses its mark.
//
// Threading: MarkPage/MarkRange/IsDirty/IsFreed/Harvest/MarkFreed/CountDirty are
// thread-safe (atomics); MarkFreed and Harvest call the listeners, so they may block
// until a running vCPU serviced the request (see HarvestListener). Listener
// registration happens at VM construction, before vCPU threads start.
// GuestMemory::Discard may be called from any thread; it is meant for the machine
// thread (devices), possibly from inside a vCPU's Run().
#pragma once

#include <atomic>
#include <cstdint>
#include <memory>
#include <span>
#include <vector>

#include "common/error.h"
#include "common/thread_annotations.h"

namespace ferry {

inline constexpr uint64_t kPageShift = 12;
inline constexpr uint64_t kPageSize = 1ull << kPageShift;

class HarvestListener {
 public:
  virtual ~HarvestListener() = default;
  // Must guarantee that, on return, every subsequent guest write marks the log.
  // Called by Harvest() (any thread) and by MarkFreed() (also from inside a device
  // handler running on a vCPU's own thread, in the middle of its Run(): the listener
  // must not wait for itself there).
  virtual void OnDirtyLogHarvest() = 0;
};

class DirtyLog {
 public:
  // Values of a page's mark byte (see the file comment).
  static constexpr uint8_t kMarkClean = 0, kMarkWritten = 1, kMarkFreed = 2;

  explicit DirtyLog(uint64_t num_pages);

  uint64_t num_pages() const { return num_pages_; }
  // Tracking on/off. Off: marks are still recorded cheaply, but Harvest is not used;
  // kept so overhead can be measured (on vs off).
  void SetEnabled(bool on) { enabled_.store(on, std::memory_order_relaxed); }
  bool enabled() const { return enabled_.load(std::memory_order_relaxed); }

  // page index relative to RAM base
  void MarkPage(uint64_t page) {
    if (page < num_pages_) {
      if (marks_[page].load(std::memory_order_relaxed) != kMarkWritten) newly_dirtied_.fetch_add(1, std::memory_order_relaxed);
      marks_[page].store(kMarkWritten, std::memory_order_release);
      NoteCodeWrite(page);
    }
  }
  void MarkRange(uint64_t offset, uint64_t len);  // byte offset into RAM
  // Pages [first_page, first_page + count) (clipped to num_pages()) were reported free
  // by the guest and their contents were already discarded: stores 2, applies the
  // code-watch rule, then calls every listener's OnDirtyLogHarvest() so that no cached
  // write permission can write these pages later without storing 1. Use
  // GuestMemory::Discard, which discards first and then calls this.
  void MarkFreed(uint64_t first_page, uint64_t count);
  // Mark 1 or 2 (written or freed since the last harvest).
  bool IsDirty(uint64_t page) const {
    return page < num_pages_ && marks_[page].load(std::memory_order_acquire) != kMarkClean;
  }
  // Mark 2 (freed and not written since).
  bool IsFreed(uint64_t page) const {
    return page < num_pages_ && marks_[page].load(std::memory_order_acquire) == kMarkFreed;
  }
  // For the CPU backend's store path, which stores kMarkWritten (and only that) itself.
  uint8_t* raw_marks() { return reinterpret_cast<uint8_t*>(marks_.get()); }
  // The activity counter (see the file comment); the CPU's store path adds 1 when the mark it
  // is about to store 1 into was not 1.
  std::atomic<uint64_t>* raw_newly_dirtied() { return &newly_dirtied_; }
  // Cumulative pages newly dirtied (any thread).
  uint64_t NewlyDirtied() const { return newly_dirtied_.load(std::memory_order_relaxed); }

  // Code-page watch, for a CPU backend that caches decoded instructions (one per VM).
  // The backend sets raw_code_watch()[page] = 1 while it holds decoded code of that page
  // and resets it to 0 when it drops that code. Every write path other than the CPU's own
  // stores marks the log through MarkPage/MarkRange; these turn a 1 into 2 and bump
  // code_write_generation(). The backend compares the generation wherever device code may
  // have run (between Run() calls, after an MMIO access) and drops the pages marked 2.
  // The CPU's own stores check the byte directly.
  uint8_t* raw_code_watch() { return reinterpret_cast<uint8_t*>(code_watch_.get()); }
  uint64_t code_write_generation() const { return code_gen_.load(std::memory_order_acquire); }

  // Returns a bitmap (bit i of word i/64 = page i) of pages written or freed since
  // the previous harvest (marks 1 and 2), and clears the marks. See protocol above.
  std::vector<uint64_t> Harvest();
  // Same, and also fills *freed (same layout) with the pages whose mark was 2, so
  // *freed is a subset of *dirty. Both vectors are resized to (num_pages + 63) / 64
  // words. freed may be null (then this is Harvest()).
  void Harvest(std::vector<uint64_t>* dirty, std::vector<uint64_t>* freed);
  // Marks every page written ("everything must be sent", e.g. after a restore), except freed
  // pages, which stay freed.
  void MarkAll();
  uint64_t CountDirty() const;  // marks 1 and 2
  uint64_t CountFreed() const;  // marks 2

  // Dirty-rate sampling (file comment). Claims nest (a count). Any thread; the clear calls the
  // listeners like Harvest does. Returns true if it cleared (no claim held).
  void BeginTracking() EXCLUDES(claim_mu_);
  void EndTracking() EXCLUDES(claim_mu_);
  bool ClearWrittenUnlessClaimed() EXCLUDES(claim_mu_);

  void AddListener(HarvestListener* l) { listeners_.push_back(l); }
  void RemoveListener(HarvestListener* l);

 private:
  void NoteCodeWrite(uint64_t page) {
    if (code_watch_[page].load(std::memory_order_relaxed) == 1) {
      code_watch_[page].store(2, std::memory_order_relaxed);
      code_gen_.fetch_add(1, std::memory_order_release);
    }
  }

  uint64_t num_pages_;
  std::unique_ptr<std::atomic<uint8_t>[]> marks_;
  std::unique_ptr<std::atomic<uint8_t>[]> code_watch_;
  std::atomic<uint64_t> code_gen_{0};
  std::atomic<uint64_t> newly_dirtied_{0};
  std::atomic<bool> enabled_{true};
  std::vector<HarvestListener*> listeners_;
  Mutex claim_mu_;
  int claims_ GUARDED_BY(claim_mu_) = 0;
};

class GuestMemory {
 public:
  // Creates anonymous memfd-backed RAM of `size` bytes (multiple of 4 KiB) at guest
  // physical address `base`.
  static Result<std::unique_ptr<GuestMemory>> Create(uint64_t base, uint64_t size);
  ~GuestMemory();
  GuestMemory(const GuestMemory&) = delete;
  GuestMemory& operator=(const GuestMemory&) = delete;

  uint64_t base() const { return base_; }
  uint64_t size() const { return size_; }
  uint64_t num_pages() const { return size_ >> kPageShift; }
  uint8_t* host() const { return host_; }
  int memfd() const { return fd_; }
  DirtyLog& dirty_log() { return dirty_log_; }

  bool Contains(uint64_t gpa, uint64_t len) const {
    return gpa >= base_ && len <= size_ && gpa - base_ <= size_ - len;
  }
  // Host pointer for [gpa, gpa+len) or nullptr if outside RAM (never UB).
  uint8_t* Translate(uint64_t gpa, uint64_t len) const {
    return Contains(gpa, len) ? host_ + (gpa - base_) : nullptr;
  }

  // Bounds-checked DMA helpers for devices; writes mark the dirty log.
  Status Read(uint64_t gpa, void* dst, uint64_t len) const;
  Status Write(uint64_t gpa, const void* src, uint64_t len);

  // The guest reported [gpa, gpa+len) free: releases the host memory of the whole pages
  // inside the range (a partial page at either end is left alone), so they read as zero,
  // then marks them freed (DirtyLog::MarkFreed) -- contents first, marks second. Uses
  // fallocate(PUNCH_HOLE) on the memfd; where that is not supported, zeroes the pages
  // instead (logged once). Errors: the range is not inside RAM (nothing changed), or the
  // hole punch failed for another reason (nothing marked).
  Status Discard(uint64_t gpa, uint64_t len);

  // Writes from outside the guest (loader, restore, migration receive): also marked.
  std::span<uint8_t> span() const { return {host_, size_}; }

 private:
  GuestMemory(uint64_t base, uint64_t size, int fd, uint8_t* host);
  uint64_t base_;
  uint64_t size_;
  int fd_;
  uint8_t* host_;
  DirtyLog dirty_log_;
  std::atomic<bool> punch_unsupported_{false};  // fallocate said EOPNOTSUPP once: memset from then on
};

}  // namespace ferry
