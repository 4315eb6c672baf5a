// The fault matrix (docs/reliability.md) at the engine level, over real loopback sockets with the
// engine's test doubles: cancel in every MigrationStatus, the commit point (a connection lost right
// after GO), and connections cut or stalled in each phase. Every fault is triggered from a hook at
// the point it targets (a test double that stops until the test lets it go), never after a fixed
// sleep. Every test ends with exactly one running copy: either the source (then a second migration
// of it completes and its RAM compares equal page by page) or the destination (its RAM compares
// equal to the paused source's).
#include <gtest/gtest.h>

#include <condition_variable>
#include <functional>

#include "common/crc32c.h"
#include "common/thread_annotations.h"
#include "migration/engine/engine_test_relay.h"
#include "migration/engine/engine_test_util.h"

namespace ferry::migration {
namespace {
using namespace ferry::migration::test;
using namespace std::chrono_literals;

// A point in the engine's run where a test double stops until the test opens it. Unarmed, Pass()
// returns at once.
class Gate {
 public:
  void Arm() {
    MutexLock l(mu_);
    armed_ = true;
    reached_ = false;
    open_ = false;
  }
  // Called by the double at its point.
  void Pass() {
    MutexLock l(mu_);
    if (!armed_) return;
    armed_ = false;
    reached_ = true;
    cv_.notify_all();
    while (!open_) l.Wait(cv_);
  }
  bool WaitReached(std::chrono::milliseconds timeout) {
    const auto end = std::chrono::steady_clock::now() + timeout;
    MutexLock l(mu_);
    while (!reached_)
      if (l.WaitUntil(cv_, end) == std::cv_status::timeout) return reached_;
    return true;
  }
  void Open() {
    MutexLock l(mu_);
    open_ = true;
    cv_.notify_all();
  }

 private:
  Mutex mu_;
  std::condition_variable cv_;
  bool armed_ GUARDED_BY(mu_) = false;
  bool reached_ GUARDED_BY(mu_) = false;
  bool open_ GUARDED_BY(mu_) = false;
};

// The source with hooks: right after the VM paused for the stop-and-copy (before the final pages)
// and when its state is saved (every final page sent, before STATE and END).
class HookedSource : public FakeSource {
 public:
  Status Pause() override {
    auto s = FakeSource::Pause();
    pause_gate.Pass();
    return s;
  }
  Result<std::vector<StateRecord>> SaveState() override {
    if (on_save_state) on_save_state();
    state_gate.Pass();
    return FakeSource::SaveState();
  }
  uint32_t RamCrc() { return Crc32c(mem().host(), kRam); }
  Gate pause_gate, state_gate;
  std::function<void()> on_save_state;
};

// The destination with hooks: when CONFIG arrives (the source is in kSetup), when the state is
// restored (every page record applied, before READY) and right after GO started the guest (before
// RESUMED goes out).
class HookedDestination : public TouchingDestination {
 public:
  using TouchingDestination::TouchingDestination;
  Result<RamView> Prepare(const nlohmann::json& config) override {
    prepare_gate.Pass();
    return TouchingDestination::Prepare(config);
  }
  Status Restore(const std::vector<StateRecord>& state) override {
    Run(/*restore=*/true);
    return TouchingDestination::Restore(state);
  }
  Status Start() override {
    auto s = TouchingDestination::Start();
    Run(/*restore=*/false);
    return s;
  }
  // The hooks are set while the destination already waits on its own thread.
  void OnRestore(std::function<void()> f) {
    MutexLock l(mu_);
    on_restore_ = std::move(f);
  }
  void OnStart(std::function<void()> f) {
    MutexLock l(mu_);
    on_start_ = std::move(f);
  }
  Gate prepare_gate;

