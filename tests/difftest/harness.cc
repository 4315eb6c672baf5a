#include "harness.h"

#include <elf.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cstdio>
#include <cstring>
#include <fstream>
#include <sstream>
#include <vector>

#include "cpu/riscv/riscv_cpu.h"

namespace ferry::difftest {
namespace {
constexpr uint64_t kMemBase = 0, kMemSize = 64ull << 20;

Result<std::string> Slurp(const std::string& cmd) {
  FILE* p = popen(cmd.c_str(), "r");
  if (!p) return ErrnoError("popen");
  std::string out;
  char buf[65536];
  size_t n;
  while ((n = fread(buf, 1, sizeof buf, p)) > 0) out.append(buf, n);
  int st = pclose(p);
  if (!WIFEXITED(st) || WEXITSTATUS(st) != 0)
    return Errorf(ErrorCode::kInternal, "'{}' failed (status {})", cmd, st);
  return out;
}
}  // namespace

Status BuildProgram(const std::string& src, const std::string& elf) {
  std::string s = elf + ".S";
  {
    std::ofstream f(s);
    f << src;
    if (!f) return Errorf(ErrorCode::kIo, "cannot write {}", s);
  }
  auto r = Slurp("riscv64-linux-gnu-gcc -nostdlib -static -march=rv64gc -mabi=lp64d -Wl,-Ttext=0x10000 -Wl,--build-id=none -o " +
                 elf + " " + s + " 2>&1");
  if (!r) return std::unexpected(r.error().WithContext("assemble difftest program (is gcc-riscv64-linux-gnu installed?)"));
  return {};
}

Result<std::string> RunOnQemu(const std::string& elf) { return Slurp("qemu-riscv64 " + elf); }

Result<std::string> RunOnFerry(const std::string& elf_path, uint64_t max_instructions) {
  std::ifstream f(elf_path, std::ios::binary);
  std::vector<uint8_t> elf((std::istreambuf_iterator<char>(f)), std::istreambuf_iterator<char>());
  if (elf.size() < sizeof(Elf64_Ehdr)) return Errorf(ErrorCode::kCorrupt, "{}: not an ELF file", elf_path);
  Elf64_Ehdr eh;
  std::memcpy(&eh, elf.data(), sizeof eh);
  if (std::memcmp(eh.e_ident, ELFMAG, SELFMAG) != 0 || eh.e_ident[EI_CLASS] != ELFCLASS64 || eh.e_machine != EM_RISCV)
    return Errorf(ErrorCode::kCorrupt, "{}: not a 64-bit RISC-V ELF", elf_path);
  auto mem = GuestMemory::Create(kMemBase, kMemSize);
  if (!mem) return std::unexpected(mem.error());
  for (int i = 0; i < eh.e_phnum; ++i) {
    uint64_t off = eh.e_phoff + static_cast<uint64_t>(i) * eh.e_phentsize;
    if (off + sizeof(Elf64_Phdr) > elf.size()) return Errorf(ErrorCode::kCorrupt, "program header out of file");
    Elf64_Phdr ph;
    std::memcpy(&ph, elf.data() + off, sizeof ph);
    if (ph.p_type != PT_LOAD) continue;
    if (ph.p_offset + ph.p_filesz > elf.size() || ph.p_filesz > ph.p_memsz || !(*mem)->Contains(ph.p_vaddr, ph.p_memsz))
      return Errorf(ErrorCode::kCorrupt, "segment {} out of range", i);
    FERRY_RETURN_IF_ERROR((*mem)->Write(ph.p_vaddr, elf.data() + ph.p_offset, ph.p_filesz), "load segment");
  }
  VcpuEnv env{mem->get(), nullptr, nullptr, nullptr};
  riscv::RiscvCpu cpu(0, env);
  cpu.SetBootState(eh.e_entry, 0, 0, riscv::kUser);
  cpu.WriteCsrForTest(0x300, 1ull << 13);  // mstatus.FS = Initial
  cpu.set_host_trap_mode(true);
  cpu.set_x(2, kMemSize - 4096);  // a stack, unused by the generated programs
  std::string out;
  uint64_t executed = 0;
  while (executed < max_instructions) {
    VcpuRunResult r = cpu.Run(max_instructions - executed);
    executed += r.instructions;
    if (r.reason != VcpuExitReason::kHostTrap) continue;
    if (cpu.last_trap_cause() != riscv::kCauseEcallU)
      return Errorf(ErrorCode::kInternal, "unexpected trap cause {} tval {:#x} at pc {:#x}", cpu.last_trap_cause(),
                    cpu.last_trap_tval(), cpu.last_trap_pc());
    uint64_t nr = cpu.x(17);
    if (nr == 93 || nr == 94) return out;  // exit / exit_group
    if (nr == 64) {
      uint64_t buf = cpu.x(11), len = cpu.x(12);
      const uint8_t* p = (*mem)->Translate(buf, len);
      if (!p) return Errorf(ErrorCode::kInternal, "write() buffer out of memory");
      out.append(reinterpret_cast<const char*>(p), len);
      cpu.set_x(10, len);
    } else {
      return Errorf(ErrorCode::kUnsupported, "syscall {} not emulated", nr);
    }
    cpu.set_pc(cpu.last_trap_pc() + 4);
  }
  return Errorf(ErrorCode::kTimeout, "program did not exit within {} instructions", max_instructions);
}

}  // namespace ferry::difftest
