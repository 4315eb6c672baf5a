// Pre-decoded instruction cache and threaded dispatch: the fast path of Run().
//
// Guest code is decoded once per (RAM page, 16-bit offset) into a DecodedInsn (handler
// label + operands), lazily on first execution, and run with computed-goto dispatch that
// stays inside the page while pc does. pc is implicit (page_va + slot offset) and only
// written back at page exits, out-of-page jumps, traps and slow paths. attention_ is
// checked at taken jumps and page exits only; the instruction budget is exact.
//
// Coherence (see riscv_cpu.h for the invariant):
//  - CPU stores: a page with decoded code has no write-TLB entry, so stores to it go
//    through PhysWrite, which resets the page's slots in place (also the page that is
//    executing: the next slot is simply decoded again from the new bytes).
//  - Device/VMM writes: DirtyLog's code watch (guest_memory.h) flags the page and bumps a
//    generation, checked between Run() slices, after MMIO accesses and SYSTEM instructions.
//  - Translation or privilege changes: decoded pages are physical and privilege-independent;
//    the code TLB (va -> page) is flushed with the other TLBs. SYSTEM/FENCE instructions
//    (CSR writes, SFENCE.VMA, FENCE.I, xRET, ECALL, WFI) always end the decoded run.
//  - Instructions the fast handlers do not cover run through Execute32 (GENERIC).
#include <cstring>
#include <type_traits>

#include "cpu/riscv/mem_inline.h"

