// ferry-controller's engine: the cluster's inventory (ClusterStore), a monitoring loop over the
// agents (ferry-agent, docs/agent.md), the planner (planner.h) and the migrations it starts.
//
// Every `tick_ms` the loop takes or renews the store's leader lease. Only the leader monitors and
// acts: it reads every host's agent (GET /v1/host, GET /v1/vms), builds a ClusterView, lets the
// planner observe and decide, and starts each move on a thread of its own: the destination's agent
// starts a VMM waiting for the VM (POST /v1/incoming), the source's agent migrates it there
// (POST /v1/vms/NAME/migrate), and the controller follows the source until the VM runs on the
// destination or stays on the source; the record (reason, result, engine-measured total and
// downtime) is written with the VM's new place in one store write. A host whose agent does not
// answer for `down_after_ticks` ticks is "down": its VMs are reported lost and nothing moves
// them. A draining host whose last VM left becomes "drained".
// Any controller - leader or not - serves the API; writes go through the store's conditions, so
// two controllers cannot create the same VM. A restarted controller reads its state from the
// store: finished migrations stay finished; a migration that was running when the controller
// stopped is settled by asking the source's agent where the VM is.
//
// Threads: the loop thread, one thread per running migration, and the API's threads (the public
// methods are thread-safe). mu_ guards the planner, the last view and plan, and the migration
// table; no lock is held across a call to an agent or the store.
#pragma once

#include <atomic>
#include <condition_variable>
#include <map>
#include <memory>
#include <string>
#include <thread>

#include <nlohmann/json.hpp>

#include "common/error.h"
#include "common/thread_annotations.h"
#include "controller/cluster_store.h"
#include "controller/planner.h"
#include "net/tls.h"

namespace ferry::controller {

struct ControllerOptions {
  std::string id;                 // this controller in the leader lease (default: hostname:pid)
  PlannerConfig planner;
  uint64_t tick_ms = 1000;        // monitoring period
  uint64_t lease_ms = 5000;       // a dead leader is replaced within this (plus a tick)
  int down_after_ticks = 3;       // agent silent this many ticks: host down
  uint64_t migration_timeout_ms = 600'000;
  net::TlsFiles tls;              // certificate for talking to agents; empty: plain HTTP (--insecure)
};

class Controller {
 public:
  Controller(std::unique_ptr<ClusterStore> store, ControllerOptions options);
  ~Controller();
  void Start() EXCLUDES(mu_);
  void Stop() EXCLUDES(mu_);

  // The API (docs/api.md). Errors: kInvalidArgument (400), kNotFound (404), kBusy (409: a name
  // taken, a host full or not active), kIo (502: an agent did not answer).
  Result<nlohmann::json> AddHost(const nlohmann::json& body) EXCLUDES(mu_);
  Result<nlohmann::json> Hosts() EXCLUDES(mu_);
  Status SetDrain(const std::string& host, bool drain) EXCLUDES(mu_);
  Result<nlohmann::json> CreateVm(const nlohmann::json& body) EXCLUDES(mu_);
  Result<nlohmann::json> Vms() EXCLUDES(mu_);
  Result<std::string> Console(const std::string& vm) EXCLUDES(mu_);
  Status DeleteVm(const std::string& vm) EXCLUDES(mu_);
  Result<nlohmann::json> Migrations() EXCLUDES(mu_);
  Result<nlohmann::json> Events() EXCLUDES(mu_);
  nlohmann::json Plan() EXCLUDES(mu_);  // the planner's dry run on the last view
  nlohmann::json Info() EXCLUDES(mu_);  // id, leader, store, migrations running
  std::string Metrics() EXCLUDES(mu_);

  // One loop round now (tests); the loop thread runs them every tick.
  void Tick() EXCLUDES(mu_);

 private:
  struct Observed {  // what the agents said in the last round
    HostView view;
    bool reachable = false;
    int silent_ticks = 0;
    nlohmann::json vms = nlohmann::json::array();  // the agent's GET /v1/vms
  };
  struct Running {
    std::thread thread;
    bool done = false;
  };
  // One request to an agent (url: its base URL); a reply outside 2xx is an error carrying the
  // agent's message and a code from its status. CallJson parses the body.
  Result<std::string> Call(const std::string& url, const std::string& method, const std::string& path,
                           const nlohmann::json& body = nullptr, int timeout_ms = 10000) const;
  Result<nlohmann::json> CallJson(const std::string& url, const std::string& method, const std::string& path,
                                  const nlohmann::json& body = nullptr, int timeout_ms = 10000) const;
  Result<std::string> AgentOf(const std::string& host);
  void Monitor(uint64_t now_ns) EXCLUDES(mu_);
  void StartMove(const Move& m, uint64_t now_ns) REQUIRES(mu_);
  void RunMigration(Move m) EXCLUDES(mu_);
  void Settle(MigrationRecord m) EXCLUDES(mu_);
  void Loop() EXCLUDES(mu_);
  void Note(const std::string& kind, const std::string& text);  // an event: logged and stored

  std::unique_ptr<ClusterStore> store_;
  const ControllerOptions options_;
  Mutex mu_;
  std::condition_variable wake_;
  bool stop_ GUARDED_BY(mu_) = false;
  bool leader_ GUARDED_BY(mu_) = false;
  bool settled_ GUARDED_BY(mu_) = false;  // migrations left running by an earlier leader were settled
  Planner planner_ GUARDED_BY(mu_);
  ClusterView view_ GUARDED_BY(mu_);
  uint64_t view_ns_ GUARDED_BY(mu_) = 0;
  std::map<std::string, Observed> observed_ GUARDED_BY(mu_);
  std::map<std::string, Running> running_ GUARDED_BY(mu_);  // by VM
  uint64_t migrations_started_ GUARDED_BY(mu_) = 0;
  std::thread loop_;
};

}  // namespace ferry::controller
