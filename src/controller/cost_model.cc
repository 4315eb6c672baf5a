#include "controller/cost_model.h"

#include <algorithm>

namespace ferry::controller {

MigrationEstimate EstimateMigration(uint64_t mem_bytes, double dirty_bytes_per_s, const LinkModel& link) {
  MigrationEstimate e;
  const double bw = std::max(link.bytes_per_s, 1.0);
  const double mem = static_cast<double>(mem_bytes);
  const double dirty = std::max(dirty_bytes_per_s, 0.0);
  const double fits = bw * link.pause_target_s;  // what a pause within the target can copy
  double round_bytes = mem;                      // what the current round sends
  double sent = 0, time = 0;
  for (int round = 0; round < std::max(link.max_rounds, 1); ++round) {
    const double t = round_bytes / bw;
    sent += round_bytes;
    time += t;
    // Dirtied while this round ran: never more than all of RAM.
    const double next = std::min(dirty * t, mem);
    if (next <= fits) {
      round_bytes = next;
      break;
    }
    if (next >= round_bytes) {  // the rounds do not shrink: the policy stops them
      e.converges = false;
      round_bytes = next;
      break;
    }
    round_bytes = next;
  }
  e.pause_s = round_bytes / bw;
  e.total_s = time + e.pause_s;
  e.bytes = static_cast<uint64_t>(sent + round_bytes);
  if (e.pause_s > link.pause_target_s * 1.0001) e.converges = false;
  return e;
}

}  // namespace ferry::controller
