#include "common/host_cpu.h"

#include <unistd.h>

#include <cstdio>

namespace ferry {

HostCpuSampler::HostCpuSampler() { ok_ = Read(&idle_, &total_); }

int HostCpuSampler::OnlineCores() {
  long n = sysconf(_SC_NPROCESSORS_ONLN);
  return n > 0 ? static_cast<int>(n) : 1;
}

bool HostCpuSampler::Read(uint64_t* idle, uint64_t* total) const {
  FILE* f = std::fopen("/proc/stat", "re");
  if (!f) return false;
  unsigned long long v[10] = {};
  const int n = std::fscanf(f, "cpu %llu %llu %llu %llu %llu %llu %llu %llu %llu %llu", &v[0], &v[1], &v[2], &v[3], &v[4], &v[5],
                            &v[6], &v[7], &v[8], &v[9]);
  std::fclose(f);
  if (n < 5) return false;
  // user nice system idle iowait irq softirq steal (guest and guest_nice are inside user/nice).
  *idle = v[3] + v[4];
  *total = 0;
  for (int i = 0; i < 8 && i < n; ++i) *total += v[i];
  return true;
}

double HostCpuSampler::IdleCores() {
  uint64_t idle = 0, total = 0;
  if (!Read(&idle, &total)) return -1;
  const bool was_ok = ok_;
  const uint64_t di = idle - idle_, dt = total - total_;
  idle_ = idle;
  total_ = total;
  ok_ = true;
  if (!was_ok || dt == 0) return -1;
  return static_cast<double>(di) / static_cast<double>(dt) * OnlineCores();
}

}  // namespace ferry
