// The controller's planner (src/controller/planner.h) on a simulated cluster: no VMs, no agents -
// hosts and VMs are numbers driven by usage traces, migrations take the time the cost model
// predicts, and each monitoring tick runs the planner exactly as the controller's loop does
// (Observe, Decide, then Started/Finished as migrations begin and end).
//
// Traces: a seeded generator (the same seed, the same cluster and the same traces), or recorded
// ones (--traces FILE, from bench/planner_sim/record.py: real agents' per-VM samples of CPU, network
// and dirty rate). A recorded trace gives a VM its shape over time and how its network and dirty
// rate go with its CPU; the generator still gives its level: each VM replays one recorded trace
// (picked by the seed, from a random point in it, looping), scaled so that its mean CPU is the
// level the generator drew (an idle trace - mean below 0.02 CPUs - is replayed as it is). A trace
// without network traffic takes its network rate from its CPU as the generator's do. Generated
// shapes: each VM has one
// of four shapes - steady, diurnal (a 24 h sine with a random phase), bursty (on/off phases of 10
// to 60 min), idle - with its own level, plus +-10% noise per tick; its network rate and dirty rate
// follow its CPU use. A host's VMs get the CPU they want while the host has it; beyond its declared
// CPUs every VM gets its share. The first placement is skewed (a tenth of the hosts get twice the
// VMs) so that the planner has hotspots to resolve.
//
// Prints one JSON line: decision time per round (median, p99, max), migrations per simulated hour,
// the CPU imbalance (standard deviation of host load) and overload (CPUs above the threshold,
// summed) at the start and at every simulated hour, and oscillation: a VM moved back to a host it
// left within the hour (ping-pong), and the most moves of one VM within any hour.
// --series FILE writes one CSV line per tick (for bench/planner_sim/plot).
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <fstream>
#include <map>
#include <random>
#include <string>
#include <vector>

#include <CLI/CLI.hpp>
#include <fmt/format.h>
#include <nlohmann/json.hpp>

#include "controller/planner.h"

using namespace ferry::controller;

