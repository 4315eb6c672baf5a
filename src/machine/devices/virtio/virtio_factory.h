// Factory for the virtio-mmio (modern, version 2) devices of the virt board.
// Implemented in src/machine/devices/virtio/; used by the board.
#pragma once

#include <array>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "common/error.h"
#include "common/event_loop.h"
#include "machine/device.h"
#include "machine/devices/virtio/net_backend.h"
#include "machine/irq.h"
#include "memory/guest_memory.h"

namespace ferry {

struct VirtioDeps {
  GuestMemory* memory = nullptr;  // DMA goes through here (bounds-checked, marks dirty)
  IrqSink* irq = nullptr;
  uint32_t irq_number = 0;
  EventLoop* loop = nullptr;      // machine thread's loop for host backends (TAP)
  uint64_t mmio_base = 0;         // for id() and logging
};

// File-backed raw image; writes persist to the file.
Result<std::unique_ptr<Device>> CreateVirtioBlk(const VirtioDeps& deps, const std::string& path, bool read_only);
// TAP backend (existing TAP interface `tap_name`, opened with IFF_TAP|IFF_NO_PI|IFF_VNET_HDR as needed).
Result<std::unique_ptr<Device>> CreateVirtioNet(const VirtioDeps& deps, const std::string& tap_name,
                                                std::array<uint8_t, 6> mac);
// Any backend (net_backend.h: the TAP above, or a socket pair where no TAP can exist).
Result<std::unique_ptr<Device>> CreateVirtioNet(const VirtioDeps& deps, std::unique_ptr<NetBackend> backend,
                                                std::array<uint8_t, 6> mac);
// Balloon with free page reporting (VIRTIO_BALLOON_F_FREE_PAGE_REPORTING): reported pages
// are discarded and marked freed in the dirty log. Runs on the machine thread, possibly
// inside the vCPU's Run() (notify register store): see DirtyLog::MarkFreed.
Result<std::unique_ptr<Device>> CreateVirtioBalloon(const VirtioDeps& deps);

// Cumulative free page reporting statistics of a balloon. Which pages are free right now
// is not kept here: the balloon discards every reported range (GuestMemory::Discard), and
// the dirty log's "freed" marks (guest_memory.h) are the record: a page's mark says freed
// from its report until the guest writes it again or a harvest collects it.
class FreePageReport {
 public:
  virtual ~FreePageReport() = default;
  virtual uint64_t total_reports() const = 0;    // ranges ever reported
  virtual uint64_t reported_bytes() const = 0;   // their total length
  virtual uint64_t discarded_bytes() const = 0;  // whole pages released
  virtual uint64_t rejected_ranges() const = 0;  // ranges (partly) outside RAM, not writable, or not discarded
};

// Returns the FreePageReport view of a device made by CreateVirtioBalloon, or null.
FreePageReport* AsFreePageReport(Device* device);

// Sends a gratuitous announcement of the guest MAC (RARP) out of a virtio-net
// device's TAP (used after migration). Returns an error if `device` is not virtio-net.
Status AnnounceMac(Device* device);

}  // namespace ferry
