// Block compression shared by the gateway (DATA chunks) and the migration engine (pages): one
// place that owns the lz4/zstd calls and their strict, bounded decoding.
//
// Formats (the numeric values of Compression are wire values; never renumber):
//   kNone  the bytes as they are.
//   kLz4   one LZ4 *block* (lz4.h block format, no frame header, no checksum, no size field): the
//          decompressed size travels next to it (the caller's framing).
//   kZstd  exactly one zstd frame (RFC 8878) that declares its content size (single-pass
//          ZSTD_compressCCtx always writes it). Skippable frames, legacy (pre-v0.8) frames, frames
//          without a content size and anything after the frame are rejected.
//
// Bounds: Decompress() never writes or allocates more than the `expected_size` its caller passes,
// and the caller bounds that size from its own protocol limits BEFORE calling (so a small input
// claiming a huge output cannot make it allocate: a "decompression bomb"). A zstd frame whose
// declared content size differs from expected_size is rejected before any decompression work.
//
// Threads: a Compressor / Decompressor holds library contexts (ZSTD_CCtx / ZSTD_DCtx, the LZ4
// hash-table state) created on first use and reused; each instance is used by one thread at a time
// (keep one per sender/receiver thread). Distinct instances are independent. Both are movable,
// not copyable. The free functions are pure and thread-safe.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <span>
#include <string_view>
#include <vector>

#include "common/error.h"

struct ZSTD_CCtx_s;
struct ZSTD_DCtx_s;

namespace ferry {

enum class Compression : uint8_t { kNone = 0, kLz4 = 1, kZstd = 2 };  // numeric values are wire values

// "none", "lz4", "zstd" ("unknown" for a value outside the enum).
std::string_view CompressionName(Compression c);
// Inverse of CompressionName for CLI/API input: kInvalidArgument "unknown compression 'x' (none|lz4|zstd)".
Result<Compression> ParseCompression(std::string_view name);
// Validates a wire byte: kCorrupt "unknown compression N" for anything but 0, 1, 2.
Result<Compression> CompressionFromWire(uint8_t v);

inline constexpr int kMinZstdLevel = 1;
inline constexpr int kMaxZstdLevel = 19;

class Compressor {
 public:
  Compressor();
  ~Compressor();
  Compressor(Compressor&&) noexcept;
  Compressor& operator=(Compressor&&) noexcept;
  Compressor(const Compressor&) = delete;
  Compressor& operator=(const Compressor&) = delete;

  // Compresses `in` into `*out`, resized to the compressed size, and returns true; the result is
  // then strictly smaller than `in`. Returns false, with *out empty, when it would not be strictly
  // smaller (incompressible, empty input: the caller sends the input as is), for kNone, for an
  // unknown codec, for input beyond LZ4's 2 GiB block limit, or on a library error (out of memory).
  // level: zstd compression level, clamped to [kMinZstdLevel, kMaxZstdLevel]; ignored by lz4, which
  // always runs at its default speed (acceleration 1: its fastest ratio-preserving setting; faster
  // accelerations trade ratio the callers have no knob for).
  // Output is deterministic for a given library version, codec, level and input.
  bool Compress(Compression c, int level, std::span<const uint8_t> in, std::vector<uint8_t>* out);

 private:
  struct ZstdFree {
    void operator()(ZSTD_CCtx_s* p) const;
  };
  std::unique_ptr<ZSTD_CCtx_s, ZstdFree> zstd_;
  std::unique_ptr<uint64_t[]> lz4_state_;  // LZ4_sizeofState() bytes, 8-byte aligned
};

class Decompressor {
 public:
  Decompressor();
  ~Decompressor();
  Decompressor(Decompressor&&) noexcept;
  Decompressor& operator=(Decompressor&&) noexcept;
  Decompressor(const Decompressor&) = delete;
  Decompressor& operator=(const Decompressor&) = delete;

  // Decompresses `in` into exactly `expected_size` bytes in `*out` (resized to expected_size; its
  // capacity is reused). Every other outcome is ErrorCode::kCorrupt, with *out emptied:
  //   kNone: in.size() != expected_size.
  //   kLz4:  malformed block; a block that decodes to more than expected_size bytes (this includes
  //          trailing bytes after a valid block: the block format has no end marker, so extra input
  //          is read as further sequences); a block that decodes to fewer bytes;
  //          expected_size beyond the 2 GiB block limit.
  //   kZstd: empty/short input or a bad magic (not a zstd frame), skippable frames, a frame without
  //          a declared content size, a declared size other than expected_size, a truncated frame,
  //          bytes after the frame (including a second frame), a malformed frame, blocks that
  //          decode to more or fewer bytes than the frame declared.
  //   any:   an unknown Compression value.
  // (The one exception: kInternal when the zstd context cannot be allocated.)
  Status Decompress(Compression c, std::span<const uint8_t> in, size_t expected_size, std::vector<uint8_t>* out);

 private:
  struct ZstdFree {
    void operator()(ZSTD_DCtx_s* p) const;
  };
  std::unique_ptr<ZSTD_DCtx_s, ZstdFree> zstd_;
};

}  // namespace ferry
