#include "gateway/dest_allow.h"

#include <arpa/inet.h>

#include <algorithm>
#include <charconv>
#include <cstring>

namespace ferry::gateway {
namespace {

in6_addr MapV4(const in_addr& a) {
  in6_addr m{};
  m.s6_addr[10] = m.s6_addr[11] = 0xff;
  std::memcpy(&m.s6_addr[12], &a, 4);
  return m;
}

bool PrefixMatch(const in6_addr& a, const in6_addr& b, unsigned bits) {
  for (unsigned i = 0; i < 16 && bits > 0; ++i, bits = bits >= 8 ? bits - 8 : 0) {
    const uint8_t mask = bits >= 8 ? 0xff : static_cast<uint8_t>(0xff << (8 - bits));
    if ((a.s6_addr[i] & mask) != (b.s6_addr[i] & mask)) return false;
  }
  return true;
}

}  // namespace

Result<DestRule> ParseDestRule(const std::string& s) {
  DestRule r;
  r.text = s;
  if (s == "*") {
    r.any = true;
    return r;
  }
  const auto bad = [&](const char* why) { return Errorf(ErrorCode::kInvalidArgument, "--allow-to '{}': {}", s, why); };
  std::string host = s, port;
  if (!s.empty() && s.front() == '[') {
    const size_t close = s.find(']');
    if (close == std::string::npos) return bad("no closing ']'");
    host = s.substr(1, close - 1);
    if (close + 1 < s.size()) {
      if (s[close + 1] != ':') return bad("expected ':PORT' after ']'");
      port = s.substr(close + 2);
    }
  } else if (std::count(s.begin(), s.end(), ':') == 1) {
    host = s.substr(0, s.find(':'));
    port = s.substr(s.find(':') + 1);
  }
  if (!port.empty() || (s.size() && s.back() == ':')) {
    unsigned v = 0;
    auto [p, ec] = std::from_chars(port.data(), port.data() + port.size(), v);
    if (port.empty() || ec != std::errc() || p != port.data() + port.size() || v == 0 || v > 65535) return bad("bad port");
    r.port = static_cast<uint16_t>(v);
  }
  std::string addr = host;
  int bits = -1;
  if (const size_t slash = host.find('/'); slash != std::string::npos) {
    addr = host.substr(0, slash);
    const std::string b = host.substr(slash + 1);
    auto [p, ec] = std::from_chars(b.data(), b.data() + b.size(), bits);
    if (b.empty() || ec != std::errc() || p != b.data() + b.size() || bits < 0) return bad("bad prefix length");
  }
  in_addr v4;
  if (inet_pton(AF_INET, addr.c_str(), &v4) == 1) {
    if (bits > 32) return bad("IPv4 prefix longer than 32");
    r.addr = MapV4(v4);
    r.prefix = 96 + static_cast<unsigned>(bits < 0 ? 32 : bits);
  } else if (inet_pton(AF_INET6, addr.c_str(), &r.addr) == 1) {
    if (bits > 128) return bad("IPv6 prefix longer than 128");
    r.prefix = static_cast<unsigned>(bits < 0 ? 128 : bits);
  } else {
    return bad("not an IP address or CIDR (names are not allowed: they could change under the rule)");
  }
  return r;
}

bool Allowed(const std::vector<DestRule>& rules, const sockaddr_storage& sa) {
  in6_addr a{};
  uint16_t port = 0;
  if (sa.ss_family == AF_INET) {
    const auto* v4 = reinterpret_cast<const sockaddr_in*>(&sa);
    a = MapV4(v4->sin_addr);
    port = ntohs(v4->sin_port);
  } else if (sa.ss_family == AF_INET6) {
    const auto* v6 = reinterpret_cast<const sockaddr_in6*>(&sa);
    a = v6->sin6_addr;
    port = ntohs(v6->sin6_port);
  } else {
    return false;
  }
  for (const DestRule& r : rules)
    if (r.any || ((r.port == 0 || r.port == port) && PrefixMatch(a, r.addr, r.prefix))) return true;
  return false;
}

}  // namespace ferry::gateway
