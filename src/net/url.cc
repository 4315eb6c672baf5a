#include "net/url.h"

#include <regex>

namespace ferry::net {

Result<HttpUrl> ParseHttpUrl(const std::string& s) {
  static const std::regex re(R"(^(https?)://(\[[0-9a-fA-F:.]+\]|[A-Za-z0-9.\-]+):([0-9]{1,5})/?$)");
  std::smatch m;
  if (!std::regex_match(s, m, re)) return Errorf(ErrorCode::kInvalidArgument, "'{}': expected http(s)://HOST:PORT", s);
  HttpUrl u{m[1] == "https", m[2], std::stoi(m[3])};
  if (u.host.front() == '[') u.host = u.host.substr(1, u.host.size() - 2);
  if (u.port < 1 || u.port > 65535) return Errorf(ErrorCode::kInvalidArgument, "'{}': port {} out of range", s, u.port);
  return u;
}

}  // namespace ferry::net
