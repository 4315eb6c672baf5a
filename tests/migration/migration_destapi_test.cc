// The destination's API during an incoming migration, with real ferry-vmm processes: it answers
// from the moment the destination listens (GET /vm "incoming", GET /vm/migration with the phase
// and the pages received so far, growing), refuses what makes no sense yet with 409, survives
// malformed requests, cancels before GO (the source keeps running), refuses cancel once the
// guest runs here, shows post-copy's missing pages and demand faults, answers "completed"
// afterwards on the same socket, and reports a post-copy failure before the process exits.
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

std::vector<std::string> GuestArgs(const std::string& run) {
  return {"--kernel", GuestImage(), "--initrd", GuestInitrd(), "--mem", "256M", "--cmdline", "console=ttyS0 ferry.run=" + run};
}
std::string Memdirty(int rate, int mib) {
  return "memdirty:mib=" + std::to_string(mib) + ",rate=" + std::to_string(rate) + ",bytes=4096,verify=0";
}
std::string To(int port) { return "tcp:127.0.0.1:" + std::to_string(port); }

// Polls the destination's GET /vm/migration until `done(j)` or a final phase; returns every sample.
std::vector<json> Sample(VmProcess& dst, std::chrono::milliseconds timeout, const std::function<bool(const json&)>& done) {
  std::vector<json> out;
  auto end = std::chrono::steady_clock::now() + timeout;
  while (std::chrono::steady_clock::now() < end) {
    auto j = dst.Get("/vm/migration");
    if (j.is_object()) {
      out.push_back(j);
      const std::string ph = j.value("phase", "");
      if (done(j) || ph == "completed" || ph == "failed" || ph == "cancelled") break;
    }
    std::this_thread::sleep_for(10ms);
  }
  return out;
}

class DestinationApiTest : public ::testing::Test {
 protected:
  void SetUp() override {
    struct stat st;
    ASSERT_EQ(stat(GuestImage().c_str(), &st), 0) << "guest image missing: run scripts/setup";
    dir_ = MakeTempDir("migdapi");
  }
  void TearDown() override { RemoveTree(dir_); }
  std::unique_ptr<VmProcess> BootSource(const std::string& run) {
    auto vm = std::make_unique<VmProcess>(GuestArgs(run), dir_);
    EXPECT_TRUE(vm->Start());
    EXPECT_TRUE(vm->WaitConsole("memdirty started", 20s)) << vm->Console() << vm->Stderr();
    return vm;
  }
  std::unique_ptr<VmProcess> Incoming(int port, std::vector<std::string> extra = {}) {
    std::vector<std::string> args{"--incoming", To(port)};
    args.insert(args.end(), extra.begin(), extra.end());
    auto vm = std::make_unique<VmProcess>(args, dir_);
    EXPECT_TRUE(vm->Start());
    for (int i = 0; i < 500; ++i) {
      if (Sh("ss -Hltn 'sport = :" + std::to_string(port) + "' | grep -q LISTEN") == 0) break;
      std::this_thread::sleep_for(10ms);
    }
    return vm;
  }
  std::string dir_;
};

