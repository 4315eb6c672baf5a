// Live migration between real ferry-vmm processes booting the project guest:
// correctness under load (memverify), network continuity, round trips, cancel in every phase,
// destination crash, a cut connection, and bad streams in both directions.
#include <poll.h>
#include <sys/stat.h>
#include <unistd.h>

#include <array>
#include <atomic>
#include <chrono>
#include <cstring>
#include <memory>
#include <thread>

#include <gtest/gtest.h>

#include "migration/protocol/wire.h"
#include "migration/transport/tcp.h"
#include "migration_util.h"

namespace ferry::test {
namespace {
using namespace std::chrono_literals;
using namespace ferry::migration;

// memdirty over 16 MiB = 4096 pages (verified on demand through the console).
constexpr int kMib = 16, kPages = kMib * 256;

std::vector<std::string> GuestArgs(const std::string& run, const std::string& extra = "") {
  return {"--kernel", GuestImage(), "--initrd", GuestInitrd(), "--mem", "256M", "--cmdline",
          "console=ttyS0 " + extra + " ferry.run=" + run};
}
std::string Memdirty(int rate, int mib = kMib) {
  return "memdirty:mib=" + std::to_string(mib) + ",rate=" + std::to_string(rate) + ",bytes=4096,verify=0";
}

class MigrationTest : public ::testing::Test {
 protected:
  void SetUp() override {
    struct stat st;
    ASSERT_EQ(stat(GuestImage().c_str(), &st), 0) << "guest image missing: run scripts/setup";
    dir_ = MakeTempDir("migtest");
  }
  void TearDown() override { RemoveTree(dir_); }

