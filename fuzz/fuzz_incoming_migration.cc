// libFuzzer target: the destination of a live migration end to end. A real IncomingMigration
// listens on a loopback port and runs against the engine tests' destination double
// (FakeDestination, engine_test_util.h: 16 MiB of memfd RAM, CONFIG {"ram": 16 MiB}); a feeder
// thread plays the source with fuzzed bytes: it connects the control connection and writes the
// control bytes (preamble, HELLO, CONFIG, STATE..., END, GO, as the fuzzer made them), and once a
// HELLO_ACK came back it connects one data connection per data segment and writes its bytes
// (preamble, DATA_HELLO, page records). The control connection is half-closed after its bytes, so
// the destination sees the end of what the source had to say; the data connections stay open
// until the destination closes the control connection (a source never ends them early). Post-copy is not offered (the
// destination would register RAM with userfaultfd; its page placement has its own tests).
// Short deadlines (handshake 100 ms, idle 25 ms) keep a stalled input short.
// Input: [u8 flags][u16 control length][control bytes] then up to 4 x {[u16 length][data bytes]}.
//   flags bit 0: the destination speaks at most protocol v1.
// A control connection that is not accepted (no HELLO_ACK) leaves a real destination listening
// for the next source: the feeder then ends it with Abort() (phase cancelled).
// Properties besides "no crash, no sanitizer report":
//  - it never hangs: Run() returns within 5 s (its deadlines are 100 ms and less);
//  - it never applies a page after GO: guest RAM is made read-only when the guest starts (a write
//    faults), and the number of pages applied does not change after it;
//  - it ends completed (the guest was started) or failed/cancelled with a named error (not
//    kInternal, a message), never with the guest started and a failure in pre-copy.
#include <arpa/inet.h>
#include <netinet/in.h>
#include <poll.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <unistd.h>

#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <span>
#include <thread>
#include <vector>

#include <spdlog/spdlog.h>

#include "common/clock.h"
#include "migration/engine/engine_test_util.h"

using namespace ferry;
using namespace ferry::migration;

namespace {

constexpr int kDeadlineMs = 100;  // handshakes, and the feeder's own waits
constexpr int kIdleMs = 25;       // the control loop's silence bound: an input whose END count is never met costs this
constexpr size_t kMaxData = 4;

void Check(bool ok, const char* what) {
  if (!ok) {
    std::fprintf(stderr, "fuzz_incoming_migration: property violated: %s\n", what);
    std::abort();
  }
}

// The destination double, watching GO: from Start() on RAM is read-only and the applied-page
// count is recorded.
class WatchedDestination : public test::FakeDestination {
 public:
  explicit WatchedDestination(const IncomingMigration* in) : in_(in) {}
  Status Start() override {
    pages_at_go_ = in_->Stats().received_pages;
    if (mem() && mprotect(mem()->host(), mem()->size(), PROT_READ) != 0) std::abort();
    return FakeDestination::Start();
  }
  uint64_t pages_at_go_ = 0;

 private:
  const IncomingMigration* in_;
};

int Connect(uint16_t port) {
  const int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (fd < 0) return -1;
  sockaddr_in a{};
  a.sin_family = AF_INET;
  a.sin_port = htons(port);
  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  if (connect(fd, reinterpret_cast<sockaddr*>(&a), sizeof a) != 0) {
    close(fd);
    return -1;
  }
  return fd;
}

// Writes everything (bounded: a destination that stopped reading gets the rest dropped), then
// half-closes if asked.
void Send(int fd, std::span<const uint8_t> b, bool half_close) {
  while (!b.empty()) {
    const ssize_t n = send(fd, b.data(), b.size(), MSG_DONTWAIT | MSG_NOSIGNAL);
    if (n > 0) {
      b = b.subspan(static_cast<size_t>(n));
      continue;
    }
    if (n < 0 && errno != EAGAIN && errno != EINTR) break;
    pollfd p{fd, POLLOUT, 0};
    if (poll(&p, 1, 2 * kDeadlineMs) <= 0) break;
  }
  if (half_close) shutdown(fd, SHUT_WR);
}

void CloseHard(int fd) {
  linger l{1, 0};  // reset: no TIME_WAIT left behind per input
  setsockopt(fd, SOL_SOCKET, SO_LINGER, &l, sizeof l);
  close(fd);
}

// Reads the destination's first record (HELLO_ACK or ERROR) into `got`, until it closes or `ms`
// pass. While nothing comes, a connection is opened and reset every millisecond: the destination
// looks for an accepted source between accepts that wait up to 20 ms (AcceptControl), and a new
// connection ends that wait at once (it is greeted and dropped like any stray connection).
void AwaitReply(int fd, uint16_t port, int ms, std::vector<uint8_t>* got) {
  uint8_t buf[4096];
  const uint64_t deadline = NowNs() + static_cast<uint64_t>(ms) * 1'000'000;
  for (;;) {
    if (NowNs() >= deadline) return;
    pollfd p{fd, POLLIN, 0};
    const int r = poll(&p, 1, 1);
    if (r < 0) return;
    if (r == 0) {
      if (const int nudge = Connect(port); nudge >= 0) CloseHard(nudge);
      continue;
    }
    const ssize_t n = recv(fd, buf, sizeof buf, 0);
    if (n <= 0) return;
    got->insert(got->end(), buf, buf + n);
    if (got->size() >= kRecordHeaderSize) return;  // the first record (HELLO_ACK or ERROR) is there
  }
}

struct Input {
  uint8_t flags = 0;
  std::span<const uint8_t> control;
  std::vector<std::span<const uint8_t>> data;
};

bool Parse(std::span<const uint8_t> d, Input* in) {
  auto take = [&](std::span<const uint8_t>* out) {
    if (d.size() < 2) return false;
    const size_t n = std::min<size_t>(d[0] | d[1] << 8, d.size() - 2);
    *out = d.subspan(2, n);
    d = d.subspan(2 + n);
    return true;
  };
  if (d.empty()) return false;
  in->flags = d[0];
  d = d.subspan(1);
  if (!take(&in->control)) return false;
  std::span<const uint8_t> seg;
  while (in->data.size() < kMaxData && take(&seg)) in->data.push_back(seg);
  return true;
}

}  // namespace

