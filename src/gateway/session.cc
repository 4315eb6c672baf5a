#include "gateway/session.h"

#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <spdlog/spdlog.h>
#include <linux/sockios.h>
#include <sys/eventfd.h>
#include <sys/ioctl.h>
#include <sys/socket.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <thread>

#include "common/clock.h"

namespace ferry::gateway {
namespace {
constexpr size_t kConnOutLimit = 256u << 10;  // per data conn queued bytes before we stop feeding it
constexpr size_t kReadBuf = 256u << 10;
constexpr size_t kMaxSpareBufs = 32;
constexpr int kZstdLevel = 1;
constexpr size_t kMaxCtrlBacklog = 1u << 20;  // unwritten control-connection bytes (replies) a peer may leave unread
}  // namespace

Session::Session(Gateway* gw, uint64_t id, int local_fd, std::unique_ptr<Conn> ctrl, size_t window, int streams)
    : gw_(gw), ctr_(gw->counters()), id_(id), local_fd_(local_fd), ctrl_(std::move(ctrl)),
      window_(window), wake_fd_(eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC)),
      forward_(gw->options().role == Role::kForward), streams_(streams) {
  scratch_.resize(kReadBuf);
}

Session::~Session() {
  if (local_fd_ >= 0) close(local_fd_);
  if (wake_fd_ >= 0) close(wake_fd_);
}

void Session::Wake() {
  uint64_t one = 1;
  [[maybe_unused]] auto r = write(wake_fd_, &one, sizeof one);
}

void Session::AddDataConn(std::unique_ptr<Conn> c, uint16_t index) {
  {
    MutexLock lk(inbox_mu_);
    inbox_.push_back(DataConn{std::move(c), index});
  }
  Wake();
}

std::string Session::StatusJsonFields() const {
  std::string detail;
  {
    MutexLock lk(diag_mu_);
    detail = detail_json_.empty() ? "{}" : detail_json_;
  }
  return fmt::format(
      R"({{"seq":{},"bytes_sent":{},"bytes_received":{},"data_conns":{},"unacked_bytes":{},"reorder_bytes":{},"detail":{}}})",
      seq, st_sent_.load(), st_received_.load(), st_data_conns_.load(), st_unacked_.load(), st_reorder_.load(), detail);
}

void Session::UpdateDetail() {
  // What an operator needs to see where a stream waits: the oldest chunk not yet acknowledged
  // and which connection carries it, the next chunk the receiver needs, and per connection the
  // bytes queued in the gateway and in the kernel.
  std::string conns;
  for (auto& d : data_) {
    int outq = 0, inq = 0;
    ioctl(d.c->fd(), SIOCOUTQ, &outq);
    ioctl(d.c->fd(), SIOCINQ, &inq);
    tcp_info ti{};
    socklen_t len = sizeof ti;
    getsockopt(d.c->fd(), IPPROTO_TCP, TCP_INFO, &ti, &len);
    sockaddr_storage la{};
    socklen_t lal = sizeof la;
    getsockname(d.c->fd(), reinterpret_cast<sockaddr*>(&la), &lal);
    uint16_t lport = la.ss_family == AF_INET6 ? ntohs(reinterpret_cast<sockaddr_in6*>(&la)->sin6_port)
                                              : ntohs(reinterpret_cast<sockaddr_in*>(&la)->sin_port);
    conns += fmt::format(
        R"({}{{"index":{},"local_port":{},"queued":{},"retry_len":{},"in_buffered":{},"kernel_unacked":{},"kernel_unread":{},)"
        R"("tcp_rtt_us":{},"tcp_rto_us":{},"tcp_backoff":{},"tcp_ca_state":{},"tcp_last_ack_recv_ms":{},"tcp_total_retrans":{}}})",
        conns.empty() ? "" : ",", d.index, lport, d.c->out.size() - d.c->out_off, d.c->last_write_len, d.c->in.size() - d.in_off,
        outq, inq, ti.tcpi_rtt, ti.tcpi_rto, ti.tcpi_backoff, ti.tcpi_ca_state, ti.tcpi_last_ack_recv,
        ti.tcpi_total_retrans);
  }
  std::string oldest = unacked_.empty() ? "null"
                                         : fmt::format(R"({{"seq":{},"conn":{}}})", unacked_.begin()->first,
                                                       unacked_.begin()->second.slot);
  std::string first_buffered = reorder_.empty() ? "null" : std::to_string(reorder_.begin()->first);
  std::string j = fmt::format(
      R"({{"next_seq":{},"oldest_unacked":{},"send_paused":{},"next_expected":{},"first_buffered":{},"chunks_buffered":{},"conns":[{}]}})",
      next_seq_, oldest, send_paused_, next_expected_, first_buffered, reorder_.size(), conns);
  MutexLock lk(diag_mu_);
  detail_json_ = std::move(j);
}

