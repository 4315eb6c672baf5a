// ferry-agent: the per-host half of Ferry's cluster control (issue 12). It starts and stops
// ferry-vmm processes, starts destinations for incoming migrations, proxies each VM's API, keeps
// each guest console bounded, and measures the host and every VM (docs/agent.md has the API).
//
// State: DIR/vms/NAME/ per VM (vm.json, api.sock, console.log, vmm.log). The directory exists
// exactly while the agent knows the VM: a VMM that fails to start leaves neither an entry nor a
// directory behind; DELETE and a completed outgoing migration remove both. A restarted agent
// adopts the VMMs of DIR/vms that still run (same pid and start time) and reports the others
// "exited".
//
// Threads: httplib's worker threads run the handlers (Handle*); one monitor thread samples /proc,
// the TAPs and each VMM's API every sample period, follows migrations and bounds the consoles.
// mu_ guards the VM table and the host sample; no lock is held across I/O to a VMM or /proc
// (an entry being created or deleted is marked busy_op instead, so no two operations overlap
// on one VM).
#pragma once

#include <chrono>
#include <condition_variable>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <thread>

#include <nlohmann/json.hpp>

#include "agent/proc_stats.h"
#include "agent/vm_record.h"
#include "agent/vmm_process.h"
#include "common/error.h"
#include "common/thread_annotations.h"
#include "net/tls.h"

namespace ferry::agent {

struct AgentConfig {
  std::string name;
  std::string state_dir;
  std::string listen_host;   // the host part of --listen; incoming migrations listen there too
  Capacity capacity;
  net::TlsFiles tls;         // empty: --insecure (plain HTTP, plaintext migrations on loopback)
  std::string vmm_path;      // ferry-vmm (next to ferry-agent)
  std::chrono::milliseconds sample_period{1000};
  std::chrono::milliseconds start_timeout{20000};  // until a new VMM's API answers
  std::chrono::milliseconds stop_timeout{3000};    // PUT /vm/shutdown -> SIGKILL
  std::chrono::seconds migrated_linger{60};        // a migrated VM is reported this long, then forgotten
  bool cpu_from_vms = false;  // host CPU use = the sum of its VMs' (--cpu-usage vms: agents sharing a machine)
};

// --listen checks: HOST:PORT (IPv6 in brackets), and plain HTTP only on loopback unless allowed.
struct ListenAddress {
  std::string host;
  int port = 0;
};
Result<ListenAddress> ParseListen(const std::string& s);
bool IsLoopback(const std::string& host);
Status CheckSecurity(const ListenAddress& a, bool insecure, bool allow_insecure_remote, const net::TlsFiles& tls);

// What a handler answers.
struct Reply {
  int status = 200;
  std::string body;
  std::string content_type = "application/json";
  static Reply Json(int status, const nlohmann::json& j) { return {status, j.dump(), "application/json"}; }
  static Reply Err(int status, const std::string& message) { return Json(status, {{"error", message}}); }
};

struct VmUsage {
  double cpus = 0;
  uint64_t rss_bytes = 0;
  double net_rx_bytes_per_s = 0, net_tx_bytes_per_s = 0;      // the guest's view: rx = to the guest
  double net_rx_packets_per_s = 0, net_tx_packets_per_s = 0;
  double net_drops_per_s = 0;                                  // the TAP's rx + tx drops
  double dirty_bytes_per_s = 0;
  uint64_t swap_bytes = 0;              // the VMM's pages swapped out by the host (VmSwap)
  double swap_out_bytes_per_s = 0;      // growth of swap_bytes (0 while it shrinks)
  uint64_t migration_bytes = 0;                                // the last (or running) migration's transferred/received bytes
};

struct HostUsage {
  double cpus = 0;
  uint64_t mem_bytes = 0;
  double net_bytes_per_s = 0;
  double swap_out_pages_per_s = 0;
};

class Agent {
 public:
  // Locks DIR (DIR/agent.lock: one agent per state directory, kBusy if another holds it), reads
  // DIR/vms (adoption); starts nothing yet.
  static Result<std::unique_ptr<Agent>> Create(AgentConfig cfg);
  ~Agent();
  void StartMonitor();
  void Stop();

  // The API (docs/agent.md). Bodies are the raw request bodies.
  Reply GetHost() EXCLUDES(mu_);
  Reply ListVms() EXCLUDES(mu_);
  Reply GetVm(const std::string& name) EXCLUDES(mu_);
  Reply CreateVm(const std::string& body) EXCLUDES(mu_);
  Reply CreateIncoming(const std::string& body) EXCLUDES(mu_);
  Reply DeleteVm(const std::string& name) EXCLUDES(mu_);
  Reply Console(const std::string& name) EXCLUDES(mu_);
  Reply Proxy(const std::string& name, const std::string& method, const std::string& rest, const std::string& body,
              const std::string& content_type) EXCLUDES(mu_);
  Reply Migrate(const std::string& name, const std::string& body) EXCLUDES(mu_);
  std::string Metrics() EXCLUDES(mu_);

  // One monitor round now (the monitor thread runs them periodically).
  void SampleOnce() EXCLUDES(mu_);

 private:
  struct Entry {
    VmRecord rec;
    std::string dir, socket;
    std::string state;               // starting running paused incoming migrating migrated exited lost
    bool busy_op = false;            // being created or deleted
    std::string error;               // why it exited / the last migration failure
    std::string migrating_to;
    nlohmann::json migration;        // the VMM's last GET /vm/migration (null if none)
    std::chrono::steady_clock::time_point migrated_at{};
    int api_failures = 0;
    // Previous samples, for rates.
    std::chrono::steady_clock::time_point sampled_at{};
    std::optional<PidStat> ps;
    std::optional<TapCounters> tap;
    std::optional<uint64_t> dirty_pages;
    std::optional<uint64_t> swap_bytes;
    VmUsage usage;
  };
  explicit Agent(AgentConfig cfg) : cfg_(std::move(cfg)) {}
  void Adopt() EXCLUDES(mu_);
  std::string VmDir(const std::string& name) const { return cfg_.state_dir + "/vms/" + name; }
  // Starts a VMM for `spec` (incoming: the listen address) and registers it; the shared half of
  // CreateVm and CreateIncoming.
  Reply Launch(const VmSpec& spec, const std::string& incoming) EXCLUDES(mu_);
  // Samples one VM (no lock held); returns the updated entry.
  Entry SampleVm(Entry e, double host_ticks_per_s);
  void FinishMigration(Entry& e);
  nlohmann::json VmJson(const Entry& e) const;
  uint64_t AllocatedMemLocked() const REQUIRES(mu_);
  void MonitorLoop() EXCLUDES(mu_);

  const AgentConfig cfg_;
  int lock_fd_ = -1;  // DIR/agent.lock, flock()ed for the agent's lifetime
  mutable Mutex mu_;
  std::map<std::string, Entry> vms_ GUARDED_BY(mu_);
  HostUsage host_ GUARDED_BY(mu_);
  std::optional<CpuTimes> last_cpu_ GUARDED_BY(mu_);
  std::optional<uint64_t> last_swap_out_ GUARDED_BY(mu_);
  std::chrono::steady_clock::time_point last_host_sample_ GUARDED_BY(mu_){};
  bool stop_ GUARDED_BY(mu_) = false;
  std::condition_variable wake_;
  std::thread monitor_;
};

}  // namespace ferry::agent
