#include "machine/devices/virtio/virtio_mmio.h"

#include <cstring>

#include <spdlog/spdlog.h>

#include "common/state_io.h"

namespace ferry {
namespace {
constexpr uint32_t kMagic = 0x74726976, kVendor = 0x554d4551;
constexpr uint16_t kDescNext = 1, kDescWrite = 2, kDescIndirect = 4;
constexpr size_t kMaxChain = 1024;
}  // namespace

uint64_t VirtioChain::readable_bytes() const {
  uint64_t n = 0;
  for (auto& s : segs) if (!s.writable) n += s.len;
  return n;
}
uint64_t VirtioChain::writable_bytes() const {
  uint64_t n = 0;
  for (auto& s : segs) if (s.writable) n += s.len;
  return n;
}

VirtioMmioDevice::VirtioMmioDevice(const VirtioDeps& deps, uint32_t device_id, int num_queues, uint64_t device_features)
    : queues_(static_cast<size_t>(num_queues)), deps_(deps), device_id_(device_id),
      device_features_(device_features | kFeatureVersion1) {}

std::string VirtioMmioDevice::id() const { return fmt::format("virtio@{:x}", deps_.mmio_base); }

void VirtioMmioDevice::Reset() {
  for (auto& q : queues_) q = Queue{};
  driver_features_ = 0;
  device_features_sel_ = driver_features_sel_ = queue_sel_ = 0;
  status_ = 0;
  interrupt_status_ = 0;
  UpdateIrq();
  OnReset();
}

void VirtioMmioDevice::UpdateIrq() {
  if (deps_.irq) deps_.irq->SetIrq(deps_.irq_number, interrupt_status_ != 0);
}

void VirtioMmioDevice::SignalUsed() {
  interrupt_status_ |= 1;
  interrupts_++;
  UpdateIrq();
}

void VirtioMmioDevice::DeviceError(const std::string& what) {
  errors_++;
  spdlog::warn("{} ({}): guest driver error: {}; device needs reset", id(), kind(), what);
  status_ |= kStatusNeedsReset;
  interrupt_status_ |= 2;  // configuration change
  UpdateIrq();
}

bool VirtioMmioDevice::MmioRead(uint64_t off, unsigned size, uint64_t* value) {
  if (off >= 0x100) return ReadConfig(off - 0x100, size, value);
  if (size != 4) return false;
  Queue* q = queue_sel_ < queues_.size() ? &queues_[queue_sel_] : nullptr;
  uint64_t v = 0;
  switch (off) {
    case 0x000: v = kMagic; break;
    case 0x004: v = 2; break;
    case 0x008: v = device_id_; break;
    case 0x00c: v = kVendor; break;
    case 0x010: v = device_features_sel_ < 2 ? (device_features_ >> (32 * device_features_sel_)) & 0xffffffff : 0; break;
    case 0x034: v = q ? kQueueMax : 0; break;
    case 0x044: v = q ? q->ready : 0; break;
    case 0x060: v = interrupt_status_; break;
    case 0x070: v = status_; break;
    case 0x0fc: v = config_generation_; break;
    default: v = 0;
  }
  *value = v;
  return true;
}

bool VirtioMmioDevice::MmioWrite(uint64_t off, unsigned size, uint64_t value) {
  if (off >= 0x100) return WriteConfig(off - 0x100, size, value);
  if (size != 4) return false;
  const uint32_t v = static_cast<uint32_t>(value);
  Queue* q = queue_sel_ < queues_.size() ? &queues_[queue_sel_] : nullptr;
  auto set_lo = [](uint64_t& r, uint32_t x) { r = (r & ~0xffffffffull) | x; };
  auto set_hi = [](uint64_t& r, uint32_t x) { r = (r & 0xffffffffull) | (static_cast<uint64_t>(x) << 32); };
  switch (off) {
    case 0x014: device_features_sel_ = v; break;
    case 0x020:
      if (driver_features_sel_ < 2) {
        uint64_t mask = 0xffffffffull << (32 * driver_features_sel_);
        driver_features_ = (driver_features_ & ~mask) | ((static_cast<uint64_t>(v) << (32 * driver_features_sel_)) & device_features_);
      }
      break;
    case 0x024: driver_features_sel_ = v; break;
    case 0x030: queue_sel_ = v; break;
    case 0x038:
      if (q) {
        if (v == 0 || v > kQueueMax || (v & (v - 1))) DeviceError(fmt::format("queue size {} invalid", v));
        else q->num = static_cast<uint16_t>(v);
      }
      break;
    case 0x044: if (q) q->ready = v & 1; break;
    case 0x050:
      notifies_++;
      if (v < queues_.size() && driver_ok()) OnQueueNotify(static_cast<int>(v));
      break;
    case 0x064:
      interrupt_status_ &= ~v;
      UpdateIrq();
      break;
    case 0x070:
      if (v == 0) { Reset(); break; }
      if ((v & kStatusDriverOk) && !(status_ & kStatusDriverOk)) {
        status_ = v;
        if (!(driver_features_ & kFeatureVersion1)) DeviceError("driver did not accept VIRTIO_F_VERSION_1");
        else OnDriverOk();
      } else {
        status_ = v | (status_ & kStatusNeedsReset);
      }
      break;
    case 0x080: if (q) set_lo(q->desc, v); break;
    case 0x084: if (q) set_hi(q->desc, v); break;
    case 0x090: if (q) set_lo(q->avail, v); break;
    case 0x094: if (q) set_hi(q->avail, v); break;
    case 0x0a0: if (q) set_lo(q->used, v); break;
    case 0x0a4: if (q) set_hi(q->used, v); break;
    default: break;
  }
  return true;
}

bool VirtioMmioDevice::QueueUsable(int qi) const {
  return qi >= 0 && static_cast<size_t>(qi) < queues_.size() && queues_[qi].ready && driver_ok();
}

bool VirtioMmioDevice::PopChain(int qi, VirtioChain* chain) {
  if (!QueueUsable(qi)) return false;
  Queue& q = queues_[qi];
  GuestMemory* m = deps_.memory;
  uint16_t avail_idx;
  if (!m->Read(q.avail + 2, &avail_idx, 2)) { DeviceError("avail ring outside RAM"); return false; }
  if (avail_idx == q.last_avail) return false;
  if (static_cast<uint16_t>(avail_idx - q.last_avail) > q.num) { DeviceError("avail index jumped past queue size"); return false; }
  uint16_t head;
  if (!m->Read(q.avail + 4 + 2ull * (q.last_avail % q.num), &head, 2)) { DeviceError("avail ring outside RAM"); return false; }
  if (head >= q.num) { DeviceError(fmt::format("descriptor head {} out of range", head)); return false; }
  chain->head = head;
  chain->segs.clear();
  uint64_t table = q.desc;
  uint32_t table_size = q.num;
  uint16_t idx = head;
  bool indirect_used = false;
  for (size_t n = 0;; ++n) {
    if (n >= kMaxChain) { DeviceError("descriptor chain too long (loop?)"); return false; }
    struct { uint64_t addr; uint32_t len; uint16_t flags; uint16_t next; } d;
    if (!m->Read(table + 16ull * idx, &d, 16)) { DeviceError("descriptor table outside RAM"); return false; }
    if (d.flags & kDescIndirect) {
      if (indirect_used || (d.flags & kDescNext) || d.len % 16 || d.len == 0 || d.len / 16 > kMaxChain) {
        DeviceError("bad indirect descriptor");
        return false;
      }
      indirect_used = true;
      table = d.addr;
      table_size = d.len / 16;
      idx = 0;
      continue;
    }
    if (!m->Contains(d.addr, d.len)) { DeviceError(fmt::format("buffer [{:#x}, +{}) outside RAM", d.addr, d.len)); return false; }
    bool w = d.flags & kDescWrite;
    if (!w && !chain->segs.empty() && chain->segs.back().writable) { DeviceError("readable descriptor after writable"); return false; }
    chain->segs.push_back({d.addr, d.len, w});
    if (!(d.flags & kDescNext)) break;
    if (d.next >= table_size) { DeviceError("descriptor next out of range"); return false; }
    idx = d.next;
  }
  q.last_avail++;
  return true;
}

void VirtioMmioDevice::PushUsed(int qi, uint16_t head, uint32_t written) {
  Queue& q = queues_[qi];
  GuestMemory* m = deps_.memory;
  uint32_t elem[2] = {head, written};
  if (!m->Write(q.used + 4 + 8ull * (q.next_used % q.num), elem, 8)) { DeviceError("used ring outside RAM"); return; }
  q.next_used++;
  if (!m->Write(q.used + 2, &q.next_used, 2)) { DeviceError("used ring outside RAM"); return; }
}

bool VirtioMmioDevice::ReadChain(const VirtioChain& c, uint64_t skip, void* out, uint64_t len) {
  auto* dst = static_cast<uint8_t*>(out);
  for (const auto& s : c.segs) {
    if (s.writable || len == 0) continue;
    if (skip >= s.len) { skip -= s.len; continue; }
    uint64_t n = std::min<uint64_t>(s.len - skip, len);
    if (!deps_.memory->Read(s.gpa + skip, dst, n)) return false;
    dst += n;
    len -= n;
    skip = 0;
  }
  return len == 0;
}

bool VirtioMmioDevice::WriteChain(const VirtioChain& c, uint64_t at, const void* data, uint64_t len) {
  const auto* src = static_cast<const uint8_t*>(data);
  for (const auto& s : c.segs) {
    if (!s.writable || len == 0) continue;
    if (at >= s.len) { at -= s.len; continue; }
    uint64_t n = std::min<uint64_t>(s.len - at, len);
    if (!deps_.memory->Write(s.gpa + at, src, n)) return false;  // marks the dirty log
    src += n;
    len -= n;
    at = 0;
  }
  return len == 0;
}

std::vector<uint8_t> VirtioMmioDevice::SaveState() const {
  StateWriter w;
  w.PutU32(state_version());
  w.PutU32(device_id_);
  w.PutU64(driver_features_);
  for (uint32_t v : {device_features_sel_, driver_features_sel_, queue_sel_, status_, interrupt_status_, config_generation_})
    w.PutU32(v);
  w.PutU32(static_cast<uint32_t>(queues_.size()));
  for (const Queue& q : queues_) {
    w.PutU16(q.num);
    w.PutBool(q.ready);
    w.PutU64(q.desc);
    w.PutU64(q.avail);
    w.PutU64(q.used);
    w.PutU16(q.last_avail);
    w.PutU16(q.next_used);
  }
  StateWriter dev;
  SaveDevice(dev);
  w.PutBytes(dev.data());
  return w.Take();
}

Status VirtioMmioDevice::RestoreState(std::span<const uint8_t> blob) {
  StateReader r(blob);
  FERRY_RETURN_IF_ERROR(r.ExpectVersion(kind(), state_version()), id());
  uint32_t version;
  std::memcpy(&version, blob.data(), sizeof version);  // present and in 1..state_version(): checked above
  uint32_t dev_id, regs[6], nq;
  uint64_t drv;
  FERRY_ASSIGN(dev_id, r.GetU32());
  if (dev_id != device_id_) return Errorf(ErrorCode::kCorrupt, "{}: state is for virtio device id {}, not {}", id(), dev_id, device_id_);
  FERRY_ASSIGN(drv, r.GetU64());
  for (auto& v : regs) FERRY_ASSIGN(v, r.GetU32());
  FERRY_ASSIGN(nq, r.GetU32());
  if (nq != queues_.size()) return Errorf(ErrorCode::kCorrupt, "{}: {} queues saved, device has {}", id(), nq, queues_.size());
  std::vector<Queue> qs(nq);
  for (Queue& q : qs) {
    FERRY_ASSIGN(q.num, r.GetU16());
    FERRY_ASSIGN(q.ready, r.GetBool());
    FERRY_ASSIGN(q.desc, r.GetU64());
    FERRY_ASSIGN(q.avail, r.GetU64());
    FERRY_ASSIGN(q.used, r.GetU64());
    FERRY_ASSIGN(q.last_avail, r.GetU16());
    FERRY_ASSIGN(q.next_used, r.GetU16());
    // As the driver may set it (split rings: a power of two up to the maximum).
    if (q.num == 0 || q.num > kQueueMax || (q.num & (q.num - 1)))
      return Errorf(ErrorCode::kCorrupt, "{}: bad queue size {} (a power of two up to {})", id(), q.num, kQueueMax);
  }
  std::vector<uint8_t> dev;
  FERRY_ASSIGN(dev, r.GetBytes());
  FERRY_RETURN_IF_ERROR(r.ExpectEnd(kind()), id());
  if (drv & ~device_features_) return Errorf(ErrorCode::kCorrupt, "{}: saved features {:#x} not offered", id(), drv);
  StateReader dr(dev);
  FERRY_RETURN_IF_ERROR(RestoreDevice(dr, version), id());
  FERRY_RETURN_IF_ERROR(dr.ExpectEnd(kind()), id());
  driver_features_ = drv;
  device_features_sel_ = regs[0]; driver_features_sel_ = regs[1]; queue_sel_ = regs[2];
  status_ = regs[3]; interrupt_status_ = regs[4]; config_generation_ = regs[5];
  queues_ = std::move(qs);
  return {};
}

void VirtioMmioDevice::PostRestore() {
  UpdateIrq();
  if (driver_ok()) OnDriverOk();
}

nlohmann::json VirtioMmioDevice::Metrics() const {
  nlohmann::json j = DeviceMetrics();
  j["kind"] = kind();
  j["status"] = status_;
  j["notifies"] = notifies_;
  j["interrupts"] = interrupts_;
  j["errors"] = errors_;
  return j;
}

}  // namespace ferry
