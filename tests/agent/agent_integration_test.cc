// ferry-agent end to end: real ferry-agent processes (build/bin, next to ferry-vmm) run real
// guests. A VM is created, boots (its console shows it), answers through the API proxy and is
// deleted without a trace; bad requests get 4xx and leave nothing; an agent killed with SIGKILL
// and restarted adopts its running VM (a VMM stopped with SIGSTOP is "lost" until it answers
// again); mutual TLS admits a client with a certificate from the CA and refuses the others; a VM
// migrates between two agents and back, over mutual TLS and in plaintext on loopback, and its
// memory verifies on both ends; both agents killed during a migration finish it after their restart
// (source stopped, destination adopted as an ordinary VM); TAP traffic shows in the VM and host usage (root: a network namespace).
#include <fcntl.h>
#include <signal.h>
#include <sched.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstring>
#include <filesystem>
#include <functional>
#include <fstream>
#include <thread>

#include <gtest/gtest.h>
#include <httplib.h>
#include <nlohmann/json.hpp>

#include "agent/http.h"
#include "agent/vm_record.h"
#include "agent/vmm_process.h"
#include "migration/migration_util.h"  // FreePort
#include "net/testing/pki.h"
#include "vm_process.h"

namespace ferry::test {
namespace {
using namespace std::chrono_literals;
using nlohmann::json;
using agent::AgentClient;
using agent::HttpReply;

constexpr int kPages = 16 * 256;  // memdirty mib=16

// One ferry-agent process (a ChildProcess). Its VMMs run in sessions of their own and outlive it: KillVms kills
// what its state directory records.
class AgentProcess {
 public:
  AgentProcess(std::string name, std::string state_dir, std::vector<std::string> extra)
      : name_(std::move(name)), state_dir_(std::move(state_dir)), extra_(std::move(extra)), port_(FreePort()) {}
  ~AgentProcess() { Kill(); }
  // Starts it and waits for the API (client: how to reach it). False if it did not come up.
  bool Start(const AgentClient& client) {
    std::vector<std::string> args = {BuildDir() + "/bin/ferry-agent", "--listen", "127.0.0.1:" + std::to_string(port_), "--name", name_,
                                     "--state-dir", state_dir_, "--capacity", "cpus=2,mem=1G", "--sample-ms", "200"};
    args.insert(args.end(), extra_.begin(), extra_.end());
    if (!proc_.Start(args, state_dir_ + "." + std::to_string(++starts_) + ".log")) return false;
    for (int i = 0; i < 200; ++i) {
      auto r = client.Do("GET", "/v1/host", "", 1s);
      if (r && r->status == 200) return true;
      if (!proc_.Running()) return false;
      std::this_thread::sleep_for(25ms);
    }
    return false;
  }
  void Kill() { proc_.Kill(); }
  // Kills every VMM the state directory records (they outlive the agent by design).
  void KillVms() const {
    std::error_code ec;
    for (const auto& d : std::filesystem::directory_iterator(state_dir_ + "/vms", ec))
      if (auto r = agent::LoadVmRecord(d.path().string())) agent::KillVmm(*r);
  }
  std::string Log() const { return proc_.Log(); }
  int port() const { return port_; }
  pid_t pid() const { return proc_.pid(); }
  const std::string& state_dir() const { return state_dir_; }

