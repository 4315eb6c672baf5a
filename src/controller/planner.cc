#include "controller/planner.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <optional>
#include <unordered_map>

#include <fmt/format.h>

namespace ferry::controller {

std::string_view HostStateName(HostState s) {
  switch (s) {
    case HostState::kActive: return "active";
    case HostState::kDraining: return "draining";
    case HostState::kDrained: return "drained";
    case HostState::kDown: return "down";
  }
  return "?";
}

std::optional<HostState> ParseHostState(std::string_view s) {
  for (HostState h : {HostState::kActive, HostState::kDraining, HostState::kDrained, HostState::kDown})
    if (HostStateName(h) == s) return h;
  return std::nullopt;
}

namespace {

constexpr double kNs = 1e9;

std::string Percent(double f) { return fmt::format("{:.0f}%", f * 100); }
std::string Duration(uint64_t ns) {
  const double s = static_cast<double>(ns) / kNs;
  return s < 120 ? fmt::format("{:.0f} s", s) : fmt::format("{:.0f} min", s / 60);
}
std::string Mib(uint64_t b) { return fmt::format("{} MiB", b >> 20); }

enum class Resource { kCpu, kNet };

// One host during a round of planning: its load with the moves chosen so far applied.
struct Work {
  const HostView* view = nullptr;
  double cpus = 0;             // busy CPUs
  double net = 0;              // bytes/s
  uint64_t mem = 0;            // RAM of the VMs on it and arriving
  int migrations = 0;          // running + planned, in or out
  std::vector<size_t> vms;     // indexes into ClusterView::vms, those that run here
  bool Active() const { return view->state == HostState::kActive; }
  double CpuLoad() const { return Fraction(cpus, view->capacity.cpus); }
  double NetLoad() const { return Fraction(net, view->capacity.net_bytes_per_s); }
  double Load(Resource r) const { return r == Resource::kCpu ? CpuLoad() : NetLoad(); }
};

struct Round {
  Round(const ClusterView& v, const PlannerConfig& c, uint64_t now, const std::map<std::string, Planner::VmMemory>& m)
      : view(v), config(c), now_ns(now), memory(m), moving(v.vms.size(), false), memo(v.vms.size(), nullptr) {}
  const ClusterView& view;
  const PlannerConfig& config;
  uint64_t now_ns;
  const std::map<std::string, Planner::VmMemory>& memory;
  std::vector<Work> hosts;
  std::unordered_map<std::string, size_t> by_name;
  std::vector<bool> moving;  // per VM: migrating, or moved in this plan
  int running = 0, planned = 0;

  Work* Host(const std::string& name) {
    auto it = by_name.find(name);
    return it == by_name.end() ? nullptr : &hosts[it->second];
  }
  bool ClusterFull() const { return running + planned >= config.max_in_cluster; }

  // Moves VM `i` from `src` to `dst` in the working loads.
  void Apply(size_t i, Work& src, Work& dst) {
    const VmView& vm = view.vms[i];
    src.cpus = std::max(0.0, src.cpus - vm.cpus);
    src.net = std::max(0.0, src.net - vm.net_bytes_per_s);
    src.mem -= std::min(src.mem, vm.mem_bytes);
    dst.cpus += vm.cpus;
    dst.net += vm.net_bytes_per_s;
    dst.mem += vm.mem_bytes;
    ++src.migrations;
    ++dst.migrations;
    moving[i] = true;
    ++planned;
    std::erase(src.vms, i);
    dst.vms.push_back(i);
  }