void Session::Pace(int fd) const {
  double mbit = gw_->options().max_rate_mbit;
  if (mbit <= 0) return;
  // Pacing keeps N streams in slow start from overrunning the WAN bottleneck queue together.
  double bytes = mbit * 1e6 / 8 * 1.25 / std::max(1, streams_);
  unsigned rate = bytes > 4e9 ? ~0u : static_cast<unsigned>(bytes);
  setsockopt(fd, SOL_SOCKET, SO_MAX_PACING_RATE, &rate, sizeof rate);
}

bool Session::ConnectDataConn(uint16_t index) {
  auto c = Conn::Connect(gw_->options().via, gw_->tls(), gw_->options().connect_timeout_ms);
  if (!c) {
    spdlog::warn("session {:016x}: data connection {}: {}", id_, index, c.error().ToString());
    return false;
  }
  PayloadWriter w;
  w.U64(id_).U16(index);
  if (!(*c)->WriteFrameBlocking(FrameType::kJoin, w.data()) || !(*c)->SetNonBlocking()) return false;
  Pace((*c)->fd());
  data_.push_back(DataConn{std::move(*c), index});
  ctr_.data_conns_active++;
  return true;
}

void Session::TakeInbox() {
  MutexLock lk(inbox_mu_);
  for (auto& d : inbox_) {
    if (!d.c->SetNonBlocking()) continue;
    Pace(d.c->fd());
    data_.push_back(std::move(d));
    ctr_.data_conns_active++;
  }
  inbox_.clear();
}

void Session::Run() {
  last_ctrl_rx_ = last_ping_ = last_ack_time_ = Clock::now();
  if (!ctrl_->SetNonBlocking()) {
    Fail("control connection setup", false);
  } else {
    std::vector<std::thread> connectors;
    if (forward_) {
      // Connect the data connections in parallel (each costs a TCP + TLS round
      // trip); they arrive through the inbox, the loop starts right away.
      have_no_data_since_ = true;
      no_data_since_ = Clock::now();
      for (int i = 0; i < gw_->options().streams; i++) {
        connectors.emplace_back([this, i] {
          auto c = Conn::Connect(gw_->options().via, gw_->tls(), gw_->options().connect_timeout_ms);
          if (!c) {
            spdlog::warn("session {:016x}: data connection {}: {}", id_, i, c.error().ToString());
            return;
          }
          PayloadWriter w;
          w.U64(id_).U16(static_cast<uint16_t>(i));
          if (!(*c)->WriteFrameBlocking(FrameType::kJoin, w.data())) return;
          AddDataConn(std::move(*c), static_cast<uint16_t>(i));
        });
      }
    }
    if (end_ == End::kNone) Loop();
    for (auto& t : connectors) t.join();
    TakeInbox();
  }
  ctr_.data_conns_active -= data_.size();
  data_.clear();
  if (end_ == End::kFailed) ctr_.sessions_failed++;
  spdlog::info("session {:016x} ended ({}): sent {} B, received {} B", id_,
               end_ == End::kClean ? "clean" : "failed", st_sent_.load(), st_received_.load());
}

void Session::SendCtrl(FrameType t, std::span<const uint8_t> p) { EncodeFrame(t, 0, p, &ctrl_->out); }

void Session::ResetLocal() {
  if (local_fd_ < 0) return;
  linger lg{1, 0};
  setsockopt(local_fd_, SOL_SOCKET, SO_LINGER, &lg, sizeof lg);
  close(local_fd_);
  local_fd_ = -1;
}

