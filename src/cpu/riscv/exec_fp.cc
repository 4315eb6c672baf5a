// F and D extension execution: loads/stores, NaN-boxing, sign injection, moves,
// rounding-mode resolution and fcsr bookkeeping. Arithmetic lives in fpu.cc.
#include "cpu/riscv/fpu.h"
#include "cpu/riscv/mem_inline.h"

namespace ferry::riscv {

namespace {
constexpr uint64_t kBox = 0xffffffff00000000ull;
inline uint32_t Unbox(uint64_t v) { return (v >> 32) == 0xffffffffu ? static_cast<uint32_t>(v) : fpu::kCanonicalNaN32; }
inline uint64_t Box(uint32_t v) { return kBox | v; }
}  // namespace

void RiscvCpu::ExecuteFp(uint32_t insn) {
  const uint32_t op = insn & 0x7f, rd = (insn >> 7) & 31, rs1 = (insn >> 15) & 31, rs2 = (insn >> 20) & 31;
  const uint32_t f3 = (insn >> 12) & 7;
  const uint64_t next = pc_ + ilen_;
  if (!FpEnabled()) { RaiseException(kCauseIllegal, raw_insn_); return; }
  auto illegal = [&] { RaiseException(kCauseIllegal, raw_insn_); };
  auto set_rd_x = [&](uint64_t v) { if (rd) x_[rd] = v; };
  auto write_f = [&](uint64_t v) { f_[rd] = v; MarkFsDirty(); };
  unsigned rm = f3 == 7 ? frm_ : f3;
  const bool rm_ok = rm <= 4;
  uint32_t fl = 0;

  if (op == 0x07) {  // FLW / FLD
    uint64_t va = x_[rs1] + (static_cast<int32_t>(insn) >> 20);
    if (f3 == 2) { uint32_t v; if (!Load(va, &v)) return; write_f(Box(v)); }
    else if (f3 == 3) { uint64_t v; if (!Load(va, &v)) return; write_f(v); }
    else { illegal(); return; }
    pc_ = next;
    return;
  }
  if (op == 0x27) {  // FSW / FSD
    int64_t imm = static_cast<int32_t>((static_cast<uint32_t>(static_cast<int32_t>(insn) >> 25) << 5) | ((insn >> 7) & 31));
    uint64_t va = x_[rs1] + imm;
    if (f3 == 2) { if (!Store<uint32_t>(va, static_cast<uint32_t>(f_[rs2]))) return; }
    else if (f3 == 3) { if (!Store<uint64_t>(va, f_[rs2])) return; }
    else { illegal(); return; }
    pc_ = next;
    return;
  }
  const uint32_t fmt = (insn >> 25) & 3;
  if (op != 0x53) {  // fused multiply-add family
    if (fmt > 1 || !rm_ok) { illegal(); return; }
    const uint32_t rs3 = insn >> 27;
    if (fmt == 0) {
      uint32_t a = Unbox(f_[rs1]), b = Unbox(f_[rs2]), c = Unbox(f_[rs3]), r;
      switch (op) {
        case 0x43: r = fpu::MulAdd(a, b, c, rm, fl); break;
        case 0x47: r = fpu::MulSub(a, b, c, rm, fl); break;
        case 0x4b: r = fpu::NegMulSub(a, b, c, rm, fl); break;
        default: r = fpu::NegMulAdd(a, b, c, rm, fl); break;
      }
      write_f(Box(r));
    } else {
      uint64_t a = f_[rs1], b = f_[rs2], c = f_[rs3], r;
      switch (op) {
        case 0x43: r = fpu::MulAdd(a, b, c, rm, fl); break;
        case 0x47: r = fpu::MulSub(a, b, c, rm, fl); break;
        case 0x4b: r = fpu::NegMulSub(a, b, c, rm, fl); break;
        default: r = fpu::NegMulAdd(a, b, c, rm, fl); break;
      }
      write_f(r);
    }
    fflags_ |= fl;
    pc_ = next;
    return;
  }
  const uint32_t f7 = insn >> 25;
  const bool dbl = f7 & 1;
  const uint32_t sa = Unbox(f_[rs1]), sb = Unbox(f_[rs2]);
  const uint64_t da = f_[rs1], db = f_[rs2];
  switch (f7) {
    case 0x00: case 0x01: case 0x04: case 0x05: case 0x08: case 0x09: case 0x0c: case 0x0d: {
      if (!rm_ok) { illegal(); return; }
      const uint32_t k = f7 >> 2;
      if (!dbl) {
        uint32_t r = k == 0 ? fpu::Add(sa, sb, rm, fl) : k == 1 ? fpu::Sub(sa, sb, rm, fl)
                   : k == 2 ? fpu::Mul(sa, sb, rm, fl) : fpu::Div(sa, sb, rm, fl);
        write_f(Box(r));
      } else {
        uint64_t r = k == 0 ? fpu::Add(da, db, rm, fl) : k == 1 ? fpu::Sub(da, db, rm, fl)
                   : k == 2 ? fpu::Mul(da, db, rm, fl) : fpu::Div(da, db, rm, fl);
        write_f(r);
      }
      break;
    }
    case 0x2c: if (rs2 || !rm_ok) { illegal(); return; } write_f(Box(fpu::Sqrt(sa, rm, fl))); break;
    case 0x2d: if (rs2 || !rm_ok) { illegal(); return; } write_f(fpu::Sqrt(da, rm, fl)); break;
    case 0x10: {
      uint32_t s;
      if (f3 == 0) s = sb & 0x80000000u;
      else if (f3 == 1) s = ~sb & 0x80000000u;
      else if (f3 == 2) s = (sa ^ sb) & 0x80000000u;
      else { illegal(); return; }
      write_f(Box((sa & 0x7fffffffu) | s));
      break;
    }
    case 0x11: {
      const uint64_t m = 1ull << 63;
      uint64_t s;
      if (f3 == 0) s = db & m;
      else if (f3 == 1) s = ~db & m;
      else if (f3 == 2) s = (da ^ db) & m;
      else { illegal(); return; }
      write_f((da & ~m) | s);
      break;
    }
    case 0x14:
      if (f3 > 1) { illegal(); return; }
      write_f(Box(f3 == 0 ? fpu::Min(sa, sb, fl) : fpu::Max(sa, sb, fl)));
      break;
    case 0x15:
      if (f3 > 1) { illegal(); return; }
      write_f(f3 == 0 ? fpu::Min(da, db, fl) : fpu::Max(da, db, fl));
      break;
    case 0x20: if (rs2 != 1 || !rm_ok) { illegal(); return; } write_f(Box(fpu::F64ToF32(da, rm, fl))); break;
    case 0x21: if (rs2 != 0 || !rm_ok) { illegal(); return; } write_f(fpu::F32ToF64(sa, fl)); break;
    case 0x50: case 0x51: {
      bool r;
      if (f3 == 0) r = dbl ? fpu::Le(da, db, fl) : fpu::Le(sa, sb, fl);
      else if (f3 == 1) r = dbl ? fpu::Lt(da, db, fl) : fpu::Lt(sa, sb, fl);
      else if (f3 == 2) r = dbl ? fpu::Eq(da, db, fl) : fpu::Eq(sa, sb, fl);
      else { illegal(); return; }
      set_rd_x(r ? 1 : 0);
      break;
    }
    case 0x60: case 0x61: {
      if (rs2 > 3 || !rm_ok) { illegal(); return; }
      uint64_t r;
      if (!dbl) r = rs2 == 0 ? fpu::ToI32(sa, rm, fl) : rs2 == 1 ? fpu::ToU32(sa, rm, fl) : rs2 == 2 ? fpu::ToI64(sa, rm, fl) : fpu::ToU64(sa, rm, fl);
      else r = rs2 == 0 ? fpu::ToI32(da, rm, fl) : rs2 == 1 ? fpu::ToU32(da, rm, fl) : rs2 == 2 ? fpu::ToI64(da, rm, fl) : fpu::ToU64(da, rm, fl);
      set_rd_x(r);
      break;
    }
    case 0x68: case 0x69: {
      if (rs2 > 3 || !rm_ok) { illegal(); return; }
      const uint64_t v = x_[rs1];
      if (!dbl) write_f(Box(rs2 == 0 ? fpu::I32ToF32(v, rm, fl) : rs2 == 1 ? fpu::U32ToF32(v, rm, fl) : rs2 == 2 ? fpu::I64ToF32(v, rm, fl) : fpu::U64ToF32(v, rm, fl)));
      else write_f(rs2 == 0 ? fpu::I32ToF64(v, rm, fl) : rs2 == 1 ? fpu::U32ToF64(v, rm, fl) : rs2 == 2 ? fpu::I64ToF64(v, rm, fl) : fpu::U64ToF64(v, rm, fl));
      break;
    }
    case 0x70:
      if (rs2 != 0) { illegal(); return; }
      if (f3 == 0) set_rd_x(static_cast<uint64_t>(static_cast<int64_t>(static_cast<int32_t>(static_cast<uint32_t>(f_[rs1])))));
      else if (f3 == 1) set_rd_x(fpu::Classify(sa));
      else { illegal(); return; }
      break;
    case 0x71:
      if (rs2 != 0) { illegal(); return; }
      if (f3 == 0) set_rd_x(da);
      else if (f3 == 1) set_rd_x(fpu::Classify(da));
      else { illegal(); return; }
      break;
    case 0x78: if (rs2 != 0 || f3 != 0) { illegal(); return; } write_f(Box(static_cast<uint32_t>(x_[rs1]))); break;
    case 0x79: if (rs2 != 0 || f3 != 0) { illegal(); return; } write_f(x_[rs1]); break;
    default: illegal(); return;
  }
  if (fl) { fflags_ |= fl; MarkFsDirty(); }
  pc_ = next;
}

}  // namespace ferry::riscv
