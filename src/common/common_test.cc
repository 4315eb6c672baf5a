#include <gtest/gtest.h>

#include "common/crc32c.h"
#include "common/error.h"
#include "common/size.h"
#include "common/state_io.h"

namespace ferry {
namespace {

TEST(Size, ParsesSuffixes) {
  EXPECT_EQ(*ParseSize("4096"), 4096u);
  EXPECT_EQ(*ParseSize("64k"), 64u << 10);
  EXPECT_EQ(*ParseSize("100M"), 100ull << 20);
  EXPECT_EQ(*ParseSize("512MiB"), 512ull << 20);
  EXPECT_EQ(*ParseSize("2G"), 2ull << 30);
  EXPECT_EQ(*ParseSize("0"), 0u);
}

TEST(Size, RejectsGarbage) {
  for (const char* bad : {"", "M", "12x", "-5", "1.5G", "99999999999999999999", "17179869184G"})
    EXPECT_FALSE(ParseSize(bad).has_value()) << bad;
}

TEST(Crc32c, KnownVector) {
  // RFC 3720 check value for "123456789".
  EXPECT_EQ(Crc32c("123456789", 9), 0xE3069283u);
  std::vector<uint8_t> zeros(32, 0);
  EXPECT_EQ(Crc32c(zeros), 0x8A9136AAu);  // RFC 3720 B.4: 32 bytes of zeros
}

TEST(Crc32c, Incremental) {
  const char* s = "hello, incremental crc world";
  uint32_t whole = Crc32c(s, 28);
  uint32_t part = Crc32c(s + 10, 18, Crc32c(s, 10));
  EXPECT_EQ(whole, part);
}

TEST(StateIo, RoundTrip) {
  StateWriter w;
  w.PutU32(3);
  w.PutU64(0x1122334455667788ull);
  w.PutBool(true);
  w.PutString("abc");
  std::vector<uint16_t> arr{1, 2, 3};
  w.PutArray(std::span<const uint16_t>(arr));
  StateReader r(w.data());
  ASSERT_TRUE(r.ExpectVersion("t", 3));
  EXPECT_EQ(*r.GetU64(), 0x1122334455667788ull);
  EXPECT_TRUE(*r.GetBool());
  EXPECT_EQ(*r.GetString(), "abc");
  std::vector<uint16_t> back;
  ASSERT_TRUE(r.GetArray(&back, 3));
  EXPECT_EQ(back, arr);
  EXPECT_TRUE(r.ExpectEnd("t"));
}

TEST(StateIo, RejectsTruncatedAndHuge) {
  StateWriter w;
  w.PutU32(0xFFFFFFFF);  // absurd blob length
  StateReader r(w.data());
  auto b = r.GetBytes();
  ASSERT_FALSE(b);
  EXPECT_EQ(b.error().code(), ErrorCode::kCorrupt);
  StateReader r2(std::span<const uint8_t>(w.data().data(), 2));
  EXPECT_FALSE(r2.GetU32());
}

TEST(StateIo, RejectsNewerVersion) {
  StateWriter w;
  w.PutU32(9);
  StateReader r(w.data());
  auto s = r.ExpectVersion("uart", 1);
  ASSERT_FALSE(s);
  EXPECT_EQ(s.error().code(), ErrorCode::kVersionMismatch);
}

TEST(Error, ContextChains) {
  Error e(ErrorCode::kCorrupt, "bad crc");
  EXPECT_EQ(e.WithContext("decode cpu").WithContext("restore").message(), "restore: decode cpu: bad crc");
}

}  // namespace
}  // namespace ferry