void Session::Fail(const std::string& why, bool tell_peer) {
  if (end_ != End::kNone) return;
  spdlog::warn("session {:016x} failed: {}", id_, why);
  end_ = End::kFailed;
  ResetLocal();
  if (tell_peer && ctrl_) {
    PayloadWriter w;
    w.Str(why);
    SendCtrl(FrameType::kReset, w.data());
    // Best effort: give the reset a moment to leave.
    for (int i = 0; i < 20 && ctrl_->out.size() > ctrl_->out_off; i++) {
      if (!FlushConn(*ctrl_)) break;
      if (ctrl_->out.size() > ctrl_->out_off) {
        pollfd p{ctrl_->fd(), POLLOUT, 0};
        poll(&p, 1, 10);
      }
    }
  }
}

void Session::ProtocolError(const std::string& why) {
  ctr_.protocol_errors++;
  if (ctrl_) {
    PayloadWriter w;
    w.U32(1).Str(why);
    SendCtrl(FrameType::kError, w.data());
  }
  Fail("protocol error: " + why, true);
}

std::vector<uint8_t> Session::TakeBuf() {
  if (spare_.empty()) return {};
  std::vector<uint8_t> b = std::move(spare_.back());
  spare_.pop_back();
  b.clear();
  return b;
}

void Session::GiveBuf(std::vector<uint8_t>&& b) {
  if (spare_.size() < kMaxSpareBufs && b.capacity() >= (64u << 10)) spare_.push_back(std::move(b));
}

std::vector<uint8_t> Session::MakeDataFrame(uint64_t seq, const uint8_t* p, size_t n) {
  PayloadWriter& w = payload_;
  w.data().clear();
  w.U64(seq).U32(static_cast<uint32_t>(n));
  uint16_t flags = 0;
  Codec codec = gw_->options().codec;
  if (codec != Codec::kNone && skip_compress_ == 0) {
    std::vector<uint8_t>& tmp = compress_tmp_;
    size_t clen = compressor_.Compress(codec, kZstdLevel, {p, n}, &tmp) ? tmp.size() : 0;
    if (clen > 0 && clen < n - n / 8) {  // pays: saves >= 12.5%
      flags = kFlagCompressed | (codec == Codec::kZstd ? kFlagCodecZstd : kFlagCodecLz4);
      w.Bytes({tmp.data(), clen});
      ctr_.chunks_compressed++;
      ctr_.compressed_saved_bytes += n - clen;
    } else {
      skip_compress_ = 16;  // incompressible: don't waste CPU on the next chunks
    }
  } else if (skip_compress_ > 0) {
    skip_compress_--;
  }
  if (!(flags & kFlagCompressed)) w.Bytes({p, n});
  std::vector<uint8_t> out = TakeBuf();
  EncodeFrame(FrameType::kData, flags, w.data(), &out);
  return out;
}

void Session::QueueChunk(DataConn& d, Chunk& c) {
  d.c->out.insert(d.c->out.end(), c.frame.begin(), c.frame.end());
  d.c->appended += c.frame.size();
  c.slot = d.index;
  c.end_pos = d.c->appended;
}

Session::DataConn* Session::PickConn(int exclude_index) {
  DataConn* best = nullptr;
  size_t best_q = SIZE_MAX;
  for (auto& d : data_) {
    if (d.index == exclude_index || d.stalled) continue;
    size_t q = d.c->out.size() - d.c->out_off;
    if (q < best_q) {
      best_q = q;
      best = &d;
    }
  }
  if (!best && exclude_index < 0) {  // every connection is marked stalled: use them anyway
    for (auto& d : data_) d.stalled = false;
    return data_.empty() ? nullptr : PickConn();
  }
  return best;
}

void Session::ReadLocal() {
  size_t chunk = gw_->options().chunk;
  for (int iter = 0; iter < 64; iter++) {
    if (local_fd_ < 0 || local_eof_) return;
    if (unacked_bytes_ >= window_) send_paused_ = true;
    if (send_paused_ && unacked_bytes_ <= window_ * 3 / 4) send_paused_ = false;
    if (send_paused_) return;
    DataConn* d = PickConn();
    if (!d || d->c->out.size() - d->c->out_off >= kConnOutLimit) return;
    ssize_t n = recv(local_fd_, scratch_.data(), std::min(chunk, scratch_.size()), 0);
    if (n < 0) {
      if (errno == EAGAIN || errno == EINTR) return;
      Fail(fmt::format("local connection: {}", strerror(errno)), true);
      return;
    }
    if (n == 0) {
      local_eof_ = true;
      return;
    }
    uint64_t seq = next_seq_++;
    Chunk c{MakeDataFrame(seq, scratch_.data(), n), d->index, static_cast<size_t>(n), 0};
    QueueChunk(*d, c);
    unacked_bytes_ += n;
    if (unacked_.empty()) ack_progress_ = Clock::now();
    unacked_.emplace(seq, std::move(c));
    ctr_.bytes_from_local += n;
    ctr_.chunks_sent++;
    st_sent_ += n;
  }
}

