// libFuzzer target: the migration protocol's control records as a destination or source reads
// them from the network (docs/protocol.md): preamble, record header + CRC, and every payload
// decoder (HELLO, HELLO_ACK, DATA_HELLO, CONFIG, STATE, END, ERROR, CANCEL, PROGRESS, u64).
// Input: byte 0 picks the decoder, the rest is the bytes. Properties checked besides "no crash,
// no sanitizer report": whatever decodes re-encodes to something that decodes to the same value.
#include <cstdint>
#include <cstdlib>
#include <span>

#include "migration/protocol/wire.h"

using namespace ferry::migration;

namespace {
void Check(bool ok) {
  if (!ok) std::abort();
}
}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  if (size < 1) return 0;
  const std::span<const uint8_t> p(data + 1, size - 1);
  switch (data[0] % 12) {
    case 0:
      if (auto pre = DecodePreamble(p)) Check(pre->version >= kMinProtocolVersion && pre->version <= kProtocolVersion);
      break;
    case 1:
      if (p.size() >= kRecordHeaderSize) {
        if (auto h = DecodeRecordHeader(p.first(kRecordHeaderSize))) {
          Check(h->length <= kMaxRecordPayload);
          (void)VerifyRecord(p.first(kRecordHeaderSize), p.subspan(kRecordHeaderSize));
        }
      }
      break;
    case 2:
      if (auto h = DecodeHello(p)) {
        auto again = DecodeHello(Encode(*h));
        Check(again && again->uuid == h->uuid && again->capabilities == h->capabilities && again->channels == h->channels);
      }
      break;
    case 3:
      if (auto h = DecodeHelloAck(p)) Check(DecodeHelloAck(Encode(*h)).has_value());
      break;
    case 4:
      if (auto h = DecodeDataHello(p)) {
        auto again = DecodeDataHello(Encode(*h));
        Check(again && again->channel == h->channel);
      }
      break;
    case 5:
      if (auto c = DecodeConfig(p)) Check(DecodeConfig(EncodeConfig(*c)).has_value());
      break;
    case 6:
      if (auto s = DecodeState(p)) {
        auto again = DecodeState(Encode(*s));
        Check(again && again->id == s->id && again->blob == s->blob);
      }
      break;
    case 7:
      if (auto e = DecodeEnd(p)) Check(DecodeEnd(Encode(*e)).has_value());
      break;
    case 8:
      if (auto e = DecodeError(p)) {
        auto again = DecodeError(Encode(*e));
        Check(again && again->message == e->message);
        (void)ToError(*e);
      }
      break;
    case 9:
      if (auto c = DecodeCancel(p)) Check(DecodeCancel(EncodeCancel(*c)).has_value());
      break;
    case 10:
      if (auto pr = DecodeProgress(p)) Check(DecodeProgress(Encode(*pr)).has_value());
      break;
    case 11:
      (void)DecodeU64(p, "fuzz");
      break;
  }
  return 0;
}
