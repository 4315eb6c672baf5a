#include "vmm/snapshot.h"

#include <fcntl.h>
#include <sys/file.h>
#include <sys/random.h>
#include <sys/stat.h>
#include <unistd.h>

#include <climits>
#include <algorithm>
#include <cstring>

#include "common/crc32c.h"
#include "common/json.h"
#include "common/zero_page.h"

namespace ferry {
namespace {

constexpr char kMagic[8] = {'F', 'E', 'R', 'R', 'Y', 'S', 'N', 'P'};
constexpr uint64_t kMaxConfig = 1 << 20, kMaxVcpu = 1 << 20, kMaxDevice = 64 << 20, kMaxSections = 1024;
constexpr uint32_t kMandatory = 1;

class FileWriter {
 public:
  explicit FileWriter(int fd) : fd_(fd) {}
  Status Put(const void* p, size_t n) {
    const auto* b = static_cast<const uint8_t*>(p);
    if (buf_.size() + n > kBuf) FERRY_RETURN_IF_ERROR(FlushBuf(), "write snapshot");
    if (n >= kBuf) return WriteAll(b, n);
    buf_.insert(buf_.end(), b, b + n);
    return {};
  }
  Status FlushBuf() {
    auto s = WriteAll(buf_.data(), buf_.size());
    buf_.clear();
    return s;
  }

 private:
  static constexpr size_t kBuf = 4 << 20;
  Status WriteAll(const uint8_t* p, size_t n) {
    while (n) {
      ssize_t w = write(fd_, p, n);
      if (w < 0) {
        if (errno == EINTR) continue;
        return ErrnoError("write");
      }
      p += w;
      n -= static_cast<size_t>(w);
    }
    return {};
  }
  int fd_;
  std::vector<uint8_t> buf_;
};

struct SectionHeader {
  uint32_t type, flags;
  uint64_t length;
  uint32_t payload_crc, header_crc;
};
static_assert(sizeof(SectionHeader) == 24);
static_assert(kPageSize == kZeroCheckPageSize);

Status PutSection(FileWriter& w, SnapshotSection type, const std::vector<uint8_t>& payload) {
  SectionHeader h{static_cast<uint32_t>(type), kMandatory, payload.size(), Crc32c(payload), 0};
  h.header_crc = Crc32c(&h, 20);
  FERRY_RETURN_IF_ERROR(w.Put(&h, sizeof h), "section header");
  return w.Put(payload.data(), payload.size());
}

class FileReader {
 public:
  explicit FileReader(int fd, uint64_t size) : fd_(fd), size_(size) {}
  Status Get(void* p, uint64_t n, const char* what) {
    if (size_ - pos_ < n)
      return Errorf(ErrorCode::kCorrupt, "snapshot truncated in {} at offset {} (need {} bytes, {} left)", what, pos_, n,
                    size_ - pos_);
    auto* b = static_cast<uint8_t*>(p);
    uint64_t left = n;
    while (left) {
      ssize_t r = pread(fd_, b, left, static_cast<off_t>(pos_));
      if (r < 0) {
        if (errno == EINTR) continue;
        return ErrnoError("read snapshot");
      }
      if (r == 0) return Errorf(ErrorCode::kCorrupt, "snapshot truncated at offset {}", pos_);
      b += r;
      left -= static_cast<uint64_t>(r);
      pos_ += static_cast<uint64_t>(r);
    }
    return {};
  }
  uint64_t pos() const { return pos_; }
  uint64_t remaining() const { return size_ - pos_; }

