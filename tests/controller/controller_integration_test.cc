// ferry-controller end to end (issue 12): real ferry-agent processes (several on this machine,
// each counting only its own VMs' CPU: --cpu-usage vms) run real guests, and a real
// ferry-controller moves them.
//   - Three agents of 1 CPU, three CPU-bound guests on one: the controller spreads them one per
//     host, then holds still; a drain empties a host and nothing moves for 30 s after it; every
//     guest's memory verifies on its new host; the web page, loaded in headless Chromium, shows
//     the migrations; a controller killed and restarted on the same SQLite file knows the hosts,
//     the VMs and the drain, and re-plans nothing.
//   - Bad requests get 4xx with a message and leave nothing behind.
//   - An agent killed: its host goes down, its VM is reported lost and nothing moves it; restarted,
//     the agent adopts the VM and the controller finds it running again.
//   - The same on etcd with two controllers: the leader spreads the VMs and is killed; the other
//     leads within 10 s, knows everything, holds still, and drains a host.
//   - Hosts as network namespaces with their own bridges, joined: a drained host's VM keeps its
//     address on the other host, and a client outside the guests keeps getting its UDP echoes.
#include <signal.h>
#include <unistd.h>

#include <chrono>
#include <deque>
#include <filesystem>
#include <fstream>
#include <map>
#include <set>
#include <sstream>
#include <thread>

#include <gtest/gtest.h>
#include <nlohmann/json.hpp>

#include "agent/http.h"
#include "agent/vm_record.h"
#include "agent/vmm_process.h"
#include "controller/testing/etcd_process.h"
#include "migration/migration_util.h"  // FreePort
#include "net/testing/pki.h"
#include "vm_process.h"

namespace ferry::test {
namespace {
using namespace std::chrono_literals;
using nlohmann::json;

struct Reply {
  int status = 0;
  json body;
  std::string text;
};

// One request to a controller or agent (plain HTTP on loopback unless told otherwise).
Reply Http(int port, const std::string& method, const std::string& path, const json& body = nullptr,
           const std::string& host = "127.0.0.1", const net::TlsFiles& tls = {}) {
  agent::AgentClient c(host, port, tls);
  auto r = c.Do(method, path, body.is_null() ? "" : body.dump(), 30s);
  Reply out;
  if (!r) {
    out.text = r.error().message();
    return out;
  }
  out.status = r->status;
  out.text = r->body;
  out.body = json::parse(r->body, nullptr, false);
  return out;
}

std::string GuestRun(bool cpu_bound) {
  return std::string("console=ttyS0 ferry.run=") + (cpu_bound ? "cpubench:every_ms=1000;" : "") +
         "memdirty:mib=8,rate=500,bytes=4096,verify=2";
}

json VmBody(const std::string& name, const std::string& host, bool cpu_bound) {
  json b = {{"name", name}, {"kernel", GuestImage()}, {"initrd", GuestInitrd()}, {"mem", "128M"}, {"cmdline", GuestRun(cpu_bound)}};
  if (!host.empty()) b["host"] = host;
  return b;
}

class Cluster : public ::testing::Test {
 protected:
  void SetUp() override {
    signal(SIGPIPE, SIG_IGN);  // a TLS peer that hangs up mid-write is an error, not the end of the test
    struct stat st;
    ASSERT_EQ(stat(GuestImage().c_str(), &st), 0) << "guest image missing: run scripts/setup";
    dir_ = MakeTempDir("ctltest");
  }
  void TearDown() override {
    for (auto& c : controllers_) c.proc.Kill();
    for (auto& a : agents_) KillAgent(a);
    RemoveTree(dir_);
  }

  struct Agent {
    std::string name;
    int port = 0;
    ChildProcess proc;
    int starts = 0;
  };
  struct Controller {
    int port = 0;
    ChildProcess proc;
    int starts = 0;
  };

