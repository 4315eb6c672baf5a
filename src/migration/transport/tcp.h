// TCP transport for migration streams: endpoints ("tcp:HOST:PORT", "tls:HOST:PORT"), sockets
// with timeouts and thread-safe shutdown, optionally wrapped in mutually authenticated TLS 1.3
// (net/tls.h), record framing on top (wire.h), and a shared token-bucket rate limiter for
// `max_bandwidth`.
//
// Threading: one reader per Socket at a time; WriteAll() is serialized by the
// socket's own mutex (whole records never interleave); Shutdown() may be called from
// any thread and makes blocked reads/writes fail promptly (used by cancel). With TLS the reader
// and a writer may still run at once: each SSL call holds ssl_mu_ only while it runs (the socket
// is non-blocking; waiting for the socket happens outside the lock), so a reader waiting for
// data never holds up a writer.
#pragma once

#include <atomic>
#include <chrono>
#include <cstdint>
#include <memory>
#include <mutex>
#include <span>
#include <string>
#include <string_view>

#include "common/error.h"
#include "common/thread_annotations.h"
#include "net/tls.h"
#include "migration/protocol/wire.h"

namespace ferry::migration {

struct Endpoint {
  std::string host;
  uint16_t port = 0;
  bool tls = false;  // "tls:": every connection is TLS 1.3 with certificates on both sides
  std::string ToString() const;
};
// "tcp:HOST:PORT" or "tls:HOST:PORT" (HOST may be empty for listening on every address; an IPv6
// HOST in brackets).
Result<Endpoint> ParseEndpoint(std::string_view s);

class Socket {
 public:
  explicit Socket(int fd);
  ~Socket();
  Socket(const Socket&) = delete;
  Socket& operator=(const Socket&) = delete;

  // TCP connect within timeout_ms. A tls: endpoint needs `tls` (a client context): then the TLS
  // handshake follows, within another timeout_ms, and the server's certificate must be for
  // `server_name` (empty: the endpoint's host).
  static Result<std::unique_ptr<Socket>> Connect(const Endpoint& ep, int timeout_ms, const net::TlsContext* tls = nullptr,
                                                 const std::string& server_name = "");
  int fd() const { return fd_; }
  std::string peer() const { return peer_; }

  // Wraps the connection in TLS before anything else was sent or read on it: the client or the
  // server handshake (tls.server()) by `deadline_ns` (NowNs clock). A client checks the server's
  // certificate against server_name; a server checks the peer against tls.CheckPeer. From then on
  // every read and write is encrypted. On failure (plaintext peer, certificate from another CA,
  // expired, name not allowed, timeout) the error says which, and the socket stays plain, so an
  // ERROR record can still be sent to a plaintext peer.
  Status StartTls(const net::TlsContext& tls, const std::string& server_name, uint64_t deadline_ns);
  bool tls() const { return ssl_ != nullptr; }
  // The peer certificate's name (net::PeerCertName), "" without TLS.
  const std::string& peer_cert_name() const { return peer_cert_; }

  Status WriteAll(std::span<const uint8_t> data);
  // The kernel's view of the connection (TCP_INFO): smoothed RTT, bytes the peer acknowledged so
  // far, and bytes still waiting in the send buffer (not sent yet).
  struct PathInfo {
    double rtt_ms = 0;
    uint64_t bytes_acked = 0;
    uint32_t notsent_bytes = 0;
  };
  PathInfo Path() const;
  // timeout_ms < 0: no timeout; else the whole read must finish within it (a peer that trickles
  // a byte at a time does not restart it). EOF before `buf` is full is an error (kIo).
  Status ReadExact(std::span<uint8_t> buf, int timeout_ms);
  void Shutdown();
  // TCP_USER_TIMEOUT: the connection fails when sent data stays unacknowledged this long (a peer
  // that vanished or a path that drops everything), instead of after minutes of retransmissions.
  void SetUserTimeout(int ms);
  // TCP keepalive: after `idle_ms` without traffic a probe every `interval_ms`; `count`
  // unanswered probes fail the connection (with a user timeout set, that bound applies too). A
  // peer that vanished while nothing was in flight is noticed as well. Whole seconds, at least 1.
  void SetKeepAlive(int idle_ms, int interval_ms, int count);
  uint64_t bytes_written() const { return bytes_written_.load(std::memory_order_relaxed); }

 private:
  int fd_;
  Status WriteAllTls(std::span<const uint8_t> data);
  Status ReadExactTls(std::span<uint8_t> buf, int timeout_ms);

  std::string peer_;
  Mutex write_mu_;
  std::atomic<uint64_t> bytes_written_{0};
  SSL* ssl_ = nullptr;  // set by StartTls (before the socket is shared), then constant; its calls GUARDED_BY(ssl_mu_)
  Mutex ssl_mu_;
  std::string peer_cert_;
};

class Listener {
 public:
  static Result<std::unique_ptr<Listener>> Listen(const Endpoint& ep);
  ~Listener();
  uint16_t port() const { return port_; }
  // Bound to a loopback address (127.0.0.0/8, ::1, or ::ffff:127.x): only this host can connect.
  bool loopback() const;
  // timeout_ms < 0: wait forever (until Shutdown() or Wake()). kTimeout when the time passed or
  // Wake() was called (then the caller looks at whatever it was woken for and may accept again).
  Result<std::unique_ptr<Socket>> Accept(int timeout_ms);
  // Thread-safe: makes the current Accept() - or the next one, if none waits - return kTimeout at
  // once (an eventfd: a source handed over by a greeting thread is taken without polling).
  void Wake();
  void Shutdown();

 private:
  explicit Listener(int fd, int wake_fd, uint16_t port) : fd_(fd), wake_fd_(wake_fd), port_(port) {}
  int fd_;
  int wake_fd_;  // eventfd (non-blocking): Wake() counts up, Accept() drains it
  uint16_t port_;
};

Status WritePreamble(Socket& s, Role role, uint32_t version = kProtocolVersion);
Result<Preamble> ReadPreamble(Socket& s, int timeout_ms, uint32_t max_version = kProtocolVersion);
Status WriteRecord(Socket& s, RecordType type, std::span<const uint8_t> payload, bool mandatory = true);
// Reads, validates (header, limits, CRC) and returns one record.
Result<Record> ReadRecord(Socket& s, int timeout_ms);
// The same into *r, reusing its payload buffer (hot receive loops: no allocation per record).
Status ReadRecordInto(Socket& s, Record* r, int timeout_ms);
// A connection's handshake (preamble + first record) under one deadline: the milliseconds left
// until `deadline_ns` (NowNs clock), at least 0.
int MsUntil(uint64_t deadline_ns);
// One record, header and payload within the same deadline (ReadRecord gives a payload at least 30 s).
Result<Record> ReadRecordUntil(Socket& s, uint64_t deadline_ns);
// Sends an ERROR record (best effort: the connection may already be gone).
void SendError(Socket& s, const Error& e);

// Token bucket shared by all data channels of a migration (bytes per second, 0 = off).
class RateLimiter {
 public:
  explicit RateLimiter(uint64_t bytes_per_second) : rate_(bytes_per_second) {}
  // Blocks until `bytes` may be sent; returns false if `cancelled` became true.
  bool Acquire(uint64_t bytes, const std::atomic<bool>& cancelled);
  uint64_t rate() const { return rate_; }

 private:
  uint64_t rate_;
  Mutex mu_;
  std::chrono::steady_clock::time_point next_ GUARDED_BY(mu_){};
};

}  // namespace ferry::migration
