// The codec stage of a source migration: turns one batch of page runs into one page record.
//   - known-zero and free runs become ZERO_RUN / FREE_RUN entries without reading memory;
//   - scanned pages that read as zero join zero runs;
//   - a page whose last-sent copy is in the delta cache is sent as an XBZRLE delta when that is
//     smaller than the codec would likely make the full page (else in full);
//   - the batch body is compressed with the codec the selector chooses, and sent uncompressed
//     when compression does not make it smaller (never more than raw + the record header).
// Invariant kept with the delta cache: a cached copy of page p is exactly what the destination
// holds for p (every send of p either refreshes or erases p's cache entry). Pages are copied
// once to a private buffer before they are encoded, so what is sent and what is cached are the
// same bytes even while the guest writes the page (that write marks it dirty again).
// Version 1 migrations get PAGES records with zero and raw entries only (at most 64 pages: the
// caller bounds v1 batches).
// Debounce (layering): with a `skip` filter, a page of a scan run that would go as a full page
// (not zero, no delta) is left out of the record if the filter returns true at that moment - the
// guest wrote it since the last dirty-log harvest, so the next one returns it and a full copy now
// would only be sent again. Zero entries and deltas still go: they cost little and keep the
// destination's copy close to what the final pass will send. The destination keeps the copy it
// had, and so does the delta cache (the invariant holds). The filter gets (gfn, resend) and keeps
// its own list of what it left out (v2 only).
//
// Threads: one encoder per sender thread; the cache and the selector are shared (thread-safe).
#pragma once

#include <cstdint>
#include <functional>
#include <span>
#include <vector>

#include "common/compress.h"
#include "migration/codec/codec_selector.h"
#include "migration/codec/delta_cache.h"
#include "migration/codec/page_run.h"
#include "migration/protocol/pages.h"

namespace ferry::migration {

// What encoding batches produced. Pages by encoding: raw pages of a compressed body count under
// its codec.
struct EncodeTally {
  uint64_t zero = 0, raw = 0, lz4 = 0, zstd = 0, delta = 0, free = 0;
  uint64_t pages = 0, body_bytes = 0, wire_bytes = 0, records = 0;
  uint64_t resent_wire_bytes = 0;  // wire bytes of re-sent pages (their share of the body, after the codec)
  uint64_t codec_cpu_ns = 0, delta_attempts = 0, delta_produced = 0;
  uint64_t debounced = 0;  // pages the skip filter left out (not in `pages`)
  void Add(const EncodeTally& o);
};

struct EncoderConfig {
  uint32_t version = kProtocolVersion;
  uint64_t caps = 0;  // negotiated
};

struct EncodeOptions {
  using SkipFilter = std::function<bool(uint64_t gfn, bool resend)>;
  const SkipFilter* skip = nullptr;  // debounce (above); null: none
  // The VM is paused (the final pass): deltas are tried whatever the delta governor says - every
  // byte saved shortens the pause, and a delta attempt costs less than sending the page.
  bool paused = false;
};

class PageEncoder {
 public:
  // ram: guest RAM (page i at ram + i * 4096); cache may be null (deltas off); selector is
  // required for version 2.
  PageEncoder(const uint8_t* ram, EncoderConfig cfg, DeltaCache* cache, CodecSelector* selector);
  // One record for `runs` with sequence number `seq` (a run's `resend` or `warm`: its pages were
  // sent before or are likely to be sent again, so their copies may evict other cache entries). The span stays valid until the next
  // Encode.
  // Empty when the skip filter left every page out (nothing to send).
  using SkipFilter = EncodeOptions::SkipFilter;
  std::span<const uint8_t> Encode(std::span<const PageRun> runs, uint64_t seq, EncodeTally* tally, const EncodeOptions& opts = {});

 private:
  std::span<const uint8_t> EncodeV1(std::span<const PageRun> runs, uint64_t seq, EncodeTally* t);
  void Forget(uint64_t gfn, uint64_t count);

  const uint8_t* const ram_;
  const EncoderConfig cfg_;
  DeltaCache* cache_;
  CodecSelector* selector_;
  PagesBuilder v1_;
  EncodedPagesBuilder v2_;
  Compressor compressor_;
  std::vector<uint8_t> compressed_;
  alignas(64) uint8_t page_[kWirePageSize];
  uint8_t delta_[kWirePageSize];
};

}  // namespace ferry::migration
