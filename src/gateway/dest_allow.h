// The serve gateway's destination allow-list (`ferry-gateway serve --allow-to RULE`): the
// addresses a peer gateway may ask this one to connect onward to. Without it an authenticated
// peer could make the serve side open a TCP connection to any host and port it can reach.
//
// A rule is "*" (anything), "ADDR", "ADDR:PORT", "CIDR" or "CIDR:PORT" (IPv6 in brackets when a
// port follows: "[fd00::/64]:7000"); no port = any port. A destination is allowed when one rule
// matches. Names are resolved by the caller and every address is checked, then connected to by
// number (no second lookup between the check and the connect).
// Threads: immutable after parsing; Allowed() may run on any thread.
#pragma once

#include <netinet/in.h>
#include <sys/socket.h>

#include <cstdint>
#include <string>
#include <vector>

#include "common/error.h"

namespace ferry::gateway {

struct DestRule {
  bool any = false;
  in6_addr addr{};      // IPv4 as v4-mapped IPv6
  unsigned prefix = 128;  // bits of addr that must match (IPv4 /n is stored as 96 + n)
  uint16_t port = 0;      // 0: any
  std::string text;       // as given, for messages
};

Result<DestRule> ParseDestRule(const std::string& s);
// True when a rule allows the address and port of `sa` (AF_INET or AF_INET6).
bool Allowed(const std::vector<DestRule>& rules, const sockaddr_storage& sa);

}  // namespace ferry::gateway
