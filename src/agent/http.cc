#include "agent/http.h"

#include <httplib.h>

namespace ferry::agent {
namespace {

void Send(httplib::Response& res, const Reply& r) {
  res.status = r.status;
  res.set_content(r.body, r.content_type.c_str());
}

}  // namespace

Result<std::unique_ptr<httplib::Server>> NewServer(const net::TlsFiles& tls) {
  std::unique_ptr<httplib::Server> svr;
  if (tls.empty()) {
    svr = std::make_unique<httplib::Server>();
  } else {
    Status configured;
    auto ssl = std::make_unique<httplib::SSLServer>([&](SSL_CTX& ctx) {
      configured = net::ConfigureContext(&ctx, tls);
      return static_cast<bool>(configured);
    });
    if (!configured) return std::unexpected(configured.error().WithContext("HTTPS server"));
    if (!ssl->is_valid()) return Errorf(ErrorCode::kInternal, "HTTPS server: {}", net::OpenSslErrors());
    svr = std::move(ssl);
  }
  svr->set_read_timeout(10, 0);
  svr->set_write_timeout(10, 0);
  svr->set_payload_max_length(1 << 20);
  return svr;
}

Result<std::unique_ptr<httplib::Server>> MakeServer(Agent& agent, const net::TlsFiles& tls) {
  auto svr = NewServer(tls);
  if (!svr) return std::unexpected(svr.error());
  auto& s = **svr;
  s.Get("/v1/host", [&agent](const httplib::Request&, httplib::Response& res) { Send(res, agent.GetHost()); });
  s.Get("/v1/vms", [&agent](const httplib::Request&, httplib::Response& res) { Send(res, agent.ListVms()); });
  s.Post("/v1/vms", [&agent](const httplib::Request& req, httplib::Response& res) { Send(res, agent.CreateVm(req.body)); });
  s.Post("/v1/incoming", [&agent](const httplib::Request& req, httplib::Response& res) { Send(res, agent.CreateIncoming(req.body)); });
  s.Get(R"(/v1/vms/([^/]+))", [&agent](const httplib::Request& req, httplib::Response& res) { Send(res, agent.GetVm(req.matches[1])); });
  s.Delete(R"(/v1/vms/([^/]+))", [&agent](const httplib::Request& req, httplib::Response& res) { Send(res, agent.DeleteVm(req.matches[1])); });
  s.Get(R"(/v1/vms/([^/]+)/console)", [&agent](const httplib::Request& req, httplib::Response& res) { Send(res, agent.Console(req.matches[1])); });
  s.Post(R"(/v1/vms/([^/]+)/migrate)", [&agent](const httplib::Request& req, httplib::Response& res) {
    Send(res, agent.Migrate(req.matches[1], req.body));
  });
  auto proxy = [&agent](const httplib::Request& req, httplib::Response& res) {
    std::string rest = req.matches[2];
    if (const size_t q = req.target.find('?'); q != std::string::npos) rest += req.target.substr(q);
    Send(res, agent.Proxy(req.matches[1], req.method, rest, req.body, req.get_header_value("Content-Type")));
  };
  const char* api = R"(/v1/vms/([^/]+)/api(/.*))";
  s.Get(api, proxy);
  s.Put(api, proxy);
  s.Post(api, proxy);
  s.Delete(api, proxy);
  s.Patch(api, proxy);
  s.Get("/metrics", [&agent](const httplib::Request&, httplib::Response& res) {
    res.set_content(agent.Metrics(), "text/plain; version=0.0.4");
  });
  s.set_error_handler([](const httplib::Request& req, httplib::Response& res) {
    // Our handlers always set a body; this one answers unknown routes (and httplib's own errors).
    if (!res.body.empty()) return;
    res.set_content(nlohmann::json({{"error", fmt::format("{} {}: {}", req.method, req.path,
                                                          res.status == 404 ? "no such endpoint" : fmt::format("HTTP {}", res.status))}})
                        .dump(),
                    "application/json");
  });
  return svr;
}

Result<HttpReply> AgentClient::Do(const std::string& method, const std::string& path, const std::string& body,
                                  std::chrono::milliseconds timeout) const {
  std::unique_ptr<httplib::ClientImpl> cli;
  if (tls_.empty()) {
    cli = std::make_unique<httplib::ClientImpl>(host_, port_);
  } else {
    auto ssl = std::make_unique<httplib::SSLClient>(host_, port_);
    if (auto c = net::ConfigureContext(ssl->ssl_context(), tls_); !c) return std::unexpected(c.error().WithContext("agent client"));
    ssl->set_ca_cert_path(tls_.ca.c_str());
    ssl->enable_server_certificate_verification(true);
    cli = std::move(ssl);
  }
  const auto us = std::chrono::duration_cast<std::chrono::microseconds>(timeout).count();
  cli->set_connection_timeout(us / 1000000, us % 1000000);
  cli->set_read_timeout(us / 1000000, us % 1000000);
  cli->set_write_timeout(us / 1000000, us % 1000000);
  auto send = [&]() -> httplib::Result {
    if (method == "GET") return cli->Get(path.c_str());
    if (method == "POST") return cli->Post(path.c_str(), body, "application/json");
    if (method == "PUT") return cli->Put(path.c_str(), body, "application/json");
    return cli->Delete(path.c_str());
  };
  if (method != "GET" && method != "POST" && method != "PUT" && method != "DELETE")
    return Errorf(ErrorCode::kInvalidArgument, "method {}", method);
  httplib::Result r = send();
  if (!r) {
    std::string why = httplib::to_string(r.error());
    if (!tls_.empty()) why += fmt::format(" (TLS: {})", net::OpenSslErrors());
    return Errorf(ErrorCode::kIo, "{} {}:{}{}: {}", method, host_, port_, path, why);
  }
  return HttpReply{r->status, r->body, r->get_header_value("Content-Type")};
}

}  // namespace ferry::agent
