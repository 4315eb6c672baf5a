#include "machine/devices/uart/uart.h"

#include "common/state_io.h"

namespace ferry {

namespace {
constexpr size_t kRxMax = 4096;
constexpr uint32_t kVersion = 1;
}

Uart::Uart(IrqSink* irq, uint32_t irq_number, Output out) : irq_(irq), irq_number_(irq_number), out_(std::move(out)) {}

void Uart::UpdateIrq() {
  bool pending = ((ier_ & 1) && !rx_.empty()) || ((ier_ & 2) && thre_pending_);
  if (irq_) irq_->SetIrq(irq_number_, pending);
}

bool Uart::MmioRead(uint64_t offset, unsigned size, uint64_t* value) {
  if (size != 1 || offset > 7) return false;
  const bool dlab = lcr_ & 0x80;
  uint8_t v = 0;
  switch (offset) {
    case 0:
      if (dlab) { v = dll_; break; }
      if (!rx_.empty()) { v = rx_.front(); rx_.pop_front(); }
      UpdateIrq();
      break;
    case 1: v = dlab ? dlm_ : ier_; break;
    case 2:  // IIR
      if ((ier_ & 1) && !rx_.empty()) v = 0x04;
      else if ((ier_ & 2) && thre_pending_) { v = 0x02; thre_pending_ = false; UpdateIrq(); }
      else v = 0x01;
      if (fcr_ & 1) v |= 0xc0;
      break;
    case 3: v = lcr_; break;
    case 4: v = mcr_; break;
    case 5: v = static_cast<uint8_t>(0x60 | (rx_.empty() ? 0 : 1)); break;  // THRE|TEMT always (TX is instant)
    case 6: v = 0xb0; break;  // MSR: DCD|DSR|CTS
    case 7: v = scr_; break;
  }
  *value = v;
  return true;
}

bool Uart::MmioWrite(uint64_t offset, unsigned size, uint64_t value) {
  if (size != 1 || offset > 7) return false;
  const uint8_t v = static_cast<uint8_t>(value);
  const bool dlab = lcr_ & 0x80;
  switch (offset) {
    case 0:
      if (dlab) { dll_ = v; break; }
      if (out_) out_(std::span<const uint8_t>(&v, 1));
      tx_bytes_++;
      thre_pending_ = true;
      UpdateIrq();
      break;
    case 1:
      if (dlab) { dlm_ = v; break; }
      if ((v & 2) && !(ier_ & 2)) thre_pending_ = true;  // enabling THRE interrupt re-raises it
      ier_ = v & 0x0f;
      UpdateIrq();
      break;
    case 2:
      fcr_ = v;
      if (v & 2) rx_.clear();
      UpdateIrq();
      break;
    case 3: lcr_ = v; break;
    case 4: mcr_ = v & 0x1f; break;
    case 7: scr_ = v; break;
    default: break;  // LSR/MSR writes ignored
  }
  return true;
}

void Uart::PushInput(std::span<const uint8_t> bytes) {
  for (uint8_t b : bytes) {
    if (rx_.size() >= kRxMax) { rx_dropped_++; continue; }
    rx_.push_back(b);
    rx_bytes_++;
  }
  UpdateIrq();
}

std::vector<uint8_t> Uart::SaveState() const {
  StateWriter w;
  w.PutU32(kVersion);
  for (uint8_t r : {ier_, lcr_, mcr_, scr_, dll_, dlm_, fcr_}) w.PutU8(r);
  w.PutBool(thre_pending_);
  std::vector<uint8_t> rx(rx_.begin(), rx_.end());
  w.PutBytes(rx);
  return w.Take();
}

Status Uart::RestoreState(std::span<const uint8_t> blob) {
  StateReader r(blob, kRxMax);
  FERRY_RETURN_IF_ERROR(r.ExpectVersion("uart", kVersion), "uart");
  uint8_t regs[7];
  for (auto& x : regs) FERRY_ASSIGN(x, r.GetU8());
  bool thre;
  std::vector<uint8_t> rx;
  FERRY_ASSIGN(thre, r.GetBool());
  FERRY_ASSIGN(rx, r.GetBytes());
  FERRY_RETURN_IF_ERROR(r.ExpectEnd("uart"), "uart");
  ier_ = regs[0] & 0x0f; lcr_ = regs[1]; mcr_ = regs[2]; scr_ = regs[3]; dll_ = regs[4]; dlm_ = regs[5]; fcr_ = regs[6];
  thre_pending_ = thre;
  rx_.assign(rx.begin(), rx.end());
  return {};
}

nlohmann::json Uart::Metrics() const {
  return {{"tx_bytes", tx_bytes_}, {"rx_bytes", rx_bytes_}, {"rx_dropped", rx_dropped_}};
}

}  // namespace ferry
