// Integration tests for ferry-gateway over loopback: real TLS, real sockets.
#include <arpa/inet.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <openssl/err.h>
#include <openssl/ssl.h>
#include <poll.h>
#include <signal.h>
#include <sched.h>
#include <sys/socket.h>
#include <sys/resource.h>
#include <sys/wait.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <mutex>
#include <optional>
#include <random>
#include <sstream>
#include <thread>

#include <gtest/gtest.h>
#include <httplib.h>
#include <nlohmann/json.hpp>

#include "gateway/gateway.h"
#include "gateway/protocol.h"
#include "prometheus_text.h"

namespace ferry::gateway {
namespace {
namespace fs = std::filesystem;
using namespace std::chrono_literals;

int Sh(const std::string& cmd) { return std::system((cmd + " >/dev/null 2>&1").c_str()); }

// A TCP port on 127.0.0.1 that was free a moment ago.
uint16_t FreeLoopbackPort() {
  int probe = socket(AF_INET, SOCK_STREAM, 0);
  sockaddr_in a{};
  a.sin_family = AF_INET;
  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  bind(probe, reinterpret_cast<sockaddr*>(&a), sizeof a);
  socklen_t len = sizeof a;
  getsockname(probe, reinterpret_cast<sockaddr*>(&a), &len);
  close(probe);
  return ntohs(a.sin_port);
}

std::string GatewayBinary() {
  return std::string(getenv("FERRY_BUILD_DIR") ? getenv("FERRY_BUILD_DIR") : ".") + "/bin/ferry-gateway";
}

// Test PKI generated at test time (never committed).
struct Pki {
  fs::path dir;
  Pki() {
    char tmpl[] = "/tmp/ferry-gw-pki-XXXXXX";
    dir = mkdtemp(tmpl);
    auto d = dir.string();
    auto mk = [&](const std::string& name, const std::string& ca, const std::string& cn) {
      EXPECT_EQ(0, Sh("openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -keyout " + d + "/" + name +
                      ".key -out " + d + "/" + name + ".csr -subj /CN=" + cn));
      EXPECT_EQ(0, Sh("openssl x509 -req -in " + d + "/" + name + ".csr -CA " + d + "/" + ca + ".crt -CAkey " + d +
                      "/" + ca + ".key -CAcreateserial -days 2 -out " + d + "/" + name + ".crt"));
    };
    for (std::string ca : {"ca", "rogue"})
      EXPECT_EQ(0, Sh("openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 2 -keyout " + d +
                      "/" + ca + ".key -out " + d + "/" + ca + ".crt -subj /CN=" + ca));
    mk("server", "ca", "server");
    mk("client", "ca", "client");
    mk("evil", "rogue", "client");
  }
  ~Pki() { fs::remove_all(dir); }
  TlsFiles Files(const std::string& name, const std::string& ca = "ca") const {
    auto d = dir.string();
    return {d + "/" + name + ".crt", d + "/" + name + ".key", d + "/" + ca + ".crt"};
  }
};

// A TCP socket created inside network namespace `ns` (from a thread that joined it; the
// socket stays in that namespace whichever thread uses it). "" = this namespace. -1 on error.
int TcpSocketIn(const std::string& ns) {
  if (ns.empty()) return socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  int fd = -1;
  std::thread t([&] {
    int nsfd = open(("/var/run/netns/" + ns).c_str(), O_RDONLY | O_CLOEXEC);
    if (nsfd < 0) return;
    if (setns(nsfd, CLONE_NEWNET) == 0) fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    close(nsfd);
  });
  t.join();
  return fd;
}

// Destination: echoes every byte back; optional delay before reading. By default on an
// ephemeral loopback port; with `netns`, on 0.0.0.0:`port` inside that namespace.
class EchoServer {
 public:
  explicit EchoServer(std::chrono::milliseconds read_delay = 0ms, const std::string& netns = "", uint16_t port = 0)
      : delay_(read_delay) {
    fd_ = TcpSocketIn(netns);
    int one = 1;
    setsockopt(fd_, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    sockaddr_in a{};
    a.sin_family = AF_INET;
    a.sin_port = htons(port);
    a.sin_addr.s_addr = htonl(netns.empty() ? INADDR_LOOPBACK : INADDR_ANY);
    bind(fd_, reinterpret_cast<sockaddr*>(&a), sizeof a);
    listen(fd_, 64);
    socklen_t len = sizeof a;
    getsockname(fd_, reinterpret_cast<sockaddr*>(&a), &len);
    port_ = ntohs(a.sin_port);
    thread_ = std::thread([this] {
      for (;;) {
        sockaddr_in peer{};
        socklen_t plen = sizeof peer;
        int c = accept(fd_, reinterpret_cast<sockaddr*>(&peer), &plen);
        if (c < 0) return;
        char ip[INET_ADDRSTRLEN] = "";
        inet_ntop(AF_INET, &peer.sin_addr, ip, sizeof ip);
        {
          std::lock_guard lk(mu_);
          last_peer_ = ip;
        }
        conns_.emplace_back([this, c] {
          std::this_thread::sleep_for(delay_);
          std::vector<char> buf(1 << 16);
          for (;;) {
            ssize_t n = recv(c, buf.data(), buf.size(), 0);
            if (n <= 0) break;
            received_ += n;
            for (ssize_t off = 0; off < n;) {
              ssize_t w = send(c, buf.data() + off, n - off, MSG_NOSIGNAL);
              if (w <= 0) {
                close(c);
                return;
              }
              off += w;
            }
          }
          shutdown(c, SHUT_WR);
          close(c);
        });
      }
    });
  }
  ~EchoServer() {
    shutdown(fd_, SHUT_RDWR);
    close(fd_);
    thread_.join();
    for (auto& t : conns_) t.join();
  }
  uint16_t port() const { return port_; }
  std::string last_peer() {
    std::lock_guard lk(mu_);
    return last_peer_;
  }
  std::atomic<uint64_t> received_{0};

 private:
  int fd_;
  uint16_t port_;
  std::chrono::milliseconds delay_;
  std::thread thread_;
  std::vector<std::thread> conns_;
  std::mutex mu_;
  std::string last_peer_;  // GUARDED_BY(mu_): address of the last accepted client
};

// Connects to ip:port from network namespace `netns` ("" = this one); -1 on failure.
int Dial(uint16_t port, const std::string& ip = "127.0.0.1", const std::string& netns = "") {
  int fd = TcpSocketIn(netns);
  if (fd < 0) return -1;
  sockaddr_in a{};
  a.sin_family = AF_INET;
  a.sin_port = htons(port);
  inet_pton(AF_INET, ip.c_str(), &a.sin_addr);
  if (connect(fd, reinterpret_cast<sockaddr*>(&a), sizeof a) < 0) {
    close(fd);
    return -1;
  }
  timeval tv{20, 0};
  setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
  setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof tv);
  return fd;
}

using ferry::test::MetricValue;

// How a peer answered a connection it refuses: what the first read returned (0 = orderly close,
// -1 with the errno) and how long it took. A peer that never answers shows as EAGAIN after the
// socket's receive timeout (20 s from Dial), which a refusal bound of a second or two rejects.
struct ReadOutcome {
  ssize_t n = 0;
  int err = 0;
  double secs = 0;
};
ReadOutcome FirstRead(int fd) {
  ReadOutcome o;
  const auto t0 = std::chrono::steady_clock::now();
  char c[16];
  o.n = recv(fd, c, sizeof c, 0);
  o.err = o.n < 0 ? errno : 0;
  o.secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  return o;
}

// Sends `size` random bytes through the tunnel to the echo server and checks
// the echo is byte-exact, then half-closes and expects EOF.
// Returns "" on success, else a description.
std::string EchoTransferFd(int fd, size_t size, uint32_t seed);
std::string EchoTransfer(uint16_t port, size_t size, uint32_t seed) { return EchoTransferFd(Dial(port), size, seed); }
std::string EchoTransferFd(int fd, size_t size, uint32_t seed) {
  if (fd < 0) return "connect failed";
  std::vector<uint8_t> data(size);
  std::mt19937 rng(seed);
  for (auto& b : data) b = static_cast<uint8_t>(rng());
  std::thread writer([&] {
    for (size_t off = 0; off < size;) {
      ssize_t n = send(fd, data.data() + off, std::min<size_t>(size - off, 100000), MSG_NOSIGNAL);
      if (n <= 0) return;
      off += n;
    }
    shutdown(fd, SHUT_WR);
  });
  std::vector<uint8_t> got;
  got.reserve(size);
  std::vector<uint8_t> buf(1 << 16);
  std::string err;
  for (;;) {
    ssize_t n = recv(fd, buf.data(), buf.size(), 0);
    if (n < 0) {
      err = std::string("recv: ") + strerror(errno);
      break;
    }
    if (n == 0) break;
    got.insert(got.end(), buf.begin(), buf.begin() + n);
  }
  writer.join();
  close(fd);
  if (!err.empty()) return err;
  if (got.size() != size) return "got " + std::to_string(got.size()) + " of " + std::to_string(size) + " bytes";
  if (got != data) return "data mismatch";
  return "";
}

struct Pair {
  std::unique_ptr<Gateway> serve, fwd;
};

Pair MakePair(const Pki* pki, uint16_t dest_port, int streams, Codec codec = Codec::kNone,
              size_t window = 64u << 20, TlsFiles client_files = {}, double max_rate_mbit = 0) {
  GatewayOptions s;
  s.role = Role::kServe;
  s.listen = "127.0.0.1:0";
  s.window = window;
  if (pki) s.tls = pki->Files("server"); else s.insecure = true;
  auto serve = Gateway::Create(s);
  EXPECT_TRUE(serve.has_value()) << serve.error().ToString();
  GatewayOptions f;
  f.role = Role::kForward;
  f.listen = "127.0.0.1:0";
  f.via = "127.0.0.1:" + std::to_string((*serve)->port());
  f.to = "127.0.0.1:" + std::to_string(dest_port);
  f.streams = streams;
  f.codec = codec;
  f.window = window;
  f.connect_timeout_ms = 3000;
  s.max_rate_mbit = f.max_rate_mbit = max_rate_mbit;
  if (pki) f.tls = client_files.cert.empty() ? pki->Files("client") : client_files; else f.insecure = true;
  auto fwd = Gateway::Create(f);
  EXPECT_TRUE(fwd.has_value()) << fwd.error().ToString();
  return {std::move(*serve), std::move(*fwd)};
}

class GatewayTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    signal(SIGPIPE, SIG_IGN);
    pki_ = new Pki();
  }
  static void TearDownTestSuite() { delete pki_; }
  static Pki* pki_;
};
Pki* GatewayTest::pki_ = nullptr;

