#include "migration/engine/source.h"

#include <unistd.h>

#include <algorithm>

#include <spdlog/spdlog.h>

#include "common/clock.h"
#include "migration/engine/incoming_stats.h"

namespace ferry::migration {
namespace {

// v2 batches: at most this many pages read per record (512 KiB of body before the codec) and a
// margin below the entry limit; v1 records hold at most kMaxPagesPerRecord pages of any kind.
constexpr uint32_t kBatchScanPages = 128, kMinBatchScanPages = 16;
constexpr uint32_t kBatchEntries = kMaxEncodedEntries - 8;
// Dirty-log samples inside a long pass (layering's history).
constexpr uint64_t kSampleIntervalNs = 100'000'000;
// Before round 0 (layering): a first look, then the rest of the warm-up if the guest writes.
constexpr uint64_t kWarmupFirstNs = 20'000'000, kWarmupNs = 100'000'000;
constexpr double kWarmupMinPagesPerS = 1000;
// The watch: one look per activity window, the history the policy judges by.
constexpr uint64_t kWatchTickNs = static_cast<uint64_t>(kActivityWindowMs * 1e6);
// The watch's looks send few pages; their rate says something about the link only past this.
constexpr uint64_t kMinWatchRateBytes = 256 << 10;
// Windows of activity kept in the stop record (stats "stop").
constexpr size_t kStopActivityWindows = 20;

// Pages of a memfd that were never written (holes) read as zero: no need to touch them.
PageBitmap HoleMap(int fd, uint64_t size) {
  PageBitmap hole((size / kWirePageSize + 63) / 64, 0);
  if (fd < 0) return hole;
  auto mark = [&](uint64_t from, uint64_t to) {
    for (uint64_t p = (from + kWirePageSize - 1) / kWirePageSize; p < to / kWirePageSize && p < size / kWirePageSize; ++p) SetPage(hole, p);
  };
  off_t off = 0;
  while (static_cast<uint64_t>(off) < size) {
    off_t data = lseek(fd, off, SEEK_DATA);
    if (data < 0) {  // ENXIO: only a hole remains (or SEEK_DATA unsupported: mark nothing)
      if (errno == ENXIO) mark(static_cast<uint64_t>(off), size);
      break;
    }
    mark(static_cast<uint64_t>(off), static_cast<uint64_t>(data));
    off_t h = lseek(fd, data, SEEK_HOLE);
    if (h < 0) break;
    off = h;
  }
  return hole;
}

nlohmann::json CapNames(uint64_t caps) { return CapabilityNames(caps); }

// What a pass (or the watch) sent by encoding, for its history entry: `t` now, `before` at its start.
nlohmann::json SentSince(const EncodeTally& t, const EncodeTally& before) {
  return {{"resent_bytes", t.resent_wire_bytes - before.resent_wire_bytes},
          {"zero_pages", t.zero - before.zero},
          {"free_pages", t.free - before.free},
          {"delta_pages", t.delta - before.delta},
          {"compressed_pages", (t.lz4 + t.zstd) - (before.lz4 + before.zstd)},
          {"debounced_pages", t.debounced - before.debounced},
          {"bytes", t.wire_bytes - before.wire_bytes}};
}

}  // namespace

std::string_view MigrationStatusName(MigrationStatus s) {
  switch (s) {
    case MigrationStatus::kSetup: return "setup";
    case MigrationStatus::kActive: return "active";
    case MigrationStatus::kDevice: return "device";
    case MigrationStatus::kPostcopy: return "postcopy-active";
    case MigrationStatus::kPostcopyPaused: return "postcopy-paused";
    case MigrationStatus::kCompleted: return "completed";
    case MigrationStatus::kFailed: return "failed";
    case MigrationStatus::kCancelled: return "cancelled";
    case MigrationStatus::kFailedUnknown: return "failed-unknown";
  }
  return "?";
}

SourceMigration::SourceMigration(SourceVm* vm, SourceParams params)
    : vm_(vm), params_(std::move(params)), uuid_(NewUuid()), limiter_(params_.max_bandwidth) {
  policy_cfg_.downtime_target_ms = static_cast<double>(params_.downtime_ms);
  policy_cfg_.max_iterations = params_.max_iterations;
  policy_cfg_.stall_rounds = params_.stall_rounds;
  policy_cfg_.on_stall = params_.policy;
}

std::unique_ptr<SourceMigration> SourceMigration::Start(SourceVm* vm, SourceParams params) {
  std::unique_ptr<SourceMigration> m(new SourceMigration(vm, std::move(params)));
  // Set before the migration thread starts and constant after: Stats() reads them from API threads.
  m->ram_ = vm->Ram();
  m->pages_ = m->ram_.size / kWirePageSize;
  // Before the thread (and its first harvest); Run() ends it on every path.
  if (m->ram_.dirty) m->ram_.dirty->BeginTracking();
  {
    MutexLock l(m->stats_mu_);  // no other thread yet; the lock only satisfies the analysis
    m->start_ns_ = NowNs();
  }
  m->thread_ = std::thread([p = m.get()] { p->Run(); });
  return m;
}

SourceMigration::~SourceMigration() {
  if (!IsFinal(status())) (void)Cancel();
  if (thread_.joinable()) thread_.join();
  Shutdown();
}

void SourceMigration::Wait() {
  if (thread_.joinable()) thread_.join();
}

void SourceMigration::Shutdown() {
  StopResponder();
  StopPinger();
  MutexLock l(ctl_mu_);
  if (pool_) pool_->Cancel(Error(ErrorCode::kCancelled, "migration ended"));
  if (control_) control_->Shutdown();
}

bool SourceMigration::FoldControl(const Record& r) {
  if (r.type() == RecordType::kPageRequest) {
    auto rq = DecodePageRequest(r.payload, pages_);
    if (!rq) return false;  // queued: fails the next wait
    {
      MutexLock l(req_mu_);
      requests_.push_back(*rq);
    }
    last_request_.store(rq->gfn);
    requests_seen_.fetch_add(1);
    req_cv_.notify_all();
    return true;
  }
  if (r.type() != RecordType::kProgress) return false;
  auto pr = DecodeProgress(r.payload);
  if (pr) dest_applied_ = std::max(dest_applied_, pr->batches);
  return pr.has_value();  // a malformed PROGRESS is queued and fails the next wait
}

Status SourceMigration::Recover(const std::string& to) {
  auto ep = ParseEndpoint(to);
  if (!ep) return std::unexpected(ep.error());
  if (ep->host.empty() || ep->port == 0) return Errorf(ErrorCode::kInvalidArgument, "\"to\": '{}' needs a host and a port", to);
  if (ep->tls != (params_.tls_context != nullptr))
    return Errorf(ErrorCode::kInvalidArgument, "\"to\": this migration {}: recover to {}:HOST:PORT", params_.tls_context ? "uses TLS" : "has no TLS certificates",
                  params_.tls_context ? "tls" : "tcp");
  const MigrationStatus st = status();
  if (st != MigrationStatus::kPostcopyPaused && st != MigrationStatus::kPostcopy)
    return Errorf(ErrorCode::kBusy, "recover applies to a post-copy migration (status {})", MigrationStatusName(st));
  {
    MutexLock l(recover_mu_);
    recover_to_ = to;
    recover_kick_ = true;
  }
  recover_cv_.notify_all();
  spdlog::info("migration {}: recovery address {}", FormatUuid(uuid_), to);
  return {};
}

Status SourceMigration::StartPostcopy() {
  MutexLock l(commit_mu_);
  const MigrationStatus st = status();
  if (IsFinal(st)) return Errorf(ErrorCode::kBusy, "migration already {}", MigrationStatusName(st));
  if (params_.mode == MigrationMode::kPrecopy) return Errorf(ErrorCode::kInvalidArgument, "this migration runs in mode precopy");
  if (st == MigrationStatus::kSetup) return Errorf(ErrorCode::kBusy, "migration is still connecting; ask again once it is active");
  if (st != MigrationStatus::kActive || postcopy_requested_)
    return Errorf(ErrorCode::kBusy, "migration is past pre-copy (status {})", MigrationStatusName(st));
  if (!(caps_.load() & kCapPostcopy)) return Errorf(ErrorCode::kUnsupported, "the destination cannot do post-copy");
  postcopy_requested_.store(true);
  spdlog::info("migration {}: post-copy requested", FormatUuid(uuid_));
  return {};
}

Status SourceMigration::Cancel() {
  {
    MutexLock l(commit_mu_);
    if (IsFinal(status())) return Errorf(ErrorCode::kBusy, "migration already {}", MigrationStatusName(status()));
    if (committed_) return Errorf(ErrorCode::kBusy, "migration is past its commit point (destination told to run the guest)");
    cancelled_.store(true);
  }
  const Error why(ErrorCode::kCancelled, "cancelled by operator");
  MutexLock l(ctl_mu_);
  // Tell the destination why before its data connections close under it, so it reports
  // "cancelled" rather than a lost connection (the migration thread sends CANCEL again when it
  // unwinds; a second one is harmless).
  if (control_ && hello_sent_.load()) (void)control_->Send(RecordType::kCancel, EncodeCancel(why.message()));
  if (pool_) pool_->Cancel(why);  // unblocks senders
  if (control_) control_->Interrupt(why);
  return {};
}

void SourceMigration::SampleCpu() { migration_thread_cpu_ns_.store(ThreadCpuNs(), std::memory_order_relaxed); }

void SourceMigration::Run() {
  spdlog::info("migration {}: to {} ({} channels, downtime target {} ms, max bandwidth {}, compress {}, layering {})",
               FormatUuid(uuid_), params_.to, params_.channels, params_.downtime_ms,
               params_.max_bandwidth ? std::to_string(params_.max_bandwidth) + " B/s" : "unlimited", params_.compress.ToString(),
               params_.layering ? "on" : "off");
  struct EndTracking {
    DirtyTracker* dirty;
    ~EndTracking() {
      if (dirty) dirty->EndTracking();
    }
  } end_tracking{ram_.dirty};
  Phase phase = Phase::kConnect;
  while (phase != Phase::kDone) {
    Result<Phase> next = Errorf(ErrorCode::kInternal, "no phase");
    switch (phase) {
      case Phase::kConnect: next = Connect(); break;
      case Phase::kIterate: next = Round(); break;
      case Phase::kWatch: next = Watch(); break;
      case Phase::kStopCopy: next = StopAndCopy(); break;
      case Phase::kCommit: next = Commit(); break;
      case Phase::kPostcopy: next = Postcopy(); break;
      case Phase::kDone: break;
    }
    SampleCpu();
    if (!next) {
      StopStallGuard();
      std::optional<Error> stalled;
      {
        MutexLock l(commit_mu_);
        stalled = stall_error_;
      }
      if (cpu_share_set_ != 1.0) (void)vm_->SetCpuShare(1.0);
      {
        MutexLock l(stats_mu_);
        end_ns_ = NowNs();
      }
      Fail(stalled ? *stalled : Explain(next.error()));
      Shutdown();
      return;
    }
    phase = *next;
    if (phase == Phase::kIterate) SetStatus(MigrationStatus::kActive);
    if (phase == Phase::kStopCopy || phase == Phase::kPostcopy) SetStatus(MigrationStatus::kDevice);
  }
  double total_ms, downtime_ms;
  {
    MutexLock l(stats_mu_);
    end_ns_ = NowNs();
    total_ms = MsFromNs(end_ns_ - start_ns_);
    downtime_ms = downtime_ms_;
  }
  SetStatus(MigrationStatus::kCompleted);
  vm_->OnMigrated(params_.to);
  spdlog::info("migration {}: completed in {:.1f} ms, downtime {:.2f} ms", FormatUuid(uuid_), total_ms, downtime_ms);
  Shutdown();
}

Error SourceMigration::Explain(const Error& local) const {
  if (local.code() == ErrorCode::kCancelled && cancelled_) return local;
  MutexLock l(ctl_mu_);
  // A short grace period: the destination's ERROR usually follows the connection it closed.
  if (control_)
    if (auto peer = control_->PeerVerdict(50)) return *peer;
  return local;
}

void SourceMigration::Fail(const Error& e) {
  bool committed;
  {
    MutexLock l(commit_mu_);
    committed = committed_;
  }
  {
    MutexLock l(stats_mu_);
    error_ = e.message();
  }
  if (committed) {
    // The destination may be running the guest: never run a second copy.
    spdlog::error("migration {}: lost the destination after GO: {}; the source VM stays paused (failed-unknown)",
                  FormatUuid(uuid_), e.message());
    SetStatus(MigrationStatus::kFailedUnknown);
    return;
  }
  const bool cancelled = cancelled_.load();
  {
    MutexLock l(ctl_mu_);
    if (control_ && hello_sent_.load())
      (void)control_->Send(RecordType::kCancel, EncodeCancel(cancelled ? "cancelled by operator" : e.message()));
  }
  Shutdown();
  if (paused_by_us_) {
    auto r = vm_->Resume();
    if (!r) spdlog::error("migration: cannot resume the source VM: {}", r.error().message());
    paused_by_us_ = false;
  }
  SetStatus(cancelled ? MigrationStatus::kCancelled : MigrationStatus::kFailed);
  spdlog::warn("migration {}: {}: {}; the source VM keeps running", FormatUuid(uuid_), cancelled ? "cancelled" : "failed",
               e.message());
}

// ---------------------------------------------------------------- connect

Status SourceMigration::Handshake(const Endpoint& ep, uint32_t version) {
  auto sock = Socket::Connect(ep, params_.connect_timeout_ms, params_.tls_context.get(), params_.tls_server_name);
  if (!sock) return std::unexpected(sock.error().WithContext("control channel"));
  FERRY_RETURN_IF_ERROR(WritePreamble(**sock, Role::kControl, version), "control channel");
  uint64_t want = kCapProgress | kCapZeroRuns | kCapFreePages;
  const CompressMode& cm = params_.compress;
  if (cm.automatic || cm.codec == Compression::kLz4) want |= kCapLz4;
  if (cm.automatic || cm.codec == Compression::kZstd) want |= kCapZstd;
  if (params_.delta_cache != 0) want |= kCapDelta;
  if (params_.mode != MigrationMode::kPrecopy) want |= kCapPostcopy;
  want = NegotiateCaps(version, want);
  {
    MutexLock l(ctl_mu_);
    if (control_) control_->Shutdown();
    control_ = std::make_unique<ControlChannel>(std::move(*sock));
  }
  control_->Start([this](const Record& r) { return FoldControl(r); });
  FERRY_RETURN_IF_ERROR(control_->Send(RecordType::kHello, Encode(Hello{uuid_, want, params_.channels, kWirePageSize})),
                        "control channel");
  hello_sent_.store(true);
  if (cancelled_) return Errorf(ErrorCode::kCancelled, "cancelled by operator");
  auto ack = control_->Await(RecordType::kHelloAck, params_.connect_timeout_ms * 2);
  if (!ack) return std::unexpected(ack.error().WithContext("handshake"));
  auto hack = DecodeHelloAck(ack->payload);
  if (!hack) return std::unexpected(hack.error());
  if (hack->uuid != uuid_) return Errorf(ErrorCode::kCorrupt, "handshake: HELLO_ACK for another migration");
  if (hack->capabilities & ~want)
    return Errorf(ErrorCode::kCorrupt, "handshake: the destination acknowledged capabilities {:#x} that were not offered",
                  hack->capabilities & ~want);
  version_ = version;
  caps_ = hack->capabilities;
  return {};
}

Result<std::vector<std::unique_ptr<Socket>>> SourceMigration::ConnectDataChannels(const Endpoint& ep) {
  std::vector<std::unique_ptr<Socket>> data;
  for (uint32_t i = 0; i < params_.channels; ++i) {
    auto d = Socket::Connect(ep, params_.connect_timeout_ms, params_.tls_context.get(), params_.tls_server_name);
    if (!d) return std::unexpected(d.error().WithContext(fmt::format("data channel {}", i)));
    FERRY_RETURN_IF_ERROR(WritePreamble(**d, Role::kData, version_), "data channel");
    FERRY_RETURN_IF_ERROR(WriteRecord(**d, RecordType::kDataHello, Encode(DataHello{uuid_, i})), "data channel");
    data.push_back(std::move(*d));
    if (cancelled_) return Errorf(ErrorCode::kCancelled, "cancelled by operator");
  }
  return data;
}

ChannelPool::Options SourceMigration::PoolOptions(uint64_t first_seq) const {
  ChannelPool::Options opts;
  opts.encoder = {version_, caps_};
  opts.high_watermark = 2 * params_.channels;
  opts.low_watermark = params_.channels;
  opts.first_seq = first_seq;
  return opts;
}

Result<SourceMigration::Phase> SourceMigration::Connect() {
  auto ep = ParseEndpoint(params_.to);
  if (!ep) return std::unexpected(ep.error());
  auto hs = Handshake(*ep, params_.max_protocol_version);
  if (!hs && hs.error().code() == ErrorCode::kVersionMismatch && params_.max_protocol_version > kMinProtocolVersion && !cancelled_) {
    // An older destination refuses the preamble: speak the version it knows (no codecs).
    spdlog::warn("migration {}: the destination does not speak protocol v{} ({}); using v{}", FormatUuid(uuid_),
                 params_.max_protocol_version, hs.error().message(), kMinProtocolVersion);
    hello_sent_.store(false);
    hs = Handshake(*ep, kMinProtocolVersion);
  }
  if (!hs) return std::unexpected(hs.error());
  if (params_.mode == MigrationMode::kPostcopy && !(caps_ & kCapPostcopy))
    return Errorf(ErrorCode::kUnsupported, "mode postcopy: the destination cannot do post-copy (protocol v{}, capabilities {})", version_.load(),
                  CapNames(caps_).dump());
  policy_cfg_.allow_postcopy = params_.mode == MigrationMode::kAuto && (caps_ & kCapPostcopy);
  // Mode precopy converges by slowing the guest (gently: only as much as needed, full speed again
  // at the pause); mode auto switches to post-copy instead.
  policy_cfg_.allow_throttle = params_.mode == MigrationMode::kPrecopy && params_.throttle;
  spdlog::info("migration {}: protocol v{}, capabilities {}", FormatUuid(uuid_), version_, CapNames(caps_).dump());

  auto data = ConnectDataChannels(*ep);
  if (!data) return std::unexpected(data.error());
  // A destination that stops acknowledging (its host gone, a path dropping everything) fails the
  // migration within stall_timeout_ms, not after minutes of retransmissions; post-copy tightens it.
  const auto bound = [&](Socket& s) {
    s.SetUserTimeout(params_.stall_timeout_ms);
    s.SetKeepAlive(1000, 1000, std::max(params_.stall_timeout_ms / 1000, 1));
  };
  bound(control_->socket());
  for (auto& s : *data) bound(*s);
  auto config = vm_->Config();
  if (!config) return std::unexpected(config.error().WithContext("read VM configuration"));
  FERRY_RETURN_IF_ERROR(control_->Send(RecordType::kConfig, EncodeConfig(*config)), "send configuration");
  auto cack = control_->Await(RecordType::kConfigAck, params_.reply_timeout_ms);
  if (!cack) return std::unexpected(cack.error().WithContext("destination refused the configuration"));

  // The stages.
  const uint64_t cache_bytes = params_.delta_cache < 0 ? DefaultDeltaCache(ram_.size) : static_cast<uint64_t>(params_.delta_cache);
  const bool delta = (caps_ & kCapDelta) && cache_bytes > 0;
  {
    MutexLock l(ctl_mu_);
    cache_ = std::make_unique<DeltaCache>(delta ? cache_bytes : 0, pages_);
    selector_ = std::make_unique<CodecSelector>(params_.compress, caps_ & kCapLz4, caps_ & kCapZstd, delta, params_.channels);
    if (params_.max_bandwidth) selector_->ReportLink(static_cast<double>(params_.max_bandwidth));
    pool_ = std::make_unique<ChannelPool>(std::move(*data), ram_, PoolOptions(1), cache_.get(), selector_.get(), &limiter_);
    scheduler_ = std::make_unique<PageScheduler>(pages_, LayeringConfig{params_.layering, 8, 2});
  }
  if (cancelled_) return Errorf(ErrorCode::kCancelled, "cancelled by operator");
  state_bytes_ = vm_->EstimateStateBytes();
  MutexLock l(stats_mu_);
  setup_ns_ = NowNs() - start_ns_;
  return Phase::kIterate;
}

// ---------------------------------------------------------------- rounds

Result<uint64_t> SourceMigration::SendPass(bool final, uint64_t holdback_budget) {
  scheduler_->BeginPass(final, holdback_budget);
  round_pages_total_.store(scheduler_->pending());
  // v2: a run of known-zero or free pages is one entry and read pages are bounded per batch; v1:
  // every page is an entry of a PAGES record.
  BatchLimits limits;
  if (version_ >= 2) {
    // A small pass (a watch look, the final pass) goes in at least two batches per channel: every
    // worker encodes a share, and the first records are on the wire while the last are encoded.
    const uint64_t share = (scheduler_->pending() + 2 * params_.channels - 1) / (2 * params_.channels);
    limits.max_scan_pages = std::clamp<uint64_t>(share, kMinBatchScanPages, kBatchScanPages);
    limits.max_runs = kBatchEntries;
  } else {
    limits.max_scan_pages = limits.max_pages = limits.max_runs = kMaxPagesPerRecord;
  }
  // Inside a long pass the dirty log is sampled now and then, so the scheduler's histories fill up
  // (hot pages are recognised, and held back, during the round that first sends them).
  const bool sample = params_.layering && !final;
  uint64_t next_sample = NowNs() + kSampleIntervalNs, sampled = 0;
  PageBitmap dirty, freed;
  Batch b;
  while (scheduler_->NextBatch(limits, &b)) {
    b.debounce = params_.layering && !final;  // the final pass: the VM is paused, every page goes
    b.paused = final;
    FERRY_RETURN_IF_ERROR(pool_->Submit(std::move(b)), "send pages");
    if (!final && postcopy_requested_) break;  // the rest goes in post-copy
    b = Batch{};
    if (sample && NowNs() >= next_sample) {
      scheduler_->SetHoldbackBudget(HoldbackBudget());
      sampled += Sample(&dirty, &freed);
      next_sample = NowNs() + kSampleIntervalNs;
    }
  }
  return sampled;
}

uint64_t SourceMigration::Sample(PageBitmap* dirty, PageBitmap* freed) {
  scheduler_->Unsend(pool_->Harvest(dirty, freed));
  return scheduler_->AddHarvest(*dirty, *freed);
}

uint64_t SourceMigration::HoldbackBudget() const {
  // Half of the downtime target's worth of pages at the rate and bytes per page seen so far.
  const EncodeTally t = pool_->tally();
  const uint64_t data_pages = t.raw + t.lz4 + t.zstd + t.delta;
  const uint64_t elapsed = NowNs() - rounds_start_ns_;
  if (data_pages == 0 || elapsed == 0) return 0;
  const double bw = static_cast<double>(t.wire_bytes) * 1e9 / static_cast<double>(elapsed);
  const double bpp = round_ > 0 ? bytes_per_page_ : static_cast<double>(t.wire_bytes) / static_cast<double>(data_pages);
  return static_cast<uint64_t>(policy_cfg_.downtime_target_ms / 1000.0 * 0.5 * bw / std::max(bpp, 1.0));
}

Status SourceMigration::WaitDrained() {
  if (!(caps_ & kCapProgress)) return {};
  const uint64_t sent = pool_->records();
  // A destination that applies no record for stall_timeout_ms has stalled (hung, or its host gone
  // while the data sat in socket buffers, where keepalives and TCP_USER_TIMEOUT see nothing
  // wrong): fail - the VM keeps running - rather than wait out the reply timeout.
  const uint64_t deadline = NowNs() + static_cast<uint64_t>(params_.reply_timeout_ms) * 1'000'000;
  uint64_t mark = 0;
  bool drained = false;
  for (;;) {
    const int left = static_cast<int>(std::max<int64_t>(0, static_cast<int64_t>(deadline - std::min(deadline, NowNs())) / 1'000'000));
    auto s = control_->WaitUntil([&] {
      drained = dest_applied_ >= sent;
      if (drained || dest_applied_ == mark) return drained;
      mark = dest_applied_;
      return true;
    }, std::min(left, params_.stall_timeout_ms), fmt::format("destination applying {} page records", sent));
    if (drained) return {};
    if (!s) {
      if (s.error().code() == ErrorCode::kTimeout && left > params_.stall_timeout_ms)
        return Errorf(ErrorCode::kTimeout, "the destination applied no page record for {} ms ({} of {} applied)", params_.stall_timeout_ms, mark, sent);
      return s;
    }
  }
}

Result<SourceMigration::Phase> SourceMigration::Round() {
  const uint32_t it = round_;
  const uint64_t t0 = NowNs();
  PageBitmap dirty, freed;
  if (it == 0) {
    // Start of tracking: every page goes in round 0; what was freed or never written is known.
    ram_.dirty->Harvest(&dirty, &freed);
    scheduler_->Start(HoleMap(ram_.memfd, ram_.size), freed);
    rounds_start_ns_ = NowNs();
    if (params_.layering) {
      // A short look at what the guest writes before round 0 is ordered: pages written now go to
      // the end of round 0, where the samples taken meanwhile tell whether they are hot (held
      // back) or not. A guest that writes little is not worth the wait.
      std::this_thread::sleep_for(std::chrono::nanoseconds(kWarmupFirstNs));
      uint64_t written = Sample(&dirty, &freed);
      if (static_cast<double>(written) * 1e9 / kWarmupFirstNs >= kWarmupMinPagesPerS) {
        std::this_thread::sleep_for(std::chrono::nanoseconds(kWarmupNs - kWarmupFirstNs));
        written += Sample(&dirty, &freed);
      }
      spdlog::info("migration: {} pages written in the first {:.0f} ms", written, MsFromNs(NowNs() - rounds_start_ns_));
    }
  }
  const EncodeTally before = pool_->tally();
  round_pages_base_.store(before.pages + before.debounced);
  auto sampled = SendPass(false, HoldbackBudget());
  if (!sampled) return std::unexpected(sampled.error().WithContext(fmt::format("iteration {}", it)));
  const PassStats pass = scheduler_->pass();
  if (postcopy_requested_) return Phase::kPostcopy;
  FERRY_RETURN_IF_ERROR(pool_->Flush(), fmt::format("iteration {}", it));
  // Measure the round end to end (socket buffers can hold many MiB the destination has not
  // applied yet) and never pause the VM with a backlog in flight: it would all be downtime.
  FERRY_RETURN_IF_ERROR(WaitDrained(), fmt::format("iteration {}", it));
  const uint64_t ns = std::max<uint64_t>(NowNs() - t0, 1);
  EncodeTally t = pool_->tally();
  const uint64_t bytes = t.wire_bytes - before.wire_bytes;
  const uint64_t data_pages = (t.raw + t.lz4 + t.zstd + t.delta) - (before.raw + before.lz4 + before.zstd + before.delta);
  total_round_bytes_ += bytes;
  total_round_ns_ += ns;
  // Bytes per page that has to be read and sent (what the remaining dirty pages will cost):
  // measured on this round's data pages, smoothed.
  if (data_pages > 0) {
    const double bpp = static_cast<double>(bytes) / static_cast<double>(data_pages);
    bytes_per_page_ = it == 0 ? bpp : 0.5 * bytes_per_page_ + 0.5 * bpp;
  }
  double bw = static_cast<double>(total_round_bytes_) * 1e9 / static_cast<double>(total_round_ns_);
  if (params_.max_bandwidth) bw = std::min(bw, static_cast<double>(params_.max_bandwidth));

  const uint64_t dirtied = *sampled + Sample(&dirty, &freed);
  // The state estimate is a command to the VM (a round trip to its vCPU thread): its latency is
  // what pausing the VM and saving its state cost at the start of the pause.
  const uint64_t t_call = NowNs();
  state_bytes_ = vm_->EstimateStateBytes();
  const double call_ms = MsFromNs(NowNs() - t_call);
  vm_call_ms_ = it == 0 ? call_ms : 0.5 * vm_call_ms_ + 0.5 * call_ms;
  bandwidth_ = bw;
  rtt_last_ms_ = control_->socket().Path().rtt_ms;
  RoundMeasurement m = LinkMeasurement();
  m.round = it;
  m.remaining_pages = scheduler_->pending();
  m.dirty_pages_per_s = static_cast<double>(dirtied) * 1e9 / static_cast<double>(ns);
  m.round_ms = MsFromNs(ns);
  const Decision d = Decide(policy_cfg_, m, &policy_state_);
  {
    MutexLock l(stats_mu_);
    iterations_ = it + 1;
    bandwidth_bps_ = bw * 8;
    dirty_rate_ = m.dirty_pages_per_s;
    remaining_pages_ = m.remaining_pages;
    expected_downtime_ms_ = d.predicted_downtime_ms;
    predicted_downtime_ms_ = d.predicted_downtime_ms;
    rtt_ms_ = m.rtt_ms;
    held_back_total_ += pass.held_back;
    nlohmann::json entry = SentSince(t, before);
    entry.update({{"iteration", it},
                  {"pages", pass.pages},
                  {"resent_pages", pass.resent_pages},
                        {"wire_bytes_per_page", bytes_per_page_},
                        {"ms", MsFromNs(ns)},
                        {"dirty_pages_rate", m.dirty_pages_per_s},
                        {"remaining_pages", m.remaining_pages},
                        {"held_back", pass.held_back},
                        {"hot_threshold", {{"k", pass.hot_k}, {"r", pass.window}, {"candidates", pass.hot_candidates}}},
                        {"expected_downtime_ms", d.predicted_downtime_ms},
                        {"predicted_downtime_ms", d.predicted_downtime_ms},
                        {"decision", DecisionName(d.kind)}});
    history_.push_back(std::move(entry));
  }
  spdlog::info("migration: iteration {}: {} pages ({} zero, {} held back, k={}/{}, {} left out as written since the harvest), "
               "{:.1f} MiB in {:.1f} ms, {:.0f} B/page; {} pending, predicted downtime {:.1f} ms: {}",
               it, pass.pages, t.zero - before.zero, pass.held_back, pass.hot_k, pass.window, t.debounced - before.debounced,
               static_cast<double>(bytes) / (1 << 20), MsFromNs(ns), bytes_per_page_, m.remaining_pages, d.predicted_downtime_ms,
               d.reason);
  ++round_;
  if (params_.mode == MigrationMode::kPostcopy || postcopy_requested_) return Phase::kPostcopy;
  switch (d.kind) {
    case DecisionKind::kIterate: return Phase::kIterate;
    case DecisionKind::kWatch: return Phase::kWatch;
    case DecisionKind::kStop:
      if (!d.converged) {
        MutexLock l(stats_mu_);
        converged_ = false;
        spdlog::warn("migration: {}", d.reason);
      }
      NoteStop(d, {{"after", "round"}});
      return Phase::kStopCopy;
    case DecisionKind::kThrottle: {
      FERRY_RETURN_IF_ERROR(vm_->SetCpuShare(d.cpu_share), "throttle");
      cpu_share_set_ = d.cpu_share;
      MutexLock l(stats_mu_);
      throttle_max_pct_ = std::max(throttle_max_pct_, (1.0 - d.cpu_share) * 100.0);
      spdlog::info("migration: {}", d.reason);
      return Phase::kIterate;
    }
    case DecisionKind::kFail: {
      MutexLock l(stats_mu_);
      converged_ = false;
      return Errorf(ErrorCode::kTimeout, "{}", d.reason);
    }
    case DecisionKind::kPostcopy:
      if (!(caps_ & kCapPostcopy)) break;
      spdlog::info("migration: {}", d.reason);
      return Phase::kPostcopy;
  }
  return Errorf(ErrorCode::kUnsupported, "the policy asked for post-copy, which the destination does not offer");
}

RoundMeasurement SourceMigration::LinkMeasurement() const {
  RoundMeasurement m;
  m.wire_bytes_per_page = bytes_per_page_;
  m.bandwidth_bytes_per_s = bandwidth_;
  m.state_bytes = state_bytes_;
  m.rtt_ms = rtt_last_ms_;
  // Pausing the VM and saving its state: two commands to its vCPU thread; the destination's
  // restore and start are two such commands to its VM (taken to cost the same).
  m.fixed_ms = 4 * vm_call_ms_;
  return m;
}

void SourceMigration::NoteStop(const Decision& d, const nlohmann::json& extra) {
  const ActivitySeries act = vm_->RecentActivity(kStopActivityWindows);
  nlohmann::json windows = nlohmann::json::array();
  const uint64_t now = NowNs();
  for (const ActivityWindow& w : act.windows)
    windows.push_back({{"ms_before_stop", MsFromNs(now > w.start_ns ? now - w.start_ns : 0)},
                       {"dirty_pages", w.dirty_pages},
                       {"instructions", w.instructions},
                       {"net_packets", w.net_packets},
                       {"blk_requests", w.blk_requests}});
  nlohmann::json j = {{"reason", d.reason}, {"predicted_downtime_ms", d.predicted_downtime_ms}, {"activity", windows}};
  for (auto& [k, v] : extra.items()) j[k] = v;
  spdlog::info("migration: stop-and-copy now: {}", d.reason);
  MutexLock l(stats_mu_);
  predicted_downtime_ms_ = d.predicted_downtime_ms;
  expected_downtime_ms_ = d.predicted_downtime_ms;
  stop_ = std::move(j);
}

Result<SourceMigration::Phase> SourceMigration::Watch() {
  const uint64_t t_begin = NowNs();
  const EncodeTally before = pool_->tally();
  const size_t history_windows = static_cast<size_t>(policy_cfg_.history_ms / kActivityWindowMs);
  PageBitmap dirty, freed;
  uint64_t ticks = 0, pages = 0, dirty_from_ns = 0;
  // This look's harvest (pages dirtied since the one before, or since the round's at look 1).
  uint64_t newest_dirty = 0, last_harvest_ns = t_begin;
  double newest_span_ms = 0;
  double earlier_exposure_ms[2] = {0, 0};  // the last two looks', older first
  Decision d;
  LullAnalysis lull;
  nlohmann::json model;  // the prediction's inputs at the last look
  uint64_t watch_bytes = 0, watch_ns = 0, watch_pages = 0;  // what the looks sent and how long it took to apply
  for (;; ++ticks) {
    if (cancelled_) return Errorf(ErrorCode::kCancelled, "cancelled by operator");
    if (postcopy_requested_ || params_.mode == MigrationMode::kPostcopy) return Phase::kPostcopy;
    // One look per window: the first at once (the round's harvest is pending), then every 10 ms.
    const uint64_t due = t_begin + ticks * kWatchTickNs;
    if (const uint64_t now = NowNs(); due > now) std::this_thread::sleep_for(std::chrono::nanoseconds(due - now));
    const uint64_t t_harvest = NowNs();
    if (ticks > 0) {
      Sample(&dirty, &freed);
      newest_dirty = CountPages(dirty);
      newest_span_ms = MsFromNs(t_harvest - last_harvest_ns);
      last_harvest_ns = t_harvest;
    }
    // Everything dirtied goes now, hot pages too: the set stays at its floor.
    const EncodeTally tick_before = pool_->tally();
    round_pages_base_.store(tick_before.pages + tick_before.debounced);
    const uint64_t t_send = NowNs();
    auto sent = SendPass(false, 0);
    if (!sent) return std::unexpected(sent.error().WithContext("watch"));
    pages += scheduler_->pass().pages;
    FERRY_RETURN_IF_ERROR(pool_->Flush(), "watch");
    FERRY_RETURN_IF_ERROR(WaitDrained(), "watch");
    // The looks send small sets end to end, as the pause will: their rate (bytes written until
    // the destination applied them) is the better figure for the pause than the rounds' rate.
    // Their bytes per page are those of re-sent pages, as in the pause.
    // The drain's round trip is not sending time (the model has the pause's round trips on
    // their own), and a few pages' rate is mostly that round trip: the looks' rate replaces the
    // rounds' only once they sent kMinWatchRateBytes.
    WatchMeasurement wm;
    wm.link = LinkMeasurement();
    const EncodeTally tick_after = pool_->tally();
    if (const uint64_t b = tick_after.wire_bytes - tick_before.wire_bytes; b > 0) {
      const uint64_t look_ns = NowNs() - t_send, rtt_ns = static_cast<uint64_t>(wm.link.rtt_ms * 1e6);
      watch_bytes += b;
      watch_ns += look_ns - std::min(look_ns / 2, rtt_ns);
      watch_pages += tick_after.pages - tick_before.pages;
    }
    if (watch_bytes >= kMinWatchRateBytes && watch_ns > 0)
      wm.link.bandwidth_bytes_per_s = static_cast<double>(watch_bytes) * 1e9 / static_cast<double>(watch_ns);
    if (watch_pages > 0) wm.link.wire_bytes_per_page = static_cast<double>(watch_bytes) / static_cast<double>(watch_pages);
    wm.link.remaining_pages = scheduler_->pending();
    wm.elapsed_ms = MsFromNs(NowNs() - t_begin);
    wm.earlier_exposure_ms[0] = earlier_exposure_ms[0];
    wm.earlier_exposure_ms[1] = earlier_exposure_ms[1];
    wm.exposure_ms = MsFromNs(NowNs() - t_harvest);
    earlier_exposure_ms[0] = earlier_exposure_ms[1];
    earlier_exposure_ms[1] = wm.exposure_ms;
    wm.activity = vm_->RecentActivity(history_windows);
    // Pages "newly dirtied" count pages first written since the last harvest. Only the watch
    // harvests every window: in a round's windows (one harvest per round) and before the
    // migration the count dies down as marks pile up, which would look like lulls that a
    // steady guest never has.
    // The first look harvests the round's marks and may take long (it sends what the rounds
    // held back); figures count from the second look's harvest, when looks come every window.
    if (ticks == 1) dirty_from_ns = t_harvest;
    wm.dirty_valid_from_ns = ticks >= 1 ? dirty_from_ns : UINT64_MAX;
    wm.disturbed_from_ns = rounds_start_ns_;
    wm.disturbed_to_ns = t_begin;
    wm.newest_dirty_pages = newest_dirty;
    wm.newest_dirty_span_ms = newest_span_ms;
    d = DecideWatch(policy_cfg_, wm, &lull);
    model = {{"held_over_pages", wm.link.remaining_pages},
             {"exposure_ms", wm.exposure_ms},
             {"wire_bytes_per_page", wm.link.wire_bytes_per_page},
             {"bandwidth_bytes_per_s", wm.link.bandwidth_bytes_per_s},
             {"state_bytes", wm.link.state_bytes},
             {"rtt_ms", wm.link.rtt_ms},
             {"fixed_ms", wm.link.fixed_ms}};
    {
      MutexLock l(stats_mu_);
      expected_downtime_ms_ = d.predicted_downtime_ms;
      predicted_downtime_ms_ = d.predicted_downtime_ms;
      remaining_pages_ = wm.link.remaining_pages;
    }
    if (spdlog::should_log(spdlog::level::debug))  // the model's dump only when someone reads it
      spdlog::debug("migration: watch look {} at {:.1f} ms: {} ({}; model {})", ticks, wm.elapsed_ms, DecisionName(d.kind), d.reason, model.dump());
    if (d.kind != DecisionKind::kWatch) break;
  }
  const EncodeTally t = pool_->tally();
  const nlohmann::json lull_json = {{"windows", lull.windows},
                                    {"quiet_windows", lull.quiet_windows},
                                    {"trailing_quiet", lull.trailing_quiet},
                                    {"varying_signals", lull.varying_signals},
                                    {"longest_busy_ms", lull.longest_busy_ms},
                                    {"last_dirty_pages", lull.last_dirty_per_window},
                                    {"quiet_dirty_pages", lull.quiet_dirty_per_window}};
  const double ms = MsFromNs(NowNs() - t_begin);
  {
    MutexLock l(stats_mu_);
    nlohmann::json entry = SentSince(t, before);
    entry.update({{"iteration", iterations_},
                  {"watch", true},
                  {"ticks", ticks + 1},
                  {"pages", pages},
                        {"ms", ms},
                        {"lull", lull_json},
                        {"expected_downtime_ms", d.predicted_downtime_ms},
                        {"predicted_downtime_ms", d.predicted_downtime_ms},
                        {"decision", DecisionName(d.kind)}});
    history_.push_back(std::move(entry));
  }
  spdlog::info("migration: watched {} windows in {:.1f} ms ({} pages sent): {}", ticks + 1, ms, pages, d.reason);
  if (d.kind == DecisionKind::kIterate) {
    // Rounds and watch may disagree for ever (a round's prediction within the target, the watch's
    // over it): after the second watch that could not reach the target, this is non-convergence.
    if (++watch_returns_ < 2 && round_ < policy_cfg_.max_iterations) return Phase::kIterate;
    {
      MutexLock l(stats_mu_);
      converged_ = false;
    }
    const std::string why = fmt::format("{} watches could not reach the {:.0f} ms target ({})", watch_returns_,
                                        policy_cfg_.downtime_target_ms, d.reason);
    if (policy_cfg_.allow_postcopy) {
      spdlog::info("migration: {}: switching to post-copy", why);
      return Phase::kPostcopy;
    }
    if (policy_cfg_.on_stall == ConvergePolicy::kForce) {
      spdlog::warn("migration: {}; policy force: stopping", why);
      d.kind = DecisionKind::kStop;
      d.reason = why + "; policy force";
    } else {
      return Errorf(ErrorCode::kTimeout, "{}; policy {}", why, PolicyName(policy_cfg_.on_stall));
    }
  }
  NoteStop(d, {{"after", "watch"}, {"watch_ms", ms}, {"lull", lull_json}, {"model", model}});
  return Phase::kStopCopy;
}

Result<SourceMigration::Phase> SourceMigration::StopAndCopy() {
  StartStallGuard();  // before the pause: creating its thread is no part of the downtime
  const uint64_t t_pause = NowNs();
  {
    MutexLock l(stats_mu_);
    pause_ns_ = t_pause;
  }
  FERRY_RETURN_IF_ERROR(vm_->Pause(), "pause source VM");
  const uint64_t t_paused = NowNs();
  paused_by_us_ = true;
  if (cpu_share_set_ != 1.0) {
    (void)vm_->SetCpuShare(1.0);  // paused anyway; the destination runs at full speed
    cpu_share_set_ = 1.0;
  }
  PageBitmap dirty, freed;
  Sample(&dirty, &freed);
  pool_->LiftRateLimit();  // max_bandwidth limits the live phase, not the pause
  const EncodeTally before = pool_->tally();
  round_pages_base_.store(before.pages + before.debounced);
  auto sent = SendPass(true, 0);
  if (!sent) return std::unexpected(sent.error().WithContext("final pages"));
  const PassStats pass = scheduler_->pass();
  FERRY_RETURN_IF_ERROR(pool_->Flush(), "final pages");
  const uint64_t t_pages = NowNs();
  auto handover = HandOverState();
  if (!handover) return std::unexpected(handover.error());
  const uint64_t t_saved = handover->saved_ns, t_end = handover->end_ns, t_ready = handover->ready_ns;
  const uint64_t state_bytes = handover->state_bytes;
  const EncodeTally t = pool_->tally();
  spdlog::info("migration: stop-and-copy: {} pages, final pages {:.2f} ms (pause {:.2f} ms), save state {:.2f} ms ({} bytes), "
               "send state + END {:.2f} ms, destination READY after {:.2f} ms",
               pass.pages, MsFromNs(t_pages - t_pause), MsFromNs(t_paused - t_pause), MsFromNs(t_saved - t_pages), state_bytes, MsFromNs(t_end - t_saved),
               MsFromNs(t_ready - t_end));
  MutexLock l(stats_mu_);
  final_pages_ms_ = MsFromNs(t_pages - t_pause);
  pause_ms_ = MsFromNs(t_paused - t_pause);
  state_ms_ = MsFromNs(t_ready - t_pages);
  nlohmann::json entry = SentSince(t, before);
  entry.update({{"iteration", iterations_},
                {"pages", pass.pages},
                {"resent_pages", pass.resent_pages},
                {"state_bytes", state_bytes},
                {"ms", final_pages_ms_},
                {"final", true}});
  history_.push_back(std::move(entry));
  return Phase::kCommit;
}

Result<SourceMigration::Handover> SourceMigration::HandOverState() {
  Handover h;
  auto state = vm_->SaveState();
  if (!state) return std::unexpected(state.error().WithContext("save VM state"));
  h.saved_ns = NowNs();
  for (const auto& rec : *state) {
    FERRY_RETURN_IF_ERROR(control_->Send(RecordType::kState, Encode(rec)), "send state");
    h.state_bytes += rec.blob.size();
  }
  const EncodeTally t = pool_->tally();
  FERRY_RETURN_IF_ERROR(control_->Send(RecordType::kEnd, Encode(End{t.records, t.pages})), "send END");
  h.end_ns = NowNs();
  // The VM is paused and every page is on its way: a destination that does not report READY within
  // the stall bound is given up on (the source resumes) rather than waited for a minute.
  auto ready = control_->Await(RecordType::kReady, std::min(params_.reply_timeout_ms, params_.stall_timeout_ms));
  if (!ready) return std::unexpected(ready.error().WithContext("waiting for the destination to restore"));
  h.ready_ns = NowNs();
  return h;
}

void SourceMigration::StartStallGuard() {
  {
    MutexLock l(guard_mu_);
    guard_stop_ = false;
  }
  // The stage pointers do not change between the pause and the commit (see the members).
  ChannelPool* pool = pool_.get();
  ControlChannel* control = control_.get();
  const int bound_ms = params_.stall_timeout_ms;
  stall_guard_ = std::thread([this, pool, control, bound_ms] {
    const auto acked = [&] { return pool->bytes_acked() + control->socket().Path().bytes_acked; };
    const auto period = std::chrono::milliseconds(std::clamp(bound_ms / 10, 10, 250));
    uint64_t last = acked(), since = NowNs();
    for (;;) {
      {
        MutexLock l(guard_mu_);
        if (l.WaitFor(guard_cv_, period, [&]() REQUIRES(guard_mu_) { return guard_stop_; })) return;
      }
      const uint64_t now_acked = acked();
      if (now_acked != last) {
        last = now_acked;
        since = NowNs();
        continue;
      }
      if (NowNs() - since < static_cast<uint64_t>(bound_ms) * 1'000'000) continue;
      const Error e(ErrorCode::kTimeout,
                    fmt::format("the stop-and-copy made no progress for {} ms (stall_timeout_ms: the destination "
                                "acknowledged nothing on any connection); the source resumes",
                                bound_ms));
      {
        MutexLock l(commit_mu_);
        if (committed_) return;  // GO went out: only the migration thread decides from here
        stall_error_ = e;
      }
      spdlog::warn("migration {}: {}", FormatUuid(uuid_), e.message());
      pool->Cancel(e);  // unblocks the data senders
      control->Interrupt(e);
      control->socket().Shutdown();  // unblocks a STATE/END send on the control connection
      return;
    }
  });
}

void SourceMigration::StopStallGuard() {
  if (!stall_guard_.joinable()) return;
  {
    MutexLock l(guard_mu_);
    guard_stop_ = true;
  }
  guard_cv_.notify_all();
  stall_guard_.join();
}

Result<SourceMigration::Phase> SourceMigration::Commit() {
  {
    MutexLock l(commit_mu_);
    if (cancelled_) return Errorf(ErrorCode::kCancelled, "cancelled by operator");
    if (stall_error_) return std::unexpected(*stall_error_);
    committed_ = true;
  }
  StopStallGuard();  // past the commit point: a lost destination now means failed-unknown
  const uint64_t t_go = NowNs();
  FERRY_RETURN_IF_ERROR(control_->Send(RecordType::kGo, {}), "send GO");
  auto resumed = control_->Await(RecordType::kResumed, params_.reply_timeout_ms);
  if (!resumed) return std::unexpected(resumed.error().WithContext("waiting for RESUMED"));
  const uint64_t t_resumed = NowNs();
  MutexLock l(stats_mu_);
  resume_ms_ = MsFromNs(t_resumed - t_go);
  downtime_ms_ = MsFromNs(t_resumed - pause_ns_);
  return Phase::kDone;
}

// ---------------------------------------------------------------- post-copy

Result<SourceMigration::Phase> SourceMigration::Postcopy() {
  const uint64_t t_pause = NowNs();
  {
    MutexLock l(stats_mu_);
    pause_ns_ = t_pause;
    mode_ran_ = "postcopy";
  }
  FERRY_RETURN_IF_ERROR(vm_->Pause(), "pause source VM");
  const uint64_t t_paused = NowNs();
  paused_by_us_ = true;
  if (cpu_share_set_ != 1.0) {
    (void)vm_->SetCpuShare(1.0);
    cpu_share_set_ = 1.0;
  }
  PageBitmap dirty, freed;
  Sample(&dirty, &freed);
  // max_bandwidth keeps limiting the background push (the guest runs meanwhile, as in the live
  // phase); requested pages go on the control connection, outside the limit.
  FERRY_RETURN_IF_ERROR(pool_->Flush(), "post-copy switch");
  // Pages known to be zero or free cost nothing to send: they go now, as runs. The rest is missing.
  std::vector<PageRun> nodata;
  pc_missing_count_ = scheduler_->TakeAllPending(&pc_missing_, &nodata, 1u << 16);
  {
    // What a post-copy switch pauses for (not the pre-copy prediction that led here).
    const double predicted = PredictPostcopySwitchMs(LinkMeasurement(), pc_missing_count_);
    MutexLock l(stats_mu_);
    predicted_downtime_ms_ = predicted;
    expected_downtime_ms_ = predicted;
  }
  for (size_t i = 0; i < nodata.size(); i += kBatchEntries) {
    Batch b;
    b.runs.assign(nodata.begin() + static_cast<ptrdiff_t>(i), nodata.begin() + static_cast<ptrdiff_t>(std::min(nodata.size(), i + kBatchEntries)));
    FERRY_RETURN_IF_ERROR(pool_->Submit(std::move(b)), "post-copy switch");
  }
  // The destination drops its copies of the missing pages, and a page pushed from now on may be
  // lost with a cut connection: no more deltas.
  if (cache_) cache_->Freeze();
  pc_claimed_.reset(new std::atomic<uint64_t>[pc_missing_.size()]);
  for (size_t i = 0; i < pc_missing_.size(); ++i) pc_claimed_[i].store(0, std::memory_order_relaxed);
  FERRY_RETURN_IF_ERROR(pool_->Flush(), "post-copy switch");
  FERRY_RETURN_IF_ERROR(control_->Send(RecordType::kPostcopy, Encode(PostcopyStart{pages_, pc_missing_count_, pc_missing_})),
                        "send POSTCOPY");
  StartResponder();  // the destination's restore may touch missing pages already
  auto handover = HandOverState();
  if (!handover) return std::unexpected(handover.error());
  const uint64_t t_end = handover->end_ns, state_bytes = handover->state_bytes;
  spdlog::info("migration: post-copy switch: {} pages missing, {} bytes of state, destination READY after {:.2f} ms",
               pc_missing_count_, state_bytes, MsFromNs(NowNs() - t_end));
  {
    MutexLock l(stats_mu_);
    final_pages_ms_ = MsFromNs(t_end - t_pause);
    pause_ms_ = MsFromNs(t_paused - t_pause);
    state_ms_ = MsFromNs(NowNs() - t_end);
    postcopy_pages_ = pc_missing_count_;
    history_.push_back({{"iteration", iterations_}, {"postcopy", true}, {"missing_pages", pc_missing_count_},
                        {"state_bytes", state_bytes}, {"ms", final_pages_ms_}});
  }
  auto committed = Commit();  // GO: the guest runs on the destination from here
  if (!committed) return std::unexpected(committed.error());
  {
    MutexLock l(stats_mu_);
    go_ns_ = NowNs();
  }
  SetStatus(MigrationStatus::kPostcopy);
  control_->socket().SetUserTimeout(params_.liveness_timeout_ms);
  pool_->SetUserTimeout(params_.liveness_timeout_ms);
  StartPinger();
  Result<Record> done = std::unexpected(Error(ErrorCode::kInternal, "no POSTCOPY_DONE"));
  for (;;) {
    auto s = PostcopyRun();
    if (s) {
      done = control_->Await(RecordType::kPostcopyDone, params_.reply_timeout_ms);
      if (done) break;
      s = std::unexpected(done.error().WithContext("waiting for POSTCOPY_DONE"));
    }
    if (!Recoverable(s.error())) return std::unexpected(s.error());
    FERRY_RETURN_IF_ERROR(Reconnect(s.error()), "post-copy");
  }
  StopPinger();
  auto d = DecodePostcopyDone(done->payload);
  if (!d) return std::unexpected(d.error());
  MutexLock l(stats_mu_);
  pc_done_ = *d;
  postcopy_ms_ = MsFromNs(NowNs() - go_ns_);
  spdlog::info("migration: post-copy done in {:.1f} ms: {} pages, {} demand faults (p50 {} us, p99 {} us), {} recoveries",
               postcopy_ms_, pc_missing_count_, d->demand_faults, d->p50_us, d->p99_us, recoveries_);
  return Phase::kDone;
}

Status SourceMigration::PostcopyRun() {
  FERRY_RETURN_IF_ERROR(PushMissing(), "post-copy push");
  {
    MutexLock l(req_mu_);
    l.Wait(req_cv_, [&]() REQUIRES(req_mu_) { return !responder_busy_ || responder_error_; });
  }
  StopResponder();
  EncodeTally rt;
  {
    MutexLock l(req_mu_);
    if (responder_error_) return std::unexpected(*responder_error_);
    rt = responder_tally_;
  }
  // This connection's totals (all of the migration's for the first one).
  const EncodeTally all = pool_->tally();
  return control_->Send(RecordType::kPostcopyEnd, Encode(End{all.records + rt.records, all.pages + rt.pages}));
}

bool SourceMigration::Recoverable(const Error& e) {
  // The destination's own ERROR ends it for good; anything but a lost connection too.
  if (control_->PeerVerdict(0)) return false;
  return e.code() == ErrorCode::kIo || e.code() == ErrorCode::kTimeout;
}

void SourceMigration::StartResponder() {
  {
    MutexLock l(req_mu_);
    responder_stop_ = false;
    responder_busy_ = false;
    responder_error_.reset();
    responder_tally_ = EncodeTally{};
    requests_.clear();
  }
  responder_ = std::thread([this] { Responder(); });
}

void SourceMigration::StopResponder() {
  {
    MutexLock l(req_mu_);
    responder_stop_ = true;
  }
  req_cv_.notify_all();
  if (responder_.joinable() && responder_.get_id() != std::this_thread::get_id()) responder_.join();
}

void SourceMigration::StartPinger() {
  pinger_stop_.store(false);
  pinger_ = std::thread([this] {
    // A quiet post-copy connection is still checked: with TCP_USER_TIMEOUT, a path that drops
    // everything fails the connection instead of hanging it.
    while (!pinger_stop_.load()) {
      MutexLock l(recover_mu_);
      l.WaitFor(recover_cv_, std::chrono::milliseconds(250), [&] { return pinger_stop_.load(); });
      l.Unlock();
      if (pinger_stop_.load()) return;
      (void)control_->Send(RecordType::kPing, {}, false);
    }
  });
}

void SourceMigration::StopPinger() {
  pinger_stop_.store(true);
  recover_cv_.notify_all();
  if (pinger_.joinable() && pinger_.get_id() != std::this_thread::get_id()) pinger_.join();
}

Status SourceMigration::Reconnect(const Error& why) {
  SetStatus(MigrationStatus::kPostcopyPaused);
  spdlog::warn("migration {}: post-copy connection lost ({}); the guest waits on the destination for pages it has not got; "
               "reconnecting for up to {} ms",
               FormatUuid(uuid_), why.message(), params_.recover_timeout_ms);
  StopPinger();
  StopResponder();
  uint64_t next_seq;
  {
    MutexLock l(ctl_mu_);
    retired_tally_.Add(pool_->tally());
    retired_bytes_ += pool_->bytes_written() + control_->socket().bytes_written();
    retired_cpu_ns_ += pool_->cpu_ns() + control_->reader_cpu_ns();
    next_seq = pool_->next_seq();
    pool_->Cancel(why);
    control_->Shutdown();
  }
  {
    MutexLock l(ctl_mu_);
    pool_.reset();  // joins its workers
  }
  const uint64_t deadline = NowNs() + static_cast<uint64_t>(params_.recover_timeout_ms) * 1'000'000;
  for (uint32_t attempt = 1;; ++attempt) {
    std::string to;
    {
      MutexLock l(recover_mu_);
      to = recover_to_.empty() ? params_.to : recover_to_;
      recover_kick_ = false;
    }
    auto s = TryReconnect(to, next_seq);
    if (s) break;
    spdlog::warn("migration {}: reconnect {} to {} failed: {}", FormatUuid(uuid_), attempt, to, s.error().message());
    {
      MutexLock l(ctl_mu_);
      if (pool_) {
        pool_->Cancel(s.error());
      }
      if (control_) control_->Shutdown();
    }
    {
      MutexLock l(ctl_mu_);
      pool_.reset();
    }
    if (NowNs() >= deadline)
      return Errorf(ErrorCode::kTimeout, "post-copy: could not reach the destination again within {} ms (last: {}); the source "
                    "keeps the pages the destination misses and stays paused", params_.recover_timeout_ms, s.error().message());
    MutexLock l(recover_mu_);
    l.WaitFor(recover_cv_, std::chrono::milliseconds(std::min<uint64_t>(1000, (deadline - NowNs()) / 1'000'000 + 1)),
              [&]() REQUIRES(recover_mu_) { return recover_kick_; });
  }
  {
    MutexLock l(stats_mu_);
    ++recoveries_;
  }
  SetStatus(MigrationStatus::kPostcopy);
  StartResponder();
  StartPinger();
  return {};
}

Status SourceMigration::TryReconnect(const std::string& to, uint64_t next_seq) {
  auto ep = ParseEndpoint(to);
  if (!ep) return std::unexpected(ep.error());
  const uint64_t caps = caps_.load();
  FERRY_RETURN_IF_ERROR(Handshake(*ep, version_.load()), "reconnect");
  if (caps_.load() != caps) {
    caps_.store(caps);
    return Errorf(ErrorCode::kCorrupt, "reconnect: the destination acknowledged other capabilities");
  }
  auto rec = control_->Await(RecordType::kRecover, params_.connect_timeout_ms);
  if (!rec) return std::unexpected(rec.error().WithContext("reconnect"));
  auto now = DecodePostcopyStart(rec->payload, pages_);
  if (!now) return std::unexpected(now.error().WithContext("RECOVER"));
  for (size_t w = 0; w < pc_missing_.size(); ++w)
    if (now->missing[w] & ~pc_missing_[w]) return Errorf(ErrorCode::kCorrupt, "RECOVER: pages missing that were never missing");
  auto data = ConnectDataChannels(*ep);
  if (!data) return std::unexpected(data.error());
  for (auto& d : *data) d->SetUserTimeout(params_.liveness_timeout_ms);
  control_->socket().SetUserTimeout(params_.liveness_timeout_ms);
  // What the destination misses now is sent again (what was on the wire may be lost).
  for (size_t w = 0; w < pc_missing_.size(); ++w) pc_claimed_[w].store(pc_missing_[w] & ~now->missing[w]);
  MutexLock l(ctl_mu_);
  pool_ = std::make_unique<ChannelPool>(std::move(*data), ram_, PoolOptions(next_seq), cache_.get(), selector_.get(), &limiter_);
  spdlog::info("migration {}: post-copy reconnected to {}; {} pages still missing there", FormatUuid(uuid_), to, now->missing_pages);
  return {};
}

Status SourceMigration::PushMissing() {
  uint64_t cursor = 0, seen = requests_seen_.load();
  for (;;) {
    if (cancelled_) return Errorf(ErrorCode::kCancelled, "cancelled");
    if (const uint64_t n = requests_seen_.load(); n != seen) {
      // Follow the guest: continue right after the page it asked for last.
      seen = n;
      const uint64_t g = last_request_.load();
      if (g < pages_) cursor = (g + 1) % pages_;
    }
    Batch b;
    uint64_t taken = 0, scanned = 0;
    while (taken < kBatchScanPages && scanned < pages_) {
      const uint64_t w = cursor / 64;
      if (cursor % 64 == 0 && (pc_missing_[w] & ~pc_claimed_[w].load(std::memory_order_relaxed)) == 0) {
        const uint64_t step = std::min<uint64_t>(64, pages_ - cursor);
        scanned += step;
        cursor = (cursor + step) % pages_;
        continue;
      }
      const uint64_t p = cursor;
      cursor = (cursor + 1) % pages_;
      ++scanned;
      if (!TestPage(pc_missing_, p) || !Claim(p)) continue;
      if (!b.runs.empty() && b.runs.back().gfn + b.runs.back().count == p) ++b.runs.back().count;
      else b.runs.push_back(PageRun{p, 1, RunKind::kScan, true});
      ++taken;
    }
    if (taken == 0) break;
    FERRY_RETURN_IF_ERROR(pool_->Submit(std::move(b)), "send pages");
  }
  return pool_->Flush();
}

void SourceMigration::Responder() {
  PageEncoder enc(ram_.host, {version_.load(), caps_.load() & ~kCapDelta}, nullptr, selector_.get());
  for (;;) {
    PageRequest rq;
    {
      MutexLock l(req_mu_);
      l.Wait(req_cv_, [&]() REQUIRES(req_mu_) { return responder_stop_ || !requests_.empty(); });
      // Stopped: every page is on the wire already (the push is complete), queued requests too.
      if (responder_stop_) return;
      rq = requests_.front();
      requests_.pop_front();
      responder_busy_ = true;
    }
    Status s = SendRequested(rq.gfn, rq.count, &enc);
    {
      MutexLock l(req_mu_);
      responder_busy_ = false;
      if (!s && !responder_error_) responder_error_ = s.error().WithContext("send requested pages");
    }
    req_cv_.notify_all();
    if (!s) {
      control_->Interrupt(s.error());
      return;
    }
  }
}

Status SourceMigration::SendRequested(uint64_t gfn, uint32_t count, PageEncoder* enc) {
  std::vector<PageRun> runs;
  for (uint64_t p = gfn; p < gfn + count; ++p) {
    if (!TestPage(pc_missing_, p)) continue;  // not missing: the destination resolves it itself
    (void)Claim(p);  // sent now even if the push claimed it: it may be queued behind megabytes
    if (!runs.empty() && runs.back().gfn + runs.back().count == p) ++runs.back().count;
    else runs.push_back(PageRun{p, 1, RunKind::kScan, true});
  }
  if (runs.empty()) return {};
  EncodeTally t;
  const std::span<const uint8_t> rec = enc->Encode(runs, pool_->TakeSeq(), &t);
  FERRY_RETURN_IF_ERROR(control_->socket().WriteAll(rec), "control channel");
  MutexLock l(req_mu_);
  responder_tally_.Add(t);
  return {};
}

// ---------------------------------------------------------------- stats

nlohmann::json SourceMigration::Stats() const {
  // Stage figures first (their own locks), then ours.
  uint64_t transferred = 0, cpu_ns = migration_thread_cpu_ns_.load();
  EncodeTally t;
  nlohmann::json codec = nullptr, cache = nullptr;
  {
    MutexLock cl(ctl_mu_);
    transferred += retired_bytes_;
    cpu_ns += retired_cpu_ns_;
    t = retired_tally_;
    if (pool_) {
      transferred += pool_->bytes_written();
      cpu_ns += pool_->cpu_ns();
      t.Add(pool_->tally());
    }
    if (control_) {
      transferred += control_->socket().bytes_written();
      cpu_ns += control_->reader_cpu_ns();
    }
    if (selector_) codec = selector_->Snapshot();
    if (cache_) {
      const DeltaCache::Stats s = cache_->stats();
      cache = {{"capacity_bytes", s.capacity_pages * kWirePageSize}, {"used_bytes", s.used_pages * kWirePageSize},
               {"hits", s.hits}, {"misses", s.misses}, {"overflows", s.encode_overflows}, {"evictions", s.evictions}};
    }
  }
  MutexLock l(stats_mu_);
  const MigrationStatus st = status();
  const uint64_t now = end_ns_ ? end_ns_ : NowNs();
  nlohmann::json j = {
      {"status", MigrationStatusName(st)},
      {"uuid", FormatUuid(uuid_)},
      {"to", params_.to},
      {"tls", params_.tls_context != nullptr},
      {"channels", params_.channels},
      {"downtime_target_ms", params_.downtime_ms},
      {"max_bandwidth", params_.max_bandwidth},
      {"converge_policy", PolicyName(params_.policy)},
      {"compress", params_.compress.ToString()},
      {"layering", params_.layering ? "on" : "off"},
      {"protocol_version", version_.load()},
      {"capabilities", CapNames(caps_.load())},
      {"setup_ms", MsFromNs(setup_ns_)},
      {"total_ms", MsFromNs(now - start_ns_)},
      {"expected_downtime_ms", expected_downtime_ms_},
      {"predicted_downtime_ms", predicted_downtime_ms_},
      {"stop", stop_},
      {"transferred_bytes", transferred},
      {"total_ram_bytes", ram_.size},
      {"remaining_bytes", remaining_pages_ * kWirePageSize},
      {"zero_pages", t.zero + t.free},
      {"normal_pages", t.raw + t.lz4 + t.zstd + t.delta},
      {"pages_by_encoding",
       {{"zero", t.zero}, {"raw", t.raw}, {"lz4", t.lz4}, {"zstd", t.zstd}, {"delta", t.delta}, {"free", t.free}, {"held_back", held_back_total_}}},
      {"resent_bytes", t.resent_wire_bytes},
      {"debounced_pages", t.debounced},
      {"source_cpu_ms", static_cast<double>(cpu_ns) / 1e6},
      {"codec_cpu_ms", static_cast<double>(t.codec_cpu_ns) / 1e6},
      {"dirty_pages_rate", dirty_rate_},
      {"rtt_ms", rtt_ms_},
      {"iterations", iterations_},
      {"mbps", bandwidth_bps_ / 1e6},
      {"converged", converged_},
      {"round_progress", {{"pages", t.pages + t.debounced - std::min(t.pages + t.debounced, round_pages_base_.load())},
                          {"of", round_pages_total_.load()}}},
      {"codec", codec},
      {"delta_cache", cache},
      {"history", history_},
  };
  if (st == MigrationStatus::kCompleted) {
    j["downtime_ms"] = downtime_ms_;
    j["downtime_phases"] = {{"pause_ms", pause_ms_}, {"final_pages_ms", final_pages_ms_}, {"state_ms", state_ms_}, {"resume_ms", resume_ms_}};
    j["remaining_bytes"] = 0;
  }
  j["mode"] = mode_ran_;
  j["postcopy_ms"] = postcopy_ms_;
  j["postcopy_pages"] = postcopy_pages_;
  j["recoveries"] = recoveries_;
  j["throttle_max_pct"] = throttle_max_pct_;
  j["recover_timeout_ms"] = params_.recover_timeout_ms;
  j["demand_faults"] = pc_done_.demand_faults;
  j["fault_latency_ms"] = {{"p50", pc_done_.p50_us / 1000.0}, {"p99", pc_done_.p99_us / 1000.0}, {"max", pc_done_.max_us / 1000.0}};
  if (!error_.empty()) j["error"] = error_;
  return j;
}

}  // namespace ferry::migration
