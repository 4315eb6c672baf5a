// Human-readable rendering of migration stats (GET /vm/migration) for the `ferry` CLI.
#pragma once

#include <cstdint>
#include <string>
#include <string_view>

#include <nlohmann/json.hpp>

#include "common/error.h"

namespace ferry::ctl {

std::string FormatBytes(double bytes);  // "12.3 MiB"

// One status line with a bar of `bar_width` cells, e.g.
// "[#######.....]  58% active  iter 2  312.0 MiB sent  remaining 4.2 MiB  dirty 19.8k pg/s  940 Mbit/s"
// The bar shows the current round (the first round is the whole RAM).
std::string FormatProgressLine(const nlohmann::json& stats, int bar_width = 24);

// Multi-line summary of a finished migration (times, downtime phases, bytes).
std::string FormatSummary(const nlohmann::json& stats);

// A destination's GET /vm/migration ("role": "destination"), in progress or final, e.g.
// "incoming migration 5e2f... from 127.0.0.1:40312: receiving (listening on tcp:0.0.0.0:7000)
//    received 12.3 MiB in 340 records: 3100 pages (zero 2000, raw 1100, delta 0, free 0) of 256.0 MiB RAM, 812 ms"
// plus post-copy (missing pages, demand faults, latency), restore/resume times and the error.
std::string FormatIncoming(const nlohmann::json& stats);

}  // namespace ferry::ctl