TEST_F(GatewayTest, ManyConcurrentSessionsByteExactBothDirections) {
  EchoServer echo;
  auto p = MakePair(pki_, echo.port(), 4);
  std::vector<std::thread> ts;
  std::vector<std::string> errs(12);
  for (int i = 0; i < 12; i++)
    ts.emplace_back([&, i] { errs[i] = EchoTransfer(p.fwd->port(), (3u << 20) + i * 7919, i); });
  for (auto& t : ts) t.join();
  for (int i = 0; i < 12; i++) EXPECT_EQ(errs[i], "") << "session " << i;
  EXPECT_EQ(p.fwd->counters().sessions_failed.load(), 0u);
  EXPECT_EQ(MetricValue(p.serve->MetricsText(), "ferry_gateway_sessions_total"), 12.0) << p.serve->MetricsText();
  EXPECT_NE(p.fwd->StatusJson().find("\"role\":\"forward\""), std::string::npos);
}

TEST_F(GatewayTest, InsecureCompressedAndSmallTransfers) {
  EchoServer echo;
  for (Codec c : {Codec::kLz4, Codec::kZstd}) {
    auto p = MakePair(nullptr, echo.port(), 2, c);
    EXPECT_EQ(EchoTransfer(p.fwd->port(), 1, 1), "");
    EXPECT_EQ(EchoTransfer(p.fwd->port(), 0, 1), "");
    // Compressible data: zero-heavy.
    int fd = Dial(p.fwd->port());
    std::vector<uint8_t> data(4u << 20, 0);
    for (size_t i = 0; i < data.size(); i += 4096) data[i] = static_cast<uint8_t>(i >> 12);
    std::thread w([&] {
      for (size_t off = 0; off < data.size();) off += send(fd, data.data() + off, data.size() - off, 0);
      shutdown(fd, SHUT_WR);
    });
    std::vector<uint8_t> got, buf(1 << 16);
    for (ssize_t n; (n = recv(fd, buf.data(), buf.size(), 0)) > 0;) got.insert(got.end(), buf.begin(), buf.begin() + n);
    w.join();
    close(fd);
    EXPECT_EQ(got, data);
    EXPECT_GT(p.fwd->counters().chunks_compressed.load(), 0u);
  }
}

TEST_F(GatewayTest, LostDataConnectionIsRecoveredWithoutCorruption) {
  EchoServer echo;
  auto p = MakePair(pki_, echo.port(), 4);
  std::string err;
  std::atomic<bool> done{false};
  std::thread t([&] {
    err = EchoTransfer(p.fwd->port(), 48u << 20, 42);
    done = true;
  });
  // Each connection dies mid-transfer: after 8 and 24 of the 48 MiB came from the client (not
  // after a guessed sleep, which a fast machine may outlast), and the transfer still running.
  const auto wait_for_bytes = [&](uint64_t n) {
    for (int i = 0; i < 3000 && p.fwd->counters().bytes_from_local.load() < n && !done; i++) std::this_thread::sleep_for(1ms);
  };
  wait_for_bytes(8u << 20);
  p.fwd->KillOneDataConnectionForTest();
  const bool first_mid_transfer = !done;
  wait_for_bytes(24u << 20);
  p.serve->KillOneDataConnectionForTest();
  const bool second_mid_transfer = !done;
  t.join();
  EXPECT_TRUE(first_mid_transfer && second_mid_transfer) << "a kill came after the transfer had finished";
  EXPECT_EQ(err, "");
  EXPECT_GE(p.fwd->counters().data_conns_lost.load() + p.serve->counters().data_conns_lost.load(), 2u);
}

