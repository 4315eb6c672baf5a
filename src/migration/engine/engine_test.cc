// The engine end to end over real loopback sockets, with test doubles for the VMM
// (real memfd GuestMemory + dirty log, a writer thread standing in for the guest).
#include <gtest/gtest.h>

#include "migration/engine/engine_test_util.h"

namespace ferry::migration {
namespace {
using namespace ferry::migration::test;

TEST(MigrationEngine, PreCopyWithConcurrentWritesTransfersEveryPage) {
  FakeSource src;
  FakeDestination dst;
  Incoming in(&dst);
  auto m = SourceMigration::Start(&src, Params(in.to));
  m->Wait();
  in.thread.join();
  auto stats = m->Stats();
  ASSERT_EQ(m->status(), MigrationStatus::kCompleted) << stats.dump(2);
  ASSERT_TRUE(in.result) << in.result.error().message();
  EXPECT_TRUE(src.paused());
  EXPECT_TRUE(src.migrated());
  EXPECT_TRUE(dst.started_);
  ASSERT_EQ(dst.state_.size(), 2u);
  EXPECT_EQ(dst.state_[1].id, "dev:uart0");
  EXPECT_EQ(dst.state_[1].blob.size(), 10000u);
  EXPECT_EQ(std::memcmp(src.mem().host(), dst.mem()->host(), kRam), 0) << "destination RAM differs";
  EXPECT_GE(stats["iterations"].get<int>(), 1);
  EXPECT_GT(stats["zero_pages"].get<uint64_t>(), 0u);
  EXPECT_GT(stats["downtime_ms"].get<double>(), 0.0);
  EXPECT_TRUE(stats.contains("downtime_phases"));
  // Half of RAM is non-zero: the wire carries about that, not the zero half.
  EXPECT_LT(stats["transferred_bytes"].get<uint64_t>(), kRam);
}

// Stop condition from activity: a writer that writes in 300 ms bursts with 150 ms rests. A stop
// at a random moment lands in a rest a third of the time; the watch must pick rests (4 runs of 5
// at least: random stops would pass with probability 0.05), and the pause must begin there.
TEST(MigrationEngine, BurstyWriterIsStoppedInARest) {
  int in_rest = 0;
  std::string log;
  for (int run = 0; run < 5; ++run) {
    FakeSource src;
    src.set_bursts(300, 150);
    // A history of a few bursts; each run starts the migration at another point of the cycle.
    std::this_thread::sleep_for(std::chrono::milliseconds(1000 + 97 * run));
    FakeDestination dst;
    Incoming in(&dst);
    auto m = SourceMigration::Start(&src, Params(in.to));
    m->Wait();
    in.thread.join();
    const auto stats = m->Stats();
    ASSERT_EQ(m->status(), MigrationStatus::kCompleted) << stats.dump(2);
    EXPECT_EQ(std::memcmp(src.mem().host(), dst.mem()->host(), kRam), 0) << "destination RAM differs";
    ASSERT_TRUE(stats["stop"].is_object()) << stats.dump(2);
    EXPECT_GT(stats["predicted_downtime_ms"].get<double>(), 0.0);
    // The pause began in a rest, and not at its very edge (the writer had rested >= 10 ms).
    const bool rest = !src.OnPhaseAt(src.pause_ns()) && !src.OnPhaseAt(src.pause_ns() - 10'000'000);
    in_rest += rest;
    log += fmt::format("run {}: {} ({})\n", run, rest ? "rest" : "burst", stats["stop"]["reason"].get<std::string>());
  }
  EXPECT_GE(in_rest, 4) << log;
}

TEST(MigrationEngine, ConfigMismatchFailsBeforeAnyPageAndSourceKeepsRunning) {
  FakeSource src;
  struct Picky : FakeDestination {
    Result<RamView> Prepare(const nlohmann::json&) override {
      return Errorf(ErrorCode::kInvalidArgument, "destination has no disk for this guest");
    }
  } dst;
  Incoming in(&dst);
  auto m = SourceMigration::Start(&src, Params(in.to));
  m->Wait();
  in.thread.join();
  EXPECT_EQ(m->status(), MigrationStatus::kFailed);
  EXPECT_NE(m->Stats()["error"].get<std::string>().find("no disk for this guest"), std::string::npos) << m->Stats().dump();
  EXPECT_EQ(m->Stats()["normal_pages"].get<uint64_t>(), 0u);
  EXPECT_FALSE(src.paused());
  EXPECT_TRUE(src.writer_running());
  EXPECT_FALSE(in.result);
}

TEST(MigrationEngine, CancelDuringIterationResumesNothingAndStopsDestination) {
  FakeSource src;
  FakeDestination dst;
  Incoming in(&dst);
  auto p = Params(in.to);
  p.max_bandwidth = 2 << 20;  // 2 MiB/s: the first pass takes seconds (uncompressed)
  p.compress.automatic = false;
  auto m = SourceMigration::Start(&src, p);
  for (int i = 0; i < 200 && m->Stats()["normal_pages"].get<uint64_t>() == 0; ++i)
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  EXPECT_EQ(m->status(), MigrationStatus::kActive);
  ASSERT_TRUE(m->Cancel());
  m->Wait();
  in.thread.join();
  EXPECT_EQ(m->status(), MigrationStatus::kCancelled);
  EXPECT_FALSE(src.paused());
  EXPECT_TRUE(src.writer_running());
  ASSERT_FALSE(in.result);
  EXPECT_FALSE(dst.started_);
  EXPECT_FALSE(m->Cancel()) << "a finished migration cannot be cancelled again";
}

TEST(MigrationEngine, RateLimitIsHonoured) {
  FakeSource src;
  src.set_write_delay_us(2000);
  FakeDestination dst;
  Incoming in(&dst);
  auto p = Params(in.to);
  p.max_bandwidth = 8 << 20;  // ~8.5 MiB of non-zero data -> about a second
  p.compress.automatic = false;  // the cap is on the wire: keep the bytes as they are
  auto t0 = std::chrono::steady_clock::now();
  auto m = SourceMigration::Start(&src, p);
  m->Wait();
  double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  ASSERT_EQ(m->status(), MigrationStatus::kCompleted) << m->Stats().dump();
  const double bytes = static_cast<double>(m->Stats()["transferred_bytes"].get<uint64_t>());
  EXPECT_GE(s, bytes / (8 << 20) * 0.8) << "faster than the configured cap";
}

TEST(MigrationEngine, NonConvergencePolicies) {
  for (auto policy : {ConvergePolicy::kFail, ConvergePolicy::kForce}) {
    FakeSource src;
    src.set_write_delay_us(0);  // dirties far faster than 1 MiB/s can carry
    FakeDestination dst;
    Incoming in(&dst);
    auto p = Params(in.to);
    p.max_bandwidth = 16 << 20;
    p.downtime_ms = 1;
    p.stall_rounds = 2;
    p.policy = policy;
    p.mode = MigrationMode::kPrecopy;  // converge_policy is mode precopy's (auto would switch to post-copy)
    p.throttle = false;                // and without throttling it decides alone
    auto m = SourceMigration::Start(&src, p);
    m->Wait();
    in.thread.join();
    auto st = m->Stats();
    EXPECT_FALSE(st["converged"].get<bool>()) << st.dump();
    if (policy == ConvergePolicy::kFail) {
      EXPECT_EQ(m->status(), MigrationStatus::kFailed);
      EXPECT_NE(st["error"].get<std::string>().find("not converging"), std::string::npos) << st.dump();
      EXPECT_FALSE(src.paused());
    } else {
      EXPECT_EQ(m->status(), MigrationStatus::kCompleted) << st.dump();
      EXPECT_EQ(std::memcmp(src.mem().host(), dst.mem()->host(), kRam), 0);
    }
  }
}

// A destination that accepts everything and then drops every connection mid-stream.
TEST(MigrationEngine, CutConnectionMidTransferLeavesSourceRunning) {
  FakeSource src;
  auto listener = std::move(*Listener::Listen(*ParseEndpoint("tcp:127.0.0.1:0")));
  std::thread fake([&] {
    auto ctl = std::move(*listener->Accept(5000));
    (void)ReadPreamble(*ctl, 5000);
    auto hello = DecodeHello(ReadRecord(*ctl, 5000)->payload);
    (void)WriteRecord(*ctl, RecordType::kHelloAck, Encode(HelloAck{hello->uuid, 0}));
    std::vector<std::unique_ptr<Socket>> data;
    for (uint32_t i = 0; i < hello->channels; ++i) data.push_back(std::move(*listener->Accept(5000)));
    (void)ReadRecord(*ctl, 5000);  // CONFIG
    (void)WriteRecord(*ctl, RecordType::kConfigAck, {});
    (void)ReadPreamble(*data[0], 5000);
    (void)ReadRecord(*data[0], 5000);  // DATA_HELLO
    (void)ReadRecord(*data[0], 5000);  // one PAGES record, then the link is cut
    for (auto& d : data) d->Shutdown();
    ctl->Shutdown();
  });
  auto p = Params(fmt::format("tcp:127.0.0.1:{}", listener->port()));
  p.max_bandwidth = 4 << 20;
  auto m = SourceMigration::Start(&src, p);
  m->Wait();
  fake.join();
  EXPECT_EQ(m->status(), MigrationStatus::kFailed) << m->Stats().dump();
  EXPECT_FALSE(src.paused());
  EXPECT_TRUE(src.writer_running());
}

TEST(MigrationEngine, DestinationRejectsStrangersWithoutDisturbingTheMigration) {
  FakeSource src;
  src.set_write_delay_us(1000);
  FakeDestination dst;
  Incoming in(&dst);
  // A stranger connects first and sends garbage; then a data connection with a wrong uuid.
  {
    auto ep = *ParseEndpoint(in.to);
    auto s = std::move(*Socket::Connect(ep, 2000));
    const char junk[] = "GET / HTTP/1.1\r\nHost: x\r\n\r\n";
    ASSERT_TRUE(s->WriteAll(std::span<const uint8_t>(reinterpret_cast<const uint8_t*>(junk), sizeof junk)));
    auto r = ReadRecord(*s, 5000);
    ASSERT_TRUE(r) << r.error().message();
    EXPECT_EQ(r->type(), RecordType::kError);
  }
  auto m = SourceMigration::Start(&src, Params(in.to));
  m->Wait();
  in.thread.join();
  ASSERT_EQ(m->status(), MigrationStatus::kCompleted) << m->Stats().dump();
  EXPECT_EQ(std::memcmp(src.mem().host(), dst.mem()->host(), kRam), 0);
}

TEST(MigrationEngine, ParseSourceParams) {
  EXPECT_TRUE(ParseSourceParams({{"to", "tcp:127.0.0.1:4444"}}));
  auto p = ParseSourceParams({{"to", "tcp:h:1"}, {"channels", 8}, {"downtime_ms", 20}, {"max_bandwidth", 1000000},
                              {"converge_policy", "fail"}, {"stall_timeout_ms", 2500}});
  ASSERT_TRUE(p) << p.error().message();
  EXPECT_EQ(p->channels, 8u);
  EXPECT_EQ(p->policy, ConvergePolicy::kFail);
  EXPECT_EQ(p->stall_timeout_ms, 2500);
  EXPECT_EQ(ParseSourceParams({{"to", "tcp:h:1"}})->stall_timeout_ms, 10000);
  for (auto bad : {nlohmann::json::object(), nlohmann::json{{"to", "h:1"}}, nlohmann::json{{"to", "tcp:h:99999"}},
                   nlohmann::json{{"to", "tcp:h:1"}, {"channels", 0}}, nlohmann::json{{"to", "tcp:h:1"}, {"channels", 17}},
                   nlohmann::json{{"to", "tcp:h:1"}, {"channels", "4"}}, nlohmann::json{{"to", "tcp:h:1"}, {"bogus", 1}},
                   nlohmann::json{{"to", "tcp:h:1"}, {"converge_policy", "maybe"}},
                   nlohmann::json{{"to", "tcp:h:1"}, {"max_bandwidth", -5}}, nlohmann::json{{"to", "tcp:h:1"}, {"stall_timeout_ms", 999}},
                   nlohmann::json{{"to", "tcp:h:1"}, {"stall_timeout_ms", 600001}}, nlohmann::json::array()}) {
    EXPECT_FALSE(ParseSourceParams(bad)) << bad.dump();
  }
}

}  // namespace
}  // namespace ferry::migration

