// KvStore (kv_store.h) on etcd v3 through its JSON gateway (POST /v3/kv/range, /v3/kv/txn,
// /v3/lease/grant, /v3/lease/keepalive, /v3/lease/revoke; keys and values base64, 64-bit numbers as
// strings): several controllers share one cluster state, and one leads.
//   - Apply is one etcd transaction: every condition a compare on the key's create_revision (0 =
//     absent), every op a put or delete; when a condition fails nothing is written and the error
//     names the first failing condition (read back once to say which).
//   - TryLead: the leader key "leader" holds the controller's id, attached to a lease of ttl_ms
//     (rounded up to whole seconds, at least 1 s) that TryLead renews (keepalive); a lease that
//     expired makes etcd delete the key, and the next TryLead of any controller wins it with a
//     create_revision == 0 transaction. Resign revokes the lease (the key goes at once).
//   - Several endpoints: a request that gets no answer from one is sent to the next (etcd's own
//     raft keeps them consistent); the one that answered is tried first next time.
// Plain HTTP to etcd (a loopback or private etcd); TLS to etcd is not supported yet.
// Threads: thread-safe (one request at a time per store, under mu_).
#pragma once

#include <memory>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "common/thread_annotations.h"
#include "controller/kv_store.h"

namespace ferry::controller {

class EtcdKv final : public KvStore {
 public:
  // endpoints: "http://HOST:PORT" each. Checks that one answers (GET /version).
  static Result<std::unique_ptr<EtcdKv>> Open(const std::vector<std::string>& endpoints);

  Result<std::optional<std::string>> Get(const std::string& key) override EXCLUDES(mu_);
  Result<std::vector<std::pair<std::string, std::string>>> List(const std::string& prefix) override EXCLUDES(mu_);
  Status Apply(const std::vector<KvOp>& ops, const std::vector<KvCondition>& conditions) override EXCLUDES(mu_);
  Result<bool> TryLead(const std::string& me, uint64_t ttl_ms) override EXCLUDES(mu_);
  Status Resign(const std::string& me) override EXCLUDES(mu_);
  std::string Describe() const override;

 private:
  explicit EtcdKv(std::vector<std::string> endpoints) : endpoints_(std::move(endpoints)) {}
  // One POST of the JSON gateway, to the endpoints in turn.
  Result<nlohmann::json> Post(const std::string& path, const nlohmann::json& body) REQUIRES(mu_);
  Result<std::vector<std::pair<std::string, std::string>>> Range(const std::string& key, const std::string& end) REQUIRES(mu_);
  const std::vector<std::string> endpoints_;
  Mutex mu_;
  size_t current_ GUARDED_BY(mu_) = 0;     // the endpoint that answered last
  std::string lease_ GUARDED_BY(mu_);      // our leader lease's ID ("" = none)
};

}  // namespace ferry::controller
