#include "memory/guest_memory.h"

#include <fcntl.h>
#include <linux/falloc.h>
#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>

#include <spdlog/spdlog.h>

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
    if (marks_[p].load(std::memory_order_relaxed) != kMarkWritten) newly_dirtied_.fetch_add(1, std::memory_order_relaxed);
    marks_[p].store(kMarkWritten, std::memory_order_release);
    NoteCodeWrite(p);
  }
}

void DirtyLog::MarkFreed(uint64_t first_page, uint64_t count) {
  if (first_page >= num_pages_ || count == 0) return;
  const uint64_t end = first_page + std::min(count, num_pages_ - first_page);
  for (uint64_t p = first_page; p < end; ++p) {
    marks_[p].store(kMarkFreed, std::memory_order_release);
    NoteCodeWrite(p);  // decoded code of a discarded page is stale (it reads as zero now)
  }
  // Revoke cached write permissions: a CPU write-TLB entry taken before the report would
  // otherwise let a later write skip storing 1, leaving a stale 2 over live data.
  for (HarvestListener* l : listeners_) l->OnDirtyLogHarvest();
}

std::vector<uint64_t> DirtyLog::Harvest() {
  std::vector<uint64_t> bitmap;
  Harvest(&bitmap, nullptr);
  return bitmap;
}

void DirtyLog::Harvest(std::vector<uint64_t>* dirty, std::vector<uint64_t>* freed) {
  const size_t words = (num_pages_ + 63) / 64;
  dirty->assign(words, 0);
  if (freed) freed->assign(words, 0);
  for (uint64_t i = 0; i < num_pages_; ++i) {
    // Cheap pre-check avoids dirtying cache lines of clean pages.
    if (marks_[i].load(std::memory_order_relaxed) == kMarkClean) continue;
    const uint8_t m = marks_[i].exchange(kMarkClean, std::memory_order_acq_rel);
    if (m == kMarkClean) continue;
    (*dirty)[i / 64] |= 1ull << (i % 64);
    if (m == kMarkFreed && freed) (*freed)[i / 64] |= 1ull << (i % 64);
  }
  for (HarvestListener* l : listeners_) l->OnDirtyLogHarvest();
}

void DirtyLog::MarkAll() {
  // A freed page stays freed: it reads as zero and the guest does not use it (a later write turns
  // it into 1 as usual).
  for (uint64_t i = 0; i < num_pages_; ++i)
    if (marks_[i].load(std::memory_order_relaxed) != kMarkFreed) marks_[i].store(kMarkWritten, std::memory_order_release);
}

void DirtyLog::BeginTracking() {
  MutexLock l(claim_mu_);  // waits for a clear under way
  ++claims_;
}

void DirtyLog::EndTracking() {
  MutexLock l(claim_mu_);
  if (claims_ > 0) --claims_;
}

bool DirtyLog::ClearWrittenUnlessClaimed() {
  MutexLock l(claim_mu_);
  if (claims_ > 0) return false;
  for (uint64_t i = 0; i < num_pages_; ++i) {
    uint8_t expected = kMarkWritten;
    if (marks_[i].load(std::memory_order_relaxed) == kMarkWritten)
      marks_[i].compare_exchange_strong(expected, kMarkClean, std::memory_order_acq_rel);
  }
  // As after a harvest: a cached write permission must not skip the next mark.
  for (HarvestListener* l : listeners_) l->OnDirtyLogHarvest();
  return true;
}

uint64_t DirtyLog::CountDirty() const {
  uint64_t n = 0;
  for (uint64_t i = 0; i < num_pages_; ++i) n += marks_[i].load(std::memory_order_relaxed) != kMarkClean;
  return n;
}

uint64_t DirtyLog::CountFreed() const {
  uint64_t n = 0;
  for (uint64_t i = 0; i < num_pages_; ++i) n += marks_[i].load(std::memory_order_relaxed) == kMarkFreed;
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

Status GuestMemory::Discard(uint64_t gpa, uint64_t len) {
  if (!Contains(gpa, len))
    return Errorf(ErrorCode::kInvalidArgument, "discard [{:#x}, +{:#x}) outside RAM [{:#x}, +{:#x})", gpa, len, base_, size_);
  // Whole pages only: offsets relative to RAM start (itself page-aligned in the board, but
  // do not rely on it for the memfd offsets).
  const uint64_t off = gpa - base_;
  const uint64_t first = (off + kPageSize - 1) >> kPageShift;
  const uint64_t end = (off + len) >> kPageShift;
  if (first >= end) return {};
  const uint64_t start = first << kPageShift, bytes = (end - first) << kPageShift;
  bool punched = false;
  if (!punch_unsupported_.load(std::memory_order_relaxed)) {
    if (fallocate(fd_, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, static_cast<off_t>(start), static_cast<off_t>(bytes)) == 0) {
      punched = true;
    } else if (errno == EOPNOTSUPP || errno == ENOSYS) {
      if (!punch_unsupported_.exchange(true))
        spdlog::warn("guest memory: fallocate(PUNCH_HOLE) not supported ({}); discarded pages are zeroed instead "
                     "and stay resident", std::strerror(errno));
    } else {
      const int e = errno;
      return Errorf(ErrorCode::kIo, "discard guest RAM [{:#x}, +{:#x}): fallocate(PUNCH_HOLE): {}", base_ + start, bytes,
                    std::strerror(e));
    }
  }
  if (!punched) std::memset(host_ + start, 0, bytes);
  // Contents are gone; only now may the marks say so (see the free invariant in the header).
  dirty_log_.MarkFreed(first, end - first);
  return {};
}

}  // namespace ferry
