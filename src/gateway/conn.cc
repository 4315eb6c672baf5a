#include "gateway/conn.h"

#include <arpa/inet.h>
#include <fcntl.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <openssl/err.h>
#include <poll.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>

#include "common/clock.h"

namespace ferry::gateway {

Conn::~Conn() {
  if (ssl_) SSL_free(ssl_);
  if (fd_ >= 0) close(fd_);
}

Result<std::string> OriginalDestination(int fd) {
  sockaddr_storage orig{}, local{};
  socklen_t olen = sizeof orig, llen = sizeof local;
  if (getsockname(fd, reinterpret_cast<sockaddr*>(&local), &llen) != 0)
    return Errorf(ErrorCode::kIo, "getsockname: {}", strerror(errno));
  // SO_ORIGINAL_DST (80) is the same number for IPv4 (SOL_IP) and IPv6 (SOL_IPV6,
  // IP6T_SO_ORIGINAL_DST); it answers from the connection-tracking entry.
  constexpr int kSoOriginalDst = 80;
  int level = local.ss_family == AF_INET6 ? SOL_IPV6 : SOL_IP;
  if (getsockopt(fd, level, kSoOriginalDst, &orig, &olen) != 0)
    return Errorf(ErrorCode::kNotFound, "no original destination (not redirected, or no connection tracking): {}",
                  strerror(errno));
  char host[INET6_ADDRSTRLEN] = "";
  uint16_t port = 0;
  bool same = false;
  if (orig.ss_family == AF_INET) {
    auto* a = reinterpret_cast<sockaddr_in*>(&orig);
    inet_ntop(AF_INET, &a->sin_addr, host, sizeof host);
    port = ntohs(a->sin_port);
    auto* l = reinterpret_cast<sockaddr_in*>(&local);
    same = local.ss_family == AF_INET && a->sin_addr.s_addr == l->sin_addr.s_addr && a->sin_port == l->sin_port;
  } else if (orig.ss_family == AF_INET6) {
    auto* a = reinterpret_cast<sockaddr_in6*>(&orig);
    inet_ntop(AF_INET6, &a->sin6_addr, host, sizeof host);
    port = ntohs(a->sin6_port);
    auto* l = reinterpret_cast<sockaddr_in6*>(&local);
    same = local.ss_family == AF_INET6 && memcmp(&a->sin6_addr, &l->sin6_addr, sizeof a->sin6_addr) == 0 &&
           a->sin6_port == l->sin6_port;
  } else {
    return Errorf(ErrorCode::kNotFound, "original destination has address family {}", orig.ss_family);
  }
  if (same) return Errorf(ErrorCode::kNotFound, "connection was addressed to the gateway itself (not redirected)");
  return orig.ss_family == AF_INET6 ? fmt::format("[{}]:{}", host, port) : fmt::format("{}:{}", host, port);
}

Result<std::pair<std::string, uint16_t>> SplitHostPort(const std::string& s) {
  auto colon = s.rfind(':');
  if (colon == std::string::npos || colon == 0 || colon + 1 == s.size())
    return Errorf(ErrorCode::kInvalidArgument, "address '{}' is not HOST:PORT", s);
  std::string host = s.substr(0, colon);
  if (host.size() > 2 && host.front() == '[' && host.back() == ']') host = host.substr(1, host.size() - 2);
  char* end = nullptr;
  long port = strtol(s.c_str() + colon + 1, &end, 10);
  if (*end != '\0' || port < 0 || port > 65535)
    return Errorf(ErrorCode::kInvalidArgument, "bad port in '{}'", s);
  return std::make_pair(host, static_cast<uint16_t>(port));
}

namespace {
Result<addrinfo*> Resolve(const std::string& hp, bool passive) {
  auto sp = SplitHostPort(hp);
  if (!sp) return std::unexpected(sp.error());
  addrinfo hints{};
  hints.ai_socktype = SOCK_STREAM;
  hints.ai_flags = passive ? AI_PASSIVE : 0;
  addrinfo* res = nullptr;
  std::string port = std::to_string(sp->second);
  int rc = getaddrinfo(sp->first.c_str(), port.c_str(), &hints, &res);
  if (rc != 0) return Errorf(ErrorCode::kInvalidArgument, "resolve {}: {}", hp, gai_strerror(rc));
  return res;
}
void TuneSocket(int fd) {
  int one = 1;
  setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
  // Keep little *unsent* data in the kernel: a stream that slows down (loss
  // recovery) must not hoard chunks that every other stream then waits for.
  int lowat = 128 << 10;
  setsockopt(fd, IPPROTO_TCP, TCP_NOTSENT_LOWAT, &lowat, sizeof lowat);
}
Status WaitFd(int fd, short ev, int timeout_ms) {
  pollfd p{fd, ev, 0};
  int rc = poll(&p, 1, timeout_ms);
  if (rc < 0) return ErrnoError("poll");
  if (rc == 0) return Errorf(ErrorCode::kTimeout, "timed out after {} ms", timeout_ms);
  return {};
}
}  // namespace

Result<int> ListenTcp(const std::string& hp) {
  auto ai = Resolve(hp, true);
  if (!ai) return std::unexpected(ai.error());
  int fd = socket((*ai)->ai_family, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (fd < 0) {
    freeaddrinfo(*ai);
    return ErrnoError("socket");
  }
  int one = 1;
  setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
  if (bind(fd, (*ai)->ai_addr, (*ai)->ai_addrlen) < 0 || listen(fd, 128) < 0) {
    auto e = ErrnoError("listen " + hp);
    freeaddrinfo(*ai);
    close(fd);
    return e;
  }
  freeaddrinfo(*ai);
  return fd;
}

Result<int> ConnectTcp(const std::string& hp, int timeout_ms) {
  auto ai = Resolve(hp, false);
  if (!ai) return std::unexpected(ai.error());
  int fd = socket((*ai)->ai_family, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
  if (fd < 0) {
    freeaddrinfo(*ai);
    return ErrnoError("socket");
  }
  int rc = connect(fd, (*ai)->ai_addr, (*ai)->ai_addrlen);
  freeaddrinfo(*ai);
  if (rc < 0 && errno != EINPROGRESS) {
    auto e = ErrnoError("connect " + hp);
    close(fd);
    return e;
  }
  if (rc < 0) {
    auto w = WaitFd(fd, POLLOUT, timeout_ms);
    int err = 0;
    socklen_t len = sizeof err;
    if (w) getsockopt(fd, SOL_SOCKET, SO_ERROR, &err, &len);
    if (!w || err != 0) {
      close(fd);
      if (!w) return std::unexpected(w.error().WithContext("connect " + hp));
      return Errorf(ErrorCode::kIo, "connect {}: {}", hp, strerror(err));
    }
  }
  TuneSocket(fd);
  int fl = fcntl(fd, F_GETFL);
  fcntl(fd, F_SETFL, fl & ~O_NONBLOCK);
  return fd;
}

static void SetTimeouts(int fd, int ms) {
  timeval tv{ms / 1000, (ms % 1000) * 1000};
  setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
  setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof tv);
}

Result<std::unique_ptr<Conn>> Conn::Connect(const std::string& hp, const TlsContext& tls, int timeout_ms) {
  auto fd = ConnectTcp(hp, timeout_ms);
  if (!fd) return std::unexpected(fd.error());
  SetTimeouts(*fd, timeout_ms);
  if (!tls.ctx()) return std::unique_ptr<Conn>(new Conn(*fd, nullptr));
  SSL* ssl = SSL_new(tls.ctx());
  std::unique_ptr<Conn> c(new Conn(*fd, ssl));
  if (auto st = net::AttachSocket(ssl, *fd); !st) return std::unexpected(st.error());
  ERR_clear_error();
  if (SSL_connect(ssl) != 1) return Errorf(ErrorCode::kIo, "TLS handshake with {}: {}", hp, net::HandshakeError(ssl));
  return c;
}

Result<std::unique_ptr<Conn>> Conn::Accept(int fd, const TlsContext& tls, int timeout_ms, const std::atomic<bool>* evict) {
  TuneSocket(fd);
  SetTimeouts(fd, timeout_ms);
  if (!tls.ctx()) return std::unique_ptr<Conn>(new Conn(fd, nullptr));
  SSL* ssl = SSL_new(tls.ctx());
  std::unique_ptr<Conn> c(new Conn(fd, ssl));
  if (auto st = net::AttachSocket(ssl, fd); !st) return std::unexpected(st.error());
  // Non-blocking, so the deadline covers the whole handshake (SO_RCVTIMEO restarts on every byte).
  const int fl = fcntl(fd, F_GETFL);
  fcntl(fd, F_SETFL, fl | O_NONBLOCK);
  const uint64_t deadline = NowNs() + static_cast<uint64_t>(std::max(timeout_ms, 0)) * 1'000'000;
  if (auto st = net::RunHandshake(ssl, fd, true, deadline, evict, "a peer gateway"); !st)
    return std::unexpected(st.error().WithContext("TLS accept"));
  fcntl(fd, F_SETFL, fl);
  return c;
}

Status Conn::WriteFrameBlocking(FrameType t, std::span<const uint8_t> payload) {
  std::vector<uint8_t> buf;
  EncodeFrame(t, 0, payload, &buf);
  size_t off = 0;
  while (off < buf.size()) {
    int n;
    if (ssl_) {
      ERR_clear_error();
      n = SSL_write(ssl_, buf.data() + off, static_cast<int>(buf.size() - off));
      if (n <= 0) return Errorf(ErrorCode::kIo, "TLS write: {}", OpenSslErrors());
    } else {
      n = static_cast<int>(::send(fd_, buf.data() + off, buf.size() - off, MSG_NOSIGNAL));
      if (n < 0) return ErrnoError("send");
    }
    off += n;
  }
  return {};
}

Result<Frame> Conn::ReadFrameBlocking() {
  for (;;) {
    size_t used = 0;
    auto f = DecodeFrame(in, &used);
    if (!f) return std::unexpected(f.error());
    if (f->has_value()) {
      in.erase(in.begin(), in.begin() + used);
      return std::move(**f);
    }
    // Read only what the header asks for so little extra is buffered.
    uint8_t buf[4096];
    size_t want = sizeof buf;
    if (in.size() >= kHeaderSize) {
      uint32_t len = in[8] | (in[9] << 8) | (in[10] << 16) | (uint32_t(in[11]) << 24);
      want = std::min(want, kHeaderSize + len - in.size());
    } else {
      want = kHeaderSize - in.size();
    }
    int n;
    if (ssl_) {
      ERR_clear_error();
      n = SSL_read(ssl_, buf, static_cast<int>(want));
      if (n <= 0) {
        int err = SSL_get_error(ssl_, n);
        if (err == SSL_ERROR_ZERO_RETURN) return Errorf(ErrorCode::kIo, "peer closed");
        return Errorf(ErrorCode::kIo, "TLS read: {}", OpenSslErrors());
      }
    } else {
      n = static_cast<int>(::recv(fd_, buf, want, 0));
      if (n == 0) return Errorf(ErrorCode::kIo, "peer closed");
      if (n < 0) return ErrnoError("recv");
    }
    in.insert(in.end(), buf, buf + n);
  }
}

Status Conn::SetNonBlocking() {
  SetTimeouts(fd_, 0);
  int fl = fcntl(fd_, F_GETFL);
  if (fcntl(fd_, F_SETFL, fl | O_NONBLOCK) < 0) return ErrnoError("fcntl");
  return {};
}

bool Conn::HasPending() const { return ssl_ && SSL_pending(ssl_) > 0; }

Conn::IoResult Conn::Read(uint8_t* buf, size_t cap, size_t* n) {
  *n = 0;
  if (!ssl_) {
    ssize_t r = ::recv(fd_, buf, cap, 0);
    if (r > 0) {
      *n = r;
      return IoResult::kOk;
    }
    if (r == 0) return IoResult::kClosed;
    if (errno == EAGAIN || errno == EINTR) return IoResult::kWouldBlock;
    last_error_ = strerror(errno);
    return IoResult::kError;
  }
  ERR_clear_error();
  int r = SSL_read(ssl_, buf, static_cast<int>(cap));
  if (r > 0) {
    *n = r;
    return IoResult::kOk;
  }
  int err = SSL_get_error(ssl_, r);
  if (err == SSL_ERROR_WANT_READ || err == SSL_ERROR_WANT_WRITE) return IoResult::kWouldBlock;
  if (err == SSL_ERROR_ZERO_RETURN) return IoResult::kClosed;
  last_error_ = err == SSL_ERROR_SYSCALL ? std::string("connection lost") : OpenSslErrors();
  return IoResult::kError;
}

Conn::IoResult Conn::Write(const uint8_t* buf, size_t len, size_t* n) {
  *n = 0;
  if (!ssl_) {
    ssize_t r = ::send(fd_, buf, len, MSG_NOSIGNAL);
    if (r >= 0) {
      *n = r;
      return IoResult::kOk;
    }
    if (errno == EAGAIN || errno == EINTR) return IoResult::kWouldBlock;
    last_error_ = strerror(errno);
    return IoResult::kError;
  }
  ERR_clear_error();
  int r = SSL_write(ssl_, buf, static_cast<int>(len));
  if (r > 0) {
    *n = r;
    return IoResult::kOk;
  }
  int err = SSL_get_error(ssl_, r);
  if (err == SSL_ERROR_WANT_READ || err == SSL_ERROR_WANT_WRITE) return IoResult::kWouldBlock;
  last_error_ = err == SSL_ERROR_SYSCALL ? std::string("connection lost") : OpenSslErrors();
  return IoResult::kError;
}

}  // namespace ferry::gateway
