// libFuzzer target: virtio-net as a hostile guest and a hostile network drive it. The real device
// (CreateVirtioNet) sits on a socket-pair backend (net_backend.h: SOCK_SEQPACKET keeps frame
// boundaries like its TAP; the fuzzer holds the network's end) in 16 MiB of guest RAM, with an
// EventLoop that polls the backend as the machine thread's loop does. Per input: the device's
// state restored from fuzzed bytes (then PostRestore), then up to 256 operations - guest RAM
// writes (rings, descriptors, buffers in the first 64 KiB), MMIO reads and writes (feature
// negotiation, queue setup, notifications of RX queue 0 and TX queue 1, config space, interrupt
// acknowledge), frames arriving from the network (RX into the guest's buffers) and loop polls.
// The device is rebuilt (fresh) for every input; RAM's first 64 KiB are cleared.
// Input: [u16 blob length][blob] then operations {[u8 op] ...}:
//   op % 4 == 0: RAM write   [u16 offset][u8 n][n bytes]
//   op % 4 == 1: MMIO        [u16 offset][u64 value]; op bits 2-3: size 1, 2, 4, 8; bit 4: write
//   op % 4 == 2: RX frame    [u16 n][n bytes] written by the network, then the loop is polled
//   op % 4 == 3: loop poll
// Properties besides "no crash, no sanitizer report" (libFuzzer's -rss_limit_mb bounds what a
// chain can make the device allocate):
//  - every frame the device sends (TX) is a whole frame: the 12-byte header plus at most 65524
//    bytes, and the device counts exactly the frames that reached the network (tx_packets);
//  - the device never delivers more frames to the guest than the network sent (rx_packets +
//    rx_dropped <= frames sent).
#include <sys/socket.h>
#include <unistd.h>

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <span>

#include <spdlog/spdlog.h>

#include "fuzz_reader.h"
#include "machine/board.h"
#include "machine/devices/virtio/net_backend.h"
#include "machine/devices/virtio/virtio_factory.h"

using namespace ferry;
using ferry::fuzz::Reader;

namespace {

constexpr size_t kHdr = 12, kMaxFrame = 65536 - kHdr;

void Check(bool ok, const char* what) {
  if (!ok) {
    std::fprintf(stderr, "fuzz_virtio_net: property violated: %s\n", what);
    std::abort();
  }
}


class NullIrq : public IrqSink {
 public:
  void SetIrq(uint32_t, bool) override {}
};

// Frames the device sent, read from the network's end; each checked.
uint64_t DrainTx(int peer) {
  static uint8_t buf[kHdr + kMaxFrame + 1];
  uint64_t n = 0;
  for (;;) {
    const ssize_t got = recv(peer, buf, sizeof buf, MSG_DONTWAIT | MSG_TRUNC);
    if (got < 0) return n;
    Check(got >= static_cast<ssize_t>(kHdr) && got <= static_cast<ssize_t>(kHdr + kMaxFrame), "TX frame shorter than its header or over 64 KiB");
    ++n;
  }
}

}  // namespace

extern "C" int LLVMFuzzerInitialize(int*, char***) {
  spdlog::set_level(spdlog::level::off);
  return 0;
}

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  static std::unique_ptr<GuestMemory> mem = [] {
    auto m = GuestMemory::Create(kRamBase, kMinRam);
    if (!m) std::abort();
    return std::move(*m);
  }();
  static std::unique_ptr<EventLoop> loop = [] {
    auto l = EventLoop::Create();
    if (!l) std::abort();
    return std::move(*l);
  }();
  static NullIrq irq;
  std::memset(mem->host(), 0, 64 << 10);
  auto pair = SocketPairBackend("fuzz-net");
  if (!pair) std::abort();
  const int peer = pair->peer;
  // Enough room for any TX burst of one input without blocking the device's writes.
  const int sndbuf = 8 << 20;
  setsockopt(peer, SOL_SOCKET, SO_RCVBUF, &sndbuf, sizeof sndbuf);
  VirtioDeps deps{mem.get(), &irq, 3, loop.get(), kVirtioBase};
  auto dev = CreateVirtioNet(deps, std::move(pair->backend), {0x52, 0x54, 0x00, 0x12, 0x34, 0x56});
  if (!dev) std::abort();
  Device& d = **dev;

  Reader r{std::span<const uint8_t>(data, size)};
  uint16_t blob_len = 0;
  std::span<const uint8_t> blob;
  if (r.Get(&blob_len) && r.Take(blob_len, &blob) && blob_len > 0 && d.RestoreState(blob)) d.PostRestore();
  uint64_t sent = 0, tx = 0;
  for (int ops = 0; ops < 256; ++ops) {
    uint8_t op = 0;
    if (!r.Get(&op)) break;
    if (op % 4 == 0) {
      uint16_t off = 0;
      uint8_t n = 0;
      std::span<const uint8_t> bytes;
      if (!r.Get(&off) || !r.Get(&n) || !r.Take(n, &bytes)) break;
      std::memcpy(mem->host() + off, bytes.data(), bytes.size());  // inside the first 64 KiB + 255
    } else if (op % 4 == 1) {
      uint16_t off = 0;
      uint64_t value = 0, out = 0;
      if (!r.Get(&off) || !r.Get(&value)) break;
      const unsigned sz = 1u << ((op >> 2) & 3);
      if (op & 16) (void)d.MmioWrite(off, sz, value);
      else (void)d.MmioRead(off, sz, &out);
    } else if (op % 4 == 2) {
      uint16_t n = 0;
      std::span<const uint8_t> bytes;
      if (!r.Get(&n) || !r.Take(std::min<size_t>(n, r.d.size()), &bytes)) break;
      if (send(peer, bytes.data(), bytes.size(), MSG_DONTWAIT | MSG_NOSIGNAL) == static_cast<ssize_t>(bytes.size())) ++sent;
      (void)loop->Poll(0);
    } else {
      (void)loop->Poll(0);
    }
    tx += DrainTx(peer);
  }
  tx += DrainTx(peer);
  const nlohmann::json m = d.Metrics();
  if (std::getenv("FERRY_FUZZ_LOG")) std::fprintf(stderr, "fuzz_virtio_net: sent %lu, tx %lu, metrics %s\n", sent, tx, m.dump().c_str());
  Check(m.at("tx_packets").get<uint64_t>() == tx, "tx_packets differs from the frames that reached the network");
  Check(m.at("rx_packets").get<uint64_t>() + m.at("rx_dropped").get<uint64_t>() <= sent,
        "more frames delivered to the guest than the network sent");
  dev->reset();  // removes the backend from the loop before the backend closes
  close(peer);
  return 0;
}