  // Why `vm` may not move for a hotspot at all (empty: it may); cooldown counts here.
  std::string Unmovable(size_t i, bool drain) const {
    const VmView& vm = view.vms[i];
    if (moving[i]) return fmt::format("{}: migrating", vm.name);
    if (const Planner::VmMemory* m = Memory(i); m && m->failures > 0) {
      const uint64_t wait = config.retry_backoff_ns << std::min(m->failures - 1, 4);
      if (now_ns >= m->failed_ns && now_ns - m->failed_ns < wait)
        return fmt::format("{}: its last migration failed {} ago (retry after {})", vm.name, Duration(now_ns - m->failed_ns), Duration(wait));
    }
    if (drain) return {};
    if (const Planner::VmMemory* m = Memory(i); m && m->moved && now_ns >= m->last_move_ns) {
      // Each further move within the return ban doubles the cooldown (at most 8 times): a VM the
      // planner keeps moving is chasing bursts that do not last.
      const uint64_t cooldown = config.vm_cooldown_ns << std::min<size_t>(m->left.size() > 0 ? m->left.size() - 1 : 0, 3);
      if (now_ns - m->last_move_ns < cooldown)
        return fmt::format("{}: moved {} ago (cooldown {}{})", vm.name, Duration(now_ns - m->last_move_ns), Duration(cooldown),
                           m->left.size() > 1 ? fmt::format(", its move {} within {}", m->left.size(), Duration(config.return_ban_ns)) : "");
    }
    return {};
  }

  std::vector<const Planner::VmMemory*> memo;  // per VM, looked up once (null: nothing known)
  const Planner::VmMemory* Memory(size_t i) const { return memo[i]; }
  // The VM's usage to plan a destination with: its current value or its recent peak, the larger.
  double PeakCpus(size_t i) const { return std::max(view.vms[i].cpus, memo[i] ? memo[i]->cpus_peak : 0.0); }
  double PeakNet(size_t i) const { return std::max(view.vms[i].net_bytes_per_s, memo[i] ? memo[i]->net_peak : 0.0); }

  // Active hosts by load of `res`, least first (ties by name): rebuilt after every planned move.
  std::vector<size_t> order[2];
  int order_at[2] = {-1, -1};
  const std::vector<size_t>& ByLoad(Resource res) {
    const int k = res == Resource::kCpu ? 0 : 1;
    if (order_at[k] != planned) {
      order[k].clear();
      for (size_t h = 0; h < hosts.size(); ++h)
        if (hosts[h].Active()) order[k].push_back(h);
      std::sort(order[k].begin(), order[k].end(), [&](size_t a, size_t b) {
        const double la = hosts[a].Load(res), lb = hosts[b].Load(res);
        return la != lb ? la < lb : hosts[a].view->name < hosts[b].view->name;
      });
      order_at[k] = planned;
    }
    return order[k];
  }

