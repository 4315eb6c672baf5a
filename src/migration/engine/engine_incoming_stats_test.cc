// The destination's progress and cancel over loopback with the engine's test doubles:
// Stats() answers while waiting and while pages arrive (and grows), ends with the final figures;
// Cancel() works before GO and is refused once the guest started.
#include <gtest/gtest.h>

#include "migration/engine/engine_test_util.h"

namespace ferry::migration {
namespace {
using namespace ferry::migration::test;
using namespace std::chrono_literals;

TEST(IncomingProgress, WaitingThenCancelledByTheOperator) {
  FakeDestination dst;
  auto in = std::move(*IncomingMigration::Listen("tcp:127.0.0.1:0"));
  auto st = in->Stats();
  EXPECT_EQ(st.phase, IncomingPhase::kWaiting);
  EXPECT_EQ(st.listen, "tcp:127.0.0.1:0");
  EXPECT_EQ(st.received_pages, 0u);
  Result<IncomingResult> r = std::unexpected(Error(ErrorCode::kInternal, "not run"));
  std::thread t([&] { r = in->Run(&dst); });
  std::this_thread::sleep_for(50ms);
  EXPECT_EQ(in->phase(), IncomingPhase::kWaiting);
  ASSERT_TRUE(in->Cancel());
  t.join();
  ASSERT_FALSE(r);
  EXPECT_EQ(r.error().code(), ErrorCode::kCancelled) << r.error().message();
  st = in->Stats();
  EXPECT_EQ(st.phase, IncomingPhase::kCancelled);
  EXPECT_NE(st.error.find("interrupted by the operator"), std::string::npos) << st.error;
  auto again = in->Cancel();
  ASSERT_FALSE(again);
  EXPECT_EQ(again.error().code(), ErrorCode::kBusy);
}

TEST(IncomingProgress, GrowsDuringAPrecopyAndEndsWithTheFinalFigures) {
  FakeSource src;
  FakeDestination dst;
  Incoming in(&dst);
  auto p = Params(in.to);
  p.max_bandwidth = 16 << 20;  // the first pass takes a while: several samples see it grow
  p.compress.automatic = false;
  p.mode = MigrationMode::kPrecopy;  // (auto would switch to post-copy at this rate)
  std::vector<IncomingProgress> samples;
  auto m = SourceMigration::Start(&src, p);
  while (!IsFinal(in.in->phase())) {
    samples.push_back(in.in->Stats());
    std::this_thread::sleep_for(20ms);
  }
  m->Wait();
  in.thread.join();
  ASSERT_TRUE(in.result) << in.result.error().message();
  ASSERT_EQ(m->status(), MigrationStatus::kCompleted);
  // Receiving was seen with pages growing, never shrinking, and an identity.
  uint64_t last = 0, grew = 0;
  for (const auto& s : samples) {
    if (s.phase != IncomingPhase::kReceiving) continue;
    EXPECT_EQ(s.uuid, in.result->uuid);
    EXPECT_EQ(s.protocol_version, kProtocolVersion);
    EXPECT_EQ(s.channels, 3u);
    EXPECT_GE(s.received_pages, last);
    if (s.received_pages > last) ++grew;
    last = s.received_pages;
  }
  EXPECT_GE(grew, 2u) << "expected several samples with pages arriving";
  const auto fin = in.in->Stats();
  EXPECT_EQ(fin.phase, IncomingPhase::kCompleted);
  EXPECT_EQ(fin.received_pages, in.result->pages);
  EXPECT_EQ(fin.received_records, in.result->batches);
  EXPECT_EQ(fin.received_bytes, in.result->bytes);
  EXPECT_EQ(fin.zero_pages + fin.raw_pages + fin.delta_pages + fin.free_pages, in.result->zero_pages + in.result->raw_pages +
                                                                                     in.result->delta_pages + in.result->free_pages);
  EXPECT_EQ(fin.ram_bytes, kRam);
  EXPECT_FALSE(fin.postcopy);
  EXPECT_GT(fin.total_ms, 0.0);
  // Final: the figures no longer move.
  std::this_thread::sleep_for(30ms);
  EXPECT_DOUBLE_EQ(in.in->Stats().total_ms, fin.total_ms);
  auto c = in.in->Cancel();
  ASSERT_FALSE(c);
  EXPECT_EQ(c.error().code(), ErrorCode::kBusy);
}

TEST(IncomingProgress, CancelDuringReceivingFailsTheSourceWhichKeepsRunning) {
  FakeSource src;
  FakeDestination dst;
  Incoming in(&dst);
  auto p = Params(in.to);
  p.max_bandwidth = 2 << 20;
  p.compress.automatic = false;
  auto m = SourceMigration::Start(&src, p);
  for (int i = 0; i < 500 && in.in->Stats().received_pages == 0; ++i) std::this_thread::sleep_for(10ms);
  ASSERT_EQ(in.in->phase(), IncomingPhase::kReceiving);
  ASSERT_TRUE(in.in->Cancel());
  m->Wait();
  in.thread.join();
  EXPECT_EQ(in.in->phase(), IncomingPhase::kCancelled);
  EXPECT_FALSE(in.result);
  EXPECT_EQ(m->status(), MigrationStatus::kFailed);
  EXPECT_NE(m->Stats().value("error", "").find("interrupted by the operator"), std::string::npos) << m->Stats().dump();
  EXPECT_FALSE(src.paused());
  EXPECT_TRUE(src.writer_running());
  EXPECT_FALSE(dst.started_);
}


TEST(IncomingProgress, PostcopyReportsMissingPagesAndFaults) {
  FakeSource src;
  src.set_write_delay_us(0);
  TouchingDestination dst;
  Incoming in(&dst);
  auto p = Params(in.to);
  p.mode = MigrationMode::kPostcopy;
  p.max_bandwidth = 8 << 20;  // a slow push: post-copy lasts long enough to be sampled
  p.compress.automatic = false;
  std::vector<IncomingProgress> samples;
  auto m = SourceMigration::Start(&src, p);
  while (!IsFinal(in.in->phase())) {
    samples.push_back(in.in->Stats());
    std::this_thread::sleep_for(5ms);
  }
  m->Wait();
  in.thread.join();
  ASSERT_TRUE(in.result) << in.result.error().message();
  int running = 0;
  for (const auto& s : samples) {
    if (s.phase != IncomingPhase::kPostcopy) continue;
    ++running;
    EXPECT_TRUE(s.postcopy);
    EXPECT_EQ(s.postcopy_pages, in.result->postcopy_missing);
    EXPECT_LE(s.postcopy_remaining_pages, s.postcopy_pages);
    EXPECT_GT(s.postcopy_ms, 0.0);
  }
  EXPECT_GT(running, 0) << "post-copy was never observed";
  const auto fin = in.in->Stats();
  EXPECT_EQ(fin.phase, IncomingPhase::kCompleted);
  EXPECT_TRUE(fin.postcopy);
  EXPECT_GT(fin.postcopy_pages, 0u);
  EXPECT_EQ(fin.postcopy_remaining_pages, 0u);
  EXPECT_DOUBLE_EQ(fin.postcopy_ms, in.result->postcopy_ms);
  EXPECT_EQ(fin.faults.demand_faults, in.result->faults.demand_faults);
  EXPECT_GT(fin.faults.demand_faults, 0u);
  EXPECT_GT(fin.faults.p99_us, 0u);
  EXPECT_TRUE(SameRam(src, dst));
}

// A destination that tries to cancel from inside Start(): GO was handled, so it must be refused.
class CancellingDestination : public FakeDestination {
 public:
  IncomingMigration* in = nullptr;
  Status cancel = Status{};
  IncomingPhase phase_at_start = IncomingPhase::kWaiting;
  Status Start() override {
    phase_at_start = in->phase();
    cancel = in->Cancel();
    return FakeDestination::Start();
  }
};

TEST(IncomingProgress, CancelIsRefusedOnceTheGuestStarted) {
  FakeSource src;
  CancellingDestination dst;
  Incoming in(&dst);
  dst.in = in.in.get();
  auto m = SourceMigration::Start(&src, Params(in.to));
  m->Wait();
  in.thread.join();
  ASSERT_TRUE(in.result) << in.result.error().message();
  EXPECT_EQ(m->status(), MigrationStatus::kCompleted);
  EXPECT_EQ(dst.phase_at_start, IncomingPhase::kRestoring);
  ASSERT_FALSE(dst.cancel);
  EXPECT_EQ(dst.cancel.error().code(), ErrorCode::kBusy);
  EXPECT_NE(dst.cancel.error().message().find("before GO"), std::string::npos) << dst.cancel.error().message();
  EXPECT_TRUE(SameRam(src, dst));
}

}  // namespace
}  // namespace ferry::migration
