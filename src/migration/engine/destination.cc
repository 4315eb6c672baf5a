#include "migration/engine/destination.h"

#include <algorithm>
#include <chrono>
#include <thread>

#include <spdlog/spdlog.h>

#include "common/clock.h"

namespace ferry::migration {
namespace {

std::string TypeName(const Record& r) {
  return IsKnownRecordType(r.header.type) ? std::string(RecordTypeName(r.type())) : fmt::format("type {}", r.header.type);
}

}  // namespace

Result<std::unique_ptr<IncomingMigration>> IncomingMigration::Listen(const std::string& endpoint, IncomingSecurity security) {
  auto ep = ParseEndpoint(endpoint);
  if (!ep) return std::unexpected(ep.error().WithContext("--incoming"));
  if (ep->tls && (!security.tls || !security.tls->ctx() || !security.tls->server()))
    return Errorf(ErrorCode::kInvalidArgument, "--incoming {}: TLS needs --tls-cert, --tls-key and --tls-ca", endpoint);
  if (!ep->tls && security.tls)
    return Errorf(ErrorCode::kInvalidArgument, "--incoming {}: TLS certificates were given for a plaintext endpoint: use tls:ADDR:PORT", endpoint);
  auto l = Listener::Listen(*ep);
  if (!l) return std::unexpected(l.error().WithContext("--incoming"));
  if (!ep->tls && !security.allow_plaintext && !(*l)->loopback())
    return Errorf(ErrorCode::kInvalidArgument,
                  "--incoming {}: a plaintext listener on an address other than loopback would accept a VM - its memory, "
                  "CPU state and devices - from anyone who reaches the port: use tls:ADDR:PORT with --tls-cert, --tls-key "
                  "and --tls-ca, or --allow-plaintext on a network you trust",
                  endpoint);
  std::unique_ptr<IncomingMigration> in(new IncomingMigration(std::move(*l)));
  in->listen_ = endpoint;
  in->tls_ = std::move(security.tls);
  return in;
}

IncomingMigration::~IncomingMigration() { Cleanup(); }

void IncomingMigration::Abort() {
  aborted_.store(true);
  listener_->Shutdown();
  ControlChannel* control = nullptr;
  {
    MutexLock l(mu_);
    for (auto& d : data_) d->Shutdown();
    control = control_.get();
  }
  cv_.notify_all();
  ControlInterrupt(control, Error(ErrorCode::kCancelled, "interrupted by the operator"));
}

void IncomingMigration::Cleanup() {
  {
    MutexLock l(mu_);  // a greeting registers data channels under mu_ (it sees stopping_)
    stopping_.store(true);
  }
  listener_->Shutdown();
  if (acceptor_.joinable()) acceptor_.join();
  handshakes_.ShutdownAll();  // greetings still reading end now; none adds a reader after this
  handshakes_.JoinAll();
  std::vector<std::thread> readers;
  {
    MutexLock l(mu_);
    for (auto& d : data_) d->Shutdown();
    readers.swap(readers_);
  }
  cv_.notify_all();
  if (progress_.joinable()) progress_.join();
  if (control_) control_->Shutdown();
  for (auto& t : readers) t.join();
}

Status IncomingMigration::AcceptControl(const IncomingParams& params) {
  // Every connection is greeted on its own thread (HandshakeThreads): the first proper HELLO wins,
  // and a peer that trickles bytes or says nothing holds up no one else.
  const auto greeted = [this](std::unique_ptr<Socket> sock, Result<Preamble> pre, Result<Record> rec) {
    Result<Hello> hello = Errorf(ErrorCode::kInternal, "no greeting");
    if (!pre) hello = std::unexpected(pre.error());
    else if (pre->role != Role::kControl) hello = Errorf(ErrorCode::kBusy, "no migration in progress for this data connection");
    else if (!rec) hello = std::unexpected(rec.error());
    else hello = rec->type() == RecordType::kHello ? DecodeHello(rec->payload)
                                                   : Errorf(ErrorCode::kCorrupt, "expected HELLO, got {}", TypeName(*rec));
    MutexLock l(mu_);
    if (hello && (control_taken_ || candidate_))
      hello = Errorf(ErrorCode::kBusy, "another source was first: a migration is already in progress");
    if (!hello) {
      spdlog::warn("incoming: dropped connection from {}: {}", sock->peer(), hello.error().message());
      SendError(*sock, hello.error());
      return;
    }
    candidate_ = Candidate{std::move(sock), *hello, pre->version};
    cv_.notify_all();
    listener_->Wake();  // AcceptControl's wait for a connection ends: it takes the source now
  };
  for (;;) {
    if (aborted_) return Errorf(ErrorCode::kCancelled, "interrupted by the operator");
    {
      MutexLock l(mu_);
      if (candidate_) {
        Candidate c = std::move(*candidate_);
        candidate_.reset();
        control_taken_ = true;
        l.Unlock();
        return TakeControl(std::move(c), params);
      }
    }
    // Until the next connection, or a greeting thread handing over a source (it wakes the wait).
    auto s = listener_->Accept(-1);
    if (aborted_) return Errorf(ErrorCode::kCancelled, "interrupted by the operator");
    if (!s) {
      if (s.error().code() == ErrorCode::kTimeout) continue;
      return std::unexpected(s.error());
    }
    auto sock = std::move(*s);
    if (!handshakes_.Spawn(&sock, tls_.get(), params.handshake_timeout_ms, params.max_protocol_version, greeted))
      SendError(*sock, Error(ErrorCode::kBusy, "the destination is shutting down"));
  }
}

Status IncomingMigration::TakeControl(Candidate c, const IncomingParams& params) {
  hello_ = c.hello;
  version_ = c.version;
  caps_ = NegotiateCaps(version_, hello_.capabilities, params.capabilities);
  FERRY_RETURN_IF_ERROR(WriteRecord(*c.sock, RecordType::kHelloAck, Encode(HelloAck{hello_.uuid, caps_})), "handshake");
  const std::string peer = c.sock->tls() ? fmt::format("{} (TLS, certificate '{}')", c.sock->peer(), c.sock->peer_cert_name())
                                          : c.sock->peer();
  {
    MutexLock l(mu_);
    control_ = std::make_unique<ControlChannel>(std::move(c.sock));
    channel_used_.assign(hello_.channels, false);
  }
  control_->Start([this](const Record& r) { return FoldControl(r); });
  if (aborted_) return Errorf(ErrorCode::kCancelled, "interrupted by the operator");
  spdlog::info("incoming: migration {} from {}: protocol v{}, {} data channels, capabilities {:#x}", FormatUuid(hello_.uuid), peer,
               version_, hello_.channels, caps_);
  return {};
}

void IncomingMigration::Greeted(std::unique_ptr<Socket> sock, Result<Preamble> pre, Result<Record> rec, const IncomingParams& params) {
  Result<DataHello> dh = std::unexpected(Error(ErrorCode::kBusy, "a migration is already in progress"));
  if (!pre) {
    dh = std::unexpected(pre.error());
  } else if (pre->role == Role::kControl) {
    // A source coming back after a cut during post-copy: HELLO with this migration's uuid.
    Result<Hello> h = rec ? (rec->type() == RecordType::kHello ? DecodeHello(rec->payload)
                                                               : Errorf(ErrorCode::kCorrupt, "expected HELLO, got {}", TypeName(*rec)))
                          : std::unexpected(rec.error());
    if (h && h->uuid == hello_.uuid && pre->version == version_) {
      MutexLock l(mu_);
      if (recovering_ && !recover_sock_ && !stopping_) {
        recover_sock_ = std::move(sock);
        cv_.notify_all();
        return;
      }
    }
    dh = h ? Errorf(ErrorCode::kBusy, "a migration is already in progress") : std::unexpected(h.error());
  } else if (pre->role == Role::kData) {
    if (!rec) dh = std::unexpected(rec.error());
    else if (rec->type() != RecordType::kDataHello) dh = Errorf(ErrorCode::kCorrupt, "expected DATA_HELLO, got {}", TypeName(*rec));
    else dh = DecodeDataHello(rec->payload);
    if (dh && dh->uuid != hello_.uuid) dh = Errorf(ErrorCode::kInvalidArgument, "data connection for another migration");
    if (dh && pre->version != version_)
      dh = Errorf(ErrorCode::kVersionMismatch, "data connection speaks protocol v{}, the migration v{}", pre->version, version_);
  }
  MutexLock l(mu_);
  if (dh && stopping_) dh = Errorf(ErrorCode::kBusy, "the migration is over");
  if (dh && recovering_) dh = Errorf(ErrorCode::kBusy, "the migration waits for its source to reconnect its control connection first");
  if (dh && (dh->channel >= channel_used_.size() || channel_used_[dh->channel]))
    dh = Errorf(ErrorCode::kCorrupt, "data channel index {} is out of range or already connected", dh->channel);
  if (!dh) {
    spdlog::warn("incoming: dropped connection from {}: {}", sock->peer(), dh.error().message());
    SendError(*sock, dh.error());
    return;
  }
  channel_used_[dh->channel] = true;
  if (postcopy_active_.load()) sock->SetUserTimeout(params.liveness_timeout_ms);
  Socket* raw = sock.get();
  data_.push_back(std::move(sock));
  readers_.emplace_back([this, raw, ch = dh->channel] { DataReader(raw, ch); });
}

void IncomingMigration::AcceptLoop(const IncomingParams& params) {
  while (!stopping_) {
    auto s = listener_->Accept(-1);
    if (!s) {
      // Abort() shuts the listener down without stopping_: every further accept fails at once,
      // so this loop ends on either (it spun on the dead listener until Cleanup()).
      if (stopping_ || aborted_) return;
      // Out of descriptors (EMFILE) and the like: the pending connection stays queued and poll
      // reports it again at once - a pause instead of a busy loop.
      if (s.error().code() != ErrorCode::kTimeout) std::this_thread::sleep_for(std::chrono::milliseconds(10));
      continue;
    }
    auto sock = std::move(*s);
    const auto greeted = [this, params](std::unique_ptr<Socket> c, Result<Preamble> pre, Result<Record> rec) {
      Greeted(std::move(c), std::move(pre), std::move(rec), params);
    };
    if (!handshakes_.Spawn(&sock, tls_.get(), params.handshake_timeout_ms, params.max_protocol_version, greeted))
      SendError(*sock, Error(ErrorCode::kBusy, "the destination is shutting down"));
  }
}

void IncomingMigration::DataFailed(const Error& e) {
  ControlChannel* control = nullptr;
  {
    MutexLock l(mu_);
    if (!data_error_) data_error_ = e;
    control = control_.get();  // under mu_: a post-copy recovery may be replacing control_
  }
  cv_.notify_all();
  // A replaced channel stays alive in retired_controls_.
  ControlInterrupt(control, e);  // wake the control loop
}

void IncomingMigration::ControlInterrupt(ControlChannel* control, const Error& e) {
  if (control) control->Interrupt(e);
}

Status IncomingMigration::CheckDataError() {
  MutexLock l(mu_);
  if (data_error_) return std::unexpected(*data_error_);
  return {};
}

void IncomingMigration::DataReader(Socket* sock, uint32_t channel) {
  Record rec;
  Decompressor dec;
  std::vector<uint8_t> scratch;
  for (;;) {
    auto r = ReadRecordInto(*sock, &rec, -1);
    if (stopping_) return;
    if (!r && r.error().code() == ErrorCode::kIo) {
      // Sealed (pre-copy, every announced page record applied): the data channels have nothing
      // more to carry. Their close - a cut, or a source that lost its control connection after
      // GO - must not race the GO on the control channel, which alone decides from here.
      ReaderLock seal(seal_mu_);
      if (sealed_) return;
    }
    Status s = r;
    if (r) {
      bytes_received_ += kRecordHeaderSize + rec.payload.size();
      if (!rec.header.mandatory() && !IsKnownRecordType(rec.header.type)) continue;
      ReaderLock seal(seal_mu_);
      if (sealed_) {
        s = Errorf(ErrorCode::kCorrupt, "{} after END: every page record it announced was applied already", TypeName(rec));
      } else {
        s = ApplyRecord(rec, dec, &scratch);
        if (s) {
          MutexLock l(mu_);
          ++batches_applied_;
        }
      }
    }
    if (!s) {
      DataFailed(s.error().WithContext(fmt::format("data channel {}", channel)));
      return;
    }
    cv_.notify_all();
  }
}

Status IncomingMigration::ApplyRecord(const Record& rec, Decompressor& dec, std::vector<uint8_t>* scratch) {
  if (!ram_ready_.load(std::memory_order_acquire))
    return Errorf(ErrorCode::kCorrupt, "{} before the configuration was accepted", TypeName(rec));
  Result<PagesView> v = Errorf(ErrorCode::kCorrupt, "unexpected {} on a data channel", TypeName(rec));
  if (rec.type() == RecordType::kPages) v = DecodePages(rec.payload, ram_pages_);
  else if (rec.type() == RecordType::kEncodedPages && version_ >= 2) v = DecodeEncodedPages(rec.payload, ram_pages_, caps_, dec, scratch);
  else if (rec.type() == RecordType::kEncodedPages)
    v = Errorf(ErrorCode::kCorrupt, "ENCODED_PAGES in a protocol v{} migration", version_);
  if (!v) return std::unexpected(v.error());
  if (v->seq == 0) return Errorf(ErrorCode::kCorrupt, "{} with seq 0", TypeName(rec));
  return ApplyEntries(*v);
}

Status IncomingMigration::ApplyEntries(const PagesView& v) {
  PageSink* const sink = active_sink_.load(std::memory_order_acquire);
  uint64_t zero = 0, raw = 0, delta = 0, free = 0;
  for (const auto& e : v.entries) {
    for (uint64_t p = e.gfn; p < e.gfn + e.count; ++p) {
      MutexLock l(stripes_[p % kStripes]);
      uint64_t& last = last_seq_[p];
      if (e.kind == PageKind::kDelta && last != e.base_seq)
        return Errorf(ErrorCode::kCorrupt, "delta for page {} was made against the copy of seq {}, but the page holds seq {}", p,
                      e.base_seq, last);
      if (v.seq <= last) continue;  // an older copy than what we have
      switch (e.kind) {
        case PageKind::kRaw: FERRY_RETURN_IF_ERROR(sink->WritePage(p, e.data), "apply"); ++raw; break;
        case PageKind::kZero:
        case PageKind::kZeroRun: FERRY_RETURN_IF_ERROR(sink->ZeroPage(p), "apply"); ++zero; break;
        case PageKind::kFreeRun: FERRY_RETURN_IF_ERROR(sink->FreePage(p), "apply"); ++free; break;
        case PageKind::kDelta: FERRY_RETURN_IF_ERROR(sink->ApplyDelta(p, e.data), "apply"); ++delta; break;
      }
      last = v.seq;
    }
  }
  pages_applied_ += v.pages;
  zero_pages_ += zero;
  raw_pages_ += raw;
  delta_pages_ += delta;
  free_pages_ += free;
  return {};
}

void IncomingMigration::ProgressLoop() {
  uint64_t sent = 0, last_send = NowNs();
  MutexLock l(mu_);
  while (!stopping_ && !progress_stop_) {
    l.WaitFor(cv_, std::chrono::milliseconds(50),
              [&]() REQUIRES(mu_) { return stopping_ || progress_stop_ || batches_applied_ != sent || data_error_; });
    if (stopping_ || progress_stop_ || data_error_) return;
    if (batches_applied_ == sent) {
      // Post-copy: a quiet connection is still checked (the source pings as well; a path that
      // drops everything fails the connection after liveness_timeout_ms).
      if (postcopy_active_.load() && NowNs() - last_send > 250'000'000) {
        l.Unlock();
        last_send = NowNs();
        auto s = SendControl(RecordType::kPing, {}, false);
        l.Lock();
        if (!s) return;
      }
      continue;
    }
    sent = batches_applied_;
    l.Unlock();
    last_send = NowNs();
    auto s = SendControl(RecordType::kProgress, Encode(Progress{sent, bytes_received_.load()}), false);
    // Coalesce: at most one PROGRESS per millisecond; the next loop reports what arrived meanwhile.
    std::this_thread::sleep_for(std::chrono::milliseconds(1));
    l.Lock();
    if (!s) return;  // the control loop sees the broken connection
  }
}

Result<IncomingResult> IncomingMigration::Run(DestinationVm* vm, const IncomingParams& params) {
  const uint64_t t0 = NowNs();
  IncomingResult out;
  liveness_timeout_ms_ = params.liveness_timeout_ms;
  if (auto a = AcceptControl(params); !a) {
    SetFinal(a, out);
    return std::unexpected(a.error().WithContext("incoming migration"));
  }
  out.uuid = FormatUuid(hello_.uuid);
  out.source = control_->socket().peer();
  out.protocol_version = version_;
  out.capabilities = caps_;
  t_start_ns_.store(NowNs());
  SetPhase(IncomingPhase::kReceiving, out);
  acceptor_ = std::thread([this, params] { AcceptLoop(params); });
  if (caps_ & kCapProgress) StartProgress();
  auto s = ControlLoop(vm, params, &out);
  if (!s && aborted_) s = Errorf(ErrorCode::kCancelled, "interrupted by the operator");
  if (!s) {
    // The source's own CANCEL/ERROR explains everything; else prefer the root cause from a data
    // channel over the control read it interrupted.
    Error e = s.error();
    if (auto peer = control_->PeerVerdict(e.code() == ErrorCode::kCancelled ? 0 : 50)) e = *peer;
    else if (auto d = CheckDataError(); !d && e.code() != ErrorCode::kCancelled) e = d.error();
    SendError(control_->socket(), e);
    SetFinal(std::unexpected(e), out);
    Cleanup();
    return std::unexpected(e.WithContext("incoming migration"));
  }
  {
    // Post-copy's data readers still count records until Cleanup() joins them.
    MutexLock l(mu_);
    out.batches = batches_applied_;
  }
  out.pages = pages_applied_;
  out.bytes = bytes_received_;
  out.zero_pages = zero_pages_;
  out.raw_pages = raw_pages_;
  out.delta_pages = delta_pages_;
  out.free_pages = free_pages_;
  out.total_ms = MsFromNs(NowNs() - t0);
  SetFinal({}, out);
  Cleanup();
  return out;
}

Status IncomingMigration::ControlLoop(DestinationVm* vm, const IncomingParams& params, IncomingResult* out) {
  auto next = [&]() { return control_->Next(params.idle_timeout_ms); };
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
  sink_ = std::make_unique<MemoryPageSink>(ram_);
  active_sink_.store(sink_.get(), std::memory_order_release);
  ram_ready_.store(true, std::memory_order_release);
  FERRY_RETURN_IF_ERROR(control_->Send(RecordType::kConfigAck, {}), "send CONFIG_ACK");

  std::vector<StateRecord> state;
  uint64_t state_bytes = 0;
  End end;
  for (;;) {
    auto r = next();
    if (!r) return std::unexpected(r.error());
    if (r->type() == RecordType::kState) {
      auto st = DecodeState(r->payload);
      if (!st) return std::unexpected(st.error());
      state_bytes += st->blob.size();
      if (state.size() >= kMaxStateRecords || state_bytes > kMaxTotalStateBytes)
        return Errorf(ErrorCode::kCorrupt, "STATE records exceed the limit of {} records or {} MiB in total", kMaxStateRecords,
                      kMaxTotalStateBytes >> 20);
      state.push_back(std::move(*st));
    } else if (r->type() == RecordType::kEnd) {
      auto e = DecodeEnd(r->payload);
      if (!e) return std::unexpected(e.error());
      end = *e;
      t_end_ = NowNs();
      break;
    } else if (r->type() == RecordType::kPostcopy && (caps_ & kCapPostcopy) && !postcopy_start_) {
      auto pc = DecodePostcopyStart(r->payload, ram_pages_);
      if (!pc) return std::unexpected(pc.error());
      postcopy_start_ = std::move(*pc);
    } else {
      return Errorf(ErrorCode::kCorrupt, "unexpected {} on the control channel", TypeName(*r));
    }
  }
  {
    MutexLock l(mu_);
    // Abort() ends the wait too (also when no data connection exists whose shutdown would).
    bool ok = l.WaitFor(cv_, std::chrono::milliseconds(params.idle_timeout_ms), [&]() REQUIRES(mu_) {
      return data_error_.has_value() || batches_applied_ >= end.batches || aborted_.load();
    });
    if (aborted_) return Errorf(ErrorCode::kCancelled, "interrupted by the operator");
    if (data_error_) return std::unexpected(*data_error_);
    if (!ok) return Errorf(ErrorCode::kTimeout, "END announced {} page records, only {} arrived", end.batches, batches_applied_);
    if (batches_applied_ != end.batches)
      return Errorf(ErrorCode::kCorrupt, "END announced {} page records, but {} arrived", end.batches, batches_applied_);
  }
  if (!postcopy_start_) {
    // Sealed: from here on a page record is an error, never applied (post-copy's pages keep coming).
    WriterLock seal(seal_mu_);
    sealed_ = true;
    MutexLock l(mu_);
    if (batches_applied_ != end.batches)
      return Errorf(ErrorCode::kCorrupt, "END announced {} page records, but {} arrived", end.batches, batches_applied_);
  }
  if (pages_applied_ != end.pages)
    return Errorf(ErrorCode::kCorrupt, "END announced {} pages, but {} arrived", end.pages, pages_applied_.load());
  SetPhase(IncomingPhase::kRestoring, *out);
  if (postcopy_start_) {
    FERRY_RETURN_IF_ERROR(StartPostcopy(), "post-copy");
    out->postcopy_missing = postcopy_start_->missing_pages;
  }
  const uint64_t t_restore = NowNs();
  FERRY_RETURN_IF_ERROR(vm->Restore(state), "restore state");
  out->restore_ms = MsFromNs(NowNs() - t_restore);
  spdlog::info("incoming: END -> all pages applied {:.2f} ms, restore {:.2f} ms", MsFromNs(t_restore - t_end_), out->restore_ms);
  FERRY_RETURN_IF_ERROR(control_->Send(RecordType::kReady, EncodeU64(static_cast<uint64_t>(out->restore_ms * 1000))), "send READY");
  auto go = next();
  if (!go) return std::unexpected(go.error());
  if (go->type() != RecordType::kGo) return Errorf(ErrorCode::kCorrupt, "expected GO, got {}", TypeName(*go));
  const uint64_t t_go = NowNs();
  {
    // The commit point: a Cancel() either came first (the guest never starts here) or is refused.
    MutexLock l(commit_mu_);
    if (aborted_) return Errorf(ErrorCode::kCancelled, "interrupted by the operator");
    guest_started_.store(true);
  }
  t_go_ns_.store(t_go);
  FERRY_RETURN_IF_ERROR(vm->Start(), "start the guest");
  const uint64_t t_running = NowNs();
  out->resume_ms = MsFromNs(t_running - t_go);
  // CLOCK_MONOTONIC, so a client's clock on this host can be compared (bench/echo-floor --migrate).
  spdlog::info("incoming: GO -> guest running {:.2f} ms (monotonic {:.6f} s)", out->resume_ms, static_cast<double>(t_running) / 1e9);
  if (!postcopy_) {
    // The guest runs: from here on, failures no longer matter to the source's VM.
    (void)control_->Send(RecordType::kResumed, EncodeU64(static_cast<uint64_t>(out->resume_ms * 1000)));
    return {};
  }
  FERRY_RETURN_IF_ERROR(control_->Send(RecordType::kResumed, EncodeU64(static_cast<uint64_t>(out->resume_ms * 1000))),
                        "send RESUMED");
  SetPhase(IncomingPhase::kPostcopy, *out);
  auto s = PostcopyLoop(params, out);
  out->postcopy_ms = MsFromNs(NowNs() - t_go);
  return s;
}

// ---------------------------------------------------------------- post-copy

Status IncomingMigration::StartPostcopy() {
  auto request = [this](uint64_t gfn, uint32_t count) {
    return SendControl(RecordType::kPageRequest, Encode(PageRequest{gfn, count}));
  };
  auto pc = PostcopyRam::Start(ram_, *postcopy_start_, request);
  if (!pc) return std::unexpected(pc.error());
  postcopy_ = std::move(*pc);
  pc_view_.store(postcopy_.get());
  // No page record is in flight (END's count arrived); from here pages go to the post-copy sink.
  active_sink_.store(postcopy_.get(), std::memory_order_release);
  postcopy_active_.store(true, std::memory_order_release);
  {
    MutexLock l(mu_);
    control_->socket().SetUserTimeout(liveness_timeout_ms_);
    for (auto& d : data_) d->SetUserTimeout(liveness_timeout_ms_);
  }
  spdlog::info("incoming: post-copy: the guest starts without {} pages", postcopy_start_->missing_pages);
  return {};
}

bool IncomingMigration::FoldControl(const Record& r) {
  if (r.type() != RecordType::kEncodedPages || !postcopy_active_.load(std::memory_order_acquire)) return false;
  Status s = ApplyRecord(r, ctl_dec_, &ctl_scratch_);
  {
    MutexLock l(mu_);
    if (s) ++ctl_batches_;
    else if (!data_error_) data_error_ = s.error().WithContext("requested pages");
  }
  cv_.notify_all();
  return static_cast<bool>(s);  // a bad record is queued: the control loop fails on it with data_error_
}

Status IncomingMigration::SendControl(RecordType type, std::span<const uint8_t> payload, bool mandatory) {
  MutexLock l(send_mu_);
  return control_->Send(type, payload, mandatory);
}

void IncomingMigration::StartProgress() {
  progress_stop_.store(false);
  progress_ = std::thread([this] { ProgressLoop(); });
}

void IncomingMigration::StopProgress() {
  progress_stop_.store(true);
  cv_.notify_all();
  if (progress_.joinable()) progress_.join();
}

bool IncomingMigration::Recoverable(const Error& e) {
  if (aborted_ || stopping_) return false;
  // The source's own ERROR or CANCEL ends it for good; so does anything but a lost connection
  // (a corrupt record, a page that was not missing, ...).
  if (control_->PeerVerdict(0)) return false;
  return e.code() == ErrorCode::kIo || e.code() == ErrorCode::kTimeout;
}

Status IncomingMigration::PostcopyWait(const IncomingParams& params) {
  auto r = control_->Next(params.idle_timeout_ms);
  if (!r) {
    if (auto d = CheckDataError(); !d && d.error().code() != ErrorCode::kIo && d.error().code() != ErrorCode::kTimeout)
      return std::unexpected(d.error());
    return std::unexpected(r.error().WithContext("post-copy"));
  }
  if (r->type() != RecordType::kPostcopyEnd) {
    if (auto d = CheckDataError(); !d) return std::unexpected(d.error());
    return Errorf(ErrorCode::kCorrupt, "post-copy: expected POSTCOPY_END, got {}", TypeName(*r));
  }
  auto end = DecodeEnd(r->payload);
  if (!end) return std::unexpected(end.error().WithContext("POSTCOPY_END"));
  {
    MutexLock l(mu_);
    auto applied = [&]() REQUIRES(mu_) { return batches_applied_ + ctl_batches_ - gen_batches_base_; };
    bool ok = l.WaitFor(cv_, std::chrono::milliseconds(params.idle_timeout_ms),
                        [&]() REQUIRES(mu_) { return data_error_.has_value() || applied() >= end->batches; });
    if (data_error_) return std::unexpected(*data_error_);
    if (!ok) return Errorf(ErrorCode::kTimeout, "POSTCOPY_END announced {} page records, only {} arrived", end->batches, applied());
    if (applied() != end->batches)
      return Errorf(ErrorCode::kCorrupt, "POSTCOPY_END announced {} page records, but {} arrived", end->batches, applied());
  }
  if (pages_applied_ - gen_pages_base_ != end->pages)
    return Errorf(ErrorCode::kCorrupt, "POSTCOPY_END announced {} pages, but {} arrived", end->pages, pages_applied_ - gen_pages_base_);
  if (auto f = postcopy_->failure()) return std::unexpected(*f);
  if (!postcopy_->complete())
    return Errorf(ErrorCode::kCorrupt, "POSTCOPY_END, but {} pages are still missing", postcopy_->missing() - postcopy_->placed());
  return {};
}

Status IncomingMigration::AwaitRecovery(const IncomingParams& params, const Error& why) {
  spdlog::warn("incoming: post-copy interrupted ({}); {} of {} pages still missing; waiting up to {} ms for the source to reconnect",
               why.message(), postcopy_->missing() - postcopy_->placed(), postcopy_->missing(), params.recover_timeout_ms);
  StopProgress();
  std::vector<std::thread> readers;
  std::vector<std::unique_ptr<Socket>> old_data;  // freed only after their readers are joined
  {
    MutexLock l(mu_);
    for (auto& d : data_) d->Shutdown();
    readers.swap(readers_);
    old_data.swap(data_);
    recovering_ = true;  // no data channel registers until the source is back (Greeted)
  }
  control_->Shutdown();
  for (auto& t : readers) t.join();
  old_data.clear();
  std::unique_ptr<Socket> sock;
  {
    MutexLock l(mu_);
    channel_used_.assign(channel_used_.size(), false);
    data_error_.reset();  // the cut is handled here; what fails from now on is reported
    const bool back = l.WaitFor(cv_, std::chrono::milliseconds(params.recover_timeout_ms),
                                [&]() REQUIRES(mu_) { return recover_sock_ != nullptr || aborted_.load(); });
    recovering_ = false;
    if (aborted_) return Errorf(ErrorCode::kCancelled, "interrupted by the operator");
    if (!back)
      return Errorf(ErrorCode::kTimeout, "post-copy: the source did not reconnect within {} ms (after: {})", params.recover_timeout_ms,
                    why.message());
    sock = std::move(recover_sock_);
    data_error_.reset();  // a reader of the old connections may have failed meanwhile
    gen_batches_base_ = batches_applied_ + ctl_batches_;
  }
  gen_pages_base_ = pages_applied_;
  sock->SetUserTimeout(params.liveness_timeout_ms);
  {
    MutexLock sl(send_mu_);
    MutexLock l(mu_);
    retired_controls_.push_back(std::move(control_));
    control_ = std::make_unique<ControlChannel>(std::move(sock));
  }
  control_->Start([this](const Record& r) { return FoldControl(r); });
  ++recoveries_;
  FERRY_RETURN_IF_ERROR(SendControl(RecordType::kHelloAck, Encode(HelloAck{hello_.uuid, caps_})), "recovery");
  const PostcopyStart now = postcopy_->MissingNow();
  FERRY_RETURN_IF_ERROR(SendControl(RecordType::kRecover, Encode(now)), "recovery");
  FERRY_RETURN_IF_ERROR(postcopy_->RequestOutstanding(), "recovery");
  StartProgress();
  spdlog::info("incoming: post-copy resumes with source {} ({} pages still missing)", control_->socket().peer(), now.missing_pages);
  return {};
}

Status IncomingMigration::PostcopyLoop(const IncomingParams& params, IncomingResult* out) {
  for (;;) {
    auto s = PostcopyWait(params);
    if (s) break;
    if (!Recoverable(s.error())) return s;
    SetPhase(IncomingPhase::kPostcopyPaused, *out);
    FERRY_RETURN_IF_ERROR(AwaitRecovery(params, s.error()), "post-copy");
    SetPhase(IncomingPhase::kPostcopy, *out);
  }
  FERRY_RETURN_IF_ERROR(postcopy_->Finish(), "post-copy");
  out->faults = postcopy_->Stats();
  out->recoveries = recoveries_;
  spdlog::info("incoming: post-copy complete: {} pages, {} demand faults (p50 {} us, p99 {} us), {} local faults, {} duplicates, "
               "{} recoveries",
               postcopy_->missing(), out->faults.demand_faults, out->faults.p50_us, out->faults.p99_us, out->faults.local_faults,
               out->faults.duplicate_pages, recoveries_);
  FERRY_RETURN_IF_ERROR(SendControl(RecordType::kPostcopyDone, Encode(out->faults)), "send POSTCOPY_DONE");
  return {};
}

// ---------------------------------------------------------------- progress

Status IncomingMigration::Cancel() {
  MutexLock l(commit_mu_);
  if (guest_started_.load())
    return Errorf(ErrorCode::kBusy,
                  "the guest already runs on this destination (GO was received): an incoming migration can only be "
                  "cancelled before GO");
  const IncomingPhase p = phase_.load();
  if (IsFinal(p)) return Errorf(ErrorCode::kBusy, "the incoming migration has already ended ({})", IncomingPhaseName(p));
  Abort();
  return {};
}

void IncomingMigration::SetPhase(IncomingPhase p, const IncomingResult& out) {
  {
    MutexLock l(stats_mu_);
    info_.uuid = out.uuid;
    info_.source = out.source;
    info_.protocol_version = out.protocol_version;
    info_.capabilities = out.capabilities;
    info_.channels = hello_.channels;
    info_.restore_ms = out.restore_ms;
    info_.resume_ms = out.resume_ms;
    info_.postcopy_ms = out.postcopy_ms;
  }
  phase_.store(p);
}

void IncomingMigration::SetFinal(const Status& s, const IncomingResult& out) {
  t_final_ns_.store(NowNs());
  IncomingPhase p = IncomingPhase::kCompleted;
  if (!s) {
    p = s.error().code() == ErrorCode::kCancelled ? IncomingPhase::kCancelled : IncomingPhase::kFailed;
    MutexLock l(stats_mu_);
    info_.error = s.error().message();
    if (guest_started_.load())
      info_.error += " (after GO: the guest cannot run on without the pages the source still holds)";
  }
  SetPhase(p, out);
}

IncomingProgress IncomingMigration::Stats() const {
  // The phase first: once it is final, info_ holds the final figures (SetFinal stores it last).
  const IncomingPhase phase = phase_.load();
  IncomingProgress p;
  {
    MutexLock l(stats_mu_);
    p = info_;
  }
  p.phase = phase;
  p.listen = listen_;
  const uint64_t now = NowNs(), start = t_start_ns_.load(), fin = t_final_ns_.load(), go = t_go_ns_.load();
  const uint64_t end = fin ? fin : now;
  if (start && end > start) p.total_ms = MsFromNs(end - start);
  if (ram_ready_.load(std::memory_order_acquire)) p.ram_bytes = ram_pages_ * kWirePageSize;
  p.received_bytes = bytes_received_.load();
  p.received_pages = pages_applied_.load();
  p.zero_pages = zero_pages_.load();
  p.raw_pages = raw_pages_.load();
  p.delta_pages = delta_pages_.load();
  p.free_pages = free_pages_.load();
  {
    MutexLock l(mu_);
    p.received_records = batches_applied_ + ctl_batches_;
  }
  if (const PostcopyRam* pc = pc_view_.load()) {
    p.postcopy = true;
    p.postcopy_pages = pc->missing();
    p.postcopy_remaining_pages = pc->missing() - std::min(pc->placed(), pc->missing());
    p.faults = pc->Stats();
    // Final: GO -> last page in place as Run() measured it; before: GO -> now.
    if (p.postcopy_ms == 0 && go && end > go) p.postcopy_ms = MsFromNs(end - go);
  }
  return p;
}

}  // namespace ferry::migration
