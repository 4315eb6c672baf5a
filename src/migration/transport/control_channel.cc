#include "migration/transport/control_channel.h"

#include "common/clock.h"

namespace ferry::migration {
namespace {

std::string TypeName(const Record& r) {
  return IsKnownRecordType(r.header.type) ? std::string(RecordTypeName(r.type())) : fmt::format("record type {}", r.header.type);
}

}  // namespace

ControlChannel::ControlChannel(std::unique_ptr<Socket> socket, size_t max_queued)
    : socket_(std::move(socket)), max_queued_(std::max<size_t>(max_queued, 1)) {}

ControlChannel::~ControlChannel() { Shutdown(); }

void ControlChannel::Start(Fold fold) {
  fold_ = std::move(fold);
  reader_ = std::thread([this] { ReaderLoop(); });
}

void ControlChannel::ReaderLoop() {
  for (;;) {
    Record r;
    auto s = ReadRecordInto(*socket_, &r, -1);
    reader_cpu_ns_.store(ThreadCpuNs(), std::memory_order_relaxed);
    MutexLock l(mu_);
    if (!s) {
      if (!read_error_) read_error_ = s.error().WithContext("control channel");
      cv_.notify_all();
      return;
    }
    last_rx_ns_.store(NowNs(), std::memory_order_relaxed);
    if (r.type() == RecordType::kPing) continue;  // liveness only
    if (fold_ && fold_(r)) {
      cv_.notify_all();
      continue;
    }
    l.Wait(space_cv_, [&]() REQUIRES(mu_) { return queue_.size() < max_queued_ || stopping_; });
    if (stopping_) return;
    queue_.push_back(std::move(r));
    cv_.notify_all();
  }
}

Status ControlChannel::Send(RecordType type, std::span<const uint8_t> payload, bool mandatory) {
  return WriteRecord(*socket_, type, payload, mandatory);
}

std::optional<Error> ControlChannel::BlockedLocked() const {
  if (interrupt_) return interrupt_;
  return std::nullopt;
}

Error ControlChannel::RecordError(const Record& r) {
  if (r.type() == RecordType::kError) {
    auto m = DecodeError(r.payload);
    return m ? ToError(*m) : m.error().WithContext("control channel");
  }
  auto reason = DecodeCancel(r.payload);
  return Error(ErrorCode::kCancelled, fmt::format("peer cancelled the migration: {}", reason ? *reason : "(unreadable reason)"));
}

Result<Record> ControlChannel::Next(int timeout_ms) {
  MutexLock l(mu_);
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::milliseconds(std::max(timeout_ms, 0));
  for (;;) {
    // What the peer sent before a local interrupt comes first (its CANCEL explains a lost data channel).
    while (!queue_.empty()) {
      Record r = std::move(queue_.front());
      queue_.pop_front();
      space_cv_.notify_one();
      if (r.type() == RecordType::kError || r.type() == RecordType::kCancel) return std::unexpected(RecordError(r));
      if (!r.header.mandatory() && !IsKnownRecordType(r.header.type)) continue;
      if (auto e = BlockedLocked()) return std::unexpected(*e);
      return r;
    }
    if (auto e = BlockedLocked()) return std::unexpected(*e);
    if (read_error_) return std::unexpected(*read_error_);
    if (timeout_ms < 0) {
      l.Wait(cv_);
    } else if (l.WaitUntil(cv_, deadline) == std::cv_status::timeout && queue_.empty() && !read_error_ && !interrupt_) {
      return Errorf(ErrorCode::kTimeout, "control channel: nothing from the peer within {} ms", timeout_ms);
    }
  }
}

Result<Record> ControlChannel::Await(RecordType want, int timeout_ms) {
  auto r = Next(timeout_ms);
  if (!r) {
    if (r.error().code() == ErrorCode::kTimeout)
      return Errorf(ErrorCode::kTimeout, "no {} from the peer within {} ms", RecordTypeName(want), timeout_ms);
    return r;
  }
  if (r->type() != want)
    return Errorf(ErrorCode::kCorrupt, "unexpected {} from the peer while waiting for {}", TypeName(*r), RecordTypeName(want));
  return r;
}

Status ControlChannel::WaitUntil(const std::function<bool()>& pred, int timeout_ms, std::string_view what) {
  MutexLock l(mu_);
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::milliseconds(std::max(timeout_ms, 0));
  for (;;) {
    if (auto e = BlockedLocked()) return std::unexpected(*e);
    if (pred()) return {};
    // A queued ERROR or CANCEL explains a stall better than the timeout would.
    for (const auto& r : queue_)
      if (r.type() == RecordType::kError || r.type() == RecordType::kCancel) return std::unexpected(RecordError(r));
    if (read_error_) return std::unexpected(*read_error_);
    if (timeout_ms < 0) {
      l.Wait(cv_);
    } else if (l.WaitUntil(cv_, deadline) == std::cv_status::timeout) {
      if (pred()) return {};
      return Errorf(ErrorCode::kTimeout, "{}: not reached within {} ms", what, timeout_ms);
    }
  }
}

std::optional<Error> ControlChannel::PeerVerdict(int wait_ms) {
  MutexLock l(mu_);
  auto find = [&]() REQUIRES(mu_) -> const Record* {
    for (const auto& r : queue_)
      if (r.type() == RecordType::kError || r.type() == RecordType::kCancel) return &r;
    return nullptr;
  };
  l.WaitFor(cv_, std::chrono::milliseconds(std::max(wait_ms, 0)), [&]() REQUIRES(mu_) { return find() || read_error_ || stopping_; });
  if (const Record* r = find()) return RecordError(*r);
  return std::nullopt;
}

void ControlChannel::Notify() {
  MutexLock l(mu_);
  cv_.notify_all();
}

void ControlChannel::Interrupt(Error e) {
  MutexLock l(mu_);
  if (!interrupt_) interrupt_ = std::move(e);
  cv_.notify_all();
}

void ControlChannel::Shutdown() {
  {
    MutexLock l(mu_);
    stopping_ = true;
    cv_.notify_all();
    space_cv_.notify_all();
  }
  socket_->Shutdown();
  if (reader_.joinable()) reader_.join();
}

std::optional<Error> ControlChannel::failure() const {
  MutexLock l(mu_);
  return read_error_;
}

}  // namespace ferry::migration
