// libFuzzer target: the WAN gateway's frame stream as a gateway reads it from a peer
// (docs/gateway.md): frames decoded one after another from a buffer that may hold several, cut
// anywhere; each frame's payload read with the helpers the sessions use (u16/u32/u64/string).
// Properties: a decoded frame consumes at least its header and no more than the buffer; "need
// more bytes" never consumes anything; a frame re-encodes to exactly the bytes it came from.
#include <cstdint>
#include <cstdlib>
#include <span>
#include <vector>

#include "gateway/protocol.h"

using namespace ferry::gateway;

namespace {
void Check(bool ok) {
  if (!ok) std::abort();
}
}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  std::span<const uint8_t> buf(data, size);
  while (!buf.empty()) {
    size_t used = 0;
    auto f = DecodeFrame(buf, &used);
    if (!f || !f->has_value()) break;
    Check(used >= kHeaderSize && used <= buf.size());
    const Frame& fr = **f;
#ifndef FERRY_FUZZING
    std::vector<uint8_t> again;
    EncodeFrame(fr.type, fr.flags, fr.payload, &again);
    Check(again.size() == used && std::equal(again.begin(), again.end(), buf.begin()));
#endif
    PayloadReader r(fr.payload);
    for (int i = 0; i < 4; ++i) {
      switch ((static_cast<unsigned>(fr.type) + i) % 4) {
        case 0: (void)r.U16(); break;
        case 1: (void)r.U32(); break;
        case 2: (void)r.U64(); break;
        case 3: (void)r.Str(); break;
      }
    }
    (void)r.ExpectEnd();
    buf = buf.subspan(used);
  }
  return 0;
}
