// The destination's guest RAM while post-copy runs: a PageSink over a userfaultfd-registered
// mapping.
//
// Start() drops the destination's copies of the missing pages (MADV_REMOVE: they read as holes),
// registers the whole RAM mapping with userfaultfd (MISSING mode) and starts the fault thread.
// From then on any access to a page that is not in memory - a vCPU's fetch, load or store, a
// device's DMA, a read(2)/write(2) of the VMM into guest RAM - blocks in the kernel until the
// page is placed:
//   - a missing page that has not arrived: the fault thread sends a PAGE_REQUEST (once per
//     page) through `request`; the page arrives (control connection or background push) and
//     WritePage places it atomically with UFFDIO_COPY, which wakes every waiter;
//   - any other page (never written, a zero page, or one released after it arrived, e.g. by
//     free page reporting): UFFDIO_ZEROPAGE at once, no round trip.
// Safety invariant (a running guest's memory is never overwritten by the migration): the sink
// writes only pages that are in the missing set and not placed yet, each exactly once; every
// later copy of such a page is dropped and counted as a duplicate. Deltas are refused (the
// destination dropped the copies a delta would apply to).
// Finish() unregisters once every missing page is in place. If post-copy fails instead, the
// registration stays (the object is not destroyed while the guest may run): threads waiting for
// pages keep waiting; the VMM must stop without running the guest (vm_interface.h).
//
// `request` may fail (no connection while post-copy recovers): the page stays marked requested
// and RequestOutstanding() asks again once a connection is back.
//
// Threads: WritePage/ZeroPage/FreePage from the receiver's threads, never for the same page at
// once (the receiver's stripe locks); the fault thread is internal; the accessors from any thread.
#pragma once

#include <atomic>
#include <functional>
#include <memory>
#include <optional>
#include <thread>
#include <vector>

#include "common/error.h"
#include "common/thread_annotations.h"
#include "migration/engine/page_sink.h"
#include "migration/protocol/postcopy.h"

namespace ferry::migration {

class PostcopyRam final : public PageSink {
 public:
  using RequestFn = std::function<Status(uint64_t gfn, uint32_t count)>;
  // True when this host lets us use userfaultfd (checked before a source is offered post-copy).
  static bool Available();
  static Result<std::unique_ptr<PostcopyRam>> Start(const RamView& ram, const PostcopyStart& missing, RequestFn request);
  ~PostcopyRam() override;

  Status WritePage(uint64_t gfn, std::span<const uint8_t> data) override;
  Status ZeroPage(uint64_t gfn) override;
  Status FreePage(uint64_t gfn) override;
  Status ApplyDelta(uint64_t gfn, std::span<const uint8_t> delta) override;

  uint64_t missing() const { return missing_count_; }
  uint64_t placed() const { return placed_.load(); }
  bool complete() const { return placed_.load() == missing_count_; }
  // Every missing page is in place: unregisters RAM and stops the fault thread.
  Status Finish();
  // Recovery: the pages still missing now (POSTCOPY layout, for RECOVER), and the requests to
  // send again - pages asked for that have not arrived (the request or its answer may have been
  // lost with the connection).
  PostcopyStart MissingNow() const;
  Status RequestOutstanding();
  // Fault statistics so far.
  PostcopyDone Stats() const EXCLUDES(mu_);
  // The fault thread's error (it stops handling faults then), if any.
  std::optional<Error> failure() const EXCLUDES(mu_);

 private:
  PostcopyRam(const RamView& ram, const PostcopyStart& missing, RequestFn request);
  void FaultLoop() EXCLUDES(mu_);
  Status Resolve(uint64_t addr);
  bool IsMissing(uint64_t p) const { return (missing_[p / 64] >> (p % 64)) & 1; }
  bool IsPlaced(uint64_t p) const { return (placed_bits_[p / 64].load(std::memory_order_acquire) >> (p % 64)) & 1; }
  Status Place(uint64_t gfn, const uint8_t* data);  // data == nullptr: zero page

  const RamView ram_;
  const uint64_t pages_;
  const std::vector<uint64_t> missing_;
  const uint64_t missing_count_;
  RequestFn request_;
  int uffd_ = -1;
  int wake_fd_ = -1;
  bool registered_ = false;
  std::thread fault_thread_;
  std::unique_ptr<std::atomic<uint64_t>[]> placed_bits_;
  std::unique_ptr<std::atomic<uint64_t>[]> requested_bits_;
  std::unique_ptr<std::atomic<uint64_t>[]> fault_ns_;  // per page: when its first demand fault was seen (0 = none)
  std::atomic<uint64_t> placed_{0}, duplicates_{0}, demand_faults_{0}, local_faults_{0};

  mutable Mutex mu_;
  std::vector<uint32_t> latency_us_ GUARDED_BY(mu_);  // demand fault -> page placed
  std::optional<Error> failure_ GUARDED_BY(mu_);
};

}  // namespace ferry::migration
