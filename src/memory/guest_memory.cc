#include "memory/guest_memory.h"

#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <cstring>

namespace ferry {

DirtyLog::DirtyLog(uint64_t num_pages)
    : num_pages_(num_pages), marks_(new std::atomic<uint8_t>[num_pages]), code_watch_(new std::atomic<uint8_t>[num_pages]) {
  for (uint64_t i = 0; i < num_pages_; ++i) {
    marks_[i].store(0, std::memory_order_relaxed);
    code_watch_[i].store(0, std::memory_order_relaxed);
  }
}

void DirtyLog::MarkRange(uint64_t offset, uint64_t len) {
  if (len == 0) return;
  uint64_t first = offset >> kPageShift;
  uint64_t last = (offset + len - 1) >> kPageShift;
  for (uint64_t p = first; p <= last && p < num_pages_; ++p) {
    marks_[p].store(1, std::memory_order_release);
    NoteCodeWrite(p);
  }
}

std::vector<uint64_t> DirtyLog::Harvest() {
  std::vector<uint64_t> bitmap((num_pages_ + 63) / 64, 0);
  for (uint64_t i = 0; i < num_pages_; ++i) {
    // Cheap pre-check avoids dirtying cache lines of clean pages.
    if (marks_[i].load(std::memory_order_relaxed) && marks_[i].exchange(0, std::memory_order_acq_rel))
      bitmap[i / 64] |= 1ull << (i % 64);
  }
  for (HarvestListener* l : listeners_) l->OnDirtyLogHarvest();
  return bitmap;
}

void DirtyLog::MarkAll() {
  for (uint64_t i = 0; i < num_pages_; ++i) marks_[i].store(1, std::memory_order_release);
}

uint64_t DirtyLog::CountDirty() const {
  uint64_t n = 0;
  for (uint64_t i = 0; i < num_pages_; ++i) n += marks_[i].load(std::memory_order_relaxed) != 0;
  return n;
}

void DirtyLog::RemoveListener(HarvestListener* l) {
  listeners_.erase(std::remove(listeners_.begin(), listeners_.end(), l), listeners_.end());
}

Result<std::unique_ptr<GuestMemory>> GuestMemory::Create(uint64_t base, uint64_t size) {
  if (size == 0 || size % kPageSize != 0)
    return Errorf(ErrorCode::kInvalidArgument, "guest memory size {} is not a positive multiple of 4 KiB", size);
  int fd = memfd_create("ferry-guest-ram", MFD_CLOEXEC);
  if (fd < 0) return ErrnoError("memfd_create");
  if (ftruncate(fd, static_cast<off_t>(size)) != 0) {
    auto e = ErrnoError("ftruncate guest ram");
    close(fd);
    return e;
  }
  void* p = mmap(nullptr, size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
  if (p == MAP_FAILED) {
    auto e = ErrnoError("mmap guest ram");
    close(fd);
    return e;
  }
  return std::unique_ptr<GuestMemory>(new GuestMemory(base, size, fd, static_cast<uint8_t*>(p)));
}

GuestMemory::GuestMemory(uint64_t base, uint64_t size, int fd, uint8_t* host)
    : base_(base), size_(size), fd_(fd), host_(host), dirty_log_(size >> kPageShift) {}

GuestMemory::~GuestMemory() {
  munmap(host_, size_);
  close(fd_);
}

Status GuestMemory::Read(uint64_t gpa, void* dst, uint64_t len) const {
  const uint8_t* p = Translate(gpa, len);
  if (!p) return Errorf(ErrorCode::kInvalidArgument, "guest read [{:#x}, +{:#x}) outside RAM", gpa, len);
  std::memcpy(dst, p, len);
  return {};
}

Status GuestMemory::Write(uint64_t gpa, const void* src, uint64_t len) {
  uint8_t* p = Translate(gpa, len);
  if (!p) return Errorf(ErrorCode::kInvalidArgument, "guest write [{:#x}, +{:#x}) outside RAM", gpa, len);
  std::memcpy(p, src, len);
  dirty_log_.MarkRange(gpa - base_, len);
  return {};
}

}  // namespace ferry
