// libFuzzer target: the destination of a live migration end to end. A real IncomingMigration
// listens on a loopback port and runs against the engine tests' destination double
// (FakeDestination, engine_test_util.h: 16 MiB of memfd RAM, CONFIG {"ram": 16 MiB}); a feeder
// thread (one for the whole run) plays the source with fuzzed bytes: it connects the control
// connection and writes the control bytes (preamble, HELLO, CONFIG, STATE..., END, GO, as the
// fuzzer made them), and once HELLO_ACK and CONFIG_ACK came back (as a source waits for them) it
// connects one data connection per data segment and writes its bytes (preamble, DATA_HELLO, page
// records). The control connection is half-closed after its bytes, so the destination sees the
// end of what the source had to say; the data connections stay open until the destination closes
// the control connection (a source never ends them early) - unless the migration stalls: when
// everything the feeder wrote is acknowledged, the destination shows no progress (phase, bytes
// and records received) for two 1 ms looks, every whole page record the feeder sent was read
// and fewer were applied than END announced, it waits for records no one will send (ten looks
// when a record was cut short or a data connection refused: nothing tells those apart from a
// slow destination), and the feeder half-closes the data connections (the destination fails at
// once on their early end; when it kept none, the feeder aborts it) instead of letting its
// idle timeout run out. Under heavy load a destination that is only slow can still be taken for
// stalled: that input then fails on the early end instead of completing (a path of its own,
// nothing property-wise).
// Post-copy is not offered (the destination would register RAM with userfaultfd; its page
// placement has its own tests). Short deadlines (handshake 100 ms, idle 25 ms) bound the rest.
// Input: [u8 flags][u16 control length][control bytes] then up to 4 x {[u16 length][data bytes]}.
//   flags bit 0: the destination speaks at most protocol v1;
//   flags bit 1: the data connections open right after HELLO_ACK (pages may come before CONFIG);
//   flags bits 2-7 = 000001: a stall runs into the destination's idle timeout (its path is reached
//   too; rare, as it costs 25 ms).
// A control connection that is not accepted (no HELLO_ACK) leaves a real destination listening
// for the next source: the feeder then ends it with Abort() (phase cancelled).
// Properties besides "no crash, no sanitizer report":
//  - it never hangs: Run() returns within 5 s (its deadlines are 100 ms and less);
//  - it never applies a page after GO: guest RAM is made read-only when the guest starts (a write
//    faults), and the number of pages applied does not change after it;
//  - it ends completed (the guest was started) or failed/cancelled with a named error (a message,
//    and not kInternal unless the source's ERROR record said so), never with the guest started
//    and a failure in pre-copy.
#include <arpa/inet.h>
#include <netinet/in.h>
#include <poll.h>
#include <linux/sockios.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <unistd.h>

#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <functional>
#include <optional>
#include <span>
#include <thread>
#include <vector>

#include <spdlog/spdlog.h>

#include "common/clock.h"
#include "common/thread_annotations.h"
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

// Framing only (the record headers' lengths): calls `each(header, payload)` for every whole
// record at the start of `b`, up to the first header that does not decode or record cut short;
// returns how many there were.
template <class F>
size_t ForEachRecord(std::span<const uint8_t> b, F each) {
  size_t n = 0;
  while (b.size() >= kRecordHeaderSize) {
    auto h = DecodeRecordHeader(b.first(kRecordHeaderSize));
    if (!h || b.size() - kRecordHeaderSize < h->length) break;
    each(*h, b.subspan(kRecordHeaderSize, h->length));
    b = b.subspan(kRecordHeaderSize + h->length);
    ++n;
  }
  return n;
}

// The records of a connection's bytes as the destination reads them: after the preamble.
template <class F>
void ForEachRecordAfterPreamble(std::span<const uint8_t> b, F each) {
  if (b.size() >= kPreambleSize) ForEachRecord(b.subspan(kPreambleSize), each);
}

