#include "migration/protocol/postcopy.h"

#include "common/state_io.h"
#include "migration/protocol/decode_util.h"

namespace ferry::migration {

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
  FERRY_WIRE_GET(m.ram_pages, r.GetU64(), "POSTCOPY");
  FERRY_WIRE_GET(m.missing_pages, r.GetU64(), "POSTCOPY");
  if (m.ram_pages != ram_pages)
    return Errorf(ErrorCode::kCorrupt, "POSTCOPY: bitmap of {} pages for a RAM of {} pages", m.ram_pages, ram_pages);
  const uint64_t words = (ram_pages + 63) / 64;
  if (r.remaining() != words * 8)
    return Errorf(ErrorCode::kCorrupt, "POSTCOPY: bitmap of {} bytes, expected {}", r.remaining(), words * 8);
  m.missing.resize(words);
  uint64_t bits = 0;
  for (uint64_t i = 0; i < words; ++i) {
    FERRY_WIRE_GET(m.missing[i], r.GetU64(), "POSTCOPY");
    bits += static_cast<uint64_t>(__builtin_popcountll(m.missing[i]));
  }
  if (ram_pages % 64 && words && (m.missing[words - 1] >> (ram_pages % 64)))
    return Errorf(ErrorCode::kCorrupt, "POSTCOPY: pages past the end of RAM marked missing");
  if (bits != m.missing_pages)
    return Errorf(ErrorCode::kCorrupt, "POSTCOPY: {} pages marked missing, the record says {}", bits, m.missing_pages);
  FERRY_RETURN_IF_ERROR(detail::FinishPayload(r, "POSTCOPY"), "decode");
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
  PageRequest m;
  FERRY_WIRE_GET(m.gfn, r.GetU64(), "PAGE_REQUEST");
  FERRY_WIRE_GET(m.count, r.GetU32(), "PAGE_REQUEST");
  FERRY_RETURN_IF_ERROR(detail::FinishPayload(r, "PAGE_REQUEST"), "decode");
  if (m.count == 0 || m.count > kMaxRequestPages)
    return Errorf(ErrorCode::kCorrupt, "PAGE_REQUEST for {} pages (1..{})", m.count, kMaxRequestPages);
  if (m.gfn >= ram_pages || m.count > ram_pages - m.gfn)
    return Errorf(ErrorCode::kCorrupt, "PAGE_REQUEST for pages {}..{} outside RAM of {} pages", m.gfn, m.gfn + m.count, ram_pages);
  return m;
}

std::vector<uint8_t> Encode(const PostcopyDone& m) {
  StateWriter w;
  for (uint64_t v : {m.demand_faults, m.local_faults, m.p50_us, m.p99_us, m.max_us, m.duplicate_pages}) w.PutU64(v);
  return w.Take();
}

Result<PostcopyDone> DecodePostcopyDone(std::span<const uint8_t> p) {
  StateReader r(p);
  PostcopyDone m;
  for (uint64_t* v : {&m.demand_faults, &m.local_faults, &m.p50_us, &m.p99_us, &m.max_us, &m.duplicate_pages})
    FERRY_WIRE_GET(*v, r.GetU64(), "POSTCOPY_DONE");
  FERRY_RETURN_IF_ERROR(detail::FinishPayload(r, "POSTCOPY_DONE"), "decode");
  if (m.p50_us > m.p99_us || m.p99_us > m.max_us)
    return Errorf(ErrorCode::kCorrupt, "POSTCOPY_DONE: latency percentiles out of order ({} > {} > {} us)", m.p50_us, m.p99_us, m.max_us);
  return m;
}

}  // namespace ferry::migration
