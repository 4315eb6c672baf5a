#include "migration/engine/postcopy_ram.h"

#include <fcntl.h>
#include <linux/userfaultfd.h>
#include <poll.h>
#include <sys/eventfd.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>

#include <spdlog/spdlog.h>

#include "common/clock.h"

namespace ferry::migration {
namespace {

int OpenUffd() {
  // The syscall first (root, or vm.unprivileged_userfaultfd=1); /dev/userfaultfd otherwise.
  // Kernel-mode faults must be handled too (a read(2) from a TAP device into guest RAM), so no
  // UFFD_USER_MODE_ONLY.
  int fd = static_cast<int>(syscall(SYS_userfaultfd, O_CLOEXEC | O_NONBLOCK));
  if (fd >= 0) return fd;
  int dev = open("/dev/userfaultfd", O_RDWR | O_CLOEXEC);
  if (dev < 0) return -1;
  fd = ioctl(dev, USERFAULTFD_IOC_NEW, O_CLOEXEC | O_NONBLOCK);
  close(dev);
  return fd;
}

Status Ioctl(int fd, unsigned long req, void* arg, std::string_view what) {
  for (;;) {
    if (ioctl(fd, req, arg) == 0) return {};
    if (errno == EINTR) continue;
    return Errorf(ErrorCode::kIo, "userfaultfd {}: {}", what, std::strerror(errno));
  }
}

}  // namespace

bool PostcopyRam::Available() {
  int fd = OpenUffd();
  if (fd < 0) return false;
  uffdio_api api{};
  api.api = UFFD_API;
  api.features = 0;
  const bool ok = ioctl(fd, UFFDIO_API, &api) == 0 && (api.features & UFFD_FEATURE_MISSING_SHMEM);
  close(fd);
  return ok;
}

PostcopyRam::PostcopyRam(const RamView& ram, const PostcopyStart& missing, RequestFn request)
    : ram_(ram),
      pages_(ram.size / kWirePageSize),
      missing_(missing.missing),
      missing_count_(missing.missing_pages),
      request_(std::move(request)),
      placed_bits_(new std::atomic<uint64_t>[(pages_ + 63) / 64]),
      requested_bits_(new std::atomic<uint64_t>[(pages_ + 63) / 64]),
      fault_ns_(new std::atomic<uint64_t>[pages_]) {
  for (uint64_t i = 0; i < (pages_ + 63) / 64; ++i) {
    placed_bits_[i].store(0, std::memory_order_relaxed);
    requested_bits_[i].store(0, std::memory_order_relaxed);
  }
  for (uint64_t i = 0; i < pages_; ++i) fault_ns_[i].store(0, std::memory_order_relaxed);
}

Result<std::unique_ptr<PostcopyRam>> PostcopyRam::Start(const RamView& ram, const PostcopyStart& missing, RequestFn request) {
  if (ram.size % kWirePageSize || reinterpret_cast<uintptr_t>(ram.host) % kWirePageSize)
    return Errorf(ErrorCode::kInvalidArgument, "post-copy: guest RAM is not page aligned");
  if (missing.missing.size() != (ram.size / kWirePageSize + 63) / 64)
    return Errorf(ErrorCode::kInvalidArgument, "post-copy: missing-page bitmap does not match RAM");
  std::unique_ptr<PostcopyRam> r(new PostcopyRam(ram, missing, std::move(request)));
  // Drop our copies of the missing pages, in runs.
  const uint64_t pages = r->pages_, t_drop = NowNs();
  uint64_t runs = 0, dropped = 0;
  for (uint64_t p = 0; p < pages;) {
    if (!r->IsMissing(p)) {
      ++p;
      continue;
    }
    uint64_t q = p;
    while (q < pages && r->IsMissing(q)) ++q;
    uint8_t* at = ram.host + p * kWirePageSize;
    const size_t len = (q - p) * kWirePageSize;
    if (madvise(at, len, MADV_REMOVE) != 0 && madvise(at, len, MADV_DONTNEED) != 0)
      return Errorf(ErrorCode::kIo, "post-copy: drop pages {}..{}: {}", p, q, std::strerror(errno));
    dropped += q - p;
    ++runs;
    p = q;
  }
  spdlog::info("post-copy: dropped {} stale pages in {} runs in {:.1f} ms", dropped, runs, MsFromNs(NowNs() - t_drop));
  r->uffd_ = OpenUffd();
  if (r->uffd_ < 0) return Errorf(ErrorCode::kUnsupported, "post-copy: userfaultfd: {}", std::strerror(errno));
  uffdio_api api{};
  api.api = UFFD_API;
  api.features = 0;
  FERRY_RETURN_IF_ERROR(Ioctl(r->uffd_, UFFDIO_API, &api, "API"), "post-copy");
  uffdio_register reg{};
  reg.range.start = reinterpret_cast<uintptr_t>(ram.host);
  reg.range.len = ram.size;
  reg.mode = UFFDIO_REGISTER_MODE_MISSING;
  FERRY_RETURN_IF_ERROR(Ioctl(r->uffd_, UFFDIO_REGISTER, &reg, "register guest RAM"), "post-copy");
  r->registered_ = true;
  const uint64_t need = (1ull << _UFFDIO_COPY) | (1ull << _UFFDIO_ZEROPAGE) | (1ull << _UFFDIO_WAKE);
  if ((reg.ioctls & need) != need)
    return Errorf(ErrorCode::kUnsupported, "post-copy: this kernel cannot place pages into guest RAM (ioctls {:#x})", reg.ioctls);
  r->wake_fd_ = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
  if (r->wake_fd_ < 0) return Errorf(ErrorCode::kIo, "post-copy: eventfd: {}", std::strerror(errno));
  r->fault_thread_ = std::thread([p = r.get()] { p->FaultLoop(); });
  return r;
}

PostcopyRam::~PostcopyRam() {
  if (wake_fd_ >= 0) {
    const uint64_t one = 1;
    (void)!write(wake_fd_, &one, sizeof one);
  }
  if (fault_thread_.joinable()) fault_thread_.join();
  if (registered_ && !complete()) {
    // Pages are still missing: closing the descriptor would let waiting threads (and later
    // accesses) see zero pages. Keep it; the VMM stops without running the guest.
    spdlog::error("post-copy: {} of {} pages never arrived; guest RAM stays registered (the guest must not run)",
                  missing_count_ - placed_.load(), missing_count_);
  } else if (uffd_ >= 0) {
    if (registered_) {
      uffdio_range range{reinterpret_cast<uintptr_t>(ram_.host), ram_.size};
      (void)ioctl(uffd_, UFFDIO_UNREGISTER, &range);
    }
    close(uffd_);
  }
  if (wake_fd_ >= 0) close(wake_fd_);
}

Status PostcopyRam::Place(uint64_t gfn, const uint8_t* data) {
  const uintptr_t dst = reinterpret_cast<uintptr_t>(ram_.host) + gfn * kWirePageSize;
  for (;;) {
    int rc;
    if (data) {
      uffdio_copy c{};
      c.dst = dst;
      c.src = reinterpret_cast<uintptr_t>(data);
      c.len = kWirePageSize;
      rc = ioctl(uffd_, UFFDIO_COPY, &c);
    } else {
      uffdio_zeropage z{};
      z.range.start = dst;
      z.range.len = kWirePageSize;
      rc = ioctl(uffd_, UFFDIO_ZEROPAGE, &z);
    }
    if (rc == 0) return {};
    if (errno == EINTR || errno == EAGAIN) continue;
    if (errno == EEXIST) {
      // Present already (a racing fault resolution); make sure nobody keeps waiting on it.
      uffdio_range range{dst, kWirePageSize};
      (void)ioctl(uffd_, UFFDIO_WAKE, &range);
      return {};
    }
    return Errorf(ErrorCode::kIo, "post-copy: place page {}: {}", gfn, std::strerror(errno));
  }
}

Status PostcopyRam::WritePage(uint64_t gfn, std::span<const uint8_t> data) {
  if (gfn >= pages_ || data.size() != kWirePageSize) return Errorf(ErrorCode::kCorrupt, "post-copy: bad page {}", gfn);
  if (!IsMissing(gfn)) return Errorf(ErrorCode::kCorrupt, "post-copy: page {} was not missing (the guest owns it)", gfn);
  if (IsPlaced(gfn)) {
    duplicates_.fetch_add(1, std::memory_order_relaxed);
    return {};
  }
  FERRY_RETURN_IF_ERROR(Place(gfn, data.data()), "apply");
  placed_bits_[gfn / 64].fetch_or(1ull << (gfn % 64), std::memory_order_release);
  placed_.fetch_add(1);
  if (uint64_t t = fault_ns_[gfn].load(std::memory_order_acquire)) {
    const uint64_t us = (NowNs() - t) / 1000;
    MutexLock l(mu_);
    latency_us_.push_back(static_cast<uint32_t>(std::min<uint64_t>(us, UINT32_MAX)));
  }
  return {};
}

Status PostcopyRam::ZeroPage(uint64_t gfn) {
  if (gfn >= pages_) return Errorf(ErrorCode::kCorrupt, "post-copy: bad page {}", gfn);
  if (!IsMissing(gfn)) return Errorf(ErrorCode::kCorrupt, "post-copy: page {} was not missing (the guest owns it)", gfn);
  if (IsPlaced(gfn)) {
    duplicates_.fetch_add(1, std::memory_order_relaxed);
    return {};
  }
  FERRY_RETURN_IF_ERROR(Place(gfn, nullptr), "apply");
  placed_bits_[gfn / 64].fetch_or(1ull << (gfn % 64), std::memory_order_release);
  placed_.fetch_add(1);
  return {};
}

Status PostcopyRam::FreePage(uint64_t gfn) { return ZeroPage(gfn); }

Status PostcopyRam::ApplyDelta(uint64_t gfn, std::span<const uint8_t>) {
  return Errorf(ErrorCode::kCorrupt, "post-copy: delta for page {} (the destination dropped the copy it would apply to)", gfn);
}

Status PostcopyRam::Resolve(uint64_t addr) {
  const uint64_t base = reinterpret_cast<uintptr_t>(ram_.host);
  if (addr < base || addr >= base + ram_.size) return Errorf(ErrorCode::kInternal, "post-copy: fault outside guest RAM at {:#x}", addr);
  const uint64_t gfn = (addr - base) / kWirePageSize;
  if (!IsMissing(gfn) || IsPlaced(gfn)) {
    // Never sent (zero), or released after it arrived: zero, locally.
    local_faults_.fetch_add(1, std::memory_order_relaxed);
    return Place(gfn, nullptr);
  }
  const uint64_t bit = 1ull << (gfn % 64);
  if (requested_bits_[gfn / 64].fetch_or(bit) & bit) return {};  // asked already; its arrival wakes everyone
  uint64_t expected = 0;
  (void)fault_ns_[gfn].compare_exchange_strong(expected, NowNs());
  demand_faults_.fetch_add(1, std::memory_order_relaxed);
  // The page may have been placed between the check and the request: then the request only
  // costs a duplicate, and the placement woke the waiter already. A request that cannot be sent
  // now (the connection is being recovered) is sent again by RequestOutstanding().
  if (auto s = request_(gfn, 1); !s) spdlog::debug("post-copy: request for page {} not sent: {}", gfn, s.error().message());
  return {};
}

void PostcopyRam::FaultLoop() {
  uffd_msg msgs[64];
  for (;;) {
    pollfd fds[2] = {{uffd_, POLLIN, 0}, {wake_fd_, POLLIN, 0}};
    int n = poll(fds, 2, -1);
    if (n < 0 && errno == EINTR) continue;
    if (n < 0 || (fds[1].revents & POLLIN)) return;
    ssize_t got = read(uffd_, msgs, sizeof msgs);
    if (got < 0) {
      if (errno == EAGAIN || errno == EINTR) continue;
      MutexLock l(mu_);
      failure_ = Errorf(ErrorCode::kIo, "post-copy: read userfaultfd: {}", std::strerror(errno)).error();
      return;
    }
    for (size_t i = 0; i < static_cast<size_t>(got) / sizeof(uffd_msg); ++i) {
      if (msgs[i].event != UFFD_EVENT_PAGEFAULT) continue;
      auto s = Resolve(msgs[i].arg.pagefault.address & ~(uint64_t{kWirePageSize} - 1));
      if (!s) {
        spdlog::error("{}", s.error().message());
        MutexLock l(mu_);
        if (!failure_) failure_ = s.error();
        return;  // stop serving faults: waiting threads keep waiting
      }
    }
  }
}

Status PostcopyRam::Finish() {
  if (!complete())
    return Errorf(ErrorCode::kInternal, "post-copy: {} of {} pages still missing", missing_count_ - placed_.load(), missing_count_);
  if (wake_fd_ >= 0) {
    const uint64_t one = 1;
    (void)!write(wake_fd_, &one, sizeof one);
  }
  if (fault_thread_.joinable()) fault_thread_.join();
  if (registered_) {
    uffdio_range range{reinterpret_cast<uintptr_t>(ram_.host), ram_.size};
    FERRY_RETURN_IF_ERROR(Ioctl(uffd_, UFFDIO_UNREGISTER, &range, "unregister guest RAM"), "post-copy");
    registered_ = false;
  }
  return {};
}

PostcopyStart PostcopyRam::MissingNow() const {
  PostcopyStart m{pages_, 0, std::vector<uint64_t>(missing_.size(), 0)};
  for (size_t w = 0; w < missing_.size(); ++w) {
    m.missing[w] = missing_[w] & ~placed_bits_[w].load(std::memory_order_acquire);
    m.missing_pages += static_cast<uint64_t>(__builtin_popcountll(m.missing[w]));
  }
  return m;
}

Status PostcopyRam::RequestOutstanding() {
  for (size_t w = 0; w < missing_.size(); ++w) {
    uint64_t bits = requested_bits_[w].load() & ~placed_bits_[w].load(std::memory_order_acquire);
    while (bits) {
      const int b = __builtin_ctzll(bits);
      bits &= bits - 1;
      FERRY_RETURN_IF_ERROR(request_(w * 64 + static_cast<uint64_t>(b), 1), "post-copy: request again");
    }
  }
  return {};
}

PostcopyDone PostcopyRam::Stats() const {
  PostcopyDone d;
  d.demand_faults = demand_faults_.load();
  d.local_faults = local_faults_.load();
  d.duplicate_pages = duplicates_.load();
  std::vector<uint32_t> lat;
  {
    MutexLock l(mu_);
    lat = latency_us_;
  }
  if (!lat.empty()) {
    std::sort(lat.begin(), lat.end());
    d.p50_us = lat[(lat.size() - 1) / 2];
    d.p99_us = lat[std::min(lat.size() - 1, lat.size() * 99 / 100)];
    d.max_us = lat.back();
  }
  return d;
}

std::optional<Error> PostcopyRam::failure() const {
  MutexLock l(mu_);
  return failure_;
}

}  // namespace ferry::migration
