// ferry-agent units: --capacity and rates, the /proc and TAP-counter parsers on fixture text, the
// console tail and its bound, vm.json round trip, the adoption rule (a reused pid is not the VMM),
// --listen security checks, and the agent's bookkeeping with real processes standing in for
// ferry-vmm (a VMM that fails to start leaves nothing behind; adoption after a restart).
#include <sys/stat.h>
#include <unistd.h>

#include <filesystem>
#include <fstream>

#include <gtest/gtest.h>

#include "agent/agent.h"
#include "agent/proc_stats.h"
#include "agent/vm_record.h"
#include "agent/vmm_process.h"

namespace ferry::agent {
namespace {

std::string TempDir(const std::string& tag) {
  std::string t = "/tmp/agent_test_" + tag + "_XXXXXX";
  return mkdtemp(t.data());
}

void WriteFile(const std::string& path, const std::string& text) {
  std::ofstream f(path, std::ios::binary | std::ios::trunc);
  f << text;
}

TEST(Capacity, ParsesEveryKeyAndRejectsTheRest) {
  auto c = ParseCapacity("cpus=4,mem=8G,net=10Gbit");
  ASSERT_TRUE(c) << c.error().message();
  EXPECT_EQ(c->cpus, 4);
  EXPECT_EQ(c->mem_bytes, 8ull << 30);
  EXPECT_EQ(c->net_bytes_per_s, 1'250'000'000u);
  c = ParseCapacity("mem=512M,cpus=0.5");
  ASSERT_TRUE(c);
  EXPECT_EQ(c->cpus, 0.5);
  EXPECT_EQ(c->net_bytes_per_s, 0u);
  EXPECT_EQ(*ParseRate("125M"), 125u << 20);
  EXPECT_EQ(*ParseRate("800kbit"), 100'000u);
  EXPECT_EQ(*ParseRate("1000bit"), 125u);
  for (const char* bad : {"", "cpus=4", "mem=1G", "cpus=0,mem=1G", "cpus=-1,mem=1G", "cpus=x,mem=1G", "cpus=1,mem=0",
                          "cpus=1,mem=1G,net=fast", "cpus=1,mem=1G,disk=1", "cpus=1,mem=1G,", "cpus=nan,mem=1G", "cpus=1mem=1G"})
    EXPECT_FALSE(ParseCapacity(bad)) << bad;
}

TEST(ProcParsers, ProcStat) {
  const std::string text =
      "cpu  100 5 50 800 20 3 2 0 7 0\n"
      "cpu0 50 2 25 400 10 1 1 0 3 0\n"
      "cpu1 50 3 25 400 10 2 1 0 4 0\n"
      "intr 12345 0 0\nctxt 999\nbtime 1700000000\n";
  auto t = ParseProcStat(text);
  ASSERT_TRUE(t) << t.error().message();
  EXPECT_EQ(t->cpus, 2);
  EXPECT_EQ(t->total, 100u + 5 + 50 + 800 + 20 + 3 + 2 + 0);  // guest time is already in user
  EXPECT_EQ(t->busy, t->total - 800 - 20);
  EXPECT_FALSE(ParseProcStat("intr 1\n"));
  EXPECT_FALSE(ParseProcStat("cpu  1 2 x 4 5\n"));
  EXPECT_FALSE(ParseProcStat("cpu  1 2\n"));
}

TEST(ProcParsers, MeminfoAndVmstat) {
  auto m = ParseMeminfo("MemTotal:        8000000 kB\nMemFree:  100 kB\nMemAvailable:    6000000 kB\nBuffers: 1 kB\n");
  ASSERT_TRUE(m);
  EXPECT_EQ(m->total_bytes, 8000000ull * 1024);
  EXPECT_EQ(m->available_bytes, 6000000ull * 1024);
  EXPECT_FALSE(ParseMeminfo("MemTotal: 1 kB\n"));
  auto s = ParseVmstatSwapOut("nr_free_pages 5\npswpin 7\npswpout 42\npgfault 1\n");
  ASSERT_TRUE(s);
  EXPECT_EQ(*s, 42u);
  EXPECT_FALSE(ParseVmstatSwapOut("pswpin 7\n"));
}

TEST(ProcParsers, StatusSwapIsBytesAbsentIsZeroMalformedIsAnError) {
  auto s = ParseStatusSwapBytes("Name:\tferry-vmm\nVmRSS:\t  9000 kB\nVmSwap:\t    2048 kB\nThreads:\t5\n");
  ASSERT_TRUE(s);
  EXPECT_EQ(*s, 2048u * 1024);
  auto none = ParseStatusSwapBytes("Name:\tkthreadd\nThreads:\t1\n");
  ASSERT_TRUE(none);
  EXPECT_EQ(*none, 0u);
  EXPECT_FALSE(ParseStatusSwapBytes("VmSwap:\t12 MB\n"));
  EXPECT_FALSE(ParseStatusSwapBytes("VmSwap:\tlots kB\n"));
  EXPECT_FALSE(ParseStatusSwapBytes("VmSwap:\t99999999999999999999 kB\n"));
  EXPECT_FALSE(ParseStatusSwapBytes("VmSwap:\t18014398509481984 kB\n")) << "more than 2^64 bytes";
  // This process has the line (or none): it reads.
  EXPECT_TRUE(ReadSwapBytes(getpid()));
  EXPECT_FALSE(ReadSwapBytes(0));
}

TEST(ProcParsers, PidStatCountsFieldsFromTheLastParenthesis) {
  // A command name with spaces and a ')' must not shift the fields.
  const std::string text =
      "4242 (ferry vmm) (x)) S 1 4242 4242 0 -1 4194560 500 0 0 0 1234 567 0 0 20 0 3 0 987654 300000000 9000 "
      "18446744073709551615 1 1 0 0 0 0 0 4096 0 0 0 0 17 1 0 0 0 0 0\n";
  auto p = ParsePidStat(text);
  ASSERT_TRUE(p) << p.error().message();
  EXPECT_EQ(p->state, 'S');
  EXPECT_EQ(p->cpu_ticks, 1234u + 567);
  EXPECT_EQ(p->start_ticks, 987654u);
  EXPECT_EQ(p->rss_pages, 9000u);
  EXPECT_FALSE(ParsePidStat("4242 (x) S 1 2 3\n"));
  EXPECT_FALSE(ParsePidStat("no parens at all"));
  // This process, for real.
  auto self = ReadPidStat(getpid());
  ASSERT_TRUE(self);
  EXPECT_EQ(self->state, 'R');
  EXPECT_GT(self->rss_pages, 0u);
  EXPECT_FALSE(ReadPidStat(0));
}

TEST(ProcParsers, TapCountersFromProcNetDev) {
  const std::string text =
      "Inter-|   Receive                                                |  Transmit\n"
      " face |bytes    packets errs drop fifo frame compressed multicast|bytes    packets errs drop fifo colls carrier compressed\n"
      "    lo:  466884 5611    0    0    0     0          0         0   466884 5611    0    0    0     0       0          0\n"
      "tap0: 1000 10 0 1 0 0 0 0 2000 20 0 3 0 0 0 0\n"
      " tap00:  9 9 9 9 9 9 9 9 9 9 9 9 9 9 9 9\n";
  auto c = ParseNetDev(text, "tap0");
  ASSERT_TRUE(c) << c.error().message();
  EXPECT_EQ(c->rx_bytes, 1000u);
  EXPECT_EQ(c->rx_packets, 10u);
  EXPECT_EQ(c->rx_dropped, 1u);
  EXPECT_EQ(c->tx_bytes, 2000u);
  EXPECT_EQ(c->tx_packets, 20u);
  EXPECT_EQ(c->tx_dropped, 3u);
  EXPECT_EQ(ParseNetDev(text, "lo")->rx_packets, 5611u);
  auto missing = ParseNetDev(text, "tap1");
  ASSERT_FALSE(missing);
  EXPECT_EQ(missing.error().code(), ErrorCode::kNotFound);
  EXPECT_FALSE(ParseNetDev("tap0: 1 2 3\n", "tap0")) << "short line";
  EXPECT_FALSE(ParseNetDev("tap0: 1 2 3 4 5 6 7 8 x 10 11 12 13 14 15 16\n", "tap0"));
  // This host's loopback, for real.
  EXPECT_TRUE(ReadTapCounters("lo"));
  EXPECT_EQ(RateOf(100, 300, 2.0), 100.0);
  EXPECT_EQ(RateOf(300, 100, 2.0), 0.0) << "a counter reset is no negative rate";
  EXPECT_EQ(RateOf(100, 300, 0.0), 0.0);
}

TEST(Console, TailIsTheLast64KiBAndTheFileStaysBounded) {
  const std::string dir = TempDir("console");
  const std::string path = dir + "/console.log";
  EXPECT_EQ(*TailFile(path), "") << "no console yet";
  WriteFile(path, "short boot log\n");
  EXPECT_EQ(*TailFile(path), "short boot log\n");
  std::string big;
  for (int i = 0; big.size() < 2 * kConsoleMaxBytes; ++i) big += "line " + std::to_string(i) + "\n";
  WriteFile(path, big);
  auto t = TailFile(path);
  ASSERT_TRUE(t);
  EXPECT_EQ(t->size(), kConsoleTailBytes);
  EXPECT_EQ(*t, big.substr(big.size() - kConsoleTailBytes));
  auto cut = BoundFile(path);
  ASSERT_TRUE(cut) << cut.error().message();
  EXPECT_TRUE(*cut);
  struct stat st;
  ASSERT_EQ(stat(path.c_str(), &st), 0);
  EXPECT_LE(static_cast<uint64_t>(st.st_size), kConsoleTailBytes + 64 * 1024) << "cut back to about its tail (whole blocks)";
  EXPECT_GE(static_cast<uint64_t>(st.st_size), kConsoleTailBytes);
  EXPECT_EQ(*TailFile(path), big.substr(big.size() - kConsoleTailBytes)) << "the tail survives the cut";
  EXPECT_FALSE(*BoundFile(path)) << "a bounded file is left alone";
  std::filesystem::remove_all(dir);
}

VmSpec SampleSpec() {
  VmSpec s;
  s.name = "web-1";
  s.kernel = "/boot/Image";
  s.initrd = "/boot/initrd";
  s.cmdline = "console=ttyS0 quiet";
  s.mem = "512M";
  s.mem_bytes = 512ull << 20;
  s.tap = "tap7";
  s.mac = "52:54:00:12:34:56";
  return s;
}

TEST(VmRecordTest, RoundTripsThroughVmJson) {
  const std::string dir = TempDir("record");
  VmRecord r;
  r.spec = SampleSpec();
  r.pid = 4242;
  r.start_ticks = 987654321;
  r.incoming = "tls:127.0.0.1:7000";
  ASSERT_TRUE(SaveVmRecord(dir, r));
  auto back = LoadVmRecord(dir);
  ASSERT_TRUE(back) << back.error().message();
  EXPECT_EQ(VmRecordToJson(*back), VmRecordToJson(r));
  EXPECT_EQ(back->spec.mem_bytes, 512ull << 20);
  EXPECT_EQ(back->spec.tap, "tap7");
  EXPECT_EQ(back->incoming, "tls:127.0.0.1:7000");
  WriteFile(dir + "/vm.json", R"({"spec": {"name": "x"}, "pid": "12", "start_ticks": 1})");
  EXPECT_FALSE(LoadVmRecord(dir)) << "a pid must be a number";
  WriteFile(dir + "/vm.json", R"({"spec": {"name": "../x"}, "pid": 12, "start_ticks": 1})");
  EXPECT_FALSE(LoadVmRecord(dir)) << "a name that is no directory name";
  WriteFile(dir + "/vm.json", "{ not json");
  EXPECT_FALSE(LoadVmRecord(dir));
  std::filesystem::remove_all(dir);
}

TEST(VmRecordTest, RequestsAreDecodedStrictly) {
  auto ok = VmSpecFromJson(nlohmann::json{{"name", "a"}, {"kernel", "/bin/sh"}, {"mem", "64M"}, {"net", {{"tap", "t0"}}}}, false);
  ASSERT_TRUE(ok) << ok.error().message();
  EXPECT_EQ(ok->mem_bytes, 64u << 20);
  EXPECT_EQ(ok->tap, "t0");
  EXPECT_TRUE(VmSpecFromJson(nlohmann::json{{"name", "in"}, {"mem", "1G"}}, true));
  const nlohmann::json bad[] = {
      nlohmann::json::array(),
      {{"kernel", "/bin/sh"}},                                         // no name
      {{"name", "a/b"}, {"kernel", "/bin/sh"}},                        // not a directory name
      {{"name", ".."}, {"kernel", "/bin/sh"}},
      {{"name", "a"}},                                                 // no kernel
      {{"name", "a"}, {"kernel", "/no/such/kernel"}},
      {{"name", "a"}, {"kernel", "relative/Image"}},
      {{"name", "a"}, {"kernel", "/bin/sh"}, {"mem", "lots"}},
      {{"name", "a"}, {"kernel", "/bin/sh"}, {"mem", "1M"}},
      {{"name", "a"}, {"kernel", "/bin/sh"}, {"mem", 256}},
      {{"name", "a"}, {"kernel", "/bin/sh"}, {"nmae", "typo"}},
      {{"name", "a"}, {"kernel", "/bin/sh"}, {"net", {{"tap", "much-too-long-tap-name"}}}},
      {{"name", "a"}, {"kernel", "/bin/sh"}, {"net", {{"mac", "52:54:00:00:00:01"}}}},
  };
  for (const auto& j : bad) EXPECT_FALSE(VmSpecFromJson(j, false)) << j.dump();
  EXPECT_FALSE(VmSpecFromJson(nlohmann::json{{"name", "in"}, {"kernel", "/bin/sh"}}, true)) << "an incoming VM brings its kernel";
}

TEST(Adoption, OnlyTheSameProcessIsAdopted) {
  VmRecord r;
  r.pid = 100;
  r.start_ticks = 5000;
  PidStat same{'S', 10, 5000, 1};
  PidStat reused{'S', 10, 7000, 1};
  PidStat zombie{'Z', 10, 5000, 0};
  EXPECT_EQ(CheckLiveness(r, same), Liveness::kRunning);
  EXPECT_EQ(CheckLiveness(r, reused), Liveness::kPidReused);
  EXPECT_EQ(CheckLiveness(r, zombie), Liveness::kGone);
  EXPECT_EQ(CheckLiveness(r, std::nullopt), Liveness::kGone);
}

TEST(Listen, PlainHttpOnlyOnLoopbackUnlessAllowed) {
  auto a = ParseListen("127.0.0.1:7101");
  ASSERT_TRUE(a);
  EXPECT_EQ(a->host, "127.0.0.1");
  EXPECT_EQ(a->port, 7101);
  auto v6 = ParseListen("[::1]:80");
  ASSERT_TRUE(v6);
  EXPECT_EQ(v6->host, "::1");
  for (const char* bad : {"7101", ":7101", "host:", "host:0", "host:70000", "[::1]80", "h:12x"}) EXPECT_FALSE(ParseListen(bad)) << bad;
  const net::TlsFiles none, files{"c.pem", "k.pem", "ca.pem"};
  EXPECT_TRUE(CheckSecurity(*ParseListen("127.0.0.1:1"), true, false, none));
  EXPECT_TRUE(CheckSecurity(*ParseListen("127.0.0.2:1"), true, false, none));
  EXPECT_TRUE(CheckSecurity(*ParseListen("[::1]:1"), true, false, none));
  EXPECT_TRUE(CheckSecurity(*ParseListen("localhost:1"), true, false, none));
  auto remote = CheckSecurity(*ParseListen("0.0.0.0:1"), true, false, none);
  ASSERT_FALSE(remote);
  EXPECT_NE(remote.error().message().find("--allow-insecure-remote"), std::string::npos) << remote.error().message();
  EXPECT_TRUE(CheckSecurity(*ParseListen("10.0.0.1:1"), true, true, none));
  EXPECT_FALSE(CheckSecurity(*ParseListen("10.0.0.1:1"), false, false, none)) << "neither TLS nor --insecure";
  EXPECT_FALSE(CheckSecurity(*ParseListen("10.0.0.1:1"), false, false, {"c.pem", "", "ca.pem"}));
  EXPECT_TRUE(CheckSecurity(*ParseListen("10.0.0.1:1"), false, false, files));
  EXPECT_FALSE(CheckSecurity(*ParseListen("127.0.0.1:1"), true, false, files)) << "both";
  EXPECT_FALSE(CheckSecurity(*ParseListen("10.0.0.1:1"), false, true, files));
}

// Real processes stand in for ferry-vmm below: the agent's bookkeeping does not need a guest.
class AgentBookkeeping : public ::testing::Test {
 protected:
  void SetUp() override { dir_ = TempDir("agent"); }
  void TearDown() override {
    for (const VmRecord& r : spawned_) KillVmm(r);
    std::filesystem::remove_all(dir_);
  }
  AgentConfig Config(const std::string& vmm) {
    AgentConfig c;
    c.name = "h";
    c.state_dir = dir_;
    c.listen_host = "127.0.0.1";
    c.capacity = {2, 1ull << 30, 0};
    c.vmm_path = vmm;
    c.start_timeout = std::chrono::milliseconds(1500);
    return c;
  }
  std::string dir_;
  std::vector<VmRecord> spawned_;
};

TEST_F(AgentBookkeeping, AVmmThatFailsToStartLeavesNothingBehind) {
  const std::string kernel = dir_ + "/Image";
  WriteFile(kernel, "not a kernel");
  const std::string body = nlohmann::json{{"name", "a"}, {"kernel", kernel}}.dump();
  const std::string hang = dir_ + "/hang.sh";  // runs but never answers on its API socket
  WriteFile(hang, "#!/bin/sh\nexec sleep 31.4159\n");
  chmod(hang.c_str(), 0755);
  for (const std::string& vmm : {std::string("/bin/false"), std::string("/no/such/ferry-vmm"), hang}) {  // exits, cannot exec, hangs
    SCOPED_TRACE(vmm);
    auto agent = Agent::Create(Config(vmm));
    ASSERT_TRUE(agent);
    Reply r = (*agent)->CreateVm(body);
    EXPECT_EQ(r.status, 500) << r.body;
    EXPECT_NE(r.body.find("error"), std::string::npos);
    EXPECT_EQ((*agent)->GetVm("a").status, 404) << "no entry";
    EXPECT_FALSE(std::filesystem::exists(dir_ + "/vms/a")) << "no directory";
    EXPECT_EQ(nlohmann::json::parse((*agent)->GetHost().body)["allocated"]["mem_bytes"], 0) << "no memory held";
  }
  EXPECT_NE(system("pgrep -f '^sleep 31.4159$' >/dev/null"), 0) << "the VMM that never answered was killed";
}

TEST_F(AgentBookkeeping, OneAgentPerStateDirectory) {
  auto first = Agent::Create(Config("/bin/false"));
  ASSERT_TRUE(first) << first.error().message();
  auto second = Agent::Create(Config("/bin/false"));
  ASSERT_FALSE(second) << "two agents would both manage the same VMMs";
  EXPECT_EQ(second.error().code(), ErrorCode::kBusy);
  EXPECT_NE(second.error().message().find("another ferry-agent"), std::string::npos) << second.error().message();
  first->reset();
  EXPECT_TRUE(Agent::Create(Config("/bin/false"))) << "the lock goes with the agent";
}

TEST_F(AgentBookkeeping, ARestartedAgentAdoptsWhatStillRunsAndReportsTheRestExited) {
  // "alive": a process that runs (sleep, in its own session like a VMM); "gone": one that ended;
  // "reused": a live pid whose start time is not the recorded one.
  ASSERT_TRUE(std::filesystem::create_directories(dir_ + "/vms/alive"));
  auto sleeper = SpawnVmm({"/bin/sleep", "60"}, dir_ + "/vms/alive");
  ASSERT_TRUE(sleeper) << sleeper.error().message();
  spawned_.push_back(*sleeper);
  EXPECT_NE(getsid(sleeper->pid), getsid(0)) << "a VMM runs in a session of its own";
  VmRecord alive = *sleeper;
  alive.spec = SampleSpec();
  alive.spec.name = "alive";
  ASSERT_TRUE(SaveVmRecord(dir_ + "/vms/alive", alive));

  ASSERT_TRUE(std::filesystem::create_directories(dir_ + "/vms/gone"));
  auto quick = SpawnVmm({"/bin/true"}, dir_ + "/vms/gone");
  ASSERT_TRUE(quick);
  ASSERT_TRUE(WaitGone(*quick, std::chrono::seconds(5)));
  VmRecord gone = *quick;
  gone.spec = SampleSpec();
  gone.spec.name = "gone";
  ASSERT_TRUE(SaveVmRecord(dir_ + "/vms/gone", gone));

  ASSERT_TRUE(std::filesystem::create_directories(dir_ + "/vms/reused"));
  VmRecord reused = *sleeper;
  reused.start_ticks += 1;
  reused.spec = SampleSpec();
  reused.spec.name = "reused";
  ASSERT_TRUE(SaveVmRecord(dir_ + "/vms/reused", reused));

  ASSERT_TRUE(std::filesystem::create_directories(dir_ + "/vms/half"));  // a crash between mkdir and vm.json

  auto agent = Agent::Create(Config("/bin/false"));
  ASSERT_TRUE(agent);
  auto state = [&](const std::string& n) { return nlohmann::json::parse((*agent)->GetVm(n).body).value("state", "?"); };
  EXPECT_EQ(state("alive"), "running");
  EXPECT_EQ(state("gone"), "exited");
  EXPECT_EQ(state("reused"), "exited");
  EXPECT_NE(nlohmann::json::parse((*agent)->GetVm("reused").body).value("error", "").find("another process"), std::string::npos);
  EXPECT_EQ((*agent)->GetVm("half").status, 404);
  EXPECT_FALSE(std::filesystem::exists(dir_ + "/vms/half"));
  EXPECT_EQ(nlohmann::json::parse((*agent)->GetHost().body)["allocated"]["mem_bytes"], 512 << 20) << "exited VMs hold no memory";
  // Deleting the "reused" record must not kill the process that now has its pid.
  EXPECT_EQ((*agent)->DeleteVm("reused").status, 200);
  EXPECT_EQ(CheckLiveness(*sleeper, ReadPidStat(sleeper->pid)), Liveness::kRunning);
  EXPECT_FALSE(std::filesystem::exists(dir_ + "/vms/reused"));
  // A sample notices the adopted process ending.
  KillVmm(*sleeper);
  (*agent)->SampleOnce();
  EXPECT_EQ(state("alive"), "exited");
}

}  // namespace
}  // namespace ferry::agent
