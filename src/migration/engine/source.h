// Pre-copy migration, source side (VMM-neutral; see vm_interface.h). The migration thread runs
// an explicit phase machine over the stages of the engine:
//
//   kConnect   control connection (ControlChannel), preamble + HELLO with the capabilities this
//              migration wants; a destination that refuses protocol v2 is retried with v1 (no
//              codecs); data connections; CONFIG, which the destination checks
//   kIterate   one round per step: the PageScheduler picks the pages (round 0: all; later: the
//              dirtied ones, hot ones held back; free and known-zero pages as runs), the
//              ChannelPool's workers encode (PageEncoder: zero runs, deltas against the
//              DeltaCache, compression chosen by the CodecSelector) and send them, the round
//              ends when the destination has applied everything (PROGRESS); the dirty log is
//              harvested and the convergence policy (policy.h) decides: iterate, watch, stop
//              (forced), fail or throttle
//   kWatch     the set no longer shrinks and a pause would fit the target: every 10 ms activity
//              window, harvest and send what was dirtied (nothing held back), read the VM's
//              activity series and let the policy (DecideWatch) stop in a lull, keep watching,
//              or go back to rounds
//   kStopCopy  pause, every page still pending (dirty + held back), STATE records, END; READY
//   kCommit    GO - the commit point - then RESUMED
//   kPostcopy  (instead of kStopCopy + kCommit; protocol v2 with kCapPostcopy) pause, the pending
//              known-zero and free pages as runs, POSTCOPY with the pages still to send, STATE,
//              END; READY; GO (the commit point); RESUMED - the guest runs on the destination -
//              then every missing page: pushed on the data channels starting after the latest
//              requested page (locality), while a responder thread answers PAGE_REQUESTs on the
//              control connection at once; POSTCOPY_END; POSTCOPY_DONE. Entered when the
//              operator asks (StartPostcopy), in mode postcopy after the first pass, or when the
//              policy decides so in mode auto.
//   then a final status: completed | failed | cancelled | failed-unknown
// Any failure before GO resumes the source VM (and restores full vCPU speed). After GO a lost
// connection leaves the source paused: status "failed-unknown" (docs/protocol.md); in
// post-copy the source then still holds every page it has not sent.
//
// Threading: Start() spawns the migration thread; the control channel has a reader thread and
// the channel pool one worker per data connection, all for the whole migration. Stats() and
// Cancel() are thread-safe (API threads).
#pragma once

#include <atomic>
#include <condition_variable>
#include <deque>
#include <memory>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include <nlohmann/json.hpp>

#include "common/error.h"
#include "common/thread_annotations.h"
#include "migration/codec/codec_selector.h"
#include "migration/codec/delta_cache.h"
#include "migration/engine/channel_pool.h"
#include "migration/engine/params.h"
#include "migration/engine/policy.h"
#include "migration/engine/scheduler.h"
#include "migration/engine/vm_interface.h"
#include "migration/protocol/postcopy.h"
#include "migration/transport/control_channel.h"
#include "migration/transport/tcp.h"

namespace ferry::migration {

enum class MigrationStatus { kSetup, kActive, kDevice, kPostcopy, kPostcopyPaused, kCompleted, kFailed, kCancelled, kFailedUnknown };
std::string_view MigrationStatusName(MigrationStatus s);
inline bool IsFinal(MigrationStatus s) { return s >= MigrationStatus::kCompleted; }

class SourceMigration {
 public:
  static std::unique_ptr<SourceMigration> Start(SourceVm* vm, SourceParams params);
  ~SourceMigration();  // cancels if still running, joins

