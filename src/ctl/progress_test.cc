#include "ctl/progress.h"

#include <gtest/gtest.h>

namespace ferry::ctl {
namespace {

TEST(Progress, BarFollowsTheRound) {
  nlohmann::json st = {{"status", "active"},        {"iterations", 1},     {"transferred_bytes", 1 << 20},
                       {"remaining_bytes", 2 << 20}, {"dirty_pages_rate", 19800.0}, {"mbps", 940.0},
                       {"round_progress", {{"pages", 50}, {"of", 100}}}};
  std::string line = FormatProgressLine(st, 10);
  EXPECT_NE(line.find("[#####.....]"), std::string::npos) << line;
  EXPECT_NE(line.find(" 50%"), std::string::npos) << line;
  EXPECT_NE(line.find("19.8k pg/s"), std::string::npos) << line;
  EXPECT_NE(line.find("2.0 MiB"), std::string::npos) << line;
  st["status"] = "completed";
  EXPECT_NE(FormatProgressLine(st, 10).find("[##########] 100%"), std::string::npos);
}

TEST(Progress, ToleratesMissingFields) {
  EXPECT_NE(FormatProgressLine(nlohmann::json::object(), 4).find("[....]"), std::string::npos);
  EXPECT_FALSE(FormatSummary(nlohmann::json::object()).empty());
}

TEST(Progress, SummaryShowsDowntimePhases) {
  nlohmann::json st = {{"status", "completed"},
                       {"downtime_ms", 12.5},
                       {"downtime_phases", {{"final_pages_ms", 3.0}, {"state_ms", 1.5}, {"resume_ms", 8.0}}}};
  std::string s = FormatSummary(st);
  EXPECT_NE(s.find("VMM downtime 12.5 ms"), std::string::npos) << s;
  EXPECT_NE(s.find("resume 8.0 ms"), std::string::npos) << s;
}

TEST(Progress, SummaryShowsPagesByEncoding) {
  nlohmann::json st = {{"status", "completed"},
                       {"pages_by_encoding", {{"zero", 10}, {"raw", 2}, {"zstd", 300}, {"delta", 44}, {"free", 7}, {"held_back", 5}}},
                       {"resent_bytes", 2 << 20},
                       {"source_cpu_ms", 123.0}};
  std::string s = FormatSummary(st);
  EXPECT_NE(s.find("zstd 300 delta 44 held_back 5"), std::string::npos) << s;
  EXPECT_NE(s.find("free 7"), std::string::npos) << s;
  EXPECT_NE(s.find("source CPU 123 ms"), std::string::npos) << s;
}

TEST(Progress, IncomingWaitingReceivingPostcopyAndFailed) {
  nlohmann::json st = {{"role", "destination"}, {"phase", "waiting"}, {"listen", "tcp:127.0.0.1:7000"}};
  EXPECT_EQ(FormatIncoming(st), "incoming migration: waiting for a source on tcp:127.0.0.1:7000\n");
  st = {{"role", "destination"},
        {"phase", "receiving"},
        {"listen", "tcp:127.0.0.1:7000"},
        {"uuid", "ab-cd"},
        {"source", "127.0.0.1:5000"},
        {"received_bytes", 3 << 20},
        {"received_records", 12},
        {"received_pages", 900},
        {"pages_by_kind", {{"zero", 500}, {"raw", 390}, {"delta", 7}, {"free", 3}}},
        {"total_ram_bytes", 256 << 20},
        {"total_ms", 812.0},
        {"mode", "precopy"}};
  std::string s = FormatIncoming(st);
  EXPECT_NE(s.find("incoming migration ab-cd from 127.0.0.1:5000: receiving"), std::string::npos) << s;
  EXPECT_NE(s.find("received 3.0 MiB in 12 records: 900 pages (zero 500, raw 390, delta 7, free 3) of 256.0 MiB RAM, 812 ms"),
            std::string::npos)
      << s;
  EXPECT_EQ(s.find("post-copy"), std::string::npos) << s;
  st["phase"] = "running-postcopy";
  st["mode"] = "postcopy";
  st["postcopy_pages"] = 3000;
  st["postcopy_remaining_pages"] = 1200;
  st["demand_faults"] = 42;
  st["fault_latency_ms"] = {{"p50", 0.25}, {"p99", 4.1}};
  st["postcopy_ms"] = 88.0;
  st["restore_ms"] = 1.5;
  s = FormatIncoming(st);
  EXPECT_NE(s.find("post-copy: 1200 of 3000 pages still missing, 42 demand faults (p50 0.25 ms, p99 4.10 ms), 88 ms"),
            std::string::npos)
      << s;
  EXPECT_NE(s.find("restore 1.50 ms"), std::string::npos) << s;
  st["phase"] = "failed";
  st["error"] = "connection closed";
  s = FormatIncoming(st);
  EXPECT_NE(s.find(": failed"), std::string::npos) << s;
  EXPECT_NE(s.find("error: connection closed"), std::string::npos) << s;
  EXPECT_FALSE(FormatIncoming(nlohmann::json::object()).empty());
}

}  // namespace
}  // namespace ferry::ctl
