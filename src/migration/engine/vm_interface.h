// What the migration engine needs from a VMM, and nothing more: a RAM view with a
// dirty log, the guest-visible configuration, pause/resume, and opaque named state
// records. The engine never sees CPU or device details (a KVM backend or another VMM
// implements the same two interfaces). Implemented for ferry-vmm in src/vmm/migration*.
#pragma once

#include <cstdint>
#include <vector>

#include <nlohmann/json.hpp>

#include "common/error.h"
#include "memory/guest_memory.h"
#include "migration/protocol/wire.h"

namespace ferry::migration {

struct RamView {
  uint8_t* host = nullptr;  // guest RAM, `size` bytes, page i at host + i * 4096
  uint64_t size = 0;
  DirtyLog* dirty_log = nullptr;  // source only
  int memfd = -1;                 // optional: lets the source skip never-touched holes
};

// Threading: every method may be called from the migration thread; implementations
// marshal to their own threads (ferry-vmm posts to the machine thread).
class SourceVm {
 public:
  virtual ~SourceVm() = default;
  virtual RamView Ram() = 0;
  virtual Result<nlohmann::json> Config() = 0;
  // Stops the vCPUs and device backends (no further guest memory writes).
  virtual Status Pause() = 0;
  // Undoes Pause() after a failed or cancelled migration.
  virtual Status Resume() = 0;
  // Called paused: CPU and device state as named records.
  virtual Result<std::vector<StateRecord>> SaveState() = 0;
  // The guest now runs on the destination: this copy must never run again.
  virtual void OnMigrated(const std::string& destination) = 0;
};

class DestinationVm {
 public:
  virtual ~DestinationVm() = default;
  // Builds the (not running) machine for the configuration; rejects a mismatch with a
  // clear error before any page moves. Returns its RAM.
  virtual Result<RamView> Prepare(const nlohmann::json& config) = 0;
  // RAM is complete: restores CPU and device state (all-or-nothing).
  virtual Status Restore(const std::vector<StateRecord>& state) = 0;
  // Runs the guest and announces it on the network.
  virtual Status Start() = 0;
};

}  // namespace ferry::migration
