// The QEMU-`virt`-compatible board: RAM at 0x80000000, CLINT, PLIC, ns16550a UART and
// virtio-mmio slots at the same addresses and IRQs as QEMU, a generated device tree,
// the in-VMM SBI, and one hart. The board owns everything guest-visible; the VMM
// (src/vmm) owns threads, the API and snapshot files.
//
// Threading: after Create(), everything here is used on the machine thread only (or
// while the VM is paused), except Clint::Ticks() and the Vcpu's thread-safe methods.
#pragma once

#include <array>
#include <functional>
#include <map>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "common/error.h"
#include "common/event_loop.h"
#include "cpu/vcpu.h"
#include "machine/device.h"
#include "machine/devices/clint/clint.h"
#include "machine/devices/plic/plic.h"
#include "machine/devices/uart/uart.h"
#include "machine/sbi/sbi.h"
#include "memory/bus.h"
#include "memory/guest_memory.h"

namespace ferry {

inline constexpr uint64_t kRamBase = 0x80000000;
inline constexpr uint64_t kClintBase = 0x2000000;
inline constexpr uint64_t kPlicBase = 0xc000000;
inline constexpr uint64_t kUartBase = 0x10000000;
inline constexpr uint32_t kUartIrq = 10;
inline constexpr uint64_t kVirtioBase = 0x10001000;
inline constexpr uint64_t kVirtioStride = 0x1000;
inline constexpr uint32_t kVirtioIrqBase = 1;
inline constexpr int kVirtioSlots = 8;
inline constexpr uint64_t kMinRam = 16ull << 20;
inline constexpr uint64_t kMaxRam = 64ull << 30;

using MacAddress = std::array<uint8_t, 6>;
std::string FormatMac(const MacAddress& mac);
Result<MacAddress> ParseMac(const std::string& s);

struct BoardConfig {
  uint64_t ram_bytes = 256ull << 20;
  std::string kernel;   // Linux RISC-V Image; empty when restoring
  std::string initrd;   // optional
  std::string cmdline = "console=ttyS0 earlycon=sbi";
  std::string disk;     // optional raw image for virtio-blk
  bool disk_read_only = false;
  std::string tap;      // optional TAP name for virtio-net
  std::optional<MacAddress> mac;
  bool balloon = false;
  std::function<void(std::span<const uint8_t>)> console_out;
  EventLoop* loop = nullptr;

  // Guest-visible configuration (what must match between snapshot/migration source
  // and destination): RAM size, cmdline, which devices, MAC. Host-side details (paths,
  // TAP names) are not part of it.
  nlohmann::json GuestJson() const;
  // Applies the guest-visible part of `j` onto this config (host-side fields kept).
  Status ApplyGuestJson(const nlohmann::json& j);
};

class Board {
 public:
  // load_kernel=false builds the same machine without loading anything (restore,
  // incoming migration): RAM content and state arrive afterwards.
  static Result<std::unique_ptr<Board>> Create(const BoardConfig& config, bool load_kernel);
  ~Board();

  const BoardConfig& config() const { return config_; }
  GuestMemory& memory() { return *memory_; }
  MmioBus& bus() { return bus_; }
  Vcpu& vcpu() { return *vcpu_; }
  Clint& clint() { return *clint_; }
  Uart& uart() { return *uart_; }
  // Every stateful device, in a stable order (snapshot/migration state records).
  std::vector<Device*> devices();
  Device* FindDevice(const std::string& id);
  // Restores every device from blobs keyed by Device::id(); all must be present.
  Status RestoreDevices(const std::map<std::string, std::vector<uint8_t>>& blobs);
  void PostRestore();
  const std::vector<uint8_t>& fdt() const { return fdt_; }
  Device* net_device() { return net_; }
  Device* balloon_device() { return balloon_; }

 private:
  Board() = default;
  Status Build(bool load_kernel);
  Status BuildFdt(uint64_t initrd_start, uint64_t initrd_end);
  Status LoadKernel(uint64_t* entry, uint64_t* kernel_end);

  BoardConfig config_;
  std::unique_ptr<GuestMemory> memory_;
  MmioBus bus_;
  std::unique_ptr<Clint> clint_;
  std::unique_ptr<Sbi> sbi_;
  std::unique_ptr<Vcpu> vcpu_;
  std::unique_ptr<Plic> plic_;
  std::unique_ptr<Uart> uart_;
  std::vector<std::unique_ptr<Device>> virtio_;  // slot order
  struct VirtioSlot {
    int slot;
    uint32_t device_id;
  };
  std::vector<VirtioSlot> virtio_slots_;
  Device* net_ = nullptr;
  Device* balloon_ = nullptr;
  std::vector<uint8_t> fdt_;
};

}  // namespace ferry