namespace ferry::riscv {

const void* const* RiscvCpu::handlers_ = nullptr;

namespace {

#define FERRY_RV_OPS(X)                                                                                      \
  X(DECODE) X(PAGE_END) X(GENERIC) X(SYSTEM) X(CROSS) X(NOP) X(LUI) X(AUIPC) X(JAL_IN) X(JAL_OUT) X(JALR)  \
  X(BEQ_IN) X(BNE_IN) X(BLT_IN) X(BGE_IN) X(BLTU_IN) X(BGEU_IN)                                             \
  X(BEQ_OUT) X(BNE_OUT) X(BLT_OUT) X(BGE_OUT) X(BLTU_OUT) X(BGEU_OUT)                                       \
  X(LB) X(LH) X(LW) X(LD) X(LBU) X(LHU) X(LWU) X(SB) X(SH) X(SW) X(SD)                                      \
  X(ADDI) X(SLTI) X(SLTIU) X(XORI) X(ORI) X(ANDI) X(SLLI) X(SRLI) X(SRAI)                                   \
  X(ADDIW) X(SLLIW) X(SRLIW) X(SRAIW)                                                                       \
  X(ADD) X(SUB) X(SLL) X(SLT) X(SLTU) X(XOR) X(SRL) X(SRA) X(OR) X(AND)                                     \
  X(MUL) X(MULH) X(MULHSU) X(MULHU) X(DIV) X(DIVU) X(REM) X(REMU)                                           \
  X(ADDW) X(SUBW) X(SLLW) X(SRLW) X(SRAW) X(MULW) X(DIVW) X(DIVUW) X(REMW) X(REMUW)

enum Op : int {
#define FERRY_RV_ENUM(n) k##n,
  FERRY_RV_OPS(FERRY_RV_ENUM)
#undef FERRY_RV_ENUM
};

inline int64_t Sext32(uint64_t v) { return static_cast<int32_t>(static_cast<uint32_t>(v)); }
inline int32_t ImmI(uint32_t i) { return static_cast<int32_t>(i) >> 20; }
inline int32_t ImmS(uint32_t i) {
  return static_cast<int32_t>((static_cast<uint32_t>(static_cast<int32_t>(i) >> 25) << 5) | ((i >> 7) & 31));
}
inline int32_t ImmB(uint32_t i) {
  return static_cast<int32_t>((static_cast<uint32_t>(static_cast<int32_t>(i) >> 31) << 12) | (((i >> 7) & 1) << 11) |
                              (((i >> 25) & 0x3f) << 5) | (((i >> 8) & 0xf) << 1));
}
inline int32_t ImmJ(uint32_t i) {
  return static_cast<int32_t>((static_cast<uint32_t>(static_cast<int32_t>(i) >> 31) << 20) | (i & 0xff000) |
                              (((i >> 20) & 1) << 11) | (((i >> 21) & 0x3ff) << 1));
}

template <typename T>
inline uint64_t Extend(T v) {
  if constexpr (std::is_signed_v<T>) return static_cast<uint64_t>(static_cast<int64_t>(v));
  else return static_cast<uint64_t>(v);
}

// M-extension division (no traps: RISC-V defines the results of /0 and overflow).
inline uint64_t DivS64(uint64_t ua, uint64_t ub) {
  const int64_t a = static_cast<int64_t>(ua), b = static_cast<int64_t>(ub);
  return b == 0 ? ~0ull : (a == INT64_MIN && b == -1) ? ua : static_cast<uint64_t>(a / b);
}
inline uint64_t RemS64(uint64_t ua, uint64_t ub) {
  const int64_t a = static_cast<int64_t>(ua), b = static_cast<int64_t>(ub);
  return b == 0 ? ua : (a == INT64_MIN && b == -1) ? 0 : static_cast<uint64_t>(a % b);
}
inline uint64_t DivS32(uint64_t ua, uint64_t ub) {
  const int32_t a = static_cast<int32_t>(ua), b = static_cast<int32_t>(ub);
  return static_cast<uint64_t>(static_cast<int64_t>(b == 0 ? -1 : (a == INT32_MIN && b == -1) ? a : a / b));
}
inline uint64_t DivU32(uint64_t ua, uint64_t ub) {
  const uint32_t a = static_cast<uint32_t>(ua), b = static_cast<uint32_t>(ub);
  return static_cast<uint64_t>(Sext32(b == 0 ? ~0u : a / b));
}
inline uint64_t RemS32(uint64_t ua, uint64_t ub) {
  const int32_t a = static_cast<int32_t>(ua), b = static_cast<int32_t>(ub);
  return static_cast<uint64_t>(static_cast<int64_t>(b == 0 ? a : (a == INT32_MIN && b == -1) ? 0 : a % b));
}
inline uint64_t RemU32(uint64_t ua, uint64_t ub) {
  const uint32_t a = static_cast<uint32_t>(ua), b = static_cast<uint32_t>(ub);
  return static_cast<uint64_t>(Sext32(b == 0 ? a : a % b));
}

// Decodes a (possibly expanded) 32-bit instruction at page offset `off` into s (operands
// and immediate); returns the handler. Anything not covered exactly, including every
// illegal encoding, becomes GENERIC so Execute32 keeps the single source of truth.
Op Decode32(uint32_t insn, uint32_t off, uint8_t* rd_out, uint8_t* rs1_out, uint8_t* rs2_out,
            int32_t* imm_out) {
  const uint32_t rd = (insn >> 7) & 31, rs1 = (insn >> 15) & 31, rs2 = (insn >> 20) & 31;
  const uint32_t f3 = (insn >> 12) & 7, f7 = insn >> 25;
  const uint8_t sink = rd ? static_cast<uint8_t>(rd) : 32;
  *rd_out = static_cast<uint8_t>(rd);
  *rs1_out = static_cast<uint8_t>(rs1);
  *rs2_out = static_cast<uint8_t>(rs2);
  *imm_out = 0;
  auto alu = [&](Op op) { return rd ? op : kNOP; };  // no side effect: x0 destination = nop
  switch (insn & 0x7f) {
    case 0x37: *imm_out = static_cast<int32_t>(insn & 0xfffff000); return alu(kLUI);
    case 0x17: *imm_out = static_cast<int32_t>(insn & 0xfffff000); return alu(kAUIPC);
    case 0x6f: {
      const int32_t imm = ImmJ(insn);
      const int64_t t = static_cast<int64_t>(off) + imm;
      *rd_out = sink;
      if (t >= 0 && t < 4096) { *imm_out = imm / 2; return kJAL_IN; }
      *imm_out = imm;
      return kJAL_OUT;
    }
    case 0x67:
      if (f3 != 0) return kGENERIC;
      *rd_out = sink;
      *imm_out = ImmI(insn);
      return kJALR;
    case 0x63: {
      static constexpr Op kIn[8] = {kBEQ_IN, kBNE_IN, kGENERIC, kGENERIC, kBLT_IN, kBGE_IN, kBLTU_IN, kBGEU_IN};
      static constexpr Op kOut[8] = {kBEQ_OUT, kBNE_OUT, kGENERIC, kGENERIC, kBLT_OUT, kBGE_OUT, kBLTU_OUT, kBGEU_OUT};
      if (f3 == 2 || f3 == 3) return kGENERIC;
      const int32_t imm = ImmB(insn);
      const int64_t t = static_cast<int64_t>(off) + imm;
      if (t >= 0 && t < 4096) { *imm_out = imm / 2; return kIn[f3]; }
      *imm_out = imm;
      return kOut[f3];
    }
    case 0x03: {
      static constexpr Op kLoad[8] = {kLB, kLH, kLW, kLD, kLBU, kLHU, kLWU, kGENERIC};
      *rd_out = sink;  // the load happens (and may fault) even into x0
      *imm_out = ImmI(insn);
      return kLoad[f3];
    }
    case 0x23: {
      static constexpr Op kStore[8] = {kSB, kSH, kSW, kSD, kGENERIC, kGENERIC, kGENERIC, kGENERIC};
      *imm_out = ImmS(insn);
      return kStore[f3];
    }
    case 0x13: {
      *imm_out = ImmI(insn);
      switch (f3) {
        case 0: return alu(kADDI);
        case 2: return alu(kSLTI);
        case 3: return alu(kSLTIU);
        case 4: return alu(kXORI);
        case 6: return alu(kORI);
        case 7: return alu(kANDI);
        case 1:
          if ((insn >> 26) != 0) return kGENERIC;
          *imm_out = static_cast<int32_t>((insn >> 20) & 63);
          return alu(kSLLI);
        default:  // 5
          *imm_out = static_cast<int32_t>((insn >> 20) & 63);
          if ((insn >> 26) == 0) return alu(kSRLI);
          if ((insn >> 26) == 0x10) return alu(kSRAI);
          return kGENERIC;
      }
    }
    case 0x1b:
      if (f3 == 0) { *imm_out = ImmI(insn); return alu(kADDIW); }
      *imm_out = static_cast<int32_t>((insn >> 20) & 31);
      if (f3 == 1 && f7 == 0) return alu(kSLLIW);
      if (f3 == 5 && f7 == 0) return alu(kSRLIW);
      if (f3 == 5 && f7 == 0x20) return alu(kSRAIW);
      return kGENERIC;
    case 0x33: {
      static constexpr Op kBase[8] = {kADD, kSLL, kSLT, kSLTU, kXOR, kSRL, kOR, kAND};
      static constexpr Op kMul[8] = {kMUL, kMULH, kMULHSU, kMULHU, kDIV, kDIVU, kREM, kREMU};
      if (f7 == 0) return alu(kBase[f3]);
      if (f7 == 1) return alu(kMul[f3]);
      if (f7 == 0x20 && f3 == 0) return alu(kSUB);
      if (f7 == 0x20 && f3 == 5) return alu(kSRA);
      return kGENERIC;
    }
    case 0x3b: {
      static constexpr Op kMulW[8] = {kMULW, kGENERIC, kGENERIC, kGENERIC, kDIVW, kDIVUW, kREMW, kREMUW};
      if (f7 == 0) {
        if (f3 == 0) return alu(kADDW);
        if (f3 == 1) return alu(kSLLW);
        if (f3 == 5) return alu(kSRLW);
        return kGENERIC;
      }
      if (f7 == 0x20) {
        if (f3 == 0) return alu(kSUBW);
        if (f3 == 5) return alu(kSRAW);
        return kGENERIC;
      }
      if (f7 == 1) return kMulW[f3] == kGENERIC ? kGENERIC : alu(kMulW[f3]);
      return kGENERIC;
    }
    case 0x0f:  // FENCE, FENCE.I
    case 0x73:  // ECALL, EBREAK, xRET, WFI, SFENCE.VMA, CSR*
      return kSYSTEM;
    default:    // FP, AMO, illegal
      return kGENERIC;
  }
}

}  // namespace

// ---------------------------------------------------------------------------------------
// Cache management

void RiscvCpu::ResetDecodedPage(DecodedPage* dp) {
  const void* decode = handlers_[2 * kDECODE];
  for (int i = 0; i < kSlotsPerPage; ++i) dp->insn[i].handler = decode;
  dp->insn[kSlotsPerPage] = DecodedInsn{handlers_[2 * kPAGE_END], 0, 0, 0, 0, 0};
}

void RiscvCpu::FlushDecodeCache() {
  for (size_t i = 0; i < decoded_used_; ++i) {
    DecodedPage* dp = decoded_pages_[i].get();
    page_of_ppn_[dp->ppn] = nullptr;
    __atomic_store_n(&code_watch_[dp->ppn], 0, __ATOMIC_RELAXED);
  }
  decoded_used_ = 0;
  for (auto& e : code_tlb_) e = CodeTlbEntry{};
  if (dirty_log_) code_gen_seen_ = dirty_log_->code_write_generation();
}

void RiscvCpu::InvalidateCodePage(uint64_t ppn) {
  if (DecodedPage* dp = page_of_ppn_[ppn]) ResetDecodedPage(dp);
  __atomic_store_n(&code_watch_[ppn], 0, __ATOMIC_RELAXED);
  code_invalidations_++;
}

void RiscvCpu::DropWrittenCodePages() {
  code_gen_seen_ = dirty_log_->code_write_generation();  // before the scan: later writes bump it again
  for (size_t i = 0; i < decoded_used_; ++i) {
    DecodedPage* dp = decoded_pages_[i].get();
    if (__atomic_load_n(&code_watch_[dp->ppn], __ATOMIC_RELAXED) == 2) InvalidateCodePage(dp->ppn);
  }
}

void RiscvCpu::PurgeWriteTlbFor(const uint8_t* host_page) {
  const uintptr_t h = reinterpret_cast<uintptr_t>(host_page);
  for (TlbEntry& e : tlb_write_)
    if (e.tag != ~0ull && ((e.tag >> 2) << 12) + e.addend == h) e.tag = ~0ull;
}

RiscvCpu::DecodedPage* RiscvCpu::LookupCodePage(uint64_t pc) {
  uint64_t pa;
  if (!Translate(pc, Access::kFetch, &pa)) return nullptr;
  if (pa < ram_base_ || pa - ram_base_ >= ram_size_) {  // no execution from MMIO
    RaiseException(kCauseFetchAccess, pc);
    return nullptr;
  }
  const uint64_t ppn = (pa - ram_base_) >> 12;
  DecodedPage* dp = page_of_ppn_[ppn];
  if (!dp) {
    if (decoded_used_ == kMaxDecodedPages) FlushDecodeCache();
    if (decoded_used_ == decoded_pages_.size()) decoded_pages_.push_back(std::make_unique<DecodedPage>());
    dp = decoded_pages_[decoded_used_++].get();
    dp->ppn = ppn;
    dp->host = ram_host_ + (ppn << 12);
    ResetDecodedPage(dp);
    page_of_ppn_[ppn] = dp;
  }
  const uint64_t vpn = pc >> 12;
  code_tlb_[vpn & (kTlbSize - 1)] = CodeTlbEntry{(vpn << 2) | static_cast<uint64_t>(priv_), dp};
  return dp;
}

void RiscvCpu::DecodeSlot(DecodedPage* dp, DecodedInsn* s) {
  uint8_t* watch = &code_watch_[dp->ppn];
  uint8_t w = __atomic_load_n(watch, __ATOMIC_RELAXED);
  if (w == 2) {  // a device wrote this page and nobody looked yet: drop stale slots first
    DropWrittenCodePages();
    w = 0;
  }
  if (w == 0) {  // first decoded slot of this page: stores to it must take the slow path from now on
    __atomic_store_n(watch, 1, __ATOMIC_RELAXED);
    PurgeWriteTlbFor(dp->host);
  }
  const uint32_t off = static_cast<uint32_t>(s - dp->insn) * 2;
  uint16_t lo;
  std::memcpy(&lo, dp->host + off, 2);
  DecodedInsn d{};
  Op op;
  if ((lo & 3) != 3) {
    d.len = 1;
    const uint32_t x = compressed_table_[lo];
    op = x ? Decode32(x, off, &d.rd, &d.rs1, &d.rs2, &d.imm) : kGENERIC;
    if (op == kGENERIC || op == kSYSTEM) {  // Execute32 wants the expansion; the raw bits are the trap tval
      d.imm = static_cast<int32_t>(x);
      d.rd = static_cast<uint8_t>(lo & 0xff);
      d.rs1 = static_cast<uint8_t>(lo >> 8);
    }
  } else if (off == 2 * (kSlotsPerPage - 1)) {
    d.len = 2;
    op = kCROSS;  // 32-bit instruction straddling the page end: fetched the slow way every time
  } else {
    uint32_t insn;
    std::memcpy(&insn, dp->host + off, 4);
    d.len = 2;
    op = Decode32(insn, off, &d.rd, &d.rs1, &d.rs2, &d.imm);
    if (op == kGENERIC || op == kSYSTEM) d.imm = static_cast<int32_t>(insn);
  }
  d.handler = handlers_[2 * op + (d.len - 1)];  // length-specialised variant
  *s = d;
}

// ---------------------------------------------------------------------------------------
// The interpreter

uint64_t RiscvCpu::RunDecoded(uint64_t n) {
  // Two labels per op: _1 for a 16-bit (compressed) instruction, _2 for a 32-bit one, so
  // that every handler advances ip by a constant. (Loading the length from the slot put a
  // load on the ip -> next-ip dependency chain of every instruction.)
#define FERRY_RV_LABEL(name) &&L_##name##_1, &&L_##name##_2,
  static const void* const kHandlers[] = {FERRY_RV_OPS(FERRY_RV_LABEL)};
#undef FERRY_RV_LABEL
  if (n == 0) {
    handlers_ = kHandlers;
    return 0;
  }
  uint64_t* const xr = x_;
  uint64_t left = n;
  DecodedPage* dp = nullptr;
  DecodedInsn* base = nullptr;
  DecodedInsn* ip = nullptr;
  uint64_t page_va = 0;
  uint64_t dpriv = 0;  // effective privilege of loads/stores (constant within a run: see SYSTEM)

#define PC() (page_va + (static_cast<uint64_t>(ip - base) << 1))
#define DISPATCH() goto* ip->handler
#define NEXT(L)                                            \
  do {                                                     \
    ip += (L);                                             \
    if (__builtin_expect(--left == 0, 0)) goto out_seq;    \
    DISPATCH();                                            \
  } while (0)
#define JUMP_IN(target)                                                                             \
  do {                                                                                              \
    ip = (target);                                                                                  \
    if (__builtin_expect(--left == 0, 0) || attention_.load(std::memory_order_relaxed)) goto out_seq; \
    DISPATCH();                                                                                     \
  } while (0)
#define JUMP_OUT(target) \
  do {                   \
    pc_ = (target);      \
    --left;              \
    goto lookup;         \
  } while (0)
#define TRAPPED() \
  do {            \
    --left;       \
    goto lookup;  \
  } while (0)
#define RS1 xr[ip->rs1]
#define RS2 xr[ip->rs2]
#define RD xr[ip->rd]
#define IMM static_cast<int64_t>(ip->imm)
#define BOTH(H) H(1) H(2)

lookup:
  if (left == 0 || attention_.load(std::memory_order_relaxed)) return n - left;
  {
    const uint64_t pc = pc_;
    const uint64_t vpn = pc >> 12;
    const CodeTlbEntry& e = code_tlb_[vpn & (kTlbSize - 1)];
    if (__builtin_expect(e.tag == ((vpn << 2) | static_cast<uint64_t>(priv_)), 1)) {
      dp = e.page;
    } else if (!(dp = LookupCodePage(pc))) {
      TRAPPED();  // fetch fault taken (counts as a step, like Step())
    }
    base = dp->insn;
    page_va = pc & ~0xfffull;
    ip = base + ((pc & 0xfff) >> 1);
    dpriv = static_cast<uint64_t>(EffectivePriv(Access::kRead));
    DISPATCH();
  }
out_seq:
  pc_ = PC();
  return n - left;

L_DECODE_1:
L_DECODE_2:
  DecodeSlot(dp, ip);
  DISPATCH();
L_PAGE_END_1:
L_PAGE_END_2:
  pc_ = page_va + 0x1000;
  goto lookup;
L_CROSS_1:
L_CROSS_2: {
  pc_ = PC();
  const uint64_t done = n - left;
  instret_ += done;  // exact instret/cycle for a CSR read (see L_SYSTEM)
  Step();
  instret_ -= done;
  TRAPPED();  // not a trap, but pc_ is wherever Step() left it
}
L_SYSTEM_1:
L_SYSTEM_2: {
  pc_ = PC();
  ilen_ = ip->len * 2;
  raw_insn_ = ip->len == 1 ? (ip->rd | (static_cast<uint32_t>(ip->rs1) << 8)) : static_cast<uint32_t>(ip->imm);
  // Run() adds this run's count to instret_ when it returns; a CSR read of cycle/instret
  // here must see the instructions retired so far.
  const uint64_t done = n - left;
  instret_ += done;
  Execute32(static_cast<uint32_t>(ip->imm));
  instret_ -= done;
  CheckDeviceCodeWrites();  // an SBI call may have run device code
  TRAPPED();                // re-enter through lookup: privilege, translation or attention may have changed
}
L_GENERIC_1:
L_GENERIC_2: {
  const uint64_t pc = PC();
  const uint64_t exceptions = counters_.exceptions;
  pc_ = pc;
  ilen_ = ip->len * 2;
  raw_insn_ = ip->len == 1 ? (ip->rd | (static_cast<uint32_t>(ip->rs1) << 8)) : static_cast<uint32_t>(ip->imm);
  Execute32(static_cast<uint32_t>(ip->imm));
  if (__builtin_expect(pc_ != pc + static_cast<uint64_t>(ilen_) || counters_.exceptions != exceptions, 0)) TRAPPED();
  ip += ip->len;
  if (__builtin_expect(--left == 0, 0)) goto out_seq;
  DISPATCH();
}

#define H_NOP(L) \
  L_NOP_##L : NEXT(L);
#define H_LUI(L)                     \
  L_LUI_##L : {                      \
    RD = static_cast<uint64_t>(IMM); \
    NEXT(L);                         \
  }
#define H_AUIPC(L)                           \
  L_AUIPC_##L : {                            \
    RD = PC() + static_cast<uint64_t>(IMM);  \
    NEXT(L);                                 \
  }
