// Random RV64GC programs for differential testing of Ferry's CPU against QEMU.
//
// Two kinds of program, both made of many independent sequences, each preceded by a
// deterministic init and followed by a dump of the architectural state:
//
// * User programs (GenerateProgram, run by qemu-riscv64 and by RiscvCpu in host-trap
//   mode): init of x/f registers, fcsr (frm 0..3) and a 2 KiB memory window (base s11,
//   placed across a page boundary); the body mixes straight-line RV64GC code with loops
//   (backward branches, bounded trip counts, possibly nested forward branches inside) and
//   self-modifying code (a store into the instruction stream, fence.i, then the changed
//   instruction executes; the text is linked writable). Dump: window, x1..x31, f0..f31,
//   fcsr (kDumpBytes), written with the write syscall.
//
// * System programs (GenerateSystemProgram, run by qemu-system-riscv64 -M virt -bios none
//   and by RiscvCpu on a bare machine; see harness.h): an M-mode driver builds Sv39 page
//   tables (identity gigapage for S, a U alias gigapage of the same memory, four 4 KiB
//   window pages with random permissions / A / D / reserved bits over three physical
//   pages, and one always-writable page for AMOs), picks medeleg, mstatus.SUM/MXR/TVM and
//   the privilege per sequence (S, U, or M: physical addresses, or MPRV with MPP = U so
//   loads/stores translate as U) and mrets into the body. Bodies add system events to the
//   user mix: ecall, ebreak, illegal instructions (reserved opcodes, M/S-only CSRs and
//   xRETs from lower privilege, U-mode sfence.vma/wfi), misaligned LR, page-faulting and
//   page-crossing loads/stores, S-CSR reads, PTE rewrites followed by sfence.vma, calls
//   into window pages (fetch page faults) and, in S and U, self-modifying code (in S
//   sometimes stored through the U alias). Traps go to an S handler (if delegated) or the
//   M handler; both log cause/tval/epc and step over the instruction (sret/mret). The
//   final ecall ends the sequence and the M-mode dump sends SysDumpBytes() (layout:
//   SysDumpFields) over the UART.
//
// Threads: pure functions of their options (same seed, same program), callable from any
// thread. Invariant: a program's output depends only on architectural behaviour, never on
// timing, counters or interrupts, so any difference between the two runs is a divergence.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace ferry::difftest {

inline constexpr int kWindowBytes = 2048;
inline constexpr int kDumpBytes = kWindowBytes + 31 * 8 + 32 * 8 + 8;

struct GeneratorOptions {
  uint64_t seed = 1;
  int sequences = 1000;
  int length = 24;  // top-level items per sequence (an item is an instruction, a loop or an SMC block)
};

// One named run of 8-byte words in a dump (for describing mismatches).
struct DumpField {
  std::string name;
  int offset;  // bytes
  int words;
  int group = 1;  // words shown together when one of them differs (e.g. a trap log entry)
};

// Returns GNU assembler source for one user-mode program.
std::string GenerateProgram(const GeneratorOptions& opt);
// Returns GNU assembler source for one bare-metal (M/S/U-mode, Sv39) program.
std::string GenerateSystemProgram(const GeneratorOptions& opt);

// Layout of one sequence's dump.
std::vector<DumpField> UserDumpFields();
std::vector<DumpField> SysDumpFields();
int SysDumpBytes();

// Classes of instructions deliberately not generated, with the reason (printed by tests).
std::vector<std::string> Exclusions();

}  // namespace ferry::difftest
