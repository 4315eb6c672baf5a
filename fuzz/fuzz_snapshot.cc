// libFuzzer target: a snapshot file as `ferry-vmm --restore` reads it - ReadSnapshot (header,
// sections, CRCs, limits, CONFIG JSON, RAM bitmap and pages) builds a real board from the file's
// CONFIG (BoardConfig::ApplyGuestJson + Board::Create, as Vm::Restore does; no disk, no TAP on
// this host, so a CONFIG asking for them is refused) and loads RAM; then the vCPU and every
// device are restored from their sections (Board::RestoreDevices, PostRestore).
// Input: byte 0 bit 0 set: the harness recomputes every CRC (file header, section headers and
// payloads, walking the declared lengths) so mutations reach the decoders behind them; the rest is
// the file, written to a memfd and read through /proc/self/fd.
// Properties besides "no crash":
//  - all-or-nothing per component: a vCPU or device whose RestoreState fails saves exactly the
//    state it had before (nothing half-applied);
//  - success only for self-consistent input: once everything restored, the board is saved again
//    (WriteSnapshot), that file must restore into a second board, and saving the second board
//    gives the same vCPU and device states and the same RAM (a fixpoint).
// Harness limit: a CONFIG asking for more than 64 MiB of RAM is refused (the file cannot hold
// more than a bitmap for that within -max_len anyway; this keeps each input fast).
#include <sys/mman.h>
#include <unistd.h>

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <map>
#include <memory>
#include <span>
#include <string>
#include <vector>

#include <spdlog/spdlog.h>

#include "common/crc32c.h"
#include "machine/board.h"
#include "vmm/snapshot.h"

using namespace ferry;

namespace {

constexpr uint64_t kHarnessMaxRam = 64ull << 20;

void Check(bool ok, const char* what) {
  if (!ok) {
    std::fprintf(stderr, "fuzz_snapshot: property violated: %s\n", what);
    std::abort();
  }
}

// The file's CRCs recomputed in place along the declared section lengths.
void FixCrcs(std::vector<uint8_t>& f) {
  if (f.size() < 32) return;
  const uint32_t hcrc = Crc32c(f.data(), 28);
  std::memcpy(f.data() + 28, &hcrc, 4);
  size_t at = 32;
  while (f.size() - at >= 24) {
    uint64_t len;
    std::memcpy(&len, f.data() + at + 8, 8);
    const size_t body = at + 24;
    const size_t n = static_cast<size_t>(std::min<uint64_t>(len, f.size() - body));
    const uint32_t pcrc = Crc32c(f.data() + body, n);
    std::memcpy(f.data() + at + 16, &pcrc, 4);
    const uint32_t shcrc = Crc32c(f.data() + at, 20);
    std::memcpy(f.data() + at + 20, &shcrc, 4);
    at = body + n;
  }
}

// A board per configuration, kept between inputs (building one and faulting in its 16 MiB of RAM
// would dominate each run) and put back to its freshly built state before it is used again, so a
// run does not depend on the inputs before it.
struct Slot {
  std::string key;  // the guest configuration it was built for
  std::unique_ptr<Board> board;
  std::vector<uint8_t> fresh_vcpu;
  std::map<std::string, std::vector<uint8_t>> fresh_devices;
};

Result<Board*> BoardFor(Slot& slot, const BoardConfig& cfg) {
  const std::string key = cfg.GuestJson().dump();
  if (slot.board && slot.key == key) {
    Board& b = *slot.board;
    if (!b.vcpu().RestoreState(slot.fresh_vcpu) || !b.RestoreDevices(slot.fresh_devices)) std::abort();
    b.PostRestore();
    return &b;
  }
  slot.board.reset();
  auto b = Board::Create(cfg, false);
  if (!b) return std::unexpected(b.error());
  slot.board = std::move(*b);
  slot.key = key;
  slot.board->clint().Pause();  // guest time stands still, so the saves compared below can be equal
  slot.fresh_vcpu = slot.board->vcpu().SaveState();
  slot.fresh_devices.clear();
  for (Device* d : slot.board->devices()) slot.fresh_devices[d->id()] = d->SaveState();
  return slot.board.get();
}

struct Restored {
  Board* board = nullptr;
  Status status;
};

// ReadSnapshot into the slot's board for the file's CONFIG, then the vCPU and the devices,
// checking all-or-nothing per component.
Restored Restore(const std::string& path, Slot& slot) {
  Restored out;
  auto make = [&](const nlohmann::json& config) -> Result<GuestMemory*> {
    BoardConfig cfg;
    cfg.console_out = [](std::span<const uint8_t>) {};
    auto s = cfg.ApplyGuestJson(config.value("board", nlohmann::json::object()));
    if (!s) return std::unexpected(s.error());
    if (cfg.ram_bytes > kHarnessMaxRam) return Errorf(ErrorCode::kInvalidArgument, "harness limit: RAM over 64 MiB");
    auto b = BoardFor(slot, cfg);
    if (!b) return std::unexpected(b.error());
    out.board = *b;
    return &out.board->memory();
  };
  auto st = ReadSnapshot(path, make);
  if (!st) {
    out.status = std::unexpected(st.error());
    return out;
  }
  Board& b = *out.board;
  const std::vector<uint8_t> vcpu_before = b.vcpu().SaveState();
  if (auto s = b.vcpu().RestoreState(st->vcpu); !s) {
    Check(b.vcpu().SaveState() == vcpu_before, "a failed vCPU restore changed the vCPU's state");
    out.status = s;
    return out;
  }
  bool all_known = true;
  for (const auto& [id, blob] : st->devices) all_known &= b.FindDevice(id) != nullptr;
  for (Device* d : b.devices()) {
    auto it = st->devices.find(d->id());
    if (it == st->devices.end()) {
      all_known = false;
      continue;
    }
    const std::vector<uint8_t> before = d->SaveState();
    if (auto s = d->RestoreState(it->second); !s) {
      Check(d->SaveState() == before, "a failed device restore changed the device's state");
      out.status = s;
      return out;
    }
  }
  // Every component took its blob: the board's own restore (the path Vm::Restore takes) must
  // agree, and fails exactly when a device has no blob or a blob has no device.
  const Status all = b.RestoreDevices(st->devices);
  Check(static_cast<bool>(all) == all_known, "Board::RestoreDevices disagrees with the devices' own restores");
  if (!all) {
    out.status = all;
    return out;
  }
  b.PostRestore();
  return out;
}

SnapshotState Save(Board& b) {
  SnapshotState st;
  st.config = {{"board", b.config().GuestJson()}, {"vmm", "ferry-vmm"}};
  st.vcpu = b.vcpu().SaveState();
  for (Device* d : b.devices()) st.devices[d->id()] = d->SaveState();
  return st;
}

char g_dir[] = "/dev/shm/ferry-fuzz-snapshot-XXXXXX";

const std::string& Dir() {
  static const std::string dir = [] {
    if (!mkdtemp(g_dir)) std::abort();
    std::atexit([] { rmdir(g_dir); });
    return std::string(g_dir);
  }();
  return dir;
}

}  // namespace

