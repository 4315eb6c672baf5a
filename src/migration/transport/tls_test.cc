// Migration sockets over mutually authenticated TLS 1.3 on real loopback connections: records
// travel both ways while a reader and a writer work at once; and each way a peer can be wrong -
// a certificate from another CA, an expired one, a name not on the allow-list, a server whose
// certificate is for another name, a plaintext peer on either side, a silent peer - is refused
// with an error that says which.
#include <gtest/gtest.h>

#include <stdlib.h>
#include <unistd.h>

#include <atomic>
#include <filesystem>
#include <thread>

#include "common/clock.h"
#include "migration/transport/tcp.h"
#include "net/testing/pki.h"

namespace ferry::migration {
namespace {

class TlsSocketTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    char tmpl[] = "/tmp/ferry-tls-XXXXXX";
    dir_ = mkdtemp(tmpl);
    pki_ = new net::testing::TestPki(dir_);
    auto st = pki_->MakeStandard();
    ASSERT_TRUE(st) << st.error().message();
  }
  static void TearDownTestSuite() {
    delete pki_;
    std::filesystem::remove_all(dir_);
  }
  static std::shared_ptr<net::TlsContext> Ctx(bool server, const std::string& name, const std::string& ca = "ca",
                                              std::vector<std::string> allow = {}) {
    auto c = net::TlsContext::Create(server, pki_->Files(name, ca), std::move(allow));
    EXPECT_TRUE(c) << c.error().message();
    return c ? *c : nullptr;
  }

  // A listener; Serve() accepts one connection and runs the server side of TLS (or not) on a thread.
  void Listen() { listener_ = std::move(*Listener::Listen(*ParseEndpoint("tcp:127.0.0.1:0"))); }
  std::string At(const char* scheme) { return std::string(scheme) + ":127.0.0.1:" + std::to_string(listener_->port()); }
  void Serve(std::shared_ptr<net::TlsContext> tls, int timeout_ms = 3000) {
    server_ = std::thread([this, tls, timeout_ms] {
      auto s = listener_->Accept(timeout_ms);
      if (!s) {
        server_status_ = Status(std::unexpected(s.error()));
        return;
      }
      server_sock_ = std::move(*s);
      if (tls) server_status_ = server_sock_->StartTls(*tls, "", NowNs() + uint64_t(timeout_ms) * 1'000'000);
    });
  }
  Status JoinServer() {
    if (server_.joinable()) server_.join();
    return server_status_;
  }
  void TearDown() override {
    if (server_sock_) server_sock_->Shutdown();
    if (server_.joinable()) server_.join();
  }

  static inline std::string dir_;
  static inline net::testing::TestPki* pki_ = nullptr;
  std::unique_ptr<Listener> listener_;
  std::thread server_;
  Status server_status_;
  std::unique_ptr<Socket> server_sock_;
};

TEST_F(TlsSocketTest, RecordsTravelBothWaysWithAReaderAndAWriterAtOnce) {
  Listen();
  Serve(Ctx(true, "server"));
  auto client_ctx = Ctx(false, "client");
  auto c = Socket::Connect(*ParseEndpoint(At("tls")), 3000, client_ctx.get());
  ASSERT_TRUE(c) << c.error().message();
  auto st = JoinServer();
  ASSERT_TRUE(st) << st.error().message();
  ASSERT_TRUE((*c)->tls() && server_sock_->tls());
  EXPECT_EQ(server_sock_->peer_cert_name(), "client");
  EXPECT_EQ((*c)->peer_cert_name(), "server");

  // 64 records of 1 MiB each way at once; on each side one thread reads while another writes
  // (the control channel's shape), so a waiting reader must not hold up the writer.
  constexpr int kRecords = 64;
  std::vector<uint8_t> payload(1 << 20);
  for (size_t i = 0; i < payload.size(); ++i) payload[i] = static_cast<uint8_t>(i * 131 + 7);
  auto pump = [&](Socket& s, std::atomic<int>* read_ok, std::atomic<int>* write_ok) {
    std::thread w([&] {
      for (int i = 0; i < kRecords; ++i) write_ok->fetch_add(WriteRecord(s, RecordType::kState, payload) ? 1 : 0);
    });
    for (int i = 0; i < kRecords; ++i) {
      auto r = ReadRecord(s, 20000);
      if (r && r->payload == payload) read_ok->fetch_add(1);
    }
    w.join();
  };
  std::atomic<int> cr{0}, cw{0}, sr{0}, sw{0};
  std::thread a([&] { pump(**c, &cr, &cw); });
  std::thread b([&] { pump(*server_sock_, &sr, &sw); });
  a.join();
  b.join();
  EXPECT_EQ(cw.load(), kRecords);
  EXPECT_EQ(sw.load(), kRecords);
  EXPECT_EQ(cr.load(), kRecords) << "records the client read intact";
  EXPECT_EQ(sr.load(), kRecords) << "records the server read intact";

  // A TLS read has the same whole-read deadline as a plaintext one.
  std::array<uint8_t, 8> buf;
  const uint64_t t0 = NowNs();
  auto r = server_sock_->ReadExact(buf, 300);
  ASSERT_FALSE(r);
  EXPECT_EQ(r.error().code(), ErrorCode::kTimeout);
  EXPECT_LT((NowNs() - t0) / 1e6, 800);
  // A closed peer reads as a closed connection, not a TLS error.
  c->reset();
  auto eof = server_sock_->ReadExact(buf, 3000);
  ASSERT_FALSE(eof);
  EXPECT_NE(eof.error().message().find("closed"), std::string::npos) << eof.error().message();
}

