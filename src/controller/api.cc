#include "controller/api.h"

#include <httplib.h>

#include <fmt/format.h>

#include "agent/http.h"
#include "controller/web_page.h"

namespace ferry::controller {

int HttpStatusFor(const Error& e) {
  switch (e.code()) {
    case ErrorCode::kInvalidArgument: case ErrorCode::kCorrupt: case ErrorCode::kVersionMismatch: return 400;
    case ErrorCode::kPermissionDenied: return 403;
    case ErrorCode::kNotFound: return 404;
    case ErrorCode::kBusy: case ErrorCode::kCancelled: return 409;
    case ErrorCode::kUnsupported: return 422;
    case ErrorCode::kIo: case ErrorCode::kTimeout: return 502;
    default: return 500;
  }
}

namespace {

void Json(httplib::Response& res, int status, const nlohmann::json& j) {
  res.status = status;
  res.set_content(j.dump(-1, ' ', false, nlohmann::json::error_handler_t::replace), "application/json");
}
void Fail(httplib::Response& res, const Error& e) { Json(res, HttpStatusFor(e), {{"error", e.message()}}); }
template <class T>
void Answer(httplib::Response& res, const Result<T>& r, int ok = 200) {
  if (r) Json(res, ok, *r);
  else Fail(res, r.error());
}
void Answer(httplib::Response& res, const ferry::Status& s) {
  if (s) Json(res, 200, {{"ok", true}});
  else Fail(res, s.error());
}
// The request's JSON body, or a 400 already sent.
std::optional<nlohmann::json> Body(const httplib::Request& req, httplib::Response& res) {
  auto j = nlohmann::json::parse(req.body, nullptr, false);
  if (j.is_discarded() || !j.is_object()) {
    Json(res, 400, {{"error", "the body must be a JSON object"}});
    return std::nullopt;
  }
  return j;
}

}  // namespace

Result<std::unique_ptr<httplib::Server>> MakeApiServer(Controller& c, const net::TlsFiles& tls) {
  auto svr = agent::NewServer(tls);  // the same server and TLS policy as the agents'
  if (!svr) return std::unexpected(svr.error());
  auto& s = **svr;
  s.Post("/v1/hosts", [&c](const httplib::Request& req, httplib::Response& res) {
    if (auto b = Body(req, res)) Answer(res, c.AddHost(*b), 201);
  });
  s.Get("/v1/hosts", [&c](const httplib::Request&, httplib::Response& res) { Answer(res, c.Hosts()); });
  s.Post(R"(/v1/hosts/([^/]+)/drain)", [&c](const httplib::Request& req, httplib::Response& res) { Answer(res, c.SetDrain(req.matches[1], true)); });
  s.Post(R"(/v1/hosts/([^/]+)/undrain)", [&c](const httplib::Request& req, httplib::Response& res) { Answer(res, c.SetDrain(req.matches[1], false)); });
  s.Post("/v1/vms", [&c](const httplib::Request& req, httplib::Response& res) {
    if (auto b = Body(req, res)) Answer(res, c.CreateVm(*b), 201);
  });
  s.Get("/v1/vms", [&c](const httplib::Request&, httplib::Response& res) { Answer(res, c.Vms()); });
  s.Get(R"(/v1/vms/([^/]+)/console)", [&c](const httplib::Request& req, httplib::Response& res) {
    auto text = c.Console(req.matches[1]);
    if (!text) return Fail(res, text.error());
    res.set_content(*text, "text/plain; charset=utf-8");
  });
  s.Delete(R"(/v1/vms/([^/]+))", [&c](const httplib::Request& req, httplib::Response& res) { Answer(res, c.DeleteVm(req.matches[1])); });
  s.Get("/v1/migrations", [&c](const httplib::Request&, httplib::Response& res) { Answer(res, c.Migrations()); });
  s.Get("/v1/events", [&c](const httplib::Request&, httplib::Response& res) { Answer(res, c.Events()); });
  s.Get("/v1/plan", [&c](const httplib::Request&, httplib::Response& res) { Json(res, 200, c.Plan()); });
  s.Get("/v1/status", [&c](const httplib::Request&, httplib::Response& res) { Json(res, 200, c.Info()); });
  s.Get("/metrics", [&c](const httplib::Request&, httplib::Response& res) { res.set_content(c.Metrics(), "text/plain; version=0.0.4"); });
  s.Get("/", [](const httplib::Request&, httplib::Response& res) { res.set_content(WebPage().data(), WebPage().size(), "text/html; charset=utf-8"); });
  s.set_error_handler([](const httplib::Request& req, httplib::Response& res) {
    if (!res.body.empty()) return;
    Json(res, res.status, {{"error", fmt::format("{} {}: {}", req.method, req.path, res.status == 404 ? "no such endpoint" : fmt::format("HTTP {}", res.status))}});
  });
  return std::move(*svr);
}

}  // namespace ferry::controller
