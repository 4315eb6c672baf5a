#include "controller/sqlite_kv.h"

#include <sqlite3.h>

#include <fmt/format.h>

#include "common/wall_clock.h"

namespace ferry::controller {

namespace {

// One prepared statement, finalized on scope exit.
class Stmt {
 public:
  Stmt(sqlite3* db, const char* sql) { rc_ = sqlite3_prepare_v2(db, sql, -1, &s_, nullptr); }
  ~Stmt() { sqlite3_finalize(s_); }
  Stmt(const Stmt&) = delete;
  Stmt& operator=(const Stmt&) = delete;
  bool ok() const { return rc_ == SQLITE_OK; }
  void Text(int i, const std::string& v) { sqlite3_bind_text(s_, i, v.data(), static_cast<int>(v.size()), SQLITE_TRANSIENT); }
  void Blob(int i, const std::string& v) { sqlite3_bind_blob(s_, i, v.data(), static_cast<int>(v.size()), SQLITE_TRANSIENT); }
  void Int(int i, int64_t v) { sqlite3_bind_int64(s_, i, v); }
  int Step() { return sqlite3_step(s_); }
  std::string Column(int i) {
    const void* p = sqlite3_column_blob(s_, i);
    const int n = sqlite3_column_bytes(s_, i);
    return p ? std::string(static_cast<const char*>(p), static_cast<size_t>(n)) : std::string();
  }
  int64_t ColumnInt(int i) { return sqlite3_column_int64(s_, i); }

