// ferry-controller: the cluster's inventory, monitoring, hotspot detection and load-balancing
// migrations over the hosts' ferry-agents (docs/api.md). Thin main: flags, checks, the server.
#include <signal.h>

#include <cstdio>

#include <CLI/CLI.hpp>
#include <httplib.h>
#include <spdlog/sinks/stdout_color_sinks.h>
#include <spdlog/spdlog.h>

#include "agent/server_flags.h"
#include "controller/api.h"
#include "controller/controller.h"

namespace {

httplib::Server* g_server = nullptr;

void OnSignal(int) {
  if (g_server) g_server->stop();
}

}  // namespace

int main(int argc, char** argv) {
  spdlog::set_default_logger(spdlog::stderr_color_mt("ferry-controller"));
  CLI::App app{"ferry-controller: watches the hosts' ferry-agents and moves VMs to keep the cluster balanced (docs/api.md)"};
  std::string store;
  ferry::agent::ServerFlags flags;
  ferry::controller::ControllerOptions opt;
  double sustain_s = 10, cooldown_s = 600;
  ferry::agent::AddServerFlags(app, &flags, "controller");
  app.add_option("--store", store, "sqlite:PATH (one controller) or etcd:URL[,URL...] (several, one leads)")->required();
  app.add_option("--id", opt.id, "this controller's name in the leader lease (default: hostname:pid)");
  app.add_option("--tick-ms", opt.tick_ms, "monitoring period")->check(CLI::Range(100, 60000))->capture_default_str();
  app.add_option("--cpu-threshold", opt.planner.cpu_threshold, "host CPU hotspot: busy CPUs over declared")
      ->check(CLI::Range(0.05, 1.0))->capture_default_str();
  app.add_option("--net-threshold", opt.planner.net_threshold, "host network hotspot: bytes/s over declared")
      ->check(CLI::Range(0.05, 1.0))->capture_default_str();
  app.add_option("--sustain-s", sustain_s, "how long a hotspot must hold")->check(CLI::Range(0.0, 3600.0))->capture_default_str();
  app.add_option("--hysteresis", opt.planner.hysteresis, "least drop of the pair's peak load for a move")
      ->check(CLI::Range(0.0, 1.0))->capture_default_str();
  app.add_option("--cooldown-s", cooldown_s, "a moved VM stays put this long")->check(CLI::Range(0.0, 86400.0))->capture_default_str();
  app.add_option("--max-per-host", opt.planner.max_per_host, "migrations in or out of one host at once")
      ->check(CLI::Range(1, 64))->capture_default_str();
  app.add_option("--max-migrations", opt.planner.max_in_cluster, "migrations at once in the cluster")
      ->check(CLI::Range(1, 10000))->capture_default_str();
  CLI11_PARSE(app, argc, argv);
  opt.planner.sustain_ns = static_cast<uint64_t>(sustain_s * 1e9);
  opt.planner.vm_cooldown_ns = static_cast<uint64_t>(cooldown_s * 1e9);
  opt.tls = flags.tls;
  const std::string& listen = flags.listen;
  const ferry::net::TlsFiles& tls = flags.tls;

  auto fail = [](const ferry::Error& e) {
    std::fprintf(stderr, "ferry-controller: %s\n", e.message().c_str());
    return 2;
  };
  auto addr = ferry::agent::CheckServerFlags(flags);
  if (!addr) return fail(addr.error());
  auto kv = ferry::controller::OpenKvStore(store);
  if (!kv) return fail(kv.error());
  ferry::controller::Controller controller(std::make_unique<ferry::controller::ClusterStore>(std::move(*kv)), opt);
  auto server = ferry::controller::MakeApiServer(controller, tls);
  if (!server) return fail(server.error());
  signal(SIGPIPE, SIG_IGN);
  if (!(*server)->bind_to_port(addr->host, addr->port)) {
    std::fprintf(stderr, "ferry-controller: cannot listen on %s\n", listen.c_str());
    return 1;
  }
  controller.Start();
  g_server = server->get();
  struct sigaction sa {};
  sa.sa_handler = OnSignal;
  sigaction(SIGTERM, &sa, nullptr);
  sigaction(SIGINT, &sa, nullptr);
  spdlog::info("ferry-controller listening on {} ({}), store {}", listen, tls.empty() ? "plain HTTP" : "mutual TLS", store);
  (*server)->listen_after_bind();
  g_server = nullptr;
  controller.Stop();
  spdlog::info("ferry-controller stopped");
  return 0;
}
