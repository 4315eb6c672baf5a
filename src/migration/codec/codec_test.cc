// XBZRLE: exact encodings, round trips (property test), the `limit` contract, a reject test per
// malformed form listed in xbzrle.h, page-boundary guards, throughput. DeltaCache: hit/miss,
// overwrite, eviction rules, CLOCK, erase, bounds, disabled, and a multi-thread stress test.
#include <sys/mman.h>
#include <unistd.h>

#include <gtest/gtest.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <barrier>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <random>
#include <thread>
#include <vector>

#include "migration/codec/delta_cache.h"
#include "migration/codec/xbzrle.h"

namespace ferry::migration {
namespace {

constexpr size_t kPage = kDeltaPageSize;
using Page = std::vector<uint8_t>;
using Bytes = std::vector<uint8_t>;

Page RandomPage(std::mt19937_64& rng) {
  Page p(kPage);
  for (size_t i = 0; i < kPage; i += 8) {
    uint64_t v = rng();
    std::memcpy(p.data() + i, &v, 8);
  }
  return p;
}

// Encodes with a limit that always fits and returns the delta.
Bytes Encode(const Page& o, const Page& n) {
  Bytes out(kXbzrleMaxDeltaSize);
  size_t len = XbzrleEncode(o.data(), n.data(), out.data(), out.size());
  EXPECT_GT(len, 0u);
  out.resize(len);
  return out;
}

// Decodes onto a copy of `base`; fails the test on error.
Page Apply(const Page& base, const Bytes& delta) {
  Page p = base;
  auto s = XbzrleDecode(delta, p.data());
  EXPECT_TRUE(s) << s.error().ToString();
  return p;
}

// Expects a kCorrupt rejection whose message contains `what`, with the page untouched.
void ExpectReject(const Bytes& delta, std::string_view what) {
  std::mt19937_64 rng(7);
  const Page base = RandomPage(rng);
  Page p = base;
  auto s = XbzrleDecode(delta, p.data());
  ASSERT_FALSE(s) << "accepted; wanted: " << what;
  EXPECT_EQ(s.error().code(), ErrorCode::kCorrupt);
  EXPECT_NE(s.error().message().find(what), std::string::npos) << s.error().message() << " (wanted: " << what << ")";
  EXPECT_EQ(p, base) << "page modified by a rejected delta: " << what;
}

Bytes Concat(std::initializer_list<Bytes> parts) {
  Bytes r;
  for (const auto& b : parts) r.insert(r.end(), b.begin(), b.end());
  return r;
}

// --- exact encodings ---

TEST(Xbzrle, EqualPagesGiveTheNoOpDelta) {
  std::mt19937_64 rng(1);
  Page o = RandomPage(rng);
  Bytes d = Encode(o, o);
  EXPECT_EQ(d, (Bytes{0x00, 0x01, o[0]}));
  EXPECT_EQ(Apply(o, d), o);
  uint8_t out[2];
  EXPECT_EQ(XbzrleEncode(o.data(), o.data(), out, 2), 0u);  // even the no-op needs 3 bytes
  // The empty delta is valid for the decoder (the encoder never makes it).
  EXPECT_EQ(Apply(o, {}), o);
}

TEST(Xbzrle, ExactEncodingFirstAndLastByte) {
  Page o(kPage, 0x11), n = o;
  n[0] = 0xA0;
  n[4095] = 0xA1;
  // (0, 1, A0) then (4094 = 0x7E | 0x1F << 7, 1, A1); the final unchanged run is empty.
  EXPECT_EQ(Encode(o, n), (Bytes{0x00, 0x01, 0xA0, 0xFE, 0x1F, 0x01, 0xA1}));
  EXPECT_EQ(Apply(o, Encode(o, n)), n);
}

TEST(Xbzrle, ShortGapsAreMergedLongGapsSplit) {
  Page o(kPage, 0), n = o;
  n[10] = 1;
  n[12] = 2;  // gap of 1 < kXbzrleMinGap: one run of 3 bytes
  EXPECT_EQ(Encode(o, n), (Bytes{10, 3, 1, 0, 2}));
  n = o;
  n[10] = 1;
  n[13] = 2;  // gap of 2: still merged (same size, fewer runs)
  EXPECT_EQ(Encode(o, n), (Bytes{10, 4, 1, 0, 0, 2}));
  n = o;
  n[10] = 1;
  n[14] = 2;  // gap of 3: split
  EXPECT_EQ(Encode(o, n), (Bytes{10, 1, 1, 3, 1, 2}));
  // Across the 8-byte compare words and up to the page end.
  n = o;
  for (size_t i = 4090; i < kPage; i += 2) n[i] = 9;  // 4090, 4092, 4094
  EXPECT_EQ(Encode(o, n), (Bytes{0xFA, 0x1F, 5, 9, 0, 9, 0, 9}));
}

TEST(Xbzrle, WholePageRewriteAndTheLimit) {
  std::mt19937_64 rng(2);
  Page o = RandomPage(rng), n = RandomPage(rng);
  for (size_t i = 0; i < kPage; ++i)
    if (n[i] == o[i]) n[i] = static_cast<uint8_t>(o[i] + 1);  // every byte differs
  // One pair: (0, 4096 = 0x80 0x20, 4096 bytes).
  Bytes out(5000, 0xEE);
  ASSERT_EQ(XbzrleEncode(o.data(), n.data(), out.data(), 4099), 4099u);
  EXPECT_EQ(out[0], 0x00);
  EXPECT_EQ(out[1], 0x80);
  EXPECT_EQ(out[2], 0x20);
  EXPECT_EQ(out[4099], 0xEE);
  out.resize(4099);
  EXPECT_EQ(Apply(o, out), n);
  Bytes small(4098);
  EXPECT_EQ(XbzrleEncode(o.data(), n.data(), small.data(), small.size()), 0u);
}

TEST(Xbzrle, NeverWritesAtOrPastTheLimit) {
  std::mt19937_64 rng(3);
  for (int iter = 0; iter < 2000; ++iter) {
    Page o = RandomPage(rng), n = o;
    int edits = static_cast<int>(rng() % 200);
    for (int e = 0; e < edits; ++e) n[rng() % kPage] ^= static_cast<uint8_t>(1 + rng() % 255);
    const size_t full = Encode(o, n).size();
    const size_t limit = rng() % (full + 8);
    Bytes out(limit + 64, 0xCD);
    size_t len = XbzrleEncode(o.data(), n.data(), out.data(), limit);
    for (size_t i = limit; i < out.size(); ++i) ASSERT_EQ(out[i], 0xCD) << "wrote at " << i << " limit " << limit;
    // The encoding does not depend on the limit: it either fits whole or not at all.
    if (limit >= full) {
      ASSERT_EQ(len, full);
      out.resize(len);
      ASSERT_EQ(Apply(o, out), n);
    } else {
      ASSERT_EQ(len, 0u) << "limit " << limit << " full " << full;
    }
  }
}

// --- property tests ---

// Byte-at-a-time statement of the encoder's policy: runs end before kXbzrleMinGap unchanged bytes.
Bytes ReferenceEncode(const Page& o, const Page& n) {
  Bytes out;
  auto leb = [&](size_t v) {
    if (v >= 128) out.push_back(static_cast<uint8_t>(v | 0x80));
    out.push_back(static_cast<uint8_t>(v >= 128 ? v >> 7 : v));
  };
  size_t pos = 0;
  for (;;) {
    size_t i = pos;
    while (i < kPage && o[i] == n[i]) ++i;
    if (i == kPage) break;
    size_t end = i + 1;
    for (size_t k = i + 1; k < kPage; ++k) {
      if (o[k] != n[k])
        end = k + 1;
      else if (k + 1 - end >= kXbzrleMinGap)
        break;
    }
    leb(i - pos);
    leb(end - i);
    out.insert(out.end(), n.begin() + static_cast<ptrdiff_t>(i), n.begin() + static_cast<ptrdiff_t>(end));
    pos = end;
  }
  if (out.empty()) out = {0x00, 0x01, n[0]};
  return out;
}

TEST(Xbzrle, MatchesTheReferenceAtEveryDensity) {
  std::mt19937_64 rng(8);
  for (int iter = 0; iter < 3000; ++iter) {
    const Page o = RandomPage(rng);
    Page n = o;
    // Per-byte change probability from 1/4096 to all: every mix of gaps inside the 16-byte steps.
    const uint64_t per_mille = std::array<uint64_t, 8>{0, 1, 10, 100, 300, 500, 700, 950}[iter % 8];
    for (size_t i = 0; i < kPage; ++i)
      if (rng() % 1000 < per_mille || (per_mille == 0 && rng() % 4096 == 0))
        n[i] = static_cast<uint8_t>(o[i] + 1 + rng() % 255);
    const Bytes ref = ReferenceEncode(o, n);
    Bytes out(kXbzrleMaxDeltaSize);
    const size_t len = XbzrleEncode(o.data(), n.data(), out.data(), out.size());
    out.resize(len);
    ASSERT_EQ(out, ref) << "iteration " << iter << ", density " << per_mille << "/1000";
    ASSERT_EQ(Apply(o, out), n);
  }
}


TEST(Xbzrle, RandomSparseEditsRoundTrip) {
  std::mt19937_64 rng(4);
  size_t total_delta = 0;
  for (int iter = 0; iter < 5000; ++iter) {
    Page o = iter % 3 == 0 ? Page(kPage, 0) : RandomPage(rng);
    Page n = o;
    const int edits = static_cast<int>(rng() % 65);
    for (int e = 0; e < edits; ++e) {
      size_t at = rng() % kPage;
      size_t len = 1 + rng() % 16;
      for (size_t i = at; i < std::min(kPage, at + len); ++i) {
        switch (rng() % 4) {
          case 0: n[i] = o[i]; break;  // rewritten with the same value
          case 1: n[i] = 0; break;
          default: n[i] = static_cast<uint8_t>(rng()); break;
        }
      }
    }
    Bytes d = Encode(o, n);
    ASSERT_LE(d.size(), kXbzrleMaxDeltaSize);
    total_delta += d.size();
    Page back = o;
    auto s = XbzrleDecode(d, back.data());
    ASSERT_TRUE(s) << s.error().ToString();
    ASSERT_EQ(back, n) << "iteration " << iter;
  }
  std::printf("[ info ] mean delta of 0..64 random edits: %.0f bytes\n", static_cast<double>(total_delta) / 5000);
}

// The largest valid delta: (0, 1) then 2047 x (1, 1), the last changed run 2 bytes long.
TEST(Xbzrle, LargestValidDelta) {
  Bytes d = {0x00, 0x01, 0xAA};
  for (int i = 0; i < 2047; ++i) {
    d.push_back(0x01);
    d.push_back(i == 2046 ? 0x02 : 0x01);
    d.push_back(0xBB);
    if (i == 2046) d.push_back(0xCC);
  }
  EXPECT_EQ(d.size(), kXbzrleMaxDeltaSize);
  Page p(kPage, 0);
  auto s = XbzrleDecode(d, p.data());
  ASSERT_TRUE(s) << s.error().ToString();
  EXPECT_EQ(p[0], 0xAA);
  EXPECT_EQ(p[1], 0x00);
  EXPECT_EQ(p[2], 0xBB);
  EXPECT_EQ(p[4094], 0xBB);
  EXPECT_EQ(p[4095], 0xCC);
  // One more byte anywhere is too much.
  d.push_back(0x00);
  ExpectReject(d, "trailing bytes");
}

// --- rejects: one per malformed form ---

TEST(XbzrleReject, TruncatedLength) {
  ExpectReject({0x80}, "truncated unchanged length at offset 0");
  ExpectReject({0x05}, "truncated changed length at offset 1");
  ExpectReject({0x05, 0x80}, "truncated changed length at offset 1");
  // After a complete first pair.
  ExpectReject({0x00, 0x01, 0x42, 0x83}, "truncated unchanged length at offset 3");
}

TEST(XbzrleReject, LengthLongerThanTwoBytes) {
  ExpectReject({0x80, 0x80, 0x01, 0x01, 0x00}, "unchanged length at offset 0 is longer than 2 bytes");
  ExpectReject({0x01, 0x81, 0x80, 0x00, 0x00}, "changed length at offset 1 is longer than 2 bytes");
}

TEST(XbzrleReject, NonCanonicalLength) {
  ExpectReject({0x85, 0x00, 0x01, 0x42}, "non-canonical unchanged length at offset 0");
  ExpectReject({0x00, 0x81, 0x00, 0x42}, "non-canonical changed length at offset 1");
}

TEST(XbzrleReject, LengthAbovePageSize) {
  // 4097 = 0x01 | 0x20 << 7; 16383 = the largest 2-byte value.
  ExpectReject({0x81, 0x20, 0x01, 0x00}, "unchanged length 4097 at offset 0 exceeds the page size");
  ExpectReject({0x00, 0xFF, 0x7F}, "changed length 16383 at offset 1 exceeds the page size");
}

TEST(XbzrleReject, EmptyChangedRun) {
  ExpectReject({0x00, 0x00}, "empty changed run at offset 1");
  ExpectReject({0x05, 0x00, 0x01}, "empty changed run at offset 1");
}

TEST(XbzrleReject, EmptyUnchangedRunBetweenChangedRuns) {
  ExpectReject({0x00, 0x01, 0x41, 0x00, 0x01, 0x42}, "empty unchanged run at offset 3");
}

TEST(XbzrleReject, RunPastThePageEnd) {
  ExpectReject({0xFF, 0x1F, 0x02, 0x41, 0x42}, "runs past the page end");  // 4095 + 2
  ExpectReject({0x80, 0x20, 0x01, 0x41}, "runs past the page end");        // 4096 + 1
  // Valid first pair, then one that overflows: nothing is applied.
  ExpectReject({0x00, 0x01, 0x41, 0xFE, 0x1F, 0x02, 0x42, 0x43}, "pair at offset 3 runs past the page end");
}

TEST(XbzrleReject, ChangedBytesTruncated) {
  ExpectReject({0x00, 0x04, 0x41, 0x42}, "changed bytes truncated at offset 2 (2 of 4 present)");
  ExpectReject({0x10, 0x01}, "changed bytes truncated");
}

TEST(XbzrleReject, TrailingBytesAfterThePageIsComplete) {
  Bytes whole = {0x00, 0x80, 0x20};
  whole.resize(3 + kPage, 0x5A);
  Page p(kPage, 0);
  ASSERT_TRUE(XbzrleDecode(whole, p.data()));
  EXPECT_EQ(p, Page(kPage, 0x5A));
  ExpectReject(Concat({whole, {0x00}}), "1 trailing bytes at offset 4099");
  ExpectReject(Concat({{0xFF, 0x1F, 0x01, 0x41}, {0x01, 0x01, 0x42}}), "trailing bytes at offset 4");
}

// --- page boundaries: guard pages around the encoder's inputs and the decoder's page ---

class GuardedPages {
 public:
  // Layout: [page][guard][page][guard][page][guard]: each usable page ends at a PROT_NONE page.
  GuardedPages() {
    base_ = static_cast<uint8_t*>(mmap(nullptr, 6 * kPage, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0));
    if (base_ == MAP_FAILED) base_ = nullptr;
    for (int i = 0; base_ && i < 3; ++i) mprotect(base_ + (2 * i + 1) * kPage, kPage, PROT_NONE);
  }
  ~GuardedPages() {
    if (base_) munmap(base_, 6 * kPage);
  }
  uint8_t* page(int i) { return base_ + 2 * i * kPage; }
  bool ok() const { return base_ != nullptr; }

