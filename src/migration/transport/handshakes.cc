#include "migration/transport/handshakes.h"

#include "common/clock.h"

namespace ferry::migration {

HandshakeThreads::~HandshakeThreads() {
  ShutdownAll();
  JoinAll();
}

void HandshakeThreads::ReapLocked(std::list<Greeting>* finished) {
  for (auto it = greetings_.begin(); it != greetings_.end();) {
    if (it->done) finished->splice(finished->end(), greetings_, it++);
    else ++it;
  }
}

bool HandshakeThreads::Spawn(std::unique_ptr<Socket>* sock, const net::TlsContext* tls, int timeout_ms, uint32_t max_version, Greeted then) {
  std::list<Greeting> finished;
  {
    MutexLock l(mu_);
    ReapLocked(&finished);
  }
  for (auto& g : finished) g.thread.join();  // done: they only return
  MutexLock l(mu_);
  if (shut_) return false;
  size_t reading = 0;
  for (const auto& g : greetings_) reading += g.reading != nullptr;
  if (reading >= max_) {
    for (auto& g : greetings_)
      if (g.reading) {
        g.reading->Shutdown();  // the oldest still reading: its read fails now, its thread ends
        break;
      }
  }
  Greeting& g = greetings_.emplace_back();
  g.reading = sock->get();
  g.thread = std::thread([this, &g, s = std::move(*sock), tls, timeout_ms, max_version, then = std::move(then)]() mutable {
    const uint64_t deadline = NowNs() + static_cast<uint64_t>(std::max(timeout_ms, 0)) * 1'000'000;
    Status secure = tls ? s->StartTls(*tls, "", deadline) : Status{};
    Result<Preamble> pre = secure ? ReadPreamble(*s, MsUntil(deadline), max_version) : Result<Preamble>(std::unexpected(secure.error()));
    Result<Record> first = pre ? ReadRecordUntil(*s, deadline) : Result<Record>(std::unexpected(pre.error()));
    {
      MutexLock l2(mu_);
      g.reading = nullptr;
    }
    then(std::move(s), std::move(pre), std::move(first));
    MutexLock l2(mu_);
    g.done = true;
  });
  return true;
}

void HandshakeThreads::ShutdownAll() {
  MutexLock l(mu_);
  shut_ = true;
  for (auto& g : greetings_)
    if (g.reading) g.reading->Shutdown();
}

void HandshakeThreads::JoinAll() {
  std::list<Greeting> all;
  {
    MutexLock l(mu_);
    all.swap(greetings_);
  }
  for (auto& g : all) g.thread.join();
}

}  // namespace ferry::migration
