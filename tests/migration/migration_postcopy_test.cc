// Post-copy between real ferry-vmm processes: the guest runs on the destination before its pages
// arrived while it dirties memory, answers UDP echo (virtio-net RX writes into guest RAM) and
// re-reads its disk (virtio-blk reads by DMA into fresh page cache pages); every page verifies.
// Mode auto switches by itself when the guest outruns the link. A source killed during
// post-copy: the destination stops with a clear error and never runs the guest on.
#include <sys/stat.h>
#include <unistd.h>

#include <chrono>
#include <memory>
#include <string>
#include <thread>

#include <gtest/gtest.h>

#include "migration_util.h"

namespace ferry::test {
namespace {
using namespace std::chrono_literals;
using nlohmann::json;

std::vector<std::string> GuestArgs(const std::string& run, const std::string& extra = "", const std::string& mem = "256M") {
  return {"--kernel", GuestImage(), "--initrd", GuestInitrd(), "--mem", mem, "--cmdline", "console=ttyS0 " + extra + " ferry.run=" + run};
}

class PostcopyTest : public ::testing::Test {
 protected:
  void SetUp() override {
    struct stat st;
    ASSERT_EQ(stat(GuestImage().c_str(), &st), 0) << "guest image missing: run scripts/setup";
    dir_ = MakeTempDir("migpc");
  }
  void TearDown() override { RemoveTree(dir_); }
  std::unique_ptr<VmProcess> Incoming(int port, std::vector<std::string> extra = {}, const std::string& netns = "") {
    std::vector<std::string> args = {"--incoming", "tcp:127.0.0.1:" + std::to_string(port)};
    args.insert(args.end(), extra.begin(), extra.end());
    auto vm = std::make_unique<VmProcess>(args, dir_, netns);
    EXPECT_TRUE(vm->Start());
    const std::string pre = netns.empty() ? "" : "ip netns exec " + netns + " ";
    for (int i = 0; i < 500; ++i) {
      if (Sh(pre + "ss -Hltn 'sport = :" + std::to_string(port) + "' | grep -q LISTEN") == 0) break;
      std::this_thread::sleep_for(10ms);
    }
    return vm;
  }
  // A disk with blkcheck data (seed 77, 4 MiB), written by a guest.
  std::string MakeDisk() {
    const std::string disk = dir_ + "/disk.img";
    EXPECT_EQ(Sh("truncate -s 8M " + disk), 0);
    auto args = GuestArgs("blkcheck:mode=write,seed=77,mib=4");
    args.insert(args.end(), {"--disk", disk});
    VmProcess w(args, dir_);
    EXPECT_TRUE(w.Start());
    EXPECT_TRUE(w.WaitConsole("blkcheck written", 30s)) << w.Console() << w.Stderr();
    w.Kill();
    (void)w.Wait(10s);
    return disk;
  }
  std::string dir_;
};

TEST_F(PostcopyTest, GuestRunsBeforeItsPagesWhileDirtyingEchoingAndReadingItsDisk) {
  if (geteuid() != 0) GTEST_SKIP() << "needs root (network namespace, TAP devices, userfaultfd)";
  const std::string disk = MakeDisk();
  NetNs ns("ferrypc" + std::to_string(getpid() % 100000));
  ASSERT_TRUE(ns.ok());
  ASSERT_TRUE(ns.AddTap("fpctapa"));
  ASSERT_TRUE(ns.AddTap("fpctapb"));
  auto args = GuestArgs("memdirty:mib=64,rate=40000,bytes=4096,verify=0;echo:port=7;blkcheck:mode=verify,seed=77,mib=4,repeat=1000000,delay_ms=5",
                        "ferry.ip=10.77.0.2/24");
  args.insert(args.end(), {"--net", "tap=fpctapa,mac=52:54:00:12:34:58", "--disk", disk});
  VmProcess src(args, dir_, ns.name());
  ASSERT_TRUE(src.Start());
  ASSERT_TRUE(src.WaitConsole("memdirty started", 20s)) << src.Console() << src.Stderr();
  ASSERT_TRUE(src.WaitConsole("blkcheck ok", 20s)) << src.Console();
  ASSERT_GE(ns.UdpEcho("10.77.0.2", 7, 20, 2000), 18);
  const int port = FreePort();
  auto dst = Incoming(port, {"--net", "tap=fpctapb", "--disk", disk}, ns.name());
  PacketCapture rarp(ns.name(), 0x8035);
  ASSERT_TRUE(rarp.ok());
  UdpProbe probe(ns.name(), "10.77.0.2:7", dir_);
  std::this_thread::sleep_for(500ms);
  auto r = Ferry("migrate --api-socket " + src.socket() + " --to tcp:127.0.0.1:" + std::to_string(port) +
                     " --mode postcopy --json --no-progress",
                 ns.name());
  ASSERT_EQ(r.rc, 0) << r.out << src.Stderr() << dst->Stderr();
  ASSERT_TRUE(r.json.is_object()) << r.out;
  EXPECT_EQ(r.json["status"], "completed");
  EXPECT_EQ(r.json["mode"], "postcopy") << r.out;
  EXPECT_GT(r.json["postcopy_pages"].get<uint64_t>(), 1000u) << "the guest should start with many pages missing: " << r.out;
  EXPECT_GT(r.json["postcopy_ms"].get<double>(), 0.0);
  EXPECT_TRUE(r.json["fault_latency_ms"].contains("p99")) << r.out;
  EXPECT_EQ(src.Wait(10s), 0) << src.Stderr();
  const size_t after = dst->ConsoleSize();
  // Disk reads by DMA keep verifying on the destination, memory verifies, the echo answers.
  ASSERT_TRUE(dst->WaitConsole("blkcheck ok", 10s, after)) << dst->Console() << dst->Stderr();
  ASSERT_TRUE(MemverifyOk(*dst, 64 * 256)) << dst->Console() << dst->Stderr();
  EXPECT_EQ(dst->Console().find("FAIL"), std::string::npos) << dst->Console();
  EXPECT_GE(ns.UdpEcho("10.77.0.2", 7, 20, 2000), 18) << dst->Stderr();
  auto p = probe.Stop();
  ASSERT_TRUE(p.is_object());
  std::printf("post-copy: %s\nprobe: %s\n", r.json.dump().c_str(), p.dump().c_str());
  ExpectOneRarpFromTap(rarp, "fpctapb", {0x52, 0x54, 0x00, 0x12, 0x34, 0x58});
  // The echo answers from the destination after its resume, while pages still arrive: its silence
  // may exceed the switch's pause by the first demand faults (the echo's code and socket pages).
  const auto resumed = GuestResumedMono(dst->Stderr());
  ASSERT_TRUE(resumed) << dst->Stderr();
  ExpectServiceContinuesAfterResume(p, *resumed, r.json["downtime_ms"].get<double>(), 1000);
  EXPECT_EQ(dst->Api("PUT", "/vm/shutdown", "{}"), 200);
  EXPECT_EQ(dst->Wait(10s), 0);
}

TEST_F(PostcopyTest, AutoSwitchesWhenTheGuestOutrunsTheLinkAndMemoryVerifies) {
  if (geteuid() != 0) GTEST_SKIP() << "needs root (userfaultfd)";
  VmProcess src(GuestArgs("memdirty:mib=128,rate=max,bytes=4096,verify=0", "", "512M"), dir_);
  ASSERT_TRUE(src.Start());
  ASSERT_TRUE(src.WaitConsole("memdirty started", 30s)) << src.Console() << src.Stderr();
  std::this_thread::sleep_for(1s);
  const int port = FreePort();
  auto dst = Incoming(port);
  // 16 MiB/s: ~4,000 incompressible pages/s against a guest that dirties far more.
  auto r = Ferry("migrate --api-socket " + src.socket() + " --to tcp:127.0.0.1:" + std::to_string(port) +
                 " --max-bandwidth 16M --compress none --json --no-progress");
  ASSERT_EQ(r.rc, 0) << r.out << src.Stderr() << dst->Stderr();
  ASSERT_TRUE(r.json.is_object()) << r.out;
  EXPECT_EQ(r.json["status"], "completed") << r.out;
  EXPECT_EQ(r.json["mode"], "postcopy") << r.out;
  std::printf("auto: total %.0f ms, downtime %.1f ms, post-copy %.0f ms, %llu pages missing, %llu demand faults (p50 %.2f ms, p99 %.2f ms)\n",
              r.json["total_ms"].get<double>(), r.json["downtime_ms"].get<double>(), r.json["postcopy_ms"].get<double>(),
              static_cast<unsigned long long>(r.json["postcopy_pages"].get<uint64_t>()),
              static_cast<unsigned long long>(r.json["demand_faults"].get<uint64_t>()), r.json["fault_latency_ms"]["p50"].get<double>(),
              r.json["fault_latency_ms"]["p99"].get<double>());
  EXPECT_EQ(src.Wait(10s), 0) << src.Stderr();
  ASSERT_TRUE(MemverifyOk(*dst, 128 * 256)) << dst->Console() << dst->Stderr();
  EXPECT_EQ(dst->Api("PUT", "/vm/shutdown", "{}"), 200);
  EXPECT_EQ(dst->Wait(10s), 0);
}

TEST_F(PostcopyTest, SourceKilledDuringPostcopyStopsTheDestinationWithoutRunningTheGuest) {
  if (geteuid() != 0) GTEST_SKIP() << "needs root (userfaultfd)";
  VmProcess src(GuestArgs("memdirty:mib=64,rate=20000,bytes=4096,verify=0"), dir_);
  ASSERT_TRUE(src.Start());
  ASSERT_TRUE(src.WaitConsole("memdirty started", 20s)) << src.Console() << src.Stderr();
  const int port = FreePort();
  auto dst = Incoming(port, {"--recover-timeout-ms", "3000"});  // how long it waits for a source to come back
  // A slow push (4 MiB/s) keeps post-copy running for seconds.
  auto put = src.Api("PUT", "/vm/migrate",
                     R"({"to": "tcp:127.0.0.1:)" + std::to_string(port) + R"(", "mode": "postcopy", "max_bandwidth": 4194304, "compress": "none"})");
  ASSERT_EQ(put, 202) << src.last_api_error();
  ASSERT_EQ(WaitMigrationStatus(src, "postcopy-active", 60s), "postcopy-active") << src.Get("/vm/migration").dump() << src.Stderr();
  const auto under_way = WaitPostcopyUnderWay(*dst, 30s);
  ExpectPostcopyUnderWay(under_way);
  src.Kill();
  (void)src.Wait(10s);
  const int rc = dst->Wait(30s);
  EXPECT_EQ(rc, 3) << dst->Stderr();
  EXPECT_NE(dst->Stderr().find("failed:"), std::string::npos) << dst->Stderr();
  EXPECT_NE(dst->Stderr().find("the guest is stopped"), std::string::npos) << dst->Stderr();
  EXPECT_NE(dst->Stderr().find("did not reconnect within 3000 ms"), std::string::npos) << dst->Stderr();
}

}  // namespace
}  // namespace ferry::test

