// libFuzzer target: ferry-vmm's HTTP API (src/vmm/api_server.*) as a client reaches it - one
// request per input over the real Unix socket, into the real server (httplib's parser, the
// routes, the handlers) in front of a real VM: a 16 MiB board without a kernel, started paused
// (a resume runs zeros until the harness pauses it again after the input; a shutdown makes the
// harness build a new VM). A second server is a migration destination's API (StartIncoming) in
// front of a real IncomingMigration listening on loopback that never runs (phase waiting).
// No route is bypassed, so no seam is needed in the server.
// Input: [u8 flags][u8 method][u8 path][u16 n][n bytes: path suffix, '\n', raw header lines][body]
//   flags bit 0: the destination's API; method and path index tables of the routes (and others);
//   the harness adds Content-Length (the body's) and Connection: close (no half-close: httplib
//   drops the response to a client that shut its side down). The servers' read timeout is set to
//   2 ms (httplib's setting, through ApiServer::server()) so a request that never completes
//   (a fuzzed Transfer-Encoding or a second Content-Length) costs 2 ms, not 5 s: every byte of a
//   request is queued on the connection before the server reads, so only a request that is
//   incomplete for good waits that long (at 200 ms they took 3/4 of the fuzzing time).
// Harness rule: a PUT /vm/snapshot body that is a JSON object with a non-empty string "path" gets
// that path replaced by one in the harness's temp directory (the fuzzer must not write files
// anywhere on the host); everything else is sent as the fuzzer made it.
// Properties besides "no crash, no sanitizer report":
//  - every request gets a response within 5 s; no response at all only for a request the server
//    was still waiting on when its read timeout passed (an incomplete request);
//  - its status is one of 200, 202 or a 4xx (the API's documented statuses: 400 bad input, 404,
//    405, 409 wrong state; httplib's own 4xx for malformed HTTP) - never a 5xx for client input;
//  - every body except GET /metrics' Prometheus text is valid JSON, an object, with "error" (a
//    string) on every 4xx.
#include <poll.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <span>
#include <string>
#include <string_view>

#include <httplib.h>
#include <nlohmann/json.hpp>
#include <spdlog/spdlog.h>

#include "common/clock.h"
#include "vmm/api_server.h"
#include "vmm/vm.h"

using namespace ferry;

namespace {

constexpr const char* kMethods[] = {"GET", "PUT", "POST", "DELETE", "HEAD", "PATCH", "OPTIONS", "get"};
constexpr const char* kPaths[] = {"/vm",           "/vm/pause",          "/vm/resume",            "/vm/snapshot",
                                  "/vm/shutdown",  "/metrics",           "/vm/migrate",           "/vm/migration",
                                  "/vm/migration/cancel", "/vm/migration/postcopy", "/vm/migration/recover", "/",
                                  "/vm/",          "//vm",               "/vm/../vm",             "/nope"};

void Check(bool ok, const char* what, std::string_view detail = {}) {
  if (!ok) {
    std::fprintf(stderr, "fuzz_http_api: property violated: %s\n%.*s\n", what, static_cast<int>(detail.size()), detail.data());
    std::abort();
  }
}

// The servers' (httplib) read timeout in the harness. Short, because it only ever runs out on a
// request that is incomplete for good: the client writes the whole request (at most max_len, well
// within a Unix socket's buffer) before the server reads any of it - the bytes are queued on the
// connection before it is even accepted - so a read that waits finds nothing more coming.
constexpr int kReadTimeoutUs = 2000;

struct World {
  std::string dir;
  std::string vm_sock, in_sock, snap;
  std::unique_ptr<Vm> vm;
  std::unique_ptr<ApiServer> api;
  std::unique_ptr<migration::IncomingMigration> incoming;
  std::unique_ptr<ApiServer> in_api;

