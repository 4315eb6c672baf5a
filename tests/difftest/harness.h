// Runs a static RV64 user-mode ELF on Ferry's real executor (RiscvCpu in host-trap
// mode) with write(1)/exit syscall emulation; and builds/runs programs with the cross
// toolchain and qemu-riscv64.
#pragma once

#include <string>

#include "common/error.h"

namespace ferry::difftest {

// Runs the ELF on RiscvCpu; returns everything the program wrote to stdout.
Result<std::string> RunOnFerry(const std::string& elf_path, uint64_t max_instructions = 2'000'000'000);
// Assembles + links `asm_source` into `elf_path` (riscv64-linux-gnu-gcc -nostdlib -static).
Status BuildProgram(const std::string& asm_source, const std::string& elf_path);
// Runs the ELF under qemu-riscv64; returns its stdout.
Result<std::string> RunOnQemu(const std::string& elf_path);

}  // namespace ferry::difftest