  // Boots a source VM running memdirty and waits until the workload runs.
  std::unique_ptr<VmProcess> BootSource(const std::string& run) {
    auto vm = std::make_unique<VmProcess>(GuestArgs(run), dir_);
    EXPECT_TRUE(vm->Start());
    EXPECT_TRUE(vm->WaitConsole("memdirty started", 15s)) << vm->Console() << vm->Stderr();
    return vm;
  }
  std::unique_ptr<VmProcess> Incoming(int port, std::vector<std::string> extra = {}, const std::string& netns = "") {
    std::vector<std::string> args = {"--incoming", "tcp:127.0.0.1:" + std::to_string(port)};
    args.insert(args.end(), extra.begin(), extra.end());
    auto vm = std::make_unique<VmProcess>(args, dir_, netns);
    EXPECT_TRUE(vm->Start());
    WaitListening(port, netns);
    return vm;
  }
  static void WaitListening(int port, const std::string& netns = "") {
    const std::string pre = netns.empty() ? "" : "ip netns exec " + netns + " ";
    for (int i = 0; i < 200; ++i) {
      if (Sh(pre + "ss -Hltn 'sport = :" + std::to_string(port) + "' | grep -q LISTEN") == 0) return;
      std::this_thread::sleep_for(10ms);
    }
  }
  // The source must be running its guest, with no migration in progress.
  static void ExpectSourceRunning(VmProcess& src) {
    auto info = src.Get("/vm");
    ASSERT_TRUE(info.is_object()) << src.Stderr();
    EXPECT_EQ(info["state"], "running") << info.dump();
  }
  std::string dir_;
};

// What the echo service's longest silence may add to the VMM's downtime: the guest's first slices
// after the resume, the probe's 1 ms period, and a loaded 2-core host not running the destination
// at once. Measured here: longest silence 40-60 ms (the busy guest's own jitter) for 1-4 ms of VMM
// downtime, answers flowing straight across the resume; without the RARP announce the first
// answer after the resume came 230 ms late (the bridge still sent to the source's port).
constexpr double kServiceMarginMs = 500;

// --- the main case: memdirty at 20k pages/s + UDP echo, over a bridge ---
TEST_F(MigrationTest, MemdirtyAndEchoMoveToTheDestination) {
  if (geteuid() != 0) GTEST_SKIP() << "needs root for network namespaces and TAP devices";
  NetNs ns("ferrymig" + std::to_string(getpid() % 100000));
  ASSERT_TRUE(ns.ok());
  ASSERT_TRUE(ns.AddTap("fmtapa"));
  ASSERT_TRUE(ns.AddTap("fmtapb"));
  auto args = GuestArgs(Memdirty(20000, 64) + ";echo:port=7", "ferry.ip=10.77.0.2/24");
  args.insert(args.end(), {"--net", "tap=fmtapa,mac=52:54:00:12:34:56"});
  VmProcess src(args, dir_, ns.name());
  ASSERT_TRUE(src.Start());
  ASSERT_TRUE(src.WaitConsole("memdirty started", 15s)) << src.Console() << src.Stderr();
  ASSERT_GE(ns.UdpEcho("10.77.0.2", 7, 20, 2000), 18);
  // `ferry status` shows the guest's memory from GET /vm (config.ram_bytes).
  const auto ram = src.Get("/vm")["config"].value("ram_bytes", uint64_t{0});
  ASSERT_GT(ram, 0u);
  auto st = Ferry("status --api-socket " + src.socket());
  EXPECT_EQ(st.rc, 0) << st.out;
  EXPECT_NE(st.out.find("memory: " + std::to_string(ram >> 20) + " MiB"), std::string::npos) << st.out;
  const int port = FreePort();
  auto dst = Incoming(port, {"--net", "tap=fmtapb"}, ns.name());
  std::this_thread::sleep_for(1s);  // let memdirty reach its rate

  PacketCapture rarp(ns.name(), 0x8035);  // from before the migration: the source must announce nothing
  ASSERT_TRUE(rarp.ok());
  UdpProbe probe(ns.name(), "10.77.0.2:7", dir_);
  std::this_thread::sleep_for(500ms);
  auto r = Ferry("migrate --api-socket " + src.socket() + " --to tcp:127.0.0.1:" + std::to_string(port) + " --json --no-progress",
                 ns.name());
  ASSERT_EQ(r.rc, 0) << r.out << src.Stderr() << dst->Stderr();
  std::this_thread::sleep_for(1s);
  auto p = probe.Stop();
  // The destination told the bridge where the guest's MAC lives now.
  ExpectOneRarpFromTap(rarp, "fmtapb", {0x52, 0x54, 0x00, 0x12, 0x34, 0x56});
  ASSERT_TRUE(r.json.is_object()) << r.out;
  for (const char* k : {"status", "total_ms", "downtime_ms", "setup_ms", "transferred_bytes", "iterations"})
    EXPECT_TRUE(r.json.contains(k)) << k << " missing: " << r.out;
  EXPECT_EQ(r.json["status"], "completed");
  EXPECT_GT(r.json["transferred_bytes"].get<uint64_t>(), 64ull << 20);  // at least the workload's memory
  // `ferry migrate` shut the (paused, migrated) source down.
  EXPECT_EQ(src.Wait(10s), 0) << src.Stderr();
  // The guest runs on the destination: same memory, same address, same MAC.
  ASSERT_TRUE(MemverifyOk(*dst, 64 * 256)) << dst->Console() << dst->Stderr();
  EXPECT_EQ(dst->Console().find("FAIL"), std::string::npos) << dst->Console();
  EXPECT_GE(ns.UdpEcho("10.77.0.2", 7, 20, 2000), 18) << dst->Stderr();
  ASSERT_TRUE(p.is_object());
  std::printf("migration: %s\nprobe: %s\n", r.json.dump().c_str(), p.dump().c_str());
  // How many of the 1 kHz probes a guest answers depends on its CPU (a sanitizer build is slow);
  // what matters is that answers came from the destination after its resume, up to the end, and
  // that no silence lasted much longer than the VMM's own downtime.
  const auto resumed = GuestResumedMono(dst->Stderr());
  ASSERT_TRUE(resumed) << dst->Stderr();
  ExpectServiceContinuesAfterResume(p, *resumed, r.json["downtime_ms"].get<double>(), kServiceMarginMs);
  EXPECT_EQ(dst->Api("PUT", "/vm/shutdown", "{}"), 200);
  EXPECT_EQ(dst->Wait(10s), 0);
}

// --- idle 512 MiB guest: zero pages cost 8 bytes, the stream is little more than the data ---
TEST_F(MigrationTest, IdleGuestSendsLittleMoreThanItsNonZeroRam) {
  VmProcess src({"--kernel", GuestImage(), "--initrd", GuestInitrd(), "--mem", "512M", "--cmdline", "console=ttyS0"}, dir_);
  ASSERT_TRUE(src.Start());
  ASSERT_TRUE(src.WaitConsole("ferry-guest: ready", 15s)) << src.Console() << src.Stderr();
  std::this_thread::sleep_for(1s);
  const int port = FreePort();
  auto dst = Incoming(port);
  auto r = Ferry("migrate --api-socket " + src.socket() + " --to tcp:127.0.0.1:" + std::to_string(port) + " --json --no-progress");
  ASSERT_EQ(r.rc, 0) << r.out << dst->Stderr();
  const auto& first = r.json["history"][0];
  const double nonzero = static_cast<double>(first["pages"].get<uint64_t>() - first["zero_pages"].get<uint64_t>()) * 4096;
  const double wire = static_cast<double>(r.json["transferred_bytes"].get<uint64_t>());
  std::printf("idle 512 MiB: %.1f MiB on the wire for %.1f MiB of non-zero RAM (%.3fx), downtime %.2f ms\n", wire / (1 << 20),
              nonzero / (1 << 20), wire / nonzero, r.json["downtime_ms"].get<double>());
  EXPECT_LE(wire, 1.1 * nonzero) << r.out;
  EXPECT_EQ(r.json["iterations"], 1) << "an idle guest converges after the first round";
  // The acceptance figure (<= 20 ms) is measured by bench/migrate-vs-qemu on a quiet machine;
  // here only a bound that a loaded CI machine cannot miss by accident.
  EXPECT_LT(r.json["downtime_ms"].get<double>(), 200.0) << r.out;
  auto info = dst->Get("/vm");
  ASSERT_TRUE(info.is_object());
  EXPECT_EQ(info["state"], "running");
}

// --- 10 round trips A -> B -> A, memory verified at the end ---
// A second memdirty writes sub-page ranges (odd offsets, odd and even lengths, misaligned 8-byte
// stores, one of them straddling the page boundary every write) across page boundaries.
constexpr int kPartialMib = 8, kPartialPages = kPartialMib * 256;
TEST_F(MigrationTest, TenRoundTrips) {
  auto vm = BootSource(Memdirty(20000) + ";memdirty:mib=" + std::to_string(kPartialMib) + ",rate=10000,pattern=partial,verify=0");
  ASSERT_TRUE(vm->WaitConsole("pattern=partial", 15s)) << vm->Console();
  // Guest time (CLINT, 10 MHz) must follow wall time across the moves: no jump forward, and
  // behind only by the time the guest was paused.
  const auto wall0 = std::chrono::steady_clock::now();
  const double guest0 = vm->Get("/vm")["guest_time_ticks"].get<double>() / 1e7;
  double paused_s = 0;
  for (int leg = 0; leg < 20; ++leg) {
    const int port = FreePort();
    auto next = Incoming(port);
    auto r = Ferry("migrate --api-socket " + vm->socket() + " --to tcp:127.0.0.1:" + std::to_string(port) + " --json --no-progress");
    ASSERT_EQ(r.rc, 0) << "leg " << leg << ": " << r.out << vm->Stderr() << next->Stderr();
    paused_s += r.json["downtime_ms"].get<double>() / 1e3;
    ASSERT_EQ(vm->Wait(10s), 0) << "leg " << leg << ": source did not exit: " << vm->Stderr();
    vm = std::move(next);
    auto info = vm->Get("/vm");
    ASSERT_TRUE(info.is_object()) << vm->Stderr();
    ASSERT_EQ(info["state"], "running");
  }
  const double guest1 = vm->Get("/vm")["guest_time_ticks"].get<double>() / 1e7;
  const double wall = std::chrono::duration<double>(std::chrono::steady_clock::now() - wall0).count();
  std::printf("20 legs: wall %.3f s, guest clock %.3f s, paused %.3f s\n", wall, guest1 - guest0, paused_s);
  EXPECT_LE(guest1 - guest0, wall + 0.05) << "guest clock jumped forward";
  EXPECT_GE(guest1 - guest0, wall - paused_s - 0.5) << "guest clock lost more than the paused time";
  ASSERT_TRUE(MemverifyOk(*vm, kPages)) << vm->Console() << vm->Stderr();
  ASSERT_TRUE(MemverifyOk(*vm, kPartialPages)) << vm->Console() << vm->Stderr();
  EXPECT_EQ(vm->Console().find("FAIL"), std::string::npos) << vm->Console();
  EXPECT_EQ(vm->Api("PUT", "/vm/shutdown", "{}"), 200);
}

// --- the destination's RAM is the paused source's, byte for byte, before the guest runs there ---
// An independent check of what memverify checks from inside: SHA-256 of each side's RAM read
// straight from its mapping (GET /vm/memory-digest, no migration code on the way), the source
// paused after the switchover (state migrated), the destination held paused by
// --incoming-paused. The guest writes whole pages and sub-page ranges across page boundaries.
TEST_F(MigrationTest, DestinationRamEqualsThePausedSourceBeforeItRuns) {
  auto src = BootSource(Memdirty(20000) + ";memdirty:mib=" + std::to_string(kPartialMib) + ",rate=10000,pattern=partial,verify=0");
  ASSERT_TRUE(src->WaitConsole("pattern=partial", 15s)) << src->Console();
  std::string body;
  EXPECT_EQ(src->Api("GET", "/vm/memory-digest", "", &body), 409) << "a running VM has no stable digest: " << body;
  const int port = FreePort();
  auto dst = Incoming(port, {"--incoming-paused"});
  // PUT /vm/migrate, not `ferry migrate`: the CLI would shut the migrated source down.
  ASSERT_EQ(src->Api("PUT", "/vm/migrate", R"({"to":"tcp:127.0.0.1:)" + std::to_string(port) + R"("})", &body), 202) << body;
  ASSERT_EQ(WaitMigrationStatus(*src, "completed", 60s), "completed") << src->Get("/vm/migration").dump() << dst->Stderr();
  const auto a = src->Get("/vm/memory-digest"), b = dst->Get("/vm/memory-digest");
  ASSERT_TRUE(a.is_object()) << src->last_api_error();
  ASSERT_TRUE(b.is_object()) << dst->last_api_error() << dst->Stderr();
  std::printf("source %s\ndestination %s\n", a.dump().c_str(), b.dump().c_str());
  EXPECT_EQ(a["state"], "migrated");
  EXPECT_EQ(b["state"], "paused");
  EXPECT_EQ(a["ram_bytes"], b["ram_bytes"]);
  EXPECT_EQ(a["sha256"], b["sha256"]) << "the destination's RAM differs from the paused source's";
  // The digest follows the RAM: once the guest ran on, it differs (memdirty writes all the time).
  EXPECT_EQ(dst->Api("PUT", "/vm/resume", "{}", &body), 200) << body;
  std::this_thread::sleep_for(300ms);
  EXPECT_EQ(dst->Api("PUT", "/vm/pause", "{}", &body), 200) << body;
  const auto c = dst->Get("/vm/memory-digest");
  ASSERT_TRUE(c.is_object()) << dst->last_api_error();
  EXPECT_NE(c["sha256"], b["sha256"]);
  EXPECT_EQ(dst->Api("PUT", "/vm/resume", "{}", &body), 200) << body;
  ASSERT_TRUE(MemverifyOk(*dst, kPages)) << dst->Console() << dst->Stderr();
  ASSERT_TRUE(MemverifyOk(*dst, kPartialPages)) << dst->Console() << dst->Stderr();
  EXPECT_EQ(dst->Console().find("FAIL"), std::string::npos) << dst->Console();
  EXPECT_EQ(src->Api("PUT", "/vm/shutdown", "{}"), 200);
  EXPECT_EQ(dst->Api("PUT", "/vm/shutdown", "{}"), 200);
}

// A destination that speaks the protocol until END and then never answers: the source sits
// in the "device" phase (paused) until it is cancelled.
class StallingDestination {
 public:
  explicit StallingDestination(uint64_t hello_ack_caps = 0, bool corrupt_hello_ack = false) {
    listener_ = std::move(*Listener::Listen(*ParseEndpoint("tcp:127.0.0.1:0")));
    thread_ = std::thread([this, hello_ack_caps, corrupt_hello_ack] { Run(hello_ack_caps, corrupt_hello_ack); });
  }
  ~StallingDestination() {
    stop_ = true;
    listener_->Shutdown();
    if (ctl_) ctl_->Shutdown();
    for (auto& d : data_) d->Shutdown();
    thread_.join();
    for (auto& t : drains_) t.join();
  }
  std::string to() const { return "tcp:127.0.0.1:" + std::to_string(listener_->port()); }
  bool got_end() const { return got_end_; }

