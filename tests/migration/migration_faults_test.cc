// The fault matrix (docs/reliability.md) between real ferry-vmm processes: an unreachable
// destination (closed port, no route, a path that drops everything), virtio-blk writes during a
// pre-copy, the destination killed after the switchover, and the same snapshot restored twice.
// Every test ends with exactly one running copy of the VM whose memory verifies (memverify).
#include <sys/stat.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <cstring>
#include <fstream>
#include <memory>
#include <mutex>
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
const std::string kMemdirty = "memdirty:mib=16,rate=5000,bytes=4096,verify=0";

std::vector<std::string> GuestArgs(const std::string& run) {
  return {"--kernel", GuestImage(), "--initrd", GuestInitrd(), "--mem", "256M", "--cmdline", "console=ttyS0 ferry.run=" + run};
}

// Waits until the VMM's API answers (a restored VM serves it once it runs).
bool ApiUp(VmProcess& vm, std::chrono::milliseconds timeout = 20s) {
  const auto end = std::chrono::steady_clock::now() + timeout;
  while (std::chrono::steady_clock::now() < end) {
    if (vm.Get("/vm").is_object()) return true;
    std::this_thread::sleep_for(20ms);
  }
  return false;
}

double SecondsSince(std::chrono::steady_clock::time_point t0) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

class MigrationFaultsTest : public ::testing::Test {
 protected:
  void SetUp() override {
    struct stat st;
    ASSERT_EQ(stat(GuestImage().c_str(), &st), 0) << "guest image missing: run scripts/setup";
    dir_ = MakeTempDir("migfault");
  }
  void TearDown() override { RemoveTree(dir_); }
  std::unique_ptr<VmProcess> Boot(std::vector<std::string> args, const std::string& wait_for, const std::string& netns = "") {
    auto vm = std::make_unique<VmProcess>(std::move(args), dir_, netns);
    EXPECT_TRUE(vm->Start());
    EXPECT_TRUE(vm->WaitConsole(wait_for, 30s)) << vm->Console() << vm->Stderr();
    return vm;
  }
  std::unique_ptr<VmProcess> Incoming(int port, std::vector<std::string> extra = {}) {
    std::vector<std::string> args = {"--incoming", "tcp:127.0.0.1:" + std::to_string(port)};
    args.insert(args.end(), extra.begin(), extra.end());
    auto vm = std::make_unique<VmProcess>(args, dir_);
    EXPECT_TRUE(vm->Start());
    for (int i = 0; i < 500 && Sh("ss -Hltn 'sport = :" + std::to_string(port) + "' | grep -q LISTEN") != 0; ++i)
      std::this_thread::sleep_for(10ms);
    return vm;
  }
  static std::string Migrate(VmProcess& src, const std::string& to, CliResult* r, const std::string& flags = "") {
    *r = Ferry("migrate --api-socket " + src.socket() + " --to " + to + " --json --no-progress " + flags);
    const auto st = src.Get("/vm/migration");
    return st.is_object() ? st.value("error", "") : "no answer from GET /vm/migration: " + src.last_api_error();
  }
  std::string dir_;
};

