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
  EXPECT_EQ(*r, Role::kData);

  auto bad = p;
  bad[0] = 'X';
  EXPECT_EQ(DecodePreamble(bad).error().code(), ErrorCode::kCorrupt);
  bad = p;
  bad[8] = 2;  // version 2
  auto v = DecodePreamble(bad);
  ASSERT_FALSE(v);
  EXPECT_EQ(v.error().code(), ErrorCode::kVersionMismatch);
  EXPECT_NE(v.error().message().find("version 2"), std::string::npos);
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

class WirePages : public ::testing::Test {
 protected:
  std::vector<uint8_t> Build(uint64_t seq) {
    PagesBuilder b;
    b.Reset(seq);
    b.AddZero(3);
    std::vector<uint8_t> page(kWirePageSize);
    for (size_t i = 0; i < page.size(); ++i) page[i] = static_cast<uint8_t>(i * 7);
    b.AddRaw(9, page.data());
    auto r = b.Finish();
    return {r.begin(), r.end()};
  }
  // Rewrites the payload and re-seals the record so only the payload defect is tested.
  static std::vector<uint8_t> Payload(const std::vector<uint8_t>& rec) { return {rec.begin() + kRecordHeaderSize, rec.end()}; }
  static void PutU64(std::vector<uint8_t>& p, size_t off, uint64_t v) { std::memcpy(p.data() + off, &v, 8); }
  static void PutU32(std::vector<uint8_t>& p, size_t off, uint32_t v) { std::memcpy(p.data() + off, &v, 4); }
};

TEST_F(WirePages, RoundTrip) {
  auto rec = Build(42);
  ASSERT_TRUE(VerifyRecord(std::span<const uint8_t>(rec).first(kRecordHeaderSize), PayloadOf(rec)));
  auto v = DecodePages(PayloadOf(rec), 16);
  ASSERT_TRUE(v) << v.error().message();
  EXPECT_EQ(v->seq, 42u);
  ASSERT_EQ(v->entries.size(), 2u);
  EXPECT_EQ(v->entries[0].gfn, 3u);
  EXPECT_EQ(v->entries[0].kind, PageKind::kZero);
  EXPECT_TRUE(v->entries[0].data.empty());
  EXPECT_EQ(v->entries[1].gfn, 9u);
  EXPECT_EQ(v->entries[1].kind, PageKind::kRaw);
  ASSERT_EQ(v->entries[1].data.size(), kWirePageSize);
  EXPECT_EQ(v->entries[1].data[5], 35);
  // Zero pages cost 8 bytes each, not 4096.
  EXPECT_EQ(rec.size(), kRecordHeaderSize + 16 + 8 + 8 + kWirePageSize);
}

TEST_F(WirePages, RejectsMalformed) {
  auto p = Payload(Build(1));
  EXPECT_FALSE(DecodePages(p, 9)) << "gfn 9 outside a 9-page RAM";
  {
    auto c = p;
    PutU32(c, 8, 0);  // count 0
    EXPECT_FALSE(DecodePages(c, 16));
  }
  {
    auto c = p;
    PutU32(c, 8, kMaxPagesPerRecord + 1);
    EXPECT_FALSE(DecodePages(c, 16));
  }
  {
    auto c = p;
    PutU32(c, 8, 3);  // claims a third entry that is not there
    EXPECT_FALSE(DecodePages(c, 16));
  }
  {
    auto c = p;
    PutU32(c, 12, 1);  // reserved
    EXPECT_FALSE(DecodePages(c, 16));
  }
  {
    auto c = p;
    PutU64(c, 16, 3 | (uint64_t{5} << 60));  // unknown kind
    EXPECT_FALSE(DecodePages(c, 16));
  }
  {
    auto c = p;
    PutU64(c, 16, 3 | (uint64_t{1} << 55));  // reserved bits
    EXPECT_FALSE(DecodePages(c, 16));
  }
  {
    auto c = p;
    c.resize(c.size() - 1);  // raw page truncated
    EXPECT_FALSE(DecodePages(c, 16));
  }
  {
    auto c = p;
    c.push_back(0);  // trailing byte
    EXPECT_FALSE(DecodePages(c, 16));
  }
  EXPECT_FALSE(DecodePages(std::span<const uint8_t>(p).first(10), 16));
}

}  // namespace
}  // namespace ferry::migration
