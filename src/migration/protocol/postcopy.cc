#include "migration/protocol/postcopy.h"

#include "common/state_io.h"

namespace ferry::migration {
namespace {

Status Finish(const StateReader& r, std::string_view what) {
  if (r.remaining() != 0) return Errorf(ErrorCode::kCorrupt, "{}: {} trailing bytes", what, r.remaining());
  return {};
}

template <typename T>
Result<T> Get(Result<T> v, std::string_view what) {
  if (!v) return std::unexpected(v.error().WithContext(what));
  return v;
}

}  // namespace

std::vector<uint8_t> Encode(const PostcopyStart& m) {
  StateWriter w;
  w.PutU64(m.ram_pages);
  w.PutU64(m.missing_pages);
  for (uint64_t word : m.missing) w.PutU64(word);
  return w.Take();
}

Result<PostcopyStart> DecodePostcopyStart(std::span<const uint8_t> p, uint64_t ram_pages) {
  StateReader r(p);
  PostcopyStart m;
  auto pages = Get(r.GetU64(), "POSTCOPY");
  if (!pages) return std::unexpected(pages.error());
  auto count = Get(r.GetU64(), "POSTCOPY");
  if (!count) return std::unexpected(count.error());
  m.ram_pages = *pages;
  m.missing_pages = *count;
  if (m.ram_pages != ram_pages)
    return Errorf(ErrorCode::kCorrupt, "POSTCOPY: bitmap of {} pages for a RAM of {} pages", m.ram_pages, ram_pages);
  const uint64_t words = (ram_pages + 63) / 64;
  if (r.remaining() != words * 8)
    return Errorf(ErrorCode::kCorrupt, "POSTCOPY: bitmap of {} bytes, expected {}", r.remaining(), words * 8);
  m.missing.resize(words);
  uint64_t bits = 0;
  for (uint64_t i = 0; i < words; ++i) {
    auto w = Get(r.GetU64(), "POSTCOPY");
    if (!w) return std::unexpected(w.error());
    m.missing[i] = *w;
    bits += static_cast<uint64_t>(__builtin_popcountll(*w));
  }
  if (ram_pages % 64 && words && (m.missing[words - 1] >> (ram_pages % 64)))
    return Errorf(ErrorCode::kCorrupt, "POSTCOPY: pages past the end of RAM marked missing");
  if (bits != m.missing_pages)
    return Errorf(ErrorCode::kCorrupt, "POSTCOPY: {} pages marked missing, the record says {}", bits, m.missing_pages);
  FERRY_RETURN_IF_ERROR(Finish(r, "POSTCOPY"), "decode");
  return m;
}

std::vector<uint8_t> Encode(const PageRequest& m) {
  StateWriter w;
  w.PutU64(m.gfn);
  w.PutU32(m.count);
  return w.Take();
}

Result<PageRequest> DecodePageRequest(std::span<const uint8_t> p, uint64_t ram_pages) {
  StateReader r(p);
  auto gfn = Get(r.GetU64(), "PAGE_REQUEST");
  if (!gfn) return std::unexpected(gfn.error());
  auto count = Get(r.GetU32(), "PAGE_REQUEST");
  if (!count) return std::unexpected(count.error());
  FERRY_RETURN_IF_ERROR(Finish(r, "PAGE_REQUEST"), "decode");
  if (*count == 0 || *count > kMaxRequestPages)
    return Errorf(ErrorCode::kCorrupt, "PAGE_REQUEST for {} pages (1..{})", *count, kMaxRequestPages);
  if (*gfn >= ram_pages || *count > ram_pages - *gfn)
    return Errorf(ErrorCode::kCorrupt, "PAGE_REQUEST for pages {}..{} outside RAM of {} pages", *gfn, *gfn + *count, ram_pages);
  return PageRequest{*gfn, *count};
}

std::vector<uint8_t> Encode(const PostcopyDone& m) {
  StateWriter w;
  for (uint64_t v : {m.demand_faults, m.local_faults, m.p50_us, m.p99_us, m.max_us, m.duplicate_pages}) w.PutU64(v);
  return w.Take();
}

Result<PostcopyDone> DecodePostcopyDone(std::span<const uint8_t> p) {
  StateReader r(p);
  PostcopyDone m;
  for (uint64_t* v : {&m.demand_faults, &m.local_faults, &m.p50_us, &m.p99_us, &m.max_us, &m.duplicate_pages}) {
    auto x = Get(r.GetU64(), "POSTCOPY_DONE");
    if (!x) return std::unexpected(x.error());
    *v = *x;
  }
  FERRY_RETURN_IF_ERROR(Finish(r, "POSTCOPY_DONE"), "decode");
  if (m.p50_us > m.p99_us || m.p99_us > m.max_us)
    return Errorf(ErrorCode::kCorrupt, "POSTCOPY_DONE: latency percentiles out of order ({} > {} > {} us)", m.p50_us, m.p99_us, m.max_us);
  return m;
}

}  // namespace ferry::migration
