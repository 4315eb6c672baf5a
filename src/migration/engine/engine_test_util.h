// Test doubles for the migration engine's tests: a source VM with real memfd RAM, a real dirty
// log and a writer thread standing in for the guest; a destination that records what it got;
// a real IncomingMigration on a loopback port.
#pragma once

#include <cstring>
#include <deque>
#include <random>
#include <chrono>
#include <thread>

#include <fmt/format.h>

#include "common/clock.h"
#include "common/json.h"
#include "common/thread_annotations.h"
#include "memory/guest_memory.h"
#include "migration/engine/destination.h"
#include "migration/engine/source.h"

namespace ferry::migration::test {

// The engine sees a DirtyTracker; ferry-vmm adapts its DirtyLog the same way (vmm/migration.h).
class LogTracker final : public DirtyTracker {
 public:
  explicit LogTracker(DirtyLog* log) : log_(log) {}
  void Harvest(PageBitmap* dirty, PageBitmap* freed) override { log_->Harvest(dirty, freed); }
  uint64_t CountDirty() const override { return log_->CountDirty(); }
  bool WrittenSinceHarvest(uint64_t page) const override { return log_->IsDirty(page); }

 private:
  DirtyLog* log_;
};

constexpr uint64_t kRam = 16ull << 20;

// How the stand-in guest writes: 8 random bytes at a random offset of a random page (default),
// or a few bytes into text-like pages (compressible; re-sent pages make small deltas).
enum class Writes { kRandomWords, kTextEdits };

class FakeSource : public SourceVm {
 public:
  explicit FakeSource(Writes writes = Writes::kRandomWords, uint64_t hot_pages = 0) : writes_(writes), hot_pages_(hot_pages) {
    mem_ = std::move(*GuestMemory::Create(0x80000000, kRam));
    tracker_ = std::make_unique<LogTracker>(&mem_->dirty_log());
    std::mt19937_64 rng(1);
    // Half the pages non-zero, the rest never touched (holes) or explicitly zero.
    for (uint64_t p = 0; p < mem_->num_pages(); p += 2) {
      uint64_t v = rng();
      if (writes_ == Writes::kTextEdits) FillText(mem_->host() + p * 4096, v);
      else std::memcpy(mem_->host() + p * 4096 + (v % 4000), &v, 8);
    }
    StartWriter();
  }
  ~FakeSource() override { StopWriter(); }
  void set_write_delay_us(int us) { delay_us_ = us; }
  // Bursts: the writer writes for on_ms, then rests for off_ms, from now on (0, 0: steady).
  void set_bursts(int on_ms, int off_ms) {
    burst_t0_ns_ = NowNs();
    burst_off_ms_ = off_ms;
    burst_on_ms_ = on_ms;
  }
  // Whether the writer was (or is) in a writing phase at `ns`.
  bool OnPhaseAt(uint64_t ns) const {
    const int on = burst_on_ms_, off = burst_off_ms_;
    if (on + off == 0) return true;
    const uint64_t period = static_cast<uint64_t>(on + off) * 1'000'000;
    return (ns - burst_t0_ns_) % period < static_cast<uint64_t>(on) * 1'000'000;
  }
  uint64_t pause_ns() const { return pause_ns_; }

  RamView Ram() override { return {mem_->host(), mem_->size(), tracker_.get(), mem_->memfd(), {}}; }
  Result<nlohmann::json> Config() override { return nlohmann::json{{"ram", kRam}}; }
  Status Pause() override {
    pause_ns_ = NowNs();
    StopWriter();
    paused_ = true;
    return {};
  }
  Status Resume() override {
    paused_ = false;
    StartWriter();
    return {};
  }
  Result<std::vector<StateRecord>> SaveState() override {
    return std::vector<StateRecord>{{"vcpu:0", {1, 2, 3}}, {"dev:uart0", std::vector<uint8_t>(10000, 7)}};
  }
  uint64_t EstimateStateBytes() override { return 10003 + 6; }
  Status SetCpuShare(double f) override {
    cpu_share_ = f;
    return {};
  }
  void OnMigrated(const std::string&) override { migrated_ = true; }
  // 10 ms windows of pages newly dirtied and writes (as instructions), recorded by the writer.
  ActivitySeries RecentActivity(size_t max_windows) override {
    MutexLock l(act_mu_);
    ActivitySeries s;
    const size_t n = std::min(max_windows, windows_.size());
    s.windows.assign(windows_.end() - static_cast<std::ptrdiff_t>(n), windows_.end());
    return s;
  }