namespace ferry::test {
namespace {

// Both VMMs in a namespace of their own, so the nftables rule that cuts the path drops nothing else.
TEST_F(PostcopyTest, RecoversFromADroppedPathAndAKilledConnection) {
  if (geteuid() != 0) GTEST_SKIP() << "needs root (network namespace, nftables, userfaultfd)";
  if (Sh("command -v nft >/dev/null") != 0) GTEST_SKIP() << "nft missing: run scripts/setup";
  NetNs ns("ferrypr" + std::to_string(getpid() % 100000));
  ASSERT_TRUE(ns.ok());
  VmProcess src(GuestArgs("memdirty:mib=64,rate=40000,bytes=4096,verify=0"), dir_, ns.name());
  ASSERT_TRUE(src.Start());
  ASSERT_TRUE(src.WaitConsole("memdirty started", 20s)) << src.Console() << src.Stderr();
  const int port = FreePort();
  auto dst = Incoming(port, {"--recover-timeout-ms", "60000"}, ns.name());
  const std::string nft = "ip netns exec " + ns.name() + " nft ";
  ASSERT_EQ(Sh(nft + "add table inet fcut"), 0);
  ASSERT_EQ(Sh(nft + "'add chain inet fcut out { type filter hook output priority 0; }'"), 0);
  // A slow push (8 MiB/s) keeps post-copy running for seconds.
  ASSERT_EQ(src.Api("PUT", "/vm/migrate",
                    R"({"to": "tcp:127.0.0.1:)" + std::to_string(port) +
                        R"(", "mode": "postcopy", "max_bandwidth": 8388608, "compress": "none"})"),
            202)
      << src.last_api_error();
  ASSERT_EQ(WaitMigrationStatus(src, "postcopy-active", 60s), "postcopy-active") << src.Get("/vm/migration").dump() << src.Stderr();
  // 1. The path drops everything (both directions): detected by the unacknowledged pings.
  ASSERT_EQ(Sh(nft + "add rule inet fcut out tcp dport " + std::to_string(port) + " drop"), 0);
  ASSERT_EQ(Sh(nft + "add rule inet fcut out tcp sport " + std::to_string(port) + " drop"), 0);
  ASSERT_EQ(WaitMigrationStatus(src, "postcopy-paused", 20s), "postcopy-paused") << src.Get("/vm/migration").dump();
  std::this_thread::sleep_for(2s);  // reconnect attempts fail meanwhile (cuts during recovery)
  ASSERT_EQ(Sh(nft + "flush chain inet fcut out"), 0);
  ASSERT_EQ(WaitMigrationStatus(src, "postcopy-active", 20s), "postcopy-active") << src.Get("/vm/migration").dump() << src.Stderr();
  // 2. A killed connection (RST) right after the recovery.
  ASSERT_EQ(Sh("ip netns exec " + ns.name() + " ss -K dst 127.0.0.1 dport = " + std::to_string(port) + " >/dev/null"), 0);
  const std::string st = WaitMigrationStatus(src, "completed", 120s);
  auto stats = src.Get("/vm/migration");
  ASSERT_EQ(st, "completed") << stats.dump() << src.Stderr() << dst->Stderr();
  std::printf("recovery: %s\n", stats.dump().c_str());
  EXPECT_EQ(stats["mode"], "postcopy");
  EXPECT_GE(stats["recoveries"].get<int>(), 2) << stats.dump();
  ASSERT_TRUE(MemverifyOk(*dst, 64 * 256)) << dst->Console() << dst->Stderr();
  EXPECT_EQ(dst->Console().find("FAIL"), std::string::npos) << dst->Console();
  (void)Sh(nft + "delete table inet fcut");
  EXPECT_EQ(src.Api("PUT", "/vm/shutdown", "{}"), 200);
  EXPECT_EQ(dst->Api("PUT", "/vm/shutdown", "{}"), 200);
}

}  // namespace
}  // namespace ferry::test
