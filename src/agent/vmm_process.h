// ferry-agent's hands on one ferry-vmm: starting it in a session of its own (so that neither a
// restart nor a kill -9 of the agent touches it), finding out whether it still runs, stopping it,
// and HTTP requests to its API socket.
//
// A VMM is started through a double fork: the agent never is its parent (init reaps it), so a
// VMM the agent started and one a restarted agent adopted are watched the same way, by pid and
// start time (vm_record.h CheckLiveness). Its stdout and stderr go to DIR/vmm.log, stdin is
// /dev/null, and no descriptor of the agent (its listening socket!) leaks into it.
//
// Any thread; the functions keep no state.
#pragma once

#include <chrono>
#include <string>
#include <vector>

#include "agent/vm_record.h"
#include "common/error.h"

namespace ferry::agent {

// Starts `argv` (argv[0] = the binary's path) in `dir` as described above. Returns the pid and
// start time, or the reason exec failed (no process is left behind then).
Result<VmRecord> SpawnVmm(const std::vector<std::string>& argv, const std::string& dir);

// Stops the process `r` names if it still is that process: SIGKILL, then waits (bounded) for it to go.
void KillVmm(const VmRecord& r, std::chrono::milliseconds wait = std::chrono::seconds(2));
// Polls until the process is gone (true) or `timeout` passes (false).
bool WaitGone(const VmRecord& r, std::chrono::milliseconds timeout);

struct HttpReply {
  int status = 0;
  std::string body, content_type;
};
// One request to a Unix-socket HTTP API. kIo when no answer came (no socket, refused, timeout).
Result<HttpReply> UnixHttp(const std::string& socket, const std::string& method, const std::string& target,
                           const std::string& body = "", const std::string& content_type = "application/json",
                           std::chrono::milliseconds timeout = std::chrono::seconds(2));

// Removes a directory tree (a VM's state directory). Errors are ignored: best effort.
void RemoveTree(const std::string& dir);

}  // namespace ferry::agent