void Session::WriteLocal() {
  while (local_fd_ >= 0) {
    if (deliver_off_ == deliver_.size()) {
      auto it = reorder_.find(next_expected_);
      if (it == reorder_.end()) break;
      reorder_bytes_ -= it->second.size();
      GiveBuf(std::move(deliver_));
      deliver_ = std::move(it->second);
      deliver_off_ = 0;
      reorder_.erase(it);
      next_expected_++;
    }
    ssize_t n = send(local_fd_, deliver_.data() + deliver_off_, deliver_.size() - deliver_off_, MSG_NOSIGNAL);
    if (n < 0) {
      if (errno == EAGAIN || errno == EINTR) break;
      Fail(fmt::format("local connection: {}", strerror(errno)), true);
      return;
    }
    deliver_off_ += n;
    ctr_.bytes_to_local += n;
    st_received_ += n;
  }
  if (local_fd_ >= 0 && !local_wr_shut_ && peer_fin_ && next_expected_ == *peer_fin_ &&
      deliver_off_ == deliver_.size()) {
    shutdown(local_fd_, SHUT_WR);
    local_wr_shut_ = true;
  }
  MaybeAck(false);
}

void Session::MaybeAck(bool force) {
  // The ACK is cumulative: "all chunks below next_expected_ are delivered".
  // Acknowledging only delivered chunks makes it the credit for the window.
  uint64_t delivered = next_expected_ - (deliver_off_ < deliver_.size() ? 1 : 0);
  if (delivered == last_ack_sent_) return;
  auto now = Clock::now();
  if (!force && delivered - last_ack_sent_ < 8 && now - last_ack_time_ < std::chrono::milliseconds(5)) return;
  PayloadWriter w;
  w.U64(delivered);
  SendCtrl(FrameType::kAck, w.data());
  last_ack_sent_ = delivered;
  last_ack_time_ = now;
}

void Session::HandleDataFrame(const Frame& f) {
  if (f.type != FrameType::kData) return ProtocolError(fmt::format("{} frame on data connection", FrameTypeName(f.type)));
  PayloadReader r(f.payload);
  auto seq = r.U64();
  auto raw = r.U32();
  if (!seq || !raw) return ProtocolError("truncated DATA frame");
  if (*raw == 0 || *raw > (1u << 20)) return ProtocolError(fmt::format("bad DATA raw length {}", *raw));
  auto body = r.Rest();
  if (*seq < next_expected_ || reorder_.count(*seq)) {
    ctr_.chunks_duplicate++;
    return;
  }
  if (peer_fin_ && *seq >= *peer_fin_) return ProtocolError("DATA after FIN");
  std::vector<uint8_t> data = TakeBuf();
  if (f.flags & kFlagCompressed) {
    const Codec codec = (f.flags & kFlagCodecZstd) != 0 ? Codec::kZstd : Codec::kLz4;
    if (auto s = decompressor_.Decompress(codec, body, *raw, &data); !s)  // *raw is bounded above
      return ProtocolError(fmt::format("bad {} chunk: {}", CompressionName(codec), s.error().message()));
  } else {
    if (body.size() != *raw) return ProtocolError("DATA length mismatch");
    data.assign(body.begin(), body.end());
  }
  reorder_bytes_ += data.size();
  // The peer may not exceed our window; allow slack for chunk granularity.
  if (reorder_bytes_ > window_ + (4u << 20)) return ProtocolError("peer exceeded the window");
  reorder_.emplace(*seq, std::move(data));
}

