// The controller's planner: from a ClusterView (cluster_model.h), which VMs to move where, and why.
//
// Hotspots (the seed's triggers), each only once it has held for PlannerConfig::sustain_ns:
//   cpu       a host's busy CPUs above cpu_threshold of its declared CPUs
//   net       a host's network bytes/s above net_threshold of its declared rate
//   swap      a host swapping out more than swap_out_pages_per_s
//   bandwidth a VM whose TAP drops frames (short of the bandwidth it needs)
// Drain: every VM of a draining host moves, whatever the thresholds and cooldowns.
//
// A move for a hotspot is made only when all of these hold (the rules that keep a cluster from
// storms and ping-pong):
//   - the destination is active, has room for the VM's RAM, and ends at or below every threshold
//     (CPU and network) with the VM's measured usage added;
//   - the hottest host of the pair cools by more than `hysteresis` (a fraction of capacity): the
//     pair's peak load after the move is below the source's load before it by that margin;
//   - the destination also stays at or below the thresholds with the VM's recent peak (its
//     usage decays towards the current value with `demand_half_life_ns`): a bursty VM is placed
//     where its bursts fit, not where its quiet minute fits;
//   - the VM has not moved within its cooldown (`vm_cooldown_ns`, doubled for each further move
//     within `return_ban_ns`, up to 8 times as long: at most 3 moves an hour), does not go back
//     to any host it left within `return_ban_ns` (no ping-pong, not even by a detour), is not
//     migrating, and its migration converges (cost_model.h) - a VM that dirties faster than the
//     link carries is a bad candidate;
//   - at most `max_per_host` migrations touch a host (in or out) and `max_in_cluster` run at once.
// Among the allowed moves of a hotspot the planner takes the one with the best gain per second of
// migration (gain = how much the pair's peak load drops), to the least loaded destination, and
// goes on until the host is below its threshold or no move is allowed. Each VM of a hotspot that
// was not moved gets a reason (why_not). After a migration starts or ends its two hosts' triggers
// start over: a host must show a hotspot for a whole window of fresh measurements again.
//
// Decide() has no side effects (GET /v1/plan is its dry run); Observe() advances the trigger
// timers, Started()/Finished() record what the controller did. The planner is a value owned by
// one thread (the controller's loop or the simulation): not thread-safe. Its decisions depend only
// on its inputs (ties broken by name): the same views give the same plan.
#pragma once

#include <cstdint>
#include <map>
#include <string>
#include <vector>

#include "controller/cluster_model.h"
#include "controller/cost_model.h"

namespace ferry::controller {

struct PlannerConfig {
  double cpu_threshold = 0.75;                // of declared CPUs
  double net_threshold = 0.75;                // of the declared network rate
  double swap_out_pages_per_s = 256;          // host swap-out rate that makes a memory hotspot
  uint64_t sustain_ns = 10'000'000'000;       // how long a trigger must hold
  double hysteresis = 0.05;                   // least drop of the pair's peak load (fraction)
  uint64_t vm_cooldown_ns = 600'000'000'000;  // a moved VM stays put this long (drain excepted),
                                              // doubled per further move within the return ban
  uint64_t return_ban_ns = 3600'000'000'000;  // nor goes back to a host it left within this
  uint64_t demand_half_life_ns = 300'000'000'000;  // how fast a VM's remembered peak fades
  uint64_t retry_backoff_ns = 30'000'000'000;  // after a failed migration of a VM (Finished)
  int max_per_host = 1;                       // migrations in or out of one host at once
  int max_in_cluster = 4;                     // migrations at once in the whole cluster
  LinkModel link;
};

struct Move {
  std::string vm, from, to;
  std::string reason;  // "drain", or the hotspot: "cpu 97% > 75% for 12 s on a"
  double gain = 0;     // drop of the pair's peak load (fraction of capacity); 0 for a drain
  MigrationEstimate estimate;
};

struct Hotspot {
  std::string host;     // the host (for a bandwidth hotspot: the VM's host)
  std::string vm;       // bandwidth hotspots only
  std::string trigger;  // cpu | net | swap | bandwidth | drain
  double value = 0;     // load fraction, pages/s or drops/s
  double threshold = 0;
  double held_s = 0;    // how long it has held
  bool sustained = false;
  std::vector<std::string> why_not;  // per VM left where it is: why
};

struct Plan {
  std::vector<Move> moves;
  std::vector<Hotspot> hotspots;
  // Across active hosts: the standard deviation of the CPU load fraction, and the CPUs above the
  // threshold summed over hosts - before and after the moves of this plan.
  double cpu_stddev_before = 0, cpu_stddev_after = 0;
  double cpu_overload_before = 0, cpu_overload_after = 0;
  int running = 0;  // migrations already running
};

class Planner {
 public:
  explicit Planner(PlannerConfig config = {}) : config_(config) {}
  const PlannerConfig& config() const { return config_; }

  // One monitoring tick: a trigger that holds keeps its start time, one that does not is dropped.
  void Observe(const ClusterView& view, uint64_t now_ns);
  Plan Decide(const ClusterView& view, uint64_t now_ns) const;
  // The controller started / finished `vm`'s migration between these hosts.
  void Started(const std::string& vm, const std::string& from, const std::string& to, uint64_t now_ns);
  // A failed migration (ok false) keeps the VM where it is; the VM is then left alone - even by a
  // drain - for retry_backoff_ns, doubled after each further failure (at most 16 times as long).
  void Finished(const std::string& vm, const std::string& from, const std::string& to, uint64_t now_ns, bool ok = true);
  // After a restart: when the store says `vm` last moved, and from where.
  void RestoreLastMove(const std::string& vm, uint64_t at_ns, const std::string& from = "");

  // What the planner remembers of a VM.
  struct VmMemory {
    uint64_t last_move_ns = 0;
    bool moved = false;
    std::vector<std::pair<std::string, uint64_t>> left;  // hosts it left within the return ban, and when
    double cpus_peak = 0;     // decaying peaks (Observe)
    double net_peak = 0;
    uint64_t seen_ns = 0;     // when the peaks were last updated
    int failures = 0;         // failed migrations in a row
    uint64_t failed_ns = 0;   // the last one
  };

 private:
  void ResetHost(const std::string& host);
  PlannerConfig config_;
  // trigger key ("cpu/HOST", "net/HOST", "swap/HOST", "bandwidth/VM") -> since when it holds
  std::map<std::string, uint64_t> since_ns_;
  std::map<std::string, VmMemory> vms_;
};

}  // namespace ferry::controller
