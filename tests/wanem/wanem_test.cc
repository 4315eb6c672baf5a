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
#include <filesystem>
#include <string>
#include <thread>

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
    pid_ = fork();
    if (pid_ == 0) {
      int devnull = open("/dev/null", O_WRONLY);
      dup2(devnull, 1);
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
    if (pid_ > 0) {
      kill(pid_, SIGTERM);
      waitpid(pid_, nullptr, 0);
    }
    Sh("ip netns del " + a_);
    Sh("ip netns del " + b_);
  }
  bool ok() const { return ok_; }
  const std::string& a() const { return a_; }
  const std::string& b() const { return b_; }

 private:
  std::string suffix_, a_, b_;
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
