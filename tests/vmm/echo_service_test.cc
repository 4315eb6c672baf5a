// Slow: a busy guest (memdirty at 20k pages/s) answers a 1 kHz UDP echo probe for 60 s
// without losing a single probe, no migration involved. Real guest, real TAP on a bridge in a
// network namespace this test creates and removes. Three times during the run the VMM process
// is stopped for 300 ms (SIGSTOP/SIGCONT), as a busy 2-core host does to it: the ~300
// datagrams queued meanwhile then reach the guest in one burst, which overflowed the echo
// socket's default receive buffer (~90 datagrams) before the guest's echo set a large one.
#include <signal.h>
#include <sys/stat.h>
#include <unistd.h>

#include <chrono>
#include <fstream>
#include <map>
#include <regex>
#include <string>
#include <thread>
#include <vector>

#include <gtest/gtest.h>
#include <nlohmann/json.hpp>

#include "vm_process.h"

namespace ferry::test {
namespace {
using namespace std::chrono_literals;

constexpr int kProbeSeconds = 60;
constexpr auto kStall = 300ms;  // each SIGSTOP of the VMM

// The guest's `netstat` console line as key -> value.
std::map<std::string, long long> GuestNetstat(VmProcess& vm) {
  std::map<std::string, long long> kv;
  const size_t at = vm.ConsoleSize();
  vm.SendConsole("netstat");
  if (!vm.WaitConsole("ferry-guest: netstat ", 20s, at)) return kv;
  const std::string c = vm.Console().substr(at);
  const size_t p = c.find("ferry-guest: netstat ");
  std::string line = c.substr(p, c.find('\n', p) - p);
  std::regex re("(\\w+)=(-?\\d+)");
  for (std::sregex_iterator it(line.begin(), line.end(), re), end; it != end; ++it)
    kv[(*it)[1].str()] = std::stoll((*it)[2].str());
  return kv;
}

TEST(EchoService, BusyGuestAnswersEveryProbeFor60sAt1kHzThroughHostStalls) {
  if (geteuid() != 0) GTEST_SKIP() << "needs root for network namespaces and TAP devices";
  struct stat st;
  ASSERT_EQ(stat(GuestImage().c_str(), &st), 0) << "guest image missing: run scripts/setup";
  const std::string dir = MakeTempDir("echosvc");
  {
    NetNs ns("ferryecho" + std::to_string(getpid() % 100000));
    ASSERT_TRUE(ns.ok());
    ASSERT_TRUE(ns.AddTap("fetap0"));
    VmProcess vm({"--kernel", GuestImage(), "--initrd", GuestInitrd(), "--mem", "256M", "--net",
                  "tap=fetap0,mac=52:54:00:12:34:57", "--cmdline",
                  "console=ttyS0 ferry.ip=10.77.0.2/24 ferry.run=memdirty:mib=64,rate=20000,bytes=4096,verify=0;echo:port=7"},
                 dir, ns.name());
    ASSERT_TRUE(vm.Start());
    ASSERT_TRUE(vm.WaitConsole("memdirty started", 30s)) << vm.Console() << vm.Stderr();
    ASSERT_TRUE(vm.WaitConsole("memdirty rate=", 10s)) << vm.Console();
    ASSERT_GE(ns.UdpEcho("10.77.0.2", 7, 20, 2000), 18) << vm.Console();  // up, and ARP resolved
    const auto before = GuestNetstat(vm);

    const std::string out = dir + "/probe.json";
    ASSERT_EQ(Sh("ip netns exec " + ns.name() + " " + BuildDir() + "/bin/ferry-udp-probe --to 10.77.0.2:7 --duration " +
                 std::to_string(kProbeSeconds) + " > " + out + " 2>&1 &"),
              0);
    // When each stall ended, on the probe's clock (CLOCK_MONOTONIC, as steady_clock here).
    std::vector<double> stall_end_mono;
    const auto mono = [] { return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count(); };
    for (int stall = 1; stall <= 3; ++stall) {
      std::this_thread::sleep_for(15s);
      ASSERT_EQ(kill(vm.pid(), SIGSTOP), 0);
      std::this_thread::sleep_for(kStall);
      stall_end_mono.push_back(mono());
      ASSERT_EQ(kill(vm.pid(), SIGCONT), 0);
    }
    nlohmann::json p;
    for (int i = 0; i < 400 && !(p.is_object() && p.contains("lost")); ++i) {  // duration + drain + margin
      std::this_thread::sleep_for(100ms);
      std::ifstream f(out);
      std::string line;
      if (std::getline(f, line)) p = nlohmann::json::parse(line, nullptr, false);
    }
    ASSERT_TRUE(p.is_object() && p.contains("lost")) << "no probe report in " << out;
    const auto after = GuestNetstat(vm);
    const long long rcvbuf_errors = after.count("udp_rcvbuf_errors") && before.count("udp_rcvbuf_errors")
                                        ? after.at("udp_rcvbuf_errors") - before.at("udp_rcvbuf_errors")
                                        : -1;
    std::printf("probe: %s\nguest udp receive-buffer errors during the run: %lld\n", p.dump().c_str(), rcvbuf_errors);
    EXPECT_GE(p["sent"].get<long long>(), kProbeSeconds * 1000 - 100) << p.dump();
    EXPECT_EQ(p["lost"].get<long long>(), 0) << p.dump() << "\nguest udp_rcvbuf_errors: " << rcvbuf_errors;
    EXPECT_EQ(p["duplicates"].get<long long>(), 0) << p.dump();
    EXPECT_EQ(rcvbuf_errors, 0);
    // The stalls really hit the probe: each one is a silence of at least most of the stall that
    // ends after it (otherwise the test proved nothing about bursts after a stall) ...
    ASSERT_TRUE(p.contains("gaps")) << p.dump();
    for (const double end : stall_end_mono) {
      bool seen = false;
      for (const auto& g : p["gaps"])
        seen |= g[0].get<double>() <= end && g[1].get<double>() >= end &&
                g[1].get<double>() - g[0].get<double>() >= 0.8 * std::chrono::duration<double>(kStall).count();
      EXPECT_TRUE(seen) << "no silence around the stall that ended at " << end << ": " << p.dump();
    }
    // ... and no silence lasted much longer than a stall: the backlog is answered at once.
    const double stall_ms = std::chrono::duration<double, std::milli>(kStall).count();
    EXPECT_LT(p["max_gap_ms"].get<double>(), stall_ms + 400.0) << p.dump();
    EXPECT_EQ(vm.Console().find("FAIL"), std::string::npos) << vm.Console();
    EXPECT_EQ(vm.Api("PUT", "/vm/shutdown", "{}"), 200);
    EXPECT_EQ(vm.Wait(10s), 0) << vm.Stderr();
  }
  RemoveTree(dir);
}

}  // namespace
}  // namespace ferry::test