#define H_JAL_IN(L)         \
  L_JAL_IN_##L : {          \
    RD = PC() + 2 * (L);    \
    JUMP_IN(ip + ip->imm);  \
  }
#define H_JAL_OUT(L)                         \
  L_JAL_OUT_##L : {                          \
    const uint64_t pc = PC();                \
    RD = pc + 2 * (L);                       \
    JUMP_OUT(pc + static_cast<uint64_t>(IMM)); \
  }
#define H_JALR(L)                                                        \
  L_JALR_##L : {                                                         \
    const uint64_t t = (RS1 + static_cast<uint64_t>(IMM)) & ~1ull;       \
    RD = PC() + 2 * (L);                                                 \
    if (((t ^ page_va) >> 12) == 0) JUMP_IN(base + ((t & 0xfff) >> 1)); \
    JUMP_OUT(t);                                                         \
  }
  BOTH(H_NOP)
  BOTH(H_LUI)
  BOTH(H_AUIPC)
  BOTH(H_JAL_IN)
  BOTH(H_JAL_OUT)
  BOTH(H_JALR)

#define BRANCH1(L, name, cond)                             \
  L_##name##_IN_##L : {                                    \
    const uint64_t a = RS1, b = RS2;                       \
    if (cond) JUMP_IN(ip + ip->imm);                       \
    NEXT(L);                                               \
  }                                                        \
  L_##name##_OUT_##L : {                                   \
    const uint64_t a = RS1, b = RS2;                       \
    if (cond) JUMP_OUT(PC() + static_cast<uint64_t>(IMM)); \
    NEXT(L);                                               \
  }
