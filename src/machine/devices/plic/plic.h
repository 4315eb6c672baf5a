// SiFive-compatible PLIC as on QEMU virt (0xc000000, 95 sources, contexts: 0 = hart0 M,
// 1 = hart0 S). Level-triggered sources; drives MEIP/SEIP of the hart.
#pragma once

#include <array>

#include "cpu/vcpu.h"
#include "machine/device.h"
#include "machine/irq.h"

namespace ferry {

class Plic final : public Device, public IrqSink {
 public:
  static constexpr uint32_t kSources = 96;  // source 0 is reserved
  static constexpr uint32_t kContexts = 2;
  static constexpr uint64_t kSize = 0x600000;

  explicit Plic(Vcpu* hart0) : hart_(hart0) {}
  std::string id() const override { return "plic"; }
  bool MmioRead(uint64_t offset, unsigned size, uint64_t* value) override;
  bool MmioWrite(uint64_t offset, unsigned size, uint64_t value) override;
  std::vector<uint8_t> SaveState() const override;
  Status RestoreState(std::span<const uint8_t> blob) override;
  nlohmann::json Metrics() const override;
  void PostRestore() override { Update(); }
  void SetIrq(uint32_t irq, bool level) override;

 private:
  uint32_t BestPending(uint32_t ctx) const;
  void Update();
  bool Pending(uint32_t s) const { return (pending_[s / 32] >> (s % 32)) & 1; }
  void SetPending(uint32_t s, bool v) {
    if (v) pending_[s / 32] |= 1u << (s % 32);
    else pending_[s / 32] &= ~(1u << (s % 32));
  }
  Vcpu* hart_;
  std::array<uint32_t, kSources> priority_{};
  std::array<uint32_t, kSources / 32> pending_{};
  std::array<uint32_t, kSources / 32> level_{};    // current input line levels
  std::array<uint32_t, kSources / 32> claimed_{};  // in service
  std::array<std::array<uint32_t, kSources / 32>, kContexts> enable_{};
  std::array<uint32_t, kContexts> threshold_{};
  uint64_t claims_ = 0;
};

}  // namespace ferry
