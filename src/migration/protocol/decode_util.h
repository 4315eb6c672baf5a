// Helpers shared by the protocol's strict decoders (wire.cc, postcopy.cc): a payload must be
// consumed exactly, and a failed read names the record it was reading. Internal to
// src/migration/protocol.
#pragma once

#include <string_view>

#include "common/error.h"
#include "common/state_io.h"

namespace ferry::migration::detail {

inline Status FinishPayload(const StateReader& r, std::string_view what) {
  if (r.remaining() != 0) return Errorf(ErrorCode::kCorrupt, "{}: {} trailing bytes", what, r.remaining());
  return {};
}

}  // namespace ferry::migration::detail

// lhs = *expr, or return expr's error with `what` (the record's name) as context.
#define FERRY_WIRE_GET(lhs, expr, what)                                          \
  do {                                                                           \
    auto ferry_v_ = (expr);                                                      \
    if (!ferry_v_) return std::unexpected(ferry_v_.error().WithContext(what));   \
    lhs = *ferry_v_;                                                             \
  } while (0)