void Session::HandleCtrlFrame(const Frame& f) {
  PayloadReader r(f.payload);
  switch (f.type) {
    case FrameType::kAck: {
      auto a = r.U64();
      if (!a || !r.ExpectEnd()) return ProtocolError("bad ACK");
      if (*a > next_seq_) return ProtocolError(fmt::format("ACK {} beyond sent {}", *a, next_seq_));
      if (!unacked_.empty() && unacked_.begin()->first < *a) ack_progress_ = Clock::now();
      while (!unacked_.empty() && unacked_.begin()->first < *a) {
        unacked_bytes_ -= unacked_.begin()->second.raw_len;
        GiveBuf(std::move(unacked_.begin()->second.frame));
        unacked_.erase(unacked_.begin());
      }
      return;
    }
    case FrameType::kFin: {
      auto e = r.U64();
      if (!e || !r.ExpectEnd()) return ProtocolError("bad FIN");
      if (peer_fin_ || *e < next_expected_) return ProtocolError("unexpected FIN");
      peer_fin_ = *e;
      return;
    }
    case FrameType::kReset:
    case FrameType::kError: {
      spdlog::info("session {:016x}: peer sent {}", id_, FrameTypeName(f.type));
      Fail(fmt::format("peer {}", FrameTypeName(f.type)), false);
      return;
    }
    case FrameType::kPing: {
      auto t = r.U64();
      if (!t || !r.ExpectEnd()) return ProtocolError("bad PING");
      // A peer that pings but does not read its replies would make them pile up: past
      // kMaxCtrlBacklog unwritten control bytes the session fails instead.
      if (ctrl_->out.size() - ctrl_->out_off > kMaxCtrlBacklog)
        return ProtocolError(fmt::format("peer does not read its control connection ({} bytes of replies pending)",
                                         ctrl_->out.size() - ctrl_->out_off));
      PayloadWriter w;
      w.U64(*t);
      SendCtrl(FrameType::kPong, w.data());
      return;
    }
    case FrameType::kPong: {
      auto t = r.U64();
      if (!t || !r.ExpectEnd()) return ProtocolError("bad PONG");
      int64_t d = static_cast<int64_t>(NowNs() - *t);
      if (d > 0) ctr_.rtt_us = d / 1000;
      return;
    }
    case FrameType::kStats:
      return;
    case FrameType::kClose:
      if (!r.ExpectEnd()) return ProtocolError("bad CLOSE");
      peer_closed_ = true;
      return;
    default:
      return ProtocolError(fmt::format("{} frame on control connection", FrameTypeName(f.type)));
  }
}

// Reads and decodes frames from conn `c` into handler. Returns false if the connection died.
template <typename Handler>
static Conn::IoResult Pump(Conn& c, size_t& off, std::vector<uint8_t>& scratch, GatewayCounters& ctr,
                           Handler&& h, std::string* err, bool* bad) {
  Conn::IoResult last = Conn::IoResult::kWouldBlock;
  for (int iter = 0; iter < 32; iter++) {
    size_t n = 0;
    last = c.Read(scratch.data(), scratch.size(), &n);
    if (last != Conn::IoResult::kOk) break;
    ctr.wire_bytes_received += n;
    c.in.insert(c.in.end(), scratch.begin(), scratch.begin() + n);
    for (;;) {
      size_t used = 0;
      auto f = DecodeFrame(std::span<const uint8_t>(c.in).subspan(off), &used);
      if (!f) {
        *err = f.error().ToString();
        *bad = true;
        return Conn::IoResult::kError;
      }
      if (!f->has_value()) break;
      off += used;
      if (!h(**f)) return Conn::IoResult::kWouldBlock;
    }
    if (off == c.in.size()) {
      c.in.clear();
      off = 0;
    } else if (off > (1u << 20)) {
      c.in.erase(c.in.begin(), c.in.begin() + off);
      off = 0;
    }
  }
  if (last == Conn::IoResult::kError) *err = c.last_error();
  return last;
}

void Session::ReadCtrl() {
  std::string err;
  bool bad = false;
  auto r = Pump(*ctrl_, ctrl_in_off_, scratch_, ctr_, [&](const Frame& f) {
    last_ctrl_rx_ = Clock::now();
    HandleCtrlFrame(f);
    return end_ == End::kNone;
  }, &err, &bad);
  if (end_ != End::kNone) return;
  if (bad) return ProtocolError("control: " + err);
  if (r == Conn::IoResult::kClosed || r == Conn::IoResult::kError) {
    if (peer_closed_) {
      CheckDone();
      if (end_ == End::kNone) Fail("peer closed before the session completed", false);
      return;
    }
    Fail("control connection lost: " + (err.empty() ? std::string("closed") : err), false);
  }
}

