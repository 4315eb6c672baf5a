// Versioned binary state encoding used by every device's and vCPU's save/restore.
// Little-endian, fixed-width. Every StateReader access is bounds-checked: a short
// or oversized input becomes an ErrorCode::kCorrupt error, never UB.
//
// Convention for a component blob:  u32 component_version, then fields.
#pragma once

#include <cstdint>
#include <cstring>
#include <span>
#include <string>
#include <string_view>
#include <type_traits>
#include <vector>

#include "common/error.h"

namespace ferry {

// Fixed-width little-endian stores/loads at a known-valid position (the host is little
// endian: x86-64; wire and state formats are little endian).
template <typename T>
  requires std::is_trivially_copyable_v<T>
inline void StoreLe(uint8_t* p, T v) {
  std::memcpy(p, &v, sizeof(T));
}
template <typename T>
  requires std::is_trivially_copyable_v<T>
inline T LoadLe(const uint8_t* p) {
  T v;
  std::memcpy(&v, p, sizeof(T));
  return v;
}

class StateWriter {
 public:
  template <typename T>
    requires std::is_trivially_copyable_v<T>
  void Put(const T& v) {
    Append(&v, sizeof(T));
  }
  void PutU8(uint8_t v) { Put(v); }
  void PutU16(uint16_t v) { Put(v); }
  void PutU32(uint32_t v) { Put(v); }
  void PutU64(uint64_t v) { Put(v); }
  void PutBool(bool v) { PutU8(v ? 1 : 0); }
  void PutBytes(std::span<const uint8_t> b) {
    PutU32(static_cast<uint32_t>(b.size()));
    Append(b.data(), b.size());
  }
  void PutString(std::string_view s) {
    PutBytes(std::span<const uint8_t>(reinterpret_cast<const uint8_t*>(s.data()), s.size()));
  }
  template <typename T>
    requires std::is_trivially_copyable_v<T>
  void PutArray(std::span<const T> a) {
    PutU32(static_cast<uint32_t>(a.size()));
    Append(a.data(), a.size_bytes());
  }

  // Appends bytes without a length prefix (wire formats with their own framing).
  void PutRaw(std::span<const uint8_t> b) { Append(b.data(), b.size()); }

  const std::vector<uint8_t>& data() const { return buf_; }
  std::vector<uint8_t> Take() { return std::move(buf_); }

 private:
  // resize + memcpy (vector::insert of a few bytes trips a GCC 12 -Wstringop-overflow
  // false positive at -O3).
  void Append(const void* p, size_t n) {
    if (n == 0) return;
    size_t at = buf_.size();
    buf_.resize(at + n);
    std::memcpy(buf_.data() + at, p, n);
  }
  std::vector<uint8_t> buf_;
};

class StateReader {
 public:
  // max_blob bounds any single length-prefixed field (defence against huge lengths).
  explicit StateReader(std::span<const uint8_t> data, size_t max_blob = 64u << 20)
      : data_(data), max_blob_(max_blob) {}

  template <typename T>
    requires std::is_trivially_copyable_v<T>
  Result<T> Get() {
    if (data_.size() - pos_ < sizeof(T))
      return Errorf(ErrorCode::kCorrupt, "state truncated at offset {} (need {} bytes, have {})", pos_,
                    sizeof(T), data_.size() - pos_);
    T v;
    std::memcpy(&v, data_.data() + pos_, sizeof(T));
    pos_ += sizeof(T);
    return v;
  }
  Result<uint8_t> GetU8() { return Get<uint8_t>(); }
  Result<uint16_t> GetU16() { return Get<uint16_t>(); }
  Result<uint32_t> GetU32() { return Get<uint32_t>(); }
  Result<uint64_t> GetU64() { return Get<uint64_t>(); }
  Result<bool> GetBool() {
    auto v = GetU8();
    if (!v) return std::unexpected(v.error());
    if (*v > 1) return Errorf(ErrorCode::kCorrupt, "bad bool {} at offset {}", *v, pos_ - 1);
    return *v == 1;
  }
  Result<std::vector<uint8_t>> GetBytes() {
    auto n = GetU32();
    if (!n) return std::unexpected(n.error());
    if (*n > max_blob_ || data_.size() - pos_ < *n)
      return Errorf(ErrorCode::kCorrupt, "bad blob length {} at offset {}", *n, pos_ - 4);
    std::vector<uint8_t> out(data_.begin() + pos_, data_.begin() + pos_ + *n);
    pos_ += *n;
    return out;
  }
  Result<std::string> GetString() {
    auto b = GetBytes();
    if (!b) return std::unexpected(b.error());
    return std::string(b->begin(), b->end());
  }
  // Returns a view of the next n bytes (no length prefix) and skips them.
  Result<std::span<const uint8_t>> GetRaw(size_t n) {
    if (data_.size() - pos_ < n)
      return Errorf(ErrorCode::kCorrupt, "truncated at offset {} (need {} bytes, have {})", pos_, n, data_.size() - pos_);
    auto v = data_.subspan(pos_, n);
    pos_ += n;
    return v;
  }
  // Reads an array written by PutArray; its element count must be exactly `expected`
  // (pass SIZE_MAX to accept any count up to max_blob bytes).
  template <typename T>
    requires std::is_trivially_copyable_v<T>
  Status GetArray(std::vector<T>* out, size_t expected = SIZE_MAX) {
    auto n = GetU32();
    if (!n) return std::unexpected(n.error());
    if (expected != SIZE_MAX && *n != expected)
      return Errorf(ErrorCode::kCorrupt, "array has {} elements, expected {}", *n, expected);
    size_t bytes = size_t{*n} * sizeof(T);
    if (bytes > max_blob_ || data_.size() - pos_ < bytes)
      return Errorf(ErrorCode::kCorrupt, "bad array length {} at offset {}", *n, pos_ - 4);
    out->resize(*n);
    std::memcpy(out->data(), data_.data() + pos_, bytes);
    pos_ += bytes;
    return {};
  }
  // Checks a component version; returns kVersionMismatch if unsupported.
  Status ExpectVersion(std::string_view component, uint32_t max_supported) {
    auto v = GetU32();
    if (!v) return std::unexpected(v.error().WithContext(component));
    if (*v == 0 || *v > max_supported)
      return Errorf(ErrorCode::kVersionMismatch, "{}: state version {} not supported (max {})", component,
                    *v, max_supported);
    return {};
  }
  Status ExpectEnd(std::string_view component) const {
    if (pos_ != data_.size())
      return Errorf(ErrorCode::kCorrupt, "{}: {} trailing bytes", component, data_.size() - pos_);
    return {};
  }

  size_t position() const { return pos_; }
  size_t remaining() const { return data_.size() - pos_; }

 private:
  std::span<const uint8_t> data_;
  size_t pos_ = 0;
  size_t max_blob_;
};

// Helper for device restore code: unwraps a Result or returns its error.
#define FERRY_ASSIGN(lhs, expr)                                  \
  do {                                                           \
    auto ferry_r_ = (expr);                                      \
    if (!ferry_r_) return std::unexpected(ferry_r_.error());     \
    lhs = std::move(*ferry_r_);                                  \
  } while (0)

}  // namespace ferry