  // Progress and results (GET /vm/migration). Besides the timing fields: transferred_bytes (every
  // byte written to the connections), pages_by_encoding (pages sent per encoding - zero, raw, lz4,
  // zstd, delta, free; runs count each page - and held_back: hold-backs by layering, a page held
  // back in three passes counts three times), resent_bytes (wire bytes of pages that had been sent
  // before), source_cpu_ms (CPU time of the migration's threads), codec (the codec choice's model
  // and per-codec batches), delta_cache, history (one entry per round and one for the watch),
  // predicted_downtime_ms (the prediction the stop was decided on; while running the latest),
  // stop (why and when the stop-and-copy began: reason, activity before the pause).
  nlohmann::json Stats() const EXCLUDES(ctl_mu_, stats_mu_);
  MigrationStatus status() const { return status_.load(); }
  // Cancels in any phase before the commit point; the source VM keeps (or resumes) running.
  Status Cancel() EXCLUDES(commit_mu_, ctl_mu_);
  // Blocks until the migration reached a final status.
  void Wait();
  // Switches a running pre-copy to post-copy (as QEMU's migrate-start-postcopy): the current pass
  // ends early and the guest moves to the destination with the rest of its pages missing.
  Status StartPostcopy() EXCLUDES(commit_mu_);
  // Post-copy recovery (PUT /vm/migration/recover): while the connection is being re-established
  // (status postcopy-paused), try `to` (tcp:HOST:PORT) from now on, at once.
  Status Recover(const std::string& to) EXCLUDES(recover_mu_);

 private:
  enum class Phase { kConnect, kIterate, kWatch, kStopCopy, kCommit, kPostcopy, kDone };

  SourceMigration(SourceVm* vm, SourceParams params);
  void Run();
  Result<Phase> Connect();
  Result<std::vector<std::unique_ptr<Socket>>> ConnectDataChannels(const Endpoint& ep);
  ChannelPool::Options PoolOptions(uint64_t first_seq) const;
  Status Handshake(const Endpoint& ep, uint32_t version);
  Result<Phase> Round();
  Result<Phase> Watch();
  // The link figures of the last round for a prediction (remaining pages left 0).
  RoundMeasurement LinkMeasurement() const;
  // Records why the stop-and-copy begins now (stats "stop").
  void NoteStop(const Decision& d, const nlohmann::json& extra);
  Result<Phase> StopAndCopy();
  // Paused, pages sent: saves the VM state, sends STATE records and END (the page records so
  // far) and waits for READY (the destination applied everything and restored).
  struct Handover {
    uint64_t state_bytes = 0, saved_ns = 0, end_ns = 0, ready_ns = 0;
  };
  Result<Handover> HandOverState();
  Result<Phase> Commit();
  Result<Phase> Postcopy();
  // Post-copy helpers: the responder thread's loop, pages to a control-connection record, the
  // background push.
  void Responder();
  Status SendRequested(uint64_t gfn, uint32_t count, PageEncoder* enc);
  Status PushMissing();
  // One connection's worth of post-copy: push, POSTCOPY_END, POSTCOPY_DONE.
  Status PostcopyRun();
  // A cut after GO: re-establish the connections (retrying until recover_timeout_ms) and learn
  // what the destination still misses.
  Status Reconnect(const Error& why);
  Status TryReconnect(const std::string& to, uint64_t next_seq);
  bool Recoverable(const Error& e);
  bool FoldControl(const Record& r);
  void StartResponder();
  void StopResponder();
  void StartPinger();
  void StopPinger();
  // The stop-and-copy's stall guard (pre-copy): from just before the pause until the commit point a thread
  // watches what the destination's TCP acknowledges on every connection. Nothing for
  // stall_timeout_ms - a hung destination whose windows stay shut, which keepalives and
  // TCP_USER_TIMEOUT take for a live peer, so a blocked send would wait for ever with the guest
  // paused - and it cuts the connections: the blocked sends fail and the source resumes. It never
  // acts once GO is committed (it checks committed_ under commit_mu_ and Commit refuses after it).
  void StartStallGuard();
  void StopStallGuard();
  bool Claim(uint64_t p) {
    const uint64_t bit = 1ull << (p % 64);
    return !(pc_claimed_[p / 64].fetch_or(bit, std::memory_order_relaxed) & bit);
  }
  // Runs one pass of the scheduler into the channel pool (sampling the dirty log inside long
  // passes); returns the pages those samples marked.
  Result<uint64_t> SendPass(bool final, uint64_t holdback_budget);
  // Pages layering may hold back for the final round (half the downtime target at the rate so far).
  uint64_t HoldbackBudget() const;
  // The next dirty-log sample into the scheduler, after taking back the first sends the channel
  // workers left out since the last one (debounce). Returns the pages it marked.
  uint64_t Sample(PageBitmap* dirty, PageBitmap* freed);
  // Waits until the destination applied every page record sent so far (kCapProgress).
  Status WaitDrained();
  // The error to report for a failed step: the destination's own ERROR when it sent one.
  Error Explain(const Error& local) const;
  void Fail(const Error& e);
  void Shutdown();
  void SetStatus(MigrationStatus s) { status_.store(s); }
  void SampleCpu();

