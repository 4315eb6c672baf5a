// Test helper for the engine's fault tests: a TCP relay on loopback between a source and a
// destination that the test can cut (every connection relayed so far is shut down both ways)
// or make unreachable (new connections are closed as soon as they are accepted), or freeze (it
// stops reading: the kernel buffers fill and the peers' windows close, as with a hung peer).
//
// Threads: one acceptor, two pump threads per relayed connection; Cut(), Refuse() and to() are
// thread-safe (a test double may call Cut() from inside an engine hook). The destructor cuts
// and joins everything.
#pragma once

#include <poll.h>
#include <unistd.h>

#include <atomic>
#include <memory>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include <fmt/format.h>

#include "common/thread_annotations.h"
#include "migration/transport/tcp.h"

namespace ferry::migration::test {

class Relay {
 public:
  explicit Relay(uint16_t to_port) : to_port_(to_port) {
    listener_ = std::move(*Listener::Listen(*ParseEndpoint("tcp:127.0.0.1:0")));
    acceptor_ = std::thread([this] { AcceptLoop(); });
  }
  ~Relay() {
    listener_->Shutdown();
    acceptor_.join();
    Cut();
    std::vector<std::thread> pumps;
    {
      MutexLock l(mu_);
      pumps.swap(pumps_);
    }
    for (auto& t : pumps) t.join();
  }
  std::string to() const { return fmt::format("tcp:127.0.0.1:{}", listener_->port()); }
  // Shuts down every connection relayed so far; returns how many.
  int Cut() EXCLUDES(mu_) {
    MutexLock l(mu_);
    int n = 0;
    for (auto& p : pairs_) {
      p->first->Shutdown();
      p->second->Shutdown();
      ++n;
    }
    pairs_.clear();
    return n;
  }
  // Shuts down every connection relayed so far but the first (a source's control connection: it
  // opens that one first); returns how many.
  int CutAllButFirst() EXCLUDES(mu_) {
    MutexLock l(mu_);
    int n = 0;
    for (size_t i = 1; i < pairs_.size(); ++i, ++n) {
      pairs_[i]->first->Shutdown();
      pairs_[i]->second->Shutdown();
    }
    return n;
  }
  // While set, a new connection is closed at once (the destination cannot be reached).
  void Refuse(bool on) { refuse_.store(on); }
  // While set, nothing is read from either side of any connection.
  void Freeze(bool on) { frozen_.store(on); }
  int refused() const { return refused_.load(); }

 private:
  using Pair = std::pair<std::unique_ptr<Socket>, std::unique_ptr<Socket>>;
  void AcceptLoop() {
    for (;;) {
      auto in = listener_->Accept(-1);
      if (!in) return;
      if (refuse_.load()) {
        ++refused_;
        (*in)->Shutdown();
        continue;
      }
      auto out = Socket::Connect(*ParseEndpoint(fmt::format("tcp:127.0.0.1:{}", to_port_)), 2000);
      if (!out) continue;
      auto pair = std::make_shared<Pair>(std::move(*in), std::move(*out));
      MutexLock l(mu_);
      pairs_.push_back(pair);
      pumps_.emplace_back([this, pair] { Pump(*pair->first, *pair->second); });
      pumps_.emplace_back([this, pair] { Pump(*pair->second, *pair->first); });
    }
  }
  void Pump(Socket& from, Socket& to) {
    uint8_t buf[65536];
    for (;;) {
      while (frozen_.load()) {
        pollfd p{from.fd(), POLLRDHUP, 0};  // a cut (Shutdown) still ends the pump
        if (poll(&p, 1, 5) > 0 && (p.revents & (POLLRDHUP | POLLHUP | POLLERR | POLLNVAL))) break;
      }
      const ssize_t n = read(from.fd(), buf, sizeof buf);
      if (n <= 0 || !to.WriteAll({buf, static_cast<size_t>(n)})) break;
    }
    from.Shutdown();
    to.Shutdown();
  }
  const uint16_t to_port_;
  std::unique_ptr<Listener> listener_;
  std::thread acceptor_;
  std::atomic<bool> refuse_{false}, frozen_{false};
  std::atomic<int> refused_{0};
  Mutex mu_;
  std::vector<std::shared_ptr<Pair>> pairs_ GUARDED_BY(mu_);
  std::vector<std::thread> pumps_ GUARDED_BY(mu_);
};

}  // namespace ferry::migration::test
