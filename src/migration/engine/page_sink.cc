#include "migration/engine/page_sink.h"

#include <cstring>

#include "migration/codec/xbzrle.h"

namespace ferry::migration {

MemoryPageSink::MemoryPageSink(const RamView& ram) : ram_(ram), touched_(ram.size / kWirePageSize, 0) {}

Status MemoryPageSink::WritePage(uint64_t gfn, std::span<const uint8_t> data) {
  std::memcpy(ram_.host + gfn * kWirePageSize, data.data(), kWirePageSize);
  touched_[gfn] = 1;
  return {};
}

Status MemoryPageSink::ZeroPage(uint64_t gfn) {
  if (touched_[gfn]) std::memset(ram_.host + gfn * kWirePageSize, 0, kWirePageSize);  // fresh RAM is zero already
  return {};
}

Status MemoryPageSink::FreePage(uint64_t gfn) {
  if (ram_.discard) {
    // Released memory reads as zero, and the VMM learns the page is free (a later migration of
    // this VM then skips it too).
    FERRY_RETURN_IF_ERROR(ram_.discard(gfn, 1), fmt::format("release free page {}", gfn));
    touched_[gfn] = 0;
    return {};
  }
  return ZeroPage(gfn);
}

Status MemoryPageSink::ApplyDelta(uint64_t gfn, std::span<const uint8_t> delta) {
  FERRY_RETURN_IF_ERROR(XbzrleDecode(delta, ram_.host + gfn * kWirePageSize), fmt::format("delta for page {}", gfn));
  touched_[gfn] = 1;
  return {};
}

}  // namespace ferry::migration
