// The flags every Ferry HTTP(S) server takes - ferry-agent's and ferry-controller's: --listen,
// --tls-cert/--tls-key/--tls-ca (mutual TLS) or --insecure (plain HTTP, loopback only unless
// --allow-insecure-remote) - defined once, with their check. Single-threaded (startup).
#pragma once

#include <string>

#include <CLI/CLI.hpp>

#include "agent/agent.h"
#include "net/tls.h"

namespace ferry::agent {

struct ServerFlags {
  std::string listen;
  net::TlsFiles tls;
  bool insecure = false;
  bool allow_insecure_remote = false;
};

// `who` names the server in the help ("agent", "controller").
void AddServerFlags(CLI::App& app, ServerFlags* f, const std::string& who);
// --listen parsed and the security rules applied (ParseListen, CheckSecurity).
Result<ListenAddress> CheckServerFlags(const ServerFlags& f);

}  // namespace ferry::agent
