// HTTP/1.1 + JSON API on a Unix socket (Firecracker / Cloud Hypervisor style):
//   GET /vm, PUT /vm/pause, PUT /vm/resume, PUT /vm/snapshot {"path"}, PUT /vm/shutdown,
//   GET /metrics (Prometheus text); migration (source side): PUT /vm/migrate
//   {"to", "channels", "downtime_ms", "max_bandwidth", "converge_policy", "max_iterations",
//   "stall_rounds"}, GET /vm/migration, PUT /vm/migration/cancel, PUT /vm/migration/postcopy.
// Bad requests get a 4xx with {"error": "..."}; the VM is unaffected.
//
// Destination of a live migration (ferry-vmm --incoming): StartIncoming serves from the moment
// the migration listens, before any VM exists. Until AttachVm, nothing touches a VM (there is
// none yet, or it is still being received: in post-copy a VM command could wait forever on a
// page that never comes): GET /vm answers {"state": "incoming"} (or "error" once the migration
// failed) with the incoming phase, GET /vm/migration the destination's progress
// (migration/engine/incoming_stats.h), PUT /vm/migration/cancel aborts the migration before GO
// (409 after it), every other PUT gets 409 with the reason. AttachVm hands the same socket over
// to the migrated VM without a gap (a request that arrives once the migration completed waits,
// at most 5 s, for the hand-over); GET /vm/migration keeps showing the incoming migration's
// result until an outgoing migration is started.
//
// Threads: httplib's worker threads run the handlers; AttachVm may be called from any thread,
// once. The Vm, VmMigrationManager and IncomingMigration outlive the server.
#pragma once

#include <functional>
#include <condition_variable>
#include <memory>
#include <string>
#include <thread>

#include "common/error.h"
#include "common/thread_annotations.h"
#include "migration/engine/destination.h"
#include "vmm/migration.h"
#include "vmm/vm.h"

namespace httplib { class Server; }

namespace ferry {

class ApiServer {
 public:
  static Result<std::unique_ptr<ApiServer>> Start(const std::string& socket_path, Vm* vm,
                                                  VmMigrationManager* migrations = nullptr);
  // A destination's API: answers from `incoming` until AttachVm.
  static Result<std::unique_ptr<ApiServer>> StartIncoming(const std::string& socket_path,
                                                          migration::IncomingMigration* incoming);
  // The migrated VM runs: requests go to it from now on (thread-safe, once).
  void AttachVm(Vm* vm, VmMigrationManager* migrations) EXCLUDES(mu_);
  // The checks Start makes on the path before binding (length; an existing non-socket file),
  // so a caller can reject a bad path before it boots or receives a VM.
  static Status CheckPath(const std::string& socket_path);
  ~ApiServer();
  // Extension point for further endpoints (e.g. migration): registered before Start.
  httplib::Server& server() { return *server_; }

 private:
  ApiServer() = default;
  static Result<std::unique_ptr<ApiServer>> Serve(const std::string& path, Vm* vm, VmMigrationManager* mig,
                                                  migration::IncomingMigration* incoming);
  void Routes();
  struct Target {
    Vm* vm;
    VmMigrationManager* mig;
  };
  // The attached VM (null members before AttachVm). Once the incoming migration completed, waits
  // (bounded) for the hand-over, so a client never sees a completed migration without its VM.
  Target target() const EXCLUDES(mu_);

  mutable Mutex mu_;
  mutable std::condition_variable attached_;           // AttachVm happened
  Vm* vm_ GUARDED_BY(mu_) = nullptr;                   // null until a VM is attached
  VmMigrationManager* mig_ GUARDED_BY(mu_) = nullptr;
  migration::IncomingMigration* incoming_ = nullptr;   // const after Start (destinations only)
  std::string path_;
  std::unique_ptr<httplib::Server> server_;
  std::thread thread_;
};

// Maps an Error to an HTTP status (400 bad input, 409 wrong state, 500 otherwise).
int HttpStatusFor(const Error& e);

}  // namespace ferry