#define BRANCH(name, cond) BRANCH1(1, name, cond) BRANCH1(2, name, cond)
  BRANCH(BEQ, a == b)
  BRANCH(BNE, a != b)
  BRANCH(BLT, static_cast<int64_t>(a) < static_cast<int64_t>(b))
  BRANCH(BGE, static_cast<int64_t>(a) >= static_cast<int64_t>(b))
  BRANCH(BLTU, a < b)
  BRANCH(BGEU, a >= b)
#undef BRANCH
#undef BRANCH1

#define LOAD1(L, name, T)                                                                               \
  L_##name##_##L : {                                                                                    \
    const uint64_t va = RS1 + static_cast<uint64_t>(IMM);                                              \
    const uint64_t vpn = va >> 12;                                                                      \
    const TlbEntry& e = tlb_read_[vpn & (kTlbSize - 1)];                                               \
    T v;                                                                                                \
    if (__builtin_expect(e.tag == ((vpn << 2) | dpriv) && (va & 0xfff) <= 0x1000 - sizeof(T), 1)) {    \
      std::memcpy(&v, reinterpret_cast<const void*>(va + e.addend), sizeof(T));                        \
    } else {                                                                                            \
      uint64_t w;                                                                                       \
      pc_ = PC();                                                                                       \
      if (!LoadSlow(va, sizeof(T), &w)) TRAPPED();                                                      \
      v = static_cast<T>(w);                                                                            \
    }                                                                                                   \
    RD = Extend(v);                                                                                     \
    NEXT(L);                                                                                            \
  }