  void NewVm() {
    api.reset();  // the server outlives no VM
    vm.reset();
    VmOptions o;
    o.board.ram_bytes = kMinRam;
    o.board.kernel.clear();
    o.console = "none";
    auto v = Vm::CreateIncoming(o);  // the board without a kernel
    if (!v || !(*v)->Start(true)) std::abort();
    vm = std::move(*v);
    auto a = ApiServer::Start(vm_sock, vm.get());
    if (!a) std::abort();
    api = std::move(*a);
    api->server().set_read_timeout(0, kReadTimeoutUs);
  }
};

World& W() {
  static World* w = [] {
    auto* w = new World();
    char tmpl[] = "/dev/shm/ferry-fuzz-api-XXXXXX";  // tmpfs: snapshots (fsync) stay cheap
    if (!mkdtemp(tmpl)) std::abort();
    w->dir = tmpl;
    w->vm_sock = w->dir + "/vm.sock";
    w->in_sock = w->dir + "/in.sock";
    w->snap = w->dir + "/snap";
    w->NewVm();
    auto in = migration::IncomingMigration::Listen("tcp:127.0.0.1:0");
    if (!in) std::abort();
    w->incoming = std::move(*in);
    auto a = ApiServer::StartIncoming(w->in_sock, w->incoming.get());
    if (!a) std::abort();
    w->in_api = std::move(*a);
    w->in_api->server().set_read_timeout(0, kReadTimeoutUs);
    std::atexit([] {  // the servers unlink their sockets as they stop
      World& w = W();
      w.in_api.reset();
      w.api.reset();
      unlink(w.snap.c_str());
      rmdir(w.dir.c_str());
    });
    return w;
  }();
  return *w;
}

// The headers and as many body bytes as their Content-Length says have arrived.
// The length of the first whole response in `got` (0: none yet). An input may hold more than one
// request (pipelined on its connection): the server answers each, and a single read can bring
// several answers - only the first is the answer to the request the harness checks.
size_t FirstResponseLength(const std::string& got, bool head_only) {
  const size_t end = got.find("\r\n\r\n");
  if (end == std::string::npos) return 0;
  if (head_only) return end + 4;  // the answer to HEAD: its Content-Length is the GET's
  const std::string head = got.substr(0, end);
  const size_t cl = head.find("Content-Length: ");
  const size_t want = cl == std::string::npos ? 0 : std::strtoull(head.c_str() + cl + 16, nullptr, 10);
  return got.size() - end - 4 >= want ? end + 4 + want : 0;
}

// One exchange on a fresh connection: the request, then the response (complete, or until EOF).
std::string Exchange(const std::string& sock_path, const std::string& request, uint64_t* took_us) {
  const int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
  sockaddr_un a{};
  a.sun_family = AF_UNIX;
  std::memcpy(a.sun_path, sock_path.c_str(), sock_path.size() + 1);
  if (fd < 0 || connect(fd, reinterpret_cast<sockaddr*>(&a), sizeof a) != 0) std::abort();
  std::string_view out = request;
  const uint64_t t0 = NowNs(), deadline = t0 + 5'000'000'000ull;
  while (!out.empty()) {
    const ssize_t n = send(fd, out.data(), out.size(), MSG_NOSIGNAL);
    if (n <= 0) break;  // the server may answer (and close) before reading everything
    out.remove_prefix(static_cast<size_t>(n));
  }
  std::string got;
  char buf[8192];
  for (;;) {
    pollfd p{fd, POLLIN, 0};
    const uint64_t now = NowNs();
    Check(now < deadline, "no complete response within 5 s", request);
    if (poll(&p, 1, static_cast<int>((deadline - now) / 1'000'000) + 1) <= 0) continue;
    const ssize_t n = recv(fd, buf, sizeof buf, 0);
    if (n <= 0) break;
    got.append(buf, static_cast<size_t>(n));
    // The server may keep the connection (a request it could not parse).
    if (const size_t n = FirstResponseLength(got, request.starts_with("HEAD "))) {
      got.resize(n);
      break;
    }
  }
  close(fd);
  *took_us = (NowNs() - t0) / 1'000;
  return got;
}

// What the API may answer: status line, headers, body (Content-Length).
void CheckResponse(const std::string& method, const std::string& path, const std::string& request, const std::string& resp,
                   uint64_t took_us) {
  if (resp.empty()) {
    Check(took_us >= kReadTimeoutUs, "the connection closed without a response before the server's read timeout", request);
    return;
  }
  Check(resp.starts_with("HTTP/1.1 ") && resp.size() >= 12, "no HTTP response", request);
  const int status = std::atoi(resp.substr(9, 3).c_str());
  Check(status == 200 || status == 202 || (status >= 400 && status < 500), "status outside 200, 202, 4xx", resp);
  const size_t head_end = resp.find("\r\n\r\n");
  Check(head_end != std::string::npos, "response without the end of its headers", resp);
  const std::string head = resp.substr(0, head_end);
  const std::string body = resp.substr(head_end + 4);
  if (method == "HEAD") return;  // headers only
  const bool prometheus = status == 200 && head.find("Content-Type: text/plain") != std::string::npos;
  if (prometheus) {
    Check(path.starts_with("/metrics"), "text/plain from an endpoint other than /metrics", resp);
    return;
  }
  Check(head.find("Content-Type: application/json") != std::string::npos, "a body that is not application/json", resp);
  Check(nlohmann::json::accept(body), "a body that is not valid JSON", resp);
  const nlohmann::json j = nlohmann::json::parse(body);
  Check(j.is_object(), "a JSON body that is not an object", resp);
  if (status >= 400) Check(j.contains("error") && j["error"].is_string(), "a 4xx without an \"error\" string", resp);
}

}  // namespace

extern "C" int LLVMFuzzerInitialize(int*, char***) {
  spdlog::set_level(spdlog::level::off);
  (void)W();
  return 0;
}

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  if (size < 5) return 0;
  World& w = W();
  const bool incoming = data[0] & 1;
  const std::string method = kMethods[data[1] % std::size(kMethods)];
  std::string path = kPaths[data[2] % std::size(kPaths)];
  const size_t n = std::min<size_t>(data[3] | data[4] << 8, size - 5);
  const std::string_view extra(reinterpret_cast<const char*>(data + 5), n);
  std::string body(reinterpret_cast<const char*>(data + 5 + n), size - 5 - n);
  const size_t nl = extra.find('\n');
  path += extra.substr(0, nl);
  const std::string_view headers = nl == std::string_view::npos ? std::string_view() : extra.substr(nl + 1);
  if (method == "PUT" && path == "/vm/snapshot") {
    auto j = nlohmann::json::parse(body, nullptr, false);
    if (j.is_object() && j.contains("path") && j["path"].is_string() && !j["path"].get<std::string>().empty()) {
      j["path"] = w.snap;
      body = j.dump();
    }
  }
  std::string req = method + " " + path + " HTTP/1.1\r\nHost: ferry\r\n";
  req += headers;
  if (!headers.empty() && !headers.ends_with("\r\n")) req += "\r\n";
  req += "Content-Length: " + std::to_string(body.size()) + "\r\nConnection: close\r\n\r\n" + body;
  uint64_t took_us = 0;
  const std::string resp = Exchange(incoming ? w.in_sock : w.vm_sock, req, &took_us);
  CheckResponse(method, path, req, resp, took_us);
  // Back to a paused VM for the next input (a resumed one would run zeros on the machine thread).
  const VmState s = w.vm->state();
  if (s == VmState::kRunning) (void)w.vm->Pause();
  else if (s != VmState::kPaused) w.NewVm();
  unlink(w.snap.c_str());
  return 0;
}