  SourceVm* vm_;
  SourceParams params_;
  Uuid uuid_;
  RamView ram_;         // set by Start() before the migration thread, then constant
  uint64_t pages_ = 0;  // likewise
  std::thread thread_;
  std::atomic<MigrationStatus> status_{MigrationStatus::kSetup};
  std::atomic<bool> cancelled_{false};
  bool paused_by_us_ = false;     // migration thread only
  double cpu_share_set_ = 1.0;    // migration thread only

  // Stages (created by Connect; the migration thread owns them, Stats/Cancel read through
  // the pointers under ctl_mu_). The migration thread sets and replaces the pointers under
  // ctl_mu_ and reads them without it (no one else writes them); the responder and pinger
  // threads read them without it too, as they run only between StartResponder/StartPinger and
  // StopResponder/StopPinger, while the pointers do not change. "Locked for others, not for the
  // owner" has no GUARDED_BY form: this comment is the rule.
  RateLimiter limiter_;
  std::unique_ptr<ControlChannel> control_;
  std::unique_ptr<DeltaCache> cache_;
  std::unique_ptr<CodecSelector> selector_;
  std::unique_ptr<ChannelPool> pool_;
  std::unique_ptr<PageScheduler> scheduler_;
  PolicyConfig policy_cfg_;
  PolicyState policy_state_;
  mutable Mutex ctl_mu_;        // guards the stage pointers while they are set up / torn down
  std::atomic<bool> hello_sent_{false};  // CANCEL may be sent on the control channel
  std::atomic<uint32_t> version_{kProtocolVersion};  // negotiated (set during connect, read by Stats)
  std::atomic<uint64_t> caps_{0};                    // acknowledged capabilities (likewise)
  // Page records applied (PROGRESS). Guarded by the control channel's own lock (FoldControl runs
  // under it, WaitDrained reads it in the channel's WaitUntil predicate): a lock private to
  // ControlChannel, so this rule stays a comment.
  uint64_t dest_applied_ = 0;

  // Round bookkeeping (migration thread only).
  uint32_t round_ = 0;
  uint32_t watch_returns_ = 0;  // watches that ended "back to rounds" (over the target)
  uint64_t rounds_start_ns_ = 0;
  uint64_t total_round_bytes_ = 0, total_round_ns_ = 0;
  double bytes_per_page_ = kWirePageSize;
  uint64_t state_bytes_ = 0;
  double bandwidth_ = 0;        // bytes/s of the rounds so far (end to end)
  double vm_call_ms_ = 0;       // latency of a command to the VM (EstimateStateBytes), smoothed
  double rtt_last_ms_ = 0;
  EncodeTally last_tally_;

  // Cancel vs commit: once GO is sent the migration can no longer be cancelled.
  Mutex commit_mu_;
  bool committed_ GUARDED_BY(commit_mu_) = false;
  std::optional<Error> stall_error_ GUARDED_BY(commit_mu_);  // the stall guard cut the stop-and-copy