#define LOAD(name, T) LOAD1(1, name, T) LOAD1(2, name, T)
  LOAD(LB, int8_t)
  LOAD(LH, int16_t)
  LOAD(LW, int32_t)
  LOAD(LD, uint64_t)
  LOAD(LBU, uint8_t)
  LOAD(LHU, uint16_t)
  LOAD(LWU, uint32_t)
#undef LOAD
#undef LOAD1

#define STORE1(L, name, T)                                                                           \
  L_##name##_##L : {                                                                                 \
    const uint64_t va = RS1 + static_cast<uint64_t>(IMM);                                           \
    const T v = static_cast<T>(RS2);                                                                 \
    const uint64_t vpn = va >> 12;                                                                   \
    const TlbEntry& e = tlb_write_[vpn & (kTlbSize - 1)];                                           \
    if (__builtin_expect(e.tag == ((vpn << 2) | dpriv) && (va & 0xfff) <= 0x1000 - sizeof(T), 1)) { \
      std::memcpy(reinterpret_cast<void*>(va + e.addend), &v, sizeof(T));                          \
      if (va == reservation_) reservation_ = ~0ull;                                                  \
    } else {                                                                                         \
      pc_ = PC();                                                                                    \
      if (!StoreSlow(va, sizeof(T), static_cast<uint64_t>(v))) TRAPPED();                            \
    }                                                                                                \
    NEXT(L);                                                                                         \
  }
