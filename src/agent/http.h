// ferry-agent's HTTP side: the server that exposes an Agent (plain HTTP for --insecure, else
// HTTPS with mutual TLS under net/tls.h's policy: TLS 1.3, a client certificate that chains to
// the CA is required), and a client for it (tests, the controller) that presents its certificate
// and checks the agent's against the CA and the host it dialled.
//
// Threads: the server runs its handlers on httplib's worker threads; an AgentClient is used by
// one thread at a time. A process using AgentClient with TLS must ignore SIGPIPE: httplib writes
// TLS records with write(2), and a server that refuses the handshake closes the connection under it.
#pragma once

#include <memory>
#include <string>

#include "agent/agent.h"
#include "agent/vmm_process.h"
#include "common/error.h"
#include "net/tls.h"

namespace httplib { class Server; }

namespace ferry::agent {

// An empty server: plain HTTP (tls empty) or HTTPS with mutual TLS under net/tls.h's policy;
// 10 s read/write timeouts, bodies up to 1 MiB. (The controller's API uses it too.)
Result<std::unique_ptr<httplib::Server>> NewServer(const net::TlsFiles& tls);
// The server with every route of docs/agent.md. tls empty: plain HTTP.
Result<std::unique_ptr<httplib::Server>> MakeServer(Agent& agent, const net::TlsFiles& tls);

class AgentClient {
 public:
  // tls empty: plain HTTP.
  AgentClient(std::string host, int port, net::TlsFiles tls = {}) : host_(std::move(host)), port_(port), tls_(std::move(tls)) {}
  // kIo when no answer came (refused, handshake failed, timeout); any HTTP status otherwise.
  Result<HttpReply> Do(const std::string& method, const std::string& path, const std::string& body = "",
                       std::chrono::milliseconds timeout = std::chrono::seconds(30)) const;

 private:
  std::string host_;
  int port_;
  net::TlsFiles tls_;
};

}  // namespace ferry::agent
