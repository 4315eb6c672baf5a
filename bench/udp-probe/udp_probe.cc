// ferry-udp-probe: measures service downtime from outside a guest.
//
// Sends numbered UDP datagrams to an echo server at a fixed rate (default 1 kHz) and
// records when replies arrive. Service downtime is the longest gap between two
// consecutive replies. Runs until --duration elapses or SIGINT/SIGTERM, then prints one
// JSON line: {"sent", "received", "lost", "max_gap_ms", "max_gap_start_s", "duration_s",
// "rate_hz", "target"}. Run it inside a namespace with `ip netns exec NS ferry-udp-probe ...`.
#include <arpa/inet.h>
#include <netinet/in.h>
#include <poll.h>
#include <signal.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <string>

#include <CLI/CLI.hpp>
#include <fmt/format.h>

namespace {
std::atomic<bool> g_stop{false};
extern "C" void OnSignal(int) { g_stop.store(true); }
double Now() { return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count(); }
}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"ferry-udp-probe: UDP echo client measuring the longest gap between replies"};
  std::string target;
  double rate = 1000, duration = 0;
  app.add_option("--to", target, "echo server IP:PORT")->required();
  app.add_option("--rate", rate, "datagrams per second")->check(CLI::Range(1.0, 100000.0));
  app.add_option("--duration", duration, "seconds (0: until SIGINT/SIGTERM)")->check(CLI::Range(0.0, 86400.0));
  CLI11_PARSE(app, argc, argv);

  auto colon = target.rfind(':');
  sockaddr_in sa{};
  sa.sin_family = AF_INET;
  int port = colon == std::string::npos ? 0 : std::atoi(target.c_str() + colon + 1);
  if (colon == std::string::npos || port <= 0 || port > 65535 ||
      inet_pton(AF_INET, target.substr(0, colon).c_str(), &sa.sin_addr) != 1) {
    std::fprintf(stderr, "ferry-udp-probe: --to must be IPv4:PORT, got \"%s\"\n", target.c_str());
    return 2;
  }
  sa.sin_port = htons(static_cast<uint16_t>(port));
  int fd = socket(AF_INET, SOCK_DGRAM | SOCK_CLOEXEC, 0);
  if (fd < 0 || connect(fd, reinterpret_cast<sockaddr*>(&sa), sizeof sa) != 0) {
    std::fprintf(stderr, "ferry-udp-probe: socket: %s\n", std::strerror(errno));
    return 1;
  }
  struct sigaction act = {};
  act.sa_handler = OnSignal;
  sigaction(SIGINT, &act, nullptr);
  sigaction(SIGTERM, &act, nullptr);

  const double interval = 1.0 / rate, start = Now();
  double next_send = start, last_reply = -1, max_gap = 0, max_gap_at = 0, first_reply = -1;
  uint64_t sent = 0, received = 0;
  char buf[64];
  while (!g_stop.load() && (duration <= 0 || Now() - start < duration)) {
    double now = Now();
    if (now >= next_send) {
      int n = std::snprintf(buf, sizeof buf, "ferry-probe %llu", static_cast<unsigned long long>(sent));
      // ECONNREFUSED (ICMP port unreachable) while nothing listens is part of the gap.
      (void)send(fd, buf, static_cast<size_t>(n), MSG_DONTWAIT);
      ++sent;
      next_send += interval;
      if (next_send < now - 1.0) next_send = now;  // we were descheduled: do not burst
    }
    pollfd p{fd, POLLIN, 0};
    const double wait_s = std::clamp(next_send - Now(), 0.0, 0.1);
    timespec ts{0, static_cast<long>(wait_s * 1e9)};
    if (ppoll(&p, 1, &ts, nullptr) > 0) {
      char r[64];
      while (recv(fd, r, sizeof r, MSG_DONTWAIT) > 0) {
        double t = Now();
        if (last_reply >= 0 && t - last_reply > max_gap) {
          max_gap = t - last_reply;
          max_gap_at = last_reply - start;
        }
        if (first_reply < 0) first_reply = t;
        last_reply = t;
        ++received;
      }
    }
  }
  const double end = Now();
  // A trailing silence counts too (the service never came back before the end).
  if (last_reply >= 0 && end - last_reply > max_gap) {
    max_gap = end - last_reply;
    max_gap_at = last_reply - start;
  }
  std::printf("%s\n", fmt::format(R"({{"target":"{}","rate_hz":{},"duration_s":{:.3f},"sent":{},"received":{},"lost":{},"max_gap_ms":{:.3f},"max_gap_start_s":{:.3f},"first_reply_s":{:.3f}}})",
                                  target, rate, end - start, sent, received, sent > received ? sent - received : 0,
                                  last_reply < 0 ? (end - start) * 1000 : max_gap * 1000, max_gap_at,
                                  first_reply < 0 ? -1.0 : first_reply - start)
                          .c_str());
  std::fflush(stdout);
  close(fd);
  return 0;
}