#define STORE(name, T) STORE1(1, name, T) STORE1(2, name, T)
  STORE(SB, uint8_t)
  STORE(SH, uint16_t)
  STORE(SW, uint32_t)
  STORE(SD, uint64_t)
#undef STORE
#undef STORE1

#define ALU1(L, name, expr) \
  L_##name##_##L : {        \
    RD = (expr);            \
    NEXT(L);                \
  }
#define ALU(name, expr) ALU1(1, name, expr) ALU1(2, name, expr)
  ALU(ADDI, RS1 + static_cast<uint64_t>(IMM))
  ALU(SLTI, static_cast<int64_t>(RS1) < IMM ? 1 : 0)
  ALU(SLTIU, RS1 < static_cast<uint64_t>(IMM) ? 1 : 0)
  ALU(XORI, RS1 ^ static_cast<uint64_t>(IMM))
  ALU(ORI, RS1 | static_cast<uint64_t>(IMM))
  ALU(ANDI, RS1 & static_cast<uint64_t>(IMM))
  ALU(SLLI, RS1 << ip->imm)
  ALU(SRLI, RS1 >> ip->imm)
  ALU(SRAI, static_cast<uint64_t>(static_cast<int64_t>(RS1) >> ip->imm))
  ALU(ADDIW, static_cast<uint64_t>(Sext32(RS1 + static_cast<uint64_t>(IMM))))
  ALU(SLLIW, static_cast<uint64_t>(Sext32(static_cast<uint32_t>(RS1) << ip->imm)))
  ALU(SRLIW, static_cast<uint64_t>(Sext32(static_cast<uint32_t>(RS1) >> ip->imm)))
  ALU(SRAIW, static_cast<uint64_t>(static_cast<int64_t>(static_cast<int32_t>(RS1) >> ip->imm)))
  ALU(ADD, RS1 + RS2)
  ALU(SUB, RS1 - RS2)
  ALU(SLL, RS1 << (RS2 & 63))
  ALU(SLT, static_cast<int64_t>(RS1) < static_cast<int64_t>(RS2) ? 1 : 0)
  ALU(SLTU, RS1 < RS2 ? 1 : 0)
  ALU(XOR, RS1 ^ RS2)
  ALU(SRL, RS1 >> (RS2 & 63))
  ALU(SRA, static_cast<uint64_t>(static_cast<int64_t>(RS1) >> (RS2 & 63)))
  ALU(OR, RS1 | RS2)
  ALU(AND, RS1 & RS2)
  ALU(MUL, RS1 * RS2)
  ALU(MULH, static_cast<uint64_t>((static_cast<__int128>(static_cast<int64_t>(RS1)) * static_cast<int64_t>(RS2)) >> 64))
  ALU(MULHSU, static_cast<uint64_t>((static_cast<__int128>(static_cast<int64_t>(RS1)) *
                                     static_cast<__int128>(static_cast<unsigned __int128>(RS2))) >> 64))
  ALU(MULHU, static_cast<uint64_t>((static_cast<unsigned __int128>(RS1) * RS2) >> 64))
  ALU(DIV, DivS64(RS1, RS2))
  ALU(DIVU, RS2 == 0 ? ~0ull : RS1 / RS2)
  ALU(REM, RemS64(RS1, RS2))
  ALU(REMU, RS2 == 0 ? RS1 : RS1 % RS2)
  ALU(ADDW, static_cast<uint64_t>(Sext32(RS1 + RS2)))
  ALU(SUBW, static_cast<uint64_t>(Sext32(RS1 - RS2)))
  ALU(SLLW, static_cast<uint64_t>(Sext32(static_cast<uint32_t>(RS1) << (RS2 & 31))))
  ALU(SRLW, static_cast<uint64_t>(Sext32(static_cast<uint32_t>(RS1) >> (RS2 & 31))))
  ALU(SRAW, static_cast<uint64_t>(static_cast<int64_t>(static_cast<int32_t>(RS1) >> (RS2 & 31))))
  ALU(MULW, static_cast<uint64_t>(Sext32(static_cast<uint32_t>(RS1) * static_cast<uint32_t>(RS2))))
  ALU(DIVW, DivS32(RS1, RS2))
  ALU(DIVUW, DivU32(RS1, RS2))
  ALU(REMW, RemS32(RS1, RS2))
  ALU(REMUW, RemU32(RS1, RS2))
#undef ALU
#undef ALU1
#undef H_NOP
#undef H_LUI
#undef H_AUIPC
#undef H_JAL_IN
#undef H_JAL_OUT
#undef H_JALR
#undef BOTH
#undef RS1
#undef RS2
#undef RD
#undef IMM
#undef TRAPPED
#undef JUMP_OUT
#undef JUMP_IN
#undef NEXT
#undef DISPATCH
#undef PC
}

}  // namespace ferry::riscv
