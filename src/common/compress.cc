#include "common/compress.h"

#include <lz4.h>
#include <zstd.h>
#include <zstd_errors.h>

#include <algorithm>
#include <climits>
#include <cstring>

namespace ferry {

std::string_view CompressionName(Compression c) {
  switch (c) {
    case Compression::kNone: return "none";
    case Compression::kLz4: return "lz4";
    case Compression::kZstd: return "zstd";
  }
  return "unknown";
}

Result<Compression> ParseCompression(std::string_view name) {
  for (Compression c : {Compression::kNone, Compression::kLz4, Compression::kZstd})
    if (name == CompressionName(c)) return c;
  return Errorf(ErrorCode::kInvalidArgument, "unknown compression '{}' (none|lz4|zstd)", name);
}

Result<Compression> CompressionFromWire(uint8_t v) {
  if (v > static_cast<uint8_t>(Compression::kZstd)) return Errorf(ErrorCode::kCorrupt, "unknown compression {}", v);
  return static_cast<Compression>(v);
}

// --- Compressor ---

void Compressor::ZstdFree::operator()(ZSTD_CCtx_s* p) const { ZSTD_freeCCtx(p); }

Compressor::Compressor() = default;
Compressor::~Compressor() = default;
Compressor::Compressor(Compressor&&) noexcept = default;
Compressor& Compressor::operator=(Compressor&&) noexcept = default;

bool Compressor::Compress(Compression c, int level, std::span<const uint8_t> in, std::vector<uint8_t>* out) {
  out->clear();
  if (in.empty()) return false;
  // Capacity in.size() - 1: both libraries stop with an error once the output would not be
  // strictly smaller, so incompressible input costs no extra copy and no compressBound buffer.
  const size_t cap = in.size() - 1;
  switch (c) {
    case Compression::kNone:
      return false;
    case Compression::kLz4: {
      if (in.size() > static_cast<size_t>(LZ4_MAX_INPUT_SIZE)) return false;
      if (!lz4_state_) {
        lz4_state_.reset(new (std::nothrow) uint64_t[(static_cast<size_t>(LZ4_sizeofState()) + 7) / 8]);
        if (!lz4_state_) return false;
      }
      out->resize(cap);
      int r = LZ4_compress_fast_extState(lz4_state_.get(), reinterpret_cast<const char*>(in.data()),
                                         reinterpret_cast<char*>(out->data()), static_cast<int>(in.size()),
                                         static_cast<int>(cap), /*acceleration=*/1);
      if (r <= 0) {
        out->clear();
        return false;
      }
      out->resize(static_cast<size_t>(r));
      return true;
    }
    case Compression::kZstd: {
      if (!zstd_) {
        zstd_.reset(ZSTD_createCCtx());
        if (!zstd_) return false;
      }
      out->resize(cap);
      size_t r = ZSTD_compressCCtx(zstd_.get(), out->data(), cap, in.data(), in.size(),
                                   std::clamp(level, kMinZstdLevel, kMaxZstdLevel));
      if (ZSTD_isError(r) || r >= in.size()) {
        out->clear();
        return false;
      }
      out->resize(r);
      return true;
    }
  }
  return false;
}

// --- Decompressor ---

void Decompressor::ZstdFree::operator()(ZSTD_DCtx_s* p) const { ZSTD_freeDCtx(p); }

Decompressor::Decompressor() = default;
Decompressor::~Decompressor() = default;
Decompressor::Decompressor(Decompressor&&) noexcept = default;
Decompressor& Decompressor::operator=(Decompressor&&) noexcept = default;

namespace {

Status DecompressLz4(std::span<const uint8_t> in, size_t expected, std::vector<uint8_t>* out) {
  if (expected > static_cast<size_t>(LZ4_MAX_INPUT_SIZE) || in.size() > static_cast<size_t>(INT_MAX))
    return Errorf(ErrorCode::kCorrupt, "lz4 block of {} bytes for {} bytes exceeds the block format's limit",
                  in.size(), expected);
  out->resize(expected);
  int r = LZ4_decompress_safe(reinterpret_cast<const char*>(in.data()), reinterpret_cast<char*>(out->data()),
                              static_cast<int>(in.size()), static_cast<int>(expected));
  if (r >= 0 && static_cast<size_t>(r) == expected) return {};
  if (r >= 0) return Errorf(ErrorCode::kCorrupt, "lz4 block decodes to {} bytes, expected {}", r, expected);
  // The safe decoder does not say why it failed. Tell "well-formed but longer than expected"
  // (a bomb, or trailing bytes read as more sequences) from garbage by decoding at most one byte
  // more than allowed: bounded by expected + 1, and only on this error path.
  out->resize(expected + 1);
  int r2 = LZ4_decompress_safe_partial(reinterpret_cast<const char*>(in.data()), reinterpret_cast<char*>(out->data()),
                                       static_cast<int>(in.size()), static_cast<int>(expected + 1),
                                       static_cast<int>(expected + 1));
  if (r2 >= 0 && static_cast<size_t>(r2) == expected + 1)
    return Errorf(ErrorCode::kCorrupt, "lz4 block decodes to more than {} bytes (or has trailing bytes)", expected);
  return Errorf(ErrorCode::kCorrupt, "malformed lz4 block ({} bytes, decoder error at input offset {})", in.size(),
                -static_cast<int64_t>(r) - 1);
}

}  // namespace

Status Decompressor::Decompress(Compression c, std::span<const uint8_t> in, size_t expected_size,
                                std::vector<uint8_t>* out) {
  Status s;
  switch (c) {
    case Compression::kNone:
      if (in.size() != expected_size) {
        s = Errorf(ErrorCode::kCorrupt, "uncompressed payload of {} bytes, expected {}", in.size(), expected_size);
        break;
      }
      out->assign(in.begin(), in.end());
      return {};
    case Compression::kLz4:
      s = DecompressLz4(in, expected_size, out);
      break;
    case Compression::kZstd: {
      uint32_t magic = 0;
      if (in.size() < sizeof magic) {
        s = Errorf(ErrorCode::kCorrupt, "zstd input of {} bytes is too short for a frame", in.size());
        break;
      }
      std::memcpy(&magic, in.data(), sizeof magic);  // little endian, as the format
      if (magic != ZSTD_MAGICNUMBER) {
        s = Errorf(ErrorCode::kCorrupt, "not a zstd frame (magic {:#010x})", magic);
        break;
      }
      unsigned long long declared = ZSTD_getFrameContentSize(in.data(), in.size());
      if (declared == ZSTD_CONTENTSIZE_ERROR) {
        s = Errorf(ErrorCode::kCorrupt, "malformed or truncated zstd frame header ({} bytes)", in.size());
        break;
      }
      if (declared == ZSTD_CONTENTSIZE_UNKNOWN) {
        s = Errorf(ErrorCode::kCorrupt, "zstd frame does not declare its content size");
        break;
      }
      if (declared != expected_size) {
        s = Errorf(ErrorCode::kCorrupt, "zstd frame declares {} bytes, expected {}", declared, expected_size);
        break;
      }
      size_t frame = ZSTD_findFrameCompressedSize(in.data(), in.size());
      if (ZSTD_isError(frame)) {
        s = Errorf(ErrorCode::kCorrupt, "truncated or malformed zstd frame ({} bytes): {}", in.size(),
                   ZSTD_getErrorName(frame));
        break;
      }
      if (frame != in.size()) {
        s = Errorf(ErrorCode::kCorrupt, "{} trailing bytes after the zstd frame of {} bytes", in.size() - frame, frame);
        break;
      }
      if (!zstd_) {
        zstd_.reset(ZSTD_createDCtx());
        if (!zstd_) {
          s = Errorf(ErrorCode::kInternal, "ZSTD_createDCtx failed (out of memory)");
          break;
        }
      }
      out->resize(expected_size);
      size_t r = ZSTD_decompressDCtx(zstd_.get(), out->data(), expected_size, in.data(), frame);
      if (ZSTD_isError(r)) {
        if (ZSTD_getErrorCode(r) == ZSTD_error_dstSize_tooSmall)
          s = Errorf(ErrorCode::kCorrupt, "zstd frame decodes to more than the {} bytes it declares", expected_size);
        else
          s = Errorf(ErrorCode::kCorrupt, "malformed zstd frame: {}", ZSTD_getErrorName(r));
        break;
      }
      if (r != expected_size) {
        s = Errorf(ErrorCode::kCorrupt, "zstd frame decodes to {} bytes, expected {}", r, expected_size);
        break;
      }
      return {};
    }
    default:
      s = Errorf(ErrorCode::kCorrupt, "unknown compression {}", static_cast<unsigned>(c));
      break;
  }
  if (!s) out->clear();
  return s;
}

}  // namespace ferry
