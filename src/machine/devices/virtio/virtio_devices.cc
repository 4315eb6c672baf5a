// virtio-blk (raw file), virtio-net (a NetBackend: TAP, or a socket pair in tests) and virtio-balloon (free page reporting, discarding
// the reported pages).
#include <fcntl.h>
#include <sys/epoll.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cstring>

#include <spdlog/spdlog.h>

#include "common/state_io.h"
#include "machine/devices/virtio/net_backend.h"
#include "machine/devices/virtio/virtio_mmio.h"

namespace ferry {
namespace {

using MacAddress = std::array<uint8_t, 6>;

bool ReadConfigBytes(const void* cfg, size_t cfg_len, uint64_t off, unsigned size, uint64_t* v) {
  *v = 0;
  if (off + size > cfg_len) return true;  // beyond config: reads as zero
  std::memcpy(v, static_cast<const uint8_t*>(cfg) + off, size);
  return true;
}

// ---------------------------------------------------------------- virtio-blk
class VirtioBlk final : public VirtioMmioDevice {
 public:
  static constexpr uint64_t kFRo = 1ull << 5, kFFlush = 1ull << 9;
  // One request moves at most kMaxRequestBytes (the used ring's length is 32 bits; Linux sends far
  // less), through a buffer of at most kChunkBytes.
  static constexpr uint64_t kMaxRequestBytes = 1ull << 30, kChunkBytes = 1ull << 20;
  VirtioBlk(const VirtioDeps& d, int fd, uint64_t bytes, bool ro, std::string path)
      : VirtioMmioDevice(d, 2, 1, kFFlush | (ro ? kFRo : 0)), fd_(fd), capacity_(bytes / 512), ro_(ro), path_(std::move(path)) {}
  ~VirtioBlk() override { close(fd_); }

 protected:
  std::string kind() const override { return "virtio-blk"; }
  bool ReadConfig(uint64_t off, unsigned size, uint64_t* v) override {
    uint8_t cfg[8];
    std::memcpy(cfg, &capacity_, 8);
    return ReadConfigBytes(cfg, sizeof cfg, off, size, v);
  }
  void OnQueueNotify(int q) override {
    VirtioChain c;
    bool any = false;
    while (PopChain(q, &c)) {
      Handle(q, c);
      any = true;
    }
    if (any) SignalUsed();
  }
  DeviceActivity Activity() const override { return {.packets = 0, .requests = requests_}; }
  nlohmann::json DeviceMetrics() const override {
    return {{"path", path_}, {"read_bytes", read_bytes_}, {"write_bytes", write_bytes_}, {"requests", requests_}, {"io_errors", io_errors_}};
  }

