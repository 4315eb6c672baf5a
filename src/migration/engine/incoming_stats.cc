#include "migration/engine/incoming_stats.h"

#include <utility>

#include "migration/protocol/wire.h"

namespace ferry::migration {

std::string_view IncomingPhaseName(IncomingPhase p) {
  switch (p) {
    case IncomingPhase::kWaiting: return "waiting";
    case IncomingPhase::kReceiving: return "receiving";
    case IncomingPhase::kRestoring: return "restoring";
    case IncomingPhase::kPostcopy: return "running-postcopy";
    case IncomingPhase::kPostcopyPaused: return "postcopy-paused";
    case IncomingPhase::kCompleted: return "completed";
    case IncomingPhase::kFailed: return "failed";
    case IncomingPhase::kCancelled: return "cancelled";
  }
  return "unknown";
}

nlohmann::json CapabilityNames(uint64_t caps) {
  nlohmann::json a = nlohmann::json::array();
  const std::pair<uint64_t, const char*> names[] = {{kCapProgress, "progress"}, {kCapZeroRuns, "zero_runs"}, {kCapLz4, "lz4"},
                                                    {kCapZstd, "zstd"},         {kCapDelta, "delta"},         {kCapFreePages, "free_pages"},
                                                    {kCapPostcopy, "postcopy"}};
  for (auto& [bit, name] : names)
    if (caps & bit) a.push_back(name);
  return a;
}

nlohmann::json IncomingProgressJson(const IncomingProgress& p) {
  const bool connected = p.phase != IncomingPhase::kWaiting && !p.uuid.empty();
  nlohmann::json j = {
      {"role", "destination"},
      {"phase", IncomingPhaseName(p.phase)},
      {"listen", p.listen},
      {"uuid", connected ? nlohmann::json(p.uuid) : nlohmann::json(nullptr)},
      {"source", connected ? nlohmann::json(p.source) : nlohmann::json(nullptr)},
      {"protocol_version", p.protocol_version},
      {"capabilities", CapabilityNames(p.capabilities)},
      {"channels", p.channels},
      {"total_ram_bytes", p.ram_bytes},
      {"total_ms", p.total_ms},
      {"received_bytes", p.received_bytes},
      {"received_records", p.received_records},
      {"received_pages", p.received_pages},
      {"pages_by_kind", {{"zero", p.zero_pages}, {"raw", p.raw_pages}, {"delta", p.delta_pages}, {"free", p.free_pages}}},
      {"restore_ms", p.restore_ms},
      {"resume_ms", p.resume_ms},
      {"mode", p.postcopy ? "postcopy" : "precopy"},
      {"postcopy_pages", p.postcopy_pages},
      {"postcopy_remaining_pages", p.postcopy_remaining_pages},
      {"postcopy_ms", p.postcopy_ms},
      {"demand_faults", p.faults.demand_faults},
      {"local_faults", p.faults.local_faults},
      {"duplicate_pages", p.faults.duplicate_pages},
      {"fault_latency_ms",
       {{"p50", static_cast<double>(p.faults.p50_us) / 1000.0},
        {"p99", static_cast<double>(p.faults.p99_us) / 1000.0},
        {"max", static_cast<double>(p.faults.max_us) / 1000.0}}},
  };
  if (!p.error.empty()) j["error"] = p.error;
  return j;
}

}  // namespace ferry::migration