 private:
  uint8_t* base_ = nullptr;
};

TEST(Xbzrle, NeverReadsOrWritesPastFourKiB) {
  GuardedPages g;
  ASSERT_TRUE(g.ok());
  uint8_t* o = g.page(0);
  uint8_t* n = g.page(1);
  uint8_t* dst = g.page(2);
  std::mt19937_64 rng(5);
  Bytes out(kXbzrleMaxDeltaSize);
  for (int iter = 0; iter < 2000; ++iter) {
    for (size_t i = 0; i < kPage; ++i) o[i] = static_cast<uint8_t>(rng());
    std::memcpy(n, o, kPage);
    // Edits concentrated near the end: the encoder's last words and byte tail.
    for (int e = 0; e < 8; ++e) n[kPage - 1 - rng() % 24] ^= 0xFF;
    if (iter % 2) n[rng() % kPage] ^= 0x01;
    size_t len = XbzrleEncode(o, n, out.data(), out.size());
    ASSERT_GT(len, 0u);
    std::memcpy(dst, o, kPage);
    auto s = XbzrleDecode(std::span<const uint8_t>(out.data(), len), dst);
    ASSERT_TRUE(s) << s.error().ToString();
    ASSERT_EQ(std::memcmp(dst, n, kPage), 0);
  }
  // Deltas that would write beyond the page are rejected before writing anything (a write into
  // the guard page would kill the test).
  std::memset(dst, 0x77, kPage);
  const Bytes past[] = {
      {0xFF, 0x1F, 0x02, 0x41, 0x42},
      {0x80, 0x20, 0x01, 0x41},
      {0x01, 0x80, 0x20},  // 1 + 4096
  };
  for (const Bytes& d : past) {
    Bytes tail = d;
    tail.resize(d.size() + 4096, 0x99);  // plenty of "changed bytes" to write with
    EXPECT_FALSE(XbzrleDecode(tail, dst));
  }
  for (size_t i = 0; i < kPage; ++i) ASSERT_EQ(dst[i], 0x77);
}

// --- throughput ---

double MbPerS(size_t bytes, std::chrono::steady_clock::duration d) {
  return static_cast<double>(bytes) / 1e6 / std::chrono::duration<double>(d).count();
}

TEST(XbzrleBench, Throughput) {
  std::mt19937_64 rng(6);
  const Page o = RandomPage(rng);
  Page n = o;
  // Four changed 8-byte words at scattered positions.
  for (size_t at : {size_t{136}, size_t{1544}, size_t{2600}, size_t{3968}})
    for (size_t i = 0; i < 8; ++i) n[at + i] = static_cast<uint8_t>(~o[at + i]);
  Bytes out(kPage);
  constexpr int kIters = 200000;
  size_t len = 0;
  auto t0 = std::chrono::steady_clock::now();
  for (int i = 0; i < kIters; ++i) {
    len = XbzrleEncode(o.data(), n.data(), out.data(), out.size());
    asm volatile("" : : "r"(out.data()) : "memory");
  }
  auto t1 = std::chrono::steady_clock::now();
  ASSERT_GT(len, 0u);
  EXPECT_LE(len, 4 * (2 + 2 + 8));
  out.resize(len);
  Page dst = o;
  for (int i = 0; i < kIters; ++i) {
    auto s = XbzrleDecode(out, dst.data());
    asm volatile("" : : "r"(dst.data()) : "memory");
    if (!s) FAIL() << s.error().ToString();
  }
  auto t2 = std::chrono::steady_clock::now();
  ASSERT_EQ(dst, n);

  // A fully rewritten random page against a typical limit: the encoder must give up.
  const Page r = RandomPage(rng);
  constexpr size_t kLimit = 2048;
  Bytes big(kLimit);
  constexpr int kBailIters = 200000;
  auto t3 = std::chrono::steady_clock::now();
  size_t bail = 1;
  for (int i = 0; i < kBailIters; ++i) {
    bail = XbzrleEncode(o.data(), r.data(), big.data(), kLimit);
    asm volatile("" : : "r"(big.data()) : "memory");
  }
  auto t4 = std::chrono::steady_clock::now();
  EXPECT_EQ(bail, 0u);
  const double enc = MbPerS(kPage * kIters, t1 - t0), dec = MbPerS(kPage * kIters, t2 - t1);
  const double bail_ns = std::chrono::duration<double, std::nano>(t4 - t3).count() / kBailIters;
  std::printf("[ info ] xbzrle 4 KiB page, 4 scattered changed words: delta %zu bytes, encode %.0f MB/s "
              "(%.0f ns/page), decode %.0f MB/s (%.0f ns/page)\n",
              len, enc, 4096e-3 / enc * 1e6, dec, 4096e-3 / dec * 1e6);
  std::printf("[ info ] xbzrle rewritten random page, limit %zu: gives up in %.0f ns (%.0f MB/s of page)\n", kLimit,
              bail_ns, 4096 / bail_ns * 1e3);
}

// --- DeltaCache ---

Page Variant(const Page& base, uint64_t k) {
  Page p = base;
  for (int i = 0; i < 4; ++i) p[(k * 977 + i * 1031) % kPage] ^= static_cast<uint8_t>(k + i + 1);
  return p;
}

TEST(DeltaCache, DisabledIsANoOp) {
  for (uint64_t cap : {uint64_t{0}, uint64_t{4095}}) {
    DeltaCache c(cap, 1000);
    EXPECT_FALSE(c.enabled());
    Page p(kPage, 1);
    Bytes out(kPage);
    size_t len = 99;
    uint64_t seq = 99;
    EXPECT_FALSE(c.Insert(3, p.data(), 1, true));
    EXPECT_FALSE(c.EncodeDelta(3, p.data(), out.data(), out.size(), &len, &seq));
    c.Erase(3);
    EXPECT_EQ(len, 99u);
    EXPECT_EQ(seq, 99u);
    auto st = c.stats();
    EXPECT_EQ(st.capacity_pages, 0u);
    EXPECT_EQ(st.misses + st.inserts + st.hits, 0u);
  }
}

TEST(DeltaCache, HitMissAndOverwrite) {
  std::mt19937_64 rng(10);
  const Page a = RandomPage(rng);
  DeltaCache c(64 * kPage, 1000);
  ASSERT_TRUE(c.enabled());
  EXPECT_EQ(c.stats().capacity_pages, 64u);
  Bytes out(kPage);
  size_t len = 0;
  uint64_t base = 0;
  EXPECT_FALSE(c.EncodeDelta(5, a.data(), out.data(), out.size(), &len, &base));  // miss
  ASSERT_TRUE(c.Insert(5, a.data(), 100, false));
  const Page b = Variant(a, 1);
  ASSERT_TRUE(c.EncodeDelta(5, b.data(), out.data(), out.size(), &len, &base));
  EXPECT_EQ(base, 100u);
  out.resize(len);
  EXPECT_EQ(Apply(a, out), b);
  out.resize(kPage);
  EXPECT_FALSE(c.EncodeDelta(6, b.data(), out.data(), out.size(), &len, &base));  // another page: miss
  // Overwrite: the next delta is against b, with b's seq.
  ASSERT_TRUE(c.Insert(5, b.data(), 200, false));
  const Page d = Variant(b, 2);
  ASSERT_TRUE(c.EncodeDelta(5, d.data(), out.data(), out.size(), &len, &base));
  EXPECT_EQ(base, 200u);
  out.resize(len);
  EXPECT_EQ(Apply(b, out), d);
  // Unchanged page: a (3-byte no-op) delta.
  out.resize(kPage);
  ASSERT_TRUE(c.EncodeDelta(5, b.data(), out.data(), out.size(), &len, &base));
  EXPECT_EQ(len, 3u);
  // Too big for the limit: an overflow, not a hit.
  const Page r = RandomPage(rng);
  EXPECT_FALSE(c.EncodeDelta(5, r.data(), out.data(), 1024, &len, &base));
  auto st = c.stats();
  EXPECT_EQ(st.hits, 3u);
  EXPECT_EQ(st.misses, 2u);
  EXPECT_EQ(st.encode_overflows, 1u);
  EXPECT_EQ(st.inserts, 2u);
  EXPECT_EQ(st.used_pages, 1u);
  EXPECT_EQ(st.evictions, 0u);
}

bool Cached(DeltaCache& c, uint64_t gfn, const Page& p) {
  Bytes out(kPage);
  size_t len;
  uint64_t base;
  return c.EncodeDelta(gfn, p.data(), out.data(), out.size(), &len, &base);
}

TEST(DeltaCache, EvictsOnlyWhenAllowed) {
  Page p(kPage, 3);
  DeltaCache c(2 * kPage, 100, /*shards=*/1);
  ASSERT_TRUE(c.Insert(1, p.data(), 1, false));
  ASSERT_TRUE(c.Insert(2, p.data(), 2, false));
  EXPECT_FALSE(c.Insert(3, p.data(), 3, false));  // full, no eviction allowed
  EXPECT_TRUE(c.Insert(1, p.data(), 4, false));   // an existing entry is always overwritten
  auto st = c.stats();
  EXPECT_EQ(st.refused, 1u);
  EXPECT_EQ(st.evictions, 0u);
  EXPECT_EQ(st.used_pages, 2u);
  EXPECT_TRUE(c.Insert(3, p.data(), 5, true));
  st = c.stats();
  EXPECT_EQ(st.evictions, 1u);
  EXPECT_EQ(st.used_pages, 2u);
  EXPECT_TRUE(Cached(c, 3, p));
  EXPECT_NE(Cached(c, 1, p), Cached(c, 2, p));  // exactly one of them went
}

TEST(DeltaCache, ClockKeepsRecentlyHitPages) {
  Page p(kPage, 3);
  DeltaCache c(3 * kPage, 1000, /*shards=*/1);
  for (uint64_t g = 1; g <= 3; ++g) ASSERT_TRUE(c.Insert(g, p.data(), g, false));
  ASSERT_TRUE(Cached(c, 2, p));  // sets 2's reference bit
  ASSERT_TRUE(c.Insert(4, p.data(), 4, true));  // hand at 1: unreferenced, evicted
  ASSERT_TRUE(c.Insert(5, p.data(), 5, true));  // hand at 2: second chance; 3 evicted
  EXPECT_FALSE(Cached(c, 1, p));
  EXPECT_FALSE(Cached(c, 3, p));
  EXPECT_TRUE(Cached(c, 2, p));
  // A page that keeps being hit survives a long stream of pages sent once.
  for (uint64_t g = 10; g < 200; ++g) {
    ASSERT_TRUE(c.Insert(g, p.data(), g, true));
    ASSERT_TRUE(Cached(c, 2, p)) << "evicted at insert of " << g;
  }
  EXPECT_EQ(c.stats().evictions, 2u + 190u);
}

TEST(DeltaCache, EraseFreesTheSlot) {
  Page p(kPage, 3);
  DeltaCache c(1 * kPage, 100);
  ASSERT_TRUE(c.Insert(7, p.data(), 1, false));
  c.Erase(7);
  c.Erase(7);  // twice: no-op
  c.Erase(8);  // never cached: no-op
  EXPECT_FALSE(Cached(c, 7, p));
  EXPECT_EQ(c.stats().used_pages, 0u);
  EXPECT_TRUE(c.Insert(8, p.data(), 2, false));  // the freed slot, no eviction needed
  EXPECT_EQ(c.stats().evictions, 0u);
  EXPECT_TRUE(Cached(c, 8, p));
}

TEST(DeltaCache, GfnBoundsAndCapacityClamp) {
  Page p(kPage, 3);
  DeltaCache c(1u << 20, 10);  // 256 pages asked, 10 pages of RAM
  EXPECT_EQ(c.stats().capacity_pages, 10u);
  EXPECT_FALSE(c.Insert(10, p.data(), 1, true));
  EXPECT_FALSE(c.Insert(UINT64_MAX, p.data(), 1, true));
  EXPECT_FALSE(Cached(c, 10, p));
  c.Erase(10);
  c.Erase(UINT64_MAX);
  auto st = c.stats();
  EXPECT_EQ(st.misses + st.inserts + st.refused, 0u);  // out of range is not counted
  // Every in-range page fits.
  for (uint64_t g = 0; g < 10; ++g) ASSERT_TRUE(c.Insert(g, p.data(), g, true));
  for (uint64_t g = 0; g < 10; ++g) EXPECT_TRUE(Cached(c, g, p));
  EXPECT_EQ(c.stats().evictions, 0u);
}

TEST(DeltaCache, ShardsShareTheCapacity) {
  Page p(kPage, 3);
  DeltaCache c(1000 * kPage, 1u << 20);  // 64 shards of 15-16 slots
  for (uint64_t g = 0; g < 50000; g += 3) ASSERT_TRUE(c.Insert(g, p.data(), g, true));
  auto st = c.stats();
  EXPECT_EQ(st.used_pages, 1000u);
  EXPECT_EQ(st.inserts, st.used_pages + st.evictions);
}

TEST(DeltaCache, RangesAndStridesSpreadOverShards) {
  Page p(kPage, 3);
  {
    // An aligned contiguous range as large as the cache fits without a single eviction.
    DeltaCache c(1024 * kPage, 1u << 20);  // 64 shards x 16 slots
    for (uint64_t g = 64 * 1000; g < 64 * 1000 + 1024; ++g) ASSERT_TRUE(c.Insert(g, p.data(), 1, false)) << g;
    EXPECT_EQ(c.stats().used_pages, 1024u);
  }
  for (uint64_t stride : {64u, 256u, 4096u}) {
    // Half the cache's worth of pages at a power-of-two stride: almost all fit.
    DeltaCache c(1024 * kPage, 1u << 24);
    for (uint64_t k = 0; k < 512; ++k) c.Insert(k * stride, p.data(), 1, false);
    EXPECT_GE(c.stats().used_pages, 480u) << "stride " << stride;
  }
  {
    // A cache that covers all of RAM (of any size) holds every page.
    DeltaCache c(1000 * kPage, 1000);
    for (uint64_t g = 0; g < 1000; ++g) ASSERT_TRUE(c.Insert(g, p.data(), 1, false)) << g;
  }
}

// Deterministic contents of page gfn as sent with sequence number seq: a per-gfn base with a few
// seq-dependent words (so most deltas are small), every 11th version fully random (overflows).
void Contents(uint64_t gfn, uint64_t seq, uint8_t* out) {
  std::mt19937_64 base(gfn * 2654435761u + 1);
  for (size_t i = 0; i < kPage; i += 8) {
    uint64_t v = base();
    std::memcpy(out + i, &v, 8);
  }
  std::mt19937_64 edit(gfn * 1000003u ^ seq * 0x9e3779b97f4a7c15ull);
  if (seq % 11 == 0) {
    for (size_t i = 0; i < kPage; i += 8) {
      uint64_t v = edit();
      std::memcpy(out + i, &v, 8);
    }
    return;
  }
  for (int k = 0; k < 4; ++k) {
    uint64_t v = edit();
    std::memcpy(out + (edit() % (kPage / 8)) * 8, &v, 8);
  }
}

TEST(DeltaCache, MultiThreadStress) {
  constexpr int kThreads = 4;
  constexpr uint64_t kGfns = 2048;
  constexpr int kPhases = 8;
  constexpr int kOpsPerPhase = 6000;
  DeltaCache cache(256 * kPage, kGfns, 16);  // far fewer slots than pages: constant eviction
  std::vector<uint64_t> model(kGfns, 0);     // last seq inserted and not erased; 0 = none
  std::atomic<uint64_t> next_seq{1}, verified{0}, calls{0};
  std::atomic<bool> failed{false};
  std::barrier sync(kThreads);
  auto worker = [&](int t) {
    std::mt19937_64 rng(100 + t);
    Page page(kPage), base(kPage), scratch(kPage);
    Bytes out(kPage);
    for (int phase = 0; phase < kPhases; ++phase) {
      // This phase's gfns of thread t: a disjoint share, different in every phase.
      auto pick = [&] {
        uint64_t g = rng() % (kGfns / kThreads) * kThreads;
        return g + static_cast<uint64_t>((t + phase) % kThreads);
      };
      for (int op = 0; op < kOpsPerPhase && !failed; ++op) {
        const uint64_t gfn = pick();
        const unsigned what = rng() % 16;
        if (what == 0) {
          cache.Erase(gfn);
          model[gfn] = 0;
          continue;
        }
        const uint64_t seq = next_seq.fetch_add(1);
        Contents(gfn, seq, page.data());
        size_t len = 0;
        uint64_t base_seq = 0;
        calls.fetch_add(1, std::memory_order_relaxed);
        const size_t limit = 512 + rng() % 3000;
        if (cache.EncodeDelta(gfn, page.data(), out.data(), limit, &len, &base_seq)) {
          if (model[gfn] == 0 || base_seq != model[gfn] || len == 0 || len > limit) {
            ADD_FAILURE() << "gfn " << gfn << ": hit with base " << base_seq << ", model " << model[gfn] << ", len "
                          << len;
            failed = true;
            break;
          }
          Contents(gfn, base_seq, base.data());
          auto s = XbzrleDecode(std::span<const uint8_t>(out.data(), len), base.data());
          if (!s || base != page) {
            ADD_FAILURE() << "gfn " << gfn << ": delta against seq " << base_seq << " does not give seq " << seq;
            failed = true;
            break;
          }
          verified.fetch_add(1, std::memory_order_relaxed);
        }
        if (cache.Insert(gfn, page.data(), seq, what % 4 != 1))
          model[gfn] = seq;
        else
          model[gfn] = 0;
      }
      sync.arrive_and_wait();  // hand the gfns over: the next phase shifts the ownership
    }
  };
  std::vector<std::thread> ts;
  for (int t = 0; t < kThreads; ++t) ts.emplace_back(worker, t);
  for (auto& th : ts) th.join();
  ASSERT_FALSE(failed);
  auto st = cache.stats();
  EXPECT_EQ(st.hits, verified.load());
  EXPECT_EQ(st.hits + st.misses + st.encode_overflows, calls.load());
  EXPECT_GT(st.hits, 1000u);
  EXPECT_GT(st.evictions, 1000u);
  EXPECT_GT(st.encode_overflows, 100u);
  EXPECT_LE(st.used_pages, 256u);
  std::printf("[ info ] stress: %llu encodes, %llu verified hits, %llu misses, %llu overflows, %llu evictions\n",
              static_cast<unsigned long long>(calls.load()), static_cast<unsigned long long>(st.hits),
              static_cast<unsigned long long>(st.misses), static_cast<unsigned long long>(st.encode_overflows),
              static_cast<unsigned long long>(st.evictions));
}

}  // namespace
}  // namespace ferry::migration
