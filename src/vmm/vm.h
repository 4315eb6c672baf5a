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
#include <mutex>
#include <string>
#include <thread>

#include <nlohmann/json.hpp>

#include "common/error.h"
#include "common/event_loop.h"
#include "machine/board.h"
#include "vmm/console.h"

namespace ferry {

enum class VmState { kCreated, kRunning, kPaused, kShutdown, kError };
std::string_view VmStateName(VmState s);

struct VmOptions {
  BoardConfig board;
  std::string console = "stdio";  // stdio | file:PATH | none
};

class Vm {
 public:
  // Boots a new VM from a kernel.
  static Result<std::unique_ptr<Vm>> Create(VmOptions options);
  // Restores a VM from a snapshot file; host-side options (console, disk path, TAP)
  // come from `options`, everything guest-visible from the snapshot.
  static Result<std::unique_ptr<Vm>> Restore(VmOptions options, const std::string& snapshot_path);
  ~Vm();

  // Starts the machine thread; the VM runs (or stays paused if start_paused).
  Status Start(bool start_paused = false);
  // Blocks until the machine thread has exited (guest shutdown or Shutdown()).
  // Returns the process exit code to use.
  int Wait();

  // Thread-safe commands (executed on the machine thread).
  Result<nlohmann::json> Info();
  Status Pause();
  Status Resume();
  Status Snapshot(const std::string& path);
  Status Shutdown();
  // Runs fn on the machine thread with the board (VM state is whatever it is).
  Status RunOnMachine(std::function<Status(Board&)> fn);
  VmState state() const { return state_.load(); }
  std::string Prometheus();

 private:
  Vm() = default;
  Status Init(VmOptions options, bool load_kernel);
  void MachineLoop();
  Status Post(std::function<Status()> fn);
  void SetState(VmState s) { state_.store(s); }
  Status DoPause();
  Status DoResume();

  VmOptions options_;
  std::unique_ptr<EventLoop> loop_;
  std::unique_ptr<Console> console_;
  std::unique_ptr<Board> board_;  // machine thread only (after Start)
  std::thread thread_;
  std::atomic<VmState> state_{VmState::kCreated};
  std::atomic<bool> stop_{false};
  int exit_code_ = 0;
  std::string error_;  // machine thread; copied under mu_ for Info
  uint64_t started_ns_ = 0;

  std::mutex mu_;
  std::deque<std::packaged_task<Status()>> commands_;  // GUARDED_BY(mu_)
};

}  // namespace ferry