TEST_F(DestinationApiTest, AnswersWhileWaitingAndReceivingRefusesWhatMakesNoSenseAndCompletes) {
  auto src = BootSource(Memdirty(5000, 16));
  const int port = FreePort();
  auto dst = Incoming(port);
  // Waiting: the API is there before any source connected.
  auto vm = dst->Get("/vm");
  ASSERT_TRUE(vm.is_object()) << dst->last_api_error() << dst->Stderr();
  EXPECT_EQ(vm["state"], "incoming") << vm.dump();
  EXPECT_EQ(vm["incoming"]["phase"], "waiting") << vm.dump();
  auto mig = dst->Get("/vm/migration");
  ASSERT_TRUE(mig.is_object()) << dst->last_api_error();
  EXPECT_EQ(mig["role"], "destination");
  EXPECT_EQ(mig["phase"], "waiting");
  EXPECT_EQ(mig["listen"], To(port));
  EXPECT_TRUE(mig["uuid"].is_null());
  // What makes no sense without a VM: a clear 409, never a crash; malformed requests: errors.
  std::string body;
  for (const char* p : {"/vm/pause", "/vm/resume", "/vm/shutdown", "/vm/migration/postcopy"}) {
    EXPECT_EQ(dst->Api("PUT", p, "{}", &body), 409) << p << ": " << body;
    EXPECT_NE(body.find("incoming migration is in progress"), std::string::npos) << p << ": " << body;
  }
  EXPECT_EQ(dst->Api("PUT", "/vm/snapshot", R"({"path":"/tmp/x"})", &body), 409) << body;
  EXPECT_EQ(dst->Api("PUT", "/vm/migrate", "not json at all", &body), 409) << body;
  EXPECT_EQ(dst->Api("GET", "/vm/no-such-thing", "", &body), 404) << body;
  EXPECT_EQ(dst->Api("POST", "/vm/migration", "", &body), 404) << body;
  std::string raw;
  Sh("printf 'BLAH /\\x01\\x02 HTTP/9\\r\\n\\r\\n' | socat -t1 - UNIX-CONNECT:" + dst->socket(), &raw);
  EXPECT_EQ(dst->Get("/vm/migration").value("phase", ""), "waiting") << "the API survives garbage: " << dst->Stderr();

  // Receiving: a rate-limited pre-copy, so the first pass takes a few seconds.
  ASSERT_EQ(src->Api("PUT", "/vm/migrate", R"({"to":")" + To(port) + R"(","mode":"precopy","max_bandwidth":8388608,"compress":"none"})",
                     &body),
            202)
      << body;
  auto samples = Sample(*dst, 60s, [](const json& j) { return j.value("received_pages", 0) > 2000; });
  ASSERT_FALSE(samples.empty());
  uint64_t last = 0;
  int grew = 0, receiving = 0;
  for (const auto& s : samples) {
    if (s["phase"] != "receiving") continue;
    ++receiving;
    EXPECT_FALSE(s["uuid"].is_null()) << s.dump();
    EXPECT_EQ(s["protocol_version"], 2) << s.dump();
    const uint64_t pages = s["received_pages"].get<uint64_t>();
    // The RAM size is known from CONFIG on, which comes before the first page (the handshake
    // that starts "receiving" comes before CONFIG).
    if (pages > 0) { EXPECT_EQ(s["total_ram_bytes"], 256ull << 20) << s.dump(); }
    EXPECT_GE(pages, last);
    if (pages > last) ++grew;
    last = pages;
  }
  EXPECT_GE(receiving, 2) << samples.back().dump();
  EXPECT_GE(grew, 2) << "received_pages should grow while pages arrive: " << samples.back().dump();
  // While receiving: GET /vm still says incoming, commands are still refused, `ferry status` shows it.
  EXPECT_EQ(dst->Get("/vm").value("state", ""), "incoming");
  EXPECT_EQ(dst->Api("PUT", "/vm/pause", "{}", &body), 409) << body;
  EXPECT_EQ(dst->Api("PUT", "/vm/snapshot", "{{{{", &body), 409) << body;
  auto status = Ferry("status --api-socket " + dst->socket());
  EXPECT_EQ(status.rc, 0) << status.out;
  EXPECT_NE(status.out.find("vm: incoming"), std::string::npos) << status.out;
  EXPECT_NE(status.out.find("incoming migration "), std::string::npos) << status.out;
  auto sj = Ferry("status --json --api-socket " + dst->socket());
  ASSERT_TRUE(sj.json.is_object()) << sj.out;
  EXPECT_EQ(sj.json["migration"]["role"], "destination") << sj.out;

  ASSERT_EQ(WaitMigrationStatus(*src, "completed", 120s), "completed") << src->Get("/vm/migration").dump() << dst->Stderr();
  const std::string uuid = src->Get("/vm/migration")["uuid"];
  // Afterwards: the normal API on the same socket, and the incoming result stays readable.
  json fin;
  for (int i = 0; i < 200; ++i) {
    fin = dst->Get("/vm/migration");
    if (fin.value("phase", "") == "completed") break;
    std::this_thread::sleep_for(10ms);
  }
  EXPECT_EQ(fin["phase"], "completed") << fin.dump();
  EXPECT_EQ(fin["uuid"], uuid) << fin.dump();
  EXPECT_GT(fin["received_pages"].get<uint64_t>(), last) << fin.dump();
  EXPECT_GT(fin["received_bytes"].get<uint64_t>(), 16ull << 20) << fin.dump();
  EXPECT_EQ(fin["mode"], "precopy");
  json info;
  for (int i = 0; i < 200; ++i) {
    info = dst->Get("/vm");
    if (info.value("state", "") == "running") break;
    std::this_thread::sleep_for(10ms);
  }
  EXPECT_EQ(info["state"], "running") << info.dump();
  auto c = Ferry("cancel --api-socket " + dst->socket());
  EXPECT_NE(c.rc, 0) << "nothing to cancel once the guest runs here: " << c.out;
  status = Ferry("status --api-socket " + dst->socket());
  EXPECT_NE(status.out.find("vm: running"), std::string::npos) << status.out;
  EXPECT_NE(status.out.find(": completed"), std::string::npos) << status.out;
  ASSERT_TRUE(MemverifyOk(*dst, 16 * 256)) << dst->Console() << dst->Stderr();
  EXPECT_EQ(src->Api("PUT", "/vm/shutdown", "{}"), 200);
  EXPECT_EQ(dst->Api("PUT", "/vm/shutdown", "{}"), 200);
  EXPECT_EQ(dst->Wait(10s), 0);
}