 private:
  // All disk writes go through here (disk migration will track dirty blocks at this point).
  bool WriteBlocks(uint64_t offset, const uint8_t* data, size_t len) {
    if (pwrite(fd_, data, len, static_cast<off_t>(offset)) != static_cast<ssize_t>(len)) return false;
    write_bytes_ += len;
    return true;
  }
  void Handle(int q, const VirtioChain& c) {
    requests_++;
    struct { uint32_t type, reserved; uint64_t sector; } hdr;
    uint64_t wbytes = c.writable_bytes();
    if (wbytes < 1 || !ReadChain(c, 0, &hdr, sizeof hdr)) {
      DeviceError("malformed virtio-blk request");
      return;
    }
    uint8_t status = 0;
    uint32_t written = 0;
    const uint64_t data_out = c.readable_bytes() - sizeof hdr;  // OUT payload
    const uint64_t data_in = wbytes - 1;                         // IN space (last byte = status)
    const uint64_t off = hdr.sector * 512;
    // Data moves through a bounded buffer, chunk by chunk: a request may be as large as the disk.
    std::vector<uint8_t> buf;
    const auto chunk = [&](uint64_t left) {
      buf.resize(std::min<uint64_t>(left, kChunkBytes));
      return buf.size();
    };
    switch (hdr.type) {
      case 0:  // IN
        if (data_in % 512 || data_in > kMaxRequestBytes || hdr.sector > capacity_ || data_in / 512 > capacity_ - hdr.sector) {
          status = 1;
          break;
        }
        for (uint64_t done = 0; done < data_in;) {
          const uint64_t n = chunk(data_in - done);
          if (pread(fd_, buf.data(), n, static_cast<off_t>(off + done)) != static_cast<ssize_t>(n)) { status = 1; io_errors_++; break; }
          if (!WriteChain(c, done, buf.data(), n)) { DeviceError("IN buffer outside RAM"); return; }
          done += n;
        }
        if (status != 0) break;
        read_bytes_ += data_in;
        written = static_cast<uint32_t>(data_in);
        break;
      case 1:  // OUT
        if (ro_) { status = 1; break; }
        if (data_out % 512 || data_out > kMaxRequestBytes || hdr.sector > capacity_ || data_out / 512 > capacity_ - hdr.sector) {
          status = 1;
          break;
        }
        for (uint64_t done = 0; done < data_out;) {
          const uint64_t n = chunk(data_out - done);
          if (!ReadChain(c, sizeof hdr + done, buf.data(), n)) { DeviceError("OUT buffer outside RAM"); return; }
          if (!WriteBlocks(off + done, buf.data(), n)) { status = 1; io_errors_++; break; }
          done += n;
        }
        break;
      case 4:  // FLUSH
        if (fdatasync(fd_) != 0) { status = 1; io_errors_++; }
        break;
      case 8: {  // GET_ID
        char idstr[20] = "ferry-disk";
        uint64_t n = std::min<uint64_t>(data_in, sizeof idstr);
        if (!WriteChain(c, 0, idstr, n)) { DeviceError("GET_ID buffer outside RAM"); return; }
        written = static_cast<uint32_t>(n);
        break;
      }
      default: status = 2;
    }
    if (!WriteChain(c, wbytes - 1, &status, 1)) { DeviceError("status byte outside RAM"); return; }
    PushUsed(q, c.head, written + 1);
  }
  int fd_;
  uint64_t capacity_;
  bool ro_;
  std::string path_;
  uint64_t read_bytes_ = 0, write_bytes_ = 0, requests_ = 0, io_errors_ = 0;
};

// ---------------------------------------------------------------- virtio-net
class VirtioNet final : public VirtioMmioDevice {
 public:
  static constexpr uint64_t kFMac = 1ull << 5;
  static constexpr size_t kHdr = 12;  // virtio_net_hdr_v1
  static constexpr size_t kMaxFrame = 65536 - kHdr;  // what a TAP frame can be (the guest's MTU is far below)
  VirtioNet(const VirtioDeps& d, std::unique_ptr<NetBackend> backend, MacAddress mac)
      : VirtioMmioDevice(d, 1, 2, kFMac), backend_(std::move(backend)), mac_(mac) {}
  ~VirtioNet() override {
    if (deps().loop && polling_) deps().loop->Remove(backend_->fd());
  }
  Status Announce() {
    uint8_t f[kHdr + 60] = {};
    uint8_t* e = f + kHdr;
    std::memset(e, 0xff, 6);
    std::memcpy(e + 6, mac_.data(), 6);
    e[12] = 0x80; e[13] = 0x35;                 // RARP
    e[14] = 0; e[15] = 1; e[16] = 0x08; e[17] = 0;  // htype ethernet, ptype IPv4
    e[18] = 6; e[19] = 4; e[20] = 0; e[21] = 3;     // hlen, plen, op = reverse request
    std::memcpy(e + 22, mac_.data(), 6);
    std::memcpy(e + 32, mac_.data(), 6);
    if (!backend_->Write(f)) return ErrnoError("announce MAC on " + backend_->name());
    announces_++;
    return {};
  }

