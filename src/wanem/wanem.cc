#include "wanem/wanem.h"

#include <fcntl.h>
#include <linux/if.h>
#include <linux/if_tun.h>
#include <poll.h>
#include <sched.h>
#include <sys/eventfd.h>
#include <sys/ioctl.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cmath>
#include <cstring>
#include <deque>
#include <memory>
#include <random>
#include <vector>

#include <fmt/format.h>

#include "common/clock.h"

namespace ferry::wanem {
namespace {


constexpr uint8_t kVnetNeedsCsum = 1;
constexpr uint8_t kGsoTcp4 = 1, kGsoTcp6 = 4, kGsoEcn = 0x80;

uint16_t Get16(const uint8_t* p) { return static_cast<uint16_t>(p[0] << 8 | p[1]); }
uint32_t Get32(const uint8_t* p) { return uint32_t(p[0]) << 24 | uint32_t(p[1]) << 16 | uint32_t(p[2]) << 8 | p[3]; }
void Put16(uint8_t* p, uint16_t v) {
  p[0] = static_cast<uint8_t>(v >> 8);
  p[1] = static_cast<uint8_t>(v);
}
void Put32(uint8_t* p, uint32_t v) {
  Put16(p, static_cast<uint16_t>(v >> 16));
  Put16(p + 2, static_cast<uint16_t>(v));
}
uint32_t SumWords(const uint8_t* p, size_t n, uint32_t sum) {
  for (size_t i = 0; i + 1 < n; i += 2) sum += Get16(p + i);
  if (n & 1) sum += uint32_t(p[n - 1]) << 8;
  return sum;
}
uint16_t Fold(uint32_t sum) {
  while (sum >> 16) sum = (sum & 0xffff) + (sum >> 16);
  return static_cast<uint16_t>(sum);
}

}  // namespace

bool ParseTso(const uint8_t* f, size_t n, TsoInfo* t) {
  VnetHdr h;
  memcpy(&h, f, sizeof h);
  uint8_t type = h.gso_type & ~kGsoEcn;
  if ((type != kGsoTcp4 && type != kGsoTcp6) || h.gso_size == 0 || !(h.flags & kVnetNeedsCsum)) return false;
  const uint8_t* e = f + sizeof h;
  size_t len = n - sizeof h;
  if (len < 14 + 40 + 20) return false;
  uint16_t et = Get16(e + 12);
  t->l3 = 14;
  if (et == 0x0800 && type == kGsoTcp4) {
    size_t ihl = (e[14] & 15u) * 4;
    if (ihl < 20 || e[14 + 9] != 6) return false;
    t->l4 = 14 + ihl;
    t->v6 = false;
  } else if (et == 0x86dd && type == kGsoTcp6) {
    if (e[14 + 6] != 6) return false;  // extension headers: not split
    t->l4 = 14 + 40;
    t->v6 = true;
  } else {
    return false;
  }
  if (len < t->l4 + 20) return false;
  size_t doff = (e[t->l4 + 12] >> 4) * 4u;
  t->hdrs = t->l4 + doff;
  if (doff < 20 || len < t->hdrs) return false;
  t->payload = len - t->hdrs;
  t->mss = h.gso_size;
  t->segs = std::max<size_t>(1, (t->payload + t->mss - 1) / t->mss);
  return true;
}

size_t MakeSegment(const uint8_t* f, const TsoInfo& t, size_t k, uint8_t* out) {
  const size_t vh = sizeof(VnetHdr);
  size_t off = k * t.mss, plen = std::min(t.mss, t.payload - off);
  VnetHdr h{};
  h.flags = kVnetNeedsCsum;
  h.csum_start = static_cast<uint16_t>(t.l4);
  h.csum_offset = 16;
  memcpy(out, &h, vh);
  uint8_t* e = out + vh;
  memcpy(e, f + vh, t.hdrs);
  memcpy(e + t.hdrs, f + vh + t.hdrs + off, plen);
  uint8_t* ip = e + t.l3;
  uint8_t* tcp = e + t.l4;
  size_t tcp_len = t.hdrs - t.l4 + plen;
  uint32_t pseudo = 6 + static_cast<uint32_t>(tcp_len);
  if (!t.v6) {
    Put16(ip + 2, static_cast<uint16_t>(t.hdrs - t.l3 + plen));
    Put16(ip + 4, static_cast<uint16_t>(Get16(ip + 4) + k));  // IP ID increments per segment, as in the kernel
    Put16(ip + 10, 0);
    Put16(ip + 10, static_cast<uint16_t>(~Fold(SumWords(ip, t.l4 - t.l3, 0))));
    pseudo = SumWords(ip + 12, 8, pseudo);
  } else {
    Put16(ip + 4, static_cast<uint16_t>(tcp_len));
    pseudo = SumWords(ip + 8, 32, pseudo);
  }
  Put32(tcp + 4, Get32(tcp + 4) + static_cast<uint32_t>(off));
  if (k + 1 < t.segs) tcp[13] &= static_cast<uint8_t>(~0x09);  // FIN, PSH only on the last
  if (k > 0) tcp[13] &= static_cast<uint8_t>(~0x80);            // CWR only on the first
  Put16(tcp + 16, Fold(pseudo));  // partial checksum: pseudo header, completed by the kernel
  return vh + t.hdrs + plen;
}

namespace {

bool SafeToken(const std::string& s) {
  if (s.empty() || s.size() > 64) return false;
  for (char c : s)
    if (!isalnum(static_cast<unsigned char>(c)) && !strchr("._-:/", c)) return false;
  return true;
}

Status RunCmd(std::vector<std::string> argv) {
  pid_t pid = fork();
  if (pid < 0) return ErrnoError("fork");
  if (pid == 0) {
    std::vector<char*> a;
    for (auto& s : argv) a.push_back(s.data());
    a.push_back(nullptr);
    int devnull = open("/dev/null", O_WRONLY);
    dup2(devnull, 1);
    execvp(a[0], a.data());
    _exit(127);
  }
  int st = 0;
  waitpid(pid, &st, 0);
  if (!WIFEXITED(st) || WEXITSTATUS(st) != 0) {
    std::string cmd;
    for (auto& s : argv) cmd += s + " ";
    return Errorf(ErrorCode::kIo, "command failed: {}", cmd);
  }
  return {};
}

Result<int> OpenTap(const std::string& ns, const std::string& name, bool gso) {
  int self = open("/proc/self/ns/net", O_RDONLY | O_CLOEXEC);
  if (self < 0) return ErrnoError("open /proc/self/ns/net");
  if (!ns.empty()) {
    std::string p = "/var/run/netns/" + ns;
    int nfd = open(p.c_str(), O_RDONLY | O_CLOEXEC);
    if (nfd < 0) {
      close(self);
      return ErrnoError("open " + p);
    }
    int rc = setns(nfd, CLONE_NEWNET);
    close(nfd);
    if (rc < 0) {
      close(self);
      return ErrnoError("setns " + ns);
    }
  }
  int fd = open("/dev/net/tun", O_RDWR | O_CLOEXEC | O_NONBLOCK);
  std::string err;
  if (fd < 0) {
    err = fmt::format("open /dev/net/tun: {}", strerror(errno));
  } else {
    ifreq ifr{};
    ifr.ifr_flags = IFF_TAP | IFF_NO_PI | (gso ? IFF_VNET_HDR : 0);
    strncpy(ifr.ifr_name, name.c_str(), IFNAMSIZ - 1);
    if (ioctl(fd, TUNSETIFF, &ifr) < 0) {
      err = fmt::format("TUNSETIFF {}: {}", name, strerror(errno));
    } else if (gso) {
      int hs = sizeof(VnetHdr);
      unsigned off = TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6;
      if (ioctl(fd, TUNSETVNETHDRSZ, &hs) < 0 || ioctl(fd, TUNSETOFFLOAD, off) < 0)
        err = fmt::format("TAP offloads: {}", strerror(errno));
    }
  }
  if (!ns.empty()) setns(self, CLONE_NEWNET);
  close(self);
  if (!err.empty()) {
    if (fd >= 0) close(fd);
    return Errorf(ErrorCode::kIo, "{}", err);
  }
  return fd;
}

// Frame buffers are allocated once at full size and recycled; `len` is the frame length
// (resizing a vector up would zero up to 64 KiB per frame).
constexpr size_t kFrameBuf = 65536 + 256;
struct Packet {
  std::vector<uint8_t> data;  // kFrameBuf bytes
  size_t len;
  int64_t due_ns;
};

}  // namespace

Status ValidateLink(const LinkParams& p) {
  if (!(p.delay_ms >= 0 && p.delay_ms <= 10000)) return Errorf(ErrorCode::kInvalidArgument, "delay must be 0..10000 ms");
  if (!(p.jitter_ms >= 0 && p.jitter_ms <= p.delay_ms))
    return Errorf(ErrorCode::kInvalidArgument, "jitter must be 0..delay");
  if (!(p.rate_mbit >= 0 && p.rate_mbit <= 100000)) return Errorf(ErrorCode::kInvalidArgument, "bad rate");
  if (!(p.loss >= 0 && p.loss < 1)) return Errorf(ErrorCode::kInvalidArgument, "loss must be in [0,1)");
  return {};
}

Result<std::unique_ptr<Emulator>> Emulator::Create(const Options& o) {
  FERRY_RETURN_IF_ERROR(ValidateLink(o.link), "link");
  for (auto* s : {&o.dev_a, &o.dev_b})
    if (!SafeToken(*s) || s->size() >= IFNAMSIZ) return Errorf(ErrorCode::kInvalidArgument, "bad device name '{}'", *s);
  for (auto* s : {&o.ns_a, &o.ns_b, &o.addr_a, &o.addr_b})
    if (!s->empty() && !SafeToken(*s)) return Errorf(ErrorCode::kInvalidArgument, "bad name/address '{}'", *s);
  if (o.ns_a == o.ns_b && o.dev_a == o.dev_b)
    return Errorf(ErrorCode::kInvalidArgument, "both TAPs would be the same device");
  std::unique_ptr<Emulator> e(new Emulator(o));
  for (int i = 0; i < 2; i++) {
    auto fd = OpenTap(i ? o.ns_b : o.ns_a, i ? o.dev_b : o.dev_a, o.gso);
    if (!fd) return std::unexpected(fd.error());
    e->tap_[i] = *fd;
  }
  for (int i = 0; i < 2; i++) {
    const std::string& ns = i ? o.ns_b : o.ns_a;
    const std::string& dev = i ? o.dev_b : o.dev_a;
    const std::string& addr = i ? o.addr_b : o.addr_a;
    std::vector<std::string> ip = {"ip"};
    if (!ns.empty()) ip.insert(ip.end(), {"-n", ns});
    auto cmd = [&](std::vector<std::string> rest) {
      auto v = ip;
      v.insert(v.end(), rest.begin(), rest.end());
      return RunCmd(v);
    };
    FERRY_RETURN_IF_ERROR(cmd({"link", "set", "dev", dev, "mtu", std::to_string(o.mtu), "up"}), "configure TAP");
    if (!ns.empty()) FERRY_RETURN_IF_ERROR(cmd({"link", "set", "dev", "lo", "up"}), "configure lo");
    if (!addr.empty()) FERRY_RETURN_IF_ERROR(cmd({"addr", "add", addr, "dev", dev}), "configure address");
  }
  e->stop_fd_ = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
  return e;
}

Emulator::~Emulator() {
  for (int fd : tap_)
    if (fd >= 0) close(fd);
  if (stop_fd_ >= 0) close(stop_fd_);
}

void Emulator::Stop() {
  uint64_t one = 1;
  [[maybe_unused]] auto r = write(stop_fd_, &one, sizeof one);
}

std::string Emulator::StatsJson() const {
  return fmt::format(
      R"({{"a_to_b":{{"frames":{},"bytes":{},"dropped_loss":{},"dropped_queue":{},"split_frames":{}}},)"
      R"("b_to_a":{{"frames":{},"bytes":{},"dropped_loss":{},"dropped_queue":{},"split_frames":{}}}}})",
      stats_.frames[0].load(), stats_.bytes[0].load(), stats_.dropped_loss[0].load(), stats_.dropped_queue[0].load(),
      stats_.split_frames[0].load(), stats_.frames[1].load(), stats_.bytes[1].load(), stats_.dropped_loss[1].load(),
      stats_.dropped_queue[1].load(), stats_.split_frames[1].load());
}

Status Emulator::Run() {
  const LinkParams& L = opts_.link;
  const size_t vh = opts_.gso ? sizeof(VnetHdr) : 0;
  const double ns_per_byte = L.rate_mbit > 0 ? 8000.0 / L.rate_mbit : 0;
  size_t qlimit = L.queue_bytes;
  if (qlimit == 0)
    qlimit = std::max<size_t>(1u << 20, static_cast<size_t>(2 * L.rate_mbit * 1e6 / 8 * L.delay_ms / 1000));
  const int64_t delay_ns = static_cast<int64_t>(L.delay_ms * 1e6);
  const int64_t jitter_ns = static_cast<int64_t>(L.jitter_ms * 1e6);
  std::mt19937_64 rng(opts_.seed);
  std::uniform_real_distribution<double> uni(0, 1);
  std::deque<Packet> q[2];
  int64_t tx_free[2] = {0, 0}, last_due[2] = {0, 0};
  std::vector<std::vector<uint8_t>> pool;
  auto take = [&] {
    if (pool.empty()) return std::vector<uint8_t>(kFrameBuf);
    auto b = std::move(pool.back());
    pool.pop_back();
    return b;
  };
  std::vector<uint8_t> lost_mask;
  // Serialisation at the link rate behind a bounded tail-drop queue, then the delay.
  auto enqueue = [&](int d, std::vector<uint8_t> buf, size_t len, size_t wire, size_t segs, int64_t now) {
    int64_t start = std::max(now, tx_free[d]);
    if (ns_per_byte > 0 && (start - now) / ns_per_byte > static_cast<double>(qlimit)) {
      stats_.dropped_queue[d] += segs;
      pool.push_back(std::move(buf));
      return;
    }
    int64_t done = start + static_cast<int64_t>(wire * ns_per_byte);
    tx_free[d] = done;
    int64_t jit = jitter_ns ? static_cast<int64_t>((uni(rng) * 2 - 1) * jitter_ns) : 0;
    int64_t due = std::max(done + delay_ns + jit, last_due[d]);
    last_due[d] = due;
    stats_.frames[d] += segs;
    stats_.bytes[d] += wire;
    q[d].push_back(Packet{std::move(buf), len, due});
  };
  for (;;) {
    int64_t now = static_cast<int64_t>(NowNs());
    // Deliver due frames.
    for (int d = 0; d < 2; d++) {
      while (!q[d].empty() && q[d].front().due_ns <= now) {
        auto& p = q[d].front();
        ssize_t w = write(tap_[1 - d], p.data.data(), p.len);
        if (w < 0) stats_.dropped_queue[d]++;
        if (pool.size() < 4096) pool.push_back(std::move(p.data));
        q[d].pop_front();
      }
    }
    int64_t next = INT64_MAX;
    for (int d = 0; d < 2; d++)
      if (!q[d].empty()) next = std::min(next, q[d].front().due_ns);
    pollfd pf[3] = {{tap_[0], POLLIN, 0}, {tap_[1], POLLIN, 0}, {stop_fd_, POLLIN, 0}};
    timespec ts{}, *tsp = nullptr;
    if (next != INT64_MAX) {
      int64_t wait = std::max<int64_t>(0, next - now);
      ts.tv_sec = wait / 1000000000;
      ts.tv_nsec = wait % 1000000000;
      tsp = &ts;
    }
    if (ppoll(pf, 3, tsp, nullptr) < 0 && errno != EINTR) return ErrnoError("ppoll");
    if (pf[2].revents & POLLIN) return {};
    now = static_cast<int64_t>(NowNs());
    for (int d = 0; d < 2; d++) {
      if (!(pf[d].revents & POLLIN)) continue;
      for (int burst = 0; burst < 64; burst++) {
        auto buf = take();
        ssize_t n = read(tap_[d], buf.data(), buf.size());
        if (n <= 0) {
          pool.push_back(std::move(buf));
          break;
        }
        // Frames on the wire this super-frame stands for (TSO/GSO).
        TsoInfo tso;
        size_t segs = 1, wire = n - vh;
        if (vh && static_cast<size_t>(n) > vh && ParseTso(buf.data(), n, &tso)) {
          segs = tso.segs;
          wire = tso.payload + segs * tso.hdrs;
        }
        size_t lost = 0;
        if (L.loss > 0) {
          // Loss is drawn per wire packet, also inside a super-frame.
          lost_mask.assign(segs, 0);
          for (size_t k = 0; k < segs; k++)
            if (uni(rng) < L.loss) {
              lost_mask[k] = 1;
              lost++;
            }
        }
        if (lost == 0) {
          enqueue(d, std::move(buf), static_cast<size_t>(n), wire, segs, now);
        } else if (lost == segs) {
          stats_.dropped_loss[d] += segs;
          pool.push_back(std::move(buf));
        } else {
          // Some packets of a super-frame are lost: split it into wire-sized
          // frames in software and drop exactly those.
          stats_.dropped_loss[d] += lost;
          stats_.split_frames[d]++;
          for (size_t k = 0; k < segs; k++) {
            if (lost_mask[k]) continue;
            auto seg = take();
            size_t len = MakeSegment(buf.data(), tso, k, seg.data());
            enqueue(d, std::move(seg), len, len - vh, 1, now);
          }
          pool.push_back(std::move(buf));
        }
      }
    }
  }
}

}  // namespace ferry::wanem
