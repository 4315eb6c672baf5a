// What a pre-copy migration of a VM is expected to cost, from its RAM size, its dirty rate and the
// link's bandwidth - the planner's price of a move (planner.h). A closed-form model of the engine's
// rounds (migration/engine/policy.h): round 0 sends all RAM; each later round sends what was
// dirtied during the one before, so round i lasts r^i times round 0 with r = dirty rate /
// bandwidth; the engine stops and copies once what is left fits the pause target. With r >= 1 the
// rounds do not shrink: the engine's convergence policy then throttles or forces a stop, so the
// pause is that of a whole round's dirty set (at most all RAM).
// Pure functions, thread-safe.
#pragma once

#include <cstdint>

namespace ferry::controller {

struct MigrationEstimate {
  double total_s = 0;   // from start to the guest running on the destination
  double pause_s = 0;   // the final stop-and-copy
  uint64_t bytes = 0;   // RAM bytes sent, all rounds
  bool converges = true;
};

struct LinkModel {
  double bytes_per_s = 117e6;  // usable migration bandwidth between two hosts (1 Gbit/s)
  double pause_target_s = 0.3; // the engine's default downtime target
  int max_rounds = 30;         // the engine's bound on pre-copy rounds
};

MigrationEstimate EstimateMigration(uint64_t mem_bytes, double dirty_bytes_per_s, const LinkModel& link);

}  // namespace ferry::controller
