#include "ctl/progress.h"

#include <algorithm>
#include <cmath>
#include <charconv>

#include <fmt/format.h>

#include "common/json.h"

namespace ferry::ctl {
namespace {
double Num(const nlohmann::json& j, const char* key) { return JsonNumber(j, key); }
std::string Str(const nlohmann::json& j, const char* key) { return JsonString(j, key); }
}  // namespace

std::string FormatBytes(double b) {
  static constexpr const char* kUnits[] = {"B", "KiB", "MiB", "GiB", "TiB"};
  int u = 0;
  while (b >= 1024 && u < 4) {
    b /= 1024;
    ++u;
  }
  return u == 0 ? fmt::format("{:.0f} B", b) : fmt::format("{:.1f} {}", b, kUnits[u]);
}

std::string FormatProgressLine(const nlohmann::json& st, int bar_width) {
  double done = 0, of = 0;
  if (auto rp = st.find("round_progress"); rp != st.end() && rp->is_object()) {
    done = Num(*rp, "pages");
    of = Num(*rp, "of");
  }
  const std::string status = Str(st, "status");
  double frac = of > 0 ? std::clamp(done / of, 0.0, 1.0) : 0.0;
  if (status == "completed") frac = 1.0;
  const int filled = static_cast<int>(std::lround(frac * bar_width));
  std::string bar(static_cast<size_t>(filled), '#');
  bar.append(static_cast<size_t>(bar_width - filled), '.');
  const double rate = Num(st, "dirty_pages_rate");
  std::string line = fmt::format("[{}] {:3.0f}% {:<9} iter {:<3} sent {:>10}  remaining {:>10}  dirty {:>7} pg/s  {:6.0f} Mbit/s",
                                 bar, frac * 100, status, static_cast<int64_t>(Num(st, "iterations")),
                                 FormatBytes(Num(st, "transferred_bytes")), FormatBytes(Num(st, "remaining_bytes")),
                                 rate >= 1000 ? fmt::format("{:.1f}k", rate / 1000) : fmt::format("{:.0f}", rate),
                                 Num(st, "mbps"));
  if (double exp = Num(st, "expected_downtime_ms"); exp > 0 && status != "completed")
    line += fmt::format("  expected downtime {:.0f} ms", exp);
  return line;
}

std::string FormatSummary(const nlohmann::json& st) {
  std::string s = fmt::format("migration {} to {}: {}\n", Str(st, "uuid"), Str(st, "to"), Str(st, "status"));
  s += fmt::format("  total {:.0f} ms (setup {:.1f} ms), {} iterations, {}\n", Num(st, "total_ms"), Num(st, "setup_ms"),
                   static_cast<int64_t>(Num(st, "iterations")),
                   st.value("converged", false) ? "converged" : "did not converge");
  if (st.contains("downtime_ms")) {
    s += fmt::format("  VMM downtime {:.1f} ms", Num(st, "downtime_ms"));
    if (auto ph = st.find("downtime_phases"); ph != st.end() && ph->is_object())
      s += fmt::format(" (final pages {:.1f} ms, state {:.1f} ms, resume {:.1f} ms)", Num(*ph, "final_pages_ms"),
                       Num(*ph, "state_ms"), Num(*ph, "resume_ms"));
    s += "\n";
  }
  s += fmt::format("  sent {} for {} of RAM ({} zero pages, {} normal pages), {:.0f} Mbit/s\n",
                   FormatBytes(Num(st, "transferred_bytes")), FormatBytes(Num(st, "total_ram_bytes")),
                   static_cast<uint64_t>(Num(st, "zero_pages")), static_cast<uint64_t>(Num(st, "normal_pages")),
                   Num(st, "mbps"));
  if (auto pe = st.find("pages_by_encoding"); pe != st.end() && pe->is_object()) {
    s += "  pages by encoding:";
    for (const char* k : {"zero", "free", "raw", "lz4", "zstd", "delta", "held_back"})
      s += fmt::format(" {} {}", k, static_cast<uint64_t>(Num(*pe, k)));
    s += fmt::format("; re-sent {}, source CPU {:.0f} ms\n", FormatBytes(Num(st, "resent_bytes")), Num(st, "source_cpu_ms"));
  }
  if (auto e = Str(st, "error"); !e.empty()) s += fmt::format("  error: {}\n", e);
  return s;
}

std::string FormatIncoming(const nlohmann::json& st) {
  const std::string phase = Str(st, "phase");
  if (phase == "waiting") return fmt::format("incoming migration: waiting for a source on {}\n", Str(st, "listen"));
  std::string s = fmt::format("incoming migration {} from {}: {} (listening on {})\n", Str(st, "uuid"), Str(st, "source"), phase,
                              Str(st, "listen"));
  s += fmt::format("  received {} in {} records: {} pages", FormatBytes(Num(st, "received_bytes")),
                   static_cast<uint64_t>(Num(st, "received_records")), static_cast<uint64_t>(Num(st, "received_pages")));
  if (auto k = st.find("pages_by_kind"); k != st.end() && k->is_object())
    s += fmt::format(" (zero {}, raw {}, delta {}, free {})", static_cast<uint64_t>(Num(*k, "zero")),
                     static_cast<uint64_t>(Num(*k, "raw")), static_cast<uint64_t>(Num(*k, "delta")),
                     static_cast<uint64_t>(Num(*k, "free")));
  s += fmt::format(" of {} RAM, {:.0f} ms\n", FormatBytes(Num(st, "total_ram_bytes")), Num(st, "total_ms"));
  if (Str(st, "mode") == "postcopy") {
    double p50 = 0, p99 = 0;
    if (auto l = st.find("fault_latency_ms"); l != st.end() && l->is_object()) {
      p50 = Num(*l, "p50");
      p99 = Num(*l, "p99");
    }
    s += fmt::format("  post-copy: {} of {} pages still missing, {} demand faults (p50 {:.2f} ms, p99 {:.2f} ms), {:.0f} ms\n",
                     static_cast<uint64_t>(Num(st, "postcopy_remaining_pages")), static_cast<uint64_t>(Num(st, "postcopy_pages")),
                     static_cast<uint64_t>(Num(st, "demand_faults")), p50, p99, Num(st, "postcopy_ms"));
  }
  if (phase == "running-postcopy" || phase == "completed")
    s += fmt::format("  restore {:.2f} ms, resume {:.2f} ms\n", Num(st, "restore_ms"), Num(st, "resume_ms"));
  if (auto e = Str(st, "error"); !e.empty()) s += fmt::format("  error: {}\n", e);
  return s;
}

}  // namespace ferry::ctl
