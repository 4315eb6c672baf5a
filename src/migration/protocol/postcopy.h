// Post-copy records of the migration protocol (docs/protocol.md, "Post-copy"), version 2 with
// kCapPostcopy:
//   POSTCOPY       source -> destination, after the last pre-copy page record and before STATE:
//                  the pages the destination does not hold yet (a bitmap over guest RAM). The
//                  destination drops its copies of them and runs the guest without them.
//   PAGE_REQUEST   destination -> source: the guest touched pages [gfn, gfn + count) that have
//                  not arrived; the source sends them on the control connection at once.
//   POSTCOPY_END   source -> destination: every missing page was sent; how many page records
//                  and pages the whole migration sent (both connections).
//   POSTCOPY_DONE  destination -> source: every page is in place; fault statistics.
// Strict, bounded decoders (reject tests in postcopy_test.cc). Pure functions; no I/O.
#pragma once

#include <cstdint>
#include <span>
#include <vector>

#include "common/error.h"
#include "migration/protocol/wire.h"

namespace ferry::migration {

inline constexpr uint32_t kMaxRequestPages = 256;

struct PostcopyStart {
  uint64_t ram_pages = 0;
  uint64_t missing_pages = 0;          // bits set in `missing`
  std::vector<uint64_t> missing;       // bit p of word p / 64: page p is missing
};
std::vector<uint8_t> Encode(const PostcopyStart& m);
// ram_pages must match the migration's RAM; the bitmap must be exactly that long, have no bit
// past the last page and as many bits as it claims.
Result<PostcopyStart> DecodePostcopyStart(std::span<const uint8_t> p, uint64_t ram_pages);

struct PageRequest {
  uint64_t gfn = 0;
  uint32_t count = 1;
};
std::vector<uint8_t> Encode(const PageRequest& m);
Result<PageRequest> DecodePageRequest(std::span<const uint8_t> p, uint64_t ram_pages);

// POSTCOPY_END carries End (wire.h): page records and pages of the whole migration.

struct PostcopyDone {
  uint64_t demand_faults = 0;    // faults that needed a page from the source
  uint64_t local_faults = 0;     // faults on pages known to be zero (resolved without the source)
  uint64_t p50_us = 0, p99_us = 0, max_us = 0;  // demand fault -> page in place
  uint64_t duplicate_pages = 0;  // pages that arrived again after they were placed (dropped)
};
std::vector<uint8_t> Encode(const PostcopyDone& m);
Result<PostcopyDone> DecodePostcopyDone(std::span<const uint8_t> p);

}  // namespace ferry::migration