  Agent& AddAgent(const std::string& name) {
    agents_.emplace_back();
    Agent& a = agents_.back();
    a.name = name;
    a.port = FreePort();
    return a;
  }
  // tls empty: --insecure (plain HTTP on loopback).
  bool StartAgent(Agent& a, const net::TlsFiles& tls = {}) {
    std::vector<std::string> args = {BuildDir() + "/bin/ferry-agent", "--listen", "127.0.0.1:" + std::to_string(a.port), "--name",
                                     a.name, "--state-dir", dir_ + "/" + a.name, "--capacity", "cpus=1,mem=1G",
                                     "--cpu-usage", "vms", "--sample-ms", "500"};
    AddTls(&args, tls);
    if (!a.proc.Start(args, dir_ + "/agent-" + a.name + "." + std::to_string(++a.starts) + ".log")) return false;
    return WaitHttp(a.port, "/v1/host", a.proc, tls);
  }
  static void AddTls(std::vector<std::string>* args, const net::TlsFiles& tls) {
    if (tls.empty()) args->push_back("--insecure");
    else args->insert(args->end(), {"--tls-cert", tls.cert, "--tls-key", tls.key, "--tls-ca", tls.ca});
  }
  // The VMMs outlive an agent by design: kill the agent, then what its state directory records.
  void KillAgent(Agent& a) {
    a.proc.Kill();
    std::error_code ec;
    for (const auto& d : std::filesystem::directory_iterator(dir_ + "/" + a.name + "/vms", ec))
      if (auto r = agent::LoadVmRecord(d.path().string())) agent::KillVmm(*r);
  }
  Controller& AddController() {
    controllers_.emplace_back();
    controllers_.back().port = FreePort();
    return controllers_.back();
  }
  bool StartController(Controller& c, const std::string& store, const std::string& id, const net::TlsFiles& tls = {}) {
    std::vector<std::string> args = {BuildDir() + "/bin/ferry-controller", "--listen", "127.0.0.1:" + std::to_string(c.port), "--store",
                                     store, "--id", id};
    AddTls(&args, tls);
    if (!c.proc.Start(args, dir_ + "/controller-" + id + "." + std::to_string(++c.starts) + ".log")) return false;
    return WaitHttp(c.port, "/v1/status", c.proc, tls);
  }
  static bool WaitHttp(int port, const std::string& path, ChildProcess& p, const net::TlsFiles& tls = {}) {
    for (int i = 0; i < 200; ++i) {
      auto r = agent::AgentClient("127.0.0.1", port, tls).Do("GET", path, "", 1s);
      if (r && r->status == 200) return true;
      if (!p.Running()) return false;
      std::this_thread::sleep_for(50ms);
    }
    return false;
  }
  bool AddHost(int ctl, const Agent& a) {
    auto r = Http(ctl, "POST", "/v1/hosts", {{"name", a.name}, {"agent", "http://127.0.0.1:" + std::to_string(a.port)}});
    EXPECT_EQ(r.status, 201) << r.text;
    return r.status == 201;
  }
  // VM name -> host, from the controller.
  static std::map<std::string, std::string> Placement(int ctl) {
    std::map<std::string, std::string> out;
    auto r = Http(ctl, "GET", "/v1/vms");
    if (r.body.is_array())
      for (const auto& v : r.body) out[v.value("name", "")] = v.value("host", "");
    return out;
  }
  static size_t Migrations(int ctl, const std::string& status = "") {
    auto r = Http(ctl, "GET", "/v1/migrations");
    size_t n = 0;
    if (r.body.is_array())
      for (const auto& m : r.body)
        if (status.empty() || m.value("status", "") == status) ++n;
    return n;
  }
  static bool Settled(int ctl) {
    auto r = Http(ctl, "GET", "/v1/migrations");
    if (!r.body.is_array()) return false;
    for (const auto& m : r.body)
      if (m.value("status", "") == "running") return false;
    return true;
  }
  void SpreadAndHold(int ctl);
  void ExpectVerifies(int ctl, const std::string& vm);
  std::string DrainAndHold(int ctl);
  void ExpectKnowsAndHolds(int ctl, const std::string& drained, const std::map<std::string, std::string>& placement,
                           size_t migrations, std::chrono::seconds hold);
  std::string Logs() {
    std::string s;
    for (auto& c : controllers_) s += "--- controller\n" + c.proc.Log();
    return s;
  }