TEST_F(DestinationApiTest, CancelOnTheDestinationBeforeGoLeavesTheSourceRunning) {
  auto src = BootSource(Memdirty(5000, 16));
  const int port = FreePort();
  auto dst = Incoming(port);
  std::string body;
  ASSERT_EQ(src->Api("PUT", "/vm/migrate", R"({"to":")" + To(port) + R"(","mode":"precopy","max_bandwidth":1048576})", &body), 202)
      << body;
  auto samples = Sample(*dst, 30s, [](const json& j) { return j.value("received_pages", 0) > 0; });
  ASSERT_FALSE(samples.empty());
  ASSERT_EQ(samples.back()["phase"], "receiving") << samples.back().dump();
  auto c = Ferry("cancel --api-socket " + dst->socket());
  EXPECT_EQ(c.rc, 0) << c.out;
  EXPECT_EQ(dst->Wait(15s), 1) << dst->Stderr();
  EXPECT_NE(dst->Stderr().find("interrupted by the operator"), std::string::npos) << dst->Stderr();
  EXPECT_EQ(WaitMigrationStatus(*src, "failed", 20s), "failed") << src->Get("/vm/migration").dump();
  EXPECT_EQ(src->Get("/vm")["state"], "running");
  ASSERT_TRUE(MemverifyOk(*src, 16 * 256)) << src->Console();
}

TEST_F(DestinationApiTest, PostcopyShowsMissingPagesAndFaultsAndRefusesCancel) {
  if (geteuid() != 0) GTEST_SKIP() << "needs root (userfaultfd)";
  auto src = BootSource(Memdirty(20000, 32));
  const int port = FreePort();
  auto dst = Incoming(port);
  std::string body;
  // A slow push (8 MiB/s): post-copy runs for seconds while the guest faults on missing pages.
  ASSERT_EQ(src->Api("PUT", "/vm/migrate", R"({"to":")" + To(port) + R"(","mode":"postcopy","max_bandwidth":8388608,"compress":"none"})",
                     &body),
            202)
      << body;
  // A fault counts when the guest takes it, its latency when the page arrived: wait for both (a
  // sample between the two showed demand_faults 1 and no latency yet).
  auto samples = Sample(*dst, 60s, [](const json& j) {
    return j.value("phase", "") == "running-postcopy" && j.value("demand_faults", 0) > 0 && j.contains("fault_latency_ms") &&
           j["fault_latency_ms"].value("max", 0.0) > 0.0;
  });
  ASSERT_FALSE(samples.empty());
  const json& pc = samples.back();
  ASSERT_EQ(pc["phase"], "running-postcopy") << pc.dump() << dst->Stderr();
  EXPECT_EQ(pc["mode"], "postcopy");
  EXPECT_GT(pc["postcopy_pages"].get<uint64_t>(), 1000u) << pc.dump();
  EXPECT_GT(pc["postcopy_remaining_pages"].get<uint64_t>(), 0u) << pc.dump();
  EXPECT_GT(pc["demand_faults"].get<uint64_t>(), 0u) << pc.dump();
  EXPECT_GT(pc["fault_latency_ms"]["p99"].get<double>(), 0.0) << pc.dump();
  EXPECT_GT(pc["postcopy_ms"].get<double>(), 0.0) << pc.dump();
  EXPECT_EQ(dst->Get("/vm").value("state", ""), "incoming");
  // The guest runs here: cancel is refused (409), so is everything that would touch the VM.
  EXPECT_EQ(dst->Api("PUT", "/vm/migration/cancel", "{}", &body), 409) << body;
  EXPECT_NE(body.find("before GO"), std::string::npos) << body;
  EXPECT_EQ(dst->Api("PUT", "/vm/pause", "{}", &body), 409) << body;
  EXPECT_NE(body.find("post-copy"), std::string::npos) << body;
  EXPECT_EQ(dst->Api("PUT", "/vm/shutdown", "{}", &body), 409) << body;
  ASSERT_EQ(WaitMigrationStatus(*src, "completed", 120s), "completed") << src->Get("/vm/migration").dump() << dst->Stderr();
  json fin;
  for (int i = 0; i < 300; ++i) {
    fin = dst->Get("/vm/migration");
    if (fin.value("phase", "") == "completed") break;
    std::this_thread::sleep_for(10ms);
  }
  EXPECT_EQ(fin["phase"], "completed") << fin.dump();
  EXPECT_EQ(fin["postcopy_remaining_pages"], 0) << fin.dump();
  EXPECT_EQ(fin["postcopy_pages"], pc["postcopy_pages"]) << fin.dump();
  EXPECT_GE(fin["demand_faults"].get<uint64_t>(), pc["demand_faults"].get<uint64_t>()) << fin.dump();
  EXPECT_EQ(fin["demand_faults"], src->Get("/vm/migration")["demand_faults"]) << "both sides count the same faults";
  ASSERT_TRUE(MemverifyOk(*dst, 32 * 256)) << dst->Console() << dst->Stderr();
  EXPECT_EQ(src->Api("PUT", "/vm/shutdown", "{}"), 200);
  EXPECT_EQ(dst->Api("PUT", "/vm/shutdown", "{}"), 200);
  EXPECT_EQ(dst->Wait(10s), 0);
}

