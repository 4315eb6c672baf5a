#include "agent/agent.h"

#include <arpa/inet.h>
#include <dirent.h>
#include <netinet/in.h>
#include <fcntl.h>
#include <sys/file.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <unistd.h>

#include <charconv>
#include <cstring>
#include <filesystem>

#include <fmt/format.h>
#include <spdlog/spdlog.h>

#include "common/json.h"

namespace ferry::agent {
namespace {

using Clock = std::chrono::steady_clock;
constexpr uint64_t kGuestPageBytes = 4096;
constexpr int kApiFailuresLost = 3;  // consecutive unanswered samples of a live VMM: "lost"

std::string Absolute(const std::string& p) {
  std::error_code ec;
  auto a = std::filesystem::absolute(p, ec);
  return ec ? p : a.string();
}

// A TCP port free on `host` a moment ago (the VMM binds it right after; see docs/agent.md).
Result<int> PickPort(const std::string& host) {
  sockaddr_storage ss{};
  socklen_t len = 0;
  auto* a4 = reinterpret_cast<sockaddr_in*>(&ss);
  auto* a6 = reinterpret_cast<sockaddr_in6*>(&ss);
  if (inet_pton(AF_INET, host.c_str(), &a4->sin_addr) == 1) {
    a4->sin_family = AF_INET;
    len = sizeof *a4;
  } else if (inet_pton(AF_INET6, host.c_str(), &a6->sin6_addr) == 1) {
    a6->sin6_family = AF_INET6;
    len = sizeof *a6;
  } else {
    return Errorf(ErrorCode::kInvalidArgument, "incoming migrations need --listen with an IP address, not '{}'", host);
  }
  const int fd = socket(ss.ss_family, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (fd < 0) return ErrnoError("socket");
  if (bind(fd, reinterpret_cast<sockaddr*>(&ss), len) != 0 || getsockname(fd, reinterpret_cast<sockaddr*>(&ss), &len) != 0) {
    auto e = ErrnoError("bind " + host);
    close(fd);
    return e;
  }
  close(fd);
  return ntohs(ss.ss_family == AF_INET ? a4->sin_port : a6->sin6_port);
}

std::string LogTail(const std::string& dir) {
  auto t = TailFile(dir + "/vmm.log", 1024);
  std::string s = t ? *t : "";
  while (!s.empty() && (s.back() == '\n' || s.back() == ' ')) s.pop_back();
  return s.empty() ? "(no output)" : s;
}

bool Terminal(const std::string& state) { return state == "exited" || state == "migrated"; }

}  // namespace

Result<ListenAddress> ParseListen(const std::string& s) {
  ListenAddress a;
  std::string port;
  if (s.starts_with("[")) {
    const size_t close = s.find("]:");
    if (close == std::string::npos) return Errorf(ErrorCode::kInvalidArgument, "--listen '{}': expected [IPv6]:PORT", s);
    a.host = s.substr(1, close - 1);
    port = s.substr(close + 2);
  } else {
    const size_t colon = s.rfind(':');
    if (colon == std::string::npos || colon == 0) return Errorf(ErrorCode::kInvalidArgument, "--listen '{}': expected HOST:PORT", s);
    a.host = s.substr(0, colon);
    port = s.substr(colon + 1);
  }
  auto [p, ec] = std::from_chars(port.data(), port.data() + port.size(), a.port);
  if (ec != std::errc() || p != port.data() + port.size() || a.port <= 0 || a.port > 65535)
    return Errorf(ErrorCode::kInvalidArgument, "--listen '{}': bad port", s);
  return a;
}

bool IsLoopback(const std::string& host) {
  if (host == "localhost" || host == "::1") return true;
  in_addr a{};
  return inet_pton(AF_INET, host.c_str(), &a) == 1 && (ntohl(a.s_addr) >> 24) == 127;
}

Status CheckSecurity(const ListenAddress& a, bool insecure, bool allow_remote, const net::TlsFiles& tls) {
  if (insecure) {
    if (!tls.empty()) return Errorf(ErrorCode::kInvalidArgument, "--insecure and --tls-*: give one of them");
    if (!IsLoopback(a.host) && !allow_remote)
      return Errorf(ErrorCode::kInvalidArgument,
                    "--insecure serves plain HTTP without authentication: only on a loopback address unless "
                    "--allow-insecure-remote is given (listen address '{}')",
                    a.host);
    return {};
  }
  if (allow_remote) return Errorf(ErrorCode::kInvalidArgument, "--allow-insecure-remote is for --insecure");
  if (tls.cert.empty() || tls.key.empty() || tls.ca.empty())
    return Errorf(ErrorCode::kInvalidArgument, "mutual TLS needs --tls-cert, --tls-key and --tls-ca (or --insecure on loopback)");
  return {};
}

Result<std::unique_ptr<Agent>> Agent::Create(AgentConfig cfg) {
  std::error_code ec;
  std::filesystem::create_directories(cfg.state_dir + "/vms", ec);
  if (ec) return Errorf(ErrorCode::kIo, "--state-dir {}: {}", cfg.state_dir, ec.message());
  cfg.state_dir = Absolute(cfg.state_dir);
  if (!cfg.tls.empty()) cfg.tls = {Absolute(cfg.tls.cert), Absolute(cfg.tls.key), Absolute(cfg.tls.ca)};
  const std::string lock = cfg.state_dir + "/agent.lock";
  const int fd = open(lock.c_str(), O_RDWR | O_CREAT | O_CLOEXEC, 0644);
  if (fd < 0) return ErrnoError("open " + lock);
  if (flock(fd, LOCK_EX | LOCK_NB) != 0) {
    close(fd);
    return Errorf(ErrorCode::kBusy, "--state-dir {}: another ferry-agent uses it ({} is locked)", cfg.state_dir, lock);
  }
  std::unique_ptr<Agent> a(new Agent(std::move(cfg)));
  a->lock_fd_ = fd;
  a->Adopt();
  return a;
}

Agent::~Agent() {
  Stop();
  if (lock_fd_ >= 0) close(lock_fd_);
}

void Agent::Adopt() {
  DIR* d = opendir((cfg_.state_dir + "/vms").c_str());
  if (!d) return;
  std::vector<std::string> names;
  while (dirent* e = readdir(d))
    if (e->d_name[0] != '.') names.emplace_back(e->d_name);
  closedir(d);
  MutexLock l(mu_);
  for (const std::string& n : names) {
    const std::string dir = VmDir(n);
    auto rec = LoadVmRecord(dir);
    if (!rec || rec->spec.name != n) {
      // A directory without a valid record is what a crash during a start leaves: nothing runs for it.
      spdlog::warn("state dir {}: {}; removing it", dir, rec ? "record names another VM" : rec.error().message());
      RemoveTree(dir);
      continue;
    }
    Entry e;
    e.rec = *rec;
    e.dir = dir;
    e.socket = dir + "/api.sock";
    const Liveness live = CheckLiveness(e.rec, ReadPidStat(e.rec.pid));
    if (live == Liveness::kRunning) {
      e.state = e.rec.incoming.empty() ? "running" : "incoming";
      spdlog::info("adopted VM {} (ferry-vmm pid {})", n, e.rec.pid);
    } else {
      e.state = "exited";
      e.error = live == Liveness::kPidReused ? "its ferry-vmm ended while the agent was away (the pid now belongs to another process)"
                                             : "its ferry-vmm ended while the agent was away";
      spdlog::info("VM {}: {}", n, e.error);
    }
    vms_[n] = std::move(e);
  }
}

void Agent::StartMonitor() {
  monitor_ = std::thread([this] { MonitorLoop(); });
}

void Agent::Stop() {
  {
    MutexLock l(mu_);
    stop_ = true;
  }
  wake_.notify_all();
  if (monitor_.joinable()) monitor_.join();
}

void Agent::MonitorLoop() {
  while (true) {
    SampleOnce();
    MutexLock l(mu_);
    if (l.WaitFor(wake_, cfg_.sample_period, [&]() REQUIRES(mu_) { return stop_; })) return;
  }
}

uint64_t Agent::AllocatedMemLocked() const {
  uint64_t sum = 0;
  for (const auto& [n, e] : vms_)
    if (!Terminal(e.state)) sum += e.rec.spec.mem_bytes;
  return sum;
}

// ---- sampling ----

Agent::Entry Agent::SampleVm(Entry e, double ticks_per_s) {
  const auto now = Clock::now();
  const double dt = e.sampled_at == Clock::time_point{} ? 0 : std::chrono::duration<double>(now - e.sampled_at).count();
  const auto ps = ReadPidStat(e.rec.pid);
  const Liveness live = CheckLiveness(e.rec, ps);
  if (live != Liveness::kRunning) {
    if (e.state == "migrating" && e.migration.value("status", "") == "completed") {
      FinishMigration(e);
    } else {
      e.state = "exited";
      if (e.error.empty()) e.error = "ferry-vmm exited: " + LogTail(e.dir);
    }
    e.usage = {};
    return e;
  }
  VmUsage u = e.usage;
  if (e.ps && dt > 0) u.cpus = RateOf(e.ps->cpu_ticks, ps->cpu_ticks, dt) / ticks_per_s;
  u.rss_bytes = ps->rss_pages * static_cast<uint64_t>(sysconf(_SC_PAGESIZE));
  e.ps = ps;
  if (auto swapped = ReadSwapBytes(e.rec.pid)) {
    u.swap_bytes = *swapped;
    if (e.swap_bytes && dt > 0) u.swap_out_bytes_per_s = RateOf(*e.swap_bytes, *swapped, dt);
    e.swap_bytes = *swapped;
  }
  if (!e.rec.spec.tap.empty()) {
    auto t = ReadTapCounters(e.rec.spec.tap);
    if (t && e.tap && dt > 0) {
      // The host's tx is what the guest receives.
      u.net_rx_bytes_per_s = RateOf(e.tap->tx_bytes, t->tx_bytes, dt);
      u.net_tx_bytes_per_s = RateOf(e.tap->rx_bytes, t->rx_bytes, dt);
      u.net_rx_packets_per_s = RateOf(e.tap->tx_packets, t->tx_packets, dt);
      u.net_tx_packets_per_s = RateOf(e.tap->rx_packets, t->rx_packets, dt);
      u.net_drops_per_s = RateOf(e.tap->rx_dropped + e.tap->tx_dropped, t->rx_dropped + t->tx_dropped, dt);
    }
    e.tap = t ? std::optional<TapCounters>(*t) : std::nullopt;
  }
  auto info = UnixHttp(e.socket, "GET", "/vm", "", "", std::chrono::seconds(1));
  if (!info || info->status != 200) {
    if (++e.api_failures >= kApiFailuresLost && e.state != "starting") {
      e.state = "lost";
      e.error = "ferry-vmm runs but its API does not answer: " + (info ? fmt::format("HTTP {}", info->status) : info.error().message());
    }
    e.usage = u;
    e.sampled_at = now;
    return e;
  }
  e.api_failures = 0;
  if (e.state == "lost") e.error.clear();  // it answers again
  auto j = nlohmann::json::parse(info->body, nullptr, false);
  const std::string vmm_state = j.is_object() ? j.value("state", "") : "";
  auto mig = UnixHttp(e.socket, "GET", "/vm/migration", "", "", std::chrono::seconds(1));
  nlohmann::json m = mig && mig->status == 200 ? nlohmann::json::parse(mig->body, nullptr, false) : nlohmann::json();
  if (m.is_discarded()) m = nullptr;
  if (m.is_object()) {
    e.migration = m;
    u.migration_bytes = m.value("role", "") == "destination" ? m.value("received_bytes", uint64_t{0}) : m.value("transferred_bytes", uint64_t{0});
  }
  const std::string status = m.is_object() ? m.value("status", "") : "";
  // An outgoing migration's stats have a "status" (a destination's have a "phase" and role "destination").
  const bool outgoing = m.is_object() && m.value("role", "") != "destination" && !status.empty();
  if (vmm_state == "incoming") {
    e.state = "incoming";
  } else if (vmm_state == "migrated" || (outgoing && status == "completed")) {
    // The guest runs at the destination (also when that happened while the agent was away).
    if (e.migrating_to.empty()) e.migrating_to = m.is_object() ? m.value("to", std::string("?")) : std::string("?");
    FinishMigration(e);
    return e;
  } else if (vmm_state == "error" || vmm_state == "shutdown") {
    // The VM is over (the guest powered off, a failed incoming migration, a halted post-copy): end its VMM too.
    e.state = "exited";
    const std::string why = j.value("error", std::string("unknown"));
    e.error = vmm_state == "shutdown" ? "the guest shut down"
              : !e.rec.incoming.empty() ? "incoming migration failed: " + why
                                        : "the VM failed: " + why;
    KillVmm(e.rec);
  } else if (outgoing && (status == "failed" || status == "cancelled" || status == "failed-unknown")) {
    // The source runs on (failed-unknown: paused, see docs/protocol.md); the error is reported once.
    if (!e.migrating_to.empty()) e.error = fmt::format("migration to {} {}: {}", e.migrating_to, status, m.value("error", std::string("")));
    e.migrating_to.clear();
    e.state = vmm_state == "paused" ? "paused" : "running";
  } else if (outgoing) {
    e.state = "migrating";
    if (e.migrating_to.empty()) e.migrating_to = m.value("to", std::string("?"));
  } else {
    e.state = vmm_state == "paused" ? "paused" : vmm_state == "created" ? "starting" : "running";
  }
  if (!e.rec.incoming.empty() && (vmm_state == "running" || vmm_state == "paused")) {
    // The migration brought the VM: from now on it is an ordinary VM of this host.
    e.rec.incoming.clear();
    if (auto s = SaveVmRecord(e.dir, e.rec); !s) spdlog::warn("VM {}: {}", e.rec.spec.name, s.error().message());
  }
  // counters.dirty_pages_total of GET /vm: pages newly dirtied, cumulative; the VMM clears its
  // log every second outside migrations, so a page rewritten all the time counts once a second
  // (see docs/agent.md).
  if (j.is_object() && j.contains("counters") && j["counters"].is_object() && j["counters"].contains("dirty_pages_total") &&
      j["counters"]["dirty_pages_total"].is_number_unsigned()) {
    const uint64_t pages = j["counters"]["dirty_pages_total"].get<uint64_t>();
    if (e.dirty_pages && dt > 0) u.dirty_bytes_per_s = RateOf(*e.dirty_pages, pages, dt) * kGuestPageBytes;
    e.dirty_pages = pages;
  }
  // While it migrates, the engine harvests the log and measures the real rate: prefer it.
  if (e.state == "migrating" && m.is_object() && m.contains("dirty_pages_rate") && m["dirty_pages_rate"].is_number())
    u.dirty_bytes_per_s = m["dirty_pages_rate"].get<double>() * kGuestPageBytes;
  if (auto b = BoundFile(e.dir + "/console.log"); !b) spdlog::warn("VM {} console: {}", e.rec.spec.name, b.error().message());
  e.usage = u;
  e.sampled_at = now;
  return e;
}

void Agent::FinishMigration(Entry& e) {
  // The guest runs at the destination: stop the source and forget its directory.
  (void)UnixHttp(e.socket, "PUT", "/vm/shutdown", "{}", "application/json", std::chrono::seconds(1));
  if (!WaitGone(e.rec, cfg_.stop_timeout)) KillVmm(e.rec);
  RemoveTree(e.dir);
  spdlog::info("VM {} migrated to {}", e.rec.spec.name, e.migrating_to);
  e.state = "migrated";
  e.migrated_at = Clock::now();
  e.usage = {};
}

void Agent::SampleOnce() {
  const auto now = Clock::now();
  static const double ticks_per_s = static_cast<double>(sysconf(_SC_CLK_TCK));
  std::vector<Entry> todo;
  {
    MutexLock l(mu_);
    for (auto it = vms_.begin(); it != vms_.end();) {
      if (it->second.state == "migrated" && now - it->second.migrated_at > cfg_.migrated_linger) {
        it = vms_.erase(it);
        continue;
      }
      if (!it->second.busy_op && !Terminal(it->second.state)) todo.push_back(it->second);
      ++it;
    }
  }
  std::vector<Entry> done;
  for (Entry& e : todo) done.push_back(SampleVm(e, ticks_per_s));
  auto stat = ReadSmallFile("/proc/stat");
  auto cpu = stat ? ParseProcStat(*stat) : Result<CpuTimes>(std::unexpected(stat.error()));
  auto mi = ReadSmallFile("/proc/meminfo");
  auto mem = mi ? ParseMeminfo(*mi) : Result<MemInfo>(std::unexpected(mi.error()));
  auto vs = ReadSmallFile("/proc/vmstat");
  auto swap = vs ? ParseVmstatSwapOut(*vs) : Result<uint64_t>(std::unexpected(vs.error()));
  MutexLock l(mu_);
  for (size_t i = 0; i < done.size(); ++i) {
    Entry& s = done[i];
    auto it = vms_.find(s.rec.spec.name);
    if (it == vms_.end() || it->second.busy_op || it->second.rec.pid != s.rec.pid) continue;
    Entry& cur = it->second;
    if (cur.migrating_to != todo[i].migrating_to && s.state != "migrated") {
      // A migration was started while this sample ran: keep the handler's state, take the figures.
      cur.usage = s.usage;
      cur.ps = s.ps;
      cur.tap = s.tap;
      cur.dirty_pages = s.dirty_pages;
      cur.swap_bytes = s.swap_bytes;
      cur.sampled_at = s.sampled_at;
      continue;
    }
    cur = std::move(s);
  }
  const double dt = last_host_sample_ == Clock::time_point{} ? 0 : std::chrono::duration<double>(now - last_host_sample_).count();
  if (cpu) {
    if (last_cpu_ && cpu->total > last_cpu_->total)
      host_.cpus = static_cast<double>(cpu->busy - std::min(cpu->busy, last_cpu_->busy)) / static_cast<double>(cpu->total - last_cpu_->total) * cpu->cpus;
    last_cpu_ = *cpu;
  }
  if (cfg_.cpu_from_vms) {  // several agents share this machine: the host's use is its VMs'
    host_.cpus = 0;
    for (const auto& [n, e] : vms_) host_.cpus += e.usage.cpus;
  }
  if (mem) host_.mem_bytes = mem->total_bytes - std::min(mem->total_bytes, mem->available_bytes);
  if (swap) {
    if (last_swap_out_ && dt > 0) host_.swap_out_pages_per_s = RateOf(*last_swap_out_, *swap, dt);
    last_swap_out_ = *swap;
  }
  double net = 0;
  for (const auto& [n, e] : vms_) net += e.usage.net_rx_bytes_per_s + e.usage.net_tx_bytes_per_s;
  host_.net_bytes_per_s = net;
  last_host_sample_ = now;
}

// ---- API ----

nlohmann::json Agent::VmJson(const Entry& e) const {
  const VmUsage& u = e.usage;
  nlohmann::json j = {{"name", e.rec.spec.name},
                      {"state", e.state},
                      {"pid", e.rec.pid},
                      {"mem_bytes", e.rec.spec.mem_bytes},
                      {"spec", VmSpecToJson(e.rec.spec)},
                      {"usage",
                       {{"cpus", u.cpus},
                        {"rss_bytes", u.rss_bytes},
                        {"net_rx_bytes_per_s", u.net_rx_bytes_per_s},
                        {"net_tx_bytes_per_s", u.net_tx_bytes_per_s},
                        {"net_rx_packets_per_s", u.net_rx_packets_per_s},
                        {"net_tx_packets_per_s", u.net_tx_packets_per_s},
                        {"net_drops_per_s", u.net_drops_per_s},
                        {"dirty_bytes_per_s", u.dirty_bytes_per_s},
                        {"swap_bytes", u.swap_bytes},
                        {"swap_out_bytes_per_s", u.swap_out_bytes_per_s},
                        {"migration_bytes", u.migration_bytes}}}};
  if (!e.rec.incoming.empty()) j["incoming"] = e.rec.incoming;
  if (!e.migrating_to.empty()) j["migrating_to"] = e.migrating_to;
  if (!e.error.empty()) j["error"] = e.error;
  if (!e.migration.is_null()) j["migration"] = e.migration;
  return j;
}

Reply Agent::GetHost() {
  MutexLock l(mu_);
  nlohmann::json names = nlohmann::json::array();
  for (const auto& [n, e] : vms_) names.push_back(n);
  return Reply::Json(200, {{"name", cfg_.name},
                           {"capacity",
                            {{"cpus", cfg_.capacity.cpus},
                             {"mem_bytes", cfg_.capacity.mem_bytes},
                             {"net_bytes_per_s", cfg_.capacity.net_bytes_per_s}}},
                           {"allocated", {{"mem_bytes", AllocatedMemLocked()}}},
                           {"usage",
                            {{"cpus", host_.cpus},
                             {"mem_bytes", host_.mem_bytes},
                             {"net_bytes_per_s", host_.net_bytes_per_s},
                             {"swap_out_pages_per_s", host_.swap_out_pages_per_s}}},
                           {"vms", names}});
}

Reply Agent::ListVms() {
  MutexLock l(mu_);
  nlohmann::json list = nlohmann::json::array();
  for (const auto& [n, e] : vms_) list.push_back(VmJson(e));
  return Reply::Json(200, list);
}

Reply Agent::GetVm(const std::string& name) {
  MutexLock l(mu_);
  auto it = vms_.find(name);
  if (it == vms_.end()) return Reply::Err(404, fmt::format("no VM '{}' on host {}", name, cfg_.name));
  return Reply::Json(200, VmJson(it->second));
}

Reply Agent::CreateVm(const std::string& body) {
  auto j = ParseJson(body, "request body");
  if (!j) return Reply::Err(400, j.error().message());
  auto spec = VmSpecFromJson(*j, false);
  if (!spec) return Reply::Err(400, spec.error().message());
  return Launch(*spec, "");
}

Reply Agent::CreateIncoming(const std::string& body) {
  auto j = ParseJson(body, "request body");
  if (!j) return Reply::Err(400, j.error().message());
  auto spec = VmSpecFromJson(*j, true);
  if (!spec) return Reply::Err(400, spec.error().message());
  auto port = PickPort(cfg_.listen_host);
  if (!port) return Reply::Err(500, port.error().message());
  const std::string host = cfg_.listen_host.find(':') != std::string::npos ? "[" + cfg_.listen_host + "]" : cfg_.listen_host;
  const std::string addr = fmt::format("{}:{}:{}", cfg_.tls.empty() ? "tcp" : "tls", host, *port);
  return Launch(*spec, addr);
}

Reply Agent::Launch(const VmSpec& spec, const std::string& incoming) {
  const std::string dir = VmDir(spec.name);
  {
    MutexLock l(mu_);
    // A VM that migrated away may come back at once: its entry is only a report (no directory).
    if (auto it = vms_.find(spec.name); it != vms_.end() && it->second.state == "migrated" && !it->second.busy_op) vms_.erase(it);
    if (vms_.contains(spec.name)) return Reply::Err(409, fmt::format("a VM named '{}' already exists on host {}", spec.name, cfg_.name));
    const uint64_t used = AllocatedMemLocked();
    if (used + spec.mem_bytes > cfg_.capacity.mem_bytes)
      return Reply::Err(409, fmt::format("VM '{}' does not fit on host {}: it needs {} MiB of memory, {} MiB of the declared {} MiB are "
                                         "allocated",
                                         spec.name, cfg_.name, spec.mem_bytes >> 20, used >> 20, cfg_.capacity.mem_bytes >> 20));
    Entry e;
    e.rec.spec = spec;
    e.rec.incoming = incoming;
    e.dir = dir;
    e.socket = dir + "/api.sock";
    e.state = "starting";
    e.busy_op = true;
    vms_[spec.name] = std::move(e);
  }
  // From here on every failure undoes everything: the process, the directory, the entry.
  VmRecord rec;
  auto fail = [&](int status, const std::string& msg) {
    if (rec.pid > 0) KillVmm(rec);
    RemoveTree(dir);
    MutexLock l(mu_);
    vms_.erase(spec.name);
    spdlog::warn("VM {} not started: {}", spec.name, msg);
    return Reply::Err(status, msg);
  };
  std::error_code ec;
  if (std::filesystem::exists(dir, ec)) RemoveTree(dir);  // a leftover nobody knows (see Adopt)
  if (!std::filesystem::create_directories(dir, ec) || ec) return fail(500, fmt::format("cannot create {}: {}", dir, ec.message()));
  std::vector<std::string> argv = {cfg_.vmm_path, "--api-socket", dir + "/api.sock", "--console", "file:" + dir + "/console.log"};
  if (incoming.empty()) {
    argv.insert(argv.end(), {"--kernel", spec.kernel, "--mem", spec.mem});
    if (!spec.initrd.empty()) argv.insert(argv.end(), {"--initrd", spec.initrd});
    if (!spec.cmdline.empty()) argv.insert(argv.end(), {"--cmdline", spec.cmdline});
    if (!spec.disk.empty()) argv.insert(argv.end(), {"--disk", spec.disk});
  } else {
    argv.insert(argv.end(), {"--incoming", incoming, "--max-mem", spec.mem});
    if (!cfg_.tls.empty()) argv.insert(argv.end(), {"--tls-cert", cfg_.tls.cert, "--tls-key", cfg_.tls.key, "--tls-ca", cfg_.tls.ca});
  }
  if (!spec.tap.empty()) argv.insert(argv.end(), {"--net", "tap=" + spec.tap + (spec.mac.empty() ? "" : ",mac=" + spec.mac)});
  auto spawned = SpawnVmm(argv, dir);
  if (!spawned) return fail(500, spawned.error().message());
  rec = *spawned;
  rec.spec = spec;
  rec.incoming = incoming;
  if (auto s = SaveVmRecord(dir, rec); !s) return fail(500, s.error().message());
  // Ready once its API answers; a VMM that exits first failed (bad kernel, TAP, port in use, ...).
  const auto deadline = Clock::now() + cfg_.start_timeout;
  std::string vmm_state;
  while (true) {
    if (CheckLiveness(rec, ReadPidStat(rec.pid)) != Liveness::kRunning)
      return fail(500, fmt::format("ferry-vmm for VM '{}' exited during start: {}", spec.name, LogTail(dir)));
    auto r = UnixHttp(dir + "/api.sock", "GET", "/vm", "", "", std::chrono::seconds(1));
    if (r && r->status == 200) {
      auto j = nlohmann::json::parse(r->body, nullptr, false);
      vmm_state = j.is_object() ? j.value("state", "running") : "running";
      break;
    }
    if (Clock::now() > deadline)
      return fail(500, fmt::format("ferry-vmm for VM '{}' did not answer on its API socket within {} ms: {}", spec.name,
                                   cfg_.start_timeout.count(), LogTail(dir)));
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
  }
  MutexLock l(mu_);
  Entry& e = vms_[spec.name];
  e.rec = rec;
  e.busy_op = false;
  e.state = !incoming.empty() ? "incoming" : vmm_state == "paused" ? "paused" : "running";
  spdlog::info("VM {} started (ferry-vmm pid {}{})", spec.name, rec.pid, incoming.empty() ? "" : ", incoming on " + incoming);
  nlohmann::json out = VmJson(e);
  return Reply::Json(201, out);
}

Reply Agent::DeleteVm(const std::string& name) {
  Entry e;
  {
    MutexLock l(mu_);
    auto it = vms_.find(name);
    if (it == vms_.end()) return Reply::Err(404, fmt::format("no VM '{}' on host {}", name, cfg_.name));
    if (it->second.busy_op) return Reply::Err(409, fmt::format("VM '{}' is being started or deleted", name));
    if (it->second.state == "migrating")
      return Reply::Err(409, fmt::format("VM '{}' is migrating to {} (PUT /v1/vms/{}/api/vm/migration/cancel first)", name,
                                         it->second.migrating_to, name));
    it->second.busy_op = true;
    e = it->second;
  }
  if (!Terminal(e.state)) {
    (void)UnixHttp(e.socket, "PUT", "/vm/shutdown", "{}", "application/json", std::chrono::seconds(1));
    if (!WaitGone(e.rec, cfg_.stop_timeout)) KillVmm(e.rec);
  }
  RemoveTree(e.dir);
  MutexLock l(mu_);
  vms_.erase(name);
  spdlog::info("VM {} deleted", name);
  return Reply::Json(200, {{"name", name}, {"deleted", true}});
}

Reply Agent::Console(const std::string& name) {
  std::string path;
  {
    MutexLock l(mu_);
    auto it = vms_.find(name);
    if (it == vms_.end()) return Reply::Err(404, fmt::format("no VM '{}' on host {}", name, cfg_.name));
    path = it->second.dir + "/console.log";
  }
  auto t = TailFile(path);
  if (!t) return Reply::Err(500, t.error().message());
  return {200, *t, "text/plain; charset=utf-8"};
}

Reply Agent::Proxy(const std::string& name, const std::string& method, const std::string& rest, const std::string& body,
                   const std::string& content_type) {
  std::string socket;
  {
    MutexLock l(mu_);
    auto it = vms_.find(name);
    if (it == vms_.end()) return Reply::Err(404, fmt::format("no VM '{}' on host {}", name, cfg_.name));
    if (Terminal(it->second.state) || it->second.busy_op)
      return Reply::Err(409, fmt::format("VM '{}' is {}: no API to forward to", name, it->second.busy_op ? "busy" : it->second.state));
    socket = it->second.socket;
  }
  auto r = UnixHttp(socket, method, rest, body, content_type, std::chrono::seconds(10));
  if (!r) return Reply::Err(502, fmt::format("VM '{}': {}", name, r.error().message()));
  return {r->status, r->body, r->content_type.empty() ? "application/octet-stream" : r->content_type};
}

Reply Agent::Migrate(const std::string& name, const std::string& body) {
  auto j = ParseJson(body, "request body");
  if (!j) return Reply::Err(400, j.error().message());
  if (!j->is_object() || !j->contains("to") || !(*j)["to"].is_string())
    return Reply::Err(400, "the body must be a JSON object with \"to\": \"tls:HOST:PORT\"");
  const std::string to = (*j)["to"].get<std::string>();
  for (const char* k : {"tls_cert", "tls_key", "tls_ca"})
    if (j->contains(k)) return Reply::Err(400, fmt::format("\"{}\": the agent migrates with its own certificate", k));
  if (to.starts_with("tls:")) {
    if (cfg_.tls.empty()) return Reply::Err(400, "this agent runs --insecure and has no certificate for a tls: migration");
    (*j)["tls_cert"] = cfg_.tls.cert;
    (*j)["tls_key"] = cfg_.tls.key;
    (*j)["tls_ca"] = cfg_.tls.ca;
  } else if (!cfg_.tls.empty()) {
    return Reply::Err(400, fmt::format("\"to\" '{}': this agent migrates over mutual TLS only (tls:HOST:PORT)", to));
  }
  std::string socket;
  {
    MutexLock l(mu_);
    auto it = vms_.find(name);
    if (it == vms_.end()) return Reply::Err(404, fmt::format("no VM '{}' on host {}", name, cfg_.name));
    const Entry& e = it->second;
    if (e.busy_op || (e.state != "running" && e.state != "paused"))
      return Reply::Err(409, fmt::format("VM '{}' is {}: only a running or paused VM migrates", name, e.busy_op ? "busy" : e.state));
    socket = e.socket;
  }
  auto r = UnixHttp(socket, "PUT", "/vm/migrate", j->dump(), "application/json", std::chrono::seconds(10));
  if (!r) return Reply::Err(502, fmt::format("VM '{}': {}", name, r.error().message()));
  if (r->status >= 300) return {r->status, r->body, "application/json"};
  MutexLock l(mu_);
  auto it = vms_.find(name);
  if (it != vms_.end()) {
    it->second.state = "migrating";
    it->second.migrating_to = to;
    it->second.error.clear();
  }
  return Reply::Json(202, {{"name", name}, {"to", to}, {"state", "migrating"}});
}

std::string Agent::Metrics() {
  MutexLock l(mu_);
  std::string out;
  const std::string host = fmt::format("host=\"{}\"", cfg_.name);
  auto help = [&](const char* name, const char* type, const char* text) { out += fmt::format("# HELP {} {}\n# TYPE {} {}\n", name, text, name, type); };
  auto host_metric = [&](const char* name, const char* text, double v) {
    help(name, "gauge", text);
    out += fmt::format("{}{{{}}} {}\n", name, host, v);
  };
  host_metric("ferry_agent_host_capacity_cpus", "Declared CPUs", cfg_.capacity.cpus);
  host_metric("ferry_agent_host_capacity_mem_bytes", "Declared memory", static_cast<double>(cfg_.capacity.mem_bytes));
  host_metric("ferry_agent_host_capacity_net_bytes_per_s", "Declared network rate (0: not declared)", static_cast<double>(cfg_.capacity.net_bytes_per_s));
  host_metric("ferry_agent_host_allocated_mem_bytes", "Memory of the VMs this agent runs or receives", static_cast<double>(AllocatedMemLocked()));
  host_metric("ferry_agent_host_cpus", "CPUs busy on the host (/proc/stat)", host_.cpus);
  host_metric("ferry_agent_host_mem_bytes", "Memory in use on the host (MemTotal - MemAvailable)", static_cast<double>(host_.mem_bytes));
  host_metric("ferry_agent_host_net_bytes_per_s", "Bytes per second through the VMs' TAPs", host_.net_bytes_per_s);
  host_metric("ferry_agent_host_swap_out_pages_per_s", "Pages swapped out per second (/proc/vmstat pswpout)", host_.swap_out_pages_per_s);
  host_metric("ferry_agent_vms", "VMs known to the agent", static_cast<double>(vms_.size()));
  struct Series {
    const char* name;
    const char* help;
    double (*get)(const VmUsage&);
  };
  static const Series series[] = {
      {"ferry_agent_vm_cpus", "CPUs the VM's ferry-vmm used (/proc/PID/stat)", [](const VmUsage& u) { return u.cpus; }},
      {"ferry_agent_vm_rss_bytes", "Resident memory of the VM's ferry-vmm", [](const VmUsage& u) { return static_cast<double>(u.rss_bytes); }},
      {"ferry_agent_vm_net_rx_bytes_per_s", "Bytes per second to the guest (TAP)", [](const VmUsage& u) { return u.net_rx_bytes_per_s; }},
      {"ferry_agent_vm_net_tx_bytes_per_s", "Bytes per second from the guest (TAP)", [](const VmUsage& u) { return u.net_tx_bytes_per_s; }},
      {"ferry_agent_vm_net_rx_packets_per_s", "Packets per second to the guest", [](const VmUsage& u) { return u.net_rx_packets_per_s; }},
      {"ferry_agent_vm_net_tx_packets_per_s", "Packets per second from the guest", [](const VmUsage& u) { return u.net_tx_packets_per_s; }},
      {"ferry_agent_vm_net_drops_per_s", "TAP drops per second", [](const VmUsage& u) { return u.net_drops_per_s; }},
      {"ferry_agent_vm_dirty_bytes_per_s", "Guest memory newly dirtied per second", [](const VmUsage& u) { return u.dirty_bytes_per_s; }},
      {"ferry_agent_vm_swap_bytes", "The VMM's memory swapped out by the host", [](const VmUsage& u) { return static_cast<double>(u.swap_bytes); }},
      {"ferry_agent_vm_swap_out_bytes_per_s", "Growth of the VMM's swapped-out memory per second", [](const VmUsage& u) { return u.swap_out_bytes_per_s; }},
      {"ferry_agent_vm_migration_bytes", "Bytes of the VM's last migration", [](const VmUsage& u) { return static_cast<double>(u.migration_bytes); }},
  };
  help("ferry_agent_vm_up", "gauge", "1 for each VM, labelled with its state");
  for (const auto& [n, e] : vms_) out += fmt::format("ferry_agent_vm_up{{{},vm=\"{}\",state=\"{}\"}} 1\n", host, n, e.state);
  for (const Series& s : series) {
    help(s.name, "gauge", s.help);
    for (const auto& [n, e] : vms_) out += fmt::format("{}{{{},vm=\"{}\"}} {}\n", s.name, host, n, s.get(e.usage));
  }
  return out;
}

}  // namespace ferry::agent
