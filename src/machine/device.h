// Every board device (Firecracker model): the device itself (MMIO), persist
// (versioned save/restore blob) and metrics.
//
// Threading: all methods are called on the machine thread (the thread running the
// vCPU and the event loop), or while the VM is paused.
#pragma once

#include <cstdint>
#include <span>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "common/error.h"
#include "memory/bus.h"

namespace ferry {

// Cumulative I/O a device has done for the guest (an activity signal: live migration
// stops in lulls). Devices without guest I/O report zeros.
struct DeviceActivity {
  uint64_t packets = 0;   // network frames received and transmitted
  uint64_t requests = 0;  // block requests completed
};

class Device : public MmioDevice {
 public:
  // Stable identifier used as the key of this device's state in snapshots and
  // migration streams, e.g. "uart0", "plic", "virtio-blk@10008000".
  virtual std::string id() const = 0;
  virtual std::vector<uint8_t> SaveState() const = 0;
  // Must reject (kCorrupt / kVersionMismatch) anything it did not write, without
  // changing the device on failure.
  virtual Status RestoreState(std::span<const uint8_t> blob) = 0;
  virtual nlohmann::json Metrics() const = 0;
  // Cumulative I/O counters (cheap: read on the machine thread every 10 ms). Default: none.
  virtual DeviceActivity Activity() const { return {}; }
  // Called after every device was restored and before the vCPU resumes (re-raise
  // interrupt lines, re-arm backends). Default: nothing.
  virtual void PostRestore() {}
};

}  // namespace ferry
