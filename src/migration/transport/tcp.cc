#include "migration/transport/tcp.h"

#include <arpa/inet.h>
#include <fcntl.h>
#include <netdb.h>
#include <netinet/in.h>
#include <linux/tcp.h>  // struct tcp_info with bytes_acked / notsent_bytes (glibc's is older)
#include <openssl/err.h>
#include <poll.h>
#include <sys/eventfd.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <array>
#include <cerrno>
#include <charconv>
#include <cstring>
#include <thread>

#include "common/clock.h"

namespace ferry::migration {
namespace {

void TuneSocket(int fd) {
  int one = 1;
  setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
  // Large buffers for in-flight data on long paths (a 100 ms RTT at 1 Gbit/s holds 12.5 MB)...
  int buf = 4 << 20;
  setsockopt(fd, SOL_SOCKET, SO_SNDBUF, &buf, sizeof buf);
  setsockopt(fd, SOL_SOCKET, SO_RCVBUF, &buf, sizeof buf);
  // ... but little data waiting to be sent: a write blocks once 1 MiB is queued unsent, so the
  // sender learns the path's pace within a few records (codec choice, rate measurement) and pages
  // are copied close to when they leave (a page written meanwhile is less likely to be stale).
  int lowat = 1 << 20;
  setsockopt(fd, IPPROTO_TCP, TCP_NOTSENT_LOWAT, &lowat, sizeof lowat);
}

std::string AddrString(const sockaddr_storage& ss) {
  char host[INET6_ADDRSTRLEN] = "?";
  uint16_t port = 0;
  if (ss.ss_family == AF_INET) {
    auto* a = reinterpret_cast<const sockaddr_in*>(&ss);
    inet_ntop(AF_INET, &a->sin_addr, host, sizeof host);
    port = ntohs(a->sin_port);
  } else if (ss.ss_family == AF_INET6) {
    auto* a = reinterpret_cast<const sockaddr_in6*>(&ss);
    inet_ntop(AF_INET6, &a->sin6_addr, host, sizeof host);
    port = ntohs(a->sin6_port);
  }
  return fmt::format("{}:{}", host, port);
}

// Waits for `events` on fd; kTimeout after timeout_ms (< 0: forever).
Status WaitFd(int fd, short events, int timeout_ms, std::string_view what) {
  pollfd p{fd, events, 0};
  for (;;) {
    int n = poll(&p, 1, timeout_ms);
    if (n > 0) return {};
    if (n == 0) return Errorf(ErrorCode::kTimeout, "{}: timed out after {} ms", what, timeout_ms);
    if (errno != EINTR) return ErrnoError(what);
  }
}

// Readable right now (poll with a zero timeout).
bool PollNow(int fd) {
  pollfd p{fd, POLLIN, 0};
  return poll(&p, 1, 0) > 0;
}

}  // namespace

std::string Endpoint::ToString() const {
  const bool v6 = host.find(':') != std::string::npos;
  return fmt::format("{}:{}{}{}:{}", tls ? "tls" : "tcp", v6 ? "[" : "", host, v6 ? "]" : "", port);
}

Result<Endpoint> ParseEndpoint(std::string_view s) {
  const bool tls = s.starts_with("tls:");
  if (!s.starts_with("tcp:") && !tls)
    return Errorf(ErrorCode::kInvalidArgument, "endpoint '{}' must look like tcp:HOST:PORT or tls:HOST:PORT", s);
  std::string_view rest = s.substr(4);
  size_t colon = rest.rfind(':');
  if (colon == std::string_view::npos) return Errorf(ErrorCode::kInvalidArgument, "endpoint '{}' has no port ({}:HOST:PORT)", s, tls ? "tls" : "tcp");
  Endpoint ep;
  ep.tls = tls;
  ep.host = std::string(rest.substr(0, colon));
  if (ep.host.size() >= 2 && ep.host.front() == '[' && ep.host.back() == ']') ep.host = ep.host.substr(1, ep.host.size() - 2);
  std::string_view port = rest.substr(colon + 1);
  unsigned v = 0;
  auto [p, ec] = std::from_chars(port.data(), port.data() + port.size(), v);
  if (ec != std::errc() || p != port.data() + port.size() || v > 65535 || port.empty())
    return Errorf(ErrorCode::kInvalidArgument, "endpoint '{}': bad port '{}'", s, port);
  ep.port = static_cast<uint16_t>(v);
  return ep;
}

Socket::Socket(int fd) : fd_(fd) {
  sockaddr_storage ss{};
  socklen_t len = sizeof ss;
  if (getpeername(fd, reinterpret_cast<sockaddr*>(&ss), &len) == 0) peer_ = AddrString(ss);
}

Socket::~Socket() {
  if (ssl_) SSL_free(ssl_);
  if (fd_ >= 0) close(fd_);
}

Result<std::unique_ptr<Socket>> Socket::Connect(const Endpoint& ep, int timeout_ms, const net::TlsContext* tls,
                                                const std::string& server_name) {
  if (ep.port == 0) return Errorf(ErrorCode::kInvalidArgument, "connect {}: port 0", ep.ToString());
  if (ep.tls && (!tls || !tls->ctx() || tls->server()))
    return Errorf(ErrorCode::kInvalidArgument, "connect {}: a tls: destination needs a client certificate, key and CA", ep.ToString());
  addrinfo hints{};
  hints.ai_socktype = SOCK_STREAM;
  addrinfo* res = nullptr;
  std::string port = std::to_string(ep.port);
  int rc = getaddrinfo(ep.host.empty() ? "127.0.0.1" : ep.host.c_str(), port.c_str(), &hints, &res);
  if (rc != 0) return Errorf(ErrorCode::kInvalidArgument, "connect {}: cannot resolve host: {}", ep.ToString(), gai_strerror(rc));
  Error last(ErrorCode::kIo, "no address");
  for (addrinfo* ai = res; ai; ai = ai->ai_next) {
    int fd = socket(ai->ai_family, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
    if (fd < 0) continue;
    TuneSocket(fd);
    int r = connect(fd, ai->ai_addr, ai->ai_addrlen);
    if (r != 0 && errno == EINPROGRESS) {
      auto w = WaitFd(fd, POLLOUT, timeout_ms, "connect");
      if (w) {
        int err = 0;
        socklen_t l = sizeof err;
        getsockopt(fd, SOL_SOCKET, SO_ERROR, &err, &l);
        if (err == 0) r = 0;
        else errno = err;
      } else {
        last = w.error();
        close(fd);
        continue;
      }
    }
    if (r == 0) {
      fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) & ~O_NONBLOCK);
      freeaddrinfo(res);
      auto sock = std::make_unique<Socket>(fd);
      if (ep.tls) {
        const std::string name = !server_name.empty() ? server_name : ep.host.empty() ? "127.0.0.1" : ep.host;
        const uint64_t deadline = NowNs() + static_cast<uint64_t>(std::max(timeout_ms, 0)) * 1'000'000;
        FERRY_RETURN_IF_ERROR(sock->StartTls(*tls, name, deadline), fmt::format("connect to {}", ep.ToString()));
      }
      return sock;
    }
    last = Error(ErrorCode::kIo, strerror(errno));
    close(fd);
  }
  freeaddrinfo(res);
  return std::unexpected(last.WithContext(fmt::format("connect to {}", ep.ToString())));
}

