#include "migration/engine/policy.h"

#include <algorithm>

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

Decision Decide(const PolicyConfig& cfg, const RoundMeasurement& m, PolicyState* st) {
  Decision d;
  d.predicted_downtime_ms = PredictDowntimeMs(m);
  d.cpu_share = st->cpu_share;
  if (d.predicted_downtime_ms <= cfg.downtime_target_ms) {
    d.kind = DecisionKind::kStop;
    d.reason = fmt::format("predicted downtime {:.1f} ms is within the {:.0f} ms target", d.predicted_downtime_ms,
                           cfg.downtime_target_ms);
    return d;
  }
  if (st->best_remaining == UINT64_MAX || m.remaining_pages < st->best_remaining / 10 * 9) {
    st->best_remaining = m.remaining_pages;
    st->stall = 0;
  } else {
    ++st->stall;
  }
  const bool at_cap = m.round + 1 >= cfg.max_iterations;
  const bool stalled = st->stall >= cfg.stall_rounds;
  const double send_pages_per_s = std::max(m.bandwidth_bytes_per_s, 1.0) / std::max(m.wire_bytes_per_page, 1.0);

  if (cfg.allow_postcopy && (stalled || m.dirty_pages_per_s >= 0.9 * send_pages_per_s)) {
    d.kind = DecisionKind::kPostcopy;
    d.reason = fmt::format("dirty rate {:.0f} pages/s against {:.0f} pages/s sent; switching to post-copy", m.dirty_pages_per_s,
                           send_pages_per_s);
    return d;
  }
  if (cfg.allow_throttle && stalled && st->cpu_share > cfg.min_cpu_share && m.dirty_pages_per_s > 0) {
    // Slow the guest only as much as convergence needs: aim at dirtying at most half of what
    // the link carries, from the share it has now.
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

}  // namespace ferry::migration
