// Long differential soak: ferry-cpu-soak [first_seed] [programs] [sequences_per_program]
// Prints one JSON line per program.
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>

#include "generator.h"
#include "harness.h"

int main(int argc, char** argv) {
  using namespace ferry::difftest;
  uint64_t seed = argc > 1 ? std::strtoull(argv[1], nullptr, 0) : static_cast<uint64_t>(time(nullptr));
  int programs = argc > 2 ? std::atoi(argv[2]) : 100;
  int per = argc > 3 ? std::atoi(argv[3]) : 1000;
  int bad = 0;
  for (int p = 0; p < programs; ++p) {
    auto t0 = std::chrono::steady_clock::now();
    GeneratorOptions opt;
    opt.seed = seed + static_cast<uint64_t>(p);
    opt.sequences = per;
    std::string elf = "/tmp/ferry-soak-" + std::to_string(opt.seed);
    if (!BuildProgram(GenerateProgram(opt), elf)) return 2;
    auto q = RunOnQemu(elf);
    auto f = RunOnFerry(elf);
    int mismatches = 0;
    if (q && f) {
      for (int s = 0; s < per; ++s) {
        size_t b = static_cast<size_t>(s) * kDumpBytes;
        if (b + kDumpBytes > q->size() || b + kDumpBytes > f->size() || std::memcmp(q->data() + b, f->data() + b, kDumpBytes)) mismatches++;
      }
    } else {
      mismatches = per;
    }
    bad += mismatches;
    double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    std::printf("{\"bench\":\"cpu-soak\",\"seed\":%llu,\"sequences\":%d,\"mismatches\":%d,\"seconds\":%.2f}\n",
                static_cast<unsigned long long>(opt.seed), per, mismatches, secs);
    std::fflush(stdout);
    if (!mismatches) { std::remove(elf.c_str()); std::remove((elf + ".S").c_str()); }
  }
  return bad ? 1 : 0;
}
