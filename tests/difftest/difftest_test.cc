// Differential conformance: Ferry's RV64GC executor vs QEMU on random programs -- user-mode
// programs (loops, self-modifying code, FP with static and dynamic rounding) against
// qemu-riscv64, and bare-metal M/S/U programs (Sv39 page tables with varied permissions
// and A/D bits, sfence.vma, delegated and M-mode traps) against qemu-system-riscv64.
#include <unistd.h>

#include <gtest/gtest.h>

#include "generator.h"
#include "harness.h"

namespace ferry::difftest {
namespace {

void RunSeeds(ProgramKind kind, uint64_t first_seed, int programs, int per) {
  std::string dir = "/tmp/ferry-difftest-" + std::to_string(getpid());
  ASSERT_EQ(system(("mkdir -p " + dir).c_str()), 0);
  for (const auto& e : Exclusions()) std::printf("excluded: %s\n", e.c_str());
  int total = 0;
  for (int p = 0; p < programs; ++p) {
    GeneratorOptions opt;
    opt.seed = first_seed + static_cast<uint64_t>(p);
    opt.sequences = per;
    std::string elf = dir + "/prog" + std::to_string(p);
    std::string f, q, first;
    auto st = RunBoth(kind, opt, elf, &f, &q);
    ASSERT_TRUE(st) << st.error().ToString();
    int bad = CompareDumps(kind, f, q, per, &first);
    EXPECT_EQ(bad, 0) << "seed " << opt.seed << ": " << first << "\n(reproduce: keep " << elf
                      << ".S and disassemble with riscv64-linux-gnu-objdump -d " << elf << ")";
    if (bad) return;  // keep the files for inspection
    total += per;
    unlink(elf.c_str());
    unlink((elf + ".S").c_str());
  }
  std::printf("difftest: %d sequences identical to qemu\n", total);
  rmdir(dir.c_str());
}

// 25,000 user sequences of 24 items (loops, SMC, FP rounding) vs qemu-riscv64.
TEST(CpuDifftest, UserSequencesMatchQemuFixedSeeds) { RunSeeds(ProgramKind::kUser, 1000, 50, 500); }

// 6,000 bare-metal S/U sequences (Sv39, traps) vs qemu-system-riscv64.
TEST(CpuDifftest, SystemSequencesMatchQemuSystemFixedSeeds) { RunSeeds(ProgramKind::kSystem, 5000, 20, 300); }

}  // namespace
}  // namespace ferry::difftest
