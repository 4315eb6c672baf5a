#include "agent/proc_stats.h"

#include <fcntl.h>
#include <unistd.h>

#include <cerrno>
#include <charconv>
#include <cmath>
#include <vector>

#include "common/size.h"

namespace ferry::agent {
namespace {

std::vector<std::string_view> Split(std::string_view s, char sep) {
  std::vector<std::string_view> out;
  while (true) {
    const size_t at = s.find(sep);
    out.push_back(s.substr(0, at));
    if (at == std::string_view::npos) return out;
    s.remove_prefix(at + 1);
  }
}

std::vector<std::string_view> Words(std::string_view s) {
  std::vector<std::string_view> out;
  size_t i = 0;
  while (i < s.size()) {
    while (i < s.size() && (s[i] == ' ' || s[i] == '\t')) ++i;
    size_t j = i;
    while (j < s.size() && s[j] != ' ' && s[j] != '\t') ++j;
    if (j > i) out.push_back(s.substr(i, j - i));
    i = j;
  }
  return out;
}

std::optional<uint64_t> U64(std::string_view s) {
  uint64_t v = 0;
  auto [p, ec] = std::from_chars(s.data(), s.data() + s.size(), v);
  if (ec != std::errc() || p != s.data() + s.size() || s.empty()) return std::nullopt;
  return v;
}

// Each line of `text` in turn.
template <typename Fn>
void ForEachLine(std::string_view text, Fn&& fn) {
  while (!text.empty()) {
    const size_t nl = text.find('\n');
    fn(text.substr(0, nl));
    if (nl == std::string_view::npos) break;
    text.remove_prefix(nl + 1);
  }
}

}  // namespace

Result<uint64_t> ParseRate(std::string_view s) {
  if (s.ends_with("bit")) {
    std::string_view n = s.substr(0, s.size() - 3);
    uint64_t mult = 1;
    if (!n.empty()) {
      switch (n.back()) {
        case 'k': case 'K': mult = 1000; break;
        case 'M': mult = 1000'000; break;
        case 'G': mult = 1000'000'000; break;
        case 'T': mult = 1000'000'000'000; break;
        default: mult = 0;
      }
      if (mult) n.remove_suffix(1);
      else mult = 1;
    }
    auto v = U64(n);
    if (!v || *v > UINT64_MAX / mult) return Errorf(ErrorCode::kInvalidArgument, "rate '{}': expected e.g. 10Gbit or 125M", s);
    return *v * mult / 8;
  }
  auto v = ParseSize(s);
  if (!v) return std::unexpected(v.error().WithContext(fmt::format("rate '{}' (a size per second, or e.g. 10Gbit)", s)));
  return *v;
}

Result<Capacity> ParseCapacity(std::string_view spec) {
  Capacity c;
  bool have_cpus = false, have_mem = false;
  for (std::string_view item : Split(spec, ',')) {
    const size_t eq = item.find('=');
    if (eq == std::string_view::npos) return Errorf(ErrorCode::kInvalidArgument, "--capacity: '{}' is not key=value", item);
    const std::string_view k = item.substr(0, eq), v = item.substr(eq + 1);
    if (k == "cpus") {
      double d = 0;
      auto [p, ec] = std::from_chars(v.data(), v.data() + v.size(), d);
      if (ec != std::errc() || p != v.data() + v.size() || !std::isfinite(d) || d <= 0 || d > 65536)
        return Errorf(ErrorCode::kInvalidArgument, "--capacity: cpus '{}' is not a number of CPUs (> 0)", v);
      c.cpus = d;
      have_cpus = true;
    } else if (k == "mem") {
      auto m = ParseSize(v);
      if (!m) return std::unexpected(m.error().WithContext("--capacity mem"));
      if (*m == 0) return Errorf(ErrorCode::kInvalidArgument, "--capacity: mem must not be 0");
      c.mem_bytes = *m;
      have_mem = true;
    } else if (k == "net") {
      auto r = ParseRate(v);
      if (!r) return std::unexpected(r.error().WithContext("--capacity net"));
      c.net_bytes_per_s = *r;
    } else {
      return Errorf(ErrorCode::kInvalidArgument, "--capacity: unknown key '{}' (expected cpus=N,mem=SIZE[,net=RATE])", k);
    }
  }
  if (!have_cpus || !have_mem) return Errorf(ErrorCode::kInvalidArgument, "--capacity needs cpus=N and mem=SIZE (got '{}')", spec);
  return c;
}

Result<CpuTimes> ParseProcStat(std::string_view text) {
  CpuTimes t;
  bool have = false;
  Status bad;
  ForEachLine(text, [&](std::string_view line) {
    auto w = Words(line);
    if (w.empty() || !w[0].starts_with("cpu")) return;
    if (w[0] != "cpu") {
      ++t.cpus;
      return;
    }
    // user nice system idle iowait irq softirq steal [guest guest_nice: already in user/nice]
    if (w.size() < 5) {
      bad = Errorf(ErrorCode::kCorrupt, "/proc/stat: short cpu line '{}'", line);
      return;
    }
    uint64_t total = 0, idle = 0;
    for (size_t i = 1; i < w.size() && i <= 8; ++i) {
      auto v = U64(w[i]);
      if (!v) {
        bad = Errorf(ErrorCode::kCorrupt, "/proc/stat: bad number '{}'", w[i]);
        return;
      }
      total += *v;
      if (i == 4 || i == 5) idle += *v;
    }
    t.total = total;
    t.busy = total - idle;
    have = true;
  });
  if (!bad) return std::unexpected(bad.error());
  if (!have) return Errorf(ErrorCode::kCorrupt, "/proc/stat: no aggregate cpu line");
  if (t.cpus == 0) t.cpus = 1;
  return t;
}

Result<MemInfo> ParseMeminfo(std::string_view text) {
  std::optional<uint64_t> total, avail;
  ForEachLine(text, [&](std::string_view line) {
    auto w = Words(line);
    if (w.size() < 2) return;
    auto v = U64(w[1]);
    if (!v) return;
    const uint64_t bytes = w.size() >= 3 && w[2] == "kB" ? *v * 1024 : *v;
    if (w[0] == "MemTotal:") total = bytes;
    else if (w[0] == "MemAvailable:") avail = bytes;
  });
  if (!total || !avail) return Errorf(ErrorCode::kCorrupt, "/proc/meminfo: no MemTotal or MemAvailable");
  return MemInfo{*total, *avail};
}

Result<uint64_t> ParseVmstatSwapOut(std::string_view text) {
  std::optional<uint64_t> out;
  ForEachLine(text, [&](std::string_view line) {
    auto w = Words(line);
    if (w.size() == 2 && w[0] == "pswpout") out = U64(w[1]);
  });
  if (!out) return Errorf(ErrorCode::kCorrupt, "/proc/vmstat: no pswpout");
  return *out;
}

Result<uint64_t> ParseStatusSwapBytes(std::string_view text) {
  uint64_t bytes = 0;
  Status bad;
  ForEachLine(text, [&](std::string_view line) {
    auto w = Words(line);
    if (w.empty() || w[0] != "VmSwap:") return;
    auto v = w.size() == 3 && w[2] == "kB" ? U64(w[1]) : std::nullopt;
    if (!v || *v > UINT64_MAX / 1024) bad = Errorf(ErrorCode::kCorrupt, "/proc/PID/status: bad VmSwap line '{}'", line);
    else bytes = *v * 1024;
  });
  if (!bad) return std::unexpected(bad.error());
  return bytes;
}

std::optional<uint64_t> ReadSwapBytes(int pid) {
  if (pid <= 0) return std::nullopt;
  auto text = ReadSmallFile("/proc/" + std::to_string(pid) + "/status", 16384);
  if (!text) return std::nullopt;
  auto s = ParseStatusSwapBytes(*text);
  if (!s) return std::nullopt;
  return *s;
}

Result<PidStat> ParsePidStat(std::string_view text) {
  const size_t close = text.rfind(')');
  if (close == std::string_view::npos || text.find('(') == std::string_view::npos)
    return Errorf(ErrorCode::kCorrupt, "/proc/PID/stat: no command name");
  // Fields from 3 (state) on.
  auto w = Words(text.substr(close + 1));
  if (!w.empty() && w.back().ends_with('\n')) w.back().remove_suffix(1);
  if (w.size() < 22) return Errorf(ErrorCode::kCorrupt, "/proc/PID/stat: {} fields after the command name, expected at least 22", w.size());
  auto field = [&](int n) { return U64(w[static_cast<size_t>(n - 3)]); };  // n: 1-based field number of proc(5)
  auto utime = field(14), stime = field(15), start = field(22), rss = field(24);
  if (w[0].size() != 1 || !utime || !stime || !start || !rss) return Errorf(ErrorCode::kCorrupt, "/proc/PID/stat: malformed fields");
  return PidStat{w[0][0], *utime + *stime, *start, *rss};
}

Result<std::string> ReadSmallFile(const std::string& path, size_t max_bytes) {
  const int fd = open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) return ErrnoError("open " + path);
  std::string out;
  char buf[4096];
  while (out.size() < max_bytes) {
    const ssize_t n = read(fd, buf, sizeof buf);
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) {
      auto e = ErrnoError("read " + path);
      close(fd);
      return e;
    }
    if (n == 0) break;
    out.append(buf, static_cast<size_t>(n));
  }
  close(fd);
  if (out.size() > max_bytes) out.resize(max_bytes);
  return out;
}

