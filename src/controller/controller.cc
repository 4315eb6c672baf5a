#include "controller/controller.h"

#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <regex>
#include <set>

#include <fmt/format.h>
#include <spdlog/spdlog.h>

#include "agent/http.h"
#include "common/clock.h"
#include "common/json.h"
#include "common/size.h"
#include "net/url.h"

namespace ferry::controller {

namespace {

std::string DefaultId() {
  char host[256] = {};
  gethostname(host, sizeof host - 1);
  return fmt::format("{}:{}", host, getpid());
}

ErrorCode CodeForStatus(int status) {
  switch (status) {
    case 400: case 422: return ErrorCode::kInvalidArgument;
    case 403: return ErrorCode::kPermissionDenied;
    case 404: return ErrorCode::kNotFound;
    case 409: case 507: return ErrorCode::kBusy;
    default: return status < 500 ? ErrorCode::kInvalidArgument : ErrorCode::kIo;
  }
}

bool ValidName(const std::string& s) {
  static const std::regex re("^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$");
  return std::regex_match(s, re);
}

double Num(const nlohmann::json& j, const char* key) { return JsonNumber(j, key); }

}  // namespace

Controller::Controller(std::unique_ptr<ClusterStore> store, ControllerOptions options)
    : store_(std::move(store)), options_([&] {
        if (options.id.empty()) options.id = DefaultId();
        return options;
      }()),
      planner_(options_.planner) {}

Controller::~Controller() { Stop(); }

void Controller::Start() {
  MutexLock l(mu_);
  if (loop_.joinable()) return;
  stop_ = false;
  loop_ = std::thread([this] { Loop(); });
}

void Controller::Stop() {
  std::map<std::string, Running> running;
  {
    MutexLock l(mu_);
    stop_ = true;
  }
  wake_.notify_all();
  if (loop_.joinable()) loop_.join();
  {
    MutexLock l(mu_);
    running.swap(running_);
    if (leader_) (void)store_->kv().Resign(options_.id);
    leader_ = false;
  }
  // Migrations under way finish on their own threads (an agent call is bounded by its timeout).
  for (auto& [vm, r] : running)
    if (r.thread.joinable()) r.thread.join();
}

void Controller::Loop() {
  for (;;) {
    Tick();
    MutexLock l(mu_);
    l.WaitFor(wake_, std::chrono::milliseconds(options_.tick_ms), [&]() REQUIRES(mu_) { return stop_; });
    if (stop_) return;
  }
}

Result<std::string> Controller::Call(const std::string& url, const std::string& method, const std::string& path,
                                     const nlohmann::json& body, int timeout_ms) const {
  auto u = net::ParseHttpUrl(url);
  if (!u) return std::unexpected(u.error());
  if (u->tls && options_.tls.empty())
    return Errorf(ErrorCode::kInvalidArgument, "agent {} speaks HTTPS, but the controller has no certificate (--tls-cert, --tls-key, --tls-ca)", url);
  if (!u->tls && !options_.tls.empty())
    return Errorf(ErrorCode::kInvalidArgument, "agent {} is plain HTTP, but the controller uses mutual TLS: give its https:// URL", url);
  agent::AgentClient client(u->host, u->port, u->tls ? options_.tls : net::TlsFiles{});
  auto r = client.Do(method, path, body.is_null() ? "" : body.dump(), std::chrono::milliseconds(timeout_ms));
  if (!r) return std::unexpected(r.error().WithContext("agent " + url));
  if (r->status < 200 || r->status >= 300) {
    std::string why = r->body;
    auto j = nlohmann::json::parse(r->body, nullptr, false);
    if (j.is_object() && j.contains("error") && j["error"].is_string()) why = j["error"].get<std::string>();
    return std::unexpected(Error(CodeForStatus(r->status), fmt::format("agent {}: {} {}: {} ({})", url, method, path, why, r->status)));
  }
  return std::move(r->body);
}

Result<nlohmann::json> Controller::CallJson(const std::string& url, const std::string& method, const std::string& path,
                                            const nlohmann::json& body, int timeout_ms) const {
  auto r = Call(url, method, path, body, timeout_ms);
  if (!r) return std::unexpected(r.error());
  auto j = nlohmann::json::parse(*r, nullptr, false);
  if (j.is_discarded()) return Errorf(ErrorCode::kIo, "agent {}: {} {}: the reply is not JSON", url, method, path);
  return j;
}

Result<std::string> Controller::AgentOf(const std::string& host) {
  auto h = store_->Host(host);
  if (!h) return std::unexpected(h.error());
  if (!*h) return Errorf(ErrorCode::kNotFound, "no host {}", host);
  return (*h)->agent;
}

void Controller::Note(const std::string& kind, const std::string& text) {
  spdlog::info("controller: {}: {}", kind, text);
  if (auto s = store_->AddEvent(kind, text, UnixMs()); !s) spdlog::warn("controller: event not stored: {}", s.error().message());
}

// ---- the loop ----

void Controller::Tick() {
  const uint64_t now = NowNs();
  auto lead = store_->kv().TryLead(options_.id, options_.lease_ms);
  bool settle = false;
  {
    MutexLock l(mu_);
    // Reap finished migration threads.
    for (auto it = running_.begin(); it != running_.end();) {
      if (it->second.done) {
        if (it->second.thread.joinable()) it->second.thread.join();
        it = running_.erase(it);
      } else {
        ++it;
      }
    }
    const bool was = leader_;
    leader_ = lead && *lead;
    if (leader_ != was) spdlog::info("controller {}: {} the leader", options_.id, leader_ ? "is now" : "is no longer");
    if (!leader_) {
      settled_ = false;
      return;
    }
    settle = !settled_;
    settled_ = true;
  }
  if (!lead) spdlog::warn("controller: store: {}", lead.error().message());
  if (settle) {
    // Migrations an earlier leader left running: where did each VM end up?
    if (auto ms = store_->Migrations()) {
      for (const MigrationRecord& m : *ms) {
        bool ours;
        {
          MutexLock l(mu_);
          ours = running_.count(m.vm) > 0;
        }
        if (m.status == "running" && !ours) Settle(m);
      }
    }
  }
  Monitor(now);
}

void Controller::Settle(MigrationRecord m) {
  auto vm = store_->Vm(m.vm);
  if (!vm || !*vm) return;
  VmRecord v = **vm;
  m.ended_ms = UnixMs();
  std::string where;
  if (auto from = AgentOf(m.from); from) {
    auto s = CallJson(*from, "GET", "/v1/vms/" + m.vm, nullptr, 3000);
    if (s && s->value("state", "") == "migrated") where = m.to;
    else if (s && s->value("state", "") != "migrating") where = m.from;
  }
  if (where.empty())
    if (auto to = AgentOf(m.to); to)
      if (auto d = CallJson(*to, "GET", "/v1/vms/" + m.vm, nullptr, 3000); d && d->value("state", "") == "running") where = m.to;
  if (where == m.to) {
    m.status = "completed";
    v.host = m.to;
    v.state = "running";
  } else if (where == m.from) {
    m.status = "failed";
    m.error = "the controller stopped during the migration; the VM stayed on " + m.from;
    v.state = "running";
  } else {
    m.status = "failed";
    m.error = "the controller stopped during the migration; neither agent has the VM running";
    v.state = "lost";
    v.error = m.error;
  }
  if (auto s = store_->EndMigration(m, v); !s) spdlog::warn("controller: settle {}: {}", m.id, s.error().message());
  Note("migration-settled", fmt::format("{}: {} -> {}: {}", m.vm, m.from, m.to, m.status));
}

void Controller::Monitor(uint64_t now) {
  auto hosts = store_->Hosts();
  auto vms = store_->Vms();
  if (!hosts || !vms) {
    spdlog::warn("controller: store: {}", (!hosts ? hosts.error() : vms.error()).message());
    return;
  }
  std::map<std::string, Observed> fresh;
  {
    MutexLock l(mu_);
    for (const HostRecord& h : *hosts) fresh[h.name].silent_ticks = observed_.count(h.name) ? observed_[h.name].silent_ticks : 0;
  }
  for (const HostRecord& h : *hosts) {
    Observed& o = fresh[h.name];
    auto host = CallJson(h.agent, "GET", "/v1/host", nullptr, 2000);
    auto list = host ? CallJson(h.agent, "GET", "/v1/vms", nullptr, 2000) : Result<nlohmann::json>(std::unexpected(host.error()));
    o.view.name = h.name;
    o.view.state = h.state;
    if (!host || !list || !list->is_array()) {
      if (++o.silent_ticks == options_.down_after_ticks)
        Note("host-down", fmt::format("{}: its agent did not answer {} times: {}", h.name, o.silent_ticks,
                                       (!host ? host.error() : list ? Error(ErrorCode::kIo, "bad VM list") : list.error()).message()));
      // Not a place for a VM while it does not answer; "down" (its VMs lost) after down_after_ticks.
      o.view.state = HostState::kDown;
      continue;
    }
    if (o.silent_ticks >= options_.down_after_ticks) Note("host-up", h.name + ": its agent answers again");
    o.silent_ticks = 0;
    o.reachable = true;
    const nlohmann::json cap = host->value("capacity", nlohmann::json::object()), use = host->value("usage", nlohmann::json::object());
    o.view.capacity = {Num(cap, "cpus"), static_cast<uint64_t>(Num(cap, "mem_bytes")), Num(cap, "net_bytes_per_s")};
    o.view.usage = {Num(use, "cpus"), Num(use, "net_bytes_per_s"), Num(use, "swap_out_pages_per_s")};
    o.vms = *list;
  }

  // The VMs as the planner sees them; lost and failed ones are not moved.
  ClusterView view;
  // Migrations in flight (the store's running records): the planner counts them against both
  // hosts' limits. A move whose record is not written yet is kept from a second start by StartMove.
  std::map<std::string, std::string> migrating_to;  // VM -> destination
  if (auto ms = store_->Migrations())
    for (const MigrationRecord& m : *ms)
      if (m.status == "running") migrating_to[m.vm] = m.to;
  for (const auto& [name, o] : fresh) view.hosts.push_back(o.view);
  for (const VmRecord& v : *vms) {
    auto host = fresh.find(v.host);
    if (host == fresh.end()) continue;
    if (!host->second.reachable && host->second.silent_ticks < options_.down_after_ticks) continue;  // not yet down
    if (v.state == "running" && host->second.view.state == HostState::kDown) {
      VmRecord lost = v;
      lost.state = "lost";
      lost.error = "host " + v.host + " is down (its agent does not answer)";
      if (store_->PutVm(lost)) Note("vm-lost", v.name + ": " + lost.error);
      continue;
    }
    if (v.state == "lost" && host->second.reachable) {
      // The host came back: does its agent still run the VM?
      for (const auto& a : host->second.vms)
        if (a.value("name", "") == v.name && a.value("state", "") == "running") {
          VmRecord back = v;
          back.state = "running";
          back.error.clear();
          if (store_->PutVm(back)) Note("vm-found", v.name + ": running on " + v.host + " again");
        }
      continue;
    }
    if (v.state != "running" && v.state != "migrating") continue;
    VmView vv;
    vv.name = v.name;
    vv.host = v.host;
    vv.mem_bytes = v.mem_bytes;
    if (auto it = migrating_to.find(v.name); it != migrating_to.end()) vv.migrating_to = it->second;
    for (const auto& a : host->second.vms) {
      if (a.value("name", "") != v.name) continue;
      const nlohmann::json u = a.value("usage", nlohmann::json::object());
      vv.cpus = Num(u, "cpus");
      vv.net_bytes_per_s = Num(u, "net_rx_bytes_per_s") + Num(u, "net_tx_bytes_per_s");
      vv.net_drops_per_s = Num(u, "net_drops_per_s");
      vv.dirty_bytes_per_s = Num(u, "dirty_bytes_per_s");
      vv.swap_out_bytes_per_s = Num(u, "swap_out_bytes_per_s");
    }
    view.vms.push_back(std::move(vv));
  }

  // A draining host without VMs is drained.
  for (const HostRecord& h : *hosts) {
    if (h.state != HostState::kDraining) continue;
    // Empty means empty: a lost VM may still run there (its agent is down), so it keeps the drain open.
    const bool empty = std::none_of(vms->begin(), vms->end(), [&](const VmRecord& v) { return v.host == h.name; });
    if (!empty) continue;
    HostRecord d = h;
    d.state = HostState::kDrained;
    if (store_->PutHost(d)) Note("drained", h.name + ": no VM left");
  }

  MutexLock l(mu_);
  observed_ = std::move(fresh);
  view_ = view;
  view_ns_ = now;
  planner_.Observe(view, now);
  if (stop_ || !leader_) return;
  for (const Move& m : planner_.Decide(view, now).moves) StartMove(m, now);
}

void Controller::StartMove(const Move& m, uint64_t now_ns) {
  if (running_.count(m.vm)) return;
  planner_.Started(m.vm, m.from, m.to, now_ns);
  ++migrations_started_;
  running_[m.vm].thread = std::thread([this, m] { RunMigration(m); });
}

void Controller::RunMigration(Move m) {
  auto finish = [&](bool moved) {
    MutexLock l(mu_);
    planner_.Finished(m.vm, m.from, m.to, NowNs(), moved);
    running_[m.vm].done = true;
  };
  auto vm = store_->Vm(m.vm);
  auto from = AgentOf(m.from), to = AgentOf(m.to);
  if (!vm || !*vm || (*vm)->state != "running" || (*vm)->host != m.from || !from || !to) {
    finish(false);
    return;
  }
  VmRecord v = **vm;
  MigrationRecord rec;
  rec.started_ms = UnixMs();
  rec.id = fmt::format("{:013}-{}", rec.started_ms, m.vm);
  rec.vm = m.vm;
  rec.from = m.from;
  rec.to = m.to;
  rec.reason = m.reason;
  rec.expected_total_ms = m.estimate.total_s * 1000;
  rec.expected_downtime_ms = m.estimate.pause_s * 1000;
  v.state = "migrating";
  if (auto s = store_->StartMigration(rec, v); !s) {
    spdlog::warn("controller: migration of {} not started: {}", m.vm, s.error().message());
    finish(false);
    return;
  }
  Note("migration", fmt::format("{}: {} -> {}: {}", m.vm, m.from, m.to, m.reason));
  std::string error;
  nlohmann::json result;
  // The destination needs the VM's name, size and host-side devices; the kernel, command line
  // and device state come with the migration.
  nlohmann::json spec = {{"name", m.vm}, {"mem", v.spec.value("mem", "")}};
  for (const char* k : {"net", "disk"})
    if (v.spec.contains(k)) spec[k] = v.spec[k];
  auto inc = CallJson(*to, "POST", "/v1/incoming", spec, 30000);
  if (!inc || !inc->contains("incoming")) {
    error = inc ? "the destination's agent gave no incoming address" : inc.error().message();
  } else if (auto go = Call(*from, "POST", "/v1/vms/" + m.vm + "/migrate", {{"to", (*inc)["incoming"]}}, 30000); !go) {
    error = go.error().message();
  } else {
    const uint64_t deadline = NowNs() + options_.migration_timeout_ms * 1'000'000;
    for (;;) {
      std::this_thread::sleep_for(std::chrono::milliseconds(200));
      auto s = CallJson(*from, "GET", "/v1/vms/" + m.vm, nullptr, 5000);
      if (s) {
        const std::string state = s->value("state", "");
        if (state == "migrated") {
          result = s->value("migration", nlohmann::json::object());
          break;
        }
        if (state != "migrating") {
          error = s->value("error", "the migration ended with the VM " + state + " on the source");
          break;
        }
      }
      if (NowNs() > deadline) {
        (void)Call(*from, "PUT", "/v1/vms/" + m.vm + "/api/vm/migration/cancel", nullptr, 5000);
        error = fmt::format("no result after {} s: cancelled", options_.migration_timeout_ms / 1000);
        break;
      }
    }
  }
  rec.ended_ms = UnixMs();
  v.state = "running";
  if (error.empty()) {
    rec.status = "completed";
    rec.total_ms = Num(result, "total_ms");
    rec.downtime_ms = Num(result, "downtime_ms");
    rec.bytes = static_cast<uint64_t>(Num(result, "transferred_bytes"));
    v.host = m.to;
  } else {
    rec.status = "failed";
    rec.error = error;
    (void)Call(*to, "DELETE", "/v1/vms/" + m.vm, nullptr, 10000);  // the destination's VMM, if it was started
  }
  if (auto s = store_->EndMigration(rec, v); !s) spdlog::warn("controller: migration {}: {}", rec.id, s.error().message());
  Note("migration-" + rec.status, fmt::format("{}: {} -> {}{}", m.vm, m.from, m.to,
                                               error.empty() ? fmt::format(" in {:.0f} ms, downtime {:.1f} ms", rec.total_ms, rec.downtime_ms)
                                                             : ": " + error));
  finish(error.empty());
}

// ---- the API ----

Result<nlohmann::json> Controller::AddHost(const nlohmann::json& body) {
  if (!body.is_object() || !body.contains("name") || !body["name"].is_string() || !body.contains("agent") || !body["agent"].is_string())
    return Errorf(ErrorCode::kInvalidArgument, "expected {{\"name\": \"a\", \"agent\": \"https://HOST:PORT\"}}");
  HostRecord h{body["name"].get<std::string>(), body["agent"].get<std::string>(), HostState::kActive, UnixMs()};
  if (!ValidName(h.name)) return Errorf(ErrorCode::kInvalidArgument, "host name '{}': letters, digits, '.', '_' and '-' (at most 63)", h.name);
  if (auto u = net::ParseHttpUrl(h.agent); !u) return std::unexpected(u.error().WithContext("agent"));
  if (auto existing = store_->Host(h.name); existing && *existing) return Errorf(ErrorCode::kBusy, "host {} exists", h.name);
  auto info = CallJson(h.agent, "GET", "/v1/host", nullptr, 5000);
  if (!info) return std::unexpected(info.error().WithContext("host " + h.name));
  if (info->value("name", "") != h.name)
    return Errorf(ErrorCode::kInvalidArgument, "host {}: the agent at {} is named '{}' (ferry-agent --name)", h.name, h.agent, info->value("name", ""));
  if (auto s = store_->AddHost(h); !s) return std::unexpected(s.error());
  Note("host-added", fmt::format("{} at {}", h.name, h.agent));
  return ToJson(h);
}

Result<nlohmann::json> Controller::Hosts() {
  auto hosts = store_->Hosts();
  auto vms = store_->Vms();
  if (!hosts) return std::unexpected(hosts.error());
  if (!vms) return std::unexpected(vms.error());
  nlohmann::json out = nlohmann::json::array();
  MutexLock l(mu_);
  for (const HostRecord& h : *hosts) {
    nlohmann::json j = ToJson(h);
    nlohmann::json names = nlohmann::json::array();
    for (const VmRecord& v : *vms)
      if (v.host == h.name) names.push_back(v.name);
    j["vms"] = names;
    if (auto o = observed_.find(h.name); o != observed_.end()) {
      if (o->second.silent_ticks >= options_.down_after_ticks) j["state"] = "down";
      const HostView& hv = o->second.view;
      j["capacity"] = {{"cpus", hv.capacity.cpus}, {"mem_bytes", hv.capacity.mem_bytes}, {"net_bytes_per_s", hv.capacity.net_bytes_per_s}};
      j["usage"] = {{"cpus", hv.usage.cpus},
                    {"cpu_load", Fraction(hv.usage.cpus, hv.capacity.cpus)},
                    {"net_bytes_per_s", hv.usage.net_bytes_per_s},
                    {"swap_out_pages_per_s", hv.usage.swap_out_pages_per_s}};
      j["reachable"] = o->second.reachable;
    }
    out.push_back(std::move(j));
  }
  return out;
}

Status Controller::SetDrain(const std::string& host, bool drain) {
  auto h = store_->Host(host);
  if (!h) return std::unexpected(h.error());
  if (!*h) return Errorf(ErrorCode::kNotFound, "no host {}", host);
  HostRecord r = **h;
  const HostState want = drain ? HostState::kDraining : HostState::kActive;
  if (drain && r.state == HostState::kDrained) return {};  // already empty
  if (r.state == want) return {};
  r.state = want;
  if (auto s = store_->PutHost(r); !s) return s;
  Note(drain ? "drain" : "undrain", host);
  return {};
}

Result<nlohmann::json> Controller::CreateVm(const nlohmann::json& body) {
  if (!body.is_object()) return Errorf(ErrorCode::kInvalidArgument, "expected a JSON object");
  auto str = [&](const char* k, bool required) -> Result<std::string> {
    auto it = body.find(k);
    if (it == body.end()) return required ? Errorf(ErrorCode::kInvalidArgument, "\"{}\" is required", k) : Result<std::string>("");
    if (!it->is_string()) return Errorf(ErrorCode::kInvalidArgument, "\"{}\" must be a string", k);
    return it->get<std::string>();
  };
  auto name = str("name", true), kernel = str("kernel", true), initrd = str("initrd", false), mem = str("mem", true), host = str("host", false);
  for (auto* r : {&name, &kernel, &initrd, &mem, &host})
    if (!*r) return std::unexpected(r->error());
  if (!ValidName(*name)) return Errorf(ErrorCode::kInvalidArgument, "VM name '{}': letters, digits, '.', '_' and '-' (at most 63)", *name);
  auto mem_bytes = ParseSize(*mem);
  if (!mem_bytes || *mem_bytes < (16u << 20)) return Errorf(ErrorCode::kInvalidArgument, "\"mem\" '{}': a size of at least 16M", *mem);
  if (auto existing = store_->Vm(*name); existing && *existing) return Errorf(ErrorCode::kBusy, "VM {} exists", *name);
  auto vms = store_->Vms();
  if (!vms) return std::unexpected(vms.error());
  auto used = [&](const std::string& h) {
    uint64_t sum = 0;
    for (const VmRecord& v : *vms)
      if (v.host == h && v.state != "lost") sum += v.mem_bytes;
    return sum;
  };
  std::string where = *host;
  if (!where.empty()) {
    // The operator's choice: asked of its agent now (the loop may not have seen a new host yet).
    auto rec = store_->Host(where);
    if (!rec) return std::unexpected(rec.error());
    if (!*rec) return Errorf(ErrorCode::kNotFound, "no host {}", where);
    if ((*rec)->state != HostState::kActive) return Errorf(ErrorCode::kBusy, "host {} is {}", where, HostStateName((*rec)->state));
    auto info = CallJson((*rec)->agent, "GET", "/v1/host", nullptr, 5000);
    if (!info) return std::unexpected(info.error().WithContext("host " + where));
    const uint64_t cap = static_cast<uint64_t>(Num(info->value("capacity", nlohmann::json::object()), "mem_bytes"));
    if (cap && used(where) + *mem_bytes > cap)
      return Errorf(ErrorCode::kBusy, "host {} is full: {} MiB of {} MiB taken, the VM needs {} MiB", where, used(where) >> 20, cap >> 20,
                    *mem_bytes >> 20);
  } else {
    // Placement: the active host with room whose CPU load is lowest, as the loop saw them last.
    MutexLock l(mu_);
    double best = 1e300;
    for (const auto& [n, o] : observed_) {
      if (o.view.state != HostState::kActive || !o.reachable) continue;
      if (o.view.capacity.mem_bytes && used(n) + *mem_bytes > o.view.capacity.mem_bytes) continue;
      const double load = Fraction(o.view.usage.cpus, o.view.capacity.cpus);
      if (load < best) best = load, where = n;
    }
    if (where.empty()) return Errorf(ErrorCode::kBusy, "no active host has room for {} MiB", *mem_bytes >> 20);
  }
  auto agent = AgentOf(where);
  if (!agent) return std::unexpected(agent.error());
  nlohmann::json spec = body;
  spec.erase("host");
  if (auto r = Call(*agent, "POST", "/v1/vms", spec, 60000); !r) return std::unexpected(r.error());
  VmRecord v{*name, where, spec, *mem_bytes, "running", "", UnixMs()};
  if (auto s = store_->AddVm(v); !s) {
    (void)Call(*agent, "DELETE", "/v1/vms/" + *name, nullptr, 10000);  // nothing half-created
    return std::unexpected(s.error());
  }
  Note("vm-created", fmt::format("{} on {} ({} MiB){}", *name, where, *mem_bytes >> 20, host->empty() ? ", placed by the controller" : ""));
  return ToJson(v);
}

Result<nlohmann::json> Controller::Vms() {
  auto vms = store_->Vms();
  if (!vms) return std::unexpected(vms.error());
  nlohmann::json out = nlohmann::json::array();
  MutexLock l(mu_);
  for (const VmRecord& v : *vms) {
    nlohmann::json j = {{"name", v.name}, {"host", v.host}, {"state", v.state}, {"mem_bytes", v.mem_bytes}};
    if (!v.error.empty()) j["error"] = v.error;
    for (const VmView& vv : view_.vms)
      if (vv.name == v.name)
        j["usage"] = {{"cpus", vv.cpus},
                      {"net_bytes_per_s", vv.net_bytes_per_s},
                      {"net_drops_per_s", vv.net_drops_per_s},
                      {"dirty_bytes_per_s", vv.dirty_bytes_per_s},
                      {"swap_out_bytes_per_s", vv.swap_out_bytes_per_s}};
    out.push_back(std::move(j));
  }
  return out;
}

Result<std::string> Controller::Console(const std::string& vm) {
  auto v = store_->Vm(vm);
  if (!v) return std::unexpected(v.error());
  if (!*v) return Errorf(ErrorCode::kNotFound, "no VM {}", vm);
  auto agent = AgentOf((*v)->host);
  if (!agent) return std::unexpected(agent.error());
  return Call(*agent, "GET", "/v1/vms/" + vm + "/console", nullptr, 5000);
}

Status Controller::DeleteVm(const std::string& vm) {
  auto v = store_->Vm(vm);
  if (!v) return std::unexpected(v.error());
  if (!*v) return Errorf(ErrorCode::kNotFound, "no VM {}", vm);
  if ((*v)->state == "migrating") return Errorf(ErrorCode::kBusy, "VM {} is migrating: delete it once the migration ended", vm);
  if ((*v)->state != "lost") {
    auto agent = AgentOf((*v)->host);
    if (!agent) return std::unexpected(agent.error());
    if (auto r = Call(*agent, "DELETE", "/v1/vms/" + vm, nullptr, 30000); !r && r.error().code() != ErrorCode::kNotFound)
      return std::unexpected(r.error());
  }
  if (auto s = store_->DeleteVm(vm); !s) return s;
  Note("vm-deleted", vm + " on " + (*v)->host);
  return {};
}

Result<nlohmann::json> Controller::Migrations() {
  auto ms = store_->Migrations();
  if (!ms) return std::unexpected(ms.error());
  nlohmann::json out = nlohmann::json::array();
  for (const MigrationRecord& m : *ms) out.push_back(ToJson(m));
  return out;
}

Result<nlohmann::json> Controller::Events() {
  auto ev = store_->Events();
  if (!ev) return std::unexpected(ev.error());
  nlohmann::json out = nlohmann::json::array();
  for (const auto& e : *ev) out.push_back(ToJson(e));
  return out;
}

nlohmann::json Controller::Plan() {
  MutexLock l(mu_);
  const uint64_t now = NowNs();
  const controller::Plan p = planner_.Decide(view_, now);
  nlohmann::json moves = nlohmann::json::array(), hotspots = nlohmann::json::array();
  for (const Move& m : p.moves)
    moves.push_back({{"vm", m.vm},
                     {"from", m.from},
                     {"to", m.to},
                     {"reason", m.reason},
                     {"gain", m.gain},
                     {"expected_total_ms", m.estimate.total_s * 1000},
                     {"expected_downtime_ms", m.estimate.pause_s * 1000},
                     {"expected_bytes", m.estimate.bytes}});
  for (const Hotspot& h : p.hotspots)
    hotspots.push_back({{"host", h.host}, {"vm", h.vm}, {"trigger", h.trigger}, {"value", h.value}, {"threshold", h.threshold},
                        {"held_s", h.held_s}, {"sustained", h.sustained}, {"why_not", h.why_not}});
  return {{"leader", leader_},
          {"view_age_ms", view_ns_ ? static_cast<double>(now - view_ns_) / 1e6 : -1.0},
          {"moves", moves},
          {"hotspots", hotspots},
          {"running", p.running},
          {"cpu_stddev", p.cpu_stddev_before},
          {"cpu_stddev_after", p.cpu_stddev_after},
          {"cpu_overload_cpus", p.cpu_overload_before},
          {"cpu_overload_cpus_after", p.cpu_overload_after}};
}

nlohmann::json Controller::Info() {
  MutexLock l(mu_);
  return {{"id", options_.id}, {"leader", leader_}, {"store", store_->kv().Describe()}, {"migrations_running", running_.size()},
          {"migrations_started", migrations_started_}};
}

std::string Controller::Metrics() {
  auto migrations = store_->Migrations();
  MutexLock l(mu_);
  std::string s;
  s += "# HELP ferry_controller_leader 1 while this controller leads.\n# TYPE ferry_controller_leader gauge\n";
  s += fmt::format("ferry_controller_leader{{id=\"{}\"}} {}\n", options_.id, leader_ ? 1 : 0);
  s += "# HELP ferry_host_cpus_used Busy CPUs on the host, as its agent measured.\n# TYPE ferry_host_cpus_used gauge\n";
  for (const auto& [n, o] : observed_) s += fmt::format("ferry_host_cpus_used{{host=\"{}\"}} {}\n", n, o.view.usage.cpus);
  s += "# HELP ferry_host_cpu_load Busy CPUs over declared CPUs.\n# TYPE ferry_host_cpu_load gauge\n";
  for (const auto& [n, o] : observed_)
    s += fmt::format("ferry_host_cpu_load{{host=\"{}\"}} {}\n", n, Fraction(o.view.usage.cpus, o.view.capacity.cpus));
  s += "# HELP ferry_host_up 1 while the host's agent answers.\n# TYPE ferry_host_up gauge\n";
  for (const auto& [n, o] : observed_) s += fmt::format("ferry_host_up{{host=\"{}\"}} {}\n", n, o.reachable ? 1 : 0);
  s += "# HELP ferry_vm_cpus Busy CPUs of the VM.\n# TYPE ferry_vm_cpus gauge\n";
  for (const VmView& v : view_.vms) s += fmt::format("ferry_vm_cpus{{vm=\"{}\",host=\"{}\"}} {}\n", v.name, v.host, v.cpus);
  s += "# HELP ferry_controller_migrations_running Migrations this controller follows now.\n# TYPE ferry_controller_migrations_running gauge\n";
  s += fmt::format("ferry_controller_migrations_running {}\n", running_.size());
  if (migrations) {
    std::map<std::string, int> by_status;
    for (const auto& m : *migrations) ++by_status[m.status];
    s += "# HELP ferry_migrations Migrations in the store by status.\n# TYPE ferry_migrations gauge\n";
    for (const auto& [st, n] : by_status) s += fmt::format("ferry_migrations{{status=\"{}\"}} {}\n", st, n);
    s += "# HELP ferry_migration_downtime_ms The engine-measured pause of each completed migration.\n# TYPE ferry_migration_downtime_ms gauge\n";
    for (const auto& m : *migrations)
      if (m.status == "completed")
        s += fmt::format("ferry_migration_downtime_ms{{vm=\"{}\",from=\"{}\",to=\"{}\",id=\"{}\"}} {}\n", m.vm, m.from, m.to, m.id, m.downtime_ms);
  }
  return s;
}

}  // namespace ferry::controller