Status Socket::WriteAll(std::span<const uint8_t> data) {
  MutexLock l(write_mu_);
  if (ssl_) return WriteAllTls(data);
  size_t off = 0;
  while (off < data.size()) {
    ssize_t n = send(fd_, data.data() + off, data.size() - off, MSG_NOSIGNAL);
    if (n < 0) {
      if (errno == EINTR) continue;
      return ErrnoError(fmt::format("send to {}", peer_));
    }
    off += static_cast<size_t>(n);
  }
  bytes_written_.fetch_add(data.size(), std::memory_order_relaxed);
  return {};
}

Status Socket::ReadExact(std::span<uint8_t> buf, int timeout_ms) {
  if (ssl_) return ReadExactTls(buf, timeout_ms);
  const uint64_t deadline = timeout_ms >= 0 ? NowNs() + static_cast<uint64_t>(timeout_ms) * 1'000'000 : 0;
  size_t off = 0;
  while (off < buf.size()) {
    if (timeout_ms >= 0) {
      const int left = MsUntil(deadline);
      if (left == 0 && off < buf.size() && !PollNow(fd_))
        return Errorf(ErrorCode::kTimeout, "read: receive from {}: timed out after {} ms ({} of {} bytes)", peer_, timeout_ms, off, buf.size());
      FERRY_RETURN_IF_ERROR(WaitFd(fd_, POLLIN, left, fmt::format("receive from {}", peer_)), "read");
    }
    ssize_t n = recv(fd_, buf.data() + off, buf.size() - off, 0);
    if (n < 0) {
      if (errno == EINTR) continue;
      return ErrnoError(fmt::format("receive from {}", peer_));
    }
    if (n == 0)
      return Errorf(ErrorCode::kIo, "connection from {} closed{}", peer_,
                    off ? fmt::format(" in the middle of a message ({} of {} bytes)", off, buf.size()) : "");
    off += static_cast<size_t>(n);
  }
  return {};
}

