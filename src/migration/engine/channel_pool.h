// The data channels of a source migration as a pool of long-lived workers (one per data
// connection, for the whole migration: no thread is spawned per round).
//
// The migration thread submits batches (page runs) into one bounded queue. A worker takes a
// batch, gives it the next sequence number (taken before any page of it is copied: a later copy
// of a page always carries a higher seq, see docs/protocol.md), runs the codec stage
// (PageEncoder: zero/free runs, deltas, compression - on the worker, so codec work runs on as
// many threads as there are channels), waits for the shared rate limiter and writes the record.
// Debounce (Batch::debounce, layering): a worker leaves out a page that would go as a full page if
// the guest wrote it since the last dirty-log harvest (the next harvest returns it); a page's first
// send is left out at most once, so a page the guest never stops writing still reaches the
// destination once and can go as deltas afterwards.
// Watermarks: Submit() blocks once `high` batches are queued and resumes when the queue is down
// to `low`, so at most high + workers batches exist at once. Flush() returns when every
// submitted batch is on the wire.
//
// Now and then (every 100 ms; every 5 ms until the first measurement) a worker samples the path (TCP_INFO delivery rate of each data
// connection, counted only when not application-limited) and the host's idle cores, and feeds
// both to the codec selector.
//
// Errors: the first failure (a write, the rate limiter being cancelled) is kept; it fails every
// later Submit/Flush; Cancel() shuts every connection so blocked writes return at once.
//
// Threads: workers are internal; Submit/Flush from the migration thread; Cancel and the
// accessors from any thread.
#pragma once

#include <atomic>
#include <condition_variable>
#include <deque>
#include <memory>
#include <mutex>
#include <optional>
#include <thread>
#include <vector>

#include "common/host_cpu.h"
#include "common/thread_annotations.h"
#include "migration/codec/page_encoder.h"
#include "migration/engine/scheduler.h"
#include "migration/engine/vm_interface.h"
#include "migration/transport/tcp.h"

namespace ferry::migration {

class ChannelPool {
 public:
  struct Options {
    EncoderConfig encoder;
    size_t high_watermark = 8;
    size_t low_watermark = 4;
    uint64_t first_seq = 1;  // a pool replacing another (post-copy recovery) continues its sequence
  };
  ChannelPool(std::vector<std::unique_ptr<Socket>> sockets, const RamView& ram, Options opts, DeltaCache* cache,
              CodecSelector* selector, RateLimiter* limiter);
  ~ChannelPool();  // cancels and joins the workers
  ChannelPool(const ChannelPool&) = delete;
  ChannelPool& operator=(const ChannelPool&) = delete;

  Status Submit(Batch batch);
  Status Flush();
  // Fails the pool with `why`; shuts every data connection down.
  void Cancel(const Error& why);
  // From now on records go out at full speed (the stop-and-copy: the guest is paused, so the
  // pause is the only cost left; QEMU lifts its rate limit there too). The codec selector then
  // sees the path's own rate: the one measured while not held back by the cap, or "unknown" (raw)
  // when the cap held every connection back all along (the path is faster than the cap).
  void LiftRateLimit();

  // A dirty-log harvest in step with the workers' debounce (Batch::debounce): their check of a page
  // and this harvest take one lock, so every page a worker left out is handed back by the next
  // call, whose harvest returns it as written. Returns the first sends left out since the last
  // call (PageScheduler::Unsend, before AddHarvest).
  std::vector<uint64_t> Harvest(PageBitmap* dirty, PageBitmap* freed);

  // A sequence number for a record sent outside the pool (post-copy: requested pages on the
  // control connection), from the same counter as the pool's records.
  uint64_t TakeSeq() { return next_seq_.fetch_add(1); }
  uint64_t next_seq() const { return next_seq_.load(); }
  // TCP_USER_TIMEOUT on every data connection (post-copy: a dead path fails within `ms`).
  void SetUserTimeout(int ms) {
    for (auto& s : sockets_) s->SetUserTimeout(ms);
  }
  // Records written so far (END carries the total).
  uint64_t records() const;
  EncodeTally tally() const;
  uint64_t cpu_ns() const;            // CPU time of the workers so far
  uint64_t bytes_written() const;     // on all data connections
  uint64_t bytes_acked() const;       // by the peer's TCP on all data connections (TCP_INFO; any thread)
  double link_bytes_per_s() const;    // the last path estimate (0 = not measured)
  size_t channels() const { return sockets_.size(); }

 private:
  void Worker(size_t index);
  void Fail(const Error& e);
  void MaybeSamplePath();

  std::vector<std::unique_ptr<Socket>> sockets_;
  const RamView ram_;
  const Options opts_;
  DeltaCache* cache_;
  CodecSelector* selector_;
  RateLimiter* limiter_;
  std::atomic<bool> cancelled_{false};
  std::atomic<bool> unlimited_{false};
  std::atomic<uint64_t> next_seq_{1};
  std::vector<std::thread> workers_;
  std::unique_ptr<std::atomic<uint64_t>[]> worker_cpu_ns_;

  mutable Mutex mu_;
  std::condition_variable work_cv_;   // workers: a batch or stop
  std::condition_variable space_cv_;  // Submit: below the low watermark
  std::condition_variable idle_cv_;   // Flush: nothing queued or in flight
  std::deque<Batch> queue_ GUARDED_BY(mu_);
  size_t busy_ GUARDED_BY(mu_) = 0;  // batches being encoded/written
  bool stop_ GUARDED_BY(mu_) = false;
  std::optional<Error> error_ GUARDED_BY(mu_);
  EncodeTally tally_ GUARDED_BY(mu_);

  // Debounce: the workers' check of a page and Harvest().
  Mutex debounce_mu_;
  std::vector<uint64_t> unsent_ GUARDED_BY(debounce_mu_);  // first sends left out since the last Harvest
  std::vector<uint8_t> first_skips_ GUARDED_BY(debounce_mu_);  // per page, how often its first send was left out

  // Path sampling (one worker at a time).
  std::atomic<uint64_t> next_sample_ns_{0};
  Mutex sample_mu_;
  HostCpuSampler host_cpu_ GUARDED_BY(sample_mu_);
  uint64_t sample_ns_ GUARDED_BY(sample_mu_) = 0;
  uint64_t sample_codec_ns_ GUARDED_BY(sample_mu_) = 0;
  uint64_t sample_acked_ GUARDED_BY(sample_mu_) = 0;  // bytes acked at the last sample
  double path_bound_ GUARDED_BY(sample_mu_) = 0;  // rate while network-bound (the path's)
  double path_floor_ GUARDED_BY(sample_mu_) = 0;  // the most achieved otherwise
  std::atomic<double> link_{0};
};

}  // namespace ferry::migration