 protected:
  std::string kind() const override { return "virtio-net"; }
  bool ReadConfig(uint64_t off, unsigned size, uint64_t* v) override {
    uint8_t cfg[8] = {};
    std::memcpy(cfg, mac_.data(), 6);
    cfg[6] = 1;  // status: link up
    return ReadConfigBytes(cfg, sizeof cfg, off, size, v);
  }
  void OnDriverOk() override { EnsurePolling(); }
  void OnReset() override {}
  void OnQueueNotify(int q) override {
    if (q == 0) { EnsurePolling(); Receive(); return; }
    VirtioChain c;
    bool any = false;
    std::vector<uint8_t> frame;
    while (PopChain(1, &c)) {
      // The length is checked before anything is allocated: a chain may claim 1024 descriptors
      // each covering all of RAM.
      const uint64_t len = c.readable_bytes();
      if (len < kHdr || len > kHdr + kMaxFrame) {
        tx_errors_++;
        PushUsed(1, c.head, 0);
        any = true;
        continue;
      }
      frame.resize(len);
      if (!ReadChain(c, 0, frame.data(), frame.size())) {
        tx_errors_++;
      } else if (!backend_->Write(frame)) {
        tx_dropped_++;
      } else {
        tx_packets_++;
        tx_bytes_ += frame.size() - kHdr;
      }
      PushUsed(1, c.head, 0);
      any = true;
    }
    if (any) SignalUsed();
  }
  DeviceActivity Activity() const override { return {.packets = rx_packets_ + tx_packets_, .requests = 0}; }
  nlohmann::json DeviceMetrics() const override {
    return {{"tap", backend_->name()}, {"mac", FormatMacStr()}, {"rx_packets", rx_packets_}, {"rx_bytes", rx_bytes_},
            {"rx_dropped", rx_dropped_}, {"tx_packets", tx_packets_}, {"tx_bytes", tx_bytes_},
            {"tx_dropped", tx_dropped_}, {"tx_errors", tx_errors_}, {"announces", announces_}};
  }

 private:
  std::string FormatMacStr() const {
    return fmt::format("{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}", mac_[0], mac_[1], mac_[2], mac_[3], mac_[4], mac_[5]);
  }
  void EnsurePolling() {
    if (!deps().loop) return;
    if (!polling_) {
      auto s = deps().loop->Add(backend_->fd(), EPOLLIN, [this](uint32_t) { Receive(); });
      if (!s) { spdlog::error("virtio-net: cannot poll {}: {}", backend_->name(), s.error().ToString()); return; }
      polling_ = true;
      armed_ = true;
    } else if (!armed_) {
      (void)deps().loop->Modify(backend_->fd(), EPOLLIN);
      armed_ = true;
    }
  }
  void Receive() {
    bool any = false;
    uint8_t buf[kHdr + 65536];
    for (;;) {
      if (!QueueUsable(0)) break;
      // Peek for a buffer first so frames are never read without somewhere to put them.
      Queue& q = queues_[0];
      uint16_t avail_idx;
      if (!memory()->Read(q.avail + 2, &avail_idx, 2)) { DeviceError("rx avail ring outside RAM"); break; }
      if (avail_idx == q.last_avail) {  // no RX buffers: stop polling until the driver adds some
        if (armed_ && deps().loop) { (void)deps().loop->Modify(backend_->fd(), 0); armed_ = false; }
        break;
      }
      ssize_t n = backend_->Read(buf, sizeof buf);
      if (n < 0) break;  // EAGAIN: nothing more
      if (n < static_cast<ssize_t>(kHdr)) continue;
      VirtioChain c;
      if (!PopChain(0, &c)) break;
      uint16_t one = 1;
      std::memcpy(buf + 10, &one, 2);  // num_buffers
      if (c.writable_bytes() < static_cast<uint64_t>(n)) {
        rx_dropped_++;
        PushUsed(0, c.head, 0);
      } else if (!WriteChain(c, 0, buf, static_cast<uint64_t>(n))) {
        DeviceError("rx buffer outside RAM");
        break;
      } else {
        PushUsed(0, c.head, static_cast<uint32_t>(n));
        rx_packets_++;
        rx_bytes_ += static_cast<uint64_t>(n) - kHdr;
      }
      any = true;
    }
    if (any) SignalUsed();
  }
  std::unique_ptr<NetBackend> backend_;
  MacAddress mac_;
  bool polling_ = false, armed_ = false;
  uint64_t rx_packets_ = 0, rx_bytes_ = 0, rx_dropped_ = 0, tx_packets_ = 0, tx_bytes_ = 0, tx_dropped_ = 0,
           tx_errors_ = 0, announces_ = 0;
};

// ---------------------------------------------------------------- virtio-balloon
// Free page reporting (queue 2): every device-writable descriptor of a report is a range
// the guest's buddy allocator holds free (chunks of at least pageblock order). The device
// discards the host memory of each range (GuestMemory::Discard: punched out of the memfd,
// reads as zero) and marks its pages freed in the dirty log, before handing the buffer
// back; only then may the guest allocate those pages again, and its first write turns the
// mark back into "written". The dirty log is therefore the only record of which pages are
// free: the device keeps no bitmap of its own.
//
// Blob (device bytes after the virtio-mmio transport fields):
//   version 2: u32 num_pages, u32 actual.
//   version 1: u32 num_pages, u32 actual, free-page bitmap (u32 length + bytes). Still
//     restored; the bitmap's size must match this VM's RAM but its contents are ignored
//     (it was never cleared when the guest reused a page, so it is not trustworthy; the
//     restored pages simply count as data).
class VirtioBalloon final : public VirtioMmioDevice, public FreePageReport {
 public:
  static constexpr uint64_t kFReporting = 1ull << 5;
  static constexpr int kReportingQueue = 2;
  explicit VirtioBalloon(const VirtioDeps& d) : VirtioMmioDevice(d, 5, 3, kFReporting) {}
  uint64_t total_reports() const override { return ranges_; }
  uint64_t reported_bytes() const override { return reported_bytes_; }
  uint64_t discarded_bytes() const override { return discarded_bytes_; }
  uint64_t rejected_ranges() const override { return rejected_ranges_ + discard_errors_; }

