#include "generator.h"

#include <array>
#include <cstring>
#include <random>

#include <fmt/format.h>

namespace ferry::difftest {
namespace {

// Registers the sequences may write: everything except x0, s10 (x26, AMO address) and
// s11 (x27, window base).
constexpr std::array<int, 29> kRegs = {1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20,
                                       21, 22, 23, 24, 25, 28, 29, 30, 31};

class Gen {
 public:
  explicit Gen(uint64_t seed) : rng_(seed) {}
  uint64_t U64() { return rng_(); }
  int Int(int lo, int hi) { return std::uniform_int_distribution<int>(lo, hi)(rng_); }
  bool Coin(int pct) { return Int(0, 99) < pct; }
  std::string X() { return fmt::format("x{}", kRegs[Int(0, kRegs.size() - 1)]); }
  std::string Xs() { return Coin(8) ? "x0" : (Coin(30) ? fmt::format("x{}", Int(8, 15)) : X()); }
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
};

std::string Instruction(Gen& g, int seq, int idx, std::string* pending_label) {
  const int kind = g.Int(0, 99);
  auto rd = g.X(), rs1 = g.Xs(), rs2 = g.Xs();
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
    int off = g.Int(0, kWindowBytes - 8);
    if (g.Coin(50)) return fmt::format("{} {}, {}(s11)", kLoads[g.Int(0, 6)], rd, off);
    return fmt::format("{} {}, {}(s11)", kStores[g.Int(0, 3)], rs2, off);
  }
  if (kind < 62) {  // atomics (aligned, address in s10)
    bool d = g.Coin(50);
    int off = g.Int(0, kWindowBytes / 8 - 1) * 8 + (d ? 0 : 4 * g.Int(0, 1));
    std::string sfx = d ? ".d" : ".w";
    std::string pre = fmt::format("addi s10, s11, {}\n\t", off);
    if (g.Coin(20))  // adjacent LR/SC pair
      return pre + fmt::format("lr{} {}, (s10)\n\tsc{} {}, {}, (s10)", sfx, rd, sfx, g.X(), rs2);
    static const char* kAmo[] = {"amoswap", "amoadd", "amoxor", "amoand", "amoor", "amomin", "amomax", "amominu", "amomaxu"};
    return pre + fmt::format("{}{} {}, {}, (s10)", kAmo[g.Int(0, 8)], sfx, rd, rs2);
  }
  if (kind < 66) {  // forward branch / jump over the next instruction
    static const char* kBr[] = {"beq", "bne", "blt", "bge", "bltu", "bgeu"};
    *pending_label = fmt::format(".Ls{}_{}", seq, idx);
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
    case 10: return fmt::format("{} {}, {}(s11)", g.Coin(50) ? "flw" : "fld", fd, g.Int(0, kWindowBytes - 8));
    case 11: return fmt::format("{} {}, {}(s11)", g.Coin(50) ? "fsw" : "fsd", fa, g.Int(0, kWindowBytes - 8));
    case 12: return fmt::format("csrrw {}, frm, {}", rd, rs1 == "x0" ? "x0" : "x0");  // read frm; keep a valid frm
    default: return fmt::format("frflags {}", rd);
  }
}

}  // namespace

std::vector<std::string> Exclusions() {
  return {"rounding mode RMM (ties to max magnitude): Ferry's FPU approximates it with RNE for arithmetic (known gap)",
          "fcsr writes with reserved frm values 5-7 (would make dynamic-rounding instructions illegal)",
          "CSR accesses other than frm/fflags/fcsr (counters differ by design between emulators)",
          "LR/SC other than adjacent pairs (QEMU user mode implements SC by value comparison)",
          "ecall/ebreak/illegal encodings and control flow leaving the sequence"};
}

std::string GenerateProgram(const GeneratorOptions& opt) {
  Gen g(opt.seed);
  std::string s;
  s += "\t.option norelax\n\t.text\n\t.globl _start\n_start:\n\tla s11, window\n";
  for (int i = 0; i < opt.sequences; ++i) {
    // Deterministic init.
    for (int r : kRegs) s += fmt::format("\tli x{}, {:#x}\n", r, g.IntValue());
    for (int w = 0; w < kWindowBytes; w += 8) {
      s += fmt::format("\tli t0, {:#x}\n\tsd t0, {}(s11)\n", g.U64(), w);
    }
    for (int f = 0; f < 32; ++f) s += fmt::format("\tli t0, {:#x}\n\tfmv.d.x f{}, t0\n", g.FpValue(), f);
    s += fmt::format("\tli t0, {:#x}\n\tcsrw fcsr, t0\n", (g.Int(0, 3) << 5) | g.Int(0, 31));  // frm 0..3: RMM excluded
    s += fmt::format("\tli t0, {:#x}\n", g.IntValue());
    s += fmt::format("\tli s10, 0\n");
    // Body.
    std::string label;
    for (int k = 0; k < opt.length; ++k) {
      std::string pending;
      s += "\t" + Instruction(g, i, k, &pending) + "\n";
      if (!label.empty()) {
        s += label + ":\n";
        label.clear();
      }
      if (!pending.empty()) label = pending;
    }
    if (!label.empty()) s += label + ":\n";
    s += "\tcall dump\n";
  }
  s += "\tli a0, 0\n\tli a7, 93\n\tecall\n";
  // dump: store x1..x31 (ra holds the return address: deterministic too), f0..f31, fcsr after the window, write it out.
  s += "dump:\n";
  for (int r = 1; r < 32; ++r)
    if (r != 27) s += fmt::format("\tsd x{}, {}(s11)\n", r, kWindowBytes + (r - 1) * 8);
  s += fmt::format("\tsd x0, {}(s11)\n", kWindowBytes + 26 * 8);
  for (int f = 0; f < 32; ++f) s += fmt::format("\tfsd f{}, {}(s11)\n", f, kWindowBytes + 31 * 8 + f * 8);
  s += fmt::format("\tfrcsr t0\n\tsd t0, {}(s11)\n", kWindowBytes + 31 * 8 + 32 * 8);
  s += fmt::format("\tli a0, 1\n\tmv a1, s11\n\tli a2, {}\n\tli a7, 64\n\tecall\n", kDumpBytes);
  s += "\tret\n";
  s += fmt::format("\t.bss\n\t.align 12\nwindow:\n\t.space {}\n", kDumpBytes + 64);
  return s;
}

}  // namespace ferry::difftest
