// Sockets over real loopback connections: a read's timeout is a deadline for the whole read, and
// a handshake's records share one deadline (a peer trickling bytes cannot stretch either).
#include "migration/transport/tcp.h"

#include <gtest/gtest.h>

#include <atomic>
#include <chrono>
#include <optional>
#include <thread>

#include "common/clock.h"

namespace ferry::migration {
namespace {

struct Pair {
  std::unique_ptr<Socket> client, server;
};
Pair Connect() {
  auto l = std::move(*Listener::Listen(*ParseEndpoint("tcp:127.0.0.1:0")));
  Pair p;
  p.client = std::move(*Socket::Connect(*ParseEndpoint("tcp:127.0.0.1:" + std::to_string(l->port())), 2000));
  p.server = std::move(*l->Accept(2000));
  return p;
}

// Writes `bytes` one byte every `every_ms` from a thread.
class Trickle {
 public:
  Trickle(Socket& s, std::vector<uint8_t> bytes, int every_ms)
      : t_([&s, bytes = std::move(bytes), every_ms, this] {
          for (size_t i = 0; i < bytes.size() && !stop_; ++i) {
            std::this_thread::sleep_for(std::chrono::milliseconds(every_ms));
            if (!s.WriteAll(std::span<const uint8_t>(&bytes[i], 1))) return;
          }
        }) {}
  ~Trickle() {
    stop_ = true;
    t_.join();
  }

 private:
  std::atomic<bool> stop_{false};
  std::thread t_;
};

TEST(Socket, AReadTimeoutBoundsTheWholeReadNotEachByte) {
  Pair p = Connect();
  Trickle trickle(*p.client, std::vector<uint8_t>(16, 7), 60);  // 16 bytes take ~1 s
  std::array<uint8_t, 16> buf;
  const uint64_t t0 = NowNs();
  auto s = p.server->ReadExact(buf, 400);
  const double ms = static_cast<double>(NowNs() - t0) / 1e6;
  ASSERT_FALSE(s) << "a byte every 60 ms kept a 400 ms read alive";
  EXPECT_EQ(s.error().code(), ErrorCode::kTimeout);
  EXPECT_LT(ms, 800);
  EXPECT_GE(ms, 390);
}

TEST(Socket, AHandshakeRecordSharesOneDeadlineForHeaderAndPayload) {
  Pair p = Connect();
  auto rec = EncodeRecord(RecordType::kHello, Encode(Hello{{}, 0, 1, kWirePageSize}));
  // The header arrives at once, the payload a byte every 60 ms: the 500 ms deadline covers both.
  ASSERT_TRUE(p.client->WriteAll(std::span<const uint8_t>(rec.data(), kRecordHeaderSize)));
  Trickle trickle(*p.client, std::vector<uint8_t>(rec.begin() + kRecordHeaderSize, rec.end()), 60);
  const uint64_t t0 = NowNs();
  auto r = ReadRecordUntil(*p.server, t0 + 500'000'000);
  const double ms = static_cast<double>(NowNs() - t0) / 1e6;
  ASSERT_FALSE(r);
  EXPECT_EQ(r.error().code(), ErrorCode::kTimeout);
  EXPECT_LT(ms, 900);
  // A record that arrives in time is read whole.
  Pair q = Connect();
  ASSERT_TRUE(q.client->WriteAll(rec));
  auto ok = ReadRecordUntil(*q.server, NowNs() + 2'000'000'000);
  ASSERT_TRUE(ok) << ok.error().message();
  EXPECT_EQ(ok->type(), RecordType::kHello);
  EXPECT_EQ(MsUntil(NowNs() - 1), 0);
}

// A header may announce up to kMaxRecordPayload: the reader's buffer grows with what arrives, so
// a peer announcing 8 MiB and sending 10 bytes before it hangs up costs kilobytes, not 8 MiB.
TEST(Socket, ARecordsBufferGrowsWithTheBytesThatArriveNotTheAnnouncedLength) {
  Pair p = Connect();
  std::vector<uint8_t> big(kMaxRecordPayload, 0x5a);
  auto rec = EncodeRecord(RecordType::kState, big);
  ASSERT_TRUE(p.client->WriteAll(std::span<const uint8_t>(rec.data(), kRecordHeaderSize + 10)));
  p.client->Shutdown();
  Record r;
  auto s = ReadRecordInto(*p.server, &r, 2000);
  ASSERT_FALSE(s);
  EXPECT_EQ(s.error().code(), ErrorCode::kIo) << s.error().message();
  EXPECT_LE(r.payload.capacity(), 128u << 10) << "8 MiB announced, 10 bytes sent";
  // The whole record, across many reads and buffer growths, arrives intact (CRC checked).
  Pair q = Connect();
  std::thread writer([&] { ASSERT_TRUE(q.client->WriteAll(rec)); });
  auto whole = ReadRecordUntil(*q.server, NowNs() + 10'000'000'000);
  writer.join();
  ASSERT_TRUE(whole) << whole.error().message();
  EXPECT_EQ(whole->payload, big);
}

// Wake() ends an Accept() that waits forever (the destination's wait for its control connection:
// a greeting thread hands the source over without the acceptor polling), one wake per Wake().
TEST(Listener, WakeEndsAWaitingAcceptAtOnce) {
  auto l = std::move(*Listener::Listen(*ParseEndpoint("tcp:127.0.0.1:0")));
  std::atomic<uint64_t> woke_ns{0};
  std::optional<Error> err;
  std::thread t([&] {
    auto s = l->Accept(-1);
    woke_ns = NowNs();
    if (!s) err = s.error();
  });
  std::this_thread::sleep_for(std::chrono::milliseconds(50));
  EXPECT_EQ(woke_ns.load(), 0u) << "Accept(-1) returned without a connection or a wake";
  const uint64_t t0 = NowNs();
  l->Wake();
  t.join();
  ASSERT_TRUE(err.has_value());
  EXPECT_EQ(err->code(), ErrorCode::kTimeout);
  EXPECT_LT(woke_ns - t0, 1'000'000'000u);
  // The wake was used up: the next wait times out on its own, and a connection is still accepted.
  auto again = l->Accept(30);
  ASSERT_FALSE(again);
  EXPECT_EQ(again.error().code(), ErrorCode::kTimeout);
  l->Wake();  // a wake while nobody waits ends the next wait at once
  const uint64_t t1 = NowNs();
  EXPECT_FALSE(l->Accept(5000));
  EXPECT_LT(NowNs() - t1, 1'000'000'000u);
  auto c = Socket::Connect(*ParseEndpoint("tcp:127.0.0.1:" + std::to_string(l->port())), 2000);
  ASSERT_TRUE(c);
  EXPECT_TRUE(l->Accept(2000));
}

}  // namespace
}  // namespace ferry::migration