TEST_F(GatewayTest, KilledRemoteGatewayResetsClient) {
  EchoServer echo;
  auto bin = GatewayBinary();
  ASSERT_TRUE(fs::exists(bin)) << bin;
  const std::string port = std::to_string(FreeLoopbackPort());  // for the remote gateway
  auto files = pki_->Files("server");
  pid_t pid = fork();
  if (pid == 0) {
    execl(bin.c_str(), bin.c_str(), "serve", "--listen", ("127.0.0.1:" + port).c_str(), "--cert", files.cert.c_str(),
          "--key", files.key.c_str(), "--ca", files.ca.c_str(), "--log-level", "warn", nullptr);
    _exit(127);
  }
  GatewayOptions f;
  f.role = Role::kForward;
  f.listen = "127.0.0.1:0";
  f.via = "127.0.0.1:" + port;
  f.to = "127.0.0.1:" + std::to_string(echo.port());
  f.streams = 4;
  f.tls = pki_->Files("client");
  auto fwd = Gateway::Create(f);
  ASSERT_TRUE(fwd.has_value());
  // Wait for the child to listen: a full echo round trip proves it.
  std::string first = "x";
  for (int i = 0; i < 50 && (first = EchoTransfer((*fwd)->port(), 1000, 1)) != ""; i++) std::this_thread::sleep_for(100ms);
  ASSERT_EQ(first, "");
  int fd = Dial((*fwd)->port());
  std::vector<uint8_t> buf(1 << 16, 7);
  ASSERT_GT(send(fd, buf.data(), buf.size(), 0), 0);
  ASSERT_GT(recv(fd, buf.data(), buf.size(), 0), 0);
  kill(pid, SIGKILL);
  waitpid(pid, nullptr, 0);
  auto start = std::chrono::steady_clock::now();
  int err = 0;
  for (;;) {
    ssize_t n = recv(fd, buf.data(), buf.size(), 0);
    if (n < 0) {
      err = errno;
      break;
    }
    if (n == 0) break;
  }
  EXPECT_EQ(err, ECONNRESET) << "client must see a reset";
  EXPECT_LT(std::chrono::steady_clock::now() - start, 10s);
  close(fd);
}

TEST_F(GatewayTest, WrongClientCertificateRefused) {
  EchoServer echo;
  auto p = MakePair(pki_, echo.port(), 2, Codec::kNone, 64u << 20, pki_->Files("evil", "ca"));
  int fd = Dial(p.fwd->port());
  ASSERT_GE(fd, 0);
  uint8_t b[16] = {};
  send(fd, b, sizeof b, MSG_NOSIGNAL);
  const ReadOutcome r = FirstRead(fd);
  EXPECT_LT(r.n, 0);
  EXPECT_EQ(r.err, ECONNRESET) << strerror(r.err);
  EXPECT_LT(r.secs, 2.0) << "the refusal must come promptly, not as a receive timeout";
  close(fd);
  // The client's reset comes from the forward gateway, which may see the refusal before the
  // serve gateway's handshake thread has counted it.
  for (int i = 0; i < 200 && p.serve->counters().handshake_failures.load() == 0; i++) std::this_thread::sleep_for(10ms);
  EXPECT_GE(p.serve->counters().handshake_failures.load(), 1u);
  EXPECT_EQ(echo.received_.load(), 0u);
}

TEST_F(GatewayTest, MissingClientCertificateRefused) {
  EchoServer echo;
  auto p = MakePair(pki_, echo.port(), 1);
  SSL_CTX* ctx = SSL_CTX_new(TLS_client_method());
  SSL_CTX_load_verify_locations(ctx, pki_->Files("server").ca.c_str(), nullptr);
  int fd = Dial(p.serve->port());
  ASSERT_GE(fd, 0);
  SSL* ssl = SSL_new(ctx);
  SSL_set_fd(ssl, fd);
  const auto t0 = std::chrono::steady_clock::now();
  int hs = SSL_connect(ssl);  // TLS 1.3: the client learns of the refusal on its first read
  bool refused = hs != 1;
  int ssl_err = refused ? SSL_get_error(ssl, hs) : SSL_ERROR_NONE;
  if (!refused) {
    PayloadWriter w;
    w.U64(1).U16(1).U32(65536).Str("127.0.0.1:" + std::to_string(echo.port()));
    std::vector<uint8_t> frame;
    EncodeFrame(FrameType::kHello, 0, w.data(), &frame);
    SSL_write(ssl, frame.data(), static_cast<int>(frame.size()));
    uint8_t buf[64];
    const int n = SSL_read(ssl, buf, sizeof buf);
    refused = n <= 0;
    ssl_err = refused ? SSL_get_error(ssl, n) : SSL_ERROR_NONE;
  }
  const double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  EXPECT_TRUE(refused);
  // A refusal is the server's alert or a closed connection (SSL_ERROR_SSL / SSL_ERROR_ZERO_RETURN /
  // SSL_ERROR_SYSCALL), within a moment: the 20 s receive timeout of a silent server is no refusal.
  EXPECT_LT(secs, 2.0) << "SSL error " << ssl_err;
  EXPECT_NE(ssl_err, SSL_ERROR_WANT_READ) << "the server never answered";
  SSL_free(ssl);
  SSL_CTX_free(ctx);
  close(fd);
  EXPECT_EQ(echo.received_.load(), 0u);
  EXPECT_EQ(p.serve->counters().sessions_total.load(), 0u);
}

// A hand-made session on a serve gateway: HELLO (id, one stream, window in KiB, destination) on
// a new control connection, and the first frame of the reply (empty if connect or write failed).
struct HandMadeSession {
  std::unique_ptr<Conn> conn;
  decltype(std::declval<Conn&>().ReadFrameBlocking()) reply;
};
HandMadeSession SendHello(const std::string& via, const TlsContext& tls, uint64_t id, uint32_t window_kib, const std::string& dest) {
  HandMadeSession h;
  auto c = Conn::Connect(via, tls, 3000);
  if (!c) return h;
  h.conn = std::move(*c);
  PayloadWriter w;
  w.U64(id).U16(1).U32(window_kib).Str(dest);
  if (h.conn->WriteFrameBlocking(FrameType::kHello, w.data())) h.reply = h.conn->ReadFrameBlocking();
  return h;
}

