#include "migration/engine/scheduler.h"

#include <algorithm>

namespace ferry::migration {
namespace {

LayeringConfig Sanitize(LayeringConfig c) {
  c.window = std::clamp<uint32_t>(c.window, 1, 8);
  c.min_hot = std::clamp<uint32_t>(c.min_hot, 1, c.window);
  return c;
}

// Appends page p of `kind` to runs, merging with the last run when contiguous and alike.
void Append(std::vector<PageRun>* runs, uint64_t p, RunKind kind) {
  if (!runs->empty()) {
    PageRun& last = runs->back();
    if (last.kind == kind && last.gfn + last.count == p && last.count < UINT32_MAX) {
      ++last.count;
      return;
    }
  }
  runs->push_back({p, 1, kind});
}

}  // namespace

PageScheduler::PageScheduler(uint64_t pages, LayeringConfig cfg)
    : pages_(pages), cfg_(Sanitize(cfg)), mask_(static_cast<uint8_t>((1u << cfg_.window) - 1)), state_(pages, 0), history_(pages, 0) {}

void PageScheduler::Start(const PageBitmap& known_zero, const PageBitmap& freed) {
  for (uint64_t p = 0; p < pages_; ++p) {
    uint8_t s = kPending;
    if (TestPage(freed, p)) s |= kFree;
    else if (TestPage(known_zero, p)) s |= kZero;
    state_[p] = s;
    history_[p] = 0;
  }
  pending_ = pages_;
}

void PageScheduler::AddHarvest(const PageBitmap& dirty, const PageBitmap& freed) {
  for (uint64_t w = 0; w < (pages_ + 63) / 64; ++w) {
    const uint64_t bits = w < dirty.size() ? dirty[w] : 0;
    const uint64_t end = std::min<uint64_t>(pages_, (w + 1) * 64);
    for (uint64_t p = w * 64; p < end; ++p) {
      const bool written = (bits >> (p % 64)) & 1;
      history_[p] = static_cast<uint8_t>((history_[p] << 1) | (written ? 1 : 0));
      if (!written) continue;
      if (!(state_[p] & kPending)) ++pending_;
      state_[p] = static_cast<uint8_t>(kPending | (TestPage(freed, p) ? kFree : 0));
    }
  }
}

Pass PageScheduler::NextPass(bool final, uint64_t holdback_budget_pages) {
  Pass pass;
  pass.window = cfg_.window;
  const uint32_t none = cfg_.window + 1;
  // Pending pages by how many of the last r rounds wrote them.
  std::vector<uint64_t> by_recent(cfg_.window + 1, 0);
  for (uint64_t p = 0; p < pages_; ++p)
    if (state_[p] & kPending) ++by_recent[Recent(p)];
  for (uint32_t c = cfg_.min_hot; c <= cfg_.window; ++c) pass.hot_candidates += by_recent[c];

  uint32_t k = none;
  if (cfg_.enabled && !final) {
    uint64_t hot = pass.hot_candidates;  // pages with Recent >= k, for k = min_hot upwards
    for (k = cfg_.min_hot; k <= cfg_.window && hot > holdback_budget_pages; ++k) hot -= by_recent[k];
  }
  pass.hot_k = k;

  // One list of runs per class (cold first), concatenated.
  std::vector<std::vector<PageRun>> classes(std::min(k, none));
  for (uint64_t p = 0; p < pages_; ++p) {
    const uint8_t s = state_[p];
    if (!(s & kPending)) continue;
    const uint32_t c = Recent(p);
    if (c >= k) {
      ++pass.held_back;
      continue;
    }
    const RunKind kind = (s & kFree) ? RunKind::kFree : (s & kZero) ? RunKind::kZero : RunKind::kScan;
    Append(&classes[c], p, kind);
    state_[p] = static_cast<uint8_t>(s & ~kPending & ~kZero);  // once sent, a hole is ordinary memory
    --pending_;
    ++pass.pages;
    if (kind == RunKind::kScan) ++pass.scan_pages;
    else if (kind == RunKind::kZero) ++pass.zero_pages;
    else ++pass.free_pages;
  }
  for (auto& cls : classes) pass.runs.insert(pass.runs.end(), cls.begin(), cls.end());
  return pass;
}

}  // namespace ferry::migration
