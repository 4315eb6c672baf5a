#include "controller/cluster_store.h"

#include <unistd.h>

#include <atomic>

#include <fmt/format.h>

namespace ferry::controller {

namespace {

constexpr size_t kKeepEvents = 2000;

// Decodes one record; a malformed one is an error naming its key.
template <class T, class F>
Result<T> Decode(const std::string& key, const std::string& value, F from_json) {
  try {
    return from_json(nlohmann::json::parse(value));
  } catch (const std::exception& e) {
    return Errorf(ErrorCode::kCorrupt, "store record {}: {}", key, e.what());
  }
}

HostRecord HostFrom(const nlohmann::json& j) {
  HostRecord h;
  h.name = j.at("name").get<std::string>();
  h.agent = j.at("agent").get<std::string>();
  auto s = ParseHostState(j.at("state").get<std::string>());
  if (!s) throw std::runtime_error("unknown host state " + j.at("state").dump());
  h.state = *s;
  h.added_ms = j.value("added_ms", uint64_t{0});
  return h;
}

VmRecord VmFrom(const nlohmann::json& j) {
  VmRecord v;
  v.name = j.at("name").get<std::string>();
  v.host = j.at("host").get<std::string>();
  v.spec = j.at("spec");
  v.mem_bytes = j.at("mem_bytes").get<uint64_t>();
  v.state = j.at("state").get<std::string>();
  v.error = j.value("error", "");
  v.created_ms = j.value("created_ms", uint64_t{0});
  return v;
}

MigrationRecord MigrationFrom(const nlohmann::json& j) {
  MigrationRecord m;
  m.id = j.at("id").get<std::string>();
  m.vm = j.at("vm").get<std::string>();
  m.from = j.at("from").get<std::string>();
  m.to = j.at("to").get<std::string>();
  m.reason = j.at("reason").get<std::string>();
  m.status = j.at("status").get<std::string>();
  m.error = j.value("error", "");
  m.started_ms = j.at("started_ms").get<uint64_t>();
  m.ended_ms = j.value("ended_ms", uint64_t{0});
  m.total_ms = j.value("total_ms", 0.0);
  m.downtime_ms = j.value("downtime_ms", 0.0);
  m.bytes = j.value("bytes", uint64_t{0});
  m.expected_total_ms = j.value("expected_total_ms", 0.0);
  m.expected_downtime_ms = j.value("expected_downtime_ms", 0.0);
  return m;
}

Event EventFrom(const nlohmann::json& j) {
  return Event{j.at("id").get<std::string>(), j.at("at_ms").get<uint64_t>(), j.at("kind").get<std::string>(), j.at("text").get<std::string>()};
}

template <class T, class F>
Result<std::vector<T>> ListRecords(KvStore& kv, const std::string& prefix, F from_json) {
  auto all = kv.List(prefix);
  if (!all) return std::unexpected(all.error());
  std::vector<T> out;
  out.reserve(all->size());
  for (const auto& [key, value] : *all) {
    auto r = Decode<T>(key, value, from_json);
    if (!r) return std::unexpected(r.error());
    out.push_back(std::move(*r));
  }
  return out;
}

template <class T, class F>
Result<std::optional<T>> GetRecord(KvStore& kv, const std::string& key, F from_json) {
  auto v = kv.Get(key);
  if (!v) return std::unexpected(v.error());
  if (!*v) return std::optional<T>();
  auto r = Decode<T>(key, **v, from_json);
  if (!r) return std::unexpected(r.error());
  return std::optional<T>(std::move(*r));
}

std::string Dump(const nlohmann::json& j) { return j.dump(-1, ' ', false, nlohmann::json::error_handler_t::replace); }

}  // namespace

nlohmann::json ToJson(const HostRecord& h) {
  return {{"name", h.name}, {"agent", h.agent}, {"state", HostStateName(h.state)}, {"added_ms", h.added_ms}};
}
nlohmann::json ToJson(const VmRecord& v) {
  nlohmann::json j = {{"name", v.name},         {"host", v.host},   {"spec", v.spec},
                      {"mem_bytes", v.mem_bytes}, {"state", v.state}, {"created_ms", v.created_ms}};
  if (!v.error.empty()) j["error"] = v.error;
  return j;
}
nlohmann::json ToJson(const MigrationRecord& m) {
  nlohmann::json j = {{"id", m.id},
                      {"vm", m.vm},
                      {"from", m.from},
                      {"to", m.to},
                      {"reason", m.reason},
                      {"status", m.status},
                      {"started_ms", m.started_ms},
                      {"ended_ms", m.ended_ms},
                      {"total_ms", m.total_ms},
                      {"downtime_ms", m.downtime_ms},
                      {"bytes", m.bytes},
                      {"expected_total_ms", m.expected_total_ms},
                      {"expected_downtime_ms", m.expected_downtime_ms}};
  if (!m.error.empty()) j["error"] = m.error;
  return j;
}
nlohmann::json ToJson(const Event& e) { return {{"id", e.id}, {"at_ms", e.at_ms}, {"kind", e.kind}, {"text", e.text}}; }

Status ClusterStore::AddHost(const HostRecord& h) {
  auto s = kv_->Apply({{KvOp::kPut, "hosts/" + h.name, Dump(ToJson(h))}}, {{KvCondition::kAbsent, "hosts/" + h.name}});
  if (!s && s.error().code() == ErrorCode::kBusy) return Errorf(ErrorCode::kBusy, "host {} exists", h.name);
  return s;
}

Status ClusterStore::PutHost(const HostRecord& h) {
  auto s = kv_->Apply({{KvOp::kPut, "hosts/" + h.name, Dump(ToJson(h))}}, {{KvCondition::kExists, "hosts/" + h.name}});
  if (!s && s.error().code() == ErrorCode::kBusy) return Errorf(ErrorCode::kNotFound, "no host {}", h.name);
  return s;
}

Result<std::vector<HostRecord>> ClusterStore::Hosts() { return ListRecords<HostRecord>(*kv_, "hosts/", HostFrom); }
Result<std::optional<HostRecord>> ClusterStore::Host(const std::string& name) {
  return GetRecord<HostRecord>(*kv_, "hosts/" + name, HostFrom);
}

Status ClusterStore::AddVm(const VmRecord& v) {
  auto s = kv_->Apply({{KvOp::kPut, "vms/" + v.name, Dump(ToJson(v))}},
                      {{KvCondition::kAbsent, "vms/" + v.name}, {KvCondition::kExists, "hosts/" + v.host}});
  if (!s && s.error().code() == ErrorCode::kBusy)
    return s.error().message().ends_with("does not exist") ? Errorf(ErrorCode::kNotFound, "no host {}", v.host)
                                                           : Errorf(ErrorCode::kBusy, "VM {} exists", v.name);
  return s;
}

Status ClusterStore::PutVm(const VmRecord& v) { return kv_->Apply({{KvOp::kPut, "vms/" + v.name, Dump(ToJson(v))}}); }
Status ClusterStore::DeleteVm(const std::string& name) { return kv_->Apply({{KvOp::kDelete, "vms/" + name, ""}}); }
Result<std::vector<VmRecord>> ClusterStore::Vms() { return ListRecords<VmRecord>(*kv_, "vms/", VmFrom); }
Result<std::optional<VmRecord>> ClusterStore::Vm(const std::string& name) { return GetRecord<VmRecord>(*kv_, "vms/" + name, VmFrom); }

Status ClusterStore::StartMigration(const MigrationRecord& m, const VmRecord& vm) {
  return kv_->Apply({{KvOp::kPut, "migrations/" + m.id, Dump(ToJson(m))}, {KvOp::kPut, "vms/" + vm.name, Dump(ToJson(vm))}},
                    {{KvCondition::kAbsent, "migrations/" + m.id}, {KvCondition::kExists, "vms/" + vm.name}});
}

Status ClusterStore::EndMigration(const MigrationRecord& m, const VmRecord& vm) {
  return kv_->Apply({{KvOp::kPut, "migrations/" + m.id, Dump(ToJson(m))}, {KvOp::kPut, "vms/" + vm.name, Dump(ToJson(vm))}},
                    {{KvCondition::kExists, "migrations/" + m.id}});
}

Result<std::vector<MigrationRecord>> ClusterStore::Migrations() {
  return ListRecords<MigrationRecord>(*kv_, "migrations/", MigrationFrom);
}

Status ClusterStore::AddEvent(const std::string& kind, const std::string& text, uint64_t at_ms) {
  static std::atomic<uint64_t> seq{0};
  const uint64_t n = seq.fetch_add(1);
  Event e{fmt::format("{:013}-{:05}-{:06}", at_ms, getpid() % 100000, n % 1000000), at_ms, kind, text};
  if (auto s = kv_->Apply({{KvOp::kPut, "events/" + e.id, Dump(ToJson(e))}}); !s) return s;
  if (n % 100 != 99) return {};
  // Now and then: only the newest kKeepEvents stay.
  auto all = kv_->List("events/");
  if (!all || all->size() <= kKeepEvents) return {};
  std::vector<KvOp> drop;
  for (size_t i = 0; i + kKeepEvents < all->size(); ++i) drop.push_back({KvOp::kDelete, (*all)[i].first, ""});
  return kv_->Apply(drop);
}

Result<std::vector<Event>> ClusterStore::Events() { return ListRecords<Event>(*kv_, "events/", EventFrom); }

}  // namespace ferry::controller