  GuestMemory& mem() { return *mem_; }
  bool paused() const { return paused_; }
  bool writer_running() const { return writer_.joinable(); }
  bool migrated() const { return migrated_; }
  double cpu_share() const { return cpu_share_; }
  static void FillText(uint8_t* page, uint64_t seed) {
    static const char* words[] = {"page ", "dirty ", "the ", "migration ", "copies ", "guest ", "memory\n", "42 ", "and ", "delta "};
    std::mt19937_64 r(seed);
    size_t at = 0;
    while (at < 4096) {
      const char* w = words[r() % 10];
      const size_t n = std::min<size_t>(std::strlen(w), 4096 - at);
      std::memcpy(page + at, w, n);
      at += n;
    }
  }

 private:
  void StartWriter() {
    stop_ = false;
    writer_ = std::thread([this] {
      std::mt19937_64 rng(7);
      uint64_t slice_start = NowNs();
      while (!stop_) {
        // The throttle, as a VMM applies it: run 1 ms, then stay off for as long as the share says.
        if (const double share = cpu_share_.load(); share < 1.0 && NowNs() - slice_start >= 1'000'000) {
          std::this_thread::sleep_for(std::chrono::nanoseconds(static_cast<uint64_t>((NowNs() - slice_start) * (1.0 / share - 1.0))));
          slice_start = NowNs();
        }
        RollWindows();
        if (!OnPhaseAt(NowNs())) {
          std::this_thread::sleep_for(std::chrono::microseconds(200));
          continue;
        }
        ++write_count_;
        uint64_t page = hot_pages_ && rng() % 10 != 0 ? rng() % hot_pages_ : rng() % mem_->num_pages();
        uint64_t v = rng();
        if (writes_ == Writes::kTextEdits) {
          page &= ~1ull;  // the text pages: a small edit of existing text
          const char edit[4] = {'E', 'D', static_cast<char>('a' + v % 26), ' '};
          (void)mem_->Write(mem_->base() + page * 4096 + (v % 4092), edit, 4);
        } else {
          (void)mem_->Write(mem_->base() + page * 4096 + (v % 4088), &v, 8);  // marks dirty
        }
        if (delay_us_) std::this_thread::sleep_for(std::chrono::microseconds(delay_us_));
      }
    });
  }
  // The writer closes the 10 ms windows that ended (empty ones included).
  void RollWindows() {
    const uint64_t now = NowNs();
    MutexLock l(act_mu_);
    if (win_start_ns_ == 0) {
      win_start_ns_ = now;
      win_dirty_ = mem_->dirty_log().NewlyDirtied();
      win_writes_ = write_count_;
    }
    while (now >= win_start_ns_ + 10'000'000) {
      const uint64_t dirty = mem_->dirty_log().NewlyDirtied(), writes = write_count_;
      windows_.push_back({win_start_ns_, dirty - win_dirty_, writes - win_writes_, 0, 0});
      if (windows_.size() > 512) windows_.pop_front();
      win_dirty_ = dirty;
      win_writes_ = writes;
      win_start_ns_ += 10'000'000;
    }
  }
  void StopWriter() {
    stop_ = true;
    if (writer_.joinable()) writer_.join();
  }
  const Writes writes_;
  const uint64_t hot_pages_;
  std::unique_ptr<GuestMemory> mem_;
  std::unique_ptr<LogTracker> tracker_;
  std::thread writer_;
  std::atomic<bool> stop_{false};
  std::atomic<int> delay_us_{20};
  std::atomic<int> burst_on_ms_{0}, burst_off_ms_{0};
  std::atomic<uint64_t> burst_t0_ns_{0}, pause_ns_{0}, write_count_{0};
  Mutex act_mu_;
  std::deque<ActivityWindow> windows_ GUARDED_BY(act_mu_);
  uint64_t win_start_ns_ GUARDED_BY(act_mu_) = 0, win_dirty_ GUARDED_BY(act_mu_) = 0, win_writes_ GUARDED_BY(act_mu_) = 0;
  bool paused_ = false, migrated_ = false;
  std::atomic<double> cpu_share_{1.0};
};

class FakeDestination : public DestinationVm {
 public:
  Result<RamView> Prepare(const nlohmann::json& config) override {
    // Read as the VMM reads CONFIG (BoardConfig::ApplyGuestJson): JSON integers in range only. A
    // float there (1.677e219) was undefined behaviour in nlohmann's get<uint64_t>(), found in this
    // double by fuzz_incoming_migration.
    auto ram = config.is_object() && config.contains("ram") ? JsonUint(config["ram"], "ram") : Result<uint64_t>(0);
    if (!ram) return std::unexpected(ram.error());
    if (*ram != kRam) return Errorf(ErrorCode::kInvalidArgument, "RAM size differs from this host's limit");
    mem_ = std::move(*GuestMemory::Create(0x80000000, kRam));
    return RamView{mem_->host(), mem_->size(), nullptr, mem_->memfd(), {}};
  }
  Status Restore(const std::vector<StateRecord>& state) override {
    state_ = state;
    return {};
  }
  Status Start() override {
    started_ = true;
    return {};
  }
  GuestMemory* mem() { return mem_.get(); }
  std::vector<StateRecord> state_;
  bool started_ = false;

