// `ferry cluster ...`: the operator's side of ferry-controller's REST API (docs/api.md) -
// hosts (list, add, drain, undrain), VMs (list, create, delete, console), migrations, events and
// the planner's dry run. Text tables by default, the API's JSON with --json. The controller is
// --controller URL (default $FERRY_CONTROLLER, else http://127.0.0.1:7100); https:// URLs need
// --tls-cert/--tls-key/--tls-ca (mutual TLS).
#pragma once

#include <memory>

#include <CLI/CLI.hpp>

namespace ferry::ctl {

class ClusterCommands {
 public:
  virtual ~ClusterCommands() = default;
  virtual bool parsed() const = 0;
  virtual int Run() = 0;  // after app.parse(): the process's exit code
};

// Adds the "cluster" subcommand and its own subcommands to `app`.
std::unique_ptr<ClusterCommands> AddClusterCommands(CLI::App& app);

}  // namespace ferry::ctl