 private:
  int fd_;
  uint64_t size_;
  uint64_t pos_ = 0;
};

// A new file next to `path` that nobody else made: O_EXCL (a file or symlink planted under the
// name is never written through) with a random suffix, tried a few times.
Result<int> CreateTemp(const std::string& path, std::string* tmp) {
  for (int attempt = 0;; ++attempt) {
    uint64_t r = 0;
    if (getrandom(&r, sizeof r, 0) != sizeof r) r = static_cast<uint64_t>(getpid()) * 0x9E3779B97F4A7C15ull + attempt;
    *tmp = fmt::format("{}.tmp.{:016x}", path, r);
    const int fd = open(tmp->c_str(), O_WRONLY | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC, 0600);
    if (fd >= 0) return fd;
    if (errno == EEXIST && attempt < 8) continue;
    // A path the caller got wrong is the caller's error (HTTP 400/403), not an I/O failure (500).
    const int err = errno;
    const std::string why = fmt::format("create snapshot '{}': {}", *tmp, strerror(err));
    switch (err) {
      case ENOENT: case ENOTDIR: case ENAMETOOLONG: case EISDIR: case ELOOP:
        return Errorf(ErrorCode::kInvalidArgument, "{} (the snapshot's directory must exist)", why);
      case EACCES: case EPERM: case EROFS: return Errorf(ErrorCode::kPermissionDenied, "{}", why);
      default: return Errorf(ErrorCode::kIo, "{}", why);
    }
  }
}

// fsync of the directory holding `path`, so that the rename survives a crash.
Status SyncParent(const std::string& path) {
  const size_t slash = path.rfind('/');
  const std::string dir = slash == std::string::npos ? "." : slash == 0 ? "/" : path.substr(0, slash);
  const int fd = open(dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (fd < 0) return ErrnoError("open directory '" + dir + "'");
  const int rc = fsync(fd);
  const int err = errno;
  close(fd);
  if (rc != 0) {
    errno = err;
    return ErrnoError("fsync directory '" + dir + "'");
  }
  return {};
}

}  // namespace

Status WriteSnapshot(const std::string& path, const SnapshotState& st, const GuestMemory& ram) {
  std::string tmp;
  auto created = CreateTemp(path, &tmp);
  if (!created) return std::unexpected(created.error());
  int fd = *created;
  auto fail = [&](Error e) -> Status {
    close(fd);
    unlink(tmp.c_str());
    return std::unexpected(std::move(e));
  };
  FileWriter w(fd);
  uint8_t hdr[32] = {};
  std::memcpy(hdr, kMagic, 8);
  uint32_t version = kSnapshotVersion, sections = 3 + static_cast<uint32_t>(st.devices.size()) + 1;
  std::memcpy(hdr + 8, &version, 4);
  std::memcpy(hdr + 16, &sections, 4);
  uint32_t crc = Crc32c(hdr, 28);
  std::memcpy(hdr + 28, &crc, 4);
  if (auto s = w.Put(hdr, sizeof hdr); !s) return fail(s.error());

  std::string cfg = st.config.dump();
  if (auto s = PutSection(w, SnapshotSection::kConfig, std::vector<uint8_t>(cfg.begin(), cfg.end())); !s) return fail(s.error());
  std::vector<uint8_t> vcpu(4, 0);  // hart 0
  vcpu.insert(vcpu.end(), st.vcpu.begin(), st.vcpu.end());
  if (auto s = PutSection(w, SnapshotSection::kVcpu, vcpu); !s) return fail(s.error());
  for (const auto& [id, blob] : st.devices) {
    // u32 id length, id, blob (sized at once: GCC 12's -Warray-bounds misreads inserts after a
    // 4-byte vector under -O2 with TSan)
    std::vector<uint8_t> p(4 + id.size() + blob.size());
    const uint32_t n = static_cast<uint32_t>(id.size());
    std::memcpy(p.data(), &n, 4);
    std::copy(id.begin(), id.end(), p.begin() + 4);
    std::copy(blob.begin(), blob.end(), p.begin() + 4 + static_cast<std::ptrdiff_t>(id.size()));
    if (auto s = PutSection(w, SnapshotSection::kDevice, p); !s) return fail(s.error());
  }
  // RAM: bitmap of non-zero pages, then those pages.
  const uint64_t pages = ram.num_pages();
  std::vector<uint64_t> bitmap((pages + 63) / 64, 0);
  uint64_t nonzero = 0;
  for (uint64_t p = 0; p < pages; ++p)
    if (!IsZeroPage(ram.host() + p * kPageSize)) {
      bitmap[p / 64] |= 1ull << (p % 64);
      nonzero++;
    }
  uint64_t ram_bytes = ram.size();
  uint64_t length = 16 + bitmap.size() * 8 + nonzero * kPageSize;
  uint32_t pcrc = Crc32c(&ram_bytes, 8);
  pcrc = Crc32c(&nonzero, 8, pcrc);
  pcrc = Crc32c(bitmap.data(), bitmap.size() * 8, pcrc);
  for (uint64_t p = 0; p < pages; ++p)
    if (bitmap[p / 64] >> (p % 64) & 1) pcrc = Crc32c(ram.host() + p * kPageSize, kPageSize, pcrc);
  SectionHeader h{static_cast<uint32_t>(SnapshotSection::kRam), kMandatory, length, pcrc, 0};
  h.header_crc = Crc32c(&h, 20);
  Status s = w.Put(&h, sizeof h);
  if (s) s = w.Put(&ram_bytes, 8);
  if (s) s = w.Put(&nonzero, 8);
  if (s) s = w.Put(bitmap.data(), bitmap.size() * 8);
  for (uint64_t p = 0; s && p < pages; ++p)
    if (bitmap[p / 64] >> (p % 64) & 1) s = w.Put(ram.host() + p * kPageSize, kPageSize);
  if (s) s = PutSection(w, SnapshotSection::kEnd, {});
  if (s) s = w.FlushBuf();
  if (!s) return fail(s.error().WithContext("write snapshot '" + path + "'"));
  if (fsync(fd) != 0) return fail(ErrnoError("fsync snapshot '" + tmp + "'").error());  // data on disk before the name points at it
  if (close(fd) != 0) {
    unlink(tmp.c_str());
    return ErrnoError("close snapshot");
  }
  if (rename(tmp.c_str(), path.c_str()) != 0) {
    auto e = ErrnoError("rename snapshot to '" + path + "'");
    unlink(tmp.c_str());
    return e;
  }
  return SyncParent(path);
}

Result<SnapshotState> ReadSnapshot(const std::string& path,
                                   const std::function<Result<GuestMemory*>(const nlohmann::json&)>& make_memory) {
  int fd = open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) return ErrnoError("open snapshot '" + path + "'");
  struct stat sb;
  if (fstat(fd, &sb) != 0) {
    close(fd);
    return ErrnoError("stat snapshot");
  }
  struct Closer {
    int fd;
    ~Closer() { close(fd); }
  } closer{fd};
  FileReader r(fd, static_cast<uint64_t>(sb.st_size));
  auto ctx = [&](const std::string& what) { return fmt::format("snapshot '{}': {}", path, what); };

