#include "controller/etcd_kv.h"

#include <openssl/evp.h>

#include <httplib.h>

#include <fmt/format.h>

#include "net/url.h"

namespace ferry::controller {

namespace {

constexpr const char* kLeaderKey = "leader";

std::string B64(const std::string& s) {
  std::string out(4 * ((s.size() + 2) / 3), '\0');
  const int n = EVP_EncodeBlock(reinterpret_cast<unsigned char*>(out.data()), reinterpret_cast<const unsigned char*>(s.data()),
                                static_cast<int>(s.size()));
  out.resize(static_cast<size_t>(n));
  return out;
}

Result<std::string> Unb64(const std::string& s) {
  if (s.size() % 4 != 0) return Errorf(ErrorCode::kCorrupt, "etcd: bad base64 length {}", s.size());
  std::string out(s.size() / 4 * 3, '\0');
  const int n = EVP_DecodeBlock(reinterpret_cast<unsigned char*>(out.data()), reinterpret_cast<const unsigned char*>(s.data()),
                                static_cast<int>(s.size()));
  if (n < 0) return Errorf(ErrorCode::kCorrupt, "etcd: bad base64");
  size_t pad = 0;
  if (!s.empty() && s.back() == '=') ++pad;
  if (s.size() > 1 && s[s.size() - 2] == '=') ++pad;
  out.resize(static_cast<size_t>(n) - pad);
  return out;
}

// A field that the gateway may spell in proto (snake) or JSON (camel) case.
const nlohmann::json* Field(const nlohmann::json& j, const char* snake, const char* camel) {
  if (!j.is_object()) return nullptr;
  if (auto it = j.find(snake); it != j.end()) return &*it;
  if (auto it = j.find(camel); it != j.end()) return &*it;
  return nullptr;
}

// etcd's 64-bit numbers are JSON strings; absent means 0.
int64_t Int(const nlohmann::json& j, const char* key) {
  auto it = j.find(key);
  if (it == j.end()) return 0;
  if (it->is_number_integer()) return it->get<int64_t>();
  if (it->is_string()) {
    try {
      return std::stoll(it->get<std::string>());
    } catch (...) {
      return 0;
    }
  }
  return 0;
}

Result<std::vector<std::pair<std::string, std::string>>> DecodeKvs(const nlohmann::json& resp) {
  std::vector<std::pair<std::string, std::string>> out;
  const nlohmann::json* kvs = Field(resp, "kvs", "kvs");
  if (!kvs) return out;
  if (!kvs->is_array()) return Errorf(ErrorCode::kCorrupt, "etcd: kvs is not a list");
  for (const auto& kv : *kvs) {
    auto k = Unb64(kv.value("key", ""));
    auto v = Unb64(kv.value("value", ""));
    if (!k || !v) return std::unexpected((!k ? k : v).error());
    out.emplace_back(std::move(*k), std::move(*v));
  }
  return out;
}

}  // namespace

Result<std::unique_ptr<EtcdKv>> EtcdKv::Open(const std::vector<std::string>& endpoints) {
  if (endpoints.empty()) return Errorf(ErrorCode::kInvalidArgument, "etcd store: no endpoint");
  for (const auto& e : endpoints) {
    auto u = net::ParseHttpUrl(e);
    if (!u) return std::unexpected(u.error().WithContext("etcd store"));
    if (u->tls) return Errorf(ErrorCode::kUnsupported, "etcd store {}: https to etcd is not supported yet (use http:// on a trusted network)", e);
  }
  std::unique_ptr<EtcdKv> kv(new EtcdKv(endpoints));
  MutexLock l(kv->mu_);
  if (auto r = kv->Post("/v3/kv/range", {{"key", B64(kLeaderKey)}}); !r) return std::unexpected(r.error().WithContext("etcd store"));
  return kv;
}

std::string EtcdKv::Describe() const {
  std::string s = "etcd:";
  for (size_t i = 0; i < endpoints_.size(); ++i) s += (i ? "," : "") + endpoints_[i];
  return s;
}

Result<nlohmann::json> EtcdKv::Post(const std::string& path, const nlohmann::json& body) {
  std::string why;
  for (size_t i = 0; i < endpoints_.size(); ++i) {
    const size_t at = (current_ + i) % endpoints_.size();
    auto u = net::ParseHttpUrl(endpoints_[at]);
    if (!u) return std::unexpected(u.error());
    httplib::Client cli(u->host, u->port);
    cli.set_connection_timeout(2, 0);
    cli.set_read_timeout(5, 0);
    cli.set_write_timeout(5, 0);
    auto r = cli.Post(path, body.dump(), "application/json");
    if (!r) {
      why += fmt::format("{}{}: {}", why.empty() ? "" : "; ", endpoints_[at], httplib::to_string(r.error()));
      continue;
    }
    if (r->status != 200) return Errorf(ErrorCode::kIo, "etcd {} {}: HTTP {}: {}", endpoints_[at], path, r->status, r->body.substr(0, 300));
    auto j = nlohmann::json::parse(r->body, nullptr, false);
    if (j.is_discarded()) return Errorf(ErrorCode::kIo, "etcd {} {}: the answer is not JSON", endpoints_[at], path);
    current_ = at;
    return j;
  }
  return Errorf(ErrorCode::kIo, "etcd {}: no endpoint answered ({})", path, why);
}

Result<std::vector<std::pair<std::string, std::string>>> EtcdKv::Range(const std::string& key, const std::string& end) {
  nlohmann::json body = {{"key", B64(key)}};
  if (!end.empty()) body["range_end"] = B64(end);
  auto r = Post("/v3/kv/range", body);
  if (!r) return std::unexpected(r.error());
  return DecodeKvs(*r);
}

Result<std::optional<std::string>> EtcdKv::Get(const std::string& key) {
  MutexLock l(mu_);
  auto kvs = Range(key, "");
  if (!kvs) return std::unexpected(kvs.error());
  if (kvs->empty()) return std::optional<std::string>();
  return std::optional<std::string>((*kvs)[0].second);
}

Result<std::vector<std::pair<std::string, std::string>>> EtcdKv::List(const std::string& prefix) {
  MutexLock l(mu_);
  return Range(prefix.empty() ? std::string(1, '\0') : prefix, [&] {
    std::string end = KeyPrefixEnd(prefix);
    return end.empty() ? std::string(1, '\0') : end;  // etcd: range_end "\0" = every key from `key` on
  }());
}

Status EtcdKv::Apply(const std::vector<KvOp>& ops, const std::vector<KvCondition>& conditions) {
  MutexLock l(mu_);
  nlohmann::json compare = nlohmann::json::array(), success = nlohmann::json::array();
  for (const KvCondition& c : conditions)
    compare.push_back({{"key", B64(c.key)},
                       {"target", "CREATE"},
                       {"result", c.kind == KvCondition::kAbsent ? "EQUAL" : "GREATER"},
                       {"create_revision", "0"}});
  for (const KvOp& op : ops) {
    if (op.kind == KvOp::kPut) success.push_back({{"request_put", {{"key", B64(op.key)}, {"value", B64(op.value)}}}});
    else success.push_back({{"request_delete_range", {{"key", B64(op.key)}}}});
  }
  auto r = Post("/v3/kv/txn", {{"compare", compare}, {"success", success}});
  if (!r) return std::unexpected(r.error());
  if (r->value("succeeded", false)) return {};
  // Which condition failed (read once, for the message).
  for (const KvCondition& c : conditions) {
    auto kvs = Range(c.key, "");
    if (!kvs) return std::unexpected(kvs.error());
    if (!kvs->empty() && c.kind == KvCondition::kAbsent) return Errorf(ErrorCode::kBusy, "{} exists", c.key);
    if (kvs->empty() && c.kind == KvCondition::kExists) return Errorf(ErrorCode::kBusy, "{} does not exist", c.key);
  }
  return Errorf(ErrorCode::kBusy, "a condition failed and then changed back");
}

Result<bool> EtcdKv::TryLead(const std::string& me, uint64_t ttl_ms) {
  MutexLock l(mu_);
  if (!lease_.empty()) {
    auto k = Post("/v3/lease/keepalive", {{"ID", lease_}});
    if (!k) return std::unexpected(k.error());
    const nlohmann::json* res = Field(*k, "result", "result");
    if (!res || Int(*res, "TTL") <= 0) lease_.clear();  // expired: the leader key went with it
  }
  if (lease_.empty()) {
    auto g = Post("/v3/lease/grant", {{"TTL", std::to_string(std::max<uint64_t>(1, (ttl_ms + 999) / 1000))}});
    if (!g) return std::unexpected(g.error());
    if (Int(*g, "ID") == 0) return Errorf(ErrorCode::kIo, "etcd: lease grant without an ID: {}", g->dump());
    lease_ = std::to_string(Int(*g, "ID"));
  }
  auto r = Post("/v3/kv/txn",
                {{"compare", {{{"key", B64(kLeaderKey)}, {"target", "CREATE"}, {"result", "EQUAL"}, {"create_revision", "0"}}}},
                 {"success", {{{"request_put", {{"key", B64(kLeaderKey)}, {"value", B64(me)}, {"lease", lease_}}}}}},
                 {"failure", {{{"request_range", {{"key", B64(kLeaderKey)}}}}}}});
  if (!r) return std::unexpected(r.error());
  if (r->value("succeeded", false)) return true;
  const nlohmann::json* responses = Field(*r, "responses", "responses");
  if (!responses || !responses->is_array() || responses->empty()) return false;
  const nlohmann::json* range = Field((*responses)[0], "response_range", "responseRange");
  if (!range) return false;
  auto kvs = DecodeKvs(*range);
  return kvs && !kvs->empty() && (*kvs)[0].second == me;
}

Status EtcdKv::Resign(const std::string& me) {
  MutexLock l(mu_);
  auto r = Post("/v3/kv/txn", {{"compare", {{{"key", B64(kLeaderKey)}, {"target", "VALUE"}, {"result", "EQUAL"}, {"value", B64(me)}}}},
                               {"success", {{{"request_delete_range", {{"key", B64(kLeaderKey)}}}}}}});
  if (!r) return std::unexpected(r.error());
  if (!lease_.empty()) {
    (void)Post("/v3/lease/revoke", {{"ID", lease_}});
    lease_.clear();
  }
  return {};
}

}  // namespace ferry::controller
