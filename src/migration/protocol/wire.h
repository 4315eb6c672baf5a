// Ferry migration protocol (versions 1 and 2): typed wire structs, strict encode/decode of
// the preamble, record framing and the control records. Page records (PAGES, ENCODED_PAGES)
// are in pages.h. The specification is docs/protocol.md; keep the two in step (reject tests
// in wire_test.cc / pages_test.cc cover every malformed form listed there).
//
// Pure functions, no I/O, no threads.
#pragma once

#include <array>
#include <cstdint>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include <nlohmann/json.hpp>

#include "common/error.h"

namespace ferry::migration {

inline constexpr char kMagic[8] = {'F', 'E', 'R', 'R', 'Y', 'M', 'I', 'G'};
// This build speaks versions kMinProtocolVersion..kProtocolVersion; the version of a
// migration is the one of its control connection's preamble (every data connection repeats it).
inline constexpr uint32_t kProtocolVersion = 2;
inline constexpr uint32_t kMinProtocolVersion = 1;
inline constexpr size_t kPreambleSize = 16;
inline constexpr size_t kRecordHeaderSize = 16;
inline constexpr uint32_t kMaxRecordPayload = 8u << 20;
inline constexpr uint32_t kMaxPagesPerRecord = 64;
inline constexpr uint32_t kWirePageSize = 4096;
inline constexpr uint32_t kMaxChannels = 16;
inline constexpr size_t kMaxConfigBytes = 1u << 20;
inline constexpr size_t kMaxMessageBytes = 4096;
inline constexpr size_t kMaxStateIdBytes = 255;
// A migration's STATE records together (the destination holds them until END): at most this many
// records and bytes.
inline constexpr size_t kMaxStateRecords = 1024;
inline constexpr uint64_t kMaxTotalStateBytes = 64ull << 20;
inline constexpr uint16_t kFlagMandatory = 1;
inline constexpr uint64_t kGfnMask = (1ull << 52) - 1;

enum class Role : uint32_t { kControl = 0, kData = 1 };

enum class RecordType : uint16_t {
  kHello = 1, kHelloAck = 2, kDataHello = 3, kConfig = 4, kConfigAck = 5, kPages = 6, kState = 7,
  kEnd = 8, kReady = 9, kGo = 10, kResumed = 11, kError = 12, kCancel = 13, kProgress = 14,
  kEncodedPages = 15,  // version 2 only
  // Post-copy (version 2 with kCapPostcopy; postcopy.h):
  kPostcopy = 16, kPageRequest = 17, kPostcopyEnd = 18, kPostcopyDone = 19,
  kPing = 20,     // either way, not mandatory, empty: keeps a quiet post-copy connection checked
  kRecover = 21,  // post-copy recovery: the destination's pages still missing (PostcopyStart layout)
};
std::string_view RecordTypeName(RecordType t);
bool IsKnownRecordType(uint16_t t);

using Uuid = std::array<uint8_t, 16>;
Uuid NewUuid();
std::string FormatUuid(const Uuid& u);

// --- connection preamble ---
struct Preamble {
  Role role = Role::kControl;
  uint32_t version = kProtocolVersion;
};
std::array<uint8_t, kPreambleSize> EncodePreamble(Role role, uint32_t version = kProtocolVersion);
// kVersionMismatch for a version outside kMinProtocolVersion..max_version (max_version lets a
// test stand in for an older peer), kCorrupt for a bad magic or role.
Result<Preamble> DecodePreamble(std::span<const uint8_t> bytes, uint32_t max_version = kProtocolVersion);

// --- record framing ---
struct RecordHeader {
  uint16_t type = 0;
  uint16_t flags = 0;
  uint32_t length = 0;
  uint32_t crc = 0;
  bool mandatory() const { return flags & kFlagMandatory; }
};
// Checks reserved bits/fields and the length limit (not the CRC: the payload is needed).
Result<RecordHeader> DecodeRecordHeader(std::span<const uint8_t> bytes);
// Checks the CRC of header bytes 0..7 + payload.
Status VerifyRecord(std::span<const uint8_t> header_bytes, std::span<const uint8_t> payload);
// Header + payload, ready to write.
std::vector<uint8_t> EncodeRecord(RecordType type, std::span<const uint8_t> payload, bool mandatory = true);
// Fills the 16 header bytes at the front of `record` (whose payload follows them).
void SealRecord(RecordType type, std::vector<uint8_t>* record, bool mandatory = true);

struct Record {
  RecordHeader header;
  std::vector<uint8_t> payload;
  RecordType type() const { return static_cast<RecordType>(header.type); }
};

// --- typed payloads ---
struct Hello {
  Uuid uuid{};
  uint64_t capabilities = 0;
  uint32_t channels = 0;
  uint32_t page_size = kWirePageSize;
};
std::vector<uint8_t> Encode(const Hello& m);
Result<Hello> DecodeHello(std::span<const uint8_t> p);

struct HelloAck {
  Uuid uuid{};
  uint64_t capabilities = 0;
};
std::vector<uint8_t> Encode(const HelloAck& m);
Result<HelloAck> DecodeHelloAck(std::span<const uint8_t> p);

struct DataHello {
  Uuid uuid{};
  uint32_t channel = 0;
};
std::vector<uint8_t> Encode(const DataHello& m);
Result<DataHello> DecodeDataHello(std::span<const uint8_t> p);

std::vector<uint8_t> EncodeConfig(const nlohmann::json& config);
Result<nlohmann::json> DecodeConfig(std::span<const uint8_t> p);

struct StateRecord {
  std::string id;
  std::vector<uint8_t> blob;
};
std::vector<uint8_t> Encode(const StateRecord& m);
Result<StateRecord> DecodeState(std::span<const uint8_t> p);

struct End {
  uint64_t batches = 0;
  uint64_t pages = 0;
};
std::vector<uint8_t> Encode(const End& m);
Result<End> DecodeEnd(std::span<const uint8_t> p);

// READY (restore_us) and RESUMED (resume_us): one u64 each.
std::vector<uint8_t> EncodeU64(uint64_t v);
Result<uint64_t> DecodeU64(std::span<const uint8_t> p, std::string_view what);

struct ErrorMsg {
  uint32_t code = 0;  // ferry::ErrorCode
  std::string message;
};
std::vector<uint8_t> Encode(const ErrorMsg& m);
Result<ErrorMsg> DecodeError(std::span<const uint8_t> p);
// The error the peer reported, as a local Error.
Error ToError(const ErrorMsg& m);

std::vector<uint8_t> EncodeCancel(std::string_view reason);
Result<std::string> DecodeCancel(std::span<const uint8_t> p);

// Capability bits (HELLO / HELLO_ACK). The destination acknowledges the intersection of what
// the source offers and what it supports; bits 1.. are defined for version 2 only (a version-1
// migration acknowledges bit 0 at most).
// kCapProgress: the destination sends PROGRESS while it applies page records (at most every
// millisecond, and once more after the last record it applied), so the source can wait until the
// destination has caught up before it measures a round or pauses the VM.
inline constexpr uint64_t kCapProgress = 1ull << 0;
// Entry kinds and body codecs of ENCODED_PAGES (pages.h), each usable only when acknowledged.
inline constexpr uint64_t kCapZeroRuns = 1ull << 1;  // ZERO_RUN entries
inline constexpr uint64_t kCapLz4 = 1ull << 2;       // lz4-compressed bodies
inline constexpr uint64_t kCapZstd = 1ull << 3;      // zstd-compressed bodies
inline constexpr uint64_t kCapDelta = 1ull << 4;     // DELTA entries (XBZRLE against the last copy sent)
inline constexpr uint64_t kCapFreePages = 1ull << 5; // FREE_RUN entries (pages the guest reported free)
// kCapPostcopy: the destination can run the guest before every page arrived (POSTCOPY,
// PAGE_REQUEST, POSTCOPY_END, POSTCOPY_DONE; docs/protocol.md "Post-copy").
inline constexpr uint64_t kCapPostcopy = 1ull << 6;
inline constexpr uint64_t kCapsV1 = kCapProgress;
inline constexpr uint64_t kCapsSupported =
    kCapProgress | kCapZeroRuns | kCapLz4 | kCapZstd | kCapDelta | kCapFreePages | kCapPostcopy;
// What a peer of `version` may acknowledge out of `offered`.
inline uint64_t NegotiateCaps(uint32_t version, uint64_t offered, uint64_t supported = kCapsSupported) {
  return offered & supported & (version >= 2 ? kCapsSupported : kCapsV1);
}

struct Progress {
  uint64_t batches = 0;
  uint64_t bytes = 0;
};
std::vector<uint8_t> Encode(const Progress& m);
Result<Progress> DecodeProgress(std::span<const uint8_t> p);

}  // namespace ferry::migration
