// ferry-agent: one per host; starts, watches and migrates this host's ferry-vmm processes and
// serves their API over HTTP+JSON (docs/agent.md). Thin main: flags, checks, the server.
#include <signal.h>
#include <unistd.h>

#include <climits>
#include <cstdio>
#include <filesystem>
#include <thread>

#include <CLI/CLI.hpp>
#include <httplib.h>
#include <spdlog/sinks/stdout_color_sinks.h>
#include <spdlog/spdlog.h>

#include "agent/agent.h"
#include "agent/http.h"
#include "agent/server_flags.h"

namespace {

httplib::Server* g_server = nullptr;

void OnSignal(int) {
  if (g_server) g_server->stop();
}

std::string SelfDir() {
  char buf[PATH_MAX];
  const ssize_t n = readlink("/proc/self/exe", buf, sizeof buf - 1);
  if (n <= 0) return ".";
  return std::filesystem::path(std::string(buf, static_cast<size_t>(n))).parent_path().string();
}

}  // namespace

int main(int argc, char** argv) {
  spdlog::set_default_logger(spdlog::stderr_color_mt("ferry-agent"));
  CLI::App app{"ferry-agent: runs this host's ferry-vmm processes for the cluster controller (docs/agent.md)"};
  std::string name, state_dir, capacity;
  ferry::agent::ServerFlags flags;
  int sample_ms = 1000;
  ferry::agent::AddServerFlags(app, &flags, "agent");
  app.add_option("--name", name, "this host's name in the cluster")->required();
  app.add_option("--state-dir", state_dir, "where the agent keeps its VMs (DIR/vms/NAME)")->required();
  app.add_option("--capacity", capacity, "declared capacity: cpus=N,mem=SIZE[,net=RATE] (RATE: 125M bytes/s or 1Gbit)")->required();
  app.add_option("--sample-ms", sample_ms, "how often usage is measured")->check(CLI::Range(100, 60000))->capture_default_str();
  std::string cpu_usage = "host";
  app.add_option("--cpu-usage", cpu_usage,
                 "the host's CPU use: host (/proc/stat, every process) or vms (the sum of this agent's VMs: several agents on one machine)")
      ->check(CLI::IsMember({"host", "vms"}))
      ->capture_default_str();
  CLI11_PARSE(app, argc, argv);

  auto fail = [](const ferry::Error& e) {
    std::fprintf(stderr, "ferry-agent: %s\n", e.message().c_str());
    return 2;
  };
  auto addr = ferry::agent::CheckServerFlags(flags);
  if (!addr) return fail(addr.error());
  const std::string& listen = flags.listen;
  const ferry::net::TlsFiles& tls = flags.tls;
  if (auto s = ferry::agent::CheckVmName(name); !s) return fail(s.error().WithContext("--name"));
  auto cap = ferry::agent::ParseCapacity(capacity);
  if (!cap) return fail(cap.error());

  ferry::agent::AgentConfig cfg;
  cfg.name = name;
  cfg.state_dir = state_dir;
  cfg.listen_host = addr->host;
  cfg.capacity = *cap;
  cfg.tls = tls;
  cfg.vmm_path = SelfDir() + "/ferry-vmm";
  cfg.sample_period = std::chrono::milliseconds(sample_ms);
  cfg.cpu_from_vms = cpu_usage == "vms";
  if (access(cfg.vmm_path.c_str(), X_OK) != 0) {
    std::fprintf(stderr, "ferry-agent: %s is missing (ferry-vmm must sit next to ferry-agent)\n", cfg.vmm_path.c_str());
    return 2;
  }
  auto agent = ferry::agent::Agent::Create(cfg);
  if (!agent) return fail(agent.error());
  auto server = ferry::agent::MakeServer(**agent, tls);
  if (!server) return fail(server.error());
  signal(SIGPIPE, SIG_IGN);  // a client that goes away mid-reply is an error of that request
  if (!(*server)->bind_to_port(addr->host, addr->port)) {
    std::fprintf(stderr, "ferry-agent: cannot listen on %s\n", listen.c_str());
    return 1;
  }
  (*agent)->StartMonitor();
  g_server = server->get();
  struct sigaction sa {};
  sa.sa_handler = OnSignal;
  sigaction(SIGTERM, &sa, nullptr);
  sigaction(SIGINT, &sa, nullptr);
  spdlog::info("ferry-agent {} listening on {} ({})", name, listen, tls.empty() ? "plain HTTP" : "mutual TLS");
  (*server)->listen_after_bind();
  g_server = nullptr;
  (*agent)->Stop();
  spdlog::info("ferry-agent {} stopped; its VMs keep running", name);
  return 0;
}
