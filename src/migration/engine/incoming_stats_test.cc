// The destination's GET /vm/migration object: every phase has its name, the identity fields stay
// null until a source connected, figures keep their units, post-copy latencies are in ms.
#include "migration/engine/incoming_stats.h"

#include <gtest/gtest.h>

#include <set>

#include "migration/protocol/wire.h"

namespace ferry::migration {
namespace {

TEST(IncomingStats, PhaseNamesAreDistinctAndOnlyTheLastThreeAreFinal) {
  std::set<std::string> names;
  for (auto p : {IncomingPhase::kWaiting, IncomingPhase::kReceiving, IncomingPhase::kRestoring, IncomingPhase::kPostcopy,
                 IncomingPhase::kCompleted, IncomingPhase::kFailed, IncomingPhase::kCancelled})
    names.insert(std::string(IncomingPhaseName(p)));
  EXPECT_EQ(names, (std::set<std::string>{"waiting", "receiving", "restoring", "running-postcopy", "completed", "failed", "cancelled"}));
  EXPECT_FALSE(IsFinal(IncomingPhase::kPostcopy));
  EXPECT_TRUE(IsFinal(IncomingPhase::kCompleted));
  EXPECT_TRUE(IsFinal(IncomingPhase::kFailed));
  EXPECT_TRUE(IsFinal(IncomingPhase::kCancelled));
}

TEST(IncomingStats, WaitingHasNoSourceYet) {
  IncomingProgress p;
  p.listen = "tcp:127.0.0.1:7000";
  auto j = IncomingProgressJson(p);
  EXPECT_EQ(j["role"], "destination");
  EXPECT_EQ(j["phase"], "waiting");
  EXPECT_EQ(j["listen"], "tcp:127.0.0.1:7000");
  EXPECT_TRUE(j["uuid"].is_null());
  EXPECT_TRUE(j["source"].is_null());
  EXPECT_EQ(j["received_pages"], 0);
  EXPECT_EQ(j["mode"], "precopy");
  EXPECT_FALSE(j.contains("error"));
}

TEST(IncomingStats, ReceivingAndPostcopyFigures) {
  IncomingProgress p;
  p.phase = IncomingPhase::kPostcopy;
  p.uuid = "0102";
  p.source = "127.0.0.1:4242";
  p.protocol_version = 2;
  p.capabilities = kCapProgress | kCapZstd | kCapPostcopy;
  p.channels = 4;
  p.ram_bytes = 256ull << 20;
  p.total_ms = 1234.5;
  p.received_bytes = 1000000;
  p.received_records = 17;
  p.received_pages = 900;
  p.zero_pages = 500;
  p.raw_pages = 380;
  p.delta_pages = 15;
  p.free_pages = 5;
  p.postcopy = true;
  p.postcopy_pages = 3000;
  p.postcopy_remaining_pages = 1200;
  p.postcopy_ms = 88;
  p.faults.demand_faults = 42;
  p.faults.local_faults = 7;
  p.faults.duplicate_pages = 3;
  p.faults.p50_us = 250;
  p.faults.p99_us = 4100;
  p.faults.max_us = 9000;
  auto j = IncomingProgressJson(p);
  EXPECT_EQ(j["phase"], "running-postcopy");
  EXPECT_EQ(j["uuid"], "0102");
  EXPECT_EQ(j["source"], "127.0.0.1:4242");
  EXPECT_EQ(j["protocol_version"], 2);
  EXPECT_EQ(j["capabilities"], nlohmann::json({"progress", "zstd", "postcopy"}));
  EXPECT_EQ(j["channels"], 4);
  EXPECT_EQ(j["total_ram_bytes"], 256ull << 20);
  EXPECT_DOUBLE_EQ(j["total_ms"].get<double>(), 1234.5);
  EXPECT_EQ(j["received_bytes"], 1000000);
  EXPECT_EQ(j["received_records"], 17);
  EXPECT_EQ(j["received_pages"], 900);
  EXPECT_EQ(j["pages_by_kind"], nlohmann::json({{"zero", 500}, {"raw", 380}, {"delta", 15}, {"free", 5}}));
  EXPECT_EQ(j["mode"], "postcopy");
  EXPECT_EQ(j["postcopy_pages"], 3000);
  EXPECT_EQ(j["postcopy_remaining_pages"], 1200);
  EXPECT_DOUBLE_EQ(j["postcopy_ms"].get<double>(), 88);
  EXPECT_EQ(j["demand_faults"], 42);
  EXPECT_EQ(j["local_faults"], 7);
  EXPECT_EQ(j["duplicate_pages"], 3);
  EXPECT_DOUBLE_EQ(j["fault_latency_ms"]["p50"].get<double>(), 0.25);
  EXPECT_DOUBLE_EQ(j["fault_latency_ms"]["p99"].get<double>(), 4.1);
  EXPECT_DOUBLE_EQ(j["fault_latency_ms"]["max"].get<double>(), 9.0);
}

TEST(IncomingStats, FailureCarriesItsReason) {
  IncomingProgress p;
  p.phase = IncomingPhase::kFailed;
  p.uuid = "ab";
  p.error = "connection closed";
  auto j = IncomingProgressJson(p);
  EXPECT_EQ(j["phase"], "failed");
  EXPECT_EQ(j["error"], "connection closed");
  EXPECT_EQ(j["uuid"], "ab");
}

TEST(IncomingStats, CapabilityNamesIgnoreUnknownBits) {
  EXPECT_EQ(CapabilityNames(0), nlohmann::json::array());
  EXPECT_EQ(CapabilityNames(kCapsSupported | (1ull << 40)),
            nlohmann::json({"progress", "zero_runs", "lz4", "zstd", "delta", "free_pages", "postcopy"}));
}

}  // namespace
}  // namespace ferry::migration
