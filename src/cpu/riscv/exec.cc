// Instruction fetch, RV64IMA + Zicsr + Zifencei + privileged instruction execution,
// and C-extension expansion. Every handler either advances pc_ or has taken a trap.
#include <cstring>
#include <vector>

#include "cpu/riscv/mem_inline.h"

namespace ferry::riscv {

namespace {
inline int64_t Sext32(uint64_t v) { return static_cast<int32_t>(static_cast<uint32_t>(v)); }
inline uint32_t Rd(uint32_t i) { return (i >> 7) & 31; }
inline uint32_t Rs1(uint32_t i) { return (i >> 15) & 31; }
inline uint32_t Rs2(uint32_t i) { return (i >> 20) & 31; }
inline uint32_t F3(uint32_t i) { return (i >> 12) & 7; }
inline uint32_t F7(uint32_t i) { return i >> 25; }
inline int64_t ImmI(uint32_t i) { return static_cast<int32_t>(i) >> 20; }
inline int64_t ImmS(uint32_t i) { return static_cast<int32_t>((static_cast<uint32_t>(static_cast<int32_t>(i) >> 25) << 5) | ((i >> 7) & 31)); }
inline int64_t ImmB(uint32_t i) {
  return static_cast<int32_t>((static_cast<uint32_t>(static_cast<int32_t>(i) >> 31) << 12) | (((i >> 7) & 1) << 11) | (((i >> 25) & 0x3f) << 5) |
         (((i >> 8) & 0xf) << 1));
}
inline int64_t ImmJ(uint32_t i) {
  return static_cast<int32_t>((static_cast<uint32_t>(static_cast<int32_t>(i) >> 31) << 20) | (i & 0xff000) | (((i >> 20) & 1) << 11) |
         (((i >> 21) & 0x3ff) << 1));
}
}  // namespace

void RiscvCpu::Step() {
  const uint64_t pc = pc_;
  const uint64_t vpn = pc >> 12;
  const TlbEntry& e = tlb_code_[vpn & (kTlbSize - 1)];
  uint32_t insn;
  int len;
  if (e.tag == ((vpn << 2) | static_cast<uint64_t>(priv_)) && (pc & 0xfff) <= 0xffc) {
    std::memcpy(&insn, reinterpret_cast<const void*>(pc + e.addend), 4);
    len = (insn & 3) == 3 ? 4 : 2;
  } else if (!FetchSlow(pc, &insn, &len)) {
    return;
  }
  if (len == 2) {
    uint32_t x = compressed_table_[insn & 0xffff];
    if (x == 0) {
      RaiseException(kCauseIllegal, insn & 0xffff);
      return;
    }
    ilen_ = 2;
    raw_insn_ = insn & 0xffff;
    Execute32(x);
  } else {
    ilen_ = 4;
    raw_insn_ = insn;
    Execute32(insn);
  }
}

#define ILLEGAL()                               \
  do {                                          \
    RaiseException(kCauseIllegal, raw_insn_);   \
    return;                                     \
  } while (0)
#define WR(rd, v)                 \
  do {                            \
    uint64_t v_ = (v);            \
    if (rd) x_[rd] = v_;          \
  } while (0)

void RiscvCpu::Execute32(uint32_t insn) {
  const uint32_t rd = Rd(insn), rs1 = Rs1(insn), rs2 = Rs2(insn);
  const uint64_t a = x_[rs1], b = x_[rs2];
  const uint64_t next = pc_ + ilen_;
  switch (insn & 0x7f) {
    case 0x37: WR(rd, static_cast<uint64_t>(static_cast<int64_t>(static_cast<int32_t>(insn & 0xfffff000)))); break;
    case 0x17: WR(rd, pc_ + static_cast<int64_t>(static_cast<int32_t>(insn & 0xfffff000))); break;
    case 0x6f: WR(rd, next); pc_ += ImmJ(insn); return;
    case 0x67: {
      if (F3(insn) != 0) ILLEGAL();
      uint64_t t = (a + ImmI(insn)) & ~1ull;
      WR(rd, next);
      pc_ = t;
      return;
    }
    case 0x63: {
      bool take;
      switch (F3(insn)) {
        case 0: take = a == b; break;
        case 1: take = a != b; break;
        case 4: take = static_cast<int64_t>(a) < static_cast<int64_t>(b); break;
        case 5: take = static_cast<int64_t>(a) >= static_cast<int64_t>(b); break;
        case 6: take = a < b; break;
        case 7: take = a >= b; break;
        default: ILLEGAL();
      }
      pc_ = take ? pc_ + ImmB(insn) : next;
      return;
    }
    case 0x03: {
      uint64_t va = a + ImmI(insn);
      uint64_t v;
      switch (F3(insn)) {
        case 0: { int8_t t; if (!Load(va, &t)) return; v = static_cast<uint64_t>(static_cast<int64_t>(t)); break; }
        case 1: { int16_t t; if (!Load(va, &t)) return; v = static_cast<uint64_t>(static_cast<int64_t>(t)); break; }
        case 2: { int32_t t; if (!Load(va, &t)) return; v = static_cast<uint64_t>(static_cast<int64_t>(t)); break; }
        case 3: { uint64_t t; if (!Load(va, &t)) return; v = t; break; }
        case 4: { uint8_t t; if (!Load(va, &t)) return; v = t; break; }
        case 5: { uint16_t t; if (!Load(va, &t)) return; v = t; break; }
        case 6: { uint32_t t; if (!Load(va, &t)) return; v = t; break; }
        default: ILLEGAL();
      }
      WR(rd, v);
      break;
    }
    case 0x23: {
      uint64_t va = a + ImmS(insn);
      bool ok;
      switch (F3(insn)) {
        case 0: ok = Store<uint8_t>(va, static_cast<uint8_t>(b)); break;
        case 1: ok = Store<uint16_t>(va, static_cast<uint16_t>(b)); break;
        case 2: ok = Store<uint32_t>(va, static_cast<uint32_t>(b)); break;
        case 3: ok = Store<uint64_t>(va, b); break;
        default: ILLEGAL();
      }
      if (!ok) return;
      break;
    }
    case 0x13: {
      int64_t imm = ImmI(insn);
      uint32_t sh = (insn >> 20) & 63;
      switch (F3(insn)) {
        case 0: WR(rd, a + imm); break;
        case 1: if ((insn >> 26) != 0) ILLEGAL(); WR(rd, a << sh); break;
        case 2: WR(rd, static_cast<int64_t>(a) < imm ? 1 : 0); break;
        case 3: WR(rd, a < static_cast<uint64_t>(imm) ? 1 : 0); break;
        case 4: WR(rd, a ^ imm); break;
        case 5:
          if ((insn >> 26) == 0) WR(rd, a >> sh);
          else if ((insn >> 26) == 0x10) WR(rd, static_cast<uint64_t>(static_cast<int64_t>(a) >> sh));
          else ILLEGAL();
          break;
        case 6: WR(rd, a | imm); break;
        case 7: WR(rd, a & imm); break;
      }
      break;
    }
    case 0x1b: {
      uint32_t sh = (insn >> 20) & 31;
      switch (F3(insn)) {
        case 0: WR(rd, Sext32(a + ImmI(insn))); break;
        case 1: if (F7(insn) != 0) ILLEGAL(); WR(rd, Sext32(static_cast<uint32_t>(a) << sh)); break;
        case 5:
          if (F7(insn) == 0) WR(rd, Sext32(static_cast<uint32_t>(a) >> sh));
          else if (F7(insn) == 0x20) WR(rd, static_cast<uint64_t>(static_cast<int64_t>(static_cast<int32_t>(a) >> sh)));
          else ILLEGAL();
          break;
        default: ILLEGAL();
      }
      break;
    }
    case 0x33: {
      const uint32_t f7 = F7(insn);
      if (f7 == 0) {
        switch (F3(insn)) {
          case 0: WR(rd, a + b); break;
          case 1: WR(rd, a << (b & 63)); break;
          case 2: WR(rd, static_cast<int64_t>(a) < static_cast<int64_t>(b)); break;
          case 3: WR(rd, a < b); break;
          case 4: WR(rd, a ^ b); break;
          case 5: WR(rd, a >> (b & 63)); break;
          case 6: WR(rd, a | b); break;
          case 7: WR(rd, a & b); break;
        }
      } else if (f7 == 0x20) {
        if (F3(insn) == 0) WR(rd, a - b);
        else if (F3(insn) == 5) WR(rd, static_cast<uint64_t>(static_cast<int64_t>(a) >> (b & 63)));
        else ILLEGAL();
      } else if (f7 == 1) {
        const int64_t sa = static_cast<int64_t>(a), sb = static_cast<int64_t>(b);
        switch (F3(insn)) {
          case 0: WR(rd, a * b); break;
          case 1: WR(rd, static_cast<uint64_t>((static_cast<__int128>(sa) * sb) >> 64)); break;
          case 2: WR(rd, static_cast<uint64_t>((static_cast<__int128>(sa) * static_cast<unsigned __int128>(b)) >> 64)); break;
          case 3: WR(rd, static_cast<uint64_t>((static_cast<unsigned __int128>(a) * b) >> 64)); break;
          case 4: WR(rd, b == 0 ? ~0ull : (sa == INT64_MIN && sb == -1) ? a : static_cast<uint64_t>(sa / sb)); break;
          case 5: WR(rd, b == 0 ? ~0ull : a / b); break;
          case 6: WR(rd, b == 0 ? a : (sa == INT64_MIN && sb == -1) ? 0 : static_cast<uint64_t>(sa % sb)); break;
          case 7: WR(rd, b == 0 ? a : a % b); break;
        }
      } else {
        ILLEGAL();
      }
      break;
    }
    case 0x3b: {
      const uint32_t f7 = F7(insn), f3 = F3(insn);
      const uint32_t wa = static_cast<uint32_t>(a), wb = static_cast<uint32_t>(b);
      if (f7 == 0) {
        if (f3 == 0) WR(rd, Sext32(wa + wb));
        else if (f3 == 1) WR(rd, Sext32(wa << (wb & 31)));
        else if (f3 == 5) WR(rd, Sext32(wa >> (wb & 31)));
        else ILLEGAL();
      } else if (f7 == 0x20) {
        if (f3 == 0) WR(rd, Sext32(wa - wb));
        else if (f3 == 5) WR(rd, static_cast<uint64_t>(static_cast<int64_t>(static_cast<int32_t>(wa) >> (wb & 31))));
        else ILLEGAL();
      } else if (f7 == 1) {
        const int32_t sa = static_cast<int32_t>(wa), sb = static_cast<int32_t>(wb);
        switch (f3) {
          case 0: WR(rd, Sext32(wa * wb)); break;
          case 4: WR(rd, static_cast<uint64_t>(static_cast<int64_t>(wb == 0 ? -1 : (sa == INT32_MIN && sb == -1) ? sa : sa / sb))); break;
          case 5: WR(rd, Sext32(wb == 0 ? ~0u : wa / wb)); break;
          case 6: WR(rd, static_cast<uint64_t>(static_cast<int64_t>(wb == 0 ? sa : (sa == INT32_MIN && sb == -1) ? 0 : sa % sb))); break;
          case 7: WR(rd, Sext32(wb == 0 ? wa : wa % wb)); break;
          default: ILLEGAL();
        }
      } else {
        ILLEGAL();
      }
      break;
    }
    case 0x0f:
      if (F3(insn) > 1) ILLEGAL();
      break;  // FENCE / FENCE.I: one hart, and the decode cache is kept coherent by stores (decode.cc)
    case 0x2f:
      if (!ExecuteAmo(insn)) return;
      break;
    case 0x07: case 0x27: case 0x43: case 0x47: case 0x4b: case 0x4f: case 0x53:
      ExecuteFp(insn);
      return;
    case 0x73: {
      const uint32_t f3 = F3(insn);
      if (f3 == 0) {
        if (insn == 0x00000073) {  // ECALL
          if (!HandleEcall()) return;
          break;
        }
        if (insn == 0x00100073) { RaiseException(kCauseBreakpoint, pc_); return; }
        if (insn == 0x30200073) { if (priv_ < kMachine) ILLEGAL(); DoMret(); return; }
        if (insn == 0x10200073) {
          if (priv_ < kSupervisor || (priv_ == kSupervisor && (mstatus_ & kMstatusTSR))) ILLEGAL();
          DoSret();
          return;
        }
        if (insn == 0x10500073) {  // WFI
          if (priv_ == kUser || (priv_ == kSupervisor && (mstatus_ & kMstatusTW))) ILLEGAL();
          wfi_ = true;
          attention_.store(true, std::memory_order_relaxed);
          pc_ = next;
          return;
        }
        if (F7(insn) == 0x09 && rd == 0) {  // SFENCE.VMA
          if (priv_ == kUser || (priv_ == kSupervisor && (mstatus_ & kMstatusTVM))) ILLEGAL();
          FlushTlb();
          break;
        }
        ILLEGAL();
      }
      if (f3 == 4) ILLEGAL();
      const uint32_t csr = insn >> 20;
      const uint64_t src = (f3 & 4) ? rs1 : a;
      const bool writes = (f3 & 3) == 1 || rs1 != 0;
      uint64_t old = 0;
      if (!CsrRead(csr, &old, writes)) ILLEGAL();
      if (writes) {
        uint64_t nv = (f3 & 3) == 1 ? src : (f3 & 3) == 2 ? old | src : old & ~src;
        if (!CsrWrite(csr, nv)) ILLEGAL();
      }
      WR(rd, old);
      break;
    }
    default:
      ILLEGAL();
  }
  pc_ = next;
}

bool RiscvCpu::ExecuteAmo(uint32_t insn) {
  const uint32_t f3 = F3(insn), f5 = insn >> 27, rd = Rd(insn);
  if (f3 != 2 && f3 != 3) { RaiseException(kCauseIllegal, raw_insn_); return false; }
  const unsigned size = f3 == 2 ? 4 : 8;
  const uint64_t va = x_[Rs1(insn)];
  const uint64_t src = x_[Rs2(insn)];
  if (f5 == 2) {  // LR
    if (Rs2(insn) != 0) { RaiseException(kCauseIllegal, raw_insn_); return false; }
    if (va & (size - 1)) { RaiseException(kCauseMisalignedLoad, va); return false; }
    uint64_t pa, v;
    if (!Translate(va, Access::kRead, &pa)) return false;
    if (!PhysRead(pa, size, &v, Access::kRead)) { RaiseException(kCauseLoadAccess, va); return false; }
    WR(rd, size == 4 ? static_cast<uint64_t>(Sext32(v)) : v);
    reservation_ = pa;
    return true;
  }
  if (va & (size - 1)) { RaiseException(kCauseMisalignedStore, va); return false; }
  uint64_t pa;
  if (!Translate(va, Access::kWrite, &pa)) return false;
  if (f5 == 3) {  // SC
    if (reservation_ == pa) {
      reservation_ = ~0ull;
      if (!PhysWrite(pa, size, src)) { RaiseException(kCauseStoreAccess, va); return false; }
      WR(rd, 0);
    } else {
      WR(rd, 1);
    }
    reservation_ = ~0ull;
    return true;
  }
  uint64_t old;
  if (!PhysRead(pa, size, &old, Access::kRead)) { RaiseException(kCauseStoreAccess, va); return false; }
  if (size == 4) old = static_cast<uint64_t>(Sext32(old));
  const int64_t so = static_cast<int64_t>(old);
  const int64_t ss = size == 4 ? Sext32(src) : static_cast<int64_t>(src);
  const uint64_t us = size == 4 ? (src & 0xffffffffu) : src;
  const uint64_t uo = size == 4 ? (old & 0xffffffffu) : old;
  uint64_t nv;
  switch (f5) {
    case 0x01: nv = src; break;
    case 0x00: nv = old + src; break;
    case 0x04: nv = old ^ src; break;
    case 0x0c: nv = old & src; break;
    case 0x08: nv = old | src; break;
    case 0x10: nv = so < ss ? old : src; break;
    case 0x14: nv = so > ss ? old : src; break;
    case 0x18: nv = uo < us ? old : src; break;
    case 0x1c: nv = uo > us ? old : src; break;
    default: RaiseException(kCauseIllegal, raw_insn_); return false;
  }
  if (!PhysWrite(pa, size, nv)) { RaiseException(kCauseStoreAccess, va); return false; }
  WR(rd, old);
  return true;
}

bool RiscvCpu::HandleEcall() {
  if (priv_ == kSupervisor && env_.sbi && !host_trap_mode_) {
    SbiCall call{};
    for (int i = 0; i < 6; ++i) call.args[i] = x_[10 + i];
    call.fid = x_[16];
    call.eid = x_[17];
    SbiAction act = env_.sbi->HandleSbi(hart_id_, call);
    x_[10] = static_cast<uint64_t>(call.error);
    x_[11] = call.value;
    if (act != SbiAction::kContinue) {
      sbi_action_ = static_cast<int>(act);
      attention_.store(true, std::memory_order_relaxed);
    }
    attention_.store(true, std::memory_order_relaxed);  // timers may have been re-armed
    return true;
  }
  RaiseException(priv_ == kUser ? kCauseEcallU : priv_ == kSupervisor ? kCauseEcallS : kCauseEcallM, 0);
  return false;
}

// --- C extension: expand a 16-bit instruction into its 32-bit equivalent (0 = illegal) ---
namespace {
inline uint32_t EncI(uint32_t op, uint32_t rd, uint32_t f3, uint32_t rs1, int32_t imm) {
  return (static_cast<uint32_t>(imm & 0xfff) << 20) | (rs1 << 15) | (f3 << 12) | (rd << 7) | op;
}
inline uint32_t EncS(uint32_t op, uint32_t f3, uint32_t rs1, uint32_t rs2, int32_t imm) {
  return (static_cast<uint32_t>((imm >> 5) & 0x7f) << 25) | (rs2 << 20) | (rs1 << 15) | (f3 << 12) |
         (static_cast<uint32_t>(imm & 0x1f) << 7) | op;
}
inline uint32_t EncR(uint32_t op, uint32_t rd, uint32_t f3, uint32_t rs1, uint32_t rs2, uint32_t f7) {
  return (f7 << 25) | (rs2 << 20) | (rs1 << 15) | (f3 << 12) | (rd << 7) | op;
}
inline uint32_t EncB(uint32_t f3, uint32_t rs1, uint32_t rs2, int32_t imm) {
  uint32_t u = static_cast<uint32_t>(imm);
  return (((u >> 12) & 1) << 31) | (((u >> 5) & 0x3f) << 25) | (rs2 << 20) | (rs1 << 15) | (f3 << 12) |
         (((u >> 1) & 0xf) << 8) | (((u >> 11) & 1) << 7) | 0x63;
}
inline uint32_t EncJ(uint32_t rd, int32_t imm) {
  uint32_t u = static_cast<uint32_t>(imm);
  return (((u >> 20) & 1) << 31) | (((u >> 1) & 0x3ff) << 21) | (((u >> 11) & 1) << 20) | (((u >> 12) & 0xff) << 12) |
         (rd << 7) | 0x6f;
}
inline uint32_t Bits(uint32_t v, int hi, int lo) { return (v >> lo) & ((1u << (hi - lo + 1)) - 1); }
inline int32_t SextN(uint32_t v, int bits) { return static_cast<int32_t>(v << (32 - bits)) >> (32 - bits); }
}  // namespace

const uint32_t* RiscvCpu::CompressedTable() {
  static const std::vector<uint32_t> table = [] {
    std::vector<uint32_t> t(65536, 0);
    for (uint32_t c = 0; c < 65536; ++c)
      if ((c & 3) != 3) t[c] = ExpandCompressed(static_cast<uint16_t>(c));
    return t;
  }();
  return table.data();
}

uint32_t RiscvCpu::ExpandCompressed(uint16_t c) {
  const uint32_t op = c & 3, f3 = c >> 13;
  const uint32_t rdp = 8 + Bits(c, 4, 2), rs1p = 8 + Bits(c, 9, 7);
  const uint32_t rd = Bits(c, 11, 7), rs2 = Bits(c, 6, 2);
  if (op == 0) {
    switch (f3) {
      case 0: {  // C.ADDI4SPN
        uint32_t imm = (Bits(c, 10, 7) << 6) | (Bits(c, 12, 11) << 4) | (Bits(c, 5, 5) << 3) | (Bits(c, 6, 6) << 2);
        if (imm == 0) return 0;
        return EncI(0x13, rdp, 0, 2, static_cast<int32_t>(imm));
      }
      case 1: {  // C.FLD
        uint32_t imm = (Bits(c, 12, 10) << 3) | (Bits(c, 6, 5) << 6);
        return EncI(0x07, rdp, 3, rs1p, static_cast<int32_t>(imm));
      }
      case 2: {  // C.LW
        uint32_t imm = (Bits(c, 12, 10) << 3) | (Bits(c, 6, 6) << 2) | (Bits(c, 5, 5) << 6);
        return EncI(0x03, rdp, 2, rs1p, static_cast<int32_t>(imm));
      }
      case 3: {  // C.LD
        uint32_t imm = (Bits(c, 12, 10) << 3) | (Bits(c, 6, 5) << 6);
        return EncI(0x03, rdp, 3, rs1p, static_cast<int32_t>(imm));
      }
      case 5: {  // C.FSD
        uint32_t imm = (Bits(c, 12, 10) << 3) | (Bits(c, 6, 5) << 6);
        return EncS(0x27, 3, rs1p, rdp, static_cast<int32_t>(imm));
      }
      case 6: {  // C.SW
        uint32_t imm = (Bits(c, 12, 10) << 3) | (Bits(c, 6, 6) << 2) | (Bits(c, 5, 5) << 6);
        return EncS(0x23, 2, rs1p, rdp, static_cast<int32_t>(imm));
      }
      case 7: {  // C.SD
        uint32_t imm = (Bits(c, 12, 10) << 3) | (Bits(c, 6, 5) << 6);
        return EncS(0x23, 3, rs1p, rdp, static_cast<int32_t>(imm));
      }
      default: return 0;
    }
  }
  if (op == 1) {
    const int32_t imm6 = SextN((Bits(c, 12, 12) << 5) | Bits(c, 6, 2), 6);
    switch (f3) {
      case 0: return EncI(0x13, rd, 0, rd, imm6);  // C.ADDI / C.NOP
      case 1: if (rd == 0) return 0; return EncI(0x1b, rd, 0, rd, imm6);  // C.ADDIW
      case 2: return EncI(0x13, rd, 0, 0, imm6);  // C.LI
      case 3:
        if (rd == 2) {  // C.ADDI16SP
          int32_t imm = SextN((Bits(c, 12, 12) << 9) | (Bits(c, 4, 3) << 7) | (Bits(c, 5, 5) << 6) |
                                  (Bits(c, 2, 2) << 5) | (Bits(c, 6, 6) << 4), 10);
          if (imm == 0) return 0;
          return EncI(0x13, 2, 0, 2, imm);
        } else {  // C.LUI
          if (imm6 == 0) return 0;
          return (static_cast<uint32_t>(imm6) << 12) | (rd << 7) | 0x37;
        }
      case 4: {
        const uint32_t f2 = Bits(c, 11, 10);
        const uint32_t sh = (Bits(c, 12, 12) << 5) | Bits(c, 6, 2);
        if (f2 == 0) return EncI(0x13, rs1p, 5, rs1p, static_cast<int32_t>(sh));              // C.SRLI
        if (f2 == 1) return EncI(0x13, rs1p, 5, rs1p, static_cast<int32_t>(sh | 0x400));      // C.SRAI
        if (f2 == 2) return EncI(0x13, rs1p, 7, rs1p, imm6);                                  // C.ANDI
        const uint32_t r2 = 8 + Bits(c, 4, 2);
        switch ((Bits(c, 12, 12) << 2) | Bits(c, 6, 5)) {
          case 0: return EncR(0x33, rs1p, 0, rs1p, r2, 0x20);  // C.SUB
          case 1: return EncR(0x33, rs1p, 4, rs1p, r2, 0);     // C.XOR
          case 2: return EncR(0x33, rs1p, 6, rs1p, r2, 0);     // C.OR
          case 3: return EncR(0x33, rs1p, 7, rs1p, r2, 0);     // C.AND
          case 4: return EncR(0x3b, rs1p, 0, rs1p, r2, 0x20);  // C.SUBW
          case 5: return EncR(0x3b, rs1p, 0, rs1p, r2, 0);     // C.ADDW
          default: return 0;
        }
      }
      case 5: {  // C.J
        int32_t imm = SextN((Bits(c, 12, 12) << 11) | (Bits(c, 8, 8) << 10) | (Bits(c, 10, 9) << 8) |
                                (Bits(c, 6, 6) << 7) | (Bits(c, 7, 7) << 6) | (Bits(c, 2, 2) << 5) |
                                (Bits(c, 11, 11) << 4) | (Bits(c, 5, 3) << 1), 12);
        return EncJ(0, imm);
      }
      case 6: case 7: {  // C.BEQZ / C.BNEZ
        int32_t imm = SextN((Bits(c, 12, 12) << 8) | (Bits(c, 6, 5) << 6) | (Bits(c, 2, 2) << 5) |
                                (Bits(c, 11, 10) << 3) | (Bits(c, 4, 3) << 1), 9);
        return EncB(f3 == 6 ? 0 : 1, rs1p, 0, imm);
      }
    }
    return 0;
  }
  if (op == 2) {
    switch (f3) {
      case 0: {  // C.SLLI
        uint32_t sh = (Bits(c, 12, 12) << 5) | Bits(c, 6, 2);
        return EncI(0x13, rd, 1, rd, static_cast<int32_t>(sh));
      }
      case 1: {  // C.FLDSP
        uint32_t imm = (Bits(c, 12, 12) << 5) | (Bits(c, 6, 5) << 3) | (Bits(c, 4, 2) << 6);
        return EncI(0x07, rd, 3, 2, static_cast<int32_t>(imm));
      }
      case 2: {  // C.LWSP
        if (rd == 0) return 0;
        uint32_t imm = (Bits(c, 12, 12) << 5) | (Bits(c, 6, 4) << 2) | (Bits(c, 3, 2) << 6);
        return EncI(0x03, rd, 2, 2, static_cast<int32_t>(imm));
      }
      case 3: {  // C.LDSP
        if (rd == 0) return 0;
        uint32_t imm = (Bits(c, 12, 12) << 5) | (Bits(c, 6, 5) << 3) | (Bits(c, 4, 2) << 6);
        return EncI(0x03, rd, 3, 2, static_cast<int32_t>(imm));
      }
      case 4:
        if (!Bits(c, 12, 12)) {
          if (rs2 == 0) { if (rd == 0) return 0; return EncI(0x67, 0, 0, rd, 0); }  // C.JR
          return EncR(0x33, rd, 0, 0, rs2, 0);                                       // C.MV
        }
        if (rs2 == 0) {
          if (rd == 0) return 0x00100073;           // C.EBREAK
          return EncI(0x67, 1, 0, rd, 0);            // C.JALR
        }
        return EncR(0x33, rd, 0, rd, rs2, 0);        // C.ADD
      case 5: {  // C.FSDSP
        uint32_t imm = (Bits(c, 12, 10) << 3) | (Bits(c, 9, 7) << 6);
        return EncS(0x27, 3, 2, rs2, static_cast<int32_t>(imm));
      }
      case 6: {  // C.SWSP
        uint32_t imm = (Bits(c, 12, 9) << 2) | (Bits(c, 8, 7) << 6);
        return EncS(0x23, 2, 2, rs2, static_cast<int32_t>(imm));
      }
      case 7: {  // C.SDSP
        uint32_t imm = (Bits(c, 12, 10) << 3) | (Bits(c, 9, 7) << 6);
        return EncS(0x23, 3, 2, rs2, static_cast<int32_t>(imm));
      }
    }
  }
  return 0;
}

}  // namespace ferry::riscv
