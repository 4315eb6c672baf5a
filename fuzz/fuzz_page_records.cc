// libFuzzer target: page records as a destination decodes and applies them - PAGES (v1) and
// ENCODED_PAGES (v2: zero and free runs, raw pages, XBZRLE deltas, lz4/zstd bodies with their
// declared sizes) - against 1024 pages of RAM, with every capability negotiated.
// Input: byte 0 picks PAGES or ENCODED_PAGES, the rest is the record payload.
// Properties: every decoded entry lies inside RAM, runs together cover at most the RAM, raw data is
// one page, a delta is 1..kMaxDeltaBytes; applying a delta either fully succeeds or leaves the page
// unchanged.
#include <array>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <span>
#include <vector>

#include "common/compress.h"
#include "migration/codec/xbzrle.h"
#include "migration/protocol/pages.h"
#include "migration/protocol/wire.h"

using namespace ferry::migration;

namespace {
constexpr uint64_t kRamPages = 1024;
void Check(bool ok) {
  if (!ok) std::abort();
}
}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  if (size < 1) return 0;
  static ferry::Decompressor dec;
  static std::vector<uint8_t> scratch;
  const std::span<const uint8_t> p(data + 1, size - 1);
  auto v = (data[0] & 1) ? DecodeEncodedPages(p, kRamPages, kCapsSupported, dec, &scratch) : DecodePages(p, kRamPages);
  if (!v) return 0;
  uint64_t covered = 0;
  std::array<uint8_t, kWirePageSize> page, before;
  for (const PageEntry& e : v->entries) {
    Check(e.count >= 1 && e.gfn < kRamPages && e.count <= kRamPages - e.gfn);
    covered += e.count;
    switch (e.kind) {
      case PageKind::kRaw:
        Check(e.data.size() == kWirePageSize && e.count == 1);
        break;
      case PageKind::kDelta: {
        Check(e.data.size() >= 1 && e.data.size() <= kMaxDeltaBytes && e.count == 1);
        for (size_t i = 0; i < page.size(); ++i) page[i] = static_cast<uint8_t>(i * 7 + e.gfn);
        before = page;
        if (!XbzrleDecode(e.data, page.data())) Check(page == before);
        break;
      }
      default:
        Check(e.data.empty());
        break;
    }
  }
  Check(covered == v->pages && covered <= kRamPages);
  return 0;
}
