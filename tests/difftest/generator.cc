#include "generator.h"

#include <array>
#include <cstring>
#include <random>

#include <fmt/format.h>

namespace ferry::difftest {
namespace {

// Registers the sequences may write: everything except x0, s10 (x26, AMO/SMC address) and
// s11 (x27, window base).
constexpr std::array<int, 29> kRegs = {1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20,
                                       21, 22, 23, 24, 25, 28, 29, 30, 31};

// System programs: physical layout is the linked image at kRamBase; virtual layout below.
constexpr uint64_t kRamBase = 0x80000000;   // identity gigapage (S), root[2]
constexpr uint64_t kWindowVa = 0x40000000;  // four 4 KiB pages through root[1] -> l1[0] -> l0[0..3]
constexpr uint64_t kAmoVa = kWindowVa + 0x4000;  // l0[4]: always readable+writable (AMOs, see Exclusions)
constexpr int kWinPages = 3;                // physical window pages behind the four virtual ones
constexpr int kSysReach = 256;              // body accesses s11 + [-kSysReach, kSysReach)
constexpr int kLogEntries = 16;
// The save area (label `save`): handler scratch, sequence bookkeeping, trap log, dump buffer.
constexpr int kSaveEnd = 32, kSaveDone = 40, kSaveNext = 48, kSaveCount = 56, kSaveLog = 64;
constexpr int kSaveDump = kSaveLog + kLogEntries * 32;
constexpr int kDumpCsrs = 7;  // mstatus, mcause, mepc, mtval, scause, sepc, stval
constexpr int kSysRegBytes = 31 * 8 + 32 * 8 + 8 + kDumpCsrs * 8 + 4 * 8;
constexpr int kSysLogBytes = 8 + kLogEntries * 32;
constexpr int kSysWindowBytes = kWinPages * 2 * kSysReach;

class Gen {
 public:
  explicit Gen(uint64_t seed) : rng_(seed) {}
  uint64_t U64() { return rng_(); }
  int Int(int lo, int hi) { return std::uniform_int_distribution<int>(lo, hi)(rng_); }
  bool Coin(int pct) { return Int(0, 99) < pct; }
  std::string X() { return fmt::format("x{}", kRegs[Int(0, kRegs.size() - 1)]); }
  std::string Xs() { return Coin(8) ? "x0" : (Coin(30) ? fmt::format("x{}", Int(8, 15)) : X()); }
  // A destination register: never one a surrounding loop or self-modifying block reserved.
  int RdNum() {
    for (;;) {
      int r = kRegs[Int(0, kRegs.size() - 1)];
      if (!(reserved_ >> r & 1)) return r;
    }
  }
  std::string Rd() { return fmt::format("x{}", RdNum()); }
  // A register for a loop counter or SMC operand; never ra (the window calls link through it).
  int Reserve() {
    int r = RdNum();
    while (r == 1) r = RdNum();
    reserved_ |= 1u << r;
    return r;
  }
  void Release(int r) { reserved_ &= ~(1u << r); }
  int Label() { return label_++; }
  std::string F() { return fmt::format("f{}", Int(0, 31)); }
  std::string Rm() {
    static const char* kRm[] = {"rne", "rtz", "rdn", "rup", "dyn"};
    return kRm[Int(0, 4)];
  }
  uint64_t IntValue() {
    static const uint64_t kSpecial[] = {0, 1, ~0ull, 0x8000000000000000ull, 0x7fffffffffffffffull, 0xffffffff80000000ull,
                                        0x80000000ull, 0x7fffffffull, 0xffffffffull, 2, 0xffffffffffffff00ull};
    return Coin(35) ? kSpecial[Int(0, std::size(kSpecial) - 1)] : (Coin(50) ? U64() : U64() & 0xffff);
  }
  uint64_t FpValue() {
    static const uint64_t kD[] = {0, 0x8000000000000000ull, 0x3ff0000000000000ull, 0xbff8000000000000ull,
                                  0x7ff0000000000000ull, 0xfff0000000000000ull, 0x7ff8000000000000ull,
                                  0x7ff4000000000000ull, 0x0000000000000001ull, 0x000fffffffffffffull,
                                  0x7fefffffffffffffull, 0x0010000000000000ull, 0x4340000000000000ull,
                                  0x41e0000000000000ull, 0xc3e0000000000000ull, 0x3fe0000000000000ull};
    static const uint32_t kS[] = {0, 0x80000000u, 0x3f800000u, 0xbfc00000u, 0x7f800000u, 0xff800000u, 0x7fc00000u,
                                  0x7fa00000u, 1, 0x007fffffu, 0x7f7fffffu, 0x00800000u, 0x4f000000u, 0xcf000000u,
                                  0x3f000000u, 0x5f000000u, 0x4b000000u};
    int k = Int(0, 9);
    if (k < 3) return kD[Int(0, std::size(kD) - 1)];
    if (k < 7) return 0xffffffff00000000ull | (Coin(70) ? kS[Int(0, std::size(kS) - 1)] : static_cast<uint32_t>(U64()));
    if (k < 8) return static_cast<uint32_t>(U64());  // improperly NaN-boxed single
    // "nice" doubles around small integers and halves (exercise rounding of conversions)
    double v = static_cast<double>(Int(-2000, 2000)) / (Coin(50) ? 2.0 : 8.0);
    uint64_t b;
    std::memcpy(&b, &v, 8);
    return Coin(70) ? b : U64();
  }

