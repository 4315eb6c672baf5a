// ferry-wanem: user-space WAN link emulator. Two TAP devices (one in each of
// two network namespaces) are bridged by this process, which forwards frames
// in both directions with one-way delay, jitter, a rate limit (serialisation
// at the configured bit rate with a bounded tail-drop queue) and random loss.
// The kernel here has no netem qdisc, hence user space.
//
// Threading: Run() is single-threaded (ppoll loop); Stop() may be called from
// any thread.
#pragma once

#include <atomic>
#include <cstdint>
#include <string>

#include "common/error.h"

namespace ferry::wanem {

struct LinkParams {
  double delay_ms = 0;      // one-way, each direction
  double jitter_ms = 0;     // uniform +-jitter, never reorders
  double rate_mbit = 0;     // 0 = unlimited
  double loss = 0;          // probability per (MTU-sized) packet, 0..1
  size_t queue_bytes = 0;   // 0 = auto: max(1 MiB, 2 x rate x delay)
};

struct Options {
  std::string ns_a, ns_b;        // namespace names (/var/run/netns/NAME); empty = current
  std::string dev_a = "wan0", dev_b = "wan0";
  std::string addr_a, addr_b;    // optional CIDR to configure, e.g. 10.77.0.1/24
  int mtu = 1500;
  bool gso = true;               // TSO/GSO super-frames through the TAPs (much faster)
  LinkParams link;
  uint64_t seed = 1;
};

struct Stats {
  // Counted in wire packets (a TSO super-frame counts as its segments).
  std::atomic<uint64_t> frames[2]{}, bytes[2]{}, dropped_loss[2]{}, dropped_queue[2]{};
  std::atomic<uint64_t> split_frames[2]{};  // super-frames split because some of their packets were lost
};

class Emulator {
 public:
  static Result<std::unique_ptr<Emulator>> Create(const Options& o);
  ~Emulator();
  Status Run();  // until Stop()
  void Stop();
  const Stats& stats() const { return stats_; }
  std::string StatsJson() const;

 private:
  explicit Emulator(const Options& o) : opts_(o) {}
  Options opts_;
  int tap_[2] = {-1, -1};
  int stop_fd_ = -1;
  Stats stats_;
};

Status ValidateLink(const LinkParams& p);

// struct virtio_net_hdr (the TAP's IFF_VNET_HDR prefix).
struct VnetHdr {
  uint8_t flags, gso_type;
  uint16_t hdr_len, gso_size, csum_start, csum_offset;
};
static_assert(sizeof(VnetHdr) == 10);

// A TCP TSO super-frame read from a TAP with a virtio-net header. Loss is
// applied per wire packet: when some packets of a super-frame are lost, the
// emulator splits it with MakeSegment and drops exactly those.
struct TsoInfo {
  size_t l3 = 0, l4 = 0, hdrs = 0;  // offsets of the IP and TCP headers, length of all headers (no vnet)
  bool v6 = false;
  size_t payload = 0, mss = 0, segs = 1;
};
// f = vnet header + Ethernet frame, n bytes. True for a TCP/IPv4 or TCP/IPv6 TSO frame.
bool ParseTso(const uint8_t* f, size_t n, TsoInfo* t);
// Writes wire packet k of super-frame f as vnet header + Ethernet frame into out
// (room for sizeof(VnetHdr) + hdrs + mss): IP length/ID/checksum and TCP sequence
// and flags adjusted, TCP checksum left to the kernel (NEEDS_CSUM, pseudo header
// sum in the field, as for any frame from the local stack). Returns its length.
size_t MakeSegment(const uint8_t* f, const TsoInfo& t, size_t k, uint8_t* out);

}  // namespace ferry::wanem
