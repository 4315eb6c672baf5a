// The controller's picture of a cluster: hosts with declared capacity and measured usage, and the
// VMs on them. Plain values, copied freely; the monitoring loop builds one ClusterView per tick
// from the agents' reports and hands it to the Planner (planner.h), the simulation builds them
// from usage traces (bench/planner_sim). Nothing here talks to a host.
//
// Units are in the names: CPUs as a count of CPUs (1.5 = one and a half CPUs busy), bytes, bytes
// per second, pages per second. A capacity of 0 means "not declared": that resource is not
// planned for (its load reads as 0).
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

namespace ferry::controller {

enum class HostState {
  kActive,    // takes VMs; its VMs move only for a hotspot
  kDraining,  // every VM on it is moved away (maintenance), none is placed there
  kDrained,   // empty after a drain; none is placed there until un-drained
  kDown,      // its agent does not answer: its VMs are reported lost, nothing moves them
};
std::string_view HostStateName(HostState s);
std::optional<HostState> ParseHostState(std::string_view s);

struct Capacity {
  double cpus = 0;
  uint64_t mem_bytes = 0;
  double net_bytes_per_s = 0;
};

// What a host's agent measured over its last sampling period.
struct HostUsage {
  double cpus = 0;                  // busy CPUs, every process on the host (its own load counts)
  double net_bytes_per_s = 0;       // received + sent, every VM's TAP
  double swap_out_pages_per_s = 0;  // the host's pswpout rate (/proc/vmstat)
};

struct HostView {
  std::string name;
  HostState state = HostState::kActive;
  Capacity capacity;
  HostUsage usage;
};

struct VmView {
  std::string name;
  std::string host;              // where it runs (the source while it migrates)
  std::string migrating_to;      // non-empty while a migration of it runs
  uint64_t mem_bytes = 0;        // guest RAM
  double cpus = 0;               // busy CPUs (its VMM process)
  double net_bytes_per_s = 0;    // its TAP, both directions
  double net_drops_per_s = 0;    // frames its TAP dropped (queue full): short of the bandwidth it needs
  double dirty_bytes_per_s = 0;  // the VMM's dirty-page rate x page size
  double swap_out_bytes_per_s = 0;  // the host swapping the VMM's memory out (growth of its VmSwap)
};

struct ClusterView {
  std::vector<HostView> hosts;
  std::vector<VmView> vms;
};

// A host's load of one resource as a fraction of its declared capacity (0 when undeclared).
inline double Fraction(double used, double capacity) { return capacity > 0 ? used / capacity : 0; }

}  // namespace ferry::controller
