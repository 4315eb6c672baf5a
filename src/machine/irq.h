// Interrupt wiring: devices raise level-triggered lines on the interrupt
// controller (the PLIC on the virt board) through this interface.
#pragma once
#include <cstdint>

namespace ferry {
class IrqSink {
 public:
  virtual ~IrqSink() = default;
  virtual void SetIrq(uint32_t irq, bool level) = 0;
};
}  // namespace ferry