namespace ferry::migration {
namespace {
using namespace ferry::migration::test;

TEST(MigrationEngine, PrecopyConvergesByThrottlingOnlyAsMuchAsNeeded) {
  FakeSource src;
  src.set_write_delay_us(200);  // ~5,000 writes/s over 4,096 pages: more than 8 MiB/s (2,048 pages/s) carries
  FakeDestination dst;
  Incoming in(&dst);
  auto p = Params(in.to);
  p.mode = MigrationMode::kPrecopy;
  p.max_bandwidth = 8 << 20;
  p.compress = *ParseCompressMode("none");
  auto m = SourceMigration::Start(&src, p);
  m->Wait();
  in.thread.join();
  const nlohmann::json st = m->Stats();
  ASSERT_EQ(m->status(), MigrationStatus::kCompleted) << st.dump(2);
  EXPECT_EQ(st["mode"], "precopy");
  EXPECT_TRUE(st["converged"].get<bool>()) << st.dump(2);
  EXPECT_GT(st["throttle_max_pct"].get<double>(), 0.0) << "the guest outran the link: it had to be slowed";
  EXPECT_LT(st["throttle_max_pct"].get<double>(), 80.0) << "slowed more than the floor allows";
  EXPECT_EQ(src.cpu_share(), 1.0) << "full speed again at the pause";
  EXPECT_TRUE(SameRam(src, dst));
}

}  // namespace
}  // namespace ferry::migration