 private:
  std::string name_, state_dir_;
  std::vector<std::string> extra_;
  int port_;
  int starts_ = 0;
  ChildProcess proc_;
};

json Body(const HttpReply& r) {
  auto j = json::parse(r.body, nullptr, false);
  return j.is_discarded() ? json(nullptr) : j;
}

std::string Show(const Result<HttpReply>& r) {
  if (!r) return "no answer: " + r.error().message();
  return "HTTP " + std::to_string(r->status) + " " + r->body.substr(0, 2000);
}

json VmRequest(const std::string& name, const std::string& mem = "256M") {
  return {{"name", name},
          {"kernel", GuestImage()},
          {"initrd", GuestInitrd()},
          {"mem", mem},
          {"cmdline", "console=ttyS0 ferry.run=memdirty:mib=16,rate=2000,bytes=4096,verify=2"}};
}

// Polls GET /v1/vms/NAME until `pred` holds; returns the last body.
template <typename Pred>
json WaitVm(const AgentClient& c, const std::string& name, std::chrono::milliseconds timeout, Pred pred) {
  json last;
  for (auto end = std::chrono::steady_clock::now() + timeout; std::chrono::steady_clock::now() < end;) {
    auto r = c.Do("GET", "/v1/vms/" + name, "", 5s);
    if (r) {
      last = Body(*r);
      last["http_status"] = r->status;
      if (pred(last)) return last;
    }
    std::this_thread::sleep_for(100ms);
  }
  return last;
}

bool WaitConsole(const AgentClient& c, const std::string& name, const std::string& needle, std::chrono::milliseconds timeout,
                 std::string* text) {
  for (auto end = std::chrono::steady_clock::now() + timeout; std::chrono::steady_clock::now() < end;) {
    auto r = c.Do("GET", "/v1/vms/" + name + "/console", "", 5s);
    if (r && r->status == 200) {
      *text = r->body;
      if (r->body.find(needle) != std::string::npos) return true;
    }
    std::this_thread::sleep_for(200ms);
  }
  return false;
}

size_t CountVmDirs(const std::string& state_dir) {
  size_t n = 0;
  std::error_code ec;
  for (auto it = std::filesystem::directory_iterator(state_dir + "/vms", ec); !ec && it != std::filesystem::directory_iterator(); ++it) ++n;
  return n;
}

class AgentTest : public ::testing::Test {
 protected:
  void SetUp() override {
    struct stat st;
    ASSERT_EQ(stat(GuestImage().c_str(), &st), 0) << "guest image missing: run scripts/setup";
    ASSERT_EQ(stat((BuildDir() + "/bin/ferry-agent").c_str(), &st), 0) << "build ferry-agent first";
    dir_ = MakeTempDir("agent");
  }
  void TearDown() override {
    for (auto& a : agents_) {
      a->Kill();
      a->KillVms();
      if (HasFailure()) std::printf("--- agent log %s ---\n%s\n", a->state_dir().c_str(), a->Log().c_str());
    }
    agents_.clear();
    RemoveTree(dir_);
  }
  AgentProcess& NewAgent(const std::string& name, std::vector<std::string> extra) {
    agents_.push_back(std::make_unique<AgentProcess>(name, dir_ + "/" + name, std::move(extra)));
    return *agents_.back();
  }
  std::string dir_;
  std::vector<std::unique_ptr<AgentProcess>> agents_;
};

TEST_F(AgentTest, AVmIsCreatedBootsAnswersThroughTheProxyAndIsDeletedWithoutATrace) {
  AgentProcess& a = NewAgent("h1", {"--insecure"});
  AgentClient c("127.0.0.1", a.port());
  ASSERT_TRUE(a.Start(c)) << a.Log();

  auto created = c.Do("POST", "/v1/vms", VmRequest("web").dump());
  ASSERT_TRUE(created && created->status == 201) << Show(created);
  const json vm = Body(*created);
  EXPECT_EQ(vm["state"], "running");
  const int pid = vm["pid"].get<int>();
  ASSERT_GT(pid, 0);
  EXPECT_NE(getsid(pid), getsid(a.pid())) << "the VMM runs in a session of its own";

  std::string console;
  EXPECT_TRUE(WaitConsole(c, "web", "memverify ok pages=" + std::to_string(kPages), 90s, &console)) << console;
  EXPECT_NE(console.find("Linux version"), std::string::npos) << "the console shows the kernel booting";

  // The proxy: status, body and content type of the VMM's own API.
  auto info = c.Do("GET", "/v1/vms/web/api/vm");
  ASSERT_TRUE(info && info->status == 200) << Show(info);
  EXPECT_EQ(info->content_type, "application/json");
  EXPECT_EQ(Body(*info)["state"], "running");
  EXPECT_EQ(Body(*info)["config"]["ram_bytes"], 256 << 20);
  auto no_migration = c.Do("GET", "/v1/vms/web/api/vm/migration");
  ASSERT_TRUE(no_migration);
  EXPECT_EQ(no_migration->status, 404) << "the VMM's own status code comes through: " << Show(no_migration);
  auto pause = c.Do("PUT", "/v1/vms/web/api/vm/pause", "{}");
  ASSERT_TRUE(pause && pause->status / 100 == 2) << Show(pause);
  json paused = WaitVm(c, "web", 10s, [](const json& j) { return j.value("state", "") == "paused"; });
  EXPECT_EQ(paused["state"], "paused") << paused.dump();
  auto resume = c.Do("PUT", "/v1/vms/web/api/vm/resume", "{}");
  ASSERT_TRUE(resume && resume->status / 100 == 2) << Show(resume);

  // Usage: the guest dirties 2000 pages/s and burns CPU doing it.
  json busy = WaitVm(c, "web", 20s, [](const json& j) {
    return j.value("state", "") == "running" && j["usage"]["cpus"].get<double>() > 0.05 && j["usage"]["rss_bytes"].get<uint64_t>() > (16u << 20);
  });
  EXPECT_GT(busy["usage"]["cpus"].get<double>(), 0.05) << busy.dump();
  EXPECT_GT(busy["usage"]["rss_bytes"].get<uint64_t>(), 16u << 20) << busy.dump();
  std::printf("usage of a memdirty guest (2000 pages/s): %s\n", busy["usage"].dump().c_str());
  // Its dirty rate, long after its 16 MiB set was first written: 2000 random page writes a second
  // over 4096 pages touch ~1,580 distinct pages a second (plus the kernel's few). Before the VMM
  // cleared its log outside migrations this fell to 0 once the set was dirty.
  {
    std::this_thread::sleep_for(5s);
    std::vector<double> pages_per_s;
    for (int i = 0; i < 9; ++i) {
      auto r = c.Do("GET", "/v1/vms/web", "", 5s);
      ASSERT_TRUE(r && r->status == 200) << Show(r);
      pages_per_s.push_back(Body(*r)["usage"]["dirty_bytes_per_s"].get<double>() / 4096);
      std::this_thread::sleep_for(700ms);
    }
    std::sort(pages_per_s.begin(), pages_per_s.end());
    const double median = pages_per_s[pages_per_s.size() / 2];
    std::printf("dirty pages/s of the memdirty guest (median of 9 samples): %.0f\n", median);
    EXPECT_GT(median, 800) << busy.dump();
    EXPECT_LT(median, 4000) << busy.dump();
  }
  auto host = c.Do("GET", "/v1/host");
  ASSERT_TRUE(host && host->status == 200);
  const json h = Body(*host);
  EXPECT_EQ(h["name"], "h1");
  EXPECT_EQ(h["capacity"]["mem_bytes"], 1ull << 30);
  EXPECT_EQ(h["allocated"]["mem_bytes"], 256 << 20);
  EXPECT_EQ(h["vms"], json::array({"web"}));
  EXPECT_GT(h["usage"]["cpus"].get<double>(), 0.0) << h.dump();
  EXPECT_GT(h["usage"]["mem_bytes"].get<uint64_t>(), 0u);
  auto metrics = c.Do("GET", "/metrics");
  ASSERT_TRUE(metrics && metrics->status == 200);
  EXPECT_NE(metrics->body.find("ferry_agent_vm_up{host=\"h1\",vm=\"web\",state=\"running\"} 1"), std::string::npos) << metrics->body;
  EXPECT_NE(metrics->body.find("ferry_agent_vm_cpus{host=\"h1\",vm=\"web\"} "), std::string::npos);
  EXPECT_NE(metrics->body.find("ferry_agent_host_capacity_mem_bytes{host=\"h1\"} 1073741824"), std::string::npos);

  auto del = c.Do("DELETE", "/v1/vms/web");
  ASSERT_TRUE(del && del->status == 200) << Show(del);
  EXPECT_EQ(agent::CheckLiveness(agent::VmRecord{{}, pid, agent::ReadPidStat(pid) ? agent::ReadPidStat(pid)->start_ticks : 0, ""},
                                 agent::ReadPidStat(pid)),
            agent::Liveness::kGone)
      << "the VMM is gone";
  EXPECT_EQ(CountVmDirs(a.state_dir()), 0u) << "its directory is gone";
  auto gone = c.Do("GET", "/v1/vms/web");
  ASSERT_TRUE(gone);
  EXPECT_EQ(gone->status, 404);
}

TEST_F(AgentTest, BadRequestsGet4xxAndLeaveNothingBehind) {
  AgentProcess& a = NewAgent("h1", {"--insecure"});
  AgentClient c("127.0.0.1", a.port());
  ASSERT_TRUE(a.Start(c)) << a.Log();
  auto first = c.Do("POST", "/v1/vms", VmRequest("one", "768M").dump());
  ASSERT_TRUE(first && first->status == 201) << Show(first);

  json typo = VmRequest("two");
  typo["memory"] = "1G";
  json missing_kernel = VmRequest("two");
  missing_kernel["kernel"] = "/no/such/Image";
  const struct {
    const char* what;
    std::string method, path, body;
    int status;
    const char* says;
  } cases[] = {
      {"malformed JSON", "POST", "/v1/vms", "{\"name\": \"two\",", 400, "JSON"},
      {"not an object", "POST", "/v1/vms", "[1, 2]", 400, "object"},
      {"an unknown field", "POST", "/v1/vms", typo.dump(), 400, "memory"},
      {"a kernel that does not exist", "POST", "/v1/vms", missing_kernel.dump(), 400, "/no/such/Image"},
      {"a bad name", "POST", "/v1/vms", VmRequest("../etc").dump(), 400, "name"},
      {"a duplicate name", "POST", "/v1/vms", VmRequest("one", "64M").dump(), 409, "already exists"},
      {"a VM that does not fit (768M of 1G allocated)", "POST", "/v1/vms", VmRequest("two", "512M").dump(), 409, "does not fit"},
      {"an incoming VM that does not fit", "POST", "/v1/incoming", json{{"name", "in"}, {"mem", "512M"}}.dump(), 409, "does not fit"},
      {"an unknown VM", "GET", "/v1/vms/nobody", "", 404, "nobody"},
      {"deleting an unknown VM", "DELETE", "/v1/vms/nobody", "", 404, "nobody"},
      {"the console of an unknown VM", "GET", "/v1/vms/nobody/console", "", 404, "nobody"},
      {"the API of an unknown VM", "GET", "/v1/vms/nobody/api/vm", "", 404, "nobody"},
      {"migrating an unknown VM", "POST", "/v1/vms/nobody/migrate", "{\"to\": \"tcp:127.0.0.1:1\"}", 404, "nobody"},
      {"a migration without \"to\"", "POST", "/v1/vms/one/migrate", "{}", 400, "to"},
      {"an unknown endpoint", "GET", "/v2/everything", "", 404, "no such endpoint"},
  };
  for (const auto& k : cases) {
    SCOPED_TRACE(k.what);
    auto r = c.Do(k.method, k.path, k.body);
    ASSERT_TRUE(r) << r.error().message();
    EXPECT_EQ(r->status, k.status) << r->body;
    const json j = Body(*r);
    ASSERT_TRUE(j.is_object() && j.contains("error")) << r->body;
    EXPECT_NE(j["error"].get<std::string>().find(k.says), std::string::npos) << r->body;
  }
  auto list = c.Do("GET", "/v1/vms");
  ASSERT_TRUE(list && list->status == 200);
  ASSERT_EQ(Body(*list).size(), 1u) << list->body;
  EXPECT_EQ(Body(*list)[0]["name"], "one");
  EXPECT_EQ(Body(*list)[0]["state"], "running") << "the duplicate left the first VM alone";
  EXPECT_EQ(CountVmDirs(a.state_dir()), 1u);
  auto host = c.Do("GET", "/v1/host");
  EXPECT_EQ(Body(*host)["allocated"]["mem_bytes"], 768 << 20);
}

TEST_F(AgentTest, AKilledAgentRestartsAndAdoptsItsRunningVm) {
  AgentProcess& a = NewAgent("h1", {"--insecure"});
  AgentClient c("127.0.0.1", a.port());
  ASSERT_TRUE(a.Start(c)) << a.Log();
  auto created = c.Do("POST", "/v1/vms", VmRequest("db").dump());
  ASSERT_TRUE(created && created->status == 201) << Show(created);
  const int pid = Body(*created)["pid"].get<int>();
  std::string console;
  ASSERT_TRUE(WaitConsole(c, "db", "memverify ok", 90s, &console)) << console;

  a.Kill();  // SIGKILL: no chance to clean up
  ASSERT_TRUE(agent::ReadPidStat(pid)) << "the VMM outlives its agent";
  ASSERT_TRUE(a.Start(c)) << a.Log();
  auto got = c.Do("GET", "/v1/vms/db");
  ASSERT_TRUE(got && got->status == 200) << Show(got);
  EXPECT_EQ(Body(*got)["pid"], pid);
  EXPECT_EQ(Body(*got)["state"], "running") << got->body;
  auto info = c.Do("GET", "/v1/vms/db/api/vm");
  ASSERT_TRUE(info && info->status == 200) << Show(info);
  EXPECT_EQ(Body(*info)["state"], "running");
  // The guest keeps verifying its memory under the new agent: more "memverify ok" lines than before the kill.
  auto count = [](const std::string& text) {
    size_t n = 0;
    for (size_t at = 0; (at = text.find("memverify ok", at)) != std::string::npos; ++at) ++n;
    return n;
  };
  const size_t before = count(console);
  std::string now;
  for (int i = 0; i < 100 && count(now) <= before; ++i) {
    WaitConsole(c, "db", "memverify ok", 5s, &now);
    std::this_thread::sleep_for(200ms);
  }
  EXPECT_GT(count(now), before) << now;
  // Its memory is still accounted for: the same VM again does not fit twice.
  auto dup = c.Do("POST", "/v1/vms", VmRequest("db").dump());
  ASSERT_TRUE(dup);
  EXPECT_EQ(dup->status, 409);
  auto del = c.Do("DELETE", "/v1/vms/db");
  ASSERT_TRUE(del && del->status == 200) << Show(del);
  EXPECT_FALSE(agent::ReadPidStat(pid) && agent::ReadPidStat(pid)->state != 'Z') << "the adopted VMM was stopped";
}

TEST_F(AgentTest, InsecureIsRefusedOffLoopback) {
  const std::string log = dir_ + "/insecure.log";
  ChildProcess p;
  ASSERT_TRUE(p.Start({BuildDir() + "/bin/ferry-agent", "--listen", "0.0.0.0:" + std::to_string(FreePort()), "--name", "x", "--state-dir",
                       dir_ + "/x", "--capacity", "cpus=1,mem=1G", "--insecure"},
                      log));
  EXPECT_EQ(p.Wait(10s), 2);
  auto text = agent::TailFile(log);
  EXPECT_NE(text->find("--allow-insecure-remote"), std::string::npos) << *text;
}

// Runs `fn` on a thread inside network namespace `ns` (its sockets and the processes it forks live
// there), and waits for it.
TEST_F(AgentTest, TapTrafficShowsInTheVmAndHostUsage) {
  if (geteuid() != 0) GTEST_SKIP() << "needs root (network namespace, TAP)";
  const std::string ns = "fagent" + std::to_string(getpid());
  NetNs net(ns);
  ASSERT_TRUE(net.ok());
  ASSERT_TRUE(net.AddTap("agtap0"));
  InNetns(ns, [&] {
    AgentProcess& a = NewAgent("h1", {"--insecure"});
    AgentClient c("127.0.0.1", a.port());
    ASSERT_TRUE(a.Start(c)) << a.Log();
    json req = VmRequest("echo");
    req["cmdline"] = "console=ttyS0 ferry.ip=10.77.0.2/24 ferry.run=echo:port=7";
    req["net"] = {{"tap", "agtap0"}};
    auto created = c.Do("POST", "/v1/vms", req.dump());
    ASSERT_TRUE(created && created->status == 201) << Show(created);
    std::string console;
    ASSERT_TRUE(WaitConsole(c, "echo", "ready", 60s, &console)) << console;
    ASSERT_GT(net.UdpEcho("10.77.0.2", 7, 20, 2000), 0) << "the guest's echo service does not answer";

    // 3000 datagrams of ~10 bytes each way while the agent samples every 200 ms.
    int replies = -1;
    std::thread traffic([&] { replies = net.UdpEcho("10.77.0.2", 7, 3000, 1000); });
    json best;
    double host_net = 0;
    for (auto end = std::chrono::steady_clock::now() + 30s; std::chrono::steady_clock::now() < end && replies < 0;) {
      auto r = c.Do("GET", "/v1/vms/echo", "", 5s);
      if (r && r->status == 200) {
        const json u = Body(*r)["usage"];
        if (best.is_null() || u["net_rx_packets_per_s"].get<double>() > best["net_rx_packets_per_s"].get<double>()) best = u;
      }
      auto h = c.Do("GET", "/v1/host", "", 5s);
      if (h && h->status == 200) host_net = std::max(host_net, Body(*h)["usage"]["net_bytes_per_s"].get<double>());
      std::this_thread::sleep_for(100ms);
    }
    traffic.join();
    std::printf("echo traffic: %d replies; busiest VM sample %s; host net peak %.0f B/s\n", replies, best.dump().c_str(), host_net);
    ASSERT_GT(replies, 2000);
    ASSERT_TRUE(best.is_object());
    EXPECT_GT(best["net_rx_packets_per_s"].get<double>(), 50) << "datagrams to the guest";
    EXPECT_GT(best["net_tx_packets_per_s"].get<double>(), 50) << "echoes from the guest";
    EXPECT_GT(best["net_rx_bytes_per_s"].get<double>(), best["net_rx_packets_per_s"].get<double>() * 42) << "at least Ethernet+IP+UDP headers per packet";
    EXPECT_GT(best["net_tx_bytes_per_s"].get<double>(), best["net_tx_packets_per_s"].get<double>() * 42);
    EXPECT_GT(host_net, 0.0);
    auto metrics = c.Do("GET", "/metrics");
    ASSERT_TRUE(metrics);
    EXPECT_NE(metrics->body.find("ferry_agent_vm_net_drops_per_s{host=\"h1\",vm=\"echo\"}"), std::string::npos);
  });
}

TEST_F(AgentTest, AgentsKilledDuringAMigrationFinishItAfterTheirRestart) {
  AgentProcess& a = NewAgent("src", {"--insecure"});
  AgentProcess& b = NewAgent("dst", {"--insecure"});
  const AgentClient ca("127.0.0.1", a.port()), cb("127.0.0.1", b.port());
  ASSERT_TRUE(a.Start(ca)) << a.Log();
  ASSERT_TRUE(b.Start(cb)) << b.Log();
  auto created = ca.Do("POST", "/v1/vms", VmRequest("web").dump());
  ASSERT_TRUE(created && created->status == 201) << Show(created);
  const int src_pid = Body(*created)["pid"].get<int>();
  std::string console;
  ASSERT_TRUE(WaitConsole(ca, "web", "memverify ok", 90s, &console)) << console;
  auto incoming = cb.Do("POST", "/v1/incoming", json{{"name", "web"}, {"mem", "256M"}}.dump());
  ASSERT_TRUE(incoming && incoming->status == 201) << Show(incoming);
  const int dst_pid = Body(*incoming)["pid"].get<int>();
  auto mig = ca.Do("POST", "/v1/vms/web/migrate", json{{"to", Body(*incoming)["incoming"]}}.dump());
  ASSERT_TRUE(mig && mig->status == 202) << Show(mig);
  // Both agents die at once; the VMMs carry on with the migration without them.
  a.Kill();
  b.Kill();
  std::this_thread::sleep_for(5s);
  ASSERT_TRUE(a.Start(ca)) << a.Log();
  ASSERT_TRUE(b.Start(cb)) << b.Log();
  json src = WaitVm(ca, "web", 30s, [](const json& j) { return j.value("state", "") == "migrated"; });
  EXPECT_EQ(src["state"], "migrated") << "the restarted source agent sees the completed migration: " << src.dump();
  json dst = WaitVm(cb, "web", 30s, [](const json& j) { return j.value("state", "") == "running" && !j.contains("incoming"); });
  EXPECT_EQ(dst["state"], "running") << dst.dump();
  EXPECT_EQ(dst["pid"], dst_pid) << dst.dump();
  EXPECT_FALSE(agent::ReadPidStat(src_pid) && agent::ReadPidStat(src_pid)->state != 'Z') << "the source VMM was stopped";
  EXPECT_EQ(CountVmDirs(a.state_dir()), 0u);
  auto rec = agent::LoadVmRecord(b.state_dir() + "/vms/web");
  ASSERT_TRUE(rec) << rec.error().message();
  EXPECT_EQ(rec->incoming, "") << "vm.json no longer says incoming: a third restart adopts it as an ordinary VM";
  std::string dst_console;
  EXPECT_TRUE(WaitConsole(cb, "web", "memverify ok pages=" + std::to_string(kPages), 60s, &dst_console)) << dst_console;
  EXPECT_EQ(dst_console.find("FAIL"), std::string::npos) << dst_console;
}

class AgentTlsTest : public AgentTest {
 protected:
  void SetUp() override {
    // A refused handshake can close the connection under httplib's next SSL write (write(2), not
    // send(MSG_NOSIGNAL)): a client process must ignore SIGPIPE, as ferry-agent itself does.
    signal(SIGPIPE, SIG_IGN);
    AgentTest::SetUp();
    pki_ = std::make_unique<net::testing::TestPki>(dir_);
    auto made = pki_->MakeStandard();
    ASSERT_TRUE(made) << made.error().message();
  }
  // An agent with the "server" certificate (CN server, IP 127.0.0.1) from CA "ca".
  AgentProcess& TlsAgent(const std::string& name) {
    const net::TlsFiles f = pki_->Files("server");
    return NewAgent(name, {"--tls-cert", f.cert, "--tls-key", f.key, "--tls-ca", f.ca});
  }
  std::unique_ptr<net::testing::TestPki> pki_;
};

TEST_F(AgentTlsTest, MutualTlsAdmitsOnlyClientsWithACertificateFromTheCa) {
  AgentProcess& a = TlsAgent("h1");
  const AgentClient good("127.0.0.1", a.port(), pki_->Files("client"));
  ASSERT_TRUE(a.Start(good)) << a.Log();
  auto host = good.Do("GET", "/v1/host");
  ASSERT_TRUE(host && host->status == 200) << Show(host);
  EXPECT_EQ(Body(*host)["name"], "h1");

  // A certificate from another CA, and a client that trusts another CA than the agent's.
  auto evil = AgentClient("127.0.0.1", a.port(), pki_->Files("evil")).Do("GET", "/v1/host", "", 5s);
  EXPECT_FALSE(evil) << "a client certificate from a rogue CA was admitted: " << Show(evil);
  auto distrust = AgentClient("127.0.0.1", a.port(), pki_->Files("client", "rogue")).Do("GET", "/v1/host", "", 5s);
  EXPECT_FALSE(distrust) << "the client accepted an agent certificate its CA did not sign: " << Show(distrust);
  auto expired = AgentClient("127.0.0.1", a.port(), pki_->Files("expired")).Do("GET", "/v1/host", "", 5s);
  EXPECT_FALSE(expired) << Show(expired);
  // TLS without a client certificate.
  {
    httplib::SSLClient anon("127.0.0.1", a.port());
    anon.set_ca_cert_path(pki_->Files("client").ca.c_str());
    anon.enable_server_certificate_verification(true);
    anon.set_connection_timeout(5, 0);
    anon.set_read_timeout(5, 0);
    auto r = anon.Get("/v1/host");
    EXPECT_FALSE(r && r->status == 200) << "a client without a certificate was served";
  }
  // Plain HTTP to the TLS port.
  auto plain = AgentClient("127.0.0.1", a.port()).Do("GET", "/v1/host", "", 5s);
  EXPECT_FALSE(plain && plain->status == 200) << Show(plain);
  // The agent is still fine.
  auto again = good.Do("GET", "/v1/host");
  EXPECT_TRUE(again && again->status == 200) << Show(again);
}

// Agent `a` (reached through ca) runs a memdirty guest, fails a migration to nowhere, migrates it
// to agent `b` (host name "dst") over `scheme` (tls or tcp), and takes it back; the memory verifies
// on both ends.
void MigrateThereAndBack(const AgentProcess& a, const AgentClient& ca, const AgentClient& cb, const std::string& scheme) {
  const std::string other = scheme == "tls" ? "tcp" : "tls";
  auto created = ca.Do("POST", "/v1/vms", VmRequest("web").dump());
  ASSERT_TRUE(created && created->status == 201) << Show(created);
  const int src_pid = Body(*created)["pid"].get<int>();
  std::string console;
  ASSERT_TRUE(WaitConsole(ca, "web", "memverify ok pages=" + std::to_string(kPages), 90s, &console)) << console;

  // A failed migration (nobody listens there): the source keeps running and says why.
  const std::string nowhere = scheme + ":127.0.0.1:" + std::to_string(FreePort());
  auto bad = ca.Do("POST", "/v1/vms/web/migrate", json{{"to", nowhere}}.dump());
  ASSERT_TRUE(bad && bad->status == 202) << Show(bad);
  json back = WaitVm(ca, "web", 30s, [](const json& j) { return j.value("state", "") == "running" && j.contains("error"); });
  EXPECT_EQ(back["state"], "running") << back.dump();
  EXPECT_NE(back.value("error", "").find(nowhere), std::string::npos) << back.dump();
  EXPECT_EQ(back["pid"], src_pid) << "the same VMM runs on";
  auto wrong = ca.Do("POST", "/v1/vms/web/migrate", json{{"to", other + ":127.0.0.1:1"}}.dump());
  ASSERT_TRUE(wrong);
  EXPECT_EQ(wrong->status, 400) << "a TLS agent migrates only over TLS, an --insecure one only in plaintext: " << wrong->body;

  auto incoming = cb.Do("POST", "/v1/incoming", json{{"name", "web"}, {"mem", "256M"}}.dump());
  ASSERT_TRUE(incoming && incoming->status == 201) << Show(incoming);
  const json in = Body(*incoming);
  EXPECT_EQ(in["state"], "incoming");
  const std::string to = in["incoming"].get<std::string>();
  ASSERT_TRUE(to.starts_with(scheme + ":127.0.0.1:")) << to;
  auto dup = cb.Do("POST", "/v1/incoming", json{{"name", "web"}, {"mem", "256M"}}.dump());
  ASSERT_TRUE(dup);
  EXPECT_EQ(dup->status, 409);

  const auto t0 = std::chrono::steady_clock::now();
  auto mig = ca.Do("POST", "/v1/vms/web/migrate", json{{"to", to}, {"downtime_ms", 300}}.dump());
  ASSERT_TRUE(mig && mig->status == 202) << Show(mig);
  json src = WaitVm(ca, "web", 120s, [](const json& j) { return j.value("state", "") == "migrated" || j.value("http_status", 0) == 404; });
  EXPECT_TRUE(src.value("state", "") == "migrated" || src.value("http_status", 0) == 404) << src.dump();
  json dst = WaitVm(cb, "web", 30s, [](const json& j) { return j.value("state", "") == "running"; });
  ASSERT_EQ(dst["state"], "running") << dst.dump();
  std::printf("migration through the agents: %.1f s until the source reported migrated; destination usage %s\n",
              std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count(), dst["usage"].dump().c_str());
  EXPECT_FALSE(dst.contains("incoming")) << "the destination is an ordinary VM now";

  // The guest verifies all of its dirtied memory on the destination (a fresh console: every line is post-migration).
  std::string dst_console;
  EXPECT_TRUE(WaitConsole(cb, "web", "memverify ok pages=" + std::to_string(kPages), 60s, &dst_console)) << dst_console;
  EXPECT_EQ(dst_console.find("FAIL"), std::string::npos) << dst_console;
  auto info = cb.Do("GET", "/v1/vms/web/api/vm");
  ASSERT_TRUE(info && info->status == 200) << Show(info);
  EXPECT_EQ(Body(*info)["state"], "running");
  json moved = WaitVm(cb, "web", 10s, [](const json& j) { return j["usage"]["migration_bytes"].get<uint64_t>() > 0; });
  EXPECT_GT(moved["usage"]["migration_bytes"].get<uint64_t>(), 16u << 20) << moved.dump();

  // The source VMM is gone and so is its directory.
  EXPECT_FALSE(agent::ReadPidStat(src_pid) && agent::ReadPidStat(src_pid)->state != 'Z') << "the source VMM still runs";
  EXPECT_EQ(CountVmDirs(a.state_dir()), 0u);
  auto src_host = ca.Do("GET", "/v1/host");
  EXPECT_EQ(Body(*src_host)["allocated"]["mem_bytes"], 0) << "a migrated VM holds no memory on its old host";
  auto metrics = cb.Do("GET", "/metrics");
  ASSERT_TRUE(metrics);
  EXPECT_NE(metrics->body.find("ferry_agent_vm_up{host=\"dst\",vm=\"web\",state=\"running\"} 1"), std::string::npos);

  // And straight back (the old host still reports "migrated" for a while; that does not block the name).
  auto back_in = ca.Do("POST", "/v1/incoming", json{{"name", "web"}, {"mem", "256M"}}.dump());
  ASSERT_TRUE(back_in && back_in->status == 201) << Show(back_in);
  auto return_mig = cb.Do("POST", "/v1/vms/web/migrate", json{{"to", Body(*back_in)["incoming"]}}.dump());
  ASSERT_TRUE(return_mig && return_mig->status == 202) << Show(return_mig);
  json home = WaitVm(ca, "web", 60s, [](const json& j) { return j.value("state", "") == "running"; });
  ASSERT_EQ(home["state"], "running") << home.dump();
  json left = WaitVm(cb, "web", 30s, [](const json& j) { return j.value("state", "") == "migrated"; });
  EXPECT_EQ(left["state"], "migrated") << left.dump();
  std::string home_console;
  EXPECT_TRUE(WaitConsole(ca, "web", "memverify ok pages=" + std::to_string(kPages), 60s, &home_console)) << home_console;
  EXPECT_EQ(home_console.find("FAIL"), std::string::npos) << home_console;
}

TEST_F(AgentTlsTest, AVmMigratesBetweenTwoAgentsOverMutualTlsAndItsMemoryVerifies) {
  AgentProcess& a = TlsAgent("src");
  AgentProcess& b = TlsAgent("dst");
  const AgentClient ca("127.0.0.1", a.port(), pki_->Files("client")), cb("127.0.0.1", b.port(), pki_->Files("client"));
  ASSERT_TRUE(a.Start(ca)) << a.Log();
  ASSERT_TRUE(b.Start(cb)) << b.Log();
  MigrateThereAndBack(a, ca, cb, "tls");
}

TEST_F(AgentTest, AVmMigratesBetweenTwoInsecureAgentsOnLoopback) {
  AgentProcess& a = NewAgent("src", {"--insecure"});
  AgentProcess& b = NewAgent("dst", {"--insecure"});
  const AgentClient ca("127.0.0.1", a.port()), cb("127.0.0.1", b.port());
  ASSERT_TRUE(a.Start(ca)) << a.Log();
  ASSERT_TRUE(b.Start(cb)) << b.Log();
  MigrateThereAndBack(a, ca, cb, "tcp");
}

}  // namespace
}  // namespace ferry::test
