// Host CPU usage from /proc/stat: how many cores were idle between two samples. Used to size
// work that competes with the guest for the host's cores (e.g. migration compression).
//
// Threads: one sampler per user; not thread-safe.
#pragma once

#include <cstdint>

namespace ferry {

class HostCpuSampler {
 public:
  HostCpuSampler();
  // Idle cores (idle + iowait time / wall time) since the previous call (or construction);
  // negative when /proc/stat cannot be read or no time passed.
  double IdleCores();
  static int OnlineCores();

 private:
  bool Read(uint64_t* idle, uint64_t* total) const;
  uint64_t idle_ = 0, total_ = 0;
  bool ok_ = false;
};

}  // namespace ferry
