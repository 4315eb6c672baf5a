// What ferry-agent measures on its host, from text the kernel writes: /proc/stat (CPU time),
// /proc/meminfo, /proc/vmstat (swap-out), /proc/PID/stat (a VMM's CPU time, RSS and start time),
// /proc/PID/status (its swapped-out bytes) and a TAP's counters (/proc/net/dev); plus the
// operator's declared capacity (`--capacity cpus=N,mem=SIZE[,net=RATE]`).
//
// The parsers are pure functions of the text (unit-tested on fixtures); the Read* helpers read
// the real files. Rates are computed by the caller from two samples (RateOf). Any thread.
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <string_view>

#include "common/error.h"

namespace ferry::agent {

// --capacity: cpus (> 0, fractions allowed), mem (a size: 64G), net (optional, bytes/s as a size
// "1G" = 1 GiB/s, or bits/s with a decimal suffix "10Gbit", "100Mbit"; 0 = not declared).
struct Capacity {
  double cpus = 0;
  uint64_t mem_bytes = 0;
  uint64_t net_bytes_per_s = 0;
};
Result<Capacity> ParseCapacity(std::string_view spec);
// A network rate: a size per second ("125M") or bits per second ("1Gbit", "100Mbit", "800kbit", "1000bit").
Result<uint64_t> ParseRate(std::string_view s);

// The aggregate "cpu " line of /proc/stat, in clock ticks, and the number of "cpuN" lines.
struct CpuTimes {
  uint64_t busy = 0, total = 0;  // busy = total - idle - iowait
  int cpus = 0;
};
Result<CpuTimes> ParseProcStat(std::string_view text);

// /proc/meminfo: MemTotal and MemAvailable in bytes.
struct MemInfo {
  uint64_t total_bytes = 0, available_bytes = 0;
};
Result<MemInfo> ParseMeminfo(std::string_view text);

// /proc/vmstat: the cumulative pswpout (pages swapped out).
Result<uint64_t> ParseVmstatSwapOut(std::string_view text);

// /proc/PID/status of one process: VmSwap (its pages swapped out now) in bytes. A process without
// the line (a kernel without swap accounting) reads as 0; kCorrupt only for a malformed VmSwap.
Result<uint64_t> ParseStatusSwapBytes(std::string_view text);
// /proc/PID/status read and parsed; nullopt when the process does not exist.
std::optional<uint64_t> ReadSwapBytes(int pid);

// /proc/PID/stat of one process. The command name (field 2) may hold spaces and parentheses: the
// fields are counted from the last ')'.
struct PidStat {
  char state = '?';            // R, S, D, Z, ...
  uint64_t cpu_ticks = 0;      // utime + stime
  uint64_t start_ticks = 0;    // starttime: ticks after boot; with the pid, identifies the process
  uint64_t rss_pages = 0;
};
Result<PidStat> ParsePidStat(std::string_view text);

// A TAP's counters as the host sees them (rx = frames the guest sent).
struct TapCounters {
  uint64_t rx_bytes = 0, tx_bytes = 0, rx_packets = 0, tx_packets = 0, rx_dropped = 0, tx_dropped = 0;
};
// The line of interface `iface` in /proc/net/dev (the same counters as /sys/class/net/IFACE/
// statistics, but of the reading process's network namespace whatever /sys shows: sysfs shows the
// namespace of whoever mounted it). kNotFound when the interface is not listed.
Result<TapCounters> ParseNetDev(std::string_view text, std::string_view iface);
// /proc/net/dev read and parsed for `tap`.
Result<TapCounters> ReadTapCounters(const std::string& tap);

// The whole of a small file (/proc and /sys files report size 0: read until EOF), at most max_bytes.
Result<std::string> ReadSmallFile(const std::string& path, size_t max_bytes = 1 << 20);
// /proc/PID/stat parsed; nullopt when the process does not exist.
std::optional<PidStat> ReadPidStat(int pid);

// (now - before) / seconds, 0 when a counter went backwards (reset) or no time passed.
double RateOf(uint64_t before, uint64_t now, double seconds);

}  // namespace ferry::agent
