// Dirty-tracking overhead: guest memory-write bandwidth of the real RV64 executor with the
// dirty log harvested every `interval_ms` by another thread (as during a migration) vs never.
// Usage: ferry-bench-dirty-tracking [seconds] [interval_ms] [mib]   -- prints JSON lines.
#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <thread>

#include "cpu/riscv/riscv_cpu.h"

using namespace ferry;

namespace {
constexpr uint64_t kBase = 0x80000000;

double Measure(double seconds, int interval_ms, uint64_t mib, uint64_t* harvests) {
  auto mem = std::move(*GuestMemory::Create(kBase, (mib + 16) << 20));
  // Guest (M-mode), encodings from riscv64-linux-gnu-as: x5 = cursor, x6 = end, x8 = start;
  // loop: 8 x sd x7,k(x5); addi x5,x5,64; bltu x5,x6,loop; add x5,x8,x0; jal loop.
  uint32_t code[] = {
      0x0072b023, 0x0072b423, 0x0072b823, 0x0072bc23,  // sd x7, 0/8/16/24(x5)
      0x0272b023, 0x0272b423, 0x0272b823, 0x0272bc23,  // sd x7, 32/40/48/56(x5)
      0x04028293,                                      // addi x5, x5, 64
      0xfc62eee3,                                      // bltu x5, x6, -36 (loop)
      0x000402b3,                                      // add x5, x8, x0 (restart)
      0xfd5ff06f,                                      // jal x0, -44 (loop)
  };
  (void)mem->Write(kBase, code, sizeof code);
  VcpuEnv env{mem.get(), nullptr, nullptr, nullptr};
  riscv::RiscvCpu cpu(0, env);
  cpu.SetBootState(kBase, 0, 0, riscv::kMachine);
  const uint64_t buf = kBase + (16ull << 20);
  cpu.set_x(5, buf);
  cpu.set_x(8, buf);
  cpu.set_x(6, buf + (mib << 20));
  cpu.set_x(7, 0x5555555555555555ull);
  std::atomic<bool> stop{false};
  std::thread harvester([&] {
    while (!stop.load()) {
      std::this_thread::sleep_for(std::chrono::milliseconds(interval_ms > 0 ? interval_ms : 10));
      if (interval_ms > 0) {
        (void)mem->dirty_log().Harvest();
        ++*harvests;
      }
    }
  });
  auto t0 = std::chrono::steady_clock::now();
  uint64_t instr = 0;
  double elapsed = 0;
  while (elapsed < seconds) {
    instr += cpu.Run(5'000'000).instructions;
    elapsed = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  }
  stop.store(true);
  harvester.join();
  uint64_t probe = 0;
  (void)mem->Read(buf + (mib << 20) - 8, &probe, 8);
  if (probe != 0x5555555555555555ull) {
    std::fprintf(stderr, "guest loop did not write the buffer\n");
    std::exit(1);
  }
  // 8 of every 10 instructions in the loop body store 8 bytes.
  return static_cast<double>(instr) * 8.0 / 10.0 * 8.0 / elapsed / (1 << 20);
}
}  // namespace

int main(int argc, char** argv) {
  double seconds = argc > 1 ? std::atof(argv[1]) : 3.0;
  int interval = argc > 2 ? std::atoi(argv[2]) : 100;
  uint64_t mib = argc > 3 ? std::strtoull(argv[3], nullptr, 0) : 64;
  uint64_t h_off = 0, h_on = 0;
  double off = Measure(seconds, 0, mib, &h_off);
  double on = Measure(seconds, interval, mib, &h_on);
  std::printf("{\"bench\":\"dirty-tracking\",\"mib\":%llu,\"seconds\":%.1f,\"harvest_interval_ms\":%d,"
              "\"write_mib_s_tracking_off\":%.1f,\"write_mib_s_tracking_on\":%.1f,\"harvests\":%llu,\"ratio_on_off\":%.3f}\n",
              static_cast<unsigned long long>(mib), seconds, interval, off, on, static_cast<unsigned long long>(h_on), on / off);
  return 0;
}
