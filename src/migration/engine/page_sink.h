// Where a destination puts the pages it receives. The receiver (destination.cc) decodes page
// records and decides, per page, whether an entry is newer than what the page holds (per-page
// sequence numbers); a PageSink only performs the writes. Today's sink copies into the guest's
// RAM mapping; in post-copy PostcopyRam (postcopy_ram.h) is the userfaultfd sink that places pages atomically (UFFDIO_COPY)
// into a mapping whose missing pages fault.
//
// Threads: called from several data-channel reader threads at once, never for the same page
// concurrently (the receiver holds that page's stripe lock around each call).
#pragma once

#include <cstdint>
#include <memory>
#include <span>
#include <vector>

#include "common/error.h"
#include "migration/engine/vm_interface.h"

namespace ferry::migration {

class PageSink {
 public:
  virtual ~PageSink() = default;
  // The full 4096 bytes of page gfn.
  virtual Status WritePage(uint64_t gfn, std::span<const uint8_t> data) = 0;
  // Page gfn becomes all zero.
  virtual Status ZeroPage(uint64_t gfn) = 0;
  // Page gfn was reported free by the guest: zero, and its host memory may be released.
  virtual Status FreePage(uint64_t gfn) = 0;
  // Applies an XBZRLE delta to page gfn's current contents, all-or-nothing (a malformed delta
  // leaves the page as it was).
  virtual Status ApplyDelta(uint64_t gfn, std::span<const uint8_t> delta) = 0;
};

// Copies into the RamView's mapping. Fresh RAM is zero: pages never written by a migration are
// left untouched by zero and free entries (no host memory is faulted in for them). Free pages
// that were written are released through RamView::discard when the VMM provides it.
class MemoryPageSink final : public PageSink {
 public:
  explicit MemoryPageSink(const RamView& ram);
  Status WritePage(uint64_t gfn, std::span<const uint8_t> data) override;
  Status ZeroPage(uint64_t gfn) override;
  Status FreePage(uint64_t gfn) override;
  Status ApplyDelta(uint64_t gfn, std::span<const uint8_t> delta) override;

 private:
  const RamView ram_;
  std::vector<uint8_t> touched_;  // per page; each byte only under that page's stripe lock
};

}  // namespace ferry::migration
