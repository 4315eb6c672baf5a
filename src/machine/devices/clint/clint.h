// CLINT / ACLINT MTIMER+MSWI (QEMU virt 0x2000000): msip +0, mtimecmp +0x4000, mtime +0xbff8.
// Also the guest clock (TimeSource, 10 MHz): it stops while the VM is paused (like QEMU's
// vm_clock) and continues from the saved value after restore/migration -- no jump.
#pragma once

#include <atomic>

#include "common/thread_annotations.h"
#include "cpu/vcpu.h"
#include "machine/device.h"

namespace ferry {

class Clint final : public Device, public TimeSource {
 public:
  static constexpr uint64_t kFrequency = 10'000'000;
  static constexpr uint64_t kSize = 0x10000;
  Clint();
  void AttachHart(Vcpu* hart0) { hart_ = hart0; }

  std::string id() const override { return "clint"; }
  bool MmioRead(uint64_t offset, unsigned size, uint64_t* value) override;
  bool MmioWrite(uint64_t offset, unsigned size, uint64_t value) override;
  std::vector<uint8_t> SaveState() const override;
  Status RestoreState(std::span<const uint8_t> blob) override;
  nlohmann::json Metrics() const override;
  void PostRestore() override;

  uint64_t Ticks() const override EXCLUDES(mu_);
  void Pause() EXCLUDES(mu_);
  void Resume() EXCLUDES(mu_);
  bool paused() const EXCLUDES(mu_);

 private:
  static uint64_t HostTicks();
  void SetTicks(uint64_t t) EXCLUDES(mu_);  // guest time := t
  Vcpu* hart_ = nullptr;
  mutable Mutex mu_;
  uint64_t offset_ GUARDED_BY(mu_) = 0;  // guest = host + offset (mod 2^64) while running
  uint64_t frozen_ GUARDED_BY(mu_) = 0;  // guest time while paused
  bool paused_ GUARDED_BY(mu_) = false;
  uint64_t mtimecmp_ = UINT64_MAX;
  uint32_t msip_ = 0;
};

}  // namespace ferry
