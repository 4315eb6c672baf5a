// ferry-wanem accuracy: ping RTT and TCP throughput through the emulated link,
// between two network namespaces this test creates and removes.
#include <arpa/inet.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <sched.h>
#include <signal.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <array>
#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include <gtest/gtest.h>

#include "wanem/wanem.h"

namespace {
using namespace std::chrono_literals;

std::string Sh(const std::string& cmd) {
  std::string out;
  FILE* p = popen((cmd + " 2>&1").c_str(), "r");
  if (!p) return out;
  std::array<char, 512> buf;
  while (fgets(buf.data(), buf.size(), p)) out += buf.data();
  pclose(p);
  return out;
}

class Link {
 public:
  Link(double delay_ms, double rate_mbit, double loss = 0) {
    suffix_ = std::to_string(getpid());
    a_ = "fwa" + suffix_;
    b_ = "fwb" + suffix_;
    Sh("ip netns add " + a_);
    Sh("ip netns add " + b_);
    std::string bin = std::string(getenv("FERRY_BUILD_DIR") ? getenv("FERRY_BUILD_DIR") : ".") + "/bin/ferry-wanem";
    stats_path_ = "/tmp/ferry-wanem-stats-" + suffix_ + ".json";
    pid_ = fork();
    if (pid_ == 0) {
      int out = open(stats_path_.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0600);
      dup2(out, 1);
      std::string d = std::to_string(delay_ms), r = std::to_string(rate_mbit), l = std::to_string(loss);
      execl(bin.c_str(), bin.c_str(), "--ns-a", a_.c_str(), "--ns-b", b_.c_str(), "--addr-a", "10.78.0.1/24",
            "--addr-b", "10.78.0.2/24", "--delay-ms", d.c_str(), "--rate-mbit", r.c_str(), "--loss", l.c_str(),
            nullptr);
      _exit(127);
    }
    // Ready when the address answers.
    for (int i = 0; i < 50; i++) {
      if (Sh("ip netns exec " + a_ + " ping -c 1 -W 1 10.78.0.2").find(" 0% packet loss") != std::string::npos) {
        ok_ = true;
        break;
      }
      std::this_thread::sleep_for(100ms);
    }
  }
  ~Link() {
    Stop();
    Sh("ip netns del " + a_);
    Sh("ip netns del " + b_);
    unlink(stats_path_.c_str());
  }
  // Stops the emulator; returns the statistics JSON it prints on SIGTERM.
  std::string Stop() {
    if (pid_ > 0) {
      kill(pid_, SIGTERM);
      waitpid(pid_, nullptr, 0);
      pid_ = -1;
    }
    return Sh("cat " + stats_path_);
  }
  bool ok() const { return ok_; }
  const std::string& a() const { return a_; }
  const std::string& b() const { return b_; }