// 70 peers that trickle a byte every 200 ms at a serve gateway: each TLS handshake ends at its
// whole deadline (not restarted by every byte), at most kMaxHandshakes (64) run at once (the
// oldest is ended to make room), and a real session still goes through meanwhile.
TEST_F(GatewayTest, TricklingHandshakesEndAtTheDeadlineAndMakeRoom) {
  EchoServer echo;
  GatewayOptions so;
  so.role = Role::kServe;
  so.listen = "127.0.0.1:0";
  so.tls = pki_->Files("server");
  so.connect_timeout_ms = 1500;
  auto serve = Gateway::Create(so);
  ASSERT_TRUE(serve.has_value()) << serve.error().ToString();
  // Each opens a valid TLS record header announcing a 16 KiB handshake record, then trickles
  // its body: OpenSSL waits for the whole record, so only the deadline (or eviction) ends it.
  std::vector<int> fds;
  for (int i = 0; i < 70; ++i) {
    const int fd = Dial((*serve)->port());
    ASSERT_GE(fd, 0);
    ASSERT_EQ(send(fd, "\x16\x03\x01\x40\x00", 5, MSG_NOSIGNAL), 5);
    fds.push_back(fd);
  }
  std::atomic<bool> stop{false};
  std::thread trickle([&] {
    while (!stop) {
      for (int fd : fds) (void)!send(fd, "\x01", 1, MSG_NOSIGNAL);
      std::this_thread::sleep_for(200ms);
    }
  });
  GatewayOptions f;
  f.role = Role::kForward;
  f.listen = "127.0.0.1:0";
  f.via = "127.0.0.1:" + std::to_string((*serve)->port());
  f.to = "127.0.0.1:" + std::to_string(echo.port());
  f.streams = 2;
  f.connect_timeout_ms = 3000;
  f.tls = pki_->Files("client");
  auto fwd = Gateway::Create(f);
  ASSERT_TRUE(fwd.has_value());
  EXPECT_EQ(EchoTransfer((*fwd)->port(), 1 << 20, 9), "") << "a real session while 70 peers trickle";
  // Every trickler is closed by the server within the 1.5 s deadline (plus slack), although it
  // keeps sending bytes.
  const auto t0 = std::chrono::steady_clock::now();
  size_t closed = 0;
  std::vector<bool> done(fds.size(), false);
  while (closed < fds.size() && std::chrono::steady_clock::now() - t0 < 6s) {
    for (size_t i = 0; i < fds.size(); ++i) {
      if (done[i]) continue;
      pollfd p{fds[i], POLLIN, 0};
      if (poll(&p, 1, 0) > 0) {
        uint8_t b[256];
        const ssize_t n = recv(fds[i], b, sizeof b, MSG_DONTWAIT);
        if (n == 0 || (n < 0 && errno != EAGAIN)) done[i] = true, ++closed;
      }
    }
    std::this_thread::sleep_for(20ms);
  }
  stop = true;
  trickle.join();
  for (int fd : fds) close(fd);
  EXPECT_EQ(closed, fds.size()) << "trickling handshakes still open after 6 s (deadline 1.5 s)";
  EXPECT_GE((*serve)->counters().handshakes_evicted.load(), 6u) << "70 handshakes, room for 64";
}

// Out of file descriptors (RLIMIT_NOFILE 32), a serve gateway's accept() fails with EMFILE while
// the connection stays queued: the accept loop must back off, not spin on poll() + accept().
TEST_F(GatewayTest, OutOfDescriptorsTheAcceptLoopBacksOff) {
  auto bin = GatewayBinary();
  ASSERT_TRUE(fs::exists(bin)) << bin;
  const uint16_t port = FreeLoopbackPort();
  pid_t pid = fork();
  if (pid == 0) {
    rlimit rl{32, 32};
    setrlimit(RLIMIT_NOFILE, &rl);
    execl(bin.c_str(), bin.c_str(), "serve", "--listen", ("127.0.0.1:" + std::to_string(port)).c_str(), "--insecure",
          "--log-level", "error", nullptr);
    _exit(127);
  }
  struct Reap {  // the child gateway goes whichever way the test ends (an ASSERT returns early)
    pid_t pid;
    ~Reap() {
      kill(pid, SIGKILL);
      waitpid(pid, nullptr, 0);
    }
  } reap{pid};
  std::vector<int> fds;
  for (int i = 0; i < 200 && fds.empty(); ++i) {
    const int fd = Dial(port);
    if (fd >= 0) fds.push_back(fd);
    else std::this_thread::sleep_for(20ms);
  }
  ASSERT_FALSE(fds.empty()) << "the gateway did not listen";
  for (int i = 0; i < 60; ++i) {
    const int fd = Dial(port);  // the kernel completes the connection; the gateway cannot accept it
    if (fd >= 0) fds.push_back(fd);
  }
  std::this_thread::sleep_for(500ms);
  auto cpu = [pid] {
    std::ifstream f("/proc/" + std::to_string(pid) + "/stat");
    std::string stat((std::istreambuf_iterator<char>(f)), std::istreambuf_iterator<char>());
    std::istringstream in(stat.substr(stat.rfind(')') + 2));
    std::string field;
    double ticks = 0;
    for (int i = 3; i <= 15 && in >> field; ++i)
      if (i == 14 || i == 15) ticks += std::stod(field);
    return ticks / static_cast<double>(sysconf(_SC_CLK_TCK));
  };
  const double c0 = cpu();
  std::this_thread::sleep_for(2s);
  const double used = cpu() - c0;
  for (int fd : fds) close(fd);
  EXPECT_LT(used, 0.3) << "CPU seconds in 2 s with connections it cannot accept: the accept loop spins";
}

// --allow-to: a serve gateway connects onward only to destinations its rules allow.
TEST_F(GatewayTest, AllowToRefusesOtherDestinations) {
  EchoServer echo;
  for (const bool allowed : {true, false}) {
    SCOPED_TRACE(allowed ? "allowed" : "not allowed");
    GatewayOptions so;
    so.role = Role::kServe;
    so.listen = "127.0.0.1:0";
    so.tls = pki_->Files("server");
    auto rule = ParseDestRule(allowed ? "127.0.0.0/8:" + std::to_string(echo.port()) : "10.0.0.0/8");
    ASSERT_TRUE(rule.has_value());
    so.allow_to = {*rule};
    auto serve = Gateway::Create(so);
    ASSERT_TRUE(serve.has_value());
    auto tls = TlsContext::Create(false, pki_->Files("client"));
    ASSERT_TRUE(tls.has_value());
    auto h = SendHello("127.0.0.1:" + std::to_string((*serve)->port()), **tls, 77, 1024,
                       "localhost:" + std::to_string(echo.port()));
    ASSERT_TRUE(h.reply.has_value()) << h.reply.error().ToString();
    if (allowed) {
      EXPECT_EQ(h.reply->type, FrameType::kHelloOk);
      EXPECT_EQ((*serve)->counters().destinations_refused.load(), 0u);
    } else {
      EXPECT_EQ(h.reply->type, FrameType::kError);
      const std::string msg(h.reply->payload.begin(), h.reply->payload.end());
      EXPECT_NE(msg.find("not allowed"), std::string::npos) << msg;
      EXPECT_EQ((*serve)->counters().destinations_refused.load(), 1u);
      EXPECT_EQ((*serve)->counters().sessions_total.load(), 0u);
    }
  }
}


