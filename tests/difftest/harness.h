// Builds difftest programs with the cross toolchain and runs them on Ferry's real
// executor (RiscvCpu) and on QEMU, returning what each wrote (the dumps).
//
// * User programs: RunOnFerry runs the static ELF in host-trap mode with write(1)/exit
//   syscall emulation; RunOnQemu runs it under qemu-riscv64.
// * System programs: RunOnFerrySystem runs the ELF on a bare hart in M mode (RAM at
//   0x80000000, an NS16550-style transmit register at 0x10000000 and the sifive_test
//   finisher at 0x100000, the two devices the program uses on QEMU's virt board);
//   RunOnQemuSystem runs it with qemu-system-riscv64 -M virt -bios none, the UART going
//   to a file.
// Threads: none; every call is synchronous.
#pragma once

#include <string>

#include "common/error.h"
#include "generator.h"

namespace ferry::difftest {

enum class ProgramKind { kUser, kSystem };

// Runs the ELF on RiscvCpu; returns everything the program wrote to stdout.
Result<std::string> RunOnFerry(const std::string& elf_path, uint64_t max_instructions = 2'000'000'000);
// Runs the bare-metal ELF on RiscvCpu; returns everything written to the UART.
Result<std::string> RunOnFerrySystem(const std::string& elf_path, uint64_t max_instructions = 2'000'000'000);
// Assembles + links `asm_source` into `elf_path` (riscv64-linux-gnu-gcc -nostdlib -static,
// text writable; system programs linked at 0x80000000).
Status BuildProgram(const std::string& asm_source, const std::string& elf_path, ProgramKind kind = ProgramKind::kUser);
// Runs the ELF under qemu-riscv64; returns its stdout.
Result<std::string> RunOnQemu(const std::string& elf_path);
// Runs the bare-metal ELF under qemu-system-riscv64 -M virt; returns its UART output.
Result<std::string> RunOnQemuSystem(const std::string& elf_path);

// Generates, builds and runs one program of `kind` on both sides (the ELF and its .S stay
// at `elf_path`); fills the two outputs.
Status RunBoth(ProgramKind kind, const GeneratorOptions& opt, const std::string& elf_path, std::string* ferry,
               std::string* qemu);
// Compares the outputs of `sequences` dumps; returns how many sequences differ and describes
// the first (field by field, via the kind's DumpField layout) in *first.
int CompareDumps(ProgramKind kind, const std::string& ferry, const std::string& qemu, int sequences, std::string* first);

}  // namespace ferry::difftest