  // Post-copy. The missing set is fixed before POSTCOPY is sent; claims are atomic (a page is
  // pushed once; a requested page is sent at once even if claimed, the destination drops the
  // second copy).
  std::atomic<bool> postcopy_requested_{false};
  PageBitmap pc_missing_;
  uint64_t pc_missing_count_ = 0;
  std::unique_ptr<std::atomic<uint64_t>[]> pc_claimed_;
  std::thread responder_;
  Mutex req_mu_;
  std::condition_variable req_cv_;
  std::deque<PageRequest> requests_ GUARDED_BY(req_mu_);
  bool responder_stop_ GUARDED_BY(req_mu_) = false;
  bool responder_busy_ GUARDED_BY(req_mu_) = false;
  std::optional<Error> responder_error_ GUARDED_BY(req_mu_);
  EncodeTally responder_tally_ GUARDED_BY(req_mu_);
  std::atomic<uint64_t> last_request_{UINT64_MAX};  // gfn of the latest request (push locality)
  std::atomic<uint64_t> requests_seen_{0};
  std::thread pinger_;
  std::thread stall_guard_;  // migration thread starts and joins it
  Mutex guard_mu_;
  std::condition_variable guard_cv_;
  bool guard_stop_ GUARDED_BY(guard_mu_) = false;
  std::atomic<bool> pinger_stop_{false};
  Mutex recover_mu_;
  std::condition_variable recover_cv_;
  std::string recover_to_ GUARDED_BY(recover_mu_);  // operator's new address ("" = params_.to)
  bool recover_kick_ GUARDED_BY(recover_mu_) = false;
  // Figures of pools and control channels replaced by a recovery.
  EncodeTally retired_tally_ GUARDED_BY(ctl_mu_);
  uint64_t retired_bytes_ GUARDED_BY(ctl_mu_) = 0, retired_cpu_ns_ GUARDED_BY(ctl_mu_) = 0;

  // Statistics (unless atomic).
  mutable Mutex stats_mu_;
  uint32_t recoveries_ GUARDED_BY(stats_mu_) = 0;
  double throttle_max_pct_ GUARDED_BY(stats_mu_) = 0;  // the most the vCPUs were slowed (100 - share %)
  uint64_t start_ns_ GUARDED_BY(stats_mu_) = 0, setup_ns_ GUARDED_BY(stats_mu_) = 0, end_ns_ GUARDED_BY(stats_mu_) = 0;
  uint64_t pause_ns_ GUARDED_BY(stats_mu_) = 0;
  double pause_ms_ GUARDED_BY(stats_mu_) = 0, final_pages_ms_ GUARDED_BY(stats_mu_) = 0, state_ms_ GUARDED_BY(stats_mu_) = 0,
         resume_ms_ GUARDED_BY(stats_mu_) = 0, downtime_ms_ GUARDED_BY(stats_mu_) = 0;
  double expected_downtime_ms_ GUARDED_BY(stats_mu_) = 0, bandwidth_bps_ GUARDED_BY(stats_mu_) = 0,
         dirty_rate_ GUARDED_BY(stats_mu_) = 0, rtt_ms_ GUARDED_BY(stats_mu_) = 0;
  std::string mode_ran_ GUARDED_BY(stats_mu_) = "precopy";
  uint64_t go_ns_ GUARDED_BY(stats_mu_) = 0;
  double postcopy_ms_ GUARDED_BY(stats_mu_) = 0;
  uint64_t postcopy_pages_ GUARDED_BY(stats_mu_) = 0;
  PostcopyDone pc_done_ GUARDED_BY(stats_mu_);
  double predicted_downtime_ms_ GUARDED_BY(stats_mu_) = 0;  // at the stop decision (before it: the latest prediction)
  nlohmann::json stop_ GUARDED_BY(stats_mu_) = nullptr;
  uint64_t remaining_pages_ GUARDED_BY(stats_mu_) = 0, iterations_ GUARDED_BY(stats_mu_) = 0,
           held_back_total_ GUARDED_BY(stats_mu_) = 0;
  bool converged_ GUARDED_BY(stats_mu_) = true;
  std::string error_ GUARDED_BY(stats_mu_);
  nlohmann::json history_ GUARDED_BY(stats_mu_) = nlohmann::json::array();
  std::atomic<uint64_t> migration_thread_cpu_ns_{0};
  std::atomic<uint64_t> round_pages_total_{0}, round_pages_base_{0};  // this pass: pages, pages sent before it
};

}  // namespace ferry::migration