// Reads the destination's records into `got` until `records` whole records came, it closes, or
// `ms` pass (the destination's own deadlines are shorter). True when `records` came.
bool ReadRecords(int fd, size_t records, int ms, std::vector<uint8_t>* got) {
  uint8_t buf[4096];
  const uint64_t deadline = NowNs() + static_cast<uint64_t>(ms) * 1'000'000;
  for (;;) {
    if (ForEachRecord(*got, [](const RecordHeader&, std::span<const uint8_t>) {}) >= records) return true;
    const uint64_t now = NowNs();
    if (now >= deadline) return false;
    pollfd p{fd, POLLIN, 0};
    if (poll(&p, 1, static_cast<int>((deadline - now) / 1'000'000) + 1) <= 0) return false;
    const ssize_t n = recv(fd, buf, sizeof buf, 0);
    if (n <= 0) return false;
    got->insert(got->end(), buf, buf + n);
  }
}

// The type of the n-th whole record in `got` (0-based).
std::optional<uint16_t> RecordTypeAt(std::span<const uint8_t> got, size_t n) {
  std::optional<uint16_t> type;
  size_t i = 0;
  ForEachRecord(got, [&](const RecordHeader& h, std::span<const uint8_t>) {
    if (i++ == n) type = h.type;
  });
  return type;
}