 protected:
  std::string kind() const override { return "virtio-balloon"; }
  uint32_t state_version() const override { return 2; }
  bool ReadConfig(uint64_t off, unsigned size, uint64_t* v) override {
    uint32_t cfg[4] = {num_pages_, actual_, 0, 0};
    return ReadConfigBytes(cfg, sizeof cfg, off, size, v);
  }
  bool WriteConfig(uint64_t off, unsigned size, uint64_t v) override {
    if (off == 4 && size == 4) actual_ = static_cast<uint32_t>(v);
    return true;
  }
  void OnQueueNotify(int q) override {
    VirtioChain c;
    bool any = false;
    while (PopChain(q, &c)) {
      if (q == kReportingQueue) {
        for (const auto& s : c.segs) ReportFree(s);
      } else {
        (q == 0 ? inflates_ : deflates_) += c.readable_bytes() / 4;
      }
      PushUsed(q, c.head, 0);  // after the discard: the guest may reuse the pages from here on
      any = true;
    }
    if (any) SignalUsed();
  }
  void SaveDevice(StateWriter& w) const override {
    w.PutU32(num_pages_);
    w.PutU32(actual_);
  }
  Status RestoreDevice(StateReader& r, uint32_t version) override {
    uint32_t np, act;
    FERRY_ASSIGN(np, r.GetU32());
    FERRY_ASSIGN(act, r.GetU32());
    if (version == 1) {
      std::vector<uint8_t> bits;  // ignored (see the blob comment above)
      FERRY_ASSIGN(bits, r.GetBytes());
      if (bits.size() != (memory()->num_pages() + 7) / 8)
        return Errorf(ErrorCode::kCorrupt, "balloon: version 1 free-page bitmap has {} bytes, RAM needs {}", bits.size(),
                      (memory()->num_pages() + 7) / 8);
    }
    FERRY_RETURN_IF_ERROR(r.ExpectEnd(kind()), "balloon");  // before changing anything
    num_pages_ = np;
    actual_ = act;
    return {};
  }
  nlohmann::json DeviceMetrics() const override {
    return {{"free_page_reports", ranges_}, {"reported_bytes", reported_bytes_}, {"discarded_bytes", discarded_bytes_},
            {"rejected_ranges", rejected_ranges_}, {"discard_errors", discard_errors_},
            {"inflated_pages", inflates_}, {"deflated_pages", deflates_}};
  }

