// Page records of the migration protocol (docs/protocol.md, "Page records"):
//   PAGES          (versions 1 and 2) zero and raw entries, at most 64 per record;
//   ENCODED_PAGES  (version 2) zero/raw entries plus zero runs, XBZRLE deltas and free runs,
//                  the entry body optionally lz4- or zstd-compressed as a whole.
// Builders for the source and strict, bounded decoders for the destination: every length,
// count, kind, codec and page number is checked before use; an entry kind or codec that was
// not negotiated is rejected; a compressed body may never inflate beyond the declared size
// (which is itself bounded), so a decompression bomb costs at most kMaxEncodedBody bytes.
// Reject tests for every malformed form: pages_test.cc.
//
// Pure functions and per-thread objects (a builder or a Decompressor per thread); no I/O.
#pragma once

#include <cstdint>
#include <span>
#include <vector>

#include "common/compress.h"
#include "common/error.h"
#include "migration/protocol/wire.h"

namespace ferry::migration {

enum class PageKind : uint8_t { kZero = 0, kRaw = 1, kZeroRun = 2, kDelta = 3, kFreeRun = 4 };
std::string_view PageKindName(PageKind k);

inline constexpr uint32_t kMaxEncodedEntries = 1024;
inline constexpr uint32_t kMaxEncodedBody = 2u << 20;  // decoded body bytes of one ENCODED_PAGES
inline constexpr size_t kEncodedPagesPrefix = 20;      // seq, entries, codec, reserved, body length
inline constexpr uint32_t kMaxDeltaBytes = kWirePageSize - 1;

// --- PAGES (v1 layout; also valid in version 2) ---
// Builds one PAGES record in place (header space reserved, payload appended).
class PagesBuilder {
 public:
  void Reset(uint64_t seq);
  void AddZero(uint64_t gfn);
  void AddRaw(uint64_t gfn, const uint8_t* page);  // copies kWirePageSize bytes
  uint32_t count() const { return count_; }
  bool full() const { return count_ >= kMaxPagesPerRecord; }
  // Seals and returns the record bytes (valid until the next Reset).
  std::span<const uint8_t> Finish();

 private:
  std::vector<uint8_t> buf_;
  uint32_t count_ = 0;
};

// --- ENCODED_PAGES (version 2) ---
// Builds one ENCODED_PAGES record: entries are appended to an uncompressed body, then Finish
// seals it with the body as is or with a compressed copy of it. Consecutive zero pages are
// merged into a ZERO_RUN when `zero_runs` is allowed.
class EncodedPagesBuilder {
 public:
  void Reset(uint64_t seq, bool zero_runs);
  void AddZero(uint64_t gfn);
  void AddZeroRun(uint64_t gfn, uint32_t count);  // count >= 1 (one ZERO entry per page without runs)
  void AddFreeRun(uint64_t gfn, uint32_t count);  // count >= 1
  void AddRaw(uint64_t gfn, const uint8_t* page);
  void AddDelta(uint64_t gfn, uint64_t base_seq, std::span<const uint8_t> delta);  // 1..kMaxDeltaBytes
  uint32_t entries() const { return entries_; }
  uint64_t pages() const { return pages_; }
  // Bytes an entry of each kind adds (for callers that bound a batch).
  static constexpr size_t kRunEntryBytes = 12, kRawEntryBytes = 8 + kWirePageSize, kDeltaEntryOverhead = 18;
  std::span<const uint8_t> body() const;
  // Seals the record. kNone: the body as built; otherwise `compressed` holds the body compressed
  // with `codec` (the caller checked that it is smaller). Valid until the next Reset.
  std::span<const uint8_t> Finish(Compression codec = Compression::kNone, std::span<const uint8_t> compressed = {});

 private:
  void PutHead(uint64_t gfn, PageKind kind);
  std::vector<uint8_t> buf_;  // record header + prefix + body
  std::vector<uint8_t> out_;  // record header + prefix + compressed body
  uint64_t seq_ = 0;
  uint32_t entries_ = 0;
  uint64_t pages_ = 0;
  bool zero_runs_ = false;
  // The last entry if it is a zero page or zero run (for merging): its offset, first gfn, count.
  size_t zero_at_ = SIZE_MAX;
  uint64_t zero_gfn_ = 0;
  uint32_t zero_count_ = 0;
};

// --- decoded view (both layouts) ---
struct PageEntry {
  uint64_t gfn = 0;
  PageKind kind = PageKind::kZero;
  uint32_t count = 1;             // pages covered (runs), 1 otherwise
  uint64_t base_seq = 0;          // DELTA: the seq of the copy the delta applies to
  std::span<const uint8_t> data;  // RAW: the page; DELTA: the encoded delta; else empty
};
struct PagesView {
  uint64_t seq = 0;
  Compression codec = Compression::kNone;
  uint64_t pages = 0;  // pages covered by all entries
  std::vector<PageEntry> entries;
};
// PAGES. ram_pages bounds every gfn.
Result<PagesView> DecodePages(std::span<const uint8_t> p, uint64_t ram_pages);
// ENCODED_PAGES of a migration that negotiated `caps`. A compressed body is inflated into
// *scratch (entries then point into it). Bounds: entries 1..kMaxEncodedEntries, declared body
// 1..kMaxEncodedBody bytes (checked before inflating), pages of all runs together <= ram_pages.
Result<PagesView> DecodeEncodedPages(std::span<const uint8_t> p, uint64_t ram_pages, uint64_t caps, Decompressor& dec,
                                     std::vector<uint8_t>* scratch);

}  // namespace ferry::migration