extern "C" int LLVMFuzzerInitialize(int*, char***) {
  // FERRY_FUZZ_LOG=1 shows the destination's log (to see how far an input gets).
  spdlog::set_level(std::getenv("FERRY_FUZZ_LOG") ? spdlog::level::info : spdlog::level::off);
  return 0;
}

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  Input input;
  if (!Parse({data, size}, &input)) return 0;
  auto listen = IncomingMigration::Listen("tcp:127.0.0.1:0");
  if (!listen) std::abort();  // loopback must always listen
  IncomingMigration& in = **listen;
  const uint16_t port = in.port();
  IncomingParams params;
  params.handshake_timeout_ms = kDeadlineMs;
  params.idle_timeout_ms = kIdleMs;
  params.capabilities = kCapsSupported & ~kCapPostcopy;
  if (input.flags & 1) params.max_protocol_version = 1;

  std::thread source([&] {
    const int ctl = Connect(port);
    if (ctl < 0) return;
    Send(ctl, input.control, true);
    std::vector<uint8_t> reply;
    AwaitReply(ctl, port, 2 * kDeadlineMs, &reply);
    std::vector<int> conns;
    auto hdr = DecodeRecordHeader(std::span<const uint8_t>(reply).first(std::min(reply.size(), kRecordHeaderSize)));
    if (!hdr || hdr->type != static_cast<uint16_t>(RecordType::kHelloAck)) {
      in.Abort();  // no source was accepted: a destination keeps listening for one; the fuzzer ends it here
    } else {
      for (auto seg : input.data) {
        const int fd = Connect(port);
        if (fd < 0) break;
        Send(fd, seg, false);  // a data connection that ends early fails the migration: it stays open
        conns.push_back(fd);
      }
    }
    // Until the destination ends the migration (it closes the control connection).
    for (;;) {
      pollfd p{ctl, POLLIN, 0};
      if (poll(&p, 1, 10 * kDeadlineMs) <= 0) break;
      uint8_t buf[4096];
      if (recv(ctl, buf, sizeof buf, 0) <= 0) break;
    }
    for (int fd : conns) CloseHard(fd);
    CloseHard(ctl);
  });

  WatchedDestination vm(&in);
  const uint64_t t0 = NowNs();
  auto result = in.Run(&vm, params);
  const uint64_t took_ms = (NowNs() - t0) / 1'000'000;
  source.join();

  if (std::getenv("FERRY_FUZZ_LOG"))
    spdlog::info("fuzz: Run() -> {} in {} ms", result ? std::string("completed") : result.error().message(), took_ms);
  Check(took_ms < 5000, "Run() took longer than 5 s with deadlines of 100 ms and less");
  const IncomingProgress p = in.Stats();
  if (result) {
    Check(vm.started_, "completed without starting the guest");
    Check(p.phase == IncomingPhase::kCompleted, "completed, but the phase is not 'completed'");
    Check(p.received_pages == vm.pages_at_go_, "a page was applied after GO");
  } else {
    Check(!vm.started_, "a pre-copy migration failed after the guest was started");
    Check(result.error().code() != ErrorCode::kInternal && !result.error().message().empty(), "failed without a named error");
    Check(p.phase == IncomingPhase::kFailed || p.phase == IncomingPhase::kCancelled, "failed, but the phase is not final");
  }
  if (vm.mem()) mprotect(vm.mem()->host(), vm.mem()->size(), PROT_READ | PROT_WRITE);
  return 0;
}
