// Save/restore of virtio-net and virtio-balloon (virtio-blk's is in machine_test.cc):
// round trip with live queue state, and rejection of truncated, corrupt, newer-version,
// trailing-byte and foreign blobs without changing the device; the balloon's free page
// reporting (discard + dirty-log marks) and its version 1 blobs.
#include <sys/socket.h>
#include <unistd.h>

#include <array>
#include <cstring>
#include <map>
#include <vector>

#include <gtest/gtest.h>

#include "common/state_io.h"
#include "machine/board.h"
#include "machine/device_test_util.h"
#include "machine/devices/virtio/net_backend.h"
#include "machine/devices/virtio/virtio_factory.h"

namespace ferry {
namespace {
using test_util::ExpectPersistContract;
using test_util::RecordingIrq;

using test_util::kAvail;
using test_util::kDesc;
using test_util::kUsed;
using test_util::SetUpQueue;

uint64_t Reg(Device& d, uint64_t off) {
  uint64_t v = 0;
  EXPECT_TRUE(d.MmioRead(off, 4, &v));
  return v;
}

// Blob layout (virtio_mmio.cc): version, device id, driver features (u64), 6 registers,
// queue count, per queue {u16 num, bool ready, u64 desc, avail, used, u16 last_avail,
// u16 next_used}, then the device-specific bytes (u32 length + payload).
size_t DeviceBytesOffset(size_t queues) { return 4 + 4 + 8 + 6 * 4 + 4 + queues * (2 + 1 + 3 * 8 + 2 + 2); }

class VirtioNetPersist : public ::testing::Test {
 protected:
  void SetUp() override {
    mem_ = std::move(*GuestMemory::Create(kRamBase, 16 << 20));
    deps_.memory = mem_.get();
    // A TAP interface that exists only while the device holds it (needs CAP_NET_ADMIN).
    for (int i = 0; i < 2; ++i) {
      auto dev = CreateVirtioNet(deps_, fmt::format("fyut{}n{}", getpid() % 100000, i), mac_);
      if (!dev) GTEST_SKIP() << "no TAP device available: " << dev.error().ToString();
      dev_[i] = std::move(*dev);
    }
  }
  std::unique_ptr<GuestMemory> mem_;
  RecordingIrq irq_;
  VirtioDeps deps_{nullptr, &irq_, 3, nullptr, kVirtioBase + 0x2000};
  std::array<uint8_t, 6> mac_{0x52, 0x54, 0x00, 0x12, 0x34, 0x56};
  std::unique_ptr<Device> dev_[2];

};

// The socket-pair backend (net_backend.h, what tests and fuzzers use where no TAP exists) carries
// frames both ways through the real device: a guest TX chain arrives at the network's end whole,
// a frame the network sends lands in the guest's posted RX buffer with num_buffers = 1.
TEST(VirtioNetBackend, SocketPairCarriesFramesBothWays) {
  auto mem = std::move(*GuestMemory::Create(kRamBase, 16 << 20));
  RecordingIrq irq;
  VirtioDeps deps{mem.get(), &irq, 3, nullptr, kVirtioBase};
  const std::array<uint8_t, 6> mac{0x52, 0x54, 0x00, 0x12, 0x34, 0x56};
  struct Desc { uint64_t addr; uint32_t len; uint16_t flags, next; };
  uint8_t frame[12 + 60] = {};
  std::memset(frame + 12, 0xff, 6);
  std::memcpy(frame + 18, mac.data(), 6);
  for (size_t i = 24; i < sizeof frame; ++i) frame[i] = static_cast<uint8_t>(i);

  // A device on a fresh pair, its queue q set up; *peer: the network's end.
  auto make = [&](const char* name, int q, int* peer) -> std::unique_ptr<Device> {
    auto pair = SocketPairBackend(name);
    if (!pair) return nullptr;
    *peer = pair->peer;
    auto dev = CreateVirtioNet(deps, std::move(pair->backend), mac);
    if (!dev) return nullptr;
    SetUpQueue(**dev, 1u << 5, q);
    return std::move(*dev);
  };
  int tx_peer = -1, rx_peer = -1;
  auto tx = make("tx-test", 1, &tx_peer);
  ASSERT_TRUE(tx);
  ASSERT_TRUE(mem->Write(kRamBase + 0x8000, frame, sizeof frame));
  Desc d0{kRamBase + 0x8000, sizeof frame, 0, 0};
  ASSERT_TRUE(mem->Write(kDesc, &d0, sizeof d0));
  uint16_t ring[3] = {0, 1, 0};
  ASSERT_TRUE(mem->Write(kAvail, ring, 6));
  tx->MmioWrite(0x50, 4, 1);
  uint8_t got[128];
  EXPECT_EQ(recv(tx_peer, got, sizeof got, MSG_DONTWAIT), static_cast<ssize_t>(sizeof frame));
  EXPECT_EQ(std::memcmp(got, frame, sizeof frame), 0);
  EXPECT_EQ(tx->Metrics()["tx_packets"], 1u);
  close(tx_peer);

  auto rx = make("rx-test", 0, &rx_peer);
  ASSERT_TRUE(rx);
  Desc buf{kRamBase + 0xa000, 2048, 2 /* device writes */, 0};
  ASSERT_TRUE(mem->Write(kDesc, &buf, sizeof buf));
  ASSERT_TRUE(mem->Write(kAvail, ring, 6));
  ASSERT_EQ(send(rx_peer, frame, sizeof frame, 0), static_cast<ssize_t>(sizeof frame));
  rx->MmioWrite(0x50, 4, 0);  // the driver notifies RX: the device reads what waits
  uint8_t in[sizeof frame];
  ASSERT_TRUE(mem->Read(kRamBase + 0xa000, in, sizeof in));
  EXPECT_EQ(in[10], 1) << "num_buffers";
  EXPECT_EQ(std::memcmp(in + 12, frame + 12, sizeof frame - 12), 0);
  uint32_t used_len = 0;
  ASSERT_TRUE(mem->Read(kUsed + 4 + 4, &used_len, 4));
  EXPECT_EQ(used_len, sizeof frame);
  EXPECT_EQ(rx->Metrics()["rx_packets"], 1u);
  EXPECT_EQ(rx->Metrics()["tap"], "rx-test");
  close(rx_peer);
}

// A TX chain may claim far more than a frame: 1000 indirect descriptors each covering all of RAM
// (16 GiB). The length is checked before anything is allocated: a TX error, the device keeps working.
TEST_F(VirtioNetPersist, AHugeTxChainIsATxErrorNotAnAllocation) {
  Device& d = *dev_[0];
  SetUpQueue(d, 0, 1);
  struct Desc { uint64_t addr; uint32_t len; uint16_t flags, next; };
  const uint64_t table_at = kRamBase + 0x10000;
  std::vector<Desc> table;
  for (uint16_t i = 0; i < 1000; ++i) table.push_back({kRamBase, 16 << 20, static_cast<uint16_t>(i + 1 < 1000 ? 1 : 0), static_cast<uint16_t>(i + 1)});
  ASSERT_TRUE(mem_->Write(table_at, table.data(), table.size() * sizeof(Desc)));
  Desc indirect{table_at, static_cast<uint32_t>(table.size() * sizeof(Desc)), 4, 0};
  ASSERT_TRUE(mem_->Write(kDesc, &indirect, sizeof indirect));
  uint16_t ring[3] = {0, 1, 0};
  ASSERT_TRUE(mem_->Write(kAvail, ring, 6));
  d.MmioWrite(0x50, 4, 1);  // notify TX
  EXPECT_EQ(d.Metrics()["tx_errors"], 1u) << d.Metrics().dump();
  EXPECT_FALSE(Reg(d, 0x70) & 0x40) << "not DEVICE_NEEDS_RESET";
  uint16_t used_idx = 0;
  ASSERT_TRUE(mem_->Read(kUsed + 2, &used_idx, 2));
  EXPECT_EQ(used_idx, 1u) << "the chain is returned to the driver";
}

TEST_F(VirtioNetPersist, RoundTripsQueueStateAndRejectsBadBlobs) {
  Device& a = *dev_[0];
  Device& b = *dev_[1];
  EXPECT_EQ(Reg(a, 8), 1u) << "device id: network card";
  SetUpQueue(a, 1u << 5 /* MAC */, 1);
  // Transmit one frame on queue 1 (TX): 12-byte header + 60-byte frame.
  uint8_t frame[12 + 60] = {};
  std::memset(frame + 12, 0xff, 6);
  std::memcpy(frame + 18, mac_.data(), 6);
  ASSERT_TRUE(mem_->Write(kRamBase + 0x4000, frame, sizeof frame));
  struct { uint64_t addr; uint32_t len; uint16_t flags, next; } d0{kRamBase + 0x4000, sizeof frame, 0, 0};
  ASSERT_TRUE(mem_->Write(kDesc, &d0, 16));
  uint16_t ring[3] = {0, 1, 0};  // flags, idx = 1, ring[0] = descriptor 0
  ASSERT_TRUE(mem_->Write(kAvail, ring, 6));
  a.MmioWrite(0x50, 4, 1);
  uint16_t used_idx = 0;
  ASSERT_TRUE(mem_->Read(kUsed + 2, &used_idx, 2));
  EXPECT_EQ(used_idx, 1u) << "the frame was consumed";
  EXPECT_EQ(Reg(a, 0x60) & 1, 1u) << "used-buffer interrupt pending";
  EXPECT_EQ(Reg(a, 0x70) & 0x40, 0u) << "no DEVICE_NEEDS_RESET";

  ExpectPersistContract(a, b);
  // The restored device continues where the first one stopped: queue 1 consumed one
  // buffer, so a second one lands in used ring slot 1.
  b.PostRestore();
  EXPECT_EQ(Reg(b, 0x70), 1u | 2 | 8 | 4) << "status travels";
  EXPECT_EQ(Reg(b, 0x60) & 1, 1u) << "interrupt status travels";
  ring[1] = 2;
  ring[2] = 0;
  uint16_t slot1 = 0;
  ASSERT_TRUE(mem_->Write(kAvail + 4 + 2, &slot1, 2));
  ASSERT_TRUE(mem_->Write(kAvail + 2, &ring[1], 2));
  b.MmioWrite(0x50, 4, 1);
  ASSERT_TRUE(mem_->Read(kUsed + 2, &used_idx, 2));
  EXPECT_EQ(used_idx, 2u);

  // A corrupt queue size and a blob made by another device kind are refused.
  auto blob = a.SaveState();
  const auto before = b.SaveState();
  auto bad = blob;
  const size_t q0 = DeviceBytesOffset(0);
  bad[q0] = 0;  // queue 0 size 0
  bad[q0 + 1] = 0;
  EXPECT_FALSE(b.RestoreState(bad));
  bad = blob;
  bad[4] = 2;  // device id: block
  EXPECT_FALSE(b.RestoreState(bad));
  bad = blob;
  bad[8 + 6] = 0x10;  // driver features bit 52, never offered by the device
  EXPECT_FALSE(b.RestoreState(bad));
  auto balloon = CreateVirtioBalloon(deps_);
  ASSERT_TRUE(balloon);
  EXPECT_FALSE(b.RestoreState((*balloon)->SaveState())) << "balloon state into a net device";
  EXPECT_EQ(b.SaveState(), before) << "failed restores must not change the device";
}

// Free page reporting: each reported range is discarded (reads as zero) and its pages are
// marked freed in the dirty log before the buffer is handed back; the device keeps only
// counters, so its blob (version 2) is small; version 1 blobs (with the old, ignored
// free-page bitmap) still restore.
TEST(VirtioBalloon, FreePageReportDiscardsRangesAndMarksThemFreed) {
  auto mem = std::move(*GuestMemory::Create(kRamBase, 16 << 20));
  RecordingIrq irq;
  VirtioDeps deps{mem.get(), &irq, 4, nullptr, kVirtioBase + 0x3000};
  auto dev = CreateVirtioBalloon(deps);
  ASSERT_TRUE(dev);
  Device& a = **dev;
  SetUpQueue(a, 1u << 5 /* FREE_PAGE_REPORTING */, 2);
  // Guest data on pages 256..259 and 512, then a harvest (marks clean).
  std::vector<uint8_t> junk(4 * 4096, 0x77);
  ASSERT_TRUE(mem->Write(kRamBase + (1 << 20), junk.data(), junk.size()));
  ASSERT_TRUE(mem->Write(kRamBase + (2 << 20), junk.data(), 4096));
  (void)mem->dirty_log().Harvest();
  // One report: two writable descriptors, 3 pages at 1 MiB and 1 page at 2 MiB.
  struct Desc { uint64_t addr; uint32_t len; uint16_t flags, next; };
  Desc d[2] = {{kRamBase + (1 << 20), 3 * 4096, 2 | 1, 1}, {kRamBase + (2 << 20), 4096, 2, 0}};
  ASSERT_TRUE(mem->Write(kDesc, d, sizeof d));
  uint16_t ring[3] = {0, 1, 0};
  ASSERT_TRUE(mem->Write(kAvail, ring, 6));
  a.MmioWrite(0x50, 4, 2);
  EXPECT_EQ(Reg(a, 0x70) & 0x40, 0u) << "no DEVICE_NEEDS_RESET";
  uint16_t used_idx = 0;
  ASSERT_TRUE(mem->Read(kUsed + 2, &used_idx, 2));
  EXPECT_EQ(used_idx, 1u) << "the report was handed back";
  FreePageReport* r = AsFreePageReport(&a);
  ASSERT_NE(r, nullptr);
  EXPECT_EQ(r->total_reports(), 2u);
  EXPECT_EQ(r->reported_bytes(), 4u * 4096);
  EXPECT_EQ(r->discarded_bytes(), 4u * 4096);
  EXPECT_EQ(r->rejected_ranges(), 0u);
  DirtyLog& log = mem->dirty_log();
  for (uint64_t p : {256u, 257u, 258u, 512u}) EXPECT_TRUE(log.IsFreed(p)) << p;
  EXPECT_FALSE(log.IsDirty(259)) << "not reported";
  EXPECT_EQ(mem->host()[(1 << 20) + 3 * 4096], 0x77) << "page 259 keeps its data";
  for (uint64_t off : {1u << 20, (1u << 20) + 2 * 4096 + 4095, 2u << 20}) EXPECT_EQ(mem->host()[off], 0) << off;
  // The guest reuses page 257: written again.
  uint32_t v = 1;
  ASSERT_TRUE(mem->Write(kRamBase + (1 << 20) + 4096, &v, 4));
  EXPECT_FALSE(log.IsFreed(257));
  EXPECT_TRUE(log.IsDirty(257));
  std::vector<uint64_t> dirty, freed;
  log.Harvest(&dirty, &freed);
  EXPECT_EQ(freed[256 / 64] >> (256 % 64) & 7, 0b101u) << "256 and 258 freed, 257 written";
  EXPECT_EQ(dirty[256 / 64] >> (256 % 64) & 7, 0b111u);

  // A device-readable range in a report is not a free range: counted, nothing discarded.
  Desc ro{kRamBase + (1 << 20) + 3 * 4096, 4096, 0, 0};
  ASSERT_TRUE(mem->Write(kDesc, &ro, sizeof ro));
  ring[1] = 2;
  ring[2] = 0;
  uint16_t slot1 = 0;
  ASSERT_TRUE(mem->Write(kAvail + 4 + 2, &slot1, 2));
  ASSERT_TRUE(mem->Write(kAvail + 2, &ring[1], 2));
  a.MmioWrite(0x50, 4, 2);
  ASSERT_TRUE(mem->Read(kUsed + 2, &used_idx, 2));
  EXPECT_EQ(used_idx, 2u);
  EXPECT_EQ(r->rejected_ranges(), 1u);
  EXPECT_EQ(r->discarded_bytes(), 4u * 4096);
  EXPECT_FALSE(log.IsDirty(259));
  EXPECT_EQ(mem->host()[(1 << 20) + 3 * 4096], 0x77);
  auto m = a.Metrics();
  EXPECT_EQ(m["free_page_reports"], 3u);
  EXPECT_EQ(m["reported_bytes"], 5u * 4096);
  EXPECT_EQ(m["discarded_bytes"], 4u * 4096);
  EXPECT_EQ(m["rejected_ranges"], 1u);
  EXPECT_EQ(m["discard_errors"], 0u);
  EXPECT_FALSE(m.contains("reported_free_pages")) << "no device-side free bitmap any more";

  // A range outside RAM never reaches the balloon: the transport refuses the descriptor.
  Desc out{kRamBase + (16 << 20), 4096, 2, 0};
  ASSERT_TRUE(mem->Write(kDesc, &out, sizeof out));
  uint16_t slot2 = 0, idx3 = 3;
  ASSERT_TRUE(mem->Write(kAvail + 4 + 4, &slot2, 2));
  ASSERT_TRUE(mem->Write(kAvail + 2, &idx3, 2));
  a.MmioWrite(0x50, 4, 2);
  EXPECT_EQ(Reg(a, 0x70) & 0x40, 0x40u) << "DEVICE_NEEDS_RESET";
  EXPECT_EQ(r->total_reports(), 3u);
}

TEST(VirtioBalloonPersist, RoundTripsAndRestoresVersion1BlobsAndRejectsBadBlobs) {
  auto mem = std::move(*GuestMemory::Create(kRamBase, 16 << 20));
  RecordingIrq irq;
  VirtioDeps deps{mem.get(), &irq, 4, nullptr, kVirtioBase + 0x3000};
  auto a_dev = CreateVirtioBalloon(deps);
  auto b_dev = CreateVirtioBalloon(deps);
  ASSERT_TRUE(a_dev && b_dev);
  Device& a = **a_dev;
  Device& b = **b_dev;
  EXPECT_EQ(Reg(a, 8), 5u) << "device id: balloon";
  SetUpQueue(a, 1u << 5 /* FREE_PAGE_REPORTING */, 2);
  a.MmioWrite(0x100 + 4, 4, 7);  // config: actual = 7 pages
  struct Desc { uint64_t addr; uint32_t len; uint16_t flags, next; };
  Desc d{kRamBase + (1 << 20), 3 * 4096, 2, 0};
  ASSERT_TRUE(mem->Write(kDesc, &d, sizeof d));
  uint16_t ring[3] = {0, 1, 0};
  ASSERT_TRUE(mem->Write(kAvail, ring, 6));
  a.MmioWrite(0x50, 4, 2);
  EXPECT_EQ(Reg(a, 0x70) & 0x40, 0u) << "no DEVICE_NEEDS_RESET";

  ExpectPersistContract(a, b);
  uint64_t actual = 0;
  ASSERT_TRUE(b.MmioRead(0x100 + 4, 4, &actual));
  EXPECT_EQ(actual, 7u) << "config 'actual' travels";

  const auto blob = a.SaveState();
  uint32_t version;
  std::memcpy(&version, blob.data(), 4);
  EXPECT_EQ(version, 2u);
  // Device bytes: u32 length, then u32 num_pages, u32 actual.
  const size_t dev_at = DeviceBytesOffset(3);
  uint32_t dev_len;
  std::memcpy(&dev_len, blob.data() + dev_at, 4);
  ASSERT_EQ(dev_len, 8u);
  ASSERT_EQ(dev_at + 4 + dev_len, blob.size());
  // Trailing byte inside the device-specific part (outer lengths kept consistent).
  auto bad = blob;
  bad.push_back(0);
  uint32_t longer = dev_len + 1;
  std::memcpy(bad.data() + dev_at, &longer, 4);
  auto fresh = CreateVirtioBalloon(deps);
  ASSERT_TRUE(fresh);
  const auto fresh_state = (*fresh)->SaveState();
  EXPECT_FALSE((*fresh)->RestoreState(bad)) << "trailing byte in the device part";
  EXPECT_EQ((*fresh)->SaveState(), fresh_state) << "a rejected device part must not be half-applied";

  // A version 1 blob (what the previous release saved): same transport fields, device bytes
  // u32 num_pages, u32 actual, then the free-page bitmap (u32 length + 1 bit per RAM page).
  auto v1_for = [&](size_t ram_pages, bool trailing) {
    std::vector<uint8_t> v1(blob.begin(), blob.begin() + static_cast<std::ptrdiff_t>(dev_at));
    const uint32_t one = 1;
    std::memcpy(v1.data(), &one, 4);
    StateWriter dev;
    dev.PutU32(0);  // num_pages
    dev.PutU32(7);  // actual
    std::vector<uint8_t> bits((ram_pages + 7) / 8, 0);
    bits[256 / 8] = 0x07;  // pages 256..258 "reported free": ignored
    dev.PutBytes(bits);
    if (trailing) dev.PutU8(0);
    StateWriter out;
    out.PutRaw(v1);
    out.PutBytes(dev.data());
    return out.Take();
  };
  const auto v1 = v1_for(4096, false);
  ASSERT_TRUE((*fresh)->RestoreState(v1)) << "version 1 blob";
  EXPECT_EQ((*fresh)->SaveState(), blob) << "restored from version 1, saved as version 2";
  EXPECT_EQ(mem->dirty_log().CountFreed(), 3u) << "the report above, not the restore, marked pages";
  auto other = CreateVirtioBalloon(deps);
  ASSERT_TRUE(other);
  const auto other_state = (*other)->SaveState();
  EXPECT_FALSE((*other)->RestoreState(v1_for(8192, false))) << "version 1 bitmap for 32 MiB into a 16 MiB VM";
  EXPECT_FALSE((*other)->RestoreState(v1_for(4096, true))) << "version 1 with a trailing byte";
  for (size_t len = 0; len < v1.size(); ++len)
    EXPECT_FALSE((*other)->RestoreState(std::span<const uint8_t>(v1.data(), len))) << "version 1 truncated to " << len;
  auto v3 = blob;
  v3[0] = 3;
  EXPECT_FALSE((*other)->RestoreState(v3)) << "version 3";
  EXPECT_EQ((*other)->SaveState(), other_state) << "failed restores must not change the device";
}

}  // namespace
}  // namespace ferry
