// Monotonic time for durations, deadlines and rates (never wall-clock time: CLOCK_MONOTONIC does
// not jump with NTP or settimeofday; it does not count time the host was suspended).
//
// Pure functions, thread-safe (NowNs: vDSO clock_gettime, no syscall on x86-64).
#pragma once

#include <time.h>

#include <cstdint>

namespace ferry {

// Nanoseconds since an arbitrary fixed point (boot). Differences of two values from the same
// host are durations; values from different hosts or boots are not comparable.
inline uint64_t NowNs() {
  timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return static_cast<uint64_t>(ts.tv_sec) * 1'000'000'000ull + static_cast<uint64_t>(ts.tv_nsec);
}

// CPU time the calling thread has used, in nanoseconds (CLOCK_THREAD_CPUTIME_ID): differences of
// two values taken on the same thread measure that thread's CPU cost of the code in between.
inline uint64_t ThreadCpuNs() {
  timespec ts;
  clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts);
  return static_cast<uint64_t>(ts.tv_sec) * 1'000'000'000ull + static_cast<uint64_t>(ts.tv_nsec);
}

// A duration in nanoseconds as fractional milliseconds (for logs, stats and JSON).
inline double MsFromNs(uint64_t ns) { return static_cast<double>(ns) / 1e6; }

}  // namespace ferry
