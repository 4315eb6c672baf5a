// Convergence policy of a pre-copy migration: pure functions from measurements (and the
// policy's small state carried between calls) to a decision. No I/O, no clocks, no threads:
// unit-tested without sockets (policy_test.cc).
//
// Prediction: the pause of a stop-and-copy now would last
//     (remaining pages x measured wire bytes per page + state bytes) / measured bandwidth
//   + round trips of the stop-and-copy (END..READY, GO..RESUMED) x measured RTT
//   + fixed costs (pausing the VM and saving its state, the destination's restore and start:
//     four commands to a VM, each as long as the source VM's measured command latency)
// where the bytes per page are what the codecs actually produced for re-sent pages (during the
// watch: the bytes per page and the rate of its own small sends, which are what a pause sends).
//
// Stop condition (seed 001: from the service's activity and the dirty rate). A prediction within
// the target is never a reason to stop by itself:
//   1. Rounds (Decide, at the end of every round): keep iterating while a round still shrinks
//      the remaining set by >= 10%, takes more than two activity windows and leaves more than
//      one window's worth of sending; once the set stops shrinking (or is that small, or rounds
//      are that short) and the prediction is within the target, start watching (kWatch). Not converging (prediction over the target and no shrinking for
//      `stall_rounds`, or `max_iterations`) follows `on_stall`: force | fail | continue.
//   2. Watch (DecideWatch, every 10 ms window): the engine keeps the remaining set at its floor
//      (harvest + send every window) and reads the VMM's activity series (vm_interface.h):
//      the guest's windows before the migration and those of the watch, not those of the
//      rounds (their sending disturbs the vCPU; dirty-page figures count only in the watch).
//      Each signal (dirty pages, instructions, packets, block requests) has a mean over the
//      history; a window is quiet for a signal at <= quiet_fraction of its busy level (plus a
//      small floor). The busy level is the signal's mean, or one of its upper quantiles if that
//      level has the guest fall quiet more often: the level it keeps falling from is its burst
//      (a phase once much busier - a workload's start - would otherwise raise the mean until
//      the bursts look quiet). Only signals that vary - quiet in some spans of `lull_windows`
//      windows and busy in others (spans, so that work the VMM does in batches is not taken for
//      bursts), and quiet at least once after busy (a step up is no burst) - tell a lull from
//      a burst; steady and absent signals are ignored. A window is quiet when every varying signal is. Then:
//        - the last `lull_windows` windows quiet, both of them the watch's own (a rest before
//          the rounds is no lull now), and this look's harvest no busier than a quiet window
//          (at most 2x their mean dirty pages per window, plus a floor): stop now (a lull:
//          fewest pages dirtied since the last send, least guest work and traffic held up by
//          the pause);
//        - no varying signal (steady or idle activity) in a history of at least
//          min_dirty_windows windows with dirty-page figures: no lull will come, stop (with
//          less history: keep watching);
//        - else wait for a lull, at most 1.5x the longest busy run that ended in the history
//          (bounded by max_watch_ms); past that, stop anyway;
//      but only with the prediction within the target and with the set at its floor: the last
//      look took at most kFloorLookMs from its harvest, or neither of the last two looks got
//      20% shorter than the one before (the first look sends what the rounds held back and may
//      take long; what was dirtied meanwhile goes in the next, shorter ones). Past the budget
//      with a prediction over the target, go back to rounds (kIterate). Dirty-page figures
//      count from the second look's harvest.
//
// Decisions:
//   kIterate   send another round;
//   kWatch     send what is dirtied every activity window and look for a lull (DecideWatch);
//   kStop      stop and copy now (a lull, or forced);
//   kFail      give up, the source keeps running (policy fail, or continue past max rounds);
//   kThrottle  keep iterating with the vCPUs slowed to `cpu_share` (only when allowed);
//   kPostcopy  switch to post-copy (only when allowed: mode auto with a destination that can).
#pragma once

#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

#include "migration/engine/vm_interface.h"

namespace ferry::migration {

// The length of the VMM's activity windows the engine and the policy work with.
inline constexpr double kActivityWindowMs = 10;
// A watch look this short (harvest to sent and applied) leaves the set at its floor.
inline constexpr double kFloorLookMs = 2.5;
// Dirty pages per window that are noise rather than activity (added to every dirty threshold).
inline constexpr double kQuietDirtyFloor = 2;

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
  // The lull watch (see the file comment).
  double quiet_fraction = 0.25;  // quiet: at most this share of the signal's busy level over the history
  uint32_t lull_windows = 2;     // a lull: this many quiet windows in a row, the newest last
  double max_watch_ms = 2000;    // never watch longer than this
  uint32_t min_dirty_windows = 10;  // "steady" needs this much dirty-page history (100 ms of watching)
  double history_ms = 3000;      // activity that makes the baseline (what the VMM keeps, at most)
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
  double round_ms = 0;                // how long the round took (send + drain)
};

