#include "vmm/api_server.h"

#include <sys/socket.h>
#include <sys/stat.h>
#include <unistd.h>

#include <httplib.h>
#include <spdlog/spdlog.h>

namespace ferry {

int HttpStatusFor(const Error& e) {
  switch (e.code()) {
    case ErrorCode::kInvalidArgument: case ErrorCode::kCorrupt: case ErrorCode::kVersionMismatch: return 400;
    case ErrorCode::kNotFound: return 404;
    case ErrorCode::kBusy: return 409;
    default: return 500;
  }
}

namespace {
void Reply(httplib::Response& res, int status, const nlohmann::json& body) {
  res.status = status;
  res.set_content(body.dump(), "application/json");
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

Result<std::unique_ptr<ApiServer>> ApiServer::Start(const std::string& path, Vm* vm, VmMigrationManager* mig) {
  if (auto c = CheckPath(path); !c) return std::unexpected(c.error());
  struct stat st;
  if (stat(path.c_str(), &st) == 0) unlink(path.c_str());  // stale socket from a previous run
  std::unique_ptr<ApiServer> api(new ApiServer());
  api->path_ = path;
  api->server_ = std::make_unique<httplib::Server>();
  auto& svr = *api->server_;
  svr.set_address_family(AF_UNIX);

  svr.Get("/vm", [vm](const httplib::Request&, httplib::Response& res) {
    auto info = vm->Info();
    if (!info) ReplyError(res, HttpStatusFor(info.error()), info.error().message());
    else Reply(res, 200, *info);
  });
  svr.Get("/metrics", [vm](const httplib::Request&, httplib::Response& res) {
    res.set_content(vm->Prometheus(), "text/plain; version=0.0.4");
  });
  // While a migration runs, the engine owns pause/resume of the VM.
  auto migrating = [mig](httplib::Response& res) {
    if (mig && mig->active()) {
      ReplyError(res, 409, "a migration is in progress (PUT /vm/migration/cancel first)");
      return true;
    }
    return false;
  };
  svr.Put("/vm/pause", [vm, migrating](const httplib::Request&, httplib::Response& res) {
    if (!migrating(res)) ReplyStatus(res, vm->Pause());
  });
  svr.Put("/vm/resume", [vm, migrating](const httplib::Request&, httplib::Response& res) {
    if (!migrating(res)) ReplyStatus(res, vm->Resume());
  });
  svr.Put("/vm/shutdown", [vm](const httplib::Request&, httplib::Response& res) { ReplyStatus(res, vm->Shutdown()); });
  svr.Put("/vm/snapshot", [vm, migrating](const httplib::Request& req, httplib::Response& res) {
    if (migrating(res)) return;
    auto body = nlohmann::json::parse(req.body, nullptr, false);
    if (body.is_discarded() || !body.is_object()) return ReplyError(res, 400, "request body must be a JSON object");
    if (!body.contains("path") || !body["path"].is_string() || body["path"].get<std::string>().empty())
      return ReplyError(res, 400, "\"path\" (non-empty string) is required");
    for (auto& [k, v] : body.items())
      if (k != "path") return ReplyError(res, 400, "unknown field \"" + k + "\"");
    ReplyStatus(res, vm->Snapshot(body["path"].get<std::string>()));
  });
  if (mig) {
    svr.Put("/vm/migrate", [mig](const httplib::Request& req, httplib::Response& res) {
      auto body = nlohmann::json::parse(req.body, nullptr, false);
      if (body.is_discarded() || !body.is_object()) return ReplyError(res, 400, "request body must be a JSON object");
      auto s = mig->Start(body);
      if (!s) return ReplyError(res, HttpStatusFor(s.error()), s.error().message());
      Reply(res, 202, {{"ok", true}, {"status", "setup"}});
    });
    svr.Get("/vm/migration", [mig](const httplib::Request&, httplib::Response& res) {
      auto st = mig->Stats();
      if (!st) ReplyError(res, HttpStatusFor(st.error()), st.error().message());
      else Reply(res, 200, *st);
    });
    svr.Put("/vm/migration/cancel", [mig](const httplib::Request&, httplib::Response& res) { ReplyStatus(res, mig->Cancel()); });
    svr.Put("/vm/migration/postcopy", [mig](const httplib::Request&, httplib::Response& res) { ReplyStatus(res, mig->StartPostcopy()); });
    svr.Put("/vm/migration/recover", [mig](const httplib::Request& req, httplib::Response& res) {
      auto body = nlohmann::json::parse(req.body, nullptr, false);
      if (body.is_discarded() || !body.is_object() || !body.contains("to") || !body["to"].is_string() || body.size() != 1)
        return ReplyError(res, 400, "request body must be {\"to\": \"tcp:HOST:PORT\"}");
      ReplyStatus(res, mig->Recover(body["to"].get<std::string>()));
    });
  }
  svr.set_error_handler([](const httplib::Request& req, httplib::Response& res) {
    if (res.status == 404) ReplyError(res, 404, "no such endpoint: " + req.method + " " + req.path);
    else if (res.status == 405) ReplyError(res, 405, "method not allowed: " + req.method + " " + req.path);
    else if (res.body.empty()) ReplyError(res, res.status, "request failed");
  });
  svr.set_exception_handler([](const httplib::Request&, httplib::Response& res, std::exception_ptr) {
    ReplyError(res, 500, "internal error");
  });
  if (!svr.bind_to_port(path, 80)) return Errorf(ErrorCode::kIo, "cannot listen on API socket '{}'", path);
  api->thread_ = std::thread([&svr] { svr.listen_after_bind(); });
  return api;
}

ApiServer::~ApiServer() {
  if (server_) server_->stop();
  if (thread_.joinable()) thread_.join();
  unlink(path_.c_str());
}

}  // namespace ferry
