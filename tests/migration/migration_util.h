// Helpers for the migration integration tests: ports, the `ferry` CLI, the UDP probe.
#pragma once

#include <arpa/inet.h>
#include <linux/if_packet.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>

#include <array>
#include <chrono>
#include <cstdio>
#include <fstream>
#include <optional>
#include <sstream>
#include <string>
#include <thread>

#include <gtest/gtest.h>
#include <nlohmann/json.hpp>

#include "vm_process.h"

namespace ferry::test {

// A TCP port that was free a moment ago on 127.0.0.1.
inline int FreePort() {
  int fd = socket(AF_INET, SOCK_STREAM, 0);
  sockaddr_in a{};
  a.sin_family = AF_INET;
  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  socklen_t len = sizeof a;
  if (bind(fd, reinterpret_cast<sockaddr*>(&a), sizeof a) != 0 || getsockname(fd, reinterpret_cast<sockaddr*>(&a), &len) != 0) {
    close(fd);
    return 0;
  }
  close(fd);
  return ntohs(a.sin_port);
}

struct CliResult {
  int rc = -1;
  std::string out;
  nlohmann::json json;  // parsed stdout (null if not JSON)
};

// Runs `ferry ARGS` (optionally inside a namespace); stdout JSON is parsed when present.
inline CliResult Ferry(const std::string& args, const std::string& netns = "") {
  CliResult r;
  const std::string out_file = "/tmp/ferry-cli-" + std::to_string(getpid()) + ".out";
  std::string prefix = netns.empty() ? "" : "ip netns exec " + netns + " ";
  std::string err;
  r.rc = Sh(prefix + BuildDir() + "/bin/ferry " + args + " > " + out_file, &err);
  std::ifstream f(out_file);
  std::stringstream ss;
  ss << f.rdbuf();
  r.out = ss.str() + err;
  r.json = nlohmann::json::parse(ss.str(), nullptr, false);
  if (r.json.is_discarded()) r.json = nullptr;
  unlink(out_file.c_str());
  return r;
}

// Polls GET /vm/migration until `status` (or a final status) is reported.
inline std::string WaitMigrationStatus(VmProcess& vm, const std::string& status, std::chrono::milliseconds timeout) {
  auto end = std::chrono::steady_clock::now() + timeout;
  std::string last;
  while (std::chrono::steady_clock::now() < end) {
    auto j = vm.Get("/vm/migration");
    if (j.is_object()) {
      last = j.value("status", "");
      if (last == status || last == "completed" || last == "failed" || last == "cancelled" || last == "failed-unknown")
        return last;
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(5));
  }
  return last;
}

// Polls a post-copy destination's GET /vm/migration until the push is under way: phase
// running-postcopy, pages placed since GO, and pages still missing. A fault injected then hits
// post-copy itself (after a fixed sleep it might come after the last page). Returns the last
// sample; the caller checks it (ExpectPostcopyUnderWay).
inline nlohmann::json WaitPostcopyUnderWay(VmProcess& dst, std::chrono::milliseconds timeout) {
  nlohmann::json j;
  for (auto end = std::chrono::steady_clock::now() + timeout; std::chrono::steady_clock::now() < end;) {
    j = dst.Get("/vm/migration");
    if (j.is_object() && j.value("phase", "") == "running-postcopy") {
      const uint64_t missing = j.value("postcopy_remaining_pages", uint64_t{0}), total = j.value("postcopy_pages", uint64_t{0});
      if (missing > 0 && missing < total) return j;
      if (missing == 0) return j;  // too late: every page is in place
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(5));
  }
  return j;
}
inline void ExpectPostcopyUnderWay(const nlohmann::json& j) {
  ASSERT_TRUE(j.is_object());
  ASSERT_EQ(j.value("phase", ""), "running-postcopy") << j.dump();
  ASSERT_GT(j.value("postcopy_remaining_pages", uint64_t{0}), 0u) << "post-copy already over: " << j.dump();
  ASSERT_LT(j.value("postcopy_remaining_pages", uint64_t{0}), j.value("postcopy_pages", uint64_t{0})) << "the push has not begun: " << j.dump();
}

// Asks the guest to verify every memdirty page now.
inline bool MemverifyOk(VmProcess& vm, int pages, std::chrono::milliseconds timeout = std::chrono::seconds(60)) {
  size_t at = vm.ConsoleSize();
  vm.SendConsole("memverify");
  return vm.WaitConsole("memverify ok pages=" + std::to_string(pages), timeout, at);
}

// ferry-udp-probe running in the background inside a namespace (1 kHz UDP echo client).
class UdpProbe {
 public:
  UdpProbe(const std::string& netns, const std::string& target, const std::string& dir)
      : out_(dir + "/probe" + std::to_string(++counter_) + ".json") {
    std::string pid;
    Sh("ip netns exec " + netns + " " + BuildDir() + "/bin/ferry-udp-probe --to " + target + " > " + out_ +
           " 2>&1 & echo $!",
       &pid);
    pid_ = std::atoi(pid.c_str());
  }
  ~UdpProbe() { (void)Stop(); }
  // Stops the probe and returns its JSON report (null if it failed).
  nlohmann::json Stop() {
    if (pid_ > 0) {
      Sh("kill -INT " + std::to_string(pid_) + "; for i in $(seq 50); do kill -0 " + std::to_string(pid_) +
         " 2>/dev/null || break; sleep 0.1; done");
      pid_ = 0;
    }
    std::ifstream f(out_);
    std::string line;
    std::getline(f, line);
    auto j = nlohmann::json::parse(line, nullptr, false);
    return j.is_discarded() ? nlohmann::json(nullptr) : j;
  }

