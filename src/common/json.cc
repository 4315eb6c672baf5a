#include "common/json.h"

#include <algorithm>

#include "common/text.h"

namespace ferry {

Result<nlohmann::json> ParseJson(std::string_view text, std::string_view what, ErrorCode code, int max_depth) {
  int deepest = 0;
  // The callback sees every value with its depth; values past the limit are dropped (the parser
  // itself keeps its state on the heap), and the whole text is refused afterwards.
  const nlohmann::json::parser_callback_t cb = [&](int depth, nlohmann::json::parse_event_t, nlohmann::json&) {
    deepest = std::max(deepest, depth);
    return depth < max_depth;
  };
  nlohmann::json j;
  try {
    j = nlohmann::json::parse(text.begin(), text.end(), cb, /*allow_exceptions=*/true);
  } catch (const nlohmann::json::exception& e) {
    return Errorf(code, "{}: not valid JSON ({})", what, PrintableText(e.what(), 512));
  }
  if (deepest >= max_depth) return Errorf(code, "{}: JSON nested deeper than {} levels", what, max_depth);
  return j;
}

Result<uint64_t> JsonUint(const nlohmann::json& v, std::string_view what, uint64_t lo, uint64_t hi) {
  uint64_t x = 0;
  if (v.is_number_unsigned()) x = v.get<uint64_t>();
  else if (v.is_number_integer() && v.get<int64_t>() >= 0) x = static_cast<uint64_t>(v.get<int64_t>());
  else return Errorf(ErrorCode::kInvalidArgument, "\"{}\" must be a non-negative integer", what);
  if (x < lo || x > hi) return Errorf(ErrorCode::kInvalidArgument, "\"{}\" = {} is outside {}..{}", what, x, lo, hi);
  return x;
}

double JsonNumber(const nlohmann::json& j, const char* key) {
  if (!j.is_object()) return 0.0;
  auto it = j.find(key);
  return it != j.end() && it->is_number() ? it->get<double>() : 0.0;
}

std::string JsonString(const nlohmann::json& j, const char* key) {
  if (!j.is_object()) return {};
  auto it = j.find(key);
  return it != j.end() && it->is_string() ? it->get<std::string>() : std::string();
}

}  // namespace ferry