TEST_F(TlsSocketTest, AClientFromAnotherCaIsRefused) {
  Listen();
  Serve(Ctx(true, "server"));
  auto evil = Ctx(false, "evil", "ca");  // trusts our CA, but its own certificate is from "rogue"
  auto c = Socket::Connect(*ParseEndpoint(At("tls")), 3000, evil.get());
  auto st = JoinServer();
  ASSERT_FALSE(st);
  EXPECT_EQ(st.error().code(), ErrorCode::kPermissionDenied);
  EXPECT_NE(st.error().message().find("certificate"), std::string::npos) << st.error().message();
  // TLS 1.3: the client finishes its side first and learns of the refusal from the server's
  // alert - under a write once the server has closed, or on its next read.
  if (c) {
    server_sock_.reset();
    std::vector<uint8_t> record(64 << 10, 1);
    Status w = (*c)->WriteAll(record);
    for (int i = 0; i < 20 && w; ++i) {
      std::this_thread::sleep_for(std::chrono::milliseconds(20));
      w = (*c)->WriteAll(record);
    }
    ASSERT_FALSE(w) << "writes kept succeeding to a server that refused us";
    EXPECT_NE(w.error().message().find("refused the connection"), std::string::npos) << w.error().message();
    EXPECT_NE(w.error().message().find("unknown ca"), std::string::npos) << w.error().message();
  }
}

TEST_F(TlsSocketTest, AnExpiredClientCertificateIsRefusedAsExpired) {
  Listen();
  Serve(Ctx(true, "server"));
  auto expired = Ctx(false, "expired");
  (void)Socket::Connect(*ParseEndpoint(At("tls")), 3000, expired.get());
  auto st = JoinServer();
  ASSERT_FALSE(st);
  EXPECT_NE(st.error().message().find("expired"), std::string::npos) << st.error().message();
}

TEST_F(TlsSocketTest, TheAllowListAdmitsOnlyTheNamesOnIt) {
  auto client = Ctx(false, "client"), other = Ctx(false, "other");
  {
    Listen();
    Serve(Ctx(true, "server", "ca", {"client.test"}));
    auto c = Socket::Connect(*ParseEndpoint(At("tls")), 3000, client.get());
    ASSERT_TRUE(c) << c.error().message();
    auto st = JoinServer();
    EXPECT_TRUE(st) << st.error().message();
    TearDown();
  }
  Listen();
  Serve(Ctx(true, "server", "ca", {"client.test"}));
  auto c = Socket::Connect(*ParseEndpoint(At("tls")), 3000, other.get());
  auto st = JoinServer();
  ASSERT_FALSE(st) << "a certificate for other.test passed an allow-list of client.test";
  EXPECT_EQ(st.error().code(), ErrorCode::kPermissionDenied);
  EXPECT_NE(st.error().message().find("'other'"), std::string::npos) << st.error().message();
  // The refusal can be told to the peer over TLS: the socket stays TLS.
  EXPECT_TRUE(server_sock_->tls());
}

TEST_F(TlsSocketTest, TheClientChecksTheServersName) {
  Listen();
  Serve(Ctx(true, "server"));
  auto client = Ctx(false, "client");
  // The server's certificate is for localhost / 127.0.0.1 / ::1, not other.test.
  auto c = Socket::Connect(*ParseEndpoint(At("tls")), 3000, client.get(), "other.test");
  ASSERT_FALSE(c);
  EXPECT_EQ(c.error().code(), ErrorCode::kPermissionDenied);
  EXPECT_NE(c.error().message().find("mismatch"), std::string::npos) << c.error().message();
  (void)JoinServer();
  TearDown();
  // By default the name is the host dialled (127.0.0.1: in the certificate's IP SANs); "localhost" as a DNS name.
  for (const std::string name : {"", "localhost"}) {
    Listen();
    Serve(Ctx(true, "server"));
    auto ok = Socket::Connect(*ParseEndpoint(At("tls")), 3000, client.get(), name);
    EXPECT_TRUE(ok) << name << ": " << ok.error().message();
    EXPECT_TRUE(JoinServer());
    TearDown();
  }
}