// Nothing listening, no route, and a path that silently drops every packet: `ferry migrate`
// fails with the connect error (within connect_timeout_ms, 5 s, for the silent path) and the
// source keeps running. The source VMM runs in its own namespace: only there may an address have
// no route, or a route into a device that drops everything (a TAP device nobody reads).
TEST_F(MigrationFaultsTest, AnUnreachableDestinationFailsWithinTheConnectTimeoutAndTheSourceRuns) {
  if (geteuid() != 0) GTEST_SKIP() << "needs root for a network namespace";
  const std::string ns = "ferryunr" + std::to_string(getpid() % 100000);
  struct Cleanup {
    std::string ns;
    ~Cleanup() { Sh("ip netns del " + ns + " 2>/dev/null"); }
  } cleanup{ns};
  // 10.213.1.0/24 goes into a TAP device nobody reads (its neighbour entry fixed, so no ARP fails
  // fast): every packet is dropped without an answer. 10.213.9.0/24 has no route at all.
  ASSERT_EQ(Sh("ip netns add " + ns + " && ip -n " + ns + " link set lo up && ip -n " + ns + " tuntap add dev fdrop0 mode tap && ip -n " +
               ns + " addr add 10.213.1.1/24 dev fdrop0 && ip -n " + ns + " link set fdrop0 up && ip -n " + ns +
               " neigh replace 10.213.1.2 lladdr 02:00:00:00:00:02 dev fdrop0 nud permanent"),
            0);
  auto src = Boot(GuestArgs(kMemdirty), "memdirty started", ns);
  struct Case {
    std::string to, why, expect;
    double min_s, max_s;
  };
  const Case cases[] = {
      {"tcp:127.0.0.1:" + std::to_string(FreePort()), "nothing listening", "refused", 0, 2},
      {"tcp:10.213.9.2:4444", "no route", "unreachable", 0, 2},
      {"tcp:10.213.1.2:4444", "every packet dropped", "timed out", 4.5, 5 + 3},
  };
  for (const Case& c : cases) {
    SCOPED_TRACE(c.why);
    CliResult r;
    const auto t0 = std::chrono::steady_clock::now();
    const std::string err = Migrate(*src, c.to, &r);
    const double s = SecondsSince(t0);
    EXPECT_NE(r.rc, 0) << r.out;
    EXPECT_EQ(src->Get("/vm/migration").value("status", ""), "failed");
    EXPECT_NE(err.find("control channel"), std::string::npos) << err;
    EXPECT_NE(err.find(c.expect), std::string::npos) << err;
    EXPECT_NE(r.out.find(c.expect), std::string::npos) << "the CLI does not show the error: " << r.out;
    EXPECT_GE(s, c.min_s);
    EXPECT_LT(s, c.max_s) << "connect_timeout_ms is 5000";
    EXPECT_EQ(src->Get("/vm")["state"], "running");
  }
  ASSERT_TRUE(MemverifyOk(*src, kPages)) << src->Console();
}

// A relay between source and destination that reads the control connection's records (the
// first connection a source opens is its control connection). When GO comes it stops passing
// anything back to the source, passes GO on to the destination and shuts every connection down: the destination
// has GO (and runs the guest), the source never gets RESUMED. The commit point's fault, at
// exactly that point.
class GoCuttingRelay {
 public:
  explicit GoCuttingRelay(int dst_port) : dst_port_(dst_port) {
    listener_ = std::move(*Listener::Listen(*ParseEndpoint("tcp:127.0.0.1:0")));
    acceptor_ = std::thread([this] {
      for (bool control = true;; control = false) {
        auto a = listener_->Accept(-1);
        if (!a) return;
        auto b = Socket::Connect(*ParseEndpoint("tcp:127.0.0.1:" + std::to_string(dst_port_)), 2000);
        if (!b) return;
        std::lock_guard<std::mutex> l(mu_);
        auto pair = std::make_shared<Pair>(std::move(*a), std::move(*b));
        pairs_.push_back(pair);
        threads_.emplace_back([this, pair, control] { control ? ForwardUntilGo(*pair->first, *pair->second) : Pump(*pair->first, *pair->second); });
        threads_.emplace_back([this, pair, control] { Pump(*pair->second, *pair->first, control ? &go_seen_ : nullptr); });
      }
    });
  }
  ~GoCuttingRelay() {
    listener_->Shutdown();
    acceptor_.join();
    CutAll();
    std::vector<std::thread> threads;
    {
      std::lock_guard<std::mutex> l(mu_);
      threads.swap(threads_);
    }
    for (auto& t : threads) t.join();
  }
  int port() const { return listener_->port(); }
  bool cut_after_go() const { return cut_after_go_; }

 private:
  using Pair = std::pair<std::unique_ptr<Socket>, std::unique_ptr<Socket>>;
  void ForwardUntilGo(Socket& from, Socket& to) {
    auto pre = ReadPreamble(from, 60000);
    if (!pre || !WritePreamble(to, pre->role, pre->version)) return CutAll();
    for (;;) {
      auto r = ReadRecord(from, 600000);
      if (!r) return CutAll();
      if (r->type() == RecordType::kGo) {
        go_seen_ = true;  // from now on nothing goes back to the source: no RESUMED slips through
        cut_after_go_ = static_cast<bool>(to.WriteAll(EncodeRecord(r->type(), r->payload, r->header.mandatory())));
        return CutAll();
      }
      if (!to.WriteAll(EncodeRecord(r->type(), r->payload, r->header.mandatory()))) return CutAll();
    }
  }
  // Copies from -> to; once *drop is set, what arrives is dropped.
  static void Pump(Socket& from, Socket& to, const std::atomic<bool>* drop = nullptr) {
    uint8_t buf[65536];
    for (;;) {
      const ssize_t n = read(from.fd(), buf, sizeof buf);
      if (n <= 0) break;
      if (drop && drop->load()) continue;
      if (!to.WriteAll({buf, static_cast<size_t>(n)})) break;
    }
    from.Shutdown();
    to.Shutdown();
  }
  void CutAll() {
    std::lock_guard<std::mutex> l(mu_);
    for (auto& p : pairs_) {
      p->first->Shutdown();
      p->second->Shutdown();
    }
  }
  const int dst_port_;
  std::unique_ptr<Listener> listener_;
  std::thread acceptor_;
  std::mutex mu_;
  std::vector<std::shared_ptr<Pair>> pairs_;  // guarded by mu_
  std::vector<std::thread> threads_;          // guarded by mu_
  std::atomic<bool> go_seen_{false}, cut_after_go_{false};
};

