// Page records: round trips and rejection of every malformed form listed in docs/protocol.md
// ("Page records"), for PAGES (v1 layout) and ENCODED_PAGES (v2).
#include "migration/protocol/pages.h"

#include <gtest/gtest.h>

#include <cstring>
#include <random>

#include "migration/codec/xbzrle.h"

namespace ferry::migration {
namespace {

std::span<const uint8_t> PayloadOf(std::span<const uint8_t> rec) { return rec.subspan(kRecordHeaderSize); }


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
    PutU64(c, 16, 3 | (uint64_t{2} << 60));  // a v2-only kind (ZERO_RUN) in PAGES
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


// ---------------------------------------------------------------- ENCODED_PAGES

constexpr uint64_t kAllCaps = kCapsSupported;

std::vector<uint8_t> TextPage(uint64_t seed) {
  static const char* words[] = {"the ", "migration ", "page ", "of ", "guest ", "memory ", "is ", "sent ", "again\n", "1234 "};
  std::mt19937_64 rng(seed);
  std::vector<uint8_t> p;
  while (p.size() < kWirePageSize) {
    const char* w = words[rng() % 10];
    p.insert(p.end(), w, w + std::strlen(w));
  }
  p.resize(kWirePageSize);
  return p;
}

class EncodedPages : public ::testing::Test {
 protected:
  // seq 50: zero page 0, zero run 1..4 (merged from AddZero 1 + run 2..4), raw 10, free run 20..27,
  // delta 30 (against seq 7).
  std::vector<uint8_t> Build(Compression codec = Compression::kNone) {
    b_.Reset(50, true);
    b_.AddZero(0);
    page_ = TextPage(1);
    old_ = page_;
    b_.AddRaw(10, page_.data());
    b_.AddZero(1);
    b_.AddZeroRun(2, 3);
    b_.AddFreeRun(20, 8);
    old_[100] ^= 0xff;
    delta_.resize(64);
    const size_t n = XbzrleEncode(old_.data(), page_.data(), delta_.data(), delta_.size());
    delta_.resize(n);
    b_.AddDelta(30, 7, delta_);
    std::span<const uint8_t> rec;
    if (codec == Compression::kNone) {
      rec = b_.Finish();
    } else {
      std::vector<uint8_t> body(b_.body().begin(), b_.body().end()), out;
      EXPECT_TRUE(comp_.Compress(codec, 1, body, &out));
      rec = b_.Finish(codec, out);
    }
    return {rec.begin(), rec.end()};
  }
  Result<PagesView> Decode(std::span<const uint8_t> payload, uint64_t ram = 64, uint64_t caps = kAllCaps) {
    return DecodeEncodedPages(payload, ram, caps, dec_, &scratch_);
  }
  // A payload with the given prefix fields and body (uncompressed unless codec says otherwise).
  static std::vector<uint8_t> Raw(uint64_t seq, uint32_t entries, uint8_t codec, uint32_t body_len, std::span<const uint8_t> body) {
    std::vector<uint8_t> p(kEncodedPagesPrefix);
    std::memcpy(p.data(), &seq, 8);
    std::memcpy(p.data() + 8, &entries, 4);
    p[12] = codec;
    std::memcpy(p.data() + 16, &body_len, 4);
    p.insert(p.end(), body.begin(), body.end());
    return p;
  }
  static std::vector<uint8_t> Head(uint64_t gfn, PageKind kind) {
    std::vector<uint8_t> e(8);
    const uint64_t w = gfn | (uint64_t{static_cast<uint8_t>(kind)} << 60);
    std::memcpy(e.data(), &w, 8);
    return e;
  }
  static void Append32(std::vector<uint8_t>& v, uint32_t x) {
    const size_t at = v.size();
    v.resize(at + 4);
    std::memcpy(v.data() + at, &x, 4);
  }
  EncodedPagesBuilder b_;
  Compressor comp_;
  Decompressor dec_;
  std::vector<uint8_t> scratch_, page_, old_, delta_;
};

TEST_F(EncodedPages, RoundTripEveryKindAndCodec) {
  for (Compression codec : {Compression::kNone, Compression::kLz4, Compression::kZstd}) {
    auto rec = Build(codec);
    ASSERT_TRUE(VerifyRecord(std::span<const uint8_t>(rec).first(kRecordHeaderSize), PayloadOf(rec)));
    auto v = Decode(PayloadOf(rec));
    ASSERT_TRUE(v) << v.error().message();
    EXPECT_EQ(v->seq, 50u);
    EXPECT_EQ(v->codec, codec);
    ASSERT_EQ(v->entries.size(), 5u) << "zero page 1 merged into the run 1..4";
    EXPECT_EQ(v->entries[0].kind, PageKind::kZero);
    EXPECT_EQ(v->entries[1].kind, PageKind::kRaw);
    EXPECT_EQ(v->entries[1].gfn, 10u);
    EXPECT_TRUE(std::equal(page_.begin(), page_.end(), v->entries[1].data.begin()));
    EXPECT_EQ(v->entries[2].kind, PageKind::kZeroRun);
    EXPECT_EQ(v->entries[2].gfn, 1u);
    EXPECT_EQ(v->entries[2].count, 4u);
    EXPECT_EQ(v->entries[3].kind, PageKind::kFreeRun);
    EXPECT_EQ(v->entries[3].count, 8u);
    EXPECT_EQ(v->entries[4].kind, PageKind::kDelta);
    EXPECT_EQ(v->entries[4].base_seq, 7u);
    auto applied = old_;
    ASSERT_TRUE(XbzrleDecode(v->entries[4].data, applied.data()));
    EXPECT_EQ(applied, page_);
    EXPECT_EQ(v->pages, 1u + 1 + 4 + 8 + 1);
  }
  // Compression pays off on text-like pages.
  EXPECT_LT(Build(Compression::kZstd).size(), Build().size() / 2);
}

TEST_F(EncodedPages, ZeroPagesWithoutRunsStayEightBytesEach) {
  b_.Reset(1, false);
  for (uint64_t g = 0; g < 10; ++g) b_.AddZero(g);
  auto rec = b_.Finish();
  auto v = Decode(PayloadOf(rec), 64, kAllCaps & ~kCapZeroRuns);
  ASSERT_TRUE(v) << v.error().message();
  EXPECT_EQ(v->entries.size(), 10u);
  // With runs the ten pages are one 12-byte entry.
  b_.Reset(1, true);
  for (uint64_t g = 0; g < 10; ++g) b_.AddZero(g);
  EXPECT_EQ(b_.Finish().size(), kRecordHeaderSize + kEncodedPagesPrefix + 12);
}

TEST_F(EncodedPages, RejectsWhatWasNotNegotiated) {
  auto rec = Build();
  auto v = Decode(PayloadOf(rec), 64, kAllCaps & ~kCapZeroRuns);
  ASSERT_FALSE(v);
  EXPECT_NE(v.error().message().find("ZERO_RUN was not negotiated"), std::string::npos) << v.error().message();
  v = Decode(PayloadOf(rec), 64, kAllCaps & ~kCapDelta);
  ASSERT_FALSE(v);
  EXPECT_NE(v.error().message().find("DELTA was not negotiated"), std::string::npos) << v.error().message();
  v = Decode(PayloadOf(rec), 64, kAllCaps & ~kCapFreePages);
  ASSERT_FALSE(v);
  EXPECT_NE(v.error().message().find("FREE_RUN was not negotiated"), std::string::npos) << v.error().message();
  auto z = Build(Compression::kZstd);
  v = Decode(PayloadOf(z), 64, kAllCaps & ~kCapZstd);
  ASSERT_FALSE(v);
  EXPECT_NE(v.error().message().find("codec zstd was not negotiated"), std::string::npos) << v.error().message();
  auto l = Build(Compression::kLz4);
  v = Decode(PayloadOf(l), 64, kAllCaps & ~kCapLz4);
  ASSERT_FALSE(v);
  EXPECT_NE(v.error().message().find("codec lz4 was not negotiated"), std::string::npos) << v.error().message();
}

TEST_F(EncodedPages, RejectsMalformedPrefix) {
  const auto rec = Build();
  const std::vector<uint8_t> p(rec.begin() + kRecordHeaderSize, rec.end());
  auto expect_reject = [&](std::vector<uint8_t> c, const char* what) {
    auto v = Decode(c);
    ASSERT_FALSE(v) << what;
    EXPECT_EQ(v.error().code(), ErrorCode::kCorrupt) << what;
    EXPECT_NE(v.error().message().find(what), std::string::npos) << v.error().message();
  };
  expect_reject(std::vector<uint8_t>(p.begin(), p.begin() + 10), "shorter than its");
  auto c = p;
  c[13] = 1;
  expect_reject(c, "reserved bytes");
  c = p;
  std::memset(c.data() + 8, 0, 4);
  expect_reject(c, "0 entries");
  c = p;
  const uint32_t too_many = kMaxEncodedEntries + 1;
  std::memcpy(c.data() + 8, &too_many, 4);
  expect_reject(c, "entries (allowed");
  c = p;
  c[12] = 3;
  expect_reject(c, "unknown codec 3");
  c = p;
  std::memset(c.data() + 16, 0, 4);
  expect_reject(c, "body of 0 bytes");
  c = p;
  const uint32_t huge = kMaxEncodedBody + 1;
  std::memcpy(c.data() + 16, &huge, 4);
  expect_reject(c, "body of");
  c = p;
  c.push_back(0);
  expect_reject(c, "the prefix says");
}

TEST_F(EncodedPages, RejectsDecompressionBombsAndBadBodies) {
  // A zstd frame of 1 MiB zeros is a few dozen bytes: declared as a 4 KiB body it must not inflate.
  std::vector<uint8_t> zeros(1 << 20, 0), bomb;
  ASSERT_TRUE(comp_.Compress(Compression::kZstd, 1, zeros, &bomb));
  ASSERT_LT(bomb.size(), 200u);
  auto v = Decode(Raw(1, 1, 2, 4096, bomb));
  ASSERT_FALSE(v);
  EXPECT_EQ(v.error().code(), ErrorCode::kCorrupt);
  EXPECT_LE(scratch_.capacity(), 4096u) << "decompressed beyond the declared size";
  // Declared larger than the limit: refused before any decompression.
  v = Decode(Raw(1, 1, 2, kMaxEncodedBody * 4, bomb));
  ASSERT_FALSE(v);
  EXPECT_NE(v.error().message().find("body of"), std::string::npos);
  // lz4 likewise.
  std::vector<uint8_t> lbomb;
  ASSERT_TRUE(comp_.Compress(Compression::kLz4, 1, zeros, &lbomb));
  v = Decode(Raw(1, 1, 1, 4096, lbomb));
  ASSERT_FALSE(v);
  EXPECT_EQ(v.error().code(), ErrorCode::kCorrupt);
  // Garbage as a compressed body.
  std::vector<uint8_t> junk(300, 0xa5);
  EXPECT_FALSE(Decode(Raw(1, 1, 2, 4096, junk)));
  EXPECT_FALSE(Decode(Raw(1, 1, 1, 4096, junk)));
  // A compressed body that inflates to exactly the declared size but whose entries are bad.
  std::vector<uint8_t> body = Head(3, PageKind::kRaw);  // raw page truncated
  body.resize(100, 0);
  std::vector<uint8_t> z;
  ASSERT_TRUE(comp_.Compress(Compression::kZstd, 1, body, &z));
  v = Decode(Raw(1, 1, 2, static_cast<uint32_t>(body.size()), z));
  ASSERT_FALSE(v);
  EXPECT_NE(v.error().message().find("RAW page 3"), std::string::npos) << v.error().message();
}

TEST_F(EncodedPages, RejectsMalformedEntries) {
  auto expect_reject = [&](std::vector<uint8_t> body, uint32_t entries, const char* what, uint64_t seq = 9) {
    auto v = Decode(Raw(seq, entries, 0, static_cast<uint32_t>(body.size()), body));
    ASSERT_FALSE(v) << what;
    EXPECT_EQ(v.error().code(), ErrorCode::kCorrupt) << what;
    EXPECT_NE(v.error().message().find(what), std::string::npos) << v.error().message();
  };
  expect_reject(Head(64, PageKind::kZero), 1, "outside guest RAM");
  {
    auto b = Head(3, PageKind::kZero);
    b[6] = 0x10;  // bit 52: reserved
    expect_reject(b, 1, "reserved bits");
  }
  {
    auto b = Head(3, PageKind::kZero);
    b[7] = 0x50;  // kind 5
    expect_reject(b, 1, "unknown page kind 5");
  }
  expect_reject(Head(3, PageKind::kRaw), 1, "RAW page 3");  // data missing
  {
    auto b = Head(3, PageKind::kZeroRun);
    Append32(b, 0);
    expect_reject(b, 1, "run of 0 pages");
  }
  {
    auto b = Head(60, PageKind::kFreeRun);
    Append32(b, 5);  // 60..64: one past the end of a 64-page RAM
    expect_reject(b, 1, "does not fit in guest RAM");
  }
  {
    // Runs that together cover more than RAM (a CPU bomb for the receiver).
    std::vector<uint8_t> b;
    for (int i = 0; i < 3; ++i) {
      auto e = Head(0, PageKind::kZeroRun);
      Append32(e, 64);
      b.insert(b.end(), e.begin(), e.end());
    }
    expect_reject(b, 3, "cover more than");
  }
  {
    auto b = Head(3, PageKind::kZeroRun);  // count missing
    expect_reject(b, 1, "ZERO_RUN page 3");
  }
  {
    auto b = Head(3, PageKind::kDelta);
    uint64_t base = 4;
    b.resize(b.size() + 8);
    std::memcpy(b.data() + 8, &base, 8);
    b.push_back(0);
    b.push_back(0);  // length 0
    expect_reject(b, 1, "delta of 0 bytes");
  }
  {
    auto b = Head(3, PageKind::kDelta);
    uint64_t base = 4;
    uint16_t len = 4096;
    b.resize(18);
    std::memcpy(b.data() + 8, &base, 8);
    std::memcpy(b.data() + 16, &len, 2);
    b.resize(18 + 4096, 1);
    expect_reject(b, 1, "delta of 4096 bytes");
  }
  {
    auto b = Head(3, PageKind::kDelta);
    uint64_t base = 9;  // not older than the record (seq 9)
    uint16_t len = 3;
    b.resize(18);
    std::memcpy(b.data() + 8, &base, 8);
    std::memcpy(b.data() + 16, &len, 2);
    b.insert(b.end(), {0, 1, 7});
    expect_reject(b, 1, "not older than");
  }
  {
    auto b = Head(3, PageKind::kDelta);
    uint64_t base = 4;
    uint16_t len = 30;  // only 3 bytes follow
    b.resize(18);
    std::memcpy(b.data() + 8, &base, 8);
    std::memcpy(b.data() + 16, &len, 2);
    b.insert(b.end(), {0, 1, 7});
    expect_reject(b, 1, "DELTA page 3");
  }
  {
    auto b = Head(3, PageKind::kZero);
    b.push_back(0);
    expect_reject(b, 1, "trailing bytes");
  }
  expect_reject(Head(3, PageKind::kZero), 2, "entry 1");  // announces two entries, has one
}

}  // namespace
}  // namespace ferry::migration