 private:
  void Run(uint64_t caps, bool corrupt) {
    auto c = listener_->Accept(10000);
    if (!c) return;
    ctl_ = std::move(*c);
    if (!ReadPreamble(*ctl_, 5000)) return;
    auto rec = ReadRecord(*ctl_, 5000);
    if (!rec) return;
    auto hello = DecodeHello(rec->payload);
    if (!hello) return;
    auto ack = EncodeRecord(RecordType::kHelloAck, Encode(HelloAck{hello->uuid, caps}));
    if (corrupt) ack[20] ^= 0x40;  // a payload bit flipped after the CRC was computed
    if (!ctl_->WriteAll(ack)) return;
    if (corrupt) return;
    for (uint32_t i = 0; i < hello->channels && !stop_; ++i) {
      auto d = listener_->Accept(10000);
      if (!d) return;
      data_.push_back(std::move(*d));
      Socket* s = data_.back().get();
      drains_.emplace_back([s] {
        std::array<uint8_t, 65536> buf;
        for (;;) {
          ssize_t n = read(s->fd(), buf.data(), buf.size());
          if (n <= 0) return;
        }
      });
    }
    while (!stop_) {
      auto r = ReadRecord(*ctl_, -1);
      if (!r) return;
      if (r->type() == RecordType::kConfig) (void)WriteRecord(*ctl_, RecordType::kConfigAck, {});
      if (r->type() == RecordType::kEnd) got_end_ = true;  // ... and never READY
    }
  }
  std::unique_ptr<Listener> listener_;
  std::unique_ptr<Socket> ctl_;
  std::vector<std::unique_ptr<Socket>> data_;
  std::vector<std::thread> drains_;
  std::thread thread_;
  std::atomic<bool> stop_{false}, got_end_{false};
};

TEST_F(MigrationTest, CancelInEachPhaseLeavesOnlyTheSourceRunning) {
  auto src = BootSource(Memdirty(20000));
  // Phase "setup": the destination accepts the connection and never answers HELLO.
  {
    auto mute = std::move(*Listener::Listen(*ParseEndpoint("tcp:127.0.0.1:0")));
    std::string body;
    ASSERT_EQ(src->Api("PUT", "/vm/migrate", "{\"to\":\"tcp:127.0.0.1:" + std::to_string(mute->port()) + "\"}", &body), 202) << body;
    ASSERT_EQ(WaitMigrationStatus(*src, "setup", 5s), "setup");
    std::this_thread::sleep_for(200ms);
    auto c = Ferry("cancel --api-socket " + src->socket());
    EXPECT_EQ(c.rc, 0) << c.out;
    EXPECT_EQ(WaitMigrationStatus(*src, "cancelled", 10s), "cancelled");
    ExpectSourceRunning(*src);
  }
  // Phase "active": a real destination, rate-limited so the first round takes a while.
  {
    const int port = FreePort();
    auto dst = Incoming(port);
    std::string body;
    ASSERT_EQ(src->Api("PUT", "/vm/migrate",
                       "{\"to\":\"tcp:127.0.0.1:" + std::to_string(port) + "\",\"max_bandwidth\":1048576}", &body),
              202)
        << body;
    ASSERT_EQ(WaitMigrationStatus(*src, "active", 10s), "active");
    std::this_thread::sleep_for(300ms);
    EXPECT_EQ(Ferry("cancel --api-socket " + src->socket()).rc, 0);
    EXPECT_EQ(WaitMigrationStatus(*src, "cancelled", 10s), "cancelled");
    ExpectSourceRunning(*src);
    EXPECT_EQ(dst->Wait(15s), 1) << "the destination tears itself down: " << dst->Stderr();
    EXPECT_NE(dst->Stderr().find("cancel"), std::string::npos) << dst->Stderr();
  }
  // Phase "device": stop-and-copy done, the destination never reports READY.
  {
    StallingDestination stall;
    std::string body;
    ASSERT_EQ(src->Api("PUT", "/vm/migrate", "{\"to\":\"" + stall.to() + "\"}", &body), 202) << body;
    ASSERT_EQ(WaitMigrationStatus(*src, "device", 20s), "device");
    for (int i = 0; i < 200 && !stall.got_end(); ++i) std::this_thread::sleep_for(10ms);
    EXPECT_TRUE(stall.got_end());
    EXPECT_EQ(src->Get("/vm")["state"], "paused");
    EXPECT_EQ(Ferry("cancel --api-socket " + src->socket()).rc, 0);
    EXPECT_EQ(WaitMigrationStatus(*src, "cancelled", 10s), "cancelled");
    ExpectSourceRunning(*src);
  }
  // Nothing was lost along the way, and a real migration still works afterwards.
  ASSERT_TRUE(MemverifyOk(*src, kPages)) << src->Console();
  const int port = FreePort();
  auto dst = Incoming(port);
  auto r = Ferry("migrate --api-socket " + src->socket() + " --to tcp:127.0.0.1:" + std::to_string(port) + " --json --no-progress");
  ASSERT_EQ(r.rc, 0) << r.out << dst->Stderr();
  ASSERT_TRUE(MemverifyOk(*dst, kPages)) << dst->Console();
}

// A destination that takes the whole stop-and-copy and then never reports READY (hung, or its host
// gone): the paused source gives up within stall_timeout_ms and runs again (it used to wait for the
// minute-long reply timeout, or for TCP's ~15 minutes when the host vanished with data in flight).
TEST_F(MigrationTest, AStalledStopAndCopyResumesTheSourceWithinTheStallBound) {
  auto src = BootSource(Memdirty(5000));
  StallingDestination stall;
  std::string body;
  ASSERT_EQ(src->Api("PUT", "/vm/migrate", "{\"to\":\"" + stall.to() + "\",\"stall_timeout_ms\":2000}", &body), 202) << body;
  ASSERT_EQ(WaitMigrationStatus(*src, "device", 30s), "device");
  const auto t0 = std::chrono::steady_clock::now();
  EXPECT_EQ(WaitMigrationStatus(*src, "failed", 10s), "failed") << src->Get("/vm/migration").dump();
  const double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  EXPECT_TRUE(stall.got_end());
  EXPECT_LT(secs, 5.0) << "the pause lasted well past the 2 s stall bound";
  EXPECT_NE(src->Get("/vm/migration").value("error", "").find("READY"), std::string::npos) << src->Get("/vm/migration").dump();
  ExpectSourceRunning(*src);
  ASSERT_TRUE(MemverifyOk(*src, kPages)) << src->Console();
  // Out-of-range bounds are refused.
  EXPECT_EQ(src->Api("PUT", "/vm/migrate", "{\"to\":\"" + stall.to() + "\",\"stall_timeout_ms\":10}", &body), 400) << body;
}

// The operator caps what an incoming migration may bring (--max-mem): a bigger VM is refused by
// name before any page moves, and the source keeps running.
TEST_F(MigrationTest, ADestinationRefusesMoreRamThanItsMaxMem) {
  auto src = BootSource(Memdirty(5000));
  const int port = FreePort();
  auto dst = Incoming(port, {"--max-mem", "64M"});
  auto r = Ferry("migrate --api-socket " + src->socket() + " --to tcp:127.0.0.1:" + std::to_string(port) + " --json --no-progress");
  EXPECT_NE(r.rc, 0) << r.out;
  const std::string err = src->Get("/vm/migration").value("error", "");
  EXPECT_NE(err.find("at most 64 MiB (--max-mem)"), std::string::npos) << src->Get("/vm/migration").dump();
  ExpectSourceRunning(*src);
  EXPECT_EQ(dst->Wait(15s), 1);
  EXPECT_NE(dst->Stderr().find("--max-mem"), std::string::npos) << dst->Stderr();
}

TEST_F(MigrationTest, DestinationKilledMidTransferLeavesTheSourceRunning) {
  auto src = BootSource(Memdirty(20000));
  const int port = FreePort();
  auto dst = Incoming(port);
  std::string body;
  ASSERT_EQ(src->Api("PUT", "/vm/migrate", "{\"to\":\"tcp:127.0.0.1:" + std::to_string(port) + "\",\"max_bandwidth\":2097152}", &body), 202)
      << body;
  // Killed while pages move in the live phase: the source reports bytes sent and no stop decided
  // yet (at 2 MiB/s the first round takes seconds), rather than after a guessed sleep.
  nlohmann::json at_kill;
  for (auto end = std::chrono::steady_clock::now() + 30s; std::chrono::steady_clock::now() < end;) {
    at_kill = src->Get("/vm/migration");
    if (at_kill.is_object() && at_kill.value("status", "") == "active" && at_kill.value("transferred_bytes", uint64_t{0}) >= (1u << 20))
      break;
    std::this_thread::sleep_for(10ms);
  }
  ASSERT_EQ(at_kill.value("status", ""), "active") << at_kill.dump();
  ASSERT_GE(at_kill.value("transferred_bytes", uint64_t{0}), 1u << 20) << at_kill.dump();
  ASSERT_TRUE(at_kill["stop"].is_null()) << "already stopping: " << at_kill.dump();
  dst->Kill();  // SIGKILL
  EXPECT_EQ(WaitMigrationStatus(*src, "failed", 30s), "failed");
  auto st = src->Get("/vm/migration");
  EXPECT_FALSE(st.value("error", "").empty()) << st.dump();
  // The fault hit the live phase: the source never decided to stop (so never paused).
  EXPECT_TRUE(st["stop"].is_null()) << st.dump();
  EXPECT_GT(st.value("transferred_bytes", uint64_t{0}), at_kill.value("transferred_bytes", uint64_t{0}) / 2) << st.dump();
  ExpectSourceRunning(*src);
  ASSERT_TRUE(MemverifyOk(*src, kPages)) << src->Console();
}

// A TCP relay between source and destination that cuts every connection after `limit` bytes.
class CuttingRelay {
 public:
  CuttingRelay(int dst_port, uint64_t limit) : dst_port_(dst_port), limit_(limit) {
    listener_ = std::move(*Listener::Listen(*ParseEndpoint("tcp:127.0.0.1:0")));
    thread_ = std::thread([this] { Loop(); });
  }
  ~CuttingRelay() {
    stop_ = true;
    listener_->Shutdown();
    thread_.join();
  }
  int port() const { return listener_->port(); }
  bool cut() const { return cut_; }