extern "C" int LLVMFuzzerInitialize(int*, char***) {
  spdlog::set_level(spdlog::level::off);
  return 0;
}

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  if (size < 1) return 0;
  static const int fd = memfd_create("fuzz-snapshot", MFD_CLOEXEC);
  static const std::string path = "/proc/self/fd/" + std::to_string(fd);
  std::vector<uint8_t> file(data + 1, data + size);
  if (data[0] & 1) FixCrcs(file);
  if (fd < 0 || ftruncate(fd, 0) != 0 || pwrite(fd, file.data(), file.size(), 0) != static_cast<ssize_t>(file.size())) std::abort();

  static Slot first_slot, second_slot;
  Restored first = Restore(path, first_slot);
  if (!first.status) return 0;

  // Self-consistent: what restored saves, restores again, and saves the same.
  const SnapshotState saved = Save(*first.board);
  const std::string again = Dir() + "/again";
  Check(static_cast<bool>(WriteSnapshot(again, saved, first.board->memory())), "WriteSnapshot of a restored board failed");
  Restored second = Restore(again, second_slot);
  Check(static_cast<bool>(second.status), "a snapshot of a restored board does not restore");
  const SnapshotState resaved = Save(*second.board);
  Check(resaved.config == saved.config, "CONFIG changed in a save/restore round trip");
  Check(resaved.vcpu == saved.vcpu, "vCPU state changed in a save/restore round trip");
  Check(resaved.devices == saved.devices, "device state changed in a save/restore round trip");
  GuestMemory& m1 = first.board->memory();
  GuestMemory& m2 = second.board->memory();
  Check(m1.size() == m2.size() && std::memcmp(m1.host(), m2.host(), m1.size()) == 0, "RAM changed in a save/restore round trip");
  unlink(again.c_str());
  return 0;
}