namespace {

// One SSL call's outcome, taken under the socket's ssl_mu_ (the error queue is per thread).
struct SslStep {
  int n = 0;    // > 0: bytes moved
  int err = 0;  // SSL_get_error when n <= 0
  std::string why;  // for a fatal err: OpenSSL's reason
};

}  // namespace

Status Socket::StartTls(const net::TlsContext& tls, const std::string& server_name, uint64_t deadline_ns) {
  if (ssl_) return Errorf(ErrorCode::kInternal, "TLS with {} was already started", peer_);
  if (!tls.ctx()) return Errorf(ErrorCode::kInvalidArgument, "TLS with {}: no certificates configured", peer_);
  ERR_clear_error();
  SSL* ssl = SSL_new(tls.ctx());
  if (!ssl) return Errorf(ErrorCode::kInternal, "SSL_new: {}", net::OpenSslErrors());
  const int flags = fcntl(fd_, F_GETFL);
  const auto fail = [&](Error e) -> Status {
    SSL_free(ssl);
    fcntl(fd_, F_SETFL, flags);  // plain and blocking again: an ERROR record may still go to a plaintext peer
    return std::unexpected(std::move(e));
  };
  if (!tls.server())
    if (auto st = net::ExpectServerName(ssl, server_name); !st) return fail(st.error());
  if (auto st = net::AttachSocket(ssl, fd_); !st) return fail(st.error());
  SSL_set_read_ahead(ssl, 1);  // fewer recv calls per TLS record; reads always try SSL_read before waiting
  // A peer that closes without close_notify reads as a plain EOF: records are framed and checked
  // by the migration protocol itself, which notices a stream cut short.
  SSL_set_options(ssl, SSL_OP_IGNORE_UNEXPECTED_EOF);
  fcntl(fd_, F_SETFL, flags | O_NONBLOCK);
  if (auto st = net::RunHandshake(ssl, fd_, tls.server(), deadline_ns, nullptr, peer_); !st) return fail(st.error());
  ssl_ = ssl;
  peer_cert_ = net::PeerCertName(ssl);
  // The allow-list is judged after a completed handshake, so the refusal can travel to the
  // (authenticated) peer as an ERROR record over TLS: the socket stays TLS.
  if (tls.server()) FERRY_RETURN_IF_ERROR(tls.CheckPeer(ssl), fmt::format("TLS with {}", peer_));
  return {};
}

Status Socket::WriteAllTls(std::span<const uint8_t> data) {
  size_t off = 0;
  while (off < data.size()) {
    SslStep st;
    {
      MutexLock l(ssl_mu_);
      ERR_clear_error();
      st.n = SSL_write(ssl_, data.data() + off, static_cast<int>(std::min<size_t>(data.size() - off, 1 << 30)));
      if (st.n <= 0) {
        st.err = SSL_get_error(ssl_, st.n);
        if (st.err != SSL_ERROR_WANT_READ && st.err != SSL_ERROR_WANT_WRITE) {
          st.why = st.err == SSL_ERROR_SYSCALL && ERR_peek_error() == 0 ? std::string(errno ? strerror(errno) : "connection lost")
                                                                        : net::OpenSslErrors();
          // TLS 1.3: a client finishes its handshake before the server has judged its certificate;
          // a refusal then shows as a reset under the next write, with the server's alert waiting
          // to be read. Say why rather than "Broken pipe".
          uint8_t b;
          ERR_clear_error();
          if (SSL_read(ssl_, &b, 1) <= 0 && ERR_peek_error() != 0) {
            const std::string alert = net::OpenSslErrors();
            if (alert.find("alert") != std::string::npos) st.why = "the peer refused the connection: " + alert;
          }
        }
      }
    }
    if (st.n > 0) {
      off += static_cast<size_t>(st.n);
      continue;
    }
    if (st.err == SSL_ERROR_WANT_WRITE) {
      // No deadline, as for plaintext: TCP_USER_TIMEOUT / keepalive or Shutdown() end the wait.
      FERRY_RETURN_IF_ERROR(WaitFd(fd_, POLLOUT, -1, fmt::format("send to {}", peer_)), "TLS");
    } else if (st.err == SSL_ERROR_WANT_READ) {
      Status w = WaitFd(fd_, POLLIN, 10, fmt::format("send to {}", peer_));
      if (!w && w.error().code() != ErrorCode::kTimeout) return std::unexpected(w.error().WithContext("TLS"));
    } else {
      return Errorf(ErrorCode::kIo, "send to {}: TLS: {}", peer_, st.why);
    }
  }
  bytes_written_.fetch_add(data.size(), std::memory_order_relaxed);
  return {};
}