void Session::ReadData(DataConn& d) {
  std::string err;
  bool bad = false;
  auto r = Pump(*d.c, d.in_off, scratch_, ctr_, [&](const Frame& f) {
    HandleDataFrame(f);
    return end_ == End::kNone;
  }, &err, &bad);
  if (end_ != End::kNone) return;
  if (bad) return ProtocolError("data: " + err);
  if (r == Conn::IoResult::kClosed || r == Conn::IoResult::kError) {
    for (size_t i = 0; i < data_.size(); i++)
      if (&data_[i] == &d) return LoseDataConn(i, err.empty() ? "closed" : err);
  }
}

bool Session::FlushConn(Conn& c) {
  for (int iter = 0; iter < 64 && c.out_off < c.out.size(); iter++) {
    size_t len = c.last_write_len ? c.last_write_len : std::min<size_t>(c.out.size() - c.out_off, 256u << 10);
    size_t n = 0;
    auto r = c.Write(c.out.data() + c.out_off, len, &n);
    if (r == Conn::IoResult::kWouldBlock) {
      c.last_write_len = len;
      break;
    }
    if (r != Conn::IoResult::kOk) return false;
    c.last_write_len = 0;
    c.out_off += n;
    ctr_.wire_bytes_sent += n;
  }
  for (uint64_t cap = c.out.capacity(), cur = ctr_.conn_buffer_peak_bytes.load(std::memory_order_relaxed);
       cap > cur && !ctr_.conn_buffer_peak_bytes.compare_exchange_weak(cur, cap, std::memory_order_relaxed);) {
  }
  if (c.out_off == c.out.size()) {
    c.out.clear();
    c.out_off = 0;
  } else if (c.out_off >= (1u << 20) && c.out_off * 2 >= c.out.size()) {
    // Drop the written prefix once it is at least as large as what is left, so the copy is
    // paid for by bytes already sent. This must not wait for a TLS retry to finish
    // (last_write_len): a paced connection almost always has one pending, and the buffer
    // then grew to tens of MiB per connection, every new byte landing on a freshly faulted
    // page. Moving the pending bytes is allowed (SSL_MODE_ACCEPT_MOVING_WRITE_BUFFER).
    c.out.erase(c.out.begin(), c.out.begin() + c.out_off);
    c.out_off = 0;
  }
  return true;
}

void Session::LoseDataConn(size_t i, const std::string& why) {
  uint16_t index = data_[i].index;
  if (sent_close_ && unacked_.empty()) {  // finished: the peer is just closing
    data_.erase(data_.begin() + i);
    ctr_.data_conns_active--;
    return;
  }
  spdlog::warn("session {:016x}: data connection {} lost: {}", id_, index, why);
  data_.erase(data_.begin() + i);
  ctr_.data_conns_active--;
  ctr_.data_conns_lost++;
  if (forward_ && end_ == End::kNone) reconnect_.push_back(index);
  if (data_.empty()) {
    if (!have_no_data_since_) no_data_since_ = Clock::now();
    have_no_data_since_ = true;
  }
  // Re-send every unacknowledged chunk that was carried by the lost connection.
  // The receiver drops duplicates by sequence number.
  for (auto& [seq, c] : unacked_) {
    if (c.slot != index) continue;
    DataConn* d = PickConn();
    if (!d) {  // re-sent when a connection comes back (see Loop)
      orphans_ = true;
      break;
    }
    QueueChunk(*d, c);
    ctr_.chunks_retransmitted++;
  }
}