 private:
  static inline int counter_ = 0;
  std::string out_;
  int pid_ = 0;
};

// The announce a destination makes at GO: exactly one RARP frame (ethertype 0x8035, broadcast,
// from `mac`, opcode 3 "reverse request" with `mac` as sender and target hardware address) that
// entered the namespace through the destination's TAP `tap` - not a copy bridged elsewhere.
inline void ExpectOneRarpFromTap(PacketCapture& capture, const std::string& tap, const std::array<uint8_t, 6>& mac) {
  const auto frames = capture.Take(std::chrono::seconds(2));
  int announces = 0;
  std::string seen;
  for (const CapturedFrame& f : frames) {
    seen += " " + (f.ifname.empty() ? "?" : f.ifname) + "/type " + std::to_string(f.pkttype) + "/" + std::to_string(f.bytes.size()) + " B";
    if (f.ifname != tap || f.pkttype == PACKET_OUTGOING) continue;
    const auto& b = f.bytes;
    ASSERT_GE(b.size(), 42u) << "a RARP frame too short to hold its ARP body";
    auto at = [&](size_t off) { return std::vector<uint8_t>(b.begin() + off, b.begin() + off + 6); };
    const std::vector<uint8_t> m(mac.begin(), mac.end()), bcast(6, 0xff);
    EXPECT_EQ(at(0), bcast);
    EXPECT_EQ(at(6), m) << "RARP from another MAC";
    EXPECT_EQ(b[12] << 8 | b[13], 0x8035);
    EXPECT_EQ(b[20] << 8 | b[21], 3) << "opcode: reverse request";
    EXPECT_EQ(at(22), m);
    EXPECT_EQ(at(32), m);
    ++announces;
  }
  EXPECT_EQ(announces, 1) << frames.size() << " RARP frame(s) captured in the namespace (" << seen << "), " << announces
                          << " entering from " << tap;
}

// CLOCK_MONOTONIC seconds at which a destination's guest started running, from its log line
// "incoming: GO -> guest running X ms (monotonic Y s)"; nullopt if it never logged one.
inline std::optional<double> GuestResumedMono(const std::string& dst_log) {
  const std::string key = "GO -> guest running ";
  const size_t at = dst_log.rfind(key);
  if (at == std::string::npos) return std::nullopt;
  double ms = 0, mono = 0;
  if (std::sscanf(dst_log.c_str() + at + key.size(), "%lf ms (monotonic %lf s)", &ms, &mono) != 2) return std::nullopt;
  return mono;
}

// The echo service across a migration, as a UdpProbe (same CLOCK_MONOTONIC) saw it against the
// destination's resume time: the probe must have been answered after the resume and right up to
// its end (the destination serves on, not just the source before the switchover), and no silence
// may exceed the VMM's measured downtime by more than `margin_ms` (a silence longer than the
// pause is service time lost beyond it: the switch of the bridge, a guest that does not answer).
inline void ExpectServiceContinuesAfterResume(const nlohmann::json& probe, double resumed_mono, double vmm_downtime_ms,
                                              double margin_ms) {
  ASSERT_TRUE(probe.is_object() && probe.contains("last_reply_mono_s") && probe.contains("gaps")) << probe.dump();
  const double last = probe["last_reply_mono_s"].get<double>(), end = probe["end_mono_s"].get<double>();
  EXPECT_GT(last, resumed_mono + 0.5) << "no answer came from the destination for half a second after it resumed at "
                                      << resumed_mono << ": " << probe.dump();
  EXPECT_LT(end - last, 0.1) << "the service fell silent before the probe ended: " << probe.dump();
  // The silence around the switchover ends with the destination's first answer.
  double first_answer_ms = 0;  // 0: answers kept coming across the resume (no silence over the gap list's 50 ms)
  for (const auto& g : probe["gaps"])
    if (g[0].get<double>() <= resumed_mono && resumed_mono <= g[1].get<double>())
      first_answer_ms = (g[1].get<double>() - resumed_mono) * 1000;
  std::printf("service: max gap %.1f ms, VMM downtime %.1f ms, resume -> first answer %.1f ms\n",
              probe["max_gap_ms"].get<double>(), vmm_downtime_ms, first_answer_ms);
  EXPECT_LT(first_answer_ms, margin_ms) << probe.dump();
  EXPECT_LT(probe["max_gap_ms"].get<double>(), vmm_downtime_ms + margin_ms)
      << "service downtime beyond the VMM's downtime (" << vmm_downtime_ms << " ms): " << probe.dump();
}

}  // namespace ferry::test
