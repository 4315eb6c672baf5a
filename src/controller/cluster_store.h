// The controller's records, kept in a KvStore (kv_store.h) as JSON under fixed prefixes:
//   hosts/NAME            HostRecord    a host the operator declared, its agent and drain state
//   vms/NAME              VmRecord      a VM, where it runs, and what it was created from
//   migrations/ID         MigrationRecord  every migration the controller started, with its reason
//                                          and result (ID sorts by start time)
//   events/ID             Event         every decision and state change, with its reason
// Writes that must not be half-done are one Apply: a VM is added only while its host exists and its
// name is free; a migration's record and its VM's state change together.
// A record that does not decode is an error naming its key (the store was written by something
// else), never skipped silently.
// Threads: as thread-safe as the KvStore below it; records are values.
#pragma once

#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "common/wall_clock.h"
#include "controller/cluster_model.h"
#include "controller/kv_store.h"

namespace ferry::controller {

struct HostRecord {
  std::string name;
  std::string agent;  // the agent's base URL, e.g. "https://10.0.0.1:7101"
  HostState state = HostState::kActive;
  uint64_t added_ms = 0;  // wall clock, ms since the epoch
};

struct VmRecord {
  std::string name;
  std::string host;
  nlohmann::json spec;  // what POST /v1/vms was given (kernel, initrd, cmdline, mem, ...)
  uint64_t mem_bytes = 0;
  std::string state = "running";  // running | migrating | lost | failed
  std::string error;              // why it is lost or failed
  uint64_t created_ms = 0;
};

struct MigrationRecord {
  std::string id;  // "<started_ms, 13 digits>-<vm>"
  std::string vm, from, to;
  std::string reason;
  std::string status = "running";  // running | completed | failed
  std::string error;
  uint64_t started_ms = 0, ended_ms = 0;
  double total_ms = 0, downtime_ms = 0;  // as the source's engine measured them
  uint64_t bytes = 0;
  double expected_total_ms = 0, expected_downtime_ms = 0;  // the planner's estimate
};

struct Event {
  std::string id;
  uint64_t at_ms = 0;
  std::string kind;  // host-added, drain, undrain, vm-created, vm-deleted, vm-lost, migration, ...
  std::string text;
};

nlohmann::json ToJson(const HostRecord& h);
nlohmann::json ToJson(const VmRecord& v);
nlohmann::json ToJson(const MigrationRecord& m);
nlohmann::json ToJson(const Event& e);

class ClusterStore {
 public:
  explicit ClusterStore(std::unique_ptr<KvStore> kv) : kv_(std::move(kv)) {}
  KvStore& kv() { return *kv_; }

  Status AddHost(const HostRecord& h);  // kBusy when the name is taken
  Status PutHost(const HostRecord& h);  // kNotFound when it does not exist
  Result<std::vector<HostRecord>> Hosts();
  Result<std::optional<HostRecord>> Host(const std::string& name);

  Status AddVm(const VmRecord& v);  // kBusy: name taken; kNotFound: no such host
  Status PutVm(const VmRecord& v);
  Status DeleteVm(const std::string& name);
  Result<std::vector<VmRecord>> Vms();
  Result<std::optional<VmRecord>> Vm(const std::string& name);

  // A migration starts: its record and the VM's state "migrating", together.
  Status StartMigration(const MigrationRecord& m, const VmRecord& vm);
  // It ended: the record, and the VM where it now runs (or still runs), together.
  Status EndMigration(const MigrationRecord& m, const VmRecord& vm);
  Result<std::vector<MigrationRecord>> Migrations();

  Status AddEvent(const std::string& kind, const std::string& text, uint64_t at_ms);
  Result<std::vector<Event>> Events();

 private:
  std::unique_ptr<KvStore> kv_;
};

}  // namespace ferry::controller
