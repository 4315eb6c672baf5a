// Snapshot file format v1 (Firecracker-like). All integers little-endian.
//
//   file header (32 B): magic "FERRYSNP" | u32 version | u32 flags | u32 sections | u32 reserved
//                       | u32 reserved | u32 crc32c(previous 28 bytes)
//   section header (24 B): u32 type | u32 flags (bit 0: mandatory) | u64 length
//                          | u32 crc32c(payload) | u32 crc32c(previous 20 bytes)
//   sections, in order: CONFIG (JSON, guest-visible board config), VCPU (u32 hart, blob),
//   DEVICE* (u32 id length, id, blob), RAM (u64 ram bytes, u64 non-zero pages, page bitmap
//   padded to 8 bytes, the non-zero pages in ascending order), END (empty).
// Decoding checks every CRC, length and limit and names the section and offset on error.
//
// The CONFIG JSON holds "board" (guest-visible board config), "vmm" and "generation_id" (the VM's
// identity, GET /vm; a plain restore keeps it, a clone gets a new one). Older snapshots have no
// generation_id: their restore gets a new one.
//
// One running copy per snapshot: SnapshotClaim. ferry-vmm --restore holds an exclusive claim on
// the snapshot it restored for as long as the process lives, so restoring the same snapshot
// again while that copy runs (two copies of one VM: same MAC, same disk, same identity) is
// refused; --restore-clone restores without a claim and with a new generation id.
#pragma once

#include <functional>
#include <map>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "common/error.h"
#include "memory/guest_memory.h"

namespace ferry {

inline constexpr uint32_t kSnapshotVersion = 1;

enum class SnapshotSection : uint32_t { kConfig = 1, kVcpu = 2, kDevice = 3, kRam = 4, kEnd = 0xffff };

struct SnapshotState {
  nlohmann::json config;
  std::vector<uint8_t> vcpu;
  std::map<std::string, std::vector<uint8_t>> devices;
};

// Writes state + RAM to `path` atomically (temp file + rename). The VM must be paused.
Status WriteSnapshot(const std::string& path, const SnapshotState& state, const GuestMemory& ram);

// Reads a snapshot. After the CONFIG section, `make_memory(config)` must return the
// guest RAM to load into (typically after building the board from the config).
Result<SnapshotState> ReadSnapshot(const std::string& path,
                                   const std::function<Result<GuestMemory*>(const nlohmann::json&)>& make_memory);

// An exclusive claim on a snapshot: flock(LOCK_EX) on "<real path of the snapshot>.claim", a file
// created beside it that names the holder's pid. The kernel drops the lock when the process ends
// however it ends (no stale claims); the file itself stays (empty of meaning once unlocked).
// Symbolic links are resolved, so two spellings of one path share the claim; a hard link under
// another name does not. Not thread-safe (one per process, held by main).
class SnapshotClaim {
 public:
  // kBusy naming the holder's pid when another process holds the claim; kIo when the claim file
  // cannot be created (e.g. a read-only directory).
  static Result<SnapshotClaim> Acquire(const std::string& snapshot_path);
  SnapshotClaim(SnapshotClaim&& o) noexcept : fd_(o.fd_), path_(std::move(o.path_)) { o.fd_ = -1; }
  SnapshotClaim& operator=(SnapshotClaim&&) = delete;
  ~SnapshotClaim();
  const std::string& path() const { return path_; }

 private:
  SnapshotClaim(int fd, std::string path) : fd_(fd), path_(std::move(path)) {}
  int fd_ = -1;
  std::string path_;
};

}  // namespace ferry
