// JSON from outside (a migration CONFIG record, a snapshot's CONFIG section, an API request body)
// parsed with bounds: at most `max_depth` levels of nesting, so that copying or printing the value
// later cannot exhaust the stack (nlohmann::json copies and dumps recursively). Pure, any thread.
#pragma once

#include <cstdint>
#include <string>
#include <string_view>

#include <nlohmann/json.hpp>

#include "common/error.h"

namespace ferry {

inline constexpr int kMaxJsonDepth = 64;

// `text` as JSON. Errors (code `code`, message naming `what`): not valid JSON (with the parser's
// byte position), nested deeper than max_depth.
Result<nlohmann::json> ParseJson(std::string_view text, std::string_view what, ErrorCode code = ErrorCode::kInvalidArgument,
                                 int max_depth = kMaxJsonDepth);

// A non-negative integer from JSON that came from outside: kInvalidArgument (naming `what`) unless
// `v` is an integer in [lo, hi]. A float is refused even when whole: nlohmann's get<uint64_t>()
// converts a float such as 1e300 with undefined behaviour (found by fuzz_snapshot).
Result<uint64_t> JsonUint(const nlohmann::json& v, std::string_view what, uint64_t lo = 0, uint64_t hi = UINT64_MAX);

// Lenient readers for JSON that Ferry's own components produced (stats, agent reports): the
// member `key` of `j` when it is a number (a string), else 0 ("").
double JsonNumber(const nlohmann::json& j, const char* key);
std::string JsonString(const nlohmann::json& j, const char* key);

}  // namespace ferry
