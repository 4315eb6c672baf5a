// The adaptive codec choice (a pure function plus its bookkeeping) and the codec stage on real
// pages, without sockets.
#include "migration/codec/codec_selector.h"

#include <gtest/gtest.h>

#include <cstring>
#include <random>

#include "migration/codec/page_encoder.h"
#include "migration/codec/xbzrle.h"

namespace ferry::migration {
namespace {

constexpr double MB = 1e6;
using Est = std::array<CodecEstimate, kAutoCandidates.size()>;
const std::array<bool, 3> kAll = {true, true, true};

// lz4: fast, ratio 0.5; zstd-1: 300 MB/s, 0.27; zstd-3: 150 MB/s, 0.25 (text-like pages).
Est Text() { return {CodecEstimate{900 * MB, 0.5, 5}, CodecEstimate{300 * MB, 0.27, 5}, CodecEstimate{150 * MB, 0.25, 5}}; }

TEST(ChooseCodec, RawUntilTheLinkIsMeasured) { EXPECT_EQ(ChooseCodec(Text(), kAll, 0, 4).codec, Compression::kNone); }

TEST(ChooseCodec, ALinkFasterThanTheCodecGetsRaw) {
  // 4 GB/s loopback: no codec keeps up, raw is fastest.
  EXPECT_EQ(ChooseCodec(Text(), kAll, 4000 * MB, 1).codec, Compression::kNone);
}

TEST(ChooseCodec, ASlowLinkGetsTheBestRatioTheCpuSustains) {
  // 1 Gbit/s, one core: zstd-1 (max(1/300, 0.27/125) ns/B) beats raw (1/125) and lz4 (0.5/125).
  CodecChoice c = ChooseCodec(Text(), kAll, 125 * MB, 1);
  EXPECT_EQ(c.codec, Compression::kZstd);
  EXPECT_EQ(c.level, 1);
  // 100 Mbit/s: the link is the limit for every codec, so the best ratio wins (zstd-3).
  c = ChooseCodec(Text(), kAll, 12.5 * MB, 1);
  EXPECT_EQ(c.codec, Compression::kZstd);
  EXPECT_EQ(c.level, 3);
  // 2.5 Gbit/s on one core: zstd cannot keep up, lz4 can and still halves the bytes.
  c = ChooseCodec(Text(), kAll, 312 * MB, 1);
  EXPECT_EQ(c.codec, Compression::kLz4);
  // ... while with four cores zstd-1 does.
  EXPECT_EQ(ChooseCodec(Text(), kAll, 312 * MB, 4).codec, Compression::kZstd);
}

TEST(ChooseCodec, IncompressibleDataGetsRawAndUnknownOrNotNegotiatedCodecsNeverWin) {
  Est random = {CodecEstimate{900 * MB, 1.0, 5}, CodecEstimate{300 * MB, 1.0, 5}, CodecEstimate{150 * MB, 1.0, 5}};
  EXPECT_EQ(ChooseCodec(random, kAll, 12.5 * MB, 4).codec, Compression::kNone);
  // A ratio of 0.97 does not pay for itself (5% hysteresis).
  Est barely = {CodecEstimate{900 * MB, 0.97, 5}, CodecEstimate{300 * MB, 0.97, 5}, CodecEstimate{150 * MB, 0.97, 5}};
  EXPECT_EQ(ChooseCodec(barely, kAll, 12.5 * MB, 4).codec, Compression::kNone);
  Est unknown = Text();
  unknown[1].samples = unknown[2].samples = 0;
  EXPECT_EQ(ChooseCodec(unknown, kAll, 12.5 * MB, 1).codec, Compression::kLz4);
  EXPECT_EQ(ChooseCodec(Text(), {true, false, false}, 12.5 * MB, 1).codec, Compression::kLz4);
  EXPECT_EQ(ChooseCodec(Text(), {false, false, false}, 12.5 * MB, 1).codec, Compression::kNone);
}

TEST(CodecSelector, ParsesModes) {
  EXPECT_TRUE(ParseCompressMode("auto")->automatic);
  EXPECT_EQ(ParseCompressMode("none")->codec, Compression::kNone);
  EXPECT_EQ(ParseCompressMode("lz4")->codec, Compression::kLz4);
  auto z = ParseCompressMode("zstd:7");
  ASSERT_TRUE(z);
  EXPECT_EQ(z->level, 7);
  EXPECT_EQ(z->ToString(), "zstd:7");
  for (const char* bad : {"", "gzip", "zstd:0", "zstd:20", "zstd:", "zstd:3x", "LZ4"}) EXPECT_FALSE(ParseCompressMode(bad)) << bad;
}

TEST(CodecSelector, ForcedModesAndWhatWasNotNegotiated) {
  CodecSelector forced(*ParseCompressMode("zstd:5"), true, true, false, 4);
  EXPECT_EQ(forced.Choose(), (CodecChoice{Compression::kZstd, 5}));
  CodecSelector refused(*ParseCompressMode("zstd:5"), true, false, false, 4);  // zstd not acknowledged
  EXPECT_EQ(refused.Choose().codec, Compression::kNone);
}

TEST(CodecSelector, LearnsFromEncodesAndProbes) {
  CodecSelector s(CompressMode{}, true, true, true, 4);
  EXPECT_EQ(s.Choose().codec, Compression::kNone) << "link not measured yet";
  s.ReportLink(125 * MB);
  // Probes visit every candidate until each has an estimate.
  std::set<std::pair<int, int>> probed;
  for (int i = 0; i < 40; ++i) {
    CodecChoice c = s.Choose();
    if (c.codec != Compression::kNone) {
      probed.insert({static_cast<int>(c.codec), c.level});
      // What text pages do with each codec.
      const uint64_t out = c.codec == Compression::kLz4 ? 260'000 : 140'000;
      s.ReportEncode(c, 524'288, out, c.codec == Compression::kLz4 ? 600'000 : 1'700'000);
    }
  }
  EXPECT_EQ(probed.size(), 3u);
  // Now it settles on zstd for a 1 Gbit/s link.
  int zstd = 0;
  for (int i = 0; i < 100; ++i) zstd += s.Choose().codec == Compression::kZstd;
  EXPECT_GT(zstd, 90);
  EXPECT_NEAR(s.ExpectedRatio(), 140'000.0 / 524'288, 0.01);
}

TEST(CodecSelector, DeltaGovernorSwitchesOffWhenDeltasDoNotPay) {
  CodecSelector s(CompressMode{}, true, true, true, 4);
  EXPECT_TRUE(s.DeltaEnabled());
  s.ReportDelta(300, 3);  // 1% produced a delta
  int off = 0;
  for (int i = 0; i < 16; ++i) off += !s.DeltaEnabled();
  EXPECT_EQ(off, 16) << "off for a while";
  EXPECT_TRUE(s.DeltaEnabled()) << "then tried again";
  s.ReportDelta(300, 200);
  EXPECT_TRUE(s.DeltaEnabled());
  CodecSelector no(CompressMode{}, true, true, false, 4);
  EXPECT_FALSE(no.DeltaEnabled());
}

// ---------------------------------------------------------------- the codec stage

class Encoder : public ::testing::Test {
 protected:
  static constexpr uint64_t kPages = 64;
  Encoder() : ram_(kPages * kWirePageSize, 0) {}
  const uint8_t* View() { return ram_.data(); }
  uint8_t* Page(uint64_t p) { return ram_.data() + p * kWirePageSize; }
  void Random(uint64_t p, uint64_t seed) {
    std::mt19937_64 r(seed);
    for (size_t i = 0; i < kWirePageSize; i += 8) {
      uint64_t v = r();
      std::memcpy(Page(p) + i, &v, 8);
    }
  }
  std::vector<uint8_t> ram_;
  Decompressor dec_;
  std::vector<uint8_t> scratch_;
};

TEST_F(Encoder, IncompressiblePagesNeverCostMoreThanRawPlusTheHeader) {
  for (uint64_t p = 0; p < 32; ++p) Random(p, p);
  CodecSelector sel(*ParseCompressMode("zstd"), true, true, false, 1);
  PageEncoder enc(View(), {kProtocolVersion, kCapsSupported}, nullptr, &sel);
  EncodeTally t;
  std::vector<PageRun> runs = {{0, 32, RunKind::kScan}};
  auto rec = enc.Encode(runs, 1, &t);
  EXPECT_LE(rec.size(), kRecordHeaderSize + kEncodedPagesPrefix + 32 * (8 + kWirePageSize));
  EXPECT_EQ(t.raw, 32u) << "sent raw, not as zstd";
  EXPECT_EQ(t.zstd, 0u);
  auto v = DecodeEncodedPages(std::span<const uint8_t>(rec).subspan(kRecordHeaderSize), kPages, kCapsSupported, dec_, &scratch_);
  ASSERT_TRUE(v) << v.error().message();
  EXPECT_EQ(v->codec, Compression::kNone);
}

TEST_F(Encoder, ZeroAndFreeRunsAndDeltasKeepTheCacheTrue) {
  Random(3, 1);
  Random(4, 2);
  DeltaCache cache(16 * kWirePageSize, kPages);
  CodecSelector sel(*ParseCompressMode("none"), true, true, true, 1);
  PageEncoder enc(View(), {kProtocolVersion, kCapsSupported}, &cache, &sel);
  EncodeTally t;
  // First sends: 0..2 zero (read), 3..4 data, 10..19 known zero, 20..29 free.
  std::vector<PageRun> runs = {{0, 5, RunKind::kScan}, {10, 10, RunKind::kZero}, {20, 10, RunKind::kFree}};
  auto rec = enc.Encode(runs, 1, &t);
  EXPECT_EQ(t.zero, 13u);
  EXPECT_EQ(t.free, 10u);
  EXPECT_EQ(t.raw, 2u);
  auto v = DecodeEncodedPages(std::span<const uint8_t>(rec).subspan(kRecordHeaderSize), kPages, kCapsSupported, dec_, &scratch_);
  ASSERT_TRUE(v);
  EXPECT_EQ(v->entries.size(), 5u) << "zero run 0..2, raw 3, raw 4, zero run 10..19, free run 20..29";
  // Re-send: page 3 changed in one word (a delta against the copy sent at seq 1), page 4 is now
  // zero (the cache must forget it).
  std::memset(Page(3) + 100, 0x77, 8);
  std::memset(Page(4), 0, kWirePageSize);
  EncodeTally t2;
  runs = {{3, 2, RunKind::kScan, true}};
  rec = enc.Encode(runs, 2, &t2);
  EXPECT_EQ(t2.delta, 1u);
  EXPECT_EQ(t2.zero, 1u);
  v = DecodeEncodedPages(std::span<const uint8_t>(rec).subspan(kRecordHeaderSize), kPages, kCapsSupported, dec_, &scratch_);
  ASSERT_TRUE(v);
  ASSERT_EQ(v->entries[0].kind, PageKind::kDelta);
  EXPECT_EQ(v->entries[0].base_seq, 1u);
  EXPECT_LT(v->entries[0].data.size(), 32u);
  // Page 4 written again: no delta against a copy the destination no longer has.
  Random(4, 9);
  EncodeTally t3;
  runs = {{4, 1, RunKind::kScan, true}};
  enc.Encode(runs, 3, &t3);
  EXPECT_EQ(t3.delta, 0u);
  EXPECT_EQ(t3.raw, 1u);
}

TEST_F(Encoder, TheSkipFilterLeavesFullPagesOutAndTheCacheKeepsWhatTheDestinationHas) {
  for (uint64_t p = 3; p < 7; ++p) Random(p, p);
  DeltaCache cache(16 * kWirePageSize, kPages);
  CodecSelector sel(*ParseCompressMode("none"), true, true, true, 1);
  PageEncoder enc(View(), {kProtocolVersion, kCapsSupported}, &cache, &sel);
  EncodeTally t;
  std::vector<PageRun> runs = {{3, 3, RunKind::kScan}};
  enc.Encode(runs, 1, &t);  // the destination holds seq 1 of pages 3..5
  const std::vector<uint8_t> old4(Page(4), Page(4) + kWirePageSize);
  // Written since the harvest, all of them: 3 in one word (a delta: still sent), 4 and 5 rewritten
  // (full pages: left out), 6 never sent and rewritten (a first send left out), 7 now zero (a zero
  // entry: still sent).
  std::memset(Page(3) + 100, 0x11, 8);
  Random(4, 40);
  Random(5, 50);
  Random(6, 60);
  std::vector<std::pair<uint64_t, bool>> asked;
  const PageEncoder::SkipFilter skip = [&](uint64_t gfn, bool resend) {
    asked.emplace_back(gfn, resend);
    return true;
  };
  EncodeTally t2;
  runs = {{3, 3, RunKind::kScan, true}, {6, 2, RunKind::kScan, false}, {10, 2, RunKind::kZero}};
  auto rec = enc.Encode(runs, 2, &t2, {&skip});
  EXPECT_EQ(asked, (std::vector<std::pair<uint64_t, bool>>{{4, true}, {5, true}, {6, false}}))
      << "only full pages are asked about, with their resend flag";
  EXPECT_EQ(t2.debounced, 3u);
  EXPECT_EQ(t2.delta, 1u);
  auto v = DecodeEncodedPages(std::span<const uint8_t>(rec).subspan(kRecordHeaderSize), kPages, kCapsSupported, dec_, &scratch_);
  ASSERT_TRUE(v) << v.error().message();
  ASSERT_EQ(v->entries.size(), 3u) << "delta 3, zero 7, zero run 10..11";
  EXPECT_EQ(v->entries[0].kind, PageKind::kDelta);
  EXPECT_EQ(v->entries[1].gfn, 7u);
  EXPECT_EQ(v->entries[2].kind, PageKind::kZeroRun);
  // Page 4 was left out: the cache still holds seq 1, which the destination has.
  size_t len = 0;
  uint64_t base = 0;
  bool cached = false;
  uint8_t out[kWirePageSize];
  EXPECT_TRUE(cache.EncodeDelta(4, old4.data(), out, kWirePageSize, &len, &base, &cached));
  EXPECT_TRUE(cached);
  EXPECT_EQ(base, 1u);
  // Everything left out: no record at all (a record may not be empty), nothing counted as sent.
  EncodeTally t4;
  runs = {{4, 3, RunKind::kScan, true}};
  EXPECT_TRUE(enc.Encode(runs, 3, &t4, {&skip}).empty());
  EXPECT_EQ(t4.debounced, 3u);
  EXPECT_EQ(t4.records, 0u);
  EXPECT_EQ(t4.wire_bytes, 0u);
}

// Whether gfn is cached, and with which seq (the page's current contents as the probe).
std::pair<bool, uint64_t> CachedSeq(DeltaCache& cache, uint64_t gfn, const uint8_t* page) {
  size_t len = 0;
  uint64_t base = 0;
  bool cached = false;
  std::vector<uint8_t> out(kWirePageSize);
  cache.EncodeDelta(gfn, page, out.data(), kWirePageSize, &len, &base, &cached);
  return {cached, base};
}

TEST_F(Encoder, WarmFirstSendsMayEvictAndTheCacheFollowsWholeSendsWhileDeltasAreOff) {
  for (uint64_t p = 3; p < 6; ++p) Random(p, p);
  DeltaCache cache(kWirePageSize, kPages, 1);  // one slot
  CodecSelector sel(*ParseCompressMode("none"), true, true, true, 1);
  PageEncoder enc(View(), {kProtocolVersion, kCapsSupported}, &cache, &sel);
  EncodeTally t;
  std::vector<PageRun> runs = {{3, 2, RunKind::kScan}};
  enc.Encode(runs, 1, &t);
  EXPECT_TRUE(CachedSeq(cache, 3, Page(3)).first) << "a first send takes a free slot";
  EXPECT_FALSE(CachedSeq(cache, 4, Page(4)).first) << "but evicts nothing";
  runs = {{5, 1, RunKind::kScan, false, /*warm=*/true}};
  enc.Encode(runs, 2, &t);
  EXPECT_TRUE(CachedSeq(cache, 5, Page(5)).first) << "a warm first send may evict";
  EXPECT_FALSE(CachedSeq(cache, 3, Page(3)).first);
  // The governor turns deltas off: page 5 goes whole, and the cache follows (seq 3), so the pause
  // - which tries deltas whatever the governor says - sends a delta against what the destination has.
  sel.ReportDelta(256, 0);
  std::memset(Page(5) + 64, 0x33, 8);
  runs = {{5, 1, RunKind::kScan, true}};
  EncodeTally off;
  enc.Encode(runs, 3, &off);
  EXPECT_EQ(off.delta, 0u);
  EXPECT_EQ(off.raw, 1u);
  EXPECT_EQ(CachedSeq(cache, 5, Page(5)), (std::pair<bool, uint64_t>{true, 3}));
  std::memset(Page(5) + 128, 0x44, 8);
  EncodeTally paused;
  auto rec = enc.Encode(runs, 4, &paused, {nullptr, /*paused=*/true});
  EXPECT_EQ(paused.delta, 1u);
  auto v = DecodeEncodedPages(std::span<const uint8_t>(rec).subspan(kRecordHeaderSize), kPages, kCapsSupported, dec_, &scratch_);
  ASSERT_TRUE(v);
  EXPECT_EQ(v->entries[0].base_seq, 3u);
}

TEST_F(Encoder, VersionOneGetsPlainPages) {
  Random(1, 5);
  PageEncoder enc(View(), {1, kCapProgress}, nullptr, nullptr);
  EncodeTally t;
  std::vector<PageRun> runs = {{0, 3, RunKind::kScan}, {5, 2, RunKind::kFree}};
  auto rec = enc.Encode(runs, 7, &t);
  auto h = DecodeRecordHeader(rec.first(kRecordHeaderSize));
  ASSERT_TRUE(h);
  EXPECT_EQ(h->type, static_cast<uint16_t>(RecordType::kPages));
  auto v = DecodePages(rec.subspan(kRecordHeaderSize), kPages);
  ASSERT_TRUE(v);
  EXPECT_EQ(v->entries.size(), 5u) << "free pages travel as zero pages in v1";
  EXPECT_EQ(t.raw, 1u);
  EXPECT_EQ(t.zero, 4u);
}

}  // namespace
}  // namespace ferry::migration
