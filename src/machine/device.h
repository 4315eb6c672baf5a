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
  // Called after every device was restored and before the vCPU resumes (re-raise
  // interrupt lines, re-arm backends). Default: nothing.
  virtual void PostRestore() {}
};

}  // namespace ferry
