// Convergence policy of a pre-copy migration: a pure function from one round's measurements
// (and the policy's small state carried between rounds) to a decision. No I/O, no clocks, no
// threads: unit-tested without sockets (policy_test.cc).
//
// Prediction: the pause of a stop-and-copy now would last
//     (remaining pages x measured wire bytes per page + state bytes) / measured bandwidth
//   + round trips of the stop-and-copy (END..READY, GO..RESUMED) x measured RTT
//   + the destination's measured fixed cost (restore + resume, once known; else an estimate)
// where the bytes per page are what the codecs actually produced for re-sent pages.
//
// Decisions:
//   kIterate   send another round;
//   kStop      stop and copy now (predicted pause within the target, or forced);
//   kFail      give up, the source keeps running (policy fail, or continue past max rounds);
//   kThrottle  keep iterating with the vCPUs slowed to `cpu_share` (only when allowed);
//   kPostcopy  switch to post-copy (only when allowed: mode auto with a destination that can).
#pragma once

#include <cstdint>
#include <string>
#include <string_view>

namespace ferry::migration {

enum class ConvergePolicy { kForce, kFail, kContinue };
std::string_view PolicyName(ConvergePolicy p);

struct PolicyConfig {
  double downtime_target_ms = 300;
  uint32_t max_iterations = 30;
  // Not converging = the remaining dirty set did not shrink by 10% for `stall_rounds` rounds.
  uint32_t stall_rounds = 5;
  ConvergePolicy on_stall = ConvergePolicy::kForce;
  bool allow_throttle = false;
  bool allow_postcopy = false;
  double min_cpu_share = 0.2;  // throttling never goes below this share
};

struct RoundMeasurement {
  uint32_t round = 0;                 // 0-based
  uint64_t remaining_pages = 0;       // pages to send if we stopped now (dirty + held back)
  double wire_bytes_per_page = 4096;  // measured after codecs (re-sent pages when known)
  double bandwidth_bytes_per_s = 0;   // measured end to end
  uint64_t state_bytes = 0;           // measured size of the VM's state records
  double rtt_ms = 0;                  // measured control-connection RTT
  double fixed_ms = 1.0;              // destination restore + resume (estimate or measured)
  double dirty_pages_per_s = 0;       // pages dirtied per second during the round
};

enum class DecisionKind { kIterate, kStop, kFail, kThrottle, kPostcopy };
std::string_view DecisionName(DecisionKind k);

struct Decision {
  DecisionKind kind = DecisionKind::kIterate;
  double predicted_downtime_ms = 0;
  double cpu_share = 1.0;  // for kThrottle
  bool converged = true;   // false when stopping or failing without reaching the target
  std::string reason;
};

// Carried from round to round by the caller (plain data).
struct PolicyState {
  uint64_t best_remaining = UINT64_MAX;
  uint32_t stall = 0;
  double cpu_share = 1.0;
};

double PredictDowntimeMs(const RoundMeasurement& m);
Decision Decide(const PolicyConfig& cfg, const RoundMeasurement& m, PolicyState* state);

}  // namespace ferry::migration