std::optional<PidStat> ReadPidStat(int pid) {
  if (pid <= 0) return std::nullopt;
  auto text = ReadSmallFile("/proc/" + std::to_string(pid) + "/stat", 4096);
  if (!text) return std::nullopt;
  auto s = ParsePidStat(*text);
  if (!s) return std::nullopt;
  return *s;
}

Result<TapCounters> ParseNetDev(std::string_view text, std::string_view iface) {
  std::optional<TapCounters> found;
  Status bad;
  ForEachLine(text, [&](std::string_view line) {
    const size_t colon = line.find(':');
    if (colon == std::string_view::npos || found) return;
    std::string_view name = line.substr(0, colon);
    while (!name.empty() && name.front() == ' ') name.remove_prefix(1);
    if (name != iface) return;
    // rx: bytes packets errs drop fifo frame compressed multicast; tx: bytes packets errs drop ...
    auto w = Words(line.substr(colon + 1));
    if (w.size() < 16) {
      bad = Errorf(ErrorCode::kCorrupt, "/proc/net/dev: {} has {} fields, expected 16", iface, w.size());
      return;
    }
    uint64_t v[16];
    for (size_t i = 0; i < 16; ++i) {
      auto n = U64(w[i]);
      if (!n) {
        bad = Errorf(ErrorCode::kCorrupt, "/proc/net/dev: {}: '{}' is not a counter", iface, w[i]);
        return;
      }
      v[i] = *n;
    }
    found = TapCounters{v[0], v[8], v[1], v[9], v[3], v[11]};
  });
  if (!bad) return std::unexpected(bad.error());
  if (!found) return Errorf(ErrorCode::kNotFound, "interface {} is not in /proc/net/dev", iface);
  return *found;
}

Result<TapCounters> ReadTapCounters(const std::string& tap) {
  auto text = ReadSmallFile("/proc/net/dev");
  if (!text) return std::unexpected(text.error());
  return ParseNetDev(*text, tap);
}

double RateOf(uint64_t before, uint64_t now, double seconds) {
  if (now < before || seconds <= 0) return 0;
  return static_cast<double>(now - before) / seconds;
}

}  // namespace ferry::agent
