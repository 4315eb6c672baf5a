// CRC32C (Castagnoli), used by the snapshot format and the migration protocol.
#pragma once
#include <cstddef>
#include <cstdint>
#include <span>

namespace ferry {
// Incremental: Crc32c(data2, Crc32c(data1)) == Crc32c(data1 ++ data2).
uint32_t Crc32c(std::span<const uint8_t> data, uint32_t crc = 0);
inline uint32_t Crc32c(const void* p, size_t n, uint32_t crc = 0) {
  return Crc32c(std::span<const uint8_t>(static_cast<const uint8_t*>(p), n), crc);
}
}  // namespace ferry