void Session::MaybeBypassStuckConn(Clock::time_point now) {
  // One TCP connection can crawl or stall while the others run: a retransmission lost again at
  // a full bottleneck queue puts it into exponential RTO back-off, or its congestion control
  // collapses in a long recovery (seen on the emulated 200 ms link: BBR paced one connection at
  // 0.1 Mbit/s with 22 MB queued while the other three sat idle). Every chunk behind the one it
  // carries waits, the window fills and the session stops. So when the session's cumulative
  // ACK has not moved for T, the oldest unacknowledged chunk has not even reached the peer's
  // kernel (its connection still holds bytes up to and including it) and another connection is
  // idle, the chunks on that connection are re-sent on the others; the receiver drops whichever
  // copy arrives second. A slow *reader* never triggers this: there the chunk has arrived.
  using namespace std::chrono;
  if (now - last_bypass_check_ < milliseconds(100)) return;
  last_bypass_check_ = now;
  for (auto& d : data_) {  // a bypassed connection gets chunks again once it has drained
    int outq = 0;
    if (d.stalled && d.c->out.size() == d.c->out_off && ioctl(d.c->fd(), SIOCOUTQ, &outq) == 0 && outq == 0)
      d.stalled = false;
  }
  if (unacked_.empty() || data_.size() < 2) return;
  const milliseconds stall = std::max(milliseconds(1000), milliseconds(3 * ctr_.rtt_us.load() / 1000));
  if (now - ack_progress_ < stall) return;
  const Chunk& oldest = unacked_.begin()->second;
  const uint16_t slot = oldest.slot;
  DataConn* stuck = nullptr;
  bool other_idle = false;
  int stuck_outq = 0;
  for (auto& d : data_) {
    int outq = 0;
    if (ioctl(d.c->fd(), SIOCOUTQ, &outq) != 0) outq = 0;
    size_t queued = d.c->out.size() - d.c->out_off;
    if (d.index == slot) {
      stuck = &d;
      stuck_outq = outq;
    } else if (queued == 0 && outq == 0) {
      other_idle = true;
    }
  }
  if (!stuck || !other_idle) return;  // gone (LoseDataConn re-sends), or no spare connection
  // Frame bytes of this connection the peer's kernel has not acknowledged yet, against the
  // bytes queued after the oldest chunk. The kernel counts TLS records: at most 22 bytes of
  // overhead per record, records are 16 KiB except the last of each write (up to 256 KiB).
  uint64_t outq = static_cast<uint64_t>(stuck_outq);
  if (stuck->c->tls()) {
    const uint64_t overhead = 22 * (outq / 16384 + 64);
    outq = outq > overhead ? outq - overhead : 0;
  }
  const uint64_t pending = (stuck->c->out.size() - stuck->c->out_off) + outq;
  const uint64_t after = stuck->c->appended - oldest.end_pos;
  if (pending <= after) return;  // the chunk has reached the peer: the receiving side is slow
  tcp_info ti{};
  socklen_t len = sizeof ti;
  getsockopt(stuck->c->fd(), IPPROTO_TCP, TCP_INFO, &ti, &len);
  stuck->stalled = true;
  size_t n = 0, bytes = 0;
  for (auto& [seq, c] : unacked_) {
    if (c.slot != slot) continue;
    DataConn* d = PickConn(slot);
    if (!d) return;
    QueueChunk(*d, c);
    n++;
    bytes += c.raw_len;
  }
  ctr_.conn_stalls++;
  ctr_.chunks_bypassed += n;
  spdlog::warn("session {:016x}: data connection {} stalled ({} bytes not delivered, session ACK stuck for {} ms; "
               "TCP: state {}, RTO back-off {}, last ACK {} ms ago, cwnd {}); re-sending its {} chunks ({} bytes) on "
               "the other connections",
               id_, slot, pending, duration_cast<milliseconds>(now - ack_progress_).count(), ti.tcpi_ca_state,
               ti.tcpi_backoff, ti.tcpi_last_ack_recv, ti.tcpi_snd_cwnd, n, bytes);
  ack_progress_ = now;
}

void Session::CheckDone() {
  if (end_ != End::kNone) return;
  bool send_done = fin_sent_ && unacked_.empty();
  bool recv_done = local_wr_shut_;
  if (send_done && recv_done) {
    if (!sent_close_) {
      SendCtrl(FrameType::kClose, {});
      sent_close_ = true;
      FlushConn(*ctrl_);
    }
    // Both sides wait for the other's CLOSE, so neither closes with unread
    // bytes in its socket (which would turn the close into a TCP reset).
    if (peer_closed_) {
      for (int i = 0; i < 50 && ctrl_->out_off < ctrl_->out.size(); i++) {
        if (!FlushConn(*ctrl_)) break;
        pollfd p{ctrl_->fd(), POLLOUT, 0};
        poll(&p, 1, 10);
      }
      end_ = End::kClean;
    }
  }
}