 private:
  std::mt19937_64 rng_;
  uint32_t reserved_ = 0;
  int label_ = 0;
};

// What a body may do: the memory reach around s11 and, for system programs, the privilege
// the sequence runs in.
struct Ctx {
  int mem_lo, mem_hi;  // load/store offsets from s11 (inclusive; 8 bytes fit below mem_hi + 8)
  bool system = false;
  bool supervisor = false;
  bool tvm = false;      // mstatus.TVM: sfence.vma traps in S, so PTEs must not be rewritten
  bool machine = false;  // M mode: mret/sret/wfi are legal there and never generated
  bool physical = false; // M mode without MPRV: s11 and the AMO page are physical addresses
  bool sum = false;      // mstatus.SUM (S mode then never jumps into the window: Exclusions)
};

// A random RV64I/M register-register or immediate ALU instruction, encoded (for SMC).
uint32_t EncodeAlu(Gen& g) {
  const uint32_t rd = static_cast<uint32_t>(g.RdNum()), rs1 = static_cast<uint32_t>(g.Int(0, 31)),
                 rs2 = static_cast<uint32_t>(g.Int(0, 31));
  if (g.Coin(50)) {  // OP: add sll slt sltu xor srl or and, sub sra, mul..remu
    static const uint32_t kF[][2] = {{0, 0}, {0, 1}, {0, 2}, {0, 3}, {0, 4}, {0, 5}, {0, 6}, {0, 7}, {0x20, 0},
                                     {0x20, 5}, {1, 0}, {1, 1}, {1, 4}, {1, 5}, {1, 6}, {1, 7}};
    const auto& f = kF[g.Int(0, std::size(kF) - 1)];
    return f[0] << 25 | rs2 << 20 | rs1 << 15 | f[1] << 12 | rd << 7 | 0x33;
  }
  static const uint32_t kF3[] = {0, 2, 3, 4, 6, 7};  // addi slti sltiu xori ori andi
  const uint32_t imm = static_cast<uint32_t>(g.Int(0, 4095));
  return imm << 20 | rs1 << 15 | kF3[g.Int(0, 5)] << 12 | rd << 7 | 0x13;
}

// System events a body may contain (traps and privileged instructions).
std::string SystemInstruction(Gen& g, const Ctx& c) {
  const std::string rd = g.Rd();
  switch (g.Int(0, 12)) {
    case 0: return "ecall";
    case 1: return "ebreak";
    case 2: {
      static const char* kIllegal[] = {".4byte 0x0000000b", ".4byte 0x0000707f", ".2byte 0x0000", "unimp",
                                       ".4byte 0xfe000033"};
      return kIllegal[g.Int(0, std::size(kIllegal) - 1)];
    }
    case 3: return fmt::format("csrr {}, {}", rd, g.Coin(50) ? "mstatus" : "mscratch");  // M-only
    case 4: return c.machine ? "ecall" : "mret";  // illegal below M
    case 5: return c.supervisor || c.machine ? "sfence.vma" : (g.Coin(50) ? "sret" : "wfi");  // U only (illegal)
    case 6: {
      static const char* kCsr[] = {"sstatus", "scause", "stval", "sepc", "stvec", "sscratch", "satp", "sie", "sip"};
      return fmt::format("csrr {}, {}", rd, kCsr[g.Int(0, std::size(kCsr) - 1)]);
    }
    case 7: {  // rewrite a window PTE (toggle permission/A/D/V bits) and fence it (S only)
      if (!(c.supervisor || c.machine) || (c.supervisor && c.tvm)) return "sfence.vma";
      static const int kBits[] = {1, 2, 4, 8, 16, 64, 128, 64 | 128, 2 | 4, 16 | 64};
      return fmt::format("lla s10, l0 + {}\n\tld {}, 0(s10)\n\txori {}, {}, {}\n\tsd {}, 0(s10)\n\tsfence.vma{}",
                         8 * g.Int(0, 3), rd, rd, rd, kBits[g.Int(0, std::size(kBits) - 1)], rd,
                         g.Coin(50) ? "" : " s11, x0");
    }
    case 8: {  // access crossing the page boundary at s11
      static const char* kOps[] = {"ld", "lw", "lhu", "sd", "sw", "sh"};
      int op = g.Int(0, 5);
      std::string r = op < 3 ? rd : g.Xs();
      return fmt::format("{} {}, {}(s11)", kOps[op], r, -g.Int(1, 7));
    }
    case 9: {  // LR, misaligned half of the time, on any window page (AMOs and SCs: see Exclusions)
      int off = g.Int(-kSysReach / 8, kSysReach / 8 - 1) * 8 + (g.Coin(50) ? 0 : g.Int(1, 3));
      return fmt::format("addi s10, s11, {}\n\tlr.{} {}, (s10)", off, g.Coin(50) ? "w" : "d", rd);
    }
    case 10:  // call the `ret` at offset 2048 of the window page below s11: X/U/A checks, fetch faults
      // (not M with MPRV: fetches ignore MPRV, so the target would be unmapped physical memory)
      return (c.machine && !c.physical) || (c.supervisor && c.sum) ? "fence.i" : "jalr ra, -2048(s11)";
    case 11: return fmt::format("csrr {}, {}", rd, g.Coin(50) ? "fcsr" : "sstatus");
    default: return fmt::format("ld {}, {}(s11)", rd, g.Int(c.mem_lo, c.mem_hi));
  }
}

std::string Instruction(Gen& g, const Ctx& c, std::string* pending_label) {
  if (c.system && g.Coin(10)) return SystemInstruction(g, c);
  const int kind = g.Int(0, 99);
  auto rd = g.Rd(), rs1 = g.Xs(), rs2 = g.Xs();
  if (kind < 30) {  // RV64I/M register-register
    static const char* kOps[] = {"add", "sub", "sll", "slt", "sltu", "xor", "srl", "sra", "or", "and", "addw",
                                 "subw", "sllw", "srlw", "sraw", "mul", "mulh", "mulhsu", "mulhu", "div", "divu",
                                 "rem", "remu", "mulw", "divw", "divuw", "remw", "remuw"};
    return fmt::format("{} {}, {}, {}", kOps[g.Int(0, std::size(kOps) - 1)], rd, rs1, rs2);
  }
  if (kind < 45) {  // immediates
    static const char* kOps[] = {"addi", "slti", "sltiu", "xori", "ori", "andi", "addiw"};
    int which = g.Int(0, 10);
    if (which < 7) return fmt::format("{} {}, {}, {}", kOps[which], rd, rs1, g.Coin(40) ? g.Int(-32, 31) : g.Int(-2048, 2047));
    if (which == 7) return fmt::format("{} {}, {}, {}", g.Coin(50) ? "slli" : (g.Coin(50) ? "srli" : "srai"), rd, rs1, g.Int(0, 63));
    if (which == 8) return fmt::format("{} {}, {}, {}", g.Coin(50) ? "slliw" : (g.Coin(50) ? "srliw" : "sraiw"), rd, rs1, g.Int(0, 31));
    if (which == 9) return fmt::format("lui {}, {}", rd, g.Int(0, 0xfffff));
    return fmt::format("auipc {}, {}", rd, g.Int(0, 0xfffff));
  }
  if (kind < 55) {  // loads / stores in the window
    static const char* kLoads[] = {"lb", "lh", "lw", "ld", "lbu", "lhu", "lwu"};
    static const char* kStores[] = {"sb", "sh", "sw", "sd"};
    int off = g.Int(c.mem_lo, c.mem_hi);
    if (g.Coin(50)) return fmt::format("{} {}, {}(s11)", kLoads[g.Int(0, 6)], rd, off);
    return fmt::format("{} {}, {}(s11)", kStores[g.Int(0, 3)], rs2, off);
  }
  if (kind < 62) {  // atomics (aligned, address in s10)
    bool d = g.Coin(50);
    std::string sfx = d ? ".d" : ".w";
    std::string pre;
    const int off = g.Int(0, kSysReach / 8 - 1) * 8 + (d ? 0 : 4 * g.Int(0, 1));
    if (c.physical) {  // M mode without translation: the head of a physical window page
      pre = fmt::format("lla s10, win + {}\n\t", 4096 * g.Int(0, kWinPages - 1) + off);
    } else if (c.system) {  // on the always-writable page, within its dumped head
      pre = fmt::format("li s10, {:#x}\n\t", kAmoVa + off);
    } else {
      int off = g.Int(c.mem_lo / 8 + 1, c.mem_hi / 8) * 8 - 8 + (d ? 0 : 4 * g.Int(0, 1));
      pre = fmt::format("addi s10, s11, {}\n\t", off);
    }
    if (g.Coin(20) && !c.system)  // adjacent LR/SC pair (system programs: see Exclusions)
      return pre + fmt::format("lr{} {}, (s10)\n\tsc{} {}, {}, (s10)", sfx, rd, sfx, g.Rd(), rs2);
    static const char* kAmo[] = {"amoswap", "amoadd", "amoxor", "amoand", "amoor", "amomin", "amomax", "amominu", "amomaxu"};
    return pre + fmt::format("{}{} {}, {}, (s10)", kAmo[g.Int(0, 8)], sfx, rd, rs2);
  }
  if (kind < 66) {  // forward branch / jump over the next instruction
    static const char* kBr[] = {"beq", "bne", "blt", "bge", "bltu", "bgeu"};
    *pending_label = fmt::format(".Lf{}", g.Label());
    if (g.Coin(15)) return fmt::format("jal {}, {}", rd, *pending_label);
    return fmt::format("{} {}, {}, {}", kBr[g.Int(0, 5)], rs1, rs2, *pending_label);
  }
  // F and D
  const std::string fd = g.F(), fa = g.F(), fb = g.F(), fc = g.F();
  const char* p = g.Coin(50) ? "s" : "d";
  const int fk = g.Int(0, 13);
  switch (fk) {
    case 0: {
      static const char* kOps[] = {"fadd", "fsub", "fmul", "fdiv"};
      return fmt::format("{}.{} {}, {}, {}, {}", kOps[g.Int(0, 3)], p, fd, fa, fb, g.Rm());
    }
    case 1: return fmt::format("fsqrt.{} {}, {}, {}", p, fd, fa, g.Rm());
    case 2: {
      static const char* kOps[] = {"fmadd", "fmsub", "fnmadd", "fnmsub"};
      return fmt::format("{}.{} {}, {}, {}, {}, {}", kOps[g.Int(0, 3)], p, fd, fa, fb, fc, g.Rm());
    }
    case 3: {
      static const char* kOps[] = {"fmin", "fmax", "fsgnj", "fsgnjn", "fsgnjx"};
      return fmt::format("{}.{} {}, {}, {}", kOps[g.Int(0, 4)], p, fd, fa, fb);
    }
    case 4: {
      static const char* kOps[] = {"feq", "flt", "fle"};
      return fmt::format("{}.{} {}, {}, {}", kOps[g.Int(0, 2)], p, rd, fa, fb);
    }
    case 5: return fmt::format("fclass.{} {}, {}", p, rd, fa);
    case 6: {  // float -> int
      static const char* kI[] = {"w", "wu", "l", "lu"};
      return fmt::format("fcvt.{}.{} {}, {}, {}", kI[g.Int(0, 3)], p, rd, fa, g.Rm());
    }
    case 7: {  // int -> float
      static const char* kI[] = {"w", "wu", "l", "lu"};
      int i = g.Int(0, 3);
      if (p[0] == 'd' && i < 2) return fmt::format("fcvt.d.{} {}, {}", kI[i], fd, rs1);  // exact: no rm
      return fmt::format("fcvt.{}.{} {}, {}, {}", p, kI[i], fd, rs1, g.Rm());
    }
    case 8: return g.Coin(50) ? fmt::format("fcvt.s.d {}, {}, {}", fd, fa, g.Rm()) : fmt::format("fcvt.d.s {}, {}", fd, fa);
    case 9: return g.Coin(50) ? fmt::format("fmv.x.{} {}, {}", p[0] == 's' ? "w" : "d", rd, fa)
                              : fmt::format("fmv.{}.x {}, {}", p[0] == 's' ? "w" : "d", fd, rs1);
    case 10: return fmt::format("{} {}, {}(s11)", g.Coin(50) ? "flw" : "fld", fd, g.Int(c.mem_lo, c.mem_hi));
    case 11: return fmt::format("{} {}, {}(s11)", g.Coin(50) ? "fsw" : "fsd", fa, g.Int(c.mem_lo, c.mem_hi));
    case 12: return fmt::format("fsrmi {}, {}", rd, g.Int(0, 3));  // dynamic rounding mode RNE..RUP (RMM: known gap)
    default: return g.Coin(50) ? fmt::format("frflags {}", rd) : fmt::format("fsflagsi {}, {}", rd, g.Int(0, 31));
  }
}

// n instructions; a forward branch skips the instruction after it (its label stays inside).
std::string Straight(Gen& g, const Ctx& c, int n) {
  std::string s, label;
  for (int k = 0; k < n; ++k) {
    std::string pending;
    s += "\t" + Instruction(g, c, &pending) + "\n";
    if (!label.empty()) s += label + ":\n";
    label = pending;
  }
  if (!label.empty()) s += label + ":\n";
  return s;
}

// A counted loop around `inner` (which must not write the counter: reserve it first).
std::string Loop(Gen& g, int counter, int trips, const std::string& inner) {
  int id = g.Label();
  return fmt::format("\tli x{0}, {1}\n.Lloop{2}:\n{3}\taddi x{0}, x{0}, -1\n\tbnez x{0}, .Lloop{2}\n", counter, trips, id,
                     inner);
}

// Self-modifying code: a loop executes a 32-bit ALU instruction, overwrites it with another
// (sw + fence.i), and the next iteration executes the new one. In S mode the store goes
// through the U alias of the code now and then (a store page fault unless SUM = 1).
std::string SelfModifying(Gen& g, const Ctx& c) {
  const int t = g.Reserve(), counter = g.Reserve();
  const uint32_t first = EncodeAlu(g), second = EncodeAlu(g);
  const int id = g.Label();
  const std::string alias = c.supervisor && g.Coin(30) ? fmt::format(" - {:#x}", kRamBase) : "";
  std::string inner = fmt::format("\t.balign 4\n.Lsmc{0}:\n\t.4byte {1:#010x}\n\tlla s10, .Lsmc{0}{2}\n\tsw x{3}, 0(s10)\n"
                                  "\tfence.i\n",
                                  id, first, alias, t);
  inner += Straight(g, c, g.Int(0, 2));
  std::string s = fmt::format("\tli x{}, {:#x}\n", t, second);
  s += Loop(g, counter, g.Int(2, 3), inner);
  g.Release(t);
  g.Release(counter);
  return s;
}

std::string Body(Gen& g, const Ctx& c, int items) {
  std::string s;
  for (int k = 0; k < items; ++k) {
    int what = g.Int(0, 99);
    if (what < 8) {
      const int counter = g.Reserve();
      s += Loop(g, counter, g.Int(1, 6), Straight(g, c, g.Int(1, 6)));
      g.Release(counter);
    } else if (what < 12 && !c.machine) {  // (M mode with MPRV: see Exclusions)
      s += SelfModifying(g, c);
    } else {
      s += Straight(g, c, 1);
    }
  }
  return s;
}

// Registers: f values, fcsr with frm 0..3 (RMM excluded), then `before_ints` (may use t0),
// then the integer registers (kRegs).
std::string InitRegisters(Gen& g, const std::string& before_ints) {
  std::string s;
  for (int f = 0; f < 32; ++f) s += fmt::format("\tli t0, {:#x}\n\tfmv.d.x f{}, t0\n", g.FpValue(), f);
  s += fmt::format("\tli t0, {:#x}\n\tcsrw fcsr, t0\n", (g.Int(0, 3) << 5) | g.Int(0, 31));
  s += before_ints;
  for (int r : kRegs) s += fmt::format("\tli x{}, {:#x}\n", r, g.IntValue());
  s += "\tli s10, 0\n";
  return s;
}

// Fills `dwords` 8-byte words from the address in t1 with xorshift64 from the seed in t0.
std::string FillRoutine(const std::string& name) {
  return name + ":\n"
         "1:\tslli t3, t0, 13\n\txor t0, t0, t3\n\tsrli t3, t0, 7\n\txor t0, t0, t3\n\tslli t3, t0, 17\n\txor t0, t0, t3\n"
         "\tsd t0, 0(t1)\n\taddi t1, t1, 8\n\taddi t2, t2, -1\n\tbnez t2, 1b\n\tret\n";
}

std::string FpDump(const std::string& base, int offset) {
  std::string s;
  for (int f = 0; f < 32; ++f) s += fmt::format("\tfsd f{}, {}({})\n", f, offset + f * 8, base);
  s += fmt::format("\tfrcsr t0\n\tsd t0, {}({})\n", offset + 32 * 8, base);
  return s;
}

}  // namespace

std::vector<std::string> Exclusions() {
  return {"rounding mode RMM (ties to max magnitude): Ferry's FPU approximates it with RNE for arithmetic (known gap)",
          "fcsr writes with reserved frm values 5-7 (would make dynamic-rounding instructions illegal)",
          "counter CSRs (cycle/time/instret differ by design); CSR writes other than frm/fflags/fcsr (the system "
          "programs' trap CSRs belong to the driver and handlers)",
          "LR/SC other than adjacent pairs (QEMU user mode implements SC by value comparison)",
          "user programs: ecall/ebreak/illegal encodings and control flow leaving the sequence",
          "system programs: mstatus.FS Initial/Clean (each sequence starts Dirty): QEMU 7.2 does not dirty FS when an "
          "instruction only accrues fflags, Ferry does (the spec requires Dirty once any FP state changed)",
          "system programs: breakpoint tval is logged as 0 (0 and the pc are both legal; QEMU writes 0, Ferry the pc)",
          "system programs: misaligned or faulting AMOs and SCs (AMOs use an always-writable page): QEMU 7.2 reports "
          "load faults (cause 4/13) for AMOs where the spec requires store/AMO faults (6/15), and an SC without a "
          "reservation fails there without checking the address",
          "system programs: mret/sret/wfi in M mode, sret/wfi in S mode, interrupts, PTE rewrites from U mode "
          "(no sfence.vma possible there), fetch access faults (bodies jump only to their code and into window "
          "pages, where a fetch page "
          "fault resumes at ra)",
          "system programs: S-mode jumps into the window with mstatus.SUM = 1: QEMU 7.2 lets S execute a U page "
          "once a SUM data access has filled its TLB entry (the fetch then hits that entry's exec permission); "
          "Ferry faults, as the spec requires",
          "system programs: self-modifying code in M mode: with MPRV, QEMU 7.2 lets a store to the code page "
          "hit the M-mode TLB entry its fetch filled (no U-mode translation, no fault); Ferry translates the "
          "store as MPP = U and faults, as the spec requires"};
}

std::vector<DumpField> UserDumpFields() {
  return {{"x1", 0, 31}, {"f0", 31 * 8, 32}, {"fcsr", 63 * 8, 1}, {"window", 64 * 8, kWindowBytes / 8}};
}

std::string GenerateProgram(const GeneratorOptions& opt) {
  Gen g(opt.seed);
  // Window: 2 KiB across a page boundary, preceded by the 512-byte register dump.
  const Ctx c{0, kWindowBytes - 8};
  std::string s;
  s += "\t.option norelax\n\t.text\n\t.globl _start\n_start:\n\tlla s11, window\n";
  for (int i = 0; i < opt.sequences; ++i) {
    s += fmt::format("\tli t0, {:#x}\n\tmv t1, s11\n\tli t2, {}\n\tcall fill\n", g.U64() | 1, kWindowBytes / 8);
    s += InitRegisters(g, "");
    s += Body(g, c, opt.length);
    s += "\tcall dump\n";
  }
  s += "\tli a0, 0\n\tli a7, 93\n\tecall\n";
  s += FillRoutine("fill");
  // dump: x1..x31 (ra holds the return address: deterministic too; s11's slot holds 0),
  // f0..f31, fcsr in the 512 bytes before the window; write them and the window out.
  s += "dump:\n";
  for (int r = 1; r < 32; ++r) s += fmt::format("\tsd x{}, {}(s11)\n", r == 27 ? 0 : r, -512 + (r - 1) * 8);
  s += FpDump("s11", -512 + 31 * 8);
  s += fmt::format("\tli a0, 1\n\taddi a1, s11, -512\n\tli a2, {}\n\tli a7, 64\n\tecall\n", kDumpBytes);
  s += "\tret\n";
  s += fmt::format("\t.bss\n\t.align 12\n\t.space 3072\nwindow:\n\t.space {}\n", kWindowBytes + 64);
  return s;
}

std::vector<DumpField> SysDumpFields() {
  std::vector<DumpField> v = {{"x1", 0, 31},       {"f0", 31 * 8, 32},   {"fcsr", 63 * 8, 1},  {"mstatus", 64 * 8, 1},
                              {"mcause", 65 * 8, 1}, {"mepc", 66 * 8, 1},  {"mtval", 67 * 8, 1}, {"scause", 68 * 8, 1},
                              {"sepc", 69 * 8, 1},  {"stval", 70 * 8, 1}, {"pte", 71 * 8, 4},
                              {"trap_count", kSysRegBytes, 1},
                              {"trap_log(cause,tval,epc,handler_priv)", kSysRegBytes + 8, kLogEntries * 4, 4}};
  for (int p = 0; p < kWinPages; ++p) {
    int base = kSysRegBytes + kSysLogBytes + p * 2 * kSysReach;
    v.push_back({fmt::format("page{}.head", p), base, kSysReach / 8});
    v.push_back({fmt::format("page{}.tail", p), base + kSysReach, kSysReach / 8});
  }
  return v;
}

int SysDumpBytes() { return kSysRegBytes + kSysLogBytes + kSysWindowBytes; }

std::string GenerateSystemProgram(const GeneratorOptions& opt) {
  Gen g(opt.seed);
  std::string s;
  s += "\t.option norelax\n\t.text\n\t.globl _start\n_start:\n";
  // Once: trap vectors, PMP open for S/U, scratch pointers, page-table pointers, satp.
  s += "\tlla t0, m_trap\n\tcsrw mtvec, t0\n\tlla t0, s_trap\n\tcsrw stvec, t0\n";
  s += "\tli t0, -1\n\tcsrw pmpaddr0, t0\n\tli t0, 0x1f\n\tcsrw pmpcfg0, t0\n";
  s += "\tlla t0, save\n\tcsrw mscratch, t0\n\tcsrw sscratch, t0\n";
  s += "\tlla t1, root\n\tlla t0, l1\n\tsrli t0, t0, 12\n\tslli t0, t0, 10\n\tori t0, t0, 1\n\tsd t0, 8(t1)\n";
  s += "\tlla t1, l1\n\tlla t0, l0\n\tsrli t0, t0, 12\n\tslli t0, t0, 10\n\tori t0, t0, 1\n\tsd t0, 0(t1)\n";
  s += "\tlla t0, root\n\tsrli t0, t0, 12\n\tli t1, 8\n\tslli t1, t1, 60\n\tor t0, t0, t1\n\tcsrw satp, t0\n";
  for (int i = 0; i < opt.sequences; ++i) {
    // Privilege of the body: S, U, or M (with MPRV half of the time: loads and stores then
    // translate as U, since mret leaves MPP = U).
    const int pick = g.Int(0, 99);
    const int priv = pick < 50 ? 1 : pick < 80 ? 0 : 3;
    const bool sup = priv == 1, mach = priv == 3, mprv = mach && g.Coin(50);
    const bool user_pages = !sup;  // window PTEs mostly usable by this privilege
    const std::string alias = priv != 0 ? "" : fmt::format("\tli t1, {:#x}\n\tsub t0, t0, t1\n", kRamBase);
    s += fmt::format("\tli t0, {:#x}\n\tlla t1, win\n\tli t2, {}\n\tcall fill\n", g.U64() | 1, kWinPages * 512);
    // A `ret` (jalr x0, 0(ra)) in the middle of every window page, out of the bodies' reach.
    s += "\tli t0, 0x8067\n";
    for (int p = 0; p < kWinPages; ++p) s += fmt::format("\tlla t1, win + {}\n\tsw t0, 0(t1)\n", 4096 * p + 2048);
    s += fmt::format("\tlla t2, save\n\tlla t0, .Lend{}\n{}\tsd t0, {}(t2)\n", i, alias, kSaveEnd);
    s += fmt::format("\tlla t0, .Lnext{}\n\tsd t0, {}(t2)\n\tsd zero, {}(t2)\n\tsd zero, {}(t2)\n", i, kSaveNext, kSaveDone,
                     kSaveCount);
    s += "\tlla t1, l0\n";
    for (int k = 0; k < 4; ++k) {
      // Mostly usable leaves for the sequence's privilege; otherwise any low-8-bit pattern.
      int flags = g.Coin(60) ? (1 | 2 | (g.Coin(75) ? 4 : 0) | (g.Coin(20) ? 8 : 0) | ((user_pages ? g.Coin(85) : g.Coin(15)) ? 16 : 0) |
                                (g.Coin(50) ? 64 : 0) | (g.Coin(50) ? 128 : 0))
                             : g.Int(0, 255);
      s += fmt::format("\tlla t0, win + {}\n\tsrli t0, t0, 12\n\tslli t0, t0, 10\n\tori t0, t0, {}\n", 4096 * g.Int(0, kWinPages - 1),
                       flags);
      if (g.Coin(5)) s += fmt::format("\tli t3, 1\n\tslli t3, t3, {}\n\tor t0, t0, t3\n", g.Coin(50) ? 63 : 61);  // reserved
      s += fmt::format("\tsd t0, {}(t1)\n", 8 * k);
    }
    s += fmt::format("\tlla t0, win + {}\n\tsrli t0, t0, 12\n\tslli t0, t0, 10\n\tori t0, t0, {}\n\tsd t0, 32(t1)\n",
                     4096 * g.Int(0, kWinPages - 1), user_pages ? 0xd7 : 0xc7);
    // Delegate a random subset of the delegable exceptions (never ecall from S: the S handler
    // uses it to reach M at the end of a sequence).
    uint64_t medeleg = g.Coin(30) ? 0xb1ff : g.Coin(30) ? 0 : (g.U64() & 0xb1ff);
    // FS starts Dirty: QEMU 7.2 leaves FS alone when an instruction only accrues fflags
    // (fcvt to integer, compares), Ferry marks it Dirty as the spec asks (see Exclusions).
    uint64_t mstatus = (static_cast<uint64_t>(priv) << 11) | (mprv ? 1ull << 17 : 0) | (3ull << 13) |
                       (g.Coin(40) ? 1ull << 18 : 0) | (g.Coin(30) ? 1ull << 19 : 0) |
                       (g.Coin(15) ? 1ull << 20 : 0) | (g.Coin(50) ? 1ull << 5 : 0);
    const bool tvm = (mstatus >> 20) & 1;
    std::string csrs = fmt::format("\tli t0, {:#x}\n\tcsrw medeleg, t0\n\tlla t0, .Lbody{}\n{}\tcsrw mepc, t0\n"
                                   "\tli t0, {:#x}\n\tcsrw mstatus, t0\n\tsfence.vma\n",
                                   medeleg, i, alias, mstatus);
    s += InitRegisters(g, csrs);
    const int boundary = g.Int(0, 1);
    if (mach && !mprv) s += fmt::format("\tlla s11, win + {}\n", 4096 * (boundary + 1));
    else s += fmt::format("\tli s11, {:#x}\n", kWindowVa + (boundary ? 0x3000 : 0x1000));
    s += fmt::format("\tmret\n.Lbody{}:\n", i);
    const bool sum = (mstatus >> 18) & 1;
    s += Body(g, Ctx{-kSysReach, kSysReach - 8, true, sup, tvm, mach, mach && !mprv, sum}, opt.length);
    s += fmt::format(".Lend{0}:\n\tecall\n.Lnext{0}:\n", i);
  }
  s += "\tli t0, 0x100000\n\tli t1, 0x5555\n\tsw t1, 0(t0)\n1:\tj 1b\n";
  s += FillRoutine("fill");
  // Trap handlers. Both log (cause, tval, epc, handler privilege) and step over the
  // instruction (its length read through the identity mapping); the sequence's final ecall
  // (epc == save.end, or save.done set by the S handler's forwarding ecall) goes to dump.
  auto handler = [&](char m, int t0_slot, int priv) {
    std::string h = fmt::format("\t.balign 4\n{0}_trap:\n\tcsrrw t6, {0}scratch, t6\n\tsd t0, {1}(t6)\n\tsd t1, {2}(t6)\n", m,
                                t0_slot, t0_slot + 8);
    // Breakpoints: tval may be 0 or the pc (both legal); QEMU writes 0, Ferry the pc.
    // Normalised to 0 so the log and the final CSRs compare.
    h += fmt::format("\tcsrr t0, {0}cause\n\tli t1, 3\n\tbne t0, t1, 5f\n\tcsrw {0}tval, zero\n5:\n", m);
    if (m == 'm') h += fmt::format("\tld t0, {}(t6)\n\tbnez t0, .L{}_done\n", kSaveDone, m);
    h += fmt::format("\tcsrr t0, {0}epc\n\tld t1, {1}(t6)\n\tbeq t0, t1, .L{0}_done\n", m, kSaveEnd);
    h += fmt::format("\tld t1, {0}(t6)\n\taddi t0, t1, 1\n\tsd t0, {0}(t6)\n\tli t0, {1}\n\tbgeu t1, t0, 2f\n"
                     "\tslli t1, t1, 5\n\tadd t1, t1, t6\n\tcsrr t0, {2}cause\n\tsd t0, {3}(t1)\n\tcsrr t0, {2}tval\n"
                     "\tsd t0, {4}(t1)\n\tcsrr t0, {2}epc\n\tsd t0, {5}(t1)\n\tli t0, {6}\n\tsd t0, {7}(t1)\n",
                     kSaveCount, kLogEntries, m, kSaveLog, kSaveLog + 8, kSaveLog + 16, priv, kSaveLog + 24);
    // A fetch page fault (a jump into a window page): resume at the return address.
    h += fmt::format("2:\tcsrr t0, {0}cause\n\tli t1, 12\n\tbne t0, t1, 6f\n\tcsrw {0}epc, ra\n\tj 7f\n6:\n", m);
    h += fmt::format("\tcsrr t0, {0}epc\n\tli t1, {1:#x}\n\tbgeu t0, t1, 3f\n\tli t1, {2:#x}\n\tadd t0, t0, t1\n"
                     "3:\tlhu t1, 0(t0)\n\tandi t1, t1, 3\n\taddi t1, t1, -3\n\tcsrr t0, {0}epc\n\taddi t0, t0, 2\n"
                     "\tbnez t1, 4f\n\taddi t0, t0, 2\n4:\tcsrw {0}epc, t0\n"
                     "7:\tld t0, {3}(t6)\n\tld t1, {4}(t6)\n\tcsrrw t6, {0}scratch, t6\n\t{0}ret\n",
                     m, kWindowVa, kRamBase, t0_slot, t0_slot + 8);
    if (m == 's')
      h += fmt::format(".Ls_done:\n\tli t0, 1\n\tsd t0, {}(t6)\n\tld t0, 0(t6)\n\tld t1, 8(t6)\n\tcsrrw t6, sscratch, t6\n\tecall\n",
                       kSaveDone);
    else
      h += ".Lm_done:\n\tld t0, 16(t6)\n\tld t1, 24(t6)\n\tcsrrw t6, mscratch, t6\n\tj dump\n";
    return h;
  };
  s += handler('s', 0, 1) + handler('m', 16, 3);
  // dump (M mode, physical): registers, CSRs and PTEs into save.dump, then the UART gets
  // the dump buffer, the trap count and log, and head/tail of every window page.
  s += "dump:\n\tcsrrw t6, mscratch, t6\n";
  for (int r = 1; r < 31; ++r) s += fmt::format("\tsd x{}, {}(t6)\n", r, kSaveDump + (r - 1) * 8);
  s += fmt::format("\tcsrr t0, mscratch\n\tsd t0, {}(t6)\n\tcsrw mscratch, t6\n", kSaveDump + 30 * 8);
  s += FpDump("t6", kSaveDump + 31 * 8);
  const char* kCsrs[kDumpCsrs] = {"mstatus", "mcause", "mepc", "mtval", "scause", "sepc", "stval"};
  for (int k = 0; k < kDumpCsrs; ++k) s += fmt::format("\tcsrr t0, {}\n\tsd t0, {}(t6)\n", kCsrs[k], kSaveDump + (64 + k) * 8);
  s += "\tlla t1, l0\n";
  for (int k = 0; k < 4; ++k) s += fmt::format("\tld t0, {}(t1)\n\tsd t0, {}(t6)\n", 8 * k, kSaveDump + (64 + kDumpCsrs + k) * 8);
  s += fmt::format("\taddi a0, t6, {}\n\tli a1, {}\n\tcall uart_send\n", kSaveDump, kSysRegBytes);
  s += fmt::format("\taddi a0, t6, {}\n\tli a1, {}\n\tcall uart_send\n", kSaveCount, kSysLogBytes);
  for (int p = 0; p < kWinPages; ++p) {
    s += fmt::format("\tlla a0, win + {}\n\tli a1, {}\n\tcall uart_send\n", p * 4096, kSysReach);
    s += fmt::format("\tlla a0, win + {}\n\tli a1, {}\n\tcall uart_send\n", p * 4096 + 4096 - kSysReach, kSysReach);
  }
  s += fmt::format("\tld t0, {}(t6)\n\tjr t0\n", kSaveNext);
  s += "uart_send:\n\tli t0, 0x10000000\n1:\tlbu t1, 5(t0)\n\tandi t1, t1, 0x20\n\tbeqz t1, 1b\n"
       "\tlbu t2, 0(a0)\n\tsb t2, 0(t0)\n\taddi a0, a0, 1\n\taddi a1, a1, -1\n\tbnez a1, 1b\n\tret\n";
  s += fmt::format("\t.data\n\t.balign 8\nsave:\n\t.space {}\n", kSaveDump + kSysRegBytes);
  s += fmt::format("\t.balign 4096\nroot:\n\t.dword {:#x}\n\t.dword 0\n\t.dword {:#x}\n\t.space {}\n",
                   ((kRamBase >> 12) << 10) | 0xdf, ((kRamBase >> 12) << 10) | 0xcf, 4096 - 24);
  s += fmt::format("l1:\n\t.space 4096\nl0:\n\t.space 4096\nwin:\n\t.space {}\n", kWinPages * 4096);
  return s;
}

}  // namespace ferry::difftest
