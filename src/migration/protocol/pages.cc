#include "migration/protocol/pages.h"

#include <cstring>

#include "common/state_io.h"

namespace ferry::migration {
namespace {

constexpr int kKindShift = 60;
constexpr uint64_t kReservedHeadBits = 0xffull << 52;

uint64_t Head(uint64_t gfn, PageKind kind) { return (gfn & kGfnMask) | (uint64_t{static_cast<uint8_t>(kind)} << kKindShift); }

#define FERRY_PAGES_GET(lhs, expr, what)                                        \
  do {                                                                          \
    auto ferry_v_ = (expr);                                                     \
    if (!ferry_v_) return std::unexpected(ferry_v_.error().WithContext(what));  \
    lhs = *ferry_v_;                                                            \
  } while (0)

uint64_t CapFor(PageKind k) {
  switch (k) {
    case PageKind::kZeroRun: return kCapZeroRuns;
    case PageKind::kDelta: return kCapDelta;
    case PageKind::kFreeRun: return kCapFreePages;
    default: return 0;
  }
}

uint64_t CapFor(Compression c) {
  switch (c) {
    case Compression::kLz4: return kCapLz4;
    case Compression::kZstd: return kCapZstd;
    default: return 0;
  }
}

}  // namespace

std::string_view PageKindName(PageKind k) {
  switch (k) {
    case PageKind::kZero: return "ZERO";
    case PageKind::kRaw: return "RAW";
    case PageKind::kZeroRun: return "ZERO_RUN";
    case PageKind::kDelta: return "DELTA";
    case PageKind::kFreeRun: return "FREE_RUN";
  }
  return "?";
}

// ---------------------------------------------------------------- PAGES

void PagesBuilder::Reset(uint64_t seq) {
  buf_.resize(kRecordHeaderSize + 16);
  StoreLe<uint64_t>(buf_.data() + kRecordHeaderSize, seq);
  StoreLe<uint32_t>(buf_.data() + kRecordHeaderSize + 8, 0);
  StoreLe<uint32_t>(buf_.data() + kRecordHeaderSize + 12, 0);
  count_ = 0;
}

void PagesBuilder::AddZero(uint64_t gfn) {
  const size_t at = buf_.size();
  buf_.resize(at + 8);
  StoreLe<uint64_t>(buf_.data() + at, Head(gfn, PageKind::kZero));
  ++count_;
}

void PagesBuilder::AddRaw(uint64_t gfn, const uint8_t* page) {
  const size_t at = buf_.size();
  buf_.resize(at + 8 + kWirePageSize);
  StoreLe<uint64_t>(buf_.data() + at, Head(gfn, PageKind::kRaw));
  std::memcpy(buf_.data() + at + 8, page, kWirePageSize);
  ++count_;
}

std::span<const uint8_t> PagesBuilder::Finish() {
  StoreLe<uint32_t>(buf_.data() + kRecordHeaderSize + 8, count_);
  SealRecord(RecordType::kPages, &buf_);
  return buf_;
}

Result<PagesView> DecodePages(std::span<const uint8_t> p, uint64_t ram_pages) {
  StateReader r(p);
  PagesView v;
  uint32_t count, reserved;
  FERRY_PAGES_GET(v.seq, r.GetU64(), "PAGES");
  FERRY_PAGES_GET(count, r.GetU32(), "PAGES");
  FERRY_PAGES_GET(reserved, r.GetU32(), "PAGES");
  if (reserved != 0) return Errorf(ErrorCode::kCorrupt, "PAGES: reserved field is {:#x}", reserved);
  if (count == 0 || count > kMaxPagesPerRecord)
    return Errorf(ErrorCode::kCorrupt, "PAGES: {} entries (allowed 1..{})", count, kMaxPagesPerRecord);
  v.entries.reserve(count);
  for (uint32_t i = 0; i < count; ++i) {
    uint64_t word;
    FERRY_PAGES_GET(word, r.GetU64(), fmt::format("PAGES entry {}", i));
    const uint64_t gfn = word & kGfnMask;
    const uint64_t kind = word >> kKindShift;
    if (word & kReservedHeadBits) return Errorf(ErrorCode::kCorrupt, "PAGES entry {}: reserved bits set", i);
    if (gfn >= ram_pages)
      return Errorf(ErrorCode::kCorrupt, "PAGES entry {}: page {} is outside guest RAM ({} pages)", i, gfn, ram_pages);
    if (kind == static_cast<uint64_t>(PageKind::kZero)) {
      v.entries.push_back({gfn, PageKind::kZero, 1, 0, {}});
    } else if (kind == static_cast<uint64_t>(PageKind::kRaw)) {
      std::span<const uint8_t> data;
      FERRY_PAGES_GET(data, r.GetRaw(kWirePageSize), fmt::format("PAGES entry {} (page {})", i, gfn));
      v.entries.push_back({gfn, PageKind::kRaw, 1, 0, data});
    } else {
      return Errorf(ErrorCode::kCorrupt, "PAGES entry {}: page kind {} is not allowed in PAGES", i, kind);
    }
  }
  if (r.remaining() != 0) return Errorf(ErrorCode::kCorrupt, "PAGES: {} trailing bytes", r.remaining());
  v.pages = count;
  return v;
}

// ---------------------------------------------------------------- ENCODED_PAGES

void EncodedPagesBuilder::Reset(uint64_t seq, bool zero_runs) {
  buf_.resize(kRecordHeaderSize + kEncodedPagesPrefix);
  seq_ = seq;
  entries_ = 0;
  pages_ = 0;
  zero_runs_ = zero_runs;
  zero_at_ = SIZE_MAX;
}

void EncodedPagesBuilder::PutHead(uint64_t gfn, PageKind kind) {
  const size_t at = buf_.size();
  buf_.resize(at + 8);
  StoreLe<uint64_t>(buf_.data() + at, Head(gfn, kind));
  ++entries_;
}

void EncodedPagesBuilder::AddZero(uint64_t gfn) { AddZeroRun(gfn, 1); }

void EncodedPagesBuilder::AddZeroRun(uint64_t gfn, uint32_t count) {
  if (zero_runs_ && zero_at_ != SIZE_MAX && zero_gfn_ + zero_count_ == gfn && count <= UINT32_MAX - zero_count_) {
    // Extend the previous zero entry: a ZERO becomes a ZERO_RUN, a run grows.
    if (zero_count_ == 1) {
      StoreLe<uint64_t>(buf_.data() + zero_at_, Head(zero_gfn_, PageKind::kZeroRun));
      buf_.resize(buf_.size() + 4);
    }
    zero_count_ += count;
    StoreLe<uint32_t>(buf_.data() + zero_at_ + 8, zero_count_);
    pages_ += count;
    return;
  }
  zero_at_ = buf_.size();
  zero_gfn_ = gfn;
  zero_count_ = count;
  if (count == 1 || !zero_runs_) {
    // Without runs a multi-page zero range is one ZERO entry per page.
    for (uint32_t i = 0; i < count; ++i) PutHead(gfn + i, PageKind::kZero);
    if (!zero_runs_) zero_at_ = SIZE_MAX;
  } else {
    PutHead(gfn, PageKind::kZeroRun);
    const size_t at = buf_.size();
    buf_.resize(at + 4);
    StoreLe<uint32_t>(buf_.data() + at, count);
  }
  pages_ += count;
}

void EncodedPagesBuilder::AddFreeRun(uint64_t gfn, uint32_t count) {
  zero_at_ = SIZE_MAX;
  PutHead(gfn, PageKind::kFreeRun);
  const size_t at = buf_.size();
  buf_.resize(at + 4);
  StoreLe<uint32_t>(buf_.data() + at, count);
  pages_ += count;
}

void EncodedPagesBuilder::AddRaw(uint64_t gfn, const uint8_t* page) {
  zero_at_ = SIZE_MAX;
  PutHead(gfn, PageKind::kRaw);
  const size_t at = buf_.size();
  buf_.resize(at + kWirePageSize);
  std::memcpy(buf_.data() + at, page, kWirePageSize);
  ++pages_;
}

void EncodedPagesBuilder::AddDelta(uint64_t gfn, uint64_t base_seq, std::span<const uint8_t> delta) {
  zero_at_ = SIZE_MAX;
  PutHead(gfn, PageKind::kDelta);
  const size_t at = buf_.size();
  buf_.resize(at + 10 + delta.size());
  StoreLe<uint64_t>(buf_.data() + at, base_seq);
  StoreLe<uint16_t>(buf_.data() + at + 8, static_cast<uint16_t>(delta.size()));
  std::memcpy(buf_.data() + at + 10, delta.data(), delta.size());
  ++pages_;
}

std::span<const uint8_t> EncodedPagesBuilder::body() const {
  return std::span<const uint8_t>(buf_).subspan(kRecordHeaderSize + kEncodedPagesPrefix);
}

std::span<const uint8_t> EncodedPagesBuilder::Finish(Compression codec, std::span<const uint8_t> compressed) {
  const uint32_t body_len = static_cast<uint32_t>(buf_.size() - kRecordHeaderSize - kEncodedPagesPrefix);
  auto prefix = [&](uint8_t* p) {
    StoreLe<uint64_t>(p, seq_);
    StoreLe<uint32_t>(p + 8, entries_);
    p[12] = static_cast<uint8_t>(codec);
    p[13] = p[14] = p[15] = 0;
    StoreLe<uint32_t>(p + 16, body_len);
  };
  if (codec == Compression::kNone) {
    prefix(buf_.data() + kRecordHeaderSize);
    SealRecord(RecordType::kEncodedPages, &buf_);
    return buf_;
  }
  out_.resize(kRecordHeaderSize + kEncodedPagesPrefix + compressed.size());
  prefix(out_.data() + kRecordHeaderSize);
  std::memcpy(out_.data() + kRecordHeaderSize + kEncodedPagesPrefix, compressed.data(), compressed.size());
  SealRecord(RecordType::kEncodedPages, &out_);
  return out_;
}

Result<PagesView> DecodeEncodedPages(std::span<const uint8_t> p, uint64_t ram_pages, uint64_t caps, Decompressor& dec,
                                     std::vector<uint8_t>* scratch) {
  if (p.size() < kEncodedPagesPrefix)
    return Errorf(ErrorCode::kCorrupt, "ENCODED_PAGES: {} bytes, shorter than its {}-byte prefix", p.size(), kEncodedPagesPrefix);
  PagesView v;
  v.seq = LoadLe<uint64_t>(p.data());
  const uint32_t count = LoadLe<uint32_t>(p.data() + 8);
  const uint8_t codec = p[12];
  const uint32_t body_len = LoadLe<uint32_t>(p.data() + 16);
  if (p[13] | p[14] | p[15]) return Errorf(ErrorCode::kCorrupt, "ENCODED_PAGES: reserved bytes are not zero");
  if (count == 0 || count > kMaxEncodedEntries)
    return Errorf(ErrorCode::kCorrupt, "ENCODED_PAGES: {} entries (allowed 1..{})", count, kMaxEncodedEntries);
  if (body_len == 0 || body_len > kMaxEncodedBody)
    return Errorf(ErrorCode::kCorrupt, "ENCODED_PAGES: body of {} bytes (allowed 1..{})", body_len, kMaxEncodedBody);
  if (codec > static_cast<uint8_t>(Compression::kZstd))
    return Errorf(ErrorCode::kCorrupt, "ENCODED_PAGES: unknown codec {}", codec);
  v.codec = static_cast<Compression>(codec);
  if (v.codec != Compression::kNone && !(caps & CapFor(v.codec)))
    return Errorf(ErrorCode::kCorrupt, "ENCODED_PAGES: codec {} was not negotiated", CompressionName(v.codec));
  std::span<const uint8_t> body = p.subspan(kEncodedPagesPrefix);
  if (v.codec == Compression::kNone) {
    if (body.size() != body_len)
      return Errorf(ErrorCode::kCorrupt, "ENCODED_PAGES: body of {} bytes, the prefix says {}", body.size(), body_len);
  } else {
    auto s = dec.Decompress(v.codec, body, body_len, scratch);
    if (!s) return std::unexpected(s.error().WithContext(fmt::format("ENCODED_PAGES ({} body)", CompressionName(v.codec))));
    body = *scratch;
  }

  StateReader r(body);
  v.entries.reserve(count);
  for (uint32_t i = 0; i < count; ++i) {
    uint64_t word;
    FERRY_PAGES_GET(word, r.GetU64(), fmt::format("ENCODED_PAGES entry {}", i));
    const uint64_t gfn = word & kGfnMask;
    const uint64_t kind_bits = word >> kKindShift;
    if (word & kReservedHeadBits) return Errorf(ErrorCode::kCorrupt, "ENCODED_PAGES entry {}: reserved bits set", i);
    if (kind_bits > static_cast<uint64_t>(PageKind::kFreeRun))
      return Errorf(ErrorCode::kCorrupt, "ENCODED_PAGES entry {}: unknown page kind {}", i, kind_bits);
    const PageKind kind = static_cast<PageKind>(kind_bits);
    if (CapFor(kind) && !(caps & CapFor(kind)))
      return Errorf(ErrorCode::kCorrupt, "ENCODED_PAGES entry {}: {} was not negotiated", i, PageKindName(kind));
    if (gfn >= ram_pages)
      return Errorf(ErrorCode::kCorrupt, "ENCODED_PAGES entry {}: page {} is outside guest RAM ({} pages)", i, gfn, ram_pages);
    PageEntry e{gfn, kind, 1, 0, {}};
    const std::string what = fmt::format("ENCODED_PAGES entry {} ({} page {})", i, PageKindName(kind), gfn);
    switch (kind) {
      case PageKind::kZero: break;
      case PageKind::kRaw: FERRY_PAGES_GET(e.data, r.GetRaw(kWirePageSize), what); break;
      case PageKind::kZeroRun:
      case PageKind::kFreeRun:
        FERRY_PAGES_GET(e.count, r.GetU32(), what);
        if (e.count == 0 || e.count > ram_pages - gfn)
          return Errorf(ErrorCode::kCorrupt, "{}: run of {} pages does not fit in guest RAM ({} pages)", what, e.count, ram_pages);
        break;
      case PageKind::kDelta: {
        uint16_t len;
        FERRY_PAGES_GET(e.base_seq, r.GetU64(), what);
        FERRY_PAGES_GET(len, r.GetU16(), what);
        if (len == 0 || len > kMaxDeltaBytes)
          return Errorf(ErrorCode::kCorrupt, "{}: delta of {} bytes (allowed 1..{})", what, len, kMaxDeltaBytes);
        if (e.base_seq >= v.seq)
          return Errorf(ErrorCode::kCorrupt, "{}: base seq {} is not older than the record's seq {}", what, e.base_seq, v.seq);
        FERRY_PAGES_GET(e.data, r.GetRaw(len), what);
        break;
      }
    }
    v.pages += e.count;
    if (v.pages > ram_pages)
      return Errorf(ErrorCode::kCorrupt, "ENCODED_PAGES: entries cover more than the {} pages of guest RAM", ram_pages);
    v.entries.push_back(e);
  }
  if (r.remaining() != 0) return Errorf(ErrorCode::kCorrupt, "ENCODED_PAGES: {} trailing bytes after {} entries", r.remaining(), count);
  return v;
}

}  // namespace ferry::migration