 private:
  void Loop() {
    std::vector<std::pair<std::unique_ptr<Socket>, std::unique_ptr<Socket>>> pairs;
    std::thread acceptor([&] {
      while (!stop_) {
        auto a = listener_->Accept(-1);
        if (!a) return;
        auto b = Socket::Connect(*ParseEndpoint("tcp:127.0.0.1:" + std::to_string(dst_port_)), 2000);
        if (!b) return;
        std::lock_guard<std::mutex> l(mu_);
        pairs.emplace_back(std::move(*a), std::move(*b));
      }
    });
    uint64_t total = 0;
    std::vector<uint8_t> buf(1 << 16);
    while (!stop_ && !cut_) {
      std::vector<pollfd> pf;
      {
        std::lock_guard<std::mutex> l(mu_);
        for (auto& [a, b] : pairs) {
          pf.push_back({a->fd(), POLLIN, 0});
          pf.push_back({b->fd(), POLLIN, 0});
        }
      }
      if (pf.empty()) {
        std::this_thread::sleep_for(5ms);
        continue;
      }
      if (poll(pf.data(), pf.size(), 20) <= 0) continue;
      std::lock_guard<std::mutex> l(mu_);
      for (size_t i = 0; i < pf.size(); ++i) {
        if (!(pf[i].revents & (POLLIN | POLLHUP | POLLERR))) continue;
        auto& pr = pairs[i / 2];
        Socket& from = i % 2 ? *pr.second : *pr.first;
        Socket& to = i % 2 ? *pr.first : *pr.second;
        ssize_t n = read(from.fd(), buf.data(), buf.size());
        if (n <= 0) continue;
        (void)to.WriteAll(std::span<const uint8_t>(buf.data(), static_cast<size_t>(n)));
        total += static_cast<uint64_t>(n);
      }
      if (total >= limit_) {
        for (auto& [a, b] : pairs) {
          a->Shutdown();
          b->Shutdown();
        }
        cut_ = true;
      }
    }
    listener_->Shutdown();
    acceptor.join();
  }
  int dst_port_;
  uint64_t limit_;
  std::unique_ptr<Listener> listener_;
  std::mutex mu_;
  std::thread thread_;
  std::atomic<bool> stop_{false}, cut_{false};
};

TEST_F(MigrationTest, CutConnectionLeavesTheSourceRunning) {
  auto src = BootSource(Memdirty(20000));
  const int port = FreePort();
  auto dst = Incoming(port);
  CuttingRelay relay(port, 8u << 20);
  std::string body;
  ASSERT_EQ(src->Api("PUT", "/vm/migrate", "{\"to\":\"tcp:127.0.0.1:" + std::to_string(relay.port()) + "\",\"max_bandwidth\":8388608}", &body),
            202)
      << body;
  EXPECT_EQ(WaitMigrationStatus(*src, "failed", 30s), "failed") << src->Get("/vm/migration").dump();
  EXPECT_TRUE(relay.cut());
  ExpectSourceRunning(*src);
  EXPECT_EQ(dst->Wait(15s), 1) << dst->Stderr();
  ASSERT_TRUE(MemverifyOk(*src, kPages)) << src->Console();
}

// Raw bytes helpers for malformed streams.
std::vector<uint8_t> Concat(std::initializer_list<std::span<const uint8_t>> parts) {
  std::vector<uint8_t> out;
  for (auto p : parts) out.insert(out.end(), p.begin(), p.end());
  return out;
}
std::string ErrorReply(Socket& s) {
  auto r = ReadRecord(s, 5000);
  if (!r) return "no reply: " + r.error().message();
  if (r->type() != RecordType::kError) return "not an ERROR record";
  auto e = DecodeError(r->payload);
  return e ? e->message : "bad ERROR record";
}

TEST_F(MigrationTest, BadStreamsAreRejectedWithClearErrors) {
  const auto ep = [](int port) { return *ParseEndpoint("tcp:127.0.0.1:" + std::to_string(port)); };
  const Uuid uuid{1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16};
  const auto hello = EncodeRecord(RecordType::kHello, Encode(Hello{uuid, 0, 1, kWirePageSize}));
  const auto ctl_preamble = EncodePreamble(Role::kControl);
  // 1. Version mismatch: answered with an ERROR naming the versions; the destination keeps waiting.
  {
    const int port = FreePort();
    auto dst = Incoming(port);
    auto s = std::move(*Socket::Connect(ep(port), 2000));
    auto pre = ctl_preamble;
    pre[8] = kProtocolVersion + 1;  // a version from the future (little-endian u32 after the magic)
    ASSERT_TRUE(s->WriteAll(pre));
    std::string err = ErrorReply(*s);
    EXPECT_NE(err.find(fmt::format("version {} is not supported", kProtocolVersion + 1)), std::string::npos) << err;
    // 2. A HELLO with a bad CRC on a fresh connection: rejected the same way.
    auto s2 = std::move(*Socket::Connect(ep(port), 2000));
    auto bad = hello;
    bad[20] ^= 1;
    ASSERT_TRUE(s2->WriteAll(Concat({ctl_preamble, bad})));
    err = ErrorReply(*s2);
    EXPECT_NE(err.find("CRC mismatch"), std::string::npos) << err;
    // ... and the destination still takes a real migration.
    auto src = BootSource(Memdirty(5000));
    auto r = Ferry("migrate --api-socket " + src->socket() + " --to tcp:127.0.0.1:" + std::to_string(port) + " --json --no-progress");
    ASSERT_EQ(r.rc, 0) << r.out << dst->Stderr();
    ASSERT_TRUE(MemverifyOk(*dst, kPages)) << dst->Console();
    // The source side: a destination whose HELLO_ACK is corrupted fails the migration cleanly.
    auto src2 = BootSource(Memdirty(5000));
    StallingDestination corrupt(0, /*corrupt_hello_ack=*/true);
    std::string body;
    ASSERT_EQ(src2->Api("PUT", "/vm/migrate", "{\"to\":\"" + corrupt.to() + "\"}", &body), 202) << body;
    EXPECT_EQ(WaitMigrationStatus(*src2, "failed", 10s), "failed");
    EXPECT_NE(src2->Get("/vm/migration").value("error", "").find("CRC mismatch"), std::string::npos)
        << src2->Get("/vm/migration").dump();
    ExpectSourceRunning(*src2);
  }
  // 3. Corrupted record inside an accepted migration: the destination fails with the CRC error.
  {
    const int port = FreePort();
    auto dst = Incoming(port);
    auto s = std::move(*Socket::Connect(ep(port), 2000));
    auto cfg = EncodeRecord(RecordType::kConfig, EncodeConfig({{"board", nlohmann::json::object()}, {"vmm", "test"}}));
    cfg[cfg.size() - 3] ^= 0x20;
    ASSERT_TRUE(s->WriteAll(Concat({ctl_preamble, hello})));
    auto ack = ReadRecord(*s, 5000);
    ASSERT_TRUE(ack && ack->type() == RecordType::kHelloAck);
    auto d = std::move(*Socket::Connect(ep(port), 2000));  // its one data channel
    ASSERT_TRUE(d->WriteAll(Concat({EncodePreamble(Role::kData), EncodeRecord(RecordType::kDataHello, Encode(DataHello{uuid, 0}))})));
    ASSERT_TRUE(s->WriteAll(cfg));
    EXPECT_NE(ErrorReply(*s).find("CRC mismatch"), std::string::npos);
    EXPECT_EQ(dst->Wait(10s), 1);
    EXPECT_NE(dst->Stderr().find("CRC mismatch"), std::string::npos) << dst->Stderr();
  }
  // 4. Truncated stream: a record cut short by the connection closing.
  {
    const int port = FreePort();
    auto dst = Incoming(port);
    auto s = std::move(*Socket::Connect(ep(port), 2000));
    ASSERT_TRUE(s->WriteAll(Concat({ctl_preamble, hello})));
    auto ack = ReadRecord(*s, 5000);
    ASSERT_TRUE(ack && ack->type() == RecordType::kHelloAck);
    auto cfg = EncodeRecord(RecordType::kConfig, EncodeConfig({{"board", nlohmann::json::object()}}));
    ASSERT_TRUE(s->WriteAll(std::span<const uint8_t>(cfg.data(), cfg.size() - 5)));
    s->Shutdown();
    EXPECT_EQ(dst->Wait(40s), 1);
    EXPECT_NE(dst->Stderr().find("closed"), std::string::npos) << dst->Stderr();
  }
}

}  // namespace
}  // namespace ferry::test
