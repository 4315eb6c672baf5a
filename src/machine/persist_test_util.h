// Test helpers shared by the device unit tests (machine_test): an IRQ sink that records
// line levels, and the persist (save/restore) contract every Device must meet.
#pragma once

#include <algorithm>
#include <cstdint>
#include <map>
#include <span>
#include <vector>

#include <gtest/gtest.h>

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

}  // namespace ferry::test_util
