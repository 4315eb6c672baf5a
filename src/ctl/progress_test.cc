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

}  // namespace
}  // namespace ferry::ctl
