#include "common/error.h"

#include <cerrno>
#include <cstring>

namespace ferry {

std::string_view ErrorCodeName(ErrorCode code) {
  switch (code) {
    case ErrorCode::kInvalidArgument: return "invalid_argument";
    case ErrorCode::kCorrupt: return "corrupt";
    case ErrorCode::kVersionMismatch: return "version_mismatch";
    case ErrorCode::kIo: return "io";
    case ErrorCode::kNotFound: return "not_found";
    case ErrorCode::kBusy: return "busy";
    case ErrorCode::kCancelled: return "cancelled";
    case ErrorCode::kTimeout: return "timeout";
    case ErrorCode::kUnsupported: return "unsupported";
    case ErrorCode::kInternal: return "internal";
    case ErrorCode::kPermissionDenied: return "permission denied";
  }
  return "unknown";
}

std::unexpected<Error> ErrnoError(std::string_view what) {
  int e = errno;
  return std::unexpected<Error>(Error(ErrorCode::kIo, fmt::format("{}: {}", what, std::strerror(e))));
}

}  // namespace ferry
