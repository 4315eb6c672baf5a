// Integration tests: real guests booted in ferry-vmm (kernel + initramfs from scripts/setup).
#include <sys/stat.h>
#include <unistd.h>

#include <chrono>
#include <fstream>

#include <gtest/gtest.h>

#include "common/crc32c.h"
#include "prometheus_text.h"
#include "vm_process.h"

namespace ferry::test {
namespace {
using namespace std::chrono_literals;

std::vector<std::string> BootArgs(const std::string& run, const std::string& extra_cmdline = "") {
  return {"--kernel", GuestImage(), "--initrd", GuestInitrd(), "--mem", "256M", "--cmdline",
          "console=ttyS0 " + extra_cmdline + (run.empty() ? "" : " ferry.run=" + run)};
}

class VmmTest : public ::testing::Test {
 protected:
  void SetUp() override {
    struct stat st;
    ASSERT_EQ(stat(GuestImage().c_str(), &st), 0) << "guest image missing: run scripts/setup (" << GuestImage() << ")";
    dir_ = MakeTempDir("vmmtest");
  }
  void TearDown() override { RemoveTree(dir_); }
  std::string dir_;
};

TEST_F(VmmTest, BootsToReadyWithin10sAndServesApi) {
  VmProcess vm(BootArgs("echo:port=7"), dir_);
  auto t0 = std::chrono::steady_clock::now();
  ASSERT_TRUE(vm.Start());
  ASSERT_TRUE(vm.WaitConsole("ferry-guest: ready", 10s)) << vm.Console() << vm.Stderr();
  double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  std::printf("boot-to-ready: %.2f s\n", secs);
  EXPECT_LT(secs, 10.0);

  auto info = vm.Get("/vm");
  ASSERT_TRUE(info.is_object());
  EXPECT_EQ(info["state"], "running");
  EXPECT_GT(info["counters"]["instructions"].get<uint64_t>(), 1000000u);

  // Malformed requests: 4xx with a message, VM keeps running.
  std::string body;
  EXPECT_EQ(vm.Api("PUT", "/vm/snapshot", "{not json", &body), 400);
  EXPECT_NE(body.find("error"), std::string::npos);
  EXPECT_EQ(vm.Api("PUT", "/vm/snapshot", "{\"path\": 42}"), 400);
  EXPECT_EQ(vm.Api("PUT", "/vm/snapshot", "{\"path\": \"/tmp/x\", \"bogus\": 1}"), 400);
  // A snapshot path whose directory does not exist is the caller's mistake: 400 naming it, not 500.
  EXPECT_EQ(vm.Api("PUT", "/vm/snapshot", "{\"path\": \"/no/such/dir/snap\"}", &body), 400) << body;
  EXPECT_NE(body.find("directory must exist"), std::string::npos) << body;
  EXPECT_EQ(vm.Api("GET", "/vm/nope"), 404);
  // A path that is not UTF-8 (curl --unix-socket S 'http://x/%ff' used to end the VMM: the 404
  // message could not be serialized): 404 with a message, and the VMM keeps serving.
  EXPECT_EQ(vm.Api("GET", "/vm/%ff", "", &body), 404) << vm.Stderr();
  EXPECT_NE(body.find("no such endpoint"), std::string::npos) << body;
  EXPECT_EQ(vm.Api("PUT", std::string("/vm/\xff\xfe\x1b[2J"), "{}"), 404) << vm.Stderr();
  EXPECT_EQ(vm.Get("/vm")["state"], "running");
  EXPECT_EQ(vm.Api("PUT", "/vm/pause", "{}"), 200);
  EXPECT_EQ(vm.Get("/vm")["state"], "paused");
  uint64_t t1 = vm.Get("/vm")["guest_time_ticks"].get<uint64_t>();
  std::this_thread::sleep_for(300ms);
  uint64_t t2 = vm.Get("/vm")["guest_time_ticks"].get<uint64_t>();
  EXPECT_EQ(t1, t2) << "guest time must not advance while paused";
  EXPECT_EQ(vm.Api("PUT", "/vm/resume", "{}"), 200);
  EXPECT_EQ(vm.Get("/vm")["state"], "running");
  auto metrics = std::string();
  EXPECT_EQ(vm.Api("GET", "/metrics", "", &metrics), 200);
  // Present and counting: a booted guest has retired instructions.
  EXPECT_GT(MetricValue(metrics, "ferry_vcpu_instructions_total").value_or(0), 1e6) << metrics;
  // Console input reaches the guest.
  size_t at = vm.ConsoleSize();
  vm.SendConsole("status");
  EXPECT_TRUE(vm.WaitConsole("workload echo", 5s, at));
  EXPECT_EQ(vm.Api("PUT", "/vm/shutdown", "{}"), 200);
  EXPECT_EQ(vm.Wait(10s), 0);
}

TEST_F(VmmTest, BadCommandLinesGetClearErrors) {
  std::string out;
  std::string vmm = BuildDir() + "/bin/ferry-vmm";
  EXPECT_EQ(Sh(vmm + " --kernel " + GuestImage() + " --mem 12Q", &out), 2);
  EXPECT_NE(out.find("unknown suffix"), std::string::npos) << out;
  EXPECT_EQ(Sh(vmm + " --kernel /nonexistent", &out), 2);
  EXPECT_NE(out.find("does not exist"), std::string::npos) << out;
  EXPECT_EQ(Sh(vmm + " --kernel " + GuestImage() + " --net tap=x,mac=zz", &out), 2);
  EXPECT_NE(out.find("invalid MAC"), std::string::npos) << out;
  EXPECT_EQ(Sh(vmm + " --kernel " + GuestInitrd() + " --console none", &out), 1);
  EXPECT_NE(out.find("not a RISC-V Linux Image"), std::string::npos) << out;
  EXPECT_EQ(Sh(vmm + " --kernel " + GuestImage() + " --mem 4M --console none", &out), 1);
  EXPECT_NE(out.find("RAM size"), std::string::npos) << out;
  EXPECT_EQ(Sh(vmm + " --kernel " + GuestImage() + " --console bogus", &out), 1);
  EXPECT_NE(out.find("--console"), std::string::npos) << out;
  // --max-mem belongs to --incoming, and takes a size.
  EXPECT_EQ(Sh(vmm + " --kernel " + GuestImage() + " --max-mem 1G", &out), 2);
  EXPECT_NE(out.find("use it with --incoming"), std::string::npos) << out;
  EXPECT_EQ(Sh(vmm + " --incoming tcp:127.0.0.1:0 --max-mem 12Q", &out), 2);
  EXPECT_NE(out.find("--max-mem"), std::string::npos) << out;
  // A bad API socket path is refused before anything boots.
  std::string file = dir_ + "/plain-file";
  Sh("touch " + file);
  EXPECT_EQ(Sh(vmm + " --kernel " + GuestImage() + " --console none --api-socket " + file, &out), 2);
  EXPECT_NE(out.find("is not a socket"), std::string::npos) << out;
  EXPECT_EQ(Sh(vmm + " --kernel " + GuestImage() + " --console none --api-socket /" + std::string(200, 'x'), &out), 2);
  EXPECT_NE(out.find("too long"), std::string::npos) << out;
}

// Snapshot -> restore in a new process, 20 times, with memdirty running; then memverify
// on demand through the console of the last process.
TEST_F(VmmTest, SnapshotRestoreCyclesKeepWorkloadAndMemory) {
  const std::string snap = dir_ + "/vm.snap";
  auto vm = std::make_unique<VmProcess>(BootArgs("memdirty:mib=16,rate=3000,bytes=4096,verify=0;echo:port=7"), dir_);
  ASSERT_TRUE(vm->Start());
  ASSERT_TRUE(vm->WaitConsole("ferry-guest: ready", 10s)) << vm->Console();
  ASSERT_TRUE(vm->WaitConsole("memdirty started", 10s));
  std::this_thread::sleep_for(500ms);
  for (int cycle = 0; cycle < 20; ++cycle) {
    std::string body;
    ASSERT_EQ(vm->Api("PUT", "/vm/snapshot", "{\"path\":\"" + snap + "\"}", &body), 200) << body;
    ASSERT_EQ(vm->Api("PUT", "/vm/shutdown", "{}"), 200);
    ASSERT_EQ(vm->Wait(10s), 0);
    vm = std::make_unique<VmProcess>(std::vector<std::string>{"--restore", snap}, dir_);
    ASSERT_TRUE(vm->Start());
    // As soon as the API socket answers, the restored VM is running (no "not started" window).
    auto info = vm->Get("/vm");
    ASSERT_TRUE(info.is_object()) << "cycle " << cycle << ": " << vm->last_api_error() << "\n" << vm->Stderr();
    ASSERT_EQ(info["state"], "running");
    // The restored guest keeps running: its clock ticks.
    std::this_thread::sleep_for(300ms);
    auto later = vm->Get("/vm");
    ASSERT_TRUE(later.is_object()) << "cycle " << cycle << ": " << vm->last_api_error() << "\n" << vm->Stderr();
    ASSERT_EQ(later["state"], "running");
    EXPECT_GT(later["guest_time_ticks"].get<uint64_t>(), info["guest_time_ticks"].get<uint64_t>()) << "cycle " << cycle;
  }
  size_t at = vm->ConsoleSize();
  vm->SendConsole("memverify");
  ASSERT_TRUE(vm->WaitConsole("memverify ok pages=4096", 30s, at)) << vm->Console() << vm->Stderr();
  EXPECT_EQ(vm->Console().find("FAIL"), std::string::npos);
  EXPECT_EQ(vm->Api("PUT", "/vm/shutdown", "{}"), 200);
  EXPECT_EQ(vm->Wait(10s), 0);
}

TEST_F(VmmTest, CorruptOrTruncatedSnapshotsAreRejected) {
  const std::string snap = dir_ + "/vm.snap";
  VmProcess vm(BootArgs(""), dir_);
  ASSERT_TRUE(vm.Start());
  ASSERT_TRUE(vm.WaitConsole("ferry-guest: ready", 10s));
  ASSERT_EQ(vm.Api("PUT", "/vm/snapshot", "{\"path\":\"" + snap + "\"}"), 200);
  vm.Kill();
  struct stat st;
  ASSERT_EQ(stat(snap.c_str(), &st), 0);
  const off_t size = st.st_size;
  std::string vmm = BuildDir() + "/bin/ferry-vmm";
  auto restore_fails = [&](const std::string& file, const std::string& expect) {
    std::string out;
    int rc = Sh("timeout 20 " + vmm + " --restore " + file + " --console none", &out);
    EXPECT_EQ(rc, 1) << out;
    EXPECT_NE(out.find(expect), std::string::npos) << "expected '" << expect << "' in: " << out;
  };
  // Flip one byte in the file header, in CONFIG, in the first section header, and deep in RAM.
  for (off_t off : {off_t{3}, off_t{10}, off_t{40}, off_t{60}, size / 2, size - 30}) {
    std::string bad = dir_ + "/bad.snap";
    Sh("cp " + snap + " " + bad);
    std::fstream f(bad, std::ios::in | std::ios::out | std::ios::binary);
    f.seekg(off);
    char c;
    f.get(c);
    f.seekp(off);
    f.put(static_cast<char>(c ^ 0x5a));
    f.close();
    SCOPED_TRACE("flipped byte at " + std::to_string(off));
    restore_fails(bad, "snapshot");
  }
  for (off_t len : {off_t{0}, off_t{16}, off_t{100}, size / 3, size - 1}) {
    std::string bad = dir_ + "/trunc.snap";
    Sh("head -c " + std::to_string(len) + " " + snap + " > " + bad);
    SCOPED_TRACE("truncated to " + std::to_string(len));
    restore_fails(bad, "snapshot");
  }
  // A snapshot whose version is newer than this build.
  std::string bad = dir_ + "/version.snap";
  Sh("cp " + snap + " " + bad);
  {
    std::fstream f(bad, std::ios::in | std::ios::out | std::ios::binary);
    uint8_t hdr[32];
    f.read(reinterpret_cast<char*>(hdr), 32);
    hdr[8] = 9;  // version
    // Recompute the header CRC so the version check itself is what rejects it.
    uint32_t crc = Crc32c(hdr, 28);
    std::memcpy(hdr + 28, &crc, 4);
    f.seekp(0);
    f.write(reinterpret_cast<char*>(hdr), 32);
  }
  restore_fails(bad, "version 9 not supported");
  // The original still restores.
  VmProcess ok({"--restore", snap}, dir_);
  ASSERT_TRUE(ok.Start());
  std::this_thread::sleep_for(500ms);
  EXPECT_EQ(ok.Get("/vm")["state"], "running");
}

TEST_F(VmmTest, VirtioBlkChecksumAndPersistence) {
  const std::string disk = dir_ + "/disk.img";
  ASSERT_EQ(Sh("truncate -s 8M " + disk), 0);
  {
    auto args = BootArgs("blkcheck:mode=write,seed=77,mib=2");
    args.push_back("--disk");
    args.push_back(disk);
    VmProcess w(args, dir_);
    ASSERT_TRUE(w.Start());
    ASSERT_TRUE(w.WaitConsole("blkcheck written", 30s)) << w.Console() << w.Stderr();
    ASSERT_EQ(w.Api("PUT", "/vm/shutdown", "{}"), 200);
    w.Wait(10s);
  }
  // Host-side check of the header written by the guest.
  std::ifstream f(disk, std::ios::binary);
  char magic[8];
  f.read(magic, 8);
  EXPECT_EQ(std::string(magic, 8), "FERRYBLK");
  // A second boot verifies what the first one wrote (persistence).
  auto args = BootArgs("blkcheck:mode=verify,seed=77,mib=2");
  args.push_back("--disk");
  args.push_back(disk);
  VmProcess v(args, dir_);
  ASSERT_TRUE(v.Start());
  ASSERT_TRUE(v.WaitConsole("blkcheck ok", 30s)) << v.Console() << v.Stderr();
  auto info = v.Get("/vm");
  bool found = false;
  for (auto& [id, m] : info["devices"].items())
    if (m.value("kind", "") == "virtio-blk") { found = true; EXPECT_GT(m["read_bytes"].get<uint64_t>(), 2u << 20); }
  EXPECT_TRUE(found);
}

TEST_F(VmmTest, BalloonFreePageReportingDeliversRanges) {
  auto args = BootArgs("churn:mib=32");
  args.push_back("--balloon");
  VmProcess vm(args, dir_);
  ASSERT_TRUE(vm.Start());
  ASSERT_TRUE(vm.WaitConsole("ferry-guest: ready", 10s)) << vm.Console();
  uint64_t reports = 0;
  for (int i = 0; i < 60 && reports == 0; ++i) {
    std::this_thread::sleep_for(500ms);
    auto info = vm.Get("/vm");
    for (auto& [id, m] : info["devices"].items())
      if (m.value("kind", "") == "virtio-balloon") reports = m["free_page_reports"].get<uint64_t>();
  }
  EXPECT_GT(reports, 0u) << vm.Console();
}

TEST_F(VmmTest, UdpEchoOverTapInNamespaceSurvivesSnapshotRestore) {
  if (geteuid() != 0) GTEST_SKIP() << "needs root for network namespaces and TAP devices";
  NetNs ns("ferrytest" + std::to_string(getpid() % 100000));
  ASSERT_TRUE(ns.ok());
  ASSERT_TRUE(ns.AddTap("ftap0"));
  auto args = BootArgs("echo:port=7", "ferry.ip=10.77.0.2/24");
  args.push_back("--net");
  args.push_back("tap=ftap0,mac=52:54:00:aa:bb:01");
  VmProcess vm(args, dir_, ns.name());
  ASSERT_TRUE(vm.Start());
  ASSERT_TRUE(vm.WaitConsole("ferry-guest: ready", 10s)) << vm.Console() << vm.Stderr();
  EXPECT_GE(ns.UdpEcho("10.77.0.2", 7, 20, 2000), 18);
  const std::string snap = dir_ + "/net.snap";
  ASSERT_EQ(vm.Api("PUT", "/vm/snapshot", "{\"path\":\"" + snap + "\"}"), 200);
  ASSERT_EQ(vm.Api("PUT", "/vm/shutdown", "{}"), 200);
  vm.Wait(10s);
  VmProcess r({"--restore", snap, "--net", "tap=ftap0"}, dir_, ns.name());
  ASSERT_TRUE(r.Start());
  EXPECT_GE(ns.UdpEcho("10.77.0.2", 7, 20, 2000), 18) << r.Stderr();
  ASSERT_EQ(r.Api("PUT", "/vm/shutdown", "{}"), 200);
  r.Wait(10s);
  // Restoring a VM with a NIC without --net is refused with a clear error.
  std::string out;
  EXPECT_EQ(Sh(BuildDir() + "/bin/ferry-vmm --restore " + snap + " --console none", &out), 1);
  EXPECT_NE(out.find("--net"), std::string::npos) << out;
}

}  // namespace
}  // namespace ferry::test
