// ferry-gateway wire protocol (see docs/gateway.md). Every byte between two
// gateways, on the control connection and on the data connections, is a frame:
//
//   off size field
//    0   2   magic   0x4647 ("FG"), little endian
//    2   1   version 1
//    3   1   type    FrameType
//    4   2   flags   bit0 = payload is compressed (DATA only); bits 1..2 codec
//    6   2   reserved, must be 0
//    8   4   length  payload bytes, <= kMaxPayload
//   12   4   crc     CRC32C over header bytes 0..11 followed by the payload
//
// Decoding is strict: bad magic, version, type, reserved bits, oversize length
// or CRC mismatch is a protocol error and closes the session.
#pragma once

#include <cstdint>
#include <optional>
#include <span>
#include <string>
#include <vector>

#include "common/error.h"

namespace ferry::gateway {

inline constexpr uint16_t kMagic = 0x4647;
inline constexpr uint8_t kVersion = 1;
inline constexpr size_t kHeaderSize = 16;
inline constexpr uint32_t kMaxPayload = (1u << 20) + 64;

enum class FrameType : uint8_t {
  kHello = 1,      // ctrl c->s: session_id u64, streams u16, dest string
  kHelloOk = 2,    // ctrl s->c: session_id u64
  kJoin = 3,       // data, first frame: session_id u64, index u16
  kData = 4,       // data: seq u64, raw_len u32, bytes
  kAck = 5,        // ctrl: next expected seq u64 (cumulative; credit/window update)
  kFin = 6,        // ctrl: end seq u64 (sender half-closed after seq-1)
  kReset = 7,      // ctrl: reason string (abort, peer resets its TCP side)
  kError = 8,      // ctrl: code u32, message string
  kPing = 9,       // ctrl: timestamp_ns u64
  kPong = 10,      // ctrl: echoed timestamp_ns u64
  kClose = 11,     // ctrl: session finished cleanly (both directions done)
  kStats = 12,     // ctrl: bytes_sent u64, bytes_received u64
};
inline constexpr uint8_t kMaxFrameType = 12;

inline constexpr uint16_t kFlagCompressed = 1;
inline constexpr uint16_t kFlagCodecLz4 = 0;   // bits 1..2 == 0
inline constexpr uint16_t kFlagCodecZstd = 2;  // bits 1..2 == 1
inline constexpr uint16_t kFlagsMask = 0x7;

struct Frame {
  FrameType type{};
  uint16_t flags = 0;
  std::vector<uint8_t> payload;
};

// Appends an encoded frame to out.
void EncodeFrame(FrameType type, uint16_t flags, std::span<const uint8_t> payload,
                 std::vector<uint8_t>* out);

// Tries to decode one frame from buf. Returns nullopt when more bytes are
// needed, an error when the bytes can never become a valid frame.
// On success *consumed is the number of bytes used.
Result<std::optional<Frame>> DecodeFrame(std::span<const uint8_t> buf, size_t* consumed);

// Payload helpers (little endian) with bounds-checked reads.
class PayloadWriter {
 public:
  PayloadWriter& U16(uint16_t v);
  PayloadWriter& U32(uint32_t v);
  PayloadWriter& U64(uint64_t v);
  PayloadWriter& Str(std::string_view s);  // u16 length + bytes
  PayloadWriter& Bytes(std::span<const uint8_t> b);
  std::vector<uint8_t>& data() { return data_; }

 private:
  std::vector<uint8_t> data_;
};

class PayloadReader {
 public:
  explicit PayloadReader(std::span<const uint8_t> p) : p_(p) {}
  Result<uint16_t> U16();
  Result<uint32_t> U32();
  Result<uint64_t> U64();
  Result<std::string> Str();
  std::span<const uint8_t> Rest() const { return p_.subspan(off_); }
  Status ExpectEnd() const;

 private:
  Status Need(size_t n) const;
  std::span<const uint8_t> p_;
  size_t off_ = 0;
};

const char* FrameTypeName(FrameType t);

}  // namespace ferry::gateway