TEST_F(GatewayTest, MalformedControlFramesCloseSessionOthersContinue) {
  EchoServer echo;
  auto p = MakePair(pki_, echo.port(), 2);
  auto tls = TlsContext::Create(false, pki_->Files("client"));
  ASSERT_TRUE(tls.has_value());
  std::string via = "127.0.0.1:" + std::to_string(p.serve->port());
  // A healthy session runs across the attacks.
  std::string healthy_err = "x";
  std::thread healthy([&] { healthy_err = EchoTransfer(p.fwd->port(), 16u << 20, 5); });
  // 1. Garbage instead of HELLO.
  {
    auto c = Conn::Connect(via, **tls, 3000);
    ASSERT_TRUE(c.has_value());
    std::string junk = "GET / HTTP/1.1\r\n\r\n";
    size_t n = 0;
    (*c)->Write(reinterpret_cast<const uint8_t*>(junk.data()), junk.size(), &n);
    EXPECT_FALSE((*c)->ReadFrameBlocking().has_value());
  }
  // 2. Valid session, then a frame with a bad CRC, then a well-formed frame of the wrong type.
  for (int variant = 0; variant < 3; variant++) {
    auto h = SendHello(via, **tls, 1000 + variant, 65536, "127.0.0.1:" + std::to_string(echo.port()));
    ASSERT_TRUE(h.conn);
    ASSERT_TRUE(h.reply.has_value());
    EXPECT_EQ(h.reply->type, FrameType::kHelloOk);
    auto& c = h.conn;
    std::vector<uint8_t> bad;
    PayloadWriter a;
    a.U64(0);
    if (variant == 0) {
      EncodeFrame(FrameType::kAck, 0, a.data(), &bad);
      bad.back() ^= 0x55;  // CRC
    } else if (variant == 1) {
      EncodeFrame(FrameType::kJoin, 0, a.data(), &bad);  // JOIN on control
    } else {
      a.U64(99);
      EncodeFrame(FrameType::kAck, 0, a.data(), &bad);  // ACK payload too long
    }
    size_t n = 0;
    c->Write(bad.data(), bad.size(), &n);
    bool got_error = false;
    for (;;) {
      auto f = c->ReadFrameBlocking();
      if (!f) break;
      if (f->type == FrameType::kError) got_error = true;
    }
    EXPECT_TRUE(got_error) << "variant " << variant;
  }
  healthy.join();
  EXPECT_EQ(healthy_err, "");
  EXPECT_GE(p.serve->counters().protocol_errors.load(), 4u);
  // And the gateway still serves new sessions.
  EXPECT_EQ(EchoTransfer(p.fwd->port(), 1u << 20, 9), "");
}

// A peer may not make the serving gateway buffer without bound: a HELLO asking for a 4 GiB window
// is refused, and a peer that pings without reading the replies loses its session (replies used to
// pile up).
TEST_F(GatewayTest, PeerChosenWindowAndUnreadPongsAreBounded) {
  EchoServer echo;
  auto p = MakePair(pki_, echo.port(), 2);
  auto tls = TlsContext::Create(false, pki_->Files("client"));
  ASSERT_TRUE(tls.has_value());
  std::string via = "127.0.0.1:" + std::to_string(p.serve->port());
  const std::string dest = "127.0.0.1:" + std::to_string(echo.port());
  {
    auto h = SendHello(via, **tls, 2000, 4u << 20, dest);  // 4 GiB, in KiB
    ASSERT_TRUE(h.conn);
    auto& f = h.reply;
    ASSERT_TRUE(f.has_value());
    EXPECT_EQ(f->type, FrameType::kError);
    const std::string msg(f->payload.begin(), f->payload.end());
    EXPECT_NE(msg.find("above this gateway's limit"), std::string::npos) << msg;
  }
  {
    auto h = SendHello(via, **tls, 2001, 65536, dest);
    ASSERT_TRUE(h.conn);
    ASSERT_TRUE(h.reply.has_value());
    ASSERT_EQ(h.reply->type, FrameType::kHelloOk);
    auto& c = h.conn;
    // PINGs in bulk, never reading the PONGs: far more replies than socket buffers hold.
    std::vector<uint8_t> pings;
    PayloadWriter t;
    t.U64(1);
    for (int i = 0; i < 4096; ++i) EncodeFrame(FrameType::kPing, 0, t.data(), &pings);
    const uint64_t errors_before = p.serve->counters().protocol_errors.load();
    bool cut = false;
    for (int round = 0; round < 2000 && !cut; ++round) {
      size_t off = 0;
      while (off < pings.size()) {
        size_t n = 0;
        const auto r = c->Write(pings.data() + off, pings.size() - off, &n);
        if (r == Conn::IoResult::kClosed || r == Conn::IoResult::kError) {
          cut = true;  // the gateway closed the session
          break;
        }
        if (n == 0) {
          if (p.serve->counters().protocol_errors.load() > errors_before) cut = true;
          if (cut) break;
          std::this_thread::sleep_for(std::chrono::milliseconds(1));
        }
        off += n;
      }
      if (p.serve->counters().protocol_errors.load() > errors_before) cut = true;
    }
    EXPECT_TRUE(cut) << "the gateway kept queueing PONGs";
    EXPECT_GT(p.serve->counters().protocol_errors.load(), errors_before);
  }
  // Other sessions are unaffected.
  EXPECT_EQ(EchoTransfer(p.fwd->port(), 1u << 20, 11), "");
}

uint64_t RssKiB() {
  std::ifstream f("/proc/self/status");
  std::string line;
  while (std::getline(f, line))
    if (line.rfind("VmRSS:", 0) == 0) return std::stoull(line.substr(6));
  return 0;
}

