// Greeting new connections on a listening port, each on its own thread, so that one slow or
// silent peer never holds up the others (a trickle of bytes used to block every later source for
// the whole handshake timeout). A greeting is the preamble and the first record, read under one
// deadline (on a TLS listener the TLS handshake first, within the same deadline); then the
// caller's continuation gets the connection and what was read (a TLS failure as the preamble's
// error).
//
// Bounds: each greeting at most `timeout_ms`; at most `max` greetings reading at once - a new
// connection beyond that ends the oldest one's read (a flood of silent peers can delay a real source
// by one greeting, never lock it out). Threads: Spawn/ShutdownAll/JoinAll from any thread; continuations run
// on the greeting threads (after the read; they must not block on the peer for long - an ERROR or
// a short reply only). ShutdownAll() shuts every connection still being read, so JoinAll() returns
// at once; the destructor does both.
#pragma once

#include <functional>
#include <list>
#include <memory>
#include <mutex>
#include <thread>

#include "migration/transport/tcp.h"
#include "common/thread_annotations.h"

namespace ferry::migration {

class HandshakeThreads {
 public:
  using Greeted = std::function<void(std::unique_ptr<Socket>, Result<Preamble>, Result<Record>)>;

  explicit HandshakeThreads(size_t max) : max_(max) {}
  ~HandshakeThreads();
  HandshakeThreads(const HandshakeThreads&) = delete;
  HandshakeThreads& operator=(const HandshakeThreads&) = delete;

  // Greets `sock` on a new thread and calls `then`; `tls` (a server context, or null for
  // plaintext) must outlive the greeting. False (and `sock` is left to the caller) only after
  // ShutdownAll().
  bool Spawn(std::unique_ptr<Socket>* sock, const net::TlsContext* tls, int timeout_ms, uint32_t max_version, Greeted then);
  void ShutdownAll();
  void JoinAll();

 private:
  struct Greeting {
    std::thread thread;
    // Both GUARDED_BY(HandshakeThreads::mu_) (the analysis cannot name the outer mutex here).
    Socket* reading = nullptr;  // set while its read runs (ShutdownAll's target)
    bool done = false;
  };
  void ReapLocked(std::list<Greeting>* finished) REQUIRES(mu_);  // moves finished greetings out

  const size_t max_;
  mutable Mutex mu_;
  std::list<Greeting> greetings_ GUARDED_BY(mu_);
  bool shut_ GUARDED_BY(mu_) = false;
};

}  // namespace ferry::migration