  std::string dir_;
  std::deque<Agent> agents_;
  std::deque<Controller> controllers_;
};

// Waits until `pred` holds (polling every 500 ms) or `timeout` passes.
template <class F>
bool Eventually(std::chrono::milliseconds timeout, F pred) {
  const auto end = std::chrono::steady_clock::now() + timeout;
  while (std::chrono::steady_clock::now() < end) {
    if (pred()) return true;
    std::this_thread::sleep_for(500ms);
  }
  return pred();
}

// Three agents of 1 CPU, three CPU-bound guests on one: spread one per host within 4 minutes, then
// hold still for 30 s; every guest's memory verifies on its new host.
void Cluster::SpreadAndHold(int ctl) {
  for (const char* v : {"vm1", "vm2", "vm3"}) {
    auto r = Http(ctl, "POST", "/v1/vms", VmBody(v, "a", true));
    ASSERT_EQ(r.status, 201) << r.text;
  }
  const auto t0 = std::chrono::steady_clock::now();
  ASSERT_TRUE(Eventually(240s, [&] {
    auto p = Placement(ctl);
    std::set<std::string> hosts;
    for (auto& [vm, h] : p) hosts.insert(h);
    return p.size() == 3 && hosts.size() == 3 && Settled(ctl);
  })) << Http(ctl, "GET", "/v1/migrations").text << Http(ctl, "GET", "/v1/plan").text << Logs();
  const double spread_s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  const size_t moves = Migrations(ctl, "completed");
  EXPECT_EQ(moves, 2u) << Http(ctl, "GET", "/v1/migrations").text;
  std::printf("spread in %.0f s with %zu migrations\n", spread_s, moves);
  std::this_thread::sleep_for(30s);
  EXPECT_EQ(Migrations(ctl), moves) << Http(ctl, "GET", "/v1/migrations").text;
  // A fresh console on the new host: every line is new.
  for (const char* v : {"vm1", "vm2", "vm3"}) ExpectVerifies(ctl, v);
}

void Cluster::ExpectVerifies(int ctl, const std::string& vm) {
  EXPECT_TRUE(Eventually(60s, [&] { return Http(ctl, "GET", "/v1/vms/" + vm + "/console").text.find("memverify ok") != std::string::npos; }))
      << vm << ": " << Http(ctl, "GET", "/v1/vms/" + vm + "/console").text;
}

// Drains vm1's host: it empties (one more completed migration), then nothing moves for 30 s, and
// the moved guest verifies. Returns the drained host.
std::string Cluster::DrainAndHold(int ctl) {
  const size_t completed = Migrations(ctl, "completed");
  const std::string drained = Placement(ctl)["vm1"];
  EXPECT_EQ(Http(ctl, "POST", "/v1/hosts/" + drained + "/drain", json::object()).status, 200);
  EXPECT_TRUE(Eventually(120s, [&] {
    auto r = Http(ctl, "GET", "/v1/hosts");
    for (const auto& h : r.body)
      if (h.value("name", "") == drained) return h.value("state", "") == "drained" && h["vms"].empty();
    return false;
  })) << Http(ctl, "GET", "/v1/hosts").text << Logs();
  EXPECT_TRUE(Eventually(30s, [&] { return Settled(ctl); }));
  const size_t after_drain = Migrations(ctl);
  EXPECT_EQ(Migrations(ctl, "completed"), completed + 1);
  std::this_thread::sleep_for(30s);
  EXPECT_EQ(Migrations(ctl), after_drain) << Http(ctl, "GET", "/v1/migrations").text;
  ExpectVerifies(ctl, "vm1");
  return drained;
}

// What a controller that (re)started knows from the store: the three hosts with their states, the
// placement, and no new migration for `hold`.
void Cluster::ExpectKnowsAndHolds(int ctl, const std::string& drained, const std::map<std::string, std::string>& placement,
                                  size_t migrations, std::chrono::seconds hold) {
  auto hosts = Http(ctl, "GET", "/v1/hosts");
  ASSERT_EQ(hosts.body.size(), 3u) << hosts.text;
  for (const auto& h : hosts.body) EXPECT_EQ(h.value("state", ""), h.value("name", "") == drained ? "drained" : "active") << hosts.text;
  EXPECT_EQ(Placement(ctl), placement);
  std::this_thread::sleep_for(hold);
  EXPECT_EQ(Migrations(ctl), migrations) << Http(ctl, "GET", "/v1/migrations").text << Logs();
  EXPECT_EQ(Placement(ctl), placement);
}

TEST_F(Cluster, CpuBoundVmsSpreadThenHoldStillDrainAndARestartedControllerKnowsItAll) {
  for (const char* n : {"a", "b", "c"}) ASSERT_TRUE(StartAgent(AddAgent(n))) << n;
  Controller& ctl = AddController();
  const std::string store = "sqlite:" + dir_ + "/controller.db";
  ASSERT_TRUE(StartController(ctl, store, "ctl1")) << ctl.proc.Log();
  for (auto& a : agents_) ASSERT_TRUE(AddHost(ctl.port, a));
  ASSERT_NO_FATAL_FAILURE(SpreadAndHold(ctl.port));
  const size_t moves = Migrations(ctl.port, "completed");

  // The web page, in a real browser, shows the migrations.
  const std::string dom = dir_ + "/dom.html";
  ASSERT_EQ(Sh("timeout 90 chromium --headless --no-sandbox --disable-gpu --virtual-time-budget=5000 --dump-dom http://127.0.0.1:" +
               std::to_string(ctl.port) + "/ > " + dom + " 2>/dev/null"),
            0);
  std::ifstream f(dom);
  std::stringstream page;
  page << f.rdbuf();
  size_t rows = 0;  // rendered rows (the page's script holds the same tag in a template: "<td>${")
  for (size_t at = 0; (at = page.str().find("<tr class=\"migration\"><td>vm", at)) != std::string::npos; ++at) ++rows;
  EXPECT_EQ(rows, moves) << page.str();
  EXPECT_NE(page.str().find("status-completed"), std::string::npos) << page.str();
  EXPECT_NE(page.str().find("cpu "), std::string::npos) << "the reason of a move" << page.str();

  const std::string drained = DrainAndHold(ctl.port);

  // Killed and restarted on the same file: it knows the hosts, the VMs and the drain, and moves nothing.
  const auto before = Placement(ctl.port);
  const size_t migrations = Migrations(ctl.port);
  ctl.proc.Kill();
  ASSERT_TRUE(StartController(ctl, store, "ctl1-restarted")) << ctl.proc.Log();
  ExpectKnowsAndHolds(ctl.port, drained, before, migrations, 15s);
}

// The same with two controllers on one etcd: "one" leads and spreads the VMs (hosts added through
// "two", which serves the API from the same store); the leader is killed; "two" leads within 10 s,
// knows everything, moves nothing, then acts: a drain through it empties a host. "one", restarted,
// follows and knows the drain.
TEST_F(Cluster, TheSameOnEtcdWithTwoControllersKillingTheLeader) {
  controller::testing::EtcdProcess etcd;
  ASSERT_TRUE(etcd.Start()) << etcd.why();
  for (const char* n : {"a", "b", "c"}) ASSERT_TRUE(StartAgent(AddAgent(n))) << n;
  Controller& c1 = AddController();
  Controller& c2 = AddController();
  const std::string store = "etcd:" + etcd.url();
  ASSERT_TRUE(StartController(c1, store, "one")) << c1.proc.Log();
  ASSERT_TRUE(Eventually(10s, [&] { return Http(c1.port, "GET", "/v1/status").body.value("leader", false); })) << c1.proc.Log();
  ASSERT_TRUE(StartController(c2, store, "two")) << c2.proc.Log();
  std::this_thread::sleep_for(3s);
  EXPECT_FALSE(Http(c2.port, "GET", "/v1/status").body.value("leader", true));
  for (auto& a : agents_) ASSERT_TRUE(AddHost(c2.port, a));
  ASSERT_NO_FATAL_FAILURE(SpreadAndHold(c1.port));
  EXPECT_EQ(Placement(c2.port), Placement(c1.port)) << "both serve the one store";

  // The leader dies; "two" leads within 10 s, knows it all and holds still.
  const auto before = Placement(c1.port);
  const size_t migrations = Migrations(c1.port);
  c1.proc.Kill();
  const auto t0 = std::chrono::steady_clock::now();
  ASSERT_TRUE(Eventually(10s, [&] { return Http(c2.port, "GET", "/v1/status").body.value("leader", false); })) << c2.proc.Log();
  std::printf("took over in %.1f s\n", std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
  ExpectKnowsAndHolds(c2.port, "", before, migrations, 15s);
  // It monitors: every host reachable, with the agents' usage.
  auto hosts = Http(c2.port, "GET", "/v1/hosts");
  for (const auto& h : hosts.body) EXPECT_TRUE(h.value("reachable", false)) << hosts.text;

  // And acts.
  const std::string drained = DrainAndHold(c2.port);
  ASSERT_TRUE(StartController(c1, store, "one-restarted")) << c1.proc.Log();
  std::this_thread::sleep_for(2s);
  EXPECT_FALSE(Http(c1.port, "GET", "/v1/status").body.value("leader", true)) << "the lease is two's";
  ExpectKnowsAndHolds(c1.port, drained, Placement(c2.port), Migrations(c2.port), 0s);
}
TEST_F(Cluster, BadRequestsGet4xxAndLeaveNothingBehind) {
  Agent& a = AddAgent("a");
  ASSERT_TRUE(StartAgent(a));
  Controller& ctl = AddController();
  ASSERT_TRUE(StartController(ctl, "sqlite:" + dir_ + "/c.db", "ctl")) << ctl.proc.Log();
  ASSERT_TRUE(AddHost(ctl.port, a));
  auto expect = [&](const Reply& r, int status, const std::string& words) {
    EXPECT_EQ(r.status, status) << r.text;
    ASSERT_TRUE(r.body.is_object()) << r.text;
    EXPECT_NE(r.body.value("error", "").find(words), std::string::npos) << r.text;
  };
  expect(Http(ctl.port, "POST", "/v1/hosts", json("not an object")), 400, "JSON object");
  {
    agent::AgentClient c("127.0.0.1", ctl.port);
    auto r = c.Do("POST", "/v1/vms", "{\"name\": ", 10s);
    ASSERT_TRUE(r);
    EXPECT_EQ(r->status, 400) << r->body;
  }
  expect(Http(ctl.port, "POST", "/v1/hosts", {{"name", "a"}, {"agent", "http://127.0.0.1:" + std::to_string(a.port)}}), 409, "exists");
  expect(Http(ctl.port, "POST", "/v1/hosts", {{"name", "x"}, {"agent", "http://127.0.0.1:1"}}), 502, "");
  expect(Http(ctl.port, "POST", "/v1/hosts", {{"name", "bad name"}, {"agent", "http://127.0.0.1:1"}}), 400, "host name");
  expect(Http(ctl.port, "POST", "/v1/vms", VmBody("v1", "nohost", false)), 404, "no host nohost");
  json big = VmBody("huge", "a", false);
  big["mem"] = "2G";
  expect(Http(ctl.port, "POST", "/v1/vms", big), 409, "host a is full");
  json nokernel = VmBody("nok", "a", false);
  nokernel["kernel"] = "/nonexistent";
  expect(Http(ctl.port, "POST", "/v1/vms", nokernel), 400, "/nonexistent");
  json badmem = VmBody("m", "a", false);
  badmem["mem"] = 5;
  expect(Http(ctl.port, "POST", "/v1/vms", badmem), 400, "\"mem\" must be a string");
  ASSERT_EQ(Http(ctl.port, "POST", "/v1/vms", VmBody("v1", "a", false)).status, 201);
  expect(Http(ctl.port, "POST", "/v1/vms", VmBody("v1", "a", false)), 409, "VM v1 exists");
  expect(Http(ctl.port, "POST", "/v1/hosts/nohost/drain", json::object()), 404, "no host nohost");
  expect(Http(ctl.port, "DELETE", "/v1/vms/nothere"), 404, "no VM nothere");
  expect(Http(ctl.port, "GET", "/v1/nothing"), 404, "no such endpoint");
  // Nothing half-created: the controller and the agent know exactly one VM and one host.
  EXPECT_EQ(Placement(ctl.port), (std::map<std::string, std::string>{{"v1", "a"}}));
  auto on_agent = Http(a.port, "GET", "/v1/vms");
  ASSERT_TRUE(on_agent.body.is_array()) << on_agent.text;
  EXPECT_EQ(on_agent.body.size(), 1u) << on_agent.text;
  EXPECT_EQ(Http(ctl.port, "GET", "/v1/hosts").body.size(), 1u);
  EXPECT_EQ(Http(ctl.port, "DELETE", "/v1/vms/v1").status, 200);
  EXPECT_TRUE(Http(a.port, "GET", "/v1/vms").body.empty());
}

TEST_F(Cluster, AKilledAgentsVmIsReportedLostNotMovedAndFoundAgain) {
  Agent& a = AddAgent("a");
  Agent& b = AddAgent("b");
  ASSERT_TRUE(StartAgent(a));
  ASSERT_TRUE(StartAgent(b));
  Controller& ctl = AddController();
  ASSERT_TRUE(StartController(ctl, "sqlite:" + dir_ + "/c.db", "ctl")) << ctl.proc.Log();
  ASSERT_TRUE(AddHost(ctl.port, a));
  ASSERT_TRUE(AddHost(ctl.port, b));
  ASSERT_EQ(Http(ctl.port, "POST", "/v1/vms", VmBody("db", "b", false)).status, 201);
  b.proc.Kill();  // the agent only: its VMM keeps running
  auto state = [&](const std::string& what, const std::string& name) {
    for (const auto& x : Http(ctl.port, "GET", what).body)
      if (x.value("name", "") == name) return x.value("state", "");
    return std::string();
  };
  ASSERT_TRUE(Eventually(20s, [&] { return state("/v1/hosts", "b") == "down" && state("/v1/vms", "db") == "lost"; }))
      << Http(ctl.port, "GET", "/v1/vms").text << Logs();
  // Nothing moves a lost VM (it may still run there), not even a drain of its host.
  ASSERT_EQ(Http(ctl.port, "POST", "/v1/hosts/b/drain", json::object()).status, 200);
  std::this_thread::sleep_for(10s);
  EXPECT_EQ(Migrations(ctl.port), 0u) << Http(ctl.port, "GET", "/v1/migrations").text;
  // The agent comes back and adopts its VMM: the VM is found running where it was.
  ASSERT_TRUE(StartAgent(b));
  EXPECT_TRUE(Eventually(20s, [&] { return state("/v1/hosts", "b") != "down" && state("/v1/vms", "db") == "running"; }))
      << Http(ctl.port, "GET", "/v1/vms").text << Logs();
  EXPECT_EQ(Placement(ctl.port)["db"], "b");
}

// The default: the controller and its agents talk mutual TLS, and so does the operator.
TEST_F(Cluster, ControllerAgentsAndOperatorTalkMutualTls) {
  net::testing::TestPki pki(dir_);
  ASSERT_TRUE(pki.MakeStandard());
  const net::TlsFiles server = pki.Files("server"), client = pki.Files("client");
  Agent& a = AddAgent("a");
  ASSERT_TRUE(StartAgent(a, server)) << a.proc.Log();
  Controller& ctl = AddController();
  ASSERT_TRUE(StartController(ctl, "sqlite:" + dir_ + "/c.db", "ctl", server)) << ctl.proc.Log();
  const agent::AgentClient op("127.0.0.1", ctl.port, client);
  // The controller reaches the agent over mTLS (it checks the agent's name there).
  auto add = op.Do("POST", "/v1/hosts", json({{"name", "a"}, {"agent", "https://127.0.0.1:" + std::to_string(a.port)}}).dump(), 10s);
  ASSERT_TRUE(add) << add.error().message();
  EXPECT_EQ(add->status, 201) << add->body;
  ASSERT_TRUE(Eventually(10s, [&] {
    auto h = op.Do("GET", "/v1/hosts", "", 5s);
    if (!h) return false;
    auto j = json::parse(h->body, nullptr, false);
    return j.is_array() && j.size() == 1 && j[0].value("reachable", false) && j[0]["capacity"].value("cpus", 0.0) == 1.0;
  })) << ctl.proc.Log();
  // A plain http:// agent URL to a TLS controller is refused with the reason.
  auto plain = op.Do("POST", "/v1/hosts", json({{"name", "b"}, {"agent", "http://127.0.0.1:" + std::to_string(a.port)}}).dump(), 10s);
  ASSERT_TRUE(plain);
  EXPECT_EQ(plain->status, 400) << plain->body;
  EXPECT_NE(plain->body.find("mutual TLS"), std::string::npos) << plain->body;
  // Clients without a certificate from the CA, or without TLS, get nothing.
  EXPECT_FALSE(agent::AgentClient("127.0.0.1", ctl.port, pki.Files("evil")).Do("GET", "/v1/hosts", "", 5s));
  EXPECT_FALSE(agent::AgentClient("127.0.0.1", ctl.port, pki.Files("expired")).Do("GET", "/v1/hosts", "", 5s));
  auto nocert = agent::AgentClient("127.0.0.1", ctl.port).Do("GET", "/v1/hosts", "", 5s);
  EXPECT_TRUE(!nocert || nocert->status != 200);
  // The CLI speaks it too.
  std::string out;
  EXPECT_EQ(Sh(BuildDir() + "/bin/ferry cluster --controller https://127.0.0.1:" + std::to_string(ctl.port) + " --tls-cert " + client.cert +
                   " --tls-key " + client.key + " --tls-ca " + client.ca + " hosts",
               &out),
            0)
      << out;
  EXPECT_NE(out.find("active"), std::string::npos) << out;
}

// Two hosts as two network namespaces, each with its own bridge (the agent's address on it and a
// TAP for the VM), the bridges joined through a third namespace - the "switch", where the
// controller and a client outside every guest live. The agents and the controller talk mutual TLS
// on those addresses (not loopback). A VM with an address on that LAN answers a 1 kHz UDP echo
// probe from the switch; its host is drained, the controller moves it to the other host (the TAP of
// the same name there), and it keeps its address: the probe's replies go on after the move, from
// the new host, and the guest's memory verifies there.
class Lan {
 public:
  explicit Lan(const std::string& tag) : a_("fca" + tag), b_("fcb" + tag), sw_("fcs" + tag) {
    Cleanup();
    auto in = [](const std::string& ns) { return "ip netns exec " + ns + " "; };
    ok_ = Sh("ip netns add " + a_) == 0 && Sh("ip netns add " + b_) == 0 && Sh("ip netns add " + sw_) == 0 &&
          Sh(in(sw_) + "ip link set lo up") == 0 && Sh(in(sw_) + "ip link add sw0 type bridge") == 0 &&
          Sh(in(sw_) + "ip addr add 10.79.0.254/24 dev sw0") == 0 && Sh(in(sw_) + "ip link set sw0 up") == 0;
    int i = 0;
    for (const std::string& h : {a_, b_}) {
      const std::string n = std::to_string(++i), up = "fcu" + n, down = "fcd" + n;
      ok_ = ok_ && Sh("ip link add " + up + " netns " + h + " type veth peer name " + down + " netns " + sw_) == 0 &&
            Sh(in(h) + "ip link set lo up") == 0 && Sh(in(h) + "ip link add br0 type bridge") == 0 &&
            Sh(in(h) + "ip link set " + up + " master br0") == 0 && Sh(in(h) + "ip addr add 10.79.0." + n + "/24 dev br0") == 0 &&
            Sh(in(h) + "ip tuntap add dev ftap0 mode tap vnet_hdr") == 0 && Sh(in(h) + "ip link set ftap0 master br0") == 0 &&
            Sh(in(h) + "ip link set br0 up") == 0 && Sh(in(h) + "ip link set " + up + " up") == 0 &&
            Sh(in(h) + "ip link set ftap0 up") == 0 && Sh(in(sw_) + "ip link set " + down + " master sw0") == 0 &&
            Sh(in(sw_) + "ip link set " + down + " up") == 0;
    }
  }
  ~Lan() { Cleanup(); }
  bool ok() const { return ok_; }
  const std::string& host(int i) const { return i == 0 ? a_ : b_; }
  const std::string& sw() const { return sw_; }

 private:
  void Cleanup() {
    for (const auto& n : {a_, b_, sw_}) Sh("ip netns del " + n + " 2>/dev/null");
  }
  std::string a_, b_, sw_;
  bool ok_ = false;
};

TEST_F(Cluster, AVmKeepsItsAddressOnAnotherHostWhenTheBridgesAreJoined) {
  if (geteuid() != 0) GTEST_SKIP() << "needs root (network namespaces, bridges, TAPs)";
  Lan lan(std::to_string(getpid() % 100000));
  ASSERT_TRUE(lan.ok());
  net::testing::TestPki pki(dir_);
  ASSERT_TRUE(pki.MakeCa("ca"));
  net::testing::CertSpec node;
  node.cn = "node";
  node.ips = {"10.79.0.1", "10.79.0.2", "10.79.0.254"};
  ASSERT_TRUE(pki.MakeCert("node", node));
  const net::TlsFiles tls = pki.Files("node");
  auto tls_args = [&] { return std::vector<std::string>{"--tls-cert", tls.cert, "--tls-key", tls.key, "--tls-ca", tls.ca}; };
  // Agents on their hosts' bridge addresses, the controller on the switch.
  std::vector<std::string> names = {"a", "b"};
  for (int i = 0; i < 2; ++i) {
    Agent& a = AddAgent(names[i]);
    a.port = 7101;
    std::vector<std::string> args = {"/bin/ip", "netns", "exec", lan.host(i), BuildDir() + "/bin/ferry-agent",
                                     "--listen", "10.79.0." + std::to_string(i + 1) + ":7101", "--name", a.name,
                                     "--state-dir", dir_ + "/" + a.name, "--capacity", "cpus=1,mem=1G", "--cpu-usage", "vms",
                                     "--sample-ms", "500"};
    for (auto& t : tls_args()) args.push_back(t);
    ASSERT_TRUE(a.proc.Start(args, dir_ + "/agent-" + a.name + ".log"));
  }
  Controller& ctl = AddController();
  std::vector<std::string> cargs = {"/bin/ip", "netns", "exec", lan.sw(), BuildDir() + "/bin/ferry-controller", "--listen",
                                    "10.79.0.254:7100", "--store", "sqlite:" + dir_ + "/c.db", "--id", "lan"};
  for (auto& t : tls_args()) cargs.push_back(t);
  ASSERT_TRUE(ctl.proc.Start(cargs, dir_ + "/controller-lan.log"));

  InNetns(lan.sw(), [&] {
    auto call = [&](const std::string& method, const std::string& path, const json& body = nullptr) {
      return Http(7100, method, path, body, "10.79.0.254", tls);
    };
    ASSERT_TRUE(Eventually(20s, [&] { return call("GET", "/v1/status").status == 200; })) << ctl.proc.Log();
    for (int i = 0; i < 2; ++i) {
      const json host = {{"name", names[i]}, {"agent", "https://10.79.0." + std::to_string(i + 1) + ":7101"}};
      ASSERT_TRUE(Eventually(20s, [&] { return call("POST", "/v1/hosts", host).status == 201; }))
          << call("GET", "/v1/hosts").text << agents_[i].proc.Log();
    }
    json vm = VmBody("web", "a", false);
    vm["cmdline"] = "console=ttyS0 ferry.ip=10.79.0.10/24 ferry.run=echo:port=7;memdirty:mib=8,rate=500,bytes=4096,verify=2";
    vm["net"] = {{"tap", "ftap0"}, {"mac", "52:54:00:79:00:10"}};
    auto created = call("POST", "/v1/vms", vm);
    ASSERT_EQ(created.status, 201) << created.text;
    ASSERT_TRUE(Eventually(90s, [&] { return call("GET", "/v1/vms/web/console").text.find("memverify ok") != std::string::npos; }))
        << call("GET", "/v1/vms/web/console").text;

    UdpProbe probe(lan.sw(), "10.79.0.10:7", dir_);
    std::this_thread::sleep_for(2s);
    ASSERT_EQ(call("POST", "/v1/hosts/a/drain", json::object()).status, 200);
    ASSERT_TRUE(Eventually(120s, [&] {
      auto r = call("GET", "/v1/vms");
      return r.body.is_array() && r.body.size() == 1 && r.body[0].value("host", "") == "b" && r.body[0].value("state", "") == "running";
    })) << call("GET", "/v1/migrations").text << ctl.proc.Log();
    std::this_thread::sleep_for(3s);
    const json p = probe.Stop();
    ASSERT_TRUE(p.is_object()) << "the probe gave no report";
    std::printf("UDP echo across the move: %s\n", p.dump().c_str());
    // Replies went on after the move (the last one came while the probe was sending, less than
    // 1 s before it stopped), and the service's longest silence stayed short.
    const double end_s = p["end_mono_s"].get<double>(), last_s = p["last_reply_mono_s"].get<double>();
    EXPECT_GT(last_s, end_s - 1.0) << p.dump();
    EXPECT_GT(p["received"].get<double>(), 0.9 * p["sent"].get<double>()) << p.dump();
    EXPECT_LT(p["max_gap_ms"].get<double>(), 2000) << p.dump();
    auto migrations = call("GET", "/v1/migrations");
    ASSERT_EQ(migrations.body.size(), 1u) << migrations.text;
    EXPECT_EQ(migrations.body[0].value("status", ""), "completed") << migrations.text;
    std::printf("migration: %s\n", migrations.body[0].dump().c_str());
    // On the new host: a fresh console, so every line is new.
    EXPECT_TRUE(Eventually(60s, [&] { return call("GET", "/v1/vms/web/console").text.find("memverify ok") != std::string::npos; }));
  });
}

}  // namespace
}  // namespace ferry::test
