// Helpers for the migration integration tests: ports, the `ferry` CLI, the UDP probe.
#pragma once

#include <arpa/inet.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>

#include <chrono>
#include <fstream>
#include <sstream>
#include <string>
#include <thread>

#include <nlohmann/json.hpp>

#include "vm_process.h"

namespace ferry::test {

// A TCP port that was free a moment ago on 127.0.0.1.
inline int FreePort() {
  int fd = socket(AF_INET, SOCK_STREAM, 0);
  sockaddr_in a{};
  a.sin_family = AF_INET;
  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  socklen_t len = sizeof a;
  if (bind(fd, reinterpret_cast<sockaddr*>(&a), sizeof a) != 0 || getsockname(fd, reinterpret_cast<sockaddr*>(&a), &len) != 0) {
    close(fd);
    return 0;
  }
  close(fd);
  return ntohs(a.sin_port);
}

struct CliResult {
  int rc = -1;
  std::string out;
  nlohmann::json json;  // parsed stdout (null if not JSON)
};

// Runs `ferry ARGS` (optionally inside a namespace); stdout JSON is parsed when present.
inline CliResult Ferry(const std::string& args, const std::string& netns = "") {
  CliResult r;
  const std::string out_file = "/tmp/ferry-cli-" + std::to_string(getpid()) + ".out";
  std::string prefix = netns.empty() ? "" : "ip netns exec " + netns + " ";
  std::string err;
  r.rc = Sh(prefix + BuildDir() + "/bin/ferry " + args + " > " + out_file, &err);
  std::ifstream f(out_file);
  std::stringstream ss;
  ss << f.rdbuf();
  r.out = ss.str() + err;
  r.json = nlohmann::json::parse(ss.str(), nullptr, false);
  if (r.json.is_discarded()) r.json = nullptr;
  unlink(out_file.c_str());
  return r;
}

// Polls GET /vm/migration until `status` (or a final status) is reported.
inline std::string WaitMigrationStatus(VmProcess& vm, const std::string& status, std::chrono::milliseconds timeout) {
  auto end = std::chrono::steady_clock::now() + timeout;
  std::string last;
  while (std::chrono::steady_clock::now() < end) {
    auto j = vm.Get("/vm/migration");
    if (j.is_object()) {
      last = j.value("status", "");
      if (last == status || last == "completed" || last == "failed" || last == "cancelled" || last == "failed-unknown")
        return last;
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(5));
  }
  return last;
}

// Asks the guest to verify every memdirty page now.
inline bool MemverifyOk(VmProcess& vm, int pages, std::chrono::milliseconds timeout = std::chrono::seconds(60)) {
  size_t at = vm.ConsoleSize();
  vm.SendConsole("memverify");
  return vm.WaitConsole("memverify ok pages=" + std::to_string(pages), timeout, at);
}

// ferry-udp-probe running in the background inside a namespace (1 kHz UDP echo client).
class UdpProbe {
 public:
  UdpProbe(const std::string& netns, const std::string& target, const std::string& dir)
      : out_(dir + "/probe" + std::to_string(++counter_) + ".json") {
    std::string pid;
    Sh("ip netns exec " + netns + " " + BuildDir() + "/bin/ferry-udp-probe --to " + target + " > " + out_ +
           " 2>&1 & echo $!",
       &pid);
    pid_ = std::atoi(pid.c_str());
  }
  ~UdpProbe() { (void)Stop(); }
  // Stops the probe and returns its JSON report (null if it failed).
  nlohmann::json Stop() {
    if (pid_ > 0) {
      Sh("kill -INT " + std::to_string(pid_) + "; for i in $(seq 50); do kill -0 " + std::to_string(pid_) +
         " 2>/dev/null || break; sleep 0.1; done");
      pid_ = 0;
    }
    std::ifstream f(out_);
    std::string line;
    std::getline(f, line);
    auto j = nlohmann::json::parse(line, nullptr, false);
    return j.is_discarded() ? nlohmann::json(nullptr) : j;
  }

 private:
  static inline int counter_ = 0;
  std::string out_;
  int pid_ = 0;
};

}  // namespace ferry::test
