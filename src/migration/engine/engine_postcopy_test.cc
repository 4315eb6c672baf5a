// Post-copy end to end over loopback with the engine's test doubles: the destination "guest"
// touches its RAM as soon as it starts (a thread reading every page, last page first, while the
// push runs from the first), so demand faults happen; RAM must end identical to the source's.
#include <gtest/gtest.h>

#include "migration/engine/engine_test_util.h"

namespace ferry::migration {
namespace {
using namespace ferry::migration::test;

class TouchingDestination : public FakeDestination {
 public:
  ~TouchingDestination() override {
    if (toucher_.joinable()) toucher_.join();
  }
  Status Start() override {
    FakeDestination::Start();
    toucher_ = std::thread([this] {
      const uint8_t* ram = mem()->host();
      uint64_t sum = 0;
      for (uint64_t p = kRam / 4096; p-- > 0;) sum += ram[p * 4096 + 17];  // waits for missing pages
      sum_ = sum;
    });
    return {};
  }
  std::atomic<uint64_t> sum_{0};

 private:
  std::thread toucher_;
};

void ExpectPostcopied(SourceMigration& m, FakeSource& src, TouchingDestination& dst, Incoming& in) {
  auto st = m.Stats();
  ASSERT_EQ(m.status(), MigrationStatus::kCompleted) << st.dump(2);
  ASSERT_TRUE(in.result) << in.result.error().message();
  EXPECT_EQ(st["mode"], "postcopy") << st.dump(2);
  EXPECT_GT(st["postcopy_pages"].get<uint64_t>(), 0u) << st.dump(2);
  EXPECT_GT(in.result->postcopy_ms, 0.0);
  EXPECT_EQ(in.result->postcopy_missing, st["postcopy_pages"].get<uint64_t>());
  EXPECT_TRUE(src.paused());
  EXPECT_TRUE(src.migrated());
  EXPECT_TRUE(SameRam(src, dst)) << "destination RAM differs";
}

TEST(MigrationPostcopy, ModePostcopyMovesTheGuestBeforeItsPagesAndEveryPageArrives) {
  FakeSource src;
  src.set_write_delay_us(0);  // many pages dirty after the first pass
  TouchingDestination dst;
  Incoming in(&dst);
  auto p = Params(in.to);
  p.mode = MigrationMode::kPostcopy;
  auto m = SourceMigration::Start(&src, p);
  m->Wait();
  in.thread.join();
  ExpectPostcopied(*m, src, dst, in);
  auto st = m->Stats();
  EXPECT_EQ(st["iterations"].get<int>(), 1) << "one pre-copy pass, then post-copy";
  EXPECT_GT(st["downtime_ms"].get<double>(), 0.0);
  EXPECT_TRUE(st["fault_latency_ms"].contains("p99"));
}

TEST(MigrationPostcopy, AutoSwitchesWhenTheGuestDirtiesFasterThanTheLink) {
  FakeSource src;
  src.set_write_delay_us(0);
  TouchingDestination dst;
  Incoming in(&dst);
  auto p = Params(in.to);
  p.max_bandwidth = 8 << 20;  // 8 MiB/s: ~2,000 pages/s against a writer that dirties far more
  p.compress = *ParseCompressMode("none");
  auto m = SourceMigration::Start(&src, p);
  m->Wait();
  in.thread.join();
  ExpectPostcopied(*m, src, dst, in);
  const nlohmann::json st = m->Stats();
  bool decided = false;
  for (const auto& h : st["history"])
    if (h.value("decision", "") == "postcopy") decided = true;
  EXPECT_TRUE(decided) << st["history"].dump(2);
}

TEST(MigrationPostcopy, OperatorSwitchesARunningPrecopy) {
  FakeSource src;
  TouchingDestination dst;
  Incoming in(&dst);
  auto p = Params(in.to);
  p.max_bandwidth = 2 << 20;  // the first pass takes seconds
  p.compress = *ParseCompressMode("none");
  p.mode = MigrationMode::kPrecopy;
  {
    // Mode precopy refuses the switch.
    auto m = SourceMigration::Start(&src, p);
    while (m->status() == MigrationStatus::kSetup) std::this_thread::sleep_for(std::chrono::milliseconds(5));
    EXPECT_FALSE(m->StartPostcopy());
    ASSERT_TRUE(m->Cancel());
    m->Wait();
    in.thread.join();
  }
  Incoming in2(&dst);
  p.to = in2.to;
  p.mode = MigrationMode::kAuto;
  auto m = SourceMigration::Start(&src, p);
  while (m->status() == MigrationStatus::kSetup) std::this_thread::sleep_for(std::chrono::milliseconds(5));
  std::this_thread::sleep_for(std::chrono::milliseconds(300));
  ASSERT_EQ(m->status(), MigrationStatus::kActive);
  ASSERT_TRUE(m->StartPostcopy());
  EXPECT_FALSE(m->StartPostcopy()) << "asked twice";
  m->Wait();
  in2.thread.join();
  ExpectPostcopied(*m, src, dst, in2);
  EXPECT_GT(m->Stats()["demand_faults"].get<uint64_t>(), 0u) << "the toucher reads pages the push has not reached";
}

TEST(MigrationPostcopy, DestinationWithoutPostcopyKeepsPrecopyOrRefusesModePostcopy) {
  FakeSource src;
  TouchingDestination dst;
  IncomingParams old;
  old.capabilities = kCapsSupported & ~kCapPostcopy;
  {
    Incoming in(&dst, old);
    auto p = Params(in.to);
    p.mode = MigrationMode::kPostcopy;
    auto m = SourceMigration::Start(&src, p);
    m->Wait();
    in.thread.join();
    EXPECT_EQ(m->status(), MigrationStatus::kFailed);
    EXPECT_NE(m->Stats()["error"].get<std::string>().find("cannot do post-copy"), std::string::npos) << m->Stats().dump();
    EXPECT_FALSE(src.paused());
  }
  Incoming in(&dst, old);
  auto m = SourceMigration::Start(&src, Params(in.to));
  m->Wait();
  in.thread.join();
  ASSERT_EQ(m->status(), MigrationStatus::kCompleted) << m->Stats().dump();
  EXPECT_EQ(m->Stats()["mode"], "precopy");
  EXPECT_TRUE(SameRam(src, dst));
}

}  // namespace
}  // namespace ferry::migration