enum class DecisionKind { kIterate, kStop, kFail, kThrottle, kPostcopy, kWatch };
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
// The pause of a switch to post-copy with `missing_pages` not yet on the destination: no pages
// move in it, but the state does (and the round trips and fixed costs as above), and the
// destination drops its stale copies of the missing pages before it registers them for faults.
// That costs about kDropUsPerMissingPage per page (measured: ~20 ms for 20k scattered pages of a
// memfd, one madvise(MADV_REMOVE) per run, on the 2-core benchmark machine; an estimate, not a
// measurement of the destination at hand).
inline constexpr double kDropUsPerMissingPage = 1.0;
double PredictPostcopySwitchMs(const RoundMeasurement& m, uint64_t missing_pages);
// At the end of a round: iterate, watch, stop (forced), fail, throttle or post-copy.
Decision Decide(const PolicyConfig& cfg, const RoundMeasurement& m, PolicyState* state);

// One look during the watch, after the engine harvested and sent what was dirtied.
struct WatchMeasurement {
  RoundMeasurement link;        // bytes per page, bandwidth, state, RTT, fixed costs; remaining_pages:
                                //   pages still pending after this window's send (held over)
  double elapsed_ms = 0;        // since the watch began
  double exposure_ms = 0;       // from the last harvest to a pause now (pages dirtied meanwhile join the pause)
  // The exposures of the two looks before, older first (0: no such look).
  double earlier_exposure_ms[2] = {0, 0};
  ActivitySeries activity;      // the VMM's recent windows, newest last (the history)
  // Windows starting before this carry no comparable dirty-page figure (the watch harvests every
  // window; a round harvests once, so its count dies down as marks pile up, and before the
  // migration nobody harvested at all); the other signals count in all windows.
  uint64_t dirty_valid_from_ns = 0;
  // Windows starting in [disturbed_from_ns, disturbed_to_ns) are left out for every signal: the
  // migration's own rounds ran then, and on a host with few cores their sending starves the
  // vCPU in some windows, which would look like lulls (and a varying signal) a steady guest
  // never has. The windows before (the guest on its own) and since (the watch, which sends
  // little) make the history.
  uint64_t disturbed_from_ns = 0, disturbed_to_ns = 0;
  // What this look's harvest found: pages dirtied in the last newest_dirty_span_ms (0: no
  // harvest yet). Fresher than the newest closed window: a burst that began in the window still
  // open shows here first.
  uint64_t newest_dirty_pages = 0;
  double newest_dirty_span_ms = 0;
};

// What the watch saw in the activity (for the decision's reason and the statistics).
struct LullAnalysis {
  uint32_t varying_signals = 0;   // bit 0 dirty pages, 1 instructions, 2 packets, 3 block requests
  size_t windows = 0;             // history windows looked at
  size_t dirty_windows = 0;       // of those, with a dirty-page figure
  size_t quiet_windows = 0;       // of those, quiet
  size_t trailing_quiet = 0;      // quiet windows at the end, newest last
  double longest_busy_ms = 0;     // longest run of non-quiet windows that ended in a quiet one
  double last_dirty_per_window = 0;   // dirty pages in the newest window
  double quiet_dirty_per_window = 0;  // mean dirty pages of the quiet windows
};
// The windows in [disturbed_from_ns, disturbed_to_ns) are left out (see WatchMeasurement).
LullAnalysis AnalyzeActivity(const PolicyConfig& cfg, const ActivitySeries& a, uint64_t dirty_valid_from_ns = 0,
                             uint64_t disturbed_from_ns = 0, uint64_t disturbed_to_ns = 0);

// Every activity window during the watch: kStop, kWatch (keep looking) or kIterate (back to
// rounds). predicted_downtime_ms: a pause now (remaining pages + those dirtied during exposure
// at the newest window's rate).
Decision DecideWatch(const PolicyConfig& cfg, const WatchMeasurement& m, LullAnalysis* analysis = nullptr);

}  // namespace ferry::migration
