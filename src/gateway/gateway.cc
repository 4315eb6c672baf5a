#include "gateway/gateway.h"

#include <arpa/inet.h>
#include <fcntl.h>
#include <httplib.h>
#include <netdb.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <spdlog/spdlog.h>
#include <sys/eventfd.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <cstring>
#include <random>

#include "gateway/session.h"

namespace ferry::gateway {
namespace {
constexpr uint32_t kMaxPeerWindowKiB = 1u << 20;  // 1 GiB
}  // namespace

Result<Codec> ParseCodec(const std::string& s) { return ParseCompression(s); }

struct Gateway::Metrics {
  httplib::Server server;
  std::thread thread;
};

Result<std::unique_ptr<Gateway>> Gateway::Create(GatewayOptions opts) {
  if (opts.listen.empty()) return Errorf(ErrorCode::kInvalidArgument, "--listen is required");
  if (opts.role == Role::kForward) {
    if (opts.via.empty() || (opts.to.empty() && !opts.transparent))
      return Errorf(ErrorCode::kInvalidArgument, "forward needs --via and --to (or --transparent)");
    if (opts.streams < 1 || opts.streams > 64)
      return Errorf(ErrorCode::kInvalidArgument, "--streams must be 1..64, got {}", opts.streams);
    FERRY_RETURN_IF_ERROR(SplitHostPort(opts.via), "--via");
    if (!opts.to.empty()) FERRY_RETURN_IF_ERROR(SplitHostPort(opts.to), "--to");
  } else if (opts.transparent || !opts.to.empty() || !opts.via.empty()) {
    return Errorf(ErrorCode::kInvalidArgument, "--to, --via and --transparent are forward options");
  }
  if (opts.chunk < 4096 || opts.chunk > (1u << 20))
    return Errorf(ErrorCode::kInvalidArgument, "chunk size must be 4 KiB..1 MiB");
  if (opts.window < 2 * opts.chunk || opts.window > (1ull << 32))
    return Errorf(ErrorCode::kInvalidArgument, "window must be >= 2 chunks and <= 4 GiB");
  std::unique_ptr<Gateway> gw(new Gateway(std::move(opts)));
  FERRY_RETURN_IF_ERROR(gw->Start(), "start gateway");
  return gw;
}

Status Gateway::Start() {
  if (opts_.insecure) {
    tls_ = TlsContext::Insecure();
  } else {
    if (opts_.tls.cert.empty() || opts_.tls.key.empty() || opts_.tls.ca.empty())
      return Errorf(ErrorCode::kInvalidArgument, "TLS needs --cert, --key and --ca (or --insecure)");
    auto t = TlsContext::Create(opts_.role == Role::kServe, opts_.tls);
    if (!t) return std::unexpected(t.error());
    tls_ = *t;
  }
  auto fd = ListenTcp(opts_.listen);
  if (!fd) return std::unexpected(fd.error());
  listen_fd_ = *fd;
  sockaddr_storage ss{};
  socklen_t len = sizeof ss;
  getsockname(listen_fd_, reinterpret_cast<sockaddr*>(&ss), &len);
  port_ = ntohs(ss.ss_family == AF_INET6 ? reinterpret_cast<sockaddr_in6*>(&ss)->sin6_port
                                          : reinterpret_cast<sockaddr_in*>(&ss)->sin_port);
  wake_fd_ = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
  if (!opts_.metrics.empty()) {
    metrics_ = std::make_unique<Metrics>();
    metrics_->server.Get("/metrics", [this](const httplib::Request&, httplib::Response& res) {
      res.set_content(MetricsText(), "text/plain; version=0.0.4");
    });
    metrics_->server.Get("/status", [this](const httplib::Request&, httplib::Response& res) {
      res.set_content(StatusJson(), "application/json");
    });
    bool ok;
    if (opts_.metrics.rfind("unix:", 0) == 0) {
      std::string path = opts_.metrics.substr(5);
      unlink(path.c_str());
      metrics_->server.set_address_family(AF_UNIX);
      ok = metrics_->server.bind_to_port(path, 80);
    } else {
      auto hp = SplitHostPort(opts_.metrics);
      if (!hp) return std::unexpected(hp.error().WithContext("--metrics"));
      ok = metrics_->server.bind_to_port(hp->first, hp->second);
    }
    if (!ok) return Errorf(ErrorCode::kIo, "cannot bind metrics address {}", opts_.metrics);
    metrics_->thread = std::thread([m = metrics_.get()] { m->server.listen_after_bind(); });
  }
  accept_thread_ = std::thread([this] { AcceptLoop(); });
  spdlog::info("gateway {} listening on {} (port {}){}", opts_.role == Role::kServe ? "serve" : "forward",
               opts_.listen, port_, opts_.insecure ? " INSECURE" : "");
  if (opts_.role == Role::kServe && opts_.allow_to.empty())
    spdlog::warn("gateway serve: no --allow-to: an authenticated peer may ask for a connection to any destination this host reaches");
  return {};
}

Gateway::Gateway(GatewayOptions opts) : opts_(std::move(opts)) {}
Gateway::~Gateway() { Stop(); }

void Gateway::Stop() {
  if (stopping_.exchange(true)) return;
  uint64_t one = 1;
  [[maybe_unused]] auto r = write(wake_fd_, &one, sizeof one);
  if (accept_thread_.joinable()) accept_thread_.join();
  {
    MutexLock lk(mu_);
    for (auto& s : sessions_) s->Wake();
  }
  for (;;) {
    std::vector<Worker> ws;
    {
      MutexLock lk(mu_);
      ws.swap(workers_);
    }
    if (ws.empty()) break;
    for (auto& w : ws) w.t.join();
  }
  if (metrics_) {
    metrics_->server.stop();
    if (metrics_->thread.joinable()) metrics_->thread.join();
  }
  if (listen_fd_ >= 0) close(listen_fd_);
  if (wake_fd_ >= 0) close(wake_fd_);
  listen_fd_ = wake_fd_ = -1;
}

bool Gateway::Spawn(std::function<void()> fn) {
  MutexLock lk(mu_);
  // Reap finished workers.
  for (size_t i = 0; i < workers_.size();) {
    if (workers_[i].done->load()) {
      workers_[i].t.join();
      workers_.erase(workers_.begin() + i);
    } else {
      i++;
    }
  }
  auto done = std::make_shared<std::atomic<bool>>(false);
  try {
    workers_.push_back(Worker{std::thread([fn = std::move(fn), done] {
                                fn();
                                done->store(true);
                              }),
                              done});
  } catch (const std::system_error& e) {  // out of threads (or memory): drop this connection, keep serving
    counters_.spawn_failures++;
    spdlog::warn("gateway: cannot start a thread for a new connection ({}); dropped it", e.what());
    return false;
  }
  return true;
}

void Gateway::AcceptLoop() {
  while (!stopping_) {
    pollfd p[2] = {{listen_fd_, POLLIN, 0}, {wake_fd_, POLLIN, 0}};
    if (poll(p, 2, 1000) < 0) continue;
    if (stopping_) break;
    if (!(p[0].revents & POLLIN)) continue;
    int fd = accept4(listen_fd_, nullptr, nullptr, SOCK_CLOEXEC);
    if (fd < 0) {
      if (errno == EINTR || errno == EAGAIN || errno == ECONNABORTED) continue;
      // EMFILE/ENFILE/ENOBUFS/ENOMEM: the connection stays queued and poll() says readable at once -
      // without a pause this loop would spin. Back off; sessions closing free descriptors.
      if (counters_.accept_errors++ % 100 == 0) spdlog::warn("gateway: accept: {} (backing off)", strerror(errno));
      pollfd w{wake_fd_, POLLIN, 0};
      poll(&w, 1, 100);
      continue;
    }
    bool spawned;
    if (opts_.role == Role::kServe) {
      // The TLS handshake runs on the connection's thread under one deadline; at most
      // kMaxHandshakes at once - a new connection beyond that ends the oldest handshake, so silent
      // or trickling peers can delay a real one by one handshake at most, never lock it out.
      auto evict = std::make_shared<std::atomic<bool>>(false);
      {
        MutexLock lk(mu_);
        std::erase_if(handshakes_, [](const auto& h) { return h.expired(); });
        if (handshakes_.size() >= kMaxHandshakes) {
          if (auto oldest = handshakes_.front().lock()) oldest->store(true);
          handshakes_.erase(handshakes_.begin());
          counters_.handshakes_evicted++;
        }
        handshakes_.push_back(evict);
      }
      spawned = Spawn([this, fd, evict] { HandleIncoming(fd, *evict); });
    } else {
      spawned = Spawn([this, fd] { HandleLocal(fd); });
    }
    if (!spawned) {
      close(fd);
      pollfd w{wake_fd_, POLLIN, 0};
      poll(&w, 1, 100);
    }
  }
}

void Gateway::RegisterSession(const std::shared_ptr<Session>& s) {
  MutexLock lk(mu_);
  sessions_.push_back(s);
  s->seq = ++counters_.sessions_total;
  counters_.sessions_active++;
}

void Gateway::UnregisterSession(uint64_t id) {
  MutexLock lk(mu_);
  for (size_t i = 0; i < sessions_.size(); i++) {
    if (sessions_[i]->id() == id) {
      sessions_.erase(sessions_.begin() + i);
      counters_.sessions_active--;
      return;
    }
  }
}

std::shared_ptr<Session> Gateway::FindSession(uint64_t id) {
  MutexLock lk(mu_);
  for (auto& s : sessions_)
    if (s->id() == id) return s;
  return nullptr;
}

Result<std::string> Gateway::AllowedDestination(const std::string& dest) const {
  auto hp = SplitHostPort(dest);
  if (!hp) return std::unexpected(hp.error());
  addrinfo hints{};
  hints.ai_socktype = SOCK_STREAM;
  addrinfo* res = nullptr;
  const std::string port = std::to_string(hp->second);
  if (int rc = getaddrinfo(hp->first.c_str(), port.c_str(), &hints, &res); rc != 0)
    return Errorf(ErrorCode::kInvalidArgument, "destination {}: {}", dest, gai_strerror(rc));
  std::string out;
  for (addrinfo* ai = res; ai && out.empty(); ai = ai->ai_next) {
    sockaddr_storage ss{};
    std::memcpy(&ss, ai->ai_addr, std::min<size_t>(ai->ai_addrlen, sizeof ss));
    if (!Allowed(opts_.allow_to, ss)) continue;
    char host[INET6_ADDRSTRLEN] = "";
    if (ss.ss_family == AF_INET) inet_ntop(AF_INET, &reinterpret_cast<sockaddr_in*>(&ss)->sin_addr, host, sizeof host);
    else inet_ntop(AF_INET6, &reinterpret_cast<sockaddr_in6*>(&ss)->sin6_addr, host, sizeof host);
    out = ss.ss_family == AF_INET6 ? fmt::format("[{}]:{}", host, hp->second) : fmt::format("{}:{}", host, hp->second);
  }
  freeaddrinfo(res);
  if (out.empty())
    return Errorf(ErrorCode::kPermissionDenied, "destination {} is not allowed by this gateway (--allow-to)", dest);
  return out;
}

void Gateway::HandleIncoming(int fd, const std::atomic<bool>& evict) {
  auto conn = Conn::Accept(fd, *tls_, opts_.connect_timeout_ms, &evict);
  {
    MutexLock lk(mu_);  // no longer a handshake in progress (success or not)
    std::erase_if(handshakes_, [&](const auto& h) {
      auto p = h.lock();
      return !p || p.get() == &evict;
    });
  }
  if (!conn) {
    counters_.handshake_failures++;
    spdlog::warn("refused gateway connection: {}", conn.error().ToString());
    return;
  }
  auto first = (*conn)->ReadFrameBlocking();
  if (!first) {
    counters_.protocol_errors++;
    spdlog::warn("bad first frame: {}", first.error().ToString());
    return;
  }
  PayloadReader r(first->payload);
  if (first->type == FrameType::kJoin) {
    auto id = r.U64();
    auto idx = r.U16();
    if (!id || !idx || !r.ExpectEnd()) {
      counters_.protocol_errors++;
      return;
    }
    auto s = FindSession(*id);
    if (!s) {
      spdlog::warn("JOIN for unknown session {:016x}", *id);
      return;
    }
    s->AddDataConn(std::move(*conn), *idx);
    return;
  }
  auto send_error = [&](const std::string& msg) {
    PayloadWriter w;
    w.U32(2).Str(msg);
    (void)(*conn)->WriteFrameBlocking(FrameType::kError, w.data());
  };
  if (first->type != FrameType::kHello) {
    counters_.protocol_errors++;
    send_error(fmt::format("expected HELLO or JOIN, got {}", FrameTypeName(first->type)));
    return;
  }
  auto id = r.U64();
  auto streams = r.U16();
  auto window = r.U32();
  auto dest = r.Str();
  if (!id || !streams || !window || !dest || !r.ExpectEnd() || *streams == 0 || *streams > 64 || *window < 64) {
    counters_.protocol_errors++;
    send_error("malformed HELLO");
    return;
  }
  // The window is what this gateway buffers per direction for the session: the peer may not
  // choose more than kMaxPeerWindowKiB (it could ask for 4 GiB per session).
  if (*window > kMaxPeerWindowKiB) {
    counters_.protocol_errors++;
    send_error(fmt::format("window of {} MiB is above this gateway's limit of {} MiB", *window >> 10, kMaxPeerWindowKiB >> 10));
    return;
  }
  if (FindSession(*id)) {
    send_error("session id in use");
    return;
  }
  std::string target = *dest;
  if (!opts_.allow_to.empty()) {
    auto checked = AllowedDestination(*dest);
    if (!checked) {
      counters_.destinations_refused++;
      spdlog::warn("session {:016x}: {}", *id, checked.error().message());
      send_error(checked.error().message());
      return;
    }
    target = *checked;
  }
  auto dfd = ConnectTcp(target, opts_.connect_timeout_ms);
  if (!dfd) {
    spdlog::warn("session {:016x}: destination {}: {}", *id, *dest, dfd.error().ToString());
    send_error(dfd.error().ToString());
    return;
  }
  int fl = fcntl(*dfd, F_GETFL);
  fcntl(*dfd, F_SETFL, fl | O_NONBLOCK);
  // Register before HELLO_OK so that JOINs, which follow it, find the session.
  Conn* ctrl = conn->get();
  size_t win = std::max<size_t>(size_t(*window) << 10, opts_.window);
  auto s = std::make_shared<Session>(this, *id, *dfd, std::move(*conn), win, *streams);
  RegisterSession(s);
  PayloadWriter ok;
  ok.U64(*id);
  if (!ctrl->WriteFrameBlocking(FrameType::kHelloOk, ok.data())) {
    UnregisterSession(*id);
    return;
  }
  spdlog::info("session {:016x} (seq {} in /status): {} data streams to {}", *id, s->seq, *streams, *dest);
  s->Run();
  UnregisterSession(*id);
}

void Gateway::HandleLocal(int fd) {
  std::random_device rd;
  uint64_t id = (uint64_t(rd()) << 32) | rd();
  auto reset = [fd] {
    linger lg{1, 0};
    setsockopt(fd, SOL_SOCKET, SO_LINGER, &lg, sizeof lg);
    close(fd);
  };
  std::string dest = opts_.to;
  if (opts_.transparent) {
    auto orig = OriginalDestination(fd);
    if (orig) {
      dest = *orig;
    } else if (dest.empty()) {
      counters_.sessions_failed++;
      spdlog::warn("session {:016x} refused: {} (and no --to fallback)", id, orig.error().message());
      return reset();
    }
  }
  auto ctrl = Conn::Connect(opts_.via, *tls_, opts_.connect_timeout_ms);
  if (!ctrl) {
    counters_.sessions_failed++;
    spdlog::warn("connect to gateway {}: {}", opts_.via, ctrl.error().ToString());
    return reset();
  }
  PayloadWriter w;
  w.U64(id).U16(static_cast<uint16_t>(opts_.streams)).U32(static_cast<uint32_t>(opts_.window >> 10)).Str(dest);
  if (auto s = (*ctrl)->WriteFrameBlocking(FrameType::kHello, w.data()); !s) return reset();
  auto reply = (*ctrl)->ReadFrameBlocking();
  if (!reply || reply->type != FrameType::kHelloOk) {
    counters_.sessions_failed++;
    std::string why = !reply ? reply.error().ToString() : std::string(FrameTypeName(reply->type));
    if (reply && reply->type == FrameType::kError) {
      PayloadReader er(reply->payload);
      (void)er.U32();
      if (auto m = er.Str()) why = *m;
    }
    spdlog::warn("session {:016x} refused by remote gateway: {}", id, why);
    return reset();
  }
  int fl = fcntl(fd, F_GETFL);
  fcntl(fd, F_SETFL, fl | O_NONBLOCK);
  int one = 1;
  setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
  auto s = std::make_shared<Session>(this, id, fd, std::move(*ctrl), opts_.window, opts_.streams);
  RegisterSession(s);
  s->Run();
  UnregisterSession(id);
}

std::string Gateway::MetricsText() const {
  const auto& c = counters_;
  std::string out;
  auto m = [&](const char* name, const char* type, const char* help, uint64_t v) {
    out += fmt::format("# HELP ferry_gateway_{0} {1}\n# TYPE ferry_gateway_{0} {2}\nferry_gateway_{0} {3}\n", name,
                       help, type, v);
  };
  m("sessions_total", "counter", "Sessions started", c.sessions_total);
  m("sessions_active", "gauge", "Sessions in progress", c.sessions_active);
  m("sessions_failed_total", "counter", "Sessions that ended with an error", c.sessions_failed);
  m("local_received_bytes_total", "counter", "Bytes read from local TCP connections", c.bytes_from_local);
  m("local_sent_bytes_total", "counter", "Bytes written to local TCP connections", c.bytes_to_local);
  m("wire_sent_bytes_total", "counter", "Bytes sent to the peer gateway (frames, before TLS)", c.wire_bytes_sent);
  m("wire_received_bytes_total", "counter", "Bytes received from the peer gateway", c.wire_bytes_received);
  m("chunks_sent_total", "counter", "Data chunks sent", c.chunks_sent);
  m("chunks_retransmitted_total", "counter", "Chunks re-sent after a data connection was lost",
    c.chunks_retransmitted);
  m("chunks_duplicate_total", "counter", "Duplicate chunks dropped", c.chunks_duplicate);
  m("conn_stalls_total", "counter", "Data connections found stuck (no TCP ACK while holding the oldest chunk)",
    c.conn_stalls);
  m("chunks_bypassed_total", "counter", "Chunks re-sent on other connections around a stuck one", c.chunks_bypassed);
  m("chunks_compressed_total", "counter", "Chunks sent compressed", c.chunks_compressed);
  m("compression_saved_bytes_total", "counter", "Bytes saved by compression", c.compressed_saved_bytes);
  m("data_streams", "gauge", "Open data connections", c.data_conns_active);
  m("data_streams_lost_total", "counter", "Data connections lost", c.data_conns_lost);
  m("protocol_errors_total", "counter", "Malformed or unexpected frames", c.protocol_errors);
  m("handshake_failures_total", "counter", "TLS handshakes refused", c.handshake_failures);
  m("handshakes_evicted_total", "counter", "TLS handshakes ended early to make room for newer connections", c.handshakes_evicted);
  m("destinations_refused_total", "counter", "Sessions refused: destination not allowed by --allow-to", c.destinations_refused);
  m("accept_errors_total", "counter", "accept() failures (e.g. out of file descriptors; the gateway backs off)", c.accept_errors);
  m("spawn_failures_total", "counter", "Connections dropped because no thread could be created", c.spawn_failures);
  m("rtt_microseconds", "gauge", "Last control-channel round trip time", c.rtt_us);
  m("conn_buffer_peak_bytes", "gauge", "Largest data-connection send buffer held so far", c.conn_buffer_peak_bytes);
  return out;
}

std::string Gateway::StatusJson() const {
  const auto& c = counters_;
  std::string sessions;
  {
    MutexLock lk(mu_);
    for (auto& s : sessions_) {
      if (!sessions.empty()) sessions += ",";
      sessions += s->StatusJsonFields();
    }
  }
  return fmt::format(
      R"({{"role":"{}","listen":"{}","port":{},"tls":{},"sessions_active":{},"sessions_total":{},)"
      R"("sessions_failed":{},"local_received_bytes":{},"local_sent_bytes":{},"chunks_retransmitted":{},)"
      R"("data_streams":{},"rtt_us":{},"sessions":[{}]}})",
      opts_.role == Role::kServe ? "serve" : "forward", opts_.listen, port_, !opts_.insecure,
      c.sessions_active.load(), c.sessions_total.load(), c.sessions_failed.load(), c.bytes_from_local.load(),
      c.bytes_to_local.load(), c.chunks_retransmitted.load(), c.data_conns_active.load(), c.rtt_us.load(), sessions);
}

}  // namespace ferry::gateway
