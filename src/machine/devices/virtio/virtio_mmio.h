// virtio-mmio transport, version 2 (virtio 1.1 §4.2.2), with split virtqueues.
// Every guest-controlled index, length and address is validated; a bad descriptor puts
// the device into DEVICE_NEEDS_RESET (logged), never reads host memory outside RAM.
#pragma once

#include <string>
#include <vector>

#include "common/state_io.h"
#include "machine/devices/virtio/virtio_factory.h"

namespace ferry {

struct VirtioSeg {
  uint64_t gpa;
  uint32_t len;
  bool writable;
};
struct VirtioChain {
  uint16_t head = 0;
  std::vector<VirtioSeg> segs;
  uint64_t readable_bytes() const;
  uint64_t writable_bytes() const;
};

class VirtioMmioDevice : public Device {
 public:
  static constexpr uint16_t kQueueMax = 256;
  static constexpr uint64_t kFeatureVersion1 = 1ull << 32;
  static constexpr uint32_t kStatusNeedsReset = 0x40, kStatusDriverOk = 4;

  VirtioMmioDevice(const VirtioDeps& deps, uint32_t device_id, int num_queues, uint64_t device_features);
  std::string id() const override;
  bool MmioRead(uint64_t offset, unsigned size, uint64_t* value) override;
  bool MmioWrite(uint64_t offset, unsigned size, uint64_t value) override;
  std::vector<uint8_t> SaveState() const override;
  Status RestoreState(std::span<const uint8_t> blob) override;
  nlohmann::json Metrics() const override;
  void PostRestore() override;

 protected:
  struct Queue {
    uint16_t num = kQueueMax;
    bool ready = false;
    uint64_t desc = 0, avail = 0, used = 0;
    uint16_t last_avail = 0;  // next avail ring entry to consume
    uint16_t next_used = 0;   // next used ring index to produce
  };
  // Device hooks.
  virtual void OnQueueNotify(int queue) = 0;
  virtual void OnDriverOk() {}
  virtual void OnReset() {}
  virtual bool ReadConfig(uint64_t offset, unsigned size, uint64_t* value) = 0;
  virtual bool WriteConfig(uint64_t, unsigned, uint64_t) { return true; }
  virtual void SaveDevice(StateWriter&) const {}
  // Version of this device's blob (transport fields + device bytes): 1 until a device
  // changes its device bytes. SaveState writes it; RestoreState accepts 1..state_version()
  // and passes the blob's version to RestoreDevice, so older blobs keep restoring.
  virtual uint32_t state_version() const { return 1; }
  // Must validate all of its bytes (including that none are left over) before changing anything.
  virtual Status RestoreDevice(StateReader&, uint32_t /*version*/) { return {}; }
  virtual nlohmann::json DeviceMetrics() const { return nlohmann::json::object(); }
  virtual std::string kind() const = 0;

  // Queue helpers. PopChain returns false when the queue is empty, not ready, or broken
  // (then the device is marked NEEDS_RESET).
  bool QueueUsable(int q) const;
  bool PopChain(int q, VirtioChain* chain);
  void PushUsed(int q, uint16_t head, uint32_t written);
  // Copies the readable part of a chain (after `skip` bytes) into out; false on a DMA error.
  bool ReadChain(const VirtioChain& c, uint64_t skip, void* out, uint64_t len);
  // Writes into the writable part of a chain starting at writable offset `at`.
  bool WriteChain(const VirtioChain& c, uint64_t at, const void* data, uint64_t len);
  void SignalUsed();
  void DeviceError(const std::string& what);
  bool driver_ok() const { return (status_ & kStatusDriverOk) && !(status_ & kStatusNeedsReset); }
  GuestMemory* memory() const { return deps_.memory; }
  const VirtioDeps& deps() const { return deps_; }
  uint64_t driver_features() const { return driver_features_; }

  std::vector<Queue> queues_;

 private:
  void Reset();
  void UpdateIrq();
  VirtioDeps deps_;
  uint32_t device_id_;
  uint64_t device_features_;
  uint64_t driver_features_ = 0;
  uint32_t device_features_sel_ = 0, driver_features_sel_ = 0, queue_sel_ = 0;
  uint32_t status_ = 0, interrupt_status_ = 0, config_generation_ = 0;
  uint64_t notifies_ = 0, interrupts_ = 0, errors_ = 0;
};

}  // namespace ferry