 private:
  std::string suffix_, a_, b_, stats_path_;
  pid_t pid_ = -1;
  bool ok_ = false;
};

bool EnterNs(const std::string& ns) {
  int fd = open(("/var/run/netns/" + ns).c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) return false;
  int rc = setns(fd, CLONE_NEWNET);
  close(fd);
  return rc == 0;
}

double PingAvgMs(const Link& l, int count) {
  std::string out = Sh("ip netns exec " + l.a() + " ping -q -c " + std::to_string(count) + " -i 0.05 10.78.0.2");
  auto pos = out.find("rtt min/avg/max/mdev = ");
  if (pos == std::string::npos) return -1;
  double mn, avg;
  if (sscanf(out.c_str() + pos, "rtt min/avg/max/mdev = %lf/%lf", &mn, &avg) != 2) return -1;
  return avg;
}

// Goodput in Mbit/s measured over the last 2/3 of a `secs` long bulk TCP transfer.
double MeasureThroughput(const Link& l, double secs) {
  std::atomic<int> listen_port{0};
  std::atomic<double> result{-1};
  std::thread rx([&] {
    if (!EnterNs(l.b())) return;
    int s = socket(AF_INET, SOCK_STREAM, 0);
    sockaddr_in a{};
    a.sin_family = AF_INET;
    bind(s, reinterpret_cast<sockaddr*>(&a), sizeof a);
    listen(s, 1);
    socklen_t len = sizeof a;
    getsockname(s, reinterpret_cast<sockaddr*>(&a), &len);
    listen_port = ntohs(a.sin_port);
    int c = accept(s, nullptr, nullptr);
    close(s);
    std::vector<char> buf(1 << 20);
    auto t0 = std::chrono::steady_clock::now();
    uint64_t n = 0, n_mark = 0;
    std::chrono::steady_clock::time_point t_mark;
    bool marked = false;
    for (;;) {
      ssize_t r = recv(c, buf.data(), buf.size(), 0);
      if (r <= 0) break;
      n += r;
      auto now = std::chrono::steady_clock::now();
      if (!marked && now - t0 > std::chrono::duration<double>(secs / 3)) {
        marked = true;
        t_mark = now;
        n_mark = n;
      }
    }
    auto t1 = std::chrono::steady_clock::now();
    close(c);
    if (marked) result = (n - n_mark) * 8 / std::chrono::duration<double>(t1 - t_mark).count() / 1e6;
  });
  std::thread tx([&] {
    if (!EnterNs(l.a())) return;
    for (int i = 0; i < 100 && listen_port == 0; i++) std::this_thread::sleep_for(10ms);
    int s = socket(AF_INET, SOCK_STREAM, 0);
    sockaddr_in a{};
    a.sin_family = AF_INET;
    a.sin_port = htons(listen_port);
    inet_pton(AF_INET, "10.78.0.2", &a.sin_addr);
    if (connect(s, reinterpret_cast<sockaddr*>(&a), sizeof a) == 0) {
      std::vector<char> buf(1 << 20, 'x');
      auto t0 = std::chrono::steady_clock::now();
      while (std::chrono::steady_clock::now() - t0 < std::chrono::duration<double>(secs))
        if (send(s, buf.data(), buf.size(), MSG_NOSIGNAL) <= 0) break;
    }
    close(s);
  });
  tx.join();
  rx.join();
  return result;
}

class WanemTest : public ::testing::Test {
 protected:
  void SetUp() override {
    if (geteuid() != 0) GTEST_SKIP() << "needs root (network namespaces, TAP devices)";
    if (!std::filesystem::exists("/dev/net/tun")) GTEST_SKIP() << "no /dev/net/tun";
  }
};

TEST_F(WanemTest, PingRttMatchesDelay) {
  for (double one_way : {10.0, 25.0}) {
    Link l(one_way, 100);
    ASSERT_TRUE(l.ok()) << "link did not come up";
    double avg = PingAvgMs(l, 20);
    EXPECT_NEAR(avg, 2 * one_way, 0.1 * 2 * one_way) << "one-way delay " << one_way;
  }
}

TEST_F(WanemTest, ThroughputMatchesRate) {
  for (double rate : {50.0, 300.0}) {
    Link l(5, rate);
    ASSERT_TRUE(l.ok());
    double mbit = MeasureThroughput(l, 4);
    // TCP goodput excludes ~4.5% header overhead, so compare against the rate with 10% tolerance.
    EXPECT_NEAR(mbit, rate, 0.1 * rate) << "rate " << rate;
  }
}

TEST_F(WanemTest, LossDropsPackets) {
  Link l(1, 100, 0.2);
  ASSERT_TRUE(l.ok());
  std::string out = Sh("ip netns exec " + l.a() + " ping -q -c 200 -i 0.01 -W 1 10.78.0.2");
  int tx = 0, rx = 0;
  auto pos = out.find("packets transmitted");
  ASSERT_NE(pos, std::string::npos) << out;
  sscanf(out.c_str() + out.rfind('\n', pos) + 1, "%d packets transmitted, %d received", &tx, &rx);
  // Each echo crosses twice: expected delivery (0.8)^2 = 64%.
  EXPECT_NEAR(static_cast<double>(rx) / tx, 0.64, 0.12);
}

// Reads `"key":N` that follows `section` in the stats JSON.
uint64_t JsonField(const std::string& json, const std::string& section, const std::string& key) {
  auto sec = json.find("\"" + section + "\"");
  if (sec == std::string::npos) return UINT64_MAX;
  auto pos = json.find("\"" + key + "\":", sec);
  if (pos == std::string::npos) return UINT64_MAX;
  return std::stoull(json.substr(pos + key.size() + 3));
}

// Tcp RetransSegs of a namespace (fresh namespace: counters start at 0).
uint64_t TcpRetransSegs(const std::string& ns) {
  std::string snmp = Sh("ip netns exec " + ns + " cat /proc/net/snmp");
  auto hdr = snmp.find("Tcp: ");
  auto val = snmp.find("Tcp: ", hdr + 1);
  if (hdr == std::string::npos || val == std::string::npos) return UINT64_MAX;
  auto line = [&](size_t p) { return snmp.substr(p + 5, snmp.find('\n', p) - p - 5); };
  std::istringstream names(line(hdr)), values(line(val));
  std::string name, v;
  while (names >> name && values >> v)
    if (name == "RetransSegs") return std::stoull(v);
  return UINT64_MAX;
}

// With TSO super-frames on the TAPs, loss must still hit single wire packets:
// the drop ratio counted in packets matches the configured loss, super-frames
// are split to drop one packet, and TCP retransmits about one segment per
// dropped packet (dropping whole 64 KiB super-frames would cost dozens).
TEST_F(WanemTest, LossIsPerWirePacketWithGso) {
  const double p = 0.005;
  Link l(2, 200, p);
  ASSERT_TRUE(l.ok());
  double mbit = MeasureThroughput(l, 3);
  EXPECT_GT(mbit, 1);
  uint64_t retrans = TcpRetransSegs(l.a());
  std::string st = l.Stop();
  uint64_t frames = JsonField(st, "a_to_b", "frames"), dropped = JsonField(st, "a_to_b", "dropped_loss");
  uint64_t split = JsonField(st, "a_to_b", "split_frames");
  ASSERT_NE(frames, UINT64_MAX) << st;
  ASSERT_NE(dropped, UINT64_MAX) << st;
  ASSERT_NE(split, UINT64_MAX) << st;
  ASSERT_NE(retrans, UINT64_MAX);
  ASSERT_GT(frames, 10000u) << st;
  double ratio = static_cast<double>(dropped) / static_cast<double>(frames + dropped);
  EXPECT_NEAR(ratio, p, 0.3 * p) << st;
  EXPECT_GT(split, dropped / 4) << st;  // TCP sends mostly super-frames: most drops split one
  EXPECT_GE(retrans, dropped / 2) << st;
  EXPECT_LE(retrans, 3 * dropped + 50) << "retransmitted segments vs dropped packets; " << st;
}

// Split super-frames: lengths, IDs, sequence numbers, flags, payload and a
// TCP checksum that verifies once the kernel completes it.
namespace tso_test {
uint32_t Sum(const uint8_t* p, size_t n, uint32_t s = 0) {
  for (size_t i = 0; i + 1 < n; i += 2) s += (p[i] << 8) | p[i + 1];
  if (n & 1) s += p[n - 1] << 8;
  return s;
}
uint16_t Fold(uint32_t s) {
  while (s >> 16) s = (s & 0xffff) + (s >> 16);
  return static_cast<uint16_t>(s);
}
uint16_t Be16(const uint8_t* p) { return static_cast<uint16_t>((p[0] << 8) | p[1]); }
uint32_t Be32(const uint8_t* p) { return (uint32_t(p[0]) << 24) | (p[1] << 16) | (p[2] << 8) | p[3]; }

std::vector<uint8_t> MakeTsoFrame(bool v6, size_t payload, uint16_t mss, uint8_t tcp_flags) {
  using ferry::wanem::VnetHdr;
  const size_t iphl = v6 ? 40 : 20, tcphl = 32, l4 = 14 + iphl;
  std::vector<uint8_t> f(sizeof(VnetHdr) + l4 + tcphl + payload);
  VnetHdr h{1, static_cast<uint8_t>(v6 ? 4 : 1), static_cast<uint16_t>(l4 + tcphl), mss, static_cast<uint16_t>(l4), 16};
  memcpy(f.data(), &h, sizeof h);
  uint8_t* e = f.data() + sizeof h;
  memset(e, 0x02, 12);
  e[12] = v6 ? 0x86 : 0x08;
  e[13] = v6 ? 0xdd : 0x00;
  uint8_t* ip = e + 14;
  size_t tcp_len = tcphl + payload;
  if (!v6) {
    ip[0] = 0x45;
    ip[2] = static_cast<uint8_t>((iphl + tcp_len) >> 8);
    ip[3] = static_cast<uint8_t>(iphl + tcp_len);
    ip[4] = 0x12;
    ip[5] = 0x34;
    ip[6] = 0x40;
    ip[8] = 64;
    ip[9] = 6;
    uint8_t addrs[8] = {10, 0, 0, 1, 10, 0, 0, 2};
    memcpy(ip + 12, addrs, 8);
  } else {
    ip[0] = 0x60;
    ip[4] = static_cast<uint8_t>(tcp_len >> 8);
    ip[5] = static_cast<uint8_t>(tcp_len);
    ip[6] = 6;
    ip[7] = 64;
    for (int i = 0; i < 32; i++) ip[8 + i] = static_cast<uint8_t>(i < 16 ? 0xfd : 0xfe);
  }
  uint8_t* tcp = e + l4;
  tcp[0] = 0x9c;
  tcp[2] = 0x13;  // ports
  tcp[4] = 0xff;  // seq 0xff0000f0: wraps inside the frame
  tcp[7] = 0xf0;
  tcp[12] = (tcphl / 4) << 4;
  tcp[13] = tcp_flags;
  tcp[14] = 0x01;  // window
  for (size_t i = 20; i < tcphl; i++) tcp[i] = static_cast<uint8_t>(i);  // options
  for (size_t i = 0; i < payload; i++) tcp[tcphl + i] = static_cast<uint8_t>(i * 7 + 3);
  return f;
}

void CheckSplit(bool v6) {
  using namespace ferry::wanem;
  const size_t payload = 3500, mss = 1000;
  const uint8_t flags = 0x10 | 0x08 | 0x01 | 0x80;  // ACK PSH FIN CWR
  auto f = MakeTsoFrame(v6, payload, mss, flags);
  TsoInfo t;
  ASSERT_TRUE(ParseTso(f.data(), f.size(), &t));
  EXPECT_EQ(t.segs, 4u);
  EXPECT_EQ(t.payload, payload);
  const size_t vh = sizeof(VnetHdr), iphl = v6 ? 40 : 20;
  EXPECT_EQ(t.hdrs, 14 + iphl + 32);
  for (size_t k = 0; k < t.segs; k++) {
    std::vector<uint8_t> out(vh + t.hdrs + mss);
    size_t n = MakeSegment(f.data(), t, k, out.data());
    size_t plen = std::min(mss, payload - k * mss);
    ASSERT_EQ(n, vh + t.hdrs + plen);
    VnetHdr h;
    memcpy(&h, out.data(), vh);
    EXPECT_EQ(h.flags, 1);
    EXPECT_EQ(h.gso_type, 0);
    EXPECT_EQ(h.csum_start, 14 + iphl);
    EXPECT_EQ(h.csum_offset, 16);
    const uint8_t* ip = out.data() + vh + 14;
    const uint8_t* tcp = ip + iphl;
    uint32_t pseudo = 6 + static_cast<uint32_t>(32 + plen);
    if (!v6) {
      EXPECT_EQ(Be16(ip + 2), 20 + 32 + plen);
      EXPECT_EQ(Be16(ip + 4), 0x1234 + k);
      EXPECT_EQ(Fold(Sum(ip, 20)), 0xffff) << "IPv4 header checksum, segment " << k;
      pseudo = Sum(ip + 12, 8, pseudo);
    } else {
      EXPECT_EQ(Be16(ip + 4), 32 + plen);
      pseudo = Sum(ip + 8, 32, pseudo);
    }
    EXPECT_EQ(Be32(tcp + 4), 0xff0000f0u + k * mss) << k;
    bool last = k + 1 == t.segs;
    EXPECT_EQ(tcp[13] & 0x09, last ? 0x09 : 0) << "FIN/PSH only on the last segment";
    EXPECT_EQ(tcp[13] & 0x80, k == 0 ? 0x80 : 0) << "CWR only on the first";
    EXPECT_EQ(tcp[13] & 0x10, 0x10);
    EXPECT_EQ(memcmp(tcp + 20, f.data() + vh + 14 + iphl + 20, 12), 0) << "options copied";
    EXPECT_EQ(memcmp(tcp + 32, f.data() + vh + t.hdrs + k * mss, plen), 0) << "payload of segment " << k;
    // Complete the checksum as the kernel does for NEEDS_CSUM, then verify it.
    std::vector<uint8_t> seg(tcp, tcp + 32 + plen);
    uint16_t c = static_cast<uint16_t>(~Fold(Sum(seg.data(), seg.size())));
    seg[16] = static_cast<uint8_t>(c >> 8);
    seg[17] = static_cast<uint8_t>(c);
    EXPECT_EQ(Fold(Sum(seg.data(), seg.size(), pseudo)), 0xffff) << "TCP checksum, segment " << k;
  }
}
}  // namespace tso_test

TEST(WanemTso, SplitsIpv4SuperFrame) { tso_test::CheckSplit(false); }
TEST(WanemTso, SplitsIpv6SuperFrame) { tso_test::CheckSplit(true); }

TEST(WanemTso, NonTsoFramesAreNotSplit) {
  auto f = tso_test::MakeTsoFrame(false, 500, 1000, 0x10);
  ferry::wanem::VnetHdr h;
  memcpy(&h, f.data(), sizeof h);
  h.gso_type = 0;  // a plain frame
  memcpy(f.data(), &h, sizeof h);
  ferry::wanem::TsoInfo t;
  EXPECT_FALSE(ferry::wanem::ParseTso(f.data(), f.size(), &t));
  h.gso_type = 3;  // UDP: not split
  memcpy(f.data(), &h, sizeof h);
  EXPECT_FALSE(ferry::wanem::ParseTso(f.data(), f.size(), &t));
}

TEST(WanemOptions, BadParametersRejected) {
  ferry::wanem::LinkParams p;
  p.loss = 1.5;
  EXPECT_FALSE(ferry::wanem::ValidateLink(p).has_value());
  p.loss = 0;
  p.delay_ms = 5;
  p.jitter_ms = 6;
  EXPECT_FALSE(ferry::wanem::ValidateLink(p).has_value());
  ferry::wanem::Options o;
  o.dev_a = "bad;name";
  EXPECT_FALSE(ferry::wanem::Emulator::Create(o).has_value());
}

}  // namespace
