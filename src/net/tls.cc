#include "net/tls.h"

#include <arpa/inet.h>
#include <poll.h>
#include <sys/socket.h>
#include <openssl/err.h>
#include <openssl/x509v3.h>

#include <algorithm>
#include <cerrno>
#include <cstring>

#include "common/clock.h"

namespace ferry::net {

std::string OpenSslErrors() {
  std::string s;
  unsigned long e;
  while ((e = ERR_get_error()) != 0) {
    char buf[256];
    ERR_error_string_n(e, buf, sizeof buf);
    if (!s.empty()) s += "; ";
    s += buf;
  }
  return s.empty() ? "unknown TLS error" : s;
}

Status ConfigureContext(SSL_CTX* ctx, const TlsFiles& f) {
  if (f.cert.empty() || f.key.empty() || f.ca.empty())
    return Errorf(ErrorCode::kInvalidArgument, "TLS needs a certificate, its private key and a CA file");
  ERR_clear_error();
  SSL_CTX_set_min_proto_version(ctx, TLS1_3_VERSION);
  if (SSL_CTX_use_certificate_chain_file(ctx, f.cert.c_str()) != 1)
    return Errorf(ErrorCode::kInvalidArgument, "TLS certificate {}: {}", f.cert, OpenSslErrors());
  if (SSL_CTX_use_PrivateKey_file(ctx, f.key.c_str(), SSL_FILETYPE_PEM) != 1)
    return Errorf(ErrorCode::kInvalidArgument, "TLS key {} (for certificate {}): {}", f.key, f.cert, OpenSslErrors());
  if (SSL_CTX_check_private_key(ctx) != 1)
    return Errorf(ErrorCode::kInvalidArgument, "TLS key {} does not belong to certificate {}: {}", f.key, f.cert, OpenSslErrors());
  if (SSL_CTX_load_verify_locations(ctx, f.ca.c_str(), nullptr) != 1)
    return Errorf(ErrorCode::kInvalidArgument, "TLS CA {}: {}", f.ca, OpenSslErrors());
  SSL_CTX_set_verify(ctx, SSL_VERIFY_PEER | SSL_VERIFY_FAIL_IF_NO_PEER_CERT, nullptr);
  SSL_CTX_set_mode(ctx, SSL_MODE_ENABLE_PARTIAL_WRITE | SSL_MODE_ACCEPT_MOVING_WRITE_BUFFER);
  SSL_CTX_set_session_cache_mode(ctx, SSL_SESS_CACHE_OFF);
  SSL_CTX_set_num_tickets(ctx, 0);
  return {};
}

Result<std::shared_ptr<TlsContext>> TlsContext::Create(bool server, const TlsFiles& f, std::vector<std::string> allowed) {
  if (f.cert.empty() || f.key.empty() || f.ca.empty())
    return Errorf(ErrorCode::kInvalidArgument, "TLS needs a certificate, its private key and a CA file");
  if (!server && !allowed.empty()) return Errorf(ErrorCode::kInvalidArgument, "a peer allow-list is for the accepting side");
  for (const std::string& a : allowed)
    if (a.empty() || a.find('\0') != std::string::npos) return Errorf(ErrorCode::kInvalidArgument, "an allowed peer name is empty");
  ERR_clear_error();
  SSL_CTX* ctx = SSL_CTX_new(server ? TLS_server_method() : TLS_client_method());
  if (!ctx) return Errorf(ErrorCode::kInternal, "SSL_CTX_new: {}", OpenSslErrors());
  std::shared_ptr<TlsContext> holder(new TlsContext(ctx, server, std::move(allowed)));
  if (auto c = ConfigureContext(ctx, f); !c) return std::unexpected(c.error());
  return holder;
}

TlsContext::~TlsContext() {
  if (ctx_) SSL_CTX_free(ctx_);
}

Status TlsContext::CheckPeer(SSL* ssl) const {
  if (allowed_.empty()) return {};
  X509* cert = SSL_get0_peer_certificate(ssl);
  if (!cert) return Errorf(ErrorCode::kPermissionDenied, "the peer presented no certificate");
  for (const std::string& name : allowed_)
    if (X509_check_host(cert, name.data(), name.size(), 0, nullptr) == 1) return {};
  return Errorf(ErrorCode::kPermissionDenied, "peer certificate '{}' is not among the allowed names ({})", PeerCertName(ssl),
                fmt::join(allowed_, ", "));
}

namespace {

int SendNoSignal(BIO* b, const char* buf, int len) {
  int fd = -1;
  BIO_get_fd(b, &fd);
  BIO_clear_retry_flags(b);
  const ssize_t n = send(fd, buf, static_cast<size_t>(std::max(len, 0)), MSG_NOSIGNAL);
  if (n <= 0 && BIO_sock_should_retry(static_cast<int>(n))) BIO_set_retry_write(b);
  return static_cast<int>(n);
}

// OpenSSL's socket BIO with the write replaced (read, ctrl, create and destroy are its own).
const BIO_METHOD* NoSigpipeSocketMethod() {
  static const BIO_METHOD* method = [] {
    const BIO_METHOD* base = BIO_s_socket();
    BIO_METHOD* m = BIO_meth_new(BIO_get_new_index() | BIO_TYPE_SOURCE_SINK | BIO_TYPE_DESCRIPTOR, "socket, send(MSG_NOSIGNAL)");
    if (!m) return base;
    BIO_meth_set_write(m, SendNoSignal);
    BIO_meth_set_read(m, BIO_meth_get_read(base));
    BIO_meth_set_puts(m, BIO_meth_get_puts(base));
    BIO_meth_set_ctrl(m, BIO_meth_get_ctrl(base));
    BIO_meth_set_create(m, BIO_meth_get_create(base));
    BIO_meth_set_destroy(m, BIO_meth_get_destroy(base));
    return static_cast<const BIO_METHOD*>(m);
  }();
  return method;
}

}  // namespace

Status AttachSocket(SSL* ssl, int fd) {
  BIO* bio = BIO_new(NoSigpipeSocketMethod());
  if (!bio) return Errorf(ErrorCode::kInternal, "BIO_new: {}", OpenSslErrors());
  BIO_set_fd(bio, fd, BIO_NOCLOSE);
  SSL_set_bio(ssl, bio, bio);
  return {};
}

Status ExpectServerName(SSL* ssl, const std::string& name) {
  if (name.empty()) return Errorf(ErrorCode::kInvalidArgument, "no server name to check the certificate against");
  X509_VERIFY_PARAM* param = SSL_get0_param(ssl);
  unsigned char addr[16];
  const bool is_ip = inet_pton(AF_INET, name.c_str(), addr) == 1 || inet_pton(AF_INET6, name.c_str(), addr) == 1;
  if (is_ip) {
    if (X509_VERIFY_PARAM_set1_ip_asc(param, name.c_str()) != 1)
      return Errorf(ErrorCode::kInvalidArgument, "server address '{}': {}", name, OpenSslErrors());
    return {};
  }
  X509_VERIFY_PARAM_set_hostflags(param, X509_CHECK_FLAG_NO_PARTIAL_WILDCARDS);
  if (SSL_set1_host(ssl, name.c_str()) != 1) return Errorf(ErrorCode::kInvalidArgument, "server name '{}': {}", name, OpenSslErrors());
  SSL_set_tlsext_host_name(ssl, name.c_str());
  return {};
}

std::string PeerCertName(SSL* ssl) {
  X509* cert = SSL_get0_peer_certificate(ssl);
  if (!cert) return "";
  char cn[256] = "";
  if (X509_NAME_get_text_by_NID(X509_get_subject_name(cert), NID_commonName, cn, sizeof cn) > 0) return cn;
  std::string out;
  if (auto* sans = static_cast<GENERAL_NAMES*>(X509_get_ext_d2i(cert, NID_subject_alt_name, nullptr, nullptr))) {
    for (int i = 0; i < sk_GENERAL_NAME_num(sans) && out.empty(); ++i) {
      const GENERAL_NAME* g = sk_GENERAL_NAME_value(sans, i);
      if (g->type == GEN_DNS) out.assign(reinterpret_cast<const char*>(ASN1_STRING_get0_data(g->d.dNSName)), ASN1_STRING_length(g->d.dNSName));
    }
    GENERAL_NAMES_free(sans);
  }
  return out;
}

Status RunHandshake(SSL* ssl, int fd, bool server, uint64_t deadline_ns, const std::atomic<bool>* cancel, const std::string& what) {
  for (;;) {
    ERR_clear_error();
    const int r = server ? SSL_accept(ssl) : SSL_connect(ssl);
    if (r == 1) return {};
    const int err = SSL_get_error(ssl, r);
    if (err == SSL_ERROR_WANT_READ || err == SSL_ERROR_WANT_WRITE) {
      if (cancel && cancel->load()) return Errorf(ErrorCode::kCancelled, "TLS with {}: handshake ended to make room for newer connections", what);
      const uint64_t now = NowNs();
      if (now >= deadline_ns) return Errorf(ErrorCode::kTimeout, "TLS with {}: no complete handshake in time", what);
      pollfd p{fd, static_cast<short>(err == SSL_ERROR_WANT_READ ? POLLIN : POLLOUT), 0};
      poll(&p, 1, static_cast<int>(std::min<uint64_t>((deadline_ns - now + 999'999) / 1'000'000, 50)));
      continue;
    }
    if (err == SSL_ERROR_SYSCALL && ERR_peek_error() == 0)
      return Errorf(ErrorCode::kIo, "TLS with {}: the connection ended during the handshake{}", what,
                    errno ? fmt::format(" ({})", strerror(errno)) : "");
    std::string why = HandshakeError(ssl);
    for (const char* plain : {"wrong version number", "packet length too long", "http request", "record layer failure"})
      if (why.find(plain) != std::string::npos) {
        why += " - the other side does not speak TLS (tcp: where tls: is expected, or the reverse)";
        break;
      }
    return Errorf(ErrorCode::kPermissionDenied, "TLS handshake with {} failed: {}", what, why);
  }
}

std::string HandshakeError(SSL* ssl) {
  const long v = SSL_get_verify_result(ssl);
  std::string queued = ERR_peek_error() ? OpenSslErrors() : "";
  if (v != X509_V_OK) {
    std::string s = fmt::format("the peer's certificate was refused: {}", X509_verify_cert_error_string(v));
    return queued.empty() ? s : s + " (" + queued + ")";
  }
  return queued.empty() ? "the connection ended during the TLS handshake" : queued;
}

}  // namespace ferry::net
