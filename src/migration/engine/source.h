// Pre-copy migration, source side (VMM-neutral; see vm_interface.h).
//
//   setup:     connect control + N data channels, HELLO, CONFIG (destination checks it)
//   active:    iteration 0 sends every page (zero pages as a flag), then rounds over the
//              pages dirtied meanwhile, until the predicted downtime
//              (remaining dirty bytes / measured bandwidth + state time) <= target,
//              or non-convergence is detected and `policy` decides
//   device:    pause, last dirty pages, STATE records, END; READY; GO; RESUMED
//   completed: the guest runs on the destination; this VM is marked migrated
// Any failure before GO resumes the source VM. After GO (the commit point) a lost
// connection leaves the source paused: status "failed-unknown" (docs/protocol.md).
//
// Threading: Start() spawns the migration thread (+ one sender thread per data
// channel during each round). Stats() and Cancel() are thread-safe.
#pragma once

#include <atomic>
#include <condition_variable>
#include <deque>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include <nlohmann/json.hpp>

#include "common/error.h"
#include "migration/engine/vm_interface.h"
#include "migration/transport/tcp.h"

namespace ferry::migration {

enum class ConvergePolicy { kForce, kFail, kContinue };

struct SourceParams {
  std::string to;                 // tcp:HOST:PORT
  uint32_t channels = 4;          // data connections (1..16)
  uint64_t downtime_ms = 300;     // target VMM downtime
  uint64_t max_bandwidth = 0;     // bytes/s over all channels, 0 = unlimited
  // Not converging = the remaining dirty set did not shrink by 10% for `stall_rounds`
  // rounds. force: stop-and-copy anyway (reports the expected downtime); fail: give up
  // (source keeps running); continue: keep iterating up to max_iterations, then fail.
  ConvergePolicy policy = ConvergePolicy::kForce;
  uint32_t max_iterations = 30;
  uint32_t stall_rounds = 5;
  int connect_timeout_ms = 5000;
  int reply_timeout_ms = 60000;   // CONFIG_ACK, READY, RESUMED
};
// From the JSON body of PUT /vm/migrate; strict (unknown fields rejected).
Result<SourceParams> ParseSourceParams(const nlohmann::json& body);
std::string_view PolicyName(ConvergePolicy p);

enum class MigrationStatus { kSetup, kActive, kDevice, kCompleted, kFailed, kCancelled, kFailedUnknown };
std::string_view MigrationStatusName(MigrationStatus s);
inline bool IsFinal(MigrationStatus s) { return s >= MigrationStatus::kCompleted; }

class SourceMigration {
 public:
  static std::unique_ptr<SourceMigration> Start(SourceVm* vm, SourceParams params);
  ~SourceMigration();  // cancels if still running, joins

  nlohmann::json Stats() const;
  MigrationStatus status() const { return status_.load(); }
  // Cancels in any phase before the commit point; the source VM keeps (or resumes) running.
  Status Cancel();
  // Blocks until the migration reached a final status.
  void Wait();

 private:
  SourceMigration(SourceVm* vm, SourceParams params);
  void Run();
  Status Setup();
  Status Iterate();
  Status StopAndCopy();
  Status Commit();
  // Sends the given pages over all data channels (one sender thread per channel).
  // holes (iteration 0 only): pages known to be zero without reading them.
  Status SendPages(const std::vector<uint64_t>& pages, const std::vector<uint8_t>* holes, uint64_t* zero, uint64_t* bytes);
  std::vector<uint64_t> HarvestDirty();
  Result<Record> AwaitControl(RecordType want, int timeout_ms);
  void ControlReader();
  void Fail(const Error& e);
  void ShutdownSockets();
  // With kCapProgress: waits until the destination applied every PAGES record sent so far.
  Status WaitDrained();
  void SetStatus(MigrationStatus s);

  SourceVm* vm_;
  SourceParams params_;
  Uuid uuid_;
  RamView ram_;
  uint64_t pages_ = 0;
  std::thread thread_;
  std::atomic<MigrationStatus> status_{MigrationStatus::kSetup};
  std::atomic<bool> cancelled_{false};
  bool paused_by_us_ = false;  // migration thread only

  std::unique_ptr<Socket> control_;
  std::vector<std::unique_ptr<Socket>> data_;
  RateLimiter limiter_;
  std::atomic<uint64_t> next_seq_{1};
  std::atomic<uint64_t> batches_{0};

  // Records from the destination (READY, RESUMED, ...) and its failure, if any.
  std::thread control_reader_;
  mutable std::mutex ctl_mu_;  // also guards control_/data_ while they are set up
  std::condition_variable ctl_cv_;
  std::deque<Record> ctl_queue_;         // GUARDED_BY(ctl_mu_)
  std::optional<Error> ctl_error_;       // GUARDED_BY(ctl_mu_)
  std::atomic<bool> hello_sent_{false};  // CANCEL may be sent on the control channel
  uint64_t caps_ = 0;                    // accepted capabilities (set during setup)
  uint64_t dest_applied_ = 0;            // GUARDED_BY(ctl_mu_): PAGES records applied (PROGRESS)

  // Cancel vs commit: once GO is sent the migration can no longer be cancelled.
  std::mutex commit_mu_;
  bool committed_ = false;  // GUARDED_BY(commit_mu_)

  // Statistics. GUARDED_BY(stats_mu_) unless atomic.
  mutable std::mutex stats_mu_;
  uint64_t start_ns_ = 0, setup_ns_ = 0, end_ns_ = 0;
  uint64_t pause_ns_ = 0;
  double final_pages_ms_ = 0, state_ms_ = 0, resume_ms_ = 0, downtime_ms_ = 0;
  double expected_downtime_ms_ = 0, bandwidth_bps_ = 0, dirty_rate_ = 0;
  uint64_t remaining_pages_ = 0, iterations_ = 0;
  bool converged_ = true;
  std::string error_;
  nlohmann::json history_ = nlohmann::json::array();
  std::atomic<uint64_t> zero_pages_{0}, normal_pages_{0}, transferred_{0};
  std::atomic<uint64_t> round_pages_total_{0}, round_pages_done_{0};
};

}  // namespace ferry::migration
