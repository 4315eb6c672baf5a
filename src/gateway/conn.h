// A gateway-to-gateway connection: a TCP socket, optionally wrapped in TLS 1.3
// with mutual authentication. Used by one thread at a time (the handshake
// thread, then the owning session thread).
#pragma once

#include <openssl/ssl.h>

#include <atomic>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "common/error.h"
#include "gateway/protocol.h"
#include "net/tls.h"

namespace ferry::gateway {

// The TLS policy and certificate loading are shared with the migration channels (net/tls.h).
using net::OpenSslErrors;
using net::TlsContext;
using net::TlsFiles;

class Conn {
 public:
  enum class IoResult { kOk, kWouldBlock, kClosed, kError };
  ~Conn();
  // Blocking connect (with timeout) + TLS client handshake.
  static Result<std::unique_ptr<Conn>> Connect(const std::string& host_port, const TlsContext& tls,
                                               int timeout_ms);
  // Takes ownership of an accepted fd and runs the TLS server handshake: all of it within
  // timeout_ms however the peer paces its bytes, and ended early (kCancelled) once *evict is set
  // (checked every 50 ms). Then the socket is blocking with timeout_ms per read/write.
  static Result<std::unique_ptr<Conn>> Accept(int fd, const TlsContext& tls, int timeout_ms,
                                              const std::atomic<bool>* evict = nullptr);

  // Blocking frame I/O, used during setup only.
  Status WriteFrameBlocking(FrameType t, std::span<const uint8_t> payload);
  Result<Frame> ReadFrameBlocking();

  Status SetNonBlocking();
  int fd() const { return fd_; }
  bool HasPending() const;  // TLS has buffered plaintext (poll() won't show it)
  bool tls() const { return ssl_ != nullptr; }

  // Nonblocking I/O. *n = bytes moved on kOk.
  IoResult Read(uint8_t* buf, size_t cap, size_t* n);
  IoResult Write(const uint8_t* buf, size_t len, size_t* n);
  std::string last_error() const { return last_error_; }

  // Buffers owned by the session thread.
  std::vector<uint8_t> in;   // received, not yet decoded
  std::vector<uint8_t> out;  // encoded, not yet written
  size_t out_off = 0;
  size_t last_write_len = 0;  // TLS retry must repeat the same length
  uint64_t appended = 0;      // bytes ever appended to `out` (stream position of its end)

 private:
  Conn(int fd, SSL* ssl) : fd_(fd), ssl_(ssl) {}
  int fd_;
  SSL* ssl_;
  std::string last_error_;
};

// "host:port" -> sockaddr; "[v6]:port" accepted too.
Result<std::pair<std::string, uint16_t>> SplitHostPort(const std::string& s);
Result<int> ListenTcp(const std::string& host_port);
Result<int> ConnectTcp(const std::string& host_port, int timeout_ms);
// The destination an accepted connection was addressed to before a NAT REDIRECT rule sent it
// to us ("IP:PORT", "[IPv6]:PORT"). kNotFound when the connection was not redirected.
Result<std::string> OriginalDestination(int fd);

}  // namespace ferry::gateway