// GO is the commit point. The connection lost right after it: the source reports failed-unknown
// and stays paused - it never resumes by itself (its vCPU retires no instruction, its RAM digest
// does not change and equals the RAM the destination got GO with) - because the destination may
// run the guest. The operator's way out
// (docs/reliability.md): look at the destination. It runs (here it does, it got GO): shut the
// source down. It is known gone (here: killed): `ferry resume` the source.
TEST_F(MigrationFaultsTest, ConnectionLostRightAfterGoLeavesTheSourcePausedInFailedUnknown) {
  for (const bool destination_runs : {true, false}) {
    SCOPED_TRACE(destination_runs ? "the destination runs the guest" : "the destination is gone");
    auto src = Boot(GuestArgs(kMemdirty), "memdirty started");
    const int port = FreePort();
    // Paused after GO until resumed: its RAM can be compared with the source's first.
    auto dst = Incoming(port, {"--incoming-paused"});
    GoCuttingRelay relay(port);
    CliResult r;
    const std::string err = Migrate(*src, "tcp:127.0.0.1:" + std::to_string(relay.port()), &r);
    EXPECT_NE(r.rc, 0) << r.out;
    EXPECT_TRUE(relay.cut_after_go());
    EXPECT_EQ(src->Get("/vm/migration").value("status", ""), "failed-unknown") << src->Get("/vm/migration").dump();
    EXPECT_NE(err.find("RESUMED"), std::string::npos) << err;
    EXPECT_NE(r.out.find("`ferry resume` the source only if it is not running there"), std::string::npos) << r.out;
    const auto before = src->Get("/vm");
    const auto digest = src->Get("/vm/memory-digest");
    std::this_thread::sleep_for(500ms);
    const auto after = src->Get("/vm");
    EXPECT_EQ(after["state"], "paused") << after.dump();
    EXPECT_EQ(after["counters"]["instructions"], before["counters"]["instructions"]) << "the source ran on";
    ASSERT_TRUE(digest.is_object()) << src->last_api_error();
    EXPECT_EQ(src->Get("/vm/memory-digest")["sha256"], digest["sha256"]) << "the source's RAM changed";
    ASSERT_TRUE(ApiUp(*dst)) << dst->Stderr();
    EXPECT_EQ(dst->Get("/vm/memory-digest")["sha256"], digest["sha256"]) << "the destination got GO with other RAM than the source holds";
    EXPECT_EQ(Ferry("resume --api-socket " + dst->socket()).rc, 0);  // what a destination without --incoming-paused does at GO
    const auto d = dst->Get("/vm");
    EXPECT_EQ(d["state"], "running") << d.dump();
    EXPECT_EQ(d.value("generation_id", ""), before.value("generation_id", "?")) << "a migration moves the same VM";
    if (destination_runs) {
      EXPECT_EQ(Ferry("shutdown --api-socket " + src->socket()).rc, 0);
      EXPECT_EQ(src->Wait(30s), 0);
      ASSERT_TRUE(MemverifyOk(*dst, kPages)) << dst->Console();
    } else {
      dst->Kill();
      (void)dst->Wait(10s);
      EXPECT_EQ(Ferry("resume --api-socket " + src->socket()).rc, 0);
      EXPECT_EQ(src->Get("/vm")["state"], "running");
      ASSERT_TRUE(MemverifyOk(*src, kPages)) << src->Console();
    }
  }
}

