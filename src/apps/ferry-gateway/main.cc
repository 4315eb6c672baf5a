// ferry-gateway serve|forward — see src/gateway/gateway.h and docs/gateway.md.
#include <CLI/CLI.hpp>
#include <csignal>
#include <spdlog/spdlog.h>

#include "gateway/gateway.h"

int main(int argc, char** argv) {
  using namespace ferry::gateway;
  CLI::App app{"ferry-gateway: WAN accelerator pair for migration streams"};
  app.require_subcommand(1);
  GatewayOptions o;
  std::string codec = "none";
  size_t window_mib = 64, chunk_kib = 256;
  std::string log_level = "info";
  auto common = [&](CLI::App* c) {
    c->add_option("--listen", o.listen, "ADDR:PORT to listen on")->required();
    c->add_option("--cert", o.tls.cert, "certificate (PEM)");
    c->add_option("--key", o.tls.key, "private key (PEM)");
    c->add_option("--ca", o.tls.ca, "CA certificate that signs the peer (PEM)");
    c->add_flag("--insecure", o.insecure, "no TLS (benchmarks only)");
    c->add_option("--compress", codec, "per-chunk compression: none|lz4|zstd");
    c->add_option("--window-mib", window_mib, "max unacknowledged MiB per direction per session");
    c->add_option("--chunk-kib", chunk_kib, "chunk size in KiB");
    c->add_option("--metrics", o.metrics, "HTTP /metrics and /status on ADDR:PORT or unix:/path");
    c->add_option("--max-rate-mbit", o.max_rate_mbit, "WAN link rate; data connections are paced to share it");
    c->add_option("--log-level", log_level, "trace|debug|info|warn|error");
  };
  auto* serve = app.add_subcommand("serve", "destination side: accept gateway sessions");
  common(serve);
  std::vector<std::string> allow_to;
  serve->add_option("--allow-to", allow_to,
                    "destinations a peer gateway may ask for: ADDR, ADDR:PORT, CIDR, CIDR:PORT or * (repeatable; "
                    "default: any, with a warning)");
  auto* fwd = app.add_subcommand("forward", "source side: accept local TCP and tunnel it");
  common(fwd);
  fwd->add_option("--via", o.via, "remote gateway ADDR:PORT")->required();
  fwd->add_option("--to", o.to, "final destination ADDR:PORT (as seen by the remote gateway)");
  fwd->add_flag("--transparent", o.transparent,
                "tunnel each connection to its original destination (connections sent to --listen by a NAT "
                "REDIRECT rule); --to is then the fallback for connections made to --listen directly");
  fwd->add_option("--streams", o.streams, "parallel data connections")->check(CLI::Range(1, 64));
  CLI11_PARSE(app, argc, argv);
  for (const std::string& a : allow_to) {
    auto rule = ParseDestRule(a);
    if (!rule) {
      fmt::print(stderr, "error: {}\n", rule.error().message());
      return 2;
    }
    o.allow_to.push_back(*rule);
  }
  spdlog::set_level(spdlog::level::from_str(log_level));
  o.role = fwd->parsed() ? Role::kForward : Role::kServe;
  auto c = ParseCodec(codec);
  if (!c) {
    fmt::print(stderr, "error: {}\n", c.error().ToString());
    return 2;
  }
  o.codec = *c;
  o.window = window_mib << 20;
  o.chunk = chunk_kib << 10;
  if (o.insecure && (!o.tls.cert.empty() || !o.tls.key.empty() || !o.tls.ca.empty())) {
    fmt::print(stderr, "error: --insecure conflicts with --cert/--key/--ca\n");
    return 2;
  }
  sigset_t set;
  sigemptyset(&set);
  sigaddset(&set, SIGINT);
  sigaddset(&set, SIGTERM);
  pthread_sigmask(SIG_BLOCK, &set, nullptr);
  signal(SIGPIPE, SIG_IGN);
  auto gw = Gateway::Create(o);
  if (!gw) {
    fmt::print(stderr, "error: {}\n", gw.error().ToString());
    return 1;
  }
  int sig = 0;
  sigwait(&set, &sig);
  spdlog::info("signal {}, stopping", sig);
  (*gw)->Stop();
  return 0;
}