  // Why `dst` cannot take VM `i` (empty: it can), for a hotspot (thresholds) or a drain (room only).
  std::string Refuses(const Work& dst, size_t i, bool drain) const {
    const VmView& vm = view.vms[i];
    if (!dst.Active()) return "not active";
    if (dst.migrations >= config.max_per_host) return "busy with a migration";
    if (dst.view->capacity.mem_bytes && dst.mem + vm.mem_bytes > dst.view->capacity.mem_bytes)
      return fmt::format("no room for {}", Mib(vm.mem_bytes));
    if (drain) return {};
    if (const Planner::VmMemory* m = Memory(i))
      for (const auto& [host, at] : m->left)
        if (host == dst.view->name && now_ns >= at && now_ns - at < config.return_ban_ns)
          return fmt::format("was left by {} {} ago", vm.name, Duration(now_ns - at));
    const double cpu_after = Fraction(dst.cpus + vm.cpus, dst.view->capacity.cpus);
    if (cpu_after > config.cpu_threshold) return fmt::format("would reach cpu {}", Percent(cpu_after));
    const double net_after = Fraction(dst.net + vm.net_bytes_per_s, dst.view->capacity.net_bytes_per_s);
    if (net_after > config.net_threshold) return fmt::format("would reach net {}", Percent(net_after));
    const double cpu_peak = Fraction(dst.cpus + PeakCpus(i), dst.view->capacity.cpus);
    if (cpu_peak > config.cpu_threshold) return fmt::format("would reach cpu {} at the VM's recent peak", Percent(cpu_peak));
    const double net_peak = Fraction(dst.net + PeakNet(i), dst.view->capacity.net_bytes_per_s);
    if (net_peak > config.net_threshold) return fmt::format("would reach net {} at the VM's recent peak", Percent(net_peak));
    return {};
  }
};

struct Candidate {
  size_t vm = 0;
  size_t dst = 0;
  double gain = 0;
  double dst_after = 0;  // the destination's load of the planned resource with the VM
  MigrationEstimate estimate;
  double score = -1;
};

void Stats(const std::vector<Work>& hosts, double threshold, double* stddev, double* overload) {
  double sum = 0, sq = 0, over = 0;
  int n = 0;
  for (const Work& w : hosts) {
    if (!w.Active() || w.view->capacity.cpus <= 0) continue;
    const double l = w.CpuLoad();
    sum += l;
    sq += l * l;
    over += std::max(0.0, w.cpus - threshold * w.view->capacity.cpus);
    ++n;
  }
  const double mean = n ? sum / n : 0;
  *stddev = n ? std::sqrt(std::max(0.0, sq / n - mean * mean)) : 0;
  *overload = over;
}

}  // namespace

void Planner::Observe(const ClusterView& view, uint64_t now_ns) {
  std::map<std::string, uint64_t> held;
  auto hold = [&](const std::string& key) {
    auto it = since_ns_.find(key);
    held[key] = it == since_ns_.end() ? now_ns : it->second;
  };
  for (const HostView& h : view.hosts) {
    if (h.state != HostState::kActive) continue;
    if (h.capacity.cpus > 0 && Fraction(h.usage.cpus, h.capacity.cpus) > config_.cpu_threshold) hold("cpu/" + h.name);
    if (h.capacity.net_bytes_per_s > 0 && Fraction(h.usage.net_bytes_per_s, h.capacity.net_bytes_per_s) > config_.net_threshold)
      hold("net/" + h.name);
    if (h.usage.swap_out_pages_per_s > config_.swap_out_pages_per_s) hold("swap/" + h.name);
  }
  for (const VmView& vm : view.vms)
    if (vm.net_drops_per_s > 0 && vm.migrating_to.empty()) hold("bandwidth/" + vm.name);
  since_ns_ = std::move(held);
  // Peaks fade by half every demand_half_life_ns; VMs no longer in the view are forgotten unless
  // they moved within the return ban (a VM may be missing from one report).
  std::map<std::string, VmMemory> kept;
  for (const VmView& vm : view.vms) {
    VmMemory m = vms_.count(vm.name) ? vms_[vm.name] : VmMemory{};
    const double fade = m.seen_ns && now_ns > m.seen_ns && config_.demand_half_life_ns
                            ? std::exp2(-static_cast<double>(now_ns - m.seen_ns) / static_cast<double>(config_.demand_half_life_ns))
                            : 1.0;
    m.cpus_peak = std::max(vm.cpus, m.cpus_peak * fade);
    m.net_peak = std::max(vm.net_bytes_per_s, m.net_peak * fade);
    m.seen_ns = now_ns;
    kept[vm.name] = std::move(m);
  }
  for (auto& [name, m] : vms_)
    if (!kept.count(name) && m.moved && now_ns - m.last_move_ns < config_.return_ban_ns) kept[name] = m;
  vms_ = std::move(kept);
}

void Planner::RestoreLastMove(const std::string& vm, uint64_t at_ns, const std::string& from) {
  VmMemory& m = vms_[vm];
  m.moved = true;
  m.last_move_ns = at_ns;
  if (from.empty()) return;
  std::erase_if(m.left, [&](const auto& e) { return e.first == from || at_ns - std::min(at_ns, e.second) >= config_.return_ban_ns; });
  m.left.emplace_back(from, at_ns);
}

void Planner::ResetHost(const std::string& host) {
  for (const char* t : {"cpu/", "net/", "swap/"}) since_ns_.erase(t + host);
}

void Planner::Started(const std::string& vm, const std::string& from, const std::string& to, uint64_t now_ns) {
  RestoreLastMove(vm, now_ns, from);
  since_ns_.erase("bandwidth/" + vm);
  ResetHost(from);
  ResetHost(to);
}

void Planner::Finished(const std::string& vm, const std::string& from, const std::string& to, uint64_t now_ns, bool ok) {
  if (ok) {
    RestoreLastMove(vm, now_ns, from);
    vms_[vm].failures = 0;
  } else {
    VmMemory& m = vms_[vm];
    ++m.failures;
    m.failed_ns = now_ns;
  }
  ResetHost(from);
  ResetHost(to);
}

Plan Planner::Decide(const ClusterView& view, uint64_t now_ns) const {
  Plan plan;
  Round r(view, config_, now_ns, vms_);
  for (size_t i = 0; i < view.vms.size(); ++i)
    if (auto it = vms_.find(view.vms[i].name); it != vms_.end()) r.memo[i] = &it->second;
  r.hosts.reserve(view.hosts.size());
  for (const HostView& h : view.hosts) {
    r.by_name[h.name] = r.hosts.size();
    r.hosts.push_back(Work{&h, h.usage.cpus, h.usage.net_bytes_per_s, 0, 0, {}});
  }
  for (size_t i = 0; i < view.vms.size(); ++i) {
    const VmView& vm = view.vms[i];
    Work* src = r.Host(vm.host);
    if (!src) continue;
    src->mem += vm.mem_bytes;
    src->vms.push_back(i);
    if (vm.migrating_to.empty()) continue;
    r.moving[i] = true;
    ++r.running;
    ++src->migrations;
    if (Work* dst = r.Host(vm.migrating_to)) {  // it will arrive: counted there already
      ++dst->migrations;
      dst->mem += vm.mem_bytes;
      dst->cpus += vm.cpus;
      dst->net += vm.net_bytes_per_s;
    }
  }
  plan.running = r.running;
  Stats(r.hosts, config_.cpu_threshold, &plan.cpu_stddev_before, &plan.cpu_overload_before);

  std::vector<size_t> order(r.hosts.size());
  for (size_t i = 0; i < order.size(); ++i) order[i] = i;
  std::sort(order.begin(), order.end(), [&](size_t a, size_t b) { return r.hosts[a].view->name < r.hosts[b].view->name; });

  // Drains first: every VM of a draining host, to the active host it loads least, room permitting.
  for (size_t hi : order) {
    Work& src = r.hosts[hi];
    if (src.view->state != HostState::kDraining) continue;
    Hotspot hs{src.view->name, "", "drain", 0, 0, 0, true, {}};
    std::vector<size_t> vms = src.vms;
    std::sort(vms.begin(), vms.end(), [&](size_t a, size_t b) { return view.vms[a].name < view.vms[b].name; });
    for (size_t i : vms) {
      if (std::string why = r.Unmovable(i, true); !why.empty()) {
        hs.why_not.push_back(why);
        continue;
      }
      if (r.ClusterFull() || src.migrations >= config_.max_per_host) {
        hs.why_not.push_back(fmt::format("{}: waits for a migration slot", view.vms[i].name));
        continue;
      }
      std::optional<size_t> best;
      double best_load = std::numeric_limits<double>::infinity();
      std::string refused;
      for (size_t di : r.ByLoad(Resource::kCpu)) {
        if (di == hi) continue;
        const Work& dst = r.hosts[di];
        if (dst.CpuLoad() >= best_load) break;  // its load with the VM can only be higher
        if (std::string why = r.Refuses(dst, i, true); !why.empty()) {
          if (refused.empty()) refused = fmt::format("{} {}", dst.view->name, why);
          continue;
        }
        const double after = Fraction(dst.cpus + view.vms[i].cpus, dst.view->capacity.cpus);
        if (after < best_load) best_load = after, best = di;
      }
      if (!best) {
        hs.why_not.push_back(fmt::format("{}: no active host can take it{}", view.vms[i].name, refused.empty() ? "" : " (" + refused + ")"));
        continue;
      }
      Work& dst = r.hosts[*best];
      plan.moves.push_back(Move{view.vms[i].name, src.view->name, dst.view->name, "drain of " + src.view->name, 0,
                                EstimateMigration(view.vms[i].mem_bytes, view.vms[i].dirty_bytes_per_s, config_.link)});
      r.Apply(i, src, dst);
    }
    plan.hotspots.push_back(std::move(hs));
  }

  // Hotspots, the most severe first.
  struct Trigger {
    std::string key;
    std::string trigger;
    size_t host;
    std::optional<size_t> vm;
    double value, threshold;
    uint64_t since;
  };
  std::vector<Trigger> triggers;
  std::unordered_map<std::string, size_t> vm_index;
  for (size_t i = 0; i < view.vms.size(); ++i) vm_index[view.vms[i].name] = i;
  for (const auto& [key, since] : since_ns_) {
    const size_t slash = key.find('/');
    const std::string kind = key.substr(0, slash), name = key.substr(slash + 1);
    if (kind == "bandwidth") {
      auto it = vm_index.find(name);
      if (it == vm_index.end()) continue;
      const Work* h = r.Host(view.vms[it->second].host);
      if (!h || !h->Active()) continue;
      triggers.push_back({key, kind, static_cast<size_t>(h - r.hosts.data()), it->second, view.vms[it->second].net_drops_per_s, 0, since});
      continue;
    }
    const Work* h = r.Host(name);
    if (!h || !h->Active()) continue;
    const size_t hi = static_cast<size_t>(h - r.hosts.data());
    if (kind == "cpu") triggers.push_back({key, kind, hi, {}, h->CpuLoad(), config_.cpu_threshold, since});
    else if (kind == "net") triggers.push_back({key, kind, hi, {}, h->NetLoad(), config_.net_threshold, since});
    else if (kind == "swap") triggers.push_back({key, kind, hi, {}, h->view->usage.swap_out_pages_per_s, config_.swap_out_pages_per_s, since});
  }
  auto severity = [](const Trigger& t) { return t.threshold > 0 ? t.value / t.threshold : t.value; };
  std::sort(triggers.begin(), triggers.end(), [&](const Trigger& a, const Trigger& b) {
    if (severity(a) != severity(b)) return severity(a) > severity(b);
    return a.key < b.key;
  });

  for (const Trigger& t : triggers) {
    Work& src = r.hosts[t.host];
    const uint64_t held = now_ns > t.since ? now_ns - t.since : 0;
    Hotspot hs{src.view->name, t.vm ? view.vms[*t.vm].name : "", t.trigger, t.value, t.threshold, static_cast<double>(held) / kNs,
               held >= config_.sustain_ns, {}};
    if (!hs.sustained) {
      hs.why_not.push_back(fmt::format("held {} of the {} it must", Duration(held), Duration(config_.sustain_ns)));
      plan.hotspots.push_back(std::move(hs));
      continue;
    }
    const bool bandwidth = t.trigger == "bandwidth";
    const bool swap = t.trigger == "swap";
    const Resource res = t.trigger == "net" || bandwidth ? Resource::kNet : Resource::kCpu;
    const std::string reason = bandwidth ? fmt::format("bandwidth: {} drops {:.0f} frames/s on {} for {}", hs.vm, t.value, src.view->name, Duration(held))
                               : swap    ? fmt::format("swap {:.0f} pages/s > {:.0f} for {} on {}", t.value, t.threshold, Duration(held), src.view->name)
                                         : fmt::format("{} {} > {} for {} on {}", t.trigger, Percent(t.value), Percent(t.threshold), Duration(held), src.view->name);
    // Moves until the host is below its threshold (one for swap and bandwidth: their measure does
    // not follow a VM's numbers), or nothing qualifies.
    for (int moved = 0;; ++moved) {
      if ((swap || bandwidth) && moved > 0) break;
      if (!swap && !bandwidth && src.Load(res) <= t.threshold) break;
      if (r.ClusterFull()) {
        hs.why_not.push_back(fmt::format("the cluster runs {} migrations (at most {})", r.running + r.planned, config_.max_in_cluster));
        break;
      }
      if (src.migrations >= config_.max_per_host) {
        hs.why_not.push_back(fmt::format("{} is busy with a migration", src.view->name));
        break;
      }
      std::vector<size_t> vms = bandwidth ? std::vector<size_t>{*t.vm} : src.vms;
      if (swap) {
        // The VMs the host swaps out are the ones short of memory: move one of them, when the
        // agent saw any (otherwise any VM frees memory).
        std::vector<size_t> swapping;
        for (size_t i : vms)
          if (view.vms[i].swap_out_bytes_per_s > 0) swapping.push_back(i);
        if (!swapping.empty()) vms = std::move(swapping);
      }
      std::sort(vms.begin(), vms.end(), [&](size_t a, size_t b) { return view.vms[a].name < view.vms[b].name; });
      Candidate best;
      std::vector<std::string> why_not;
      for (size_t i : vms) {
        const VmView& vm = view.vms[i];
        if (std::string why = r.Unmovable(i, false); !why.empty()) {
          why_not.push_back(why);
          continue;
        }
        const MigrationEstimate est = EstimateMigration(vm.mem_bytes, vm.dirty_bytes_per_s, config_.link);
        if (!est.converges) {
          why_not.push_back(fmt::format("{}: dirties {:.0f} MB/s, its migration would not converge", vm.name, vm.dirty_bytes_per_s / 1e6));
          continue;
        }
        const double src_before = swap ? 0 : src.Load(res);
        const double vm_share = res == Resource::kCpu ? Fraction(vm.cpus, src.view->capacity.cpus)
                                                      : Fraction(vm.net_bytes_per_s, src.view->capacity.net_bytes_per_s);
        std::optional<Candidate> mine;
        std::string refused;
        // Least loaded first: dst_after >= the host's load now, so once that reaches the best
        // destination's dst_after no later host can do better (for swap: the first that may).
        for (size_t di : r.ByLoad(swap ? Resource::kCpu : res)) {
          if (di == t.host) continue;
          const Work& dst = r.hosts[di];
          if (mine && (swap || dst.Load(res) >= mine->dst_after)) break;
          if (std::string why = r.Refuses(dst, i, false); !why.empty()) {
            if (refused.empty()) refused = fmt::format("{} {}", dst.view->name, why);
            continue;
          }
          if (swap && dst.view->usage.swap_out_pages_per_s > config_.swap_out_pages_per_s) continue;
          const double dst_after = res == Resource::kCpu ? Fraction(dst.cpus + vm.cpus, dst.view->capacity.cpus)
                                                         : Fraction(dst.net + vm.net_bytes_per_s, dst.view->capacity.net_bytes_per_s);
          double gain;
          if (swap) {
            gain = Fraction(static_cast<double>(vm.mem_bytes), static_cast<double>(src.view->capacity.mem_bytes ? src.view->capacity.mem_bytes : 1));
          } else if (bandwidth) {
            // Headroom the VM gains: what the destination has left after it, against the source.
            gain = (1 - dst_after) - (1 - src_before);
          } else {
            gain = src_before - std::max(src_before - vm_share, dst_after);
          }
          if (!swap && gain <= config_.hysteresis) {
            if (refused.empty()) refused = fmt::format("{} gains only {}", dst.view->name, Percent(std::max(gain, 0.0)));
            continue;
          }
          if (!mine || dst_after < mine->dst_after) mine = Candidate{i, di, gain, dst_after, est, gain / std::max(est.total_s, 0.001)};
        }
        if (!mine) {
          why_not.push_back(fmt::format("{}: no destination{}", vm.name, refused.empty() ? "" : " (" + refused + ")"));
          continue;
        }
        if (mine->score > best.score) best = *mine;
      }
      if (best.score < 0) {
        for (auto& w : why_not) hs.why_not.push_back(std::move(w));
        break;
      }
      Work& dst = r.hosts[best.dst];
      plan.moves.push_back(Move{view.vms[best.vm].name, src.view->name, dst.view->name, reason, best.gain, best.estimate});
      r.Apply(best.vm, src, dst);
    }
    plan.hotspots.push_back(std::move(hs));
  }
  Stats(r.hosts, config_.cpu_threshold, &plan.cpu_stddev_after, &plan.cpu_overload_after);
  return plan;
}

}  // namespace ferry::controller
