// ferry-wanem: user-space WAN link between two network namespaces (test tool).
//   ferry-wanem --ns-a A --ns-b B --addr-a 10.77.0.1/24 --addr-b 10.77.0.2/24
//               --delay-ms 50 --jitter-ms 1 --rate-mbit 500 --loss 0.001
// Runs until SIGINT/SIGTERM, then prints per-direction stats as JSON on stdout.
#include <CLI/CLI.hpp>
#include <csignal>
#include <thread>

#include "wanem/wanem.h"

int main(int argc, char** argv) {
  using namespace ferry::wanem;
  CLI::App app{"ferry-wanem: user-space WAN link emulator (TAP <-> TAP)"};
  Options o;
  bool no_gso = false;
  double queue_kib = 0;
  app.add_option("--ns-a", o.ns_a, "network namespace of side A (ip netns name)");
  app.add_option("--ns-b", o.ns_b, "network namespace of side B");
  app.add_option("--dev-a", o.dev_a, "TAP name on side A");
  app.add_option("--dev-b", o.dev_b, "TAP name on side B");
  app.add_option("--addr-a", o.addr_a, "address/prefix for the side A TAP");
  app.add_option("--addr-b", o.addr_b, "address/prefix for the side B TAP");
  app.add_option("--mtu", o.mtu, "MTU")->check(CLI::Range(576, 9000));
  app.add_option("--delay-ms", o.link.delay_ms, "one-way delay per direction");
  app.add_option("--jitter-ms", o.link.jitter_ms, "uniform jitter (no reordering)");
  app.add_option("--rate-mbit", o.link.rate_mbit, "link rate per direction, 0 = unlimited");
  app.add_option("--loss", o.link.loss, "random loss probability per packet (0.001 = 0.1%)");
  app.add_option("--queue-kib", queue_kib, "bottleneck queue (0 = max(1 MiB, 2 BDP))");
  app.add_option("--seed", o.seed, "random seed");
  app.add_flag("--no-gso", no_gso, "disable TSO/GSO super-frames on the TAPs");
  CLI11_PARSE(app, argc, argv);
  o.gso = !no_gso;
  o.link.queue_bytes = static_cast<size_t>(queue_kib * 1024);
  sigset_t set;
  sigemptyset(&set);
  sigaddset(&set, SIGINT);
  sigaddset(&set, SIGTERM);
  pthread_sigmask(SIG_BLOCK, &set, nullptr);
  auto e = Emulator::Create(o);
  if (!e) {
    fmt::print(stderr, "error: {}\n", e.error().ToString());
    return 1;
  }
  std::thread sig([&] {
    int s;
    sigwait(&set, &s);
    (*e)->Stop();
  });
  fmt::print(stderr, "ferry-wanem: ready\n");
  auto st = (*e)->Run();
  sig.detach();
  fmt::print("{}\n", (*e)->StatsJson());
  if (!st) {
    fmt::print(stderr, "error: {}\n", st.error().ToString());
    return 1;
  }
  return 0;
}
