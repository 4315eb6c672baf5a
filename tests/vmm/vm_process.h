// Test helpers: run ferry-vmm as a child process, read its console, talk to its API,
// and create/remove network namespaces with a bridge + TAP for network tests.
#pragma once

#include <sys/types.h>

#include <chrono>
#include <cstdint>
#include <functional>
#include <optional>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

namespace ferry::test {

std::string BuildDir();    // $FERRY_BUILD_DIR
std::string GuestImage();  // build/guest/Image
std::string GuestInitrd(); // build/guest/initramfs.cpio
std::string MakeTempDir(const std::string& tag);
void RemoveTree(const std::string& dir);

// Runs a shell command; returns its exit status (and output if requested).
int Sh(const std::string& cmd, std::string* out = nullptr);

// Any program as a child process with stdout and stderr in a log file; killed (SIGKILL) when the
// object goes unless it exited before. For the cluster tests' agents and controllers.
class ChildProcess {
 public:
  ChildProcess() = default;
  ~ChildProcess() { Kill(); }
  ChildProcess(const ChildProcess&) = delete;
  ChildProcess& operator=(const ChildProcess&) = delete;
  // args[0] is the program's path. False if fork failed.
  bool Start(const std::vector<std::string>& args, const std::string& log);
  bool Running();                 // not exited (reaps it if it did)
  void Signal(int sig) const;     // e.g. SIGTERM for a clean stop
  int Wait(std::chrono::milliseconds timeout);  // exit status, -1 on timeout
  void Kill();
  std::string Log() const;        // the last 16 KiB of its log
  pid_t pid() const { return pid_; }

 private:
  pid_t pid_ = -1;
  std::string log_;
};

class VmProcess {
 public:
  // args: ferry-vmm arguments after the binary; console goes to a file we read.
  // netns: if set, the VMM runs inside that network namespace.
  VmProcess(std::vector<std::string> args, const std::string& workdir, const std::string& netns = "");
  ~VmProcess();
  bool Start();
  // Waits for a console line containing `needle` that appears after byte offset `from`.
  bool WaitConsole(const std::string& needle, std::chrono::milliseconds timeout, size_t from = 0);
  std::string Console() const;
  size_t ConsoleSize() const;
  void SendConsole(const std::string& line);  // types a line into the guest console
  // API (PUT with a JSON body, GET). Returns HTTP status; body in *out.
  int Api(const std::string& method, const std::string& path, const std::string& body = "", std::string* out = nullptr);
  nlohmann::json Get(const std::string& path);
  // What the last Api/Get call that did not return 2xx saw (status, transport error, body),
  // for failure messages.
  const std::string& last_api_error() const { return last_api_error_; }
  int Wait(std::chrono::milliseconds timeout);  // exit code, -1 on timeout
  void Kill();
  pid_t pid() const { return pid_; }
  const std::string& socket() const { return socket_; }
  std::string Stderr() const;

 private:
  std::vector<std::string> args_;
  std::string workdir_, netns_, socket_, console_, stderr_;
  std::string last_api_error_;
  pid_t pid_ = -1;
  int stdin_fd_ = -1;
};

// Runs fn on a thread of its own inside network namespace `ns` (/var/run/netns/NS): its sockets,
// and the processes it starts, are there. Returns when fn did; gtest assertions in fn count.
void InNetns(const std::string& ns, const std::function<void()>& fn);

// A network namespace with a bridge, a host-side veth-free address on the bridge and
// TAP devices attached to it. Everything is removed in the destructor.
class NetNs {
 public:
  explicit NetNs(const std::string& name);
  ~NetNs();
  bool ok() const { return ok_; }
  const std::string& name() const { return name_; }
  bool AddTap(const std::string& tap);
  // Sends UDP datagrams from inside the namespace; returns replies count.
  int UdpEcho(const std::string& ip, int port, int count, int timeout_ms);

 private:
  std::string name_;
  bool ok_ = false;
};

// An Ethernet frame a PacketCapture saw: the interface it was seen on, the packet type
// (PACKET_HOST, PACKET_BROADCAST, ..., PACKET_OUTGOING for a copy the namespace sent) and the frame
// from the destination MAC on.
struct CapturedFrame {
  std::string ifname;
  int pkttype = 0;
  std::vector<uint8_t> bytes;
};

// An AF_PACKET socket on every interface of a network namespace, filtered to one ethertype, open
// from construction on: frames queue in the socket (up to its receive buffer) until Take() reads
// them. Each frame is seen on every interface it crosses (a bridge port, the bridge, the other
// ports as PACKET_OUTGOING).
class PacketCapture {
 public:
  PacketCapture(const std::string& netns, uint16_t ethertype);
  ~PacketCapture();
  PacketCapture(const PacketCapture&) = delete;
  PacketCapture& operator=(const PacketCapture&) = delete;
  bool ok() const { return fd_ >= 0; }
  // Every frame queued so far; waits up to `timeout` for the first one if none is queued.
  std::vector<CapturedFrame> Take(std::chrono::milliseconds timeout);

 private:
  int fd_ = -1;
  uint16_t ethertype_ = 0;
};

}  // namespace ferry::test
