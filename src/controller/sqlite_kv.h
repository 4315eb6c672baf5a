// KvStore (kv_store.h) in one SQLite file: the controller's default store. Two tables: kv (key,
// value) and lease (one row: holder, expiry in wall-clock ms - several controller processes on one
// host may share the file, and the lease must mean the same to each). WAL journal, synchronous=FULL
// (a committed decision survives a power cut), a 5 s busy timeout; every Apply and TryLead is one
// IMMEDIATE transaction, so concurrent processes serialize on the file.
// Threads: one connection, used under mu_.
#pragma once

#include <memory>
#include <string>

#include "common/thread_annotations.h"
#include "controller/kv_store.h"

struct sqlite3;

namespace ferry::controller {

class SqliteKv final : public KvStore {
 public:
  static Result<std::unique_ptr<SqliteKv>> Open(const std::string& path);
  ~SqliteKv() override;

  Result<std::optional<std::string>> Get(const std::string& key) override EXCLUDES(mu_);
  Result<std::vector<std::pair<std::string, std::string>>> List(const std::string& prefix) override EXCLUDES(mu_);
  Status Apply(const std::vector<KvOp>& ops, const std::vector<KvCondition>& conditions) override EXCLUDES(mu_);
  Result<bool> TryLead(const std::string& me, uint64_t ttl_ms) override EXCLUDES(mu_);
  Status Resign(const std::string& me) override EXCLUDES(mu_);
  std::string Describe() const override { return "sqlite:" + path_; }

 private:
  SqliteKv(std::string path, sqlite3* db) : path_(std::move(path)), db_(db) {}
  Status Exec(const char* sql) REQUIRES(mu_);
  // The bodies of Apply and TryLead, inside their transaction.
  Status ApplyInTransaction(const std::vector<KvOp>& ops, const std::vector<KvCondition>& conditions) REQUIRES(mu_);
  Result<bool> LeadInTransaction(const std::string& me, uint64_t ttl_ms) REQUIRES(mu_);
  Error Fail(const std::string& what) REQUIRES(mu_);
  const std::string path_;
  Mutex mu_;
  sqlite3* const db_ PT_GUARDED_BY(mu_);
};

}  // namespace ferry::controller
