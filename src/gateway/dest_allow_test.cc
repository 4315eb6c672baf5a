// The serve gateway's destination allow-list: rule syntax (each malformed form rejected) and
// matching by prefix and port for IPv4, IPv6 and v4-mapped addresses.
#include "gateway/dest_allow.h"

#include <arpa/inet.h>
#include <gtest/gtest.h>

namespace ferry::gateway {
namespace {

sockaddr_storage Addr(const char* ip, uint16_t port) {
  sockaddr_storage ss{};
  if (inet_pton(AF_INET, ip, &reinterpret_cast<sockaddr_in*>(&ss)->sin_addr) == 1) {
    ss.ss_family = AF_INET;
    reinterpret_cast<sockaddr_in*>(&ss)->sin_port = htons(port);
  } else {
    ss.ss_family = AF_INET6;
    inet_pton(AF_INET6, ip, &reinterpret_cast<sockaddr_in6*>(&ss)->sin6_addr);
    reinterpret_cast<sockaddr_in6*>(&ss)->sin6_port = htons(port);
  }
  return ss;
}

std::vector<DestRule> Rules(std::initializer_list<const char*> specs) {
  std::vector<DestRule> out;
  for (const char* s : specs) {
    auto r = ParseDestRule(s);
    EXPECT_TRUE(r) << s << ": " << r.error().message();
    if (r) out.push_back(*r);
  }
  return out;
}

TEST(DestAllow, MatchesByPrefixAndPort) {
  const auto rules = Rules({"10.0.0.0/24:4444", "192.168.1.7", "[fd00::/64]:7000", "127.0.0.1:9000"});
  EXPECT_TRUE(Allowed(rules, Addr("10.0.0.9", 4444)));
  EXPECT_FALSE(Allowed(rules, Addr("10.0.0.9", 4445))) << "port is part of the rule";
  EXPECT_FALSE(Allowed(rules, Addr("10.0.1.9", 4444))) << "outside the /24";
  EXPECT_TRUE(Allowed(rules, Addr("192.168.1.7", 1)));
  EXPECT_TRUE(Allowed(rules, Addr("192.168.1.7", 65535)));
  EXPECT_FALSE(Allowed(rules, Addr("192.168.1.8", 22)));
  EXPECT_TRUE(Allowed(rules, Addr("fd00::5", 7000)));
  EXPECT_FALSE(Allowed(rules, Addr("fd00:0:0:1::5", 7000)));
  EXPECT_TRUE(Allowed(rules, Addr("::ffff:127.0.0.1", 9000))) << "v4-mapped IPv6 is the IPv4 address";
  EXPECT_FALSE(Allowed(rules, Addr("127.0.0.1", 22)));
  EXPECT_FALSE(Allowed({}, Addr("127.0.0.1", 9000))) << "an empty list allows nothing (the caller decides what none means)";
  EXPECT_TRUE(Allowed(Rules({"*"}), Addr("8.8.8.8", 53)));
  EXPECT_TRUE(Allowed(Rules({"0.0.0.0/0"}), Addr("8.8.8.8", 53)));
  EXPECT_FALSE(Allowed(Rules({"0.0.0.0/0"}), Addr("::1", 53))) << "an IPv4 rule does not cover IPv6";
}

TEST(DestAllow, RejectsEveryMalformedRule) {
  for (const char* bad : {"", "host.example", "host.example:22", "10.0.0.1:", "10.0.0.1:0", "10.0.0.1:65536", "10.0.0.1:x",
                          "10.0.0.0/33", "10.0.0.0/", "10.0.0.0/-1", "[fd00::/129]", "[fd00::", "[fd00::]x", "fd00::1:22:x"}) {
    auto r = ParseDestRule(bad);
    EXPECT_FALSE(r) << "accepted '" << bad << "'";
    if (!r) { EXPECT_NE(r.error().message().find("--allow-to"), std::string::npos) << r.error().message(); }
  }
}

}  // namespace
}  // namespace ferry::gateway
