#include "migration/engine/policy.h"

#include <algorithm>
#include <cmath>
#include <cstdint>

#include <fmt/format.h>

namespace ferry::migration {

std::string_view PolicyName(ConvergePolicy p) {
  switch (p) {
    case ConvergePolicy::kForce: return "force";
    case ConvergePolicy::kFail: return "fail";
    case ConvergePolicy::kContinue: return "continue";
  }
  return "?";
}

std::string_view DecisionName(DecisionKind k) {
  switch (k) {
    case DecisionKind::kIterate: return "iterate";
    case DecisionKind::kStop: return "stop";
    case DecisionKind::kFail: return "fail";
    case DecisionKind::kThrottle: return "throttle";
    case DecisionKind::kPostcopy: return "postcopy";
    case DecisionKind::kWatch: return "watch";
  }
  return "?";
}

double PredictDowntimeMs(const RoundMeasurement& m) {
  const double bw = std::max(m.bandwidth_bytes_per_s, 1.0);
  const double bytes = static_cast<double>(m.remaining_pages) * std::max(m.wire_bytes_per_page, 0.0) +
                       static_cast<double>(m.state_bytes);
  // END -> READY and GO -> RESUMED: two round trips on the control connection.
  return bytes * 1000.0 / bw + 2.0 * std::max(m.rtt_ms, 0.0) + std::max(m.fixed_ms, 0.0);
}

double PredictPostcopySwitchMs(const RoundMeasurement& m, uint64_t missing_pages) {
  RoundMeasurement none = m;
  none.remaining_pages = 0;
  return PredictDowntimeMs(none) + static_cast<double>(missing_pages) * kDropUsPerMissingPage / 1000.0;
}

Decision Decide(const PolicyConfig& cfg, const RoundMeasurement& m, PolicyState* st) {
  Decision d;
  d.predicted_downtime_ms = PredictDowntimeMs(m);
  d.cpu_share = st->cpu_share;
  const bool shrunk = st->best_remaining == UINT64_MAX || m.remaining_pages < st->best_remaining / 10 * 9;
  if (shrunk) {
    st->best_remaining = m.remaining_pages;
    st->stall = 0;
  } else {
    ++st->stall;
  }
  const bool at_cap = m.round + 1 >= cfg.max_iterations;
  if (d.predicted_downtime_ms <= cfg.downtime_target_ms) {
    // Within the target is not a reason to stop: the pause shrinks as long as rounds shrink the set.
    const bool short_round = m.round_ms <= 2 * kActivityWindowMs;
    // Small enough for the watch: what remains goes out within one activity window.
    const double pages_ms = static_cast<double>(m.remaining_pages) * std::max(m.wire_bytes_per_page, 0.0) * 1000.0 /
                            std::max(m.bandwidth_bytes_per_s, 1.0);
    const bool small_set = pages_ms <= kActivityWindowMs;
    if (shrunk && !short_round && !small_set && !at_cap) {
      d.kind = DecisionKind::kIterate;
      d.reason = fmt::format("predicted downtime {:.1f} ms is within the {:.0f} ms target, but the round shrank the remaining set to {} pages",
                             d.predicted_downtime_ms, cfg.downtime_target_ms, m.remaining_pages);
      return d;
    }
    d.kind = DecisionKind::kWatch;
    d.reason = fmt::format("predicted downtime {:.1f} ms is within the {:.0f} ms target and {}: watching for a lull",
                           d.predicted_downtime_ms, cfg.downtime_target_ms,
                           at_cap ? fmt::format("{} rounds ran", m.round + 1)
                           : short_round ? fmt::format("the round took only {:.1f} ms", m.round_ms)
                           : small_set   ? fmt::format("the remaining {} pages take {:.1f} ms to send", m.remaining_pages, pages_ms)
                                         : std::string("the remaining set no longer shrinks"));
    return d;
  }
  const bool stalled = st->stall >= cfg.stall_rounds;
  const double send_pages_per_s = std::max(m.bandwidth_bytes_per_s, 1.0) / std::max(m.wire_bytes_per_page, 1.0);

  if (cfg.allow_postcopy && (stalled || m.dirty_pages_per_s >= 0.9 * send_pages_per_s)) {
    d.kind = DecisionKind::kPostcopy;
    d.reason = fmt::format("dirty rate {:.0f} pages/s against {:.0f} pages/s sent; switching to post-copy", m.dirty_pages_per_s,
                           send_pages_per_s);
    return d;
  }
  // The guest dirties about as fast as the link carries (or faster): rounds cannot shrink the set.
  const bool outrun = m.round >= 1 && m.dirty_pages_per_s >= 0.9 * send_pages_per_s;
  if (cfg.allow_throttle && (stalled || outrun) && st->cpu_share > cfg.min_cpu_share && m.dirty_pages_per_s > 0) {
    // Slow the guest only as much as convergence needs: aim at dirtying at most half of what
    // the link carries, from the share it has now (at once when it outruns the link, not only
    // after stall_rounds of no progress); the engine restores full speed at the pause.
    const double needed = st->cpu_share * 0.5 * send_pages_per_s / m.dirty_pages_per_s;
    st->cpu_share = std::clamp(std::min(needed, st->cpu_share * 0.9), cfg.min_cpu_share, 1.0);
    st->stall = 0;
    d.kind = DecisionKind::kThrottle;
    d.cpu_share = st->cpu_share;
    d.reason = fmt::format("not converging: vCPU share {:.0f}%", st->cpu_share * 100);
    return d;
  }
  if (at_cap || (stalled && cfg.on_stall != ConvergePolicy::kContinue)) {
    d.converged = false;
    const std::string why = at_cap ? fmt::format("not converged after {} iterations", m.round + 1)
                                   : fmt::format("not converging (remaining dirty set has not shrunk for {} rounds)", st->stall);
    if (cfg.on_stall == ConvergePolicy::kForce) {
      d.kind = DecisionKind::kStop;
      d.reason = fmt::format("{}; policy force: stopping with a predicted downtime of {:.1f} ms", why, d.predicted_downtime_ms);
    } else {
      d.kind = DecisionKind::kFail;
      d.reason = fmt::format("{} (dirty rate {:.0f} pages/s, bandwidth {:.0f} Mbit/s, predicted downtime {:.1f} ms > {:.0f} ms); policy {}",
                             why, m.dirty_pages_per_s, m.bandwidth_bytes_per_s * 8 / 1e6, d.predicted_downtime_ms,
                             cfg.downtime_target_ms, PolicyName(cfg.on_stall));
    }
    return d;
  }
  d.kind = DecisionKind::kIterate;
  d.reason = fmt::format("predicted downtime {:.1f} ms > {:.0f} ms", d.predicted_downtime_ms, cfg.downtime_target_ms);
  return d;
}

LullAnalysis AnalyzeActivity(const PolicyConfig& cfg, const ActivitySeries& a, uint64_t dirty_valid_from_ns,
                             uint64_t disturbed_from_ns, uint64_t disturbed_to_ns) {
  LullAnalysis r;
  const double window_ms = static_cast<double>(a.window_ns) / 1e6;
  const size_t keep = window_ms > 0 ? static_cast<size_t>(cfg.history_ms / window_ms) : a.windows.size();
  // The history: the newest `keep` windows, less those the rounds disturbed. `gap` is the
  // index of the first window after a left-out span (a busy run does not cross it).
  std::vector<ActivityWindow> kept;
  kept.reserve(std::min(keep, a.windows.size()));
  size_t gap = SIZE_MAX;
  for (size_t i = a.windows.size() - std::min(keep, a.windows.size()); i < a.windows.size(); ++i) {
    const uint64_t t = a.windows[i].start_ns;
    if (t >= disturbed_from_ns && t < disturbed_to_ns) {
      gap = kept.size();
      continue;
    }
    kept.push_back(a.windows[i]);
  }
  const size_t n = kept.size();
  r.windows = n;
  if (n == 0) return r;
  const ActivityWindow* w = kept.data();
  // Windows [first_dirty, n) have dirty-page figures.
  size_t first_dirty = 0;
  while (first_dirty < n && w[first_dirty].start_ns < dirty_valid_from_ns) ++first_dirty;
  r.dirty_windows = n - first_dirty;
  auto value = [&](size_t i, int sig) -> double {
    switch (sig) {
      case 0: return static_cast<double>(w[i].dirty_pages);
      case 1: return static_cast<double>(w[i].instructions);
      case 2: return static_cast<double>(w[i].net_packets);
      default: return static_cast<double>(w[i].blk_requests);
    }
  };
  // Absolute floors: a couple of pages, packets or requests per window are noise, not activity.
  constexpr double kFloor[4] = {kQuietDirtyFloor, 0, 1, 1};
  double threshold[4];
  for (int sig = 0; sig < 4; ++sig) {
    const size_t from = sig == 0 ? first_dirty : 0, m = n - from;
    threshold[sig] = 0;
    if (m == 0) continue;
    std::vector<double> v(m);
    double sum = 0;
    for (size_t i = from; i < n; ++i) sum += v[i - from] = value(i, sig);
    // Varying: over spans as long as a lull (sums of lull_windows windows, so activity the VMM
    // handles in batches - packets between two vCPU slices - is not mistaken for bursts),
    // quiet in at least 5% and busy in at least 5% of the spans, and at least once quiet right
    // after being busy: activity that stopped once may stop again. A step up (a client began
    // sending, a workload started) is not a burst: no lull followed it.
    const size_t span = std::clamp<size_t>(cfg.lull_windows, 1, m);
    struct Level {
      double threshold = 0;
      size_t quiet = 0, spans = 0, falls = 0;
    };
    auto judge = [&](double level) {
      Level l;
      l.threshold = cfg.quiet_fraction * level + kFloor[sig];
      const double span_threshold = cfg.quiet_fraction * level * static_cast<double>(span) + kFloor[sig];
      bool was_busy = false;
      for (size_t i = 0; i + span <= m; ++i, ++l.spans) {
        double sv = 0;
        for (size_t k = 0; k < span; ++k) sv += v[i + k];
        const bool q = sv <= span_threshold;
        l.quiet += q;
        l.falls += q && was_busy;
        was_busy = !q;
      }
      return l;
    };
    // The busy level: the mean, unless an upper quantile has the guest fall quiet more often
    // (a much busier phase once, such as a workload's start, raises the mean above the bursts).
    Level best = judge(sum / static_cast<double>(m));
    std::vector<double> sorted = v;
    std::sort(sorted.begin(), sorted.end());
    for (const double q : {0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 1.0}) {
      const Level l = judge(sorted[std::min(m - 1, static_cast<size_t>(q * static_cast<double>(m)))]);
      if (l.falls > best.falls) best = l;
    }
    threshold[sig] = best.threshold;
    if (best.quiet * 20 >= best.spans && (best.spans - best.quiet) * 20 >= best.spans && best.falls > 0) r.varying_signals |= 1u << sig;
  }
  auto quiet_window = [&](size_t i) {
    for (int sig = 0; sig < 4; ++sig)
      if ((r.varying_signals >> sig & 1) && (sig != 0 || i >= first_dirty) && value(i, sig) > threshold[sig]) return false;
    return true;
  };
  size_t busy_run = 0, longest_busy = 0;
  double quiet_dirty = 0;
  size_t quiet_with_dirty = 0;
  for (size_t i = 0; i < n; ++i) {
    if (i == gap) busy_run = 0;
    if (quiet_window(i)) {
      ++r.quiet_windows;
      if (i >= first_dirty) quiet_dirty += value(i, 0), ++quiet_with_dirty;
      ++r.trailing_quiet;
      longest_busy = std::max(longest_busy, busy_run);  // a busy run that ended in a lull
      busy_run = 0;
    } else {
      r.trailing_quiet = 0;
      ++busy_run;
    }
  }
  // A lull is now, not before the rounds: quiet windows count only from the left-out span on.
  if (gap != SIZE_MAX) r.trailing_quiet = std::min(r.trailing_quiet, n - gap);
  r.longest_busy_ms = static_cast<double>(longest_busy) * window_ms;
  r.last_dirty_per_window = first_dirty < n ? value(n - 1, 0) : 0;
  r.quiet_dirty_per_window = quiet_with_dirty ? quiet_dirty / static_cast<double>(quiet_with_dirty) : 0;
  return r;
}

Decision DecideWatch(const PolicyConfig& cfg, const WatchMeasurement& m, LullAnalysis* out) {
  const LullAnalysis a = AnalyzeActivity(cfg, m.activity, m.dirty_valid_from_ns, m.disturbed_from_ns, m.disturbed_to_ns);
  if (out) *out = a;
  const double window_ms = std::max(static_cast<double>(m.activity.window_ns) / 1e6, 1e-3);
  RoundMeasurement now = m.link;
  now.remaining_pages += static_cast<uint64_t>(std::llround(a.last_dirty_per_window * std::max(m.exposure_ms, 0.0) / window_ms));
  Decision d;
  d.predicted_downtime_ms = PredictDowntimeMs(now);
  const std::string seen = fmt::format("{}/{} quiet windows ({} with dirty pages), {} trailing, signals {:#x}, {:.0f} ms watched",
                                       a.quiet_windows, a.windows, a.dirty_windows, a.trailing_quiet, a.varying_signals, m.elapsed_ms);
  if (d.predicted_downtime_ms > cfg.downtime_target_ms) {
    if (m.elapsed_ms >= cfg.max_watch_ms) {
      d.kind = DecisionKind::kIterate;
      d.reason = fmt::format("predicted downtime {:.1f} ms > {:.0f} ms after watching {:.0f} ms: back to rounds", d.predicted_downtime_ms,
                             cfg.downtime_target_ms, m.elapsed_ms);
    } else {
      d.kind = DecisionKind::kWatch;
      d.reason = fmt::format("predicted downtime {:.1f} ms > {:.0f} ms", d.predicted_downtime_ms, cfg.downtime_target_ms);
    }
    return d;
  }
  // The newest closed window may miss a burst that began since: this look's harvest must look
  // like a quiet window too.
  const double now_per_window =
      m.newest_dirty_span_ms > 0 ? static_cast<double>(m.newest_dirty_pages) * window_ms / m.newest_dirty_span_ms : 0;
  const bool busy_now = m.newest_dirty_span_ms > 0 && now_per_window > 2 * a.quiet_dirty_per_window + kQuietDirtyFloor;
  d.kind = DecisionKind::kStop;
  // A long look (the first sends what the rounds held back, the next ones what was dirtied
  // meanwhile, at most at max_bandwidth once its burst credit is spent): the set is not at its
  // floor while looks still get shorter. Below kFloorLookMs it is (noise, not progress).
  const double e0 = m.earlier_exposure_ms[0], e1 = m.earlier_exposure_ms[1];
  const bool shrinking = e1 <= 0 || m.exposure_ms < 0.8 * e1 || (e0 > 0 && e1 < 0.8 * e0);
  if (m.exposure_ms > kFloorLookMs && shrinking && m.elapsed_ms < cfg.max_watch_ms) {
    d.kind = DecisionKind::kWatch;
    d.reason = fmt::format("the last looks took {:.1f}, {:.1f}, {:.1f} ms: one more look to bring the set to its floor "
                           "(predicted now {:.1f} ms; {})",
                           e0, e1, m.exposure_ms, d.predicted_downtime_ms, seen);
  } else if (a.windows == 0) {
    d.reason = fmt::format("no activity series from the VMM: stopping at the floor (predicted {:.1f} ms)", d.predicted_downtime_ms);
  } else if (a.varying_signals == 0 && a.dirty_windows < cfg.min_dirty_windows && m.elapsed_ms < cfg.max_watch_ms) {
    d.kind = DecisionKind::kWatch;
    d.reason = fmt::format("no varying activity yet in {} windows of dirty-page history: watching ({})", a.dirty_windows, seen);
  } else if (a.varying_signals == 0) {
    d.reason = fmt::format("steady activity, no lull to wait for: predicted downtime {:.1f} ms ({})", d.predicted_downtime_ms, seen);
  } else if (a.trailing_quiet >= cfg.lull_windows && !busy_now) {
    d.reason = fmt::format("lull: predicted downtime {:.1f} ms ({})", d.predicted_downtime_ms, seen);
  } else {
    const double budget = std::min(cfg.max_watch_ms, 1.5 * a.longest_busy_ms + cfg.lull_windows * window_ms);
    const std::string what = busy_now ? fmt::format("busy now ({:.0f} pages dirtied per window since the last look, "
                                                    "{:.1f} in quiet windows)",
                                                    now_per_window, a.quiet_dirty_per_window)
                                      : std::string("busy");
    if (m.elapsed_ms >= budget) {
      d.reason = fmt::format("no lull within {:.0f} ms: predicted downtime {:.1f} ms ({})", budget, d.predicted_downtime_ms, seen);
    } else {
      d.kind = DecisionKind::kWatch;
      d.reason = fmt::format("{}: waiting up to {:.0f} ms for a lull ({})", what, budget, seen);
    }
  }
  return d;
}

}  // namespace ferry::migration
