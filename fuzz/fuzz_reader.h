// Input reader shared by the fuzz targets: takes byte runs and little-endian integers off the
// front of the fuzzer's input; every read fails (false) rather than reading past the end.
#pragma once

#include <cstddef>
#include <cstdint>
#include <span>

namespace ferry::fuzz {

struct Reader {
  std::span<const uint8_t> d;
  bool Take(size_t n, std::span<const uint8_t>* out) {
    if (d.size() < n) return false;
    *out = d.first(n);
    d = d.subspan(n);
    return true;
  }
  template <class T>
  bool Get(T* v) {
    std::span<const uint8_t> b;
    if (!Take(sizeof(T), &b)) return false;
    *v = 0;
    for (size_t i = 0; i < sizeof(T); ++i) *v |= static_cast<T>(static_cast<T>(b[i]) << (8 * i));
    return true;
  }
};

}  // namespace ferry::fuzz
