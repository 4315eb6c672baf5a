// Random RV64GC instruction sequences for differential testing against qemu-riscv64.
// A program holds many sequences; each is preceded by a deterministic init of x/f
// registers, fcsr and a 256-byte memory window (base register s11), and followed by
// a dump (window + x1..x31 + f0..f31 + fcsr) written to stdout with the write syscall.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace ferry::difftest {

inline constexpr int kWindowBytes = 256;
inline constexpr int kDumpBytes = kWindowBytes + 31 * 8 + 32 * 8 + 8;

struct GeneratorOptions {
  uint64_t seed = 1;
  int sequences = 1000;
  int length = 16;  // instructions per sequence (before assembler expansion)
};

// Returns GNU assembler source for one program.
std::string GenerateProgram(const GeneratorOptions& opt);
// Classes of instructions deliberately not generated, with the reason (printed by tests).
std::vector<std::string> Exclusions();

}  // namespace ferry::difftest
