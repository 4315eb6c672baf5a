#include "net/url.h"

#include <gtest/gtest.h>

namespace ferry::net {
namespace {

TEST(HttpUrl, BaseUrlsOnly) {
  auto a = ParseHttpUrl("https://10.0.0.1:7101");
  ASSERT_TRUE(a);
  EXPECT_TRUE(a->tls);
  EXPECT_EQ(a->host, "10.0.0.1");
  EXPECT_EQ(a->port, 7101);
  auto b = ParseHttpUrl("http://[::1]:80/");
  ASSERT_TRUE(b);
  EXPECT_FALSE(b->tls);
  EXPECT_EQ(b->host, "::1");
  for (const char* bad : {"", "10.0.0.1:7101", "ftp://a:1", "http://a", "http://a:0", "http://a:65536", "http://a:1/x", "http://a b:1"}) {
    auto r = ParseHttpUrl(bad);
    ASSERT_FALSE(r) << bad;
    EXPECT_EQ(r.error().code(), ErrorCode::kInvalidArgument);
  }
}

}  // namespace
}  // namespace ferry::net