TEST_F(DestinationApiTest, PostcopyFailureIsReportedBeforeTheDestinationExits) {
  if (geteuid() != 0) GTEST_SKIP() << "needs root (userfaultfd)";
  auto src = BootSource(Memdirty(20000, 32));
  const int port = FreePort();
  auto dst = Incoming(port, {"--recover-timeout-ms", "3000"});  // then it gives up on the source
  std::string body;
  ASSERT_EQ(src->Api("PUT", "/vm/migrate", R"({"to":")" + To(port) + R"(","mode":"postcopy","max_bandwidth":8388608,"compress":"none"})",
                     &body),
            202)
      << body;
  auto samples = Sample(*dst, 60s, [](const json& j) { return j.value("phase", "") == "running-postcopy"; });
  ASSERT_FALSE(samples.empty());
  ASSERT_EQ(samples.back()["phase"], "running-postcopy") << samples.back().dump();
  const json under_way = WaitPostcopyUnderWay(*dst, 30s);
  ExpectPostcopyUnderWay(under_way);
  src->Kill();
  (void)src->Wait(10s);
  // The API reports the failure (and a halted VM) for a while, then the process exits with 3.
  const auto t_kill = std::chrono::steady_clock::now();
  // First it waits for the source to reconnect (postcopy-paused), then it gives up.
  auto paused = Sample(*dst, 10s, [](const json& j) { return j.value("phase", "") == "postcopy-paused"; });
  ASSERT_FALSE(paused.empty());
  EXPECT_EQ(paused.back()["phase"], "postcopy-paused") << paused.back().dump() << dst->Stderr();
  auto after = Sample(*dst, 20s, [](const json&) { return false; });
  std::printf("failure reported %.0f ms after the kill\n",
              std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t_kill).count());
  ASSERT_FALSE(after.empty()) << dst->Stderr();
  EXPECT_EQ(after.back()["phase"], "failed") << after.back().dump() << dst->Stderr();
  EXPECT_FALSE(after.back().value("error", "").empty()) << after.back().dump();
  auto vm = dst->Get("/vm");
  EXPECT_EQ(vm.value("state", ""), "error") << vm.dump();
  EXPECT_EQ(dst->Api("PUT", "/vm/resume", "{}", &body), 409) << body;
  EXPECT_EQ(dst->Wait(30s), 3) << dst->Stderr();
  std::printf("destination exited %.0f ms after the kill\n",
              std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t_kill).count());
  EXPECT_NE(dst->Stderr().find("the guest is stopped"), std::string::npos) << dst->Stderr();
}

}  // namespace
}  // namespace ferry::test