void Session::Loop() {
  const auto& o = gw_->options();
  std::vector<pollfd> pfds;
  while (end_ == End::kNone) {
    if (gw_->stopping()) return Fail("gateway stopping", true);
    TakeInbox();
    if (!data_.empty()) have_no_data_since_ = false;
    if (!data_.empty() && orphans_) {
      orphans_ = false;
      // Chunks whose connection died while no other was up.
      for (auto& [seq, c] : unacked_) {
        bool live = false;
        for (auto& d : data_) live |= d.index == c.slot;
        if (live) continue;
        QueueChunk(*PickConn(), c);
        ctr_.chunks_retransmitted++;
      }
    }
    if (forward_ && !reconnect_.empty() && reconnect_attempts_ < 8) {
      uint16_t idx = reconnect_.back();
      reconnect_.pop_back();
      reconnect_attempts_++;
      if (!ConnectDataConn(idx)) reconnect_.push_back(idx);
      continue;
    }
    auto now = Clock::now();
    if (have_no_data_since_ && now - no_data_since_ > std::chrono::milliseconds(o.rejoin_timeout_ms))
      return Fail("all data connections lost", true);
    if (now - last_ctrl_rx_ > std::chrono::milliseconds(o.keepalive_timeout_ms))
      return Fail("keepalive timeout", true);
    MaybeBypassStuckConn(now);
    if (!sent_close_ && now - last_ping_ > std::chrono::seconds(1)) {
      UpdateDetail();
      PayloadWriter w;
      w.U64(NowNs());
      SendCtrl(FrameType::kPing, w.data());
      last_ping_ = now;
    }
    st_data_conns_.store(data_.size(), std::memory_order_relaxed);
    st_unacked_.store(unacked_bytes_, std::memory_order_relaxed);
    st_reorder_.store(reorder_bytes_, std::memory_order_relaxed);
    if (!data_.empty() && gw_->TakeKillRequest()) shutdown(data_[0].c->fd(), SHUT_RDWR);

    pfds.clear();
    pfds.push_back({wake_fd_, POLLIN, 0});
    pfds.push_back({ctrl_->fd(), static_cast<short>(POLLIN | (ctrl_->out.size() > ctrl_->out_off ? POLLOUT : 0)), 0});
    short lev = 0;
    if (local_fd_ >= 0) {
      if (!local_eof_ && !send_paused_ && unacked_bytes_ < window_) lev |= POLLIN;
      if (deliver_off_ < deliver_.size() || reorder_.count(next_expected_)) lev |= POLLOUT;
    }
    pfds.push_back({local_fd_, lev, 0});
    for (auto& d : data_)
      pfds.push_back({d.c->fd(), static_cast<short>(POLLIN | (d.c->out.size() > d.c->out_off ? POLLOUT : 0)), 0});
    bool pending = ctrl_->HasPending();
    for (auto& d : data_) pending |= d.c->HasPending();
    int timeout = pending ? 0 : (last_ack_sent_ != next_expected_ ? 5 : 200);
    if (poll(pfds.data(), pfds.size(), timeout) < 0 && errno != EINTR) return Fail("poll failed", true);
    if (pfds[0].revents & POLLIN) {
      uint64_t v;
      [[maybe_unused]] auto r = read(wake_fd_, &v, sizeof v);
    }
    for (size_t i = 0; i < data_.size(); i++)
      data_[i].ready = (pfds[3 + i].revents & (POLLIN | POLLERR | POLLHUP)) || data_[i].c->HasPending();
    // Data connections: read everything that is ready (the window bounds memory).
    for (size_t i = 0; i < data_.size() && end_ == End::kNone;) {
      size_t before = data_.size();
      if (data_[i].ready) ReadData(data_[i]);
      if (data_.size() == before) i++;
    }
    if (end_ != End::kNone) return;
    ReadCtrl();
    if (end_ != End::kNone) return;
    WriteLocal();
    if (end_ != End::kNone) return;
    ReadLocal();
    if (end_ != End::kNone) return;
    if (local_eof_ && !fin_sent_) {
      PayloadWriter w;
      w.U64(next_seq_);
      SendCtrl(FrameType::kFin, w.data());
      fin_sent_ = true;
    }
    MaybeAck(false);
    for (size_t i = 0; i < data_.size();) {
      if (!FlushConn(*data_[i].c)) {
        LoseDataConn(i, data_[i].c->last_error());
      } else {
        i++;
      }
    }
    if (!FlushConn(*ctrl_)) return Fail("control connection lost: " + ctrl_->last_error(), false);
    CheckDone();
  }
}

}  // namespace ferry::gateway
