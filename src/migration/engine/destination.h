// Pre-copy migration, destination side (VMM-neutral; see vm_interface.h and
// docs/protocol.md). Listens on tcp:ADDR:PORT, accepts one migration: a control
// connection (HELLO), its N data connections (DATA_HELLO with the same uuid), builds
// the machine from CONFIG, applies PAGES from every data connection in seq order per
// page, restores STATE after END once every batch arrived, reports READY, and runs the
// guest on GO. Connections that do not belong (bad preamble, wrong uuid, garbage) are
// refused with an ERROR record and dropped without disturbing the migration.
//
// Threading: Run() blocks the calling thread; it uses one accept thread and one
// reader thread per data connection, all joined before Run() returns.
#pragma once

#include <atomic>
#include <condition_variable>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include "common/error.h"
#include "migration/engine/vm_interface.h"
#include "migration/transport/tcp.h"

namespace ferry::migration {

struct IncomingParams {
  int handshake_timeout_ms = 10000;  // preamble + first record of each connection
  int idle_timeout_ms = 120000;      // longest silence on the control channel once started
};

struct IncomingResult {
  std::string uuid;
  std::string source;
  uint64_t batches = 0;
  uint64_t pages = 0;
  uint64_t bytes = 0;
  double restore_ms = 0;
  double resume_ms = 0;
  double total_ms = 0;
};

class IncomingMigration {
 public:
  static Result<std::unique_ptr<IncomingMigration>> Listen(const std::string& endpoint);
  ~IncomingMigration();
  uint16_t port() const { return listener_->port(); }
  // Runs one migration. On success the guest runs (DestinationVm::Start was called).
  // On failure the caller must tear the prepared VM down.
  Result<IncomingResult> Run(DestinationVm* vm, const IncomingParams& params = {});
  // Thread-safe: makes Run() fail promptly (operator interrupt).
  void Abort();

 private:
  explicit IncomingMigration(std::unique_ptr<Listener> l) : listener_(std::move(l)) {}
  Status AcceptControl(const IncomingParams& params);
  void AcceptLoop(const IncomingParams& params);
  void DataReader(Socket* sock, uint32_t channel);
  Status ApplyPages(const Record& rec);
  void ProgressLoop();
  Status ControlLoop(DestinationVm* vm, const IncomingParams& params, IncomingResult* out);
  void DataFailed(const Error& e);
  Status CheckDataError();
  void Cleanup();

  std::unique_ptr<Listener> listener_;
  std::unique_ptr<Socket> control_;  // set once under mu_, then read by the owner thread
  Hello hello_;
  std::thread acceptor_;
  std::thread progress_;  // PROGRESS sender (kCapProgress)
  std::atomic<bool> stopping_{false};
  std::atomic<bool> aborted_{false};
  uint64_t t_end_ = 0;  // END received (control thread only; for the downtime log)

  std::mutex mu_;
  std::condition_variable cv_;
  std::vector<std::unique_ptr<Socket>> data_;   // GUARDED_BY(mu_)
  std::vector<std::thread> readers_;            // GUARDED_BY(mu_)
  std::vector<bool> channel_used_;              // GUARDED_BY(mu_)
  uint64_t batches_applied_ = 0;                // GUARDED_BY(mu_)
  std::optional<Error> data_error_;             // GUARDED_BY(mu_)

  // RAM, published once the machine is prepared (before CONFIG_ACK).
  std::atomic<bool> ram_ready_{false};
  RamView ram_;
  uint64_t ram_pages_ = 0;
  static constexpr size_t kStripes = 256;
  std::mutex stripes_[kStripes];
  std::vector<uint64_t> last_seq_;   // GUARDED_BY(stripes_[gfn % kStripes])
  std::vector<uint8_t> touched_;     // GUARDED_BY(stripes_[gfn % kStripes]): page ever written with data
  std::atomic<uint64_t> pages_applied_{0}, bytes_received_{0};
};

}  // namespace ferry::migration
