// A running VM: the Board plus the machine thread that drives it.
//
// Threading model (Firecracker-style): the machine thread owns the Board; it runs the
// vCPU in slices, polls the EventLoop between slices and sleeps in it while the hart
// waits for an interrupt. Other threads (API server, signal handling) never touch the
// Board: they call the public methods below, which post a command to the machine
// thread (queue + EventLoop::Wake + Vcpu::RequestExit) and wait for its reply.
#pragma once

#include <atomic>
#include <condition_variable>
#include <deque>
#include <functional>
#include <future>
#include <memory>
#include <string>
#include <thread>

#include <nlohmann/json.hpp>

#include "common/error.h"
#include "common/event_loop.h"
#include "common/thread_annotations.h"
#include "machine/board.h"
#include "migration/protocol/wire.h"
#include "vmm/activity.h"
#include "vmm/console.h"

namespace ferry {

// kMigrated: the guest now runs on a migration destination; this copy stays paused
// and can never run again.
enum class VmState { kCreated, kRunning, kPaused, kShutdown, kError, kMigrated };
std::string_view VmStateName(VmState s);

struct VmOptions {
  BoardConfig board;
  std::string console = "stdio";  // stdio | file:PATH | none
  // The VM's identity (a UUID, GET /vm "generation_id"): empty = a new one; Restore() then keeps the
  // snapshot's. Set it to restore a clone under a new identity.
  std::string generation_id;
};

class Vm {
 public:
  // Boots a new VM from a kernel.
  static Result<std::unique_ptr<Vm>> Create(VmOptions options);
  // Restores a VM from a snapshot file; host-side options (console, disk path, TAP)
  // come from `options`, everything guest-visible from the snapshot.
  static Result<std::unique_ptr<Vm>> Restore(VmOptions options, const std::string& snapshot_path);
  // Builds the machine for an incoming migration (nothing loaded; RAM and state
  // arrive from the stream). `options.board` must already carry the guest config.
  static Result<std::unique_ptr<Vm>> CreateIncoming(VmOptions options);
  ~Vm();

  // Starts the machine thread; the VM runs (or stays paused if start_paused).
  Status Start(bool start_paused = false);
  // Blocks until the machine thread has exited (guest shutdown or Shutdown()).
  // Returns the process exit code to use.
  int Wait();

  // Thread-safe commands (executed on the machine thread).
  Result<nlohmann::json> Info() EXCLUDES(mu_);
  Status Pause() EXCLUDES(mu_);
  Status Resume() EXCLUDES(mu_);
  Status Snapshot(const std::string& path) EXCLUDES(mu_);
  // SHA-256 of guest RAM, read directly from the RAM mapping (no migration or snapshot code on the
  // way; memfd holes hashed as zeros without touching them): {"algorithm", "sha256", "ram_bytes",
  // "state"}. Only while the vCPU does not run (paused or migrated): kBusy while running.
  Result<nlohmann::json> MemoryDigest() EXCLUDES(mu_);
  Status Shutdown() EXCLUDES(mu_);
  // Runs fn on the machine thread with the board (VM state is whatever it is).
  Status RunOnMachine(std::function<Status(Board&)> fn) EXCLUDES(mu_);
  VmState state() const { return state_.load(); }

  // Migration support (src/vmm/migration.h).
  GuestMemory& memory() { return board_->memory(); }  // the object is stable for the VM's life
  // CPU + device state as named records ("vcpu:N", "dev:ID"); the VM must be paused.
  Result<std::vector<migration::StateRecord>> SaveStateRecords();
  // Before Start(): restores every record; all-or-nothing per component.
  Status RestoreStateRecords(const std::vector<migration::StateRecord>& records);
  // Bytes SaveStateRecords() would produce now (computed on the machine thread while it runs).
  Result<uint64_t> StateBytes();
  // Throttle: the vCPU runs only `fraction` (0 < f <= 1) of the time (migration convergence).
  Status SetCpuShare(double fraction);
  // The last `max_windows` 10 ms windows of guest activity (any thread, no round trip to the
  // machine thread; vmm/activity.h).
  migration::ActivitySeries RecentActivity(size_t max_windows) const;
  // The guest runs elsewhere now: stay paused forever.
  Status MarkMigrated(const std::string& destination) EXCLUDES(mu_);
  // Sends a gratuitous RARP for the guest MAC (after a migration), if it has a NIC. Before
  // Start() it runs on the calling thread (no machine thread owns the board yet), so a
  // migration destination announces before the guest's first instruction; afterwards it is
  // a command to the machine thread.
  Status AnnounceNetwork();
  // From any thread, without waiting for the machine thread (it may be blocked in the kernel on
  // a post-copy page that will never arrive): the vCPU stops at its next exit check and the guest
  // never runs again; state error with `reason`. Device backends are not polled any more.
  void Halt(const std::string& reason) EXCLUDES(mu_);
  std::string Prometheus();

 private:
  Vm() = default;
  Status Init(VmOptions options, bool load_kernel);
  void MachineLoop() EXCLUDES(mu_);
  Status Post(std::function<Status()> fn) EXCLUDES(mu_);
  void SetState(VmState s) { state_.store(s); }
  Status DoPause();
  Status DoResume();
  // Machine thread: reports the activity totals now (idle_after: about to wait).
  void RecordActivity(bool idle_after);
  // Machine thread, while the guest runs: clears the written marks every kDirtySampleNs unless a
  // migration owns the log (DirtyLog::ClearWrittenUnlessClaimed), so counters.dirty_pages_total
  // keeps counting distinct pages written per second instead of saturating.
  void SampleDirtyRate(uint64_t now_ns);
  static constexpr uint64_t kDirtySampleNs = 1'000'000'000;

  VmOptions options_;
  std::unique_ptr<EventLoop> loop_;
  std::unique_ptr<Console> console_;
  std::unique_ptr<Board> board_;  // machine thread only (after Start)
  std::thread thread_;
  std::atomic<VmState> state_{VmState::kCreated};
  std::atomic<bool> stop_{false};
  int exit_code_ = 0;
  std::string error_ GUARDED_BY(mu_);        // set by the machine thread or Halt, read by Info
  std::string migrated_to_ GUARDED_BY(mu_);
  uint64_t started_ns_ = 0;
  std::atomic<double> cpu_share_{1.0};
  double throttle_debt_ns_ = 0;  // machine thread only
  uint64_t last_dirty_clear_ns_ = 0;  // machine thread only
  ActivityRecorder activity_;     // locks itself
  std::vector<Device*> io_devices_;  // machine thread only: the board's devices (activity counters)

  Mutex mu_;
  std::deque<std::packaged_task<Status()>> commands_ GUARDED_BY(mu_);
  // The batch of commands the machine thread is running (machine thread only). A member rather than
  // a local: the tasks and their captures stay reachable from the Vm while they run, which
  // LeakSanitizer's mid-run checks (libFuzzer) can otherwise report as leaked.
  std::deque<std::packaged_task<Status()>> running_commands_;
};

}  // namespace ferry
