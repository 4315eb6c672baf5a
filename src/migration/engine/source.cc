#include "migration/engine/source.h"

#include <time.h>
#include <unistd.h>

#include <algorithm>
#include <cstring>

#include <spdlog/spdlog.h>

namespace ferry::migration {
namespace {

constexpr double kStateEstimateMs = 5.0;  // state save + END/READY/GO round trips (loopback/LAN)

uint64_t NowNs() {
  timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return static_cast<uint64_t>(ts.tv_sec) * 1'000'000'000ull + static_cast<uint64_t>(ts.tv_nsec);
}
double Ms(uint64_t ns) { return static_cast<double>(ns) / 1e6; }

bool IsZeroPage(const uint8_t* p) {
  const uint64_t* w = reinterpret_cast<const uint64_t*>(p);
  uint64_t acc = 0;
  for (size_t i = 0; i < kWirePageSize / 8; i += 8)
    acc |= w[i] | w[i + 1] | w[i + 2] | w[i + 3] | w[i + 4] | w[i + 5] | w[i + 6] | w[i + 7];
  return acc == 0;
}

// Pages of a memfd that were never written (holes) read as zero: no need to touch them.
std::vector<uint8_t> HoleMap(int fd, uint64_t size) {
  std::vector<uint8_t> hole(size / kWirePageSize, 0);
  if (fd < 0) return hole;
  auto mark = [&](uint64_t from, uint64_t to) {
    for (uint64_t p = (from + kWirePageSize - 1) / kWirePageSize; p < to / kWirePageSize && p < hole.size(); ++p) hole[p] = 1;
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

}  // namespace

std::string_view PolicyName(ConvergePolicy p) {
  switch (p) {
    case ConvergePolicy::kForce: return "force";
    case ConvergePolicy::kFail: return "fail";
    case ConvergePolicy::kContinue: return "continue";
  }
  return "?";
}

std::string_view MigrationStatusName(MigrationStatus s) {
  switch (s) {
    case MigrationStatus::kSetup: return "setup";
    case MigrationStatus::kActive: return "active";
    case MigrationStatus::kDevice: return "device";
    case MigrationStatus::kCompleted: return "completed";
    case MigrationStatus::kFailed: return "failed";
    case MigrationStatus::kCancelled: return "cancelled";
    case MigrationStatus::kFailedUnknown: return "failed-unknown";
  }
  return "?";
}

Result<SourceParams> ParseSourceParams(const nlohmann::json& body) {
  if (!body.is_object()) return Errorf(ErrorCode::kInvalidArgument, "request body must be a JSON object");
  SourceParams p;
  auto get_uint = [&](const char* key, uint64_t lo, uint64_t hi, uint64_t* out) -> Status {
    const auto& v = body[key];
    if (!v.is_number_unsigned() && !(v.is_number_integer() && v.get<int64_t>() >= 0))
      return Errorf(ErrorCode::kInvalidArgument, "\"{}\" must be a non-negative integer", key);
    uint64_t x = v.get<uint64_t>();
    if (x < lo || x > hi) return Errorf(ErrorCode::kInvalidArgument, "\"{}\" = {} is outside {}..{}", key, x, lo, hi);
    *out = x;
    return {};
  };
  bool have_to = false;
  for (auto& [k, v] : body.items()) {
    uint64_t x = 0;
    if (k == "to") {
      if (!v.is_string()) return Errorf(ErrorCode::kInvalidArgument, "\"to\" must be a string like tcp:HOST:PORT");
      p.to = v.get<std::string>();
      auto ep = ParseEndpoint(p.to);
      if (!ep) return std::unexpected(ep.error());
      if (ep->host.empty() || ep->port == 0) return Errorf(ErrorCode::kInvalidArgument, "\"to\": '{}' needs a host and a port", p.to);
      have_to = true;
    } else if (k == "channels") {
      FERRY_RETURN_IF_ERROR(get_uint("channels", 1, kMaxChannels, &x), "migrate");
      p.channels = static_cast<uint32_t>(x);
    } else if (k == "downtime_ms") {
      FERRY_RETURN_IF_ERROR(get_uint("downtime_ms", 1, 600000, &x), "migrate");
      p.downtime_ms = x;
    } else if (k == "max_bandwidth") {
      FERRY_RETURN_IF_ERROR(get_uint("max_bandwidth", 0, UINT64_MAX / 1000000000ull, &x), "migrate");
      if (x != 0 && x < 65536) return Errorf(ErrorCode::kInvalidArgument, "\"max_bandwidth\" is in bytes/s; {} is below the minimum of 65536 (0 = unlimited)", x);
      p.max_bandwidth = x;
    } else if (k == "max_iterations") {
      FERRY_RETURN_IF_ERROR(get_uint("max_iterations", 1, 10000, &x), "migrate");
      p.max_iterations = static_cast<uint32_t>(x);
    } else if (k == "stall_rounds") {
      FERRY_RETURN_IF_ERROR(get_uint("stall_rounds", 1, 1000, &x), "migrate");
      p.stall_rounds = static_cast<uint32_t>(x);
    } else if (k == "converge_policy") {
      std::string s = v.is_string() ? v.get<std::string>() : "";
      if (s == "force") p.policy = ConvergePolicy::kForce;
      else if (s == "fail") p.policy = ConvergePolicy::kFail;
      else if (s == "continue") p.policy = ConvergePolicy::kContinue;
      else return Errorf(ErrorCode::kInvalidArgument, "\"converge_policy\" must be \"force\", \"fail\" or \"continue\"");
    } else {
      return Errorf(ErrorCode::kInvalidArgument, "unknown field \"{}\"", k);
    }
  }
  if (!have_to) return Errorf(ErrorCode::kInvalidArgument, "\"to\" (tcp:HOST:PORT) is required");
  return p;
}

SourceMigration::SourceMigration(SourceVm* vm, SourceParams params)
    : vm_(vm), params_(std::move(params)), uuid_(NewUuid()), limiter_(params_.max_bandwidth) {}

std::unique_ptr<SourceMigration> SourceMigration::Start(SourceVm* vm, SourceParams params) {
  std::unique_ptr<SourceMigration> m(new SourceMigration(vm, std::move(params)));
  m->start_ns_ = NowNs();
  m->thread_ = std::thread([p = m.get()] { p->Run(); });
  return m;
}

SourceMigration::~SourceMigration() {
  if (!IsFinal(status())) (void)Cancel();
  if (thread_.joinable()) thread_.join();
  ShutdownSockets();
  if (control_reader_.joinable()) control_reader_.join();
}

void SourceMigration::Wait() {
  if (thread_.joinable()) thread_.join();
}

void SourceMigration::SetStatus(MigrationStatus s) { status_.store(s); }

void SourceMigration::ShutdownSockets() {
  std::lock_guard<std::mutex> l(ctl_mu_);  // also guards the socket vectors against Setup
  for (auto& d : data_) d->Shutdown();
  if (control_) control_->Shutdown();
}

Status SourceMigration::Cancel() {
  {
    std::lock_guard<std::mutex> l(commit_mu_);
    if (IsFinal(status())) return Errorf(ErrorCode::kBusy, "migration already {}", MigrationStatusName(status()));
    if (committed_) return Errorf(ErrorCode::kBusy, "migration is past its commit point (destination told to run the guest)");
    cancelled_.store(true);
  }
  {
    std::lock_guard<std::mutex> l(ctl_mu_);
    // Tell the destination why before its data connections close under it, so it reports
    // "cancelled" rather than a lost connection (the migration thread sends CANCEL again
    // when it unwinds; a second one is harmless).
    if (control_ && hello_sent_.load()) (void)WriteRecord(*control_, RecordType::kCancel, EncodeCancel("cancelled by operator"));
    for (auto& d : data_) d->Shutdown();  // unblocks senders
  }
  ctl_cv_.notify_all();
  return {};
}

void SourceMigration::Run() {
  ram_ = vm_->Ram();
  pages_ = ram_.size / kWirePageSize;
  spdlog::info("migration {}: to {} ({} channels, downtime target {} ms, max bandwidth {})", FormatUuid(uuid_), params_.to,
               params_.channels, params_.downtime_ms, params_.max_bandwidth ? std::to_string(params_.max_bandwidth) + " B/s" : "unlimited");
  Status s = Setup();
  if (s) s = Iterate();
  if (s) s = StopAndCopy();
  if (s) s = Commit();
  {
    std::lock_guard<std::mutex> l(stats_mu_);
    end_ns_ = NowNs();
  }
  if (!s) {
    Fail(s.error());
  } else {
    SetStatus(MigrationStatus::kCompleted);
    vm_->OnMigrated(params_.to);
    spdlog::info("migration {}: completed in {:.1f} ms, downtime {:.2f} ms", FormatUuid(uuid_), Ms(end_ns_ - start_ns_), downtime_ms_);
  }
  ShutdownSockets();
}

void SourceMigration::Fail(const Error& e) {
  bool committed;
  {
    std::lock_guard<std::mutex> l(commit_mu_);
    committed = committed_;
  }
  {
    std::lock_guard<std::mutex> l(stats_mu_);
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
  if (control_) (void)WriteRecord(*control_, RecordType::kCancel, EncodeCancel(cancelled ? "cancelled by operator" : e.message()));
  ShutdownSockets();
  if (paused_by_us_) {
    auto r = vm_->Resume();
    if (!r) spdlog::error("migration: cannot resume the source VM: {}", r.error().message());
    paused_by_us_ = false;
  }
  SetStatus(cancelled ? MigrationStatus::kCancelled : MigrationStatus::kFailed);
  spdlog::warn("migration {}: {}: {}; the source VM keeps running", FormatUuid(uuid_), cancelled ? "cancelled" : "failed",
               e.message());
}

Status SourceMigration::Setup() {
  auto ep = ParseEndpoint(params_.to);
  if (!ep) return std::unexpected(ep.error());
  auto ctl = Socket::Connect(*ep, params_.connect_timeout_ms);
  if (!ctl) return std::unexpected(ctl.error().WithContext("control channel"));
  {
    std::lock_guard<std::mutex> l(ctl_mu_);
    control_ = std::move(*ctl);
  }
  if (cancelled_) return Errorf(ErrorCode::kCancelled, "cancelled");
  FERRY_RETURN_IF_ERROR(WritePreamble(*control_, Role::kControl), "control channel");
  FERRY_RETURN_IF_ERROR(
      WriteRecord(*control_, RecordType::kHello, Encode(Hello{uuid_, kCapsSupported, params_.channels, kWirePageSize})), "control channel");
  hello_sent_.store(true);
  control_reader_ = std::thread([this] { ControlReader(); });
  auto ack = AwaitControl(RecordType::kHelloAck, params_.connect_timeout_ms * 2);
  if (!ack) return std::unexpected(ack.error().WithContext("handshake"));
  auto hack = DecodeHelloAck(ack->payload);
  if (!hack) return std::unexpected(hack.error());
  if (hack->uuid != uuid_) return Errorf(ErrorCode::kCorrupt, "handshake: HELLO_ACK for another migration");
  caps_ = hack->capabilities & kCapsSupported;

  for (uint32_t i = 0; i < params_.channels; ++i) {
    auto d = Socket::Connect(*ep, params_.connect_timeout_ms);
    if (!d) return std::unexpected(d.error().WithContext(fmt::format("data channel {}", i)));
    FERRY_RETURN_IF_ERROR(WritePreamble(**d, Role::kData), "data channel");
    FERRY_RETURN_IF_ERROR(WriteRecord(**d, RecordType::kDataHello, Encode(DataHello{uuid_, i})), "data channel");
    std::lock_guard<std::mutex> l(ctl_mu_);
    data_.push_back(std::move(*d));
    if (cancelled_) return Errorf(ErrorCode::kCancelled, "cancelled");
  }
  auto config = vm_->Config();
  if (!config) return std::unexpected(config.error().WithContext("read VM configuration"));
  FERRY_RETURN_IF_ERROR(WriteRecord(*control_, RecordType::kConfig, EncodeConfig(*config)), "send configuration");
  auto cack = AwaitControl(RecordType::kConfigAck, params_.reply_timeout_ms);
  if (!cack) return std::unexpected(cack.error().WithContext("destination refused the configuration"));
  std::lock_guard<std::mutex> l(stats_mu_);
  setup_ns_ = NowNs() - start_ns_;
  return {};
}

void SourceMigration::ControlReader() {
  for (;;) {
    auto r = ReadRecord(*control_, -1);
    std::lock_guard<std::mutex> l(ctl_mu_);
    if (!r) {
      ctl_error_ = r.error().WithContext("control channel");
      ctl_cv_.notify_all();
      return;
    }
    if (r->type() == RecordType::kProgress) {
      auto pr = DecodeProgress(r->payload);
      if (!pr) {
        ctl_error_ = pr.error().WithContext("control channel");
        ctl_cv_.notify_all();
        return;
      }
      dest_applied_ = std::max(dest_applied_, pr->batches);
      ctl_cv_.notify_all();
      continue;
    }
    ctl_queue_.push_back(std::move(*r));
    ctl_cv_.notify_all();
  }
}

Status SourceMigration::WaitDrained() {
  if (!(caps_ & kCapProgress)) return {};
  const uint64_t sent = batches_.load();
  std::unique_lock<std::mutex> l(ctl_mu_);
  const bool ok = ctl_cv_.wait_for(l, std::chrono::milliseconds(params_.reply_timeout_ms),
                                   [&] { return dest_applied_ >= sent || cancelled_ || ctl_error_.has_value(); });
  if (cancelled_) return Errorf(ErrorCode::kCancelled, "cancelled by operator");
  if (ctl_error_) return std::unexpected(*ctl_error_);
  if (!ok)
    return Errorf(ErrorCode::kTimeout, "destination applied {} of {} page records within {} ms", dest_applied_, sent,
                  params_.reply_timeout_ms);
  return {};
}

Result<Record> SourceMigration::AwaitControl(RecordType want, int timeout_ms) {
  std::unique_lock<std::mutex> l(ctl_mu_);
  auto deadline = std::chrono::steady_clock::now() + std::chrono::milliseconds(timeout_ms);
  for (;;) {
    while (!ctl_queue_.empty()) {
      Record r = std::move(ctl_queue_.front());
      ctl_queue_.pop_front();
      if (r.type() == want) return r;
      if (r.type() == RecordType::kError) {
        auto m = DecodeError(r.payload);
        if (!m) return std::unexpected(m.error());
        return std::unexpected(ToError(*m));
      }
      if (r.type() == RecordType::kProgress || (!r.header.mandatory() && !IsKnownRecordType(r.header.type))) continue;
      return Errorf(ErrorCode::kCorrupt, "unexpected {} (type {}) from the destination while waiting for {}",
                    IsKnownRecordType(r.header.type) ? RecordTypeName(r.type()) : "record", r.header.type, RecordTypeName(want));
    }
    if (cancelled_) return Errorf(ErrorCode::kCancelled, "cancelled by operator");
    if (ctl_error_) return std::unexpected(*ctl_error_);
    if (ctl_cv_.wait_until(l, deadline) == std::cv_status::timeout && ctl_queue_.empty())
      return Errorf(ErrorCode::kTimeout, "no {} from the destination within {} ms", RecordTypeName(want), timeout_ms);
  }
}

std::vector<uint64_t> SourceMigration::HarvestDirty() {
  std::vector<uint64_t> bitmap = ram_.dirty_log->Harvest();
  std::vector<uint64_t> pages;
  for (size_t w = 0; w < bitmap.size(); ++w) {
    uint64_t bits = bitmap[w];
    while (bits) {
      uint64_t page = w * 64 + static_cast<uint64_t>(__builtin_ctzll(bits));
      bits &= bits - 1;
      if (page < pages_) pages.push_back(page);
    }
  }
  return pages;
}

Status SourceMigration::SendPages(const std::vector<uint64_t>& pages, const std::vector<uint8_t>* holes, uint64_t* zero_out,
                                  uint64_t* bytes_out) {
  round_pages_total_.store(pages.size());
  round_pages_done_.store(0);
  std::atomic<size_t> next{0};
  std::atomic<uint64_t> zero{0}, bytes{0};
  std::mutex err_mu;
  std::optional<Error> err;
  auto sender = [&](Socket* sock) {
    PagesBuilder b;
    for (;;) {
      if (cancelled_) return;
      size_t first = next.fetch_add(kMaxPagesPerRecord);
      if (first >= pages.size()) return;
      size_t last = std::min(pages.size(), first + kMaxPagesPerRecord);
      // The seq is taken before the copy: a later copy of any of these pages (next
      // round, after this round finished) gets a higher seq (docs/protocol.md).
      b.Reset(next_seq_.fetch_add(1));
      uint64_t z = 0;
      for (size_t i = first; i < last; ++i) {
        const uint64_t gfn = pages[i];
        const uint8_t* page = ram_.host + gfn * kWirePageSize;
        if ((holes && (*holes)[gfn]) || IsZeroPage(page)) {
          b.AddZero(gfn);
          ++z;
        } else {
          b.AddRaw(gfn, page);
        }
      }
      auto rec = b.Finish();
      if (!limiter_.Acquire(rec.size(), cancelled_)) return;
      auto s = sock->WriteAll(rec);
      if (!s) {
        std::lock_guard<std::mutex> l(err_mu);
        if (!err) err = s.error().WithContext("data channel");
        return;
      }
      batches_.fetch_add(1);
      zero += z;
      bytes += rec.size();
      zero_pages_ += z;
      normal_pages_ += (last - first) - z;
      round_pages_done_ += last - first;
      // Stop early if another channel failed.
      std::lock_guard<std::mutex> l(err_mu);
      if (err) return;
    }
  };
  std::vector<std::thread> threads;
  for (auto& d : data_) threads.emplace_back(sender, d.get());
  for (auto& t : threads) t.join();
  if (err) return std::unexpected(*err);
  if (cancelled_) return Errorf(ErrorCode::kCancelled, "cancelled by operator");
  {
    std::lock_guard<std::mutex> l(ctl_mu_);
    if (ctl_error_) return std::unexpected(*ctl_error_);
    for (auto& r : ctl_queue_)
      if (r.type() == RecordType::kError) {
        auto m = DecodeError(r.payload);
        return std::unexpected(m ? ToError(*m) : m.error());
      }
  }
  *zero_out = zero;
  *bytes_out = bytes;
  return {};
}

Status SourceMigration::Iterate() {
  SetStatus(MigrationStatus::kActive);
  // Start of tracking: forget older marks, then send everything (iteration 0).
  (void)ram_.dirty_log->Harvest();
  std::vector<uint8_t> holes = HoleMap(ram_.memfd, ram_.size);
  std::vector<uint64_t> pages(pages_);
  for (uint64_t i = 0; i < pages_; ++i) pages[i] = i;
  uint64_t best_remaining = UINT64_MAX, stall = 0, total_bytes = 0, total_ns = 0;
  for (uint64_t it = 0;; ++it) {
    const uint64_t t0 = NowNs();
    uint64_t zero = 0, bytes = 0;
    FERRY_RETURN_IF_ERROR(SendPages(pages, it == 0 ? &holes : nullptr, &zero, &bytes), fmt::format("iteration {}", it));
    // Measure the round end to end (socket buffers can hold many MiB the destination has not
    // applied yet) and never pause the VM with a backlog in flight: it would all be downtime.
    FERRY_RETURN_IF_ERROR(WaitDrained(), fmt::format("iteration {}", it));
    const uint64_t ns = std::max<uint64_t>(NowNs() - t0, 1);
    total_bytes += bytes;
    total_ns += ns;
    // Bandwidth over all rounds so far (single small rounds are latency-bound).
    double bw = static_cast<double>(total_bytes) * 1e9 / static_cast<double>(total_ns);
    if (params_.max_bandwidth) bw = std::min(bw, static_cast<double>(params_.max_bandwidth));
    const uint64_t remaining = ram_.dirty_log->CountDirty();
    const double dirty_rate = static_cast<double>(remaining) * 1e9 / static_cast<double>(ns);
    const double expected = static_cast<double>(remaining) * kWirePageSize * 1000.0 / std::max(bw, 1.0) + kStateEstimateMs;
    {
      std::lock_guard<std::mutex> l(stats_mu_);
      iterations_ = it + 1;
      bandwidth_bps_ = bw * 8;
      dirty_rate_ = dirty_rate;
      remaining_pages_ = remaining;
      expected_downtime_ms_ = expected;
      history_.push_back({{"iteration", it}, {"pages", pages.size()}, {"zero_pages", zero}, {"bytes", bytes},
                          {"ms", Ms(ns)}, {"dirty_pages_rate", dirty_rate}, {"remaining_pages", remaining},
                          {"expected_downtime_ms", expected}});
    }
    spdlog::info("migration: iteration {}: {} pages ({} zero), {:.1f} MiB in {:.1f} ms; {} dirty, expected downtime {:.1f} ms", it,
                 pages.size(), zero, static_cast<double>(bytes) / (1 << 20), Ms(ns), remaining, expected);
    if (expected <= static_cast<double>(params_.downtime_ms)) return {};
    if (best_remaining == UINT64_MAX || remaining < best_remaining / 10 * 9) {
      best_remaining = remaining;
      stall = 0;
    } else {
      ++stall;
    }
    const bool at_cap = it + 1 >= params_.max_iterations;
    const bool stalled = stall >= params_.stall_rounds;
    if (at_cap || (stalled && params_.policy != ConvergePolicy::kContinue)) {
      const std::string why = at_cap ? fmt::format("not converged after {} iterations", it + 1)
                                     : fmt::format("not converging (remaining dirty set has not shrunk for {} rounds)", stall);
      {
        std::lock_guard<std::mutex> l(stats_mu_);
        converged_ = false;
      }
      if (params_.policy == ConvergePolicy::kForce) {
        spdlog::warn("migration: {}; policy force: stopping with an expected downtime of {:.1f} ms", why, expected);
        return {};
      }
      return Errorf(ErrorCode::kTimeout, "{} (dirty rate {:.0f} pages/s, bandwidth {:.0f} Mbit/s, expected downtime {:.1f} ms > {} ms); policy {}",
                    why, dirty_rate, bw * 8 / 1e6, expected, params_.downtime_ms, PolicyName(params_.policy));
    }
    pages = HarvestDirty();
  }
}

Status SourceMigration::StopAndCopy() {
  SetStatus(MigrationStatus::kDevice);
  const uint64_t t_pause = NowNs();
  {
    std::lock_guard<std::mutex> l(stats_mu_);
    pause_ns_ = t_pause;
  }
  FERRY_RETURN_IF_ERROR(vm_->Pause(), "pause source VM");
  paused_by_us_ = true;
  std::vector<uint64_t> pages = HarvestDirty();
  uint64_t zero = 0, bytes = 0;
  if (!pages.empty()) FERRY_RETURN_IF_ERROR(SendPages(pages, nullptr, &zero, &bytes), "final pages");
  const uint64_t t_pages = NowNs();
  auto state = vm_->SaveState();
  if (!state) return std::unexpected(state.error().WithContext("save VM state"));
  const uint64_t t_saved = NowNs();
  for (const auto& rec : *state) FERRY_RETURN_IF_ERROR(WriteRecord(*control_, RecordType::kState, Encode(rec)), "send state");
  FERRY_RETURN_IF_ERROR(WriteRecord(*control_, RecordType::kEnd, Encode(End{batches_.load(), zero_pages_ + normal_pages_})),
                        "send END");
  const uint64_t t_end = NowNs();
  auto ready = AwaitControl(RecordType::kReady, params_.reply_timeout_ms);
  if (!ready) return std::unexpected(ready.error().WithContext("waiting for the destination to restore"));
  const uint64_t t_ready = NowNs();
  spdlog::info("migration: stop-and-copy: final pages {:.2f} ms, save state {:.2f} ms, send state + END {:.2f} ms, destination READY after {:.2f} ms",
               Ms(t_pages - t_pause), Ms(t_saved - t_pages), Ms(t_end - t_saved), Ms(t_ready - t_end));
  std::lock_guard<std::mutex> l(stats_mu_);
  final_pages_ms_ = Ms(t_pages - t_pause);
  state_ms_ = Ms(t_ready - t_pages);
  history_.push_back({{"iteration", iterations_}, {"pages", pages.size()}, {"zero_pages", zero}, {"bytes", bytes},
                      {"ms", final_pages_ms_}, {"final", true}});
  return {};
}

Status SourceMigration::Commit() {
  {
    std::lock_guard<std::mutex> l(commit_mu_);
    if (cancelled_) return Errorf(ErrorCode::kCancelled, "cancelled by operator");
    committed_ = true;
  }
  const uint64_t t_go = NowNs();
  FERRY_RETURN_IF_ERROR(WriteRecord(*control_, RecordType::kGo, {}), "send GO");
  auto resumed = AwaitControl(RecordType::kResumed, params_.reply_timeout_ms);
  if (!resumed) return std::unexpected(resumed.error().WithContext("waiting for RESUMED"));
  const uint64_t t_resumed = NowNs();
  std::lock_guard<std::mutex> l(stats_mu_);
  resume_ms_ = Ms(t_resumed - t_go);
  downtime_ms_ = Ms(t_resumed - pause_ns_);
  return {};
}

nlohmann::json SourceMigration::Stats() const {
  std::lock_guard<std::mutex> l(stats_mu_);
  const MigrationStatus st = status();
  const uint64_t now = end_ns_ ? end_ns_ : NowNs();
  uint64_t transferred = 0;
  {
    // Socket byte counters are atomics; the vectors only grow during setup.
    std::lock_guard<std::mutex> cl(ctl_mu_);
    for (auto& d : data_) transferred += d->bytes_written();
    if (control_) transferred += control_->bytes_written();
  }
  const double total_ms = Ms(now - start_ns_);
  nlohmann::json j = {
      {"status", MigrationStatusName(st)},
      {"uuid", FormatUuid(uuid_)},
      {"to", params_.to},
      {"channels", params_.channels},
      {"downtime_target_ms", params_.downtime_ms},
      {"max_bandwidth", params_.max_bandwidth},
      {"converge_policy", PolicyName(params_.policy)},
      {"setup_ms", Ms(setup_ns_)},
      {"total_ms", total_ms},
      {"expected_downtime_ms", expected_downtime_ms_},
      {"transferred_bytes", transferred},
      {"total_ram_bytes", ram_.size},
      {"remaining_bytes", remaining_pages_ * kWirePageSize},
      {"zero_pages", zero_pages_.load()},
      {"normal_pages", normal_pages_.load()},
      {"dirty_pages_rate", dirty_rate_},
      {"iterations", iterations_},
      {"mbps", bandwidth_bps_ / 1e6},
      {"converged", converged_},
      {"round_progress", {{"pages", round_pages_done_.load()}, {"of", round_pages_total_.load()}}},
      {"history", history_},
  };
  if (st == MigrationStatus::kCompleted) {
    j["downtime_ms"] = downtime_ms_;
    j["downtime_phases"] = {{"final_pages_ms", final_pages_ms_}, {"state_ms", state_ms_}, {"resume_ms", resume_ms_}};
    j["remaining_bytes"] = 0;
  }
  if (!error_.empty()) j["error"] = error_;
  return j;
}

}  // namespace ferry::migration
