// Errors as values: every fallible operation returns ferry::Result<T>.
// An Error carries a machine-readable code, a human message, and a context
// chain added as the error travels up ("restore snapshot: decode cpu: bad length").
#pragma once

#include <expected>
#include <string>
#include <string_view>
#include <utility>

#include <fmt/format.h>

namespace ferry {

enum class ErrorCode {
  kInvalidArgument,   // bad CLI/API/config value
  kCorrupt,           // malformed/truncated/bad-CRC input (snapshot, stream)
  kVersionMismatch,   // incompatible version of a format or protocol
  kIo,                // OS-level I/O failure (errno in message)
  kNotFound,
  kBusy,              // operation not allowed in the current state
  kCancelled,
  kTimeout,
  kUnsupported,
  kInternal,
  kPermissionDenied,  // authenticated peer not allowed, or not authenticated (append new codes: they travel in ERROR records)
};

std::string_view ErrorCodeName(ErrorCode code);

class Error {
 public:
  Error(ErrorCode code, std::string message) : code_(code), message_(std::move(message)) {}

  ErrorCode code() const { return code_; }
  const std::string& message() const { return message_; }

  // Returns a copy with "context: " prepended to the message.
  Error WithContext(std::string_view context) const& {
    return Error(code_, fmt::format("{}: {}", context, message_));
  }
  Error WithContext(std::string_view context) && {
    message_ = fmt::format("{}: {}", context, message_);
    return std::move(*this);
  }

  std::string ToString() const { return fmt::format("{} ({})", message_, ErrorCodeName(code_)); }

 private:
  ErrorCode code_;
  std::string message_;
};

template <typename T>
using Result = std::expected<T, Error>;
using Status = std::expected<void, Error>;

inline std::unexpected<Error> MakeError(ErrorCode code, std::string message) {
  return std::unexpected<Error>(Error(code, std::move(message)));
}

template <typename... Args>
std::unexpected<Error> Errorf(ErrorCode code, fmt::format_string<Args...> f, Args&&... args) {
  return std::unexpected<Error>(Error(code, fmt::format(f, std::forward<Args>(args)...)));
}

// errno-based I/O error: "open /x: No such file or directory".
std::unexpected<Error> ErrnoError(std::string_view what);

}  // namespace ferry

// Propagate an error with added context. Usage:
//   FERRY_TRY(s, DoThing(), "load kernel");   // s is Status/Result
#define FERRY_RETURN_IF_ERROR(expr, context)                                  \
  do {                                                                        \
    auto ferry_status_ = (expr);                                              \
    if (!ferry_status_) return std::unexpected(ferry_status_.error().WithContext(context)); \
  } while (0)
