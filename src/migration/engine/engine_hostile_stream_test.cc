// A source that breaks the protocol's rules, spoken record by record over real loopback sockets
// to a real IncomingMigration: the destination refuses each form by name and never lets it touch
// the guest (STATE records beyond their bound, page records after END's count was met), and
// silent or trickling peers on its port hold up no source.
#include <gtest/gtest.h>

#include <chrono>
#include <cstring>
#include <thread>

#include "migration/engine/engine_test_util.h"
#include "migration/protocol/pages.h"

namespace ferry::migration {
namespace {
using namespace ferry::migration::test;

// A protocol v1 source by hand: control connection, one data channel, CONFIG accepted.
class RawSource {
 public:
  explicit RawSource(const std::string& to) {
    const auto ep = *ParseEndpoint(to);
    ctl_ = std::move(*Socket::Connect(ep, 2000));
    const auto pre = EncodePreamble(Role::kControl, 1);
    EXPECT_TRUE(ctl_->WriteAll(pre));
    Send(*ctl_, RecordType::kHello, Encode(Hello{uuid_, 0, 1, kWirePageSize}));
    auto ack = ReadRecord(*ctl_, 5000);
    EXPECT_TRUE(ack && ack->type() == RecordType::kHelloAck);
    data_ = std::move(*Socket::Connect(ep, 2000));
    const auto dpre = EncodePreamble(Role::kData, 1);
    EXPECT_TRUE(data_->WriteAll(dpre));
    Send(*data_, RecordType::kDataHello, Encode(DataHello{uuid_, 0}));
    Send(*ctl_, RecordType::kConfig, EncodeConfig({{"ram", kRam}}));
    auto cack = ReadRecord(*ctl_, 5000);
    EXPECT_TRUE(cack && cack->type() == RecordType::kConfigAck) << (cack ? std::string(RecordTypeName(cack->type())) : cack.error().message());
  }
  static void Send(Socket& s, RecordType t, std::span<const uint8_t> payload) {
    EXPECT_TRUE(s.WriteAll(EncodeRecord(t, payload)));
  }
  // One PAGES record: page gfn filled with `byte`.
  void SendPage(uint64_t seq, uint64_t gfn, uint8_t byte) {
    std::vector<uint8_t> page(kWirePageSize, byte);
    PagesBuilder b;
    b.Reset(seq);
    b.AddRaw(gfn, page.data());
    EXPECT_TRUE(data_->WriteAll(b.Finish()));
  }
  Socket& ctl() { return *ctl_; }

 private:
  const Uuid uuid_{9, 8, 7, 6, 5, 4, 3, 2, 1, 0, 1, 2, 3, 4, 5, 6};
  std::unique_ptr<Socket> ctl_, data_;
};

uint8_t PageByte(FakeDestination& dst, uint64_t gfn) { return dst.mem()->host()[gfn * kWirePageSize]; }

TEST(HostileStream, APageRecordAfterEndsCountIsNeverApplied) {
  FakeDestination dst;
  Incoming in(&dst);
  RawSource src(in.to);
  src.SendPage(1, 5, 0x11);
  RawSource::Send(src.ctl(), RecordType::kEnd, Encode(End{1, 1}));
  auto ready = ReadRecord(src.ctl(), 5000);
  ASSERT_TRUE(ready) << ready.error().message();
  ASSERT_EQ(ready->type(), RecordType::kReady) << RecordTypeName(ready->type());
  // The state is restored and GO is next: a page record now would change the guest's RAM under
  // its restored state (and, a moment later, under the running guest).
  src.SendPage(2, 5, 0x22);
  std::this_thread::sleep_for(std::chrono::milliseconds(200));
  EXPECT_EQ(PageByte(dst, 5), 0x11) << "a page record after END was applied";
  (void)src.ctl().WriteAll(EncodeRecord(RecordType::kGo, {}));
  in.thread.join();
  // The migration fails by name before the guest starts: this source breaks the protocol.
  ASSERT_FALSE(in.result);
  EXPECT_NE(in.result.error().message().find("PAGES after END"), std::string::npos) << in.result.error().message();
  EXPECT_FALSE(dst.started_);
  EXPECT_EQ(PageByte(dst, 5), 0x11);
}

TEST(HostileStream, StateRecordsBeyondTheirBoundAreRefused) {
  FakeDestination dst;
  Incoming in(&dst);
  RawSource src(in.to);
  const std::vector<uint8_t> blob(16, 1);
  // One more record than allowed (each small): a flood that used to queue without limit.
  for (size_t i = 0; i <= kMaxStateRecords; ++i)
    if (!src.ctl().WriteAll(EncodeRecord(RecordType::kState, Encode(StateRecord{"dev:" + std::to_string(i), blob})))) break;
  auto err = ReadRecord(src.ctl(), 5000);
  const bool refused = err && err->type() == RecordType::kError;
  EXPECT_TRUE(refused) << "the destination kept queueing STATE records";
  if (!refused) (void)in.in->Cancel();  // a destination without the bound waits for ever
  in.thread.join();
  ASSERT_FALSE(in.result);
  EXPECT_NE(in.result.error().message().find("STATE records exceed the limit"), std::string::npos) << in.result.error().message();
  EXPECT_FALSE(dst.started_);
}

// Peers that connect and say nothing, or trickle a preamble a byte at a time, hold up no source:
// each connection is greeted on its own, under one deadline, and past the bound the oldest silent
// one makes room.
TEST(HostileStream, SilentAndTricklingPeersHoldUpNoSource) {
  FakeSource src;
  FakeDestination dst;
  Incoming in(&dst);
  const auto ep = *ParseEndpoint(in.to);
  std::vector<std::unique_ptr<Socket>> peers;
  const auto pre = EncodePreamble(Role::kControl);
  for (int i = 0; i < 40; ++i) {  // more than the destination reads at once
    auto s = Socket::Connect(ep, 2000);
    ASSERT_TRUE(s) << s.error().message();
    if (i % 2) {
      ASSERT_TRUE((*s)->WriteAll(std::span<const uint8_t>(pre.data(), 3)));  // a preamble's start, then nothing
    }
    peers.push_back(std::move(*s));
  }
  std::atomic<bool> stop{false};
  std::thread trickler([&] {  // and one that sends junk a byte at a time
    auto s = Socket::Connect(ep, 2000);
    if (!s) return;
    const uint8_t junk = 'x';
    while (!stop && (*s)->WriteAll(std::span<const uint8_t>(&junk, 1))) std::this_thread::sleep_for(std::chrono::milliseconds(50));
  });
  const auto t0 = std::chrono::steady_clock::now();
  auto m = SourceMigration::Start(&src, Params(in.to));
  m->Wait();
  in.thread.join();
  const double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  stop = true;
  trickler.join();
  ASSERT_EQ(m->status(), MigrationStatus::kCompleted) << m->Stats().dump();
  EXPECT_TRUE(SameRam(src, dst));
  EXPECT_LT(secs, 8.0) << "the source waited behind the silent peers (handshake timeout 10 s)";
}

}  // namespace
}  // namespace ferry::migration
