// Guest RAM and its dirty log.
//
// GuestMemory is one memfd-backed host mapping (post-copy will register it with
// userfaultfd). Every path that writes guest RAM -- CPU stores and device DMA --
// must mark the page in the DirtyLog *after* the data store, so that a concurrent
// harvest either sees the mark or the copy taken after the harvest sees the data.
//
// DirtyLog protocol (TinyEMU-style, safe with a running vCPU thread):
//   Harvest():  1. atomically exchange every page's mark with 0 (collect bitmap)
//               2. call every HarvestListener::OnDirtyLogHarvest(), which must not
//                  return before any cached write permission (e.g. a CPU write-TLB
//                  entry that skips marking) is dropped, so later writes re-mark.
//   The caller copies the harvested pages after Harvest() returns.
//
// Threading: MarkDirty/IsDirty/Harvest are thread-safe (atomics). Listener
// registration happens at VM construction, before vCPU threads start.
#pragma once

#include <atomic>
#include <cstdint>
#include <memory>
#include <span>
#include <vector>

#include "common/error.h"

namespace ferry {

inline constexpr uint64_t kPageShift = 12;
inline constexpr uint64_t kPageSize = 1ull << kPageShift;

class HarvestListener {
 public:
  virtual ~HarvestListener() = default;
  // Must guarantee that, on return, every subsequent guest write marks the log.
  virtual void OnDirtyLogHarvest() = 0;
};

class DirtyLog {
 public:
  explicit DirtyLog(uint64_t num_pages);

  uint64_t num_pages() const { return num_pages_; }
  // Tracking on/off. Off: marks are still recorded cheaply, but Harvest is not used;
  // kept so overhead can be measured (on vs off).
  void SetEnabled(bool on) { enabled_.store(on, std::memory_order_relaxed); }
  bool enabled() const { return enabled_.load(std::memory_order_relaxed); }

  // page index relative to RAM base
  void MarkPage(uint64_t page) {
    if (page < num_pages_) {
      marks_[page].store(1, std::memory_order_release);
      NoteCodeWrite(page);
    }
  }
  void MarkRange(uint64_t offset, uint64_t len);  // byte offset into RAM
  bool IsDirty(uint64_t page) const {
    return page < num_pages_ && marks_[page].load(std::memory_order_acquire) != 0;
  }
  uint8_t* raw_marks() { return reinterpret_cast<uint8_t*>(marks_.get()); }

  // Code-page watch, for a CPU backend that caches decoded instructions (one per VM).
  // The backend sets raw_code_watch()[page] = 1 while it holds decoded code of that page
  // and resets it to 0 when it drops that code. Every write path other than the CPU's own
  // stores marks the log through MarkPage/MarkRange; these turn a 1 into 2 and bump
  // code_write_generation(). The backend compares the generation wherever device code may
  // have run (between Run() calls, after an MMIO access) and drops the pages marked 2.
  // The CPU's own stores check the byte directly.
  uint8_t* raw_code_watch() { return reinterpret_cast<uint8_t*>(code_watch_.get()); }
  uint64_t code_write_generation() const { return code_gen_.load(std::memory_order_acquire); }

  // Returns a bitmap (bit i of word i/64 = page i) of pages written since the
  // previous harvest, and clears the marks. See protocol above.
  std::vector<uint64_t> Harvest();
  // Marks every page dirty (start of a migration: "everything must be sent").
  void MarkAll();
  uint64_t CountDirty() const;

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
  std::atomic<bool> enabled_{true};
  std::vector<HarvestListener*> listeners_;
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

  // Writes from outside the guest (loader, restore, migration receive): also marked.
  std::span<uint8_t> span() const { return {host_, size_}; }

 private:
  GuestMemory(uint64_t base, uint64_t size, int fd, uint8_t* host);
  uint64_t base_;
  uint64_t size_;
  int fd_;
  uint8_t* host_;
  DirtyLog dirty_log_;
};

}  // namespace ferry
