// Control and status registers, trap entry/return, interrupt selection, timers.
#include "cpu/riscv/mem_inline.h"

namespace ferry::riscv {

namespace {
constexpr uint64_t kSstatusMask = kMstatusSIE | kMstatusSPIE | kMstatusSPP | kMstatusFS | kMstatusSUM |
                                  kMstatusMXR | (3ull << 32) | kMstatusSD;
constexpr uint64_t kUxlSxl = (2ull << 32) | (2ull << 34);
constexpr uint64_t kSInterrupts = (1ull << 1) | (1ull << 5) | (1ull << 9);
constexpr uint64_t kAllInterrupts = kSInterrupts | (1ull << 3) | (1ull << 7) | (1ull << 11);
constexpr uint64_t kMipWritable = (1ull << 1) | (1ull << 5) | (1ull << 9);  // SSIP, STIP, SEIP (by M)
constexpr uint64_t kDelegableExceptions = 0xb3ff;  // all but ecall from M (11) and reserved 10, 14

uint64_t StatusWithSd(uint64_t s) {
  s |= kUxlSxl;
  if ((s & kMstatusFS) == kMstatusFS) s |= kMstatusSD;
  return s;
}
}  // namespace

bool RiscvCpu::CsrRead(uint32_t csr, uint64_t* v, bool will_write) {
  const int min_priv = (csr >> 8) & 3;
  if (priv_ < min_priv) return false;
  if (will_write && (csr >> 10) == 3) return false;  // read-only CSR
  switch (csr) {
    case 0x001: if (!FpEnabled()) return false; *v = fflags_; return true;
    case 0x002: if (!FpEnabled()) return false; *v = frm_; return true;
    case 0x003: if (!FpEnabled()) return false; *v = (frm_ << 5) | fflags_; return true;
    case 0xC00: case 0xC01: case 0xC02: {
      uint64_t bit = 1ull << (csr - 0xC00);
      if (priv_ < kMachine && !(mcounteren_ & bit)) return false;
      if (priv_ == kUser && !(scounteren_ & bit)) return false;
      if (csr == 0xC01) *v = env_.time ? env_.time->Ticks() : 0;
      else *v = instret_;
      return true;
    }
    case 0x100: *v = StatusWithSd(mstatus_) & kSstatusMask; return true;
    case 0x104: *v = mie_ & mideleg_; return true;
    case 0x105: *v = stvec_; return true;
    case 0x106: *v = scounteren_; return true;
    case 0x10A: *v = senvcfg_; return true;
    case 0x140: *v = sscratch_; return true;
    case 0x141: *v = sepc_; return true;
    case 0x142: *v = scause_; return true;
    case 0x143: *v = stval_; return true;
    case 0x144: *v = Mip() & mideleg_; return true;
    case 0x180:
      if (priv_ == kSupervisor && (mstatus_ & kMstatusTVM)) return false;
      *v = satp_;
      return true;
    case 0xF11: case 0xF12: case 0xF13: case 0xF15: *v = 0; return true;
    case 0xF14: *v = static_cast<uint64_t>(hart_id_); return true;
    case 0x300: *v = StatusWithSd(mstatus_); return true;
    case 0x301: *v = misa_; return true;
    case 0x302: *v = medeleg_; return true;
    case 0x303: *v = mideleg_; return true;
    case 0x304: *v = mie_; return true;
    case 0x305: *v = mtvec_; return true;
    case 0x306: *v = mcounteren_; return true;
    case 0x30A: *v = menvcfg_; return true;
    case 0x320: *v = mcountinhibit_; return true;
    case 0x340: *v = mscratch_; return true;
    case 0x341: *v = mepc_; return true;
    case 0x342: *v = mcause_; return true;
    case 0x343: *v = mtval_; return true;
    case 0x344: *v = Mip(); return true;
    case 0xB00: case 0xB02: *v = instret_; return true;
    default:
      if (csr >= 0x3A0 && csr <= 0x3AF) { *v = (csr & 1) ? 0 : pmpcfg_[csr - 0x3A0]; return !(csr & 1); }
      if (csr >= 0x3B0 && csr <= 0x3EF) { *v = pmpaddr_[csr - 0x3B0]; return true; }
      if ((csr >= 0x323 && csr <= 0x33F) || (csr >= 0xB03 && csr <= 0xB1F)) { *v = 0; return true; }
      if (csr >= 0xC03 && csr <= 0xC1F) { *v = 0; return true; }
      return false;
  }
}

bool RiscvCpu::CsrWrite(uint32_t csr, uint64_t v) {
  switch (csr) {
    case 0x001: fflags_ = v & 0x1f; MarkFsDirty(); return true;
    case 0x002: frm_ = v & 7; MarkFsDirty(); return true;
    case 0x003: fflags_ = v & 0x1f; frm_ = (v >> 5) & 7; MarkFsDirty(); return true;
    case 0x100: {
      uint64_t mask = kSstatusMask & ~(kMstatusSD | (3ull << 32));
      uint64_t old = mstatus_;
      mstatus_ = (mstatus_ & ~mask) | (v & mask);
      if ((old ^ mstatus_) & (kMstatusSUM | kMstatusMXR)) FlushTlb();
      break;
    }
    case 0x104: mie_ = (mie_ & ~mideleg_) | (v & mideleg_ & kAllInterrupts); break;
    case 0x105: stvec_ = v & ~2ull; return true;
    case 0x106: scounteren_ = v & 0xffffffff; return true;
    case 0x10A: senvcfg_ = v & 1; return true;
    case 0x140: sscratch_ = v; return true;
    case 0x141: sepc_ = v & ~1ull; return true;
    case 0x142: scause_ = v & (kInterruptBit | 0x3f); return true;
    case 0x143: stval_ = v; return true;
    case 0x144: mip_ = (mip_ & ~(mideleg_ & 2)) | (v & mideleg_ & 2); break;  // only SSIP
    case 0x180: {
      uint64_t mode = v >> 60;
      if (mode != 0 && mode != 8 && mode != 9) return true;  // WARL: ignore unsupported modes
      satp_ = v & ((0xfull << 60) | ((1ull << 44) - 1));  // ASID not implemented (ASIDLEN = 0)
      FlushTlb();
      return true;
    }
    case 0x300: {
      uint64_t old = mstatus_;
      uint64_t nv = (mstatus_ & ~kMstatusWritable) | (v & kMstatusWritable);
      if (((nv & kMstatusMPP) >> 11) == 2) nv &= ~kMstatusMPP;  // WARL: reserved MPP -> U
      mstatus_ = nv;
      if ((old ^ mstatus_) & (kMstatusSUM | kMstatusMXR | kMstatusMPRV | kMstatusMPP)) FlushTlb();
      break;
    }
    case 0x301: return true;  // misa is read-only here (WARL)
    case 0x302: medeleg_ = v & kDelegableExceptions; return true;
    case 0x303: mideleg_ = v & kSInterrupts; break;
    case 0x304: mie_ = v & kAllInterrupts; break;
    case 0x305: mtvec_ = v & ~2ull; return true;
    case 0x306: mcounteren_ = v & 0xffffffff; return true;
    case 0x30A: menvcfg_ = v & 1; return true;
    case 0x320: mcountinhibit_ = v & 0xfffffffd; return true;
    case 0x340: mscratch_ = v; return true;
    case 0x341: mepc_ = v & ~1ull; return true;
    case 0x342: mcause_ = v & (kInterruptBit | 0x3f); return true;
    case 0x343: mtval_ = v; return true;
    case 0x344: mip_ = (mip_ & ~kMipWritable) | (v & kMipWritable); break;
    case 0xB00: case 0xB02: instret_ = v; return true;
    default:
      if (csr >= 0x3A0 && csr <= 0x3AF) { if (!(csr & 1)) pmpcfg_[csr - 0x3A0] = v; return true; }
      if (csr >= 0x3B0 && csr <= 0x3EF) { pmpaddr_[csr - 0x3B0] = v & ((1ull << 54) - 1); return true; }
      return true;  // hpm counters/events: hardwired zero
  }
  attention_.store(true, std::memory_order_relaxed);  // interrupt enables may have changed
  return true;
}

uint64_t RiscvCpu::ReadCsrForTest(uint32_t csr) const {
  uint64_t v = 0;
  int saved = priv_;
  auto* self = const_cast<RiscvCpu*>(this);
  self->priv_ = kMachine;
  self->CsrRead(csr, &v, false);
  self->priv_ = saved;
  return v;
}

void RiscvCpu::WriteCsrForTest(uint32_t csr, uint64_t v) { CsrWrite(csr, v); }

void RiscvCpu::RaiseException(uint64_t cause, uint64_t tval) { TakeTrap(cause, tval, false); }

void RiscvCpu::TakeTrap(uint64_t cause, uint64_t tval, bool interrupt) {
  if (interrupt) counters_.interrupts++;
  else counters_.exceptions++;
  if (host_trap_mode_ && !interrupt) {
    host_trap_taken_ = true;
    attention_.store(true, std::memory_order_relaxed);
    last_trap_cause_ = cause;
    last_trap_tval_ = tval;
    last_trap_pc_ = pc_;
    return;
  }
  reservation_ = ~0ull;
  wfi_ = false;
  uint64_t deleg = interrupt ? mideleg_ : medeleg_;
  uint64_t mcause = cause | (interrupt ? kInterruptBit : 0);
  if (priv_ <= kSupervisor && ((deleg >> cause) & 1)) {
    scause_ = mcause;
    sepc_ = pc_;
    stval_ = tval;
    mstatus_ = (mstatus_ & ~(kMstatusSPIE | kMstatusSPP | kMstatusSIE)) |
               ((mstatus_ & kMstatusSIE) ? kMstatusSPIE : 0) | (priv_ == kSupervisor ? kMstatusSPP : 0);
    priv_ = kSupervisor;
    pc_ = (stvec_ & ~3ull) + ((interrupt && (stvec_ & 1)) ? 4 * cause : 0);
  } else {
    mcause_ = mcause;
    mepc_ = pc_;
    mtval_ = tval;
    mstatus_ = (mstatus_ & ~(kMstatusMPIE | kMstatusMPP | kMstatusMIE)) |
               ((mstatus_ & kMstatusMIE) ? kMstatusMPIE : 0) | (static_cast<uint64_t>(priv_) << 11);
    priv_ = kMachine;
    pc_ = (mtvec_ & ~3ull) + ((interrupt && (mtvec_ & 1)) ? 4 * cause : 0);
  }
}

void RiscvCpu::DoMret() {
  int mpp = static_cast<int>((mstatus_ >> 11) & 3);
  mstatus_ = (mstatus_ & ~(kMstatusMIE | kMstatusMPP)) | ((mstatus_ & kMstatusMPIE) ? kMstatusMIE : 0) |
             kMstatusMPIE;
  if (mpp != kMachine) mstatus_ &= ~kMstatusMPRV;
  priv_ = mpp;
  pc_ = mepc_;
  reservation_ = ~0ull;
  attention_.store(true, std::memory_order_relaxed);
}

void RiscvCpu::DoSret() {
  int spp = (mstatus_ & kMstatusSPP) ? kSupervisor : kUser;
  mstatus_ = (mstatus_ & ~(kMstatusSIE | kMstatusSPP)) | ((mstatus_ & kMstatusSPIE) ? kMstatusSIE : 0) |
             kMstatusSPIE;
  mstatus_ &= ~kMstatusMPRV;
  priv_ = spp;
  pc_ = sepc_;
  reservation_ = ~0ull;
  attention_.store(true, std::memory_order_relaxed);
}

void RiscvCpu::UpdateTimerLines(uint64_t now) {
  uint64_t set = 0, clear = 0;
  ((now >= mtimer_deadline_.load(std::memory_order_relaxed)) ? set : clear) |= 1ull << 7;
  ((now >= stimer_deadline_.load(std::memory_order_relaxed)) ? set : clear) |= 1ull << 5;
  uint64_t cur = lines_.load(std::memory_order_relaxed);
  uint64_t want = (cur | set) & ~clear;
  if (want != cur) {
    if (set & ~cur) lines_.fetch_or(set & ~cur, std::memory_order_relaxed);
    if (clear & cur) lines_.fetch_and(~(clear & cur), std::memory_order_relaxed);
  }
}

bool RiscvCpu::CheckInterrupts() {
  uint64_t pending = Mip() & mie_;
  if (!pending) return false;
  uint64_t m_enabled = (priv_ < kMachine || (mstatus_ & kMstatusMIE)) ? pending & ~mideleg_ : 0;
  uint64_t s_enabled =
      (priv_ < kSupervisor || (priv_ == kSupervisor && (mstatus_ & kMstatusSIE))) ? pending & mideleg_ : 0;
  uint64_t take = m_enabled ? m_enabled : s_enabled;
  if (!take) return false;
  static constexpr int kOrder[] = {11, 3, 7, 9, 1, 5};
  for (int cause : kOrder) {
    if (take & (1ull << cause)) {
      TakeTrap(static_cast<uint64_t>(cause), 0, true);
      return true;
    }
  }
  return false;
}

}  // namespace ferry::riscv
