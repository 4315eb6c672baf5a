#include "controller/testing/etcd_process.h"

#include <fcntl.h>
#include <netinet/in.h>
#include <signal.h>
#include <stdlib.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <thread>
#include <vector>

#include <httplib.h>

namespace ferry::controller::testing {

namespace {

int FreePort() {
  const int fd = socket(AF_INET, SOCK_STREAM, 0);
  sockaddr_in a{};
  a.sin_family = AF_INET;
  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  bind(fd, reinterpret_cast<sockaddr*>(&a), sizeof a);
  socklen_t len = sizeof a;
  getsockname(fd, reinterpret_cast<sockaddr*>(&a), &len);
  close(fd);
  return ntohs(a.sin_port);
}

}  // namespace

EtcdProcess::EtcdProcess() {
  char tmpl[] = "/tmp/ferry-etcd-XXXXXX";
  if (mkdtemp(tmpl)) dir_ = tmpl;
}

EtcdProcess::~EtcdProcess() {
  Kill();
  if (!dir_.empty()) std::filesystem::remove_all(dir_);
}

bool EtcdProcess::Start() {
  if (dir_.empty()) {
    why_ = "no temporary directory";
    return false;
  }
  const std::string client = "http://127.0.0.1:" + std::to_string(FreePort());
  const std::string peer = "http://127.0.0.1:" + std::to_string(FreePort());
  url_ = client;
  const std::vector<std::string> args = {"/usr/bin/etcd", "--name", "ferry-test", "--data-dir", dir_ + "/data",
                                         "--listen-client-urls", client, "--advertise-client-urls", client,
                                         "--listen-peer-urls", peer, "--initial-advertise-peer-urls", peer,
                                         "--initial-cluster", "ferry-test=" + peer, "--log-level", "error"};
  if (access(args[0].c_str(), X_OK) != 0) {
    why_ = "/usr/bin/etcd is missing: scripts/setup installs etcd-server";
    return false;
  }
  const std::string log = dir_ + "/etcd.log";
  pid_ = fork();
  if (pid_ == 0) {
    const int fd = open(log.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
    dup2(fd, 1);
    dup2(fd, 2);
    std::vector<char*> argv;
    for (const auto& a : args) argv.push_back(const_cast<char*>(a.c_str()));
    argv.push_back(nullptr);
    execv(argv[0], argv.data());
    _exit(127);
  }
  const int port = std::stoi(client.substr(client.rfind(':') + 1));
  for (int i = 0; i < 200; ++i) {
    httplib::Client cli("127.0.0.1", port);
    cli.set_connection_timeout(0, 200000);
    if (auto r = cli.Get("/version"); r && r->status == 200) return true;
    if (waitpid(pid_, nullptr, WNOHANG) == pid_) {
      pid_ = -1;
      break;
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(100));
  }
  std::ifstream f(log);
  std::stringstream ss;
  ss << f.rdbuf();
  why_ = "etcd did not answer: " + ss.str().substr(0, 2000);
  Kill();
  return false;
}

void EtcdProcess::Kill() {
  if (pid_ <= 0) return;
  kill(pid_, SIGKILL);
  waitpid(pid_, nullptr, 0);
  pid_ = -1;
}

}  // namespace ferry::controller::testing
