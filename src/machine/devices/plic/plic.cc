#include "machine/devices/plic/plic.h"

#include "common/state_io.h"

namespace ferry {
namespace {
constexpr uint32_t kVersion = 1;
}

void Plic::SetIrq(uint32_t irq, bool level) {
  if (irq == 0 || irq >= kSources) return;
  uint32_t bit = 1u << (irq % 32);
  if (level) level_[irq / 32] |= bit;
  else level_[irq / 32] &= ~bit;
  bool claimed = claimed_[irq / 32] & bit;
  SetPending(irq, level && !claimed);
  Update();
}

uint32_t Plic::BestPending(uint32_t ctx) const {
  uint32_t best = 0, best_prio = 0;
  for (uint32_t s = 1; s < kSources; ++s) {
    if (!Pending(s) || !((enable_[ctx][s / 32] >> (s % 32)) & 1)) continue;
    if (priority_[s] > threshold_[ctx] && priority_[s] > best_prio) {
      best = s;
      best_prio = priority_[s];
    }
  }
  return best;
}

void Plic::Update() {
  if (!hart_) return;
  hart_->SetInterruptLine(InterruptLine::kMachineExternal, BestPending(0) != 0);
  hart_->SetInterruptLine(InterruptLine::kSupervisorExternal, BestPending(1) != 0);
}

bool Plic::MmioRead(uint64_t off, unsigned size, uint64_t* value) {
  if (size != 4) return false;
  *value = 0;
  if (off < 4 * kSources) { *value = priority_[off / 4]; return true; }
  if (off >= 0x1000 && off < 0x1000 + kSources / 8) { *value = pending_[(off - 0x1000) / 4]; return true; }
  if (off >= 0x2000 && off < 0x2000 + 0x80 * kContexts) {
    uint32_t ctx = static_cast<uint32_t>((off - 0x2000) / 0x80), word = static_cast<uint32_t>((off - 0x2000) % 0x80) / 4;
    if (word < kSources / 32) *value = enable_[ctx][word];
    return true;
  }
  if (off >= 0x200000 && off < 0x200000 + 0x1000ull * kContexts) {
    uint32_t ctx = static_cast<uint32_t>((off - 0x200000) / 0x1000), reg = static_cast<uint32_t>(off % 0x1000);
    if (reg == 0) *value = threshold_[ctx];
    else if (reg == 4) {  // claim
      uint32_t s = BestPending(ctx);
      if (s) {
        SetPending(s, false);
        claimed_[s / 32] |= 1u << (s % 32);
        claims_++;
        Update();
      }
      *value = s;
    }
    return true;
  }
  return true;  // reserved space reads as zero
}

bool Plic::MmioWrite(uint64_t off, unsigned size, uint64_t value) {
  if (size != 4) return false;
  uint32_t v = static_cast<uint32_t>(value);
  if (off < 4 * kSources) {
    if (off / 4 != 0) priority_[off / 4] = v & 7;
    Update();
    return true;
  }
  if (off >= 0x2000 && off < 0x2000 + 0x80 * kContexts) {
    uint32_t ctx = static_cast<uint32_t>((off - 0x2000) / 0x80), word = static_cast<uint32_t>((off - 0x2000) % 0x80) / 4;
    if (word < kSources / 32) enable_[ctx][word] = word == 0 ? (v & ~1u) : v;
    Update();
    return true;
  }
  if (off >= 0x200000 && off < 0x200000 + 0x1000ull * kContexts) {
    uint32_t ctx = static_cast<uint32_t>((off - 0x200000) / 0x1000), reg = static_cast<uint32_t>(off % 0x1000);
    if (reg == 0) threshold_[ctx] = v & 7;
    else if (reg == 4 && v > 0 && v < kSources) {  // complete
      claimed_[v / 32] &= ~(1u << (v % 32));
      if ((level_[v / 32] >> (v % 32)) & 1) SetPending(v, true);
    }
    Update();
    return true;
  }
  return true;
}

std::vector<uint8_t> Plic::SaveState() const {
  StateWriter w;
  w.PutU32(kVersion);
  w.PutArray(std::span<const uint32_t>(priority_));
  w.PutArray(std::span<const uint32_t>(pending_));
  w.PutArray(std::span<const uint32_t>(level_));
  w.PutArray(std::span<const uint32_t>(claimed_));
  for (const auto& e : enable_) w.PutArray(std::span<const uint32_t>(e));
  w.PutArray(std::span<const uint32_t>(threshold_));
  return w.Take();
}

Status Plic::RestoreState(std::span<const uint8_t> blob) {
  StateReader r(blob);
  FERRY_RETURN_IF_ERROR(r.ExpectVersion("plic", kVersion), "plic");
  std::vector<uint32_t> prio, pend, lvl, clm, thr;
  std::vector<uint32_t> en[kContexts];
  FERRY_RETURN_IF_ERROR(r.GetArray(&prio, kSources), "plic priority");
  FERRY_RETURN_IF_ERROR(r.GetArray(&pend, kSources / 32), "plic pending");
  FERRY_RETURN_IF_ERROR(r.GetArray(&lvl, kSources / 32), "plic levels");
  FERRY_RETURN_IF_ERROR(r.GetArray(&clm, kSources / 32), "plic claimed");
  for (auto& e : en) FERRY_RETURN_IF_ERROR(r.GetArray(&e, kSources / 32), "plic enable");
  FERRY_RETURN_IF_ERROR(r.GetArray(&thr, kContexts), "plic threshold");
  FERRY_RETURN_IF_ERROR(r.ExpectEnd("plic"), "plic");
  for (uint32_t p : prio) if (p > 7) return Errorf(ErrorCode::kCorrupt, "plic: priority {} out of range", p);
  for (uint32_t t : thr) if (t > 7) return Errorf(ErrorCode::kCorrupt, "plic: threshold {} out of range", t);
  std::copy(prio.begin(), prio.end(), priority_.begin());
  std::copy(pend.begin(), pend.end(), pending_.begin());
  std::copy(lvl.begin(), lvl.end(), level_.begin());
  std::copy(clm.begin(), clm.end(), claimed_.begin());
  for (uint32_t c = 0; c < kContexts; ++c) std::copy(en[c].begin(), en[c].end(), enable_[c].begin());
  std::copy(thr.begin(), thr.end(), threshold_.begin());
  return {};
}

nlohmann::json Plic::Metrics() const { return {{"claims", claims_}}; }

}  // namespace ferry
