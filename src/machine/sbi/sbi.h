// SBI v1.0 implemented by the VMM (the guest kernel runs in S-mode with no firmware):
// BASE, TIME, IPI, RFENCE, HSM, SRST and the legacy v0.1 console/timer/shutdown calls.
// The SBI timer is part of the VM state (saved with the "sbi" device).
#pragma once

#include <functional>
#include <span>

#include "cpu/vcpu.h"
#include "machine/device.h"

namespace ferry {

class Sbi final : public SbiHandler, public Device {
 public:
  using ConsoleOut = std::function<void(std::span<const uint8_t>)>;
  explicit Sbi(ConsoleOut out) : out_(std::move(out)) {}
  void AttachHart(Vcpu* hart0) { hart_ = hart0; }
  SbiAction HandleSbi(int hart_id, SbiCall& call) override;

  // Device: no MMIO; present so the SBI timer travels with snapshots/migration.
  std::string id() const override { return "sbi"; }
  bool MmioRead(uint64_t, unsigned, uint64_t*) override { return false; }
  bool MmioWrite(uint64_t, unsigned, uint64_t) override { return false; }
  std::vector<uint8_t> SaveState() const override;
  Status RestoreState(std::span<const uint8_t> blob) override;
  nlohmann::json Metrics() const override;
  void PostRestore() override;

 private:
  ConsoleOut out_;
  Vcpu* hart_ = nullptr;
  uint64_t stimecmp_ = UINT64_MAX;
  uint64_t calls_ = 0, unsupported_ = 0;
};

}  // namespace ferry
