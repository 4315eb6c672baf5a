#include "machine/devices/clint/clint.h"

#include <time.h>

#include "common/state_io.h"

namespace ferry {
namespace {
constexpr uint32_t kVersion = 1;
}

uint64_t Clint::HostTicks() {
  timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return static_cast<uint64_t>(ts.tv_sec) * kFrequency + static_cast<uint64_t>(ts.tv_nsec) / (1'000'000'000 / kFrequency);
}

// mtime is a wrapping 64-bit counter: the guest (or a restored state) may set any value, so the
// offset to the host clock is kept modulo 2^64 (unsigned arithmetic; a signed difference overflowed
// for values near 2^63 - found by fuzz_devices).
Clint::Clint() { offset_ = 0 - HostTicks(); }

uint64_t Clint::Ticks() const {
  MutexLock l(mu_);
  return paused_ ? frozen_ : HostTicks() + offset_;
}

void Clint::SetTicks(uint64_t t) {
  MutexLock l(mu_);
  if (paused_) frozen_ = t;
  else offset_ = t - HostTicks();
}

void Clint::Pause() {
  MutexLock l(mu_);
  if (paused_) return;
  frozen_ = HostTicks() + offset_;
  paused_ = true;
}

void Clint::Resume() {
  MutexLock l(mu_);
  if (!paused_) return;
  offset_ = frozen_ - HostTicks();
  paused_ = false;
}

bool Clint::paused() const {
  MutexLock l(mu_);
  return paused_;
}

bool Clint::MmioRead(uint64_t off, unsigned size, uint64_t* value) {
  if (off == 0 && size == 4) { *value = msip_; return true; }
  if (off >= 0x4000 && off < 0x4008) {
    uint64_t v = mtimecmp_ >> (8 * (off - 0x4000));
    *value = size == 4 ? (v & 0xffffffff) : v;
    return size == 8 ? off == 0x4000 : size == 4;
  }
  if (off >= 0xbff8 && off < 0xc000) {
    uint64_t v = Ticks() >> (8 * (off - 0xbff8));
    *value = size == 4 ? (v & 0xffffffff) : v;
    return size == 8 ? off == 0xbff8 : size == 4;
  }
  *value = 0;
  return size == 4 || size == 8;
}

bool Clint::MmioWrite(uint64_t off, unsigned size, uint64_t value) {
  if (off == 0 && size == 4) {
    msip_ = value & 1;
    if (hart_) hart_->SetInterruptLine(InterruptLine::kMachineSoftware, msip_);
    return true;
  }
  if (off >= 0x4000 && off < 0x4008 && (size == 4 || (size == 8 && off == 0x4000))) {
    if (size == 8) mtimecmp_ = value;
    else if (off == 0x4000) mtimecmp_ = (mtimecmp_ & ~0xffffffffull) | (value & 0xffffffff);
    else mtimecmp_ = (mtimecmp_ & 0xffffffffull) | (value << 32);
    if (hart_) hart_->SetTimerDeadline(InterruptLine::kMachineTimer, mtimecmp_);
    return true;
  }
  if (off >= 0xbff8 && off < 0xc000 && (size == 8 || size == 4)) {
    uint64_t t = Ticks();
    if (size == 8) t = value;
    else if (off == 0xbff8) t = (t & ~0xffffffffull) | (value & 0xffffffff);
    else t = (t & 0xffffffffull) | (value << 32);
    SetTicks(t);
    return true;
  }
  return size == 4 || size == 8;
}

std::vector<uint8_t> Clint::SaveState() const {
  StateWriter w;
  w.PutU32(kVersion);
  w.PutU64(Ticks());
  w.PutU64(mtimecmp_);
  w.PutU32(msip_);
  return w.Take();
}

Status Clint::RestoreState(std::span<const uint8_t> blob) {
  StateReader r(blob);
  FERRY_RETURN_IF_ERROR(r.ExpectVersion("clint", kVersion), "clint");
  uint64_t t, cmp;
  uint32_t msip;
  FERRY_ASSIGN(t, r.GetU64());
  FERRY_ASSIGN(cmp, r.GetU64());
  FERRY_ASSIGN(msip, r.GetU32());
  FERRY_RETURN_IF_ERROR(r.ExpectEnd("clint"), "clint");
  if (msip > 1) return Errorf(ErrorCode::kCorrupt, "clint: msip {} invalid", msip);
  SetTicks(t);
  mtimecmp_ = cmp;
  msip_ = msip;
  return {};
}

void Clint::PostRestore() {
  if (!hart_) return;
  hart_->SetInterruptLine(InterruptLine::kMachineSoftware, msip_);
  hart_->SetTimerDeadline(InterruptLine::kMachineTimer, mtimecmp_);
}

nlohmann::json Clint::Metrics() const { return {{"mtime", Ticks()}, {"mtimecmp", mtimecmp_}}; }

}  // namespace ferry
