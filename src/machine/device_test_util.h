// Test helpers shared by the device unit tests (machine_test): an IRQ sink that records
// line levels, the persist (save/restore) contract every Device must meet, and the driver
// side of virtio-mmio queue setup.
#pragma once

#include <algorithm>
#include <cstdint>
#include <map>
#include <span>
#include <vector>

#include <gtest/gtest.h>

#include "machine/board.h"
#include "machine/device.h"

namespace ferry::test_util {

class RecordingIrq : public IrqSink {
 public:
  void SetIrq(uint32_t irq, bool level) override { levels[irq] = level; }
  std::map<uint32_t, bool> levels;
};

// Every blob round-trips; every truncation (each length for blobs up to 64 KiB, a spread of
// lengths beyond), a version bump and a trailing byte are rejected; and failed restores leave
// the device as it was.
inline void ExpectPersistContract(Device& a, Device& b) {
  auto blob = a.SaveState();
  ASSERT_TRUE(b.RestoreState(blob)) << a.id();
  EXPECT_EQ(b.SaveState(), blob) << a.id();
  const size_t step = blob.size() <= (64u << 10) ? 1 : blob.size() / 997;
  for (size_t len = 0; len < blob.size(); len += step)
    EXPECT_FALSE(b.RestoreState(std::span<const uint8_t>(blob.data(), len))) << a.id() << " truncated to " << len;
  auto v = blob;
  v[0] = 200;
  EXPECT_FALSE(b.RestoreState(v)) << a.id() << " newer version";
  auto t = blob;
  t.push_back(1);
  EXPECT_FALSE(b.RestoreState(t)) << a.id() << " trailing byte";
  EXPECT_EQ(b.SaveState(), blob) << a.id() << ": failed restores must not change the device";
}

// Virtqueue rings used by the virtio tests (inside guest RAM).
inline constexpr uint64_t kDesc = kRamBase + 0x1000, kAvail = kRamBase + 0x2000, kUsed = kRamBase + 0x3000;

// Driver side of virtio-mmio setup: VERSION_1 + `features` (low word), 16-entry queue `q` at
// the rings above, DRIVER_OK.
inline void SetUpQueue(Device& d, uint32_t features, int q) {
  d.MmioWrite(0x70, 4, 1 | 2);
  d.MmioWrite(0x24, 4, 0);
  d.MmioWrite(0x20, 4, features);
  d.MmioWrite(0x24, 4, 1);
  d.MmioWrite(0x20, 4, 1);  // VERSION_1 (bit 32)
  d.MmioWrite(0x70, 4, 1 | 2 | 8);
  d.MmioWrite(0x30, 4, static_cast<uint64_t>(q));
  d.MmioWrite(0x38, 4, 16);
  d.MmioWrite(0x80, 4, kDesc & 0xffffffff);
  d.MmioWrite(0x84, 4, kDesc >> 32);
  d.MmioWrite(0x90, 4, kAvail & 0xffffffff);
  d.MmioWrite(0x94, 4, kAvail >> 32);
  d.MmioWrite(0xa0, 4, kUsed & 0xffffffff);
  d.MmioWrite(0xa4, 4, kUsed >> 32);
  d.MmioWrite(0x44, 4, 1);
  d.MmioWrite(0x70, 4, 1 | 2 | 8 | 4);
}

}  // namespace ferry::test_util
