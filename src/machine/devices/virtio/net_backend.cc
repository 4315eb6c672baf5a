#include "machine/devices/virtio/net_backend.h"

#include <fcntl.h>
#include <linux/if.h>
#include <linux/if_tun.h>
#include <sys/ioctl.h>
#include <sys/socket.h>
#include <unistd.h>

#include <cstring>

namespace ferry {

NetBackend::~NetBackend() { close(fd_); }

ssize_t NetBackend::Read(uint8_t* buf, size_t cap) { return read(fd_, buf, cap); }

bool NetBackend::Write(std::span<const uint8_t> frame) {
  return write(fd_, frame.data(), frame.size()) == static_cast<ssize_t>(frame.size());
}

Result<std::unique_ptr<NetBackend>> OpenTapBackend(const std::string& tap) {
  if (tap.empty() || tap.size() >= IFNAMSIZ) return Errorf(ErrorCode::kInvalidArgument, "bad TAP name '{}'", tap);
  int fd = open("/dev/net/tun", O_RDWR | O_NONBLOCK | O_CLOEXEC);
  if (fd < 0) return ErrnoError("open /dev/net/tun");
  auto backend = std::make_unique<NetBackend>(fd, tap);  // closes fd on every return below
  ifreq ifr{};
  std::strncpy(ifr.ifr_name, tap.c_str(), IFNAMSIZ - 1);
  ifr.ifr_flags = IFF_TAP | IFF_NO_PI | IFF_VNET_HDR;
  if (ioctl(fd, TUNSETIFF, &ifr) != 0) return ErrnoError("attach TAP '" + tap + "'");
  int hdr = 12;
  if (ioctl(fd, TUNSETVNETHDRSZ, &hdr) != 0) return ErrnoError("TUNSETVNETHDRSZ on '" + tap + "'");
  return backend;
}

Result<NetBackendPair> SocketPairBackend(const std::string& name) {
  int sv[2];
  if (socketpair(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0, sv) != 0) return ErrnoError("socketpair for a network backend");
  const int fl = fcntl(sv[0], F_GETFL);
  if (fl < 0 || fcntl(sv[0], F_SETFL, fl | O_NONBLOCK) != 0) {
    auto e = ErrnoError("non-blocking network backend");
    close(sv[0]);
    close(sv[1]);
    return e;
  }
  return NetBackendPair{std::make_unique<NetBackend>(sv[0], name), sv[1]};
}

}  // namespace ferry