namespace {

constexpr double kGiB = 1024.0 * 1024 * 1024;

enum class Shape { kSteady, kDiurnal, kBursty, kIdle };

struct TraceSample {
  double t, cpus, net, dirty;
};
struct Trace {
  std::string name;
  std::vector<TraceSample> samples;  // by time, from t = 0
  double length = 0, mean_cpus = 0;
  bool has_net = false;
  // The sample in force at `t` (looping).
  const TraceSample& At(double t) const {
    const double x = std::fmod(t, length);
    auto it = std::upper_bound(samples.begin(), samples.end(), x, [](double v, const TraceSample& s) { return v < s.t; });
    return it == samples.begin() ? samples.front() : *(it - 1);
  }
};

// CSV with a header naming at least t_s, vm, cpus, net_bytes_per_s, dirty_bytes_per_s (host is
// optional: host/vm names a trace). Traces of fewer than two samples, or all at one time, are dropped.
std::vector<Trace> LoadTraces(const std::string& path, std::string* error) {
  std::ifstream f(path);
  if (!f) {
    *error = "cannot read " + path;
    return {};
  }
  std::string line;
  std::getline(f, line);
  std::vector<std::string> cols;
  auto split = [](const std::string& l) {
    std::vector<std::string> out(1);
    for (char c : l) {
      if (c == ',') out.emplace_back();
      else if (c != '\r') out.back() += c;
    }
    return out;
  };
  cols = split(line);
  auto col = [&](const char* name) -> int {
    for (size_t i = 0; i < cols.size(); ++i)
      if (cols[i] == name) return static_cast<int>(i);
    return -1;
  };
  const int ct = col("t_s"), cv = col("vm"), cc = col("cpus"), cn = col("net_bytes_per_s"), cd = col("dirty_bytes_per_s"), ch = col("host");
  if (ct < 0 || cv < 0 || cc < 0 || cn < 0 || cd < 0) {
    *error = path + ": the header needs t_s, vm, cpus, net_bytes_per_s, dirty_bytes_per_s";
    return {};
  }
  std::map<std::string, Trace> by_name;
  size_t n = 1;
  while (std::getline(f, line)) {
    ++n;
    if (line.empty()) continue;
    auto v = split(line);
    try {
      if (v.size() < cols.size()) throw std::invalid_argument("short row");
      const std::string name = (ch >= 0 ? v[static_cast<size_t>(ch)] + "/" : "") + v[static_cast<size_t>(cv)];
      Trace& tr = by_name[name];
      tr.name = name;
      tr.samples.push_back({std::stod(v[static_cast<size_t>(ct)]), std::max(0.0, std::stod(v[static_cast<size_t>(cc)])),
                            std::max(0.0, std::stod(v[static_cast<size_t>(cn)])), std::max(0.0, std::stod(v[static_cast<size_t>(cd)]))});
    } catch (const std::exception&) {
      *error = fmt::format("{}:{}: not a row of numbers: {}", path, n, line);
      return {};
    }
  }
  std::vector<Trace> out;
  for (auto& [name, tr] : by_name) {
    if (tr.samples.size() < 2) continue;
    std::sort(tr.samples.begin(), tr.samples.end(), [](const TraceSample& a, const TraceSample& b) { return a.t < b.t; });
    const double t0 = tr.samples.front().t;
    double sum = 0;
    for (auto& x : tr.samples) {
      x.t -= t0;
      sum += x.cpus;
      tr.has_net = tr.has_net || x.net > 0;
    }
    // The last sample holds for one sampling interval.
    tr.length = tr.samples.back().t + (tr.samples.back().t - tr.samples[tr.samples.size() - 2].t);
    tr.mean_cpus = sum / static_cast<double>(tr.samples.size());
    if (tr.length <= 0) continue;  // every sample at one time: no shape to replay
    out.push_back(std::move(tr));
  }
  if (out.empty()) *error = path + ": no trace with two samples or more";
  return out;
}

struct SimVm {
  Shape shape;
  const Trace* trace = nullptr;  // recorded (--traces): replayed from `offset`, times `scale`
  double offset = 0, scale = 1;
  double level;   // CPUs wanted (steady, diurnal mean, bursty on-level)
  double phase;   // diurnal phase (radians) or burst offset (s)
  double period;  // bursty: on+off period (s)
  double net_per_cpu, dirty_per_cpu;  // bytes/s per busy CPU
  uint64_t mem;
  size_t host;
  bool migrating = false;
  size_t to = 0;
  double done_at = 0;
  std::vector<std::pair<double, std::pair<size_t, size_t>>> moves;  // (t, (from, to))
};

// Deterministic noise in [-1, 1] per (vm, tick).
double Noise(uint64_t a, uint64_t b) {
  uint64_t x = a * 0x9E3779B97F4A7C15ull ^ (b + 0x632BE59BD9B4E019ull);
  x ^= x >> 31;
  x *= 0xBF58476D1CE4E5B9ull;
  x ^= x >> 27;
  return static_cast<double>(x % 20001) / 10000.0 - 1.0;
}

double Want(const SimVm& v, size_t index, double t, uint64_t tick) {
  if (v.trace) return v.scale * v.trace->At(t + v.offset).cpus;
  double w = 0;
  switch (v.shape) {
    case Shape::kSteady: w = v.level; break;
    case Shape::kDiurnal: w = v.level * (1 + 0.6 * std::sin(2 * M_PI * t / 86400 + v.phase)); break;
    case Shape::kBursty: w = std::fmod(t + v.phase, v.period) < v.period * 0.4 ? v.level : 0.1 * v.level; break;
    case Shape::kIdle: w = 0.05; break;
  }
  return std::max(0.0, w * (1 + 0.1 * Noise(index, tick)));
}

double Percentile(std::vector<double> v, double p) {
  if (v.empty()) return 0;
  std::sort(v.begin(), v.end());
  return v[std::min(v.size() - 1, static_cast<size_t>(p * static_cast<double>(v.size() - 1) + 0.5))];
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"Ferry planner simulation: the controller's planner on a simulated cluster"};
  int hosts = 1000, vms = 20000, seed = 1;
  double hours = 6, tick_s = 10, host_cpus = 32, host_mem_gib = 512, link_gbit = 10;
  int max_in_cluster = 50;
  std::string series, traces_file;
  app.add_option("--hosts", hosts)->check(CLI::Range(2, 100000));
  app.add_option("--vms", vms)->check(CLI::Range(1, 1000000));
  app.add_option("--hours", hours, "simulated time")->check(CLI::Range(0.01, 1000.0));
  app.add_option("--tick", tick_s, "monitoring period, s")->check(CLI::Range(1.0, 3600.0));
  app.add_option("--seed", seed);
  app.add_option("--host-cpus", host_cpus)->check(CLI::Range(1.0, 1024.0));
  app.add_option("--host-mem-gib", host_mem_gib)->check(CLI::Range(1.0, 65536.0));
  app.add_option("--link-gbit", link_gbit, "migration bandwidth between hosts")->check(CLI::Range(0.01, 1000.0));
  app.add_option("--max-in-cluster", max_in_cluster, "migrations at once")->check(CLI::Range(1, 100000));
  app.add_option("--series", series, "CSV, one line per tick");
  app.add_option("--traces", traces_file, "recorded per-VM usage (bench/planner_sim/record.py) to replay");
  CLI11_PARSE(app, argc, argv);

