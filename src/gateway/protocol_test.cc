#include "gateway/protocol.h"

#include <gtest/gtest.h>

namespace ferry::gateway {
namespace {

std::vector<uint8_t> Encode(FrameType t, std::vector<uint8_t> p, uint16_t flags = 0) {
  std::vector<uint8_t> out;
  EncodeFrame(t, flags, p, &out);
  return out;
}

TEST(GatewayProtocol, RoundTripAndPartial) {
  auto buf = Encode(FrameType::kAck, {1, 2, 3});
  auto more = Encode(FrameType::kPing, {});
  buf.insert(buf.end(), more.begin(), more.end());
  for (size_t n = 0; n < kHeaderSize + 3; n++) {
    size_t used = 0;
    auto f = DecodeFrame(std::span(buf).first(n), &used);
    ASSERT_TRUE(f.has_value()) << n;
    EXPECT_FALSE(f->has_value());
  }
  size_t used = 0;
  auto f = DecodeFrame(buf, &used);
  ASSERT_TRUE(f && f->has_value());
  EXPECT_EQ((*f)->type, FrameType::kAck);
  EXPECT_EQ((*f)->payload, (std::vector<uint8_t>{1, 2, 3}));
  EXPECT_EQ(used, kHeaderSize + 3);
  auto g = DecodeFrame(std::span(buf).subspan(used), &used);
  ASSERT_TRUE(g && g->has_value());
  EXPECT_EQ((*g)->type, FrameType::kPing);
}

TEST(GatewayProtocol, RejectsCorruption) {
  auto good = Encode(FrameType::kData, {9, 9, 9, 9}, kFlagCompressed);
  struct Case {
    size_t off;
    uint8_t val;
  } cases[] = {{0, 0x00}, {1, 0x00}, {2, 2}, {3, 0}, {3, 200}, {4, 0x80}, {6, 1}, {11, 0x7f}, {12, 0}, {16, 0}};
  for (auto c : cases) {
    auto b = good;
    b[c.off] = c.val;
    size_t used = 0;
    auto f = DecodeFrame(b, &used);
    EXPECT_FALSE(f.has_value()) << "offset " << c.off;
  }
  // Flags on a non-data frame.
  auto b = Encode(FrameType::kAck, {}, kFlagCompressed);
  size_t used = 0;
  EXPECT_FALSE(DecodeFrame(b, &used).has_value());
  // Garbage is rejected from its first bytes, without waiting for a full header.
  std::vector<uint8_t> junk = {'G', 'E', 'T'};
  EXPECT_FALSE(DecodeFrame(junk, &used).has_value());
}

TEST(GatewayProtocol, PayloadReaderBounds) {
  PayloadWriter w;
  w.U64(0x1122334455667788ull).U16(7).Str("abc");
  PayloadReader r(w.data());
  EXPECT_EQ(*r.U64(), 0x1122334455667788ull);
  EXPECT_EQ(*r.U16(), 7);
  EXPECT_EQ(*r.Str(), "abc");
  EXPECT_TRUE(r.ExpectEnd().has_value());
  EXPECT_FALSE(r.U32().has_value());
  std::vector<uint8_t> bad = {10, 0, 'x'};  // string claims 10 bytes, has 1
  PayloadReader r2(bad);
  EXPECT_FALSE(r2.Str().has_value());
  std::vector<uint8_t> extra = {1, 2, 3};
  PayloadReader r3(extra);
  (void)r3.U16();
  EXPECT_FALSE(r3.ExpectEnd().has_value());
}

}  // namespace
}  // namespace ferry::gateway
