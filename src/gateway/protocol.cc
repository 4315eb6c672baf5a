#include "gateway/protocol.h"

#include <cstring>

#include "common/crc32c.h"

namespace ferry::gateway {
namespace {
void Put16(uint8_t* p, uint16_t v) { p[0] = v & 0xff; p[1] = v >> 8; }
void Put32(uint8_t* p, uint32_t v) { for (int i = 0; i < 4; i++) p[i] = (v >> (8 * i)) & 0xff; }
uint16_t Get16(const uint8_t* p) { return uint16_t(p[0] | (p[1] << 8)); }
uint32_t Get32(const uint8_t* p) {
  return uint32_t(p[0]) | (uint32_t(p[1]) << 8) | (uint32_t(p[2]) << 16) | (uint32_t(p[3]) << 24);
}
}  // namespace

void EncodeFrame(FrameType type, uint16_t flags, std::span<const uint8_t> payload,
                 std::vector<uint8_t>* out) {
  size_t base = out->size();
  out->resize(base + kHeaderSize + payload.size());
  uint8_t* h = out->data() + base;
  Put16(h, kMagic);
  h[2] = kVersion;
  h[3] = static_cast<uint8_t>(type);
  Put16(h + 4, flags);
  Put16(h + 6, 0);
  Put32(h + 8, static_cast<uint32_t>(payload.size()));
  if (!payload.empty()) std::memcpy(h + kHeaderSize, payload.data(), payload.size());
  uint32_t crc = Crc32c(h, 12);
  crc = Crc32c(payload, crc);
  Put32(h + 12, crc);
}

Result<std::optional<Frame>> DecodeFrame(std::span<const uint8_t> buf, size_t* consumed) {
  *consumed = 0;
  // Validate the header fields as soon as they are available so garbage is
  // rejected without waiting for a (possibly huge) claimed length.
  if (buf.size() >= 2 && Get16(buf.data()) != kMagic)
    return Errorf(ErrorCode::kCorrupt, "bad frame magic {:#06x}", Get16(buf.data()));
  if (buf.size() >= 3 && buf[2] != kVersion)
    return Errorf(ErrorCode::kVersionMismatch, "unsupported frame version {}", buf[2]);
  if (buf.size() >= 4 && (buf[3] == 0 || buf[3] > kMaxFrameType))
    return Errorf(ErrorCode::kCorrupt, "unknown frame type {}", buf[3]);
  if (buf.size() < kHeaderSize) return std::optional<Frame>();
  const uint8_t* h = buf.data();
  uint16_t flags = Get16(h + 4);
  if (flags & ~kFlagsMask) return Errorf(ErrorCode::kCorrupt, "bad frame flags {:#x}", flags);
  if (Get16(h + 6) != 0) return Errorf(ErrorCode::kCorrupt, "reserved header bits set");
  uint32_t len = Get32(h + 8);
  if (len > kMaxPayload) return Errorf(ErrorCode::kCorrupt, "frame length {} exceeds {}", len, kMaxPayload);
  auto type = static_cast<FrameType>(h[3]);
  if (flags != 0 && type != FrameType::kData)
    return Errorf(ErrorCode::kCorrupt, "flags set on non-data frame");
  if (buf.size() < kHeaderSize + len) return std::optional<Frame>();
  uint32_t crc = Crc32c(h, 12);
  crc = Crc32c(buf.subspan(kHeaderSize, len), crc);
#ifdef FERRY_FUZZING
  crc = Get32(h + 12);  // fuzz builds only (cmake -DFERRY_FUZZ=ON): mutated frames get past the CRC
#endif
  if (crc != Get32(h + 12)) return Errorf(ErrorCode::kCorrupt, "frame CRC mismatch");
  Frame f;
  f.type = type;
  f.flags = flags;
  f.payload.assign(h + kHeaderSize, h + kHeaderSize + len);
  *consumed = kHeaderSize + len;
  return std::optional<Frame>(std::move(f));
}

PayloadWriter& PayloadWriter::U16(uint16_t v) {
  data_.push_back(v & 0xff);
  data_.push_back(v >> 8);
  return *this;
}
PayloadWriter& PayloadWriter::U32(uint32_t v) {
  for (int i = 0; i < 4; i++) data_.push_back((v >> (8 * i)) & 0xff);
  return *this;
}
PayloadWriter& PayloadWriter::U64(uint64_t v) {
  for (int i = 0; i < 8; i++) data_.push_back((v >> (8 * i)) & 0xff);
  return *this;
}
PayloadWriter& PayloadWriter::Str(std::string_view s) {
  size_t n = s.size() > 0xffff ? 0xffff : s.size();
  U16(static_cast<uint16_t>(n));
  data_.insert(data_.end(), s.begin(), s.begin() + n);
  return *this;
}
PayloadWriter& PayloadWriter::Bytes(std::span<const uint8_t> b) {
  data_.insert(data_.end(), b.begin(), b.end());
  return *this;
}

Status PayloadReader::Need(size_t n) const {
  if (p_.size() - off_ < n)
    return Errorf(ErrorCode::kCorrupt, "payload truncated: need {} bytes at offset {}, have {}", n,
                  off_, p_.size() - off_);
  return {};
}
Result<uint16_t> PayloadReader::U16() {
  FERRY_RETURN_IF_ERROR(Need(2), "u16");
  uint16_t v = Get16(p_.data() + off_);
  off_ += 2;
  return v;
}
Result<uint32_t> PayloadReader::U32() {
  FERRY_RETURN_IF_ERROR(Need(4), "u32");
  uint32_t v = Get32(p_.data() + off_);
  off_ += 4;
  return v;
}
Result<uint64_t> PayloadReader::U64() {
  FERRY_RETURN_IF_ERROR(Need(8), "u64");
  uint64_t lo = Get32(p_.data() + off_), hi = Get32(p_.data() + off_ + 4);
  off_ += 8;
  return lo | (hi << 32);
}
Result<std::string> PayloadReader::Str() {
  auto n = U16();
  if (!n) return std::unexpected(n.error());
  FERRY_RETURN_IF_ERROR(Need(*n), "string");
  std::string s(reinterpret_cast<const char*>(p_.data() + off_), *n);
  off_ += *n;
  return s;
}
Status PayloadReader::ExpectEnd() const {
  if (off_ != p_.size()) return Errorf(ErrorCode::kCorrupt, "{} trailing payload bytes", p_.size() - off_);
  return {};
}

const char* FrameTypeName(FrameType t) {
  switch (t) {
    case FrameType::kHello: return "HELLO";
    case FrameType::kHelloOk: return "HELLO_OK";
    case FrameType::kJoin: return "JOIN";
    case FrameType::kData: return "DATA";
    case FrameType::kAck: return "ACK";
    case FrameType::kFin: return "FIN";
    case FrameType::kReset: return "RESET";
    case FrameType::kError: return "ERROR";
    case FrameType::kPing: return "PING";
    case FrameType::kPong: return "PONG";
    case FrameType::kClose: return "CLOSE";
    case FrameType::kStats: return "STATS";
  }
  return "?";
}

}  // namespace ferry::gateway