 private:
  void Run(bool restore) {
    std::function<void()> f;
    {
      MutexLock l(mu_);
      f = restore ? on_restore_ : on_start_;
    }
    if (f) f();
  }
  Mutex mu_;
  std::function<void()> on_restore_ GUARDED_BY(mu_), on_start_ GUARDED_BY(mu_);
};

bool WaitStatus(SourceMigration& m, MigrationStatus want, std::chrono::milliseconds timeout) {
  const auto end = std::chrono::steady_clock::now() + timeout;
  while (m.status() != want && !IsFinal(m.status()) && std::chrono::steady_clock::now() < end) std::this_thread::sleep_for(2ms);
  return m.status() == want;
}

// The source VM is the one running copy: running, not migrated, and a fresh migration of it
// completes with every page equal.
void ExpectSourceRunsAndMigratesCleanly(HookedSource& src) {
  EXPECT_FALSE(src.paused());
  EXPECT_TRUE(src.writer_running()) << "the stand-in guest was not resumed";
  EXPECT_FALSE(src.migrated());
  FakeDestination dst;
  Incoming in(&dst);
  auto m = SourceMigration::Start(&src, Params(in.to));
  m->Wait();
  in.thread.join();
  ASSERT_EQ(m->status(), MigrationStatus::kCompleted) << m->Stats().dump(2);
  EXPECT_TRUE(SameRam(src, dst)) << "destination RAM differs after the fault";
}

// The destination runs the one copy: the source is paused for good and the RAM is the same.
void ExpectDestinationRunsTheOnlyCopy(HookedSource& src, FakeDestination& dst, Incoming& in) {
  ASSERT_TRUE(in.result) << in.result.error().message();
  EXPECT_TRUE(dst.started_);
  EXPECT_TRUE(src.paused());
  EXPECT_FALSE(src.writer_running());
  EXPECT_TRUE(SameRam(src, dst)) << "destination RAM differs";
}

void ExpectRefused(SourceMigration& m, const std::string& why) {
  auto c = m.Cancel();
  ASSERT_FALSE(c) << "cancel in status " << MigrationStatusName(m.status()) << " was accepted";
  EXPECT_EQ(c.error().code(), ErrorCode::kBusy);
  EXPECT_NE(c.error().message().find(why), std::string::npos) << c.error().message();
}

// A cancel before GO: accepted; the source ends cancelled and runs; the destination discards.
void ExpectCancelledBeforeGo(SourceMigration& m, HookedSource& src, HookedDestination& dst, Incoming& in) {
  m.Wait();
  in.thread.join();
  EXPECT_EQ(m.status(), MigrationStatus::kCancelled) << m.Stats().dump(2);
  ASSERT_FALSE(in.result) << "the destination completed a cancelled migration";
  EXPECT_FALSE(dst.started_);
  ExpectSourceRunsAndMigratesCleanly(src);
}

// The commit point: the connection is lost right after the destination got GO (its Start hook
// cuts every connection before RESUMED goes out). Leaves `m` in kFailedUnknown.
std::unique_ptr<SourceMigration> LoseTheConnectionAfterGo(HookedSource& src, HookedDestination& dst, Relay& relay) {
  dst.OnStart([&] { relay.Cut(); });
  auto p = Params(relay.to());
  p.mode = MigrationMode::kPrecopy;
  return SourceMigration::Start(&src, p);
}

// Drives a migration into `status` and cancels it there. Every status has a case (the switch has
// no default: a new status does not compile until it is given one here).
void CancelIn(MigrationStatus status) {
  SCOPED_TRACE(std::string(MigrationStatusName(status)));
  HookedSource src;
  HookedDestination dst(std::chrono::microseconds(500));
  IncomingParams ip;
  ip.recover_timeout_ms = 20000;
  Incoming in(&dst, ip);
  Relay relay(in.in->port());
  auto p = Params(relay.to());
  p.mode = MigrationMode::kPrecopy;
  switch (status) {
    case MigrationStatus::kSetup: {
      // CONFIG is at the destination, CONFIG_ACK not yet back.
      dst.prepare_gate.Arm();
      auto m = SourceMigration::Start(&src, p);
      ASSERT_TRUE(dst.prepare_gate.WaitReached(10s));
      ASSERT_EQ(m->status(), MigrationStatus::kSetup);
      ASSERT_TRUE(m->Cancel());
      dst.prepare_gate.Open();
      ExpectCancelledBeforeGo(*m, src, dst, in);
      return;
    }
    case MigrationStatus::kActive: {
      p.max_bandwidth = 2 << 20;  // the first pass takes seconds
      p.compress = *ParseCompressMode("none");
      auto m = SourceMigration::Start(&src, p);
      ASSERT_TRUE(WaitStatus(*m, MigrationStatus::kActive, 10s));
      while (m->Stats()["normal_pages"].get<uint64_t>() == 0 && m->status() == MigrationStatus::kActive) std::this_thread::sleep_for(2ms);
      ASSERT_EQ(m->status(), MigrationStatus::kActive);
      ASSERT_TRUE(m->Cancel());
      ExpectCancelledBeforeGo(*m, src, dst, in);
      return;
    }
    case MigrationStatus::kDevice: {
      // Twice, each with a fresh source: during the final page copy (the VM just paused) and
      // with the state saved (every final page sent).
      for (const bool at_state : {false, true}) {
        SCOPED_TRACE(at_state ? "state saved" : "final page copy");
        HookedSource s;
        HookedDestination d;
        Incoming i(&d);
        Gate& g = at_state ? s.state_gate : s.pause_gate;
        g.Arm();
        auto q = Params(i.to);
        q.mode = MigrationMode::kPrecopy;
        auto m = SourceMigration::Start(&s, q);
        ASSERT_TRUE(g.WaitReached(30s)) << m->Stats().dump(2);
        ASSERT_EQ(m->status(), MigrationStatus::kDevice);
        ASSERT_TRUE(s.paused());
        ASSERT_TRUE(m->Cancel());
        g.Open();
        ExpectCancelledBeforeGo(*m, s, d, i);
      }
      in.in->Abort();  // the outer destination never saw a source: end it
      return;
    }
    case MigrationStatus::kPostcopy:
    case MigrationStatus::kPostcopyPaused: {
      p.mode = MigrationMode::kPostcopy;
      p.max_bandwidth = 4 << 20;  // a post-copy push of seconds
      p.compress = *ParseCompressMode("none");
      p.recover_timeout_ms = 20000;
      src.set_write_delay_us(0);
      auto m = SourceMigration::Start(&src, p);
      ASSERT_TRUE(WaitStatus(*m, MigrationStatus::kPostcopy, 30s)) << m->Stats().dump(2);
      if (status == MigrationStatus::kPostcopyPaused) {
        relay.Refuse(true);  // the reconnect fails until the test lets it through
        EXPECT_GT(relay.Cut(), 0);
        ASSERT_TRUE(WaitStatus(*m, MigrationStatus::kPostcopyPaused, 10s)) << m->Stats().dump(2);
      }
      ExpectRefused(*m, "commit point");
      if (status == MigrationStatus::kPostcopyPaused) {
        EXPECT_EQ(m->status(), status) << "the refused cancel changed the status";
      }
      relay.Refuse(false);
      m->Wait();
      in.thread.join();
      ASSERT_EQ(m->status(), MigrationStatus::kCompleted) << m->Stats().dump(2);
      EXPECT_TRUE(src.migrated());
      ExpectDestinationRunsTheOnlyCopy(src, dst, in);
      return;
    }
    case MigrationStatus::kCompleted: {
      auto m = SourceMigration::Start(&src, p);
      m->Wait();
      in.thread.join();
      ASSERT_EQ(m->status(), MigrationStatus::kCompleted) << m->Stats().dump(2);
      ExpectRefused(*m, "already completed");
      EXPECT_TRUE(src.migrated());
      ExpectDestinationRunsTheOnlyCopy(src, dst, in);
      return;
    }
    case MigrationStatus::kFailed: {
      relay.Refuse(true);  // nothing gets through: the handshake fails
      p.connect_timeout_ms = 500;
      auto m = SourceMigration::Start(&src, p);
      m->Wait();
      ASSERT_EQ(m->status(), MigrationStatus::kFailed) << m->Stats().dump(2);
      ExpectRefused(*m, "already failed");
      in.in->Abort();
      in.thread.join();
      ExpectSourceRunsAndMigratesCleanly(src);
      return;
    }
    case MigrationStatus::kCancelled: {
      auto m = SourceMigration::Start(&src, p);
      ASSERT_TRUE(m->Cancel());
      m->Wait();
      in.in->Abort();
      in.thread.join();
      ASSERT_EQ(m->status(), MigrationStatus::kCancelled) << m->Stats().dump(2);
      EXPECT_FALSE(in.result);
      ExpectRefused(*m, "already cancelled");
      ExpectSourceRunsAndMigratesCleanly(src);
      return;
    }
    case MigrationStatus::kFailedUnknown: {
      auto m = LoseTheConnectionAfterGo(src, dst, relay);
      m->Wait();
      in.thread.join();
      ASSERT_EQ(m->status(), MigrationStatus::kFailedUnknown) << m->Stats().dump(2);
      ExpectRefused(*m, "already failed-unknown");
      EXPECT_FALSE(src.migrated());
      ExpectDestinationRunsTheOnlyCopy(src, dst, in);
      return;
    }
  }
  FAIL() << "no case for status " << static_cast<int>(status);
}

// Every status, enumerated through MigrationStatusName (which names each one; "?" past the last).
TEST(MigrationFaults, CancelInEveryStatus) {
  int n = 0;
  for (int i = 0; MigrationStatusName(static_cast<MigrationStatus>(i)) != "?"; ++i, ++n) CancelIn(static_cast<MigrationStatus>(i));
  EXPECT_EQ(n, static_cast<int>(MigrationStatus::kFailedUnknown) + 1);
}

// GO is the commit point: the connection lost right after it leaves the source paused in
// failed-unknown (it cannot know whether the destination runs the guest - here it does), never
// resumed on its own, its RAM untouched.
TEST(MigrationFaults, ConnectionLostRightAfterGoLeavesTheSourcePausedInFailedUnknown) {
  HookedSource src;
  HookedDestination dst;
  Incoming in(&dst);
  Relay relay(in.in->port());
  auto m = LoseTheConnectionAfterGo(src, dst, relay);
  m->Wait();
  in.thread.join();
  const auto st = m->Stats();
  ASSERT_EQ(m->status(), MigrationStatus::kFailedUnknown) << st.dump(2);
  EXPECT_EQ(st["status"], "failed-unknown");
  EXPECT_NE(st.value("error", "").find("RESUMED"), std::string::npos) << st.dump(2);
  const uint32_t crc = src.RamCrc();
  // Whatever time passes, the source does not resume by itself and its RAM stays as it was.
  std::this_thread::sleep_for(300ms);
  EXPECT_TRUE(src.paused());
  EXPECT_FALSE(src.writer_running());
  EXPECT_EQ(src.RamCrc(), crc);
  ExpectDestinationRunsTheOnlyCopy(src, dst, in);
}

// Cut in the setup: CONFIG reached the destination, then every connection is cut.
TEST(MigrationFaults, CutDuringSetupLeavesTheSourceRunning) {
  HookedSource src;
  HookedDestination dst;
  Incoming in(&dst);
  Relay relay(in.in->port());
  dst.prepare_gate.Arm();
  auto m = SourceMigration::Start(&src, Params(relay.to()));
  ASSERT_TRUE(dst.prepare_gate.WaitReached(10s));
  EXPECT_EQ(m->status(), MigrationStatus::kSetup);
  EXPECT_GT(relay.Cut(), 0);
  dst.prepare_gate.Open();
  m->Wait();
  in.thread.join();
  EXPECT_EQ(m->status(), MigrationStatus::kFailed) << m->Stats().dump(2);
  EXPECT_FALSE(in.result);
  EXPECT_FALSE(dst.started_);
  ExpectSourceRunsAndMigratesCleanly(src);
}

// Stalled in the setup: a destination that accepts and never answers HELLO. The source gives up
// within twice connect_timeout_ms (connect, then HELLO_ACK) and keeps running.
TEST(MigrationFaults, StalledSetupFailsWithinTheConnectTimeout) {
  HookedSource src;
  auto mute = std::move(*Listener::Listen(*ParseEndpoint("tcp:127.0.0.1:0")));
  auto p = Params(fmt::format("tcp:127.0.0.1:{}", mute->port()));
  p.connect_timeout_ms = 400;
  const auto t0 = std::chrono::steady_clock::now();
  auto m = SourceMigration::Start(&src, p);
  m->Wait();
  const double ms = std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
  EXPECT_EQ(m->status(), MigrationStatus::kFailed) << m->Stats().dump(2);
  EXPECT_NE(m->Stats().value("error", "").find("handshake"), std::string::npos) << m->Stats().dump(2);
  EXPECT_GE(ms, 800 * 0.9);
  EXPECT_LT(ms, 800 + 1000) << "the source waited well past 2 x connect_timeout_ms";
  ExpectSourceRunsAndMigratesCleanly(src);
}

// Cut in the stop-and-copy: the final pages are sent and the state saved (the source is paused);
// every connection is cut before STATE and END. The source resumes.
TEST(MigrationFaults, CutDuringStopAndCopyResumesTheSource) {
  HookedSource src;
  HookedDestination dst;
  Incoming in(&dst);
  Relay relay(in.in->port());
  MigrationStatus at_cut = MigrationStatus::kSetup;  // written by the migration thread, read after Wait()
  std::atomic<SourceMigration*> running{nullptr};
  src.on_save_state = [&] {
    if (SourceMigration* r = running.load()) at_cut = r->status();
    relay.Cut();
  };
  auto p = Params(relay.to());
  p.mode = MigrationMode::kPrecopy;
  auto m = SourceMigration::Start(&src, p);
  running.store(m.get());
  m->Wait();
  in.thread.join();
  src.on_save_state = nullptr;
  EXPECT_EQ(at_cut, MigrationStatus::kDevice);
  EXPECT_EQ(m->status(), MigrationStatus::kFailed) << m->Stats().dump(2);
  EXPECT_FALSE(in.result);
  EXPECT_FALSE(dst.started_);
  ExpectSourceRunsAndMigratesCleanly(src);
}


// Stalled in the rounds: the destination (here the relay) stops reading while the source sends
// its first pass. The guest keeps running all along (a stall before the pause costs no
// downtime), and the migration fails on its own within the stall bound once the windows close
// (TCP_USER_TIMEOUT at stall_timeout_ms also ends a connection whose window stays shut).
TEST(MigrationFaults, StalledRoundsKeepTheSourceRunningAndFailWithinTheStallBound) {
  HookedSource src;
  HookedDestination dst;
  Incoming in(&dst);
  Relay relay(in.in->port());
  auto p = Params(relay.to());
  p.max_bandwidth = 2 << 20;  // the first pass takes seconds
  p.compress = *ParseCompressMode("none");
  p.stall_timeout_ms = 2000;
  auto m = SourceMigration::Start(&src, p);
  ASSERT_TRUE(WaitStatus(*m, MigrationStatus::kActive, 10s));
  while (m->Stats()["normal_pages"].get<uint64_t>() == 0 && m->status() == MigrationStatus::kActive) std::this_thread::sleep_for(2ms);
  ASSERT_EQ(m->status(), MigrationStatus::kActive);
  relay.Freeze(true);
  const auto t0 = std::chrono::steady_clock::now();
  bool ran_throughout = true;
  while (!IsFinal(m->status()) && std::chrono::steady_clock::now() - t0 < 30s) {
    ran_throughout = ran_throughout && !src.paused();
    std::this_thread::sleep_for(5ms);
  }
  const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  std::printf("stalled rounds: %s after %.2f s (%s)\n", std::string(MigrationStatusName(m->status())).c_str(), s,
              m->Stats().value("error", "").c_str());
  EXPECT_TRUE(ran_throughout) << "the source paused while the destination stalled in the rounds";
  EXPECT_EQ(m->status(), MigrationStatus::kFailed) << m->Stats().dump(2);
  EXPECT_LT(s, 2.0 + 1.0 + 5.0) << "stall_timeout_ms is 2 s (the windows take a moment to close)";
  relay.Freeze(false);
  relay.Cut();
  in.in->Abort();
  m->Wait();
  in.thread.join();
  ExpectSourceRunsAndMigratesCleanly(src);
}


// Stalled in the stop-and-copy: the destination (here the relay) stops reading just as the source
// pauses, and the final pass is bigger than the connection's buffers, so the sender blocks on a shut
// window while its TCP still answers the window probes. The source's stall guard cuts the
// connections after stall_timeout_ms without anything acknowledged and the source resumes, with
// the cause named. (On Linux >= 5.11 TCP_USER_TIMEOUT, set to the same bound, also ends a window
// shut that long, as "Connection timed out" - older kernels keep such a connection open as long
// as the probes are answered; the guard does not depend on the kernel or on which connection
// blocks. Without the guard this test fails on the error it expects.)
TEST(MigrationFaults, StalledStopAndCopyResumesTheSourceWithinTheStallBound) {
  HookedSource src;
  HookedDestination dst;
  Incoming in(&dst);
  Relay relay(in.in->port());
  auto p = Params(relay.to());
  p.mode = MigrationMode::kPrecopy;
  p.channels = 1;
  p.compress = *ParseCompressMode("none");
  p.stall_timeout_ms = 1000;
  src.pause_gate.Arm();
  auto m = SourceMigration::Start(&src, p);
  ASSERT_TRUE(src.pause_gate.WaitReached(60s)) << m->Stats().dump(2);
  relay.Freeze(true);
  {  // every page dirty and incompressible: the final pass is all of RAM, more than the buffers hold
    std::mt19937_64 rng(7);
    std::vector<uint64_t> page(kWirePageSize / 8);
    for (uint64_t off = 0; off < kRam; off += kWirePageSize) {
      for (auto& w : page) w = rng();
      ASSERT_TRUE(src.mem().Write(src.mem().base() + off, page.data(), kWirePageSize));
    }
  }
  const auto t0 = std::chrono::steady_clock::now();
  src.pause_gate.Open();
  while (!IsFinal(m->status()) && std::chrono::steady_clock::now() - t0 < 20s) std::this_thread::sleep_for(5ms);
  const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  std::printf("stalled stop-and-copy: %s after %.2f s (%s)\n", std::string(MigrationStatusName(m->status())).c_str(), s,
              m->Stats().value("error", "").c_str());
  EXPECT_EQ(m->status(), MigrationStatus::kFailed) << m->Stats().dump(2);
  EXPECT_NE(m->Stats().value("error", "").find("stop-and-copy made no progress"), std::string::npos) << m->Stats().dump(2);
  EXPECT_LT(s, 1.0 + 1.5) << "stall_timeout_ms is 1 s";
  EXPECT_FALSE(src.paused()) << "the source must run again";
  relay.Freeze(false);
  relay.Cut();
  in.in->Abort();
  m->Wait();
  in.thread.join();
  EXPECT_FALSE(dst.started_);
  ExpectSourceRunsAndMigratesCleanly(src);
}

// The data connections close once every page record is applied (END met, the destination sealed),
// before GO: they have nothing more to carry, so the migration completes on the control
// connection. (The destination used to fail on the first data channel's EOF, racing the GO that a
// source losing its connections right after GO had sent: then neither copy ran.)
TEST(MigrationFaults, DataChannelsClosingAfterEndDoNotUndoTheMigration) {
  HookedSource src;
  HookedDestination dst;
  Incoming in(&dst);
  Relay relay(in.in->port());
  int cut = 0;
  dst.OnRestore([&] {
    cut = relay.CutAllButFirst();
    std::this_thread::sleep_for(100ms);  // held in the restore: the data readers see their EOF now
  });
  auto p = Params(relay.to());
  p.mode = MigrationMode::kPrecopy;
  auto m = SourceMigration::Start(&src, p);
  m->Wait();
  in.thread.join();
  EXPECT_EQ(cut, 3) << "the data connections";
  ASSERT_EQ(m->status(), MigrationStatus::kCompleted) << m->Stats().dump(2);
  EXPECT_TRUE(src.migrated());
  ExpectDestinationRunsTheOnlyCopy(src, dst, in);
}

// An operator's cancel while the destination waits for the page records END announced ends it at
// once, also when no data connection exists (whose shutdown used to be the only wake-up: the wait
// ran to the idle timeout, 120 s by default).
TEST(MigrationFaults, AbortWhileWaitingForEndsRecordsEndsTheDestinationAtOnce) {
  FakeDestination dst;
  IncomingParams params;
  params.idle_timeout_ms = 30000;
  Incoming in(&dst, params);
  auto ctl = Socket::Connect(*ParseEndpoint(in.to), 2000);
  ASSERT_TRUE(ctl) << ctl.error().message();
  const Uuid uuid{1, 2, 3};
  ASSERT_TRUE(WritePreamble(**ctl, Role::kControl));
  ASSERT_TRUE(WriteRecord(**ctl, RecordType::kHello, Encode(Hello{uuid, kCapsSupported & ~kCapPostcopy, 1, kWirePageSize})));
  ASSERT_TRUE(WriteRecord(**ctl, RecordType::kConfig, EncodeConfig(nlohmann::json{{"ram", kRam}})));
  ASSERT_TRUE(WriteRecord(**ctl, RecordType::kEnd, Encode(End{1, 1})));  // a record no data connection brings
  ASSERT_TRUE(ReadRecord(**ctl, 5000)) << "HELLO_ACK";
  ASSERT_TRUE(ReadRecord(**ctl, 5000)) << "CONFIG_ACK";
  std::this_thread::sleep_for(200ms);  // END read: the control loop waits for the record
  const uint64_t t0 = NowNs();
  in.in->Abort();
  in.thread.join();
  const double ms = MsFromNs(NowNs() - t0);
  ASSERT_FALSE(in.result);
  EXPECT_EQ(in.result.error().code(), ErrorCode::kCancelled) << in.result.error().message();
  EXPECT_LT(ms, 5000) << "Abort() waited for the idle timeout";
  EXPECT_EQ(in.in->phase(), IncomingPhase::kCancelled);
}

}  // namespace
}  // namespace ferry::migration
