#include "migration/engine/channel_pool.h"

#include <algorithm>

#include "common/clock.h"

namespace ferry::migration {
namespace {
// Path samples: every 100 ms, and every 5 ms until the path has been measured once (a small
// migration is over in a few hundred milliseconds; until the rate is known, pages go raw).
constexpr uint64_t kSampleEveryNs = 100'000'000, kSampleEarlyNs = 5'000'000;
// Debounce: how often a page's first send may be left out.
constexpr uint8_t kMaxFirstSendSkips = 1;
}

ChannelPool::ChannelPool(std::vector<std::unique_ptr<Socket>> sockets, const RamView& ram, Options opts, DeltaCache* cache,
                         CodecSelector* selector, RateLimiter* limiter)
    : sockets_(std::move(sockets)),
      ram_(ram),
      opts_(opts),
      cache_(cache),
      selector_(selector),
      limiter_(limiter),
      worker_cpu_ns_(new std::atomic<uint64_t>[sockets_.size()]),
      first_skips_(ram.size / kWirePageSize, 0) {
  next_seq_.store(std::max<uint64_t>(opts_.first_seq, 1));
  sample_ns_ = NowNs();
  for (size_t i = 0; i < sockets_.size(); ++i) {
    worker_cpu_ns_[i].store(0);
    workers_.emplace_back([this, i] { Worker(i); });
  }
}

ChannelPool::~ChannelPool() {
  {
    MutexLock l(mu_);
    stop_ = true;
  }
  Cancel(Error(ErrorCode::kCancelled, "migration ended"));
  for (auto& t : workers_) t.join();
}

void ChannelPool::Fail(const Error& e) {
  {
    MutexLock l(mu_);
    if (!error_) error_ = e;
  }
  cancelled_.store(true);
  for (auto& s : sockets_) s->Shutdown();
  work_cv_.notify_all();
  space_cv_.notify_all();
  idle_cv_.notify_all();
}

void ChannelPool::Cancel(const Error& why) { Fail(why); }

Status ChannelPool::Submit(Batch batch) {
  MutexLock l(mu_);
  if (queue_.size() >= opts_.high_watermark)
    l.Wait(space_cv_, [&]() REQUIRES(mu_) { return error_ || queue_.size() <= opts_.low_watermark; });
  if (error_) return std::unexpected(*error_);
  queue_.push_back(std::move(batch));
  work_cv_.notify_one();
  return {};
}

Status ChannelPool::Flush() {
  MutexLock l(mu_);
  l.Wait(idle_cv_, [&]() REQUIRES(mu_) { return error_ || (queue_.empty() && busy_ == 0); });
  if (error_) return std::unexpected(*error_);
  return {};
}

std::vector<uint64_t> ChannelPool::Harvest(PageBitmap* dirty, PageBitmap* freed) {
  MutexLock l(debounce_mu_);
  ram_.dirty->Harvest(dirty, freed);
  std::vector<uint64_t> unsent;
  unsent.swap(unsent_);
  return unsent;
}

void ChannelPool::Worker(size_t index) {
  Socket& sock = *sockets_[index];
  PageEncoder encoder(ram_.host, opts_.encoder, cache_, selector_);
  const PageEncoder::SkipFilter debounce = [this](uint64_t gfn, bool resend) {
    MutexLock l(debounce_mu_);
    if (!ram_.dirty->WrittenSinceHarvest(gfn)) return false;
    if (!resend) {
      // A page the guest never stops writing is sent once anyway: then the destination has a
      // copy, and its later sends (the final one too) can be deltas.
      if (gfn >= first_skips_.size() || first_skips_[gfn] >= kMaxFirstSendSkips) return false;
      ++first_skips_[gfn];
      unsent_.push_back(gfn);
    }
    return true;
  };
  for (;;) {
    Batch b;
    {
      MutexLock l(mu_);
      l.Wait(work_cv_, [&]() REQUIRES(mu_) { return stop_ || error_ || !queue_.empty(); });
      if (stop_ || error_) return;
      b = std::move(queue_.front());
      queue_.pop_front();
      ++busy_;
      if (queue_.size() <= opts_.low_watermark) space_cv_.notify_all();
    }
    EncodeTally t;
    const std::span<const uint8_t> rec = encoder.Encode(b.runs, next_seq_.fetch_add(1), &t, {b.debounce && ram_.dirty ? &debounce : nullptr, b.paused});
    Status s;
    if (!rec.empty())  // empty: the debounce left every page out
      s = unlimited_.load() || limiter_->Acquire(rec.size(), cancelled_) ? sock.WriteAll(rec)
                                                                         : Status(Errorf(ErrorCode::kCancelled, "cancelled"));
    worker_cpu_ns_[index].store(ThreadCpuNs(), std::memory_order_relaxed);
    {
      MutexLock l(mu_);
      --busy_;
      if (s) tally_.Add(t);
    }
    if (!s) {
      Fail(s.error().WithContext(fmt::format("data channel {}", index)));
      return;
    }
    idle_cv_.notify_all();
    MaybeSamplePath();
  }
}

uint64_t ChannelPool::bytes_acked() const {
  uint64_t acked = 0;
  for (const auto& sock : sockets_) acked += sock->Path().bytes_acked;
  return acked;
}

void ChannelPool::MaybeSamplePath() {
  const uint64_t now = NowNs();
  uint64_t due = next_sample_ns_.load(std::memory_order_relaxed);
  const uint64_t every = link_.load() > 0 ? kSampleEveryNs : kSampleEarlyNs;
  if (now < due || !next_sample_ns_.compare_exchange_strong(due, now + every)) return;
  MutexLock l(sample_mu_);
  uint64_t acked = 0;
  bool queued = true;  // every connection has data it could not send yet: the path is the limit
  for (auto& sock : sockets_) {
    const Socket::PathInfo p = sock->Path();
    acked += p.bytes_acked;
    queued = queued && p.notsent_bytes > 0;
  }
  const double wall = static_cast<double>(now - sample_ns_);
  if (wall >= 1e6 && acked > sample_acked_) {
    const double rate = static_cast<double>(acked - sample_acked_) * 1e9 / wall;
    if (queued) path_bound_ = path_bound_ > 0 ? 0.7 * path_bound_ + 0.3 * rate : rate;
    else path_floor_ = std::max(path_floor_, rate);
  }
  sample_acked_ = acked;
  double link = std::max(path_bound_, path_floor_);
  if (limiter_->rate() && !unlimited_.load()) link = link > 0 ? std::min(link, static_cast<double>(limiter_->rate())) : static_cast<double>(limiter_->rate());
  link_.store(link);
  if (link > 0) selector_->ReportLink(link);
  // Spare cores: idle ones plus those our own codec work keeps busy now.
  const double idle = host_cpu_.IdleCores();
  const uint64_t codec_ns = tally().codec_cpu_ns;
  const double ours = wall > 0 ? static_cast<double>(codec_ns - sample_codec_ns_) / wall : 0;
  sample_ns_ = now;
  sample_codec_ns_ = codec_ns;
  if (idle >= 0) selector_->ReportSpareCores(idle + ours);
}

void ChannelPool::LiftRateLimit() {
  unlimited_.store(true);
  if (!limiter_->rate()) return;
  MutexLock l(sample_mu_);
  link_.store(path_bound_);
  selector_->ReportLink(path_bound_);  // 0: the cap held us back all along, the path is faster: raw
}

uint64_t ChannelPool::records() const {
  MutexLock l(mu_);
  return tally_.records;
}

EncodeTally ChannelPool::tally() const {
  MutexLock l(mu_);
  return tally_;
}

uint64_t ChannelPool::cpu_ns() const {
  uint64_t n = 0;
  for (size_t i = 0; i < sockets_.size(); ++i) n += worker_cpu_ns_[i].load(std::memory_order_relaxed);
  return n;
}

uint64_t ChannelPool::bytes_written() const {
  uint64_t n = 0;
  for (auto& s : sockets_) n += s->bytes_written();
  return n;
}

double ChannelPool::link_bytes_per_s() const { return link_.load(); }

}  // namespace ferry::migration
