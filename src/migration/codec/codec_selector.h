// Adaptive codec choice for page batches (the "auto" compression mode), plus the delta
// on/off governor. Per batch, a sender asks Choose(); it reports what each encode cost and
// produced; the migration samples the link and the host's spare CPU now and then.
//
// Model: for codec k (lz4, zstd-1, zstd-3) the time per input byte is
//     T_k = max(1 / (speed_k x cores), ratio_k / link)      (compress and send pipeline)
// and sending raw costs T_none = 1 / link, where
//   speed_k  input bytes per CPU-second, measured on the batches encoded with k (EWMA),
//   ratio_k  output / input bytes of those batches (EWMA; an incompressible batch counts 1),
//   cores    spare cores for codec work: idle host cores + the cores our codec work uses now,
//            at least 1 (one sender always gets a core by competing with the guest), at most
//            the number of sender threads,
//   link     bytes/s the path carries: the operator's rate cap, or the sum over the data
//            connections of the kernel's delivery rate when not application-limited.
// The codec with the smallest T wins if it beats raw by 5% (hysteresis); until the link has been
// measured raw is used (a fast link needs no codec). Every 64th batch probes another codec so
// its estimates stay current. ChooseCodec() is the pure part (unit-tested).
//
// Delta governor: deltas cost a page compare; when fewer than 10% of the attempts over the last
// 256 produce a delta the governor switches deltas off for the next 2048 candidate pages, then
// tries again.
//
// Threads: every method is thread-safe (one mutex; calls are per batch, not per page).
#pragma once

#include <array>
#include <cstdint>
#include <mutex>
#include <string>

#include <nlohmann/json.hpp>

#include "common/compress.h"
#include "common/thread_annotations.h"
#include "common/error.h"

namespace ferry::migration {

// What the operator asked for: auto, none, or one codec (zstd with a level).
struct CompressMode {
  bool automatic = true;
  Compression codec = Compression::kNone;  // when !automatic
  int level = 1;                           // zstd level when !automatic
  std::string ToString() const;
};
// "auto" | "none" | "lz4" | "zstd" | "zstd:LEVEL" (1..19).
Result<CompressMode> ParseCompressMode(std::string_view s);

struct CodecChoice {
  Compression codec = Compression::kNone;
  int level = 0;
  bool operator==(const CodecChoice&) const = default;
};

struct CodecEstimate {
  double speed = 0;  // input bytes per CPU-second; 0 = unknown
  double ratio = 1;  // output / input
  uint64_t samples = 0;
};

inline constexpr std::array<CodecChoice, 3> kAutoCandidates = {
    CodecChoice{Compression::kLz4, 0}, CodecChoice{Compression::kZstd, 1}, CodecChoice{Compression::kZstd, 3}};

// Pure: the best of none + candidates[i] (estimates[i]) for `link` bytes/s (0 = unknown) and
// `cores` spare cores. Unknown estimates never win.
CodecChoice ChooseCodec(const std::array<CodecEstimate, kAutoCandidates.size()>& estimates, const std::array<bool, kAutoCandidates.size()>& allowed,
                        double link_bytes_per_s, double cores);

class CodecSelector {
 public:
  // allowed: which codecs were negotiated; senders: number of sender threads.
  CodecSelector(CompressMode mode, bool lz4_allowed, bool zstd_allowed, bool delta_allowed, uint32_t senders);

  CodecChoice Choose();
  // One encode of `in` body bytes into `out` bytes (out == in: sent raw as incompressible).
  void ReportEncode(CodecChoice c, uint64_t in, uint64_t out, uint64_t cpu_ns);
  void ReportLink(double bytes_per_s);  // 0: unknown (raw until measured)
  void ReportSpareCores(double cores);
  // Expected output/input ratio of the codec chosen now (1 for none); bounds useful deltas.
  double ExpectedRatio();

  bool DeltaEnabled();
  bool DeltaAllowed() const { return delta_allowed_; }  // negotiated and configured, governor aside
  void ReportDelta(uint64_t attempts, uint64_t produced);

  nlohmann::json Snapshot() const;

 private:
  int IndexOf(CodecChoice c) const;

  const CompressMode mode_;
  const bool delta_allowed_;
  const uint32_t senders_;
  std::array<bool, kAutoCandidates.size()> allowed_{};

  mutable Mutex mu_;
  std::array<CodecEstimate, kAutoCandidates.size()> est_ GUARDED_BY(mu_){};
  double link_ GUARDED_BY(mu_) = 0;
  double cores_ GUARDED_BY(mu_) = 1;
  CodecChoice current_ GUARDED_BY(mu_){};
  uint64_t batches_ GUARDED_BY(mu_) = 0;
  uint64_t probe_next_ GUARDED_BY(mu_) = 0;
  uint64_t chosen_[4] GUARDED_BY(mu_) = {};  // batches per codec choice (none, lz4, zstd-1, zstd-3)
  // Delta governor.
  uint64_t delta_attempts_ GUARDED_BY(mu_) = 0;
  uint64_t delta_produced_ GUARDED_BY(mu_) = 0;
  uint64_t delta_off_left_ GUARDED_BY(mu_) = 0;
  uint64_t delta_off_periods_ GUARDED_BY(mu_) = 0;
};

}  // namespace ferry::migration
