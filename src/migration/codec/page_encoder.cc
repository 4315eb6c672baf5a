#include "migration/codec/page_encoder.h"

#include <algorithm>
#include <cstring>

#include "common/clock.h"
#include "common/zero_page.h"

namespace ferry::migration {

void EncodeTally::Add(const EncodeTally& o) {
  zero += o.zero;
  raw += o.raw;
  lz4 += o.lz4;
  zstd += o.zstd;
  delta += o.delta;
  free += o.free;
  pages += o.pages;
  body_bytes += o.body_bytes;
  wire_bytes += o.wire_bytes;
  resent_wire_bytes += o.resent_wire_bytes;
  records += o.records;
  codec_cpu_ns += o.codec_cpu_ns;
  debounced += o.debounced;
  delta_attempts += o.delta_attempts;
  delta_produced += o.delta_produced;
}

PageEncoder::PageEncoder(const uint8_t* ram, EncoderConfig cfg, DeltaCache* cache, CodecSelector* selector)
    : ram_(ram), cfg_(cfg), cache_((cfg.caps & kCapDelta) ? cache : nullptr), selector_(selector) {}

void PageEncoder::Forget(uint64_t gfn, uint64_t count) {
  if (!cache_) return;
  for (uint64_t p = gfn; p < gfn + count; ++p) cache_->Erase(p);
}

std::span<const uint8_t> PageEncoder::EncodeV1(std::span<const PageRun> runs, uint64_t seq, EncodeTally* t) {
  v1_.Reset(seq);
  for (const PageRun& r : runs) {
    for (uint64_t p = r.gfn; p < r.gfn + r.count; ++p) {
      const uint8_t* src = ram_ + p * kWirePageSize;
      if (r.kind != RunKind::kScan || IsZeroPage(src)) {
        v1_.AddZero(p);
        ++t->zero;
      } else {
        v1_.AddRaw(p, src);
        ++t->raw;
      }
      ++t->pages;
    }
  }
  auto rec = v1_.Finish();
  t->body_bytes += rec.size();
  t->wire_bytes += rec.size();
  uint64_t pages = 0, resent = 0;
  for (const PageRun& r : runs) {
    pages += r.count;
    resent += r.resend ? r.count : 0;
  }
  if (pages) t->resent_wire_bytes += rec.size() * resent / pages;
  ++t->records;
  return rec;
}

std::span<const uint8_t> PageEncoder::Encode(std::span<const PageRun> runs, uint64_t seq, EncodeTally* t, const EncodeOptions& opts) {
  if (cfg_.version < 2) return EncodeV1(runs, seq, t);
  v2_.Reset(seq, cfg_.caps & kCapZeroRuns);
  const SkipFilter* skip = opts.skip;
  const bool delta_on = cache_ && (opts.paused ? selector_->DeltaAllowed() : selector_->DeltaEnabled());
  // A delta is worth sending if it is smaller than the full page would likely be after the codec.
  const size_t delta_limit =
      std::clamp<size_t>(static_cast<size_t>(kWirePageSize * selector_->ExpectedRatio()), 256, kMaxDeltaBytes);
  uint64_t raw_pages = 0, attempts = 0, produced = 0, resent_body = 0;
  for (const PageRun& r : runs) {
    const size_t body_before = v2_.body().size();
    const bool resend = r.resend;
    switch (r.kind) {
      case RunKind::kZero:
      case RunKind::kFree:
        if (r.kind == RunKind::kFree && (cfg_.caps & kCapFreePages)) {
          v2_.AddFreeRun(r.gfn, r.count);
          t->free += r.count;
        } else {
          v2_.AddZeroRun(r.gfn, r.count);
          t->zero += r.count;
        }
        Forget(r.gfn, r.count);
        break;
      case RunKind::kScan:
        for (uint64_t p = r.gfn; p < r.gfn + r.count; ++p) {
          const uint8_t* src = ram_ + p * kWirePageSize;
          if (IsZeroPage(src)) {
            v2_.AddZero(p);
            ++t->zero;
            Forget(p, 1);
            continue;
          }
          std::memcpy(page_, src, kWirePageSize);
          if (delta_on && resend) {
            size_t len = 0;
            uint64_t base = 0;
            bool cached = false;
            const bool encoded = cache_->EncodeDelta(p, page_, delta_, delta_limit, &len, &base, &cached);
            attempts += cached;  // a miss says nothing about whether deltas pay off
            if (encoded) {
              v2_.AddDelta(p, base, std::span<const uint8_t>(delta_, len));
              (void)cache_->Insert(p, page_, seq, true);
              ++produced;
              ++t->delta;
              continue;
            }
          }
          // A full page is not worth sending if the guest wrote it since the harvest (debounce); a
          // zero entry or a delta is, and keeps the destination's copy close for the final pass.
          if (skip && (*skip)(p, resend)) {
            ++t->debounced;
            continue;
          }
          // Sent whole. The copy is cached - also while the governor has deltas off, so the cache
          // is ready when they are back on: a re-sent page, or a warm one (likely sent again, e.g.
          // one held back from round 0) may take another page's slot; a first send only a free
          // one (round 0 fills the cache with whatever comes first).
          v2_.AddRaw(p, page_);
          if (cache_ && !cache_->Insert(p, page_, seq, resend || r.warm)) cache_->Erase(p);
          ++raw_pages;
        }
        break;
    }
    if (resend) resent_body += v2_.body().size() - body_before;
  }
  t->pages += v2_.pages();
  if (attempts) selector_->ReportDelta(attempts, produced);
  t->delta_attempts += attempts;
  t->delta_produced += produced;
  if (v2_.pages() == 0) return {};  // the filter left every page out: no record (none may be empty)

  const std::span<const uint8_t> body = v2_.body();
  t->body_bytes += body.size();
  ++t->records;
  const CodecChoice choice = raw_pages || produced ? selector_->Choose() : CodecChoice{};
  std::span<const uint8_t> rec;
  if (choice.codec != Compression::kNone) {
    const uint64_t c0 = ThreadCpuNs();
    const bool smaller = compressor_.Compress(choice.codec, choice.level, body, &compressed_);
    const uint64_t cpu = ThreadCpuNs() - c0;
    t->codec_cpu_ns += cpu;
    selector_->ReportEncode(choice, body.size(), smaller ? compressed_.size() : body.size(), cpu);
    if (smaller) {
      rec = v2_.Finish(choice.codec, compressed_);
      (choice.codec == Compression::kLz4 ? t->lz4 : t->zstd) += raw_pages;
      raw_pages = 0;
    }
  }
  if (rec.empty()) rec = v2_.Finish();
  t->raw += raw_pages;
  t->wire_bytes += rec.size();
  // Re-sent pages' share of the record (exact uncompressed; proportional to the body when compressed).
  if (!body.empty()) t->resent_wire_bytes += static_cast<uint64_t>(static_cast<double>(rec.size()) * static_cast<double>(resent_body) / static_cast<double>(body.size()));
  return rec;
}

}  // namespace ferry::migration
