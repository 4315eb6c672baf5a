// ns16550a UART (QEMU virt: 0x10000000, PLIC irq 10). Enough of the 16550 for
// Linux's 8250 driver: console output, input with RX interrupts, THRE interrupts.
#pragma once

#include <deque>
#include <functional>
#include <span>

#include "machine/device.h"
#include "machine/irq.h"

namespace ferry {

class Uart final : public Device {
 public:
  using Output = std::function<void(std::span<const uint8_t>)>;
  Uart(IrqSink* irq, uint32_t irq_number, Output out);

  std::string id() const override { return "uart0"; }
  bool MmioRead(uint64_t offset, unsigned size, uint64_t* value) override;
  bool MmioWrite(uint64_t offset, unsigned size, uint64_t value) override;
  std::vector<uint8_t> SaveState() const override;
  Status RestoreState(std::span<const uint8_t> blob) override;
  nlohmann::json Metrics() const override;
  void PostRestore() override { UpdateIrq(); }

  // Host input (console). Machine thread only. Bytes beyond the FIFO bound are dropped and counted.
  void PushInput(std::span<const uint8_t> bytes);
  void set_output(Output out) { out_ = std::move(out); }

 private:
  void UpdateIrq();
  IrqSink* irq_;
  uint32_t irq_number_;
  Output out_;
  std::deque<uint8_t> rx_;
  uint8_t ier_ = 0, lcr_ = 0, mcr_ = 0, scr_ = 0, dll_ = 0, dlm_ = 0, fcr_ = 0;
  bool thre_pending_ = true;  // THR-empty interrupt condition
  uint64_t tx_bytes_ = 0, rx_bytes_ = 0, rx_dropped_ = 0;
};

}  // namespace ferry
