#include "migration/codec/codec_selector.h"

#include <algorithm>
#include <charconv>

namespace ferry::migration {
namespace {

constexpr double kEwma = 0.2;            // weight of a new sample
constexpr double kHysteresis = 0.95;     // a codec must beat raw by 5%
constexpr uint64_t kProbeEvery = 64;     // batches between probes once every estimate exists
constexpr uint64_t kProbeEarly = 4;      // ... while some estimate is still missing
constexpr uint64_t kDeltaWindow = 256;   // attempts per governor decision
constexpr uint64_t kDeltaOffBatches = 16;

std::string ChoiceName(CodecChoice c) {
  if (c.codec == Compression::kZstd) return fmt::format("zstd:{}", c.level);
  return std::string(CompressionName(c.codec));
}

}  // namespace

std::string CompressMode::ToString() const {
  if (automatic) return "auto";
  return ChoiceName({codec, level});
}

Result<CompressMode> ParseCompressMode(std::string_view s) {
  CompressMode m;
  if (s == "auto") return m;
  m.automatic = false;
  if (s == "none") return m;
  if (s == "lz4") {
    m.codec = Compression::kLz4;
    return m;
  }
  if (s == "zstd") {
    m.codec = Compression::kZstd;
    return m;
  }
  if (s.starts_with("zstd:")) {
    std::string_view lv = s.substr(5);
    int level = 0;
    auto [p, ec] = std::from_chars(lv.data(), lv.data() + lv.size(), level);
    if (ec == std::errc() && p == lv.data() + lv.size() && level >= 1 && level <= 19) {
      m.codec = Compression::kZstd;
      m.level = level;
      return m;
    }
  }
  return Errorf(ErrorCode::kInvalidArgument, "compression '{}' must be auto, none, lz4, zstd or zstd:LEVEL (1..19)", s);
}

CodecChoice ChooseCodec(const std::array<CodecEstimate, kAutoCandidates.size()>& est, const std::array<bool, kAutoCandidates.size()>& allowed,
                        double link, double cores) {
  if (link <= 0) return {};  // not measured yet: raw
  double best_t = kHysteresis / link;
  CodecChoice best{};
  for (size_t i = 0; i < kAutoCandidates.size(); ++i) {
    if (!allowed[i] || est[i].samples == 0 || est[i].speed <= 0) continue;
    const double t = std::max(1.0 / (est[i].speed * std::max(cores, 0.1)), est[i].ratio / link);
    if (t < best_t) {
      best_t = t;
      best = kAutoCandidates[i];
    }
  }
  return best;
}

CodecSelector::CodecSelector(CompressMode mode, bool lz4_allowed, bool zstd_allowed, bool delta_allowed, uint32_t senders)
    : mode_(mode), delta_allowed_(delta_allowed), senders_(std::max<uint32_t>(senders, 1)) {
  for (size_t i = 0; i < kAutoCandidates.size(); ++i)
    allowed_[i] = kAutoCandidates[i].codec == Compression::kLz4 ? lz4_allowed : zstd_allowed;
  if (!mode_.automatic) {
    const bool ok = mode_.codec == Compression::kNone || (mode_.codec == Compression::kLz4 ? lz4_allowed : zstd_allowed);
    current_ = ok ? CodecChoice{mode_.codec, mode_.level} : CodecChoice{};
  }
}

int CodecSelector::IndexOf(CodecChoice c) const {
  for (size_t i = 0; i < kAutoCandidates.size(); ++i)
    if (kAutoCandidates[i] == c) return static_cast<int>(i);
  return -1;
}

CodecChoice CodecSelector::Choose() {
  MutexLock l(mu_);
  ++batches_;
  if (!mode_.automatic) return current_;
  current_ = ChooseCodec(est_, allowed_, link_, std::min(cores_, static_cast<double>(senders_)));
  CodecChoice pick = current_;
  if (link_ > 0 && batches_ >= probe_next_) {
    // Probe: a candidate with no estimate first, else the next one after the current choice.
    int cand = -1;
    for (size_t i = 0; i < kAutoCandidates.size() && cand < 0; ++i)
      if (allowed_[i] && est_[i].samples == 0) cand = static_cast<int>(i);
    const bool missing = cand >= 0;
    if (!missing) {
      const int cur = IndexOf(current_);
      for (size_t n = 1; n <= kAutoCandidates.size() && cand < 0; ++n) {
        const size_t i = static_cast<size_t>(cur + static_cast<int>(n) + static_cast<int>(kAutoCandidates.size())) % kAutoCandidates.size();
        if (allowed_[i] && static_cast<int>(i) != cur) cand = static_cast<int>(i);
      }
    }
    if (cand >= 0) pick = kAutoCandidates[static_cast<size_t>(cand)];
    probe_next_ = batches_ + (missing ? kProbeEarly : kProbeEvery);
  }
  const int idx = IndexOf(pick);
  ++chosen_[idx + 1];
  return pick;
}

void CodecSelector::ReportEncode(CodecChoice c, uint64_t in, uint64_t out, uint64_t cpu_ns) {
  if (c.codec == Compression::kNone || in == 0) return;
  MutexLock l(mu_);
  const int i = IndexOf(c);
  if (i < 0) return;
  CodecEstimate& e = est_[static_cast<size_t>(i)];
  const double speed = static_cast<double>(in) * 1e9 / static_cast<double>(std::max<uint64_t>(cpu_ns, 1000));
  const double ratio = std::min(1.0, static_cast<double>(out) / static_cast<double>(in));
  if (e.samples == 0) {
    e.speed = speed;
    e.ratio = ratio;
  } else {
    e.speed += kEwma * (speed - e.speed);
    e.ratio += kEwma * (ratio - e.ratio);
  }
  ++e.samples;
}

void CodecSelector::ReportLink(double bytes_per_s) {
  MutexLock l(mu_);
  link_ = std::max(bytes_per_s, 0.0);
}

void CodecSelector::ReportSpareCores(double cores) {
  MutexLock l(mu_);
  // Idle cores alone undercount: one sender thread always gets a core's worth by competing with
  // the guest's (a busy 2-core host shows ~0.2 idle cores, yet zstd then runs at full speed).
  cores_ = std::max(cores, 1.0);
}

double CodecSelector::ExpectedRatio() {
  MutexLock l(mu_);
  const int i = IndexOf(current_);
  return i < 0 || est_[static_cast<size_t>(i)].samples == 0 ? 1.0 : est_[static_cast<size_t>(i)].ratio;
}

bool CodecSelector::DeltaEnabled() {
  if (!delta_allowed_) return false;
  MutexLock l(mu_);
  if (delta_off_left_ == 0) return true;
  --delta_off_left_;
  return false;
}

void CodecSelector::ReportDelta(uint64_t attempts, uint64_t produced) {
  if (attempts == 0) return;
  MutexLock l(mu_);
  delta_attempts_ += attempts;
  delta_produced_ += produced;
  if (delta_attempts_ < kDeltaWindow) return;
  if (delta_produced_ * 10 < delta_attempts_) {
    delta_off_left_ = kDeltaOffBatches;
    ++delta_off_periods_;
  }
  delta_attempts_ = delta_produced_ = 0;
}

nlohmann::json CodecSelector::Snapshot() const {
  MutexLock l(mu_);
  nlohmann::json est = nlohmann::json::array();
  for (size_t i = 0; i < kAutoCandidates.size(); ++i)
    est.push_back({{"codec", ChoiceName(kAutoCandidates[i])},
                   {"allowed", allowed_[i]},
                   {"mb_per_cpu_s", est_[i].speed / 1e6},
                   {"ratio", est_[i].ratio},
                   {"samples", est_[i].samples}});
  return {{"mode", mode_.ToString()},
          {"current", ChoiceName(current_)},
          {"link_mbit_s", link_ * 8 / 1e6},
          {"spare_cores", cores_},
          {"estimates", est},
          {"batches", {{"none", chosen_[0]}, {"lz4", chosen_[1]}, {"zstd:1", chosen_[2]}, {"zstd:3", chosen_[3]}}},
          {"delta", {{"allowed", delta_allowed_}, {"off_periods", delta_off_periods_}}}};
}

}  // namespace ferry::migration