  std::mt19937_64 rng(static_cast<uint64_t>(seed));
  std::uniform_real_distribution<double> u(0, 1);
  std::vector<SimVm> vm(static_cast<size_t>(vms));
  const std::vector<uint64_t> sizes = {1ull << 30, 2ull << 30, 4ull << 30, 8ull << 30, 16ull << 30};
  std::vector<Trace> traces;
  if (!traces_file.empty()) {
    std::string error;
    traces = LoadTraces(traces_file, &error);
    if (traces.empty()) {
      std::fprintf(stderr, "planner_sim: %s\n", error.c_str());
      return 2;
    }
  }
  for (auto& v : vm) {
    const double r = u(rng);
    v.shape = r < 0.35 ? Shape::kSteady : r < 0.65 ? Shape::kDiurnal : r < 0.85 ? Shape::kBursty : Shape::kIdle;
    v.level = v.shape == Shape::kBursty ? 1 + 3 * u(rng) : 0.2 + 1.6 * u(rng);
    v.phase = v.shape == Shape::kDiurnal ? 2 * M_PI * u(rng) : 3600 * u(rng);
    v.period = 600 + 3000 * u(rng);
    v.net_per_cpu = 5e6 + 20e6 * u(rng);
    v.dirty_per_cpu = 2e6 + 40e6 * u(rng);
    v.mem = sizes[static_cast<size_t>(u(rng) * static_cast<double>(sizes.size())) % sizes.size()];
    if (!traces.empty()) {
      v.trace = &traces[static_cast<size_t>(u(rng) * static_cast<double>(traces.size())) % traces.size()];
      v.offset = u(rng) * v.trace->length;
      v.scale = v.trace->mean_cpus < 0.02 ? 1.0 : v.level / v.trace->mean_cpus;
    }
  }
  // Skewed first placement: a tenth of the hosts weigh twice as much; memory must fit.
  std::vector<double> weight(static_cast<size_t>(hosts));
  for (size_t h = 0; h < weight.size(); ++h) weight[h] = h % 10 == 0 ? 2.0 : 1.0;
  std::discrete_distribution<size_t> pick(weight.begin(), weight.end());
  std::vector<uint64_t> mem_used(static_cast<size_t>(hosts), 0);
  const uint64_t host_mem = static_cast<uint64_t>(host_mem_gib * kGiB);
  for (auto& v : vm) {
    for (int tries = 0;; ++tries) {
      const size_t h = tries < 50 ? pick(rng) : static_cast<size_t>(tries) % static_cast<size_t>(hosts);
      if (mem_used[h] + v.mem <= host_mem) {
        v.host = h;
        mem_used[h] += v.mem;
        break;
      }
      if (tries > 50 + hosts) {
        std::fprintf(stderr, "planner_sim: %d VMs do not fit in %d hosts of %.0f GiB\n", vms, hosts, host_mem_gib);
        return 2;
      }
    }
  }

  PlannerConfig config;
  config.max_in_cluster = max_in_cluster;
  config.link.bytes_per_s = link_gbit * 1e9 / 8 * 0.94;
  Planner planner(config);
  std::vector<std::string> host_names(static_cast<size_t>(hosts)), vm_names(vm.size());
  std::map<std::string, size_t> host_index;
  for (size_t h = 0; h < host_names.size(); ++h) host_index[host_names[h] = fmt::format("h{:04}", h)] = h;
  std::map<std::string, size_t> vm_index;
  for (size_t i = 0; i < vm.size(); ++i) vm_index[vm_names[i] = fmt::format("vm{:05}", i)] = i;

