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
#include "memory/bus.h"

namespace ferry::difftest {
namespace {
constexpr uint64_t kUserMemBase = 0, kUserMemSize = 64ull << 20;
constexpr uint64_t kSysMemBase = 0x80000000, kSysMemSize = 64ull << 20;
constexpr uint64_t kUartBase = 0x10000000, kFinisherBase = 0x100000;

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

// Loads the PT_LOAD segments of a 64-bit RISC-V ELF into fresh guest memory.
Result<std::unique_ptr<GuestMemory>> LoadElf(const std::string& path, uint64_t base, uint64_t size, uint64_t* entry) {
  std::ifstream f(path, std::ios::binary);
  std::vector<uint8_t> elf((std::istreambuf_iterator<char>(f)), std::istreambuf_iterator<char>());
  if (elf.size() < sizeof(Elf64_Ehdr)) return Errorf(ErrorCode::kCorrupt, "{}: not an ELF file", path);
  Elf64_Ehdr eh;
  std::memcpy(&eh, elf.data(), sizeof eh);
  if (std::memcmp(eh.e_ident, ELFMAG, SELFMAG) != 0 || eh.e_ident[EI_CLASS] != ELFCLASS64 || eh.e_machine != EM_RISCV)
    return Errorf(ErrorCode::kCorrupt, "{}: not a 64-bit RISC-V ELF", path);
  auto mem = GuestMemory::Create(base, size);
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
  *entry = eh.e_entry;
  return std::move(*mem);
}

// The two devices a system program touches: the UART's transmit holding register (LSR
// always reports "transmitter empty") and the sifive_test finisher.
class BareBoard final : public MmioDevice {
 public:
  bool MmioRead(uint64_t offset, unsigned size, uint64_t* value) override {
    if (size != 1 || offset != 5) return false;
    *value = 0x60;  // LSR: THRE | TEMT
    return true;
  }
  bool MmioWrite(uint64_t offset, unsigned size, uint64_t value) override {
    if (size != 1 || offset != 0) return false;
    out.push_back(static_cast<char>(value));
    return true;
  }
  std::string out;
};

class Finisher final : public MmioDevice {
 public:
  bool MmioRead(uint64_t, unsigned, uint64_t*) override { return false; }
  bool MmioWrite(uint64_t offset, unsigned size, uint64_t value) override {
    if (offset != 0 || size != 4) return false;
    done = (value & 0xffff) == 0x5555;
    return done;
  }
  bool done = false;
};
}  // namespace

Status BuildProgram(const std::string& src, const std::string& elf, ProgramKind kind) {
  std::string s = elf + ".S";
  {
    std::ofstream f(s);
    f << src;
    if (!f) return Errorf(ErrorCode::kIo, "cannot write {}", s);
  }
  // -N: text writable (self-modifying code; the system programs' page tables live there too).
  const char* text = kind == ProgramKind::kSystem ? "0x80000000" : "0x10000";
  auto r = Slurp(fmt::format("riscv64-linux-gnu-gcc -nostdlib -static -march=rv64gc -mabi=lp64d -Wl,-N -Wl,-Ttext={} "
                             "-Wl,--build-id=none -Wl,--no-warn-rwx-segments -o {} {} 2>&1",
                             text, elf, s));
  if (!r) return std::unexpected(r.error().WithContext("assemble difftest program (is gcc-riscv64-linux-gnu installed?)"));
  return {};
}

Result<std::string> RunOnQemu(const std::string& elf) { return Slurp("qemu-riscv64 " + elf); }

Result<std::string> RunOnQemuSystem(const std::string& elf) {
  const std::string out = elf + ".uart";
  auto r = Slurp(fmt::format("timeout 120 qemu-system-riscv64 -M virt -m 64M -smp 1 -bios none -nodefaults -display none "
                             "-monitor none -serial file:{} -kernel {} 2>&1",
                             out, elf));
  if (!r) return std::unexpected(r.error().WithContext("qemu-system-riscv64"));
  std::ifstream f(out, std::ios::binary);
  std::string data((std::istreambuf_iterator<char>(f)), std::istreambuf_iterator<char>());
  unlink(out.c_str());
  return data;
}

Result<std::string> RunOnFerry(const std::string& elf_path, uint64_t max_instructions) {
  uint64_t entry = 0;
  auto loaded = LoadElf(elf_path, kUserMemBase, kUserMemSize, &entry);
  if (!loaded) return std::unexpected(loaded.error());
  auto& mem = *loaded;
  VcpuEnv env{mem.get(), nullptr, nullptr, nullptr};
  riscv::RiscvCpu cpu(0, env);
  cpu.SetBootState(entry, 0, 0, riscv::kUser);
  cpu.WriteCsrForTest(0x300, 1ull << 13);  // mstatus.FS = Initial
  cpu.set_host_trap_mode(true);
  cpu.set_x(2, kUserMemSize - 4096);  // a stack, unused by the generated programs
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
      const uint8_t* p = mem->Translate(buf, len);
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

Result<std::string> RunOnFerrySystem(const std::string& elf_path, uint64_t max_instructions) {
  uint64_t entry = 0;
  auto loaded = LoadElf(elf_path, kSysMemBase, kSysMemSize, &entry);
  if (!loaded) return std::unexpected(loaded.error());
  auto& mem = *loaded;
  MmioBus bus;
  BareBoard uart;
  Finisher finisher;
  bus.Register(kUartBase, 0x100, &uart, "uart");
  bus.Register(kFinisherBase, 0x1000, &finisher, "finisher");
  VcpuEnv env{mem.get(), &bus, nullptr, nullptr};
  riscv::RiscvCpu cpu(0, env);
  cpu.SetBootState(entry, 0, 0, riscv::kMachine);
  uint64_t executed = 0;
  while (executed < max_instructions && !finisher.done) {
    VcpuRunResult r = cpu.Run(std::min<uint64_t>(max_instructions - executed, 1'000'000));
    executed += r.instructions;
    if (r.reason == VcpuExitReason::kWaitForInterrupt)
      return Errorf(ErrorCode::kInternal, "hart waits for an interrupt at pc {:#x}", cpu.pc());
  }
  if (!finisher.done) return Errorf(ErrorCode::kTimeout, "program did not finish within {} instructions", max_instructions);
  return uart.out;
}

Status RunBoth(ProgramKind kind, const GeneratorOptions& opt, const std::string& elf, std::string* ferry,
               std::string* qemu) {
  const bool sys = kind == ProgramKind::kSystem;
  FERRY_RETURN_IF_ERROR(BuildProgram(sys ? GenerateSystemProgram(opt) : GenerateProgram(opt), elf, kind),
                        fmt::format("seed {}", opt.seed));
  auto q = sys ? RunOnQemuSystem(elf) : RunOnQemu(elf);
  if (!q) return std::unexpected(q.error().WithContext(fmt::format("seed {} on qemu", opt.seed)));
  auto f = sys ? RunOnFerrySystem(elf) : RunOnFerry(elf);
  if (!f) return std::unexpected(f.error().WithContext(fmt::format("seed {} on ferry", opt.seed)));
  *qemu = std::move(*q);
  *ferry = std::move(*f);
  return {};
}

int CompareDumps(ProgramKind kind, const std::string& a, const std::string& b, int sequences, std::string* first) {
  const bool sys = kind == ProgramKind::kSystem;
  const size_t dump = static_cast<size_t>(sys ? SysDumpBytes() : kDumpBytes);
  const std::vector<DumpField> fields = sys ? SysDumpFields() : UserDumpFields();
  int bad = 0;
  first->clear();
  for (int s = 0; s < sequences; ++s) {
    const size_t base = static_cast<size_t>(s) * dump;
    if (base + dump > a.size() || base + dump > b.size()) {
      if (first->empty()) *first = fmt::format("sequence {}: output truncated (ferry {} bytes, qemu {})", s, a.size(), b.size());
      bad += sequences - s;
      break;
    }
    if (std::memcmp(a.data() + base, b.data() + base, dump) == 0) continue;
    if (bad++ > 0) continue;
    *first = fmt::format("first mismatch in sequence {}:", s);
    for (const DumpField& f : fields) {
      auto word = [&](const std::string& s, int w) {
        uint64_t v;
        std::memcpy(&v, s.data() + base + f.offset + 8 * w, 8);
        return v;
      };
      for (int g = 0; g < f.words; g += f.group) {
        bool differs = false;
        for (int w = g; w < g + f.group; ++w) differs |= word(a, w) != word(b, w);
        if (!differs) continue;
        for (int w = g; w < g + f.group; ++w) {
          std::string name = f.words == 1 ? f.name : fmt::format("{}[{}]", f.name, w);
          if (f.name == "x1") name = fmt::format("x{}", w + 1);
          if (f.name == "f0") name = fmt::format("f{}", w);
          *first += fmt::format(" {} ferry={:#x} qemu={:#x};", name, word(a, w), word(b, w));
        }
      }
    }
  }
  if (!bad && a.size() != b.size()) {
    *first = fmt::format("different lengths (ferry {} bytes, qemu {})", a.size(), b.size());
    bad = 1;
  }
  return bad;
}

}  // namespace ferry::difftest
