// Live migration over mutual TLS between real ferry-vmm processes, and who a destination
// refuses: the guest's memory verifies after a TLS migration that ran while 20 peers trickled
// bytes at the port and another sent plaintext junk; sources with a certificate from another CA,
// an expired certificate, a name not on --tls-allow, or no TLS at all are refused and keep
// running; a plaintext listener on a non-loopback address needs --allow-plaintext.
#include <arpa/inet.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <thread>
#include <vector>

#include <gtest/gtest.h>

#include "migration_util.h"
#include "net/testing/pki.h"

namespace ferry::test {
namespace {
using namespace std::chrono_literals;
using nlohmann::json;

constexpr int kPages = 16 * 256;

std::vector<std::string> GuestArgs() {
  return {"--kernel", GuestImage(), "--initrd", GuestInitrd(), "--mem", "256M", "--cmdline",
          "console=ttyS0 ferry.run=memdirty:mib=16,rate=5000,bytes=4096,verify=0"};
}

int ConnectLoopback(int port) {
  int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  sockaddr_in a{};
  a.sin_family = AF_INET;
  a.sin_port = htons(static_cast<uint16_t>(port));
  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  if (connect(fd, reinterpret_cast<sockaddr*>(&a), sizeof a) != 0) {
    close(fd);
    return -1;
  }
  return fd;
}

bool Listening(int port) { return Sh("ss -Hltn 'sport = :" + std::to_string(port) + "' | grep -q LISTEN") == 0; }

class MigrationTlsTest : public ::testing::Test {
 protected:
  void SetUp() override {
    struct stat st;
    ASSERT_EQ(stat(GuestImage().c_str(), &st), 0) << "guest image missing: run scripts/setup";
    dir_ = MakeTempDir("migtls");
    pki_ = std::make_unique<net::testing::TestPki>(dir_);
    auto made = pki_->MakeStandard();
    ASSERT_TRUE(made) << made.error().message();
  }
  void TearDown() override { RemoveTree(dir_); }
  std::string TlsFlags(const std::string& name, const std::string& ca = "ca") {
    const net::TlsFiles f = pki_->Files(name, ca);
    return " --tls-cert " + f.cert + " --tls-key " + f.key + " --tls-ca " + f.ca;
  }
  std::unique_ptr<VmProcess> Destination(int port) {
    const net::TlsFiles f = pki_->Files("server");
    auto vm = std::make_unique<VmProcess>(std::vector<std::string>{"--incoming", "tls:127.0.0.1:" + std::to_string(port), "--tls-cert", f.cert,
                                                                   "--tls-key", f.key, "--tls-ca", f.ca, "--tls-allow", "client.test"},
                                          dir_);
    EXPECT_TRUE(vm->Start());
    for (int i = 0; i < 500 && !Listening(port); ++i) std::this_thread::sleep_for(10ms);
    EXPECT_TRUE(Listening(port)) << vm->Stderr();
    return vm;
  }
  std::string dir_;
  std::unique_ptr<net::testing::TestPki> pki_;
};

TEST_F(MigrationTlsTest, ATlsMigrationVerifiesAndTheDestinationRefusesEveryoneElse) {
  VmProcess src(GuestArgs(), dir_);
  ASSERT_TRUE(src.Start());
  ASSERT_TRUE(src.WaitConsole("memdirty started", 30s)) << src.Console() << src.Stderr();
  const int port = FreePort();
  auto dst = Destination(port);

  // 20 peers trickle a byte every 200 ms; one sends plaintext junk and stays.
  // The tricklers and their thread end with this scope whichever way the test leaves it (an ASSERT
  // returning early with the thread still joinable would terminate the test and orphan both VMMs).
  struct Tricklers {
    std::atomic<bool> stop{false};
    std::vector<int> fds;
    std::thread thread;
    int junk = -1;
    void Stop() {
      stop = true;
      if (thread.joinable()) thread.join();
      for (int fd : fds) close(fd);
      fds.clear();
      if (junk >= 0) close(junk);
      junk = -1;
    }
    ~Tricklers() { Stop(); }
  } t;
  for (int i = 0; i < 20; ++i) {
    const int fd = ConnectLoopback(port);
    ASSERT_GE(fd, 0);
    t.fds.push_back(fd);
  }
  t.thread = std::thread([&t] {
    while (!t.stop) {
      for (int fd : t.fds) (void)!send(fd, "\x16", 1, MSG_NOSIGNAL);
      std::this_thread::sleep_for(200ms);
    }
  });
  const int junk = ConnectLoopback(port);
  t.junk = junk;
  ASSERT_GE(junk, 0);
  const std::string garbage = "GET / HTTP/1.1\r\nHost: x\r\n\r\nFERRY\x00\x00\x00\x02 and then some junk";
  ASSERT_GT(send(junk, garbage.data(), garbage.size(), MSG_NOSIGNAL), 0);

  // Refused sources: each `ferry migrate` fails promptly with the refusal (the destination's alert
  // where TLS carries one), and the source VM keeps running. A destination that just stopped
  // answering would also fail the migration, but only after the 3 s stall bound, and by a timeout.
  struct Refused {
    const char* what;
    std::string flags;
    // In the source's error; "" where the source may see only the connection closing (its HELLO
    // write can race the destination's alert: "unknown TLS error"; the destination's log names it).
    const char* says;
  } refused[] = {
      {"a certificate from another CA", "--to tls:127.0.0.1:" + std::to_string(port) + TlsFlags("evil"), ""},
      {"an expired certificate", "--to tls:127.0.0.1:" + std::to_string(port) + TlsFlags("expired"), ""},
      {"a name not on --tls-allow", "--to tls:127.0.0.1:" + std::to_string(port) + TlsFlags("other"), ""},
      {"no TLS", "--to tcp:127.0.0.1:" + std::to_string(port), "does not speak TLS"},
  };
  for (const Refused& r : refused) {
    SCOPED_TRACE(r.what);
    const auto t0 = std::chrono::steady_clock::now();
    auto res = Ferry("migrate --api-socket " + src.socket() + " " + r.flags + " --stall-timeout-ms 3000 --json --no-progress");
    const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    EXPECT_NE(res.rc, 0) << res.out;
    const size_t at = res.out.find("ferry: migration failed: ");
    ASSERT_NE(at, std::string::npos) << res.out;
    const std::string err = res.out.substr(at, res.out.find('\n', at) - at);
    EXPECT_LT(s, 2.0) << "a refused source learns it at once, not by its 3 s stall bound: " << err;
    EXPECT_NE(err.find(r.says), std::string::npos) << err;
    EXPECT_EQ(err.find("timed out"), std::string::npos) << err;
    std::printf("%-30s refused in %.2f s: %s\n", r.what, s, err.c_str());
    const json vm = src.Get("/vm");
    ASSERT_TRUE(vm.is_object()) << src.last_api_error() << src.Stderr();
    EXPECT_EQ(vm["state"], "running") << vm.dump();
    EXPECT_EQ(dst->Get("/vm/migration").value("phase", ""), "waiting") << "the destination still waits for a proper source";
  }
  const std::string dlog = dst->Stderr();
  EXPECT_NE(dlog.find("the peer's certificate was refused: unable to get local issuer certificate"), std::string::npos) << dlog;
  EXPECT_NE(dlog.find("expired"), std::string::npos) << dlog;
  EXPECT_NE(dlog.find("'other' is not among the allowed names"), std::string::npos) << dlog;
  EXPECT_NE(dlog.find("does not speak TLS"), std::string::npos) << dlog;

  // The proper source: a TLS migration that completes, with the tricklers and the junk still there.
  auto ok = Ferry("migrate --api-socket " + src.socket() + " --to tls:127.0.0.1:" + std::to_string(port) + TlsFlags("client") +
                  " --json --no-progress");
  t.Stop();
  ASSERT_EQ(ok.rc, 0) << ok.out << "\nsource:\n" << src.Stderr() << "\ndestination:\n" << dst->Stderr();
  ASSERT_TRUE(ok.json.is_object()) << ok.out;
  EXPECT_EQ(ok.json["status"], "completed");
  EXPECT_EQ(ok.json["tls"], true) << ok.out;
  std::printf("TLS migration: downtime %.1f ms, total %.0f ms, %.1f MiB\n", ok.json.value("downtime_ms", 0.0), ok.json.value("total_ms", 0.0),
              ok.json.value("transferred_bytes", 0.0) / 1048576);
  EXPECT_EQ(src.Wait(15s), 0) << src.Stderr();
  EXPECT_NE(dst->Stderr().find("(TLS, certificate 'client')"), std::string::npos) << dst->Stderr();
  EXPECT_TRUE(MemverifyOk(*dst, kPages)) << dst->Console();
  EXPECT_EQ(dst->Get("/vm").value("state", ""), "running");
}

TEST_F(MigrationTlsTest, APlaintextListenerOffLoopbackNeedsAllowPlaintext) {
  const int port = FreePort();
  const std::string any = "tcp:0.0.0.0:" + std::to_string(port);
  {
    VmProcess dst({"--incoming", any}, dir_);
    ASSERT_TRUE(dst.Start());
    EXPECT_EQ(dst.Wait(10s), 1) << dst.Stderr();
    EXPECT_NE(dst.Stderr().find("--allow-plaintext"), std::string::npos) << dst.Stderr();
    EXPECT_NE(dst.Stderr().find("tls:ADDR:PORT"), std::string::npos) << dst.Stderr();
  }
  {
    VmProcess dst({"--incoming", any, "--allow-plaintext"}, dir_);
    ASSERT_TRUE(dst.Start());
    bool listening = false;
    for (int i = 0; i < 500 && !(listening = Listening(port)); ++i) std::this_thread::sleep_for(10ms);
    EXPECT_TRUE(listening) << dst.Stderr();
    dst.Kill();
  }
  // Mistakes in the TLS flags are named before anything listens.
  const net::TlsFiles f = pki_->Files("server");
  const std::vector<std::pair<std::vector<std::string>, std::string>> bad = {
      {{"--incoming", "tls:127.0.0.1:" + std::to_string(port)}, "TLS needs --tls-cert, --tls-key and --tls-ca"},
      {{"--incoming", "tcp:127.0.0.1:" + std::to_string(port), "--tls-cert", f.cert, "--tls-key", f.key, "--tls-ca", f.ca},
       "--tls-* options are for tls:"},
      {{"--incoming", "tls:127.0.0.1:" + std::to_string(port), "--tls-cert", f.cert, "--tls-key", pki_->Path("client.key"), "--tls-ca", f.ca},
       "client.key"},
      {{"--incoming", "tls:127.0.0.1:" + std::to_string(port), "--tls-cert", f.cert, "--tls-key", f.key, "--tls-ca", f.ca, "--allow-plaintext"},
       "--allow-plaintext is for"},
  };
  for (const auto& [args, want] : bad) {
    VmProcess dst(args, dir_);
    ASSERT_TRUE(dst.Start());
    EXPECT_NE(dst.Wait(10s), 0) << want;
    EXPECT_NE(dst.Stderr().find(want), std::string::npos) << dst.Stderr();
  }
  // The source side: TLS files with tcp:, or tls: without them, are refused by the API at once.
  VmProcess src(GuestArgs(), dir_);
  ASSERT_TRUE(src.Start());
  ASSERT_TRUE(src.WaitConsole("memdirty started", 30s)) << src.Console();
  auto r1 = Ferry("migrate --api-socket " + src.socket() + " --to tls:127.0.0.1:" + std::to_string(port) + " --no-progress");
  EXPECT_NE(r1.rc, 0);
  EXPECT_NE(r1.out.find("tls_cert"), std::string::npos) << r1.out;
  auto r2 = Ferry("migrate --api-socket " + src.socket() + " --to tcp:127.0.0.1:" + std::to_string(port) + TlsFlags("client") + " --no-progress");
  EXPECT_NE(r2.rc, 0);
  EXPECT_NE(r2.out.find("use tls:HOST:PORT"), std::string::npos) << r2.out;
  EXPECT_EQ(src.Get("/vm").value("state", ""), "running");
}

}  // namespace
}  // namespace ferry::test
