#include "vmm/vm.h"

#include <openssl/evp.h>
#include <sys/epoll.h>
#include <time.h>
#include <unistd.h>

#include <memory>

#include <spdlog/spdlog.h>

#include "common/clock.h"
#include "machine/devices/virtio/virtio_factory.h"
#include "migration/protocol/wire.h"
#include "vmm/snapshot.h"

namespace ferry {
namespace {
// Device backends (TAP, console) are polled between slices while the guest is busy: 250k
// instructions is ~1-2 ms of guest time (1M gave a busy guest's echo an RTT p50 of 0.8 ms, this
// 0.3 ms; the extra epoll_wait per slice costs nothing measurable in cpubench).
constexpr uint64_t kSliceInstructions = 250'000;

// SHA-256 of all of `ram`: data extents (SEEK_DATA/SEEK_HOLE on the memfd) are read from the
// mapping, holes are fed as zeros so a never-written or discarded page costs no host memory.
Result<std::string> RamSha256(const GuestMemory& ram) {
  std::unique_ptr<EVP_MD_CTX, decltype(&EVP_MD_CTX_free)> ctx(EVP_MD_CTX_new(), EVP_MD_CTX_free);
  if (!ctx || EVP_DigestInit_ex(ctx.get(), EVP_sha256(), nullptr) != 1) return Errorf(ErrorCode::kInternal, "SHA-256 unavailable");
  static const std::vector<uint8_t> zeros(1 << 20, 0);
  auto feed = [&](const uint8_t* p, uint64_t n) { return EVP_DigestUpdate(ctx.get(), p, n) == 1; };
  auto feed_zeros = [&](uint64_t n) {
    for (; n > 0;) {
      const uint64_t k = std::min<uint64_t>(n, zeros.size());
      if (!feed(zeros.data(), k)) return false;
      n -= k;
    }
    return true;
  };
  const uint64_t size = ram.size();
  for (uint64_t at = 0; at < size;) {
    off_t data = lseek(ram.memfd(), static_cast<off_t>(at), SEEK_DATA);
    if (data < 0 && errno != ENXIO) return ErrnoError("memory digest: SEEK_DATA");
    const uint64_t d = data < 0 ? size : std::min<uint64_t>(static_cast<uint64_t>(data), size);
    if (!feed_zeros(d - at)) return Errorf(ErrorCode::kInternal, "SHA-256 update failed");
    if (d >= size) break;
    off_t hole = lseek(ram.memfd(), static_cast<off_t>(d), SEEK_HOLE);
    if (hole < 0) return ErrnoError("memory digest: SEEK_HOLE");
    const uint64_t h = std::min<uint64_t>(static_cast<uint64_t>(hole), size);
    if (!feed(ram.host() + d, h - d)) return Errorf(ErrorCode::kInternal, "SHA-256 update failed");
    at = h;
  }
  uint8_t md[EVP_MAX_MD_SIZE];
  unsigned len = 0;
  if (EVP_DigestFinal_ex(ctx.get(), md, &len) != 1) return Errorf(ErrorCode::kInternal, "SHA-256 final failed");
  std::string hex;
  for (unsigned i = 0; i < len; ++i) hex += fmt::format("{:02x}", md[i]);
  return hex;
}
}  // namespace

std::string_view VmStateName(VmState s) {
  switch (s) {
    case VmState::kCreated: return "created";
    case VmState::kRunning: return "running";
    case VmState::kPaused: return "paused";
    case VmState::kShutdown: return "shutdown";
    case VmState::kError: return "error";
    case VmState::kMigrated: return "migrated";
  }
  return "unknown";
}

Result<std::unique_ptr<Vm>> Vm::Create(VmOptions options) {
  std::unique_ptr<Vm> vm(new Vm());
  FERRY_RETURN_IF_ERROR(vm->Init(std::move(options), true), "create VM");
  return vm;
}

Status Vm::Init(VmOptions options, bool load_kernel) {
  options_ = std::move(options);
  if (options_.generation_id.empty()) options_.generation_id = migration::FormatUuid(migration::NewUuid());
  auto loop = EventLoop::Create();
  if (!loop) return std::unexpected(loop.error());
  loop_ = std::move(*loop);
  auto console = Console::Create(options_.console);
  if (!console) return std::unexpected(console.error());
  console_ = std::move(*console);
  Console* con = console_.get();
  options_.board.console_out = [con](std::span<const uint8_t> b) { con->Write(b); };
  options_.board.loop = loop_.get();
  auto board = Board::Create(options_.board, load_kernel);
  if (!board) return std::unexpected(board.error());
  board_ = std::move(*board);
  return console_->AttachInput(loop_.get(), &board_->uart());
}

Result<std::unique_ptr<Vm>> Vm::CreateIncoming(VmOptions options) {
  std::unique_ptr<Vm> vm(new Vm());
  FERRY_RETURN_IF_ERROR(vm->Init(std::move(options), false), "prepare VM for incoming migration");
  return vm;
}

Result<std::vector<migration::StateRecord>> Vm::SaveStateRecords() {
  std::vector<migration::StateRecord> out;
  auto s = Post([&]() -> Status {
    if (state() != VmState::kPaused) return Errorf(ErrorCode::kBusy, "state can only be saved while paused (state {})", VmStateName(state()));
    out.push_back({"vcpu:0", board_->vcpu().SaveState()});
    for (Device* d : board_->devices()) out.push_back({"dev:" + d->id(), d->SaveState()});
    return {};
  });
  if (!s) return std::unexpected(s.error());
  return out;
}

Status Vm::RestoreStateRecords(const std::vector<migration::StateRecord>& records) {
  if (thread_.joinable()) return Errorf(ErrorCode::kBusy, "cannot restore state into a started VM");
  const std::vector<uint8_t>* vcpu = nullptr;
  std::map<std::string, std::vector<uint8_t>> devices;
  for (const auto& r : records) {
    if (r.id == "vcpu:0") {
      if (vcpu) return Errorf(ErrorCode::kCorrupt, "state record vcpu:0 appears twice");
      vcpu = &r.blob;
    } else if (r.id.starts_with("dev:")) {
      if (!devices.emplace(r.id.substr(4), r.blob).second) return Errorf(ErrorCode::kCorrupt, "state record {} appears twice", r.id);
    } else {
      return Errorf(ErrorCode::kCorrupt, "unknown state record '{}' (this VMM has one hart)", r.id);
    }
  }
  if (!vcpu) return Errorf(ErrorCode::kCorrupt, "no vcpu:0 state record");
  FERRY_RETURN_IF_ERROR(board_->vcpu().RestoreState(*vcpu), "restore");
  FERRY_RETURN_IF_ERROR(board_->RestoreDevices(devices), "restore");
  board_->PostRestore();
  // Everything in RAM is new to this process: a following migration must send it all.
  board_->memory().dirty_log().MarkAll();
  return {};
}

Status Vm::MarkMigrated(const std::string& destination) {
  {
    MutexLock l(mu_);
    migrated_to_ = destination;
  }
  return Post([this]() -> Status {
    board_->clint().Pause();
    SetState(VmState::kMigrated);
    return {};
  });
}

Status Vm::AnnounceNetwork() {
  auto announce = [this]() -> Status {
    if (!board_->net_device()) return {};
    return AnnounceMac(board_->net_device());
  };
  if (!thread_.joinable()) return announce();  // not started: the caller's thread owns the board
  return Post(announce);
}

Result<std::unique_ptr<Vm>> Vm::Restore(VmOptions options, const std::string& snapshot_path) {
  std::unique_ptr<Vm> vm(new Vm());
  const bool new_identity = !options.generation_id.empty();
  auto make = [&](const nlohmann::json& config) -> Result<GuestMemory*> {
    auto s = options.board.ApplyGuestJson(config.value("board", nlohmann::json::object()));
    if (!s) return std::unexpected(s.error());
    s = vm->Init(options, false);
    if (!s) return std::unexpected(s.error());
    return &vm->board_->memory();
  };
  auto st = ReadSnapshot(snapshot_path, make);
  if (!st) return std::unexpected(st.error().WithContext("restore"));
  // The same VM continues (a clone was given its new identity by the caller).
  if (auto id = st->config.find("generation_id"); !new_identity && id != st->config.end() && id->is_string() && !id->get_ref<const std::string&>().empty())
    vm->options_.generation_id = id->get<std::string>();
  FERRY_RETURN_IF_ERROR(vm->board_->vcpu().RestoreState(st->vcpu), "restore");
  FERRY_RETURN_IF_ERROR(vm->board_->RestoreDevices(st->devices), "restore");
  vm->board_->PostRestore();
  // Everything in RAM is new to this process: a following migration must send it all.
  vm->board_->memory().dirty_log().MarkAll();
  return vm;
}

Vm::~Vm() {
  if (thread_.joinable()) {
    stop_.store(true);
    if (board_) board_->vcpu().RequestExit();
    loop_->Wake();
    thread_.join();
  }
}

Status Vm::Start(bool start_paused) {
  if (thread_.joinable()) return Errorf(ErrorCode::kBusy, "VM already started");
  started_ns_ = NowNs();
  if (start_paused) {
    board_->clint().Pause();
    SetState(VmState::kPaused);
  } else {
    SetState(VmState::kRunning);
  }
  thread_ = std::thread([this] { MachineLoop(); });
  return {};
}

int Vm::Wait() {
  if (thread_.joinable()) thread_.join();
  return exit_code_;
}

void Vm::RecordActivity(bool idle_after) {
  ActivityRecorder::Totals t;
  t.dirty_pages = board_->memory().dirty_log().NewlyDirtied();
  t.instructions = board_->vcpu().counters().instructions_retired;
  for (Device* d : io_devices_) {
    const DeviceActivity a = d->Activity();
    t.net_packets += a.packets;
    t.blk_requests += a.requests;
  }
  activity_.Record(NowNs(), t, idle_after);
}

void Vm::SampleDirtyRate(uint64_t now_ns) {
  if (now_ns - last_dirty_clear_ns_ < kDirtySampleNs) return;
  last_dirty_clear_ns_ = now_ns;
  // Refused while a migration owns the log: it harvests, and NewlyDirtied() counts anyway.
  (void)board_->memory().dirty_log().ClearWrittenUnlessClaimed();
}

migration::ActivitySeries Vm::RecentActivity(size_t max_windows) const { return activity_.Recent(max_windows, NowNs()); }

void Vm::MachineLoop() {
  Vcpu& vcpu = board_->vcpu();
  io_devices_ = board_->devices();
  // Frames that reached the TAP before the start (a migration destination: the guest's clients
  // switch to it at the announce, which precedes Start) are delivered before the first slice.
  if (state() == VmState::kRunning) (void)loop_->Poll(0);
  while (!stop_.load()) {
    // Commands from other threads.
    {
      MutexLock l(mu_);
      running_commands_.swap(commands_);
    }
    for (auto& c : running_commands_) c();
    running_commands_.clear();
    if (stop_.load()) break;

    if (state() != VmState::kRunning) {
      RecordActivity(true);
      console_->Flush();
      // Only wake-ups for commands: device backends (TAP rx, console input) must not
      // change guest memory or device state while paused (snapshot, migration).
      (void)loop_->WaitForWake(-1);
      continue;
    }
    const uint64_t t_slice = NowNs();
    SampleDirtyRate(t_slice);
    VcpuRunResult r = vcpu.Run(kSliceInstructions);
    RecordActivity(false);
    const double share = cpu_share_.load(std::memory_order_relaxed);
    if (share < 1.0) {
      // Throttled (migration): after running for t, stay off the CPU for t * (1 - share) / share,
      // still serving device backends and commands (a Post() wakes the loop).
      throttle_debt_ns_ += static_cast<double>(NowNs() - t_slice) * (1.0 - share) / share;
      if (throttle_debt_ns_ >= 1e6) {
        const uint64_t t_off = NowNs();
        (void)loop_->Poll(static_cast<int>(throttle_debt_ns_ / 1e6));
        throttle_debt_ns_ = std::max(0.0, throttle_debt_ns_ - static_cast<double>(NowNs() - t_off));
      }
    } else {
      throttle_debt_ns_ = 0;
    }
    (void)loop_->Poll(0);
    switch (r.reason) {
      case VcpuExitReason::kBudgetExhausted:
      case VcpuExitReason::kExitRequested:
        break;
      case VcpuExitReason::kWaitForInterrupt: {
        console_->Flush();
        uint64_t deadline = vcpu.NextTimerDeadline();
        uint64_t now = board_->clint().Ticks();
        int ms = 100;
        if (deadline != UINT64_MAX) {
          uint64_t ticks = deadline > now ? deadline - now : 0;
          ms = static_cast<int>(std::min<uint64_t>(100, (ticks + 9999) / 10000));
        }
        if (ms > 0) {
          RecordActivity(true);
          (void)loop_->Poll(ms);
        }
        break;
      }
      case VcpuExitReason::kShutdown:
        spdlog::info("vm: guest powered off");
        SetState(VmState::kShutdown);
        stop_.store(true);
        break;
      case VcpuExitReason::kReset:
        spdlog::warn("vm: guest requested a reset; treating it as power-off (reset is not supported)");
        SetState(VmState::kShutdown);
        stop_.store(true);
        break;
      case VcpuExitReason::kFatal:
      case VcpuExitReason::kHostTrap:
        spdlog::error("vm: vCPU stopped: {}", r.error);
        {
          MutexLock l(mu_);
          error_ = r.error;
        }
        board_->clint().Pause();
        SetState(VmState::kError);
        break;
    }
  }
  console_->Flush();
  // Fail commands that arrived after the loop ended.
  MutexLock l(mu_);
  for (auto& c : commands_) c();
  commands_.clear();
}

Status Vm::Post(std::function<Status()> fn) {
  std::packaged_task<Status()> task([this, fn = std::move(fn)]() -> Status {
    if (state() == VmState::kShutdown) return Errorf(ErrorCode::kBusy, "VM is shut down");
    return fn();
  });
  auto fut = task.get_future();
  {
    MutexLock l(mu_);
    if (!thread_.joinable() || (stop_.load() && state() == VmState::kShutdown))
      return Errorf(ErrorCode::kBusy, "VM is not running (state {})", VmStateName(state()));
    commands_.push_back(std::move(task));
  }
  board_->vcpu().RequestExit();
  loop_->Wake();
  return fut.get();
}

Result<uint64_t> Vm::StateBytes() {
  uint64_t n = 0;
  auto s = Post([&]() -> Status {
    n = board_->vcpu().SaveState().size();
    for (Device* d : board_->devices()) n += d->SaveState().size();
    return {};
  });
  if (!s) return std::unexpected(s.error());
  return n;
}

Status Vm::SetCpuShare(double fraction) {
  if (!(fraction > 0.0 && fraction <= 1.0))
    return Errorf(ErrorCode::kInvalidArgument, "CPU share {} is outside (0, 1]", fraction);
  cpu_share_.store(fraction, std::memory_order_relaxed);
  loop_->Wake();
  return {};
}

Status Vm::RunOnMachine(std::function<Status(Board&)> fn) {
  return Post([this, fn = std::move(fn)] { return fn(*board_); });
}

Status Vm::DoPause() {
  if (state() == VmState::kPaused) return {};
  if (state() != VmState::kRunning) return Errorf(ErrorCode::kBusy, "cannot pause a VM in state {}", VmStateName(state()));
  board_->clint().Pause();
  SetState(VmState::kPaused);
  return {};
}

Status Vm::DoResume() {
  if (state() == VmState::kRunning) return {};
  if (state() == VmState::kMigrated) {
    MutexLock l(mu_);
    return Errorf(ErrorCode::kBusy, "the VM was migrated to {}; this copy can never run again", migrated_to_);
  }
  if (state() != VmState::kPaused) return Errorf(ErrorCode::kBusy, "cannot resume a VM in state {}", VmStateName(state()));
  board_->clint().Resume();
  SetState(VmState::kRunning);
  return {};
}

Status Vm::Pause() { return Post([this] { return DoPause(); }); }
Status Vm::Resume() { return Post([this] { return DoResume(); }); }

Status Vm::Shutdown() {
  return Post([this] {
    SetState(VmState::kShutdown);
    stop_.store(true);
    return Status{};
  });
}

Status Vm::Snapshot(const std::string& path) {
  if (path.empty()) return Errorf(ErrorCode::kInvalidArgument, "snapshot path is empty");
  return Post([this, path]() -> Status {
    const bool was_running = state() == VmState::kRunning;
    if (state() != VmState::kRunning && state() != VmState::kPaused)
      return Errorf(ErrorCode::kBusy, "cannot snapshot a VM in state {}", VmStateName(state()));
    FERRY_RETURN_IF_ERROR(DoPause(), "snapshot");
    SnapshotState st;
    st.config = {{"board", board_->config().GuestJson()}, {"vmm", "ferry-vmm"}, {"generation_id", options_.generation_id}};
    st.vcpu = board_->vcpu().SaveState();
    for (Device* d : board_->devices()) st.devices[d->id()] = d->SaveState();
    auto s = WriteSnapshot(path, st, board_->memory());
    if (was_running) (void)DoResume();
    return s;
  });
}

Result<nlohmann::json> Vm::MemoryDigest() {
  nlohmann::json out;
  auto s = Post([&]() -> Status {
    if (state() != VmState::kPaused && state() != VmState::kMigrated)
      return Errorf(ErrorCode::kBusy, "memory digest of a VM in state {}: pause it first (RAM changes while the guest runs)",
                    VmStateName(state()));
    auto sha = RamSha256(board_->memory());
    if (!sha) return std::unexpected(sha.error());
    out = {{"algorithm", "sha256"}, {"sha256", *sha}, {"ram_bytes", board_->memory().size()}, {"state", VmStateName(state())}};
    return {};
  });
  if (!s) return std::unexpected(s.error());
  return out;
}

Result<nlohmann::json> Vm::Info() {
  nlohmann::json info;
  auto s = Post([&]() -> Status {
    VcpuCounters c = board_->vcpu().counters();
    nlohmann::json devices = nlohmann::json::object();
    for (Device* d : board_->devices()) devices[d->id()] = d->Metrics();
    auto& mem = board_->memory();
    info = {
        {"state", VmStateName(state())},
        {"generation_id", options_.generation_id},
        {"config", board_->config().GuestJson()},
        {"uptime_s", static_cast<double>(NowNs() - started_ns_) / 1e9},
        {"guest_time_ticks", board_->clint().Ticks()},
        {"counters",
         {{"instructions", c.instructions_retired}, {"exceptions", c.exceptions}, {"interrupts", c.interrupts},
          {"tlb_misses", c.tlb_misses}, {"mmio_accesses", c.mmio_accesses}, {"wfi_exits", c.wfi_exits},
          {"dirty_pages", mem.dirty_log().CountDirty()}, {"dirty_pages_total", mem.dirty_log().NewlyDirtied()},
          {"unhandled_mmio", board_->bus().unhandled_accesses()}}},
        {"devices", devices},
    };
    if (!board_->config().tap.empty()) info["config"]["tap"] = board_->config().tap;
    {
      MutexLock l(mu_);
      if (!error_.empty()) info["error"] = error_;
      if (!migrated_to_.empty()) info["migrated_to"] = migrated_to_;
    }
    return {};
  });
  if (!s) return std::unexpected(s.error());
  return info;
}

void Vm::Halt(const std::string& reason) {
  {
    MutexLock l(mu_);
    error_ = reason;
  }
  // The machine loop runs the vCPU only in state kRunning and checks it before every slice.
  SetState(VmState::kError);
  board_->vcpu().RequestExit();
  loop_->Wake();
}

std::string Vm::Prometheus() {
  auto info = Info();
  if (!info) return "";
  std::string out;
  const auto& c = (*info)["counters"];
  auto metric = [&](const char* name, const char* type, const char* help, double v) {
    out += fmt::format("# HELP {} {}\n# TYPE {} {}\n{} {}\n", name, help, name, type, name, v);
  };
  metric("ferry_vm_running", "gauge", "1 if the VM is running", (*info)["state"] == "running" ? 1 : 0);
  metric("ferry_vcpu_instructions_total", "counter", "Guest instructions retired", c["instructions"].get<double>());
  metric("ferry_vcpu_exceptions_total", "counter", "Guest exceptions taken", c["exceptions"].get<double>());
  metric("ferry_vcpu_interrupts_total", "counter", "Guest interrupts taken", c["interrupts"].get<double>());
  metric("ferry_vm_dirty_pages", "gauge", "Pages marked dirty since the last harvest", c["dirty_pages"].get<double>());
  metric("ferry_vm_dirty_pages_total", "counter",
         "Pages newly dirtied: a page counts again once the log was cleared (harvest, or the 1 s dirty-rate sample)",
         c["dirty_pages_total"].get<double>());
  return out;
}

}  // namespace ferry