// Bytes written to `fd` that the peer has not acknowledged yet (SIOCOUTQ).
int Unacked(int fd) {
  int n = 0;
  return ioctl(fd, SIOCOUTQ, &n) == 0 ? n : 1;
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

// The source's thread, one for the whole run (a thread per input cost a clone and an exit, with
// ASan's per-thread mappings, every time): Run(job) hands it one input's part, Wait() returns
// once it is done.
class Feeder {
 public:
  Feeder() : thread_([this] { Loop(); }) {}
  void Run(std::function<void()> job) EXCLUDES(mu_) {
    MutexLock l(mu_);
    job_ = std::move(job);
    cv_.notify_all();
  }
  void Wait() EXCLUDES(mu_) {
    MutexLock l(mu_);
    l.Wait(cv_, [&]() REQUIRES(mu_) { return !job_; });
  }

 private:
  [[noreturn]] void Loop() EXCLUDES(mu_) {
    MutexLock l(mu_);
    for (;;) {
      l.Wait(cv_, [&]() REQUIRES(mu_) { return static_cast<bool>(job_); });
      std::function<void()> job = job_;
      l.Unlock();
      job();
      l.Lock();
      job_ = nullptr;
      cv_.notify_all();
    }
  }
  Mutex mu_;
  std::condition_variable cv_;
  std::function<void()> job_ GUARDED_BY(mu_);
  std::thread thread_;  // never joined: it serves until the process exits
};

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

  static Feeder* const feeder = new Feeder();  // lives until the process exits
  feeder->Run([&] {
    const int ctl = Connect(port);
    if (ctl < 0) std::abort();  // loopback must always connect
    Send(ctl, input.control, true);
    std::vector<uint8_t> reply;
    ReadRecords(ctl, 1, 2 * kDeadlineMs, &reply);
    std::vector<int> conns;
    if (RecordTypeAt(reply, 0) != static_cast<uint16_t>(RecordType::kHelloAck)) {
      in.Abort();  // no source was accepted: a destination keeps listening for one; the fuzzer ends it here
    } else if ((input.flags & 2) ||
               (ReadRecords(ctl, 2, 2 * kDeadlineMs, &reply) && RecordTypeAt(reply, 1) == static_cast<uint16_t>(RecordType::kConfigAck))) {
      // As a source: the data connections once the configuration was accepted (flags bit 1: at once).
      for (auto seg : input.data) {
        const int fd = Connect(port);
        if (fd < 0) break;
        Send(fd, seg, false);  // a data connection that ends early fails the migration: it stays open
        conns.push_back(fd);
      }
    }
    // Until the destination ends the migration (it closes the control connection). A migration
    // that stalls - everything the feeder wrote acknowledged, and no visible progress (phase, bytes,
    // records) for two 1 ms looks - waits for records no one will send: the feeder ends its data
    // connections (the destination fails at once on the early end), or aborts it when there are
    // none, instead of letting the destination's idle timeout run out (flags 0x04 alone among bits
    // 2-7: it does run out, so the timeout's path is reached too).
    bool stall_handled = (input.flags & 0xfc) == 0x04;
    // What the destination can read at most: the page records announced by the first END, and
    // the bytes of the whole records after each data connection's greeting (its first record).
    uint64_t announced = UINT64_MAX, readable = 0;
    ForEachRecordAfterPreamble(input.control, [&](const RecordHeader& h, std::span<const uint8_t> payload) {
      if (h.type != static_cast<uint16_t>(RecordType::kEnd) || announced != UINT64_MAX) return;
      if (auto e = DecodeEnd(payload)) announced = e->batches;
    });
    std::vector<uint64_t> conn_readable(conns.size(), 0);
    for (size_t i = 0; i < conns.size(); ++i) {
      size_t n = 0;
      ForEachRecordAfterPreamble(input.data[i], [&](const RecordHeader& h, std::span<const uint8_t>) {
        if (n++ > 0) conn_readable[i] += kRecordHeaderSize + h.length;
      });
    }
    IncomingProgress last{};
    int quiet = 0;
    const uint64_t give_up = NowNs() + 10ull * kDeadlineMs * 1'000'000;
    while (NowNs() < give_up) {
      pollfd p{ctl, POLLIN, 0};
      const int r = poll(&p, 1, 1);
      if (r < 0) break;
      if (r > 0) {
        uint8_t buf[4096];
        if (recv(ctl, buf, sizeof buf, 0) <= 0) break;
        quiet = 0;
        continue;
      }
      if (stall_handled) continue;
      const IncomingProgress now = in.Stats();
      bool acked = true;
      size_t taken = 0;  // data connections the destination kept
      readable = 0;
      for (size_t i = 0; i < conns.size(); ++i) {
        acked = acked && Unacked(conns[i]) == 0;
        // The destination writes on a data connection only to refuse it (ERROR, then it closes).
        pollfd d{conns[i], POLLIN, 0};
        if (poll(&d, 1, 0) != 0) continue;
        readable += conn_readable[i];
        ++taken;
      }
      const bool same = now.phase == last.phase && now.received_bytes == last.received_bytes &&
                        now.received_records == last.received_records;
      quiet = acked && same ? quiet + 1 : 0;
      last = now;
      // Stalled for sure: every whole record was read and fewer arrived than END announced. Else
      // (a record cut short, a refused connection) after 10 quiet looks.
      const bool all_read = now.received_bytes == readable && now.received_records < announced;
      if (quiet < (all_read ? 2 : 10)) continue;
      stall_handled = true;
      for (int fd : conns) shutdown(fd, SHUT_WR);
      if (taken == 0) in.Abort();
    }
    for (int fd : conns) CloseHard(fd);
    CloseHard(ctl);
  });

  WatchedDestination vm(&in);
  const uint64_t t0 = NowNs();
  auto result = in.Run(&vm, params);
  const uint64_t took_ms = (NowNs() - t0) / 1'000'000;
  feeder->Wait();

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
    // kInternal only as the source's own word: an ERROR record carries the peer's code (ToError),
    // and a source may well report an internal error of its own.
    const bool peer_said = result.error().message().starts_with("incoming migration: peer: ");
    Check((result.error().code() != ErrorCode::kInternal || peer_said) && !result.error().message().empty(),
          "failed without a named error");
    Check(p.phase == IncomingPhase::kFailed || p.phase == IncomingPhase::kCancelled, "failed, but the phase is not final");
  }
  if (vm.mem()) mprotect(vm.mem()->host(), vm.mem()->size(), PROT_READ | PROT_WRITE);
  return 0;
}
