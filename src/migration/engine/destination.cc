#include "migration/engine/destination.h"

#include <time.h>

#include <cstring>

#include <spdlog/spdlog.h>

namespace ferry::migration {
namespace {
uint64_t NowNs() {
  timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return static_cast<uint64_t>(ts.tv_sec) * 1'000'000'000ull + static_cast<uint64_t>(ts.tv_nsec);
}
double Ms(uint64_t ns) { return static_cast<double>(ns) / 1e6; }

std::string TypeName(const Record& r) {
  return IsKnownRecordType(r.header.type) ? std::string(RecordTypeName(r.type())) : fmt::format("type {}", r.header.type);
}
}  // namespace

Result<std::unique_ptr<IncomingMigration>> IncomingMigration::Listen(const std::string& endpoint) {
  auto ep = ParseEndpoint(endpoint);
  if (!ep) return std::unexpected(ep.error().WithContext("--incoming"));
  auto l = Listener::Listen(*ep);
  if (!l) return std::unexpected(l.error().WithContext("--incoming"));
  return std::unique_ptr<IncomingMigration>(new IncomingMigration(std::move(*l)));
}

IncomingMigration::~IncomingMigration() { Cleanup(); }

void IncomingMigration::Abort() {
  aborted_.store(true);
  listener_->Shutdown();
  std::lock_guard<std::mutex> l(mu_);
  for (auto& d : data_) d->Shutdown();
  if (control_) control_->Shutdown();
}

void IncomingMigration::Cleanup() {
  stopping_.store(true);
  listener_->Shutdown();
  if (acceptor_.joinable()) acceptor_.join();
  std::vector<std::thread> readers;
  {
    std::lock_guard<std::mutex> l(mu_);
    for (auto& d : data_) d->Shutdown();
    readers.swap(readers_);
  }
  if (control_) control_->Shutdown();
  cv_.notify_all();
  if (progress_.joinable()) progress_.join();
  for (auto& t : readers) t.join();
}

Status IncomingMigration::AcceptControl(const IncomingParams& params) {
  for (;;) {
    auto s = listener_->Accept(-1);
    if (aborted_) return Errorf(ErrorCode::kCancelled, "interrupted by the operator");
    if (!s) return std::unexpected(s.error());
    auto sock = std::move(*s);
    auto role = ReadPreamble(*sock, params.handshake_timeout_ms);
    if (!role) {
      spdlog::warn("incoming: dropped connection from {}: {}", sock->peer(), role.error().message());
      SendError(*sock, role.error());
      continue;
    }
    if (*role != Role::kControl) {
      spdlog::warn("incoming: dropped data connection from {}: no migration in progress", sock->peer());
      SendError(*sock, Error(ErrorCode::kBusy, "no migration in progress for this data connection"));
      continue;
    }
    auto rec = ReadRecord(*sock, params.handshake_timeout_ms);
    Result<Hello> hello = rec ? (rec->type() == RecordType::kHello ? DecodeHello(rec->payload)
                                                                    : Errorf(ErrorCode::kCorrupt, "expected HELLO, got {}", TypeName(*rec)))
                              : std::unexpected(rec.error());
    if (!hello) {
      spdlog::warn("incoming: dropped connection from {}: {}", sock->peer(), hello.error().message());
      SendError(*sock, hello.error());
      continue;
    }
    hello_ = *hello;
    FERRY_RETURN_IF_ERROR(WriteRecord(*sock, RecordType::kHelloAck, Encode(HelloAck{hello_.uuid, hello_.capabilities & kCapsSupported})), "handshake");
    {
      std::lock_guard<std::mutex> l(mu_);
      control_ = std::move(sock);
    }
    if (aborted_) return Errorf(ErrorCode::kCancelled, "interrupted by the operator");
    spdlog::info("incoming: migration {} from {} with {} data channels", FormatUuid(hello_.uuid), control_->peer(),
                 hello_.channels);
    std::lock_guard<std::mutex> l(mu_);
    channel_used_.assign(hello_.channels, false);
    return {};
  }
}

void IncomingMigration::AcceptLoop(const IncomingParams& params) {
  while (!stopping_) {
    auto s = listener_->Accept(-1);
    if (!s) {
      if (stopping_) return;
      continue;
    }
    auto sock = std::move(*s);
    auto role = ReadPreamble(*sock, params.handshake_timeout_ms);
    Result<DataHello> dh = std::unexpected(Error(ErrorCode::kBusy, "a migration is already in progress"));
    if (!role) {
      dh = std::unexpected(role.error());
    } else if (*role == Role::kData) {
      auto rec = ReadRecord(*sock, params.handshake_timeout_ms);
      if (!rec) dh = std::unexpected(rec.error());
      else if (rec->type() != RecordType::kDataHello) dh = Errorf(ErrorCode::kCorrupt, "expected DATA_HELLO, got {}", TypeName(*rec));
      else dh = DecodeDataHello(rec->payload);
      if (dh && dh->uuid != hello_.uuid) dh = Errorf(ErrorCode::kInvalidArgument, "data connection for another migration");
    }
    std::lock_guard<std::mutex> l(mu_);
    if (dh && (dh->channel >= channel_used_.size() || channel_used_[dh->channel]))
      dh = Errorf(ErrorCode::kCorrupt, "data channel index {} is out of range or already connected", dh->channel);
    if (!dh) {
      spdlog::warn("incoming: dropped connection from {}: {}", sock->peer(), dh.error().message());
      SendError(*sock, dh.error());
      continue;
    }
    channel_used_[dh->channel] = true;
    Socket* raw = sock.get();
    data_.push_back(std::move(sock));
    readers_.emplace_back([this, raw, ch = dh->channel] { DataReader(raw, ch); });
  }
}

void IncomingMigration::DataFailed(const Error& e) {
  {
    std::lock_guard<std::mutex> l(mu_);
    if (!data_error_) data_error_ = e;
  }
  cv_.notify_all();
  if (control_) control_->Shutdown();  // wake the control loop
}

Status IncomingMigration::CheckDataError() {
  std::lock_guard<std::mutex> l(mu_);
  if (data_error_) return std::unexpected(*data_error_);
  return {};
}

void IncomingMigration::DataReader(Socket* sock, uint32_t channel) {
  for (;;) {
    auto rec = ReadRecord(*sock, -1);
    if (stopping_) return;
    Status s = rec ? Status{} : Status(std::unexpected(rec.error()));
    if (rec) {
      bytes_received_ += kRecordHeaderSize + rec->payload.size();
      if (rec->type() == RecordType::kPages) s = ApplyPages(*rec);
      else if (!rec->header.mandatory() && !IsKnownRecordType(rec->header.type)) continue;
      else s = Errorf(ErrorCode::kCorrupt, "unexpected {} on a data channel", TypeName(*rec));
    }
    if (!s) {
      DataFailed(s.error().WithContext(fmt::format("data channel {}", channel)));
      return;
    }
    {
      std::lock_guard<std::mutex> l(mu_);
      ++batches_applied_;
    }
    cv_.notify_all();
  }
}

void IncomingMigration::ProgressLoop() {
  uint64_t sent = 0;
  std::unique_lock<std::mutex> l(mu_);
  while (!stopping_) {
    cv_.wait_for(l, std::chrono::milliseconds(50), [&] { return stopping_ || batches_applied_ != sent || data_error_; });
    if (stopping_ || data_error_) return;
    if (batches_applied_ == sent) continue;
    sent = batches_applied_;
    l.unlock();
    auto s = WriteRecord(*control_, RecordType::kProgress, Encode(Progress{sent, bytes_received_.load()}), false);
    // Coalesce: at most one PROGRESS per millisecond; the next loop reports what arrived meanwhile.
    std::this_thread::sleep_for(std::chrono::milliseconds(1));
    l.lock();
    if (!s) return;  // the control loop sees the broken connection
  }
}

Status IncomingMigration::ApplyPages(const Record& rec) {
  if (!ram_ready_.load(std::memory_order_acquire)) return Errorf(ErrorCode::kCorrupt, "PAGES before the configuration was accepted");
  auto v = DecodePages(rec.payload, ram_pages_);
  if (!v) return std::unexpected(v.error());
  if (v->seq == 0) return Errorf(ErrorCode::kCorrupt, "PAGES with seq 0");
  for (const auto& e : v->entries) {
    std::lock_guard<std::mutex> l(stripes_[e.gfn % kStripes]);
    if (v->seq <= last_seq_[e.gfn]) continue;  // an older copy than what we have
    uint8_t* dst = ram_.host + e.gfn * kWirePageSize;
    if (e.kind == PageKind::kRaw) {
      std::memcpy(dst, e.data.data(), kWirePageSize);
      touched_[e.gfn] = 1;
    } else if (touched_[e.gfn]) {
      std::memset(dst, 0, kWirePageSize);  // fresh RAM is already zero: never touch it
    }
    last_seq_[e.gfn] = v->seq;
  }
  pages_applied_ += v->entries.size();
  return {};
}

Result<IncomingResult> IncomingMigration::Run(DestinationVm* vm, const IncomingParams& params) {
  const uint64_t t0 = NowNs();
  IncomingResult out;
  FERRY_RETURN_IF_ERROR(AcceptControl(params), "incoming migration");
  out.uuid = FormatUuid(hello_.uuid);
  out.source = control_->peer();
  acceptor_ = std::thread([this, params] { AcceptLoop(params); });
  if (hello_.capabilities & kCapProgress) progress_ = std::thread([this] { ProgressLoop(); });
  auto s = ControlLoop(vm, params, &out);
  if (!s && aborted_) s = Errorf(ErrorCode::kCancelled, "interrupted by the operator");
  if (!s) {
    // Prefer the root cause from a data channel over the control read it interrupted.
    Error e = s.error();
    if (auto d = CheckDataError(); !d && e.code() != ErrorCode::kCancelled) e = d.error();
    SendError(*control_, e);
    Cleanup();
    return std::unexpected(e.WithContext("incoming migration"));
  }
  out.batches = batches_applied_;
  out.pages = pages_applied_;
  out.bytes = bytes_received_;
  out.total_ms = Ms(NowNs() - t0);
  Cleanup();
  return out;
}

Status IncomingMigration::ControlLoop(DestinationVm* vm, const IncomingParams& params, IncomingResult* out) {
  auto next = [&]() -> Result<Record> {
    for (;;) {
      auto r = ReadRecord(*control_, params.idle_timeout_ms);
      if (!r) return std::unexpected(r.error().WithContext("control channel"));
      if (r->type() == RecordType::kCancel) {
        auto reason = DecodeCancel(r->payload);
        return Errorf(ErrorCode::kCancelled, "source cancelled the migration: {}", reason ? *reason : "(unreadable reason)");
      }
      if (r->type() == RecordType::kError) {
        auto m = DecodeError(r->payload);
        return std::unexpected(m ? ToError(*m) : m.error());
      }
      if (!r->header.mandatory() && !IsKnownRecordType(r->header.type)) continue;
      return r;
    }
  };
  auto cfg_rec = next();
  if (!cfg_rec) return std::unexpected(cfg_rec.error());
  if (cfg_rec->type() != RecordType::kConfig) return Errorf(ErrorCode::kCorrupt, "expected CONFIG, got {}", TypeName(*cfg_rec));
  auto config = DecodeConfig(cfg_rec->payload);
  if (!config) return std::unexpected(config.error());
  auto ram = vm->Prepare(*config);
  if (!ram) return std::unexpected(ram.error().WithContext("configuration rejected"));
  ram_ = *ram;
  ram_pages_ = ram_.size / kWirePageSize;
  last_seq_.assign(ram_pages_, 0);
  touched_.assign(ram_pages_, 0);
  ram_ready_.store(true, std::memory_order_release);
  FERRY_RETURN_IF_ERROR(WriteRecord(*control_, RecordType::kConfigAck, {}), "send CONFIG_ACK");

  std::vector<StateRecord> state;
  End end;
  for (;;) {
    auto r = next();
    if (!r) return std::unexpected(r.error());
    if (r->type() == RecordType::kState) {
      auto st = DecodeState(r->payload);
      if (!st) return std::unexpected(st.error());
      state.push_back(std::move(*st));
    } else if (r->type() == RecordType::kEnd) {
      auto e = DecodeEnd(r->payload);
      if (!e) return std::unexpected(e.error());
      end = *e;
      t_end_ = NowNs();
      break;
    } else {
      return Errorf(ErrorCode::kCorrupt, "unexpected {} on the control channel", TypeName(*r));
    }
  }
  {
    std::unique_lock<std::mutex> l(mu_);
    bool ok = cv_.wait_for(l, std::chrono::milliseconds(params.idle_timeout_ms),
                           [&] { return data_error_.has_value() || batches_applied_ >= end.batches; });
    if (data_error_) return std::unexpected(*data_error_);
    if (!ok) return Errorf(ErrorCode::kTimeout, "END announced {} page batches, only {} arrived", end.batches, batches_applied_);
    if (batches_applied_ != end.batches)
      return Errorf(ErrorCode::kCorrupt, "END announced {} page batches, but {} arrived", end.batches, batches_applied_);
  }
  if (pages_applied_ != end.pages)
    return Errorf(ErrorCode::kCorrupt, "END announced {} pages, but {} arrived", end.pages, pages_applied_.load());
  const uint64_t t_restore = NowNs();
  FERRY_RETURN_IF_ERROR(vm->Restore(state), "restore state");
  out->restore_ms = Ms(NowNs() - t_restore);
  spdlog::info("incoming: END -> all pages applied {:.2f} ms, restore {:.2f} ms", Ms(t_restore - t_end_), out->restore_ms);
  FERRY_RETURN_IF_ERROR(WriteRecord(*control_, RecordType::kReady, EncodeU64(static_cast<uint64_t>(out->restore_ms * 1000))),
                        "send READY");
  auto go = next();
  if (!go) return std::unexpected(go.error());
  if (go->type() != RecordType::kGo) return Errorf(ErrorCode::kCorrupt, "expected GO, got {}", TypeName(*go));
  const uint64_t t_go = NowNs();
  FERRY_RETURN_IF_ERROR(vm->Start(), "start the guest");
  out->resume_ms = Ms(NowNs() - t_go);
  // The guest runs: from here on, failures no longer matter to the source's VM.
  (void)WriteRecord(*control_, RecordType::kResumed, EncodeU64(static_cast<uint64_t>(out->resume_ms * 1000)));
  return {};
}

}  // namespace ferry::migration
