// The control connection of one migration, for either side (source and destination use the
// same helper). A reader thread turns the peer's records into a bounded queue; when the queue
// is full the reader stops reading, so TCP flow control pushes back on the peer and memory stays
// bounded whatever it sends. A fold callback consumes frequent bookkeeping records (PROGRESS)
// without queueing them. Consumers take records in order:
//   - ERROR from the peer becomes that error (code and message, prefixed "peer: "),
//   - CANCEL becomes kCancelled with the peer's reason,
//   - records of unknown type without the mandatory flag are skipped, and so is PING (liveness:
//     any record received counts, last_rx_ns()),
//   - Await(want) fails with kCorrupt on any other record than `want`.
// Interrupt(e) makes every current and later wait fail with e (local cancel, a failed data
// channel); a lost connection fails every wait with the read error.
//
// Threads: Start() spawns the reader (joined by Shutdown()/the destructor). Send() is safe from
// any thread (Socket::WriteAll keeps whole records apart). Await/Next/WaitUntil are for one
// consumer at a time. Notify/Interrupt/Shutdown/failure from any thread. The fold callback runs
// on the reader thread with the channel's lock held: it must be short and must not call back.
#pragma once

#include <condition_variable>
#include <deque>
#include <functional>
#include <memory>
#include <mutex>
#include <optional>
#include <string_view>
#include <thread>

#include "common/error.h"
#include "common/thread_annotations.h"
#include "migration/transport/tcp.h"

namespace ferry::migration {

class ControlChannel {
 public:
  // Returns true when it consumed the record (it is then not queued).
  using Fold = std::function<bool(const Record&)>;

  explicit ControlChannel(std::unique_ptr<Socket> socket, size_t max_queued = 16);
  ~ControlChannel();
  ControlChannel(const ControlChannel&) = delete;
  ControlChannel& operator=(const ControlChannel&) = delete;

  void Start(Fold fold = {});
  Socket& socket() { return *socket_; }

  Status Send(RecordType type, std::span<const uint8_t> payload, bool mandatory = true);
  // The next record, which must be of type `want`. timeout_ms < 0: no timeout.
  Result<Record> Await(RecordType want, int timeout_ms);
  // The next record of any type (ERROR/CANCEL still map to errors).
  Result<Record> Next(int timeout_ms);
  // Waits until pred() holds; pred runs with the channel's lock held and is evaluated again
  // after every fold and every Notify(). Fails on interrupt, connection loss or timeout.
  Status WaitUntil(const std::function<bool()>& pred, int timeout_ms, std::string_view what);
  // The peer's own account of a failure: an ERROR or CANCEL it sent that is queued now or arrives
  // within wait_ms (a local failure is often the echo of the peer giving up: prefer its reason).
  std::optional<Error> PeerVerdict(int wait_ms);
  // Wakes waiters after state their predicate reads changed elsewhere.
  void Notify();
  void Interrupt(Error e);
  // Closes the connection both ways (the reader ends) and joins the reader.
  void Shutdown();
  // The reader's error (connection lost, malformed record), if any.
  std::optional<Error> failure() const;
  // CPU time the reader thread used so far (ns).
  uint64_t reader_cpu_ns() const { return reader_cpu_ns_.load(std::memory_order_relaxed); }
  // When the last record of any kind arrived (NowNs clock; 0 = none yet).
  uint64_t last_rx_ns() const { return last_rx_ns_.load(std::memory_order_relaxed); }

 private:
  void ReaderLoop();
  // With mu_ held: the reason waits fail now, if any.
  std::optional<Error> BlockedLocked() const REQUIRES(mu_);
  // ERROR / CANCEL as the error they stand for.
  static Error RecordError(const Record& r);

  std::unique_ptr<Socket> socket_;
  const size_t max_queued_;
  Fold fold_;
  std::thread reader_;
  std::atomic<uint64_t> reader_cpu_ns_{0};
  std::atomic<uint64_t> last_rx_ns_{0};

  mutable Mutex mu_;
  std::condition_variable cv_;        // consumers: records, fold effects, errors
  std::condition_variable space_cv_;  // reader: room in the queue
  std::deque<Record> queue_ GUARDED_BY(mu_);
  std::optional<Error> read_error_ GUARDED_BY(mu_);
  std::optional<Error> interrupt_ GUARDED_BY(mu_);
  bool stopping_ GUARDED_BY(mu_) = false;
};

}  // namespace ferry::migration
