#include "migration/protocol/wire.h"

#include <fcntl.h>
#include <sys/random.h>

#include <cstring>

#include "common/crc32c.h"
#include "common/json.h"
#include "common/state_io.h"
#include "common/text.h"
#include "migration/protocol/decode_util.h"

namespace ferry::migration {
namespace {

Result<Uuid> GetUuid(StateReader& r) {
  auto raw = r.GetRaw(16);
  if (!raw) return std::unexpected(raw.error());
  Uuid u;
  std::memcpy(u.data(), raw->data(), 16);
  return u;
}

Result<std::string> GetShortString(StateReader& r, size_t max, std::string_view what) {
  auto n = r.GetU16();
  if (!n) return std::unexpected(n.error());
  if (*n > max) return Errorf(ErrorCode::kCorrupt, "{} of {} bytes exceeds the limit of {}", what, *n, max);
  auto raw = r.GetRaw(*n);
  if (!raw) return std::unexpected(raw.error());
  return std::string(raw->begin(), raw->end());
}

void PutShortString(StateWriter& w, std::string_view s, size_t max) {
  s = s.substr(0, max);
  w.PutU16(static_cast<uint16_t>(s.size()));
  w.PutRaw({reinterpret_cast<const uint8_t*>(s.data()), s.size()});
}

Status Finish(const StateReader& r, std::string_view what) { return detail::FinishPayload(r, what); }

}  // namespace

std::string_view RecordTypeName(RecordType t) {
  switch (t) {
    case RecordType::kHello: return "HELLO";
    case RecordType::kHelloAck: return "HELLO_ACK";
    case RecordType::kDataHello: return "DATA_HELLO";
    case RecordType::kConfig: return "CONFIG";
    case RecordType::kConfigAck: return "CONFIG_ACK";
    case RecordType::kPages: return "PAGES";
    case RecordType::kState: return "STATE";
    case RecordType::kEnd: return "END";
    case RecordType::kReady: return "READY";
    case RecordType::kGo: return "GO";
    case RecordType::kResumed: return "RESUMED";
    case RecordType::kError: return "ERROR";
    case RecordType::kCancel: return "CANCEL";
    case RecordType::kProgress: return "PROGRESS";
    case RecordType::kEncodedPages: return "ENCODED_PAGES";
    case RecordType::kPostcopy: return "POSTCOPY";
    case RecordType::kPageRequest: return "PAGE_REQUEST";
    case RecordType::kPostcopyEnd: return "POSTCOPY_END";
    case RecordType::kPostcopyDone: return "POSTCOPY_DONE";
    case RecordType::kPing: return "PING";
    case RecordType::kRecover: return "RECOVER";
  }
  return "UNKNOWN";
}

bool IsKnownRecordType(uint16_t t) { return t >= 1 && t <= 21; }

Uuid NewUuid() {
  Uuid u{};
  size_t got = 0;
  while (got < u.size()) {
    ssize_t n = getrandom(u.data() + got, u.size() - got, 0);
    if (n > 0) got += static_cast<size_t>(n);
  }
  u[6] = static_cast<uint8_t>((u[6] & 0x0f) | 0x40);  // version 4
  u[8] = static_cast<uint8_t>((u[8] & 0x3f) | 0x80);  // variant
  return u;
}

std::string FormatUuid(const Uuid& u) {
  std::string s;
  for (size_t i = 0; i < u.size(); ++i) {
    if (i == 4 || i == 6 || i == 8 || i == 10) s += '-';
    s += fmt::format("{:02x}", u[i]);
  }
  return s;
}

std::array<uint8_t, kPreambleSize> EncodePreamble(Role role, uint32_t version) {
  std::array<uint8_t, kPreambleSize> b{};
  std::memcpy(b.data(), kMagic, 8);
  StoreLe<uint32_t>(b.data() + 8, version);
  StoreLe<uint32_t>(b.data() + 12, static_cast<uint32_t>(role));
  return b;
}

Result<Preamble> DecodePreamble(std::span<const uint8_t> b, uint32_t max_version) {
  if (b.size() != kPreambleSize) return Errorf(ErrorCode::kCorrupt, "preamble: {} bytes, expected {}", b.size(), kPreambleSize);
  if (std::memcmp(b.data(), kMagic, 8) != 0) return Errorf(ErrorCode::kCorrupt, "preamble: bad magic (not a Ferry migration stream)");
  const uint32_t version = LoadLe<uint32_t>(b.data() + 8);
  if (version < kMinProtocolVersion || version > max_version)
    return Errorf(ErrorCode::kVersionMismatch, "preamble: protocol version {} is not supported (this side speaks {}..{})", version,
                  kMinProtocolVersion, max_version);
  uint32_t role = LoadLe<uint32_t>(b.data() + 12);
  if (role > 1) return Errorf(ErrorCode::kCorrupt, "preamble: unknown connection role {}", role);
  return Preamble{static_cast<Role>(role), version};
}

Result<RecordHeader> DecodeRecordHeader(std::span<const uint8_t> b) {
  if (b.size() != kRecordHeaderSize) return Errorf(ErrorCode::kCorrupt, "record header: {} bytes", b.size());
  RecordHeader h;
  h.type = LoadLe<uint16_t>(b.data());
  h.flags = LoadLe<uint16_t>(b.data() + 2);
  h.length = LoadLe<uint32_t>(b.data() + 4);
  h.crc = LoadLe<uint32_t>(b.data() + 8);
  uint32_t reserved = LoadLe<uint32_t>(b.data() + 12);
  if (h.type == 0) return Errorf(ErrorCode::kCorrupt, "record header: type 0 is invalid");
  if (h.flags & ~kFlagMandatory) return Errorf(ErrorCode::kCorrupt, "record header: reserved flag bits {:#x} set", h.flags);
  if (reserved != 0) return Errorf(ErrorCode::kCorrupt, "record header: reserved field is {:#x}, must be 0", reserved);
  if (h.length > kMaxRecordPayload)
    return Errorf(ErrorCode::kCorrupt, "record header: payload length {} exceeds the limit of {}", h.length, kMaxRecordPayload);
  return h;
}

Status VerifyRecord(std::span<const uint8_t> header_bytes, std::span<const uint8_t> payload) {
  uint32_t want = LoadLe<uint32_t>(header_bytes.data() + 8);
  uint32_t got = Crc32c(payload, Crc32c(header_bytes.first(8)));
#ifdef FERRY_FUZZING
  got = want;  // fuzz builds only (cmake -DFERRY_FUZZ=ON): mutated inputs get past the CRC to the decoders
#endif
  if (got != want) {
    uint16_t type = LoadLe<uint16_t>(header_bytes.data());
    return Errorf(ErrorCode::kCorrupt, "record {} ({} bytes): CRC mismatch (stored {:#010x}, computed {:#010x})",
                  IsKnownRecordType(type) ? RecordTypeName(static_cast<RecordType>(type)) : "?", payload.size(), want, got);
  }
  return {};
}

void SealRecord(RecordType type, std::vector<uint8_t>* rec, bool mandatory) {
  uint8_t* h = rec->data();
  const uint32_t len = static_cast<uint32_t>(rec->size() - kRecordHeaderSize);
  StoreLe<uint16_t>(h, static_cast<uint16_t>(type));
  StoreLe<uint16_t>(h + 2, mandatory ? kFlagMandatory : 0);
  StoreLe<uint32_t>(h + 4, len);
  StoreLe<uint32_t>(h + 12, 0);
  uint32_t crc = Crc32c(std::span<const uint8_t>(h + kRecordHeaderSize, len), Crc32c(h, 8));
  StoreLe<uint32_t>(h + 8, crc);
}

std::vector<uint8_t> EncodeRecord(RecordType type, std::span<const uint8_t> payload, bool mandatory) {
  std::vector<uint8_t> rec(kRecordHeaderSize + payload.size());
  if (!payload.empty()) std::memcpy(rec.data() + kRecordHeaderSize, payload.data(), payload.size());
  SealRecord(type, &rec, mandatory);
  return rec;
}

// --- typed payloads ---

std::vector<uint8_t> Encode(const Hello& m) {
  StateWriter w;
  w.PutRaw(m.uuid);
  w.PutU64(m.capabilities);
  w.PutU32(m.channels);
  w.PutU32(m.page_size);
  return w.Take();
}

Result<Hello> DecodeHello(std::span<const uint8_t> p) {
  StateReader r(p);
  Hello m;
  FERRY_WIRE_GET(m.uuid, GetUuid(r), "HELLO");
  FERRY_WIRE_GET(m.capabilities, r.GetU64(), "HELLO");
  FERRY_WIRE_GET(m.channels, r.GetU32(), "HELLO");
  FERRY_WIRE_GET(m.page_size, r.GetU32(), "HELLO");
  FERRY_RETURN_IF_ERROR(Finish(r, "HELLO"), "decode");
  if (m.channels < 1 || m.channels > kMaxChannels)
    return Errorf(ErrorCode::kCorrupt, "HELLO: {} data channels (allowed 1..{})", m.channels, kMaxChannels);
  if (m.page_size != kWirePageSize)
    return Errorf(ErrorCode::kUnsupported, "HELLO: page size {} (only {} is supported)", m.page_size, kWirePageSize);
  return m;
}

std::vector<uint8_t> Encode(const HelloAck& m) {
  StateWriter w;
  w.PutRaw(m.uuid);
  w.PutU64(m.capabilities);
  return w.Take();
}

Result<HelloAck> DecodeHelloAck(std::span<const uint8_t> p) {
  StateReader r(p);
  HelloAck m;
  FERRY_WIRE_GET(m.uuid, GetUuid(r), "HELLO_ACK");
  FERRY_WIRE_GET(m.capabilities, r.GetU64(), "HELLO_ACK");
  FERRY_RETURN_IF_ERROR(Finish(r, "HELLO_ACK"), "decode");
  return m;
}

std::vector<uint8_t> Encode(const DataHello& m) {
  StateWriter w;
  w.PutRaw(m.uuid);
  w.PutU32(m.channel);
  return w.Take();
}

Result<DataHello> DecodeDataHello(std::span<const uint8_t> p) {
  StateReader r(p);
  DataHello m;
  FERRY_WIRE_GET(m.uuid, GetUuid(r), "DATA_HELLO");
  FERRY_WIRE_GET(m.channel, r.GetU32(), "DATA_HELLO");
  FERRY_RETURN_IF_ERROR(Finish(r, "DATA_HELLO"), "decode");
  if (m.channel >= kMaxChannels) return Errorf(ErrorCode::kCorrupt, "DATA_HELLO: channel index {} out of range", m.channel);
  return m;
}

std::vector<uint8_t> EncodeConfig(const nlohmann::json& config) {
  std::string s = config.dump();
  return {s.begin(), s.end()};
}

Result<nlohmann::json> DecodeConfig(std::span<const uint8_t> p) {
  if (p.size() > kMaxConfigBytes) return Errorf(ErrorCode::kCorrupt, "CONFIG: {} bytes exceeds the limit of {}", p.size(), kMaxConfigBytes);
  auto j = ParseJson({reinterpret_cast<const char*>(p.data()), p.size()}, "CONFIG", ErrorCode::kCorrupt);
  if (!j) return std::unexpected(j.error());
  if (!j->is_object()) return Errorf(ErrorCode::kCorrupt, "CONFIG: not a JSON object");
  return j;
}

std::vector<uint8_t> Encode(const StateRecord& m) {
  StateWriter w;
  PutShortString(w, m.id, kMaxStateIdBytes);
  w.PutRaw(m.blob);
  return w.Take();
}

Result<StateRecord> DecodeState(std::span<const uint8_t> p) {
  StateReader r(p);
  StateRecord m;
  FERRY_WIRE_GET(m.id, GetShortString(r, kMaxStateIdBytes, "STATE id"), "STATE");
  if (m.id.empty()) return Errorf(ErrorCode::kCorrupt, "STATE: empty id");
  auto rest = r.GetRaw(r.remaining());
  m.blob.assign(rest->begin(), rest->end());
  return m;
}

std::vector<uint8_t> Encode(const End& m) {
  StateWriter w;
  w.PutU64(m.batches);
  w.PutU64(m.pages);
  return w.Take();
}

Result<End> DecodeEnd(std::span<const uint8_t> p) {
  StateReader r(p);
  End m;
  FERRY_WIRE_GET(m.batches, r.GetU64(), "END");
  FERRY_WIRE_GET(m.pages, r.GetU64(), "END");
  FERRY_RETURN_IF_ERROR(Finish(r, "END"), "decode");
  return m;
}

std::vector<uint8_t> EncodeU64(uint64_t v) {
  StateWriter w;
  w.PutU64(v);
  return w.Take();
}

Result<uint64_t> DecodeU64(std::span<const uint8_t> p, std::string_view what) {
  if (p.size() != 8) return Errorf(ErrorCode::kCorrupt, "{}: payload of {} bytes, expected 8", what, p.size());
  return LoadLe<uint64_t>(p.data());
}

std::vector<uint8_t> Encode(const ErrorMsg& m) {
  StateWriter w;
  w.PutU32(m.code);
  PutShortString(w, m.message, kMaxMessageBytes);
  return w.Take();
}

Result<ErrorMsg> DecodeError(std::span<const uint8_t> p) {
  StateReader r(p);
  ErrorMsg m;
  FERRY_WIRE_GET(m.code, r.GetU32(), "ERROR");
  FERRY_WIRE_GET(m.message, GetShortString(r, kMaxMessageBytes, "ERROR message"), "ERROR");
  FERRY_RETURN_IF_ERROR(Finish(r, "ERROR"), "decode");
  m.message = PrintableText(m.message);  // the peer's words go to logs and JSON
  return m;
}

Error ToError(const ErrorMsg& m) {
  ErrorCode code = m.code <= static_cast<uint32_t>(ErrorCode::kPermissionDenied) ? static_cast<ErrorCode>(m.code) : ErrorCode::kInternal;
  return Error(code, "peer: " + m.message);
}

std::vector<uint8_t> EncodeCancel(std::string_view reason) {
  StateWriter w;
  PutShortString(w, reason, kMaxMessageBytes);
  return w.Take();
}

Result<std::string> DecodeCancel(std::span<const uint8_t> p) {
  StateReader r(p);
  std::string reason;
  FERRY_WIRE_GET(reason, GetShortString(r, kMaxMessageBytes, "CANCEL reason"), "CANCEL");
  FERRY_RETURN_IF_ERROR(Finish(r, "CANCEL"), "decode");
  return PrintableText(reason);
}

std::vector<uint8_t> Encode(const Progress& m) {
  StateWriter w;
  w.PutU64(m.batches);
  w.PutU64(m.bytes);
  return w.Take();
}

Result<Progress> DecodeProgress(std::span<const uint8_t> p) {
  StateReader r(p);
  Progress m;
  FERRY_WIRE_GET(m.batches, r.GetU64(), "PROGRESS");
  FERRY_WIRE_GET(m.bytes, r.GetU64(), "PROGRESS");
  FERRY_RETURN_IF_ERROR(Finish(r, "PROGRESS"), "decode");
  return m;
}

}  // namespace ferry::migration
