#include "vm_process.h"

#include <arpa/inet.h>
#include <fcntl.h>
#include <linux/filter.h>
#include <linux/if_ether.h>
#include <linux/if_packet.h>
#include <net/if.h>
#include <poll.h>
#include <sched.h>
#include <signal.h>
#include <sys/ioctl.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cstdlib>
#include <cstring>
#include <iterator>
#include <fstream>
#include <sstream>
#include <thread>

#include <gtest/gtest.h>
#include <httplib.h>

namespace ferry::test {

std::string BuildDir() {
  const char* d = getenv("FERRY_BUILD_DIR");
  return d ? d : "build";
}
static std::string GuestDir() {
  const char* g = getenv("FERRY_GUEST_DIR");
  if (g) return g;
  const char* s = getenv("FERRY_SOURCE_DIR");
  return std::string(s ? s : ".") + "/build/guest";
}
std::string GuestImage() { return GuestDir() + "/Image"; }
std::string GuestInitrd() { return GuestDir() + "/initramfs.cpio"; }

bool ChildProcess::Start(const std::vector<std::string>& args, const std::string& log) {
  Kill();
  log_ = log;
  pid_ = fork();
  if (pid_ < 0) return false;
  if (pid_ == 0) {
    const int fd = open(log.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
    if (fd >= 0) {
      dup2(fd, 1);
      dup2(fd, 2);
    }
    std::vector<char*> argv;
    for (const auto& a : args) argv.push_back(const_cast<char*>(a.c_str()));
    argv.push_back(nullptr);
    execv(argv[0], argv.data());
    _exit(127);
  }
  return true;
}

bool ChildProcess::Running() {
  if (pid_ <= 0) return false;
  if (waitpid(pid_, nullptr, WNOHANG) == pid_) {
    pid_ = -1;
    return false;
  }
  return true;
}

void ChildProcess::Signal(int sig) const {
  if (pid_ > 0) kill(pid_, sig);
}

int ChildProcess::Wait(std::chrono::milliseconds timeout) {
  if (pid_ <= 0) return -1;
  const auto end = std::chrono::steady_clock::now() + timeout;
  while (std::chrono::steady_clock::now() < end) {
    int st = 0;
    if (waitpid(pid_, &st, WNOHANG) == pid_) {
      pid_ = -1;
      return WIFEXITED(st) ? WEXITSTATUS(st) : 128 + WTERMSIG(st);
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
  return -1;
}

void ChildProcess::Kill() {
  if (pid_ <= 0) return;
  kill(pid_, SIGKILL);
  waitpid(pid_, nullptr, 0);
  pid_ = -1;
}

std::string ChildProcess::Log() const {
  std::ifstream f(log_, std::ios::binary);
  std::stringstream ss;
  ss << f.rdbuf();
  const std::string s = ss.str();
  return s.size() > 16384 ? s.substr(s.size() - 16384) : s;
}

std::string MakeTempDir(const std::string& tag) {
  std::string t = "/tmp/ferry-" + tag + "-XXXXXX";
  std::vector<char> buf(t.begin(), t.end());
  buf.push_back(0);
  return mkdtemp(buf.data());
}

void RemoveTree(const std::string& dir) {
  if (dir.rfind("/tmp/ferry-", 0) == 0) Sh("rm -rf '" + dir + "'");
}

int Sh(const std::string& cmd, std::string* out) {
  FILE* p = popen((cmd + " 2>&1").c_str(), "r");
  if (!p) return -1;
  char buf[4096];
  std::string o;
  size_t n;
  while ((n = fread(buf, 1, sizeof buf, p)) > 0) o.append(buf, n);
  int st = pclose(p);
  if (out) *out = o;
  return WIFEXITED(st) ? WEXITSTATUS(st) : -1;
}

VmProcess::VmProcess(std::vector<std::string> args, const std::string& workdir, const std::string& netns)
    : args_(std::move(args)), workdir_(workdir), netns_(netns) {
  static int counter = 0;
  ++counter;
  socket_ = workdir_ + "/api" + std::to_string(counter) + ".sock";
  console_ = workdir_ + "/console" + std::to_string(counter) + ".log";
  stderr_ = workdir_ + "/stderr" + std::to_string(counter) + ".log";
}

VmProcess::~VmProcess() { Kill(); }

bool VmProcess::Start() {
  int in[2];
  if (pipe(in) != 0) return false;
  pid_ = fork();
  if (pid_ < 0) return false;
  if (pid_ == 0) {
    dup2(in[0], 0);
    int out = open(console_.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
    int err = open(stderr_.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
    dup2(out, 1);
    dup2(err, 2);
    close(in[1]);
    std::vector<std::string> argv;
    if (!netns_.empty()) argv = {"ip", "netns", "exec", netns_};
    argv.push_back(BuildDir() + "/bin/ferry-vmm");
    argv.insert(argv.end(), args_.begin(), args_.end());
    argv.push_back("--console");
    argv.push_back("stdio");
    argv.push_back("--api-socket");
    argv.push_back(socket_);
    std::vector<char*> cargv;
    for (auto& a : argv) cargv.push_back(a.data());
    cargv.push_back(nullptr);
    execvp(cargv[0], cargv.data());
    _exit(127);
  }
  close(in[0]);
  stdin_fd_ = in[1];
  return true;
}

std::string VmProcess::Console() const {
  std::ifstream f(console_);
  std::stringstream ss;
  ss << f.rdbuf();
  return ss.str();
}
size_t VmProcess::ConsoleSize() const { return Console().size(); }
std::string VmProcess::Stderr() const {
  std::ifstream f(stderr_);
  std::stringstream ss;
  ss << f.rdbuf();
  return ss.str();
}

bool VmProcess::WaitConsole(const std::string& needle, std::chrono::milliseconds timeout, size_t from) {
  auto end = std::chrono::steady_clock::now() + timeout;
  while (std::chrono::steady_clock::now() < end) {
    std::string c = Console();
    if (c.size() > from && c.find(needle, from) != std::string::npos) return true;
    int st;
    if (pid_ > 0 && waitpid(pid_, &st, WNOHANG) == pid_) { pid_ = -1; return Console().find(needle, from) != std::string::npos; }
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
  return false;
}

void VmProcess::SendConsole(const std::string& line) {
  std::string l = line + "\n";
  if (stdin_fd_ >= 0) [[maybe_unused]] auto n = write(stdin_fd_, l.data(), l.size());
}

int VmProcess::Api(const std::string& method, const std::string& path, const std::string& body, std::string* out) {
  // The API socket appears once the VM is built (a restore of a large snapshot on a loaded
  // machine can take seconds): retry for up to 10 s while nothing accepts connections yet.
  // Only connection failures are retried, so a request is never delivered twice.
  auto end = std::chrono::steady_clock::now() + std::chrono::seconds(10);
  for (;;) {
    struct stat st;
    if (stat(socket_.c_str(), &st) == 0) {
      httplib::Client cli(socket_);
      cli.set_address_family(AF_UNIX);
      cli.set_read_timeout(60, 0);
      httplib::Result r = method == "GET" ? cli.Get(path.c_str()) : cli.Put(path.c_str(), body, "application/json");
      if (r) {
        if (out) *out = r->body;
        if (r->status / 100 != 2) last_api_error_ = method + " " + path + ": HTTP " + std::to_string(r->status) + " " + r->body;
        return r->status;
      }
      last_api_error_ = method + " " + path + ": " + httplib::to_string(r.error());
      if (r.error() != httplib::Error::Connection) return -1;
    } else {
      last_api_error_ = method + " " + path + ": no API socket " + socket_;
    }
    if (std::chrono::steady_clock::now() > end) return -1;
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
}

nlohmann::json VmProcess::Get(const std::string& path) {
  std::string body;
  if (Api("GET", path, "", &body) != 200) return nullptr;
  return nlohmann::json::parse(body, nullptr, false);
}

int VmProcess::Wait(std::chrono::milliseconds timeout) {
  if (pid_ <= 0) return -1;
  auto end = std::chrono::steady_clock::now() + timeout;
  while (std::chrono::steady_clock::now() < end) {
    int st;
    if (waitpid(pid_, &st, WNOHANG) == pid_) {
      pid_ = -1;
      if (stdin_fd_ >= 0) close(stdin_fd_), stdin_fd_ = -1;
      return WIFEXITED(st) ? WEXITSTATUS(st) : 128 + WTERMSIG(st);
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
  return -1;
}

void VmProcess::Kill() {
  if (pid_ > 0) {
    kill(pid_, SIGKILL);
    waitpid(pid_, nullptr, 0);
    pid_ = -1;
  }
  if (stdin_fd_ >= 0) close(stdin_fd_), stdin_fd_ = -1;
}

void InNetns(const std::string& ns, const std::function<void()>& fn) {
  std::thread t([&] {
    const int fd = open(("/var/run/netns/" + ns).c_str(), O_RDONLY | O_CLOEXEC);
    ASSERT_GE(fd, 0) << ns;
    ASSERT_EQ(setns(fd, CLONE_NEWNET), 0) << std::strerror(errno);
    close(fd);
    fn();
  });
  t.join();
}

NetNs::NetNs(const std::string& name) : name_(name) {
  Sh("ip netns del " + name_ + " 2>/dev/null");
  ok_ = Sh("ip netns add " + name_) == 0 &&
        Sh("ip netns exec " + name_ + " ip link set lo up") == 0 &&
        Sh("ip netns exec " + name_ + " ip link add br0 type bridge") == 0 &&
        Sh("ip netns exec " + name_ + " ip addr add 10.77.0.1/24 dev br0") == 0 &&
        Sh("ip netns exec " + name_ + " ip link set br0 up") == 0;
}

NetNs::~NetNs() { Sh("ip netns del " + name_); }

bool NetNs::AddTap(const std::string& tap) {
  return Sh("ip netns exec " + name_ + " ip tuntap add dev " + tap + " mode tap vnet_hdr") == 0 &&
         Sh("ip netns exec " + name_ + " ip link set " + tap + " master br0") == 0 &&
         Sh("ip netns exec " + name_ + " ip link set " + tap + " up") == 0;
}

int NetNs::UdpEcho(const std::string& ip, int port, int count, int timeout_ms) {
  // A tiny python client inside the namespace: sends `count` datagrams, counts replies.
  std::string py =
      "import socket,sys\n"
      "s=socket.socket(socket.AF_INET,socket.SOCK_DGRAM); s.settimeout(" + std::to_string(timeout_ms / 1000.0) + ")\n"
      "n=0\n"
      "for i in range(" + std::to_string(count) + "):\n"
      "  m=('ferry-%d'%i).encode(); s.sendto(m,('" + ip + "'," + std::to_string(port) + "))\n"
      "  try:\n"
      "    d,_=s.recvfrom(2048); n+= d==m\n"
      "  except Exception: pass\n"
      "print(n)\n";
  std::string out;
  if (Sh("ip netns exec " + name_ + " python3 -c \"" + py + "\"", &out) != 0) return -1;
  return std::atoi(out.c_str());
}

PacketCapture::PacketCapture(const std::string& netns, uint16_t ethertype) {
  // A socket belongs to the namespace of the thread that creates it: create it from a thread
  // that joined `netns` (this thread stays where it is).
  std::thread t([&] {
    const int nsfd = open(("/var/run/netns/" + netns).c_str(), O_RDONLY | O_CLOEXEC);
    if (nsfd < 0) return;
    if (setns(nsfd, CLONE_NEWNET) == 0)
      fd_ = socket(AF_PACKET, SOCK_RAW | SOCK_CLOEXEC | SOCK_NONBLOCK, htons(ETH_P_ALL));
    close(nsfd);
  });
  t.join();
  // ETH_P_ALL, not the ethertype itself: a socket for one protocol sees a bridge port's frames only
  // after the bridge passed them up on the bridge device, never as they enter the port. A filter
  // in the kernel keeps the other traffic out of the receive buffer.
  sock_filter code[] = {
      {0x28, 0, 0, 12},                   // ldh [12]  (the ethertype)
      {0x15, 0, 1, ethertype},            // jeq #ethertype, keep, drop
      {0x06, 0, 0, 0x40000},              // keep: ret #262144
      {0x06, 0, 0, 0},                    // drop: ret #0
  };
  sock_fprog prog{static_cast<unsigned short>(std::size(code)), code};
  if (fd_ >= 0 && setsockopt(fd_, SOL_SOCKET, SO_ATTACH_FILTER, &prog, sizeof prog) != 0) {
    close(fd_);
    fd_ = -1;
  }
  ethertype_ = ethertype;
}

PacketCapture::~PacketCapture() {
  if (fd_ >= 0) close(fd_);
}

std::vector<CapturedFrame> PacketCapture::Take(std::chrono::milliseconds timeout) {
  std::vector<CapturedFrame> frames;
  if (fd_ < 0) return frames;
  pollfd p{fd_, POLLIN, 0};
  if (poll(&p, 1, static_cast<int>(timeout.count())) <= 0) return frames;
  for (;;) {
    uint8_t buf[2048];
    sockaddr_ll from{};
    socklen_t len = sizeof from;
    const ssize_t n = recvfrom(fd_, buf, sizeof buf, 0, reinterpret_cast<sockaddr*>(&from), &len);
    if (n < 0) break;
    if (n < 14 || (buf[12] << 8 | buf[13]) != ethertype_) continue;  // queued before the filter was attached
    CapturedFrame f;
    f.pkttype = from.sll_pkttype;
    f.bytes.assign(buf, buf + n);
    ifreq ifr{};
    ifr.ifr_ifindex = from.sll_ifindex;
    // The index belongs to the capture's namespace, so it is resolved through the socket itself.
    if (ioctl(fd_, SIOCGIFNAME, &ifr) == 0) f.ifname = ifr.ifr_name;
    frames.push_back(std::move(f));
  }
  return frames;
}

}  // namespace ferry::test