TEST_F(TlsSocketTest, PlaintextPeersAreRefusedEitherWay) {
  // A plaintext client (a source with tcp:) at a TLS listener: the preamble is no ClientHello.
  Listen();
  Serve(Ctx(true, "server"));
  auto plain = Socket::Connect(*ParseEndpoint(At("tcp")), 3000);
  ASSERT_TRUE(plain);
  ASSERT_TRUE(WritePreamble(**plain, Role::kControl));
  auto st = JoinServer();
  ASSERT_FALSE(st);
  EXPECT_NE(st.error().message().find("does not speak TLS"), std::string::npos) << st.error().message();
  EXPECT_FALSE(server_sock_->tls());
  TearDown();
  // A TLS client at a plaintext listener: the server answers no ServerHello (here: nothing).
  Listen();
  Serve(nullptr);
  auto client = Ctx(false, "client");
  const uint64_t t0 = NowNs();
  auto c = Socket::Connect(*ParseEndpoint(At("tls")), 500, client.get());
  ASSERT_FALSE(c);
  EXPECT_EQ(c.error().code(), ErrorCode::kTimeout) << c.error().message();
  EXPECT_LT((NowNs() - t0) / 1e6, 1500);
  // ... and where the listener answers with its own bytes, the client says so.
  (void)JoinServer();
  ASSERT_TRUE(server_sock_);
  server_sock_.reset();
  TearDown();
  Listen();
  Serve(nullptr);
  std::thread junk([&] {
    if (server_.joinable()) server_.join();
    if (server_sock_) (void)server_sock_->WriteAll(EncodePreamble(Role::kControl, kProtocolVersion));
  });
  auto c2 = Socket::Connect(*ParseEndpoint(At("tls")), 3000, client.get());
  junk.join();
  ASSERT_FALSE(c2);
  EXPECT_EQ(c2.error().code(), ErrorCode::kPermissionDenied) << c2.error().message();
}

TEST_F(TlsSocketTest, ConfigurationErrorsNameWhatIsWrong) {
  auto missing = net::TlsContext::Create(true, {pki_->Path("nope.crt"), pki_->Path("server.key"), pki_->Path("ca.crt")});
  ASSERT_FALSE(missing);
  EXPECT_NE(missing.error().message().find("nope.crt"), std::string::npos) << missing.error().message();
  auto mismatch = net::TlsContext::Create(true, {pki_->Path("server.crt"), pki_->Path("client.key"), pki_->Path("ca.crt")});
  ASSERT_FALSE(mismatch);
  EXPECT_NE(mismatch.error().message().find("client.key"), std::string::npos) << mismatch.error().message();
  EXPECT_NE(mismatch.error().message().find("mismatch"), std::string::npos) << mismatch.error().message();
  EXPECT_FALSE(net::TlsContext::Create(false, pki_->Files("client"), {"x"})) << "an allow-list on the connecting side";
  // A tls: endpoint needs a client context.
  auto c = Socket::Connect(*ParseEndpoint("tls:127.0.0.1:1"), 100, nullptr);
  ASSERT_FALSE(c);
  EXPECT_EQ(c.error().code(), ErrorCode::kInvalidArgument);
  EXPECT_EQ(ParseEndpoint("tls:[::1]:5")->ToString(), "tls:[::1]:5");
  EXPECT_TRUE(ParseEndpoint("tls:h:5")->tls);
  EXPECT_FALSE(ParseEndpoint("tcp:h:5")->tls);
  EXPECT_FALSE(ParseEndpoint("ssl:h:5"));
}

TEST(Listener, KnowsWhetherItIsOnLoopback) {
  EXPECT_TRUE((*Listener::Listen(*ParseEndpoint("tcp:127.0.0.1:0")))->loopback());
  EXPECT_TRUE((*Listener::Listen(*ParseEndpoint("tcp:localhost:0")))->loopback());
  EXPECT_FALSE((*Listener::Listen(*ParseEndpoint("tcp::0")))->loopback());
  EXPECT_FALSE((*Listener::Listen(*ParseEndpoint("tcp:0.0.0.0:0")))->loopback());
}

}  // namespace
}  // namespace ferry::migration
