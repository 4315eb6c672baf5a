// HTTP/1.1 + JSON API on a Unix socket (Firecracker / Cloud Hypervisor style):
//   GET /vm, PUT /vm/pause, PUT /vm/resume, PUT /vm/snapshot {"path"}, PUT /vm/shutdown,
//   GET /metrics (Prometheus text); migration (source side): PUT /vm/migrate
//   {"to", "channels", "downtime_ms", "max_bandwidth", "converge_policy", "max_iterations",
//   "stall_rounds"}, GET /vm/migration, PUT /vm/migration/cancel.
// Bad requests get a 4xx with {"error": "..."}; the VM is unaffected.
#pragma once

#include <functional>
#include <memory>
#include <string>
#include <thread>

#include "common/error.h"
#include "vmm/migration.h"
#include "vmm/vm.h"

namespace httplib { class Server; }

namespace ferry {

class ApiServer {
 public:
  static Result<std::unique_ptr<ApiServer>> Start(const std::string& socket_path, Vm* vm,
                                                  VmMigrationManager* migrations = nullptr);
  // The checks Start makes on the path before binding (length; an existing non-socket file),
  // so a caller can reject a bad path before it boots or receives a VM.
  static Status CheckPath(const std::string& socket_path);
  ~ApiServer();
  // Extension point for further endpoints (e.g. migration): registered before Start.
  httplib::Server& server() { return *server_; }

 private:
  ApiServer() = default;
  std::string path_;
  std::unique_ptr<httplib::Server> server_;
  std::thread thread_;
};

// Maps an Error to an HTTP status (400 bad input, 409 wrong state, 500 otherwise).
int HttpStatusFor(const Error& e);

}  // namespace ferry
