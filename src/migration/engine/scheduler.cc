#include "migration/engine/scheduler.h"

#include <algorithm>

namespace ferry::migration {
namespace {

LayeringConfig Sanitize(LayeringConfig c) {
  c.window = std::clamp<uint32_t>(c.window, 1, 8);
  c.min_hot = std::clamp<uint32_t>(c.min_hot, 1, c.window);
  return c;
}

// Appends page p to runs, merging with the last run when contiguous and alike.
// Returns false (and appends nothing) when that needs a new run beyond max_runs.
bool Append(std::vector<PageRun>* runs, uint64_t p, RunKind kind, bool resend, uint64_t max_runs, bool warm = false) {
  if (!runs->empty()) {
    PageRun& last = runs->back();
    if (last.kind == kind && last.resend == resend && last.warm == warm && last.gfn + last.count == p && last.count < UINT32_MAX) {
      ++last.count;
      return true;
    }
  }
  if (runs->size() >= max_runs) return false;
  runs->push_back({p, 1, kind, resend, warm});
  return true;
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
  order_.clear();
  cursor_run_ = cursor_page_ = 0;
}

uint64_t PageScheduler::AddHarvest(const PageBitmap& dirty, const PageBitmap& freed) {
  uint64_t marked = 0;
  for (uint64_t w = 0; w < (pages_ + 63) / 64; ++w) {
    const uint64_t bits = w < dirty.size() ? dirty[w] : 0;
    const uint64_t end = std::min<uint64_t>(pages_, (w + 1) * 64);
    for (uint64_t p = w * 64; p < end; ++p) {
      const bool written = (bits >> (p % 64)) & 1;
      history_[p] = static_cast<uint8_t>((history_[p] << 1) | (written ? 1 : 0));
      if (!written) continue;
      ++marked;
      if (!(state_[p] & kPending)) ++pending_;
      // Written: whatever it was known as before, only its contents count now.
      state_[p] = static_cast<uint8_t>((state_[p] & (kSent | kFirstOut)) | kPending | (TestPage(freed, p) ? kFree : 0));
    }
  }
  if (cursor_run_ < order_.size() || deferred_cursor_ < deferred_.size()) ChooseThreshold();  // a pass is running

  return marked;
}

void PageScheduler::Unsend(const std::vector<uint64_t>& pages) {
  // Only a page not handed out again since: a later hand-out may have sent it (then it stays sent).
  for (const uint64_t p : pages)
    if (p < pages_ && (state_[p] & kFirstOut)) state_[p] = static_cast<uint8_t>(state_[p] & ~(kSent | kFirstOut));
}

void PageScheduler::ChooseThreshold() {
  const uint32_t none = cfg_.window + 1;
  std::vector<uint64_t> by_recent(cfg_.window + 1, 0);
  for (uint64_t p = 0; p < pages_; ++p)
    if (state_[p] & kPending) ++by_recent[Recent(p)];
  pass_.hot_candidates = 0;
  for (uint32_t c = cfg_.min_hot; c <= cfg_.window; ++c) pass_.hot_candidates += by_recent[c];
  uint32_t k = none;
  if (cfg_.enabled && !final_) {
    uint64_t hot = pass_.hot_candidates;  // pages with Recent >= k, for k = min_hot upwards
    for (k = cfg_.min_hot; k <= cfg_.window && hot > budget_; ++k) hot -= by_recent[k];
  }
  pass_.hot_k = k;
}

void PageScheduler::BeginPass(bool final, uint64_t holdback_budget_pages) {
  final_ = final;
  budget_ = holdback_budget_pages;
  pass_ = PassStats{};
  pass_.window = cfg_.window;
  ChooseThreshold();
  // The order: pending pages by how many recent samples wrote them (cold first), address order
  // within a class, as runs of consecutive pages. Pages no sample wrote yet go first if their
  // region is cold, last (of that class) if it is warm: writes cluster, so a page among written
  // ones is likely to be written too, and handed out later it has more samples behind it (it is
  // deferred or held back instead of sent and sent again).
  std::vector<uint8_t> warm((pages_ + kRegionPages - 1) / kRegionPages, 0);
  for (uint64_t r = 0; r < warm.size(); ++r) {
    const uint64_t begin = r * kRegionPages, end = std::min(pages_, begin + kRegionPages);
    uint64_t written = 0;
    for (uint64_t p = begin; p < end; ++p) written += Recent(p) > 0;
    warm[r] = written * kWarmRegionShare >= end - begin;
  }
  // Slot 0: unwritten pages of cold regions, 1: unwritten pages of warm ones, c + 1: written in c samples.
  std::vector<std::vector<PageRun>> classes(cfg_.window + 2);
  for (uint64_t p = 0; p < pages_; ++p) {
    if (!(state_[p] & kPending)) continue;
    const uint32_t recent = Recent(p);
    (void)Append(&classes[recent > 0 ? recent + 1 : warm[p / kRegionPages]], p, RunKind::kScan, false, UINT64_MAX);
  }
  order_.clear();
  order_class_.clear();
  for (uint32_t c = 0; c < classes.size(); ++c) {
    order_.insert(order_.end(), classes[c].begin(), classes[c].end());
    order_class_.insert(order_class_.end(), classes[c].size(), static_cast<uint8_t>(c > 0 ? c - 1 : 0));
  }
  cursor_run_ = cursor_page_ = 0;
  deferred_.clear();
  deferred_cursor_ = SIZE_MAX;
}

bool PageScheduler::Take(uint64_t p, const BatchLimits& limits, Batch* out, uint64_t* scan, uint64_t* total) {
  const uint8_t s = state_[p];
  if (!(s & kPending)) return true;
  if (!final_ && Recent(p) >= pass_.hot_k) {
    ++pass_.held_back;  // hot: stays pending for a later pass
    return true;
  }
  const RunKind kind = (s & kFree) ? RunKind::kFree : (s & kZero) ? RunKind::kZero : RunKind::kScan;
  const bool resend = s & kSent;
  if ((kind == RunKind::kScan && *scan >= limits.max_scan_pages) || *total >= limits.max_pages) return false;
  if (!Append(&out->runs, p, kind, resend, limits.max_runs, kind == RunKind::kScan && Recent(p) > 0)) return false;
  state_[p] = static_cast<uint8_t>((s & ~(kPending | kZero | kFirstOut)) | kSent | (resend ? 0 : kFirstOut));
  --pending_;
  ++*total;
  ++pass_.pages;
  pass_.resent_pages += resend;
  if (kind == RunKind::kScan) {
    ++*scan;
    ++pass_.scan_pages;
  } else if (kind == RunKind::kZero) {
    ++pass_.zero_pages;
  } else {
    ++pass_.free_pages;
  }
  return true;
}

bool PageScheduler::NextBatch(const BatchLimits& limits, Batch* out) {
  out->runs.clear();
  uint64_t scan = 0, total = 0;
  for (; cursor_run_ < order_.size(); ++cursor_run_, cursor_page_ = 0) {
    const PageRun& r = order_[cursor_run_];
    for (; cursor_page_ < r.count; ++cursor_page_) {
      const uint64_t p = r.gfn + cursor_page_;
      if (!final_ && (state_[p] & kPending) && Recent(p) > order_class_[cursor_run_]) {
        deferred_.push_back(p);  // written since the pass began: to the end of the pass
        continue;
      }
      if (!Take(p, limits, out, &scan, &total)) return true;
    }
  }
  if (deferred_cursor_ == SIZE_MAX) {
    // The deferred pages, cold first again (by their history now), address order within a class.
    std::stable_sort(deferred_.begin(), deferred_.end(), [&](uint64_t a, uint64_t b) { return Recent(a) < Recent(b); });
    deferred_cursor_ = 0;
  }
  for (; deferred_cursor_ < deferred_.size(); ++deferred_cursor_)
    if (!Take(deferred_[deferred_cursor_], limits, out, &scan, &total)) return true;
  return !out->runs.empty();
}

uint64_t PageScheduler::TakeAllPending(PageBitmap* scan, std::vector<PageRun>* nodata, uint32_t max_run) {
  scan->assign((pages_ + 63) / 64, 0);
  nodata->clear();
  uint64_t n = 0;
  for (uint64_t p = 0; p < pages_; ++p) {
    const uint8_t s = state_[p];
    if (!(s & kPending)) continue;
    if (s & (kFree | kZero)) {
      const RunKind kind = (s & kFree) ? RunKind::kFree : RunKind::kZero;
      if (!nodata->empty() && nodata->back().kind == kind && nodata->back().gfn + nodata->back().count == p &&
          nodata->back().count < max_run)
        ++nodata->back().count;
      else
        nodata->push_back(PageRun{p, 1, kind, (s & kSent) != 0});
    } else {
      SetPage(*scan, p);
      ++n;
    }
    state_[p] = static_cast<uint8_t>((s & ~(kPending | kZero | kFirstOut)) | kSent);
  }
  pending_ = 0;
  order_.clear();
  order_class_.clear();
  deferred_.clear();
  cursor_run_ = 0;
  cursor_page_ = 0;
  deferred_cursor_ = 0;
  return n;
}

}  // namespace ferry::migration
