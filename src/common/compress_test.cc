// Compressor/Decompressor: round trips, the "strictly smaller" contract, a reject test for every
// malformed form listed in compress.h (zstd frames hand-built where the library would not make
// them), throughput on mixed pages. Also the small shared helpers: zero_page.h and clock.h.
#include "common/compress.h"

#include <gtest/gtest.h>

#include <chrono>
#include <cstdio>
#include <cstring>
#include <random>
#include <string>

#include "common/clock.h"
#include "common/zero_page.h"

namespace ferry {
namespace {

using Bytes = std::vector<uint8_t>;

Bytes RandomBytes(size_t n, uint64_t seed) {
  std::mt19937_64 rng(seed);
  Bytes b(n);
  for (auto& x : b) x = static_cast<uint8_t>(rng());
  return b;
}

// 4 KiB pages of four kinds, like guest RAM: zero, text-like, sparse integers, random.
Bytes MixedPages(size_t n, uint64_t seed) {
  std::mt19937_64 rng(seed);
  static const char* kWords[] = {"ferry ", "migration ", "page ", "0x7f3a ", "kernel ", "buffer ", "\n", "  "};
  Bytes b(n, 0);
  for (size_t at = 0; at < n; at += 4096) {
    size_t end = std::min(n, at + 4096);
    switch ((at / 4096) % 4) {
      case 0: break;  // zero
      case 1:
        for (size_t i = at; i < end;) {
          const char* w = kWords[rng() % 8];
          for (size_t k = 0; w[k] && i < end; ++k) b[i++] = static_cast<uint8_t>(w[k]);
        }
        break;
      case 2:
        for (size_t i = at; i + 8 <= end; i += 8) {
          uint64_t v = rng() % 5 == 0 ? rng() % 100000 : 0;
          std::memcpy(&b[i], &v, 8);
        }
        break;
      default:
        for (size_t i = at; i < end; ++i) b[i] = static_cast<uint8_t>(rng());
    }
  }
  return b;
}

void ExpectCorrupt(Compression c, const Bytes& in, size_t expected, std::string_view what) {
  Decompressor d;
  Bytes out = {1, 2, 3};
  auto s = d.Decompress(c, in, expected, &out);
  ASSERT_FALSE(s) << CompressionName(c) << ": accepted; wanted: " << what;
  EXPECT_EQ(s.error().code(), ErrorCode::kCorrupt);
  EXPECT_NE(s.error().message().find(what), std::string::npos)
      << CompressionName(c) << ": " << s.error().message() << " (wanted: " << what << ")";
  EXPECT_TRUE(out.empty());
}

Bytes Compress(Compression c, const Bytes& in, int level = 1) {
  Compressor comp;
  Bytes out;
  EXPECT_TRUE(comp.Compress(c, level, in, &out)) << CompressionName(c);
  return out;
}

TEST(Compression, NamesAndParsing) {
  EXPECT_EQ(CompressionName(Compression::kNone), "none");
  EXPECT_EQ(CompressionName(Compression::kLz4), "lz4");
  EXPECT_EQ(CompressionName(Compression::kZstd), "zstd");
  EXPECT_EQ(CompressionName(static_cast<Compression>(9)), "unknown");
  EXPECT_EQ(*ParseCompression("zstd"), Compression::kZstd);
  EXPECT_EQ(*ParseCompression("none"), Compression::kNone);
  auto bad = ParseCompression("gzip");
  ASSERT_FALSE(bad);
  EXPECT_EQ(bad.error().code(), ErrorCode::kInvalidArgument);
  EXPECT_EQ(bad.error().message(), "unknown compression 'gzip' (none|lz4|zstd)");
  EXPECT_EQ(*CompressionFromWire(1), Compression::kLz4);
  EXPECT_EQ(*CompressionFromWire(2), Compression::kZstd);
  auto w = CompressionFromWire(3);
  ASSERT_FALSE(w);
  EXPECT_EQ(w.error().code(), ErrorCode::kCorrupt);
}

TEST(Compression, RoundTripBothCodecs) {
  Compressor comp;  // one instance reused across codecs, levels and sizes
  Decompressor dec;
  for (Compression c : {Compression::kLz4, Compression::kZstd}) {
    for (size_t n : {size_t{64}, size_t{4096}, size_t{65536}, size_t{256} << 10, size_t{1} << 20}) {
      for (int level : {1, 3, 19, 0, 100}) {  // 0 and 100 are clamped
        if (c == Compression::kLz4 && level != 1) continue;
        if (level == 19 && n > (64u << 10)) continue;  // slow
        const Bytes in = MixedPages(n, n + static_cast<uint64_t>(level));
        Bytes z;
        ASSERT_TRUE(comp.Compress(c, level, in, &z)) << CompressionName(c) << " " << n;
        EXPECT_LT(z.size(), in.size());
        Bytes back;
        auto s = dec.Decompress(c, z, in.size(), &back);
        ASSERT_TRUE(s) << s.error().ToString();
        ASSERT_EQ(back, in) << CompressionName(c) << " " << n << " level " << level;
      }
    }
  }
  // kNone "decompresses" by copying exactly expected_size bytes.
  Bytes raw = {1, 2, 3}, back;
  ASSERT_TRUE(dec.Decompress(Compression::kNone, raw, 3, &back));
  EXPECT_EQ(back, raw);
}

TEST(Compression, IncompressibleEmptyAndNoneReturnFalse) {
  Compressor comp;
  Bytes out = {9, 9};
  const Bytes random = RandomBytes(64 << 10, 1);
  for (Compression c : {Compression::kLz4, Compression::kZstd}) {
    EXPECT_FALSE(comp.Compress(c, 1, random, &out)) << CompressionName(c);
    EXPECT_TRUE(out.empty());
    EXPECT_FALSE(comp.Compress(c, 1, {}, &out));
    EXPECT_FALSE(comp.Compress(c, 1, Bytes{7}, &out));  // one byte cannot shrink
  }
  EXPECT_FALSE(comp.Compress(Compression::kNone, 1, Bytes(4096, 0), &out));
  EXPECT_FALSE(comp.Compress(static_cast<Compression>(7), 1, Bytes(4096, 0), &out));
  EXPECT_TRUE(out.empty());
  // Still works after the failures.
  EXPECT_TRUE(comp.Compress(Compression::kZstd, 1, Bytes(4096, 0), &out));
}

// --- rejects ---

TEST(CompressionReject, KindAndNoneSize) {
  ExpectCorrupt(static_cast<Compression>(5), Bytes(10, 0), 10, "unknown compression 5");
  ExpectCorrupt(Compression::kNone, Bytes(10, 0), 11, "uncompressed payload of 10 bytes, expected 11");
}

TEST(CompressionReject, Truncated) {
  const Bytes in = MixedPages(64 << 10, 2);
  for (Compression c : {Compression::kLz4, Compression::kZstd}) {
    const Bytes z = Compress(c, in);
    for (size_t keep : {z.size() - 1, z.size() / 2, size_t{5}, size_t{1}, size_t{0}}) {
      Bytes cut(z.begin(), z.begin() + static_cast<ptrdiff_t>(keep));
      Decompressor d;
      Bytes out;
      auto s = d.Decompress(c, cut, in.size(), &out);
      ASSERT_FALSE(s) << CompressionName(c) << " cut to " << keep;
      EXPECT_EQ(s.error().code(), ErrorCode::kCorrupt);
    }
  }
  ExpectCorrupt(Compression::kZstd, Bytes{0x28, 0xB5, 0x2F}, 10, "too short for a frame");
  const Bytes z = Compress(Compression::kZstd, in);
  ExpectCorrupt(Compression::kZstd, Bytes(z.begin(), z.end() - 1), in.size(), "truncated or malformed zstd frame");
  ExpectCorrupt(Compression::kZstd, Bytes(z.begin(), z.begin() + 5), in.size(), "malformed or truncated zstd frame header");
  const Bytes l = Compress(Compression::kLz4, in);
  ExpectCorrupt(Compression::kLz4, Bytes(l.begin(), l.end() - 1), in.size(), "lz4 block");
}

TEST(CompressionReject, Garbage) {
  for (uint64_t seed = 0; seed < 200; ++seed) {
    Bytes g = RandomBytes(1 + seed * 7, seed);
    for (Compression c : {Compression::kLz4, Compression::kZstd}) {
      Decompressor d;
      Bytes out;
      auto s = d.Decompress(c, g, 4096, &out);
      ASSERT_FALSE(s) << CompressionName(c) << " seed " << seed;
      EXPECT_EQ(s.error().code(), ErrorCode::kCorrupt);
      EXPECT_TRUE(out.empty());
    }
  }
  ExpectCorrupt(Compression::kZstd, Bytes{'h', 'e', 'l', 'l', 'o'}, 5, "not a zstd frame (magic 0x6c6c6568)");
  // A zstd frame body behind a valid magic.
  Bytes fake = {0x28, 0xB5, 0x2F, 0xFD};
  auto r = RandomBytes(64, 3);
  fake.insert(fake.end(), r.begin(), r.end());
  Decompressor d;
  Bytes out;
  EXPECT_FALSE(d.Decompress(Compression::kZstd, fake, 4096, &out));
}

// A decompression bomb: small input, huge output. The caller's expected_size is the bound.
TEST(CompressionReject, BombLargerThanExpected) {
  const Bytes zeros(1 << 20, 0);
  const Bytes zz = Compress(Compression::kZstd, zeros);
  EXPECT_LT(zz.size(), 100u);
  // zstd: refused from the declared size, before decompressing anything.
  ExpectCorrupt(Compression::kZstd, zz, 4096, "zstd frame declares 1048576 bytes, expected 4096");
  const Bytes lz = Compress(Compression::kLz4, zeros);
  ExpectCorrupt(Compression::kLz4, lz, 4096, "lz4 block decodes to more than 4096 bytes");
  // The output is sized from expected_size (+ 1 byte for lz4's diagnosis), never from the input.
  Decompressor d;
  Bytes out;
  EXPECT_FALSE(d.Decompress(Compression::kLz4, lz, 4096, &out));
  EXPECT_LE(out.capacity(), 2 * 4097u);
  Bytes out2;
  EXPECT_FALSE(d.Decompress(Compression::kZstd, zz, 4096, &out2));
  EXPECT_EQ(out2.capacity(), 0u);
}

TEST(CompressionReject, ShorterThanExpected) {
  const Bytes in = MixedPages(8192, 4);
  ExpectCorrupt(Compression::kLz4, Compress(Compression::kLz4, in), 8193, "lz4 block decodes to 8192 bytes, expected 8193");
  ExpectCorrupt(Compression::kZstd, Compress(Compression::kZstd, in), 8193, "zstd frame declares 8192 bytes, expected 8193");
}

TEST(CompressionReject, TrailingBytes) {
  const Bytes in = MixedPages(8192, 5);
  Bytes z = Compress(Compression::kZstd, in);
  z.push_back(0);
  ExpectCorrupt(Compression::kZstd, z, in.size(), "1 trailing bytes after the zstd frame");
  // A second complete frame is trailing bytes too.
  Bytes two = Compress(Compression::kZstd, in);
  const Bytes again = two;
  two.insert(two.end(), again.begin(), again.end());
  ExpectCorrupt(Compression::kZstd, two, in.size(), "trailing bytes after the zstd frame");
  ExpectCorrupt(Compression::kZstd, two, 2 * in.size(), "zstd frame declares 8192 bytes, expected 16384");
  // lz4: no end marker, so extra input reads as more output (or garbage).
  for (uint8_t extra : {uint8_t{0x00}, uint8_t{0x10}, uint8_t{0xF0}}) {
    Bytes l = Compress(Compression::kLz4, in);
    l.push_back(extra);
    Decompressor d;
    Bytes out;
    auto s = d.Decompress(Compression::kLz4, l, in.size(), &out);
    ASSERT_FALSE(s) << int{extra};
    EXPECT_EQ(s.error().code(), ErrorCode::kCorrupt);
  }
}

// Hand-built zstd frames (RFC 8878): magic, frame header descriptor, [window], [content size],
// blocks (3-byte header: bit 0 last, bits 1-2 type (0 raw, 1 RLE), bits 3.. size).
Bytes ZstdFrame(std::initializer_list<uint8_t> header_after_magic, std::initializer_list<uint8_t> blocks) {
  Bytes f = {0x28, 0xB5, 0x2F, 0xFD};
  f.insert(f.end(), header_after_magic);
  f.insert(f.end(), blocks);
  return f;
}

TEST(CompressionReject, ZstdFrameForms) {
  // Baseline: single segment, 1-byte content size 3, one raw block "abc": valid.
  const Bytes ok = ZstdFrame({0x20, 0x03}, {0x19, 0x00, 0x00, 'a', 'b', 'c'});  // 0x19 = last | raw | 3 << 3
  Decompressor d;
  Bytes out;
  auto s = d.Decompress(Compression::kZstd, ok, 3, &out);
  ASSERT_TRUE(s) << s.error().ToString();
  EXPECT_EQ(out, (Bytes{'a', 'b', 'c'}));
  // The same frame declaring 4 bytes, asked for 4: the blocks make only 3.
  ExpectCorrupt(Compression::kZstd, ZstdFrame({0x20, 0x04}, {0x19, 0x00, 0x00, 'a', 'b', 'c'}), 4,
                "malformed zstd frame");
  // Wrong declared content size for the caller.
  ExpectCorrupt(Compression::kZstd, ok, 4, "zstd frame declares 3 bytes, expected 4");
  // No content size (not single segment, FCS flag 0, window descriptor 0): refused.
  ExpectCorrupt(Compression::kZstd, ZstdFrame({0x00, 0x00}, {0x19, 0x00, 0x00, 'a', 'b', 'c'}), 3,
                "does not declare its content size");
  // A skippable frame (magic 0x184D2A50): not a zstd data frame.
  ExpectCorrupt(Compression::kZstd, Bytes{0x50, 0x2A, 0x4D, 0x18, 0x01, 0x00, 0x00, 0x00, 0x00}, 0, "not a zstd frame");
  // Declares 4096 (2-byte FCS: 4096 - 256 = 0x0F00) but carries two RLE blocks of 4096 bytes:
  // a frame lying about its size. Refused without writing past 4096 bytes.
  ExpectCorrupt(Compression::kZstd, ZstdFrame({0x60, 0x00, 0x0F}, {0x02, 0x80, 0x00, 0xAA, 0x03, 0x80, 0x00, 0xAA}),
                4096, "zstd frame decodes to more than the 4096 bytes it declares");
  // Reserved bit set in the frame header descriptor.
  ExpectCorrupt(Compression::kZstd, ZstdFrame({0x28, 0x03}, {0x19, 0x00, 0x00, 'a', 'b', 'c'}), 3, "zstd frame");
}

TEST(Compression, DecompressorRecoversAfterErrors) {
  const Bytes in = MixedPages(32 << 10, 6);
  Decompressor d;
  for (Compression c : {Compression::kLz4, Compression::kZstd}) {
    const Bytes z = Compress(c, in);
    Bytes out;
    EXPECT_FALSE(d.Decompress(c, Bytes(z.begin(), z.begin() + static_cast<ptrdiff_t>(z.size() / 2)), in.size(), &out));
    EXPECT_FALSE(d.Decompress(c, RandomBytes(100, 1), in.size(), &out));
    ASSERT_TRUE(d.Decompress(c, z, in.size(), &out));
    EXPECT_EQ(out, in);
  }
}

TEST(Compression, MovedInstancesWork) {
  Compressor a;
  Bytes z;
  ASSERT_TRUE(a.Compress(Compression::kZstd, 1, Bytes(4096, 1), &z));
  Compressor b = std::move(a);
  ASSERT_TRUE(b.Compress(Compression::kZstd, 1, Bytes(4096, 2), &z));
  Decompressor d1;
  Decompressor d2 = std::move(d1);
  Bytes out;
  ASSERT_TRUE(d2.Decompress(Compression::kZstd, z, 4096, &out));
  EXPECT_EQ(out, Bytes(4096, 2));
}

TEST(CompressionBench, MixedHalfMiB) {
  const Bytes in = MixedPages(512 << 10, 7);
  Compressor comp;
  Decompressor dec;
  for (auto [c, level] : {std::pair{Compression::kLz4, 1}, std::pair{Compression::kZstd, 1},
                          std::pair{Compression::kZstd, 3}}) {
    Bytes z, back;
    constexpr int kIters = 20;
    auto t0 = std::chrono::steady_clock::now();
    for (int i = 0; i < kIters; ++i) ASSERT_TRUE(comp.Compress(c, level, in, &z));
    auto t1 = std::chrono::steady_clock::now();
    for (int i = 0; i < kIters; ++i) ASSERT_TRUE(dec.Decompress(c, z, in.size(), &back));
    auto t2 = std::chrono::steady_clock::now();
    ASSERT_EQ(back, in);
    auto mbs = [&](auto d) { return in.size() * kIters / 1e6 / std::chrono::duration<double>(d).count(); };
    std::printf("[ info ] %s-%d on 512 KiB mixed pages: ratio %.3f, compress %.0f MB/s, decompress %.0f MB/s\n",
                std::string(CompressionName(c)).c_str(), level, static_cast<double>(z.size()) / in.size(), mbs(t1 - t0),
                mbs(t2 - t1));
  }
}

// --- zero_page.h ---

TEST(ZeroPage, EveryByteMatters) {
  alignas(64) static uint8_t page[4096 + 64];
  std::memset(page, 0, sizeof page);
  for (size_t shift : {size_t{0}, size_t{1}, size_t{7}}) {  // unaligned starts too
    uint8_t* p = page + shift;
    EXPECT_TRUE(IsZeroPage(p));
    EXPECT_TRUE(IsAllZero({p, 4096}));
    for (size_t i = 0; i < 4096; ++i) {
      p[i] = 0x01 << (i % 8);
      ASSERT_FALSE(IsZeroPage(p)) << i;
      ASSERT_FALSE(IsAllZero({p, 4096})) << i;
      p[i] = 0;
    }
  }
  page[4096 + 8] = 1;  // beyond the page: not looked at
  EXPECT_TRUE(IsZeroPage(page));
}

TEST(ZeroPage, AllZeroAnyLength) {
  Bytes b(3000, 0);
  EXPECT_TRUE(IsAllZero({}));
  for (size_t n : {size_t{1}, size_t{7}, size_t{8}, size_t{9}, size_t{511}, size_t{512}, size_t{513}, size_t{2999}}) {
    EXPECT_TRUE(IsAllZero({b.data(), n}));
    b[n - 1] = 0x80;
    EXPECT_FALSE(IsAllZero({b.data(), n})) << n;
    EXPECT_TRUE(IsAllZero({b.data(), n - 1})) << n;
    b[n - 1] = 0;
  }
}

// --- clock.h ---

TEST(Clock, MonotonicThreadCpuAndMs) {
  uint64_t a = NowNs();
  uint64_t b = NowNs();
  EXPECT_GE(b, a);
  EXPECT_GT(a, 0u);
  const uint64_t cpu0 = ThreadCpuNs();
  volatile uint64_t x = 0;
  for (int i = 0; i < 2'000'000; ++i) x = x + static_cast<uint64_t>(i);
  EXPECT_GT(ThreadCpuNs(), cpu0);
  EXPECT_DOUBLE_EQ(MsFromNs(1'500'000), 1.5);
  EXPECT_DOUBLE_EQ(MsFromNs(0), 0.0);
}

}  // namespace
}  // namespace ferry
