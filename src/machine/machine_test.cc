// Unit tests of the virt board devices: register behaviour, interrupts, save/restore
// round trips and rejection of truncated/corrupt/newer blobs, FDT content.
#include <fcntl.h>
#include <unistd.h>

#include <cstring>

#include <gtest/gtest.h>
#include <libfdt.h>

#include "machine/board.h"
#include "machine/device_test_util.h"
#include "machine/devices/virtio/virtio_factory.h"

namespace ferry {
namespace {
using test_util::ExpectPersistContract;
using test_util::RecordingIrq;

TEST(Uart, TransmitReceiveInterruptsAndPersist) {
  RecordingIrq irq;
  std::string out;
  Uart u(&irq, 10, [&](std::span<const uint8_t> b) { out.append(b.begin(), b.end()); });
  uint64_t v;
  u.MmioWrite(0, 1, 'h');
  u.MmioWrite(0, 1, 'i');
  EXPECT_EQ(out, "hi");
  u.MmioWrite(1, 1, 1);  // IER: RX data available
  EXPECT_FALSE(irq.levels[10]);
  const uint8_t in[] = {'x', 'y'};
  u.PushInput(in);
  EXPECT_TRUE(irq.levels[10]);
  ASSERT_TRUE(u.MmioRead(5, 1, &v));
  EXPECT_TRUE(v & 1);  // LSR data ready
  ASSERT_TRUE(u.MmioRead(0, 1, &v));
  EXPECT_EQ(v, 'x');
  EXPECT_FALSE(u.MmioRead(0, 4, &v)) << "wrong access size is refused";
  u.MmioWrite(3, 1, 0x83);  // DLAB
  u.MmioWrite(0, 1, 0x12);
  u.MmioWrite(3, 1, 0x03);
  Uart u2(&irq, 10, nullptr);
  ExpectPersistContract(u, u2);
  ASSERT_TRUE(u2.MmioRead(0, 1, &v));
  EXPECT_EQ(v, 'y') << "RX FIFO content travels with the state";
}

class FakeHart : public Vcpu {
 public:
  int hart_id() const override { return 0; }
  void SetBootState(uint64_t, uint64_t, uint64_t, int) override {}
  VcpuRunResult Run(uint64_t) override { return {}; }
  void RequestExit() override {}
  void SetInterruptLine(InterruptLine l, bool level) override { lines[static_cast<int>(l)] = level; }
  void SetTimerDeadline(InterruptLine l, uint64_t t) override { deadlines[static_cast<int>(l)] = t; }
  uint64_t NextTimerDeadline() const override { return UINT64_MAX; }
  std::vector<uint8_t> SaveState() const override { return {}; }
  Status RestoreState(std::span<const uint8_t>) override { return {}; }
  VcpuCounters counters() const override { return {}; }
  void OnDirtyLogHarvest() override {}
  std::map<int, bool> lines;
  std::map<int, uint64_t> deadlines;
};

TEST(Plic, ClaimCompleteThresholdAndPersist) {
  FakeHart hart;
  Plic p(&hart);
  uint64_t v;
  p.MmioWrite(4 * 10, 4, 3);           // priority of source 10
  p.MmioWrite(0x2000 + 0x80, 4, 1u << 10);  // enable for context 1 (S)
  p.SetIrq(10, true);
  EXPECT_TRUE(hart.lines[9]) << "SEIP";
  EXPECT_FALSE(hart.lines[11]) << "MEIP: not enabled for context 0";
  p.MmioWrite(0x201000, 4, 3);  // threshold 3 masks priority 3
  EXPECT_FALSE(hart.lines[9]);
  p.MmioWrite(0x201000, 4, 0);
  ASSERT_TRUE(p.MmioRead(0x201004, 4, &v));  // claim
  EXPECT_EQ(v, 10u);
  EXPECT_FALSE(hart.lines[9]) << "claimed source is not pending";
  p.MmioWrite(0x201004, 4, 10);  // complete while the line is still high -> pending again
  EXPECT_TRUE(hart.lines[9]);
  Plic p2(&hart);
  ExpectPersistContract(p, p2);
  // A threshold the register could never hold (it keeps 3 bits) is refused, not restored.
  auto blob = p.SaveState();
  const uint32_t eight = 8;
  std::memcpy(blob.data() + blob.size() - 4, &eight, 4);  // the last context's threshold
  auto s = p2.RestoreState(blob);
  ASSERT_FALSE(s);
  EXPECT_NE(s.error().message().find("threshold"), std::string::npos) << s.error().message();
}

// mtime is a wrapping 64-bit counter that a guest (MMIO) or a restored state may set to anything:
// values near 2^63 and 2^64 keep counting from where they were set, wrapping past 2^64 - with no
// signed overflow in between (UBSan, scripts/test-sanitized, failed the old code; fuzz_devices found it).
TEST(Clint, AnyTimeValueKeepsCountingAndWraps) {
  for (const uint64_t set : {0x8000000000000000ull - 5, 0x8000000000000000ull, 0xffffffffffffff00ull, 0ull}) {
    Clint c;
    c.MmioWrite(0xbff8, 8, set);  // the guest sets mtime
    uint64_t got = 0;
    ASSERT_TRUE(c.MmioRead(0xbff8, 8, &got));
    EXPECT_LT(got - set, 1'000'000u) << std::hex << set << " read back as " << got;
    c.Pause();
    c.MmioWrite(0xbff8, 8, set);  // set while paused (as a restore does), then resumed
    EXPECT_EQ(c.Ticks(), set);
    c.Resume();
    EXPECT_LT(c.Ticks() - set, 1'000'000u) << std::hex << set;
  }
}

TEST(Clint, TimeStopsWhilePausedAndContinuesAfterRestore) {
  FakeHart hart;
  Clint c;
  c.AttachHart(&hart);
  c.MmioWrite(0x4000, 8, 12345);
  EXPECT_EQ(hart.deadlines[7], 12345u);
  c.Pause();
  uint64_t t = c.Ticks();
  usleep(20000);
  EXPECT_EQ(c.Ticks(), t);
  auto blob = c.SaveState();
  usleep(20000);
  Clint c2;
  ASSERT_TRUE(c2.RestoreState(blob));
  c2.Pause();
  EXPECT_LT(c2.Ticks() - t, 2000u) << "restored guest time continues from the saved value (no jump)";
  c.Resume();
  usleep(10000);
  EXPECT_GT(c.Ticks(), t + 50000) << "10 MHz clock advances after resume";
  Clint c3;
  c3.Pause();
  // Persist contract (time is frozen on both sides for a byte-exact comparison).
  Clint c4;
  c4.Pause();
  ExpectPersistContract(c3, c4);
}

TEST(Sbi, BaseTimerAndShutdown) {
  FakeHart hart;
  std::string out;
  Sbi sbi([&](std::span<const uint8_t> b) { out.append(b.begin(), b.end()); });
  sbi.AttachHart(&hart);
  SbiCall c{};
  c.eid = 0x10;
  c.fid = 0;
  EXPECT_EQ(sbi.HandleSbi(0, c), SbiAction::kContinue);
  EXPECT_EQ(c.value, 1u << 24);
  c = {};
  c.eid = 0x10;
  c.fid = 3;
  c.args[0] = 0x54494D45;
  sbi.HandleSbi(0, c);
  EXPECT_EQ(c.value, 1u);
  c = {};
  c.eid = 0x54494D45;
  c.args[0] = 777;
  sbi.HandleSbi(0, c);
  EXPECT_EQ(hart.deadlines[5], 777u);
  c = {};
  c.eid = 1;
  c.args[0] = 'Z';
  sbi.HandleSbi(0, c);
  EXPECT_EQ(out, "Z");
  c = {};
  c.eid = 0x12345;
  sbi.HandleSbi(0, c);
  EXPECT_EQ(c.error, -2);
  c = {};
  c.eid = 0x53525354;
  EXPECT_EQ(sbi.HandleSbi(0, c), SbiAction::kShutdown);
  Sbi sbi2(nullptr);
  ExpectPersistContract(sbi, sbi2);
}

TEST(Virtio, BlkRejectsBadDescriptorsWithoutCrashingAndPersists) {
  auto mem = std::move(*GuestMemory::Create(kRamBase, 16 << 20));
  RecordingIrq irq;
  char path[] = "/tmp/ferry-blk-XXXXXX";
  int fd = mkstemp(path);
  ASSERT_EQ(ftruncate(fd, 1 << 20), 0);
  close(fd);
  VirtioDeps deps{mem.get(), &irq, 1, nullptr, kVirtioBase};
  auto dev = CreateVirtioBlk(deps, path, false);
  ASSERT_TRUE(dev);
  Device& d = **dev;
  uint64_t v;
  ASSERT_TRUE(d.MmioRead(0, 4, &v));
  EXPECT_EQ(v, 0x74726976u);
  ASSERT_TRUE(d.MmioRead(8, 4, &v));
  EXPECT_EQ(v, 2u);
  // Driver setup: features (VERSION_1), queue 0 at addresses in RAM, DRIVER_OK.
  test_util::SetUpQueue(d, 0, 0);
  const uint64_t desc = test_util::kDesc, avail = test_util::kAvail;
  // A descriptor pointing outside RAM: the device must flag NEEDS_RESET, not crash.
  struct { uint64_t addr; uint32_t len; uint16_t flags, next; } bad{0x1000, 16, 0, 0};
  ASSERT_TRUE(mem->Write(desc, &bad, 16));
  uint16_t ring[3] = {0, 1, 0};
  ASSERT_TRUE(mem->Write(avail, ring, 6));
  d.MmioWrite(0x50, 4, 0);
  ASSERT_TRUE(d.MmioRead(0x70, 4, &v));
  EXPECT_TRUE(v & 0x40) << "DEVICE_NEEDS_RESET";
  auto dev2 = CreateVirtioBlk(deps, path, false);
  ExpectPersistContract(d, **dev2);
  unlink(path);
}

// virtio-blk data moves in bounded chunks: a large IN request lands whole in the guest's buffers,
// one larger than a request may be fails with an I/O error (status 1) instead of allocating its
// size; a restored queue size must be a power of two.
TEST(Virtio, BlkLargeRequestsMoveInChunksAndHugeOnesFail) {
  auto mem = std::move(*GuestMemory::Create(kRamBase, 16 << 20));
  RecordingIrq irq;
  char path[] = "/tmp/ferry-blk-XXXXXX";
  int fd = mkstemp(path);
  ASSERT_EQ(ftruncate(fd, 2ll << 30), 0);  // 2 GiB, sparse
  std::vector<uint8_t> pattern(8 << 20);
  for (size_t i = 0; i < pattern.size(); ++i) pattern[i] = static_cast<uint8_t>(i * 131 + (i >> 20));
  ASSERT_EQ(pwrite(fd, pattern.data(), pattern.size(), 1 << 20), static_cast<ssize_t>(pattern.size()));
  close(fd);
  VirtioDeps deps{mem.get(), &irq, 1, nullptr, kVirtioBase};
  auto dev = CreateVirtioBlk(deps, path, false);
  ASSERT_TRUE(dev);
  Device& d = **dev;
  test_util::SetUpQueue(d, 0, 0);
  struct Desc { uint64_t addr; uint32_t len; uint16_t flags, next; };
  const uint64_t hdr_at = kRamBase + 0x10000, status_at = kRamBase + 0x11000, table_at = kRamBase + 0x20000;
  const uint64_t buf_at = kRamBase + (4 << 20);
  auto request = [&](uint16_t avail_idx) {
    uint16_t ring[3] = {0, avail_idx, 0};
    ASSERT_TRUE(mem->Write(test_util::kAvail, ring, 6));
    d.MmioWrite(0x50, 4, 0);
  };
  auto status = [&] {
    uint8_t st = 0xff;
    EXPECT_TRUE(mem->Read(status_at, &st, 1));
    return st;
  };
  // IN of 8 MiB at sector 2048 into two 4 MiB buffers.
  struct { uint32_t type, reserved; uint64_t sector; } hdr{0, 0, 2048};
  ASSERT_TRUE(mem->Write(hdr_at, &hdr, 16));
  Desc chain[4] = {{hdr_at, 16, 1, 1}, {buf_at, 4 << 20, 1 | 2, 2}, {buf_at + (4 << 20), 4 << 20, 1 | 2, 3}, {status_at, 1, 2, 0}};
  ASSERT_TRUE(mem->Write(test_util::kDesc, chain, sizeof chain));
  request(1);
  EXPECT_EQ(status(), 0);
  std::vector<uint8_t> got(pattern.size());
  ASSERT_TRUE(mem->Read(buf_at, got.data(), got.size()));
  EXPECT_TRUE(got == pattern) << "the IN data arrived whole, in order";
  uint32_t used[2];
  ASSERT_TRUE(mem->Read(test_util::kUsed + 4, used, 8));
  EXPECT_EQ(used[1], (8u << 20) + 1);
  // IN of 1.5 GiB (an indirect table of 96 descriptors covering the same 16 MiB of RAM): more
  // than a request may move - an I/O error, quickly, nothing allocated for it.
  std::vector<Desc> table;
  table.push_back({hdr_at, 16, 1, 1});
  for (uint16_t i = 0; i < 96; ++i) table.push_back({kRamBase, 16 << 20, 1 | 2, static_cast<uint16_t>(i + 2)});
  table.push_back({status_at, 1, 2, 0});
  ASSERT_TRUE(mem->Write(table_at, table.data(), table.size() * sizeof(Desc)));
  hdr.sector = 0;
  ASSERT_TRUE(mem->Write(hdr_at, &hdr, 16));
  Desc indirect{table_at, static_cast<uint32_t>(table.size() * sizeof(Desc)), 4, 0};
  ASSERT_TRUE(mem->Write(test_util::kDesc, &indirect, sizeof indirect));
  uint16_t head = 0;
  ASSERT_TRUE(mem->Write(test_util::kAvail + 4 + 2, &head, 2));
  request(2);
  EXPECT_EQ(status(), 1);
  uint64_t v = 0;
  ASSERT_TRUE(d.MmioRead(0x70, 4, &v));
  EXPECT_FALSE(v & 0x40) << "an I/O error, not a broken device";
  // A restored queue size that is not a power of two is refused.
  auto blob = d.SaveState();
  const size_t queue0_num = 4 + 4 + 8 + 6 * 4 + 4;
  const uint16_t three = 3;
  std::memcpy(blob.data() + queue0_num, &three, 2);
  auto dev2 = CreateVirtioBlk(deps, path, false);
  auto r = (*dev2)->RestoreState(blob);
  ASSERT_FALSE(r);
  EXPECT_NE(r.error().message().find("queue size 3"), std::string::npos) << r.error().message();
  unlink(path);
}

// A snapshot's or a migration's CONFIG comes from outside: a RAM size that is a float (1.677e219
// made UBSan report an out-of-range conversion in fuzz_snapshot) is refused, the config unchanged.
TEST(Board, GuestJsonWithAFloatRamSizeIsRefused) {
  BoardConfig cfg;
  cfg.ram_bytes = 64 << 20;
  nlohmann::json j = cfg.GuestJson();
  for (const char* bad : {"1.677e219", "67108864.0", "-1"}) {
    j["ram_bytes"] = nlohmann::json::parse(bad);
    BoardConfig into;
    into.ram_bytes = 5;
    auto s = into.ApplyGuestJson(j);
    ASSERT_FALSE(s) << bad;
    EXPECT_EQ(s.error().message(), "\"ram_bytes\" must be a non-negative integer");
    EXPECT_EQ(into.ram_bytes, 5u);
  }
  j["ram_bytes"] = 64 << 20;
  BoardConfig ok;
  ASSERT_TRUE(ok.ApplyGuestJson(j));
  EXPECT_EQ(ok.ram_bytes, uint64_t{64} << 20);
}

TEST(Board, DeviceTreeDescribesTheVirtBoard) {
  BoardConfig cfg;
  cfg.ram_bytes = 64 << 20;
  auto board = Board::Create(cfg, false);
  ASSERT_TRUE(board) << board.error().ToString();
  const void* fdt = (*board)->fdt().data();
  ASSERT_EQ(fdt_check_header(fdt), 0);
  EXPECT_GE(fdt_path_offset(fdt, "/soc/serial@10000000"), 0);
  EXPECT_GE(fdt_path_offset(fdt, "/soc/plic@c000000"), 0);
  EXPECT_GE(fdt_path_offset(fdt, "/soc/clint@2000000"), 0);
  EXPECT_GE(fdt_path_offset(fdt, "/memory@80000000"), 0);
  int cpu = fdt_path_offset(fdt, "/cpus/cpu@0");
  ASSERT_GE(cpu, 0);
  EXPECT_STREQ(static_cast<const char*>(fdt_getprop(fdt, cpu, "riscv,isa", nullptr)), "rv64imafdc_zicsr_zifencei");
  // Bad configurations are refused with clear errors.
  cfg.ram_bytes = 1 << 20;
  auto small = Board::Create(cfg, false);
  ASSERT_FALSE(small);
  EXPECT_NE(small.error().message().find("RAM size"), std::string::npos);
  cfg.ram_bytes = 64 << 20;
  cfg.kernel = "/nonexistent";
  EXPECT_FALSE(Board::Create(cfg, true));
}

}  // namespace
}  // namespace ferry