 private:
  // One reported range: clipped to RAM (a range outside RAM is counted, never fatal), whole
  // pages discarded. PopChain already rejects descriptors outside RAM (DEVICE_NEEDS_RESET),
  // so the clipping is defence in depth.
  void ReportFree(const VirtioSeg& s) {
    ranges_++;
    reported_bytes_ += s.len;
    GuestMemory* m = memory();
    if (!s.writable) {  // the driver hands reported pages over as device-writable buffers
      rejected_ranges_++;
      return;
    }
    const uint64_t end = s.gpa > UINT64_MAX - s.len ? UINT64_MAX : s.gpa + s.len;
    const uint64_t lo = std::max(s.gpa, m->base()), hi = std::min(end, m->base() + m->size());
    if (lo != s.gpa || hi != end) rejected_ranges_++;
    if (lo >= hi) return;
    if (auto st = m->Discard(lo, hi - lo); !st) {
      if (discard_errors_++ < 4) spdlog::warn("{} ({}): free page report: {}", id(), kind(), st.error().ToString());
      return;
    }
    const uint64_t first_page = (lo - m->base() + kPageSize - 1) >> kPageShift, end_page = (hi - m->base()) >> kPageShift;
    if (end_page > first_page) discarded_bytes_ += (end_page - first_page) << kPageShift;  // what Discard released
  }

  uint32_t num_pages_ = 0, actual_ = 0;
  uint64_t ranges_ = 0, reported_bytes_ = 0, discarded_bytes_ = 0, rejected_ranges_ = 0, discard_errors_ = 0,
           inflates_ = 0, deflates_ = 0;
};

}  // namespace

Result<std::unique_ptr<Device>> CreateVirtioBlk(const VirtioDeps& deps, const std::string& path, bool read_only) {
  int fd = open(path.c_str(), (read_only ? O_RDONLY : O_RDWR) | O_CLOEXEC);
  if (fd < 0) return ErrnoError("open disk '" + path + "'");
  struct stat st;
  if (fstat(fd, &st) != 0 || !S_ISREG(st.st_mode)) {
    close(fd);
    return Errorf(ErrorCode::kInvalidArgument, "disk '{}' is not a regular file", path);
  }
  if (st.st_size % 512) {
    close(fd);
    return Errorf(ErrorCode::kInvalidArgument, "disk '{}' size {} is not a multiple of 512", path, st.st_size);
  }
  return std::unique_ptr<Device>(new VirtioBlk(deps, fd, static_cast<uint64_t>(st.st_size), read_only, path));
}

Result<std::unique_ptr<Device>> CreateVirtioNet(const VirtioDeps& deps, const std::string& tap, std::array<uint8_t, 6> mac) {
  auto backend = OpenTapBackend(tap);
  if (!backend) return std::unexpected(backend.error());
  return CreateVirtioNet(deps, std::move(*backend), mac);
}

Result<std::unique_ptr<Device>> CreateVirtioNet(const VirtioDeps& deps, std::unique_ptr<NetBackend> backend,
                                                std::array<uint8_t, 6> mac) {
  if (!backend) return Errorf(ErrorCode::kInvalidArgument, "virtio-net without a backend");
  return std::unique_ptr<Device>(new VirtioNet(deps, std::move(backend), mac));
}

Result<std::unique_ptr<Device>> CreateVirtioBalloon(const VirtioDeps& deps) {
  return std::unique_ptr<Device>(new VirtioBalloon(deps));
}

FreePageReport* AsFreePageReport(Device* device) { return dynamic_cast<VirtioBalloon*>(device); }

Status AnnounceMac(Device* device) {
  auto* net = dynamic_cast<VirtioNet*>(device);
  if (!net) return Errorf(ErrorCode::kInvalidArgument, "device is not virtio-net");
  return net->Announce();
}

}  // namespace ferry
