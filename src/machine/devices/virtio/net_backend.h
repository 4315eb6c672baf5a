// Where virtio-net's frames go to and come from: a non-blocking datagram file descriptor on
// which every read and every write is one frame - the 12-byte virtio_net_hdr_v1, then the
// Ethernet frame.
//   OpenTapBackend: the TAP interface NAME (IFF_TAP | IFF_NO_PI | IFF_VNET_HDR, vnet header
//     size 12). What ferry-vmm uses (--net tap=NAME).
//   SocketPairBackend: one end of an AF_UNIX SOCK_SEQPACKET pair, which keeps message
//     boundaries like a TAP; the caller keeps the other end and plays the network on it (what
//     it writes, the guest receives; what the guest sends, it reads). For tests and fuzzers,
//     where no TAP can be created.
// The device treats both the same: it polls fd() for input on the machine thread's EventLoop
// and reads and writes frames only there. A NetBackend owns its descriptor.
#pragma once

#include <sys/types.h>

#include <cstdint>
#include <memory>
#include <span>
#include <string>

#include "common/error.h"

namespace ferry {

class NetBackend {
 public:
  NetBackend(int fd, std::string name) : fd_(fd), name_(std::move(name)) {}
  ~NetBackend();
  NetBackend(const NetBackend&) = delete;
  NetBackend& operator=(const NetBackend&) = delete;

  int fd() const { return fd_; }
  // The TAP's name, or the name given to the socket pair (metrics "tap", logs).
  const std::string& name() const { return name_; }
  // One frame into buf (cut at cap); < 0 with errno EAGAIN when none is waiting.
  ssize_t Read(uint8_t* buf, size_t cap);
  // The whole frame out, or false (the frame is dropped).
  bool Write(std::span<const uint8_t> frame);

 private:
  int fd_;
  std::string name_;
};

Result<std::unique_ptr<NetBackend>> OpenTapBackend(const std::string& tap_name);

struct NetBackendPair {
  std::unique_ptr<NetBackend> backend;  // the device's end
  int peer = -1;                        // the network's end (blocking; the caller closes it)
};
Result<NetBackendPair> SocketPairBackend(const std::string& name);

}  // namespace ferry
