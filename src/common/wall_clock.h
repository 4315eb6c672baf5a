// Wall-clock time for timestamps that people and other hosts read (records, leases shared through
// a store). Durations, deadlines and rates use NowNs (clock.h), which does not jump.
// Pure functions, thread-safe.
#pragma once

#include <time.h>

#include <cstdint>

namespace ferry {

// Milliseconds since the Unix epoch.
inline uint64_t UnixMs() {
  timespec ts;
  clock_gettime(CLOCK_REALTIME, &ts);
  return static_cast<uint64_t>(ts.tv_sec) * 1000ull + static_cast<uint64_t>(ts.tv_nsec) / 1'000'000;
}

}  // namespace ferry
