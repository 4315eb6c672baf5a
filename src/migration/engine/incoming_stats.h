// Progress of an incoming migration as the destination sees it (GET /vm/migration on a
// ferry-vmm started with --incoming): a plain snapshot struct filled by
// IncomingMigration::Stats() and its JSON rendering. Pure code: no I/O, no clocks, no locks;
// unit-tested in incoming_stats_test.cc.
//
// Phases, in order (a migration may end in completed, failed or cancelled from any earlier one):
//   waiting           listening, no source has connected yet;
//   receiving         a source is connected (HELLO accepted): configuration and page records
//                     arrive and are applied;
//   restoring         END arrived and every announced page record is applied: state restore,
//                     READY, waiting for GO (in post-copy the missing pages are dropped and RAM
//                     registered with userfaultfd first);
//   running-postcopy  GO came: the guest runs here while its missing pages arrive;
//   completed         every page is in place, the guest runs here (final);
//   failed            the migration failed (final; `error` says why). After GO this means the
//                     guest is stopped and the process exits (it never runs with pages missing);
//   cancelled         the operator aborted it before GO (final).
//
// Threads: none (values only).
#pragma once

#include <cstdint>
#include <string>
#include <string_view>

#include <nlohmann/json.hpp>

#include "migration/protocol/postcopy.h"

namespace ferry::migration {

enum class IncomingPhase { kWaiting, kReceiving, kRestoring, kPostcopy, kPostcopyPaused, kCompleted, kFailed, kCancelled };
std::string_view IncomingPhaseName(IncomingPhase p);
inline bool IsFinal(IncomingPhase p) { return p >= IncomingPhase::kCompleted; }

// Names of the capability bits in `caps` (protocol/wire.h), in bit order.
nlohmann::json CapabilityNames(uint64_t caps);

struct IncomingProgress {
  IncomingPhase phase = IncomingPhase::kWaiting;
  std::string listen;  // the --incoming endpoint
  // Known once a source connected (phase >= receiving); empty/0 before.
  std::string uuid;
  std::string source;  // the control connection's peer address
  uint32_t protocol_version = 0;
  uint64_t capabilities = 0;
  uint32_t channels = 0;       // data connections the source announced
  uint64_t ram_bytes = 0;      // guest RAM, once the configuration was accepted
  double total_ms = 0;         // control connection accepted -> now (or -> the final phase)
  // Counted as records are applied (not merely read).
  uint64_t received_bytes = 0;    // every byte read from the data connections (record headers included)
  uint64_t received_records = 0;  // page records applied (data connections + requested pages)
  uint64_t received_pages = 0;    // pages those records covered (runs count their pages)
  uint64_t zero_pages = 0, raw_pages = 0, delta_pages = 0, free_pages = 0;
  // After the restore (phase >= running-postcopy, or completed).
  double restore_ms = 0;
  double resume_ms = 0;
  // Post-copy: set once the destination switched to it (RAM registered with userfaultfd).
  bool postcopy = false;
  uint64_t postcopy_pages = 0;            // pages the guest started without
  uint64_t postcopy_remaining_pages = 0;  // of those, not in place yet
  double postcopy_ms = 0;                 // GO -> now (or -> the last page in place)
  PostcopyDone faults;                    // demand/local faults, latency (us), duplicates
  std::string error;                      // phase failed or cancelled
};

// The GET /vm/migration object of a destination: role "destination", phase, and the figures
// above with units in the names (`_ms`, `_bytes`, `_pages`); fault latencies in ms.
nlohmann::json IncomingProgressJson(const IncomingProgress& p);

}  // namespace ferry::migration