 private:
  sqlite3_stmt* s_ = nullptr;
  int rc_ = SQLITE_ERROR;
};

}  // namespace

Result<std::unique_ptr<SqliteKv>> SqliteKv::Open(const std::string& path) {
  if (path.empty()) return Errorf(ErrorCode::kInvalidArgument, "sqlite store: empty path");
  sqlite3* db = nullptr;
  if (sqlite3_open_v2(path.c_str(), &db, SQLITE_OPEN_READWRITE | SQLITE_OPEN_CREATE | SQLITE_OPEN_FULLMUTEX, nullptr) != SQLITE_OK) {
    std::string why = db ? sqlite3_errmsg(db) : "out of memory";
    sqlite3_close(db);
    return Errorf(ErrorCode::kIo, "sqlite store {}: open: {}", path, why);
  }
  std::unique_ptr<SqliteKv> kv(new SqliteKv(path, db));
  MutexLock l(kv->mu_);
  sqlite3_busy_timeout(db, 5000);
  for (const char* sql : {"PRAGMA journal_mode=WAL", "PRAGMA synchronous=FULL",
                          "CREATE TABLE IF NOT EXISTS kv(key TEXT PRIMARY KEY, value BLOB NOT NULL) WITHOUT ROWID",
                          "CREATE TABLE IF NOT EXISTS lease(id INTEGER PRIMARY KEY CHECK (id = 1), holder TEXT NOT NULL, "
                          "expires_ms INTEGER NOT NULL)"}) {
    if (auto s = kv->Exec(sql); !s) return std::unexpected(s.error());
  }
  return kv;
}

SqliteKv::~SqliteKv() {
  MutexLock l(mu_);
  sqlite3_close(db_);
}

Error SqliteKv::Fail(const std::string& what) {
  return Error(ErrorCode::kIo, fmt::format("sqlite store {}: {}: {}", path_, what, sqlite3_errmsg(db_)));
}

Status SqliteKv::Exec(const char* sql) {
  char* err = nullptr;
  if (sqlite3_exec(db_, sql, nullptr, nullptr, &err) != SQLITE_OK) {
    Error e(ErrorCode::kIo, fmt::format("sqlite store {}: {}: {}", path_, sql, err ? err : "failed"));
    sqlite3_free(err);
    return std::unexpected(e);
  }
  return {};
}

Result<std::optional<std::string>> SqliteKv::Get(const std::string& key) {
  MutexLock l(mu_);
  Stmt s(db_, "SELECT value FROM kv WHERE key = ?1");
  if (!s.ok()) return std::unexpected(Fail("get " + key));
  s.Text(1, key);
  const int rc = s.Step();
  if (rc == SQLITE_DONE) return std::optional<std::string>();
  if (rc != SQLITE_ROW) return std::unexpected(Fail("get " + key));
  return std::optional<std::string>(s.Column(0));
}

Result<std::vector<std::pair<std::string, std::string>>> SqliteKv::List(const std::string& prefix) {
  MutexLock l(mu_);
  const std::string end = KeyPrefixEnd(prefix);
  Stmt s(db_, end.empty() ? "SELECT key, value FROM kv WHERE key >= ?1 ORDER BY key"
                          : "SELECT key, value FROM kv WHERE key >= ?1 AND key < ?2 ORDER BY key");
  if (!s.ok()) return std::unexpected(Fail("list " + prefix));
  s.Text(1, prefix);
  if (!end.empty()) s.Text(2, end);
  std::vector<std::pair<std::string, std::string>> out;
  for (;;) {
    const int rc = s.Step();
    if (rc == SQLITE_DONE) return out;
    if (rc != SQLITE_ROW) return std::unexpected(Fail("list " + prefix));
    out.emplace_back(s.Column(0), s.Column(1));
  }
}

Status SqliteKv::Apply(const std::vector<KvOp>& ops, const std::vector<KvCondition>& conditions) {
  MutexLock l(mu_);
  if (auto s = Exec("BEGIN IMMEDIATE"); !s) return s;
  Status st = ApplyInTransaction(ops, conditions);
  if (!st) {
    (void)Exec("ROLLBACK");
    return st;
  }
  if (auto c = Exec("COMMIT"); !c) {
    (void)Exec("ROLLBACK");
    return c;
  }
  return {};
}

Status SqliteKv::ApplyInTransaction(const std::vector<KvOp>& ops, const std::vector<KvCondition>& conditions) {
  for (const KvCondition& c : conditions) {
    Stmt s(db_, "SELECT 1 FROM kv WHERE key = ?1");
    if (!s.ok()) return std::unexpected(Fail("check " + c.key));
    s.Text(1, c.key);
    const int rc = s.Step();
    if (rc != SQLITE_ROW && rc != SQLITE_DONE) return std::unexpected(Fail("check " + c.key));
    const bool exists = rc == SQLITE_ROW;
    if (exists && c.kind == KvCondition::kAbsent) return Errorf(ErrorCode::kBusy, "{} exists", c.key);
    if (!exists && c.kind == KvCondition::kExists) return Errorf(ErrorCode::kBusy, "{} does not exist", c.key);
  }
  for (const KvOp& op : ops) {
    Stmt s(db_, op.kind == KvOp::kPut ? "INSERT INTO kv(key, value) VALUES(?1, ?2) ON CONFLICT(key) DO UPDATE SET value = excluded.value"
                                      : "DELETE FROM kv WHERE key = ?1");
    if (!s.ok()) return std::unexpected(Fail("write " + op.key));
    s.Text(1, op.key);
    if (op.kind == KvOp::kPut) s.Blob(2, op.value);
    if (s.Step() != SQLITE_DONE) return std::unexpected(Fail("write " + op.key));
  }
  return {};
}

Result<bool> SqliteKv::TryLead(const std::string& me, uint64_t ttl_ms) {
  MutexLock l(mu_);
  if (auto s = Exec("BEGIN IMMEDIATE"); !s) return std::unexpected(s.error());
  Result<bool> r = LeadInTransaction(me, ttl_ms);
  if (!r) {
    (void)Exec("ROLLBACK");
    return r;
  }
  if (auto c = Exec("COMMIT"); !c) {
    (void)Exec("ROLLBACK");
    return std::unexpected(c.error());
  }
  return r;
}

Result<bool> SqliteKv::LeadInTransaction(const std::string& me, uint64_t ttl_ms) {
  const uint64_t now = UnixMs();
  Stmt q(db_, "SELECT holder, expires_ms FROM lease WHERE id = 1");
  if (!q.ok()) return std::unexpected(Fail("read the lease"));
  const int rc = q.Step();
  if (rc != SQLITE_ROW && rc != SQLITE_DONE) return std::unexpected(Fail("read the lease"));
  if (rc == SQLITE_ROW && q.Column(0) != me && static_cast<uint64_t>(q.ColumnInt(1)) > now) return false;
  Stmt w(db_, "INSERT INTO lease(id, holder, expires_ms) VALUES(1, ?1, ?2) "
              "ON CONFLICT(id) DO UPDATE SET holder = excluded.holder, expires_ms = excluded.expires_ms");
  if (!w.ok()) return std::unexpected(Fail("take the lease"));
  w.Text(1, me);
  w.Int(2, static_cast<int64_t>(now + ttl_ms));
  if (w.Step() != SQLITE_DONE) return std::unexpected(Fail("take the lease"));
  return true;
}

Status SqliteKv::Resign(const std::string& me) {
  MutexLock l(mu_);
  Stmt s(db_, "DELETE FROM lease WHERE id = 1 AND holder = ?1");
  if (!s.ok()) return std::unexpected(Fail("resign"));
  s.Text(1, me);
  if (s.Step() != SQLITE_DONE) return std::unexpected(Fail("resign"));
  return {};
}

}  // namespace ferry::controller