TEST_F(GatewayTest, SlowReaderMemoryBounded) {
  // The echo server starts reading only after 3 s; the client pushes as fast as it can.
  EchoServer echo(3000ms);
  const size_t window = 8u << 20;
  auto p = MakePair(pki_, echo.port(), 4, Codec::kNone, window);
  int fd = Dial(p.fwd->port());
  fcntl(fd, F_SETFL, O_NONBLOCK);
  uint64_t rss0 = RssKiB();
  std::vector<uint8_t> buf(1 << 20, 0xab);
  size_t sent = 0;
  auto start = std::chrono::steady_clock::now();
  while (std::chrono::steady_clock::now() - start < 2s) {
    ssize_t n = send(fd, buf.data(), buf.size(), MSG_NOSIGNAL);
    if (n > 0) sent += n; else std::this_thread::sleep_for(5ms);
  }
  uint64_t rss1 = RssKiB();
  // Without back-pressure 2 s on loopback would push several GiB.
  EXPECT_LT(sent, window * 2 + (48u << 20)) << "sent " << sent;
  EXPECT_LT(p.fwd->counters().bytes_from_local.load(), window * 2 + (16u << 20));
  EXPECT_LT(rss1 > rss0 ? rss1 - rss0 : 0, 200u * 1024) << "RSS grew too much";
  // Then everything arrives (and comes back) once the reader wakes up.
  shutdown(fd, SHUT_WR);
  size_t echoed = 0;
  auto deadline = std::chrono::steady_clock::now() + 30s;
  while (std::chrono::steady_clock::now() < deadline) {
    ssize_t n = recv(fd, buf.data(), buf.size(), 0);
    if (n == 0) break;
    if (n > 0) echoed += n; else if (errno == EAGAIN) std::this_thread::sleep_for(2ms); else break;
  }
  close(fd);
  EXPECT_EQ(echo.received_.load(), sent);
  EXPECT_EQ(echoed, sent);
}

TEST_F(GatewayTest, PacedTlsTransferKeepsSendBuffersSmall) {
  // Paced TLS connections nearly always have a write pending; the send buffer must still be
  // compacted (it once grew to 64 MiB per connection, each new byte on a fresh page).
  EchoServer echo;
  auto p = MakePair(pki_, echo.port(), 4, Codec::kNone, 64u << 20, {}, 400);
  EXPECT_EQ(EchoTransfer(p.fwd->port(), 96u << 20, 77), "");
  for (Gateway* g : {p.fwd.get(), p.serve.get()})
    EXPECT_LT(g->counters().conn_buffer_peak_bytes.load(), 4u << 20) << g->MetricsText();
  // Exported, and the figure the bound above checked (a gauge stuck at 0 would pass the bound).
  const auto peak = MetricValue(p.fwd->MetricsText(), "ferry_gateway_conn_buffer_peak_bytes");
  EXPECT_GT(peak.value_or(0), 0) << p.fwd->MetricsText();
  EXPECT_LT(peak.value_or(0), 4u << 20);
}

// Runs `argv` in network namespace `ns` as a child process; returns its pid.
pid_t SpawnIn(const std::string& ns, std::vector<std::string> argv) {
  argv.insert(argv.begin(), {"ip", "netns", "exec", ns});
  pid_t pid = fork();
  if (pid == 0) {
    std::vector<char*> a;
    for (auto& s : argv) a.push_back(s.data());
    a.push_back(nullptr);
    execvp(a[0], a.data());
    _exit(127);
  }
  return pid;
}

// Network namespaces and child processes a test created; all removed (processes stopped
// first) when it goes out of scope.
struct NetnsSandbox {
  std::vector<std::string> namespaces;
  std::vector<pid_t> pids;
  ~NetnsSandbox() {
    for (pid_t p : pids) {
      kill(p, SIGTERM);
      waitpid(p, nullptr, 0);
    }
    for (auto& n : namespaces) Sh("ip netns del " + n);
  }
};

TEST_F(GatewayTest, TransparentRedirectTunnelsToTheOriginalDestination) {
  if (geteuid() != 0) GTEST_SKIP() << "needs root (network namespaces, nftables)";
  ASSERT_EQ(0, Sh("command -v nft")) << "nft is missing: run scripts/setup";
  const std::string bin = GatewayBinary();
  ASSERT_TRUE(fs::exists(bin)) << bin;
  // Two sites joined by a veth pair: A (10.79.0.1, client + forward gateway), B (10.79.0.2,
  // serve gateway + the real destination on port 9000). In A, nftables redirects every
  // connection to port 9000 to the forward gateway on 127.0.0.1:7001.
  const std::string tag = std::to_string(getpid() % 100000);
  const std::string a = "fgt-a" + tag, b = "fgt-b" + tag;
  NetnsSandbox cleanup{{a, b}, {}};
  for (const std::string& cmd :
       {"ip netns add " + a, "ip netns add " + b, "ip link add fgta" + tag + " type veth peer name fgtb" + tag,
        "ip link set fgta" + tag + " netns " + a, "ip link set fgtb" + tag + " netns " + b,
        "ip -n " + a + " addr add 10.79.0.1/24 dev fgta" + tag, "ip -n " + b + " addr add 10.79.0.2/24 dev fgtb" + tag,
        "ip -n " + a + " link set fgta" + tag + " up", "ip -n " + b + " link set fgtb" + tag + " up",
        "ip -n " + a + " link set lo up", "ip -n " + b + " link set lo up",
        "ip netns exec " + a + " nft add table ip nat",
        "ip netns exec " + a + " nft 'add chain ip nat output { type nat hook output priority -100 ; }'",
        "ip netns exec " + a + " nft add rule ip nat output ip daddr 10.79.0.2 tcp dport 9000 redirect to :7001"})
    ASSERT_EQ(0, Sh(cmd)) << cmd;
  EchoServer echo(0ms, b, 9000);
  auto srv = pki_->Files("server"), cli = pki_->Files("client");
  cleanup.pids.push_back(SpawnIn(b, {bin, "serve", "--listen", "10.79.0.2:7000", "--cert", srv.cert, "--key", srv.key,
                                     "--ca", srv.ca, "--log-level", "warn"}));
  cleanup.pids.push_back(SpawnIn(a, {bin, "forward", "--listen", "127.0.0.1:7001", "--via", "10.79.0.2:7000",
                                     "--transparent", "--streams", "4", "--cert", cli.cert, "--key", cli.key, "--ca",
                                     cli.ca, "--log-level", "warn"}));
  // The client simply connects to the destination; the first attempts may find the gateways
  // still starting.
  std::string err = "not tried";
  for (int i = 0; i < 50 && err != ""; i++) {
    err = EchoTransferFd(Dial(9000, "10.79.0.2", a), 1000, 1);
    if (err != "") std::this_thread::sleep_for(100ms);
  }
  ASSERT_EQ(err, "");
  EXPECT_EQ(EchoTransferFd(Dial(9000, "10.79.0.2", a), 8u << 20, 21), "");
  // The destination saw the serve gateway (10.79.0.2), not the client (10.79.0.1): the
  // connection really went through the tunnel.
  EXPECT_EQ(echo.last_peer(), "10.79.0.2");
  // A connection made to the gateway directly has no original destination and there is no
  // --to fallback: refused (closed, no data), and the gateway keeps serving.
  int fd = Dial(7001, "127.0.0.1", a);
  ASSERT_GE(fd, 0);
  const ReadOutcome r = FirstRead(fd);
  EXPECT_TRUE(r.n == 0 || (r.n < 0 && r.err == ECONNRESET)) << "a direct connection must be refused: read " << r.n
                                                             << ", " << strerror(r.err);
  EXPECT_LT(r.secs, 2.0) << "refused at once, not after the receive timeout";
  close(fd);
  EXPECT_EQ(EchoTransferFd(Dial(9000, "10.79.0.2", a), 1u << 20, 22), "");
}