Status Socket::ReadExactTls(std::span<uint8_t> buf, int timeout_ms) {
  const uint64_t deadline = timeout_ms >= 0 ? NowNs() + static_cast<uint64_t>(timeout_ms) * 1'000'000 : 0;
  size_t off = 0;
  while (off < buf.size()) {
    SslStep st;
    {
      MutexLock l(ssl_mu_);
      ERR_clear_error();
      st.n = SSL_read(ssl_, buf.data() + off, static_cast<int>(std::min<size_t>(buf.size() - off, 1 << 30)));
      if (st.n <= 0) {
        st.err = SSL_get_error(ssl_, st.n);
        if (st.err == SSL_ERROR_SSL || (st.err == SSL_ERROR_SYSCALL && ERR_peek_error() != 0)) st.why = net::OpenSslErrors();
        else if (st.err == SSL_ERROR_SYSCALL) st.why = errno ? strerror(errno) : "connection lost";
      }
    }
    if (st.n > 0) {
      off += static_cast<size_t>(st.n);
      continue;
    }
    if (st.err == SSL_ERROR_ZERO_RETURN)
      return Errorf(ErrorCode::kIo, "connection from {} closed{}", peer_,
                    off ? fmt::format(" in the middle of a message ({} of {} bytes)", off, buf.size()) : "");
    if (st.err != SSL_ERROR_WANT_READ && st.err != SSL_ERROR_WANT_WRITE)
      return Errorf(ErrorCode::kIo, "receive from {}: TLS: {}", peer_, st.why);
    // Wait outside the lock, in slices: a writer's SSL call never waits behind this reader.
    int slice = 100;
    if (timeout_ms >= 0) {
      const int left = MsUntil(deadline);
      if (left == 0)
        return Errorf(ErrorCode::kTimeout, "read: receive from {}: timed out after {} ms ({} of {} bytes)", peer_, timeout_ms, off, buf.size());
      slice = std::min(slice, left);
    }
    Status w = WaitFd(fd_, st.err == SSL_ERROR_WANT_READ ? POLLIN : POLLOUT, slice, fmt::format("receive from {}", peer_));
    if (!w && w.error().code() != ErrorCode::kTimeout) return std::unexpected(w.error().WithContext("read"));
  }
  return {};
}

void Socket::SetUserTimeout(int ms) {
  unsigned v = static_cast<unsigned>(std::max(ms, 0));
  setsockopt(fd_, IPPROTO_TCP, TCP_USER_TIMEOUT, &v, sizeof v);
}

void Socket::SetKeepAlive(int idle_ms, int interval_ms, int count) {
  const int on = 1, idle = std::max(idle_ms / 1000, 1), intvl = std::max(interval_ms / 1000, 1), cnt = std::max(count, 1);
  setsockopt(fd_, SOL_SOCKET, SO_KEEPALIVE, &on, sizeof on);
  setsockopt(fd_, IPPROTO_TCP, TCP_KEEPIDLE, &idle, sizeof idle);
  setsockopt(fd_, IPPROTO_TCP, TCP_KEEPINTVL, &intvl, sizeof intvl);
  setsockopt(fd_, IPPROTO_TCP, TCP_KEEPCNT, &cnt, sizeof cnt);
}

void Socket::Shutdown() { shutdown(fd_, SHUT_RDWR); }

