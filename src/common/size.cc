#include "common/size.h"

#include <cctype>
#include <string>

namespace ferry {

Result<uint64_t> ParseSize(std::string_view s) {
  if (s.empty()) return Errorf(ErrorCode::kInvalidArgument, "empty size");
  size_t pos = 0;
  uint64_t n = 0;
  while (pos < s.size() && std::isdigit(static_cast<unsigned char>(s[pos]))) {
    if (n > (UINT64_MAX - 9) / 10) return Errorf(ErrorCode::kInvalidArgument, "size '{}' is too large", s);
    n = n * 10 + static_cast<uint64_t>(s[pos++] - '0');
  }
  if (pos == 0) return Errorf(ErrorCode::kInvalidArgument, "size '{}' does not start with a number (e.g. 4096, 64k, 256M, 1G)", s);
  std::string suffix(s.substr(pos));
  for (auto& c : suffix) c = static_cast<char>(std::toupper(static_cast<unsigned char>(c)));
  uint64_t mul;
  if (suffix.empty() || suffix == "B") mul = 1;
  else if (suffix == "K" || suffix == "KIB" || suffix == "KB") mul = 1ull << 10;
  else if (suffix == "M" || suffix == "MIB" || suffix == "MB") mul = 1ull << 20;
  else if (suffix == "G" || suffix == "GIB" || suffix == "GB") mul = 1ull << 30;
  else return Errorf(ErrorCode::kInvalidArgument, "size '{}' has an unknown suffix '{}' (use K, M or G)", s, s.substr(pos));
  if (n > UINT64_MAX / mul) return Errorf(ErrorCode::kInvalidArgument, "size '{}' is too large", s);
  return n * mul;
}

}  // namespace ferry
