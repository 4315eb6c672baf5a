// Where the controller keeps its state: an ordered key-value store with atomic multi-key writes
// and a leader lease, the shape both back ends share - SQLite (one file, the default: sqlite_kv.h)
// and etcd (several controllers, one leader). ClusterStore (cluster_store.h) keeps typed records on
// top of it; nothing else writes keys.
//
// Keys are printable paths ("hosts/a", "vms/web1", "migrations/00000042"); values are bytes (the
// records' JSON). List(prefix) returns keys in byte order. Apply() writes all its operations or
// none, and only when every condition holds (kBusy names the first that did not: "vms/web1
// exists") - so a record and what depends on it are never half-written.
//
// Leadership: TryLead(me, ttl) makes `me` the leader when nobody holds an unexpired lease, or renews
// its own lease; it returns whether `me` leads now. A leader that stops renewing loses the lease
// after `ttl_ms`, and another controller's TryLead then wins. Leadership fences nothing by itself:
// a controller acts only while its last TryLead (no older than ttl/2) said it leads.
//
// Threads: implementations are thread-safe (the controller's loop and its API threads share one).
#pragma once

#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "common/error.h"

namespace ferry::controller {

struct KvOp {
  enum Kind { kPut, kDelete } kind = kPut;
  std::string key;
  std::string value;  // kPut only
};

struct KvCondition {
  enum Kind { kExists, kAbsent } kind = kAbsent;
  std::string key;
};

class KvStore {
 public:
  virtual ~KvStore() = default;
  virtual Result<std::optional<std::string>> Get(const std::string& key) = 0;
  virtual Result<std::vector<std::pair<std::string, std::string>>> List(const std::string& prefix) = 0;
  virtual Status Apply(const std::vector<KvOp>& ops, const std::vector<KvCondition>& conditions = {}) = 0;
  virtual Result<bool> TryLead(const std::string& me, uint64_t ttl_ms) = 0;
  // Gives the lease up at once (a controller that stops cleanly).
  virtual Status Resign(const std::string& me) = 0;
  // "sqlite:/var/lib/ferry/controller.db", "etcd:http://127.0.0.1:2379": for logs and GET /v1/status.
  virtual std::string Describe() const = 0;
};

// The first key after every key that starts with `prefix`: List's upper bound ("" = none, when
// the prefix is empty or all 0xff bytes).
std::string KeyPrefixEnd(std::string prefix);

// "sqlite:PATH" or "etcd:URL[,URL...]" (the controller's --store).
Result<std::unique_ptr<KvStore>> OpenKvStore(const std::string& spec);

}  // namespace ferry::controller
