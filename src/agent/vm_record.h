// One VM as ferry-agent keeps it on disk: DIR/vms/NAME/vm.json holds the request it was made from
// (VmSpec), the ferry-vmm process (pid + its start time from /proc/PID/stat, so a pid the kernel
// reused for another process is never taken for it) and whether it was started as the destination
// of a migration. A restarted agent reads these files and adopts the processes that still run
// (Adopt). Also the guest console file: its last 64 KiB for GET .../console, and a bound on its
// size (the VMM appends to it for as long as the guest runs).
//
// Pure functions and file helpers; any thread (the caller serializes writes to one directory).
#pragma once

#include <cstdint>
#include <optional>
#include <string>

#include <nlohmann/json.hpp>

#include "agent/proc_stats.h"
#include "common/error.h"

namespace ferry::agent {

inline constexpr size_t kConsoleTailBytes = 64 * 1024;
// The console file is cut back to its last kConsoleTailBytes once it grows past this.
inline constexpr uint64_t kConsoleMaxBytes = 1024 * 1024;

// What a client asks for (POST /v1/vms, POST /v1/incoming). Incoming VMs have no kernel/initrd/
// cmdline: the migration brings them.
struct VmSpec {
  std::string name;
  std::string kernel, initrd, cmdline;
  std::string mem = "256M";
  uint64_t mem_bytes = 0;
  std::string tap, mac;  // "net": {"tap", "mac"}; empty = no network
  std::string disk;
};
// A VM name: 1-63 of [A-Za-z0-9._-], not starting with '.' or '-' (it names a directory).
Status CheckVmName(const std::string& name);
// Strict decoding of a request body (unknown keys are errors: a typo must not go unnoticed).
// incoming: kernel/initrd/cmdline/disk are not accepted (the migration brings the VM).
Result<VmSpec> VmSpecFromJson(const nlohmann::json& j, bool incoming);
nlohmann::json VmSpecToJson(const VmSpec& s);

struct VmRecord {
  VmSpec spec;
  int pid = 0;
  uint64_t start_ticks = 0;   // /proc/PID/stat starttime of that pid when the agent started it
  std::string incoming;       // "tls:HOST:PORT" / "tcp:..." when started as a destination, else ""
};
nlohmann::json VmRecordToJson(const VmRecord& r);
Result<VmRecord> VmRecordFromJson(const nlohmann::json& j);
// Writes DIR/vm.json atomically (temporary file + rename).
Status SaveVmRecord(const std::string& dir, const VmRecord& r);
Result<VmRecord> LoadVmRecord(const std::string& dir);

// Is the process the record names still the one the agent started? `now` is /proc/PID/stat of
// the record's pid as read now (nullopt: no such process). A zombie is gone; another start time
// means the pid was reused.
enum class Liveness { kRunning, kGone, kPidReused };
Liveness CheckLiveness(const VmRecord& r, const std::optional<PidStat>& now);

// The last `max_bytes` of the file (all of it when shorter); "" when it does not exist.
Result<std::string> TailFile(const std::string& path, size_t max_bytes = kConsoleTailBytes);
// When the file is longer than max_bytes, drops everything but its last keep_bytes: in place with
// FALLOC_FL_COLLAPSE_RANGE where the filesystem can (atomic against the VMM's O_APPEND writes),
// otherwise by copying the tail and truncating (bytes written in between may be lost).
// Returns whether it cut.
Result<bool> BoundFile(const std::string& path, uint64_t max_bytes = kConsoleMaxBytes, size_t keep_bytes = kConsoleTailBytes);

}  // namespace ferry::agent
