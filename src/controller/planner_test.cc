// The planner's rules one by one (planner.h), and a small closed loop: hosts whose VMs share their
// CPUs, moved by the planner's own decisions, until it holds still.
#include "controller/planner.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <map>

namespace ferry::controller {
namespace {

constexpr uint64_t kS = 1'000'000'000;
constexpr uint64_t kMiB = 1 << 20;

HostView H(std::string name, double cpus_used, double cap_cpus = 1, uint64_t cap_mem = 4096 * kMiB) {
  HostView h;
  h.name = std::move(name);
  h.capacity = {cap_cpus, cap_mem, 0};
  h.usage.cpus = cpus_used;
  return h;
}
VmView V(std::string name, std::string host, double cpus, uint64_t mem = 256 * kMiB) {
  VmView v;
  v.name = std::move(name);
  v.host = std::move(host);
  v.cpus = cpus;
  v.mem_bytes = mem;
  return v;
}
std::string Why(const Plan& p) {
  std::string s;
  for (const auto& h : p.hotspots)
    for (const auto& w : h.why_not) s += h.host + ": " + w + "\n";
  return s;
}

TEST(CostModel, AnIdleVmCostsItsRamOnceAndAPauseOfNothing) {
  LinkModel link;
  auto e = EstimateMigration(256 * kMiB, 0, link);
  EXPECT_TRUE(e.converges);
  EXPECT_NEAR(e.total_s, 256.0 * kMiB / link.bytes_per_s, 0.01);
  EXPECT_EQ(e.pause_s, 0);
  EXPECT_EQ(e.bytes, 256 * kMiB);
  // Dirtying half the link's rate: rounds halve, the pause fits the target, more bytes than RAM.
  auto half = EstimateMigration(256 * kMiB, link.bytes_per_s / 2, link);
  EXPECT_TRUE(half.converges);
  EXPECT_LE(half.pause_s, link.pause_target_s);
  EXPECT_GT(half.bytes, 256 * kMiB);
  EXPECT_GT(half.total_s, e.total_s);
  // Faster than the link: the rounds never shrink.
  EXPECT_FALSE(EstimateMigration(256 * kMiB, link.bytes_per_s * 2, link).converges);
}

TEST(Planner, AHotspotMustHoldForTheWholeWindow) {
  Planner p;
  ClusterView v{{H("a", 1.0), H("b", 0)}, {V("vm1", "a", 0.5), V("vm2", "a", 0.5)}};
  p.Observe(v, 0);
  p.Observe(v, 9 * kS);
  Plan early = p.Decide(v, 9 * kS);
  EXPECT_TRUE(early.moves.empty());
  ASSERT_EQ(early.hotspots.size(), 1u);
  EXPECT_FALSE(early.hotspots[0].sustained);
  EXPECT_NE(Why(early).find("held 9 s of the 10 s"), std::string::npos) << Why(early);
  // The load dipped for one tick: the window starts over.
  ClusterView calm = v;
  calm.hosts[0].usage.cpus = 0.5;
  p.Observe(calm, 9 * kS);
  p.Observe(v, 10 * kS);
  EXPECT_TRUE(p.Decide(v, 12 * kS).moves.empty());
  Plan late = p.Decide(v, 20 * kS);
  ASSERT_EQ(late.moves.size(), 1u) << Why(late);
  EXPECT_EQ(late.moves[0].from, "a");
  EXPECT_EQ(late.moves[0].to, "b");
  EXPECT_NE(late.moves[0].reason.find("cpu 100% > 75% for 10 s on a"), std::string::npos) << late.moves[0].reason;
  // Decide is a dry run: asking again gives the same plan.
  Plan again = p.Decide(v, 20 * kS);
  ASSERT_EQ(again.moves.size(), 1u);
  EXPECT_EQ(again.moves[0].vm, late.moves[0].vm);
}

TEST(Planner, TheDestinationMustNotEndAboveTheThreshold) {
  Planner p;
  // One VM using the whole host: wherever it goes, that host ends at 100%.
  ClusterView v{{H("a", 1.0), H("b", 0), H("c", 0.3)}, {V("vm1", "a", 1.0)}};
  p.Observe(v, 0);
  Plan plan = p.Decide(v, 30 * kS);
  EXPECT_TRUE(plan.moves.empty());
  EXPECT_NE(Why(plan).find("would reach cpu 100%"), std::string::npos) << Why(plan);
}

TEST(Planner, AMoveMustCoolThePairByMoreThanTheHysteresis) {
  PlannerConfig c;
  c.hysteresis = 0.05;
  Planner p(c);
  // 0.80 on a; moving 0.04 CPUs cools it by 4 points only.
  ClusterView small{{H("a", 0.80), H("b", 0)}, {V("vm1", "a", 0.04), V("base", "a", 0)}};
  p.Observe(small, 0);
  Plan none = p.Decide(small, 20 * kS);
  EXPECT_TRUE(none.moves.empty());
  EXPECT_NE(Why(none).find("gains only 4%"), std::string::npos) << Why(none);
  ClusterView enough{{H("a", 0.80), H("b", 0)}, {V("vm1", "a", 0.10)}};
  Plan one = p.Decide(enough, 20 * kS);
  ASSERT_EQ(one.moves.size(), 1u) << Why(one);
  EXPECT_NEAR(one.moves[0].gain, 0.10, 1e-9);
}

TEST(Planner, PicksTheLeastLoadedDestinationWithRoomAndTheBestGainPerSecond) {
  Planner p;
  ClusterView v{{H("a", 1.0), H("b", 0.2), H("c", 0.1, 1, 512 * kMiB), H("d", 0.3)},
                {V("big", "a", 0.4, 2048 * kMiB), V("small", "a", 0.4, 256 * kMiB), V("c1", "c", 0.1, 384 * kMiB)}};
  p.Observe(v, 0);
  Plan plan = p.Decide(v, 11 * kS);
  ASSERT_GE(plan.moves.size(), 1u) << Why(plan);
  // Same gain, a quarter of the bytes: "small" first; c has no room for it (384 + 256 > 512).
  EXPECT_EQ(plan.moves[0].vm, "small");
  EXPECT_EQ(plan.moves[0].to, "b");
}

TEST(Planner, AVmThatJustMovedOrWouldNotConvergeStays) {
  Planner p;
  ClusterView v{{H("a", 1.0), H("b", 0)}, {V("vm1", "a", 0.5), V("vm2", "a", 0.5)}};
  v.vms[1].dirty_bytes_per_s = 500e6;  // faster than the 1 Gbit/s link
  p.RestoreLastMove("vm1", 5 * kS);
  p.Observe(v, 0);
  Plan plan = p.Decide(v, 60 * kS);
  EXPECT_TRUE(plan.moves.empty());
  EXPECT_NE(Why(plan).find("vm1: moved 55 s ago (cooldown 10 min)"), std::string::npos) << Why(plan);
  EXPECT_NE(Why(plan).find("vm2: dirties 500 MB/s"), std::string::npos) << Why(plan);
  Plan later = p.Decide(v, 5 * kS + p.config().vm_cooldown_ns);
  ASSERT_EQ(later.moves.size(), 1u) << Why(later);
  EXPECT_EQ(later.moves[0].vm, "vm1");
}

// A VM moved again within the return ban waits twice as long each time (10, 20, 40, then 80 min):
// the planner cannot keep one VM chasing bursts (at most 3 moves an hour instead of 6).
TEST(Planner, EachFurtherMoveWithinTheHourDoublesTheCooldown) {
  const uint64_t min10 = Planner().config().vm_cooldown_ns;
  auto movable_after = [&](int earlier_moves, uint64_t wait_ns) {
    Planner p;
    ClusterView v{{H("a", 1.0), H("b", 0), H("c", 0), H("d", 0), H("e", 0)}, {V("vm1", "a", 0.5), V("vm2", "a", 0.5)}};
    v.vms[1].dirty_bytes_per_s = 500e6;  // vm2 never moves: only vm1 can relieve a
    const char* from[] = {"b", "c", "d", "e"};
    for (int k = 0; k < earlier_moves; ++k) p.RestoreLastMove("vm1", static_cast<uint64_t>(k) * kS, from[k]);
    const uint64_t last = static_cast<uint64_t>(earlier_moves - 1) * kS;
    p.Observe(v, last + wait_ns - 20 * kS);
    Plan plan = p.Decide(v, last + wait_ns);
    return std::pair<bool, std::string>(!plan.moves.empty(), Why(plan));
  };
  EXPECT_TRUE(movable_after(1, min10 + kS).first) << movable_after(1, min10 + kS).second;
  auto second = movable_after(2, min10 + kS);
  EXPECT_FALSE(second.first);
  EXPECT_NE(second.second.find("cooldown 20 min, its move 2 within"), std::string::npos) << second.second;
  EXPECT_TRUE(movable_after(2, 2 * min10 + kS).first) << movable_after(2, 2 * min10 + kS).second;
  EXPECT_FALSE(movable_after(3, 2 * min10 + kS).first);
  EXPECT_TRUE(movable_after(3, 4 * min10 + kS).first);
}

TEST(Planner, MigrationsPerHostAndInTheClusterAreBounded) {
  PlannerConfig c;
  c.max_in_cluster = 2;
  Planner p(c);
  ClusterView v;
  for (int i = 0; i < 4; ++i) {
    const std::string hot = "hot" + std::to_string(i);
    v.hosts.push_back(H(hot, 1.0));
    v.hosts.push_back(H("cold" + std::to_string(i), 0));
    for (int j = 0; j < 4; ++j) v.vms.push_back(V(hot + "-vm" + std::to_string(j), hot, 0.25));
  }
  p.Observe(v, 0);
  Plan plan = p.Decide(v, 11 * kS);
  ASSERT_EQ(plan.moves.size(), 2u) << Why(plan);
  EXPECT_NE(plan.moves[0].from, plan.moves[1].from);  // one per host
  EXPECT_NE(plan.moves[0].to, plan.moves[1].to);
  EXPECT_NE(Why(plan).find("the cluster runs 2 migrations (at most 2)"), std::string::npos) << Why(plan);
  // A migration already running counts against both limits.
  v.vms[0].migrating_to = "cold0";
  Plan busy = p.Decide(v, 11 * kS);
  EXPECT_EQ(busy.running, 1);
  ASSERT_EQ(busy.moves.size(), 1u) << Why(busy);
  EXPECT_NE(busy.moves[0].from, "hot0");
  EXPECT_NE(busy.moves[0].to, "cold0");
}

TEST(Planner, ADrainMovesEveryVmEvenAboveTheThresholdButNotIntoADrainingHost) {
  Planner p;
  ClusterView v{{H("a", 0.2), H("b", 0.9), H("c", 0.95), H("d", 0)}, {V("vm1", "a", 0.1), V("vm2", "a", 0.1)}};
  v.hosts[0].state = HostState::kDraining;
  v.hosts[3].state = HostState::kDrained;
  p.RestoreLastMove("vm1", 0);  // the cooldown does not hold a drain up
  Plan plan = p.Decide(v, kS);
  ASSERT_EQ(plan.moves.size(), 1u) << Why(plan);  // one migration out of a host at a time
  EXPECT_EQ(plan.moves[0].vm, "vm1");
  EXPECT_EQ(plan.moves[0].to, "b");  // the least loaded active host, although above 75%
  EXPECT_EQ(plan.moves[0].reason, "drain of a");
  EXPECT_NE(Why(plan).find("vm2: waits for a migration slot"), std::string::npos) << Why(plan);
  // No room anywhere: said, not silently skipped.
  ClusterView full = v;
  full.hosts[1].capacity.mem_bytes = full.hosts[2].capacity.mem_bytes = 300 * kMiB;
  full.vms.push_back(V("other", "b", 0, 256 * kMiB));
  full.vms.push_back(V("other2", "c", 0, 256 * kMiB));
  Plan stuck = p.Decide(full, kS);
  EXPECT_TRUE(stuck.moves.empty());
  EXPECT_NE(Why(stuck).find("vm1: no active host can take it (b no room for 256 MiB)"), std::string::npos) << Why(stuck);
}

TEST(Planner, AFailedMigrationIsRetriedOnlyAfterABackoffThatGrows) {
  Planner p;
  ClusterView v{{H("a", 0.2), H("b", 0.1)}, {V("vm1", "a", 0.1)}};
  v.hosts[0].state = HostState::kDraining;
  ASSERT_EQ(p.Decide(v, 0).moves.size(), 1u);
  p.Started("vm1", "a", "b", 0);
  p.Finished("vm1", "a", "b", kS, false);
  Plan wait = p.Decide(v, 20 * kS);
  EXPECT_TRUE(wait.moves.empty());  // not even a drain hammers a failing migration
  EXPECT_NE(Why(wait).find("vm1: its last migration failed 19 s ago (retry after 30 s)"), std::string::npos) << Why(wait);
  ASSERT_EQ(p.Decide(v, 32 * kS).moves.size(), 1u);
  p.Finished("vm1", "a", "b", 32 * kS, false);
  EXPECT_TRUE(p.Decide(v, 80 * kS).moves.empty());  // 60 s after the second failure
  EXPECT_EQ(p.Decide(v, 93 * kS).moves.size(), 1u);
  p.Finished("vm1", "a", "b", 93 * kS, true);  // a success clears the count: the next backoff is 30 s again
  v.vms[0].host = "b";
  v.hosts[0].state = HostState::kActive;
  v.hosts[1].state = HostState::kDraining;
  p.Finished("vm1", "b", "a", 100 * kS, false);
  EXPECT_TRUE(p.Decide(v, 129 * kS).moves.empty());
  EXPECT_EQ(p.Decide(v, 131 * kS).moves.size(), 1u);
}

TEST(Planner, BandwidthAndSwapHotspots) {
  Planner p;
  ClusterView v{{H("a", 0.1), H("b", 0.1), H("c", 0.1), H("d", 0.1)}, {V("vm1", "a", 0.05), V("vm2", "b", 0.05)}};
  for (auto& h : v.hosts) h.capacity.net_bytes_per_s = 100e6;
  v.hosts[0].usage.net_bytes_per_s = 70e6;
  v.hosts[1].usage.net_bytes_per_s = 10e6;
  v.hosts[2].usage.net_bytes_per_s = 60e6;
  v.vms[0].net_bytes_per_s = 40e6;
  v.vms[0].net_drops_per_s = 300;
  v.hosts[1].usage.swap_out_pages_per_s = 5000;
  p.Observe(v, 0);
  Plan plan = p.Decide(v, 11 * kS);
  ASSERT_EQ(plan.moves.size(), 2u) << Why(plan);
  std::map<std::string, Move> by_vm;
  for (auto& m : plan.moves) by_vm[m.vm] = m;
  EXPECT_EQ(by_vm["vm1"].to, "d");  // the most network headroom (c would end at 100%)
  EXPECT_NE(by_vm["vm1"].reason.find("bandwidth: vm1 drops 300 frames/s"), std::string::npos);
  EXPECT_EQ(by_vm["vm2"].from, "b");  // off the swapping host, to the one host not busy
  EXPECT_EQ(by_vm["vm2"].to, "c");
  EXPECT_NE(by_vm["vm2"].reason.find("swap 5000 pages/s"), std::string::npos);
}

// A swap hotspot moves a VM the host swaps out (the one short of memory), not the one whose move
// would free the most memory, once the agent reports which it is.
TEST(Planner, ASwapHotspotMovesTheVmThatIsSwappedOut) {
  auto plan_for = [](double vm1_swap, double vm2_swap) {
    Planner p;
    ClusterView v{{H("a", 0.2), H("b", 0.1)}, {V("vm1", "a", 0.05, 1024 * kMiB), V("vm2", "a", 0.05, 256 * kMiB)}};
    v.hosts[0].usage.swap_out_pages_per_s = 3000;
    v.vms[0].swap_out_bytes_per_s = vm1_swap;
    v.vms[1].swap_out_bytes_per_s = vm2_swap;
    p.Observe(v, 0);
    return p.Decide(v, 11 * kS);
  };
  Plan unknown = plan_for(0, 0);
  ASSERT_EQ(unknown.moves.size(), 1u) << Why(unknown);
  EXPECT_EQ(unknown.moves[0].vm, "vm1") << "without per-VM figures: the most memory freed per second of migration";
  Plan known = plan_for(0, 8e6);
  ASSERT_EQ(known.moves.size(), 1u) << Why(known);
  EXPECT_EQ(known.moves[0].vm, "vm2");
  EXPECT_EQ(known.moves[0].to, "b");
}

// Hosts of 1 CPU whose VMs share it equally (each wants a whole CPU), moved by the planner's own
// decisions; a migration takes one monitoring tick. Three VMs on one host spread one per host,
// then the planner holds still although every host stays above 75% (one VM is all its load).
TEST(Planner, ThreeCpuBoundVmsSpreadOnePerHostThenNothingMoves) {
  Planner p;
  std::map<std::string, std::string> where{{"vm1", "a"}, {"vm2", "a"}, {"vm3", "a"}};
  auto view = [&] {
    ClusterView v;
    for (const char* h : {"a", "b", "c"}) {
      const auto n = std::count_if(where.begin(), where.end(), [&](auto& e) { return e.second == h; });
      v.hosts.push_back(H(h, n ? 1.0 : 0.0));
      for (auto& [vm, host] : where)
        if (host == h) v.vms.push_back(V(vm, host, 1.0 / static_cast<double>(n)));
    }
    return v;
  };
  int moves = 0;
  uint64_t last_move = 0;
  for (uint64_t t = 0; t <= 600 * kS; t += 2 * kS) {
    ClusterView v = view();
    p.Observe(v, t);
    for (const Move& m : p.Decide(v, t).moves) {
      p.Started(m.vm, m.from, m.to, t);
      where[m.vm] = m.to;
      p.Finished(m.vm, m.from, m.to, t);
      ++moves;
      last_move = t;
    }
  }
  EXPECT_EQ(moves, 2);
  EXPECT_LE(last_move, 60 * kS);
  std::map<std::string, int> per_host;
  for (auto& [vm, host] : where) ++per_host[host];
  EXPECT_EQ(per_host.size(), 3u);
}

}  // namespace
}  // namespace ferry::controller
