// All-zero tests for guest pages and buffers (snapshot RAM section, migration zero pages).
//
// Pure functions, thread-safe. The memory read may be concurrently written (guest RAM while the
// vCPU runs): the answer is then that of some mix of old and new bytes, as with any copy; callers
// that need a stable answer test a stable copy.
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <span>

namespace ferry {

inline constexpr size_t kZeroCheckPageSize = 4096;

namespace zero_page_detail {
// OR of 64 words (512 bytes: eight cache lines). The fixed-size loop is vectorised by the compiler;
// the caller exits early between blocks, so a non-zero page usually costs one block.
inline bool BlockIsZero(const uint8_t* p) {
  uint64_t acc = 0;
  for (size_t i = 0; i < 512; i += 8) {
    uint64_t w;
    std::memcpy(&w, p + i, 8);  // no alignment or aliasing assumption; compiles to plain loads
    acc |= w;
  }
  return acc == 0;
}
}  // namespace zero_page_detail

// True if the kZeroCheckPageSize (4096) bytes at p are all zero.
inline bool IsZeroPage(const uint8_t* p) {
  for (size_t off = 0; off < kZeroCheckPageSize; off += 512)
    if (!zero_page_detail::BlockIsZero(p + off)) return false;
  return true;
}

// True if every byte of b is zero (true for an empty span).
inline bool IsAllZero(std::span<const uint8_t> b) {
  const uint8_t* p = b.data();
  size_t n = b.size();
  for (; n >= 512; p += 512, n -= 512)
    if (!zero_page_detail::BlockIsZero(p)) return false;
  uint64_t acc = 0;
  for (; n >= 8; p += 8, n -= 8) {
    uint64_t w;
    std::memcpy(&w, p, 8);
    acc |= w;
  }
  for (; n > 0; ++p, --n) acc |= *p;
  return acc == 0;
}

}  // namespace ferry
