// Long differential soak: ferry-cpu-soak [user|system] [first_seed] [programs] [sequences_per_program]
// (the first argument may be left out: user). Prints one JSON line per program; exit 1 on
// any mismatch (the program's .S and ELF are kept in /tmp; FERRY_DIFFTEST_KEEP=1 keeps them
// all), 2 on a build or run error.
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <ctime>

#include "generator.h"
#include "harness.h"

int main(int argc, char** argv) {
  using namespace ferry::difftest;
  ProgramKind kind = ProgramKind::kUser;
  int a = 1;
  if (argc > 1 && (std::strcmp(argv[1], "user") == 0 || std::strcmp(argv[1], "system") == 0)) {
    kind = std::strcmp(argv[1], "system") == 0 ? ProgramKind::kSystem : ProgramKind::kUser;
    a = 2;
  }
  uint64_t seed = argc > a ? std::strtoull(argv[a], nullptr, 0) : static_cast<uint64_t>(time(nullptr));
  int programs = argc > a + 1 ? std::atoi(argv[a + 1]) : 100;
  int per = argc > a + 2 ? std::atoi(argv[a + 2]) : (kind == ProgramKind::kSystem ? 300 : 1000);
  int bad = 0;
  for (int p = 0; p < programs; ++p) {
    auto t0 = std::chrono::steady_clock::now();
    GeneratorOptions opt;
    opt.seed = seed + static_cast<uint64_t>(p);
    opt.sequences = per;
    std::string elf = (kind == ProgramKind::kSystem ? "/tmp/ferry-soak-sys-" : "/tmp/ferry-soak-") + std::to_string(opt.seed);
    std::string f, q, first;
    auto st = RunBoth(kind, opt, elf, &f, &q);
    if (!st) {
      std::fprintf(stderr, "%s\n", st.error().ToString().c_str());
      return 2;
    }
    int mismatches = CompareDumps(kind, f, q, per, &first);
    bad += mismatches;
    double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    std::printf("{\"bench\":\"cpu-soak\",\"kind\":\"%s\",\"seed\":%llu,\"sequences\":%d,\"mismatches\":%d,\"seconds\":%.2f}\n",
                kind == ProgramKind::kSystem ? "system" : "user", static_cast<unsigned long long>(opt.seed), per,
                mismatches, secs);
    if (mismatches) std::fprintf(stderr, "seed %llu: %s\n", static_cast<unsigned long long>(opt.seed), first.c_str());
    std::fflush(stdout);
    if (!mismatches && !std::getenv("FERRY_DIFFTEST_KEEP")) { std::remove(elf.c_str()); std::remove((elf + ".S").c_str()); }
  }
  return bad ? 1 : 0;
}
