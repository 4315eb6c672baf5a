// ferry-gateway: a pair of WAN accelerators. The forward (source-side) gateway
// accepts plain TCP connections (e.g. a VMM's migration stream) and carries
// each one as a *session* to the serve (destination-side) gateway, which
// connects onward to the real destination. Per session there is one control
// connection and N data connections, all TLS 1.3 with mutual auth unless
// insecure. Protocol: docs/gateway.md, gateway/protocol.h.
//
// Threads: one accept thread, one thread per session (poll()-driven, all
// sockets nonblocking), a short-lived handshake thread per incoming
// gateway connection (its TLS handshake under one deadline; at most
// kMaxHandshakes at once, the oldest ended to make room), and the metrics
// HTTP server thread. A thread that cannot be created drops its connection;
// accept() failures (EMFILE) back off instead of spinning.
#pragma once

#include <atomic>
#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "common/compress.h"
#include "common/error.h"
#include "gateway/conn.h"
#include "gateway/dest_allow.h"
#include "common/thread_annotations.h"

namespace ferry::gateway {

enum class Role { kServe, kForward };
using Codec = ferry::Compression;  // per-chunk codec (common/compress.h); the DATA flags carry it, not its value

struct GatewayOptions {
  Role role = Role::kServe;
  std::string listen;          // ADDR:PORT (port 0 = pick one)
  std::string via;             // forward: remote gateway ADDR:PORT
  std::string to;              // forward: final destination ADDR:PORT (with transparent: the fallback)
  bool transparent = false;    // forward: destination = the connection's original destination before an
                               // iptables/nftables REDIRECT to --listen (SO_ORIGINAL_DST)
  int streams = 4;             // forward: data connections per session (1..64)
  bool insecure = false;
  TlsFiles tls;
  // serve: the destinations a peer may ask for (--allow-to); empty = any (a warning at start).
  std::vector<DestRule> allow_to;
  Codec codec = Codec::kNone;
  size_t window = 64u << 20;   // max unacknowledged bytes per direction per session
  size_t chunk = 256u << 10;   // chunk size (<= 1 MiB)
  std::string metrics;         // "ADDR:PORT" or "unix:/path"; empty = off
  double max_rate_mbit = 0;    // WAN rate: each data conn is paced to 1.25 x rate / streams (0 = off)
  int connect_timeout_ms = 10000;
  int keepalive_timeout_ms = 15000;
  int rejoin_timeout_ms = 10000;  // session fails if no data connection for this long
};

// Counters exported on /metrics. Written by session threads (atomics).
struct GatewayCounters {
  std::atomic<uint64_t> sessions_total{0}, sessions_active{0}, sessions_failed{0};
  std::atomic<uint64_t> bytes_from_local{0}, bytes_to_local{0};
  std::atomic<uint64_t> wire_bytes_sent{0}, wire_bytes_received{0};
  std::atomic<uint64_t> chunks_sent{0}, chunks_retransmitted{0}, chunks_duplicate{0};
  std::atomic<uint64_t> chunks_bypassed{0}, conn_stalls{0};  // re-sent around a stuck data connection
  std::atomic<uint64_t> chunks_compressed{0}, compressed_saved_bytes{0};
  std::atomic<uint64_t> data_conns_lost{0}, data_conns_active{0};
  std::atomic<uint64_t> protocol_errors{0}, handshake_failures{0};
  std::atomic<uint64_t> destinations_refused{0};     // serve: HELLOs naming a destination --allow-to does not allow
  std::atomic<uint64_t> handshakes_evicted{0};       // TLS handshakes ended early to make room (kMaxHandshakes)
  std::atomic<uint64_t> accept_errors{0};            // accept() failures (EMFILE etc.; the loop backs off)
  std::atomic<uint64_t> spawn_failures{0};           // connections dropped because no thread could be created
  std::atomic<uint64_t> rtt_us{0};
  // Largest send buffer (allocated bytes) any data connection has held: bounded by design
  // (about 2x the per-connection queue limit plus one chunk, plus the written prefix).
  std::atomic<uint64_t> conn_buffer_peak_bytes{0};
};

class Session;

class Gateway {
 public:
  static Result<std::unique_ptr<Gateway>> Create(GatewayOptions opts);
  ~Gateway();
  Gateway(const Gateway&) = delete;
  Gateway& operator=(const Gateway&) = delete;

  uint16_t port() const { return port_; }
  std::string MetricsText() const;
  std::string StatusJson() const;
  void Stop();

  const GatewayOptions& options() const { return opts_; }
  GatewayCounters& counters() { return counters_; }
  const TlsContext& tls() const { return *tls_; }
  bool stopping() const { return stopping_.load(); }
  // Test hook: the next session loop iteration shuts down one of its data
  // connections (as if the network dropped it).
  void KillOneDataConnectionForTest() { kill_requests_++; }
  bool TakeKillRequest() {
    int v = kill_requests_.load();
    while (v > 0)
      if (kill_requests_.compare_exchange_weak(v, v - 1)) return true;
    return false;
  }

 private:
  explicit Gateway(GatewayOptions opts);
  Status Start();
  void AcceptLoop();
  void HandleIncoming(int fd, const std::atomic<bool>& evict);  // serve: handshake (ended early once evict) + dispatch
  void HandleLocal(int fd);     // forward: new client connection
  // serve: `dest` (HOST:PORT from a peer's HELLO) resolved, as "IP:PORT" of its first address that
  // --allow-to allows; kPermissionDenied when none is.
  Result<std::string> AllowedDestination(const std::string& dest) const;
  bool Spawn(std::function<void()> fn);  // false: no thread could be created (counted, logged)
  void RegisterSession(const std::shared_ptr<Session>& s);
  void UnregisterSession(uint64_t id);
  std::shared_ptr<Session> FindSession(uint64_t id);

  GatewayOptions opts_;
  std::shared_ptr<TlsContext> tls_;
  int listen_fd_ = -1;
  int wake_fd_ = -1;
  uint16_t port_ = 0;
  std::atomic<bool> stopping_{false};
  std::atomic<int> kill_requests_{0};
  GatewayCounters counters_;
  std::thread accept_thread_;
  struct Metrics;
  std::unique_ptr<Metrics> metrics_;  // HTTP server (own thread)

  mutable Mutex mu_;
  struct Worker {
    std::thread t;
    std::shared_ptr<std::atomic<bool>> done;
  };
  std::vector<Worker> workers_ GUARDED_BY(mu_);
  std::vector<std::shared_ptr<Session>> sessions_ GUARDED_BY(mu_);
  static constexpr size_t kMaxHandshakes = 64;
  std::vector<std::weak_ptr<std::atomic<bool>>> handshakes_ GUARDED_BY(mu_);  // serve handshakes in progress, oldest first
  friend class Session;
};

Result<Codec> ParseCodec(const std::string& s);

}  // namespace ferry::gateway
