#include "agent/vmm_process.h"

#include <fcntl.h>
#include <linux/close_range.h>
#include <signal.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <filesystem>
#include <thread>

#include <httplib.h>

namespace ferry::agent {
namespace {

bool ReadAll(int fd, void* buf, size_t n) {
  auto* p = static_cast<char*>(buf);
  while (n > 0) {
    const ssize_t r = read(fd, p, n);
    if (r < 0 && errno == EINTR) continue;
    if (r <= 0) return false;
    p += r;
    n -= static_cast<size_t>(r);
  }
  return true;
}

}  // namespace

Result<VmRecord> SpawnVmm(const std::vector<std::string>& argv, const std::string& dir) {
  if (argv.empty()) return Errorf(ErrorCode::kInvalidArgument, "no command");
  std::vector<char*> args;
  for (const auto& a : argv) args.push_back(const_cast<char*>(a.c_str()));
  args.push_back(nullptr);
  const std::string log = dir + "/vmm.log";
  // pid_pipe: the grandchild's pid (from the middle process); err_pipe: errno of a failed exec
  // (closed by a successful one: O_CLOEXEC).
  int pid_pipe[2], err_pipe[2];
  if (pipe2(pid_pipe, O_CLOEXEC) != 0) return ErrnoError("pipe");
  if (pipe2(err_pipe, O_CLOEXEC) != 0) {
    close(pid_pipe[0]);
    close(pid_pipe[1]);
    return ErrnoError("pipe");
  }
  const pid_t mid = fork();
  if (mid < 0) {
    auto e = ErrnoError("fork");
    for (int fd : {pid_pipe[0], pid_pipe[1], err_pipe[0], err_pipe[1]}) close(fd);
    return e;
  }
  if (mid == 0) {
    // Middle process: new session, fork the VMM, report its pid, exit. Only async-signal-safe calls.
    setsid();
    const pid_t vmm = fork();
    if (vmm == 0) {
      signal(SIGPIPE, SIG_DFL);
      sigset_t none;
      sigemptyset(&none);
      sigprocmask(SIG_SETMASK, &none, nullptr);
      int err = 0;
      const int in = open("/dev/null", O_RDONLY);
      const int out = open(log.c_str(), O_WRONLY | O_CREAT | O_APPEND, 0644);
      if (in < 0 || out < 0 || chdir(dir.c_str()) != 0) err = errno;
      if (!err && (dup2(in, 0) < 0 || dup2(out, 1) < 0 || dup2(out, 2) < 0)) err = errno;
      // Every other descriptor of the agent (sockets, files) closes at exec.
      if (!err) syscall(SYS_close_range, 3u, ~0u, CLOSE_RANGE_CLOEXEC);
      if (!err) execv(args[0], args.data());
      if (!err) err = errno;
      (void)!write(err_pipe[1], &err, sizeof err);
      _exit(127);
    }
    const pid_t p = vmm;
    (void)!write(pid_pipe[1], &p, sizeof p);
    _exit(vmm < 0 ? 1 : 0);
  }
  close(pid_pipe[1]);
  close(err_pipe[1]);
  int st = 0;
  while (waitpid(mid, &st, 0) < 0 && errno == EINTR) {
  }
  pid_t vmm = -1;
  const bool have_pid = ReadAll(pid_pipe[0], &vmm, sizeof vmm);
  close(pid_pipe[0]);
  int exec_err = 0;
  const bool exec_failed = ReadAll(err_pipe[0], &exec_err, sizeof exec_err);  // EOF: exec succeeded
  close(err_pipe[0]);
  if (!have_pid || vmm <= 0) return Errorf(ErrorCode::kIo, "could not fork {}", argv[0]);
  if (exec_failed) {
    // It reported before it exited: let it go first (until then it holds copies of our descriptors).
    WaitGone(VmRecord{{}, vmm, ReadPidStat(vmm) ? ReadPidStat(vmm)->start_ticks : 0, ""}, std::chrono::seconds(1));
    return Errorf(ErrorCode::kIo, "cannot run {}: {}", argv[0], std::strerror(exec_err));
  }
  VmRecord r;
  r.pid = vmm;
  auto ps = ReadPidStat(vmm);
  if (!ps) return Errorf(ErrorCode::kIo, "{} (pid {}) exited at once; see {}", argv[0], vmm, log);
  r.start_ticks = ps->start_ticks;
  return r;
}

bool WaitGone(const VmRecord& r, std::chrono::milliseconds timeout) {
  const auto end = std::chrono::steady_clock::now() + timeout;
  while (true) {
    if (CheckLiveness(r, ReadPidStat(r.pid)) != Liveness::kRunning) return true;
    if (std::chrono::steady_clock::now() >= end) return false;
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
}

void KillVmm(const VmRecord& r, std::chrono::milliseconds wait) {
  if (CheckLiveness(r, ReadPidStat(r.pid)) != Liveness::kRunning) return;
  kill(r.pid, SIGKILL);
  WaitGone(r, wait);
}

Result<HttpReply> UnixHttp(const std::string& socket, const std::string& method, const std::string& target,
                           const std::string& body, const std::string& content_type, std::chrono::milliseconds timeout) {
  httplib::Client cli(socket);
  cli.set_address_family(AF_UNIX);
  const auto us = std::chrono::duration_cast<std::chrono::microseconds>(timeout).count();
  cli.set_connection_timeout(us / 1000000, us % 1000000);
  cli.set_read_timeout(us / 1000000, us % 1000000);
  cli.set_write_timeout(us / 1000000, us % 1000000);
  const char* ct = content_type.empty() ? "application/octet-stream" : content_type.c_str();
  auto send = [&]() -> httplib::Result {
    if (method == "GET") return cli.Get(target);
    if (method == "PUT") return cli.Put(target, body, ct);
    if (method == "POST") return cli.Post(target, body, ct);
    if (method == "DELETE") return cli.Delete(target, body, ct);
    return cli.Patch(target, body, ct);
  };
  if (method != "GET" && method != "PUT" && method != "POST" && method != "DELETE" && method != "PATCH")
    return Errorf(ErrorCode::kInvalidArgument, "method {} is not forwarded", method);
  httplib::Result res = send();
  if (!res) return Errorf(ErrorCode::kIo, "{} {} via {}: {}", method, target, socket, httplib::to_string(res.error()));
  return HttpReply{res->status, res->body, res->get_header_value("Content-Type")};
}

void RemoveTree(const std::string& dir) {
  std::error_code ec;
  std::filesystem::remove_all(dir, ec);
}

}  // namespace ferry::agent
