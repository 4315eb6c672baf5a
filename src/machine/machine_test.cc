// Unit tests of the virt board devices: register behaviour, interrupts, save/restore
// round trips and rejection of truncated/corrupt/newer blobs, FDT content.
#include <fcntl.h>
#include <unistd.h>

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
