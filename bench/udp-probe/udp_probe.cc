// ferry-udp-probe: measures service downtime from outside a guest.
//
// Sends numbered UDP datagrams ("ferry-probe N") to an echo server at a fixed rate (default
// 1 kHz) and records when replies arrive. Service downtime is the longest gap between two
// consecutive replies. Runs until --duration elapses or SIGINT/SIGTERM; then it stops sending
// and keeps receiving for up to --drain seconds (or until every probe was answered), so the
// replies still in flight at the end are not counted as lost. Prints one JSON line:
//   sent, received (distinct probes answered), lost (sent - received), duplicates,
//   max_gap_ms (longest silence between replies while sending, including a trailing one),
//   max_gap_start_s, first_reply_s, rtt_ms {p50, p99, max} (per answered probe),
//   duration_s (sending time), rate_hz, target, start_mono_s (CLOCK_MONOTONIC at the start),
//   last_reply_mono_s (the last reply while sending, -1 if none) and end_mono_s (sending ended), and
//   gaps: every silence longer than --gap-list-ms as [start_mono_s, end_mono_s] (the reply before
//   and the reply after it, or the end of sending; CLOCK_MONOTONIC seconds, comparable with other
//   processes' clocks).
// Run it inside a namespace with `ip netns exec NS ferry-udp-probe ...`.
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
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include <CLI/CLI.hpp>
#include <fmt/format.h>

namespace {
std::atomic<bool> g_stop{false};
extern "C" void OnSignal(int) { g_stop.store(true); }
double Now() { return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count(); }
constexpr char kPrefix[] = "ferry-probe ";

// The probe number of a reply, or -1 if it is not one of ours.
long long ProbeNumber(const char* r, ssize_t n) {
  const size_t plen = sizeof kPrefix - 1;
  if (n <= static_cast<ssize_t>(plen) || n >= 63 || std::memcmp(r, kPrefix, plen) != 0) return -1;
  std::string digits(r + plen, static_cast<size_t>(n) - plen);
  char* end = nullptr;
  long long v = std::strtoll(digits.c_str(), &end, 10);
  return end && *end == '\0' && v >= 0 ? v : -1;
}

double Percentile(std::vector<double> v, double p) {
  if (v.empty()) return -1;
  std::sort(v.begin(), v.end());
  return v[static_cast<size_t>(p * static_cast<double>(v.size() - 1) + 0.5)];
}
}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"ferry-udp-probe: UDP echo client measuring the longest gap between replies"};
  std::string target;
  double rate = 1000, duration = 0, drain = 1.0, gap_list_ms = 50;
  app.add_option("--to", target, "echo server IP:PORT")->required();
  app.add_option("--rate", rate, "datagrams per second")->check(CLI::Range(1.0, 100000.0));
  app.add_option("--duration", duration, "seconds (0: until SIGINT/SIGTERM)")->check(CLI::Range(0.0, 86400.0));
  app.add_option("--drain", drain, "seconds to wait for late replies after the last probe")->check(CLI::Range(0.0, 60.0));
  app.add_option("--gap-list-ms", gap_list_ms, "list every silence longer than this")->check(CLI::Range(0.1, 1e6));
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
  uint64_t sent = 0, received = 0, duplicates = 0;
  std::vector<double> sent_at;      // send time of probe N
  std::vector<bool> answered;       // probe N was answered
  std::vector<double> rtts;       // ms
  std::string gaps;               // JSON array body
  char buf[64];
  auto receive_all = [&](bool sending) {
    char r[64];
    for (;;) {
      ssize_t n = recv(fd, r, sizeof r, MSG_DONTWAIT);
      if (n < 0 && errno == ECONNREFUSED) continue;  // ICMP port unreachable: nothing listened yet
      if (n <= 0) break;
      const double t = Now();
      const long long k = ProbeNumber(r, n);
      if (k < 0 || static_cast<uint64_t>(k) >= sent) continue;
      if (answered[static_cast<size_t>(k)]) { ++duplicates; continue; }
      answered[static_cast<size_t>(k)] = true;
      rtts.push_back((t - sent_at[static_cast<size_t>(k)]) * 1000);
      ++received;
      if (!sending) continue;  // late replies after the end count as answered, not for the gap
      if (last_reply >= 0 && (t - last_reply) * 1000 > gap_list_ms)
        gaps += fmt::format("{}[{:.6f},{:.6f}]", gaps.empty() ? "" : ",", last_reply, t);
      if (last_reply >= 0 && t - last_reply > max_gap) {
        max_gap = t - last_reply;
        max_gap_at = last_reply - start;
      }
      if (first_reply < 0) first_reply = t;
      last_reply = t;
    }
  };
  while (!g_stop.load() && (duration <= 0 || Now() - start < duration)) {
    double now = Now();
    if (now >= next_send) {
      int n = std::snprintf(buf, sizeof buf, "%s%llu", kPrefix, static_cast<unsigned long long>(sent));
      sent_at.push_back(Now());
      answered.push_back(false);
      ++sent;
      // ECONNREFUSED (ICMP port unreachable) while nothing listens is part of the gap.
      (void)send(fd, buf, static_cast<size_t>(n), MSG_DONTWAIT);
      next_send += interval;
      if (next_send < now - 1.0) next_send = now;  // we were descheduled: do not burst
    }
    pollfd p{fd, POLLIN, 0};
    const double wait_s = std::clamp(next_send - Now(), 0.0, 0.1);
    timespec ts{0, static_cast<long>(wait_s * 1e9)};
    if (ppoll(&p, 1, &ts, nullptr) > 0) receive_all(true);
  }
  const double end = Now();
  // A trailing silence counts too (the service never came back before the end).
  if (last_reply >= 0 && end - last_reply > max_gap) {
    max_gap = end - last_reply;
    max_gap_at = last_reply - start;
  }
  if (last_reply >= 0 && (end - last_reply) * 1000 > gap_list_ms)
    gaps += fmt::format("{}[{:.6f},{:.6f}]", gaps.empty() ? "" : ",", last_reply, end);
  // Drain: replies to the last probes are still in flight.
  g_stop.store(false);
  for (const double until = Now() + drain; received < sent && Now() < until && !g_stop.load();) {
    pollfd p{fd, POLLIN, 0};
    timespec ts{0, 10'000'000};
    if (ppoll(&p, 1, &ts, nullptr) > 0) receive_all(false);
  }
  std::printf("%s\n",
              fmt::format(R"({{"target":"{}","rate_hz":{},"duration_s":{:.3f},"sent":{},"received":{},"lost":{},"duplicates":{},"max_gap_ms":{:.3f},"max_gap_start_s":{:.3f},"first_reply_s":{:.3f},"rtt_ms":{{"p50":{:.3f},"p99":{:.3f},"max":{:.3f}}},"start_mono_s":{:.6f},"last_reply_mono_s":{:.6f},"end_mono_s":{:.6f},"gaps":[{}]}})",
                          target, rate, end - start, sent, received, sent - received, duplicates,
                          last_reply < 0 ? (end - start) * 1000 : max_gap * 1000, max_gap_at,
                          first_reply < 0 ? -1.0 : first_reply - start, Percentile(rtts, 0.5), Percentile(rtts, 0.99),
                          rtts.empty() ? -1.0 : *std::max_element(rtts.begin(), rtts.end()), start, last_reply, end, gaps)
                  .c_str());
  std::fflush(stdout);
  close(fd);
  return 0;
}
