// libFuzzer target: the board's devices as a hostile snapshot or migration stream and a hostile
// guest drive them - each device's state restored from fuzzed bytes (then PostRestore), guest RAM
// filled with fuzzed virtqueue rings and descriptors, then a sequence of MMIO reads and writes
// (queue setup, notifications, interrupt acknowledges, config space) on the UART, PLIC, CLINT,
// virtio-blk (slot 0, a 1 MiB scratch disk) and virtio-balloon (slot 1). A fresh 16 MiB board
// per input. libFuzzer's -rss_limit_mb bounds what a device may allocate.
// Input: [u8 device][u16 blob length][blob] then [u8 count]x{[u16 RAM offset][u8 n][n bytes]} then
// MMIO operations {[u8 op][u16 offset][u64 value]}: op bits 0-1 size (1,2,4,8), bit 2 write,
// bits 3-5 the region (uart, plic, clint, blk, balloon).
#include <fcntl.h>
#include <unistd.h>

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <span>
#include <string>

#include <spdlog/spdlog.h>

#include "fuzz_reader.h"
#include "machine/board.h"

using namespace ferry;
using ferry::fuzz::Reader;

namespace {

const std::string& ScratchDisk() {
  static const std::string path = [] {
    char tmpl[] = "/tmp/ferry-fuzz-disk-XXXXXX";
    const int fd = mkstemp(tmpl);
    if (fd < 0 || ftruncate(fd, 1 << 20) != 0) std::abort();
    close(fd);
    return std::string(tmpl);
  }();
  return path;
}

}  // namespace

extern "C" int LLVMFuzzerInitialize(int*, char***) {
  spdlog::set_level(spdlog::level::off);
  return 0;
}

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  BoardConfig cfg;
  cfg.ram_bytes = kMinRam;
  cfg.disk = ScratchDisk();
  cfg.balloon = true;
  cfg.console_out = [](std::span<const uint8_t>) {};
  auto board = Board::Create(cfg, false);
  if (!board) std::abort();  // the fixed configuration must always build
  Reader r{std::span<const uint8_t>(data, size)};
  uint8_t which = 0;
  uint16_t blob_len = 0;
  std::span<const uint8_t> blob;
  if (r.Get(&which) && r.Get(&blob_len) && r.Take(blob_len, &blob)) {
    auto devs = (*board)->devices();
    if (!devs.empty()) {
      Device* dev = devs[which % devs.size()];
      if (dev->RestoreState(blob)) (*board)->PostRestore();
    }
  }
  uint8_t writes = 0;
  if (r.Get(&writes)) {
    GuestMemory& mem = (*board)->memory();
    for (int i = 0; i < writes; ++i) {
      uint16_t off = 0;
      uint8_t n = 0;
      std::span<const uint8_t> bytes;
      if (!r.Get(&off) || !r.Get(&n) || !r.Take(n, &bytes)) break;
      std::memcpy(mem.host() + off, bytes.data(), bytes.size());  // the first 64 KiB + 255 of 16 MiB
    }
  }
  static constexpr uint64_t kRegions[] = {kUartBase, kPlicBase, kClintBase, kVirtioBase, kVirtioBase + kVirtioStride};
  for (int ops = 0; ops < 256; ++ops) {
    uint8_t op = 0;
    uint16_t off = 0;
    uint64_t value = 0;
    if (!r.Get(&op) || !r.Get(&off) || !r.Get(&value)) break;
    const unsigned sz = 1u << (op & 3);
    const uint64_t base = kRegions[((op >> 3) & 7) % std::size(kRegions)];
    uint64_t out = 0;
    if (op & 4) (void)(*board)->bus().Write(base + off, sz, value);
    else (void)(*board)->bus().Read(base + off, sz, &out);
  }
  return 0;
}