// FNV-1a 64 over the blkcheck data (splitmix64 words of `seed`), as guest/src/blkcheck.c.
bool DiskHoldsBlkcheckData(const std::string& path, uint64_t seed, uint64_t len, std::string* why) {
  std::ifstream f(path, std::ios::binary);
  std::vector<char> hdr(32), data(len);
  if (!f.read(hdr.data(), 32) || std::memcmp(hdr.data(), "FERRYBLK", 8) != 0) return *why = "no header", false;
  uint64_t hseed, hlen, hsum;
  std::memcpy(&hseed, hdr.data() + 8, 8);
  std::memcpy(&hlen, hdr.data() + 16, 8);
  std::memcpy(&hsum, hdr.data() + 24, 8);
  if (hseed != seed || hlen != len) return *why = "header of another seed or length", false;
  if (!f.seekg(4096) || !f.read(data.data(), static_cast<std::streamsize>(len))) return *why = "short disk", false;
  uint64_t s = seed, h = 1469598103934665603ull;
  for (uint64_t i = 0; i < len / 8; ++i) {
    uint64_t z = (s += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    z ^= z >> 31;
    if (std::memcmp(&z, data.data() + i * 8, 8) != 0) return *why = "data differs at byte " + std::to_string(4096 + i * 8), false;
  }
  for (char c : data) h = (h ^ static_cast<uint8_t>(c)) * 1099511628211ull;
  if (h != hsum) return *why = "checksum in the header differs", false;
  return true;
}

// virtio-blk WRITES during a pre-copy: the guest writes 24 MiB to its disk (page cache filled by
// the CPU, then written back by DMA from guest RAM, completions into the used ring) while the
// migration runs. The write finishes during the pre-copy or, if it spans the switchover, on the
// destination; either way the disk file holds exactly the written data afterwards and memdirty's
// pages verify on the destination.
TEST_F(MigrationFaultsTest, VirtioBlkWritesDuringAPrecopyReachTheDiskAndTheGuestMoves) {
  const std::string disk = dir_ + "/disk.img";
  ASSERT_EQ(Sh("head -c 33554432 /dev/urandom > " + disk), 0);  // garbage: a lost write shows
  auto args = GuestArgs(kMemdirty + ";blkcheck:mode=write,seed=4242,mib=24");
  args.insert(args.end(), {"--disk", disk});
  auto src = Boot(args, "ferry-guest: ready");
  ASSERT_EQ(src->Console().find("blkcheck written"), std::string::npos) << "the write was over before the migration began";
  const int port = FreePort();
  auto dst = Incoming(port, {"--disk", disk});
  std::string body;
  // A few MiB/s: the pre-copy lasts while the guest writes.
  ASSERT_EQ(src->Api("PUT", "/vm/migrate", "{\"to\":\"tcp:127.0.0.1:" + std::to_string(port) + "\",\"max_bandwidth\":16777216,\"mode\":\"precopy\"}", &body),
            202)
      << body;
  ASSERT_EQ(WaitMigrationStatus(*src, "active", 10s), "active");
  ASSERT_EQ(src->Console().find("blkcheck written"), std::string::npos) << "the write was over before the pre-copy began";
  const size_t dst_from = 0;
  EXPECT_EQ(WaitMigrationStatus(*src, "completed", 120s), "completed") << src->Get("/vm/migration").dump();
  const bool on_source = src->Console().find("blkcheck written") != std::string::npos;
  if (!on_source) {
    EXPECT_TRUE(dst->WaitConsole("blkcheck written", 60s, dst_from)) << "the write never completed: " << dst->Console() << dst->Stderr();
  }
  EXPECT_EQ(src->Console().find("blkcheck FAIL"), std::string::npos) << src->Console();
  EXPECT_EQ(dst->Console().find("blkcheck FAIL"), std::string::npos) << dst->Console();
  const auto st = src->Get("/vm/migration");
  std::printf("blk write completed on the %s; %lu rounds, downtime %.1f ms\n", on_source ? "source, during the pre-copy" : "destination",
              st.value("iterations", 0ul), st.value("downtime_ms", 0.0));
  ASSERT_TRUE(MemverifyOk(*dst, kPages)) << dst->Console();
  EXPECT_EQ(src->Get("/vm")["state"], "migrated");
  EXPECT_EQ(Ferry("shutdown --api-socket " + dst->socket()).rc, 0);
  EXPECT_EQ(dst->Wait(30s), 0) << dst->Stderr();
  std::string why;
  EXPECT_TRUE(DiskHoldsBlkcheckData(disk, 4242, 24u << 20, &why)) << why;
}

// The destination dies after the switchover (pre-copy, migration completed): the source copy is
// migrated for good - it never resumes, an operator's resume is refused - because the destination
// may have run the guest on (its disk, its network); the VM is then lost with the destination's
// host, as with any crash of the host a VM runs on.
TEST_F(MigrationFaultsTest, DestinationKilledAfterTheSwitchoverNeverResumesTheSource) {
  auto src = Boot(GuestArgs(kMemdirty), "memdirty started");
  const int port = FreePort();
  auto dst = Incoming(port);
  CliResult r;
  // --keep-source: the paused, migrated source process stays (by default `ferry migrate` ends it).
  EXPECT_EQ(Migrate(*src, "tcp:127.0.0.1:" + std::to_string(port), &r, "--keep-source"), "");
  ASSERT_EQ(r.rc, 0) << r.out << dst->Stderr();
  ASSERT_TRUE(MemverifyOk(*dst, kPages)) << dst->Console();
  dst->Kill();
  std::this_thread::sleep_for(500ms);  // whatever the source might do after losing the destination, it has time to
  EXPECT_EQ(src->Get("/vm")["state"], "migrated");
  EXPECT_EQ(src->Get("/vm/migration").value("status", ""), "completed");
  std::string body;
  EXPECT_EQ(src->Api("PUT", "/vm/resume", "", &body), 409) << body;
  EXPECT_NE(body.find("can never run again"), std::string::npos) << body;
  EXPECT_EQ(src->Get("/vm")["state"], "migrated");
}

// The same snapshot restored twice: the first copy holds a claim on it, a second --restore is
// refused by name while that copy runs; --restore-clone runs a clone with a new generation id (and
// warns that the guest keeps its MAC); a plain restore keeps the VM's generation id; once the first
// copy has ended, the snapshot can be restored again.
TEST_F(MigrationFaultsTest, TheSameSnapshotRestoredTwiceIsRefusedUnlessCloned) {
  auto orig = Boot(GuestArgs(kMemdirty), "memdirty started");
  const std::string id = orig->Get("/vm").value("generation_id", "");
  ASSERT_EQ(id.size(), 36u) << orig->Get("/vm").dump();
  const std::string snap = dir_ + "/vm.snap";
  ASSERT_EQ(Ferry("snapshot --api-socket " + orig->socket() + " --path " + snap).rc, 0);
  EXPECT_EQ(Ferry("shutdown --api-socket " + orig->socket()).rc, 0);
  EXPECT_EQ(orig->Wait(30s), 0);

  auto first = std::make_unique<VmProcess>(std::vector<std::string>{"--restore", snap}, dir_);
  ASSERT_TRUE(first->Start() && ApiUp(*first)) << first->Stderr();
  EXPECT_EQ(first->Get("/vm").value("generation_id", ""), id) << "a restore continues the same VM";
  // The same snapshot again, through a symlink: refused, naming the running copy.
  ASSERT_EQ(symlink(snap.c_str(), (dir_ + "/link.snap").c_str()), 0);
  for (const std::string& path : {snap, dir_ + "/link.snap"}) {
    VmProcess second({"--restore", path}, dir_);
    (void)second.Start();
    EXPECT_EQ(second.Wait(15s), 1) << second.Stderr();
    EXPECT_NE(second.Stderr().find("already restored and running (ferry-vmm pid " + std::to_string(first->pid())), std::string::npos)
        << second.Stderr();
    EXPECT_NE(second.Stderr().find("--restore-clone"), std::string::npos) << second.Stderr();
  }
  ASSERT_TRUE(MemverifyOk(*first, kPages)) << first->Console();
  {
    VmProcess clone({"--restore-clone", snap}, dir_);
    ASSERT_TRUE(clone.Start() && ApiUp(clone)) << clone.Stderr();
    const std::string clone_id = clone.Get("/vm").value("generation_id", "");
    EXPECT_EQ(clone_id.size(), 36u);
    EXPECT_NE(clone_id, id) << "a clone is a new VM";
    EXPECT_NE(clone.Stderr().find("MAC address"), std::string::npos) << clone.Stderr();
    ASSERT_TRUE(MemverifyOk(clone, kPages)) << clone.Console();
    EXPECT_EQ(Ferry("shutdown --api-socket " + clone.socket()).rc, 0);
    EXPECT_EQ(clone.Wait(30s), 0);
  }
  EXPECT_EQ(first->Get("/vm")["state"], "running") << "the clone disturbed the first copy";
  // The first copy ends (however: here SIGKILL): the claim goes with it.
  first->Kill();
  (void)first->Wait(10s);
  VmProcess again({"--restore", snap}, dir_);
  ASSERT_TRUE(again.Start() && ApiUp(again)) << again.Stderr();
  EXPECT_EQ(again.Get("/vm").value("generation_id", ""), id);
  ASSERT_TRUE(MemverifyOk(again, kPages)) << again.Console();
}

}  // namespace
}  // namespace ferry::test
