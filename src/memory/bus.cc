#include "memory/bus.h"

#include <algorithm>

#include <spdlog/spdlog.h>

namespace ferry {

bool MmioBus::Register(uint64_t base, uint64_t size, MmioDevice* device, std::string name) {
  for (const Region& r : regions_)
    if (base < r.base + r.size && r.base < base + size) return false;
  regions_.push_back({base, size, device, std::move(name)});
  std::sort(regions_.begin(), regions_.end(), [](const Region& a, const Region& b) { return a.base < b.base; });
  return true;
}

const MmioBus::Region* MmioBus::Find(uint64_t addr) const {
  auto it = std::upper_bound(regions_.begin(), regions_.end(), addr,
                             [](uint64_t a, const Region& r) { return a < r.base; });
  if (it == regions_.begin()) return nullptr;
  --it;
  return addr - it->base < it->size ? &*it : nullptr;
}

bool MmioBus::Read(uint64_t addr, unsigned size, uint64_t* value) const {
  const Region* r = Find(addr);
  if (!r || addr - r->base + size > r->size) {
    if (unhandled_++ < 16) spdlog::warn("mmio: unhandled read of {} bytes at {:#x}", size, addr);
    *value = 0;
    return false;
  }
  return r->device->MmioRead(addr - r->base, size, value);
}

bool MmioBus::Write(uint64_t addr, unsigned size, uint64_t value) const {
  const Region* r = Find(addr);
  if (!r || addr - r->base + size > r->size) {
    if (unhandled_++ < 16) spdlog::warn("mmio: unhandled write of {} bytes at {:#x}", size, addr);
    return false;
  }
  return r->device->MmioWrite(addr - r->base, size, value);
}

}  // namespace ferry