 private:
  std::unique_ptr<GuestMemory> mem_;
};

// A destination whose "guest" reads every page of its RAM as soon as it starts, last page first
// (while a post-copy push runs from the first): it waits on missing pages, so demand faults happen.
class TouchingDestination : public FakeDestination {
 public:
  // pause: between two touches (a guest that reads its memory at a pace, so post-copy lasts).
  explicit TouchingDestination(std::chrono::microseconds pause = {}) : pause_(pause) {}
  ~TouchingDestination() override {
    if (toucher_.joinable()) toucher_.join();
  }
  Status Start() override {
    FakeDestination::Start();
    toucher_ = std::thread([this] {
      const volatile uint8_t* ram = mem()->host();
      for (uint64_t p = kRam / 4096; p-- > 0;) {
        (void)ram[p * 4096 + 17];
        if (pause_.count()) std::this_thread::sleep_for(pause_);
      }
    });
    return {};
  }

 private:
  const std::chrono::microseconds pause_;
  std::thread toucher_;
};

struct Incoming {
  std::unique_ptr<IncomingMigration> in;
  std::thread thread;
  Result<IncomingResult> result = std::unexpected(Error(ErrorCode::kInternal, "not run"));
  std::string to;
  explicit Incoming(DestinationVm* vm, IncomingParams params = {}) {
    in = std::move(*IncomingMigration::Listen("tcp:127.0.0.1:0"));
    to = fmt::format("tcp:127.0.0.1:{}", in->port());
    thread = std::thread([this, vm, params] { result = in->Run(vm, params); });
  }
  ~Incoming() {
    if (thread.joinable()) thread.join();
  }
};

inline SourceParams Params(const std::string& to) {
  SourceParams p;
  p.to = to;
  p.channels = 3;
  p.downtime_ms = 50;
  return p;
}

inline bool SameRam(FakeSource& src, FakeDestination& dst) {
  return std::memcmp(src.mem().host(), dst.mem()->host(), kRam) == 0;
}

}  // namespace ferry::migration::test