  std::ofstream csv;
  if (!series.empty()) {
    csv.open(series);
    if (!csv) {
      std::fprintf(stderr, "planner_sim: cannot write %s\n", series.c_str());
      return 2;
    }
    csv << "t_s,decide_ms,cpu_stddev,cpu_overload_cpus,hot_hosts,migrations_started,migrations_running\n";
  }
  std::vector<double> decide_ms;
  nlohmann::json hourly = nlohmann::json::array();
  uint64_t started = 0;
  double first_stddev = -1, first_overload = 0;
  const uint64_t ticks = static_cast<uint64_t>(hours * 3600 / tick_s);
  ClusterView view;
  view.hosts.resize(static_cast<size_t>(hosts));
  view.vms.resize(vm.size());
  for (uint64_t tick = 0; tick <= ticks; ++tick) {
    const double t = static_cast<double>(tick) * tick_s;
    const uint64_t now = static_cast<uint64_t>(t * 1e9);
    // Migrations that end now.
    for (size_t i = 0; i < vm.size(); ++i) {
      SimVm& v = vm[i];
      if (!v.migrating || t < v.done_at) continue;
      const size_t from = v.host;
      v.host = v.to;
      v.migrating = false;
      v.moves.push_back({t, {from, v.to}});
      planner.Finished(vm_names[i], host_names[from], host_names[v.to], now);
    }
    // What every VM wants, what every host gives.
    std::vector<double> want(vm.size()), host_want(static_cast<size_t>(hosts), 0);
    for (size_t i = 0; i < vm.size(); ++i) {
      want[i] = Want(vm[i], i, t, tick);
      host_want[vm[i].host] += want[i];
      if (vm[i].migrating) host_want[vm[i].to] += 0.05 * want[i];  // the destination applies pages
    }
    int hot = 0;
    for (size_t h = 0; h < view.hosts.size(); ++h) {
      HostView& hv = view.hosts[h];
      hv.name = host_names[h];
      hv.capacity = {host_cpus, host_mem, 1.25e9};
      hv.usage = {std::min(host_want[h], host_cpus), 0, 0};
      if (hv.usage.cpus > config.cpu_threshold * host_cpus) ++hot;
    }
    for (size_t i = 0; i < vm.size(); ++i) {
      const SimVm& v = vm[i];
      const double share = host_want[v.host] > host_cpus ? host_cpus / host_want[v.host] : 1.0;
      VmView& vv = view.vms[i];
      vv.name = vm_names[i];
      vv.host = host_names[v.host];
      vv.migrating_to = v.migrating ? host_names[v.to] : "";
      vv.mem_bytes = v.mem;
      vv.cpus = want[i] * share;
      if (v.trace) {
        const TraceSample& x = v.trace->At(t + v.offset);
        vv.net_bytes_per_s = v.trace->has_net ? v.scale * x.net * share : vv.cpus * v.net_per_cpu;
        vv.dirty_bytes_per_s = v.scale * x.dirty * share;
      } else {
        vv.net_bytes_per_s = vv.cpus * v.net_per_cpu;
        vv.dirty_bytes_per_s = vv.cpus * v.dirty_per_cpu;
      }
      view.hosts[v.host].usage.net_bytes_per_s += vv.net_bytes_per_s;
    }
    const auto t0 = std::chrono::steady_clock::now();
    planner.Observe(view, now);
    Plan plan = planner.Decide(view, now);
    const double ms = std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
    decide_ms.push_back(ms);
    if (first_stddev < 0) first_stddev = plan.cpu_stddev_before, first_overload = plan.cpu_overload_before;
    for (const Move& m : plan.moves) {
      const size_t i = vm_index.at(m.vm);
      vm[i].migrating = true;
      vm[i].to = host_index.at(m.to);
      vm[i].done_at = t + std::max(m.estimate.total_s, 0.001);
      planner.Started(m.vm, m.from, m.to, now);
      ++started;
    }
    if (csv)
      csv << fmt::format("{:.0f},{:.3f},{:.4f},{:.2f},{},{},{}\n", t, ms, plan.cpu_stddev_before, plan.cpu_overload_before, hot,
                         plan.moves.size(), plan.running);
    if (tick % static_cast<uint64_t>(std::max(1.0, 3600 / tick_s)) == 0)
      hourly.push_back({{"t_h", t / 3600}, {"cpu_stddev", plan.cpu_stddev_before}, {"cpu_overload_cpus", plan.cpu_overload_before},
                        {"hot_hosts", hot}, {"migrations_started", started}});
  }
  // Oscillation: back to a host it left within the hour; most moves of one VM within any hour.
  uint64_t ping_pong = 0, most_in_hour = 0;
  for (const auto& v : vm) {
    for (size_t a = 0; a < v.moves.size(); ++a) {
      uint64_t in_hour = 1;
      for (size_t b = a + 1; b < v.moves.size() && v.moves[b].first - v.moves[a].first < 3600; ++b) {
        ++in_hour;
        if (v.moves[b].second.second == v.moves[a].second.first) ++ping_pong;
      }
      most_in_hour = std::max(most_in_hour, in_hour);
    }
  }
  nlohmann::json out = {
      {"bench", "planner_sim"},
      {"hosts", hosts},
      {"vms", vms},
      {"seed", seed},
      {"traces", traces_file.empty() ? nlohmann::json("generated") : nlohmann::json(fmt::format("{} ({} recorded)", traces_file, traces.size()))},
      {"simulated_hours", hours},
      {"tick_s", tick_s},
      {"rounds", decide_ms.size()},
      {"decide_ms_median", Percentile(decide_ms, 0.5)},
      {"decide_ms_p99", Percentile(decide_ms, 0.99)},
      {"decide_ms_max", Percentile(decide_ms, 1.0)},
      {"migrations", started},
      {"migrations_per_hour", static_cast<double>(started) / hours},
      {"cpu_stddev_start", first_stddev},
      {"cpu_overload_cpus_start", first_overload},
      {"ping_pong", ping_pong},
      {"most_moves_of_one_vm_in_an_hour", most_in_hour},
      {"hourly", hourly},
  };
  std::printf("%s\n", out.dump().c_str());
  return 0;
}
