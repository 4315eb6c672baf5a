#include "vmm/api_server.h"

#include <sys/socket.h>
#include <sys/stat.h>
#include <unistd.h>

#include <httplib.h>
#include <spdlog/spdlog.h>

#include "common/json.h"
#include "common/text.h"
#include "migration/engine/incoming_stats.h"

namespace ferry {

int HttpStatusFor(const Error& e) {
  switch (e.code()) {
    case ErrorCode::kInvalidArgument: case ErrorCode::kCorrupt: case ErrorCode::kVersionMismatch: return 400;
    case ErrorCode::kNotFound: return 404;
    case ErrorCode::kPermissionDenied: return 403;
    case ErrorCode::kBusy: case ErrorCode::kCancelled: return 409;
    case ErrorCode::kUnsupported: return 422;
    case ErrorCode::kTimeout: return 503;
    default: return 500;  // kIo, kInternal: the VMM failed, not the request
  }
}

namespace {
void Reply(httplib::Response& res, int status, const nlohmann::json& body) {
  res.status = status;
  // Strings may hold bytes from outside (a request path, a peer's text): never throw on them.
  res.set_content(body.dump(-1, ' ', false, nlohmann::json::error_handler_t::replace), "application/json");
}
void ReplyError(httplib::Response& res, int status, const std::string& msg) { Reply(res, status, {{"error", msg}}); }
void ReplyStatus(httplib::Response& res, const Status& s) {
  if (s) Reply(res, 200, {{"ok", true}});
  else ReplyError(res, HttpStatusFor(s.error()), s.error().message());
}
}  // namespace

Status ApiServer::CheckPath(const std::string& path) {
  if (path.empty() || path.size() >= sizeof(sockaddr_un::sun_path))
    return Errorf(ErrorCode::kInvalidArgument, "API socket path '{}' is empty or too long", path);
  struct stat st;
  if (stat(path.c_str(), &st) == 0 && !S_ISSOCK(st.st_mode))
    return Errorf(ErrorCode::kInvalidArgument, "API socket path '{}' exists and is not a socket", path);
  return {};
}

namespace {
// GET /vm while there is no VM yet (or the incoming migration failed after GO).
nlohmann::json IncomingVmInfo(const migration::IncomingProgress& p) {
  const bool failed = p.phase == migration::IncomingPhase::kFailed || p.phase == migration::IncomingPhase::kCancelled;
  nlohmann::json j = {{"state", failed ? "error" : "incoming"},
                      {"incoming", {{"phase", migration::IncomingPhaseName(p.phase)}, {"listen", p.listen}}}};
  if (!p.source.empty()) j["incoming"]["source"] = p.source;
  if (p.ram_bytes) j["incoming"]["total_ram_bytes"] = p.ram_bytes;
  if (!p.error.empty()) j["error"] = p.error;
  return j;
}

// Why `action` cannot run while the VM is still arriving.
std::string NoVmYet(std::string_view action, const migration::IncomingProgress& p) {
  using migration::IncomingPhase;
  switch (p.phase) {
    case IncomingPhase::kWaiting:
    case IncomingPhase::kReceiving:
    case IncomingPhase::kRestoring:
      return fmt::format("cannot {}: an incoming migration is in progress (phase {}) and there is no VM here yet "
                         "(PUT /vm/migration/cancel aborts the migration)",
                         action, migration::IncomingPhaseName(p.phase));
    case IncomingPhase::kPostcopyPaused:
      return fmt::format("cannot {}: post-copy lost its connection to the source and waits for it to reconnect "
                         "({} pages still missing)",
                         action, p.postcopy_remaining_pages);
    case IncomingPhase::kPostcopy:
      return fmt::format("cannot {}: the guest runs here in post-copy and still misses {} pages from the source; "
                         "retry once the incoming migration has completed",
                         action, p.postcopy_remaining_pages);
    case IncomingPhase::kCompleted:
      return fmt::format("cannot {}: the migrated VM is being handed over to the API; retry", action);
    case IncomingPhase::kFailed:
    case IncomingPhase::kCancelled:
      break;
  }
  return fmt::format("cannot {}: the incoming migration {} ({}); there is no VM", action, migration::IncomingPhaseName(p.phase),
                     p.error);
}

std::string IncomingPrometheus(const migration::IncomingProgress& p) {
  std::string out;
  auto metric = [&](const char* name, const char* type, const char* help, double v) {
    out += fmt::format("# HELP {} {}\n# TYPE {} {}\n{} {}\n", name, help, name, type, name, v);
  };
  metric("ferry_vm_running", "gauge", "1 if the VM is running", 0);
  metric("ferry_migration_incoming_received_pages_total", "counter", "Pages applied by the incoming migration",
         static_cast<double>(p.received_pages));
  metric("ferry_migration_incoming_received_bytes_total", "counter", "Bytes read from the incoming migration's data connections",
         static_cast<double>(p.received_bytes));
  return out;
}
}  // namespace

Result<std::unique_ptr<ApiServer>> ApiServer::Start(const std::string& path, Vm* vm, VmMigrationManager* mig) {
  return Serve(path, vm, mig, nullptr);
}

Result<std::unique_ptr<ApiServer>> ApiServer::StartIncoming(const std::string& path, migration::IncomingMigration* incoming) {
  return Serve(path, nullptr, nullptr, incoming);
}

void ApiServer::AttachVm(Vm* vm, VmMigrationManager* mig) {
  {
    MutexLock l(mu_);
    vm_ = vm;
    mig_ = mig;
  }
  attached_.notify_all();
}

ApiServer::Target ApiServer::target() const {
  MutexLock l(mu_);
  if (!vm_ && incoming_ && incoming_->phase() == migration::IncomingPhase::kCompleted)
    l.WaitFor(attached_, std::chrono::seconds(5), [&]() REQUIRES(mu_) { return vm_ != nullptr; });
  return {vm_, mig_};
}

Result<std::unique_ptr<ApiServer>> ApiServer::Serve(const std::string& path, Vm* vm, VmMigrationManager* mig,
                                                    migration::IncomingMigration* incoming) {
  if (auto c = CheckPath(path); !c) return std::unexpected(c.error());
  struct stat st;
  if (stat(path.c_str(), &st) == 0) unlink(path.c_str());  // stale socket from a previous run
  std::unique_ptr<ApiServer> api(new ApiServer());
  api->path_ = path;
  {
    MutexLock l(api->mu_);  // no handler runs yet; the lock only satisfies the analysis
    api->vm_ = vm;
    api->mig_ = mig;
  }
  api->incoming_ = incoming;
  api->server_ = std::make_unique<httplib::Server>();
  api->Routes();
  auto& svr = *api->server_;
  if (!svr.bind_to_port(path, 80)) return Errorf(ErrorCode::kIo, "cannot listen on API socket '{}'", path);
  api->thread_ = std::thread([&svr] { svr.listen_after_bind(); });
  return api;
}

void ApiServer::Routes() {
  auto& svr = *server_;
  svr.set_address_family(AF_UNIX);
  migration::IncomingMigration* const incoming = incoming_;
  // Runs `fn(vm, mig)` with the attached VM, or answers 409 (why `action` cannot run yet).
  auto with_vm = [this, incoming](std::string_view action, httplib::Response& res, auto&& fn) {
    Target t = target();
    if (t.vm) return fn(t.vm, t.mig);
    if (incoming) return ReplyError(res, 409, NoVmYet(action, incoming->Stats()));
    ReplyError(res, 409, fmt::format("cannot {}: there is no VM", action));
  };

  svr.Get("/vm", [this, incoming](const httplib::Request&, httplib::Response& res) {
    Target t = target();
    if (!t.vm) {
      if (incoming) Reply(res, 200, IncomingVmInfo(incoming->Stats()));
      else ReplyError(res, 409, "there is no VM");
      return;
    }
    auto info = t.vm->Info();
    if (!info) ReplyError(res, HttpStatusFor(info.error()), info.error().message());
    else Reply(res, 200, *info);
  });
  svr.Get("/vm/memory-digest", [with_vm](const httplib::Request&, httplib::Response& res) {
    with_vm("digest the memory", res, [&](Vm* vm, VmMigrationManager*) {
      auto d = vm->MemoryDigest();
      if (!d) ReplyError(res, HttpStatusFor(d.error()), d.error().message());
      else Reply(res, 200, *d);
    });
  });
  svr.Get("/metrics", [this, incoming](const httplib::Request&, httplib::Response& res) {
    Target t = target();
    if (t.vm) res.set_content(t.vm->Prometheus(), "text/plain; version=0.0.4");
    else if (incoming) res.set_content(IncomingPrometheus(incoming->Stats()), "text/plain; version=0.0.4");
    else ReplyError(res, 409, "there is no VM");
  });
  // While a migration runs, the engine owns pause/resume of the VM.
  auto migrating = [](VmMigrationManager* mig, httplib::Response& res) {
    if (mig && mig->active()) {
      ReplyError(res, 409, "a migration is in progress (PUT /vm/migration/cancel first)");
      return true;
    }
    return false;
  };
  svr.Put("/vm/pause", [with_vm, migrating](const httplib::Request&, httplib::Response& res) {
    with_vm("pause", res, [&](Vm* vm, VmMigrationManager* mig) {
      if (!migrating(mig, res)) ReplyStatus(res, vm->Pause());
    });
  });
  svr.Put("/vm/resume", [with_vm, migrating](const httplib::Request&, httplib::Response& res) {
    with_vm("resume", res, [&](Vm* vm, VmMigrationManager* mig) {
      if (!migrating(mig, res)) ReplyStatus(res, vm->Resume());
    });
  });
  svr.Put("/vm/shutdown", [with_vm](const httplib::Request&, httplib::Response& res) {
    with_vm("shut down", res, [&](Vm* vm, VmMigrationManager*) { ReplyStatus(res, vm->Shutdown()); });
  });
  svr.Put("/vm/snapshot", [with_vm, migrating](const httplib::Request& req, httplib::Response& res) {
    with_vm("snapshot", res, [&](Vm* vm, VmMigrationManager* mig) {
      if (migrating(mig, res)) return;
      auto parsed = ParseJson(req.body, "request body");
      if (!parsed) return ReplyError(res, 400, parsed.error().message());
      nlohmann::json& body = *parsed;
      if (!body.is_object()) return ReplyError(res, 400, "request body must be a JSON object");
      if (!body.contains("path") || !body["path"].is_string() || body["path"].get<std::string>().empty())
        return ReplyError(res, 400, "\"path\" (non-empty string) is required");
      for (auto& [k, v] : body.items())
        if (k != "path") return ReplyError(res, 400, "unknown field \"" + k + "\"");
      ReplyStatus(res, vm->Snapshot(body["path"].get<std::string>()));
    });
  });
  const bool has_mig = [this] {
    MutexLock l(mu_);
    return mig_ != nullptr;
  }();
  if (has_mig || incoming) {
    svr.Put("/vm/migrate", [with_vm](const httplib::Request& req, httplib::Response& res) {
      with_vm("migrate", res, [&](Vm*, VmMigrationManager* mig) {
        if (!mig) return ReplyError(res, 409, "this VMM has no migration support");
        auto parsed = ParseJson(req.body, "request body");
        if (!parsed) return ReplyError(res, 400, parsed.error().message());
        nlohmann::json& body = *parsed;
        if (!body.is_object()) return ReplyError(res, 400, "request body must be a JSON object");
        auto s = mig->Start(body);
        if (!s) return ReplyError(res, HttpStatusFor(s.error()), s.error().message());
        Reply(res, 202, {{"ok", true}, {"status", "setup"}});
      });
    });
    svr.Get("/vm/migration", [this, incoming](const httplib::Request&, httplib::Response& res) {
      Target t = target();
      if (t.mig) {
        auto st = t.mig->Stats();
        if (st) return Reply(res, 200, *st);
        // No outgoing migration yet: a destination shows how this VM arrived.
        if (!(incoming && st.error().code() == ErrorCode::kNotFound))
          return ReplyError(res, HttpStatusFor(st.error()), st.error().message());
      }
      if (incoming) return Reply(res, 200, migration::IncomingProgressJson(incoming->Stats()));
      ReplyError(res, 404, "no migration has been started");
    });
    svr.Put("/vm/migration/cancel", [this, incoming](const httplib::Request&, httplib::Response& res) {
      Target t = target();
      if (t.mig) {
        auto s = t.mig->Cancel();
        if (s || !(incoming && s.error().code() == ErrorCode::kNotFound)) return ReplyStatus(res, s);
      }
      if (incoming) return ReplyStatus(res, incoming->Cancel());
      ReplyError(res, 404, "no migration has been started");
    });
    svr.Put("/vm/migration/postcopy", [with_vm](const httplib::Request&, httplib::Response& res) {
      with_vm("switch a migration to post-copy", res, [&](Vm*, VmMigrationManager* mig) {
        if (!mig) return ReplyError(res, 409, "this VMM has no migration support");
        ReplyStatus(res, mig->StartPostcopy());
      });
    });
    svr.Put("/vm/migration/recover", [with_vm](const httplib::Request& req, httplib::Response& res) {
      with_vm("recover a post-copy migration", res, [&](Vm*, VmMigrationManager* mig) {
        if (!mig) return ReplyError(res, 409, "this VMM has no migration support");
        auto parsed = ParseJson(req.body, "request body");
        if (!parsed) return ReplyError(res, 400, parsed.error().message());
        nlohmann::json& body = *parsed;
        if (!body.is_object() || !body.contains("to") || !body["to"].is_string() || body.size() != 1)
          return ReplyError(res, 400, "request body must be {\"to\": \"tcp:HOST:PORT\"}");
        ReplyStatus(res, mig->Recover(body["to"].get<std::string>()));
      });
    });
  }
  svr.set_error_handler([](const httplib::Request& req, httplib::Response& res) {
    if (res.status == 404) ReplyError(res, 404, "no such endpoint: " + PrintableText(req.method, 64) + " " + PrintableText(req.path, 512));
    else if (res.status == 405) ReplyError(res, 405, "method not allowed: " + PrintableText(req.method, 64) + " " + PrintableText(req.path, 512));
    else if (res.body.empty()) ReplyError(res, res.status, "request failed");
  });
  svr.set_exception_handler([](const httplib::Request&, httplib::Response& res, std::exception_ptr) {
    ReplyError(res, 500, "internal error");
  });
}

ApiServer::~ApiServer() {
  if (server_) server_->stop();
  if (thread_.joinable()) thread_.join();
  unlink(path_.c_str());
}

}  // namespace ferry
