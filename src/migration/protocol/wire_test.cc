// Round trips and rejection of every malformed form listed in docs/protocol.md.
#include "migration/protocol/wire.h"

#include <gtest/gtest.h>

#include <cstring>

#include "common/crc32c.h"

namespace ferry::migration {
namespace {

std::span<const uint8_t> PayloadOf(const std::vector<uint8_t>& rec) {
  return std::span<const uint8_t>(rec).subspan(kRecordHeaderSize);
}

TEST(WirePreamble, RoundTripAndRejects) {
  auto p = EncodePreamble(Role::kData);
  auto r = DecodePreamble(p);
  ASSERT_TRUE(r) << r.error().message();
  EXPECT_EQ(r->role, Role::kData);
  EXPECT_EQ(r->version, kProtocolVersion);
  // Every version this build speaks is accepted; an older peer's limit refuses the newer one.
  auto v1 = DecodePreamble(EncodePreamble(Role::kControl, 1));
  ASSERT_TRUE(v1);
  EXPECT_EQ(v1->version, 1u);
  auto old = DecodePreamble(EncodePreamble(Role::kControl, 2), 1);
  ASSERT_FALSE(old);
  EXPECT_EQ(old.error().code(), ErrorCode::kVersionMismatch);

  auto bad = p;
  bad[0] = 'X';
  EXPECT_EQ(DecodePreamble(bad).error().code(), ErrorCode::kCorrupt);
  for (uint8_t version : {0, 3, 200}) {
    bad = p;
    bad[8] = version;
    auto v = DecodePreamble(bad);
    ASSERT_FALSE(v);
    EXPECT_EQ(v.error().code(), ErrorCode::kVersionMismatch);
    EXPECT_NE(v.error().message().find(fmt::format("version {}", version)), std::string::npos);
  }
  bad = p;
  bad[12] = 7;  // role
  EXPECT_FALSE(DecodePreamble(bad));
  EXPECT_FALSE(DecodePreamble(std::span<const uint8_t>(p).first(10)));
  // An HTTP request is not a migration stream.
  const char* http = "GET / HTTP/1.1\r\n";
  EXPECT_FALSE(DecodePreamble(std::span<const uint8_t>(reinterpret_cast<const uint8_t*>(http), 16)));
}

TEST(WireRecord, HeaderValidation) {
  std::vector<uint8_t> payload = {1, 2, 3};
  auto rec = EncodeRecord(RecordType::kCancel, payload);
  auto h = DecodeRecordHeader(std::span<const uint8_t>(rec).first(kRecordHeaderSize));
  ASSERT_TRUE(h);
  EXPECT_EQ(h->type, static_cast<uint16_t>(RecordType::kCancel));
  EXPECT_TRUE(h->mandatory());
  EXPECT_EQ(h->length, 3u);
  EXPECT_TRUE(VerifyRecord(std::span<const uint8_t>(rec).first(kRecordHeaderSize), PayloadOf(rec)));

  auto mutate = [&](size_t off, uint8_t v) {
    auto c = rec;
    c[off] = v;
    return DecodeRecordHeader(std::span<const uint8_t>(c).first(kRecordHeaderSize));
  };
  {
    auto c = rec;
    c[0] = c[1] = 0;  // type 0
    EXPECT_FALSE(DecodeRecordHeader(std::span<const uint8_t>(c).first(kRecordHeaderSize)));
  }
  EXPECT_FALSE(mutate(2, 0x3));   // reserved flag bit
  EXPECT_FALSE(mutate(12, 1));    // reserved field
  EXPECT_FALSE(mutate(7, 0x01));  // length 16 MiB + 3 > limit
  EXPECT_FALSE(DecodeRecordHeader(std::span<const uint8_t>(rec).first(8)));
}

TEST(WireRecord, CrcCoversHeaderAndPayload) {
  std::vector<uint8_t> payload(100, 0x5a);
  auto rec = EncodeRecord(RecordType::kConfig, payload);
  for (size_t off : {size_t{0}, size_t{2}, size_t{4}, kRecordHeaderSize, kRecordHeaderSize + 99}) {
    auto c = rec;
    c[off] ^= 0x01;
    EXPECT_FALSE(VerifyRecord(std::span<const uint8_t>(c).first(kRecordHeaderSize), PayloadOf(c))) << "offset " << off;
  }
  auto c = rec;
  c[8] ^= 0x80;  // the stored CRC itself
  auto s = VerifyRecord(std::span<const uint8_t>(c).first(kRecordHeaderSize), PayloadOf(c));
  ASSERT_FALSE(s);
  EXPECT_NE(s.error().message().find("CRC mismatch"), std::string::npos);
}

TEST(WireMessages, HelloRoundTripAndLimits) {
  Hello h{NewUuid(), 0x5, 4, kWirePageSize};
  auto d = DecodeHello(Encode(h));
  ASSERT_TRUE(d) << d.error().message();
  EXPECT_EQ(d->uuid, h.uuid);
  EXPECT_EQ(d->capabilities, 5u);
  EXPECT_EQ(d->channels, 4u);
  for (uint32_t ch : {0u, 17u}) {
    Hello b = h;
    b.channels = ch;
    EXPECT_FALSE(DecodeHello(Encode(b))) << ch;
  }
  Hello b = h;
  b.page_size = 8192;
  EXPECT_EQ(DecodeHello(Encode(b)).error().code(), ErrorCode::kUnsupported);
  auto enc = Encode(h);
  EXPECT_FALSE(DecodeHello(std::span<const uint8_t>(enc).first(enc.size() - 1)));  // truncated
  enc.push_back(0);
  EXPECT_FALSE(DecodeHello(enc));  // trailing byte
}

TEST(WireMessages, SmallRecords) {
  auto u = NewUuid();
  EXPECT_EQ(FormatUuid(u).size(), 36u);
  auto ack = DecodeHelloAck(Encode(HelloAck{u, 3}));
  ASSERT_TRUE(ack);
  EXPECT_EQ(ack->uuid, u);
  auto dh = DecodeDataHello(Encode(DataHello{u, 3}));
  ASSERT_TRUE(dh);
  EXPECT_EQ(dh->channel, 3u);
  EXPECT_FALSE(DecodeDataHello(Encode(DataHello{u, 16})));

  auto end = DecodeEnd(Encode(End{7, 300}));
  ASSERT_TRUE(end);
  EXPECT_EQ(end->batches, 7u);
  EXPECT_EQ(end->pages, 300u);
  EXPECT_FALSE(DecodeEnd(std::vector<uint8_t>(15)));

  auto v = DecodeU64(EncodeU64(1234), "READY");
  ASSERT_TRUE(v);
  EXPECT_EQ(*v, 1234u);
  EXPECT_FALSE(DecodeU64(std::vector<uint8_t>(9), "READY"));

  auto e = DecodeError(Encode(ErrorMsg{static_cast<uint32_t>(ErrorCode::kVersionMismatch), "too new"}));
  ASSERT_TRUE(e);
  EXPECT_EQ(ToError(*e).code(), ErrorCode::kVersionMismatch);
  EXPECT_EQ(ToError(ErrorMsg{9999, "x"}).code(), ErrorCode::kInternal);
  std::vector<uint8_t> long_msg = {0, 0, 0, 0, 0xff, 0xff};  // claims a 65535-byte message
  long_msg.resize(6 + 65535, 'a');
  EXPECT_FALSE(DecodeError(long_msg));

  auto c = DecodeCancel(EncodeCancel("operator"));
  ASSERT_TRUE(c);
  EXPECT_EQ(*c, "operator");
  EXPECT_FALSE(DecodeCancel(std::vector<uint8_t>{5, 0, 'a'}));  // truncated string
  // A peer's text that is not printable UTF-8 arrives printable (it goes to logs and JSON; an
  // invalid byte used to make GET /vm/migration answer 500 for good).
  auto bin = DecodeError(Encode(ErrorMsg{1, "bad \xff\xfe byte \x1b[2J"}));
  ASSERT_TRUE(bin);
  EXPECT_EQ(bin->message, "bad \xEF\xBF\xBD\xEF\xBF\xBD byte \xEF\xBF\xBD[2J");
  auto cbin = DecodeCancel(EncodeCancel("op\xc3"));
  ASSERT_TRUE(cbin);
  EXPECT_EQ(*cbin, "op\xEF\xBF\xBD");

  auto pr = DecodeProgress(Encode(Progress{1, 2}));
  ASSERT_TRUE(pr);
  EXPECT_EQ(pr->bytes, 2u);
}

TEST(WireMessages, ConfigAndState) {
  nlohmann::json cfg = {{"board", {{"ram_bytes", 1024}}}};
  auto c = DecodeConfig(EncodeConfig(cfg));
  ASSERT_TRUE(c);
  EXPECT_EQ(*c, cfg);
  std::string junk = "{not json";
  EXPECT_FALSE(DecodeConfig(std::span<const uint8_t>(reinterpret_cast<const uint8_t*>(junk.data()), junk.size())));
  std::string arr = "[1,2]";
  EXPECT_FALSE(DecodeConfig(std::span<const uint8_t>(reinterpret_cast<const uint8_t*>(arr.data()), arr.size())));
  std::vector<uint8_t> huge(kMaxConfigBytes + 1, ' ');
  EXPECT_FALSE(DecodeConfig(huge));
  // Nested deep enough to overflow the stack when copied: refused by name.
  std::string deep = "{\"a\":" + std::string(200000, '[') + std::string(200000, ']') + "}";
  auto d = DecodeConfig(std::span<const uint8_t>(reinterpret_cast<const uint8_t*>(deep.data()), deep.size()));
  ASSERT_FALSE(d);
  EXPECT_EQ(d.error().code(), ErrorCode::kCorrupt);
  EXPECT_NE(d.error().message().find("nested deeper"), std::string::npos) << d.error().message();

  StateRecord st{"dev:uart0", {1, 2, 3, 4}};
  auto s = DecodeState(Encode(st));
  ASSERT_TRUE(s);
  EXPECT_EQ(s->id, "dev:uart0");
  EXPECT_EQ(s->blob, st.blob);
  EXPECT_FALSE(DecodeState(std::vector<uint8_t>{0, 0, 1, 2}));  // empty id
  std::vector<uint8_t> long_id = {0, 1};                        // 256-byte id
  long_id.resize(2 + 256, 'x');
  EXPECT_FALSE(DecodeState(long_id));
  EXPECT_FALSE(DecodeState(std::vector<uint8_t>{9, 0, 'a'}));  // id runs past the end
}

}  // namespace
}  // namespace ferry::migration
