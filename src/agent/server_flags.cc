#include "agent/server_flags.h"

namespace ferry::agent {

void AddServerFlags(CLI::App& app, ServerFlags* f, const std::string& who) {
  app.add_option("--listen", f->listen, "HOST:PORT to serve the " + who + "'s API on")->required();
  app.add_option("--tls-cert", f->tls.cert, "this " + who + "'s certificate (PEM): its server, and its client to its peers");
  app.add_option("--tls-key", f->tls.key, "the certificate's private key (PEM)");
  app.add_option("--tls-ca", f->tls.ca, "the CA every client and peer must chain to (PEM)");
  app.add_flag("--insecure", f->insecure, "plain HTTP without authentication (loopback only unless --allow-insecure-remote)");
  app.add_flag("--allow-insecure-remote", f->allow_insecure_remote, "with --insecure: allow a non-loopback --listen address");
}

Result<ListenAddress> CheckServerFlags(const ServerFlags& f) {
  auto addr = ParseListen(f.listen);
  if (!addr) return std::unexpected(addr.error());
  if (auto s = CheckSecurity(*addr, f.insecure, f.allow_insecure_remote, f.tls); !s) return std::unexpected(s.error());
  return addr;
}

}  // namespace ferry::agent
