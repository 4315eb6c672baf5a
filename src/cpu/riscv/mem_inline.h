// Fast paths for guest loads/stores (TLB hit -> host pointer). Included only by the
// executor translation units of RiscvCpu.
#pragma once

#include <cstring>

#include "cpu/riscv/riscv_cpu.h"

namespace ferry::riscv {

inline int RiscvCpu::EffectivePriv(Access acc) const {
  if (acc != Access::kFetch && priv_ == kMachine && (mstatus_ & kMstatusMPRV))
    return static_cast<int>((mstatus_ >> 11) & 3);
  return priv_;
}

template <typename T>
inline bool RiscvCpu::Load(uint64_t va, T* out) {
  uint64_t vpn = va >> 12;
  const TlbEntry& e = tlb_read_[vpn & (kTlbSize - 1)];
  if (e.tag == ((vpn << 2) | static_cast<uint64_t>(EffectivePriv(Access::kRead))) &&
      (va & 0xfff) <= 0x1000 - sizeof(T)) {
    std::memcpy(out, reinterpret_cast<const void*>(va + e.addend), sizeof(T));
    return true;
  }
  uint64_t v;
  if (!LoadSlow(va, sizeof(T), &v)) return false;
  *out = static_cast<T>(v);
  return true;
}

template <typename T>
inline bool RiscvCpu::Store(uint64_t va, T v) {
  uint64_t vpn = va >> 12;
  const TlbEntry& e = tlb_write_[vpn & (kTlbSize - 1)];
  if (e.tag == ((vpn << 2) | static_cast<uint64_t>(EffectivePriv(Access::kWrite))) &&
      (va & 0xfff) <= 0x1000 - sizeof(T)) {
    std::memcpy(reinterpret_cast<void*>(va + e.addend), &v, sizeof(T));
    if (va == reservation_) reservation_ = ~0ull;
    return true;
  }
  return StoreSlow(va, sizeof(T), static_cast<uint64_t>(v));
}

}  // namespace ferry::riscv
