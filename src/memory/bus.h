// MMIO bus: maps guest-physical ranges to devices. The CPU backend calls
// MmioBus::Read/Write for any physical access outside RAM; a miss or a device
// refusing the access becomes an access fault in the guest (never a VMM crash).
//
// Threading: Register() only before vCPUs start. Read/Write are called on the
// machine thread (the thread running the vCPU); devices are not otherwise locked.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace ferry {

class MmioDevice {
 public:
  virtual ~MmioDevice() = default;
  // size is 1, 2, 4 or 8. Return false for an access the device does not accept
  // (the guest gets an access fault).
  virtual bool MmioRead(uint64_t offset, unsigned size, uint64_t* value) = 0;
  virtual bool MmioWrite(uint64_t offset, unsigned size, uint64_t value) = 0;
};

class MmioBus {
 public:
  struct Region {
    uint64_t base;
    uint64_t size;
    MmioDevice* device;
    std::string name;
  };
  // Returns false if the range overlaps an existing region.
  bool Register(uint64_t base, uint64_t size, MmioDevice* device, std::string name);
  const Region* Find(uint64_t addr) const;

  bool Read(uint64_t addr, unsigned size, uint64_t* value) const;
  bool Write(uint64_t addr, unsigned size, uint64_t value) const;

  const std::vector<Region>& regions() const { return regions_; }
  uint64_t unhandled_accesses() const { return unhandled_; }

 private:
  std::vector<Region> regions_;  // sorted by base
  mutable uint64_t unhandled_ = 0;
};

}  // namespace ferry
