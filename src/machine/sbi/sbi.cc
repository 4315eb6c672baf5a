#include "machine/sbi/sbi.h"

#include <spdlog/spdlog.h>

#include "common/state_io.h"

namespace ferry {
namespace {
constexpr int64_t kOk = 0, kNotSupported = -2, kInvalidParam = -3, kAlreadyAvailable = -6;
constexpr uint64_t kBase = 0x10, kTime = 0x54494D45, kIpi = 0x735049, kRfence = 0x52464E43, kHsm = 0x48534D,
                   kSrst = 0x53525354;
constexpr uint32_t kVersion = 1;
}  // namespace

SbiAction Sbi::HandleSbi(int hart_id, SbiCall& c) {
  calls_++;
  c.error = kOk;
  c.value = 0;
  switch (c.eid) {
    case 0x00:  // legacy set_timer
    case kTime:
      if (c.eid == kTime && c.fid != 0) { c.error = kNotSupported; break; }
      stimecmp_ = c.args[0];
      if (hart_) hart_->SetTimerDeadline(InterruptLine::kSupervisorTimer, stimecmp_);
      break;
    case 0x01: {  // legacy console_putchar
      uint8_t ch = static_cast<uint8_t>(c.args[0]);
      if (out_) out_(std::span<const uint8_t>(&ch, 1));
      break;
    }
    case 0x02: c.error = -1; break;  // legacy console_getchar: nothing (input goes through the UART)
    case 0x08: return SbiAction::kShutdown;
    case kBase:
      switch (c.fid) {
        case 0: c.value = 1u << 24; break;  // spec v1.0
        case 1: c.value = 0x46; break;      // implementation id ('F'erry)
        case 2: c.value = 1; break;
        case 3: {
          uint64_t e = c.args[0];
          c.value = (e == kBase || e == kTime || e == kIpi || e == kRfence || e == kHsm || e == kSrst || e <= 0x08) ? 1 : 0;
          break;
        }
        case 4: case 5: case 6: c.value = 0; break;
        default: c.error = kNotSupported;
      }
      break;
    case kIpi:
      if (hart_ && (c.args[1] == ~0ull || (c.args[0] >> (static_cast<uint64_t>(hart_id) - c.args[1])) & 1))
        hart_->SetInterruptLine(InterruptLine::kSupervisorSoftware, true);
      break;
    case kRfence: break;  // one hart: the caller's own fences already happened
    case kHsm:
      if (c.fid == 2) { if (c.args[0] == static_cast<uint64_t>(hart_id)) c.value = 0; else c.error = kInvalidParam; }
      else if (c.fid == 0) c.error = c.args[0] == static_cast<uint64_t>(hart_id) ? kAlreadyAvailable : kInvalidParam;
      else c.error = kNotSupported;
      break;
    case kSrst:
      if (c.fid != 0) { c.error = kNotSupported; break; }
      if (c.args[0] == 0) return SbiAction::kShutdown;
      if (c.args[0] == 1 || c.args[0] == 2) return SbiAction::kReset;
      c.error = kInvalidParam;
      break;
    default:
      unsupported_++;
      if (unsupported_ <= 8) spdlog::debug("sbi: unsupported call eid={:#x} fid={}", c.eid, c.fid);
      c.error = kNotSupported;
  }
  return SbiAction::kContinue;
}

std::vector<uint8_t> Sbi::SaveState() const {
  StateWriter w;
  w.PutU32(kVersion);
  w.PutU64(stimecmp_);
  return w.Take();
}

Status Sbi::RestoreState(std::span<const uint8_t> blob) {
  StateReader r(blob);
  FERRY_RETURN_IF_ERROR(r.ExpectVersion("sbi", kVersion), "sbi");
  uint64_t t;
  FERRY_ASSIGN(t, r.GetU64());
  FERRY_RETURN_IF_ERROR(r.ExpectEnd("sbi"), "sbi");
  stimecmp_ = t;
  return {};
}

void Sbi::PostRestore() {
  if (hart_) hart_->SetTimerDeadline(InterruptLine::kSupervisorTimer, stimecmp_);
}

nlohmann::json Sbi::Metrics() const { return {{"calls", calls_}, {"unsupported", unsupported_}}; }

}  // namespace ferry
