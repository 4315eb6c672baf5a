#include <gtest/gtest.h>

#include "common/crc32c.h"
#include "common/error.h"
#include "common/json.h"
#include "common/size.h"
#include "common/state_io.h"
#include "common/text.h"

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

namespace ferry {
namespace {

TEST(PrintableText, KeepsValidUtf8AndReplacesEverythingElse) {
  EXPECT_EQ(PrintableText("plain ascii\tand tab"), "plain ascii\tand tab");
  EXPECT_EQ(PrintableText("gr\xC3\xBC\xC3\x9F \xE2\x82\xAC \xF0\x9F\x98\x80"), "gr\xC3\xBC\xC3\x9F \xE2\x82\xAC \xF0\x9F\x98\x80");
  const std::string r = "\xEF\xBF\xBD";
  EXPECT_EQ(PrintableText("a\xFFz"), "a" + r + "z");                   // not UTF-8 at all
  EXPECT_EQ(PrintableText("\xC0\xAF"), r + r);                        // overlong
  EXPECT_EQ(PrintableText("\xED\xA0\x80"), r + r + r);               // a surrogate
  EXPECT_EQ(PrintableText("\xF4\x90\x80\x80"), r + r + r + r);      // above U+10FFFF
  EXPECT_EQ(PrintableText("\xE2\x82"), r + r);                        // truncated sequence
  EXPECT_EQ(PrintableText("bell\x07 esc\x1B[2J del\x7F nl\n"), "bell" + r + " esc" + r + "[2J del" + r + " nl" + r);
  EXPECT_EQ(PrintableText(std::string("nul\0x", 5)), "nul" + r + "x");
}

TEST(PrintableText, CutsAtACharacterBoundary) {
  EXPECT_EQ(PrintableText("abcdef", 4), "abcd");
  EXPECT_EQ(PrintableText("ab\xE2\x82\xAC", 4), "ab");  // the euro sign would not fit whole
  EXPECT_EQ(PrintableText("", 4), "");
}

}  // namespace
}  // namespace ferry

namespace ferry {
namespace {

std::string Nested(int depth) { return std::string(static_cast<size_t>(depth), '[') + std::string(static_cast<size_t>(depth), ']'); }

TEST(ParseJson, ValidTextAndClearErrors) {
  auto j = ParseJson(R"({"a": [1, {"b": "c"}]})", "body");
  ASSERT_TRUE(j) << j.error().message();
  EXPECT_EQ((*j)["a"][1]["b"], "c");
  auto bad = ParseJson("{not json", "request body");
  ASSERT_FALSE(bad);
  EXPECT_EQ(bad.error().code(), ErrorCode::kInvalidArgument);
  EXPECT_NE(bad.error().message().find("request body: not valid JSON"), std::string::npos) << bad.error().message();
  auto code = ParseJson("", "CONFIG", ErrorCode::kCorrupt);
  ASSERT_FALSE(code);
  EXPECT_EQ(code.error().code(), ErrorCode::kCorrupt);
  // Bytes from the text in the parser's message stay printable.
  auto bin = ParseJson("\xff\x1b", "body");
  ASSERT_FALSE(bin);
  EXPECT_EQ(bin.error().message().find('\x1b'), std::string::npos);
}

TEST(JsonUint, OnlyIntegersInRangeAndNoFloatEvenAHugeOne) {
  EXPECT_EQ(*JsonUint(nlohmann::json(uint64_t{1} << 63), "ram_bytes"), uint64_t{1} << 63);
  EXPECT_EQ(*JsonUint(nlohmann::json(7), "x", 1, 8), 7u);
  // 1.677e219 as a uint64_t is undefined behaviour in nlohmann's conversion (UBSan: fuzz_snapshot).
  for (const char* bad : {"1.677e219", "256.0", "-1", "\"5\"", "null", "true", "[1]"}) {
    auto r = JsonUint(nlohmann::json::parse(bad), "ram_bytes");
    ASSERT_FALSE(r) << bad;
    EXPECT_EQ(r.error().code(), ErrorCode::kInvalidArgument);
    EXPECT_EQ(r.error().message(), "\"ram_bytes\" must be a non-negative integer");
  }
  auto big = JsonUint(nlohmann::json(9), "x", 1, 8);
  ASSERT_FALSE(big);
  EXPECT_EQ(big.error().message(), "\"x\" = 9 is outside 1..8");
}

TEST(ParseJson, NestingIsBounded) {
  EXPECT_TRUE(ParseJson(Nested(kMaxJsonDepth), "body"));
  auto deep = ParseJson(Nested(kMaxJsonDepth + 1), "body");
  ASSERT_FALSE(deep);
  EXPECT_NE(deep.error().message().find("nested deeper than 64"), std::string::npos) << deep.error().message();
  // Deep enough to overflow the stack if it were kept and copied: refused, no crash.
  auto huge = ParseJson(Nested(1 << 20), "body");
  ASSERT_FALSE(huge);
  std::string objs;
  for (int i = 0; i < 100000; ++i) objs += "{\"a\":";
  objs += "1" + std::string(100000, '}');
  EXPECT_FALSE(ParseJson(objs, "body"));
}

}  // namespace
}  // namespace ferry