  uint8_t hdr[32];
  FERRY_RETURN_IF_ERROR(r.Get(hdr, 32, "file header"), ctx("header"));
  if (std::memcmp(hdr, kMagic, 8) != 0) return Errorf(ErrorCode::kCorrupt, "{}", ctx("not a Ferry snapshot (bad magic)"));
  uint32_t version, sections, crc;
  std::memcpy(&version, hdr + 8, 4);
  std::memcpy(&sections, hdr + 16, 4);
  std::memcpy(&crc, hdr + 28, 4);
  if (crc != Crc32c(hdr, 28)) return Errorf(ErrorCode::kCorrupt, "{}", ctx("file header CRC mismatch"));
  if (version != kSnapshotVersion)
    return Errorf(ErrorCode::kVersionMismatch, "{}", ctx(fmt::format("format version {} not supported (this build reads {})", version, kSnapshotVersion)));
  if (sections < 4 || sections > kMaxSections) return Errorf(ErrorCode::kCorrupt, "{}", ctx(fmt::format("bad section count {}", sections)));

  SnapshotState st;
  GuestMemory* mem = nullptr;
  bool have_vcpu = false, have_ram = false, have_end = false;
  for (uint32_t i = 0; i < sections && !have_end; ++i) {
    const uint64_t at = r.pos();
    SectionHeader h;
    FERRY_RETURN_IF_ERROR(r.Get(&h, sizeof h, "section header"), ctx("section"));
    if (h.header_crc != Crc32c(&h, 20)) return Errorf(ErrorCode::kCorrupt, "{}", ctx(fmt::format("section header CRC mismatch at offset {}", at)));
    if (h.length > r.remaining()) return Errorf(ErrorCode::kCorrupt, "{}", ctx(fmt::format("section at offset {} claims {} bytes, only {} left", at, h.length, r.remaining())));
    const auto type = static_cast<SnapshotSection>(h.type);
    if (i == 0 && type != SnapshotSection::kConfig) return Errorf(ErrorCode::kCorrupt, "{}", ctx("first section is not CONFIG"));
    if (type == SnapshotSection::kRam) {
      if (!mem) return Errorf(ErrorCode::kCorrupt, "{}", ctx("RAM before CONFIG"));
      uint64_t ram_bytes, nonzero;
      FERRY_RETURN_IF_ERROR(r.Get(&ram_bytes, 8, "RAM"), ctx("RAM"));
      FERRY_RETURN_IF_ERROR(r.Get(&nonzero, 8, "RAM"), ctx("RAM"));
      if (ram_bytes != mem->size()) return Errorf(ErrorCode::kCorrupt, "{}", ctx(fmt::format("RAM section has {} bytes, config says {}", ram_bytes, mem->size())));
      const uint64_t pages = mem->num_pages();
      std::vector<uint64_t> bitmap((pages + 63) / 64);
      if (nonzero > pages || h.length != 16 + bitmap.size() * 8 + nonzero * kPageSize)
        return Errorf(ErrorCode::kCorrupt, "{}", ctx(fmt::format("RAM section length {} inconsistent with {} pages", h.length, nonzero)));
      FERRY_RETURN_IF_ERROR(r.Get(bitmap.data(), bitmap.size() * 8, "RAM bitmap"), ctx("RAM"));
      uint64_t count = 0;
      for (uint64_t p = 0; p < pages; ++p) count += bitmap[p / 64] >> (p % 64) & 1;
      if (count != nonzero) return Errorf(ErrorCode::kCorrupt, "{}", ctx("RAM bitmap does not match page count"));
      uint32_t pcrc = Crc32c(&ram_bytes, 8);
      pcrc = Crc32c(&nonzero, 8, pcrc);
      pcrc = Crc32c(bitmap.data(), bitmap.size() * 8, pcrc);
      std::memset(mem->host(), 0, mem->size());
      for (uint64_t p = 0; p < pages; ++p) {
        if (!(bitmap[p / 64] >> (p % 64) & 1)) continue;
        uint8_t* dst = mem->host() + p * kPageSize;
        FERRY_RETURN_IF_ERROR(r.Get(dst, kPageSize, "RAM pages"), ctx("RAM"));
        pcrc = Crc32c(dst, kPageSize, pcrc);
      }
      if (pcrc != h.payload_crc) return Errorf(ErrorCode::kCorrupt, "{}", ctx("RAM section CRC mismatch"));
      have_ram = true;
      continue;
    }
    uint64_t limit = type == SnapshotSection::kConfig ? kMaxConfig : type == SnapshotSection::kVcpu ? kMaxVcpu : kMaxDevice;
    if (h.length > limit) return Errorf(ErrorCode::kCorrupt, "{}", ctx(fmt::format("section type {} length {} over limit {}", h.type, h.length, limit)));
    std::vector<uint8_t> payload(h.length);
    FERRY_RETURN_IF_ERROR(r.Get(payload.data(), h.length, "section payload"), ctx("section"));
    if (Crc32c(payload) != h.payload_crc) return Errorf(ErrorCode::kCorrupt, "{}", ctx(fmt::format("section type {} at offset {}: payload CRC mismatch", h.type, at)));
    switch (type) {
      case SnapshotSection::kConfig: {
        if (i != 0) return Errorf(ErrorCode::kCorrupt, "{}", ctx("duplicate CONFIG"));
        auto cfg = ParseJson({reinterpret_cast<const char*>(payload.data()), payload.size()}, "CONFIG", ErrorCode::kCorrupt);
        if (!cfg) return std::unexpected(cfg.error().WithContext(ctx("section")));
        if (!cfg->is_object()) return Errorf(ErrorCode::kCorrupt, "{}", ctx("CONFIG is not a JSON object"));
        st.config = std::move(*cfg);
        auto m = make_memory(st.config);
        if (!m) return std::unexpected(m.error().WithContext(ctx("build VM from CONFIG")));
        mem = *m;
        break;
      }
      case SnapshotSection::kVcpu: {
        uint32_t hart = 1;
        if (payload.size() >= 4) std::memcpy(&hart, payload.data(), 4);
        if (payload.size() < 4 || hart != 0 || have_vcpu) return Errorf(ErrorCode::kCorrupt, "{}", ctx("bad VCPU section"));
        st.vcpu.assign(payload.begin() + 4, payload.end());
        have_vcpu = true;
        break;
      }
      case SnapshotSection::kDevice: {
        uint32_t n = UINT32_MAX;
        if (payload.size() >= 4) std::memcpy(&n, payload.data(), 4);
        if (payload.size() < 4 || n == 0 || n > 128 || payload.size() - 4 < n) return Errorf(ErrorCode::kCorrupt, "{}", ctx("bad DEVICE section"));
        std::string id(payload.begin() + 4, payload.begin() + 4 + n);
        if (st.devices.count(id)) return Errorf(ErrorCode::kCorrupt, "{}", ctx("duplicate device " + id));
        st.devices[id].assign(payload.begin() + 4 + n, payload.end());
        break;
      }
      case SnapshotSection::kEnd:
        if (h.length != 0) return Errorf(ErrorCode::kCorrupt, "{}", ctx("END section not empty"));
        have_end = true;
        break;
      default:
        if (h.flags & kMandatory) return Errorf(ErrorCode::kUnsupported, "{}", ctx(fmt::format("unknown mandatory section type {}", h.type)));
        break;  // optional section from a newer writer: skip
    }
  }
  if (!have_end || !have_vcpu || !have_ram) return Errorf(ErrorCode::kCorrupt, "{}", ctx("missing VCPU, RAM or END section"));
  if (r.remaining() != 0) return Errorf(ErrorCode::kCorrupt, "{}", ctx(fmt::format("{} trailing bytes after END", r.remaining())));
  return st;
}

Result<SnapshotClaim> SnapshotClaim::Acquire(const std::string& snapshot_path) {
  char real[PATH_MAX];
  if (!realpath(snapshot_path.c_str(), real)) return Errorf(ErrorCode::kIo, "snapshot '{}': {}", snapshot_path, std::strerror(errno));
  const std::string path = std::string(real) + ".claim";
  // O_NOFOLLOW and a regular file only: a symlink or device planted under the claim's name is never
  // truncated or written through (the claim file is rewritten with our pid below).
  const int fd = open(path.c_str(), O_RDWR | O_CREAT | O_NOFOLLOW | O_CLOEXEC, 0644);
  if (fd < 0)
    return Errorf(ErrorCode::kIo, "cannot claim snapshot '{}' ({}: {}); --restore-clone runs a copy without a claim", snapshot_path, path,
                  std::strerror(errno));
  struct stat st {};
  if (fstat(fd, &st) != 0 || !S_ISREG(st.st_mode)) {
    close(fd);
    return Errorf(ErrorCode::kInvalidArgument, "cannot claim snapshot '{}': {} is not a regular file", snapshot_path, path);
  }
  if (flock(fd, LOCK_EX | LOCK_NB) != 0) {
    const int err = errno;
    char holder[32] = {};
    const ssize_t n = pread(fd, holder, sizeof holder - 1, 0);
    close(fd);
    if (err != EWOULDBLOCK) return Errorf(ErrorCode::kIo, "cannot claim snapshot '{}' ({}: {})", snapshot_path, path, std::strerror(err));
    std::string pid(holder, n > 0 ? static_cast<size_t>(n) : 0);
    while (!pid.empty() && (pid.back() == '\n' || pid.back() == ' ')) pid.pop_back();
    return Errorf(ErrorCode::kBusy,
                  "snapshot '{}' is already restored and running (ferry-vmm pid {}, claim {}): a second copy of the same VM would "
                  "run with the same identity, MAC address and disk; stop that copy first, or pass --restore-clone to run a clone "
                  "with a new identity",
                  snapshot_path, pid.empty() ? "unknown" : pid, path);
  }
  const std::string me = std::to_string(getpid()) + "\n";
  if (ftruncate(fd, 0) != 0 || pwrite(fd, me.data(), me.size(), 0) != static_cast<ssize_t>(me.size())) {
    const int err = errno;
    close(fd);
    return Errorf(ErrorCode::kIo, "cannot claim snapshot '{}' ({}: {})", snapshot_path, path, std::strerror(err));
  }
  return SnapshotClaim(fd, path);
}

SnapshotClaim::~SnapshotClaim() {
  if (fd_ >= 0) close(fd_);  // releases the lock
}

}  // namespace ferry
