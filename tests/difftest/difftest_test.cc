// Differential conformance: Ferry's RV64GC executor vs qemu-riscv64 on random programs.
#include <unistd.h>

#include <cstring>

#include <gtest/gtest.h>

#include "generator.h"
#include "harness.h"

namespace ferry::difftest {
namespace {

std::string Describe(const std::string& a, const std::string& b, int sequences) {
  for (int s = 0; s < sequences; ++s) {
    size_t base = static_cast<size_t>(s) * kDumpBytes;
    if (base + kDumpBytes > a.size() || base + kDumpBytes > b.size()) return fmt::format("sequence {}: output truncated", s);
    if (std::memcmp(a.data() + base, b.data() + base, kDumpBytes) == 0) continue;
    std::string msg = fmt::format("first mismatch in sequence {}:", s);
    for (int off = 0; off < kDumpBytes; off += 8) {
      uint64_t x, y;
      std::memcpy(&x, a.data() + base + off, 8);
      std::memcpy(&y, b.data() + base + off, 8);
      if (x == y) continue;
      std::string what = off < kWindowBytes ? fmt::format("mem[{}]", off)
                         : off < kWindowBytes + 31 * 8 ? fmt::format("x{}", (off - kWindowBytes) / 8 + 1)
                         : off < kWindowBytes + 63 * 8 ? fmt::format("f{}", (off - kWindowBytes - 31 * 8) / 8)
                                                       : "fcsr";
      msg += fmt::format(" {} ferry={:#x} qemu={:#x};", what, x, y);
    }
    return msg;
  }
  return a.size() == b.size() ? "identical" : "different lengths";
}

// Runs `programs` programs of `per` sequences each; returns mismatching sequence count.
void RunSeeds(uint64_t first_seed, int programs, int per) {
  std::string dir = "/tmp/ferry-difftest-" + std::to_string(getpid());
  ASSERT_EQ(system(("mkdir -p " + dir).c_str()), 0);
  for (const auto& e : Exclusions()) std::printf("excluded: %s\n", e.c_str());
  int total = 0;
  for (int p = 0; p < programs; ++p) {
    GeneratorOptions opt;
    opt.seed = first_seed + static_cast<uint64_t>(p);
    opt.sequences = per;
    std::string elf = dir + "/prog" + std::to_string(p);
    auto built = BuildProgram(GenerateProgram(opt), elf);
    ASSERT_TRUE(built) << built.error().ToString();
    auto q = RunOnQemu(elf);
    ASSERT_TRUE(q) << q.error().ToString();
    auto f = RunOnFerry(elf);
    ASSERT_TRUE(f) << "seed " << opt.seed << ": " << f.error().ToString();
    ASSERT_EQ(q->size(), static_cast<size_t>(per) * kDumpBytes) << "qemu output size";
    EXPECT_TRUE(*f == *q) << "seed " << opt.seed << ": " << Describe(*f, *q, per) << "\n(reproduce: keep " << elf
                          << ".S and disassemble with riscv64-linux-gnu-objdump -d " << elf << ")";
    if (*f != *q) return;  // keep the files for inspection
    total += per;
    unlink(elf.c_str());
    unlink((elf + ".S").c_str());
  }
  std::printf("difftest: %d sequences identical to qemu-riscv64\n", total);
  rmdir(dir.c_str());
}

TEST(CpuDifftest, RandomSequencesMatchQemuFixedSeeds) { RunSeeds(1000, 100, 1000); }  // 1e5 sequences

}  // namespace
}  // namespace ferry::difftest
