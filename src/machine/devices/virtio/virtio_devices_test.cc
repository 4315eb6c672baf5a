// Save/restore of virtio-net and virtio-balloon (virtio-blk's is in machine_test.cc):
// round trip with live queue state, and rejection of truncated, corrupt, newer-version,
// trailing-byte and foreign blobs without changing the device.
#include <unistd.h>

#include <array>
#include <cstring>
#include <map>

#include <gtest/gtest.h>

#include "common/state_io.h"
#include "machine/board.h"
#include "machine/device_test_util.h"
#include "machine/devices/virtio/virtio_factory.h"

namespace ferry {
namespace {
using test_util::ExpectPersistContract;
using test_util::RecordingIrq;

using test_util::kAvail;
using test_util::kDesc;
using test_util::kUsed;
using test_util::SetUpQueue;

uint64_t Reg(Device& d, uint64_t off) {
  uint64_t v = 0;
  EXPECT_TRUE(d.MmioRead(off, 4, &v));
  return v;
}

// Blob layout (virtio_mmio.cc): version, device id, driver features (u64), 6 registers,
// queue count, per queue {u16 num, bool ready, u64 desc, avail, used, u16 last_avail,
// u16 next_used}, then the device-specific bytes (u32 length + payload).
size_t DeviceBytesOffset(size_t queues) { return 4 + 4 + 8 + 6 * 4 + 4 + queues * (2 + 1 + 3 * 8 + 2 + 2); }

class VirtioNetPersist : public ::testing::Test {
 protected:
  void SetUp() override {
    mem_ = std::move(*GuestMemory::Create(kRamBase, 16 << 20));
    deps_.memory = mem_.get();
    // A TAP interface that exists only while the device holds it (needs CAP_NET_ADMIN).
    for (int i = 0; i < 2; ++i) {
      auto dev = CreateVirtioNet(deps_, fmt::format("fyut{}n{}", getpid() % 100000, i), mac_);
      if (!dev) GTEST_SKIP() << "no TAP device available: " << dev.error().ToString();
      dev_[i] = std::move(*dev);
    }
  }
  std::unique_ptr<GuestMemory> mem_;
  RecordingIrq irq_;
  VirtioDeps deps_{nullptr, &irq_, 3, nullptr, kVirtioBase + 0x2000};
  std::array<uint8_t, 6> mac_{0x52, 0x54, 0x00, 0x12, 0x34, 0x56};
  std::unique_ptr<Device> dev_[2];

};

TEST_F(VirtioNetPersist, RoundTripsQueueStateAndRejectsBadBlobs) {
  Device& a = *dev_[0];
  Device& b = *dev_[1];
  EXPECT_EQ(Reg(a, 8), 1u) << "device id: network card";
  SetUpQueue(a, 1u << 5 /* MAC */, 1);
  // Transmit one frame on queue 1 (TX): 12-byte header + 60-byte frame.
  uint8_t frame[12 + 60] = {};
  std::memset(frame + 12, 0xff, 6);
  std::memcpy(frame + 18, mac_.data(), 6);
  ASSERT_TRUE(mem_->Write(kRamBase + 0x4000, frame, sizeof frame));
  struct { uint64_t addr; uint32_t len; uint16_t flags, next; } d0{kRamBase + 0x4000, sizeof frame, 0, 0};
  ASSERT_TRUE(mem_->Write(kDesc, &d0, 16));
  uint16_t ring[3] = {0, 1, 0};  // flags, idx = 1, ring[0] = descriptor 0
  ASSERT_TRUE(mem_->Write(kAvail, ring, 6));
  a.MmioWrite(0x50, 4, 1);
  uint16_t used_idx = 0;
  ASSERT_TRUE(mem_->Read(kUsed + 2, &used_idx, 2));
  EXPECT_EQ(used_idx, 1u) << "the frame was consumed";
  EXPECT_EQ(Reg(a, 0x60) & 1, 1u) << "used-buffer interrupt pending";
  EXPECT_EQ(Reg(a, 0x70) & 0x40, 0u) << "no DEVICE_NEEDS_RESET";

  ExpectPersistContract(a, b);
  // The restored device continues where the first one stopped: queue 1 consumed one
  // buffer, so a second one lands in used ring slot 1.
  b.PostRestore();
  EXPECT_EQ(Reg(b, 0x70), 1u | 2 | 8 | 4) << "status travels";
  EXPECT_EQ(Reg(b, 0x60) & 1, 1u) << "interrupt status travels";
  ring[1] = 2;
  ring[2] = 0;
  uint16_t slot1 = 0;
  ASSERT_TRUE(mem_->Write(kAvail + 4 + 2, &slot1, 2));
  ASSERT_TRUE(mem_->Write(kAvail + 2, &ring[1], 2));
  b.MmioWrite(0x50, 4, 1);
  ASSERT_TRUE(mem_->Read(kUsed + 2, &used_idx, 2));
  EXPECT_EQ(used_idx, 2u);

  // A corrupt queue size and a blob made by another device kind are refused.
  auto blob = a.SaveState();
  const auto before = b.SaveState();
  auto bad = blob;
  const size_t q0 = DeviceBytesOffset(0);
  bad[q0] = 0;  // queue 0 size 0
  bad[q0 + 1] = 0;
  EXPECT_FALSE(b.RestoreState(bad));
  bad = blob;
  bad[4] = 2;  // device id: block
  EXPECT_FALSE(b.RestoreState(bad));
  bad = blob;
  bad[8 + 6] = 0x10;  // driver features bit 52, never offered by the device
  EXPECT_FALSE(b.RestoreState(bad));
  auto balloon = CreateVirtioBalloon(deps_);
  ASSERT_TRUE(balloon);
  EXPECT_FALSE(b.RestoreState((*balloon)->SaveState())) << "balloon state into a net device";
  EXPECT_EQ(b.SaveState(), before) << "failed restores must not change the device";
}

TEST(VirtioBalloonPersist, RoundTripsReportedFreePagesAndRejectsBadBlobs) {
  auto mem = std::move(*GuestMemory::Create(kRamBase, 16 << 20));
  RecordingIrq irq;
  VirtioDeps deps{mem.get(), &irq, 4, nullptr, kVirtioBase + 0x3000};
  auto a_dev = CreateVirtioBalloon(deps);
  auto b_dev = CreateVirtioBalloon(deps);
  ASSERT_TRUE(a_dev && b_dev);
  Device& a = **a_dev;
  Device& b = **b_dev;
  EXPECT_EQ(Reg(a, 8), 5u) << "device id: balloon";
  SetUpQueue(a, 1u << 5 /* FREE_PAGE_REPORTING */, 2);
  a.MmioWrite(0x100 + 4, 4, 7);  // config: actual = 7 pages
  // One report: two writable descriptors, 3 pages at 1 MiB and 1 page at 2 MiB.
  struct Desc { uint64_t addr; uint32_t len; uint16_t flags, next; };
  Desc d[2] = {{kRamBase + (1 << 20), 3 * 4096, 2 | 1, 1}, {kRamBase + (2 << 20), 4096, 2, 0}};
  ASSERT_TRUE(mem->Write(kDesc, d, sizeof d));
  uint16_t ring[3] = {0, 1, 0};
  ASSERT_TRUE(mem->Write(kAvail, ring, 6));
  a.MmioWrite(0x50, 4, 2);
  FreePageReport* ra = AsFreePageReport(&a);
  ASSERT_NE(ra, nullptr);
  EXPECT_EQ(ra->reported_pages(), 4u);
  EXPECT_EQ(Reg(a, 0x70) & 0x40, 0u) << "no DEVICE_NEEDS_RESET";

  ExpectPersistContract(a, b);
  FreePageReport* rb = AsFreePageReport(&b);
  EXPECT_EQ(rb->reported_pages(), 4u);
  for (uint64_t p : {256u, 257u, 258u, 512u}) EXPECT_TRUE(rb->IsReportedFree(p)) << p;
  EXPECT_FALSE(rb->IsReportedFree(259));
  EXPECT_FALSE(rb->IsReportedFree(0));
  uint64_t actual = 0;
  ASSERT_TRUE(b.MmioRead(0x100 + 4, 4, &actual));
  EXPECT_EQ(actual, 7u) << "config 'actual' travels";

  const auto blob = a.SaveState();
  const auto before = b.SaveState();
  // Device bytes: u32 length, then u32 num_pages, u32 actual, bitmap (u32 length + bytes).
  const size_t dev_at = DeviceBytesOffset(3);
  uint32_t dev_len;
  std::memcpy(&dev_len, blob.data() + dev_at, 4);
  ASSERT_EQ(dev_at + 4 + dev_len, blob.size());
  // Trailing byte inside the device-specific part (outer lengths kept consistent).
  auto bad = blob;
  bad.push_back(0);
  uint32_t longer = dev_len + 1;
  std::memcpy(bad.data() + dev_at, &longer, 4);
  auto fresh = CreateVirtioBalloon(deps);
  ASSERT_TRUE(fresh);
  const auto fresh_state = (*fresh)->SaveState();
  EXPECT_FALSE((*fresh)->RestoreState(bad)) << "trailing byte in the device part";
  EXPECT_EQ((*fresh)->SaveState(), fresh_state) << "a rejected device part must not be half-applied";
  EXPECT_EQ(AsFreePageReport(fresh->get())->reported_pages(), 0u);
  // Free-page bitmap of the wrong size (a VM with a different RAM size).
  auto other_mem = std::move(*GuestMemory::Create(kRamBase, 32 << 20));
  VirtioDeps other = deps;
  other.memory = other_mem.get();
  auto bigger = CreateVirtioBalloon(other);
  ASSERT_TRUE(bigger);
  EXPECT_FALSE(b.RestoreState((*bigger)->SaveState())) << "bitmap for 32 MiB into a 16 MiB VM";
  EXPECT_FALSE((*bigger)->RestoreState(blob)) << "bitmap for 16 MiB into a 32 MiB VM";
  EXPECT_EQ(b.SaveState(), before);
  EXPECT_EQ(rb->reported_pages(), 4u);
}

}  // namespace
}  // namespace ferry