// GET `path` from a gateway's --metrics unix socket ("" on failure).
std::string MetricsGet(const std::string& sock, const std::string& path) {
  httplib::Client cli(sock);
  cli.set_address_family(AF_UNIX);
  cli.set_read_timeout(5, 0);
  auto r = cli.Get(path.c_str());
  return r && r->status == 200 ? r->body : "";
}

TEST_F(GatewayTest, StuckDataConnectionIsBypassed) {
  // One data connection stops getting anything through (nftables drops every packet it sends,
  // so its TCP sees no ACK and backs off for minutes). Without the bypass the transfer would
  // stall until TCP gave up; with it the chunks that connection holds are re-sent on the others.
  if (geteuid() != 0) GTEST_SKIP() << "needs root (network namespaces, nftables)";
  ASSERT_EQ(0, Sh("command -v nft")) << "nft is missing: run scripts/setup";
  const std::string bin = GatewayBinary();
  ASSERT_TRUE(fs::exists(bin)) << bin;
  const std::string n = "fgt-s" + std::to_string(getpid() % 100000);
  const std::string fwd_sock = pki_->dir.string() + "/fwd.sock";
  NetnsSandbox cleanup{{n}, {}};
  ASSERT_EQ(0, Sh("ip netns add " + n));
  ASSERT_EQ(0, Sh("ip -n " + n + " link set lo up"));
  ASSERT_EQ(0, Sh("ip netns exec " + n + " nft add table inet t"));
  ASSERT_EQ(0, Sh("ip netns exec " + n + " nft 'add chain inet t out { type filter hook output priority 0 ; }'"));
  // A one-way transfer into a sink that hashes what it gets (a two-way echo also works, but the
  // two directions then wait on each other and the test would measure that interplay too).
  int sink_fd = TcpSocketIn(n);
  ASSERT_GE(sink_fd, 0);
  {
    int one = 1;
    setsockopt(sink_fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    sockaddr_in sa{};
    sa.sin_family = AF_INET;
    sa.sin_port = htons(9000);
    ASSERT_EQ(0, bind(sink_fd, reinterpret_cast<sockaddr*>(&sa), sizeof sa));
    ASSERT_EQ(0, listen(sink_fd, 8));
  }
  std::atomic<uint64_t> sink_bytes{0};
  std::atomic<uint64_t> sink_hash{0};
  std::thread sink([&] {
    for (;;) {  // the first (small) connection only checks the path
      int c = accept(sink_fd, nullptr, nullptr);
      if (c < 0) return;
      std::vector<uint8_t> buf(1 << 16);
      uint64_t h = 1469598103934665603ull, total = 0;
      for (;;) {
        ssize_t r = recv(c, buf.data(), buf.size(), 0);
        if (r <= 0) break;
        for (ssize_t i = 0; i < r; i++) h = (h ^ buf[i]) * 1099511628211ull;
        total += r;
      }
      close(c);
      if (total > (1u << 20)) {
        sink_bytes = total;
        sink_hash = h;
        return;
      }
    }
  });
  auto srv = pki_->Files("server"), cli = pki_->Files("client");
  // Paced (about 30 MB/s in all) so the transfer is still running when the rule goes in.
  cleanup.pids.push_back(SpawnIn(n, {bin, "serve", "--listen", "127.0.0.1:7000", "--cert", srv.cert, "--key", srv.key,
                                     "--ca", srv.ca, "--log-level", "warn", "--max-rate-mbit", "200"}));
  cleanup.pids.push_back(SpawnIn(n, {bin, "forward", "--listen", "127.0.0.1:7001", "--via", "127.0.0.1:7000", "--to",
                                     "127.0.0.1:9000", "--streams", "4", "--cert", cli.cert, "--key", cli.key, "--ca",
                                     cli.ca, "--log-level", "info", "--max-rate-mbit", "200", "--metrics",
                                     "unix:" + fwd_sock}));
  int probe = -1;
  for (int i = 0; i < 50 && probe < 0; i++) {
    probe = Dial(7001, "127.0.0.1", n);
    char x = 1;
    if (probe >= 0 && send(probe, &x, 1, MSG_NOSIGNAL) == 1) {
      shutdown(probe, SHUT_WR);
      recv(probe, &x, 1, 0);  // EOF once the session has ended
    } else if (probe >= 0) {
      close(probe);
      probe = -1;
    }
    if (probe < 0) std::this_thread::sleep_for(100ms);
  }
  ASSERT_GE(probe, 0);
  close(probe);
  const size_t size = 96u << 20;
  std::vector<uint8_t> data(size);
  std::mt19937 rng(31);
  for (auto& b : data) b = static_cast<uint8_t>(rng());
  uint64_t want = 1469598103934665603ull;
  for (uint8_t b : data) want = (want ^ b) * 1099511628211ull;
  std::string result = "running";
  std::thread transfer([&] {
    int fd = Dial(7001, "127.0.0.1", n);
    if (fd < 0) {
      result = "connect failed";
      return;
    }
    for (size_t off = 0; off < size;) {
      ssize_t w = send(fd, data.data() + off, std::min<size_t>(size - off, 1 << 20), MSG_NOSIGNAL);
      if (w <= 0) {
        result = std::string("send: ") + strerror(errno);
        close(fd);
        return;
      }
      off += w;
    }
    shutdown(fd, SHUT_WR);
    char x;
    result = recv(fd, &x, 1, 0) == 0 ? "" : std::string("no clean EOF: ") + strerror(errno);
    close(fd);
  });
  // Wait for the big session's data connections, then black-hole the first one.
  int port = 0;
  for (int i = 0; i < 100 && port == 0; i++) {
    auto st = nlohmann::json::parse(MetricsGet(fwd_sock, "/status"), nullptr, false);
    if (st.is_object() && st["sessions"].is_array())
      for (auto& sess : st["sessions"])
        if (sess["detail"]["conns"].is_array() && sess["detail"]["conns"].size() == 4 && sess["bytes_sent"].get<uint64_t>() > (4u << 20))
          port = sess["detail"]["conns"][0]["local_port"].get<int>();
    if (port == 0) std::this_thread::sleep_for(50ms);
  }
  EXPECT_NE(port, 0) << "no running session seen in /status";
  {
    // /status names sessions by seq, never by id (the id is what a JOIN presents).
    auto st = nlohmann::json::parse(MetricsGet(fwd_sock, "/status"), nullptr, false);
    ASSERT_TRUE(st.is_object());
    for (auto& sess : st["sessions"]) {
      EXPECT_FALSE(sess.contains("id")) << sess.dump();
      EXPECT_GE(sess.value("seq", 0), 1) << sess.dump();
    }
  }
  if (port != 0) {
    EXPECT_EQ(0, Sh("ip netns exec " + n + " nft add rule inet t out tcp sport " + std::to_string(port) + " drop"));
  }
  transfer.join();
  EXPECT_EQ(result, "") << MetricsGet(fwd_sock, "/status");
  shutdown(sink_fd, SHUT_RDWR);
  close(sink_fd);
  sink.join();
  EXPECT_EQ(sink_bytes.load(), size);
  EXPECT_EQ(sink_hash.load(), want) << "the sink got different bytes";
  std::string metrics = MetricsGet(fwd_sock, "/metrics");
  // The stall was detected and chunks went around it: both counters present and above zero.
  EXPECT_GE(MetricValue(metrics, "ferry_gateway_conn_stalls_total").value_or(-1), 1) << metrics;
  EXPECT_GE(MetricValue(metrics, "ferry_gateway_chunks_bypassed_total").value_or(-1), 1) << metrics;
}

// Out of threads (a pids cgroup at its limit: root is not exempt, unlike RLIMIT_NPROC), a serve
// gateway cannot start a connection's thread. It must drop that connection, count it and keep
// serving - not terminate on the std::system_error - and serve again once threads are available.
TEST_F(GatewayTest, OutOfThreadsDropsTheConnectionAndKeepsServing) {
  if (geteuid() != 0) GTEST_SKIP() << "needs root (a pids cgroup)";
  // cgroup v1 (a pids hierarchy) or v2 (the unified hierarchy with the pids controller).
  fs::path root = "/sys/fs/cgroup/pids";
  if (!fs::exists(root / "cgroup.procs")) {
    std::ifstream c("/sys/fs/cgroup/cgroup.controllers");
    std::string controllers((std::istreambuf_iterator<char>(c)), std::istreambuf_iterator<char>());
    if (controllers.find("pids") == std::string::npos) GTEST_SKIP() << "no pids cgroup controller";
    root = "/sys/fs/cgroup";
  }
  const fs::path cg = root / ("ferry-gw-test-" + std::to_string(getpid()));
  ASSERT_TRUE(fs::create_directory(cg)) << cg;
  auto write = [](const fs::path& f, const std::string& v) {
    std::ofstream o(f);
    o << v;
    o.flush();
    return o.good();
  };
  auto read = [](const fs::path& f) {
    std::ifstream i(f);
    std::string v;
    i >> v;
    return v;
  };
  auto bin = GatewayBinary();
  ASSERT_TRUE(fs::exists(bin)) << bin;
  const uint16_t port = FreeLoopbackPort();
  const std::string metrics_sock = "/tmp/ferry-gw-threads-" + std::to_string(getpid()) + ".sock";
  pid_t pid = fork();
  if (pid == 0) {
    std::ofstream(cg / "cgroup.procs") << getpid() << std::flush;
    execl(bin.c_str(), bin.c_str(), "serve", "--listen", ("127.0.0.1:" + std::to_string(port)).c_str(), "--insecure",
          "--metrics", ("unix:" + metrics_sock).c_str(), "--log-level", "error", nullptr);
    _exit(127);
  }
  struct Cleanup {  // the child gateway and the cgroup go whichever way the test ends
    pid_t pid;
    fs::path cg, sock;
    ~Cleanup() {
      kill(pid, SIGKILL);
      waitpid(pid, nullptr, 0);
      std::error_code ec;
      fs::remove(cg, ec);  // rmdir of an empty cgroup
      fs::remove(sock, ec);
    }
  } cleanup{pid, cg, metrics_sock};
  auto spawn_failures = [&] {  // -1: no metrics (yet)
    return MetricValue(MetricsGet(metrics_sock, "/metrics"), "ferry_gateway_spawn_failures_total").value_or(-1);
  };
  for (int i = 0; i < 200 && spawn_failures() < 0; ++i) std::this_thread::sleep_for(20ms);
  ASSERT_EQ(spawn_failures(), 0) << "the gateway's metrics did not come up";
  const int probe = Dial(port);  // listening, and one connection served with threads to spare
  ASSERT_GE(probe, 0);
  close(probe);
  std::this_thread::sleep_for(200ms);

  // No thread more than the gateway has now.
  ASSERT_TRUE(write(cg / "pids.max", read(cg / "pids.current"))) << "cannot set pids.max";
  for (int i = 0; i < 5; ++i) {
    const int fd = Dial(port);
    ASSERT_GE(fd, 0) << "the gateway stopped listening";
    pollfd p{fd, POLLIN, 0};
    const auto t0 = std::chrono::steady_clock::now();
    ASSERT_EQ(poll(&p, 1, 3000), 1) << "connection " << i << " neither served nor dropped in 3 s";
    char c;
    EXPECT_LE(recv(fd, &c, 1, 0), 0) << "a dropped connection is closed, not answered";
    EXPECT_LT(std::chrono::steady_clock::now() - t0, 2s);
    close(fd);
  }
  int wstatus = 0;
  ASSERT_EQ(waitpid(pid, &wstatus, WNOHANG), 0) << "the gateway died out of threads (status " << wstatus << ")";
  EXPECT_GE(spawn_failures(), 5);

  // Threads again: a new connection gets its handshake thread (it waits for the peer's first
  // frame instead of being closed at once), and nothing more is dropped.
  ASSERT_TRUE(write(cg / "pids.max", "max"));
  const double dropped = spawn_failures();
  const int fd = Dial(port);
  ASSERT_GE(fd, 0);
  pollfd p{fd, POLLIN, 0};
  EXPECT_EQ(poll(&p, 1, 500), 0) << "with threads available the connection must be served, not dropped";
  close(fd);
  EXPECT_EQ(spawn_failures(), dropped);
  EXPECT_EQ(waitpid(pid, &wstatus, WNOHANG), 0);
}

TEST(GatewayOptionsTest, BadOptionsAreErrors) {
  GatewayOptions o;
  o.role = Role::kForward;
  o.listen = "127.0.0.1:0";
  o.via = "nope";
  o.to = "127.0.0.1:1";
  o.insecure = true;
  EXPECT_FALSE(Gateway::Create(o).has_value());
  o.via = "127.0.0.1:1";
  o.streams = 0;
  EXPECT_FALSE(Gateway::Create(o).has_value());
  o.streams = 2;
  o.insecure = false;
  o.tls = {"/nonexistent.crt", "/nonexistent.key", "/nonexistent.ca"};
  EXPECT_FALSE(Gateway::Create(o).has_value());
  EXPECT_FALSE(ParseCodec("gzip").has_value());
  // forward needs --to unless --transparent; --to/--via/--transparent are forward-only.
  GatewayOptions f;
  f.role = Role::kForward;
  f.listen = "127.0.0.1:0";
  f.via = "127.0.0.1:1";
  f.insecure = true;
  EXPECT_FALSE(Gateway::Create(f).has_value());
  f.transparent = true;
  EXPECT_TRUE(Gateway::Create(f).has_value());
  GatewayOptions s;
  s.listen = "127.0.0.1:0";
  s.insecure = true;
  s.transparent = true;
  EXPECT_FALSE(Gateway::Create(s).has_value());
}

}  // namespace
}  // namespace ferry::gateway