Socket::PathInfo Socket::Path() const {
  PathInfo p;
  tcp_info ti{};
  socklen_t len = sizeof ti;
  if (getsockopt(fd_, IPPROTO_TCP, TCP_INFO, &ti, &len) != 0) return p;
  p.rtt_ms = ti.tcpi_rtt / 1000.0;
  p.bytes_acked = ti.tcpi_bytes_acked;
  p.notsent_bytes = ti.tcpi_notsent_bytes;
  return p;
}

Result<std::unique_ptr<Listener>> Listener::Listen(const Endpoint& ep) {
  addrinfo hints{};
  hints.ai_socktype = SOCK_STREAM;
  hints.ai_flags = AI_PASSIVE;
  addrinfo* res = nullptr;
  std::string port = std::to_string(ep.port);
  int rc = getaddrinfo(ep.host.empty() ? nullptr : ep.host.c_str(), port.c_str(), &hints, &res);
  if (rc != 0) return Errorf(ErrorCode::kInvalidArgument, "listen {}: cannot resolve: {}", ep.ToString(), gai_strerror(rc));
  int fd = socket(res->ai_family, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (fd < 0) {
    freeaddrinfo(res);
    return ErrnoError("socket");
  }
  int one = 1;
  setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
  int buf = 4 << 20;
  setsockopt(fd, SOL_SOCKET, SO_RCVBUF, &buf, sizeof buf);
  if (bind(fd, res->ai_addr, res->ai_addrlen) != 0 || listen(fd, 32) != 0) {
    auto e = ErrnoError(fmt::format("listen on {}", ep.ToString()));
    freeaddrinfo(res);
    close(fd);
    return e;
  }
  freeaddrinfo(res);
  const int wake = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
  if (wake < 0) {
    auto e = ErrnoError("eventfd");
    close(fd);
    return e;
  }
  sockaddr_storage ss{};
  socklen_t len = sizeof ss;
  getsockname(fd, reinterpret_cast<sockaddr*>(&ss), &len);
  uint16_t bound = ss.ss_family == AF_INET6 ? ntohs(reinterpret_cast<sockaddr_in6*>(&ss)->sin6_port)
                                            : ntohs(reinterpret_cast<sockaddr_in*>(&ss)->sin_port);
  return std::unique_ptr<Listener>(new Listener(fd, wake, bound));
}

Listener::~Listener() {
  close(fd_);
  close(wake_fd_);
}

bool Listener::loopback() const {
  sockaddr_storage ss{};
  socklen_t len = sizeof ss;
  if (getsockname(fd_, reinterpret_cast<sockaddr*>(&ss), &len) != 0) return false;
  if (ss.ss_family == AF_INET) return (ntohl(reinterpret_cast<const sockaddr_in*>(&ss)->sin_addr.s_addr) >> 24) == 127;
  if (ss.ss_family != AF_INET6) return false;
  const in6_addr& a = reinterpret_cast<const sockaddr_in6*>(&ss)->sin6_addr;
  if (IN6_IS_ADDR_LOOPBACK(&a)) return true;
  return IN6_IS_ADDR_V4MAPPED(&a) && a.s6_addr[12] == 127;
}

Result<std::unique_ptr<Socket>> Listener::Accept(int timeout_ms) {
  pollfd p[2] = {{fd_, POLLIN, 0}, {wake_fd_, POLLIN, 0}};
  for (;;) {
    const int n = poll(p, 2, timeout_ms);
    if (n > 0) break;
    if (n == 0) return Errorf(ErrorCode::kTimeout, "listener: accept: timed out after {} ms", timeout_ms);
    if (errno != EINTR) return ErrnoError("listener: accept");
  }
  if (p[1].revents & POLLIN) {
    uint64_t count = 0;
    (void)!read(wake_fd_, &count, sizeof count);  // drained: one Wake() wakes one wait
    return Errorf(ErrorCode::kTimeout, "listener: accept: woken");
  }
  int fd = accept4(fd_, nullptr, nullptr, SOCK_CLOEXEC);
  if (fd < 0) return ErrnoError("accept");
  TuneSocket(fd);
  return std::make_unique<Socket>(fd);
}

void Listener::Wake() {
  const uint64_t one = 1;
  (void)!write(wake_fd_, &one, sizeof one);
}

void Listener::Shutdown() { shutdown(fd_, SHUT_RDWR); }

Status WritePreamble(Socket& s, Role role, uint32_t version) {
  auto p = EncodePreamble(role, version);
  return s.WriteAll(p);
}

Result<Preamble> ReadPreamble(Socket& s, int timeout_ms, uint32_t max_version) {
  std::array<uint8_t, kPreambleSize> b;
  FERRY_RETURN_IF_ERROR(s.ReadExact(b, timeout_ms), "preamble");
  return DecodePreamble(b, max_version);
}

Status WriteRecord(Socket& s, RecordType type, std::span<const uint8_t> payload, bool mandatory) {
  auto rec = EncodeRecord(type, payload, mandatory);
  FERRY_RETURN_IF_ERROR(s.WriteAll(rec), RecordTypeName(type));
  return {};
}

namespace {

// The payload's first read; every further read doubles what arrived (up to the announced length).
constexpr size_t kFirstPayloadRead = 64 << 10;

// One record: the header within `header_ms` (< 0: no limit), the payload by `payload_deadline_ns`
// (0: none). The payload buffer grows with the bytes that arrived rather than to the header's
// announced length at once: a peer announcing kMaxRecordPayload and sending nothing more commits
// (and has zeroed) no more memory than it sent, times two.
Status ReadRecordWithin(Socket& s, Record* r, int header_ms, uint64_t payload_deadline_ns) {
  std::array<uint8_t, kRecordHeaderSize> hb;
  FERRY_RETURN_IF_ERROR(s.ReadExact(hb, header_ms), "record header");
  auto h = DecodeRecordHeader(hb);
  if (!h) return std::unexpected(h.error());
  r->header = *h;
  const std::string_view what = IsKnownRecordType(h->type) ? RecordTypeName(r->type()) : std::string_view("record payload");
  const size_t length = h->length;
  r->payload.clear();  // keeps its capacity: a reused record allocates nothing
  while (r->payload.size() < length) {
    const size_t have = r->payload.size();
    const size_t n = std::min(length - have, std::max(have, kFirstPayloadRead));
    r->payload.resize(have + n);
    FERRY_RETURN_IF_ERROR(s.ReadExact(std::span(r->payload).subspan(have, n), payload_deadline_ns ? MsUntil(payload_deadline_ns) : -1),
                          have ? fmt::format("{} (after {} of {} bytes)", what, have, length) : std::string(what));
  }
  FERRY_RETURN_IF_ERROR(VerifyRecord(hb, r->payload), "read");
  return {};
}

}  // namespace

Status ReadRecordInto(Socket& s, Record* r, int timeout_ms) {
  // A payload gets at least 30 s, however short the header's wait.
  const uint64_t payload_deadline = timeout_ms < 0 ? 0 : NowNs() + static_cast<uint64_t>(std::max(timeout_ms, 30000)) * 1'000'000;
  return ReadRecordWithin(s, r, timeout_ms, payload_deadline);
}

int MsUntil(uint64_t deadline_ns) {
  const uint64_t now = NowNs();
  return now >= deadline_ns ? 0 : static_cast<int>(std::min<uint64_t>((deadline_ns - now + 999'999) / 1'000'000, INT32_MAX));
}

Result<Record> ReadRecordUntil(Socket& s, uint64_t deadline_ns) {
  Record r;
  if (auto st = ReadRecordWithin(s, &r, MsUntil(deadline_ns), deadline_ns); !st) return std::unexpected(st.error());
  return r;
}

Result<Record> ReadRecord(Socket& s, int timeout_ms) {
  Record r;
  if (auto st = ReadRecordInto(s, &r, timeout_ms); !st) return std::unexpected(st.error());
  return r;
}

void SendError(Socket& s, const Error& e) {
  (void)WriteRecord(s, RecordType::kError, Encode(ErrorMsg{static_cast<uint32_t>(e.code()), e.message()}));
}

bool RateLimiter::Acquire(uint64_t bytes, const std::atomic<bool>& cancelled) {
  if (rate_ == 0) return !cancelled.load();
  using namespace std::chrono;
  steady_clock::time_point start;
  {
    MutexLock l(mu_);
    auto now = steady_clock::now();
    // Allow a burst of at most 50 ms worth of credit.
    if (next_ < now - milliseconds(50)) next_ = now - milliseconds(50);
    start = next_;
    next_ += nanoseconds(bytes * 1'000'000'000ull / rate_);
  }
  while (steady_clock::now() < start) {
    if (cancelled.load()) return false;
    std::this_thread::sleep_for(std::min<steady_clock::duration>(start - steady_clock::now(), milliseconds(20)));
  }
  return !cancelled.load();
}

}  // namespace ferry::migration
